//! Fuzz targets of the node's outside surfaces (issue 17), beside the
//! protocol's (`storemesh_protocol::fuzz`, whose mutator and run statistics
//! they share):
//!
//! - `http`: arbitrary method, path, query, headers and body through the
//!   real API router (`api::router` wrapped by the dashboard, as `run`
//!   serves it), in process with tower's `oneshot`, against a real node (real
//!   engine thread, real redb file in a temporary directory). Every answer
//!   must be a status below 500 — except the documented `503 unavailable` —
//!   with a JSON body (`{"error": ...}` for every error), within
//!   [`HTTP_ANSWER_TIMEOUT`], and the engine thread must still be running.
//! - `csv`: stock files through the import parser (`csvio::parse`, both
//!   formats): no panic, bounded error messages, only valid rows.
//!
//! Inputs are bytes; [`decode_request`] reads an HTTP request out of them
//! (`flags`, then `target\n`, `name: value\n` headers, an empty line, the
//! body), so the seeds in [`http_seeds`] are readable requests. The stable
//! runner is [`run`] (a short run in `node/tests/fuzz.rs`); the
//! coverage-guided one is the `fuzz/` directory (cargo-fuzz).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use axum::Router;
use storemesh_protocol::fuzz::{mutate, Rng, RunStats};
use tower::ServiceExt;

use crate::config::{Policy, Role};
use crate::csvio::{self, Format};
use crate::node::NodeHandle;

/// The targets, by name.
pub const TARGETS: &[&str] = &["http", "csv"];

/// An answer must come within this (a hang is a finding).
pub const HTTP_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of an answer's body read for the check, at most (exports of a
/// fuzzed node are far smaller; streams are not read).
pub const HTTP_ANSWER_BYTES_MAX: usize = 16 << 20;
/// Inputs one node serves before the harness starts a fresh one, so its
/// documents and file stay small whatever the run's length.
pub const HTTP_EXECS_PER_NODE: u64 = 2000;
/// Bytes of one CSV error message, at most (the API's message bound).
pub const CSV_ERROR_BYTES_MAX: usize = crate::api::MESSAGE_BYTES_MAX;

/// Methods the first input byte picks from (the last is not a real one).
const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "BREW",
];
/// First-byte flags: no `Authorization` header / a wrong token.
const FLAG_NO_AUTH: u8 = 0x08;
const FLAG_BAD_TOKEN: u8 = 0x10;

/// A decoded request (the input's reading; `None` parts were not valid
/// HTTP, which hyper refuses before any router sees them).
pub struct FuzzRequest {
    pub method: Method,
    pub target: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Vec<u8>,
    pub auth: Option<bool>,
}

/// Reads a request out of fuzz bytes: `flags target\nname: value\n...\n\nbody`.
pub fn decode_request(input: &[u8]) -> Option<FuzzRequest> {
    let (&flags, rest) = input.split_first()?;
    let method = METHODS[usize::from(flags & 7)];
    let method = Method::from_bytes(method.as_bytes()).ok()?;
    let auth = if flags & FLAG_NO_AUTH != 0 {
        None
    } else {
        Some(flags & FLAG_BAD_TOKEN == 0)
    };
    let nl = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
    let mut target = String::from_utf8_lossy(&rest[..nl]).into_owned();
    if !target.starts_with('/') {
        target.insert(0, '/');
    }
    let after = &rest[(nl + 1).min(rest.len())..];
    // Headers up to the first empty line; the body after it.
    let (head, body) = match after.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&after[..i], &after[i + 2..]),
        None if after.first() == Some(&b'\n') => (&after[..0], &after[1..]),
        None => (after, &after[after.len()..]),
    };
    let mut headers = Vec::new();
    for line in head.split(|b| *b == b'\n') {
        if let Some(colon) = line.iter().position(|b| *b == b':') {
            let name = HeaderName::from_bytes(&line[..colon]);
            let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii());
            if let (Ok(n), Ok(v)) = (name, value) {
                headers.push((n, v));
            }
        }
    }
    Some(FuzzRequest {
        method,
        target,
        headers,
        body: body.to_vec(),
        auth,
    })
}

