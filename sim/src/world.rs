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

use std::collections::{BTreeMap, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest as _, Sha256};
use storemesh_node::api::outcome as http;
use storemesh_protocol::engine::{Batch, Engine, EngineConfig, Policy};
use storemesh_protocol::ids::{ActorKey, NodeId, NodeTag};
use storemesh_protocol::layout::{month_of, DocId};
use storemesh_protocol::ops::{IdemRecord, OpError, OpReply};
use storemesh_protocol::rebalance::AllocationRule;
use storemesh_protocol::step::{Failure, Input, LoopConfig, NodeLoop, Step, Storage, StorageError};
use storemesh_store::simdisk::SimDisk;
use storemesh_store::store::Store;

use crate::check::{Checker, Violation};
use crate::client::{Clients, ReplyCheck};
use crate::net::{pair, Net, NetEv};
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

/// The production `Store` (over the node's `SimDisk`) as the loop's storage;
/// a planned crash or failure strikes the commit it is armed for.
pub struct SimStorage<'a> {
    store: &'a Store,
    disk: SimDisk,
    bug: Option<Bug>,
    plan: Option<CrashPlan>,
    /// Whether a commit came (and with it the planned fault).
    used: bool,
}

impl<'a> SimStorage<'a> {
    fn new(store: &'a Store, disk: SimDisk, bug: Option<Bug>, plan: Option<CrashPlan>) -> Self {
        SimStorage {
            store,
            disk,
            bug,
            plan,
            used: false,
        }
    }
}

impl Storage for SimStorage<'_> {
    fn idem(&mut self, key: &str) -> Result<Option<IdemRecord>, StorageError> {
        self.store
            .idem(key)
            .map_err(|e| StorageError(format!("{e:#}")))
    }

    fn sync_states(&mut self, peer: &NodeId) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        self.store
            .sync_states(peer)
            .map_err(|e| StorageError(format!("{e:#}")))
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StorageError> {
        let plan = if self.used { None } else { self.plan };
        self.used = true;
        let disk = &self.disk;
        match plan {
            Some(CrashPlan::BeforeCommit) => disk.crash(),
            Some(CrashPlan::MidCommit(n)) => disk.crash_after_ios(n),
            Some(CrashPlan::FailSync) => disk.fail_next_syncs(1),
            _ => {}
        }
        let result = commit_store(self.store, self.bug, batch);
        if !disk.is_crashed() {
            // A planned fault that did not strike this commit is disarmed: it
            // must not hit the reopen path or a later, unrelated batch.
            match plan {
                Some(CrashPlan::MidCommit(_)) => disk.crash_after_ios(u64::MAX),
                Some(CrashPlan::FailSync) => disk.fail_next_syncs(0),
                _ => {}
            }
        }
        result.map_err(|e| StorageError(format!("{e:#}")))
    }
}

