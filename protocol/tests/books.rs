//! Exact books in the engine: operations all or nothing, deficits once per
//! shortfall event, count sessions' recounts, and records that peers accept.

use automerge::transaction::Transactable;
use automerge::{Automerge, ScalarValue, ROOT};
use storemesh_protocol::ids::{product_bucket, CELL_MAX};
use storemesh_protocol::layout::{ledger_key, DocId, LedgerField, RecordKind};
use storemesh_protocol::ops::*;
use storemesh_protocol::testkit::{self, count, grant, TestMesh};
use storemesh_protocol::Engine;

const NOW: u64 = 1_795_773_600_000;

fn deficits(e: &Engine) -> Vec<i64> {
    e.views
        .alarms()
        .values()
        .filter(|a| a.kind == "deficit")
        .map(|a| a.record["deficit"].as_i64().unwrap_or(0))
        .collect()
}

/// Finding 7: an operation that fails after its first write (here the
/// second line overflows its ledger cell) leaves nothing behind, so a retry
/// cannot apply the first line twice.
#[test]
fn an_operation_refused_after_its_first_write_leaves_nothing() {
    let mut e = Engine::new(testkit::config(0, 4), [1, 2, 3, 4]);
    let actor = e.actor();
    // Product 2's received cell of this very writer is one below the cell limit.
    let mut doc = Automerge::new().with_actor(actor.automerge());
    let mut tx = doc.transaction();
    tx.put(
        ROOT,
        ledger_key(2, actor, LedgerField::Received),
        ScalarValue::Uint(CELL_MAX - 1),
    )
    .unwrap();
    tx.commit();
    let id = DocId::Ledger {
        location: "loc0".into(),
        bucket: product_bucket(2, 4),
        epoch: 0,
    }
    .encode();
    e.load_doc(&id, &[doc.save()], Vec::new()).unwrap();
    e.finish_open();
    let before = e.flush(NOW);
    assert!(before.idem.is_empty());
    for attempt in 0..2 {
        let r = e.execute(
            testkit::receipt("r1", "loc0", &[(1, 5), (2, 5)]),
            NOW + attempt,
            &|_| None,
        );
        assert!(matches!(r, Err(OpError::BadRequest(_))), "{r:?}");
        // Product 1 (the first line) was not booked, in the view or the documents.
        assert_eq!(e.totals(1, None).map(|t| t.0).unwrap_or(0), 0);
        let batch = e.flush(NOW + attempt);
        assert!(batch.idem.is_empty());
        assert!(!e.recompute_stock().contains_key(&1));
    }
    // The same receipt without the overflowing line is booked once.
    e.execute(testkit::receipt("r2", "loc0", &[(1, 5)]), NOW + 3, &|_| {
        None
    })
    .unwrap();
    assert_eq!(e.totals(1, None).map(|t| t.0), Some(5));
}

/// Finding 4: a product at -5 got another deficit of 5 at every later
/// count; a deficit is recorded once per shortfall event.
#[test]
fn deficits_are_recorded_once_per_shortfall() {
    let mut m = TestMesh::new(2, 4);
    m.full_mesh();
    m.settle();
    m.execute(0, testkit::receipt("r1", "loc0", &[(7, 10)]))
        .unwrap();
    m.execute(0, grant("g1", 7, "loc0", "n1", 10)).unwrap();
    m.commit(0);
    // Five units lost: this node's rights go to -5, one deficit of 5.
    m.execute(0, count("c1", "loc0", &[(7, 5)])).unwrap();
    m.commit(0);
    assert_eq!(deficits(&m.nodes[0].engine), vec![5]);
    // Counted again at 5: nothing new is short.
    m.execute(0, count("c2", "loc0", &[(7, 5)])).unwrap();
    m.commit(0);
    assert_eq!(deficits(&m.nodes[0].engine), vec![5]);
    // Two more lost: a new shortfall of 2 (not masked by the earlier 5).
    m.execute(0, count("c3", "loc0", &[(7, 3)])).unwrap();
    m.commit(0);
    let mut d = deficits(&m.nodes[0].engine);
    d.sort();
    assert_eq!(d, vec![2, 5]);
    m.settle();
    let mut d = deficits(&m.nodes[1].engine);
    d.sort();
    assert_eq!(d, vec![2, 5], "the peer accepted the deficit records");
}

