//! Bounded history (issue 14): records roll over into parts of a month, the
//! stored form stays mostly snapshot, and a restart from a real redb file
//! finds every record and continues in the month's last part.

use storemesh_node::store::Store;
use storemesh_protocol::engine::{Engine, CHUNKS_PER_SNAPSHOT_MAX};
use storemesh_protocol::testkit;

const NOW_MS: u64 = 1_795_773_600_000;

fn open(store: &std::sync::Arc<Store>, incarnation: [u8; 4]) -> Engine {
    open_with(store, incarnation, None)
}

/// Opens node 0's engine from `store`, signing its batches (the test
/// mesh's scheme) and reading stored certificates back from `store`, as
/// `node.rs::open_engine` does; cold parts are read back from `archive`
/// when given (as `run` opens).
fn open_with(
    store: &std::sync::Arc<Store>,
    incarnation: [u8; 4],
    archive: Option<std::sync::Arc<Store>>,
) -> Engine {
    let mut e = Engine::new(testkit::config(0, 8), incarnation);
    testkit::sign(&mut e);
    e.set_cert_archive(Box::new(storemesh_node::signing::StoreArchive(
        store.clone(),
    )));
    if let Some(a) = archive {
        e.set_part_archive(a);
    }
    for d in store.load_docs().unwrap() {
        e.load_doc_with_index(&d.id, &d.parts, d.heads_log, d.index.as_deref())
            .unwrap();
    }
    e.finish_open();
    e
}

fn commit(e: &mut Engine, store: &Store, now: u64) {
    e.commit(now, |b| store.commit(b)).unwrap();
}

#[test]
fn records_roll_over_into_parts_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::open(&dir.path().join("n.redb")).unwrap());
    let mut e = open(&store, [0, 0, 0, 1]);
    e.set_records_per_part(3);
    e.execute(
        testkit::receipt("r1", "loc0", &[(7, 1000)]),
        NOW_MS,
        &|_| None,
    )
    .unwrap();
    commit(&mut e, &store, NOW_MS);
    for i in 0..10 {
        e.execute(
            testkit::sale(&format!("s{i}"), None, &[(7, 1)]),
            NOW_MS,
            &|_| None,
        )
        .unwrap();
        commit(&mut e, &store, NOW_MS);
    }
    // 11 records (the receipt and ten sales), three per part: parts 0..=3.
    let rec_docs: Vec<String> = e
        .documents()
        .into_iter()
        .map(|(d, _)| d)
        .filter(|d| d.starts_with("rec/"))
        .collect();
    assert_eq!(rec_docs.len(), 4, "{rec_docs:?}");
    let month_doc = rec_docs[0].clone();
    assert!(rec_docs[1..]
        .iter()
        .all(|d| d.starts_with(&format!("{month_doc}/"))));
    drop(e);
    // Restart: every record is found, in whichever part it went to.
    let mut e = open(&store, [0, 0, 0, 2]);
    e.set_records_per_part(3);
    for i in 0..10 {
        assert!(
            e.record_in_month(&month_doc, &format!("sale/s{i}"))
                .is_some(),
            "sale s{i} after restart"
        );
    }
    // The next records continue in the last part (it holds 2 of 3).
    for i in 10..12 {
        e.execute(
            testkit::sale(&format!("s{i}"), None, &[(7, 1)]),
            NOW_MS,
            &|_| None,
        )
        .unwrap();
        commit(&mut e, &store, NOW_MS);
    }
    let parts = e
        .documents()
        .into_iter()
        .filter(|(d, _)| d.starts_with("rec/"))
        .count();
    assert_eq!(parts, 5, "one record filled part 3, the next opened part 4");
    assert_eq!(e.totals(7, Some("loc0")).map(|t| t.0), Some(1000 - 12));
}

