//! `storemesh-sim`: deterministic simulation of storemesh meshes.
//!
//! ```text
//! storemesh-sim --seed 42                 one run, one verdict line
//! storemesh-sim --seeds 1..500            a sweep; exit 1 + replay command on failure
//! storemesh-sim --scenario FILE.toml      a described scenario, with its report
//! storemesh-sim --self-test               planted bugs must be found
//! ```

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use clap::Parser;
use storemesh_sim::{run_seed, scenario, selftest, Bug, FaultKind, Options, RunReport};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "storemesh-sim",
    version,
    about = "Deterministic simulator for storemesh meshes: real engine and storage code, simulated network, disk and clock, invariant checks.",
    after_help = "Examples:\n  storemesh-sim --seed 7\n  storemesh-sim --seeds 1..500\n  storemesh-sim --scenario sim/scenarios/store-offline-day.toml\n  storemesh-sim --self-test"
)]
struct Cli {
    /// Run one seed and print its verdict line.
    #[arg(long, conflicts_with_all = ["seeds", "scenario", "self_test"])]
    seed: Option<u64>,
    /// Run a range of seeds, `A..B` (B excluded) or `A..=B`.
    #[arg(long, value_name = "A..B", conflicts_with_all = ["scenario", "self_test"])]
    seeds: Option<String>,
    /// Run a scenario file and print its report.
    #[arg(long, value_name = "FILE.toml", conflicts_with = "self_test")]
    scenario: Option<std::path::PathBuf>,
    /// Check that each planted bug is found within a bounded number of seeds.
    #[arg(long)]
    self_test: bool,
    /// Nodes per mesh.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Events (client requests and faults) per run.
    #[arg(long, default_value_t = 500)]
    events: usize,
    /// Run with a planted bug (for demonstrations; see --self-test).
    #[arg(long, value_name = "NAME")]
    bug: Option<String>,
    /// Inject no faults (latency only).
    #[arg(long)]
    no_faults: bool,
    /// Give every seed a hostile member node (`hostile-*` faults); without it
    /// about 30 % of the seeds have one. The seeds' other events are unchanged.
    #[arg(long, conflicts_with = "no_faults")]
    hostile: bool,
    /// In a sweep of 100 seeds or more, do not fail (exit 3) when some fault
    /// of the menu never fired.
    #[arg(long)]
    no_coverage_check: bool,
    /// In a sweep, print every seed's verdict line, not only failures.
    #[arg(long, short)]
    verbose: bool,
    /// Seeds run in parallel in a sweep (default: one per CPU). Every seed is
    /// still one deterministic single-threaded run; results print in seed order.
    #[arg(long, short)]
    jobs: Option<usize>,
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("--seeds takes A..B or A..=B (got {s:?})");
    if let Some((a, b)) = s.split_once("..=") {
        let a: u64 = a.trim().parse().map_err(|_| bad())?;
        let b: u64 = b.trim().parse().map_err(|_| bad())?;
        return if a <= b { Ok((a, b + 1)) } else { Err(bad()) };
    }
    let (a, b) = s.split_once("..").ok_or_else(bad)?;
    let a: u64 = a.trim().parse().map_err(|_| bad())?;
    let b: u64 = b.trim().parse().map_err(|_| bad())?;
    if a < b {
        Ok((a, b))
    } else {
        Err(bad())
    }
}

fn options(cli: &Cli) -> Result<Options, String> {
    if cli.nodes < 2 || cli.nodes > 64 {
        return Err("--nodes must be 2-64".into());
    }
    if cli.events == 0 {
        return Err("--events must be at least 1".into());
    }
    let bug = match &cli.bug {
        None => None,
        Some(b) => Some(Bug::parse(b).ok_or_else(|| {
            let names: Vec<&str> = Bug::ALL.iter().map(|b| b.name()).collect();
            format!("unknown --bug {b:?}; one of: {}", names.join(", "))
        })?),
    };
    Ok(Options {
        nodes: cli.nodes,
        events: cli.events,
        bug,
        faults: !cli.no_faults,
        hostile_every_seed: cli.hostile,
    })
}

fn replay_command(seed: u64, cli: &Cli) -> String {
    let mut c = format!("storemesh-sim --seed {seed}");
    if cli.nodes != 5 {
        c += &format!(" --nodes {}", cli.nodes);
    }
    if cli.events != 500 {
        c += &format!(" --events {}", cli.events);
    }
    if let Some(b) = &cli.bug {
        c += &format!(" --bug {b}");
    }
    if cli.no_faults {
        c += " --no-faults";
    }
    if cli.hostile {
        c += " --hostile";
    }
    c
}

/// `println!` that ends quietly when stdout is closed (`| head`).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($t)*).is_err() {
            std::process::exit(0);
        }
    }};
}

