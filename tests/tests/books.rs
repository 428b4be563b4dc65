//! End-to-end: exact books in real use (CONTRACT v2 "exact books"): full
//! counts of real stores in pages, ids that collide while apart, tokens
//! limited to locations and the override scope, declared locations.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use storemesh_node::config::{Scope, TokenConfig};
use storemesh_testkit::*;

const S: Policy = Policy::Strict;

/// Books `products` products (ids 1..=n) with `qty` units each at `loc`, in
/// receipts of 500 lines.
async fn stock_up(c: &Client, loc: &str, n: u64, qty: u64) {
    let ids: Vec<u64> = (1..=n).collect();
    for (k, chunk) in ids.chunks(500).enumerate() {
        let lines: Vec<Value> = chunk
            .iter()
            .map(|p| json!({"product_id": p, "quantity": qty}))
            .collect();
        let (s, v) = c
            .post(
                "/api/receipts",
                json!({"receipt_id": format!("open-{k}"), "location": loc, "lines": lines}),
            )
            .await
            .unwrap();
        assert_eq!(s, 201, "{v}");
    }
}

/// Waits until `c` sees product `p` at `loc` with `on_hand`.
async fn wait_on_hand(c: &Client, p: u64, loc: &str, on_hand: i64, limit: Duration) {
    let ok = wait_for(limit, || async {
        let Ok((200, v)) = c.get(&format!("/api/inventory?product_id={p}")).await else {
            return false;
        };
        v["locations"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["location"] == loc))
            .and_then(|x| x["on_hand"].as_i64())
            == Some(on_hand)
    })
    .await;
    assert!(ok.is_ok(), "product {p} at {loc} never reached {on_hand}");
}

/// Waits until `c` knows location `loc` (its node's directory entry arrived).
async fn wait_knows(c: &Client, loc: &str) {
    let ok = wait_for(Duration::from_secs(10), || async {
        matches!(c.get("/api/locations").await, Ok((200, v)) if v["items"].as_array().is_some_and(|a| a.iter().any(|l| l["location"] == loc)))
    })
    .await;
    assert!(ok.is_ok(), "{} never learned location {loc}", c.base);
}

/// Finding 1: a full count of a 1,500-product store through the one-shot
/// count used to write one record over 64 KiB: every peer refused the
/// store's records document from then on, and the next sale never reached
/// the web shop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_full_count_of_a_1500_product_store_keeps_replicating() {
    let m = Mesh::start(
        &[("store-a", Role::Store, S), ("shop", Role::Webshop, S)],
        &[(0, 1)],
    )
    .await;
    m.wait_connected(0, 1).await;
    let (a, w) = (&m.clients[0], &m.clients[1]);
    stock_up(a, "store-a", 1_500, 4).await;
    let lines: Vec<Value> = (1..=500u64)
        .map(|p| json!({"product_id": p, "counted": 3}))
        .collect();
    let (s, v) = a
        .post(
            "/api/counts",
            json!({"count_id": "c-full", "location": "store-a", "scope": "full", "lines": lines}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let count = v;
    let (s, v) = a
        .post("/api/sales", sale("after-count", None, &[(7, 1)]))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let seen = wait_for(Duration::from_secs(10), || async {
        w.get("/api/sales/after-count")
            .await
            .map(|r| r.0)
            .unwrap_or(0)
            == 200
    })
    .await;
    assert!(
        seen.is_ok(),
        "the sale after the full count never reached the web shop"
    );
    wait_on_hand(w, 1_500, "store-a", 0, Duration::from_secs(10)).await;
    assert_eq!(stock_level(a, 501).await, Some(0));
    assert_eq!(count["products_zeroed"], 1_000, "{count}");
    assert_eq!(count["units_delta"], -500 - 4_000, "{count}");
    m.shutdown().await;
}

/// The contract's count session on a store of 50,000 products: pages of
/// 500 lines while the till sells, a full finish that zeroes the products
/// not counted, and a sale right after it visible at the web shop within
/// a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_count_session_of_a_50000_product_store_in_pages() {
    full_count_session_in_pages(50_000, 49_000).await;
}

