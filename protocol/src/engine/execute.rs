//! Executing client operations: `Engine::execute` dispatches an `Op`,
//! runs it atomically and writes its record; sales, returns, receipts,
//! counts and grants.

use std::collections::{BTreeMap, BTreeSet};

use automerge::ScalarValue;

use super::{hex_heads, strip_nulls, Engine, OpUndo, Policy, HEADS_LOG_MAX, OP_JSON_BYTES_MAX};
use crate::layout::{self, record_key, DocId, LedgerField, RecordKind};
use crate::ops::{op_hash_json, sum_lines, Count, IdemRecord, Op, OpError, OpReply, ShortLine};
use crate::views::read_entry;

impl Engine {
    /// Executes one client operation. On `Ok` the reply is final but must only be
    /// released after the batch that holds it committed.
    pub fn execute(
        &mut self,
        op: Op,
        now_ms: u64,
        idem: &dyn Fn(&str) -> Option<IdemRecord>,
    ) -> Result<OpReply, OpError> {
        // The request as the client sent it (SKUs unresolved), serialised
        // once: its hash is the idempotency check, its size the record check.
        let json = serde_json::to_vec(&op).unwrap_or_default();
        let hash = op_hash_json(&json);
        let key = op.client_key();
        // Whether an earlier request with this id had the same body; records
        // written before `op_hash` took field names hold the postcard hash,
        // computed only when such a record does not match the new one.
        let same_body = key
            .as_ref()
            .and_then(|k| self.pending_idem.get(k).cloned().or_else(|| idem(k)))
            .map(|rec| {
                let same = rec.same_body(&hash) || rec.same_body(&crate::ops::op_hash_legacy(&op));
                (rec, same)
            });
        let mut op = op;
        self.resolve_skus(&mut op)?;
        op.validate().map_err(OpError::BadRequest)?;
        // Every write but an import keeps its request in one record, and a
        // peer refuses a record over `validate::RECORD_BYTES_MAX`: a request
        // that would make one is refused here, before it touches the ledger,
        // instead of blocking the replication of this node's records.
        if !matches!(op, Op::ImportCounts(_)) && json.len() > OP_JSON_BYTES_MAX {
            return Err(OpError::BadRequest(format!(
                "the request is too large for one record ({} bytes of JSON, at most {OP_JSON_BYTES_MAX}); split it into several",
                json.len()
            )));
        }
        if let (Some(k), Some((rec, same))) = (&key, same_body) {
            if same {
                return Ok(rec.reply.replayed());
            }
            return Err(OpError::IdConflict(format!(
                "{} was used before with a different body",
                k.replace('/', " ")
            )));
        }
        debug_assert!(self.undo.is_none());
        self.undo = Some(OpUndo::default());
        let result = match op {
            Op::Sale(s) => self.sale(s, now_ms),
            Op::Return(r) => self.ret(r, now_ms),
            Op::Receipt(r) => self.receipt(r, now_ms),
            Op::Count(c) => self.count(c, now_ms),
            Op::Grant(g) => self.grant(g, now_ms),
            Op::CustomerPut {
                customer_id,
                update,
            } => self.customer_put(&customer_id, update),
            Op::CustomerErase { customer_id } => self.customer_erase(&customer_id, now_ms),
            Op::Redeem {
                customer_id,
                redeem,
            } => self.redeem(&customer_id, redeem),
            Op::Adjustment(a) => self.adjustment(a, now_ms),
            Op::Transfer(t) => self.transfer(t, now_ms),
            Op::TransferReceive(t) => self.transfer_receive(t, now_ms),
            Op::ImportCounts(i) => self.import_counts(i, now_ms),
            Op::Reserve(r) => self.reserve(r, now_ms),
            Op::Retire { node, successor } => self.retire(&node, &successor, now_ms),
            Op::ReservationFulfil {
                reservation_id,
                sale_id,
            } => self.reservation_fulfil(&reservation_id, sale_id, now_ms),
            Op::ReservationCancel { reservation_id } => {
                self.reservation_close(&reservation_id, "cancelled", now_ms)
            }
            Op::ProductPut { product_id, update } => self.product_put(product_id, update),
            Op::CountLines(c) => self.count_lines(c, now_ms),
            Op::CountFinish(f) => self.count_finish(f, now_ms),
            Op::DeclareLocation(d) => self.declare_location(d, now_ms),
        };
        let result = result.and_then(|r| self.check_op_writes().map(|()| r));
        let undo = self.undo.take().unwrap_or_default();
        match &result {
            Ok(_) => {
                for (doc, key, json) in &undo.records {
                    self.note_record(doc, key, json);
                }
            }
            Err(_) => self.roll_back(undo),
        }
        match &result {
            Ok(reply) => {
                self.stats.ops_ok += 1;
                if let Some(k) = key {
                    self.pending_idem.insert(
                        k,
                        IdemRecord {
                            body_hash: hash,
                            reply: reply.clone(),
                        },
                    );
                }
            }
            Err(_) => self.stats.ops_refused += 1,
        }
        result
    }

