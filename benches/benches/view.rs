//! View reads: `Engine::totals` (stock level and available over all locations)
//! of a product held at one location, at 20 locations, and of a product with
//! 100,000 earlier sales (the view is materialized, so history must not matter).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use storemesh_benches::fixtures::{apply, engine, receipt, sell_history, NOW_MS, STOCK};

fn view(c: &mut Criterion) {
    let mut e = engine(64);
    apply(&mut e, receipt("r-one", "loc0", &[1, 2], STOCK), NOW_MS);
    for l in 0..20 {
        apply(
            &mut e,
            receipt(&format!("r-{l}"), &format!("site-{l}"), &[3], 100),
            NOW_MS,
        );
    }
    sell_history(&mut e, 2, 100_000, "hist");
    let mut g = c.benchmark_group("view");
    g.bench_function("totals/1_location", |b| {
        b.iter(|| e.totals(black_box(1), None))
    });
    g.bench_function("totals/20_locations", |b| {
        b.iter(|| e.totals(black_box(3), None))
    });
    g.bench_function("totals/product_with_100k_sales", |b| {
        b.iter(|| e.totals(black_box(2), None))
    });
    g.bench_function("rights/1_location", |b| {
        b.iter(|| e.rights(black_box(1), "loc0"))
    });
    g.finish();
}

criterion_group!(benches, view);
criterion_main!(benches);
