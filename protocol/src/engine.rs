//! The node state machine: executes client operations against the ledger,
//! applies validated changes from peers, keeps the views, and hands the shell a
//! [`Batch`] to persist. It owns the Automerge documents; it does no IO.
//!
//! The shell's loop is: feed operations ([`Engine::execute`]) and frames
//! ([`Engine::receive`]); [`Engine::flush`] → persist the batch in one durable
//! transaction → [`Engine::committed`] → answer the callers and send
//! [`Engine::take_outgoing`]. Nothing leaves the engine before `committed`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{Automerge, ChangeHash, ReadDoc, ScalarValue, ROOT};
use serde::{Deserialize, Serialize};

use crate::ids::{customer_bucket, ActorKey, NodeId, NodeInfo, NodeTag, CELL_MAX};
use crate::layout::{
    self, ledger_key, month_of, record_key, CustomerKey, DocId, LedgerField, RecordKind,
};
use crate::ledger::StockEntry;
use crate::ops::{op_hash_json, sum_lines, Count, IdemRecord, Op, OpError, OpReply, ShortLine};
use crate::sync::{Digest, PeerSession};
use crate::views::{read_customer, read_entry, StockRow, Views};

/// Drops null members, recursively. A record travels to every node and stays in
/// every history; an absent member reads as null (`value.get(..)` is `None`,
/// `value[..]` is `Null`), so the nulls are bytes that say nothing.
fn strip_nulls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Heads remembered per ledger document for counts "as of T".
pub const HEADS_LOG_MAX: usize = 512;
/// Chunks are folded into a new snapshot once they outgrow this floor and
/// `SNAPSHOT_CHUNK_FACTOR` times the snapshot. A `save()` costs time linear in the
/// whole document on the engine thread (a month of sale records: tens of ms,
/// while every client waits), so the factor trades a little disk and start-up
/// time (the chunks load one by one) for a quarter as many of those stalls.
pub const SNAPSHOT_FLOOR_BYTES: u64 = 64 * 1024;
/// See `SNAPSHOT_FLOOR_BYTES`.
pub const SNAPSHOT_CHUNK_FACTOR: u64 = 4;
/// Chunks of one document before they are folded into a snapshot whatever
/// their bytes: a document rebuilt from thousands of change chunks at start-up
/// costs seconds and about ten times the memory of the same document loaded
/// from its snapshot (measured: 120,000 sales in chunks, 17 GiB and 62 s; from
/// snapshots, 100 MiB and 0.7 s), so the stored form stays mostly snapshot.
pub const CHUNKS_PER_SNAPSHOT_MAX: u64 = 256;
/// Largest request (as JSON) whose record stays well under the record limit
/// peers enforce (`validate::RECORD_BYTES_MAX`), with room for what the node
/// adds (node, times, a count's basis heads and deltas).
pub const OP_JSON_BYTES_MAX: usize = 40 * 1024;
/// Documents a node accepts in all (a peer cannot make us create more).
pub const DOCS_MAX: usize = 1_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    #[default]
    Strict,
    Relaxed,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Strict => "strict",
            Policy::Relaxed => "relaxed",
        }
    }
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub node_id: NodeId,
    pub name: String,
    pub location: String,
    pub role: String,
    pub policy: Policy,
    pub buckets: u32,
    pub loyalty_points_per_unit: u64,
    pub timezone: Option<String>,
}

/// Deliberately broken behaviours, switched on only by the simulator's
/// self-test to prove that its checkers catch them. Never set in production.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    pub skip_rights_check: bool,
    pub per_line_check: bool,
    pub grant_in_other_bucket: bool,
    /// Count pages carry a record over the size a peer accepts, and the
    /// engine does not check its writes with a peer's validation.
    pub unchecked_large_records: bool,
}

/// One document write of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DocWrite {
    /// Append an incremental chunk (`save_after` the persisted heads).
    Chunk {
        doc: String,
        seq: u64,
        bytes: Vec<u8>,
    },
    /// Replace every chunk of the document by this snapshot (`save()`).
    Snapshot { doc: String, bytes: Vec<u8> },
}

/// Everything one group commit must persist atomically.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub docs: Vec<DocWrite>,
    /// New heads of every written document (hex), for the summary on restart.
    pub heads: Vec<(String, Vec<String>)>,
    pub rows: Vec<((u64, String), StockRow)>,
    pub idem: Vec<(String, IdemRecord)>,
    pub heads_log: Vec<(String, u64, Vec<String>)>,
    pub sync_states: Vec<(NodeId, String, Vec<u8>)>,
    /// Changed entries of the customer key store.
    pub keys: Vec<(String, crate::crypto::KeyEntry)>,
    /// Documents to delete with everything stored about them (ledger epochs
    /// this node moved on from), after the writes above.
    pub retired: Vec<String>,
    /// Closed records parts: (document, encoded `history::PartIndex`), each
    /// with a `DocWrite::Snapshot` of the part in this batch. A stored index
    /// belongs to exactly the stored snapshot: the store drops a document's
    /// index whenever a batch writes the document without one.
    pub part_indexes: Vec<(String, Vec<u8>)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
            && self.rows.is_empty()
            && self.idem.is_empty()
            && self.heads_log.is_empty()
            && self.sync_states.is_empty()
            && self.keys.is_empty()
            && self.retired.is_empty()
            && self.part_indexes.is_empty()
    }
}

pub(crate) struct Slot {
    pub id: DocId,
    /// The document; closed records parts are held cold (saved bytes).
    pub doc: crate::lazydoc::LazyDoc,
    pub persisted: Vec<ChangeHash>,
    pub snapshot_bytes: u64,
    pub chunk_bytes: u64,
    pub next_chunk: u64,
    pub heads_log: VecDeque<(u64, Vec<ChangeHash>)>,
    pub puts: Vec<(String, ScalarValue)>,
    pub dels: Vec<String>,
    /// Contribution of this document to the summary digest.
    pub digest_part: u64,
    /// Every actor's highest sequence number, for validating peers' changes.
    pub seqs: crate::validate::ActorSeqs,
}

/// What one operation changed, kept while it runs so that a refusal after
/// its first write (an overflow on a later line, a change a peer would
/// refuse) leaves nothing behind: operations are all or nothing, their
/// idempotency record included (it is written only on success).
#[derive(Default)]
pub(crate) struct OpUndo {
    /// Document → lengths of its pending puts and deletes when the op began.
    pub(crate) marks: BTreeMap<String, (usize, usize)>,
    /// (product, location) → this actor's cells there before the op (`None`: none).
    pub(crate) cells: BTreeMap<(u64, String), Option<crate::ledger::ActorCells>>,
    /// (customer, earned) → this actor's loyalty cell before the op.
    pub(crate) loyalty: BTreeMap<(String, bool), Option<u64>>,
    /// Catalogue entries before the op.
    pub(crate) products: BTreeMap<u64, Option<crate::views::ProductView>>,
    /// Records written by the op: indexed into the views once it succeeded.
    pub(crate) records: Vec<(String, String, String)>,
}

pub struct Engine {
    pub(crate) cfg: EngineConfig,
    /// Set while `execute` runs an operation (see `OpUndo`).
    pub(crate) undo: Option<OpUndo>,
    pub(crate) tag: NodeTag,
    pub(crate) actor: ActorKey,
    pub(crate) docs: BTreeMap<String, Slot>,
    pub views: Views,
    /// Ledger epoch held per (location, bucket) (see `epochs`).
    pub(crate) epochs: HashMap<(String, u32), u32>,
    pub(crate) epoch_ops_max: u64,
    /// Documents dropped since the last flush (older ledger epochs), deleted
    /// from disk by the next batch.
    pub(crate) pending_retired: Vec<String>,
    /// Closed records parts whose index is to be persisted with their
    /// snapshot by the next flushes: id → (heads, encoded `PartIndex`).
    pub(crate) pending_part_indexes: BTreeMap<String, (Vec<ChangeHash>, Vec<u8>)>,
    /// Records parts whose stored form is exactly a snapshot with its
    /// persisted index (written since: the store dropped the index).
    pub(crate) indexed_parts: std::collections::HashSet<String>,
    /// Encoded indexes of parts loaded cold at start-up, replayed into the
    /// views by `finish_open` instead of reading the parts (kept encoded:
    /// about a quarter of the decoded entries' memory).
    pub(crate) index_replay: HashMap<String, Vec<u8>>,
    /// Set until `finish_open` ends: sales noted while opening are history,
    /// not news for the sale feed (a reopened engine's feed starts empty).
    pub(crate) opening: bool,
    /// Recently noted sales (sequence, id), at most [`crate::history::SALE_FEED_MAX`].
    pub(crate) sale_feed: VecDeque<(u64, String)>,
    pub(crate) sale_feed_next: u64,
    pub(crate) digest: Digest,
    pub(crate) sessions: BTreeMap<NodeId, PeerSession>,
    pub(crate) outbox: Vec<(NodeId, Vec<u8>)>,
    /// Documents whose heads changed in the last flush, with the raw changes
    /// since their previous persisted heads (empty: no peer was connected, or too large to push; such a
    /// document is offered through sync sessions instead).
    pub(crate) changed_docs: BTreeMap<String, Vec<u8>>,
    /// Where this batch's new changes per document came from: decides which
    /// peers the push after the commit goes to.
    pub(crate) push_sources: BTreeMap<String, crate::sync::PushSource>,
    /// Catch-up coordination (see `sync::Engine::defer_for_leader`).
    pub(crate) catchup: crate::sync::Catchup,
    /// Documents with pending writes or received changes (what `flush` looks at).
    pub(crate) dirty_docs: BTreeSet<String>,
    pending_idem: HashMap<String, IdemRecord>,
    pending_rows: BTreeSet<(u64, String)>,
    pub(crate) pending_sync_states: Vec<(NodeId, String, Vec<u8>)>,
    pending_customers: BTreeSet<String>,
    pub faults: Faults,
    /// Unix ms at which this node last heard from (a change by) each node.
    pub(crate) last_heard: HashMap<NodeTag, u64>,
    pub(crate) rebalancer: crate::rebalance::Rebalancer,
    /// The customer key store (outside the documents; erasure wins on merge).
    pub(crate) keys: HashMap<String, crate::crypto::KeyEntry>,
    pub(crate) keys_digest: [u8; 32],
    pending_keys: BTreeMap<String, crate::crypto::KeyEntry>,
    pub(crate) keys_to_push: Vec<(String, crate::crypto::KeyEntry)>,
    /// Secret per-process randomness for customer keys (the shell supplies it).
    entropy: [u8; 32],
    nonce_counter: u64,
    /// Products of the own location changed since the allocation controller last ran.
    pub(crate) alloc_dirty: BTreeSet<u64>,
    /// This node's records documents: month → (current part, records in it).
    records_parts: BTreeMap<u32, (u32, usize)>,
    records_per_part: usize,
    /// Stands in for a document this node does not hold yet (validation and
    /// sync replies): a slot is made only for a first accepted change.
    pub(crate) empty_doc: Automerge,
    /// Counters for metrics: (name, value).
    pub stats: Stats,
    /// Administrators and peers' key-store budgets (`crate::authority`).
    pub(crate) authority: crate::authority::Authority,
}

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub ops_ok: u64,
    pub ops_refused: u64,
    pub sync_messages_in: u64,
    pub sync_messages_out: u64,
    pub sync_bytes_in: u64,
    pub sync_bytes_out: u64,
    /// `sync_bytes_out` by message kind (`sync::MSG_KINDS` order).
    pub sync_bytes_out_by_kind: [u64; crate::sync::MSG_KINDS.len()],
    pub rejected_messages: u64,
    /// `rejected_messages` by reason (`sync::REJECT_*`), for
    /// `storemesh_rejected_changes_total{reason}`.
    pub rejected_by_reason: BTreeMap<&'static str, u64>,
    pub forks_detected: u64,
    /// Pushes whose changes depended on changes we lacked (fetched by a sync session).
    pub pushes_behind: u64,
    /// Sync messages sent with their changes as one bundle, and those changes.
    pub bundles_out: u64,
    pub bundled_changes_out: u64,
    /// Closed records parts cooled (again) since start.
    pub parts_cooled: u64,
    /// Closed records parts opened from their persisted index at start-up
    /// (not read), and part indexes written since start.
    pub parts_opened_indexed: u64,
    pub parts_indexed: u64,
    /// Ledger epochs this node started (as a location's owner) or moved to.
    pub epochs_started: u64,
    pub epochs_joined: u64,
    /// Cells carried from late changes to an older ledger epoch.
    pub late_cells_carried: u64,
}

