//! A forked node history is detected and merged to exact totals; invalid
//! changes from a peer are rejected whole.

use automerge::transaction::Transactable;
use automerge::ROOT;
use storemesh_protocol::ids::{product_bucket, ActorKey};
use storemesh_protocol::layout::{ledger_key, DocId, LedgerField};
use storemesh_protocol::ops::*;
use storemesh_protocol::sync::Msg;
use storemesh_protocol::testkit::{self, TestMesh};
use storemesh_protocol::wire::encode_frame;

fn receipt(id: &str, loc: &str, p: u64, q: u64) -> Op {
    testkit::receipt(id, loc, &[(p, q)])
}

fn sale(id: &str, p: u64, q: u64) -> Op {
    testkit::sale(id, None, &[(p, q)])
}

#[test]
fn copied_storage_fork_is_detected_and_merged_exactly() {
    let mut m = TestMesh::new(2, 8);
    m.connect(0, 1);
    // Node 1 books at loc0 once it knows the location (node 0's directory entry).
    m.settle();
    m.execute(0, receipt("r1", "loc0", 5, 10)).unwrap();
    m.commit(0);
    m.settle();
    // The data directory of node 0 is copied and started as a second process.
    m.disconnect(0, 1);
    let copy = m.clone_node(0, [9, 9, 9, 9]);
    // Both copies believe they hold 10 units and sell 7 each.
    m.execute(0, sale("a1", 5, 7)).unwrap();
    m.commit(0);
    m.execute(copy, sale("b1", 5, 7)).unwrap();
    m.commit(copy);
    // The copy syncs with node 1 and stops; the original reconnects.
    m.connect(copy, 1);
    m.settle();
    m.disconnect(copy, 1);
    m.connect(0, 1);
    m.settle();
    for i in [0, 1] {
        let e = &m.nodes[i].engine;
        // Exact totals: 10 received, 14 removed — neither branch's sale is lost.
        assert_eq!(e.totals(5, Some("loc0")).unwrap().0, -4, "node {i}");
        assert!(e.owned_conflicts().is_empty());
    }
    let alarms = &m.nodes[0].engine.views.alarms();
    assert!(
        alarms.values().any(|a| a.kind == "fork"),
        "fork reported: {alarms:?}"
    );
    let deficit = alarms
        .values()
        .find(|a| a.kind == "deficit")
        .expect("deficit reported");
    assert_eq!(deficit.record["deficit"], 4);
    // One report per document the fork touched (ledger and records).
    assert!(m.nodes[0].engine.stats.forks_detected >= 1);
    // The reports replicate to node 1 too.
    m.settle();
    assert!(m.nodes[1]
        .engine
        .views
        .alarms()
        .values()
        .any(|a| a.kind == "deficit"));
}

/// Builds a sync message for `doc` carrying one change written by `actor`.
fn forged(base: &automerge::Automerge, actor: ActorKey, key: &str, value: u64) -> Vec<u8> {
    use automerge::sync::SyncDoc;
    let mut doc = base.fork().with_actor(actor.automerge());
    let mut tx = doc.transaction();
    tx.put(ROOT, key, automerge::ScalarValue::Uint(value))
        .unwrap();
    tx.commit();
    // Run the real protocol against a replica of `base` until a message carries the change.
    let mut replica = base.fork();
    let (mut ours, mut theirs) = (automerge::sync::State::new(), automerge::sync::State::new());
    for _ in 0..4 {
        let msg = doc.generate_sync_message(&mut ours).expect("a message");
        if !msg.changes.is_empty() {
            return msg.encode();
        }
        replica.receive_sync_message(&mut theirs, msg).unwrap();
        if let Some(reply) = replica.generate_sync_message(&mut theirs) {
            doc.receive_sync_message(&mut ours, reply).unwrap();
        }
    }
    panic!("no message carried the forged change")
}

