//! The long fuzz run: `cargo run --release -p storemesh-protocol --example fuzz -- [TARGET|all] [EXECS] [SEED]`.
//! Prints executions and crashes per target; every crash's input is kept in
//! `protocol/fuzz/regressions/<target>/` (replayed by `tests/fuzz.rs` in CI).
//!
//! `... --example fuzz -- seeds DIR` writes every target's seed inputs to
//! `DIR/<target>/` instead (the coverage-guided run's starting corpus,
//! kept in `fuzz/seeds/`).

use std::path::PathBuf;
use std::time::Instant;

use storemesh_protocol::fuzz;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map(String::as_str).unwrap_or("all");
    let execs: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let seed: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    if which == "seeds" {
        let dir = PathBuf::from(args.get(1).expect("seeds DIR"));
        let h = fuzz::Harness::new();
        for target in fuzz::TARGETS {
            let d = dir.join(target);
            std::fs::create_dir_all(&d).expect("seed dir");
            for (i, s) in h.seeds(target).iter().enumerate() {
                std::fs::write(d.join(format!("seed-{i:03}")), s).expect("write seed");
            }
        }
        return;
    }
    std::panic::set_hook(Box::new(|_| {}));
    let targets: Vec<&str> = if which == "all" {
        fuzz::TARGETS.to_vec()
    } else {
        vec![which]
    };
    for target in targets {
        let t = Instant::now();
        let stats = fuzz::run(target, seed, execs, &[]);
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{target}: {} executions in {secs:.0} s ({:.0}/s), seed {seed}, {} distinct crashes",
            stats.execs,
            stats.execs as f64 / secs.max(1e-9),
            stats.crashes.len()
        );
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/regressions")
            .join(target);
        for (what, input) in stats.crashes {
            std::fs::create_dir_all(&dir).expect("regression dir");
            let h = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
                (h ^ u64::from(*x)).wrapping_mul(0x100_0000_01b3)
            });
            let path = dir.join(format!("{h:016x}.bin"));
            std::fs::write(&path, &input).expect("write regression input");
            println!("  crash: {what}\n    kept: {}", path.display());
        }
    }
}
