//! The HTTP API of CONTRACT.md (axum). Handlers are thin: they authenticate,
//! parse and validate, then either read the committed read state or send the
//! operation to the engine thread and answer after its group commit.

// Handlers return early with a ready `Response` as the error; boxing it would
// only add noise on a path that is not hot.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use storemesh_protocol::ids::{validate_client_id, validate_name, validate_product_id};
use storemesh_protocol::ops::{self, Op, OpError};

use crate::config::Scope;
use crate::node::{now_ms, Shared};

/// Products in one `product_ids` read, at most.
pub const PRODUCT_IDS_MAX: usize = 250;
/// Largest stock file accepted by `POST /api/imports/counts`.
pub const IMPORT_BYTES_MAX: usize = 128 << 20;
/// Page size of listings, at most.
pub const PAGE_MAX: usize = 1000;

type S = State<Arc<Shared>>;

pub fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.cfg.api.body_bytes_max;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/inventory", get(inventory))
        .route("/api/sales", post(sales))
        .route("/api/sales/{sale_id}", get(sale_get))
        .route("/api/returns", post(returns))
        .route("/api/receipts", post(receipts))
        .route("/api/counts", post(counts))
        .route("/api/counts/{id}", get(crate::books_api::count_get))
        .route(
            "/api/counts/{id}/lines",
            post(crate::books_api::count_lines),
        )
        .route(
            "/api/counts/{id}/finish",
            post(crate::books_api::count_finish),
        )
        .route(
            "/api/locations",
            post(crate::books_api::locations_post).get(crate::books_api::locations_get),
        )
        .route("/api/grants", post(grants))
        .route("/api/customers", get(customer_search))
        .route(
            "/api/customers/{id}",
            get(customer_get).put(customer_put).delete(customer_delete),
        )
        .route("/api/customers/{id}/redeem", post(customer_redeem))
        .route(
            "/api/products/{product_id}",
            get(product_get).put(product_put),
        )
        .route("/api/adjustments", post(adjustments).get(adjustments_list))
        .route("/api/transfers", post(transfers))
        .route("/api/transfers/{id}", get(transfer_get))
        .route("/api/transfers/{id}/receive", post(transfer_receive))
        .route(
            "/api/imports/counts",
            post(import_counts).layer(DefaultBodyLimit::max(IMPORT_BYTES_MAX)),
        )
        .route("/api/exports/inventory", get(export_inventory))
        .route("/api/reservations", post(reservations))
        .route("/api/reservations/{id}", get(reservation_get))
        .route("/api/reservations/{id}/fulfil", post(reservation_fulfil))
        .route("/api/reservations/{id}/cancel", post(reservation_cancel))
        .route("/api/nodes/{name}/retire", post(retire_node))
        .route("/api/changes", get(changes))
        .route("/api/inventory/stream", get(stream))
        .route("/api/customers/segment", get(segment))
        .route("/api/peers", get(peers))
        .route("/api/overdrafts", get(overdrafts))
        .route("/api/documents", get(documents))
        .route("/api/documents/{*id}", get(document_get))
        .route("/openapi.yaml", get(openapi))
        .route("/api/webhooks", get(crate::webhooks::status))
        .fallback(not_found_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(shared)
}

/// An error message at most (it may echo parts of the request: a client's
/// 10 MB field must not come back as a 10 MB answer).
pub const MESSAGE_BYTES_MAX: usize = 4096;

pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let mut message: String = message.into();
    if message.len() > MESSAGE_BYTES_MAX {
        let mut end = MESSAGE_BYTES_MAX;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    (
        status,
        axum::Json(json!({"error": code, "message": message})),
    )
        .into_response()
}

fn op_error(e: OpError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, axum::Json(e.body())).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    resp
}

pub(crate) fn bad(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", message)
}

async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method (see openapi.yaml)",
    )
}

async fn not_found_route() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// Who is calling: the scopes of the presented token, if any.
enum Caller {
    Anonymous,
    Token(Vec<Scope>),
}

fn caller(shared: &Shared, headers: &HeaderMap) -> Result<Caller, Response> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(Caller::Anonymous);
    };
    let text = value.to_str().unwrap_or("");
    let token = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .unwrap_or("");
    match shared.cfg.token_scopes(token.trim()) {
        Some((_, scopes)) => Ok(Caller::Token(scopes.to_vec())),
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown API token",
        )),
    }
}

pub(crate) fn require(
    shared: &Shared,
    headers: &HeaderMap,
    scope: Scope,
) -> Result<Vec<Scope>, Response> {
    match caller(shared, headers)? {
        Caller::Anonymous => Err(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing API token (Authorization: Bearer <token>)",
        )),
        Caller::Token(scopes) if Scope::allows(&scopes, scope) => Ok(scopes),
        Caller::Token(_) => Err(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this token lacks the '{}' scope", scope.as_str()),
        )),
    }
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Response> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "request body is over the size limit",
            )
        } else {
            bad(format!("cannot read the request body: {e}"))
        }
    })
}

