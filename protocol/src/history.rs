//! History kept by a node (DESIGN §7, issue 14): records parts that go
//! cold, the index of records (sale lookup, purchase history, alarms), and
//! the bounded feed of noted sales that webhooks read.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::{ReadDoc, ROOT};

use crate::engine::Engine;
use crate::ids::{ActorKey, NodeTag};
use crate::layout::{self, DocId, RecordKind};
use crate::views::Alarm;

/// Closed records parts whose index and snapshot one batch writes at most:
/// an upgraded node indexing its whole history spreads it over batches of a
/// few MiB.
pub const PART_INDEXES_PER_BATCH: usize = 32;

/// Most records are sales without a customer: all they index is their id
/// (`note_record`), and a part's index keeps only their key.
fn id_only(kind: RecordKind, json: &str) -> bool {
    kind == RecordKind::Sale && !json.contains("\"customer")
}

/// What a closed records part contributes to the views (DESIGN §7, "history
/// indexes in redb"), stored beside the part's snapshot so that a start
/// notes its records without reading the part into Automerge: every record
/// key with its JSON, the JSON left out (empty) where only the key counts.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct PartIndex {
    version: u8,
    /// The heads of the snapshot it describes.
    heads: Vec<[u8; 32]>,
    /// Keys of the part (records written by its writer).
    keys: u32,
    entries: Vec<(String, String)>,
}

/// [`PartIndex`] read in place (same encoding), for replaying its entries
/// without an allocation per record.
#[derive(serde::Deserialize)]
struct PartIndexRef<'a> {
    version: u8,
    heads: Vec<[u8; 32]>,
    keys: u32,
    #[serde(borrow)]
    entries: Vec<(&'a str, &'a str)>,
}

impl Engine {
    /// Reads an encoded part index in place: `f` gets its heads and entries
    /// (key, JSON; the JSON empty for a sale without a customer). `None`
    /// when it does not decode.
    pub(crate) fn read_part_index<R>(
        bytes: &[u8],
        f: impl FnOnce(&[[u8; 32]], &[(&str, &str)]) -> R,
    ) -> Option<R> {
        let plain = PartIndex::plain(bytes)?;
        let i = postcard::from_bytes::<PartIndexRef>(&plain)
            .ok()
            .filter(|i| i.version == PartIndex::VERSION)?;
        Some(f(&i.heads, &i.entries))
    }

    /// Notes the records of a part from its encoded index (`finish_open`).
    /// Returns false if the index does not decode (the caller reads the
    /// part whole instead). The ids of its sales are not noted in memory
    /// when the stored sale index holds them (`coldsales`); else the part
    /// is due to have them written there.
    pub(crate) fn replay_part_index(&mut self, doc: &str, bytes: &[u8]) -> bool {
        let plain = PartIndex::plain(bytes);
        match plain
            .as_deref()
            .and_then(|b| postcard::from_bytes::<PartIndexRef>(b).ok())
        {
            Some(i) if i.version == PartIndex::VERSION => {
                let stored = match self.cold_sales.as_mut() {
                    Some(c) if c.covers(doc, &i.heads) => true,
                    Some(c) => {
                        c.due.insert(doc.to_string());
                        false
                    }
                    None => false,
                };
                self.sales_stored = stored;
                for (key, json) in i.entries {
                    // A sale without a customer is only its id (`id_only`).
                    if stored && json.is_empty() {
                        continue;
                    }
                    self.note_record(doc, key, json);
                }
                self.sales_stored = false;
                true
            }
            _ => {
                tracing::error!(
                    doc,
                    "a records part index decoded at load does not decode again"
                );
                false
            }
        }
    }
}

/// First byte of a stored index that is DEFLATE-compressed (the rest is the
/// compressed postcard form, whose own first byte is the version, 1).
/// Record keys and ids repeat from record to record: compressed, an index
/// takes a fraction of the bytes, on disk and while a start holds it.
const INDEX_DEFLATED: u8 = 0xD1;
/// Most a stored index may inflate to: a part's records at their largest
/// (`RECORDS_PER_PART_MAX` records of up to 64 KiB) and their keys.
const INDEX_INFLATED_MAX: u64 = (layout::RECORDS_PER_PART_MAX as u64) * (65 << 10);

