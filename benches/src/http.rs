//! A minimal HTTP/1.1 keep-alive client and a load generator on top of it.
//!
//! The client is deliberately small (one request at a time per connection,
//! `Content-Length` or chunked bodies) so that the load generator spends as
//! little of the 2 shared cores as possible: what is measured is the server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The server closed the connection before any byte of the answer.
#[derive(Debug)]
struct ClosedBeforeAnswer(&'static str);

impl std::fmt::Display for ClosedBeforeAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for ClosedBeforeAnswer {}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionAborted
    )
}

/// One keep-alive connection.
pub struct Conn {
    addr: SocketAddr,
    io: Option<BufReader<TcpStream>>,
    line: Vec<u8>,
}

/// Builds the bytes of a request.
pub fn request(method: &str, path: &str, token: Option<&str>, body: Option<&[u8]>) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: bench\r\n");
    if let Some(t) = token {
        r.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let mut out = match body {
        Some(b) => {
            r.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                b.len()
            ));
            let mut v = r.into_bytes();
            v.extend_from_slice(b);
            v
        }
        None => {
            r.push_str("\r\n");
            r.into_bytes()
        }
    };
    out.shrink_to_fit();
    out
}

impl Conn {
    pub fn new(addr: SocketAddr) -> Conn {
        Conn {
            addr,
            io: None,
            line: Vec::with_capacity(256),
        }
    }

    async fn io(&mut self) -> Result<&mut BufReader<TcpStream>> {
        if self.io.is_none() {
            let s = TcpStream::connect(self.addr)
                .await
                .with_context(|| format!("connecting to {}", self.addr))?;
            s.set_nodelay(true)?;
            self.io = Some(BufReader::with_capacity(16 * 1024, s));
        }
        Ok(self.io.as_mut().expect("connected"))
    }

    /// Sends one request and reads the whole response: (status, body).
    ///
    /// The node closes a keep-alive connection that waited longer than its
    /// header timeout (`[api] header_timeout_ms`, 10 s) for the next request.
    /// A `GET` sent on such a reused connection that is closed before any byte
    /// of the answer arrives is sent once more on a new connection, as HTTP
    /// clients do (RFC 9110 §9.2.2: a safe request may be retried); anything
    /// else is the caller's error.
    pub async fn send(&mut self, req: &[u8]) -> Result<(u16, Vec<u8>)> {
        let reused = self.io.is_some();
        let mut r = self.send_inner(req).await;
        if r.is_err() {
            self.io = None;
        }
        let closed_before_answer = r
            .as_ref()
            .err()
            .is_some_and(|e| e.downcast_ref::<ClosedBeforeAnswer>().is_some());
        if reused && closed_before_answer && req.starts_with(b"GET ") {
            r = self.send_inner(req).await;
            if r.is_err() {
                self.io = None;
            }
        }
        r
    }

    async fn send_inner(&mut self, req: &[u8]) -> Result<(u16, Vec<u8>)> {
        let mut line = std::mem::take(&mut self.line);
        let io = self.io().await?;
        line.clear();
        let first = match io.get_mut().write_all(req).await {
            Ok(()) => io.read_until(b'\n', &mut line).await,
            Err(e) => Err(e),
        };
        match first {
            Ok(0) => return Err(ClosedBeforeAnswer("connection closed").into()),
            Ok(_) => {}
            Err(e) if line.is_empty() && is_reset(&e) => {
                return Err(ClosedBeforeAnswer("connection reset").into())
            }
            Err(e) => return Err(e.into()),
        }
        let status: u16 = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line"))?;
        let mut len: Option<usize> = None;
        let mut chunked = false;
        let mut close = false;
        loop {
            line.clear();
            if io.read_until(b'\n', &mut line).await? == 0 {
                bail!("connection closed in headers");
            }
            if line == b"\r\n" {
                break;
            }
            let h = String::from_utf8_lossy(&line).to_ascii_lowercase();
            if let Some(v) = h.strip_prefix("content-length:") {
                len = v.trim().parse().ok();
            } else if h.starts_with("transfer-encoding:") && h.contains("chunked") {
                chunked = true;
            } else if h.starts_with("connection:") && h.contains("close") {
                close = true;
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                io.read_until(b'\n', &mut line).await?;
                let n = usize::from_str_radix(String::from_utf8_lossy(&line).trim(), 16)
                    .map_err(|_| anyhow!("bad chunk size"))?;
                let start = body.len();
                body.resize(start + n + 2, 0);
                io.read_exact(&mut body[start..]).await?;
                body.truncate(start + n);
                if n == 0 {
                    break;
                }
            }
        } else if let Some(n) = len {
            body.resize(n, 0);
            io.read_exact(&mut body).await?;
        }
        self.line = line;
        if close {
            self.io = None;
        }
        Ok((status, body))
    }
}

/// What one load run measured.
#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    /// Responses with the expected status, in the measured window.
    pub ok: u64,
    /// Responses with another status, or failed requests.
    pub errors: u64,
    pub first_error: Option<String>,
    /// Latencies of the `ok` responses, µs.
    pub latencies_us: Vec<u32>,
    pub window: Duration,
}

impl LoadResult {
    pub fn per_sec(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64()
    }
    pub fn p(&self, pct: f64) -> f64 {
        let mut l = self.latencies_us.clone();
        crate::stats::percentile(&mut l, pct) as f64 / 1000.0
    }
}

/// Builds request `seq` of client `client`.
pub type MakeRequest = Arc<dyn Fn(usize, u64) -> Vec<u8> + Send + Sync>;

