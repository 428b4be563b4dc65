//! Ledger epochs (DESIGN §7, issue 14): the owner of a location cuts a ledger
//! document's history into a new epoch; every other node moves to it and
//! carries its own cells forward; a node cut off while the owner cut many
//! times comes back and every one of its sales counts exactly.

use storemesh_protocol::testkit::{self, grant, TestMesh};

const P: u64 = 7;

/// Three nodes in a full mesh, epochs cut after `ops` operations; the owner
/// (node 0) received 1,000 units of `P` at loc0 and granted `q` to `to`.
fn mesh_with_grant(ops: u64, to: &str, q: u64) -> TestMesh {
    let mut m = TestMesh::new(3, 4);
    m.full_mesh();
    for n in &mut m.nodes {
        n.engine.set_epoch_ops_max(ops);
    }
    m.execute(0, testkit::receipt("r1", "loc0", &[(P, 1000)]))
        .unwrap();
    m.commit(0);
    m.execute(0, grant("g1", P, "loc0", to, q)).unwrap();
    m.commit(0);
    m.settle();
    m
}

fn sell(m: &mut TestMesh, node: usize, id: &str, loc: &str, q: u64) {
    m.execute(node, testkit::sale(id, Some(loc), &[(P, q)]))
        .unwrap_or_else(|e| panic!("sale {id} at node {node}: {e:?}"));
    m.commit(node);
}

fn check_same(m: &TestMesh, loc: &str, on_hand: i64) {
    let e0 = &m.nodes[0].engine;
    let doc = e0.ledger_doc_id(P, loc).encode();
    for (i, n) in m.nodes.iter().enumerate() {
        let e = &n.engine;
        let entry = e.views.entry(P, loc).cloned().unwrap_or_default();
        assert_eq!(
            entry.on_hand(),
            on_hand,
            "node {i}: on hand of {P} at {loc}"
        );
        let rights: i64 = entry.rights_by_node().values().sum();
        assert_eq!(rights, on_hand, "node {i}: rights sum to on hand");
        assert_eq!(
            e.ledger_doc_id(P, loc).encode(),
            doc,
            "node {i} holds the same epoch"
        );
        assert_eq!(
            e.documents(),
            e0.documents(),
            "node {i}: same documents and heads"
        );
        // The view equals the document it is read from.
        let fresh = storemesh_protocol::views::read_entry(e.doc(&doc).unwrap(), P, None);
        assert_eq!(fresh, entry, "node {i}: view equals its epoch document");
    }
}

#[test]
fn owner_cuts_epochs_and_every_node_follows() {
    let mut m = mesh_with_grant(10, "n1", 100);
    for i in 0..40 {
        sell(&mut m, 0, &format!("a{i}"), "loc0", 1);
        if i % 3 == 0 {
            sell(&mut m, 1, &format!("b{i}"), "loc0", 2);
        }
        m.settle();
    }
    let e = &m.nodes[0].engine;
    let epoch = e.ledger_epoch("loc0", storemesh_protocol::ids::product_bucket(P, 4));
    assert!(epoch >= 2, "the owner cut several times: epoch {epoch}");
    assert!(e.stats.epochs_started >= 2);
    assert!(m.nodes[1].engine.stats.epochs_joined >= 1);
    // Old epochs are gone everywhere.
    for n in &m.nodes {
        let ledgers: Vec<String> = n
            .engine
            .documents()
            .into_iter()
            .map(|(d, _)| d)
            .filter(|d| d.starts_with("ledger/loc0/"))
            .collect();
        assert_eq!(ledgers.len(), 1, "{ledgers:?}");
    }
    check_same(&m, "loc0", 1000 - 40 - 2 * 14);
    // The history of the held epoch stays bounded.
    let doc = e.ledger_doc_id(P, "loc0").encode();
    let changes = e.doc(&doc).unwrap().get_changes(&[]).len();
    assert!(changes <= 30, "epoch holds {changes} changes");
}

#[test]
fn a_node_cut_off_past_many_epochs_loses_no_sale() {
    let mut m = mesh_with_grant(8, "n2", 200);
    // Node 2 (a web shop selling loc0's units on its rights) is cut off;
    // the owner sells and cuts many epochs meanwhile; node 1 follows.
    m.disconnect(2, 0);
    m.disconnect(2, 1);
    for i in 0..60 {
        sell(&mut m, 0, &format!("a{i}"), "loc0", 1);
        sell(&mut m, 2, &format!("w{i}"), "loc0", 2);
        m.settle();
    }
    let b = storemesh_protocol::ids::product_bucket(P, 4);
    let owner_epoch = m.nodes[0].engine.ledger_epoch("loc0", b);
    assert!(owner_epoch >= 3, "owner epoch {owner_epoch}");
    assert_eq!(m.nodes[1].engine.ledger_epoch("loc0", b), owner_epoch);
    assert!(m.nodes[2].engine.ledger_epoch("loc0", b) < owner_epoch);
    // Before the web shop returns, the others do not know its 120 units.
    assert_eq!(
        m.nodes[1].engine.views.entry(P, "loc0").unwrap().on_hand(),
        1000 - 60
    );
    m.connect(2, 0);
    m.connect(2, 1);
    m.settle();
    check_same(&m, "loc0", 1000 - 60 - 120);
    let n2 = m.nodes[2].engine.config().node_id.tag();
    assert_eq!(
        m.nodes[0].engine.views.entry(P, "loc0").unwrap().rights(n2),
        200 - 120,
        "the web shop's rights after its offline sales"
    );
}

/// A node that pushes changes to an epoch the others moved on from, and is
/// never heard from again, still has its sales counted: the receiver carries
/// the cells those changes raise into the epoch it holds (review finding of
/// the epochs change: dropping them lost the sales for good).
#[test]
fn late_changes_to_an_old_epoch_are_carried_by_their_receiver() {
    let mut m = mesh_with_grant(8, "n2", 200);
    m.disconnect(2, 0);
    m.disconnect(2, 1);
    for i in 0..40 {
        sell(&mut m, 0, &format!("a{i}"), "loc0", 1);
        sell(&mut m, 2, &format!("w{i}"), "loc0", 2);
        m.settle();
    }
    let b = storemesh_protocol::ids::product_bucket(P, 4);
    assert!(m.nodes[1].engine.ledger_epoch("loc0", b) > m.nodes[2].engine.ledger_epoch("loc0", b));
    // Node 2 comes back to node 1 only long enough to push one more sale,
    // then is gone for good: node 1 never answers it.
    m.connect(2, 1);
    sell(&mut m, 2, "w-last", "loc0", 2);
    let frames = m.links.get(&(2, 1)).map_or(0, |q| q.len());
    assert!(frames > 0, "node 2 pushed its sale");
    m.deliver(2, 1, frames);
    m.disconnect(2, 1);
    assert!(m.nodes[1].engine.stats.late_cells_carried > 0);
    // Node 1 and the owner agree on every unit node 2 sold (41 sales of 2).
    m.settle();
    for i in 0..2 {
        let e = &m.nodes[i].engine;
        let entry = e.views.entry(P, "loc0").unwrap();
        assert_eq!(entry.on_hand(), 1000 - 40 - 82, "node {i}");
        let n2 = m.nodes[2].engine.config().node_id.tag();
        assert_eq!(entry.rights(n2), 200 - 82, "node {i}: node 2's rights");
    }
    assert_eq!(
        m.nodes[0].engine.documents(),
        m.nodes[1].engine.documents(),
        "the two live nodes hold the same documents"
    );
}
