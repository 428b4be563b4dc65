//! End-to-end with real processes: SIGKILL in the middle of a stream of sales,
//! graceful shutdown on SIGTERM.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use storemesh_testkit::KillOnDrop as Node;

const BIN: &str = env!("CARGO_BIN_EXE_storemesh");

fn free_port() -> u16 {
    storemesh_node::demo::free_port().expect("free port")
}

fn init(dir: &Path, name: &str, quic: u16, http: u16, token: &str) -> String {
    let out = Command::new(BIN)
        .args(["init", "--data-dir"])
        .arg(dir)
        .args([
            "--name",
            name,
            "--quic-addr",
            &format!("127.0.0.1:{quic}"),
            "--http-addr",
            &format!("127.0.0.1:{http}"),
            "--api-token",
            token,
        ])
        .output()
        .expect("init runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["id", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

fn peer_add(dir: &Path, name: &str, id: &str, quic: u16) {
    let out = Command::new(BIN)
        .args(["peer", "add", "--data-dir"])
        .arg(dir)
        .args([
            "--name",
            name,
            "--id",
            id,
            "--addr",
            &format!("127.0.0.1:{quic}"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run(dir: &Path) -> Node {
    Node(
        Command::new(BIN)
            .args(["run", "--data-dir"])
            .arg(dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node starts"),
    )
}

async fn wait_healthy(http: &reqwest::Client, port: u16) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
        {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("node on {port} did not become healthy");
}

async fn stock(http: &reqwest::Client, port: u16, p: u64) -> Option<i64> {
    let r = http
        .get(format!(
            "http://127.0.0.1:{port}/api/inventory?product_id={p}"
        ))
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    r.json::<Value>().await.ok()?["stock_level"].as_i64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acknowledged_sale() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (qa, ha, qb, hb) = (free_port(), free_port(), free_port(), free_port());
    let token = "process-test-token-0001";
    let ida = init(&a, "store-a", qa, ha, token);
    let idb = init(&b, "web", qb, hb, token);
    peer_add(&a, "web", &idb, qb);
    peer_add(&b, "store-a", &ida, qa);
    let mut pa = run(&a);
    let mut pb = run(&b);
    let http = reqwest::Client::new();
    wait_healthy(&http, ha).await;
    wait_healthy(&http, hb).await;
    let base = format!("http://127.0.0.1:{ha}");
    let r = http
        .post(format!("{base}/api/receipts"))
        .bearer_auth(token)
        .json(&json!({"receipt_id": "r1", "location": "store-a", "lines": [{"product_id": 1, "quantity": 100000}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // Eight concurrent tills post sales; the node is killed while they are in flight.
    let mut tills = Vec::new();
    // Acknowledgements received so far, by all tills.
    let acks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for t in 0..8 {
        let http = http.clone();
        let base = base.clone();
        let acks = acks.clone();
        tills.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0.. {
                let id = format!("till{t}-{i}");
                let r = http
                    .post(format!("{base}/api/sales"))
                    .bearer_auth(token)
                    .json(&json!({"sale_id": id, "lines": [{"product_id": 1, "quantity": 1}]}))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 201 => {
                        acked.push((id, r.json::<Value>().await.unwrap_or(Value::Null)));
                        acks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    _ => break,
                }
            }
            acked
        }));
    }
    // Let a few hundred sales be acknowledged, then SIGKILL. (Waiting on
    // the stock level instead raced: a sale is in the read view once
    // committed, a moment before its answer reaches the till.)
    let t = Instant::now();
    while acks.load(std::sync::atomic::Ordering::SeqCst) < 300
        && t.elapsed() < Duration::from_secs(20)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pa.0.kill().expect("SIGKILL");
    pa.0.wait().unwrap();
    let mut acked = Vec::new();
    for t in tills {
        acked.extend(t.await.unwrap());
    }
    assert!(
        acked.len() >= 300,
        "only {} sales were acknowledged",
        acked.len()
    );
    // Restart: every acknowledged sale is there (a replay returns 200 with the first answer's sale_id).
    let mut pa = run(&a);
    wait_healthy(&http, ha).await;
    for (id, _) in &acked {
        let r = http
            .get(format!("{base}/api/sales/{id}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged sale {id} lost");
        let r = http
            .post(format!("{base}/api/sales"))
            .bearer_auth(token)
            .json(&json!({"sale_id": id, "lines": [{"product_id": 1, "quantity": 1}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "replay of {id}");
    }
    let after = stock(&http, ha, 1).await.unwrap();
    assert!(
        after <= 100000 - acked.len() as i64,
        "stock {after} does not reflect {} acknowledged sales",
        acked.len()
    );
    // The mesh converges.
    let t = Instant::now();
    while stock(&http, hb, 1).await != Some(after) {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "web shop did not converge"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Graceful shutdown: SIGTERM → exit 0.
    for p in [&mut pa, &mut pb] {
        let t = Instant::now();
        unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
        let status = p.0.wait().unwrap();
        assert!(status.success(), "exit status {status:?}");
        assert!(t.elapsed() < Duration::from_secs(15));
    }
}
