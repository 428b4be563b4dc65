//! The HTTP API of CONTRACT.md (axum). Handlers are thin: they authenticate,
//! parse and validate, then either read the committed read state or send the
//! operation to the engine thread and answer after its group commit.
//!
//! By concern: `extract` (error mapping, auth, body limits and parsing),
//! `operations` (writes and what they create), `inventory`, `customers`,
//! `status`, `outcome` (the core's typed results as HTTP statuses and
//! JSON error bodies), `books` (count sessions, declared locations, and the
//! write checks of location-limited tokens and the `override` scope).

// Handlers return early with a ready `Response` as the error; boxing it would
// only add noise on a path that is not hot.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;

use crate::state::Shared;

/// Products in one `product_ids` read, at most.
pub const PRODUCT_IDS_MAX: usize = 250;
/// Largest stock file accepted by `POST /api/imports/counts`.
pub const IMPORT_BYTES_MAX: usize = 128 << 20;
/// Page size of listings, at most.
pub const PAGE_MAX: usize = 1000;

type S = State<Arc<Shared>>;

mod books;
mod customers;
mod extract;
mod inventory;
mod operations;
pub mod outcome;
mod status;

use customers::*;
use inventory::*;
use operations::*;
use status::*;

pub(crate) use extract::require;
pub use extract::{error, MESSAGE_BYTES_MAX};
pub use inventory::{STREAM_IDLE_TIMEOUT_S_DEFAULT, STREAM_IDLE_TIMEOUT_S_MAX};

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
        .route("/api/counts/{id}", get(books::count_get))
        .route("/api/counts/{id}/lines", post(books::count_lines))
        .route("/api/counts/{id}/finish", post(books::count_finish))
        .route(
            "/api/locations",
            post(books::locations_post).get(books::locations_get),
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
        .route("/api/webhooks", get(webhooks))
        .fallback(not_found_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(shared)
}

/// Bytes of a plain-text error body turned into JSON, at most (axum's
/// extractor rejections are a line of text).
const PLAIN_ERROR_BYTES_MAX: usize = 4096;

/// Every error answer is JSON (CONTRACT: `{"error","message"}`), also the
/// ones axum's extractors write as plain text before a handler runs — a path
/// segment that is not UTF-8 once percent-decoded answered `400 Invalid URL:
/// Invalid UTF-8 in `id`` (found by the `http` fuzz target).
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let text = axum::body::to_bytes(resp.into_body(), PLAIN_ERROR_BYTES_MAX)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    error(status, code, message)
}

pub(crate) async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method (see openapi.yaml)",
    )
}

async fn not_found_route() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}
