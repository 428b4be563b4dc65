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
//!   jitter while the peer is not connected.
//!
//! Events per peer are totally ordered: a connection's `PeerUp`, its `Frame`s and
//! its `PeerDown` come in that order, and the next connection's `PeerUp` only after
//! the previous connection's `PeerDown`.
//!
//! Call [`Transport::shutdown`] before dropping the last handle: the background
//! tasks hold the endpoint until then.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    Connection, ConnectionError, Endpoint, ReadExactError, RecvStream, SendStream, VarInt,
};
use rand::Rng;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use storemesh_protocol::ids::NodeId;
use storemesh_protocol::wire::{Hello, HelloDigest, FRAME_BYTES_MAX};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::time::{timeout, Instant};
use tracing::{debug, error, info, warn};

use crate::identity::{node_id_of_cert, Identity};

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
/// A connection that lived this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
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

/// Markers our certificate verifier puts into its error, so that the accept and
/// dial paths (which know the remote address) can report the rejected key.
const UNKNOWN_KEY_MARKER: &str = "unknown peer key ";
const OWN_KEY_MARKER: &str = "peer presented this node's own key ";

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
    /// its next packet; abandoning it and dialling afresh bounds that wait.
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

fn bind_error(addr: SocketAddr, e: &std::io::Error) -> anyhow::Error {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::AddrInUse => anyhow!(
            "cannot listen for peers on {addr}: address in use (is another node running on this port?)"
        ),
        ErrorKind::AddrNotAvailable => {
            anyhow!("cannot listen for peers on {addr}: address not available on this machine")
        }
        ErrorKind::PermissionDenied => {
            anyhow!("cannot listen for peers on {addr}: permission denied")
        }
        _ => anyhow!("cannot listen for peers on {addr}: {e}"),
    }
}

fn tune_socket(socket: &std::net::UdpSocket, addr: SocketAddr) {
    let state = match quinn::udp::UdpSocketState::new(socket.into()) {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "cannot inspect the UDP socket; keeping default buffers");
            return;
        }
    };
    if let Err(e) = state.set_recv_buffer_size(socket.into(), SOCKET_BUFFER_BYTES) {
        debug!(error = %e, "cannot enlarge the UDP receive buffer");
    }
    if let Err(e) = state.set_send_buffer_size(socket.into(), SOCKET_BUFFER_BYTES) {
        debug!(error = %e, "cannot enlarge the UDP send buffer");
    }
    let recv = state.recv_buffer_size(socket.into()).unwrap_or(0);
    let send = state.send_buffer_size(socket.into()).unwrap_or(0);
    if recv < SOCKET_BUFFER_BYTES || send < SOCKET_BUFFER_BYTES {
        info!(
            %addr, recv, send,
            "UDP socket buffers are smaller than {SOCKET_BUFFER_BYTES} bytes (OS limit); \
             raise net.core.rmem_max / net.core.wmem_max to avoid packet loss under load"
        );
    } else {
        debug!(%addr, recv, send, "UDP socket buffers");
    }
}

fn check_outbound_frame(frame: &[u8]) -> Result<(), SendError> {
    if frame.len() < 5 {
        return Err(SendError::InvalidFrame(format!(
            "{} bytes is shorter than a length prefix and a version byte",
            frame.len()
        )));
    }
    let len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    if len != frame.len() - 4 {
        return Err(SendError::InvalidFrame(format!(
            "length prefix says {len} bytes but {} follow",
            frame.len() - 4
        )));
    }
    if len > FRAME_BYTES_MAX {
        return Err(SendError::InvalidFrame(format!(
            "frame of {len} bytes exceeds the {FRAME_BYTES_MAX}-byte limit"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// TLS: pinned peer keys

/// Accepts a certificate only if SHA-256(SPKI) is a configured peer's id.
struct PinnedPeers {
    allowed: HashSet<NodeId>,
    own: NodeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PinnedPeers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedPeers")
            .field("allowed", &self.allowed.len())
            .finish()
    }
}

/// The verifier's rejection; its `Debug` text ends up in quinn's handshake error.
struct KeyRejected {
    id: NodeId,
    own: bool,
}

impl fmt::Display for KeyRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let marker = if self.own {
            OWN_KEY_MARKER
        } else {
            UNKNOWN_KEY_MARKER
        };
        write!(f, "{marker}{}", self.id.hex())
    }
}

impl fmt::Debug for KeyRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for KeyRejected {}

impl PinnedPeers {
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let id = node_id_of_cert(end_entity.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if id != self.own && self.allowed.contains(&id) {
            return Ok(());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(KeyRejected {
                id,
                own: id == self.own,
            })),
        )))
    }
}

impl ServerCertVerifier for PinnedPeers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PinnedPeers {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn tls_configs(
    identity: &Identity,
    verifier: Arc<PinnedPeers>,
    provider: Arc<CryptoProvider>,
) -> anyhow::Result<(QuicServerConfig, QuicClientConfig)> {
    let cert = CertificateDer::from(identity.cert_der.clone());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der.clone()));

    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("the crypto provider does not support TLS 1.3")?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(vec![cert.clone()], key.clone_key())
        .context("the node key cannot be used for TLS")?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    server.max_early_data_size = 0;
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});

    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("the crypto provider does not support TLS 1.3")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert], key)
        .context("the node key cannot be used for TLS")?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    client.enable_early_data = false;
    client.enable_sni = false;
    client.resumption = rustls::client::Resumption::disabled();

    let server = QuicServerConfig::try_from(server).map_err(|e| anyhow!("QUIC server TLS: {e}"))?;
    let client = QuicClientConfig::try_from(client).map_err(|e| anyhow!("QUIC client TLS: {e}"))?;
    Ok((server, client))
}

/// The node id the peer proved with its TLS certificate.
fn peer_node_id(conn: &Connection) -> Option<NodeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    node_id_of_cert(certs.first()?.as_ref()).ok()
}

fn negotiated_alpn_ok(conn: &Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == ALPN)
}

/// Finds a node id our verifier put into a local handshake error.
fn rejected_key(reason: &str, marker: &str) -> Option<NodeId> {
    let start = reason.find(marker)? + marker.len();
    NodeId::parse(reason.get(start..start + 64)?).ok()
}

