//! Ledger epochs (DESIGN §7, "compaction by epochs"): a ledger document's
//! history is cut by starting a new epoch of it that begins with no history.
//!
//! - **Cut.** The owner of a location starts epoch `e+1` of one of its ledger
//!   documents once epoch `e` holds more than [`EPOCH_OPS_MIN`] operations and
//!   [`EPOCH_OPS_PER_KEY`] per key it holds:
//!   it carries every cell its view holds into `e+1` under `b/…` keys
//!   ([`crate::layout::LEDGER_CARRIED_PREFIX`]) and drops `e` (memory and disk).
//! - **Switch.** A node that receives the first changes of a newer epoch does
//!   the same before anything reads the new document: it carries every cell of
//!   its view the new epoch lacks (its own offline sales, and any other node's
//!   it has seen), then drops its old epoch. A node offline past any number of
//!   cuts therefore loses nothing: its cells are in its view, and its view is
//!   carried into whatever epoch it meets first.
//! - **Read.** A cell is the maximum of its live and carried values (and of
//!   concurrent values of one key): every cell is a cumulative total with one
//!   writer, so any carried value is a lower bound of the writer's own and the
//!   maximum is exact once the writer's latest value arrived. Nothing ever
//!   depends on an older epoch: a node holds one epoch per ledger document and
//!   ignores changes to older ones (their writers carry them forward).

use std::collections::BTreeSet;

use automerge::{ReadDoc, ScalarValue, ROOT};

use crate::engine::Engine;
use crate::ids::{product_bucket, ActorKey};
use crate::layout::{ledger_carried_key, DocId, LedgerField};
use crate::views::read_entry;

/// Operations an epoch of a ledger document holds, at least, before its
/// owner starts the next one.
pub const EPOCH_OPS_MIN: u64 = 1024;
/// ... and more than this many per key it holds: a cut carries one
/// operation per cell, so history stays within twice the state it describes.
/// Automerge keeps ~175 bytes per operation in memory on the store workload
/// (one change of about one op per document and group commit). A store's 64
/// documents of 20,000 products (~936 keys each: two carried cells per
/// product and the live ones) then hold at most ~1,900 operations each. At 4
/// per key, a restart of 300,000 sales (probe, same machine, back to back)
/// held 91 MiB after loading the documents and 120 MiB when ready; at 2, 59
/// and 91 MiB — for one cut every ~1,200 sales of a document instead of
/// every ~4,000 (row 8 at 1.8M sales: epoch 7).
pub const EPOCH_OPS_PER_KEY: u64 = 2;

/// Most operations after which a ledger document's keys are counted again
/// to decide a cut (see `Engine::epoch_full`).
const EPOCH_KEYS_RECOUNT: u64 = 256;

impl Engine {
    /// The epoch of a location's ledger bucket this node holds (0 if none).
    pub fn ledger_epoch(&self, location: &str, bucket: u32) -> u32 {
        self.epochs
            .get(&(location.to_string(), bucket))
            .copied()
            .unwrap_or(0)
    }

    /// The ledger document (current epoch) holding `product` at `location`.
    pub fn ledger_doc_id(&self, product: u64, location: &str) -> DocId {
        let bucket = product_bucket(product, self.cfg.buckets);
        DocId::Ledger {
            location: location.to_string(),
            bucket,
            epoch: self.ledger_epoch(location, bucket),
        }
    }

    /// Sets the least history at which the owner cuts (the simulator cuts
    /// often to exercise it); see [`EPOCH_OPS_MIN`].
    pub fn set_epoch_ops_max(&mut self, ops: u64) {
        self.epoch_ops_max = ops.max(1);
    }

    /// Sets the operations per key past which an epoch is cut (see
    /// [`EPOCH_OPS_PER_KEY`]; at least 2: a cut itself writes one per cell).
    pub fn set_epoch_ops_per_key(&mut self, ops: u64) {
        self.epoch_ops_per_key = ops.max(2);
    }

