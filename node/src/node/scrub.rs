//! The rewrite of the data file after a customer erasure, scheduled by the
//! engine loop ([`super::engine_loop`]) at most every [`super::SCRUB_INTERVAL`].

use std::time::Instant;

use anyhow::Context;
use tokio::sync::mpsc;

#[cfg(feature = "failpoints")]
use super::failpoints;
use crate::state::Cmd;
use crate::store::Store;

/// A rewrite of the data file in progress (after a customer erasure, so that
/// the erased key's bytes leave the file's freed pages). The engine thread
/// takes a snapshot ([`Store::scrub_begin`]), a thread of its own copies it
/// into a fresh file while the engine keeps answering and committing (the
/// store keeps those batches), and once the copy is done the engine thread
/// replays them into it and swaps the files ([`Store::scrub_finish`]): the
/// engine waits only for the replay and the swap, not for the copy.
pub(super) struct Scrub {
    thread: std::thread::JoinHandle<anyhow::Result<crate::store::ScrubCopy>>,
    started: Instant,
}

impl Scrub {
    pub(super) fn start(store: &Store, cmd: mpsc::Sender<Cmd>) -> anyhow::Result<Scrub> {
        let job = store.scrub_begin()?;
        let thread = std::thread::Builder::new()
            .name("scrub".into())
            .spawn(move || {
                #[cfg(feature = "failpoints")]
                failpoints::scrub_gate();
                let r = job.copy();
                // A wake-up only: with a full queue the engine is busy and
                // looks after its next batch anyway.
                let _ = cmd.try_send(Cmd::ScrubCopied);
                r
            });
        match thread {
            Ok(thread) => Ok(Scrub {
                thread,
                started: Instant::now(),
            }),
            Err(e) => {
                store.scrub_clear();
                Err(e).context("cannot start the thread that rewrites the data file")
            }
        }
    }

    /// Finishes the rewrite if its copy is done: `Ok(another_due)`, else
    /// the rewrite back.
    pub(super) fn finish_if_copied(self, store: &Store) -> Result<bool, Scrub> {
        if !self.thread.is_finished() {
            return Err(self);
        }
        let copied = self.started.elapsed();
        let copy = match self.thread.join() {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                store.scrub_clear();
                tracing::error!(error = %format!("{e:#}"), "cannot copy the data file after an erasure; trying again later");
                return Ok(true);
            }
            Err(_) => {
                store.scrub_clear();
                tracing::error!("the copy of the data file panicked; trying again later");
                return Ok(true);
            }
        };
        let t = Instant::now();
        match store.scrub_finish(copy) {
            Ok(crate::store::ScrubOutcome::Done {
                replayed,
                erased_meanwhile,
            }) => {
                tracing::info!(
                    copy_ms = copied.as_millis() as u64,
                    swap_ms = t.elapsed().as_millis() as u64,
                    replayed,
                    "data file rewritten after a customer erasure"
                );
                #[cfg(feature = "failpoints")]
                failpoints::scrub_done();
                Ok(erased_meanwhile)
            }
            Ok(crate::store::ScrubOutcome::Abandoned(why)) => {
                tracing::warn!(reason = %why, "rewrite of the data file given up; trying again later");
                Ok(true)
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot rewrite the data file after an erasure; trying again later");
                Ok(true)
            }
        }
    }

    /// Stops the copy (shutdown): the snapshot must not outlive the store.
    pub(super) fn cancel(self, store: &Store) {
        store.scrub_abandon("the node is stopping");
        #[cfg(feature = "failpoints")]
        failpoints::release_scrub();
        let _ = self.thread.join();
        store.scrub_clear();
    }
}
