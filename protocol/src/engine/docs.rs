//! Document slots and pending writes: getting or creating a slot, writing
//! cells, the undo of a failed operation (`Engine::atomically`), which
//! ledger and records document a write goes to, and idempotency records
//! pending until the next flush.

use std::collections::{HashMap, VecDeque};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{Automerge, ReadDoc, ScalarValue, ROOT};

use super::{Engine, OpUndo, Slot};
use crate::ids::CELL_MAX;
use crate::layout::{ledger_key, month_of, DocId, LedgerField};
use crate::ops::{IdemRecord, OpError, OpReply};

impl Engine {
    pub(crate) fn slot(&mut self, id: &DocId) -> &mut Slot {
        let key = id.encode();
        let actor = self.actor.automerge();
        self.docs.entry(key).or_insert_with(|| Slot {
            id: id.clone(),
            doc: crate::lazydoc::LazyDoc::new(Automerge::new().with_actor(actor)),
            persisted: Vec::new(),
            snapshot_bytes: 0,
            chunk_bytes: 0,
            next_chunk: 0,
            heads_log: VecDeque::new(),
            puts: Vec::new(),
            dels: Vec::new(),
            digest_part: 0,
            seqs: Default::default(),
        })
    }

    /// Writes this batch's pending puts and deletes of one document into it as
    /// a local change. Called before a peer's changes are merged into the
    /// document: views are then recomputed from the document, and without this
    /// they would lose the batch's own unflushed writes (and the next `bump`
    /// would compute a cumulative cell from that stale base — a lost update).
    /// Nothing is persisted or sent here: `flush` saves everything after the
    /// persisted heads, and frames leave only after the batch committed.
    pub(crate) fn commit_pending_writes(&mut self, id: &str, now_ms: u64) {
        let Some(slot) = self.docs.get_mut(id) else {
            return;
        };
        if slot.puts.is_empty() && slot.dels.is_empty() {
            return;
        }
        let puts = std::mem::take(&mut slot.puts);
        let dels = std::mem::take(&mut slot.dels);
        let is_ledger = matches!(slot.id, DocId::Ledger { .. });
        let mut tx = slot.doc.transaction();
        for (k, v) in puts {
            // Invariant (DESIGN §5.6, owned cells are cumulative): a ledger
            // cell this node writes never goes down. A lower value would be
            // refused by every peer (`validate::check_op`), blocking the
            // replication of the whole document; the simulator's
            // "owned-cells" checker sees it only after the commit.
            if cfg!(debug_assertions) && is_ledger {
                debug_assert!(
                    own_cell_not_lowered(&tx, self.actor, &k, &v),
                    "invariant owned-cells: {id} cell {k:?} would go down to {v:?}"
                );
            }
            if let Err(e) = tx.put(ROOT, k, v) {
                tracing::error!(doc = %id, error = %e, "document put failed");
            }
        }
        for k in dels {
            if tx.get(ROOT, k.as_str()).ok().flatten().is_some() {
                let _ = tx.delete(ROOT, k);
            }
        }
        let (hash, _) = tx.commit_with(CommitOptions::default().with_time((now_ms / 1000) as i64));
        // Invariant (no change of ours blocks its own replication): the
        // change this node just wrote passes the per-op validation a peer
        // applies on receipt. Operations are checked before they commit
        // (`check_op_writes`); this also covers engine-internal writes
        // (deficits, carried cells, scrubbing). Skipped under the planted
        // faults that break it on purpose for the simulator's checkers.
        if cfg!(debug_assertions)
            && !self.faults.unchecked_large_records
            && !self.faults.grant_in_other_bucket
        {
            if let Some(change) = hash.and_then(|h| slot.doc.get_change_by_hash(&h)) {
                let checked = crate::validate::check_changes_as_peer(
                    &slot.id,
                    std::slice::from_ref(&change),
                    self.cfg.buckets,
                );
                debug_assert!(
                    checked.is_ok(),
                    "invariant peer-validation: {id} got a change of ours that peers refuse: {checked:?}"
                );
            }
        }
        self.note_own_change(id, hash);
        self.dirty_docs.insert(id.to_string());
        self.push_sources.entry(id.to_string()).or_default().local = true;
    }

