//! End-to-end: real nodes on loopback (QUIC + HTTP + redb), the mesh behaviours
//! of the node issue.

use std::time::Duration;

use serde_json::json;
use storemesh_testkit::*;

const S: Policy = Policy::Strict;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sale_at_store_is_visible_at_webshop_within_a_second() {
    let _serial = timing_sensitive().await;
    let m = Mesh::start(
        &[("store-a", Role::Store, S), ("web", Role::Webshop, S)],
        &[(0, 1)],
    )
    .await;
    m.wait_connected(0, 1).await;
    let (s, _) = m.clients[0]
        .post("/api/receipts", receipt("r1", "store-a", &[(12345, 50)]))
        .await
        .unwrap();
    assert_eq!(s, 201);
    wait_for(Duration::from_secs(5), || async {
        stock_level(&m.clients[1], 12345).await == Some(50)
    })
    .await
    .unwrap();
    let (s, _) = m.clients[0]
        .post("/api/sales", sale("s1", None, &[(12345, 3)]))
        .await
        .unwrap();
    assert_eq!(s, 201);
    let took = wait_for(Duration::from_secs(1), || async {
        stock_level(&m.clients[1], 12345).await == Some(47)
    })
    .await
    .expect("the web shop sees the sale within 1 s");
    eprintln!("sale visible at the web shop after {took:?}");
    // The contract's public read shape.
    let r = reqwest::get(format!(
        "{}/api/inventory?product_id=12345",
        m.clients[1].base
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["product_id"], 12345);
    assert_eq!(v["stock_level"], 47);
    assert!(v.get("locations").is_none(), "details need a read token");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_both_sides_sell_then_heal_converges() {
    let _serial = timing_sensitive().await;
    let mut m = Mesh::start(
        &[
            ("store-a", Role::Store, S),
            ("store-b", Role::Store, S),
            ("web", Role::Webshop, S),
        ],
        &[(0, 1), (0, 2), (1, 2)],
    )
    .await;
    for i in 0..3 {
        m.wait_connected(i, 2).await;
    }
    let products: Vec<u64> = (1..=20).collect();
    let lines: Vec<(u64, u64)> = products.iter().map(|p| (*p, 30)).collect();
    assert_eq!(
        m.clients[0]
            .post("/api/receipts", receipt("ra", "store-a", &lines))
            .await
            .unwrap()
            .0,
        201
    );
    assert_eq!(
        m.clients[1]
            .post("/api/receipts", receipt("rb", "store-b", &lines))
            .await
            .unwrap()
            .0,
        201
    );
    let (s, _) = m.clients[0]
        .post("/api/grants", json!({"grant_id": "g1", "product_id": 1, "location": "store-a", "to": "web", "quantity": 4}))
        .await
        .unwrap();
    assert_eq!(s, 201);
    converge(&m.clients, &products, Duration::from_secs(10))
        .await
        .unwrap();
    // store-a is cut off from everyone.
    m.node(0).set_partitioned(true);
    wait_for(Duration::from_secs(5), || async {
        m.node(0).transport.connected().is_empty()
    })
    .await
    .unwrap();
    for i in 0..10u64 {
        let p = 1 + i % 20;
        assert_eq!(
            m.clients[0]
                .post("/api/sales", sale(&format!("a{i}"), None, &[(p, 2)]))
                .await
                .unwrap()
                .0,
            201
        );
        assert_eq!(
            m.clients[1]
                .post("/api/sales", sale(&format!("b{i}"), None, &[(p, 1)]))
                .await
                .unwrap()
                .0,
            201
        );
    }
    // The web shop sells its allocation of store-a's stock while store-a is unreachable.
    assert_eq!(
        m.clients[2]
            .post("/api/sales", sale("w1", Some("store-a"), &[(1, 4)]))
            .await
            .unwrap()
            .0,
        201
    );
    let (s, v) = m.clients[2]
        .post("/api/sales", sale("w2", Some("store-a"), &[(1, 1)]))
        .await
        .unwrap();
    assert_eq!(s, 409, "{v}");
    // Views differ during the partition.
    assert_ne!(
        m.clients[0].stock(&products).await.unwrap(),
        m.clients[1].stock(&products).await.unwrap()
    );
    m.node(0).set_partitioned(false);
    let took = converge(&m.clients, &products, Duration::from_secs(10))
        .await
        .unwrap();
    eprintln!("converged {took:?} after the heal");
    let stock = m.clients[2].stock(&products).await.unwrap();
    let at = |p: u64, l: &str| {
        stock
            .iter()
            .find(|(q, loc, _)| *q == p && loc == l)
            .map(|x| x.2)
    };
    // Product 1: 30 − 2 (store-a) − 4 (web) at store-a; 30 − 1 at store-b.
    assert_eq!(at(1, "store-a"), Some(24));
    assert_eq!(at(1, "store-b"), Some(29));
    assert!(stock.iter().all(|(_, _, q)| *q >= 0));
    // A restarted node serves the same figures (views persisted, documents reloaded).
    m.restart(2).await;
    assert_eq!(m.clients[2].stock(&products).await.unwrap(), stock);
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_behind_a_hub_converges_with_another_store() {
    let _serial = timing_sensitive().await;
    // store-a — web — store-b: the stores do not peer with each other.
    let m = Mesh::start(
        &[
            ("store-a", Role::Store, S),
            ("web", Role::Webshop, S),
            ("store-b", Role::Store, S),
        ],
        &[(0, 1), (1, 2)],
    )
    .await;
    m.wait_connected(1, 2).await;
    assert_eq!(
        m.clients[0]
            .post("/api/receipts", receipt("r1", "store-a", &[(7, 10)]))
            .await
            .unwrap()
            .0,
        201
    );
    wait_for(Duration::from_secs(5), || async {
        stock_level(&m.clients[2], 7).await == Some(10)
    })
    .await
    .unwrap();
    assert_eq!(
        m.clients[0]
            .post("/api/sales", sale("s1", None, &[(7, 4)]))
            .await
            .unwrap()
            .0,
        201
    );
    let took = wait_for(Duration::from_secs(1), || async {
        stock_level(&m.clients[2], 7).await == Some(6)
    })
    .await
    .expect("store-b sees store-a's sale through the hub within 1 s");
    eprintln!("forwarded through the hub in {took:?}");
    // Every change store-b applied was signed by store-a and verified there:
    // store-b accepts store-a only through the hub's introduction, and
    // refused nothing on the way (issue 16).
    let metrics = reqwest::get(format!("{}/metrics", m.clients[2].base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for reason in ["bad_signature", "unknown_author"] {
        assert!(
            !metrics.contains(&format!("reason=\"{reason}\"")),
            "store-b refused changes ({reason}): {metrics}"
        );
    }
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_certificate_is_refused_and_learns_nothing() {
    let _serial = timing_sensitive().await;
    // Node 2 lists node 0 as a peer, but node 0 does not trust node 2.
    let tmp = tempfile::tempdir().unwrap();
    let dirs = make_mesh(
        tmp.path(),
        &[
            ("store-a", Role::Store, S),
            ("web", Role::Webshop, S),
            ("intruder", Role::Store, S),
        ],
        &[(0, 1), (0, 2)],
    )
    .unwrap();
    // Remove the intruder from store-a's trusted peers.
    let mut cfg = storemesh_node::config::Config::load(&dirs[0].0).unwrap();
    cfg.peers.retain(|p| p.name != "intruder");
    cfg.save(&dirs[0].0).unwrap();
    let a = NodeHandle::start(&dirs[0].0).await.unwrap();
    let intruder = NodeHandle::start(&dirs[2].0).await.unwrap();
    let ca = Client::new(a.http_addr, &dirs[0].1);
    let ci = Client::new(intruder.http_addr, &dirs[2].1);
    assert_eq!(
        ca.post("/api/receipts", receipt("r1", "store-a", &[(5, 10)]))
            .await
            .unwrap()
            .0,
        201
    );
    let refused = wait_for(Duration::from_secs(10), || async {
        a.shared
            .metrics
            .refused_connections
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    })
    .await;
    assert!(refused.is_ok(), "store-a logged and counted the refusal");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.transport.connected().is_empty());
    assert!(intruder.transport.connected().is_empty());
    assert_eq!(
        stock_level(&ci, 5).await,
        None,
        "the intruder learned nothing"
    );
    intruder.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloned_data_directory_is_refused_and_its_sales_merge_as_a_fork() {
    let _serial = timing_sensitive().await;
    let tmp = tempfile::tempdir().unwrap();
    let dirs = make_mesh(
        tmp.path(),
        &[
            ("store-a", Role::Store, S),
            ("web", Role::Webshop, S),
            ("store-b", Role::Store, S),
        ],
        &[(0, 1), (0, 2), (1, 2)],
    )
    .unwrap();
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for (d, _) in &dirs {
        nodes.push(NodeHandle::start(d).await.unwrap());
    }
    let c: Vec<Client> = nodes
        .iter()
        .zip(&dirs)
        .map(|(n, (_, t))| Client::new(n.http_addr, t))
        .collect();
    assert_eq!(
        c[0].post("/api/receipts", receipt("r1", "store-a", &[(9, 10)]))
            .await
            .unwrap()
            .0,
        201
    );
    converge(&c, &[9], Duration::from_secs(10)).await.unwrap();
    // store-a's link to store-b is down; somebody copies store-a's data directory
    // (while it runs) and starts the copy elsewhere.
    let b_id = nodes[2].shared.node_id;
    nodes[0].transport.set_blocked(b_id, true);
    let copy = tmp.path().join("store-a-copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["storemesh.toml", "node.key", "node.crt"] {
        if dirs[0].0.join(f).exists() {
            std::fs::copy(dirs[0].0.join(f), copy.join(f)).unwrap();
        }
    }
    nodes.remove(0).shutdown().await;
    std::fs::copy(
        dirs[0].0.join("storemesh.redb"),
        copy.join("storemesh.redb"),
    )
    .unwrap();
    let original = start_retrying(&dirs[0].0).await;
    original.transport.set_blocked(b_id, true);
    let mut cfg = storemesh_node::config::Config::load(&copy).unwrap();
    cfg.quic_addr = format!("127.0.0.1:{}", storemesh_node::demo::free_port().unwrap());
    cfg.http_addr = format!("127.0.0.1:{}", storemesh_node::demo::free_port().unwrap());
    cfg.save(&copy).unwrap();
    let ca = Client::new(original.http_addr, &dirs[0].1);
    wait_for(Duration::from_secs(10), || async {
        original.transport.connected().len() == 1
    })
    .await
    .unwrap();
    let clone = NodeHandle::start(&copy).await.unwrap();
    let cc = Client::new(clone.http_addr, &dirs[0].1);
    // The web shop, connected to the original, refuses the clone loudly.
    wait_for(Duration::from_secs(10), || async {
        nodes[0]
            .shared
            .metrics
            .refused_connections
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    })
    .await
    .expect("the web shop refuses a second live process with store-a's identity");
    // Both copies sell 7 of the 10 units.
    assert_eq!(
        ca.post("/api/sales", sale("orig-1", None, &[(9, 7)]))
            .await
            .unwrap()
            .0,
        201
    );
    assert_eq!(
        cc.post("/api/sales", sale("copy-1", None, &[(9, 7)]))
            .await
            .unwrap()
            .0,
        201
    );
    // The clone reaches store-b (which the original cannot reach); store-b also
    // hears of the original's sale through the web shop. Then the clone stops.
    wait_for(Duration::from_secs(10), || async {
        stock_level(&c[2], 9).await == Some(-4)
    })
    .await
    .expect("store-b merges both branches");
    clone.shutdown().await;
    original.transport.set_blocked(b_id, false);
    let all = [ca.clone(), c[1].clone(), c[2].clone()];
    wait_for(Duration::from_secs(10), || async {
        let mut ok = true;
        for x in &all {
            ok &= stock_level(x, 9).await == Some(-4);
        }
        ok
    })
    .await
    .expect("exact totals: 10 received, 14 sold");
    let (s, v) = ca.get("/api/overdrafts").await.unwrap();
    assert_eq!(s, 200);
    let items = v["items"].as_array().unwrap();
    assert!(items.iter().any(|i| i["kind"] == "fork"), "{v}");
    assert!(
        items
            .iter()
            .any(|i| i["kind"] == "deficit" && i["record"]["deficit"] == 4),
        "{v}"
    );
    original.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }
}

/// Row 7 of the benchmarks issue: two in-sync nodes that reconnect exchange
/// the two transport hellos (which carry their root digests) and nothing else;
/// after a partition with writes, the same reconnect proceeds to sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_sync_reconnect_is_the_two_hellos_only() {
    use std::sync::atomic::Ordering::Relaxed;
    use storemesh_node::config::Config;
    let _serial = timing_sensitive().await;
    let tmp = tempfile::tempdir().unwrap();
    let dirs = make_mesh(
        tmp.path(),
        &[("store-a", Role::Store, S), ("store-b", Role::Store, S)],
        &[(0, 1)],
    )
    .unwrap();
    // No anti-entropy tick may fall into the counted windows.
    for (dir, _) in &dirs {
        let mut cfg = Config::load(dir).unwrap();
        cfg.sync.anti_entropy_ms = 600_000;
        cfg.save(dir).unwrap();
    }
    let mut nodes = Vec::new();
    let mut clients = Vec::new();
    for (dir, token) in &dirs {
        let h = NodeHandle::start(dir).await.unwrap();
        clients.push(Client::new(h.http_addr, token));
        nodes.push(h);
    }
    let connected = |n: usize| {
        let nodes = &nodes;
        async move {
            wait_for(Duration::from_secs(10), || async {
                nodes.iter().all(|h| h.transport.connected().len() == n)
            })
            .await
            .unwrap_or_else(|_| panic!("the nodes did not reach {n} connection(s)"));
        }
    };
    let counts = || {
        nodes
            .iter()
            .map(|h| {
                let m = &h.shared.metrics;
                (
                    m.sync_messages_out.load(Relaxed),
                    m.sync_messages_in.load(Relaxed),
                )
            })
            .collect::<Vec<_>>()
    };
    // Quiet = no sync frame in or out for 300 ms.
    let quiet = || async {
        let mut last = counts();
        let mut since = std::time::Instant::now();
        let t = std::time::Instant::now();
        while since.elapsed() < Duration::from_millis(300) {
            assert!(t.elapsed() < Duration::from_secs(20), "never quiet");
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = counts();
            if now != last {
                last = now;
                since = std::time::Instant::now();
            }
        }
        last
    };
    connected(1).await;
    let products: Vec<u64> = (1..=200).collect();
    let lines: Vec<(u64, u64)> = products.iter().map(|p| (*p, 10)).collect();
    for (i, loc) in ["store-a", "store-b"].iter().enumerate() {
        let (s, _) = clients[i]
            .post("/api/receipts", receipt(&format!("r{i}"), loc, &lines))
            .await
            .unwrap();
        assert_eq!(s, 201);
    }
    converge(&clients, &products, Duration::from_secs(10))
        .await
        .unwrap();
    for round in 0..2 {
        quiet().await;
        nodes[0].set_partitioned(true);
        connected(0).await;
        let before = quiet().await;
        nodes[0].set_partitioned(false);
        connected(1).await;
        let after = quiet().await;
        assert_eq!(
            after, before,
            "round {round}: an in-sync reconnect sends no sync frame beyond the hellos"
        );
    }
    // Out of sync: a sale during the partition; the reconnect syncs it.
    nodes[0].set_partitioned(true);
    connected(0).await;
    let (s, _) = clients[1]
        .post("/api/sales", sale("s1", None, &[(7, 3)]))
        .await
        .unwrap();
    assert_eq!(s, 201);
    let before = quiet().await;
    nodes[0].set_partitioned(false);
    converge(&clients, &products, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(stock_level(&clients[0], 7).await, Some(17));
    let after = quiet().await;
    assert!(
        after[1].0 > before[1].0,
        "the changed side sent sync frames"
    );
    for n in nodes {
        n.shutdown().await;
    }
}