/// `Store::commit` of the batch — or, with the planted bug, the batch and
/// its idempotency records in two transactions.
fn commit_store(store: &Store, bug: Option<Bug>, batch: &Batch) -> anyhow::Result<()> {
    if bug == Some(Bug::IdemOutsideTxn) && !batch.idem.is_empty() {
        let mut main = batch.clone();
        let idem = std::mem::take(&mut main.idem);
        store.commit(&main)?;
        return store.commit(&Batch {
            idem,
            ..Batch::default()
        });
    }
    store.commit(batch)
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

    // ---- process lifetimes ----

    /// Opens node `i`'s store and engine from its disk, as `node::open_engine` does.
    fn open_engine(&mut self, i: usize) -> Result<(std::sync::Arc<Store>, Engine), String> {
        let store = Store::open_backend(self.nodes[i].disk.clone())
            .map_err(|e| format!("store does not open: {e:#}"))?;
        let store = std::sync::Arc::new(store);
        let incarnation: [u8; 4] = self.rng.gen();
        let node = &self.nodes[i];
        let mut engine = Engine::new(node.cfg.clone(), incarnation);
        engine.set_entropy(self.rng.gen());
        engine.set_part_archive(store.clone());
        // Small records parts in most seeds, so that months roll over into
        // new parts under every fault (production: RECORDS_PER_PART_MAX).
        // Derived from the seed, not drawn, so the event stream is unchanged.
        if self.seed % 4 != 0 {
            engine.set_records_per_part(2 + (self.seed % 37) as usize);
        }
        // Ledger epochs cut after a few dozen operations in most seeds, so
        // that owners cut and the others move under every fault (production:
        // EPOCH_OPS_MIN).
        if let Some(n) = self.setup.epoch_ops_max {
            engine.set_epoch_ops_max(n);
        } else if self.seed % 4 != 1 {
            engine.set_epoch_ops_max(16 + (self.seed % 113));
        }
        match self.bug {
            Some(Bug::SkipRightsCheck) => engine.faults.skip_rights_check = true,
            Some(Bug::PerLineCheck) => engine.faults.per_line_check = true,
            Some(Bug::GrantInOtherBucket) => engine.faults.grant_in_other_bucket = true,
            Some(Bug::UncheckedLargeRecords) => engine.faults.unchecked_large_records = true,
            Some(Bug::ReceivedInTransit) => engine.faults.received_in_transit = true,
            Some(Bug::DeficitWholeBalance) => engine.faults.deficit_whole_balance = true,
            Some(Bug::SkipOwnerlessSettle) => engine.faults.skip_ownerless_settle = true,
            Some(Bug::UnlistedSaleCollisions) => engine.faults.unlisted_sale_collisions = true,
            Some(Bug::UnlistedReceiptCollisions) => {
                engine.faults.unlisted_receipt_collisions = true
            }
            _ => {}
        }
        // Signing keys derived from the seed (deterministic runs).
        let scheme = crate::world::signing_scheme(self.seed);
        engine.set_signing(Box::new(scheme.signer(node.cfg.node_id)), Box::new(scheme));
        for (name, id) in &node.peers_cfg {
            engine.add_configured_peer(name, *id);
        }
        engine.load_intros(
            store
                .load_intros()
                .map_err(|e| format!("introductions do not load: {e:#}"))?,
        );
        engine.set_cert_archive(Box::new(storemesh_node::signing::StoreArchive(
            store.clone(),
        )));
        let keys = store
            .load_keys()
            .map_err(|e| format!("the customer key store does not load: {e:#}"))?;
        engine.load_keys(keys);
        let docs = store
            .load_docs()
            .map_err(|e| format!("documents do not load: {e:#}"))?;
        for d in docs {
            engine
                .load_doc_with_index(&d.id, &d.parts, d.heads_log, d.index.as_deref())
                .map_err(|e| format!("stored document {} is damaged: {e}", d.id))?;
        }
        engine.finish_open();
        let actor = engine.actor();
        self.nodes[i].incarnations.push((actor, self.now_ms));
        Ok((store, engine))
    }

    /// A new process of node `i`: the production loop around its engine.
    fn open_life(&mut self, i: usize) -> Result<Life, String> {
        let (store, engine) = self.open_engine(i)?;
        // Change-feed numbers continue from the persisted rows (as `NodeHandle::start`).
        let seq_max = store
            .load_rows()
            .map_err(|e| format!("rows do not load: {e:#}"))?
            .iter()
            .map(|(_, r)| r.seq)
            .max()
            .unwrap_or(0);
        let cfg = LoopConfig {
            deadline_ms: self.setup.deadline_ms,
            allocation: self.setup.allocation.clone(),
            peers: self.nodes[i].peers_cfg.iter().map(|(_, id)| *id).collect(),
        };
        Ok(Life {
            node: NodeLoop::new(engine, cfg, seq_max),
            store,
            conns: BTreeMap::new(),
            revoked: Default::default(),
            seen: BTreeMap::new(),
            alarms_seen: 0,
            impersonations_received: 0,
        })
    }

    /// Starts (or restarts) node `i` from its disk, as `engine_loop` does:
    /// open, then persist what opening produced before serving.
    pub fn start_node(&mut self, i: usize) -> Result<(), Violation> {
        let mut life = self.open_life(i).map_err(|e| {
            self.violation(
                "recovery",
                format!(
                    "node {} cannot start from its disk: {e}",
                    self.nodes[i].name
                ),
            )
        })?;
        let now = self.clock(i);
        let disk = self.nodes[i].disk.clone();
        let mut storage = SimStorage::new(&life.store, disk, self.bug, None);
        let batch = match life.node.step(&mut storage, Vec::new(), now) {
            // No session is up yet: the first batch has no frames and no answers.
            Step::Committed(c) => c.batch,
            Step::Failed(f) => {
                return Err(self.violation(
                    "recovery",
                    format!(
                        "node {} cannot write its first batch after start: {:?}",
                        self.nodes[i].name, f.cause
                    ),
                ));
            }
        };
        self.nodes[i].life = Some(life);
        self.nodes[i].kick = true;
        self.observe_commit(i, &batch)?;
        Ok(())
    }

    /// Cuts the power of node `i`: unsynced writes are lost, so are the
    /// requests it holds (their clients retry) and its connections.
    pub fn crash_node(&mut self, i: usize, lost: Vec<usize>) {
        self.power_cut(i, lost);
        if self.nodes[i].is_clone {
            self.retire_clone(i);
        } else {
            let at = self.now_ms + self.rand_in(RESTART_MS);
            self.at(at, Action::Restart(i));
        }
    }

    /// Powers node `i` off until someone calls [`World::restart_node`].
    pub fn power_off(&mut self, i: usize) {
        if self.nodes[i].life.is_some() {
            self.power_cut(i, Vec::new());
        }
    }

    fn power_cut(&mut self, i: usize, lost: Vec<usize>) {
        self.nodes[i].disk.crash();
        let parked = self.nodes[i]
            .life
            .take()
            .map(|mut l| l.node.take_parked())
            .unwrap_or_default();

        self.nodes[i].crash_plan = None;
        self.nodes[i].stats.crashes += 1;
        let mut rids: Vec<usize> = self.nodes[i]
            .cmds
            .drain(..)
            .filter_map(|c| match c {
                Cmd::Op(rid) => Some(rid),
                Cmd::Net(_) => None,
            })
            .collect();
        rids.extend(parked);
        rids.extend(lost);
        for rid in rids {
            self.lose_delivery(rid);
        }
        // Frames the node already put on the wire still arrive; nothing reaches
        // it any more; its peers notice the dead connection at their idle timeout.
        let conns: Vec<((usize, usize), u64)> = self
            .net
            .conns
            .iter()
            .filter(|((a, b), _)| *a == i || *b == i)
            .map(|(k, c)| (*k, *c))
            .collect();
        for ((a, b), conn) in conns {
            let j = if a == i { b } else { a };
            if let Some(l) = self.net.links.get_mut(&(j, i)) {
                l.stalled = true;
                l.queue.clear();
            }
            let at = self.now_ms + self.rand_in(DETECT_MS);
            self.at(at, Action::ResetIfConn(a, b, conn));
        }
        let item = format!("crash {i} t={}", self.now_ms);
        self.trace(item.as_bytes());
    }

    /// A delivery the node will never answer: the client retries later.
    fn lose_delivery(&mut self, rid: usize) {
        let r = &mut self.clients.reqs[rid];
        r.in_flight = r.in_flight.saturating_sub(1);
        if r.first_ok.is_none() && r.final_err.is_none() && !r.abandoned && r.in_flight == 0 {
            let at = self.now_ms + self.rand_in(RETRY_MS) + self.rand_in(RESTART_MS);
            self.clients.schedule_retry(rid, at);
        }
    }

    pub fn restart_node(&mut self, i: usize) -> Result<(), Violation> {
        if self.nodes[i].life.is_some() || self.nodes[i].retired {
            return Ok(());
        }
        let image = self.nodes[i].restart_image.take();
        let restored = image.is_some();
        self.nodes[i].disk = match &image {
            Some((_, bytes)) => SimDisk::from_image(bytes.clone()),
            None => self.nodes[i].disk.restart(),
        };
        if let Some((t_img, _)) = image {
            self.discard_history(i, t_img);
        }
        self.fire(FaultKind::Restart);
        self.nodes[i].stats.restarts += 1;
        self.start_node(i)?;
        let item = format!("restart {i} t={} restored={restored}", self.now_ms);
        self.trace(item.as_bytes());
        self.check_restart(i)
    }

    /// After failed commit (storage error, the disk still alive): reload the
    /// engine from what the store holds, keeping the loop and its connections
    /// (as `node::engine_loop` does).
    fn reopen_node(&mut self, i: usize, mut life: Life) -> Result<(), Violation> {
        match self.open_engine(i) {
            Ok((store, engine)) => {
                let now = self.clock(i);
                // redb refuses everything after an I/O error: the store is reopened too.
                life.store = store;
                // The checkers look at the reopened engine as at a new one.
                life.seen.clear();
                life.alarms_seen = 0;
                life.impersonations_received = 0;
                let disk = self.nodes[i].disk.clone();
                let mut storage = SimStorage::new(&life.store, disk, self.bug, None);
                life.node.replace_engine(engine, &mut storage, now);
                self.nodes[i].life = Some(life);
                self.nodes[i].kick = true;
                self.nodes[i].dirty = true;
                self.check_restart(i)
            }
            Err(_) if self.nodes[i].disk.is_crashed() => {
                // The power went while reopening: an ordinary crash.
                drop(life);
                self.crash_node(i, Vec::new());
                Ok(())
            }
            Err(e) => Err(self.violation(
                "recovery",
                format!(
                    "node {} cannot reopen its store after a failed commit: {e}",
                    self.nodes[i].name
                ),
            )),
        }
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

    // ---- network ----

    /// Whether `a` and `b` may hold a connection now: both run, nothing blocks
    /// the handshake, and neither already talks to the other's identity
    /// through another process (a cloned identity is served once per peer).
    fn eligible(&self, a: usize, b: usize) -> bool {
        if !self.alive(a)
            || !self.alive(b)
            || self.net.is_blocked(a, b)
            || self.net.is_blocked(b, a)
        {
            return false;
        }
        // A revoked key is refused at the handshake.
        let refuses = |x: usize, y: usize| {
            self.nodes[x]
                .life
                .as_ref()
                .is_some_and(|l| l.revoked.contains(&self.nodes[y].cfg.node_id))
        };
        if refuses(a, b) || refuses(b, a) {
            return false;
        }
        let (ia, ib) = (self.nodes[a].identity, self.nodes[b].identity);
        for &(x, y) in self.net.conns.keys() {
            for (me, other_id, other) in [(a, ib, b), (b, ia, a)] {
                let far = if x == me {
                    y
                } else if y == me {
                    x
                } else {
                    continue;
                };
                if far != other && self.nodes[far].identity == other_id {
                    return false;
                }
            }
        }
        true
    }

    fn connect_pairs(&mut self) -> Result<(), Violation> {
        let pairs: Vec<(usize, usize)> = self.net.peers.iter().copied().collect();
        for (a, b) in pairs {
            if self.net.connected(a, b).is_some() {
                continue;
            }
            let due = self.net.reconnect_at_ms.get(&(a, b)).copied().unwrap_or(0);
            if due > self.now_ms {
                continue;
            }
            if !self.eligible(a, b) {
                let at = self.now_ms + self.rand_in(RECONNECT_MS);
                self.net.reconnect_at_ms.insert((a, b), at);
                continue;
            }
            // Never connected before: both ends started and dial at once.
            let first = self.dialled_pairs.insert((a, b));
            let conn = self.net.open(a, b);
            self.crossing_dials(a, b, conn, first)?;
            let (ida, idb) = (self.nodes[a].cfg.node_id, self.nodes[b].cfg.node_id);
            // Each hello carries the digest of what its sender has committed.
            let digest = |x: usize| {
                self.nodes[x]
                    .life
                    .as_ref()
                    .and_then(|l| l.node.hello_digest())
            };
            let (da, db) = (digest(a), digest(b));
            self.nodes[a].cmds.push_back(Cmd::Net(NetEv::Up {
                peer: idb,
                from: b,
                conn,
                digest: db,
            }));
            self.nodes[b].cmds.push_back(Cmd::Net(NetEv::Up {
                peer: ida,
                from: a,
                conn,
                digest: da,
            }));
        }
        Ok(())
    }

    /// Crossing dials: on a pair's `first` connection (both nodes start and
    /// dial) and in about a quarter of the others, `a` and `b` dial each other
    /// at once (derived from the seed and the connection number, not drawn,
    /// so the event stream is unchanged). Each side sees
    /// both connections, in its own arrival order, and keeps one by
    /// production's `arbitrate` (`node/src/transport/conn.rs` calls the same
    /// function); both must keep the same one, else each would close the
    /// connection the other kept and the pair would hold none. The simulated
    /// link that follows is the survivor.
    fn crossing_dials(
        &mut self,
        a: usize,
        b: usize,
        conn: u64,
        first: bool,
    ) -> Result<(), Violation> {
        let bits = mix64(self.seed ^ conn.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15);
        if !first && bits % 4 != 0 {
            return Ok(());
        }
        self.crossing_dials += 1;
        let (ida, idb) = (self.nodes[a].cfg.node_id, self.nodes[b].cfg.node_id);
        // One process on each side dialled both: each side sees its peer's
        // nonce on both connections (a new process is probed, not arbitrated).
        let (nonce_a, nonce_b) = (bits >> 40, bits >> 24);
        let at_a = survivor(ida, idb, nonce_b, bits & 0x10 != 0);
        let at_b = survivor(idb, ida, nonce_a, bits & 0x20 != 0);
        match (at_a, at_b) {
            (Some(x), Some(y)) if x == y => Ok(()),
            _ => Err(self.violation(
                "connection-arbitration",
                format!(
                    "{} and {} dialled each other at once and kept different connections ({at_a:?} at the first, {at_b:?} at the second)",
                    self.nodes[a].name, self.nodes[b].name
                ),
            )),
        }
    }

    /// Drops a connection: frames in flight are lost, both ends see it go down.
    pub fn reset_pair(&mut self, a: usize, b: usize) {
        let Some(conn) = self.net.close(a, b) else {
            return;
        };
        let (ida, idb) = (self.nodes[a].cfg.node_id, self.nodes[b].cfg.node_id);
        if self.nodes[a].life.is_some() {
            self.nodes[a]
                .cmds
                .push_back(Cmd::Net(NetEv::Down { peer: idb, conn }));
        }
        if self.nodes[b].life.is_some() {
            self.nodes[b]
                .cmds
                .push_back(Cmd::Net(NetEv::Down { peer: ida, conn }));
        }
        let at = self.now_ms + self.rand_in(RECONNECT_MS);
        self.net.reconnect_at_ms.insert(pair(a, b), at);
    }

    /// A partition cut these pairs: their connections die after an idle timeout.
    pub fn partition_started(&mut self, pairs: &[(usize, usize)]) {
        for &(a, b) in pairs {
            if let Some(conn) = self.net.connected(a, b) {
                let at = self.now_ms + self.rand_in(DETECT_MS);
                let (x, y) = pair(a, b);
                self.at(at, Action::ResetIfConn(x, y, conn));
            }
        }
    }

    fn deliver_frames(&mut self) {
        for (from, to, conn, f) in self.net.due(self.now_ms) {
            if self.nodes[to].life.is_none() {
                continue;
            }
            if f.sent_at_ms < self.net.last_sent_delivered[to] {
                self.fire(FaultKind::ReorderAcrossLinks);
            }
            self.net.last_sent_delivered[to] = f.sent_at_ms;
            self.net.bytes_in[to] += f.bytes.len() as u64;
            let peer = self.nodes[from].cfg.node_id;
            self.nodes[to].cmds.push_back(Cmd::Net(NetEv::Frame {
                peer,
                conn,
                bytes: f.bytes,
            }));
        }
    }

    fn send_frames(
        &mut self,
        i: usize,
        frames: Vec<(NodeId, Vec<u8>)>,
        conns: &BTreeMap<NodeId, (usize, u64)>,
    ) {
        for (peer, bytes) in frames {
            if trace_printed() && self.nodes[i].is_clone {
                let d = match storemesh_protocol::wire::decode_frame::<storemesh_protocol::sync::Msg>(
                    bytes.get(4..).unwrap_or(&[]),
                ) {
                    Ok(storemesh_protocol::sync::Msg::Push { doc, data, .. }) => {
                        format!("push {doc} {}B", data.len())
                    }
                    Ok(storemesh_protocol::sync::Msg::Sync { doc, data }) => {
                        format!("sync {doc} {}B", data.len())
                    }
                    Ok(storemesh_protocol::sync::Msg::Certs { certs, .. }) => {
                        format!("certs {}", certs.len())
                    }
                    Ok(m) => format!("kind {}", m.kind_index()),
                    Err(e) => format!("? {e}"),
                };
                eprintln!(
                    "  (n{i} t={} -> {:?} {d} connected={:?})",
                    self.now_ms,
                    conns.get(&peer).map(|c| c.0),
                    conns
                        .get(&peer)
                        .map(|c| self.net.connected(i, c.0) == Some(c.1))
                );
            }
            let Some(&(to, conn)) = conns.get(&peer) else {
                continue; // not connected: anti-entropy repairs it later
            };
            if self.net.connected(i, to) != Some(conn) {
                continue;
            }
            let jitter: u64 = self.rng.gen();
            if self.net.send(i, to, bytes, self.now_ms, jitter) {
                let at = self.now_ms + self.rand_in(DETECT_MS);
                let (x, y) = pair(i, to);
                self.at(at, Action::ResetIfConn(x, y, conn));
            }
        }
    }

    // ---- clients ----

    /// Hands one delivery of a request to its node (or schedules a retry when
    /// the node is down: the connection is refused).
    pub fn submit(&mut self, rid: usize) {
        let node = self.clients.reqs[rid].node;
        if self.clients.reqs[rid].abandoned {
            return;
        }
        if self.nodes[node].retired {
            self.clients.abandon(rid);
            return;
        }
        if self.nodes[node].life.is_none() {
            // Connection refused: back off (exponentially, up to ~2 minutes).
            let r = &mut self.clients.reqs[rid];
            r.refused += 1;
            let shift = r.refused.min(6);
            let at = self.now_ms + (self.rand_in(RETRY_MS) << shift);
            self.clients.schedule_retry(rid, at);
            return;
        }
        let r = &mut self.clients.reqs[rid];
        if r.attempts > 0 && r.first_ok.is_none() && r.final_err.is_none() {
            self.fired
                .entry(FaultKind::ClientRetry)
                .and_modify(|n| *n += 1)
                .or_insert(1);
        }
        let r = &mut self.clients.reqs[rid];
        r.in_flight += 1;
        r.attempts += 1;
        self.nodes[node].cmds.push_back(Cmd::Op(rid));
    }

    fn answer(&mut self, rid: usize, result: Result<OpReply, OpError>) -> Result<(), Violation> {
        let item = match &result {
            Ok(r) => format!(
                "reply {rid} {} {}",
                http::reply_status(r.kind).as_u16(),
                r.body
            ),
            Err(e) => format!("reply {rid} {}", http::error_body(e)),
        };
        self.trace(item.as_bytes());
        let node = self.clients.reqs[rid].node;
        if let Some(orig) = self.clients.reqs[rid].conflict_probe_of {
            let r = &mut self.clients.reqs[rid];
            r.in_flight = r.in_flight.saturating_sub(1);
            let o = &self.clients.reqs[orig];
            let must_conflict = o.first_ok.is_some() && !o.idem_lost;
            match &result {
                Err(OpError::Unavailable(_)) => {
                    let at = self.now_ms + self.rand_in(RETRY_MS);
                    self.clients.schedule_retry(rid, at);
                }
                Err(e @ OpError::IdConflict(_)) => {
                    self.clients.reqs[rid].final_err = Some(http::error_code(e).into());
                }
                other if must_conflict => {
                    let shown = match other {
                        Ok(r) => format!("{} {}", http::reply_status(r.kind).as_u16(), r.body),
                        Err(e) => http::error_body(e).to_string(),
                    };
                    return Err(self.violation(
                        "exactly-once",
                        format!(
                            "request reusing id {} with another body at node {} was answered {shown}, not 409 id_conflict",
                            o.key.as_deref().unwrap_or("?"),
                            self.nodes[node].name
                        ),
                    ));
                }
                _ => self.clients.reqs[rid].final_err = Some("probe".into()),
            }
            return Ok(());
        }
        let kind = self.clients.reqs[rid].kind;
        let was_new = self.clients.reqs[rid].first_ok.is_none();
        let retry_at = self.now_ms + self.rand_in(RETRY_MS);
        if let ReplyCheck::Mismatch(m) = self.clients.on_reply(rid, &result, self.now_ms, retry_at)
        {
            return Err(self.violation("exactly-once", m));
        }
        if kind == crate::client::Kind::Sale && was_new {
            match &result {
                Ok(_) => {
                    self.nodes[node].stats.sales_ok += 1;
                    let units: u64 = match &self.clients.reqs[rid].op {
                        storemesh_protocol::ops::Op::Sale(s) => {
                            s.lines.iter().map(|l| l.quantity).sum()
                        }
                        _ => 0,
                    };
                    self.nodes[node].stats.units_sold += units;
                }
                Err(e @ OpError::InsufficientStock(_)) => {
                    self.nodes[node].stats.sales_refused += 1;
                    if self.refused_with_stock(rid, e, false) {
                        self.nodes[node].stats.refused_stock_anywhere += 1;
                        if self.refused_with_stock(rid, e, true) {
                            self.nodes[node].stats.refused_with_stock += 1;
                        }
                    }
                }
                Err(_) => {}
            }
        }
        Ok(())
    }

    // ---- the request path ----

    /// One pass of the node's engine loop: drain the channel into the inputs
    /// of production's `NodeLoop::step` (execute, one commit), then release
    /// what the committed outcome holds.
    fn process(&mut self, i: usize) -> Result<(), Violation> {
        let now = self.clock(i);
        let Some(mut life) = self.nodes[i].life.take() else {
            return Ok(());
        };
        self.nodes[i].kick = false;
        // Commands in arrival order, as the production engine thread drains its channel.
        let n_cmds = self.nodes[i].cmds.len().min(BATCH_OPS_MAX);
        let cmds: Vec<Cmd> = self.nodes[i].cmds.drain(..n_cmds).collect();
        let mut inputs: Vec<Input<usize>> = Vec::with_capacity(n_cmds + 1);
        let mut has_ops = life.node.parked_len() > 0;
        for cmd in cmds {
            match cmd {
                Cmd::Net(ev) => match self.net_input(&mut life, ev) {
                    Ok(Some(input)) => inputs.push(input),
                    Ok(None) => {}
                    Err(v) => {
                        self.nodes[i].life = Some(life);
                        return Err(v);
                    }
                },
                Cmd::Op(rid) => {
                    has_ops = true;
                    inputs.push(Input::Op(self.clients.reqs[rid].op.clone(), rid));
                }
            }
        }
        if self.now_ms >= self.nodes[i].next_ae_ms {
            inputs.push(Input::Tick);
            self.nodes[i].next_ae_ms = self.now_ms + self.setup.anti_entropy_ms;
        }
        // A planned crash strikes the next commit of a batch with client operations.
        let plan = if has_ops && self.faults_active {
            self.nodes[i].crash_plan.take()
        } else {
            None
        };
        let disk = self.nodes[i].disk.clone();
        let mut storage = SimStorage::new(&life.store, disk.clone(), self.bug, plan);
        let step = life.node.step(&mut storage, inputs, now);
        let plan = if storage.used {
            plan
        } else {
            // No commit came: the plan waits for the next one.
            self.nodes[i].crash_plan = plan;
            None
        };
        match step {
            Step::Committed(c) => {
                let ok: Vec<usize> = c
                    .replies
                    .iter()
                    .filter(|(_, r)| r.is_ok())
                    .map(|(rid, _)| *rid)
                    .collect();
                self.note_records(i, &ok, now);
                if !c.batch.is_empty() {
                    self.commits += 1;
                    self.nodes[i].stats.commits += 1;
                }
                if plan == Some(CrashPlan::AfterCommit) {
                    // Durable, but the power goes before any answer or frame leaves.
                    self.fire(FaultKind::CrashAfterCommit);
                    let mut lost: Vec<usize> = c.replies.into_iter().map(|(rid, _)| rid).collect();
                    lost.extend(life.node.take_parked());
                    drop(life);
                    self.crash_node(i, lost);
                    return Ok(());
                }
                if let Some((peer, e)) = c.disconnect.first() {
                    let from = self.tag_name(peer.tag()).unwrap_or_default();
                    let v = self.violation(
                        "protocol",
                        format!(
                            "node {} refused a frame from honest peer {from}: {e}",
                            self.nodes[i].name
                        ),
                    );
                    self.nodes[i].life = Some(life);
                    return Err(v);
                }
                for peer in &c.revoke {
                    self.revocations += 1;
                    life.revoked.insert(*peer);
                    let item = format!("revoke {i} {} t={}", peer.hex(), self.now_ms);
                    self.trace(item.as_bytes());
                }
                let conns = life.conns.clone();
                let item = format!(
                    "commit {i} t={} {}",
                    self.now_ms,
                    hex::encode(life.engine().digest_root())
                );
                self.trace(item.as_bytes());
                self.nodes[i].life = Some(life);
                for (rid, r) in c.replies {
                    self.answer(rid, r)?;
                }
                self.send_frames(i, c.frames, &conns);
                if !c.batch.is_empty() {
                    self.observe_commit(i, &c.batch)?;
                }
                Ok(())
            }
            Step::Failed(f) => {
                let in_doubt: Vec<usize> = f.in_doubt.iter().map(|k| f.replies[*k].0).collect();
                self.note_records(i, &in_doubt, now);
                if let Failure::Panic { peer, what } = &f.cause {
                    let from = self.tag_name(peer.tag()).unwrap_or_default();
                    let v = self.violation(
                        "protocol",
                        format!(
                            "node {} panicked applying a frame from honest peer {from}: {what}",
                            self.nodes[i].name
                        ),
                    );
                    self.nodes[i].life = Some(life);
                    return Err(v);
                }
                if disk.is_crashed() {
                    self.fire(match plan {
                        Some(CrashPlan::BeforeCommit) => FaultKind::CrashBeforeCommit,
                        _ => FaultKind::CrashMidCommit,
                    });
                    drop(life);
                    let lost = f.replies.into_iter().map(|(rid, _)| rid).collect();
                    self.crash_node(i, lost);
                    return Ok(());
                }
                self.fire(FaultKind::FailingCommit);
                self.nodes[i].stats.commit_failures += 1;
                let item = format!("commit-failed {i} t={}", self.now_ms);
                self.trace(item.as_bytes());
                // The step answers 503 (parked sales too); the engine is reopened.
                for (rid, r) in f.replies {
                    self.answer(rid, r)?;
                }
                self.reopen_node(i, life)
            }
        }
    }

    /// Requests answered OK at `now`: their record is in that month's
    /// documents (checkers look it up in every part of the month,
    /// `Engine::record_in_month`).
    fn note_records(&mut self, i: usize, rids: &[usize], now: u64) {
        if rids.is_empty() {
            return;
        }
        let doc = DocId::Records {
            tag: self.nodes[i].cfg.node_id.tag(),
            month: month_of(now),
            part: 0,
        }
        .encode();
        for rid in rids {
            // A request reusing another request's key at this node (the
            // same import file imported again) is answered from that one's
            // idempotency record: its record is where the other one wrote
            // it, maybe in an earlier month of this node's clock. The other
            // may have been submitted later and answered first (seed 430 of
            // the sweep on #16: the import of request 87 at hub n3 was
            // retried until t=24.5 s while request 190, the same file at the
            // same node, was answered at t=6.3 s in November; 87's replay
            // came in December and the record was looked up there only).
            let r = &self.clients.reqs[*rid];
            let earlier: Vec<String> = match &r.key {
                Some(k) if r.conflict_probe_of.is_none() => self
                    .clients
                    .reqs
                    .iter()
                    .enumerate()
                    .filter(|(j, o)| *j != *rid && o.node == i && o.key.as_ref() == Some(k))
                    .flat_map(|(_, o)| o.rec_docs.iter().cloned())
                    .collect(),
                _ => Vec::new(),
            };
            let docs = &mut self.clients.reqs[*rid].rec_docs;
            for d in earlier.into_iter().chain(std::iter::once(doc.clone())) {
                if !docs.contains(&d) {
                    docs.push(d);
                }
            }
        }
    }

    /// One network event as a step input; the routing table (`Life::conns`)
    /// follows the connections as the transport's does.
    fn net_input(&mut self, life: &mut Life, ev: NetEv) -> Result<Option<Input<usize>>, Violation> {
        Ok(Some(match ev {
            NetEv::Up {
                peer,
                from,
                conn,
                digest,
            } => {
                life.conns.insert(peer, (from, conn));
                self.digest_hellos += u64::from(digest.is_some());
                Input::PeerUp { peer, conn, digest }
            }
            NetEv::Down { peer, conn } => {
                if life.conns.get(&peer).map(|c| c.1) == Some(conn) {
                    life.conns.remove(&peer);
                }
                Input::PeerDown { peer, conn }
            }
            NetEv::Frame {
                peer,
                conn,
                mut bytes,
            } => {
                if life.conns.get(&peer).map(|c| c.1) != Some(conn) {
                    return Ok(None);
                }
                if bytes.len() < 4 {
                    return Err(
                        self.violation("protocol", "a frame shorter than its length prefix".into())
                    );
                }
                bytes.drain(..4);
                Input::Frame {
                    peer,
                    conn,
                    body: bytes,
                }
            }
        }))
    }

    // ---- destructive faults that need the whole world ----

    /// The disk of node `i` is replaced by an image taken at `t_img`: what the
    /// node acknowledged after it is gone from that node.
    fn discard_history(&mut self, i: usize, t_img: u64) {
        self.nodes[i].epoch += 1;
        let name = self.nodes[i].name.clone();
        self.check.forked.insert(name);
        let incs = self.nodes[i].incarnations.clone();
        let live_at_img = incs.iter().rposition(|(_, t)| *t <= t_img).unwrap_or(0);
        for (a, _) in &incs[live_at_img..] {
            self.check.discarded_actors.insert(*a);
        }
        for rid in 0..self.clients.reqs.len() {
            let r = &self.clients.reqs[rid];
            if r.node != i {
                continue;
            }
            if r.outstanding() {
                self.clients.abandon(rid);
                continue;
            }
            if r.acked_at_ms.is_some_and(|t| t > t_img) && r.key.is_some() {
                let elsewhere = self.record_elsewhere(rid, i);
                let r = &mut self.clients.reqs[rid];
                r.idem_lost = true;
                r.lost_with_history = !elsewhere;
            }
        }
    }

    /// Whether some other running node holds the record of request `rid`.
    fn record_elsewhere(&self, rid: usize, except: usize) -> bool {
        let r = &self.clients.reqs[rid];
        let Some(key) = r.record_key() else {
            return true;
        };
        self.nodes.iter().enumerate().any(|(j, n)| {
            j != except
                && n.life.as_ref().is_some_and(|l| {
                    r.rec_docs
                        .iter()
                        .any(|d| l.engine().record_in_month(d, &key).is_some())
                })
        })
    }

    /// A second process with node `x`'s identity, started from a copy of its disk.
    pub fn start_clone(&mut self, x: usize, lifetime_ms: u64) -> Result<bool, Violation> {
        if !self.alive(x)
            || self.nodes[x].is_clone
            || self.nodes.iter().any(|n| n.is_clone && !n.retired)
        {
            return Ok(false);
        }
        let image = self.nodes[x].disk.snapshot_synced();
        let c = self.nodes.len();
        let src = &self.nodes[x];
        let node = SimNode {
            name: format!("{}-clone", src.name),
            identity: src.identity,
            cfg: src.cfg.clone(),
            peers_cfg: src.peers_cfg.clone(),
            disk: SimDisk::from_image(image),
            life: None,
            cmds: VecDeque::new(),
            paused_until_ms: 0,
            next_ae_ms: self.now_ms,
            kick: false,
            crash_plan: None,
            offset_ms: src.offset_ms,
            drift_ppm: src.drift_ppm,
            epoch: 0,
            is_clone: true,
            retired: false,
            incarnations: Vec::new(),
            images: Vec::new(),
            restart_image: None,
            dirty: false,
            stats: NodeStats::default(),
        };
        self.nodes.push(node);
        self.net.ensure_node(c);
        let peers: Vec<(usize, usize)> = self.net.peers.iter().copied().collect();
        for (a, b) in peers {
            if a == x {
                self.net.peers.insert(pair(c, b));
            } else if b == x {
                self.net.peers.insert(pair(c, a));
            }
        }
        self.check.forked.insert(self.nodes[x].name.clone());
        self.start_node(c)?;
        self.fire(FaultKind::ClonedIdentity);
        let at = self.now_ms + lifetime_ms;
        self.at(at, Action::StopClone(c));
        let item = format!("clone {x} as {c} t={}", self.now_ms);
        self.trace(item.as_bytes());
        Ok(true)
    }

    /// The clone's process is stopped and its data directory thrown away.
    fn stop_clone(&mut self, c: usize) {
        if self.nodes[c].retired {
            return;
        }
        if self.nodes[c].life.is_some() {
            self.power_cut(c, Vec::new());
        }
        self.retire_clone(c);
    }

    fn retire_clone(&mut self, c: usize) {
        for (a, _) in self.nodes[c].incarnations.clone() {
            self.check.discarded_actors.insert(a);
        }
        for rid in 0..self.clients.reqs.len() {
            if self.clients.reqs[rid].node != c {
                continue;
            }
            if self.clients.reqs[rid].outstanding() {
                self.clients.abandon(rid);
            } else if self.clients.reqs[rid].first_ok.is_some() && !self.record_elsewhere(rid, c) {
                self.clients.reqs[rid].lost_with_history = true;
            }
        }
        self.nodes[c].retired = true;
        self.net.peers.retain(|(a, b)| *a != c && *b != c);
        let item = format!("clone-stop {c} t={}", self.now_ms);
        self.trace(item.as_bytes());
    }

    /// Whether node `j` holds every change node `x` wrote (any incarnation,
    /// any document) and every customer key `x` has: then `x` can be switched
    /// off for good without losing anything.
    pub fn holds_changes_of(&self, x: usize, j: usize) -> bool {
        let (Some(lx), Some(lj)) = (&self.nodes[x].life, &self.nodes[j].life) else {
            return false;
        };
        let tag = self.nodes[x].cfg.node_id.tag();
        let empty = automerge::Automerge::new();
        for (id, _) in lx.engine().documents() {
            let Some(dx) = lx.engine().doc(&id) else {
                continue;
            };
            let missing = lj.engine().doc(&id).unwrap_or(&empty).get_changes_added(dx);
            if missing.iter().any(|c| {
                ActorKey::from_bytes(c.actor_id().to_bytes()).is_some_and(|a| a.tag() == tag)
            }) {
                return false;
            }
        }
        let (Ok(kx), Ok(kj)) = (lx.store.load_keys(), lj.store.load_keys()) else {
            return false;
        };
        let kj: BTreeMap<String, _> = kj.into_iter().collect();
        kx.iter()
            .all(|(c, e)| kj.get(c).is_some_and(|ej| ej.merge(e) == *ej))
    }

    /// Switches node `x` off for good (it was drained and another node holds
    /// everything it wrote): it leaves the mesh, its clients are gone, and
    /// from now on its rights are `successor`'s in the checkers' eyes.
    pub fn retire_node(&mut self, x: usize, successor: usize) {
        self.power_off(x);
        for rid in 0..self.clients.reqs.len() {
            if self.clients.reqs[rid].node == x && self.clients.reqs[rid].outstanding() {
                self.clients.abandon(rid);
            }
        }
        self.nodes[x].retired = true;
        self.draining = None;
        self.net.peers.retain(|(a, b)| *a != x && *b != x);
        let (tx, ts) = (
            self.nodes[x].cfg.node_id.tag(),
            self.nodes[successor].cfg.node_id.tag(),
        );
        self.check.retired_to.insert(tx, ts);
        self.fire(FaultKind::RetireNode);
        let item = format!("retire {x} to {successor} t={}", self.now_ms);
        self.trace(item.as_bytes());
    }

    /// Keeps a copy of a node's durable image (a backup) for a later restore.
    pub fn take_image(&mut self, i: usize) {
        if self.nodes[i].life.is_none() || self.nodes[i].is_clone {
            return;
        }
        let img = self.nodes[i].disk.snapshot_synced();
        let n = &mut self.nodes[i];
        n.images.push((self.now_ms, img));
        if n.images.len() > IMAGES_MAX {
            n.images.remove(0);
        }
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

/// Which dial survives at node `me` (peer `peer`, whose process `nonce` both
/// connections carry) when both dialled at once and `mine_first` says which
/// connection this side registered first: the dialler of the survivor, by
/// production's arbitration; `None` if it would probe instead.
fn survivor(me: NodeId, peer: NodeId, nonce: u64, mine_first: bool) -> Option<NodeId> {
    use storemesh_protocol::arbitration::{arbitrate, Arbitration, ConnFacts};
    let mine = ConnFacts {
        dialed_by_us: true,
        nonce,
    };
    let theirs = ConnFacts {
        dialed_by_us: false,
        nonce,
    };
    let ((live, live_by), (cand, cand_by)) = if mine_first {
        ((mine, me), (theirs, peer))
    } else {
        ((theirs, peer), (mine, me))
    };
    match arbitrate(me, peer, live, cand) {
        Arbitration::KeepLive => Some(live_by),
        Arbitration::Replace => Some(cand_by),
        Arbitration::Probe => None,
    }
}

/// SplitMix64's finaliser: well-spread bits from a counter, without the RNG.
fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
