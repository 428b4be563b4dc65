//! Connection arbitration as pure functions: which of two connections between a
//! pair of nodes survives, and when a peer's supervisor dials again. No IO, no
//! clock, no randomness: the callers pass the facts (node ids, who dialled,
//! process nonces, how long a connection lived, a jitter factor) and act on the
//! answer, so both sides of a pair reach the same decision from the same facts
//! and the same facts always give the same decision.
//!
//! The node's transport (`node/src/transport/conn.rs`) runs them on every
//! connection and dial; the simulator (`sim/src/world.rs` `connect_pairs`)
//! runs `arbitrate` on both sides whenever two nodes dial each other at once.

use std::time::Duration;

use crate::ids::NodeId;

/// A connection that lived this long was healthy: dial again at once and
/// with the shortest back-off after it ends.
pub const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// The bounds of the jitter factor that scales a back-off delay: a delay is
/// drawn from half to all of the current back-off, so that peers that lost
/// each other at the same moment do not dial in lock step.
pub const JITTER_MIN: f64 = 0.5;
pub const JITTER_MAX: f64 = 1.0;

/// One side of a conflict: a connection as this node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnFacts {
    /// This node dialled it (else the peer did).
    pub dialed_by_us: bool,
    /// The process nonce the peer's hello carried on it.
    pub nonce: u64,
}

/// What to do with a new connection to a peer that already has a live one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arbitration {
    /// The peer's process changed (another nonce): find out whether the live
    /// connection still answers before choosing (a restart or a clone).
    Probe,
    /// Keep the live connection; close the new one as a duplicate.
    KeepLive,
    /// The new connection replaces the live one.
    Replace,
}

/// Which of two connections between this node (`our_id`) and `peer` wins,
/// when `candidate` arrives while `live` is registered.
///
/// Same process on the other side (same nonce): a connection dialled by the
/// same side as the live one replaces it, since that side dials only when it
/// has given the old one up; otherwise the one dialled by the lower node id
/// wins, on both sides.
pub fn arbitrate(
    our_id: NodeId,
    peer: NodeId,
    live: ConnFacts,
    candidate: ConnFacts,
) -> Arbitration {
    if live.nonce != candidate.nonce {
        return Arbitration::Probe;
    }
    let same_dialer = live.dialed_by_us == candidate.dialed_by_us;
    let candidate_dialer_is_lower = if candidate.dialed_by_us {
        our_id < peer
    } else {
        peer < our_id
    };
    if !same_dialer && !candidate_dialer_is_lower {
        Arbitration::KeepLive
    } else {
        Arbitration::Replace
    }
}