// ---------------------------------------------------------------------------
// Inner helpers

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn status(&self, peer: NodeId) -> PeerStatus {
        let st = self.lock();
        // Without an event receiver nobody can use a connection: stop dialing.
        if st.shutting_down || self.events.is_closed() {
            return PeerStatus::Shutdown;
        }
        match st.peers.get(&peer) {
            None => PeerStatus::Shutdown,
            Some(slot) if slot.refused() => PeerStatus::Blocked,
            Some(slot) => match &slot.live {
                Some(live) => PeerStatus::Connected(live.since),
                None => PeerStatus::Idle,
            },
        }
    }

    fn peer_name(&self, peer: NodeId) -> String {
        self.lock()
            .peers
            .get(&peer)
            .map(|s| s.name.clone())
            .unwrap_or_default()
    }

    async fn emit(&self, event: TransportEvent) {
        if self.events.send(event).await.is_err() {
            debug!("transport event receiver is gone");
        }
    }

    /// Refusals may be provoked from outside: never wait for the consumer.
    fn emit_refused(&self, addr: SocketAddr, node_id: Option<NodeId>, reason: String) {
        let event = TransportEvent::Refused {
            addr,
            node_id: node_id.map(|id| id.hex()),
            reason,
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(event) {
            debug!(%addr, "event queue full; dropped a Refused event");
        }
    }

    /// Rate limit for warnings that remote parties can provoke.
    fn may_log_refusal(&self) -> bool {
        let mut g = self.refused_log.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(g.0) >= REFUSED_LOG_WINDOW {
            *g = (now, 0);
        }
        g.1 += 1;
        g.1 <= REFUSED_LOGS_PER_WINDOW
    }

    /// A handshake that failed before any hello: report keys our verifier rejected
    /// and keys the peer rejected.
    fn handshake_failed(&self, addr: SocketAddr, e: &ConnectionError) {
        match e {
            ConnectionError::TransportError(te) => {
                if let Some(id) = rejected_key(&te.reason, UNKNOWN_KEY_MARKER) {
                    if self.may_log_refusal() {
                        warn!(node_id = %id, %addr, "refused a connection from an unknown key (not in the peer list)");
                    } else {
                        debug!(node_id = %id, %addr, "refused a connection from an unknown key");
                    }
                    self.emit_refused(addr, Some(id), "unknown key: not in the peer list".into());
                } else if let Some(id) = rejected_key(&te.reason, OWN_KEY_MARKER) {
                    if self.may_log_refusal() {
                        error!(node_id = %id, %addr, "a peer presented this node's own key (cloned identity?)");
                    }
                    self.emit_refused(
                        addr,
                        Some(id),
                        "peer presented this node's own key (cloned identity?)".into(),
                    );
                } else {
                    debug!(%addr, error = %te, "TLS handshake failed");
                }
            }
            ConnectionError::ConnectionClosed(close) if is_crypto_code(close.error_code) => {
                self.peer_rejected_our_certificate(addr, None);
            }
            other => debug!(%addr, error = %other, "QUIC handshake failed"),
        }
    }

    fn peer_rejected_our_certificate(&self, addr: SocketAddr, peer: Option<NodeId>) {
        if self.may_log_refusal() {
            warn!(%addr, peer = ?peer, "peer rejected this node's certificate (is this node in its peer list?)");
        }
        self.emit_refused(
            addr,
            peer,
            "peer rejected this node's certificate (is this node in its peer list?)".into(),
        );
    }

    /// Our current hello frame.
    fn hello_frame(&self) -> Vec<u8> {
        self.hello_frame
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Refuses a connection whose hello failed the check.
    fn bad_hello(&self, conn: &Connection, addr: SocketAddr, peer: NodeId, reason: &str) {
        warn!(peer = %peer, %addr, reason, "refused a peer's hello");
        conn.close(
            VarInt::from_u32(CLOSE_BAD_HELLO),
            truncate(reason).as_bytes(),
        );
        self.emit_refused(addr, Some(peer), format!("bad hello: {reason}"));
    }

    /// Our dial was closed by the peer before its hello arrived: say why.
    fn dial_rejected(&self, addr: SocketAddr, peer: NodeId, e: &ConnectionError) -> String {
        match e {
            ConnectionError::ApplicationClosed(c) => {
                let code = c.error_code.into_inner();
                let text = sanitize(&c.reason);
                match u32::try_from(code).unwrap_or(u32::MAX) {
                    CLOSE_DUPLICATE => "peer kept the other connection".into(),
                    CLOSE_BLOCKED => "peer blocks this node".into(),
                    CLOSE_SHUTDOWN => "peer is shutting down".into(),
                    CLOSE_CLONED => {
                        error!(
                            peer = %peer, %addr, node = %self.our_id,
                            "peer refused this node: it already has a live connection from node {} with another process nonce (is this identity running twice?)",
                            self.our_id
                        );
                        let reason = format!(
                            "peer already has a live connection from node {} with another process nonce (cloned identity?)",
                            self.our_id
                        );
                        self.emit_refused(addr, Some(peer), reason.clone());
                        reason
                    }
                    CLOSE_BAD_HELLO => {
                        warn!(peer = %peer, %addr, reason = %text, "peer refused this node's hello");
                        let reason = format!("peer refused our hello: {text}");
                        self.emit_refused(addr, Some(peer), reason.clone());
                        reason
                    }
                    _ => format!("closed by peer (code {code}): {text}"),
                }
            }
            ConnectionError::ConnectionClosed(c) if is_crypto_code(c.error_code) => {
                self.peer_rejected_our_certificate(addr, Some(peer));
                "peer rejected this node's certificate".into()
            }
            other => other.to_string(),
        }
    }
}

fn is_crypto_code(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

fn truncate(text: &str) -> String {
    text.chars().take(200).collect()
}

/// Peer-supplied text made safe for logs: printable, bounded.
fn sanitize(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::thread_rng().gen_range(0.5..1.0))
}

// ---------------------------------------------------------------------------
// Frames

enum FrameError {
    Conn(ConnectionError),
    /// The stream ended cleanly at a frame boundary.
    Eof,
    Protocol(String),
    Other(String),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Conn(e) => write!(f, "{e}"),
            FrameError::Eof => f.write_str("stream finished"),
            FrameError::Protocol(s) | FrameError::Other(s) => f.write_str(s),
        }
    }
}

fn read_error(e: quinn::ReadError) -> FrameError {
    match e {
        quinn::ReadError::ConnectionLost(c) => FrameError::Conn(c),
        quinn::ReadError::Reset(code) => {
            FrameError::Other(format!("peer reset the stream (code {code})"))
        }
        other => FrameError::Other(other.to_string()),
    }
}

fn write_error(e: quinn::WriteError) -> FrameError {
    match e {
        quinn::WriteError::ConnectionLost(c) => FrameError::Conn(c),
        other => FrameError::Other(other.to_string()),
    }
}

/// Reads one `u32 BE length | body` frame; never allocates more than `limit`.
async fn read_frame(recv: &mut RecvStream, limit: usize) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Err(FrameError::Eof),
        Err(ReadExactError::FinishedEarly(n)) => {
            return Err(FrameError::Protocol(format!(
                "stream ended inside a length prefix ({n} bytes)"
            )))
        }
        Err(ReadExactError::ReadError(e)) => return Err(read_error(e)),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 {
        return Err(FrameError::Protocol("empty frame".into()));
    }
    if len > limit {
        return Err(FrameError::Protocol(format!(
            "frame of {len} bytes exceeds the {limit}-byte limit"
        )));
    }
    let mut body = vec![0u8; len];
    match recv.read_exact(&mut body).await {
        Ok(()) => Ok(body),
        Err(ReadExactError::FinishedEarly(n)) => Err(FrameError::Protocol(format!(
            "stream ended inside a frame ({n} of {len} bytes)"
        ))),
        Err(ReadExactError::ReadError(e)) => Err(read_error(e)),
    }
}

