//! Issue 16, end to end: a member gone bad (a stolen store PC: its identity
//! and trusted key, speaking real QUIC) sends writes only others may make.
//! The honest node refuses each, counts it as
//! `storemesh_rejected_changes_total{reason="unauthorized"}` (signed by the
//! stolen key but writing what only others may) or `reason="bad_signature"`
//! (written as another member, signed by the stolen key or not at all), and
//! its stock and rights are unchanged.

use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT};
use storemesh_node::config::Config;
use storemesh_node::identity::Identity;
use storemesh_node::transport::{PeerEntry, Transport, TransportConfig, TransportEvent};
use storemesh_protocol::ids::{ActorKey, NodeId};
use storemesh_protocol::layout::DocId;
use storemesh_protocol::rebalance::{RightsRequest, REQUEST_HOPS_MAX};
use storemesh_protocol::sync::Msg;
use storemesh_protocol::wire::{encode_frame, Hello, PROTOCOL_VERSION};
use storemesh_testkit::*;
use tokio::sync::mpsc;

/// A member gone bad: node 1's identity and trusted key, driven by hand over
/// real QUIC.
#[allow(dead_code)]
struct Hostile {
    transport: Transport,
    me: NodeId,
    events: mpsc::Receiver<TransportEvent>,
    victim: NodeId,
    tag: storemesh_protocol::ids::NodeTag,
    location: String,
    buckets: u32,
    /// The stolen node's own signing key.
    signer: storemesh_node::signing::NodeSigner,
}

impl Hostile {
    /// Stops node `me` of the mesh and speaks as it to node `victim`.
    async fn take_over(m: &mut Mesh, me: usize, victim: usize) -> Hostile {
        m.stop(me).await;
        let dir = m.dirs[me].0.clone();
        let cfg = Config::load(&dir).unwrap();
        let identity = Identity::load(&dir).unwrap();
        let my_id = identity.node_id;
        let signer = storemesh_node::signing::NodeSigner::from_pkcs8(&identity.key_der).unwrap();
        let vcfg = Config::load(&m.dirs[victim].0).unwrap();
        let victim_id = Identity::load(&m.dirs[victim].0).unwrap().node_id;
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: my_id.hex(),
            name: cfg.name.clone(),
            buckets: cfg.buckets,
            nonce: rand::random(),
            digest: None,
        };
        let peers = vec![PeerEntry {
            name: vcfg.name.clone(),
            id: victim_id,
            addr: m.node(victim).quic_addr,
        }];
        let listen = "127.0.0.1:0".parse().unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        let transport = Transport::start(TransportConfig::new(identity, listen, peers, hello), tx)
            .await
            .unwrap();
        let t = Instant::now();
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("victim reached")
                .unwrap();
            if matches!(ev, TransportEvent::PeerUp { .. }) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(10));
        }
        Hostile {
            transport,
            me: my_id,
            events: rx,
            victim: victim_id,
            tag: my_id.tag(),
            location: cfg.location.clone(),
            buckets: cfg.buckets,
            signer,
        }
    }

    /// Pushes `data`, its changes signed with the stolen node's own key.
    fn push(&mut self, doc: &str, data: Vec<u8>) {
        self.push_with(doc, data, true);
    }

    /// Pushes `data`, signed with the stolen key (`sign`) or unsigned.
    fn push_with(&mut self, doc: &str, data: Vec<u8>, sign: bool) {
        // Drain what the victim sent (its sync offers), so nothing backs up.
        while self.events.try_recv().is_ok() {}
        if sign {
            let cert = storemesh_protocol::signing::certify_chunk(&self.signer, &data).unwrap();
            let frame = encode_frame(&Msg::Certs {
                certs: vec![cert],
                intros: vec![],
            })
            .unwrap();
            self.transport.send(self.victim, frame).unwrap();
        }
        let frame = encode_frame(&Msg::Push {
            doc: doc.into(),
            data,
            seen: vec![],
        })
        .unwrap();
        self.transport.send(self.victim, frame).unwrap();
    }
}

