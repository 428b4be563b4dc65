//! The QUIC mesh transport: moves opaque frames between authenticated peers.
//!
//! * One symmetric quinn [`Endpoint`] per node: it accepts and dials on one UDP
//!   socket (4 MiB socket buffers where the OS allows).
//! * Mutual TLS 1.3 with pinned keys: a peer certificate is accepted only if the
//!   SHA-256 of its SubjectPublicKeyInfo is a configured peer's node id (no CA, no
//!   hostname); signatures are checked by rustls with the ring provider, passed
//!   explicitly. Client authentication is mandatory, 0-RTT and session resumption
//!   are off (a resumed session would skip the certificate check).
//! * Application hello: the dialer opens one bidirectional stream and writes its
//!   [`Hello`] frame; the acceptor checks it against the TLS identity and answers
//!   with its own. Only then is the connection up. A TLS 1.3 client sees its
//!   handshake succeed before the server has looked at the client certificate, so
//!   the hello — not the handshake — is what authenticates a connection.
//! * Afterwards every frame flows on that one stream as `u32 BE length | body`.
//!   A length over [`FRAME_BYTES_MAX`] (or zero) disconnects the peer; it is never
//!   allocated.
//! * Exactly one connection per pair of nodes. When both dial at once, the
//!   connection dialled by the lower node id wins, on both sides. A connection
//!   dialled by the same side as the live one replaces it (the dialer only dials
//!   when it believes the old one is gone).
//! * Two live processes with one identity (same node id, different hello nonce)
//!   are refused loudly. Before refusing, the old connection is probed; if it no
//!   longer answers (the peer restarted) the newcomer replaces it.
//! * One supervisor task per configured peer dials with exponential backoff and
//!   jitter while the peer is not connected. A dial that gets no answer is
//!   followed by the next within [`REDIAL_INTERVAL_MAX`] (for
//!   [`FAST_REDIAL_WINDOW`] after the peer stopped answering), so a healed link
//!   is noticed within the connect timeout plus that interval; a peer that
//!   answers with a refusal gets the full configured back-off.
//!
//! Events per peer are totally ordered: a connection's `PeerUp`, its `Frame`s and
//! its `PeerDown` come in that order, and the next connection's `PeerUp` only after
//! the previous connection's `PeerDown`.
//!
//! Call [`Transport::shutdown`] before dropping the last handle: the background
//! tasks hold the endpoint until then.
//!
//! By concern: `tls` (identity and TLS verification), connection arbitration
//! (which of two connections survives, dial back-off: pure functions in
//! `storemesh_protocol::arbitration`, which the simulator runs too), `conn` (the
//! endpoint, the hello, the reader and writer tasks, the dial supervisor),
//! `frames` (framing), `events` (state access and reporting), `tests`.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use quinn::{Connection, Endpoint, VarInt};
use storemesh_protocol::ids::NodeId;
use storemesh_protocol::wire::{Hello, HelloDigest};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::time::{timeout, Instant};
use tracing::{debug, error, info};

use crate::identity::Identity;

mod conn;
mod events;
mod frames;
#[cfg(test)]
mod tests;
mod tls;

use conn::{accept_loop, bind_error, supervise, tune_socket};
use frames::check_outbound_frame;
use tls::{tls_configs, PinnedPeers};

