//! What a scenario run reports: per node and for the whole chain, as text.

use std::fmt::Write as _;

use crate::invariant::Violation;

#[derive(Clone, Debug, Default)]
pub struct NodeLine {
    pub name: String,
    pub policy: String,
    pub sales_ok: u64,
    pub units_sold: u64,
    pub refused: u64,
    /// Refused although reachable stock was on hand (`World::refused_with_stock`).
    pub refused_with_stock: u64,
    /// Refused although the units were on hand, reachable or not.
    pub refused_stock_anywhere: u64,
    /// Demand for goods not on offer (`demand = "visible"`): never attempted.
    pub not_on_offer: u64,
    pub overdrafts: u64,
    pub units_overdrawn: i64,
    pub bytes: u64,
    pub converge_s: Vec<Option<f64>>,
    pub on_hand_end: i64,
}

pub struct ScenarioReport {
    pub name: String,
    pub description: String,
    pub seed: u64,
    pub violation: Option<Violation>,
    pub nodes: Vec<NodeLine>,
    pub heals: Vec<String>,
    pub final_converge_s: f64,
    pub oversold_strict_units: i64,
    /// Ledger epochs owners started, and moves of other nodes to them.
    pub epochs_started: u64,
    pub epochs_joined: u64,
    /// Old images put back (`[[restores]]`), and forks of a node's own
    /// history detected (and merged exactly) by the nodes.
    pub restores: u64,
    pub forks_detected: u64,
    pub trace_hash: String,
    /// Rebalancing deadline of this run (0: off).
    pub deadline_ms: u64,
    /// The same scenario and seed with rebalancing off (`compare_without_rebalancing`).
    pub baseline: Option<Box<ScenarioReport>>,
}

impl ScenarioReport {
    /// Sales attempted at a running node: accepted and refused for lack of rights.
    pub fn sales_attempted(&self) -> u64 {
        self.nodes.iter().map(|n| n.sales_ok + n.refused).sum()
    }

    /// Scenario demand that met no goods on offer (`demand = "visible"`).
    pub fn not_on_offer(&self) -> u64 {
        self.nodes.iter().map(|n| n.not_on_offer).sum()
    }

    pub fn sales_refused(&self) -> u64 {
        self.nodes.iter().map(|n| n.refused).sum()
    }

    /// Refused sales / attempted sales, over every node.
    pub fn refused_rate(&self) -> f64 {
        self.sales_refused() as f64 / self.sales_attempted().max(1) as f64
    }

    pub fn refused_with_stock(&self) -> u64 {
        self.nodes.iter().map(|n| n.refused_with_stock).sum()
    }

    /// Refused for lack of rights although the units were on hand somewhere
    /// in the mesh (reachable or behind the partition) / attempted sales.
    pub fn refused_for_rights_rate(&self) -> f64 {
        self.nodes
            .iter()
            .map(|n| n.refused_stock_anywhere)
            .sum::<u64>() as f64
            / self.sales_attempted().max(1) as f64
    }

    /// Sales refused for lack of rights although reachable units were on
    /// hand / attempted sales: the price of never overselling.
    pub fn refused_with_stock_rate(&self) -> f64 {
        self.refused_with_stock() as f64 / self.sales_attempted().max(1) as f64
    }

