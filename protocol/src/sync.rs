//! The per-peer sync state machine (sans-IO).
//!
//! The transport's hello carries each side's root digest over every document's
//! heads (`wire::HelloDigest`; a peer without it gets a [`Msg::Root`] instead).
//! Equal digests: in sync, nothing more is sent. Otherwise they compare [`GROUPS`] group digests, then the document lists
//! of differing groups, and run an Automerge sync session for each differing
//! document only. Local and received changes are pushed to every connected peer
//! after they are durable; a periodic [`Engine::tick`] re-sends the root digest
//! (anti-entropy).
//!
//! Limits: every frame is under `wire::FRAME_BYTES_MAX`; larger sync messages
//! are split into [`Msg::Part`]s with a bounded reassembly buffer; a document
//! session that makes no progress for [`ROUNDS_IDLE_MAX`] rounds is reset once,
//! then finished with a `save_after` fallback.

use std::collections::{BTreeMap, BTreeSet};

use automerge::sync::{self as amsync, SyncDoc};
use automerge::ChangeHash;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::engine::Engine;
use crate::ids::{fnv1a64, NodeId, NodeTag, NODE_TAG_BYTES};
use crate::layout::DocId;
use crate::validate::{
    changes_in_chunk, chunk_type, validate_changes, Verdict, CHUNK_CHANGE, CHUNK_COMPRESSED_CHANGE,
    CHUNK_DOCUMENT,
};
use crate::wire::{encode_frame, CHUNK_BYTES_MAX};

/// Digest groups (a one-level Merkle tree over documents).
pub const GROUPS: usize = 256;
/// Closed records parts that a tick may `save()` to cool (and index) them,
/// each a few milliseconds at 2,048 records. Ticks come every 5 s by default
/// and a store selling 5,000 sales/s closes a part every 0.4 s, so a tick
/// must keep up with ~12 parts; 32 leaves room for parts warmed by reads,
/// and bounds a tick's stall when far behind (after an upgrade) to ~0.1 s.
/// (4 per tick fell behind at 2,700 sales/s: most parts of a 1.6M-sale run
/// were still unindexed at its restart.)
pub const COOL_SAVES_PER_TICK: usize = 32;
/// Session restarts per document and connection after changes arrived
/// without their dependencies (each asks for the missing ones explicitly).
pub const SESSION_RESTARTS_MAX: u8 = 8;
/// Sync rounds without progress on one document before a reset (then a fallback).
pub const ROUNDS_IDLE_MAX: u32 = 12;
/// Largest reassembled sync message from one peer (one at a time per peer).
/// The largest document of a 100,000-product, 1,000,000-sale chain saves to a
/// few MB (BENCHMARKS.md row 5: 37 MB for all 1,541 documents); 64 MiB leaves
/// ample room and bounds what a peer can make this node hold.
pub const REASSEMBLY_BYTES_MAX: usize = 64 << 20;
/// Reasons a peer's input is refused (`storemesh_rejected_changes_total{reason}`).
pub const REJECT_MALFORMED: &str = "malformed";
pub const REJECT_INFLATE: &str = "decompression_limit";
pub const REJECT_INVALID: &str = "invalid_change";
pub const REJECT_MISSING_DEPS: &str = "missing_deps";
pub const REJECT_AUTOMERGE: &str = "automerge_refused";
pub const REJECT_DOC_LIMIT: &str = "document_limit";
/// A change its author has no right to make (`crate::authority`): another
/// node's name, location or records, a retirement without an administrator
/// or without a known successor; also a rights request whose origin is not
/// who sent it.
pub const REJECT_UNAUTHORIZED: &str = "unauthorized";
/// Key-store entries over a peer's budget (`crate::authority`).
pub const REJECT_ERASURE_LIMIT: &str = "erasure_limit";
pub const REJECT_KEY_LIMIT: &str = "key_limit";

/// The rejection reason of a validation error.
fn invalid_reason(e: &str) -> &'static str {
    if e.starts_with(crate::authority::UNAUTHORIZED) {
        REJECT_UNAUTHORIZED
    } else {
        REJECT_INVALID
    }
}
/// Document entries listed in one `Docs` frame.
pub const DOCS_PER_FRAME_MAX: usize = 4096;
/// A sync message carrying at least this many changes sends them as one
/// Automerge bundle (columnar, deflated, dependencies inside the bundle as
/// indices instead of 32-byte hashes) instead of concatenated change chunks.
pub const BUNDLE_MIN_CHANGES: usize = 8;

