//! Checkers of the exact books (issue 15): per-transfer conservation,
//! deficits once per shortfall event, and imports at a location no node owns
//! counted once.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{ReadDoc, ROOT};
use storemesh_protocol::engine::Engine;
use storemesh_protocol::layout::{parse_record_key, RecordKind};

use crate::check::Violation;
use crate::world::World;

/// Every record of `kinds` in the engine's records documents, with every
/// value of a key (two branches of a cloned node may both have written one).
fn records(e: &Engine, kinds: &[RecordKind]) -> Vec<(RecordKind, serde_json::Value)> {
    let mut out = Vec::new();
    for (id, _) in e.documents() {
        if !id.starts_with("rec/") {
            continue;
        }
        let Some(doc) = e.doc(&id) else { continue };
        for key in doc.keys(ROOT) {
            let Ok((kind, _)) = parse_record_key(&key) else {
                continue;
            };
            if !kinds.contains(&kind) {
                continue;
            }
            for (v, _) in doc.get_all(ROOT, key.as_str()).unwrap_or_default() {
                if let Some(json) = v
                    .as_str()
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
                {
                    out.push((kind, json));
                }
            }
        }
    }
    out
}

fn lines_of(v: &serde_json::Value, field: &str) -> BTreeMap<u64, u64> {
    let mut m = BTreeMap::new();
    for l in v["lines"].as_array().into_iter().flatten() {
        *m.entry(l["product_id"].as_u64().unwrap_or(0)).or_default() +=
            l[field].as_u64().unwrap_or(0);
    }
    m
}

struct Sent {
    from: String,
    to: String,
    sent: BTreeMap<u64, u64>,
}

