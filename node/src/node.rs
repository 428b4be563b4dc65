//! A running node: the engine thread (group commit), transport and shared read state.
//!
//! The engine runs on one dedicated OS thread. Everything that changes state —
//! client operations, frames from peers, peer up/down, anti-entropy ticks —
//! arrives as a [`Cmd`] on one bounded channel. The thread drains up to
//! [`BATCH_OPS_MAX`] commands and runs them as one
//! [`storemesh_protocol::step::NodeLoop::step`] (the same function the
//! simulator runs): it executes them, commits ONE redb transaction
//! (`Durability::Immediate`) through [`NodeStorage`], and only the committed
//! outcome lets the thread answer the callers, publish the changed rows to
//! readers and hand frames to the transport.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use storemesh_protocol::engine::{Engine, EngineConfig, Policy};
use storemesh_protocol::ids::NodeId;
use storemesh_protocol::ops::{IdemRecord, Op, OpError, OpReply};
use storemesh_protocol::step::{Failure, Input, LoopConfig, NodeLoop, Step, Storage, StorageError};
use storemesh_protocol::views::StockRow;
use storemesh_protocol::wire::{Hello, PROTOCOL_VERSION};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, PeerConfig};
use crate::identity::Identity;
use crate::store::Store;
use crate::transport::{PeerEntry, Transport, TransportConfig, TransportEvent};

/// Commands drained into one group commit, at most.
pub const BATCH_OPS_MAX: usize = 2048;
/// The engine is woken for a deadline at most this often (a clock that
/// reads a deadline as still ahead cannot make the timer spin).
pub const WAKE_MIN_MS: u64 = 5;
/// With nothing to wake for, the wake timer only waits for the engine's next
/// answer; this is how long it sleeps between looks (any length works).
const WAKE_IDLE: Duration = Duration::from_secs(3600);
/// Commands waiting for the engine thread, at most (backpressure on HTTP).
pub const CMD_QUEUE_MAX: usize = 8192;
/// The data file is rewritten after a customer erasure at most this often
/// (the copy reads and writes the whole file: about a second per 100 MB, on
/// a thread of its own — see [`Scrub`]).
pub const SCRUB_INTERVAL: Duration = Duration::from_secs(60);

/// A rewrite of the data file in progress (after a customer erasure, so that
/// the erased key's bytes leave the file's freed pages). The engine thread
/// takes a snapshot ([`Store::scrub_begin`]), a thread of its own copies it
/// into a fresh file while the engine keeps answering and committing (the
/// store keeps those batches), and once the copy is done the engine thread
/// replays them into it and swaps the files ([`Store::scrub_finish`]): the
/// engine waits only for the replay and the swap, not for the copy.
struct Scrub {
    thread: std::thread::JoinHandle<anyhow::Result<crate::store::ScrubCopy>>,
    started: Instant,
}

impl Scrub {
    fn start(store: &Store, cmd: mpsc::Sender<Cmd>) -> anyhow::Result<Scrub> {
        let job = store.scrub_begin()?;
        let thread = std::thread::Builder::new()
            .name("scrub".into())
            .spawn(move || {
                #[cfg(feature = "failpoints")]
                failpoints::scrub_gate();
                let r = job.copy();
                // A wake-up only: with a full queue the engine is busy and
                // looks after its next batch anyway.
                let _ = cmd.try_send(Cmd::ScrubCopied);
                r
            });
        match thread {
            Ok(thread) => Ok(Scrub {
                thread,
                started: Instant::now(),
            }),
            Err(e) => {
                store.scrub_clear();
                Err(e).context("cannot start the thread that rewrites the data file")
            }
        }
    }

