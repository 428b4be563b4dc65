//! The node's configuration file, `DIR/storemesh.toml` (CONTRACT.md, "Config").
//!
//! Every struct rejects unknown keys, so a typo (`pubic_reads = false`) is an error
//! that names the key instead of a setting that silently does nothing. Errors are
//! one line: the CLI prints them as `error: <message>`.

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use storemesh_protocol::ids::{validate_name, NodeId};

mod tls;
mod webhooks;

pub use tls::TlsConfig;
pub use webhooks::{EventKind, WebhookConfig, WEBHOOKS_MAX};

/// File name of the config inside the data directory.
pub const CONFIG_FILE_NAME: &str = "storemesh.toml";

/// Defaults (CONTRACT.md).
pub const QUIC_ADDR_DEFAULT: &str = "127.0.0.1:7400";
pub const HTTP_ADDR_DEFAULT: &str = "127.0.0.1:8400";
pub const BUCKETS_DEFAULT: u32 = 64;
/// Upper bound on buckets: each bucket is an Automerge document per location, and a
/// document costs ~18 KiB of memory even when tiny (DESIGN §3).
pub const BUCKETS_MAX: u32 = 4096;
pub const BODY_BYTES_MAX_DEFAULT: usize = 1024 * 1024;
/// Request bodies below 1 KiB could not hold a multi-line sale; above 64 MiB one
/// request could take a small back-office PC's memory.
pub const BODY_BYTES_MAX_MIN: usize = 1024;
pub const BODY_BYTES_MAX_LIMIT: usize = 64 * 1024 * 1024;
/// `[api] header_timeout_ms` (CONTRACT v2): a client has this long to send a
/// request's headers (and an idle keep-alive connection this long to start its
/// next request); a slowloris client is cut off then.
pub const HEADER_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// `[api] body_timeout_ms` (CONTRACT v2): a request's whole body must arrive
/// within this long of its headers, however it trickles (a 1 MiB body takes
/// well under a second on any store network; imports of 100 MB need longer,
/// and the operator can raise it).
pub const BODY_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// Timeouts below 100 ms would cut off ordinary clients on a busy network;
/// above an hour a slow client holds a connection for good.
pub const HTTP_TIMEOUT_MS_MIN: u64 = 100;
pub const HTTP_TIMEOUT_MS_MAX: u64 = 3_600_000;
/// `[api] max_connections`: open HTTP connections at most; more are closed
/// at once. Each costs a file descriptor and up to `http::CONN_BUF_BYTES_MAX`
/// of buffer, so 16,384 bound the HTTP side's memory to about 1 GiB even if
/// every one is hostile, while 10,000 slow clients still leave room for the
/// tills.
pub const MAX_CONNECTIONS_DEFAULT: usize = 16_384;
pub const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;
/// API tokens: any length that fits a header is accepted (the contract sets
/// none); tokens shorter than `TOKEN_LEN_ADVISED` can be guessed and are
/// warned about when the node starts and at `init`.
pub const TOKEN_LEN_MIN: usize = 1;
pub const TOKEN_LEN_MAX: usize = 256;
pub const TOKEN_LEN_ADVISED: usize = 16;
/// Every duration in `[sync]` is bounded: below 10 ms is a busy loop, above an
/// hour nobody would notice the node is stuck.
pub const SYNC_MS_MIN: u64 = 10;
pub const SYNC_MS_MAX: u64 = 3_600_000;
/// A points rule above this is surely a typo (points per unit sold).
pub const LOYALTY_POINTS_PER_UNIT_MAX: u64 = 1_000_000;

/// What kind of node this is.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Store,
    Webshop,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Store => "store",
            Role::Webshop => "webshop",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The own location's sale policy (DESIGN §2, "Selling without overselling").
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Sell only out of rights held; refuse beyond them unless `override` is given.
    #[default]
    Strict,
    /// The own node's sales beyond rights are accepted and recorded as overdrafts.
    Relaxed,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Strict => "strict",
            Policy::Relaxed => "relaxed",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an API token may do (CONTRACT.md, "Token scopes").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Stock details, listings, peers.
    Read,
    /// Sales, returns, reservations.
    Sell,
    /// Receipts, counts, grants, adjustments, transfers.
    Stock,
    /// Read and write customer data.
    Customers,
    /// Everything, including erasure.
    Admin,
    /// Selling beyond rights (`"override": true` on a sale) and restocking a
    /// return that names no original sale: both create or spend stock that
    /// no ledger entry vouches for. `admin` has it.
    Override,
}

