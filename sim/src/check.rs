//! Invariant checkers (DESIGN §5). Each returns a [`Violation`] naming the
//! seed, the event, the simulated time and the invariant.
//!
//! - after every commit of every node: owned cells never decrease (within a
//!   process lifetime), no strict oversell in that replica's view, no fork
//!   report for a node whose history was never forked on purpose;
//! - after every event, on every node that committed since the last event:
//!   views equal a recomputation from the documents, owned keys single-valued;
//! - after every restart: every write the node acknowledged is still there;
//! - at the end (after heal and quiescence): convergence, views, customers,
//!   acknowledged writes on every node, exactly-once per writer, no oversell.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use automerge::{ReadDoc, ROOT};
use storemesh_protocol::engine::{Batch, Engine};
use storemesh_protocol::ids::{ActorKey, NodeTag};
use storemesh_protocol::layout::{parse_record_key, CustomerKey, DocId, RecordKind};
use storemesh_protocol::ledger::StockEntry;
use storemesh_protocol::views::{read_customer, read_entry};

use crate::world::World;

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

/// Events between two full recomputations of every committed node's views
/// (rows a commit touched are compared with their documents at every commit).
pub const FULL_CHECK_EVERY: usize = 25;

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

type Flat = BTreeMap<(u64, String), StockEntry>;

fn flat_views(e: &Engine) -> Flat {
    let mut out = Flat::new();
    for (p, m) in e.views.stock() {
        for (l, entry) in m {
            if !entry.cells.is_empty() {
                out.insert((*p, l.clone()), entry.clone());
            }
        }
    }
    out
}

fn flat_recomputed(e: &Engine) -> Flat {
    let mut out = Flat::new();
    for (p, m) in e.recompute_stock() {
        for (l, entry) in m {
            if !entry.cells.is_empty() {
                out.insert((p, l), entry);
            }
        }
    }
    out
}

/// The writers whose cells differ between a view entry and its document.
fn entry_diff(view: &StockEntry, doc: &StockEntry) -> String {
    let actors: BTreeSet<&ActorKey> = view.cells.keys().chain(doc.cells.keys()).collect();
    let mut out = Vec::new();
    for a in actors {
        let (x, y) = (view.cells.get(a), doc.cells.get(a));
        if x != y {
            out.push(format!("writer {}: view {:?} document {:?}", a.hex(), x, y));
        }
    }
    out.join("; ")
}

fn first_diff(a: &Flat, b: &Flat) -> String {
    let keys: BTreeSet<&(u64, String)> = a.keys().chain(b.keys()).collect();
    for k in keys {
        let (x, y) = (a.get(k), b.get(k));
        if x != y {
            let empty = StockEntry::default();
            return format!(
                "product {} at {}: {}",
                k.0,
                k.1,
                entry_diff(x.unwrap_or(&empty), y.unwrap_or(&empty))
            );
        }
    }
    "no difference".into()
}

fn cell_list(entry: &StockEntry) -> Vec<(ActorKey, u8, NodeTag, u64)> {
    let mut out = Vec::new();
    for (a, c) in &entry.cells {
        out.push((*a, 0, NodeTag([0; 6]), c.received));
        out.push((*a, 1, NodeTag([0; 6]), c.removed));
        for (to, q) in &c.granted {
            out.push((*a, 2, *to, *q));
        }
        for (to, q) in &c.held {
            out.push((*a, 3, *to, *q));
        }
        out.push((*a, 4, NodeTag([0; 6]), c.released));
    }
    out
}

