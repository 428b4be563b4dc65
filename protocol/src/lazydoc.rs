//! A document that can go cold (DESIGN §7, "records in periods that go cold").
//!
//! A closed records part (its writer moved on to a later part or month) is
//! never written again by its owner. Holding it as a live Automerge document
//! costs about ten times its saved bytes (measured: 2,048 sale records are
//! ~380 KiB live and ~27 KiB saved), so such a part is kept as its saved bytes
//! and its heads, and loaded again only when something reads it (a lookup, a
//! peer that lacks it). `Deref` loads on first touch, so every reader of a
//! document works unchanged; the engine cools warm closed parts again on its
//! timer.

use std::cell::OnceCell;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, OnceLock};

use automerge::{ActorId, Automerge, ChangeHash};

/// Where a cold part's bytes are read back from when they are not held in
/// memory (issue 14: memory independent of history). The node reads the
/// part's stored snapshot from redb; the simulator the same store over its
/// disk.
pub trait PartArchive: Send + Sync {
    /// The stored snapshot of document `doc` (`None`: none stored).
    fn snapshot(&self, doc: &str) -> Result<Option<Vec<u8>>, String>;
    /// The stored index of records part `doc` (`None`: none stored), read
    /// again by a start instead of holding every part's index at once.
    fn part_index(&self, doc: &str) -> Result<Option<Vec<u8>>, String> {
        let _ = doc;
        Ok(None)
    }
    /// What the store holds of the sale index of closed parts
    /// ([`crate::coldsales`]), read once at a start; `None`: this archive
    /// keeps no such index (the engine then holds every sale in memory).
    fn cold_sales(&self) -> Result<Option<crate::coldsales::ColdSalesState>, String> {
        Ok(None)
    }
    /// The stored entries of the sale index of closed parts from `lo` to
    /// `hi` (inclusive), in order: a lookup of one fingerprint.
    fn cold_sale_entries(&self, lo: u64, hi: u64) -> Result<Vec<u64>, String> {
        let _ = (lo, hi);
        Ok(Vec::new())
    }
}

/// The document a failed read of a cold part shows meanwhile.
fn empty() -> &'static Automerge {
    static EMPTY: OnceLock<Automerge> = OnceLock::new();
    EMPTY.get_or_init(Automerge::new)
}

pub struct LazyDoc {
    live: OnceCell<Automerge>,
    /// Bytes equal to the document's current state (a `save()` or the chunks
    /// it was loaded from), the actor and the heads; `None` once the live
    /// document was borrowed mutably (the bytes may then be stale).
    saved: Option<Saved>,
}

struct Saved {
    bytes: Bytes,
    actor: ActorId,
    heads: Vec<ChangeHash>,
}

/// A cold document's bytes: held, or stored and read back on demand.
enum Bytes {
    Held(Vec<u8>),
    /// The document's stored snapshot loads with the saved heads; nothing of
    /// it is in memory.
    Stored {
        doc: String,
        archive: Arc<dyn PartArchive>,
    },
}

impl Saved {
    /// The bytes, read back if stored.
    fn read(&self) -> Result<Vec<u8>, String> {
        match &self.bytes {
            Bytes::Held(b) => Ok(b.clone()),
            Bytes::Stored { doc, archive } => archive
                .snapshot(doc)?
                .ok_or_else(|| format!("no stored snapshot of {doc}")),
        }
    }
}

impl LazyDoc {
    pub fn new(doc: Automerge) -> LazyDoc {
        LazyDoc {
            live: OnceCell::from(doc),
            saved: None,
        }
    }

    /// A live document with bytes known to equal it (what it was loaded
    /// from), so that cooling it costs no `save()`.
    pub fn with_saved(doc: Automerge, bytes: Vec<u8>) -> LazyDoc {
        let saved = Saved {
            actor: doc.get_actor().clone(),
            heads: doc.get_heads(),
            bytes: Bytes::Held(bytes),
        };
        LazyDoc {
            live: OnceCell::from(doc),
            saved: Some(saved),
        }
    }

    /// A cold document from bytes known to load with `heads` (a closed
    /// part's persisted snapshot, see `history::PartIndex`): nothing is
    /// loaded until something reads it.
    pub fn cold(bytes: Vec<u8>, actor: ActorId, heads: Vec<ChangeHash>) -> LazyDoc {
        LazyDoc {
            live: OnceCell::new(),
            saved: Some(Saved {
                bytes: Bytes::Held(bytes),
                actor,
                heads,
            }),
        }
    }