fn describe_close(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ApplicationClosed(c) => {
            let text = sanitize(&c.reason);
            match u32::try_from(c.error_code.into_inner()).unwrap_or(u32::MAX) {
                CLOSE_SHUTDOWN => "peer shut down".into(),
                CLOSE_DUPLICATE | CLOSE_REPLACED => {
                    "peer replaced this connection with another one".into()
                }
                CLOSE_BLOCKED => "peer blocks this node".into(),
                CLOSE_PROTOCOL => format!("peer saw a protocol violation: {text}"),
                CLOSE_RECONNECT => format!("peer restarts the connection ({text})"),
                code => format!("closed by peer (code {code}): {text}"),
            }
        }
        ConnectionError::TimedOut => "idle timeout: peer unreachable".into(),
        ConnectionError::Reset => "connection reset by peer (peer restarted?)".into(),
        ConnectionError::LocallyClosed => "closed locally".into(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------
// Connection setup

/// A connection whose hello passed, waiting to be registered.
struct Candidate {
    peer: NodeId,
    conn: Connection,
    addr: SocketAddr,
    conn_id: u64,
    dialed_by_us: bool,
    hello: Hello,
}

/// What the connection task needs once a candidate is registered.
struct Registration {
    predecessor: Option<watch::Receiver<bool>>,
    done_tx: watch::Sender<bool>,
    rx: mpsc::Receiver<Vec<u8>>,
    queued_bytes: Arc<std::sync::atomic::AtomicUsize>,
    writer_done_tx: watch::Sender<bool>,
    note: Note,
}

enum Decision {
    Accept(Registration, Option<Live>),
    Reject(u32, &'static str),
    Probe(Connection, u64),
}

impl Inner {
    fn decide(&self, c: &Candidate) -> Decision {
        let mut st = self.lock();
        if st.shutting_down {
            return Decision::Reject(CLOSE_SHUTDOWN, "shutting down");
        }
        let Some(slot) = st.peers.get_mut(&c.peer) else {
            return Decision::Reject(CLOSE_UNEXPECTED_PEER, "not a configured peer");
        };
        if slot.refused() {
            return Decision::Reject(CLOSE_BLOCKED, "blocked");
        }
        if let Some(live) = &slot.live {
            if live.nonce != c.hello.nonce {
                return Decision::Probe(live.conn.clone(), live.conn_id);
            }
            // Same process on the other side. A connection dialled by the same side
            // as the live one replaces it: that side dials only when it has given
            // the old one up. Otherwise the one dialled by the lower node id wins.
            let same_dialer = live.dialed_by_us == c.dialed_by_us;
            let candidate_dialer_is_lower = if c.dialed_by_us {
                self.our_id < c.peer
            } else {
                c.peer < self.our_id
            };
            if !same_dialer && !candidate_dialer_is_lower {
                return Decision::Reject(CLOSE_DUPLICATE, "duplicate connection");
            }
        }
        let replaced = slot.live.take();
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE_FRAMES);
        let queued_bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (done_tx, done_rx) = watch::channel(false);
        let (writer_done_tx, writer_done) = watch::channel(false);
        let note: Note = Arc::new(Mutex::new(None));
        slot.live = Some(Live {
            conn_id: c.conn_id,
            conn: c.conn.clone(),
            dialed_by_us: c.dialed_by_us,
            nonce: c.hello.nonce,
            announced: false,
            since: Instant::now(),
            tx: Some(tx),
            queued_bytes: queued_bytes.clone(),
            writer_done,
            note: note.clone(),
        });
        let predecessor = slot.last_done.replace(done_rx);
        Decision::Accept(
            Registration {
                predecessor,
                done_tx,
                rx,
                queued_bytes,
                writer_done_tx,
                note,
            },
            replaced,
        )
    }

    /// Removes the live connection `conn_id` of `peer` if it is still registered.
    fn unregister(&self, peer: NodeId, conn_id: u64) -> Option<Live> {
        let mut st = self.lock();
        let slot = st.peers.get_mut(&peer)?;
        if slot.live.as_ref().is_some_and(|l| l.conn_id == conn_id) {
            slot.wake.notify_one();
            slot.live.take()
        } else {
            None
        }
    }

    fn mark_announced(&self, peer: NodeId, conn_id: u64) -> bool {
        let mut st = self.lock();
        if st.shutting_down {
            return false;
        }
        match st.peers.get_mut(&peer).and_then(|s| s.live.as_mut()) {
            Some(live) if live.conn_id == conn_id => {
                live.announced = true;
                true
            }
            _ => false,
        }
    }
}

/// Registers a candidate under the one-connection-per-pair rules. On rejection the
/// candidate is closed and `Err` says why.
async fn register(inner: &Arc<Inner>, c: &Candidate) -> Result<Registration, String> {
    for _ in 0..4 {
        match inner.decide(c) {
            Decision::Accept(reg, replaced) => {
                if let Some(old) = replaced {
                    debug!(peer = %c.peer, old = old.conn_id, new = c.conn_id, "replacing connection");
                    set_note(&old.note, "replaced by a newer connection");
                    old.conn.close(
                        VarInt::from_u32(CLOSE_REPLACED),
                        b"replaced by a newer connection",
                    );
                }
                return Ok(reg);
            }
            Decision::Reject(code, why) => {
                debug!(peer = %c.peer, conn = c.conn_id, why, "connection not kept");
                c.conn.close(VarInt::from_u32(code), why.as_bytes());
                return Err(why.to_string());
            }
            Decision::Probe(old, old_id) => {
                if probe(&old).await {
                    let still_live = inner
                        .lock()
                        .peers
                        .get(&c.peer)
                        .and_then(|s| s.live.as_ref())
                        .is_some_and(|l| l.conn_id == old_id);
                    if !still_live {
                        continue;
                    }
                    let peer_hex = c.peer.hex();
                    error!(
                        peer = %c.peer, addr = %c.addr,
                        "node {peer_hex} connected twice with different process nonces (cloned identity?)"
                    );
                    c.conn.close(
                        VarInt::from_u32(CLOSE_CLONED),
                        b"this node id is already connected with another process nonce",
                    );
                    inner.emit_refused(
                        c.addr,
                        Some(c.peer),
                        format!("node {peer_hex} connected twice with different process nonces (cloned identity?)"),
                    );
                    return Err("cloned identity".into());
                }
                // The old connection no longer answers: the peer restarted.
                if let Some(gone) = inner.unregister(c.peer, old_id) {
                    info!(peer = %c.peer, old = old_id, "previous connection stopped answering; peer restarted");
                    set_note(
                        &gone.note,
                        "peer restarted (previous connection stopped answering)",
                    );
                    gone.conn
                        .close(VarInt::from_u32(CLOSE_GONE), b"superseded by a new process");
                }
            }
        }
    }
    c.conn.close(
        VarInt::from_u32(CLOSE_DUPLICATE),
        b"connection state kept changing",
    );
    Err("connection state kept changing".into())
}

/// Whether an existing connection still answers: the peer acknowledges a tiny
/// unidirectional stream within a few round trips.
async fn probe(conn: &Connection) -> bool {
    let limit = (conn.rtt() * 4).clamp(PROBE_TIMEOUT_MIN, PROBE_TIMEOUT_MAX);
    let attempt = async {
        let mut s = conn.open_uni().await.ok()?;
        s.write_all(&[0]).await.ok()?;
        s.finish().ok()?;
        s.stopped().await.ok()
    };
    matches!(timeout(limit, attempt).await, Ok(Some(_)))
}

/// Drains the peer's probe streams.
async fn answer_probes(conn: Connection) {
    while let Ok(mut s) = conn.accept_uni().await {
        let _ = timeout(PROBE_TIMEOUT_MAX, s.read_to_end(16)).await;
    }
}

async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        // Under load, a source must first prove it receives at its address
        // (a stateless QUIC retry): spoofed addresses cannot hold slots.
        let busy = inner.handshakes.available_permits() < PENDING_HANDSHAKES_MAX / 2;
        if busy && !incoming.remote_address_validated() && incoming.may_retry() {
            let _ = incoming.retry();
            continue;
        }
        let ip = incoming.remote_address().ip();
        {
            let mut by_addr = inner
                .handshakes_by_addr
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let n = by_addr.entry(ip).or_default();
            if *n >= PENDING_HANDSHAKES_PER_ADDR_MAX {
                debug!(addr = %incoming.remote_address(), "too many pending handshakes from this address; refusing");
                incoming.refuse();
                continue;
            }
            *n += 1;
        }
        let Ok(permit) = inner.handshakes.clone().try_acquire_owned() else {
            release_handshake_slot(&inner, ip);
            debug!(addr = %incoming.remote_address(), "too many pending handshakes; refusing");
            incoming.refuse();
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            handle_incoming(inner.clone(), incoming).await;
            release_handshake_slot(&inner, ip);
            drop(permit);
        });
    }
    debug!("accept loop finished");
}

fn release_handshake_slot(inner: &Inner, ip: std::net::IpAddr) {
    let mut by_addr = inner
        .handshakes_by_addr
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(n) = by_addr.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            by_addr.remove(&ip);
        }
    }
}

async fn handle_incoming(inner: Arc<Inner>, incoming: quinn::Incoming) {
    let addr = incoming.remote_address();
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            debug!(%addr, error = %e, "cannot accept connection");
            return;
        }
    };
    let conn = match timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Err(_) => {
            debug!(%addr, "incoming handshake timed out");
            return;
        }
        Ok(Err(e)) => {
            inner.handshake_failed(addr, &e);
            return;
        }
        Ok(Ok(c)) => c,
    };
    let Some(peer) = peer_node_id(&conn) else {
        conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"no peer certificate");
        return;
    };
    if !negotiated_alpn_ok(&conn) {
        conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"wrong ALPN");
        return;
    }
    {
        let st = inner.lock();
        if st.shutting_down {
            conn.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
            return;
        }
        if st.peers.get(&peer).is_none_or(PeerSlot::refused) {
            debug!(peer = %peer, %addr, "refusing a blocked peer");
            conn.close(VarInt::from_u32(CLOSE_BLOCKED), b"blocked");
            return;
        }
    }
    let hello = timeout(HELLO_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await.map_err(FrameError::Conn)?;
        let body = read_frame(&mut recv, HELLO_BYTES_MAX).await?;
        Ok::<_, FrameError>((send, recv, body))
    })
    .await;
    let (send, recv, body) = match hello {
        Err(_) => {
            debug!(peer = %peer, %addr, "no hello in time");
            conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"hello timed out");
            return;
        }
        Ok(Err(e)) => {
            debug!(peer = %peer, %addr, error = %e, "no hello");
            conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"no hello");
            return;
        }
        Ok(Ok(x)) => x,
    };
    let their = match Hello::decode_frame(&body)
        .and_then(|h| h.check(&inner.our_hello, &peer.hex()).map(|()| h))
    {
        Ok(h) => h,
        Err(e) => {
            inner.bad_hello(&conn, addr, peer, &e);
            return;
        }
    };
    let candidate = Candidate {
        peer,
        conn: conn.clone(),
        addr,
        conn_id: inner.next_conn_id.fetch_add(1, Ordering::Relaxed),
        dialed_by_us: false,
        hello: their,
    };
    if let Ok(reg) = register(&inner, &candidate).await {
        tokio::spawn(run_connection(inner, candidate, send, recv, true, reg));
    }
}

