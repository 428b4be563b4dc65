//! Digests: per-document and per-group digests of heads (a one-level
//! Merkle tree over documents) and key-store entry hashes.

use automerge::ChangeHash;
use sha2::{Digest as _, Sha256};

use super::GROUPS;
use crate::ids::fnv1a64;

/// Hash of one key-store entry, XOR-folded into the key-store digest.
pub fn key_digest(customer: &str, entry: &crate::crypto::KeyEntry) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(customer.as_bytes());
    h.update([0]);
    h.update(postcard::to_stdvec(entry).unwrap_or_default());
    h.finalize().into()
}

/// Hash of one document's heads, as folded into its group digest.
pub fn doc_digest(id: &str, heads: &[ChangeHash]) -> u64 {
    if heads.is_empty() {
        return 0;
    }
    let mut h = Sha256::new();
    h.update(id.as_bytes());
    let mut sorted: Vec<&ChangeHash> = heads.iter().collect();
    sorted.sort();
    for c in sorted {
        h.update(c.0);
    }
    let d = h.finalize();
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

pub fn group_of(id: &str) -> usize {
    (fnv1a64(id.as_bytes()) % GROUPS as u64) as usize
}

/// XOR-folded digests per group, maintained incrementally.
#[derive(Clone, Debug)]
pub struct Digest {
    pub groups: Vec<u64>,
}

impl Default for Digest {
    fn default() -> Self {
        Digest {
            groups: vec![0; GROUPS],
        }
    }
}

impl Digest {
    pub fn toggle(&mut self, id: &str, part: u64) {
        self.groups[group_of(id)] ^= part;
    }
    pub fn root(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for g in &self.groups {
            h.update(g.to_le_bytes());
        }
        h.finalize().into()
    }
}
