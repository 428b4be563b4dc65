//! Receiving from peers: `Engine::receive` decodes a frame, validates and
//! applies sync messages and pushes, and rejects bad input with a reason.

use std::collections::{BTreeMap, BTreeSet};

use automerge::sync::{self as amsync, SyncDoc};
use automerge::ChangeHash;

use crate::engine::Engine;
use crate::ids::{NodeId, NodeTag, NODE_TAG_BYTES};
use crate::layout::DocId;
use crate::sync::{
    group_of, refusal_reason, Msg, DOCS_PER_FRAME_MAX, GROUPS, KEYS_PER_FRAME_MAX,
    REASSEMBLY_BYTES_MAX, REJECT_AUTOMERGE, REJECT_DOC_LIMIT, REJECT_ERASURE_LIMIT, REJECT_INFLATE,
    REJECT_KEY_LIMIT, REJECT_MALFORMED, REJECT_MISSING_DEPS, SEEN_MAX, SESSION_RESTARTS_MAX,
};
use crate::validate::{
    changes_in_chunk, chunk_type, validate_changes, Refusal, Verdict, CHUNK_DOCUMENT,
};

/// `receive_sync_message` for a message whose changes were already decoded
/// (and validated): applies `changes` directly, then lets the session process
/// the rest of the message with its change list emptied. The session state
/// ends as Automerge's own path leaves it: shared heads advanced over the
/// applied changes, and `last_sent_heads` untouched (Automerge updates it only
/// for messages without changes, which this one was not).
fn receive_decoded(
    doc: &mut automerge::Automerge,
    state: &mut amsync::State,
    mut msg: amsync::Message,
    changes: Vec<automerge::Change>,
) -> Result<(), automerge::AutomergeError> {
    if msg.changes.is_empty() {
        return doc.receive_sync_message(state, msg);
    }
    let before = doc.get_heads();
    doc.apply_changes(changes)?;
    let after = doc.get_heads();
    state.shared_heads = advance_heads(&before, &after, &state.shared_heads);
    msg.changes = Vec::<Vec<u8>>::new().into();
    let lost_all = msg.heads.is_empty();
    let last_sent = state.last_sent_heads.clone();
    let result = doc.receive_sync_message(state, msg);
    if !lost_all {
        state.last_sent_heads = last_sent;
    }
    result
}

/// Shared heads after applying changes (Automerge's own rule, private there):
/// our new heads that are new, plus the old shared heads that are still heads.
fn advance_heads(
    before: &[ChangeHash],
    after: &[ChangeHash],
    shared: &[ChangeHash],
) -> Vec<ChangeHash> {
    let mut out: BTreeSet<ChangeHash> = after
        .iter()
        .filter(|h| !before.contains(h))
        .copied()
        .collect();
    out.extend(shared.iter().filter(|h| after.contains(h)).copied());
    out.into_iter().collect()
}

