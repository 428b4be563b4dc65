//! Hostile peer input through `Engine::receive`: each of these made the
//! engine panic (or allocate without bound) on commit f1a50c9; now it is
//! refused, counted by reason, and the engine keeps working.

use automerge::transaction::Transactable;
use automerge::{Automerge, Change, ROOT};
use storemesh_protocol::ids::{product_bucket, ActorKey, NodeId};
use storemesh_protocol::layout::{ledger_key, DocId, LedgerField};
use storemesh_protocol::sync::Msg;
use storemesh_protocol::testkit::{self, TestMesh};
use storemesh_protocol::wire::encode_frame;

const BUCKETS: u32 = 8;
const PRODUCT: u64 = 5;

fn ledger_doc(location: &str) -> String {
    DocId::Ledger {
        location: location.into(),
        bucket: product_bucket(PRODUCT, BUCKETS),
        epoch: 0,
    }
    .encode()
}

/// Node 1's writer (any incarnation of its tag is one of its writers).
fn forger(incarnation: [u8; 4]) -> ActorKey {
    ActorKey::new(testkit::node_id(1).tag(), incarnation)
}

/// `n` honest changes by `actor`, each raising its received cell.
fn honest_changes(actor: ActorKey, n: u64) -> Automerge {
    let mut doc = Automerge::new().with_actor(actor.automerge());
    let key = ledger_key(PRODUCT, actor, LedgerField::Received);
    for i in 1..=n {
        let mut tx = doc.transaction();
        tx.put(ROOT, &key, i).unwrap();
        tx.commit();
    }
    doc
}

/// Pushes `data` from `from`, its changes signed with `from`'s own key: a
/// hostile member signs what it sends; these tests are about the bytes.
fn push(m: &mut TestMesh, from: NodeId, doc: &str, data: Vec<u8>) -> Result<(), String> {
    push_as(m, from, Some(from), doc, data)
}

/// Pushes `data` from `from`, signed with `signer`'s key (`None`: unsigned).
fn push_as(
    m: &mut TestMesh,
    from: NodeId,
    signer: Option<NodeId>,
    doc: &str,
    data: Vec<u8>,
) -> Result<(), String> {
    if let Some(Ok(cert)) = signer
        .map(|s| storemesh_protocol::signing::certify_chunk(&testkit::scheme().signer(s), &data))
    {
        let frame = encode_frame(&Msg::Certs {
            certs: vec![cert],
            intros: vec![],
        })
        .unwrap();
        let now = m.now_ms;
        m.nodes[0].engine.receive(from, &frame[4..], now)?;
    }
    let frame = encode_frame(&Msg::Push {
        doc: doc.into(),
        data,
        seen: vec![],
    })
    .unwrap();
    let now = m.now_ms;
    m.nodes[0].engine.receive(from, &frame[4..], now)
}

fn rejected(m: &TestMesh, reason: &str) -> u64 {
    m.nodes[0]
        .engine
        .stats
        .rejected_by_reason
        .get(reason)
        .copied()
        .unwrap_or(0)
}

fn mesh() -> TestMesh {
    let mut m = TestMesh::new(2, BUCKETS);
    m.connect(0, 1);
    m.settle();
    m
}

/// Whether the engine still takes writes and commits them.
fn still_works(m: &mut TestMesh, id: &str) {
    m.execute(0, testkit::receipt(id, "loc0", &[(PRODUCT, 3)]))
        .expect("the engine still takes writes");
    m.commit(0);
}

