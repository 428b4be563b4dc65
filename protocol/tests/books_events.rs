//! Exact books, the rest of issue 15: a reservation's hold travels with its
//! grant, deficits of forks and retirements once per shortfall event, and
//! counts imported at a location no node owns counted once.

use storemesh_protocol::ops::*;
use storemesh_protocol::testkit::{self, TestMesh};

fn reserve(id: &str, loc: &str, lines: &[(u64, u64)], by: &str, expires_at_ms: u64) -> Op {
    Op::Reserve(Reserve {
        reservation_id: id.into(),
        location: loc.into(),
        lines: lines
            .iter()
            .map(|(p, q)| QtyLine {
                sku: None,
                product_id: *p,
                quantity: *q,
            })
            .collect(),
        fulfil_by: by.into(),
        expires_at: storemesh_protocol::time::format_rfc3339_ms(expires_at_ms),
        ..Default::default()
    })
}

/// Finding 6: the reservation's grant (ledger documents) and its record
/// (records document) travelled separately, so the fulfilling node could see
/// the reserved units as free and sell them before the record arrived. Every
/// order and prefix of the frames now leaves the units held.
#[test]
fn a_reservation_s_units_are_never_free_at_the_fulfilling_node() {
    for reversed in [false, true] {
        let mut m = TestMesh::new(2, 8);
        m.full_mesh();
        m.settle();
        // Products 1..=3 span several buckets (several ledger documents).
        m.execute(
            0,
            testkit::receipt("r1", "loc0", &[(1, 10), (2, 10), (3, 10)]),
        )
        .unwrap();
        m.commit(0);
        m.settle();
        let far = m.now_ms + 3_600_000;
        m.execute(
            0,
            reserve("o1", "loc0", &[(1, 4), (2, 3), (3, 2)], "n1", far),
        )
        .unwrap();
        m.commit(0);
        let q = m.links.get_mut(&(0, 1)).unwrap();
        assert!(q.len() >= 2, "the reservation travels in several documents");
        if reversed {
            q.make_contiguous().reverse();
        }
        while m.deliver(0, 1, 1) == 1 {
            let e1 = &m.nodes[1].engine;
            for p in 1..=3 {
                assert_eq!(
                    e1.rights(p, "loc0"),
                    0,
                    "product {p}: reserved units free at the fulfilling node (reversed: {reversed})"
                );
            }
            // Selling them is refused, whatever has arrived so far.
            let sold = m.execute(1, testkit::sale("s-early", Some("loc0"), &[(1, 1)]));
            assert!(sold.is_err(), "sold a reserved unit: {sold:?}");
            m.commit(1);
        }
        m.settle();
        let e1 = &m.nodes[1].engine;
        assert_eq!(e1.rights_raw(1, "loc0"), 4);
        assert_eq!(e1.rights(1, "loc0"), 0);
        assert_eq!(e1.reserved_at(1, "loc0"), 4);
        assert_eq!(m.nodes[0].engine.reserved_at(2, "loc0"), 3);
        // The fulfilling node fulfils it: the units leave, nothing stays held.
        let f = m
            .execute(
                1,
                Op::ReservationFulfil {
                    reservation_id: "o1".into(),
                    sale_id: Some("pickup".into()),
                },
            )
            .unwrap();
        assert_eq!(f.status, 201);
        m.commit(1);
        m.settle();
        for i in 0..2 {
            let e = &m.nodes[i].engine;
            for (p, left) in [(1, 6), (2, 7), (3, 8)] {
                assert_eq!(e.reserved_at(p, "loc0"), 0, "node {i} product {p}");
                assert_eq!(e.totals(p, Some("loc0")).unwrap().0, left);
            }
        }
        assert_eq!(m.nodes[1].engine.rights(1, "loc0"), 0);
        assert_eq!(m.nodes[0].engine.rights(1, "loc0"), 6);
    }
}

/// A reservation the reserving node fulfils itself holds its units the same
/// way, and cancelling releases them.
#[test]
fn a_reservation_fulfilled_by_its_creator_holds_and_releases() {
    let mut m = TestMesh::new(2, 8);
    m.full_mesh();
    m.settle();
    m.execute(0, testkit::receipt("r1", "loc0", &[(5, 10)]))
        .unwrap();
    let far = m.now_ms + 3_600_000;
    m.execute(0, reserve("o2", "loc0", &[(5, 7)], "n0", far))
        .unwrap();
    m.commit(0);
    m.settle();
    for i in 0..2 {
        assert_eq!(m.nodes[i].engine.reserved_at(5, "loc0"), 7, "node {i}");
    }
    assert_eq!(m.nodes[0].engine.rights(5, "loc0"), 3);
    assert!(m
        .execute(0, testkit::sale("s1", Some("loc0"), &[(5, 4)]))
        .is_err());
    m.execute(
        0,
        Op::ReservationCancel {
            reservation_id: "o2".into(),
        },
    )
    .unwrap();
    m.commit(0);
    m.settle();
    assert_eq!(m.nodes[0].engine.rights(5, "loc0"), 10);
    assert_eq!(m.nodes[1].engine.reserved_at(5, "loc0"), 0);
}
