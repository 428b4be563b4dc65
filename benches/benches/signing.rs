//! Cost of signed changes (issue 16): one batch certificate per commit
//! (ECDSA P-256 with the node identity key), against the same code unsigned,
//! in the same run:
//! - `sale_flush`: one sale through `execute` + `flush` + `committed` on one
//!   engine (engine only, worst case: a signature per sale);
//! - `sale_commit`: the same plus `Store::commit` to a real redb file
//!   (`Durability::Immediate`), i.e. what one sale per batch costs a node;
//! - `batch_of_64_commit`: 64 sales in one group commit, with the commit;
//! - `sale_to_peer`: one sale per batch made by node A and applied by node B
//!   (B verifies A's certificate), frames carried in memory;
//! - the primitives: one signature, one verification.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::time::Duration;
use storemesh_benches::fixtures::{apply, identity_engine, receipt, sale, NOW_MS, STOCK};
use storemesh_node::identity::Identity;
use storemesh_node::signing::{NodeSigner, NodeVerifier};
use storemesh_node::store::Store;
use storemesh_protocol::engine::{Batch, Engine};
use storemesh_protocol::ids::NodeId;
use storemesh_protocol::signing::{ChangeSigner, ChangeVerifier};

const PRODUCTS: u64 = 64;

fn engine(id: &Identity, i: usize, signed: bool) -> Engine {
    identity_engine(id, i, signed)
}

/// `Engine::commit` with `persist` run on the batch (never fails here);
/// returns the frames released for peers.
fn commit(e: &mut Engine, now_ms: u64, persist: impl FnOnce(&Batch)) -> Vec<(NodeId, Vec<u8>)> {
    match e.commit(now_ms, |b| {
        persist(b);
        Ok::<(), std::convert::Infallible>(())
    }) {
        Ok(r) => r.frames,
        Err(never) => match never {},
    }
}

fn stocked(id: &Identity, signed: bool) -> Engine {
    let mut e = engine(id, 0, signed);
    let all: Vec<u64> = (1..=PRODUCTS).collect();
    apply(&mut e, receipt("rcv", "loc0", &all, STOCK), NOW_MS);
    e
}

fn signing(c: &mut Criterion) {
    let id = Identity::generate("bench").unwrap();
    let peer_id = Identity::generate("peer").unwrap();
    let mut g = c.benchmark_group("signing");
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    for signed in [false, true] {
        let name = if signed {
            "signed_ecdsa_p256"
        } else {
            "unsigned"
        };
        let mut e = stocked(&id, signed);
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
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.redb")).unwrap();
        let mut e = engine(&id, 0, signed);
        let all: Vec<u64> = (1..=PRODUCTS).collect();
        e.execute(receipt("rcv", "loc0", &all, STOCK), NOW_MS, &|_| None)
            .unwrap();
        commit(&mut e, NOW_MS, |b| store.commit(b).unwrap());
        g.bench_function(format!("sale_commit/{name}"), |b| {
            b.iter(|| {
                n += 1;
                e.execute(sale(&format!("c{n}"), 1 + n % PRODUCTS), NOW_MS, &|_| None)
                    .unwrap();
                commit(&mut e, NOW_MS, |b| store.commit(b).unwrap());
            })
        });
        g.bench_function(format!("batch_of_64_commit/{name}"), |b| {
            b.iter(|| {
                for _ in 0..64 {
                    n += 1;
                    e.execute(sale(&format!("b{n}"), 1 + n % PRODUCTS), NOW_MS, &|_| None)
                        .unwrap();
                }
                commit(&mut e, NOW_MS, |b| store.commit(b).unwrap());
            })
        });
        // Node A sells, node B applies A's push (and checks its certificate).
        let mut a = stocked(&id, signed);
        let mut bb = engine(&peer_id, 1, signed);
        a.add_configured_peer("n1", peer_id.node_id);
        bb.add_configured_peer("n0", id.node_id);
        a.peer_up(peer_id.node_id, Vec::new(), NOW_MS);
        bb.peer_up(id.node_id, Vec::new(), NOW_MS);
        let exchange = |a: &mut Engine, bb: &mut Engine| {
            for _ in 0..64 {
                let to_b = commit(a, NOW_MS, |_| {});
                let to_a = commit(bb, NOW_MS, |_| {});
                if to_b.is_empty() && to_a.is_empty() {
                    break;
                }
                for (_, f) in to_b {
                    bb.receive(id.node_id, &f[4..], NOW_MS).unwrap();
                }
                for (_, f) in to_a {
                    a.receive(peer_id.node_id, &f[4..], NOW_MS).unwrap();
                }
            }
        };
        exchange(&mut a, &mut bb);
        g.bench_function(format!("sale_to_peer/{name}"), |b| {
            b.iter(|| {
                n += 1;
                a.execute(sale(&format!("p{n}"), 1 + n % PRODUCTS), NOW_MS, &|_| None)
                    .unwrap();
                exchange(&mut a, &mut bb);
            })
        });
        assert_eq!(
            bb.stats.rejected_messages, 0,
            "the peer refused nothing ({name})"
        );
        assert_eq!(
            bb.totals(1, Some("loc0")).map(|t| t.0),
            a.totals(1, Some("loc0")).map(|t| t.0),
            "the peer applied every sale ({name})"
        );
    }
    let s = NodeSigner::from_pkcs8(&id.key_der).unwrap();
    let hash = [7u8; 32];
    let sig = s.sign(&hash);
    g.bench_function("sign/ecdsa_p256", |b| b.iter(|| s.sign(black_box(&hash))));
    g.bench_function("verify/ecdsa_p256", |b| {
        b.iter(|| NodeVerifier.verify(s.public_key(), black_box(&hash), &sig))
    });
    g.finish();
}

criterion_group!(benches, signing);
criterion_main!(benches);
