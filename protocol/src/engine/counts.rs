//! The engine's side of stocktakes (`crate::counts`): count sessions taking
//! pages of lines, finishing a session, one-shot counts, and indexing count
//! records into the views.

use std::collections::{BTreeMap, BTreeSet};

use super::Engine;
use crate::counts::{
    CountSession, PAGE_LINES_MAX, SESSIONS_OPEN_MAX, SESSION_PRODUCTS_MAX, ZERO_PART_LINES_MAX,
};
use crate::layout::{part_id, LedgerField, RecordKind};
use crate::ops::{CountFinish, CountLines, CountScope, OpError, OpReply};

impl Engine {
    /// This node's count (session or one-shot) of that id.
    pub fn own_count_session(&self, id: &str) -> Option<&CountSession> {
        self.views.count_sessions.get(id)?.get(&self.cfg.name)
    }

    /// `GET /api/counts/{id}`: this node's count of that id, else the first
    /// by node name, plus `collisions` when other nodes used the id too.
    pub fn count_json(&self, id: &str) -> Option<serde_json::Value> {
        let m = self.views.count_sessions.get(id)?;
        let (node, s) = m
            .get_key_value(&self.cfg.name)
            .or_else(|| m.iter().next())?;
        let mut v = s.status_json(id);
        if m.len() > 1 {
            let others: Vec<serde_json::Value> = m
                .iter()
                .filter(|(n, _)| *n != node)
                .map(|(_, o)| o.status_json(id))
                .collect();
            v["collisions"] = others.into();
        }
        Some(v)
    }

    /// Applies one counted line: raises this actor's received or removed cell
    /// by `counted - basis` and records a deficit for the shortfall this line
    /// causes (not for one recorded before). Returns the delta.
    pub(crate) fn count_line(
        &mut self,
        deficit_id: &str,
        location: &str,
        product: u64,
        counted: u64,
        basis: i64,
        now_ms: u64,
    ) -> Result<i64, OpError> {
        let delta = i128::from(counted) - i128::from(basis);
        let delta = i64::try_from(delta)
            .map_err(|_| OpError::BadRequest("count delta out of range".into()))?;
        let before = self.rights_raw(product, location);
        let known = self
            .views
            .entry(product, location)
            .is_some_and(|e| !e.cells.is_empty());
        if delta == 0 && !known {
            // A count of 0 for a product never seen here still makes it known (200 with 0).
            self.bump(product, location, LedgerField::Received, 0)?;
        }
        if delta > 0 {
            self.bump(product, location, LedgerField::Received, delta as u64)?;
        } else if delta < 0 {
            self.bump(
                product,
                location,
                LedgerField::Removed,
                delta.unsigned_abs(),
            )?;
        }
        let after = self.rights_raw(product, location);
        // One shortfall event, one deficit: a product already at -5 that a
        // later count leaves at -5 has no new shortfall.
        let mut new_short = after.saturating_neg().max(0) - before.saturating_neg().max(0);
        if self.faults.deficit_whole_balance {
            new_short = after.saturating_neg().max(0);
        }
        if new_short > 0 {
            self.reclaim(product, location, new_short as u64, now_ms);
            let rec = serde_json::json!({"count_id": deficit_id, "node": self.cfg.name, "location": location, "product_id": product, "deficit": new_short, "at_ms": now_ms});
            self.write_record(
                RecordKind::Deficit,
                &part_id(deficit_id, &format!(".{product}")),
                rec,
                now_ms,
            );
        }
        Ok(delta)
    }

    /// The basis of a line counted at `at_ms`: on hand in this node's view
    /// then (the pending batch included for "now").
    pub(crate) fn count_basis(
        &self,
        product: u64,
        location: &str,
        at_ms: u64,
        now_ms: u64,
    ) -> Result<i64, OpError> {
        if at_ms >= now_ms {
            return Ok(self
                .views
                .entry(product, location)
                .map(|e| e.on_hand())
                .unwrap_or(0));
        }
        self.on_hand_at(product, location, at_ms)
    }

    /// Sets to 0 every product of `location` whose on hand is not 0 and that
    /// is not in `counted`, as of now, writing the zeroed products in parts.
    /// Returns (products zeroed, units delta).
    pub(crate) fn zero_uncounted(
        &mut self,
        count_id: &str,
        location: &str,
        counted: &BTreeSet<u64>,
        now_ms: u64,
    ) -> Result<(u64, i64), OpError> {
        let mut others: Vec<(u64, i64)> = self
            .views
            .stock
            .iter()
            .filter(|(p, _)| !counted.contains(p))
            .filter_map(|(p, m)| Some((*p, m.get(location)?.on_hand())))
            .filter(|(_, on_hand)| *on_hand != 0)
            .collect();
        others.sort_unstable();
        let mut units = 0i64;
        for (k, part) in others.chunks(ZERO_PART_LINES_MAX).enumerate() {
            let mut entries = Vec::with_capacity(part.len());
            for (p, basis) in part {
                let d =
                    self.count_line(&part_id(count_id, "~z"), location, *p, 0, *basis, now_ms)?;
                units = units.saturating_add(d);
                entries.push(serde_json::json!([p, basis, d]));
            }
            let rec = serde_json::json!({"count_id": count_id, "node": self.cfg.name, "location": location, "part": k, "zeroed": entries, "at_ms": now_ms});
            self.write_record(
                RecordKind::CountZero,
                &part_id(count_id, &format!("~{k}")),
                rec,
                now_ms,
            );
        }
        Ok((others.len() as u64, units))
    }