impl Scope {
    /// Whether a token granted `granted` may do something that needs `needed`.
    /// `admin` allows everything.
    pub fn allows(granted: &[Scope], needed: Scope) -> bool {
        granted.contains(&Scope::Admin) || granted.contains(&needed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Sell => "sell",
            Scope::Stock => "stock",
            Scope::Customers => "customers",
            Scope::Admin => "admin",
            Scope::Override => "override",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The whole `storemesh.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Node name, unique within the mesh.
    pub name: String,
    #[serde(default)]
    pub role: Role,
    /// The location this node owns; absent or empty means the node's name.
    #[serde(default)]
    pub location: String,
    /// QUIC listen address, `IP:PORT` or `HOST:PORT` (resolved at start).
    #[serde(default = "default_quic_addr")]
    pub quic_addr: String,
    /// HTTP listen address, `IP:PORT` or `HOST:PORT` (resolved at start).
    #[serde(default = "default_http_addr")]
    pub http_addr: String,
    /// The own location's policy; replicated with the ledger.
    #[serde(default)]
    pub policy: Policy,
    /// Buckets per location; must be equal mesh-wide (peers with another value
    /// refuse each other).
    #[serde(default = "default_buckets")]
    pub buckets: u32,
    /// IANA time zone of the own location (e.g. "Europe/Berlin"); shown with stock.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerConfig>,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub loyalty: LoyaltyConfig,
    #[serde(default)]
    pub rebalance: RebalanceConfig,
    /// `[[allocation]]`: keep a share of the own location's stock allocated to a node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allocation: Vec<AllocationConfig>,
    /// Testing aid: this node's clock reads this many milliseconds ahead of the
    /// host clock (negative: behind), to show that nodes with wrong clocks
    /// still agree (reservation expiry, records, counts). 0 in production.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub clock_offset_ms: i64,
    /// `[[webhooks]]`: where this node pushes its events (see `crate::webhooks`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookConfig>,
    /// The nodes whose retirements this node accepts: this node's own name,
    /// configured peers' names, or node ids (64 hex). Empty: any member's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub administrators: Vec<String>,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// Largest `clock_offset_ms` accepted (one week either way).
pub const CLOCK_OFFSET_MAX_MS: i64 = 7 * 24 * 3600 * 1000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocationConfig {
    /// The node that receives the allocation (e.g. the web shop).
    pub to: String,
    /// Share of each product's stock at the own location, in percent.
    pub share_percent: u32,
    /// At most this many units per product.
    pub max_units: u64,
}

/// `[rebalance]`: asking peers for sell-rights when a sale lacks them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RebalanceConfig {
    /// How long a sale may wait for a grant before it is refused; 0 = never wait.
    pub deadline_ms: u64,
}

impl Default for RebalanceConfig {
    fn default() -> RebalanceConfig {
        RebalanceConfig { deadline_ms: 200 }
    }
}

/// A trusted peer (`[[peers]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub name: String,
    /// The peer's node id; its certificate must hash to it.
    #[serde(with = "node_id_hex")]
    pub id: NodeId,
    /// `IP:PORT` or `HOST:PORT` (host names are resolved when dialing).
    pub addr: String,
    /// The peer's own location (default: none bound; a peer named like a
    /// location is preferred as its owner). Bound here: no other node's
    /// directory entry can claim it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

impl PeerConfig {
    /// The address when it is a literal `IP:PORT`; `None` for `HOST:PORT`, which
    /// needs [`PeerConfig::resolve`].
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.addr.parse().ok()
    }

    /// Resolves `addr` (a literal or a host name), preferring IPv4 because the
    /// defaults listen on 127.0.0.1.
    pub async fn resolve(&self) -> anyhow::Result<SocketAddr> {
        if let Some(addr) = self.socket_addr() {
            return Ok(addr);
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(self.addr.as_str())
            .await
            .with_context(|| format!("cannot resolve peer {} address {}", self.name, self.addr))?
            .collect();
        prefer_ipv4(&addrs).with_context(|| {
            format!(
                "peer {} address {} resolves to nothing",
                self.name, self.addr
            )
        })
    }
}

/// `[api]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Whether `GET /api/inventory` answers without a token (storefronts).
    pub public_reads: bool,
    /// Largest accepted request body; larger gets 413.
    pub body_bytes_max: usize,
    /// A request's headers must arrive within this long (slowloris).
    pub header_timeout_ms: u64,
    /// A request's body must arrive within this long of its headers.
    pub body_timeout_ms: u64,
    /// Open HTTP connections at most; more are closed at once.
    pub max_connections: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<TokenConfig>,
    /// `[api.tls]`: serve the API over HTTPS (see `crate::https`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            public_reads: true,
            body_bytes_max: BODY_BYTES_MAX_DEFAULT,
            header_timeout_ms: HEADER_TIMEOUT_MS_DEFAULT,
            body_timeout_ms: BODY_TIMEOUT_MS_DEFAULT,
            max_connections: MAX_CONNECTIONS_DEFAULT,
            tokens: Vec::new(),
            tls: None,
        }
    }
}

/// Locations one token may be limited to, at most (a chain's stores).
pub const TOKEN_LOCATIONS_MAX: usize = 4096;

/// `[[api.tokens]]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds the token (shows in logs, never the token itself).
    pub name: String,
    pub token: String,
    pub scopes: Vec<Scope>,
    /// The locations this token may write at (CONTRACT v2); all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locations: Option<Vec<String>>,
}