/// Parses a JSON body; a type, range or enum error names the field it is
/// in (`lines[0].quantity: invalid value …`), as CONTRACT.md asks.
fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Response> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            bad(format!("malformed request: {inner}"))
        } else {
            bad(format!("malformed request: {path}: {inner}"))
        }
    })?;
    // Trailing garbage after the value is malformed too.
    de.end()
        .map_err(|e| bad(format!("malformed request: {e}")))?;
    Ok(v)
}

/// The request body read (413 over the limit) and parsed as JSON (400).
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Response> {
    parse_json(&body_bytes(body)?)
}

fn reply(r: Result<ops::OpReply, OpError>) -> Response {
    match r {
        Ok(rep) => {
            let status = StatusCode::from_u16(rep.status).unwrap_or(StatusCode::OK);
            (
                status,
                [(header::CONTENT_TYPE, "application/json")],
                rep.body,
            )
                .into_response()
        }
        Err(e) => op_error(e),
    }
}

pub(crate) async fn write_op(shared: &Shared, op: Op) -> Response {
    reply(shared.execute(op).await)
}

async fn healthz(State(sh): S) -> Response {
    let r = sh.read.read().unwrap_or_else(|p| p.into_inner());
    let connected = sh
        .peers
        .read()
        .map(|p| p.values().filter(|s| s.connected).count())
        .unwrap_or(0);
    let fault = sh.fault.read().map(|f| f.clone()).unwrap_or_default();
    let status = if sh.shutting_down.load(Ordering::Relaxed) {
        "shutting_down"
    } else if fault.is_some() {
        "degraded"
    } else {
        "ok"
    };
    let mut body = json!({
        "status": status, "synced": r.synced, "ready": r.ready, "name": sh.cfg.name,
        "node_id": sh.node_id.hex(), "location": sh.cfg.location, "peers_connected": connected,
    });
    if let Some(reason) = fault {
        body["reason"] = json!(reason);
    }
    axum::Json(body).into_response()
}

