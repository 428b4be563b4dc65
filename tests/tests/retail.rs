//! End-to-end: retail operations on real nodes (catalogue, transfers, counts,
//! returns, change feed, SSE, marketing segments).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use storemesh_testkit::*;

const S: Policy = Policy::Strict;

async fn put(c: &Client, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .put(format!("{}{path}", c.base))
        .bearer_auth(&c.token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

fn loc_field(v: &Value, loc: &str, field: &str) -> i64 {
    v["locations"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["location"] == loc))
        .and_then(|x| x[field].as_i64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_counts_returns_and_sales_lookup() {
    let m = Mesh::start(
        &[("store-a", Role::Store, S), ("store-b", Role::Store, S)],
        &[(0, 1)],
    )
    .await;
    m.wait_connected(0, 1).await;
    let (a, b) = (&m.clients[0], &m.clients[1]);
    // A barcode with a leading zero resolves; SKUs are unique across the chain.
    let (s, v) = put(a, "/api/products/1", json!({"sku": "MUG-01", "barcodes": ["0012345678905"], "external_ids": {"shop": "gid-77"}, "name": "Mug"})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = put(a, "/api/products/2", json!({"sku": "MUG-01"})).await;
    assert_eq!((s, v["error"].as_str()), (409, Some("sku_conflict")));
    assert_eq!(a.post("/api/receipts", json!({"receipt_id": "r1", "location": "store-a", "lines": [{"sku": "MUG-01", "quantity": 10}, {"product_id": 2, "quantity": 5}, {"product_id": 3, "quantity": 4}]})).await.unwrap().0, 201);
    let (s, v) = a.get("/api/inventory?barcode=0012345678905").await.unwrap();
    assert_eq!(
        (s, v["product_id"].as_u64(), v["stock_level"].as_i64()),
        (200, Some(1), Some(10))
    );
    let (s, _) = a.get("/api/inventory?barcode=12345678905").await.unwrap();
    assert_eq!(s, 404, "the leading zero matters");
    let (s, v) = a.get("/api/inventory?sku=MUG-01").await.unwrap();
    assert_eq!((s, v["product_id"].as_u64()), (200, Some(1)));
    // A sale line may name a SKU; GET /api/sales/{id} works on another node.
    let (s, v) = a.post("/api/sales", json!({"sale_id": "s1", "lines": [{"sku": "MUG-01", "quantity": 3, "unit_price": 500}], "currency": "EUR"})).await.unwrap();
    assert_eq!(s, 201, "{v}");
    wait_for(Duration::from_secs(5), || async {
        b.get("/api/sales/s1").await.map(|r| r.0).unwrap_or(0) == 200
    })
    .await
    .expect("sale visible at store-b");
    let (_, v) = b.get("/api/sales/s1").await.unwrap();
    assert_eq!(v["lines"][0]["product_id"], 1);
    // Over-return is refused; a return up to what was sold is fine.
    let ret = |id: &str, q: u64| json!({"return_id": id, "location": "store-a", "original_sale_id": "s1", "lines": [{"product_id": 1, "quantity": q, "disposition": "restock"}]});
    assert_eq!(a.post("/api/returns", ret("ret1", 2)).await.unwrap().0, 201);
    let (s, v) = a.post("/api/returns", ret("ret2", 2)).await.unwrap();
    assert_eq!((s, v["error"].as_str()), (409, Some("over_return")), "{v}");
    assert_eq!(stock_level(a, 1).await, Some(9));
    // Adjustments with a reason, listed per location.
    let (s, v) = a.post("/api/adjustments", json!({"adjustment_id": "adj1", "location": "store-a", "reason": "damaged", "lines": [{"product_id": 2, "quantity": 1}]})).await.unwrap();
    assert_eq!(s, 201, "{v}");
    let (_, v) = a.get("/api/adjustments?location=store-a").await.unwrap();
    assert_eq!(v["items"][0]["reason"], "damaged");
    assert_eq!(stock_level(a, 2).await, Some(4));
    // A full count zeroes every product of the location that was not counted.
    let (s, v) = a.post("/api/counts", json!({"count_id": "c1", "location": "store-a", "scope": "full", "lines": [{"product_id": 1, "counted": 8}]})).await.unwrap();
    assert_eq!(s, 201, "{v}");
    assert_eq!(stock_level(a, 1).await, Some(8));
    assert_eq!(stock_level(a, 2).await, Some(0));
    assert_eq!(stock_level(a, 3).await, Some(0));
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_between_partitioned_stores() {
    let m = Mesh::start(
        &[("store-a", Role::Store, S), ("store-b", Role::Store, S)],
        &[(0, 1)],
    )
    .await;
    m.wait_connected(0, 1).await;
    let (a, b) = (&m.clients[0], &m.clients[1]);
    assert_eq!(
        a.post("/api/receipts", receipt("r1", "store-a", &[(5, 20)]))
            .await
            .unwrap()
            .0,
        201
    );
    m.node(0).set_partitioned(true);
    wait_for(Duration::from_secs(5), || async {
        m.node(0).transport.connected().is_empty()
    })
    .await
    .unwrap();
    let (s, v) = a.post("/api/transfers", json!({"transfer_id": "t1", "from": "store-a", "to": "store-b", "lines": [{"product_id": 5, "quantity": 6}]})).await.unwrap();
    assert_eq!(s, 201, "{v}");
    let (_, v) = a.get("/api/inventory?product_id=5").await.unwrap();
    assert_eq!(loc_field(&v, "store-a", "on_hand"), 14);
    assert_eq!(loc_field(&v, "store-b", "incoming"), 6);
    // store-b does not know the transfer yet.
    assert_eq!(
        b.post(
            "/api/transfers/t1/receive",
            json!({"lines": [{"product_id": 5, "quantity": 5}]})
        )
        .await
        .unwrap()
        .0,
        404
    );
    m.node(0).set_partitioned(false);
    wait_for(Duration::from_secs(10), || async {
        let (_, v) = b.get("/api/inventory?product_id=5").await.unwrap();
        loc_field(&v, "store-b", "incoming") == 6
    })
    .await
    .expect("store-b sees the transfer as incoming after the heal");
    // Short delivery: 5 of 6 arrive; the missing one is shrinkage.
    let (s, v) = b
        .post(
            "/api/transfers/t1/receive",
            json!({"lines": [{"product_id": 5, "quantity": 5}]}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["lines"][0]["shrinkage"], 1);
    wait_for(Duration::from_secs(10), || async {
        let (_, v) = a.get("/api/inventory?product_id=5").await.unwrap();
        loc_field(&v, "store-b", "on_hand") == 5
            && loc_field(&v, "store-b", "incoming") == 0
            && v["stock_level"] == 19
    })
    .await
    .expect("both nodes agree after the receipt");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_feed_follows_concurrent_sales_and_a_late_merge() {
    let m = Mesh::start(
        &[
            ("store-a", Role::Store, S),
            ("store-b", Role::Store, S),
            ("web", Role::Webshop, S),
        ],
        &[(0, 1), (0, 2), (1, 2)],
    )
    .await;
    for i in 0..3 {
        m.wait_connected(i, 2).await;
    }
    let products: Vec<u64> = (1..=8).collect();
    let lines: Vec<(u64, u64)> = products.iter().map(|p| (*p, 40)).collect();
    assert_eq!(
        m.clients[0]
            .post("/api/receipts", receipt("ra", "store-a", &lines))
            .await
            .unwrap()
            .0,
        201
    );
    assert_eq!(
        m.clients[1]
            .post("/api/receipts", receipt("rb", "store-b", &lines))
            .await
            .unwrap()
            .0,
        201
    );
    // The consumer follows the web shop's feed.
    let feed = m.clients[2].clone();
    let follower = tokio::spawn(async move {
        let mut cursor = "0".to_string();
        let mut latest: BTreeMap<(u64, String), i64> = BTreeMap::new();
        let mut seen = 0usize;
        let mut quiet = 0;
        while quiet < 60 {
            let (_, v) = feed
                .get(&format!("/api/changes?cursor={cursor}&limit=7"))
                .await
                .unwrap();
            let items = v["items"].as_array().cloned().unwrap_or_default();
            if items.is_empty() {
                quiet += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            } else {
                quiet = 0;
            }
            for it in items {
                seen += 1;
                latest.insert(
                    (
                        it["product_id"].as_u64().unwrap(),
                        it["location"].as_str().unwrap().to_string(),
                    ),
                    it["on_hand"].as_i64().unwrap(),
                );
            }
            cursor = v["cursor"]
                .as_u64()
                .expect("cursor is a number")
                .to_string();
        }
        (latest, seen)
    });
    // store-b is partitioned while everyone sells.
    m.node(1).set_partitioned(true);
    wait_for(Duration::from_secs(5), || async {
        m.node(1).transport.connected().is_empty()
    })
    .await
    .unwrap();
    for i in 0..24u64 {
        let p = 1 + i % 8;
        assert_eq!(
            m.clients[0]
                .post("/api/sales", sale(&format!("a{i}"), None, &[(p, 1)]))
                .await
                .unwrap()
                .0,
            201
        );
        assert_eq!(
            m.clients[1]
                .post("/api/sales", sale(&format!("b{i}"), None, &[(p, 1)]))
                .await
                .unwrap()
                .0,
            201
        );
    }
    m.node(1).set_partitioned(false);
    converge(&m.clients, &products, Duration::from_secs(10))
        .await
        .unwrap();
    let (latest, seen) = follower.await.unwrap();
    let truth = m.clients[2].stock(&products).await.unwrap();
    assert_eq!(truth.len(), 16);
    for (p, l, q) in &truth {
        assert_eq!(
            latest.get(&(*p, l.clone())),
            Some(q),
            "feed's final value of {p}@{l}"
        );
    }
    assert!(seen >= 16);
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_stream_pushes_live_updates() {
    let m = Mesh::start(&[("store-a", Role::Store, S)], &[]).await;
    let c = &m.clients[0];
    let mut resp = reqwest::Client::new()
        .get(format!("{}/api/inventory/stream", c.base))
        .bearer_auth(&c.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(
        c.post("/api/receipts", receipt("r1", "store-a", &[(42, 7)]))
            .await
            .unwrap()
            .0,
        201
    );
    let mut buf = String::new();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(chunk) = resp.chunk().await.unwrap() {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            if buf.contains("\"product_id\":42") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(got, Ok(true), "received: {buf}");
    assert!(buf.contains("event: change"));
    assert!(buf.contains("\"on_hand\":7"));
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marketing_segment_lists_consenting_non_erased_buyers() {
    let m = Mesh::start(
        &[
            ("store-a", Role::Store, S),
            ("store-b", Role::Store, S),
            ("web", Role::Webshop, S),
        ],
        &[(0, 1), (0, 2), (1, 2)],
    )
    .await;
    for i in 0..3 {
        m.wait_connected(i, 2).await;
    }
    for (i, loc) in [(0usize, "store-a"), (1, "store-b")] {
        assert_eq!(
            m.clients[i]
                .post("/api/receipts", receipt(&format!("r{i}"), loc, &[(77, 10)]))
                .await
                .unwrap()
                .0,
            201
        );
    }
    let customers = [
        ("ann", true, 0usize),
        ("bob", false, 1),
        ("cat", true, 1),
        ("dan", true, 0),
    ];
    for (c, consent, node) in customers {
        let (s, v) = put(
            &m.clients[node],
            &format!("/api/customers/{c}"),
            json!({"name": c, "email": format!("{c}@example.test"), "marketing_consent": consent}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let mut body = sale(&format!("sale-{c}"), None, &[(77, 1)]);
        body["customer_id"] = json!(c);
        assert_eq!(
            m.clients[node].post("/api/sales", body).await.unwrap().0,
            201
        );
    }
    // dan is erased.
    let r = reqwest::Client::new()
        .delete(format!("{}/api/customers/dan", m.clients[0].base))
        .bearer_auth(&m.clients[0].token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let web = &m.clients[2];
    let ok = wait_for(Duration::from_secs(10), || async {
        let (s, v) = web.get("/api/customers/segment?bought=77&since=2020-01-01T00:00:00Z&marketing_consent=true").await.unwrap();
        let ids: Vec<&str> = v["items"].as_array().map(|a| a.iter().filter_map(|i| i["customer_id"].as_str()).collect()).unwrap_or_default();
        s == 200 && ids == ["ann", "cat"]
    })
    .await;
    let (_, v) = web
        .get("/api/customers/segment?bought=77&since=2020-01-01T00:00:00Z")
        .await
        .unwrap();
    assert!(ok.is_ok(), "segment at the web shop: {v}");
    assert_eq!(v["items"][0]["email"], "ann@example.test");
    // An admin (this token) without `marketing_consent=true` sees every
    // buyer that is not erased, consenting or not (CONTRACT.md).
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["customer_id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(ids(&v), ["ann", "bob", "cat"], "{v}");
    // Restricted to one location (store-b sold to bob and cat).
    let (_, v) = web
        .get("/api/customers/segment?bought=77&location=store-b&marketing_consent=true")
        .await
        .unwrap();
    assert_eq!(ids(&v), ["cat"], "{v}");
    // Anything but true/false/any is refused, never read as "everyone".
    let (s, v) = web
        .get("/api/customers/segment?bought=77&marketing_consent=yes")
        .await
        .unwrap();
    assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")), "{v}");
    m.shutdown().await;
}
