//! The HTTP accept loop: the API router behind limits that a slow or hostile
//! client cannot get around (CONTRACT v2, `[api] header_timeout_ms`,
//! `body_timeout_ms`, `max_connections`).
//!
//! `axum::serve` has no header or body timeout and no connection limit, so
//! the node accepts connections itself and serves each with hyper's HTTP/1
//! connection:
//! - headers: hyper's `header_read_timeout`, which also covers an idle
//!   keep-alive connection waiting for its next request and a connection that
//!   never sends a byte;
//! - body: [`DeadlineBody`] ends the body with an error once
//!   `body_timeout_ms` have passed since the headers, however slowly it
//!   trickles, and the request is answered `408 {"error":"timeout"}` with the
//!   connection closed;
//! - connections: a semaphore of `max_connections` permits; a connection over
//!   the limit is answered `503` at once and closed.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tower::ServiceExt;

/// hyper's read buffer per connection at most: request heads larger than
/// this are refused (431), and N connections hold at most N × this.
pub const CONN_BUF_BYTES_MAX: usize = 64 * 1024;
/// How long a clean shutdown waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The answer to a connection over `max_connections`, written without
/// waiting: a client that does not read it just loses it.
fn over_limit_response() -> Vec<u8> {
    let body = r#"{"error":"unavailable","message":"too many open HTTP connections ([api] max_connections); retry shortly"}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The limits of [`serve`], from `[api]`.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
}

impl HttpLimits {
    pub fn from_config(api: &crate::config::ApiConfig) -> HttpLimits {
        HttpLimits {
            header_timeout: Duration::from_millis(api.header_timeout_ms),
            body_timeout: Duration::from_millis(api.body_timeout_ms),
            max_connections: api.max_connections,
        }
    }
}

/// What the accept loop counts (shown in `/metrics`).
#[derive(Default)]
pub struct HttpStats {
    pub connections_open: std::sync::atomic::AtomicU64,
    pub connections_refused: std::sync::atomic::AtomicU64,
    pub body_timeouts: std::sync::atomic::AtomicU64,
}

/// Serves `app` on `listener` until `stop` fires, then lets requests in
/// flight finish (at most `SHUTDOWN_GRACE`).
pub async fn serve(
    listener: TcpListener,
    tls: Option<rustls::ServerConfig>,
    app: Router,
    limits: HttpLimits,
    stats: Arc<HttpStats>,
    mut stop: oneshot::Receiver<()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(CONN_BUF_BYTES_MAX);
    // `[api.tls]`: the handshake runs in the connection's own task, within
    // the header timeout, so a client that stalls it holds one permit for at
    // most that long, like a slow request head.
    let acceptor = tls.map(|cfg| tokio_rustls::TlsAcceptor::from(Arc::new(cfg)));
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            stats.connections_refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "HTTP connection over max_connections; closed");
            if acceptor.is_none() {
                let _ = stream.try_write(&over_limit_response());
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let stats_c = stats.clone();
        let body_timeout = limits.body_timeout;
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            handle(app.clone(), req, body_timeout, stats_c.clone())
        });
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let header_timeout = limits.header_timeout;
        let stats_c = stats.clone();
        stats_c.connections_open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let served = match acceptor {
                None => {
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(stream), svc))
                        .await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            watcher
                                .watch(builder.serve_connection(TokioIo::new(tls), svc))
                                .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
            stats_c.connections_open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP requests still running after the shutdown grace; dropping them");
    }
}

async fn handle(
    app: Router,
    req: Request<Incoming>,
    body_timeout: Duration,
    stats: Arc<HttpStats>,
) -> Result<Response<Body>, Infallible> {
    let timed_out = Arc::new(AtomicBool::new(false));
    let req = req.map(|b| Body::new(DeadlineBody::new(b, body_timeout, timed_out.clone())));
    let resp = app.oneshot(req).await?;
    if timed_out.load(Ordering::Relaxed) {
        stats.body_timeouts.fetch_add(1, Ordering::Relaxed);
        return Ok(timeout_response(body_timeout));
    }
    Ok(resp)
}

fn timeout_response(body_timeout: Duration) -> Response<Body> {
    let body = serde_json::json!({
        "error": "timeout",
        "message": format!(
            "the request body did not arrive within {} ms ([api] body_timeout_ms)",
            body_timeout.as_millis()
        ),
    });
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::REQUEST_TIMEOUT;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // The rest of the body may still be on its way: never read it as a request.
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The error a body ends with when its deadline passes.
#[derive(Debug)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimeout {}

/// A request body with one deadline for the whole of it (not per chunk: a
/// client sending one byte a second would reset a per-chunk timer forever).
pub struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timed_out: Arc<AtomicBool>,
}

impl DeadlineBody {
    fn new(inner: Incoming, timeout: Duration, timed_out: Arc<AtomicBool>) -> DeadlineBody {
        DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timed_out,
        }
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(r) => Poll::Ready(r.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    self.timed_out.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
