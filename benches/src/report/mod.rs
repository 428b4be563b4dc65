//! The benchmark report: macro benchmarks against real nodes on loopback, and
//! the writer of `BENCHMARKS.md`.

pub mod anchor;
pub mod converge;
pub mod history;
pub mod ledger;
pub mod nodes;
pub mod procs;
pub mod reads;
pub mod reconnect;
pub mod sales;
pub mod scale;
pub mod signing;
pub mod sim;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::machine::Machine;

/// Quick (CI, a few minutes) or full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Quick,
    Full,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Quick => "quick",
            Mode::Full => "full",
        }
    }
    pub fn pick<T>(self, quick: T, full: T) -> T {
        match self {
            Mode::Quick => quick,
            Mode::Full => full,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// Reported for information; no target.
    Info,
    Skipped,
}

impl Verdict {
    pub fn of(ok: bool) -> Verdict {
        if ok {
            Verdict::Met
        } else {
            Verdict::Missed
        }
    }
    pub fn text(self) -> &'static str {
        match self {
            Verdict::Met => "**met**",
            Verdict::Missed => "**missed**",
            Verdict::Info => "—",
            Verdict::Skipped => "skipped",
        }
    }
}

/// One line of the summary table.
#[derive(Clone, Debug)]
pub struct Figure {
    pub row: String,
    pub what: String,
    pub value: String,
    pub baseline: String,
    pub ratio: String,
    pub target: String,
    pub verdict: Verdict,
}

impl Figure {
    pub fn new(row: &str, what: &str) -> Figure {
        Figure {
            row: row.into(),
            what: what.into(),
            value: String::new(),
            baseline: "—".into(),
            ratio: "—".into(),
            target: "—".into(),
            verdict: Verdict::Info,
        }
    }
    pub fn value(mut self, v: impl Into<String>) -> Figure {
        self.value = v.into();
        self
    }
    pub fn baseline(mut self, v: impl Into<String>) -> Figure {
        self.baseline = v.into();
        self
    }
    pub fn ratio(mut self, v: impl Into<String>) -> Figure {
        self.ratio = v.into();
        self
    }
    pub fn target(mut self, v: impl Into<String>, verdict: Verdict) -> Figure {
        self.target = v.into();
        self.verdict = verdict;
        self
    }
}

/// What one benchmark row produced: summary lines and a details section.
#[derive(Clone, Debug, Default)]
pub struct Section {
    pub title: String,
    pub figures: Vec<Figure>,
    pub details: String,
    pub took: Duration,
}

impl Section {
    pub fn new(title: &str) -> Section {
        Section {
            title: title.into(),
            ..Default::default()
        }
    }
    pub fn note(&mut self, line: impl AsRef<str>) {
        self.details.push_str(line.as_ref());
        self.details.push('\n');
    }
    /// A section for a benchmark that failed to run: the error is the finding.
    pub fn failed(title: &str, row: &str, e: &anyhow::Error) -> Section {
        let mut s = Section::new(title);
        s.figures.push(
            Figure::new(row, title)
                .value("did not run")
                .target("—", Verdict::Missed),
        );
        s.note(format!("The benchmark failed: `{e:#}`"));
        s
    }
}

/// Where the workspace lives (for the anchor, the binaries and git).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn fmt_int(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Profiles and causes of the missed targets (evidence gathered while the
/// report was built; see the text).
pub const DIAGNOSES: &str = include_str!("diagnoses.md");

/// Renders BENCHMARKS.md.
pub fn render(machine: &Machine, mode: Mode, sections: &[Section], total: Duration) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# storemesh benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `cargo run --release -p storemesh-benches --bin storemesh-bench -- --{}` \
         (the benchmarks of issue 7). Every figure is measured in this run, next to its \
         baseline measured in the same run (interleaved), as the median of several runs \
         unless said otherwise. Honest numbers: a missed target is marked missed.\n",
        mode.name()
    );
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(
        md,
        "| mode | `--{}` ({:.0} s in all) |",
        mode.name(),
        total.as_secs_f64()
    );
    let _ = writeln!(md, "| date | {} |", machine.date);
    let _ = writeln!(
        md,
        "| commit | `{}`{} |",
        machine.commit,
        if machine.dirty {
            " (with uncommitted changes)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "| machine | {} × {}, {:.0} GiB RAM |",
        machine.cores, machine.cpu_model, machine.mem_gib
    );
    let _ = writeln!(md, "| toolchain | {} |", machine.rustc);
    let _ = writeln!(
        md,
        "| note | a shared 2-core VM: nodes, load generator and (row 7) the peers share both cores; timings are noisy, ratios against same-run baselines are what counts |\n"
    );
    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(
        md,
        "| # | figure | value | baseline | ratio | target | verdict |\n|---|---|---|---|---|---|---|"
    );
    for s in sections {
        for f in &s.figures {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                f.row,
                f.what,
                f.value,
                f.baseline,
                f.ratio,
                f.target,
                f.verdict.text()
            );
        }
    }
    md.push('\n');
    for s in sections {
        let _ = writeln!(md, "## {}\n", s.title);
        md.push_str(&s.details);
        let _ = writeln!(md, "\n_(took {:.0} s)_\n", s.took.as_secs_f64());
    }
    md.push_str(DIAGNOSES);
    md
}
