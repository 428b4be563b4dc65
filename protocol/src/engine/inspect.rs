//! Read-only inspection of the engine's documents for tests, tools and
//! checkers: document lists and bytes, stock recomputed from the
//! documents, owned-cell conflicts.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::{Automerge, ReadDoc, ROOT};

use super::{hex_heads, Engine};
use crate::layout::{self, DocId};
use crate::ledger::StockEntry;
use crate::views::read_entry;

impl Engine {
    /// Every document id with its heads (hex).
    pub fn documents(&self) -> Vec<(String, Vec<String>)> {
        self.docs
            .iter()
            .map(|(id, s)| (id.clone(), hex_heads(&s.doc.heads())))
            .collect()
    }

    /// The whole document as standard Automerge bytes.
    pub fn document_bytes(&self, id: &str) -> Option<Vec<u8>> {
        self.docs.get(id).map(|s| s.doc.save())
    }

    /// Read access to a document (tests and the simulator's checkers).
    pub fn doc(&self, id: &str) -> Option<&Automerge> {
        self.docs.get(id).map(|s| &*s.doc)
    }

    /// Recomputes every stock entry from the documents (for checkers).
    pub fn recompute_stock(&self) -> HashMap<u64, BTreeMap<String, StockEntry>> {
        let mut out: HashMap<u64, BTreeMap<String, StockEntry>> = HashMap::new();
        for slot in self.docs.values() {
            if let DocId::Ledger { location, .. } = &slot.id {
                let products: BTreeSet<u64> = slot
                    .doc
                    .keys(ROOT)
                    .filter_map(|k| layout::parse_ledger_any(&k).ok())
                    .map(|(p, _, _, _)| p)
                    .collect();
                for p in products {
                    let e = read_entry(&*slot.doc, p, None);
                    if !e.cells.is_empty() {
                        out.entry(p).or_default().insert(location.clone(), e);
                    }
                }
            }
        }
        out
    }

    /// Owned keys that hold more than one value (a fork of one actor, which the
    /// per-incarnation layout makes impossible unless an actor id was reused).
    pub fn owned_conflicts(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (id, slot) in &self.docs {
            if !matches!(slot.id, DocId::Ledger { .. }) {
                continue;
            }
            for item in slot.doc.map_range(ROOT, ..) {
                // Carried cells have many writers by design (the max holds).
                if item.conflict && !item.key.starts_with(layout::LEDGER_CARRIED_PREFIX) {
                    out.push((id.clone(), item.key.to_string()));
                }
            }
        }
        out
    }
}
