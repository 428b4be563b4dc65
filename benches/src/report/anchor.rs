//! Row 7: side by side with automerge-repo on the workload of
//! `../shared/anchors/automerge-repo/README.md`, interleaved in the same run.
//!
//! storemesh side: three `storemesh run` OS processes on loopback (the web shop
//! `web` as hub, stores `store-b` and `store-c`, which peer only with the hub),
//! each store's location starting with 50 units of products 1..=10,000. Each
//! QUIC link runs through a UDP relay in this process, which counts the raw
//! bytes and cuts store-c off (the equivalent of `adapter.disconnect()`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use automerge::{Automerge, ChangeHash};
use serde_json::{json, Value};
use storemesh_node::config::{Config, Policy, Role};
use storemesh_node::demo::make_mesh;
use storemesh_protocol::wire::{Hello, PROTOCOL_VERSION};

use super::procs::{storemesh_binary, Metrics, Proc};
use super::{fmt_int, repo_root, Figure, Mode, Section, Verdict};
use crate::http::post_json;
use crate::proxy::{Snapshot, UdpRelay};
use crate::stats::{median, spread};
use crate::workload::Mulberry32;

const PRODUCTS: u64 = 10_000;
const SALES: usize = 2_000;
const POLL: Duration = Duration::from_millis(5);
const QUIET: Duration = Duration::from_millis(200);
const LIMIT: Duration = Duration::from_secs(60);

fn anchor_dir() -> PathBuf {
    repo_root().join("../shared/anchors/automerge-repo")
}