/// Encodes a readable request as fuzz bytes (the seeds' form).
pub fn encode_request(flags: u8, target: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(target.as_bytes());
    out.push(b'\n');
    for (n, v) in headers {
        out.extend_from_slice(format!("{n}: {v}\n").as_bytes());
    }
    out.push(b'\n');
    out.extend_from_slice(body.as_bytes());
    out
}

/// One request per route of the API (CONTRACT.md, openapi.yaml), valid as
/// far as a fresh one-node mesh goes.
pub fn http_seeds() -> Vec<Vec<u8>> {
    const GET: u8 = 0;
    const POST: u8 = 1;
    const PUT: u8 = 2;
    const DELETE: u8 = 3;
    let json = [("content-type", "application/json")];
    let csv = [("content-type", "text/csv")];
    let mut s = vec![
        encode_request(GET, "/healthz", &[], ""),
        encode_request(GET, "/metrics", &[], ""),
        encode_request(GET, "/openapi.yaml", &[], ""),
        encode_request(GET, "/", &[], ""),
        encode_request(GET, "/api/dashboard", &[], ""),
        encode_request(
            GET,
            "/api/inventory?product_ids=1,2,3&location=store-a",
            &[],
            "",
        ),
        encode_request(GET, "/api/inventory?limit=5&cursor=0", &[], ""),
        encode_request(GET, "/api/changes?since=0&limit=10", &[], ""),
        encode_request(GET, "/api/inventory/stream?since=0", &[], ""),
        encode_request(
            POST,
            "/api/receipts",
            &json,
            r#"{"receipt_id":"r1","location":"store-a","lines":[{"product_id":1,"quantity":50},{"product_id":2,"quantity":5}]}"#,
        ),
        encode_request(
            POST,
            "/api/sales",
            &json,
            r#"{"sale_id":"s1","currency":"EUR","customer_id":"cust-42","lines":[{"product_id":1,"quantity":2,"unit_price":1999}]}"#,
        ),
        encode_request(GET, "/api/sales/s1", &[], ""),
        encode_request(
            POST,
            "/api/returns",
            &json,
            r#"{"return_id":"t1","sale_id":"s1","location":"store-a","lines":[{"product_id":1,"quantity":1,"disposition":"restock"}]}"#,
        ),
        encode_request(
            POST,
            "/api/counts",
            &json,
            r#"{"count_id":"c1","location":"store-a","scope":"partial","lines":[{"product_id":1,"counted":40}]}"#,
        ),
        encode_request(
            POST,
            "/api/counts/c2/lines",
            &json,
            r#"{"location":"store-a","lines":[{"product_id":2,"counted":3},{"sku":"MUG-01","counted":1}]}"#,
        ),
        encode_request(POST, "/api/counts/c2/finish", &json, r#"{"scope":"full"}"#),
        encode_request(GET, "/api/counts/c2", &[], ""),
        encode_request(
            POST,
            "/api/locations",
            &json,
            r#"{"location":"depot-1","timezone":"Europe/Berlin","owner":"store-a"}"#,
        ),
        encode_request(GET, "/api/locations", &[], ""),
        encode_request(
            POST,
            "/api/grants",
            &json,
            r#"{"grant_id":"g1","product_id":1,"location":"store-a","to":"store-a","quantity":1}"#,
        ),
        encode_request(
            PUT,
            "/api/products/7",
            &json,
            r#"{"sku":"MUG-01","barcodes":["04006381333931"],"name":"Mug"}"#,
        ),
        encode_request(GET, "/api/products/7", &[], ""),
        encode_request(
            POST,
            "/api/adjustments",
            &json,
            r#"{"adjustment_id":"a1","location":"store-a","reason":"damaged","lines":[{"product_id":1,"quantity":1}],"note":"dropped"}"#,
        ),
        encode_request(GET, "/api/adjustments?location=store-a", &[], ""),
        encode_request(
            POST,
            "/api/transfers",
            &json,
            r#"{"transfer_id":"x1","from":"store-a","to":"depot-1","lines":[{"product_id":1,"quantity":2}]}"#,
        ),
        encode_request(GET, "/api/transfers/x1", &[], ""),
        encode_request(
            POST,
            "/api/transfers/x1/receive",
            &json,
            r#"{"lines":[{"product_id":1,"quantity":2}]}"#,
        ),
        encode_request(
            POST,
            "/api/reservations",
            &json,
            r#"{"reservation_id":"w1","location":"store-a","lines":[{"product_id":1,"quantity":1}],"fulfil_by":"store-a","expires_at":"2099-03-03T18:00:00+01:00","customer_id":"cust-42"}"#,
        ),
        encode_request(GET, "/api/reservations/w1", &[], ""),
        encode_request(
            POST,
            "/api/reservations/w1/fulfil",
            &json,
            r#"{"sale_id":"s-w1"}"#,
        ),
        encode_request(POST, "/api/reservations/w1/cancel", &json, "{}"),
        encode_request(
            POST,
            "/api/imports/counts?format=storemesh",
            &csv,
            "sku,location,on_hand\nMUG-01,store-a,12\n",
        ),
        encode_request(GET, "/api/exports/inventory?format=shopify", &[], ""),
        encode_request(
            PUT,
            "/api/customers/cust-42",
            &json,
            r#"{"name":"Ann Example","email":"ann@example.org","phone":"+1 555 0100","marketing_consent":true}"#,
        ),
        encode_request(GET, "/api/customers/cust-42", &[], ""),
        encode_request(GET, "/api/customers?email=ann@example.org", &[], ""),
        encode_request(GET, "/api/customers/segment?min_points=0&limit=5", &[], ""),
        encode_request(
            POST,
            "/api/customers/cust-42/redeem",
            &json,
            r#"{"redemption_id":"d1","points":1}"#,
        ),
        encode_request(DELETE, "/api/customers/cust-42", &[], ""),
        encode_request(GET, "/api/webhooks", &[], ""),
        encode_request(GET, "/api/peers", &[], ""),
        encode_request(GET, "/api/overdrafts", &[], ""),
        encode_request(GET, "/api/documents", &[], ""),
        encode_request(GET, "/api/documents/mesh", &[], ""),
        encode_request(
            POST,
            "/api/nodes/store-b/retire",
            &json,
            r#"{"successor":"store-a"}"#,
        ),
    ];
    // Without a token, with a wrong one, and a method the route does not take.
    s.push(encode_request(
        FLAG_NO_AUTH | POST,
        "/api/sales",
        &json,
        "{}",
    ));
    s.push(encode_request(FLAG_BAD_TOKEN, "/api/inventory", &[], ""));
    s.push(encode_request(4, "/api/sales", &json, "{}"));
    s
}

/// Stock files for the `csv` target (first byte: the format).
pub fn csv_seeds() -> Vec<Vec<u8>> {
    let files = [
        (0u8, "sku,location,on_hand\nMUG-01,store-1,12\nCUP-2,store-2,0\n"),
        (0, "sku,location,on_hand,title\n\"A,B\",store-1,3,\"Mug \"\"big\"\"\"\n"),
        (
            1,
            "Handle,Title,Option1 Name,Option1 Value,SKU,Location,On hand\nmug,Mug,Title,Default,MUG-01,Store 1,7\n",
        ),
        (1, "SKU,Location,On hand\nX,Store 2,-1\nY,,5\nZ,Store 3,abc\n"),
        (0, "sku;location;on_hand\n1;2;3\n"),
    ];
    files
        .iter()
        .map(|(f, t)| {
            let mut v = vec![*f];
            v.extend_from_slice(t.as_bytes());
            v
        })
        .collect()
}

/// The `csv` target: one input through the import parser.
pub fn exec_csv(input: &[u8]) {
    let Some((&f, data)) = input.split_first() else {
        return;
    };
    let format = if f & 1 == 0 {
        Format::Storemesh
    } else {
        Format::Shopify
    };
    match csvio::parse(data, format) {
        Ok(rows) => {
            assert!(!rows.is_empty(), "csv: Ok with no rows");
            assert!(
                rows.len() <= storemesh_protocol::ops::IMPORT_ROWS_MAX,
                "csv: {} rows accepted",
                rows.len()
            );
            for r in &rows {
                assert!(!r.sku.is_empty(), "csv: a row with an empty SKU");
                assert!(
                    storemesh_protocol::ids::validate_name("location", &r.location).is_ok(),
                    "csv: invalid location {:?} accepted",
                    r.location
                );
                assert!(r.on_hand <= 1_000_000_000, "csv: on hand {}", r.on_hand);
                assert!(r.line >= 2, "csv: line {}", r.line);
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "csv: Err with no message");
            for e in &errors {
                assert!(
                    e.len() <= CSV_ERROR_BYTES_MAX,
                    "csv: a {}-byte error message",
                    e.len()
                );
            }
        }
    }
}

/// A real node on a temporary directory, and the router it serves.
pub struct HttpHarness {
    rt: tokio::runtime::Runtime,
    node: Option<NodeHandle>,
    app: Router,
    token: String,
    execs: u64,
    /// Answers by status code (what the run reached: 2xx means a route's
    /// whole path, engine and commit included).
    pub statuses: std::collections::BTreeMap<u16, u64>,
    // Dropped last: the node's files live here.
    _tmp: tempfile::TempDir,
}

impl HttpHarness {
    /// Starts a one-node mesh (`store-a`, strict) on loopback.
    pub fn new() -> anyhow::Result<HttpHarness> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let tmp = tempfile::tempdir()?;
        let dirs =
            crate::demo::make_mesh(tmp.path(), &[("store-a", Role::Store, Policy::Strict)], &[])?;
        let (dir, token) = dirs
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no node"))?;
        let node = rt.block_on(NodeHandle::start(&dir))?;
        let shared = node.shared.clone();
        let app = crate::dashboard::wrap(crate::api::router(shared.clone()), shared);
        Ok(HttpHarness {
            rt,
            node: Some(node),
            app,
            token,
            execs: 0,
            statuses: Default::default(),
            _tmp: tmp,
        })
    }

    fn shared(&self) -> Option<&Arc<crate::state::Shared>> {
        self.node.as_ref().map(|n| &n.shared)
    }

    /// The `http` target: one input through the router, its answer checked.
    /// Panics on a finding.
    pub fn exec(&mut self, input: &[u8]) {
        self.execs += 1;
        if self.execs.is_multiple_of(HTTP_EXECS_PER_NODE) {
            self.restart();
        }
        let Some(req) = decode_request(input) else {
            return;
        };
        let mut b = Request::builder()
            .method(req.method.clone())
            .uri(req.target.as_str());
        for (n, v) in &req.headers {
            b = b.header(n, v);
        }
        match req.auth {
            Some(true) => b = b.header("authorization", format!("Bearer {}", self.token)),
            Some(false) => b = b.header("authorization", "Bearer sm_not-a-token"),
            None => {}
        }
        // A target hyper would refuse never reaches the router.
        let Ok(request) = b.body(Body::from(req.body)) else {
            return;
        };
        let is_head = req.method == Method::HEAD;
        let what = format!(
            "{} {}",
            req.method,
            req.target.chars().take(200).collect::<String>()
        );
        let app = self.app.clone();
        let outcome = self.rt.block_on(async move {
            let resp = tokio::time::timeout(HTTP_ANSWER_TIMEOUT, app.oneshot(request))
                .await
                .map_err(|_| "no answer within the timeout".to_string())?
                .map_err(|e| format!("router error: {e}"))?;
            let status = resp.status();
            let ctype = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            if ctype.starts_with("text/event-stream") {
                return Ok((status, ctype, None));
            }
            let body = tokio::time::timeout(
                HTTP_ANSWER_TIMEOUT,
                axum::body::to_bytes(resp.into_body(), HTTP_ANSWER_BYTES_MAX),
            )
            .await
            .map_err(|_| "the answer's body did not end within the timeout".to_string())?
            .map_err(|e| format!("reading the answer's body: {e}"))?;
            Ok::<_, String>((status, ctype, Some(body)))
        });
        let (status, ctype, body) = match outcome {
            Ok(x) => x,
            Err(e) => panic!("http {what}: {e}"),
        };
        *self.statuses.entry(status.as_u16()).or_default() += 1;
        if let Err(e) = check_answer(status, &ctype, body.as_deref(), is_head) {
            panic!("http {what}: {e}");
        }
        if self.shared().is_some_and(|s| s.cmd.is_closed()) {
            panic!("http {what}: the engine thread stopped");
        }
    }

    fn restart(&mut self) {
        if let Some(n) = self.node.take() {
            self.rt.block_on(n.shutdown());
        }
        match HttpHarness::new() {
            Ok(mut fresh) => {
                fresh.execs = self.execs;
                fresh.statuses = std::mem::take(&mut self.statuses);
                *self = fresh;
            }
            Err(e) => panic!("cannot start a fresh node for the http target: {e:#}"),
        }
    }
}

