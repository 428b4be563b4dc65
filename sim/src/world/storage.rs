//! The loop's storage in the simulator: the production `Store` over a
//! node's `SimDisk`, with the planned crashes and failures it strikes.

use storemesh_protocol::engine::Batch;
use storemesh_protocol::ids::NodeId;
use storemesh_protocol::ops::IdemRecord;
use storemesh_protocol::step::{Storage, StorageError};
use storemesh_store::simdisk::SimDisk;
use storemesh_store::store::Store;

use super::CrashPlan;
use crate::options::Bug;

/// The production `Store` (over the node's `SimDisk`) as the loop's storage;
/// a planned crash or failure strikes the commit it is armed for.
pub(super) struct SimStorage<'a> {
    store: &'a Store,
    disk: SimDisk,
    bug: Option<Bug>,
    plan: Option<CrashPlan>,
    /// Whether a commit came (and with it the planned fault).
    pub(super) used: bool,
}

impl<'a> SimStorage<'a> {
    pub(super) fn new(
        store: &'a Store,
        disk: SimDisk,
        bug: Option<Bug>,
        plan: Option<CrashPlan>,
    ) -> Self {
        SimStorage {
            store,
            disk,
            bug,
            plan,
            used: false,
        }
    }
}

impl Storage for SimStorage<'_> {
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

    fn commit(&mut self, batch: &Batch) -> Result<(), StorageError> {
        let plan = if self.used { None } else { self.plan };
        self.used = true;
        let disk = &self.disk;
        match plan {
            Some(CrashPlan::BeforeCommit) => disk.crash(),
            Some(CrashPlan::MidCommit(n)) => disk.crash_after_ios(n),
            Some(CrashPlan::FailSync) => disk.fail_next_syncs(1),
            _ => {}
        }
        let result = commit_store(self.store, self.bug, batch);
        if !disk.is_crashed() {
            // A planned fault that did not strike this commit is disarmed: it
            // must not hit the reopen path or a later, unrelated batch.
            match plan {
                Some(CrashPlan::MidCommit(_)) => disk.crash_after_ios(u64::MAX),
                Some(CrashPlan::FailSync) => disk.fail_next_syncs(0),
                _ => {}
            }
        }
        result.map_err(|e| StorageError(format!("{e:#}")))
    }
}

/// `Store::commit` of the batch — or, with the planted bug, the batch and
/// its idempotency records in two transactions.
fn commit_store(store: &Store, bug: Option<Bug>, batch: &Batch) -> anyhow::Result<()> {
    if bug == Some(Bug::IdemOutsideTxn) && !batch.idem.is_empty() {
        let mut main = batch.clone();
        let idem = std::mem::take(&mut main.idem);
        store.commit(&main)?;
        return store.commit(&Batch {
            idem,
            ..Batch::default()
        });
    }
    store.commit(batch)
}
