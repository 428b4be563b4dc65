//! One pass of a node's engine loop, sans-IO: the group commit.
//!
//! Production (`node::node::engine_loop`) and the simulator (`sim::world::World::process`)
//! both run [`NodeLoop::step`]: given the inputs of one batch (client operations
//! with an opaque reply token, connection events, peers' frames, anti-entropy
//! ticks) and `now`, it executes them in arrival order, retries the sales parked
//! while rights are requested, allocates, expires reservations, flushes, numbers
//! the changed rows for the change feed, commits the batch through the
//! [`Storage`] trait, and only then hands out what may leave the node.
//!
//! Release before commit cannot be written: replies, frames for peers, rows to
//! publish and keys to revoke exist only in a [`Committed`], which only
//! `step` can build and only after [`Storage::commit`] returned `Ok`. When the
//! commit fails (or applying a peer's frame panicked) the step returns a
//! [`Failed`] that holds error replies only; the driver then reopens the engine
//! from its store ([`NodeLoop::replace_engine`]).
//!
//! `step` is three parts that a driver may also run apart, to commit batch N
//! on another thread while batch N+1 executes (pipelined commits):
//! [`NodeLoop::execute`] runs a batch up to its flush and returns the batch to
//! persist ([`InFlight`]) and what it will release ([`Held`], opaque);
//! [`commit_batch`] writes an `InFlight` through [`Storage::commit`] and is the
//! only maker of the proof [`Durable`]; [`NodeLoop::release`] turns a `Held`
//! and the `Durable` of the same batch into the [`Committed`]. Batches are
//! released in the order they executed (asserted). When a commit fails,
//! [`NodeLoop::fail_in_flight`] turns that batch's `Held` and every later one
//! into error answers: nothing of them leaves. A client key whose record is in
//! a batch not yet released is answered from that record (never applied
//! twice), and that answer leaves with its own, later batch.

use std::collections::{BTreeMap, BTreeSet};

use crate::engine::{Batch, Engine, Released};
use crate::ids::NodeId;
use crate::ops::{IdemRecord, Op, OpError, OpReply};
use crate::rebalance::{AllocationRule, Submit};
use crate::wire::HelloDigest;

/// A storage error, as the storage layer described it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StorageError(pub String);

/// What the loop needs from durable storage (the node's redb `Store`, over a
/// real file or the simulator's disk).
pub trait Storage {
    /// The idempotency record of a client key. An error is an error: it must
    /// never read as "never seen", or a retry would apply twice.
    fn idem(&mut self, key: &str) -> Result<Option<IdemRecord>, StorageError>;
    /// Sync states persisted for a peer (what it has, per document).
    fn sync_states(&mut self, peer: &NodeId) -> Result<Vec<(String, Vec<u8>)>, StorageError>;
    /// Writes one batch atomically and durably. Called only with a non-empty batch.
    fn commit(&mut self, batch: &Batch) -> Result<(), StorageError>;
}

/// One input of a batch, in arrival order.
#[derive(Debug)]
pub enum Input<T> {
    /// A client operation; its result is released with `token` after the commit.
    Op(Op, T),
    /// A connection to `peer` is up; `digest` is what its hello said.
    PeerUp {
        peer: NodeId,
        conn: u64,
        digest: Option<HelloDigest>,
    },
    /// Connection `conn` to `peer` ended (ignored unless it is the current one).
    PeerDown { peer: NodeId, conn: u64 },
    /// One frame body (without the length prefix) from `peer` over `conn`.
    Frame {
        peer: NodeId,
        conn: u64,
        body: Vec<u8>,
    },
    /// The anti-entropy timer fired.
    Tick,
    /// A timer fired (`Committed::next_wake_ms`): deadlines are looked at.
    Wake,
}

/// Settings of the loop that are not the engine's.
#[derive(Clone, Debug, Default)]
pub struct LoopConfig {
    /// How long a strict sale short of rights waits for a grant (0: never parks).
    pub deadline_ms: u64,
    /// Allocation rules applied to the own location after every batch.
    pub allocation: Vec<AllocationRule>,
    /// Configured peers: the ones whose key is revoked once they are retired.
    pub peers: Vec<NodeId>,
}

/// A client's answer, released with its token.
pub type Reply<T> = (T, Result<OpReply, OpError>);