    pub(crate) fn put(&mut self, doc: DocId, key: String, value: ScalarValue) {
        let id = doc.encode();
        self.dirty_docs.insert(id.clone());
        let slot = self.slot(&doc);
        let mark = (slot.puts.len(), slot.dels.len());
        slot.puts.push((key, value));
        if let Some(u) = &mut self.undo {
            u.marks.entry(id).or_insert(mark);
        }
    }

    /// Checks every write of the running operation with the validation a
    /// peer applies to our changes (`validate::check_op`): a change a peer
    /// refuses would block the replication of the whole document (every
    /// later record of this node, for a records document), so the operation
    /// is refused instead, before anything of it is committed.
    pub(crate) fn check_op_writes(&self) -> Result<(), OpError> {
        let Some(u) = &self.undo else { return Ok(()) };
        if self.faults.unchecked_large_records {
            return Ok(());
        }
        for (id, (puts_at, _)) in &u.marks {
            let Some(slot) = self.docs.get(id) else {
                continue;
            };
            // Keys repeat across documents (a product's cell at two locations).
            let mut last = HashMap::new();
            for (key, value) in slot.puts.iter().skip(*puts_at) {
                crate::validate::check_op(
                    &slot.id,
                    &slot.doc,
                    self.actor,
                    key,
                    Some(value),
                    self.cfg.buckets,
                    &mut last,
                )
                .map_err(|e| {
                    tracing::error!(doc = %id, error = %e, "operation refused: it would write a change peers refuse");
                    OpError::BadRequest(format!(
                        "the operation would write a change that peers refuse ({e}); nothing was applied"
                    ))
                })?;
            }
        }
        Ok(())
    }

    /// Undoes everything a refused operation wrote (see `OpUndo`).
    /// Runs an engine-internal operation all or nothing, like `execute` runs
    /// a client's: checked as a peer would, rolled back on any error.
    pub(crate) fn atomically(
        &mut self,
        f: impl FnOnce(&mut Engine) -> Result<(), OpError>,
    ) -> Result<(), OpError> {
        if self.undo.is_some() {
            return Err(OpError::BadRequest("nested engine operation".into()));
        }
        self.undo = Some(OpUndo::default());
        let result = f(self).and_then(|()| self.check_op_writes());
        let undo = self.undo.take().unwrap_or_default();
        match &result {
            Ok(()) => {
                for (doc, key, json) in &undo.records {
                    self.note_record(doc, key, json);
                }
            }
            Err(_) => self.roll_back(undo),
        }
        result
    }

    pub(super) fn roll_back(&mut self, u: OpUndo) {
        for (id, (puts, dels)) in u.marks {
            if let Some(slot) = self.docs.get_mut(&id) {
                debug_assert!(slot.puts.len() >= puts && slot.dels.len() >= dels);
                slot.puts.truncate(puts);
                slot.dels.truncate(dels);
            }
        }
        let actor = self.actor;
        for ((p, l), old) in u.cells {
            let Some(m) = self.views.stock.get_mut(&p) else {
                continue;
            };
            if let Some(e) = m.get_mut(&l) {
                match old {
                    Some(c) => {
                        e.cells.insert(actor, c);
                    }
                    None => {
                        e.cells.remove(&actor);
                    }
                }
                if e.cells.is_empty() {
                    m.remove(&l);
                }
            }
            if m.is_empty() {
                self.views.stock.remove(&p);
            }
            self.touch_row(p, &l);
        }
        for ((c, earned), old) in u.loyalty {
            if let Some(view) = self.views.customers.get_mut(&c) {
                let cells = if earned {
                    &mut view.earned
                } else {
                    &mut view.spent
                };
                match old {
                    Some(v) => {
                        cells.insert(actor, v);
                    }
                    None => {
                        cells.remove(&actor);
                    }
                }
            }
        }
        for (p, old) in u.products {
            match old {
                Some(v) => self.views.set_product(p, v),
                None => {
                    self.views
                        .set_product(p, crate::views::ProductView::default());
                    self.views.products.remove(&p);
                }
            }
        }
    }

