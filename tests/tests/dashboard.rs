//! The dashboard in a real browser: a small mesh on loopback, Debian's headless
//! Chromium driven through chromedriver's WebDriver HTTP API (plain JSON calls).
//! The test enters the token, sees the peers linked, finds a product by SKU,
//! sees a sale arrive live, cuts a link (stops a peer) and sees the page show
//! it. It saves a screenshot (PNG) to `$DASHBOARD_SCREENSHOT` when set.
//!
//! Needs `chromium` and `chromium-driver` (`.ci/run` installs them); without
//! them the test says so and passes without running.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use storemesh_testkit::*;

const CHROME_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
];

fn find_on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

struct Driver {
    child: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut rq = self.http.request(method, &url);
        if let Some(b) = body {
            rq = rq.json(&b);
        }
        let r = rq.send().await.expect("chromedriver answers");
        let status = r.status();
        let v: Value = r.json().await.expect("WebDriver JSON");
        assert!(status.is_success(), "WebDriver {path}: {status} {v}");
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn js(&self, script: &str) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// Polls `script` until it returns `want`; panics with the last value.
    async fn wait_js(&self, script: &str, want: Value, limit: Duration, what: &str) {
        let t = std::time::Instant::now();
        let mut last;
        loop {
            last = self.js(script).await;
            if last == want {
                return;
            }
            if t.elapsed() > limit {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let text = self.js("return document.body.innerText").await;
        panic!("{what}: {script} gave {last}, not {want}\npage:\n{text}");
    }

    async fn size(&self, w: u32, h: u32) {
        self.cmd(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": w, "height": h})),
        )
        .await;
    }

    async fn screenshot(&self) -> Vec<u8> {
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        base64_decode(v.as_str().expect("base64 PNG"))
    }
}

async fn start_driver(
    driver_bin: PathBuf,
    chrome_bin: PathBuf,
    profile: &std::path::Path,
) -> Driver {
    let port = storemesh_node::demo::free_port().unwrap();
    let child = Command::new(&driver_bin)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut driver = Driver {
        child,
        base: base.clone(),
        session: String::new(),
        http: http.clone(),
    };
    wait_for(Duration::from_secs(20), || async {
        match http.get(format!("{base}/status")).send().await {
            Ok(r) => r
                .json::<Value>()
                .await
                .map(|v| v["value"]["ready"] == true)
                .unwrap_or(false),
            Err(_) => false,
        }
    })
    .await
    .expect("chromedriver ready");
    let mut args: Vec<String> = CHROME_FLAGS.iter().map(|s| s.to_string()).collect();
    args.push(format!("--user-data-dir={}", profile.display()));
    args.push("--window-size=1280,1000".into());
    let caps = json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {"binary": chrome_bin, "args": args}
    }}});
    let r = http
        .post(format!("{base}/session"))
        .json(&caps)
        .send()
        .await
        .expect("new session");
    let v: Value = r.json().await.unwrap();
    driver.session = v["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no session: {v}"))
        .to_string();
    driver
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium_shows_peers_stock_live_sales_and_a_cut_link() {
    let (Some(driver_bin), Some(chrome_bin)) = (
        find_on_path(&["chromedriver"]),
        find_on_path(&["chromium", "chromium-browser", "google-chrome"]),
    ) else {
        eprintln!(
            "SKIPPED dashboard browser test: chromium and chromedriver not found on PATH \
             (apt-get install chromium chromium-driver; .ci/run does this)"
        );
        return;
    };
    let mut mesh = Mesh::start(
        &[
            ("store-a", Role::Store, Policy::Strict),
            ("store-b", Role::Store, Policy::Strict),
            ("web", Role::Webshop, Policy::Strict),
        ],
        &[(0, 1), (0, 2), (1, 2)],
    )
    .await;
    mesh.wait_connected(0, 2).await;
    let a = mesh.clients[0].clone();
    let (s, v) = a
        .post("/api/receipts", receipt("r-1", "store-a", &[(42, 10)]))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let r = reqwest::Client::new()
        .put(format!("{}/api/products/42", a.base))
        .bearer_auth(&a.token)
        .json(&json!({"sku": "SKU-42", "barcodes": ["4006381333931"], "name": "Espresso cups"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let (s, v) = mesh.clients[1]
        .post("/api/receipts", receipt("r-2", "store-b", &[(42, 3)]))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    // An overdraft alarm: the till's override sells what store-a has no rights to.
    let (s, v) = a
        .post(
            "/api/sales",
            json!({"sale_id": "s-over", "lines": [{"product_id": 77, "quantity": 1}], "override": true}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    // A refused sale for the per-minute chart.
    let (s, _) = a
        .post("/api/sales", sale("s-refused", None, &[(42, 1000)]))
        .await
        .unwrap();
    assert_eq!(s, 409);

    let profile = tempfile::tempdir().unwrap();
    let d = start_driver(driver_bin, chrome_bin, profile.path()).await;
    d.goto(&format!("{}/", a.base)).await;
    // The page asks for the token once.
    d.wait_js(
        "return !document.getElementById('login-box').classList.contains('hidden')",
        json!(true),
        Duration::from_secs(10),
        "token form shown",
    )
    .await;
    d.type_into("#token", &a.token).await;
    d.click("#login").await;
    d.wait_js(
        "return sessionStorage.getItem('storemesh_token') !== null && !document.getElementById('app').classList.contains('hidden')",
        json!(true),
        Duration::from_secs(10),
        "dashboard opens with the token",
    )
    .await;
    // This node and both peers linked.
    d.wait_js(
        "return document.getElementById('node').textContent.startsWith('store-a')",
        json!(true),
        Duration::from_secs(10),
        "this node shown",
    )
    .await;
    for peer in ["store-b", "web"] {
        d.wait_js(
            &format!("var r = document.querySelector('tr[data-peer=\"{peer}\"]'); return r ? r.dataset.state : null"),
            json!("up"),
            Duration::from_secs(15),
            "peer linked",
        )
        .await;
    }
    // The alarm, and the sale counters.
    d.wait_js(
        "return document.querySelectorAll('#alarms tr[data-alarm]').length > 0",
        json!(true),
        Duration::from_secs(15),
        "overdraft alarm shown",
    )
    .await;
    d.wait_js(
        "return document.getElementById('rate-hour').textContent",
        json!("1 sold, 1 refused"),
        Duration::from_secs(10),
        "sales and refusals per minute",
    )
    .await;
    // Product search by SKU: stock per location.
    d.type_into("#search", "SKU-42").await;
    d.click("#search-go").await;
    let on_hand = |loc: &str| {
        format!("var r = document.querySelector('#product tr[data-location=\"{loc}\"]'); return r ? r.children[1].textContent : null")
    };
    d.wait_js(
        &on_hand("store-a"),
        json!("10"),
        Duration::from_secs(10),
        "store-a stock",
    )
    .await;
    d.wait_js(
        &on_hand("store-b"),
        json!("3"),
        Duration::from_secs(15),
        "store-b stock",
    )
    .await;
    // Live: a sale at store-a shows through the stream and updates the search.
    d.wait_js(
        "return document.getElementById('stream-state').textContent",
        json!("live"),
        Duration::from_secs(10),
        "stream connected",
    )
    .await;
    let (s, v) = a
        .post("/api/sales", sale("s-live", None, &[(42, 2)]))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    d.wait_js(
        &on_hand("store-a"),
        json!("8"),
        Duration::from_secs(10),
        "live stock update",
    )
    .await;
    d.wait_js(
        "return Array.from(document.querySelectorAll('#live li')).some(li => li.textContent.includes('#42 @ store-a: on hand 8'))",
        json!(true),
        Duration::from_secs(10),
        "live change listed",
    )
    .await;

    // Cut a link: store-b stops. The page shows the link down and the partition.
    mesh.stop(1).await;
    d.wait_js(
        "var r = document.querySelector('tr[data-peer=\"store-b\"]'); return r ? r.dataset.state : null",
        json!("cut"),
        Duration::from_secs(30),
        "cut link shown",
    )
    .await;
    d.wait_js(
        "return document.getElementById('partitions').textContent.includes('Partitioned from: store-b')",
        json!(true),
        Duration::from_secs(5),
        "partition named",
    )
    .await;
    d.wait_js(
        "var r = document.querySelector('tr[data-peer=\"web\"]'); return r ? r.dataset.state : null",
        json!("up"),
        Duration::from_secs(5),
        "other link still up",
    )
    .await;
    d.size(1280, 760).await;
    let png = d.screenshot().await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "screenshot is a PNG");
    if let Some(path) = std::env::var_os("DASHBOARD_SCREENSHOT") {
        std::fs::write(&path, &png).expect("screenshot written");
    }
    // A phone screen: nothing wider than the viewport.
    d.size(390, 844).await;
    d.wait_js(
        "return document.documentElement.scrollWidth <= window.innerWidth",
        json!(true),
        Duration::from_secs(5),
        "fits a phone screen",
    )
    .await;
    if let Some(path) = std::env::var_os("DASHBOARD_SCREENSHOT_PHONE") {
        std::fs::write(&path, d.screenshot().await).expect("screenshot written");
    }
    let _ = d
        .http
        .delete(format!("{}/session/{}", d.base, d.session))
        .send()
        .await;
    drop(d);
    mesh.shutdown().await;
}
