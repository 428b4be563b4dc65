//! Nodes as separate OS processes (`storemesh run`), for per-process RSS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::repo_root;
use super::sim::find_binary;
use crate::http::{request, Conn};

/// The `storemesh` binary next to this one, built with cargo if missing.
pub fn storemesh_binary() -> Result<PathBuf> {
    if let Some(p) = find_binary("storemesh") {
        return Ok(p);
    }
    eprintln!("building the storemesh binary (cargo build --release -p storemesh-node) ...");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "-p",
            "storemesh-node",
            "--bin",
            "storemesh",
        ])
        .current_dir(repo_root())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of the storemesh binary failed");
    }
    find_binary("storemesh").context("the storemesh binary is still missing after cargo build")
}

/// One running `storemesh run --data-dir DIR`.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub http: SocketAddr,
    pub token: String,
    pub conn: Conn,
}

impl Proc {
    pub async fn spawn(bin: &Path, name: &str, dir: &Path, token: &str) -> Result<Proc> {
        let cfg = storemesh_node::config::Config::load(dir)?;
        let http = cfg.http_socket()?;
        let log = std::fs::File::create(dir.join("node.log"))?;
        let child = Command::new(bin)
            .args(["run", "--data-dir"])
            .arg(dir)
            // `STOREMESH_BENCH_NODE_LOG=storemesh_protocol=debug` etc. for a diagnosis
            // (with `STOREMESH_BENCH_KEEP=1`, the logs stay in each data directory).
            .env(
                "RUST_LOG",
                std::env::var("STOREMESH_BENCH_NODE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut p = Proc {
            name: name.into(),
            child,
            http,
            token: token.into(),
            conn: Conn::new(http),
        };
        let t = Instant::now();
        loop {
            if let Ok((200, _)) = p.conn.send(&request("GET", "/healthz", None, None)).await {
                break;
            }
            if let Ok(Some(st)) = p.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
                bail!("{name} exited ({st}) at start: {log}");
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("{name} did not answer /healthz within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(p)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time the node process has used so far, ms (10 ms resolution).
    pub fn cpu_ms(&self) -> f64 {
        crate::machine::cpu_ms(self.pid()).unwrap_or(f64::NAN)
    }

    pub fn rss_mib(&self) -> f64 {
        crate::machine::rss_mib(self.pid()).unwrap_or(f64::NAN)
    }

    pub async fn get(&mut self, path: &str) -> Result<(u16, Vec<u8>)> {
        let req = request("GET", path, Some(&self.token), None);
        self.conn.send(&req).await
    }

    pub async fn get_json(&mut self, path: &str) -> Result<serde_json::Value> {
        let (s, b) = self.get(path).await?;
        if s != 200 {
            bail!("GET {path}: HTTP {s}");
        }
        Ok(serde_json::from_slice(&b)?)
    }

    /// `storemesh_<name>` from `/metrics`.
    pub async fn metrics(&mut self) -> Result<Metrics> {
        let (_, b) = self.get("/metrics").await?;
        let text = String::from_utf8_lossy(&b);
        let val = |name: &str| -> u64 {
            let key = format!("storemesh_{name} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&key))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0) as u64
        };
        let kinds = storemesh_protocol::sync::MSG_KINDS;
        Ok(Metrics {
            msgs_out: val("sync_messages_out_total"),
            msgs_in: val("sync_messages_in_total"),
            bytes_out: val("sync_bytes_out_total"),
            bytes_in: val("sync_bytes_in_total"),
            by_kind: std::array::from_fn(|k| {
                val(&format!(
                    "sync_bytes_out_by_kind_total{{kind=\"{}\"}}",
                    kinds[k]
                ))
            }),
        })
    }

    pub async fn peers_connected(&mut self) -> Result<u64> {
        let v = self.get_json("/healthz").await?;
        Ok(v["peers_connected"].as_u64().unwrap_or(0))
    }

    /// Document id → heads (sorted), documents with heads only.
    pub async fn documents(&mut self) -> Result<Vec<(String, Vec<String>)>> {
        let v = self.get_json("/api/documents").await?;
        let mut out: Vec<(String, Vec<String>)> = v["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|d| {
                let id = d["id"].as_str()?.to_string();
                let mut heads: Vec<String> = d["heads"]
                    .as_array()?
                    .iter()
                    .filter_map(|h| h.as_str().map(String::from))
                    .collect();
                heads.sort();
                (!heads.is_empty()).then_some((id, heads))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub async fn stop(mut self) {
        // SAFETY: signalling a child process this struct started, by its pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    pub msgs_out: u64,
    pub msgs_in: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// Sync bytes sent, by message kind (`storemesh_protocol::sync::MSG_KINDS`).
    pub by_kind: [u64; storemesh_protocol::sync::MSG_KINDS.len()],
}
