//! The node's redb store (DESIGN §3 "Storage"): one file per node, one durable
//! write transaction per group-commit [`Batch`].
//!
//! Tables (values are postcard unless raw bytes):
//!
//! | table           | key                      | value                        |
//! |-----------------|--------------------------|------------------------------|
//! | `doc_chunks`    | (doc, seq)               | bytes; seq 0 = snapshot      |
//! | `doc_heads`     | doc                      | `Vec<String>` (hex heads)    |
//! | `rows`          | (product, location)      | [`StockRow`]                 |
//! | `idem3`         | client key               | [`IdemRecord`], compact, 16-byte hash, id elided (`idemcodec`) |
//! | `idem2`, `idem` | client key               | [`IdemRecord`] of older releases (read only) |
//! | `heads_log`     | (doc, ms)                | `Vec<String>`; newest 512/doc|
//! | `heads_log_len` | doc                      | u64 entries in `heads_log`   |
//! | `sync_states`   | (peer hex, doc)          | bytes                        |
//! | `meta`          | key                      | bytes                        |
//! | `customer_keys` | customer                 | key-store entry              |
//! | `part_index`    | doc (a closed records part) | `history::PartIndex` of its snapshot |
//! | `certs`, `doc_certs`, `cert_log`, `introductions` | see `certs.rs` | batch certificates |
//! | `sale_index`, `sale_index_parts`, `sale_index_shared` | see `coldsales.rs` | sale ids of closed records parts |
//!
//! A failed commit leaves nothing of its batch (redb's transaction is dropped
//! uncommitted). redb refuses every further operation after an I/O error, so a
//! store opened from a path reopens its file after a failed commit (and lazily,
//! whenever it finds itself closed); a store over a custom backend must be
//! reopened by its owner.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, StorageError,
    TableDefinition,
};
use storemesh_protocol::engine::{Batch, DocWrite, HEADS_LOG_MAX};
use storemesh_protocol::ids::NodeId;
use storemesh_protocol::ops::IdemRecord;
use storemesh_protocol::views::StockRow;

use certs::{CERTS, CERT_LOG, DOC_CERTS, INTROS};
use scrub::ScrubLog;
pub use scrub::{ScrubCopy, ScrubJob, ScrubOutcome, SCRUB_LOG_BYTES_MAX};

const DOC_CHUNKS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("doc_chunks");
const DOC_HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("doc_heads");
const ROWS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("rows");
/// Idempotency records written before `idem2` (read, never written).
const IDEM: TableDefinition<&str, &[u8]> = TableDefinition::new("idem");
/// Idempotency records in the compact form of earlier releases (read, never written).
const IDEM2: TableDefinition<&str, &[u8]> = TableDefinition::new("idem2");
/// Idempotency records as written now (`crate::idemcodec::encode3`).
const IDEM3: TableDefinition<&str, &[u8]> = TableDefinition::new("idem3");
const HEADS_LOG: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("heads_log");
const HEADS_LOG_LEN: TableDefinition<&str, u64> = TableDefinition::new("heads_log_len");
const SYNC_STATES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("sync_states");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Closed records parts: document → its index (`history::PartIndex`),
/// valid for exactly the document's stored snapshot: a batch that writes
/// the document without a new index drops it.
const PART_INDEX: TableDefinition<&str, &[u8]> = TableDefinition::new("part_index");
/// The customer key store: customer → keys or erased (overwritten in place, so
/// an erased customer's key is gone from the live data).
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("customer_keys");

/// Meta key holding the schema tag; a file with another tag is refused.
const SCHEMA_KEY: &str = "storemesh.schema";
const SCHEMA: &[u8] = b"storemesh-store/1";

/// One stored document, ready for `Engine::load_doc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDoc {
    pub id: String,
    /// `parts[0]` is the snapshot (seq 0) — **empty** when the document has none
    /// yet, so that `parts.len()` is always the next chunk seq — then the chunks
    /// in ascending seq order.
    pub parts: Vec<Vec<u8>>,
    /// (ms, hex heads), oldest first.
    pub heads_log: Vec<(u64, Vec<String>)>,
    /// A closed records part's index (`Engine::load_indexed_part`).
    pub index: Option<Vec<u8>>,
}

/// Commit counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Successful commits.
    pub commits: u64,
    pub failed_commits: u64,
    /// Duration of the last commit attempt (successful or not).
    pub last_commit: Duration,
    /// Time spent in all commit attempts.
    pub total_commit: Duration,
}

