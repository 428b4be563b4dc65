//! A running node: the engine thread (group commit), transport and shared read state.
//!
//! The engine runs on one dedicated OS thread. Everything that changes state —
//! client operations, frames from peers, peer up/down, anti-entropy ticks —
//! arrives as a [`Cmd`] on one bounded channel. The thread drains up to
//! [`BATCH_OPS_MAX`] commands, executes them, commits ONE redb transaction
//! (`Durability::Immediate`), and only then answers the callers, publishes the
//! changed rows to readers and hands frames to the transport.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use storemesh_protocol::engine::{Engine, EngineConfig, Policy};
use storemesh_protocol::ids::NodeId;
use storemesh_protocol::ops::{Op, OpError, OpReply};
use storemesh_protocol::rebalance::Submit;
use storemesh_protocol::views::StockRow;
use storemesh_protocol::wire::{Hello, PROTOCOL_VERSION};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, PeerConfig};
use crate::identity::Identity;
use crate::store::Store;
use crate::transport::{PeerEntry, Transport, TransportConfig, TransportEvent};

/// Commands drained into one group commit, at most.
pub const BATCH_OPS_MAX: usize = 2048;
/// Period of the wake-up that decides parked sales (deadline resolution).
pub const WAKE_MS: u64 = 20;
/// Commands waiting for the engine thread, at most (backpressure on HTTP).
pub const CMD_QUEUE_MAX: usize = 8192;
/// The data file is rewritten after a customer erasure at most this often
/// (`Store::scrub` copies the whole file: about a second per 100 MB).
pub const SCRUB_INTERVAL: Duration = Duration::from_secs(60);

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

/// Opens an engine from the store: loads every document, rebuilds the views.
fn open_engine(cfg: &Config, node_id: NodeId, store: &Store) -> anyhow::Result<Engine> {
    let mut engine = Engine::new(engine_config(cfg, node_id), rand::random());
    engine.set_entropy(rand::random());
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
    for d in store.load_docs().context("cannot load documents")? {
        engine
            .load_doc(&d.id, &d.parts, d.heads_log)
            .map_err(|e| anyhow::anyhow!("stored document {} is damaged: {e}", d.id))?;
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
        // Deadlines of sales waiting for a grant are checked this often.
        let wake_tx = cmd_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(WAKE_MS));
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                iv.tick().await;
                // A full queue means the engine is busy and will look anyway.
                match wake_tx.try_send(Cmd::Wake) {
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                    _ => continue,
                }
            }
        }));
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
            .spawn(move || engine_loop(sh, store, tr, cmd_rx, ready_tx))
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

type Pending = (
    oneshot::Sender<Result<OpReply, OpError>>,
    Result<OpReply, OpError>,
);