    /// `POST /api/counts/{id}/lines`: one page of a count session.
    pub(crate) fn count_lines(&mut self, c: CountLines, now_ms: u64) -> Result<OpReply, OpError> {
        if c.location != self.cfg.location {
            return Err(OpError::NotOwner(format!(
                "counts are recorded only by a location's own node; this node owns {:?}",
                self.cfg.location
            )));
        }
        let (next_page, mut prior) = match self.own_count_session(&c.count_id) {
            Some(s) if s.finished.is_some() => {
                return Err(OpError::IdConflict(format!(
                "count {} is finished; lines after the finish are refused (start a new count id)",
                c.count_id
            )))
            }
            Some(s) if s.location != c.location => {
                return Err(OpError::IdConflict(format!(
                    "count {} is a session at {} taken by node {}",
                    c.count_id, s.location, s.node
                )))
            }
            Some(s) => (
                s.pages.keys().next_back().copied().unwrap_or(0) + 1,
                s.lines.clone(),
            ),
            None => {
                let open = self
                    .views
                    .count_sessions
                    .values()
                    .filter_map(|m| m.get(&self.cfg.name))
                    .filter(|s| s.finished.is_none())
                    .count();
                if open >= SESSIONS_OPEN_MAX {
                    return Err(OpError::Conflict {
                        code: "too_many_sessions".into(),
                        message: format!("{open} count sessions are open at this node (at most {SESSIONS_OPEN_MAX}); finish one first"),
                    });
                }
                (1, BTreeMap::new())
            }
        };
        // A product twice in one page: the later line is the recount.
        let mut lines: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for l in &c.lines {
            let at_ms = match &l.counted_at {
                Some(t) => crate::time::parse_rfc3339_ms(t)
                    .ok_or_else(|| {
                        OpError::BadRequest("counted_at must be RFC 3339 with an offset".into())
                    })?
                    .min(now_ms),
                None => now_ms,
            };
            lines.insert(l.product_id, (l.counted, at_ms));
        }
        let new_products = lines.keys().filter(|p| !prior.contains_key(p)).count();
        if prior.len() + new_products > SESSION_PRODUCTS_MAX {
            return Err(OpError::BadRequest(format!(
                "a count session holds at most {SESSION_PRODUCTS_MAX} products"
            )));
        }
        // All bases first: each as of its own line's time.
        let mut bases = Vec::with_capacity(lines.len());
        for (p, (_, at_ms)) in &lines {
            let mut basis = self.count_basis(*p, &c.location, *at_ms, now_ms)?;
            if let Some(old) = prior.get(p) {
                // A recount scanned before the earlier line was applied: the
                // basis then lacked the session's own correction.
                if *at_ms < old.applied_ms {
                    basis = basis.saturating_add(old.delta_total);
                }
            }
            bases.push(basis);
        }
        let mut entries = Vec::with_capacity(lines.len());
        let deficit_id = part_id(&c.count_id, &format!("~{next_page}"));
        for ((p, (counted, at_ms)), basis) in lines.iter().zip(bases) {
            let d = self.count_line(&deficit_id, &c.location, *p, *counted, basis, now_ms)?;
            entries.push(serde_json::json!([p, counted, basis, d, at_ms]));
            let e = prior.entry(*p).or_default();
            e.delta_total = e.delta_total.saturating_add(d);
        }
        let mut rec = serde_json::json!({"count_id": c.count_id, "node": self.cfg.name, "location": c.location, "page": next_page, "lines": entries, "register_id": c.register_id, "staff_id": c.staff_id, "at_ms": now_ms});
        if self.faults.unchecked_large_records {
            // The planted bug: a record as large as a real store's full
            // count once was, written without the check.
            rec["pad"] = "x".repeat(crate::validate::RECORD_BYTES_MAX).into();
        }
        self.write_record(
            RecordKind::CountLines,
            &part_id(&c.count_id, &format!("~{next_page}")),
            rec,
            now_ms,
        );
        Ok(Engine::reply(
            crate::ops::ReplyKind::Ok,
            serde_json::json!({"count_id": c.count_id, "location": c.location, "lines_received": c.lines.len(), "status": "open", "page": next_page, "lines_counted": prior.len()}),
        ))
    }

