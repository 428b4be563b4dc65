//! Retail operations on top of the ledger: the product catalogue (SKUs,
//! barcodes), adjustments with reasons, transfers between locations, returns
//! linked to sales, and the indexes behind marketing segments.

use std::collections::{BTreeMap, BTreeSet};

use automerge::ScalarValue;

use crate::engine::Engine;
use crate::ids::product_bucket;
use crate::layout::{product_key, DocId, LedgerField, RecordKind};
use crate::ops::{
    import_errors, sum_lines, Adjustment, AdjustmentReason, Count, CountLine, ImportCounts, Op,
    OpError, OpReply, ProductUpdate, Return, ShortLine, Transfer, TransferReceive,
};
use crate::views::{read_product, TransferView};

impl Engine {
    /// Replaces `sku` references in lines by product ids from the catalogue.
    pub(crate) fn resolve_skus(&self, op: &mut Op) -> Result<(), OpError> {
        let resolve = |pid: &mut u64, sku: &Option<String>, i: usize| -> Result<(), OpError> {
            let Some(sku) = sku else { return Ok(()) };
            let found = self
                .views
                .by_sku
                .get(sku)
                .filter(|s| s.len() == 1)
                .and_then(|s| s.first().copied());
            match found {
                None => Err(OpError::BadRequest(format!(
                    "lines[{i}].sku: unknown sku {sku:?}"
                ))),
                Some(p) if *pid != 0 && *pid != p => Err(OpError::BadRequest(format!(
                    "lines[{i}]: sku {sku:?} is product {p}, not {pid}"
                ))),
                Some(p) => {
                    *pid = p;
                    Ok(())
                }
            }
        };
        match op {
            Op::Sale(s) => {
                for (i, l) in s.lines.iter_mut().enumerate() {
                    resolve(&mut l.product_id, &l.sku, i)?;
                }
            }
            Op::Receipt(r) => {
                for (i, l) in r.lines.iter_mut().enumerate() {
                    resolve(&mut l.product_id, &l.sku, i)?;
                }
            }
            Op::Transfer(t) => {
                for (i, l) in t.lines.iter_mut().enumerate() {
                    resolve(&mut l.product_id, &l.sku, i)?;
                }
            }
            Op::TransferReceive(t) => {
                for (i, l) in t.lines.iter_mut().enumerate() {
                    resolve(&mut l.product_id, &l.sku, i)?;
                }
            }
            Op::Reserve(r) => {
                for (i, l) in r.lines.iter_mut().enumerate() {
                    resolve(&mut l.product_id, &l.sku, i)?;
                }
            }
            Op::Adjustment(a) => {
                for (i, l) in a.lines.iter_mut().enumerate() {
                    resolve(&mut l.product_id, &l.sku, i)?;
                }
            }
            Op::CountLines(c) => {
                for (i, l) in c.lines.iter_mut().enumerate() {
                    resolve(&mut l.product_id, &l.sku, i)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Refuses a return of more units than the original sale sold (minus earlier
    /// returns). Returns whether the sale was known here.
    pub(crate) fn check_over_return(&self, sale_id: &str, r: &Return) -> Result<bool, OpError> {
        let Some((doc, key)) = self.sale_doc(sale_id) else {
            // Not synced here (yet): accepted, and recorded as unverified.
            return Ok(false);
        };
        let record = self.record(&doc, &key).unwrap_or_default();
        let mut sold: BTreeMap<u64, u64> = BTreeMap::new();
        for l in record["lines"].as_array().into_iter().flatten() {
            let p = l["product_id"].as_u64().unwrap_or(0);
            let e = sold.entry(p).or_default();
            *e = e.saturating_add(l["quantity"].as_u64().unwrap_or(0));
        }
        let before = self
            .views
            .returned
            .get(sale_id)
            .cloned()
            .unwrap_or_default();
        let now = sum_lines(r.lines.iter().map(|l| (l.product_id, l.quantity)))
            .map_err(OpError::BadRequest)?;
        for (p, q) in now {
            let s = sold.get(&p).copied().unwrap_or(0);
            let b = before.get(&p).copied().unwrap_or(0);
            if b.saturating_add(q) > s {
                return Err(OpError::Conflict {
                    code: "over_return".into(),
                    message: format!(
                        "sale {sale_id} sold {s} of product {p}, {b} already returned; {q} more is too many"
                    ),
                });
            }
        }
        Ok(true)
    }

    pub(crate) fn adjustment(&mut self, a: Adjustment, now_ms: u64) -> Result<OpReply, OpError> {
        self.known_location(&a.location)?;
        let own = a.location == self.cfg.location;
        let mut removals: BTreeMap<u64, u64> = BTreeMap::new();
        let mut additions: BTreeMap<u64, u64> = BTreeMap::new();
        for l in &a.lines {
            let target = if l.quantity < 0 {
                &mut removals
            } else if a.reason == AdjustmentReason::Correction {
                &mut additions
            } else {
                &mut removals
            };
            let e = target.entry(l.product_id).or_default();
            *e = e
                .checked_add(l.quantity.unsigned_abs())
                .ok_or_else(|| OpError::BadRequest("quantities overflow".into()))?;
        }
        // At its own location a node records physical loss even beyond its
        // rights (a deficit, like a count); elsewhere it is strict.
        if !own {
            let short: Vec<ShortLine> = removals
                .iter()
                .filter_map(|(p, q)| {
                    let avail = self.rights(*p, &a.location);
                    (avail < *q as i64).then(|| ShortLine {
                        product_id: *p,
                        location: a.location.clone(),
                        requested: *q,
                        available: avail.max(0),
                    })
                })
                .collect();
            if !short.is_empty() {
                return Err(OpError::InsufficientStock(short));
            }
        }
        for (p, q) in &removals {
            let before = self.rights(*p, &a.location);
            self.bump(*p, &a.location, LedgerField::Removed, *q)?;
            let rights = self.rights(*p, &a.location);
            // One shortfall event, one deficit: only what this adjustment
            // took below zero (a product already at -5 is not short again).
            let new_short = rights.saturating_neg().max(0) - before.saturating_neg().max(0);
            if new_short > 0 {
                let rec = serde_json::json!({"adjustment_id": a.adjustment_id, "node": self.cfg.name, "location": a.location, "product_id": p, "deficit": new_short, "at_ms": now_ms});
                self.write_record(
                    RecordKind::Deficit,
                    &crate::layout::part_id(&a.adjustment_id, &format!(".{p}")),
                    rec,
                    now_ms,
                );
            }
        }
        for (p, q) in &additions {
            self.bump(*p, &a.location, LedgerField::Received, *q)?;
        }
        let record = serde_json::json!({"adjustment_id": a.adjustment_id, "node": self.cfg.name, "location": a.location, "reason": a.reason, "lines": a.lines, "note": a.note, "staff_id": a.staff_id, "register_id": a.register_id, "occurred_at": a.occurred_at, "at_ms": now_ms});
        self.write_record(RecordKind::Adjustment, &a.adjustment_id, record, now_ms);
        let products: BTreeSet<u64> = a.lines.iter().map(|l| l.product_id).collect();
        let out: Vec<serde_json::Value> = products.iter().map(|p| self.line_json(*p)).collect();
        Ok(Engine::reply(
            crate::ops::ReplyKind::Created,
            serde_json::json!({"adjustment_id": a.adjustment_id, "reason": a.reason, "lines": out}),
        ))
    }

    pub(crate) fn transfer(&mut self, t: Transfer, now_ms: u64) -> Result<OpReply, OpError> {
        self.known_location(&t.from)?;
        self.known_location(&t.to)?;
        let lines = sum_lines(t.lines.iter().map(|l| (l.product_id, l.quantity)))
            .map_err(OpError::BadRequest)?;
        // Stock leaves `from` out of the sender's rights: strict everywhere.
        let short: Vec<ShortLine> = lines
            .iter()
            .filter_map(|(p, q)| {
                let avail = self.rights(*p, &t.from);
                (avail < *q as i64).then(|| ShortLine {
                    product_id: *p,
                    location: t.from.clone(),
                    requested: *q,
                    available: avail.max(0),
                })
            })
            .collect();
        if !short.is_empty() {
            return Err(OpError::InsufficientStock(short));
        }
        for (p, q) in &lines {
            self.bump(*p, &t.from, LedgerField::Removed, *q)?;
        }
        let sent: Vec<serde_json::Value> = lines
            .iter()
            .map(|(p, q)| serde_json::json!({"product_id": p, "quantity": q}))
            .collect();
        let record = serde_json::json!({"transfer_id": t.transfer_id, "node": self.cfg.name, "from": t.from, "to": t.to, "lines": sent, "occurred_at": t.occurred_at, "register_id": t.register_id, "staff_id": t.staff_id, "at_ms": now_ms});
        self.write_record(RecordKind::Transfer, &t.transfer_id, record, now_ms);
        let out: Vec<serde_json::Value> = lines.keys().map(|p| self.line_json(*p)).collect();
        Ok(Engine::reply(
            crate::ops::ReplyKind::Created,
            serde_json::json!({"transfer_id": t.transfer_id, "from": t.from, "to": t.to, "status": "in_transit", "lines": out}),
        ))
    }

    /// The transfers with this id that this node may receive (sent to its
    /// own location or to one no node owns), optionally from one location:
    /// (sending node, view).
    fn receivable(&self, id: &str, from: Option<&str>) -> Vec<(String, TransferView)> {
        self.views
            .transfers
            .get(id)
            .into_iter()
            .flatten()
            .filter(|(_, v)| !v.sent.is_empty())
            .filter(|(_, v)| from.is_none_or(|f| v.from == f))
            .filter(|(sender, v)| {
                v.to == self.cfg.location
                    || match self.views.owner_of(&v.to) {
                        // One physical arrival, one accounting: into a
                        // location no node acts for, only the sending node
                        // books the arrival (two nodes booking it would both
                        // add the units).
                        None => **sender == self.cfg.name,
                        Some((tag, _)) => tag == self.tag,
                    }
            })
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    }

    /// Destinations of the transfers with this id (for location-limited tokens).
    pub fn transfer_destinations(&self, id: &str, from: Option<&str>) -> Vec<String> {
        self.views
            .transfers
            .get(id)
            .into_iter()
            .flatten()
            .filter(|(_, v)| from.is_none_or(|f| v.from == f))
            .map(|(_, v)| v.to.clone())
            .collect()
    }

    pub(crate) fn transfer_receive(
        &mut self,
        t: TransferReceive,
        now_ms: u64,
    ) -> Result<OpReply, OpError> {
        let known = self
            .views
            .transfers
            .get(&t.transfer_id)
            .is_some_and(|m| m.values().any(|v| !v.sent.is_empty()));
        if !known {
            return Err(OpError::NotFound(format!(
                "unknown transfer {} (not synced to this node yet?)",
                t.transfer_id
            )));
        }
        let candidates = self.receivable(&t.transfer_id, t.from.as_deref());
        if candidates.is_empty() {
            if t.from.is_some() {
                return Err(OpError::NotFound(format!(
                    "no transfer {} from {} to a location of this node",
                    t.transfer_id,
                    t.from.as_deref().unwrap_or("")
                )));
            }
            return Err(OpError::NotOwner(format!(
                "transfer {} is received by the node of its destination (into a location no node owns: by the node that sent it), not by this node",
                t.transfer_id
            )));
        }
        let open: Vec<&(String, TransferView)> =
            candidates.iter().filter(|(_, v)| !v.received).collect();
        let (sender, tv) = match open.as_slice() {
            [] => {
                return Err(OpError::Conflict {
                    code: "already_received".into(),
                    message: format!("transfer {} was already received", t.transfer_id),
                })
            }
            [one] => (*one).clone(),
            _ => {
                let froms: Vec<&str> = open.iter().map(|(_, v)| v.from.as_str()).collect();
                return Err(OpError::Conflict {
                    code: "id_collision".into(),
                    message: format!(
                        "{} transfers use the id {} (from {}); say which with \"from\"",
                        open.len(),
                        t.transfer_id,
                        froms.join(", ")
                    ),
                });
            }
        };
        // No lines: everything arrived as sent.
        let got: BTreeMap<u64, u64> = if t.lines.is_empty() {
            tv.sent.clone()
        } else {
            sum_lines(t.lines.iter().map(|l| (l.product_id, l.quantity)))
                .map_err(OpError::BadRequest)?
        };
        let products: BTreeSet<u64> = tv.sent.keys().chain(got.keys()).copied().collect();
        let mut out = Vec::new();
        for p in products {
            let sent = tv.sent.get(&p).copied().unwrap_or(0);
            let received = got.get(&p).copied().unwrap_or(0);
            if received > 0 {
                self.bump(p, &tv.to, LedgerField::Received, received)?;
            }
            // Units that never arrived already left `from`: they are shrinkage.
            out.push(serde_json::json!({"product_id": p, "sent": sent, "received": received, "shrinkage": sent.saturating_sub(received), "over": received.saturating_sub(sent)}));
        }
        let colliding = self
            .views
            .transfers
            .get(&t.transfer_id)
            .is_some_and(|m| m.len() > 1);
        // The receipt names the sending node, so it marks exactly its
        // transfer; two receipts of colliding ids at one node get two keys.
        let record_id = if colliding {
            crate::layout::part_id(&t.transfer_id, &format!("@{sender}"))
        } else {
            t.transfer_id.clone()
        };
        let record = serde_json::json!({"transfer_id": t.transfer_id, "node": self.cfg.name, "sender": sender, "from": tv.from, "to": tv.to, "lines": out, "occurred_at": t.occurred_at, "register_id": t.register_id, "staff_id": t.staff_id, "at_ms": now_ms});
        self.write_record(RecordKind::TransferReceipt, &record_id, record, now_ms);
        Ok(Engine::reply(
            crate::ops::ReplyKind::Created,
            serde_json::json!({"transfer_id": t.transfer_id, "from": tv.from, "to": tv.to, "status": "received", "lines": out}),
        ))
    }

    /// Every id that more than one node used for different operations while
    /// apart (CONTRACT v2): `{"kind":"id_collision","id","nodes"}`.
    pub fn id_collisions(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let mut transfers: Vec<(&String, Vec<&String>)> = self
            .views
            .transfers
            .iter()
            .filter(|(_, m)| m.values().filter(|v| !v.sent.is_empty()).count() > 1)
            .map(|(id, m)| (id, m.keys().collect()))
            .collect();
        transfers.sort();
        for (id, nodes) in transfers {
            out.push(serde_json::json!({"kind": "id_collision", "id": id, "record": "transfer", "nodes": nodes}));
        }
        let mut sales: Vec<(&String, Vec<String>)> = self
            .views
            .sale_collisions
            .iter()
            .map(|(id, s)| {
                let nodes = s
                    .iter()
                    .filter_map(|(d, k)| self.record(d, k))
                    .filter_map(|v| v["node"].as_str().map(str::to_string))
                    .collect();
                (id, nodes)
            })
            .collect();
        sales.sort();
        for (id, nodes) in sales {
            out.push(serde_json::json!({"kind": "id_collision", "id": id, "record": "sale", "nodes": nodes}));
        }
        let mut counts: Vec<(&String, Vec<&String>)> = self
            .views
            .count_sessions
            .iter()
            .filter(|(_, m)| m.len() > 1)
            .map(|(id, m)| (id, m.keys().collect()))
            .collect();
        counts.sort();
        let mut rsv: Vec<(&String, Vec<&String>)> = self
            .views
            .reservations
            .iter()
            .filter(|(_, m)| m.values().filter(|v| v.known).count() > 1)
            .map(|(id, m)| (id, m.keys().collect()))
            .collect();
        rsv.sort();
        for (id, nodes) in rsv {
            out.push(serde_json::json!({"kind": "id_collision", "id": id, "record": "reservation", "nodes": nodes}));
        }
        for (id, nodes) in counts {
            out.push(serde_json::json!({"kind": "id_collision", "id": id, "record": "count", "nodes": nodes}));
        }
        for (kind, name) in crate::recordids::INDEXED {
            out.extend(self.record_id_collisions(kind, name));
        }
        out
    }

    /// Ids of `kind` (`recordids::INDEXED`) held by more than one records
    /// document that stand for more than one operation. Receipts of one id
    /// at one location no node owns with the same lines are one delivery
    /// recorded by several nodes (booked once, `imports.rs`): no collision.
    fn record_id_collisions(&self, kind: RecordKind, name: &str) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let Some(ids) = self.views.record_ids.get(&kind) else {
            return out;
        };
        if kind == RecordKind::Receipt && self.faults.unlisted_receipt_collisions {
            return out;
        }
        for (id, docs) in ids.shared() {
            let key = crate::layout::record_key(kind, id);
            let mut nodes: BTreeSet<String> = BTreeSet::new();
            // One entry per operation: a receipt at an ownerless location
            // by (location, lines), any other by its document.
            let mut operations: BTreeSet<(String, String)> = BTreeSet::new();
            for doc in docs {
                let Some(r) = self.record(doc, &key) else {
                    // Not readable yet (its batch is open): an operation
                    // of its own until it is.
                    operations.insert((doc.to_string(), String::new()));
                    continue;
                };
                nodes.insert(r["node"].as_str().unwrap_or("").to_string());
                let location = r["location"].as_str().unwrap_or("");
                let ownerless = kind == RecordKind::Receipt
                    && location != self.cfg.location
                    && self.views.owner_of(location).is_none();
                if ownerless {
                    let lines = crate::imports::summed_lines(&r);
                    operations.insert((location.to_string(), format!("{lines:?}")));
                } else {
                    operations.insert((doc.to_string(), String::new()));
                }
            }
            if operations.len() > 1 {
                out.push(serde_json::json!({"kind": "id_collision", "id": id, "record": name, "nodes": nodes}));
            }
        }
        out
    }

    /// `GET /api/transfers/{id}`: the transfer this node cares about (to its
    /// location, else sent by it, else the first) and the others with that id.
    pub fn transfer_json(&self, id: &str) -> Option<serde_json::Value> {
        let m = self.views.transfers.get(id)?;
        let one = |n: &String, t: &TransferView| {
            let lines: Vec<serde_json::Value> = t
                .sent
                .iter()
                .map(|(p, q)| serde_json::json!({"product_id": p, "quantity": q}))
                .collect();
            serde_json::json!({"transfer_id": id, "node": n, "from": t.from, "to": t.to, "lines": lines, "status": if t.received { "received" } else { "in_transit" }})
        };
        let primary = m
            .iter()
            .find(|(_, t)| t.to == self.cfg.location)
            .or_else(|| m.iter().find(|(n, _)| **n == self.cfg.name))
            .or_else(|| m.iter().next())?;
        let mut v = one(primary.0, primary.1);
        if m.len() > 1 {
            let others: Vec<serde_json::Value> = m
                .iter()
                .filter(|(n, _)| *n != primary.0)
                .map(|(n, t)| one(n, t))
                .collect();
            v["collisions"] = others.into();
        }
        Some(v)
    }

    pub(crate) fn product_put(
        &mut self,
        product: u64,
        u: ProductUpdate,
    ) -> Result<OpReply, OpError> {
        if let Some(sku) = &u.sku {
            if let Some(other) = self
                .views
                .by_sku
                .get(sku)
                .and_then(|s| s.iter().find(|p| **p != product))
            {
                return Err(OpError::Conflict {
                    code: "sku_conflict".into(),
                    message: format!("sku {sku:?} already belongs to product {other}; SKUs are unique across the chain"),
                });
            }
        }
        let doc = DocId::Products {
            bucket: product_bucket(product, self.cfg.buckets),
        };
        if let Some(undo) = &mut self.undo {
            if let std::collections::btree_map::Entry::Vacant(slot) = undo.products.entry(product) {
                slot.insert(self.views.products.get(&product).cloned());
            }
        }
        let mut view = self
            .views
            .products
            .get(&product)
            .cloned()
            .unwrap_or_default();
        if let Some(s) = u.sku {
            view.sku = Some(s.clone());
            view.conflicts.remove("sku");
            self.put(
                doc.clone(),
                product_key(product, "sku"),
                ScalarValue::Str(s.into()),
            );
        }
        if let Some(b) = u.barcodes {
            let json = serde_json::to_string(&b).unwrap_or_default();
            view.barcodes = b;
            view.conflicts.remove("barcodes");
            self.put(
                doc.clone(),
                product_key(product, "barcodes"),
                ScalarValue::Str(json.into()),
            );
        }
        if let Some(x) = u.external_ids {
            let json = serde_json::to_string(&x).unwrap_or_default();
            view.external_ids = x;
            view.conflicts.remove("external_ids");
            self.put(
                doc.clone(),
                product_key(product, "external_ids"),
                ScalarValue::Str(json.into()),
            );
        }
        if let Some(n) = u.name {
            view.name = Some(n.clone());
            view.conflicts.remove("name");
            self.put(
                doc,
                product_key(product, "name"),
                ScalarValue::Str(n.into()),
            );
        }
        self.views.set_product(product, view.clone());
        Ok(Engine::reply(
            crate::ops::ReplyKind::Ok,
            serde_json::json!({"product_id": product, "sku": view.sku, "barcodes": view.barcodes, "external_ids": view.external_ids, "name": view.name}),
        ))
    }

    pub(crate) fn recompute_products(&mut self, id: &str, keys: &BTreeSet<String>) {
        let products: BTreeSet<u64> = keys
            .iter()
            .filter_map(|k| crate::layout::parse_product_key(k).ok())
            .map(|(p, _)| p)
            .collect();
        for p in products {
            let Some(doc) = self.doc(id) else { return };
            let view = read_product(doc, p);
            self.views.set_product(p, view);
        }
    }

    /// Imports counts from a stock file, all or nothing. Rows may name this
    /// node's own location or a location no node owns (opening balances of a
    /// place without its own node); a location owned by another node is refused.
    pub(crate) fn import_counts(
        &mut self,
        imp: ImportCounts,
        now_ms: u64,
    ) -> Result<OpReply, OpError> {
        let mut errors = Vec::new();
        let mut seen: BTreeMap<(String, String), u64> = BTreeMap::new();
        let mut products: BTreeMap<String, u64> = BTreeMap::new();
        for r in &imp.rows {
            if r.location != self.cfg.location {
                if let Some((_, owner)) = self.views.owner_of(&r.location) {
                    errors.push(format!(
                        "line {}: location {} belongs to node {}; import its rows at that node",
                        r.line, r.location, owner.name
                    ));
                    continue;
                }
            }
            if let Some(first) = seen.insert((r.sku.clone(), r.location.clone()), r.line) {
                errors.push(format!(
                    "line {}: SKU {} at {} repeats line {first}",
                    r.line, r.sku, r.location
                ));
            }
            let known = self
                .views
                .by_sku
                .get(&r.sku)
                .and_then(|s| s.first().copied());
            let pid = known.unwrap_or_else(|| crate::ids::product_id_for_sku(&r.sku));
            if known.is_none() {
                if let Some(other) = self
                    .views
                    .products
                    .get(&pid)
                    .and_then(|v| v.sku.clone())
                    .filter(|o| *o != r.sku)
                {
                    errors.push(format!("line {}: SKU {} maps to product {pid}, which is SKU {other}; add it to the catalogue first", r.line, r.sku));
                }
            }
            products.insert(r.sku.clone(), pid);
        }
        import_errors(errors).map_err(OpError::BadRequest)?;
        // New SKUs join the catalogue, with the file's title as the name.
        for r in &imp.rows {
            let pid = products[&r.sku];
            if self.views.products.get(&pid).and_then(|v| v.sku.as_ref()) != Some(&r.sku) {
                let update = ProductUpdate {
                    sku: Some(r.sku.clone()),
                    name: r.title.clone(),
                    ..Default::default()
                };
                self.product_put(pid, update)?;
            }
        }
        // Other nodes whose units at an ownerless location this import is
        // counted over (before its own rows are booked): if one of them
        // booked this very import and its record has not arrived yet, this
        // booking came after that one (`imports.rs`).
        let counted_over = self.bookings_counted_over(
            imp.rows
                .iter()
                .map(|r| (products[&r.sku], r.location.as_str())),
        );
        let mut by_location: BTreeMap<String, Vec<CountLine>> = BTreeMap::new();
        for r in &imp.rows {
            by_location
                .entry(r.location.clone())
                .or_default()
                .push(CountLine {
                    product_id: products[&r.sku],
                    counted: r.on_hand,
                });
        }
        let mut summary = Vec::new();
        for (location, lines) in by_location {
            let n = lines.len();
            // One count record per 500 rows keeps every record small.
            for (k, chunk) in lines.chunks(crate::ops::LINES_MAX).enumerate() {
                let count = Count {
                    scope: None,
                    count_id: format!("{}.{location}.{k}", imp.import_id),
                    location: location.clone(),
                    counted_at: None,
                    lines: chunk.to_vec(),
                    ..Default::default()
                };
                self.apply_count(count, now_ms)?;
            }
            let mut entry = serde_json::json!({"location": location, "rows": n});
            if imp.scope == Some(crate::ops::CountScope::Full) {
                let listed: BTreeSet<u64> = lines.iter().map(|l| l.product_id).collect();
                let id = crate::layout::part_id(&imp.import_id, &format!(".{location}.full"));
                let (zeroed, delta) = self.zero_uncounted(&id, &location, &listed, now_ms)?;
                entry["products_zeroed"] = zeroed.into();
                entry["zero_delta"] = delta.into();
            }
            summary.push(entry);
        }
        // The other nodes' imports of this id this one was booked after
        // (`imports.rs`: it is not the first, whatever the clocks say).
        let seen = self.bookings_seen(&imp.import_id);
        let counted_over: Vec<String> = counted_over
            .into_iter()
            .filter(|n| !seen.contains(n))
            .collect();
        let record = serde_json::json!({"import_id": imp.import_id, "node": self.cfg.name, "rows": imp.rows.len(), "locations": summary, "seen": seen, "counted_over": counted_over, "at_ms": now_ms});
        self.write_record(RecordKind::Import, &imp.import_id, record, now_ms);
        Ok(Engine::reply(
            crate::ops::ReplyKind::Created,
            serde_json::json!({"import_id": imp.import_id, "rows": imp.rows.len(), "locations": summary}),
        ))
    }

    /// Units in unreceived transfers to `location`.
    pub fn incoming(&self, product: u64, location: &str) -> i64 {
        self.views
            .transfers_to
            .get(location)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| self.views.transfers.get(id))
                    .flat_map(|m| m.values())
                    .filter(|t| {
                        (!t.received || self.faults.received_in_transit) && t.to == location
                    })
                    .map(|t| {
                        i64::try_from(t.sent.get(&product).copied().unwrap_or(0))
                            .unwrap_or(i64::MAX)
                    })
                    .fold(0i64, i64::saturating_add)
            })
            .unwrap_or(0)
    }

    /// Indexes the retail records (transfers, returns, adjustments, buyers).
    pub(crate) fn note_retail_record(
        &mut self,
        kind: RecordKind,
        id: &str,
        doc: &str,
        key: &str,
        v: &serde_json::Value,
    ) {
        if crate::recordids::indexed(kind, v) {
            self.views.record_ids.entry(kind).or_default().add(id, doc);
        }
        match kind {
            RecordKind::Reservation | RecordKind::ReservationClose => {
                self.note_reservation(kind, id, v)
            }
            RecordKind::Import => self.note_import(v),
            RecordKind::Receipt => self.note_receipt(v),
            RecordKind::Transfer | RecordKind::TransferReceipt => {
                let from = v["from"].as_str().unwrap_or("").to_string();
                let to = v["to"].as_str().unwrap_or("").to_string();
                let id = v["transfer_id"].as_str().unwrap_or(id).to_string();
                let m = self.views.transfers.entry(id.clone()).or_default();
                let sender = if kind == RecordKind::Transfer {
                    v["node"].as_str().unwrap_or("").to_string()
                } else if let Some(s) = v["sender"].as_str() {
                    s.to_string()
                } else {
                    // A receipt written before receipts named the sender:
                    // the transfer with its route, else the only one.
                    m.iter()
                        .find(|(_, t)| t.from == from && t.to == to)
                        .map(|(n, _)| n.clone())
                        .or_else(|| (m.len() == 1).then(|| m.keys().next().cloned()).flatten())
                        .unwrap_or_default()
                };
                let t = m.entry(sender).or_default();
                t.from = from;
                t.to = to.clone();
                if kind == RecordKind::Transfer {
                    // Records come from peers: bounded before they count.
                    let mut lines: BTreeMap<u64, u64> = BTreeMap::new();
                    for l in v["lines"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .take(crate::ops::LINES_MAX)
                    {
                        lines.insert(
                            l["product_id"].as_u64().unwrap_or(0),
                            l["quantity"].as_u64().unwrap_or(0),
                        );
                    }
                    t.note_sent(doc, lines);
                } else {
                    t.received = true;
                }
                let products: Vec<u64> = t.sent.keys().copied().collect();
                self.views
                    .transfers_to
                    .entry(to.clone())
                    .or_default()
                    .insert(id);
                for p in products {
                    self.touch_row(p, &to);
                }
            }
            RecordKind::Return => {
                if let Some(orig) = v["original_sale_id"].as_str() {
                    let m = self.views.returned.entry(orig.to_string()).or_default();
                    for l in v["lines"].as_array().into_iter().flatten() {
                        let e = m.entry(l["product_id"].as_u64().unwrap_or(0)).or_default();
                        *e = e.saturating_add(l["quantity"].as_u64().unwrap_or(0));
                    }
                }
            }
            RecordKind::Adjustment => {
                let loc = v["location"].as_str().unwrap_or("").to_string();
                self.views
                    .adjustments
                    .entry(loc)
                    .or_default()
                    .insert((doc.to_string(), key.to_string()));
            }
            RecordKind::Sale => {
                // A pseudonym (resolved at query time); older records: the id.
                if let Some(c) = v["customer"].as_str().or_else(|| v["customer_id"].as_str()) {
                    let at = v["at_ms"].as_u64().unwrap_or(0);
                    let loc = v["location"].as_str().unwrap_or("").to_string();
                    for l in v["lines"].as_array().into_iter().flatten() {
                        let p = l["product_id"].as_u64().unwrap_or(0);
                        self.views.buyers.entry(p).or_default().insert((
                            at,
                            c.to_string(),
                            loc.clone(),
                            id.to_string(),
                        ));
                    }
                }
            }
            _ => {}
        }
    }

    /// Customers who bought `product` since `since_ms` (optionally at a
    /// location), with their matching purchases; consenting ones only unless
    /// `include_all`. Erased customers never appear.
    pub fn segment(
        &self,
        product: u64,
        since_ms: u64,
        location: Option<&str>,
        include_all: bool,
    ) -> Vec<(String, Vec<serde_json::Value>)> {
        let mut out: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
        let Some(buys) = self.views.buyers.get(&product) else {
            return Vec::new();
        };
        for (at, customer, loc, sale_id) in
            buys.range((since_ms, String::new(), String::new(), String::new())..)
        {
            if location.is_some_and(|l| l != loc) {
                continue;
            }
            let customer = self.views.pseudonyms.get(customer).unwrap_or(customer);
            let Some(c) = self.views.customers.get(customer) else {
                continue;
            };
            if c.erased {
                continue;
            }
            let consent = c
                .profile
                .get("marketing_consent")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            if !consent && !include_all {
                continue;
            }
            out.entry(customer.clone()).or_default().push(serde_json::json!({"sale_id": sale_id, "location": loc, "at": crate::time::format_rfc3339_ms(*at)}));
        }
        out.into_iter().collect()
    }
}
