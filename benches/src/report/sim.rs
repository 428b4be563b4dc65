//! Row 6: simulator speed: `storemesh-sim --seeds 1..50`, if the binary exists.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::Result;

use super::{repo_root, Figure, Mode, Section, Verdict};
use crate::stats::{median, spread};

/// Finds a sibling binary of this executable, or one in `target/release`.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let mut cands = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            cands.push(dir.join(name));
        }
    }
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        cands.push(PathBuf::from(t).join("release").join(name));
    }
    cands.push(repo_root().join("target/release").join(name));
    cands.into_iter().find(|p| p.is_file())
}

/// The number right before `suffix` in `line` (e.g. "1.56" in "1.56 seeds/s",
/// "1285" in "1285us/event").
fn number_before(line: &str, suffix: &str) -> Option<f64> {
    let i = line.find(suffix)?;
    let head = line[..i].trim_end();
    let start = head
        .rfind(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .map_or(0, |k| k + 1);
    head[start..].replace('_', "").parse().ok()
}

pub async fn run(mode: Mode) -> Result<Section> {
    let mut s = Section::new("6 · Simulator speed");
    let Some(bin) = find_binary("storemesh-sim") else {
        s.figures.push(
            Figure::new("6", "simulator seeds/s (5 nodes, 500 events/seed)")
                .value("not measured")
                .target("≥ 5 seeds/s", Verdict::Skipped),
        );
        s.note(
            "`target/release/storemesh-sim` does not exist in this build (the simulator is \
             being written in `sim/`); build it with `cargo build --release -p storemesh-sim` \
             and run the report again.",
        );
        return Ok(s);
    };
    let runs = mode.pick(1, 3);
    // Quick mode (CI): 20 seeds, one run (the CI's own sweep runs many more).
    let seed_range = mode.pick("1..21", "1..50");
    let mut rates = Vec::new();
    let mut us_per_event = Vec::new();
    let mut last_line = String::new();
    let mut failures = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let out = tokio::task::spawn_blocking({
            let bin = bin.clone();
            move || Command::new(bin).args(["--seeds", seed_range]).output()
        })
        .await??;
        let wall = t.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        let summary = text
            .lines()
            .rev()
            .find(|l| l.contains("seeds/s") || l.contains("seeds in"))
            .unwrap_or_else(|| text.lines().last().unwrap_or(""))
            .trim()
            .to_string();
        let seeds = number_before(&summary, " seeds in").unwrap_or(f64::NAN);
        rates.push(seeds / wall);
        if let Some(us) = number_before(&summary, "us/event") {
            us_per_event.push(us);
        }
        if let Some(f) = number_before(&summary, " failed") {
            if f > 0.0 {
                failures.push(summary.clone());
            }
        }
        if !out.status.success() && failures.is_empty() {
            failures.push(format!("exit {:?}: {summary}", out.status.code()));
        }
        last_line = summary;
    }
    let rate = median(&rates);
    s.figures.push(
        Figure::new("6", "simulator seeds/s (5 nodes, 500 events/seed)")
            .value(format!("{rate:.1} seeds/s"))
            .baseline(if us_per_event.is_empty() {
                "µs/event: not in the summary".to_string()
            } else {
                format!("{:.1} µs/event", median(&us_per_event))
            })
            .target("≥ 5 seeds/s on 2 cores", Verdict::of(rate >= 5.0)),
    );
    s.note(format!(
        "`{} --seeds {seed_range}`, {runs} run(s); seeds/s = seeds named in its summary line / wall \
         time of the whole process (start-up included); µs/event as the simulator reports it. \
         Last summary line:\n\n```\n{last_line}\n```\n",
        bin.display()
    ));
    s.note(format!("seeds/s: {}", spread(&rates, 2)));
    if !us_per_event.is_empty() {
        s.note(format!(
            "\nµs/event (simulator's figure): {}",
            spread(&us_per_event, 0)
        ));
    }
    if !failures.is_empty() {
        s.note(format!(
            "\nThe simulator reported failing seeds (a correctness matter for the simulator's \
             owner; the speed figure stands): `{}`",
            failures[0]
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::number_before;

    #[test]
    fn parses_the_summary_line() {
        let l = "seeds 1..50: 45 passed, 4 failed | 49 seeds in 31.5s = 1.56 seeds/s, 1285us/event";
        assert_eq!(number_before(l, " seeds in"), Some(49.0));
        assert_eq!(number_before(l, " seeds/s"), Some(1.56));
        assert_eq!(number_before(l, "us/event"), Some(1285.0));
        assert_eq!(number_before(l, " failed"), Some(4.0));
        assert_eq!(number_before("nothing", " seeds in"), None);
    }
}