fn xor32(acc: &mut [u8; 32], h: &[u8; 32]) {
    for (a, b) in acc.iter_mut().zip(h) {
        *a ^= b;
    }
}

fn hex_heads(h: &[ChangeHash]) -> Vec<String> {
    h.iter().map(|c| hex::encode(c.0)).collect()
}

/// Loads a stored document: its snapshot, then its chunks.
///
/// Documents written by this version hold at most `CHUNKS_PER_SNAPSHOT_MAX`
/// chunks and load in one pass (one `load` of the concatenation applies the
/// chunks as one batch). A document stored by an earlier version may hold
/// thousands of chunks; for those one pass was measured far worse than chunk
/// by chunk (a month of 120,000 sale records: 62 s and 17 GiB), so they load
/// chunk by chunk as they always did. Chunk by chunk is also the fallback if
/// the one-pass load refuses the bytes (e.g. a chunk repeating earlier changes).
/// This node's rights per (product, location) before an event (see
/// `Engine::record_event_deficits`).
pub type RightsBefore = BTreeMap<(u64, String), i64>;

pub fn load_parts(parts: &[Vec<u8>]) -> Result<Automerge, automerge::AutomergeError> {
    load_parts_one_pass(parts).map(|(d, _)| d)
}

/// [`load_parts`], and whether the parts' bytes loaded in one pass (only
/// then can they stand for the document's saved form).
pub fn load_parts_one_pass(
    parts: &[Vec<u8>],
) -> Result<(Automerge, bool), automerge::AutomergeError> {
    let chunk_by_chunk = || -> Result<Automerge, automerge::AutomergeError> {
        let mut doc = Automerge::new();
        for p in parts {
            doc.load_incremental(p)?;
        }
        Ok(doc)
    };
    if parts.len() as u64 > CHUNKS_PER_SNAPSHOT_MAX + 1 {
        return chunk_by_chunk().map(|d| (d, false));
    }
    let total: usize = parts.iter().map(Vec::len).sum();
    let mut all = Vec::with_capacity(total);
    for p in parts {
        all.extend_from_slice(p);
    }
    match Automerge::load(&all) {
        Ok(doc) => Ok((doc, true)),
        Err(one_pass) => {
            tracing::warn!(error = %one_pass, "one-pass document load refused; loading chunk by chunk");
            chunk_by_chunk().map(|d| (d, false))
        }
    }
}

pub fn parse_heads(h: &[String]) -> Vec<ChangeHash> {
    h.iter()
        .filter_map(|s| {
            let mut b = [0u8; 32];
            hex::decode_to_slice(s, &mut b).ok()?;
            Some(ChangeHash(b))
        })
        .collect()
}

impl Engine {
    /// A new engine; `incarnation` must be fresh randomness at every process start.
    pub fn new(cfg: EngineConfig, incarnation: [u8; 4]) -> Engine {
        let tag = cfg.node_id.tag();
        let mut e = Engine {
            epochs: HashMap::new(),
            epoch_ops_max: crate::epochs::EPOCH_OPS_MIN,
            pending_retired: Vec::new(),
            pending_part_indexes: BTreeMap::new(),
            indexed_parts: Default::default(),
            index_replay: HashMap::new(),
            opening: true,
            sale_feed: VecDeque::new(),
            sale_feed_next: 0,
            undo: None,
            actor: ActorKey::new(tag, incarnation),
            tag,
            cfg,
            docs: BTreeMap::new(),
            views: Views::default(),
            digest: Digest::default(),
            sessions: BTreeMap::new(),
            outbox: Vec::new(),
            changed_docs: BTreeMap::new(),
            push_sources: BTreeMap::new(),
            catchup: crate::sync::Catchup::default(),
            dirty_docs: BTreeSet::new(),
            pending_idem: HashMap::new(),
            pending_rows: BTreeSet::new(),
            pending_sync_states: Vec::new(),
            pending_customers: BTreeSet::new(),
            faults: Faults::default(),
            last_heard: HashMap::new(),
            // Request and grant ids start from the incarnation, so a restarted
            // node never repeats ids its peers still remember.
            rebalancer: crate::rebalance::Rebalancer::starting_at(
                u64::from(u32::from_le_bytes(incarnation)) << 32,
            ),
            keys: HashMap::new(),
            keys_digest: [0; 32],
            pending_keys: BTreeMap::new(),
            keys_to_push: Vec::new(),
            entropy: [0; 32],
            nonce_counter: 0,
            alloc_dirty: BTreeSet::new(),
            records_parts: BTreeMap::new(),
            records_per_part: layout::RECORDS_PER_PART_MAX,
            empty_doc: Automerge::new(),
            stats: Stats::default(),
            authority: crate::authority::Authority::default(),
        };
        e.views.bound.bind_name(&e.cfg.name, tag);
        e.views.bound.bind_location(&e.cfg.location, tag);
        e
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }
    pub fn tag(&self) -> NodeTag {
        self.tag
    }
    pub fn actor(&self) -> ActorKey {
        self.actor
    }

    /// Location → unix ms this node last heard from that location's own node.
    pub fn last_heard_by_location(&self) -> BTreeMap<String, u64> {
        self.views
            .nodes
            .iter()
            .filter_map(|(tag, info)| {
                let loc = info.location.clone()?;
                let t = if *tag == self.tag {
                    u64::MAX
                } else {
                    *self.last_heard.get(tag)?
                };
                Some((loc, t))
            })
            .collect()
    }

    /// Records per records part (default `layout::RECORDS_PER_PART_MAX`); the
    /// simulator makes parts small so that they roll over in short runs.
    pub fn set_records_per_part(&mut self, records: usize) {
        self.records_per_part = records.clamp(1, layout::RECORDS_PER_PART_MAX);
    }

    /// Secret randomness for customer keys; call once at start with fresh
    /// random bytes (the simulator passes seeded bytes).
    pub fn set_entropy(&mut self, seed: [u8; 32]) {
        self.entropy = seed;
    }

    /// Loads the persisted key store (before `finish_open`).
    pub fn load_keys(&mut self, entries: Vec<(String, crate::crypto::KeyEntry)>) {
        for (c, e) in entries {
            self.set_key_entry(&c, e);
        }
    }

    /// Merges a key-store entry; returns true if it changed anything.
    pub(crate) fn set_key_entry(
        &mut self,
        customer: &str,
        incoming: crate::crypto::KeyEntry,
    ) -> bool {
        let merged = match self.keys.get(customer) {
            Some(old) => old.merge(&incoming),
            None => incoming,
        };
        if matches!(&merged, crate::crypto::KeyEntry::Keys(k) if k.len() > crate::crypto::KEYS_PER_CUSTOMER_MAX)
        {
            // Refused whole: keeping some would evict keys data is written under.
            *self
                .stats
                .rejected_by_reason
                .entry("key_limit")
                .or_default() += 1;
            tracing::warn!(
                "customer key entry would exceed {} keys; refused",
                crate::crypto::KEYS_PER_CUSTOMER_MAX
            );
            return false;
        }
        if self.keys.get(customer) == Some(&merged) {
            return false;
        }
        if let Some(old) = self.keys.get(customer) {
            let h = crate::sync::key_digest(customer, old);
            xor32(&mut self.keys_digest, &h);
            if let crate::crypto::KeyEntry::Keys(ks) = old {
                for k in ks {
                    self.views
                        .pseudonyms
                        .remove(&crate::crypto::customer_pseudonym(k, customer));
                }
            }
        }
        if let crate::crypto::KeyEntry::Keys(ks) = &merged {
            for k in ks {
                self.views.pseudonyms.insert(
                    crate::crypto::customer_pseudonym(k, customer),
                    customer.to_string(),
                );
            }
        }
        let h = crate::sync::key_digest(customer, &merged);
        xor32(&mut self.keys_digest, &h);
        self.keys.insert(customer.to_string(), merged);
        true
    }

    /// Records a key-store change for persistence and for the peers.
    pub(crate) fn key_changed(&mut self, customer: &str) {
        if let Some(e) = self.keys.get(customer) {
            self.pending_keys.insert(customer.to_string(), e.clone());
        }
    }

    /// The key new values of this customer are encrypted with (created on first use).
    fn customer_key(&mut self, customer: &str) -> Option<[u8; 32]> {
        match self.keys.get(customer) {
            Some(e) => e.current().copied(),
            None => {
                use sha2::{Digest, Sha256};
                self.nonce_counter += 1;
                let mut h = Sha256::new();
                h.update(self.entropy);
                h.update(b"customer-key");
                h.update(self.actor.0);
                h.update(self.nonce_counter.to_le_bytes());
                let key: [u8; 32] = h.finalize().into();
                self.set_key_entry(customer, crate::crypto::KeyEntry::Keys([key].into()));
                self.key_changed(customer);
                Some(key)
            }
        }
    }

    /// What a record holds instead of the customer id: its pseudonym under
    /// the customer's current key (created on first use). `None` for an
    /// erased customer: the record then names nobody.
    pub(crate) fn pseudonym_of(&mut self, customer: Option<&str>) -> Option<String> {
        let c = customer?;
        let key = self.customer_key(c)?;
        Some(crate::crypto::customer_pseudonym(&key, c))
    }

    /// Every pseudonym a customer's records may carry (one per key it has).
    pub fn pseudonyms_of(&self, customer: &str) -> Vec<String> {
        match self.keys.get(customer) {
            Some(crate::crypto::KeyEntry::Keys(ks)) => ks
                .iter()
                .map(|k| crate::crypto::customer_pseudonym(k, customer))
                .collect(),
            _ => Vec::new(),
        }
    }

    fn seal(&mut self, key: &[u8; 32], plain: &str) -> String {
        self.nonce_counter += 1;
        let mut material = self.actor.0.to_vec();
        material.extend_from_slice(&self.nonce_counter.to_le_bytes());
        material.extend_from_slice(&self.entropy);
        crate::crypto::encrypt(key, &material, plain)
    }

    /// Registers a configured peer so grants can name it before its directory
    /// entry has synced.
    pub fn add_configured_peer(&mut self, name: &str, id: NodeId) {
        self.views.configured.insert(name.to_string(), id.tag());
        // The operator's name for the peer wins over its directory entry.
        self.views.bound.bind_name(name, id.tag());
    }

    /// Binds a configured peer's location (`[[peers]] location`): no other
    /// node's directory entry can claim it here.
    pub fn bind_peer_location(&mut self, location: &str, id: NodeId) {
        self.views.bound.bind_location(location, id.tag());
    }