async fn metrics(State(sh): S) -> Response {
    let m = &sh.metrics;
    let mut out = String::new();
    let mut line = |name: &str, kind: &str, help: &str, v: u64| {
        out.push_str(&format!("# HELP storemesh_{name} {help}\n# TYPE storemesh_{name} {kind}\nstoremesh_{name} {v}\n"));
    };
    line(
        "operations_total",
        "counter",
        "Client operations accepted.",
        m.ops_ok.load(Ordering::Relaxed),
    );
    line(
        "operations_refused_total",
        "counter",
        "Client operations refused.",
        m.ops_refused.load(Ordering::Relaxed),
    );
    line(
        "sync_messages_in_total",
        "counter",
        "Sync frames received.",
        m.sync_messages_in.load(Ordering::Relaxed),
    );
    line(
        "sync_messages_out_total",
        "counter",
        "Sync frames sent.",
        m.sync_messages_out.load(Ordering::Relaxed),
    );
    line(
        "sync_bytes_in_total",
        "counter",
        "Sync bytes received.",
        m.sync_bytes_in.load(Ordering::Relaxed),
    );
    line(
        "sync_bytes_out_total",
        "counter",
        "Sync bytes sent.",
        m.sync_bytes_out.load(Ordering::Relaxed),
    );
    line(
        "sync_rejected_messages_total",
        "counter",
        "Sync messages rejected by validation.",
        m.rejected_messages.load(Ordering::Relaxed),
    );
    line(
        "forks_detected_total",
        "counter",
        "Forks of this node's own history detected.",
        m.forks_detected.load(Ordering::Relaxed),
    );
    line(
        "redb_commits_total",
        "counter",
        "Group commits.",
        m.commits.load(Ordering::Relaxed),
    );
    line(
        "redb_commit_seconds_total_us",
        "counter",
        "Total group commit time in microseconds.",
        m.commit_us_total.load(Ordering::Relaxed),
    );
    line(
        "redb_commit_last_us",
        "gauge",
        "Latency of the last group commit in microseconds.",
        m.commit_us_last.load(Ordering::Relaxed),
    );
    line(
        "redb_commit_failures_total",
        "counter",
        "Failed group commits.",
        m.commit_failures.load(Ordering::Relaxed),
    );
    line(
        "refused_connections_total",
        "counter",
        "Peer connections refused.",
        m.refused_connections.load(Ordering::Relaxed),
    );
    line(
        "batch_operations_last",
        "gauge",
        "Operations in the last group commit.",
        m.batch_ops_last.load(Ordering::Relaxed),
    );
    line(
        "rebalance_requests_total",
        "counter",
        "Rights requests this node sent for sales that lacked rights.",
        m.rebalance_requests.load(Ordering::Relaxed),
    );
    line(
        "rebalance_grants_total",
        "counter",
        "Grants this node made answering peers' rights requests.",
        m.rebalance_grants.load(Ordering::Relaxed),
    );
    line(
        "allocation_grants_total",
        "counter",
        "Grants made by the allocation controller (grants per sale = this / operations).",
        m.allocation_grants.load(Ordering::Relaxed),
    );
    let peers = sh.peers.read().map(|p| p.clone()).unwrap_or_default();
    line(
        "peers_connected",
        "gauge",
        "Peers connected.",
        peers.values().filter(|p| p.connected).count() as u64,
    );
    out.push_str(
        "# HELP storemesh_sync_bytes_out_by_kind_total Sync bytes sent, by message kind.\n\
         # TYPE storemesh_sync_bytes_out_by_kind_total counter\n",
    );
    for (kind, v) in storemesh_protocol::sync::MSG_KINDS
        .iter()
        .zip(&m.sync_bytes_out_by_kind)
    {
        out.push_str(&format!(
            "storemesh_sync_bytes_out_by_kind_total{{kind=\"{kind}\"}} {}\n",
            v.load(Ordering::Relaxed)
        ));
    }
    out.push_str("# HELP storemesh_peer_lag_seconds Seconds since the last frame from each peer.\n# TYPE storemesh_peer_lag_seconds gauge\n");
    let now = now_ms();
    for (id, p) in &peers {
        let name = sh
            .cfg
            .peer_by_id(id)
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let lag = if p.last_sync_ms == 0 {
            -1.0
        } else {
            now.saturating_sub(p.last_sync_ms) as f64 / 1000.0
        };
        out.push_str(&format!(
            "storemesh_peer_lag_seconds{{peer=\"{name}\"}} {lag}\n"
        ));
    }
    crate::webhooks::metrics_text(&sh, &mut out);
    crate::http::metrics_text(&sh, &mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

fn parse_u64(field: &str, v: &str) -> Result<u64, Response> {
    v.trim()
        .parse::<u64>()
        .map_err(|_| bad(format!("{field} must be an integer")))
}

fn product_json(sh: &Shared, p: u64, location: Option<&str>, details: bool) -> Option<Value> {
    let r = sh.read.read().unwrap_or_else(|p| p.into_inner());
    let rows = r.rows.get(&p)?;
    if rows.is_empty() {
        return None;
    }
    let mut stock = 0i64;
    let mut avail = 0i64;
    for (l, row) in rows {
        if location.is_some_and(|x| x != l) {
            continue;
        }
        stock = stock.saturating_add(row.on_hand);
        // One sale is taken from one location: the most it can take anywhere.
        avail = avail.max(row.available);
    }
    let mut v = json!({"product_id": p, "stock_level": stock, "available": avail});
    if details {
        let now = sh.now_ms();
        let locs: Vec<Value> = rows
            .iter()
            .filter(|(l, _)| location.is_none_or(|x| x == l.as_str()))
            .map(|(l, row)| {
                let (policy, tz) = r
                    .locations
                    .get(l)
                    .map(|(_, p, tz)| (p.clone(), tz.clone()))
                    .unwrap_or_else(|| ("strict".into(), "UTC".into()));
                let heard = r.last_heard.get(l).map(|t| if *t == u64::MAX { 0 } else { now.saturating_sub(*t) / 1000 });
                json!({"location": l, "on_hand": row.on_hand, "available": row.available, "reserved": row.reserved, "incoming": row.incoming, "policy": policy, "timezone": tz, "last_heard_s": heard})
            })
            .collect();
        v["locations"] = Value::Array(locs);
        v["as_of"] = Value::String(storemesh_protocol::time::format_rfc3339_ms(r.as_of_ms));
        v["synced"] = Value::Bool(r.synced);
    }
    Some(v)
}

/// Every parameter given to `GET /api/inventory` is checked, even one that
/// the form chosen (product_id first) does not use: a malformed request is a
/// 400 whichever form answers it, as openapi.yaml describes.
fn check_inventory_params(q: &BTreeMap<String, String>) -> Result<(), Response> {
    for field in ["sku", "barcode"] {
        if let Some(code) = q.get(field) {
            if code.is_empty() || code.len() > 128 {
                return Err(bad(format!("{field} must be 1-128 characters")));
            }
        }
    }
    if let Some(list) = q.get("product_ids") {
        let ids: Vec<&str> = list.split(',').filter(|s| !s.is_empty()).collect();
        if ids.is_empty() || ids.len() > PRODUCT_IDS_MAX {
            return Err(bad(format!(
                "product_ids must list 1-{PRODUCT_IDS_MAX} ids"
            )));
        }
        for s in ids {
            let p = parse_u64("product_ids", s)?;
            validate_product_id("product_ids", p).map_err(bad)?;
        }
    }
    if let Some(a) = q.get("after") {
        if !matches!(a.trim().parse::<i64>(), Ok(v) if v >= 0) {
            return Err(bad(format!("after must be an integer in 0..={}", i64::MAX)));
        }
    }
    if let Some(l) = q.get("limit") {
        parse_u64("limit", l)?;
    }
    Ok(())
}

async fn inventory(
    State(sh): S,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let who = match caller(&sh, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let can_read = match &who {
        Caller::Token(s) => Scope::allows(s, Scope::Read),
        Caller::Anonymous => false,
    };
    if !can_read && !sh.cfg.api.public_reads {
        return match who {
            Caller::Anonymous => error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing API token",
            ),
            Caller::Token(_) => error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this token lacks the 'read' scope",
            ),
        };
    }
    let location = q.get("location").map(|s| s.as_str());
    if let Some(l) = location {
        if let Err(e) = validate_name("location", l) {
            return bad(e);
        }
    }
    if let Err(r) = check_inventory_params(&q) {
        return r;
    }
    if let Some(p) = q.get("product_id") {
        let p = match parse_u64("product_id", p) {
            Ok(p) => p,
            Err(r) => return r,
        };
        if let Err(e) = validate_product_id("product_id", p) {
            return bad(e);
        }
        return match product_json(&sh, p, location, can_read) {
            Some(v) => axum::Json(v).into_response(),
            None => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("unknown product {p}"),
            ),
        };
    }
    for (field, by_barcode) in [("sku", false), ("barcode", true)] {
        let Some(code) = q.get(field).cloned() else {
            continue;
        };
        if code.is_empty() || code.len() > 128 {
            return bad(format!("{field} must be 1-128 characters"));
        }
        let ids = sh
            .query(move |e| {
                let index = if by_barcode {
                    &e.views.by_barcode
                } else {
                    &e.views.by_sku
                };
                index
                    .get(&code)
                    .map(|s| s.iter().copied().collect::<Vec<u64>>())
                    .unwrap_or_default()
            })
            .await
            .unwrap_or_default();
        let items: Vec<Value> = ids
            .iter()
            .filter_map(|p| product_json(&sh, *p, location, can_read))
            .collect();
        return match items.len() {
            0 => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("unknown {field}"),
            ),
            1 => axum::Json(items.into_iter().next().unwrap_or(Value::Null)).into_response(),
            _ => axum::Json(json!({"items": items})).into_response(),
        };
    }
    if let Some(list) = q.get("product_ids") {
        let ids: Vec<&str> = list.split(',').filter(|s| !s.is_empty()).collect();
        if ids.is_empty() || ids.len() > PRODUCT_IDS_MAX {
            return bad(format!("product_ids must list 1-{PRODUCT_IDS_MAX} ids"));
        }
        let mut items = Vec::new();
        for s in ids {
            let p = match parse_u64("product_ids", s) {
                Ok(p) => p,
                Err(r) => return r,
            };
            if let Err(e) = validate_product_id("product_ids", p) {
                return bad(e);
            }
            if let Some(v) = product_json(&sh, p, location, can_read) {
                items.push(v);
            }
        }
        return axum::Json(json!({"items": items})).into_response();
    }
    if let Some(l) = location {
        if !can_read {
            return match who {
                Caller::Anonymous => error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "listings need a token with the 'read' scope",
                ),
                Caller::Token(_) => error(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "this token lacks the 'read' scope",
                ),
            };
        }
        let after = match q.get("after").map(|a| parse_u64("after", a)).transpose() {
            Ok(a) => a.unwrap_or(0),
            Err(r) => return r,
        };
        let limit = match q.get("limit").map(|a| parse_u64("limit", a)).transpose() {
            Ok(a) => (a.unwrap_or(100) as usize).clamp(1, PAGE_MAX),
            Err(r) => return r,
        };
        let mut ids: Vec<u64> = {
            let r = sh.read.read().unwrap_or_else(|p| p.into_inner());
            r.rows
                .iter()
                .filter(|(p, m)| **p > after && m.contains_key(l))
                .map(|(p, _)| *p)
                .collect()
        };
        ids.sort_unstable();
        let more = ids.len() > limit;
        ids.truncate(limit);
        let items: Vec<Value> = ids
            .iter()
            .filter_map(|p| product_json(&sh, *p, Some(l), true))
            .collect();
        let next = if more {
            ids.last().map(|p| json!(p)).unwrap_or(Value::Null)
        } else {
            Value::Null
        };
        return axum::Json(json!({"items": items, "next_after": next})).into_response();
    }
    bad("give product_id, product_ids, or location")
}

