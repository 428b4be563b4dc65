//! Client operations built the way the HTTP API builds them: from JSON bodies,
//! deserialized into the protocol's request types (so the simulator keeps
//! working when optional fields are added to them).

use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::{json, Value};
use storemesh_protocol::ops::{CountScope, CustomerUpdate, Op};
use storemesh_protocol::time::format_rfc3339_ms;

use crate::client::{Kind, Request};
use crate::world::World;

fn parse<T: serde::de::DeserializeOwned>(what: &str, v: Value) -> T {
    match serde_json::from_value(v) {
        Ok(t) => t,
        // The simulator built this body itself: failing here is a simulator bug.
        Err(e) => panic!("the simulator built an invalid {what} body: {e}"),
    }
}

pub fn sale(body: Value) -> Op {
    Op::Sale(parse("sale", body))
}
pub fn receipt(body: Value) -> Op {
    Op::Receipt(parse("receipt", body))
}
pub fn ret(body: Value) -> Op {
    Op::Return(parse("return", body))
}
pub fn count(body: Value) -> Op {
    Op::Count(parse("count", body))
}
pub fn grant(body: Value) -> Op {
    Op::Grant(parse("grant", body))
}

/// A transfer a node may receive: (id, from, lines as (product, quantity)).
type Arriving = (String, String, Vec<(u64, u64)>);

/// The location no node owns that the workload imports opening balances at.
pub const OWNERLESS: &str = "wh";
/// The counts of the warehouse's opening file, per row: on hand 20, 25, 30.
pub fn ownerless_counts() -> [u64; 3] {
    [20, 25, 30]
}

/// The catalogue and people a workload draws from.
pub struct Catalogue {
    pub products: Vec<u64>,
    pub customers: Vec<String>,
    pub next_id: u64,
    /// node → its open count session: (count id, pages sent).
    pub sessions: std::collections::BTreeMap<usize, (String, u32)>,
}

impl Catalogue {
    pub fn fresh_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-{}", self.next_id)
    }
}

/// Builds a request for node `node` (the caller submits it).
pub fn new_request(w: &World, node: usize, kind: Kind, op: Op, id: String) -> Request {
    let key = op.client_key();
    Request {
        rid: 0,
        node,
        kind,
        op,
        key,
        id,
        epoch: w.nodes[node].epoch,
        conflict_probe_of: None,
        first_ok: None,
        acked_at_ms: None,
        final_err: None,
        in_flight: 0,
        retry_at_ms: None,
        abandoned: false,
        attempts: 0,
        refused: 0,
        rec_docs: Vec::new(),
        idem_lost: false,
        lost_with_history: false,
    }
}

impl World {
    /// Rights node `i` holds on (product, location) in its current view.
    pub fn peek_rights(&self, i: usize, p: u64, loc: &str) -> i64 {
        self.nodes[i]
            .life
            .as_ref()
            .map(|l| l.engine().rights(p, loc))
            .unwrap_or(0)
    }

    pub fn peek_on_hand(&self, i: usize, p: u64, loc: &str) -> i64 {
        self.nodes[i]
            .life
            .as_ref()
            .and_then(|l| l.engine().views.entry(p, loc).map(|e| e.on_hand()))
            .unwrap_or(0)
    }

    pub fn submit_new(&mut self, r: Request) -> usize {
        if let Op::Sale(s) = &r.op {
            if s.override_rights {
                self.check.overrides.insert(s.sale_id.clone());
            }
        }
        let rid = self.clients.add(r);
        self.submit(rid);
        rid
    }

