//! `storemesh-bench`: runs the macro benchmarks of issue 7 against real nodes
//! on loopback and writes `BENCHMARKS.md`.
//!
//! ```sh
//! cargo run --release -p storemesh-benches --bin storemesh-bench -- --quick
//! cargo run --release -p storemesh-benches --bin storemesh-bench -- --full
//! ```
//!
//! Options: `--out PATH` (default: BENCHMARKS.md at the workspace root),
//! `--only L,1,2,3,4,5,6,7,8,9` (a subset; the file then holds only those rows).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use storemesh_benches::machine::Machine;
use storemesh_benches::report::{self, Mode, Section};

const ROWS: [&str; 10] = ["L", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

fn usage() -> ExitCode {
    eprintln!(
        "usage: storemesh-bench (--quick | --full) [--out PATH] [--only L,1,2,3,4,5,6,7,8,9]\n\
         writes BENCHMARKS.md (quick: a few minutes; full: longer runs, 100k products)"
    );
    ExitCode::from(2)
}

async fn run_row(row: &str, mode: Mode) -> Section {
    let t = Instant::now();
    let title = format!("row {row}");
    let res = match row {
        "L" => report::ledger::run(mode).await,
        "1" => report::sales::run(mode).await,
        "2" => report::reads::run(mode).await,
        "3" => report::converge::run(mode).await,
        "4" => report::reconnect::run(mode).await,
        "5" => report::scale::run(mode).await,
        "6" => report::sim::run(mode).await,
        "7" => report::anchor::run(mode).await,
        "8" => report::history::run(mode).await,
        "9" => report::signing::run(mode).await,
        _ => unreachable!(),
    };
    let mut s = match res {
        Ok(s) => s,
        Err(e) => {
            eprintln!("  {title} failed: {e:#}");
            Section::failed(&title, row, &e)
        }
    };
    s.took = t.elapsed();
    eprintln!("{} done in {:.0} s", s.title, s.took.as_secs_f64());
    s
}

fn main() -> ExitCode {
    let mut mode = None;
    let mut out: Option<PathBuf> = None;
    let mut only: Option<Vec<String>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => mode = Some(Mode::Quick),
            "--full" => mode = Some(Mode::Full),
            "--out" => out = args.next().map(PathBuf::from),
            "--only" => {
                only = args
                    .next()
                    .map(|s| s.split(',').map(|x| x.trim().to_uppercase()).collect())
            }
            _ => return usage(),
        }
    }
    let Some(mode) = mode else {
        return usage();
    };
    // Node logs (errors only by default) go to stderr; RUST_LOG overrides.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let rows: Vec<&str> = ROWS
        .iter()
        .copied()
        .filter(|r| only.as_ref().is_none_or(|o| o.iter().any(|x| x == r)))
        .collect();
    if rows.is_empty() {
        return usage();
    }
    let out = out.unwrap_or_else(|| report::repo_root().join("BENCHMARKS.md"));
    let machine = Machine::probe(&report::repo_root());
    eprintln!(
        "storemesh-bench --{}: {} × {}, commit {}{}; rows {}",
        mode.name(),
        machine.cores,
        machine.cpu_model,
        machine.commit,
        if machine.dirty { " (dirty)" } else { "" },
        rows.join(",")
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let start = Instant::now();
    let sections: Vec<Section> = rt.block_on(async {
        let mut v = Vec::new();
        for r in &rows {
            eprintln!("== row {r} ==");
            v.push(run_row(r, mode).await);
        }
        v
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    let md = report::render(&machine, mode, &sections, start.elapsed());
    if let Err(e) = std::fs::write(&out, &md) {
        eprintln!("cannot write {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    println!("{md}");
    eprintln!(
        "wrote {} in {:.0} s",
        out.display(),
        start.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}