/// The redb store of one node.
pub struct Store {
    /// `None` only between a failed reopen and the next successful one.
    db: RwLock<Option<Database>>,
    /// Set when opened from a path: the store can reopen itself after I/O errors.
    path: Option<PathBuf>,
    stats: Mutex<StoreStats>,
    /// The batches committed since a rewrite of the file began.
    scrub_log: Mutex<Option<ScrubLog>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn describe_open_error(what: &str, e: DatabaseError) -> anyhow::Error {
    match e {
        DatabaseError::DatabaseAlreadyOpen => anyhow!(
            "{what} is locked: another storemesh process (or another store in this process) has it open"
        ),
        DatabaseError::UpgradeRequired(v) => {
            anyhow!("{what} uses redb file format {v}, which this version cannot open without an upgrade")
        }
        DatabaseError::RepairAborted => anyhow!("{what} needed a repair and the repair was aborted"),
        DatabaseError::Storage(StorageError::Io(io))
            if matches!(io.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof) =>
        {
            anyhow!("{what} is corrupt or not a storemesh database: {io}")
        }
        DatabaseError::Storage(StorageError::Io(io)) => {
            anyhow!("{what}: I/O error while opening: {io}")
        }
        DatabaseError::Storage(s) => {
            anyhow!("{what} is corrupt or not a storemesh database: {s}")
        }
        other => anyhow!("{what}: cannot open: {other}"),
    }
}

/// Runs a redb open; a panic inside redb (possible on a damaged file) becomes an error.
fn guarded_open(
    what: &str,
    open: impl FnOnce() -> std::result::Result<Database, DatabaseError>,
) -> Result<Database> {
    match catch_unwind(AssertUnwindSafe(open)) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(describe_open_error(what, e)),
        Err(p) => bail!(
            "{what} is corrupt or not a storemesh database (redb panicked while opening it: {})",
            panic_message(p.as_ref())
        ),
    }
}

/// The text of a caught panic's payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Runs `f` (a read or write of the data file); a panic inside it becomes an
/// error. redb asserts on the pages it reads (`unreachable!` in its B-tree
/// code on a damaged page, seen in release builds), so a data file damaged
/// on disk would otherwise kill the thread that touched it — at a start,
/// the whole node with a panic instead of an error that names the file.
fn guarded<T>(what: impl FnOnce() -> String, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(Damaged {
            what: what(),
            panic: panic_message(p.as_ref()),
        }
        .into()),
    }
}

/// A panic caught while reading or writing the data file (see [`guarded`]).
#[derive(Debug)]
pub struct Damaged {
    what: String,
    panic: String,
}

impl std::fmt::Display for Damaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: the data file is damaged (a panic while reading it: {}); restore the data \
             directory from a backup, or start a new node and let it sync",
            self.what, self.panic
        )
    }
}

impl std::error::Error for Damaged {}

/// Bytes redb may keep of the data file's pages in memory. Its default is
/// 1 GiB, and the node's memory grew with the data file up to it (measured:
/// 1,000 MiB after a restart at 2,000,000 sales with a 667 MB file, while the
/// engine held ~150 MiB). The engine keeps what it reads often in its own
/// structures; the operating system's page cache serves the rest.
pub const STORE_CACHE_BYTES: usize = 8 << 20;

fn builder() -> redb::Builder {
    let mut b = Database::builder();
    b.set_cache_size(STORE_CACHE_BYTES);
    // No integrity check of the whole file at every open: it reads every
    // page, so a restart took time (and, through the cache, memory) in
    // proportion to the history (0.47 s for a 140 MB file, seconds at a
    // year's). redb still checks and repairs after an unclean shutdown, and
    // a file it cannot open is refused with an error by `guarded_open`.
    b
}

fn open_path(path: &Path) -> Result<Database> {
    let what = format!("data file {}", path.display());
    guarded_open(&what, || builder().create(path))
}

