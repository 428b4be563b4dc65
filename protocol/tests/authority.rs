//! Issue 16, findings 2–6: a member node that writes, under its own actor,
//! what only others (or an administrator) may write. Each forgery goes
//! through `Engine::receive` of an honest node in a three-node mesh (node 0
//! honest receiver, node 1 the forger, node 2 the victim); on main's commit
//! each was applied, now each is refused and counted as `unauthorized` (or
//! over a budget), and the honest node's books are unchanged.

use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT};
use storemesh_protocol::crypto::KeyEntry;
use storemesh_protocol::ids::{ActorKey, NodeId, NodeTag};
use storemesh_protocol::layout::{retired_key, DocId};
use storemesh_protocol::ops::{Grant, Op};
use storemesh_protocol::rebalance::{RightsRequest, REQUEST_HOPS_MAX};
use storemesh_protocol::sync::Msg;
use storemesh_protocol::testkit::{self, TestMesh};
use storemesh_protocol::wire::encode_frame;

const BUCKETS: u32 = 8;
const PRODUCT: u64 = 5;

fn tag(i: usize) -> NodeTag {
    testkit::node_id(i).tag()
}

/// A settled full mesh of three; node 0 received 10 units of `PRODUCT`.
fn mesh() -> TestMesh {
    let mut m = TestMesh::new(3, BUCKETS);
    m.full_mesh();
    m.execute(0, testkit::receipt("r1", "loc0", &[(PRODUCT, 10)]))
        .expect("receipt");
    m.commit(0);
    m.settle();
    m
}

/// One change by a fresh incarnation of node 1 (the forger's own actor, as
/// a restarted process would have) on top of node 1's copy of `doc`.
fn forged_change(m: &TestMesh, doc: &str, puts: &[(&str, String)]) -> Vec<u8> {
    let actor = ActorKey::new(tag(1), [9, 9, 9, 9]);
    let base = match m.nodes[1].engine.document_bytes(doc) {
        Some(b) => Automerge::load(&b).expect("own document loads"),
        None => Automerge::new(),
    };
    let mut d = base.with_actor(actor.automerge());
    let mut tx = d.transaction();
    for (k, v) in puts {
        tx.put(ROOT, *k, v.as_str()).unwrap();
    }
    tx.commit();
    d.get_last_local_change()
        .expect("a change was made")
        .raw_bytes()
        .to_vec()
}

fn send(m: &mut TestMesh, to: usize, from: usize, msg: &Msg) -> Result<(), String> {
    let frame = encode_frame(msg).unwrap();
    m.now_ms += 1;
    let now = m.now_ms;
    m.nodes[to]
        .engine
        .receive(testkit::node_id(from), &frame[4..], now)
}

/// Pushes `data` from node 1, its changes signed with node 1's own key (a
/// stolen member holds it): what is refused here is refused for what the
/// change writes, not for who signed it.
fn push(m: &mut TestMesh, doc: &str, data: Vec<u8>) {
    let signer = testkit::scheme().signer(testkit::node_id(1));
    let cert = storemesh_protocol::signing::certify_chunk(&signer, &data).unwrap();
    send(
        m,
        0,
        1,
        &Msg::Certs {
            certs: vec![cert],
            intros: vec![],
        },
    )
    .unwrap();
    let msg = Msg::Push {
        doc: doc.into(),
        data,
        seen: vec![],
    };
    send(m, 0, 1, &msg).expect("an invalid change is refused, the link stays");
    m.commit(0);
}

fn rejected(m: &TestMesh, i: usize, reason: &str) -> u64 {
    m.nodes[i]
        .engine
        .stats
        .rejected_by_reason
        .get(reason)
        .copied()
        .unwrap_or(0)
}

#[test]
fn a_retirement_naming_a_successor_nobody_knows_is_refused() {
    let mut m = mesh();
    let made_up = NodeId([0x77; 32]).tag();
    let value = serde_json::json!({"successor": made_up.hex()}).to_string();
    let change = forged_change(&m, "mesh", &[(&retired_key(tag(2)), value)]);
    push(&mut m, "mesh", change);
    assert!(
        m.nodes[0].engine.retired_tags().is_empty(),
        "the victim was retired to a node nobody holds"
    );
    assert_eq!(rejected(&m, 0, "unauthorized"), 1);
}

