use super::*;

const ID_A: &str = "aa00000000000000000000000000000000000000000000000000000000000001";
const ID_B: &str = "bb00000000000000000000000000000000000000000000000000000000000002";

fn err(text: &str) -> String {
    Config::from_toml_str(text).expect_err("config should be rejected")
}

#[test]
fn http_limits_default_and_are_checked() {
    let c = Config::from_toml_str("name = \"a\"\n").unwrap();
    assert_eq!(c.api.header_timeout_ms, 10_000);
    assert_eq!(c.api.body_timeout_ms, 30_000);
    assert_eq!(c.api.max_connections, MAX_CONNECTIONS_DEFAULT);
    let c = Config::from_toml_str(
        "name = \"a\"\n[api]\nheader_timeout_ms = 2000\nbody_timeout_ms = 5000\nmax_connections = 100\n",
    )
    .unwrap();
    assert_eq!(
        (
            c.api.header_timeout_ms,
            c.api.body_timeout_ms,
            c.api.max_connections
        ),
        (2000, 5000, 100)
    );
    assert!(err("name = \"a\"\n[api]\nheader_timeout_ms = 0\n").contains("header_timeout_ms"));
    assert!(err("name = \"a\"\n[api]\nbody_timeout_ms = 99999999\n").contains("body_timeout_ms"));
    assert!(err("name = \"a\"\n[api]\nmax_connections = 0\n").contains("max_connections"));
}

fn with_token(mut c: Config, name: &str, token: &str, scopes: &[Scope]) -> Config {
    c.api.tokens.push(TokenConfig {
        locations: None,
        name: name.into(),
        token: token.into(),
        scopes: scopes.to_vec(),
    });
    c
}

#[test]
fn minimal_config_gets_every_default() {
    let c = Config::from_toml_str("name = \"store-1\"\n").unwrap();
    assert_eq!(c, Config::new("store-1"));
    assert_eq!(c.role, Role::Store);
    assert_eq!(c.location, "store-1");
    assert_eq!(c.quic_addr, "127.0.0.1:7400");
    assert_eq!(c.http_addr, "127.0.0.1:8400");
    assert_eq!(c.policy, Policy::Strict);
    assert_eq!(c.buckets, 64);
    assert!(c.peers.is_empty());
    assert!(c.api.public_reads);
    assert_eq!(c.api.body_bytes_max, 1024 * 1024);
    assert!(c.api.tokens.is_empty());
    assert_eq!(c.sync.anti_entropy_ms, 5000);
    assert_eq!(c.sync.reconnect_min_ms, 200);
    assert_eq!(c.sync.reconnect_max_ms, 10_000);
    assert_eq!(c.sync.keep_alive_ms, 4000);
    assert_eq!(c.sync.idle_timeout_ms, 15_000);
    assert_eq!(c.loyalty.points_per_unit, 1);
    assert_eq!(c.quic_socket().unwrap(), "127.0.0.1:7400".parse().unwrap());
    assert_eq!(c.http_socket().unwrap(), "127.0.0.1:8400".parse().unwrap());
}

#[test]
fn partial_tables_keep_other_defaults() {
    let c = Config::from_toml_str(
        "name = \"web\"\nrole = \"webshop\"\nlocation = \"wh-1\"\npolicy = \"relaxed\"\n\
         [api]\npublic_reads = false\n[sync]\nanti_entropy_ms = 1000\n",
    )
    .unwrap();
    assert_eq!(c.role, Role::Webshop);
    assert_eq!(c.location, "wh-1");
    assert_eq!(c.policy, Policy::Relaxed);
    assert!(!c.api.public_reads);
    assert_eq!(c.api.body_bytes_max, BODY_BYTES_MAX_DEFAULT);
    assert_eq!(c.sync.anti_entropy_ms, 1000);
    assert_eq!(c.sync.idle_timeout_ms, 15_000);
}

