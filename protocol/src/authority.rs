//! Who may write what (DESIGN §7, "Authorship is proved, not claimed"):
//! the bindings the operator made (names and locations to node ids), the
//! administrators whose retirements count, and the budgets that keep a peer
//! from erasing every customer or filling customers' key sets.
//!
//! Validation (`validate::check_op`) consults a `validate::AuthView` (this
//! module's [`Authority`] over the receiver's views; it lives with validation
//! so that this module names no view): a change is applied only if its
//! author owns every key it writes and every record it writes names that
//! author; a directory entry never claims a name or a location the
//! receiver's operator bound to another node; a retirement needs an
//! administrator (when the operator named any) and a successor the chain
//! knows. Refusals are [`Unauthorized`] (validation's
//! `Refusal::Unauthorized`), counted under
//! `storemesh_rejected_changes_total{reason="unauthorized"}`.
//!
//! What this does not do yet: prove the author. A change's author is still
//! the actor id it carries (see README, "What a stolen node can do").

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::ids::{NodeInfo, NodeTag};

/// An authorization refusal: the author has no right to write this. Shown
/// as `unauthorized: ` and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unauthorized: {0}")]
pub struct Unauthorized(pub String);

/// Customers a single peer may newly mark erased per budget window. An
/// honest erasure is an operator's act for one customer at a time; a peer
/// sending more is held back (the key-store sync offers them again later),
/// so a hostile node cannot erase every customer at once.
pub const PEER_ERASURES_PER_WINDOW_MAX: u32 = 500;
/// Keys a single peer may add per budget window to customers that already
/// have keys here. Honest additions happen only when two nodes created one
/// customer concurrently (one extra key); a peer that adds many is filling
/// customers' key sets (refused past `crypto::KEYS_PER_CUSTOMER_MAX`).
pub const PEER_KEY_ADDITIONS_PER_WINDOW_MAX: u32 = 500;
/// The budget window: one hour.
pub const PEER_BUDGET_WINDOW_MS: u64 = 3_600_000;
/// Peers whose budgets are tracked at most (configured peers are far fewer).
pub const PEER_BUDGETS_MAX: usize = 1024;

/// Names and locations bound to node ids by the operator's configuration.
#[derive(Clone, Debug, Default)]
pub struct Bindings {
    /// name → node (own name, configured peers).
    pub names: BTreeMap<String, NodeTag>,
    /// location → node (own location, configured peers' `location`).
    pub locations: BTreeMap<String, NodeTag>,
    by_tag_name: BTreeMap<NodeTag, String>,
    by_tag_location: BTreeMap<NodeTag, String>,
}

impl Bindings {
    /// Binds `name` to `tag`. The first binding of a name or a tag wins
    /// (the configuration refuses duplicates; this keeps the map exact).
    pub fn bind_name(&mut self, name: &str, tag: NodeTag) {
        if self.names.contains_key(name) || self.by_tag_name.contains_key(&tag) {
            return;
        }
        self.names.insert(name.to_string(), tag);
        self.by_tag_name.insert(tag, name.to_string());
    }

    pub fn bind_location(&mut self, location: &str, tag: NodeTag) {
        if self.locations.contains_key(location) || self.by_tag_location.contains_key(&tag) {
            return;
        }
        self.locations.insert(location.to_string(), tag);
        self.by_tag_location.insert(tag, location.to_string());
    }

    pub fn name_of(&self, tag: NodeTag) -> Option<&str> {
        self.by_tag_name.get(&tag).map(String::as_str)
    }

    pub fn has_name(&self, tag: NodeTag) -> bool {
        self.by_tag_name.contains_key(&tag)
    }

    pub fn has_location(&self, tag: NodeTag) -> bool {
        self.by_tag_location.contains_key(&tag)
    }

    /// Why `author`'s directory entry `info` is refused here, if it is: it
    /// claims a name or a location the operator bound to another node. (An
    /// entry that names its own node otherwise than the operator did is
    /// applied but does not count: `Views::name_of` answers the binding.)
    pub fn check_directory_entry(
        &self,
        author: NodeTag,
        info: &NodeInfo,
    ) -> Result<(), Unauthorized> {
        if let Some(t) = self.names.get(&info.name) {
            if *t != author {
                return Err(Unauthorized(format!(
                    "directory entry claims the name {:?}, bound here to another node",
                    info.name
                )));
            }
        }
        if let Some(loc) = &info.location {
            if let Some(t) = self.locations.get(loc) {
                if *t != author {
                    return Err(Unauthorized(format!(
                        "directory entry claims the location {loc:?}, bound here to another node"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Operator's authority beyond the bindings.
#[derive(Clone, Debug, Default)]
pub struct Authority {
    /// Nodes whose retirements this node accepts; `None`: the operator named
    /// none, and any member's retirement counts (the v1 behaviour, kept so a
    /// mesh set up with `init`, `peer add` and `run` alone can retire nodes).
    pub administrators: Option<BTreeSet<NodeTag>>,
    budgets: HashMap<NodeTag, PeerBudget>,
}

#[derive(Clone, Debug, Default)]
struct PeerBudget {
    window_start_ms: u64,
    erasures: u32,
    key_additions: u32,
}

/// What a peer's key-store entry would do here (for its budget).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStoreAct {
    Erase,
    AddKeys(u32),
}

impl Authority {
    /// Takes `act` from `peer`'s budget; `false`: over budget, refuse it.
    pub fn spend(&mut self, peer: NodeTag, act: KeyStoreAct, now_ms: u64) -> bool {
        if !self.budgets.contains_key(&peer) && self.budgets.len() >= PEER_BUDGETS_MAX {
            // Sessions exist only for configured peers; this is a safety net.
            self.budgets.clear();
        }
        let b = self.budgets.entry(peer).or_default();
        if now_ms.saturating_sub(b.window_start_ms) >= PEER_BUDGET_WINDOW_MS
            || now_ms < b.window_start_ms
        {
            *b = PeerBudget {
                window_start_ms: now_ms,
                ..PeerBudget::default()
            };
        }
        match act {
            KeyStoreAct::Erase => {
                if b.erasures >= PEER_ERASURES_PER_WINDOW_MAX {
                    return false;
                }
                b.erasures += 1;
            }
            KeyStoreAct::AddKeys(n) => {
                if b.key_additions.saturating_add(n) > PEER_KEY_ADDITIONS_PER_WINDOW_MAX {
                    return false;
                }
                b.key_additions += n;
            }
        }
        true
    }
}
