//! The sale index of closed records parts in the store (issue 14, BENCHMARKS
//! row 8: memory independent of history): once a part is closed and its
//! index stored, its sales leave memory; lookups, returns and id collisions
//! still find them, from a real redb file, before and after a restart.

use std::sync::Arc;

use storemesh_node::store::Store;
use storemesh_protocol::engine::Engine;
use storemesh_protocol::ids::NodeId;
use storemesh_protocol::testkit;

const NOW_MS: u64 = 1_795_773_600_000;
/// Records per part in these tests (small, so that parts close quickly).
const PER_PART: usize = 16;

/// Opens node `i`'s engine from `store` as `node.rs::open_engine` does
/// (signing, certificates and cold parts read back from the store), with
/// `peers` configured; `archived: false` opens it as an earlier release
/// would have written its file (no stored sale index, cold parts held).
fn open_node(
    i: usize,
    store: &Arc<Store>,
    incarnation: [u8; 4],
    peers: &[usize],
    archived: bool,
) -> Engine {
    let mut e = Engine::new(testkit::config(i, 8), incarnation);
    testkit::sign(&mut e);
    e.set_entropy([i as u8 + 1; 32]);
    e.set_cert_archive(Box::new(storemesh_node::signing::StoreArchive(
        store.clone(),
    )));
    if archived {
        e.set_part_archive(store.clone());
    }
    for j in peers {
        e.add_configured_peer(&format!("n{j}"), testkit::node_id(*j));
    }
    store
        .for_each_doc(|d| {
            e.load_doc_with_index(&d.id, &d.parts, d.heads_log, d.index.as_deref())
                .map_err(|e| anyhow::anyhow!(e))
        })
        .unwrap();
    e.finish_open();
    e.set_records_per_part(PER_PART);
    e
}

fn store_in(dir: &tempfile::TempDir, name: &str) -> Arc<Store> {
    Arc::new(Store::open(&dir.path().join(name)).unwrap())
}

fn commit(e: &mut Engine, store: &Store, now: u64) {
    e.commit(now, |b| store.commit(b)).unwrap();
}

fn receive_stock(e: &mut Engine, store: &Store, loc: &str) {
    e.execute(
        testkit::receipt("r1", loc, &[(7, 100_000), (8, 100_000), (9, 100_000)]),
        NOW_MS,
        &|_| None,
    )
    .unwrap();
    commit(e, store, NOW_MS);
}

/// Sales `{prefix}{from}..{prefix}{to}` of 2 units, 8 to a commit, then
/// ticks that cool the closed parts and commits that store their indexes.
fn sell(e: &mut Engine, store: &Store, prefix: &str, from: usize, to: usize) {
    for i in from..to {
        let now = NOW_MS + i as u64;
        e.execute(
            testkit::sale(&format!("{prefix}{i}"), None, &[(7 + (i % 3) as u64, 2)]),
            now,
            &|_| None,
        )
        .unwrap();
        if i % 8 == 7 {
            commit(e, store, now);
        }
    }
    settle_parts(e, store, NOW_MS + to as u64);
}

/// Ticks and commits until closed parts are cold, indexed and their sales
/// out of memory.
fn settle_parts(e: &mut Engine, store: &Store, now: u64) {
    for t in 0..12 {
        e.tick(now + t);
        commit(e, store, now + t);
    }
}