/// Messages of the sync protocol (after the hello).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Msg {
    /// Key-store entries (customer id → keys or erased); merged, erasure wins.
    Keys {
        entries: Vec<(String, crate::crypto::KeyEntry)>,
    },
    /// A request for sell-rights (rebalancing); small, sent ahead of document sync.
    Rights(crate::rebalance::RightsRequest),
    /// Digest over every document's heads, and over the customer key store.
    Root {
        digest: [u8; 32],
        keys: [u8; 32],
    },
    Groups {
        digests: Vec<u64>,
    },
    Docs {
        group: u16,
        entries: Vec<(String, u64)>,
        last: bool,
    },
    Sync {
        doc: String,
        data: Vec<u8>,
    },
    Part {
        doc: String,
        data: Vec<u8>,
        last: bool,
    },
    Fallback {
        doc: String,
        data: Vec<u8>,
    },
    /// New changes of one document, pushed after they became durable: raw
    /// Automerge changes (`save_after` form) and the nodes the sender knows
    /// to have them (itself, the peers it pushed them to, and those its own
    /// source had covered), so that receivers forward them only to the rest.
    Push {
        doc: String,
        data: Vec<u8>,
        seen: Vec<[u8; NODE_TAG_BYTES]>,
    },
    /// The sender's heads of one document after it caught up through a sync
    /// session: changes that arrived that way are announced, not pushed (its
    /// other peers are often catching up on the same changes themselves); a
    /// receiver that lacks some of them fetches them through a session.
    Have {
        doc: String,
        heads: Vec<[u8; 32]>,
    },
}

/// Names of the message kinds, in `Msg::kind_index` order (metrics label).
pub const MSG_KINDS: [&str; 10] = [
    "keys", "rights", "root", "groups", "docs", "sync", "part", "fallback", "push", "have",
];

impl Msg {
    /// Index of this message's kind in `MSG_KINDS`.
    pub fn kind_index(&self) -> usize {
        match self {
            Msg::Keys { .. } => 0,
            Msg::Rights(_) => 1,
            Msg::Root { .. } => 2,
            Msg::Groups { .. } => 3,
            Msg::Docs { .. } => 4,
            Msg::Sync { .. } => 5,
            Msg::Part { .. } => 6,
            Msg::Fallback { .. } => 7,
            Msg::Push { .. } => 8,
            Msg::Have { .. } => 9,
        }
    }
}

/// Heads listed in one `Have`, at most.
pub const HAVE_HEADS_MAX: usize = 64;
/// A catch-up session on one document defers the others this long at most.
pub const CATCHUP_LEAD_MS: u64 = 2_000;

/// Catch-up coordination: after a partition heals, several peers can offer
/// the same missing changes of a document at once. One of them (the leader)
/// catches us up first; replies to the others wait until it is done, so they
/// then see we already have those changes. A reply is only deferred to a peer
/// whose node id is greater than the leader's: with that order no cycle of
/// nodes can wait on each other.
#[derive(Default)]
pub(crate) struct Catchup {
    leaders: BTreeMap<String, (NodeId, u64)>,
    deferred: BTreeMap<String, BTreeSet<NodeId>>,
    /// Announced heads we lack, to fetch once no session is catching us up.
    wanted: BTreeMap<String, (NodeId, Vec<ChangeHash>)>,
    now_ms: u64,
}

/// Node tags listed in one push's `seen`, at most (a longer list is cut: the
/// receivers then forward to a few nodes that already have the changes).
pub const SEEN_MAX: usize = 256;

/// Where a batch's new changes of one document came from (see [`Msg::Push`]).
#[derive(Clone, Debug, Default)]
pub struct PushSource {
    /// Written here: every peer gets them.
    pub local: bool,
    /// Some arrived in a push (live changes: pushed on at once); if none did
    /// and none were written here, they came through a sync session and are
    /// announced with [`Msg::Have`] instead.
    pub pushed: bool,
    /// Nodes known to have every received change of this document in this
    /// batch (the intersection over the messages they came in); `None`: none received.
    pub covered: Option<BTreeSet<NodeTag>>,
}

impl PushSource {
    fn received(&mut self, covered: BTreeSet<NodeTag>) {
        self.covered = Some(match self.covered.take() {
            None => covered,
            Some(c) => c.intersection(&covered).copied().collect(),
        });
    }
}

/// Key-store entries per frame, at most.
pub const KEYS_PER_FRAME_MAX: usize = 2048;

