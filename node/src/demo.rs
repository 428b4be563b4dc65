//! `storemesh demo`: a guided tour on loopback in temporary directories.
//!
//! Two stores and a web shop peer over real QUIC; every step goes through the
//! real HTTP API. The tour: receipts, sales at both stores, an allocation to the
//! web shop, a partition during which every side keeps selling (the web shop
//! sells its allocation, and is refused beyond it), the heal, convergence.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use crate::config::{Config, PeerConfig, Policy, Role, Scope, TokenConfig};
use crate::identity::Identity;
use crate::node::NodeHandle;

const PRODUCTS: [(u64, &str); 3] = [
    (1001, "espresso beans 1kg"),
    (1002, "milk frother"),
    (1003, "ceramic mug"),
];
/// How long the tour waits for convergence at most.
const CONVERGE_LIMIT: Duration = Duration::from_secs(20);

/// A free loopback port (bound and released; fine for a demo or a test).
pub fn free_port() -> anyhow::Result<u16> {
    let s = UdpSocket::bind("127.0.0.1:0").context("cannot find a free port")?;
    let tcp = std::net::TcpListener::bind(("127.0.0.1", s.local_addr()?.port()));
    match tcp {
        Ok(_) => Ok(s.local_addr()?.port()),
        Err(_) => free_port(),
    }
}

/// Writes config + identity for a mesh of nodes in `root/<name>`; all peer with
/// `links` (pairs of indices). Returns the admin token of each node.
pub fn make_mesh(
    root: &Path,
    nodes: &[(&str, Role, Policy)],
    links: &[(usize, usize)],
) -> anyhow::Result<Vec<(std::path::PathBuf, String)>> {
    let mut cfgs = Vec::new();
    let mut ids = Vec::new();
    for (name, role, policy) in nodes {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        let mut cfg = Config::new(name);
        cfg.role = *role;
        cfg.policy = *policy;
        cfg.quic_addr = format!("127.0.0.1:{}", free_port()?);
        cfg.http_addr = format!("127.0.0.1:{}", free_port()?);
        cfg.sync.anti_entropy_ms = 1000;
        cfg.sync.reconnect_min_ms = 50;
        cfg.sync.reconnect_max_ms = 500;
        let token = format!("{name}-admin-token-{:016x}", rand::random::<u64>());
        cfg.api.tokens.push(TokenConfig {
            locations: None,
            name: "admin".into(),
            token: token.clone(),
            scopes: vec![Scope::Admin],
        });
        let id = Identity::generate(name)?;
        id.save(&dir)?;
        ids.push(id.node_id);
        cfgs.push((dir, cfg, token));
    }
    for (a, b) in links {
        let (pa, pb) = (cfgs[*a].1.clone(), cfgs[*b].1.clone());
        cfgs[*a].1.peers.push(PeerConfig {
            name: pb.name.clone(),
            id: ids[*b],
            addr: pb.quic_addr.clone(),
            location: None,
        });
        cfgs[*b].1.peers.push(PeerConfig {
            name: pa.name.clone(),
            id: ids[*a],
            addr: pa.quic_addr.clone(),
            location: None,
        });
    }
    let mut out = Vec::new();
    for (dir, cfg, token) in cfgs {
        cfg.save(&dir)?;
        out.push((dir, token));
    }
    Ok(out)
}

/// A small HTTP client bound to one node.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub token: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(addr: SocketAddr, token: &str) -> Client {
        Client {
            base: format!("http://{addr}"),
            token: token.to_string(),
            http: reqwest::Client::new(),
        }
    }
    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }
    /// `(product, location) → on_hand` for the given products, as this node sees it.
    pub async fn stock(&self, products: &[u64]) -> anyhow::Result<Vec<(u64, String, i64)>> {
        let mut out = Vec::new();
        for p in products {
            let (s, v) = self.get(&format!("/api/inventory?product_id={p}")).await?;
            if s != 200 {
                continue;
            }
            for l in v["locations"].as_array().cloned().unwrap_or_default() {
                out.push((
                    *p,
                    l["location"].as_str().unwrap_or("").to_string(),
                    l["on_hand"].as_i64().unwrap_or(0),
                ));
            }
        }
        out.sort();
        Ok(out)
    }
}