#[test]
fn round_trip_through_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::new("store-1");
    c.role = Role::Webshop;
    c.policy = Policy::Relaxed;
    c.buckets = 16;
    c.peers.push(PeerConfig {
        name: "store-2".into(),
        id: NodeId::parse(ID_A).unwrap(),
        addr: "10.0.0.2:7400".into(),
        location: None,
    });
    c.peers.push(PeerConfig {
        name: "web".into(),
        id: NodeId::parse(ID_B).unwrap(),
        addr: "web.example.net:7400".into(),
        location: Some("web-dc".into()),
    });
    let c = with_token(c, "admin", "0123456789abcdef0123", &[Scope::Admin]);
    let c = with_token(
        c,
        "till-1",
        "till-token-till-token",
        &[Scope::Read, Scope::Sell],
    );
    c.save(dir.path()).unwrap();
    assert_eq!(Config::load(dir.path()).unwrap(), c);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(Config::path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Saving again replaces the file and leaves no temporary behind.
    c.save(dir.path()).unwrap();
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from(CONFIG_FILE_NAME)]);
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let e = err("name = \"a\"\nfoo = 1\n");
    assert!(e.contains("`foo`"), "{e}");
    assert!(e.contains("line 2"), "{e}");
    assert!(!e.contains('\n'), "{e}");

    let e = err("name = \"a\"\n[api]\nfoo = 1\n");
    assert!(e.contains("`foo`") && e.contains("public_reads"), "{e}");
    assert!(e.starts_with("line 3 (in [api]): "), "{e}");

    let e = err(&format!(
        "name = \"a\"\n[[peers]]\nname = \"b\"\nid = \"{ID_A}\"\naddr = \"1.2.3.4:7400\"\nextra = true\n"
    ));
    assert!(e.contains("`extra`") && e.contains("(in [[peers]])"), "{e}");

    let e = err("name = \"a\"\n[[api.tokens]]\nname = \"t\"\ntoken = \"0123456789abcdef\"\nscopes = [\"read\"]\ncolour = 1\n");
    assert!(e.contains("`colour`"), "{e}");

    let e = err("name = \"a\"\n[sync]\nanti_entropy = 5\n");
    assert!(e.contains("`anti_entropy`"), "{e}");

    let e = err("name = \"a\"\n[loyalty]\npoints = 5\n");
    assert!(e.contains("`points`"), "{e}");

    let e = err("name = \"a\"\n[extra]\nx = 1\n");
    assert!(e.contains("`extra`"), "{e}");
}

#[test]
fn bad_values_are_rejected() {
    let e = err("name = \"a\"\n[[peers]]\nname = \"b\"\nid = \"abc\"\naddr = \"1.2.3.4:7400\"\n");
    assert!(e.contains("node id") && e.contains("line"), "{e}");
    assert!(err("name = \"Store 1\"\n").contains("name"));
    assert!(err("name = \"\"\n").contains("name"));
    assert!(err("name = \"a\"\nlocation = \"L!\"\n").contains("location"));
    assert!(err("name = \"a\"\nrole = \"warehouse\"\n").contains("warehouse"));
    assert!(err("name = \"a\"\npolicy = \"lax\"\n").contains("lax"));
    assert!(err("name = \"a\"\nquic_addr = \"localhost:99999\"\n").contains("quic_addr"));
    // A host name this machine resolves itself is a listen address too.
    let c = Config::from_toml_str("name = \"a\"\nhttp_addr = \"localhost:8400\"\n")
        .expect("localhost:8400 is a listen address");
    assert_eq!(c.http_socket().expect("resolves").port(), 8400);
    assert!(err("name = \"a\"\nhttp_addr = \"8400\"\n").contains("http_addr"));
    assert!(err("name = \"a\"\nbuckets = 0\n").contains("buckets"));
    assert!(err("name = \"a\"\nbuckets = 5000\n").contains("buckets"));
    assert!(err("role = \"store\"\n").contains("`name`"));
    assert!(err("name = \"a\"\n[sync]\nkeep_alive_ms = 20000\n").contains("keep_alive_ms"));
    assert!(err("name = \"a\"\n[sync]\nreconnect_min_ms = 20000\n").contains("reconnect_min_ms"));
    assert!(err("name = \"a\"\n[api]\nbody_bytes_max = 10\n").contains("body_bytes_max"));
    assert!(err("name = \"a\"\n[loyalty]\npoints_per_unit = 9999999\n").contains("points_per_unit"));
    assert!(err("name = \"a\n").starts_with("line 1"));
}

