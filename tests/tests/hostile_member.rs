//! Issue 16, end to end: a member gone bad (a stolen store PC: its identity
//! and trusted key, speaking real QUIC) sends writes only others may make.
//! The honest node refuses each, counts it as
//! `storemesh_rejected_changes_total{reason="unauthorized"}`, and its stock
//! and rights are unchanged.

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
}

impl Hostile {
    /// Stops node `me` of the mesh and speaks as it to node `victim`.
    async fn take_over(m: &mut Mesh, me: usize, victim: usize) -> Hostile {
        m.stop(me).await;
        let dir = m.dirs[me].0.clone();
        let cfg = Config::load(&dir).unwrap();
        let identity = Identity::load(&dir).unwrap();
        let my_id = identity.node_id;
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
        }
    }

    fn push(&mut self, doc: &str, data: Vec<u8>) {
        // Drain what the victim sent (its sync offers), so nothing backs up.
        while self.events.try_recv().is_ok() {}
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
