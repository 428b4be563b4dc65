//! The exact-books part of the HTTP API (CONTRACT v2): count sessions,
//! declared locations, and the write checks of location-limited tokens and
//! the `override` scope.

#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use storemesh_protocol::ids::validate_client_id;
use storemesh_protocol::ops::{self, Disposition, Op};

use crate::config::{Scope, TokenConfig};
use crate::state::Shared;

use super::extract::{bad, error, json_body, require, write_op};
use super::S;

fn forbidden(message: String) -> Response {
    error(StatusCode::FORBIDDEN, "forbidden", message)
}

/// The presented token's configuration (after `require` accepted it).
fn token<'a>(sh: &'a Shared, headers: &HeaderMap) -> Option<&'a TokenConfig> {
    let text = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let t = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))?;
    sh.cfg.token(t.trim())
}

/// Checks a write beyond its scope: `override` for selling beyond rights
/// and for restocking a return without its sale, and a location-limited
/// token's locations for every location the operation writes at.
async fn check_write(
    sh: &Shared,
    headers: &HeaderMap,
    scope: Scope,
    op: &Op,
) -> Result<(), Response> {
    let scopes = require(sh, headers, scope)?;
    let needs_override = match op {
        Op::Sale(s) => s.override_rights,
        Op::Return(r) => {
            r.original_sale_id.is_none()
                && r.lines
                    .iter()
                    .any(|l| l.disposition == Disposition::Restock)
        }
        _ => false,
    };
    if needs_override && !Scope::allows(&scopes, Scope::Override) {
        return Err(forbidden(match op {
            Op::Sale(_) => "\"override\": true needs a token with the 'override' scope".into(),
            _ => "a restock return without original_sale_id needs a token with the 'override' scope (or name the original sale)".into(),
        }));
    }
    let Some(allowed) = token(sh, headers).and_then(|t| t.locations.clone()) else {
        return Ok(());
    };
    let own = sh.cfg.location.clone();
    let webshop = sh.cfg.role == crate::config::Role::Webshop;
    let locations: Vec<String> = match op {
        Op::Sale(s) => match (&s.location, webshop) {
            (Some(l), _) => vec![l.clone()],
            (None, false) => vec![own],
            (None, true) => {
                return Err(forbidden(
                    "this token is limited to locations: name the sale's location".into(),
                ))
            }
        },
        Op::Return(r) => vec![r.location.clone()],
        Op::Receipt(r) => vec![r.location.clone()],
        Op::Count(c) => vec![c.location.clone()],
        Op::CountLines(c) => vec![c.location.clone()],
        Op::Grant(g) => vec![g.location.clone()],
        Op::Adjustment(a) => vec![a.location.clone()],
        Op::Transfer(t) => vec![t.from.clone()],
        Op::Reserve(r) => vec![r.location.clone()],
        Op::ImportCounts(i) => {
            let mut l: Vec<String> = i.rows.iter().map(|r| r.location.clone()).collect();
            l.sort();
            l.dedup();
            l
        }
        Op::TransferReceive(t) => {
            let (id, from) = (t.transfer_id.clone(), t.from.clone());
            sh.query(move |e| e.transfer_destinations(&id, from.as_deref()))
                .await
                .unwrap_or_default()
        }
        Op::CountFinish(f) => {
            let id = f.count_id.clone();
            sh.query(move |e| e.own_count_session(&id).map(|s| s.location.clone()))
                .await
                .flatten()
                .into_iter()
                .collect()
        }
        Op::ReservationFulfil { reservation_id, .. } | Op::ReservationCancel { reservation_id } => {
            let id = reservation_id.clone();
            sh.query(move |e| {
                e.views
                    .reservations()
                    .get(&id)
                    .map(|m| m.values().map(|r| r.location.clone()).collect::<Vec<_>>())
            })
            .await
            .flatten()
            .unwrap_or_default()
        }
        _ => Vec::new(),
    };
    if let Some(l) = locations.iter().find(|l| !allowed.contains(l)) {
        return Err(forbidden(format!(
            "this token may write only at {}; not at {l}",
            allowed.join(", ")
        )));
    }
    Ok(())
}

/// A write checked against the books first ([`check_write`]: count
/// sessions, location ownership), then sent to the engine and answered after
/// its group commit.
pub(super) async fn checked_write(
    shared: &Shared,
    headers: &HeaderMap,
    scope: Scope,
    op: Op,
) -> Response {
    if let Err(r) = check_write(shared, headers, scope, &op).await {
        return r;
    }
    write_op(shared, op).await
}

/// `POST /api/counts/{count_id}/lines`.
pub(super) async fn count_lines(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    count_write(&sh, &headers, id, body, |mut r: ops::CountLines, id| {
        (std::mem::replace(&mut r.count_id, id), Op::CountLines(r))
    })
    .await
}

/// `POST /api/counts/{count_id}/finish`.
pub(super) async fn count_finish(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    count_write(&sh, &headers, id, body, |mut r: ops::CountFinish, id| {
        (std::mem::replace(&mut r.count_id, id), Op::CountFinish(r))
    })
    .await
}

/// The two count-session writes: scope `stock`, the path's `count_id` put
/// into the request (`into_op` returns the body's own, which must be empty or
/// the same), the token's location limits, then the engine.
async fn count_write<T: serde::de::DeserializeOwned>(
    sh: &Arc<Shared>,
    headers: &HeaderMap,
    id: String,
    body: Result<Bytes, BytesRejection>,
    into_op: impl FnOnce(T, String) -> (String, Op),
) -> Response {
    if let Err(r) = require(sh, headers, Scope::Stock) {
        return r;
    }
    let req: T = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let path_id = id.clone();
    let (body_id, op) = into_op(req, id);
    if !body_id.is_empty() && body_id != path_id {
        return bad("count_id in the body differs from the path");
    }
    if let Err(r) = check_write(sh, headers, Scope::Stock, &op).await {
        return r;
    }
    write_op(sh, op).await
}

/// `GET /api/counts/{count_id}`: the session's status and totals.
pub(super) async fn count_get(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Read) {
        return r;
    }
    if let Err(e) = validate_client_id("count_id", &id) {
        return bad(e);
    }
    let found = sh.query(move |e| e.count_json(&id)).await.flatten();
    match found {
        Some(v) => axum::Json(v).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "unknown count (not synced to this node yet?)",
        ),
    }
}

/// `POST /api/locations` (`admin`).
pub(super) async fn locations_post(
    State(sh): S,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Admin) {
        return r;
    }
    let req: ops::DeclareLocation = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    write_op(&sh, Op::DeclareLocation(req)).await
}

/// `GET /api/locations` (`read`): every location the chain knows.
pub(super) async fn locations_get(State(sh): S, headers: HeaderMap) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Read) {
        return r;
    }
    let items = sh
        .query(|e| {
            let mut v: Vec<serde_json::Value> = e
                .views
                .nodes()
                .values()
                .filter_map(|i| {
                    Some(json!({"location": i.location.clone()?, "timezone": i.timezone, "owner": i.name, "declared": false}))
                })
                .collect();
            v.extend(e.views.declared().values().map(|d| {
                json!({"location": d.location, "timezone": d.timezone, "owner": d.owner, "declared": true})
            }));
            v
        })
        .await
        .unwrap_or_default();
    axum::Json(json!({"items": items})).into_response()
}