#[test]
fn administrators_and_peer_locations_are_checked() {
    let peer = |name: &str, id: &str, loc: &str| {
        format!("[[peers]]\nname = \"{name}\"\nid = \"{id}\"\naddr = \"1.2.3.4:1\"\nlocation = \"{loc}\"\n")
    };
    let ok = format!(
        "name = \"a\"\nadministrators = [\"a\", \"b\", \"{ID_B}\"]\n{}",
        peer("b", ID_A, "b-dc")
    );
    let c = Config::from_toml_str(&ok).unwrap();
    assert_eq!(c.peers[0].location.as_deref(), Some("b-dc"));
    assert_eq!(
        c.administrator_id("b", None),
        Some(NodeId::parse(ID_A).unwrap())
    );
    assert_eq!(
        c.administrator_id(ID_B, None),
        Some(NodeId::parse(ID_B).unwrap())
    );
    let e = err(&format!(
        "name = \"a\"\nadministrators = [\"nobody\"]\n{}",
        peer("b", ID_A, "b-dc")
    ));
    assert!(e.contains("administrators[0]"), "{e}");
    let e = err(&format!("name = \"a\"\n{}", peer("b", ID_A, "a")));
    assert!(e.contains("own location"), "{e}");
    let e = err(&format!(
        "name = \"a\"\n{}{}",
        peer("b", ID_A, "x"),
        peer("c", ID_B, "x")
    ));
    assert!(e.contains("peers[1].location"), "{e}");
}

#[test]
fn peers_must_be_unique_and_not_self() {
    let peer = |name: &str, id: &str, addr: &str| {
        format!("[[peers]]\nname = \"{name}\"\nid = \"{id}\"\naddr = \"{addr}\"\n")
    };
    let ok = format!(
        "name = \"a\"\n{}{}",
        peer("b", ID_A, "1.2.3.4:1"),
        peer("c", ID_B, "h.example:2")
    );
    assert_eq!(Config::from_toml_str(&ok).unwrap().peers.len(), 2);

    let e = err(&format!(
        "name = \"a\"\n{}{}",
        peer("b", ID_A, "1.2.3.4:1"),
        peer("b", ID_B, "1.2.3.4:2")
    ));
    assert!(e.contains("peers[1].name") && e.contains("unique"), "{e}");
    let e = err(&format!(
        "name = \"a\"\n{}{}",
        peer("b", ID_A, "1.2.3.4:1"),
        peer("c", ID_A, "1.2.3.4:2")
    ));
    assert!(e.contains("peers[1].id") && e.contains("unique"), "{e}");
    let e = err(&format!("name = \"a\"\n{}", peer("a", ID_A, "1.2.3.4:1")));
    assert!(e.contains("own name"), "{e}");
    let e = err(&format!("name = \"a\"\n{}", peer("b", ID_A, "nope")));
    assert!(e.contains("peers[0].addr"), "{e}");
    let e = err(&format!("name = \"a\"\n{}", peer("b", ID_A, "1.2.3.4:0")));
    assert!(e.contains("port 0"), "{e}");
    // Upper-case hex is accepted and stored in lower case.
    let c = Config::from_toml_str(&format!(
        "name = \"a\"\n{}",
        peer("b", &ID_A.to_uppercase(), "1.2.3.4:1")
    ))
    .unwrap();
    assert_eq!(c.peers[0].id.hex(), ID_A);
    assert_eq!(
        c.peer_by_name("b").unwrap().id,
        NodeId::parse(ID_A).unwrap()
    );
    assert_eq!(
        c.peer_by_id(&NodeId::parse(ID_A).unwrap()).unwrap().name,
        "b"
    );
    assert!(c.peer_by_name("z").is_none());
}

#[test]
fn peer_addr_forms() {
    assert!(validate_peer_addr("addr", "10.0.0.1:7400").is_ok());
    assert!(validate_peer_addr("addr", "[::1]:7400").is_ok());
    assert!(validate_peer_addr("addr", "localhost:7400").is_ok());
    assert!(validate_peer_addr("addr", "store-2.example.net:7400").is_ok());
    for bad in [
        "",
        "host",
        "host:",
        ":7400",
        "host:99999",
        "ho st:1",
        "-a:1",
        "a..b:1",
        "::1:7400",
    ] {
        assert!(validate_peer_addr("addr", bad).is_err(), "{bad}");
    }
}

