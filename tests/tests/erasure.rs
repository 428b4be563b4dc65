//! End-to-end: erasing a customer while a node is offline; personal data never
//! comes back and is nowhere in any node's raw redb file.

use std::time::Duration;

use serde_json::json;
use storemesh_testkit::*;

const S: Policy = Policy::Strict;

async fn put(c: &Client, path: &str, body: serde_json::Value) -> u16 {
    reqwest::Client::new()
        .put(format!("{}{path}", c.base))
        .bearer_auth(&c.token)
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A sale record names its customer only by a pseudonym (`cp1:` + keyed hash).
fn assert_no_customer_id(rec: &serde_json::Value) {
    assert_eq!(rec["sale_id"], "s-77", "{rec}");
    assert!(rec.get("customer_id").is_none(), "raw customer id in {rec}");
    let p = rec["customer"].as_str().unwrap_or_default();
    assert!(p.starts_with("cp1:") && p.len() == 36, "{rec}");
    assert!(!rec.to_string().contains("c-77"), "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erased_customer_stays_erased_and_leaves_no_plaintext() {
    let mut m = Mesh::start(
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
    let email = "ada.lovelace.9f3c@example.test";
    let phone = "+44-20-7946-0958";
    assert_eq!(put(&m.clients[0], "/api/customers/c-77", json!({"name": "Ada Lovelace", "email": email, "phone": phone, "marketing_consent": true})).await, 200);
    assert_eq!(
        m.clients[0]
            .post("/api/receipts", receipt("r", "store-a", &[(1, 5)]))
            .await
            .unwrap()
            .0,
        201
    );
    let mut body = sale("s-77", None, &[(1, 1)]);
    body["customer_id"] = json!("c-77");
    assert_eq!(m.clients[0].post("/api/sales", body).await.unwrap().0, 201);
    for c in &m.clients {
        wait_for(Duration::from_secs(5), || async {
            c.get("/api/customers/c-77")
                .await
                .map(|(s, v)| s == 200 && v["email"] == email)
                .unwrap_or(false)
        })
        .await
        .expect("profile replicated");
        // While the customer exists, every node links the sale to it…
        wait_for(Duration::from_secs(5), || async {
            c.get("/api/customers/c-77")
                .await
                .map(|(_, v)| {
                    v["purchases"]
                        .as_array()
                        .is_some_and(|p| p.len() == 1 && p[0]["sale_id"] == "s-77")
                })
                .unwrap_or(false)
        })
        .await
        .expect("purchase history replicated");
        // …although the sale record holds only a keyed hash of the id.
        let (s, rec) = c.get("/api/sales/s-77").await.unwrap();
        assert_eq!(s, 200, "{rec}");
        assert_no_customer_id(&rec);
    }
    // store-b goes offline and, unaware, edits the customer.
    m.node(1).set_partitioned(true);
    wait_for(Duration::from_secs(5), || async {
        m.node(1).transport.connected().is_empty()
    })
    .await
    .unwrap();
    assert_eq!(
        put(
            &m.clients[1],
            "/api/customers/c-77",
            json!({"email": "ada.new.9f3c@example.test"})
        )
        .await,
        200
    );
    // Meanwhile the customer is erased at the web shop.
    let r = reqwest::Client::new()
        .delete(format!("{}/api/customers/c-77", m.clients[2].base))
        .bearer_auth(&m.clients[2].token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    m.node(1).set_partitioned(false);
    for (i, c) in m.clients.iter().enumerate() {
        wait_for(Duration::from_secs(10), || async {
            c.get("/api/customers/c-77")
                .await
                .map(|(s, _)| s == 404)
                .unwrap_or(false)
        })
        .await
        .unwrap_or_else(|_| panic!("node {i} still shows the erased customer"));
        let (_, v) = c
            .get(&format!("/api/customers?email={email}"))
            .await
            .unwrap();
        assert_eq!(v["items"].as_array().map(|a| a.len()), Some(0));
    }
    // The sale itself (stock) is untouched; its record names nobody any more:
    // the keyed hash in it cannot be recomputed without the erased keys.
    assert_eq!(stock_level(&m.clients[1], 1).await, Some(4));
    for c in &m.clients {
        let (s, rec) = c.get("/api/sales/s-77").await.unwrap();
        assert_eq!(s, 200, "{rec}");
        assert_no_customer_id(&rec);
    }
    // Writes to an erased customer are refused, on every node.
    assert_eq!(
        put(
            &m.clients[1],
            "/api/customers/c-77",
            json!({"name": "again"})
        )
        .await,
        404
    );
    let dirs: Vec<_> = m.dirs.iter().map(|(d, _)| d.clone()).collect();
    for i in 0..3 {
        m.stop(i).await;
    }
    for d in dirs {
        let raw = std::fs::read(d.join("storemesh.redb")).unwrap();
        // The search itself works: unencrypted data (the sale's id) is there.
        assert!(
            raw.windows(4).any(|w| w == b"s-77"),
            "sanity: sale id present in {}",
            d.display()
        );
        for needle in [email, "ada.new.9f3c", "Lovelace", phone] {
            assert!(
                !raw.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle:?} found in {}",
                d.display()
            );
        }
    }
}