/// `[sync]`: timings of the mesh connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// How often a connected pair compares summaries even without news.
    pub anti_entropy_ms: u64,
    /// First reconnect delay after a lost connection; doubles up to the max.
    /// While a peer does not answer, the next dial starts at most
    /// `transport::REDIAL_INTERVAL_MAX` after an unanswered one (for
    /// `transport::FAST_REDIAL_WINDOW`).
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// QUIC keep-alive interval; must be below the idle timeout.
    pub keep_alive_ms: u64,
    /// A connection silent this long is considered lost.
    pub idle_timeout_ms: u64,
    /// One dial's handshake is abandoned after this long and started afresh
    /// (within `transport::REDIAL_INTERVAL_MAX`), so a healed link is found
    /// without waiting out QUIC's retransmission back-off.
    pub connect_timeout_ms: u64,
}

impl Default for SyncConfig {
    fn default() -> SyncConfig {
        SyncConfig {
            anti_entropy_ms: 5_000,
            reconnect_min_ms: 200,
            reconnect_max_ms: 10_000,
            keep_alive_ms: 4_000,
            idle_timeout_ms: 15_000,
            connect_timeout_ms: 2_000,
        }
    }
}

/// `[loyalty]`: the points rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoyaltyConfig {
    /// Points a customer earns per unit sold; 0 turns earning off.
    pub points_per_unit: u64,
}

impl Default for LoyaltyConfig {
    fn default() -> LoyaltyConfig {
        LoyaltyConfig { points_per_unit: 1 }
    }
}

fn default_quic_addr() -> String {
    QUIC_ADDR_DEFAULT.to_string()
}
fn default_http_addr() -> String {
    HTTP_ADDR_DEFAULT.to_string()
}
fn default_buckets() -> u32 {
    BUCKETS_DEFAULT
}

fn default_timezone() -> String {
    "UTC".into()
}

/// Node ids are stored as 64 lowercase hex characters.
mod node_id_hex {
    use super::*;