impl Drop for HttpHarness {
    fn drop(&mut self) {
        if let Some(n) = self.node.take() {
            self.rt.block_on(n.shutdown());
        }
    }
}

/// The answer rules of the `http` target.
pub fn check_answer(
    status: StatusCode,
    ctype: &str,
    body: Option<&[u8]>,
    is_head: bool,
) -> Result<(), String> {
    if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
        return Err(format!("status {status}"));
    }
    let Some(body) = body.filter(|_| !is_head) else {
        return Ok(());
    };
    let text = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    if status.is_client_error() || status.is_server_error() {
        let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
            format!(
                "status {status} with a body that is not JSON ({e}): {}",
                text()
            )
        })?;
        if !v.get("error").is_some_and(|e| e.is_string()) {
            return Err(format!(
                "status {status} without an \"error\" string: {}",
                text()
            ));
        }
        if !ctype.starts_with("application/json") {
            return Err(format!("status {status} with content-type {ctype:?}"));
        }
    } else if ctype.starts_with("application/json") {
        serde_json::from_slice::<serde_json::Value>(body).map_err(|e| {
            format!(
                "status {status}: a JSON answer that does not parse ({e}): {}",
                text()
            )
        })?;
    }
    Ok(())
}

/// Mutates one part of a request only — its target line or its body — so
/// that the rest stays valid and the input gets past routing and parsing.
fn mutate_part(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let line_end = input
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or(input.len());
    if rng.below(3) == 0 && line_end > 1 {
        // The target line (path and query), flags kept.
        let mut out = vec![input[0]];
        let mut target = mutate(rng, &input[1..line_end], corpus);
        target.retain(|b| *b != b'\n');
        out.extend_from_slice(&target);
        out.extend_from_slice(&input[line_end..]);
        return out;
    }
    let body_at = input
        .windows(2)
        .position(|w| w == b"\n\n")
        .map_or(input.len(), |i| i + 2);
    let mut out = input[..body_at].to_vec();
    out.extend_from_slice(&mutate(rng, &input[body_at..], corpus));
    out
}

