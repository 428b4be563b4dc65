//! The `storemesh` command line (CONTRACT.md, "CLI").
//!
//! Every failure ends as one line `error: <message>` on stderr and a non-zero exit
//! code: 1 for errors while running a command, clap's 2 for bad usage, and a panic
//! hook keeps even a bug down to one line. Data goes to stdout, notes and logs to
//! stderr, so scripts can parse stdout.

use std::fs;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use storemesh_protocol::ids::{validate_name, NodeId};
use tracing_subscriber::filter::{EnvFilter, LevelFilter};

use crate::config::{
    check_listen_addr, io_message, one_line, validate_peer_addr, validate_token, Config,
    PeerConfig, Policy, Role, Scope, TokenConfig, BUCKETS_DEFAULT, BUCKETS_MAX, HTTP_ADDR_DEFAULT,
    QUIC_ADDR_DEFAULT,
};
use crate::identity::Identity;

/// Name of the admin token `init` writes.
const INIT_TOKEN_NAME: &str = "admin";
/// Random bytes in a generated token (64 hex characters).
const INIT_TOKEN_BYTES: usize = 32;

#[derive(Debug, Parser)]
#[command(
    name = "storemesh",
    version,
    about = "A peer-to-peer retail inventory mesh: every store and the web shop run a node.",
    propagate_version = true
)]
pub struct Cli {
    /// Log line format on stderr (RUST_LOG sets the level, e.g. RUST_LOG=debug)
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a data directory: node identity, storemesh.toml and an admin API token
    Init(InitArgs),
    /// Print `NAME NODE_ID QUIC_ADDR`: what another node needs to peer with this one
    Id(DataDir),
    /// Manage the trusted peers in storemesh.toml
    Peer {
        #[command(subcommand)]
        command: PeerCommand,
    },
    /// Run the node until SIGINT/SIGTERM
    Run(DataDir),
    /// A self-contained tour: a small mesh on loopback, a partition and a heal
    Demo {
        /// Keep the demo mesh running after the tour
        #[arg(long)]
        serve: bool,
    },
    /// Import a stock file into the running node (applied as counts, all or nothing)
    Import {
        #[command(subcommand)]
        command: ImportCommand,
    },
    /// Export data from the running node
    Export {
        #[command(subcommand)]
        command: ExportCommand,
    },
    /// Mesh-wide node operations (sent to the running node of DIR)
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum NodeCommand {
    /// Retire a node: its key is refused mesh-wide and its rights pass to the successor
    Retire {
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The node to retire
        #[arg(long, value_parser = parse_name)]
        name: String,
        /// The node that takes over its rights (e.g. the redeployed web shop)
        #[arg(long, value_parser = parse_name)]
        successor: String,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum ImportCommand {
    /// Opening balances / spreadsheets: Shopify's inventory CSV or `sku,location,on_hand`
    Counts {
        /// The CSV file
        file: PathBuf,
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[arg(long, value_enum, default_value_t = crate::csvio::Format::Shopify)]
        format: crate::csvio::Format,
        /// `full`: every product of each location in the file that the file
        /// does not list is set to 0 (a full stocktake); `partial` (default):
        /// only the listed products change
        #[arg(long, value_enum, default_value_t = crate::csvio::ImportScope::Partial)]
        scope: crate::csvio::ImportScope,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum ExportCommand {
    /// Stock per SKU and location as CSV (stdout unless --output)
    Inventory {
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[arg(long, value_enum, default_value_t = crate::csvio::Format::Shopify)]
        format: crate::csvio::Format,
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
pub struct DataDir {
    /// The node's data directory
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// The node's data directory (created if missing)
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Node name, unique within the mesh: 1-64 of a-z 0-9 - _ .
    #[arg(long, value_parser = parse_name)]
    pub name: String,
    #[arg(long, value_enum, default_value_t = Role::Store)]
    pub role: Role,
    /// The location this node owns [default: the node name]
    #[arg(long, value_name = "LOC", value_parser = parse_name)]
    pub location: Option<String>,
    /// QUIC listen address for peers
    #[arg(long, value_name = "HOST:PORT", default_value = QUIC_ADDR_DEFAULT, value_parser = parse_listen_addr)]
    pub quic_addr: String,
    /// HTTP listen address for the API
    #[arg(long, value_name = "HOST:PORT", default_value = HTTP_ADDR_DEFAULT, value_parser = parse_listen_addr)]
    pub http_addr: String,
    /// The admin API token: up to 256 printable characters, 16 or more advised [default: random]
    #[arg(long, value_name = "TOKEN", value_parser = parse_token)]
    pub api_token: Option<String>,
    /// The own location's policy beyond sell-rights
    #[arg(long, value_enum, default_value_t = Policy::Strict)]
    pub policy: Policy,
    /// Buckets per location; must be equal on every node of the mesh
    #[arg(long, value_name = "N", default_value_t = BUCKETS_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(BUCKETS_MAX)))]
    pub buckets: u32,
    /// Serve the API over HTTPS: makes a self-signed certificate for this
    /// node's names, writes [api.tls] and prints the certificate's SHA-256
    /// fingerprint for clients to pin
    #[arg(long)]
    pub https: bool,
}

#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Trust a peer: its name, node id (from `storemesh id` on it) and QUIC address
    Add(PeerAddArgs),
    /// Revoke a peer: it is refused from the node's next start on
    Remove(PeerRemoveArgs),
    /// List the trusted peers: `NAME NODE_ID ADDR` per line
    List(DataDir),
}

#[derive(Debug, clap::Args)]
pub struct PeerAddArgs {
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The peer's node name
    #[arg(long, value_parser = parse_name)]
    pub name: String,
    /// The peer's node id: 64 hex characters
    #[arg(long, value_name = "NODE_ID", value_parser = parse_node_id)]
    pub id: NodeId,
    /// The peer's QUIC address
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_peer_addr)]
    pub addr: String,
    /// The peer's own location, when it is not its name: bound to the peer
    /// here, so no other node can claim it
    #[arg(long, value_name = "LOC", value_parser = parse_name)]
    pub location: Option<String>,
    /// Overwrite a peer with the same name or id instead of refusing
    #[arg(long)]
    pub replace: bool,
}

#[derive(Debug, clap::Args)]
pub struct PeerRemoveArgs {
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The peer's node name
    #[arg(long)]
    pub name: String,
}

fn parse_name(text: &str) -> Result<String, String> {
    validate_name("name", text).map(|()| text.to_string())
}

fn parse_node_id(text: &str) -> Result<NodeId, String> {
    NodeId::parse(text)
}

fn parse_listen_addr(text: &str) -> Result<String, String> {
    check_listen_addr("address", text).map(|()| text.to_string())
}

fn parse_peer_addr(text: &str) -> Result<String, String> {
    validate_peer_addr("address", text).map(|()| text.to_string())
}

fn parse_token(text: &str) -> Result<String, String> {
    validate_token(text).map(|()| text.to_string())
}

/// Parses the command line. On `--help`/`--version` prints them; on bad usage
/// prints one line; either way returns the exit code to end with.
pub fn parse() -> Result<Cli, ExitCode> {
    parse_from(std::env::args_os())
}

pub fn parse_from<I, T>(args: I) -> Result<Cli, ExitCode>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Cli::try_parse_from(args).map_err(|e| {
        let code = u8::try_from(e.exit_code()).unwrap_or(2);
        if e.use_stderr() {
            let _ = writeln!(std::io::stderr(), "{}", clap_one_line(&e));
        } else {
            // --help and --version: clap's own, multi-line, on stdout.
            let _ = e.print();
        }
        ExitCode::from(code)
    })
}

/// clap's message without the usage block, on one line:
/// `error: unexpected argument '--dta-dir' found tip: a similar argument exists: '--data-dir' (see --help)`.
fn clap_one_line(e: &clap::Error) -> String {
    if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // clap would print the whole help text here.
        return "error: a command is missing (see --help for the commands)".to_string();
    }
    let rendered = e.render().to_string();
    let body: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .collect();
    let mut line = one_line(&body.join("\n"));
    if !line.starts_with("error:") {
        line = format!("error: {line}");
    }
    format!("{line} (see --help)")
}

/// Logs go to stderr; RUST_LOG wins, else `info` for long-running commands and
/// `warn` for the one-shot ones, whose stdout is data.
pub fn init_logging(cli: &Cli) {
    let default_level = match cli.command {
        Command::Run(_) => LevelFilter::INFO,
        // The demo prints its own story; logs would drown it.
        _ => LevelFilter::WARN,
    };
    let filter = EnvFilter::builder()
        .with_default_directive(default_level.into())
        .from_env_lossy();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A subscriber already set (tests) is fine: keep it.
    let _ = match cli.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A panic prints one line, never a trace (set RUST_BACKTRACE=1 to get one).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_string());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let mut stderr = std::io::stderr().lock();
        let _ = writeln!(
            stderr,
            "error: internal error (a bug; please report it): {}{at}",
            one_line(&payload)
        );
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            let _ = writeln!(stderr, "{}", std::backtrace::Backtrace::force_capture());
        }
    }));
}