    /// Whether an epoch's history is due for a cut. A document's keys are
    /// counted again only after a quarter of their number in operations, at
    /// most [`EPOCH_KEYS_RECOUNT`] (counting walks the document: it was 5 % of
    /// a sale's cost, checked at every flush); in between, each operation
    /// since the count is taken to have added a key. The operation count is
    /// the largest counter of the heads, so a cut may come a little late
    /// (up to a quarter of the keys), or early when several writers add keys
    /// concurrently; either only moves when the owner cuts.
    fn epoch_full(&mut self, id: &str) -> bool {
        let ops = self.ops_of(id);
        if ops <= self.epoch_ops_max {
            return false;
        }
        let keys = match self.epoch_keys.get(id) {
            Some(&(at, keys))
                if ops >= at && ops - at < (keys / 4).clamp(1, EPOCH_KEYS_RECOUNT) =>
            {
                keys + (ops - at)
            }
            _ => {
                let keys = self.docs.get(id).map_or(0, |s| s.doc.length(ROOT) as u64);
                self.epoch_keys.insert(id.to_string(), (ops, keys));
                keys
            }
        };
        ops > keys.saturating_mul(self.epoch_ops_per_key)
    }

    /// Whether `doc` is an epoch of a ledger document older than the one held
    /// (changes to it are ignored: their writers carry them forward).
    pub fn is_retired_epoch(&self, doc: &str) -> bool {
        match DocId::parse(doc, self.cfg.buckets) {
            Ok(DocId::Ledger {
                location,
                bucket,
                epoch,
            }) => epoch < self.ledger_epoch(&location, bucket),
            _ => false,
        }
    }

    /// Notes a ledger document loaded or created. Returns false if it is an
    /// older epoch than one already held (the caller must not keep it).
    pub(crate) fn note_epoch(&mut self, id: &DocId) -> bool {
        let DocId::Ledger {
            location,
            bucket,
            epoch,
        } = id
        else {
            return true;
        };
        let e = self.epochs.entry((location.clone(), *bucket)).or_insert(0);
        if *epoch < *e {
            return false;
        }
        *e = *epoch;
        true
    }

    /// Operations in a document's history (the largest operation counter of
    /// its heads), without walking it.
    fn ops_of(&self, id: &str) -> u64 {
        let Some(slot) = self.docs.get(id) else {
            return 0;
        };
        slot.doc
            .get_heads()
            .iter()
            .filter_map(|h| slot.doc.get_change_meta_by_hash(h))
            .map(|m| m.max_op)
            .max()
            .unwrap_or(0)
    }

    /// Called by `flush` for the documents written in the batch: the owner of
    /// a location cuts every ledger document of it whose epoch is full.
    pub(crate) fn cut_full_epochs(&mut self, dirty: &BTreeSet<String>, now_ms: u64) {
        let mut due = Vec::new();
        for id in dirty {
            let Some(DocId::Ledger {
                location,
                bucket,
                epoch,
            }) = self.docs.get(id).map(|s| s.id.clone())
            else {
                continue;
            };
            if self.views.owner_of(&location).map(|(t, _)| t) != Some(self.tag) {
                continue;
            }
            if epoch >= crate::layout::LEDGER_EPOCH_MAX {
                continue;
            }
            // A count's lines are booked against the view as of their
            // `counted_at`, read from the epoch's heads log, which a new
            // epoch starts empty: no cut while a count session is open there.
            let counting = self
                .views
                .count_sessions
                .values()
                .flat_map(|m| m.values())
                .any(|c| c.location == location && c.finished.is_none());
            if counting {
                continue;
            }
            if self.epoch_full(id) {
                due.push((location, bucket, epoch));
            }
        }
        for (location, bucket, epoch) in due {
            let new = DocId::Ledger {
                location: location.clone(),
                bucket,
                epoch: epoch + 1,
            };
            tracing::info!(doc = %new.encode(), "starting a new ledger epoch (history cut)");
            let _ = self.slot(&new);
            self.note_epoch(&new);
            self.switch_epoch(&location, bucket, epoch, epoch + 1, now_ms);
            self.stats.epochs_started += 1;
        }
    }

    /// Called when changes were applied to a ledger document: if it is an
    /// epoch newer than the one held, this node moves to it (before any view
    /// is read from it).
    pub(crate) fn maybe_switch_epoch(&mut self, doc: &str, now_ms: u64) {
        let Some(DocId::Ledger {
            location,
            bucket,
            epoch,
        }) = self.docs.get(doc).map(|s| s.id.clone())
        else {
            return;
        };
        let held = self.ledger_epoch(&location, bucket);
        if epoch <= held {
            return;
        }
        tracing::info!(doc, from = held, "moving to a newer ledger epoch");
        self.epochs.insert((location.clone(), bucket), epoch);
        self.switch_epoch(&location, bucket, held, epoch, now_ms);
        self.stats.epochs_joined += 1;
    }