/// ALPN protocol id of the mesh.
pub const ALPN: &[u8] = b"storemesh/1";
/// Bound of each peer's outbound frame queue.
pub const OUTBOUND_QUEUE_FRAMES: usize = 16384;
/// Bytes queued for one peer's connection at most (frames are up to 1 MiB,
/// so the frame count alone allowed 16 GiB): a peer that stops reading is
/// reconnected once its queue holds this much, as when the count is reached.
pub const OUTBOUND_QUEUE_BYTES_MAX: usize = 64 << 20;
/// Bytes of one connection's frames received but not yet applied by the
/// engine, at most: past it the connection's reader waits, and QUIC flow
/// control holds the peer back. A hostile peer cannot fill the node's
/// queues (8,192 slots of up to 1 MiB each) with its frames.
pub const INBOUND_QUEUE_BYTES_MAX: usize = 64 << 20;
/// The inbound budget is counted in KiB (semaphore permits are `u32`).
const INBOUND_KIB_MAX: usize = INBOUND_QUEUE_BYTES_MAX / 1024;
/// Default keep-alive interval (must be shorter than the idle timeout).
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(4);
/// Default idle timeout: a silent peer is declared gone after this long.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Default first reconnect delay.
pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(250);
/// Default largest reconnect delay.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(15);
/// Default time one dial's QUIC/TLS handshake may take before it is abandoned
/// and (after the reconnect delay) started afresh.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// While a configured peer does not answer (a dial got no answer within the
/// connect timeout), the next dial starts at most this long after the last
/// one ended (the back-off between unanswered dials is capped here), instead
/// of after a reconnect delay that grew to `reconnect_max`: a healed link is
/// noticed within the connect timeout plus this interval. Cost, per
/// unreachable peer: one Initial packet (~1.2 KB) per dial.
pub const REDIAL_INTERVAL_MAX: Duration = Duration::from_millis(250);
/// How long after a peer stopped answering the redial wait stays capped at
/// `REDIAL_INTERVAL_MAX`; afterwards unanswered dials follow the configured
/// back-off (up to `reconnect_max`), so a peer that is gone for good (switched
/// off, not yet retired) costs a dial per `reconnect_max`, not one per
/// connect timeout forever.
pub const FAST_REDIAL_WINDOW: Duration = Duration::from_secs(600);

/// Time allowed for the QUIC/TLS handshake of an incoming connection.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for the hello exchange after the handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest hello frame accepted.
const HELLO_BYTES_MAX: usize = 64 * 1024;
/// Requested UDP send and receive buffer size.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// Incoming connections in handshake/hello at once; more are refused.
const PENDING_HANDSHAKES_MAX: usize = 64;
/// Pending handshakes from one source address (IP) at most: a quarter of the
/// slots, so one unauthenticated host cannot hold them all (each for up to
/// `HANDSHAKE_TIMEOUT`) and keep the real peers out. Several nodes on one
/// host (tests, demos on loopback) still fit.
const PENDING_HANDSHAKES_PER_ADDR_MAX: usize = PENDING_HANDSHAKES_MAX / 4;
/// How long a liveness probe of an existing connection may take.
const PROBE_TIMEOUT_MIN: Duration = Duration::from_millis(750);
const PROBE_TIMEOUT_MAX: Duration = Duration::from_secs(2);
/// Shutdown: time for peers to acknowledge the last frames we queued.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);
/// Shutdown: time for the endpoint to drain closed connections.
const IDLE_WAIT_TIMEOUT: Duration = Duration::from_secs(2);
/// After the peer finished its stream (it is shutting down), wait this long for
/// its close before closing ourselves.
const EOF_CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Refused/handshake warnings logged per window before falling back to debug.
const REFUSED_LOGS_PER_WINDOW: u32 = 20;
const REFUSED_LOG_WINDOW: Duration = Duration::from_secs(10);
/// Server name sent in the handshake; certificates are pinned, names never checked.
const SERVER_NAME: &str = "storemesh";

/// Application close codes.
const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_DUPLICATE: u32 = 1;
const CLOSE_CLONED: u32 = 2;
const CLOSE_BAD_HELLO: u32 = 3;
const CLOSE_PROTOCOL: u32 = 4;
const CLOSE_BLOCKED: u32 = 5;
const CLOSE_REPLACED: u32 = 6;
const CLOSE_UNEXPECTED_PEER: u32 = 7;
const CLOSE_GONE: u32 = 8;
/// The connection is dropped to start its sync afresh; dial again.
const CLOSE_RECONNECT: u32 = 9;

/// A configured peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerEntry {
    pub name: String,
    pub id: NodeId,
    pub addr: SocketAddr,
}