/// What a committed batch releases. Only [`NodeLoop::step`] builds one, after
/// [`Storage::commit`] returned `Ok` (or the batch was empty):
/// `#[non_exhaustive]` keeps other crates from building one.
#[derive(Debug)]
#[non_exhaustive]
pub struct Committed<T> {
    /// Answers to the clients, in the order the operations were decided.
    pub replies: Vec<Reply<T>>,
    /// Frames for peers (length-prefixed, as the transport writes them), in order.
    pub frames: Vec<(NodeId, Vec<u8>)>,
    /// The batch as it was committed (rows carry their change-feed numbers).
    pub batch: Batch,
    /// Retired peers whose key must be refused from now on (each once).
    pub revoke: Vec<NodeId>,
    /// The digest hellos carry from now on, when it changed.
    pub hello_digest: Option<HelloDigest>,
    /// Peers that broke the protocol: their connection is dropped.
    pub disconnect: Vec<(NodeId, String)>,
    /// When the driver must wake the loop with [`Input::Wake`] at the latest
    /// (the earliest parked-sale deadline or reservation expiry), if ever.
    pub next_wake_ms: Option<u64>,
}

/// Why a batch was not committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// `Storage::commit` failed.
    Storage(StorageError),
    /// Applying a frame from `peer` panicked: the engine may hold half a
    /// change. Nothing of the batch was committed; the peer must be blocked.
    Panic { peer: NodeId, what: String },
}

/// A batch that did not commit: nothing is released, every caller gets an
/// error (the parked sales too). The driver must reopen the engine from its
/// store and hand it to [`NodeLoop::replace_engine`].
#[derive(Debug)]
pub struct Failed<T> {
    pub cause: Failure,
    /// Error answers only (an operation that had succeeded answers 503).
    pub replies: Vec<Reply<T>>,
    /// Indices in `replies` of operations that had succeeded before the
    /// failure: their effect may or may not be durable (a crash in the
    /// middle of the commit).
    pub in_doubt: Vec<usize>,
    /// Peers that broke the protocol in this batch: their connection is dropped.
    pub disconnect: Vec<(NodeId, String)>,
}

/// A batch executed and flushed, not yet durable: `batch` goes to
/// [`commit_batch`], `held` waits for [`NodeLoop::release`].
#[derive(Debug)]
pub struct Executed<T> {
    pub batch: InFlight,
    pub held: Held<T>,
}

/// A batch on its way to storage (only [`NodeLoop::execute`] builds one).
#[derive(Debug)]
#[non_exhaustive]
pub struct InFlight {
    /// The loop's number of the batch (1, 2, … in execution order).
    pub number: u64,
    pub batch: Batch,
}

/// Proof that a batch is durable: only [`commit_batch`] builds one, after
/// [`Storage::commit`] returned `Ok` (or for an empty batch, which has nothing
/// to write).
#[derive(Debug)]
#[non_exhaustive]
pub struct Durable {
    pub number: u64,
    pub batch: Batch,
}

/// A batch whose commit failed (nothing of it is stored).
#[derive(Debug)]
pub struct CommitError {
    pub number: u64,
    pub error: StorageError,
}

/// Writes one executed batch durably; the only way to a [`Durable`]. Runs on
/// whatever thread the driver commits on (it touches only `store`).
pub fn commit_batch<S: Storage>(store: &mut S, b: InFlight) -> Result<Durable, CommitError> {
    let InFlight { number, batch } = b;
    if !batch.is_empty() {
        if let Err(error) = store.commit(&batch) {
            return Err(CommitError { number, error });
        }
    }
    Ok(Durable { number, batch })
}

/// What an executed batch releases once it is durable. Opaque: only
/// [`NodeLoop::release`] (with the batch's [`Durable`]) or
/// [`NodeLoop::fail_in_flight`] open it.
#[derive(Debug)]
pub struct Held<T> {
    number: u64,
    replies: Vec<Reply<T>>,
    frames: Vec<(NodeId, Vec<u8>)>,
    disconnect: Vec<(NodeId, String)>,
    /// The engine's digest after this batch (`None`: unchanged by it).
    digest: Option<HelloDigest>,
    /// Node tags retired as of this batch.
    retired: Vec<crate::ids::NodeTag>,
    /// The highest change-feed number of this batch's rows.
    seq_max: u64,
    /// Client keys recorded by this batch (dropped from the in-flight
    /// records once it is released or failed).
    idem_keys: Vec<String>,
}

