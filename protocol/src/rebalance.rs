//! Rebalancing: a node that lacks sell-rights asks its peers for a grant and
//! parks the sale until the grant arrives or its deadline passes.
//!
//! A request travels ahead of bulk sync (it is a small frame queued before any
//! document message of the same batch), is forwarded by nodes that cannot help
//! (bounded by a hop count, de-duplicated by request id), and is answered with
//! an ordinary grant — a durable, idempotent ledger write by the giver out of
//! its own rights, strict like every grant, so two requesters can never receive
//! the same rights. The grant reaches the requester as a change of the ledger
//! document that holds both the grant and the sale that will spend it.

use std::collections::{HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::ops::{Op, OpError, OpReply};

/// Operations parked waiting for rights, at most (beyond this they are refused at once).
pub const PARKED_MAX: usize = 256;
/// Hops a request may travel (requester → hub → holder is 2).
pub const REQUEST_HOPS_MAX: u8 = 3;
/// Request ids remembered for de-duplication.
pub const SEEN_REQUESTS_MAX: usize = 4096;
/// A new request for the same (product, location) is sent at most this often.
pub const REQUEST_INTERVAL_MS: u64 = 50;

/// A request for sell-rights, flooded to peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RightsRequest {
    pub req_id: u64,
    /// Node id (hex) of the node that needs the rights.
    pub origin: String,
    pub product_id: u64,
    pub location: String,
    pub quantity: u64,
    pub hops_left: u8,
}

pub(crate) struct Parked {
    pub(crate) ticket: u64,
    pub(crate) op: Op,
    /// When it was parked: a clock that reads earlier than this stepped back,
    /// and the deadline can no longer be trusted.
    pub(crate) parked_at_ms: u64,
    pub(crate) deadline_ms: u64,
}

#[derive(Default)]
pub(crate) struct Rebalancer {
    pub(crate) parked: Vec<Parked>,
    pub(crate) next_ticket: u64,
    pub(crate) next_req_id: u64,
    pub(crate) seen: HashSet<(String, u64)>,
    pub(crate) seen_order: VecDeque<(String, u64)>,
    pub(crate) last_request: HashMap<(u64, String), u64>,
    pub grants_given: u64,
    pub requests_sent: u64,
    pub allocation_grants: u64,
}

impl Rebalancer {
    pub(crate) fn starting_at(first_id: u64) -> Rebalancer {
        Rebalancer {
            next_req_id: first_id,
            ..Default::default()
        }
    }
}

/// The outcome of submitting an operation.
#[derive(Debug)]
pub enum Submit {
    Done(Result<OpReply, OpError>),
    /// Waiting for rights; the answer comes from `poll_parked` with this ticket.
    Parked(u64),
}

/// Keep a share of the own location's stock of every product allocated to a
/// named node (e.g. 20 % of each product, at most 5 units, to the web shop).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationRule {
    pub to: String,
    pub share_percent: u32,
    pub max_units: u64,
}
