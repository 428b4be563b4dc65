//! Healing a 2|3 partition of a 5-node full mesh sends each missing change
//! about once: sync bytes after the heal stay within 2× the encoded size of
//! the changes the nodes lacked (benchmark row 3's target, here on the
//! in-memory mesh so that it is checked on every test run).
use storemesh_protocol::testkit::{receipt, sale, TestMesh};

#[test]
fn heal_after_partition_sends_each_missing_change_about_once() {
    let n = 5;
    let mut m = TestMesh::new(n, 16);
    m.full_mesh();
    for i in 0..n {
        for p in 1..=100u64 {
            m.execute(
                i,
                receipt(&format!("r{i}-{p}"), &format!("loc{i}"), &[(p, 1000)]),
            )
            .unwrap();
        }
        m.commit(i);
    }
    m.settle();
    let a = [0usize, 1];
    let b = [2usize, 3, 4];
    for x in a {
        for y in b {
            m.disconnect(x, y);
        }
    }
    let out0: u64 = m
        .nodes
        .iter()
        .map(|nd| nd.engine.stats.sync_bytes_out)
        .sum();
    for k in 0..300u64 {
        for i in 0..n {
            m.execute(
                i,
                sale(
                    &format!("s{i}-{k}"),
                    Some(&format!("loc{i}")),
                    &[(1 + (k * 7 + i as u64) % 100, 1)],
                ),
            )
            .unwrap();
            m.commit(i);
        }
        m.settle();
    }
    let out1: u64 = m
        .nodes
        .iter()
        .map(|nd| nd.engine.stats.sync_bytes_out)
        .sum();
    let before: Vec<Vec<(String, Vec<String>)>> =
        m.nodes.iter().map(|nd| nd.engine.documents()).collect();
    for x in a {
        for y in b {
            m.connect(x, y);
        }
    }
    let frames = m.settle();
    let out2: u64 = m
        .nodes
        .iter()
        .map(|nd| nd.engine.stats.sync_bytes_out)
        .sum();
    let roots: Vec<_> = m.nodes.iter().map(|nd| nd.engine.digest_root()).collect();
    assert!(roots.windows(2).all(|w| w[0] == w[1]));
    // What each node lacked: the changes after its pre-heal heads.
    let mut lacked = 0u64;
    for (i, docs) in before.iter().enumerate() {
        let e = &m.nodes[i].engine;
        for (id, _) in e.documents() {
            let old = docs
                .iter()
                .find(|(d, _)| *d == id)
                .map(|(_, h)| storemesh_protocol::engine::parse_heads(h))
                .unwrap_or_default();
            lacked += e
                .doc(&id)
                .map(|d| d.save_after(&old).len() as u64)
                .unwrap_or(0);
        }
    }
    let heal = out2 - out1;
    eprintln!(
        "partition traffic {} B; heal traffic {heal} B in {frames} frames; changes lacked {lacked} B; ratio {:.2}",
        out1 - out0,
        heal as f64 / lacked as f64
    );
    let bundles: u64 = m.nodes.iter().map(|nd| nd.engine.stats.bundles_out).sum();
    let bundled: u64 = m
        .nodes
        .iter()
        .map(|nd| nd.engine.stats.bundled_changes_out)
        .sum();
    eprintln!("{bundles} sync messages carried {bundled} changes as bundles");
    assert!(
        lacked > 100_000,
        "the partition produced changes to exchange"
    );
    assert!(
        heal <= 2 * lacked,
        "heal sent {heal} B for {lacked} B of missing changes"
    );
    // Peers holding part of a document get only the changes they lack, as
    // bundles, not the whole document again.
    assert!(
        bundled >= 1000,
        "only {bundled} changes travelled in bundles"
    );
}
