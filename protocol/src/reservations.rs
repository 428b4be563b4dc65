//! Reservations (buy online, pick up in store).
//!
//! A reservation is a grant of sell-rights to the fulfilling node plus a
//! *hold* on them: the units stay in that node's rights but are excluded from
//! what it sells normally (`Engine::rights` subtracts them). The hold is a
//! ledger cell (`<product>/<actor>/h/<to>`) written in the same change as the
//! grant, in the same document, so no node ever sees the granted units
//! without their hold — whatever order the ledger and records documents
//! arrive in. Only the fulfilling node closes a reservation — by fulfilling
//! it (a sale out of the reserved units), cancelling it, or expiring it by
//! its own clock — so two clocks can never both act on one reservation.
//! Closing raises the closer's released cell (`/u`) in the same ledger
//! documents, which frees the units; a node closes only a reservation whose
//! hold it sees (the record names the hold cell's value that includes it), so
//! a release never runs ahead of its hold and frees another reservation's
//! units. When the fulfilling node is retired, its open reservations pass to
//! its successor together with its rights: the successor keeps the units
//! reserved and is the one that fulfils, cancels or expires them.
//! Reservations recorded before holds were in the ledger (protocol 5) are
//! still held by their records (`views.reserved`).

use std::collections::BTreeMap;

use crate::engine::Engine;
use crate::ids::{ActorKey, NodeTag};
use crate::layout::{LedgerField, RecordKind};
use crate::ops::{sum_lines, OpError, OpReply, Reserve, ShortLine};
use crate::views::ReservationView;

/// Late holds released in one batch at most (`Engine::release_late_holds`);
/// the others wait for the next batch.
const LATE_RELEASES_PER_BATCH_MAX: usize = 256;

impl Engine {
    /// Units this node holds for open reservations at (product, location),
    /// including those of retired nodes it succeeds (their rights, reserved
    /// units included, are its own now).
    pub fn reserved_by_me(&self, product: u64, location: &str) -> i64 {
        let ledger = self
            .views
            .entry(product, location)
            .map(|e| e.held_in(self.tag, &|t| self.views.resolve(t)))
            .unwrap_or(0);
        let held = |tag: NodeTag| {
            self.views
                .reserved
                .get(&(product, location.to_string(), tag))
                .copied()
                .unwrap_or(0)
        };
        let mut v = ledger.saturating_add(held(self.tag));
        for retired in self.views.retired.keys() {
            if *retired != self.tag && self.views.resolve(*retired) == self.tag {
                v = v.saturating_add(held(*retired));
            }
        }
        v
    }

    /// Whether this node acts for reservations fulfilled by `tag`: its own,
    /// and those of retired nodes it succeeds.
    fn fulfils_for(&self, tag: Option<NodeTag>) -> bool {
        tag.is_some_and(|t| t == self.tag || self.views.resolve(t) == self.tag)
    }

    /// Units held for open reservations at (product, location), by any node.
    pub fn reserved_at(&self, product: u64, location: &str) -> i64 {
        let ledger = self
            .views
            .entry(product, location)
            .map(|e| e.held_total(&|t| self.views.resolve(t)))
            .unwrap_or(0);
        self.views
            .reserved
            .iter()
            .filter(|((p, l, _), _)| *p == product && l == location)
            .map(|(_, q)| *q)
            .fold(ledger, i64::saturating_add)
    }

    /// Whether this node sees the reservation's hold in the ledger (always
    /// true for a reservation held by its record alone).
    fn hold_visible(&self, v: &ReservationView) -> bool {
        v.hold.is_none() || v.lines.keys().all(|p| self.line_hold_visible(v, *p))
    }

