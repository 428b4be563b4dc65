//! What checking a peer's changes costs beside applying them (issue 17: the
//! canonical re-encoding of every change and the check that an op overwrites
//! only ops of its own key run on every receive). A store engine with 1,000
//! products and 5,000 earlier sales makes one group commit of 32 sales; the
//! changes it wrote are then validated (`validate::validate_changes`, as a
//! receiving node does before applying them) and applied (`apply_changes`
//! into a copy of each document as it was before the commit), in the same run.

use criterion::{criterion_group, criterion_main, Criterion};
use storemesh_benches::fixtures::{apply, engine, sale, stock_products, NOW_MS};
use storemesh_protocol::layout::DocId;
use storemesh_protocol::testkit;
use storemesh_protocol::validate::{validate_changes, ActorSeqs};

const PRODUCTS: u64 = 1_000;
const HISTORY: u64 = 5_000;
const BATCH: u64 = 32;

fn receive_validation(c: &mut Criterion) {
    let mut e = engine(64);
    stock_products(&mut e, PRODUCTS);
    for i in 0..HISTORY {
        apply(
            &mut e,
            sale(&format!("h-{i}"), 1 + i % PRODUCTS),
            NOW_MS + i,
        );
    }
    let before: Vec<(String, Vec<automerge::ChangeHash>)> = e
        .documents()
        .into_iter()
        .filter_map(|(id, _)| e.doc(&id).map(|d| (id, d.get_heads())))
        .collect();
    for i in 0..BATCH {
        e.execute(
            sale(&format!("b-{i}"), 1 + (i * 37) % PRODUCTS),
            NOW_MS + HISTORY,
            &|_| None,
        )
        .expect("sale accepted");
    }
    if let Err(never) = e.commit(NOW_MS + HISTORY, |_| Ok::<(), std::convert::Infallible>(())) {
        match never {}
    }
    // (document, its state before the batch, the batch's changes to it)
    let mut work = Vec::new();
    for (id, heads) in before {
        let Some(doc) = e.doc(&id) else { continue };
        let changes: Vec<automerge::Change> = doc.get_changes(&heads).into_iter().collect();
        if changes.is_empty() {
            continue;
        }
        let base = doc.fork_at(&heads).expect("fork at the earlier heads");
        let doc_id = DocId::parse(&id, 64).expect("engine document id");
        work.push((doc_id, base, changes, ActorSeqs::default()));
    }
    let receiver = testkit::node_id(1).tag();
    let mut g = c.benchmark_group("receive_validation");
    g.sample_size(30);
    g.bench_function("validate_32_sales", |b| {
        b.iter(|| {
            for (doc_id, base, changes, seqs) in work.iter_mut() {
                let mut cs = changes.clone();
                validate_changes(doc_id, base, seqs, &mut cs, receiver, 64, None)
                    .expect("honest changes pass");
            }
        })
    });
    g.bench_function("apply_32_sales", |b| {
        b.iter(|| {
            for (_, base, changes, _) in work.iter() {
                let mut d = base.clone();
                d.apply_changes(changes.iter().cloned()).expect("applies");
            }
        })
    });
    g.bench_function("copy_documents_only", |b| {
        b.iter(|| {
            for (_, base, _, _) in work.iter() {
                std::hint::black_box(base.clone());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, receive_validation);
criterion_main!(benches);