#[test]
fn an_author_footer_on_a_later_change_is_refused() {
    let mut m = mesh();
    let peer = testkit::node_id(1);
    let actor = forger([7, 7, 7, 7]);
    let doc = ledger_doc("loc1");
    let src = honest_changes(actor, 2);
    let changes = src.get_changes(&[]);
    // The first change is honest and accepted.
    push(&mut m, peer, &doc, changes[0].raw_bytes().to_vec()).unwrap();
    let heads = m.nodes[0].engine.heads_of(&doc).expect("document made");
    assert_eq!(heads, vec![changes[0].hash()]);
    // The second, re-encoded with the extra bytes `01 00` (an empty author
    // footer): Automerge asserts `change.seq() == 1` on it and panicked.
    let mut e = automerge::ExpandedChange::from(&changes[1]);
    e.extra_bytes = vec![1, 0];
    e.hash = None;
    let forged = Change::from(e);
    assert_eq!(forged.seq(), 2);
    push(&mut m, peer, &doc, forged.raw_bytes().to_vec()).unwrap();
    assert_eq!(rejected(&m, "invalid_change"), 1);
    assert_eq!(m.nodes[0].engine.heads_of(&doc).unwrap(), heads);
    // The honest second change still goes in after.
    push(&mut m, peer, &doc, changes[1].raw_bytes().to_vec()).unwrap();
    assert_eq!(
        m.nodes[0].engine.heads_of(&doc).unwrap(),
        vec![changes[1].hash()]
    );
    still_works(&mut m, "after-footer");
}

/// Automerge panics on a change whose sequence number skips; the walk that
/// checked it gave up after `SEQ_WALK_MAX` (100,000) ancestors and let it
/// through. A fresh writer's change at seq 5 on top of 100,010 changes of
/// another writer is now refused by an exact per-writer count.
#[test]
fn a_skipped_sequence_number_after_a_long_history_is_refused() {
    let mut m = mesh();
    let peer = testkit::node_id(1);
    let doc = ledger_doc("loc1");
    let honest = forger([1, 1, 1, 1]);
    let long = honest_changes(honest, 100_010);
    m.nodes[0]
        .engine
        .load_doc(&doc, &[long.save()], vec![])
        .unwrap();
    let heads = m.nodes[0].engine.heads_of(&doc).unwrap();
    // A fresh writer's change, numbered 5, depending on the current heads.
    let fresh = forger([2, 2, 2, 2]);
    let mut one = honest_changes(fresh, 1).get_changes(&[])[0].clone();
    let mut e = automerge::ExpandedChange::from(&one);
    e.seq = 5;
    e.deps = heads.clone();
    e.start_op = std::num::NonZeroU64::new(100_011).unwrap();
    e.hash = None;
    one = Change::from(e);
    push(&mut m, peer, &doc, one.raw_bytes().to_vec()).unwrap();
    assert_eq!(rejected(&m, "invalid_change"), 1);
    assert_eq!(m.nodes[0].engine.heads_of(&doc).unwrap(), heads);
    // The same writer's honest first change is accepted.
    let mut e = automerge::ExpandedChange::from(&one);
    e.seq = 1;
    e.hash = None;
    let first = Change::from(e);
    push(&mut m, peer, &doc, first.raw_bytes().to_vec()).unwrap();
    assert_eq!(
        m.nodes[0].engine.heads_of(&doc).unwrap(),
        vec![first.hash()]
    );
    still_works(&mut m, "after-seq");
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut z, data).unwrap();
    z.finish().unwrap()
}

fn uleb(mut n: u64, out: &mut Vec<u8>) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Bytes the process has ever had resident (Linux), to see an allocation
/// that came and went.
pub fn peak_rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A compressed change chunk of zeros: Automerge inflated it whole before
/// checking anything (456 MiB from a 2 KB frame). Now it is refused before.
#[test]
fn a_compressed_chunk_bomb_is_refused_before_inflating() {
    let mut m = mesh();
    let peer = testkit::node_id(1);
    let doc = ledger_doc("loc1");
    let z = deflate(&vec![0u8; 512 << 20]);
    let mut chunk = vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 2];
    uleb(z.len() as u64, &mut chunk);
    chunk.extend_from_slice(&z);
    assert!(chunk.len() < 1 << 20, "fits one frame: {}", chunk.len());
    let before = peak_rss_bytes();
    // Unsigned: listing its changes to sign them would inflate it here.
    push_as(&mut m, peer, None, &doc, chunk.clone()).unwrap();
    let grew = peak_rss_bytes().saturating_sub(before);
    assert_eq!(rejected(&m, "decompression_limit"), 1);
    // The check inflates into a counting sink, never a buffer.
    assert!(grew < 64 << 20, "peak RSS grew by {} MiB", grew >> 20);
    // A push is refused; so is a sync message carrying it, and no document
    // slot is made for either.
    assert!(m.nodes[0].engine.heads_of(&doc).is_none());
    still_works(&mut m, "after-bomb");
}

