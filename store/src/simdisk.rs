//! A simulated disk for redb: a [`redb::StorageBackend`] that keeps what was
//! *written* apart from what was *synced*, so tests can cut the power at any
//! instant and find exactly the data an fsync made durable.
//!
//! - [`SimDisk::crash`]: from that instant every I/O call fails (a `Database`
//!   being dropped cannot sync late) and the unsynced writes are lost.
//! - [`SimDisk::restart`]: the disk after power returns — a new backend whose
//!   contents are the synced image.
//! - [`SimDisk::fail_next_syncs`]: the next `n` fsyncs fail (a failing commit);
//!   nothing of them becomes durable.
//! - [`SimDisk::set_capacity`]: growing past it fails (disk full).
//!
//! Deterministic: no clocks, no randomness. Clones share the same disk.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// Granularity of the dirty tracking that keeps `sync_data` proportional to the
/// bytes written since the previous sync instead of the whole image.
const BLOCK: u64 = 4096;

#[derive(Default)]
struct Inner {
    written: Vec<u8>,
    synced: Vec<u8>,
    /// Blocks of `written` that differ from `synced` (or may).
    dirty: BTreeSet<u64>,
    crashed: bool,
    /// Mutating I/O calls (write, set_len, sync_data) left before a crash.
    crash_after: Option<u64>,
    fail_syncs: usize,
    capacity: Option<u64>,
    syncs: u64,
    failed_syncs: u64,
}

impl Inner {
    fn mark(&mut self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        for b in start / BLOCK..=(end - 1) / BLOCK {
            self.dirty.insert(b);
        }
    }

    fn alive(&self) -> io::Result<()> {
        if self.crashed {
            Err(io::Error::other("simulated disk: power lost (crashed)"))
        } else {
            Ok(())
        }
    }

    /// Like `alive`, for a mutating call: counts down an armed crash.
    fn alive_mut(&mut self) -> io::Result<()> {
        self.alive()?;
        match self.crash_after {
            Some(0) => {
                self.crash_now();
                self.alive()
            }
            Some(n) => {
                self.crash_after = Some(n - 1);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn crash_now(&mut self) {
        self.crashed = true;
        self.crash_after = None;
        self.written = Vec::new();
        self.dirty.clear();
    }
}

/// A simulated disk; cheap to clone (clones share one disk).
#[derive(Clone, Default)]
pub struct SimDisk {
    inner: Arc<Mutex<Inner>>,
}

impl fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.lock();
        f.debug_struct("SimDisk")
            .field("written", &g.written.len())
            .field("synced", &g.synced.len())
            .field("dirty_blocks", &g.dirty.len())
            .field("crashed", &g.crashed)
            .finish()
    }
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    /// A disk holding `image` (written and synced), e.g. an older snapshot.
    pub fn from_image(image: Vec<u8>) -> SimDisk {
        SimDisk {
            inner: Arc::new(Mutex::new(Inner {
                written: image.clone(),
                synced: image,
                ..Inner::default()
            })),
        }
    }

    // A panic while the lock is held cannot leave the images half-updated in a
    // way that matters to a simulation, so a poisoned lock is read through.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cuts the power: every later I/O call fails and unsynced writes are lost.
    pub fn crash(&self) {
        self.lock().crash_now();
    }

    /// Arms a crash: the next `n` mutating calls (write, set_len, sync_data)
    /// succeed and the one after them finds the power gone — a crash at an
    /// arbitrary point, e.g. in the middle of a commit.
    pub fn crash_after_ios(&self, n: u64) {
        self.lock().crash_after = Some(n);
    }

    /// The disk after power returns: a new backend holding the synced image.
    /// This disk is crashed first (if it was not already), so a `Database` still
    /// holding it can neither read nor sync anything from now on.
    pub fn restart(&self) -> SimDisk {
        self.crash();
        SimDisk::from_image(self.snapshot_synced())
    }

    /// The next `n` calls of `sync_data` fail; nothing of them becomes durable.
    pub fn fail_next_syncs(&self, n: usize) {
        self.lock().fail_syncs = n;
    }

    /// Growing the disk past `bytes` fails (disk full); `None` removes the limit.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.lock().capacity = bytes;
    }

    /// A copy of the durable image.
    pub fn snapshot_synced(&self) -> Vec<u8> {
        self.lock().synced.clone()
    }

    /// Whether written data is waiting for a sync (what a crash now would lose).
    pub fn has_unsynced(&self) -> bool {
        !self.lock().dirty.is_empty()
    }

    pub fn is_crashed(&self) -> bool {
        self.lock().crashed
    }

    /// Successful and failed `sync_data` calls so far.
    pub fn sync_counts(&self) -> (u64, u64) {
        let g = self.lock();
        (g.syncs, g.failed_syncs)
    }
}

fn out_of_range(what: &str, offset: u64, len: usize, size: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("simulated disk: {what} of {len} bytes at {offset} beyond the end ({size} bytes)"),
    )
}