    /// A random client operation at node `i`.
    pub fn random_op(&mut self, cat: &mut Catalogue, i: usize) -> (Kind, Op, String) {
        let own = self.nodes[i].cfg.location.clone();
        let others: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| !n.is_clone && n.cfg.name != self.nodes[i].cfg.name)
            .map(|n| n.name.clone())
            .collect();
        // Nodes a client may name as the receiver of rights: not one that is
        // retired or being retired (its location still holds stock).
        let targets: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, n)| {
                !n.is_clone
                    && !n.retired
                    && self.draining != Some(*j)
                    && n.cfg.name != self.nodes[i].cfg.name
            })
            .map(|(_, n)| n.name.clone())
            .collect();
        let roll = self.rng.gen_range(0..100);
        match roll {
            45..=47 if self.rng.gen_bool(0.7) => self.books_op(cat, i, &own),
            0..=47 if self.rng.gen_bool(0.12) => self.random_reservation_op(cat, i, &own, &targets),
            0..=47 => {
                let id = cat.fresh_id("s");
                (Kind::Sale, self.random_sale(cat, i, &own, &others, &id), id)
            }
            48..=59 => {
                let id = cat.fresh_id("r");
                let loc = if self.rng.gen_bool(0.9) || others.is_empty() {
                    own.clone()
                } else {
                    others[self.rng.gen_range(0..others.len())].clone()
                };
                let n = self.rng.gen_range(1..=2);
                let lines: Vec<Value> = (0..n)
                    .map(|_| {
                        let p = cat.products[self.rng.gen_range(0..cat.products.len())];
                        json!({"product_id": p, "quantity": self.rng.gen_range(1..=15)})
                    })
                    .collect();
                (
                    Kind::Receipt,
                    receipt(json!({"receipt_id": id, "location": loc, "lines": lines})),
                    id,
                )
            }
            60..=64 => {
                let id = cat.fresh_id("t");
                let p = cat.products[self.rng.gen_range(0..cat.products.len())];
                let disposition = if self.rng.gen_bool(0.7) {
                    "restock"
                } else {
                    "damaged"
                };
                let mut body = json!({"return_id": id, "location": own,
                    "lines": [{"product_id": p, "quantity": self.rng.gen_range(1..=2), "disposition": disposition}]});
                // Sometimes against a sale this node made (the over-return check).
                let sold: Vec<(String, u64)> = self
                    .clients
                    .reqs
                    .iter()
                    .filter(|r| r.node == i && r.kind == Kind::Sale && r.first_ok.is_some())
                    .filter_map(|r| match &r.op {
                        Op::Sale(s) => s.lines.first().map(|l| (s.sale_id.clone(), l.product_id)),
                        _ => None,
                    })
                    .collect();
                if !sold.is_empty() && self.rng.gen_bool(0.3) {
                    let (sid, sp) = sold[self.rng.gen_range(0..sold.len())].clone();
                    body["original_sale_id"] = json!(sid);
                    body["lines"][0]["product_id"] = json!(sp);
                    body["lines"][0]["quantity"] = json!(1);
                }
                (Kind::Return, ret(body), id)
            }
            65..=69 if self.rng.gen_bool(0.4) => self.random_count_session_op(cat, i, &own),
            65..=69 => {
                let id = cat.fresh_id("c");
                let loc = if self.rng.gen_bool(0.92) || others.is_empty() {
                    own.clone()
                } else {
                    others[0].clone()
                };
                let mut ps = cat.products.clone();
                ps.shuffle(&mut self.rng);
                let n = self.rng.gen_range(1..=2).min(ps.len());
                let lines: Vec<Value> = ps[..n]
                    .iter()
                    .map(|p| {
                        let seen = self.peek_on_hand(i, *p, &loc);
                        let counted = (seen + self.rng.gen_range(-3..=1)).max(0);
                        json!({"product_id": p, "counted": counted})
                    })
                    .collect();
                let mut body = json!({"count_id": id, "location": loc, "lines": lines});
                if self.rng.gen_bool(0.5) {
                    let back = self.rng.gen_range(0..20_000);
                    let at = self.clock(i).saturating_sub(back);
                    body["counted_at"] = json!(format_rfc3339_ms(at));
                }
                (Kind::Count, count(body), id)
            }
            70..=79 => {
                let id = cat.fresh_id("g");
                let p = cat.products[self.rng.gen_range(0..cat.products.len())];
                let to = if targets.is_empty() {
                    own.clone()
                } else {
                    targets[self.rng.gen_range(0..targets.len())].clone()
                };
                let r = self.peek_rights(i, p, &own).max(0) as u64;
                let q = if self.rng.gen_bool(0.15) {
                    r + 1
                } else {
                    self.rng.gen_range(1..=(r / 2).max(1))
                };
                (
                    Kind::Grant,
                    grant(
                        json!({"grant_id": id, "product_id": p, "location": own, "to": to, "quantity": q}),
                    ),
                    id,
                )
            }
            80..=89 => {
                let c = cat.customers[self.rng.gen_range(0..cat.customers.len())].clone();
                let mut u = CustomerUpdate::default();
                if self.rng.gen_bool(0.6) {
                    u.name = Some(format!("Customer {} v{}", c, self.rng.gen_range(0..5)));
                }
                if self.rng.gen_bool(0.5) {
                    u.email = Some(format!("{c}-{}@example.com", self.rng.gen_range(0..3)));
                }
                if self.rng.gen_bool(0.3) {
                    u.phone = Some(format!("+4420{:07}", self.rng.gen_range(0..10_000_000)));
                }
                if self.rng.gen_bool(0.3) {
                    u.marketing_consent = Some(self.rng.gen_bool(0.5));
                }
                if u == CustomerUpdate::default() {
                    u.tags = Some(vec!["vip".into()]);
                }
                (
                    Kind::CustomerPut,
                    Op::CustomerPut {
                        customer_id: c.clone(),
                        update: u,
                    },
                    c,
                )
            }
            90..=91 => {
                let c = cat.customers[self.rng.gen_range(0..cat.customers.len())].clone();
                (
                    Kind::CustomerErase,
                    Op::CustomerErase {
                        customer_id: c.clone(),
                    },
                    c,
                )
            }
            92..=95 => self.random_transfer_op(cat, i, &own, &targets),
            96 if self.rng.gen_bool(0.3) => self.ownerless_import_op(),
            97 | 98 => self.books_op(cat, i, &own),
            _ => {
                let id = cat.fresh_id("p");
                let c = cat.customers[self.rng.gen_range(0..cat.customers.len())].clone();
                let redeem = parse(
                    "redeem",
                    json!({"redeem_id": id, "points": self.rng.gen_range(1..=5)}),
                );
                (
                    Kind::Redeem,
                    Op::Redeem {
                        customer_id: c,
                        redeem,
                    },
                    id,
                )
            }
        }
    }

    /// Whether node `i` acts for reservations fulfilled by `fulfil_by`: its
    /// own, and (once retired) those of the nodes it succeeds.
    fn fulfils_for(&self, i: usize, fulfil_by: &str) -> bool {
        if fulfil_by == self.nodes[i].name {
            return true;
        }
        let me = self.nodes[i].cfg.node_id.tag();
        self.nodes.iter().any(|n| {
            !n.is_clone
                && n.retired
                && n.name == fulfil_by
                && self.check.resolve(n.cfg.node_id.tag()) == me
        })
    }

    /// Buy online, pick up in store: a new reservation for some node to
    /// fulfil, or — at the fulfilling node — fulfilment or cancellation of
    /// one (expiry happens by that node's own clock, in the request path).
    fn random_reservation_op(
        &mut self,
        cat: &mut Catalogue,
        i: usize,
        own: &str,
        others: &[String],
    ) -> (Kind, Op, String) {
        let me = self.nodes[i].name.clone();
        // One closing request per reservation (a second one would be a new
        // client request reusing the first one's idempotency key).
        let closing: std::collections::BTreeSet<&str> = self
            .clients
            .reqs
            .iter()
            .filter_map(|r| match &r.op {
                Op::ReservationFulfil { reservation_id, .. }
                | Op::ReservationCancel { reservation_id } => Some(reservation_id.as_str()),
                _ => None,
            })
            .collect();
        let mine: Vec<String> = self
            .clients
            .reqs
            .iter()
            .filter(|r| r.kind == Kind::Reserve && r.first_ok.is_some())
            .filter_map(|r| match &r.op {
                Op::Reserve(x)
                    if self.fulfils_for(i, &x.fulfil_by)
                        && !closing.contains(x.reservation_id.as_str()) =>
                {
                    Some(x.reservation_id.clone())
                }
                _ => None,
            })
            .collect();
        if !mine.is_empty() && self.rng.gen_bool(0.5) {
            let id = mine[self.rng.gen_range(0..mine.len())].clone();
            if self.rng.gen_bool(0.7) {
                let sale_id = cat.fresh_id("rs");
                let op = Op::ReservationFulfil {
                    reservation_id: id,
                    sale_id: Some(sale_id.clone()),
                };
                return (Kind::ReservationFulfil, op, sale_id);
            }
            return (
                Kind::ReservationCancel,
                Op::ReservationCancel {
                    reservation_id: id.clone(),
                },
                id,
            );
        }
        let id = cat.fresh_id("rv");
        let loc = if self.rng.gen_bool(0.8) || others.is_empty() {
            own.to_string()
        } else {
            others[self.rng.gen_range(0..others.len())].clone()
        };
        let fulfil_by = if self.rng.gen_bool(0.3) || others.is_empty() {
            me
        } else {
            others[self.rng.gen_range(0..others.len())].clone()
        };
        // One or two products: a reservation across ledger documents (buckets).
        let mut ps = cat.products.clone();
        ps.shuffle(&mut self.rng);
        let n = self.rng.gen_range(1..=2).min(ps.len());
        let lines: Vec<Value> = ps[..n]
            .iter()
            .map(|p| json!({"product_id": p, "quantity": self.rng.gen_range(1..=3)}))
            .collect();
        // Expiry is judged by the fulfilling node's clock, which may be hours
        // off this node's (clock faults): some expire at once, some never.
        let expires = self.clock(i) + self.rng.gen_range(500..60_000);
        let body = json!({"reservation_id": id, "location": loc, "fulfil_by": fulfil_by,
            "expires_at": format_rfc3339_ms(expires),
            "lines": lines});
        let mut body = body;
        if self.rng.gen_bool(0.3) {
            body["customer_id"] = json!(cat.customers[self.rng.gen_range(0..cat.customers.len())]);
        }
        (Kind::Reserve, Op::Reserve(parse("reservation", body)), id)
    }

    /// A transfer from node `i`'s location to another node's, with an id
    /// from a small pool shared by every node now and then (two nodes apart
    /// create the same id: both must stay exact), or — at the destination —
    /// the receipt of one, sometimes short (shrinkage).
    fn random_transfer_op(
        &mut self,
        cat: &mut Catalogue,
        i: usize,
        own: &str,
        targets: &[String],
    ) -> (Kind, Op, String) {
        let receiving: std::collections::BTreeSet<(String, String)> = self
            .clients
            .reqs
            .iter()
            .filter(|r| r.node == i)
            .filter_map(|r| match &r.op {
                Op::TransferReceive(t) => {
                    Some((t.transfer_id.clone(), t.from.clone().unwrap_or_default()))
                }
                _ => None,
            })
            .collect();
        let arriving: Vec<Arriving> = self
            .clients
            .reqs
            .iter()
            .filter(|r| r.first_ok.is_some())
            .filter_map(|r| match &r.op {
                Op::Transfer(t) if t.to == own => Some((
                    t.transfer_id.clone(),
                    t.from.clone(),
                    t.lines.iter().map(|l| (l.product_id, l.quantity)).collect(),
                )),
                _ => None,
            })
            .filter(|(id, from, _)| !receiving.contains(&(id.clone(), from.clone())))
            .collect();
        if !arriving.is_empty() && self.rng.gen_bool(0.6) {
            let (id, from, lines) = arriving[self.rng.gen_range(0..arriving.len())].clone();
            let mut body = json!({"transfer_id": id, "from": from});
            if lines.first().is_some_and(|l| l.1 > 1) && self.rng.gen_bool(0.3) {
                // One unit short on the first line: recorded shrinkage.
                let got: Vec<Value> = lines
                    .iter()
                    .enumerate()
                    .map(|(k, (p, q))| {
                        json!({"product_id": p, "quantity": if k == 0 { q - 1 } else { *q }})
                    })
                    .collect();
                body["lines"] = json!(got);
            }
            let op = Op::TransferReceive(parse("transfer receipt", body));
            return (Kind::TransferReceive, op, id);
        }
        let id = if self.rng.gen_bool(0.3) {
            format!("tc-{}", self.rng.gen_range(0..4))
        } else {
            cat.fresh_id("tr")
        };
        let to = if targets.is_empty() {
            own.to_string()
        } else {
            targets[self.rng.gen_range(0..targets.len())].clone()
        };
        let p = cat.products[self.rng.gen_range(0..cat.products.len())];
        let r = self.peek_rights(i, p, own).max(0) as u64;
        let q = self.rng.gen_range(1..=(r / 2).max(1));
        let body = json!({"transfer_id": id, "from": own, "to": to,
            "lines": [{"product_id": p, "quantity": q}]});
        (Kind::Transfer, Op::Transfer(parse("transfer", body)), id)
    }

    /// Opening balances of the warehouse (`wh`, a location no node owns):
    /// every node that imports uses the same file and import id, so two
    /// nodes apart book the same count; it must count once.
    fn ownerless_import_op(&mut self) -> (Kind, Op, String) {
        let rows: Vec<storemesh_protocol::ops::ImportRow> = ownerless_counts()
            .iter()
            .enumerate()
            .map(|(k, n)| storemesh_protocol::ops::ImportRow {
                line: k as u64 + 2,
                sku: format!("sim-wh-{k}"),
                title: None,
                location: OWNERLESS.into(),
                on_hand: *n,
            })
            .collect();
        let op = Op::ImportCounts(storemesh_protocol::ops::ImportCounts {
            import_id: "wh-opening".into(),
            rows,
            scope: None,
        });
        (Kind::ImportCounts, op, "wh-opening".into())
    }

    fn random_sale(
        &mut self,
        cat: &Catalogue,
        i: usize,
        own: &str,
        others: &[String],
        id: &str,
    ) -> Op {
        let roll = self.rng.gen_range(0..100);
        let loc: Option<String> = if roll < 80 || others.is_empty() {
            Some(own.to_string())
        } else if roll < 90 {
            None
        } else {
            Some(others[self.rng.gen_range(0..others.len())].clone())
        };
        let at = loc.clone().unwrap_or_else(|| own.to_string());
        let p = cat.products[self.rng.gen_range(0..cat.products.len())];
        let mut lines: Vec<Value> = Vec::new();
        if self.rng.gen_bool(0.25) {
            // At the edge of what this node may sell: exactly its rights, one
            // more, or one more split over two lines of the same product.
            let r = self.peek_rights(i, p, &at).max(0) as u64;
            match self.rng.gen_range(0..3) {
                0 if r > 0 => lines.push(json!({"product_id": p, "quantity": r})),
                1 if r > 0 => {
                    let a = self.rng.gen_range(1..=r);
                    lines.push(json!({"product_id": p, "quantity": a}));
                    lines.push(json!({"product_id": p, "quantity": r + 1 - a}));
                }
                _ => lines.push(json!({"product_id": p, "quantity": r + 1})),
            }
        } else {
            for _ in 0..self.rng.gen_range(1..=3) {
                let p = cat.products[self.rng.gen_range(0..cat.products.len())];
                lines.push(json!({"product_id": p, "quantity": self.rng.gen_range(1..=4), "unit_price": 1999}));
            }
        }
        let mut body = json!({"sale_id": id, "currency": "EUR", "lines": lines});
        if let Some(l) = &loc {
            body["location"] = json!(l);
        }
        if loc.as_deref() == Some(own) && self.rng.gen_bool(0.05) {
            body["override"] = json!(true);
        }
        if self.rng.gen_bool(0.3) {
            body["customer_id"] = json!(cat.customers[self.rng.gen_range(0..cat.customers.len())]);
        }
        sale(body)
    }

    /// A stocktake in pages at node `i`'s own location, while the tills sell:
    /// a page of lines scanned a moment ago (sent again now and then, as a
    /// till retries), or the finish of the open session, full or partial.
    fn random_count_session_op(
        &mut self,
        cat: &mut Catalogue,
        i: usize,
        own: &str,
    ) -> (Kind, Op, String) {
        let open = cat.sessions.get(&i).cloned();
        if let Some((id, pages)) = &open {
            if *pages > 0 && self.rng.gen_bool(0.3) {
                let scope = if self.rng.gen_bool(0.5) {
                    "full"
                } else {
                    "partial"
                };
                cat.sessions.remove(&i);
                let op = parse("count finish", json!({"count_id": id, "scope": scope}));
                return (Kind::CountFinish, Op::CountFinish(op), id.clone());
            }
        }
        let id = match open {
            Some((id, pages)) => {
                cat.sessions.insert(i, (id.clone(), pages + 1));
                id
            }
            None => {
                let id = cat.fresh_id("k");
                cat.sessions.insert(i, (id.clone(), 1));
                id
            }
        };
        let mut ps = cat.products.clone();
        ps.shuffle(&mut self.rng);
        let n = self.rng.gen_range(1..=ps.len().min(40));
        let scanned_at = self.clock(i).saturating_sub(self.rng.gen_range(0..5_000));
        let lines: Vec<Value> = ps[..n]
            .iter()
            .map(|p| {
                let seen = self.peek_on_hand(i, *p, own);
                let counted = (seen + self.rng.gen_range(-2..=1)).max(0);
                json!({"product_id": p, "counted": counted, "counted_at": format_rfc3339_ms(scanned_at)})
            })
            .collect();
        let op = parse(
            "count lines",
            json!({"count_id": id, "location": own, "lines": lines}),
        );
        (Kind::CountPage, Op::CountLines(op), id)
    }

    /// The same id with another body (must be refused with `id_conflict`).
    pub fn altered(op: &Op) -> Option<Op> {
        // Another quantity that is still valid: a line already at
        // `QUANTITY_MAX` (the huge sales of `books.rs`) goes one down, since
        // one up would be refused as a bad request before the id is looked
        // at (seed 497: sale hs-32 probed with 1,000,000,001 got 400).
        fn other(q: &mut u64) {
            let max = storemesh_protocol::ids::QUANTITY_MAX;
            *q = if *q >= max { *q - 1 } else { *q + 1 };
        }
        let mut op = op.clone();
        match &mut op {
            Op::Sale(s) => other(&mut s.lines.first_mut()?.quantity),
            Op::Receipt(r) => other(&mut r.lines.first_mut()?.quantity),
            Op::Return(r) => other(&mut r.lines.first_mut()?.quantity),
            Op::Count(c) => other(&mut c.lines.first_mut()?.counted),
            Op::Grant(g) => other(&mut g.quantity),
            Op::CountFinish(f) => {
                f.scope = match f.scope {
                    CountScope::Full => CountScope::Partial,
                    CountScope::Partial => CountScope::Full,
                }
            }
            Op::Redeem { redeem, .. } => redeem.points += 1,
            _ => return None,
        }
        Some(op)
    }
}