impl World {
    /// After a successful commit of node `i`.
    pub fn observe_commit(
        &mut self,
        i: usize,
        batch: &Batch,
    ) -> Result<(), crate::check::Violation> {
        let mut problem: Option<(&'static str, String)> = None;
        // Every change this commit wrote passes the per-op validation a
        // peer applies: one refused change would block the replication of
        // its whole document (all of this node's later records, for a
        // records document) — a full count of a large store once did that.
        if let Some(life) = self.nodes[i].life.as_ref() {
            let buckets = life.engine().config().buckets;
            for w in &batch.docs {
                // A snapshot (the chunks folded, e.g. after a large change)
                // holds the whole document: all of it is checked.
                let (doc, bytes) = match w {
                    storemesh_protocol::engine::DocWrite::Chunk { doc, bytes, .. }
                    | storemesh_protocol::engine::DocWrite::Snapshot { doc, bytes } => (doc, bytes),
                };
                // Ledger changes (most of the traffic) are left to the
                // peers' own validation on receipt and the owned-cells and
                // view checkers: decoding every one here doubled the cost
                // of an event.
                if doc.starts_with("ledger/") {
                    continue;
                }
                let checked = DocId::parse(doc, buckets).and_then(|id| {
                    let changes = storemesh_protocol::validate::changes_in_chunk(bytes)?;
                    storemesh_protocol::validate::check_changes_as_peer(&id, &changes, buckets)
                });
                if let Err(e) = checked {
                    let node_name = self.nodes[i].name.clone();
                    return Err(self.violation(
                        "peer-validation",
                        format!(
                            "node {node_name} flushed a change of {doc} that a peer refuses: {e}"
                        ),
                    ));
                }
            }
        }
        {
            let node_name = self.nodes[i].name.clone();
            let Some(life) = self.nodes[i].life.as_mut() else {
                return Ok(());
            };
            let check = &mut self.check;
            let views = &life.node.engine().views;
            if views.alarms().len() != life.alarms_seen {
                life.alarms_seen = views.alarms().len();
                for (key, alarm) in views.alarms() {
                    // A record is one per key in one month's documents: a
                    // node restored from an old image may write a record
                    // under the key of one it lost (a count page numbered
                    // again) in a later month, and it is another record of
                    // another event (seed 212: a deficit of 7 lost, one of
                    // 12 under the same key a month on).
                    let month = storemesh_protocol::layout::month_of(
                        alarm.record["at_ms"].as_u64().unwrap_or(0),
                    );
                    if !check.alarms.insert((key.0.clone(), key.1.clone(), month)) {
                        continue;
                    }
                    let r = &alarm.record;
                    let loc = r["location"].as_str().unwrap_or("").to_string();
                    match alarm.kind.as_str() {
                        "deficit" => {
                            check.deficit_alarms += 1;
                            let p = r["product_id"].as_u64().unwrap_or(0);
                            let d = r["deficit"].as_i64().unwrap_or(0);
                            *check
                                .allowance
                                .entry((alarm.node.clone(), p, loc))
                                .or_default() += d;
                        }
                        "overdraft" => {
                            check.overdraft_alarms += 1;
                            // Legitimate only at the seller's own location, when
                            // that location is relaxed or the till pressed override.
                            let sale = r["sale_id"].as_str().unwrap_or("");
                            let own = alarm.node == loc;
                            let relaxed = check.relaxed.contains(&loc);
                            let pressed = check.overrides.contains(sale);
                            if !(own && (relaxed || pressed)) && problem.is_none() {
                                problem = Some((
                                    "no-oversell",
                                    format!(
                                        "node {} sold beyond its rights at strict location {loc} without override (sale {sale}, overdraft {}); seen by {node_name}",
                                        alarm.node, alarm.record
                                    ),
                                ));
                            }
                            for l in r["lines"].as_array().into_iter().flatten() {
                                let p = l["product_id"].as_u64().unwrap_or(0);
                                let q = l["quantity"].as_i64().unwrap_or(0);
                                *check
                                    .allowance
                                    .entry((alarm.node.clone(), p, loc.clone()))
                                    .or_default() += q;
                            }
                        }
                        "fork" => {
                            check.fork_alarms += 1;
                            if !check.forked.contains(&alarm.node) && problem.is_none() {
                                problem = Some((
                                    "owned-cells",
                                    format!(
                                        "node {node_name} sees a fork of {}'s history ({}), but that node was never restored from a backup or cloned: its changes left it before they were durable",
                                        alarm.node, alarm.record
                                    ),
                                ));
                            }
                        }
                        _ => {}
                    }
                }
            }
            for ((p, l), _) in &batch.rows {
                // The row as the view holds it must equal the row read back
                // from its ledger document.
                let doc_id = life.engine().ledger_doc_id(*p, l).encode();
                let fresh = life
                    .engine()
                    .doc(&doc_id)
                    .map(|d| read_entry(d, *p, None))
                    .unwrap_or_default();
                let held = views.entry(*p, l).cloned().unwrap_or_default();
                if fresh != held && problem.is_none() {
                    problem = Some((
                        "views-true",
                        format!(
                            "node {node_name}: the view of product {p} at {l} differs from its document: {}",
                            entry_diff(&held, &fresh)
                        ),
                    ));
                }
                let Some(entry) = views.entry(*p, l) else {
                    continue;
                };
                for (actor, field, to, v) in cell_list(entry) {
                    let key = (*p, l.clone(), actor, field, to);
                    let before = life.seen.insert(key, v).unwrap_or(0);
                    if v < before && problem.is_none() {
                        problem = Some((
                            "owned-cells",
                            format!(
                                "node {node_name}: cell {}/{}/{} of product {p} at {l} went down from {before} to {v}",
                                actor.hex(),
                                ["received", "removed", "granted"][field as usize],
                                to.hex()
                            ),
                        ));
                    }
                }
                let mut any_forked = false;
                let mut allow_total = 0i64;
                for (tag, rights) in check.rights_by_holder(entry) {
                    let name = check.name_of(tag);
                    let (allow, forked) = check.allowance_of(tag, *p, l);
                    if forked {
                        any_forked = true;
                        continue;
                    }
                    allow_total += allow;
                    if rights < -allow && problem.is_none() {
                        problem = Some((
                            "no-oversell",
                            format!(
                                "in node {node_name}'s view, rights of {name} on product {p} at {l} are {rights}, below the {allow} its recorded deficits and overdrafts allow (on hand {})",
                                entry.on_hand()
                            ),
                        ));
                    }
                }
                // The committing node judged its own sales and grants by the
                // retirements it knew: by its own view it never spent below zero.
                let me = life.engine().tag();
                if !views.retired().is_empty() && check.retired_to.values().any(|s| *s == me) {
                    let own = life.engine().node_rights(entry, me);
                    let (allow, forked) = check.allowance_of(check.resolve(me), *p, l);
                    if entry.rights(me) < 0 && own >= 0 {
                        check.successor_spends += 1;
                    }
                    if !forked && own < -allow && problem.is_none() {
                        problem = Some((
                            "no-oversell",
                            format!(
                                "in its own view (retirements resolved), rights of {node_name} on product {p} at {l} are {own}, below the {allow} its recorded deficits and overdrafts allow"
                            ),
                        ));
                    }
                }
                if !any_forked && entry.on_hand() < -allow_total && problem.is_none() {
                    problem = Some((
                        "no-oversell",
                        format!(
                            "in node {node_name}'s view, on hand of product {p} at {l} is {}, below -{allow_total}",
                            entry.on_hand()
                        ),
                    ));
                }
            }
        }
        self.nodes[i].dirty = true;
        match problem {
            Some((inv, msg)) => Err(self.violation(inv, msg)),
            None => Ok(()),
        }
    }

    /// Every [`FULL_CHECK_EVERY`] events: a full recomputation on every node
    /// that committed since the last one.
    pub fn check_dirty(&mut self) -> Result<(), Violation> {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].dirty {
                continue;
            }
            self.nodes[i].dirty = false;
            self.check_node_views(i)?;
        }
        Ok(())
    }

    /// Views equal a recomputation from the documents; owned keys hold one value.
    pub fn check_node_views(&self, i: usize) -> Result<(), Violation> {
        let Some(life) = &self.nodes[i].life else {
            return Ok(());
        };
        let e = &life.engine();
        let (v, r) = (flat_views(e), flat_recomputed(e));
        if v != r {
            return Err(self.violation(
                "views-true",
                format!(
                    "node {}: the stock view differs from a recomputation from its documents: {}",
                    self.nodes[i].name,
                    first_diff(&v, &r)
                ),
            ));
        }
        let conflicts = e.owned_conflicts();
        if let Some((doc, key)) = conflicts.first() {
            return Err(self.violation(
                "owned-cells",
                format!(
                    "node {}: owned key {key} of {doc} holds more than one value",
                    self.nodes[i].name
                ),
            ));
        }
        Ok(())
    }

    /// After a restart: everything this node acknowledged is still on its disk.
    pub fn check_restart(&self, i: usize) -> Result<(), Violation> {
        let Some(life) = &self.nodes[i].life else {
            return Ok(());
        };
        for r in &self.clients.reqs {
            if r.node != i || r.first_ok.is_none() || r.idem_lost || r.conflict_probe_of.is_some() {
                continue;
            }
            let Some(key) = &r.key else { continue };
            let stored = life.store.idem(key).ok().flatten();
            if stored.is_none() {
                return Err(self.violation(
                    "acked-write-durable",
                    format!(
                        "{key}, acknowledged by {} at t={:.3}s, has no idempotency record after the restart",
                        self.nodes[i].name,
                        r.acked_at_ms.unwrap_or(0) as f64 / 1000.0
                    ),
                ));
            }
            if let Some(rk) = r.record_key() {
                if !r
                    .rec_docs
                    .iter()
                    .any(|d| life.engine().record_in_month(d, &rk).is_some())
                {
                    return Err(self.violation(
                        "acked-write-durable",
                        format!(
                            "record {rk}, acknowledged by {} at t={:.3}s, is gone after the restart",
                            self.nodes[i].name,
                            r.acked_at_ms.unwrap_or(0) as f64 / 1000.0
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Invariant `authorship`: an honest member's change is never refused
    /// for its certificate; the only such refusals are the hostile node's
    /// impersonations sent to this engine.
    fn check_authorship(&self, i: usize, e: &Engine) -> Result<(), Violation> {
        let refused: u64 = [
            storemesh_protocol::signing::REJECT_BAD_SIGNATURE,
            storemesh_protocol::signing::REJECT_UNKNOWN_AUTHOR,
        ]
        .iter()
        .map(|r| e.stats.rejected_by_reason.get(r).copied().unwrap_or(0))
        .sum();
        let expected = self.nodes[i]
            .life
            .as_ref()
            .map_or(0, |l| l.impersonations_received);
        if refused != expected {
            return Err(self.violation(
                "authorship",
                format!(
                    "node {} refused {refused} changes for their certificate or author, {expected} of them forged",
                    self.nodes[i].name
                ),
            ));
        }
        Ok(())
    }

    /// The checks after heal and quiescence.
    pub fn final_checks(&self) -> Result<(), Violation> {
        let members = self.members();
        let Some(&first) = members.first() else {
            return Ok(());
        };
        let engine = |i: usize| self.nodes[i].life.as_ref().map(|l| l.engine());
        let Some(e0) = engine(first) else {
            return Err(self.violation(
                "liveness",
                format!("node {} is not running at the end", self.nodes[first].name),
            ));
        };
        // Documents without any change (created for a listing, never filled)
        // hold nothing: they do not count.
        let non_empty = |e: &Engine| -> Vec<(String, Vec<String>)> {
            e.documents()
                .into_iter()
                .filter(|(_, h)| !h.is_empty())
                .collect()
        };
        let docs0 = non_empty(e0);
        let stock0 = flat_recomputed(e0);
        let names = |i: usize| self.nodes[i].name.clone();
        for &i in &members {
            let Some(e) = engine(i) else {
                return Err(self.violation(
                    "liveness",
                    format!("node {} is not running at the end", names(i)),
                ));
            };
            self.check_node_views(i)?;
            self.check_authorship(i, e)?;
            if i == first {
                continue;
            }
            let docs = non_empty(e);
            if docs != docs0 {
                let a: BTreeMap<_, _> = docs0.iter().cloned().collect();
                let b: BTreeMap<_, _> = docs.iter().cloned().collect();
                let which = a
                    .keys()
                    .chain(b.keys())
                    .find(|k| a.get(*k) != b.get(*k))
                    .cloned()
                    .unwrap_or_default();
                return Err(self.violation(
                    "convergence",
                    format!(
                        "after heal and quiescence {} and {} hold different documents (first: {which})",
                        names(first),
                        names(i)
                    ),
                ));
            }
            if e.digest_root() != e0.digest_root() {
                return Err(self.violation(
                    "convergence",
                    format!(
                        "{} and {} have equal heads but different summary digests",
                        names(first),
                        names(i)
                    ),
                ));
            }
            let stock = flat_recomputed(e);
            if stock != stock0 {
                return Err(self.violation(
                    "convergence",
                    format!(
                        "stock of {} and {} differ: {}",
                        names(first),
                        names(i),
                        first_diff(&stock0, &stock)
                    ),
                ));
            }
            if e.views.customers() != e0.views.customers() {
                return Err(self.violation(
                    "convergence",
                    format!("customer views of {} and {} differ", names(first), names(i)),
                ));
            }
            let ka: Vec<_> = e.views.alarms().keys().collect();
            let kb: Vec<_> = e0.views.alarms().keys().collect();
            if ka != kb {
                return Err(self.violation(
                    "convergence",
                    format!("alarm lists of {} and {} differ", names(first), names(i)),
                ));
            }
        }
        for &i in &members {
            if let Some(e) = engine(i) {
                self.check_customers(i, e)?;
                self.check_final_oversell(i, e)?;
            }
        }
        // Every acknowledged write is on every node.
        for r in &self.clients.reqs {
            if r.first_ok.is_none() || r.lost_with_history || r.conflict_probe_of.is_some() {
                continue;
            }
            let Some(rk) = r.record_key() else { continue };
            for &i in &members {
                if let Some(e) = engine(i) {
                    if !r
                        .rec_docs
                        .iter()
                        .any(|d| e.record_in_month(d, &rk).is_some())
                    {
                        return Err(self.violation(
                            "acked-write-durable",
                            format!(
                                "record {rk}, acknowledged by {} at t={:.3}s, is missing on {} after heal",
                                names(r.node),
                                r.acked_at_ms.unwrap_or(0) as f64 / 1000.0,
                                names(i)
                            ),
                        ));
                    }
                }
            }
        }
        self.check_exactly_once(e0)?;
        self.check_reservations(e0)?;
        self.check_transfers(e0)?;
        self.check_deficits_per_event(e0)?;
        self.check_ownerless_imports(e0)?;
        self.check_ownerless_receipts(e0)?;
        self.check_colliding_ids(e0)?;
        for r in &self.clients.reqs {
            if r.outstanding() {
                return Err(self.violation(
                    "liveness",
                    format!(
                        "request {} at {} was never answered",
                        r.key.as_deref().unwrap_or(&r.id),
                        names(r.node)
                    ),
                ));
            }
        }
        Ok(())
    }

    fn check_final_oversell(&self, i: usize, e: &Engine) -> Result<(), Violation> {
        let mut rows: Vec<(&u64, &String, &StockEntry)> = e
            .views
            .stock()
            .iter()
            .flat_map(|(p, m)| m.iter().map(move |(l, en)| (p, l, en)))
            .collect();
        rows.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        for (p, l, entry) in rows {
            let mut allow_total = 0;
            for (tag, rights) in self.check.rights_by_holder(entry) {
                let name = self.check.name_of(tag);
                let (allow, _) = self.check.allowance_of(tag, *p, l);
                allow_total += allow;
                if rights < -allow {
                    return Err(self.violation(
                        "no-oversell",
                        format!(
                            "after heal, in {}'s view rights of {name} on product {p} at {l} are {rights}; recorded deficits and overdrafts cover only {allow}",
                            self.nodes[i].name
                        ),
                    ));
                }
            }
            if entry.on_hand() < -allow_total {
                return Err(self.violation(
                    "no-oversell",
                    format!(
                        "after heal, on hand of product {p} at {l} is {} (allowed -{allow_total})",
                        entry.on_hand()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Customer views equal a recomputation from the documents; erased
    /// customers have no personal fields.
    fn check_customers(&self, i: usize, e: &Engine) -> Result<(), Violation> {
        // The committed key store (customer data is encrypted per customer).
        let keys: BTreeMap<String, _> = self.nodes[i]
            .life
            .as_ref()
            .and_then(|l| l.store.load_keys().ok())
            .unwrap_or_default()
            .into_iter()
            .collect();
        for (id, _) in e.documents() {
            if !id.starts_with("cust/") {
                continue;
            }
            let Some(doc) = e.doc(&id) else { continue };
            let customers: BTreeSet<String> = doc
                .keys(ROOT)
                .filter_map(|k| {
                    CustomerKey::parse(&k)
                        .ok()
                        .map(|c| c.customer().to_string())
                })
                .collect();
            for c in customers {
                let fresh = read_customer(doc, &c, keys.get(&c));
                let view = e.views.customers().get(&c).cloned().unwrap_or_default();
                if fresh != view && !(fresh.is_empty() && view.is_empty()) {
                    return Err(self.violation(
                        "views-true",
                        format!(
                            "node {}: customer {c}'s view differs from its document",
                            self.nodes[i].name
                        ),
                    ));
                }
                if fresh.erased && !fresh.profile.is_empty() {
                    return Err(self.violation(
                        "erasure",
                        format!(
                            "node {}: erased customer {c} still has personal fields",
                            self.nodes[i].name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reservations: only the fulfilling node (or, once it is retired, its
    /// successor) closes one, at most once, and it expires one only when its
    /// own clock has reached the expiry time.
    fn check_reservations(&self, e: &Engine) -> Result<(), Violation> {
        // Per (reservation id, creating node): two nodes apart may have used
        // one id (each closed under its own key, naming its creator).
        let mut opened: BTreeMap<(String, String), (Option<NodeTag>, u64)> = BTreeMap::new();
        // (reservation id, creator) → closes: (closing writer, status, at).
        type Closes = BTreeMap<(String, String), Vec<(NodeTag, String, u64)>>;
        let mut closes: Closes = BTreeMap::new();
        for (id, _) in e.documents() {
            if !id.starts_with("rec/") {
                continue;
            }
            let Some(doc) = e.doc(&id) else { continue };
            for key in doc.keys(ROOT) {
                let Ok((kind, rid)) = parse_record_key(&key) else {
                    continue;
                };
                if !matches!(kind, RecordKind::Reservation | RecordKind::ReservationClose) {
                    continue;
                }
                for (value, exid) in doc.get_all(ROOT, key.as_str()).unwrap_or_default() {
                    let writer = match exid {
                        automerge::ObjId::Id(_, a, _) => ActorKey::from_bytes(a.to_bytes()),
                        automerge::ObjId::Root => None,
                    };
                    let (Some(writer), Some(json)) = (
                        writer,
                        value
                            .as_str()
                            .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()),
                    ) else {
                        continue;
                    };
                    let rid = json["reservation_id"].as_str().unwrap_or(rid).to_string();
                    if kind == RecordKind::Reservation {
                        let creator = json["node"].as_str().unwrap_or("").to_string();
                        opened.insert(
                            (rid, creator),
                            (
                                json["fulfil_by_tag"].as_str().and_then(NodeTag::parse),
                                json["expires_at_ms"].as_u64().unwrap_or(0),
                            ),
                        );
                    } else {
                        // A close from before closes named the creator: the
                        // one reservation of the id.
                        let creator = match json["creator"].as_str() {
                            Some(c) => c.to_string(),
                            None => opened
                                .keys()
                                .find(|(r, _)| *r == rid)
                                .map(|(_, c)| c.clone())
                                .unwrap_or_default(),
                        };
                        closes.entry((rid, creator)).or_default().push((
                            writer.tag(),
                            json["status"].as_str().unwrap_or("").to_string(),
                            json["at_ms"].as_u64().unwrap_or(0),
                        ));
                    }
                }
            }
        }
        let forked = |t: &NodeTag| {
            self.check
                .names
                .get(t)
                .is_some_and(|n| self.check.forked.contains(n))
        };
        // Units are not held forever: a reservation past its expiry by the
        // clock of the node that acts for it (its fulfilling node, or that
        // node's successor once retired) was expired — that node runs at
        // least once per anti-entropy interval.
        let margin = self.setup.anti_entropy_ms + 2 * self.setup.tick_ms;
        for (rid, (by, expires)) in &opened {
            if closes.contains_key(rid) {
                continue;
            }
            let Some(by) = by else { continue };
            let holder = e.views.resolve(*by);
            let Some(i) = self
                .members()
                .into_iter()
                .find(|i| !self.nodes[*i].is_clone && self.nodes[*i].cfg.node_id.tag() == holder)
            else {
                continue;
            };
            let now = self.clock(i);
            if now >= expires.saturating_add(margin) {
                return Err(self.violation(
                    "reservations",
                    format!(
                        "reservation {rid:?} (fulfilled by {}) expired at {expires} but is still open at {now} by the clock of {}, which acts for it: its units stay held",
                        self.check.name_of(*by),
                        self.nodes[i].name
                    ),
                ));
            }
        }
        for (rid, cs) in &closes {
            let Some((Some(by), expires)) = opened.get(rid) else {
                return Err(self.violation(
                    "reservations",
                    format!("reservation {rid:?} was closed but its reservation record is missing"),
                ));
            };
            for (w, status, at) in cs {
                if e.views.resolve(*w) != e.views.resolve(*by) {
                    return Err(self.violation(
                        "reservations",
                        format!(
                            "reservation {rid:?} was closed ({status}) by {}, not by its fulfilling node {}",
                            self.check.names.get(w).cloned().unwrap_or_else(|| w.hex()),
                            self.check.names.get(by).cloned().unwrap_or_else(|| by.hex())
                        ),
                    ));
                }
                if status == "expired" && at < expires {
                    return Err(self.violation(
                        "reservations",
                        format!("reservation {rid:?} expired at {at} by its node's clock, before its expiry time {expires}"),
                    ));
                }
            }
            if cs.len() > 1 && !cs.iter().all(|(w, _, _)| forked(w)) {
                return Err(self.violation(
                    "reservations",
                    format!("reservation {rid:?} was closed {} times: {cs:?}", cs.len()),
                ));
            }
        }
        Ok(())
    }

    /// Exactly once, per writer: every actor's cumulative cells equal the sum
    /// of the records it wrote (a double execution or a lost effect shows as a
    /// difference); no record was written twice concurrently.
    fn check_exactly_once(&self, e: &Engine) -> Result<(), Violation> {
        type Cells = (u64, u64, BTreeMap<NodeTag, u64>);
        let mut expected: BTreeMap<(ActorKey, u64, String), Cells> = BTreeMap::new();
        let tag_of: BTreeMap<&str, NodeTag> = self
            .check
            .names
            .iter()
            .map(|(t, n)| (n.as_str(), *t))
            .collect();
        for (id, _) in e.documents() {
            if !id.starts_with("rec/") {
                continue;
            }
            let Some(doc) = e.doc(&id) else { continue };
            for key in doc.keys(ROOT) {
                let Ok((kind, _)) = parse_record_key(&key) else {
                    continue;
                };
                if !matches!(
                    kind,
                    RecordKind::Sale
                        | RecordKind::Receipt
                        | RecordKind::Return
                        | RecordKind::Count
                        | RecordKind::CountLines
                        | RecordKind::CountZero
                        | RecordKind::Grant
                        | RecordKind::Reservation
                        | RecordKind::Transfer
                        | RecordKind::TransferReceipt
                ) {
                    continue;
                }
                let all = doc.get_all(ROOT, key.as_str()).unwrap_or_default();
                let writers: Vec<ActorKey> = all
                    .iter()
                    .filter_map(|(_, exid)| match exid {
                        automerge::ObjId::Id(_, a, _) => ActorKey::from_bytes(a.to_bytes()),
                        automerge::ObjId::Root => None,
                    })
                    .collect();
                // Two processes of one identity (a clone, a restored backup) may
                // both have executed the same request: that is the fork, which is
                // detected and reported. Anything else is a double execution.
                let forked_writers = writers.iter().all(|a| {
                    self.check
                        .names
                        .get(&a.tag())
                        .is_some_and(|n| self.check.forked.contains(n))
                });
                if all.len() > 1 && !forked_writers {
                    return Err(self.violation(
                        "exactly-once",
                        format!("record {key} in {id} was written by {} processes concurrently: executed more than once", all.len()),
                    ));
                }
                for ((value, _), actor) in all.iter().zip(writers) {
                    let Some(json) = value
                        .as_str()
                        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
                    else {
                        continue;
                    };
                    // Transfers leave `from` (the sender's removal) and
                    // arrive at `to` (the receiver's, units received only).
                    if kind == RecordKind::Transfer {
                        let from = json["from"].as_str().unwrap_or("").to_string();
                        for l in json["lines"].as_array().into_iter().flatten() {
                            let p = l["product_id"].as_u64().unwrap_or(0);
                            expected.entry((actor, p, from.clone())).or_default().1 +=
                                l["quantity"].as_u64().unwrap_or(0);
                        }
                        continue;
                    }
                    if kind == RecordKind::TransferReceipt {
                        let to = json["to"].as_str().unwrap_or("").to_string();
                        for l in json["lines"].as_array().into_iter().flatten() {
                            let p = l["product_id"].as_u64().unwrap_or(0);
                            let q = l["received"].as_u64().unwrap_or(0);
                            if q > 0 {
                                expected.entry((actor, p, to.clone())).or_default().0 += q;
                            }
                        }
                        continue;
                    }
                    let loc = json["location"].as_str().unwrap_or("").to_string();
                    let mut add = |p: u64, f: &mut dyn FnMut(&mut Cells)| {
                        f(expected.entry((actor, p, loc.clone())).or_default());
                    };
                    let lines = json["lines"].as_array().cloned().unwrap_or_default();
                    match kind {
                        RecordKind::Sale => {
                            for l in &lines {
                                let q = l["quantity"].as_u64().unwrap_or(0);
                                add(l["product_id"].as_u64().unwrap_or(0), &mut |c| c.1 += q);
                            }
                        }
                        RecordKind::Receipt => {
                            for l in &lines {
                                let q = l["quantity"].as_u64().unwrap_or(0);
                                add(l["product_id"].as_u64().unwrap_or(0), &mut |c| c.0 += q);
                            }
                        }
                        RecordKind::Return => {
                            for l in lines.iter().filter(|l| l["disposition"] == "restock") {
                                let q = l["quantity"].as_u64().unwrap_or(0);
                                add(l["product_id"].as_u64().unwrap_or(0), &mut |c| c.0 += q);
                            }
                        }
                        // A count session's page: [product, counted, basis, delta, at].
                        RecordKind::CountLines => {
                            for l in &lines {
                                let d = l[3].as_i64().unwrap_or(0);
                                add(l[0].as_u64().unwrap_or(0), &mut |c| {
                                    if d > 0 {
                                        c.0 += d as u64
                                    } else {
                                        c.1 += d.unsigned_abs()
                                    }
                                });
                            }
                        }
                        // A part of a full count's zeroing: [product, basis, delta].
                        RecordKind::CountZero => {
                            for l in json["zeroed"].as_array().into_iter().flatten() {
                                let d = l[2].as_i64().unwrap_or(0);
                                add(l[0].as_u64().unwrap_or(0), &mut |c| {
                                    if d > 0 {
                                        c.0 += d as u64
                                    } else {
                                        c.1 += d.unsigned_abs()
                                    }
                                });
                            }
                        }
                        RecordKind::Count => {
                            for l in &lines {
                                let d = l["delta"].as_i64().unwrap_or(0);
                                add(l["product_id"].as_u64().unwrap_or(0), &mut |c| {
                                    if d > 0 {
                                        c.0 += d as u64
                                    } else {
                                        c.1 += d.unsigned_abs()
                                    }
                                });
                            }
                        }
                        // Units reserved for another node are a grant to it.
                        RecordKind::Reservation => {
                            let to = json["fulfil_by_tag"].as_str().and_then(NodeTag::parse);
                            if let Some(to) = to.filter(|t| *t != actor.tag()) {
                                for l in &lines {
                                    let q = l["quantity"].as_u64().unwrap_or(0);
                                    add(l["product_id"].as_u64().unwrap_or(0), &mut |c| {
                                        *c.2.entry(to).or_default() += q
                                    });
                                }
                            }
                        }
                        RecordKind::Grant => {
                            let q = json["quantity"].as_u64().unwrap_or(0);
                            // The recipient's tag; records from before `to_tag`
                            // name it only (or by hex when the name was unknown).
                            let to =
                                json["to_tag"]
                                    .as_str()
                                    .and_then(NodeTag::parse)
                                    .or_else(|| {
                                        json["to"].as_str().and_then(|n| tag_of.get(n)).copied()
                                    });
                            if let Some(to) = to {
                                add(json["product_id"].as_u64().unwrap_or(0), &mut |c| {
                                    *c.2.entry(to).or_default() += q
                                });
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        let mut actual: BTreeMap<(ActorKey, u64, String), Cells> = BTreeMap::new();
        for ((p, l), entry) in flat_recomputed(e) {
            for (a, c) in entry.cells {
                let granted: BTreeMap<NodeTag, u64> =
                    c.granted.into_iter().filter(|(_, q)| *q > 0).collect();
                actual.insert((a, p, l.clone()), (c.received, c.removed, granted));
            }
        }
        let keys: BTreeSet<&(ActorKey, u64, String)> =
            expected.keys().chain(actual.keys()).collect();
        for k in keys {
            if self.check.discarded_actors.contains(&k.0) {
                continue;
            }
            let want = expected.get(k).cloned().unwrap_or_default();
            let got = actual.get(k).cloned().unwrap_or_default();
            if want != got {
                let who = self
                    .check
                    .names
                    .get(&k.0.tag())
                    .cloned()
                    .unwrap_or_default();
                return Err(self.violation(
                    "exactly-once",
                    format!(
                        "writer {} ({who}) on product {} at {}: its cells say received {} removed {} granted {:?}, its records add up to received {} removed {} granted {:?}",
                        k.0.hex(),
                        k.1,
                        k.2,
                        got.0,
                        got.1,
                        got.2,
                        want.0,
                        want.1,
                        want.2
                    ),
                ));
            }
        }
        Ok(())
    }
}
