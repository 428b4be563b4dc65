//! The stock ledger algebra (DESIGN §2): per-writer cumulative cells and the
//! quantities derived from them. Pure values, no documents.
//!
//! Cells are keyed by [`ActorKey`] (node tag + per-process incarnation), and the
//! derived quantities are summed per node ([`NodeTag`]). Merging two views of a
//! cell takes the maximum: a cell only ever grows and has exactly one writer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{ActorKey, NodeTag};

/// The cells one actor wrote at one (product, location).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorCells {
    /// Units this actor added to the location.
    pub received: u64,
    /// Units this actor took out of the location.
    pub removed: u64,
    /// Sell-rights this actor handed to other nodes (cumulative per receiver).
    pub granted: BTreeMap<NodeTag, u64>,
    /// Units this actor reserved for a node (cumulative per holder): they
    /// stay in that node's rights but it may not sell them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub held: BTreeMap<NodeTag, u64>,
    /// Units of reservations this actor closed, released from its node's holds.
    #[serde(default)]
    pub released: u64,
}

impl ActorCells {
    /// Cell-wise maximum: the join of two observations of the same writer.
    pub fn merge(&mut self, other: &ActorCells) {
        self.received = self.received.max(other.received);
        self.removed = self.removed.max(other.removed);
        for (to, q) in &other.granted {
            let e = self.granted.entry(*to).or_default();
            *e = (*e).max(*q);
        }
        for (to, q) in &other.held {
            let e = self.held.entry(*to).or_default();
            *e = (*e).max(*q);
        }
        self.released = self.released.max(other.released);
    }
    fn granted_total(&self) -> i128 {
        self.granted.values().map(|q| i128::from(*q)).sum()
    }
}

/// Every writer's cells at one (product, location).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockEntry {
    pub cells: Cells,
}

/// The cells of one (product, location) by writer: a vector sorted by actor,
/// with exactly the capacity its entries need.
///
/// Nearly every pair has one writer (its location's node). A
/// `BTreeMap<ActorKey, ActorCells>` allocates a whole B-tree leaf of 11
/// slots (~920 bytes) for that one entry; a node holding 100,000 products ×
/// 20 locations kept ~1.8 GiB of such leaves (BENCHMARKS row 5). Here one
/// writer costs one 88-byte allocation. Lookups are a binary search over a
/// handful of actors. Serialized as a map, as the `BTreeMap` was.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cells(Vec<(ActorKey, ActorCells)>);

/// A place in [`Cells`] for one actor, from [`Cells::entry`].
pub struct CellsEntry<'a> {
    cells: &'a mut Cells,
    actor: ActorKey,
}

impl<'a> CellsEntry<'a> {
    /// The actor's cells, inserted empty if it had none.
    pub fn or_default(self) -> &'a mut ActorCells {
        let v = &mut self.cells.0;
        let i = match v.binary_search_by(|(a, _)| a.cmp(&self.actor)) {
            Ok(i) => i,
            Err(i) => {
                // Exact growth: most entries never get a second writer.
                v.reserve_exact(1);
                v.insert(i, (self.actor, ActorCells::default()));
                i
            }
        };
        &mut v[i].1
    }
}

impl Cells {
    fn find(&self, actor: &ActorKey) -> Result<usize, usize> {
        self.0.binary_search_by(|(a, _)| a.cmp(actor))
    }
    pub fn get(&self, actor: &ActorKey) -> Option<&ActorCells> {
        self.find(actor).ok().map(|i| &self.0[i].1)
    }
    pub fn get_mut(&mut self, actor: &ActorKey) -> Option<&mut ActorCells> {
        let i = self.find(actor).ok()?;
        Some(&mut self.0[i].1)
    }
    pub fn contains_key(&self, actor: &ActorKey) -> bool {
        self.find(actor).is_ok()
    }
    pub fn entry(&mut self, actor: ActorKey) -> CellsEntry<'_> {
        CellsEntry { cells: self, actor }
    }
    /// Sets an actor's cells; returns the ones they replaced.
    pub fn insert(&mut self, actor: ActorKey, cells: ActorCells) -> Option<ActorCells> {
        match self.find(&actor) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, cells)),
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, (actor, cells));
                None
            }
        }
    }
    pub fn remove(&mut self, actor: &ActorKey) -> Option<ActorCells> {
        let i = self.find(actor).ok()?;
        let (_, c) = self.0.remove(i);
        self.0.shrink_to_fit();
        Some(c)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Actors in order.
    pub fn keys(&self) -> impl Iterator<Item = &ActorKey> + '_ {
        self.0.iter().map(|(a, _)| a)
    }
    pub fn values(&self) -> impl Iterator<Item = &ActorCells> + '_ {
        self.0.iter().map(|(_, c)| c)
    }
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut ActorCells> + '_ {
        self.0.iter_mut().map(|(_, c)| c)
    }
    /// (actor, cells) in actor order.
    pub fn iter(&self) -> CellsIter<'_> {
        self.0.iter().map(|(a, c)| (a, c))
    }
}

