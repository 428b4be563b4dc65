//! `storemesh demo` runs the whole tour on loopback and exits 0 with converged stock.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn demo_exits_zero_and_prints_converged_stock() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_storemesh"))
        .arg("demo")
        .stdin(Stdio::null())
        .output()
        .expect("demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(
        stdout.contains("AFTER the heal (identical on every node)"),
        "{stdout}"
    );
    assert!(stdout.contains("converged"), "{stdout}");
    // The after-table shows the same figures in all three columns.
    let after = stdout.split("AFTER the heal").nth(1).unwrap();
    for line in after.lines().filter(|l| l.trim_start().starts_with("100")) {
        let cells: Vec<&str> = line.split_whitespace().rev().take(3).collect();
        assert!(
            cells.windows(2).all(|w| w[0] == w[1]),
            "not converged: {line}"
        );
    }
}