    pub fn serialize<S: Serializer>(id: &NodeId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&id.hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NodeId, D::Error> {
        let text = String::deserialize(d)?;
        NodeId::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Config {
    /// A config with every default, for `storemesh init` and the demo.
    pub fn new(name: &str) -> Config {
        Config {
            name: name.to_string(),
            role: Role::default(),
            location: name.to_string(),
            quic_addr: default_quic_addr(),
            http_addr: default_http_addr(),
            policy: Policy::default(),
            buckets: BUCKETS_DEFAULT,
            timezone: default_timezone(),
            peers: Vec::new(),
            api: ApiConfig::default(),
            sync: SyncConfig::default(),
            loyalty: LoyaltyConfig::default(),
            rebalance: RebalanceConfig::default(),
            allocation: Vec::new(),
            clock_offset_ms: 0,
            webhooks: Vec::new(),
            administrators: Vec::new(),
        }
    }

    /// Where the config of data directory `dir` lives.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(CONFIG_FILE_NAME)
    }

    /// Reads, parses and validates `DIR/storemesh.toml`.
    pub fn load(dir: &Path) -> anyhow::Result<Config> {
        let path = Config::path(dir);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
                "cannot read {}: {} (is --data-dir right? run `storemesh init` first)",
                path.display(),
                io_message(&e)
            ),
            Err(e) => anyhow::bail!("cannot read {}: {}", path.display(), io_message(&e)),
        };
        Config::from_toml_str(&text)
            .map_err(|msg| anyhow::anyhow!("invalid config {}: {msg}", path.display()))
    }

    /// Parses and validates config text; the error is one line and names the
    /// offending key (with its line number when the parser knows it).
    pub fn from_toml_str(text: &str) -> Result<Config, String> {
        let mut config: Config = toml::from_str(text).map_err(|e| describe_toml_error(text, &e))?;
        if config.location.is_empty() {
            config.location = config.name.clone();
        }
        config.check()?;
        Ok(config)
    }

    /// The file text: a header and the TOML.
    pub fn to_toml_string(&self) -> anyhow::Result<String> {
        let body = toml::to_string(self).context("cannot encode config as TOML")?;
        Ok(format!(
            "# storemesh node configuration (see README). It holds API tokens: keep it private.\n\n{body}"
        ))
    }