/// Exponential back-off between dials to one peer, from `min` doubling up to
/// `max`, each wait scaled by a jitter factor the caller draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    /// The back-off before jitter that the next failure waits.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// Back to the shortest back-off (the peer was blocked, or a healthy
    /// connection ended).
    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// A dial failed, or a connection died young: the wait before the next
    /// dial (`current` scaled by `jitter`, clamped to
    /// [`JITTER_MIN`]..=[`JITTER_MAX`]); the back-off after it doubles, up to `max`.
    pub fn fail(&mut self, jitter: f64) -> Duration {
        let wait = self.current.mul_f64(jitter.clamp(JITTER_MIN, JITTER_MAX));
        self.current = (self.current * 2).min(self.max);
        wait
    }

    /// A dial got no answer; the peer has not answered for `silent_for`. The
    /// wait before the next dial: the back-off grows as after a failure, but while
    /// `silent_for` is under `window` the wait is at most `cap` (scaled by the
    /// same jitter, so two sides that lost each other do not dial in lock step).
    pub fn unanswered(
        &mut self,
        silent_for: Duration,
        window: Duration,
        cap: Duration,
        jitter: f64,
    ) -> Duration {
        let wait = self.fail(jitter);
        if silent_for < window {
            wait.min(cap.mul_f64(jitter.clamp(JITTER_MIN, JITTER_MAX)))
        } else {
            wait
        }
    }

    /// A connection that was up for `lived` ended: the wait before dialling
    /// again (zero after a stable connection, which also resets the back-off).
    pub fn connection_ended(&mut self, lived: Duration, jitter: f64) -> Duration {
        if lived >= STABLE_CONNECTION {
            self.reset();
            Duration::ZERO
        } else {
            // A connection that died young: do not hammer the peer.
            self.fail(jitter)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(byte: u8) -> NodeId {
        NodeId::parse(&format!("{byte:02x}").repeat(32)).unwrap()
    }

    fn ids() -> impl Strategy<Value = (NodeId, NodeId)> {
        (any::<u8>(), any::<u8>())
            .prop_filter("two distinct nodes", |(a, b)| a != b)
            .prop_map(|(a, b)| (id(a), id(b)))
    }

    /// A connection dialled by `dialer`, as node `viewer` sees it.
    fn seen_by(viewer: NodeId, dialer: NodeId, nonce: u64) -> ConnFacts {
        ConnFacts {
            dialed_by_us: viewer == dialer,
            nonce,
        }
    }

    /// The dialer of the connection that survives at `viewer` (whose peer is
    /// `other`) when the one dialled by `second` arrives while the one
    /// dialled by `first` is live.
    fn survivor(viewer: NodeId, other: NodeId, first: NodeId, second: NodeId) -> NodeId {
        let live = seen_by(viewer, first, 7);
        let candidate = seen_by(viewer, second, 7);
        match arbitrate(viewer, other, live, candidate) {
            Arbitration::KeepLive => first,
            Arbitration::Replace => second,
            Arbitration::Probe => panic!("same nonce must not probe"),
        }
    }

    proptest! {
        /// Both dial at once and each registers its own dial first: both keep
        /// the connection dialled by the lower node id.
        #[test]
        fn crossing_dials_leave_the_same_connection_on_both_sides((a, b) in ids()) {
            let at_a = survivor(a, b, a, b);
            let at_b = survivor(b, a, b, a);
            prop_assert_eq!(at_a, at_b);
            prop_assert_eq!(at_a, a.min(b));
        }

        /// Both sides see the two connections in the same order: they agree too.
        #[test]
        fn the_same_order_on_both_sides_gives_the_same_survivor(
            (a, b) in ids(),
            a_dials_first in any::<bool>(),
        ) {
            let (first, second) = if a_dials_first { (a, b) } else { (b, a) };
            prop_assert_eq!(survivor(a, b, first, second), survivor(b, a, first, second));
        }

        /// A redial by the side that dialled the live connection replaces it,
        /// whoever has the lower id.
        #[test]
        fn a_redial_by_the_same_side_replaces_the_live_connection(
            (a, b) in ids(),
            dialer_is_a in any::<bool>(),
            nonce in any::<u64>(),
        ) {
            let dialer = if dialer_is_a { a } else { b };
            for (viewer, other) in [(a, b), (b, a)] {
                let c = seen_by(viewer, dialer, nonce);
                prop_assert_eq!(arbitrate(viewer, other, c, c), Arbitration::Replace);
            }
        }

        /// Another process nonce is never decided blind, whoever dialled.
        #[test]
        fn another_process_nonce_is_probed(
            (a, b) in ids(),
            live_by_us in any::<bool>(),
            cand_by_us in any::<bool>(),
            n1 in any::<u64>(),
            n2 in any::<u64>(),
        ) {
            prop_assume!(n1 != n2);
            let live = ConnFacts { dialed_by_us: live_by_us, nonce: n1 };
            let candidate = ConnFacts { dialed_by_us: cand_by_us, nonce: n2 };
            prop_assert_eq!(arbitrate(a, b, live, candidate), Arbitration::Probe);
        }

        /// The same facts give the same decision, and a back-off never goes
        /// below half the minimum or above the maximum, and never shrinks
        /// without a reset.
        #[test]
        fn backoff_is_deterministic_bounded_and_monotone(
            min_ms in 1u64..1_000,
            extra_ms in 0u64..60_000,
            jitters in proptest::collection::vec(0.0f64..2.0, 1..40),
        ) {
            let min = Duration::from_millis(min_ms);
            let max = min + Duration::from_millis(extra_ms);
            let mut one = Backoff::new(min, max);
            let mut two = Backoff::new(min, max);
            let mut before = one.current();
            for j in jitters {
                let wait = one.fail(j);
                prop_assert_eq!(wait, two.fail(j));
                prop_assert!(wait >= min.mul_f64(JITTER_MIN) && wait <= max);
                prop_assert!(one.current() >= before && one.current() <= max);
                before = one.current();
            }
        }
    }

    #[test]
    fn backoff_doubles_to_its_maximum_and_resets_after_a_stable_connection() {
        let min = Duration::from_millis(250);
        let max = Duration::from_secs(15);
        let mut b = Backoff::new(min, max);
        let waits: Vec<Duration> = (0..8).map(|_| b.fail(JITTER_MAX)).collect();
        assert_eq!(
            waits,
            [250, 500, 1000, 2000, 4000, 8000, 15000, 15000].map(Duration::from_millis)
        );
        // A young connection keeps backing off; a stable one starts afresh.
        assert_eq!(
            b.connection_ended(Duration::from_secs(1), JITTER_MIN),
            max / 2
        );
        assert_eq!(
            b.connection_ended(STABLE_CONNECTION, JITTER_MIN),
            Duration::ZERO
        );
        assert_eq!(b.current(), min);
        assert_eq!(b.fail(JITTER_MIN), min / 2);
    }

    #[test]
    fn unanswered_dials_restart_at_the_capped_interval_only_inside_the_window() {
        let min = Duration::from_millis(200);
        let max = Duration::from_secs(10);
        let cap = Duration::from_millis(250);
        let window = Duration::from_secs(600);
        let mut b = Backoff::new(min, max);
        let inside: Vec<Duration> = (0..6)
            .map(|_| b.unanswered(Duration::from_secs(1), window, cap, JITTER_MAX))
            .collect();
        assert_eq!(
            inside,
            [200, 250, 250, 250, 250, 250].map(Duration::from_millis)
        );
        // The back-off itself kept growing: past the window it applies.
        assert_eq!(
            b.unanswered(window, window, cap, JITTER_MAX),
            Duration::from_secs(10)
        );
        // Jitter scales the capped wait too (never below half the cap).
        assert_eq!(
            b.unanswered(Duration::ZERO, window, cap, JITTER_MIN),
            cap / 2
        );
        // A failure with an answer still gets the full back-off.
        assert_eq!(b.fail(JITTER_MAX), max);
    }
}
