//! A short fuzz run of every target (CI), after replaying every kept
//! regression input (`protocol/fuzz/regressions/<target>/`). The long run is
//! `cargo run --release -p storemesh-protocol --example fuzz`.

use std::path::PathBuf;

use storemesh_protocol::fuzz;

/// Mutated inputs per target in CI (debug build: a few seconds each).
const CI_EXECS: u64 = 20_000;

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

#[test]
fn every_fuzz_target_survives_a_short_run() {
    // Caught panics are the findings; keep their traces out of the log.
    std::panic::set_hook(Box::new(|_| {}));
    let seed = std::env::var("STOREMESH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(17);
    let mut failures = Vec::new();
    let h = fuzz::Harness::new();
    for target in fuzz::TARGETS {
        let n = h.seeds(target).len();
        assert!(n >= 3, "target {target} has {n} seeds");
        println!("fuzz {target}: {n} seed inputs from honest traffic");
    }
    for target in fuzz::TARGETS {
        let kept = regressions(target);
        let stats = fuzz::run(target, seed, CI_EXECS, &kept);
        println!(
            "fuzz {target}: {} executions ({} regression inputs), {} crashes",
            stats.execs,
            kept.len(),
            stats.crashes.len()
        );
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
    }
    let _ = std::panic::take_hook();
    assert!(
        failures.is_empty(),
        "fuzz findings:\n{}",
        failures.join("\n")
    );
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x100_0000_01b3)
    })
}

/// `STOREMESH_FUZZ_REPLAY=<target>:<file> cargo test -p storemesh-protocol --test fuzz replay -- --nocapture`
/// runs one input with the panic's full trace (RUST_BACKTRACE=1).
#[test]
fn replay() {
    let Ok(spec) = std::env::var("STOREMESH_FUZZ_REPLAY") else {
        return;
    };
    let (target, path) = spec.split_once(':').expect("TARGET:FILE");
    let input = std::fs::read(path).expect("input file");
    fuzz::Harness::new().exec(target, &input);
}

/// Found by the coverage-guided `receive` target: a change whose value
/// column is run-length coded another way than Automerge writes it. Automerge
/// applied it under the hash of its bytes but wrote it out (`save_after`)
/// re-encoded, under another hash (a debug build panicked in Automerge's own
/// cross-check; a release build stored a change its graph does not know).
/// Validation now refuses changes that do not re-encode to themselves.
#[test]
fn a_change_in_a_non_canonical_encoding_is_refused() {
    let input = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/regressions/receive/crash-1dc93efbbe8f761273103fea6525555685ea406b"),
    )
    .unwrap();
    let mut h = fuzz::Harness::new();
    h.exec("receive", &input);
    assert!(
        h.mesh.nodes[0].engine.heads_of("ledger/l1oc/3").is_none(),
        "the change was refused: no document was made for it"
    );
}

/// Found by the coverage-guided `change` target: a change whose op names a
/// predecessor by an actor index the change does not list made Automerge's
/// decoder panic inside validation (`change.rs`, `unwrap()` on `None`).
#[test]
fn a_change_naming_an_unknown_actor_is_refused() {
    let input = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/regressions/change/crash-5c536928df7b9235c3afffc1ed5422ea0cb16ab4"),
    )
    .unwrap();
    // Before the fix this panicked; the harness's own catch is not involved.
    fuzz::Harness::new().exec("change", &input);
}

/// Found by the coverage-guided `change` target (seed 7, 2.8 million
/// executions): a change whose put named an op of another key as the value
/// it overwrites passed validation and was applied; the document could then
/// no longer be saved (Automerge's change collector asserts,
/// `collector.rs:299`), so the next commit panicked. It is refused now.
#[test]
fn a_change_overwriting_an_op_of_another_key_is_refused() {
    let input = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/regressions/change/crash-pred-of-another-key"),
    )
    .unwrap();
    let mut h = fuzz::Harness::new();
    let before = h.mesh.nodes[0].engine.stats.rejected_messages;
    // Before the fix this panicked in the commit after the push.
    h.exec("change", &input);
    assert!(
        h.mesh.nodes[0].engine.stats.rejected_messages > before,
        "the change was refused"
    );
}
