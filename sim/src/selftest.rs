//! The simulator must be shown to catch bugs: each planted bug (a test-only
//! switch in the engine or in the simulator's request path) must produce an
//! invariant violation within [`SEEDS_MAX`] seeds.

use crate::driver::run_seed;
use crate::invariant::Violation;
use crate::options::{Bug, Options};

/// Seeds tried per planted bug before the self-test gives up.
pub const SEEDS_MAX: u64 = 40;

pub struct BugResult {
    pub bug: Bug,
    pub found: Option<Violation>,
    pub seeds_tried: u64,
}

impl BugResult {
    pub fn line(&self) -> String {
        match &self.found {
            Some(v) => format!(
                "planted bug {:<22} FOUND after {} seed(s): {v}",
                self.bug.name(),
                self.seeds_tried
            ),
            None => format!(
                "planted bug {:<22} NOT FOUND in {} seeds",
                self.bug.name(),
                self.seeds_tried
            ),
        }
    }
}

/// Runs seeds 1, 2, … with `bug` planted until a violation is reported.
pub fn find(bug: Bug, opts: &Options, seeds_max: u64) -> BugResult {
    let opts = Options {
        bug: Some(bug),
        faults: true,
        ..opts.clone()
    };
    for seed in 1..=seeds_max {
        let r = run_seed(seed, &opts);
        if let Some(v) = r.violation {
            return BugResult {
                bug,
                found: Some(v),
                seeds_tried: seed,
            };
        }
    }
    BugResult {
        bug,
        found: None,
        seeds_tried: seeds_max,
    }
}

pub fn run(opts: &Options) -> Vec<BugResult> {
    Bug::ALL.iter().map(|b| find(*b, opts, SEEDS_MAX)).collect()
}
