//! Ledger apply: `Engine::execute` of a single-line sale + `Engine::flush`
//! (one Automerge change per touched document), on a fresh product and on a
//! product with 100,000 earlier sales, in the same engine (so both share the
//! same records document). The core issue's acceptance criterion: both cost
//! about the same.

use std::cell::Cell;

use criterion::{criterion_group, criterion_main, Criterion};
use storemesh_benches::fixtures::{apply, engine, sale, sell_history, stock_products, NOW_MS};

const HISTORY: u64 = 100_000;
const PRODUCTS: u64 = 10_000;
const HOT: u64 = 1;

fn ledger_apply(c: &mut Criterion) {
    let mut e = engine(64);
    stock_products(&mut e, PRODUCTS);
    eprintln!("ledger_apply: building a history of {HISTORY} sales on product {HOT} ...");
    sell_history(&mut e, HOT, HISTORY, "hist");
    let mut g = c.benchmark_group("ledger_apply");
    g.sample_size(30);
    let seq = Cell::new(0u64);
    let next_id = || {
        seq.set(seq.get() + 1);
        format!("bench-{}", seq.get())
    };
    // Fresh products rotate over 2..=PRODUCTS: each has at most a handful of
    // earlier sales by the end of the run.
    let fresh = Cell::new(1u64);
    g.bench_function("sale_flush/fresh_product", |b| {
        b.iter(|| {
            fresh.set(if fresh.get() >= PRODUCTS {
                2
            } else {
                fresh.get() + 1
            });
            apply(&mut e, sale(&next_id(), fresh.get()), NOW_MS + HISTORY)
        })
    });
    g.bench_function("sale_flush/product_with_100k_sales", |b| {
        b.iter(|| apply(&mut e, sale(&next_id(), HOT), NOW_MS + HISTORY))
    });
    // For reference: an engine without any sales history at all.
    let mut clean = engine(64);
    stock_products(&mut clean, PRODUCTS);
    g.bench_function("sale_flush/fresh_engine", |b| {
        b.iter(|| {
            fresh.set(if fresh.get() >= PRODUCTS {
                2
            } else {
                fresh.get() + 1
            });
            apply(&mut clean, sale(&next_id(), fresh.get()), NOW_MS)
        })
    });
    g.finish();
}

criterion_group!(benches, ledger_apply);
criterion_main!(benches);