impl Engine {
    /// Handles one frame from a peer. `Err` means a protocol violation: the shell
    /// disconnects the peer. Invalid changes are rejected whole and logged, but
    /// do not break the connection.
    pub fn receive(&mut self, peer: NodeId, body: &[u8], now_ms: u64) -> Result<(), String> {
        let msg: Msg = crate::wire::decode_frame(body)?;
        self.catchup.now_ms = self.catchup.now_ms.max(now_ms);
        self.stats.sync_messages_in += 1;
        self.stats.sync_bytes_in += body.len() as u64 + 4;
        let Some(s) = self.sessions.get_mut(&peer) else {
            return Err("frame from a peer without a session".into());
        };
        s.bytes_in += body.len() as u64 + 4;
        s.last_heard_ms = now_ms;
        self.last_heard.insert(peer.tag(), now_ms);
        match msg {
            Msg::Rights(req) => self.on_rights_request(peer, req, now_ms)?,
            Msg::Root { digest, keys } => self.on_root(peer, digest, keys),
            Msg::Keys { entries } => {
                if entries.len() > KEYS_PER_FRAME_MAX {
                    return Err("key-store frame over the limit".into());
                }
                for (c, e) in entries {
                    crate::ids::validate_client_id("customer_id", &c)?;
                    if let crate::crypto::KeyEntry::Keys(k) = &e {
                        if k.is_empty() || k.len() > crate::crypto::KEYS_PER_CUSTOMER_MAX {
                            return Err("malformed key-store entry".into());
                        }
                    }
                    if !self.within_key_budget(peer, &c, &e, now_ms) {
                        continue;
                    }
                    if self.set_key_entry(&c, e) {
                        self.key_changed(&c);
                        self.refresh_customer(&c, now_ms);
                    }
                }
            }
            Msg::Groups { digests } => {
                if digests.len() != GROUPS {
                    return Err(format!("groups message with {} entries", digests.len()));
                }
                let differing: Vec<usize> = (0..GROUPS)
                    .filter(|g| digests[*g] != self.digest.groups[*g])
                    .collect();
                for g in differing {
                    {
                        let entries: Vec<(String, u64)> = self
                            .docs
                            .iter()
                            .filter(|(id, _)| group_of(id) == g)
                            .map(|(id, s)| (id.clone(), s.digest_part))
                            .collect();
                        let n = entries.len().div_ceil(DOCS_PER_FRAME_MAX).max(1);
                        let mut chunks: Vec<Vec<(String, u64)>> = entries
                            .chunks(DOCS_PER_FRAME_MAX)
                            .map(|c| c.to_vec())
                            .collect();
                        if chunks.is_empty() {
                            chunks.push(Vec::new());
                        }
                        for (i, c) in chunks.into_iter().enumerate() {
                            self.send(
                                peer,
                                &Msg::Docs {
                                    group: g as u16,
                                    entries: c,
                                    last: i + 1 == n,
                                },
                            );
                        }
                    }
                }
            }
            Msg::Docs { group, entries, .. } => {
                if usize::from(group) >= GROUPS || entries.len() > DOCS_PER_FRAME_MAX {
                    return Err("malformed docs message".into());
                }
                let theirs: BTreeMap<String, u64> = entries.into_iter().collect();
                let mut differing: BTreeSet<String> = BTreeSet::new();
                for (id, part) in &theirs {
                    if group_of(id) != usize::from(group) {
                        return Err(format!("document {id:?} listed in the wrong group"));
                    }
                    if self.docs.get(id).map(|s| s.digest_part) != Some(*part) {
                        DocId::parse(id, self.cfg.buckets)?;
                        // An older ledger epoch: its writers carry it forward.
                        if !self.is_retired_epoch(id) {
                            differing.insert(id.clone());
                        }
                    }
                }
                for (id, s) in &self.docs {
                    if group_of(id) == usize::from(group)
                        && !theirs.contains_key(id)
                        && s.digest_part != 0
                    {
                        differing.insert(id.clone());
                    }
                }
                for id in differing {
                    if let Some(s) = self
                        .sessions
                        .get_mut(&peer)
                        .and_then(|s| s.docs.get_mut(&id))
                    {
                        s.finished = false;
                    }
                    self.sync_doc(peer, &id);
                }
            }
            Msg::Sync { doc, data } => self.apply_sync(peer, &doc, &data, false, now_ms)?,
            Msg::Push { doc, data, seen } => {
                self.apply_push(peer, &doc, &data, &seen, now_ms)?;
                self.resume_catchup(&doc);
            }
            Msg::Have { doc, heads } => self.on_have(peer, &doc, &heads)?,
            Msg::Certs { certs, intros } => self.on_certs(peer, certs, intros)?,
            Msg::Fallback { doc, data } => self.apply_sync(peer, &doc, &data, true, now_ms)?,
            Msg::Part { doc, data, last } => {
                let s = self.sessions.get_mut(&peer).ok_or("no session")?;
                let buf = match &mut s.reassembly {
                    Some((d, b)) if *d == doc => b,
                    Some(_) => return Err("interleaved message parts".into()),
                    None => &mut s.reassembly.insert((doc.clone(), Vec::new())).1,
                };
                if buf.len() + data.len() > REASSEMBLY_BYTES_MAX {
                    return Err("reassembled sync message exceeds the limit".into());
                }
                buf.extend_from_slice(&data);
                if last {
                    let (doc, buf) = s.reassembly.take().unwrap_or_default();
                    let Some((&flag, body)) = buf.split_first() else {
                        return Err("empty reassembled message".into());
                    };
                    self.apply_sync(peer, &doc, body, flag == 1, now_ms)?;
                }
            }
        }
        Ok(())
    }

