//! Group commit: `Engine::flush` assembles the `Batch` to persist,
//! `Engine::committed` releases what waited for it and
//! `Engine::take_outgoing` hands over the frames for peers.

use automerge::{ReadDoc, ROOT};

use super::{
    hex_heads, Batch, DocWrite, Engine, CHUNKS_PER_SNAPSHOT_MAX, HEADS_LOG_MAX,
    SNAPSHOT_CHUNK_FACTOR, SNAPSHOT_FLOOR_BYTES,
};
use crate::ids::NodeId;
use crate::layout::{self, CustomerKey, DocId};

/// What [`Engine::commit`] releases once its batch is durable.
#[derive(Debug)]
#[non_exhaustive]
pub struct Released {
    /// The batch as it was persisted.
    pub batch: Batch,
    /// Frames for peers (length-prefixed, as the transport writes them), in order.
    pub frames: Vec<(NodeId, Vec<u8>)>,
}

/// Documents up to which a debug build compares every document's heads with
/// its persisted heads after each flush (a scan of all of them: bounded so
/// that tests with many documents stay fast).
const DEBUG_HEADS_SCAN_DOCS_MAX: usize = 4096;

impl Engine {
    /// Commits the pending writes of every document as one Automerge change per
    /// document and returns everything the shell must persist atomically.
    pub fn flush(&mut self, now_ms: u64) -> Batch {
        let mut batch = Batch::default();
        // Sales of closed parts whose stored entries are durable by now
        // leave memory (`coldsales`).
        self.drop_stored_sales();
        // Erased customers whose profile came back from an offline peer are scrubbed again.
        let customers: Vec<String> = std::mem::take(&mut self.pending_customers)
            .into_iter()
            .collect();
        for c in &customers {
            let doc_id = self.customer_doc(c);
            if let Some(slot) = self.docs.get(&doc_id.encode()) {
                let erased = slot
                    .doc
                    .get(
                        ROOT,
                        CustomerKey::Erased {
                            customer: c.clone(),
                        }
                        .encode(),
                    )
                    .ok()
                    .flatten()
                    .is_some();
                if erased {
                    let present: Vec<String> = layout::PROFILE_FIELDS
                        .iter()
                        .map(|f| {
                            CustomerKey::Profile {
                                customer: c.clone(),
                                field: (*f).into(),
                            }
                            .encode()
                        })
                        .filter(|k| slot.doc.get(ROOT, k.as_str()).ok().flatten().is_some())
                        .collect();
                    self.dirty_docs.insert(doc_id.encode());
                    let s = self.slot(&doc_id);
                    for k in present {
                        if !s.dels.contains(&k) {
                            s.dels.push(k);
                        }
                    }
                }
            }
        }
        let dirty = self.dirty_docs.clone();
        self.cut_full_epochs(&dirty, now_ms);
        let ids: Vec<String> = std::mem::take(&mut self.dirty_docs).into_iter().collect();
        for id in ids {
            // One Automerge change per document for the whole batch.
            self.commit_pending_writes(&id, now_ms);
            self.dirty_docs.remove(&id);
            let Some(slot) = self.docs.get_mut(&id) else {
                continue;
            };
            let heads = slot.doc.get_heads();
            if heads == slot.persisted {
                continue;
            }
            self.indexed_parts.remove(&id);
            let chunk = slot.doc.save_after(&slot.persisted);
            // The push after the commit carries the same bytes; nobody to push
            // to (or too large for one frame: offered through a session) → none.
            let push = if !self.sessions.is_empty() && chunk.len() <= crate::wire::CHUNK_BYTES_MAX {
                chunk.clone()
            } else {
                Vec::new()
            };
            let fold_at = slot
                .snapshot_bytes
                .saturating_mul(SNAPSHOT_CHUNK_FACTOR)
                .max(SNAPSHOT_FLOOR_BYTES);
            if slot.chunk_bytes + chunk.len() as u64 > fold_at
                || slot.next_chunk >= CHUNKS_PER_SNAPSHOT_MAX
            {
                let bytes = slot.doc.save();
                slot.snapshot_bytes = bytes.len() as u64;
                slot.chunk_bytes = 0;
                slot.next_chunk = 1;
                batch.docs.push(DocWrite::Snapshot {
                    doc: id.clone(),
                    bytes,
                });
            } else {
                slot.chunk_bytes += chunk.len() as u64;
                let seq = slot.next_chunk.max(1);
                slot.next_chunk = seq + 1;
                batch.docs.push(DocWrite::Chunk {
                    doc: id.clone(),
                    seq,
                    bytes: chunk,
                });
            }
            if matches!(slot.id, DocId::Ledger { .. }) {
                slot.heads_log.push_back((now_ms, heads.clone()));
                while slot.heads_log.len() > HEADS_LOG_MAX {
                    slot.heads_log.pop_front();
                }
                batch
                    .heads_log
                    .push((id.clone(), now_ms, hex_heads(&heads)));
            }
            batch.heads.push((id.clone(), hex_heads(&heads)));
            slot.persisted = heads.clone();
            let part = crate::sync::doc_digest(&id, &heads);
            let old = std::mem::replace(&mut slot.digest_part, part);
            self.digest.toggle(&id, old);
            self.digest.toggle(&id, part);
            self.changed_docs.insert(id, push);
            self.awaiting_commit = true;
        }
        // Invariant (DESIGN §5.2, nothing is lost between memory and disk):
        // after a flush every document's persisted heads equal its heads — a
        // change merged or written without marking its document dirty would
        // stay out of the batch and be lost at the next restart. A scan of
        // every document, so only up to `DEBUG_HEADS_SCAN_DOCS_MAX` of them.
        if cfg!(debug_assertions) && self.docs.len() <= DEBUG_HEADS_SCAN_DOCS_MAX {
            for (id, slot) in &self.docs {
                debug_assert!(
                    slot.doc.heads() == slot.persisted,
                    "invariant persisted-heads: {id} has changes no batch holds after a flush"
                );
            }
        }
        self.flush_part_indexes(&mut batch);
        self.flush_stored_sales(&mut batch);
        for (p, l) in std::mem::take(&mut self.pending_rows) {
            // Invariant (DESIGN §5.5, views are true): for every row this
            // batch touched, the rights of all holders sum to what is on
            // hand (grants move rights between holders, never create them).
            debug_assert!(
                self.views.entry(p, &l).is_none_or(|e| {
                    let sum: i128 = e.rights_by_node().values().map(|v| i128::from(*v)).sum();
                    sum == i128::from(e.on_hand())
                }),
                "invariant rights-sum: Σ rights ≠ on hand for product {p} at {l}"
            );
            let row = self.row(p, &l);
            batch.rows.push(((p, l), row));
        }
        batch.idem = self.pending_idem.drain().collect();
        batch.retired = std::mem::take(&mut self.pending_retired);
        batch.sync_states = std::mem::take(&mut self.pending_sync_states);
        batch.keys = std::mem::take(&mut self.pending_keys).into_iter().collect();
        self.keys_to_push.extend(batch.keys.iter().cloned());
        self.certify_batch(&mut batch);
        batch
    }

