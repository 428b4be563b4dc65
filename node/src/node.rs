//! A running node: the engine thread (group commit), transport and shared read state.
//!
//! The engine runs on one dedicated OS thread. Everything that changes state
//! arrives on one of two bounded channels: client operations, queries,
//! anti-entropy ticks and timers as a [`Cmd`]; frames from peers and peer
//! up/down as the transport's [`TransportEvent`]s. Requests come first: each
//! batch takes every waiting command (up to [`BATCH_OPS_MAX`]), then peer
//! events only within a budget (`step::SyncBudget`: bytes following their
//! measured cost, [`SyncPace`], and a count), so a sale or a read never waits
//! behind more than about [`storemesh_protocol::step::SYNC_BATCH_TARGET_US`]
//! of sync work while a node syncs or heals. The batch runs as one [`storemesh_protocol::step::NodeLoop::step`]
//! (the same function the simulator runs): it executes them, commits ONE redb
//! transaction (`Durability::Immediate`) through [`NodeStorage`], and only the
//! committed outcome lets the thread answer the callers, publish the changed
//! rows to readers and hand frames to the transport.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use storemesh_protocol::engine::{Engine, EngineConfig, Policy};
use storemesh_protocol::ids::NodeId;
use storemesh_protocol::ops::{Op, OpError, OpReply};
use storemesh_protocol::step::{
    commit_batch, CommitError, Committed, Durable, Executed, Failed, Failure, Held, InFlight,
    Input, LoopConfig, NodeLoop, Step, StorageError, SyncPace,
};
use storemesh_protocol::wire::{Hello, PROTOCOL_VERSION};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, PeerConfig};
use crate::identity::Identity;
use crate::store::Store;
use crate::transport::{PeerEntry, Transport, TransportConfig, TransportEvent};

mod adapters;
#[cfg(feature = "failpoints")]
pub mod failpoints;
mod input;
mod scrub;
mod state;

use adapters::{publish, send_frames, sync_stats, wake_timer, NodeStorage};
use input::{wait_for_input, Next};
use scrub::Scrub;
pub use state::{Metrics, PeerStatus, ReadState, Shared};

/// Commands (client requests, timers) drained into one group commit, at
/// most; peer events are added within a budget (see [`SyncPace`]).
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
/// Set to `1` or `on`, the engine thread executes batch N+1 while batch N
/// commits on the commit thread (pipelined commits); otherwise it waits for
/// each batch's commit before executing the next. Read once at start.
pub const COMMIT_PIPELINE_ENV: &str = "STOREMESH_COMMIT_PIPELINE";

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
    // Cold closed records parts are read back from the store on demand.
    engine.set_part_archive(store.clone());
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
        let store = Arc::new(Store::open(&db_path(dir))?);
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
            read.set_row(p, &l, row);
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
        // Transport events go straight to the engine thread, on their own
        // channel: it serves requests before them (see `EngineLoop::run`).
        let (ev_tx, ev_rx) = mpsc::channel(CMD_QUEUE_MAX);
        let transport = Transport::start(tcfg, ev_tx).await?;
        let quic_addr = transport.local_addr();
        let mut tasks = Vec::new();
        // Parked sales' deadlines and reservations' expiry: the engine says
        // when it must be woken next (`Committed::next_wake_ms`).
        let (wake_tx, wake_rx) = tokio::sync::watch::channel(None);
        tasks.push(tokio::spawn(wake_timer(
            shared.clone(),
            wake_rx,
            cmd_tx.clone(),
        )));
        // Free heap memory back to the system (issue 14: memory bounded
        // while the node runs, not only after a restart).
        tasks.push(tokio::spawn(crate::memory::trim_periodically()));
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
            .spawn(move || engine_loop(sh, store, tr, cmd_rx, ev_rx, ready_tx, wake_tx, key_der))
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
        // Loading read every stored document once; what it freed goes back
        // to the system now, not at the first periodic trim.
        let _ = tokio::task::spawn_blocking(crate::memory::release_free_memory).await;
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

