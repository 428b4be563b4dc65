//! Rewriting the data file from scratch (`Store::scrub`): every table copied
//! into a new file on a thread of its own while commits go on, the batches
//! committed meanwhile replayed into the copy, the copy swapped in.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use storemesh_protocol::engine::{Batch, DocWrite};

use super::certs::{CERTS, CERT_LOG, DOC_CERTS, INTROS};
use super::coldsales::{SALE_INDEX, SALE_INDEX_PARTS, SALE_INDEX_SHARED};
use super::{
    builder, init, open_path, write_batch, Store, DOC_CHUNKS, DOC_HEADS, HEADS_LOG, HEADS_LOG_LEN,
    IDEM, IDEM2, IDEM3, KEYS, META, PART_INDEX, ROWS, SYNC_STATES,
};

/// Every table `Store::scrub` copies (a file holding another is not scrubbed).
const SCRUB_TABLES: &[&str] = &[
    "doc_chunks",
    "doc_heads",
    "rows",
    "idem",
    "idem2",
    "idem3",
    "heads_log",
    "heads_log_len",
    "sync_states",
    "meta",
    "customer_keys",
    "part_index",
    "certs",
    "doc_certs",
    "cert_log",
    "introductions",
    "sale_index",
    "sale_index_parts",
    "sale_index_shared",
];

fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    rt: &redb::ReadTransaction,
    wt: &redb::WriteTransaction,
    def: TableDefinition<K, V>,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    let from = match rt.open_table(def) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut to = wt.open_table(def)?;
    for (i, entry) in from.iter()?.enumerate() {
        if i % SCRUB_CANCEL_EVERY == 0 && cancel.load(std::sync::atomic::Ordering::Relaxed) {
            bail!("the rewrite was cancelled");
        }
        let (k, v) = entry?;
        to.insert(k.value(), v.value())?;
    }
    Ok(())
}

/// Bytes of batches a rewrite keeps for its replay, at most: commits go on
/// during the copy (about a second per 100 MB of file), and a node taking
/// more than this meanwhile gives the rewrite up and tries again later
/// rather than holding an unbounded log in memory.
pub const SCRUB_LOG_BYTES_MAX: usize = 64 << 20;
/// Entries the copy writes between looks at its cancel flag.
const SCRUB_CANCEL_EVERY: usize = 1024;