/// Dials `peer` and runs the hello. `Ok` once the connection is registered.
async fn dial(inner: &Arc<Inner>, peer: NodeId, addr: SocketAddr) -> Result<(), String> {
    let connecting = inner
        .endpoint
        .connect(addr, SERVER_NAME)
        .map_err(|e| format!("cannot dial: {e}"))?;
    // Dropping the `Connecting` on timeout abandons that handshake.
    let conn = match timeout(inner.connect_timeout, connecting).await {
        Err(_) => return Err("handshake timed out".into()),
        Ok(Err(e)) => {
            inner.handshake_failed(addr, &e);
            return Err(format!("handshake failed: {e}"));
        }
        Ok(Ok(c)) => c,
    };
    let Some(tls_id) = peer_node_id(&conn) else {
        conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"no peer certificate");
        return Err("no peer certificate".into());
    };
    if !negotiated_alpn_ok(&conn) {
        conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"wrong ALPN");
        return Err("wrong ALPN".into());
    }
    if tls_id != peer {
        let reason = format!("expected node {peer} at {addr} but node {tls_id} answered");
        warn!(peer = %peer, %addr, found = %tls_id, "a different node answered at the peer's address");
        conn.close(
            VarInt::from_u32(CLOSE_UNEXPECTED_PEER),
            b"unexpected node id",
        );
        inner.emit_refused(addr, Some(tls_id), reason.clone());
        return Err(reason);
    }
    // The handshake may have outlived a block or a retirement (a dial to an
    // absent peer retries its handshake for seconds): do not let the peer see a
    // hello it would take for an accepted connection.
    if inner.lock().peers.get(&peer).is_none_or(PeerSlot::refused) {
        conn.close(VarInt::from_u32(CLOSE_BLOCKED), b"blocked");
        return Err("the peer was blocked while the handshake ran".into());
    }
    let hello = timeout(HELLO_TIMEOUT, async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(FrameError::Conn)?;
        let ours = inner.hello_frame();
        send.write_all(&ours).await.map_err(write_error)?;
        let body = read_frame(&mut recv, HELLO_BYTES_MAX).await?;
        Ok::<_, FrameError>((send, recv, body))
    })
    .await;
    let (send, recv, body) = match hello {
        Err(_) => {
            conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"hello timed out");
            return Err("hello timed out".into());
        }
        Ok(Err(e)) => {
            let cause = match conn.close_reason() {
                Some(ce) => ce,
                None => match e {
                    FrameError::Conn(ce) => ce,
                    other => {
                        conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"no hello");
                        return Err(format!("no hello: {other}"));
                    }
                },
            };
            return Err(inner.dial_rejected(addr, peer, &cause));
        }
        Ok(Ok(x)) => x,
    };
    let their = match Hello::decode_frame(&body)
        .and_then(|h| h.check(&inner.our_hello, &peer.hex()).map(|()| h))
    {
        Ok(h) => h,
        Err(e) => {
            inner.bad_hello(&conn, addr, peer, &e);
            return Err(format!("bad hello: {e}"));
        }
    };
    let candidate = Candidate {
        peer,
        conn,
        addr,
        conn_id: inner.next_conn_id.fetch_add(1, Ordering::Relaxed),
        dialed_by_us: true,
        hello: their,
    };
    let reg = register(inner, &candidate).await?;
    tokio::spawn(run_connection(
        inner.clone(),
        candidate,
        send,
        recv,
        false,
        reg,
    ));
    Ok(())
}

/// Owns one registered connection: answers the hello (acceptor), announces the
/// peer after its predecessor is gone, reads frames, reports the end.
async fn run_connection(
    inner: Arc<Inner>,
    c: Candidate,
    mut send: SendStream,
    mut recv: RecvStream,
    reply: bool,
    reg: Registration,
) {
    let Registration {
        predecessor,
        done_tx,
        rx,
        queued_bytes,
        writer_done_tx,
        note,
    } = reg;
    let Candidate {
        peer,
        conn,
        addr,
        conn_id,
        dialed_by_us,
        hello,
    } = c;

    let mut failure = None;
    if reply {
        let ours = inner.hello_frame();
        match timeout(HELLO_TIMEOUT, send.write_all(&ours)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(format!("cannot send hello: {e}")),
            Err(_) => failure = Some("timed out sending hello".to_string()),
        }
    }
    tokio::spawn(run_writer(send, rx, queued_bytes, writer_done_tx));
    tokio::spawn(answer_probes(conn.clone()));

    if let Some(mut p) = predecessor {
        let _ = p.wait_for(|done| *done).await;
    }
    let name = inner.peer_name(peer);
    let announced = failure.is_none() && inner.mark_announced(peer, conn_id);
    if announced {
        info!(peer = %peer, name = %name, conn = conn_id, %addr, dialed_by_us, "peer up");
        inner
            .emit(TransportEvent::PeerUp {
                peer,
                name: name.clone(),
                hello,
                conn_id,
            })
            .await;
    }

    let (code, reason) = match failure {
        Some(f) => (CLOSE_PROTOCOL, f),
        None if announced => read_loop(&inner, peer, conn_id, &conn, &mut recv).await,
        None => (
            CLOSE_REPLACED,
            "superseded before it was announced".to_string(),
        ),
    };
    inner.unregister(peer, conn_id);
    conn.close(VarInt::from_u32(code), truncate(&reason).as_bytes());
    let reason = take_note(&note).unwrap_or(reason);
    if announced {
        info!(peer = %peer, name = %name, conn = conn_id, reason = %reason, "peer down");
        inner
            .emit(TransportEvent::PeerDown {
                peer,
                conn_id,
                reason,
            })
            .await;
    }
    let _ = done_tx.send(true);
}

/// Delivers frames until the connection ends; returns the close code and reason.
async fn read_loop(
    inner: &Inner,
    peer: NodeId,
    conn_id: u64,
    conn: &Connection,
    recv: &mut RecvStream,
) -> (u32, String) {
    let budget = Arc::new(Semaphore::new(INBOUND_KIB_MAX));
    loop {
        match read_frame(recv, FRAME_BYTES_MAX).await {
            Ok(body) => {
                let kib = body.len().div_ceil(1024).clamp(1, INBOUND_KIB_MAX) as u32;
                let Ok(permit) = budget.clone().acquire_many_owned(kib).await else {
                    return (CLOSE_SHUTDOWN, "inbound budget closed".into());
                };
                let event = TransportEvent::Frame {
                    peer,
                    conn_id,
                    body,
                    budget: FrameBudget(Some(Arc::new(permit))),
                };
                if inner.events.send(event).await.is_err() {
                    return (CLOSE_SHUTDOWN, "event receiver closed".into());
                }
            }
            Err(FrameError::Eof) => {
                // The peer finished its stream: it is shutting down and will close.
                let closed = timeout(EOF_CLOSE_WAIT, conn.closed()).await;
                let reason = match closed {
                    Ok(e) => describe_close(&e),
                    Err(_) => "peer finished its stream".to_string(),
                };
                return (CLOSE_SHUTDOWN, reason);
            }
            Err(FrameError::Protocol(why)) => {
                warn!(peer = %peer, conn = conn_id, reason = %why, "protocol violation; disconnecting peer");
                return (CLOSE_PROTOCOL, format!("protocol violation: {why}"));
            }
            Err(FrameError::Conn(e)) => return (CLOSE_SHUTDOWN, describe_close(&e)),
            Err(FrameError::Other(why)) => return (CLOSE_PROTOCOL, why),
        }
    }
}

/// Writes queued frames; when the queue closes, finishes the stream and waits
/// (bounded) for the peer to acknowledge everything.
async fn run_writer(
    mut send: SendStream,
    mut rx: mpsc::Receiver<Vec<u8>>,
    queued_bytes: Arc<std::sync::atomic::AtomicUsize>,
    done: watch::Sender<bool>,
) {
    let mut healthy = true;
    while let Some(frame) = rx.recv().await {
        queued_bytes.fetch_sub(frame.len(), Ordering::Relaxed);
        if send.write_all(&frame).await.is_err() {
            healthy = false;
            break;
        }
    }
    drop(rx);
    if healthy && send.finish().is_ok() {
        let _ = timeout(FLUSH_TIMEOUT, send.stopped()).await;
    }
    let _ = done.send(true);
}

// ---------------------------------------------------------------------------
// Supervisor

