//! Issue 16, finding 1: signed authorship through `Engine::receive`.
//! A change is applied only when a batch certificate by the node its actor
//! id names lists it and
//! that node is a member here (own, configured, or introduced by a member);
//! hubs forward the author's certificate and introduction, so stores behind a
//! hub verify each other's changes.

use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT};
use storemesh_protocol::ids::{product_bucket, ActorKey, NodeId};
use storemesh_protocol::layout::{ledger_key, DocId, LedgerField};
use storemesh_protocol::signing::{certify_chunk, Cert, Introduction, KeyedHashScheme};
use storemesh_protocol::sync::Msg;
use storemesh_protocol::testkit::{self, TestMesh};
use storemesh_protocol::wire::encode_frame;

const BUCKETS: u32 = 8;

fn rejected(m: &TestMesh, i: usize, reason: &str) -> u64 {
    m.nodes[i]
        .engine
        .stats
        .rejected_by_reason
        .get(reason)
        .copied()
        .unwrap_or(0)
}

fn send(m: &mut TestMesh, to: usize, from: NodeId, msg: &Msg) -> Result<(), String> {
    let frame = encode_frame(msg).unwrap();
    m.now_ms += 1;
    let now = m.now_ms;
    m.nodes[to].engine.receive(from, &frame[4..], now)
}

fn ledger_doc(location: &str, product: u64) -> String {
    DocId::Ledger {
        location: location.into(),
        bucket: product_bucket(product, BUCKETS),
        epoch: 0,
    }
    .encode()
}

/// A change by `actor` that says it received `n` units of product 5.
fn receipt_change(actor: ActorKey, n: u64) -> Vec<u8> {
    let mut d = Automerge::new().with_actor(actor.automerge());
    let mut tx = d.transaction();
    tx.put(ROOT, ledger_key(5, actor, LedgerField::Received), n)
        .unwrap();
    tx.commit();
    d.get_last_local_change().unwrap().raw_bytes().to_vec()
}

/// Node 1 (a member, holding its own key) writes as node 2: signed with its
/// own key, unsigned, and with node 2's public key but its own secret. All
/// three refused as `bad_signature`, nothing applied; node 1 writing as
/// itself is applied.
#[test]
fn a_member_can_not_write_as_another_member() {
    let mut m = TestMesh::new(3, BUCKETS);
    m.full_mesh();
    m.settle();
    let doc = ledger_doc("loc0", 5);
    let victim = ActorKey::new(testkit::node_id(2).tag(), [9, 9, 9, 9]);
    let forger = testkit::node_id(1);
    let own_key = testkit::scheme().signer(forger);
    for (i, how) in ["self-signed", "unsigned", "victim's key"]
        .iter()
        .enumerate()
    {
        let c = receipt_change(victim, 1000 + i as u64);
        let mut cert = certify_chunk(&own_key, &c).unwrap();
        let certs: Vec<Cert> = match *how {
            "unsigned" => vec![],
            "victim's key" => {
                cert.key = testkit::node_id(2).0.to_vec();
                vec![cert]
            }
            _ => vec![cert],
        };
        send(
            &mut m,
            0,
            forger,
            &Msg::Certs {
                certs,
                intros: vec![],
            },
        )
        .unwrap();
        let push = Msg::Push {
            doc: doc.clone(),
            data: c,
            seen: vec![],
        };
        send(&mut m, 0, forger, &push).unwrap();
        m.commit(0);
        assert_eq!(rejected(&m, 0, "bad_signature"), i as u64 + 1, "{how}");
    }
    assert_eq!(
        m.nodes[0].engine.totals(5, Some("loc0")),
        None,
        "nothing applied"
    );
    // Written as itself, signed by itself: applied.
    let own = ActorKey::new(forger.tag(), [9, 9, 9, 9]);
    let c = receipt_change(own, 7);
    send(
        &mut m,
        0,
        forger,
        &Msg::Certs {
            certs: vec![certify_chunk(&own_key, &c).unwrap()],
            intros: vec![],
        },
    )
    .unwrap();
    send(
        &mut m,
        0,
        forger,
        &Msg::Push {
            doc: doc.clone(),
            data: c,
            seen: vec![],
        },
    )
    .unwrap();
    m.commit(0);
    assert_eq!(m.nodes[0].engine.totals(5, Some("loc0")).unwrap().0, 7);
    assert_eq!(rejected(&m, 0, "bad_signature"), 3);
}

