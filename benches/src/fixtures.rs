//! Engine fixtures for the micro-benchmarks: an engine stocked with products,
//! sale and receipt operations, and a history of earlier sales on one product.

use storemesh_protocol::engine::{Batch, Engine};
use storemesh_protocol::ops::{Op, QtyLine, Receipt, Sale, SaleLine};
use storemesh_protocol::testkit;

/// Fixed "now" for engines driven by the benchmarks (2026-11-27).
pub const NOW_MS: u64 = 1_795_773_600_000;
/// Units received per product: enough for any run.
pub const STOCK: u64 = 1_000_000_000;

/// A fresh engine of test node 0 (location `loc0`), `buckets` buckets.
pub fn engine(buckets: u32) -> Engine {
    let mut e = Engine::new(testkit::config(0, buckets), [0, 1, 2, 3]);
    e.add_configured_peer("n1", testkit::node_id(1));
    e.finish_open();
    let _ = e.commit(NOW_MS, |_| Ok::<(), std::convert::Infallible>(()));
    e
}

pub fn receipt(id: &str, location: &str, products: &[u64], quantity: u64) -> Op {
    Op::Receipt(Receipt {
        receipt_id: id.to_string(),
        location: location.to_string(),
        lines: products
            .iter()
            .map(|p| QtyLine {
                sku: None,
                product_id: *p,
                quantity,
            })
            .collect(),
        ..Default::default()
    })
}

/// A single-line sale of one unit (location chosen by the engine).
pub fn sale(id: &str, product: u64) -> Op {
    Op::Sale(Sale {
        sale_id: id.to_string(),
        location: None,
        customer_id: None,
        currency: Some("EUR".into()),
        lines: vec![SaleLine {
            sku: None,
            product_id: product,
            quantity: 1,
            unit_price: Some(1999),
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// Executes one operation and commits it as its own batch (what the node's
/// engine thread does for a lone request). Panics if the engine refuses it.
pub fn apply(e: &mut Engine, op: Op, now_ms: u64) -> Batch {
    e.execute(op, now_ms, &|_| None)
        .expect("operation accepted");
    match e.commit(now_ms, |_| Ok::<(), std::convert::Infallible>(())) {
        Ok(r) => r.batch,
        Err(never) => match never {},
    }
}

/// Receives `STOCK` units of products `1..=n` at the engine's own location,
/// 500 lines per receipt.
pub fn stock_products(e: &mut Engine, n: u64) {
    let loc = e.config().location.clone();
    let all: Vec<u64> = (1..=n).collect();
    for (i, chunk) in all.chunks(500).enumerate() {
        apply(e, receipt(&format!("rcv-{i}"), &loc, chunk, STOCK), NOW_MS);
    }
}

/// Runs `n` sales of `product`, each as its own change (`execute` + `flush`),
/// like `n` sales that arrived one at a time.
pub fn sell_history(e: &mut Engine, product: u64, n: u64, prefix: &str) {
    for i in 0..n {
        apply(e, sale(&format!("{prefix}-{i}"), product), NOW_MS + i);
    }
}

/// Test node `i`'s engine under identity `id`, with batch certificates
/// signed by that identity's key when `signed` (issue 16), opened and its
/// first batch committed. The same code either way: only
/// `Engine::set_signing` differs.
pub fn identity_engine(id: &storemesh_node::identity::Identity, i: usize, signed: bool) -> Engine {
    use storemesh_node::signing::{NodeSigner, NodeVerifier};
    let mut cfg = testkit::config(i, 64);
    cfg.node_id = id.node_id;
    let mut e = Engine::new(cfg, [i as u8, 1, 2, 3]);
    if signed {
        let signer = NodeSigner::from_pkcs8(&id.key_der).expect("a generated identity's key");
        e.set_signing(Box::new(signer), Box::new(NodeVerifier));
    }
    e.finish_open();
    let _ = e.commit(NOW_MS, |_| Ok::<(), std::convert::Infallible>(()));
    e
}