    /// Finishes the rewrite if its copy is done: `Ok(another_due)`, else
    /// the rewrite back.
    fn finish_if_copied(self, store: &Store) -> Result<bool, Scrub> {
        if !self.thread.is_finished() {
            return Err(self);
        }
        let copied = self.started.elapsed();
        let copy = match self.thread.join() {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                store.scrub_clear();
                tracing::error!(error = %format!("{e:#}"), "cannot copy the data file after an erasure; trying again later");
                return Ok(true);
            }
            Err(_) => {
                store.scrub_clear();
                tracing::error!("the copy of the data file panicked; trying again later");
                return Ok(true);
            }
        };
        let t = Instant::now();
        match store.scrub_finish(copy) {
            Ok(crate::store::ScrubOutcome::Done {
                replayed,
                erased_meanwhile,
            }) => {
                tracing::info!(
                    copy_ms = copied.as_millis() as u64,
                    swap_ms = t.elapsed().as_millis() as u64,
                    replayed,
                    "data file rewritten after a customer erasure"
                );
                #[cfg(feature = "failpoints")]
                failpoints::scrub_done();
                Ok(erased_meanwhile)
            }
            Ok(crate::store::ScrubOutcome::Abandoned(why)) => {
                tracing::warn!(reason = %why, "rewrite of the data file given up; trying again later");
                Ok(true)
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot rewrite the data file after an erasure; trying again later");
                Ok(true)
            }
        }
    }

    /// Stops the copy (shutdown): the snapshot must not outlive the store.
    fn cancel(self, store: &Store) {
        store.scrub_abandon("the node is stopping");
        #[cfg(feature = "failpoints")]
        failpoints::release_scrub();
        let _ = self.thread.join();
        store.scrub_clear();
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub type Query = Box<dyn FnOnce(&Engine) + Send>;

pub enum Cmd {
    Op(Op, oneshot::Sender<Result<OpReply, OpError>>),
    Query(Query),
    Net(TransportEvent),
    Tick,
    /// Wakes the engine to decide parked sales whose deadline passed.
    Wake,
    /// Wakes the engine: the copy of a data-file rewrite finished.
    ScrubCopied,
    Shutdown(oneshot::Sender<()>),
}

/// What HTTP readers see: committed state only.
#[derive(Default)]
pub struct ReadState {
    pub rows: HashMap<u64, BTreeMap<String, StockRow>>,
    /// location → (owner node name, policy, IANA time zone).
    pub locations: BTreeMap<String, (String, String, String)>,
    /// location → unix ms this node last heard from that location's node.
    pub last_heard: BTreeMap<String, u64>,
    pub synced: bool,
    pub ready: bool,
    pub as_of_ms: u64,
    /// Change feed: node-local sequence → (product, location) whose latest change it is.
    pub by_seq: BTreeMap<u64, (u64, String)>,
    pub seq_max: u64,
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
    pub webhooks: crate::webhooks::Registry,
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

/// A started node (used by `run`, the demo and the end-to-end tests).
pub struct NodeHandle {
    pub shared: Arc<Shared>,
    pub transport: Transport,
    pub http_addr: std::net::SocketAddr,
    pub quic_addr: std::net::SocketAddr,
    http_shutdown: Option<oneshot::Sender<()>>,
    http_task: Option<tokio::task::JoinHandle<()>>,
    engine_thread: Option<std::thread::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    webhooks: Option<crate::webhooks::Service>,
}

fn engine_config(cfg: &Config, node_id: NodeId) -> EngineConfig {
    EngineConfig {
        node_id,
        name: cfg.name.clone(),
        location: cfg.location.clone(),
        role: cfg.role.as_str().to_string(),
        policy: match cfg.policy {
            crate::config::Policy::Relaxed => Policy::Relaxed,
            crate::config::Policy::Strict => Policy::Strict,
        },
        buckets: cfg.buckets,
        loyalty_points_per_unit: cfg.loyalty.points_per_unit,
        timezone: Some(cfg.timezone.clone()),
    }
}

pub fn db_path(dir: &Path) -> PathBuf {
    dir.join("storemesh.redb")
}

/// Meta key set once this node's own pre-signing history is certified.
const HISTORY_CERTIFIED_KEY: &str = "history_certified";

/// Opens an engine from the store: loads every document, rebuilds the views.
fn open_engine(
    cfg: &Config,
    node_id: NodeId,
    store: &Arc<Store>,
    key_der: &[u8],
) -> anyhow::Result<Engine> {
    let mut engine = Engine::new(engine_config(cfg, node_id), rand::random());
    engine.set_entropy(rand::random());
    engine.set_signing(
        Box::new(crate::signing::NodeSigner::from_pkcs8(key_der)?),
        Box::new(crate::signing::NodeVerifier),
    );
    engine.set_cert_archive(Box::new(crate::signing::StoreArchive(store.clone())));
    for p in &cfg.peers {
        engine.add_configured_peer(&p.name, p.id);
        if let Some(loc) = &p.location {
            engine.bind_peer_location(loc, p.id);
        }
    }
    let admins: Vec<NodeId> = cfg
        .administrators
        .iter()
        .filter_map(|a| cfg.administrator_id(a, Some(node_id)))
        .collect();
    engine.set_administrators(&admins);
    engine.load_keys(
        store
            .load_keys()
            .context("cannot load the customer key store")?,
    );
    store
        .for_each_doc(|d| {
            engine
                .load_doc_with_index(&d.id, &d.parts, d.heads_log, d.index.as_deref())
                .map_err(|e| anyhow::anyhow!("stored document {} is damaged: {e}", d.id))
        })
        .context("cannot load documents")?;
    engine.load_intros(
        store
            .load_intros()
            .context("cannot load the introductions")?,
    );
    // History written before protocol 7 has no certificates: this node
    // certifies its own changes once (stored with the first batch; the meta
    // key is set once that batch committed).
    if store.get_meta(HISTORY_CERTIFIED_KEY)?.is_none() {
        let n = engine.certify_own_history();
        if n > 0 {
            tracing::info!(
                changes = n,
                "certified this node's changes written before signing"
            );
        }
    }
    engine.finish_open();
    Ok(engine)
}

impl NodeHandle {
    /// Starts a node from its data directory. Returns once HTTP and QUIC listen.
    pub async fn start(dir: &Path) -> anyhow::Result<NodeHandle> {
        let cfg = Config::load(dir)?;
        let identity = Identity::load(dir)?;
        let node_id = identity.node_id;
        let store = Store::open(&db_path(dir))?;
        match store.get_meta("node_id")? {
            Some(v) if v != node_id.hex().as_bytes() => anyhow::bail!(
                "the database in {} belongs to another node identity; refusing to start",
                dir.display()
            ),
            Some(_) => {}
            None => store.set_meta("node_id", node_id.hex().as_bytes())?,
        }
        // Reads are served from the persisted view before documents load.
        let mut read = ReadState::default();
        for ((p, l), row) in store.load_rows()? {
            read.seq_max = read.seq_max.max(row.seq);
            read.by_seq.insert(row.seq, (p, l.clone()));
            read.rows.entry(p).or_default().insert(l, row);
        }
        let http_addr = cfg.http_socket()?;
        let quic_addr = cfg.quic_socket()?;
        // A bad certificate or key stops the start before anything listens.
        let tls = cfg
            .api
            .tls
            .as_ref()
            .map(|t| t.server_config(dir))
            .transpose()?;
        let listener = tokio::net::TcpListener::bind(http_addr)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen for HTTP on {http_addr}: {}",
                    crate::config::io_message(&e)
                )
            })?;
        let http_addr = listener.local_addr()?;
        let (cmd_tx, cmd_rx) = mpsc::channel(CMD_QUEUE_MAX);
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            node_id,
            read: RwLock::new(read),
            peers: RwLock::new(
                cfg.peers
                    .iter()
                    .map(|p| (p.id, PeerStatus::default()))
                    .collect(),
            ),
            cmd: cmd_tx.clone(),
            metrics: Metrics::default(),
            shutting_down: AtomicBool::new(false),
            changes: tokio::sync::broadcast::channel(1024).0,
            webhooks: crate::webhooks::Registry::default(),
            http: Arc::default(),
            fault: RwLock::new(None),
            rejected: RwLock::default(),
        });
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: node_id.hex(),
            name: cfg.name.clone(),
            buckets: cfg.buckets,
            nonce: rand::random(),
            // Set by the engine thread once the documents are loaded.
            digest: None,
        };
        let peers: Vec<PeerEntry> = cfg.peers.iter().filter_map(peer_entry).collect();
        // The engine signs its batches with the identity key (checked here,
        // before anything listens).
        let key_der = identity.key_der.clone();
        crate::signing::NodeSigner::from_pkcs8(&key_der)?;
        let mut tcfg = TransportConfig::new(identity, quic_addr, peers, hello);
        tcfg.keep_alive = Duration::from_millis(cfg.sync.keep_alive_ms);
        tcfg.idle_timeout = Duration::from_millis(cfg.sync.idle_timeout_ms);
        tcfg.reconnect_min = Duration::from_millis(cfg.sync.reconnect_min_ms);
        tcfg.reconnect_max = Duration::from_millis(cfg.sync.reconnect_max_ms);
        tcfg.connect_timeout = Duration::from_millis(cfg.sync.connect_timeout_ms);
        let (ev_tx, mut ev_rx) = mpsc::channel(CMD_QUEUE_MAX);
        let transport = Transport::start(tcfg, ev_tx).await?;
        let quic_addr = transport.local_addr();
        let mut tasks = Vec::new();
        // Transport events → engine commands.
        let fwd = cmd_tx.clone();
        let sh = shared.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(ev) = ev_rx.recv().await {
                if let TransportEvent::Refused { .. } = &ev {
                    sh.metrics
                        .refused_connections
                        .fetch_add(1, Ordering::Relaxed);
                }
                if fwd.send(Cmd::Net(ev)).await.is_err() {
                    break;
                }
            }
        }));
        // Parked sales' deadlines and reservations' expiry: the engine says
        // when it must be woken next (`Committed::next_wake_ms`).
        let (wake_tx, wake_rx) = tokio::sync::watch::channel(None);
        tasks.push(tokio::spawn(wake_timer(
            shared.clone(),
            wake_rx,
            cmd_tx.clone(),
        )));
        // Anti-entropy ticks.
        let tick_tx = cmd_tx.clone();
        let every = Duration::from_millis(cfg.sync.anti_entropy_ms.max(100));
        tasks.push(tokio::spawn(async move {
            let mut iv = tokio::time::interval(every);
            iv.tick().await;
            loop {
                iv.tick().await;
                if tick_tx.send(Cmd::Tick).await.is_err() {
                    break;
                }
            }
        }));
        let sh = shared.clone();
        let tr = transport.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let engine_thread = std::thread::Builder::new()
            .name(format!("engine-{}", cfg.name))
            .spawn(move || engine_loop(sh, store, tr, cmd_rx, ready_tx, wake_tx, key_der))
            .context("cannot start the engine thread")?;
        // Serve HTTP at once: reads come from the persisted view while the
        // documents load; writes wait in the queue until the engine is ready.
        let app = crate::dashboard::wrap(crate::api::router(shared.clone()), shared.clone());
        let (http_stop, http_stop_rx) = oneshot::channel::<()>();
        let limits = crate::http::HttpLimits::from_config(&cfg.api);
        let http_stats = shared.http.clone();
        let http_task = tokio::spawn(crate::http::serve(
            listener,
            tls,
            app,
            limits,
            http_stats,
            http_stop_rx,
        ));
        // Wait until documents are loaded (or loading failed).
        let ready = tokio::task::spawn_blocking(move || ready_rx.recv())
            .await
            .context("engine start")?
            .map_err(|_| anyhow::anyhow!("the engine thread stopped while loading"));
        if let Err(e) = ready.and_then(|r| r) {
            let _ = http_stop.send(());
            let _ = http_task.await;
            transport.shutdown().await;
            return Err(e);
        }
        let webhooks = match crate::webhooks::start(dir, shared.clone()) {
            Ok(w) => w,
            Err(e) => {
                let _ = http_stop.send(());
                let _ = http_task.await;
                let (tx, rx) = oneshot::channel();
                if shared.cmd.send(Cmd::Shutdown(tx)).await.is_ok() {
                    let _ = rx.await;
                }
                transport.shutdown().await;
                return Err(e);
            }
        };
        tracing::info!(name = %cfg.name, node_id = %node_id.hex(), http = %http_addr, quic = %quic_addr, "node started");
        Ok(NodeHandle {
            shared,
            transport,
            http_addr,
            quic_addr,
            http_shutdown: Some(http_stop),
            http_task: Some(http_task),
            engine_thread: Some(engine_thread),
            tasks,
            webhooks,
        })
    }

    /// Cuts (or restores) this node's links to every configured peer.
    pub fn set_partitioned(&self, cut: bool) {
        for p in &self.shared.cfg.peers {
            self.transport.set_blocked(p.id, cut);
        }
    }

    /// Graceful shutdown: stop accepting HTTP, finish in-flight commits, close
    /// QUIC connections cleanly.
    pub async fn shutdown(mut self) {
        self.shared.shutting_down.store(true, Ordering::Relaxed);
        if let Some(w) = self.webhooks.take() {
            w.stop().await;
        }
        if let Some(tx) = self.http_shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.http_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let (tx, rx) = oneshot::channel();
        if self.shared.cmd.send(Cmd::Shutdown(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
        }
        if let Some(t) = self.engine_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        self.transport.shutdown().await;
        for t in self.tasks.drain(..) {
            t.abort();
        }
        tracing::info!(name = %self.shared.cfg.name, "node stopped");
    }
}

