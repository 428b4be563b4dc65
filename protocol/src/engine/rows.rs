//! Stock row queries: rights per node and location, totals, the row view,
//! a location's policy.

use super::{Engine, Policy};
use crate::ids::NodeTag;
use crate::ledger::StockEntry;
use crate::views::StockRow;

impl Engine {
    pub(crate) fn touch_row(&mut self, product: u64, location: &str) {
        if location == self.cfg.location {
            self.alloc_dirty.insert(product);
        }
        self.pending_rows.insert((product, location.to_string()));
    }

    /// The rights this node holds on (product, location), including the pending batch.
    pub fn rights(&self, product: u64, location: &str) -> i64 {
        // Rights come from peers' cells (clamped to i64): never overflow.
        self.rights_raw(product, location)
            .saturating_sub(self.reserved_by_me(product, location))
    }

    /// The ledger's rights of this node, including units held for reservations.
    pub fn rights_raw(&self, product: u64, location: &str) -> i64 {
        self.views
            .entry(product, location)
            .map(|e| self.node_rights(e, self.tag))
            .unwrap_or(0)
    }

    /// Rights of `node` in an entry, with retired nodes' rights passed to their successors.
    pub fn node_rights(&self, e: &StockEntry, node: NodeTag) -> i64 {
        if self.views.retired.is_empty() {
            return e.rights(node);
        }
        e.rights_in(node, &|t| self.views.resolve(t))
    }

    /// `stock_level` (on hand over all locations) and `available` — what one
    /// sale at this node would accept right now: a sale is taken from one
    /// location, so the most this node can sell at any single location.
    pub fn totals(&self, product: u64, location: Option<&str>) -> Option<(i64, i64)> {
        let m = self.views.stock.get(&product)?;
        let mut on_hand = 0i64;
        let mut avail = 0i64;
        for (l, e) in m {
            if location.is_some_and(|x| x != l) {
                continue;
            }
            on_hand = on_hand.saturating_add(e.on_hand());
            avail = avail.max(
                self.node_rights(e, self.tag)
                    .saturating_sub(self.reserved_by_me(product, l)),
            );
        }
        Some((on_hand, avail))
    }

    pub fn row(&self, product: u64, location: &str) -> StockRow {
        let on_hand = self
            .views
            .entry(product, location)
            .map(|e| e.on_hand())
            .unwrap_or(0);
        StockRow {
            on_hand,
            available: self.rights(product, location).max(0),
            incoming: self.incoming(product, location),
            reserved: self.reserved_at(product, location),
            seq: 0,
        }
    }

    pub(crate) fn policy_of(&self, location: &str) -> Policy {
        if location == self.cfg.location {
            return self.cfg.policy;
        }
        Policy::Strict
    }
}