/// Prints `error: <message>` (the whole cause chain on one line) and returns
/// exit code 1.
pub fn report(err: &anyhow::Error) -> ExitCode {
    let _ = writeln!(
        std::io::stderr(),
        "error: {}",
        one_line(&format!("{err:#}"))
    );
    ExitCode::from(1)
}

/// Runs the parsed command.
pub async fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init(args) => init(&args),
        Command::Id(args) => id(&args.data_dir),
        Command::Peer { command } => match command {
            PeerCommand::Add(args) => peer_add(&args),
            PeerCommand::Remove(args) => peer_remove(&args),
            PeerCommand::List(args) => peer_list(&args.data_dir),
        },
        Command::Run(args) => crate::server::run(&args.data_dir).await,
        Command::Demo { serve } => crate::demo::run(serve).await,
        Command::Import {
            command:
                ImportCommand::Counts {
                    file,
                    data_dir,
                    format,
                    scope,
                },
        } => crate::csvio::import_file(&data_dir, &file, format, scope).await,
        Command::Node {
            command:
                NodeCommand::Retire {
                    data_dir,
                    name,
                    successor,
                },
        } => crate::csvio::retire(&data_dir, &name, &successor).await,
        Command::Export {
            command:
                ExportCommand::Inventory {
                    data_dir,
                    format,
                    output,
                },
        } => {
            let bytes = crate::csvio::export(&data_dir, format).await?;
            match output {
                Some(path) => std::fs::write(&path, &bytes).map_err(|e| {
                    anyhow::anyhow!("cannot write {}: {}", path.display(), io_message(&e))
                }),
                None => print_stdout(&String::from_utf8_lossy(&bytes)),
            }
        }
    }
}