macro_rules! write_handler {
    ($name:ident, $scope:expr, $ty:ty, $wrap:expr) => {
        async fn $name(
            State(sh): S,
            headers: HeaderMap,
            body: Result<Bytes, BytesRejection>,
        ) -> Response {
            if let Err(r) = require(&sh, &headers, $scope) {
                return r;
            }
            let req: $ty = match json_body(body) {
                Ok(v) => v,
                Err(r) => return r,
            };
            let op = $wrap(req);
            if let Err(r) = crate::books_api::check_write(&sh, &headers, $scope, &op).await {
                return r;
            }
            write_op(&sh, op).await
        }
    };
}

write_handler!(sales, Scope::Sell, ops::Sale, Op::Sale);
write_handler!(returns, Scope::Sell, ops::Return, Op::Return);
write_handler!(receipts, Scope::Stock, ops::Receipt, Op::Receipt);
write_handler!(counts, Scope::Stock, ops::Count, Op::Count);
write_handler!(grants, Scope::Stock, ops::Grant, Op::Grant);
write_handler!(adjustments, Scope::Stock, ops::Adjustment, Op::Adjustment);
write_handler!(transfers, Scope::Stock, ops::Transfer, Op::Transfer);
write_handler!(reservations, Scope::Sell, ops::Reserve, Op::Reserve);