/// The same at the 100,000 products issue 15 asks for. Too slow for CI's
/// budget in a debug build; run by hand: `cargo test --release -p
/// storemesh-tests --test books -- --ignored
/// full_count_session_of_a_100000_product_store_in_pages --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "100,000 products: minutes in a debug build; run by hand"]
async fn full_count_session_of_a_100000_product_store_in_pages() {
    full_count_session_in_pages(100_000, 98_000).await;
}

/// A count session at store-a of `products` products, `counted` of them
/// counted (at 4 of 5 each) in pages of 500, finished `full`.
async fn full_count_session_in_pages(products: u64, counted: u64) {
    let pages = counted.div_ceil(500);
    let m = Mesh::start(
        &[("store-a", Role::Store, S), ("shop", Role::Webshop, S)],
        &[(0, 1)],
    )
    .await;
    m.wait_connected(0, 1).await;
    let (a, w) = (&m.clients[0], &m.clients[1]);
    let t0 = Instant::now();
    stock_up(a, "store-a", products, 5).await;
    eprintln!("stocked {products} products in {:?}", t0.elapsed());
    wait_on_hand(w, products, "store-a", 5, Duration::from_secs(60)).await;
    eprintln!("web shop caught up after {:?}", t0.elapsed());
    // Scanned aisle by aisle: products 1..=49,000 counted at 4 each, in
    // pages of 500; a sale happens between scanning and finishing.
    let t1 = Instant::now();
    let ids: Vec<u64> = (1..=counted).collect();
    for (k, chunk) in ids.chunks(500).enumerate() {
        let lines: Vec<Value> = chunk
            .iter()
            .map(|p| json!({"product_id": p, "counted": 4}))
            .collect();
        let (s, v) = a
            .post(
                "/api/counts/stk-1/lines",
                json!({"location": "store-a", "lines": lines}),
            )
            .await
            .unwrap();
        assert_eq!(s, 200, "page {k}: {v}");
        assert_eq!(v["status"], "open");
        assert_eq!(v["lines_received"], chunk.len() as u64);
        assert_eq!(v["count_id"], "stk-1");
        assert_eq!(v["location"], "store-a");
    }
    eprintln!("{pages} pages in {:?}", t1.elapsed());
    wait_on_hand(w, counted, "store-a", 4, Duration::from_secs(60)).await;
    eprintln!("web shop has every page after {:?}", t1.elapsed());
    // A recount replaces the earlier line of product 1.
    let (s, v) = a
        .post(
            "/api/counts/stk-1/lines",
            json!({"location": "store-a", "lines": [{"product_id": 1, "counted": 2}]}),
        )
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    // Sold after its line was scanned: the finish must not erase the sale.
    let (s, v) = a
        .post("/api/sales", sale("mid-count", None, &[(2, 1)]))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let (s, v) = a.get("/api/counts/stk-1").await.unwrap();
    assert_eq!((s, v["status"].as_str()), (200, Some("open")), "{v}");
    let t2 = Instant::now();
    let (s, finish) = a
        .post("/api/counts/stk-1/finish", json!({"scope": "full"}))
        .await
        .unwrap();
    eprintln!("finish in {:?}", t2.elapsed());
    let q = Instant::now();
    let _ = w.get("/api/inventory?product_id=1").await;
    eprintln!(
        "a read at the web shop right after the finish took {:?}",
        q.elapsed()
    );
    assert_eq!(s, 201, "{finish}");
    assert_eq!(finish["status"], "finished");
    assert_eq!(finish["count_id"], "stk-1");
    assert_eq!(finish["location"], "store-a");
    assert_eq!(finish["lines_counted"], counted);
    assert_eq!(finish["products_zeroed"], products - counted);
    // 48,999 products 5 → 4, product 1 5 → 2, 1,000 products 5 → 0.
    let delta = -(counted as i64 - 1) - 3 - 5 * (products - counted) as i64;
    assert_eq!(finish["units_delta"], delta, "{finish}");
    // The sale right after the count reaches the web shop within a second.
    let (s, v) = a
        .post("/api/sales", sale("after-count", None, &[(3, 1)]))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let sold = Instant::now();
    let seen = wait_for(Duration::from_secs(10), || async {
        w.get("/api/sales/after-count")
            .await
            .map(|r| r.0)
            .unwrap_or(0)
            == 200
    })
    .await;
    let visible_after = sold.elapsed();
    eprintln!("sale visible at the web shop after {visible_after:?}");
    assert!(
        seen.is_ok() && visible_after < Duration::from_secs(1),
        "the sale after the full count did not reach the web shop within 1 s ({visible_after:?})"
    );
    // Replay: 200 and the same body; lines after the finish: 409 id_conflict.
    let (s, again) = a
        .post("/api/counts/stk-1/finish", json!({"scope": "full"}))
        .await
        .unwrap();
    assert_eq!((s, &again), (200, &finish));
    let (s, v) = a
        .post(
            "/api/counts/stk-1/lines",
            json!({"location": "store-a", "lines": [{"product_id": 9, "counted": 1}]}),
        )
        .await
        .unwrap();
    assert_eq!((s, v["error"].as_str()), (409, Some("id_conflict")), "{v}");
    // The books: counted products at their count (the mid-count sale kept),
    // the rest zeroed, at both nodes.
    assert_eq!(stock_level(a, 1).await, Some(2));
    assert_eq!(stock_level(a, 2).await, Some(3));
    assert_eq!(stock_level(a, 3).await, Some(3));
    assert_eq!(stock_level(a, counted).await, Some(4));
    assert_eq!(stock_level(a, counted + 1).await, Some(0));
    assert_eq!(stock_level(a, products).await, Some(0));
    wait_on_hand(w, products, "store-a", 0, Duration::from_secs(10)).await;
    wait_on_hand(w, 2, "store-a", 3, Duration::from_secs(10)).await;
    let ok = wait_for(Duration::from_secs(10), || async {
        matches!(w.get("/api/counts/stk-1").await, Ok((200, v)) if v["status"] == "finished" && v["products_zeroed"] == products - counted)
    })
    .await;
    assert!(ok.is_ok(), "the web shop knows the finished count");
    m.shutdown().await;
}

