//! Helpers shared by the tests of the workspace (a dev-only crate): real
//! in-process meshes (real QUIC and HTTP sockets on loopback, real redb files),
//! polling with a deadline, the JSON bodies of common requests, and small
//! decoders the tests use instead of trusting the node's own code.

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use storemesh_node::config::{Config, Policy, Role};
pub use storemesh_node::demo::{converge, make_mesh, Client};
pub use storemesh_node::node::NodeHandle;

pub struct Mesh {
    pub tmp: tempfile::TempDir,
    pub dirs: Vec<(PathBuf, String)>,
    pub nodes: Vec<Option<NodeHandle>>,
    pub clients: Vec<Client>,
}

/// Whether a node's start failed because a port it was given is taken.
fn port_taken(err: &str) -> bool {
    let e = err.to_lowercase();
    e.contains("address in use") || e.contains("address already in use")
}

impl Mesh {
    /// Creates and starts nodes `names` (roles and policies given) with `links`.
    pub async fn start(nodes: &[(&str, Role, Policy)], links: &[(usize, usize)]) -> Mesh {
        Mesh::start_with(nodes, links, |_, _| {}).await
    }

    /// As `start`, with each node's config adjusted by `tweak(index, config)`
    /// before the nodes start.
    pub async fn start_with(
        nodes: &[(&str, Role, Policy)],
        links: &[(usize, usize)],
        tweak: impl Fn(usize, &mut Config),
    ) -> Mesh {
        // `make_mesh` picks free ports before the nodes bind them; another
        // process may take one in between (seen while benchmarks ran beside
        // the tests). The mesh is then made again on fresh ports.
        const ATTEMPTS: usize = 3;
        let mut attempt = 0;
        'mesh: loop {
            attempt += 1;
            let tmp = tempfile::tempdir().expect("temp dir");
            let dirs = make_mesh(tmp.path(), nodes, links).expect("mesh config");
            for (i, (dir, _)) in dirs.iter().enumerate() {
                let mut cfg = Config::load(dir).expect("config written by make_mesh");
                tweak(i, &mut cfg);
                cfg.save(dir).expect("config saved");
            }
            let mut handles = Vec::new();
            let mut clients = Vec::new();
            for (dir, token) in &dirs {
                match NodeHandle::start(dir).await {
                    Ok(h) => {
                        clients.push(Client::new(h.http_addr, token));
                        handles.push(Some(h));
                    }
                    // The QUIC bind says "address in use", the HTTP bind
                    // the OS's "Address already in use" (os error 98).
                    Err(e) if attempt < ATTEMPTS && port_taken(&format!("{e:#}")) => {
                        eprintln!("mesh start: {e:#}; making the mesh again on other ports");
                        for h in handles.into_iter().flatten() {
                            h.shutdown().await;
                        }
                        continue 'mesh;
                    }
                    Err(e) => panic!("node starts: {e:?}"),
                }
            }
            return Mesh {
                tmp,
                dirs,
                nodes: handles,
                clients,
            };
        }
    }

    pub fn node(&self, i: usize) -> &NodeHandle {
        self.nodes[i].as_ref().expect("node running")
    }

    /// Waits until node `i` has `n` peers connected.
    pub async fn wait_connected(&self, i: usize, n: usize) {
        wait_for(Duration::from_secs(10), || async {
            self.node(i).transport.connected().len() == n
        })
        .await
        .unwrap_or_else(|_| panic!("node {i} did not reach {n} connections"));
    }

    pub async fn stop(&mut self, i: usize) {
        if let Some(h) = self.nodes[i].take() {
            h.shutdown().await;
        }
    }

    pub async fn restart(&mut self, i: usize) {
        self.stop(i).await;
        let h = start_retrying(&self.dirs[i].0).await;
        self.clients[i] = Client::new(h.http_addr, &self.dirs[i].1);
        self.nodes[i] = Some(h);
    }

    pub async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i).await;
        }
    }
}

/// Polls `f` every 5 ms until it is true; Err after `limit`.
pub async fn wait_for<F, Fut>(limit: Duration, mut f: F) -> Result<Duration, ()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while t.elapsed() < limit {
        if f().await {
            return Ok(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err(())
}

pub fn receipt(id: &str, loc: &str, lines: &[(u64, u64)]) -> serde_json::Value {
    let lines: Vec<_> = lines
        .iter()
        .map(|(p, q)| serde_json::json!({"product_id": p, "quantity": q}))
        .collect();
    serde_json::json!({"receipt_id": id, "location": loc, "lines": lines})
}

pub fn sale(id: &str, loc: Option<&str>, lines: &[(u64, u64)]) -> serde_json::Value {
    let lines: Vec<_> = lines
        .iter()
        .map(|(p, q)| serde_json::json!({"product_id": p, "quantity": q}))
        .collect();
    let mut v = serde_json::json!({"sale_id": id, "lines": lines});
    if let Some(l) = loc {
        v["location"] = serde_json::json!(l);
    }
    v
}

/// `stock_level` of a product as node `c` reports it (None if 404).
pub async fn stock_level(c: &Client, p: u64) -> Option<i64> {
    let (s, v) = c
        .get(&format!("/api/inventory?product_id={p}"))
        .await
        .ok()?;
    if s != 200 {
        return None;
    }
    v["stock_level"].as_i64()
}

/// Starts a node, retrying while the previous process's UDP socket of the same
/// port is still being released (in-process restarts only).
pub async fn start_retrying(dir: &std::path::Path) -> NodeHandle {
    let t = Instant::now();
    loop {
        match NodeHandle::start(dir).await {
            Ok(h) => return h,
            Err(e)
                if t.elapsed() < Duration::from_secs(5) && format!("{e:#}").contains("in use") =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("node does not start: {e:#}"),
        }
    }
}

/// Tests that assert latencies (e.g. "visible within 1 s") take this lock, so
/// the other meshes of the same test binary do not compete for the 2 cores.
pub async fn timing_sensitive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Standard base64 (padding and ASCII white space ignored), decoded
/// independently of the node's code. Panics on any other character: the tests
/// decode what a node or a browser produced, and garbage there is a failure.
pub fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|b| *b != b'=' && !b.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c) << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// A child process (a node started through the binary) that is killed and
/// reaped when dropped, so no process outlives a test that fails half-way.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