    /// A cold document whose bytes are `doc`'s snapshot in `archive`,
    /// known to load with `heads`: nothing of it is held in memory.
    pub fn stored(
        doc: &str,
        archive: Arc<dyn PartArchive>,
        actor: ActorId,
        heads: Vec<ChangeHash>,
    ) -> LazyDoc {
        LazyDoc {
            live: OnceCell::new(),
            saved: Some(Saved {
                bytes: Bytes::Stored {
                    doc: doc.to_string(),
                    archive,
                },
                actor,
                heads,
            }),
        }
    }

    /// Lets a cold document forget its held bytes: the caller knows that
    /// `doc`'s snapshot in `archive` loads with the same heads. `false` (and
    /// nothing changes) when the document is not cold or already stored.
    pub fn store_away(&mut self, doc: &str, archive: &Arc<dyn PartArchive>) -> bool {
        if !self.is_cold() {
            return false;
        }
        match &mut self.saved {
            Some(s) if matches!(s.bytes, Bytes::Held(_)) => {
                s.bytes = Bytes::Stored {
                    doc: doc.to_string(),
                    archive: archive.clone(),
                };
                true
            }
            _ => false,
        }
    }

    /// Whether cooling needs no `save()`.
    pub fn has_saved(&self) -> bool {
        self.saved.is_some()
    }

    /// Bytes held in memory for the saved form (0 when none or stored).
    pub fn saved_len(&self) -> usize {
        match self.saved.as_ref().map(|s| &s.bytes) {
            Some(Bytes::Held(b)) => b.len(),
            _ => 0,
        }
    }

    pub fn is_cold(&self) -> bool {
        self.live.get().is_none()
    }

    /// Drops the live document and keeps its saved bytes. Returns the bytes
    /// now held (0 when already cold).
    pub fn cool(&mut self) -> usize {
        let Some(doc) = self.live.get() else {
            return 0;
        };
        let saved = self.saved.take().unwrap_or_else(|| Saved {
            bytes: Bytes::Held(doc.save()),
            actor: doc.get_actor().clone(),
            heads: doc.get_heads(),
        });
        debug_assert_eq!(saved.heads, doc.get_heads(), "saved bytes are stale");
        let n = match &saved.bytes {
            Bytes::Held(b) => b.len(),
            Bytes::Stored { .. } => 0,
        };
        self.saved = Some(saved);
        self.live = OnceCell::new();
        n
    }

    /// Forgets saved bytes kept beside a live document (memory they hold is
    /// only worth it for documents about to be cooled).
    pub fn drop_saved(&mut self) {
        if self.live.get().is_some() {
            self.saved = None;
        }
    }

    /// The document's heads, without loading a cold document.
    pub fn heads(&self) -> Vec<ChangeHash> {
        match (self.live.get(), &self.saved) {
            (Some(d), _) => d.get_heads(),
            (None, Some(s)) => s.heads.clone(),
            (None, None) => Vec::new(),
        }
    }

    /// Bytes of the whole document (its saved bytes when cold; read back
    /// when stored — empty, with an error logged, if the read fails).
    pub fn save(&self) -> Vec<u8> {
        match (self.live.get(), &self.saved) {
            (None, Some(s)) => s.read().unwrap_or_else(|e| {
                tracing::error!(error = %e, "a cold document's stored bytes cannot be read");
                Vec::new()
            }),
            _ => self.load().save(),
        }
    }

    /// Reads the document without keeping a cold one loaded (whole-history
    /// scans that must not warm every part).
    pub fn peek<R>(&self, f: impl FnOnce(&Automerge) -> R) -> R {
        if let Some(d) = self.live.get() {
            return f(d);
        }
        match self.saved.as_ref().map(|s| {
            s.read()
                .and_then(|b| Automerge::load(&b).map_err(|e| e.to_string()))
        }) {
            Some(Ok(d)) => f(&d),
            _ => f(&Automerge::new()),
        }
    }

    fn load(&self) -> &Automerge {
        if let Some(d) = self.live.get() {
            return d;
        }
        // A stored part that cannot be read back (a failing disk) reads as
        // empty this time and stays cold: the next reader tries again.
        let bytes = match self.saved.as_ref().map(Saved::read) {
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                tracing::error!(error = %e, "a cold document's stored bytes cannot be read");
                return empty();
            }
            None => Vec::new(),
        };
        self.live.get_or_init(|| {
            let Some(s) = &self.saved else {
                return Automerge::new();
            };
            let loaded = Automerge::load(&bytes).or_else(|_| {
                let mut d = Automerge::new();
                d.load_incremental(&bytes).map(|_| d)
            });
            match loaded {
                Ok(d) if d.get_heads() == s.heads => d.with_actor(s.actor.clone()),
                Ok(_) => {
                    debug_assert!(false, "a cold document reloads with other heads");
                    tracing::error!("a cold document reloads with other heads; it is empty until synced again");
                    Automerge::new().with_actor(s.actor.clone())
                }
                Err(e) => {
                    // The bytes are this process's own save of a document it
                    // held: failing to load them is a bug, not input.
                    debug_assert!(false, "a cold document does not load: {e}");
                    tracing::error!(error = %e, "a cold document does not load; it is empty until synced again");
                    Automerge::new().with_actor(s.actor.clone())
                }
            }
        })
    }
}

