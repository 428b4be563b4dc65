//! Clients (tills, the web shop's checkout): every request has a client id; a
//! client retries at the node it first used, with the same id and body, until
//! it gets a definitive answer. The first successful answer is what the client
//! was told: later replays must return the same.

use std::collections::BTreeMap;

use storemesh_node::api::outcome as http;
use storemesh_protocol::ops::{Op, OpError, OpReply, ReplyKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Sale,
    Return,
    Receipt,
    Count,
    Grant,
    CustomerPut,
    CustomerErase,
    Redeem,
    /// `POST /api/reservations` (the id is the reservation id).
    Reserve,
    /// `POST /api/reservations/{id}/fulfil` (the id is the sale id it writes).
    ReservationFulfil,
    /// `POST /api/reservations/{id}/cancel` (the id is the reservation id).
    ReservationCancel,
    /// `storemesh node retire --name NODE --successor NODE` (the id is the node).
    Retire,
    /// `POST /api/counts/{id}/lines` (the id is the count id; each page is
    /// its own record, so no record key is known in advance).
    CountPage,
    /// `POST /api/counts/{id}/finish` (the id is the count id).
    CountFinish,
    /// `POST /api/transfers` (the id is the transfer id; ids may collide
    /// between nodes on purpose).
    Transfer,
    /// `POST /api/transfers/{id}/receive` (a receipt of colliding ids gets
    /// its own key, so no record key is known in advance).
    TransferReceive,
    /// `storemesh import counts` (the id is the import id; two nodes import
    /// the same file at a location no node owns).
    ImportCounts,
    /// `POST /api/locations` (the id is the location).
    DeclareLocation,
}

impl Kind {
    /// Record kind prefix the operation writes (`None`: it writes no record).
    pub fn record_prefix(self) -> Option<&'static str> {
        match self {
            Kind::Sale => Some("sale"),
            Kind::Return => Some("ret"),
            Kind::Receipt => Some("rcv"),
            Kind::Count | Kind::CountFinish => Some("cnt"),
            Kind::Grant => Some("grt"),
            Kind::Reserve => Some("rsv"),
            Kind::ReservationFulfil => Some("sale"),
            Kind::ReservationCancel => Some("rsc"),
            Kind::Transfer => Some("trf"),
            Kind::ImportCounts => Some("imp"),
            Kind::TransferReceive
            | Kind::CustomerPut
            | Kind::CustomerErase
            | Kind::Redeem
            | Kind::Retire
            | Kind::CountPage
            | Kind::DeclareLocation => None,
        }
    }
}

pub struct Request {
    pub rid: usize,
    pub node: usize,
    pub kind: Kind,
    pub op: Op,
    /// Idempotency key (`sale/<id>` …); `None` for naturally idempotent ops.
    pub key: Option<String>,
    /// Client id of the record (`<prefix>/<id>` is the record key).
    pub id: String,
    /// The node's restore epoch when the request was made.
    pub epoch: u32,
    /// A probe that reuses the id of request `of` with another body.
    pub conflict_probe_of: Option<usize>,
    pub first_ok: Option<OpReply>,
    pub acked_at_ms: Option<u64>,
    pub final_err: Option<String>,
    /// Deliveries handed to the node and not answered yet.
    pub in_flight: u32,
    pub retry_at_ms: Option<u64>,
    pub abandoned: bool,
    pub attempts: u32,
    /// Times the node refused the connection (it was down).
    pub refused: u32,
    /// Records documents any successful execution wrote to.
    pub rec_docs: Vec<String>,
    /// Acknowledged, but its node's disk was later replaced by an older image:
    /// the idempotency record may legitimately be gone.
    pub idem_lost: bool,
    /// Acknowledged, but the history holding it was discarded before any other
    /// node had it (restored backup, stopped clone): an operator lost it.
    pub lost_with_history: bool,
}

impl Request {
    pub fn outstanding(&self) -> bool {
        !self.abandoned && (self.in_flight > 0 || self.retry_at_ms.is_some())
    }
    pub fn record_key(&self) -> Option<String> {
        // The close of a reservation id from the shared pool (`books.rs`)
        // has its own key when the id collided (`<id>@<creator>`): not
        // known in advance.
        if self.kind == Kind::ReservationCancel && self.id.starts_with("rc-") {
            return None;
        }
        self.kind
            .record_prefix()
            .map(|p| format!("{p}/{}", self.id))
    }
}

