//! Peers coming and going: sending frames, the digest exchange on
//! connect (`Engine::peer_up_with_digest`), key-store pushes,
//! `Engine::peer_down`, and the anti-entropy `Engine::tick`.

use std::collections::BTreeMap;

use automerge::ChangeHash;

use crate::engine::Engine;
use crate::ids::NodeId;
use crate::sync::{Msg, PeerSession, COOL_SAVES_PER_TICK, KEYS_PER_FRAME_MAX};
use crate::wire::encode_frame;

impl Engine {
    pub(crate) fn send_msg(&mut self, peer: NodeId, msg: &Msg) {
        self.send(peer, msg);
    }

    pub(crate) fn send(&mut self, peer: NodeId, msg: &Msg) {
        match encode_frame(msg) {
            Ok(f) => self.queue_frame(peer, f, msg.kind_index()),
            Err(e) => tracing::error!(error = %e, "cannot encode sync frame"),
        }
    }

    /// Queues an encoded frame for `peer` (released after the next commit).
    pub(super) fn queue_frame(&mut self, peer: NodeId, f: Vec<u8>, kind: usize) {
        self.stats.sync_messages_out += 1;
        self.stats.sync_bytes_out += f.len() as u64;
        if let Some(b) = self.stats.sync_bytes_out_by_kind.get_mut(kind) {
            *b += f.len() as u64;
        }
        if let Some(s) = self.sessions.get_mut(&peer) {
            s.bytes_out += f.len() as u64;
        }
        self.outbox.push((peer, f));
    }

    /// Whether this node lacks any of `heads` of `doc` (or the whole document).
    pub(super) fn lacks_any(&self, doc: &str, heads: &[ChangeHash]) -> bool {
        self.docs.get(doc).is_none_or(|s| {
            heads
                .iter()
                .any(|h| automerge::ReadDoc::get_change_by_hash(&*s.doc, h).is_none())
        })
    }

    fn send_root(&mut self, peer: NodeId, now_ms: u64) {
        let digest = self.digest.root();
        if let Some(s) = self.sessions.get_mut(&peer) {
            s.last_root_sent_ms = now_ms;
        }
        let keys = self.keys_digest;
        self.send(peer, &Msg::Root { digest, keys });
    }

    /// A peer completed the hello. `stored` holds persisted sync states by document.
    pub fn peer_up(&mut self, peer: NodeId, stored: Vec<(String, Vec<u8>)>, now_ms: u64) {
        self.peer_up_with_digest(peer, stored, None, now_ms);
    }

    /// What this node's hello says about its state (see `wire::HelloDigest`).
    pub fn hello_digest(&self) -> crate::wire::HelloDigest {
        crate::wire::HelloDigest {
            root: self.digest.root(),
            keys: self.keys_digest,
        }
    }

    /// A peer completed the hello, which carried `their` digest (`None`: a peer
    /// without the extension; we send `Msg::Root` as before). With it, the
    /// digest is compared at once, as if a `Msg::Root` had arrived: equal →
    /// nothing is sent (an in-sync reconnect is the two hellos); different →
    /// group digests and/or key-store entries. Each side compares the other's
    /// hello with its *current* state, so a change made after our own hello went
    /// out is still noticed by one side (states only grow).
    pub fn peer_up_with_digest(
        &mut self,
        peer: NodeId,
        stored: Vec<(String, Vec<u8>)>,
        their: Option<crate::wire::HelloDigest>,
        now_ms: u64,
    ) {
        self.certs_peer_up(peer);
        self.sessions.insert(
            peer,
            PeerSession {
                docs: BTreeMap::new(),
                stored: stored.into_iter().collect(),
                reassembly: None,
                synced: false,
                last_root_sent_ms: 0,
                bytes_in: 0,
                bytes_out: 0,
                last_heard_ms: now_ms,
            },
        );
        match their {
            Some(d) => self.on_root(peer, d.root, d.keys),
            None => self.send_root(peer, now_ms),
        }
    }

    /// A peer's root digest (from `Msg::Root` or its hello).
    pub(super) fn on_root(&mut self, peer: NodeId, digest: [u8; 32], keys: [u8; 32]) {
        if keys != self.keys_digest {
            let mut all: Vec<(String, crate::crypto::KeyEntry)> = self
                .keys
                .iter()
                .map(|(c, e)| (c.clone(), e.clone()))
                .collect();
            all.sort_by(|a, b| a.0.cmp(&b.0));
            self.send_keys(peer, &all);
        }
        if digest == self.digest.root() {
            if let Some(s) = self.sessions.get_mut(&peer) {
                s.synced = true;
            }
        } else {
            let digests = self.digest.groups.clone();
            self.send(peer, &Msg::Groups { digests });
        }
    }

    pub(super) fn send_keys(
        &mut self,
        peer: NodeId,
        entries: &[(String, crate::crypto::KeyEntry)],
    ) {
        for chunk in entries.chunks(KEYS_PER_FRAME_MAX) {
            self.send(
                peer,
                &Msg::Keys {
                    entries: chunk.to_vec(),
                },
            );
        }
    }

    /// A peer's connection ended: its shared heads are persisted with the next batch.
    pub fn peer_down(&mut self, peer: NodeId) {
        if let Some(s) = self.sessions.remove(&peer) {
            for (doc, d) in s.docs {
                self.queue_sync_state(peer, doc, d.state.encode());
            }
        }
        for set in self.catchup.deferred.values_mut() {
            set.remove(&peer);
        }
        self.catchup.deferred.retain(|_, set| !set.is_empty());
        self.catchup.wanted.retain(|_, (p, _)| *p != peer);
        let led: Vec<String> = self
            .catchup
            .leaders
            .iter()
            .filter(|(_, (l, _))| *l == peer)
            .map(|(d, _)| d.clone())
            .collect();
        for doc in led {
            self.catchup.leaders.remove(&doc);
            self.resume_catchup(&doc);
        }
    }

    pub fn connected_peers(&self) -> Vec<NodeId> {
        self.sessions.keys().copied().collect()
    }

    pub fn session(&self, peer: &NodeId) -> Option<&PeerSession> {
        self.sessions.get(peer)
    }

    /// True once any peer's root digest matched ours (first sync finished).
    pub fn synced_with_any(&self) -> bool {
        self.sessions.values().any(|s| s.synced)
    }

    /// Periodic anti-entropy: re-announce the root digest to every peer.
    pub fn tick(&mut self, now_ms: u64) {
        self.catchup.now_ms = self.catchup.now_ms.max(now_ms);
        let peers: Vec<NodeId> = self.sessions.keys().copied().collect();
        for p in peers {
            self.send_root(p, now_ms);
        }
        let waiting: Vec<String> = self
            .catchup
            .deferred
            .keys()
            .chain(self.catchup.wanted.keys())
            .cloned()
            .collect();
        for doc in waiting {
            self.resume_catchup(&doc);
        }
        self.cool_closed_parts(COOL_SAVES_PER_TICK);
    }
}
