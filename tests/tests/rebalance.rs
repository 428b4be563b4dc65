//! End-to-end: selling without overselling across the mesh — allocations,
//! offline refusals, and rebalancing grants on demand (also two hops away).

use std::time::Duration;

use serde_json::json;
use storemesh_testkit::*;

const S: Policy = Policy::Strict;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_holds_through_a_partition_and_nothing_goes_negative() {
    let _serial = timing_sensitive().await;
    let m = Mesh::start(
        &[("store", Role::Store, S), ("web", Role::Webshop, S)],
        &[(0, 1)],
    )
    .await;
    m.wait_connected(0, 1).await;
    let (store, web) = (&m.clients[0], &m.clients[1]);
    assert_eq!(
        store
            .post("/api/receipts", receipt("r1", "store", &[(1, 10)]))
            .await
            .unwrap()
            .0,
        201
    );
    let (s, _) = store.post("/api/grants", json!({"grant_id": "alloc", "product_id": 1, "location": "store", "to": "web", "quantity": 4})).await.unwrap();
    assert_eq!(s, 201);
    wait_for(Duration::from_secs(5), || async {
        web.get("/api/inventory?product_id=1")
            .await
            .map(|(_, v)| v["available"] == 4)
            .unwrap_or(false)
    })
    .await
    .expect("the web shop sees its allocation");
    m.node(0).set_partitioned(true);
    wait_for(Duration::from_secs(5), || async {
        m.node(1).transport.connected().is_empty()
    })
    .await
    .unwrap();
    let mut min_seen = i64::MAX;
    for i in 0..4 {
        assert_eq!(
            web.post("/api/sales", sale(&format!("w{i}"), None, &[(1, 1)]))
                .await
                .unwrap()
                .0,
            201
        );
        min_seen = min_seen.min(stock_level(web, 1).await.unwrap());
    }
    let (s, v) = web
        .post("/api/sales", sale("w4", None, &[(1, 1)]))
        .await
        .unwrap();
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("insufficient_stock")),
        "{v}"
    );
    for i in 0..6 {
        assert_eq!(
            store
                .post("/api/sales", sale(&format!("s{i}"), None, &[(1, 1)]))
                .await
                .unwrap()
                .0,
            201
        );
        min_seen = min_seen.min(stock_level(store, 1).await.unwrap());
    }
    let (s, _) = store
        .post("/api/sales", sale("s6", None, &[(1, 1)]))
        .await
        .unwrap();
    assert_eq!(s, 409);
    m.node(0).set_partitioned(false);
    wait_for(Duration::from_secs(10), || async {
        stock_level(store, 1).await == Some(0) && stock_level(web, 1).await == Some(0)
    })
    .await
    .expect("every node shows 0 after the heal");
    assert!(min_seen >= 0, "a node showed a negative number");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_without_rights_obtains_a_grant_also_two_hops_away() {
    let _serial = timing_sensitive().await;
    // store-a — web — store-b: store-b does not peer with store-a.
    let m = Mesh::start_with(
        &[
            ("store-a", Role::Store, S),
            ("web", Role::Webshop, S),
            ("store-b", Role::Store, S),
        ],
        &[(0, 1), (1, 2)],
        // Generous for a loaded CI machine; the default is 200 ms.
        |_, cfg| cfg.rebalance.deadline_ms = 2000,
    )
    .await;
    let c = &m.clients;
    wait_for(Duration::from_secs(10), || async {
        m.node(1).transport.connected().len() == 2
    })
    .await
    .unwrap();
    assert_eq!(
        c[0].post("/api/receipts", receipt("r1", "store-a", &[(9, 10)]))
            .await
            .unwrap()
            .0,
        201
    );
    wait_for(Duration::from_secs(5), || async {
        stock_level(&c[2], 9).await == Some(10)
    })
    .await
    .unwrap();
    // The web shop holds no rights: its sale waits for a grant from store-a.
    let t = std::time::Instant::now();
    let (s, v) = c[1]
        .post("/api/sales", sale("w1", Some("store-a"), &[(9, 2)]))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    eprintln!("one hop: sold after {:?}", t.elapsed());
    // store-b sells store-a's goods (a ship-from-store order: the location is
    // named, a store's own shelf is the default); the web shop cannot help
    // and forwards the request to store-a.
    let t = std::time::Instant::now();
    let (s, v) = c[2]
        .post("/api/sales", sale("b1", Some("store-a"), &[(9, 3)]))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["location"], "store-a");
    eprintln!("two hops: sold after {:?}", t.elapsed());
    wait_for(Duration::from_secs(5), || async {
        stock_level(&c[0], 9).await == Some(5)
    })
    .await
    .unwrap();
    // Unreachable holders: refused.
    m.node(2).set_partitioned(true);
    wait_for(Duration::from_secs(5), || async {
        m.node(2).transport.connected().is_empty()
    })
    .await
    .unwrap();
    let (s, v) = c[2]
        .post("/api/sales", sale("b2", Some("store-a"), &[(9, 1)]))
        .await
        .unwrap();
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("insufficient_stock")),
        "{v}"
    );
    m.shutdown().await;
}
