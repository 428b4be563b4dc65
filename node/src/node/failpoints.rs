//! Test-only fault injection (cargo feature `failpoints`, enabled by the
//! end-to-end tests only): makes applying a peer's next frame panic, as an
//! Automerge assertion on unforeseen input would, to show the node survives it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use storemesh_protocol::ids::NodeId;

static PANIC_ON_FRAME_FROM: Mutex<Option<NodeId>> = Mutex::new(None);

/// The next frame from `peer` (at any node of this process) panics.
pub fn panic_on_next_frame_from(peer: NodeId) {
    *PANIC_ON_FRAME_FROM
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(peer);
}

static SCRUB_HOLD: Mutex<bool> = Mutex::new(false);
static SCRUB_HELD: AtomicU64 = AtomicU64::new(0);
static SCRUB_DONE: AtomicU64 = AtomicU64::new(0);
static SCRUB_CV: Condvar = Condvar::new();

/// While on, a data-file rewrite that starts waits before its copy
/// (every node of this process), so a test can work during it.
pub fn hold_scrub(on: bool) {
    *SCRUB_HOLD.lock().unwrap_or_else(|p| p.into_inner()) = on;
    SCRUB_CV.notify_all();
}

/// Rewrites that reached the hold so far.
pub fn scrubs_held() -> u64 {
    SCRUB_HELD.load(Ordering::SeqCst)
}

/// Rewrites that swapped the file in so far.
pub fn scrubs_done() -> u64 {
    SCRUB_DONE.load(Ordering::SeqCst)
}

pub(crate) fn release_scrub() {
    hold_scrub(false);
}

pub(crate) fn scrub_gate() {
    let mut on = SCRUB_HOLD.lock().unwrap_or_else(|p| p.into_inner());
    if *on {
        SCRUB_HELD.fetch_add(1, Ordering::SeqCst);
    }
    while *on {
        on = SCRUB_CV.wait(on).unwrap_or_else(|p| p.into_inner());
    }
}

pub(crate) fn scrub_done() {
    SCRUB_DONE.fetch_add(1, Ordering::SeqCst);
}

pub(crate) fn on_frame(peer: NodeId) {
    let mut armed = PANIC_ON_FRAME_FROM
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if *armed == Some(peer) {
        *armed = None;
        drop(armed);
        panic!(
            "failpoint: applying a frame from peer {} panicked",
            peer.hex()
        );
    }
}