    pub fn render(&self) -> String {
        let mut s = self.render_one();
        if let Some(b) = &self.baseline {
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "--- the same scenario and seed with rebalancing off (deadline 0) ---"
            );
            s.push_str(&b.render_one());
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "refused-sale rate with rebalancing ({} ms): {:.2}% ({} of {}) | without: {:.2}% ({} of {}) | ratio {:.2}",
                self.deadline_ms,
                100.0 * self.refused_rate(),
                self.sales_refused(),
                self.sales_attempted(),
                100.0 * b.refused_rate(),
                b.sales_refused(),
                b.sales_attempted(),
                self.refused_rate() / b.refused_rate().max(f64::MIN_POSITIVE)
            );
            let _ = writeln!(
                s,
                "refused although the units were on hand (reachable or not), with rebalancing: {:.2}% | without: {:.2}% | ratio {:.2}",
                100.0 * self.refused_for_rights_rate(),
                100.0 * b.refused_for_rights_rate(),
                self.refused_for_rights_rate() / b.refused_for_rights_rate().max(f64::MIN_POSITIVE)
            );
            let _ = writeln!(
                s,
                "refused although reachable stock was on hand, with rebalancing: {:.2}% ({}) | without: {:.2}% ({}) | ratio {:.2}",
                100.0 * self.refused_with_stock_rate(),
                self.refused_with_stock(),
                100.0 * b.refused_with_stock_rate(),
                b.refused_with_stock(),
                self.refused_with_stock_rate() / b.refused_with_stock_rate().max(f64::MIN_POSITIVE)
            );
            let (nw, nb) = (self.not_on_offer(), b.not_on_offer());
            if nw + nb > 0 {
                let _ = writeln!(
                    s,
                    "demand for goods not on offer (no sale attempted): {nw} with, {nb} without"
                );
            }
            let _ = writeln!(
                s,
                "oversold units at strict locations: {} with, {} without",
                self.oversold_strict_units, b.oversold_strict_units
            );
        }
        s
    }

    fn render_one(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "scenario: {} (seed {})", self.name, self.seed);
        if !self.description.is_empty() {
            let _ = writeln!(s, "  {}", self.description.trim());
        }
        let _ = writeln!(
            s,
            "{:<14} {:<8} {:>8} {:>7} {:>8} {:>10} {:>10} {:>9} {:>8} {:>10}  converged after heal",
            "node",
            "policy",
            "sales",
            "units",
            "refused",
            "(w/ stock)",
            "overdrafts",
            "overdrawn",
            "on hand",
            "bytes"
        );
        for n in &self.nodes {
            let conv: Vec<String> = n
                .converge_s
                .iter()
                .zip(&self.heals)
                .map(|(c, h)| match c {
                    Some(c) => format!("{h}: {c:.0}s"),
                    None => format!("{h}: -"),
                })
                .collect();
            let _ = writeln!(
                s,
                "{:<14} {:<8} {:>8} {:>7} {:>8} {:>10} {:>10} {:>9} {:>8} {:>10}  {}",
                n.name,
                n.policy,
                n.sales_ok,
                n.units_sold,
                n.refused,
                n.refused_with_stock,
                n.overdrafts,
                n.units_overdrawn,
                n.on_hand_end,
                n.bytes,
                conv.join(", ")
            );
        }
        let _ = writeln!(
            s,
            "refused-sale rate: {:.2}% ({} of {} sales; {:.2}% = {} although reachable stock was on hand) | rebalancing deadline {} ms",
            100.0 * self.refused_rate(),
            self.sales_refused(),
            self.sales_attempted(),
            100.0 * self.refused_with_stock_rate(),
            self.refused_with_stock(),
            self.deadline_ms
        );
        let _ = writeln!(
            s,
            "oversold units at strict locations: {} | final convergence after the run: {:.1}s | trace {}",
            self.oversold_strict_units, self.final_converge_s, self.trace_hash
        );
        if self.epochs_started > 0 {
            let _ = writeln!(
                s,
                "ledger epochs: {} started by owners, {} moves of other nodes to them",
                self.epochs_started, self.epochs_joined
            );
        }
        if self.restores > 0 {
            let _ = writeln!(
                s,
                "restored backups: {} | forks of a node's own history detected: {}",
                self.restores, self.forks_detected
            );
        }
        match &self.violation {
            None => {
                let _ = writeln!(s, "invariants: all held");
            }
            Some(v) => {
                let _ = writeln!(s, "invariants: VIOLATED: {v}");
            }
        }
        s
    }
}
