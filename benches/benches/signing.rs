//! Cost of signed changes (issue 16): sales through `execute` + `flush` +
//! `committed` on an engine that signs every change with its ECDSA P-256
//! identity key, against the same engine unsigned, in the same run; one sale
//! per batch (worst case: a signature per document per sale) and 64 sales
//! per batch (group commit: signatures are per change, not per sale); and
//! what a receiver pays to verify one change.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::time::Duration;
use storemesh_benches::fixtures::{apply, receipt, sale, NOW_MS, STOCK};
use storemesh_node::identity::Identity;
use storemesh_node::signing::{NodeSigner, NodeVerifier};
use storemesh_protocol::engine::Engine;
use storemesh_protocol::signing::{ChangeSigner, ChangeVerifier};
use storemesh_protocol::testkit;

const PRODUCTS: u64 = 64;

fn engine(id: &Identity, signed: bool) -> Engine {
    let mut cfg = testkit::config(0, 64);
    cfg.node_id = id.node_id;
    let mut e = Engine::new(cfg, [0, 1, 2, 3]);
    if signed {
        e.set_signing(
            Box::new(NodeSigner::from_pkcs8(&id.key_der).unwrap()),
            Box::new(NodeVerifier),
        );
    }
    e.finish_open();
    let _ = e.flush(NOW_MS);
    e.committed(NOW_MS);
    let all: Vec<u64> = (1..=PRODUCTS).collect();
    apply(&mut e, receipt("rcv", "loc0", &all, STOCK), NOW_MS);
    e
}

fn signing(c: &mut Criterion) {
    let id = Identity::generate("bench").unwrap();
    let mut g = c.benchmark_group("signing");
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    for signed in [false, true] {
        let name = if signed {
            "signed_ecdsa_p256"
        } else {
            "unsigned"
        };
        let mut e = engine(&id, signed);
        let mut n = 0u64;
        g.bench_function(format!("sale_flush/{name}"), |b| {
            b.iter(|| {
                n += 1;
                black_box(apply(
                    &mut e,
                    sale(&format!("s{n}"), 1 + n % PRODUCTS),
                    NOW_MS,
                ))
            })
        });
        let mut e = engine(&id, signed);
        let mut n = 0u64;
        g.bench_function(format!("batch_of_64_sales/{name}"), |b| {
            b.iter(|| {
                for _ in 0..64 {
                    n += 1;
                    e.execute(sale(&format!("b{n}"), 1 + n % PRODUCTS), NOW_MS, &|_| None)
                        .unwrap();
                }
                let batch = e.flush(NOW_MS);
                e.committed(NOW_MS);
                black_box(batch)
            })
        });
    }
    let s = NodeSigner::from_pkcs8(&id.key_der).unwrap();
    let hash = [7u8; 32];
    let sig = s.sign(&hash);
    g.bench_function("sign_change/ecdsa_p256", |b| {
        b.iter(|| s.sign(black_box(&hash)))
    });
    g.bench_function("verify_change/ecdsa_p256", |b| {
        b.iter(|| NodeVerifier.verify(s.public_key(), black_box(&hash), &sig))
    });
    g.finish();
}

criterion_group!(benches, signing);
criterion_main!(benches);
