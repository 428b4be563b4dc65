//! Messages of the sync protocol (`Msg`, after the hello) and their kinds
//! (metrics labels).

use serde::{Deserialize, Serialize};

use crate::ids::NODE_TAG_BYTES;

/// Messages of the sync protocol (after the hello).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Msg {
    /// Key-store entries (customer id → keys or erased); merged, erasure wins.
    Keys {
        entries: Vec<(String, crate::crypto::KeyEntry)>,
    },
    /// A request for sell-rights (rebalancing); small, sent ahead of document sync.
    Rights(crate::rebalance::RightsRequest),
    /// Digest over every document's heads, and over the customer key store.
    Root {
        digest: [u8; 32],
        keys: [u8; 32],
    },
    Groups {
        digests: Vec<u64>,
    },
    Docs {
        group: u16,
        entries: Vec<(String, u64)>,
        last: bool,
    },
    Sync {
        doc: String,
        data: Vec<u8>,
    },
    Part {
        doc: String,
        data: Vec<u8>,
        last: bool,
    },
    Fallback {
        doc: String,
        data: Vec<u8>,
    },
    /// New changes of one document, pushed after they became durable: raw
    /// Automerge changes (`save_after` form) and the nodes the sender knows
    /// to have them (itself, the peers it pushed them to, and those its own
    /// source had covered), so that receivers forward them only to the rest.
    Push {
        doc: String,
        data: Vec<u8>,
        seen: Vec<[u8; NODE_TAG_BYTES]>,
    },
    /// The sender's heads of one document after it caught up through a sync
    /// session: changes that arrived that way are announced, not pushed (its
    /// other peers are often catching up on the same changes themselves); a
    /// receiver that lacks some of them fetches them through a session.
    Have {
        doc: String,
        heads: Vec<[u8; 32]>,
    },
    /// Batch certificates of changes about to be sent (`signing`), sent
    /// just before the frames that carry those changes, with introductions
    /// of their signers for a receiver that may not know them (behind a hub).
    Certs {
        certs: Vec<crate::signing::Cert>,
        intros: Vec<crate::signing::Introduction>,
    },
}

/// Names of the message kinds, in `Msg::kind_index` order (metrics label).
pub const MSG_KINDS: [&str; 11] = [
    "keys", "rights", "root", "groups", "docs", "sync", "part", "fallback", "push", "have", "certs",
];

impl Msg {
    /// Index of this message's kind in `MSG_KINDS`.
    pub fn kind_index(&self) -> usize {
        match self {
            Msg::Keys { .. } => 0,
            Msg::Rights(_) => 1,
            Msg::Root { .. } => 2,
            Msg::Groups { .. } => 3,
            Msg::Docs { .. } => 4,
            Msg::Sync { .. } => 5,
            Msg::Part { .. } => 6,
            Msg::Fallback { .. } => 7,
            Msg::Push { .. } => 8,
            Msg::Have { .. } => 9,
            Msg::Certs { .. } => 10,
        }
    }
}
