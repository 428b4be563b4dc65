//! A short fuzz run of the node's targets (CI): HTTP requests through the
//! real router against a real node, and stock files through the CSV import
//! parser (`storemesh_node::fuzz`), after replaying every kept regression
//! input (`node/fuzz/regressions/<target>/`). The coverage-guided run is the
//! `fuzz/` directory (cargo-fuzz, nightly).

use std::path::PathBuf;

use storemesh_node::fuzz;

/// Mutated inputs per target in CI (debug build: a few seconds each;
/// `STOREMESH_FUZZ_EXECS` for longer runs).
fn ci_execs() -> u64 {
    let default = 20_000;
    std::env::var("STOREMESH_FUZZ_EXECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn regressions(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            out.push(std::fs::read(&p).expect("regression input readable"));
        }
    }
    out
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x100_0000_01b3)
    })
}

fn run_target(target: &str) {
    // Caught panics are the findings; keep their traces out of the log.
    std::panic::set_hook(Box::new(|_| {}));
    let seed = std::env::var("STOREMESH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(17);
    let kept = regressions(target);
    let t = std::time::Instant::now();
    let stats = fuzz::run(target, seed, ci_execs(), &kept);
    println!(
        "fuzz {target}: {} executions ({} regression inputs) in {:.1} s, {} findings",
        stats.execs,
        kept.len(),
        t.elapsed().as_secs_f64(),
        stats.crashes.len()
    );
    let mut failures = Vec::new();
    for (what, input) in stats.crashes {
        let dir = std::env::temp_dir()
            .join("storemesh-fuzz-crashes")
            .join(target);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{:016x}.bin", fnv(&input)));
        std::fs::write(&path, &input).unwrap();
        failures.push(format!(
            "{target}: {what} (input kept in {})",
            path.display()
        ));
    }
    assert!(
        failures.is_empty(),
        "fuzz findings:\n{}",
        failures.join("\n")
    );
}

#[test]
fn http_requests_through_the_router_never_fail_the_node() {
    run_target("http");
}

#[test]
fn csv_import_parsing_survives_a_short_run() {
    run_target("csv");
}

/// Found by the `http` target: the dashboard's routes (`/`,
/// `/api/dashboard`) answered a wrong method with an empty 405, not the
/// JSON error every other route gives.
#[test]
fn a_wrong_method_on_the_dashboard_routes_is_a_json_405() {
    let mut h = fuzz::HttpHarness::new().unwrap();
    for (flags, path) in [
        (2u8, "/"),
        (3, "/"),
        (1, "/api/dashboard"),
        (4, "/#/api/sales"),
    ] {
        h.exec(&fuzz::encode_request(flags, path, &[], ""));
    }
}

/// Found by the coverage-guided `http` target: a path segment that is not
/// UTF-8 once percent-decoded was refused by axum's extractor with a
/// plain-text 400 (`Invalid URL: Invalid UTF-8 in `id``), not JSON.
#[test]
fn a_path_segment_that_is_not_utf8_is_a_json_400() {
    let mut h = fuzz::HttpHarness::new().unwrap();
    for path in [
        "/api/customers/a%88b",
        "/api/sales/%ff",
        "/api/products/%c3%28",
    ] {
        h.exec(&fuzz::encode_request(0, path, &[], ""));
    }
}

#[test]
fn the_request_decoder_reads_the_seeds_back() {
    for s in fuzz::http_seeds() {
        let r = fuzz::decode_request(&s).expect("a seed decodes");
        assert!(r.target.starts_with("/"));
    }
    let r = fuzz::decode_request(&fuzz::encode_request(
        1,
        "/api/sales?x=1",
        &[("content-type", "application/json")],
        "{\"a\":1}",
    ))
    .unwrap();
    assert_eq!(r.method, "POST");
    assert_eq!(r.target, "/api/sales?x=1");
    assert_eq!(r.headers.len(), 1);
    assert_eq!(r.body, b"{\"a\":1}");
    assert_eq!(r.auth, Some(true));
}

/// `STOREMESH_FUZZ_REPLAY=<target>:<file> cargo test -p storemesh-node --test fuzz replay -- --nocapture`
/// runs one input with the panic's full trace.
#[test]
fn replay() {
    let Ok(spec) = std::env::var("STOREMESH_FUZZ_REPLAY") else {
        return;
    };
    let (target, path) = spec.split_once(':').expect("TARGET:FILE");
    let input = std::fs::read(path).expect("input file");
    match target {
        "http" => fuzz::HttpHarness::new().unwrap().exec(&input),
        _ => fuzz::exec_csv(&input),
    }
}

/// `STOREMESH_FUZZ_SEEDS_DIR=<dir> cargo test -p storemesh-node --test fuzz write_seeds`
/// writes the targets' seed inputs to `<dir>/<target>/` (the coverage-guided
/// run's starting corpus, kept in `fuzz/seeds/`).
#[test]
fn write_seeds() {
    let Ok(dir) = std::env::var("STOREMESH_FUZZ_SEEDS_DIR") else {
        return;
    };
    for (target, seeds) in [("http", fuzz::http_seeds()), ("csv", fuzz::csv_seeds())] {
        let d = PathBuf::from(&dir).join(target);
        std::fs::create_dir_all(&d).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(d.join(format!("seed-{i:03}")), s).unwrap();
        }
    }
}