/// One change by a fresh incarnation of the hostile node's own writer.
fn forged(h: &Hostile, incarnation: u8, key: &str, value: &str) -> Vec<u8> {
    let actor = ActorKey::new(h.tag, [9, 9, 9, incarnation]);
    let mut doc = Automerge::new().with_actor(actor.automerge());
    let mut tx = doc.transaction();
    tx.put(ROOT, key, value).unwrap();
    tx.commit();
    doc.get_last_local_change().unwrap().raw_bytes().to_vec()
}

async fn rejected(c: &Client, reason: &str) -> u64 {
    let r = reqwest::get(format!("{}/metrics", c.base)).await.unwrap();
    let text = r.text().await.unwrap();
    let want = format!("storemesh_rejected_changes_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_member_can_not_retire_rename_write_for_or_drain_another_node() {
    let mut m = Mesh::start(
        &[
            ("store-a", Role::Store, Policy::Strict),
            ("store-b", Role::Store, Policy::Strict),
        ],
        &[(0, 1)],
    )
    .await;
    m.wait_connected(0, 1).await;
    let (st, v) = m.clients[0]
        .post("/api/receipts", receipt("r1", "store-a", &[(1, 10)]))
        .await
        .unwrap();
    assert_eq!(st, 201, "{v}");
    let mut h = Hostile::take_over(&mut m, 1, 0).await;
    let a = &m.clients[0];
    let victim = h.victim;
    let made_up = NodeId([0x5a; 32]);
    // A retirement of store-a to a node nobody holds.
    let retire = serde_json::json!({"successor": made_up.tag().hex()}).to_string();
    let c = forged(&h, 1, &format!("retired/{}", victim.tag()), &retire);
    h.push("mesh", c);
    // A directory entry taking store-a's name.
    let info = serde_json::json!({"name": "store-a", "location": "store-b", "role": "store", "policy": "strict"}).to_string();
    let c = forged(&h, 2, &format!("{}/info", h.tag), &info);
    h.push("mesh", c);
    // A deficit record in store-a's name.
    let doc = DocId::Records {
        tag: h.tag,
        month: 202611,
        part: 0,
    }
    .encode();
    let deficit = serde_json::json!({"count_id": "x", "node": "store-a", "location": "store-a", "product_id": 1, "deficit": 5, "at_ms": 1}).to_string();
    let c = forged(&h, 3, "def/x", &deficit);
    h.push(&doc, c);
    // A rights request for a made-up node.
    let req = Msg::Rights(RightsRequest {
        req_id: 1,
        origin: made_up.hex(),
        product_id: 1,
        location: "store-a".into(),
        quantity: 10,
        hops_left: REQUEST_HOPS_MAX,
    });
    h.transport
        .send(victim, encode_frame(&req).unwrap())
        .unwrap();
    wait_for(Duration::from_secs(10), || async {
        rejected(a, "unauthorized").await >= 4
    })
    .await
    .expect("every forgery is refused and counted");
    assert_eq!(rejected(a, "unauthorized").await, 4);
    // store-a still holds all its rights and sells them.
    let (st, v) = a
        .post("/api/sales", sale("s1", Some("store-a"), &[(1, 10)]))
        .await
        .unwrap();
    assert_eq!(st, 201, "{v}");
    assert_eq!(stock_level(a, 1).await, Some(0));
    let (st, v) = a.get("/api/overdrafts").await.unwrap();
    assert_eq!(st, 200);
    assert!(
        !v.to_string().contains("\"deficit\":5"),
        "the forged deficit is not listed: {v}"
    );
    h.transport.shutdown().await;
    m.shutdown().await;
}

/// Issue 16, finding 1: the stolen member writes as ANOTHER member (store-c's
/// actor id), once signing with its own key and once unsigned: both refused
/// as `bad_signature`, nothing applied, store-a's stock unchanged. On main
/// (no signatures) both were applied: store-a's stock rose by 2,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_member_can_not_write_as_another_member() {
    use storemesh_protocol::layout::{ledger_key, LedgerField};
    let mut m = Mesh::start(
        &[
            ("store-a", Role::Store, Policy::Strict),
            ("store-b", Role::Store, Policy::Strict),
            ("store-c", Role::Store, Policy::Strict),
        ],
        &[(0, 1), (0, 2), (1, 2)],
    )
    .await;
    m.wait_connected(0, 2).await;
    let (st, v) = m.clients[0]
        .post("/api/receipts", receipt("r1", "store-a", &[(1, 10)]))
        .await
        .unwrap();
    assert_eq!(st, 201, "{v}");
    let c_id = Identity::load(&m.dirs[2].0).unwrap().node_id;
    let mut h = Hostile::take_over(&mut m, 1, 0).await;
    let a = &m.clients[0];
    assert_eq!(stock_level(a, 1).await, Some(10));
    let doc = DocId::Ledger {
        location: "store-a".into(),
        bucket: storemesh_protocol::ids::product_bucket(1, h.buckets),
        epoch: 0,
    }
    .encode();
    // store-c "received" 1,000 units at store-a: signed by the stolen key.
    for (i, sign) in [(1u8, true), (2u8, false)] {
        let actor = ActorKey::new(c_id.tag(), [7, 7, 7, i]);
        let mut d = Automerge::new().with_actor(actor.automerge());
        let mut tx = d.transaction();
        tx.put(ROOT, ledger_key(1, actor, LedgerField::Received), 1_000u64)
            .unwrap();
        tx.commit();
        let c = d.get_last_local_change().unwrap().raw_bytes().to_vec();
        h.push_with(&doc, c, sign);
    }
    wait_for(Duration::from_secs(10), || async {
        rejected(a, "bad_signature").await >= 2
    })
    .await
    .expect("both forgeries are refused and counted");
    assert_eq!(rejected(a, "bad_signature").await, 2);
    assert_eq!(rejected(a, "unknown_author").await, 0);
    // The honest stock is unchanged, and store-a still sells exactly it.
    assert_eq!(stock_level(a, 1).await, Some(10));
    let (st, v) = a
        .post("/api/sales", sale("s1", Some("store-a"), &[(1, 11)]))
        .await
        .unwrap();
    assert_eq!(st, 409, "{v}");
    h.transport.shutdown().await;
    m.shutdown().await;
}