impl<T> Held<T> {
    /// The loop's number of the batch.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// Client answers the batch holds.
    pub fn replies_len(&self) -> usize {
        self.replies.len()
    }
}

/// The outcome of one step.
// One per batch, moved once: boxing the larger variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Step<T> {
    Committed(Committed<T>),
    Failed(Failed<T>),
}

/// The loop's state around the engine: connections, parked callers,
/// change-feed numbering, revoked keys, the hello digest.
pub struct NodeLoop<T> {
    engine: Engine,
    cfg: LoopConfig,
    /// Current connection id per peer (a `PeerDown` of an older one is ignored).
    conns: BTreeMap<NodeId, u64>,
    /// Callers of sales parked while rights are requested: ticket → token.
    parked: BTreeMap<u64, T>,
    revoked: BTreeSet<NodeId>,
    /// Last change-feed number given to a row.
    seq_max: u64,
    hello_digest: Option<HelloDigest>,
    /// Peer input refused outside the engine's count (protocol violations,
    /// panics) and by engines replaced since start.
    rejected: BTreeMap<&'static str, u64>,
    frame_hook: Option<fn(NodeId)>,
    /// Number of the last batch executed, and of the last released: batches
    /// in between are in flight (executed, commit not yet confirmed).
    executed: u64,
    released: u64,
    /// Change-feed number of the last released (durable) row.
    seq_durable: u64,
    /// Idempotency records of batches in flight, by client key (with the
    /// batch's number): a retry arriving meanwhile is answered from them, as
    /// it would be from storage once the batch is durable.
    in_flight_idem: BTreeMap<String, (u64, IdemRecord)>,
}

/// Batches executed and not yet released, at most: one committing while the
/// next executes (a deeper pipeline adds latency and nothing on two cores).
pub const IN_FLIGHT_MAX: u64 = 2;

/// Peer events (frames, connection changes) one batch takes at most when
/// requests may be waiting behind them (see [`SyncBudget`]). Before the
/// budget, one batch took up to 2,048 queued frames and a sale or a read
/// waited behind all of them (benchmark row 5: `GET /api/documents`
/// answered after 26–366 s while a new node synced).
pub const SYNC_FRAMES_PER_BATCH_MAX: usize = 256;
/// Frame bytes (as received, before inflating) one batch takes at most,
/// whatever the pace. One event is always taken, however large (a frame is
/// at most `wire::FRAME_BYTES_MAX`), so that peer input always progresses.
pub const SYNC_BYTES_PER_BATCH_MAX: usize = 1 << 20;
/// The byte budget never falls below this (a few frames of sync messages):
/// a slow batch (a loaded machine) must not leave one tiny frame a batch.
pub const SYNC_BYTES_PER_BATCH_MIN: usize = 4 * 1024;
/// The byte budget of the first batch, before any cost is measured.
pub const SYNC_BYTES_PER_BATCH_START: usize = 16 * 1024;
/// What one event weighs in the budget at least: a connection event or a
/// frame of a few bytes (a digest, an acknowledgement) still costs a
/// lookup and a message; 64 bytes a frame puts 256 of them in one batch.
pub const SYNC_EVENT_BYTES_MIN: usize = 64;
/// How long applying one batch's peer events should take: what a request
/// arriving meanwhile waits, at most, beyond its own batch (plus the
/// commit). The cost of a frame varies a thousandfold (a digest: a few
/// microseconds; a bundle of changes that rewrites hundreds of rows:
/// milliseconds), and follows its size far better than the count of frames
/// (measured on the end-to-end test `tests/priority.rs`: 2 KB frames of 375
/// rows each, 10–20 ms apiece in a debug build; 30-byte digests, nothing):
/// the byte budget follows the measured cost per byte ([`SyncPace`]). Each
/// batch also costs a commit (milliseconds): 25 ms keeps that overhead small.
pub const SYNC_BATCH_TARGET_US: u64 = 25_000;

/// What a peer event of `bytes` weighs in a [`SyncBudget`].
pub fn event_weight(bytes: usize) -> usize {
    bytes.max(SYNC_EVENT_BYTES_MIN)
}