/// Finding 2: two stores apart from each other both create transfer
/// `trf-1` (A→B 3 units, B→A 2 units). Both stay in effect: each is
/// received at its destination, and the chain's stock is conserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colliding_transfer_ids_made_while_partitioned_stay_exact() {
    let m = Mesh::start(
        &[("store-a", Role::Store, S), ("store-b", Role::Store, S)],
        &[(0, 1)],
    )
    .await;
    m.wait_connected(0, 1).await;
    let (a, b) = (&m.clients[0], &m.clients[1]);
    assert_eq!(
        a.post("/api/receipts", receipt("ra", "store-a", &[(5, 20)]))
            .await
            .unwrap()
            .0,
        201
    );
    assert_eq!(
        b.post("/api/receipts", receipt("rb", "store-b", &[(5, 20)]))
            .await
            .unwrap()
            .0,
        201
    );
    wait_on_hand(a, 5, "store-b", 20, Duration::from_secs(10)).await;
    wait_on_hand(b, 5, "store-a", 20, Duration::from_secs(10)).await;
    m.node(0).set_partitioned(true);
    wait_for(Duration::from_secs(5), || async {
        m.node(0).transport.connected().is_empty()
    })
    .await
    .unwrap();
    let (s, v) = a.post("/api/transfers", json!({"transfer_id": "trf-1", "from": "store-a", "to": "store-b", "lines": [{"product_id": 5, "quantity": 3}]})).await.unwrap();
    assert_eq!(s, 201, "{v}");
    let (s, v) = b.post("/api/transfers", json!({"transfer_id": "trf-1", "from": "store-b", "to": "store-a", "lines": [{"product_id": 5, "quantity": 2}]})).await.unwrap();
    assert_eq!(s, 201, "{v}");
    m.node(0).set_partitioned(false);
    // Both transfers known at both nodes: GET answers one plus the other.
    for c in [a, b] {
        let ok = wait_for(Duration::from_secs(15), || async {
            matches!(c.get("/api/transfers/trf-1").await, Ok((200, v)) if v["collisions"].as_array().map(|x| x.len()) == Some(1))
        })
        .await;
        assert!(ok.is_ok(), "both colliding transfers known");
    }
    let (_, v) = b.get("/api/transfers/trf-1").await.unwrap();
    assert_eq!(
        (v["from"].as_str(), v["to"].as_str()),
        (Some("store-a"), Some("store-b")),
        "{v}"
    );
    // Each destination receives its own transfer by the id.
    let (s, v) = b
        .post("/api/transfers/trf-1/receive", json!({}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["lines"][0]["received"], 3, "{v}");
    let (s, v) = a
        .post("/api/transfers/trf-1/receive", json!({}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["lines"][0]["received"], 2, "{v}");
    // The chain's 40 units are all there, at every node.
    for c in [a, b] {
        wait_on_hand(c, 5, "store-a", 19, Duration::from_secs(10)).await;
        wait_on_hand(c, 5, "store-b", 21, Duration::from_secs(10)).await;
        // Nothing left in transit once both receipts' records arrived: they
        // travel in the records documents, after the ledger cells that
        // moved on hand (a node mid-sync shows a receipt's units on hand
        // and, for a moment, still incoming).
        let incoming = |v: &Value| -> i64 {
            v["locations"]
                .as_array()
                .map(|ls| ls.iter().map(|l| l["incoming"].as_i64().unwrap_or(0)).sum())
                .unwrap_or(-1)
        };
        let settled = wait_for(Duration::from_secs(10), || async {
            matches!(c.get("/api/inventory?product_id=5").await, Ok((200, v)) if incoming(&v) == 0)
        })
        .await;
        let (_, v) = c.get("/api/inventory?product_id=5").await.unwrap();
        assert!(settled.is_ok(), "units still in transit: {v}");
        assert_eq!(v["stock_level"], 40, "{v}");
        assert_eq!(incoming(&v), 0, "{v}");
        let (_, v) = c.get("/api/overdrafts").await.unwrap();
        let coll: Vec<&Value> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["kind"] == "id_collision" && i["id"] == "trf-1")
            .collect();
        assert_eq!(coll.len(), 1, "{v}");
        assert_eq!(coll[0]["nodes"], json!(["store-a", "store-b"]), "{v}");
    }
    m.shutdown().await;
}

