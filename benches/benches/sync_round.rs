//! Sync round: two engines over `protocol::testkit::TestMesh` (production
//! sync code, in-memory links), one sale on each side, then every frame
//! delivered until both sides are quiet (validation, apply, view recompute,
//! forwarding included).

use criterion::{criterion_group, criterion_main, Criterion};
use storemesh_benches::fixtures::{receipt, sale, STOCK};
use storemesh_protocol::testkit::TestMesh;

fn sync_round(c: &mut Criterion) {
    let mut m = TestMesh::new(2, 64);
    let products: Vec<u64> = (1..=1000).collect();
    for i in 0..2 {
        for (k, chunk) in products.chunks(500).enumerate() {
            m.execute(
                i,
                receipt(&format!("r{i}-{k}"), &format!("loc{i}"), chunk, STOCK),
            )
            .expect("receipt");
        }
        m.commit(i);
    }
    m.full_mesh();
    m.settle();
    let mut seq = 0u64;
    let mut g = c.benchmark_group("sync_round");
    g.bench_function("one_sale_each_side", |b| {
        b.iter(|| {
            seq += 1;
            let p = 1 + seq % 1000;
            m.execute(0, sale(&format!("a-{seq}"), p)).expect("sale");
            m.execute(1, sale(&format!("b-{seq}"), p)).expect("sale");
            m.commit(0);
            m.commit(1);
            m.settle()
        })
    });
    g.finish();
    let a = &m.nodes[0].engine;
    let b = &m.nodes[1].engine;
    assert_eq!(a.digest_root(), b.digest_root(), "the engines converged");
    let per_round = (a.stats.sync_bytes_out + b.stats.sync_bytes_out) as f64 / seq.max(1) as f64;
    eprintln!(
        "sync_round: {seq} rounds, {:.0} bytes and {:.1} frames per round (both directions)",
        per_round,
        (a.stats.sync_messages_out + b.stats.sync_messages_out) as f64 / seq.max(1) as f64
    );
}

criterion_group!(benches, sync_round);
criterion_main!(benches);