#[test]
fn only_an_administrator_retires_a_node() {
    let mut m = mesh();
    for i in 0..3 {
        m.nodes[i].engine.set_administrators(&[testkit::node_id(0)]);
    }
    // A member (not an administrator) retires the victim to itself.
    let value = serde_json::json!({"successor": tag(1).hex()}).to_string();
    let change = forged_change(&m, "mesh", &[(&retired_key(tag(2)), value)]);
    push(&mut m, "mesh", change);
    assert!(m.nodes[0].engine.retired_tags().is_empty());
    assert_eq!(rejected(&m, 0, "unauthorized"), 1);
    assert_eq!(m.nodes[0].engine.rights(PRODUCT, "loc0"), 10);
    // A non-administrator's own engine refuses to write it at all.
    let e = m
        .execute(
            1,
            Op::Retire {
                node: "n2".into(),
                successor: "n1".into(),
            },
        )
        .unwrap_err();
    assert!(
        matches!(&e, storemesh_protocol::ops::OpError::Conflict { code, .. } if code == "not_administrator"),
        "{e:?}"
    );
    // The administrator's retirement reaches every node.
    m.execute(
        0,
        Op::Retire {
            node: "n2".into(),
            successor: "n1".into(),
        },
    )
    .expect("the administrator retires");
    m.commit(0);
    m.settle();
    for i in [0, 1] {
        assert_eq!(m.nodes[i].engine.retired_tags(), vec![tag(2)], "node {i}");
    }
}

#[test]
fn a_rights_request_is_taken_only_from_its_origin() {
    let mut m = mesh();
    let made_up = NodeId([0x55; 32]);
    for origin in [made_up, testkit::node_id(2)] {
        let req = RightsRequest {
            req_id: 1,
            origin: origin.hex(),
            product_id: PRODUCT,
            location: "loc0".into(),
            quantity: 10,
            hops_left: REQUEST_HOPS_MAX,
        };
        send(&mut m, 0, 1, &Msg::Rights(req)).unwrap();
        m.commit(0);
    }
    // Forwarded (fewer hops left) but naming a node nobody knows.
    let req = RightsRequest {
        req_id: 2,
        origin: made_up.hex(),
        product_id: PRODUCT,
        location: "loc0".into(),
        quantity: 10,
        hops_left: REQUEST_HOPS_MAX - 1,
    };
    send(&mut m, 0, 1, &Msg::Rights(req)).unwrap();
    m.commit(0);
    m.settle();
    assert_eq!(
        m.nodes[0].engine.rights(PRODUCT, "loc0"),
        10,
        "the holder's rights were drained by a spoofed request"
    );
    assert_eq!(rejected(&m, 0, "unauthorized"), 3);
    // The real origin's own request is still answered.
    let req = RightsRequest {
        req_id: 3,
        origin: testkit::node_id(1).hex(),
        product_id: PRODUCT,
        location: "loc0".into(),
        quantity: 4,
        hops_left: REQUEST_HOPS_MAX,
    };
    send(&mut m, 0, 1, &Msg::Rights(req)).unwrap();
    m.commit(0);
    m.settle();
    assert_eq!(m.nodes[0].engine.rights(PRODUCT, "loc0"), 6);
}

fn info(name: &str, location: &str) -> String {
    serde_json::json!({"name": name, "location": location, "role": "store", "policy": "strict"})
        .to_string()
}

#[test]
fn a_peer_can_not_take_a_configured_name_or_a_bound_location() {
    let mut m = mesh();
    m.nodes[0]
        .engine
        .bind_peer_location("loc2", testkit::node_id(2));
    let key = format!("{}/info", tag(1));
    let change = forged_change(&m, "mesh", &[(&key, info("n2", "loc1"))]);
    push(&mut m, "mesh", change);
    let change = forged_change(&m, "mesh", &[(&key, info("n1", "loc2"))]);
    push(&mut m, "mesh", change);
    assert_eq!(rejected(&m, 0, "unauthorized"), 2);
    let views = &m.nodes[0].engine.views;
    assert_eq!(views.tag_of("n2"), Some(tag(2)));
    assert_eq!(views.owner_of("loc2").map(|(t, _)| t), Some(tag(2)));
    // A grant to "n2" goes to the victim, not to the forger.
    m.execute(
        0,
        Op::Grant(Grant {
            grant_id: "g1".into(),
            product_id: PRODUCT,
            location: "loc0".into(),
            to: "n2".into(),
            quantity: 3,
            ..Default::default()
        }),
    )
    .expect("grant");
    m.commit(0);
    m.settle();
    assert_eq!(m.nodes[2].engine.rights(PRODUCT, "loc0"), 3);
    assert_eq!(m.nodes[1].engine.rights(PRODUCT, "loc0"), 0);
}

#[test]
fn a_name_claimed_by_two_unconfigured_nodes_names_nobody() {
    // Node 0 knows neither claimant by configuration (a hub topology).
    let mut m = TestMesh::new(3, BUCKETS);
    m.full_mesh();
    m.settle();
    let key = format!("{}/info", tag(1));
    let change = forged_change(&m, "mesh", &[(&key, info("n2", "loc2"))]);
    let mut doc = Automerge::load(&m.nodes[1].engine.document_bytes("mesh").unwrap()).unwrap();
    doc.apply_changes([automerge::Change::from_bytes(change).unwrap()])
        .unwrap();
    let mut e2 = storemesh_protocol::Engine::new(testkit::config(0, BUCKETS), [4, 4, 4, 4]);
    e2.load_doc("mesh", &[doc.save()], Vec::new()).unwrap();
    e2.finish_open();
    assert_eq!(e2.views.tag_of("n2"), None, "two claims, no binding");
    assert_eq!(e2.views.owner_of("loc2").map(|(t, _)| t), None);
}

