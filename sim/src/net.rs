//! The simulated network: one ordered, reliable link per direction of every
//! connected peer pair (the real transport is one QUIC stream per pair).
//!
//! "Loss" on such a link is a connection reset: every frame in flight is
//! dropped and both ends see the peer go down. A blocked direction (partition)
//! stalls its link — nothing sent after the first dropped frame is delivered,
//! as on a QUIC stream that cannot retransmit — until the connection is reset.
//! Latency is random per frame but never reorders a link; frames of different
//! links to one node interleave freely.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use storemesh_protocol::ids::NodeId;

/// A network event as the node's engine loop sees it.
#[derive(Debug)]
pub enum NetEv {
    Up {
        peer: NodeId,
        from: usize,
        conn: u64,
        /// What the peer's hello says about its committed state.
        digest: Option<storemesh_protocol::wire::HelloDigest>,
    },
    Down {
        peer: NodeId,
        conn: u64,
    },
    Frame {
        peer: NodeId,
        conn: u64,
        bytes: Vec<u8>,
    },
}

pub struct Frame {
    pub deliver_at_ms: u64,
    pub sent_at_ms: u64,
    pub bytes: Vec<u8>,
}

pub struct Link {
    pub conn: u64,
    pub queue: VecDeque<Frame>,
    /// Delivery time of the last frame queued: a link never reorders.
    pub last_at_ms: u64,
    /// A frame was dropped: nothing more is delivered on this connection.
    pub stalled: bool,
    pub spike_until_ms: u64,
    pub spike_ms: u64,
}

#[derive(Default)]
pub struct Net {
    /// Peer pairs of the topology (i < j), by simulator node index.
    pub peers: BTreeSet<(usize, usize)>,
    /// Live connections (i < j) → connection id.
    pub conns: BTreeMap<(usize, usize), u64>,
    /// Directed links of live connections.
    pub links: BTreeMap<(usize, usize), Link>,
    /// Blocked directions, counted (overlapping partitions).
    pub blocked: BTreeMap<(usize, usize), u32>,
    /// Earliest time a pair may (re)connect.
    pub reconnect_at_ms: BTreeMap<(usize, usize), u64>,
    pub next_conn: u64,
    pub latency_ms: (u64, u64),
    /// Bytes and frames sent, per sending node.
    pub bytes_out: Vec<u64>,
    pub frames_out: Vec<u64>,
    pub bytes_in: Vec<u64>,
    /// Per receiver: send time of the last frame delivered (reorder detection).
    pub last_sent_delivered: Vec<u64>,
}

pub fn pair(a: usize, b: usize) -> (usize, usize) {
    if a < b {
        (a, b)
    } else {
        (b, a)
    }
}

impl Net {
    pub fn ensure_node(&mut self, i: usize) {
        while self.bytes_out.len() <= i {
            self.bytes_out.push(0);
            self.frames_out.push(0);
            self.bytes_in.push(0);
            self.last_sent_delivered.push(0);
        }
    }

    pub fn is_blocked(&self, from: usize, to: usize) -> bool {
        self.blocked.get(&(from, to)).is_some_and(|n| *n > 0)
    }

    pub fn block(&mut self, from: usize, to: usize) {
        *self.blocked.entry((from, to)).or_default() += 1;
    }

