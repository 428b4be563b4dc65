//! Runs the built `storemesh` binary against temporary data directories and checks
//! the CLI contract: output lines, refusals, one-line errors, exit codes.

use std::path::Path;
use std::process::{Command, Output};

const ID_X: &str = "ab00000000000000000000000000000000000000000000000000000000000001";
const ID_Y: &str = "cd00000000000000000000000000000000000000000000000000000000000002";

fn storemesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_storemesh"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("the storemesh binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(args: &[&str]) -> String {
    let o = storemesh(args);
    assert!(o.status.success(), "{args:?} failed: {}", stderr(&o));
    stdout(&o)
}

/// A failure: non-zero exit, exactly one `error: ` line on stderr, no panic.
fn fails(args: &[&str]) -> String {
    let o = storemesh(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} should fail");
    assert_ne!(o.status.code(), Some(101), "{args:?} panicked: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {err:?}");
    assert!(lines[0].starts_with("error: "), "{args:?}: {err:?}");
    lines[0].to_string()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// `init` in a fresh directory; returns (node_id, api_token).
fn init(dir: &Path, name: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec!["init", "--data-dir", path(dir), "--name", name];
    args.extend_from_slice(extra);
    let out = ok(&args);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out:?}");
    let node_id = lines[0].strip_prefix("node_id: ").expect("node_id line");
    let token = lines[1]
        .strip_prefix("api_token: ")
        .expect("api_token line");
    assert_eq!(node_id.len(), 64);
    assert!(node_id
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    (node_id.to_string(), token.to_string())
}

#[test]
fn init_writes_identity_and_config_and_refuses_to_run_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nested/store-1");
    let (node_id, token) = init(&dir, "store-1", &[]);
    assert_eq!(token.len(), 64, "a random token is 32 bytes of hex");

    let config = std::fs::read_to_string(dir.join("storemesh.toml")).unwrap();
    assert!(
        config.contains(&token) && config.contains("\"admin\""),
        "{config}"
    );

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("storemesh.toml")), 0o600);
        // Every other file init wrote that looks like a key is private.
        let mut keys = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.file_name().unwrap().to_string_lossy().contains("key") {
                assert_eq!(mode(&p), 0o600, "{}", p.display());
                keys += 1;
            }
        }
        assert!(keys >= 1, "no key file in {}", dir.display());
    }

    let err = fails(&["init", "--data-dir", path(&dir), "--name", "store-1"]);
    assert!(err.contains("identity") || err.contains("exists"), "{err}");
    // The refusal changed nothing.
    assert_eq!(
        std::fs::read_to_string(dir.join("storemesh.toml")).unwrap(),
        config
    );

    let id = ok(&["id", "--data-dir", path(&dir)]);
    assert_eq!(id, format!("store-1 {node_id} 127.0.0.1:7400\n"));
}

#[test]
fn init_takes_options() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("web");
    let (_, token) = init(
        &dir,
        "web",
        &[
            "--role",
            "webshop",
            "--location",
            "warehouse",
            "--quic-addr",
            "127.0.0.1:7501",
            "--http-addr",
            "127.0.0.1:8501",
            "--api-token",
            "my-secret-token-123",
            "--policy",
            "relaxed",
            "--buckets",
            "16",
        ],
    );
    assert_eq!(token, "my-secret-token-123");
    let config = std::fs::read_to_string(dir.join("storemesh.toml")).unwrap();
    for want in [
        "role = \"webshop\"",
        "location = \"warehouse\"",
        "http_addr = \"127.0.0.1:8501\"",
        "policy = \"relaxed\"",
        "buckets = 16",
    ] {
        assert!(config.contains(want), "{want} missing from {config}");
    }
    assert!(ok(&["id", "--data-dir", path(&dir)]).ends_with(" 127.0.0.1:7501\n"));

    let bad = tmp.path().join("bad");
    let err = fails(&[
        "init",
        "--data-dir",
        path(&bad),
        "--name",
        "a",
        "--api-token",
        "has space in it!!",
    ]);
    assert!(err.contains("--api-token"), "{err}");
    // A short token works (the contract sets no length); init warns about it.
    let short = tmp.path().join("short");
    let out = ok(&[
        "init",
        "--data-dir",
        path(&short),
        "--name",
        "s",
        "--api-token",
        "test",
    ]);
    assert!(out.contains("api_token: test\n"), "{out}");
    let err = fails(&["init", "--data-dir", path(&bad), "--name", "Not Valid"]);
    assert!(err.contains("--name"), "{err}");
    assert!(!bad.exists(), "a refused init creates nothing");
}

