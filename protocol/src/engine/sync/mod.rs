//! The engine's side of the sync protocol (`crate::sync`): peers coming and
//! going, receiving frames, and the outgoing per-document sync sessions.

use automerge::ChangeHash;

use super::Engine;

mod peers;
mod receive;
mod session;

impl Engine {
    /// Has this document got changes by the given peer's node that we lack? (tests)
    pub fn heads_of(&self, doc: &str) -> Option<Vec<ChangeHash>> {
        self.docs.get(doc).map(|s| s.doc.heads())
    }

    pub fn digest_root(&self) -> [u8; 32] {
        self.digest.root()
    }
}