/// `Have` and `Docs` naming documents this node lacks make no document
/// slots (they did, up to a million, after which honest peers offering a new
/// document were disconnected).
#[test]
fn have_and_docs_make_no_document_slots() {
    let mut m = mesh();
    let peer = testkit::node_id(1);
    let now = m.now_ms;
    let docs_before = m.nodes[0].engine.documents().len();
    for i in 0..500u32 {
        let doc = DocId::Records {
            tag: testkit::node_id(1).tag(),
            month: (2000 + i / 12) * 100 + i % 12 + 1,
            part: 0,
        }
        .encode();
        let frame = encode_frame(&Msg::Have {
            doc: doc.clone(),
            heads: vec![[i as u8; 32]],
        })
        .unwrap();
        m.nodes[0].engine.receive(peer, &frame[4..], now).unwrap();
    }
    assert_eq!(m.nodes[0].engine.documents().len(), docs_before);
    // The replies go out, and honest documents still sync.
    m.execute(1, testkit::receipt("r1", "loc1", &[(PRODUCT, 4)]))
        .unwrap();
    m.commit(1);
    m.settle();
    assert!(m.nodes[0].engine.heads_of(&ledger_doc("loc1")).is_some());
    assert_eq!(m.nodes[0].engine.documents().len(), docs_before + 2);
}

/// Cells of 1,100 writers at 2^53 each: on-hand and rights sums reach the
/// ends of i64 (clamped there), where `on_hand * share_percent` and
/// `-rights` overflowed (a panic in debug builds, a wrap in release).
#[test]
fn peer_values_at_the_limits_do_not_overflow() {
    let mut m = mesh();
    let peer = testkit::node_id(1);
    let cell = storemesh_protocol::ids::CELL_MAX;
    // Product 5: writers of node 0's own tag removing (its rights sink to
    // i64::MIN); product 6: writers of node 1's tag receiving (on hand rises
    // to i64::MAX).
    for (product, tag, field) in [
        (PRODUCT, testkit::node_id(0).tag(), LedgerField::Removed),
        (6, testkit::node_id(1).tag(), LedgerField::Received),
    ] {
        let doc = DocId::Ledger {
            location: "loc0".into(),
            bucket: product_bucket(product, BUCKETS),
            epoch: 0,
        }
        .encode();
        let mut data = Vec::new();
        for i in 0..1100u32 {
            let actor = ActorKey::new(tag, i.to_be_bytes());
            let mut d = Automerge::new().with_actor(actor.automerge());
            let mut tx = d.transaction();
            tx.put(ROOT, ledger_key(product, actor, field), cell)
                .unwrap();
            tx.commit();
            data.extend_from_slice(d.get_changes(&[])[0].raw_bytes());
        }
        // Signed by the writers' node (node 0's writers: a copy of node 0's
        // data directory holds its key).
        let signer = [testkit::node_id(0), testkit::node_id(1)]
            .into_iter()
            .find(|id| id.tag() == tag);
        push_as(&mut m, peer, signer, &doc, data).unwrap();
        assert!(
            m.nodes[0].engine.heads_of(&doc).is_some(),
            "valid and applied"
        );
    }
    let e = &m.nodes[0].engine;
    assert_eq!(e.rights(PRODUCT, "loc0"), i64::MIN);
    assert_eq!(e.totals(6, Some("loc0")).unwrap().0, i64::MAX);
    let now = m.now_ms;
    // Allocation multiplies on-hand by the share; a count negates rights.
    let rules = vec![storemesh_protocol::rebalance::AllocationRule {
        to: "n1".into(),
        share_percent: 50,
        max_units: u64::MAX,
    }];
    m.nodes[0].engine.allocate(&rules, now);
    let count: storemesh_protocol::ops::Count = serde_json::from_value(serde_json::json!({
        "count_id": "c1", "location": "loc0",
        "lines": [{"product_id": PRODUCT, "counted": 5}, {"product_id": 6, "counted": 5}]
    }))
    .unwrap();
    let _ = m.execute(0, storemesh_protocol::ops::Op::Count(count));
    m.commit(0);
    still_works(&mut m, "after-limits");
}

