//! Webhooks end to end: a real node POSTs to a real HTTP receiver (axum on
//! loopback) that is first absent (connection refused), then failing (500),
//! then up. Every event arrives at least once, in order, correctly signed;
//! after a restart the node resumes from its persisted cursor.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::Mac;
use serde_json::{json, Value};
use storemesh_node::config::{EventKind, WebhookConfig};
use storemesh_testkit::*;

const SECRET: &str = "erp-shared-secret-42";

#[derive(Default)]
struct Receiver {
    up: AtomicBool,
    /// Accepted batches (body, signature header), in arrival order.
    got: Mutex<Vec<(Vec<u8>, String)>>,
    refused: Mutex<u64>,
    /// Batches of the sales-only webhook "mkt" (body, signature).
    mkt: Mutex<Vec<(Vec<u8>, String)>>,
}

async fn mkt_hook(State(rx): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if !rx.up.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let sig = headers
        .get("x-storemesh-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    rx.mkt.lock().unwrap().push((body.to_vec(), sig));
    StatusCode::OK
}

async fn hook(State(rx): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if !rx.up.load(Ordering::SeqCst) {
        *rx.refused.lock().unwrap() += 1;
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let sig = headers
        .get("x-storemesh-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    rx.got.lock().unwrap().push((body.to_vec(), sig));
    StatusCode::NO_CONTENT
}

async fn start_receiver(port: u16, rx: Arc<Receiver>) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("receiver port free");
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .route("/mkt", axum::routing::post(mkt_hook))
        .with_state(rx);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

fn verify(body: &[u8], sig: &str) -> bool {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    sig == format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Every item delivered so far (batch cursor, item), after checking each
/// batch's signature and shape.
fn delivered(rx: &Receiver) -> Vec<(u64, Value)> {
    let got = rx.got.lock().unwrap();
    let mut out = Vec::new();
    for (body, sig) in got.iter() {
        assert!(verify(body, sig), "bad signature {sig}");
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["webhook"], "erp");
        let cursor = v["cursor"].as_u64().expect("batch cursor");
        let items = v["items"].as_array().expect("items");
        assert!(!items.is_empty());
        for it in items {
            assert!(it["cursor"].as_u64().unwrap() <= cursor);
            out.push((cursor, it.clone()));
        }
    }
    out
}

async fn webhooks_status(c: &Client) -> Value {
    let (s, v) = c.get("/api/webhooks").await.unwrap();
    assert_eq!(s, 200, "{v}");
    v["items"][0].clone()
}

fn has_sale(items: &[(u64, Value)], id: &str) -> bool {
    items
        .iter()
        .any(|(_, it)| it["event"] == "sales" && it["sale_id"] == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_delivers_every_event_in_order_signed_through_outages_and_restarts() {
    let port = storemesh_node::demo::free_port().unwrap();
    let url = format!("http://127.0.0.1:{port}/hook");
    let mut mesh = Mesh::start_with(
        &[("store-1", Role::Store, Policy::Strict)],
        &[],
        |_, cfg| {
            cfg.webhooks.push(WebhookConfig {
                name: "erp".into(),
                url: url.clone(),
                secret: SECRET.into(),
                events: vec![EventKind::Stock, EventKind::Sales, EventKind::Alarms],
            });
            cfg.webhooks.push(WebhookConfig {
                name: "mkt".into(),
                url: url.replace("/hook", "/mkt"),
                secret: SECRET.into(),
                events: vec![EventKind::Sales],
            });
        },
    )
    .await;
    let c = mesh.clients[0].clone();

    // Phase 1: nothing listens on the receiver's port (connection refused).
    let (s, v) = c
        .post(
            "/api/receipts",
            receipt("r-1", "store-1", &[(1, 10), (2, 4)]),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    for i in 1..=3 {
        let (s, v) = c
            .post("/api/sales", sale(&format!("s-{i}"), None, &[(1, 2)]))
            .await
            .unwrap();
        assert_eq!(s, 201, "{v}");
    }
    wait_for(Duration::from_secs(10), || async {
        let w = webhooks_status(&c).await;
        w["last_error"].is_string() && w["lag"].as_u64().unwrap_or(0) > 0
    })
    .await
    .expect("the refused delivery shows as last_error with a lag");
    let w = webhooks_status(&c).await;
    assert_eq!(w["name"], "erp");
    assert_eq!(w["cursor"], 0);

    // Phase 2: the receiver answers 500 for a while.
    let rx = Arc::new(Receiver::default());
    let server = start_receiver(port, rx.clone()).await;
    wait_for(Duration::from_secs(15), || async {
        *rx.refused.lock().unwrap() >= 1
    })
    .await
    .expect("the node retried against the failing receiver");
    let w = webhooks_status(&c).await;
    assert!(
        w["last_error"].as_str().unwrap_or("").contains("500"),
        "{w}"
    );
    assert!(rx.got.lock().unwrap().is_empty());

    // Phase 3: up. Everything arrives, in order, signed.
    rx.up.store(true, Ordering::SeqCst);
    wait_for(Duration::from_secs(40), || async {
        let items = delivered(&rx);
        (1..=3).all(|i| has_sale(&items, &format!("s-{i}")))
    })
    .await
    .expect("every sale delivered once the receiver is up");
    wait_for(Duration::from_secs(10), || async {
        webhooks_status(&c).await["lag"] == 0
    })
    .await
    .expect("lag back to 0");
    let w = webhooks_status(&c).await;
    assert!(w["last_error"].is_null(), "{w}");
    let items = delivered(&rx);
    // Cursors only grow: batches and items are in journal order.
    let cursors: Vec<u64> = items
        .iter()
        .map(|(_, it)| it["cursor"].as_u64().unwrap())
        .collect();
    assert!(
        cursors.windows(2).all(|w| w[0] < w[1]),
        "out of order: {cursors:?}"
    );
    assert_eq!(w["cursor"].as_u64().unwrap(), items.last().unwrap().0);
    // The latest stock item per product equals what the API says.
    for p in [1u64, 2] {
        let last = items
            .iter()
            .rev()
            .find(|(_, it)| it["event"] == "stock" && it["product_id"] == p)
            .unwrap_or_else(|| panic!("no stock event for product {p}"));
        let (_, inv) = c
            .get(&format!("/api/inventory?product_id={p}&location=store-1"))
            .await
            .unwrap();
        assert_eq!(last.1["on_hand"], inv["stock_level"], "product {p}");
        assert_eq!(last.1["location"], "store-1");
    }
    // Sale items carry the sale record.
    let s1 = items
        .iter()
        .find(|(_, it)| it["event"] == "sales" && it["sale_id"] == "s-1")
        .unwrap();
    assert!(s1.1["sale"].is_object(), "{}", s1.1);
    // Lag and cursor are in /metrics too.
    let m = reqwest::get(format!("{}/metrics", c.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("storemesh_webhook_lag{webhook=\"erp\"} 0"),
        "{m}"
    );
    let acked = w["cursor"].as_u64().unwrap();

    // Restart: events made while the receiver is down again are delivered after
    // the node restarts, from the persisted cursor (nothing before it again).
    rx.up.store(false, Ordering::SeqCst);
    for i in 4..=5 {
        let (s, v) = c
            .post("/api/sales", sale(&format!("s-{i}"), None, &[(2, 1)]))
            .await
            .unwrap();
        assert_eq!(s, 201, "{v}");
    }
    mesh.restart(0).await;
    let c = mesh.clients[0].clone();
    let w = webhooks_status(&c).await;
    assert_eq!(w["cursor"].as_u64().unwrap(), acked, "{w}");
    let before = rx.got.lock().unwrap().len();
    rx.up.store(true, Ordering::SeqCst);
    wait_for(Duration::from_secs(40), || async {
        let items = delivered(&rx);
        has_sale(&items, "s-4") && has_sale(&items, "s-5")
    })
    .await
    .expect("sales made before the restart delivered after it");
    let items = delivered(&rx);
    let after: Vec<u64> = rx.got.lock().unwrap()[before..]
        .iter()
        .flat_map(|(b, _)| {
            let v: Value = serde_json::from_slice(b).unwrap();
            v["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|it| it["cursor"].as_u64().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        after.iter().all(|c| *c > acked),
        "resumed from {acked}, got {after:?}"
    );
    // Every sale exactly as made, and the stock after them.
    for i in 1..=5 {
        assert!(has_sale(&items, &format!("s-{i}")), "s-{i} missing");
    }
    let (_, inv) = c.get("/api/inventory?product_id=2").await.unwrap();
    let last2 = items
        .iter()
        .rev()
        .find(|(_, it)| it["event"] == "stock" && it["product_id"] == 2)
        .unwrap();
    assert_eq!(last2.1["on_hand"], inv["stock_level"]);
    assert_eq!(inv["stock_level"], json!(2));
    // The sales-only webhook got exactly the sales, signed, in order.
    wait_for(Duration::from_secs(20), || async {
        rx.mkt
            .lock()
            .unwrap()
            .iter()
            .map(|(b, _)| {
                let v: Value = serde_json::from_slice(b).unwrap();
                v["items"].as_array().unwrap().len()
            })
            .sum::<usize>()
            >= 5
    })
    .await
    .expect("the sales-only webhook got every sale");
    let mut sale_ids = Vec::new();
    let mut last_cursor = 0;
    for (b, sig) in rx.mkt.lock().unwrap().iter() {
        assert!(verify(b, sig));
        let v: Value = serde_json::from_slice(b).unwrap();
        assert_eq!(v["webhook"], "mkt");
        for it in v["items"].as_array().unwrap() {
            assert_eq!(it["event"], "sales", "{it}");
            let c = it["cursor"].as_u64().unwrap();
            assert!(c > last_cursor || sale_ids.contains(&it["sale_id"]), "{it}");
            last_cursor = last_cursor.max(c);
            if !sale_ids.contains(&it["sale_id"]) {
                sale_ids.push(it["sale_id"].clone());
            }
        }
    }
    assert_eq!(sale_ids.len(), 5, "{sale_ids:?}");
    // Latency with the receiver up: a sale reaches it within a poll period.
    let t = std::time::Instant::now();
    let (s, v) = c
        .post("/api/sales", sale("s-6", None, &[(2, 1)]))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    wait_for(Duration::from_secs(5), || async {
        has_sale(&delivered(&rx), "s-6")
    })
    .await
    .expect("a sale delivered within 5 s");
    eprintln!(
        "webhook: sale delivered {} ms after its 201",
        t.elapsed().as_millis()
    );
    if std::env::var("WEBHOOK_DUMP").is_ok() {
        for (b, _) in rx.got.lock().unwrap().iter() {
            eprintln!("{}", String::from_utf8_lossy(b));
        }
    }
    server.abort();
    mesh.shutdown().await;
}