#[test]
fn tokens_are_validated() {
    let base = || Config::new("a");
    assert!(with_token(base(), "t", "0123456789abcdef", &[Scope::Read])
        .validate()
        .is_ok());
    // Short tokens work (a warning is logged); empty or over-long ones do not.
    assert!(with_token(base(), "t", "short", &[Scope::Read])
        .validate()
        .is_ok());
    for bad in [String::new(), "x".repeat(TOKEN_LEN_MAX + 1)] {
        let e = with_token(base(), "t", &bad, &[Scope::Read])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("api.tokens[0].token"), "{e}");
    }
    let e = with_token(base(), "t", "0123456789 abcdef", &[Scope::Read])
        .validate()
        .unwrap_err();
    assert!(e.to_string().contains("printable"), "{e}");
    let e = with_token(base(), "t", "0123456789abcdef", &[])
        .validate()
        .unwrap_err();
    assert!(e.to_string().contains("scopes"), "{e}");
    let dup_name = with_token(
        with_token(base(), "t", "0123456789abcdef", &[Scope::Read]),
        "t",
        "fedcba9876543210",
        &[Scope::Read],
    );
    assert!(dup_name
        .validate()
        .unwrap_err()
        .to_string()
        .contains("names must be unique"));
    let dup_token = with_token(
        with_token(base(), "t", "0123456789abcdef", &[Scope::Read]),
        "u",
        "0123456789abcdef",
        &[Scope::Read],
    );
    assert!(dup_token
        .validate()
        .unwrap_err()
        .to_string()
        .contains("tokens must be unique"));
    let e = err("name = \"a\"\n[[api.tokens]]\nname = \"t\"\ntoken = \"0123456789abcdef\"\nscopes = [\"write\"]\n");
    assert!(e.contains("`write`"), "{e}");
}

#[test]
fn token_lookup_and_scopes() {
    let c = with_token(
        Config::new("a"),
        "admin",
        "admin-token-0123456789",
        &[Scope::Admin],
    );
    let c = with_token(
        c,
        "till",
        "till-token-0123456789",
        &[Scope::Read, Scope::Sell],
    );
    let (name, scopes) = c.token_scopes("till-token-0123456789").unwrap();
    assert_eq!(name, "till");
    assert!(Scope::allows(scopes, Scope::Sell));
    assert!(Scope::allows(scopes, Scope::Read));
    assert!(!Scope::allows(scopes, Scope::Stock));
    assert!(!Scope::allows(scopes, Scope::Customers));
    assert!(!Scope::allows(scopes, Scope::Admin));
    let (name, scopes) = c.token_scopes("admin-token-0123456789").unwrap();
    assert_eq!(name, "admin");
    for s in [
        Scope::Read,
        Scope::Sell,
        Scope::Stock,
        Scope::Customers,
        Scope::Admin,
    ] {
        assert!(Scope::allows(scopes, s));
    }
    assert!(c.token_scopes("till-token-012345678").is_none());
    assert!(c.token_scopes("till-token-01234567890").is_none());
    assert!(c.token_scopes("").is_none());
    assert!(!Scope::allows(&[], Scope::Read));
}

#[test]
fn load_errors_are_one_line_and_helpful() {
    let dir = tempfile::tempdir().unwrap();
    let e = format!("{:#}", Config::load(dir.path()).unwrap_err());
    assert!(
        e.starts_with("cannot read ") && e.contains("storemesh init"),
        "{e}"
    );
    assert!(!e.contains("os error"), "{e}");
    fs::write(
        Config::path(dir.path()),
        "name = \"a\"\n\n[api]\npubic_reads = false\n",
    )
    .unwrap();
    let e = format!("{:#}", Config::load(dir.path()).unwrap_err());
    assert!(
        e.starts_with("invalid config ") && e.contains("`pubic_reads`") && e.contains("line 4"),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn save_refuses_an_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::new("a");
    c.buckets = 0;
    assert!(c.save(dir.path()).is_err());
    assert!(!Config::path(dir.path()).exists());
}

#[test]
fn io_message_drops_os_error_suffix() {
    let e = std::io::Error::from_raw_os_error(2);
    assert_eq!(io_message(&e), "No such file or directory");
    assert_eq!(one_line("a\n  b\n\nc"), "a b c");
}