async fn sale_get(State(sh): S, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Sell) {
        return r;
    }
    if let Err(e) = validate_client_id("sale_id", &id) {
        return bad(e);
    }
    let found = sh.query(move |e| e.sale_json(&id)).await.flatten();
    match found {
        Some(v) => axum::Json(v).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "unknown sale (not synced to this node yet?)",
        ),
    }
}

async fn customer_put(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Customers) {
        return r;
    }
    let update: ops::CustomerUpdate = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    write_op(
        &sh,
        Op::CustomerPut {
            customer_id: id,
            update,
        },
    )
    .await
}

async fn customer_redeem(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Customers) {
        return r;
    }
    let redeem: ops::Redeem = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    write_op(
        &sh,
        Op::Redeem {
            customer_id: id,
            redeem,
        },
    )
    .await
}

async fn customer_delete(State(sh): S, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Admin) {
        return r;
    }
    write_op(&sh, Op::CustomerErase { customer_id: id }).await
}

fn customer_json(e: &storemesh_protocol::Engine, id: &str) -> Option<Value> {
    let v = e.views.customers.get(id)?;
    if v.erased {
        return None;
    }
    // Every profile field is present; one never written reads as unset.
    let mut out = json!({"customer_id": id, "name": null, "email": null, "phone": null, "marketing_consent": false, "tags": [], "loyalty_points": v.points(), "purchases": e.purchases(id), "conflicts": v.conflicts});
    for (k, val) in &v.profile {
        out[k] = val.clone();
    }
    Some(out)
}

async fn customer_get(State(sh): S, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Customers) {
        return r;
    }
    if let Err(e) = validate_client_id("customer_id", &id) {
        return bad(e);
    }
    match sh.query(move |e| customer_json(e, &id)).await.flatten() {
        Some(v) => axum::Json(v).into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", "unknown customer"),
    }
}

async fn customer_search(
    State(sh): S,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Customers) {
        return r;
    }
    let (field, value) = match (q.get("email"), q.get("phone")) {
        (Some(e), _) => ("email", e.to_lowercase()),
        (None, Some(p)) => ("phone", p.to_lowercase()),
        _ => return bad("give email or phone"),
    };
    let items = sh
        .query(move |e| {
            let index = if field == "email" {
                &e.views.by_email
            } else {
                &e.views.by_phone
            };
            index
                .get(&value)
                .map(|ids| {
                    ids.iter()
                        .take(PAGE_MAX)
                        .filter_map(|id| customer_json(e, id))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .await
        .unwrap_or_default();
    axum::Json(json!({"items": items})).into_response()
}

async fn peers(State(sh): S, headers: HeaderMap) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Read) {
        return r;
    }
    let status = sh.peers.read().map(|p| p.clone()).unwrap_or_default();
    let now = now_ms();
    let items: Vec<Value> = sh
        .cfg
        .peers
        .iter()
        .map(|p| {
            let s = status.get(&p.id).cloned().unwrap_or_default();
            json!({
                "name": p.name, "id": p.id.hex(), "addr": p.addr, "connected": s.connected, "synced": s.synced,
                "last_sync": if s.last_sync_ms == 0 { Value::Null } else { Value::String(storemesh_protocol::time::format_rfc3339_ms(s.last_sync_ms)) },
                "lag_s": if s.last_sync_ms == 0 { Value::Null } else { json!(now.saturating_sub(s.last_sync_ms) / 1000) },
                "lag": if s.last_sync_ms == 0 { Value::Null } else { json!(now.saturating_sub(s.last_sync_ms) as f64 / 1000.0) },
                "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
            })
        })
        .collect();
    axum::Json(json!({"items": items})).into_response()
}

async fn overdrafts(State(sh): S, headers: HeaderMap) -> Response {
    let scopes = match require(&sh, &headers, Scope::Read) {
        Ok(s) => s,
        Err(r) => return r,
    };
    // Customer ids and balances are customer data: only with that scope.
    let customers = Scope::allows(&scopes, Scope::Customers);
    let items = sh
        .query(move |e| {
            let mut v: Vec<Value> = e
                .views
                .alarms
                .values()
                .map(|a| json!({"kind": a.kind, "node": a.node, "id": a.id, "record": a.record}))
                .collect();
            // Loyalty overdrafts: balances below zero after concurrent
            // redemptions; erased customers are nobody's business any more.
            if customers {
                for (c, view) in &e.views.customers {
                    if view.points() < 0 && !view.erased {
                        v.push(
                            json!({"kind": "loyalty", "customer_id": c, "points": view.points()}),
                        );
                    }
                }
            }
            v.extend(e.id_collisions());
            v
        })
        .await
        .unwrap_or_default();
    axum::Json(json!({"items": items})).into_response()
}

async fn documents(State(sh): S, headers: HeaderMap) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Admin) {
        return r;
    }
    let docs = sh.query(|e| e.documents()).await.unwrap_or_default();
    let items: Vec<Value> = docs
        .into_iter()
        .map(|(id, heads)| json!({"id": id, "heads": heads}))
        .collect();
    axum::Json(json!({"items": items})).into_response()
}

