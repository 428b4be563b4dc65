//! `step::NodeLoop::step`: nothing is released unless the storage committed,
//! storage errors never read as "never seen", parked sales, row numbering,
//! the panic guard. Storage here is an in-memory map (the node crate runs the
//! same step over redb, the simulator over its simulated disk).

use std::collections::BTreeMap;

use storemesh_protocol::engine::{Batch, Engine};
use storemesh_protocol::ids::NodeId;
use storemesh_protocol::ops::{IdemRecord, OpError};
use storemesh_protocol::step::{
    commit_batch, Executed, Failure, Input, LoopConfig, NodeLoop, Step, Storage, StorageError,
};
use storemesh_protocol::testkit::{self, receipt, sale};

#[derive(Default)]
struct MemStorage {
    idem: BTreeMap<String, IdemRecord>,
    commits: usize,
    fail_commit: bool,
    fail_idem: bool,
}

impl Storage for MemStorage {
    fn idem(&mut self, key: &str) -> Result<Option<IdemRecord>, StorageError> {
        if self.fail_idem {
            return Err(StorageError("disk read error".into()));
        }
        Ok(self.idem.get(key).cloned())
    }

    fn sync_states(&mut self, _peer: &NodeId) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        Ok(Vec::new())
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StorageError> {
        assert!(!batch.is_empty(), "the step commits non-empty batches only");
        if self.fail_commit {
            return Err(StorageError("disk full".into()));
        }
        self.commits += 1;
        for (k, r) in &batch.idem {
            self.idem.insert(k.clone(), r.clone());
        }
        Ok(())
    }
}

fn engine(i: usize) -> Engine {
    let mut e = Engine::new(testkit::config(i, 4), [i as u8; 4]);
    e.finish_open();
    e
}

fn started(i: usize, store: &mut MemStorage) -> NodeLoop<u32> {
    let mut node = NodeLoop::new(engine(i), LoopConfig::default(), 0);
    match node.step(store, Vec::new(), 1_000) {
        Step::Committed(c) => assert!(c.hello_digest.is_some(), "first step sets the hello digest"),
        Step::Failed(f) => panic!("first step failed: {:?}", f.cause),
    }
    node
}

fn committed(s: Step<u32>) -> storemesh_protocol::step::Committed<u32> {
    match s {
        Step::Committed(c) => c,
        Step::Failed(f) => panic!("step failed: {:?}", f.cause),
    }
}

