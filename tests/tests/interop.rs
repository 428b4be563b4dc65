//! Interop: every document a node exports (`GET /api/documents/{id}`) loads in
//! the JavaScript Automerge (`@automerge/automerge` from npm), and the stock
//! summed from the loaded ledger documents equals what the API reports.
//!
//! Needs Node.js and npm; without them the test says so and passes without
//! running. The npm package is installed once into tests/interop/node_modules.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use storemesh_testkit::*;

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Installs @automerge/automerge into tests/interop (once); Err with npm's text.
fn npm_install(dir: &Path) -> Result<(), String> {
    if dir
        .join("node_modules/@automerge/automerge/package.json")
        .is_file()
    {
        return Ok(());
    }
    let out = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--silent"])
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_documents_load_in_js_automerge_and_their_stock_matches_the_api() {
    if on_path("node").is_none() || on_path("npm").is_none() {
        eprintln!("SKIPPED automerge interop test: node and npm not found on PATH");
        return;
    }
    let interop = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop");
    if let Err(e) = npm_install(&interop) {
        eprintln!("SKIPPED automerge interop test: npm install @automerge/automerge failed: {e}");
        return;
    }
    let mesh = Mesh::start(
        &[
            ("store-1", Role::Store, Policy::Strict),
            ("web", Role::Webshop, Policy::Strict),
        ],
        &[(0, 1)],
    )
    .await;
    mesh.wait_connected(0, 1).await;
    let (a, w) = (mesh.clients[0].clone(), mesh.clients[1].clone());
    let lines: Vec<(u64, u64)> = (1..=40).map(|p| (p, 10 + p)).collect();
    let (s, v) = a
        .post("/api/receipts", receipt("r-1", "store-1", &lines))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let (s, v) = w
        .post("/api/receipts", receipt("r-2", "web", &[(1, 7), (2, 9)]))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    for i in 0..20u64 {
        let (s, v) = a
            .post(
                "/api/sales",
                sale(&format!("s-{i}"), None, &[(1 + i % 5, 1)]),
            )
            .await
            .unwrap();
        assert_eq!(s, 201, "{v}");
    }
    // Rights handed to the web shop, which then sells at store-1 (its own actor's cells).
    let (s, v) = a
        .post("/api/grants", json!({"grant_id": "g-1", "product_id": 3, "location": "store-1", "to": "web", "quantity": 4}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let (s, v) = a
        .post("/api/adjustments", json!({"adjustment_id": "adj-1", "location": "store-1", "reason": "damaged", "lines": [{"product_id": 4, "quantity": 2}]}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    converge(
        &mesh.clients,
        &[1, 2, 3, 4],
        std::time::Duration::from_secs(15),
    )
    .await
    .expect("converged");
    let (s, v) = w
        .post("/api/sales", json!({"sale_id": "w-1", "location": "store-1", "lines": [{"product_id": 3, "quantity": 2}]}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");

    // Export every document of the store node.
    let (s, docs) = a.get("/api/documents").await.unwrap();
    assert_eq!(s, 200, "{docs}");
    let tmp = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let mut manifest = Vec::new();
    let ids: Vec<String> = docs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.iter().any(|i| i.starts_with("ledger/")), "{ids:?}");
    for (i, id) in ids.iter().enumerate() {
        let r = http
            .get(format!("{}/api/documents/{id}", a.base))
            .bearer_auth(&a.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{id}");
        let bytes = r.bytes().await.unwrap();
        let file = format!("doc-{i}.automerge");
        std::fs::write(tmp.path().join(&file), &bytes).unwrap();
        manifest.push(json!({"id": id, "file": file}));
    }
    std::fs::write(
        tmp.path().join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let out = Command::new("node")
        .arg(interop.join("check.mjs"))
        .arg(tmp.path())
        .output()
        .expect("node runs");
    assert!(
        out.status.success(),
        "node check.mjs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).expect("check.mjs JSON");
    assert_eq!(got["loaded"], ids.len(), "every exported document loads");

    // The API's on_hand per (location, product) equals the documents' sums.
    let mut compared = 0;
    for loc in ["store-1", "web"] {
        let (s, page) = a
            .get(&format!("/api/inventory?location={loc}&limit=1000"))
            .await
            .unwrap();
        assert_eq!(s, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(!items.is_empty(), "{loc}");
        for it in items {
            let p = it["product_id"].as_u64().unwrap().to_string();
            let js = got["stock"][loc][&p].as_i64();
            assert_eq!(
                js,
                it["stock_level"].as_i64(),
                "{loc} product {p}: JS {js:?}, API {it}"
            );
            compared += 1;
        }
        let js_count = got["stock"][loc].as_object().map(|m| m.len()).unwrap_or(0);
        assert_eq!(
            js_count,
            items.len(),
            "{loc}: products in the documents vs the API"
        );
    }
    assert!(compared >= 42, "compared {compared} rows");
    eprintln!(
        "interop: {} documents loaded in @automerge/automerge, {compared} stock rows equal",
        ids.len()
    );
    mesh.shutdown().await;
}