    /// Whether this node sees the ledger hold of product `p`'s line (a
    /// product's cells are in one ledger document, so a line's hold is
    /// there whole or not at all).
    fn line_hold_visible(&self, v: &ReservationView, p: u64) -> bool {
        let (Some((actor, through)), Some(to)) = (&v.hold, v.fulfil_by) else {
            return v.hold.is_none();
        };
        let Some(n) = through.get(&p) else {
            return true;
        };
        let have = self
            .views
            .entry(p, &v.location)
            .and_then(|e| e.cells.get(actor))
            .and_then(|c| c.held.get(&to))
            .copied()
            .unwrap_or(0);
        have >= *n
    }

    /// Whether node `name` recorded a fork of its own history (a restored
    /// backup or a copied data directory): changes it wrote before may be
    /// lost for good, a reservation's ledger hold among them.
    fn forked_node(&self, name: &str) -> bool {
        let from = ("fork/".to_string(), String::new());
        self.views
            .alarms
            .range(from..)
            .take_while(|((k, _), _)| k.starts_with("fork/"))
            .any(|((_, n), _)| n == name)
    }

    pub(crate) fn reserve(&mut self, r: Reserve, now_ms: u64) -> Result<OpReply, OpError> {
        let expires_at_ms = crate::time::parse_rfc3339_ms(&r.expires_at)
            .ok_or_else(|| OpError::BadRequest("expires_at must be RFC 3339".into()))?;
        let to = self
            .views
            .tag_of(&r.fulfil_by)
            .ok_or_else(|| OpError::NotFound(format!("unknown node {:?}", r.fulfil_by)))?;
        let lines = sum_lines(r.lines.iter().map(|l| (l.product_id, l.quantity)))
            .map_err(OpError::BadRequest)?;
        let short: Vec<ShortLine> = lines
            .iter()
            .filter_map(|(p, q)| {
                let avail = self.rights(*p, &r.location);
                (avail < *q as i64).then(|| ShortLine {
                    product_id: *p,
                    location: r.location.clone(),
                    requested: *q,
                    available: avail.max(0),
                })
            })
            .collect();
        if !short.is_empty() {
            return Err(OpError::InsufficientStock(short));
        }
        // The units move to the fulfilling node as rights, held for the
        // reservation by a cell of the same change and document.
        let mut through = Vec::with_capacity(lines.len());
        for (p, q) in &lines {
            if to != self.tag {
                self.bump(*p, &r.location, LedgerField::Granted(to), *q)?;
            }
            self.bump(*p, &r.location, LedgerField::Held(to), *q)?;
            let cell = self
                .views
                .entry(*p, &r.location)
                .and_then(|e| e.cells.get(&self.actor))
                .and_then(|c| c.held.get(&to))
                .copied()
                .unwrap_or(0);
            through.push(serde_json::json!([p, cell]));
        }
        // Invariant (DESIGN §5.3): a reservation holds at most the rights
        // this node had (checked above, per product over the summed lines).
        debug_assert!(
            lines.keys().all(|p| self.rights(*p, &r.location) >= 0),
            "invariant no-oversell: reservation {} left negative rights",
            r.reservation_id
        );
        let lines_json: Vec<serde_json::Value> = lines
            .iter()
            .map(|(p, q)| serde_json::json!({"product_id": p, "quantity": q}))
            .collect();
        let customer = self.pseudonym_of(r.customer_id.as_deref());
        let record = serde_json::json!({"reservation_id": r.reservation_id, "node": self.cfg.name, "location": r.location, "lines": lines_json, "fulfil_by": r.fulfil_by, "fulfil_by_tag": to.hex(), "expires_at_ms": expires_at_ms, "customer": customer, "occurred_at": r.occurred_at, "register_id": r.register_id, "staff_id": r.staff_id, "hold": {"actor": self.actor.hex(), "through": through}, "at_ms": now_ms});
        self.write_record(RecordKind::Reservation, &r.reservation_id, record, now_ms);
        for p in lines.keys() {
            self.touch_row(*p, &r.location);
        }
        Ok(Engine::reply(
            crate::ops::ReplyKind::Created,
            serde_json::json!({"reservation_id": r.reservation_id, "location": r.location, "fulfil_by": r.fulfil_by, "expires_at": r.expires_at, "status": "open", "lines": lines_json}),
        ))
    }