/// A node nobody introduced: refused as `unknown_author`, even signed by
/// itself; an introduction signed by a non-member admits nobody; one signed
/// by a configured peer admits the node.
#[test]
fn only_a_member_introduces_a_member() {
    let mut m = TestMesh::new(2, BUCKETS);
    m.full_mesh();
    m.settle();
    let doc = ledger_doc("loc0", 5);
    let stranger = NodeId([0x33; 32]);
    let scheme: KeyedHashScheme = testkit::scheme();
    let stranger_key = scheme.signer(stranger);
    let c = receipt_change(ActorKey::new(stranger.tag(), [1, 1, 1, 1]), 50);
    let cert = certify_chunk(&stranger_key, &c).unwrap();
    let push = |m: &mut TestMesh, intros: Vec<Introduction>| {
        let peer = testkit::node_id(1);
        send(
            m,
            0,
            peer,
            &Msg::Certs {
                certs: vec![cert.clone()],
                intros,
            },
        )
        .unwrap();
        send(
            m,
            0,
            peer,
            &Msg::Push {
                doc: doc.clone(),
                data: c.clone(),
                seen: vec![],
            },
        )
        .unwrap();
        m.commit(0);
    };
    push(&mut m, vec![]);
    assert_eq!(rejected(&m, 0, "unknown_author"), 1);
    // The stranger introduces itself: not a member's introduction.
    push(&mut m, vec![Introduction::make(&stranger_key, stranger)]);
    assert_eq!(rejected(&m, 0, "unknown_author"), 2);
    assert_eq!(m.nodes[0].engine.totals(5, Some("loc0")), None);
    // Node 1 (configured at node 0) introduces it: admitted.
    let by_1 = Introduction::make(&scheme.signer(testkit::node_id(1)), stranger);
    push(&mut m, vec![by_1]);
    assert_eq!(rejected(&m, 0, "unknown_author"), 2);
    assert_eq!(m.nodes[0].engine.totals(5, Some("loc0")).unwrap().0, 50);
}

/// Hub topology: stores 1 and 2 have only the hub (node 0) configured and
/// never peer with each other. A receipt and a sale at store 1 reach store 2
/// through the hub, signed by store 1 and verified by store 2 (which accepts
/// store 1 through the hub's introduction).
#[test]
fn stores_behind_a_hub_verify_each_others_changes() {
    let mut m = TestMesh::with_configured(3, BUCKETS, |i, j| i == 0 || j == 0);
    m.connect(0, 1);
    m.connect(0, 2);
    m.settle();
    m.execute(1, testkit::receipt("r1", "loc1", &[(5, 10)]))
        .unwrap();
    m.commit(1);
    m.settle();
    m.execute(1, testkit::sale("s1", Some("loc1"), &[(5, 3)]))
        .unwrap();
    m.commit(1);
    m.settle();
    assert_eq!(m.nodes[2].engine.totals(5, Some("loc1")).unwrap().0, 7);
    assert!(m.nodes[2].engine.members().accepts(&testkit::node_id(1)));
    for i in 0..3 {
        assert_eq!(rejected(&m, i, "bad_signature"), 0, "node {i}");
        assert_eq!(rejected(&m, i, "unknown_author"), 0, "node {i}");
    }
    // And the other way round.
    m.execute(2, testkit::receipt("r2", "loc2", &[(5, 4)]))
        .unwrap();
    m.commit(2);
    m.settle();
    assert_eq!(m.nodes[1].engine.totals(5, Some("loc2")).unwrap().0, 4);
}

/// One signature per commit batch: a batch of 64 sales over many ledger
/// documents makes one certificate listing every change it made (one per
/// document), and a receiver checks that certificate's signature once for
/// all of them.
#[test]
fn a_batch_is_certified_once_and_verified_once() {
    let mut m = TestMesh::new(2, BUCKETS);
    m.full_mesh();
    m.settle();
    let lines: Vec<(u64, u64)> = (1..=16).map(|p| (p, 100)).collect();
    m.execute(0, testkit::receipt("r", "loc0", &lines)).unwrap();
    m.commit(0);
    m.settle();
    let verified_before = m.nodes[1].engine.stats.certs_verified;
    for i in 0..64u64 {
        m.execute(
            0,
            testkit::sale(&format!("s{i}"), Some("loc0"), &[(1 + i % 16, 1)]),
        )
        .unwrap();
    }
    let held_before: std::collections::HashSet<Vec<[u8; 32]>> = m.nodes[0]
        .engine
        .held_certs()
        .into_iter()
        .map(|(_, c)| c.hashes)
        .collect();
    m.commit(0);
    let new: std::collections::HashSet<Vec<[u8; 32]>> = m.nodes[0]
        .engine
        .held_certs()
        .into_iter()
        .map(|(_, c)| c.hashes)
        .filter(|h| !held_before.contains(h))
        .collect();
    assert_eq!(new.len(), 1, "one certificate for the batch");
    let listed = new.iter().next().unwrap().len();
    assert!(
        listed > 2,
        "it lists one change per document written, several here: {listed}"
    );
    m.settle();
    assert_eq!(
        m.nodes[1].engine.stats.certs_verified - verified_before,
        1,
        "the receiver verified the batch's certificate once"
    );
    for p in 1..=16u64 {
        assert_eq!(
            m.nodes[1].engine.totals(p, Some("loc0")).map(|t| t.0),
            m.nodes[0].engine.totals(p, Some("loc0")).map(|t| t.0),
            "product {p}"
        );
    }
    assert_eq!(rejected(&m, 1, "bad_signature"), 0);
}