#[test]
fn chunks_are_folded_into_a_snapshot_by_count() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::open(&dir.path().join("n.redb")).unwrap());
    let mut e = open(&store, [0, 0, 0, 1]);
    e.execute(
        testkit::receipt("r1", "loc0", &[(7, 100_000)]),
        NOW_MS,
        &|_| None,
    )
    .unwrap();
    commit(&mut e, &store, NOW_MS);
    // Tiny changes never outgrow the byte floor; the count folds them anyway.
    let n = CHUNKS_PER_SNAPSHOT_MAX + 10;
    for i in 0..n {
        e.execute(
            testkit::sale(&format!("s{i}"), None, &[(7, 1)]),
            NOW_MS,
            &|_| None,
        )
        .unwrap();
        commit(&mut e, &store, NOW_MS);
    }
    let docs = store.load_docs().unwrap();
    let most = docs.iter().map(|d| d.parts.len() as u64).max().unwrap();
    assert!(
        most <= CHUNKS_PER_SNAPSHOT_MAX,
        "a document kept {most} parts (limit {CHUNKS_PER_SNAPSHOT_MAX})"
    );
    drop(e);
    let e = open(&store, [0, 0, 0, 2]);
    assert_eq!(
        e.totals(7, Some("loc0")).map(|t| t.0),
        Some(100_000 - n as i64)
    );
}

fn sell(e: &mut Engine, store: &Store, from: usize, to: usize) {
    for i in from..to {
        e.execute(
            testkit::sale(&format!("s{i}"), None, &[(7 + (i % 3) as u64, 2)]),
            NOW_MS + i as u64,
            &|_| None,
        )
        .unwrap();
        commit(e, store, NOW_MS + i as u64);
    }
}

/// A fresh node connected to `e` receives sales `s0..s{n}` and ends with
/// the same documents and heads.
fn a_fresh_node_receives_every_sale(mut e: Engine, n: usize) {
    let mut m = testkit::TestMesh::new(2, 8);
    // The fresh node is a member here (its changes are verified).
    e.add_configured_peer("n1", testkit::node_id(1));
    m.nodes[0].engine = e;
    m.now_ms = NOW_MS + 400;
    m.connect(0, 1);
    m.settle();
    for i in 0..n {
        assert!(
            m.nodes[1].engine.sale_json(&format!("s{i}")).is_some(),
            "sale s{i} reached the fresh node"
        );
    }
    assert_eq!(
        m.nodes[1].engine.documents(),
        m.nodes[0].engine.documents(),
        "same documents and heads"
    );
}

