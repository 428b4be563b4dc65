//! Destructive faults that need the whole world: a disk restored from an
//! older image, a cloned identity, a node retired for good, backups.

use std::collections::{BTreeMap, VecDeque};

use storemesh_protocol::ids::ActorKey;
use storemesh_store::simdisk::SimDisk;

use super::{Action, NodeStats, SimNode, World, IMAGES_MAX};
use crate::invariant::Violation;
use crate::net::pair;
use crate::options::FaultKind;

impl World {
    /// The disk of node `i` is replaced by an image taken at `t_img`: what the
    /// node acknowledged after it is gone from that node.
    pub(super) fn discard_history(&mut self, i: usize, t_img: u64) {
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
    pub(super) fn stop_clone(&mut self, c: usize) {
        if self.nodes[c].retired {
            return;
        }
        if self.nodes[c].life.is_some() {
            self.power_cut(c, Vec::new());
        }
        self.retire_clone(c);
    }

    pub(super) fn retire_clone(&mut self, c: usize) {
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
}