/// Creates every table and checks the schema tag.
fn init(db: &Database) -> Result<()> {
    let tx = db.begin_write()?;
    {
        tx.open_table(DOC_CHUNKS)?;
        tx.open_table(DOC_HEADS)?;
        tx.open_table(ROWS)?;
        tx.open_table(IDEM)?;
        tx.open_table(IDEM2)?;
        tx.open_table(IDEM3)?;
        tx.open_table(HEADS_LOG)?;
        tx.open_table(HEADS_LOG_LEN)?;
        tx.open_table(SYNC_STATES)?;
        tx.open_table(KEYS)?;
        tx.open_table(PART_INDEX)?;
        tx.open_table(CERTS)?;
        tx.open_table(DOC_CERTS)?;
        tx.open_table(CERT_LOG)?;
        tx.open_table(INTROS)?;
        coldsales::init(&tx)?;
        let mut meta = tx.open_table(META)?;
        let existing = meta.get(SCHEMA_KEY)?.map(|v| v.value().to_vec());
        match existing {
            None => {
                meta.insert(SCHEMA_KEY, SCHEMA)?;
            }
            Some(s) if s == SCHEMA => {}
            Some(s) => bail!(
                "the database has schema {:?}, this storemesh expects {:?}",
                String::from_utf8_lossy(&s),
                String::from_utf8_lossy(SCHEMA)
            ),
        }
    }
    tx.commit()?;
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: impl FnOnce() -> String,
) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| anyhow!("corrupt value in the store ({}): {e}", what()))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(v).context("encoding a store value")
}

/// Writes a whole batch in one transaction and commits it durably.
fn write_batch(db: &Database, batch: &Batch) -> Result<()> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate)?;
    {
        let mut chunks = tx.open_table(DOC_CHUNKS)?;
        for w in &batch.docs {
            match w {
                DocWrite::Snapshot { doc, bytes } => {
                    let d = doc.as_str();
                    chunks.retain_in((d, 0u64)..=(d, u64::MAX), |_, _| false)?;
                    chunks.insert((d, 0u64), bytes.as_slice())?;
                }
                DocWrite::Chunk { doc, seq, bytes } => {
                    if *seq == 0 {
                        bail!("document {doc}: chunk seq 0 is reserved for the snapshot");
                    }
                    // Overwriting a stored chunk with other bytes would silently drop
                    // the changes it held: refuse the batch instead.
                    let clash = chunks
                        .insert((doc.as_str(), *seq), bytes.as_slice())?
                        .is_some_and(|old| old.value() != bytes.as_slice());
                    if clash {
                        bail!("document {doc}: chunk {seq} is already stored with other contents; refusing to overwrite it");
                    }
                }
            }
        }

        // An index describes one stored form of its part: any other write of
        // the part drops it (the engine indexes the part again once closed).
        let mut part_index = tx.open_table(PART_INDEX)?;
        let indexed: BTreeSet<&str> = batch.part_indexes.iter().map(|(d, _)| d.as_str()).collect();
        for w in &batch.docs {
            let (DocWrite::Snapshot { doc, .. } | DocWrite::Chunk { doc, .. }) = w;
            if !indexed.contains(doc.as_str()) {
                part_index.remove(doc.as_str())?;
            }
        }
        for (doc, index) in &batch.part_indexes {
            part_index.insert(doc.as_str(), index.as_slice())?;
        }

        let mut heads = tx.open_table(DOC_HEADS)?;
        for (doc, h) in &batch.heads {
            heads.insert(doc.as_str(), encode(h)?.as_slice())?;
        }

        let mut rows = tx.open_table(ROWS)?;
        for ((p, loc), row) in &batch.rows {
            rows.insert((*p, loc.as_str()), encode(row)?.as_slice())?;
        }

        let mut idem = tx.open_table(IDEM3)?;
        for (k, rec) in &batch.idem {
            let bytes =
                crate::idemcodec::encode3(k, rec).context("encoding an idempotency record")?;
            idem.insert(k.as_str(), bytes.as_slice())?;
        }

        let mut log = tx.open_table(HEADS_LOG)?;
        let mut lens = tx.open_table(HEADS_LOG_LEN)?;
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for (doc, ms, h) in &batch.heads_log {
            let d = doc.as_str();
            if !counts.contains_key(d) {
                let n = match lens.get(d)? {
                    Some(n) => n.value(),
                    // No count yet (first entry): count what is there.
                    None => log.range((d, 0u64)..=(d, u64::MAX))?.count() as u64,
                };
                counts.insert(d, n);
            }
            let fresh = log.insert((d, *ms), encode(h)?.as_slice())?.is_none();
            if fresh {
                *counts.entry(d).or_default() += 1;
            }
        }
        for (d, n) in counts {
            let keep = HEADS_LOG_MAX as u64;
            let mut left = n;
            if n > keep {
                let excess = (n - keep) as usize;
                let mut removed = 0u64;
                for item in log
                    .extract_from_if((d, 0u64)..=(d, u64::MAX), |_, _| true)?
                    .take(excess)
                {
                    item?;
                    removed += 1;
                }
                left = n - removed;
            }
            lens.insert(d, left)?;
        }

        let mut sync = tx.open_table(SYNC_STATES)?;
        for (peer, doc, state) in &batch.sync_states {
            sync.insert((peer.hex().as_str(), doc.as_str()), state.as_slice())?;
        }

        let mut keys = tx.open_table(KEYS)?;
        for (customer, entry) in &batch.keys {
            let bytes = postcard::to_stdvec(entry).context("encoding a key-store entry")?;
            keys.insert(customer.as_str(), bytes.as_slice())?;
        }

        certs::write(&tx, batch)?;
        coldsales::write(&tx, batch)?;

        // Documents the engine moved on from (older ledger epochs): every
        // stored trace, in the same transaction as the epoch that replaces them.
        for d in &batch.retired {
            let d = d.as_str();
            chunks.retain_in((d, 0u64)..=(d, u64::MAX), |_, _| false)?;
            heads.remove(d)?;
            log.retain_in((d, 0u64)..=(d, u64::MAX), |_, _| false)?;
            lens.remove(d)?;
            part_index.remove(d)?;
            sync.retain(|(_, doc), _| doc != d)?;
        }
    }
    tx.commit()?;
    Ok(())
}