#[test]
fn replies_come_after_the_commit_with_numbered_rows() {
    let mut store = MemStorage::default();
    let mut node = started(0, &mut store);
    let before = store.commits;
    let c = committed(node.step(
        &mut store,
        vec![
            Input::Op(receipt("r1", "loc0", &[(7, 5)]), 1),
            Input::Op(sale("s1", Some("loc0"), &[(7, 2)]), 2),
        ],
        2_000,
    ));
    assert_eq!(store.commits, before + 1, "one commit for the batch");
    let tokens: Vec<u32> = c.replies.iter().map(|(t, _)| *t).collect();
    assert_eq!(tokens, vec![1, 2]);
    assert!(c.replies.iter().all(|(_, r)| r.is_ok()), "{:?}", c.replies);
    assert!(!c.batch.rows.is_empty());
    let seqs: Vec<u64> = c.batch.rows.iter().map(|(_, r)| r.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(node.engine().totals(7, None).map(|t| t.0), Some(3));
    // The replay answers from the committed idempotency record.
    let c = committed(node.step(
        &mut store,
        vec![Input::Op(sale("s1", Some("loc0"), &[(7, 2)]), 3)],
        3_000,
    ));
    assert!(c.replies[0].1.is_ok());
    assert_eq!(node.engine().totals(7, None).map(|t| t.0), Some(3));
}

#[test]
fn a_failed_commit_releases_nothing_and_answers_503() {
    let mut store = MemStorage::default();
    let mut node = started(0, &mut store);
    store.fail_commit = true;
    let s = node.step(
        &mut store,
        vec![
            Input::Op(receipt("r1", "loc0", &[(7, 5)]), 1),
            Input::Op(sale("s1", Some("loc0"), &[(7, 50)]), 2),
        ],
        2_000,
    );
    let Step::Failed(f) = s else {
        panic!("a failed commit must not produce a Committed");
    };
    assert_eq!(f.cause, Failure::Storage(StorageError("disk full".into())));
    assert_eq!(f.in_doubt, vec![0], "the receipt had succeeded");
    assert!(matches!(&f.replies[0], (1, Err(OpError::Unavailable(_)))));
    // The refusal stays a refusal.
    assert!(matches!(
        &f.replies[1],
        (2, Err(OpError::InsufficientStock(_)))
    ));
    // The driver reopens the engine from storage; numbering restarts where it was.
    store.fail_commit = false;
    node.replace_engine(engine(0), &mut store, 2_500);
    let c = committed(node.step(
        &mut store,
        vec![Input::Op(receipt("r2", "loc0", &[(8, 1)]), 3)],
        3_000,
    ));
    assert_eq!(c.batch.rows.first().map(|(_, r)| r.seq), Some(1));
}

#[test]
fn an_unreadable_idempotency_record_is_not_never_seen() {
    let mut store = MemStorage::default();
    let mut node = started(0, &mut store);
    committed(node.step(
        &mut store,
        vec![Input::Op(receipt("r1", "loc0", &[(7, 5)]), 1)],
        2_000,
    ));
    store.fail_idem = true;
    let c = committed(node.step(
        &mut store,
        vec![Input::Op(receipt("r1", "loc0", &[(7, 5)]), 2)],
        3_000,
    ));
    assert!(
        matches!(&c.replies[0], (2, Err(OpError::Unavailable(_)))),
        "{:?}",
        c.replies
    );
    assert_eq!(
        node.engine().totals(7, None).map(|t| t.0),
        Some(5),
        "applied once"
    );
}

#[test]
fn a_sale_short_of_rights_parks_and_wakes_at_its_deadline() {
    let mut s0 = MemStorage::default();
    let mut s1 = MemStorage::default();
    let cfg = LoopConfig {
        deadline_ms: 500,
        ..LoopConfig::default()
    };
    let mut n0: NodeLoop<u32> = NodeLoop::new(engine(0), cfg.clone(), 0);
    let mut n1: NodeLoop<u32> = NodeLoop::new(engine(1), cfg, 0);
    committed(n0.step(&mut s0, Vec::new(), 1_000));
    committed(n1.step(&mut s1, Vec::new(), 1_000));
    let (id0, id1) = (testkit::node_id(0), testkit::node_id(1));
    // Stock at loc0, held by node 0; node 1 sells there and must ask for rights.
    committed(n0.step(
        &mut s0,
        vec![Input::Op(receipt("r1", "loc0", &[(7, 5)]), 1)],
        1_100,
    ));
    let d0 = n0.hello_digest();
    let d1 = n1.hello_digest();
    let mut to1 = committed(n0.step(
        &mut s0,
        vec![Input::PeerUp {
            peer: id1,
            conn: 1,
            digest: d1,
        }],
        1_200,
    ))
    .frames;
    let mut to0 = committed(n1.step(
        &mut s1,
        vec![Input::PeerUp {
            peer: id0,
            conn: 1,
            digest: d0,
        }],
        1_200,
    ))
    .frames;
    // Exchange frames until quiet, so that node 1 knows the stock.
    let mut now = 1_300;
    for _ in 0..50 {
        if to0.is_empty() && to1.is_empty() {
            break;
        }
        let in1: Vec<Input<u32>> = to1
            .drain(..)
            .map(|(_, f)| Input::Frame {
                peer: id0,
                conn: 1,
                body: f[4..].to_vec(),
            })
            .collect();
        let in0: Vec<Input<u32>> = to0
            .drain(..)
            .map(|(_, f)| Input::Frame {
                peer: id1,
                conn: 1,
                body: f[4..].to_vec(),
            })
            .collect();
        to0.extend(committed(n1.step(&mut s1, in1, now)).frames);
        to1.extend(committed(n0.step(&mut s0, in0, now)).frames);
        now += 10;
    }
    assert_eq!(n1.engine().totals(7, None).map(|t| t.0), Some(5));
    let c = committed(n1.step(
        &mut s1,
        vec![Input::Op(sale("s1", Some("loc0"), &[(7, 2)]), 9)],
        now,
    ));
    assert!(c.replies.is_empty(), "the sale is parked: {:?}", c.replies);
    assert_eq!(n1.parked_len(), 1);
    assert_eq!(c.next_wake_ms, Some(now + 500), "wake at the deadline");
    // Nothing arrives (the grant is never delivered): the deadline decides.
    let c = committed(n1.step(&mut s1, vec![Input::Wake], now + 500));
    assert_eq!(n1.parked_len(), 0);
    assert!(
        matches!(&c.replies[..], [(9, Err(OpError::InsufficientStock(_)))]),
        "{:?}",
        c.replies
    );
    assert_eq!(c.next_wake_ms, None);
}

#[test]
fn a_panicking_frame_poisons_the_batch() {
    fn boom(_: NodeId) {
        panic!("injected");
    }
    let mut store = MemStorage::default();
    let mut node = started(0, &mut store);
    node.set_frame_hook(boom);
    let peer = testkit::node_id(1);
    committed(node.step(
        &mut store,
        vec![Input::PeerUp {
            peer,
            conn: 1,
            digest: None,
        }],
        2_000,
    ));
    let commits = store.commits;
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let s = node.step(
        &mut store,
        vec![
            Input::Op(receipt("r1", "loc0", &[(7, 5)]), 1),
            Input::Frame {
                peer,
                conn: 1,
                body: vec![1, 2, 3],
            },
        ],
        3_000,
    );
    std::panic::set_hook(prev);
    let Step::Failed(f) = s else {
        panic!("a panicking frame must not commit");
    };
    assert!(
        matches!(&f.cause, Failure::Panic { peer: p, what } if *p == peer && what == "injected")
    );
    assert_eq!(store.commits, commits, "nothing committed");
    assert!(matches!(&f.replies[0], (1, Err(OpError::Unavailable(_)))));
    assert!(!node.connections().contains_key(&peer));
    assert_eq!(node.rejected().get("panic"), Some(&1));
}

/// Pipelined commits: a batch executes while the one before it commits.
fn executed(
    node: &mut NodeLoop<u32>,
    store: &mut MemStorage,
    inputs: Vec<Input<u32>>,
    now: u64,
) -> Executed<u32> {
    match node.execute(store, inputs, now) {
        Ok(e) => e,
        Err(f) => panic!("execute failed: {:?}", f.cause),
    }
}

#[test]
fn a_retry_of_a_key_in_flight_is_answered_from_its_record_not_applied_twice() {
    let mut store = MemStorage::default();
    let mut node = started(0, &mut store);
    let a = executed(
        &mut node,
        &mut store,
        vec![
            Input::Op(receipt("r1", "loc0", &[(7, 5)]), 1),
            Input::Op(sale("s1", Some("loc0"), &[(7, 2)]), 2),
        ],
        2_000,
    );
    // The retry arrives while the first attempt's batch is still committing:
    // storage does not have its record yet.
    let b = executed(
        &mut node,
        &mut store,
        vec![Input::Op(sale("s1", Some("loc0"), &[(7, 2)]), 3)],
        2_100,
    );
    assert!(
        !store.idem.contains_key("s1"),
        "the first batch is not committed yet"
    );
    assert_eq!(node.in_flight(), 2);
    assert_eq!(
        node.engine().totals(7, None).map(|t| t.0),
        Some(3),
        "the retry was applied a second time"
    );
    let commits = store.commits;
    let ca = node.release(
        a.held,
        commit_batch(&mut store, a.batch).expect("commit of the first batch"),
    );
    assert_eq!(store.commits, commits + 1);
    let first: Vec<_> = ca.replies.iter().map(|(t, r)| (*t, r.clone())).collect();
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|(_, r)| r.is_ok()), "{first:?}");
    let cb = node.release(
        b.held,
        commit_batch(&mut store, b.batch).expect("commit of the second batch"),
    );
    assert_eq!(cb.replies.len(), 1);
    assert_eq!(cb.replies[0].0, 3);
    // Answered as a replay is answered from storage: the same body.
    let body = |r: &Result<storemesh_protocol::ops::OpReply, OpError>| {
        r.as_ref().ok().map(|r| r.body.clone())
    };
    assert!(body(&first[1].1).is_some());
    assert_eq!(
        body(&cb.replies[0].1),
        body(&first[1].1),
        "the retry gets the first attempt's answer"
    );
    assert!(cb.batch.idem.is_empty(), "the retry wrote no second record");
    assert_eq!(node.in_flight(), 0);
    assert_eq!(node.engine().totals(7, None).map(|t| t.0), Some(3));
}