    /// Forgets every peer session's state of a document this node dropped.
    pub(crate) fn forget_doc_sessions(&mut self, id: &str) {
        for s in self.sessions.values_mut() {
            s.docs.remove(id);
            s.stored.remove(id);
            if s.reassembly.as_ref().is_some_and(|(d, _)| d == id) {
                s.reassembly = None;
            }
        }
        self.catchup.leaders.remove(id);
        self.catchup.deferred.remove(id);
        self.catchup.wanted.remove(id);
    }

    fn ensure_doc(&mut self, id: &str) -> Result<(), String> {
        if !self.docs.contains_key(id) {
            if self.docs.len() >= crate::engine::DOCS_MAX {
                return Err("document limit reached".into());
            }
            let doc_id = DocId::parse(id, self.cfg.buckets)?;
            let _ = self.slot(&doc_id);
        }
        Ok(())
    }

    fn apply_sync(
        &mut self,
        peer: NodeId,
        doc: &str,
        data: &[u8],
        fallback: bool,
        now_ms: u64,
    ) -> Result<(), String> {
        let doc_id = DocId::parse(doc, self.cfg.buckets)?;
        if self.is_retired_epoch(doc) {
            // An older ledger epoch: what its changes raise is carried into
            // the epoch held (their writer may never do it itself).
            let chunks: Vec<Vec<u8>> = if fallback {
                vec![data.to_vec()]
            } else {
                match amsync::Message::decode(data) {
                    Ok(m) => m.changes.iter().map(|c| c.to_vec()).collect(),
                    Err(_) => Vec::new(),
                }
            };
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            self.carry_late_changes(doc, &refs, now_ms);
            return Ok(());
        }
        // This batch's own writes go into the document first, so that the views
        // recomputed below from the merged document keep them.
        self.commit_pending_writes(doc, now_ms);
        let (message, chunks): (Option<amsync::Message>, Vec<Vec<u8>>) = if fallback {
            (None, vec![data.to_vec()])
        } else {
            let m = amsync::Message::decode(data).map_err(|e| format!("bad sync message: {e}"))?;
            let chunks = m.changes.iter().map(|c| c.to_vec()).collect();
            (Some(m), chunks)
        };
        let mut changes = Vec::new();
        let mut inflate_budget = crate::inflate::INFLATED_BYTES_MAX;
        for c in &chunks {
            if let Err(e) = crate::inflate::check_inflation(c, &mut inflate_budget) {
                self.reject(peer, doc, REJECT_INFLATE, &e);
                return Ok(());
            }
            match changes_in_chunk(c) {
                Ok(cs) => changes.extend(cs),
                Err(e) => {
                    self.reject(peer, doc, REJECT_MALFORMED, &e);
                    return Ok(());
                }
            }
        }
        let certified = match self.verify_certified(doc, &changes) {
            Ok(c) => c,
            Err(r) => {
                self.reject(peer, doc, r.reason, &r.detail);
                return Ok(());
            }
        };
        let tag = self.tag;
        let buckets = self.cfg.buckets;
        // A document chunk stays with Automerge's own loader (into an empty
        // document it loads the columnar form whole, far faster than applying
        // its changes one by one); change chunks and bundles are applied from
        // the changes decoded here, not parsed a second time.
        let whole_doc = chunks.iter().any(|c| chunk_type(c) == Some(CHUNK_DOCUMENT));
        // A document this node does not hold is validated against an empty
        // one, and gets its slot only once a change of it is accepted: a
        // peer's talk about documents must not fill the document table.
        let mut fresh_seqs = crate::validate::ActorSeqs::default();
        let checked = {
            let (am, seqs) = match self.docs.get_mut(doc) {
                Some(s) => (&*s.doc, &mut s.seqs),
                None => (&self.empty_doc, &mut fresh_seqs),
            };
            let auth = crate::validate::AuthView {
                own: tag,
                views: &self.views,
                authority: &self.authority,
            };
            validate_changes(&doc_id, am, seqs, &mut changes, tag, buckets, Some(auth)).map_err(
                |e| {
                    let missing: Vec<ChangeHash> = if e == Refusal::MissingDeps {
                        let in_message: BTreeSet<ChangeHash> =
                            changes.iter().map(|c| c.hash()).collect();
                        changes
                            .iter()
                            .flat_map(|c| c.deps().to_vec())
                            .filter(|d| {
                                !in_message.contains(d)
                                    && automerge::ReadDoc::get_change_by_hash(am, d).is_none()
                            })
                            .collect::<BTreeSet<_>>()
                            .into_iter()
                            .collect()
                    } else {
                        Vec::new()
                    };
                    (e, missing)
                },
            )
        };
        let verdict = match checked {
            Ok(v) => v,
            Err((e, missing)) => {
                match e {
                    Refusal::MissingDeps => {
                        self.reject(peer, doc, REJECT_MISSING_DEPS, &e.to_string());
                        self.restart_doc_session(peer, doc, missing);
                    }
                    e => self.reject(peer, doc, refusal_reason(&e), &e.to_string()),
                }
                return Ok(());
            }
        };
        if !self.docs.contains_key(doc) && !changes.is_empty() {
            if let Err(e) = self.ensure_doc(doc) {
                self.reject(peer, doc, REJECT_DOC_LIMIT, &e);
                return Ok(());
            }
        }
        // Apply: a sync message through its session, a fallback as raw changes.
        let mut sess = match self
            .sessions
            .get_mut(&peer)
            .and_then(|s| s.docs.remove(doc))
        {
            Some(s) => s,
            None => {
                self.session_for(peer, doc);
                match self
                    .sessions
                    .get_mut(&peer)
                    .and_then(|s| s.docs.remove(doc))
                {
                    Some(s) => s,
                    None => return Ok(()),
                }
            }
        };
        if message
            .as_ref()
            .and_then(|m| m.flags)
            .is_some_and(|f| f.contains(amsync::MessageFlags::SYNC_RESET))
        {
            sess.whole_docs = true;
        }
        let Some(slot) = self.docs.get_mut(doc) else {
            // Nothing to apply to a document this node lacks: the session
            // only learns the peer's heads and needs (against an empty
            // document), and the reply asks for everything.
            if let Some(m) = message {
                let mut empty = automerge::Automerge::new();
                let _ = empty.receive_sync_message(&mut sess.state, m);
            }
            self.put_session(peer, doc, sess);
            if !fallback {
                self.sync_doc(peer, doc);
            }
            return Ok(());
        };
        let before = slot.doc.get_heads();
        if !whole_doc {
            changes.retain(|c| slot.doc.get_change_meta_by_hash(&c.hash()).is_none());
        }
        let result = match message {
            Some(m) if !whole_doc => receive_decoded(&mut slot.doc, &mut sess.state, m, changes),
            Some(m) => slot.doc.receive_sync_message(&mut sess.state, m),
            None if !whole_doc => slot.doc.apply_changes(changes),
            None => slot.doc.load_incremental(data).map(|_| ()),
        };
        self.put_session(peer, doc, sess);
        if let Err(e) = result {
            self.reject(
                peer,
                doc,
                REJECT_AUTOMERGE,
                &format!("automerge refused the message: {e}"),
            );
            return Ok(());
        }
        self.accept_certs(doc, certified);
        self.after_apply(doc, &before, &verdict, [peer.tag()].into(), false, now_ms);
        // Reply (queued; released only after the next commit).
        if !fallback {
            self.sync_doc(peer, doc);
        }
        self.resume_catchup(doc);
        Ok(())
    }