// The thread's whole world, handed over once at its start.
#[allow(clippy::too_many_arguments)]
fn engine_loop(
    shared: Arc<Shared>,
    store: Arc<Store>,
    transport: Transport,
    rx: mpsc::Receiver<Cmd>,
    net: mpsc::Receiver<TransportEvent>,
    ready: std::sync::mpsc::Sender<anyhow::Result<()>>,
    wake: tokio::sync::watch::Sender<Option<u64>>,
    key_der: Vec<u8>,
) {
    let cfg = shared.cfg.clone();
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
    // The commit thread: makes batch N durable while this thread executes
    // batch N+1. It only writes (`commit_batch`); the answers and frames of a
    // batch stay here until its `Durable` comes back.
    std::thread::scope(|scope| {
        let (batch_tx, batch_rx) = std::sync::mpsc::sync_channel::<InFlight>(1);
        let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<Durable, CommitError>>();
        let (store_w, metrics_w) = (&*store, &shared.metrics);
        let writer = std::thread::Builder::new()
            .name(format!("commit-{}", cfg.name))
            .spawn_scoped(scope, move || {
                let mut storage = NodeStorage {
                    store: store_w,
                    metrics: metrics_w,
                    commit_us: 0,
                };
                while let Ok(b) = batch_rx.recv() {
                    if done_tx.send(commit_batch(&mut storage, b)).is_err() {
                        break;
                    }
                }
            });
        if let Err(e) = writer {
            let _ = ready.send(Err(anyhow::anyhow!("cannot start the commit thread: {e}")));
            return;
        }
        {
            let mut r = shared.read.write().unwrap_or_else(|p| p.into_inner());
            r.ready = true;
        }
        let _ = ready.send(Ok(()));
        let lp = EngineLoop {
            shared: &shared,
            store: &store,
            transport: &transport,
            wake: &wake,
            key_der: &key_der,
            node,
            storage,
            scrub_due: false,
            pipeline: std::env::var(COMMIT_PIPELINE_ENV)
                .is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("on")),
            pace: SyncPace::new(),
        };
        lp.run(rx, net, batch_tx, done_rx);
    });
}

/// A batch executed whose commit is running on the commit thread.
struct Pending {
    held: Held<Reply>,
    info: BatchInfo,
}

/// What the debug log and the scrub need to know of a batch once released.
struct BatchInfo {
    n_ops: u64,
    n_frames_in: u64,
    /// Peer events (frames, connections) in it.
    n_peer_events: usize,
    started: Instant,
    /// A customer's key was erased in it (the data file is rewritten later).
    erased: bool,
}

/// The engine thread's state around the loop.
struct EngineLoop<'a> {
    shared: &'a Arc<Shared>,
    store: &'a Arc<Store>,
    transport: &'a Transport,
    wake: &'a tokio::sync::watch::Sender<Option<u64>>,
    /// The identity key the engine signs its batches with (a reopened
    /// engine gets it again).
    key_der: &'a [u8],
    node: NodeLoop<Reply>,
    /// Reads of the loop (idempotency records, sync states); commits go
    /// through the commit thread's own.
    storage: NodeStorage<'a>,
    /// A customer erasure committed since the last rewrite of the data file.
    scrub_due: bool,
    /// Batch N+1 executes while batch N commits (see [`COMMIT_PIPELINE_ENV`]).
    pipeline: bool,
    /// Peer events a batch takes, following what they cost.
    pace: SyncPace,
}