/// Borrowing iterator of [`Cells`], in actor order.
pub type CellsIter<'a> = std::iter::Map<
    std::slice::Iter<'a, (ActorKey, ActorCells)>,
    fn(&'a (ActorKey, ActorCells)) -> (&'a ActorKey, &'a ActorCells),
>;

impl<'a> IntoIterator for &'a Cells {
    type Item = (&'a ActorKey, &'a ActorCells);
    type IntoIter = CellsIter<'a>;
    fn into_iter(self) -> CellsIter<'a> {
        self.iter()
    }
}

impl IntoIterator for Cells {
    type Item = (ActorKey, ActorCells);
    type IntoIter = std::vec::IntoIter<(ActorKey, ActorCells)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl FromIterator<(ActorKey, ActorCells)> for Cells {
    fn from_iter<I: IntoIterator<Item = (ActorKey, ActorCells)>>(it: I) -> Cells {
        // Through a map: later duplicates win, as in a `BTreeMap`.
        let m: BTreeMap<ActorKey, ActorCells> = it.into_iter().collect();
        Cells(m.into_iter().collect())
    }
}

impl Serialize for Cells {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Cells {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cells, D::Error> {
        let m = BTreeMap::<ActorKey, ActorCells>::deserialize(d)?;
        Ok(Cells(m.into_iter().collect()))
    }
}

impl StockEntry {
    /// `Σ received − Σ removed`. May be negative only after a count deficit or a fork.
    pub fn on_hand(&self) -> i64 {
        let v: i128 = self
            .cells
            .values()
            .map(|c| i128::from(c.received) - i128::from(c.removed))
            .sum();
        clamp_i64(v)
    }

    /// `received[V] − removed[V] + Σ granted[→V] − Σ granted[V→]`, summed over V's incarnations.
    pub fn rights(&self, node: NodeTag) -> i64 {
        let mut v: i128 = 0;
        for (actor, c) in &self.cells {
            if actor.tag() == node {
                v += i128::from(c.received) - i128::from(c.removed) - c.granted_total();
            }
            if let Some(q) = c.granted.get(&node) {
                v += i128::from(*q);
            }
        }
        clamp_i64(v)
    }

    /// Rights of `node` when retired nodes' rights pass to their successors:
    /// `resolve` maps a node to the node that holds its rights now.
    pub fn rights_in(&self, node: NodeTag, resolve: &dyn Fn(NodeTag) -> NodeTag) -> i64 {
        let mut v: i128 = 0;
        for (actor, c) in &self.cells {
            if resolve(actor.tag()) == node {
                v += i128::from(c.received) - i128::from(c.removed) - c.granted_total();
            }
            for (to, q) in &c.granted {
                if resolve(*to) == node {
                    v += i128::from(*q);
                }
            }
        }
        clamp_i64(v)
    }

    /// Units held for open reservations of `node` (what it may not sell of
    /// its rights): `Σ held[→V] − Σ released[V]`, with retired nodes' holds
    /// passed to their successors like their rights. Never below 0 (two
    /// branches of a forked node releasing one reservation twice must not
    /// free another's units as a negative hold).
    pub fn held_in(&self, node: NodeTag, resolve: &dyn Fn(NodeTag) -> NodeTag) -> i64 {
        let mut v: i128 = 0;
        for (actor, c) in &self.cells {
            if resolve(actor.tag()) == node {
                v -= i128::from(c.released);
            }
            for (to, q) in &c.held {
                if resolve(*to) == node {
                    v += i128::from(*q);
                }
            }
        }
        clamp_i64(v.max(0))
    }

    /// Units held for open reservations of every node, as [`held_in`](Self::held_in).
    pub fn held_total(&self, resolve: &dyn Fn(NodeTag) -> NodeTag) -> i64 {
        let mut nodes: Vec<NodeTag> = Vec::new();
        for c in self.cells.values() {
            nodes.extend(c.held.keys().map(|t| resolve(*t)));
        }
        nodes.sort();
        nodes.dedup();
        nodes
            .into_iter()
            .map(|n| self.held_in(n, resolve))
            .fold(0i64, i64::saturating_add)
    }

