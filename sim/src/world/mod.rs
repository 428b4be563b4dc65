//! The simulated mesh: nodes (production `Engine` + production `Store` over a
//! `SimDisk`), the network, the clients, simulated time and the schedule.
//!
//! Every node runs production's loop body, `storemesh_protocol::step::NodeLoop::step`
//! (as `node::node::engine_loop` does): the command channel is drained in
//! arrival order into the step's inputs (peer events with the peer's hello
//! digest, frames, requests), and the step executes them, retries parked sales,
//! allocates, expires reservations, numbers rows, flushes and commits ONE batch
//! through [`SimStorage`] (the production `Store` over a `SimDisk`, where the
//! planned crashes strike). Answers, frames and revoked keys exist only in the
//! step's `Committed` outcome; after a failed commit the step answers 503
//! (parked sales too) and the engine is reopened from the store, keeping the
//! connections.
//!
//! Simulated time advances in ticks; a node runs one pass per tick when it has
//! commands, an anti-entropy tick is due, or the step's `next_wake_ms` (a
//! parked sale's deadline, a reservation's expiry) has come, as production's
//! wake timer does. Frames sent in a tick arrive in a later one.

mod clients;
mod faults;
mod lives;
mod network;
mod process;
mod storage;

use std::collections::{BTreeMap, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest as _, Sha256};
use storemesh_protocol::engine::{Engine, EngineConfig, Policy};
use storemesh_protocol::ids::{ActorKey, NodeId, NodeTag};
use storemesh_protocol::rebalance::AllocationRule;
use storemesh_protocol::step::NodeLoop;
use storemesh_store::simdisk::SimDisk;
use storemesh_store::store::Store;

use crate::client::Clients;
use crate::invariant::{Checker, Violation};
use crate::net::{Net, NetEv};
use crate::options::{Bug, FaultKind, Topology};

/// Unix ms of simulated time 0: 2026-11-30T23:59:00Z, one minute before a
/// month boundary, so clock offsets split records between two month documents.
pub const BASE_UNIX_MS: u64 = 1_796_083_140_000;
/// Commands drained into one group commit, at most (as `node::BATCH_OPS_MAX`).
pub const BATCH_OPS_MAX: usize = 2048;
/// A crashed node is back after this long (simulated ms).
pub const RESTART_MS: (u64, u64) = (200, 5_000);
/// A dropped connection is redialled after this long.
pub const RECONNECT_MS: (u64, u64) = (200, 2_000);
/// A stalled connection is noticed (idle timeout) after this long.
pub const DETECT_MS: (u64, u64) = (500, 4_000);
/// A client retries an unanswered or 503-answered request after this long.
pub const RETRY_MS: (u64, u64) = (100, 2_000);
/// Older disk images kept per node for the restore fault.
pub const IMAGES_MAX: usize = 3;

/// One process lifetime of a node.
pub struct Life {
    /// Production's loop around the engine (parked callers, row numbering,
    /// revoked keys, hello digest).
    pub node: NodeLoop<usize>,
    /// Shared with the engine, which reads cold records parts and
    /// certificates back from it.
    pub store: std::sync::Arc<Store>,
    /// Where frames go (the transport's view): current connection per peer
    /// identity: (simulator index, connection id).
    pub conns: BTreeMap<NodeId, (usize, u64)>,
    /// Peer identities whose key this process refuses (retired nodes).
    pub revoked: std::collections::BTreeSet<NodeId>,
    /// Cell values seen after commits in this life (owned cells never decrease).
    pub seen: BTreeMap<(u64, String, ActorKey, u8, NodeTag), u64>,
    pub alarms_seen: usize,
    /// Changes a hostile member wrote as another member and sent to this
    /// engine (`hostile-impersonate`): exactly these may be refused as
    /// uncertified or by an unknown author (invariant `authorship`).
    pub impersonations_received: u64,
}

impl Life {
    pub fn engine(&self) -> &Engine {
        self.node.engine()
    }
}

/// One entry of a node's command channel.
#[derive(Debug)]
pub enum Cmd {
    Net(NetEv),
    Op(usize),
}

/// How a planned crash strikes the next batch that holds client operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPlan {
    BeforeCommit,
    MidCommit(u64),
    AfterCommit,
    FailSync,
}

