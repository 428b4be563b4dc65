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
    pub cells: BTreeMap<ActorKey, ActorCells>,
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