impl redb::StorageBackend for SimDisk {
    fn len(&self) -> Result<u64, io::Error> {
        let g = self.lock();
        g.alive()?;
        Ok(g.written.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let g = self.lock();
        g.alive()?;
        let size = g.written.len();
        let start =
            usize::try_from(offset).map_err(|_| out_of_range("read", offset, out.len(), size))?;
        let src = start
            .checked_add(out.len())
            .and_then(|end| g.written.get(start..end))
            .ok_or_else(|| out_of_range("read", offset, out.len(), size))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut g = self.lock();
        g.alive_mut()?;
        if g.capacity.is_some_and(|c| len > c) {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "simulated disk: no space left on device",
            ));
        }
        let new = usize::try_from(len).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "simulated disk: length too large",
            )
        })?;
        let old = g.written.len() as u64;
        g.written.resize(new, 0);
        g.mark(old.min(len), old.max(len));
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut g = self.lock();
        g.alive_mut()?;
        if g.fail_syncs > 0 {
            g.fail_syncs -= 1;
            g.failed_syncs += 1;
            return Err(io::Error::other("simulated disk: fsync failed (injected)"));
        }
        let inner = &mut *g;
        inner.synced.resize(inner.written.len(), 0);
        let size = inner.written.len() as u64;
        for b in std::mem::take(&mut inner.dirty) {
            let start = b * BLOCK;
            if start >= size {
                break;
            }
            let end = (start + BLOCK).min(size);
            let (s, e) = (start as usize, end as usize);
            inner.synced[s..e].copy_from_slice(&inner.written[s..e]);
        }
        inner.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut g = self.lock();
        g.alive_mut()?;
        let size = g.written.len();
        let start =
            usize::try_from(offset).map_err(|_| out_of_range("write", offset, data.len(), size))?;
        let dst = start
            .checked_add(data.len())
            .and_then(|end| g.written.get_mut(start..end))
            .ok_or_else(|| out_of_range("write", offset, data.len(), size))?;
        dst.copy_from_slice(data);
        g.mark(offset, offset + data.len() as u64);
        Ok(())
    }

    fn close(&self) -> Result<(), io::Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, StorageBackend, TableDefinition};

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    #[test]
    fn unsynced_writes_are_lost_at_a_crash() {
        let d = SimDisk::new();
        d.set_len(10_000).unwrap();
        d.write(0, b"durable").unwrap();
        d.sync_data().unwrap();
        d.write(5000, b"volatile").unwrap();
        d.write(0, b"DURABLE").unwrap();
        assert!(d.has_unsynced());
        let before = d.clone();
        d.crash();
        assert!(
            before.read(0, &mut [0u8; 7]).is_err(),
            "clones share the crash"
        );
        assert!(
            d.sync_data().is_err()
                && d.write(0, b"x").is_err()
                && d.len().is_err()
                && d.set_len(1).is_err()
        );
        let r = d.restart();
        let mut buf = [0u8; 8];
        r.read(0, &mut buf[..7]).unwrap();
        assert_eq!(&buf[..7], b"durable");
        r.read(5000, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 8]);
        assert_eq!(r.len().unwrap(), 10_000);
    }

    #[test]
    fn failed_sync_makes_nothing_durable_and_ranges_are_checked() {
        let d = SimDisk::new();
        d.set_len(100).unwrap();
        d.sync_data().unwrap();
        d.write(0, b"abc").unwrap();
        d.fail_next_syncs(1);
        assert!(d.sync_data().is_err());
        assert_eq!(d.sync_counts(), (1, 1));
        assert_eq!(&d.snapshot_synced()[..3], &[0, 0, 0]);
        d.sync_data().unwrap();
        assert_eq!(&d.snapshot_synced()[..3], b"abc");
        assert!(d.read(98, &mut [0u8; 3]).is_err());
        assert!(d.write(u64::MAX, b"x").is_err());
        d.set_capacity(Some(200));
        assert_eq!(
            d.set_len(201).unwrap_err().kind(),
            io::ErrorKind::StorageFull
        );
        // Shrinking then growing zero-fills, also in the synced image.
        d.set_len(1).unwrap();
        d.set_len(100).unwrap();
        d.sync_data().unwrap();
        assert_eq!(&d.snapshot_synced()[..3], &[b'a', 0, 0]);
    }

    #[test]
    fn an_armed_crash_fires_at_the_nth_mutating_call() {
        let d = SimDisk::new();
        d.set_len(64).unwrap();
        d.sync_data().unwrap();
        d.crash_after_ios(2);
        d.write(0, b"a").unwrap();
        d.read(0, &mut [0u8; 1]).unwrap(); // reads do not count
        d.write(1, b"b").unwrap();
        assert!(!d.is_crashed());
        assert!(d.sync_data().is_err());
        assert!(d.is_crashed());
        assert_eq!(&d.restart().snapshot_synced()[..2], &[0, 0]);
    }

    #[test]
    fn redb_loses_only_what_was_not_synced() {
        let disk = SimDisk::new();
        let db = redb::Database::builder()
            .create_with_backend(disk.clone())
            .unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(T).unwrap().insert(1, 10).unwrap();
        w.commit().unwrap();
        // A commit that is written but whose fsync fails.
        disk.fail_next_syncs(1);
        let w = db.begin_write().unwrap();
        w.open_table(T).unwrap().insert(2, 20).unwrap();
        assert!(w.commit().is_err());
        disk.crash();
        drop(db); // its shutdown path cannot sync any more
        let disk = disk.restart();
        let db = redb::Database::builder()
            .create_with_backend(disk.clone())
            .unwrap();
        let r = db.begin_read().unwrap();
        let t = r.open_table(T).unwrap();
        assert_eq!(t.get(1).unwrap().map(|v| v.value()), Some(10));
        assert!(t.get(2).unwrap().is_none());
        // An older image can be restored.
        let img = disk.snapshot_synced();
        let again = SimDisk::from_image(img);
        drop(t);
        drop(r);
        drop(db);
        let db = redb::Database::builder()
            .create_with_backend(again)
            .unwrap();
        let r = db.begin_read().unwrap();
        assert_eq!(
            r.open_table(T).unwrap().get(1).unwrap().map(|v| v.value()),
            Some(10)
        );
    }
}