/// Everything the transport needs to start.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    pub identity: Identity,
    pub listen: SocketAddr,
    pub peers: Vec<PeerEntry>,
    /// Our hello; `hello.node_id` must be our identity's node id.
    pub hello: Hello,
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// How long one dial's handshake may take. A dial sent into a cut link
    /// only retransmits its Initial packet on QUIC's exponential back-off
    /// (1 s, 2 s, 4 s, ...), so after the link heals it could wait seconds for
    /// its next packet; abandoning it and dialling afresh (within
    /// `REDIAL_INTERVAL_MAX`) bounds that wait.
    pub connect_timeout: Duration,
}

impl TransportConfig {
    /// A config with the default timings.
    pub fn new(
        identity: Identity,
        listen: SocketAddr,
        peers: Vec<PeerEntry>,
        hello: Hello,
    ) -> TransportConfig {
        TransportConfig {
            identity,
            listen,
            peers,
            hello,
            keep_alive: DEFAULT_KEEP_ALIVE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            reconnect_min: DEFAULT_RECONNECT_MIN,
            reconnect_max: DEFAULT_RECONNECT_MAX,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// What the transport reports to its owner.
#[derive(Clone, Debug)]
pub enum TransportEvent {
    /// A connection passed the hello on both sides. `conn_id` is local to this node.
    PeerUp {
        peer: NodeId,
        name: String,
        hello: Hello,
        conn_id: u64,
    },
    /// One frame body: version byte + payload (what `wire::decode_frame` expects).
    Frame {
        peer: NodeId,
        conn_id: u64,
        body: Vec<u8>,
        /// The frame's share of its connection's inbound budget, given back
        /// when the event is dropped (after the engine applied it).
        budget: FrameBudget,
    },
    /// The connection announced by the matching `PeerUp` ended.
    PeerDown {
        peer: NodeId,
        conn_id: u64,
        reason: String,
    },
    /// A connection was refused: unknown key, cloned identity, bad hello, …
    Refused {
        addr: SocketAddr,
        node_id: Option<String>,
        reason: String,
    },
}

/// A frame's share of its connection's inbound byte budget
/// (`INBOUND_QUEUE_BYTES_MAX`), released when the last clone is dropped.
#[derive(Clone, Default)]
pub struct FrameBudget(Option<Arc<tokio::sync::OwnedSemaphorePermit>>);

impl fmt::Debug for FrameBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kib = self.0.as_ref().map_or(0, |p| p.num_permits());
        write!(f, "FrameBudget({kib} KiB)")
    }
}

/// Why [`Transport::send`] did not queue a frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("peer is not connected")]
    NotConnected,
    #[error("outbound queue to the peer is full ({OUTBOUND_QUEUE_FRAMES} frames)")]
    QueueFull,
    #[error("invalid frame: {0}")]
    InvalidFrame(String),
    #[error("transport is shut down")]
    Shutdown,
}

/// Handle to the running transport; cheap to clone.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("node_id", &self.inner.our_id)
            .field("local_addr", &self.inner.local_addr)
            .finish()
    }
}

struct Inner {
    endpoint: Endpoint,
    local_addr: SocketAddr,
    our_id: NodeId,
    our_hello: Hello,
    /// Our hello as sent; re-encoded when the owner reports a new digest.
    hello_frame: Mutex<Vec<u8>>,
    events: mpsc::Sender<TransportEvent>,
    state: Mutex<State>,
    next_conn_id: AtomicU64,
    reconnect_min: Duration,
    reconnect_max: Duration,
    connect_timeout: Duration,
    handshakes: Arc<Semaphore>,
    /// Dials started, all peers (`Transport::dials_started`).
    dials_started: AtomicU64,
    /// Pending handshakes per source IP (`PENDING_HANDSHAKES_PER_ADDR_MAX`).
    handshakes_by_addr: Mutex<HashMap<std::net::IpAddr, usize>>,
    refused_log: Mutex<(Instant, u32)>,
}

struct State {
    shutting_down: bool,
    peers: HashMap<NodeId, PeerSlot>,
}

