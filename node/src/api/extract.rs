//! Error mapping and request extraction: the JSON error body, the caller's
//! token and scopes, body limits and JSON parsing, typed query parameters,
//! and the answer of an operation sent to the engine.

#![allow(clippy::result_large_err)]

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use storemesh_protocol::ops::{self, Op, OpError};

use crate::config::Scope;
use crate::state::Shared;

use super::*;

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

pub(super) fn op_error(e: OpError) -> Response {
    let status = super::outcome::error_status(&e);
    let mut resp = (status, axum::Json(super::outcome::error_body(&e))).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    resp
}

pub(crate) fn bad(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// Who is calling: the scopes of the presented token, if any.
pub(super) enum Caller {
    Anonymous,
    Token(Vec<Scope>),
}

pub(super) fn caller(shared: &Shared, headers: &HeaderMap) -> Result<Caller, Response> {
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

pub(super) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Response> {
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
pub(super) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Response> {
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

/// Like [`json_body`], but an empty (or all white space) body is `T::default()`.
pub(super) fn optional_json_body<T: serde::de::DeserializeOwned + Default>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Response> {
    let bytes = body_bytes(body)?;
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        Ok(T::default())
    } else {
        parse_json(&bytes)
    }
}

pub(super) fn reply(r: Result<ops::OpReply, OpError>) -> Response {
    match r {
        Ok(rep) => (
            super::outcome::reply_status(rep.kind),
            [(header::CONTENT_TYPE, "application/json")],
            rep.body,
        )
            .into_response(),
        Err(e) => op_error(e),
    }
}

pub(crate) async fn write_op(shared: &Shared, op: Op) -> Response {
    reply(shared.execute(op).await)
}

pub(super) fn parse_u64(field: &str, v: &str) -> Result<u64, Response> {
    v.trim()
        .parse::<u64>()
        .map_err(|_| bad(format!("{field} must be an integer")))
}

/// A change-feed cursor: an integer in 0..=i64::MAX (what openapi.yaml's
/// `int64, minimum 0` allows); anything else is a 400.
pub(super) fn parse_cursor(v: &str) -> Result<u64, Response> {
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
pub(super) fn parse_clamped_limit(v: &str) -> Result<usize, Response> {
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