/// The key store kept the 16 smallest keys of a customer: a peer sending 16
/// small keys evicted the real one, and what was written under it became
/// unreadable. Merges now never drop a key; an entry that would grow past
/// `KEYS_PER_CUSTOMER_MAX` is refused whole.
#[test]
fn pushed_keys_never_evict_a_live_customer_key() {
    let mut m = mesh();
    let peer = testkit::node_id(1);
    let op: storemesh_protocol::ops::Op = serde_json::from_value(serde_json::json!({
        "CustomerPut": {"customer_id": "cust-7", "update": {"name": "A"}}
    }))
    .unwrap();
    m.execute(0, op).unwrap();
    m.commit(0);
    let real = m.nodes[0].engine.pseudonyms_of("cust-7");
    assert_eq!(real.len(), 1);
    let send_keys = |m: &mut TestMesh, keys: Vec<[u8; 32]>| {
        let frame = encode_frame(&Msg::Keys {
            entries: vec![(
                "cust-7".to_string(),
                storemesh_protocol::crypto::KeyEntry::Keys(keys.into_iter().collect()),
            )],
        })
        .unwrap();
        let now = m.now_ms;
        m.nodes[0].engine.receive(peer, &frame[4..], now).unwrap();
    };
    let small = |i: usize| {
        let mut k = [0u8; 32];
        k[31] = i as u8;
        k[30] = (i >> 8) as u8;
        k
    };
    send_keys(&mut m, (0..16).map(small).collect());
    let now = m.nodes[0].engine.pseudonyms_of("cust-7");
    assert_eq!(now.len(), 17);
    assert!(now.contains(&real[0]), "the real key survives");
    // Past the limit: refused whole, nothing evicted.
    let max = storemesh_protocol::crypto::KEYS_PER_CUSTOMER_MAX;
    send_keys(&mut m, (100..100 + max).map(small).collect());
    assert_eq!(rejected(&m, "key_limit"), 1);
    assert_eq!(m.nodes[0].engine.pseudonyms_of("cust-7").len(), 17);
}

/// A peer's plaintext profile field went into the document's history, where
/// no erasure reaches it; now refused.
#[test]
fn plaintext_personal_data_from_a_peer_is_refused() {
    let mut m = mesh();
    let peer = testkit::node_id(1);
    let doc = DocId::Customers {
        bucket: storemesh_protocol::ids::customer_bucket("cust-3", BUCKETS),
    }
    .encode();
    let mut d = Automerge::new().with_actor(forger([3, 3, 3, 3]).automerge());
    let mut tx = d.transaction();
    tx.put(ROOT, "cust-3/p/email", "ann@example.org").unwrap();
    tx.commit();
    push(
        &mut m,
        peer,
        &doc,
        d.get_changes(&[])[0].raw_bytes().to_vec(),
    )
    .unwrap();
    assert_eq!(rejected(&m, "invalid_change"), 1);
    assert!(m.nodes[0].engine.heads_of(&doc).is_none());
}