/// A certificate by the right node that does not list the change (a change
/// slipped into a frame after a genuine certificate of other changes) is
/// refused as unsigned.
#[test]
fn a_change_its_certificate_does_not_list_is_refused() {
    let mut m = TestMesh::new(2, BUCKETS);
    m.full_mesh();
    m.settle();
    let doc = ledger_doc("loc0", 5);
    let peer = testkit::node_id(1);
    let key = testkit::scheme().signer(peer);
    let listed = receipt_change(ActorKey::new(peer.tag(), [4, 4, 4, 4]), 3);
    let unlisted = receipt_change(ActorKey::new(peer.tag(), [5, 5, 5, 5]), 9);
    let cert = certify_chunk(&key, &listed).unwrap();
    send(
        &mut m,
        0,
        peer,
        &Msg::Certs {
            certs: vec![cert],
            intros: vec![],
        },
    )
    .unwrap();
    let push = Msg::Push {
        doc: doc.clone(),
        data: unlisted,
        seen: vec![],
    };
    send(&mut m, 0, peer, &push).unwrap();
    m.commit(0);
    assert_eq!(rejected(&m, 0, "bad_signature"), 1);
    assert_eq!(m.nodes[0].engine.totals(5, Some("loc0")), None);
}

/// Memory stays bounded: a records part that closes and goes cold drops its
/// certificates from memory (they stay in the archive), and a node that
/// joins later still receives every change of the cold parts with its
/// certificate (read back from the archive) and refuses nothing.
#[test]
fn cold_parts_leave_memory_and_their_certificates_are_read_back() {
    let mut m = TestMesh::new(3, BUCKETS);
    m.use_archive(0);
    m.nodes[0].engine.set_records_per_part(2);
    m.connect(0, 1);
    m.settle();
    m.execute(0, testkit::receipt("r", "loc0", &[(5, 1000)]))
        .unwrap();
    m.commit(0);
    for i in 0..20u64 {
        m.execute(0, testkit::sale(&format!("s{i}"), Some("loc0"), &[(5, 1)]))
            .unwrap();
        m.commit(0);
    }
    m.settle();
    let before = m.nodes[0].engine.cert_figures();
    let cooled = m.nodes[0].engine.cool_closed_parts(usize::MAX);
    let after = m.nodes[0].engine.cert_figures();
    assert!(cooled >= 5, "closed parts went cold: {cooled}");
    assert_eq!(
        after.docs,
        before.docs - cooled,
        "a cold part keeps no certificate in memory ({before:?} → {after:?})"
    );
    // A batch's certificate also covers its ledger change, whose epoch is
    // live: it stays while any document it covers is live.
    assert!(after.held <= before.held);
    // Node 2 joins now: it gets the cold parts' changes, certified.
    m.connect(0, 2);
    m.settle();
    assert_eq!(rejected(&m, 2, "bad_signature"), 0);
    assert_eq!(rejected(&m, 2, "unknown_author"), 0);
    assert_eq!(
        m.nodes[2].engine.totals(5, Some("loc0")).map(|t| t.0),
        Some(980)
    );
    assert_eq!(
        m.nodes[2].engine.digest_root(),
        m.nodes[0].engine.digest_root(),
        "node 2 holds every document of node 0"
    );
}

