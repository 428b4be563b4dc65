//! Row L: the core issue's acceptance criterion, in the report: a sale on a
//! product with 100,000 earlier sales costs about the same as on a fresh
//! product (`Engine::execute` + `Engine::flush`, interleaved blocks, medians).

use std::time::Instant;

use anyhow::Result;

use super::{fmt_int, Figure, Mode, Section, Verdict};
use crate::fixtures::{apply, engine, sale, sell_history, stock_products, NOW_MS};
use crate::stats::{median, spread};

const PRODUCTS: u64 = 10_000;

fn measure(history: u64, blocks: usize, per_block: u64) -> (Vec<f64>, Vec<f64>, f64) {
    let mut e = engine(64);
    stock_products(&mut e, PRODUCTS);
    let t = Instant::now();
    sell_history(&mut e, 1, history, "hist");
    let history_s = t.elapsed().as_secs_f64();
    let mut fresh = Vec::new();
    let mut hot = Vec::new();
    let mut seq = 0u64;
    let mut next_fresh = 1u64;
    for _ in 0..blocks {
        let t = Instant::now();
        for _ in 0..per_block {
            seq += 1;
            next_fresh = if next_fresh >= PRODUCTS {
                2
            } else {
                next_fresh + 1
            };
            apply(
                &mut e,
                sale(&format!("f-{seq}"), next_fresh),
                NOW_MS + history + seq,
            );
        }
        fresh.push(t.elapsed().as_secs_f64() * 1e6 / per_block as f64);
        let t = Instant::now();
        for _ in 0..per_block {
            seq += 1;
            apply(&mut e, sale(&format!("h-{seq}"), 1), NOW_MS + history + seq);
        }
        hot.push(t.elapsed().as_secs_f64() * 1e6 / per_block as f64);
    }
    (fresh, hot, history_s)
}

pub async fn run(mode: Mode) -> Result<Section> {
    // Quick mode (CI) builds a shorter history: 30,000 sales take ~6 s, the
    // full 100,000 ~19 s (one change per sale).
    let history: u64 = mode.pick(30_000, 100_000);
    let mut s = Section::new(&format!(
        "L · Ledger apply: fresh product vs product with {} sales",
        fmt_int(history as f64)
    ));
    let blocks = mode.pick(3, 9);
    let per_block = mode.pick(300, 2000);
    let (fresh, hot, history_s) =
        tokio::task::spawn_blocking(move || measure(history, blocks, per_block)).await?;
    let ratios: Vec<f64> = hot.iter().zip(&fresh).map(|(h, f)| h / f).collect();
    let ratio = median(&ratios);
    s.figures.push(
        Figure::new(
            "L",
            &format!(
                "sale apply (execute + flush), product with {}k sales",
                history / 1000
            ),
        )
        .value(format!("{:.1} µs", median(&hot)))
        .baseline(format!("{:.1} µs on a fresh product", median(&fresh)))
        .ratio(format!("{ratio:.2}×"))
        .target(
            if history >= 100_000 {
                "about the same (≤ 1.5×)".to_string()
            } else {
                format!(
                    "about the same (≤ 1.5×); measured at {}k sales here, 100k in `--full`",
                    history / 1000
                )
            },
            Verdict::of(ratio <= 1.5),
        ),
    );
    s.note(format!(
        "The core issue's acceptance criterion, measured on the engine alone (no HTTP, no \
         disk): one engine, 10,000 products stocked, then {} single-unit sales of product 1 \
         ({}), \
         each executed and flushed as its own change ({history_s:.1} s, i.e. {:.0} µs per sale \
         while the history grew). Then {blocks} interleaved blocks of {per_block} sales: fresh \
         products (rotating over 9,999 products, each sold at most a few times) then product 1. \
         Both share the same records document. `cargo bench -p storemesh-benches --bench \
         ledger_apply` measures the same with criterion.\n",
        fmt_int(history as f64),
        if history >= 100_000 {
            "the target's history"
        } else {
            "reduced in this quick run from the target's 100,000; `--full` runs 100,000"
        },
        history_s * 1e6 / history as f64
    ));
    s.note("| | median (min–max) |\n|---|---|");
    s.note(format!(
        "| fresh product, µs per sale | {} |",
        spread(&fresh, 1)
    ));
    s.note(format!(
        "| product with ≥ {} sales, µs per sale | {} |",
        fmt_int(history as f64),
        spread(&hot, 1)
    ));
    s.note(format!("| ratio | {} |", spread(&ratios, 2)));
    Ok(s)
}
