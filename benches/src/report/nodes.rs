//! In-process nodes for the macro benchmarks: real `NodeHandle`s (real HTTP,
//! QUIC and redb files in a temp dir), with helpers to stock them, read their
//! metrics and wait for convergence.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use storemesh_node::config::{Config, Policy, Role};
use storemesh_node::demo::make_mesh;
use storemesh_node::node::NodeHandle;

use crate::http::{post_json, Conn};

pub struct Mesh {
    pub tmp: tempfile::TempDir,
    pub dirs: Vec<(PathBuf, String)>,
    pub nodes: Vec<NodeHandle>,
}

/// Metrics counters of one node at one instant.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub msgs_out: u64,
    pub msgs_in: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub commits: u64,
    /// `bytes_out` by message kind (`storemesh_protocol::sync::MSG_KINDS`).
    pub by_kind: [u64; storemesh_protocol::sync::MSG_KINDS.len()],
}

impl Counters {
    pub fn minus(&self, o: &Counters) -> Counters {
        Counters {
            msgs_out: self.msgs_out - o.msgs_out,
            msgs_in: self.msgs_in - o.msgs_in,
            bytes_out: self.bytes_out - o.bytes_out,
            bytes_in: self.bytes_in - o.bytes_in,
            commits: self.commits - o.commits,
            by_kind: std::array::from_fn(|k| self.by_kind[k] - o.by_kind[k]),
        }
    }
}

