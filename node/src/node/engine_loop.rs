//! The engine thread's loop: waits for commands and peer events, runs each
//! batch as one `NodeLoop::step`, hands its commit to the commit thread
//! (pipelined one deep) and releases replies, rows and frames only after
//! that commit is durable.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use storemesh_protocol::step::{
    commit_batch, CommitError, Committed, Durable, Executed, Failed, Failure, Held, InFlight,
    Input, LoopConfig, NodeLoop, Step, StorageError, SyncPace,
};
use tokio::sync::{mpsc, oneshot};

use super::adapters::{publish, send_frames, sync_stats};
use super::input::wait_for_input;
use super::{
    open_engine, Next, NodeStorage, Reply, Scrub, BATCH_OPS_MAX, COMMIT_PIPELINE_ENV,
    HISTORY_CERTIFIED_KEY, SCRUB_INTERVAL,
};
use crate::config::Config;
use crate::state::{Cmd, Query, Shared};
use crate::store::Store;
use crate::transport::{Transport, TransportEvent};

fn loop_config(cfg: &Config) -> LoopConfig {
    LoopConfig {
        deadline_ms: cfg.rebalance.deadline_ms,
        allocation: cfg
            .allocation
            .iter()
            .map(|a| storemesh_protocol::rebalance::AllocationRule {
                to: a.to.clone(),
                share_percent: a.share_percent,
                max_units: a.max_units,
            })
            .collect(),
        peers: cfg.peers.iter().map(|p| p.id).collect(),
    }
}

// The thread's whole world, handed over once at its start.
#[allow(clippy::too_many_arguments)]
pub(super) fn engine_loop(
    shared: Arc<Shared>,
    store: Arc<Store>,
    transport: Transport,
    rx: mpsc::Receiver<Cmd>,
    net: mpsc::Receiver<TransportEvent>,
    ready: std::sync::mpsc::Sender<anyhow::Result<()>>,
    wake: tokio::sync::watch::Sender<Option<u64>>,
    key_der: Vec<u8>,
) {
    let cfg = shared.cfg.clone();
    let engine = match open_engine(&cfg, shared.node_id, &store, &key_der) {
        Ok(e) => e,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let seq_max = shared.read.read().map(|r| r.seq_max).unwrap_or(0);
    let mut node: NodeLoop<Reply> = NodeLoop::new(engine, loop_config(&cfg), seq_max);
    #[cfg(feature = "failpoints")]
    node.set_frame_hook(super::failpoints::on_frame);
    let mut storage = NodeStorage {
        store: &store,
        metrics: &shared.metrics,
        commit_us: 0,
    };
    // Persist what opening produced (the directory entry) before serving.
    match node.step(&mut storage, Vec::new(), shared.now_ms()) {
        Step::Committed(c) => {
            publish(&shared, node.engine(), &c.batch.rows);
            if let Err(e) = store.set_meta(HISTORY_CERTIFIED_KEY, b"7") {
                tracing::warn!(error = %format!("{e:#}"), "cannot record that the history is certified");
            }
            // Our hellos carry the digest of what is durable, so that an
            // in-sync reconnect is the two hellos and nothing else.
            transport.set_hello_digest(node.hello_digest());
            let _ = wake.send(c.next_wake_ms);
        }
        Step::Failed(f) => {
            let _ = ready.send(Err(anyhow::anyhow!(
                "cannot write to the database: {:?}",
                f.cause
            )));
            return;
        }
    }
    // The commit thread: makes batch N durable while this thread executes
    // batch N+1. It only writes (`commit_batch`); the answers and frames of a
    // batch stay here until its `Durable` comes back.
    std::thread::scope(|scope| {
        let (batch_tx, batch_rx) = std::sync::mpsc::sync_channel::<InFlight>(1);
        let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<Durable, CommitError>>();
        let (store_w, metrics_w) = (&*store, &shared.metrics);
        let writer = std::thread::Builder::new()
            .name(format!("commit-{}", cfg.name))
            .spawn_scoped(scope, move || {
                let mut storage = NodeStorage {
                    store: store_w,
                    metrics: metrics_w,
                    commit_us: 0,
                };
                while let Ok(b) = batch_rx.recv() {
                    if done_tx.send(commit_batch(&mut storage, b)).is_err() {
                        break;
                    }
                }
            });
        if let Err(e) = writer {
            let _ = ready.send(Err(anyhow::anyhow!("cannot start the commit thread: {e}")));
            return;
        }
        {
            let mut r = shared.read.write().unwrap_or_else(|p| p.into_inner());
            r.ready = true;
        }
        let _ = ready.send(Ok(()));
        let lp = EngineLoop {
            shared: &shared,
            store: &store,
            transport: &transport,
            wake: &wake,
            key_der: &key_der,
            node,
            storage,
            scrub_due: false,
            pipeline: std::env::var(COMMIT_PIPELINE_ENV)
                .is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("on")),
            pace: SyncPace::new(),
        };
        lp.run(rx, net, batch_tx, done_rx);
    });
}

