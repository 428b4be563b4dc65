//! Group commit: `Store::commit` of one batch holding N sales (one durable
//! redb transaction) against N redb `Durability::Immediate` transactions of
//! one 200-byte value each (one commit per write). Throughput is per sale.

use std::cell::Cell;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use redb::{Database, Durability, TableDefinition};
use storemesh_benches::fixtures::{engine, sale, stock_products, NOW_MS};
use storemesh_node::store::Store;

const T: TableDefinition<u64, &[u8]> = TableDefinition::new("baseline");

fn group_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("store.redb")).expect("store");
    let raw = Database::create(dir.path().join("raw.redb")).expect("redb");
    let mut e = engine(64);
    stock_products(&mut e, 10_000);
    let first = e.flush(NOW_MS);
    store.commit(&first).expect("commit");
    let seq = Cell::new(0u64);
    let value = vec![7u8; 200];
    let mut g = c.benchmark_group("group_commit");
    g.sample_size(20);
    for n in [1u64, 16, 64, 256] {
        g.throughput(Throughput::Elements(n));
        g.bench_function(format!("store_commit_batch/{n}"), |b| {
            b.iter_batched(
                || {
                    for _ in 0..n {
                        seq.set(seq.get() + 1);
                        let p = 1 + (seq.get() * 7919) % 10_000;
                        e.execute(sale(&format!("gc-{}", seq.get()), p), NOW_MS, &|_| None)
                            .expect("sale");
                    }
                    // Persisted below, in the measured part.
                    match e.commit(NOW_MS, |_| Ok::<(), std::convert::Infallible>(())) {
                        Ok(r) => r.batch,
                        Err(never) => match never {},
                    }
                },
                |batch| store.commit(&batch).expect("commit"),
                BatchSize::PerIteration,
            )
        });
        g.bench_function(format!("redb_immediate_per_write/{n}"), |b| {
            b.iter(|| {
                for _ in 0..n {
                    seq.set(seq.get() + 1);
                    let mut tx = raw.begin_write().expect("write");
                    tx.set_durability(Durability::Immediate)
                        .expect("durability");
                    tx.open_table(T)
                        .expect("table")
                        .insert(seq.get(), value.as_slice())
                        .expect("insert");
                    tx.commit().expect("commit");
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, group_commit);
criterion_main!(benches);