/// Writes data to stdout; a closed pipe is an error, not a panic.
fn print_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| anyhow::anyhow!("cannot write to stdout: {}", io_message(&e)))
}

/// Notes for a human; scripts read stdout only.
fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

fn init(args: &InitArgs) -> anyhow::Result<()> {
    let dir = &args.data_dir;
    let mut config = Config::new(&args.name);
    config.role = args.role;
    config.location = args.location.clone().unwrap_or_else(|| args.name.clone());
    config.quic_addr = args.quic_addr.clone();
    config.http_addr = args.http_addr.clone();
    config.policy = args.policy;
    config.buckets = args.buckets;
    let token = match &args.api_token {
        Some(token) => token.clone(),
        None => hex::encode(rand::random::<[u8; INIT_TOKEN_BYTES]>()),
    };
    config.api.tokens.push(TokenConfig {
        locations: None,
        name: INIT_TOKEN_NAME.to_string(),
        token: token.clone(),
        scopes: vec![Scope::Admin],
    });
    // Everything is checked before the disk is touched.
    config.validate()?;

    if Identity::exists(dir) {
        bail!(
            "{} already holds a node identity; refusing to overwrite it (use another --data-dir, or remove that directory to start over)",
            dir.display()
        );
    }
    let config_path = Config::path(dir);
    if config_path.exists() {
        bail!(
            "{} already exists; refusing to overwrite it (use another --data-dir, or remove that file)",
            config_path.display()
        );
    }
    create_data_dir(dir)?;
    let identity = Identity::generate(&config.name).context("cannot generate the node identity")?;
    let https = if args.https {
        let made =
            crate::https::make_self_signed(dir, crate::https::node_names(&config.http_addr))?;
        config.api.tls = Some(made.tls.clone());
        Some(made)
    } else {
        None
    };
    let remove_https = || {
        if let Some(m) = &https {
            let _ = fs::remove_file(&m.tls.cert);
            let _ = fs::remove_file(&m.tls.key);
        }
    };
    if let Err(e) = config.save(dir) {
        remove_https();
        return Err(e);
    }
    // The config is written first and taken back if the identity cannot be saved,
    // so a failed init leaves nothing that makes the next attempt refuse.
    if let Err(e) = identity.save(dir) {
        let _ = fs::remove_file(&config_path);
        remove_https();
        return Err(e.context(format!(
            "cannot save the node identity in {}",
            dir.display()
        )));
    }

    print_stdout(&format!(
        "node_id: {}\napi_token: {token}\n",
        identity.node_id
    ))?;
    if let Some(m) = &https {
        print_stdout(&format!(
            "https_cert: {}\nhttps_fingerprint: {}\nhttps_names: {}\n",
            m.tls.cert.display(),
            m.fingerprint_sha256,
            m.names.join(",")
        ))?;
    }
    if token.len() < crate::config::TOKEN_LEN_ADVISED {
        note(&format!(
            "warning: the API token is shorter than {} characters and easy to guess; fine for a test, not for a store",
            crate::config::TOKEN_LEN_ADVISED
        ));
    }
    if std::io::stderr().is_terminal() {
        let d = dir.display();
        note(&format!(
            "\nNext steps:\n  storemesh id --data-dir {d}          # give this line to the other nodes\n  storemesh peer add --data-dir {d} --name NAME --id NODE_ID --addr HOST:PORT\n  storemesh run --data-dir {d}\nKeep the api_token: it is the admin token for the HTTP API (also in {}).",
            config_path.display()
        ));
    }
    Ok(())
}