/// Hash of one key-store entry, XOR-folded into the key-store digest.
pub fn key_digest(customer: &str, entry: &crate::crypto::KeyEntry) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(customer.as_bytes());
    h.update([0]);
    h.update(postcard::to_stdvec(entry).unwrap_or_default());
    h.finalize().into()
}

/// Hash of one document's heads, as folded into its group digest.
pub fn doc_digest(id: &str, heads: &[ChangeHash]) -> u64 {
    if heads.is_empty() {
        return 0;
    }
    let mut h = Sha256::new();
    h.update(id.as_bytes());
    let mut sorted: Vec<&ChangeHash> = heads.iter().collect();
    sorted.sort();
    for c in sorted {
        h.update(c.0);
    }
    let d = h.finalize();
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

pub fn group_of(id: &str) -> usize {
    (fnv1a64(id.as_bytes()) % GROUPS as u64) as usize
}

/// XOR-folded digests per group, maintained incrementally.
#[derive(Clone, Debug)]
pub struct Digest {
    pub groups: Vec<u64>,
}

impl Default for Digest {
    fn default() -> Self {
        Digest {
            groups: vec![0; GROUPS],
        }
    }
}

impl Digest {
    pub fn toggle(&mut self, id: &str, part: u64) {
        self.groups[group_of(id)] ^= part;
    }
    pub fn root(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for g in &self.groups {
            h.update(g.to_le_bytes());
        }
        h.finalize().into()
    }
}

pub(crate) struct DocSession {
    state: amsync::State,
    idle_rounds: u32,
    resets: u8,
    finished: bool,
    last_heads: Vec<ChangeHash>,
    /// Restarts after changes arrived without their dependencies.
    restarts: u8,
    /// The next message asks the peer to clear what it believes it sent.
    peer_reset: bool,
    /// Changes the next message requests explicitly.
    want: Vec<ChangeHash>,
    /// The peer restarted this session because changes we sent lacked their
    /// dependencies (a Bloom filter false positive, or a refused message):
    /// from now on Automerge may send it the whole document, as it would by
    /// itself, instead of only the changes we believe it lacks.
    whole_docs: bool,
}

impl DocSession {
    fn new(state: amsync::State) -> DocSession {
        DocSession {
            state,
            idle_rounds: 0,
            resets: 0,
            finished: false,
            last_heads: Vec::new(),
            restarts: 0,
            whole_docs: false,
            peer_reset: false,
            want: Vec::new(),
        }
    }
}

/// Sync state of one connected peer.
pub struct PeerSession {
    pub(crate) docs: BTreeMap<String, DocSession>,
    /// Persisted shared-heads states, decoded lazily when a session starts.
    stored: BTreeMap<String, Vec<u8>>,
    reassembly: Option<(String, Vec<u8>)>,
    /// True once a root digest from the peer matched ours.
    pub synced: bool,
    last_root_sent_ms: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub last_heard_ms: u64,
}

impl Engine {
    pub(crate) fn send_msg(&mut self, peer: NodeId, msg: &Msg) {
        self.send(peer, msg);
    }

    fn send(&mut self, peer: NodeId, msg: &Msg) {
        match encode_frame(msg) {
            Ok(f) => self.queue_frame(peer, f, msg.kind_index()),
            Err(e) => tracing::error!(error = %e, "cannot encode sync frame"),
        }
    }

    /// Queues an encoded frame for `peer` (released after the next commit).
    fn queue_frame(&mut self, peer: NodeId, f: Vec<u8>, kind: usize) {
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
    fn lacks_any(&self, doc: &str, heads: &[ChangeHash]) -> bool {
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
    fn on_root(&mut self, peer: NodeId, digest: [u8; 32], keys: [u8; 32]) {
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

    fn send_keys(&mut self, peer: NodeId, entries: &[(String, crate::crypto::KeyEntry)]) {
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
    fn resume_catchup(&mut self, doc: &str) {
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
    fn on_have(&mut self, peer: NodeId, doc: &str, heads: &[[u8; 32]]) -> Result<(), String> {
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

    fn session_for(&mut self, peer: NodeId, doc: &str) -> Option<&mut DocSession> {
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
    fn sync_doc(&mut self, peer: NodeId, doc: &str) {
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
                sess.finished = true;
                self.put_session(peer, doc, sess);
                self.send_big(peer, doc, data, true);
                return;
            }
        }
        let data = msg.encode();
        self.put_session(peer, doc, sess);
        self.send_big(peer, doc, data, false);
        if !self.catchup.leaders.contains_key(doc) && self.session_brings(peer, doc) {
            let now = self.catchup.now_ms;
            self.catchup.leaders.insert(doc.to_string(), (peer, now));
        }
    }

    fn put_session(&mut self, peer: NodeId, doc: &str, sess: DocSession) {
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
    fn offer_doc(&mut self, peer: NodeId, doc: &str) {
        if let Some(s) = self.session_for(peer, doc) {
            s.finished = false;
        }
        self.sync_doc(peer, doc);
    }

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
            let auth = crate::authority::AuthView {
                own: tag,
                views: &self.views,
                authority: &self.authority,
            };
            validate_changes(&doc_id, am, seqs, &mut changes, tag, buckets, Some(auth)).map_err(
                |e| {
                    let missing: Vec<ChangeHash> = if e == crate::validate::MISSING_DEPS {
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
                if e == crate::validate::MISSING_DEPS {
                    self.reject(peer, doc, REJECT_MISSING_DEPS, &e);
                    self.restart_doc_session(peer, doc, missing);
                } else {
                    self.reject(peer, doc, invalid_reason(&e), &e);
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
        self.commit_pending_writes(doc, now_ms);
        let tag = self.tag;
        let buckets = self.cfg.buckets;
        let mut fresh_seqs = crate::validate::ActorSeqs::default();
        let checked = {
            let (am, seqs) = match self.docs.get_mut(doc) {
                Some(s) => (&*s.doc, &mut s.seqs),
                None => (&self.empty_doc, &mut fresh_seqs),
            };
            let auth = crate::authority::AuthView {
                own: tag,
                views: &self.views,
                authority: &self.authority,
            };
            validate_changes(&doc_id, am, seqs, &mut changes, tag, buckets, Some(auth))
        };
        let verdict = match checked {
            Ok(v) => v,
            Err(e) if e == crate::validate::MISSING_DEPS => {
                self.stats.pushes_behind += 1;
                self.offer_doc(peer, doc);
                return Ok(());
            }
            Err(e) => {
                self.reject(peer, doc, invalid_reason(&e), &e);
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

    fn reject(&mut self, peer: NodeId, doc: &str, reason: &'static str, why: &str) {
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

    /// Has this document got changes by the given peer's node that we lack? (tests)
    pub fn heads_of(&self, doc: &str) -> Option<Vec<ChangeHash>> {
        self.docs.get(doc).map(|s| s.doc.heads())
    }

    pub fn digest_root(&self) -> [u8; 32] {
        self.digest.root()
    }
}

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

/// Removes the peer's `MessageV2` capability from the session while the peer
/// is known to hold part of the document; returns the capabilities to put
/// back after the message is generated.
fn hide_v2_if_partial(state: &mut amsync::State) -> Option<Vec<amsync::Capability>> {
    let partial = state.their_heads.as_ref().is_some_and(|h| !h.is_empty());
    let caps = state.their_capabilities.as_ref()?;
    if !partial || !caps.contains(&amsync::Capability::MessageV2) {
        return None;
    }
    let without = caps
        .iter()
        .filter(|c| **c != amsync::Capability::MessageV2)
        .cloned()
        .collect();
    state.their_capabilities.replace(without)
}

/// Replaces the change chunks of an outgoing sync message by one Automerge
/// bundle of the same changes when there are at least [`BUNDLE_MIN_CHANGES`]
/// of them. The changes sent are the hashes the message added to the
/// session's `sent_hashes`. A whole-document message (Automerge sends one
/// when more than a third of the document is missing) is already columnar
/// and stays as it is; so does anything the bundle cannot be made of.
fn bundle_changes(
    doc: &automerge::Automerge,
    msg: &mut amsync::Message,
    sent_before: &BTreeSet<ChangeHash>,
    sent_after: &BTreeSet<ChangeHash>,
) -> Option<usize> {
    let only_changes = !msg.changes.is_empty()
        && msg
            .changes
            .iter()
            .all(|c| matches!(chunk_type(c), Some(CHUNK_CHANGE | CHUNK_COMPRESSED_CHANGE)));
    if !only_changes {
        return None;
    }
    let hashes: Vec<ChangeHash> = sent_after.difference(sent_before).copied().collect();
    let n = hashes.len();
    if n < BUNDLE_MIN_CHANGES {
        return None;
    }
    match doc.bundle(hashes) {
        Ok(b) => {
            msg.changes = vec![b.bytes().to_vec()].into();
            Some(n)
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot bundle a sync message's changes");
            None
        }
    }
}
