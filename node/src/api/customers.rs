//! Customer routes: records, loyalty redemption, erasure, search and segments.

#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use storemesh_protocol::ids::{validate_client_id, validate_name, validate_product_id};
use storemesh_protocol::ops::Op;

use crate::config::Scope;

use super::extract::*;
use super::*;

pub(super) async fn customer_put(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    customer_write(&sh, &headers, body, |update| Op::CustomerPut {
        customer_id: id,
        update,
    })
    .await
}

pub(super) async fn customer_redeem(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    customer_write(&sh, &headers, body, |redeem| Op::Redeem {
        customer_id: id,
        redeem,
    })
    .await
}

/// A write to one customer: a token with the `customers` scope, a JSON body
/// of type `T`, and the operation `make` builds from it.
async fn customer_write<T: serde::de::DeserializeOwned>(
    sh: &Shared,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    make: impl FnOnce(T) -> Op,
) -> Response {
    if let Err(r) = require(sh, headers, Scope::Customers) {
        return r;
    }
    match json_body(body) {
        Ok(v) => write_op(sh, make(v)).await,
        Err(r) => r,
    }
}

pub(super) async fn customer_delete(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Admin) {
        return r;
    }
    write_op(&sh, Op::CustomerErase { customer_id: id }).await
}

pub(super) fn customer_json(e: &storemesh_protocol::Engine, id: &str) -> Option<Value> {
    let v = e.views.customers().get(id)?;
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

pub(super) async fn customer_get(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
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

pub(super) async fn customer_search(
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
                &e.views.by_email()
            } else {
                &e.views.by_phone()
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

pub(super) async fn segment(
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
                Err(sku) => e.views.by_sku().get(&sku).and_then(|s| s.first().copied()),
            };
            let product = product?;
            let rows = e.segment(product, since_ms, location.as_deref(), include_all);
            let items: Vec<Value> = rows
                .into_iter()
                .filter(|(c, _)| c.as_str() > after.as_str())
                .take(limit + 1)
                .map(|(c, purchases)| {
                    let v = e.views.customers().get(&c).cloned().unwrap_or_default();
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