#[test]
fn a_failed_commit_with_a_later_batch_in_flight_releases_neither() {
    let mut store = MemStorage::default();
    let mut node = started(0, &mut store);
    let commits = store.commits;
    let a = executed(
        &mut node,
        &mut store,
        vec![Input::Op(receipt("r1", "loc0", &[(7, 5)]), 1)],
        2_000,
    );
    let b = executed(
        &mut node,
        &mut store,
        vec![
            Input::Op(sale("s1", Some("loc0"), &[(7, 2)]), 2),
            Input::Op(sale("s2", Some("loc0"), &[(7, 50)]), 3),
        ],
        2_100,
    );
    store.fail_commit = true;
    let e = commit_batch(&mut store, a.batch).expect_err("the disk is full");
    assert_eq!(e.number, a.held.number());
    // The later batch never reaches storage: both fail together.
    drop(b.batch);
    let f = node.fail_in_flight(Failure::Storage(e.error), vec![a.held, b.held]);
    assert_eq!(store.commits, commits, "nothing was committed");
    assert!(store.idem.is_empty(), "no record of either batch is stored");
    let tokens: Vec<u32> = f.replies.iter().map(|(t, _)| *t).collect();
    assert_eq!(tokens, vec![1, 2, 3]);
    assert!(
        f.replies.iter().all(|(_, r)| r.is_err()),
        "nothing of either batch is answered as done: {:?}",
        f.replies
    );
    assert!(matches!(&f.replies[1], (2, Err(OpError::Unavailable(_)))));
    assert!(matches!(
        &f.replies[2],
        (3, Err(OpError::InsufficientStock(_)))
    ));
    assert_eq!(
        f.in_doubt,
        vec![0],
        "only the batch that reached storage is in doubt"
    );
    // Both batches are answered: none is in flight, even before (or
    // without) a reopened engine — a driver that cannot reopen can close.
    assert_eq!(node.in_flight(), 0);
    // Reopened from storage: the sale's retry is not answered from the
    // failed batch's record, and rows are numbered from what is durable.
    store.fail_commit = false;
    node.replace_engine(engine(0), &mut store, 2_500);
    assert_eq!(node.in_flight(), 0);
    let c = committed(node.step(
        &mut store,
        vec![
            Input::Op(receipt("r1", "loc0", &[(7, 5)]), 4),
            Input::Op(sale("s1", Some("loc0"), &[(7, 2)]), 5),
        ],
        3_000,
    ));
    assert!(c.replies.iter().all(|(_, r)| r.is_ok()), "{:?}", c.replies);
    assert_eq!(c.batch.rows.first().map(|(_, r)| r.seq), Some(1));
    assert_eq!(node.engine().totals(7, None).map(|t| t.0), Some(3));
}