    /// The nodes whose retirements this node accepts (`administrators` in
    /// the configuration); empty: any member's (the v1 behaviour).
    pub fn set_administrators(&mut self, ids: &[NodeId]) {
        self.authority.administrators = if ids.is_empty() {
            None
        } else {
            Some(ids.iter().map(|i| i.tag()).collect())
        };
    }

    /// Loads one stored document (snapshot and chunks in order) at start-up.
    pub fn load_doc(
        &mut self,
        id: &str,
        parts: &[Vec<u8>],
        heads_log: Vec<(u64, Vec<String>)>,
    ) -> Result<(), String> {
        let doc_id = DocId::parse(id, self.cfg.buckets)?;
        if let DocId::Ledger {
            location,
            bucket,
            epoch,
        } = &doc_id
        {
            // One epoch per ledger document is held: an older one left on
            // disk is deleted, a newer one replaces what was loaded.
            let held = self.ledger_epoch(location, *bucket);
            if *epoch < held {
                self.pending_retired.push(id.to_string());
                return Ok(());
            }
            if *epoch > held && self.epochs.contains_key(&(location.clone(), *bucket)) {
                let old = DocId::Ledger {
                    location: location.clone(),
                    bucket: *bucket,
                    epoch: held,
                };
                self.retire_doc(&old.encode());
            }
            self.note_epoch(&doc_id);
        }
        let snapshot_bytes = parts.first().map_or(0, |p| p.len() as u64);
        let chunk_bytes: u64 = parts.iter().skip(1).map(|p| p.len() as u64).sum();
        let (doc, one_pass) =
            load_parts_one_pass(parts).map_err(|e| format!("document {id}: {e}"))?;
        let doc = doc.with_actor(self.actor.automerge());
        let heads = doc.get_heads();
        // A records part may be closed (cooled after `finish_open`): keep the
        // bytes it was loaded from, so cooling it costs no `save()` — only if
        // they load as they are (else cooling saves the document anew).
        let doc = if matches!(doc_id, DocId::Records { .. }) && one_pass {
            crate::lazydoc::LazyDoc::with_saved(doc, parts.concat())
        } else {
            crate::lazydoc::LazyDoc::new(doc)
        };
        let mut log: VecDeque<(u64, Vec<ChangeHash>)> = heads_log
            .into_iter()
            .map(|(t, h)| (t, parse_heads(&h)))
            .collect();
        while log.len() > HEADS_LOG_MAX {
            log.pop_front();
        }
        if let DocId::Records { tag, month, part } = &doc_id {
            if *tag == self.tag {
                let records = doc.length(ROOT);
                self.note_own_records_part(*month, *part, records);
            }
        }
        let part = crate::sync::doc_digest(id, &heads);
        self.digest.toggle(id, part);
        self.docs.insert(
            id.to_string(),
            Slot {
                id: doc_id,
                doc,
                persisted: heads,
                snapshot_bytes,
                chunk_bytes,
                next_chunk: parts.len() as u64,
                heads_log: log,
                puts: Vec::new(),
                dels: Vec::new(),
                digest_part: part,
                seqs: Default::default(),
            },
        );
        if let Some(slot) = self.docs.get_mut(id) {
            if matches!(slot.id, DocId::Records { .. }) {
                slot.doc.cool();
            }
        }
        Ok(())
    }

    /// After all documents are loaded: rebuilds every view from the documents and
    /// publishes this node's directory entry.
    pub fn finish_open(&mut self) {
        let ids: Vec<String> = self.docs.keys().cloned().collect();
        let latest = self.latest_parts();
        for id in ids {
            if let Some(bytes) = self.index_replay.remove(&id) {
                // A closed part loaded cold with its index: its records
                // are noted from the index, the part itself stays unread.
                self.replay_part_index(&id, &bytes);
                continue;
            }
            self.recompute_doc_all(&id);
            // Records parts were loaded cold (see `load_doc`): each is read
            // here once, one at a time, and cooled again at no cost, so a
            // restart never holds every part at once.
            // A closed part read here for the first time since it closed
            // gets its index, so the next start reads it no more.
            self.index_closed_part(&id, &latest);
            if let Some(slot) = self.docs.get_mut(&id) {
                if matches!(slot.id, DocId::Records { .. }) && slot.doc.has_saved() {
                    slot.doc.cool();
                }
            }
        }
        let info = NodeInfo {
            name: self.cfg.name.clone(),
            location: Some(self.cfg.location.clone()),
            role: self.cfg.role.clone(),
            policy: self.cfg.policy.as_str().to_string(),
            timezone: self.cfg.timezone.clone(),
        };
        if self.views.nodes.get(&self.tag) != Some(&info) {
            let json = serde_json::to_string(&info).unwrap_or_default();
            self.put(
                DocId::Mesh,
                layout::mesh_info_key(self.tag),
                ScalarValue::Str(json.into()),
            );
            self.views.nodes.insert(self.tag, info);
        }
        // Views are built: closed parts go cold (their loaded bytes are kept).
        self.cool_closed_parts(0);
        self.opening = false;
    }

    pub(crate) fn slot(&mut self, id: &DocId) -> &mut Slot {
        let key = id.encode();
        let actor = self.actor.automerge();
        self.docs.entry(key).or_insert_with(|| Slot {
            id: id.clone(),
            doc: crate::lazydoc::LazyDoc::new(Automerge::new().with_actor(actor)),
            persisted: Vec::new(),
            snapshot_bytes: 0,
            chunk_bytes: 0,
            next_chunk: 0,
            heads_log: VecDeque::new(),
            puts: Vec::new(),
            dels: Vec::new(),
            digest_part: 0,
            seqs: Default::default(),
        })
    }

    /// Writes this batch's pending puts and deletes of one document into it as
    /// a local change. Called before a peer's changes are merged into the
    /// document: views are then recomputed from the document, and without this
    /// they would lose the batch's own unflushed writes (and the next `bump`
    /// would compute a cumulative cell from that stale base — a lost update).
    /// Nothing is persisted or sent here: `flush` saves everything after the
    /// persisted heads, and frames leave only after the batch committed.
    pub(crate) fn commit_pending_writes(&mut self, id: &str, now_ms: u64) {
        let Some(slot) = self.docs.get_mut(id) else {
            return;
        };
        if slot.puts.is_empty() && slot.dels.is_empty() {
            return;
        }
        let puts = std::mem::take(&mut slot.puts);
        let dels = std::mem::take(&mut slot.dels);
        let mut tx = slot.doc.transaction();
        for (k, v) in puts {
            if let Err(e) = tx.put(ROOT, k, v) {
                tracing::error!(doc = %id, error = %e, "document put failed");
            }
        }
        for k in dels {
            if tx.get(ROOT, k.as_str()).ok().flatten().is_some() {
                let _ = tx.delete(ROOT, k);
            }
        }
        tx.commit_with(CommitOptions::default().with_time((now_ms / 1000) as i64));
        self.dirty_docs.insert(id.to_string());
        self.push_sources.entry(id.to_string()).or_default().local = true;
    }

    pub(crate) fn put(&mut self, doc: DocId, key: String, value: ScalarValue) {
        let id = doc.encode();
        self.dirty_docs.insert(id.clone());
        let slot = self.slot(&doc);
        let mark = (slot.puts.len(), slot.dels.len());
        slot.puts.push((key, value));
        if let Some(u) = &mut self.undo {
            u.marks.entry(id).or_insert(mark);
        }
    }

    /// Checks every write of the running operation with the validation a
    /// peer applies to our changes (`validate::check_op`): a change a peer
    /// refuses would block the replication of the whole document (every
    /// later record of this node, for a records document), so the operation
    /// is refused instead, before anything of it is committed.
    pub(crate) fn check_op_writes(&self) -> Result<(), OpError> {
        let Some(u) = &self.undo else { return Ok(()) };
        if self.faults.unchecked_large_records {
            return Ok(());
        }
        for (id, (puts_at, _)) in &u.marks {
            let Some(slot) = self.docs.get(id) else {
                continue;
            };
            // Keys repeat across documents (a product's cell at two locations).
            let mut last = HashMap::new();
            for (key, value) in slot.puts.iter().skip(*puts_at) {
                crate::validate::check_op(
                    &slot.id,
                    &slot.doc,
                    self.actor,
                    key,
                    Some(value),
                    self.cfg.buckets,
                    &mut last,
                )
                .map_err(|e| {
                    tracing::error!(doc = %id, error = %e, "operation refused: it would write a change peers refuse");
                    OpError::BadRequest(format!(
                        "the operation would write a change that peers refuse ({e}); nothing was applied"
                    ))
                })?;
            }
        }
        Ok(())
    }

    /// Undoes everything a refused operation wrote (see `OpUndo`).
    /// Runs an engine-internal operation all or nothing, like `execute` runs
    /// a client's: checked as a peer would, rolled back on any error.
    pub(crate) fn atomically(
        &mut self,
        f: impl FnOnce(&mut Engine) -> Result<(), OpError>,
    ) -> Result<(), OpError> {
        if self.undo.is_some() {
            return Err(OpError::BadRequest("nested engine operation".into()));
        }
        self.undo = Some(OpUndo::default());
        let result = f(self).and_then(|()| self.check_op_writes());
        let undo = self.undo.take().unwrap_or_default();
        match &result {
            Ok(()) => {
                for (doc, key, json) in &undo.records {
                    self.note_record(doc, key, json);
                }
            }
            Err(_) => self.roll_back(undo),
        }
        result
    }

    fn roll_back(&mut self, u: OpUndo) {
        for (id, (puts, dels)) in u.marks {
            if let Some(slot) = self.docs.get_mut(&id) {
                debug_assert!(slot.puts.len() >= puts && slot.dels.len() >= dels);
                slot.puts.truncate(puts);
                slot.dels.truncate(dels);
            }
        }
        let actor = self.actor;
        for ((p, l), old) in u.cells {
            let Some(m) = self.views.stock.get_mut(&p) else {
                continue;
            };
            if let Some(e) = m.get_mut(&l) {
                match old {
                    Some(c) => {
                        e.cells.insert(actor, c);
                    }
                    None => {
                        e.cells.remove(&actor);
                    }
                }
                if e.cells.is_empty() {
                    m.remove(&l);
                }
            }
            if m.is_empty() {
                self.views.stock.remove(&p);
            }
            self.touch_row(p, &l);
        }
        for ((c, earned), old) in u.loyalty {
            if let Some(view) = self.views.customers.get_mut(&c) {
                let cells = if earned {
                    &mut view.earned
                } else {
                    &mut view.spent
                };
                match old {
                    Some(v) => {
                        cells.insert(actor, v);
                    }
                    None => {
                        cells.remove(&actor);
                    }
                }
            }
        }
        for (p, old) in u.products {
            match old {
                Some(v) => self.views.set_product(p, v),
                None => {
                    self.views
                        .set_product(p, crate::views::ProductView::default());
                    self.views.products.remove(&p);
                }
            }
        }
    }

    pub(crate) fn ledger_doc(&self, product: u64, location: &str) -> DocId {
        self.ledger_doc_id(product, location)
    }

    /// The records document the next record of `now_ms` goes to: this
    /// month's current part, or the next one once it is full.
    pub(crate) fn records_doc(&mut self, now_ms: u64) -> DocId {
        let month = month_of(now_ms);
        let (part, count) = self.records_parts.entry(month).or_insert((0, 0));
        if *count >= self.records_per_part {
            *part += 1;
            *count = 0;
        }
        *count += 1;
        DocId::Records {
            tag: self.tag,
            month,
            part: *part,
        }
    }

