//! Row 1: durable single-line sales via HTTP, 64 concurrent clients, one node,
//! products drawn Zipf(1.1) over 10,000; against one redb `Immediate` commit
//! per write, measured in the same run (interleaved, median of the pairs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use redb::{Database, Durability, TableDefinition};
use storemesh_node::config::Role;

use super::nodes::{stock, unit, Mesh};
use super::{fmt_int, Figure, Mode, Section, Verdict};
use crate::http::{load, request, Pace};
use crate::stats::{median, percentile, spread};
use crate::workload::Zipf;

const CLIENTS: usize = 64;
const PRODUCTS: u64 = 10_000;
const T: TableDefinition<u64, &[u8]> = TableDefinition::new("baseline");

/// One redb `Durability::Immediate` transaction per 200-byte write, for `window`:
/// (writes/s, p99 commit latency ms).
pub fn redb_baseline(window: Duration) -> Result<(f64, f64)> {
    let dir = tempfile::Builder::new()
        .prefix("storemesh-bench-redb-")
        .tempdir()?;
    let db = Database::create(dir.path().join("baseline.redb"))?;
    let value = vec![7u8; 200];
    let mut lat = Vec::new();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < window {
        let t = Instant::now();
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        tx.open_table(T)?.insert(n, value.as_slice())?;
        tx.commit()?;
        lat.push(t.elapsed().as_micros() as u32);
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    Ok((rate, percentile(&mut lat, 99.0) as f64 / 1000.0))
}

struct Run {
    rate: f64,
    p50: f64,
    p99: f64,
    errors: u64,
    first_error: Option<String>,
    batch_mean: f64,
}

async fn subject(run: usize, warmup: Duration, window: Duration) -> Result<Run> {
    let mesh = Mesh::start(&["shop"], |_| Role::Store, &[], |_| {}).await?;
    let products: Vec<u64> = (1..=PRODUCTS).collect();
    stock(
        mesh.addr(0),
        mesh.token(0),
        &mesh.location(0),
        &products,
        1_000_000_000,
        "rcv",
    )
    .await?;
    let zipf = Arc::new(Zipf::new(PRODUCTS as usize, 1.1));
    let token = mesh.token(0).to_string();
    let before = mesh.counters(0);
    let ops_before = mesh.nodes[0]
        .shared
        .metrics
        .ops_ok
        .load(std::sync::atomic::Ordering::Relaxed);
    let make = {
        let zipf = zipf.clone();
        Arc::new(move |c: usize, seq: u64| {
            let p = zipf.at(unit(((run as u64) << 56) ^ ((c as u64) << 40) ^ seq));
            let body = format!(
                r#"{{"sale_id":"s{run}-{c}-{seq}","lines":[{{"product_id":{p},"quantity":1,"unit_price":1999}}],"currency":"EUR"}}"#
            );
            request("POST", "/api/sales", Some(&token), Some(body.as_bytes()))
        })
    };
    let r = load(
        mesh.addr(0),
        CLIENTS,
        warmup,
        window,
        Pace::ClosedLoop,
        201,
        make,
    )
    .await;
    let after = mesh.counters(0);
    let ops = mesh.nodes[0]
        .shared
        .metrics
        .ops_ok
        .load(std::sync::atomic::Ordering::Relaxed)
        - ops_before;
    let commits = after.commits - before.commits;
    let out = Run {
        rate: r.per_sec(),
        p50: r.p(50.0),
        p99: r.p(99.0),
        errors: r.errors,
        first_error: r.first_error.clone(),
        batch_mean: ops as f64 / commits.max(1) as f64,
    };
    mesh.shutdown().await;
    Ok(out)
}

pub async fn run(mode: Mode) -> Result<Section> {
    let mut s =
        Section::new("1 · Durable sales via HTTP (64 clients, Zipf(1.1) over 10,000 products)");
    // Quick mode (CI): 2 pairs of short windows, about 12 s in all.
    let pairs = mode.pick(2, 5);
    let window = mode.pick(Duration::from_secs(2), Duration::from_secs(15));
    let warmup = mode.pick(Duration::from_millis(500), Duration::from_secs(1));
    let base_window = mode.pick(Duration::from_millis(1500), Duration::from_secs(8));
    let mut rates = Vec::new();
    let mut bases = Vec::new();
    let mut ratios = Vec::new();
    let mut p99s = Vec::new();
    let mut p50s = Vec::new();
    let mut base_p99 = Vec::new();
    let mut batches = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for i in 0..pairs {
        let (b, bp99) = tokio::task::spawn_blocking(move || redb_baseline(base_window)).await??;
        let r = subject(i, warmup, window).await?;
        eprintln!(
            "  sales pair {}: baseline {:.0}/s, storemesh {:.0}/s (p99 {:.1} ms, {:.1} sales per commit)",
            i + 1,
            b,
            r.rate,
            r.p99,
            r.batch_mean
        );
        bases.push(b);
        base_p99.push(bp99);
        rates.push(r.rate);
        ratios.push(r.rate / b);
        p99s.push(r.p99);
        p50s.push(r.p50);
        batches.push(r.batch_mean);
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    let rate = median(&rates);
    let ratio = median(&ratios);
    s.figures.push(
        Figure::new("1", "durable sales/s via HTTP, 64 clients")
            .value(fmt_int(rate))
            .target("≥ 20,000/s", Verdict::of(rate >= 20_000.0)),
    );
    s.figures.push(
        Figure::new("1", "… against one redb commit per write")
            .value(fmt_int(rate))
            .baseline(format!(
                "{} writes/s (redb Immediate, 1 commit/write)",
                fmt_int(median(&bases))
            ))
            .ratio(format!("{ratio:.1}×"))
            .target("≥ 8×", Verdict::of(ratio >= 8.0)),
    );
    s.figures.push(
        Figure::new("1", "sale latency p99 (p50)")
            .value(format!("{:.1} ms ({:.1} ms)", median(&p99s), median(&p50s)))
            .baseline(format!("{:.2} ms per redb commit (p99)", median(&base_p99)))
            .target("reported", Verdict::Info),
    );
    s.note(format!(
        "One node, 10,000 products stocked; {CLIENTS} keep-alive HTTP/1.1 clients in the same \
         process post single-line sales (`POST /api/sales`, 1 unit, product Zipf(1.1)) as fast as \
         they are answered; a 201 arrives only after the sale's group commit \
         (`Durability::Immediate`). {pairs} pairs, interleaved: baseline ({:.0} s of one redb \
         `Immediate` transaction per 200-byte write, single writer: redb serializes write \
         transactions) then a fresh node ({:.0} s warm-up + {:.0} s measured).\n",
        base_window.as_secs_f64(),
        warmup.as_secs_f64(),
        window.as_secs_f64()
    ));
    s.note("| | median (min–max) |\n|---|---|");
    s.note(format!("| storemesh sales/s | {} |", spread(&rates, 0)));
    s.note(format!("| baseline writes/s | {} |", spread(&bases, 0)));
    s.note(format!("| ratio | {} |", spread(&ratios, 2)));
    s.note(format!("| p50 latency, ms | {} |", spread(&p50s, 2)));
    s.note(format!("| p99 latency, ms | {} |", spread(&p99s, 2)));
    s.note(format!(
        "| baseline p99 commit, ms | {} |",
        spread(&base_p99, 2)
    ));
    s.note(format!(
        "| sales per group commit (mean) | {} |",
        spread(&batches, 1)
    ));
    s.note(format!("| failed requests (all runs) | {errors} |"));
    if let Some(e) = first_error {
        s.note(format!("\nFirst failure: `{e}`"));
    }
    Ok(s)
}
