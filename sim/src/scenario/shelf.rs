//! Stock as a scenario judges it: on the shelf, shown in stock, refused
//! although on hand.

use storemesh_protocol::ops::{Op, OpError};

use super::OFFER_FRESH_MS;
use crate::world::World;

impl World {
    /// Units of `p` physically at `loc`: the union of every running node's
    /// view, i.e. every sale made anywhere so far.
    pub fn shelf(&self, p: u64, loc: &str) -> i64 {
        let mut all = storemesh_protocol::ledger::StockEntry::default();
        for n in &self.nodes {
            if let Some(e) = n.life.as_ref().and_then(|l| l.engine().views.entry(p, loc)) {
                all.merge(e);
            }
        }
        all.on_hand()
    }

    /// Units of `p` node `i` (a web shop) offers, as it would read them from
    /// its own `GET /api/inventory`: at a location it heard from within
    /// [`OFFER_FRESH_MS`] (the read's `last_heard_s`), the units on hand in
    /// its view (what it lacks rights for it asks a grant for); at a location
    /// behind a longer silence, only the units it holds the rights to there
    /// (the row's `available`): escrow keeps those on that shelf for it, so
    /// it can sell them while the store is cut off — what an online
    /// allocation is for — while the rest of that stale view it cannot
    /// confirm and does not offer.
    pub fn shown_in_stock(&self, i: usize, p: u64) -> i64 {
        let Some(engine) = self.nodes[i].life.as_ref().map(|l| l.engine()) else {
            return 0;
        };
        let heard = engine.last_heard_by_location();
        let now = self.clock(i);
        self.nodes
            .iter()
            .filter(|n| !n.is_clone)
            .map(|n| {
                let loc = &n.cfg.location;
                let on_hand = self.peek_on_hand(i, p, loc).max(0);
                let fresh = heard
                    .get(loc)
                    .is_some_and(|t| *t == u64::MAX || now.saturating_sub(*t) <= OFFER_FRESH_MS);
                if fresh {
                    on_hand
                } else {
                    on_hand.min(engine.rights(p, loc).max(0))
                }
            })
            .sum()
    }

    /// Whether a sale refused for lack of rights could have been sold: for
    /// every short line, a location whose own node this node can reach (its
    /// own location included) had the units on hand — on hand as the union of
    /// every running node's view, i.e. every sale made anywhere so far. The
    /// sale's own location when it named one; any location when it did not (a
    /// web order ships from wherever the goods are). A refusal that is not
    /// counted here is a real stock-out (or stock cut off by a partition),
    /// which no movement of rights could have avoided.
    /// With `reachable_only == false`: whether the units were on hand at all
    /// (reachable or behind a partition) — the refusals a central server
    /// that saw every shelf would not have made, i.e. the whole price of escrow.
    pub fn refused_with_stock(&self, rid: usize, e: &OpError, reachable_only: bool) -> bool {
        let OpError::InsufficientStock(short) = e else {
            return false;
        };
        let r = &self.clients.reqs[rid];
        let named = match &r.op {
            Op::Sale(s) => s.location.is_some(),
            _ => true,
        };
        let i = r.node;
        let reachable = |loc: &str| {
            !reachable_only
                || self
                    .nodes
                    .iter()
                    .position(|n| n.cfg.location == loc && !n.is_clone)
                    .is_some_and(|o| {
                        o == i || (!self.net.is_blocked(i, o) && !self.net.is_blocked(o, i))
                    })
        };
        let on_hand = |p: u64, loc: &str| self.shelf(p, loc);
        !short.is_empty()
            && short.iter().all(|l| {
                let q = l.requested as i64;
                if named {
                    reachable(&l.location) && on_hand(l.product_id, &l.location) >= q
                } else {
                    self.nodes.iter().any(|n| {
                        !n.is_clone
                            && reachable(&n.cfg.location)
                            && on_hand(l.product_id, &n.cfg.location) >= q
                    })
                }
            })
    }
}
