//! View maintenance after documents changed (local writes or merged
//! changes from peers): recomputing ledger rows and other keys into the
//! views.

use std::collections::BTreeSet;

use automerge::{ReadDoc, ROOT};

use super::Engine;
use crate::layout::{self, CustomerKey, DocId};
use crate::ledger::StockEntry;
use crate::views::{read_customer, read_entries, read_entry};

/// Products of one ledger document whose views are rebuilt in one pass over
/// the whole document ([`read_entries`]) rather than one range read each.
pub(crate) const LEDGER_FULL_PASS_MIN: usize = 64;

impl Engine {
    /// Rebuilds the views touched by a set of keys of one document from the document.
    pub(crate) fn recompute_keys(&mut self, id: &str, keys: &BTreeSet<String>) {
        let Some(slot) = self.docs.get(id) else {
            return;
        };
        match slot.id.clone() {
            DocId::Ledger { location, .. } => {
                let products: BTreeSet<u64> = keys
                    .iter()
                    .filter_map(|k| layout::parse_ledger_any(k).ok())
                    .map(|(p, _, _, _)| p)
                    .collect();
                let entries: Vec<(u64, StockEntry)> = if products.len() >= LEDGER_FULL_PASS_MIN {
                    // Most of the document (a restart, a document received
                    // whole): one ordered pass over all its keys.
                    let mut all = read_entries(&*slot.doc);
                    products
                        .into_iter()
                        .map(|p| (p, all.remove(&p).unwrap_or_default()))
                        .collect()
                } else {
                    products
                        .into_iter()
                        .map(|p| (p, read_entry(&*slot.doc, p, None)))
                        .collect()
                };
                for (p, entry) in entries {
                    self.set_entry(p, &location, entry);
                }
            }
            DocId::Mesh => {
                let mut retirements = Vec::new();
                for k in keys {
                    if let Some(tag) = layout::parse_retired_key(k) {
                        // Conflicting successors: the smallest tag wins on every node.
                        let successor = slot
                            .doc
                            .get_all(ROOT, k.as_str())
                            .ok()
                            .into_iter()
                            .flatten()
                            .filter_map(|(v, _)| {
                                v.as_str().and_then(|s| layout::parse_retirement(s).ok())
                            })
                            .min();
                        if let Some(s) = successor {
                            retirements.push((tag, s));
                        }
                    }
                    if let Some(loc) = layout::parse_location_key(k) {
                        if let Ok(Some((v, _))) = slot.doc.get(ROOT, k.as_str()) {
                            if let Some(Ok(d)) = v.as_str().map(layout::parse_declared_location) {
                                if d.location == loc {
                                    self.views.declared.insert(loc.to_string(), d);
                                }
                            }
                        }
                    }
                    if let Ok(tag) = layout::parse_mesh_key(k) {
                        if let Ok(Some((v, _))) = slot.doc.get(ROOT, k.as_str()) {
                            if let Some(Ok(info)) = v.as_str().map(layout::parse_node_info) {
                                self.views.nodes.insert(tag, info);
                            }
                        }
                    }
                }
                for (tag, successor) in retirements {
                    self.note_retirement(tag, successor);
                }
            }
            DocId::Records { .. } => {
                let recs: Vec<(String, String)> = keys
                    .iter()
                    .filter_map(|k| {
                        let (v, _) = slot.doc.get(ROOT, k.as_str()).ok().flatten()?;
                        Some((k.clone(), v.as_str()?.to_string()))
                    })
                    .collect();
                for (k, json) in recs {
                    self.note_record(id, &k, &json);
                }
            }
            DocId::Products { .. } => self.recompute_products(id, keys),
            DocId::Customers { .. } => {
                let custs: BTreeSet<String> = keys
                    .iter()
                    .filter_map(|k| CustomerKey::parse(k).ok())
                    .map(|c| c.customer().to_string())
                    .collect();
                for c in custs {
                    let mut view = read_customer(&slot.doc, &c, self.keys.get(&c));
                    // Keep this actor's loyalty cells of the open batch.
                    if let Some(old) = self.views.customers.get(&c) {
                        for (cells, mine) in [
                            (&mut view.earned, old.earned.get(&self.actor)),
                            (&mut view.spent, old.spent.get(&self.actor)),
                        ] {
                            if let Some(v) = mine {
                                let e = cells.entry(self.actor).or_default();
                                *e = (*e).max(*v);
                            }
                        }
                    }
                    self.views.set_customer(&c, view);
                    self.pending_customers.insert(c);
                }
            }
        }
    }

    fn set_entry(&mut self, product: u64, location: &str, mut entry: StockEntry) {
        if location == self.cfg.location {
            self.alloc_dirty.insert(product);
        }
        let m = self.views.stock.entry(product).or_default();
        // This actor's cells may hold writes of the open batch that are not in
        // the document yet: the view keeps the larger value of each cell.
        if let Some(own) = m.get(location).and_then(|e| e.cells.get(&self.actor)) {
            entry.cells.entry(self.actor).or_default().merge(own);
        }
        if entry.cells.is_empty() {
            m.remove(location);
        } else {
            m.insert(location.to_string(), entry);
        }
        self.pending_rows.insert((product, location.to_string()));
    }

    pub(super) fn recompute_doc_all(&mut self, id: &str) {
        let Some(slot) = self.docs.get(id) else {
            return;
        };
        if let DocId::Ledger { location, .. } = &slot.id {
            // Every product with a key has a cell: the same entries as
            // `recompute_keys` over every key, without listing the keys.
            let location = location.clone();
            let mut entries: Vec<(u64, StockEntry)> =
                read_entries(&*slot.doc).into_iter().collect();
            entries.sort_unstable_by_key(|(p, _)| *p);
            for (p, entry) in entries {
                self.set_entry(p, &location, entry);
            }
            return;
        }
        let keys: BTreeSet<String> = slot.doc.keys(ROOT).collect();
        self.recompute_keys(id, &keys);
    }
}
