//! The simulator's own test suite: a seed sweep, determinism, the planted-bug
//! self-test, every scenario file, and the saved regression seeds.
//!
//! Tests run in the debug profile (dependencies at opt-level 2, the workspace
//! crates unoptimized), so the sweeps here are short; `.ci/run` and
//! `storemesh-sim --seeds 1..500` run the long ones in release.

use std::path::{Path, PathBuf};

use storemesh_sim::{run_seed, scenario, selftest, Bug, FaultKind, Options};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn small(events: usize) -> Options {
    Options {
        events,
        ..Options::default()
    }
}

#[test]
fn a_sweep_of_seeds_passes_every_invariant() {
    let opts = small(300);
    for seed in 1..=6 {
        let r = run_seed(seed, &opts);
        assert!(
            r.ok(),
            "{}\nreplay: storemesh-sim --seed {seed} --events 300",
            r.verdict(None)
        );
        // The node loop's reconnect path: hellos carry the committed digest.
        assert!(r.digest_hellos > 0, "seed {seed}: no digest hello");
        // Production's connection arbitration, on both sides of crossing dials.
        assert!(r.crossing_dials > 0, "seed {seed}: no crossing dials");
    }
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let opts = small(200);
    for seed in [3u64, 17, 4242] {
        let a = run_seed(seed, &opts);
        let b = run_seed(seed, &opts);
        assert!(!a.trace_hash.is_empty());
        assert_eq!(
            a.trace_hash, b.trace_hash,
            "seed {seed} is not deterministic"
        );
        assert_eq!(a.verdict(None), b.verdict(None));
    }
    // Different seeds explore different runs.
    assert_ne!(run_seed(1, &opts).trace_hash, run_seed(2, &opts).trace_hash);
}

/// Some seed among the first ones retires a store to a successor (drain,
/// power off for good, `retire` at some node), keeps every invariant and
/// replays byte for byte.
#[test]
fn a_seed_retires_a_node_and_replays() {
    let opts = small(200);
    for seed in 1..=60 {
        let r = run_seed(seed, &opts);
        assert!(
            r.ok(),
            "{}\nreplay: storemesh-sim --seed {seed} --events 200",
            r.verdict(None)
        );
        if r.fired.get(&FaultKind::RetireNode).copied().unwrap_or(0) > 0 {
            assert!(r.retirement.is_some());
            // The loop revoked the retired node's key at its peers.
            assert!(
                r.revocations > 0,
                "seed {seed}: retired but nothing revoked"
            );
            assert_eq!(run_seed(seed, &opts).trace_hash, r.trace_hash);
            return;
        }
    }
    panic!("no seed in 1..=60 retired a node");
}

/// Seeds tried per planted bug in the test (the CLI tries `selftest::SEEDS_MAX`).
/// 24: a planted bug's manifestation depends on the seed's network draws;
/// with the exact-books workloads, signed changes and pooled receipt ids,
/// `idem-outside-txn` is first caught at seed 17 (`storemesh-sim --self-test`).
const SELFTEST_SEEDS: u64 = 24;

fn assert_found(bug: Bug) {
    let r = selftest::find(bug, &Options::default(), SELFTEST_SEEDS);
    assert!(r.found.is_some(), "{}", r.line());
    eprintln!("{}", r.line());
}

#[test]
fn self_test_finds_skip_rights_check() {
    assert_found(Bug::SkipRightsCheck);
}

#[test]
fn self_test_finds_per_line_check() {
    assert_found(Bug::PerLineCheck);
}

#[test]
fn self_test_finds_grant_in_other_bucket() {
    assert_found(Bug::GrantInOtherBucket);
}

#[test]
fn self_test_finds_idem_outside_txn() {
    assert_found(Bug::IdemOutsideTxn);
}

/// A planted bug of the exact books is caught by the checker written for it
/// (not merely by some other invariant).
fn assert_found_by(bug: Bug, invariant: &str) {
    let r = selftest::find(bug, &Options::default(), SELFTEST_SEEDS);
    eprintln!("{}", r.line());
    let v = r.found.as_ref().unwrap_or_else(|| panic!("{}", r.line()));
    assert_eq!(v.invariant, invariant, "{}", r.line());
}

#[test]
fn self_test_finds_received_in_transit() {
    assert_found_by(Bug::ReceivedInTransit, "transfer-conservation");
}

#[test]
fn self_test_finds_deficit_whole_balance() {
    assert_found_by(Bug::DeficitWholeBalance, "deficits-per-event");
}

#[test]
fn self_test_finds_skip_ownerless_settle() {
    assert_found_by(Bug::SkipOwnerlessSettle, "ownerless-once");
}