    /// `POST /api/counts/{id}/finish`.
    pub(crate) fn count_finish(&mut self, f: CountFinish, now_ms: u64) -> Result<OpReply, OpError> {
        let Some(s) = self.own_count_session(&f.count_id).cloned() else {
            if let Some(other) = self
                .views
                .count_sessions
                .get(&f.count_id)
                .and_then(|m| m.values().next())
            {
                return Err(OpError::NotOwner(format!(
                    "count {} is taken by node {}; finish it there",
                    f.count_id, other.node
                )));
            }
            return Err(OpError::NotFound(format!(
                "unknown count session {} (send its lines first)",
                f.count_id
            )));
        };
        let scope = match f.scope {
            CountScope::Full => "full",
            CountScope::Partial => "partial",
        };
        if let Some(done) = &s.finished {
            if done["scope"].as_str() == Some(scope) {
                let mut body = done.clone();
                if let Some(m) = body.as_object_mut() {
                    m.remove("scope");
                }
                return Ok(Engine::reply(crate::ops::ReplyKind::Ok, body));
            }
            return Err(OpError::IdConflict(format!(
                "count {} was finished with scope {}",
                f.count_id,
                done["scope"].as_str().unwrap_or("?")
            )));
        }
        let counted: BTreeSet<u64> = s.lines.keys().copied().collect();
        let (zeroed, zero_delta) = if f.scope == CountScope::Full {
            self.zero_uncounted(&f.count_id, &s.location, &counted, now_ms)?
        } else {
            (0, 0)
        };
        let units_delta = s.units_delta().saturating_add(zero_delta);
        let body = serde_json::json!({"count_id": f.count_id, "location": s.location, "status": "finished", "lines_counted": counted.len(), "products_zeroed": zeroed, "units_delta": units_delta});
        let mut rec = body.clone();
        rec["node"] = self.cfg.name.clone().into();
        rec["session"] = true.into();
        rec["scope"] = scope.into();
        rec["pages"] = s.pages.len().into();
        rec["at_ms"] = now_ms.into();
        self.write_record(RecordKind::Count, &f.count_id, rec, now_ms);
        Ok(Engine::reply(crate::ops::ReplyKind::Created, body))
    }

    /// Indexes count records (pages, finishes, one-shot counts).
    pub(crate) fn note_count_record(&mut self, kind: RecordKind, v: &serde_json::Value) {
        let Some(id) = v["count_id"].as_str() else {
            return;
        };
        let node = v["node"].as_str().unwrap_or("").to_string();
        let own = node == self.cfg.name;
        let s = self
            .views
            .count_sessions
            .entry(id.to_string())
            .or_default()
            .entry(node.clone())
            .or_default();
        if s.node.is_empty() {
            s.node = node;
            s.location = v["location"].as_str().unwrap_or("").to_string();
        }
        match kind {
            RecordKind::CountLines => {
                let page = v["page"].as_u64().unwrap_or(0);
                let mut delta = 0i64;
                let lines = v["lines"].as_array().map(|a| a.as_slice()).unwrap_or(&[]);
                // Records come from peers: bounded before they count.
                for l in lines.iter().take(PAGE_LINES_MAX) {
                    let p = l[0].as_u64().unwrap_or(0);
                    let d = l[3].as_i64().unwrap_or(0);
                    delta = delta.saturating_add(d);
                    if own && s.finished.is_none() {
                        let e = s.lines.entry(p).or_default();
                        e.delta_total = e.delta_total.saturating_add(d);
                        if page >= e.page {
                            e.page = page;
                            e.counted = l[1].as_u64().unwrap_or(0);
                            e.counted_at_ms = l[4].as_u64().unwrap_or(0);
                            e.applied_ms = v["at_ms"].as_u64().unwrap_or(0);
                        }
                    }
                }
                s.pages.insert(page, (lines.len() as u64, delta));
            }
            RecordKind::Count => {
                let session = v["session"].as_bool() == Some(true);
                let body = if session {
                    serde_json::json!({"count_id": id, "location": v["location"], "status": "finished", "scope": v["scope"], "lines_counted": v["lines_counted"], "products_zeroed": v["products_zeroed"], "units_delta": v["units_delta"]})
                } else {
                    let lines = v["lines"].as_array().map(|a| a.as_slice()).unwrap_or(&[]);
                    let delta: i64 = lines.iter().filter_map(|l| l["delta"].as_i64()).sum();
                    let zeroed = v["products_zeroed"].as_u64().unwrap_or(0);
                    let delta = delta.saturating_add(v["zero_delta"].as_i64().unwrap_or(0));
                    serde_json::json!({"count_id": id, "location": v["location"], "status": "finished", "scope": if v["scope"].as_str() == Some("full") { "full" } else { "partial" }, "lines_counted": lines.len(), "products_zeroed": zeroed, "units_delta": delta})
                };
                s.finished = Some(body);
                // The line map was only needed while the session was open.
                s.lines = BTreeMap::new();
            }
            _ => {}
        }
    }
}