pub fn peer_entry(p: &PeerConfig) -> Option<PeerEntry> {
    match p.socket_addr() {
        Some(addr) => Some(PeerEntry {
            name: p.name.clone(),
            id: p.id,
            addr,
        }),
        None => {
            tracing::warn!(peer = %p.name, addr = %p.addr, "peer address does not resolve; skipping it");
            None
        }
    }
}

/// A caller's answer channel: the loop's reply token.
type Reply = oneshot::Sender<Result<OpReply, OpError>>;

/// The redb store as the loop's storage (commit times go to the metrics).
struct NodeStorage<'a> {
    store: &'a Store,
    metrics: &'a Metrics,
    /// Time of the last commit (logged with batches that carry sync traffic).
    commit_us: u64,
}

impl Storage for NodeStorage<'_> {
    fn idem(&mut self, key: &str) -> Result<Option<IdemRecord>, StorageError> {
        self.store
            .idem(key)
            .map_err(|e| StorageError(format!("{e:#}")))
    }

    fn sync_states(&mut self, peer: &NodeId) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        self.store
            .sync_states(peer)
            .map_err(|e| StorageError(format!("{e:#}")))
    }

    fn commit(&mut self, batch: &storemesh_protocol::Batch) -> Result<(), StorageError> {
        let t = Instant::now();
        let r = self.store.commit(batch);
        let us = t.elapsed().as_micros() as u64;
        self.commit_us = us;
        let m = self.metrics;
        m.commits.fetch_add(1, Ordering::Relaxed);
        m.commit_us_total.fetch_add(us, Ordering::Relaxed);
        m.commit_us_last.store(us, Ordering::Relaxed);
        r.map_err(|e| {
            m.commit_failures.fetch_add(1, Ordering::Relaxed);
            StorageError(format!("{e:#}"))
        })
    }
}