#[test]
fn self_test_finds_unlisted_sale_collisions() {
    assert_found_by(Bug::UnlistedSaleCollisions, "colliding-ids");
}

#[test]
fn self_test_finds_unlisted_receipt_collisions() {
    assert_found_by(Bug::UnlistedReceiptCollisions, "colliding-ids");
}

fn scenario_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(crate_dir().join("scenarios"))
        .expect("sim/scenarios exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    v
}

#[test]
fn every_scenario_file_runs_and_keeps_the_invariants() {
    let files = scenario_files();
    for required in [
        "store-offline-day.toml",
        "webshop-cutoff-peak.toml",
        "hub-down.toml",
        "strict-vs-relaxed.toml",
    ] {
        assert!(
            files
                .iter()
                .any(|f| f.file_name().is_some_and(|n| n == required)),
            "missing scenario {required}"
        );
    }
    for f in &files {
        let sc = scenario::Scenario::load(f).unwrap_or_else(|e| panic!("{e}"));
        // A long scenario (`partitioned-day`) runs in full with
        // `storemesh-sim --scenario` in release; here a few minutes of it.
        // At least long enough for about ten sales at the scenario's rates:
        // with fewer, whether a short run sells at all is down to the
        // seed's draws (offline-horizon sells 14 an hour in all).
        let rate: f64 = sc.nodes.iter().map(|n| n.sales_per_hour).sum();
        let hours = (10.0 / rate.max(1.0)).max(0.05);
        let sc = if sc.long { sc.shortened(hours) } else { sc };
        let r = scenario::run(&sc, sc.seed);
        let text = r.render();
        eprintln!("{text}");
        assert!(r.violation.is_none(), "{}: {text}", f.display());
        assert!(
            r.nodes.iter().any(|n| n.sales_ok > 0),
            "{}: nothing was sold",
            f.display()
        );
        // A restored old image is always recognised as a fork of its node's
        // own history (and merged exactly: the invariants above).
        assert!(
            r.forks_detected >= r.restores,
            "{}: {} restores, {} forks detected: {text}",
            f.display(),
            r.restores,
            r.forks_detected
        );
        assert!(
            r.nodes
                .iter()
                .all(|n| n.converge_s.iter().all(|c| c.is_some())),
            "{}: some node never caught up after a heal: {text}",
            f.display()
        );
    }
}

#[test]
fn strict_refuses_and_relaxed_overdraws() {
    let path = crate_dir().join("scenarios/strict-vs-relaxed.toml");
    let sc = scenario::Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let r = scenario::run(&sc, sc.seed);
    assert!(r.violation.is_none(), "{}", r.render());
    assert_eq!(r.oversold_strict_units, 0, "{}", r.render());
    let strict = r
        .nodes
        .iter()
        .find(|n| n.policy == "strict" && n.name.contains("strict"))
        .expect("a strict store");
    let relaxed = r
        .nodes
        .iter()
        .find(|n| n.policy == "relaxed")
        .expect("a relaxed store");
    assert!(
        strict.refused > 0 && strict.overdrafts == 0,
        "{}",
        r.render()
    );
    assert!(
        relaxed.overdrafts > 0 && relaxed.units_overdrawn > 0,
        "{}",
        r.render()
    );
    assert!(
        strict.on_hand_end >= 0 && relaxed.on_hand_end < 0,
        "{}",
        r.render()
    );
}

