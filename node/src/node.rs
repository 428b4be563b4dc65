//! A running node: the engine thread (group commit), transport and shared read state.
//!
//! The engine runs on one dedicated OS thread. Everything that changes state
//! arrives on one of two bounded channels: client operations, queries,
//! anti-entropy ticks and timers as a [`Cmd`]; frames from peers and peer
//! up/down as the transport's [`TransportEvent`]s. Requests come first: each
//! batch takes every waiting command (up to [`BATCH_OPS_MAX`]), then peer
//! events only within a budget (`step::SyncBudget`: bytes following their
//! measured cost, [`SyncPace`](storemesh_protocol::step::SyncPace), and a count), so a sale or a read never waits
//! behind more than about [`storemesh_protocol::step::SYNC_BATCH_TARGET_US`]
//! of sync work while a node syncs or heals. The batch runs as one [`storemesh_protocol::step::NodeLoop::step`]
//! (the same function the simulator runs): it executes them, commits ONE redb
//! transaction (`Durability::Immediate`) through [`NodeStorage`], and only the
//! committed outcome lets the thread answer the callers, publish the changed
//! rows to readers and hand frames to the transport.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use storemesh_protocol::engine::{Engine, EngineConfig, Policy};
use storemesh_protocol::ids::NodeId;
use storemesh_protocol::ops::{OpError, OpReply};
use storemesh_protocol::wire::{Hello, PROTOCOL_VERSION};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, PeerConfig};
use crate::identity::Identity;
use crate::state::{Cmd, Metrics, PeerStatus, ReadState, Shared};
use crate::store::Store;
use crate::transport::{PeerEntry, Transport, TransportConfig};

mod adapters;
mod engine_loop;
#[cfg(feature = "failpoints")]
pub mod failpoints;
mod input;
mod scrub;

use adapters::{wake_timer, NodeStorage};
use engine_loop::engine_loop;
use input::Next;
use scrub::Scrub;

/// Commands (client requests, timers) drained into one group commit, at
/// most; peer events are added within a budget (see [`SyncPace`](storemesh_protocol::step::SyncPace)).
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
            .map(|t| crate::https::server_config(t, dir))
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
            webhooks: crate::state::Registry::default(),
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