#[test]
fn peers_add_list_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s1");
    let (own_id, _) = init(&dir, "s1", &[]);
    let d = path(&dir);

    let o = storemesh(&["peer", "list", "--data-dir", d]);
    assert!(o.status.success());
    assert_eq!(stdout(&o), "");

    ok(&[
        "peer",
        "add",
        "--data-dir",
        d,
        "--name",
        "s2",
        "--id",
        ID_X,
        "--addr",
        "127.0.0.1:7402",
    ]);
    ok(&[
        "peer",
        "add",
        "--data-dir",
        d,
        "--name",
        "web",
        "--id",
        ID_Y,
        "--addr",
        "web.example.net:7400",
    ]);
    assert_eq!(
        ok(&["peer", "list", "--data-dir", d]),
        format!("s2 {ID_X} 127.0.0.1:7402\nweb {ID_Y} web.example.net:7400\n")
    );

    let err = fails(&[
        "peer",
        "add",
        "--data-dir",
        d,
        "--name",
        "s2",
        "--id",
        ID_Y,
        "--addr",
        "127.0.0.1:1",
    ]);
    assert!(err.contains("s2") && err.contains("--replace"), "{err}");
    let err = fails(&[
        "peer",
        "add",
        "--data-dir",
        d,
        "--name",
        "s3",
        "--id",
        ID_X,
        "--addr",
        "127.0.0.1:1",
    ]);
    assert!(err.contains("s2") && err.contains("--replace"), "{err}");
    let err = fails(&[
        "peer",
        "add",
        "--data-dir",
        d,
        "--name",
        "me",
        "--id",
        &own_id,
        "--addr",
        "127.0.0.1:1",
    ]);
    assert!(err.contains("own id"), "{err}");
    let err = fails(&[
        "peer",
        "add",
        "--data-dir",
        d,
        "--name",
        "s9",
        "--id",
        "1234",
        "--addr",
        "127.0.0.1:1",
    ]);
    assert!(err.contains("--id") && err.contains("64"), "{err}");
    let err = fails(&[
        "peer",
        "add",
        "--data-dir",
        d,
        "--name",
        "s9",
        "--id",
        ID_X,
        "--addr",
        "no-port",
    ]);
    assert!(err.contains("--addr"), "{err}");

    ok(&[
        "peer",
        "add",
        "--data-dir",
        d,
        "--name",
        "s2",
        "--id",
        ID_X,
        "--addr",
        "127.0.0.1:7999",
        "--replace",
    ]);
    assert!(ok(&["peer", "list", "--data-dir", d]).contains(&format!("s2 {ID_X} 127.0.0.1:7999\n")));

    ok(&["peer", "remove", "--data-dir", d, "--name", "s2"]);
    assert_eq!(
        ok(&["peer", "list", "--data-dir", d]),
        format!("web {ID_Y} web.example.net:7400\n")
    );
    let err = fails(&["peer", "remove", "--data-dir", d, "--name", "s2"]);
    assert!(err.contains("s2") && err.contains("web"), "{err}");
}

#[test]
fn bad_usage_and_bad_config_fail_on_one_line() {
    let err = fails(&["id", "--data-dir", "/nonexistent/x", "--frobnicate"]);
    assert!(err.contains("--frobnicate"), "{err}");
    let err = fails(&["nonsense"]);
    assert!(err.contains("nonsense"), "{err}");
    fails(&[]);

    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let err = fails(&["id", "--data-dir", path(&missing)]);
    assert!(err.contains("storemesh init"), "{err}");

    let dir = tmp.path().join("s1");
    init(&dir, "s1", &[]);
    let config_path = dir.join("storemesh.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        config.replace("[sync]\n", "[sync]\nanti_entropy_msec = 10\n"),
    )
    .unwrap();
    let err = fails(&["id", "--data-dir", path(&dir)]);
    assert!(err.contains("anti_entropy_msec"), "{err}");
    let err = fails(&["peer", "list", "--data-dir", path(&dir)]);
    assert!(err.contains("anti_entropy_msec"), "{err}");

    std::fs::write(&config_path, format!("colour = \"red\"\n{config}")).unwrap();
    let err = fails(&["id", "--data-dir", path(&dir)]);
    assert!(err.contains("`colour`"), "{err}");
}

#[test]
fn help_and_version_succeed() {
    assert!(ok(&["--help"]).contains("peer"));
    assert!(ok(&["--version"]).starts_with("storemesh "));
    assert!(ok(&["peer", "add", "--help"]).contains("--replace"));
}
