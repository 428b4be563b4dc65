//! Facts about the machine and the code under test, for the report header.

use std::path::Path;
use std::process::Command;

pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub mem_gib: f64,
    pub date: String,
    pub commit: String,
    pub dirty: bool,
    pub rustc: String,
}

fn first_line_with(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

fn run(dir: &Path, cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Machine {
    /// Reads /proc and (read-only) git in `repo`.
    pub fn probe(repo: &Path) -> Machine {
        let cores = std::fs::read_to_string("/proc/cpuinfo")
            .map(|t| t.lines().filter(|l| l.starts_with("processor")).count())
            .unwrap_or(0);
        let mem_kib: f64 = first_line_with("/proc/meminfo", "MemTotal")
            .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
            .unwrap_or(0.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Machine {
            cpu_model: first_line_with("/proc/cpuinfo", "model name")
                .unwrap_or_else(|| "unknown".into()),
            cores: cores.max(1),
            mem_gib: mem_kib / 1024.0 / 1024.0,
            date: storemesh_protocol::time::format_rfc3339_ms(now),
            commit: run(repo, "git", &["rev-parse", "--short=12", "HEAD"])
                .unwrap_or_else(|| "unknown".into()),
            dirty: run(
                repo,
                "git",
                &["status", "--porcelain", "--untracked-files=no"],
            )
            .is_some_and(|s| !s.is_empty()),
            rustc: run(repo, "rustc", &["--version"]).unwrap_or_else(|| "unknown".into()),
        }
    }
}

/// Resident set size of a process in MiB (`VmRSS`), if it is running.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let kib: f64 = first_line_with(&format!("/proc/{pid}/status"), "VmRSS")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// CPU time (user + system, all threads) a process has used so far, in ms,
/// from `/proc/<pid>/stat` (ticks of `USER_HZ`, 100 per second on Linux:
/// 10 ms resolution), if it is running.
pub fn cpu_ms(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // After the name: state is field 3, so utime (14) and stime (15) are
    // the 12th and 13th of the rest.
    let utime: f64 = f.nth(11)?.parse().ok()?;
    let stime: f64 = f.next()?.parse().ok()?;
    Some((utime + stime) * 10.0)
}

/// Resident set size of this process in MiB.
pub fn self_rss_mib() -> Option<f64> {
    rss_mib(std::process::id())
}
