//! End-to-end: a web shop redeployed with a new identity keeps its allocation
//! after the old identity is retired; the retired identity is refused.

use std::time::Duration;

use serde_json::json;
use storemesh_testkit::*;

const S: Policy = Policy::Strict;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_web_shop_passes_its_allocation_to_the_successor() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = make_mesh(
        tmp.path(),
        &[
            ("store", Role::Store, S),
            ("web", Role::Webshop, S),
            ("web2", Role::Webshop, S),
        ],
        &[(0, 1), (0, 2)],
    )
    .unwrap();
    for (d, _) in &dirs {
        let mut cfg = storemesh_node::config::Config::load(d).unwrap();
        cfg.rebalance.deadline_ms = 0; // only the allocation is sold here
        cfg.save(d).unwrap();
    }
    let store = NodeHandle::start(&dirs[0].0).await.unwrap();
    let web = NodeHandle::start(&dirs[1].0).await.unwrap();
    let cs = Client::new(store.http_addr, &dirs[0].1);
    let cw = Client::new(web.http_addr, &dirs[1].1);
    wait_for(Duration::from_secs(10), || async {
        store.transport.connected().len() == 1
    })
    .await
    .unwrap();
    assert_eq!(
        cs.post("/api/receipts", receipt("r1", "store", &[(1, 10)]))
            .await
            .unwrap()
            .0,
        201
    );
    assert_eq!(cs.post("/api/grants", json!({"grant_id": "alloc", "product_id": 1, "location": "store", "to": "web", "quantity": 4})).await.unwrap().0, 201);
    wait_for(Duration::from_secs(5), || async {
        cw.get("/api/inventory?product_id=1")
            .await
            .map(|(_, v)| v["available"] == 4)
            .unwrap_or(false)
    })
    .await
    .unwrap();
    // The web shop is redeployed under a new identity.
    web.shutdown().await;
    let web2 = NodeHandle::start(&dirs[2].0).await.unwrap();
    let c2 = Client::new(web2.http_addr, &dirs[2].1);
    wait_for(Duration::from_secs(10), || async {
        web2.transport.connected().len() == 1
    })
    .await
    .unwrap();
    let (s, _) = c2
        .post("/api/sales", sale("x", Some("store"), &[(1, 1)]))
        .await
        .unwrap();
    assert_eq!(
        s, 409,
        "before the retirement the new identity holds nothing"
    );
    let (s, v) = cs
        .post("/api/nodes/web/retire", json!({"successor": "web2"}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    wait_for(Duration::from_secs(5), || async {
        c2.get("/api/inventory?product_id=1")
            .await
            .map(|(_, v)| v["available"] == 4)
            .unwrap_or(false)
    })
    .await
    .expect("the successor holds the allocation");
    for i in 0..4 {
        assert_eq!(
            c2.post(
                "/api/sales",
                sale(&format!("w2-{i}"), Some("store"), &[(1, 1)])
            )
            .await
            .unwrap()
            .0,
            201
        );
    }
    assert_eq!(
        c2.post("/api/sales", sale("w2-4", Some("store"), &[(1, 1)]))
            .await
            .unwrap()
            .0,
        409
    );
    // The store keeps its own 6.
    assert_eq!(
        cs.get("/api/inventory?product_id=1").await.unwrap().1["available"],
        6
    );
    // The retired identity comes back: it is refused.
    let old = start_retrying(&dirs[1].0).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        old.transport.connected().is_empty(),
        "the retired identity was let in"
    );
    assert!(!store.transport.connected().contains(&old.shared.node_id));
    old.shutdown().await;
    web2.shutdown().await;
    store.shutdown().await;
}
