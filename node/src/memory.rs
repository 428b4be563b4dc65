//! The allocator's side of bounded memory (issue 14).
//!
//! A store node allocates and frees without pause: request bodies, Automerge
//! transactions, a closed records part's snapshot when it is cooled, whole
//! documents read at a start. glibc's malloc keeps what is freed for reuse,
//! per thread arena, and raises its mmap threshold after each large free, so
//! that later large buffers come from the heap too. Measured on row 8 of the
//! benchmark report (a store node taking sales over HTTP, 1.3M sales):
//! the process held 238 MiB, of which `malloc_trim` gave back 85 MiB at once.
//! This module caps the arenas, fixes the mmap threshold (large buffers are
//! mapped and unmapped, never left in the heap), and returns free memory to
//! the system at a steady pace.

use std::time::{Duration, Instant};

/// Arenas glibc may create (its default is 8 per core): the engine thread
/// and the tokio workers share them.
const ARENA_MAX: i32 = 2;
/// Allocations from this size are their own mapping, returned on free. A
/// fixed value also stops glibc from raising the threshold on its own.
const MMAP_THRESHOLD_BYTES: i32 = 256 * 1024;
/// Free memory at the top of the heap above this is returned at once.
const TRIM_THRESHOLD_BYTES: i32 = 4 * 1024 * 1024;
/// How often free memory inside the heap is returned (`malloc_trim`).
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Sets the allocator's limits. Call once, first thing in `main`, before any
/// thread starts. Does nothing where the allocator is not glibc's.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's malloc parameters; called before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
    }
}

/// Returns free heap memory to the system; how long it took.
pub fn release_free_memory() -> Duration {
    let t = Instant::now();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe (it takes each arena's lock).
    unsafe {
        libc::malloc_trim(0);
    }
    t.elapsed()
}

/// Runs [`release_free_memory`] every [`TRIM_EVERY`] until the task is dropped.
pub async fn trim_periodically() {
    let mut iv = tokio::time::interval(TRIM_EVERY);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    iv.tick().await;
    loop {
        iv.tick().await;
        match tokio::task::spawn_blocking(release_free_memory).await {
            Ok(took) => tracing::debug!(took_us = took.as_micros() as u64, "free memory returned"),
            Err(_) => return,
        }
    }
}