    /// The open reservation of this id that this node fulfils: (creating
    /// node, reservation). Two colliding open ones fulfilled here: 409.
    fn open_reservation_of_mine(
        &self,
        id: &str,
    ) -> Result<(String, crate::views::ReservationView), OpError> {
        let all: Vec<(&String, &crate::views::ReservationView)> = self
            .views
            .reservations
            .get(id)
            .into_iter()
            .flatten()
            .filter(|(_, v)| v.known)
            .collect();
        if all.is_empty() {
            return Err(OpError::NotFound(format!(
                "unknown reservation {id} (not synced here yet?)"
            )));
        }
        let mine: Vec<&(&String, &crate::views::ReservationView)> = all
            .iter()
            .filter(|(_, v)| self.fulfils_for(v.fulfil_by))
            .collect();
        let open: Vec<&&(&String, &crate::views::ReservationView)> =
            mine.iter().filter(|(_, v)| v.closed.is_none()).collect();
        match (mine.as_slice(), open.as_slice()) {
            ([], _) => {
                let name = all[0]
                    .1
                    .fulfil_by
                    .map(|t| self.views.name_of(t))
                    .unwrap_or_default();
                Err(OpError::NotOwner(format!(
                    "reservation {id} is fulfilled by node {name}, only it may act on it"
                )))
            }
            (_, [one]) if !self.hold_visible(one.1) => Err(OpError::NotFound(format!(
                "reservation {id}: its held units have not reached this node yet (not synced here yet?)"
            ))),
            (_, [one]) => Ok((one.0.clone(), one.1.clone())),
            (some, []) => Err(OpError::Conflict {
                code: "reservation_closed".into(),
                message: format!(
                    "reservation {id} is already {}",
                    some[0].1.closed.clone().unwrap_or_default()
                ),
            }),
            (_, many) => Err(OpError::Conflict {
                code: "id_collision".into(),
                message: format!(
                    "{} open reservations use the id {id} (made apart by {}); they cannot be told apart here",
                    many.len(),
                    many.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
                ),
            }),
        }
    }

    pub(crate) fn reservation_fulfil(
        &mut self,
        id: &str,
        sale_id: Option<String>,
        now_ms: u64,
    ) -> Result<OpReply, OpError> {
        let (creator, v) = self.open_reservation_of_mine(id)?;
        // The reserved units are this node's rights: the sale spends them.
        for (p, q) in &v.lines {
            if self.rights_raw(*p, &v.location) < *q as i64 {
                return Err(OpError::InsufficientStock(vec![ShortLine {
                    product_id: *p,
                    location: v.location.clone(),
                    requested: *q,
                    available: self.rights_raw(*p, &v.location).max(0),
                }]));
            }
        }
        for (p, q) in &v.lines {
            self.bump(*p, &v.location, LedgerField::Removed, *q)?;
        }
        let sale_id = sale_id.unwrap_or_else(|| format!("rsv-{id}"));
        let lines: Vec<serde_json::Value> = v
            .lines
            .iter()
            .map(|(p, q)| serde_json::json!({"product_id": p, "quantity": q}))
            .collect();
        let sale = serde_json::json!({"sale_id": sale_id, "node": self.cfg.name, "location": v.location, "lines": lines, "reservation_id": id, "total": 0, "at_ms": now_ms});
        self.write_record(RecordKind::Sale, &sale_id, sale, now_ms);
        self.close_reservation(id, &creator, &v, "fulfilled", now_ms)?;
        Ok(Engine::reply(
            crate::ops::ReplyKind::Created,
            serde_json::json!({"reservation_id": id, "status": "fulfilled", "sale_id": sale_id}),
        ))
    }