    /// Validates, then writes `DIR/storemesh.toml` atomically (temporary file,
    /// fsync, rename) with mode 0600, because it holds tokens.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        self.validate()?;
        let text = self.to_toml_string()?;
        let path = Config::path(dir);
        let tmp = dir.join(format!(".{CONFIG_FILE_NAME}.tmp"));
        write_private(&tmp, text.as_bytes())
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| {
                let _ = fs::remove_file(&tmp);
                anyhow::anyhow!("cannot write {}: {}", path.display(), io_message(&e))
            })?;
        // Make the rename itself durable; failing to sync a directory is not fatal.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Checks names, addresses, ranges, peers and tokens. Whether a peer's id is
    /// this node's own id is checked by callers that know the identity.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.check().map_err(anyhow::Error::msg)
    }

    pub fn quic_socket(&self) -> anyhow::Result<SocketAddr> {
        parse_socket("quic_addr", &self.quic_addr).map_err(anyhow::Error::msg)
    }

    pub fn http_socket(&self) -> anyhow::Result<SocketAddr> {
        parse_socket("http_addr", &self.http_addr).map_err(anyhow::Error::msg)
    }

    pub fn peer_by_name(&self, name: &str) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.name == name)
    }

    pub fn peer_by_id(&self, id: &NodeId) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.id == *id)
    }

    /// The name and scopes of the token `presented`, if it is one of ours.
    ///
    /// Compares SHA-256 digests in constant time and looks at every token, so the
    /// response time tells an attacker neither a token's prefix nor its length.
    pub fn token_scopes(&self, presented: &str) -> Option<(&str, &[Scope])> {
        self.token(presented)
            .map(|t| (t.name.as_str(), t.scopes.as_slice()))
    }

    /// The token `presented`, if it is one of ours (see `token_scopes`).
    pub fn token(&self, presented: &str) -> Option<&TokenConfig> {
        let presented_digest = Sha256::digest(presented.as_bytes());
        let mut found = None;
        for t in &self.api.tokens {
            let digest = Sha256::digest(t.token.as_bytes());
            let equal = digest
                .iter()
                .zip(presented_digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
            if equal && found.is_none() {
                found = Some(t);
            }
        }
        found
    }

    fn check(&self) -> Result<(), String> {
        validate_name("name", &self.name)?;
        validate_name("location", &self.location)?;
        check_listen_addr("quic_addr", &self.quic_addr)?;
        check_listen_addr("http_addr", &self.http_addr)?;
        if !(1..=BUCKETS_MAX).contains(&self.buckets) {
            return Err(format!(
                "buckets must be in 1..={BUCKETS_MAX} (got {}); it must be equal on every node of the mesh",
                self.buckets
            ));
        }
        let tz_ok = !self.timezone.is_empty()
            && self.timezone.len() <= 64
            && self
                .timezone
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/_+-".contains(&b));
        if !tz_ok {
            return Err(format!(
                "timezone {:?} is not an IANA time zone name such as Europe/Berlin",
                self.timezone
            ));
        }
        if self.clock_offset_ms.abs() > CLOCK_OFFSET_MAX_MS {
            return Err(format!(
                "clock_offset_ms must be within ±{CLOCK_OFFSET_MAX_MS} (one week; got {})",
                self.clock_offset_ms
            ));
        }
        for (i, a) in self.allocation.iter().enumerate() {
            validate_name(&format!("allocation[{i}].to"), &a.to)?;
            if a.to == self.name {
                return Err(format!("allocation[{i}].to names this node itself"));
            }
            if a.share_percent == 0
                || a.share_percent > 100
                || a.max_units == 0
                || a.max_units > 1_000_000_000
            {
                return Err(format!(
                    "allocation[{i}]: share_percent must be 1-100 and max_units 1-1000000000"
                ));
            }
        }
        if self.rebalance.deadline_ms > 60_000 {
            return Err("rebalance.deadline_ms must be at most 60000".into());
        }
        self.check_peers()?;
        self.check_api()?;
        self.check_sync()?;
        if let Some(tls) = &self.api.tls {
            tls.check()?;
        }
        webhooks::check(&self.webhooks)?;
        if self.loyalty.points_per_unit > LOYALTY_POINTS_PER_UNIT_MAX {
            return Err(format!(
                "loyalty.points_per_unit must be in 0..={LOYALTY_POINTS_PER_UNIT_MAX} (got {})",
                self.loyalty.points_per_unit
            ));
        }
        Ok(())
    }

    fn check_peers(&self) -> Result<(), String> {
        for (i, peer) in self.peers.iter().enumerate() {
            let at = format!("peers[{i}]");
            validate_name(&format!("{at}.name"), &peer.name)?;
            validate_peer_addr(&format!("{at}.addr"), &peer.addr)?;
            if peer.name == self.name {
                return Err(format!(
                    "{at}.name {:?} is this node's own name; node names are unique in a mesh",
                    peer.name
                ));
            }
            if let Some(j) = self.peers[..i].iter().position(|p| p.name == peer.name) {
                return Err(format!(
                    "{at}.name {:?} is also the name of peers[{j}]; peer names must be unique",
                    peer.name
                ));
            }
            if let Some(j) = self.peers[..i].iter().position(|p| p.id == peer.id) {
                return Err(format!(
                    "{at}.id {} is also the id of peers[{j}] ({}); peer ids must be unique",
                    peer.id, self.peers[j].name
                ));
            }
            if let Some(loc) = &peer.location {
                validate_name(&format!("{at}.location"), loc)?;
                let own = if self.location.is_empty() {
                    &self.name
                } else {
                    &self.location
                };
                if loc == own {
                    return Err(format!(
                        "{at}.location {loc:?} is this node's own location; locations have one owner"
                    ));
                }
                if let Some(j) = self.peers[..i]
                    .iter()
                    .position(|p| p.location.as_deref() == Some(loc.as_str()))
                {
                    return Err(format!(
                        "{at}.location {loc:?} is also the location of peers[{j}]; locations have one owner"
                    ));
                }
            }
        }
        for (i, a) in self.administrators.iter().enumerate() {
            if self.administrator_id(a, None).is_none() && a != &self.name {
                return Err(format!(
                    "administrators[{i}] {a:?} is neither this node's name, a configured peer's name nor a node id (64 hex)"
                ));
            }
        }
        Ok(())
    }

    /// The node id an `administrators` entry stands for (`own`: this
    /// node's id, for an entry naming this node).
    pub fn administrator_id(&self, entry: &str, own: Option<NodeId>) -> Option<NodeId> {
        if entry == self.name {
            return own;
        }
        if let Some(p) = self.peers.iter().find(|p| p.name == entry) {
            return Some(p.id);
        }
        if entry.len() == 64 {
            return NodeId::parse(entry).ok();
        }
        None
    }

    fn check_api(&self) -> Result<(), String> {
        let api = &self.api;
        if !(BODY_BYTES_MAX_MIN..=BODY_BYTES_MAX_LIMIT).contains(&api.body_bytes_max) {
            return Err(format!(
                "api.body_bytes_max must be in {BODY_BYTES_MAX_MIN}..={BODY_BYTES_MAX_LIMIT} (got {})",
                api.body_bytes_max
            ));
        }
        for (key, v) in [
            ("header_timeout_ms", api.header_timeout_ms),
            ("body_timeout_ms", api.body_timeout_ms),
        ] {
            if !(HTTP_TIMEOUT_MS_MIN..=HTTP_TIMEOUT_MS_MAX).contains(&v) {
                return Err(format!(
                    "api.{key} must be in {HTTP_TIMEOUT_MS_MIN}..={HTTP_TIMEOUT_MS_MAX} (got {v})"
                ));
            }
        }
        if !(1..=MAX_CONNECTIONS_LIMIT).contains(&api.max_connections) {
            return Err(format!(
                "api.max_connections must be in 1..={MAX_CONNECTIONS_LIMIT} (got {})",
                api.max_connections
            ));
        }
        for (i, t) in api.tokens.iter().enumerate() {
            let at = format!("api.tokens[{i}]");
            validate_name(&format!("{at}.name"), &t.name)?;
            validate_token(&t.token).map_err(|e| format!("{at}.token: {e}"))?;
            if t.token.len() < TOKEN_LEN_ADVISED {
                tracing::warn!(
                    token = %t.name,
                    "API token shorter than {TOKEN_LEN_ADVISED} characters: easy to guess; use a long random one"
                );
            }
            if t.scopes.is_empty() {
                return Err(format!(
                    "{at}.scopes is empty; give at least one of read, sell, stock, customers, admin"
                ));
            }
            if let Some(locs) = &t.locations {
                if locs.is_empty() || locs.len() > TOKEN_LOCATIONS_MAX {
                    return Err(format!(
                        "{at}.locations must list 1-{TOKEN_LOCATIONS_MAX} locations (leave it out for all)"
                    ));
                }
                for l in locs {
                    validate_name(&format!("{at}.locations"), l)?;
                }
            }
            if let Some(j) = api.tokens[..i].iter().position(|o| o.name == t.name) {
                return Err(format!(
                    "{at}.name {:?} is also the name of api.tokens[{j}]; token names must be unique",
                    t.name
                ));
            }
            if let Some(j) = api.tokens[..i].iter().position(|o| o.token == t.token) {
                return Err(format!(
                    "{at}.token is the same as api.tokens[{j}].token; tokens must be unique"
                ));
            }
        }
        Ok(())
    }

    fn check_sync(&self) -> Result<(), String> {
        let s = &self.sync;
        for (field, value) in [
            ("anti_entropy_ms", s.anti_entropy_ms),
            ("reconnect_min_ms", s.reconnect_min_ms),
            ("reconnect_max_ms", s.reconnect_max_ms),
            ("keep_alive_ms", s.keep_alive_ms),
            ("idle_timeout_ms", s.idle_timeout_ms),
            ("connect_timeout_ms", s.connect_timeout_ms),
        ] {
            if !(SYNC_MS_MIN..=SYNC_MS_MAX).contains(&value) {
                return Err(format!(
                    "sync.{field} must be in {SYNC_MS_MIN}..={SYNC_MS_MAX} (got {value})"
                ));
            }
        }
        if s.reconnect_min_ms > s.reconnect_max_ms {
            return Err(format!(
                "sync.reconnect_min_ms ({}) must not exceed sync.reconnect_max_ms ({})",
                s.reconnect_min_ms, s.reconnect_max_ms
            ));
        }
        if s.keep_alive_ms >= s.idle_timeout_ms {
            return Err(format!(
                "sync.keep_alive_ms ({}) must be below sync.idle_timeout_ms ({}), or idle connections drop",
                s.keep_alive_ms, s.idle_timeout_ms
            ));
        }
        Ok(())
    }
}