impl EngineLoop<'_> {
    fn run(
        mut self,
        mut rx: mpsc::Receiver<Cmd>,
        mut net: mpsc::Receiver<TransportEvent>,
        batch_tx: std::sync::mpsc::SyncSender<InFlight>,
        done_rx: std::sync::mpsc::Receiver<Result<Durable, CommitError>>,
    ) {
        let shared = self.shared;
        let mut shutdown_ack: Option<oneshot::Sender<()>> = None;
        let mut cmds: Vec<Cmd> = Vec::with_capacity(BATCH_OPS_MAX);
        let mut events: Vec<TransportEvent> = Vec::new();
        // A peer event taken from the channel that did not fit in the last
        // batch's budget: the first of the next one (each peer's order kept).
        let mut carried: Option<TransportEvent> = None;
        let mut last_scrub: Option<Instant> = None;
        let mut scrub: Option<Scrub> = None;
        let mut in_flight: Option<Pending> = None;
        loop {
            cmds.clear();
            events.clear();
            if in_flight.is_none() && carried.is_none() {
                match wait_for_input(&mut rx, &mut net) {
                    Some(Next::Cmd(c)) => cmds.push(c),
                    Some(Next::Net(e)) => carried = Some(e),
                    None => break,
                }
            }
            // Requests first: every one waiting, up to the batch's bound.
            while cmds.len() < BATCH_OPS_MAX {
                match rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
            // Then peer events, within one batch's sync budget.
            let mut share = self.pace.budget();
            loop {
                let ev = match carried.take() {
                    Some(e) => e,
                    None => match net.try_recv() {
                        Ok(e) => e,
                        Err(_) => break,
                    },
                };
                let bytes = match &ev {
                    TransportEvent::Frame { body, .. } => body.len(),
                    _ => 0,
                };
                if !share.admit(bytes) {
                    carried = Some(ev);
                    break;
                }
                events.push(ev);
            }
            if cmds.is_empty() && events.is_empty() {
                // Nothing new while a batch commits: wait for it.
                if let Some(p) = in_flight.take() {
                    if !self.settle(p, &done_rx) {
                        break;
                    }
                }
                continue;
            }
            let now = shared.now_ms();
            let mut inputs: Vec<Input<Reply>> = Vec::with_capacity(cmds.len() + events.len());
            let mut queries: Vec<Query> = Vec::new();
            // Inbound budget of the frames in this batch, given back once applied.
            let mut budgets: Vec<crate::transport::FrameBudget> = Vec::new();
            let mut info = BatchInfo {
                n_ops: 0,
                n_frames_in: 0,
                n_peer_events: share.frames(),
                started: Instant::now(),
                erased: false,
            };
            for c in cmds.drain(..) {
                match c {
                    Cmd::Op(op, reply) => {
                        info.n_ops += 1;
                        inputs.push(Input::Op(op, reply));
                    }
                    Cmd::Wake => inputs.push(Input::Wake),
                    // Looked at after the batch.
                    Cmd::ScrubCopied => {}
                    Cmd::Query(q) => queries.push(q),
                    Cmd::Tick => inputs.push(Input::Tick),
                    Cmd::Shutdown(ack) => shutdown_ack = Some(ack),
                }
            }
            for ev in events.drain(..) {
                match ev {
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
                        info.n_frames_in += 1;
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
                        shared
                            .metrics
                            .refused_connections
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%addr, node_id = node_id.as_deref().unwrap_or("?"), reason, "connection refused");
                    }
                }
            }
            shared
                .metrics
                .batch_ops_last
                .store(info.n_ops, Ordering::Relaxed);
            // Runs while the previous batch commits on the commit thread.
            let executed = self.node.execute(&mut self.storage, inputs, now);
            // What applying this batch cost sets the next one's share of
            // peer input.
            self.pace
                .observe(share.bytes(), info.started.elapsed().as_micros() as u64);
            drop(budgets);
            let mut alive = true;
            match executed {
                Ok(ex) => {
                    info.erased =
                        ex.batch.batch.keys.iter().any(|(_, e)| {
                            matches!(e, storemesh_protocol::crypto::KeyEntry::Erased)
                        });
                    // The previous batch first: batches are released in order.
                    let ex = match in_flight.take() {
                        Some(p) => self.settle_with_later(p, ex, &done_rx),
                        None => Ok(ex),
                    };
                    match ex {
                        Ok(ex) => {
                            // Reads (queries), a shutdown and a data-file
                            // rewrite see only durable state: no pipelining then.
                            let drain = !self.pipeline
                                || !queries.is_empty()
                                || shutdown_ack.is_some()
                                || scrub.is_some()
                                || self.scrub_due;
                            match self.launch(ex, info, &batch_tx, drain) {
                                Launched::Released => {}
                                Launched::InFlight(p) => in_flight = Some(p),
                                Launched::Failed(f) => alive = self.failed(f),
                            }
                        }
                        Err(still) => alive = still,
                    }
                }
                Err(f) => {
                    // A peer's frame made this batch fail: the batch before
                    // it is unaffected, released first; then the engine is reopened.
                    if let Some(p) = in_flight.take() {
                        alive = self.settle(p, &done_rx);
                    }
                    alive = alive && self.failed(f);
                }
            }
            if !alive {
                break;
            }
            if in_flight.is_none() {
                // An erased customer's key must not survive in the file's freed
                // pages: rewrite the file once the answers are out (at most every
                // SCRUB_INTERVAL). The copy runs on its own thread; this thread
                // only starts it and, once it is done, replays and swaps.
                if let Some(s) = scrub.take() {
                    match s.finish_if_copied(self.store) {
                        Ok(again) => self.scrub_due |= again,
                        Err(s) => scrub = Some(s),
                    }
                }
                if scrub.is_none()
                    && self.scrub_due
                    && last_scrub.is_none_or(|t| t.elapsed() >= SCRUB_INTERVAL)
                {
                    self.scrub_due = false;
                    last_scrub = Some(Instant::now());
                    match Scrub::start(self.store, shared.cmd.clone()) {
                        Ok(s) => scrub = Some(s),
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "cannot rewrite the data file after an erasure")
                        }
                    }
                }
                for q in queries.drain(..) {
                    q(self.node.engine());
                }
            }
            sync_stats(shared, self.node.engine());
            {
                let all: BTreeMap<String, u64> = self
                    .node
                    .rejected()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                *shared.rejected.write().unwrap_or_else(|p| p.into_inner()) = all;
            }
            if in_flight.is_none() {
                if let Some(ack) = shutdown_ack.take() {
                    let _ = ack.send(());
                    break;
                }
            }
        }
        if let Some(p) = in_flight.take() {
            self.settle(p, &done_rx);
        }
        if let Some(s) = scrub.take() {
            s.cancel(self.store);
        }
        // Persist sync states of connections still open.
        let EngineLoop {
            node, mut storage, ..
        } = self;
        if let Err(e) = node.close(&mut storage, shared.now_ms()) {
            tracing::warn!(error = %e, "final commit failed");
        }
    }

    /// Waits for the commit of `p` and releases it (or fails it). `false`:
    /// the engine could not be reopened after a failure; the loop stops.
    fn settle(
        &mut self,
        p: Pending,
        done_rx: &std::sync::mpsc::Receiver<Result<Durable, CommitError>>,
    ) -> bool {
        match wait_commit(&p, done_rx) {
            Ok(d) => {
                let c = self.node.release(p.held, d);
                self.committed(c, p.info);
                true
            }
            Err(e) => {
                let f = self
                    .node
                    .fail_in_flight(Failure::Storage(e.error), vec![p.held]);
                self.failed(f)
            }
        }
    }

    /// As [`Self::settle`], with `later` executed after `p`: returned when
    /// `p` was released; when `p` failed, `later` fails with it (nothing of
    /// it reached storage) and `Err` says whether the loop goes on.
    fn settle_with_later(
        &mut self,
        p: Pending,
        later: Executed<Reply>,
        done_rx: &std::sync::mpsc::Receiver<Result<Durable, CommitError>>,
    ) -> Result<Executed<Reply>, bool> {
        match wait_commit(&p, done_rx) {
            Ok(d) => {
                let c = self.node.release(p.held, d);
                self.committed(c, p.info);
                Ok(later)
            }
            Err(e) => {
                let f = self
                    .node
                    .fail_in_flight(Failure::Storage(e.error), vec![p.held, later.held]);
                Err(self.failed(f))
            }
        }
    }

    /// Hands an executed batch to the commit thread (nothing in flight
    /// before it). An empty batch has nothing to write, and with `now` set
    /// the next batch waits for this one anyway: committed on this thread
    /// and released at once.
    fn launch(
        &mut self,
        ex: Executed<Reply>,
        info: BatchInfo,
        batch_tx: &std::sync::mpsc::SyncSender<InFlight>,
        now: bool,
    ) -> Launched {
        debug_assert_eq!(
            self.node.in_flight(),
            1,
            "launch with an earlier batch in flight"
        );
        let Executed { batch, held } = ex;
        if batch.batch.is_empty() || now {
            match commit_batch(&mut self.storage, batch) {
                Ok(d) => {
                    let c = self.node.release(held, d);
                    self.committed(c, info);
                    return Launched::Released;
                }
                Err(e) => {
                    let f = self
                        .node
                        .fail_in_flight(Failure::Storage(e.error), vec![held]);
                    return Launched::Failed(f);
                }
            }
        }
        match batch_tx.send(batch) {
            Ok(()) => Launched::InFlight(Pending { held, info }),
            Err(_) => {
                let error = StorageError("the commit thread stopped".into());
                Launched::Failed(
                    self.node
                        .fail_in_flight(Failure::Storage(error), vec![held]),
                )
            }
        }
    }

    /// A batch is durable: answer, publish, send.
    fn committed(&mut self, c: Committed<Reply>, info: BatchInfo) {
        let (shared, transport) = (self.shared, self.transport);
        for (peer, _) in &c.disconnect {
            // Drop the connection; the supervisor dials again with backoff.
            transport.reconnect(*peer, "protocol violation");
        }
        self.scrub_due |= info.erased;
        publish(shared, self.node.engine(), &c.batch.rows);
        if let Some(d) = c.hello_digest {
            transport.set_hello_digest(Some(d));
        }
        for (tx, r) in c.replies {
            let _ = tx.send(r);
        }
        if info.n_frames_in > 0 || !c.frames.is_empty() {
            tracing::debug!(
                ops = info.n_ops,
                frames_in = info.n_frames_in,
                peer_events = info.n_peer_events,
                next_sync_bytes = self.pace.bytes_max(),
                frames_out = c.frames.len(),
                docs_written = c.batch.docs.len(),
                took_us = info.started.elapsed().as_micros() as u64,
                commit_us = shared.metrics.commit_us_last.load(Ordering::Relaxed),
                "engine batch with sync traffic"
            );
        }
        send_frames(transport, c.frames);
        for peer in c.revoke {
            transport.revoke(peer);
        }
        let _ = self.wake.send(c.next_wake_ms);
    }

    /// A batch failed (nothing of it, nor of any later one, was released):
    /// answer the errors and reopen the engine from the store. `false`: it
    /// could not be reopened; the loop stops.
    fn failed(&mut self, f: Failed<Reply>) -> bool {
        let (shared, transport) = (self.shared, self.transport);
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
        match open_engine(&shared.cfg, shared.node_id, self.store, self.key_der) {
            Ok(e) => {
                self.node
                    .replace_engine(e, &mut self.storage, shared.now_ms());
                transport.set_hello_digest(self.node.hello_digest());
                let _ = self.wake.send(self.node.next_wake_ms());
                true
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot reload documents; stopping the engine");
                false
            }
        }
    }
}

/// What became of an executed batch handed on.
enum Launched {
    /// Empty: released at once.
    Released,
    /// On the commit thread.
    InFlight(Pending),
    /// Its commit failed (or the commit thread is gone).
    Failed(Failed<Reply>),
}

/// The commit thread's answer for `p` (a stopped thread is a failed commit).
fn wait_commit(
    p: &Pending,
    done_rx: &std::sync::mpsc::Receiver<Result<Durable, CommitError>>,
) -> Result<Durable, CommitError> {
    let done = done_rx.recv().unwrap_or_else(|_| {
        Err(CommitError {
            number: p.held.number(),
            error: StorageError("the commit thread stopped".into()),
        })
    });
    if let Err(e) = &done {
        debug_assert_eq!(e.number, p.held.number(), "commit answers out of order");
    }
    done
}