    pub(crate) fn reply(kind: crate::ops::ReplyKind, body: serde_json::Value) -> OpReply {
        OpReply {
            kind,
            body: body.to_string(),
        }
    }

    pub(crate) fn line_json(&self, product: u64) -> serde_json::Value {
        let (stock_level, available) = self.totals(product, None).unwrap_or((0, 0));
        serde_json::json!({"product_id": product, "stock_level": stock_level, "available": available})
    }

    pub(crate) fn write_record(
        &mut self,
        kind: RecordKind,
        id: &str,
        record: serde_json::Value,
        now_ms: u64,
    ) {
        let doc = self.records_doc(now_ms);
        let key = record_key(kind, id);
        let mut record = record;
        strip_nulls(&mut record);
        let json = record.to_string();
        let doc_key = doc.encode();
        if let Some(u) = &mut self.undo {
            // Indexed once the whole operation succeeded (see `OpUndo`).
            u.records.push((doc_key, key.clone(), json.clone()));
        } else if json.len() > crate::validate::RECORD_BYTES_MAX
            || layout::parse_record_key(&key).is_err()
        {
            // An engine-internal write (fork, deficit, expiry) that peers
            // would refuse would block every later record of this node.
            tracing::error!(key = %key, bytes = json.len(), "record not written: peers would refuse it");
            return;
        } else {
            self.note_record(&doc_key, &key, &json);
        }
        self.put(doc, key, ScalarValue::Str(json.into()));
    }

    /// Chooses the location of a sale that named none: the node's own location if
    /// it can sell every line there, else a location where it holds enough rights.
    fn sale_location(&self, lines: &BTreeMap<u64, u64>) -> String {
        let own = &self.cfg.location;
        let fits = |loc: &str| lines.iter().all(|(p, q)| self.rights(*p, loc) >= *q as i64);
        if fits(own) {
            return own.clone();
        }
        if let Some((p, _)) = lines.iter().next() {
            if let Some(m) = self.views.stock.get(p) {
                let mut cands: Vec<(&String, i64)> = m
                    .iter()
                    .map(|(l, e)| (l, self.node_rights(e, self.tag)))
                    .filter(|(l, _)| fits(l))
                    .collect();
                cands.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
                if let Some((l, _)) = cands.first() {
                    return (*l).clone();
                }
            }
        }
        // Rights can be gathered from connected peers somewhere: sell there.
        if let Some(l) = self.gatherable_location(lines) {
            return l;
        }
        // Nobody's rights fit: sell where the goods physically are (rights can
        // be requested there), the own location first.
        let stocked = |loc: &str| {
            lines.iter().all(|(p, q)| {
                self.views
                    .entry(*p, loc)
                    .is_some_and(|e| e.on_hand() >= *q as i64)
            })
        };
        if stocked(own) {
            return own.clone();
        }
        if let Some((p, _)) = lines.iter().next() {
            if let Some(m) = self.views.stock.get(p) {
                let best = m
                    .iter()
                    .filter(|(l, _)| stocked(l))
                    .max_by(|a, b| a.1.on_hand().cmp(&b.1.on_hand()).then(b.0.cmp(a.0)));
                if let Some((l, _)) = best {
                    return l.clone();
                }
            }
        }
        own.clone()
    }

