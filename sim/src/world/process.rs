//! The request path: one pass of a node's engine loop, production's
//! `NodeLoop::step` over the drained channel, and what its outcome releases.

use storemesh_protocol::layout::{month_of, DocId};
use storemesh_protocol::step::{Failure, Input, Step};

use super::storage::SimStorage;
use super::{Cmd, CrashPlan, Life, World, BATCH_OPS_MAX};
use crate::invariant::Violation;
use crate::net::NetEv;
use crate::options::FaultKind;

impl World {
    /// One pass of the node's engine loop: drain the channel into the inputs
    /// of production's `NodeLoop::step` (execute, one commit), then release
    /// what the committed outcome holds.
    pub(super) fn process(&mut self, i: usize) -> Result<(), Violation> {
        let now = self.clock(i);
        let Some(mut life) = self.nodes[i].life.take() else {
            return Ok(());
        };
        self.nodes[i].kick = false;
        // Commands in arrival order (production takes requests before peer
        // frames, within a sync budget: not modelled here).
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
}