fn loop_config(cfg: &Config) -> LoopConfig {
    LoopConfig {
        deadline_ms: cfg.rebalance.deadline_ms,
        allocation: cfg
            .allocation
            .iter()
            .map(|a| storemesh_protocol::rebalance::AllocationRule {
                to: a.to.clone(),
                share_percent: a.share_percent,
                max_units: a.max_units,
            })
            .collect(),
        peers: cfg.peers.iter().map(|p| p.id).collect(),
    }
}

/// Sends `Cmd::Wake` when the loop asked to be woken (`Committed::next_wake_ms`,
/// node clock): a parked sale's deadline or a reservation's expiry.
async fn wake_timer(
    shared: Arc<Shared>,
    mut next: tokio::sync::watch::Receiver<Option<u64>>,
    wake_tx: mpsc::Sender<Cmd>,
) {
    loop {
        let at = *next.borrow_and_update();
        let sleep = match at {
            Some(at) => {
                let ms = at.saturating_sub(shared.now_ms()).max(WAKE_MIN_MS);
                tokio::time::sleep(Duration::from_millis(ms))
            }
            // Nothing to wake for: wait for the next change only.
            None => tokio::time::sleep(WAKE_IDLE),
        };
        tokio::select! {
            changed = next.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = sleep => {
                if at.is_none() {
                    continue;
                }
                // A full queue means the engine is busy and will look anyway.
                if let Err(mpsc::error::TrySendError::Closed(_)) = wake_tx.try_send(Cmd::Wake) {
                    break;
                }
                // Wait for the engine's next answer before sleeping again.
                if next.changed().await.is_err() {
                    break;
                }
            }
        }
    }
}

