//! End-to-end: reservations (buy online, pick up in store) — reserve, fulfil,
//! cancel and expire, reflected on every node; only the fulfilling node acts.

use std::time::Duration;

use serde_json::{json, Value};
use storemesh_testkit::*;

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

async fn status(c: &Client, id: &str) -> String {
    match c.get(&format!("/api/reservations/{id}")).await {
        Ok((200, v)) => v["status"].as_str().unwrap_or("?").to_string(),
        Ok((s, _)) => format!("http {s}"),
        Err(e) => format!("error {e}"),
    }
}

fn host_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The store's clock runs 4 minutes ahead, the web shop's 4 minutes behind:
/// reserve, fulfil, cancel and expiry come out the same on both nodes, and
/// only the fulfilling node's own clock expires a reservation — a node whose
/// clock is past the expiry time leaves a reservation it does not fulfil alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clocks_minutes_apart_change_nothing() {
    const SKEW_MS: i64 = 4 * 60 * 1000;
    let m = Mesh::start_with(
        &[("store", Role::Store, S), ("web", Role::Webshop, S)],
        &[(0, 1)],
        |i, cfg| cfg.clock_offset_ms = if i == 0 { SKEW_MS } else { -SKEW_MS },
    )
    .await;
    m.wait_connected(0, 1).await;
    let (store, web) = (&m.clients[0], &m.clients[1]);
    let r = store
        .post("/api/receipts", receipt("r1", "store", &[(3, 10)]))
        .await
        .unwrap();
    assert_eq!(r.0, 201, "{}", r.1);
    let r = store.post("/api/grants", json!({"grant_id": "g", "product_id": 3, "location": "store", "to": "web", "quantity": 6})).await.unwrap();
    assert_eq!(r.0, 201, "{}", r.1);
    wait_for(Duration::from_secs(5), || async {
        loc(web, 3, "store").await.2 == 6
    })
    .await
    .expect("the grant reaches the web shop");
    let both = |id: &'static str, want: &'static str| async move {
        wait_for(Duration::from_secs(5), || async {
            status(store, id).await == want && status(web, id).await == want
        })
        .await
        .unwrap_or_else(|_| panic!("reservation {id} should be {want} on both nodes"));
    };

    // Reserve at the web shop, fulfil at the store.
    let far = "2099-01-01T00:00:00Z";
    let (s, v) = web.post("/api/reservations", json!({"reservation_id": "k1", "location": "store", "lines": [{"product_id": 3, "quantity": 2}], "fulfil_by": "store", "expires_at": far})).await.unwrap();
    assert_eq!(s, 201, "{v}");
    both("k1", "open").await;
    assert_eq!(loc(store, 3, "store").await, (10, 2, 4));
    let (s, v) = store
        .post("/api/reservations/k1/fulfil", json!({"sale_id": "k1-sale"}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    both("k1", "fulfilled").await;

    // Cancel at the store.
    let (s, v) = web.post("/api/reservations", json!({"reservation_id": "k2", "location": "store", "lines": [{"product_id": 3, "quantity": 1}], "fulfil_by": "store", "expires_at": far})).await.unwrap();
    assert_eq!(s, 201, "{v}");
    both("k2", "open").await;
    let (s, v) = store
        .post("/api/reservations/k2/cancel", json!({}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    both("k2", "cancelled").await;

    // Expiry two minutes from now (host time): the store's clock is already
    // past it, so the store expires it at once, and the web shop — whose clock
    // is six minutes short of it — shows it expired as well.
    let in_two_min = storemesh_protocol::time::format_rfc3339_ms(host_now_ms() + 120_000);
    let (s, v) = web.post("/api/reservations", json!({"reservation_id": "k3", "location": "store", "lines": [{"product_id": 3, "quantity": 1}], "fulfil_by": "store", "expires_at": in_two_min})).await.unwrap();
    assert_eq!(s, 201, "{v}");
    both("k3", "expired").await;

    // A reservation the web shop fulfils, created at the store with the same
    // expiry: the store's clock is past it, but it is not the store's to
    // expire. After the store has run further batches (a receipt there, seen
    // at the web shop), it is still open on both nodes; the web shop cancels it.
    let (s, v) = store.post("/api/reservations", json!({"reservation_id": "k4", "location": "store", "lines": [{"product_id": 3, "quantity": 1}], "fulfil_by": "web", "expires_at": in_two_min})).await.unwrap();
    assert_eq!(s, 201, "{v}");
    both("k4", "open").await;
    let r = store
        .post("/api/receipts", receipt("r2", "store", &[(4, 1)]))
        .await
        .unwrap();
    assert_eq!(r.0, 201, "{}", r.1);
    wait_for(Duration::from_secs(5), || async {
        stock_level(web, 4).await == Some(1)
    })
    .await
    .expect("the later receipt reaches the web shop");
    assert_eq!(status(store, "k4").await, "open");
    assert_eq!(status(web, "k4").await, "open");
    let (s, v) = store
        .post("/api/reservations/k4/cancel", json!({}))
        .await
        .unwrap();
    assert_eq!((s, v["error"].as_str()), (409, Some("not_owner")));
    let (s, v) = web
        .post("/api/reservations/k4/cancel", json!({}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    both("k4", "cancelled").await;

    // Stock agrees on both nodes: 10 received, 2 sold (k1), nothing held.
    for c in [store, web] {
        wait_for(Duration::from_secs(5), || async {
            let (on_hand, reserved, _) = loc(c, 3, "store").await;
            on_hand == 8 && reserved == 0
        })
        .await
        .expect("8 on hand, nothing reserved, on both nodes");
    }
    m.shutdown().await;
}
