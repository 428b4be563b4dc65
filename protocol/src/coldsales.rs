//! The sale index of closed records parts, kept in the store (DESIGN §7,
//! issue 14: memory independent of history).
//!
//! A sale's id is looked up to find its record (`GET /api/sales/{id}`, a
//! return of an old sale) and, for every sale noted, to tell a second use
//! of an id from a first (two nodes apart from each other may use one). The
//! in-memory [`crate::saleindex::SaleIndex`] answers for the parts still
//! written to or not yet indexed; once a part is closed and its
//! [`crate::history::PartIndex`] persisted, its sales are written to the
//! store in the same batch as entries of [`ColdSalesWrites`] and leave
//! memory once that batch is durable. A start notes only the sales of parts
//! whose entries are not stored (open parts, parts indexed by an earlier
//! release, which are written here in batches of
//! [`COLD_PARTS_PER_BATCH`]).
//!
//! This module holds no IO: the engine reads the store through
//! [`crate::lazydoc::PartArchive`] (as it reads cold parts) and writes it
//! through the [`crate::engine::Batch`].
//!
//! Stored form (the store keeps it in three tables and a meta key):
//! - entries: one `u64` key per (sale id, part): the id's 40-bit keyed
//!   fingerprint (HMAC-SHA256 under the node's own stored key, so ids
//!   crafted to share a fingerprint cannot be made offline) in the top bits
//!   and the part's number in the low 24, no value: a lookup reads the
//!   range of its fingerprint;
//! - parts: number → [`ColdPart`] (the document and the heads of the index
//!   its entries were written from);
//! - shared: sale ids noted in more than one records document, settled
//!   again at every start (they are rare: two nodes used one id).

use std::collections::BTreeSet;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// An entry's fingerprint bits (the top 40 of 64).
pub const COLD_FP_MASK: u64 = !0xFF_FFFF;
/// Largest part number an entry holds (its low 24 bits): 16.7 million
/// parts of 2,048 records. Parts past it keep their sales in memory.
pub const COLD_PART_MAX: u32 = 0xFF_FFFF;
/// Parts indexed by an earlier release whose entries one batch writes at
/// most (about 2,048 entries each: a batch of a few hundred KiB).
pub const COLD_PARTS_PER_BATCH: usize = 32;
/// Stored key length.
pub const COLD_KEY_BYTES: usize = 32;

/// One part of the stored index: its number in the entries, its document
/// and the heads of the part index its entries were written from (a part
/// written again since is noted in memory at a start, and written again).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ColdPart {
    pub number: u32,
    pub doc: String,
    pub heads: Vec<[u8; 32]>,
}

/// What a store holds of the index, read once at a start (not the
/// entries, read on demand).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ColdSalesState {
    /// The fingerprint key (`None`: nothing written yet).
    pub key: Option<[u8; COLD_KEY_BYTES]>,
    pub parts: Vec<ColdPart>,
    /// Sale ids held by more than one records document.
    pub shared: Vec<String>,
}

/// What one batch writes to the stored index, in the same transaction as
/// the part indexes it derives from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ColdSalesWrites {
    /// The fingerprint key, with the first entries.
    pub key: Option<[u8; COLD_KEY_BYTES]>,
    /// Parts numbered or written again.
    pub parts: Vec<ColdPart>,
    /// Entries (see the module's doc), sorted.
    pub entries: Vec<u64>,
    pub shared: Vec<String>,
}

impl ColdSalesWrites {
    pub fn is_empty(&self) -> bool {
        self.key.is_none()
            && self.parts.is_empty()
            && self.entries.is_empty()
            && self.shared.is_empty()
    }
}

/// The engine's side of the stored index: the key, the parts' numbers and
/// what is waiting to be written or dropped from memory. Its memory is a
/// name per part, whatever the number of sales.
pub struct ColdSales {
    mac: Option<Hmac<Sha256>>,
    /// Part number → document ("" for a number not in use).
    names: Vec<String>,
    /// Part → heads its stored entries were written from, as read at the
    /// start; emptied once the start has noted every part
    /// ([`ColdSales::end_start`]).
    start_heads: std::collections::HashMap<String, Vec<[u8; 32]>>,
    /// Shared ids stored, settled at the end of the start.
    start_shared: Vec<String>,
    /// Parts indexed (their index stored) whose entries are not stored yet.
    pub(crate) due: BTreeSet<String>,
    /// Parts whose entries a flushed batch holds, with the heads they were
    /// written from: their in-memory entries are dropped once that batch is
    /// durable.
    pub(crate) moving: Vec<(String, Vec<automerge::ChangeHash>)>,
    /// Shared ids to store with the next batch.
    pub(crate) shared_pending: BTreeSet<String>,
}

impl ColdSales {
    /// From what the store holds.
    pub fn from_state(state: ColdSalesState) -> ColdSales {
        let mut names: Vec<String> = Vec::new();
        let mut start_heads = std::collections::HashMap::new();
        for p in state.parts {
            let i = p.number as usize;
            if p.number > COLD_PART_MAX {
                continue;
            }
            if names.len() <= i {
                names.resize(i + 1, String::new());
            }
            names[i] = p.doc.clone();
            start_heads.insert(p.doc, p.heads);
        }
        ColdSales {
            mac: state.key.map(|k| Self::mac_of(&k)),
            names,
            start_heads,
            start_shared: state.shared,
            due: BTreeSet::new(),
            moving: Vec::new(),
            shared_pending: BTreeSet::new(),
        }
    }

