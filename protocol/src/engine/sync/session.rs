//! Outgoing sync: per-document Automerge sync sessions, catch-up
//! coordination after a partition heals, splitting large messages, and
//! pushing committed changes to peers (`Engine::push_docs`).

use std::collections::{BTreeMap, BTreeSet};

use automerge::sync::{self as amsync, SyncDoc};
use automerge::ChangeHash;

use crate::engine::Engine;
use crate::ids::{NodeId, NodeTag, NODE_TAG_BYTES};
use crate::layout::DocId;
use crate::sync::{
    bundle::{bundle_changes, hide_v2_if_partial},
    DocSession, Msg, CATCHUP_LEAD_MS, HAVE_HEADS_MAX, ROUNDS_IDLE_MAX, SEEN_MAX,
};
use crate::wire::{encode_frame, CHUNK_BYTES_MAX};

impl Engine {
    /// Whether the session with `peer` on `doc` is still expected to bring
    /// us changes: we have not heard its heads yet, or lack some of them.
    fn session_brings(&self, peer: NodeId, doc: &str) -> bool {
        let Some(d) = self.sessions.get(&peer).and_then(|s| s.docs.get(doc)) else {
            return false;
        };
        if d.finished || !self.docs.contains_key(doc) {
            return false;
        }
        match &d.state.their_heads {
            None => true,
            Some(h) => self.lacks_any(doc, h),
        }
    }

    /// The document's catch-up leader, if it is still catching us up.
    fn active_leader(&mut self, doc: &str) -> Option<NodeId> {
        let &(leader, since) = self.catchup.leaders.get(doc)?;
        let fresh = self.catchup.now_ms.saturating_sub(since) <= CATCHUP_LEAD_MS;
        if fresh && self.session_brings(leader, doc) {
            Some(leader)
        } else {
            self.catchup.leaders.remove(doc);
            None
        }
    }

    /// Whether our next message to `peer` on `doc` waits for the leader.
    fn defer_for_leader(&mut self, peer: NodeId, doc: &str) -> bool {
        match self.active_leader(doc) {
            Some(leader) if leader != peer && peer.0 > leader.0 => {
                self.catchup
                    .deferred
                    .entry(doc.to_string())
                    .or_default()
                    .insert(peer);
                true
            }
            _ => false,
        }
    }

    /// After progress on `doc`: once no leader is catching us up, the deferred
    /// peers get their replies and announced heads we still lack are fetched.
    pub(super) fn resume_catchup(&mut self, doc: &str) {
        if self.active_leader(doc).is_some() {
            return;
        }
        if let Some(peers) = self.catchup.deferred.remove(doc) {
            for p in peers {
                if self.sessions.contains_key(&p) {
                    self.sync_doc(p, doc);
                }
            }
        }
        if self.active_leader(doc).is_some() {
            return;
        }
        if let Some((peer, heads)) = self.catchup.wanted.remove(doc) {
            if self.lacks_any(doc, &heads) && self.sessions.contains_key(&peer) {
                self.fetch_doc(peer, doc, heads);
            }
        }
    }

    /// A peer announced its heads of a document it caught up on.
    pub(super) fn on_have(
        &mut self,
        peer: NodeId,
        doc: &str,
        heads: &[[u8; 32]],
    ) -> Result<(), String> {
        if heads.len() > HAVE_HEADS_MAX {
            return Err("have message lists too many heads".into());
        }
        DocId::parse(doc, self.cfg.buckets)?;
        if self.is_retired_epoch(doc) {
            return Ok(());
        }
        let heads: Vec<ChangeHash> = heads.iter().map(|h| ChangeHash(*h)).collect();
        if !self.lacks_any(doc, &heads) {
            return Ok(());
        }
        if self.active_leader(doc).is_some() {
            self.catchup.wanted.insert(doc.to_string(), (peer, heads));
            return Ok(());
        }
        self.fetch_doc(peer, doc, heads);
        Ok(())
    }

    /// Asks `peer` for the changes behind `heads` of one document. The session
    /// may believe it is idle (our heads did not move since our last message),
    /// so it is told the peer's heads and asked for them explicitly.
    fn fetch_doc(&mut self, peer: NodeId, doc: &str, mut heads: Vec<ChangeHash>) {
        heads.sort();
        heads.dedup();
        if let Some(d) = self.session_for(peer, doc) {
            d.finished = false;
            d.state.their_heads = Some(heads.clone());
            d.state.in_flight = false;
            for h in heads {
                if !d.want.contains(&h) {
                    d.want.push(h);
                }
            }
        }
        self.sync_doc(peer, doc);
    }

