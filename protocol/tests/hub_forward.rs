//! A hub forwards what reaches it through a sync session: two stores that
//! only peer with the hub converge on every document (the `mesh` directory
//! included) without waiting for an anti-entropy tick. Changes a node caught
//! up on are announced (`Msg::Have`), and the announcement must make an idle
//! session fetch them.

use storemesh_protocol::testkit::{receipt, TestMesh};

fn run(with_digest: bool) {
    let mut m = TestMesh::new(3, 64);
    let hello = |m: &TestMesh, i: usize| with_digest.then(|| m.nodes[i].engine.hello_digest());
    let (h0, h1) = (hello(&m, 0), hello(&m, 1));
    m.connect_with(0, 1, h0, h1);
    m.settle();
    let (h0, h2) = (hello(&m, 0), hello(&m, 2));
    m.connect_with(0, 2, h0, h2);
    for k in 0..20u64 {
        m.execute(
            1,
            receipt(
                &format!("b{k}"),
                "loc1",
                &(k * 500 + 1..=k * 500 + 500)
                    .map(|p| (p, 50))
                    .collect::<Vec<_>>(),
            ),
        )
        .unwrap();
        m.commit(1);
        m.execute(
            2,
            receipt(
                &format!("c{k}"),
                "loc2",
                &(k * 500 + 1..=k * 500 + 500)
                    .map(|p| (p, 50))
                    .collect::<Vec<_>>(),
            ),
        )
        .unwrap();
        m.commit(2);
        m.deliver(0, 1, 3);
        m.deliver(2, 0, 5);
    }
    m.settle();
    let docs: Vec<_> = (0..3).map(|i| m.nodes[i].engine.documents()).collect();
    let a: std::collections::BTreeMap<_, _> = docs[0].iter().cloned().collect();
    let b: std::collections::BTreeMap<_, _> = docs[1].iter().cloned().collect();
    let diff: Vec<_> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .collect();
    assert!(diff.is_empty(), "with_digest={with_digest}: {diff:?}");
    assert_eq!(docs[0], docs[2], "with_digest={with_digest}");
}

#[test]
fn hub_forwards_without_anti_entropy_with_hello_digests() {
    run(true)
}
#[test]
fn hub_forwards_without_anti_entropy_without_hello_digests() {
    run(false)
}