#[test]
fn invalid_changes_are_rejected_whole() {
    let (mut m, doc_id) = two_nodes_with_stock();
    let base = m.nodes[0].engine.doc(&doc_id).unwrap().clone();
    let heads_before = m.nodes[0].engine.heads_of(&doc_id).unwrap();
    let actor0 = m.nodes[0].engine.actor();
    let actor1 = m.nodes[1].engine.actor();
    let peer1 = m.id(1);
    // 1. Node 1 writes node 0's cell (claims node 0 removed 10 units).
    let bad = forged(
        &base,
        actor1,
        &ledger_key(5, actor0, LedgerField::Removed),
        10,
    );
    presign(&mut m, &doc_id, &bad);
    let frame = encode_frame(&Msg::Sync {
        doc: doc_id.clone(),
        data: bad,
    })
    .unwrap();
    let now = m.now_ms;
    m.nodes[0].engine.receive(peer1, &frame[4..], now).unwrap();
    // 2. Node 1 lowers its own cumulative cell (3 → 1).
    let bad = forged(
        &base,
        actor1,
        &ledger_key(5, actor1, LedgerField::Received),
        1,
    );
    presign(&mut m, &doc_id, &bad);
    let frame = encode_frame(&Msg::Sync {
        doc: doc_id.clone(),
        data: bad,
    })
    .unwrap();
    m.nodes[0].engine.receive(peer1, &frame[4..], now).unwrap();
    assert_eq!(m.nodes[0].engine.stats.rejected_messages, 2);
    assert_eq!(
        m.nodes[0].engine.heads_of(&doc_id).unwrap(),
        heads_before,
        "nothing applied"
    );
    assert_eq!(m.nodes[0].engine.totals(5, None).unwrap().0, 13);
    // 3. A valid change by node 1 of its own cell is accepted.
    let good = forged(
        &base,
        actor1,
        &ledger_key(5, actor1, LedgerField::Received),
        4,
    );
    presign(&mut m, &doc_id, &good);
    let frame = encode_frame(&Msg::Sync {
        doc: doc_id.clone(),
        data: good,
    })
    .unwrap();
    m.nodes[0].engine.receive(peer1, &frame[4..], now).unwrap();
    assert_eq!(m.nodes[0].engine.stats.rejected_messages, 2);
    assert_eq!(m.nodes[0].engine.totals(5, None).unwrap().0, 14);
    // 4. Garbage is a protocol error, never a panic.
    assert!(m.nodes[0]
        .engine
        .receive(peer1, &[1, 0xff, 0xff, 0xff], now)
        .is_err());
    let junk = encode_frame(&Msg::Sync {
        doc: doc_id.clone(),
        data: vec![0x42; 100],
    })
    .unwrap();
    assert!(m.nodes[0].engine.receive(peer1, &junk[4..], now).is_err());
    let junk = encode_frame(&Msg::Sync {
        doc: "ledger/../1".into(),
        data: vec![],
    })
    .unwrap();
    assert!(m.nodes[0].engine.receive(peer1, &junk[4..], now).is_err());
}

/// A sync message for `doc` whose changes (one per write, by `actor`) travel
/// as an Automerge bundle, as `sync` sends eight changes or more; `flip`
/// damages one byte of the bundle.
fn bundled(
    base: &automerge::Automerge,
    actor: ActorKey,
    writes: &[(String, u64)],
    flip: Option<usize>,
) -> Vec<u8> {
    use automerge::sync::SyncDoc;
    let mut doc = base.fork().with_actor(actor.automerge());
    let heads = doc.get_heads();
    for (key, value) in writes {
        let mut tx = doc.transaction();
        tx.put(ROOT, key, automerge::ScalarValue::Uint(*value))
            .unwrap();
        tx.commit();
    }
    let hashes: Vec<_> = doc.get_changes(&heads).iter().map(|c| c.hash()).collect();
    let mut bytes = doc.bundle(hashes).unwrap().bytes().to_vec();
    if let Some(i) = flip {
        bytes[i] ^= 0x5a;
    }
    let mut msg = doc
        .generate_sync_message(&mut automerge::sync::State::new())
        .unwrap();
    msg.changes = vec![bytes].into();
    msg.encode()
}

/// Two nodes holding 10 + 3 units of product 5 at loc0; returns the mesh and
/// the ledger document's id.
fn two_nodes_with_stock() -> (TestMesh, String) {
    let mut m = TestMesh::new(2, 8);
    m.connect(0, 1);
    // Node 1 books at loc0 once it knows the location (node 0's directory entry).
    m.settle();
    m.execute(0, receipt("r1", "loc0", 5, 10)).unwrap();
    m.commit(0);
    m.execute(1, receipt("r2", "loc0", 5, 3)).unwrap();
    m.commit(1);
    m.settle();
    let doc_id = DocId::Ledger {
        location: "loc0".into(),
        bucket: product_bucket(5, 8),
        epoch: 0,
    }
    .encode();
    (m, doc_id)
}

