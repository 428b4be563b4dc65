//! The dashboard: `GET /` serves one HTML page (inline CSS and JS, no
//! external assets) that retail IT keeps on a screen. The page itself needs no
//! token; it asks for one once, keeps it in the browser's session storage and
//! reads the API with it: `/healthz`, `/api/peers`, `/api/overdrafts`,
//! `/api/dashboard` (below), `/api/inventory` and the live
//! `/api/inventory/stream`.
//!
//! `GET /api/dashboard` (`read`) adds what no other route gives: sales and
//! refusals per minute at this node, counted by a middleware around
//! `POST /api/sales` (201 = a sale, 409 `insufficient_stock` = a refusal).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;

use crate::state::Shared;

/// The page (checked in as a file of its own so it can be read and edited as HTML).
const PAGE: &str = include_str!("dashboard.html");
/// Minutes of sales and refusals kept (one hour of bars).
pub const MINUTES_KEPT: usize = 60;
/// Largest 409 body read to tell `insufficient_stock` from `id_conflict`
/// (the body lists the short lines; larger ones are counted as refusals).
const REFUSAL_BODY_BYTES_MAX: usize = 256 << 10;

/// Sales and refusals per minute (unix minute → counts), newest last.
#[derive(Default)]
pub struct Rates {
    minutes: Mutex<VecDeque<(u64, u64, u64)>>,
}

impl Rates {
    fn add(&self, now_ms: u64, sales: u64, refused: u64) {
        let minute = now_ms / 60_000;
        let mut m = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        match m.back_mut() {
            Some(last) if last.0 == minute => {
                last.1 += sales;
                last.2 += refused;
            }
            // A clock stepping back adds to the newest minute instead of
            // breaking the order.
            Some(last) if last.0 > minute => {
                last.1 += sales;
                last.2 += refused;
            }
            _ => m.push_back((minute, sales, refused)),
        }
        while m.len() > MINUTES_KEPT {
            m.pop_front();
        }
    }

    /// The last `MINUTES_KEPT` minutes up to `now`, oldest first, zeros included.
    fn series(&self, now_ms: u64) -> Vec<(u64, u64, u64)> {
        let now_min = now_ms / 60_000;
        let m = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        let first = now_min.saturating_sub(MINUTES_KEPT as u64 - 1);
        (first..=now_min)
            .map(|min| {
                m.iter()
                    .find(|e| e.0 == min)
                    .copied()
                    .unwrap_or((min, 0, 0))
            })
            .collect()
    }
}

/// Adds the page, `/api/dashboard` and the sales counter to the API router.
pub fn wrap(api: Router, shared: Arc<Shared>) -> Router {
    let rates = Arc::new(Rates::default());
    let own = Router::new()
        .route("/", get(page))
        .route("/api/dashboard", get(summary))
        // As the API's routes: a wrong method is a JSON 405, not an empty one
        // (found by the `http` fuzz target).
        .method_not_allowed_fallback(crate::api::method_not_allowed)
        .with_state((shared.clone(), rates.clone()));
    api.merge(own)
        .layer(axum::middleware::from_fn_with_state((shared, rates), count))
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything is inline; nothing may be fetched from elsewhere.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

type St = State<(Arc<Shared>, Arc<Rates>)>;

async fn count(State((sh, rates)): St, req: Request, next: Next) -> Response {
    let is_sale = req.method() == Method::POST && req.uri().path() == "/api/sales";
    let resp = next.run(req).await;
    if !is_sale {
        return resp;
    }
    match resp.status() {
        StatusCode::CREATED => {
            rates.add(sh.now_ms(), 1, 0);
            resp
        }
        StatusCode::CONFLICT => {
            let (parts, body) = resp.into_parts();
            match axum::body::to_bytes(body, REFUSAL_BODY_BYTES_MAX).await {
                Ok(bytes) => {
                    if bytes
                        .windows(b"insufficient_stock".len())
                        .any(|w| w == b"insufficient_stock")
                    {
                        rates.add(sh.now_ms(), 0, 1);
                    }
                    Response::from_parts(parts, Body::from(bytes))
                }
                Err(_) => {
                    rates.add(sh.now_ms(), 0, 1);
                    crate::api::error(
                        StatusCode::CONFLICT,
                        "insufficient_stock",
                        "the sale was refused",
                    )
                }
            }
        }
        _ => resp,
    }
}

/// `GET /api/dashboard` (`read`): this node and its sales and refusals per minute.
async fn summary(State((sh, rates)): St, headers: HeaderMap) -> Response {
    if let Err(r) = crate::api::require(&sh, &headers, crate::config::Scope::Read) {
        return r;
    }
    let now = sh.now_ms();
    let per_minute: Vec<serde_json::Value> = rates
        .series(now)
        .into_iter()
        .map(|(min, s, r)| {
            json!({"minute": storemesh_protocol::time::format_rfc3339_ms(min * 60_000), "sales": s, "refused": r})
        })
        .collect();
    let (synced, seq_max, locations) = {
        let r = sh.read.read().unwrap_or_else(|p| p.into_inner());
        let locs: Vec<serde_json::Value> = r
            .locations
            .iter()
            .map(|(l, (owner, policy, tz))| {
                let heard = r
                    .last_heard
                    .get(l)
                    .map(|t| {
                        if *t == u64::MAX {
                            0
                        } else {
                            now.saturating_sub(*t) / 1000
                        }
                    });
                json!({"location": l, "node": owner, "policy": policy, "timezone": tz, "last_heard_s": heard})
            })
            .collect();
        (r.synced, r.seq_max, locs)
    };
    axum::Json(json!({
        "name": sh.cfg.name,
        "node_id": sh.node_id.hex(),
        "location": sh.cfg.location,
        "role": sh.cfg.role.as_str(),
        "synced": synced,
        "https": sh.cfg.api.tls.is_some(),
        "change_cursor": seq_max,
        "locations": locations,
        "per_minute": per_minute,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_keep_an_hour_of_minutes() {
        let r = Rates::default();
        let t0 = 1_700_000_000_000u64;
        r.add(t0, 1, 0);
        r.add(t0 + 1000, 1, 1);
        r.add(t0 + 61_000, 0, 1);
        let s = r.series(t0 + 61_000);
        assert_eq!(s.len(), MINUTES_KEPT);
        let last = s[MINUTES_KEPT - 1];
        let before = s[MINUTES_KEPT - 2];
        assert_eq!((last.1, last.2), (0, 1));
        assert_eq!((before.1, before.2), (2, 1));
        for i in 0..200u64 {
            r.add(t0 + i * 60_000, 1, 0);
        }
        assert!(r.minutes.lock().unwrap().len() <= MINUTES_KEPT);
    }

    #[test]
    fn page_has_no_external_assets() {
        for bad in ["http://", "https://", "src=\"//", "href=\"//"] {
            assert!(!PAGE.contains(bad), "the page refers to {bad}");
        }
    }
}