fn engine_loop(
    shared: Arc<Shared>,
    store: Store,
    transport: Transport,
    mut rx: mpsc::Receiver<Cmd>,
    ready: std::sync::mpsc::Sender<anyhow::Result<()>>,
    wake: tokio::sync::watch::Sender<Option<u64>>,
    key_der: Vec<u8>,
) {
    let cfg = shared.cfg.clone();
    // Shared with the engine's certificate archive (reads only).
    let store = Arc::new(store);
    let engine = match open_engine(&cfg, shared.node_id, &store, &key_der) {
        Ok(e) => e,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let seq_max = shared.read.read().map(|r| r.seq_max).unwrap_or(0);
    let mut node: NodeLoop<Reply> = NodeLoop::new(engine, loop_config(&cfg), seq_max);
    #[cfg(feature = "failpoints")]
    node.set_frame_hook(failpoints::on_frame);
    let mut storage = NodeStorage {
        store: &store,
        metrics: &shared.metrics,
        commit_us: 0,
    };
    // Persist what opening produced (the directory entry) before serving.
    match node.step(&mut storage, Vec::new(), shared.now_ms()) {
        Step::Committed(c) => {
            publish(&shared, node.engine(), &c.batch.rows);
            if let Err(e) = store.set_meta(HISTORY_CERTIFIED_KEY, b"7") {
                tracing::warn!(error = %format!("{e:#}"), "cannot record that the history is certified");
            }
            // Our hellos carry the digest of what is durable, so that an
            // in-sync reconnect is the two hellos and nothing else.
            transport.set_hello_digest(node.hello_digest());
            let _ = wake.send(c.next_wake_ms);
        }
        Step::Failed(f) => {
            let _ = ready.send(Err(anyhow::anyhow!(
                "cannot write to the database: {:?}",
                f.cause
            )));
            return;
        }
    }
    {
        let mut r = shared.read.write().unwrap_or_else(|p| p.into_inner());
        r.ready = true;
    }
    let _ = ready.send(Ok(()));
    let mut shutdown_ack: Option<oneshot::Sender<()>> = None;
    let mut cmds: Vec<Cmd> = Vec::with_capacity(BATCH_OPS_MAX);
    // A customer erasure committed since the last rewrite of the data file.
    let mut scrub_due = false;
    let mut last_scrub: Option<Instant> = None;
    let mut scrub: Option<Scrub> = None;
    loop {
        cmds.clear();
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        cmds.push(first);
        while cmds.len() < BATCH_OPS_MAX {
            match rx.try_recv() {
                Ok(c) => cmds.push(c),
                Err(_) => break,
            }
        }
        let now = shared.now_ms();
        let mut inputs: Vec<Input<Reply>> = Vec::with_capacity(cmds.len());
        let mut queries: Vec<Query> = Vec::new();
        // Inbound budget of the frames in this batch, given back once applied.
        let mut budgets: Vec<crate::transport::FrameBudget> = Vec::new();
        let mut n_ops = 0u64;
        let mut n_frames_in = 0u64;
        let started = Instant::now();
        for c in cmds.drain(..) {
            match c {
                Cmd::Op(op, reply) => {
                    n_ops += 1;
                    inputs.push(Input::Op(op, reply));
                }
                Cmd::Wake => inputs.push(Input::Wake),
                // Looked at after the batch.
                Cmd::ScrubCopied => {}
                Cmd::Query(q) => queries.push(q),
                Cmd::Net(ev) => match ev {
                    TransportEvent::PeerUp {
                        peer,
                        conn_id,
                        name,
                        hello,
                    } => {
                        tracing::info!(peer = %name, "peer connected");
                        inputs.push(Input::PeerUp {
                            peer,
                            conn: conn_id,
                            digest: hello.digest,
                        });
                    }
                    TransportEvent::PeerDown {
                        peer,
                        conn_id,
                        reason,
                    } => {
                        tracing::debug!(peer = %peer.hex(), reason, "connection ended");
                        inputs.push(Input::PeerDown {
                            peer,
                            conn: conn_id,
                        });
                    }
                    TransportEvent::Frame {
                        peer,
                        conn_id,
                        body,
                        budget,
                    } => {
                        n_frames_in += 1;
                        budgets.push(budget);
                        inputs.push(Input::Frame {
                            peer,
                            conn: conn_id,
                            body,
                        });
                    }
                    TransportEvent::Refused {
                        addr,
                        node_id,
                        reason,
                    } => {
                        tracing::warn!(%addr, node_id = node_id.as_deref().unwrap_or("?"), reason, "connection refused");
                    }
                },
                Cmd::Tick => inputs.push(Input::Tick),
                Cmd::Shutdown(ack) => shutdown_ack = Some(ack),
            }
        }
        shared
            .metrics
            .batch_ops_last
            .store(n_ops, Ordering::Relaxed);
        storage.commit_us = 0;
        match node.step(&mut storage, inputs, now) {
            Step::Committed(c) => {
                drop(budgets);
                for (peer, _) in &c.disconnect {
                    // Drop the connection; the supervisor dials again with backoff.
                    transport.reconnect(*peer, "protocol violation");
                }
                if c.batch
                    .keys
                    .iter()
                    .any(|(_, e)| matches!(e, storemesh_protocol::crypto::KeyEntry::Erased))
                {
                    scrub_due = true;
                }
                publish(&shared, node.engine(), &c.batch.rows);
                if let Some(d) = c.hello_digest {
                    transport.set_hello_digest(Some(d));
                }
                for (tx, r) in c.replies {
                    let _ = tx.send(r);
                }
                if n_frames_in > 0 || !c.frames.is_empty() {
                    tracing::debug!(
                        ops = n_ops,
                        frames_in = n_frames_in,
                        frames_out = c.frames.len(),
                        docs_written = c.batch.docs.len(),
                        took_us = started.elapsed().as_micros() as u64,
                        commit_us = storage.commit_us,
                        "engine batch with sync traffic"
                    );
                }
                send_frames(&transport, c.frames);
                for peer in c.revoke {
                    transport.revoke(peer);
                }
                let _ = wake.send(c.next_wake_ms);
            }
            Step::Failed(f) => {
                drop(budgets);
                for (peer, _) in &f.disconnect {
                    transport.reconnect(*peer, "protocol violation");
                }
                match &f.cause {
                    Failure::Storage(e) => {
                        tracing::error!(error = %e, "commit failed; reloading documents from disk");
                    }
                    Failure::Panic { peer, what } => {
                        let name = shared
                            .cfg
                            .peer_by_id(peer)
                            .map_or_else(|| peer.hex(), |p| p.name.clone());
                        tracing::error!(peer = %name, panic = %what, "applying a peer's message panicked; blocking the peer and reloading documents from disk");
                        transport.set_blocked(*peer, true);
                        let mut fault = shared.fault.write().unwrap_or_else(|p| p.into_inner());
                        *fault = Some(format!(
                            "a message from peer {name} made the engine fail ({what}); the peer is blocked until this node restarts"
                        ));
                    }
                }
                for (tx, r) in f.replies {
                    let _ = tx.send(r);
                }
                // The in-memory documents may hold changes that never reached disk.
                match open_engine(&cfg, shared.node_id, &store, &key_der) {
                    Ok(e) => {
                        node.replace_engine(e, &mut storage, now);
                        transport.set_hello_digest(node.hello_digest());
                        let _ = wake.send(node.next_wake_ms());
                    }
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "cannot reload documents; stopping the engine");
                        break;
                    }
                }
            }
        }
        // An erased customer's key must not survive in the file's freed
        // pages: rewrite the file once the answers are out (at most every
        // SCRUB_INTERVAL). The copy runs on its own thread; this thread
        // only starts it and, once it is done, replays and swaps.
        if let Some(s) = scrub.take() {
            match s.finish_if_copied(&store) {
                Ok(again) => scrub_due |= again,
                Err(s) => scrub = Some(s),
            }
        }
        if scrub.is_none() && scrub_due && last_scrub.is_none_or(|t| t.elapsed() >= SCRUB_INTERVAL)
        {
            scrub_due = false;
            last_scrub = Some(Instant::now());
            match Scrub::start(&store, shared.cmd.clone()) {
                Ok(s) => scrub = Some(s),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot rewrite the data file after an erasure")
                }
            }
        }
        sync_stats(&shared, node.engine());
        {
            let all: BTreeMap<String, u64> = node
                .rejected()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            *shared.rejected.write().unwrap_or_else(|p| p.into_inner()) = all;
        }
        for q in queries {
            q(node.engine());
        }
        if let Some(ack) = shutdown_ack.take() {
            let _ = ack.send(());
            break;
        }
    }
    if let Some(s) = scrub.take() {
        s.cancel(&store);
    }
    // Persist sync states of connections still open.
    if let Err(e) = node.close(&mut storage, shared.now_ms()) {
        tracing::warn!(error = %e, "final commit failed");
    }
}