/// `mkdir -p`; a directory made here is private, because it will hold the key.
fn create_data_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {}", dir.display(), io_message(&e)))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| {
            anyhow::anyhow!("cannot restrict {}: {}", dir.display(), io_message(&e))
        })?;
    }
    Ok(())
}

fn id(dir: &Path) -> anyhow::Result<()> {
    let config = Config::load(dir)?;
    let identity = Identity::load(dir)?;
    if config.quic_socket()?.ip().is_unspecified() {
        note(&format!(
            "note: quic_addr {} listens on every interface; peers need an address of this host they can reach",
            config.quic_addr
        ));
    }
    print_stdout(&format!(
        "{} {} {}\n",
        config.name, identity.node_id, config.quic_addr
    ))
}

fn peer_add(args: &PeerAddArgs) -> anyhow::Result<()> {
    let dir = &args.data_dir;
    let mut config = Config::load(dir)?;
    let identity = Identity::load(dir)?;
    if args.id == identity.node_id {
        bail!(
            "--id {} is this node's own id; give the id that `storemesh id` prints on the peer",
            args.id
        );
    }
    if args.name == config.name {
        bail!(
            "--name {} is this node's own name; node names are unique in a mesh",
            args.name
        );
    }
    if !args.replace {
        if let Some(p) = config.peer_by_name(&args.name) {
            bail!(
                "a peer named {} already exists ({} {}); use --replace to overwrite it",
                p.name,
                p.id,
                p.addr
            );
        }
        if let Some(p) = config.peer_by_id(&args.id) {
            bail!(
                "node id {} already belongs to peer {}; use --replace to overwrite it",
                p.id,
                p.name
            );
        }
    }
    config
        .peers
        .retain(|p| p.name != args.name && p.id != args.id);
    config.peers.push(PeerConfig {
        name: args.name.clone(),
        id: args.id,
        addr: args.addr.clone(),
        location: args.location.clone(),
    });
    config.save(dir)?;
    note(&format!(
        "added peer {} {} {}; it takes effect at the node's next start",
        args.name, args.id, args.addr
    ));
    Ok(())
}