/// Runs `target` for `execs` mutated inputs from `seed`, catching panics;
/// `regressions` run first, unmutated (as `storemesh_protocol::fuzz::run`).
pub fn run(target: &str, seed: u64, execs: u64, regressions: &[Vec<u8>]) -> RunStats {
    let mut http = if target == "http" {
        Some(HttpHarness::new().expect("the http target's node starts"))
    } else {
        None
    };
    let mut corpus = match target {
        "http" => http_seeds(),
        "csv" => csv_seeds(),
        t => panic!("unknown fuzz target {t}"),
    };
    let mut rng = Rng::new(seed);
    let mut stats = RunStats::default();
    let inputs = regressions
        .iter()
        .cloned()
        .map(Some)
        .chain(corpus.clone().into_iter().map(Some))
        .chain((0..execs).map(|_| None));
    for fixed in inputs {
        let input = match fixed {
            Some(i) => i,
            None => {
                let base = corpus[rng.below(corpus.len())].clone();
                if target == "http" && rng.below(2) == 0 {
                    mutate_part(&mut rng, &base, &corpus)
                } else {
                    mutate(&mut rng, &base, &corpus)
                }
            }
        };
        stats.execs += 1;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &mut http {
            Some(h) => h.exec(&input),
            None => exec_csv(&input),
        }));
        if let Err(p) = r {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            // One entry per kind of finding, not per path.
            let kind: String = what.chars().take(160).collect();
            stats.crashes.entry(kind).or_insert(input);
        } else if stats.execs.is_multiple_of(16) && corpus.len() < 4096 {
            corpus.push(input);
        }
    }
    if let Some(h) = &http {
        println!("fuzz http: answers by status {:?}", h.statuses);
    }
    stats
}
