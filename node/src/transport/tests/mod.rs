//! The transport's tests: real QUIC on loopback between real endpoints.

mod exchange;
mod identity;
mod links;

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