    pub(super) fn session_for(&mut self, peer: NodeId, doc: &str) -> Option<&mut DocSession> {
        let s = self.sessions.get_mut(&peer)?;
        if !s.docs.contains_key(doc) {
            let state = s
                .stored
                .remove(doc)
                .and_then(|b| amsync::State::decode(&b).ok())
                .unwrap_or_default();
            s.docs.insert(doc.to_string(), DocSession::new(state));
        }
        s.docs.get_mut(doc)
    }

    /// Generates (and queues) the next sync message for one document and peer.
    pub(super) fn sync_doc(&mut self, peer: NodeId, doc: &str) {
        if self.defer_for_leader(peer, doc) {
            return;
        }
        // A document this node lacks is synced as an empty one (no slot).
        let heads = self
            .docs
            .get(doc)
            .map_or(&self.empty_doc, |s| &s.doc)
            .get_heads();
        // Borrow dance: the session lives in `sessions`, the document in `docs`.
        let Some(mut sess) = self
            .sessions
            .get_mut(&peer)
            .and_then(|s| s.docs.remove(doc))
            .or_else(|| {
                self.session_for(peer, doc)?;
                self.sessions.get_mut(&peer)?.docs.remove(doc)
            })
        else {
            return;
        };
        if sess.finished {
            if sess.last_heads == heads {
                self.put_session(peer, doc, sess);
                return;
            }
            // The document moved on since the session gave up: start afresh.
            sess = DocSession::new(amsync::State::new());
        }
        let am = self.docs.get(doc).map_or(&self.empty_doc, |s| &s.doc);
        if sess.last_heads != heads {
            sess.last_heads = heads;
            sess.idle_rounds = 0;
        }
        // Customer documents are the only ones with delete ops (erasure), and
        // Automerge 0.12's bundle writer emits deletes in hash-map order
        // (`storage/bundle/builder.rs`, `flush_deletes`): such a bundle is
        // valid but not byte-for-byte reproducible, which would make the
        // simulator's byte counts differ between runs of one seed. They are
        // low-volume; their changes travel one by one, and the set of sent
        // hashes (only needed to name a bundle's changes) is not copied.
        let sent_before = (!doc.starts_with("cust/")).then(|| sess.state.sent_hashes.clone());
        // To a peer that holds part of the document, Automerge sends the whole
        // document once more than a third of it is missing: all of its
        // history again, which the receiver must load and merge. Without the
        // V2 capability it sends the missing changes, which go out as one
        // bundle (below). A peer that holds nothing still gets the whole
        // document: loading it into an empty one is the fast path.
        let hidden = if sess.whole_docs {
            None
        } else {
            hide_v2_if_partial(&mut sess.state)
        };
        let msg = am.generate_sync_message(&mut sess.state);
        if let Some(caps) = hidden {
            sess.state.their_capabilities = Some(caps);
        }
        let Some(mut msg) = msg else {
            self.put_session(peer, doc, sess);
            return;
        };
        let chunks: Vec<&[u8]> = msg.changes.iter().collect();
        let certs = self.chunk_certs(doc, &chunks);
        if let Some(n) = sent_before
            .and_then(|before| bundle_changes(am, &mut msg, &before, &sess.state.sent_hashes))
        {
            self.stats.bundles_out += 1;
            self.stats.bundled_changes_out += n as u64;
        }
        if std::mem::take(&mut sess.peer_reset) {
            let mut flags = msg.flags.unwrap_or_default();
            flags.set(amsync::MessageFlags::SYNC_RESET);
            msg.flags = Some(flags);
        }
        for h in std::mem::take(&mut sess.want) {
            if !msg.need.contains(&h) {
                msg.need.push(h);
            }
        }
        // Automerge encodes (and expects) the hash lists sorted.
        msg.need.sort();
        sess.idle_rounds += 1;
        if sess.idle_rounds > ROUNDS_IDLE_MAX {
            if sess.resets == 0 {
                tracing::warn!(doc, "sync session made no progress; resetting it once");
                sess.resets = 1;
                sess.idle_rounds = 0;
                sess.state = amsync::State::new();
            } else {
                tracing::warn!(
                    doc,
                    "sync session still makes no progress; sending save_after fallback"
                );
                let their = sess.state.shared_heads.clone();
                let data = am.save_after(&their);
                let certs = self.chunk_certs(doc, &[&data]);
                sess.finished = true;
                self.put_session(peer, doc, sess);
                self.send_chunk_certs(peer, certs);
                self.send_big(peer, doc, data, true);
                return;
            }
        }
        let data = msg.encode();
        self.put_session(peer, doc, sess);
        self.send_chunk_certs(peer, certs);
        self.send_big(peer, doc, data, false);
        if !self.catchup.leaders.contains_key(doc) && self.session_brings(peer, doc) {
            let now = self.catchup.now_ms;
            self.catchup.leaders.insert(doc.to_string(), (peer, now));
        }
    }

