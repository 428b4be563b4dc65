//! The engine's side of rebalancing (`crate::rebalance`): submitting an
//! operation that may park for rights, asking peers for them, answering and
//! forwarding their requests, and the standing allocation rules.

use std::collections::BTreeSet;

use super::Engine;
use crate::ids::{NodeId, NodeTag};
use crate::layout::{LedgerField, RecordKind};
use crate::ops::{IdemRecord, Op, OpError, OpReply, ShortLine};
use crate::rebalance::{
    AllocationRule, Parked, RightsRequest, Submit, PARKED_MAX, REQUEST_HOPS_MAX,
    REQUEST_INTERVAL_MS, SEEN_REQUESTS_MAX,
};

impl Engine {
    /// Executes an operation; a strict sale that lacks rights while peers are
    /// connected is parked (up to `deadline_ms`) and rights are requested.
    pub fn submit(
        &mut self,
        op: Op,
        now_ms: u64,
        deadline_ms: u64,
        idem: &dyn Fn(&str) -> Option<IdemRecord>,
    ) -> Submit {
        let result = self.execute(op.clone(), now_ms, idem);
        let short = match &result {
            Err(OpError::InsufficientStock(short)) if !short.is_empty() => short.clone(),
            _ => return Submit::Done(result),
        };
        let parkable = matches!(&op, Op::Sale(s) if !s.override_rights);
        // A line that no other node holds rights for (in this node's view)
        // cannot be helped by a grant: refuse at once instead of waiting.
        let helpable = || {
            short
                .iter()
                .all(|l| !self.rights_holders(l.product_id, &l.location).is_empty())
        };
        if !parkable
            || deadline_ms == 0
            || self.sessions.is_empty()
            || !helpable()
            || self.rebalancer.parked.len() >= PARKED_MAX
        {
            return Submit::Done(result);
        }
        self.request_rights(&short, now_ms);
        let r = &mut self.rebalancer;
        r.next_ticket += 1;
        let ticket = r.next_ticket;
        r.parked.push(Parked {
            ticket,
            op,
            parked_at_ms: now_ms,
            deadline_ms: now_ms.saturating_add(deadline_ms),
        });
        Submit::Parked(ticket)
    }

    /// Retries parked operations; returns the ones that are decided (sold, or
    /// refused because the deadline passed or the refusal is not about rights).
    pub fn poll_parked(
        &mut self,
        now_ms: u64,
        idem: &dyn Fn(&str) -> Option<IdemRecord>,
    ) -> Vec<(u64, Result<OpReply, OpError>)> {
        if self.rebalancer.parked.is_empty() {
            return Vec::new();
        }
        let parked = std::mem::take(&mut self.rebalancer.parked);
        let mut done = Vec::new();
        for p in parked {
            let r = self.execute(p.op.clone(), now_ms, idem);
            match r {
                // Waits only while the clock moves forward within the deadline:
                // after a backward step of the wall clock it would wait that long.
                Err(OpError::InsufficientStock(_))
                    if (p.parked_at_ms..p.deadline_ms).contains(&now_ms)
                        && !self.sessions.is_empty() =>
                {
                    self.rebalancer.parked.push(p);
                }
                other => done.push((p.ticket, other)),
            }
        }
        done
    }

    /// Rights on (product, location) that this node holds plus those its
    /// connected peers hold in its view: what a rights request can gather from
    /// direct peers within the deadline. Holders behind a partition (a store
    /// that is cut off keeps the rights to its own shelf) do not count.
    pub fn reachable_rights(&self, product: u64, location: &str) -> i64 {
        let Some(e) = self.views.entry(product, location) else {
            return 0;
        };
        let mut v = self.rights(product, location).max(0);
        for peer in self.sessions.keys() {
            let t = peer.tag();
            if self.views.resolve(t) == t {
                v = v.saturating_add(self.node_rights(e, t).max(0));
            }
        }
        v
    }

