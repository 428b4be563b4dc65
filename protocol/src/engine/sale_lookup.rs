//! Sales of closed records parts in the store (`coldsales`, issue 14): the
//! lookups that read the stored index, the batch writes that fill it when a
//! part's index is stored, the in-memory entries dropped once those writes
//! are durable, and the shared ids settled again at a start.

use automerge::ChangeHash;

use super::{Batch, Engine};
use crate::coldsales::{ColdPart, ColdSales, COLD_PARTS_PER_BATCH};
use crate::layout::{self, RecordKind};

impl Engine {
    /// Records documents that may hold sale `id` according to the stored
    /// index of closed parts (some may hold other ids with the same
    /// fingerprint: the caller checks). One read of the store; a failed
    /// read is logged and finds nothing.
    pub(crate) fn stored_sale_candidates(&self, id: &str) -> Vec<String> {
        let (Some(c), Some(a)) = (self.cold_sales.as_ref(), self.part_archive.as_ref()) else {
            return Vec::new();
        };
        // No key: nothing was ever stored.
        let Some(fp) = c.fingerprint(id) else {
            return Vec::new();
        };
        let (lo, hi) = ColdSales::range(fp);
        match a.cold_sale_entries(lo, hi) {
            Ok(entries) => {
                let mut docs: Vec<String> = Vec::with_capacity(entries.len());
                for e in entries {
                    if let Some(d) = c.part_doc(ColdSales::entry_part(e)) {
                        if !docs.iter().any(|x| x == d) {
                            docs.push(d.to_string());
                        }
                    }
                }
                docs
            }
            Err(e) => {
                tracing::error!(error = %e, "the stored sale index could not be read; a sale of a closed part may not be found");
                Vec::new()
            }
        }
    }

    /// Drops from memory the sales of parts whose stored entries are
    /// durable: every batch flushed before this one is, unless one is
    /// still in flight (then a later flush drops them). A part written
    /// since keeps its entries (its new sales are in memory only) until
    /// its next index is stored.
    pub(crate) fn drop_stored_sales(&mut self) {
        if self.batch_in_flight {
            return;
        }
        let Some(c) = self.cold_sales.as_mut() else {
            return;
        };
        if c.moving.is_empty() {
            return;
        }
        for (doc, heads) in std::mem::take(&mut c.moving) {
            let unchanged = self.indexed_parts.contains(&doc)
                && self.docs.get(&doc).is_some_and(|s| s.persisted == heads);
            if unchanged {
                self.views.sales.remove_doc(&doc);
                self.stats.cold_sale_parts_dropped += 1;
            }
        }
    }

    /// Writes to `batch` the stored-index entries of the parts whose index
    /// it stores, of up to [`COLD_PARTS_PER_BATCH`] parts indexed by an
    /// earlier release (`due`), and the shared ids noted since the last
    /// flush. Runs after `flush_part_indexes`.
    pub(crate) fn flush_stored_sales(&mut self, batch: &mut Batch) {
        let Some(c) = self.cold_sales.as_mut() else {
            return;
        };
        batch.cold_sales.shared = std::mem::take(&mut c.shared_pending).into_iter().collect();
        if batch.part_indexes.is_empty() && c.due.is_empty() {
            return;
        }
        batch.cold_sales.key = c.ensure_key(&self.entropy);
        let mut written: Vec<(String, Vec<ChangeHash>)> = Vec::new();
        {
            let Batch {
                part_indexes,
                cold_sales,
                ..
            } = &mut *batch;
            for (doc, index) in part_indexes.iter() {
                c.due.remove(doc);
                if let Some(heads) = stored_entries(c, doc, index, None, cold_sales) {
                    written.push((doc.clone(), heads));
                }
            }
        }
        // Parts indexed by an earlier release: read back from the store.
        let mut due_taken = 0;
        while due_taken < COLD_PARTS_PER_BATCH {
            let Some(doc) = c.due.pop_first() else {
                break;
            };
            // Not indexed as stored any more (written since): its next index
            // writes its entries.
            let Some(slot) = self.docs.get(&doc) else {
                continue;
            };
            if !self.indexed_parts.contains(&doc) || self.dirty_docs.contains(&doc) {
                continue;
            }
            let index = match self.part_archive.as_ref().map(|a| a.part_index(&doc)) {
                Some(Ok(Some(b))) => b,
                Some(Err(e)) => {
                    tracing::warn!(doc = %doc, error = %e, "a records part's index could not be read; its sales stay in memory");
                    continue;
                }
                _ => continue,
            };
            due_taken += 1;
            let persisted = Some(slot.persisted.as_slice());
            if let Some(heads) = stored_entries(c, &doc, &index, persisted, &mut batch.cold_sales) {
                written.push((doc, heads));
            }
        }
        batch.cold_sales.entries.sort_unstable();
        batch.cold_sales.entries.dedup();
        self.stats.cold_sale_parts_written += written.len() as u64;
        self.stats.cold_sale_entries_written += batch.cold_sales.entries.len() as u64;
        c.moving.extend(written);
    }