/// How requests are paced.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// Each client sends its next request as soon as the previous one is answered.
    ClosedLoop,
    /// Requests are scheduled at a fixed total rate (req/s), spread over the
    /// clients; a request sent late because its connection was still waiting
    /// for the previous answer counts from its scheduled time (no coordinated
    /// omission).
    Rate(f64),
}

/// Runs `clients` connections against `addr` for `warmup + window`; only the
/// window is measured.
pub async fn load(
    addr: SocketAddr,
    clients: usize,
    warmup: Duration,
    window: Duration,
    pace: Pace,
    expect: u16,
    make: MakeRequest,
) -> LoadResult {
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + warmup;
    let end = measure_from + window;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr);
            let mut r = LoadResult::default();
            let mut seq = 0u64;
            let interval = match pace {
                Pace::ClosedLoop => None,
                Pace::Rate(rate) => Some(Duration::from_secs_f64(clients as f64 / rate)),
            };
            // Stagger open-loop clients over one interval.
            let mut next =
                start + interval.map_or(Duration::ZERO, |i| i * c as u32 / clients as u32);
            tokio::time::sleep_until(start.into()).await;
            loop {
                // Open loop: latency counts from the scheduled time when this
                // connection is behind schedule (the server was slow: queueing
                // counts), from the actual send when the client's timer woke
                // late (tokio timers have ~1 ms granularity: not the server's doing).
                let (sched, start_at) = match interval {
                    Some(i) => {
                        let s = next;
                        next += i;
                        if Instant::now() < s {
                            tokio::time::sleep_until(s.into()).await;
                            (s, Instant::now())
                        } else {
                            (s, s)
                        }
                    }
                    None => {
                        let now = Instant::now();
                        (now, now)
                    }
                };
                if sched >= end {
                    break;
                }
                let req = make(c, seq);
                seq += 1;
                let res = conn.send(&req).await;
                let done = Instant::now();
                if sched < measure_from {
                    continue;
                }
                match res {
                    Ok((s, _)) if s == expect => {
                        r.ok += 1;
                        r.latencies_us.push(
                            done.duration_since(start_at)
                                .as_micros()
                                .min(u32::MAX as u128) as u32,
                        );
                    }
                    Ok((s, body)) => {
                        r.errors += 1;
                        if r.first_error.is_none() {
                            r.first_error = Some(format!(
                                "HTTP {s}: {}",
                                String::from_utf8_lossy(&body[..body.len().min(200)])
                            ));
                        }
                    }
                    Err(e) => {
                        r.errors += 1;
                        if r.first_error.is_none() {
                            r.first_error = Some(format!("{e:#}"));
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            r
        }));
    }
    let mut total = LoadResult {
        window,
        ..Default::default()
    };
    for t in tasks {
        if let Ok(r) = t.await {
            total.ok += r.ok;
            total.errors += r.errors;
            if total.first_error.is_none() {
                total.first_error = r.first_error;
            }
            total.latencies_us.extend(r.latencies_us);
        }
    }
    total
}

/// One request on a fresh connection: (status, body).
pub async fn once(addr: SocketAddr, req: &[u8]) -> Result<(u16, Vec<u8>)> {
    Conn::new(addr).send(req).await
}

/// GET as JSON (with a token).
pub async fn get_json(
    conn: &mut Conn,
    path: &str,
    token: &str,
) -> Result<(u16, serde_json::Value)> {
    let (s, b) = conn.send(&request("GET", path, Some(token), None)).await?;
    Ok((
        s,
        serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null),
    ))
}

/// POST JSON (with a token).
pub async fn post_json(
    conn: &mut Conn,
    path: &str,
    token: &str,
    body: &serde_json::Value,
) -> Result<(u16, serde_json::Value)> {
    let b = serde_json::to_vec(body)?;
    let (s, r) = conn
        .send(&request("POST", path, Some(token), Some(&b)))
        .await?;
    Ok((
        s,
        serde_json::from_slice(&r).unwrap_or(serde_json::Value::Null),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Answers one request per connection, then closes it without reading
    /// the next one: what the node does to a keep-alive connection left idle
    /// past its header timeout. Returns the number of connections accepted.
    async fn one_answer_per_connection(l: TcpListener, conns: usize) -> usize {
        for _ in 0..conns {
            let (s, _) = l.accept().await.expect("accept");
            let mut s = BufReader::new(s);
            let mut line = Vec::new();
            loop {
                line.clear();
                if s.read_until(b'\n', &mut line).await.expect("read") == 0 || line == b"\r\n" {
                    break;
                }
            }
            s.get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .expect("write");
            s.get_mut().shutdown().await.expect("shutdown");
        }
        conns
    }

    #[tokio::test]
    async fn a_get_on_a_keep_alive_connection_the_server_closed_is_sent_again() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(one_answer_per_connection(l, 2));
        let mut c = Conn::new(addr);
        let get = request("GET", "/healthz", None, None);
        assert_eq!(c.send(&get).await.expect("first").0, 200);
        // The server closed the connection after its answer: the second GET
        // goes out on the old connection, sees it closed, and is sent again.
        assert_eq!(c.send(&get).await.expect("second").0, 200);
        assert_eq!(server.await.expect("server"), 2);
    }

    #[tokio::test]
    async fn a_post_on_a_closed_connection_is_not_sent_again() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(one_answer_per_connection(l, 1));
        let mut c = Conn::new(addr);
        let get = request("GET", "/healthz", None, None);
        assert_eq!(c.send(&get).await.expect("first").0, 200);
        server.await.expect("server");
        let post = request("POST", "/api/sales", None, Some(b"{}"));
        let e = c.send(&post).await.expect_err("a closed connection");
        // Not sent again: a second try would have found no listener.
        assert!(e.downcast_ref::<ClosedBeforeAnswer>().is_some(), "{e:#}");
    }
}