    pub(crate) fn ledger_doc(&self, product: u64, location: &str) -> DocId {
        self.ledger_doc_id(product, location)
    }

    /// The records document the next record of `now_ms` goes to: this
    /// month's current part, or the next one once it is full.
    pub(crate) fn records_doc(&mut self, now_ms: u64) -> DocId {
        let month = month_of(now_ms);
        let (part, count) = self.records_parts.entry(month).or_insert((0, 0));
        if *count >= self.records_per_part {
            *part += 1;
            *count = 0;
        }
        *count += 1;
        DocId::Records {
            tag: self.tag,
            month,
            part: *part,
        }
    }

    /// Notes a stored records document of this node (at start-up), so that new
    /// records continue in the month's last part.
    pub(crate) fn note_own_records_part(&mut self, month: u32, part: u32, records: usize) {
        let e = self.records_parts.entry(month).or_insert((0, 0));
        if part > e.0 || (part == e.0 && records > e.1) {
            *e = (part, records);
        }
    }

    /// Raises one of this actor's cumulative cells by `add`, in the view (the
    /// overlay the next checks see) and as a pending document write.
    pub(crate) fn bump(
        &mut self,
        product: u64,
        location: &str,
        field: LedgerField,
        add: u64,
    ) -> Result<(), OpError> {
        let actor = self.actor;
        if let Some(u) = &mut self.undo {
            if let std::collections::btree_map::Entry::Vacant(slot) =
                u.cells.entry((product, location.to_string()))
            {
                let old = self
                    .views
                    .entry(product, location)
                    .and_then(|e| e.cells.get(&actor))
                    .cloned();
                slot.insert(old);
            }
        }
        let entry = self
            .views
            .stock
            .entry(product)
            .or_default()
            .entry(location.to_string())
            .or_default();
        let cells = entry.cells.entry(actor).or_default();
        let cell = match field {
            LedgerField::Received => &mut cells.received,
            LedgerField::Removed => &mut cells.removed,
            LedgerField::Granted(to) => cells.granted.entry(to).or_default(),
            LedgerField::Held(to) => cells.held.entry(to).or_default(),
            LedgerField::Released => &mut cells.released,
        };
        let new = cell
            .checked_add(add)
            .filter(|v| *v <= CELL_MAX)
            .ok_or_else(|| OpError::BadRequest("quantity would overflow the ledger cell".into()))?;
        *cell = new;
        let mut doc = self.ledger_doc(product, location);
        if self.faults.grant_in_other_bucket && matches!(field, LedgerField::Granted(_)) {
            if let DocId::Ledger { bucket, .. } = &mut doc {
                *bucket = (*bucket + 1) % self.cfg.buckets;
            }
        }
        self.put(
            doc,
            ledger_key(product, actor, field),
            ScalarValue::Uint(new),
        );
        self.touch_row(product, location);
        Ok(())
    }

    pub(crate) fn pending_idem_contains(&self, key: &str) -> bool {
        self.pending_idem.contains_key(key)
    }

    /// Marks an engine-internal write as done for this batch (its record is
    /// the durable proof; replays across batches are caught by the record key).
    pub(crate) fn note_idem(&mut self, key: String) {
        self.pending_idem.insert(
            key,
            IdemRecord {
                body_hash: [0; 32],
                reply: OpReply {
                    kind: crate::ops::ReplyKind::Created,
                    body: String::new(),
                },
            },
        );
    }
}

/// Whether writing `value` under `key` leaves an own live ledger cell at
/// least as high as the document holds it (other keys: always true).
fn own_cell_not_lowered(
    doc: &impl ReadDoc,
    actor: crate::ids::ActorKey,
    key: &str,
    value: &ScalarValue,
) -> bool {
    let Ok((_, writer, _)) = crate::layout::parse_ledger_key(key) else {
        return true;
    };
    if writer != actor {
        return true;
    }
    let old = match doc.get(ROOT, key) {
        Ok(Some((automerge::Value::Scalar(v), _))) => match v.as_ref() {
            ScalarValue::Uint(u) => *u,
            _ => return true,
        },
        _ => return true,
    };
    matches!(value, ScalarValue::Uint(new) if *new >= old)
}