/// A batch executed whose commit is running on the commit thread.
struct Pending {
    held: Held<Reply>,
    info: BatchInfo,
}

/// What the debug log and the scrub need to know of a batch once released.
struct BatchInfo {
    n_ops: u64,
    n_frames_in: u64,
    /// Peer events (frames, connections) in it.
    n_peer_events: usize,
    started: Instant,
    /// A customer's key was erased in it (the data file is rewritten later).
    erased: bool,
}

/// The engine thread's state around the loop.
struct EngineLoop<'a> {
    shared: &'a Arc<Shared>,
    store: &'a Arc<Store>,
    transport: &'a Transport,
    wake: &'a tokio::sync::watch::Sender<Option<u64>>,
    /// The identity key the engine signs its batches with (a reopened
    /// engine gets it again).
    key_der: &'a [u8],
    node: NodeLoop<Reply>,
    /// Reads of the loop (idempotency records, sync states); commits go
    /// through the commit thread's own.
    storage: NodeStorage<'a>,
    /// A customer erasure committed since the last rewrite of the data file.
    scrub_due: bool,
    /// Batch N+1 executes while batch N commits (see [`COMMIT_PIPELINE_ENV`]).
    pipeline: bool,
    /// Peer events a batch takes, following what they cost.
    pace: SyncPace,
}

