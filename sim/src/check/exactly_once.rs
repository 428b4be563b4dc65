//! The final exactly-once check, per writer: cells equal the sum of the
//! records each actor wrote; no record written twice concurrently.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{ReadDoc, ROOT};
use storemesh_protocol::engine::Engine;
use storemesh_protocol::ids::{ActorKey, NodeTag};
use storemesh_protocol::layout::{parse_record_key, RecordKind};

use super::flat_recomputed;
use crate::invariant::Violation;
use crate::world::World;

impl World {
    /// Exactly once, per writer: every actor's cumulative cells equal the sum
    /// of the records it wrote (a double execution or a lost effect shows as a
    /// difference); no record was written twice concurrently.
    pub(super) fn check_exactly_once(&self, e: &Engine) -> Result<(), Violation> {
        type Cells = (u64, u64, BTreeMap<NodeTag, u64>);
        let mut expected: BTreeMap<(ActorKey, u64, String), Cells> = BTreeMap::new();
        let tag_of: BTreeMap<&str, NodeTag> = self
            .check
            .names
            .iter()
            .map(|(t, n)| (n.as_str(), *t))
            .collect();
        for (id, _) in e.documents() {
            if !id.starts_with("rec/") {
                continue;
            }
            let Some(doc) = e.doc(&id) else { continue };
            for key in doc.keys(ROOT) {
                let Ok((kind, _)) = parse_record_key(&key) else {
                    continue;
                };
                if !matches!(
                    kind,
                    RecordKind::Sale
                        | RecordKind::Receipt
                        | RecordKind::Return
                        | RecordKind::Count
                        | RecordKind::CountLines
                        | RecordKind::CountZero
                        | RecordKind::Grant
                        | RecordKind::Reservation
                        | RecordKind::Transfer
                        | RecordKind::TransferReceipt
                ) {
                    continue;
                }
                let all = doc.get_all(ROOT, key.as_str()).unwrap_or_default();
                let writers: Vec<ActorKey> = all
                    .iter()
                    .filter_map(|(_, exid)| match exid {
                        automerge::ObjId::Id(_, a, _) => ActorKey::from_bytes(a.to_bytes()),
                        automerge::ObjId::Root => None,
                    })
                    .collect();
                // Two processes of one identity (a clone, a restored backup) may
                // both have executed the same request: that is the fork, which is
                // detected and reported. Anything else is a double execution.
                let forked_writers = writers.iter().all(|a| {
                    self.check
                        .names
                        .get(&a.tag())
                        .is_some_and(|n| self.check.forked.contains(n))
                });
                if all.len() > 1 && !forked_writers {
                    return Err(self.violation(
                        "exactly-once",
                        format!("record {key} in {id} was written by {} processes concurrently: executed more than once", all.len()),
                    ));
                }
                for ((value, _), actor) in all.iter().zip(writers) {
                    let Some(json) = value
                        .as_str()
                        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
                    else {
                        continue;
                    };
                    // Transfers leave `from` (the sender's removal) and
                    // arrive at `to` (the receiver's, units received only).
                    if kind == RecordKind::Transfer {
                        let from = json["from"].as_str().unwrap_or("").to_string();
                        for l in json["lines"].as_array().into_iter().flatten() {
                            let p = l["product_id"].as_u64().unwrap_or(0);
                            expected.entry((actor, p, from.clone())).or_default().1 +=
                                l["quantity"].as_u64().unwrap_or(0);
                        }
                        continue;
                    }
                    if kind == RecordKind::TransferReceipt {
                        let to = json["to"].as_str().unwrap_or("").to_string();
                        for l in json["lines"].as_array().into_iter().flatten() {
                            let p = l["product_id"].as_u64().unwrap_or(0);
                            let q = l["received"].as_u64().unwrap_or(0);
                            if q > 0 {
                                expected.entry((actor, p, to.clone())).or_default().0 += q;
                            }
                        }
                        continue;
                    }
                    let loc = json["location"].as_str().unwrap_or("").to_string();
                    let mut add = |p: u64, f: &mut dyn FnMut(&mut Cells)| {
                        f(expected.entry((actor, p, loc.clone())).or_default());
                    };
                    let lines = json["lines"].as_array().cloned().unwrap_or_default();
                    match kind {
                        RecordKind::Sale => {
                            for l in &lines {
                                let q = l["quantity"].as_u64().unwrap_or(0);
                                add(l["product_id"].as_u64().unwrap_or(0), &mut |c| c.1 += q);
                            }
                        }
                        RecordKind::Receipt => {
                            for l in &lines {
                                let q = l["quantity"].as_u64().unwrap_or(0);
                                add(l["product_id"].as_u64().unwrap_or(0), &mut |c| c.0 += q);
                            }
                        }
                        RecordKind::Return => {
                            for l in lines.iter().filter(|l| l["disposition"] == "restock") {
                                let q = l["quantity"].as_u64().unwrap_or(0);
                                add(l["product_id"].as_u64().unwrap_or(0), &mut |c| c.0 += q);
                            }
                        }
                        // A count session's page: [product, counted, basis, delta, at].
                        RecordKind::CountLines => {
                            for l in &lines {
                                let d = l[3].as_i64().unwrap_or(0);
                                add(l[0].as_u64().unwrap_or(0), &mut |c| {
                                    if d > 0 {
                                        c.0 += d as u64
                                    } else {
                                        c.1 += d.unsigned_abs()
                                    }
                                });
                            }
                        }
                        // A part of a full count's zeroing: [product, basis, delta].
                        RecordKind::CountZero => {
                            for l in json["zeroed"].as_array().into_iter().flatten() {
                                let d = l[2].as_i64().unwrap_or(0);
                                add(l[0].as_u64().unwrap_or(0), &mut |c| {
                                    if d > 0 {
                                        c.0 += d as u64
                                    } else {
                                        c.1 += d.unsigned_abs()
                                    }
                                });
                            }
                        }
                        RecordKind::Count => {
                            for l in &lines {
                                let d = l["delta"].as_i64().unwrap_or(0);
                                add(l["product_id"].as_u64().unwrap_or(0), &mut |c| {
                                    if d > 0 {
                                        c.0 += d as u64
                                    } else {
                                        c.1 += d.unsigned_abs()
                                    }
                                });
                            }
                        }
                        // Units reserved for another node are a grant to it.
                        RecordKind::Reservation => {
                            let to = json["fulfil_by_tag"].as_str().and_then(NodeTag::parse);
                            if let Some(to) = to.filter(|t| *t != actor.tag()) {
                                for l in &lines {
                                    let q = l["quantity"].as_u64().unwrap_or(0);
                                    add(l["product_id"].as_u64().unwrap_or(0), &mut |c| {
                                        *c.2.entry(to).or_default() += q
                                    });
                                }
                            }
                        }
                        RecordKind::Grant => {
                            let q = json["quantity"].as_u64().unwrap_or(0);
                            // The recipient's tag; records from before `to_tag`
                            // name it only (or by hex when the name was unknown).
                            let to =
                                json["to_tag"]
                                    .as_str()
                                    .and_then(NodeTag::parse)
                                    .or_else(|| {
                                        json["to"].as_str().and_then(|n| tag_of.get(n)).copied()
                                    });
                            if let Some(to) = to {
                                add(json["product_id"].as_u64().unwrap_or(0), &mut |c| {
                                    *c.2.entry(to).or_default() += q
                                });
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        let mut actual: BTreeMap<(ActorKey, u64, String), Cells> = BTreeMap::new();
        for ((p, l), entry) in flat_recomputed(e) {
            for (a, c) in entry.cells {
                let granted: BTreeMap<NodeTag, u64> =
                    c.granted.into_iter().filter(|(_, q)| *q > 0).collect();
                actual.insert((a, p, l.clone()), (c.received, c.removed, granted));
            }
        }
        let keys: BTreeSet<&(ActorKey, u64, String)> =
            expected.keys().chain(actual.keys()).collect();
        for k in keys {
            if self.check.discarded_actors.contains(&k.0) {
                continue;
            }
            let want = expected.get(k).cloned().unwrap_or_default();
            let got = actual.get(k).cloned().unwrap_or_default();
            if want != got {
                let who = self
                    .check
                    .names
                    .get(&k.0.tag())
                    .cloned()
                    .unwrap_or_default();
                return Err(self.violation(
                    "exactly-once",
                    format!(
                        "writer {} ({who}) on product {} at {}: its cells say received {} removed {} granted {:?}, its records add up to received {} removed {} granted {:?}",
                        k.0.hex(),
                        k.1,
                        k.2,
                        got.0,
                        got.1,
                        got.2,
                        want.0,
                        want.1,
                        want.2
                    ),
                ));
            }
        }
        Ok(())
    }
}
