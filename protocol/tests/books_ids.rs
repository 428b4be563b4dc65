//! Exact books, ids used twice (issue 15, CONTRACT v2 "ids are chain-wide"):
//! receipt ids that collided while apart are listed, and a transfer id a
//! restored node sent again in another month's document is in transit with
//! both transfers' units.

use storemesh_protocol::ops::*;
use storemesh_protocol::testkit::{self, TestMesh};
use storemesh_protocol::Engine;

const DAY_MS: u64 = 86_400_000;

fn transfer(id: &str, from: &str, to: &str, lines: &[(u64, u64)]) -> Op {
    Op::Transfer(Transfer {
        transfer_id: id.into(),
        from: from.into(),
        to: to.into(),
        lines: lines
            .iter()
            .map(|(p, q)| QtyLine {
                product_id: *p,
                quantity: *q,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
}

/// The receipt id collisions `e` lists (`/api/overdrafts`): (id, nodes).
fn receipt_collisions(e: &Engine) -> Vec<(String, serde_json::Value)> {
    e.id_collisions()
        .into_iter()
        .filter(|c| c["kind"] == "id_collision" && c["record"] == "receipt")
        .map(|c| {
            (
                c["id"].as_str().unwrap_or("").to_string(),
                c["nodes"].clone(),
            )
        })
        .collect()
}

fn on_hand(e: &Engine, p: u64, loc: &str) -> i64 {
    e.totals(p, Some(loc)).map(|t| t.0).unwrap_or(0)
}

/// Two nodes apart from each other each receive goods under receipt id
/// `rcv-1` (n0 5 of product 1 at loc0, n1 3 of product 2 at loc1). Once
/// they meet, both receipts count and every node lists the id as a
/// collision of both nodes, also after a restart. Before, nothing listed it.
#[test]
fn colliding_receipt_ids_both_count_and_are_listed() {
    let mut m = TestMesh::new(2, 4);
    m.full_mesh();
    m.settle();
    m.disconnect(0, 1);
    m.execute(0, testkit::receipt("rcv-1", "loc0", &[(1, 5)]))
        .unwrap();
    m.commit(0);
    m.execute(1, testkit::receipt("rcv-1", "loc1", &[(2, 3)]))
        .unwrap();
    m.commit(1);
    for i in 0..2 {
        assert!(
            receipt_collisions(&m.nodes[i].engine).is_empty(),
            "n{i}: one receipt of rcv-1 known, no collision"
        );
    }
    m.connect(0, 1);
    m.settle();
    let want = vec![("rcv-1".to_string(), serde_json::json!(["n0", "n1"]))];
    for i in 0..2 {
        let e = &m.nodes[i].engine;
        assert_eq!(on_hand(e, 1, "loc0"), 5, "n{i}: n0's receipt counts");
        assert_eq!(on_hand(e, 2, "loc1"), 3, "n{i}: n1's receipt counts");
        assert_eq!(receipt_collisions(e), want, "n{i}");
    }
    // A restarted node finds the collision again in its records.
    let c = m.clone_node(1, [7, 7, 7, 7]);
    assert_eq!(receipt_collisions(&m.nodes[c].engine), want);
    // A receipt id used once is not listed; a retry of rcv-1 at n0 adds
    // nothing and changes nothing.
    m.execute(0, testkit::receipt("rcv-2", "loc0", &[(1, 1)]))
        .unwrap();
    let again = m
        .execute(0, testkit::receipt("rcv-1", "loc0", &[(1, 5)]))
        .unwrap();
    assert_eq!(again.kind, ReplyKind::Ok, "a replay");
    m.commit(0);
    m.settle();
    for i in 0..2 {
        let e = &m.nodes[i].engine;
        assert_eq!(on_hand(e, 1, "loc0"), 6, "n{i}");
        assert_eq!(receipt_collisions(e), want, "n{i}");
    }
}

/// A node restored from a backup lost the idempotency record of a transfer
/// it had sent (3 of product 1, loc0 → loc1) and, a month later, sends a
/// transfer under the same id (2 more of product 1) in that month's records
/// document. Both are in transit: loc1 expects 5, and receiving the id
/// takes in 5; the chain's 10 units are all there. Before, the in-transit
/// view kept only the last record's quantity (2), as if 3 units had
/// vanished.
#[test]
fn a_transfer_id_sent_again_in_another_month_by_a_restored_node_sums() {
    let mut m = TestMesh::new(2, 4);
    m.full_mesh();
    m.settle();
    m.execute(0, testkit::receipt("r0", "loc0", &[(1, 10)]))
        .unwrap();
    m.commit(0);
    m.settle();
    // The backup n0 is restored from later.
    let restored = m.clone_node(0, [9, 9, 9, 9]);
    m.execute(0, transfer("t-1", "loc0", "loc1", &[(1, 3)]))
        .unwrap();
    m.commit(0);
    m.settle();
    assert_eq!(m.nodes[1].engine.incoming(1, "loc1"), 3);
    // n0's disk is replaced by the backup; a month later it sends t-1 again.
    m.disconnect(0, 1);
    m.now_ms += 40 * DAY_MS;
    m.execute(restored, transfer("t-1", "loc0", "loc1", &[(1, 2)]))
        .unwrap();
    m.commit(restored);
    m.connect(restored, 1);
    m.settle();
    for i in [1, restored] {
        let e = &m.nodes[i].engine;
        assert_eq!(
            e.incoming(1, "loc1"),
            5,
            "node {i}: both transfers in transit"
        );
        assert_eq!(on_hand(e, 1, "loc0"), 5, "node {i}");
    }
    let r = m
        .execute(
            1,
            Op::TransferReceive(TransferReceive {
                transfer_id: "t-1".into(),
                ..Default::default()
            }),
        )
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["lines"][0]["received"], 5, "{body}");
    m.commit(1);
    m.settle();
    for i in [1, restored] {
        let e = &m.nodes[i].engine;
        assert_eq!(e.incoming(1, "loc1"), 0, "node {i}");
        assert_eq!(on_hand(e, 1, "loc1"), 5, "node {i}");
        assert_eq!(e.totals(1, None).unwrap().0, 10, "node {i}: conserved");
    }
    // A restart sums the two documents again.
    let c = m.clone_node(restored, [6, 6, 6, 6]);
    let e = &m.nodes[c].engine;
    assert_eq!(e.transfer_json("t-1").unwrap()["lines"][0]["quantity"], 5);
}

/// Returns, grants and adjustments are chain-wide ids too: two nodes apart
/// each use `x-1` for one of each. Both stay in effect (the grants move
/// their units, the adjustments remove theirs, the restocking returns add
/// theirs) and each id is listed once per kind with both nodes.
#[test]
fn colliding_return_grant_and_adjustment_ids_are_listed() {
    let mut m = TestMesh::new(2, 4);
    m.full_mesh();
    m.settle();
    m.execute(0, testkit::receipt("r0", "loc0", &[(1, 10)]))
        .unwrap();
    m.execute(1, testkit::receipt("r1", "loc1", &[(2, 10)]))
        .unwrap();
    m.commit(0);
    m.commit(1);
    m.settle();
    m.disconnect(0, 1);
    for (i, p, loc, to) in [(0usize, 1u64, "loc0", "n1"), (1, 2, "loc1", "n0")] {
        m.execute(i, testkit::grant("x-1", p, loc, to, 2)).unwrap();
        let adj = Op::Adjustment(Adjustment {
            adjustment_id: "x-1".into(),
            location: loc.into(),
            reason: AdjustmentReason::Damaged,
            lines: vec![AdjustmentLine {
                product_id: p,
                sku: None,
                quantity: 1,
            }],
            note: None,
            occurred_at: None,
            register_id: None,
            staff_id: None,
        });
        m.execute(i, adj).unwrap();
        let ret = Op::Return(Return {
            return_id: "x-1".into(),
            location: loc.into(),
            original_sale_id: None,
            customer_id: None,
            lines: vec![ReturnLine {
                product_id: p,
                quantity: 3,
                disposition: Disposition::Restock,
            }],
            occurred_at: None,
            register_id: None,
            staff_id: None,
        });
        m.execute(i, ret).unwrap();
        m.commit(i);
    }
    m.connect(0, 1);
    m.settle();
    for i in 0..2 {
        let e = &m.nodes[i].engine;
        // 10 − 1 damaged + 3 returned, at each location.
        assert_eq!(on_hand(e, 1, "loc0"), 12, "n{i}");
        assert_eq!(on_hand(e, 2, "loc1"), 12, "n{i}");
        let mut listed: Vec<(String, String, serde_json::Value)> = e
            .id_collisions()
            .into_iter()
            .map(|c| {
                (
                    c["record"].as_str().unwrap_or("").to_string(),
                    c["id"].as_str().unwrap_or("").to_string(),
                    c["nodes"].clone(),
                )
            })
            .collect();
        listed.sort_by(|x, y| (&x.0, &x.1).cmp(&(&y.0, &y.1)));
        let both = serde_json::json!(["n0", "n1"]);
        let want: Vec<(String, String, serde_json::Value)> = ["adjustment", "grant", "return"]
            .iter()
            .map(|k| (k.to_string(), "x-1".to_string(), both.clone()))
            .collect();
        assert_eq!(listed, want, "n{i}");
    }
    // Each node holds the 2 units the other granted it.
    assert_eq!(m.nodes[1].engine.rights(1, "loc0"), 2);
    assert_eq!(m.nodes[0].engine.rights(2, "loc1"), 2);
}

/// Finding 5, the reclaim: a node that oversold with `override` by more
/// than the quantity limit (two lines of 6×10^8 out of no rights) reclaims
/// rights from its peer; the request is clamped to the limit instead of
/// making the peer drop the link as a protocol violation, and the peer
/// hands back what it can.
#[test]
fn a_reclaim_after_an_overdraft_past_the_quantity_limit_is_clamped() {
    let q_max = storemesh_protocol::ids::QUANTITY_MAX;
    let mut m = TestMesh::new(2, 4);
    m.full_mesh();
    m.settle();
    for k in 0..2 {
        m.execute(0, testkit::receipt(&format!("r{k}"), "loc0", &[(3, q_max)]))
            .unwrap();
        m.execute(0, testkit::grant(&format!("g{k}"), 3, "loc0", "n1", q_max))
            .unwrap();
    }
    m.commit(0);
    m.settle();
    assert_eq!(m.nodes[0].engine.rights(3, "loc0"), 0);
    let line = SaleLine {
        product_id: 3,
        quantity: 600_000_000,
        ..Default::default()
    };
    let mut s = testkit::sale("over", Some("loc0"), &[]);
    if let Op::Sale(x) = &mut s {
        x.lines = vec![line.clone(), line];
        x.override_rights = true;
    }
    m.execute(0, s).unwrap();
    assert_eq!(m.nodes[0].engine.rights(3, "loc0"), -1_200_000_000);
    m.commit(0);
    m.settle();
    for i in 0..2 {
        assert_eq!(m.nodes[i].engine.stats.rejected_messages, 0, "n{i}");
    }
    let after = m.nodes[0].engine.rights(3, "loc0");
    assert!(
        after >= -1_200_000_000 + q_max as i64,
        "the peer handed back at least the limit: rights {after}"
    );
    // The chain's stock: 2×10^9 received, 1.2×10^9 sold.
    assert_eq!(m.nodes[1].engine.totals(3, None).unwrap().0, 800_000_000);
}

/// Finding 8: `expire_reservations` scanned every reservation ever made, in
/// every batch. With 300 reservations made and cancelled and one open, an
/// expiry pass looks at the due ones only: none before the open one is
/// due, that one when it is.
#[test]
fn expiry_looks_only_at_due_reservations() {
    let mut m = TestMesh::new(1, 4);
    m.execute(0, testkit::receipt("r0", "loc0", &[(1, 1_000)]))
        .unwrap();
    let reserve = |id: &str, expires_ms: u64| {
        Op::Reserve(Reserve {
            reservation_id: id.into(),
            location: "loc0".into(),
            lines: vec![QtyLine {
                product_id: 1,
                quantity: 1,
                ..Default::default()
            }],
            fulfil_by: "n0".into(),
            expires_at: storemesh_protocol::time::format_rfc3339_ms(expires_ms),
            ..Default::default()
        })
    };
    let far = m.now_ms + 3_600_000;
    for k in 0..300 {
        let id = format!("old-{k}");
        m.execute(0, reserve(&id, far)).unwrap();
        m.execute(0, Op::ReservationCancel { reservation_id: id })
            .unwrap();
    }
    let soon = m.now_ms + 60_000;
    m.execute(0, reserve("open-1", soon)).unwrap();
    m.commit(0);
    let e = &mut m.nodes[0].engine;
    let before = e.stats.reservations_expiry_examined;
    assert_eq!(e.expire_reservations(soon - 1), 0);
    assert_eq!(e.stats.reservations_expiry_examined, before, "none due");
    assert_eq!(e.expire_reservations(soon + 1), 1);
    assert_eq!(
        e.stats.reservations_expiry_examined,
        before + 1,
        "the due one"
    );
    assert_eq!(e.reservation_json("open-1").unwrap()["status"], "expired");
    assert_eq!(e.reserved_at(1, "loc0"), 0);
}

/// Finding 2, counts: two nodes apart both count under `c-1`, each at its
/// own location. Both counts stand (each sets its location's product to
/// what was counted) and the id is listed once, with both nodes.
#[test]
fn colliding_count_ids_both_stand_and_are_listed() {
    let mut m = TestMesh::new(2, 4);
    m.full_mesh();
    m.settle();
    m.execute(0, testkit::receipt("r0", "loc0", &[(1, 10)]))
        .unwrap();
    m.execute(1, testkit::receipt("r1", "loc1", &[(1, 10)]))
        .unwrap();
    m.commit(0);
    m.commit(1);
    m.settle();
    m.disconnect(0, 1);
    for (i, loc, counted) in [(0usize, "loc0", 7u64), (1, "loc1", 4)] {
        m.execute(i, testkit::count("c-1", loc, &[(1, counted)]))
            .unwrap();
        m.commit(i);
    }
    m.connect(0, 1);
    m.settle();
    for i in 0..2 {
        let e = &m.nodes[i].engine;
        assert_eq!(on_hand(e, 1, "loc0"), 7, "n{i}");
        assert_eq!(on_hand(e, 1, "loc1"), 4, "n{i}");
        let listed: Vec<serde_json::Value> = e
            .id_collisions()
            .into_iter()
            .filter(|c| c["id"] == "c-1")
            .collect();
        assert_eq!(listed.len(), 1, "n{i}: {listed:?}");
        assert_eq!(listed[0]["record"], "count");
        assert_eq!(listed[0]["nodes"], serde_json::json!(["n0", "n1"]));
    }
}

/// Finding 7, loyalty after the record: a sale whose loyalty credit
/// overflows (written after its ledger removal and its record) is refused
/// whole — no units leave stock, no sale record, no idempotency record —
/// so a retry cannot take the units twice.
#[test]
fn a_sale_refused_at_its_loyalty_credit_leaves_nothing() {
    let mut cfg = testkit::config(0, 4);
    cfg.loyalty_points_per_unit = storemesh_protocol::ids::CELL_MAX;
    let mut e = Engine::new(cfg, [1, 2, 3, 4]);
    e.finish_open();
    let now = 1_795_773_600_000;
    e.execute(testkit::receipt("r1", "loc0", &[(1, 5)]), now, &|_| None)
        .unwrap();
    let _ = e.flush(now);
    for attempt in 0..2 {
        let mut s = testkit::sale("s1", Some("loc0"), &[(1, 2)]);
        if let Op::Sale(x) = &mut s {
            x.customer_id = Some("cust-1".into());
        }
        let r = e.execute(s, now + 1 + attempt, &|_| None);
        assert!(matches!(r, Err(OpError::BadRequest(_))), "{r:?}");
        assert_eq!(on_hand(&e, 1, "loc0"), 5, "attempt {attempt}");
        assert!(e.sale_json("s1").is_none(), "attempt {attempt}");
        let batch = e.flush(now + 1 + attempt);
        assert!(batch.idem.is_empty(), "attempt {attempt}");
        assert_eq!(
            e.recompute_stock()
                .get(&1)
                .map(|m| m.values().map(|x| x.on_hand()).sum::<i64>()),
            Some(5)
        );
    }
}