    /// For a sale that named no location and that no location's own rights
    /// cover: the location where rights can be gathered from connected peers
    /// (the own location first, then the one with the most reachable rights).
    /// A web order then asks a reachable store for a grant, instead of
    /// waiting for one from a store that is cut off and still shows stock.
    pub(crate) fn gatherable_location(
        &self,
        lines: &std::collections::BTreeMap<u64, u64>,
    ) -> Option<String> {
        if self.sessions.is_empty() {
            return None;
        }
        let fits = |loc: &str| {
            lines
                .iter()
                .all(|(p, q)| self.reachable_rights(*p, loc) >= *q as i64)
        };
        let own = &self.cfg.location;
        if fits(own) {
            return Some(own.clone());
        }
        let (first, _) = lines.iter().next()?;
        let m = self.views.stock.get(first)?;
        let mut cands: Vec<(&String, i64)> = m
            .keys()
            .filter(|l| fits(l))
            .map(|l| (l, self.reachable_rights(*first, l)))
            .collect();
        cands.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        cands.first().map(|(l, _)| (*l).clone())
    }

    /// Client keys of the parked operations (their idempotency records are
    /// read before `poll_parked`).
    pub fn parked_keys(&self) -> Vec<String> {
        self.rebalancer
            .parked
            .iter()
            .filter_map(|p| p.op.client_key())
            .collect()
    }

    /// The earliest deadline of a parked operation (the shell wakes up then).
    pub fn next_deadline(&self) -> Option<u64> {
        self.rebalancer.parked.iter().map(|p| p.deadline_ms).min()
    }

    pub fn rebalance_stats(&self) -> (u64, u64) {
        (self.rebalancer.requests_sent, self.rebalancer.grants_given)
    }

    /// Nodes other than this one that hold rights on (product, location) in
    /// this node's view (retired nodes resolved to their successors).
    pub(crate) fn rights_holders(&self, product: u64, location: &str) -> BTreeSet<NodeTag> {
        let Some(e) = self.views.entry(product, location) else {
            return BTreeSet::new();
        };
        let mut tags = BTreeSet::new();
        for (actor, cells) in &e.cells {
            tags.insert(self.views.resolve(actor.tag()));
            tags.extend(cells.granted.keys().map(|t| self.views.resolve(*t)));
        }
        tags.remove(&self.tag);
        tags.retain(|t| self.node_rights(e, *t) > 0);
        tags
    }

    /// Where a rights request goes: straight to the connected peers that hold
    /// rights, if every holder is one; otherwise (a holder further away, or
    /// none known here) to every connected peer but `except`, to be forwarded.
    fn request_targets(&self, holders: &BTreeSet<NodeTag>, except: &[NodeId]) -> Vec<NodeId> {
        let peers: Vec<NodeId> = self
            .sessions
            .keys()
            .filter(|p| !except.contains(p))
            .copied()
            .collect();
        let direct: Vec<NodeId> = peers
            .iter()
            .filter(|p| holders.contains(&p.tag()))
            .copied()
            .collect();
        let reachable_directly = !holders.is_empty()
            && holders
                .iter()
                .all(|h| self.sessions.keys().any(|p| p.tag() == *h));
        if reachable_directly {
            direct
        } else {
            peers
        }
    }

    pub(crate) fn request_rights(&mut self, short: &[ShortLine], now_ms: u64) {
        for s in short {
            // A request carries at most one line's quantity (what a peer
            // accepts): a larger shortfall (two lines of 6×10^8 of one
            // product, a reclaim after a large overdraft) asks for that much
            // now and for the rest at the next request.
            let need = s
                .requested
                .saturating_sub(s.available.max(0) as u64)
                .min(crate::ids::QUANTITY_MAX);
            if need == 0 {
                continue;
            }
            let key = (s.product_id, s.location.clone());
            if self
                .rebalancer
                .last_request
                .get(&key)
                .is_some_and(|t| now_ms < t + REQUEST_INTERVAL_MS)
            {
                continue;
            }
            if self.rebalancer.last_request.len() > SEEN_REQUESTS_MAX {
                self.rebalancer.last_request.clear();
            }
            self.rebalancer.last_request.insert(key, now_ms);
            self.rebalancer.next_req_id += 1;
            let req = RightsRequest {
                req_id: self.rebalancer.next_req_id,
                origin: self.cfg.node_id.hex(),
                product_id: s.product_id,
                location: s.location.clone(),
                quantity: need,
                hops_left: REQUEST_HOPS_MAX,
            };
            self.remember(&req);
            let holders = self.rights_holders(req.product_id, &req.location);
            if holders.is_empty() {
                continue;
            }
            for p in self.request_targets(&holders, &[]) {
                self.send_rights_request(p, &req);
            }
            self.rebalancer.requests_sent += 1;
        }
    }

