//! The transport state shared by its tasks: locking, peer status, events to
//! the owner and the reporting of refused connections.

use std::net::SocketAddr;
use std::sync::MutexGuard;

use quinn::{Connection, ConnectionError, VarInt};
use storemesh_protocol::ids::NodeId;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, warn};

use super::tls::{rejected_key, OWN_KEY_MARKER, UNKNOWN_KEY_MARKER};
use super::*;

impl Inner {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn status(&self, peer: NodeId) -> PeerStatus {
        let st = self.lock();
        // Without an event receiver nobody can use a connection: stop dialing.
        if st.shutting_down || self.events.is_closed() {
            return PeerStatus::Shutdown;
        }
        match st.peers.get(&peer) {
            None => PeerStatus::Shutdown,
            Some(slot) if slot.refused() => PeerStatus::Blocked,
            Some(slot) => match &slot.live {
                Some(live) => PeerStatus::Connected(live.since),
                None => PeerStatus::Idle,
            },
        }
    }

    pub(super) fn peer_name(&self, peer: NodeId) -> String {
        self.lock()
            .peers
            .get(&peer)
            .map(|s| s.name.clone())
            .unwrap_or_default()
    }

    pub(super) async fn emit(&self, event: TransportEvent) {
        if self.events.send(event).await.is_err() {
            debug!("transport event receiver is gone");
        }
    }

    /// Refusals may be provoked from outside: never wait for the consumer.
    pub(super) fn emit_refused(&self, addr: SocketAddr, node_id: Option<NodeId>, reason: String) {
        let event = TransportEvent::Refused {
            addr,
            node_id: node_id.map(|id| id.hex()),
            reason,
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(event) {
            debug!(%addr, "event queue full; dropped a Refused event");
        }
    }

    /// Rate limit for warnings that remote parties can provoke.
    pub(super) fn may_log_refusal(&self) -> bool {
        let mut g = self.refused_log.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(g.0) >= REFUSED_LOG_WINDOW {
            *g = (now, 0);
        }
        g.1 += 1;
        g.1 <= REFUSED_LOGS_PER_WINDOW
    }

    /// A handshake that failed before any hello: report keys our verifier rejected
    /// and keys the peer rejected.
    pub(super) fn handshake_failed(&self, addr: SocketAddr, e: &ConnectionError) {
        match e {
            ConnectionError::TransportError(te) => {
                if let Some(id) = rejected_key(&te.reason, UNKNOWN_KEY_MARKER) {
                    if self.may_log_refusal() {
                        warn!(node_id = %id, %addr, "refused a connection from an unknown key (not in the peer list)");
                    } else {
                        debug!(node_id = %id, %addr, "refused a connection from an unknown key");
                    }
                    self.emit_refused(addr, Some(id), "unknown key: not in the peer list".into());
                } else if let Some(id) = rejected_key(&te.reason, OWN_KEY_MARKER) {
                    if self.may_log_refusal() {
                        error!(node_id = %id, %addr, "a peer presented this node's own key (cloned identity?)");
                    }
                    self.emit_refused(
                        addr,
                        Some(id),
                        "peer presented this node's own key (cloned identity?)".into(),
                    );
                } else {
                    debug!(%addr, error = %te, "TLS handshake failed");
                }
            }
            ConnectionError::ConnectionClosed(close) if is_crypto_code(close.error_code) => {
                self.peer_rejected_our_certificate(addr, None);
            }
            other => debug!(%addr, error = %other, "QUIC handshake failed"),
        }
    }

    pub(super) fn peer_rejected_our_certificate(&self, addr: SocketAddr, peer: Option<NodeId>) {
        if self.may_log_refusal() {
            warn!(%addr, peer = ?peer, "peer rejected this node's certificate (is this node in its peer list?)");
        }
        self.emit_refused(
            addr,
            peer,
            "peer rejected this node's certificate (is this node in its peer list?)".into(),
        );
    }

    /// Our current hello frame.
    pub(super) fn hello_frame(&self) -> Vec<u8> {
        self.hello_frame
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Refuses a connection whose hello failed the check.
    pub(super) fn bad_hello(
        &self,
        conn: &Connection,
        addr: SocketAddr,
        peer: NodeId,
        reason: &str,
    ) {
        warn!(peer = %peer, %addr, reason, "refused a peer's hello");
        conn.close(
            VarInt::from_u32(CLOSE_BAD_HELLO),
            truncate(reason).as_bytes(),
        );
        self.emit_refused(addr, Some(peer), format!("bad hello: {reason}"));
    }

    /// Our dial was closed by the peer before its hello arrived: say why.
    pub(super) fn dial_rejected(
        &self,
        addr: SocketAddr,
        peer: NodeId,
        e: &ConnectionError,
    ) -> String {
        match e {
            ConnectionError::ApplicationClosed(c) => {
                let code = c.error_code.into_inner();
                let text = sanitize(&c.reason);
                match u32::try_from(code).unwrap_or(u32::MAX) {
                    CLOSE_DUPLICATE => "peer kept the other connection".into(),
                    CLOSE_BLOCKED => "peer blocks this node".into(),
                    CLOSE_SHUTDOWN => "peer is shutting down".into(),
                    CLOSE_CLONED => {
                        error!(
                            peer = %peer, %addr, node = %self.our_id,
                            "peer refused this node: it already has a live connection from node {} with another process nonce (is this identity running twice?)",
                            self.our_id
                        );
                        let reason = format!(
                            "peer already has a live connection from node {} with another process nonce (cloned identity?)",
                            self.our_id
                        );
                        self.emit_refused(addr, Some(peer), reason.clone());
                        reason
                    }
                    CLOSE_BAD_HELLO => {
                        warn!(peer = %peer, %addr, reason = %text, "peer refused this node's hello");
                        let reason = format!("peer refused our hello: {text}");
                        self.emit_refused(addr, Some(peer), reason.clone());
                        reason
                    }
                    _ => format!("closed by peer (code {code}): {text}"),
                }
            }
            ConnectionError::ConnectionClosed(c) if is_crypto_code(c.error_code) => {
                self.peer_rejected_our_certificate(addr, Some(peer));
                "peer rejected this node's certificate".into()
            }
            other => other.to_string(),
        }
    }
}

pub(super) fn is_crypto_code(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

pub(super) fn truncate(text: &str) -> String {
    text.chars().take(200).collect()
}

/// Peer-supplied text made safe for logs: printable, bounded.
pub(super) fn sanitize(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}