struct PeerSlot {
    name: String,
    /// Cut by an operator or a test (`set_blocked`); lifted again by unblocking.
    blocked: bool,
    /// Retired: refused for good, whatever `set_blocked` says later.
    revoked: bool,
    live: Option<Live>,
    /// Done signal of the most recently registered connection: the next one
    /// announces itself only after that one has reported its `PeerDown`.
    last_done: Option<watch::Receiver<bool>>,
    /// Wakes the peer's supervisor.
    wake: Arc<Notify>,
}

impl PeerSlot {
    /// Neither dialled nor accepted.
    fn refused(&self) -> bool {
        self.blocked || self.revoked
    }
}

/// The one registered connection of a peer.
struct Live {
    conn_id: u64,
    conn: Connection,
    dialed_by_us: bool,
    nonce: u64,
    announced: bool,
    since: Instant,
    /// Outbound queue; `None` once shutdown has started draining it.
    tx: Option<mpsc::Sender<Vec<u8>>>,
    /// Bytes in the outbound queue (`OUTBOUND_QUEUE_BYTES_MAX`).
    queued_bytes: Arc<std::sync::atomic::AtomicUsize>,
    writer_done: watch::Receiver<bool>,
    note: Note,
}

/// Why we closed a connection ourselves, for its `PeerDown`.
type Note = Arc<Mutex<Option<String>>>;

fn set_note(note: &Note, text: &str) {
    let mut n = note.lock().unwrap_or_else(|p| p.into_inner());
    if n.is_none() {
        *n = Some(text.to_string());
    }
}

fn take_note(note: &Note) -> Option<String> {
    note.lock().unwrap_or_else(|p| p.into_inner()).take()
}

enum PeerStatus {
    Shutdown,
    Blocked,
    Connected(Instant),
    Idle,
}

impl Transport {
    /// Binds `cfg.listen` and starts accepting and dialing.
    pub async fn start(
        cfg: TransportConfig,
        events: mpsc::Sender<TransportEvent>,
    ) -> anyhow::Result<Transport> {
        let listen = cfg.listen;
        let socket = std::net::UdpSocket::bind(listen).map_err(|e| bind_error(listen, &e))?;
        Transport::start_with_socket(cfg, socket, events).await
    }

