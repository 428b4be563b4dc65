//! Forks and deficits: recording detected forks, and the deficits that
//! an event (a merge, a retirement) leaves in this node's rights.

use std::collections::{BTreeMap, BTreeSet};

use super::{Engine, RightsBefore};
use crate::ids::NodeTag;
use crate::layout::{self, DocId, RecordKind};
use crate::ledger::StockEntry;

impl Engine {
    /// Records a detected fork of this node's own history and any deficit it
    /// left: the shortfall the merged changes caused on the rows of `before`
    /// (this node's rights there before they were applied).
    pub(crate) fn record_fork(
        &mut self,
        doc: &str,
        changes: usize,
        before: &RightsBefore,
        now_ms: u64,
    ) {
        self.stats.forks_detected += 1;
        tracing::error!(doc, changes, "fork of this node's own history detected (restored backup or copied data directory); totals merged exactly");
        let id = format!("{}.{}", doc.replace('/', "."), now_ms);
        let rec = serde_json::json!({"node": self.cfg.name, "doc": doc, "changes": changes, "at_ms": now_ms});
        self.write_record(RecordKind::Fork, &id, rec, now_ms);
        // The merged branches may have spent the same rights twice.
        self.record_event_deficits(before, "fork", now_ms);
    }

    /// This node's rights (a retired predecessor's included) on the rows of
    /// ledger document `doc` that `keys` touch, as the views hold them now:
    /// taken before changes are applied, so that the shortfall they cause is
    /// told apart from earlier ones.
    pub(crate) fn rights_of_keys(&self, doc: &str, keys: &BTreeSet<String>) -> RightsBefore {
        let mut out = RightsBefore::new();
        let Ok(DocId::Ledger { location, .. }) = DocId::parse(doc, self.cfg.buckets) else {
            return out;
        };
        for k in keys {
            if let Ok((p, _, _, _)) = layout::parse_ledger_any(k) {
                out.entry((p, location.clone())).or_insert_with(|| {
                    self.views
                        .entry(p, &location)
                        .map(|e| self.node_rights(e, self.tag))
                        .unwrap_or(0)
                });
            }
        }
        out
    }

    /// One shortfall event, one deficit: for each row of `before`, the units
    /// this node's rights went below zero since (`max(0, -after) -
    /// max(0, -before)`), never masked by deficits recorded for earlier
    /// events. The record's id is the same on every branch of a cloned node
    /// that merges the same changes (the row, the writers of this node's tag
    /// on it, the rights after), so two branches detecting one fork record
    /// one deficit.
    pub(crate) fn record_event_deficits(
        &mut self,
        before: &RightsBefore,
        cause: &str,
        now_ms: u64,
    ) {
        let mut shortfalls = Vec::new();
        for ((p, l), b) in before {
            let Some(e) = self.views.entry(*p, l) else {
                continue;
            };
            let after = self.node_rights(e, self.tag);
            // The event's own shortfall; and never less than what is short
            // and not covered by any deficit yet (an earlier event's record
            // may have been lost with a restored disk).
            let new_short = (after.saturating_neg().max(0) - b.saturating_neg().max(0)).max(
                after
                    .saturating_neg()
                    .saturating_sub(self.recorded_shortfall_total(*p, l)),
            );
            if new_short > 0 {
                shortfalls.push((*p, l.clone(), new_short, after, self.own_writers_digest(e)));
            }
        }
        for (p, location, d, after, writers) in shortfalls {
            let mut id = layout::part_id(
                &format!("{cause}.{location}.{p}"),
                &format!(".{writers}.{}", after.unsigned_abs()),
            );
            let mut d = d;
            let key = (format!("deficit/{id}"), self.cfg.name.clone());
            if self.views.alarms.contains_key(&key) {
                // The other branch's record of this very event arrived
                // first; or an earlier event ended at the same rights: then
                // only what no deficit covers yet, under an id of its own.
                let uncovered = after
                    .saturating_neg()
                    .saturating_sub(self.recorded_shortfall_total(p, &location));
                if uncovered <= 0 {
                    continue;
                }
                d = uncovered;
                id = layout::part_id(
                    &format!("{cause}.{location}.{p}"),
                    &format!(".{writers}.{}.{now_ms}", after.unsigned_abs()),
                );
            }
            self.write_deficit(&id, p, &location, d, cause, now_ms);
        }
    }

