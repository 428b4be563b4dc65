//! The sale index: sale id → the records documents that may hold it
//! (DESIGN §7), in about 5 bytes a sale.

use std::collections::HashMap;

/// sale id → the records documents that may hold `sale/<id>` (DESIGN §7:
/// history lookups without a map entry per sale in memory).
///
/// Each sale is one entry: a 40-bit keyed fingerprint of its id and the
/// 16-bit index of its document in a table of names. Entries sit in a sorted
/// array cut into 65,536 buckets by the fingerprint's top 16 bits, so an
/// entry is stored in 5 bytes without them; recent sales reach the array in
/// merges, and no hash table's spare capacity grows with the history (the
/// 64-bit hash table this replaces cost ~27 bytes per sale at 2,000,000
/// sales, the 8-byte array before this one 8). A fingerprint may stand for
/// more than one id (at 2,000,000 sales a new id matches one with
/// probability 2·10⁻⁶): every document under it is a candidate, and the
/// engine checks the document for the id's key
/// ([`crate::engine::Engine::sale_doc`]). An id found in more than one
/// document (two nodes apart from each other used it) has the document to
/// look up first kept exactly in `preferred`.
#[derive(Default)]
pub struct SaleIndex {
    /// Random keys per process: placement never shows outside, and ids
    /// crafted to collide cannot be made offline.
    keys: std::collections::hash_map::RandomState,
    names: Vec<String>,
    name_ix: HashMap<String, u32>,
    /// The entries (`fingerprint | document`, see [`SaleIndex::entry`])
    /// without their bucket bits ([`pack`]), sorted, without duplicates.
    sorted: Vec<Packed>,
    /// `starts[b]`: the first position in `sorted` of bucket `b` (one more
    /// slot at the end), so that a lookup searches ~`len / 65,536` entries
    /// and an entry's bucket need not be stored.
    starts: Vec<u32>,
    /// Entries added since the last merge into `sorted`.
    recent: std::collections::BTreeSet<u64>,
    preferred: HashMap<String, u32>,
    /// Sales in documents whose index does not fit 16 bits (a node would
    /// have to hold 65,536 records parts, ~130 million sales), kept exactly.
    overflow: HashMap<String, Vec<u32>>,
    /// During a start ([`SaleIndex::begin_bulk`]): entries collected
    /// unchecked, sorted once at its end. Looking each stored sale up before
    /// adding it was 40 % of a restart at 1.8 million sales.
    bulk: Option<Vec<u64>>,
}

/// An entry's fingerprint bits (the top 40 of 64).
const SALE_INDEX_FP_MASK: u64 = !0xFF_FFFF;
/// Largest document index an entry holds (the low 16 bits; bits 16..24 are
/// zero).
const SALE_INDEX_DOC_MAX: u64 = 0xFFFF;

/// Entries a bulk load collects before it sorts them into the array (2 MiB).
const SALE_INDEX_BULK_CHUNK: usize = 262_144;

/// Pairs kept in `recent` before they are merged into the sorted array
/// (the merge moves the array's entries in place every 65,536 sales).
const SALE_INDEX_RECENT_MAX: usize = 65_536;

/// Top bits of an entry that pick its bucket in `starts` (256 KiB of
/// offsets, whatever the history).
const SALE_INDEX_BUCKET_BITS: u32 = 16;
const SALE_INDEX_BUCKETS: usize = 1 << SALE_INDEX_BUCKET_BITS;

/// An entry without its bucket: fingerprint bits 24..48, document bits 0..16,
/// big-endian, so that the packed entries of one bucket sort as the entries.
type Packed = [u8; 5];

fn bucket_of(entry: u64) -> usize {
    (entry >> (64 - SALE_INDEX_BUCKET_BITS)) as usize
}

fn pack(entry: u64) -> Packed {
    let b = entry.to_be_bytes();
    [b[2], b[3], b[4], b[6], b[7]]
}

fn unpack(bucket: usize, p: Packed) -> u64 {
    u64::from_be_bytes([0, 0, p[0], p[1], p[2], 0, p[3], p[4]])
        | ((bucket as u64) << (64 - SALE_INDEX_BUCKET_BITS))
}

impl SaleIndex {
    /// The id's fingerprint (the low 24 bits zero).
    fn fingerprint(&self, id: &str) -> u64 {
        use std::hash::BuildHasher;
        self.keys.hash_one(id) & SALE_INDEX_FP_MASK
    }

