//! The checks after heal and quiescence: convergence, views, customers,
//! acknowledged writes on every node, no oversell.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{ReadDoc, ROOT};
use storemesh_protocol::engine::Engine;
use storemesh_protocol::layout::CustomerKey;
use storemesh_protocol::ledger::StockEntry;
use storemesh_protocol::views::read_customer;

use super::{first_diff, flat_recomputed};
use crate::invariant::Violation;
use crate::world::World;

impl World {
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
}