/// Sales of closed parts leave memory once their part's index is stored;
/// a lookup by id (`GET /api/sales/{id}`) and a return of an old sale find
/// them in the store, before and after a restart.
#[test]
fn sales_of_closed_parts_are_found_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir, "n.redb");
    let mut e = open_node(0, &store, [0, 0, 0, 1], &[], true);
    receive_stock(&mut e, &store, "loc0");
    sell(&mut e, &store, "s", 0, 200);
    // 201 records in parts of 16: 12 closed parts, their sales stored.
    assert!(
        e.stats.cold_sale_parts_written >= 11,
        "{}",
        e.stats.cold_sale_parts_written
    );
    assert!(e.stats.cold_sale_parts_dropped >= 11);
    let held = e.views.sales().len();
    assert!(
        held <= 2 * PER_PART,
        "{held} sale ids held in memory after 200 sales"
    );
    assert!(
        e.views.sales().candidates("s3").next().is_none(),
        "s3 is not in memory"
    );
    let s3 = e.sale_json("s3").expect("s3 found in the store");
    assert_eq!(s3["sale_id"], "s3");
    assert!(e.sale_json("s-none").is_none());
    // s3 sold 2 of product 7 (3 % 3 = 0): a return of 3 is refused.
    let over = e.execute(
        testkit::return_of("ret-0", "s3", 7, 3),
        NOW_MS + 500,
        &|_| None,
    );
    assert!(over.is_err(), "a return over the sold 2: {over:?}");
    e.execute(
        testkit::return_of("ret-1", "s3", 7, 2),
        NOW_MS + 500,
        &|_| None,
    )
    .unwrap();
    commit(&mut e, &store, NOW_MS + 500);
    drop(e);

    // Restart: only the parts whose sales are not stored are noted.
    let mut e = open_node(0, &store, [0, 0, 0, 2], &[], true);
    let held = e.views.sales().len();
    assert!(
        held <= PER_PART,
        "{held} sale ids noted in memory by the start"
    );
    for i in 0..200 {
        let s = e
            .sale_json(&format!("s{i}"))
            .unwrap_or_else(|| panic!("s{i} after the restart"));
        assert_eq!(s["sale_id"], format!("s{i}"));
    }
    let again = e.execute(
        testkit::return_of("ret-2", "s3", 7, 1),
        NOW_MS + 600,
        &|_| None,
    );
    assert!(again.is_err(), "s3 was returned whole: {again:?}");
    let other = e.execute(
        testkit::return_of("ret-3", "s4", 8, 2),
        NOW_MS + 600,
        &|_| None,
    );
    assert!(other.is_ok(), "s4 is returned: {other:?}");
    commit(&mut e, &store, NOW_MS + 600);
    // Selling on: new parts close and leave memory too.
    sell(&mut e, &store, "t", 0, 100);
    assert!(e.views.sales().len() <= 2 * PER_PART);
    assert!(e.sale_json("t5").is_some() && e.sale_json("s5").is_some());
}

/// The memory the sale index holds does not grow with the number of closed
/// parts: the same after 8 and after 40 parts of sales (before the stored
/// index: ~5 bytes a sale, 5× as much after 40 parts as after 8).
#[test]
fn memory_held_per_sale_does_not_grow_with_closed_parts() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir, "n.redb");
    let mut e = open_node(0, &store, [0, 0, 0, 1], &[], true);
    receive_stock(&mut e, &store, "loc0");
    sell(&mut e, &store, "s", 0, 8 * PER_PART);
    let (len_8, bytes_8) = (e.views.sales().len(), e.views.sales().entry_bytes());
    sell(&mut e, &store, "s", 8 * PER_PART, 40 * PER_PART);
    let (len_40, bytes_40) = (e.views.sales().len(), e.views.sales().entry_bytes());
    assert!(
        len_40 <= 2 * PER_PART && len_8 <= 2 * PER_PART,
        "sale ids held: {len_8} after 8 parts, {len_40} after 40"
    );
    assert!(
        bytes_40 <= bytes_8 + 16 * PER_PART,
        "entry bytes: {bytes_8} after 8 parts, {bytes_40} after 40"
    );
    // What the stored index costs in memory: a name per part.
    assert!(e.stats.cold_sale_parts_written >= 38);
    drop(e);
    let e = open_node(0, &store, [0, 0, 0, 2], &[], true);
    assert!(
        e.views.sales().len() <= PER_PART,
        "{} held after a restart",
        e.views.sales().len()
    );
    assert!(e.views.sales().entry_bytes() <= bytes_8 + 16 * PER_PART);
}

/// A file written before the stored sale index (closed parts indexed, no
/// entries): the start notes their sales in memory as before, writes their
/// entries in the next batches and lets them go; the next start needs none.
#[test]
fn parts_indexed_before_the_stored_sale_index_move_there() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir, "n.redb");
    let mut e = open_node(0, &store, [0, 0, 0, 1], &[], false);
    receive_stock(&mut e, &store, "loc0");
    sell(&mut e, &store, "s", 0, 150);
    assert_eq!(e.stats.cold_sale_parts_written, 0, "no stored index");
    assert!(e.stats.parts_indexed >= 8, "{}", e.stats.parts_indexed);
    drop(e);
    assert!(store.cold_sales_state().unwrap().parts.is_empty());

    let mut e = open_node(0, &store, [0, 0, 0, 2], &[], true);
    assert!(e.views.sales().len() >= 150, "noted in memory at first");
    settle_parts(&mut e, &store, NOW_MS + 1000);
    assert!(e.stats.cold_sale_parts_written >= 8);
    assert!(
        e.views.sales().len() <= 2 * PER_PART,
        "{} held once written",
        e.views.sales().len()
    );
    for i in 0..150 {
        assert!(e.sale_json(&format!("s{i}")).is_some(), "s{i}");
    }
    drop(e);
    let e = open_node(0, &store, [0, 0, 0, 3], &[], true);
    assert!(e.views.sales().len() <= PER_PART);
    for i in 0..150 {
        assert!(e.sale_json(&format!("s{i}")).is_some(), "s{i}");
    }
}