#[test]
fn scenario_files_are_validated() {
    let dir = std::env::temp_dir().join(format!("storemesh-sim-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\nduration_h = 1\nbogus = 3\nnodes = []\nproducts = []\n",
    )
    .unwrap();
    let e = scenario::Scenario::load(&bad).expect_err("unknown key refused");
    assert!(e.contains("bogus"), "{e}");
    std::fs::write(
        &bad,
        "name = \"x\"\nduration_h = 1\nproducts = []\n[[nodes]]\nname = \"a\"\n[[nodes]]\nname = \"b\"\n[[partitions]]\nkind = \"isolate\"\nnodes = [\"zz\"]\nat_h = 0\nfor_h = 1\n",
    )
    .unwrap();
    let e = scenario::Scenario::load(&bad).expect_err("unknown node refused");
    assert!(e.contains("zz"), "{e}");
    // The product generator and Zipf popularity.
    std::fs::write(
        &bad,
        "name = \"x\"\nduration_h = 1\nzipf = 1.1\nproducts = { count = 3, stock_per_store = 5 }\n[[nodes]]\nname = \"a\"\n[[nodes]]\nname = \"w\"\nrole = \"webshop\"\n",
    )
    .unwrap();
    let sc = scenario::Scenario::load(&bad).unwrap_or_else(|e| panic!("{e}"));
    let ps = sc.product_list();
    assert_eq!(ps.iter().map(|p| p.id).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(ps.iter().all(|p| p.stock.len() == 1 && p.stock["a"] == 5));
    std::fs::write(
        &bad,
        "name = \"x\"\nduration_h = 1\nproducts = { count = 3, stock = 5 }\n[[nodes]]\nname = \"a\"\n[[nodes]]\nname = \"b\"\n",
    )
    .unwrap();
    assert!(
        scenario::Scenario::load(&bad).is_err(),
        "unknown generator key refused"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sim/regressions.txt`: one saved case per line, `SEED [--nodes N] [--events E]`.
fn regressions(path: &Path) -> Vec<(u64, Options)> {
    let text = std::fs::read_to_string(path).expect("sim/regressions.txt exists");
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let seed: u64 = words
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("regressions.txt line {}: no seed", n + 1));
        let mut opts = Options::default();
        while let Some(flag) = words.next() {
            let value = words.next().and_then(|v| v.parse::<usize>().ok());
            match (flag, value) {
                ("--nodes", Some(v)) => opts.nodes = v,
                ("--events", Some(v)) => opts.events = v,
                _ => panic!("regressions.txt line {}: unknown {flag:?}", n + 1),
            }
        }
        out.push((seed, opts));
    }
    out
}

#[test]
fn saved_regression_seeds_pass() {
    let cases = regressions(&crate_dir().join("regressions.txt"));
    assert!(!cases.is_empty());
    for (seed, opts) in cases {
        let r = run_seed(seed, &opts);
        assert!(
            r.ok(),
            "{}\nreplay: storemesh-sim --seed {seed} --nodes {} --events {}",
            r.verdict(None),
            opts.nodes,
            opts.events
        );
    }
}

/// Issue 16 finding 1: some seed among the first ones has a hostile member
/// write as another member (signed with its own key, and unsigned); every
/// honest receiver refuses both (`hostile-impersonate`, checked in
/// `hostile::forge`), the seed keeps every invariant and replays.
#[test]
fn a_seed_has_a_member_write_as_another_and_is_refused() {
    let opts = small(200);
    let mut fired = 0;
    for seed in 1..=40 {
        let r = run_seed(seed, &opts);
        assert!(
            r.ok(),
            "{}\nreplay: storemesh-sim --seed {seed} --events 200",
            r.verdict(None)
        );
        fired += r
            .fired
            .get(&FaultKind::HostileImpersonate)
            .copied()
            .unwrap_or(0);
        if fired >= 3 {
            break;
        }
    }
    assert!(fired >= 1, "no seed fired hostile-impersonate");
}

/// `--hostile` (issue 16's "≥ 2,000 seeds with a hostile node"): seeds
/// drawn without a hostile member get one, and it forges; every forgery is
/// refused and the seeds keep every invariant.
#[test]
fn hostile_every_seed_gives_seeds_without_one_a_hostile_member() {
    let opts = Options {
        hostile_every_seed: true,
        ..small(200)
    };
    let mut forged = 0;
    for seed in 1..=40 {
        let drawn = storemesh_sim::hostile::draw(seed, opts.nodes, opts.events, true, false);
        if drawn.is_some() {
            continue;
        }
        assert!(
            storemesh_sim::hostile::draw(seed, opts.nodes, opts.events, true, true).is_some(),
            "seed {seed}: --hostile gives it a hostile member"
        );
        let r = run_seed(seed, &opts);
        assert!(
            r.ok(),
            "{}\nreplay: storemesh-sim --seed {seed} --events 200 --hostile",
            r.verdict(None)
        );
        forged += r.fired.get(&FaultKind::HostileForge).copied().unwrap_or(0);
        if forged >= 1 {
            break;
        }
    }
    assert!(
        forged >= 1,
        "no seed made hostile by --hostile forged anything"
    );
}

/// Every seed with a hostile member sees its act, exactly once: a member
/// that cannot act when due (down, or no honest peer linked to it) is
/// replaced by one that can, and an act no member could make during the
/// events happens on the healed mesh. Before, the act waited at the drawn
/// node to the end: 42 of 100 `--hostile` seeds (500 events) forged.
#[test]
fn every_hostile_seed_forges_once() {
    let opts = Options {
        hostile_every_seed: true,
        ..small(200)
    };
    for seed in 1..=8 {
        let r = run_seed(seed, &opts);
        assert!(
            r.ok(),
            "{}\nreplay: storemesh-sim --seed {seed} --events 200 --hostile",
            r.verdict(None)
        );
        assert_eq!(
            r.fired.get(&FaultKind::HostileForge).copied().unwrap_or(0),
            1,
            "seed {seed}: the hostile act happened once\nreplay: storemesh-sim --seed {seed} --events 200 --hostile"
        );
    }
}
