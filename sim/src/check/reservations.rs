//! The final reservations check: who closes a reservation, how often, when.

use std::collections::BTreeMap;

use automerge::{ReadDoc, ROOT};
use storemesh_protocol::engine::Engine;
use storemesh_protocol::ids::{ActorKey, NodeTag};
use storemesh_protocol::layout::{parse_record_key, RecordKind};

use crate::invariant::Violation;
use crate::world::World;

impl World {
    /// Reservations: only the fulfilling node (or, once it is retired, its
    /// successor) closes one, at most once, and it expires one only when its
    /// own clock has reached the expiry time.
    pub(super) fn check_reservations(&self, e: &Engine) -> Result<(), Violation> {
        // Per (reservation id, creating node): two nodes apart may have used
        // one id (each closed under its own key, naming its creator).
        let mut opened: BTreeMap<(String, String), (Option<NodeTag>, u64)> = BTreeMap::new();
        // (reservation id, creator) → closes: (closing writer, status, at).
        type Closes = BTreeMap<(String, String), Vec<(NodeTag, String, u64)>>;
        let mut closes: Closes = BTreeMap::new();
        // Late releases: (reservation id, creator) and their writer.
        let mut late: Vec<((String, String), NodeTag)> = Vec::new();
        for (id, _) in e.documents() {
            if !id.starts_with("rec/") {
                continue;
            }
            let Some(doc) = e.doc(&id) else { continue };
            for key in doc.keys(ROOT) {
                let Ok((kind, rid)) = parse_record_key(&key) else {
                    continue;
                };
                if !matches!(kind, RecordKind::Reservation | RecordKind::ReservationClose) {
                    continue;
                }
                for (value, exid) in doc.get_all(ROOT, key.as_str()).unwrap_or_default() {
                    let writer = match exid {
                        automerge::ObjId::Id(_, a, _) => ActorKey::from_bytes(a.to_bytes()),
                        automerge::ObjId::Root => None,
                    };
                    let (Some(writer), Some(json)) = (
                        writer,
                        value
                            .as_str()
                            .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()),
                    ) else {
                        continue;
                    };
                    let rid = json["reservation_id"].as_str().unwrap_or(rid).to_string();
                    if kind == RecordKind::Reservation {
                        let creator = json["node"].as_str().unwrap_or("").to_string();
                        opened.insert(
                            (rid, creator),
                            (
                                json["fulfil_by_tag"].as_str().and_then(NodeTag::parse),
                                json["expires_at_ms"].as_u64().unwrap_or(0),
                            ),
                        );
                    } else {
                        // The release of a hold that arrived after the
                        // reservation closed (`rsc/<id>@<creator>~late<p>`)
                        // is not another close: checked as its writer below.
                        if json.get("released_late").is_some() {
                            let creator = json["creator"].as_str().unwrap_or("").to_string();
                            late.push(((rid, creator), writer.tag()));
                            continue;
                        }
                        // A close from before closes named the creator: the
                        // one reservation of the id.
                        let creator = match json["creator"].as_str() {
                            Some(c) => c.to_string(),
                            None => opened
                                .keys()
                                .find(|(r, _)| *r == rid)
                                .map(|(_, c)| c.clone())
                                .unwrap_or_default(),
                        };
                        closes.entry((rid, creator)).or_default().push((
                            writer.tag(),
                            json["status"].as_str().unwrap_or("").to_string(),
                            json["at_ms"].as_u64().unwrap_or(0),
                        ));
                    }
                }
            }
        }
        let forked = |t: &NodeTag| {
            self.check
                .names
                .get(t)
                .is_some_and(|n| self.check.forked.contains(n))
        };
        // Units are not held forever: a reservation past its expiry by the
        // clock of the node that acts for it (its fulfilling node, or that
        // node's successor once retired) was expired — that node runs at
        // least once per anti-entropy interval.
        let margin = self.setup.anti_entropy_ms + 2 * self.setup.tick_ms;
        for (rid, (by, expires)) in &opened {
            if closes.contains_key(rid) {
                continue;
            }
            let Some(by) = by else { continue };
            let holder = e.views.resolve(*by);
            let Some(i) = self
                .members()
                .into_iter()
                .find(|i| !self.nodes[*i].is_clone && self.nodes[*i].cfg.node_id.tag() == holder)
            else {
                continue;
            };
            let now = self.clock(i);
            if now >= expires.saturating_add(margin) {
                return Err(self.violation(
                    "reservations",
                    format!(
                        "reservation {rid:?} (fulfilled by {}) expired at {expires} but is still open at {now} by the clock of {}, which acts for it: its units stay held",
                        self.check.name_of(*by),
                        self.nodes[i].name
                    ),
                ));
            }
        }
        for (rid, w) in &late {
            let by = opened.get(rid).and_then(|(by, _)| *by);
            if !closes.contains_key(rid)
                || by.is_none_or(|by| e.views.resolve(*w) != e.views.resolve(by))
            {
                return Err(self.violation(
                    "reservations",
                    format!(
                        "reservation {rid:?}: a late hold was released by {} without the reservation closed by its fulfilling node",
                        self.check.names.get(w).cloned().unwrap_or_else(|| w.hex())
                    ),
                ));
            }
        }
        for (rid, cs) in &closes {
            let Some((Some(by), expires)) = opened.get(rid) else {
                return Err(self.violation(
                    "reservations",
                    format!("reservation {rid:?} was closed but its reservation record is missing"),
                ));
            };
            for (w, status, at) in cs {
                if e.views.resolve(*w) != e.views.resolve(*by) {
                    return Err(self.violation(
                        "reservations",
                        format!(
                            "reservation {rid:?} was closed ({status}) by {}, not by its fulfilling node {}",
                            self.check.names.get(w).cloned().unwrap_or_else(|| w.hex()),
                            self.check.names.get(by).cloned().unwrap_or_else(|| by.hex())
                        ),
                    ));
                }
                if status == "expired" && at < expires {
                    return Err(self.violation(
                        "reservations",
                        format!("reservation {rid:?} expired at {at} by its node's clock, before its expiry time {expires}"),
                    ));
                }
            }
            if cs.len() > 1 && !cs.iter().all(|(w, _, _)| forked(w)) {
                return Err(self.violation(
                    "reservations",
                    format!("reservation {rid:?} was closed {} times: {cs:?}", cs.len()),
                ));
            }
        }
        Ok(())
    }
}
