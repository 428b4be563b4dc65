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

use automerge::{ActorId, Automerge, ChangeHash};

pub struct LazyDoc {
    live: OnceCell<Automerge>,
    /// Bytes equal to the document's current state (a `save()` or the chunks
    /// it was loaded from), the actor and the heads; `None` once the live
    /// document was borrowed mutably (the bytes may then be stale).
    saved: Option<Saved>,
}

struct Saved {
    bytes: Vec<u8>,
    actor: ActorId,
    heads: Vec<ChangeHash>,
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
            bytes,
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
                bytes,
                actor,
                heads,
            }),
        }
    }

    /// Whether cooling needs no `save()`.
    pub fn has_saved(&self) -> bool {
        self.saved.is_some()
    }

    /// Bytes held for the saved form (0 when none).
    pub fn saved_len(&self) -> usize {
        self.saved.as_ref().map_or(0, |s| s.bytes.len())
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
            bytes: doc.save(),
            actor: doc.get_actor().clone(),
            heads: doc.get_heads(),
        });
        debug_assert_eq!(saved.heads, doc.get_heads(), "saved bytes are stale");
        let n = saved.bytes.len();
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

    /// Bytes of the whole document (its saved bytes when cold).
    pub fn save(&self) -> Vec<u8> {
        match (self.live.get(), &self.saved) {
            (None, Some(s)) => s.bytes.clone(),
            _ => self.load().save(),
        }
    }

    /// Reads the document without keeping a cold one loaded (whole-history
    /// scans that must not warm every part).
    pub fn peek<R>(&self, f: impl FnOnce(&Automerge) -> R) -> R {
        if let Some(d) = self.live.get() {
            return f(d);
        }
        match self.saved.as_ref().map(|s| Automerge::load(&s.bytes)) {
            Some(Ok(d)) => f(&d),
            _ => f(&Automerge::new()),
        }
    }

    fn load(&self) -> &Automerge {
        self.live.get_or_init(|| {
            let Some(s) = &self.saved else {
                return Automerge::new();
            };
            let loaded = Automerge::load(&s.bytes).or_else(|_| {
                let mut d = Automerge::new();
                d.load_incremental(&s.bytes).map(|_| d)
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
}
