//! What the invariant checkers share with the world: a [`Violation`], and
//! what the checkers remember across events ([`Checker`]), which the world
//! updates as it injects faults (forks, retirements, discarded actors).
//! Apart from `check` so that the world depends on it and `check` on the
//! world, without a cycle between the two.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use storemesh_protocol::ids::{ActorKey, NodeTag};
use storemesh_protocol::ledger::StockEntry;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub seed: u64,
    pub event: usize,
    pub time_ms: u64,
    pub invariant: &'static str,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} event {} (t={:.3}s): invariant `{}` violated: {}",
            self.seed,
            self.event,
            self.time_ms as f64 / 1000.0,
            self.invariant,
            self.message
        )
    }
}

#[derive(Default)]
pub struct Checker {
    /// Alarms (overdraft, deficit, fork) seen in any committed view: key,
    /// node, and the month of the record (the records document it is in).
    pub alarms: BTreeSet<(String, String, u32)>,
    /// How far below zero a node's rights may legitimately be, by
    /// (node name, product, location): its recorded deficits and overdrafts.
    pub allowance: BTreeMap<(String, u64, String), i64>,
    /// Node names whose history was forked on purpose (restore, clone).
    pub forked: BTreeSet<String>,
    /// Actors whose history was thrown away (partially propagated at best).
    pub discarded_actors: BTreeSet<ActorKey>,
    pub names: BTreeMap<NodeTag, String>,
    /// Locations whose policy is relaxed.
    pub relaxed: BTreeSet<String>,
    /// Sale ids submitted with `override`.
    pub overrides: BTreeSet<String>,
    pub overdraft_alarms: u64,
    pub deficit_alarms: u64,
    pub fork_alarms: u64,
    /// Retired node → successor, from the moment the simulator decided the
    /// retirement (before any node knows of it: until the successor learns of
    /// it, it cannot spend the inherited rights, so summing them is exact).
    pub retired_to: BTreeMap<NodeTag, NodeTag>,
    /// Commits at which a successor's own cells had spent rights it inherited
    /// (its unresolved rights below zero): the retirement was exercised.
    pub successor_spends: u64,
}

impl Checker {
    /// The node that holds `tag`'s rights once every node knows of the
    /// retirements (follows chains, bounded as `Views::resolve`).
    pub fn resolve(&self, tag: NodeTag) -> NodeTag {
        let mut t = tag;
        for _ in 0..16 {
            match self.retired_to.get(&t) {
                Some(next) if *next != t => t = *next,
                _ => break,
            }
        }
        t
    }

    /// Rights per holder, a retired node's rights counted as its successor's.
    /// Judging by a replica's own knowledge would be wrong: the retirement
    /// (mesh document) and the successor's spending (ledger document) travel
    /// independently, so a replica may see the spend before the retirement.
    pub fn rights_by_holder(&self, entry: &StockEntry) -> BTreeMap<NodeTag, i64> {
        if self.retired_to.is_empty() {
            return entry.rights_by_node();
        }
        let holders: BTreeSet<NodeTag> = entry
            .rights_by_node()
            .into_keys()
            .map(|t| self.resolve(t))
            .collect();
        holders
            .into_iter()
            .map(|h| (h, entry.rights_in(h, &|t| self.resolve(t))))
            .collect()
    }

    /// The recorded deficits and overdrafts of a holder and of every retired
    /// node it succeeds, and whether any of their histories was forked.
    pub fn allowance_of(&self, holder: NodeTag, p: u64, l: &str) -> (i64, bool) {
        let mut allow = 0i64;
        let mut forked = false;
        let succeeded = self
            .retired_to
            .keys()
            .filter(|t| **t != holder && self.resolve(**t) == holder);
        for t in std::iter::once(&holder).chain(succeeded) {
            let name = self.names.get(t).cloned().unwrap_or_else(|| t.hex());
            forked |= self.forked.contains(&name);
            allow += self
                .allowance
                .get(&(name, p, l.to_string()))
                .copied()
                .unwrap_or(0);
        }
        (allow, forked)
    }

    pub fn name_of(&self, tag: NodeTag) -> String {
        self.names.get(&tag).cloned().unwrap_or_else(|| tag.hex())
    }
}
