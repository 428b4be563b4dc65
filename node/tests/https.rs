//! HTTPS for the API, as a new user sets it up: `storemesh init --https`,
//! `storemesh run`, then a real HTTPS client (reqwest with rustls) that trusts
//! only the generated certificate and checks the printed fingerprint.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest;
use storemesh_testkit::{base64_decode, KillOnDrop as Node};

const BIN: &str = env!("CARGO_BIN_EXE_storemesh");

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key} line in {out}"))
        .trim()
}

fn pem_cert_der(path: &Path) -> Vec<u8> {
    let pem = std::fs::read_to_string(path).unwrap();
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .join("");
    base64_decode(&b64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_https_serves_the_api_over_tls_with_a_pinnable_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store-1");
    let http_port = storemesh_node::demo::free_port().unwrap();
    let quic_port = storemesh_node::demo::free_port().unwrap();
    let out = Command::new(BIN)
        .args(["init", "--https", "--data-dir"])
        .arg(&dir)
        .args([
            "--name",
            "store-1",
            "--http-addr",
            &format!("127.0.0.1:{http_port}"),
            "--quic-addr",
            &format!("127.0.0.1:{quic_port}"),
            "--api-token",
            "https-test-token-0123456789",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let fingerprint = field(&stdout, "https_fingerprint").to_string();
    let cert_path = std::path::PathBuf::from(field(&stdout, "https_cert"));
    assert_eq!(fingerprint.len(), 64, "{stdout}");
    let names = field(&stdout, "https_names");
    for n in ["localhost", "127.0.0.1", "::1"] {
        assert!(names.split(',').any(|x| x == n), "{n} not in {names}");
    }
    // The fingerprint is the SHA-256 of the certificate's DER bytes.
    let der = pem_cert_der(&cert_path);
    assert_eq!(hex::encode(sha2::Sha256::digest(&der)), fingerprint);
    // The config says where the certificate and key are; the key is private.
    let cfg = std::fs::read_to_string(dir.join("storemesh.toml")).unwrap();
    assert!(cfg.contains("[api.tls]"), "{cfg}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("https-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "key file mode {mode:o}");
    }

    let _node = Node(
        Command::new(BIN)
            .args(["run", "--data-dir"])
            .arg(&dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let root = reqwest::Certificate::from_pem(&std::fs::read(&cert_path).unwrap()).unwrap();
    let https = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root)
        .tls_info(true)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let base = format!("https://localhost:{http_port}");
    let t = Instant::now();
    let health = loop {
        match https.get(format!("{base}/healthz")).send().await {
            Ok(r) => break r,
            Err(e) if t.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("HTTPS never answered: {e:?}"),
        }
    };
    assert_eq!(health.status(), 200);
    // The certificate the server presented is the one whose fingerprint init printed.
    let info = health
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .expect("TLS info");
    let presented = info.peer_certificate().expect("server certificate");
    assert_eq!(hex::encode(sha2::Sha256::digest(presented)), fingerprint);
    let v: serde_json::Value = health.json().await.unwrap();
    assert_eq!(v["status"], "ok");

    // A write and a read with the token, over TLS, by IP address too.
    let token = "https-test-token-0123456789";
    let r = https
        .post(format!("https://127.0.0.1:{http_port}/api/receipts"))
        .bearer_auth(token)
        .json(&serde_json::json!({"receipt_id": "r-1", "location": "store-1", "lines": [{"product_id": 7, "quantity": 5}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let v: serde_json::Value = https
        .get(format!("{base}/api/inventory?product_id=7"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["stock_level"], 5);

    // Plain HTTP to the TLS port gets no API answer.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = plain
        .get(format!("http://127.0.0.1:{http_port}/healthz"))
        .send()
        .await;
    assert!(
        r.map(|r| r.status() != 200).unwrap_or(true),
        "plain HTTP must not be served"
    );
    // A client that does not trust the certificate refuses the connection.
    let stranger = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    assert!(stranger
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_err());
}