impl Deref for LazyDoc {
    type Target = Automerge;
    fn deref(&self) -> &Automerge {
        self.load()
    }
}

impl DerefMut for LazyDoc {
    fn deref_mut(&mut self) -> &mut Automerge {
        self.load();
        if self.live.get().is_none() {
            // Its stored bytes could not be read: writing to an empty stand-in
            // would lose the part. The engine's last line (a caught panic
            // reopens it from the store) takes over.
            panic!("a cold records part cannot be read back from storage for a write");
        }
        self.saved = None;
        match self.live.get_mut() {
            Some(d) => d,
            None => unreachable!("loaded just above"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ReadDoc, ROOT};

    fn doc_with(n: usize) -> Automerge {
        let mut d = Automerge::new();
        let mut tx = d.transaction();
        for i in 0..n {
            tx.put(ROOT, format!("k{i}"), i as u64).unwrap();
        }
        tx.commit();
        d
    }

    #[test]
    fn cold_document_reads_and_writes_as_before() {
        let d = doc_with(10);
        let heads = d.get_heads();
        let actor = d.get_actor().clone();
        let mut l = LazyDoc::new(d);
        assert!(l.cool() > 0);
        assert!(l.is_cold());
        assert_eq!(l.heads(), heads);
        assert!(l.is_cold(), "heads do not load the document");
        assert_eq!(l.get(ROOT, "k3").unwrap().unwrap().0.as_u64(), Some(3));
        assert!(!l.is_cold());
        assert_eq!(l.get_actor(), &actor);
        // Writing after a reload keeps the actor and moves the heads.
        let mut tx = l.transaction();
        tx.put(ROOT, "k10", 10u64).unwrap();
        tx.commit();
        assert_ne!(l.heads(), heads);
        let new_heads = l.heads();
        l.cool();
        assert_eq!(l.heads(), new_heads, "cooling after a write saves again");
        assert_eq!(l.length(ROOT), 11);
    }

    #[test]
    fn loaded_bytes_are_reused_when_cooling() {
        let d = doc_with(5);
        let bytes = d.save();
        let l2 = Automerge::load(&bytes).unwrap();
        let mut l = LazyDoc::with_saved(l2, bytes.clone());
        assert_eq!(l.cool(), bytes.len());
        assert_eq!(l.save(), bytes);
    }

    /// An archive whose reads fail until `ok` is set.
    struct Flaky {
        bytes: Vec<u8>,
        ok: std::sync::atomic::AtomicBool,
    }

    impl PartArchive for Flaky {
        fn snapshot(&self, _doc: &str) -> Result<Option<Vec<u8>>, String> {
            if self.ok.load(std::sync::atomic::Ordering::Relaxed) {
                Ok(Some(self.bytes.clone()))
            } else {
                Err("disk read failed".into())
            }
        }
    }

    /// A stored document holds no bytes; a failed read shows an empty
    /// document and leaves it cold (the next read tries again); a write
    /// cannot go to the empty stand-in.
    #[test]
    fn a_stored_document_is_read_back_and_a_failed_read_loses_nothing() {
        let d = doc_with(6);
        let (heads, actor) = (d.get_heads(), d.get_actor().clone());
        let flaky = Arc::new(Flaky {
            bytes: d.save(),
            ok: false.into(),
        });
        let archive: Arc<dyn PartArchive> = flaky.clone();
        let mut l = LazyDoc::cold(d.save(), actor.clone(), heads.clone());
        assert!(l.saved_len() > 0);
        assert!(l.store_away("rec/x/202612", &archive));
        assert_eq!(l.saved_len(), 0, "nothing held once stored away");
        assert_eq!(l.heads(), heads, "heads without a read");
        assert_eq!(l.length(ROOT), 0, "a failed read shows an empty document");
        assert!(l.is_cold(), "and keeps it cold");
        assert!(l.save().is_empty());
        let write = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = l.transaction();
        }));
        assert!(write.is_err(), "no write to the empty stand-in");
        flaky.ok.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut l = LazyDoc::stored("rec/x/202612", archive, actor, heads.clone());
        assert_eq!(l.get(ROOT, "k5").unwrap().unwrap().0.as_u64(), Some(5));
        assert_eq!(l.heads(), heads);
        let mut tx = l.transaction();
        tx.put(ROOT, "k6", 6u64).unwrap();
        tx.commit();
        assert_eq!(l.length(ROOT), 7);
    }
}