/// Finding 2, receipts: two stores cut off from each other both receive
/// goods under receipt id `rcv-1` (A 4 units, B 6 units). Once healed,
/// both receipts count at every node (the chain holds 10) and
/// `/api/overdrafts` lists the id as a collision of both stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colliding_receipt_ids_made_while_partitioned_both_count_and_are_listed() {
    let m = Mesh::start(
        &[("store-a", Role::Store, S), ("store-b", Role::Store, S)],
        &[(0, 1)],
    )
    .await;
    m.wait_connected(0, 1).await;
    let (a, b) = (&m.clients[0], &m.clients[1]);
    wait_knows(a, "store-b").await;
    wait_knows(b, "store-a").await;
    m.node(0).set_partitioned(true);
    wait_for(Duration::from_secs(5), || async {
        m.node(0).transport.connected().is_empty()
    })
    .await
    .unwrap();
    for (c, loc, q) in [(a, "store-a", 4u64), (b, "store-b", 6)] {
        let (s, v) = c
            .post("/api/receipts", receipt("rcv-1", loc, &[(7, q)]))
            .await
            .unwrap();
        assert_eq!(s, 201, "{v}");
    }
    m.node(0).set_partitioned(false);
    for c in [a, b] {
        wait_on_hand(c, 7, "store-a", 4, Duration::from_secs(15)).await;
        wait_on_hand(c, 7, "store-b", 6, Duration::from_secs(15)).await;
        let (_, v) = c.get("/api/inventory?product_id=7").await.unwrap();
        assert_eq!(v["stock_level"], 10, "{v}");
        let (s, v) = c.get("/api/overdrafts").await.unwrap();
        assert_eq!(s, 200, "{v}");
        let coll: Vec<&Value> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["kind"] == "id_collision" && i["id"] == "rcv-1")
            .collect();
        assert_eq!(coll.len(), 1, "{v}");
        assert_eq!(coll[0]["record"], "receipt", "{v}");
        assert_eq!(coll[0]["nodes"], json!(["store-a", "store-b"]), "{v}");
    }
    m.shutdown().await;
}