/// Upgrade from protocol 6: history written before signing has no
/// certificate. The node certifies its own earlier changes at its first
/// signed start (`certify_own_history`); a node that never saw that history
/// then receives all of it, certified, and refuses nothing. Without that
/// step the same history is refused as uncertified.
#[test]
fn history_written_before_signing_is_certified_by_its_owner_at_upgrade() {
    for certify in [false, true] {
        // Protocol 6: node 0 writes without signing.
        let mut old =
            storemesh_protocol::engine::Engine::new(testkit::config(0, BUCKETS), [0, 0, 0, 1]);
        old.finish_open();
        old.execute(
            testkit::receipt("r", "loc0", &[(5, 50), (6, 60)]),
            1_000,
            &|_| None,
        )
        .unwrap();
        let _ = old.flush(1_000);
        old.execute(testkit::sale("s", Some("loc0"), &[(5, 2)]), 2_000, &|_| {
            None
        })
        .unwrap();
        let _ = old.flush(2_000);
        // Protocol 7: the same data, opened by a signing engine.
        let mut m = TestMesh::new(2, BUCKETS);
        let mut e =
            storemesh_protocol::engine::Engine::new(testkit::config(0, BUCKETS), [0, 0, 0, 2]);
        testkit::sign(&mut e);
        e.add_configured_peer("n1", testkit::node_id(1));
        for (id, _) in old.documents() {
            e.load_doc(&id, &[old.document_bytes(&id).unwrap()], Vec::new())
                .unwrap();
        }
        if certify {
            assert!(
                e.certify_own_history() >= 3,
                "receipt, sale, directory entry"
            );
        }
        e.finish_open();
        m.nodes[0].engine = e;
        m.full_mesh();
        m.settle();
        let got = m.nodes[1].engine.totals(5, Some("loc0")).map(|t| t.0);
        if certify {
            assert_eq!(got, Some(48), "the upgraded history reached node 1");
            assert_eq!(rejected(&m, 1, "bad_signature"), 0);
        } else {
            assert_eq!(got, None, "uncertified history is refused");
            assert!(rejected(&m, 1, "bad_signature") > 0);
        }
    }
}

/// A sync reply that carries changes this node made in the same batch (its
/// pending writes go into the document before a peer's changes are merged)
/// gets the batch's certificate ahead of it at the flush: while two nodes
/// catch up with each other and keep writing, neither refuses anything.
#[test]
fn a_sync_reply_with_this_batch_s_own_changes_carries_their_certificate() {
    let mut m = TestMesh::new(2, BUCKETS);
    m.connect(0, 1);
    m.settle();
    m.disconnect(0, 1);
    for i in 0..2 {
        m.execute(i, testkit::receipt(&format!("r{i}"), "loc0", &[(5, 10)]))
            .unwrap();
        m.commit(i);
    }
    m.connect(0, 1);
    for round in 0..200u64 {
        // Each node writes to the shared ledger document, then takes in what
        // the other sent, in the same open batch.
        for (a, b) in [(0, 1), (1, 0)] {
            m.execute(
                b,
                testkit::receipt(&format!("x{round}-{b}"), "loc0", &[(5, 1)]),
            )
            .unwrap();
            m.deliver_into_open_batch(a, b);
            m.commit(b);
        }
        if m.links.values().all(|q| q.is_empty()) {
            break;
        }
    }
    m.settle();
    for i in 0..2 {
        assert_eq!(rejected(&m, i, "bad_signature"), 0, "node {i}");
    }
    assert_eq!(
        m.nodes[0].engine.totals(5, Some("loc0")).map(|t| t.0),
        m.nodes[1].engine.totals(5, Some("loc0")).map(|t| t.0)
    );
}

// ---- an engine reopened under live connections (seed 147) ----

use storemesh_protocol::engine::{Batch, Engine};
use storemesh_protocol::ops::IdemRecord;
use storemesh_protocol::step::{Input, LoopConfig, NodeLoop, Step, Storage, StorageError};

/// The step's storage, in memory; `fail_commit` makes the next commits fail
/// (the driver then reopens the engine, keeping its connections).
#[derive(Default)]
struct MemStorage {
    idem: std::collections::BTreeMap<String, IdemRecord>,
    fail_commit: bool,
}

impl Storage for MemStorage {
    fn idem(&mut self, key: &str) -> Result<Option<IdemRecord>, StorageError> {
        Ok(self.idem.get(key).cloned())
    }

    fn sync_states(&mut self, _peer: &NodeId) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        Ok(Vec::new())
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StorageError> {
        if self.fail_commit {
            return Err(StorageError("disk full".into()));
        }
        for (k, r) in &batch.idem {
            self.idem.insert(k.clone(), r.clone());
        }
        Ok(())
    }
}