    pub(crate) fn reservation_close(
        &mut self,
        id: &str,
        status: &str,
        now_ms: u64,
    ) -> Result<OpReply, OpError> {
        let (creator, v) = self.open_reservation_of_mine(id)?;
        self.close_reservation(id, &creator, &v, status, now_ms)?;
        Ok(Engine::reply(
            crate::ops::ReplyKind::Created,
            serde_json::json!({"reservation_id": id, "status": status}),
        ))
    }

    fn close_reservation(
        &mut self,
        id: &str,
        creator: &str,
        v: &ReservationView,
        status: &str,
        now_ms: u64,
    ) -> Result<(), OpError> {
        // The hold ends with the close, in the ledger documents of its units.
        // An expiry releases only the lines whose hold this node sees (all of
        // them, but for a hold partly lost with a fork of its creator, see
        // `expire_reservations`): releasing units never held would make
        // stock available that is not there.
        // A line not released here is named in the record: if its hold
        // arrives after all (it was late, not lost), it is released then
        // (`release_late_holds`).
        let mut unreleased = Vec::new();
        if v.hold.is_some() {
            for (p, q) in &v.lines {
                if status == "expired" && !self.line_hold_visible(v, *p) {
                    tracing::warn!(reservation = %id, product = p, "expired without releasing a line whose hold has not arrived (lost with a fork of its creator, or late)");
                    unreleased.push(*p);
                    continue;
                }
                self.bump(*p, &v.location, LedgerField::Released, *q)?;
            }
        }
        // The close names the reservation's creator, so it closes exactly
        // one of two colliding reservations (each under its own key).
        let colliding = self.views.reservations.get(id).is_some_and(|m| m.len() > 1);
        let record_id = if colliding {
            crate::layout::part_id(id, &format!("@{creator}"))
        } else {
            id.to_string()
        };
        let mut record = serde_json::json!({"reservation_id": id, "creator": creator, "node": self.cfg.name, "status": status, "at_ms": now_ms});
        if !unreleased.is_empty() {
            record["unreleased"] = unreleased.into();
        }
        self.write_record(RecordKind::ReservationClose, &record_id, record, now_ms);
        Ok(())
    }

    /// Releases the lines of expired reservations fulfilled by this node
    /// whose hold had not arrived when they expired and has now: the hold
    /// was only late. Each release is its own all-or-nothing write: the
    /// released cell and a record naming the line
    /// (`rsc/<id>@<creator>~late<product>`), so that it happens once, even
    /// across restarts.
    fn release_late_holds(&mut self, now_ms: u64) {
        let mut due: Vec<(String, String, ReservationView, Vec<u64>)> = Vec::new();
        for (id, creator) in &self.views.late_holds {
            let Some(v) = self.views.reservations.get(id).and_then(|m| m.get(creator)) else {
                continue;
            };
            if !self.fulfils_for(v.fulfil_by) {
                continue;
            }
            let arrived: Vec<u64> = v
                .unreleased
                .difference(&v.released_late)
                .filter(|p| v.lines.contains_key(*p) && self.line_hold_visible(v, **p))
                .copied()
                .collect();
            if !arrived.is_empty() {
                due.push((id.clone(), creator.clone(), v.clone(), arrived));
            }
            if due.len() >= LATE_RELEASES_PER_BATCH_MAX {
                break;
            }
        }
        for (id, creator, v, arrived) in due {
            for p in arrived {
                let q = v.lines.get(&p).copied().unwrap_or(0);
                let done = self.atomically(|e| {
                    e.bump(p, &v.location, LedgerField::Released, q)?;
                    let record_id = crate::layout::part_id(&id, &format!("@{creator}~late{p}"));
                    let record = serde_json::json!({"reservation_id": id, "creator": creator, "node": e.cfg.name, "status": v.closed, "released_late": [p], "at_ms": now_ms});
                    e.write_record(RecordKind::ReservationClose, &record_id, record, now_ms);
                    e.touch_row(p, &v.location);
                    Ok(())
                });
                match done {
                    Ok(()) => {
                        tracing::info!(reservation = %id, product = p, "hold that arrived after the reservation expired released")
                    }
                    Err(e) => {
                        tracing::warn!(reservation = %id, product = p, error = ?e, "late hold not released")
                    }
                }
            }
        }
    }

