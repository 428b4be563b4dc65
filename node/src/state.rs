//! What the node shares between the engine thread and HTTP: committed read
//! state, peer figures, metrics, the webhooks' status, and the command
//! channel to the engine ([`Cmd`]).
//!
//! Below the HTTP handlers (`api`, `dashboard`) and the webhook service,
//! which all hold an `Arc<Shared>`: it names none of them, only `config` and
//! the accept loop's `http::HttpStats` (`node` builds it and starts the
//! engine thread that answers [`Cmd`]s).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use storemesh_protocol::engine::Engine;
use storemesh_protocol::ids::NodeId;
use storemesh_protocol::ops::{Op, OpError, OpReply};
use storemesh_protocol::views::StockRow;
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, EventKind};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub type Query = Box<dyn FnOnce(&Engine) + Send>;

/// What the engine thread is asked to do, besides peer events (which come
/// on the transport's own channel, behind these).
// One per request, moved once into the channel: boxing the operation would
// only add an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Cmd {
    Op(Op, oneshot::Sender<Result<OpReply, OpError>>),
    Query(Query),
    Tick,
    /// Wakes the engine to decide parked sales whose deadline passed.
    Wake,
    /// Wakes the engine: the copy of a data-file rewrite finished.
    ScrubCopied,
    Shutdown(oneshot::Sender<()>),
}

/// A location's name in the read state: one allocation per location shared
/// by all its rows, instead of a `String` in every row and again in the
/// change feed (2,000,000 pairs at 100,000 products × 20 locations held
/// ~4 million copies of ~8-byte names, ~56 bytes each with their headers).
pub type Loc = Arc<str>;

/// What HTTP readers see: committed state only.
#[derive(Default)]
pub struct ReadState {
    pub rows: HashMap<u64, BTreeMap<Loc, StockRow>>,
    /// location → (owner node name, policy, IANA time zone).
    pub locations: BTreeMap<String, (String, String, String)>,
    /// location → unix ms this node last heard from that location's node.
    pub last_heard: BTreeMap<String, u64>,
    pub synced: bool,
    pub ready: bool,
    pub as_of_ms: u64,
    /// Change feed: node-local sequence → (product, location) whose latest change it is.
    pub by_seq: BTreeMap<u64, (u64, Loc)>,
    pub seq_max: u64,
    /// Every location name the rows use, shared (see [`Loc`]).
    names: std::collections::BTreeSet<Loc>,
}

impl ReadState {
    /// Sets a (product, location)'s row and moves it to the end of the
    /// change feed.
    pub fn set_row(&mut self, product: u64, location: &str, row: StockRow) {
        let loc = match self.names.get(location) {
            Some(l) => l.clone(),
            None => {
                let l: Loc = Arc::from(location);
                self.names.insert(l.clone());
                l
            }
        };
        let old = self
            .rows
            .entry(product)
            .or_default()
            .insert(loc.clone(), row);
        if let Some(old) = old {
            self.by_seq.remove(&old.seq);
        }
        self.by_seq.insert(row.seq, (product, loc));
        self.seq_max = self.seq_max.max(row.seq);
    }
}

/// Per-peer figures for `/api/peers` and metrics.
#[derive(Clone, Debug, Default)]
pub struct PeerStatus {
    pub connected: bool,
    pub synced: bool,
    pub last_sync_ms: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Default)]
pub struct Metrics {
    pub ops_ok: AtomicU64,
    pub ops_refused: AtomicU64,
    pub sync_messages_in: AtomicU64,
    pub sync_messages_out: AtomicU64,
    pub sync_bytes_in: AtomicU64,
    pub sync_bytes_out: AtomicU64,
    /// `sync_bytes_out` by message kind (`storemesh_protocol::sync::MSG_KINDS`).
    pub sync_bytes_out_by_kind: [AtomicU64; storemesh_protocol::sync::MSG_KINDS.len()],
    pub rejected_messages: AtomicU64,
    pub forks_detected: AtomicU64,
    pub epochs_started: AtomicU64,
    pub epochs_joined: AtomicU64,
    pub cold_parts: AtomicU64,
    /// Batch certificates held in memory, their bytes, and signatures checked.
    pub certs_held: AtomicU64,
    pub certs_held_bytes: AtomicU64,
    pub certs_verified: AtomicU64,
    pub cold_part_bytes: AtomicU64,
    pub commits: AtomicU64,
    pub commit_us_total: AtomicU64,
    pub commit_us_last: AtomicU64,
    pub commit_failures: AtomicU64,
    pub refused_connections: AtomicU64,
    pub batch_ops_last: AtomicU64,
    pub rebalance_requests: AtomicU64,
    pub rebalance_grants: AtomicU64,
    pub allocation_grants: AtomicU64,
}