fn expect(ok: bool, what: &str) -> anyhow::Result<()> {
    if !ok {
        anyhow::bail!("demo step failed: {what}");
    }
    Ok(())
}

async fn table(title: &str, names: &[&str], clients: &[Client]) -> anyhow::Result<()> {
    println!("\n{title}");
    println!(
        "  {:<24} {:>10} {:>10} {:>10}   (on hand as each node sees it: store-1 / store-2 / total)",
        "product", names[0], names[1], names[2]
    );
    for (p, label) in PRODUCTS {
        let mut cells = Vec::new();
        for c in clients {
            let (_, v) = c.get(&format!("/api/inventory?product_id={p}")).await?;
            let at = |l: &str| {
                v["locations"]
                    .as_array()
                    .and_then(|a| a.iter().find(|x| x["location"] == l))
                    .and_then(|x| x["on_hand"].as_i64())
                    .unwrap_or(0)
            };
            cells.push(format!(
                "{}/{}/{}",
                at("store-1"),
                at("store-2"),
                v["stock_level"].as_i64().unwrap_or(0)
            ));
        }
        println!(
            "  {:<24} {:>10} {:>10} {:>10}",
            format!("{p} {label}"),
            cells[0],
            cells[1],
            cells[2]
        );
    }
    Ok(())
}