impl Store {
    /// Opens the node's data file, creating it (and its directory) if missing.
    /// A file held by another process, or damaged, gives an error that says so.
    pub fn open(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the data directory {}", dir.display()))?;
        }
        let db = open_path(path)?;
        guarded(|| format!("data file {}", path.display()), || init(&db))
            .with_context(|| format!("initializing data file {}", path.display()))?;
        Ok(Store {
            db: RwLock::new(Some(db)),
            path: Some(path.to_path_buf()),
            stats: Mutex::new(StoreStats::default()),
            scrub_log: Mutex::new(None),
        })
    }

    /// Opens a store over any redb backend (the simulated disk in tests).
    pub fn open_backend(backend: impl redb::StorageBackend + 'static) -> Result<Store> {
        let db = guarded_open("database", || builder().create_with_backend(backend))?;
        guarded(|| "database".to_string(), || init(&db)).context("initializing the database")?;
        Ok(Store {
            db: RwLock::new(Some(db)),
            path: None,
            stats: Mutex::new(StoreStats::default()),
            scrub_log: Mutex::new(None),
        })
    }

    /// Closes and reopens the data file (after an I/O error redb refuses every
    /// operation until then). Only for stores opened from a path.
    pub fn reopen(&self) -> Result<()> {
        let Some(path) = &self.path else {
            bail!("a store over a custom backend cannot reopen itself; open a new one");
        };
        let mut g = self.db.write().unwrap_or_else(|e| e.into_inner());
        // Close the old handle first: it holds the file lock.
        drop(g.take());
        let db = open_path(path)?;
        guarded(|| format!("data file {}", path.display()), || init(&db))?;
        *g = Some(db);
        Ok(())
    }

    /// Runs `f` on the open database (reopening it first after an I/O
    /// error). A panic inside redb becomes an error, and the handle is
    /// closed: redb's state after a panic is unknown, so the next operation
    /// opens the file afresh (and fails again with a clear error if the
    /// damage is on disk).
    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        // Named only when a panic is caught: no allocation per call.
        let what = || {
            self.path.as_ref().map_or_else(
                || "database".to_string(),
                |p| format!("data file {}", p.display()),
            )
        };
        let closed = self.db.read().unwrap_or_else(|e| e.into_inner()).is_none();
        if closed {
            self.reopen()
                .context("the store is closed after an I/O error and could not be reopened")?;
        }
        let res = {
            let g = self.db.read().unwrap_or_else(|e| e.into_inner());
            match g.as_ref() {
                Some(db) => guarded(what, || f(db)),
                None => bail!("the store is closed after an I/O error"),
            }
        };
        if let Err(e) = &res {
            if e.chain().any(|c| c.is::<Damaged>()) {
                tracing::error!(error = %format!("{e:#}"), "the data file is damaged; closing the store handle");
                self.scrub_abandon("redb panicked on the data file");
                drop(self.db.write().unwrap_or_else(|e| e.into_inner()).take());
            }
        }
        res
    }

    /// Persists everything of `batch` in one durable (`Durability::Immediate`)
    /// transaction: all of it, or on `Err` none of it.
    pub fn commit(&self, batch: &Batch) -> Result<()> {
        let start = Instant::now();
        let res = self
            .with_db(|db| write_batch(db, batch))
            .context("commit failed");
        let took = start.elapsed();
        {
            let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            s.last_commit = took;
            s.total_commit += took;
            if res.is_ok() {
                s.commits += 1;
            } else {
                s.failed_commits += 1;
            }
        }
        if res.is_ok() {
            self.scrub_note(batch);
        }
        if let Err(e) = &res {
            // The copy's snapshot holds the old file open: give it up, so
            // the reopen below is not refused for long.
            self.scrub_abandon("a commit failed during the copy");
            tracing::error!(error = %format!("{e:#}"), "store commit failed; nothing of the batch was persisted");
            if self.path.is_some() {
                if let Err(e2) = self.reopen() {
                    tracing::error!(error = %format!("{e2:#}"), "reopening the store after a failed commit failed");
                }
            }
        }
        res
    }

    /// Every stored document: snapshot (or an empty placeholder) then chunks.
    pub fn load_docs(&self) -> Result<Vec<StoredDoc>> {
        let mut docs = Vec::new();
        self.for_each_doc(|d| {
            docs.push(d);
            Ok(())
        })?;
        Ok(docs)
    }

    /// Every stored document in id order, handed to `f` one at a time, so
    /// that a start holds one document's stored bytes at once rather than
    /// the whole file's (issue 14: at 1,000,000 sales ~30 MB of parts and
    /// indexes were read before the first was loaded).
    pub fn for_each_doc(&self, mut f: impl FnMut(StoredDoc) -> Result<()>) -> Result<()> {
        self.with_db(|db| {
            let tx = db.begin_read()?;
            let chunks = tx.open_table(DOC_CHUNKS)?;
            let index = match tx.open_table(PART_INDEX) {
                Ok(t) => Some(t),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            };
            let log = tx.open_table(HEADS_LOG)?;
            let finish = |mut d: StoredDoc| -> Result<StoredDoc> {
                if let Some(t) = &index {
                    d.index = t.get(d.id.as_str())?.map(|v| v.value().to_vec());
                }
                for item in log.range((d.id.as_str(), 0u64)..=(d.id.as_str(), u64::MAX))? {
                    let (k, v) = item?;
                    let (id, ms) = k.value();
                    let heads: Vec<String> =
                        decode(v.value(), || format!("heads log of {id} at {ms}"))?;
                    d.heads_log.push((ms, heads));
                }
                Ok(d)
            };
            let mut current: Option<StoredDoc> = None;
            for item in chunks.iter()? {
                let (k, v) = item?;
                let (id, seq) = k.value();
                if current.as_ref().is_none_or(|d| d.id != id) {
                    if let Some(done) = current.take() {
                        f(finish(done)?)?;
                    }
                    current = Some(StoredDoc {
                        id: id.to_string(),
                        parts: Vec::new(),
                        heads_log: Vec::new(),
                        index: None,
                    });
                }
                let Some(d) = current.as_mut() else { continue };
                // parts[i] is chunk seq i, so parts.len() is the next seq the engine
                // uses: a document never snapshotted gets an empty snapshot, and a
                // gap (which only a bug could leave) empty parts, never a reused seq.
                let seq = usize::try_from(seq)
                    .ok()
                    .filter(|s| *s <= d.parts.len() + 1_000_000);
                let Some(seq) = seq else {
                    bail!("document {id}: corrupt chunk sequence number");
                };
                if seq > d.parts.len() + usize::from(d.parts.is_empty()) {
                    tracing::warn!(doc = %id, seq, "gap in the stored chunks of a document");
                }
                while d.parts.len() < seq {
                    d.parts.push(Vec::new());
                }
                d.parts.push(v.value().to_vec());
            }
            if let Some(done) = current.take() {
                f(finish(done)?)?;
            }
            Ok(())
        })
    }

    /// The persisted read view: (product, location) → row.
    pub fn load_rows(&self) -> Result<Vec<((u64, String), StockRow)>> {
        self.with_db(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(ROWS)?;
            let mut out = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
                let (p, loc) = k.value();
                let row: StockRow = decode(v.value(), || format!("row {p}/{loc}"))?;
                out.push(((p, loc.to_string()), row));
            }
            Ok(out)
        })
    }

    /// The customer key store.
    pub fn load_keys(&self) -> Result<Vec<(String, storemesh_protocol::crypto::KeyEntry)>> {
        self.with_db(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(KEYS)?;
            let mut out = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
                let c = k.value();
                out.push((
                    c.to_string(),
                    decode(v.value(), || format!("key-store entry {c}"))?,
                ));
            }
            Ok(out)
        })
    }

    /// The persisted heads (hex) of every document.
    pub fn heads(&self) -> Result<Vec<(String, Vec<String>)>> {
        self.with_db(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(DOC_HEADS)?;
            let mut out = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
                let doc = k.value();
                let h: Vec<String> = decode(v.value(), || format!("heads of {doc}"))?;
                out.push((doc.to_string(), h));
            }
            Ok(out)
        })
    }

    /// The stored snapshot (seq 0) of document `doc`, if any.
    pub fn doc_snapshot(&self, doc: &str) -> Result<Option<Vec<u8>>> {
        self.with_db(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(DOC_CHUNKS)?;
            let v = t.get((doc, 0u64))?.map(|v| v.value().to_vec());
            Ok(v.filter(|b| !b.is_empty()))
        })
    }

    /// The idempotency record of a client key.
    pub fn idem(&self, key: &str) -> Result<Option<IdemRecord>> {
        self.with_db(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(IDEM3)?;
            if let Some(v) = t.get(key)? {
                return crate::idemcodec::decode3(key, v.value())
                    .map(Some)
                    .map_err(|e| anyhow!("corrupt idempotency record {key}: {e}"));
            }
            let t = tx.open_table(IDEM2)?;
            if let Some(v) = t.get(key)? {
                return crate::idemcodec::decode(v.value())
                    .map(Some)
                    .map_err(|e| anyhow!("corrupt idempotency record {key}: {e}"));
            }
            let t = tx.open_table(IDEM)?;
            let v = t.get(key)?;
            v.map(|v| {
                decode::<crate::idemcodec::LegacyRecord>(v.value(), || {
                    format!("idempotency record {key}")
                })?
                .typed()
                .map_err(|e| anyhow!("corrupt idempotency record {key}: {e}"))
            })
            .transpose()
        })
    }

    /// Persisted sync states of one peer: (doc, encoded state).
    pub fn sync_states(&self, peer: &NodeId) -> Result<Vec<(String, Vec<u8>)>> {
        let hex = peer.hex();
        self.with_db(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(SYNC_STATES)?;
            let mut out = Vec::new();
            for item in t.range((hex.as_str(), "")..)? {
                let (k, v) = item?;
                let (p, doc) = k.value();
                if p != hex {
                    break;
                }
                out.push((doc.to_string(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.with_db(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(META)?;
            let v = t.get(key)?.map(|v| v.value().to_vec());
            Ok(v)
        })
    }

    /// Sets one meta value in its own durable transaction.
    pub fn set_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        if key == SCHEMA_KEY {
            bail!("meta key {SCHEMA_KEY} is reserved");
        }
        self.with_db(|db| {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate)?;
            tx.open_table(META)?.insert(key, value)?;
            tx.commit()?;
            Ok(())
        })
        .with_context(|| format!("storing meta {key}"))?;
        // Not a batch: the replay could not repeat it.
        self.scrub_abandon("a meta value was written during the copy");
        Ok(())
    }

    pub fn stats(&self) -> StoreStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The engine reads cold closed records parts back from here
/// (`Engine::set_part_archive`) instead of holding their bytes.
impl storemesh_protocol::lazydoc::PartArchive for Store {
    fn snapshot(&self, doc: &str) -> std::result::Result<Option<Vec<u8>>, String> {
        self.doc_snapshot(doc).map_err(|e| format!("{e:#}"))
    }

    fn part_index(&self, doc: &str) -> std::result::Result<Option<Vec<u8>>, String> {
        self.with_db(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(PART_INDEX)?;
            Ok(t.get(doc)?.map(|v| v.value().to_vec()))
        })
        .map_err(|e| format!("{e:#}"))
    }

    fn cold_sales(
        &self,
    ) -> std::result::Result<Option<storemesh_protocol::coldsales::ColdSalesState>, String> {
        self.cold_sales_state()
            .map(Some)
            .map_err(|e| format!("{e:#}"))
    }

    fn cold_sale_entries(&self, lo: u64, hi: u64) -> std::result::Result<Vec<u64>, String> {
        self.cold_sale_entries(lo, hi).map_err(|e| format!("{e:#}"))
    }
}

#[cfg(test)]
mod tests;

// The signing tables: batch certificates, their links to documents,
// introductions.
mod certs;

// The sale index of closed records parts.
mod coldsales;

// Rewriting the data file from scratch while commits go on.
mod scrub;