impl PartIndex {
    const VERSION: u8 = 1;

    fn of(doc: &automerge::Automerge, heads: &[automerge::ChangeHash]) -> PartIndex {
        let mut keys = 0u32;
        let mut entries = Vec::new();
        for k in doc.keys(ROOT) {
            keys = keys.saturating_add(1);
            let Some(json) = doc
                .get(ROOT, k.as_str())
                .ok()
                .flatten()
                .and_then(|(v, _)| v.as_str().map(str::to_string))
            else {
                continue;
            };
            let keep = match layout::parse_record_key(&k) {
                Ok((kind, _)) if id_only(kind, &json) => String::new(),
                _ => json,
            };
            entries.push((k, keep));
        }
        PartIndex {
            version: Self::VERSION,
            heads: heads.iter().map(|h| h.0).collect(),
            keys,
            entries,
        }
    }

    /// The stored form: the postcard encoding, DEFLATE-compressed.
    pub fn encode(&self) -> Vec<u8> {
        let plain = postcard::to_stdvec(self).unwrap_or_default();
        let mut z =
            flate2::write::DeflateEncoder::new(vec![INDEX_DEFLATED], flate2::Compression::fast());
        match std::io::Write::write_all(&mut z, &plain).and_then(|()| z.finish()) {
            Ok(out) => out,
            Err(_) => plain,
        }
    }

    /// The postcard form of stored index bytes (inflated when compressed;
    /// releases before compression stored it plain). `None` when it does not
    /// inflate within [`INDEX_INFLATED_MAX`].
    fn plain(bytes: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
        use std::io::Read;
        match bytes.split_first() {
            Some((&INDEX_DEFLATED, z)) => {
                let mut out = Vec::new();
                flate2::read::DeflateDecoder::new(z)
                    .take(INDEX_INFLATED_MAX + 1)
                    .read_to_end(&mut out)
                    .ok()?;
                (out.len() as u64 <= INDEX_INFLATED_MAX).then_some(std::borrow::Cow::Owned(out))
            }
            _ => Some(std::borrow::Cow::Borrowed(bytes)),
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<PartIndex> {
        postcard::from_bytes::<PartIndex>(&Self::plain(bytes)?)
            .ok()
            .filter(|i| i.version == Self::VERSION)
    }
}

/// A position in an engine's feed of noted sales (see `Engine::sales_since`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaleFeedPos {
    engine: ActorKey,
    seq: u64,
}

/// Sale ids kept in the feed of recently noted sales (webhooks read it);
/// about 60 bytes each, so at most ~4 MiB whatever the history.
pub const SALE_FEED_MAX: usize = 65_536;

impl Engine {
    /// Cools closed records parts (DESIGN §7): a part is closed once its
    /// writer has a later part or month here. Cooling keeps the saved bytes
    /// and heads only; a reader loads the part again and the next pass cools
    /// it again. At most `saves_max` parts that need a `save()` (warmed or
    /// written since they were loaded) are cooled per call, so a pass never
    /// stalls the loop; parts that still hold their loaded bytes are free.
    /// Returns the number of parts cooled.
    pub fn cool_closed_parts(&mut self, saves_max: usize) -> usize {
        // Not while a batch is in flight (pipelined commits): a part's last
        // changes and their certificates may be in it, not yet readable from
        // the archives once the part went cold. A later tick cools it.
        if self.batch_in_flight {
            return 0;
        }
        let latest = self.latest_parts();
        let (mut cooled, mut saves) = (0, 0);
        let mut cooled_ids = Vec::new();
        for (id, slot) in self.docs.iter_mut() {
            let DocId::Records { tag, month, part } = slot.id else {
                continue;
            };
            if slot.doc.is_cold() {
                // Its stored form is exactly a committed snapshot with these
                // heads (an indexed part, flushed in an earlier step): the
                // bytes can be read back from there.
                if let Some(a) = self.part_archive.as_ref() {
                    // Held bytes first: a part already stored away is skipped
                    // without cloning its heads, at every tick.
                    if slot.doc.saved_len() > 0
                        && self.indexed_parts.contains(id)
                        && slot.persisted == slot.doc.heads()
                        && slot.doc.store_away(id, a)
                    {
                        self.stats.parts_stored_away += 1;
                    }
                }
                continue;
            }
            if self.dirty_docs.contains(id) {
                continue;
            }
            if latest.get(&tag) == Some(&(month, part)) {
                // Open: written to (ours) or still arriving (a peer's).
                slot.doc.drop_saved();
                continue;
            }
            if !slot.puts.is_empty() || !slot.dels.is_empty() || slot.persisted != slot.doc.heads()
            {
                continue;
            }
            if !slot.doc.has_saved() {
                if saves >= saves_max {
                    continue;
                }
                saves += 1;
            }
            if !self.indexed_parts.contains(id) && !self.pending_part_indexes.contains_key(id) {
                let heads = slot.doc.heads();
                let index = PartIndex::of(&slot.doc, &heads);
                self.pending_part_indexes
                    .insert(id.clone(), (heads, index.encode()));
            }
            slot.doc.cool();
            cooled_ids.push(id.clone());
            cooled += 1;
        }
        // A cold part's certificates are read back from the store when a
        // peer needs its changes.
        for id in cooled_ids {
            self.forget_doc_certs(&id, false);
        }
        self.stats.parts_cooled += cooled as u64;
        cooled
    }

