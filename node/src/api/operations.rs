//! Write routes (sales, returns, receipts, counts, grants, adjustments,
//! transfers, reservations) and the reads and follow-ups of what they create,
//! and node retirement.

#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use storemesh_protocol::ids::{validate_client_id, validate_name};
use storemesh_protocol::ops::{self, Op};

use crate::config::Scope;

use super::books::checked_write;
use super::extract::*;
use super::*;

macro_rules! write_handler {
    ($name:ident, $scope:expr, $ty:ty, $wrap:expr) => {
        pub(super) async fn $name(
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
            checked_write(&sh, &headers, $scope, op).await
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

pub(super) async fn sale_get(State(sh): S, headers: HeaderMap, Path(id): Path<String>) -> Response {
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

pub(super) async fn adjustments_list(
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
                .adjustments()
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

pub(super) async fn transfer_get(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Read) {
        return r;
    }
    match sh.query(move |e| e.transfer_json(&id)).await.flatten() {
        Some(v) => axum::Json(v).into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", "unknown transfer"),
    }
}

pub(super) async fn transfer_receive(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Stock) {
        return r;
    }
    let mut req: ops::TransferReceive = match optional_json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if !req.transfer_id.is_empty() && req.transfer_id != id {
        return bad("transfer_id in the body differs from the path");
    }
    req.transfer_id = id;
    let op = Op::TransferReceive(req);
    checked_write(&sh, &headers, Scope::Stock, op).await
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FulfilBody {
    #[serde(default)]
    sale_id: Option<String>,
}

pub(super) async fn reservation_fulfil(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Sell) {
        return r;
    }
    let req: FulfilBody = match optional_json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let op = Op::ReservationFulfil {
        reservation_id: id,
        sale_id: req.sale_id,
    };
    checked_write(&sh, &headers, Scope::Sell, op).await
}

pub(super) async fn reservation_cancel(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Sell) {
        return r;
    }
    let op = Op::ReservationCancel { reservation_id: id };
    checked_write(&sh, &headers, Scope::Sell, op).await
}

pub(super) async fn reservation_get(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
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
pub(super) struct RetireBody {
    successor: String,
}

pub(super) async fn retire_node(
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