    /// Notes a stored records document of this node (at start-up), so that new
    /// records continue in the month's last part.
    pub(crate) fn note_own_records_part(&mut self, month: u32, part: u32, records: usize) {
        let e = self.records_parts.entry(month).or_insert((0, 0));
        if part > e.0 || (part == e.0 && records > e.1) {
            *e = (part, records);
        }
    }

    /// Raises one of this actor's cumulative cells by `add`, in the view (the
    /// overlay the next checks see) and as a pending document write.
    pub(crate) fn bump(
        &mut self,
        product: u64,
        location: &str,
        field: LedgerField,
        add: u64,
    ) -> Result<(), OpError> {
        let actor = self.actor;
        if let Some(u) = &mut self.undo {
            if let std::collections::btree_map::Entry::Vacant(slot) =
                u.cells.entry((product, location.to_string()))
            {
                let old = self
                    .views
                    .entry(product, location)
                    .and_then(|e| e.cells.get(&actor))
                    .cloned();
                slot.insert(old);
            }
        }
        let entry = self
            .views
            .stock
            .entry(product)
            .or_default()
            .entry(location.to_string())
            .or_default();
        let cells = entry.cells.entry(actor).or_default();
        let cell = match field {
            LedgerField::Received => &mut cells.received,
            LedgerField::Removed => &mut cells.removed,
            LedgerField::Granted(to) => cells.granted.entry(to).or_default(),
            LedgerField::Held(to) => cells.held.entry(to).or_default(),
            LedgerField::Released => &mut cells.released,
        };
        let new = cell
            .checked_add(add)
            .filter(|v| *v <= CELL_MAX)
            .ok_or_else(|| OpError::BadRequest("quantity would overflow the ledger cell".into()))?;
        *cell = new;
        let mut doc = self.ledger_doc(product, location);
        if self.faults.grant_in_other_bucket && matches!(field, LedgerField::Granted(_)) {
            if let DocId::Ledger { bucket, .. } = &mut doc {
                *bucket = (*bucket + 1) % self.cfg.buckets;
            }
        }
        self.put(
            doc,
            ledger_key(product, actor, field),
            ScalarValue::Uint(new),
        );
        self.touch_row(product, location);
        Ok(())
    }

    pub(crate) fn pending_idem_contains(&self, key: &str) -> bool {
        self.pending_idem.contains_key(key)
    }

    /// Marks an engine-internal write as done for this batch (its record is
    /// the durable proof; replays across batches are caught by the record key).
    pub(crate) fn note_idem(&mut self, key: String) {
        self.pending_idem.insert(
            key,
            IdemRecord {
                body_hash: [0; 32],
                reply: OpReply {
                    status: 201,
                    body: String::new(),
                },
            },
        );
    }

    /// Rebuilds one customer's view (after its keys changed).
    pub(crate) fn refresh_customer(&mut self, customer: &str, now_ms: u64) {
        let doc_id = self.customer_doc(customer).encode();
        // The view is rebuilt from the document: this batch's writes go in first.
        self.commit_pending_writes(&doc_id, now_ms);
        let view = match self.docs.get(&doc_id) {
            Some(slot) => read_customer(&slot.doc, customer, self.keys.get(customer)),
            None => return,
        };
        self.views.set_customer(customer, view);
        self.pending_customers.insert(customer.to_string());
    }

    /// Retires `node`: its key is refused mesh-wide and its rights pass to `successor`.
    fn retire(&mut self, node: &str, successor: &str, now_ms: u64) -> Result<OpReply, OpError> {
        let from = self
            .views
            .tag_of(node)
            .ok_or_else(|| OpError::NotFound(format!("unknown node {node:?}")))?;
        let to = self
            .views
            .tag_of(successor)
            .ok_or_else(|| OpError::NotFound(format!("unknown node {successor:?}")))?;
        if from == to {
            return Err(OpError::BadRequest("a node cannot succeed itself".into()));
        }
        if let Some(admins) = &self.authority.administrators {
            if !admins.contains(&self.tag) {
                // Peers would refuse the change (and every later change of
                // the mesh document behind it).
                return Err(OpError::Conflict {
                    code: "not_administrator".into(),
                    message: "this node is not one of the chain's administrators; run the retirement at an administrator node".into(),
                });
            }
        }
        if from == self.tag {
            return Err(OpError::BadRequest(
                "run the retirement at another node than the one retired".into(),
            ));
        }
        if self.views.resolve(to) != to {
            return Err(OpError::BadRequest(format!(
                "{successor} is itself retired"
            )));
        }
        if let Some(existing) = self.views.retired.get(&from) {
            if *existing == to {
                return Ok(Self::reply(
                    200,
                    serde_json::json!({"node": node, "successor": successor, "retired": true}),
                ));
            }
            return Err(OpError::Conflict {
                code: "already_retired".into(),
                message: format!("{node} was already retired to another successor"),
            });
        }
        let value = serde_json::json!({"successor": to.hex(), "successor_name": successor, "by": self.cfg.name, "at_ms": now_ms}).to_string();
        self.put(
            DocId::Mesh,
            layout::retired_key(from),
            ScalarValue::Str(value.into()),
        );
        self.note_retirement(from, to);
        Ok(Self::reply(
            201,
            serde_json::json!({"node": node, "successor": successor, "retired": true}),
        ))
    }

    fn note_retirement(&mut self, retired: NodeTag, successor: NodeTag) {
        if self.views.retired.get(&retired) == Some(&successor) {
            return;
        }
        if retired == self.tag {
            tracing::error!(
                "this node was retired; its rights passed to its successor and peers refuse it"
            );
        }
        self.views.retired.insert(retired, successor);
        // Rights moved: every row that holds cells or grants of the retired node changes.
        let touched: Vec<(u64, String)> = self
            .views
            .stock
            .iter()
            .flat_map(|(p, m)| {
                m.iter()
                    .filter(|(_, e)| {
                        e.cells.keys().any(|a| a.tag() == retired)
                            || e.cells.values().any(|c| {
                                c.granted.contains_key(&retired) || c.held.contains_key(&retired)
                            })
                    })
                    .map(move |(l, _)| (*p, l.clone()))
            })
            .collect();
        for (p, l) in touched {
            self.touch_row(p, &l);
        }
    }

    /// `POST /api/locations`: declares a location the chain knows without a
    /// node of its own, so receipts, adjustments and transfers may name it.
    pub(crate) fn declare_location(
        &mut self,
        d: crate::ops::DeclareLocation,
        now_ms: u64,
    ) -> Result<OpReply, OpError> {
        if let Some((_, info)) = self
            .views
            .nodes
            .iter()
            .find(|(_, i)| i.location.as_deref() == Some(d.location.as_str()))
        {
            return Err(OpError::Conflict {
                code: "location_owned".into(),
                message: format!(
                    "location {} is the own location of node {}; it needs no declaration",
                    d.location, info.name
                ),
            });
        }
        if let Some(o) = &d.owner {
            if self.views.tag_of(o).is_none() {
                return Err(OpError::NotFound(format!("unknown node {o:?}")));
            }
        }
        let body =
            serde_json::json!({"location": d.location, "timezone": d.timezone, "owner": d.owner});
        if let Some(old) = self.views.declared.get(&d.location) {
            if old.timezone == d.timezone && old.owner == d.owner {
                return Ok(Self::reply(200, body));
            }
        }
        let value = layout::DeclaredLocation {
            location: d.location.clone(),
            timezone: d.timezone.clone(),
            owner: d.owner.clone(),
            by: Some(self.cfg.name.clone()),
            at_ms: now_ms,
        };
        let json = serde_json::to_string(&value).unwrap_or_default();
        self.put(
            DocId::Mesh,
            layout::location_key(&d.location),
            ScalarValue::Str(json.into()),
        );
        self.views.declared.insert(d.location.clone(), value);
        Ok(Self::reply(201, body))
    }