#[test]
#[should_panic(expected = "another batch's proof")]
fn a_batch_cannot_be_released_with_another_batchs_proof() {
    let mut store = MemStorage::default();
    let mut node = started(0, &mut store);
    let a = executed(
        &mut node,
        &mut store,
        vec![Input::Op(receipt("r1", "loc0", &[(7, 5)]), 1)],
        2_000,
    );
    let b = executed(
        &mut node,
        &mut store,
        vec![Input::Op(receipt("r2", "loc0", &[(8, 5)]), 2)],
        2_100,
    );
    let db = commit_batch(&mut store, b.batch).expect("commit");
    drop(a.batch);
    node.release(a.held, db);
}

/// A batch admits peer events up to its byte budget or the frame count,
/// whichever comes first, and always the first one (however large).
#[test]
fn the_sync_budget_bounds_a_batch_and_always_admits_one_event() {
    use storemesh_protocol::step::{
        event_weight, SyncBudget, SYNC_BYTES_PER_BATCH_MAX as MAX, SYNC_BYTES_PER_BATCH_MIN as MIN,
        SYNC_EVENT_BYTES_MIN as EVENT, SYNC_FRAMES_PER_BATCH_MAX as FRAMES,
    };
    use storemesh_protocol::wire::FRAME_BYTES_MAX;
    // Frames of 1 KiB: the bytes bound the batch.
    let mut b = SyncBudget::new(10 * 1024);
    assert_eq!((0..100).take_while(|_| b.admit(1024)).count(), 10);
    assert_eq!((b.frames(), b.bytes()), (10, 10 * 1024));
    // Tiny frames and connection events weigh EVENT bytes each; the count
    // bounds a batch of them.
    assert_eq!(event_weight(0), EVENT);
    assert_eq!(event_weight(3), EVENT);
    let mut b = SyncBudget::new(MIN);
    assert_eq!((0..1000).take_while(|_| b.admit(0)).count(), MIN / EVENT);
    let mut b = SyncBudget::new(usize::MAX);
    assert_eq!((0..10 * FRAMES).take_while(|_| b.admit(0)).count(), FRAMES);
    // The budget is clamped: never under MIN, never over MAX.
    let mut b = SyncBudget::new(0);
    assert_eq!((0..100).take_while(|_| b.admit(1024)).count(), MIN / 1024);
    let mut b = SyncBudget::new(usize::MAX);
    assert_eq!((0..100).take_while(|_| b.admit(MAX / 4)).count(), 4);
    // A frame larger than the whole budget still goes alone.
    let mut b = SyncBudget::new(MIN);
    assert!(b.admit(FRAME_BYTES_MAX.max(MAX + 1)));
    assert!(!b.admit(1));
}

