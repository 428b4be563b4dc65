//! The engine's side of bookings at unowned locations (`crate::imports`):
//! indexing import and receipt records, and reversing this node's rows
//! where another node's booking of the same id stands.

use std::collections::{BTreeMap, BTreeSet};

use super::Engine;
use crate::imports::{receipt_key, summed_lines, yields_at, RECEIPT_KEY, SEEN_MAX};
use crate::layout::{month_of, part_id, record_key, DocId, RecordKind};
use crate::ops::{OpError, LINES_MAX};

/// Count records one import writes per location, at most: its rows (each
/// location's rows are one count record per `LINES_MAX`) are bounded by the
/// import's own limit; this bounds the scan for them.
const IMPORT_PAGES_MAX: usize = 10_000;

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
            e.seen = seen_of(v);
            e.counted_over = names_of(&v["counted_over"]);
        }
        self.views.imports_pending.insert(id.to_string());
    }

    /// Indexes a receipt record at a location no node owns (as far as this
    /// node knows now; the settling checks again).
    pub(crate) fn note_receipt(&mut self, v: &serde_json::Value) {
        let (Some(id), Some(location)) = (v["receipt_id"].as_str(), v["location"].as_str()) else {
            return;
        };
        if self.views.owner_of(location).is_some() {
            return;
        }
        let node = v["node"].as_str().unwrap_or("").to_string();
        let key = receipt_key(id);
        let e = self
            .views
            .imports
            .entry(key.clone())
            .or_default()
            .entry(node)
            .or_default();
        e.at_ms = v["at_ms"].as_u64().unwrap_or(0);
        e.locations = BTreeSet::from([location.to_string()]);
        e.lines = summed_lines(v);
        e.seen = seen_of(v);
        self.views.imports_pending.insert(key);
    }

    /// The other nodes' bookings of index key `key` this node has seen: a
    /// booking made now comes after them (it is not the first, whatever the
    /// clocks say).
    pub(crate) fn bookings_seen(&self, key: &str) -> Vec<String> {
        self.views
            .imports
            .get(key)
            .into_iter()
            .flatten()
            .filter(|(n, s)| **n != self.cfg.name && s.at_ms != 0)
            .map(|(n, _)| n.clone())
            .take(SEEN_MAX)
            .collect()
    }

    /// The other nodes holding units (received − removed ≠ 0) of the
    /// given (product, location) pairs at locations no node owns, in this
    /// node's view now: an import booked now counts over their bookings.
    pub(crate) fn bookings_counted_over<'a>(
        &self,
        rows: impl Iterator<Item = (u64, &'a str)>,
    ) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (p, l) in rows {
            if l == self.cfg.location || self.views.owner_of(l).is_some() {
                continue;
            }
            let Some(entry) = self.views.entry(p, l) else {
                continue;
            };
            for (a, c) in &entry.cells {
                if out.len() >= SEEN_MAX {
                    return out;
                }
                if a.tag() != self.tag && c.received != c.removed {
                    out.insert(self.views.name_of(a.tag()));
                }
            }
        }
        out
    }

    /// Reverses this node's rows of imports and receipts at locations no
    /// node owns where another node's booking of the same id came first.
    pub fn settle_ownerless_imports(&mut self, now_ms: u64) {
        if self.faults.skip_ownerless_settle {
            return;
        }
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
            let receipt = id.strip_prefix(RECEIPT_KEY);
            let own = match receipt {
                Some(r) => self.own_record(RecordKind::Receipt, r, mine.at_ms),
                None => self.own_record(RecordKind::Import, &id, mine.at_ms),
            };
            let Some(own) = own else {
                later.push(id);
                continue;
            };
            let due: Vec<String> = mine
                .locations
                .iter()
                .filter(|l| !mine.undone.contains(*l))
                .filter(|l| **l != self.cfg.location && self.views.owner_of(l).is_none())
                .filter(|l| yields_at(&self.cfg.name, mine, all, l, receipt.is_some()))
                .cloned()
                .collect();
            let at_ms = mine.at_ms;
            for l in due {
                let deltas = match receipt {
                    Some(_) => summed_lines(&own)
                        .into_iter()
                        .map(|(p, q)| (p, i64::try_from(q).unwrap_or(i64::MAX)))
                        .collect(),
                    None => self.import_deltas(&id, &l, at_ms),
                };
                if let Err(e) = self.undo_booking_at(&id, &l, deltas, now_ms) {
                    tracing::warn!(id = %id, location = %l, error = ?e, "booking at an ownerless location not reversed");
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

    /// Reverses `deltas` (product → units) that this node's booking `key`
    /// (an import id, or a receipt's `rcv/<id>`) applied at `location`, all
    /// or nothing.
    fn undo_booking_at(
        &mut self,
        key: &str,
        location: &str,
        deltas: BTreeMap<u64, i64>,
        now_ms: u64,
    ) -> Result<(), OpError> {
        let deltas: Vec<(u64, i64)> = deltas.into_iter().filter(|(_, d)| *d != 0).collect();
        // Record ids have no `/`: a receipt's reversal is under `rcv~<id>`.
        let base = key.replacen('/', "~", 1);
        self.atomically(|e| {
            for (k, page) in deltas.chunks(LINES_MAX).enumerate() {
                let count_id = part_id(&base, &format!(".{location}.undo{k}"));
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
                let undoes = if key.starts_with(RECEIPT_KEY) {
                    "undoes_receipt"
                } else {
                    "undoes_import"
                };
                let mut rec = serde_json::json!({"count_id": count_id, "node": e.cfg.name, "location": location, "lines": lines, "at_ms": now_ms});
                rec[undoes] = key.trim_start_matches(RECEIPT_KEY).into();
                e.write_record(RecordKind::Count, &count_id, rec, now_ms);
            }
            let rec = serde_json::json!({"import_id": key, "node": e.cfg.name, "undoes": location, "at_ms": now_ms});
            e.write_record(
                RecordKind::Import,
                &part_id(&base, &format!(".{location}.undone")),
                rec,
                now_ms,
            );
            tracing::info!(id = %key, location = %location, products = deltas.len(), "booking at a location no node owns was made first by another node: reversed here");
            Ok(())
        })
    }
}

/// The other nodes' bookings a record names as seen (from peers: bounded).
fn seen_of(v: &serde_json::Value) -> BTreeSet<String> {
    names_of(&v["seen"])
}

/// A record's list of node names (from peers: bounded).
fn names_of(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .take(SEEN_MAX)
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect()
}