    fn mac_of(key: &[u8; COLD_KEY_BYTES]) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length")
    }

    /// Whether anything is stored (a key exists): lookups read the store.
    pub fn has_key(&self) -> bool {
        self.mac.is_some()
    }

    /// The key, made from `entropy` if there is none yet: `Some` when it is
    /// new (to be stored with the entries that use it first).
    pub fn ensure_key(&mut self, entropy: &[u8; 32]) -> Option<[u8; COLD_KEY_BYTES]> {
        if self.mac.is_some() {
            return None;
        }
        let key = crate::crypto::hmac_sha256(entropy, b"storemesh cold sale index key");
        self.mac = Some(Self::mac_of(&key));
        Some(key)
    }

    /// The fingerprint of `id` (the low 24 bits zero); `None` without a key.
    pub fn fingerprint(&self, id: &str) -> Option<u64> {
        let mut m = self.mac.clone()?;
        m.update(id.as_bytes());
        let h = m.finalize().into_bytes();
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[..8]);
        Some(u64::from_be_bytes(b) & COLD_FP_MASK)
    }

    /// The document of part number `n`.
    pub fn part_doc(&self, n: u32) -> Option<&str> {
        self.names
            .get(n as usize)
            .map(String::as_str)
            .filter(|d| !d.is_empty())
    }

    /// The number of part `doc`, given one if it has none; `None` past
    /// [`COLD_PART_MAX`].
    pub fn number(&mut self, doc: &str) -> Option<u32> {
        if let Some(i) = self.names.iter().position(|d| d == doc) {
            return Some(i as u32);
        }
        let n = u32::try_from(self.names.len())
            .ok()
            .filter(|n| *n <= COLD_PART_MAX)?;
        self.names.push(doc.to_string());
        Some(n)
    }

    /// Whether the stored entries of `doc` were written from the part
    /// index with `heads` (read at the start only).
    pub fn covers(&self, doc: &str, heads: &[[u8; 32]]) -> bool {
        self.start_heads.get(doc).is_some_and(|h| h == heads)
    }

    /// The stored shared ids, once (at the end of a start).
    pub fn take_start_shared(&mut self) -> Vec<String> {
        std::mem::take(&mut self.start_shared)
    }

    /// The start has noted every part: what it needed of the stored parts
    /// is dropped.
    pub fn end_start(&mut self) {
        self.start_heads = Default::default();
    }

    /// The entry of a sale with fingerprint `fp` in part number `n`.
    pub fn entry(fp: u64, n: u32) -> u64 {
        (fp & COLD_FP_MASK) | u64::from(n & COLD_PART_MAX)
    }

    /// The part number of an entry.
    pub fn entry_part(e: u64) -> u32 {
        (e & !COLD_FP_MASK) as u32
    }

    /// The range of entries of fingerprint `fp` (inclusive).
    pub fn range(fp: u64) -> (u64, u64) {
        (
            fp & COLD_FP_MASK,
            (fp & COLD_FP_MASK) | u64::from(COLD_PART_MAX),
        )
    }

    /// Heap bytes held: the parts' names, whatever the number of sales.
    pub fn held_bytes(&self) -> usize {
        self.names.capacity() * std::mem::size_of::<String>()
            + self.names.iter().map(String::capacity).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_keyed_and_entries_round_trip() {
        let mut a = ColdSales::from_state(ColdSalesState::default());
        assert!(a.fingerprint("s-1").is_none(), "no key, no fingerprint");
        let key = a.ensure_key(&[1; 32]).expect("a new key");
        assert!(a.ensure_key(&[2; 32]).is_none(), "made once");
        let fp = a.fingerprint("s-1").unwrap();
        assert_eq!(fp & !COLD_FP_MASK, 0);
        // The same key read back gives the same fingerprints; another key
        // other ones.
        let b = ColdSales::from_state(ColdSalesState {
            key: Some(key),
            ..Default::default()
        });
        assert_eq!(b.fingerprint("s-1"), Some(fp));
        let mut c = ColdSales::from_state(ColdSalesState::default());
        c.ensure_key(&[2; 32]);
        assert_ne!(c.fingerprint("s-1"), Some(fp));
        let e = ColdSales::entry(fp, 77);
        assert_eq!(ColdSales::entry_part(e), 77);
        let (lo, hi) = ColdSales::range(fp);
        assert!(lo <= e && e <= hi);
        assert!(ColdSales::entry(fp.wrapping_add(1 << 24), 0) > hi);
    }

    #[test]
    fn parts_are_numbered_once_and_read_back() {
        let mut a = ColdSales::from_state(ColdSalesState {
            key: Some([3; 32]),
            parts: vec![ColdPart {
                number: 4,
                doc: "rec/a/202601/1".into(),
                heads: vec![[9; 32]],
            }],
            shared: vec!["s-9".into()],
        });
        assert_eq!(a.part_doc(4), Some("rec/a/202601/1"));
        assert_eq!(a.part_doc(0), None);
        assert_eq!(a.number("rec/a/202601/1"), Some(4));
        assert_eq!(a.number("rec/a/202601/2"), Some(5));
        assert_eq!(a.number("rec/a/202601/2"), Some(5));
        assert!(a.covers("rec/a/202601/1", &[[9; 32]]));
        assert!(!a.covers("rec/a/202601/1", &[[8; 32]]));
        assert_eq!(a.take_start_shared(), vec!["s-9".to_string()]);
        assert!(a.take_start_shared().is_empty());
        a.end_start();
        assert!(!a.covers("rec/a/202601/1", &[[9; 32]]));
    }
}
