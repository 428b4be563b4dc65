//! Bounded history (issue 14): records roll over into parts of a month, the
//! stored form stays mostly snapshot, and a restart from a real redb file
//! finds every record and continues in the month's last part.

use storemesh_node::store::Store;
use storemesh_protocol::engine::{Engine, CHUNKS_PER_SNAPSHOT_MAX};
use storemesh_protocol::testkit;

const NOW_MS: u64 = 1_795_773_600_000;

fn open(store: &Store, incarnation: [u8; 4]) -> Engine {
    let mut e = Engine::new(testkit::config(0, 8), incarnation);
    for d in store.load_docs().unwrap() {
        e.load_doc(&d.id, &d.parts, d.heads_log).unwrap();
    }
    e.finish_open();
    e
}

fn commit(e: &mut Engine, store: &Store, now: u64) {
    let b = e.flush(now);
    store.commit(&b).unwrap();
    e.committed(now);
    let _ = e.take_outgoing();
}

#[test]
fn records_roll_over_into_parts_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("n.redb")).unwrap();
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
    let store = Store::open(&dir.path().join("n.redb")).unwrap();
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
