//! Node status routes: health, metrics, peers, webhooks, overdrafts,
//! documents and the OpenAPI description.

#![allow(clippy::result_large_err)]

use std::sync::atomic::Ordering;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::config::Scope;
use crate::state::{now_ms, Shared};

use super::extract::*;
use super::*;

pub(super) async fn healthz(State(sh): S) -> Response {
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

pub(super) async fn metrics(State(sh): S) -> Response {
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
        "ledger_epochs_started_total",
        "counter",
        "Ledger epochs this node started as a location's owner (history cuts).",
        m.epochs_started.load(Ordering::Relaxed),
    );
    line(
        "ledger_epochs_joined_total",
        "counter",
        "Moves of this node to a newer ledger epoch another node started.",
        m.epochs_joined.load(Ordering::Relaxed),
    );
    line(
        "records_parts_cold",
        "gauge",
        "Closed records parts held as saved bytes instead of live documents.",
        m.cold_parts.load(Ordering::Relaxed),
    );
    line(
        "certs_held",
        "gauge",
        "Batch certificates held in memory (those of live documents).",
        m.certs_held.load(Ordering::Relaxed),
    );
    line(
        "certs_held_bytes",
        "gauge",
        "Bytes of the batch certificates held in memory.",
        m.certs_held_bytes.load(Ordering::Relaxed),
    );
    line(
        "certs_verified_total",
        "counter",
        "Batch certificates whose signature this node checked.",
        m.certs_verified.load(Ordering::Relaxed),
    );
    line(
        "records_parts_cold_bytes",
        "gauge",
        "Bytes of the closed records parts held cold.",
        m.cold_part_bytes.load(Ordering::Relaxed),
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
    http_metrics_text(&sh, &mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// The robustness figures of `/metrics`: HTTP connections and timeouts, and
/// peer input refused by reason (CONTRACT v2,
/// `storemesh_rejected_changes_total{reason="..."}`).
fn http_metrics_text(sh: &Shared, out: &mut String) {
    use std::fmt::Write;
    let h = &sh.http;
    for (name, kind, help, v) in [
        (
            "http_connections_open",
            "gauge",
            "HTTP connections open.",
            h.connections_open.load(Ordering::Relaxed),
        ),
        (
            "http_connections_refused_total",
            "counter",
            "HTTP connections closed at once because max_connections were open.",
            h.connections_refused.load(Ordering::Relaxed),
        ),
        (
            "http_body_timeouts_total",
            "counter",
            "Requests answered 408 because the body did not arrive within body_timeout_ms.",
            h.body_timeouts.load(Ordering::Relaxed),
        ),
    ] {
        let _ = write!(
            out,
            "# HELP storemesh_{name} {help}\n# TYPE storemesh_{name} {kind}\nstoremesh_{name} {v}\n"
        );
    }
    let _ = write!(
        out,
        "# HELP storemesh_rejected_changes_total Peer input refused, by reason.\n# TYPE storemesh_rejected_changes_total counter\n"
    );
    let rejected = sh.rejected.read().map(|r| r.clone()).unwrap_or_default();
    for (reason, n) in rejected {
        let _ = writeln!(
            out,
            "storemesh_rejected_changes_total{{reason=\"{reason}\"}} {n}"
        );
    }
}

pub(super) async fn peers(State(sh): S, headers: HeaderMap) -> Response {
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

/// `GET /api/webhooks` (`read`): per webhook its name, cursor, lag and last error.
pub(super) async fn webhooks(State(sh): S, headers: HeaderMap) -> Response {
    if let Err(r) = require(&sh, &headers, Scope::Read) {
        return r;
    }
    let fm = crate::webhooks::feed_max(&sh);
    let items: Vec<Value> = sh
        .webhooks
        .snapshot()
        .iter()
        .map(|(name, s)| {
            json!({
                "name": name,
                "events": s.events,
                "cursor": s.cursor,
                "lag": sh.webhooks.lag(s, fm),
                "last_error": s.last_error,
                "last_delivery": if s.last_delivery_ms == 0 { Value::Null } else {
                    Value::String(storemesh_protocol::time::format_rfc3339_ms(s.last_delivery_ms)) },
                "batches_delivered": s.batches_delivered,
                "items_delivered": s.items_delivered,
                "failures": s.failures,
            })
        })
        .collect();
    axum::Json(json!({ "items": items })).into_response()
}

pub(super) async fn overdrafts(State(sh): S, headers: HeaderMap) -> Response {
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
                .alarms()
                .values()
                .map(|a| json!({"kind": a.kind, "node": a.node, "id": a.id, "record": a.record}))
                .collect();
            // Loyalty overdrafts: balances below zero after concurrent
            // redemptions; erased customers are nobody's business any more.
            if customers {
                for (c, view) in e.views.customers() {
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

pub(super) async fn documents(State(sh): S, headers: HeaderMap) -> Response {
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

pub(super) async fn document_get(
    State(sh): S,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
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

pub(super) async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/yaml")],
        include_str!("../../../openapi.yaml"),
    )
        .into_response()
}