/// API tokens: 1–256 printable ASCII characters, no spaces.
pub fn validate_token(token: &str) -> Result<(), String> {
    if !(TOKEN_LEN_MIN..=TOKEN_LEN_MAX).contains(&token.len()) {
        return Err(format!(
            "an API token must be {TOKEN_LEN_MIN}-{TOKEN_LEN_MAX} characters (got {})",
            token.chars().count()
        ));
    }
    if !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err("an API token may only contain printable ASCII characters, no spaces".into());
    }
    Ok(())
}

/// A listen address: `IP:PORT`, or `HOST:PORT` with a host name this machine
/// resolves itself (e.g. `localhost:8400`; the first IPv4 address, else the
/// first address).
pub fn parse_socket(field: &str, text: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse() {
        return Ok(a);
    }
    validate_peer_addr(field, text)?;
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("{field} {text:?}: cannot resolve it: {e}"))?
        .collect();
    prefer_ipv4(&addrs).ok_or_else(|| format!("{field} {text:?} resolves to no address"))
}

/// The form of a listen address, without resolving a host name (that
/// happens once, when the node binds): `IP:PORT`, or `HOST:PORT`.
pub fn check_listen_addr(field: &str, text: &str) -> Result<(), String> {
    if text.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    match text.rsplit_once(':') {
        // Port 0 (any free port) is a valid listen port; the host name is
        // checked like a peer's.
        Some((host, "0")) => validate_peer_addr(field, &format!("{host}:1")),
        _ => validate_peer_addr(field, text),
    }
}