impl World {
    /// Per-transfer conservation, per transfer id and creating node (ids may
    /// collide between nodes): a receipt names an existing transfer, each
    /// transfer is received at most once, by the node of its destination;
    /// per product, sent = received + recorded shrinkage − over; and the units
    /// of the transfers not received are exactly what the view counts as
    /// in transit to their destinations.
    pub fn check_transfers(&self, e: &Engine) -> Result<(), Violation> {
        let v = |m: String| self.violation("transfer-conservation", m);
        let all = records(e, &[RecordKind::Transfer, RecordKind::TransferReceipt]);
        let mut transfers: BTreeMap<(String, String), Sent> = BTreeMap::new();
        // Transfer ids a forked node used twice, and the (product,
        // destination) pairs they touch.
        let mut twice: BTreeSet<(String, String)> = BTreeSet::new();
        let mut ambiguous: BTreeSet<(u64, String)> = BTreeSet::new();
        for (kind, r) in &all {
            if *kind == RecordKind::Transfer {
                let key = (
                    r["transfer_id"].as_str().unwrap_or("").to_string(),
                    r["node"].as_str().unwrap_or("").to_string(),
                );
                let t = Sent {
                    from: r["from"].as_str().unwrap_or("").to_string(),
                    to: r["to"].as_str().unwrap_or("").to_string(),
                    sent: lines_of(r, "quantity"),
                };
                if let Some(old) = transfers.get(&key) {
                    if old.from != t.from || old.to != t.to || old.sent != t.sent {
                        // Only a node whose history was forked on purpose
                        // (restored from an old image, or cloned) may have
                        // lost the idempotency record of its own transfer id
                        // and used it again: the view, keyed by (id, node),
                        // cannot tell the two apart, nor can this check.
                        if !self.check.forked.contains(&key.1) {
                            return Err(v(format!(
                                "{} wrote two different transfers with id {}",
                                key.1, key.0
                            )));
                        }
                        for x in [old, &t] {
                            for p in x.sent.keys() {
                                ambiguous.insert((*p, x.to.clone()));
                            }
                        }
                        twice.insert(key.clone());
                    }
                }
                transfers.insert(key, t);
            }
        }
        let location_of: BTreeMap<&str, &str> = self
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.cfg.location.as_str()))
            .collect();
        let mut received: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for (kind, r) in &all {
            if *kind != RecordKind::TransferReceipt {
                continue;
            }
            let id = r["transfer_id"].as_str().unwrap_or("").to_string();
            let sender = r["sender"].as_str().unwrap_or("").to_string();
            let writer = r["node"].as_str().unwrap_or("").to_string();
            let Some(t) = transfers.get(&(id.clone(), sender.clone())) else {
                return Err(v(format!(
                    "{writer} received transfer {id} of {sender}, which no node sent"
                )));
            };
            if twice.contains(&(id.clone(), sender.clone())) {
                // Which of the two it receives is not known.
                received.entry((id, sender)).or_default().push(writer);
                continue;
            }
            if r["to"].as_str() != Some(t.to.as_str())
                || r["from"].as_str() != Some(t.from.as_str())
            {
                return Err(v(format!(
                    "{writer}'s receipt of transfer {id} of {sender} names another route than the transfer ({} → {})",
                    t.from, t.to
                )));
            }
            if location_of.get(writer.as_str()).copied() != Some(t.to.as_str()) {
                return Err(v(format!(
                    "transfer {id} of {sender} to {} was received by {writer}, not by the node of its destination",
                    t.to
                )));
            }
            for l in r["lines"].as_array().into_iter().flatten() {
                let p = l["product_id"].as_u64().unwrap_or(0);
                let sent = l["sent"].as_u64().unwrap_or(0);
                let got = l["received"].as_u64().unwrap_or(0);
                let shrink = l["shrinkage"].as_u64().unwrap_or(0);
                let over = l["over"].as_u64().unwrap_or(0);
                let want = t.sent.get(&p).copied().unwrap_or(0);
                if sent != want || got + shrink != sent + over {
                    return Err(v(format!(
                        "transfer {id} of {sender}, product {p}: sent {want}, its receipt says sent {sent}, received {got}, shrinkage {shrink}, over {over}"
                    )));
                }
            }
            received.entry((id, sender)).or_default().push(writer);
        }
        for ((id, sender), writers) in &received {
            let forked = writers.iter().all(|w| self.check.forked.contains(w));
            if writers.len() > 1 && !forked {
                return Err(v(format!(
                    "transfer {id} of {sender} was received {} times ({writers:?}): its units arrived more than once",
                    writers.len()
                )));
            }
        }
        let mut in_transit: BTreeMap<(u64, String), i64> = BTreeMap::new();
        for (key, t) in &transfers {
            if received.contains_key(key) {
                continue;
            }
            for (p, q) in &t.sent {
                *in_transit.entry((*p, t.to.clone())).or_default() += *q as i64;
            }
        }
        let destinations: BTreeSet<&String> = transfers.values().map(|t| &t.to).collect();
        let products: BTreeSet<u64> = transfers
            .values()
            .flat_map(|t| t.sent.keys().copied())
            .collect();
        for to in destinations {
            for p in &products {
                if ambiguous.contains(&(*p, to.clone())) {
                    continue;
                }
                let want = in_transit.get(&(*p, to.clone())).copied().unwrap_or(0);
                let got = e.incoming(*p, to);
                if want != got {
                    return Err(v(format!(
                        "product {p} in transit to {to}: the unreceived transfers sent {want}, the view says {got}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Deficits once per shortfall event, as a bound every run must keep: a
    /// node's rights on (product, location) fall below zero only by its own
    /// writers' removals and grants (a fork's other branch and a retired
    /// predecessor's included), so what it recorded as deficits there never
    /// exceeds those in total. A deficit recorded again for an old shortfall
    /// at every later count, or twice for one fork by both branches of a
    /// cloned node, eventually does. (A bound, not the exact per-event sum:
    /// commits that crash after the disk write are not observed, so the
    /// simulator cannot follow every shortfall as it happens.)
    pub fn check_deficits_per_event(&self, e: &Engine) -> Result<(), Violation> {
        let mut recorded: BTreeMap<(String, u64, String), i64> = BTreeMap::new();
        for a in e.views.alarms.values().filter(|a| a.kind == "deficit") {
            let p = a.record["product_id"].as_u64().unwrap_or(0);
            let l = a.record["location"].as_str().unwrap_or("").to_string();
            *recorded.entry((a.node.clone(), p, l)).or_default() +=
                a.record["deficit"].as_i64().unwrap_or(0);
        }
        let tag_of: BTreeMap<&str, storemesh_protocol::ids::NodeTag> = self
            .check
            .names
            .iter()
            .map(|(t, n)| (n.as_str(), *t))
            .collect();
        for ((node, p, l), d) in recorded {
            let Some(tag) = tag_of.get(node.as_str()).copied() else {
                continue;
            };
            let taken: i64 = e
                .views
                .entry(p, &l)
                .map(|en| {
                    en.cells
                        .iter()
                        .filter(|(a, _)| a.tag() == tag || self.check.resolve(a.tag()) == tag)
                        .map(|(_, c)| {
                            let g: u64 = c.granted.values().sum();
                            (c.removed + g) as i64
                        })
                        .sum()
                })
                .unwrap_or(0);
            if d > taken {
                let ids: Vec<String> = e
                    .views
                    .alarms
                    .values()
                    .filter(|a| a.kind == "deficit" && a.node == node)
                    .filter(|a| a.record["product_id"].as_u64() == Some(p))
                    .filter(|a| a.record["location"].as_str() == Some(l.as_str()))
                    .map(|a| format!("{}={}", a.id, a.record["deficit"]))
                    .collect();
                return Err(self.violation(
                    "deficits-per-event",
                    format!(
                        "{node} recorded deficits of {d} on product {p} at {l}, more than its writers ever took out there ({taken}): {ids:?}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The warehouse's opening balances, imported by any number of nodes
    /// under one id, count once: every listed product ends at its count
    /// (only imports touch the warehouse). Judged only when every node that
    /// imported is a running member (a retired or stopped importer cannot
    /// reverse its booking).
    pub fn check_ownerless_imports(&self, e: &Engine) -> Result<(), Violation> {
        let loc = crate::workload::OWNERLESS;
        let Some(importers) = e.views.imports.get("wh-opening") else {
            return Ok(());
        };
        let members: BTreeSet<&str> = self
            .members()
            .into_iter()
            .filter(|i| self.nodes[*i].life.is_some() && !self.nodes[*i].is_clone)
            .map(|i| self.nodes[i].name.as_str())
            .collect();
        // Every importer must be able to act; a cloned or restored importer's
        // two branches share its name, which the index cannot tell apart.
        if importers
            .keys()
            .any(|n| !members.contains(n.as_str()) || self.check.forked.contains(n))
        {
            return Ok(());
        }
        // Sales may take units from the warehouse afterwards (a web shop
        // that imported holds rights there); nothing else moves its stock.
        let mut sold: BTreeMap<u64, i64> = BTreeMap::new();
        for (_, r) in records(e, &[RecordKind::Sale]) {
            if r["location"].as_str() == Some(loc) {
                for (p, q) in lines_of(&r, "quantity") {
                    *sold.entry(p).or_default() += q as i64;
                }
            }
        }
        let counts = crate::workload::ownerless_counts();
        for (k, want) in counts.iter().enumerate() {
            let Some(p) = e
                .views
                .by_sku
                .get(&format!("sim-wh-{k}"))
                .and_then(|s| s.first())
            else {
                continue;
            };
            let got = e.totals(*p, Some(loc)).map(|t| t.0).unwrap_or(0)
                + sold.get(p).copied().unwrap_or(0);
            if got != *want as i64 {
                return Err(self.violation(
                    "ownerless-once",
                    format!(
                        "{} nodes imported wh-opening at {loc}; product {p} is at {got} (sales there added back), its count is {want}; imports {importers:?}; sold {:?}; entry {:?}",
                        importers.len(), sold.get(p), e.views.entry(*p, loc)
                    ),
                ));
            }
        }
        Ok(())
    }
}
