//! Connection IO: the quinn endpoint's accept loop and dials, the hello,
//! registration under the one-connection-per-pair rule, the reader and writer
//! tasks of a live connection and the per-peer dial supervisor.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use anyhow::anyhow;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use rand::Rng;
use storemesh_protocol::ids::NodeId;
use storemesh_protocol::wire::{Hello, FRAME_BYTES_MAX};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::time::{timeout, Instant};
use tracing::{debug, error, info, warn};

use super::events::*;
use super::frames::*;
use super::tls::*;
use super::*;
use storemesh_protocol::arbitration::{
    arbitrate, Arbitration, Backoff, ConnFacts, JITTER_MAX, JITTER_MIN,
};

pub(super) fn bind_error(addr: SocketAddr, e: &std::io::Error) -> anyhow::Error {
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

pub(super) fn tune_socket(socket: &std::net::UdpSocket, addr: SocketAddr) {
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

// Connection setup

/// A connection whose hello passed, waiting to be registered.
pub(super) struct Candidate {
    peer: NodeId,
    conn: Connection,
    addr: SocketAddr,
    conn_id: u64,
    dialed_by_us: bool,
    hello: Hello,
}

/// What the connection task needs once a candidate is registered.
pub(super) struct Registration {
    predecessor: Option<watch::Receiver<bool>>,
    done_tx: watch::Sender<bool>,
    rx: mpsc::Receiver<Vec<u8>>,
    queued_bytes: Arc<std::sync::atomic::AtomicUsize>,
    writer_done_tx: watch::Sender<bool>,
    note: Note,
}

pub(super) enum Decision {
    Accept(Registration, Option<Live>),
    Reject(u32, &'static str),
    Probe(Connection, u64),
}

impl Inner {
    pub(super) fn decide(&self, c: &Candidate) -> Decision {
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
            let seen = ConnFacts {
                dialed_by_us: live.dialed_by_us,
                nonce: live.nonce,
            };
            let arriving = ConnFacts {
                dialed_by_us: c.dialed_by_us,
                nonce: c.hello.nonce,
            };
            match arbitrate(self.our_id, c.peer, seen, arriving) {
                Arbitration::Probe => return Decision::Probe(live.conn.clone(), live.conn_id),
                Arbitration::KeepLive => {
                    return Decision::Reject(CLOSE_DUPLICATE, "duplicate connection")
                }
                Arbitration::Replace => {}
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
    pub(super) fn unregister(&self, peer: NodeId, conn_id: u64) -> Option<Live> {
        let mut st = self.lock();
        let slot = st.peers.get_mut(&peer)?;
        if slot.live.as_ref().is_some_and(|l| l.conn_id == conn_id) {
            slot.wake.notify_one();
            slot.live.take()
        } else {
            None
        }
    }

    pub(super) fn mark_announced(&self, peer: NodeId, conn_id: u64) -> bool {
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
pub(super) async fn register(inner: &Arc<Inner>, c: &Candidate) -> Result<Registration, String> {
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
pub(super) async fn probe(conn: &Connection) -> bool {
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
pub(super) async fn answer_probes(conn: Connection) {
    while let Ok(mut s) = conn.accept_uni().await {
        let _ = timeout(PROBE_TIMEOUT_MAX, s.read_to_end(16)).await;
    }
}

pub(super) async fn accept_loop(inner: Arc<Inner>) {
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

pub(super) fn release_handshake_slot(inner: &Inner, ip: std::net::IpAddr) {
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

pub(super) async fn handle_incoming(inner: Arc<Inner>, incoming: quinn::Incoming) {
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
    let Ok(their) = their_hello(&inner, &conn, addr, peer, &body) else {
        return;
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

/// The peer's hello, decoded and checked against ours and its TLS identity;
/// a hello that fails is refused (`Inner::bad_hello`) and `Err` says why.
fn their_hello(
    inner: &Inner,
    conn: &Connection,
    addr: SocketAddr,
    peer: NodeId,
    body: &[u8],
) -> Result<Hello, String> {
    Hello::decode_frame(body)
        .and_then(|h| h.check(&inner.our_hello, &peer.hex()).map(|()| h))
        .inspect_err(|e| inner.bad_hello(conn, addr, peer, e))
}

/// The error of a dial that got no answer within the connect timeout.
const UNANSWERED: &str = "no answer within the connect timeout";

/// Dials `peer` and runs the hello. `Ok` once the connection is registered.
pub(super) async fn dial(inner: &Arc<Inner>, peer: NodeId, addr: SocketAddr) -> Result<(), String> {
    let connecting = inner
        .endpoint
        .connect(addr, SERVER_NAME)
        .map_err(|e| format!("cannot dial: {e}"))?;
    // Dropping the `Connecting` on timeout abandons that handshake.
    let conn = match timeout(inner.connect_timeout, connecting).await {
        Err(_) => return Err(UNANSWERED.into()),
        Ok(Err(quinn::ConnectionError::TimedOut)) => return Err(UNANSWERED.into()),
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
    let their =
        their_hello(inner, &conn, addr, peer, &body).map_err(|e| format!("bad hello: {e}"))?;
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
pub(super) async fn run_connection(
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
pub(super) async fn read_loop(
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
pub(super) async fn run_writer(
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
pub(super) async fn supervise(
    inner: Arc<Inner>,
    peer: NodeId,
    addr: SocketAddr,
    wake: Arc<Notify>,
) {
    let mut backoff = Backoff::new(inner.reconnect_min, inner.reconnect_max);
    let mut next_dial = Instant::now();
    let mut up_since: Option<Instant> = None;
    // Since when the peer has not answered (start-up, or the end of the last
    // connection): the fast redial window counts from here.
    let mut silent_since = Instant::now();
    loop {
        match inner.status(peer) {
            PeerStatus::Shutdown => return,
            PeerStatus::Blocked => {
                backoff.reset();
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
            silent_since = Instant::now();
            next_dial = Instant::now() + backoff.connection_ended(since.elapsed(), jitter());
        }
        if Instant::now() < next_dial {
            tokio::select! {
                _ = tokio::time::sleep_until(next_dial) => {}
                _ = wake.notified() => {}
            }
            continue;
        }
        inner.dials_started.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = dial(&inner, peer, addr).await {
            // No answer at all (a cut link, a host that is down): dial again
            // soon, so that a healed link is noticed at once; an answer that
            // refused gets the full back-off.
            let wait = if e == UNANSWERED {
                backoff.unanswered(
                    silent_since.elapsed(),
                    FAST_REDIAL_WINDOW,
                    REDIAL_INTERVAL_MAX,
                    jitter(),
                )
            } else {
                backoff.fail(jitter())
            };
            debug!(peer = %peer, %addr, error = %e, retry_in = ?wait, backoff = ?backoff.current(), "dial failed");
            next_dial = Instant::now() + wait;
        }
    }
}

/// A random jitter factor for [`Backoff`].
fn jitter() -> f64 {
    rand::thread_rng().gen_range(JITTER_MIN..JITTER_MAX)
}