/// Sends node 0 node 1's signatures of the changes in sync message `data`
/// (signed with node 1's own key: these tests are about what a change
/// writes, not who signed it).
fn presign(m: &mut TestMesh, doc: &str, data: &[u8]) {
    let Ok(msg) = automerge::sync::Message::decode(data) else {
        return;
    };
    let signer = storemesh_protocol::testkit::scheme().signer(m.id(1));
    let _ = doc;
    let mut hashes = Vec::new();
    for c in msg.changes.iter() {
        if let Ok((h, _)) = storemesh_protocol::validate::chunk_change_hashes(c) {
            hashes.extend(h);
        }
    }
    if hashes.is_empty() {
        return;
    }
    let cert = storemesh_protocol::signing::Cert::make(&signer, hashes);
    let frame = encode_frame(&Msg::Certs {
        certs: vec![cert],
        intros: vec![],
    })
    .unwrap();
    let (peer1, now) = (m.id(1), m.now_ms);
    m.nodes[0].engine.receive(peer1, &frame[4..], now).unwrap();
}

fn send_sync(m: &mut TestMesh, doc: &str, data: Vec<u8>) -> Result<(), String> {
    presign(m, doc, &data);
    let frame = encode_frame(&Msg::Sync {
        doc: doc.to_string(),
        data,
    })
    .unwrap();
    let (peer1, now) = (m.id(1), m.now_ms);
    m.nodes[0].engine.receive(peer1, &frame[4..], now)
}

#[test]
fn bundled_changes_are_validated_like_any_other_and_bad_bundles_are_refused() {
    let (mut m, doc_id) = two_nodes_with_stock();
    let base = m.nodes[0].engine.doc(&doc_id).unwrap().clone();
    let heads_before = m.nodes[0].engine.heads_of(&doc_id).unwrap();
    let (actor0, actor1) = (m.nodes[0].engine.actor(), m.nodes[1].engine.actor());
    let own = ledger_key(5, actor1, LedgerField::Received);
    let theirs = ledger_key(5, actor0, LedgerField::Removed);
    // Nine changes, the last of which writes node 0's cell: refused whole.
    let mut writes: Vec<(String, u64)> = (4..12).map(|v| (own.clone(), v)).collect();
    writes.push((theirs.clone(), 10));
    send_sync(&mut m, &doc_id, bundled(&base, actor1, &writes, None)).unwrap();
    assert_eq!(m.nodes[0].engine.stats.rejected_messages, 1);
    assert_eq!(m.nodes[0].engine.heads_of(&doc_id).unwrap(), heads_before);
    // Eight valid changes of node 1's own cell (4..=11): applied.
    let good = bundled(&base, actor1, &writes[..8], None);
    send_sync(&mut m, &doc_id, good.clone()).unwrap();
    assert_eq!(m.nodes[0].engine.totals(5, None).unwrap().0, 10 + 11);
    // Every byte of the bundle damaged in turn, each on a fresh pair: never a
    // panic; whatever is accepted passed validation, so node 0's cells are
    // untouched and node 1's cell only rose.
    let len = automerge::sync::Message::decode(&good)
        .unwrap()
        .changes
        .iter()
        .next()
        .unwrap()
        .len();
    let mut refused = 0;
    for i in 0..len {
        let (mut m, doc_id) = two_nodes_with_stock();
        let _ = send_sync(
            &mut m,
            &doc_id,
            bundled(&base, actor1, &writes[..8], Some(i)),
        );
        let e = &m.nodes[0].engine;
        if e.heads_of(&doc_id).unwrap() == heads_before {
            refused += 1;
            continue;
        }
        let doc = e.doc(&doc_id).unwrap();
        assert_eq!(
            storemesh_protocol::validate::current_uint(doc, &theirs),
            0,
            "flip at {i}"
        );
        assert!(
            storemesh_protocol::validate::current_uint(doc, &own) >= 3,
            "flip at {i}"
        );
    }
    assert!(
        refused > len / 2,
        "only {refused} of {len} damaged bundles were refused"
    );
}