/// The share of one batch given to peer input. A driver fills a batch from
/// two queues: every waiting client request first (operations, queries,
/// timers — up to its own bound), then peer events while the budget admits
/// them; an event not admitted waits, first in line, for the next batch (so
/// each peer's events keep their order). Requests never wait behind more
/// than one budget of sync work, and sync work never starves: every batch
/// admits at least one peer event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncBudget {
    bytes_max: usize,
    frames: usize,
    bytes: usize,
}

impl SyncBudget {
    /// The budget of one batch: `bytes_max` of event weight (clamped to
    /// [`SYNC_BYTES_PER_BATCH_MIN`]..=[`SYNC_BYTES_PER_BATCH_MAX`]), at most
    /// [`SYNC_FRAMES_PER_BATCH_MAX`] events.
    pub fn new(bytes_max: usize) -> SyncBudget {
        SyncBudget {
            bytes_max: bytes_max.clamp(SYNC_BYTES_PER_BATCH_MIN, SYNC_BYTES_PER_BATCH_MAX),
            frames: 0,
            bytes: 0,
        }
    }

    /// Whether one more peer event of `bytes` (0 for a connection event)
    /// goes into this batch; counts it when it does. The first event of a
    /// batch is always admitted.
    pub fn admit(&mut self, bytes: usize) -> bool {
        let w = event_weight(bytes);
        let first = self.frames == 0;
        if !first
            && (self.frames >= SYNC_FRAMES_PER_BATCH_MAX
                || self.bytes.saturating_add(w) > self.bytes_max)
        {
            return false;
        }
        self.frames += 1;
        self.bytes = self.bytes.saturating_add(w);
        true
    }

    /// Peer events admitted so far.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Their weight ([`event_weight`] summed).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// How much peer input a batch takes, following what it costs: after each
/// batch with peer events the driver reports their weight and how long
/// applying the batch took; the next byte budget is the weight that takes
/// [`SYNC_BATCH_TARGET_US`] at that cost — at once when it is smaller, at
/// most doubling when it is larger (one cheap batch does not open the gate
/// to a flood of expensive frames). Pure: the time is the driver's figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncPace {
    bytes_max: usize,
}

impl Default for SyncPace {
    fn default() -> Self {
        SyncPace::new()
    }
}

impl SyncPace {
    /// Starts at [`SYNC_BYTES_PER_BATCH_START`]: the cost is not known yet.
    pub const fn new() -> SyncPace {
        SyncPace {
            bytes_max: SYNC_BYTES_PER_BATCH_START,
        }
    }

    /// The budget of the next batch.
    pub fn budget(&self) -> SyncBudget {
        SyncBudget::new(self.bytes_max)
    }

    /// The next batch's byte budget.
    pub fn bytes_max(&self) -> usize {
        self.bytes_max
    }

    /// A batch whose peer events weighed `bytes` ([`SyncBudget::bytes`];
    /// 0: it had none) took `took_us` to execute.
    pub fn observe(&mut self, bytes: usize, took_us: u64) {
        if bytes == 0 {
            return;
        }
        let fit = (SYNC_BATCH_TARGET_US as u128 * bytes as u128 / took_us.max(1) as u128)
            .min(usize::MAX as u128) as usize;
        let grown = self.bytes_max.saturating_mul(2);
        self.bytes_max = fit
            .min(grown)
            .clamp(SYNC_BYTES_PER_BATCH_MIN, SYNC_BYTES_PER_BATCH_MAX);
    }
}

/// Initial capacity of a step's reply list: a hint, not a limit (a step
/// answers at most what its caller put in, which the driver bounds).
const REPLIES_PREALLOC: usize = 64;

impl<T> NodeLoop<T> {
    /// A loop around an opened engine. `seq_max` is the highest change-feed
    /// number persisted (rows numbered from there on). Run one `step` with no
    /// inputs before serving: it persists what opening produced.
    pub fn new(engine: Engine, cfg: LoopConfig, seq_max: u64) -> NodeLoop<T> {
        NodeLoop {
            engine,
            cfg,
            conns: BTreeMap::new(),
            parked: BTreeMap::new(),
            revoked: BTreeSet::new(),
            seq_max,
            hello_digest: None,
            rejected: BTreeMap::new(),
            frame_hook: None,
            executed: 0,
            released: 0,
            seq_durable: seq_max,
            in_flight_idem: BTreeMap::new(),
        }
    }