async fn document_get(State(sh): S, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Admin) {
        return r;
    }
    match sh.query(move |e| e.document_bytes(&id)).await.flatten() {
        Some(bytes) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "not_found", "unknown document"),
    }
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/yaml")],
        include_str!("../../openapi.yaml"),
    )
        .into_response()
}

async fn product_put(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Stock) {
        return r;
    }
    let product_id = match parse_u64("product_id", &id) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let update: ops::ProductUpdate = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    write_op(&sh, Op::ProductPut { product_id, update }).await
}

async fn product_get(State(sh): S, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Read) {
        return r;
    }
    let product_id = match parse_u64("product_id", &id) {
        Ok(p) => p,
        Err(r) => return r,
    };
    match sh.query(move |e| e.views.products.get(&product_id).cloned()).await.flatten() {
        Some(v) => axum::Json(json!({"product_id": product_id, "sku": v.sku, "barcodes": v.barcodes, "external_ids": v.external_ids, "name": v.name, "conflicts": v.conflicts})).into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", format!("product {product_id} is not in the catalogue")),
    }
}

async fn adjustments_list(
    State(sh): S,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Read) {
        return r;
    }
    let Some(loc) = q.get("location").cloned() else {
        return bad("location is required");
    };
    if let Err(e) = validate_name("location", &loc) {
        return bad(e);
    }
    let items = sh
        .query(move |e| {
            let mut v: Vec<Value> = e
                .views
                .adjustments
                .get(&loc)
                .map(|s| s.iter().filter_map(|(d, k)| e.record(d, k)).collect())
                .unwrap_or_default();
            v.sort_by_key(|r| std::cmp::Reverse(r["at_ms"].as_u64().unwrap_or(0)));
            v.truncate(PAGE_MAX);
            v
        })
        .await
        .unwrap_or_default();
    axum::Json(json!({"items": items})).into_response()
}

async fn transfer_get(State(sh): S, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Read) {
        return r;
    }
    match sh.query(move |e| e.transfer_json(&id)).await.flatten() {
        Some(v) => axum::Json(v).into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", "unknown transfer"),
    }
}

async fn transfer_receive(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Stock) {
        return r;
    }
    let bytes = match body_bytes(body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut req: ops::TransferReceive = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        ops::TransferReceive::default()
    } else {
        match parse_json(&bytes) {
            Ok(v) => v,
            Err(r) => return r,
        }
    };
    if !req.transfer_id.is_empty() && req.transfer_id != id {
        return bad("transfer_id in the body differs from the path");
    }
    req.transfer_id = id;
    let op = Op::TransferReceive(req);
    if let Err(r) = crate::books_api::check_write(&sh, &headers, Scope::Stock, &op).await {
        return r;
    }
    write_op(&sh, op).await
}

fn change_json(p: u64, l: &str, row: &storemesh_protocol::views::StockRow) -> Value {
    json!({"product_id": p, "location": l, "on_hand": row.on_hand, "available": row.available, "incoming": row.incoming, "seq": row.seq})
}

/// Items changed since `cursor` (exclusive), oldest first, at most `limit`.
fn changes_since(sh: &Shared, cursor: u64, limit: usize) -> (Vec<Value>, u64) {
    let r = sh.read.read().unwrap_or_else(|p| p.into_inner());
    let mut items = Vec::new();
    let mut last = cursor;
    for (seq, (p, l)) in r.by_seq.range(cursor.saturating_add(1)..).take(limit) {
        if let Some(row) = r.rows.get(p).and_then(|m| m.get(l)) {
            items.push(change_json(*p, l, row));
        }
        last = *seq;
    }
    (items, last)
}

/// A change-feed cursor: an integer in 0..=i64::MAX (what openapi.yaml's
/// `int64, minimum 0` allows); anything else is a 400.
fn parse_cursor(v: &str) -> Result<u64, Response> {
    match v.trim().parse::<i64>() {
        Ok(c) if c >= 0 => Ok(c as u64),
        _ => Err(bad(format!(
            "cursor must be an integer in 0..={} (a cursor from GET /api/changes)",
            i64::MAX
        ))),
    }
}

/// `limit` of `/api/changes`: any integer, clamped to 1..=PAGE_MAX as
/// documented (a negative or huge value is clamped, not refused).
fn parse_clamped_limit(v: &str) -> Result<usize, Response> {
    let t = v.trim();
    let digits = t.strip_prefix('-').unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("limit must be an integer"));
    }
    if t.starts_with('-') {
        return Ok(1);
    }
    Ok(t.parse::<u64>()
        .map(|n| (n.min(PAGE_MAX as u64) as usize).max(1))
        .unwrap_or(PAGE_MAX))
}

