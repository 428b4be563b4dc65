//! `storemesh import counts` / `storemesh export inventory` against a running node.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use storemesh_testkit::KillOnDrop;

const BIN: &str = env!("CARGO_BIN_EXE_storemesh");

fn port() -> u16 {
    storemesh_node::demo::free_port().unwrap()
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("storemesh runs")
}

#[test]
fn shopify_file_round_trips_and_a_bad_row_rejects_the_whole_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n");
    let d = dir.to_str().unwrap();
    let (q, h) = (port(), port());
    let out = cli(&[
        "init",
        "--data-dir",
        d,
        "--name",
        "store-1",
        "--quic-addr",
        &format!("127.0.0.1:{q}"),
        "--http-addr",
        &format!("127.0.0.1:{h}"),
    ]);
    assert!(out.status.success());
    let mut node = KillOnDrop(
        Command::new(BIN)
            .args(["run", "--data-dir", d])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", h)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "node did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // 10,000 rows: 3,334 variants at three locations (the own one and two without a node yet).
    let mut csv = String::from("Handle,Title,Option1 Name,Option1 Value,SKU,Location,Incoming,Unavailable,Committed,Available,On hand\n");
    let mut expected: BTreeMap<(String, String), u64> = BTreeMap::new();
    let locations = ["Store 1", "Warehouse North", "Pop-up Store"];
    let mut n = 0;
    'outer: for v in 0..4000u64 {
        for loc in locations {
            if n == 10_000 {
                break 'outer;
            }
            let qty = (v * 7 + n) % 50;
            csv.push_str(&format!(
                "item-{v},Item {v},Size,M,SKU-{v:05},{loc},0,0,0,{qty},{qty}\n"
            ));
            expected.insert(
                (
                    format!("SKU-{v:05}"),
                    storemesh_node::csvio::location_name(loc),
                ),
                qty,
            );
            n += 1;
        }
    }
    let file = tmp.path().join("inventory.csv");
    std::fs::write(&file, &csv).unwrap();
    let started = Instant::now();
    let out = cli(&[
        "import",
        "counts",
        file.to_str().unwrap(),
        "--data-dir",
        d,
        "--format",
        "shopify",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("imported 10,000 rows in {:?}", started.elapsed());
    let out = cli(&[
        "export",
        "inventory",
        "--data-dir",
        d,
        "--format",
        "shopify",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows =
        storemesh_node::csvio::parse(&out.stdout, storemesh_node::csvio::Format::Shopify).unwrap();
    let got: BTreeMap<(String, String), u64> = rows
        .into_iter()
        .map(|r| ((r.sku, r.location), r.on_hand))
        .collect();
    assert_eq!(got.len(), 10_000);
    assert_eq!(got, expected, "quantities round-trip");
    // The plain format too.
    let out = cli(&[
        "export",
        "inventory",
        "--data-dir",
        d,
        "--format",
        "storemesh",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("sku,location,on_hand\n"));
    // A file with one bad row is rejected whole, naming the line; nothing changes.
    let bad = "sku,location,on_hand\nSKU-00000,store-1,49\nSKU-00001,store-1,lots\n";
    std::fs::write(&file, bad).unwrap();
    let out = cli(&[
        "import",
        "counts",
        file.to_str().unwrap(),
        "--data-dir",
        d,
        "--format",
        "storemesh",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    let out = cli(&[
        "export",
        "inventory",
        "--data-dir",
        d,
        "--format",
        "storemesh",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!(
        "SKU-00000,store-1,{}\n",
        expected[&("SKU-00000".to_string(), "store-1".to_string())]
    )));
    // A full stocktake from a file: the products of store-1 the file does
    // not list are set to 0; other locations are untouched.
    let full = "sku,location,on_hand\nSKU-00000,store-1,5\nSKU-00003,store-1,6\n";
    std::fs::write(&file, full).unwrap();
    let out = cli(&[
        "import",
        "counts",
        file.to_str().unwrap(),
        "--data-dir",
        d,
        "--format",
        "storemesh",
        "--scope",
        "full",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&[
        "export",
        "inventory",
        "--data-dir",
        d,
        "--format",
        "storemesh",
    ]);
    let rows = storemesh_node::csvio::parse(&out.stdout, storemesh_node::csvio::Format::Storemesh)
        .unwrap();
    for r in &rows {
        let want = match (r.sku.as_str(), r.location.as_str()) {
            ("SKU-00000", "store-1") => 5,
            ("SKU-00003", "store-1") => 6,
            (_, "store-1") => 0,
            (sku, loc) => expected[&(sku.to_string(), loc.to_string())],
        };
        assert_eq!(r.on_hand, want, "{} at {}", r.sku, r.location);
    }
    assert!(rows
        .iter()
        .any(|r| r.location == "store-1" && r.on_hand == 0));
    unsafe { libc::kill(node.0.id() as i32, libc::SIGTERM) };
    assert!(node.0.wait().unwrap().success());
}