    /// The latest (month, part) of every writer's records parts held here.
    pub(crate) fn latest_parts(&self) -> HashMap<NodeTag, (u32, u32)> {
        let mut latest: HashMap<NodeTag, (u32, u32)> = HashMap::new();
        for slot in self.docs.values() {
            if let DocId::Records { tag, month, part } = slot.id {
                let e = latest.entry(tag).or_insert((month, part));
                *e = (*e).max((month, part));
            }
        }
        latest
    }

    /// Queues the index of records part `id` if it is closed (per `latest`),
    /// persisted as it is, and has none stored: the next flush writes the
    /// part as one snapshot with it.
    pub(crate) fn index_closed_part(&mut self, id: &str, latest: &HashMap<NodeTag, (u32, u32)>) {
        if self.indexed_parts.contains(id)
            || self.pending_part_indexes.contains_key(id)
            || self.dirty_docs.contains(id)
        {
            return;
        }
        let Some(slot) = self.docs.get(id) else {
            return;
        };
        let DocId::Records { tag, month, part } = slot.id else {
            return;
        };
        if latest.get(&tag) == Some(&(month, part))
            || !slot.puts.is_empty()
            || !slot.dels.is_empty()
            || slot.persisted != slot.doc.heads()
        {
            return;
        }
        let heads = slot.persisted.clone();
        let index = PartIndex::of(&slot.doc, &heads).encode();
        self.pending_part_indexes
            .insert(id.to_string(), (heads, index));
    }

    /// Moves queued part indexes into `batch`, each with a snapshot of its
    /// part (the stored form an index describes), at most
    /// [`PART_INDEXES_PER_BATCH`] per batch. A part written since its index
    /// was made is skipped: the next cooling indexes it again.
    pub(crate) fn flush_part_indexes(&mut self, batch: &mut crate::engine::Batch) {
        let mut taken = 0;
        while taken < PART_INDEXES_PER_BATCH {
            let Some((id, (heads, index))) = self.pending_part_indexes.pop_first() else {
                break;
            };
            let Some(slot) = self.docs.get_mut(&id) else {
                continue;
            };
            if slot.persisted != heads || slot.doc.heads() != heads || self.dirty_docs.contains(&id)
            {
                continue;
            }
            let bytes = slot.doc.save();
            slot.snapshot_bytes = bytes.len() as u64;
            slot.chunk_bytes = 0;
            slot.next_chunk = 1;
            batch.docs.push(crate::engine::DocWrite::Snapshot {
                doc: id.clone(),
                bytes,
            });
            batch.part_indexes.push((id.clone(), index));
            self.indexed_parts.insert(id);
            self.stats.parts_indexed += 1;
            taken += 1;
        }
    }

