//! Scenario files (`sim/scenarios/*.toml`): a retailer's "what happens if…".
//!
//! A scenario names the nodes (role, policy, sales rate), the topology, the
//! products with their opening stock per location, allocations to the web
//! shop, restocking, sales peaks and a schedule of partitions and outages.
//! It runs on the same simulated mesh as the random runs, with every
//! invariant checked, and reports per node: sales accepted, refused for lack
//! of rights, overdrafts, time to converge after each heal, bytes exchanged.

mod report;
mod run;
mod shelf;

pub use report::{NodeLine, ScenarioReport};
pub use run::run;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;
use storemesh_protocol::engine::Policy;

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