    /// Applies a [`Msg::Push`]: changes we already have are skipped (the
    /// common case of a change reaching us over several paths); the rest are
    /// validated like any sync message and applied whole, or not at all. If
    /// their dependencies are missing (an earlier push was lost, or pushes
    /// overtook each other on different paths), the document's sync session
    /// with this peer fetches what is missing.
    fn apply_push(
        &mut self,
        peer: NodeId,
        doc: &str,
        data: &[u8],
        seen: &[[u8; NODE_TAG_BYTES]],
        now_ms: u64,
    ) -> Result<(), String> {
        if seen.len() > SEEN_MAX {
            return Err("push lists too many nodes".into());
        }
        let doc_id = DocId::parse(doc, self.cfg.buckets)?;
        if self.is_retired_epoch(doc) {
            self.carry_late_changes(doc, &[data], now_ms);
            return Ok(());
        }
        let mut inflate_budget = crate::inflate::INFLATED_BYTES_MAX;
        if let Err(e) = crate::inflate::check_inflation(data, &mut inflate_budget) {
            self.reject(peer, doc, REJECT_INFLATE, &e);
            return Ok(());
        }
        let mut changes = match changes_in_chunk(data) {
            Ok(cs) => cs,
            Err(e) => {
                self.reject(peer, doc, REJECT_MALFORMED, &e);
                return Ok(());
            }
        };
        if let Some(slot) = self.docs.get(doc) {
            changes.retain(|c| {
                automerge::ReadDoc::get_change_by_hash(&*slot.doc, &c.hash()).is_none()
            });
        }
        if changes.is_empty() {
            return Ok(());
        }
        let certified = match self.verify_certified(doc, &changes) {
            Ok(c) => c,
            Err(r) => {
                self.reject(peer, doc, r.reason, &r.detail);
                return Ok(());
            }
        };
        self.commit_pending_writes(doc, now_ms);
        let tag = self.tag;
        let buckets = self.cfg.buckets;
        let mut fresh_seqs = crate::validate::ActorSeqs::default();
        let checked = {
            let (am, seqs) = match self.docs.get_mut(doc) {
                Some(s) => (&*s.doc, &mut s.seqs),
                None => (&self.empty_doc, &mut fresh_seqs),
            };
            let auth = crate::validate::AuthView {
                own: tag,
                views: &self.views,
                authority: &self.authority,
            };
            validate_changes(&doc_id, am, seqs, &mut changes, tag, buckets, Some(auth))
        };
        let verdict = match checked {
            Ok(v) => v,
            Err(Refusal::MissingDeps) => {
                self.stats.pushes_behind += 1;
                self.offer_doc(peer, doc);
                return Ok(());
            }
            Err(e) => {
                self.reject(peer, doc, refusal_reason(&e), &e.to_string());
                return Ok(());
            }
        };
        if let Err(e) = self.ensure_doc(doc) {
            self.reject(peer, doc, REJECT_DOC_LIMIT, &e);
            return Ok(());
        }
        let Some(slot) = self.docs.get_mut(doc) else {
            return Ok(());
        };
        let before = slot.doc.get_heads();
        if let Err(e) = slot.doc.apply_changes(changes) {
            self.reject(
                peer,
                doc,
                REJECT_AUTOMERGE,
                &format!("automerge refused the changes: {e}"),
            );
            return Ok(());
        }
        let mut covered: BTreeSet<NodeTag> = seen.iter().map(|t| NodeTag(*t)).collect();
        covered.insert(peer.tag());
        self.accept_certs(doc, certified);
        self.after_apply(doc, &before, &verdict, covered, true, now_ms);
        Ok(())
    }

