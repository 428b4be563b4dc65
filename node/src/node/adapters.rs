//! The engine loop's adapters to the world: the redb store as the step's
//! [`Storage`], the wake timer, committed frames to the transport, and
//! committed state to HTTP readers and the metrics.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use storemesh_protocol::engine::Engine;
use storemesh_protocol::ids::NodeId;
use storemesh_protocol::ops::IdemRecord;
use storemesh_protocol::step::{Storage, StorageError};
use storemesh_protocol::views::StockRow;
use tokio::sync::mpsc;

use super::{WAKE_IDLE, WAKE_MIN_MS};
use crate::state::{Cmd, Metrics, Shared};
use crate::store::Store;
use crate::transport::Transport;

/// The redb store as the loop's storage (commit times go to the metrics).
pub(super) struct NodeStorage<'a> {
    pub(super) store: &'a Store,
    pub(super) metrics: &'a Metrics,
    /// Time of the last commit (logged with batches that carry sync traffic).
    pub(super) commit_us: u64,
}

impl Storage for NodeStorage<'_> {
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

    fn commit(&mut self, batch: &storemesh_protocol::Batch) -> Result<(), StorageError> {
        let t = Instant::now();
        let r = self.store.commit(batch);
        let us = t.elapsed().as_micros() as u64;
        self.commit_us = us;
        let m = self.metrics;
        m.commits.fetch_add(1, Ordering::Relaxed);
        m.commit_us_total.fetch_add(us, Ordering::Relaxed);
        m.commit_us_last.store(us, Ordering::Relaxed);
        r.map_err(|e| {
            m.commit_failures.fetch_add(1, Ordering::Relaxed);
            StorageError(format!("{e:#}"))
        })
    }
}

/// Sends `Cmd::Wake` when the loop asked to be woken (`Committed::next_wake_ms`,
/// node clock): a parked sale's deadline or a reservation's expiry.
pub(super) async fn wake_timer(
    shared: Arc<Shared>,
    mut next: tokio::sync::watch::Receiver<Option<u64>>,
    wake_tx: mpsc::Sender<Cmd>,
) {
    loop {
        let at = *next.borrow_and_update();
        let sleep = match at {
            Some(at) => {
                let ms = at.saturating_sub(shared.now_ms()).max(WAKE_MIN_MS);
                tokio::time::sleep(Duration::from_millis(ms))
            }
            // Nothing to wake for: wait for the next change only.
            None => tokio::time::sleep(WAKE_IDLE),
        };
        tokio::select! {
            changed = next.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = sleep => {
                if at.is_none() {
                    continue;
                }
                // A full queue means the engine is busy and will look anyway.
                if let Err(mpsc::error::TrySendError::Closed(_)) = wake_tx.try_send(Cmd::Wake) {
                    break;
                }
                // Wait for the engine's next answer before sleeping again.
                if next.changed().await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Hands committed frames to the transport. A lost sync frame would leave the
/// peer's session waiting (or a split message corrupt): a peer whose queue is
/// full is reconnected and gets nothing more of this batch.
pub(super) fn send_frames(transport: &Transport, frames: Vec<(NodeId, Vec<u8>)>) {
    let mut overflowed: Vec<NodeId> = Vec::new();
    for (peer, frame) in frames {
        if overflowed.contains(&peer) {
            continue;
        }
        match transport.send(peer, frame) {
            Ok(()) => {}
            Err(crate::transport::SendError::QueueFull) => {
                tracing::warn!(peer = %peer.hex(), "outbound queue full; reconnecting the peer");
                overflowed.push(peer);
                transport.reconnect(peer, "outbound queue full");
            }
            Err(e) => {
                tracing::debug!(peer = %peer.hex(), error = %e, "frame not sent; the peer is gone")
            }
        }
    }
}

/// Publishes committed rows and derived state to HTTP readers.
pub(super) fn publish(shared: &Shared, engine: &Engine, rows: &[((u64, String), StockRow)]) {
    let mut r = shared.read.write().unwrap_or_else(|p| p.into_inner());
    let mut events = Vec::with_capacity(rows.len());
    for ((p, l), row) in rows {
        r.set_row(*p, l, *row);
        events.push((*p, l.clone(), *row));
    }
    if !events.is_empty() {
        let _ = shared.changes.send(events);
    }
    r.locations = engine
        .views
        .nodes()
        .values()
        .filter_map(|i| {
            let tz = i.timezone.clone().unwrap_or_else(|| "UTC".into());
            i.location
                .clone()
                .map(|l| (l, (i.name.clone(), i.policy.clone(), tz)))
        })
        .collect();
    r.last_heard = engine.last_heard_by_location();
    r.synced = r.synced || engine.synced_with_any() || shared.cfg.peers.is_empty();
    r.as_of_ms = shared.now_ms();
}

pub(super) fn sync_stats(shared: &Shared, engine: &Engine) {
    let s = &engine.stats;
    let m = &shared.metrics;
    m.ops_ok.store(s.ops_ok, Ordering::Relaxed);
    m.ops_refused.store(s.ops_refused, Ordering::Relaxed);
    m.sync_messages_in
        .store(s.sync_messages_in, Ordering::Relaxed);
    m.sync_messages_out
        .store(s.sync_messages_out, Ordering::Relaxed);
    m.sync_bytes_in.store(s.sync_bytes_in, Ordering::Relaxed);
    m.sync_bytes_out.store(s.sync_bytes_out, Ordering::Relaxed);
    for (a, v) in m
        .sync_bytes_out_by_kind
        .iter()
        .zip(s.sync_bytes_out_by_kind)
    {
        a.store(v, Ordering::Relaxed);
    }
    m.rejected_messages
        .store(s.rejected_messages, Ordering::Relaxed);
    m.forks_detected.store(s.forks_detected, Ordering::Relaxed);
    m.epochs_started.store(s.epochs_started, Ordering::Relaxed);
    m.epochs_joined.store(s.epochs_joined, Ordering::Relaxed);
    let (cold, cold_bytes) = engine.cold_parts();
    m.cold_parts.store(cold as u64, Ordering::Relaxed);
    let certs = engine.cert_figures();
    m.certs_held.store(certs.held as u64, Ordering::Relaxed);
    m.certs_held_bytes
        .store(certs.held_bytes as u64, Ordering::Relaxed);
    m.certs_verified.store(s.certs_verified, Ordering::Relaxed);
    m.cold_part_bytes
        .store(cold_bytes as u64, Ordering::Relaxed);
    let (requests, grants) = engine.rebalance_stats();
    m.rebalance_requests.store(requests, Ordering::Relaxed);
    m.rebalance_grants.store(grants, Ordering::Relaxed);
    m.allocation_grants
        .store(engine.allocation_grants(), Ordering::Relaxed);
    let mut peers = shared.peers.write().unwrap_or_else(|p| p.into_inner());
    for (id, st) in peers.iter_mut() {
        match engine.session(id) {
            Some(sess) => {
                st.connected = true;
                st.synced = sess.synced;
                st.last_sync_ms = sess.last_heard_ms;
                st.bytes_in = sess.bytes_in;
                st.bytes_out = sess.bytes_out;
            }
            None => st.connected = false,
        }
    }
}