/// Closed records parts are held as saved bytes (DESIGN §7, "records in
/// periods that go cold"): every history lookup still answers — a sale by
/// id, a return checked against it, the webhook scan — before and after a
/// restart from the real redb file, and a fresh peer still receives them.
#[test]
fn closed_parts_go_cold_and_history_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::open(&dir.path().join("n.redb")).unwrap());
    let mut e = open(&store, [0, 0, 0, 1]);
    e.set_records_per_part(4);
    e.execute(
        testkit::receipt("r1", "loc0", &[(7, 1000), (8, 1000), (9, 1000)]),
        NOW_MS,
        &|_| None,
    )
    .unwrap();
    commit(&mut e, &store, NOW_MS);
    sell(&mut e, &store, 0, 30);
    assert_eq!(e.cold_parts().0, 0, "nothing cools before a tick");
    e.tick(NOW_MS + 100);
    let (cold, bytes) = e.cold_parts();
    // 31 records, 4 per part: parts 0..=7; part 7 is open. A tick saves
    // at most a few parts; the following ones cool the rest.
    assert!(cold > 0 && bytes > 0, "{cold} {bytes}");
    for t in 0..10 {
        e.tick(NOW_MS + 200 + t);
    }
    assert_eq!(e.cold_parts().0, 7, "every closed part is cold");
    // A sale in a cold part: looked up, and a return is checked against it.
    let s0 = e.sale_json("s0").expect("sale s0 in a cold part");
    assert_eq!(s0["sale_id"], "s0");
    assert!(e.cold_parts().0 < 7, "the lookup loaded its part");
    let over = e.execute(
        testkit::return_of("ret-0", "s3", 7, 3),
        NOW_MS + 50,
        &|_| None,
    );
    assert!(
        over.is_err(),
        "a return over the sold 2 is refused: {over:?}"
    );
    e.execute(
        testkit::return_of("ret-1", "s3", 7, 2),
        NOW_MS + 50,
        &|_| None,
    )
    .unwrap();
    commit(&mut e, &store, NOW_MS + 50);
    let mut all = Vec::new();
    e.for_each_sale(|id, json| {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["sale_id"], id);
        all.push(id.to_string());
        true
    });
    all.sort();
    assert_eq!(all.len(), 30, "{all:?}");
    // The feed of noted sales: positions of this engine only.
    let pos = e.sale_feed_next();
    assert_eq!(e.sales_since(pos).map(|f| f.count()), Some(0));
    let cold_before = e.cold_parts().0;
    e.for_each_sale(|_, _| true);
    assert_eq!(
        e.cold_parts().0,
        cold_before,
        "a whole-history scan loads nothing for good"
    );
    // Cooled closed parts were written as one snapshot with their index.
    assert!(e.stats.parts_indexed >= 6, "{}", e.stats.parts_indexed);
    drop(e);

    // Restart: closed parts are cold right after opening, opened from their
    // index without being read; lookups answer.
    let mut e = open(&store, [0, 0, 0, 2]);
    assert!(
        e.stats.parts_opened_indexed >= 6,
        "closed parts opened from their index: {}",
        e.stats.parts_opened_indexed
    );
    assert!(
        e.sales_since(pos).is_none(),
        "a position of the engine before the restart is not this engine's"
    );
    assert_eq!(
        e.sales_since(e.sale_feed_next()).map(|f| f.count()),
        Some(0)
    );
    e.set_records_per_part(4);
    let (cold, _) = e.cold_parts();
    assert!(cold >= 7, "closed parts cold after a restart: {cold}");
    for i in 0..30 {
        let s = e.sale_json(&format!("s{i}")).expect("sale after restart");
        assert_eq!(s["sale_id"], format!("s{i}"));
    }
    assert!(e.sale_json("s-none").is_none());
    let again = e.execute(
        testkit::return_of("ret-2", "s3", 7, 1),
        NOW_MS + 60,
        &|_| None,
    );
    assert!(
        again.is_err(),
        "s3 was returned whole before the restart: {again:?}"
    );
    for t in 0..10 {
        e.tick(NOW_MS + 300 + t);
    }
    assert!(e.cold_parts().0 >= 7);

    // A fresh node gets every record from the node with cold parts.
    a_fresh_node_receives_every_sale(e, 30);
}