    fn sale(&mut self, s: crate::ops::Sale, now_ms: u64) -> Result<OpReply, OpError> {
        let lines = sum_lines(s.lines.iter().map(|l| (l.product_id, l.quantity)))
            .map_err(OpError::BadRequest)?;
        let location = match &s.location {
            Some(l) => l.clone(),
            // A store's till sells off its own shelf (CONTRACT.md: `location`
            // defaults to the node's own); a web shop ships from wherever it
            // can sell.
            None if self.cfg.role != "webshop" => self.cfg.location.clone(),
            None => self.sale_location(&lines),
        };
        let own = location == self.cfg.location;
        if s.override_rights && !own {
            return Err(OpError::BadRequest(format!(
                "override is only allowed at this node's own location {:?}",
                self.cfg.location
            )));
        }
        let relaxed = own && (s.override_rights || self.policy_of(&location) == Policy::Relaxed);
        // The check runs per product over the summed lines, against the state
        // including every earlier operation of this batch.
        let checked: Vec<(u64, u64)> = if self.faults.per_line_check {
            s.lines.iter().map(|l| (l.product_id, l.quantity)).collect()
        } else {
            lines.iter().map(|(p, q)| (*p, *q)).collect()
        };
        let mut short = Vec::new();
        for (p, q) in &checked {
            let avail = self.rights(*p, &location);
            if avail < *q as i64 && !relaxed && !self.faults.skip_rights_check {
                short.push(ShortLine {
                    product_id: *p,
                    location: location.clone(),
                    requested: *q,
                    available: avail.max(0),
                });
            }
        }
        if !short.is_empty() {
            return Err(OpError::InsufficientStock(short));
        }
        let mut overdrawn = Vec::new();
        let mut units = 0u64;
        let mut total: i64 = 0;
        for (p, q) in &lines {
            let avail = self.rights(*p, &location);
            if avail < *q as i64 {
                overdrawn.push(
                    serde_json::json!({"product_id": p, "quantity": (*q as i64 - avail.max(0))}),
                );
            }
            self.bump(*p, &location, LedgerField::Removed, *q)?;
            units += q;
        }
        // Invariant (DESIGN §5.3, no oversell): a sale that neither the
        // location's relaxed policy nor `override` allows to overdraw leaves
        // this node's rights at the location at zero or above, per product
        // (checked over the summed lines, against this batch's overlay).
        // The planted faults that break it are the simulator checker's proof.
        if !relaxed && !self.faults.skip_rights_check && !self.faults.per_line_check {
            for p in lines.keys() {
                debug_assert!(
                    self.rights(*p, &location) >= 0,
                    "invariant no-oversell: sale {} left rights of product {p} at {location} at {}",
                    s.sale_id,
                    self.rights(*p, &location)
                );
            }
        }
        // Money in minor units: a line's own total if the till gave one, else
        // unit price × quantity − discount + tax; the sale's total if given,
        // else the lines' minus the sale's discount plus its tax.
        for l in &s.lines {
            let line = l.total.unwrap_or_else(|| {
                l.unit_price
                    .unwrap_or(0)
                    .saturating_mul(l.quantity as i64)
                    .saturating_sub(l.discount.unwrap_or(0))
                    .saturating_add(l.tax.unwrap_or(0))
            });
            total = total.saturating_add(line);
        }
        let total = s.total.unwrap_or_else(|| {
            total
                .saturating_sub(s.discount.unwrap_or(0))
                .saturating_add(s.tax.unwrap_or(0))
        });
        // The record names the customer only by a keyed hash (see crypto.rs).
        let customer = self.pseudonym_of(s.customer_id.as_deref());
        let record = serde_json::json!({
            "sale_id": s.sale_id, "node": self.cfg.name, "location": location,
            "customer": customer, "currency": s.currency, "lines": s.lines,
            "discount": s.discount, "tax": s.tax,
            "total": total, "at_ms": now_ms, "occurred_at": s.occurred_at,
            "register_id": s.register_id, "staff_id": s.staff_id,
            "override": s.override_rights.then_some(true),
        });
        self.write_record(RecordKind::Sale, &s.sale_id, record, now_ms);
        if !overdrawn.is_empty() {
            let rec = serde_json::json!({"sale_id": s.sale_id, "node": self.cfg.name, "location": location, "lines": overdrawn, "at_ms": now_ms});
            self.write_record(RecordKind::Overdraft, &s.sale_id, rec, now_ms);
            for (p, q) in &lines {
                let short = self.rights_raw(*p, &location).min(0).unsigned_abs();
                self.reclaim(*p, &location, short.min(*q), now_ms);
            }
        }
        if let Some(c) = &s.customer_id {
            let points = units.saturating_mul(self.cfg.loyalty_points_per_unit);
            if points > 0 {
                self.bump_loyalty(c, true, points)?;
            }
        }
        let out: Vec<serde_json::Value> = lines.keys().map(|p| self.line_json(*p)).collect();
        Ok(Self::reply(
            crate::ops::ReplyKind::Created,
            serde_json::json!({"sale_id": s.sale_id, "location": location, "lines": out}),
        ))
    }