    /// After changes were merged into a document: views, last-heard times,
    /// fork detection, and where the changes came from (for the next push).
    fn after_apply(
        &mut self,
        doc: &str,
        before: &[ChangeHash],
        verdict: &Verdict,
        covered: BTreeSet<NodeTag>,
        pushed: bool,
        now_ms: u64,
    ) {
        let Some(slot) = self.docs.get(doc) else {
            return;
        };
        let after = slot.doc.get_heads();
        if after == before {
            return;
        }
        self.dirty_docs.insert(doc.to_string());
        let source = self.push_sources.entry(doc.to_string()).or_default();
        source.received(covered);
        source.pushed |= pushed;
        for t in &verdict.authors {
            let h = self.last_heard.entry(*t).or_default();
            *h = (*h).max(now_ms);
        }
        // Cells of this node's own incarnations that another node carried
        // into an epoch at values this node never wrote (a restored backup
        // or a clone spent them): a fork, like its own changes from elsewhere.
        let own = verdict.own_changes_from_elsewhere
            + self.carried_own_cells_above_view(doc, &verdict.keys);
        // Changes of a node whose rights passed to this one (retired) that
        // arrive only now: whatever they spent is this node's to account for.
        let inherited = verdict
            .authors
            .iter()
            .any(|t| *t != self.tag && self.views.resolve(*t) == self.tag);
        let retired_before = self.views.retired.clone();
        // This node's rights before the changes: a deficit is the shortfall
        // they cause, not one an earlier event caused (or recorded).
        let rights_before = if own > 0 || inherited {
            self.rights_of_keys(doc, &verdict.keys)
        } else {
            Default::default()
        };
        // The first changes of a newer ledger epoch: move to it before any
        // view is read from it (carries this node's view forward).
        self.maybe_switch_epoch(doc, now_ms);
        self.recompute_keys(doc, &verdict.keys);
        if own > 0 {
            self.record_fork(doc, own, &rights_before, now_ms);
        } else if inherited {
            self.record_event_deficits(&rights_before, "retired", now_ms);
        }
        // A retirement that arrives after the retired node's changes.
        if self.views.retired != retired_before {
            self.record_inherited_deficits(&retired_before, now_ms);
        }
    }