    /// Loads one stored document at start-up: a closed records part with
    /// its index cold (`load_indexed_part`), anything else by `load_doc`.
    pub fn load_doc_with_index(
        &mut self,
        id: &str,
        parts: &[Vec<u8>],
        heads_log: Vec<(u64, Vec<String>)>,
        index: Option<&[u8]>,
    ) -> Result<(), String> {
        if let Some(index) = index {
            if self.load_indexed_part(id, parts, index) {
                return Ok(());
            }
        }
        self.load_doc(id, parts, heads_log)
    }

    /// Loads closed records part `id` cold from its stored snapshot and
    /// index (see [`PartIndex`]): nothing of it is read into Automerge; its
    /// records are noted from the index by `finish_open`. `false` when the
    /// index does not apply (not a records part, chunks after the snapshot,
    /// an index this release cannot read): load the part the usual way.
    pub fn load_indexed_part(&mut self, id: &str, parts: &[Vec<u8>], index: &[u8]) -> bool {
        let Ok(doc_id @ DocId::Records { .. }) = DocId::parse(id, self.cfg.buckets) else {
            return false;
        };
        let [snapshot] = parts else {
            return false;
        };
        if snapshot.is_empty() {
            return false;
        }
        let bytes = index;
        // Read in place: the entries are noted from the bytes by
        // `finish_open`, not allocated here.
        let plain = PartIndex::plain(bytes);
        let Some(index) = plain
            .as_deref()
            .and_then(|b| postcard::from_bytes::<PartIndexRef>(b).ok())
            .filter(|i| i.version == PartIndex::VERSION)
        else {
            tracing::warn!(doc = %id, "unreadable records part index; reading the part");
            return false;
        };
        let heads: Vec<automerge::ChangeHash> = index
            .heads
            .iter()
            .map(|h| automerge::ChangeHash(*h))
            .collect();
        if let DocId::Records { tag, month, part } = &doc_id {
            if *tag == self.tag {
                self.note_own_records_part(*month, *part, index.keys as usize);
            }
        }
        let digest_part = crate::sync::doc_digest(id, &heads);
        self.digest.toggle(id, digest_part);
        let doc = match &self.part_archive {
            Some(a) => crate::lazydoc::LazyDoc::stored(
                id,
                a.clone(),
                self.actor.automerge(),
                heads.clone(),
            ),
            None => crate::lazydoc::LazyDoc::cold(
                snapshot.clone(),
                self.actor.automerge(),
                heads.clone(),
            ),
        };
        self.docs.insert(
            id.to_string(),
            crate::engine::Slot {
                id: doc_id,
                doc,
                persisted: heads,
                snapshot_bytes: snapshot.len() as u64,
                chunk_bytes: 0,
                next_chunk: 1,
                heads_log: Default::default(),
                puts: Vec::new(),
                dels: Vec::new(),
                digest_part,
                seqs: Default::default(),
            },
        );
        self.indexed_parts.insert(id.to_string());
        self.stats.parts_opened_indexed += 1;
        // With an archive the index is read again when it is replayed: a
        // start does not hold every part's index at once (~6 MB at 1.6
        // million sales).
        let keep = if self.part_archive.is_some() {
            Vec::new()
        } else {
            bytes.to_vec()
        };
        self.index_replay.insert(id.to_string(), keep);
        true
    }

    /// Closed records parts held cold, and their saved bytes.
    pub fn cold_parts(&self) -> (usize, usize) {
        self.docs
            .values()
            .filter(|s| s.doc.is_cold())
            .fold((0, 0), |(n, b), s| (n + 1, b + s.doc.saved_len()))
    }

