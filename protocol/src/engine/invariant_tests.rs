//! The core's invariant assertions fire (debug builds): each test breaks one
//! invariant from inside the crate, as a bug would, and expects the panic
//! that names it.

use automerge::transaction::Transactable;
use automerge::{ScalarValue, ROOT};

use super::Engine;
use crate::layout::{ledger_key, LedgerField};
use crate::testkit::{config, receipt};

const NOW: u64 = 1_750_000_000_000;

/// An engine of test node 0 that received 5 units of product 42 at `loc0`,
/// committed.
fn stocked() -> Engine {
    let mut e = Engine::new(config(0, 8), [0, 1, 2, 3]);
    e.finish_open();
    e.execute(receipt("r1", "loc0", &[(42, 5)]), NOW, &|_| None)
        .expect("receipt");
    e.commit(NOW, |_| Ok::<(), ()>(())).expect("commit");
    e
}

#[test]
#[should_panic(expected = "invariant owned-cells")]
fn lowering_an_own_cell_is_caught_before_it_is_written() {
    let mut e = stocked();
    let doc = e.ledger_doc(42, "loc0");
    let key = ledger_key(42, e.actor, LedgerField::Received);
    e.put(doc, key, ScalarValue::Uint(1));
    let _ = e.flush(NOW + 1);
}

#[test]
#[should_panic(expected = "invariant push-after-commit")]
fn frames_cannot_be_taken_between_a_flush_and_its_commit() {
    let mut e = stocked();
    e.execute(receipt("r2", "loc0", &[(42, 1)]), NOW + 1, &|_| None)
        .expect("receipt");
    let _ = e.flush(NOW + 1);
    let _ = e.take_outgoing();
}

#[test]
#[should_panic(expected = "invariant persisted-heads")]
fn a_change_no_batch_holds_is_caught_at_the_flush() {
    let mut e = stocked();
    let id = e.ledger_doc(42, "loc0").encode();
    let key = ledger_key(42, e.actor, LedgerField::Received);
    // Written into the document without marking it dirty.
    let slot = e.docs.get_mut(&id).expect("ledger document");
    let mut tx = slot.doc.transaction();
    tx.put(ROOT, key, ScalarValue::Uint(9)).expect("put");
    tx.commit();
    let _ = e.flush(NOW + 1);
}

#[test]
#[should_panic(expected = "invariant peer-validation")]
fn a_change_peers_refuse_is_caught_when_it_is_written() {
    let mut e = stocked();
    let doc = e.ledger_doc(42, "loc0");
    // A cell owned by another node: every peer refuses the change.
    let other = crate::ids::ActorKey::new(crate::testkit::node_id(1).tag(), [0; 4]);
    e.put(
        doc,
        ledger_key(42, other, LedgerField::Received),
        ScalarValue::Uint(3),
    );
    let _ = e.flush(NOW + 1);
}