async fn changes(
    State(sh): S,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Read) {
        return r;
    }
    let cursor = match q.get("cursor").map(|c| parse_cursor(c)).transpose() {
        Ok(c) => c.unwrap_or(0),
        Err(r) => return r,
    };
    let limit = match q.get("limit").map(|c| parse_clamped_limit(c)).transpose() {
        Ok(c) => c.unwrap_or(100),
        Err(r) => return r,
    };
    let (items, next) = changes_since(&sh, cursor, limit);
    axum::Json(json!({"items": items, "cursor": next})).into_response()
}

/// A stream with no change event for this long ends (keep-alive comments do
/// not count): a client that went away without closing does not hold a task
/// and a subscription for ever. Clients reconnect with their last cursor.
pub const STREAM_IDLE_TIMEOUT_S_DEFAULT: u64 = 300;
/// Largest `idle_timeout_s` a client may ask for.
pub const STREAM_IDLE_TIMEOUT_S_MAX: u64 = 3600;

async fn stream(
    State(sh): S,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    if let Err(r) = require(&sh, &headers, Scope::Read) {
        return r;
    }
    let cursor = match q.get("cursor").map(|c| parse_cursor(c)).transpose() {
        Ok(c) => c,
        Err(r) => return r,
    };
    let idle_s = match q
        .get("idle_timeout_s")
        .map(|v| parse_u64("idle_timeout_s", v))
    {
        None => STREAM_IDLE_TIMEOUT_S_DEFAULT,
        Some(Ok(v)) if (1..=STREAM_IDLE_TIMEOUT_S_MAX).contains(&v) => v,
        Some(_) => {
            return bad(format!(
                "idle_timeout_s must be an integer in 1..={STREAM_IDLE_TIMEOUT_S_MAX}"
            ))
        }
    };
    let idle = std::time::Duration::from_secs(idle_s);
    // Subscribe first, then replay the backlog: nothing falls in between.
    let rx = sh.changes.subscribe();
    let backlog: Vec<Value> = match cursor {
        Some(c) => changes_since(&sh, c, usize::MAX).0,
        None => Vec::new(),
    };
    let first = futures_util::stream::iter(backlog.into_iter().map(|v| {
        Ok::<Event, std::convert::Infallible>(Event::default().event("change").data(v.to_string()))
    }));
    let live = futures_util::stream::unfold(rx, move |mut rx| async move {
        let got = match tokio::time::timeout(idle, rx.recv()).await {
            Ok(got) => got,
            // Idle for too long: end the stream (the client reconnects).
            Err(_) => return None,
        };
        let events: Vec<Result<Event, std::convert::Infallible>> = match got {
            Ok(rows) => rows
                .iter()
                .map(|(p, l, row)| {
                    Ok(Event::default()
                        .event("change")
                        .data(change_json(*p, l, row).to_string()))
                })
                .collect(),
            // A slow consumer missed events: tell it to resync with /api/changes.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                vec![Ok(Event::default().event("lagged").data(n.to_string()))]
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((futures_util::stream::iter(events), rx))
    });
    use futures_util::StreamExt;
    Sse::new(first.chain(live.flatten()))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn segment(
    State(sh): S,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let scopes = match require(&sh, &headers, Scope::Customers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let admin = scopes.contains(&Scope::Admin);
    let since_ms = match q.get("since") {
        Some(t) => match storemesh_protocol::time::parse_rfc3339_ms(t) {
            Some(ms) => ms,
            None => return bad("since must be RFC 3339 with an offset"),
        },
        None => 0,
    };
    let location = q.get("location").cloned();
    if let Some(l) = &location {
        if let Err(e) = validate_name("location", l) {
            return bad(e);
        }
    }
    // Only consenting customers unless the caller is an admin (CONTRACT.md);
    // an admin may still narrow to them with `marketing_consent=true`
    // (`false` or `any`: everyone, as without the parameter).
    let include_all = match q.get("marketing_consent").map(String::as_str) {
        None | Some("false") | Some("any") => admin,
        Some("true") => false,
        Some(_) => return bad("marketing_consent must be true, false or any"),
    };
    let after = q.get("after").cloned().unwrap_or_default();
    let limit = match q.get("limit").map(|c| parse_u64("limit", c)).transpose() {
        Ok(c) => (c.unwrap_or(100) as usize).clamp(1, PAGE_MAX),
        Err(r) => return r,
    };
    let bought = match (q.get("bought"), q.get("sku")) {
        (Some(b), _) => match parse_u64("bought", b) {
            Ok(p) => match validate_product_id("bought", p) {
                Ok(()) => Ok(p),
                Err(e) => return bad(e),
            },
            Err(r) => return r,
        },
        (None, Some(sku)) => Err(sku.clone()),
        (None, None) => return bad("give bought=PRODUCT_ID or sku=SKU"),
    };
    let res = sh
        .query(move |e| {
            let product = match bought {
                Ok(p) => Some(p),
                Err(sku) => e.views.by_sku.get(&sku).and_then(|s| s.first().copied()),
            };
            let product = product?;
            let rows = e.segment(product, since_ms, location.as_deref(), include_all);
            let items: Vec<Value> = rows
                .into_iter()
                .filter(|(c, _)| c.as_str() > after.as_str())
                .take(limit + 1)
                .map(|(c, purchases)| {
                    let v = e.views.customers.get(&c).cloned().unwrap_or_default();
                    let mut out = json!({"customer_id": c, "purchases": purchases});
                    for f in ["name", "email", "phone", "marketing_consent"] {
                        if let Some(x) = v.profile.get(f) {
                            out[f] = x.clone();
                        }
                    }
                    out
                })
                .collect();
            Some(items)
        })
        .await
        .flatten();
    let Some(mut items) = res else {
        return error(StatusCode::NOT_FOUND, "not_found", "unknown sku");
    };
    let more = items.len() > limit;
    items.truncate(limit);
    let next = if more {
        items
            .last()
            .map(|v| v["customer_id"].clone())
            .unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    axum::Json(json!({"items": items, "next_after": next})).into_response()
}

async fn import_counts(
    State(sh): S,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Stock) {
        return r;
    }
    let format = match q.get("format").map(|f| crate::csvio::Format::parse(f)) {
        None => crate::csvio::Format::Shopify,
        Some(Some(f)) => f,
        Some(None) => return bad("format must be shopify or storemesh"),
    };
    let bytes = match body_bytes(body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let import_id = match q.get("import_id") {
        Some(id) => id.clone(),
        None => {
            use sha2::Digest;
            format!("imp-{}", &hex::encode(sha2::Sha256::digest(&bytes))[..24])
        }
    };
    let rows = match crate::csvio::parse(&bytes, format) {
        Ok(r) => r,
        Err(errors) => {
            return bad(storemesh_protocol::ops::import_errors(errors)
                .err()
                .unwrap_or_default())
        }
    };
    let scope = match q.get("scope").map(String::as_str) {
        None | Some("partial") => None,
        Some("full") => Some(ops::CountScope::Full),
        Some(_) => return bad("scope must be partial or full"),
    };
    let op = Op::ImportCounts(ops::ImportCounts {
        import_id,
        rows,
        scope,
    });
    if let Err(r) = crate::books_api::check_write(&sh, &headers, Scope::Stock, &op).await {
        return r;
    }
    write_op(&sh, op).await
}

async fn export_inventory(
    State(sh): S,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Read) {
        return r;
    }
    let format = match q.get("format").map(|f| crate::csvio::Format::parse(f)) {
        None => crate::csvio::Format::Shopify,
        Some(Some(f)) => f,
        Some(None) => return bad("format must be shopify or storemesh"),
    };
    let rows = sh
        .query(|e| {
            let mut rows = Vec::new();
            for (p, locs) in &e.views.stock {
                let cat = e.views.products.get(p);
                let sku = cat
                    .and_then(|c| c.sku.clone())
                    .unwrap_or_else(|| p.to_string());
                let title = cat.and_then(|c| c.name.clone()).unwrap_or_default();
                for (l, entry) in locs {
                    rows.push(crate::csvio::ExportRow {
                        sku: sku.clone(),
                        title: title.clone(),
                        location: l.clone(),
                        on_hand: entry.on_hand(),
                        incoming: e.incoming(*p, l),
                    });
                }
            }
            rows.sort_by(|a, b| (&a.sku, &a.location).cmp(&(&b.sku, &b.location)));
            rows
        })
        .await
        .unwrap_or_default();
    match crate::csvio::write(&rows, format) {
        Ok(bytes) => ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], bytes).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e),
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FulfilBody {
    #[serde(default)]
    sale_id: Option<String>,
}

async fn reservation_fulfil(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Sell) {
        return r;
    }
    let bytes = match body_bytes(body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let req: FulfilBody = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        FulfilBody::default()
    } else {
        match parse_json(&bytes) {
            Ok(v) => v,
            Err(r) => return r,
        }
    };
    let op = Op::ReservationFulfil {
        reservation_id: id,
        sale_id: req.sale_id,
    };
    if let Err(r) = crate::books_api::check_write(&sh, &headers, Scope::Sell, &op).await {
        return r;
    }
    write_op(&sh, op).await
}

async fn reservation_cancel(State(sh): S, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Sell) {
        return r;
    }
    let op = Op::ReservationCancel { reservation_id: id };
    if let Err(r) = crate::books_api::check_write(&sh, &headers, Scope::Sell, &op).await {
        return r;
    }
    write_op(&sh, op).await
}

async fn reservation_get(State(sh): S, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Read) {
        return r;
    }
    let found = sh.query(move |e| e.reservation_json(&id)).await.flatten();
    match found {
        Some(v) => axum::Json(v).into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", "unknown reservation"),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RetireBody {
    successor: String,
}

async fn retire_node(
    State(sh): S,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Admin) {
        return r;
    }
    let req: RetireBody = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    write_op(
        &sh,
        Op::Retire {
            node: name,
            successor: req.successor,
        },
    )
    .await
}