pub struct SimNode {
    pub name: String,
    /// Index of the node whose identity this is (itself, unless a clone).
    pub identity: usize,
    pub cfg: EngineConfig,
    pub peers_cfg: Vec<(String, NodeId)>,
    pub disk: SimDisk,
    pub life: Option<Life>,
    /// The engine thread's command channel: frames, peer events, requests.
    pub cmds: VecDeque<Cmd>,
    pub paused_until_ms: u64,
    pub next_ae_ms: u64,
    pub kick: bool,
    pub crash_plan: Option<CrashPlan>,
    pub offset_ms: i64,
    pub drift_ppm: i64,
    /// Bumped when the disk is replaced by an older image.
    pub epoch: u32,
    pub is_clone: bool,
    pub retired: bool,
    /// (actor, sim ms it started).
    pub incarnations: Vec<(ActorKey, u64)>,
    pub images: Vec<(u64, Vec<u8>)>,
    pub restart_image: Option<(u64, Vec<u8>)>,
    /// Set by the checkers after a commit; cleared by the per-event checks.
    pub dirty: bool,
    pub stats: NodeStats,
}

#[derive(Clone, Debug, Default)]
pub struct NodeStats {
    pub sales_ok: u64,
    pub sales_refused: u64,
    /// Refused although the units were on hand where this node could get
    /// rights for them (`World::refused_with_stock`).
    pub refused_with_stock: u64,
    /// Refused although the units were on hand, reachable or not.
    pub refused_stock_anywhere: u64,
    /// Scenario demand for goods not on offer, never attempted.
    pub not_on_offer: u64,
    pub units_sold: u64,
    pub commits: u64,
    pub commit_failures: u64,
    pub crashes: u64,
    pub restarts: u64,
}

#[derive(Clone, Debug)]
pub enum Action {
    /// Lift blocked directions.
    Heal(Vec<(usize, usize)>),
    /// Reset a connection if it is still the same one (the idle timeout).
    ResetIfConn(usize, usize, u64),
    Restart(usize),
    StopClone(usize),
    /// Block directions (both ways of each pair) until a later `Heal`.
    Block(Vec<(usize, usize)>),
}

/// Knobs shared by random runs and scenarios.
#[derive(Clone, Debug)]
pub struct Setup {
    /// How long a strict sale short of rights waits for a grant (0: never parks).
    pub deadline_ms: u64,
    /// Allocation rules every node applies to its own location.
    pub allocation: Vec<AllocationRule>,
    pub tick_ms: u64,
    pub latency_ms: (u64, u64),
    pub anti_entropy_ms: u64,
    pub buckets: u32,
    /// Ledger epoch size for every node (`None`: derived from the seed).
    pub epoch_ops_max: Option<u64>,
}

pub struct NodeSpec {
    pub name: String,
    pub role: String,
    pub policy: Policy,
    pub drift_ppm: i64,
}

pub struct World {
    pub seed: u64,
    pub rng: StdRng,
    pub now_ms: u64,
    next_tick_ms: u64,
    pub setup: Setup,
    pub event: usize,
    pub nodes: Vec<SimNode>,
    pub net: Net,
    pub clients: Clients,
    pub check: Checker,
    pub bug: Option<Bug>,
    pub fired: BTreeMap<FaultKind, u64>,
    schedule: BTreeMap<(u64, u64), Action>,
    schedule_seq: u64,
    trace: Sha256,
    pub trace_items: u64,
    /// `false` once the run heals: armed crashes and failures are dropped.
    pub faults_active: bool,
    pub commits: u64,
    /// A node being drained for retirement: clients send it nothing new.
    pub draining: Option<usize>,
    /// Connections that started from a hello carrying the peer's digest.
    pub digest_hellos: u64,
    /// Retired peers' keys revoked by some node (`Committed::revoke`).
    pub revocations: u64,
    /// Connections both sides dialled at once, settled by production's
    /// `arbitration::arbitrate` on each side (`crossing_dials`).
    pub crossing_dials: u64,
    /// Pairs that held a connection at least once.
    dialled_pairs: std::collections::BTreeSet<(usize, usize)>,
}

fn node_id_from(rng: &mut StdRng) -> NodeId {
    NodeId(rng.gen())
}