    /// Indexes a record (sale → customer history and sale lookup; alarms).
    pub(crate) fn note_record(&mut self, doc: &str, key: &str, json: &str) {
        let Ok((kind, id)) = layout::parse_record_key(key) else {
            return;
        };
        if id_only(kind, json) {
            self.note_sale_id(id, doc, key);
            return;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
            return;
        };
        let node = v
            .get("node")
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_string();
        self.note_retail_record(kind, id, doc, key, &v);
        if matches!(kind, RecordKind::Count | RecordKind::CountLines) {
            self.note_count_record(kind, &v);
        }
        match kind {
            RecordKind::Grant if doc.starts_with(&format!("rec/{}/", self.tag)) => {
                self.views.own_grants.insert(key.to_string());
            }
            RecordKind::Sale => {
                self.note_sale_id(id, doc, key);
                // A pseudonym; records written before pseudonyms hold the id.
                let named = v
                    .get("customer")
                    .or_else(|| v.get("customer_id"))
                    .and_then(|c| c.as_str());
                if let Some(c) = named {
                    self.views
                        .purchases
                        .entry(c.to_string())
                        .or_default()
                        .insert((doc.to_string(), key.to_string()));
                }
            }
            RecordKind::Overdraft | RecordKind::Deficit | RecordKind::Fork => {
                let kind_s = match kind {
                    RecordKind::Overdraft => "overdraft",
                    RecordKind::Deficit => "deficit",
                    _ => "fork",
                };
                self.views.alarms.insert(
                    (format!("{kind_s}/{id}"), node.clone()),
                    Alarm {
                        kind: kind_s.into(),
                        node,
                        id: id.to_string(),
                        record: v,
                    },
                );
            }
            _ => {}
        }
    }

    /// Indexes a sale id. Two nodes apart from each other may have used one
    /// id: this node's own sale is the one looked up (returns at this node
    /// refer to it), else the first by document; all are kept.
    fn note_sale_id(&mut self, id: &str, doc: &str, key: &str) {
        if self.sales_stored {
            // A start replaying a part whose sales the stored index holds.
            return;
        }
        if self.views.sales.in_bulk() {
            // A start: every stored sale is noted unchecked and the ids held
            // twice are settled at its end (`settle_bulk_sales`).
            self.views.sales.add(id, doc);
            return;
        }
        let Some(old_doc) = self.noted_sale_doc(id, key) else {
            self.views.sales.add(id, doc);
            self.feed_sale(id);
            return;
        };
        if old_doc == doc {
            return;
        }
        self.feed_sale(id);
        self.views.sales.add(id, doc);
        let first = self.settle_sale_pair(id, &old_doc, doc, key);
        self.views.sales.prefer(id, &first);
        // Settled again at every start, wherever its sales are by then.
        if let Some(c) = self.cold_sales.as_mut() {
            c.shared_pending.insert(id.to_string());
        }
    }

    /// Sale `id` noted in `doc` after `old_doc` (the document it is looked
    /// up in so far): lists a collision when two nodes wrote it, and returns
    /// the document to look it up in first from now on.
    pub(crate) fn settle_sale_pair(
        &mut self,
        id: &str,
        old_doc: &str,
        doc: &str,
        key: &str,
    ) -> String {
        let tag_of = |d: &str| d.split('/').nth(1).map(str::to_string);
        let replace = if tag_of(old_doc) == tag_of(doc) {
            true
        } else {
            let c = self
                .views
                .sale_collisions
                .entry(id.to_string())
                .or_default();
            if !self.faults.unlisted_sale_collisions {
                c.insert((old_doc.to_string(), key.to_string()));
                c.insert((doc.to_string(), key.to_string()));
            }
            let own = self.tag.hex();
            let mine = |d: &str| tag_of(d).as_deref() == Some(own.as_str());
            mine(doc) || (!mine(old_doc) && doc < old_doc)
        };
        if replace { doc } else { old_doc }.to_string()
    }

    /// Ends the bulk load of the sale index that a start began: the ids
    /// held in more than one document are settled as if noted one by one in
    /// the order the start noted them (documents by name).
    pub(crate) fn settle_bulk_sales(&mut self) {
        let mut shared = self.views.sales.end_bulk();
        // Fingerprints are keyed per process: settled in the order of their
        // documents, the reads of cold parts come in the same order on every
        // run (the simulator replays a seed exactly).
        shared.sort_by(|a, b| a.1.cmp(&b.1));
        let prefix = format!("{}/", RecordKind::Sale.prefix());
        for (fp, docs) in shared {
            // id → the documents holding it, in name order.
            let mut held: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for d in &docs {
                let Some(slot) = self.docs.get(d) else {
                    continue;
                };
                let sales = &self.views.sales;
                let ids: Vec<String> = slot.doc.peek(|a| {
                    a.map_range(ROOT, prefix.clone()..)
                        .map_while(|item| {
                            item.key.strip_prefix(prefix.as_str()).map(str::to_string)
                        })
                        .filter(|id| sales.has_fingerprint(id, fp))
                        .collect()
                });
                for id in ids {
                    held.entry(id).or_default().push(d.clone());
                }
            }
            for (id, docs) in held {
                let Some((first, later)) = docs.split_first() else {
                    continue;
                };
                if later.is_empty() {
                    continue;
                }
                let key = layout::record_key(RecordKind::Sale, &id);
                let mut first = first.clone();
                for d in later {
                    first = self.settle_sale_pair(&id, &first, d, &key);
                }
                self.views.sales.prefer(&id, &first);
                // Noted by an earlier release, or its parts' sales were not
                // stored yet: stored as shared from now on.
                if let Some(c) = self.cold_sales.as_mut() {
                    c.shared_pending.insert(id);
                }
            }
        }
    }