/// Commits both engines and hands each other's frames over until none is
/// left (bounded), as two connected nodes would.
fn exchange(a: &mut Engine, sa: &Store, ia: NodeId, b: &mut Engine, sb: &Store, ib: NodeId) {
    let now = NOW_MS + 10_000;
    for _ in 0..1000 {
        let fa = a.commit(now, |x| sa.commit(x)).unwrap().frames;
        let fb = b.commit(now, |x| sb.commit(x)).unwrap().frames;
        if fa.is_empty() && fb.is_empty() {
            return;
        }
        for (_, f) in fa {
            b.receive(ia, &f[4..], now).unwrap();
        }
        for (_, f) in fb {
            a.receive(ib, &f[4..], now).unwrap();
        }
    }
    panic!("the two engines did not settle");
}

fn connect(a: &mut Engine, ia: NodeId, b: &mut Engine, ib: NodeId) {
    let (ha, hb) = (a.hello_digest(), b.hello_digest());
    a.peer_up_with_digest(ib, Vec::new(), Some(hb), NOW_MS + 10_000);
    b.peer_up_with_digest(ia, Vec::new(), Some(ha), NOW_MS + 10_000);
}

/// Two nodes apart from each other use one sale id: node 0's sale is in a
/// closed part whose sales are only in the store (after a restart). When
/// node 1's sale arrives, node 0 lists the collision, and still does after
/// its next restart (the id is stored as shared).
#[test]
fn a_sale_id_used_again_by_a_peer_collides_with_a_stored_sale() {
    let dir = tempfile::tempdir().unwrap();
    let (s0, s1) = (store_in(&dir, "n0.redb"), store_in(&dir, "n1.redb"));
    let (id0, id1) = (testkit::node_id(0), testkit::node_id(1));
    let mut a = open_node(0, &s0, [0, 0, 0, 1], &[1], true);
    receive_stock(&mut a, &s0, "loc0");
    a.execute(testkit::sale("dup", None, &[(7, 1)]), NOW_MS + 1, &|_| None)
        .unwrap();
    commit(&mut a, &s0, NOW_MS + 1);
    sell(&mut a, &s0, "s", 0, 100);
    drop(a);
    let mut a = open_node(0, &s0, [0, 0, 0, 2], &[1], true);
    assert!(
        a.views.sales().candidates("dup").next().is_none(),
        "node 0's dup is in the store only"
    );
    assert!(a.sale_json("dup").is_some());

    let mut b = open_node(1, &s1, [0, 0, 1, 1], &[0], true);
    receive_stock(&mut b, &s1, "loc1");
    b.execute(
        testkit::sale("dup", Some("loc1"), &[(8, 1)]),
        NOW_MS + 2,
        &|_| None,
    )
    .unwrap();
    commit(&mut b, &s1, NOW_MS + 2);

    connect(&mut a, id0, &mut b, id1);
    exchange(&mut a, &s0, id0, &mut b, &s1, id1);
    for (name, e) in [("node 0", &a), ("node 1", &b)] {
        let dup = e.sale_json("dup").expect("dup");
        let others = dup["collisions"].as_array().cloned().unwrap_or_default();
        assert_eq!(others.len(), 1, "{name} lists the other sale: {dup}");
    }
    // Each node looks its own sale up first.
    assert_eq!(a.sale_json("dup").unwrap()["location"], "loc0");
    assert_eq!(b.sale_json("dup").unwrap()["location"], "loc1");
    drop((a, b));

    let a = open_node(0, &s0, [0, 0, 0, 3], &[1], true);
    let dup = a.sale_json("dup").expect("dup after a restart");
    assert_eq!(dup["location"], "loc0", "{dup}");
    let others = dup["collisions"].as_array().cloned().unwrap_or_default();
    assert_eq!(others.len(), 1, "the collision after a restart: {dup}");
}