    /// `GET /api/reservations/{id}`: the reservation (the one this node
    /// fulfils or made, else the first) plus `collisions`.
    pub fn reservation_json(&self, id: &str) -> Option<serde_json::Value> {
        let m = self.views.reservations.get(id)?;
        let one = |v: &crate::views::ReservationView| {
            let lines: Vec<serde_json::Value> = v
                .lines
                .iter()
                .map(|(p, q)| serde_json::json!({"product_id": p, "quantity": q}))
                .collect();
            serde_json::json!({
                "reservation_id": id, "location": v.location, "lines": lines,
                "fulfil_by": v.fulfil_by.map(|t| self.views.name_of(t)),
                "expires_at": crate::time::format_rfc3339_ms(v.expires_at_ms),
                "status": v.closed.clone().unwrap_or_else(|| "open".into()),
            })
        };
        let known: Vec<(&String, &crate::views::ReservationView)> =
            m.iter().filter(|(_, v)| v.known).collect();
        let primary = known
            .iter()
            .find(|(_, v)| self.fulfils_for(v.fulfil_by))
            .or_else(|| known.iter().find(|(n, _)| **n == self.cfg.name))
            .or_else(|| known.first())?;
        let mut out = one(primary.1);
        if known.len() > 1 {
            let others: Vec<serde_json::Value> = known
                .iter()
                .filter(|(n, _)| *n != primary.0)
                .map(|(_, v)| one(v))
                .collect();
            out["collisions"] = others.into();
        }
        Some(out)
    }

    /// Expires this node's open reservations whose time has come, by its own clock.
    pub fn expire_reservations(&mut self, now_ms: u64) -> usize {
        let top = String::from("\u{10ffff}");
        // A reservation whose hold has not arrived yet waits (it stays due),
        // unless its creator's history forked: the missing part of the hold
        // may have been lost with it for good (its record reached peers, the
        // ledger change of one of its products did not, and the restored
        // node no longer has it). It expires then, releasing the lines whose
        // hold is seen; the others never held anything here.
        let mut examined = 0u64;
        let mut due: Vec<(String, String, ReservationView)> = self
            .views
            .expiring
            .range(..=(now_ms, top.clone(), top))
            .inspect(|_| examined += 1)
            .filter_map(|(_, id, creator)| {
                let v = self.views.reservations.get(id)?.get(creator)?;
                (v.known
                    && v.closed.is_none()
                    && self.fulfils_for(v.fulfil_by)
                    && (self.hold_visible(v) || self.forked_node(creator)))
                .then(|| (id.clone(), creator.clone(), v.clone()))
            })
            .collect();
        self.stats.reservations_expiry_examined += examined;
        // The order of the writes (and so the change's bytes) is the ids'.
        due.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let mut n = 0;
        for (id, creator, v) in &due {
            // A release that would overflow its cell (not reachable with
            // quantities within limits) leaves the reservation open, and
            // none of its lines released.
            if let Err(e) =
                self.atomically(|e| e.close_reservation(id, creator, v, "expired", now_ms))
            {
                tracing::warn!(reservation = %id, error = ?e, "reservation not expired");
                continue;
            }
            n += 1;
        }
        self.release_late_holds(now_ms);
        n
    }

