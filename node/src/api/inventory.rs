//! Inventory routes: stock reads, products, the change feed and its stream,
//! count imports and inventory exports.

#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use storemesh_protocol::ids::{validate_name, validate_product_id};
use storemesh_protocol::ops::{self, Op};

use crate::config::Scope;
use crate::state::Shared;

use super::books::checked_write;
use super::extract::*;
use super::*;

pub(super) fn product_json(
    sh: &Shared,
    p: u64,
    location: Option<&str>,
    details: bool,
) -> Option<Value> {
    let r = sh.read.read().unwrap_or_else(|p| p.into_inner());
    let rows = r.rows.get(&p)?;
    if rows.is_empty() {
        return None;
    }
    let mut stock = 0i64;
    let mut avail = 0i64;
    for (l, row) in rows {
        if location.is_some_and(|x| x != &**l) {
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
            .filter(|(l, _)| location.is_none_or(|x| x == &***l))
            .map(|(l, row)| {
                let l: &str = l;
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
pub(super) fn check_inventory_params(q: &BTreeMap<String, String>) -> Result<(), Response> {
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

pub(super) async fn inventory(
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
                    &e.views.by_barcode()
                } else {
                    &e.views.by_sku()
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

pub(super) async fn product_put(
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

pub(super) async fn product_get(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Read) {
        return r;
    }
    let product_id = match parse_u64("product_id", &id) {
        Ok(p) => p,
        Err(r) => return r,
    };
    match sh.query(move |e| e.views.products().get(&product_id).cloned()).await.flatten() {
        Some(v) => axum::Json(json!({"product_id": product_id, "sku": v.sku, "barcodes": v.barcodes, "external_ids": v.external_ids, "name": v.name, "conflicts": v.conflicts})).into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", format!("product {product_id} is not in the catalogue")),
    }
}

pub(super) fn change_json(p: u64, l: &str, row: &storemesh_protocol::views::StockRow) -> Value {
    json!({"product_id": p, "location": l, "on_hand": row.on_hand, "available": row.available, "incoming": row.incoming, "seq": row.seq})
}

/// Items changed since `cursor` (exclusive), oldest first, at most `limit`.
pub(super) fn changes_since(sh: &Shared, cursor: u64, limit: usize) -> (Vec<Value>, u64) {
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

pub(super) async fn changes(
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

pub(super) async fn stream(
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

pub(super) async fn import_counts(
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
    checked_write(&sh, &headers, Scope::Stock, op).await
}

pub(super) async fn export_inventory(
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
            for (p, locs) in e.views.stock() {
                let cat = e.views.products().get(p);
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