/// One run of the anchor (`RUNS=1 run.sh`): its `median` object.
pub fn run_anchor() -> Result<Value> {
    let script = anchor_dir().join("run.sh");
    if !script.is_file() {
        bail!("{} not found", script.display());
    }
    let out_file =
        std::env::temp_dir().join(format!("automerge-repo-anchor-{}.json", std::process::id()));
    let out = Command::new("bash")
        .arg(&script)
        .env("RUNS", "1")
        .env("OUT", &out_file)
        .output()
        .context("running the anchor")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| {
            format!(
                "the anchor printed no JSON line (exit {:?}): {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let v: Value = serde_json::from_str(line)?;
    Ok(v["median"].clone())
}

#[derive(Clone, Debug, Default)]
struct SmRun {
    p1_ms: f64,
    sales_ms_b: f64,
    sales_ms_c: f64,
    catchup_ms: f64,
    p3_ms: f64,
    p3_from_reconnect_ms: f64,
    p3_bytes: f64,
    p3_bytes_quiet: f64,
    p3_msgs: f64,
    p3_raw: f64,
    p3_out: [f64; 3],
    p3_by_kind: [f64; storemesh_protocol::sync::MSG_KINDS.len()],
    p3_cpu_ms: [f64; 3],
    change_bytes: f64,
    change_bytes_ledger: f64,
    changes: f64,
    p4_msgs: f64,
    p4_bytes: f64,
    p4_raw: f64,
    p4_raw_packets: f64,
    p4_quiet_ms: f64,
    rss_start: [f64; 3],
    rss_end: [f64; 3],
}

async fn metrics_all(ps: &mut [Proc]) -> Result<Vec<Metrics>> {
    let mut out = Vec::new();
    for p in ps.iter_mut() {
        out.push(p.metrics().await?);
    }
    Ok(out)
}

fn sum_out(ms: &[Metrics]) -> (u64, u64) {
    (
        ms.iter().map(|m| m.msgs_out).sum(),
        ms.iter().map(|m| m.bytes_out).sum(),
    )
}

/// Waits until no node's sync counters moved for `QUIET`; returns the instant
/// of the last movement.
async fn wait_quiet(ps: &mut [Proc]) -> Result<Instant> {
    let t = Instant::now();
    let mut last = metrics_all(ps).await?;
    let mut changed = Instant::now();
    loop {
        tokio::time::sleep(POLL).await;
        let now = metrics_all(ps).await?;
        if now != last {
            last = now;
            changed = Instant::now();
        } else if changed.elapsed() >= QUIET {
            return Ok(changed);
        }
        if t.elapsed() > LIMIT {
            bail!("sync traffic did not stop");
        }
    }
}

async fn same_docs(ps: &mut [Proc], which: &[usize]) -> Result<bool> {
    let first = ps[which[0]].documents().await?;
    for &i in &which[1..] {
        if ps[i].documents().await? != first {
            return Ok(false);
        }
    }
    Ok(!first.is_empty())
}

async fn wait_same(ps: &mut [Proc], which: &[usize]) -> Result<Instant> {
    let t = Instant::now();
    loop {
        if same_docs(ps, which).await? {
            return Ok(Instant::now());
        }
        if t.elapsed() > LIMIT {
            let mut differ = Vec::new();
            let docs: Vec<Vec<(String, Vec<String>)>> = {
                let mut v = Vec::new();
                for &i in which {
                    v.push(ps[i].documents().await.unwrap_or_default());
                }
                v
            };
            let first: BTreeMap<_, _> = docs[0].iter().cloned().collect();
            for (k, d) in docs.iter().enumerate().skip(1) {
                let other: BTreeMap<_, _> = d.iter().cloned().collect();
                let ids: std::collections::BTreeSet<&String> = first
                    .keys()
                    .chain(other.keys())
                    .filter(|id| first.get(*id) != other.get(*id))
                    .collect();
                let some: Vec<&&String> = ids.iter().take(5).collect();
                differ.push(format!(
                    "node {} differs from node {} in {} documents (e.g. {some:?})",
                    which[k],
                    which[0],
                    ids.len()
                ));
            }
            bail!("nodes {which:?} did not converge: {}", differ.join("; "));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn wait_peers(ps: &mut [Proc], want: [u64; 3]) -> Result<()> {
    let t = Instant::now();
    loop {
        let mut ok = true;
        for (i, p) in ps.iter_mut().enumerate() {
            ok &= p.peers_connected().await? == want[i];
        }
        if ok {
            return Ok(());
        }
        if t.elapsed() > LIMIT {
            bail!("peers did not reach {want:?} connections");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Sequential single-unit sales (one request, one durable commit, one change
/// per document each), products from mulberry32(seed) % 10,000 (+1).
async fn sell(p: &mut Proc, seed: u32, tag: &str) -> Result<f64> {
    let mut g = Mulberry32::new(seed);
    let t = Instant::now();
    let token = p.token.clone();
    for k in 0..SALES {
        let product = u64::from(g.next()) % PRODUCTS + 1;
        let body = json!({"sale_id": format!("{tag}-{k}"), "lines": [{"product_id": product, "quantity": 1}]});
        let (s, v) = post_json(&mut p.conn, "/api/sales", &token, &body).await?;
        if s != 201 {
            bail!("sale refused: HTTP {s} {v}");
        }
    }
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

/// Encoded bytes of the changes on `p` since `before` (whole set, ledger only, count).
async fn change_bytes(
    p: &mut Proc,
    before: &BTreeMap<String, Vec<String>>,
) -> Result<(f64, f64, f64)> {
    let (mut all, mut ledger, mut n) = (0u64, 0u64, 0u64);
    for (id, heads) in p.documents().await? {
        if before.get(&id) == Some(&heads) {
            continue;
        }
        let (s, bytes) = p.get(&format!("/api/documents/{id}")).await?;
        if s != 200 {
            bail!("GET document {id}: HTTP {s}");
        }
        let doc = Automerge::load(&bytes)?;
        let since: Vec<ChangeHash> = before
            .get(&id)
            .map(|h| storemesh_protocol::engine::parse_heads(h))
            .unwrap_or_default();
        for c in doc.get_changes(&since) {
            let len = c.raw_bytes().len() as u64;
            all += len;
            n += 1;
            if id.starts_with("ledger/") {
                ledger += len;
            }
        }
    }
    Ok((all as f64, ledger as f64, n as f64))
}

fn relays_sum(rs: &[&UdpRelay]) -> Snapshot {
    let mut t = Snapshot::default();
    for r in rs {
        let s = r.snapshot();
        t.bytes_up += s.bytes_up;
        t.bytes_down += s.bytes_down;
        t.packets_up += s.packets_up;
        t.packets_down += s.packets_down;
    }
    t
}

/// The size of one transport hello frame (sent once each way per connection),
/// with the state digest that a running node's hello carries.
pub fn hello_bytes(name: &str) -> usize {
    let h = Hello {
        protocol_version: PROTOCOL_VERSION,
        node_id: "0".repeat(64),
        name: name.into(),
        buckets: 64,
        nonce: u64::MAX / 3,
        digest: Some(storemesh_protocol::wire::HelloDigest {
            root: [0xff; 32],
            keys: [0xff; 32],
        }),
    };
    h.encode_frame().map(|f| f.len()).unwrap_or(0)
}

async fn storemesh_once(bin: &std::path::Path) -> Result<SmRun> {
    let tmp = tempfile::Builder::new()
        .prefix("storemesh-bench-am-")
        .tempdir()?;
    let names = ["web", "store-b", "store-c"];
    let dirs = make_mesh(
        tmp.path(),
        &[
            ("web", Role::Webshop, Policy::Strict),
            ("store-b", Role::Store, Policy::Strict),
            ("store-c", Role::Store, Policy::Strict),
        ],
        &[(0, 1), (0, 2)],
    )?;
    let mut cfgs: Vec<Config> = dirs
        .iter()
        .map(|(d, _)| Config::load(d))
        .collect::<Result<_>>()?;
    let quic: Vec<std::net::SocketAddr> = cfgs
        .iter()
        .map(|c| c.quic_socket())
        .collect::<Result<_>>()?;
    // Relays: who dials whom through which relay.
    let r_ab = UdpRelay::start(quic[1]).await?; // web → store-b
    let r_ba = UdpRelay::start(quic[0]).await?; // store-b → web
    let r_ac = UdpRelay::start(quic[2]).await?; // web → store-c
    let r_ca = UdpRelay::start(quic[0]).await?; // store-c → web
    for (i, c) in cfgs.iter_mut().enumerate() {
        c.sync.anti_entropy_ms = 600_000;
        // A cut link is noticed after 2 s of silence (phase 2 waits for it).
        // Dialling keeps the defaults a store runs with: the heal is timed
        // from the moment the link comes back, dial wait included.
        c.sync.keep_alive_ms = 500;
        c.sync.idle_timeout_ms = 2_000;
        for p in &mut c.peers {
            p.addr = match (i, p.name.as_str()) {
                (0, "store-b") => r_ab.listen,
                (0, "store-c") => r_ac.listen,
                (1, _) => r_ba.listen,
                _ => r_ca.listen,
            }
            .to_string();
        }
        c.save(&dirs[i].0)?;
    }
    let mut ps = Vec::new();
    for (i, (dir, token)) in dirs.iter().enumerate() {
        ps.push(Proc::spawn(bin, names[i], dir, token).await?);
    }
    let result = async {
        let mut r = SmRun::default();
        for (i, p) in ps.iter().enumerate() {
            r.rss_start[i] = p.rss_mib();
        }
        wait_peers(&mut ps, [2, 1, 1]).await?;
        // Stock: 50 units of every product at each store's own location.
        let all: Vec<u64> = (1..=PRODUCTS).collect();
        for (i, loc) in [(1usize, "store-b"), (2, "store-c")] {
            let token = ps[i].token.clone();
            for (k, chunk) in all.chunks(500).enumerate() {
                let lines: Vec<_> = chunk.iter().map(|p| json!({"product_id": p, "quantity": 50})).collect();
                let body = json!({"receipt_id": format!("{loc}-rcv-{k}"), "location": loc, "lines": lines});
                let (s, v) = post_json(&mut ps[i].conn, "/api/receipts", &token, &body).await?;
                if s != 201 {
                    bail!("receipt refused: HTTP {s} {v}");
                }
            }
        }
        // Phase 1: the stores' stock reaches every node.
        let t1 = Instant::now();
        let done = wait_same(&mut ps, &[0, 1, 2])
            .await
            .context("phase 1 (initial sync)")?;
        r.p1_ms = done.duration_since(t1).as_secs_f64() * 1000.0;
        wait_quiet(&mut ps).await?;
        let before: BTreeMap<String, Vec<String>> = ps[0].documents().await?.into_iter().collect();
        // Phase 2: store-c cut off; 2,000 sales at each store at once.
        r_ac.set_cut(true);
        r_ca.set_cut(true);
        wait_peers(&mut ps, [1, 1, 0]).await?;
        wait_quiet(&mut ps).await?;
        let (a, rest) = ps.split_at_mut(2);
        let (b, c) = (&mut a[1], &mut rest[0]);
        let (sb, sc) = tokio::join!(sell(b, 1, "b"), sell(c, 2, "c"));
        r.sales_ms_b = sb?;
        r.sales_ms_c = sc?;
        let last_b = Instant::now();
        let caught = wait_same(&mut ps, &[0, 1])
            .await
            .context("phase 2 (hub catches store-b up)")?;
        r.catchup_ms = caught.duration_since(last_b).as_secs_f64() * 1000.0;
        wait_quiet(&mut ps).await?;
        // Phase 3: heal.
        let m0 = metrics_all(&mut ps).await?;
        let raw0 = relays_sum(&[&r_ab, &r_ba, &r_ac, &r_ca]);
        let cpu0: Vec<f64> = ps.iter().map(|p| p.cpu_ms()).collect();
        let heal = Instant::now();
        r_ac.set_cut(false);
        r_ca.set_cut(false);
        let conv = wait_same(&mut ps, &[0, 1, 2])
            .await
            .context("phase 3 (heal)")?;
        for (i, p) in ps.iter().enumerate() {
            r.p3_cpu_ms[i] = p.cpu_ms() - cpu0[i];
        }
        let m1 = metrics_all(&mut ps).await?;
        r.p3_ms = conv.duration_since(heal).as_secs_f64() * 1000.0;
        let first = [r_ac.first_after_heal(), r_ca.first_after_heal()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(heal);
        r.p3_from_reconnect_ms = conv.saturating_duration_since(first).as_secs_f64() * 1000.0;
        wait_quiet(&mut ps).await?;
        let m2 = metrics_all(&mut ps).await?;
        let raw1 = relays_sum(&[&r_ab, &r_ba, &r_ac, &r_ca]).minus(&raw0);
        r.p3_bytes = (sum_out(&m1).1 - sum_out(&m0).1) as f64;
        r.p3_bytes_quiet = (sum_out(&m2).1 - sum_out(&m0).1) as f64;
        r.p3_msgs = (sum_out(&m2).0 - sum_out(&m0).0) as f64;
        r.p3_raw = raw1.bytes() as f64;
        for i in 0..3 {
            r.p3_out[i] = (m2[i].bytes_out - m0[i].bytes_out) as f64;
        }
        for (k, b) in r.p3_by_kind.iter_mut().enumerate() {
            *b = m2.iter().zip(&m0).map(|(a, z)| a.by_kind[k] - z.by_kind[k]).sum::<u64>() as f64;
        }
        let (cb, cl, cn) = change_bytes(&mut ps[0], &before).await?;
        r.change_bytes = cb;
        r.change_bytes_ledger = cl;
        r.changes = cn;
        // Phase 4: idle reconnect.
        r_ac.set_cut(true);
        r_ca.set_cut(true);
        wait_peers(&mut ps, [1, 1, 0]).await?;
        wait_quiet(&mut ps).await?;
        let m3 = metrics_all(&mut ps).await?;
        let raw3 = relays_sum(&[&r_ac, &r_ca]);
        let t4 = Instant::now();
        r_ac.set_cut(false);
        r_ca.set_cut(false);
        wait_peers(&mut ps, [2, 1, 1]).await?;
        let last = wait_quiet(&mut ps).await?;
        let m4 = metrics_all(&mut ps).await?;
        let raw4 = relays_sum(&[&r_ac, &r_ca]).minus(&raw3);
        let first = [r_ac.first_after_heal(), r_ca.first_after_heal()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(t4);
        r.p4_quiet_ms = last.saturating_duration_since(first).as_secs_f64() * 1000.0;
        let hello = (hello_bytes("web") + hello_bytes("store-c")) as f64;
        r.p4_msgs = (sum_out(&m4).0 - sum_out(&m3).0) as f64 + 2.0;
        r.p4_bytes = (sum_out(&m4).1 - sum_out(&m3).1) as f64 + hello;
        r.p4_raw = raw4.bytes() as f64;
        r.p4_raw_packets = raw4.packets() as f64;
        for (i, p) in ps.iter().enumerate() {
            r.rss_end[i] = p.rss_mib();
        }
        Ok::<SmRun, anyhow::Error>(r)
    }
    .await;
    for p in ps {
        p.stop().await;
    }
    // `STOREMESH_BENCH_KEEP=1` keeps the data directories (and node logs) for
    // inspection; `STOREMESH_BENCH_NODE_LOG` sets the nodes' log filter.
    if std::env::var_os("STOREMESH_BENCH_KEEP").is_some() {
        let kept = tmp.keep();
        eprintln!("  kept the run's directories in {}", kept.display());
    }
    result
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

pub async fn run(mode: Mode) -> Result<Section> {
    let mut s =
        Section::new("7 · Side by side with automerge-repo (hub + 2 stores, partition and heal)");
    // Quick mode (CI): one pair (the anchor's workload is fixed; ~45 s).
    // Full: 5 interleaved pairs, the medians of the target.
    let pairs = mode.pick(1, 5);
    let bin = tokio::task::spawn_blocking(storemesh_binary).await??;
    let have_node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let mut anchors: Vec<Value> = Vec::new();
    let mut anchor_err = None;
    let mut ours: Vec<SmRun> = Vec::new();
    for i in 0..pairs {
        if have_node && anchor_err.is_none() {
            match tokio::task::spawn_blocking(run_anchor).await? {
                Ok(v) => {
                    eprintln!(
                        "  automerge-repo run {}: heal {:.0} ms, {} B; idle reconnect {} B / {} msgs",
                        i + 1,
                        num(&v, "p3_converge_ms"),
                        num(&v, "p3_bytes_total"),
                        num(&v, "p4_bytes_total"),
                        num(&v, "p4_msgs_total")
                    );
                    anchors.push(v);
                }
                Err(e) => anchor_err = Some(format!("{e:#}")),
            }
        }
        let r = storemesh_once(&bin).await?;
        eprintln!(
            "  storemesh run {}: heal {:.0} ms, {} B; idle reconnect {} B / {} msgs; RSS {:.0}/{:.0}/{:.0} MiB",
            i + 1,
            r.p3_ms,
            r.p3_bytes_quiet,
            r.p4_bytes,
            r.p4_msgs,
            r.rss_end[0],
            r.rss_end[1],
            r.rss_end[2]
        );
        ours.push(r);
    }
    let o = |f: &dyn Fn(&SmRun) -> f64| ours.iter().map(f).collect::<Vec<f64>>();
    let a = |k: &str| anchors.iter().map(|v| num(v, k)).collect::<Vec<f64>>();
    let have_anchor = !anchors.is_empty();
    let am = |k: &str| median(&a(k));
    let heal = median(&o(&|r| r.p3_ms));
    let heal_bytes = median(&o(&|r| r.p3_bytes_quiet));
    let p4_bytes = median(&o(&|r| r.p4_bytes));
    let p4_msgs = median(&o(&|r| r.p4_msgs));
    let rss_node = median(&o(&|r| r.rss_end.iter().sum::<f64>() / 3.0));
    let rss_anchor = if have_anchor {
        median(
            &anchors
                .iter()
                .map(|v| (num(v, "rss_mb_A") + num(v, "rss_mb_B") + num(v, "rss_mb_C")) / 3.0)
                .collect::<Vec<_>>(),
        )
    } else {
        f64::NAN
    };
    let verdict = |ok: bool| {
        if have_anchor {
            Verdict::of(ok)
        } else {
            Verdict::Skipped
        }
    };
    // Counted from the moment the link comes back (the relays stop dropping),
    // what a store sees: the wait for the next dial to cross the healed link
    // is included. The anchor's clock starts at `adapter.connect()`.
    let heal_conn = median(&o(&|r| r.p3_from_reconnect_ms));
    let heal_ratio = am("p3_converge_ms") / heal;
    s.figures.push(
        Figure::new("7", "heal: link back → identical heads on all 3")
            .value(format!(
                "{heal:.0} ms from the link's return ({heal_conn:.0} ms from the new connection's first packet)"
            ))
            .baseline(format!("{:.0} ms automerge-repo", am("p3_converge_ms")))
            .ratio(format!("{heal_ratio:.1}× faster"))
            .target("≥ 3× faster", verdict(heal_ratio >= 3.0)),
    );
    let bytes_ratio = heal_bytes / am("p3_bytes_total");
    s.figures.push(
        Figure::new("7", "heal: payload bytes, all links")
            .value(format!("{} B", fmt_int(heal_bytes)))
            .baseline(format!(
                "{} B automerge-repo",
                fmt_int(am("p3_bytes_total"))
            ))
            .ratio(format!("{:.0} %", bytes_ratio * 100.0))
            .target("≤ 50 %", verdict(bytes_ratio <= 0.5)),
    );
    let p4_sync = median(&o(&|r| r.p4_msgs - 2.0));
    s.figures.push(
        Figure::new("7", "idle reconnect: bytes (incl. hellos)")
            .value(format!("{} B", fmt_int(p4_bytes)))
            .baseline(format!(
                "{} B automerge-repo",
                fmt_int(am("p4_bytes_total"))
            ))
            .ratio(format!("{:.1} %", p4_bytes / am("p4_bytes_total") * 100.0))
            .target("≤ 2 KB", Verdict::of(p4_bytes <= 2048.0)),
    );
    s.figures.push(
        Figure::new("7", "idle reconnect: messages")
            .value(format!(
                "{p4_msgs:.0} ({p4_sync:.0} sync frames + 2 hellos)"
            ))
            .baseline(format!(
                "{:.0} messages automerge-repo",
                am("p4_msgs_total")
            ))
            .target("≤ 3", Verdict::of(p4_msgs <= 3.0)),
    );
    let rss_ratio = rss_node / rss_anchor;
    s.figures.push(
        Figure::new("7", "RSS per node at the end")
            .value(format!("{rss_node:.1} MiB"))
            .baseline(format!("{rss_anchor:.1} MiB automerge-repo"))
            .ratio(format!("{:.0} %", rss_ratio * 100.0))
            .target("≤ 50 %", verdict(rss_ratio <= 0.5)),
    );
    s.note(format!(
        "{pairs} interleaved pairs: one run of the anchor (`RUNS=1 run.sh`, cold processes), \
         then one storemesh run. storemesh: three `storemesh run` OS processes \
         (`{}`), web shop `web` as hub, `store-b` and `store-c` peering only with it; every \
         QUIC link goes through a UDP relay in the benchmark process, which counts raw bytes \
         and cuts store-c's link (both directions) for the partition and the idle reconnect. \
         Sync settings: keep-alive 500 ms, idle timeout 2 s (so that a cut link is noticed), \
         dialling as configured by default (reconnect back-off 200 ms–10 s, connect timeout 2 s; \
         after a dial that got no answer the next starts within 250 ms, \
         `transport::REDIAL_INTERVAL_MAX`), anti-entropy tick 10 min (none falls into a measured \
         window). Phase 1: each store receives 50 units of products 1..=10,000 at its own \
         location (20 receipts of 500 lines), then all nodes converge. Phase 2: store-c cut off; \
         2,000 sales at each store at once, each one `POST /api/sales` of one unit, sequential \
         (one durable commit and one Automerge change per document per sale), products \
         mulberry32 seed 1 / 2, `% 10,000 + 1`. Phase 3: heal; convergence = identical \
         document heads on all three (`GET /api/documents` polled every 5 ms). Phase 4: cut, \
         wait until both ends dropped the connection, heal; count until 200 ms without a sync \
         frame.\n",
        bin.display()
    ));
    s.note(
        "Counting: payload = sync frames as sent (`storemesh_sync_bytes_out_total`, 4-byte length \
         prefix included), the analogue of the anchor's WebSocket message bytes. The transport \
         hello (one frame each way per connection; it carries the sender's root and key-store \
         digests, so two in-sync nodes need no further message) is not in those counters: it is \
         added to the idle-reconnect messages and bytes, at its encoded size with the digest \
         (the anchor counts its join/peer messages too). Raw = \
         UDP payload through the relays (QUIC packets: headers, ACKs, keep-alives, and the \
         mutual-TLS handshake with both certificates on a reconnect), the analogue of the \
         anchor's raw TCP bytes. A storemesh sale writes two things: the ledger cell and a \
         JSON sale record (sale id, node, location, lines, total, time); the anchor writes the \
         ledger cell only.\n",
    );
    s.note(
        "Heal timing: counted from the moment the link comes back (the relays stop \
         dropping), what a store sees; the anchor's clock starts at `adapter.connect()`, \
         which opens a socket at once. storemesh's time includes the wait until a dial \
         crosses the healed link: a dial sent into the cut link is abandoned after the \
         connect timeout and the next starts within 250 ms. The time from the new \
         connection's first datagram is given too.\n",
    );
    if have_anchor {
        let pairs_line: Vec<String> = ours
            .iter()
            .zip(&anchors)
            .map(|(r, v)| format!("{:.0} / {:.0}", r.p3_ms, num(v, "p3_converge_ms")))
            .collect();
        s.note(format!(
            "Heal per pair, in run order (storemesh from the link's return / automerge-repo), ms: {}.\n",
            pairs_line.join(", ")
        ));
    }
    if let Some(e) = &anchor_err {
        s.note(format!("\nThe anchor did not run: `{e}`\n"));
    } else if !have_node {
        s.note("\nThe anchor did not run: `node` is not installed.\n");
    }
    let sm = |f: &dyn Fn(&SmRun) -> f64, d: usize| spread(&o(f), d);
    let an = |k: &str, d: usize| {
        if have_anchor {
            spread(&a(k), d)
        } else {
            "—".into()
        }
    };
    s.note("| figure | storemesh | automerge-repo (cold) |\n|---|---|---|");
    let rows: Vec<(&str, String, String)> = vec![
        (
            "phase 1: initial sync, ms (not the same work: see above)",
            sm(&|r| r.p1_ms, 0),
            an("p1_converge_ms", 0),
        ),
        (
            "phase 2: 2,000 sales at store-b, ms",
            sm(&|r| r.sales_ms_b, 0),
            an("p2_sales_ms_B", 0),
        ),
        (
            "phase 2: 2,000 sales at store-c, ms",
            sm(&|r| r.sales_ms_c, 0),
            an("p2_sales_ms_C", 0),
        ),
        (
            "phase 2: B's last sale → hub has B's heads, ms",
            sm(&|r| r.catchup_ms, 0),
            an("p2_B_to_A_catchup_ms", 0),
        ),
        (
            "changes made in phase 2",
            sm(&|r| r.changes, 0),
            an("p2_changes_B", 0) + " + " + &an("p2_changes_C", 0),
        ),
        (
            "their encoded bytes",
            sm(&|r| r.change_bytes, 0),
            an("change_bytes_total", 0),
        ),
        (
            "  of which ledger documents",
            sm(&|r| r.change_bytes_ledger, 0),
            an("change_bytes_total", 0),
        ),
        (
            "phase 3: link back → converged, ms",
            sm(&|r| r.p3_ms, 0),
            an("p3_converge_ms", 0),
        ),
        (
            "phase 3: first packet of the new connection → converged, ms",
            sm(&|r| r.p3_from_reconnect_ms, 0),
            "—".into(),
        ),
        (
            "phase 3: link back → first packet of the new connection, ms",
            sm(&|r| r.p3_ms - r.p3_from_reconnect_ms, 0),
            "—".into(),
        ),
        (
            "phase 3: CPU time of hub / store-b / store-c, heal → converged, ms (sum)",
            format!(
                "{} / {} / {} ({})",
                sm(&|r| r.p3_cpu_ms[0], 0),
                sm(&|r| r.p3_cpu_ms[1], 0),
                sm(&|r| r.p3_cpu_ms[2], 0),
                sm(&|r| r.p3_cpu_ms.iter().sum(), 0)
            ),
            "—".into(),
        ),
        (
            "phase 3: payload bytes until converged",
            sm(&|r| r.p3_bytes, 0),
            an("p3_bytes_total", 0),
        ),
        (
            "phase 3: payload bytes until quiet",
            sm(&|r| r.p3_bytes_quiet, 0),
            an("p3_bytes_total_until_quiet", 0),
        ),
        (
            "phase 3: raw bytes until quiet (QUIC / TCP)",
            sm(&|r| r.p3_raw, 0),
            an("p3_raw_bytes_total_until_quiet", 0),
        ),
        (
            "phase 3: payload sent by hub / store-b / store-c",
            format!(
                "{} / {} / {}",
                sm(&|r| r.p3_out[0], 0),
                sm(&|r| r.p3_out[1], 0),
                sm(&|r| r.p3_out[2], 0)
            ),
            if have_anchor {
                format!(
                    "{} / {} / {}",
                    spread(
                        &anchors
                            .iter()
                            .map(|v| num(v, "p3_bytes_A_to_B") + num(v, "p3_bytes_A_to_C"))
                            .collect::<Vec<_>>(),
                        0
                    ),
                    an("p3_bytes_B_to_A", 0),
                    an("p3_bytes_C_to_A", 0)
                )
            } else {
                "—".into()
            },
        ),
        (
            "phase 3: payload bytes by message kind",
            storemesh_protocol::sync::MSG_KINDS
                .iter()
                .enumerate()
                .filter(|(k, _)| ours.iter().any(|r| r.p3_by_kind[*k] > 0.0))
                .map(|(k, name)| format!("{name} {}", sm(&|r: &SmRun| r.p3_by_kind[k], 0)))
                .collect::<Vec<_>>()
                .join(", "),
            "—".into(),
        ),
        (
            "phase 3: messages",
            sm(&|r| r.p3_msgs, 0),
            an("p3_msgs_total", 0),
        ),
        (
            "phase 3: payload / change bytes",
            sm(&|r| r.p3_bytes / r.change_bytes, 2),
            an("p3_wire_over_change_bytes", 2),
        ),
        (
            "phase 4: messages (incl. hellos / join+peer)",
            sm(&|r| r.p4_msgs, 0),
            an("p4_msgs_total", 0),
        ),
        (
            "phase 4: payload bytes (incl. hellos)",
            sm(&|r| r.p4_bytes, 0),
            an("p4_bytes_total", 0),
        ),
        (
            "phase 4: raw bytes (QUIC handshake incl. / TCP)",
            sm(&|r| r.p4_raw, 0),
            an("p4_raw_bytes_total", 0),
        ),
        (
            "phase 4: raw UDP packets",
            sm(&|r| r.p4_raw_packets, 0),
            "—".into(),
        ),
        (
            "phase 4: reconnect → last message, ms",
            sm(&|r| r.p4_quiet_ms, 0),
            an("p4_quiet_ms", 0),
        ),
        (
            "RSS hub / store-b / store-c at start, MiB",
            format!(
                "{} / {} / {}",
                sm(&|r| r.rss_start[0], 1),
                sm(&|r| r.rss_start[1], 1),
                sm(&|r| r.rss_start[2], 1)
            ),
            format!(
                "{} / {} / {}",
                an("rss_mb_A_at_start", 1),
                an("rss_mb_B_at_start", 1),
                an("rss_mb_C_at_start", 1)
            ),
        ),
        (
            "RSS hub / store-b / store-c at the end, MiB",
            format!(
                "{} / {} / {}",
                sm(&|r| r.rss_end[0], 1),
                sm(&|r| r.rss_end[1], 1),
                sm(&|r| r.rss_end[2], 1)
            ),
            format!(
                "{} / {} / {}",
                an("rss_mb_A", 1),
                an("rss_mb_B", 1),
                an("rss_mb_C", 1)
            ),
        ),
    ];
    for (k, x, y) in rows {
        s.note(format!("| {k} | {x} | {y} |"));
    }
    if have_anchor {
        s.note(format!(
            "\nThe anchor's own check (`verify_ok`) passed in {} of {} runs.",
            a("verify_ok").iter().filter(|v| **v == 1.0).count(),
            anchors.len()
        ));
    }
    Ok(s)
}