    fn ret(&mut self, r: crate::ops::Return, now_ms: u64) -> Result<OpReply, OpError> {
        let verified = match &r.original_sale_id {
            Some(orig) => self.check_over_return(orig, &r)?,
            None => false,
        };
        let restock = sum_lines(
            r.lines
                .iter()
                .filter(|l| l.disposition == crate::ops::Disposition::Restock)
                .map(|l| (l.product_id, l.quantity)),
        )
        .map_err(OpError::BadRequest)?;
        for (p, q) in &restock {
            self.bump(*p, &r.location, LedgerField::Received, *q)?;
        }
        let customer = self.pseudonym_of(r.customer_id.as_deref());
        let record = serde_json::json!({"return_id": r.return_id, "node": self.cfg.name, "location": r.location, "original_sale_id": r.original_sale_id, "sale_verified": verified, "customer": customer, "lines": r.lines, "occurred_at": r.occurred_at, "register_id": r.register_id, "staff_id": r.staff_id, "at_ms": now_ms});
        self.write_record(RecordKind::Return, &r.return_id, record, now_ms);
        let out: Vec<serde_json::Value> = r
            .lines
            .iter()
            .map(|l| self.line_json(l.product_id))
            .collect();
        Ok(Self::reply(
            crate::ops::ReplyKind::Created,
            serde_json::json!({"return_id": r.return_id, "lines": out}),
        ))
    }

    fn receipt(&mut self, r: crate::ops::Receipt, now_ms: u64) -> Result<OpReply, OpError> {
        self.known_location(&r.location)?;
        let lines = sum_lines(r.lines.iter().map(|l| (l.product_id, l.quantity)))
            .map_err(OpError::BadRequest)?;
        for (p, q) in &lines {
            self.bump(*p, &r.location, LedgerField::Received, *q)?;
        }
        // At a location no node owns, one delivery recorded by several nodes
        // is booked once (`imports.rs`): the record names the other nodes'
        // receipts of this id this one was booked after.
        let seen = (r.location != self.cfg.location && self.views.owner_of(&r.location).is_none())
            .then(|| self.bookings_seen(&crate::imports::receipt_key(&r.receipt_id)));
        let record = serde_json::json!({"receipt_id": r.receipt_id, "node": self.cfg.name, "location": r.location, "lines": r.lines, "supplier": r.supplier, "purchase_order_id": r.purchase_order_id, "occurred_at": r.occurred_at, "register_id": r.register_id, "staff_id": r.staff_id, "seen": seen, "at_ms": now_ms});
        self.write_record(RecordKind::Receipt, &r.receipt_id, record, now_ms);
        let out: Vec<serde_json::Value> = lines.keys().map(|p| self.line_json(*p)).collect();
        Ok(Self::reply(
            crate::ops::ReplyKind::Created,
            serde_json::json!({"receipt_id": r.receipt_id, "lines": out}),
        ))
    }

    /// On hand of (product, location) in this node's view as of `at_ms`, from the
    /// heads log of the ledger document.
    pub(crate) fn on_hand_at(
        &self,
        product: u64,
        location: &str,
        at_ms: u64,
    ) -> Result<i64, OpError> {
        let doc_id = self.ledger_doc(product, location).encode();
        let Some(slot) = self.docs.get(&doc_id) else {
            return Ok(0);
        };
        match slot.heads_log.iter().rev().find(|(t, _)| *t <= at_ms) {
            Some((_, heads)) => Ok(read_entry(&*slot.doc, product, Some(heads)).on_hand()),
            // Before the first logged state: the document was empty then, unless
            // the log was trimmed — then this node no longer knows its view as of T.
            // A later epoch did not start empty: before its first logged
            // state this node no longer knows its view either.
            None if slot.heads_log.len() < HEADS_LOG_MAX
                && matches!(slot.id, DocId::Ledger { epoch: 0, .. }) =>
            {
                Ok(0)
            }
            None => Err(OpError::BadRequest(format!(
                "counted_at is older than the history this node keeps for product {product} at {location}; count again and upload it sooner"
            ))),
        }
    }

    fn count(&mut self, c: Count, now_ms: u64) -> Result<OpReply, OpError> {
        if self.own_count_session(&c.count_id).is_some() {
            return Err(OpError::IdConflict(format!(
                "count {} was used before (a count session or an earlier count)",
                c.count_id
            )));
        }
        if c.location != self.cfg.location {
            return Err(OpError::NotOwner(format!(
                "counts are recorded only by a location's own node; this node owns {:?}",
                self.cfg.location
            )));
        }
        self.apply_count(c, now_ms)
    }