    pub fn unblock(&mut self, from: usize, to: usize) {
        if let Some(n) = self.blocked.get_mut(&(from, to)) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.blocked.remove(&(from, to));
            }
        }
    }

    pub fn connected(&self, a: usize, b: usize) -> Option<u64> {
        self.conns.get(&pair(a, b)).copied()
    }

    /// Opens a connection; returns its id.
    pub fn open(&mut self, a: usize, b: usize) -> u64 {
        self.next_conn += 1;
        let conn = self.next_conn;
        self.conns.insert(pair(a, b), conn);
        for (x, y) in [(a, b), (b, a)] {
            self.links.insert(
                (x, y),
                Link {
                    conn,
                    queue: VecDeque::new(),
                    last_at_ms: 0,
                    stalled: false,
                    spike_until_ms: 0,
                    spike_ms: 0,
                },
            );
        }
        conn
    }

    /// Closes a connection, dropping everything in flight. Returns its id.
    pub fn close(&mut self, a: usize, b: usize) -> Option<u64> {
        let conn = self.conns.remove(&pair(a, b))?;
        self.links.remove(&(a, b));
        self.links.remove(&(b, a));
        Some(conn)
    }

    /// Queues a frame. Returns `true` when the frame was dropped because the
    /// direction is blocked and the link just stalled (the caller schedules the
    /// reset the transport's idle timeout would cause).
    pub fn send(
        &mut self,
        from: usize,
        to: usize,
        bytes: Vec<u8>,
        now_ms: u64,
        jitter: u64,
    ) -> bool {
        self.ensure_node(from.max(to));
        let blocked = self.is_blocked(from, to);
        let Some(link) = self.links.get_mut(&(from, to)) else {
            return false;
        };
        self.bytes_out[from] += bytes.len() as u64;
        self.frames_out[from] += 1;
        if link.stalled {
            return false;
        }
        if blocked {
            link.stalled = true;
            link.queue.clear();
            return true;
        }
        let (lo, hi) = self.latency_ms;
        let mut lat = lo + jitter % (hi - lo + 1);
        if now_ms < link.spike_until_ms {
            lat += link.spike_ms;
        }
        let at = (now_ms + lat.max(1)).max(link.last_at_ms);
        link.last_at_ms = at;
        link.queue.push_back(Frame {
            deliver_at_ms: at,
            sent_at_ms: now_ms,
            bytes,
        });
        false
    }

    /// Frames due by `now_ms`: (from, to, conn, frame), link by link in order.
    pub fn due(&mut self, now_ms: u64) -> Vec<(usize, usize, u64, Frame)> {
        let mut out = Vec::new();
        for (&(from, to), link) in self.links.iter_mut() {
            while link
                .queue
                .front()
                .is_some_and(|f| f.deliver_at_ms <= now_ms)
            {
                if let Some(f) = link.queue.pop_front() {
                    out.push((from, to, link.conn, f));
                }
            }
        }
        // Delivery order across links: by delivery time, then by link.
        out.sort_by_key(|(from, to, _, f)| (f.deliver_at_ms, *from, *to));
        out
    }

    pub fn in_flight(&self) -> usize {
        self.links.values().map(|l| l.queue.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_never_reorders_and_a_blocked_link_stalls_until_reset() {
        let mut net = Net {
            latency_ms: (1, 50),
            ..Net::default()
        };
        net.ensure_node(2);
        net.open(0, 1);
        // Random latencies, yet delivery keeps the sending order.
        for (i, jitter) in [40u64, 0, 25, 3, 49, 1].into_iter().enumerate() {
            assert!(!net.send(0, 1, vec![i as u8], 100 + i as u64, jitter));
        }
        let got: Vec<u8> = net
            .due(10_000)
            .into_iter()
            .map(|(_, _, _, f)| f.bytes[0])
            .collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4, 5]);
        // One dropped frame stalls the direction for good; the other still works.
        net.block(0, 1);
        assert!(
            net.send(0, 1, vec![9], 200, 0),
            "the first drop asks for a reset"
        );
        net.unblock(0, 1);
        assert!(!net.send(0, 1, vec![10], 201, 0));
        assert!(!net.send(1, 0, vec![11], 201, 0));
        let got: Vec<(usize, u8)> = net
            .due(10_000)
            .into_iter()
            .map(|(from, _, _, f)| (from, f.bytes[0]))
            .collect();
        assert_eq!(got, vec![(1, 11)]);
        // A reset drops the connection and everything in flight.
        assert!(!net.send(1, 0, vec![12], 300, 0));
        assert!(net.close(0, 1).is_some());
        assert_eq!(net.in_flight(), 0);
        assert!(net.connected(0, 1).is_none());
    }
}