/// What a reply means for the checkers.
pub enum ReplyCheck {
    Fine,
    /// Exactly-once broken: a replay answered differently from the first answer.
    Mismatch(String),
}

#[derive(Default)]
pub struct Clients {
    pub reqs: Vec<Request>,
    /// Retries due: (time, rid).
    pub retries: BTreeMap<(u64, usize), ()>,
}

impl Clients {
    pub fn add(&mut self, mut r: Request) -> usize {
        r.rid = self.reqs.len();
        let rid = r.rid;
        self.reqs.push(r);
        rid
    }

    pub fn schedule_retry(&mut self, rid: usize, at_ms: u64) {
        let r = &mut self.reqs[rid];
        if r.abandoned || r.first_ok.is_some() || r.final_err.is_some() {
            return;
        }
        if let Some(old) = r.retry_at_ms.take() {
            self.retries.remove(&(old, rid));
        }
        r.retry_at_ms = Some(at_ms);
        self.retries.insert((at_ms, rid), ());
    }

    pub fn due(&mut self, now_ms: u64) -> Vec<usize> {
        let mut out = Vec::new();
        while let Some((&(at, rid), _)) = self.retries.iter().next() {
            if at > now_ms {
                break;
            }
            self.retries.remove(&(at, rid));
            self.reqs[rid].retry_at_ms = None;
            out.push(rid);
        }
        out
    }

    pub fn abandon(&mut self, rid: usize) {
        let r = &mut self.reqs[rid];
        r.abandoned = true;
        if let Some(at) = r.retry_at_ms.take() {
            self.retries.remove(&(at, rid));
        }
    }

    /// Applies one answer to one delivery. `retry_at_ms` is when a 503 is retried.
    pub fn on_reply(
        &mut self,
        rid: usize,
        result: &Result<OpReply, OpError>,
        now_ms: u64,
        retry_at_ms: u64,
    ) -> ReplyCheck {
        let r = &mut self.reqs[rid];
        r.in_flight = r.in_flight.saturating_sub(1);
        match result {
            Ok(reply) => {
                if r.key.is_none() {
                    // Naturally idempotent: every execution is its own answer.
                    if r.first_ok.is_none() {
                        r.first_ok = Some(reply.clone());
                        r.acked_at_ms = Some(now_ms);
                    }
                    return ReplyCheck::Fine;
                }
                match &r.first_ok {
                    None => {
                        r.first_ok = Some(reply.clone());
                        r.acked_at_ms = Some(now_ms);
                        r.final_err = None;
                        if let Some(at) = r.retry_at_ms.take() {
                            self.retries.remove(&(at, rid));
                        }
                        ReplyCheck::Fine
                    }
                    Some(first) => {
                        let same = first.body == reply.body
                            && (reply.kind == ReplyKind::Ok || reply.kind == first.kind);
                        // After a restore the node may legitimately not know it any more.
                        if same || r.idem_lost {
                            ReplyCheck::Fine
                        } else {
                            ReplyCheck::Mismatch(format!(
                                "replay of {} at node {} answered {} {} but the first answer was {} {}",
                                r.key.as_deref().unwrap_or("?"),
                                r.node,
                                http::reply_status(reply.kind).as_u16(),
                                reply.body,
                                http::reply_status(first.kind).as_u16(),
                                first.body
                            ))
                        }
                    }
                }
            }
            Err(e) => {
                if matches!(e, OpError::Unavailable(_)) {
                    if r.first_ok.is_none() && !r.abandoned {
                        let rid = r.rid;
                        self.schedule_retry(rid, retry_at_ms);
                    }
                    return ReplyCheck::Fine;
                }
                if r.first_ok.is_some() && r.key.is_some() && !r.idem_lost {
                    return ReplyCheck::Mismatch(format!(
                        "replay of {} at node {} answered {} ({}) but the first answer was a success",
                        r.key.as_deref().unwrap_or("?"),
                        r.node,
                        http::error_code(e),
                        http::error_body(e)
                    ));
                }
                if r.first_ok.is_none() {
                    r.final_err = Some(http::error_code(e).to_string());
                    if let Some(at) = r.retry_at_ms.take() {
                        self.retries.remove(&(at, rid));
                    }
                }
                ReplyCheck::Fine
            }
        }
    }
}
