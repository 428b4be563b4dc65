//! Count imports at a location no node owns: one physical count, one accounting.
//!
//! `import counts` may book rows at a location without a node of its own (a
//! warehouse: opening balances). A count sets on hand to what was counted,
//! relative to the importing node's view; two nodes importing the same file
//! (one import id) while apart each applied the whole correction, so the
//! units were added twice. As for transfers into such a location (booked
//! only by the sending node), one node's booking stands: an import booked
//! after another node's import of the id (its record names those it saw) is
//! never it; of the imports booked apart, the first by (import time, node
//! name) — every node sees the same records, so all agree on it. Every later node,
//! once it sees the first's import record, reverses its own rows there: one
//! count record per page of up to `ops::LINES_MAX` lines (`<id>.<loc>.undo<k>`,
//! read like any count), plus a marker (`imp/<id>.<loc>.undone`), all in one
//! operation. Run once per batch for the imports noted since
//! (`Engine::settle_ownerless_imports`).

use std::collections::{BTreeMap, BTreeSet};

use crate::engine::Engine;
use crate::layout::{month_of, part_id, record_key, DocId, RecordKind};
use crate::ops::{OpError, LINES_MAX};

/// Count records one import writes per location, at most: its rows (each
/// location's rows are one count record per `LINES_MAX`) are bounded by the
/// import's own limit; this bounds the scan for them.
const IMPORT_PAGES_MAX: usize = 10_000;

/// Other importers an import record names as booked before it, at most
/// (a chain has far fewer nodes).
pub const SEEN_MAX: usize = 256;

/// What a node knows of one node's import of an id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportSeen {
    pub at_ms: u64,
    /// Locations the import booked rows at.
    pub locations: BTreeSet<String>,
    /// Locations where this node's booking was reversed.
    pub undone: BTreeSet<String>,
    /// Nodes whose import of the id this one was booked after.
    pub seen: BTreeSet<String>,
}

impl Engine {
    /// Indexes an import record (or a reversal marker).
    pub(crate) fn note_import(&mut self, v: &serde_json::Value) {
        let Some(id) = v["import_id"].as_str() else {
            return;
        };
        let node = v["node"].as_str().unwrap_or("").to_string();
        let e = self
            .views
            .imports
            .entry(id.to_string())
            .or_default()
            .entry(node)
            .or_default();
        if let Some(l) = v["undoes"].as_str() {
            e.undone.insert(l.to_string());
        } else {
            e.at_ms = v["at_ms"].as_u64().unwrap_or(0);
            // Records come from peers: bounded before they count.
            e.locations = v["locations"]
                .as_array()
                .into_iter()
                .flatten()
                .take(LINES_MAX)
                .filter_map(|l| l["location"].as_str().map(str::to_string))
                .collect();
            e.seen = v["seen"]
                .as_array()
                .into_iter()
                .flatten()
                .take(SEEN_MAX)
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect();
        }
        self.views.imports_pending.insert(id.to_string());
    }

    /// Reverses this node's rows of imports at locations no node owns where
    /// another node's import of the same id came first.
    pub fn settle_ownerless_imports(&mut self, now_ms: u64) {
        let pending = std::mem::take(&mut self.views.imports_pending);
        let mut later = Vec::new();
        for id in pending {
            let Some(all) = self.views.imports.get(&id) else {
                continue;
            };
            let Some(mine) = all.get(&self.cfg.name) else {
                continue;
            };
            if mine.at_ms == 0 {
                continue;
            }
            // Its records are read back from the documents: an import of this
            // very batch is not in them until the flush; the next batch does it.
            if self
                .own_record(RecordKind::Import, &id, mine.at_ms)
                .is_none()
            {
                later.push(id);
                continue;
            }
            let due: Vec<String> = mine
                .locations
                .iter()
                .filter(|l| !mine.undone.contains(*l))
                .filter(|l| **l != self.cfg.location && self.views.owner_of(l).is_none())
                .filter(|l| {
                    // Booked after seeing another's import: not the first.
                    // Of the imports that saw none (booked apart), the first
                    // by (time, node name) stands: clocks may disagree, but
                    // every node picks the same one.
                    let at_l: Vec<(&String, &ImportSeen)> = all
                        .iter()
                        .filter(|(_, s)| s.at_ms != 0 && s.locations.contains(*l))
                        .collect();
                    let saw_other = |s: &ImportSeen| at_l.iter().any(|(n, _)| s.seen.contains(*n));
                    saw_other(mine)
                        || at_l
                            .iter()
                            .filter(|(_, s)| !saw_other(s))
                            .map(|(n, s)| (s.at_ms, n.as_str()))
                            .min()
                            .is_some_and(|first| first.1 != self.cfg.name)
                })
                .cloned()
                .collect();
            let at_ms = mine.at_ms;
            for l in due {
                if let Err(e) = self.undo_import_at(&id, &l, at_ms, now_ms) {
                    tracing::warn!(import = %id, location = %l, error = ?e, "import at an ownerless location not reversed");
                }
            }
        }
        self.views.imports_pending.extend(later);
    }