/// With the store as the engine's part archive (as `storemesh run` opens
/// it), cold closed parts hold no bytes in memory once their snapshot is
/// committed: lookups, returns and a fresh peer read them back from the real
/// redb file, before and after a restart.
#[test]
fn cold_parts_are_read_back_from_the_store_instead_of_held() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("n.redb")).unwrap());
    let open_archived = |incarnation: [u8; 4]| {
        let mut e = open_with(&store, incarnation, Some(store.clone()));
        e.set_records_per_part(4);
        e
    };
    let mut e = open_archived([0, 0, 0, 1]);
    e.execute(
        testkit::receipt("r1", "loc0", &[(7, 1000), (8, 1000), (9, 1000)]),
        NOW_MS,
        &|_| None,
    )
    .unwrap();
    commit(&mut e, &store, NOW_MS);
    sell(&mut e, &store, 0, 30);
    // Ticks cool the closed parts; their snapshots are committed with their
    // indexes; a later tick lets their bytes go.
    for t in 0..12 {
        e.tick(NOW_MS + 200 + t);
        commit(&mut e, &store, NOW_MS + 200 + t);
    }
    let (cold, held) = e.cold_parts();
    assert_eq!(cold, 7, "every closed part is cold");
    assert_eq!(held, 0, "no cold part's bytes are held in memory");
    assert!(
        e.stats.parts_stored_away >= 7,
        "{}",
        e.stats.parts_stored_away
    );
    let s0 = e.sale_json("s0").expect("sale s0 read back from the store");
    assert_eq!(s0["sale_id"], "s0");
    e.execute(
        testkit::return_of("ret-1", "s3", 7, 2),
        NOW_MS + 50,
        &|_| None,
    )
    .unwrap();
    commit(&mut e, &store, NOW_MS + 50);
    let mut n = 0;
    e.for_each_sale(|_, _| {
        n += 1;
        true
    });
    assert_eq!(n, 30);
    drop(e);

    // Restart: closed parts open cold with nothing held.
    let mut e = open_archived([0, 0, 0, 2]);
    let (cold, held) = e.cold_parts();
    assert!(cold >= 7, "closed parts cold after a restart: {cold}");
    // Their indexes were read back from the store to be replayed, not held
    // from the load, and no part had to be read whole instead.
    assert_eq!(
        e.stats.part_indexes_read_back, e.stats.parts_opened_indexed,
        "every part opened from its index replayed it from the store"
    );
    assert!(e.stats.part_indexes_read_back >= 6);
    // Only the open part (the latest, loaded from its chunks, not indexed)
    // is held: one part's bytes, whatever the history.
    let open_part = e
        .documents()
        .into_iter()
        .map(|(d, _)| d)
        .filter(|d| d.starts_with("rec/"))
        .max_by_key(|d| (d.len(), d.clone()))
        .unwrap();
    let open_bytes = e.document_bytes(&open_part).unwrap().len();
    assert!(
        held <= open_bytes,
        "{held} bytes held after a restart; the open part {open_part} is {open_bytes}"
    );
    for i in 0..30 {
        let s = e.sale_json(&format!("s{i}")).expect("sale after restart");
        assert_eq!(s["sale_id"], format!("s{i}"));
    }
    let again = e.execute(
        testkit::return_of("ret-2", "s3", 7, 1),
        NOW_MS + 60,
        &|_| None,
    );
    assert!(again.is_err(), "s3 was returned whole: {again:?}");
    // A fresh node gets every record from the node whose parts are stored.
    a_fresh_node_receives_every_sale(e, 30);
}

/// Ledger epochs through the real redb file: the owner's cuts delete the
/// older epoch in the same commit, a restart loads the current epoch only
/// and finds every unit, and the held history stays bounded.
#[test]
fn ledger_epochs_replace_history_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::open(&dir.path().join("n.redb")).unwrap());
    let mut e = open(&store, [0, 0, 0, 1]);
    e.set_epoch_ops_max(40);
    e.execute(
        testkit::receipt("r1", "loc0", &[(7, 1000), (8, 1000), (9, 1000)]),
        NOW_MS,
        &|_| None,
    )
    .unwrap();
    commit(&mut e, &store, NOW_MS);
    sell(&mut e, &store, 0, 300);
    assert!(e.stats.epochs_started >= 3, "{}", e.stats.epochs_started);
    let stored: Vec<String> = store
        .load_docs()
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .filter(|d| d.starts_with("ledger/"))
        .collect();
    let held: Vec<String> = e
        .documents()
        .into_iter()
        .map(|(d, _)| d)
        .filter(|d| d.starts_with("ledger/"))
        .collect();
    assert_eq!(stored, held, "disk holds exactly the epochs held in memory");
    assert!(held.iter().any(|d| d.split('/').count() == 4), "{held:?}");
    let before: Vec<i64> = (7..=9)
        .map(|p| e.views.entry(p, "loc0").unwrap().on_hand())
        .collect();
    // 300 sales of 2 units over three products.
    assert_eq!(before.iter().sum::<i64>(), 3000 - 600);
    drop(e);
    let mut e = open(&store, [0, 0, 0, 2]);
    e.set_epoch_ops_max(40);
    let after: Vec<i64> = (7..=9)
        .map(|p| e.views.entry(p, "loc0").unwrap().on_hand())
        .collect();
    assert_eq!(
        after, before,
        "every unit after a restart from the current epochs"
    );
    for d in &held {
        let changes = e.doc(d).unwrap().get_changes(&[]).len();
        assert!(changes <= 60, "{d} holds {changes} changes");
    }
    // Selling on after the restart continues in the current epochs.
    sell(&mut e, &store, 300, 310);
    let total: i64 = (7..=9)
        .map(|p| e.views.entry(p, "loc0").unwrap().on_hand())
        .sum();
    assert_eq!(total, 3000 - 620);
}
