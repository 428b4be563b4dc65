//! Scenario files (`sim/scenarios/*.toml`): a retailer's "what happens if…".
//!
//! A scenario names the nodes (role, policy, sales rate), the topology, the
//! products with their opening stock per location, allocations to the web
//! shop, restocking, sales peaks and a schedule of partitions and outages.
//! It runs on the same simulated mesh as the random runs, with every
//! invariant checked, and reports per node: sales accepted, refused for lack
//! of rights, overdrafts, time to converge after each heal, bytes exchanged.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use automerge::{ChangeHash, ReadDoc};
use rand::Rng;
use serde::Deserialize;
use serde_json::json;
use storemesh_protocol::engine::Policy;
use storemesh_protocol::ops::{Op, OpError};

use crate::check::Violation;
use crate::client::Kind;
use crate::driver::heal_and_quiesce;
use crate::options::Topology;
use crate::workload::{self, new_request};
use crate::world::{NodeSpec, Setup, World};
use storemesh_protocol::rebalance::AllocationRule;

const HOUR_MS: f64 = 3_600_000.0;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "one")]
    pub seed: u64,
    pub duration_h: f64,
    /// `mesh`, `hub` or `chain` (in node order).
    #[serde(default = "mesh")]
    pub topology: String,
    /// The hub of a `hub` topology.
    #[serde(default)]
    pub hub: Option<String>,
    #[serde(default = "buckets")]
    pub buckets: u32,
    /// Group-commit granularity of the simulation.
    #[serde(default = "tick")]
    pub tick_ms: u64,
    #[serde(default = "latency")]
    pub latency_ms: [u64; 2],
    #[serde(default = "anti_entropy")]
    pub anti_entropy_s: u64,
    pub nodes: Vec<ScNode>,
    /// `[[products]]` one by one, or a generator:
    /// `products = { count = 1000, stock_per_store = 50 }`.
    pub products: ScProducts,
    /// Popularity of the products: Zipf with this exponent over the product
    /// order (the first product is the most popular); uniform when absent.
    #[serde(default)]
    pub zipf: Option<f64>,
    /// Which demand becomes a sale attempt: `any` (every draw, also of goods
    /// nobody has) or `visible` (a store's customer brings to the till only
    /// what is on that store's shelf, a web customer orders only what the
    /// web shop shows in stock; the rest is demand not on offer, counted but
    /// never attempted).
    #[serde(default)]
    pub demand: Demand,
    #[serde(default)]
    pub allocations: Vec<ScAllocation>,
    #[serde(default)]
    pub restock: Vec<ScRestock>,
    #[serde(default)]
    pub peaks: Vec<ScPeak>,
    #[serde(default)]
    pub partitions: Vec<ScPartition>,
    /// A node's disk image copied at `backup_at_h` (a backup) and put back
    /// at `restore_at_h`: the node restarts from the old image.
    #[serde(default)]
    pub restores: Vec<ScRestore>,
    /// How long a sale short of rights waits for a grant from a peer
    /// (`[rebalance] deadline_ms` of the node config; 0 turns rebalancing off).
    #[serde(default = "rebalance_deadline")]
    pub rebalance_deadline_ms: u64,
    /// `[[allocation]]` rules of the node config, applied by every node.
    #[serde(default)]
    pub allocation_rules: Vec<ScAllocationRule>,
    /// Run the scenario a second time with the same seed and rebalancing off
    /// (`deadline_ms = 0`) and report both refused-sale rates.
    #[serde(default)]
    pub compare_without_rebalancing: bool,
    /// Events between two full recomputations of every view (the rows each
    /// commit touched are checked at every commit regardless).
    #[serde(default = "full_check_every")]
    pub full_check_every: usize,
    /// A long scenario: `cargo test` runs it shortened (`--scenario` in full).
    #[serde(default)]
    pub long: bool,
    /// Operations a ledger epoch holds before its owner cuts the next one
    /// (production: `EPOCH_OPS_MIN`); small values make owners cut often.
    #[serde(default)]
    pub epoch_ops_max: Option<u64>,
}

fn full_check_every() -> usize {
    crate::check::FULL_CHECK_EVERY
}

/// The products of a scenario: listed, or generated.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum ScProducts {
    List(Vec<ScProduct>),
    Generate(ScProductGen),
}