/// The byte budget follows the measured cost: down at once to what takes
/// the target, up by doubling at most, within MIN..=MAX.
#[test]
fn the_sync_pace_follows_the_cost_of_frames() {
    use storemesh_protocol::step::{
        SyncPace, SYNC_BATCH_TARGET_US as TARGET, SYNC_BYTES_PER_BATCH_MAX as MAX,
        SYNC_BYTES_PER_BATCH_MIN as MIN, SYNC_BYTES_PER_BATCH_START as START,
    };
    let mut p = SyncPace::new();
    assert_eq!(p.bytes_max(), START);
    assert_eq!(p.budget().frames(), 0);
    // 8 KiB that took half the target: 16 KiB fit.
    p.observe(8 * 1024, TARGET / 2);
    assert_eq!(p.bytes_max(), 16 * 1024);
    // 16 KiB that took four times the target: 4 KiB at once.
    p.observe(16 * 1024, TARGET * 4);
    assert_eq!(p.bytes_max(), 4 * 1024);
    // Very expensive input: never under MIN.
    p.observe(1024, TARGET * 100);
    assert_eq!(p.bytes_max(), MIN);
    // Cheap input (took nothing): doubling per batch, up to MAX.
    p.observe(MIN, 0);
    assert_eq!(p.bytes_max(), 2 * MIN);
    for _ in 0..20 {
        let b = p.bytes_max();
        p.observe(b, 1);
    }
    assert_eq!(p.bytes_max(), MAX);
    // A batch without peer input tells nothing.
    p.observe(0, 10 * TARGET);
    assert_eq!(p.bytes_max(), MAX);
}