    /// Refuses a location the chain does not know (CONTRACT v2: receipts,
    /// adjustments and transfers name a node's own or a declared location).
    pub(crate) fn known_location(&self, location: &str) -> Result<(), OpError> {
        if location == self.cfg.location || self.views.knows_location(location) {
            return Ok(());
        }
        // A configured peer whose directory entry has not arrived yet: its
        // location is its name unless it says otherwise.
        if self.views.configured.contains_key(location)
            && !self.views.nodes.values().any(|i| i.name == location)
        {
            return Ok(());
        }
        // Stock booked there already (its node's directory entry may still be
        // on its way, or an import opened it): the chain knows it.
        let prefix = format!("ledger/{location}/");
        if self
            .docs
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(id, _)| id.starts_with(&prefix))
        {
            return Ok(());
        }
        Err(OpError::NotFound(format!(
            "unknown location {location:?}: not the location of a node of the chain; declare it with POST /api/locations"
        )))
    }

    /// Node ids' tags that are retired (the shell refuses their connections).
    pub fn retired_tags(&self) -> Vec<NodeTag> {
        self.views.retired.keys().copied().collect()
    }

    pub(crate) fn touch_row(&mut self, product: u64, location: &str) {
        if location == self.cfg.location {
            self.alloc_dirty.insert(product);
        }
        self.pending_rows.insert((product, location.to_string()));
    }

    /// The rights this node holds on (product, location), including the pending batch.
    pub fn rights(&self, product: u64, location: &str) -> i64 {
        // Rights come from peers' cells (clamped to i64): never overflow.
        self.rights_raw(product, location)
            .saturating_sub(self.reserved_by_me(product, location))
    }

    /// The ledger's rights of this node, including units held for reservations.
    pub fn rights_raw(&self, product: u64, location: &str) -> i64 {
        self.views
            .entry(product, location)
            .map(|e| self.node_rights(e, self.tag))
            .unwrap_or(0)
    }

    /// Rights of `node` in an entry, with retired nodes' rights passed to their successors.
    pub fn node_rights(&self, e: &StockEntry, node: NodeTag) -> i64 {
        if self.views.retired.is_empty() {
            return e.rights(node);
        }
        e.rights_in(node, &|t| self.views.resolve(t))
    }

    /// `stock_level` (on hand over all locations) and `available` — what one
    /// sale at this node would accept right now: a sale is taken from one
    /// location, so the most this node can sell at any single location.
    pub fn totals(&self, product: u64, location: Option<&str>) -> Option<(i64, i64)> {
        let m = self.views.stock.get(&product)?;
        let mut on_hand = 0i64;
        let mut avail = 0i64;
        for (l, e) in m {
            if location.is_some_and(|x| x != l) {
                continue;
            }
            on_hand = on_hand.saturating_add(e.on_hand());
            avail = avail.max(
                self.node_rights(e, self.tag)
                    .saturating_sub(self.reserved_by_me(product, l)),
            );
        }
        Some((on_hand, avail))
    }

    pub fn row(&self, product: u64, location: &str) -> StockRow {
        let on_hand = self
            .views
            .entry(product, location)
            .map(|e| e.on_hand())
            .unwrap_or(0);
        StockRow {
            on_hand,
            available: self.rights(product, location).max(0),
            incoming: self.incoming(product, location),
            reserved: self.reserved_at(product, location),
            seq: 0,
        }
    }

    pub(crate) fn policy_of(&self, location: &str) -> Policy {
        if location == self.cfg.location {
            return self.cfg.policy;
        }
        Policy::Strict
    }

    /// Executes one client operation. On `Ok` the reply is final but must only be
    /// released after the batch that holds it committed.
    pub fn execute(
        &mut self,
        op: Op,
        now_ms: u64,
        idem: &dyn Fn(&str) -> Option<IdemRecord>,
    ) -> Result<OpReply, OpError> {
        // The request as the client sent it (SKUs unresolved), serialised
        // once: its hash is the idempotency check, its size the record check.
        let json = serde_json::to_vec(&op).unwrap_or_default();
        let hash = op_hash_json(&json);
        let key = op.client_key();
        // Whether an earlier request with this id had the same body; records
        // written before `op_hash` took field names hold the postcard hash,
        // computed only when such a record does not match the new one.
        let same_body = key
            .as_ref()
            .and_then(|k| self.pending_idem.get(k).cloned().or_else(|| idem(k)))
            .map(|rec| {
                let same =
                    rec.body_hash == hash || rec.body_hash == crate::ops::op_hash_legacy(&op);
                (rec, same)
            });
        let mut op = op;
        self.resolve_skus(&mut op)?;
        op.validate().map_err(OpError::BadRequest)?;
        // Every write but an import keeps its request in one record, and a
        // peer refuses a record over `validate::RECORD_BYTES_MAX`: a request
        // that would make one is refused here, before it touches the ledger,
        // instead of blocking the replication of this node's records.
        if !matches!(op, Op::ImportCounts(_)) && json.len() > OP_JSON_BYTES_MAX {
            return Err(OpError::BadRequest(format!(
                "the request is too large for one record ({} bytes of JSON, at most {OP_JSON_BYTES_MAX}); split it into several",
                json.len()
            )));
        }
        if let (Some(k), Some((rec, same))) = (&key, same_body) {
            if same {
                let mut reply = rec.reply;
                if reply.status == 201 {
                    reply.status = 200;
                }
                return Ok(reply);
            }
            return Err(OpError::IdConflict(format!(
                "{} was used before with a different body",
                k.replace('/', " ")
            )));
        }
        debug_assert!(self.undo.is_none());
        self.undo = Some(OpUndo::default());
        let result = match op {
            Op::Sale(s) => self.sale(s, now_ms),
            Op::Return(r) => self.ret(r, now_ms),
            Op::Receipt(r) => self.receipt(r, now_ms),
            Op::Count(c) => self.count(c, now_ms),
            Op::Grant(g) => self.grant(g, now_ms),
            Op::CustomerPut {
                customer_id,
                update,
            } => self.customer_put(&customer_id, update),
            Op::CustomerErase { customer_id } => self.customer_erase(&customer_id, now_ms),
            Op::Redeem {
                customer_id,
                redeem,
            } => self.redeem(&customer_id, redeem),
            Op::Adjustment(a) => self.adjustment(a, now_ms),
            Op::Transfer(t) => self.transfer(t, now_ms),
            Op::TransferReceive(t) => self.transfer_receive(t, now_ms),
            Op::ImportCounts(i) => self.import_counts(i, now_ms),
            Op::Reserve(r) => self.reserve(r, now_ms),
            Op::Retire { node, successor } => self.retire(&node, &successor, now_ms),
            Op::ReservationFulfil {
                reservation_id,
                sale_id,
            } => self.reservation_fulfil(&reservation_id, sale_id, now_ms),
            Op::ReservationCancel { reservation_id } => {
                self.reservation_close(&reservation_id, "cancelled", now_ms)
            }
            Op::ProductPut { product_id, update } => self.product_put(product_id, update),
            Op::CountLines(c) => self.count_lines(c, now_ms),
            Op::CountFinish(f) => self.count_finish(f, now_ms),
            Op::DeclareLocation(d) => self.declare_location(d, now_ms),
        };
        let result = result.and_then(|r| self.check_op_writes().map(|()| r));
        let undo = self.undo.take().unwrap_or_default();
        match &result {
            Ok(_) => {
                for (doc, key, json) in &undo.records {
                    self.note_record(doc, key, json);
                }
            }
            Err(_) => self.roll_back(undo),
        }
        match &result {
            Ok(reply) => {
                self.stats.ops_ok += 1;
                if let Some(k) = key {
                    self.pending_idem.insert(
                        k,
                        IdemRecord {
                            body_hash: hash,
                            reply: reply.clone(),
                        },
                    );
                }
            }
            Err(_) => self.stats.ops_refused += 1,
        }
        result
    }

    pub(crate) fn reply(status: u16, body: serde_json::Value) -> OpReply {
        OpReply {
            status,
            body: body.to_string(),
        }
    }

    pub(crate) fn line_json(&self, product: u64) -> serde_json::Value {
        let (stock_level, available) = self.totals(product, None).unwrap_or((0, 0));
        serde_json::json!({"product_id": product, "stock_level": stock_level, "available": available})
    }

    pub(crate) fn write_record(
        &mut self,
        kind: RecordKind,
        id: &str,
        record: serde_json::Value,
        now_ms: u64,
    ) {
        let doc = self.records_doc(now_ms);
        let key = record_key(kind, id);
        let mut record = record;
        strip_nulls(&mut record);
        let json = record.to_string();
        let doc_key = doc.encode();
        if let Some(u) = &mut self.undo {
            // Indexed once the whole operation succeeded (see `OpUndo`).
            u.records.push((doc_key, key.clone(), json.clone()));
        } else if json.len() > crate::validate::RECORD_BYTES_MAX
            || layout::parse_record_key(&key).is_err()
        {
            // An engine-internal write (fork, deficit, expiry) that peers
            // would refuse would block every later record of this node.
            tracing::error!(key = %key, bytes = json.len(), "record not written: peers would refuse it");
            return;
        } else {
            self.note_record(&doc_key, &key, &json);
        }
        self.put(doc, key, ScalarValue::Str(json.into()));
    }

    /// Chooses the location of a sale that named none: the node's own location if
    /// it can sell every line there, else a location where it holds enough rights.
    fn sale_location(&self, lines: &BTreeMap<u64, u64>) -> String {
        let own = &self.cfg.location;
        let fits = |loc: &str| lines.iter().all(|(p, q)| self.rights(*p, loc) >= *q as i64);
        if fits(own) {
            return own.clone();
        }
        if let Some((p, _)) = lines.iter().next() {
            if let Some(m) = self.views.stock.get(p) {
                let mut cands: Vec<(&String, i64)> = m
                    .iter()
                    .map(|(l, e)| (l, self.node_rights(e, self.tag)))
                    .filter(|(l, _)| fits(l))
                    .collect();
                cands.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
                if let Some((l, _)) = cands.first() {
                    return (*l).clone();
                }
            }
        }
        // Rights can be gathered from connected peers somewhere: sell there.
        if let Some(l) = self.gatherable_location(lines) {
            return l;
        }
        // Nobody's rights fit: sell where the goods physically are (rights can
        // be requested there), the own location first.
        let stocked = |loc: &str| {
            lines.iter().all(|(p, q)| {
                self.views
                    .entry(*p, loc)
                    .is_some_and(|e| e.on_hand() >= *q as i64)
            })
        };
        if stocked(own) {
            return own.clone();
        }
        if let Some((p, _)) = lines.iter().next() {
            if let Some(m) = self.views.stock.get(p) {
                let best = m
                    .iter()
                    .filter(|(l, _)| stocked(l))
                    .max_by(|a, b| a.1.on_hand().cmp(&b.1.on_hand()).then(b.0.cmp(a.0)));
                if let Some((l, _)) = best {
                    return l.clone();
                }
            }
        }
        own.clone()
    }

    fn sale(&mut self, s: crate::ops::Sale, now_ms: u64) -> Result<OpReply, OpError> {
        let lines = sum_lines(s.lines.iter().map(|l| (l.product_id, l.quantity)))
            .map_err(OpError::BadRequest)?;
        let location = match &s.location {
            Some(l) => l.clone(),
            // A store's till sells off its own shelf (CONTRACT.md: `location`
            // defaults to the node's own); a web shop ships from wherever it
            // can sell.
            None if self.cfg.role != "webshop" => self.cfg.location.clone(),
            None => self.sale_location(&lines),
        };
        let own = location == self.cfg.location;
        if s.override_rights && !own {
            return Err(OpError::BadRequest(format!(
                "override is only allowed at this node's own location {:?}",
                self.cfg.location
            )));
        }
        let relaxed = own && (s.override_rights || self.policy_of(&location) == Policy::Relaxed);
        // The check runs per product over the summed lines, against the state
        // including every earlier operation of this batch.
        let checked: Vec<(u64, u64)> = if self.faults.per_line_check {
            s.lines.iter().map(|l| (l.product_id, l.quantity)).collect()
        } else {
            lines.iter().map(|(p, q)| (*p, *q)).collect()
        };
        let mut short = Vec::new();
        for (p, q) in &checked {
            let avail = self.rights(*p, &location);
            if avail < *q as i64 && !relaxed && !self.faults.skip_rights_check {
                short.push(ShortLine {
                    product_id: *p,
                    location: location.clone(),
                    requested: *q,
                    available: avail.max(0),
                });
            }
        }
        if !short.is_empty() {
            return Err(OpError::InsufficientStock(short));
        }
        let mut overdrawn = Vec::new();
        let mut units = 0u64;
        let mut total: i64 = 0;
        for (p, q) in &lines {
            let avail = self.rights(*p, &location);
            if avail < *q as i64 {
                overdrawn.push(
                    serde_json::json!({"product_id": p, "quantity": (*q as i64 - avail.max(0))}),
                );
            }
            self.bump(*p, &location, LedgerField::Removed, *q)?;
            units += q;
        }
        // Money in minor units: a line's own total if the till gave one, else
        // unit price × quantity − discount + tax; the sale's total if given,
        // else the lines' minus the sale's discount plus its tax.
        for l in &s.lines {
            let line = l.total.unwrap_or_else(|| {
                l.unit_price
                    .unwrap_or(0)
                    .saturating_mul(l.quantity as i64)
                    .saturating_sub(l.discount.unwrap_or(0))
                    .saturating_add(l.tax.unwrap_or(0))
            });
            total = total.saturating_add(line);
        }
        let total = s.total.unwrap_or_else(|| {
            total
                .saturating_sub(s.discount.unwrap_or(0))
                .saturating_add(s.tax.unwrap_or(0))
        });
        // The record names the customer only by a keyed hash (see crypto.rs).
        let customer = self.pseudonym_of(s.customer_id.as_deref());
        let record = serde_json::json!({
            "sale_id": s.sale_id, "node": self.cfg.name, "location": location,
            "customer": customer, "currency": s.currency, "lines": s.lines,
            "discount": s.discount, "tax": s.tax,
            "total": total, "at_ms": now_ms, "occurred_at": s.occurred_at,
            "register_id": s.register_id, "staff_id": s.staff_id,
            "override": s.override_rights.then_some(true),
        });
        self.write_record(RecordKind::Sale, &s.sale_id, record, now_ms);
        if !overdrawn.is_empty() {
            let rec = serde_json::json!({"sale_id": s.sale_id, "node": self.cfg.name, "location": location, "lines": overdrawn, "at_ms": now_ms});
            self.write_record(RecordKind::Overdraft, &s.sale_id, rec, now_ms);
            for (p, q) in &lines {
                let short = self.rights_raw(*p, &location).min(0).unsigned_abs();
                self.reclaim(*p, &location, short.min(*q), now_ms);
            }
        }
        if let Some(c) = &s.customer_id {
            let points = units.saturating_mul(self.cfg.loyalty_points_per_unit);
            if points > 0 {
                self.bump_loyalty(c, true, points)?;
            }
        }
        let out: Vec<serde_json::Value> = lines.keys().map(|p| self.line_json(*p)).collect();
        Ok(Self::reply(
            201,
            serde_json::json!({"sale_id": s.sale_id, "location": location, "lines": out}),
        ))
    }

    fn ret(&mut self, r: crate::ops::Return, now_ms: u64) -> Result<OpReply, OpError> {
        let verified = match &r.original_sale_id {
            Some(orig) => self.check_over_return(orig, &r)?,
            None => false,
        };
        let restock = sum_lines(
            r.lines
                .iter()
                .filter(|l| l.disposition == crate::ops::Disposition::Restock)
                .map(|l| (l.product_id, l.quantity)),
        )
        .map_err(OpError::BadRequest)?;
        for (p, q) in &restock {
            self.bump(*p, &r.location, LedgerField::Received, *q)?;
        }
        let customer = self.pseudonym_of(r.customer_id.as_deref());
        let record = serde_json::json!({"return_id": r.return_id, "node": self.cfg.name, "location": r.location, "original_sale_id": r.original_sale_id, "sale_verified": verified, "customer": customer, "lines": r.lines, "occurred_at": r.occurred_at, "register_id": r.register_id, "staff_id": r.staff_id, "at_ms": now_ms});
        self.write_record(RecordKind::Return, &r.return_id, record, now_ms);
        let out: Vec<serde_json::Value> = r
            .lines
            .iter()
            .map(|l| self.line_json(l.product_id))
            .collect();
        Ok(Self::reply(
            201,
            serde_json::json!({"return_id": r.return_id, "lines": out}),
        ))
    }

    fn receipt(&mut self, r: crate::ops::Receipt, now_ms: u64) -> Result<OpReply, OpError> {
        self.known_location(&r.location)?;
        let lines = sum_lines(r.lines.iter().map(|l| (l.product_id, l.quantity)))
            .map_err(OpError::BadRequest)?;
        for (p, q) in &lines {
            self.bump(*p, &r.location, LedgerField::Received, *q)?;
        }
        let record = serde_json::json!({"receipt_id": r.receipt_id, "node": self.cfg.name, "location": r.location, "lines": r.lines, "supplier": r.supplier, "purchase_order_id": r.purchase_order_id, "occurred_at": r.occurred_at, "register_id": r.register_id, "staff_id": r.staff_id, "at_ms": now_ms});
        self.write_record(RecordKind::Receipt, &r.receipt_id, record, now_ms);
        let out: Vec<serde_json::Value> = lines.keys().map(|p| self.line_json(*p)).collect();
        Ok(Self::reply(
            201,
            serde_json::json!({"receipt_id": r.receipt_id, "lines": out}),
        ))
    }

    /// On hand of (product, location) in this node's view as of `at_ms`, from the
    /// heads log of the ledger document.
    pub(crate) fn on_hand_at(
        &self,
        product: u64,
        location: &str,
        at_ms: u64,
    ) -> Result<i64, OpError> {
        let doc_id = self.ledger_doc(product, location).encode();
        let Some(slot) = self.docs.get(&doc_id) else {
            return Ok(0);
        };
        match slot.heads_log.iter().rev().find(|(t, _)| *t <= at_ms) {
            Some((_, heads)) => Ok(read_entry(&*slot.doc, product, Some(heads)).on_hand()),
            // Before the first logged state: the document was empty then, unless
            // the log was trimmed — then this node no longer knows its view as of T.
            // A later epoch did not start empty: before its first logged
            // state this node no longer knows its view either.
            None if slot.heads_log.len() < HEADS_LOG_MAX
                && matches!(slot.id, DocId::Ledger { epoch: 0, .. }) =>
            {
                Ok(0)
            }
            None => Err(OpError::BadRequest(format!(
                "counted_at is older than the history this node keeps for product {product} at {location}; count again and upload it sooner"
            ))),
        }
    }

    fn count(&mut self, c: Count, now_ms: u64) -> Result<OpReply, OpError> {
        if self.own_count_session(&c.count_id).is_some() {
            return Err(OpError::IdConflict(format!(
                "count {} was used before (a count session or an earlier count)",
                c.count_id
            )));
        }
        if c.location != self.cfg.location {
            return Err(OpError::NotOwner(format!(
                "counts are recorded only by a location's own node; this node owns {:?}",
                self.cfg.location
            )));
        }
        self.apply_count(c, now_ms)
    }

    /// Applies a count (ownership already checked by the caller).
    pub(crate) fn apply_count(&mut self, c: Count, now_ms: u64) -> Result<OpReply, OpError> {
        let at_ms = match &c.counted_at {
            Some(t) => crate::time::parse_rfc3339_ms(t).ok_or_else(|| {
                OpError::BadRequest("counted_at must be RFC 3339 with an offset".into())
            })?,
            None => now_ms,
        };
        // The basis is the view as of the count; counts "now" include the pending
        // batch. All bases first: a refused line is refused before any write.
        let mut bases = Vec::with_capacity(c.lines.len());
        for l in &c.lines {
            bases.push(self.count_basis(l.product_id, &c.location, at_ms, now_ms)?);
        }
        let mut out_lines = Vec::new();
        let mut units_delta = 0i64;
        for (l, basis) in c.lines.iter().zip(bases) {
            let delta = self.count_line(
                &c.count_id,
                &c.location,
                l.product_id,
                l.counted,
                basis,
                now_ms,
            )?;
            units_delta = units_delta.saturating_add(delta);
            out_lines.push(serde_json::json!({"product_id": l.product_id, "counted": l.counted, "basis": basis, "delta": delta}));
        }
        // A full count also says "zero" for every product of the location it
        // did not list; those are written in parts (a record per part), as a
        // store of thousands of products would not fit one record.
        let full = c.scope == Some(crate::ops::CountScope::Full);
        let (zeroed, zero_delta) = if full {
            let listed: BTreeSet<u64> = c.lines.iter().map(|l| l.product_id).collect();
            self.zero_uncounted(&c.count_id, &c.location, &listed, now_ms)?
        } else {
            (0, 0)
        };
        let basis_heads: Vec<String> = c
            .lines
            .iter()
            .map(|l| self.ledger_doc(l.product_id, &c.location).encode())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|d| self.docs.get(&d).map(|s| (d, s)))
            .map(|(d, s)| format!("{d}@{}", hex_heads(&s.doc.heads()).join(",")))
            .collect();
        let mut record = serde_json::json!({"count_id": c.count_id, "node": self.cfg.name, "location": c.location, "counted_at_ms": at_ms, "lines": out_lines, "basis": basis_heads, "occurred_at": c.occurred_at, "register_id": c.register_id, "staff_id": c.staff_id, "at_ms": now_ms});
        if full {
            record["scope"] = "full".into();
            record["products_zeroed"] = zeroed.into();
            record["zero_delta"] = zero_delta.into();
        }
        // The basis heads are a diagnosis aid: dropped if the record would
        // otherwise be larger than a peer accepts.
        if record.to_string().len() > crate::validate::RECORD_BYTES_MAX {
            record["basis"] = serde_json::Value::Null;
        }
        self.write_record(RecordKind::Count, &c.count_id, record, now_ms);
        let mut body = serde_json::json!({"count_id": c.count_id, "lines": out_lines});
        if full {
            body["products_zeroed"] = zeroed.into();
            body["units_delta"] = units_delta.saturating_add(zero_delta).into();
        }
        Ok(Self::reply(201, body))
    }

    fn grant(&mut self, g: crate::ops::Grant, now_ms: u64) -> Result<OpReply, OpError> {
        let to = self.views.tag_of(&g.to).ok_or_else(|| {
            OpError::NotFound(format!(
                "unknown node {:?}: it has not joined the mesh yet",
                g.to
            ))
        })?;
        if to == self.tag {
            return Err(OpError::BadRequest(
                "a node cannot grant rights to itself".into(),
            ));
        }
        let avail = self.rights(g.product_id, &g.location);
        if avail < g.quantity as i64 && !self.faults.skip_rights_check {
            return Err(OpError::InsufficientStock(vec![ShortLine {
                product_id: g.product_id,
                location: g.location.clone(),
                requested: g.quantity,
                available: avail.max(0),
            }]));
        }
        self.bump(
            g.product_id,
            &g.location,
            LedgerField::Granted(to),
            g.quantity,
        )?;
        let record = serde_json::json!({"grant_id": g.grant_id, "node": self.cfg.name, "location": g.location, "product_id": g.product_id, "to": g.to, "to_tag": to.hex(), "quantity": g.quantity, "occurred_at": g.occurred_at, "register_id": g.register_id, "staff_id": g.staff_id, "at_ms": now_ms});
        self.write_record(RecordKind::Grant, &g.grant_id, record, now_ms);
        Ok(Self::reply(
            201,
            serde_json::json!({"grant_id": g.grant_id, "product_id": g.product_id, "location": g.location, "to": g.to, "rights_left": self.rights(g.product_id, &g.location)}),
        ))
    }

    fn customer_doc(&self, customer: &str) -> DocId {
        DocId::Customers {
            bucket: customer_bucket(customer, self.cfg.buckets),
        }
    }

    fn bump_loyalty(&mut self, customer: &str, earned: bool, add: u64) -> Result<(), OpError> {
        let actor = self.actor;
        if let Some(u) = &mut self.undo {
            if let std::collections::btree_map::Entry::Vacant(slot) =
                u.loyalty.entry((customer.to_string(), earned))
            {
                let old = self.views.customers.get(customer).and_then(|v| {
                    if earned {
                        v.earned.get(&actor).copied()
                    } else {
                        v.spent.get(&actor).copied()
                    }
                });
                slot.insert(old);
            }
        }
        let view = self
            .views
            .customers
            .entry(customer.to_string())
            .or_default();
        let cell = if earned {
            view.earned.entry(actor).or_default()
        } else {
            view.spent.entry(actor).or_default()
        };
        *cell = cell
            .checked_add(add)
            .filter(|v| *v <= CELL_MAX)
            .ok_or_else(|| OpError::BadRequest("points overflow".into()))?;
        let new = *cell;
        let key = if earned {
            CustomerKey::Earned {
                customer: customer.to_string(),
                actor,
            }
        } else {
            CustomerKey::Spent {
                customer: customer.to_string(),
                actor,
            }
        };
        let doc = self.customer_doc(customer);
        self.put(doc, key.encode(), ScalarValue::Uint(new));
        self.pending_customers.insert(customer.to_string());
        Ok(())
    }

    fn customer_put(
        &mut self,
        id: &str,
        u: crate::ops::CustomerUpdate,
    ) -> Result<OpReply, OpError> {
        if self.views.customers.get(id).is_some_and(|c| c.erased) {
            return Err(OpError::NotFound(format!("customer {id} was erased")));
        }
        let doc = self.customer_doc(id);
        let mut fields: Vec<(&str, ScalarValue)> = Vec::new();
        if let Some(v) = u.name {
            fields.push(("name", ScalarValue::Str(v.into())))
        }
        if let Some(v) = u.email {
            fields.push(("email", ScalarValue::Str(v.into())))
        }
        if let Some(v) = u.phone {
            fields.push(("phone", ScalarValue::Str(v.into())))
        }
        if let Some(v) = u.marketing_consent {
            fields.push(("marketing_consent", ScalarValue::Boolean(v)))
        }
        if let Some(v) = u.tags {
            fields.push((
                "tags",
                ScalarValue::Str(serde_json::to_string(&v).unwrap_or_default().into()),
            ))
        }
        if fields.is_empty() {
            return Err(OpError::BadRequest(
                "no field to update (name, email, phone, marketing_consent, tags)".into(),
            ));
        }
        let Some(key) = self.customer_key(id) else {
            return Err(OpError::NotFound(format!("customer {id} was erased")));
        };
        let fields: Vec<(&str, ScalarValue, ScalarValue)> = fields
            .into_iter()
            .map(|(f, v)| match &v {
                // Personal data is stored only encrypted under the customer's key.
                ScalarValue::Str(plain) => {
                    let sealed = self.seal(&key, plain);
                    (f, v.clone(), ScalarValue::Str(sealed.into()))
                }
                _ => (f, v.clone(), v),
            })
            .collect();
        let mut view = self.views.customers.get(id).cloned().unwrap_or_default();
        for (f, plain, v) in fields {
            view.profile
                .insert(f.to_string(), crate::views::scalar_json(&plain));
            view.conflicts.remove(f);
            self.put(
                doc.clone(),
                CustomerKey::Profile {
                    customer: id.into(),
                    field: f.into(),
                }
                .encode(),
                v,
            );
        }
        self.views.set_customer(id, view);
        self.pending_customers.insert(id.to_string());
        Ok(Self::reply(200, serde_json::json!({"customer_id": id})))
    }

    fn customer_erase(&mut self, id: &str, now_ms: u64) -> Result<OpReply, OpError> {
        let doc_id = self.customer_doc(id);
        let known = self.views.customers.get(id).is_some_and(|c| !c.erased);
        if !known {
            return Err(OpError::NotFound(format!("unknown customer {id}")));
        }
        for f in layout::PROFILE_FIELDS {
            self.slot(&doc_id).dels.push(
                CustomerKey::Profile {
                    customer: id.into(),
                    field: f.into(),
                }
                .encode(),
            );
        }
        self.put(
            doc_id,
            CustomerKey::Erased {
                customer: id.into(),
            }
            .encode(),
            ScalarValue::Str(now_ms.to_string().into()),
        );
        // Crypto-shredding: the keys go, so no copy of the history can be read.
        self.set_key_entry(id, crate::crypto::KeyEntry::Erased);
        self.key_changed(id);
        let mut view = self.views.customers.get(id).cloned().unwrap_or_default();
        view.erased = true;
        view.profile.clear();
        view.conflicts.clear();
        self.views.set_customer(id, view);
        self.pending_customers.insert(id.to_string());
        Ok(Self::reply(
            200,
            serde_json::json!({"customer_id": id, "erased": true}),
        ))
    }

    fn redeem(&mut self, id: &str, r: crate::ops::Redeem) -> Result<OpReply, OpError> {
        let Some(view) = self.views.customers.get(id) else {
            return Err(OpError::NotFound(format!("unknown customer {id}")));
        };
        let points = view.points();
        if points < r.points as i64 {
            return Err(OpError::BadRequest(format!(
                "customer has {points} points, {} requested",
                r.points
            )));
        }
        self.bump_loyalty(id, false, r.points)?;
        let left = self
            .views
            .customers
            .get(id)
            .map(|v| v.points())
            .unwrap_or(0);
        Ok(Self::reply(
            201,
            serde_json::json!({"redeem_id": r.redeem_id, "loyalty_points": left}),
        ))
    }

    /// Commits the pending writes of every document as one Automerge change per
    /// document and returns everything the shell must persist atomically.
    pub fn flush(&mut self, now_ms: u64) -> Batch {
        let mut batch = Batch::default();
        // Erased customers whose profile came back from an offline peer are scrubbed again.
        let customers: Vec<String> = std::mem::take(&mut self.pending_customers)
            .into_iter()
            .collect();
        for c in &customers {
            let doc_id = self.customer_doc(c);
            if let Some(slot) = self.docs.get(&doc_id.encode()) {
                let erased = slot
                    .doc
                    .get(
                        ROOT,
                        CustomerKey::Erased {
                            customer: c.clone(),
                        }
                        .encode(),
                    )
                    .ok()
                    .flatten()
                    .is_some();
                if erased {
                    let present: Vec<String> = layout::PROFILE_FIELDS
                        .iter()
                        .map(|f| {
                            CustomerKey::Profile {
                                customer: c.clone(),
                                field: (*f).into(),
                            }
                            .encode()
                        })
                        .filter(|k| slot.doc.get(ROOT, k.as_str()).ok().flatten().is_some())
                        .collect();
                    self.dirty_docs.insert(doc_id.encode());
                    let s = self.slot(&doc_id);
                    for k in present {
                        if !s.dels.contains(&k) {
                            s.dels.push(k);
                        }
                    }
                }
            }
        }
        let dirty = self.dirty_docs.clone();
        self.cut_full_epochs(&dirty, now_ms);
        let ids: Vec<String> = std::mem::take(&mut self.dirty_docs).into_iter().collect();
        for id in ids {
            // One Automerge change per document for the whole batch.
            self.commit_pending_writes(&id, now_ms);
            self.dirty_docs.remove(&id);
            let Some(slot) = self.docs.get_mut(&id) else {
                continue;
            };
            let heads = slot.doc.get_heads();
            if heads == slot.persisted {
                continue;
            }
            self.indexed_parts.remove(&id);
            let chunk = slot.doc.save_after(&slot.persisted);
            // The push after the commit carries the same bytes; nobody to push
            // to (or too large for one frame: offered through a session) → none.
            let push = if !self.sessions.is_empty() && chunk.len() <= crate::wire::CHUNK_BYTES_MAX {
                chunk.clone()
            } else {
                Vec::new()
            };
            let fold_at = slot
                .snapshot_bytes
                .saturating_mul(SNAPSHOT_CHUNK_FACTOR)
                .max(SNAPSHOT_FLOOR_BYTES);
            if slot.chunk_bytes + chunk.len() as u64 > fold_at
                || slot.next_chunk >= CHUNKS_PER_SNAPSHOT_MAX
            {
                let bytes = slot.doc.save();
                slot.snapshot_bytes = bytes.len() as u64;
                slot.chunk_bytes = 0;
                slot.next_chunk = 1;
                batch.docs.push(DocWrite::Snapshot {
                    doc: id.clone(),
                    bytes,
                });
            } else {
                slot.chunk_bytes += chunk.len() as u64;
                let seq = slot.next_chunk.max(1);
                slot.next_chunk = seq + 1;
                batch.docs.push(DocWrite::Chunk {
                    doc: id.clone(),
                    seq,
                    bytes: chunk,
                });
            }
            if matches!(slot.id, DocId::Ledger { .. }) {
                slot.heads_log.push_back((now_ms, heads.clone()));
                while slot.heads_log.len() > HEADS_LOG_MAX {
                    slot.heads_log.pop_front();
                }
                batch
                    .heads_log
                    .push((id.clone(), now_ms, hex_heads(&heads)));
            }
            batch.heads.push((id.clone(), hex_heads(&heads)));
            slot.persisted = heads.clone();
            let part = crate::sync::doc_digest(&id, &heads);
            let old = std::mem::replace(&mut slot.digest_part, part);
            self.digest.toggle(&id, old);
            self.digest.toggle(&id, part);
            self.changed_docs.insert(id, push);
        }
        self.flush_part_indexes(&mut batch);
        for (p, l) in std::mem::take(&mut self.pending_rows) {
            let row = self.row(p, &l);
            batch.rows.push(((p, l), row));
        }
        batch.idem = self.pending_idem.drain().collect();
        batch.retired = std::mem::take(&mut self.pending_retired);
        batch.sync_states = std::mem::take(&mut self.pending_sync_states);
        batch.keys = std::mem::take(&mut self.pending_keys).into_iter().collect();
        self.keys_to_push.extend(batch.keys.iter().cloned());
        batch
    }

    /// The batch returned by the last `flush` is durable: release the pushes to peers.
    pub fn committed(&mut self, now_ms: u64) {
        let changed = std::mem::take(&mut self.changed_docs);
        self.push_docs(changed, now_ms);
        self.push_sources.clear();
    }

    pub fn take_outgoing(&mut self) -> Vec<(NodeId, Vec<u8>)> {
        std::mem::take(&mut self.outbox)
    }

    pub(crate) fn queue_sync_state(&mut self, peer: NodeId, doc: String, state: Vec<u8>) {
        self.pending_sync_states.push((peer, doc, state));
    }

    /// Rebuilds the views touched by a set of keys of one document from the document.
    pub(crate) fn recompute_keys(&mut self, id: &str, keys: &BTreeSet<String>) {
        let Some(slot) = self.docs.get(id) else {
            return;
        };
        match slot.id.clone() {
            DocId::Ledger { location, .. } => {
                let products: BTreeSet<u64> = keys
                    .iter()
                    .filter_map(|k| layout::parse_ledger_any(k).ok())
                    .map(|(p, _, _, _)| p)
                    .collect();
                let entries: Vec<(u64, StockEntry)> = products
                    .into_iter()
                    .map(|p| (p, read_entry(&*slot.doc, p, None)))
                    .collect();
                for (p, entry) in entries {
                    self.set_entry(p, &location, entry);
                }
            }
            DocId::Mesh => {
                let mut retirements = Vec::new();
                for k in keys {
                    if let Some(tag) = layout::parse_retired_key(k) {
                        // Conflicting successors: the smallest tag wins on every node.
                        let successor = slot
                            .doc
                            .get_all(ROOT, k.as_str())
                            .ok()
                            .into_iter()
                            .flatten()
                            .filter_map(|(v, _)| {
                                v.as_str().and_then(|s| layout::parse_retirement(s).ok())
                            })
                            .min();
                        if let Some(s) = successor {
                            retirements.push((tag, s));
                        }
                    }
                    if let Some(loc) = layout::parse_location_key(k) {
                        if let Ok(Some((v, _))) = slot.doc.get(ROOT, k.as_str()) {
                            if let Some(Ok(d)) = v.as_str().map(layout::parse_declared_location) {
                                if d.location == loc {
                                    self.views.declared.insert(loc.to_string(), d);
                                }
                            }
                        }
                    }
                    if let Ok(tag) = layout::parse_mesh_key(k) {
                        if let Ok(Some((v, _))) = slot.doc.get(ROOT, k.as_str()) {
                            if let Some(Ok(info)) = v.as_str().map(layout::parse_node_info) {
                                self.views.nodes.insert(tag, info);
                            }
                        }
                    }
                }
                for (tag, successor) in retirements {
                    self.note_retirement(tag, successor);
                }
            }
            DocId::Records { .. } => {
                let recs: Vec<(String, String)> = keys
                    .iter()
                    .filter_map(|k| {
                        let (v, _) = slot.doc.get(ROOT, k.as_str()).ok().flatten()?;
                        Some((k.clone(), v.as_str()?.to_string()))
                    })
                    .collect();
                for (k, json) in recs {
                    self.note_record(id, &k, &json);
                }
            }
            DocId::Products { .. } => self.recompute_products(id, keys),
            DocId::Customers { .. } => {
                let custs: BTreeSet<String> = keys
                    .iter()
                    .filter_map(|k| CustomerKey::parse(k).ok())
                    .map(|c| c.customer().to_string())
                    .collect();
                for c in custs {
                    let mut view = read_customer(&slot.doc, &c, self.keys.get(&c));
                    // Keep this actor's loyalty cells of the open batch.
                    if let Some(old) = self.views.customers.get(&c) {
                        for (cells, mine) in [
                            (&mut view.earned, old.earned.get(&self.actor)),
                            (&mut view.spent, old.spent.get(&self.actor)),
                        ] {
                            if let Some(v) = mine {
                                let e = cells.entry(self.actor).or_default();
                                *e = (*e).max(*v);
                            }
                        }
                    }
                    self.views.set_customer(&c, view);
                    self.pending_customers.insert(c);
                }
            }
        }
    }

    fn set_entry(&mut self, product: u64, location: &str, mut entry: StockEntry) {
        if location == self.cfg.location {
            self.alloc_dirty.insert(product);
        }
        let m = self.views.stock.entry(product).or_default();
        // This actor's cells may hold writes of the open batch that are not in
        // the document yet: the view keeps the larger value of each cell.
        if let Some(own) = m.get(location).and_then(|e| e.cells.get(&self.actor)) {
            entry.cells.entry(self.actor).or_default().merge(own);
        }
        if entry.cells.is_empty() {
            m.remove(location);
        } else {
            m.insert(location.to_string(), entry);
        }
        self.pending_rows.insert((product, location.to_string()));
    }

    fn recompute_doc_all(&mut self, id: &str) {
        let Some(slot) = self.docs.get(id) else {
            return;
        };
        let keys: BTreeSet<String> = slot.doc.keys(ROOT).collect();
        self.recompute_keys(id, &keys);
    }

    /// Records a detected fork of this node's own history and any deficit it
    /// left: the shortfall the merged changes caused on the rows of `before`
    /// (this node's rights there before they were applied).
    pub(crate) fn record_fork(
        &mut self,
        doc: &str,
        changes: usize,
        before: &RightsBefore,
        now_ms: u64,
    ) {
        self.stats.forks_detected += 1;
        tracing::error!(doc, changes, "fork of this node's own history detected (restored backup or copied data directory); totals merged exactly");
        let id = format!("{}.{}", doc.replace('/', "."), now_ms);
        let rec = serde_json::json!({"node": self.cfg.name, "doc": doc, "changes": changes, "at_ms": now_ms});
        self.write_record(RecordKind::Fork, &id, rec, now_ms);
        // The merged branches may have spent the same rights twice.
        self.record_event_deficits(before, "fork", now_ms);
    }

    /// This node's rights (a retired predecessor's included) on the rows of
    /// ledger document `doc` that `keys` touch, as the views hold them now:
    /// taken before changes are applied, so that the shortfall they cause is
    /// told apart from earlier ones.
    pub(crate) fn rights_of_keys(&self, doc: &str, keys: &BTreeSet<String>) -> RightsBefore {
        let mut out = RightsBefore::new();
        let Ok(DocId::Ledger { location, .. }) = DocId::parse(doc, self.cfg.buckets) else {
            return out;
        };
        for k in keys {
            if let Ok((p, _, _, _)) = layout::parse_ledger_any(k) {
                out.entry((p, location.clone())).or_insert_with(|| {
                    self.views
                        .entry(p, &location)
                        .map(|e| self.node_rights(e, self.tag))
                        .unwrap_or(0)
                });
            }
        }
        out
    }

    /// One shortfall event, one deficit: for each row of `before`, the units
    /// this node's rights went below zero since (`max(0, -after) -
    /// max(0, -before)`), never masked by deficits recorded for earlier
    /// events. The record's id is the same on every branch of a cloned node
    /// that merges the same changes (the row, the writers of this node's tag
    /// on it, the rights after), so two branches detecting one fork record
    /// one deficit.
    pub(crate) fn record_event_deficits(
        &mut self,
        before: &RightsBefore,
        cause: &str,
        now_ms: u64,
    ) {
        let mut shortfalls = Vec::new();
        for ((p, l), b) in before {
            let Some(e) = self.views.entry(*p, l) else {
                continue;
            };
            let after = self.node_rights(e, self.tag);
            // The event's own shortfall; and never less than what is short
            // and not covered by any deficit yet (an earlier event's record
            // may have been lost with a restored disk).
            let new_short = (after.saturating_neg().max(0) - b.saturating_neg().max(0)).max(
                after
                    .saturating_neg()
                    .saturating_sub(self.recorded_deficit_total(*p, l)),
            );
            if new_short > 0 {
                shortfalls.push((*p, l.clone(), new_short, after, self.own_writers_digest(e)));
            }
        }
        for (p, location, d, after, writers) in shortfalls {
            let mut id = layout::part_id(
                &format!("{cause}.{location}.{p}"),
                &format!(".{writers}.{}", after.unsigned_abs()),
            );
            let mut d = d;
            let key = (format!("deficit/{id}"), self.cfg.name.clone());
            if self.views.alarms.contains_key(&key) {
                // The other branch's record of this very event arrived
                // first; or an earlier event ended at the same rights: then
                // only what no deficit covers yet, under an id of its own.
                let uncovered = after
                    .saturating_neg()
                    .saturating_sub(self.recorded_deficit_total(p, &location));
                if uncovered <= 0 {
                    continue;
                }
                d = uncovered;
                id = layout::part_id(
                    &format!("{cause}.{location}.{p}"),
                    &format!(".{writers}.{}.{now_ms}", after.unsigned_abs()),
                );
            }
            self.write_deficit(&id, p, &location, d, cause, now_ms);
        }
    }

    /// A short digest of the incarnations of this node's tag (and of retired
    /// nodes it succeeds) that wrote cells of an entry.
    fn own_writers_digest(&self, e: &StockEntry) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for a in e.cells.keys() {
            if self.views.resolve(a.tag()) == self.tag {
                h.update(a.hex().as_bytes());
            }
        }
        hex::encode(&h.finalize()[..6])
    }

    fn write_deficit(
        &mut self,
        id: &str,
        p: u64,
        location: &str,
        d: i64,
        cause: &str,
        now_ms: u64,
    ) {
        tracing::warn!(
            location = %location,
            product = p,
            deficit = d,
            cause,
            "rights below zero recorded as a deficit"
        );
        let rec = serde_json::json!({"node": self.cfg.name, "location": location, "product_id": p, "deficit": d, "cause": cause, "at_ms": now_ms});
        self.write_record(RecordKind::Deficit, id, rec, now_ms);
    }

    /// After a retirement that passed rights to this node became known
    /// (`retired_before`: the retirements known until then): records the
    /// shortfall the inheritance causes on every row that holds an inherited
    /// writer's cells — its branches may have spent the same rights twice,
    /// and it can no longer record that itself. The shortfall is the event's
    /// own: what this node's rights fell below zero by, less what it was
    /// short already and what the retired node was short and recorded itself.
    pub(crate) fn record_inherited_deficits(
        &mut self,
        retired_before: &BTreeMap<NodeTag, NodeTag>,
        now_ms: u64,
    ) {
        let me = self.tag;
        let old = |t: NodeTag| {
            let mut t = t;
            for _ in 0..16 {
                match retired_before.get(&t) {
                    Some(next) if *next != t => t = *next,
                    _ => break,
                }
            }
            t
        };
        let mut shortfalls = Vec::new();
        for (p, m) in &self.views.stock {
            for (l, e) in m {
                // Writers that were not this node's before and are now.
                let mut inherited: Vec<NodeTag> = e
                    .cells
                    .keys()
                    .map(|a| a.tag())
                    .chain(e.cells.values().flat_map(|c| c.granted.keys().copied()))
                    .filter(|t| old(*t) != me && self.views.resolve(*t) == me)
                    .map(old)
                    .collect();
                if inherited.is_empty() {
                    continue;
                }
                inherited.sort();
                inherited.dedup();
                let after = self.node_rights(e, me);
                let mine_before = e.rights_in(me, &old);
                let mut short = after.saturating_neg().max(0) - mine_before.saturating_neg().max(0);
                for t in inherited {
                    let theirs = e.rights_in(t, &old).saturating_neg().max(0);
                    let name = self.views.name_of(t);
                    short -= theirs.min(self.recorded_deficit_of(&name, *p, l));
                }
                let uncovered = after
                    .saturating_neg()
                    .saturating_sub(self.recorded_deficit_total(*p, l));
                let short = short.max(uncovered);
                if short > 0 {
                    shortfalls.push((*p, l.clone(), short, after));
                }
            }
        }
        for (p, location, d, after) in shortfalls {
            let id = layout::part_id(
                &format!("retired.{location}.{p}"),
                &format!(".{}", after.unsigned_abs()),
            );
            self.write_deficit(&id, p, &location, d, "retired", now_ms);
        }
    }

    /// Units of deficit recorded on (product, location) by this node or by a
    /// retired node whose rights passed to it.
    fn recorded_deficit_total(&self, product: u64, location: &str) -> i64 {
        let me = self.tag;
        let mut names: BTreeSet<String> = self
            .views
            .nodes
            .keys()
            .filter(|t| **t != me && self.views.resolve(**t) == me)
            .map(|t| self.views.name_of(*t))
            .collect();
        names.insert(self.cfg.name.clone());
        names
            .iter()
            .map(|n| self.recorded_deficit_of(n, product, location))
            .fold(0i64, i64::saturating_add)
    }

    /// Units of deficit recorded on (product, location) by the node `name`.
    fn recorded_deficit_of(&self, name: &str, product: u64, location: &str) -> i64 {
        self.views
            .alarms
            .values()
            .filter(|a| a.kind == "deficit" && a.node == name)
            .filter(|a| {
                a.record["product_id"].as_u64() == Some(product)
                    && a.record["location"].as_str() == Some(location)
            })
            .map(|a| a.record["deficit"].as_i64().unwrap_or(0))
            .fold(0i64, i64::saturating_add)
    }

    /// Every document id with its heads (hex).
    pub fn documents(&self) -> Vec<(String, Vec<String>)> {
        self.docs
            .iter()
            .map(|(id, s)| (id.clone(), hex_heads(&s.doc.heads())))
            .collect()
    }

    /// The whole document as standard Automerge bytes.
    pub fn document_bytes(&self, id: &str) -> Option<Vec<u8>> {
        self.docs.get(id).map(|s| s.doc.save())
    }

    /// Read access to a document (tests and the simulator's checkers).
    pub fn doc(&self, id: &str) -> Option<&Automerge> {
        self.docs.get(id).map(|s| &*s.doc)
    }

    /// Recomputes every stock entry from the documents (for checkers).
    pub fn recompute_stock(&self) -> HashMap<u64, BTreeMap<String, StockEntry>> {
        let mut out: HashMap<u64, BTreeMap<String, StockEntry>> = HashMap::new();
        for slot in self.docs.values() {
            if let DocId::Ledger { location, .. } = &slot.id {
                let products: BTreeSet<u64> = slot
                    .doc
                    .keys(ROOT)
                    .filter_map(|k| layout::parse_ledger_any(&k).ok())
                    .map(|(p, _, _, _)| p)
                    .collect();
                for p in products {
                    let e = read_entry(&*slot.doc, p, None);
                    if !e.cells.is_empty() {
                        out.entry(p).or_default().insert(location.clone(), e);
                    }
                }
            }
        }
        out
    }

    /// Owned keys that hold more than one value (a fork of one actor, which the
    /// per-incarnation layout makes impossible unless an actor id was reused).
    pub fn owned_conflicts(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (id, slot) in &self.docs {
            if !matches!(slot.id, DocId::Ledger { .. }) {
                continue;
            }
            for item in slot.doc.map_range(ROOT, ..) {
                // Carried cells have many writers by design (the max holds).
                if item.conflict && !item.key.starts_with(layout::LEDGER_CARRIED_PREFIX) {
                    out.push((id.clone(), item.key.to_string()));
                }
            }
        }
        out
    }
}