/// Hands committed frames to the transport. A lost sync frame would leave the
/// peer's session waiting (or a split message corrupt): a peer whose queue is
/// full is reconnected and gets nothing more of this batch.
fn send_frames(transport: &Transport, frames: Vec<(NodeId, Vec<u8>)>) {
    let mut overflowed: Vec<NodeId> = Vec::new();
    for (peer, frame) in frames {
        if overflowed.contains(&peer) {
            continue;
        }
        match transport.send(peer, frame) {
            Ok(()) => {}
            Err(crate::transport::SendError::QueueFull) => {
                tracing::warn!(peer = %peer.hex(), "outbound queue full; reconnecting the peer");
                overflowed.push(peer);
                transport.reconnect(peer, "outbound queue full");
            }
            Err(e) => {
                tracing::debug!(peer = %peer.hex(), error = %e, "frame not sent; the peer is gone")
            }
        }
    }
}

/// Publishes committed rows and derived state to HTTP readers.
fn publish(shared: &Shared, engine: &Engine, rows: &[((u64, String), StockRow)]) {
    let mut r = shared.read.write().unwrap_or_else(|p| p.into_inner());
    let mut events = Vec::with_capacity(rows.len());
    for ((p, l), row) in rows {
        let old = r.rows.entry(*p).or_default().insert(l.clone(), *row);
        if let Some(old) = old {
            r.by_seq.remove(&old.seq);
        }
        r.by_seq.insert(row.seq, (*p, l.clone()));
        r.seq_max = r.seq_max.max(row.seq);
        events.push((*p, l.clone(), *row));
    }
    if !events.is_empty() {
        let _ = shared.changes.send(events);
    }
    r.locations = engine
        .views
        .nodes
        .values()
        .filter_map(|i| {
            let tz = i.timezone.clone().unwrap_or_else(|| "UTC".into());
            i.location
                .clone()
                .map(|l| (l, (i.name.clone(), i.policy.clone(), tz)))
        })
        .collect();
    r.last_heard = engine.last_heard_by_location();
    r.synced = r.synced || engine.synced_with_any() || shared.cfg.peers.is_empty();
    r.as_of_ms = shared.now_ms();
}

