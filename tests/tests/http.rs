//! End-to-end: the HTTP contract's errors and scopes on a real node.

use serde_json::json;
use storemesh_node::config::{Config, Scope, TokenConfig};
use storemesh_testkit::*;

async fn one_node() -> (Mesh, String) {
    let m = Mesh::start(&[("store-a", Role::Store, Policy::Strict)], &[]).await;
    // Add a sell-only token and restart so the node picks it up.
    let mut cfg = Config::load(&m.dirs[0].0).unwrap();
    cfg.api.tokens.push(TokenConfig {
        locations: None,
        name: "till".into(),
        token: "till-token-0123456789".into(),
        scopes: vec![Scope::Sell],
    });
    cfg.save(&m.dirs[0].0).unwrap();
    let mut m = m;
    m.restart(0).await;
    (m, "till-token-0123456789".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_follow_the_contract() {
    let (m, till) = one_node().await;
    let admin = &m.clients[0];
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", admin.base);
    // 401 without and with a wrong token.
    let r = http
        .post(url("/api/sales"))
        .json(&sale("s1", None, &[(1, 1)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "unauthorized");
    let r = http
        .post(url("/api/sales"))
        .bearer_auth("wrong-token-000000000")
        .json(&sale("s1", None, &[(1, 1)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // 403: a sell token cannot receive stock.
    let r = http
        .post(url("/api/receipts"))
        .bearer_auth(&till)
        .json(&receipt("r1", "store-a", &[(1, 1)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "forbidden"
    );
    // 400: bad quantities, bad product ids, malformed JSON, unknown fields.
    for body in [
        sale("s1", None, &[(1, 0)]),
        sale("s1", None, &[(1, 1_000_000_001)]),
        sale("s1", None, &[(0, 1)]),
        sale("s1", None, &[(1u64 << 53, 1)]),
        json!({"sale_id": "s1", "lines": []}),
        json!({"sale_id": "", "lines": [{"product_id": 1, "quantity": 1}]}),
        json!({"sale_id": "s1", "lines": [{"product_id": 1, "quantity": -1}]}),
        json!({"sale_id": "s1", "lines": [{"product_id": 1, "quantity": 1}], "bogus": true}),
    ] {
        let r = http
            .post(url("/api/sales"))
            .bearer_auth(&till)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"], "bad_request");
        assert!(!v["message"].as_str().unwrap().is_empty());
    }
    let r = http
        .post(url("/api/sales"))
        .bearer_auth(&till)
        .header("content-type", "application/json")
        .body("{\"sale_id\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // 413: a huge body.
    let huge = format!("{{\"sale_id\":\"x\",\"pad\":\"{}\"}}", "a".repeat(2 << 20));
    let r = http
        .post(url("/api/sales"))
        .bearer_auth(&till)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "too_large"
    );
    // 409 insufficient_stock lists every short line.
    assert_eq!(
        admin
            .post("/api/receipts", receipt("r1", "store-a", &[(1, 5), (2, 1)]))
            .await
            .unwrap()
            .0,
        201
    );
    let (s, v) = admin
        .post(
            "/api/sales",
            sale("s2", None, &[(1, 3), (2, 2), (1, 3), (3, 1)]),
        )
        .await
        .unwrap();
    assert_eq!(s, 409);
    assert_eq!(v["error"], "insufficient_stock");
    let lines = v["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 3, "{v}");
    assert!(lines
        .iter()
        .any(|l| l["product_id"] == 1 && l["requested"] == 6 && l["available"] == 5));
    assert!(lines
        .iter()
        .any(|l| l["product_id"] == 2 && l["requested"] == 2 && l["available"] == 1));
    assert!(lines
        .iter()
        .any(|l| l["product_id"] == 3 && l["available"] == 0));
    // Nothing of the refused sale was applied.
    assert_eq!(stock_level(admin, 1).await, Some(5));
    // Idempotency: replay → 200 with the same body; other body → 409 id_conflict.
    let (s1, v1) = admin
        .post("/api/sales", sale("s3", None, &[(1, 2)]))
        .await
        .unwrap();
    assert_eq!(s1, 201);
    let (s2, v2) = admin
        .post("/api/sales", sale("s3", None, &[(1, 2)]))
        .await
        .unwrap();
    assert_eq!((s2, &v2), (200, &v1));
    assert_eq!(stock_level(admin, 1).await, Some(3));
    let (s, v) = admin
        .post("/api/sales", sale("s3", None, &[(1, 1)]))
        .await
        .unwrap();
    assert_eq!((s, v["error"].as_str()), (409, Some("id_conflict")));
    // 409 not_owner for a count elsewhere; 404 for unknown products.
    let (s, v) = admin.post("/api/counts", json!({"count_id": "c1", "location": "store-z", "lines": [{"product_id": 1, "counted": 0}]})).await.unwrap();
    assert_eq!((s, v["error"].as_str()), (409, Some("not_owner")));
    let (s, _) = admin.get("/api/inventory?product_id=999").await.unwrap();
    assert_eq!(s, 404);
    // A product sold down to 0 is known: 200 with 0.
    assert_eq!(
        admin
            .post("/api/sales", sale("s4", None, &[(2, 1)]))
            .await
            .unwrap()
            .0,
        201
    );
    assert_eq!(stock_level(admin, 2).await, Some(0));
    // Healthz and metrics answer without a token.
    let r = http.get(url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(url("/metrics")).send().await.unwrap();
    let text = r.text().await.unwrap();
    assert!(text.contains("storemesh_operations_total"));
    // History bounding (issue 14): nothing cut or cooled on a fresh node.
    for line in [
        "storemesh_ledger_epochs_started_total 0\n",
        "storemesh_ledger_epochs_joined_total 0\n",
        "storemesh_records_parts_cold 0\n",
    ] {
        assert!(text.contains(line), "{line} missing from {text}");
    }
    // One line per sync message kind (nothing sent: this node has no peers).
    for kind in storemesh_protocol::sync::MSG_KINDS {
        let line = format!("storemesh_sync_bytes_out_by_kind_total{{kind=\"{kind}\"}} 0\n");
        assert!(text.contains(&line), "{line} missing from {text}");
    }
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_history_and_loyalty() {
    let m = Mesh::start(&[("store-a", Role::Store, Policy::Strict)], &[]).await;
    let c = &m.clients[0];
    let (s, _) = c
        .post("/api/receipts", receipt("r1", "store-a", &[(1, 10)]))
        .await
        .unwrap();
    assert_eq!(s, 201);
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{}/api/customers/cust-1", c.base))
        .bearer_auth(&c.token)
        .json(&json!({"name": "Ada", "email": "ada@example.test", "marketing_consent": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = sale("s1", None, &[(1, 3)]);
    body["customer_id"] = json!("cust-1");
    assert_eq!(c.post("/api/sales", body).await.unwrap().0, 201);
    let (s, v) = c.get("/api/customers/cust-1").await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(v["name"], "Ada");
    assert_eq!(v["loyalty_points"], 3);
    assert_eq!(v["purchases"].as_array().unwrap().len(), 1);
    let (s, v) = c
        .get("/api/customers?email=ADA@example.test")
        .await
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    let (s, v) = c
        .post(
            "/api/customers/cust-1/redeem",
            json!({"redeem_id": "x1", "points": 2}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["loyalty_points"], 1);
    let r = http
        .delete(format!("{}/api/customers/cust-1", c.base))
        .bearer_auth(&c.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, _) = c.get("/api/customers/cust-1").await.unwrap();
    assert_eq!(s, 404);
    m.shutdown().await;
}

/// The contract's smaller promises: money fields, the fields every write may
/// carry, errors that name the field, a complete customer profile, JSON on
/// 405, a numeric change cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_write_fields_and_error_details_follow_the_contract() {
    let (m, _) = one_node().await;
    let admin = &m.clients[0];
    let meta = json!({"occurred_at": "2026-03-01T12:00:00+01:00", "register_id": "till-3", "staff_id": "s-17"});
    let with_meta = |mut v: serde_json::Value| {
        for (k, x) in meta.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let (s, v) = admin
        .post(
            "/api/receipts",
            with_meta(receipt("r1", "store-a", &[(1, 20), (2, 5)])),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    // Money in minor units: 2 × 1000 − 100 + 190 on the line, − 50 on the sale.
    let (s, v) = admin
        .post(
            "/api/sales",
            with_meta(json!({"sale_id": "m1", "currency": "EUR", "discount": 50,
                "lines": [{"product_id": 1, "quantity": 2, "unit_price": 1000, "discount": 100, "tax": 190}]})),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let (s, v) = admin.get("/api/sales/m1").await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["total"], 2040, "{v}");
    assert_eq!(
        v["location"], "store-a",
        "a store's sale defaults to its own location: {v}"
    );
    assert_eq!(v["register_id"], "till-3", "{v}");
    // A total given by the till is kept as given.
    let (s, v) = admin
        .post(
            "/api/sales",
            json!({"sale_id": "m2", "total": 999, "tax": 10,
            "lines": [{"product_id": 1, "quantity": 1, "unit_price": 1000, "total": 989}]}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    assert_eq!(admin.get("/api/sales/m2").await.unwrap().1["total"], 999);
    // Transfers name a location the chain knows (CONTRACT v2): store-z has
    // no node, so it is declared first.
    let (s, v) = admin
        .post("/api/locations", json!({"location": "store-z"}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    // Every write takes occurred_at, register_id and staff_id.
    for (path, body) in [
        (
            "/api/counts",
            json!({"count_id": "c1", "location": "store-a", "lines": [{"product_id": 2, "counted": 5}]}),
        ),
        (
            "/api/adjustments",
            json!({"adjustment_id": "a1", "location": "store-a", "reason": "damaged", "lines": [{"product_id": 2, "quantity": 1}]}),
        ),
        (
            "/api/transfers",
            json!({"transfer_id": "t1", "from": "store-a", "to": "store-z", "lines": [{"product_id": 2, "quantity": 1}]}),
        ),
        (
            "/api/reservations",
            json!({"reservation_id": "v1", "location": "store-a", "fulfil_by": "store-a", "expires_at": "2099-01-01T00:00:00Z", "lines": [{"product_id": 1, "quantity": 1}]}),
        ),
    ] {
        let (s, v) = admin.post(path, with_meta(body)).await.unwrap();
        assert_eq!(s, 201, "{path}: {v}");
    }
    // A bad value is refused with a message that names the field.
    for (path, body, field) in [
        (
            "/api/sales",
            json!({"sale_id": "x1", "lines": [{"product_id": 1, "quantity": -1}]}),
            "lines[0].quantity",
        ),
        (
            "/api/sales",
            json!({"sale_id": 5, "lines": [{"product_id": 1, "quantity": 1}]}),
            "sale_id",
        ),
        (
            "/api/sales",
            json!({"sale_id": "x2", "override": "yes", "lines": [{"product_id": 1, "quantity": 1}]}),
            "override",
        ),
        (
            "/api/sales",
            json!({"sale_id": "x3", "lines": [{"product_id": 1, "quantity": 1, "discount": -5}]}),
            "lines[0].discount",
        ),
        (
            "/api/grants",
            json!({"grant_id": "g1", "product_id": 1, "location": "store-a", "to": "web", "quantity": 1, "occurred_at": "yesterday"}),
            "occurred_at",
        ),
        (
            "/api/receipts",
            json!({"receipt_id": "r9", "location": "store-a", "lines": [{"product_id": 1, "quantity": 1}], "occurred_at": "garbage"}),
            "occurred_at",
        ),
    ] {
        let (s, v) = admin.post(path, body.clone()).await.unwrap();
        assert_eq!(s, 400, "{path} {body}: {v}");
        let msg = v["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(field),
            "{path} {body}: {msg:?} should name {field}"
        );
    }
    // A request whose record a peer would refuse is refused here, whole.
    let big_lines: Vec<serde_json::Value> = (1..=500u64)
        .map(|p| json!({"product_id": p, "quantity": 1_000_000_000u64, "unit_price": 1_000_000_000_000i64, "discount": 1_000_000_000_000i64, "tax": 1_000_000_000_000i64, "total": 1_000_000_000_000i64}))
        .collect();
    let (s, v) = admin
        .post("/api/sales", json!({"sale_id": "huge", "lines": big_lines}))
        .await
        .unwrap();
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("too large"),
        "{v}"
    );
    let long_time = format!("2026-03-01T12:00:00.{}+01:00", "0".repeat(70_000));
    let (s, v) = admin
        .post("/api/receipts", json!({"receipt_id": "r-long", "location": "store-a", "lines": [{"product_id": 1, "quantity": 1}], "occurred_at": long_time}))
        .await
        .unwrap();
    assert_eq!(s, 400, "{v}");
    // A customer profile lists every field, set or not.
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{}/api/customers/zed", admin.base))
        .bearer_auth(&admin.token)
        .json(&json!({"name": "Zed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, v) = admin.get("/api/customers/zed").await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["name"], "Zed");
    for (k, want) in [
        ("email", json!(null)),
        ("phone", json!(null)),
        ("marketing_consent", json!(false)),
        ("tags", json!([])),
    ] {
        assert_eq!(v.get(k), Some(&want), "{k}: {v}");
    }
    // A wrong method gets a JSON error too.
    let r = http
        .delete(format!("{}/api/sales", admin.base))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "method_not_allowed"
    );
    // The change cursor is a number.
    let (s, v) = admin.get("/api/changes?cursor=0&limit=2").await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert!(v["cursor"].as_u64().is_some_and(|c| c > 0), "{v}");
    m.shutdown().await;
}