pub struct Shared {
    pub cfg: Config,
    pub node_id: NodeId,
    pub read: RwLock<ReadState>,
    pub peers: RwLock<BTreeMap<NodeId, PeerStatus>>,
    pub cmd: mpsc::Sender<Cmd>,
    pub metrics: Metrics,
    pub shutting_down: AtomicBool,
    /// Live change events for `GET /api/inventory/stream` (committed rows).
    pub changes: tokio::sync::broadcast::Sender<Vec<(u64, String, StockRow)>>,
    /// Status of the `[[webhooks]]` (cursor, lag, last error).
    pub webhooks: Registry,
    /// What the HTTP accept loop counts (`crate::http`).
    pub http: Arc<crate::http::HttpStats>,
    /// Set when the engine caught a fault it could not apply (a panic on a
    /// peer's input): `/healthz` then answers `"status":"degraded"` with it.
    pub fault: RwLock<Option<String>>,
    /// Peer input refused, by reason (`storemesh_rejected_changes_total`).
    pub rejected: RwLock<BTreeMap<String, u64>>,
}

impl Shared {
    /// This node's clock: the host clock plus the configured `clock_offset_ms`.
    pub fn now_ms(&self) -> u64 {
        now_ms().saturating_add_signed(self.cfg.clock_offset_ms)
    }

    /// Runs an operation through the engine thread; answered after its commit.
    pub async fn execute(&self, op: Op) -> Result<OpReply, OpError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(OpError::Unavailable("the node is shutting down".into()));
        }
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Op(op, tx))
            .await
            .map_err(|_| OpError::Unavailable("the node is shutting down".into()))?;
        rx.await
            .map_err(|_| OpError::Unavailable("the node is shutting down".into()))?
    }

    /// Runs a read-only closure on the engine thread between batches.
    pub async fn query<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let q: Query = Box::new(move |e| {
            let _ = tx.send(f(e));
        });
        self.cmd.send(Cmd::Query(q)).await.ok()?;
        rx.await.ok()
    }
}

/// What `GET /api/webhooks` and `/metrics` show of one webhook.
#[derive(Clone, Debug, Default)]
pub struct HookStatus {
    pub events: Vec<EventKind>,
    pub cursor: u64,
    pub last_error: Option<String>,
    pub last_delivery_ms: u64,
    pub batches_delivered: u64,
    pub items_delivered: u64,
    pub failures: u64,
}

/// Shared status of the webhooks (lives in [`Shared`]; the journal writer
/// and the senders of `crate::webhooks` update it).
#[derive(Default)]
pub struct Registry {
    pub(crate) hooks: RwLock<BTreeMap<String, HookStatus>>,
    /// Last journal position written.
    pub(crate) journal_last: AtomicU64,
    /// Change-feed sequence copied into the journal.
    pub(crate) feed_copied: AtomicU64,
}

impl Registry {
    pub(crate) fn update(&self, name: &str, f: impl FnOnce(&mut HookStatus)) {
        let mut g = self.hooks.write().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = g.get_mut(name) {
            f(s);
        }
    }

    /// Events the webhook has not acknowledged: journal entries after its
    /// cursor, plus stock changes not yet copied into the journal.
    pub(crate) fn lag(&self, s: &HookStatus, feed_max: u64) -> u64 {
        let journal = self
            .journal_last
            .load(Ordering::Relaxed)
            .saturating_sub(s.cursor);
        let feed = if s.events.contains(&EventKind::Stock) {
            feed_max.saturating_sub(self.feed_copied.load(Ordering::Relaxed))
        } else {
            0
        };
        journal + feed
    }

    pub(crate) fn snapshot(&self) -> BTreeMap<String, HookStatus> {
        self.hooks.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