impl EngineLoop<'_> {
    fn run(
        mut self,
        mut rx: mpsc::Receiver<Cmd>,
        mut net: mpsc::Receiver<TransportEvent>,
        batch_tx: std::sync::mpsc::SyncSender<InFlight>,
        done_rx: std::sync::mpsc::Receiver<Result<Durable, CommitError>>,
    ) {
        let shared = self.shared;
        let mut shutdown_ack: Option<oneshot::Sender<()>> = None;
        let mut cmds: Vec<Cmd> = Vec::with_capacity(BATCH_OPS_MAX);
        let mut events: Vec<TransportEvent> = Vec::new();
        // A peer event taken from the channel that did not fit in the last
        // batch's budget: the first of the next one (each peer's order kept).
        let mut carried: Option<TransportEvent> = None;
        let mut last_scrub: Option<Instant> = None;
        let mut scrub: Option<Scrub> = None;
        let mut in_flight: Option<Pending> = None;
        loop {
            cmds.clear();
            events.clear();
            if in_flight.is_none() && carried.is_none() {
                match wait_for_input(&mut rx, &mut net) {
                    Some(Next::Cmd(c)) => cmds.push(c),
                    Some(Next::Net(e)) => carried = Some(e),
                    None => break,
                }
            }
            // Requests first: every one waiting, up to the batch's bound.
            while cmds.len() < BATCH_OPS_MAX {
                match rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
            // Then peer events, within one batch's sync budget.
            let mut share = self.pace.budget();
            loop {
                let ev = match carried.take() {
                    Some(e) => e,
                    None => match net.try_recv() {
                        Ok(e) => e,
                        Err(_) => break,
                    },
                };
                let bytes = match &ev {
                    TransportEvent::Frame { body, .. } => body.len(),
                    _ => 0,
                };
                if !share.admit(bytes) {
                    carried = Some(ev);
                    break;
                }
                events.push(ev);
            }
            if cmds.is_empty() && events.is_empty() {
                // Nothing new while a batch commits: wait for it.
                if let Some(p) = in_flight.take() {
                    if !self.settle(p, &done_rx) {
                        break;
                    }
                }
                continue;
            }
            let now = shared.now_ms();
            let mut inputs: Vec<Input<Reply>> = Vec::with_capacity(cmds.len() + events.len());
            let mut queries: Vec<Query> = Vec::new();
            // Inbound budget of the frames in this batch, given back once applied.
            let mut budgets: Vec<crate::transport::FrameBudget> = Vec::new();
            let mut info = BatchInfo {
                n_ops: 0,
                n_frames_in: 0,
                n_peer_events: share.frames(),
                started: Instant::now(),
                erased: false,
            };
            for c in cmds.drain(..) {
                match c {
                    Cmd::Op(op, reply) => {
                        info.n_ops += 1;
                        inputs.push(Input::Op(op, reply));
                    }
                    Cmd::Wake => inputs.push(Input::Wake),
                    // Looked at after the batch.
                    Cmd::ScrubCopied => {}
                    Cmd::Query(q) => queries.push(q),
                    Cmd::Tick => inputs.push(Input::Tick),
                    Cmd::Shutdown(ack) => shutdown_ack = Some(ack),
                }
            }
            for ev in events.drain(..) {
                match ev {
                    TransportEvent::PeerUp {
                        peer,
                        conn_id,
                        name,
                        hello,
                    } => {
                        tracing::info!(peer = %name, "peer connected");
                        inputs.push(Input::PeerUp {
                            peer,
                            conn: conn_id,
                            digest: hello.digest,
                        });
                    }
                    TransportEvent::PeerDown {
                        peer,
                        conn_id,
                        reason,
                    } => {
                        tracing::debug!(peer = %peer.hex(), reason, "connection ended");
                        inputs.push(Input::PeerDown {
                            peer,
                            conn: conn_id,
                        });
                    }
                    TransportEvent::Frame {
                        peer,
                        conn_id,
                        body,
                        budget,
                    } => {
                        info.n_frames_in += 1;
                        budgets.push(budget);
                        inputs.push(Input::Frame {
                            peer,
                            conn: conn_id,
                            body,
                        });
                    }
                    TransportEvent::Refused {
                        addr,
                        node_id,
                        reason,
                    } => {
                        shared
                            .metrics
                            .refused_connections
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%addr, node_id = node_id.as_deref().unwrap_or("?"), reason, "connection refused");
                    }
                }
            }
            shared
                .metrics
                .batch_ops_last
                .store(info.n_ops, Ordering::Relaxed);
            // Runs while the previous batch commits on the commit thread.
            let executed = self.node.execute(&mut self.storage, inputs, now);
            // What applying this batch cost sets the next one's share of
            // peer input.
            self.pace
                .observe(share.bytes(), info.started.elapsed().as_micros() as u64);
            drop(budgets);
            let mut alive = true;
            match executed {
                Ok(ex) => {
                    info.erased =
                        ex.batch.batch.keys.iter().any(|(_, e)| {
                            matches!(e, storemesh_protocol::crypto::KeyEntry::Erased)
                        });
                    // The previous batch first: batches are released in order.
                    let ex = match in_flight.take() {
                        Some(p) => self.settle_with_later(p, ex, &done_rx),
                        None => Ok(ex),
                    };
                    match ex {
                        Ok(ex) => {
                            // Reads (queries), a shutdown and a data-file
                            // rewrite see only durable state: no pipelining then.
                            let drain = !self.pipeline
                                || !queries.is_empty()
                                || shutdown_ack.is_some()
                                || scrub.is_some()
                                || self.scrub_due;
                            match self.launch(ex, info, &batch_tx, drain) {
                                Launched::Released => {}
                                Launched::InFlight(p) => in_flight = Some(p),
                                Launched::Failed(f) => alive = self.failed(f),
                            }
                        }
                        Err(still) => alive = still,
                    }
                }
                Err(f) => {
                    // A peer's frame made this batch fail: the batch before
                    // it is unaffected, released first; then the engine is reopened.
                    if let Some(p) = in_flight.take() {
                        alive = self.settle(p, &done_rx);
                    }
                    alive = alive && self.failed(f);
                }
            }
            if !alive {
                break;
            }
            if in_flight.is_none() {
                // An erased customer's key must not survive in the file's freed
                // pages: rewrite the file once the answers are out (at most every
                // SCRUB_INTERVAL). The copy runs on its own thread; this thread
                // only starts it and, once it is done, replays and swaps.
                if let Some(s) = scrub.take() {
                    match s.finish_if_copied(self.store) {
                        Ok(again) => self.scrub_due |= again,
                        Err(s) => scrub = Some(s),
                    }
                }
                if scrub.is_none()
                    && self.scrub_due
                    && last_scrub.is_none_or(|t| t.elapsed() >= SCRUB_INTERVAL)
                {
                    self.scrub_due = false;
                    last_scrub = Some(Instant::now());
                    match Scrub::start(self.store, shared.cmd.clone()) {
                        Ok(s) => scrub = Some(s),
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "cannot rewrite the data file after an erasure")
                        }
                    }
                }
                for q in queries.drain(..) {
                    q(self.node.engine());
                }
            }
            sync_stats(shared, self.node.engine());
            {
                let all: BTreeMap<String, u64> = self
                    .node
                    .rejected()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                *shared.rejected.write().unwrap_or_else(|p| p.into_inner()) = all;
            }
            if in_flight.is_none() {
                if let Some(ack) = shutdown_ack.take() {
                    let _ = ack.send(());
                    break;
                }
            }
        }
        if let Some(p) = in_flight.take() {
            self.settle(p, &done_rx);
        }
        if let Some(s) = scrub.take() {
            s.cancel(self.store);
        }
        // Persist sync states of connections still open.
        let EngineLoop {
            node, mut storage, ..
        } = self;
        if let Err(e) = node.close(&mut storage, shared.now_ms()) {
            tracing::warn!(error = %e, "final commit failed");
        }
    }

    /// Waits for the commit of `p` and releases it (or fails it). `false`:
    /// the engine could not be reopened after a failure; the loop stops.
    fn settle(
        &mut self,
        p: Pending,
        done_rx: &std::sync::mpsc::Receiver<Result<Durable, CommitError>>,
    ) -> bool {
        match wait_commit(&p, done_rx) {
            Ok(d) => {
                let c = self.node.release(p.held, d);
                self.committed(c, p.info);
                true
            }
            Err(e) => {
                let f = self
                    .node
                    .fail_in_flight(Failure::Storage(e.error), vec![p.held]);
                self.failed(f)
            }
        }
    }

    /// As [`Self::settle`], with `later` executed after `p`: returned when
    /// `p` was released; when `p` failed, `later` fails with it (nothing of
    /// it reached storage) and `Err` says whether the loop goes on.
    fn settle_with_later(
        &mut self,
        p: Pending,
        later: Executed<Reply>,
        done_rx: &std::sync::mpsc::Receiver<Result<Durable, CommitError>>,
    ) -> Result<Executed<Reply>, bool> {
        match wait_commit(&p, done_rx) {
            Ok(d) => {
                let c = self.node.release(p.held, d);
                self.committed(c, p.info);
                Ok(later)
            }
            Err(e) => {
                let f = self
                    .node
                    .fail_in_flight(Failure::Storage(e.error), vec![p.held, later.held]);
                Err(self.failed(f))
            }
        }
    }

    /// Hands an executed batch to the commit thread (nothing in flight
    /// before it). An empty batch has nothing to write, and with `now` set
    /// the next batch waits for this one anyway: committed on this thread
    /// and released at once.
    fn launch(
        &mut self,
        ex: Executed<Reply>,
        info: BatchInfo,
        batch_tx: &std::sync::mpsc::SyncSender<InFlight>,
        now: bool,
    ) -> Launched {
        debug_assert_eq!(
            self.node.in_flight(),
            1,
            "launch with an earlier batch in flight"
        );
        let Executed { batch, held } = ex;
        if batch.batch.is_empty() || now {
            match commit_batch(&mut self.storage, batch) {
                Ok(d) => {
                    let c = self.node.release(held, d);
                    self.committed(c, info);
                    return Launched::Released;
                }
                Err(e) => {
                    let f = self
                        .node
                        .fail_in_flight(Failure::Storage(e.error), vec![held]);
                    return Launched::Failed(f);
                }
            }
        }
        match batch_tx.send(batch) {
            Ok(()) => Launched::InFlight(Pending { held, info }),
            Err(_) => {
                let error = StorageError("the commit thread stopped".into());
                Launched::Failed(
                    self.node
                        .fail_in_flight(Failure::Storage(error), vec![held]),
                )
            }
        }
    }

    /// A batch is durable: answer, publish, send.
    fn committed(&mut self, c: Committed<Reply>, info: BatchInfo) {
        let (shared, transport) = (self.shared, self.transport);
        for (peer, _) in &c.disconnect {
            // Drop the connection; the supervisor dials again with backoff.
            transport.reconnect(*peer, "protocol violation");
        }
        self.scrub_due |= info.erased;
        publish(shared, self.node.engine(), &c.batch.rows);
        if let Some(d) = c.hello_digest {
            transport.set_hello_digest(Some(d));
        }
        for (tx, r) in c.replies {
            let _ = tx.send(r);
        }
        if info.n_frames_in > 0 || !c.frames.is_empty() {
            tracing::debug!(
                ops = info.n_ops,
                frames_in = info.n_frames_in,
                peer_events = info.n_peer_events,
                next_sync_bytes = self.pace.bytes_max(),
                frames_out = c.frames.len(),
                docs_written = c.batch.docs.len(),
                took_us = info.started.elapsed().as_micros() as u64,
                commit_us = shared.metrics.commit_us_last.load(Ordering::Relaxed),
                "engine batch with sync traffic"
            );
        }
        send_frames(transport, c.frames);
        for peer in c.revoke {
            transport.revoke(peer);
        }
        let _ = self.wake.send(c.next_wake_ms);
    }

    /// A batch failed (nothing of it, nor of any later one, was released):
    /// answer the errors and reopen the engine from the store. `false`: it
    /// could not be reopened; the loop stops.
    fn failed(&mut self, f: Failed<Reply>) -> bool {
        let (shared, transport) = (self.shared, self.transport);
        for (peer, _) in &f.disconnect {
            transport.reconnect(*peer, "protocol violation");
        }
        match &f.cause {
            Failure::Storage(e) => {
                tracing::error!(error = %e, "commit failed; reloading documents from disk");
            }
            Failure::Panic { peer, what } => {
                let name = shared
                    .cfg
                    .peer_by_id(peer)
                    .map_or_else(|| peer.hex(), |p| p.name.clone());
                tracing::error!(peer = %name, panic = %what, "applying a peer's message panicked; blocking the peer and reloading documents from disk");
                transport.set_blocked(*peer, true);
                let mut fault = shared.fault.write().unwrap_or_else(|p| p.into_inner());
                *fault = Some(format!(
                    "a message from peer {name} made the engine fail ({what}); the peer is blocked until this node restarts"
                ));
            }
        }
        for (tx, r) in f.replies {
            let _ = tx.send(r);
        }
        // The in-memory documents may hold changes that never reached disk.
        match open_engine(&shared.cfg, shared.node_id, self.store, self.key_der) {
            Ok(e) => {
                self.node
                    .replace_engine(e, &mut self.storage, shared.now_ms());
                transport.set_hello_digest(self.node.hello_digest());
                let _ = self.wake.send(self.node.next_wake_ms());
                true
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot reload documents; stopping the engine");
                false
            }
        }
    }
}

/// What became of an executed batch handed on.
enum Launched {
    /// Empty: released at once.
    Released,
    /// On the commit thread.
    InFlight(Pending),
    /// Its commit failed (or the commit thread is gone).
    Failed(Failed<Reply>),
}

/// The commit thread's answer for `p` (a stopped thread is a failed commit).
fn wait_commit(
    p: &Pending,
    done_rx: &std::sync::mpsc::Receiver<Result<Durable, CommitError>>,
) -> Result<Durable, CommitError> {
    let done = done_rx.recv().unwrap_or_else(|_| {
        Err(CommitError {
            number: p.held.number(),
            error: StorageError("the commit thread stopped".into()),
        })
    });
    if let Err(e) = &done {
        debug_assert_eq!(e.number, p.held.number(), "commit answers out of order");
    }
    done
}