    /// The peer sent changes whose dependencies we lack. Automerge's sender
    /// never resends a change it already sent in a session (`sent_hashes`), so
    /// a refused message — or a Bloom filter false positive, or a shared-heads
    /// state persisted from another process with this identity — leaves the
    /// peer believing we hold what we do not, and every later change arrives
    /// without its dependencies. Start this document's session over: our next
    /// message asks the peer to forget what it sent (`SYNC_RESET`) and names
    /// the missing changes in `need`. Bounded per session.
    fn restart_doc_session(&mut self, peer: NodeId, doc: &str, missing: Vec<ChangeHash>) {
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        s.stored.remove(doc);
        match s.docs.get_mut(doc) {
            Some(d) if d.restarts < SESSION_RESTARTS_MAX => {
                d.state = amsync::State::new();
                d.restarts += 1;
                d.idle_rounds = 0;
                d.finished = false;
                d.peer_reset = true;
                d.want = missing;
            }
            _ => return,
        }
        self.sync_doc(peer, doc);
    }

    /// Whether a peer's key-store entry fits the peer's budget of erasures
    /// and of keys added to customers that have keys here (spent only for
    /// what the entry would change); an entry over it is refused and counted.
    fn within_key_budget(
        &mut self,
        peer: NodeId,
        customer: &str,
        entry: &crate::crypto::KeyEntry,
        now_ms: u64,
    ) -> bool {
        use crate::authority::KeyStoreAct;
        use crate::crypto::KeyEntry;
        let act = match (self.keys.get(customer), entry) {
            (Some(KeyEntry::Erased), _) => return true,
            (_, KeyEntry::Erased) => KeyStoreAct::Erase,
            (Some(KeyEntry::Keys(have)), KeyEntry::Keys(new)) => {
                let added = new.difference(have).count() as u32;
                if added == 0 {
                    return true;
                }
                KeyStoreAct::AddKeys(added)
            }
            // A customer new here: its keys are the creator's.
            (None, KeyEntry::Keys(_)) => return true,
        };
        if self.authority.spend(peer.tag(), act, now_ms) {
            return true;
        }
        let reason = match act {
            KeyStoreAct::Erase => REJECT_ERASURE_LIMIT,
            KeyStoreAct::AddKeys(_) => REJECT_KEY_LIMIT,
        };
        self.stats.rejected_messages += 1;
        *self.stats.rejected_by_reason.entry(reason).or_default() += 1;
        tracing::warn!(peer = %peer.hex(), reason, "refused a peer's key-store entry over its budget");
        false
    }

    pub(crate) fn reject(&mut self, peer: NodeId, doc: &str, reason: &'static str, why: &str) {
        self.stats.rejected_messages += 1;
        *self.stats.rejected_by_reason.entry(reason).or_default() += 1;
        tracing::warn!(peer = %peer.hex(), doc, reason, detail = why, "rejected a sync message from a peer; nothing of it was applied");
        if let Some(s) = self
            .sessions
            .get_mut(&peer)
            .and_then(|s| s.docs.get_mut(doc))
        {
            s.finished = true;
        }
    }
}