impl World {
    pub fn new(
        seed: u64,
        rng: StdRng,
        setup: Setup,
        specs: Vec<NodeSpec>,
        topology: Topology,
        bug: Option<Bug>,
    ) -> Result<World, Violation> {
        let mut rng = rng;
        let mut ids: Vec<NodeId> = Vec::new();
        while ids.len() < specs.len() {
            let id = node_id_from(&mut rng);
            if !ids.iter().any(|o| o.tag() == id.tag()) {
                ids.push(id);
            }
        }
        let mut nodes = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            let cfg = EngineConfig {
                node_id: ids[i],
                name: s.name.clone(),
                location: s.name.clone(),
                role: s.role.clone(),
                policy: s.policy,
                buckets: setup.buckets,
                loyalty_points_per_unit: 1,
                timezone: None,
            };
            let peers_cfg = specs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, o)| (o.name.clone(), ids[j]))
                .collect();
            nodes.push(SimNode {
                name: s.name.clone(),
                identity: i,
                cfg,
                peers_cfg,
                disk: SimDisk::new(),
                life: None,
                cmds: VecDeque::new(),
                paused_until_ms: 0,
                next_ae_ms: 0,
                kick: false,
                crash_plan: None,
                offset_ms: 0,
                drift_ppm: s.drift_ppm,
                epoch: 0,
                is_clone: false,
                retired: false,
                incarnations: Vec::new(),
                images: Vec::new(),
                restart_image: None,
                dirty: false,
                stats: NodeStats::default(),
            });
        }
        let n = nodes.len();
        let mut net = Net {
            latency_ms: setup.latency_ms,
            ..Net::default()
        };
        net.ensure_node(n);
        for a in 0..n {
            for b in a + 1..n {
                let peer = match topology {
                    Topology::FullMesh => true,
                    Topology::Hub(h) => a == h || b == h,
                    Topology::Chain => b == a + 1,
                };
                if peer {
                    net.peers.insert((a, b));
                }
            }
        }
        let mut w = World {
            seed,
            rng,
            now_ms: 0,
            next_tick_ms: 0,
            setup,
            event: 0,
            nodes,
            net,
            clients: Clients::default(),
            check: Checker::default(),
            bug,
            fired: BTreeMap::new(),
            schedule: BTreeMap::new(),
            schedule_seq: 0,
            trace: Sha256::new(),
            trace_items: 0,
            faults_active: true,
            commits: 0,
            draining: None,
            digest_hellos: 0,
            revocations: 0,
            crossing_dials: 0,
            dialled_pairs: Default::default(),
        };
        for i in 0..n {
            w.check
                .names
                .insert(w.nodes[i].cfg.node_id.tag(), w.nodes[i].name.clone());
            if w.nodes[i].cfg.policy == Policy::Relaxed {
                w.check.relaxed.insert(w.nodes[i].cfg.location.clone());
            }
        }
        for i in 0..n {
            w.nodes[i].next_ae_ms = w.rng.gen_range(0..w.setup.anti_entropy_ms.max(1));
            w.start_node(i)?;
        }
        Ok(w)
    }

    // ---- basics ----

    pub fn fire(&mut self, k: FaultKind) {
        *self.fired.entry(k).or_default() += 1;
    }

    /// Adds one item to the run's trace hash; with `STOREMESH_SIM_TRACE=1`
    /// in the environment it is also printed to stderr (debugging a seed).
    pub fn trace(&mut self, item: &[u8]) {
        static PRINT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *PRINT.get_or_init(|| std::env::var_os("STOREMESH_SIM_TRACE").is_some_and(|v| v == "1"))
        {
            eprintln!("{}", String::from_utf8_lossy(item));
        }
        self.trace.update((item.len() as u64).to_le_bytes());
        self.trace.update(item);
        self.trace_items += 1;
    }

    pub fn trace_hash(&self) -> String {
        hex::encode(&self.trace.clone().finalize()[..8])
    }

    pub fn violation(&self, invariant: &'static str, message: String) -> Violation {
        if trace_printed() {
            for (i, n) in self.nodes.iter().enumerate() {
                if let Some(l) = &n.life {
                    let e = l.engine();
                    eprintln!(
                        "  (n{i} {}: rejected {:?}, imports {:?})",
                        n.name,
                        e.stats.rejected_by_reason,
                        e.views.imports().keys().collect::<Vec<_>>()
                    );
                    for (id, _) in e.documents() {
                        if let Some(doc) = e.doc(&id) {
                            for key in automerge::ReadDoc::keys(doc, automerge::ROOT) {
                                if key.starts_with("imp/") {
                                    let all = automerge::ReadDoc::get_all(
                                        doc,
                                        automerge::ROOT,
                                        key.as_str(),
                                    )
                                    .unwrap_or_default();
                                    eprintln!(
                                        "    {id} {key}: {}",
                                        all.iter()
                                            .map(|(v, o)| format!("{v} by {o}"))
                                            .collect::<Vec<_>>()
                                            .join(" | ")
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        Violation {
            seed: self.seed,
            event: self.event,
            time_ms: self.now_ms,
            invariant,
            message,
        }
    }

    /// The node's wall clock: simulated time plus its offset and drift (may jump back).
    pub fn clock(&self, i: usize) -> u64 {
        let n = &self.nodes[i];
        let t = i128::from(BASE_UNIX_MS)
            + i128::from(self.now_ms)
            + i128::from(n.offset_ms)
            + i128::from(self.now_ms) * i128::from(n.drift_ppm) / 1_000_000;
        t.max(0) as u64
    }

    pub fn rand_in(&mut self, r: (u64, u64)) -> u64 {
        self.rng.gen_range(r.0..=r.1)
    }

    pub fn at(&mut self, at_ms: u64, a: Action) {
        self.schedule_seq += 1;
        self.schedule.insert((at_ms, self.schedule_seq), a);
    }

    pub fn alive(&self, i: usize) -> bool {
        self.nodes[i].life.is_some() && !self.nodes[i].retired
    }

    /// Nodes that take part in the final convergence (not retired clones).
    pub fn members(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| !self.nodes[*i].retired)
            .collect()
    }

    pub fn tag_name(&self, tag: NodeTag) -> Option<String> {
        self.nodes
            .iter()
            .find(|n| n.cfg.node_id.tag() == tag)
            .map(|n| n.name.clone())
    }

    // ---- time ----

    /// Runs every tick up to `t_ms`.
    pub fn advance_to(&mut self, t_ms: u64) -> Result<(), Violation> {
        while self.next_tick_ms <= t_ms {
            self.now_ms = self.next_tick_ms;
            self.tick()?;
            self.next_tick_ms += self.setup.tick_ms;
        }
        self.now_ms = self.now_ms.max(t_ms);
        Ok(())
    }

    fn tick(&mut self) -> Result<(), Violation> {
        self.run_schedule()?;
        self.connect_pairs()?;
        self.deliver_frames();
        for rid in self.clients.due(self.now_ms) {
            self.submit(rid);
        }
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            if n.life.is_none() || n.retired || self.now_ms < n.paused_until_ms {
                continue;
            }
            // Production's wake timer: a parked sale's deadline or a
            // reservation's expiry has come (on the node's clock).
            let wake_due = n
                .life
                .as_ref()
                .and_then(|l| l.node.next_wake_ms())
                .is_some_and(|at| self.clock(i) >= at);
            if n.kick || !n.cmds.is_empty() || self.now_ms >= n.next_ae_ms || wake_due {
                self.process(i)?;
            }
        }
        Ok(())
    }

    fn run_schedule(&mut self) -> Result<(), Violation> {
        loop {
            let Some((&key, _)) = self.schedule.iter().next() else {
                return Ok(());
            };
            if key.0 > self.now_ms {
                return Ok(());
            }
            let Some(action) = self.schedule.remove(&key) else {
                return Ok(());
            };
            self.run_action(action)?;
        }
    }

    fn run_action(&mut self, a: Action) -> Result<(), Violation> {
        match a {
            Action::Heal(dirs) => {
                for (x, y) in dirs {
                    self.net.unblock(x, y);
                }
            }
            Action::ResetIfConn(a, b, conn) => {
                if self.net.connected(a, b) == Some(conn) {
                    self.reset_pair(a, b);
                }
            }
            Action::Restart(i) => self.restart_node(i)?,
            Action::StopClone(c) => self.stop_clone(c),
            Action::Block(dirs) => {
                for &(x, y) in &dirs {
                    self.net.block(x, y);
                }
                self.partition_started(&dirs);
            }
        }
        Ok(())
    }

    pub fn retain_schedule(&mut self, keep: impl Fn(&Action) -> bool) {
        self.schedule.retain(|_, a| keep(a));
    }

    pub fn seed_rng(seed: u64) -> StdRng {
        StdRng::seed_from_u64(seed)
    }
}

/// Whether trace items are printed (`STOREMESH_SIM_TRACE=1`, debugging one
/// seed); notes that are not part of the trace hash print with them.
pub fn trace_printed() -> bool {
    static PRINT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PRINT.get_or_init(|| std::env::var_os("STOREMESH_SIM_TRACE").is_some_and(|v| v == "1"))
}

/// The simulated chain's signature scheme: every node's key derived from the
/// seed (`signing::KeyedHashScheme`), so a seed replays byte for byte.
pub fn signing_scheme(seed: u64) -> storemesh_protocol::signing::KeyedHashScheme {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&seed.to_le_bytes());
    k[8..16].copy_from_slice(b"sim-keys");
    storemesh_protocol::signing::KeyedHashScheme::new(k)
}
