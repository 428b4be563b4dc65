//! Row 2: stock reads `GET /api/inventory?product_id=` with N products loaded,
//! 64 clients, against `GET /healthz` on the same server in the same run; then
//! the latency of stock reads at a fixed 10,000 req/s.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use storemesh_node::config::Role;

use super::nodes::{mix, stock, Mesh};
use super::{fmt_int, Figure, Mode, Section, Verdict};
use crate::http::{load, request, LoadResult, Pace};
use crate::stats::{median, spread};

const CLIENTS: usize = 64;

pub async fn run(mode: Mode) -> Result<Section> {
    let n: u64 = mode.pick(10_000, 100_000);
    let mut s = Section::new(&format!(
        "2 · Stock reads via HTTP ({} products, 64 clients)",
        fmt_int(n as f64)
    ));
    let mesh = Mesh::start(&["shop"], |_| Role::Webshop, &[], |_| {}).await?;
    let products: Vec<u64> = (1..=n).collect();
    let t = std::time::Instant::now();
    stock(
        mesh.addr(0),
        mesh.token(0),
        &mesh.location(0),
        &products,
        50,
        "rcv",
    )
    .await?;
    let load_s = t.elapsed().as_secs_f64();
    // Quick mode (CI): 2 rounds of 1.5 s windows, about 15 s in all.
    let rounds = mode.pick(2, 5);
    let window = mode.pick(Duration::from_millis(1500), Duration::from_secs(10));
    let warmup = mode.pick(Duration::from_millis(300), Duration::from_millis(500));
    let addr = mesh.addr(0);
    let inv: Arc<dyn Fn(usize, u64) -> Vec<u8> + Send + Sync> = Arc::new(move |c, seq| {
        let p = 1 + mix(((c as u64) << 40) ^ seq) % n;
        request("GET", &format!("/api/inventory?product_id={p}"), None, None)
    });
    let health_req = request("GET", "/healthz", None, None);
    let health: Arc<dyn Fn(usize, u64) -> Vec<u8> + Send + Sync> =
        Arc::new(move |_, _| health_req.clone());
    let mut inv_rates = Vec::new();
    let mut health_rates = Vec::new();
    let mut ratios = Vec::new();
    let mut inv_p99 = Vec::new();
    let mut health_p99 = Vec::new();
    let mut errors = 0;
    let mut first_error: Option<String> = None;
    let mut note_err = |r: &LoadResult| {
        errors += r.errors;
        if first_error.is_none() {
            first_error.clone_from(&r.first_error);
        }
    };
    for i in 0..rounds {
        let h = load(
            addr,
            CLIENTS,
            warmup,
            window,
            Pace::ClosedLoop,
            200,
            health.clone(),
        )
        .await;
        let r = load(
            addr,
            CLIENTS,
            warmup,
            window,
            Pace::ClosedLoop,
            200,
            inv.clone(),
        )
        .await;
        eprintln!(
            "  reads round {}: healthz {:.0}/s, inventory {:.0}/s (p99 {:.2} ms)",
            i + 1,
            h.per_sec(),
            r.per_sec(),
            r.p(99.0)
        );
        note_err(&h);
        note_err(&r);
        health_rates.push(h.per_sec());
        inv_rates.push(r.per_sec());
        ratios.push(r.per_sec() / h.per_sec());
        inv_p99.push(r.p(99.0));
        health_p99.push(h.p(99.0));
    }
    // Fixed rate: 10k req/s, latency from the scheduled send time.
    let rate = 10_000.0;
    let mut fixed_p99 = Vec::new();
    let mut fixed_p50 = Vec::new();
    let mut fixed_done = Vec::new();
    let mut fixed_h_p99 = Vec::new();
    for _ in 0..rounds.min(3) {
        let h = load(
            addr,
            CLIENTS,
            warmup,
            window,
            Pace::Rate(rate),
            200,
            health.clone(),
        )
        .await;
        let r = load(
            addr,
            CLIENTS,
            warmup,
            window,
            Pace::Rate(rate),
            200,
            inv.clone(),
        )
        .await;
        note_err(&h);
        note_err(&r);
        fixed_p99.push(r.p(99.0));
        fixed_p50.push(r.p(50.0));
        fixed_done.push(r.per_sec());
        fixed_h_p99.push(h.p(99.0));
        eprintln!(
            "  reads at {rate:.0}/s: inventory p99 {:.2} ms ({:.0}/s served), healthz p99 {:.2} ms",
            r.p(99.0),
            r.per_sec(),
            h.p(99.0)
        );
    }
    mesh.shutdown().await;
    let ratio = median(&ratios);
    s.figures.push(
        Figure::new("2", "stock reads/s via HTTP, 64 clients")
            .value(fmt_int(median(&inv_rates)))
            .baseline(format!(
                "{} req/s `GET /healthz`",
                fmt_int(median(&health_rates))
            ))
            .ratio(format!("{:.0} %", ratio * 100.0))
            .target("≥ 80 %", Verdict::of(ratio >= 0.8)),
    );
    let p99 = median(&fixed_p99);
    let served = median(&fixed_done);
    s.figures.push(
        Figure::new("2", "stock read p99 at 10k req/s")
            .value(format!("{p99:.2} ms ({} req/s served)", fmt_int(served)))
            .baseline(format!(
                "{:.2} ms `/healthz` at 10k req/s",
                median(&fixed_h_p99)
            ))
            .target("≤ 2 ms", Verdict::of(p99 <= 2.0 && served >= rate * 0.95)),
    );
    s.note(format!(
        "One node with {} products received (loaded through HTTP in {load_s:.1} s). {CLIENTS} \
         keep-alive HTTP/1.1 clients in the same process; anonymous public reads of a uniformly \
         random product. Closed loop: {rounds} rounds of {:.1} s `/healthz` then {:.1} s \
         `/api/inventory?product_id=`, interleaved (each after {:.1} s of warm-up). Fixed \
         rate, {} rounds of the same windows: {} req/s spread over the \
         {CLIENTS} connections; a request that goes out late because its connection was still \
         waiting for the previous answer is timed from its scheduled send time (so queueing \
         counts), one whose client timer woke late (tokio timers tick in ~1 ms) from its \
         actual send.\n",
        fmt_int(n as f64),
        window.as_secs_f64(),
        window.as_secs_f64(),
        warmup.as_secs_f64(),
        rounds.min(3),
        fmt_int(rate)
    ));
    s.note("| | median (min–max) |\n|---|---|");
    s.note(format!(
        "| inventory reads/s (closed loop) | {} |",
        spread(&inv_rates, 0)
    ));
    s.note(format!(
        "| healthz req/s (closed loop) | {} |",
        spread(&health_rates, 0)
    ));
    s.note(format!("| ratio | {} |", spread(&ratios, 2)));
    s.note(format!(
        "| inventory p99 ms (closed loop, saturated) | {} |",
        spread(&inv_p99, 2)
    ));
    s.note(format!(
        "| healthz p99 ms (closed loop, saturated) | {} |",
        spread(&health_p99, 2)
    ));
    s.note(format!(
        "| inventory p50 / p99 ms at 10k req/s | {} / {} |",
        spread(&fixed_p50, 2),
        spread(&fixed_p99, 2)
    ));
    s.note(format!(
        "| healthz p99 ms at 10k req/s | {} |",
        spread(&fixed_h_p99, 2)
    ));
    s.note(format!(
        "| inventory req/s served at 10k req/s offered | {} |",
        spread(&fixed_done, 0)
    ));
    s.note(format!("| failed requests | {errors} |"));
    if let Some(e) = first_error {
        s.note(format!("\nFirst failure: `{e}`"));
    }
    Ok(s)
}
