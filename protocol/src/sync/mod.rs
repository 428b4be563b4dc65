//! The per-peer sync state machine (sans-IO).
//!
//! The transport's hello carries each side's root digest over every document's
//! heads (`wire::HelloDigest`; a peer without it gets a [`Msg::Root`] instead).
//! Equal digests: in sync, nothing more is sent. Otherwise they compare [`GROUPS`] group digests, then the document lists
//! of differing groups, and run an Automerge sync session for each differing
//! document only. Local and received changes are pushed to every connected peer
//! after they are durable; a periodic `Engine::tick` (`engine/sync/peers.rs`) re-sends the root digest
//! (anti-entropy).
//!
//! Limits: every frame is under `wire::FRAME_BYTES_MAX`; larger sync messages
//! are split into [`Msg::Part`]s with a bounded reassembly buffer; a document
//! session that makes no progress for [`ROUNDS_IDLE_MAX`] rounds is reset once,
//! then finished with a `save_after` fallback.
//!
//! This module holds the protocol's data: messages, digests, limits and
//! per-peer session state. The `Engine` methods that run it (peers coming and
//! going, receiving, outgoing sessions) are in `engine/sync/`; nothing here
//! names the engine.

use std::collections::{BTreeMap, BTreeSet};

use automerge::sync as amsync;
use automerge::ChangeHash;

use crate::ids::{NodeId, NodeTag};

pub(crate) mod bundle;
mod digest;
mod msg;

pub use digest::{doc_digest, group_of, key_digest, Digest};
pub use msg::{Msg, MSG_KINDS};

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

/// The rejection reason of a validation refusal.
pub(crate) fn refusal_reason(r: &crate::validate::Refusal) -> &'static str {
    use crate::validate::Refusal;
    match r {
        Refusal::MissingDeps => REJECT_MISSING_DEPS,
        Refusal::Invalid(_) => REJECT_INVALID,
        Refusal::Unauthorized(_) => REJECT_UNAUTHORIZED,
    }
}
/// Document entries listed in one `Docs` frame.
pub const DOCS_PER_FRAME_MAX: usize = 4096;
/// A sync message carrying at least this many changes sends them as one
/// Automerge bundle (columnar, deflated, dependencies inside the bundle as
/// indices instead of 32-byte hashes) instead of concatenated change chunks.
pub const BUNDLE_MIN_CHANGES: usize = 8;

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
    pub(crate) leaders: BTreeMap<String, (NodeId, u64)>,
    pub(crate) deferred: BTreeMap<String, BTreeSet<NodeId>>,
    /// Announced heads we lack, to fetch once no session is catching us up.
    pub(crate) wanted: BTreeMap<String, (NodeId, Vec<ChangeHash>)>,
    pub(crate) now_ms: u64,
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
    pub(crate) fn received(&mut self, covered: BTreeSet<NodeTag>) {
        self.covered = Some(match self.covered.take() {
            None => covered,
            Some(c) => c.intersection(&covered).copied().collect(),
        });
    }
}

/// Key-store entries per frame, at most.
pub const KEYS_PER_FRAME_MAX: usize = 2048;

pub(crate) struct DocSession {
    pub(crate) state: amsync::State,
    pub(crate) idle_rounds: u32,
    pub(crate) resets: u8,
    pub(crate) finished: bool,
    pub(crate) last_heads: Vec<ChangeHash>,
    /// Restarts after changes arrived without their dependencies.
    pub(crate) restarts: u8,
    /// The next message asks the peer to clear what it believes it sent.
    pub(crate) peer_reset: bool,
    /// Changes the next message requests explicitly.
    pub(crate) want: Vec<ChangeHash>,
    /// The peer restarted this session because changes we sent lacked their
    /// dependencies (a Bloom filter false positive, or a refused message):
    /// from now on Automerge may send it the whole document, as it would by
    /// itself, instead of only the changes we believe it lacks.
    pub(crate) whole_docs: bool,
}

impl DocSession {
    pub(crate) fn new(state: amsync::State) -> DocSession {
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
    pub(crate) stored: BTreeMap<String, Vec<u8>>,
    pub(crate) reassembly: Option<(String, Vec<u8>)>,
    /// True once a root digest from the peer matched ours.
    pub synced: bool,
    pub(crate) last_root_sent_ms: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub last_heard_ms: u64,
}