    /// Rights of every node that appears in the entry.
    pub fn rights_by_node(&self) -> BTreeMap<NodeTag, i64> {
        let mut nodes: Vec<NodeTag> = self.cells.keys().map(|a| a.tag()).collect();
        for c in self.cells.values() {
            nodes.extend(c.granted.keys().copied());
        }
        nodes.sort();
        nodes.dedup();
        nodes.into_iter().map(|n| (n, self.rights(n))).collect()
    }

    pub fn actor(&self, actor: ActorKey) -> ActorCells {
        self.cells.get(&actor).cloned().unwrap_or_default()
    }

    /// Joins another observation of the same (product, location).
    pub fn merge(&mut self, other: &StockEntry) {
        for (a, c) in &other.cells {
            self.cells.entry(*a).or_default().merge(c);
        }
    }
}

fn clamp_i64(v: i128) -> i64 {
    v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn actor(n: u8, inc: u8) -> ActorKey {
        ActorKey::new(NodeTag([n; 6]), [inc; 4])
    }

    fn arb_entry() -> impl Strategy<Value = StockEntry> {
        prop::collection::vec(
            (
                0u8..4,
                0u8..2,
                0u64..100,
                0u64..100,
                prop::collection::vec((0u8..4, 0u64..50), 0..3),
            ),
            0..6,
        )
        .prop_map(|cells| {
            let mut e = StockEntry::default();
            for (n, inc, r, d, gs) in cells {
                let c = e.cells.entry(actor(n, inc)).or_default();
                c.received = c.received.max(r);
                c.removed = c.removed.max(d);
                for (to, q) in gs {
                    c.granted.insert(NodeTag([to; 6]), q);
                }
            }
            e
        })
    }

    #[test]
    fn rights_sum_to_on_hand() {
        let mut e = StockEntry::default();
        let a = actor(1, 0);
        let b = actor(2, 0);
        e.cells.entry(a).or_default().received = 10;
        e.cells.entry(a).or_default().granted.insert(b.tag(), 4);
        e.cells.entry(b).or_default().removed = 3;
        e.cells.entry(a).or_default().removed = 2;
        assert_eq!(e.on_hand(), 5);
        assert_eq!(e.rights(a.tag()), 4);
        assert_eq!(e.rights(b.tag()), 1);
        // A second incarnation of node 1 adds to the same node's rights.
        e.cells.entry(actor(1, 9)).or_default().removed = 4;
        assert_eq!(e.rights(a.tag()), 0);
        assert_eq!(e.on_hand(), 1);
    }

    #[test]
    fn cells_hold_one_slot_per_writer_and_serialize_as_the_map_did() {
        let mut e = StockEntry::default();
        e.cells.entry(actor(2, 0)).or_default().received = 5;
        // One writer: one slot, not a B-tree leaf of 11 (BENCHMARKS row 5).
        assert_eq!(e.cells.0.capacity(), 1);
        e.cells.entry(actor(1, 0)).or_default().removed = 2;
        e.cells.entry(actor(2, 0)).or_default().removed = 1;
        assert_eq!(e.cells.0.capacity(), 2);
        let order: Vec<ActorKey> = e.cells.keys().copied().collect();
        assert_eq!(order, vec![actor(1, 0), actor(2, 0)]);
        assert_eq!(e.cells.get(&actor(2, 0)).map(|c| c.removed), Some(1));
        let map: BTreeMap<ActorKey, ActorCells> =
            e.cells.iter().map(|(a, c)| (*a, c.clone())).collect();
        let json = serde_json::to_string(&e.cells).expect("serialize");
        assert_eq!(json, serde_json::to_string(&map).expect("serialize map"));
        let back: Cells = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, e.cells);
        assert_eq!(e.cells.remove(&actor(1, 0)).map(|c| c.removed), Some(2));
        assert_eq!((e.cells.len(), e.cells.0.capacity()), (1, 1));
        assert!(e.cells.remove(&actor(1, 0)).is_none());
    }

    proptest! {
        #[test]
        fn merge_is_a_semilattice(x in arb_entry(), y in arb_entry(), z in arb_entry()) {
            let mut xy = x.clone(); xy.merge(&y);
            let mut yx = y.clone(); yx.merge(&x);
            prop_assert_eq!(&xy, &yx);
            let mut xy_z = xy.clone(); xy_z.merge(&z);
            let mut yz = y.clone(); yz.merge(&z);
            let mut x_yz = x.clone(); x_yz.merge(&yz);
            prop_assert_eq!(&xy_z, &x_yz);
            let mut xx = x.clone(); xx.merge(&x);
            prop_assert_eq!(&xx, &x);
        }

        #[test]
        fn sum_of_rights_is_on_hand(x in arb_entry()) {
            let total: i64 = x.rights_by_node().values().sum();
            prop_assert_eq!(total, x.on_hand());
        }
    }
}
