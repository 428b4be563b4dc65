//! Opening an engine from storage: loading each stored document into its
//! slot (`Engine::load_doc`) and finishing the views once all are in
//! (`Engine::finish_open`).

use std::collections::VecDeque;

use automerge::{ChangeHash, ReadDoc, ScalarValue, ROOT};

use super::{load_parts_one_pass, parse_heads, Engine, Slot, HEADS_LOG_MAX};
use crate::ids::NodeInfo;
use crate::layout::{self, DocId};

impl Engine {
    /// Loads one stored document (snapshot and chunks in order) at start-up.
    pub fn load_doc(
        &mut self,
        id: &str,
        parts: &[Vec<u8>],
        heads_log: Vec<(u64, Vec<String>)>,
    ) -> Result<(), String> {
        let doc_id = DocId::parse(id, self.cfg.buckets)?;
        if let DocId::Ledger {
            location,
            bucket,
            epoch,
        } = &doc_id
        {
            // One epoch per ledger document is held: an older one left on
            // disk is deleted, a newer one replaces what was loaded.
            let held = self.ledger_epoch(location, *bucket);
            if *epoch < held {
                self.pending_retired.push(id.to_string());
                return Ok(());
            }
            if *epoch > held && self.epochs.contains_key(&(location.clone(), *bucket)) {
                let old = DocId::Ledger {
                    location: location.clone(),
                    bucket: *bucket,
                    epoch: held,
                };
                self.retire_doc(&old.encode());
            }
            self.note_epoch(&doc_id);
        }
        let snapshot_bytes = parts.first().map_or(0, |p| p.len() as u64);
        let chunk_bytes: u64 = parts.iter().skip(1).map(|p| p.len() as u64).sum();
        let (doc, one_pass) =
            load_parts_one_pass(parts).map_err(|e| format!("document {id}: {e}"))?;
        let doc = doc.with_actor(self.actor.automerge());
        let heads = doc.get_heads();
        // A records part may be closed (cooled after `finish_open`): keep the
        // bytes it was loaded from, so cooling it costs no `save()` — only if
        // they load as they are (else cooling saves the document anew).
        let doc = if matches!(doc_id, DocId::Records { .. }) && one_pass {
            crate::lazydoc::LazyDoc::with_saved(doc, parts.concat())
        } else {
            crate::lazydoc::LazyDoc::new(doc)
        };
        let mut log: VecDeque<(u64, Vec<ChangeHash>)> = heads_log
            .into_iter()
            .map(|(t, h)| (t, parse_heads(&h)))
            .collect();
        while log.len() > HEADS_LOG_MAX {
            log.pop_front();
        }
        if let DocId::Records { tag, month, part } = &doc_id {
            if *tag == self.tag {
                let records = doc.length(ROOT);
                self.note_own_records_part(*month, *part, records);
            }
        }
        let part = crate::sync::doc_digest(id, &heads);
        self.digest.toggle(id, part);
        self.docs.insert(
            id.to_string(),
            Slot {
                id: doc_id,
                doc,
                persisted: heads,
                snapshot_bytes,
                chunk_bytes,
                next_chunk: parts.len() as u64,
                heads_log: log,
                puts: Vec::new(),
                dels: Vec::new(),
                digest_part: part,
                seqs: Default::default(),
            },
        );
        if let Some(slot) = self.docs.get_mut(id) {
            if matches!(slot.id, DocId::Records { .. }) {
                slot.doc.cool();
            }
        }
        Ok(())
    }

    /// After all documents are loaded: rebuilds every view from the documents and
    /// publishes this node's directory entry.
    pub fn finish_open(&mut self) {
        let ids: Vec<String> = self.docs.keys().cloned().collect();
        let latest = self.latest_parts();
        // Every stored sale is noted once, unchecked, and sorted in at the end.
        self.views.sales.begin_bulk();
        for id in ids {
            if let Some(bytes) = self.index_replay.remove(&id) {
                // A closed part loaded cold with its index: its records
                // are noted from the index, the part itself stays unread.
                let bytes = match (bytes.is_empty(), &self.part_archive) {
                    (true, Some(a)) => a.part_index(&id).ok().flatten(),
                    _ => Some(bytes),
                };
                if let Some(bytes) = bytes.filter(|b| !b.is_empty()) {
                    if self.part_archive.is_some() {
                        self.stats.part_indexes_read_back += 1;
                    }
                    if self.replay_part_index(&id, &bytes) {
                        continue;
                    }
                }
                tracing::warn!(doc = %id, "a records part's index could not be read again; reading the part");
            }
            self.recompute_doc_all(&id);
            // Records parts were loaded cold (see `load_doc`): each is read
            // here once, one at a time, and cooled again at no cost, so a
            // restart never holds every part at once.
            // A closed part read here for the first time since it closed
            // gets its index, so the next start reads it no more.
            self.index_closed_part(&id, &latest);
            if let Some(slot) = self.docs.get_mut(&id) {
                if matches!(slot.id, DocId::Records { .. }) && slot.doc.has_saved() {
                    slot.doc.cool();
                }
            }
        }
        self.settle_bulk_sales();
        self.settle_stored_shared();
        let info = NodeInfo {
            name: self.cfg.name.clone(),
            location: Some(self.cfg.location.clone()),
            role: self.cfg.role.clone(),
            policy: self.cfg.policy.as_str().to_string(),
            timezone: self.cfg.timezone.clone(),
        };
        if self.views.nodes.get(&self.tag) != Some(&info) {
            let json = serde_json::to_string(&info).unwrap_or_default();
            self.put(
                DocId::Mesh,
                layout::mesh_info_key(self.tag),
                ScalarValue::Str(json.into()),
            );
            self.views.nodes.insert(self.tag, info);
        }
        // Views are built: closed parts go cold (their loaded bytes are kept).
        self.cool_closed_parts(0);
        self.opening = false;
    }
}