/// A node nobody admitted (its own key, configured nowhere, introduced by
/// no member: TLS would refuse it as a peer) has its changes relayed by a
/// stolen member: refused as `unknown_author`, nothing applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_by_a_node_nobody_admitted_are_refused() {
    use storemesh_protocol::layout::{ledger_key, LedgerField};
    let mut m = Mesh::start(
        &[
            ("store-a", Role::Store, Policy::Strict),
            ("store-b", Role::Store, Policy::Strict),
        ],
        &[(0, 1)],
    )
    .await;
    m.wait_connected(0, 1).await;
    let mut h = Hostile::take_over(&mut m, 1, 0).await;
    let a = &m.clients[0];
    let stranger = Identity::generate("stranger").unwrap();
    let signer = storemesh_node::signing::NodeSigner::from_pkcs8(&stranger.key_der).unwrap();
    let doc = DocId::Ledger {
        location: "store-a".into(),
        bucket: storemesh_protocol::ids::product_bucket(1, h.buckets),
        epoch: 0,
    }
    .encode();
    let actor = ActorKey::new(stranger.node_id.tag(), [1, 1, 1, 1]);
    let mut d = Automerge::new().with_actor(actor.automerge());
    let mut tx = d.transaction();
    tx.put(ROOT, ledger_key(1, actor, LedgerField::Received), 1_000u64)
        .unwrap();
    tx.commit();
    let c = d.get_last_local_change().unwrap().raw_bytes().to_vec();
    let cert = storemesh_protocol::signing::certify_chunk(&signer, &c).unwrap();
    let frame = encode_frame(&Msg::Certs {
        certs: vec![cert],
        intros: vec![],
    })
    .unwrap();
    h.transport.send(h.victim, frame).unwrap();
    h.push_with(&doc, c, false);
    wait_for(Duration::from_secs(10), || async {
        rejected(a, "unknown_author").await >= 1
    })
    .await
    .expect("the stranger's change is refused and counted");
    assert_eq!(stock_level(a, 1).await.unwrap_or(0), 0);
    h.transport.shutdown().await;
    m.shutdown().await;
}