    /// The document `note_sale_id` compares a newly noted sale of `id`
    /// with: as [`Engine::sale_doc`], but a sale this node wrote in the open
    /// batch counts although it is still a pending put of its document (a
    /// peer's sale of the id that arrives before the batch commits is then
    /// a collision, not the id's only sale). Pending puts are read only for
    /// a candidate document that does not hold the key yet.
    fn noted_sale_doc(&self, id: &str, key: &str) -> Option<String> {
        let holds = |d: &str| {
            self.docs.get(d).is_some_and(|s| {
                s.doc.get(ROOT, key).ok().flatten().is_some()
                    || s.puts.iter().any(|(k, _)| k == key)
            })
        };
        if let Some(d) = self.views.sales.candidates(id).find(|d| holds(d)) {
            return Some(d.to_string());
        }
        self.stored_sale_candidates(id)
            .into_iter()
            .find(|d| holds(d))
    }

    fn feed_sale(&mut self, id: &str) {
        if self.opening {
            return;
        }
        if self.sale_feed.len() >= SALE_FEED_MAX {
            self.sale_feed.pop_front();
        }
        self.sale_feed
            .push_back((self.sale_feed_next, id.to_string()));
        self.sale_feed_next += 1;
    }

    /// Sale ids noted since `from` (a value of [`Engine::sale_feed_next`]
    /// of this very engine), in the order it noted them; `None` when some of
    /// them left the bounded feed, or `from` is another engine's position (a
    /// reopened engine numbers its sales anew): read them with
    /// [`Engine::for_each_sale`] then.
    pub fn sales_since(
        &self,
        from: SaleFeedPos,
    ) -> Option<impl Iterator<Item = (SaleFeedPos, &str)>> {
        let front = self
            .sale_feed
            .front()
            .map_or(self.sale_feed_next, |(s, _)| *s);
        if from.engine != self.actor || from.seq < front || from.seq > self.sale_feed_next {
            return None;
        }
        let skip = (from.seq - front) as usize;
        let engine = self.actor;
        Some(
            self.sale_feed
                .iter()
                .skip(skip)
                .map(move |(s, id)| (SaleFeedPos { engine, seq: *s }, id.as_str())),
        )
    }

    /// The position the next noted sale gets.
    pub fn sale_feed_next(&self) -> SaleFeedPos {
        SaleFeedPos {
            engine: self.actor,
            seq: self.sale_feed_next,
        }
    }

    /// Every sale record held, part by part, as (id, JSON text), without
    /// keeping cold parts loaded; `f` returns false to stop.
    pub fn for_each_sale(&self, mut f: impl FnMut(&str, &str) -> bool) {
        let prefix = format!("{}/", RecordKind::Sale.prefix());
        for slot in self.docs.values() {
            if !matches!(slot.id, DocId::Records { .. }) {
                continue;
            }
            let go = slot.doc.peek(|d| {
                for item in d.map_range(ROOT, prefix.clone()..) {
                    let Some(id) = item.key.strip_prefix(prefix.as_str()) else {
                        break;
                    };
                    let value: automerge::Value<'static> = item.value.into();
                    let Some(json) = value.as_str() else {
                        continue;
                    };
                    if !f(id, json) {
                        return false;
                    }
                }
                true
            });
            if !go {
                return;
            }
        }
    }