fn sync_stats(shared: &Shared, engine: &Engine) {
    let s = &engine.stats;
    let m = &shared.metrics;
    m.ops_ok.store(s.ops_ok, Ordering::Relaxed);
    m.ops_refused.store(s.ops_refused, Ordering::Relaxed);
    m.sync_messages_in
        .store(s.sync_messages_in, Ordering::Relaxed);
    m.sync_messages_out
        .store(s.sync_messages_out, Ordering::Relaxed);
    m.sync_bytes_in.store(s.sync_bytes_in, Ordering::Relaxed);
    m.sync_bytes_out.store(s.sync_bytes_out, Ordering::Relaxed);
    for (a, v) in m
        .sync_bytes_out_by_kind
        .iter()
        .zip(s.sync_bytes_out_by_kind)
    {
        a.store(v, Ordering::Relaxed);
    }
    m.rejected_messages
        .store(s.rejected_messages, Ordering::Relaxed);
    m.forks_detected.store(s.forks_detected, Ordering::Relaxed);
    m.epochs_started.store(s.epochs_started, Ordering::Relaxed);
    m.epochs_joined.store(s.epochs_joined, Ordering::Relaxed);
    let (cold, cold_bytes) = engine.cold_parts();
    m.cold_parts.store(cold as u64, Ordering::Relaxed);
    let certs = engine.cert_figures();
    m.certs_held.store(certs.held as u64, Ordering::Relaxed);
    m.certs_held_bytes
        .store(certs.held_bytes as u64, Ordering::Relaxed);
    m.certs_verified.store(s.certs_verified, Ordering::Relaxed);
    m.cold_part_bytes
        .store(cold_bytes as u64, Ordering::Relaxed);
    let (requests, grants) = engine.rebalance_stats();
    m.rebalance_requests.store(requests, Ordering::Relaxed);
    m.rebalance_grants.store(grants, Ordering::Relaxed);
    m.allocation_grants
        .store(engine.allocation_grants(), Ordering::Relaxed);
    let mut peers = shared.peers.write().unwrap_or_else(|p| p.into_inner());
    for (id, st) in peers.iter_mut() {
        match engine.session(id) {
            Some(sess) => {
                st.connected = true;
                st.synced = sess.synced;
                st.last_sync_ms = sess.last_heard_ms;
                st.bytes_in = sess.bytes_in;
                st.bytes_out = sess.bytes_out;
            }
            None => st.connected = false,
        }
    }
}

