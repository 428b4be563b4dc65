//! Row 8: the store-node history ratio (issue 14). One store node, set up as a
//! new user would (`storemesh init`, `storemesh run` as an OS process),
//! receives 20,000 products over HTTP, then sells single units over HTTP with
//! 32 keep-alive clients until S1 sales; it is stopped (SIGTERM) and started
//! again, and restart → ready and RSS are measured; then the sales go on to
//! S2 = 100 × S1 and the node is restarted and measured again. Both sizes are
//! measured in the same run, side by side.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::nodes::{mix, stock};
use super::procs::{storemesh_binary, Proc};
use super::{fmt_int, Figure, Mode, Section, Verdict};
use crate::http::{request, Conn};

const ROW: &str = "8";
/// The node's name (and, by `storemesh init`'s default, its location).
const NAME: &str = "shop";
/// Products received before the first sale.
const PRODUCTS: u64 = 20_000;
/// Lines per receipt (the receipts of the issue's measurement).
const RECEIPT_LINES: usize = 500;
/// Units received per product: more than any run sells of one product.
const STOCK: u64 = 1_000_000_000;
/// Concurrent keep-alive HTTP clients posting sales.
const CLIENTS: usize = 32;
/// S2 = MULTIPLE × S1 (the target's "100× the history").
const MULTIPLE: u64 = 100;
/// Quick mode (CI, under a minute): S2 = 10 × S1 = 20,000.
const QUICK_MULTIPLE: u64 = 10;
/// Full mode: phase 2 is sized to fit this long at phase 1's rate ...
const FULL_PHASE2_BUDGET: Duration = Duration::from_secs(600);
/// ... and stopped where it is if it takes this much longer than planned, or
/// than the budget, whichever is later (the rate falls as the history grows);
/// the row then says so.
const PHASE2_OVERRUN: f64 = 1.5;
/// Quick mode (CI): phase 2 is cut off after this long whatever its count.
const QUICK_PHASE2_CAP: Duration = Duration::from_secs(40);
/// The load stops if the node's RSS passes this (a shared 24 GiB machine with
/// no swap; the target is 192 MiB, so this is a runaway, not a measurement).
const RSS_ABORT_MIB: f64 = 6_144.0;
/// Longest wait for a (re)started node to be ready (full / quick mode).
const READY_LIMIT: Duration = Duration::from_secs(600);
const QUICK_READY_LIMIT: Duration = Duration::from_secs(30);
/// SIGTERM → exit longer than this is a SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(60);

/// Targets of issue 14.
const TARGET_RSS_MIB: f64 = 192.0;
const TARGET_RSS_RATIO: f64 = 1.2;
const TARGET_READY_S: f64 = 2.0;
const TARGET_BYTES_PER_SALE: f64 = 200.0;

/// `VmRSS` and `VmHWM` of a process, MiB.
fn rss_hwm_mib(pid: u32) -> Option<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let kib: f64 = s
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Bytes the files under `dir` occupy on disk: their allocated blocks, not
/// their apparent sizes. redb grows its file by doubling it (below 4 GiB)
/// with a sparse extension that takes no disk until pages are written, so
/// the apparent size of a file with 300 MB of pages can be 600 MB.
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.blocks() * 512,
                Err(_) => {}
            }
        }
    }
    total
}

