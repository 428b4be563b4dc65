//! End-to-end: reservations (buy online, pick up in store) — reserve, fulfil,
//! cancel and expire, reflected on every node; only the fulfilling node acts.

use std::time::Duration;

use serde_json::{json, Value};
use storemesh_tests::*;

const S: Policy = Policy::Strict;

async fn loc(c: &Client, p: u64, l: &str) -> (i64, i64, i64) {
    let (_, v) = c
        .get(&format!("/api/inventory?product_id={p}"))
        .await
        .unwrap();
    let x = v["locations"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["location"] == l))
        .cloned()
        .unwrap_or(Value::Null);
    (
        x["on_hand"].as_i64().unwrap_or(0),
        x["reserved"].as_i64().unwrap_or(0),
        v["available"].as_i64().unwrap_or(0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_fulfil_cancel_and_expire() {
    let m = Mesh::start(
        &[("store", Role::Store, S), ("web", Role::Webshop, S)],
        &[(0, 1)],
    )
    .await;
    m.wait_connected(0, 1).await;
    let (store, web) = (&m.clients[0], &m.clients[1]);
    assert_eq!(
        store
            .post("/api/receipts", receipt("r1", "store", &[(3, 10)]))
            .await
            .unwrap()
            .0,
        201
    );
    assert_eq!(store.post("/api/grants", json!({"grant_id": "g", "product_id": 3, "location": "store", "to": "web", "quantity": 6})).await.unwrap().0, 201);
    wait_for(Duration::from_secs(5), || async {
        loc(web, 3, "store").await.2 == 6
    })
    .await
    .unwrap();
    // The web shop reserves 2 for pick-up at the store: rights move to the store, held.
    let far = "2099-01-01T00:00:00Z";
    let (s, v) = web.post("/api/reservations", json!({"reservation_id": "o1", "location": "store", "lines": [{"product_id": 3, "quantity": 2}], "fulfil_by": "store", "expires_at": far})).await.unwrap();
    assert_eq!(s, 201, "{v}");
    wait_for(Duration::from_secs(5), || async {
        loc(store, 3, "store").await == (10, 2, 4) && loc(web, 3, "store").await == (10, 2, 4)
    })
    .await
    .expect("reserved on both nodes; the store can sell 4 (its 4, not the held 2)");
    // Only the fulfilling node acts on it.
    let (s, v) = web
        .post("/api/reservations/o1/fulfil", json!({}))
        .await
        .unwrap();
    assert_eq!((s, v["error"].as_str()), (409, Some("not_owner")));
    let (s, v) = store
        .post(
            "/api/reservations/o1/fulfil",
            json!({"sale_id": "pickup-1"}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    wait_for(Duration::from_secs(5), || async {
        loc(web, 3, "store").await.0 == 8 && loc(web, 3, "store").await.1 == 0
    })
    .await
    .expect("fulfilled everywhere");
    let (s, _) = store
        .post("/api/reservations/o1/cancel", json!({}))
        .await
        .unwrap();
    assert_eq!(s, 409, "a fulfilled reservation cannot be cancelled");
    // Cancel: units back to the store's available.
    let (s, _) = web.post("/api/reservations", json!({"reservation_id": "o2", "location": "store", "lines": [{"product_id": 3, "quantity": 1}], "fulfil_by": "store", "expires_at": far})).await.unwrap();
    assert_eq!(s, 201);
    wait_for(Duration::from_secs(5), || async {
        store
            .get("/api/reservations/o2")
            .await
            .map(|r| r.0)
            .unwrap_or(0)
            == 200
    })
    .await
    .unwrap();
    assert_eq!(loc(store, 3, "store").await, (8, 1, 4));
    assert_eq!(
        store
            .post("/api/reservations/o2/cancel", json!({}))
            .await
            .unwrap()
            .0,
        201
    );
    assert_eq!(loc(store, 3, "store").await, (8, 0, 5));
    // Expiry by the fulfilling node's own clock.
    let soon = storemesh_protocol::time::format_rfc3339_ms(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            + 300,
    );
    let (s, v) = web.post("/api/reservations", json!({"reservation_id": "o3", "location": "store", "lines": [{"product_id": 3, "quantity": 1}], "fulfil_by": "store", "expires_at": soon})).await.unwrap();
    assert_eq!(s, 201, "{v}");
    wait_for(Duration::from_secs(5), || async {
        web.get("/api/reservations/o3")
            .await
            .map(|(_, v)| v["status"] == "expired")
            .unwrap_or(false)
    })
    .await
    .expect("expired by the store and seen at the web shop");
    assert_eq!(loc(store, 3, "store").await, (8, 0, 6));
    m.shutdown().await;
}