    fn intern(&mut self, doc: &str) -> u32 {
        if let Some(i) = self.name_ix.get(doc) {
            return *i;
        }
        let i = self.names.len() as u32;
        self.names.push(doc.to_string());
        self.name_ix.insert(doc.to_string(), i);
        i
    }

    /// Documents that may hold sale `id`: the preferred one first, then
    /// every document under its fingerprint (some may hold other ids).
    pub fn candidates(&self, id: &str) -> impl Iterator<Item = &str> {
        let fp = self.fingerprint(id);
        let first = self.preferred.get(id).copied();
        let last = fp | SALE_INDEX_DOC_MAX;
        let b = bucket_of(fp);
        let from_sorted = self
            .bucket(b)
            .iter()
            .map(move |p| unpack(b, *p))
            .skip_while(move |e| *e < fp)
            .take_while(move |e| *e <= last);
        let from_recent = self.recent.range(fp..=last).copied();
        let docs = from_sorted
            .chain(from_recent)
            .map(|e| (e & SALE_INDEX_DOC_MAX) as u32)
            .chain(self.overflow.get(id).into_iter().flatten().copied());
        first
            .into_iter()
            .chain(docs.filter(move |d| Some(*d) != first))
            .filter_map(|i| self.names.get(i as usize).map(String::as_str))
    }

    /// Notes that `doc` holds a sale of `id`.
    pub fn add(&mut self, id: &str, doc: &str) {
        let d = self.intern(doc);
        if u64::from(d) > SALE_INDEX_DOC_MAX {
            let docs = self.overflow.entry(id.to_string()).or_default();
            if !docs.contains(&d) {
                docs.push(d);
            }
            return;
        }
        let entry = self.fingerprint(id) | u64::from(d);
        if let Some(bulk) = self.bulk.as_mut() {
            bulk.push(entry);
            if bulk.len() >= SALE_INDEX_BULK_CHUNK {
                self.merge_bulk_chunk();
            }
            return;
        }
        if self
            .bucket(bucket_of(entry))
            .binary_search(&pack(entry))
            .is_ok()
            || !self.recent.insert(entry)
        {
            return;
        }
        if self.recent.len() >= SALE_INDEX_RECENT_MAX {
            self.merge();
        }
    }

    /// Starts a bulk load (a start notes every stored sale once): from now
    /// on [`SaleIndex::add`] collects entries unchecked, and
    /// [`SaleIndex::candidates`] may miss them until [`SaleIndex::end_bulk`].
    pub fn begin_bulk(&mut self) {
        if self.bulk.is_none() {
            self.merge();
            self.bulk = Some(Vec::new());
        }
    }

    /// Whether a bulk load is under way.
    pub fn in_bulk(&self) -> bool {
        self.bulk.is_some()
    }

    /// Ends a bulk load: every entry collected is sorted into the index at
    /// once. Returns the fingerprints found under more than one document,
    /// each with those documents' names in name order: the only places
    /// where one id may be held twice (or two ids share a fingerprint),
    /// which the caller settles as [`SaleIndex::add`]'s callers do one by one.
    pub fn end_bulk(&mut self) -> Vec<(u64, Vec<String>)> {
        if self.bulk.is_none() {
            return Vec::new();
        }
        self.merge_bulk_chunk();
        self.bulk = None;
        let mut shared: Vec<(u64, Vec<String>)> = Vec::new();
        let mut last: Option<u64> = None;
        for e in self.all_entries() {
            let fp = e & SALE_INDEX_FP_MASK;
            let name = || self.names.get((e & SALE_INDEX_DOC_MAX) as usize).cloned();
            if last.is_some_and(|l| l & SALE_INDEX_FP_MASK == fp) {
                match shared.last_mut() {
                    Some((f, docs)) if *f == fp => docs.extend(name()),
                    _ => {
                        let prev = last.and_then(|l| {
                            self.names.get((l & SALE_INDEX_DOC_MAX) as usize).cloned()
                        });
                        shared.push((fp, prev.into_iter().chain(name()).collect()));
                    }
                }
            }
            last = Some(e);
        }
        for (_, docs) in shared.iter_mut() {
            docs.sort();
        }
        shared
    }