/// A count id of the longest allowed length used to make deficit records
/// with an id over 128 characters, which peers refuse (blocking every later
/// record of the node); parts and deficits now keep valid ids.
#[test]
fn records_of_long_count_ids_are_accepted_by_peers() {
    let mut m = TestMesh::new(2, 4);
    m.full_mesh();
    m.settle();
    let long = "c".repeat(128);
    m.execute(0, testkit::receipt("r1", "loc0", &[(7, 10), (8, 3)]))
        .unwrap();
    m.execute(0, grant("g1", 7, "loc0", "n1", 10)).unwrap();
    m.commit(0);
    let Op::Count(mut c) = count(&long, "loc0", &[(7, 4)]) else {
        unreachable!()
    };
    c.scope = Some(CountScope::Full);
    let r = m.execute(0, Op::Count(c)).unwrap();
    assert!(r.body.contains("\"products_zeroed\":1"), "{}", r.body);
    m.commit(0);
    m.execute(0, testkit::sale("s1", None, &[(8, 1)]))
        .unwrap_err();
    m.settle();
    let peer = &m.nodes[1].engine;
    assert_eq!(peer.stats.rejected_messages, 0);
    assert_eq!(deficits(peer), vec![6]);
    let s = peer.count_json(&long).expect("count known");
    assert_eq!(s["products_zeroed"], 1);
}