    /// Batches executed whose commit is not yet confirmed.
    pub fn in_flight(&self) -> u64 {
        self.executed - self.released
    }

    /// The engine, for reads between steps.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Applies one peer frame between steps (the simulator's hostile member
    /// checks what the engine refuses). Whatever it changes is persisted,
    /// and whatever it queues for peers released, only by the next step's
    /// commit, like everything else.
    pub fn receive_between_steps(
        &mut self,
        peer: NodeId,
        body: &[u8],
        now: u64,
    ) -> Result<(), String> {
        self.engine.receive(peer, body, now)
    }

    /// A hook run before every peer frame is applied, inside the panic guard
    /// (test fault injection).
    pub fn set_frame_hook(&mut self, hook: fn(NodeId)) {
        self.frame_hook = Some(hook);
    }

    /// The digest hellos carry (of committed state), once the first step committed.
    pub fn hello_digest(&self) -> Option<HelloDigest> {
        self.hello_digest
    }

    /// Peers with a current connection.
    pub fn connections(&self) -> &BTreeMap<NodeId, u64> {
        &self.conns
    }

    /// Peer input refused, by reason: the loop's own count plus the engine's.
    pub fn rejected(&self) -> BTreeMap<&'static str, u64> {
        let mut all = self.rejected.clone();
        for (k, v) in &self.engine.stats.rejected_by_reason {
            *all.entry(k).or_default() += v;
        }
        all
    }

    /// Callers still waiting for a parked sale.
    pub fn parked_len(&self) -> usize {
        self.parked.len()
    }

    /// Takes the tokens of the parked sales (their process is gone: a crash).
    pub fn take_parked(&mut self) -> Vec<T> {
        std::mem::take(&mut self.parked).into_values().collect()
    }

    /// After a failed step: the engine reopened from the store replaces the
    /// old one (returned), and the connections still open start new sessions.
    pub fn replace_engine<S: Storage>(
        &mut self,
        engine: Engine,
        store: &mut S,
        now: u64,
    ) -> Engine {
        // Batches executed by the old engine and not released are gone
        // (`fail_in_flight` answered them): numbering goes on from what is durable.
        self.executed = self.released;
        self.seq_max = self.seq_durable;
        self.in_flight_idem.clear();
        let mut old = std::mem::replace(&mut self.engine, engine);
        // The connections stay up: what peers sent over them stays received.
        self.engine.adopt_received_certs(&mut old);
        for (k, v) in &old.stats.rejected_by_reason {
            *self.rejected.entry(k).or_default() += v;
        }
        let peers: Vec<NodeId> = self.conns.keys().copied().collect();
        for peer in peers {
            let states = store.sync_states(&peer).unwrap_or_default();
            self.engine.peer_up(peer, states, now);
        }
        self.hello_digest = Some(self.engine.hello_digest());
        old
    }

    /// At shutdown: ends every session and persists their sync states.
    pub fn close<S: Storage>(mut self, store: &mut S, now: u64) -> Result<(), StorageError> {
        if self.in_flight() != 0 {
            // A driver must settle every batch first; after a failed commit
            // whose engine could not be reopened the batches are gone.
            return Err(StorageError("closed with a batch in flight".into()));
        }
        for peer in self.engine.connected_peers() {
            self.engine.peer_down(peer);
        }
        let batch = self.engine.flush(now);
        if batch.is_empty() {
            return Ok(());
        }
        store.commit(&batch)
    }

    /// One batch: execute `inputs` in order, then parked sales, allocation and
    /// expiry; flush, number rows, commit; release only after the commit.
    /// The three parts of a pipelined driver, run back to back.
    pub fn step<S: Storage>(&mut self, store: &mut S, inputs: Vec<Input<T>>, now: u64) -> Step<T> {
        assert_eq!(self.in_flight(), 0, "step with a batch in flight");
        let Executed { batch, held } = match self.execute(store, inputs, now) {
            Ok(e) => e,
            Err(f) => return Step::Failed(f),
        };
        match commit_batch(store, batch) {
            Ok(durable) => Step::Committed(self.release(held, durable)),
            Err(e) => Step::Failed(self.fail_in_flight(Failure::Storage(e.error), vec![held])),
        }
    }

    /// Executes one batch up to its flush (no storage write): `inputs` in
    /// order, then parked sales, allocation and expiry; rows numbered. What
    /// it releases waits in the returned [`Held`] for the batch's [`Durable`].
    /// At most [`IN_FLIGHT_MAX`] batches may be executed and not released.
    /// `Err`: applying a peer's frame panicked; nothing of this batch will
    /// commit (batches in flight before it are unaffected: release them,
    /// then reopen the engine).
    // One per batch, moved once: boxing the failure would only add an allocation.
    #[allow(clippy::result_large_err)]
    pub fn execute<S: Storage>(
        &mut self,
        store: &mut S,
        inputs: Vec<Input<T>>,
        now: u64,
    ) -> Result<Executed<T>, Failed<T>> {
        assert!(
            self.in_flight() < IN_FLIGHT_MAX,
            "more than IN_FLIGHT_MAX batches executed and not released"
        );
        self.engine.set_batch_in_flight(self.in_flight() > 0);
        let mut replies: Vec<Reply<T>> = Vec::with_capacity(REPLIES_PREALLOC.min(inputs.len()));
        let mut disconnect: Vec<(NodeId, String)> = Vec::new();
        // Set when applying a peer's frame panicked: the engine's memory may
        // hold half a change, so nothing of this batch is committed.
        let mut poisoned: Option<(NodeId, String)> = None;
        // Client keys of operations that succeeded in this step with no
        // record in storage: their records must be in this step's batch.
        let mut idem_due: Vec<String> = Vec::new();
        for input in inputs {
            match input {
                Input::Op(op, token) => {
                    self.submit(store, op, token, now, &mut replies, &mut idem_due)
                }
                Input::Frame { .. } | Input::PeerUp { .. } | Input::PeerDown { .. }
                    if poisoned.is_some() =>
                {
                    // The engine is reopened after this batch; the sessions restart.
                }
                Input::PeerUp { peer, conn, digest } => {
                    if self.conns.insert(peer, conn).is_some() {
                        self.engine.peer_down(peer);
                    }
                    tracing::debug!(peer = %peer.hex(), "session started");
                    let states = store.sync_states(&peer).unwrap_or_default();
                    self.engine.peer_up_with_digest(peer, states, digest, now);
                }
                Input::PeerDown { peer, conn } => {
                    if self.conns.get(&peer) == Some(&conn) {
                        self.conns.remove(&peer);
                        self.engine.peer_down(peer);
                        tracing::info!(peer = %peer.hex(), "peer disconnected");
                    }
                }
                Input::Frame { peer, conn, body } => {
                    if self.conns.get(&peer) != Some(&conn) {
                        continue;
                    }
                    match self.receive(peer, &body, now) {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(peer = %peer.hex(), error = %e, "protocol violation; disconnecting the peer");
                            *self.rejected.entry("protocol_violation").or_default() += 1;
                            self.conns.remove(&peer);
                            self.engine.peer_down(peer);
                            disconnect.push((peer, e));
                        }
                        Err(what) => {
                            *self.rejected.entry("panic").or_default() += 1;
                            self.conns.remove(&peer);
                            poisoned = Some((peer, what));
                        }
                    }
                }
                Input::Tick => self.engine.tick(now),
                Input::Wake => {}
            }
        }
        if let Some((peer, what)) = poisoned {
            return Err(self.fail(
                Failure::Panic { peer, what },
                replies,
                Vec::new(),
                disconnect,
            ));
        }
        // Grants that arrived in this batch may let parked sales through.
        self.poll_parked(store, now, &mut replies);
        self.engine.allocate(&self.cfg.allocation, now);
        self.engine.expire_reservations(now);
        self.engine.settle_ownerless_imports(now);
        let seq_max = &mut self.seq_max;
        // Nothing is written here: the frames `Engine::commit` hands over stay
        // in the `Held` until this batch's `Durable` comes back.
        let staged = self.engine.commit(now, |batch| {
            // The engine drains its idempotency records from a hash map: sorted,
            // the storage I/O sequence is the same on every run (the simulator).
            batch.idem.sort_by(|a, b| a.0.cmp(&b.0));
            // Invariant (DESIGN §5.4, exactly once): an operation's idempotency
            // record is committed in the same batch as its effects, so that a
            // retry after a crash finds the record exactly when the effect is
            // durable.
            if cfg!(debug_assertions) {
                let recorded: BTreeSet<&str> =
                    batch.idem.iter().map(|(k, _)| k.as_str()).collect();
                for k in &idem_due {
                    debug_assert!(
                        recorded.contains(k.as_str()),
                        "invariant exactly-once: an operation succeeded without its idempotency record in its batch"
                    );
                }
            }
            // Rows are numbered for the change feed here; a failed batch's
            // numbers are given again (`replace_engine`).
            for (_, row) in batch.rows.iter_mut() {
                *seq_max += 1;
                row.seq = *seq_max;
            }
            Ok::<(), std::convert::Infallible>(())
        });
        let Ok(Released { batch, frames, .. }) = staged;
        self.executed += 1;
        let number = self.executed;
        let mut idem_keys = Vec::with_capacity(batch.idem.len());
        for (k, r) in &batch.idem {
            self.in_flight_idem.insert(k.clone(), (number, r.clone()));
            idem_keys.push(k.clone());
        }
        let digest = if !batch.is_empty() || self.hello_digest.is_none() {
            Some(self.engine.hello_digest())
        } else {
            None
        };
        let held = Held {
            number,
            replies,
            frames,
            disconnect,
            digest,
            retired: self.engine.retired_tags(),
            seq_max: self.seq_max,
            idem_keys,
        };
        Ok(Executed {
            batch: InFlight { number, batch },
            held,
        })
    }

    /// Releases a batch whose commit returned: `durable` must be the proof of
    /// the batch `held` came from, and the batch the next one in order.
    pub fn release(&mut self, held: Held<T>, durable: Durable) -> Committed<T> {
        assert_eq!(
            held.number, durable.number,
            "a batch released with another batch's proof"
        );
        assert_eq!(
            held.number,
            self.released + 1,
            "batches released out of order"
        );
        self.released = held.number;
        self.seq_durable = held.seq_max;
        for k in &held.idem_keys {
            // A later batch in flight may hold a newer record of the same key.
            if self
                .in_flight_idem
                .get(k)
                .is_some_and(|(n, _)| *n == held.number)
            {
                self.in_flight_idem.remove(k);
            }
        }
        let mut hello_digest = None;
        if let Some(d) = held.digest {
            if self.hello_digest != Some(d) {
                self.hello_digest = Some(d);
                hello_digest = Some(d);
            }
        }
        // A retired node's key is refused from now on.
        let mut revoke = Vec::new();
        for tag in held.retired {
            for p in self.cfg.peers.iter().filter(|p| p.tag() == tag) {
                if self.revoked.insert(*p) {
                    tracing::warn!(peer = %p.hex(), "peer was retired; refusing its key");
                    revoke.push(*p);
                }
            }
        }
        Committed {
            replies: held.replies,
            frames: held.frames,
            batch: durable.batch,
            revoke,
            hello_digest,
            disconnect: held.disconnect,
            next_wake_ms: self.next_wake_ms(),
        }
    }

    /// A commit failed: `held` are the batch that failed then every later
    /// batch in flight, in order. Nothing of them is released; every answer
    /// is an error (the parked sales' too). Only the failed batch's
    /// successes are in doubt: later batches never reached storage. The
    /// driver then reopens the engine ([`NodeLoop::replace_engine`]).
    pub fn fail_in_flight(&mut self, cause: Failure, held: Vec<Held<T>>) -> Failed<T> {
        let mut replies = Vec::new();
        let mut later = Vec::new();
        let mut disconnect = Vec::new();
        // Every batch executed and not released is answered here: none is in
        // flight any more, whether or not the engine can be reopened.
        let released = self.released;
        self.executed = released;
        for (i, h) in held.into_iter().enumerate() {
            debug_assert_eq!(
                h.number,
                released + 1 + i as u64,
                "failed batches out of order"
            );
            if i == 0 {
                replies = h.replies;
            } else {
                later.extend(h.replies);
            }
            disconnect.extend(h.disconnect);
        }
        self.fail(cause, replies, later, disconnect)
    }

    /// The earliest time the loop has something to decide without input.
    pub fn next_wake_ms(&self) -> Option<u64> {
        let parked = self.engine.next_deadline();
        let expiry = self.engine.views.expiring.iter().next().map(|e| e.0);
        match (parked, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn submit<S: Storage>(
        &mut self,
        store: &mut S,
        op: Op,
        token: T,
        now: u64,
        replies: &mut Vec<Reply<T>>,
        idem_due: &mut Vec<String>,
    ) {
        // The idempotency record is read first: a storage error must not look
        // like "never seen" and let a retry apply twice.
        let prior = match op.client_key().map(|k| self.idem(store, &k)) {
            Some(Err(e)) => {
                tracing::error!(error = %e, "cannot read an idempotency record");
                let msg = "storage error reading the request's earlier result; retry";
                replies.push((token, Err(OpError::Unavailable(msg.into()))));
                return;
            }
            Some(Ok(r)) => r,
            None => None,
        };
        let idem = |_: &str| prior.clone();
        // Only debug builds check the records (see `step`).
        let key = if cfg!(debug_assertions) {
            op.client_key()
        } else {
            None
        };
        match self.engine.submit(op, now, self.cfg.deadline_ms, &idem) {
            Submit::Done(r) => {
                if let (Ok(_), Some(k), None) = (&r, key, &prior) {
                    idem_due.push(k);
                }
                replies.push((token, r))
            }
            Submit::Parked(ticket) => {
                // A new ticket replaces an orphan with the same number (an
                // engine replaced since): that caller gets the shutdown answer.
                if let Some(old) = self.parked.insert(ticket, token) {
                    replies.push((
                        old,
                        Err(OpError::Unavailable("the node is shutting down".into())),
                    ));
                }
            }
        }
    }

    /// A client key's record: from a batch in flight (not yet readable from
    /// storage), else from storage.
    fn idem<S: Storage>(
        &self,
        store: &mut S,
        key: &str,
    ) -> Result<Option<IdemRecord>, StorageError> {
        match self.in_flight_idem.get(key) {
            Some((_, r)) => Ok(Some(r.clone())),
            None => store.idem(key),
        }
    }

    /// Retries parked sales. Their idempotency records are read through the
    /// store first; when a read fails they stay parked until a later step.
    fn poll_parked<S: Storage>(&mut self, store: &mut S, now: u64, replies: &mut Vec<Reply<T>>) {
        let keys = self.engine.parked_keys();
        if keys.is_empty() {
            return;
        }
        let mut records: BTreeMap<String, IdemRecord> = BTreeMap::new();
        for k in keys {
            match self.idem(store, &k) {
                Ok(Some(r)) => {
                    records.insert(k, r);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot read an idempotency record; parked sales wait");
                    return;
                }
            }
        }
        let idem = |k: &str| records.get(k).cloned();
        for (ticket, r) in self.engine.poll_parked(now, &idem) {
            if let Some(token) = self.parked.remove(&ticket) {
                replies.push((token, r));
            }
        }
    }

    /// Applies a peer's frame behind a panic guard: `Err` holds the panic's
    /// message (the last line of defence against input that got past
    /// validation and made Automerge, or our code, panic).
    fn receive(
        &mut self,
        peer: NodeId,
        body: &[u8],
        now: u64,
    ) -> Result<Result<(), String>, String> {
        let hook = self.frame_hook;
        let engine = &mut self.engine;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Some(h) = hook {
                h(peer);
            }
            engine.receive(peer, body, now)
        }))
        .map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into())
        })
    }

    /// `replies`: of the batch that failed (successes in doubt); `later`: of
    /// batches after it that never reached storage.
    fn fail(
        &mut self,
        cause: Failure,
        replies: Vec<Reply<T>>,
        later: Vec<Reply<T>>,
        disconnect: Vec<(NodeId, String)>,
    ) -> Failed<T> {
        let mut out = Vec::with_capacity(replies.len() + later.len() + self.parked.len());
        let mut in_doubt = Vec::new();
        let n_failed = replies.len();
        for (i, (token, r)) in replies.into_iter().chain(later).enumerate() {
            let r = match r {
                Ok(_) => {
                    if i < n_failed {
                        in_doubt.push(i);
                    }
                    Err(OpError::Unavailable(
                        "the write could not be made durable (storage error); retry".into(),
                    ))
                }
                Err(e) => Err(e),
            };
            out.push((token, r));
        }
        // Sales that waited for rights belong to the engine being replaced.
        for token in std::mem::take(&mut self.parked).into_values() {
            out.push((
                token,
                Err(OpError::Unavailable("storage error; retry".into())),
            ));
        }
        Failed {
            cause,
            replies: out,
            in_doubt,
            disconnect,
        }
    }
}