impl Mesh {
    /// Writes configs (then `tweak`s each) and starts every node.
    pub async fn start(
        names: &[&str],
        role: impl Fn(usize) -> Role,
        links: &[(usize, usize)],
        tweak: impl Fn(&mut Config),
    ) -> Result<Mesh> {
        let tmp = tempfile::Builder::new()
            .prefix("storemesh-bench-")
            .tempdir()?;
        let spec: Vec<(&str, Role, Policy)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, role(i), Policy::Strict))
            .collect();
        let dirs = make_mesh(tmp.path(), &spec, links)?;
        for (dir, _) in &dirs {
            let mut cfg = Config::load(dir)?;
            tweak(&mut cfg);
            cfg.save(dir)?;
        }
        let mut nodes = Vec::new();
        for (dir, _) in &dirs {
            nodes.push(
                NodeHandle::start(dir)
                    .await
                    .with_context(|| format!("starting {}", dir.display()))?,
            );
        }
        Ok(Mesh { tmp, dirs, nodes })
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].http_addr
    }

    pub fn token(&self, i: usize) -> &str {
        &self.dirs[i].1
    }

    pub fn location(&self, i: usize) -> String {
        self.nodes[i].shared.cfg.location.clone()
    }

    pub fn counters(&self, i: usize) -> Counters {
        let m = &self.nodes[i].shared.metrics;
        Counters {
            msgs_out: m.sync_messages_out.load(Ordering::Relaxed),
            msgs_in: m.sync_messages_in.load(Ordering::Relaxed),
            bytes_out: m.sync_bytes_out.load(Ordering::Relaxed),
            bytes_in: m.sync_bytes_in.load(Ordering::Relaxed),
            commits: m.commits.load(Ordering::Relaxed),
            by_kind: std::array::from_fn(|k| m.sync_bytes_out_by_kind[k].load(Ordering::Relaxed)),
        }
    }

    pub fn total(&self) -> Counters {
        let mut t = Counters::default();
        for i in 0..self.nodes.len() {
            let c = self.counters(i);
            t.msgs_out += c.msgs_out;
            t.msgs_in += c.msgs_in;
            t.bytes_out += c.bytes_out;
            t.bytes_in += c.bytes_in;
            t.commits += c.commits;
            for (a, b) in t.by_kind.iter_mut().zip(c.by_kind) {
                *a += b;
            }
        }
        t
    }

    /// The summary digest of node `i` (equal digests = identical documents).
    pub async fn digest(&self, i: usize) -> Option<[u8; 32]> {
        self.nodes[i].shared.query(|e| e.digest_root()).await
    }

    /// Waits until all of `which` have the same digest; polls every 5 ms.
    pub async fn wait_same(&self, which: &[usize], limit: Duration) -> Result<Duration> {
        let t = Instant::now();
        loop {
            let mut ds = Vec::new();
            for &i in which {
                ds.push(self.digest(i).await);
            }
            if ds.iter().all(|d| d.is_some() && *d == ds[0]) {
                return Ok(t.elapsed());
            }
            if t.elapsed() > limit {
                bail!("nodes {which:?} did not converge within {limit:?}");
            }
            if std::env::var_os("STOREMESH_BENCH_DEBUG").is_some()
                && t.elapsed().as_millis() % 5000 < 6
            {
                for &i in which {
                    let docs = self.nodes[i].shared.query(|e| e.documents().len()).await;
                    eprintln!(
                        "    [{:.0} s] node {i}: {:?} docs, {:?}, peers {:?}",
                        t.elapsed().as_secs_f64(),
                        docs,
                        self.counters(i),
                        self.nodes[i].transport.connected().len()
                    );
                }
                let a = self.nodes[which[0]]
                    .shared
                    .query(|e| e.documents())
                    .await
                    .unwrap_or_default();
                let b: std::collections::BTreeMap<String, Vec<String>> = self.nodes[which[1]]
                    .shared
                    .query(|e| e.documents())
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                let diff: Vec<_> = a.iter().filter(|(id, h)| b.get(id) != Some(h)).collect();
                eprintln!(
                    "    {} docs differ; first: {:?}",
                    diff.len(),
                    diff.iter()
                        .take(3)
                        .map(|(id, h)| (id, h.len(), b.get(id).map(|x| x.len())))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until no sync frame moved for `quiet`; returns when the last one moved.
    pub async fn wait_quiet(&self, quiet: Duration, limit: Duration) -> Result<Instant> {
        let t = Instant::now();
        let mut last = self.total();
        let mut last_change = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let now = self.total();
            if now.msgs_out != last.msgs_out || now.msgs_in != last.msgs_in {
                last = now;
                last_change = Instant::now();
            } else if last_change.elapsed() >= quiet {
                return Ok(last_change);
            }
            if t.elapsed() > limit {
                bail!("sync traffic did not stop within {limit:?}");
            }
        }
    }

    /// Waits until node `i` has `n` connected peers.
    pub async fn wait_connected(&self, i: usize, n: usize, limit: Duration) -> Result<()> {
        let t = Instant::now();
        while self.nodes[i].transport.connected().len() != n {
            if t.elapsed() > limit {
                bail!("node {i} did not reach {n} connected peers within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Cuts (or heals) the link between nodes `a` and `b`, on both ends.
    pub fn set_link(&self, a: usize, b: usize, cut: bool) {
        let (ia, ib) = (self.nodes[a].shared.node_id, self.nodes[b].shared.node_id);
        self.nodes[a].transport.set_blocked(ib, cut);
        self.nodes[b].transport.set_blocked(ia, cut);
    }

    /// Stops every node, rewrites its config with `tweak`, starts it again.
    pub async fn restart(self, tweak: impl Fn(&mut Config)) -> Result<Mesh> {
        let Mesh { tmp, dirs, nodes } = self;
        for n in nodes {
            n.shutdown().await;
        }
        let mut nodes = Vec::new();
        for (dir, _) in &dirs {
            let mut cfg = Config::load(dir)?;
            tweak(&mut cfg);
            cfg.save(dir)?;
            let t = Instant::now();
            let h = loop {
                match NodeHandle::start(dir).await {
                    Ok(h) => break h,
                    Err(e)
                        if t.elapsed() < Duration::from_secs(5)
                            && format!("{e:#}").contains("in use") =>
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(e.context(format!("restarting {}", dir.display()))),
                }
            };
            nodes.push(h);
        }
        Ok(Mesh { tmp, dirs, nodes })
    }

    pub async fn shutdown(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
        drop(self.tmp);
    }
}

/// Receives `quantity` of every product in `products` at `location`, in
/// receipts of 500 lines, through HTTP.
pub async fn stock(
    addr: SocketAddr,
    token: &str,
    location: &str,
    products: &[u64],
    quantity: u64,
    tag: &str,
) -> Result<()> {
    let mut conn = Conn::new(addr);
    for (i, chunk) in products.chunks(500).enumerate() {
        let lines: Vec<_> = chunk
            .iter()
            .map(|p| json!({"product_id": p, "quantity": quantity}))
            .collect();
        let body =
            json!({"receipt_id": format!("{tag}-{i}"), "location": location, "lines": lines});
        let (s, v) = post_json(&mut conn, "/api/receipts", token, &body).await?;
        if s != 201 {
            bail!("receipt refused: HTTP {s} {v}");
        }
    }
    Ok(())
}

/// splitmix64: a cheap deterministic hash for per-request randomness.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A uniform f64 in [0, 1) from a hash.
pub fn unit(x: u64) -> f64 {
    (mix(x) >> 11) as f64 / (1u64 << 53) as f64
}