/// Dials `peer` while it is configured, unblocked and not connected.
async fn supervise(inner: Arc<Inner>, peer: NodeId, addr: SocketAddr, wake: Arc<Notify>) {
    let mut backoff = inner.reconnect_min;
    let mut next_dial = Instant::now();
    let mut up_since: Option<Instant> = None;
    loop {
        match inner.status(peer) {
            PeerStatus::Shutdown => return,
            PeerStatus::Blocked => {
                backoff = inner.reconnect_min;
                next_dial = Instant::now();
                up_since = None;
                wake.notified().await;
                continue;
            }
            PeerStatus::Connected(since) => {
                up_since = Some(since);
                wake.notified().await;
                continue;
            }
            PeerStatus::Idle => {}
        }
        if let Some(since) = up_since.take() {
            if since.elapsed() >= STABLE_CONNECTION {
                backoff = inner.reconnect_min;
                next_dial = Instant::now();
            } else {
                // A connection that died young: do not hammer the peer.
                next_dial = Instant::now() + jittered(backoff);
                backoff = (backoff * 2).min(inner.reconnect_max);
            }
        }
        if Instant::now() < next_dial {
            tokio::select! {
                _ = tokio::time::sleep_until(next_dial) => {}
                _ = wake.notified() => {}
            }
            continue;
        }
        if let Err(e) = dial(&inner, peer, addr).await {
            debug!(peer = %peer, %addr, error = %e, retry_in = ?backoff, "dial failed");
            next_dial = Instant::now() + jittered(backoff);
            backoff = (backoff * 2).min(inner.reconnect_max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket as StdUdpSocket;
    use storemesh_protocol::wire::{self, FRAME_VERSION, PROTOCOL_VERSION};
    use TransportEvent::{Frame, PeerDown, PeerUp, Refused};

    const DEADLINE: Duration = Duration::from_secs(10);

    fn logs() {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }

    fn hello(id: &Identity, name: &str, nonce: u64) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: id.node_id.hex(),
            name: name.to_string(),
            buckets: 64,
            nonce,
            digest: None,
        }
    }

    fn bind() -> StdUdpSocket {
        StdUdpSocket::bind("127.0.0.1:0").unwrap()
    }

    fn entry(name: &str, id: &Identity, addr: SocketAddr) -> PeerEntry {
        PeerEntry {
            name: name.to_string(),
            id: id.node_id,
            addr,
        }
    }

    fn config(id: &Identity, name: &str, nonce: u64, peers: Vec<PeerEntry>) -> TransportConfig {
        let mut c = TransportConfig::new(
            id.clone(),
            "127.0.0.1:0".parse().unwrap(),
            peers,
            hello(id, name, nonce),
        );
        c.keep_alive = Duration::from_millis(500);
        c.idle_timeout = Duration::from_secs(5);
        c.reconnect_min = Duration::from_millis(20);
        c.reconnect_max = Duration::from_millis(200);
        c
    }

    /// A frame as `wire::encode_frame` makes it, around an arbitrary body.
    fn raw_frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    fn text_frame(text: &str) -> Vec<u8> {
        wire::encode_frame(&text.to_string()).unwrap()
    }

    struct Node {
        name: &'static str,
        id: NodeId,
        t: Transport,
        rx: mpsc::Receiver<TransportEvent>,
        log: Vec<TransportEvent>,
    }

    async fn start(name: &'static str, cfg: TransportConfig, socket: StdUdpSocket) -> Node {
        let (tx, rx) = mpsc::channel(4096);
        let id = cfg.identity.node_id;
        let t = Transport::start_with_socket(cfg, socket, tx).await.unwrap();
        Node {
            name,
            id,
            t,
            rx,
            log: Vec::new(),
        }
    }

    impl Node {
        /// Waits (bounded) for the next event matching `pred`, recording everything.
        async fn wait_for(
            &mut self,
            what: &str,
            pred: impl Fn(&TransportEvent) -> bool,
        ) -> TransportEvent {
            let deadline = Instant::now() + DEADLINE;
            loop {
                match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                    Ok(Some(ev)) => {
                        self.log.push(ev.clone());
                        if pred(&ev) {
                            return ev;
                        }
                    }
                    Ok(None) => panic!("{}: event channel closed waiting for {what}", self.name),
                    Err(_) => panic!(
                        "{}: timed out waiting for {what}; events: {:#?}",
                        self.name, self.log
                    ),
                }
            }
        }

        fn drain(&mut self) {
            while let Ok(ev) = self.rx.try_recv() {
                self.log.push(ev);
            }
        }

        /// (conn_id, dialed_by_us) of the announced live connection to `peer`.
        fn live(&self, peer: NodeId) -> Option<(u64, bool)> {
            let st = self.t.inner.lock();
            st.peers
                .get(&peer)?
                .live
                .as_ref()
                .filter(|l| l.announced)
                .map(|l| (l.conn_id, l.dialed_by_us))
        }

        fn live_nonce(&self, peer: NodeId) -> Option<u64> {
            let st = self.t.inner.lock();
            st.peers.get(&peer)?.live.as_ref().map(|l| l.nonce)
        }

        fn open_connections(&self) -> usize {
            self.t.inner.endpoint.open_connections()
        }

        /// Up/Down events about `peer` strictly alternate, each Down closing the
        /// preceding Up; returns the conn id of a trailing unmatched Up.
        fn lifecycle(&self, peer: NodeId) -> Result<Option<u64>, String> {
            let mut open: Option<u64> = None;
            for ev in &self.log {
                match ev {
                    PeerUp {
                        peer: p, conn_id, ..
                    } if *p == peer => {
                        if let Some(o) = open {
                            return Err(format!("PeerUp {conn_id} while {o} is up"));
                        }
                        open = Some(*conn_id);
                    }
                    PeerDown {
                        peer: p, conn_id, ..
                    } if *p == peer => {
                        if open != Some(*conn_id) {
                            return Err(format!("PeerDown {conn_id} but up is {open:?}"));
                        }
                        open = None;
                    }
                    Frame {
                        peer: p, conn_id, ..
                    } if *p == peer && open != Some(*conn_id) => {
                        return Err(format!("Frame on {conn_id} but up is {open:?}"));
                    }
                    _ => {}
                }
            }
            Ok(open)
        }

        fn ups(&self, peer: NodeId) -> usize {
            self.log
                .iter()
                .filter(|e| matches!(e, PeerUp { peer: p, .. } if *p == peer))
                .count()
        }

        fn refused(&self) -> Vec<(Option<String>, String)> {
            self.log
                .iter()
                .filter_map(|e| match e {
                    Refused {
                        node_id, reason, ..
                    } => Some((node_id.clone(), reason.clone())),
                    _ => None,
                })
                .collect()
        }

        /// Stops without a goodbye, as if the process had died.
        fn kill(&self) {
            let inner = &self.t.inner;
            {
                let mut st = inner.lock();
                st.shutting_down = true;
                for slot in st.peers.values() {
                    slot.wake.notify_one();
                }
            }
            inner.endpoint.set_server_config(None);
        }
    }

    /// One side's view of a settled pair: exactly one QUIC connection, announced
    /// once, and the same connection on both ends.
    fn settled(x: &Node, y: &Node) -> Result<(), String> {
        let (cx, dx) = x
            .live(y.id)
            .ok_or(format!("{} has no live connection", x.name))?;
        let (cy, dy) = y
            .live(x.id)
            .ok_or(format!("{} has no live connection", y.name))?;
        if dx == dy {
            return Err(format!(
                "{} and {} hold different connections",
                x.name, y.name
            ));
        }
        for (n, c, other) in [(x, cx, y), (y, cy, x)] {
            if n.open_connections() != 1 {
                return Err(format!(
                    "{} has {} QUIC connections",
                    n.name,
                    n.open_connections()
                ));
            }
            if n.lifecycle(other.id)? != Some(c) {
                return Err(format!(
                    "{}: last PeerUp is not live connection {c}",
                    n.name
                ));
            }
            if n.t.connected() != vec![other.id] {
                return Err(format!("{}: connected() = {:?}", n.name, n.t.connected()));
            }
        }
        Ok(())
    }

    /// Polls (bounded) until the pair has settled and stays settled for 50 ms.
    async fn settle(a: &mut Node, b: &mut Node) {
        let deadline = Instant::now() + DEADLINE;
        let mut since: Option<Instant> = None;
        loop {
            a.drain();
            b.drain();
            match settled(a, b) {
                Ok(()) => match since {
                    Some(t) if t.elapsed() >= Duration::from_millis(50) => return,
                    Some(_) => {}
                    None => since = Some(Instant::now()),
                },
                Err(why) => {
                    since = None;
                    if Instant::now() > deadline {
                        panic!(
                            "pair did not settle: {why}\n{} events: {:#?}\n{} events: {:#?}",
                            a.name, a.log, b.name, b.log
                        );
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Two identities, each with a bound socket and the config that peers it
    /// with the other; nothing started.
    fn pair_configs() -> [(Identity, TransportConfig, StdUdpSocket); 2] {
        let (ia, ib) = (
            Identity::generate("a").unwrap(),
            Identity::generate("b").unwrap(),
        );
        let (sa, sb) = (bind(), bind());
        let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
        let (ca, cb) = (
            config(&ia, "a", 1, vec![entry("b", &ib, ab)]),
            config(&ib, "b", 2, vec![entry("a", &ia, aa)]),
        );
        [(ia, ca, sa), (ib, cb, sb)]
    }

    async fn pair() -> (Node, Node, Identity, Identity) {
        let [(ia, ca, sa), (ib, cb, sb)] = pair_configs();
        let mut a = start("a", ca, sa).await;
        let mut b = start("b", cb, sb).await;
        settle(&mut a, &mut b).await;
        (a, b, ia, ib)
    }

    async fn expect_text(n: &mut Node, from: NodeId, text: &str) {
        let ev = n
            .wait_for(
                &format!("frame {text:?}"),
                |e| matches!(e, Frame { peer, .. } if *peer == from),
            )
            .await;
        let Frame { body, .. } = ev else {
            unreachable!()
        };
        assert_eq!(wire::decode_frame::<String>(&body).unwrap(), text);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_exchange_frames_both_ways() {
        logs();
        let (mut a, mut b, _ia, ib) = pair().await;
        let (a_up, b_up) = (
            a.lifecycle(b.id).unwrap().unwrap(),
            b.lifecycle(a.id).unwrap().unwrap(),
        );
        let hello_seen_by_a = a.log.iter().rev().find_map(|e| match e {
            PeerUp { hello, name, .. } => Some((hello.clone(), name.clone())),
            _ => None,
        });
        let (h, name) = hello_seen_by_a.unwrap();
        assert_eq!(
            (h.nonce, h.node_id.as_str(), name.as_str()),
            (2, ib.node_id.hex().as_str(), "b")
        );

        for i in 0..200 {
            a.t.send(b.id, text_frame(&format!("a{i}"))).unwrap();
            b.t.send(a.id, text_frame(&format!("b{i}"))).unwrap();
        }
        for i in 0..200 {
            expect_text(&mut b, a.id, &format!("a{i}")).await;
            expect_text(&mut a, b.id, &format!("b{i}")).await;
        }
        // Frames carry the live connection id.
        assert!(a
            .log
            .iter()
            .all(|e| !matches!(e, Frame { conn_id, .. } if *conn_id != a_up)));
        assert!(b
            .log
            .iter()
            .all(|e| !matches!(e, Frame { conn_id, .. } if *conn_id != b_up)));

        // The largest legal frame passes; anything malformed is refused locally.
        let mut big = vec![7u8; FRAME_BYTES_MAX];
        big[0] = FRAME_VERSION;
        a.t.send(b.id, raw_frame(&big)).unwrap();
        let ev = b.wait_for("big frame", |e| matches!(e, Frame { .. })).await;
        assert!(matches!(ev, Frame { body, .. } if body == big));
        big.push(0);
        assert!(matches!(
            a.t.send(b.id, raw_frame(&big)),
            Err(SendError::InvalidFrame(_))
        ));
        assert!(matches!(
            a.t.send(b.id, vec![0, 0, 0, 9, 1]),
            Err(SendError::InvalidFrame(_))
        ));
        let stranger = Identity::generate("x").unwrap().node_id;
        assert_eq!(
            a.t.send(stranger, text_frame("x")),
            Err(SendError::NotConnected)
        );

        // Graceful shutdown delivers what was queued, then closes with a reason.
        for i in 0..50 {
            a.t.send(b.id, text_frame(&format!("last{i}"))).unwrap();
        }
        a.t.shutdown().await;
        for i in 0..50 {
            expect_text(&mut b, a.id, &format!("last{i}")).await;
        }
        let down = b
            .wait_for("PeerDown", |e| matches!(e, PeerDown { .. }))
            .await;
        assert!(
            matches!(&down, PeerDown { conn_id, reason, .. } if *conn_id == b_up && reason.contains("shut down")),
            "{down:?}"
        );
        let down = a
            .wait_for("own PeerDown", |e| matches!(e, PeerDown { .. }))
            .await;
        assert!(
            matches!(&down, PeerDown { reason, .. } if reason == "shutdown"),
            "{down:?}"
        );
        assert_eq!(a.t.send(b.id, text_frame("late")), Err(SendError::Shutdown));
        assert!(b.lifecycle(a.id).unwrap().is_none());
        b.t.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_certificates_are_refused_on_both_sides() {
        logs();
        let ia = Identity::generate("a").unwrap();
        let ib = Identity::generate("b").unwrap();
        let ic = Identity::generate("c").unwrap(); // known to nobody
        let ghost = Identity::generate("ghost").unwrap(); // A expects it where C listens
        let (sa, sb, sc) = (bind(), bind(), bind());
        let (aa, ab, ac) = (
            sa.local_addr().unwrap(),
            sb.local_addr().unwrap(),
            sc.local_addr().unwrap(),
        );
        let mut a = start(
            "a",
            config(
                &ia,
                "a",
                1,
                vec![entry("b", &ib, ab), entry("ghost", &ghost, ac)],
            ),
            sa,
        )
        .await;
        let mut b = start("b", config(&ib, "b", 2, vec![entry("a", &ia, aa)]), sb).await;
        // C trusts B and dials it; B does not know C's key.
        let mut c = start("c", config(&ic, "c", 3, vec![entry("b", &ib, ab)]), sc).await;

        let c_hex = ic.node_id.hex();
        // A dials C: A's server-certificate verifier rejects C's key.
        let ev = a
            .wait_for(
                "Refused C",
                |e| matches!(e, Refused { node_id: Some(n), .. } if *n == c_hex),
            )
            .await;
        assert!(
            matches!(&ev, Refused { addr, reason, .. } if *addr == ac && reason.contains("unknown key")),
            "{ev:?}"
        );
        // C dials B: B's client-certificate verifier rejects C's key.
        let ev = b
            .wait_for(
                "Refused C",
                |e| matches!(e, Refused { node_id: Some(n), .. } if *n == c_hex),
            )
            .await;
        assert!(
            matches!(&ev, Refused { addr, reason, .. } if *addr == ac && reason.contains("unknown key")),
            "{ev:?}"
        );
        // C learns that its certificate was rejected.
        c.wait_for("Refused at C", |e| matches!(e, Refused { reason, .. } if reason.contains("rejected this node's certificate")))
            .await;

        settle(&mut a, &mut b).await;
        a.t.send(b.id, text_frame("hi")).unwrap();
        expect_text(&mut b, a.id, "hi").await;
        assert_eq!(
            c.t.send(b.id, text_frame("x")),
            Err(SendError::NotConnected)
        );
        assert_eq!(
            a.t.send(ghost.node_id, text_frame("x")),
            Err(SendError::NotConnected)
        );

        // Let both of C's attempts repeat a few times, then check nothing leaked.
        c.wait_for("another refusal", |e| matches!(e, Refused { .. }))
            .await;
        a.drain();
        b.drain();
        c.drain();
        assert!(
            c.log.iter().all(|e| matches!(e, Refused { .. })),
            "{:#?}",
            c.log
        );
        for n in [&a, &b] {
            assert!(n.log.iter().all(|e| match e {
                PeerUp { peer, .. } | Frame { peer, .. } | PeerDown { peer, .. } =>
                    *peer != ic.node_id && *peer != ghost.node_id,
                Refused { .. } => true,
            }));
        }
        assert!(c.t.connected().is_empty());
        tokio::join!(a.t.shutdown(), b.t.shutdown(), c.t.shutdown());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn simultaneous_dials_leave_exactly_one_connection() {
        logs();
        let mut raced = 0;
        let mut stops = Vec::new();
        for round in 0..50 {
            let ia = Identity::generate("a").unwrap();
            let ib = Identity::generate("b").unwrap();
            let (sa, sb) = (bind(), bind());
            let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
            let ca = config(&ia, "a", 1, vec![entry("b", &ib, ab)]);
            let cb = config(&ib, "b", 2, vec![entry("a", &ia, aa)]);
            // Both sockets are bound before either endpoint runs: the first node's
            // Initial waits in the second's socket buffer while the second dials,
            // so both handshakes are in flight at once.
            let (mut a, mut b) = if round % 2 == 0 {
                let a = start("a", ca, sa).await;
                let b = start("b", cb, sb).await;
                (a, b)
            } else {
                let b = start("b", cb, sb).await;
                let a = start("a", ca, sa).await;
                (a, b)
            };
            settle(&mut a, &mut b).await;
            // The survivor carries frames.
            a.t.send(b.id, text_frame("ping")).unwrap();
            expect_text(&mut b, a.id, "ping").await;
            b.t.send(a.id, text_frame("pong")).unwrap();
            expect_text(&mut a, b.id, "pong").await;
            assert_eq!(settled(&a, &b), Ok(()));
            if a.t.inner.next_conn_id.load(Ordering::Relaxed) > 2
                || b.t.inner.next_conn_id.load(Ordering::Relaxed) > 2
            {
                raced += 1;
            }
            // Stopping this pair may overlap the next round: pairs share nothing.
            stops.push(tokio::spawn(async move {
                tokio::join!(a.t.shutdown(), b.t.shutdown());
            }));
        }
        for s in stops {
            s.await.unwrap();
        }
        eprintln!("rounds in which both dials reached registration on a node: {raced}/50");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_or_empty_frames_disconnect_the_peer() {
        logs();
        let (mut a, mut b, _ia, _ib) = pair().await;
        for (raw, expect) in [
            (
                ((FRAME_BYTES_MAX + 1) as u32).to_be_bytes().to_vec(),
                "exceeds",
            ),
            (vec![0, 0, 0, 0], "empty frame"),
        ] {
            let (b_conn, _) = b.live(a.id).unwrap();
            let a_conn = a.live(b.id).unwrap().0;
            // Bypass `send`'s checks: write raw bytes on the stream.
            let mut bytes = raw.clone();
            bytes.extend_from_slice(&[1; 16]);
            {
                let st = a.t.inner.lock();
                let live = st.peers[&b.id].live.as_ref().unwrap();
                live.tx.as_ref().unwrap().try_send(bytes).unwrap();
            }
            let ev = b
                .wait_for("PeerDown", |e| matches!(e, PeerDown { .. }))
                .await;
            assert!(
                matches!(&ev, PeerDown { conn_id, reason, .. } if *conn_id == b_conn && reason.contains(expect)),
                "{ev:?}"
            );
            let ev = a
                .wait_for("PeerDown", |e| matches!(e, PeerDown { .. }))
                .await;
            assert!(
                matches!(&ev, PeerDown { conn_id, reason, .. } if *conn_id == a_conn && reason.contains("protocol violation")),
                "{ev:?}"
            );
            assert!(!b.log.iter().any(|e| matches!(e, Frame { .. })));
            // The supervisors reconnect.
            settle(&mut a, &mut b).await;
            assert_ne!(b.live(a.id).unwrap().0, b_conn);
        }
        tokio::join!(a.t.shutdown(), b.t.shutdown());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cloned_identity_is_refused_while_the_original_is_connected() {
        logs();
        let (mut a, mut b, _ia, ib) = pair().await;
        let a_addr = a.t.local_addr();
        let a_conn = a.live(b.id).unwrap().0;
        let ups_before = a.ups(b.id);
        let mark = a.log.len();

        // Same identity as B, another process (nonce).
        let mut clone = start(
            "clone",
            config(
                &ib,
                "b",
                99,
                vec![PeerEntry {
                    name: "a".into(),
                    id: a.id,
                    addr: a_addr,
                }],
            ),
            bind(),
        )
        .await;
        let ev = a
            .wait_for("Refused clone", |e| matches!(e, Refused { reason, .. } if reason.contains("different process nonces")))
            .await;
        assert!(
            matches!(&ev, Refused { node_id: Some(n), .. } if *n == ib.node_id.hex()),
            "{ev:?}"
        );
        clone
            .wait_for(
                "clone told",
                |e| matches!(e, Refused { reason, .. } if reason.contains("cloned identity")),
            )
            .await;

        // The original connection is untouched and still carries frames.
        a.t.send(b.id, text_frame("still here")).unwrap();
        expect_text(&mut b, a.id, "still here").await;
        a.drain();
        assert_eq!(a.live(b.id).map(|l| l.0), Some(a_conn));
        assert_eq!(a.live_nonce(b.id), Some(2));
        assert_eq!(a.ups(b.id), ups_before);
        assert!(!a.log[mark..].iter().any(|e| matches!(e, PeerDown { .. })));
        clone.drain();
        assert!(!clone
            .log
            .iter()
            .any(|e| matches!(e, PeerUp { .. } | Frame { .. })));

        // Once the original is gone, the other process may connect.
        b.t.shutdown().await;
        a.wait_for(
            "original down",
            |e| matches!(e, PeerDown { conn_id, .. } if *conn_id == a_conn),
        )
        .await;
        let ev = a.wait_for("clone up", |e| matches!(e, PeerUp { .. })).await;
        assert!(
            matches!(&ev, PeerUp { hello, peer, .. } if hello.nonce == 99 && *peer == ib.node_id),
            "{ev:?}"
        );
        clone
            .wait_for("clone up", |e| matches!(e, PeerUp { .. }))
            .await;
        tokio::join!(a.t.shutdown(), clone.t.shutdown());
    }

    /// Forwards datagrams between one client and `target` until aborted.
    async fn udp_proxy(target: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut client = None;
            let (mut b1, mut b2) = (vec![0u8; 65536], vec![0u8; 65536]);
            loop {
                tokio::select! {
                    Ok((n, from)) = front.recv_from(&mut b1) => {
                        client = Some(from);
                        let _ = back.send_to(&b1[..n], target).await;
                    }
                    Ok((n, _)) = back.recv_from(&mut b2) => {
                        if let Some(c) = client {
                            let _ = front.send_to(&b2[..n], c).await;
                        }
                    }
                }
            }
        });
        (addr, task)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_peer_replaces_its_silent_old_connection() {
        logs();
        let ia = Identity::generate("a").unwrap();
        let ib = Identity::generate("b").unwrap();
        let (sa, sb) = (bind(), bind());
        let aa = sa.local_addr().unwrap();
        let (proxy, proxy_task) = udp_proxy(sb.local_addr().unwrap()).await;
        let black_hole = bind();
        // A reaches B only through the proxy; B's own dials go nowhere.
        let mut a = start("a", config(&ia, "a", 1, vec![entry("b", &ib, proxy)]), sa).await;
        let mut b = start(
            "b",
            config(
                &ib,
                "b",
                2,
                vec![entry("a", &ia, black_hole.local_addr().unwrap())],
            ),
            sb,
        )
        .await;
        let old = a.wait_for("up", |e| matches!(e, PeerUp { .. })).await;
        let PeerUp { conn_id: old, .. } = old else {
            unreachable!()
        };
        b.wait_for("up", |e| matches!(e, PeerUp { .. })).await;

        // B's process "dies": its packets stop, nothing says goodbye.
        proxy_task.abort();
        b.kill();
        // B restarts (same identity, new nonce) and dials A directly.
        let mut b2 = start("b2", config(&ib, "b", 3, vec![entry("a", &ia, aa)]), bind()).await;
        let ev = a
            .wait_for("old down", |e| matches!(e, PeerDown { .. }))
            .await;
        assert!(
            matches!(&ev, PeerDown { conn_id, reason, .. } if *conn_id == old && reason.contains("restarted")),
            "{ev:?}"
        );
        let ev = a.wait_for("new up", |e| matches!(e, PeerUp { .. })).await;
        assert!(
            matches!(&ev, PeerUp { hello, .. } if hello.nonce == 3),
            "{ev:?}"
        );
        b2.wait_for("up", |e| matches!(e, PeerUp { .. })).await;
        assert!(a.refused().is_empty(), "{:?}", a.refused());
        a.t.send(ib.node_id, text_frame("welcome back")).unwrap();
        expect_text(&mut b2, ia.node_id, "welcome back").await;
        drop(black_hole);
        tokio::join!(a.t.shutdown(), b2.t.shutdown());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_disconnects_and_unblocking_reconnects() {
        logs();
        let (mut a, mut b, _ia, _ib) = pair().await;
        a.t.set_blocked(b.id, true);
        assert!(a.t.connected().is_empty());
        assert_eq!(
            a.t.send(b.id, text_frame("x")),
            Err(SendError::NotConnected)
        );
        let ev = a.wait_for("down", |e| matches!(e, PeerDown { .. })).await;
        assert!(
            matches!(&ev, PeerDown { reason, .. } if reason == "blocked"),
            "{ev:?}"
        );
        let ev = b.wait_for("down", |e| matches!(e, PeerDown { .. })).await;
        assert!(
            matches!(&ev, PeerDown { reason, .. } if reason.contains("blocks")),
            "{ev:?}"
        );

        // B keeps dialing (every 20-200 ms) and is turned away each time.
        let window = Instant::now() + Duration::from_millis(400);
        while Instant::now() < window {
            a.drain();
            b.drain();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(a.lifecycle(b.id), Ok(None));
        assert_eq!(b.lifecycle(a.id), Ok(None));
        assert!(a.t.connected().is_empty() && b.t.connected().is_empty());

        let unblocked = Instant::now();
        a.t.set_blocked(b.id, false);
        settle(&mut a, &mut b).await;
        assert!(
            unblocked.elapsed() < Duration::from_secs(2),
            "{:?}",
            unblocked.elapsed()
        );
        b.t.send(a.id, text_frame("back")).unwrap();
        expect_text(&mut a, b.id, "back").await;
        tokio::join!(a.t.shutdown(), b.t.shutdown());
    }

    /// `reconnect` drops the connection without blocking: the peer is told why
    /// (not "blocks this node") and the two connect again by themselves.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reconnect_closes_and_the_peers_connect_again() {
        logs();
        let (mut a, mut b, _ia, _ib) = pair().await;
        a.t.reconnect(b.id, "outbound queue full");
        let ev = b.wait_for("down", |e| matches!(e, PeerDown { .. })).await;
        assert!(
            matches!(&ev, PeerDown { reason, .. } if reason.contains("restarts the connection")),
            "{ev:?}"
        );
        a.wait_for("down", |e| matches!(e, PeerDown { .. })).await;
        settle(&mut a, &mut b).await;
        b.t.send(a.id, text_frame("again")).unwrap();
        expect_text(&mut a, b.id, "again").await;
        tokio::join!(a.t.shutdown(), b.t.shutdown());
    }

    /// A retired peer's old address comes back to life while a dial to it is
    /// still retrying its handshake (the CI failure of the retirement test): the
    /// peer must never see an accepted connection, and unblocking does not lift
    /// a revocation.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dial_in_flight_when_the_peer_is_revoked_never_reaches_it() {
        logs();
        let [(_, ca, sa), (ib, cb, sb)] = pair_configs();
        // B's socket is bound but nobody reads it: A's Initial packets wait there.
        let mut a = start("a", ca, sa).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.t.revoke(ib.node_id);
        a.t.set_blocked(ib.node_id, false);
        let mut b = start("b", cb, sb).await;
        let window = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < window {
            a.drain();
            b.drain();
            assert!(b.t.connected().is_empty(), "B was let in: {:#?}", b.log);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for n in [&a, &b] {
            assert!(
                !n.log.iter().any(|e| matches!(e, PeerUp { .. })),
                "{} saw a connection come up: {:#?}",
                n.name,
                n.log
            );
        }
        tokio::join!(a.t.shutdown(), b.t.shutdown());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dial_into_a_dead_link_is_started_afresh_after_the_connect_timeout() {
        logs();
        let [(_, mut ca, sa), (_, mut cb, sb)] = pair_configs();
        ca.connect_timeout = Duration::from_millis(200);
        // Only A dials: B's own dials go to a socket nobody reads.
        let nowhere = bind();
        cb.peers[0].addr = nowhere.local_addr().unwrap();
        // The link is dead for 1.5 s: whatever reaches B's address is read
        // and dropped. QUIC would retransmit A's first Initial only after
        // about 1 s and then 3 s; a fresh dial sends a new one at once.
        let dead = sb.try_clone().unwrap();
        dead.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let sink = std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_millis(1500);
            let mut buf = [0u8; 2048];
            let mut dropped = 0;
            while Instant::now() < until {
                if dead.recv_from(&mut buf).is_ok() {
                    dropped += 1;
                }
            }
            dropped
        });
        let mut a = start("a", ca, sa).await;
        let dropped = tokio::task::spawn_blocking(move || sink.join().unwrap())
            .await
            .unwrap();
        assert!(dropped > 0, "A never dialled into the dead link");
        sb.set_read_timeout(None).unwrap();
        let healed = Instant::now();
        let mut b = start("b", cb, sb).await;
        a.wait_for("up", |e| matches!(e, PeerUp { .. })).await;
        let waited = healed.elapsed();
        assert!(
            waited < Duration::from_millis(1000),
            "the connection came up {waited:?} after the link healed (connect timeout 200 ms, reconnect delay <= 200 ms)"
        );
        b.drain();
        tokio::join!(a.t.shutdown(), b.t.shutdown());
        drop(nowhere);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hellos_carry_the_digest_set_last() {
        logs();
        let (mut a, mut b, _ia, _ib) = pair().await;
        // Before any digest is set, hellos carry none.
        let first_hello = |n: &Node| {
            n.log.iter().rev().find_map(|e| match e {
                PeerUp { hello, .. } => Some(hello.clone()),
                _ => None,
            })
        };
        assert_eq!(first_hello(&a).unwrap().digest, None);
        let da = HelloDigest {
            root: [1; 32],
            keys: [2; 32],
        };
        let db = HelloDigest {
            root: [3; 32],
            keys: [4; 32],
        };
        a.t.set_hello_digest(Some(HelloDigest {
            root: [9; 32],
            keys: [9; 32],
        }));
        a.t.set_hello_digest(Some(da));
        b.t.set_hello_digest(Some(db));
        a.t.set_blocked(b.id, true);
        a.wait_for("down", |e| matches!(e, PeerDown { .. })).await;
        b.wait_for("down", |e| matches!(e, PeerDown { .. })).await;
        a.t.set_blocked(b.id, false);
        let ev = a.wait_for("up", |e| matches!(e, PeerUp { .. })).await;
        assert!(
            matches!(&ev, PeerUp { hello, .. } if hello.digest == Some(db)),
            "{ev:?}"
        );
        let ev = b.wait_for("up", |e| matches!(e, PeerUp { .. })).await;
        assert!(
            matches!(&ev, PeerUp { hello, .. } if hello.digest == Some(da)),
            "{ev:?}"
        );
        tokio::join!(a.t.shutdown(), b.t.shutdown());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mismatched_hellos_are_refused_with_the_reason() {
        logs();
        let ia = Identity::generate("a").unwrap();
        let ib = Identity::generate("b").unwrap();
        let (sa, sb) = (bind(), bind());
        let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
        let mut cb = config(&ib, "b", 2, vec![entry("a", &ia, aa)]);
        cb.hello.buckets = 32;
        let mut a = start("a", config(&ia, "a", 1, vec![entry("b", &ib, ab)]), sa).await;
        let mut b = start("b", cb, sb).await;
        for n in [&mut a, &mut b] {
            n.wait_for(
                "bucket refusal",
                |e| matches!(e, Refused { reason, .. } if reason.contains("buckets")),
            )
            .await;
        }
        a.drain();
        b.drain();
        assert_eq!(a.ups(b.id) + b.ups(a.id), 0);
        tokio::join!(a.t.shutdown(), b.t.shutdown());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn start_reports_an_address_in_use_clearly() {
        let taken = bind();
        let ia = Identity::generate("a").unwrap();
        let mut cfg = config(&ia, "a", 1, vec![]);
        cfg.listen = taken.local_addr().unwrap();
        let (tx, _rx) = mpsc::channel(8);
        let err = Transport::start(cfg.clone(), tx.clone())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("address in use"), "{err}");
        cfg.keep_alive = cfg.idle_timeout;
        cfg.listen = "127.0.0.1:0".parse().unwrap();
        let err = Transport::start(cfg, tx).await.unwrap_err().to_string();
        assert!(err.contains("keep-alive"), "{err}");
    }

    #[test]
    fn rejected_keys_are_found_in_handshake_errors() {
        let id = Identity::generate("x").unwrap().node_id;
        let err = rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
            Arc::new(KeyRejected { id, own: false }),
        )));
        let text = err.to_string();
        assert_eq!(rejected_key(&text, UNKNOWN_KEY_MARKER), Some(id));
        assert_eq!(rejected_key(&text, OWN_KEY_MARKER), None);
        assert_eq!(
            rejected_key("unknown peer key zz", UNKNOWN_KEY_MARKER),
            None
        );
    }
}