fn peer_remove(args: &PeerRemoveArgs) -> anyhow::Result<()> {
    let dir = &args.data_dir;
    let mut config = Config::load(dir)?;
    let Some(index) = config.peers.iter().position(|p| p.name == args.name) else {
        let known: Vec<&str> = config.peers.iter().map(|p| p.name.as_str()).collect();
        let known = if known.is_empty() {
            "no peers are configured".to_string()
        } else {
            format!("peers: {}", known.join(", "))
        };
        bail!(
            "no peer named {:?} in {} ({known})",
            args.name,
            Config::path(dir).display()
        );
    };
    let removed = config.peers.remove(index);
    config.save(dir)?;
    note(&format!(
        "removed peer {} {}; it is refused from the node's next start on",
        removed.name, removed.id
    ));
    Ok(())
}

fn peer_list(dir: &Path) -> anyhow::Result<()> {
    let config = Config::load(dir)?;
    if config.peers.is_empty() {
        note(&format!(
            "no peers configured in {}",
            Config::path(dir).display()
        ));
        return Ok(());
    }
    let text: String = config
        .peers
        .iter()
        .map(|p| format!("{} {} {}\n", p.name, p.id, p.addr))
        .collect();
    print_stdout(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn init_defaults_follow_the_contract() {
        let cli =
            Cli::try_parse_from(["storemesh", "init", "--data-dir", "/d", "--name", "s1"]).unwrap();
        let Command::Init(a) = cli.command else {
            panic!("not init")
        };
        assert_eq!(a.role, Role::Store);
        assert_eq!(a.location, None);
        assert_eq!(a.quic_addr, "127.0.0.1:7400");
        assert_eq!(a.http_addr, "127.0.0.1:8400");
        assert_eq!(a.policy, Policy::Strict);
        assert_eq!(a.buckets, 64);
        assert_eq!(cli.log_format, LogFormat::Text);
    }

    #[test]
    fn bad_values_are_usage_errors_on_one_line() {
        for args in [
            &[
                "storemesh",
                "init",
                "--data-dir",
                "/d",
                "--name",
                "Bad Name",
            ][..],
            &[
                "storemesh",
                "init",
                "--data-dir",
                "/d",
                "--name",
                "a",
                "--buckets",
                "0",
            ],
            &[
                "storemesh",
                "init",
                "--data-dir",
                "/d",
                "--name",
                "a",
                "--api-token",
                "has a space",
            ],
            &[
                "storemesh",
                "init",
                "--data-dir",
                "/d",
                "--name",
                "a",
                "--quic-addr",
                "nope",
            ],
            &[
                "storemesh",
                "peer",
                "add",
                "--data-dir",
                "/d",
                "--name",
                "b",
                "--id",
                "xyz",
                "--addr",
                "1.2.3.4:1",
            ],
            &["storemesh", "id", "--data-dir", "/d", "--bogus"],
            &["storemesh"],
        ] {
            let e = Cli::try_parse_from(args).unwrap_err();
            let line = clap_one_line(&e);
            assert!(
                line.starts_with("error: ") && !line.contains('\n'),
                "{line}"
            );
        }
    }
}