/// Two colliding transfers to one destination: `"from"` chooses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colliding_transfers_to_one_destination_are_chosen_by_from() {
    let m = Mesh::start(
        &[
            ("store-a", Role::Store, S),
            ("store-b", Role::Store, S),
            ("store-c", Role::Store, S),
        ],
        &[(0, 1), (0, 2), (1, 2)],
    )
    .await;
    m.wait_connected(0, 2).await;
    let (a, b, c) = (&m.clients[0], &m.clients[1], &m.clients[2]);
    assert_eq!(
        a.post("/api/receipts", receipt("ra", "store-a", &[(5, 10)]))
            .await
            .unwrap()
            .0,
        201
    );
    assert_eq!(
        b.post("/api/receipts", receipt("rb", "store-b", &[(5, 10)]))
            .await
            .unwrap()
            .0,
        201
    );
    wait_on_hand(b, 5, "store-a", 10, Duration::from_secs(10)).await;
    wait_on_hand(a, 5, "store-b", 10, Duration::from_secs(10)).await;
    wait_knows(a, "store-c").await;
    wait_knows(b, "store-c").await;
    m.node(0).set_partitioned(true);
    wait_for(Duration::from_secs(5), || async {
        m.node(0).transport.connected().is_empty()
    })
    .await
    .unwrap();
    for (cl, from, q) in [(a, "store-a", 4u64), (b, "store-b", 1)] {
        let (s, v) = cl.post("/api/transfers", json!({"transfer_id": "t-x", "from": from, "to": "store-c", "lines": [{"product_id": 5, "quantity": q}]})).await.unwrap();
        assert_eq!(s, 201, "{v}");
    }
    m.node(0).set_partitioned(false);
    let ok = wait_for(Duration::from_secs(15), || async {
        matches!(c.get("/api/transfers/t-x").await, Ok((200, v)) if v["collisions"].as_array().map(|x| x.len()) == Some(1))
    })
    .await;
    assert!(ok.is_ok());
    let (s, v) = c
        .post("/api/transfers/t-x/receive", json!({}))
        .await
        .unwrap();
    assert_eq!((s, v["error"].as_str()), (409, Some("id_collision")), "{v}");
    let (s, v) = c
        .post("/api/transfers/t-x/receive", json!({"from": "store-b"}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["lines"][0]["received"], 1, "{v}");
    let (s, v) = c
        .post("/api/transfers/t-x/receive", json!({"from": "store-a"}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["lines"][0]["received"], 4, "{v}");
    wait_on_hand(c, 5, "store-c", 5, Duration::from_secs(10)).await;
    let (_, v) = c.get("/api/inventory?product_id=5").await.unwrap();
    assert_eq!(v["stock_level"], 20, "{v}");
    m.shutdown().await;
}

fn token(name: &str, token: &str, scopes: &[Scope], locations: Option<&[&str]>) -> TokenConfig {
    TokenConfig {
        name: name.into(),
        token: token.into(),
        scopes: scopes.to_vec(),
        locations: locations.map(|l| l.iter().map(|s| s.to_string()).collect()),
    }
}

/// Finding 9: tokens limited to locations, the override scope, declared
/// locations, and no customer ids in overdrafts without the customers scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_locations_and_override() {
    let m = Mesh::start_with(
        &[("store-a", Role::Store, S), ("store-b", Role::Store, S)],
        &[(0, 1)],
        |i, cfg| {
            if i == 0 {
                cfg.api.tokens.push(token(
                    "clerk",
                    "clerk-token-0123456789",
                    &[Scope::Sell, Scope::Stock, Scope::Read],
                    Some(&["store-a"]),
                ));
                cfg.api.tokens.push(token(
                    "boss",
                    "boss-token-0123456789",
                    &[Scope::Sell, Scope::Override],
                    None,
                ));
            }
        },
    )
    .await;
    m.wait_connected(0, 1).await;
    let admin = &m.clients[0];
    let clerk = Client::new(m.node(0).http_addr, "clerk-token-0123456789");
    let boss = Client::new(m.node(0).http_addr, "boss-token-0123456789");
    // Writes at the token's own location only.
    let (s, v) = clerk
        .post("/api/receipts", receipt("r1", "store-a", &[(1, 5)]))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let (s, v) = clerk
        .post("/api/receipts", receipt("r2", "store-b", &[(1, 5)]))
        .await
        .unwrap();
    assert_eq!((s, v["error"].as_str()), (403, Some("forbidden")), "{v}");
    let (s, v) = clerk.post("/api/transfers", json!({"transfer_id": "t1", "from": "store-b", "to": "store-a", "lines": [{"product_id": 1, "quantity": 1}]})).await.unwrap();
    assert_eq!((s, v["error"].as_str()), (403, Some("forbidden")), "{v}");
    let (s, v) = clerk
        .post(
            "/api/counts/cs/lines",
            json!({"location": "store-b", "lines": [{"product_id": 1, "counted": 1}]}),
        )
        .await
        .unwrap();
    assert_eq!((s, v["error"].as_str()), (403, Some("forbidden")), "{v}");
    // Override needs the override scope (admin has it).
    let over =
        json!({"sale_id": "o1", "lines": [{"product_id": 1, "quantity": 50}], "override": true});
    let (s, v) = clerk.post("/api/sales", over.clone()).await.unwrap();
    assert_eq!((s, v["error"].as_str()), (403, Some("forbidden")), "{v}");
    let (s, v) = boss.post("/api/sales", over).await.unwrap();
    assert_eq!(s, 201, "{v}");
    // A restock return without the original sale needs override too.
    let ret = json!({"return_id": "ret1", "location": "store-a", "lines": [{"product_id": 9, "quantity": 1000, "disposition": "restock"}]});
    let (s, v) = clerk.post("/api/returns", ret.clone()).await.unwrap();
    assert_eq!((s, v["error"].as_str()), (403, Some("forbidden")), "{v}");
    assert_eq!(stock_level(admin, 9).await, None);
    let (s, v) = admin.post("/api/returns", ret).await.unwrap();
    assert_eq!(s, 201, "{v}");
    // A damaged return without a sale is fine for sell.
    let (s, v) = clerk.post("/api/returns", json!({"return_id": "ret2", "location": "store-a", "lines": [{"product_id": 9, "quantity": 1, "disposition": "damaged"}]})).await.unwrap();
    assert_eq!(s, 201, "{v}");
    // Unknown locations: 404 until declared.
    let (s, v) = admin
        .post("/api/receipts", receipt("r3", "warehouse-9", &[(1, 5)]))
        .await
        .unwrap();
    assert_eq!((s, v["error"].as_str()), (404, Some("not_found")), "{v}");
    let (s, v) = admin.post("/api/adjustments", json!({"adjustment_id": "a1", "location": "nowhere", "reason": "damaged", "lines": [{"product_id": 1, "quantity": 1}]})).await.unwrap();
    assert_eq!((s, v["error"].as_str()), (404, Some("not_found")), "{v}");
    let (s, v) = clerk
        .post("/api/locations", json!({"location": "warehouse-9"}))
        .await
        .unwrap();
    assert_eq!(s, 403, "{v}");
    let (s, v) = admin
        .post(
            "/api/locations",
            json!({"location": "warehouse-9", "timezone": "Europe/Berlin"}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["location"], "warehouse-9");
    let (s, v) = admin
        .post("/api/receipts", receipt("r3", "warehouse-9", &[(1, 5)]))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    // The declaration travels: store-b knows the location too.
    let b = &m.clients[1];
    let ok = wait_for(Duration::from_secs(10), || async {
        b.post("/api/transfers", json!({"transfer_id": "tb", "from": "store-b", "to": "warehouse-9", "lines": [{"product_id": 1, "quantity": 1}]})).await.map(|r| r.0).unwrap_or(0) == 409
    })
    .await;
    // store-b holds no stock: 409 insufficient_stock, no longer 404.
    assert!(ok.is_ok(), "store-b learns the declared location");
    // Overdrafts list no customer ids without the customers scope.
    let (s, v) = clerk.get("/api/overdrafts").await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert!(!v.to_string().contains("customer_id"), "{v}");
    m.shutdown().await;
}

/// Finding 9, the last part: `/api/overdrafts` (read scope) listed every
/// customer whose loyalty balance went below zero, with the id and the
/// balance, erased customers included. Two stores apart both redeem a
/// customer's 3 points: after they meet the balance is −3. A read token sees
/// no customer id or balance; a token with the `customers` scope sees the
/// loyalty overdraft, until the customer is erased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overdrafts_name_customers_only_with_the_customers_scope() {
    let m = Mesh::start_with(
        &[("store-a", Role::Store, S), ("store-b", Role::Store, S)],
        &[(0, 1)],
        |i, cfg| {
            if i == 0 {
                cfg.api.tokens.push(token(
                    "reader",
                    "reader-token-0123456789",
                    &[Scope::Read],
                    None,
                ));
                cfg.api.tokens.push(token(
                    "crm",
                    "crm-token-0123456789",
                    &[Scope::Read, Scope::Customers],
                    None,
                ));
            }
        },
    )
    .await;
    m.wait_connected(0, 1).await;
    let (a, b) = (&m.clients[0], &m.clients[1]);
    let reader = Client::new(m.node(0).http_addr, "reader-token-0123456789");
    let crm = Client::new(m.node(0).http_addr, "crm-token-0123456789");
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{}/api/customers/cust-9", a.base))
        .bearer_auth(&a.token)
        .json(&json!({"name": "Ada", "email": "ada@example.test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, v) = a
        .post("/api/receipts", receipt("r1", "store-a", &[(1, 10)]))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let mut body = sale("s1", Some("store-a"), &[(1, 3)]);
    body["customer_id"] = json!("cust-9");
    let (s, v) = a.post("/api/sales", body).await.unwrap();
    assert_eq!(s, 201, "{v}");
    let points = |c: &Client| {
        let c = c.clone();
        async move {
            match c.get("/api/customers/cust-9").await {
                Ok((200, v)) => v["loyalty_points"].as_i64(),
                _ => None,
            }
        }
    };
    let ok = wait_for(Duration::from_secs(10), || async {
        points(b).await == Some(3)
    })
    .await;
    assert!(ok.is_ok(), "store-b sees the 3 points");
    m.node(0).set_partitioned(true);
    wait_for(Duration::from_secs(5), || async {
        m.node(0).transport.connected().is_empty()
    })
    .await
    .unwrap();
    for (c, id) in [(a, "x-a"), (b, "x-b")] {
        let (s, v) = c
            .post(
                "/api/customers/cust-9/redeem",
                json!({"redeem_id": id, "points": 3}),
            )
            .await
            .unwrap();
        assert_eq!(s, 201, "{v}");
    }
    m.node(0).set_partitioned(false);
    let ok = wait_for(Duration::from_secs(15), || async {
        points(a).await == Some(-3)
    })
    .await;
    assert!(ok.is_ok(), "store-a sees both redemptions");
    let loyalty = |v: &Value| -> Vec<Value> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["kind"] == "loyalty")
            .cloned()
            .collect()
    };
    let (s, v) = crm.get("/api/overdrafts").await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        loyalty(&v),
        vec![json!({"kind": "loyalty", "customer_id": "cust-9", "points": -3})],
        "{v}"
    );
    let (s, v) = reader.get("/api/overdrafts").await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert!(loyalty(&v).is_empty(), "{v}");
    assert!(!v.to_string().contains("cust-9"), "{v}");
    // Erased: nobody's business any more.
    let r = http
        .delete(format!("{}/api/customers/cust-9", a.base))
        .bearer_auth(&a.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, v) = crm.get("/api/overdrafts").await.unwrap();
    assert!(!v.to_string().contains("cust-9"), "{v}");
    m.shutdown().await;
}