    /// At the end of a start: the ids stored as shared are settled again as
    /// a start settles the ids it finds twice in memory (`settle_bulk_sales`):
    /// collisions listed, the document to look up first chosen, over every
    /// document holding the id (read from the stored index and memory).
    pub(crate) fn settle_stored_shared(&mut self) {
        let Some(c) = self.cold_sales.as_mut() else {
            return;
        };
        let mut ids = c.take_start_shared();
        c.end_start();
        ids.sort();
        ids.dedup();
        let key_of = |id: &str| layout::record_key(RecordKind::Sale, id);
        for id in ids {
            if let Some(c) = self.cold_sales.as_mut() {
                // Stored already: not written again.
                c.shared_pending.remove(&id);
            }
            let key = key_of(&id);
            let mut docs: Vec<String> = self
                .views
                .sales
                .candidates(&id)
                .map(str::to_string)
                .collect();
            for d in self.stored_sale_candidates(&id) {
                if !docs.contains(&d) {
                    docs.push(d);
                }
            }
            docs.retain(|d| {
                self.docs.get(d).is_some_and(|s| {
                    automerge::ReadDoc::get(&*s.doc, automerge::ROOT, key.as_str())
                        .ok()
                        .flatten()
                        .is_some()
                })
            });
            docs.sort();
            let Some((first, later)) = docs.split_first() else {
                continue;
            };
            if later.is_empty() {
                continue;
            }
            let mut first = first.clone();
            for d in later {
                first = self.settle_sale_pair(&id, &first, d, &key);
            }
            self.views.sales.prefer(&id, &first);
        }
    }
}

/// Adds to `out` the entries of part `doc` from its encoded index (and the
/// part, numbered if new). Returns the heads the index describes; `None`
/// (nothing added) when it does not decode, describes other heads than
/// `expect`, or the part cannot be numbered.
fn stored_entries(
    c: &mut ColdSales,
    doc: &str,
    index: &[u8],
    expect: Option<&[ChangeHash]>,
    out: &mut crate::coldsales::ColdSalesWrites,
) -> Option<Vec<ChangeHash>> {
    // A part refused below keeps the number (unused; numbers are cheap).
    let n = c.number(doc)?;
    let c = &*c;
    Engine::read_part_index(index, |raw_heads, entries| {
        let heads: Vec<ChangeHash> = raw_heads.iter().map(|h| ChangeHash(*h)).collect();
        if expect.is_some_and(|e| e != heads.as_slice()) {
            return None;
        }
        let before = out.entries.len();
        for (key, _) in entries {
            let Ok((RecordKind::Sale, id)) = layout::parse_record_key(key) else {
                continue;
            };
            match c.fingerprint(id) {
                Some(fp) => out.entries.push(ColdSales::entry(fp, n)),
                None => {
                    out.entries.truncate(before);
                    return None;
                }
            }
        }
        out.parts.push(ColdPart {
            number: n,
            doc: doc.to_string(),
            heads: raw_heads.to_vec(),
        });
        Some(heads)
    })
    .flatten()
}