    /// The whole commit sequence, in the only order that is safe: flush,
    /// hand the batch to `persist` (which may still number or sort it, and
    /// returns `Ok` only once it is durable), then release the pushes to
    /// peers and return them with the batch. On `Err` nothing is released:
    /// the engine's memory is ahead of the disk, and the caller reopens the
    /// engine from its store (as `step::NodeLoop::step` does).
    pub fn commit<E>(
        &mut self,
        now_ms: u64,
        persist: impl FnOnce(&mut Batch) -> Result<(), E>,
    ) -> Result<Released, E> {
        let mut batch = self.flush(now_ms);
        persist(&mut batch)?;
        // Invariant (DESIGN §5.2): the heads the batch persisted for each
        // document are the document's heads in memory (what peers will be
        // told this node has is what is on disk).
        if cfg!(debug_assertions) {
            for (id, heads) in &batch.heads {
                let held = self.docs.get(id).map(|s| hex_heads(&s.doc.heads()));
                debug_assert!(
                    held.as_ref() == Some(heads),
                    "invariant persisted-heads: committed heads of {id} differ from the document's"
                );
            }
        }
        self.committed(now_ms);
        let frames = self.take_outgoing();
        Ok(Released { batch, frames })
    }

    /// The batch returned by the last `flush` is durable: release the pushes
    /// to peers. Only through `commit` (or the in-memory test mesh).
    pub(crate) fn committed(&mut self, now_ms: u64) {
        self.awaiting_commit = false;
        let changed = std::mem::take(&mut self.changed_docs);
        self.push_docs(changed, now_ms);
        self.push_sources.clear();
    }

    /// The frames queued for peers. Only after `committed`: a frame may carry
    /// the changes of the last flush, which must be durable before a peer
    /// can hold them.
    pub(crate) fn take_outgoing(&mut self) -> Vec<(NodeId, Vec<u8>)> {
        // Invariant (DESIGN §5.2, nothing leaves the node before its commit).
        debug_assert!(
            !self.awaiting_commit,
            "invariant push-after-commit: frames taken between a flush and its commit"
        );
        std::mem::take(&mut self.outbox)
    }

    pub(crate) fn queue_sync_state(&mut self, peer: NodeId, doc: String, state: Vec<u8>) {
        self.pending_sync_states.push((peer, doc, state));
    }
}
