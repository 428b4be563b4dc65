//! The simulated network as the nodes see it: which pairs may connect,
//! dialling (with crossing dials settled by production's arbitration),
//! resets, partitions, and frames in and out.

use std::collections::BTreeMap;

use rand::Rng;
use storemesh_protocol::ids::NodeId;

use super::{trace_printed, Action, Cmd, World, DETECT_MS, RECONNECT_MS};
use crate::invariant::Violation;
use crate::net::{pair, NetEv};
use crate::options::FaultKind;

impl World {
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

    pub(super) fn connect_pairs(&mut self) -> Result<(), Violation> {
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

    pub(super) fn deliver_frames(&mut self) {
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

    pub(super) fn send_frames(
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