/// The address to use of those a host name resolves to: the first IPv4
/// one, else the first.
fn prefer_ipv4(addrs: &[SocketAddr]) -> Option<SocketAddr> {
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
}

/// A peer address: a literal `IP:PORT`, or `HOST:PORT` with a DNS host name.
pub fn validate_peer_addr(field: &str, text: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "{field} {text:?} is not HOST:PORT (e.g. 10.0.0.5:7400 or store-2.example.net:7400)"
        )
    };
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!(
                "{field} {text:?} has port 0; give the peer's QUIC port"
            ));
        }
        return Ok(());
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !host_ok || port == 0 {
        return Err(bad());
    }
    Ok(())
}

/// `toml`'s own message spans several lines with a source excerpt; ours is one
/// line with the line number and, for keys inside a table, the table's header
/// (`line 12 (in [api]): unknown field `bar`, expected one of ...`).
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = one_line(e.message());
    let Some(span) = e.span() else {
        return message;
    };
    let before = text.get(..span.start.min(text.len())).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    // The error's own line may be the header itself (`[extra]`): only look above it.
    let above = before.rsplit_once('\n').map_or("", |(above, _)| above);
    match above.lines().rev().find_map(table_header) {
        Some(header) => format!("line {line} (in {header}): {message}"),
        None => format!("line {line}: {message}"),
    }
}

/// `[name]` or `[[name]]` when `line` is a table header.
fn table_header(line: &str) -> Option<&str> {
    let line = line.split('#').next().unwrap_or("").trim();
    let inner = line.strip_prefix('[')?.strip_suffix(']')?;
    let inner = inner
        .strip_prefix('[')
        .and_then(|i| i.strip_suffix(']'))
        .unwrap_or(inner);
    let is_key = !inner.is_empty()
        && inner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-. \"".contains(&b));
    is_key.then_some(line)
}

/// Joins the lines of a message with spaces, so every error prints on one line.
pub fn one_line(text: &str) -> String {
    text.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `std::io::Error`'s text without the trailing "(os error N)".
pub fn io_message(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_string(),
        _ => text,
    }
}

/// Writes a new file readable only by its owner, synced to disk.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    // A leftover temporary file keeps its old mode through `open`: set it again.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests;