/// What a running rewrite keeps (see [`Store::scrub_begin`]).
pub(super) struct ScrubLog {
    batches: Vec<Batch>,
    bytes: usize,
    /// Why the rewrite cannot be finished (its copy is discarded).
    abandoned: Option<String>,
    /// A batch committed during the copy erased a customer: the replay
    /// overwrites that key in the copy, whose freed pages then hold it.
    erased: bool,
    cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Bytes a batch holds, roughly (its logged copy's memory).
fn batch_bytes(b: &Batch) -> usize {
    const ENTRY: usize = 128;
    let docs: usize = b
        .docs
        .iter()
        .map(|w| match w {
            DocWrite::Snapshot { doc, bytes } => doc.len() + bytes.len(),
            DocWrite::Chunk { doc, bytes, .. } => doc.len() + bytes.len(),
        })
        .sum();
    let sync: usize = b
        .sync_states
        .iter()
        .map(|(_, d, s)| d.len() + s.len() + ENTRY)
        .sum();
    let hashes = |h: &[String]| h.iter().map(|x| x.len() + 24).sum::<usize>();
    let heads: usize = b
        .heads
        .iter()
        .map(|(d, h)| d.len() + hashes(h) + ENTRY)
        .sum();
    let log: usize = b
        .heads_log
        .iter()
        .map(|(d, _, h)| d.len() + hashes(h) + ENTRY)
        .sum();
    let cold = b.cold_sales.entries.len() * 8
        + (b.cold_sales.parts.len() + b.cold_sales.shared.len()) * ENTRY;
    docs + sync
        + heads
        + log
        + cold
        + (b.rows.len() + b.idem.len() + b.keys.len() + b.retired.len()) * ENTRY
}

/// A rewrite's snapshot of the live file, to copy on any thread.
pub struct ScrubJob {
    rt: redb::ReadTransaction,
    tmp: PathBuf,
    cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// The copied file, ready for [`Store::scrub_finish`]; removed if dropped.
pub struct ScrubCopy {
    fresh: Option<Database>,
    tmp: PathBuf,
}

impl Drop for ScrubCopy {
    fn drop(&mut self) {
        drop(self.fresh.take());
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// How a rewrite ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScrubOutcome {
    /// The file was replaced; `replayed` batches were committed during the
    /// copy; `erased_meanwhile`: one of them erased a customer, so another
    /// rewrite is due.
    Done {
        replayed: usize,
        erased_meanwhile: bool,
    },
    /// Nothing changed (the live file stays); try again later.
    Abandoned(String),
}

impl ScrubJob {
    /// Copies every table of the snapshot into a fresh file (the slow part:
    /// about a second per 100 MB). Touches nothing the live store uses.
    pub fn copy(self) -> Result<ScrubCopy> {
        let ScrubJob { rt, tmp, cancel } = self;
        let _ = std::fs::remove_file(&tmp);
        let fresh = builder()
            .create(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        let copy = ScrubCopy {
            fresh: Some(fresh),
            tmp,
        };
        for t in rt.list_tables()? {
            use redb::TableHandle;
            if !SCRUB_TABLES.contains(&t.name()) {
                bail!("table {} is not in the scrub list; not scrubbing", t.name());
            }
        }
        {
            let fresh = copy.fresh.as_ref().context("the copy is closed")?;
            let mut wt = fresh.begin_write()?;
            wt.set_durability(Durability::Immediate)?;
            let c = &cancel;
            copy_table(&rt, &wt, DOC_CHUNKS, c)?;
            copy_table(&rt, &wt, DOC_HEADS, c)?;
            copy_table(&rt, &wt, ROWS, c)?;
            copy_table(&rt, &wt, IDEM, c)?;
            copy_table(&rt, &wt, IDEM2, c)?;
            copy_table(&rt, &wt, IDEM3, c)?;
            copy_table(&rt, &wt, HEADS_LOG, c)?;
            copy_table(&rt, &wt, HEADS_LOG_LEN, c)?;
            copy_table(&rt, &wt, SYNC_STATES, c)?;
            copy_table(&rt, &wt, META, c)?;
            copy_table(&rt, &wt, KEYS, c)?;
            copy_table(&rt, &wt, PART_INDEX, c)?;
            copy_table(&rt, &wt, CERTS, c)?;
            copy_table(&rt, &wt, DOC_CERTS, c)?;
            copy_table(&rt, &wt, CERT_LOG, c)?;
            copy_table(&rt, &wt, INTROS, c)?;
            copy_table(&rt, &wt, SALE_INDEX, c)?;
            copy_table(&rt, &wt, SALE_INDEX_PARTS, c)?;
            copy_table(&rt, &wt, SALE_INDEX_SHARED, c)?;
            wt.commit()?;
        }
        drop(rt);
        Ok(copy)
    }
}

impl Store {
    /// Rewrites the data file from scratch (every table copied into a new
    /// file, which then replaces the old one), so that nothing the live data
    /// no longer holds survives in it: redb never overwrites freed pages, so
    /// an erased customer's key bytes would otherwise stay in the file for
    /// anyone who images the disk. Refuses (changing nothing) if the file
    /// holds a table this code does not know to copy.
    ///
    /// All three steps on the calling thread; the node runs the copy on a
    /// thread of its own ([`Store::scrub_begin`], [`ScrubJob::copy`],
    /// [`Store::scrub_finish`]) so that it keeps committing meanwhile.
    pub fn scrub(&self) -> Result<()> {
        let copy = self.scrub_begin()?.copy()?;
        match self.scrub_finish(copy)? {
            ScrubOutcome::Done { .. } => Ok(()),
            ScrubOutcome::Abandoned(why) => bail!("the rewrite was abandoned: {why}"),
        }
    }

    /// Starts a rewrite of the data file: takes a read snapshot of the live
    /// file (redb's MVCC: writers go on) and from now on keeps every batch
    /// committed, so that [`Store::scrub_finish`] can replay them into the
    /// copy. At most one rewrite at a time. Cheap: call it on the engine
    /// thread, then run [`ScrubJob::copy`] elsewhere.
    pub fn scrub_begin(&self) -> Result<ScrubJob> {
        let Some(path) = &self.path else {
            bail!("a store over a custom backend cannot be scrubbed");
        };
        let mut log = self.scrub_log.lock().unwrap_or_else(|e| e.into_inner());
        if log.is_some() {
            bail!("a rewrite of the data file is already running");
        }
        let rt = self.with_db(|db| Ok(db.begin_read()?))?;
        let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        *log = Some(ScrubLog {
            batches: Vec::new(),
            bytes: 0,
            abandoned: None,
            erased: false,
            cancel: cancel.clone(),
        });
        Ok(ScrubJob {
            rt,
            tmp: path.with_extension("redb.scrub"),
            cancel,
        })
    }

    /// Ends a rewrite: replays the batches committed since
    /// [`Store::scrub_begin`] into the copy and swaps it in for the live file
    /// (closed, renamed over, reopened). Must run where commits do (the
    /// engine thread): no commit may happen in between. Costs the replay of
    /// what was committed during the copy, not a copy of the file.
    pub fn scrub_finish(&self, copy: ScrubCopy) -> Result<ScrubOutcome> {
        let Some(path) = &self.path else {
            bail!("a store over a custom backend cannot be scrubbed");
        };
        let Some(log) = self
            .scrub_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            bail!("no rewrite of the data file is running");
        };
        if let Some(why) = log.abandoned {
            return Ok(ScrubOutcome::Abandoned(why));
        }
        let mut copy = copy;
        let replayed = log.batches.len();
        {
            let fresh = copy.fresh.as_ref().context("the copy is closed")?;
            for b in &log.batches {
                write_batch(fresh, b).context("replaying a batch into the rewritten file")?;
            }
        }
        // Swap: close both files (each holds its lock), rename the new one
        // over the old, make the rename durable, reopen.
        drop(copy.fresh.take());
        let mut g = self.db.write().unwrap_or_else(|e| e.into_inner());
        drop(g.take());
        let renamed = std::fs::rename(&copy.tmp, path)
            .with_context(|| format!("replacing {} by its scrubbed copy", path.display()));
        if renamed.is_ok() {
            copy.tmp = PathBuf::new();
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                if let Ok(d) = std::fs::File::open(dir) {
                    let _ = d.sync_all();
                }
            }
        }
        // Reopen whatever is at the path now (the old file if the rename failed).
        let db = open_path(path)?;
        init(&db)?;
        *g = Some(db);
        renamed?;
        Ok(ScrubOutcome::Done {
            replayed,
            erased_meanwhile: log.erased,
        })
    }

    /// Gives up a running rewrite (its copy is removed when dropped).
    pub fn scrub_abandon(&self, why: &str) {
        let mut log = self.scrub_log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = log.as_mut() {
            l.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            l.batches = Vec::new();
            l.abandoned.get_or_insert_with(|| why.to_string());
        }
    }

    /// Forgets a rewrite whose copy failed (nothing changed).
    pub fn scrub_clear(&self) {
        let mut log = self.scrub_log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = log.take() {
            l.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Keeps a committed batch for the running rewrite, if any.
    pub(super) fn scrub_note(&self, batch: &Batch) {
        let mut log = self.scrub_log.lock().unwrap_or_else(|e| e.into_inner());
        let Some(l) = log.as_mut() else { return };
        if l.abandoned.is_some() {
            return;
        }
        l.erased |= batch
            .keys
            .iter()
            .any(|(_, e)| matches!(e, storemesh_protocol::crypto::KeyEntry::Erased));
        l.bytes = l.bytes.saturating_add(batch_bytes(batch));
        if l.bytes > SCRUB_LOG_BYTES_MAX {
            drop(log);
            self.scrub_abandon("more was committed during the copy than the replay log holds");
            return;
        }
        l.batches.push(batch.clone());
    }
}
