//! Ids of one kind of record → the records documents that hold them, for
//! ids that collide (CONTRACT v2: ids are chain-wide; two nodes apart from
//! each other may still use one, and both operations stay in effect).
//!
//! Receipts, returns, client grants and adjustments use it ([`INDEXED`]):
//! their effects are in the ledger and need no index, but an id used by two
//! nodes must be listed in `/api/overdrafts`, and only an index of every id
//! tells a second use from a first. Sales have their own, denser index
//! (`saleindex.rs`), transfers, reservations and counts their views; these
//! kinds are far fewer than sales.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::layout::RecordKind;

/// The kinds of records whose ids are indexed here, with the name
/// `/api/overdrafts` gives them (`"record"`).
pub const INDEXED: [(RecordKind, &str); 4] = [
    (RecordKind::Receipt, "receipt"),
    (RecordKind::Return, "return"),
    (RecordKind::Grant, "grant"),
    (RecordKind::Adjustment, "adjustment"),
];

/// Whether a record of `kind` is indexed: a client's operation of an
/// [`INDEXED`] kind. Grants the engine makes (rebalancing, allocation) have
/// ids that name their node: never a collision.
pub fn indexed(kind: RecordKind, v: &serde_json::Value) -> bool {
    INDEXED.iter().any(|(k, _)| *k == kind)
        && !(kind == RecordKind::Grant
            && (v["rebalance"].as_bool() == Some(true) || v["allocation"].as_bool() == Some(true)))
}

/// id → records documents, in a few dozen bytes per id: the first document
/// as an index into a table of names, the others only for ids held by more
/// than one document (a collision, or a restored node that used an id of
/// its own again in another month's document).
#[derive(Default)]
pub struct RecordIds {
    names: Vec<String>,
    name_ix: HashMap<String, u32>,
    /// id → its first document's index in `names`.
    first: HashMap<Box<str>, u32>,
    /// id → every document holding it, for ids in more than one.
    shared: BTreeMap<String, BTreeSet<u32>>,
}

impl RecordIds {
    fn intern(&mut self, doc: &str) -> u32 {
        if let Some(i) = self.name_ix.get(doc) {
            return *i;
        }
        let i = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.names.push(doc.to_string());
        self.name_ix.insert(doc.to_string(), i);
        i
    }

    /// Notes that `doc` holds a record of `id` (again: no change).
    pub fn add(&mut self, id: &str, doc: &str) {
        let d = self.intern(doc);
        match self.first.get(id).copied() {
            None => {
                self.first.insert(id.into(), d);
            }
            Some(f) if f == d => {}
            Some(f) => {
                self.shared
                    .entry(id.to_string())
                    .or_default()
                    .extend([f, d]);
            }
        }
    }

    /// Ids held by more than one document, with those documents (in the
    /// order of the ids).
    pub fn shared(&self) -> impl Iterator<Item = (&str, Vec<&str>)> {
        self.shared.iter().map(|(id, ds)| {
            let docs = ds
                .iter()
                .map(|d| self.names[*d as usize].as_str())
                .collect();
            (id.as_str(), docs)
        })
    }

    /// Documents holding `id`.
    pub fn docs(&self, id: &str) -> Vec<&str> {
        match self.shared.get(id) {
            Some(ds) => ds
                .iter()
                .map(|d| self.names[*d as usize].as_str())
                .collect(),
            None => self
                .first
                .get(id)
                .map(|d| vec![self.names[*d as usize].as_str()])
                .unwrap_or_default(),
        }
    }

    /// Ids noted.
    pub fn len(&self) -> usize {
        self.first.len()
    }

    pub fn is_empty(&self) -> bool {
        self.first.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_in_two_documents_is_shared_once_per_document() {
        let mut ids = RecordIds::default();
        ids.add("r-1", "rec/a/2026-12/0");
        ids.add("r-1", "rec/a/2026-12/0");
        ids.add("r-2", "rec/a/2026-12/0");
        assert_eq!(ids.shared().count(), 0, "one document: no collision");
        ids.add("r-1", "rec/b/2026-12/0");
        ids.add("r-1", "rec/b/2026-12/0");
        let shared: Vec<(&str, Vec<&str>)> = ids.shared().collect();
        assert_eq!(
            shared,
            vec![("r-1", vec!["rec/a/2026-12/0", "rec/b/2026-12/0"])]
        );
        assert_eq!(ids.docs("r-2"), vec!["rec/a/2026-12/0"]);
        assert!(ids.docs("r-3").is_empty());
        assert_eq!(ids.len(), 2);
    }
}
