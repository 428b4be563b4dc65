//! Running a scenario: its events on a simulated world, convergence watched
//! after each heal, the report filled in.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{ChangeHash, ReadDoc};
use rand::Rng;
use serde_json::json;
use storemesh_protocol::engine::Policy;

use super::{Demand, NodeLine, Scenario, ScenarioReport, HOUR_MS};
use crate::client::Kind;
use crate::driver::heal_and_quiesce;
use crate::invariant::Violation;
use crate::options::Topology;
use crate::workload::{self, new_request};
use crate::world::{NodeSpec, Setup, World};
use storemesh_protocol::rebalance::AllocationRule;

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