    /// The records document and key of sale `id` (this node's own sale when
    /// two nodes used the id). Loads a cold part that may hold it.
    pub fn sale_doc(&self, id: &str) -> Option<(String, String)> {
        let key = layout::record_key(RecordKind::Sale, id);
        let holds = |d: &str| {
            self.docs
                .get(d)
                .is_some_and(|s| s.doc.get(ROOT, key.as_str()).ok().flatten().is_some())
        };
        // In memory (open parts, and the document preferred for a shared
        // id) first; then the stored index of closed parts.
        let doc = match self.views.sales.candidates(id).find(|d| holds(d)) {
            Some(d) => d.to_string(),
            None => self
                .stored_sale_candidates(id)
                .into_iter()
                .find(|d| holds(d))?,
        };
        Some((doc, key))
    }

    /// The sale record of `id` and the other sales of that id, if two
    /// nodes used it (`collisions`).
    pub fn sale_json(&self, id: &str) -> Option<serde_json::Value> {
        let (d, k) = self.sale_doc(id)?;
        let mut v = self.record(&d, &k)?;
        if let Some(all) = self.views.sale_collisions.get(id) {
            let others: Vec<serde_json::Value> = all
                .iter()
                .filter(|(od, ok)| (od, ok) != (&d, &k))
                .filter_map(|(od, ok)| self.record(od, ok))
                .collect();
            v["collisions"] = others.into();
        }
        Some(v)
    }

    /// Reads a stored record by (document, key).
    pub fn record(&self, doc: &str, key: &str) -> Option<serde_json::Value> {
        let slot = self.docs.get(doc)?;
        let (v, _) = slot.doc.get(ROOT, key).ok().flatten()?;
        serde_json::from_str(v.as_str()?).ok()
    }

    /// Reads a record by key from any part of a month's records documents
    /// (`month_doc` is the month's first part, `rec/<tag>/<month>`).
    pub fn record_in_month(&self, month_doc: &str, key: &str) -> Option<serde_json::Value> {
        // Parts are `<month_doc>/<n>`: '0' follows '/', so this range holds
        // exactly the month's first part and its later ones.
        let end = format!("{month_doc}0");
        self.docs
            .range::<str, _>((
                std::ops::Bound::Included(month_doc),
                std::ops::Bound::Excluded(end.as_str()),
            ))
            .find_map(|(d, _)| self.record(d, key))
    }

    /// Purchases of a customer, newest first.
    pub fn purchases(&self, customer: &str) -> Vec<serde_json::Value> {
        let mut names = self.pseudonyms_of(customer);
        names.push(customer.to_string());
        let mut out: Vec<serde_json::Value> = names
            .iter()
            .filter_map(|n| self.views.purchases.get(n))
            .flatten()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|(d, k)| self.record(d, k))
            .collect();
        out.sort_by_key(|v| {
            std::cmp::Reverse(v.get("at_ms").and_then(|t| t.as_u64()).unwrap_or(0))
        });
        out
    }
}

#[cfg(test)]
mod index_tests {
    use super::*;

    /// The stored form is compressed, decodes to what was encoded, and an
    /// index stored plain by an earlier release still decodes.
    #[test]
    fn a_part_index_is_stored_compressed_and_plain_ones_still_read() {
        let index = PartIndex {
            version: PartIndex::VERSION,
            heads: vec![[7; 32]],
            keys: 2048,
            entries: (0..2048)
                .map(|i| (format!("sale/s-{}", 100_000 + i), String::new()))
                .collect(),
        };
        let plain = postcard::to_stdvec(&index).unwrap();
        let stored = index.encode();
        assert_eq!(stored[0], INDEX_DEFLATED);
        assert!(
            stored.len() * 2 < plain.len(),
            "compressed {} of {} bytes",
            stored.len(),
            plain.len()
        );
        for bytes in [&stored, &plain] {
            let back = PartIndex::decode(bytes).expect("decodes");
            assert_eq!(back.heads, index.heads);
            assert_eq!(back.keys, 2048);
            assert_eq!(back.entries, index.entries);
        }
        // Garbage after the marker is refused, not a panic.
        assert!(PartIndex::decode(&[INDEX_DEFLATED, 1, 2, 3]).is_none());
    }
}