    fn remember(&mut self, req: &RightsRequest) -> bool {
        let key = (req.origin.clone(), req.req_id);
        if !self.rebalancer.seen.insert(key.clone()) {
            return false;
        }
        self.rebalancer.seen_order.push_back(key);
        while self.rebalancer.seen_order.len() > SEEN_REQUESTS_MAX {
            if let Some(old) = self.rebalancer.seen_order.pop_front() {
                self.rebalancer.seen.remove(&old);
            }
        }
        true
    }

    /// A peer asks for rights: grant from our own rights, or pass it on.
    pub(crate) fn on_rights_request(
        &mut self,
        from: NodeId,
        req: RightsRequest,
        now_ms: u64,
    ) -> Result<(), String> {
        crate::ids::validate_name("location", &req.location)?;
        crate::ids::validate_product_id("product_id", req.product_id)?;
        // Nodes before the clamp above sent any size: a request over the
        // quantity limit is answered up to the limit, not a violation.
        if req.quantity == 0 {
            return Ok(());
        }
        let req = RightsRequest {
            quantity: req.quantity.min(crate::ids::QUANTITY_MAX),
            ..req
        };
        let origin = NodeId::parse(&req.origin)?;
        if origin == self.cfg.node_id {
            return Ok(());
        }
        // A request fresh from its origin comes over the origin's own link;
        // a forwarded one names a member this node knows. Otherwise a peer
        // could drain any node's rights to a made-up node.
        let first_hop = req.hops_left >= REQUEST_HOPS_MAX;
        let member =
            self.views.bound.has_name(origin.tag()) || self.views.nodes.contains_key(&origin.tag());
        if (first_hop && origin != from)
            || !member
            || self.views.retired.contains_key(&origin.tag())
        {
            self.stats.rejected_messages += 1;
            *self
                .stats
                .rejected_by_reason
                .entry(crate::sync::REJECT_UNAUTHORIZED)
                .or_default() += 1;
            tracing::warn!(peer = %from.hex(), origin = %req.origin, "refused a rights request whose origin is not its sender or no member");
            return Ok(());
        }
        if !self.remember(&req) {
            return Ok(());
        }
        let have = self.rights(req.product_id, &req.location);
        if have > 0 {
            let q = req.quantity.min(have as u64);
            if let Err(e) = self.grant_for_request(&req, origin.tag(), q, now_ms) {
                tracing::warn!(error = ?e, "could not answer a rights request");
            }
            return Ok(());
        }
        if req.hops_left > 1 {
            let fwd = RightsRequest {
                hops_left: req.hops_left - 1,
                ..req
            };
            let holders = self.rights_holders(fwd.product_id, &fwd.location);
            for p in self.request_targets(&holders, &[from, origin]) {
                self.send_rights_request(p, &fwd);
            }
        }
        Ok(())
    }

    fn grant_for_request(
        &mut self,
        req: &RightsRequest,
        to: NodeTag,
        q: u64,
        now_ms: u64,
    ) -> Result<(), OpError> {
        let grant_id = format!("rb.{}.{}.{}", &req.origin[..12], req.req_id, self.tag.hex());
        let key = format!("grt/{grant_id}");
        // The same request may arrive over two paths; the grant id makes it
        // idempotent — in this batch, and in the records this node already wrote
        // (the in-memory `seen` set does not survive a restart).
        if self.pending_idem_contains(&key) || self.own_record_exists(&key) {
            return Ok(());
        }
        self.bump(req.product_id, &req.location, LedgerField::Granted(to), q)?;
        // Invariant (DESIGN §5.3): a grant answering a request gives at most
        // the rights this node holds.
        debug_assert!(
            self.rights(req.product_id, &req.location) >= 0,
            "invariant no-oversell: grant {grant_id} left negative rights"
        );
        let to_name = self.views.name_of(to);
        let record = serde_json::json!({"grant_id": grant_id, "node": self.cfg.name, "location": req.location, "product_id": req.product_id, "to": to_name, "to_tag": to.hex(), "quantity": q, "rebalance": true, "at_ms": now_ms});
        self.write_record(RecordKind::Grant, &grant_id, record, now_ms);
        self.note_idem(key);
        self.rebalancer.grants_given += 1;
        tracing::debug!(product = req.product_id, location = %req.location, quantity = q, "granted rights on request");
        Ok(())
    }