    /// Like [`Transport::start`], on an already bound socket (`cfg.listen` is ignored).
    pub async fn start_with_socket(
        cfg: TransportConfig,
        socket: std::net::UdpSocket,
        events: mpsc::Sender<TransportEvent>,
    ) -> anyhow::Result<Transport> {
        let our_id = cfg.identity.node_id;
        if cfg.hello.node_id != our_id.hex() {
            bail!(
                "transport hello carries node id {} but the identity is {}",
                cfg.hello.node_id,
                our_id
            );
        }
        if cfg.keep_alive.is_zero() || cfg.keep_alive >= cfg.idle_timeout {
            bail!(
                "keep-alive interval ({:?}) must be non-zero and shorter than the idle timeout ({:?})",
                cfg.keep_alive,
                cfg.idle_timeout
            );
        }
        if cfg.connect_timeout.is_zero() {
            bail!("the connect timeout must be non-zero");
        }
        if cfg.reconnect_min.is_zero() || cfg.reconnect_min > cfg.reconnect_max {
            bail!(
                "reconnect delays must satisfy 0 < min ({:?}) <= max ({:?})",
                cfg.reconnect_min,
                cfg.reconnect_max
            );
        }
        let hello_frame = cfg
            .hello
            .encode_frame()
            .map_err(|e| anyhow!("cannot encode our hello: {e}"))?;

        let mut peers: HashMap<NodeId, PeerSlot> = HashMap::new();
        let mut dial_list = Vec::new();
        for p in &cfg.peers {
            if p.id == our_id {
                debug!(name = %p.name, "skipping this node's own entry in the peer list");
                continue;
            }
            if peers.contains_key(&p.id) {
                bail!("peer {} ({}) is listed twice", p.id, p.name);
            }
            let wake = Arc::new(Notify::new());
            dial_list.push((p.id, p.addr, wake.clone()));
            peers.insert(
                p.id,
                PeerSlot {
                    name: p.name.clone(),
                    blocked: false,
                    revoked: false,
                    live: None,
                    last_done: None,
                    wake,
                },
            );
        }

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(PinnedPeers {
            allowed: peers.keys().copied().collect(),
            own: our_id,
            algorithms: provider.signature_verification_algorithms,
        });
        let (server_crypto, client_crypto) = tls_configs(&cfg.identity, verifier, provider)?;

        let mut tc = quinn::TransportConfig::default();
        tc.keep_alive_interval(Some(cfg.keep_alive));
        tc.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(cfg.idle_timeout)
                .map_err(|_| anyhow!("idle timeout {:?} is too large", cfg.idle_timeout))?,
        ));
        // One control stream per connection, a few uni streams for liveness probes.
        tc.max_concurrent_bidi_streams(VarInt::from_u32(1));
        tc.max_concurrent_uni_streams(VarInt::from_u32(8));
        let tc = Arc::new(tc);

        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server_config.transport_config(tc.clone());
        server_config.max_incoming(PENDING_HANDSHAKES_MAX * 4);
        let mut client_config = quinn::ClientConfig::new(Arc::new(client_crypto));
        client_config.transport_config(tc);

        let local = socket
            .local_addr()
            .context("cannot read the local address of the peer socket")?;
        tune_socket(&socket, local);
        socket
            .set_nonblocking(true)
            .context("cannot make the peer socket non-blocking")?;
        let mut endpoint = Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .with_context(|| format!("cannot start the QUIC endpoint on {local}"))?;
        endpoint.set_default_client_config(client_config);
        let local_addr = endpoint.local_addr().unwrap_or(local);

        let inner = Arc::new(Inner {
            endpoint,
            local_addr,
            our_id,
            our_hello: cfg.hello.clone(),
            hello_frame: Mutex::new(hello_frame),
            events,
            state: Mutex::new(State {
                shutting_down: false,
                peers,
            }),
            next_conn_id: AtomicU64::new(1),
            reconnect_min: cfg.reconnect_min,
            reconnect_max: cfg.reconnect_max,
            connect_timeout: cfg.connect_timeout,
            handshakes: Arc::new(Semaphore::new(PENDING_HANDSHAKES_MAX)),
            dials_started: AtomicU64::new(0),
            handshakes_by_addr: Mutex::new(HashMap::new()),
            refused_log: Mutex::new((Instant::now(), 0)),
        });
        info!(node = %our_id, addr = %local_addr, peers = dial_list.len(), "mesh transport listening");

        tokio::spawn(accept_loop(inner.clone()));
        for (peer, addr, wake) in dial_list {
            tokio::spawn(supervise(inner.clone(), peer, addr, wake));
        }
        Ok(Transport { inner })
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Sets the state digest that our hellos carry from now on (`None`: none,
    /// the peer then asks with a `Msg::Root`). The owner calls this after every
    /// commit that changed it; a hello already sent keeps the old one (the sync
    /// protocol copes: each side compares with its current state).
    pub fn set_hello_digest(&self, digest: Option<HelloDigest>) {
        let mut h = self.inner.our_hello.clone();
        h.digest = digest;
        match h.encode_frame() {
            Ok(f) => {
                *self
                    .inner
                    .hello_frame
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = f
            }
            Err(e) => error!(error = %e, "cannot encode our hello; keeping the previous one"),
        }
    }

    /// Queues one encoded frame (length prefix included) for `peer`. Never blocks.
    pub fn send(&self, peer: NodeId, frame: Vec<u8>) -> Result<(), SendError> {
        check_outbound_frame(&frame)?;
        let st = self.inner.lock();
        if st.shutting_down {
            return Err(SendError::Shutdown);
        }
        let live = st
            .peers
            .get(&peer)
            .and_then(|slot| slot.live.as_ref())
            .filter(|live| live.announced)
            .ok_or(SendError::NotConnected)?;
        let tx = live.tx.as_ref().ok_or(SendError::NotConnected)?;
        let len = frame.len();
        let queued = live.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if queued + len > OUTBOUND_QUEUE_BYTES_MAX {
            live.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            return Err(SendError::QueueFull);
        }
        tx.try_send(frame).map_err(|e| {
            live.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full(_) => SendError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => SendError::NotConnected,
            }
        })
    }

    /// Dials this transport started so far, to all peers (each one QUIC
    /// handshake attempt: one Initial packet, retransmitted by QUIC while it
    /// waits).
    pub fn dials_started(&self) -> u64 {
        self.inner.dials_started.load(Ordering::Relaxed)
    }

    /// Peers with a live, announced connection.
    pub fn connected(&self) -> Vec<NodeId> {
        let st = self.inner.lock();
        let mut out: Vec<NodeId> = st
            .peers
            .iter()
            .filter(|(_, slot)| slot.live.as_ref().is_some_and(|l| l.announced))
            .map(|(id, _)| *id)
            .collect();
        out.sort();
        out
    }

    /// Blocks or unblocks a peer: a blocked peer's connection is closed and it is
    /// neither dialled nor accepted until unblocked.
    pub fn set_blocked(&self, peer: NodeId, blocked: bool) {
        self.change_slot(peer, "blocked", CLOSE_BLOCKED, |slot| {
            slot.blocked = blocked;
            slot.refused()
        });
        info!(peer = %peer, blocked, "peer block changed");
    }

    /// Refuses a retired peer for good: its connection is closed and it is never
    /// dialled or accepted again, whatever `set_blocked` does later.
    pub fn revoke(&self, peer: NodeId) {
        self.change_slot(peer, "revoked", CLOSE_BLOCKED, |slot| {
            slot.revoked = true;
            true
        });
    }

    /// Closes the peer's connection (if any) without blocking it: the supervisor
    /// dials again with backoff and the sync starts clean.
    pub fn reconnect(&self, peer: NodeId, why: &'static str) {
        self.change_slot(peer, why, CLOSE_RECONNECT, |_| true);
    }

    /// Applies `change` to the peer's slot and wakes its supervisor; closes the
    /// live connection (with `code` and `note` as the reason) when `change`
    /// returns true.
    fn change_slot(
        &self,
        peer: NodeId,
        note: &'static str,
        code: u32,
        change: impl FnOnce(&mut PeerSlot) -> bool,
    ) {
        let closing = {
            let mut st = self.inner.lock();
            let Some(slot) = st.peers.get_mut(&peer) else {
                debug!(peer = %peer, note, "not a configured peer");
                return;
            };
            let close = change(slot);
            slot.wake.notify_one();
            if close {
                slot.live.take()
            } else {
                None
            }
        };
        if let Some(live) = closing {
            set_note(&live.note, note);
            live.conn.close(VarInt::from_u32(code), note.as_bytes());
        }
    }

    /// Finishes the streams (queued frames are delivered and acknowledged, within a
    /// bound), closes every connection with an application close code and waits for
    /// the endpoint to go idle.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        let mut writers = Vec::new();
        let mut conns = Vec::new();
        {
            let mut st = inner.lock();
            if !st.shutting_down {
                st.shutting_down = true;
                for slot in st.peers.values_mut() {
                    slot.wake.notify_one();
                    if let Some(live) = slot.live.as_mut() {
                        // Dropping the sender lets the writer drain the queue,
                        // finish the stream and wait for the peer's acknowledgement.
                        live.tx = None;
                        writers.push(live.writer_done.clone());
                        conns.push((live.conn.clone(), live.note.clone()));
                    }
                }
            }
        }
        inner.endpoint.set_server_config(None);
        let flushed = timeout(FLUSH_TIMEOUT, async {
            for mut w in writers {
                let _ = w.wait_for(|done| *done).await;
            }
        })
        .await;
        if flushed.is_err() {
            debug!("shutdown: some peers did not acknowledge the last frames in time");
        }
        for (conn, note) in conns {
            set_note(&note, "shutdown");
            conn.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutdown");
        }
        inner
            .endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutdown");
        if timeout(IDLE_WAIT_TIMEOUT, inner.endpoint.wait_idle())
            .await
            .is_err()
        {
            debug!("shutdown: endpoint did not go idle in time");
        }
        info!(node = %inner.our_id, "mesh transport stopped");
    }
}