#[test]
fn a_record_naming_another_node_is_refused() {
    let mut m = mesh();
    let doc = DocId::Records {
        tag: tag(1),
        month: 202611,
        part: 0,
    }
    .encode();
    let deficit = serde_json::json!({"count_id": "c-1", "node": "n2", "location": "loc2", "product_id": PRODUCT, "deficit": 7, "at_ms": 1}).to_string();
    let change = forged_change(&m, &doc, &[("def/c-1", deficit)]);
    push(&mut m, &doc, change);
    assert_eq!(rejected(&m, 0, "unauthorized"), 1);
    assert!(m.nodes[0].engine.record(&doc, "def/c-1").is_none());
    // Its own records, naming itself, are applied.
    let own = serde_json::json!({"count_id": "c-2", "node": "n1", "location": "loc1", "product_id": PRODUCT, "deficit": 1, "at_ms": 1}).to_string();
    let change = forged_change(&m, &doc, &[("def/c-2", own)]);
    push(&mut m, &doc, change);
    assert_eq!(rejected(&m, 0, "unauthorized"), 1);
    assert!(m.nodes[0].engine.record(&doc, "def/c-2").is_some());
}

#[test]
fn a_peer_can_not_erase_every_customer_at_once() {
    let mut m = mesh();
    let limit = storemesh_protocol::authority::PEER_ERASURES_PER_WINDOW_MAX as usize;
    let n = limit + 100;
    let entries: Vec<(String, KeyEntry)> = (0..n)
        .map(|i| (format!("c-{i}"), KeyEntry::Erased))
        .collect();
    send(&mut m, 0, 1, &Msg::Keys { entries }).unwrap();
    m.commit(0);
    assert_eq!(rejected(&m, 0, "erasure_limit"), 100);
    // Keys added to a customer that has keys here are budgeted too.
    let key_limit = storemesh_protocol::authority::PEER_KEY_ADDITIONS_PER_WINDOW_MAX as usize;
    let mut entries = Vec::new();
    for c in 0..(key_limit / 8 + 2) {
        let id = format!("k-{c}");
        entries.push((id.clone(), KeyEntry::Keys([[c as u8 + 1; 32]].into())));
    }
    send(&mut m, 0, 1, &Msg::Keys { entries }).unwrap();
    let mut extra = Vec::new();
    for c in 0..(key_limit / 8 + 2) {
        let id = format!("k-{c}");
        let keys = (0..8u8)
            .map(|k| {
                let mut b = [0xee; 32];
                b[0] = k;
                b[1] = c as u8;
                b
            })
            .collect();
        extra.push((id, KeyEntry::Keys(keys)));
    }
    send(&mut m, 0, 1, &Msg::Keys { entries: extra }).unwrap();
    m.commit(0);
    assert_eq!(rejected(&m, 0, "key_limit"), 2);
}

#[test]
fn only_the_fulfilling_node_closes_a_reservation() {
    let mut m = mesh();
    // Node 0 reserves 4 units for pick-up at node 2.
    m.execute(
        0,
        Op::Reserve(storemesh_protocol::ops::Reserve {
            reservation_id: "rsv-1".into(),
            location: "loc0".into(),
            lines: vec![storemesh_protocol::ops::QtyLine {
                sku: None,
                product_id: PRODUCT,
                quantity: 4,
            }],
            fulfil_by: "n2".into(),
            expires_at: "2099-01-01T00:00:00Z".into(),
            customer_id: None,
            occurred_at: None,
            register_id: None,
            staff_id: None,
        }),
    )
    .expect("reserve");
    m.commit(0);
    m.settle();
    assert_eq!(m.nodes[0].engine.reserved_at(PRODUCT, "loc0"), 4);
    // The forger closes it (releasing the units held for the customer).
    let doc = DocId::Records {
        tag: tag(1),
        month: 202611,
        part: 0,
    }
    .encode();
    let close = serde_json::json!({"reservation_id": "rsv-1", "creator": "n0", "node": "n1", "status": "cancelled", "at_ms": 1}).to_string();
    let change = forged_change(&m, &doc, &[("rsc/rsv-1", close)]);
    push(&mut m, &doc, change);
    assert_eq!(rejected(&m, 0, "unauthorized"), 1);
    assert_eq!(m.nodes[0].engine.reserved_at(PRODUCT, "loc0"), 4);
}