/// `count` products with ids `first_id..`, `stock_per_store` units of each at
/// every node whose role is `store`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScProductGen {
    pub count: u64,
    #[serde(default = "one")]
    pub first_id: u64,
    pub stock_per_store: u64,
}

fn rebalance_deadline() -> u64 {
    200
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScAllocationRule {
    pub to: String,
    pub share_percent: u32,
    /// At most this many units per product (no limit when absent).
    #[serde(default = "max_units")]
    pub max_units: u64,
}

fn max_units() -> u64 {
    1_000_000_000
}

fn one() -> u64 {
    1
}
fn mesh() -> String {
    "mesh".into()
}
fn buckets() -> u32 {
    16
}
fn tick() -> u64 {
    1_000
}
fn latency() -> [u64; 2] {
    [5, 60]
}
fn anti_entropy() -> u64 {
    30
}
fn lines_max() -> u64 {
    2
}
fn quantity_max() -> u64 {
    2
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScNode {
    pub name: String,
    /// `store` or `webshop`.
    #[serde(default = "store")]
    pub role: String,
    /// `strict` or `relaxed`.
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub sales_per_hour: f64,
    #[serde(default = "lines_max")]
    pub lines_max: u64,
    #[serde(default = "quantity_max")]
    pub quantity_max: u64,
}

fn store() -> String {
    "store".into()
}

/// With `demand = "visible"`, a web shop offers the stock it sees at the
/// locations it heard from within this long, and elsewhere only its own
/// rights (see `World::shown_in_stock`).
pub const OFFER_FRESH_MS: u64 = 10 * 60 * 1000;

/// See [`Scenario::demand`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Demand {
    #[default]
    Any,
    Visible,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScProduct {
    pub id: u64,
    /// Opening stock by location (node name).
    #[serde(default)]
    pub stock: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScAllocation {
    /// A product id, or every product when absent.
    #[serde(default)]
    pub product: Option<u64>,
    pub from: String,
    pub to: String,
    pub quantity: u64,
    #[serde(default)]
    pub at_h: f64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScRestock {
    pub node: String,
    pub every_h: f64,
    pub quantity: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScPeak {
    pub node: String,
    pub at_h: f64,
    pub for_h: f64,
    /// Sales rate multiplier during the peak.
    pub factor: f64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScPartition {
    /// `isolate` (these nodes from the rest), `one-way` (frames from `nodes[0]`
    /// to `nodes[1]` are lost) or `down` (these nodes are powered off).
    pub kind: String,
    pub nodes: Vec<String>,
    pub at_h: f64,
    pub for_h: f64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScRestore {
    pub node: String,
    pub backup_at_h: f64,
    pub restore_at_h: f64,
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let sc: Scenario = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        sc.validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(sc)
    }

    fn index(&self, name: &str) -> Result<usize, String> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .ok_or_else(|| format!("unknown node {name:?}"))
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.nodes.len() < 2 {
            return Err("a scenario needs at least two nodes".into());
        }
        let mut names = BTreeSet::new();
        for n in &self.nodes {
            storemesh_protocol::ids::validate_name("node name", &n.name)?;
            if !names.insert(n.name.clone()) {
                return Err(format!("node {:?} is listed twice", n.name));
            }
            if n.role != "store" && n.role != "webshop" {
                return Err(format!("node {:?}: role must be store or webshop", n.name));
            }
            if n.lines_max == 0 || n.quantity_max == 0 {
                return Err(format!(
                    "node {:?}: lines_max and quantity_max must be at least 1",
                    n.name
                ));
            }
        }
        match self.topology.as_str() {
            "mesh" | "chain" => {}
            "hub" => {
                self.index(self.hub.as_deref().ok_or("a hub topology needs `hub`")?)?;
            }
            t => return Err(format!("unknown topology {t:?} (mesh, hub or chain)")),
        }
        if self.duration_h.is_nan() || self.duration_h <= 0.0 || self.duration_h > 24.0 * 31.0 {
            return Err("duration_h must be in (0, 744]".into());
        }
        if self.tick_ms == 0 || self.latency_ms[0] > self.latency_ms[1] {
            return Err("tick_ms must be positive and latency_ms [low, high]".into());
        }
        if let ScProducts::Generate(g) = &self.products {
            if g.count == 0 || g.count > 100_000 {
                return Err("products count must be 1-100000".into());
            }
            storemesh_protocol::ids::validate_product_id("first_id", g.first_id)?;
            storemesh_protocol::ids::validate_product_id(
                "last product id",
                g.first_id + g.count - 1,
            )?;
            storemesh_protocol::ids::validate_quantity("stock_per_store", g.stock_per_store)?;
        }
        let mut ids = BTreeSet::new();
        for p in &self.product_list() {
            storemesh_protocol::ids::validate_product_id("product id", p.id)?;
            if !ids.insert(p.id) {
                return Err(format!("product {} is listed twice", p.id));
            }
            for l in p.stock.keys() {
                self.index(l)?;
            }
        }
        if let Some(z) = self.zipf {
            if !(z > 0.0 && z <= 10.0) {
                return Err("zipf must be in (0, 10]".into());
            }
        }
        for a in &self.allocation_rules {
            self.index(&a.to)?;
            if a.share_percent == 0 || a.share_percent > 100 || a.max_units == 0 {
                return Err(
                    "allocation_rules: share_percent must be 1-100 and max_units at least 1".into(),
                );
            }
        }
        if self.full_check_every == 0 {
            return Err("full_check_every must be at least 1".into());
        }
        for a in &self.allocations {
            self.index(&a.from)?;
            self.index(&a.to)?;
        }
        for r in &self.restock {
            self.index(&r.node)?;
            if r.every_h.is_nan() || r.every_h <= 0.0 {
                return Err("restock every_h must be positive".into());
            }
        }
        for p in &self.peaks {
            self.index(&p.node)?;
        }
        for p in &self.partitions {
            for n in &p.nodes {
                self.index(n)?;
            }
            match p.kind.as_str() {
                "isolate" | "down" => {}
                "one-way" if p.nodes.len() == 2 => {}
                "one-way" => return Err("a one-way partition names two nodes: from, to".into()),
                k => {
                    return Err(format!(
                        "unknown partition kind {k:?} (isolate, one-way, down)"
                    ))
                }
            }
        }
        if ids.is_empty() {
            return Err("a scenario needs at least one product".into());
        }
        Ok(())
    }

    /// The products with their opening stock, generated ones included.
    pub fn product_list(&self) -> Vec<ScProduct> {
        match &self.products {
            ScProducts::List(l) => l.clone(),
            ScProducts::Generate(g) => {
                let stock: BTreeMap<String, u64> = self
                    .nodes
                    .iter()
                    .filter(|n| n.role == "store")
                    .map(|n| (n.name.clone(), g.stock_per_store))
                    .collect();
                (0..g.count)
                    .map(|k| ScProduct {
                        id: g.first_id + k,
                        stock: stock.clone(),
                    })
                    .collect()
            }
        }
    }

    /// The same scenario, shortened to at most `hours` (partitions, peaks and
    /// allocations scaled into it): what `cargo test` runs of a long one.
    pub fn shortened(&self, hours: f64) -> Scenario {
        let mut sc = self.clone();
        if sc.duration_h <= hours {
            return sc;
        }
        let f = hours / sc.duration_h;
        sc.duration_h = hours;
        for p in &mut sc.partitions {
            p.at_h *= f;
            p.for_h *= f;
        }
        for p in &mut sc.peaks {
            p.at_h *= f;
            p.for_h *= f;
        }
        for a in &mut sc.allocations {
            a.at_h *= f;
        }
        for r in &mut sc.restores {
            r.backup_at_h *= f;
            r.restore_at_h *= f;
        }
        sc.restock.retain(|r| r.every_h < hours);
        sc
    }

    fn rate(&self, node: usize, t_ms: u64) -> f64 {
        let h = t_ms as f64 / HOUR_MS;
        let mut r = self.nodes[node].sales_per_hour;
        for p in &self.peaks {
            if p.node == self.nodes[node].name && h >= p.at_h && h < p.at_h + p.for_h {
                r *= p.factor;
            }
        }
        r
    }
}

#[derive(Clone, Debug)]
enum Ev {
    Sale(usize),
    Restock(usize),
    Allocate(usize),
    PartitionStart(usize),
    PartitionEnd(usize),
    Backup(usize),
    Restore(usize),
}

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

/// Tracks, after a heal, when each node holds every change that existed
/// anywhere at the heal.
struct ConvergeWatch {
    started_ms: u64,
    target: BTreeMap<String, BTreeSet<ChangeHash>>,
    done: BTreeMap<usize, u64>,
}

fn snapshot_heads(w: &World) -> BTreeMap<String, BTreeSet<ChangeHash>> {
    let mut out: BTreeMap<String, BTreeSet<ChangeHash>> = BTreeMap::new();
    for n in &w.nodes {
        if let Some(l) = &n.life {
            for (id, _) in l.engine().documents() {
                if let Some(h) = l.engine().heads_of(&id) {
                    out.entry(id).or_default().extend(h);
                }
            }
        }
    }
    out
}

fn has_all(w: &World, i: usize, target: &BTreeMap<String, BTreeSet<ChangeHash>>) -> bool {
    let Some(l) = &w.nodes[i].life else {
        return false;
    };
    target.iter().all(|(doc, hashes)| {
        // A ledger epoch this node moved on from: its writers carried their
        // cells into the newer one (the invariants check the numbers).
        l.engine().is_retired_epoch(doc)
            || l.engine()
                .doc(doc)
                .is_some_and(|d| hashes.iter().all(|h| d.get_change_by_hash(h).is_some()))
    })
}

pub fn run(sc: &Scenario, seed: u64) -> ScenarioReport {
    let mut report = run_once(sc, seed);
    if sc.compare_without_rebalancing {
        let mut off = sc.clone();
        off.rebalance_deadline_ms = 0;
        let b = run_once(&off, seed);
        if report.violation.is_none() {
            report.violation = b.violation.clone();
        }
        report.baseline = Some(Box::new(b));
    }
    report
}

fn run_once(sc: &Scenario, seed: u64) -> ScenarioReport {
    let mut report = ScenarioReport {
        name: sc.name.clone(),
        description: sc.description.clone(),
        seed,
        violation: None,
        nodes: Vec::new(),
        heals: Vec::new(),
        final_converge_s: 0.0,
        epochs_started: 0,
        restores: 0,
        forks_detected: 0,
        epochs_joined: 0,
        oversold_strict_units: 0,
        trace_hash: String::new(),
        deadline_ms: sc.rebalance_deadline_ms,
        baseline: None,
    };
    match run_inner(sc, seed, &mut report) {
        Ok(()) => {}
        Err(v) => report.violation = Some(v),
    }
    report
}

fn run_inner(sc: &Scenario, seed: u64, report: &mut ScenarioReport) -> Result<(), Violation> {
    let idx = |name: &str| sc.nodes.iter().position(|n| n.name == name).unwrap_or(0);
    let topology = match sc.topology.as_str() {
        "hub" => Topology::Hub(idx(sc.hub.as_deref().unwrap_or(""))),
        "chain" => Topology::Chain,
        _ => Topology::FullMesh,
    };
    let specs = sc
        .nodes
        .iter()
        .map(|n| NodeSpec {
            name: n.name.clone(),
            role: n.role.clone(),
            policy: n.policy,
            drift_ppm: 0,
        })
        .collect();
    let setup = Setup {
        deadline_ms: sc.rebalance_deadline_ms,
        allocation: sc
            .allocation_rules
            .iter()
            .map(|a| AllocationRule {
                to: a.to.clone(),
                share_percent: a.share_percent,
                max_units: a.max_units,
            })
            .collect(),
        tick_ms: sc.tick_ms,
        latency_ms: (sc.latency_ms[0], sc.latency_ms[1]),
        anti_entropy_ms: sc.anti_entropy_s * 1000,
        buckets: sc.buckets,
        epoch_ops_max: sc.epoch_ops_max,
    };
    let mut w = World::new(seed, World::seed_rng(seed), setup, specs, topology, None)?;
    for node in &w.nodes {
        w.check
            .names
            .insert(node.cfg.node_id.tag(), node.name.clone());
    }
    let mut next_id = 0u64;
    let mut fresh = |p: &str| {
        next_id += 1;
        format!("{p}-{next_id}")
    };
    let product_list = sc.product_list();
    // Opening stock (receipts of at most `LINES_MAX` lines).
    for (i, n) in sc.nodes.iter().enumerate() {
        let lines: Vec<serde_json::Value> = product_list
            .iter()
            .filter_map(|p| {
                p.stock
                    .get(&n.name)
                    .filter(|q| **q > 0)
                    .map(|q| json!({"product_id": p.id, "quantity": q}))
            })
            .collect();
        for chunk in lines.chunks(storemesh_protocol::ops::LINES_MAX) {
            let id = fresh("open");
            let op =
                workload::receipt(json!({"receipt_id": id, "location": n.name, "lines": chunk}));
            let r = new_request(&w, i, Kind::Receipt, op, id);
            w.submit_new(r);
        }
    }
    w.advance_to(5_000)?;

    // The timeline.
    let mut timeline: BTreeMap<(u64, u64), Ev> = BTreeMap::new();
    let mut seq = 0u64;
    let mut put = |t: u64, e: Ev, tl: &mut BTreeMap<(u64, u64), Ev>| {
        seq += 1;
        tl.insert((t, seq), e);
    };
    let start = w.now_ms;
    let end = start + (sc.duration_h * HOUR_MS) as u64;
    for (i, n) in sc.nodes.iter().enumerate() {
        let peak = sc
            .peaks
            .iter()
            .filter(|p| p.node == n.name)
            .map(|p| p.factor)
            .fold(1.0f64, f64::max);
        let max_rate = n.sales_per_hour * peak;
        if max_rate <= 0.0 {
            continue;
        }
        // Poisson arrivals by thinning.
        let mut t = start as f64;
        loop {
            let u: f64 = w.rng.gen_range(f64::EPSILON..1.0);
            t += -u.ln() / max_rate * HOUR_MS;
            if t >= end as f64 {
                break;
            }
            let keep = sc.rate(i, t as u64 - start) / max_rate;
            if w.rng.gen_bool(keep.clamp(0.0, 1.0)) {
                put(t as u64, Ev::Sale(i), &mut timeline);
            }
        }
    }
    for (k, r) in sc.restock.iter().enumerate() {
        let mut t = start + (r.every_h * HOUR_MS) as u64;
        while t < end {
            put(t, Ev::Restock(k), &mut timeline);
            t += (r.every_h * HOUR_MS) as u64;
        }
    }
    for (k, a) in sc.allocations.iter().enumerate() {
        put(
            start + (a.at_h * HOUR_MS) as u64,
            Ev::Allocate(k),
            &mut timeline,
        );
    }
    for (k, p) in sc.partitions.iter().enumerate() {
        put(
            start + (p.at_h * HOUR_MS) as u64,
            Ev::PartitionStart(k),
            &mut timeline,
        );
        put(
            start + ((p.at_h + p.for_h) * HOUR_MS) as u64,
            Ev::PartitionEnd(k),
            &mut timeline,
        );
        report.heals.push(format!(
            "heal {} {:.1}h",
            p.nodes.join("+"),
            p.at_h + p.for_h
        ));
    }

    for (k, r) in sc.restores.iter().enumerate() {
        put(
            start + (r.backup_at_h * HOUR_MS) as u64,
            Ev::Backup(k),
            &mut timeline,
        );
        put(
            start + (r.restore_at_h * HOUR_MS) as u64,
            Ev::Restore(k),
            &mut timeline,
        );
    }
    let mut backups: BTreeMap<usize, (u64, Vec<u8>)> = BTreeMap::new();

    let products: Vec<u64> = product_list.iter().map(|p| p.id).collect();
    let popularity = Popularity::new(products.len(), sc.zipf);
    let mut watches: Vec<(usize, ConvergeWatch)> = Vec::new();
    let mut results: Vec<BTreeMap<usize, u64>> = vec![BTreeMap::new(); sc.partitions.len()];
    let mut events = 0usize;
    let step = sc.tick_ms.max(1);
    for ((t, _), ev) in timeline {
        // Advance tick by tick while some heal is being watched.
        while w.now_ms + step <= t && !watches.is_empty() {
            let next = w.now_ms + step;
            w.advance_to(next)?;
            watch(&w, &mut watches, &mut results);
        }
        w.advance_to(t)?;
        watch(&w, &mut watches, &mut results);
        events += 1;
        w.event = events;
        match ev {
            Ev::Sale(i) => {
                if w.nodes[i].life.is_none() {
                    // The till's node is powered off: the sale does not happen here.
                    continue;
                }
                let n = &sc.nodes[i];
                let nlines = w.rng.gen_range(1..=n.lines_max);
                let mut lines: Vec<serde_json::Value> = Vec::new();
                for _ in 0..nlines {
                    let p = products[popularity.pick(&mut w.rng)];
                    let mut q = w.rng.gen_range(1..=n.quantity_max) as i64;
                    if sc.demand == Demand::Visible {
                        let shown = if n.role == "webshop" {
                            w.shown_in_stock(i, p)
                        } else {
                            w.shelf(p, &n.name)
                        };
                        q = q.min(shown);
                    }
                    if q > 0 {
                        lines.push(json!({"product_id": p, "quantity": q, "unit_price": 1000}));
                    }
                }
                if lines.is_empty() {
                    w.nodes[i].stats.not_on_offer += 1;
                    continue;
                }
                let id = fresh("s");
                let mut body = json!({"sale_id": id, "currency": "EUR", "lines": lines});
                if n.role != "webshop" {
                    body["location"] = json!(n.name);
                }
                let r = new_request(&w, i, Kind::Sale, workload::sale(body), id);
                w.submit_new(r);
            }
            Ev::Restock(k) => {
                let r = &sc.restock[k];
                let i = idx(&r.node);
                let lines: Vec<serde_json::Value> = products
                    .iter()
                    .map(|p| json!({"product_id": p, "quantity": r.quantity}))
                    .collect();
                for chunk in lines.chunks(storemesh_protocol::ops::LINES_MAX) {
                    let id = fresh("r");
                    let op = workload::receipt(
                        json!({"receipt_id": id, "location": r.node, "lines": chunk}),
                    );
                    let req = new_request(&w, i, Kind::Receipt, op, id);
                    w.submit_new(req);
                }
            }
            Ev::Allocate(k) => {
                let a = &sc.allocations[k];
                let i = idx(&a.from);
                let ps: Vec<u64> = a
                    .product
                    .map(|p| vec![p])
                    .unwrap_or_else(|| products.clone());
                for p in ps {
                    let id = fresh("g");
                    let op = workload::grant(
                        json!({"grant_id": id, "product_id": p, "location": a.from, "to": a.to, "quantity": a.quantity}),
                    );
                    let req = new_request(&w, i, Kind::Grant, op, id);
                    w.submit_new(req);
                }
            }
            Ev::PartitionStart(k) => {
                let p = &sc.partitions[k];
                let set: Vec<usize> = p.nodes.iter().map(|n| idx(n)).collect();
                match p.kind.as_str() {
                    "down" => {
                        for &i in &set {
                            w.power_off(i);
                        }
                    }
                    "one-way" => {
                        w.net.block(set[0], set[1]);
                        w.partition_started(&[(set[0], set[1])]);
                    }
                    _ => {
                        let dirs = cut(&set, sc.nodes.len());
                        for &(a, b) in &dirs {
                            w.net.block(a, b);
                        }
                        w.partition_started(&dirs);
                    }
                }
            }
            Ev::Backup(k) => {
                let i = idx(&sc.restores[k].node);
                w.take_image(i);
                if let Some(img) = w.nodes[i].images.last().cloned() {
                    backups.insert(k, img);
                }
            }
            Ev::Restore(k) => {
                let i = idx(&sc.restores[k].node);
                if let Some(img) = backups.remove(&k) {
                    if w.nodes[i].life.is_some() {
                        w.crash_node(i, Vec::new());
                        w.nodes[i].restart_image = Some(img);
                        report.restores += 1;
                    }
                }
            }
            Ev::PartitionEnd(k) => {
                let p = &sc.partitions[k];
                let set: Vec<usize> = p.nodes.iter().map(|n| idx(n)).collect();
                match p.kind.as_str() {
                    "down" => {
                        for &i in &set {
                            w.restart_node(i)?;
                        }
                    }
                    "one-way" => w.net.unblock(set[0], set[1]),
                    _ => {
                        for (a, b) in cut(&set, sc.nodes.len()) {
                            w.net.unblock(a, b);
                        }
                    }
                }
                let target = snapshot_heads(&w);
                watches.push((
                    k,
                    ConvergeWatch {
                        started_ms: w.now_ms,
                        target,
                        done: BTreeMap::new(),
                    },
                ));
            }
        }
        if events % sc.full_check_every == 0 {
            w.check_dirty()?;
        }
    }
    w.advance_to(end)?;
    w.event = events + 1;
    let final_ms = heal_and_quiesce(&mut w)?;
    watch(&w, &mut watches, &mut results);
    report.final_converge_s = final_ms as f64 / 1000.0;
    w.final_checks()?;
    report.trace_hash = w.trace_hash();

    // Per node figures from the (converged) views and the clients.
    let Some(e) = w.nodes[0].life.as_ref().map(|l| l.engine()) else {
        return Ok(());
    };
    for n in &w.nodes {
        if let Some(l) = &n.life {
            report.epochs_started += l.engine().stats.epochs_started;
            report.epochs_joined += l.engine().stats.epochs_joined;
            report.forks_detected += l.engine().stats.forks_detected;
        }
    }
    for (i, n) in sc.nodes.iter().enumerate() {
        let mut line = NodeLine {
            name: n.name.clone(),
            policy: n.policy.as_str().into(),
            sales_ok: w.nodes[i].stats.sales_ok,
            units_sold: w.nodes[i].stats.units_sold,
            refused: w.nodes[i].stats.sales_refused,
            refused_with_stock: w.nodes[i].stats.refused_with_stock,
            refused_stock_anywhere: w.nodes[i].stats.refused_stock_anywhere,
            not_on_offer: w.nodes[i].stats.not_on_offer,
            bytes: w.net.bytes_out.get(i).copied().unwrap_or(0)
                + w.net.bytes_in.get(i).copied().unwrap_or(0),
            ..NodeLine::default()
        };
        for a in e.views.alarms().values() {
            if a.kind == "overdraft" && a.node == n.name {
                line.overdrafts += 1;
                for l in a.record["lines"].as_array().into_iter().flatten() {
                    line.units_overdrawn += l["quantity"].as_i64().unwrap_or(0);
                }
            }
        }
        for p in &products {
            line.on_hand_end += e.views.entry(*p, &n.name).map(|x| x.on_hand()).unwrap_or(0);
            if n.policy == Policy::Strict {
                if let Some(x) = e.views.entry(*p, &n.name) {
                    report.oversold_strict_units += (-x.on_hand()).max(0);
                }
            }
        }
        line.converge_s = results
            .iter()
            .map(|m| m.get(&i).map(|ms| *ms as f64 / 1000.0))
            .collect();
        report.nodes.push(line);
    }
    Ok(())
}

/// Draws product indexes: uniform, or Zipf(s) by rank (index 0 most popular).
struct Popularity {
    cdf: Option<Vec<f64>>,
    n: usize,
}

impl Popularity {
    fn new(n: usize, zipf: Option<f64>) -> Popularity {
        let cdf = zipf.map(|s| {
            let mut acc = 0.0;
            let mut v: Vec<f64> = (1..=n)
                .map(|k| {
                    acc += (k as f64).powf(-s);
                    acc
                })
                .collect();
            for x in &mut v {
                *x /= acc;
            }
            v
        });
        Popularity { cdf, n }
    }

    fn pick(&self, rng: &mut impl Rng) -> usize {
        match &self.cdf {
            None => rng.gen_range(0..self.n),
            Some(cdf) => {
                let u: f64 = rng.gen_range(0.0..1.0);
                cdf.partition_point(|c| *c <= u).min(self.n - 1)
            }
        }
    }
}

/// Both directions between `set` and every other node.
fn cut(set: &[usize], n: usize) -> Vec<(usize, usize)> {
    let mut dirs = Vec::new();
    for &a in set {
        for b in 0..n {
            if !set.contains(&b) {
                dirs.push((a, b));
                dirs.push((b, a));
            }
        }
    }
    dirs
}

fn watch(
    w: &World,
    watches: &mut Vec<(usize, ConvergeWatch)>,
    results: &mut [BTreeMap<usize, u64>],
) {
    let members = w.members();
    for (k, cw) in watches.iter_mut() {
        for &i in &members {
            if !cw.done.contains_key(&i) && has_all(w, i, &cw.target) {
                cw.done.insert(i, w.now_ms - cw.started_ms);
                results[*k].insert(i, w.now_ms - cw.started_ms);
            }
        }
    }
    watches.retain(|(_, cw)| members.iter().any(|i| !cw.done.contains_key(i)));
}

impl World {
    /// Units of `p` physically at `loc`: the union of every running node's
    /// view, i.e. every sale made anywhere so far.
    pub fn shelf(&self, p: u64, loc: &str) -> i64 {
        let mut all = storemesh_protocol::ledger::StockEntry::default();
        for n in &self.nodes {
            if let Some(e) = n.life.as_ref().and_then(|l| l.engine().views.entry(p, loc)) {
                all.merge(e);
            }
        }
        all.on_hand()
    }

    /// Units of `p` node `i` (a web shop) offers, as it would read them from
    /// its own `GET /api/inventory`: at a location it heard from within
    /// [`OFFER_FRESH_MS`] (the read's `last_heard_s`), the units on hand in
    /// its view (what it lacks rights for it asks a grant for); at a location
    /// behind a longer silence, only the units it holds the rights to there
    /// (the row's `available`): escrow keeps those on that shelf for it, so
    /// it can sell them while the store is cut off — what an online
    /// allocation is for — while the rest of that stale view it cannot
    /// confirm and does not offer.
    pub fn shown_in_stock(&self, i: usize, p: u64) -> i64 {
        let Some(engine) = self.nodes[i].life.as_ref().map(|l| l.engine()) else {
            return 0;
        };
        let heard = engine.last_heard_by_location();
        let now = self.clock(i);
        self.nodes
            .iter()
            .filter(|n| !n.is_clone)
            .map(|n| {
                let loc = &n.cfg.location;
                let on_hand = self.peek_on_hand(i, p, loc).max(0);
                let fresh = heard
                    .get(loc)
                    .is_some_and(|t| *t == u64::MAX || now.saturating_sub(*t) <= OFFER_FRESH_MS);
                if fresh {
                    on_hand
                } else {
                    on_hand.min(engine.rights(p, loc).max(0))
                }
            })
            .sum()
    }

    /// Whether a sale refused for lack of rights could have been sold: for
    /// every short line, a location whose own node this node can reach (its
    /// own location included) had the units on hand — on hand as the union of
    /// every running node's view, i.e. every sale made anywhere so far. The
    /// sale's own location when it named one; any location when it did not (a
    /// web order ships from wherever the goods are). A refusal that is not
    /// counted here is a real stock-out (or stock cut off by a partition),
    /// which no movement of rights could have avoided.
    /// With `reachable_only == false`: whether the units were on hand at all
    /// (reachable or behind a partition) — the refusals a central server
    /// that saw every shelf would not have made, i.e. the whole price of escrow.
    pub fn refused_with_stock(&self, rid: usize, e: &OpError, reachable_only: bool) -> bool {
        let OpError::InsufficientStock(short) = e else {
            return false;
        };
        let r = &self.clients.reqs[rid];
        let named = match &r.op {
            Op::Sale(s) => s.location.is_some(),
            _ => true,
        };
        let i = r.node;
        let reachable = |loc: &str| {
            !reachable_only
                || self
                    .nodes
                    .iter()
                    .position(|n| n.cfg.location == loc && !n.is_clone)
                    .is_some_and(|o| {
                        o == i || (!self.net.is_blocked(i, o) && !self.net.is_blocked(o, i))
                    })
        };
        let on_hand = |p: u64, loc: &str| self.shelf(p, loc);
        !short.is_empty()
            && short.iter().all(|l| {
                let q = l.requested as i64;
                if named {
                    reachable(&l.location) && on_hand(l.product_id, &l.location) >= q
                } else {
                    self.nodes.iter().any(|n| {
                        !n.is_clone
                            && reachable(&n.cfg.location)
                            && on_hand(l.product_id, &n.cfg.location) >= q
                    })
                }
            })
    }
}