/// Test-only fault injection (cargo feature `failpoints`, enabled by the
/// end-to-end tests only): makes applying a peer's next frame panic, as an
/// Automerge assertion on unforeseen input would, to show the node survives it.
#[cfg(feature = "failpoints")]
pub mod failpoints {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Condvar, Mutex};

    use storemesh_protocol::ids::NodeId;

    static PANIC_ON_FRAME_FROM: Mutex<Option<NodeId>> = Mutex::new(None);

    /// The next frame from `peer` (at any node of this process) panics.
    pub fn panic_on_next_frame_from(peer: NodeId) {
        *PANIC_ON_FRAME_FROM
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(peer);
    }

    static SCRUB_HOLD: Mutex<bool> = Mutex::new(false);
    static SCRUB_HELD: AtomicU64 = AtomicU64::new(0);
    static SCRUB_DONE: AtomicU64 = AtomicU64::new(0);
    static SCRUB_CV: Condvar = Condvar::new();

    /// While on, a data-file rewrite that starts waits before its copy
    /// (every node of this process), so a test can work during it.
    pub fn hold_scrub(on: bool) {
        *SCRUB_HOLD.lock().unwrap_or_else(|p| p.into_inner()) = on;
        SCRUB_CV.notify_all();
    }

    /// Rewrites that reached the hold so far.
    pub fn scrubs_held() -> u64 {
        SCRUB_HELD.load(Ordering::SeqCst)
    }

    /// Rewrites that swapped the file in so far.
    pub fn scrubs_done() -> u64 {
        SCRUB_DONE.load(Ordering::SeqCst)
    }

    pub(crate) fn release_scrub() {
        hold_scrub(false);
    }

    pub(crate) fn scrub_gate() {
        let mut on = SCRUB_HOLD.lock().unwrap_or_else(|p| p.into_inner());
        if *on {
            SCRUB_HELD.fetch_add(1, Ordering::SeqCst);
        }
        while *on {
            on = SCRUB_CV.wait(on).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub(crate) fn scrub_done() {
        SCRUB_DONE.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn on_frame(peer: NodeId) {
        let mut armed = PANIC_ON_FRAME_FROM
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *armed == Some(peer) {
            *armed = None;
            drop(armed);
            panic!(
                "failpoint: applying a frame from peer {} panicked",
                peer.hex()
            );
        }
    }
}
