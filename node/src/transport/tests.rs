//! The transport's tests: real QUIC on loopback between real endpoints.

use super::tls::{rejected_key, KeyRejected, OWN_KEY_MARKER, UNKNOWN_KEY_MARKER};
use super::*;
use rustls::CertificateError;
use std::net::UdpSocket as StdUdpSocket;
use storemesh_protocol::wire::{self, FRAME_BYTES_MAX, FRAME_VERSION, PROTOCOL_VERSION};
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
        .wait_for(
            "Refused clone",
            |e| matches!(e, Refused { reason, .. } if reason.contains("different process nonces")),
        )
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

/// A UDP relay for one client that can cut the link: while cut it reads and
/// drops every datagram, both ways (like a dead network path: no ICMP, no
/// answer). Counts the datagrams it dropped.
struct CutRelay {
    addr: SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
    dropped: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CutRelay {
    async fn start(target: SocketAddr) -> CutRelay {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let (c, d) = (cut.clone(), dropped.clone());
        let task = tokio::spawn(async move {
            let mut client = None;
            let (mut b1, mut b2) = (vec![0u8; 65536], vec![0u8; 65536]);
            loop {
                tokio::select! {
                    Ok((n, from)) = front.recv_from(&mut b1) => {
                        if c.load(Ordering::SeqCst) {
                            d.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        client = Some(from);
                        let _ = back.send_to(&b1[..n], target).await;
                    }
                    Ok((n, _)) = back.recv_from(&mut b2) => {
                        if c.load(Ordering::SeqCst) {
                            d.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        if let Some(to) = client {
                            let _ = front.send_to(&b2[..n], to).await;
                        }
                    }
                }
            }
        });
        CutRelay {
            addr,
            cut,
            dropped,
            task,
        }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healed_link_is_noticed_at_once_without_a_dial_storm() {
    logs();
    let (ia, ib) = (
        Identity::generate("a").unwrap(),
        Identity::generate("b").unwrap(),
    );
    let (sa, sb) = (bind(), bind());
    // Each side dials the other through its own relay; the test cuts both.
    let to_b = CutRelay::start(sb.local_addr().unwrap()).await;
    let to_a = CutRelay::start(sa.local_addr().unwrap()).await;
    let timings = |mut c: TransportConfig| {
        // A cut connection is noticed after 1 s of silence.
        c.keep_alive = Duration::from_millis(200);
        c.idle_timeout = Duration::from_secs(1);
        // The default reconnect back-off (up to 15 s between dials without
        // the redial cap), and a connect timeout of 500 ms (`sync.connect_timeout_ms`).
        c.reconnect_min = DEFAULT_RECONNECT_MIN;
        c.reconnect_max = DEFAULT_RECONNECT_MAX;
        c.connect_timeout = Duration::from_millis(500);
        c
    };
    let ca = timings(config(&ia, "a", 1, vec![entry("b", &ib, to_b.addr)]));
    let cb = timings(config(&ib, "b", 2, vec![entry("a", &ia, to_a.addr)]));
    let mut a = start("a", ca, sa).await;
    let mut b = start("b", cb, sb).await;
    a.wait_for("up", |e| matches!(e, PeerUp { .. })).await;
    b.wait_for("up", |e| matches!(e, PeerUp { .. })).await;

    to_b.set_cut(true);
    to_a.set_cut(true);
    a.wait_for("down", |e| matches!(e, PeerDown { .. })).await;
    b.wait_for("down", |e| matches!(e, PeerDown { .. })).await;
    // Hold the cut long enough for the uncapped back-off (doubling from
    // 250 ms up to 15 s after each unanswered dial) to leave gaps of seconds.
    let held = Duration::from_secs(4);
    let dials_before = [a.t.dials_started(), b.t.dials_started()];
    tokio::time::sleep(held).await;
    let dials_cut = [
        a.t.dials_started() - dials_before[0],
        b.t.dials_started() - dials_before[1],
    ];
    // No storm: one dial at a time, each lasting the connect timeout (500 ms)
    // before the next starts: at most one per 500 ms per peer, plus the first.
    let most = (held.as_millis() / 500) as u64 + 2;
    for (n, name) in dials_cut.iter().zip(["a", "b"]) {
        assert!(
            (2..=most).contains(n),
            "{name} started {n} dials during a {held:?} cut (expected 2..={most})"
        );
    }
    assert!(
        to_a.dropped.load(Ordering::Relaxed) > 0 && to_b.dropped.load(Ordering::Relaxed) > 0,
        "no dial reached the cut link"
    );

    let healed = Instant::now();
    to_b.set_cut(false);
    to_a.set_cut(false);
    a.wait_for("up again", |e| matches!(e, PeerUp { .. })).await;
    b.wait_for("up again", |e| matches!(e, PeerUp { .. })).await;
    let waited = healed.elapsed();
    eprintln!(
        "healed link noticed after {waited:?}; dials during the {held:?} cut: a {}, b {}",
        dials_cut[0], dials_cut[1]
    );
    // The next Initial crosses within the connect timeout plus
    // REDIAL_INTERVAL_MAX (750 ms); the handshake and hello take a few round
    // trips. Generous for 2 busy cores.
    assert!(
        waited < Duration::from_millis(1500),
        "the connection came up {waited:?} after the link healed"
    );
    settle(&mut a, &mut b).await;
    a.t.send(ib.node_id, text_frame("after the heal")).unwrap();
    expect_text(&mut b, ia.node_id, "after the heal").await;
    // Connected: no further dials start.
    let dials_up = [a.t.dials_started(), b.t.dials_started()];
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(dials_up, [a.t.dials_started(), b.t.dials_started()]);
    tokio::join!(a.t.shutdown(), b.t.shutdown());
    to_a.task.abort();
    to_b.task.abort();
}