    /// Applies a count (ownership already checked by the caller).
    pub(crate) fn apply_count(&mut self, c: Count, now_ms: u64) -> Result<OpReply, OpError> {
        let at_ms = match &c.counted_at {
            Some(t) => crate::time::parse_rfc3339_ms(t).ok_or_else(|| {
                OpError::BadRequest("counted_at must be RFC 3339 with an offset".into())
            })?,
            None => now_ms,
        };
        // The basis is the view as of the count; counts "now" include the pending
        // batch. All bases first: a refused line is refused before any write.
        let mut bases = Vec::with_capacity(c.lines.len());
        for l in &c.lines {
            bases.push(self.count_basis(l.product_id, &c.location, at_ms, now_ms)?);
        }
        let mut out_lines = Vec::new();
        let mut units_delta = 0i64;
        for (l, basis) in c.lines.iter().zip(bases) {
            let delta = self.count_line(
                &c.count_id,
                &c.location,
                l.product_id,
                l.counted,
                basis,
                now_ms,
            )?;
            units_delta = units_delta.saturating_add(delta);
            out_lines.push(serde_json::json!({"product_id": l.product_id, "counted": l.counted, "basis": basis, "delta": delta}));
        }
        // A full count also says "zero" for every product of the location it
        // did not list; those are written in parts (a record per part), as a
        // store of thousands of products would not fit one record.
        let full = c.scope == Some(crate::ops::CountScope::Full);
        let (zeroed, zero_delta) = if full {
            let listed: BTreeSet<u64> = c.lines.iter().map(|l| l.product_id).collect();
            self.zero_uncounted(&c.count_id, &c.location, &listed, now_ms)?
        } else {
            (0, 0)
        };
        let basis_heads: Vec<String> = c
            .lines
            .iter()
            .map(|l| self.ledger_doc(l.product_id, &c.location).encode())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|d| self.docs.get(&d).map(|s| (d, s)))
            .map(|(d, s)| format!("{d}@{}", hex_heads(&s.doc.heads()).join(",")))
            .collect();
        let mut record = serde_json::json!({"count_id": c.count_id, "node": self.cfg.name, "location": c.location, "counted_at_ms": at_ms, "lines": out_lines, "basis": basis_heads, "occurred_at": c.occurred_at, "register_id": c.register_id, "staff_id": c.staff_id, "at_ms": now_ms});
        if full {
            record["scope"] = "full".into();
            record["products_zeroed"] = zeroed.into();
            record["zero_delta"] = zero_delta.into();
        }
        // The basis heads are a diagnosis aid: dropped if the record would
        // otherwise be larger than a peer accepts.
        if record.to_string().len() > crate::validate::RECORD_BYTES_MAX {
            record["basis"] = serde_json::Value::Null;
        }
        self.write_record(RecordKind::Count, &c.count_id, record, now_ms);
        let mut body = serde_json::json!({"count_id": c.count_id, "lines": out_lines});
        if full {
            body["products_zeroed"] = zeroed.into();
            body["units_delta"] = units_delta.saturating_add(zero_delta).into();
        }
        Ok(Self::reply(crate::ops::ReplyKind::Created, body))
    }

    fn grant(&mut self, g: crate::ops::Grant, now_ms: u64) -> Result<OpReply, OpError> {
        let to = self.views.tag_of(&g.to).ok_or_else(|| {
            OpError::NotFound(format!(
                "unknown node {:?}: it has not joined the mesh yet",
                g.to
            ))
        })?;
        if to == self.tag {
            return Err(OpError::BadRequest(
                "a node cannot grant rights to itself".into(),
            ));
        }
        let avail = self.rights(g.product_id, &g.location);
        if avail < g.quantity as i64 && !self.faults.skip_rights_check {
            return Err(OpError::InsufficientStock(vec![ShortLine {
                product_id: g.product_id,
                location: g.location.clone(),
                requested: g.quantity,
                available: avail.max(0),
            }]));
        }
        self.bump(
            g.product_id,
            &g.location,
            LedgerField::Granted(to),
            g.quantity,
        )?;
        // Invariant (DESIGN §5.3): a grant never gives away more rights than
        // this node holds (grants are strict, whatever the policy).
        debug_assert!(
            self.faults.skip_rights_check || self.rights(g.product_id, &g.location) >= 0,
            "invariant no-oversell: grant {} left negative rights",
            g.grant_id
        );
        let record = serde_json::json!({"grant_id": g.grant_id, "node": self.cfg.name, "location": g.location, "product_id": g.product_id, "to": g.to, "to_tag": to.hex(), "quantity": g.quantity, "occurred_at": g.occurred_at, "register_id": g.register_id, "staff_id": g.staff_id, "at_ms": now_ms});
        self.write_record(RecordKind::Grant, &g.grant_id, record, now_ms);
        Ok(Self::reply(
            crate::ops::ReplyKind::Created,
            serde_json::json!({"grant_id": g.grant_id, "product_id": g.product_id, "location": g.location, "to": g.to, "rights_left": self.rights(g.product_id, &g.location)}),
        ))
    }
}