async fn wait_until<F, Fut>(limit: Duration, mut f: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let t = Instant::now();
    while t.elapsed() < limit {
        if f().await? {
            return Ok(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("timed out after {limit:?}")
}

/// Waits until every client reports identical stock for the demo products.
pub async fn converge(
    clients: &[Client],
    products: &[u64],
    limit: Duration,
) -> anyhow::Result<Duration> {
    wait_until(limit, || async {
        let first = clients[0].stock(products).await?;
        for c in &clients[1..] {
            if c.stock(products).await? != first {
                return Ok(false);
            }
        }
        Ok(!first.is_empty())
    })
    .await
}

/// Runs the demo; with `serve` it keeps the mesh running after the tour.
pub async fn run(serve: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("storemesh-demo-")
        .tempdir()?;
    let names = ["store-1", "store-2", "web"];
    let dirs = make_mesh(
        tmp.path(),
        &[
            ("store-1", Role::Store, Policy::Strict),
            ("store-2", Role::Store, Policy::Strict),
            ("web", Role::Webshop, Policy::Strict),
        ],
        &[(0, 1), (0, 2), (1, 2)],
    )?;
    println!(
        "storemesh demo: two stores and a web shop on loopback (data in {})",
        tmp.path().display()
    );
    let mut nodes = Vec::new();
    for (dir, _) in &dirs {
        nodes.push(NodeHandle::start(dir).await?);
    }
    let clients: Vec<Client> = nodes
        .iter()
        .zip(&dirs)
        .map(|(n, (_, t))| Client::new(n.http_addr, t))
        .collect();
    wait_until(Duration::from_secs(10), || async {
        Ok(nodes.iter().all(|n| n.transport.connected().len() == 2))
    })
    .await
    .context("the nodes did not connect")?;
    println!("mesh up: every node connected to the other two over mutual-TLS QUIC");

    // Goods in.
    for (i, q) in [(0usize, 20u64), (1, 15)] {
        let lines: Vec<Value> = PRODUCTS
            .iter()
            .map(|(p, _)| json!({"product_id": p, "quantity": q}))
            .collect();
        let (s, _) = clients[i].post("/api/receipts", json!({"receipt_id": format!("demo-rcv-{i}"), "location": names[i], "lines": lines})).await?;
        expect(s == 201, "receipt")?;
    }
    // Sales at both stores.
    let (s, _) = clients[0].post("/api/sales", json!({"sale_id": "demo-s1", "lines": [{"product_id": 1001, "quantity": 2}, {"product_id": 1003, "quantity": 1}]})).await?;
    expect(s == 201, "sale at store-1")?;
    let (s, _) = clients[1]
        .post(
            "/api/sales",
            json!({"sale_id": "demo-s2", "lines": [{"product_id": 1002, "quantity": 3}]}),
        )
        .await?;
    expect(s == 201, "sale at store-2")?;
    // The web shop's online allocation: sell-rights granted by each store.
    let (s, _) = clients[0].post("/api/grants", json!({"grant_id": "demo-g1", "product_id": 1001, "location": "store-1", "to": "web", "quantity": 5})).await?;
    expect(s == 201, "grant from store-1")?;
    let (s, _) = clients[1].post("/api/grants", json!({"grant_id": "demo-g2", "product_id": 1001, "location": "store-2", "to": "web", "quantity": 3})).await?;
    expect(s == 201, "grant from store-2")?;
    let products: Vec<u64> = PRODUCTS.iter().map(|(p, _)| *p).collect();
    converge(&clients, &products, CONVERGE_LIMIT)
        .await
        .context("first convergence")?;
    let (_, v) = clients[2].get("/api/inventory?product_id=1001").await?;
    println!(
        "web shop: stock_level {} of 1001, available to sell online {}",
        v["stock_level"], v["available"]
    );
    table("BEFORE the partition", &names, &clients).await?;

    // Partition: store-1 loses its line.
    println!("\n-- store-1's internet line goes down (all its QUIC links cut) --");
    nodes[0].set_partitioned(true);
    wait_until(Duration::from_secs(10), || async {
        Ok(nodes[0].transport.connected().is_empty())
    })
    .await?;
    let (s, _) = clients[0].post("/api/sales", json!({"sale_id": "demo-p1", "lines": [{"product_id": 1001, "quantity": 4}, {"product_id": 1002, "quantity": 2}]})).await?;
    println!("store-1 sells 4 x 1001 + 2 x 1002 while offline: HTTP {s}");
    expect(s == 201, "offline sale at store-1")?;
    let (s, _) = clients[1]
        .post(
            "/api/sales",
            json!({"sale_id": "demo-p2", "lines": [{"product_id": 1001, "quantity": 1}]}),
        )
        .await?;
    println!("store-2 sells 1 x 1001: HTTP {s}");
    expect(s == 201, "sale at store-2")?;
    let (s, _) = clients[2].post("/api/sales", json!({"sale_id": "demo-w1", "location": "store-1", "lines": [{"product_id": 1001, "quantity": 5}]})).await?;
    println!("web shop sells its whole store-1 allocation (5 x 1001) although store-1 is unreachable: HTTP {s}");
    expect(s == 201, "web shop sells its allocation")?;
    let (s, v) = clients[2].post("/api/sales", json!({"sale_id": "demo-w2", "location": "store-1", "lines": [{"product_id": 1001, "quantity": 1}]})).await?;
    println!(
        "web shop tries one more from store-1: HTTP {s} {} (no oversell)",
        v["error"]
    );
    expect(s == 409, "web shop refused beyond its allocation")?;
    let (s, _) = clients[2]
        .post(
            "/api/sales",
            json!({"sale_id": "demo-w3", "lines": [{"product_id": 1001, "quantity": 2}]}),
        )
        .await?;
    println!("web shop sells 2 more from its store-2 allocation: HTTP {s}");
    expect(s == 201, "web shop sells from store-2 allocation")?;
    table("DURING the partition (views differ)", &names, &clients).await?;

    // Heal.
    println!("\n-- store-1's line comes back --");
    let heal = Instant::now();
    nodes[0].set_partitioned(false);
    converge(&clients, &products, CONVERGE_LIMIT)
        .await
        .context("convergence after the heal")?;
    let took = heal.elapsed();
    table("AFTER the heal (identical on every node)", &names, &clients).await?;
    let final_stock = clients[0].stock(&products).await?;
    expect(
        final_stock.iter().all(|(_, _, q)| *q >= 0),
        "no negative stock",
    )?;
    println!(
        "\nconverged {:.0} ms after the heal; no location went below zero; demo took {:.1} s",
        took.as_secs_f64() * 1000.0,
        started.elapsed().as_secs_f64()
    );
    println!(
        "try it: curl 'http://{}/api/inventory?product_id=1001'",
        nodes[2].http_addr
    );
    if serve {
        println!("serving until Ctrl-C; admin tokens:");
        for (n, (_, t)) in names.iter().zip(&dirs) {
            println!("  {n}: {t}");
        }
        crate::server::wait_for_signal().await;
    }
    let stops: Vec<_> = nodes
        .into_iter()
        .map(|n| tokio::spawn(n.shutdown()))
        .collect();
    for s in stops {
        let _ = s.await;
    }
    Ok(())
}