    /// Sorts the bulk entries collected so far into `sorted` (at most
    /// [`SALE_INDEX_BULK_CHUNK`] of them wait unsorted: a start never holds
    /// a second copy of the index).
    fn merge_bulk_chunk(&mut self) {
        let Some(mut chunk) = self.bulk.as_mut().map(std::mem::take) else {
            return;
        };
        chunk.sort_unstable();
        chunk.dedup();
        chunk.retain(|e| {
            self.bucket(bucket_of(*e)).binary_search(&pack(*e)).is_err() && !self.recent.contains(e)
        });
        if self.starts.is_empty() && self.recent.len() + chunk.len() < SALE_INDEX_RECENT_MAX {
            // Few (a start whose closed parts' sales are in the store): kept
            // as recent entries, without the array's offsets (256 KiB).
            self.recent.extend(chunk.iter().copied());
            self.bulk = Some(Vec::new());
            return;
        }
        self.merge_sorted(&chunk);
        chunk.clear();
        self.bulk = Some(chunk);
    }

    /// The entries of `sorted` and `recent`, in order.
    fn all_entries(&self) -> impl Iterator<Item = u64> + '_ {
        let mut a = self.entries().peekable();
        let mut b = self.recent.iter().copied().peekable();
        std::iter::from_fn(move || match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x <= y => a.next(),
            (Some(_), Some(_)) | (None, Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, None) => None,
        })
    }

    /// Whether `id` has the fingerprint `fp` (as [`SaleIndex::end_bulk`]
    /// returns it).
    pub fn has_fingerprint(&self, id: &str, fp: u64) -> bool {
        self.fingerprint(id) == fp
    }

    /// Makes `doc` the document `id` is looked up in first (for an id found
    /// in more than one document).
    pub fn prefer(&mut self, id: &str, doc: &str) {
        let d = self.intern(doc);
        self.preferred.insert(id.to_string(), d);
    }

    /// The packed entries of `sorted` in bucket `b` (sorted).
    fn bucket(&self, b: usize) -> &[Packed] {
        match (self.starts.get(b), self.starts.get(b + 1)) {
            (Some(&lo), Some(&hi)) => self.sorted.get(lo as usize..hi as usize).unwrap_or(&[]),
            // Before the first merge, `starts` is empty: so is `sorted`.
            _ => &[],
        }
    }

    /// The entries of `sorted`, in order.
    fn entries(&self) -> impl Iterator<Item = u64> + '_ {
        (0..SALE_INDEX_BUCKETS).flat_map(move |b| self.bucket(b).iter().map(move |p| unpack(b, *p)))
    }

    /// Merges `recent` into `sorted` in place, from the back, bucket by
    /// bucket (no second array: at millions of sales a copy was tens of MiB
    /// to allocate and zero at every merge), and moves `starts`.
    fn merge(&mut self) {
        let recent: Vec<u64> = std::mem::take(&mut self.recent).into_iter().collect();
        self.merge_sorted(&recent);
    }

    /// Merges entries (sorted, none of them in `sorted` yet) as [`SaleIndex::merge`].
    fn merge_sorted(&mut self, recent: &[u64]) {
        if recent.is_empty() {
            return;
        }
        if self.starts.is_empty() {
            self.starts = vec![0; SALE_INDEX_BUCKETS + 1];
        }
        let n = self.sorted.len();
        // Exact: a doubling growth would hold up to 5 spare bytes per sale.
        self.sorted.reserve_exact(recent.len());
        self.sorted.resize(n + recent.len(), [0; 5]);
        let (mut j, mut k) = (recent.len(), self.sorted.len());
        // The old end of the bucket at hand (`starts[b + 1]` already moved).
        let mut old_hi = n;
        for b in (0..SALE_INDEX_BUCKETS).rev() {
            let lo = self.starts[b] as usize;
            let mut i = old_hi;
            old_hi = lo;
            while j > 0 && bucket_of(recent[j - 1]) == b {
                let r = pack(recent[j - 1]);
                k -= 1;
                if i > lo && self.sorted[i - 1] > r {
                    self.sorted[k] = self.sorted[i - 1];
                    i -= 1;
                } else {
                    self.sorted[k] = r;
                    j -= 1;
                }
            }
            // The bucket's older entries left: moved up as one block.
            let left = i - lo;
            if k != i {
                self.sorted.copy_within(lo..i, k - left);
            }
            k -= left;
            // Every bucket before this one moves up by the recent entries
            // still to place (all in lower buckets).
            self.starts[b] = k as u32;
            debug_assert_eq!(
                k,
                lo + j,
                "sale index merge: bucket {b} lands after the rest"
            );
        }
        self.starts[SALE_INDEX_BUCKETS] = self.sorted.len() as u32;
        debug_assert!(
            self.entries()
                .zip(self.entries().skip(1))
                .all(|(a, b)| a < b),
            "sale index sorted"
        );
    }

    /// Forgets the sales noted in `doc` (a closed part whose sales are in
    /// the store now, `coldsales`): its entries leave the array, which gives
    /// back the memory it no longer needs. The document's name stays (a
    /// preferred document may still name it). Returns the entries removed.
    pub fn remove_doc(&mut self, doc: &str) -> usize {
        let Some(&d) = self.name_ix.get(doc) else {
            return 0;
        };
        let before = self.len();
        for docs in self.overflow.values_mut() {
            docs.retain(|x| *x != d);
        }
        self.overflow.retain(|_, docs| !docs.is_empty());
        if u64::from(d) <= SALE_INDEX_DOC_MAX {
            let d = u64::from(d);
            self.recent.retain(|e| e & SALE_INDEX_DOC_MAX != d);
            if let Some(bulk) = self.bulk.as_mut() {
                bulk.retain(|e| e & SALE_INDEX_DOC_MAX != d);
            }
            if !self.starts.is_empty() {
                // Compacted in place, bucket by bucket (`starts[b + 1]` is
                // read before it is moved).
                let mut w = 0usize;
                for b in 0..SALE_INDEX_BUCKETS {
                    let (lo, hi) = (self.starts[b] as usize, self.starts[b + 1] as usize);
                    self.starts[b] = w as u32;
                    for i in lo..hi {
                        let p = self.sorted[i];
                        if u64::from(u16::from_be_bytes([p[3], p[4]])) != d {
                            self.sorted[w] = p;
                            w += 1;
                        }
                    }
                }
                self.starts[SALE_INDEX_BUCKETS] = w as u32;
                self.sorted.truncate(w);
                if w == 0 {
                    // The offsets too (256 KiB): the next merge makes them.
                    self.sorted = Vec::new();
                    self.starts = Vec::new();
                } else if self.sorted.capacity() > 2 * w + SALE_INDEX_RECENT_MAX {
                    self.sorted.shrink_to_fit();
                }
            }
        }
        before - self.len()
    }

    /// Heap bytes the index holds for its entries (its names and exact
    /// maps aside): what grows with the number of sales.
    pub fn entry_bytes(&self) -> usize {
        // A B-tree set holds up to 11 entries per node of ~100 bytes.
        self.sorted.capacity() * std::mem::size_of::<Packed>()
            + self.recent.len() * 16
            + self.starts.capacity() * 4
            + self.bulk.as_ref().map_or(0, |b| b.capacity() * 8)
    }

    /// (id, document) pairs held.
    pub fn len(&self) -> usize {
        self.sorted.len()
            + self.recent.len()
            + self.bulk.as_ref().map_or(0, Vec::len)
            + self.overflow.values().map(Vec::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every id added is found under its documents across merges into the
    /// sorted array, ids never added are not (but for fingerprint
    /// collisions, which the engine filters), and a preferred document comes
    /// first.
    #[test]
    fn the_sale_index_finds_every_sale_across_merges() {
        let mut ix = SaleIndex::default();
        let n = 3 * SALE_INDEX_RECENT_MAX as u64 + 17;
        for i in 0..n {
            ix.add(&format!("s-{i}"), &format!("rec/a/2026{:02}", i % 12 + 1));
        }
        // Adding again changes nothing.
        ix.add("s-5", "rec/a/202606");
        assert_eq!(ix.len() as u64, n);
        assert!(ix.sorted.len() >= 3 * SALE_INDEX_RECENT_MAX, "merged");
        let all: Vec<u64> = ix.entries().collect();
        assert_eq!(all.len(), ix.sorted.len());
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        for i in (0..n).step_by(997) {
            let want = format!("rec/a/2026{:02}", i % 12 + 1);
            let found: Vec<&str> = ix.candidates(&format!("s-{i}")).collect();
            assert!(found.contains(&want.as_str()), "s-{i}: {found:?}");
        }
        let strangers = (0..10_000)
            .filter(|i| ix.candidates(&format!("x-{i}")).next().is_some())
            .count();
        assert!(strangers <= 1, "{strangers} fingerprint matches of 10,000");
        // A second document for one id, preferred.
        ix.add("s-1", "rec/b/202602");
        ix.prefer("s-1", "rec/b/202602");
        let found: Vec<&str> = ix.candidates("s-1").collect();
        assert_eq!(found, vec!["rec/b/202602", "rec/a/202602"]);
        ix.prefer("s-1", "rec/a/202602");
        assert_eq!(ix.candidates("s-1").next(), Some("rec/a/202602"));
    }

    /// Removing a document's sales (its part's sales went to the store)
    /// keeps every other document's, in the array and in `recent`, and
    /// gives the array's memory back.
    #[test]
    fn removing_a_document_keeps_the_others_and_frees_memory() {
        let mut ix = SaleIndex::default();
        let n = 2 * SALE_INDEX_RECENT_MAX as u64 + 100;
        for i in 0..n {
            ix.add(&format!("s-{i}"), &format!("rec/a/2026{:02}", i % 4 + 1));
        }
        assert!(!ix.sorted.is_empty() && !ix.recent.is_empty());
        let bytes = ix.entry_bytes();
        let removed = ix.remove_doc("rec/a/202602");
        assert_eq!(removed as u64, n / 4);
        assert_eq!(ix.len() as u64, n - n / 4);
        assert_eq!(ix.remove_doc("rec/a/202602"), 0);
        assert_eq!(ix.remove_doc("rec/unknown"), 0);
        for i in (0..n).step_by(101) {
            let found: Vec<&str> = ix.candidates(&format!("s-{i}")).collect();
            if i % 4 == 1 {
                assert!(!found.contains(&"rec/a/202602"), "s-{i}: {found:?}");
            } else {
                let want = format!("rec/a/2026{:02}", i % 4 + 1);
                assert!(found.contains(&want.as_str()), "s-{i}: {found:?}");
            }
        }
        let all: Vec<u64> = ix.entries().collect();
        assert!(all.windows(2).all(|w| w[0] < w[1]), "still sorted");
        for d in ["rec/a/202601", "rec/a/202603", "rec/a/202604"] {
            ix.remove_doc(d);
        }
        assert!(ix.is_empty());
        assert!(
            ix.entry_bytes() * 10 < bytes,
            "{} of {bytes} bytes kept",
            ix.entry_bytes()
        );
        // Adding again works from empty.
        ix.add("late", "rec/b/202605");
        assert_eq!(
            ix.candidates("late").collect::<Vec<_>>(),
            vec!["rec/b/202605"]
        );
    }

    /// A bulk load finds every id it collected, adds nothing twice, and
    /// names the fingerprints held under more than one document.
    #[test]
    fn a_bulk_load_finds_every_sale_and_names_shared_fingerprints() {
        let mut ix = SaleIndex::default();
        ix.add("before", "rec/a/202601");
        ix.begin_bulk();
        // More than one chunk; s-3 held twice (two nodes used it), s-7 noted
        // twice in one document, in different chunks.
        let n = SALE_INDEX_BULK_CHUNK as u64 + 5;
        ix.add("s-7", "rec/a/202608");
        for i in 0..n {
            ix.add(&format!("s-{i}"), &format!("rec/a/2026{:02}", i % 12 + 1));
        }
        ix.add("s-3", "rec/b/202604");
        let shared = ix.end_bulk();
        assert!(!ix.in_bulk());
        assert_eq!(ix.len() as u64, n + 2);
        for i in (0..n).step_by(499) {
            let want = format!("rec/a/2026{:02}", i % 12 + 1);
            let found: Vec<&str> = ix.candidates(&format!("s-{i}")).collect();
            assert!(found.contains(&want.as_str()), "s-{i}: {found:?}");
        }
        assert!(ix.candidates("before").next().is_some());
        let s3 = shared
            .iter()
            .find(|(fp, _)| ix.has_fingerprint("s-3", *fp))
            .expect("s-3 is held under two documents");
        assert_eq!(
            s3.1,
            vec!["rec/a/202604".to_string(), "rec/b/202604".to_string()]
        );
        assert!(
            !shared.iter().any(|(fp, _)| ix.has_fingerprint("s-7", *fp)),
            "one document noted twice is not shared"
        );
        // Adding after the bulk works as before.
        ix.add("late", "rec/c/202612");
        assert_eq!(
            ix.candidates("late").collect::<Vec<_>>(),
            vec!["rec/c/202612"]
        );
    }
}