    /// Indexes reservation records, whichever arrives first.
    pub(crate) fn note_reservation(&mut self, kind: RecordKind, id: &str, v: &serde_json::Value) {
        // The id in the body: a close of colliding reservations has its own key.
        let id = v["reservation_id"].as_str().unwrap_or(id);
        let creator = match kind {
            RecordKind::Reservation => v["node"].as_str().unwrap_or("").to_string(),
            _ => match v["creator"].as_str() {
                Some(c) => c.to_string(),
                // A close written before closes named the creator: the one
                // open reservation of the id fulfilled by the closing node.
                None => {
                    let closer = v["node"].as_str().and_then(|n| self.views.tag_of(n));
                    let m = self.views.reservations.get(id);
                    m.and_then(|m| {
                        m.iter()
                            .find(|(_, r)| r.closed.is_none() && r.fulfil_by == closer)
                            .or_else(|| m.iter().next())
                            .map(|(c, _)| c.clone())
                    })
                    .unwrap_or_default()
                }
            },
        };
        let before = self
            .views
            .reservations
            .get(id)
            .and_then(|m| m.get(&creator))
            .cloned()
            .unwrap_or_default();
        let mut after = before.clone();
        match kind {
            RecordKind::Reservation => {
                after.known = true;
                after.location = v["location"].as_str().unwrap_or("").to_string();
                after.fulfil_by = v["fulfil_by_tag"].as_str().and_then(NodeTag::parse);
                after.expires_at_ms = v["expires_at_ms"].as_u64().unwrap_or(0);
                // Records come from peers: bounded before they count.
                after.lines = v["lines"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .take(crate::ops::LINES_MAX)
                    .map(|l| {
                        (
                            l["product_id"].as_u64().unwrap_or(0),
                            l["quantity"]
                                .as_u64()
                                .unwrap_or(0)
                                .min(crate::ids::QUANTITY_MAX),
                        )
                    })
                    .collect::<BTreeMap<u64, u64>>();
                let hold = &v["hold"];
                after.hold = ActorKey::parse(hold["actor"].as_str().unwrap_or("")).map(|a| {
                    let through = hold["through"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .take(crate::ops::LINES_MAX)
                        .map(|l| (l[0].as_u64().unwrap_or(0), l[1].as_u64().unwrap_or(0)))
                        .collect::<BTreeMap<u64, u64>>();
                    (a, through)
                });
            }
            RecordKind::ReservationClose => {
                if after.closed.is_none() {
                    after.closed = Some(v["status"].as_str().unwrap_or("closed").to_string());
                }
                // Records come from peers: bounded before they count.
                let products = |field: &str| {
                    v[field]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .take(crate::ops::LINES_MAX)
                        .filter_map(|p| p.as_u64())
                        .collect::<Vec<u64>>()
                };
                after.unreleased.extend(products("unreleased"));
                after.released_late.extend(products("released_late"));
            }
            _ => return,
        }
        let late = after.known
            && after.closed.is_some()
            && after
                .unreleased
                .difference(&after.released_late)
                .next()
                .is_some();
        let late_key = (id.to_string(), creator.clone());
        if late {
            self.views.late_holds.insert(late_key);
        } else {
            self.views.late_holds.remove(&late_key);
        }
        let held = |r: &crate::views::ReservationView| r.known && r.closed.is_none();
        if held(&before) {
            self.adjust_reserved(&before, -1);
            self.views
                .expiring
                .remove(&(before.expires_at_ms, id.to_string(), creator.clone()));
        }
        if held(&after) {
            self.adjust_reserved(&after, 1);
            self.views
                .expiring
                .insert((after.expires_at_ms, id.to_string(), creator.clone()));
        }
        self.views
            .reservations
            .entry(id.to_string())
            .or_default()
            .insert(creator, after);
    }

    fn adjust_reserved(&mut self, r: &crate::views::ReservationView, sign: i64) {
        let Some(tag) = r.fulfil_by else { return };
        if r.hold.is_some() {
            // Held by the ledger; the rows change with its cells.
            for p in r.lines.keys() {
                let loc = r.location.clone();
                self.touch_row(*p, &loc);
            }
            return;
        }
        for (p, q) in &r.lines {
            let key = (*p, r.location.clone(), tag);
            let e = self.views.reserved.entry(key.clone()).or_default();
            *e = e.saturating_add(sign.saturating_mul(*q as i64));
            if *e == 0 {
                self.views.reserved.remove(&key);
            }
            let loc = r.location.clone();
            self.touch_row(*p, &loc);
        }
    }
}