/// Count sessions: a recount replaces the earlier line, lines scanned
/// before a sale are not erased by it, and a partial finish zeroes nothing.
#[test]
fn count_session_recount_and_partial_finish() {
    let mut m = TestMesh::new(2, 4);
    m.full_mesh();
    m.settle();
    m.execute(
        0,
        testkit::receipt("r1", "loc0", &[(1, 10), (2, 10), (3, 10)]),
    )
    .unwrap();
    m.commit(0);
    let lines = |l: &[(u64, u64)]| {
        Op::CountLines(CountLines {
            count_id: "k1".into(),
            location: "loc0".into(),
            lines: l
                .iter()
                .map(|(p, c)| SessionLine {
                    product_id: *p,
                    counted: *c,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    };
    let r = m.execute(0, lines(&[(1, 8), (2, 9)])).unwrap();
    assert!(r.body.contains("\"lines_received\":2"), "{}", r.body);
    m.commit(0);
    m.execute(0, testkit::sale("s1", None, &[(1, 1)])).unwrap();
    m.commit(0);
    // Product 2 recounted: it ends at the recount.
    m.execute(0, lines(&[(2, 7)])).unwrap();
    m.commit(0);
    let r = m
        .execute(
            0,
            Op::CountFinish(CountFinish {
                count_id: "k1".into(),
                scope: CountScope::Partial,
            }),
        )
        .unwrap();
    assert_eq!(r.kind, ReplyKind::Created);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["lines_counted"], 2);
    assert_eq!(v["products_zeroed"], 0);
    assert_eq!(v["units_delta"], -2 - 3);
    m.commit(0);
    let e = &m.nodes[0].engine;
    assert_eq!(
        e.totals(1, None).map(|t| t.0),
        Some(7),
        "the sale after the scan stays"
    );
    assert_eq!(e.totals(2, None).map(|t| t.0), Some(7));
    assert_eq!(e.totals(3, None).map(|t| t.0), Some(10));
    // After the finish: lines are refused with id_conflict.
    let err = m.execute(0, lines(&[(3, 1)])).unwrap_err();
    assert!(matches!(err, OpError::IdConflict(_)), "{err:?}");
    m.settle();
    let s = m.nodes[1].engine.count_json("k1").unwrap();
    assert_eq!(s["status"], "finished");
}

/// Finding 3: two nodes receiving the same transfer into a location no node
/// owns each added the units; now only the sending node books the arrival.
#[test]
fn a_transfer_into_an_ownerless_location_is_received_once() {
    let mut m = TestMesh::new(2, 4);
    m.full_mesh();
    m.settle();
    m.execute(
        0,
        Op::DeclareLocation(DeclareLocation {
            location: "wh".into(),
            ..Default::default()
        }),
    )
    .unwrap();
    m.execute(0, testkit::receipt("r1", "loc0", &[(3, 10)]))
        .unwrap();
    m.execute(
        0,
        Op::Transfer(Transfer {
            transfer_id: "t1".into(),
            from: "loc0".into(),
            to: "wh".into(),
            lines: vec![QtyLine {
                product_id: 3,
                quantity: 4,
                ..Default::default()
            }],
            ..Default::default()
        }),
    )
    .unwrap();
    m.commit(0);
    m.settle();
    let receive = || {
        Op::TransferReceive(TransferReceive {
            transfer_id: "t1".into(),
            ..Default::default()
        })
    };
    let e = m.execute(1, receive()).unwrap_err();
    assert!(matches!(e, OpError::NotOwner(_)), "{e:?}");
    m.execute(0, receive()).unwrap();
    m.commit(0);
    m.settle();
    for n in &m.nodes {
        let stock = n.engine.recompute_stock();
        assert_eq!(stock[&3]["wh"].on_hand(), 4);
        assert_eq!(stock[&3]["loc0"].on_hand(), 6);
        assert_eq!(n.engine.incoming(3, "wh"), 0);
    }
}

/// Finding 5: a sale with two lines of 6×10^8 of one product asked peers
/// for 1.2×10^9 rights, over the quantity limit: every peer dropped the link
/// as a protocol violation. The request is clamped and answered.
#[test]
fn a_huge_rights_request_is_clamped_not_a_violation() {
    let mut m = TestMesh::new(2, 4);
    m.full_mesh();
    m.settle();
    for k in 0..2 {
        m.execute(
            0,
            testkit::receipt(&format!("r{k}"), "loc0", &[(3, 1_000_000_000)]),
        )
        .unwrap();
    }
    m.commit(0);
    m.settle();
    let big = Op::Sale(Sale {
        sale_id: "huge".into(),
        location: Some("loc0".into()),
        lines: vec![
            SaleLine {
                product_id: 3,
                quantity: 600_000_000,
                ..Default::default()
            };
            2
        ],
        ..Default::default()
    });
    let now = m.now_ms;
    let parked = m.nodes[1].engine.submit(big, now, 10_000, &|_| None);
    assert!(matches!(
        parked,
        storemesh_protocol::rebalance::Submit::Parked(_)
    ));
    m.commit(1);
    // Delivering the request used to panic here (a protocol violation).
    m.settle();
    assert_eq!(m.nodes[0].engine.stats.rejected_messages, 0);
    assert_eq!(m.nodes[1].engine.rights(3, "loc0"), 1_000_000_000);
}

/// Finding 2, reservations: two nodes apart both reserve `rsv-1` for the
/// same fulfilling node; both hold their units (before, one overwrote the
/// other and its units became sellable).
#[test]
fn colliding_reservation_ids_both_hold_their_units() {
    let mut m = TestMesh::new(2, 4);
    m.full_mesh();
    m.settle();
    m.execute(0, testkit::receipt("r1", "loc0", &[(3, 10)]))
        .unwrap();
    m.execute(0, grant("g1", 3, "loc0", "n1", 5)).unwrap();
    m.commit(0);
    m.settle();
    m.disconnect(0, 1);
    let reserve = |q: u64| {
        Op::Reserve(Reserve {
            reservation_id: "rsv-1".into(),
            location: "loc0".into(),
            lines: vec![QtyLine {
                product_id: 3,
                quantity: q,
                ..Default::default()
            }],
            fulfil_by: "n0".into(),
            expires_at: "2030-01-01T00:00:00Z".into(),
            ..Default::default()
        })
    };
    m.execute(0, reserve(3)).unwrap();
    m.commit(0);
    m.execute(1, reserve(2)).unwrap();
    m.commit(1);
    m.connect(0, 1);
    m.settle();
    // n0 holds 5 + 2 rights, 3 + 2 of them reserved.
    let e = &m.nodes[0].engine;
    assert_eq!(e.rights_raw(3, "loc0"), 7);
    assert_eq!(e.rights(3, "loc0"), 2);
    let v = e.reservation_json("rsv-1").unwrap();
    assert_eq!(v["collisions"].as_array().map(|a| a.len()), Some(1), "{v}");
    assert!(e
        .id_collisions()
        .iter()
        .any(|c| c["id"] == "rsv-1" && c["record"] == "reservation"));
    let err = m
        .execute(
            0,
            Op::ReservationCancel {
                reservation_id: "rsv-1".into(),
            },
        )
        .unwrap_err();
    assert!(
        matches!(&err, OpError::Conflict { code, .. } if code == "id_collision"),
        "{err:?}"
    );
}

/// Adjustments too: a deficit for the shortfall each one causes, once.
#[test]
fn adjustment_deficits_are_recorded_once_per_shortfall() {
    let mut m = TestMesh::new(2, 4);
    m.full_mesh();
    m.settle();
    m.execute(0, testkit::receipt("r1", "loc0", &[(7, 4)]))
        .unwrap();
    let damaged = |id: &str, q: i64| {
        Op::Adjustment(Adjustment {
            adjustment_id: id.into(),
            location: "loc0".into(),
            reason: AdjustmentReason::Damaged,
            lines: vec![AdjustmentLine {
                product_id: 7,
                sku: None,
                quantity: q,
            }],
            note: None,
            occurred_at: None,
            register_id: None,
            staff_id: None,
        })
    };
    m.execute(0, damaged("a1", 6)).unwrap();
    m.execute(0, damaged("a2", 1)).unwrap();
    m.commit(0);
    let mut d = deficits(&m.nodes[0].engine);
    d.sort();
    assert_eq!(d, vec![1, 2]);
}

/// Two connected nodes, 5 of product 1 at n0's loc0 and 5 of product 2 at
/// n1's loc1, then cut apart.
fn two_stocked_nodes_apart() -> TestMesh {
    let mut m = TestMesh::new(2, 4);
    m.full_mesh();
    m.settle();
    m.execute(0, testkit::receipt("r0", "loc0", &[(1, 5)]))
        .unwrap();
    m.execute(1, testkit::receipt("r1", "loc1", &[(2, 5)]))
        .unwrap();
    m.commit(0);
    m.commit(1);
    m.settle();
    m.disconnect(0, 1);
    m
}

/// Both nodes sell `s-1` while apart (n0 2 of product 1, n1 3 of product
/// 2), then meet.
fn both_sell_s1_then_meet(m: &mut TestMesh) {
    m.execute(0, testkit::sale("s-1", None, &[(1, 2)])).unwrap();
    m.commit(0);
    m.execute(1, testkit::sale("s-1", None, &[(2, 3)])).unwrap();
    m.commit(1);
    m.connect(0, 1);
    m.settle();
}

/// Node `i` (or a copy of it) looks `s-1` up as its own sale of
/// `own_product` and lists the other node's as its one collision.
fn sees_own_s1_and_the_collision(e: &Engine, i: usize, own_product: u64) {
    let v = e.sale_json("s-1").unwrap();
    assert_eq!(v["lines"][0]["product_id"], own_product, "n{i}: {v}");
    assert_eq!(
        v["collisions"].as_array().map(|a| a.len()),
        Some(1),
        "n{i}: {v}"
    );
    let listed: Vec<serde_json::Value> = e
        .id_collisions()
        .into_iter()
        .filter(|c| c["id"] == "s-1")
        .collect();
    assert_eq!(listed.len(), 1, "n{i}");
    assert_eq!(listed[0]["nodes"], serde_json::json!(["n0", "n1"]));
}

/// Colliding sale ids: each node looks up its own sale (returns against it
/// are checked against the right lines), both are listed.
#[test]
fn colliding_sale_ids_are_both_kept() {
    let mut m = two_stocked_nodes_apart();
    both_sell_s1_then_meet(&mut m);
    for (i, own_product) in [(0usize, 1u64), (1, 2)] {
        sees_own_s1_and_the_collision(&m.nodes[i].engine, i, own_product);
    }
    // A return at n1 against s-1 is checked against n1's sale (3 of product 2).
    let ret = Op::Return(Return {
        return_id: "ret-1".into(),
        location: "loc1".into(),
        original_sale_id: Some("s-1".into()),
        customer_id: None,
        lines: vec![ReturnLine {
            product_id: 2,
            quantity: 3,
            disposition: Disposition::Restock,
        }],
        occurred_at: None,
        register_id: None,
        staff_id: None,
    });
    m.execute(1, ret).unwrap();
}

/// Colliding sale ids stay listed, and each node still looks up its own
/// sale, after a restart: a start notes every stored sale unchecked and
/// settles the ids held in more than one document at its end.
#[test]
fn colliding_sale_ids_are_settled_again_at_a_restart() {
    let mut m = two_stocked_nodes_apart();
    // Other sales (5 units of each product are stocked; s-1 takes 2 and 3).
    for (n, i, p) in [(0, 0, 1), (1, 0, 1), (2, 0, 1), (3, 1, 2), (4, 1, 2)] {
        m.execute(i, testkit::sale(&format!("u-{n}"), None, &[(p, 1)]))
            .unwrap();
    }
    both_sell_s1_then_meet(&mut m);
    for (i, own_product) in [(0usize, 1u64), (1, 2)] {
        let c = m.clone_node(i, [7, 7, 7, i as u8]);
        let e = &m.nodes[c].engine;
        sees_own_s1_and_the_collision(e, i, own_product);
        assert_eq!(
            e.views.sales().len(),
            m.nodes[i].engine.views.sales().len(),
            "n{i}: the restarted index holds what the running one does"
        );
        assert!(e.sale_json("never-sold").is_none());
        for n in 0..5 {
            assert!(e.sale_json(&format!("u-{n}")).is_some(), "n{i}: u-{n}");
        }
    }
}

/// Colliding sale ids where the other node's sale arrives while this node's
/// own sale of the id is still unflushed in the open batch (a frame received
/// between an operation and the batch's commit): both are listed at both
/// nodes. Before, the own sale was not seen in its document yet, the
/// arriving one was indexed as the id's only sale, and the lookup listed no
/// collision (simulator seed 113, checker `colliding-ids`).
#[test]
fn a_sale_id_collision_arriving_in_the_open_batch_is_listed() {
    let mut m = two_stocked_nodes_apart();
    m.execute(1, testkit::sale("s-1", None, &[(2, 3)])).unwrap();
    m.commit(1);
    m.connect(0, 1);
    // n0 sells s-1; before its batch commits, n1's records arrive.
    m.execute(0, testkit::sale("s-1", None, &[(1, 2)])).unwrap();
    let tag1 = format!("rec/{}/", m.nodes[1].engine.tag());
    let key = storemesh_protocol::layout::record_key(RecordKind::Sale, "s-1");
    let has_n1_records = |e: &Engine| {
        e.documents()
            .iter()
            .any(|(d, _)| d.starts_with(&tag1) && e.record(d, &key).is_some())
    };
    for _ in 0..20 {
        if has_n1_records(&m.nodes[0].engine) {
            break;
        }
        m.deliver_into_open_batch(1, 0);
        let id0 = m.id(0);
        for (_, frame) in m.take_frames_of_open_batch(0) {
            let now = 1_795_773_700_000;
            m.nodes[1].engine.receive(id0, &frame[4..], now).unwrap();
            m.commit(1);
        }
    }
    assert!(
        has_n1_records(&m.nodes[0].engine),
        "n1's sale s-1 reached n0 inside its open batch"
    );
    m.commit(0);
    m.settle();
    for (i, own_product) in [(0usize, 1u64), (1, 2)] {
        sees_own_s1_and_the_collision(&m.nodes[i].engine, i, own_product);
    }
}

/// What [`reservation_with_a_hold_lost_in_a_fork`] leaves.
struct LostHold {
    m: TestMesh,
    /// Products whose cells are in different ledger documents; n0 reserved
    /// 3 of `a` and 2 of `b` at loc0 for n1 to fulfil.
    a: u64,
    b: u64,
    /// n0 restored from a backup taken before the reservation (not connected).
    restored: usize,
    expires_ms: u64,
}

/// n0 reserves 3 of `a` and 2 of `b` at loc0 for n1; everything but the
/// push of `b`'s ledger document (its hold) reaches n1; n0 is then
/// disconnected (its disk replaced by a backup taken before: `restored`).
fn reservation_with_a_hold_lost_in_a_fork() -> LostHold {
    let buckets = 4;
    let mut m = TestMesh::new(2, buckets);
    m.full_mesh();
    m.settle();
    // Two products whose cells are in different ledger documents.
    let a = 1u64;
    let b = (2..1000)
        .find(|p| product_bucket(*p, buckets) != product_bucket(a, buckets))
        .unwrap();
    let ledger_of = |p: u64| {
        DocId::Ledger {
            location: "loc0".into(),
            bucket: product_bucket(p, buckets),
            epoch: 0,
        }
        .encode()
    };
    m.execute(0, testkit::receipt("r1", "loc0", &[(a, 10), (b, 10)]))
        .unwrap();
    m.commit(0);
    m.settle();
    // The backup n0 is restored from later.
    let restored = m.clone_node(0, [9, 9, 9, 9]);
    let expires_ms = m.now_ms + 60_000;
    let line = |p: u64, q: u64| QtyLine {
        product_id: p,
        quantity: q,
        ..Default::default()
    };
    m.execute(
        0,
        Op::Reserve(Reserve {
            reservation_id: "rsv-1".into(),
            location: "loc0".into(),
            lines: vec![line(a, 3), line(b, 2)],
            fulfil_by: "n1".into(),
            expires_at: storemesh_protocol::time::format_rfc3339_ms(expires_ms),
            ..Default::default()
        }),
    )
    .unwrap();
    m.commit(0);
    // Everything but the push of product b's ledger document reaches n1;
    // then n0's disk is replaced by the backup.
    let frames: Vec<Vec<u8>> = m.links.get_mut(&(0, 1)).unwrap().drain(..).collect();
    let mut dropped = 0;
    for f in frames {
        let msg: storemesh_protocol::sync::Msg =
            storemesh_protocol::wire::decode_frame(&f[4..]).unwrap();
        if matches!(&msg, storemesh_protocol::sync::Msg::Push { doc, .. } if *doc == ledger_of(b)) {
            dropped += 1;
            continue;
        }
        m.links.get_mut(&(0, 1)).unwrap().push_back(f);
    }
    assert_eq!(dropped, 1, "the hold of product {b} was pushed once");
    m.deliver(0, 1, usize::MAX);
    m.disconnect(0, 1);
    {
        let e = &m.nodes[1].engine;
        let v = e.reservation_json("rsv-1").unwrap();
        assert_eq!(v["status"], "open", "{v}");
        assert_eq!(e.reserved_at(a, "loc0"), 3);
        assert_eq!(e.reserved_at(b, "loc0"), 0, "b's hold never arrived");
    }
    LostHold {
        m,
        a,
        b,
        restored,
        expires_ms,
    }
}

/// The restored n0 meets n1, which sees n0's fork record and expires
/// rsv-1 by its clock (releasing the line whose hold it sees).
fn restored_creator_meets_and_n1_expires(h: &mut LostHold) {
    let m = &mut h.m;
    m.connect(h.restored, 1);
    m.settle();
    assert!(
        m.nodes[1]
            .engine
            .views
            .alarms()
            .values()
            .any(|al| al.kind == "fork" && al.node == "n0"),
        "n1 sees n0's fork record"
    );
    let e = &mut m.nodes[1].engine;
    assert_eq!(e.expire_reservations(h.expires_ms - 1), 0, "not due yet");
    assert_eq!(e.expire_reservations(h.expires_ms + 1), 1, "expired");
    m.commit(1);
    m.settle();
}

/// A reservation whose ledger hold was partly lost with a fork of its
/// creator (restored from a backup: its record and the hold of one product
/// had reached the fulfilling node, the hold of the other never left the
/// lost branch) still expires at its fulfilling node once that node sees the
/// creator's fork record: the line whose hold it sees is released, the other
/// never held anything there. Before, the fulfilling node waited for the
/// missing hold for ever and the seen line's units stayed held (simulator
/// seed 139, checker `reservations`).
#[test]
fn a_reservation_whose_hold_was_lost_with_a_fork_expires() {
    let mut h = reservation_with_a_hold_lost_in_a_fork();
    restored_creator_meets_and_n1_expires(&mut h);
    let (a, b) = (h.a, h.b);
    for i in [1, h.restored] {
        let e = &h.m.nodes[i].engine;
        let v = e.reservation_json("rsv-1").unwrap();
        assert_eq!(v["status"], "expired", "node {i}: {v}");
        assert_eq!(e.reserved_at(a, "loc0"), 0, "node {i}: a released");
        assert_eq!(e.reserved_at(b, "loc0"), 0, "node {i}: b never held");
    }
}

/// The hold the fork-expiry did not see was only late, not lost: the
/// original n0 (a copy of its disk from before the restore, say) still had
/// it and meets n1 afterwards. n1 releases it when it arrives, once, also
/// after a restart: the 2 reserved units of `b` become n1's to sell.
/// Before, they stayed held for ever (reserved 2, n1's rights 0).
#[test]
fn a_hold_that_arrives_after_its_reservation_expired_is_released() {
    let mut h = reservation_with_a_hold_lost_in_a_fork();
    restored_creator_meets_and_n1_expires(&mut h);
    let (a, b, restored) = (h.a, h.b, h.restored);
    let m = &mut h.m;
    // The copy that still has b's hold meets n1 (one identity at a time on
    // n1's links).
    m.disconnect(restored, 1);
    m.connect(0, 1);
    m.settle();
    let now = m.now_ms;
    m.nodes[1].engine.expire_reservations(now);
    m.commit(1);
    m.settle();
    for i in [0, 1] {
        let e = &m.nodes[i].engine;
        assert_eq!(e.reservation_json("rsv-1").unwrap()["status"], "expired");
        assert_eq!(e.reserved_at(a, "loc0"), 0, "node {i}: a released");
        assert_eq!(
            e.reserved_at(b, "loc0"),
            0,
            "node {i}: b released once it arrived"
        );
    }
    assert_eq!(
        m.nodes[1].engine.rights(b, "loc0"),
        2,
        "b's granted units are n1's now"
    );
    // Restarted, n1 knows the line was released: it is not released again
    // (a second release would eat into the next reservation's hold).
    m.disconnect(0, 1);
    let n1 = m.clone_node(1, [8, 8, 8, 8]);
    m.nodes[n1].engine.expire_reservations(now + 1);
    m.commit(n1);
    m.connect(0, n1);
    m.settle();
    let line = QtyLine {
        product_id: b,
        quantity: 1,
        ..Default::default()
    };
    m.execute(
        0,
        Op::Reserve(Reserve {
            reservation_id: "rsv-2".into(),
            location: "loc0".into(),
            lines: vec![line],
            fulfil_by: "n1".into(),
            expires_at: storemesh_protocol::time::format_rfc3339_ms(now + 3_600_000),
            ..Default::default()
        }),
    )
    .unwrap();
    m.commit(0);
    m.settle();
    let e = &mut m.nodes[n1].engine;
    e.expire_reservations(now + 2);
    assert_eq!(e.reserved_at(b, "loc0"), 1, "rsv-2 holds its unit");
    assert_eq!(
        e.rights(b, "loc0"),
        2,
        "rights: 2 released + 1 granted − 1 held"
    );
}