fn engine_loop(
    shared: Arc<Shared>,
    store: Store,
    transport: Transport,
    mut rx: mpsc::Receiver<Cmd>,
    ready: std::sync::mpsc::Sender<anyhow::Result<()>>,
) {
    let cfg = shared.cfg.clone();
    let mut engine = match open_engine(&cfg, shared.node_id, &store) {
        Ok(e) => e,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    // Persist what opening produced (the directory entry) before serving.
    let mut first = engine.flush(shared.now_ms());
    number_rows(&shared, &mut first);
    if let Err(e) = store.commit(&first) {
        let _ = ready.send(Err(e.context("cannot write to the database")));
        return;
    }
    engine.committed(shared.now_ms());
    publish(&shared, &engine, &first.rows);
    // Our hellos carry the digest of what is durable, so that an in-sync
    // reconnect is the two hellos and nothing else.
    let mut hello_digest = engine.hello_digest();
    transport.set_hello_digest(Some(hello_digest));
    {
        let mut r = shared.read.write().unwrap_or_else(|p| p.into_inner());
        r.ready = true;
    }
    let _ = ready.send(Ok(()));
    // Current connection per peer (PeerDown of an older connection is ignored).
    let mut conns: HashMap<NodeId, u64> = HashMap::new();
    let mut shutdown_ack: Option<oneshot::Sender<()>> = None;
    // Callers of sales parked while rights are requested from peers.
    let mut parked: HashMap<u64, oneshot::Sender<Result<OpReply, OpError>>> = HashMap::new();
    let mut revoked: std::collections::HashSet<NodeId> = std::collections::HashSet::new();
    let deadline_ms = cfg.rebalance.deadline_ms;
    let allocation: Vec<storemesh_protocol::rebalance::AllocationRule> = cfg
        .allocation
        .iter()
        .map(|a| storemesh_protocol::rebalance::AllocationRule {
            to: a.to.clone(),
            share_percent: a.share_percent,
            max_units: a.max_units,
        })
        .collect();
    let mut cmds: Vec<Cmd> = Vec::with_capacity(BATCH_OPS_MAX);
    // Peer input refused outside the engine's own count (protocol
    // violations, panics) and by engines replaced since start.
    let mut node_rejected: BTreeMap<&'static str, u64> = BTreeMap::new();
    // A customer erasure committed since the last rewrite of the data file.
    let mut scrub_due = false;
    let mut last_scrub: Option<Instant> = None;
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
        let mut pending: Vec<Pending> = Vec::new();
        let mut queries: Vec<Query> = Vec::new();
        let mut n_ops = 0u64;
        let mut n_frames_in = 0u64;
        // Time spent applying peers' frames, flushing and committing: logged
        // (debug) for batches with sync traffic, to see where a heal's time goes.
        let mut net_us = 0u64;
        let mut commit_us = 0u64;
        // Set when applying a peer's frame panicked: the engine's memory may
        // hold half a change, so nothing of this batch is committed and the
        // engine is reopened from disk (the commit-failure path).
        let mut poisoned = false;
        let started = Instant::now();
        for c in cmds.drain(..) {
            match c {
                Cmd::Op(op, reply) => {
                    n_ops += 1;
                    // The idempotency record is read first: a storage error must
                    // not look like "never seen" and let a retry apply twice.
                    let prior = match op.client_key().map(|k| store.idem(&k)) {
                        Some(Err(e)) => {
                            tracing::error!(error = %format!("{e:#}"), "cannot read an idempotency record");
                            let msg = "storage error reading the request's earlier result; retry"
                                .to_string();
                            pending.push((reply, Err(OpError::Unavailable(msg))));
                            continue;
                        }
                        Some(Ok(r)) => r,
                        None => None,
                    };
                    let idem = |_: &str| prior.clone();
                    match engine.submit(op, now, deadline_ms, &idem) {
                        Submit::Done(r) => pending.push((reply, r)),
                        Submit::Parked(ticket) => {
                            parked.insert(ticket, reply);
                        }
                    }
                }
                Cmd::Wake => {}
                Cmd::Query(q) => queries.push(q),
                Cmd::Net(ev) => {
                    n_frames_in += u64::from(matches!(ev, TransportEvent::Frame { .. }));
                    if poisoned {
                        // The engine is reopened after this batch; frames
                        // until then are dropped (the sessions restart).
                        continue;
                    }
                    let t = Instant::now();
                    if let Some((peer, what)) = on_net(
                        &mut engine,
                        &store,
                        &transport,
                        &shared,
                        &mut conns,
                        &mut node_rejected,
                        ev,
                        now,
                    ) {
                        poisoned = true;
                        *node_rejected.entry("panic").or_default() += 1;
                        let name = shared
                            .cfg
                            .peer_by_id(&peer)
                            .map_or_else(|| peer.hex(), |p| p.name.clone());
                        tracing::error!(peer = %name, panic = %what, "applying a peer's message panicked; blocking the peer and reloading documents from disk");
                        transport.set_blocked(peer, true);
                        conns.remove(&peer);
                        let mut f = shared.fault.write().unwrap_or_else(|p| p.into_inner());
                        *f = Some(format!(
                            "a message from peer {name} made the engine fail ({what}); the peer is blocked until this node restarts"
                        ));
                    }
                    net_us += t.elapsed().as_micros() as u64;
                }
                Cmd::Tick => engine.tick(now),
                Cmd::Shutdown(ack) => shutdown_ack = Some(ack),
            }
        }
        // Grants that arrived in this batch may let parked sales through.
        for (ticket, r) in engine.poll_parked(now, &|k| store.idem(k).ok().flatten()) {
            if let Some(reply) = parked.remove(&ticket) {
                pending.push((reply, r));
            }
        }
        engine.allocate(&allocation, now);
        engine.expire_reservations(now);
        let t_flush = Instant::now();
        let mut batch = if poisoned {
            storemesh_protocol::Batch::default()
        } else {
            engine.flush(now)
        };
        let flush_us = t_flush.elapsed().as_micros() as u64;
        number_rows(&shared, &mut batch);
        let ok = if poisoned {
            false
        } else if batch.is_empty() {
            true
        } else {
            let t = Instant::now();
            let r = store.commit(&batch);
            let us = t.elapsed().as_micros() as u64;
            commit_us = us;
            shared.metrics.commits.fetch_add(1, Ordering::Relaxed);
            shared
                .metrics
                .commit_us_total
                .fetch_add(us, Ordering::Relaxed);
            shared.metrics.commit_us_last.store(us, Ordering::Relaxed);
            match r {
                Ok(()) => true,
                Err(e) => {
                    shared
                        .metrics
                        .commit_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %format!("{e:#}"), "commit failed; reloading documents from disk");
                    false
                }
            }
        };
        shared
            .metrics
            .batch_ops_last
            .store(n_ops, Ordering::Relaxed);
        if ok {
            if batch
                .keys
                .iter()
                .any(|(_, e)| matches!(e, storemesh_protocol::crypto::KeyEntry::Erased))
            {
                scrub_due = true;
            }
            engine.committed(now);
            publish(&shared, &engine, &batch.rows);
            if !batch.is_empty() {
                let d = engine.hello_digest();
                if d != hello_digest {
                    hello_digest = d;
                    transport.set_hello_digest(Some(d));
                }
            }
            for (tx, r) in pending {
                let _ = tx.send(r);
            }
            let mut overflowed: Vec<NodeId> = Vec::new();
            let outgoing = engine.take_outgoing();
            if n_frames_in > 0 || !outgoing.is_empty() {
                tracing::debug!(
                    ops = n_ops,
                    frames_in = n_frames_in,
                    frames_out = outgoing.len(),
                    docs_written = batch.docs.len(),
                    took_us = started.elapsed().as_micros() as u64,
                    net_us,
                    flush_us,
                    commit_us,
                    "engine batch with sync traffic"
                );
            }
            for (peer, frame) in outgoing {
                if overflowed.contains(&peer) {
                    continue;
                }
                match transport.send(peer, frame) {
                    Ok(()) => {}
                    // A lost sync frame would leave the peer's session waiting (or a
                    // split message corrupt): drop the connection, start clean.
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
        } else {
            for (tx, r) in pending {
                let _ = tx.send(match r {
                    Ok(_) => Err(OpError::Unavailable(
                        "the write could not be made durable (storage error); retry".into(),
                    )),
                    Err(e) => Err(e),
                });
            }
            // The in-memory documents may hold changes that never reached disk.
            match open_engine(&cfg, shared.node_id, &store) {
                Ok(e) => {
                    for (k, v) in &engine.stats.rejected_by_reason {
                        *node_rejected.entry(k).or_default() += v;
                    }
                    engine = e;
                    hello_digest = engine.hello_digest();
                    transport.set_hello_digest(Some(hello_digest));
                    // Sales that waited for rights belonged to the old engine.
                    for (_, reply) in parked.drain() {
                        let _ =
                            reply.send(Err(OpError::Unavailable("storage error; retry".into())));
                    }
                    for peer in conns.keys() {
                        let states = store.sync_states(peer).unwrap_or_default();
                        engine.peer_up(*peer, states, now);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot reload documents; stopping the engine");
                    break;
                }
            }
        }
        // A retired node's key is refused from now on.
        for tag in engine.retired_tags() {
            for p in shared.cfg.peers.iter().filter(|p| p.id.tag() == tag) {
                if revoked.insert(p.id) {
                    tracing::warn!(peer = %p.name, "peer was retired; refusing its key");
                    transport.revoke(p.id);
                }
            }
        }
        // An erased customer's key must not survive in the file's freed
        // pages: rewrite the file once the answers are out (at most every
        // SCRUB_INTERVAL, so a stream of erasures cannot stall the engine).
        if scrub_due && last_scrub.is_none_or(|t| t.elapsed() >= SCRUB_INTERVAL) {
            scrub_due = false;
            last_scrub = Some(Instant::now());
            let t = Instant::now();
            match store.scrub() {
                Ok(()) => tracing::info!(
                    took_ms = t.elapsed().as_millis() as u64,
                    "data file rewritten after a customer erasure"
                ),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot rewrite the data file after an erasure")
                }
            }
        }
        sync_stats(&shared, &engine);
        {
            let mut all: BTreeMap<String, u64> = node_rejected
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect();
            for (k, v) in &engine.stats.rejected_by_reason {
                *all.entry(k.to_string()).or_default() += v;
            }
            *shared.rejected.write().unwrap_or_else(|p| p.into_inner()) = all;
        }
        for q in queries {
            q(&engine);
        }
        if let Some(ack) = shutdown_ack.take() {
            let _ = ack.send(());
            break;
        }
    }
    // Persist sync states of connections still open.
    for peer in engine.connected_peers() {
        engine.peer_down(peer);
    }
    let batch = engine.flush(shared.now_ms());
    if !batch.is_empty() {
        if let Err(e) = store.commit(&batch) {
            tracing::warn!(error = %format!("{e:#}"), "final commit failed");
        }
    }
}

/// Applies one transport event. Returns the peer and the panic message when
/// applying the peer's frame panicked (the engine must then be reopened).
#[allow(clippy::too_many_arguments)]
fn on_net(
    engine: &mut Engine,
    store: &Store,
    transport: &Transport,
    shared: &Shared,
    conns: &mut HashMap<NodeId, u64>,
    rejected: &mut BTreeMap<&'static str, u64>,
    ev: TransportEvent,
    now: u64,
) -> Option<(NodeId, String)> {
    match ev {
        TransportEvent::PeerUp {
            peer,
            conn_id,
            name,
            hello,
        } => {
            if conns.insert(peer, conn_id).is_some() {
                engine.peer_down(peer);
            }
            tracing::info!(peer = %name, "peer connected");
            let states = store.sync_states(&peer).unwrap_or_default();
            engine.peer_up_with_digest(peer, states, hello.digest, now);
        }
        TransportEvent::PeerDown {
            peer,
            conn_id,
            reason,
        } => {
            if conns.get(&peer) == Some(&conn_id) {
                conns.remove(&peer);
                engine.peer_down(peer);
                tracing::info!(peer = %peer.hex(), reason, "peer disconnected");
            }
        }
        TransportEvent::Frame {
            peer,
            conn_id,
            body,
            budget: _budget,
        } => {
            if conns.get(&peer) != Some(&conn_id) {
                return None;
            }
            // The last line of defence: input that got past validation and
            // made Automerge (or our code) panic must not kill the engine
            // thread. The engine may be half-way through a change, so the
            // caller reopens it from disk; the peer is blocked.
            let received = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                #[cfg(feature = "failpoints")]
                failpoints::on_frame(peer);
                engine.receive(peer, &body, now)
            }));
            match received {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(peer = %peer.hex(), error = %e, "protocol violation; disconnecting the peer");
                    *rejected.entry("protocol_violation").or_default() += 1;
                    // Drop the connection; the supervisor dials again with backoff.
                    transport.reconnect(peer, "protocol violation");
                    conns.remove(&peer);
                    engine.peer_down(peer);
                }
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    return Some((peer, what));
                }
            }
        }
        TransportEvent::Refused {
            addr,
            node_id,
            reason,
        } => {
            tracing::warn!(%addr, node_id = node_id.as_deref().unwrap_or("?"), reason, "connection refused");
        }
    }
    let _ = shared;
    None
}

/// Gives every changed row of a batch the next change-feed sequence number
/// (persisted with the row, so cursors survive restarts).
fn number_rows(shared: &Shared, batch: &mut storemesh_protocol::Batch) {
    let mut next = shared.read.read().map(|r| r.seq_max).unwrap_or(0);
    for (_, row) in batch.rows.iter_mut() {
        next += 1;
        row.seq = next;
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
    use std::sync::Mutex;

    use storemesh_protocol::ids::NodeId;

    static PANIC_ON_FRAME_FROM: Mutex<Option<NodeId>> = Mutex::new(None);

    /// The next frame from `peer` (at any node of this process) panics.
    pub fn panic_on_next_frame_from(peer: NodeId) {
        *PANIC_ON_FRAME_FROM
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(peer);
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