    pub(super) fn put_session(&mut self, peer: NodeId, doc: &str, sess: DocSession) {
        if let Some(s) = self.sessions.get_mut(&peer) {
            s.docs.insert(doc.to_string(), sess);
        }
    }

    /// Sends a sync message, split into parts under the frame limit.
    fn send_big(&mut self, peer: NodeId, doc: &str, data: Vec<u8>, fallback: bool) {
        if data.len() <= CHUNK_BYTES_MAX {
            let msg = if fallback {
                Msg::Fallback {
                    doc: doc.to_string(),
                    data,
                }
            } else {
                Msg::Sync {
                    doc: doc.to_string(),
                    data,
                }
            };
            self.send(peer, &msg);
            return;
        }
        if fallback {
            // A fallback is a plain save_after; send it as parts of a "sync" with a marker byte.
            tracing::warn!(doc, bytes = data.len(), "large fallback split into parts");
        }
        let mut framed = Vec::with_capacity(data.len() + 1);
        framed.push(u8::from(fallback));
        framed.extend_from_slice(&data);
        let n = framed.len().div_ceil(CHUNK_BYTES_MAX);
        for (i, c) in framed.chunks(CHUNK_BYTES_MAX).enumerate() {
            self.send(
                peer,
                &Msg::Part {
                    doc: doc.to_string(),
                    data: c.to_vec(),
                    last: i + 1 == n,
                },
            );
        }
    }

    /// After a commit: push each changed document's new changes to the
    /// connected peers that are not known to have them already. A push too
    /// large for one frame is offered through a sync session instead.
    pub(crate) fn push_docs(&mut self, docs: BTreeMap<String, Vec<u8>>, _now_ms: u64) {
        let peers: Vec<NodeId> = self.sessions.keys().copied().collect();
        let keys = std::mem::take(&mut self.keys_to_push);
        if !keys.is_empty() {
            for p in &peers {
                self.send_keys(*p, &keys);
            }
        }
        if peers.is_empty() {
            return;
        }
        for (doc, data) in docs {
            let source = self.push_sources.remove(&doc).unwrap_or_default();
            let lazy = !source.local && !source.pushed && source.covered.is_some();
            let mut known: BTreeSet<NodeTag> = match source.covered {
                Some(c) if !source.local => c,
                // Written here, or arrived without a push (e.g. a sync session):
                // nobody but us is known to have all of it.
                _ => BTreeSet::new(),
            };
            known.insert(self.tag);
            let targets: Vec<NodeId> = peers
                .iter()
                .filter(|p| !known.contains(&p.tag()))
                .copied()
                .collect();
            if targets.is_empty() {
                continue;
            }
            if lazy {
                let heads: Vec<[u8; 32]> = self
                    .docs
                    .get(&doc)
                    .map(|s| {
                        s.doc
                            .get_heads()
                            .iter()
                            .take(HAVE_HEADS_MAX)
                            .map(|h| h.0)
                            .collect()
                    })
                    .unwrap_or_default();
                for p in targets {
                    self.send(
                        p,
                        &Msg::Have {
                            doc: doc.clone(),
                            heads: heads.clone(),
                        },
                    );
                }
                continue;
            }
            if data.is_empty() {
                for p in targets {
                    self.offer_doc(p, &doc);
                }
                continue;
            }
            known.extend(peers.iter().map(|p| p.tag()));
            let seen: Vec<[u8; NODE_TAG_BYTES]> =
                known.iter().take(SEEN_MAX).map(|t| t.0).collect();
            self.send_push_certs(&targets, &doc);
            let push = Msg::Push { doc, data, seen };
            let kind = push.kind_index();
            match encode_frame(&push) {
                Ok(f) => {
                    for p in targets {
                        self.queue_frame(p, f.clone(), kind);
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot encode a push frame"),
            }
        }
    }

    /// Starts (or resumes) the sync session of one document with one peer.
    pub(super) fn offer_doc(&mut self, peer: NodeId, doc: &str) {
        if let Some(s) = self.session_for(peer, doc) {
            s.finished = false;
        }
        self.sync_doc(peer, doc);
    }
}