    /// A short digest of the incarnations of this node's tag (and of retired
    /// nodes it succeeds) that wrote cells of an entry.
    fn own_writers_digest(&self, e: &StockEntry) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for a in e.cells.keys() {
            if self.views.resolve(a.tag()) == self.tag {
                h.update(a.hex().as_bytes());
            }
        }
        hex::encode(&h.finalize()[..6])
    }

    fn write_deficit(
        &mut self,
        id: &str,
        p: u64,
        location: &str,
        d: i64,
        cause: &str,
        now_ms: u64,
    ) {
        tracing::warn!(
            location = %location,
            product = p,
            deficit = d,
            cause,
            "rights below zero recorded as a deficit"
        );
        let rec = serde_json::json!({"node": self.cfg.name, "location": location, "product_id": p, "deficit": d, "cause": cause, "at_ms": now_ms});
        self.write_record(RecordKind::Deficit, id, rec, now_ms);
    }

    /// After a retirement that passed rights to this node became known
    /// (`retired_before`: the retirements known until then): records the
    /// shortfall the inheritance causes on every row that holds an inherited
    /// writer's cells — its branches may have spent the same rights twice,
    /// and it can no longer record that itself. The shortfall is the event's
    /// own: what this node's rights fell below zero by, less what it was
    /// short already and what the retired node was short and recorded itself.
    pub(crate) fn record_inherited_deficits(
        &mut self,
        retired_before: &BTreeMap<NodeTag, NodeTag>,
        now_ms: u64,
    ) {
        let me = self.tag;
        let old = |t: NodeTag| {
            let mut t = t;
            for _ in 0..16 {
                match retired_before.get(&t) {
                    Some(next) if *next != t => t = *next,
                    _ => break,
                }
            }
            t
        };
        let mut shortfalls = Vec::new();
        for (p, m) in &self.views.stock {
            for (l, e) in m {
                // Writers that were not this node's before and are now.
                let mut inherited: Vec<NodeTag> = e
                    .cells
                    .keys()
                    .map(|a| a.tag())
                    .chain(e.cells.values().flat_map(|c| c.granted.keys().copied()))
                    .filter(|t| old(*t) != me && self.views.resolve(*t) == me)
                    .map(old)
                    .collect();
                if inherited.is_empty() {
                    continue;
                }
                inherited.sort();
                inherited.dedup();
                let after = self.node_rights(e, me);
                let mine_before = e.rights_in(me, &old);
                let mut short = after.saturating_neg().max(0) - mine_before.saturating_neg().max(0);
                for t in inherited {
                    let theirs = e.rights_in(t, &old).saturating_neg().max(0);
                    let name = self.views.name_of(t);
                    short -= theirs.min(self.recorded_deficit_of(&name, *p, l));
                }
                let uncovered = after
                    .saturating_neg()
                    .saturating_sub(self.recorded_shortfall_total(*p, l));
                let short = short.max(uncovered);
                if short > 0 {
                    shortfalls.push((*p, l.clone(), short, after));
                }
            }
        }
        for (p, location, d, after) in shortfalls {
            let id = layout::part_id(
                &format!("retired.{location}.{p}"),
                &format!(".{}", after.unsigned_abs()),
            );
            self.write_deficit(&id, p, &location, d, "retired", now_ms);
        }
    }

    /// Units below zero on (product, location) that records already cover:
    /// deficits and overdrafts recorded by this node or by a retired node
    /// whose rights passed to it. An overdraft (a sale beyond the rights,
    /// allowed by a relaxed policy or an override) covers its own shortfall:
    /// without it, a branch of a cloned node that oversold recorded its own
    /// overdraft again as a fork deficit when it merged the other branch,
    /// while that branch recorded the same units as the fork's deficit (seed
    /// 413 of the #16 sweep: a huge sale of ~10^9 units counted twice).
    fn recorded_shortfall_total(&self, product: u64, location: &str) -> i64 {
        let me = self.tag;
        let mut names: BTreeSet<String> = self
            .views
            .nodes
            .keys()
            .filter(|t| **t != me && self.views.resolve(**t) == me)
            .map(|t| self.views.name_of(*t))
            .collect();
        names.insert(self.cfg.name.clone());
        names
            .iter()
            .map(|n| {
                self.recorded_deficit_of(n, product, location)
                    .saturating_add(self.recorded_overdraft_of(n, product, location))
            })
            .fold(0i64, i64::saturating_add)
    }

    /// Units of overdraft recorded on (product, location) by the node `name`
    /// (each overdraft record's lines of `product`; bounded, from peers).
    fn recorded_overdraft_of(&self, name: &str, product: u64, location: &str) -> i64 {
        self.views
            .alarms
            .values()
            .filter(|a| a.kind == "overdraft" && a.node == name)
            .filter(|a| a.record["location"].as_str() == Some(location))
            .flat_map(|a| {
                a.record["lines"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .take(crate::ops::LINES_MAX)
            })
            .filter(|l| l["product_id"].as_u64() == Some(product))
            .map(|l| l["quantity"].as_i64().unwrap_or(0).max(0))
            .fold(0i64, i64::saturating_add)
    }

    /// Units of deficit recorded on (product, location) by the node `name`.
    fn recorded_deficit_of(&self, name: &str, product: u64, location: &str) -> i64 {
        self.views
            .alarms
            .values()
            .filter(|a| a.kind == "deficit" && a.node == name)
            .filter(|a| {
                a.record["product_id"].as_u64() == Some(product)
                    && a.record["location"].as_str() == Some(location)
            })
            .map(|a| a.record["deficit"].as_i64().unwrap_or(0))
            .fold(0i64, i64::saturating_add)
    }
}
