//! What openapi.yaml promises about the change feed, on a real node:
//! `limit` is clamped to 1-1000 (never a 400 for an integer), a cursor above
//! 2^63 - 1 is a 400, and the SSE stream ends after `idle_timeout_s`.

use std::time::{Duration, Instant};

use storemesh_testkit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_feed_limits_and_stream_idle_timeout_are_as_documented() {
    let mesh = Mesh::start(&[("store-1", Role::Store, Policy::Strict)], &[]).await;
    let c = mesh.clients[0].clone();
    let lines: Vec<(u64, u64)> = (1..=3).map(|p| (p, 5)).collect();
    let (s, v) = c
        .post("/api/receipts", receipt("r-1", "store-1", &lines))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    for (q, want_items) in [
        ("limit=-5", 1),
        ("limit=0", 1),
        ("limit=2", 2),
        ("limit=99999999999999999999999", 3),
        ("limit=1000000", 3),
    ] {
        let (s, v) = c.get(&format!("/api/changes?{q}")).await.unwrap();
        assert_eq!(s, 200, "{q}: {v}");
        assert_eq!(v["items"].as_array().unwrap().len(), want_items, "{q}: {v}");
    }
    for q in [
        "limit=abc",
        "cursor=9223372036854775808",
        "cursor=-1",
        "cursor=x",
    ] {
        let (s, v) = c.get(&format!("/api/changes?{q}")).await.unwrap();
        assert_eq!(s, 400, "{q}: {v}");
        assert_eq!(v["error"], "bad_request");
    }
    // Every parameter of GET /api/inventory is checked, even one the
    // product_id form does not use.
    for q in [
        "product_id=1&after=-1",
        "product_id=1&product_ids=0",
        "product_id=1&sku=",
        "product_id=1&limit=x",
    ] {
        let (s, v) = c.get(&format!("/api/inventory?{q}")).await.unwrap();
        assert_eq!(s, 400, "{q}: {v}");
    }
    let (s, _) = c.get("/api/inventory?product_id=1&after=5").await.unwrap();
    assert_eq!(s, 200);
    let (s, _) = c
        .get("/api/changes?cursor=9223372036854775807")
        .await
        .unwrap();
    assert_eq!(s, 200);
    // The stream ends by itself after idle_timeout_s without changes.
    let http = reqwest::Client::new();
    for q in [
        "idle_timeout_s=0",
        "idle_timeout_s=3601",
        "cursor=9223372036854775808",
    ] {
        let r = http
            .get(format!("{}/api/inventory/stream?{q}", c.base))
            .bearer_auth(&c.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{q}");
    }
    let t = Instant::now();
    let r = http
        .get(format!(
            "{}/api/inventory/stream?idle_timeout_s=1&cursor=0",
            c.base
        ))
        .bearer_auth(&c.token)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.expect("the stream ends cleanly");
    let took = t.elapsed();
    assert_eq!(body.matches("event: change").count(), 3, "{body}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "ended after {took:?}"
    );
    mesh.shutdown().await;
}