/// A signing engine of node `i` with the other of nodes 0 and 1 configured.
fn signed_engine(i: usize, incarnation: u8) -> Engine {
    let mut e = Engine::new(testkit::config(i, BUCKETS), [incarnation; 4]);
    testkit::sign(&mut e);
    let j = 1 - i;
    e.add_configured_peer(&format!("n{j}"), testkit::node_id(j));
    e.finish_open();
    e
}

/// Runs one step; the frames it released, or `None` if its commit failed.
fn step(
    node: &mut NodeLoop<u32>,
    store: &mut MemStorage,
    inputs: Vec<Input<u32>>,
    now: u64,
) -> Option<Vec<Vec<u8>>> {
    match node.step(store, inputs, now) {
        Step::Committed(c) => Some(c.frames.into_iter().map(|(_, f)| f).collect()),
        Step::Failed(_) => None,
    }
}

fn frames_in(from: usize, frames: Vec<Vec<u8>>) -> Vec<Input<u32>> {
    frames
        .into_iter()
        .map(|f| Input::Frame {
            peer: testkit::node_id(from),
            conn: 1,
            body: f[4..].to_vec(),
        })
        .collect()
}

/// A node whose commit failed reopens its engine from storage and keeps its
/// connections (`NodeLoop::replace_engine`, as the node and the simulator
/// do). Its peer does not know: it sent the certificate of its batch over
/// that connection once and re-offers the changes without it. Before the
/// fix, the reopened engine had lost the certificate (held in memory ahead
/// of its changes) and refused the peer's honest changes as
/// `bad_signature` (simulator seed 147, invariant `authorship`).
#[test]
fn an_engine_reopened_under_live_connections_keeps_what_peers_sent_over_them() {
    let mut stores = [MemStorage::default(), MemStorage::default()];
    let mut nodes: Vec<NodeLoop<u32>> = (0..2)
        .map(|i| NodeLoop::new(signed_engine(i, 1), LoopConfig::default(), 0))
        .collect();
    let mut now = 1_795_773_600_000u64;
    let mut inbox: [Vec<Input<u32>>; 2] = [Vec::new(), Vec::new()];
    for (i, queue) in inbox.iter_mut().enumerate() {
        queue.push(Input::PeerUp {
            peer: testkit::node_id(1 - i),
            conn: 1,
            digest: None,
        });
    }
    // Node 0 writes; node 1 takes in the certificate and the changes in a
    // batch whose commit fails, then reopens and syncs over the same link.
    inbox[0].push(Input::Op(
        testkit::receipt("r1", "loc0", &[(5, 10), (6, 3)]),
        1,
    ));
    let mut failed_once = false;
    for _round in 0..200 {
        if inbox.iter().all(Vec::is_empty) {
            break;
        }
        for i in 0..2 {
            now += 5;
            let inputs = std::mem::take(&mut inbox[i]);
            let carries_certs = i == 1
                && inputs.iter().any(|x| {
                    matches!(x, Input::Frame { body, .. }
                        if storemesh_protocol::wire::decode_frame::<Msg>(body)
                            .is_ok_and(|m| matches!(m, Msg::Certs { .. })))
                });
            if carries_certs && !failed_once {
                failed_once = true;
                stores[1].fail_commit = true;
            }
            match step(&mut nodes[i], &mut stores[i], inputs, now) {
                Some(out) => inbox[1 - i].extend(frames_in(i, out)),
                None => {
                    stores[i].fail_commit = false;
                    nodes[i].replace_engine(signed_engine(i, 2), &mut stores[i], now);
                    // The reopened engine's session start goes out with its next step.
                    if let Some(out) = step(&mut nodes[i], &mut stores[i], Vec::new(), now) {
                        inbox[1 - i].extend(frames_in(i, out));
                    }
                }
            }
        }
    }
    assert!(
        failed_once,
        "the test must fail a commit that took in certificates"
    );
    let refused = nodes[1].rejected();
    assert_eq!(
        refused.get("bad_signature").copied().unwrap_or(0),
        0,
        "node 1 refused node 0's honest changes: {refused:?}"
    );
    for p in [5, 6] {
        assert_eq!(
            nodes[1].engine().totals(p, Some("loc0")).map(|t| t.0),
            nodes[0].engine().totals(p, Some("loc0")).map(|t| t.0),
            "product {p}"
        );
    }
    assert_eq!(
        nodes[1].engine().totals(5, Some("loc0")).map(|t| t.0),
        Some(10)
    );
}