fn run() -> Result<bool, String> {
    let cli = Cli::parse();
    if cli.self_test {
        let opts = options(&cli)?;
        let started = Instant::now();
        let results = selftest::run(&opts);
        let mut all = true;
        for r in &results {
            out!("{}", r.line());
            all &= r.found.is_some();
        }
        out!(
            "self-test: {} of {} planted bugs found in {:.1}s",
            results.iter().filter(|r| r.found.is_some()).count(),
            results.len(),
            started.elapsed().as_secs_f64()
        );
        return Ok(all);
    }
    if let Some(path) = &cli.scenario {
        let sc = scenario::Scenario::load(path)?;
        let started = Instant::now();
        let report = scenario::run(&sc, cli.seed.unwrap_or(sc.seed));
        out!("{}", report.render().trim_end());
        out!("(ran in {:.2}s)", started.elapsed().as_secs_f64());
        return Ok(report.violation.is_none());
    }
    let opts = options(&cli)?;
    if let Some(seed) = cli.seed {
        let started = Instant::now();
        let r = run_seed(seed, &opts);
        let us = started.elapsed().as_micros() as f64 / r.events.max(1) as f64;
        out!("{}", r.verdict(Some(us)));
        let fired: Vec<String> = r
            .fired
            .iter()
            .map(|(k, n)| format!("{}={n}", k.name()))
            .collect();
        out!("  faults fired: {}", fired.join(" "));
        if !r.ok() {
            out!("  replay: {}", replay_command(seed, &cli));
        }
        return Ok(r.ok());
    }
    let Some(range) = &cli.seeds else {
        return Err("nothing to do: give --seed N, --seeds A..B, --scenario FILE or --self-test (see --help)".into());
    };
    let (a, b) = parse_range(range)?;
    let started = Instant::now();
    let mut fired: BTreeMap<FaultKind, u64> = BTreeMap::new();
    let mut failed: Vec<u64> = Vec::new();
    let mut events = 0usize;
    let mut first_failure = None;
    let jobs = cli
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, 256);
    let next = AtomicU64::new(a);
    let (tx, rx) = mpsc::channel::<(u64, RunReport, f64)>();
    std::thread::scope(|scope| {
        for _ in 0..jobs.min((b - a) as usize) {
            let tx = tx.clone();
            let (next, opts) = (&next, &opts);
            scope.spawn(move || loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= b {
                    return;
                }
                let t = Instant::now();
                let r = run_seed(seed, opts);
                let us = t.elapsed().as_micros() as f64 / r.events.max(1) as f64;
                if tx.send((seed, r, us)).is_err() {
                    return;
                }
            });
        }
        drop(tx);
        // Results arrive out of order; they are reported in seed order.
        let mut waiting: BTreeMap<u64, (RunReport, f64)> = BTreeMap::new();
        let mut due = a;
        for (seed, r, us) in rx {
            waiting.insert(seed, (r, us));
            while let Some((r, us)) = waiting.remove(&due) {
                due += 1;
                events += r.events;
                for (k, n) in &r.fired {
                    *fired.entry(*k).or_default() += n;
                }
                if cli.verbose || !r.ok() {
                    out!("{}", r.verdict(Some(us)));
                }
                if !r.ok() {
                    failed.push(r.seed);
                    if first_failure.is_none() {
                        first_failure = Some(r.seed);
                    }
                }
            }
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let n = b - a;
    let never: Vec<&str> = FaultKind::ALL
        .iter()
        .filter(|k| opts.faults && fired.get(k).copied().unwrap_or(0) == 0)
        .map(|k| k.name())
        .collect();
    let counts: Vec<String> = fired
        .iter()
        .map(|(k, n)| format!("{}={n}", k.name()))
        .collect();
    out!(
        "seeds {a}..{b}: {} passed, {} failed | {n} seeds in {secs:.1}s on {jobs} thread(s) = {:.2} seeds/s, {:.0}us/event",
        n as usize - failed.len(),
        failed.len(),
        n as f64 / secs,
        secs * 1e6 * jobs.min(n as usize) as f64 / events.max(1) as f64
    );
    out!("faults fired: {}", counts.join(" "));
    if let Some(seed) = first_failure {
        out!(
            "first failing seed {seed}; replay: {}",
            replay_command(seed, &cli)
        );
        return Ok(false);
    }
    // The simulator's own check that its fault menu is exercised: only on a
    // sweep long enough for every fault to fire, and with its own exit code
    // (exit 1 means an invariant broke).
    if !never.is_empty() && !cli.no_coverage_check {
        if n < COVERAGE_MIN_SEEDS {
            out!(
                "fault coverage not checked (under {COVERAGE_MIN_SEEDS} seeds); never fired: {}",
                never.join(", ")
            );
        } else {
            out!(
                "FAIL fault coverage: never fired in this sweep: {} (exit {COVERAGE_EXIT}; every invariant held)",
                never.join(", ")
            );
            std::process::exit(COVERAGE_EXIT);
        }
    }
    Ok(true)
}

/// Sweeps shorter than this do not fail when a fault of the menu never fired.
const COVERAGE_MIN_SEEDS: u64 = 100;
/// Exit code of a sweep whose invariants held but whose faults did not all fire.
const COVERAGE_EXIT: i32 = 3;

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("storemesh-sim: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn seed_ranges() {
        assert_eq!(parse_range("1..500"), Ok((1, 500)));
        assert_eq!(parse_range("1..=500"), Ok((1, 501)));
        assert_eq!(parse_range(" 7 .. 9 "), Ok((7, 9)));
        assert!(parse_range("5..5").is_err());
        assert!(parse_range("9..2").is_err());
        assert!(parse_range("x..2").is_err());
        assert!(parse_range("12").is_err());
    }
}