/// `storemesh init` as a new user runs it; returns the admin token it prints.
fn init(bin: &Path, dir: &Path) -> Result<String> {
    let http = format!("127.0.0.1:{}", storemesh_node::demo::free_port()?);
    let quic = format!("127.0.0.1:{}", storemesh_node::demo::free_port()?);
    let out = Command::new(bin)
        .args(["init", "--data-dir"])
        .arg(dir)
        .args(["--name", NAME, "--http-addr", &http, "--quic-addr", &quic])
        .stdin(Stdio::null())
        .output()
        .context("running storemesh init")?;
    if !out.status.success() {
        bail!(
            "storemesh init failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("api_token:"))
        .map(|t| t.trim().to_string())
        .context("storemesh init printed no api_token")
}

/// `storemesh run --data-dir DIR`, its log beside the data directory (so the
/// directory's bytes are the node's own).
fn spawn(bin: &Path, dir: &Path, log: &Path, token: &str) -> Result<Proc> {
    let cfg = storemesh_node::config::Config::load(dir)?;
    let http = cfg.http_socket()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let child = Command::new(bin)
        .args(["run", "--data-dir"])
        .arg(dir)
        .env(
            "RUST_LOG",
            std::env::var("STOREMESH_BENCH_NODE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Proc {
        name: NAME.into(),
        child,
        http,
        token: token.into(),
        conn: Conn::new(http),
    })
}

fn sale_request(token: &str, id: &str, product: u64) -> Vec<u8> {
    let body = format!(
        r#"{{"sale_id":"{id}","lines":[{{"product_id":{product},"quantity":1,"unit_price":1999}}],"currency":"EUR"}}"#
    );
    request("POST", "/api/sales", Some(token), Some(body.as_bytes()))
}

/// What a start measured: from the spawn to the first `/healthz` answer, to
/// `"ready": true`, and to a read and a write (a sale answered 201) served.
struct Start {
    first_answer: Duration,
    ready: Duration,
    served: Duration,
    rss: f64,
    hwm: f64,
}

/// Starts the node and waits until it is ready and serves a read and, with a
/// `probe` sale id, a write (the empty node's first start has nothing to sell).
async fn start(
    bin: &Path,
    dir: &Path,
    log: &Path,
    token: &str,
    probe: Option<&str>,
    limit: Duration,
) -> Result<(Proc, Start)> {
    let t = Instant::now();
    let mut p = spawn(bin, dir, log, token)?;
    let mut first_answer = None;
    let mut ready = None;
    let mut read = false;
    let result = loop {
        if t.elapsed() > limit {
            break Err(anyhow::anyhow!(
                "not ready and serving within {limit:?} (ready: {ready:?}, read: {read})"
            ));
        }
        if let Ok(Some(st)) = p.child.try_wait() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let tail = &log[log.len().saturating_sub(2000)..];
            break Err(anyhow::anyhow!("the node exited ({st}): {tail}"));
        }
        if ready.is_none() {
            if let Ok((200, b)) = p.conn.send(&request("GET", "/healthz", None, None)).await {
                first_answer.get_or_insert(t.elapsed());
                let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
                if v["ready"].as_bool() == Some(true) {
                    ready = Some(t.elapsed());
                    continue;
                }
            }
        } else if !read {
            // Served: any answer but a server error (the empty node's first
            // start has no such product yet: 404).
            read = matches!(
                p.get(&format!("/api/inventory?product_id={}", PRODUCTS / 2))
                    .await,
                Ok((s, _)) if s < 500
            );
            if read {
                continue;
            }
        } else if probe.is_none() {
            let served = t.elapsed();
            let (rss, hwm) = rss_hwm_mib(p.pid()).unwrap_or((f64::NAN, f64::NAN));
            break Ok(Start {
                first_answer: first_answer.unwrap_or(served),
                ready: ready.unwrap_or(served),
                served,
                rss,
                hwm,
            });
        } else if let Some(probe) = probe {
            match p.conn.send(&sale_request(token, probe, 1)).await {
                Ok((201, _)) => {
                    let served = t.elapsed();
                    let (rss, hwm) = rss_hwm_mib(p.pid()).unwrap_or((f64::NAN, f64::NAN));
                    break Ok(Start {
                        first_answer: first_answer.unwrap_or(served),
                        ready: ready.unwrap_or(served),
                        served,
                        rss,
                        hwm,
                    });
                }
                Ok((s, b)) if s != 503 => {
                    break Err(anyhow::anyhow!(
                        "probe sale after restart: HTTP {s} {}",
                        String::from_utf8_lossy(&b)
                    ))
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    match result {
        Ok(s) => Ok((p, s)),
        Err(e) => {
            p.stop().await;
            Err(e)
        }
    }
}

/// SIGTERM and wait: (time to exit, whether a SIGKILL was needed).
async fn stop(mut p: Proc) -> (Duration, bool) {
    let t = Instant::now();
    // SAFETY: signalling the child process this row started, by its pid.
    unsafe {
        libc::kill(p.child.id() as libc::pid_t, libc::SIGTERM);
    }
    while t.elapsed() < STOP_LIMIT {
        if let Ok(Some(_)) = p.child.try_wait() {
            return (t.elapsed(), false);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = p.child.kill();
    let _ = p.child.wait();
    (t.elapsed(), true)
}

/// One phase of sales: sale numbers `from..to`, `CLIENTS` closed-loop clients.
struct Phase {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    took: Duration,
    /// Stopped before `to` (deadline or runaway memory), and why.
    cut: Option<String>,
    /// The node's `VmRSS` / `VmHWM` at the phase's end, MiB.
    rss_end: f64,
    hwm_end: f64,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.took.as_secs_f64()
    }
}

async fn sell(p: &Proc, from: u64, to: u64, deadline: Instant) -> Phase {
    let next = Arc::new(AtomicU64::new(from));
    let stop = Arc::new(AtomicBool::new(false));
    let cut: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let pid = p.pid();
    let t = Instant::now();
    let watch = {
        let (stop, cut) = (stop.clone(), cut.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let rss = crate::machine::rss_mib(pid).unwrap_or(0.0);
                let why = if rss > RSS_ABORT_MIB {
                    Some(format!("the node's RSS passed {RSS_ABORT_MIB:.0} MiB"))
                } else if Instant::now() > deadline {
                    Some("out of time".to_string())
                } else {
                    None
                };
                if let Some(why) = why {
                    if let Ok(mut c) = cut.lock() {
                        c.get_or_insert(why);
                    }
                    stop.store(true, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (next, stop, cut) = (next.clone(), stop.clone(), cut.clone());
        let (addr, token) = (p.http, p.token.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr);
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
            while !stop.load(Ordering::Relaxed) {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= to {
                    break;
                }
                let product = 1 + mix(k) % PRODUCTS;
                match conn
                    .send(&sale_request(&token, &format!("s-{k}"), product))
                    .await
                {
                    Ok((201, _)) => ok += 1,
                    // The node cannot take writes any more (its engine
                    // stopped, or it is shutting down): the phase ends here
                    // and the row says so, instead of counting fast refusals.
                    Ok((503, b)) => {
                        errors += 1;
                        if let Ok(mut c) = cut.lock() {
                            c.get_or_insert_with(|| {
                                format!(
                                    "the node answered 503: {}",
                                    String::from_utf8_lossy(&b[..b.len().min(200)])
                                )
                            });
                        }
                        stop.store(true, Ordering::Relaxed);
                    }
                    Ok((s, b)) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| {
                            format!(
                                "HTTP {s}: {}",
                                String::from_utf8_lossy(&b[..b.len().min(200)])
                            )
                        });
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            (ok, errors, first_error)
        }));
    }
    let mut out = Phase {
        ok: 0,
        errors: 0,
        first_error: None,
        took: Duration::ZERO,
        cut: None,
        rss_end: f64::NAN,
        hwm_end: f64::NAN,
    };
    for task in tasks {
        if let Ok((ok, errors, first_error)) = task.await {
            out.ok += ok;
            out.errors += errors;
            if out.first_error.is_none() {
                out.first_error = first_error;
            }
        }
    }
    out.took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = watch.await;
    out.cut = cut.lock().ok().and_then(|c| c.clone());
    (out.rss_end, out.hwm_end) = rss_hwm_mib(pid).unwrap_or((f64::NAN, f64::NAN));
    out
}

/// A figure's verdict: at the target's sizes, met or missed; at reduced sizes
/// a miss is still a miss, but a pass is for information only.
fn verdict(ok: bool, at_target: bool) -> Verdict {
    match (ok, at_target) {
        (_, true) => Verdict::of(ok),
        (false, false) => Verdict::Missed,
        (true, false) => Verdict::Info,
    }
}

/// What one history point measured (after its phase's sales, the restart).
struct Point {
    sales: u64,
    phase: Phase,
    stop: (Duration, bool),
    dir_bytes: u64,
    start: Start,
}

pub async fn run(mode: Mode) -> Result<Section> {
    let s1: u64 = mode.pick(2_000, 20_000);
    let bin = tokio::task::spawn_blocking(storemesh_binary).await??;
    let tmp = tempfile::Builder::new()
        .prefix("storemesh-bench-history-")
        .tempdir()?;
    let dir: PathBuf = tmp.path().join(NAME);
    let log = tmp.path().join("node.log");
    let token = init(&bin, &dir)?;
    let result = measure(mode, s1, &bin, &dir, &log, &token).await;
    if std::env::var_os("STOREMESH_BENCH_KEEP").is_some() {
        let kept = tmp.keep();
        eprintln!("  history row: kept {}", kept.display());
    }
    result
}

async fn measure(
    mode: Mode,
    s1: u64,
    bin: &Path,
    dir: &Path,
    log: &Path,
    token: &str,
) -> Result<Section> {
    let limit = mode.pick(QUICK_READY_LIMIT, READY_LIMIT);
    // First start of the empty node, products received.
    let (p, first) = start(bin, dir, log, token, None, limit).await?;
    let mut sold = 0u64;
    let t = Instant::now();
    let products: Vec<u64> = (1..=PRODUCTS).collect();
    // `stock` posts receipts of 500 lines (RECEIPT_LINES) each.
    if let Err(e) = stock(p.http, token, NAME, &products, STOCK, "rcv").await {
        stop(p).await;
        return Err(e.context("receiving the products"));
    }
    let receive_s = t.elapsed().as_secs_f64();
    eprintln!(
        "  history: node ready in {:.2} s, {} products received in {receive_s:.1} s",
        first.served.as_secs_f64(),
        fmt_int(PRODUCTS as f64)
    );

    // Phase 1: to S1 sales; stop; restart.
    let ph1 = sell(
        &p,
        sold,
        s1,
        Instant::now() + mode.pick(QUICK_PHASE2_CAP, FULL_PHASE2_BUDGET),
    )
    .await;
    sold += ph1.ok;
    let stop1 = stop(p).await;
    let bytes1 = dir_bytes(dir);
    let sales1 = sold;
    let (p, start1) = start(bin, dir, log, token, Some("probe-1"), limit).await?;
    sold += 1;
    let at1 = Point {
        sales: sales1,
        phase: ph1,
        stop: stop1,
        dir_bytes: bytes1,
        start: start1,
    };
    eprintln!(
        "  history S1: {} sales at {:.0}/s; restart → ready {:.2} s, RSS {:.0} MiB (peak {:.0})",
        fmt_int(at1.sales as f64),
        at1.phase.rate(),
        at1.start.served.as_secs_f64(),
        at1.start.rss,
        at1.start.hwm
    );
    if let Some(why) = &at1.phase.cut {
        stop(p).await;
        bail!(
            "phase 1 stopped at {} sales: {why}",
            fmt_int(at1.sales as f64)
        );
    }

    // Phase 2: to S2 = MULTIPLE × S1 if it fits the budget at phase 1's rate.
    let (s2, deadline, planned) = match mode {
        Mode::Quick => (QUICK_MULTIPLE * s1, Instant::now() + QUICK_PHASE2_CAP, None),
        Mode::Full => {
            let fits = ((at1.phase.rate() * FULL_PHASE2_BUDGET.as_secs_f64()) as u64 + s1) / s1;
            let m = fits.clamp(2, MULTIPLE);
            let plan = Duration::from_secs_f64(
                ((m - 1) * s1) as f64 / at1.phase.rate().max(1.0) * PHASE2_OVERRUN,
            );
            (
                m * s1,
                Instant::now() + plan.max(FULL_PHASE2_BUDGET),
                Some(m),
            )
        }
    };
    eprintln!(
        "  history: phase 2 to {} sales ({}× S1){}",
        fmt_int(s2 as f64),
        s2 / s1,
        if mode == Mode::Full && s2 < MULTIPLE * s1 {
            " — 100× does not fit the time budget at phase 1's rate"
        } else {
            ""
        }
    );
    let ph2 = sell(&p, sold, s2, deadline).await;
    sold += ph2.ok;
    let stop2 = stop(p).await;
    let bytes2 = dir_bytes(dir);
    let sales2 = sold;
    let (p, start2) = start(bin, dir, log, token, Some("probe-2"), limit).await?;
    stop(p).await;
    let at2 = Point {
        sales: sales2,
        phase: ph2,
        stop: stop2,
        dir_bytes: bytes2,
        start: start2,
    };
    eprintln!(
        "  history S2: {} sales at {:.0}/s; restart → ready {:.2} s, RSS {:.0} MiB (peak {:.0})",
        fmt_int(at2.sales as f64),
        at2.phase.rate(),
        at2.start.served.as_secs_f64(),
        at2.start.rss,
        at2.start.hwm
    );
    Ok(section(
        mode, s1, s2, planned, receive_s, &first, &at1, &at2,
    ))
}

#[allow(clippy::too_many_arguments)]
fn section(
    mode: Mode,
    s1: u64,
    s2: u64,
    planned: Option<u64>,
    receive_s: f64,
    first: &Start,
    at1: &Point,
    at2: &Point,
) -> Section {
    let multiple = at2.sales as f64 / at1.sales as f64;
    // The targets are for 20,000 and 2,000,000 sales.
    let at_target = mode == Mode::Full && at2.sales >= MULTIPLE * 20_000;
    let reduced = if at_target {
        String::new()
    } else {
        format!(
            " (here {}k / {}k sales; the target's 20k / 2M in `--full`)",
            at1.sales / 1000,
            at2.sales / 1000
        )
    };
    let mut s = Section::new(
        "8 · Store-node history ratio: 20,000 products, sales over HTTP, restart at S1 and 100 × S1",
    );
    let sizes = format!(
        "{} / {} sales",
        fmt_int(at1.sales as f64),
        fmt_int(at2.sales as f64)
    );
    // RSS after restart.
    let ratio = at2.start.rss / at1.start.rss;
    let peak_ratio = at2.start.hwm / at1.start.hwm;
    let rss_ok = ratio <= TARGET_RSS_RATIO
        && at1.start.hwm <= TARGET_RSS_MIB
        && at2.start.hwm <= TARGET_RSS_MIB;
    s.figures.push(
        Figure::new(
            ROW,
            &format!("store node RSS when ready after restart, {sizes} (peak VmHWM)"),
        )
        .value(format!(
            "{:.0} MiB / {:.0} MiB (peak {:.0} / {:.0})",
            at1.start.rss, at2.start.rss, at1.start.hwm, at2.start.hwm
        ))
        .baseline(format!(
            "{:.0} MiB at {}",
            at1.start.rss,
            fmt_int(at1.sales as f64)
        ))
        .ratio(format!("{ratio:.2}× (peak {peak_ratio:.2}×)"))
        .target(
            format!("≤ {TARGET_RSS_RATIO}×, peak ≤ {TARGET_RSS_MIB:.0} MiB each{reduced}"),
            verdict(rss_ok, at_target),
        ),
    );
    let r1 = at1.start.served.as_secs_f64();
    let r2 = at2.start.served.as_secs_f64();
    s.figures.push(
        Figure::new(
            ROW,
            &format!("store node restart → ready, a read and a sale served, {sizes}"),
        )
        .value(format!("{r1:.2} s / {r2:.2} s"))
        .baseline(format!("{r1:.2} s at {}", fmt_int(at1.sales as f64)))
        .ratio(format!("{:.2}×", r2 / r1))
        .target(
            format!("≤ {TARGET_READY_S} s each{reduced}"),
            verdict(r1 <= TARGET_READY_S && r2 <= TARGET_READY_S, at_target),
        ),
    );
    let per_sale1 = at1.dir_bytes as f64 / at1.sales as f64;
    let per_sale2 = at2.dir_bytes as f64 / at2.sales as f64;
    let marginal =
        (at2.dir_bytes as f64 - at1.dir_bytes as f64) / (at2.sales - at1.sales).max(1) as f64;
    s.figures.push(
        Figure::new(
            ROW,
            &format!(
                "store node data directory per sale at {} sales",
                fmt_int(at2.sales as f64)
            ),
        )
        .value(format!(
            "{} B ({} MB in all; {} B per sale between the two points)",
            fmt_int(per_sale2),
            fmt_int(at2.dir_bytes as f64 / 1e6),
            fmt_int(marginal)
        ))
        .baseline(format!(
            "{} B at {}",
            fmt_int(per_sale1),
            fmt_int(at1.sales as f64)
        ))
        .target(
            format!("≤ {TARGET_BYTES_PER_SALE:.0} B{reduced}"),
            verdict(per_sale2 <= TARGET_BYTES_PER_SALE, at_target),
        ),
    );
    s.figures.push(
        Figure::new(
            ROW,
            "store node sales/s over HTTP, 32 clients, phase 1 / phase 2",
        )
        .value(format!(
            "{} / {}",
            fmt_int(at1.phase.rate()),
            fmt_int(at2.phase.rate())
        ))
        .baseline(format!("{} (phase 1)", fmt_int(at1.phase.rate())))
        .ratio(format!("{:.2}×", at2.phase.rate() / at1.phase.rate()))
        .target("reported (not below today's)", Verdict::Info),
    );

    s.note(format!(
        "One store node set up as a new user would: `storemesh init --name {NAME}` (role store, \
         its own location `{NAME}`), `storemesh run` as an OS process. It receives {} products \
         over HTTP ({} receipts of {RECEIPT_LINES} lines, {receive_s:.1} s), then {CLIENTS} \
         keep-alive HTTP/1.1 clients post single-unit sales (`POST /api/sales`, one line, \
         product uniform over the {} products, each client's next sale as soon as its previous \
         one is answered; a 201 comes after the group commit) until S1 = {} sales. The node is \
         stopped (SIGTERM) and started again: restart → ready is from the spawn of the process \
         to `/healthz` saying `\"ready\": true` and then a `GET /api/inventory` answered 200 \
         and a sale answered 201; RSS is `VmRSS` (and `VmHWM`, the peak since the start) from \
         `/proc/<pid>/status` at that moment. The data directory's bytes are the disk blocks its \
         files occupy after the stop (redb extends its file sparsely, doubling it). Then the sales go on to S2 and the node is stopped, restarted \
         and measured again. {}\n",
        fmt_int(PRODUCTS as f64),
        PRODUCTS.div_ceil(RECEIPT_LINES as u64),
        fmt_int(PRODUCTS as f64),
        fmt_int(s1 as f64),
        match (mode, planned) {
            (Mode::Quick, _) => format!(
                "Quick mode (CI): S1 = {}, S2 = {} (10× and 100× less than the target's sizes; \
                 `--full` runs 20,000 and up to 2,000,000).",
                fmt_int(s1 as f64),
                fmt_int(s2 as f64)
            ),
            (Mode::Full, Some(m)) if m < MULTIPLE => format!(
                "Full mode: S2 = {m} × S1 = {}: 100 × S1 does not fit the {:.0}-minute budget \
                 at phase 1's rate ({}/s), so the largest multiple that does was run.",
                fmt_int(s2 as f64),
                FULL_PHASE2_BUDGET.as_secs_f64() / 60.0,
                fmt_int(at1.phase.rate())
            ),
            _ => format!(
                "Full mode: S2 = 100 × S1 = {} (it fits the {:.0}-minute budget at phase 1's rate).",
                fmt_int(s2 as f64),
                FULL_PHASE2_BUDGET.as_secs_f64() / 60.0
            ),
        }
    ));
    if let Some(why) = &at2.phase.cut {
        s.note(format!(
            "**Phase 2 was cut short at {} sales ({why}); the S2 column is measured there** \
             ({multiple:.1}× S1, not {}×).\n",
            fmt_int(at2.sales as f64),
            s2 / s1
        ));
    }
    s.note("| | S1 | S2 |\n|---|---|---|");
    s.note(format!(
        "| sales made before the stop (the probe sale after each start included) | {} | {} ({multiple:.1}× S1) |",
        fmt_int(at1.sales as f64),
        fmt_int(at2.sales as f64)
    ));
    s.note(format!(
        "| phase: sales/s (wall time) | {} ({:.1} s) | {} ({:.1} s) |",
        fmt_int(at1.phase.rate()),
        at1.phase.took.as_secs_f64(),
        fmt_int(at2.phase.rate()),
        at2.phase.took.as_secs_f64()
    ));
    s.note(format!(
        "| phase: failed sales | {} | {} |",
        at1.phase.errors, at2.phase.errors
    ));
    s.note(format!(
        "| node RSS / peak at the phase's end (before the stop), MiB | {:.0} / {:.0} | {:.0} / {:.0} |",
        at1.phase.rss_end, at1.phase.hwm_end, at2.phase.rss_end, at2.phase.hwm_end
    ));
    let stopped = |st: &(Duration, bool)| {
        format!(
            "{:.2} s{}",
            st.0.as_secs_f64(),
            if st.1 { " (SIGKILL)" } else { "" }
        )
    };
    s.note(format!(
        "| SIGTERM → exit | {} | {} |",
        stopped(&at1.stop),
        stopped(&at2.stop)
    ));
    s.note(format!(
        "| data directory after the stop (allocated on disk) | {} B ({} B per sale) | {} B ({} B per sale) |",
        fmt_int(at1.dir_bytes as f64),
        fmt_int(per_sale1),
        fmt_int(at2.dir_bytes as f64),
        fmt_int(per_sale2)
    ));
    let starts = |st: &Start| {
        format!(
            "{:.2} / {:.2} / {:.2}",
            st.first_answer.as_secs_f64(),
            st.ready.as_secs_f64(),
            st.served.as_secs_f64()
        )
    };
    s.note(format!(
        "| restart → first `/healthz` answer / `ready` / read and sale served, s | {} | {} |",
        starts(&at1.start),
        starts(&at2.start)
    ));
    s.note(format!(
        "| RSS / peak (VmRSS / VmHWM) when served after the restart, MiB | {:.0} / {:.0} | {:.0} / {:.0} |",
        at1.start.rss, at1.start.hwm, at2.start.rss, at2.start.hwm
    ));
    s.note(format!(
        "\nThe empty node's first start: served in {:.2} s, RSS {:.0} MiB.",
        first.served.as_secs_f64(),
        first.rss
    ));
    for (name, ph) in [("phase 1", &at1.phase), ("phase 2", &at2.phase)] {
        if let Some(e) = &ph.first_error {
            s.note(format!("\nFirst failed sale of {name}: `{e}`"));
        }
    }
    s
}