    /// This node's own record `kind/id`, written in the month of `at_ms`.
    fn own_record(&self, kind: RecordKind, id: &str, at_ms: u64) -> Option<serde_json::Value> {
        let month = DocId::Records {
            tag: self.tag,
            month: month_of(at_ms),
            part: 0,
        }
        .encode();
        self.record_in_month(&month, &record_key(kind, id))
    }

    /// The deltas this node's import `id` applied at `location`: product → units.
    fn import_deltas(&self, id: &str, location: &str, at_ms: u64) -> BTreeMap<u64, i64> {
        let mut out: BTreeMap<u64, i64> = BTreeMap::new();
        let mut add = |p: u64, d: i64| {
            let e = out.entry(p).or_default();
            *e = e.saturating_add(d);
        };
        for k in 0..IMPORT_PAGES_MAX {
            let Some(rec) =
                self.own_record(RecordKind::Count, &format!("{id}.{location}.{k}"), at_ms)
            else {
                break;
            };
            for l in rec["lines"].as_array().into_iter().flatten() {
                add(
                    l["product_id"].as_u64().unwrap_or(0),
                    l["delta"].as_i64().unwrap_or(0),
                );
            }
        }
        // A full import also set the products it did not list to 0, in parts.
        let full = part_id(id, &format!(".{location}.full"));
        for k in 0..IMPORT_PAGES_MAX {
            let Some(rec) = self.own_record(
                RecordKind::CountZero,
                &part_id(&full, &format!("~{k}")),
                at_ms,
            ) else {
                break;
            };
            for z in rec["zeroed"].as_array().into_iter().flatten() {
                add(z[0].as_u64().unwrap_or(0), z[2].as_i64().unwrap_or(0));
            }
        }
        out
    }

    /// Reverses this node's rows of import `id` at `location`, all or nothing.
    fn undo_import_at(
        &mut self,
        id: &str,
        location: &str,
        at_ms: u64,
        now_ms: u64,
    ) -> Result<(), OpError> {
        let deltas: Vec<(u64, i64)> = self
            .import_deltas(id, location, at_ms)
            .into_iter()
            .filter(|(_, d)| *d != 0)
            .collect();
        self.atomically(|e| {
            for (k, page) in deltas.chunks(LINES_MAX).enumerate() {
                let count_id = part_id(id, &format!(".{location}.undo{k}"));
                let mut lines = Vec::with_capacity(page.len());
                for (p, d) in page {
                    // The opposite correction: from basis |d| to 0, or from 0 to |d|.
                    let (counted, basis) = if *d > 0 {
                        (0, *d)
                    } else {
                        (d.unsigned_abs(), 0)
                    };
                    let delta = e.count_line(&count_id, location, *p, counted, basis, now_ms)?;
                    lines.push(serde_json::json!({"product_id": p, "counted": counted, "basis": basis, "delta": delta}));
                }
                let rec = serde_json::json!({"count_id": count_id, "node": e.cfg.name, "location": location, "lines": lines, "undoes_import": id, "at_ms": now_ms});
                e.write_record(RecordKind::Count, &count_id, rec, now_ms);
            }
            let rec = serde_json::json!({"import_id": id, "node": e.cfg.name, "undoes": location, "at_ms": now_ms});
            e.write_record(
                RecordKind::Import,
                &part_id(id, &format!(".{location}.undone")),
                rec,
                now_ms,
            );
            tracing::info!(import = %id, location = %location, products = deltas.len(), "import at a location no node owns was booked first by another node: reversed here");
            Ok(())
        })
    }
}
