//! Client requests at the nodes: a delivery handed to a node's channel, and
//! an answer checked and counted.

use storemesh_node::api::outcome as http;
use storemesh_protocol::ops::{OpError, OpReply};

use super::{Cmd, World, RETRY_MS};
use crate::client::ReplyCheck;
use crate::invariant::Violation;
use crate::options::FaultKind;

impl World {
    /// Hands one delivery of a request to its node (or schedules a retry when
    /// the node is down: the connection is refused).
    pub fn submit(&mut self, rid: usize) {
        let node = self.clients.reqs[rid].node;
        if self.clients.reqs[rid].abandoned {
            return;
        }
        if self.nodes[node].retired {
            self.clients.abandon(rid);
            return;
        }
        if self.nodes[node].life.is_none() {
            // Connection refused: back off (exponentially, up to ~2 minutes).
            let r = &mut self.clients.reqs[rid];
            r.refused += 1;
            let shift = r.refused.min(6);
            let at = self.now_ms + (self.rand_in(RETRY_MS) << shift);
            self.clients.schedule_retry(rid, at);
            return;
        }
        let r = &mut self.clients.reqs[rid];
        if r.attempts > 0 && r.first_ok.is_none() && r.final_err.is_none() {
            self.fired
                .entry(FaultKind::ClientRetry)
                .and_modify(|n| *n += 1)
                .or_insert(1);
        }
        let r = &mut self.clients.reqs[rid];
        r.in_flight += 1;
        r.attempts += 1;
        self.nodes[node].cmds.push_back(Cmd::Op(rid));
    }

    pub(super) fn answer(
        &mut self,
        rid: usize,
        result: Result<OpReply, OpError>,
    ) -> Result<(), Violation> {
        let item = match &result {
            Ok(r) => format!(
                "reply {rid} {} {}",
                http::reply_status(r.kind).as_u16(),
                r.body
            ),
            Err(e) => format!("reply {rid} {}", http::error_body(e)),
        };
        self.trace(item.as_bytes());
        let node = self.clients.reqs[rid].node;
        if let Some(orig) = self.clients.reqs[rid].conflict_probe_of {
            let r = &mut self.clients.reqs[rid];
            r.in_flight = r.in_flight.saturating_sub(1);
            let o = &self.clients.reqs[orig];
            let must_conflict = o.first_ok.is_some() && !o.idem_lost;
            match &result {
                Err(OpError::Unavailable(_)) => {
                    let at = self.now_ms + self.rand_in(RETRY_MS);
                    self.clients.schedule_retry(rid, at);
                }
                Err(e @ OpError::IdConflict(_)) => {
                    self.clients.reqs[rid].final_err = Some(http::error_code(e).into());
                }
                other if must_conflict => {
                    let shown = match other {
                        Ok(r) => format!("{} {}", http::reply_status(r.kind).as_u16(), r.body),
                        Err(e) => http::error_body(e).to_string(),
                    };
                    return Err(self.violation(
                        "exactly-once",
                        format!(
                            "request reusing id {} with another body at node {} was answered {shown}, not 409 id_conflict",
                            o.key.as_deref().unwrap_or("?"),
                            self.nodes[node].name
                        ),
                    ));
                }
                _ => self.clients.reqs[rid].final_err = Some("probe".into()),
            }
            return Ok(());
        }
        let kind = self.clients.reqs[rid].kind;
        let was_new = self.clients.reqs[rid].first_ok.is_none();
        let retry_at = self.now_ms + self.rand_in(RETRY_MS);
        if let ReplyCheck::Mismatch(m) = self.clients.on_reply(rid, &result, self.now_ms, retry_at)
        {
            return Err(self.violation("exactly-once", m));
        }
        if kind == crate::client::Kind::Sale && was_new {
            match &result {
                Ok(_) => {
                    self.nodes[node].stats.sales_ok += 1;
                    let units: u64 = match &self.clients.reqs[rid].op {
                        storemesh_protocol::ops::Op::Sale(s) => {
                            s.lines.iter().map(|l| l.quantity).sum()
                        }
                        _ => 0,
                    };
                    self.nodes[node].stats.units_sold += units;
                }
                Err(e @ OpError::InsufficientStock(_)) => {
                    self.nodes[node].stats.sales_refused += 1;
                    if self.refused_with_stock(rid, e, false) {
                        self.nodes[node].stats.refused_stock_anywhere += 1;
                        if self.refused_with_stock(rid, e, true) {
                            self.nodes[node].stats.refused_with_stock += 1;
                        }
                    }
                }
                Err(_) => {}
            }
        }
        Ok(())
    }
}