    /// Whether one of this node's records documents holds grant record `key`
    /// (an index kept by `note_record`: scanning the parts would load every
    /// cold one).
    fn own_record_exists(&self, key: &str) -> bool {
        self.views.own_grants.contains(key)
    }

    fn send_rights_request(&mut self, peer: NodeId, req: &RightsRequest) {
        self.send_msg(peer, &crate::sync::Msg::Rights(req.clone()));
    }
}

impl Engine {
    /// An overdraft or deficit at (product, location): ask peers that hold
    /// rights there to hand them back, so the books balance again.
    pub(crate) fn reclaim(&mut self, product: u64, location: &str, quantity: u64, now_ms: u64) {
        if quantity == 0 || self.sessions.is_empty() {
            return;
        }
        let short = ShortLine {
            product_id: product,
            location: location.to_string(),
            requested: quantity,
            available: 0,
        };
        self.request_rights(&[short], now_ms);
    }

    /// One pass of the allocation controller over the products of the own
    /// location that changed since the last pass. Hysteresis: a node's
    /// allocation is topped up to its target only once it has fallen to half
    /// of it, so a trickle of sales does not cause a grant per sale; and
    /// allocations are never taken back, so nothing ping-pongs.
    pub fn allocate(&mut self, rules: &[AllocationRule], now_ms: u64) -> u64 {
        if rules.is_empty() {
            self.alloc_dirty.clear();
            return 0;
        }
        let own = self.cfg.location.clone();
        let products: Vec<u64> = std::mem::take(&mut self.alloc_dirty).into_iter().collect();
        let mut granted = 0;
        for p in products {
            for rule in rules {
                let Some(to) = self.views.tag_of(&rule.to) else {
                    continue;
                };
                if to == self.tag {
                    continue;
                }
                let Some(entry) = self.views.entry(p, &own) else {
                    continue;
                };
                let on_hand = entry.on_hand().max(0) as u64;
                // on_hand sums peers' cells (up to i64::MAX): multiply wide.
                let target = (u128::from(on_hand) * u128::from(rule.share_percent.min(100)) / 100)
                    .min(u128::from(rule.max_units)) as u64;
                let theirs = self.node_rights(entry, to).max(0) as u64;
                let mine = self.rights(p, &own).max(0) as u64;
                if target == 0 || theirs * 2 > target {
                    continue;
                }
                let q = (target - theirs).min(mine);
                if q == 0 {
                    continue;
                }
                self.rebalancer.next_req_id += 1;
                let grant_id = format!(
                    "al.{}.{now_ms}.{}",
                    self.tag.hex(),
                    self.rebalancer.next_req_id
                );
                if self.bump(p, &own, LedgerField::Granted(to), q).is_err() {
                    continue;
                }
                // Invariant (DESIGN §5.3): an allocation grants at most the
                // rights this node holds.
                debug_assert!(
                    self.rights(p, &own) >= 0,
                    "invariant no-oversell: allocation {grant_id} left negative rights"
                );
                let record = serde_json::json!({"grant_id": grant_id, "node": self.cfg.name, "location": own, "product_id": p, "to": rule.to, "to_tag": to.hex(), "quantity": q, "allocation": true, "at_ms": now_ms});
                self.write_record(RecordKind::Grant, &grant_id, record, now_ms);
                self.rebalancer.allocation_grants += 1;
                granted += 1;
            }
        }
        granted
    }

    /// Allocation grants made so far.
    pub fn allocation_grants(&self) -> u64 {
        self.rebalancer.allocation_grants
    }
}
