//! Process lifetimes of a simulated node: opening its engine from its disk,
//! starting, crashing, powering off, restarting, and reopening after a
//! failed commit (as `node::engine_loop` does).

use std::collections::BTreeMap;

use rand::Rng;
use storemesh_protocol::engine::Engine;
use storemesh_protocol::step::{LoopConfig, NodeLoop, Step};
use storemesh_store::simdisk::SimDisk;
use storemesh_store::store::Store;

use super::storage::SimStorage;
use super::{Action, Cmd, Life, World, DETECT_MS, RESTART_MS, RETRY_MS};
use crate::invariant::Violation;
use crate::options::{Bug, FaultKind};

impl World {
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

    pub(super) fn power_cut(&mut self, i: usize, lost: Vec<usize>) {
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
    pub(super) fn reopen_node(&mut self, i: usize, mut life: Life) -> Result<(), Violation> {
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
}