    /// Changes to a ledger epoch this node moved on from: their writer may
    /// never carry them forward itself (a store that pushed its offline
    /// sales and then died), so the cells they raise above this node's view
    /// are carried into the epoch held, like a switch does. Only a writer's
    /// own live cells (or carried ones) count; nothing else of the change is
    /// applied, and a malformed or oversized chunk carries nothing.
    pub(crate) fn carry_late_changes(&mut self, doc: &str, chunks: &[&[u8]], now_ms: u64) {
        let Ok(DocId::Ledger {
            location, bucket, ..
        }) = DocId::parse(doc, self.cfg.buckets)
        else {
            return;
        };
        let mut budget = crate::inflate::INFLATED_BYTES_MAX;
        let mut best: std::collections::BTreeMap<(u64, ActorKey, String), (LedgerField, u64)> =
            std::collections::BTreeMap::new();
        for c in chunks {
            if crate::inflate::check_inflation(c, &mut budget).is_err() {
                return;
            }
            let Ok(changes) = crate::validate::changes_in_chunk(c) else {
                return;
            };
            for ch in changes {
                let Some(author) = ActorKey::from_bytes(ch.actor_id().to_bytes()) else {
                    continue;
                };
                // Only a change its author certified raises anything.
                if !self.late_change_certified(&ch) {
                    continue;
                }
                for op in ch.decode().operations {
                    let (automerge::legacy::ObjectId::Root, automerge::legacy::Key::Map(k)) =
                        (&op.obj, &op.key)
                    else {
                        continue;
                    };
                    let automerge::legacy::OpType::Put(v) = &op.action else {
                        continue;
                    };
                    let Ok((p, actor, field, carried)) = crate::layout::parse_ledger_any(k) else {
                        continue;
                    };
                    if (!carried && actor != author)
                        || product_bucket(p, self.cfg.buckets) != bucket
                    {
                        continue;
                    }
                    let Some(n) =
                        crate::views::scalar_u64(v).filter(|n| *n <= crate::ids::CELL_MAX)
                    else {
                        continue;
                    };
                    let e = best
                        .entry((p, actor, crate::layout::ledger_key(p, actor, field)))
                        .or_insert((field, 0));
                    e.1 = e.1.max(n);
                }
            }
        }
        let current = DocId::Ledger {
            location: location.clone(),
            bucket,
            epoch: self.ledger_epoch(&location, bucket),
        };
        let mut keys = BTreeSet::new();
        let mut own_above = 0;
        for ((p, actor, _), (field, n)) in best {
            let have = self
                .views
                .entry(p, &location)
                .map(|e| e.actor(actor))
                .unwrap_or_default();
            let held = match field {
                LedgerField::Received => have.received,
                LedgerField::Removed => have.removed,
                LedgerField::Granted(t) => have.granted.get(&t).copied().unwrap_or(0),
                LedgerField::Held(t) => have.held.get(&t).copied().unwrap_or(0),
                LedgerField::Released => have.released,
            };
            if n > held {
                own_above += usize::from(actor.tag() == self.tag);
                let k = ledger_carried_key(p, actor, field);
                self.put(current.clone(), k.clone(), ScalarValue::Uint(n));
                keys.insert(k);
            }
        }
        if keys.is_empty() {
            return;
        }
        let id = current.encode();
        tracing::info!(doc, into = %id, cells = keys.len(), "carried cells of late changes to an older ledger epoch");
        self.commit_pending_writes(&id, now_ms);
        let before = self.rights_of_keys(&id, &keys);
        self.recompute_keys(&id, &keys);
        self.stats.late_cells_carried += keys.len() as u64;
        if own_above > 0 {
            self.record_fork(&id, own_above, &before, now_ms);
        }
    }

    /// Carried cells among `keys` of ledger document `doc` that belong to
    /// one of this node's own incarnations and hold more than this node's
    /// view (evidence of a fork: nobody else writes those cells).
    pub(crate) fn carried_own_cells_above_view(&self, doc: &str, keys: &BTreeSet<String>) -> usize {
        let Some(slot) = self.docs.get(doc) else {
            return 0;
        };
        let DocId::Ledger { location, .. } = &slot.id else {
            return 0;
        };
        let mut products = BTreeSet::new();
        for k in keys {
            if let Ok((p, actor, _, true)) = crate::layout::parse_ledger_any(k) {
                if actor.tag() == self.tag {
                    products.insert(p);
                }
            }
        }
        let mut n = 0;
        for p in products {
            let fresh = read_entry(&*slot.doc, p, None);
            let view = self.views.entry(p, location).cloned().unwrap_or_default();
            for (actor, c) in &fresh.cells {
                if actor.tag() != self.tag {
                    continue;
                }
                let v = view.actor(*actor);
                let above = c.received > v.received
                    || c.removed > v.removed
                    || c.granted
                        .iter()
                        .any(|(t, q)| *q > v.granted.get(t).copied().unwrap_or(0))
                    || c.held
                        .iter()
                        .any(|(t, q)| *q > v.held.get(t).copied().unwrap_or(0))
                    || c.released > v.released;
                n += usize::from(above);
            }
        }
        n
    }

    /// Carries every cell of this node's view of (`location`, `bucket`) that
    /// epoch `to` lacks into it, drops epoch `from`, and reads the views of
    /// the bucket from epoch `to`.
    fn switch_epoch(&mut self, location: &str, bucket: u32, from: u32, to: u32, now_ms: u64) {
        let new = DocId::Ledger {
            location: location.to_string(),
            bucket,
            epoch: to,
        };
        let new_id = new.encode();
        let products: Vec<u64> = self
            .views
            .stock
            .iter()
            .filter(|(p, m)| {
                product_bucket(**p, self.cfg.buckets) == bucket && m.contains_key(location)
            })
            .map(|(p, _)| *p)
            .collect();
        let mut carried = Vec::new();
        if let Some(slot) = self.docs.get(&new_id) {
            for p in &products {
                let Some(view) = self.views.entry(*p, location) else {
                    continue;
                };
                let have = read_entry(&*slot.doc, *p, None);
                for (actor, c) in &view.cells {
                    let h = have.actor(*actor);
                    if c.received > h.received {
                        carried.push((
                            ledger_carried_key(*p, *actor, LedgerField::Received),
                            c.received,
                        ));
                    }
                    if c.removed > h.removed {
                        carried.push((
                            ledger_carried_key(*p, *actor, LedgerField::Removed),
                            c.removed,
                        ));
                    }
                    for (t, q) in &c.granted {
                        if *q > h.granted.get(t).copied().unwrap_or(0) {
                            carried.push((
                                ledger_carried_key(*p, *actor, LedgerField::Granted(*t)),
                                *q,
                            ));
                        }
                    }
                    for (t, q) in &c.held {
                        if *q > h.held.get(t).copied().unwrap_or(0) {
                            carried
                                .push((ledger_carried_key(*p, *actor, LedgerField::Held(*t)), *q));
                        }
                    }
                    if c.released > h.released {
                        carried.push((
                            ledger_carried_key(*p, *actor, LedgerField::Released),
                            c.released,
                        ));
                    }
                }
            }
        }
        // The views iterate in hash order: the carried cells are written in
        // key order, so one history gives one change (the simulator replays
        // a seed exactly).
        carried.sort_unstable();
        for (k, v) in carried {
            self.put(new.clone(), k, ScalarValue::Uint(v));
        }
        self.commit_pending_writes(&new_id, now_ms);
        if from != to {
            let old = DocId::Ledger {
                location: location.to_string(),
                bucket,
                epoch: from,
            };
            self.retire_doc(&old.encode());
        }
        // The views of the bucket now come from the new epoch alone.
        let keys: BTreeSet<String> = self
            .docs
            .get(&new_id)
            .map(|s| s.doc.keys(ROOT).collect())
            .unwrap_or_default();
        self.recompute_keys(&new_id, &keys);
    }

    /// Drops a document this node moved on from (an older ledger epoch):
    /// memory, sessions and, with the next batch, disk.
    pub(crate) fn retire_doc(&mut self, id: &str) {
        if let Some(slot) = self.docs.remove(id) {
            self.digest.toggle(id, slot.digest_part);
        }
        self.dirty_docs.remove(id);
        self.changed_docs.remove(id);
        self.epoch_keys.remove(id);
        self.push_sources.remove(id);
        self.pending_sync_states.retain(|(_, d, _)| d != id);
        self.forget_doc_sessions(id);
        self.forget_doc_certs(id, true);
        self.pending_retired.push(id.to_string());
    }
}
