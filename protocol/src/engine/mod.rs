//! The node state machine: executes client operations against the ledger,
//! applies validated changes from peers, keeps the views, and hands the shell a
//! [`Batch`] to persist. It owns the Automerge documents; it does no IO.
//!
//! The shell's loop is: feed operations ([`Engine::execute`]) and frames
//! ([`Engine::receive`]); [`Engine::flush`] → persist the batch in one durable
//! transaction → [`Engine::committed`] → answer the callers and send
//! [`Engine::take_outgoing`]. Nothing leaves the engine before `committed`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use automerge::{Automerge, ChangeHash, ScalarValue};
use serde::{Deserialize, Serialize};

use crate::ids::{ActorKey, NodeId, NodeTag};
use crate::layout::{self, DocId};
use crate::ops::IdemRecord;
use crate::sync::{Digest, PeerSession};
use crate::views::{StockRow, Views};

mod commit;
mod counts;
mod customers;
mod deficits;
mod docs;
mod epochs;
mod exchange;
mod execute;
mod imports;
mod inspect;
#[cfg(all(test, debug_assertions))]
mod invariant_tests;
mod nodes;
mod open;
mod own_signing;
mod rebalance;
mod recompute;
mod rows;
mod sale_lookup;
mod sync;

pub use commit::Released;
pub use epochs::{EPOCH_OPS_MIN, EPOCH_OPS_PER_KEY};

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
    /// A received transfer still counts as in transit to its destination.
    pub received_in_transit: bool,
    /// A count records the node's whole negative balance as a deficit at
    /// every count (v1), not the shortfall its own line causes.
    pub deficit_whole_balance: bool,
    /// Bookings at a location no node owns are never reversed: two nodes
    /// recording one delivery or import both keep it.
    pub skip_ownerless_settle: bool,
    /// A sale id another node used too is not listed as a collision: the
    /// newer sale hides the other from lookups and returns.
    pub unlisted_sale_collisions: bool,
    /// A receipt id two nodes used for two deliveries is not listed as a
    /// collision in `/api/overdrafts`.
    pub unlisted_receipt_collisions: bool,
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
    /// Batch certificates new in this batch (own, and peers' accepted with
    /// their changes), stored by id (`signing`).
    pub certs: Vec<crate::signing::Cert>,
    /// (document, certificate id): which documents' changes a stored
    /// certificate covers, for reading them back when a peer needs them.
    pub cert_links: Vec<(String, crate::signing::CertId)>,
    /// Introductions received from peers (verified), stored.
    pub intros: Vec<crate::signing::Introduction>,
    /// The sale index of closed parts (`coldsales`): entries of the parts
    /// whose index this batch stores, their numbers, the key, shared ids.
    pub cold_sales: crate::coldsales::ColdSalesWrites,
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
            && self.certs.is_empty()
            && self.cert_links.is_empty()
            && self.intros.is_empty()
            && self.cold_sales.is_empty()
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
    /// Operations per key past which an epoch is cut (see [`epochs::EPOCH_OPS_PER_KEY`]).
    pub(crate) epoch_ops_per_key: u64,
    /// Per ledger document: (its operations, its keys) when its keys were
    /// last counted (counting them walks the document; see `epoch_full`).
    pub(crate) epoch_keys: HashMap<String, (u64, u64)>,
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
    /// Where cold closed parts are read back from, so that their bytes need
    /// not stay in memory (`None`: they are held, as in the test mesh).
    pub(crate) part_archive: Option<std::sync::Arc<dyn crate::lazydoc::PartArchive>>,
    /// The sale index of closed parts in the store (`coldsales`); `None`
    /// without an archive that keeps one: every sale is then held in
    /// `views.sales`.
    pub(crate) cold_sales: Option<crate::coldsales::ColdSales>,
    /// Set while a start replays a part whose sales are in the stored
    /// index: their ids are not noted in memory.
    pub(crate) sales_stored: bool,
    /// Set until `finish_open` ends: sales noted while opening are history,
    /// not news for the sale feed (a reopened engine's feed starts empty).
    pub(crate) opening: bool,
    /// Recently noted sales (sequence, id), at most [`crate::history::SALE_FEED_MAX`].
    pub(crate) sale_feed: VecDeque<(u64, String)>,
    pub(crate) sale_feed_next: u64,
    pub(crate) digest: Digest,
    pub(crate) sessions: BTreeMap<NodeId, PeerSession>,
    pub(crate) outbox: Vec<(NodeId, Vec<u8>)>,
    /// Set by a `flush` that wrote documents, cleared by `committed`: while
    /// set, nothing may be taken for peers (`take_outgoing` asserts it).
    pub(crate) awaiting_commit: bool,
    /// Set while an earlier batch flushed by this engine is still on its way
    /// to disk (`step::NodeLoop::execute` with a batch in flight): a cold part
    /// must not be stored away then, its snapshot may not be readable yet.
    pub(crate) batch_in_flight: bool,
    /// Documents whose heads changed in the last flush, with the raw changes
    /// since their previous persisted heads (empty: no peer was connected, or too large to push; such a
    /// document is offered through sync sessions instead).
    pub(crate) changed_docs: BTreeMap<String, Vec<u8>>,
    /// Where this batch's new changes per document came from: decides which
    /// peers the push after the commit goes to.
    pub(crate) push_sources: BTreeMap<String, crate::sync::PushSource>,
    /// Catch-up coordination (see `Engine::defer_for_leader` in `engine/sync/session.rs`).
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
    /// This node's signer and the verifier of peers' signatures; `None`
    /// only in single-engine tests and benchmarks that never meet a peer
    /// (the node and the simulator always set it: `set_signing`).
    pub(crate) signing: Option<crate::signing::Signing>,
    /// Authors whose changes are accepted (own, configured, introduced).
    pub(crate) members: crate::signing::Membership,
    /// Batch certificates held and received (`signing::CertBook`).
    pub(crate) certs: crate::signing::CertBook,
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
    /// Reservations `expire_reservations` looked at since start: only the
    /// due ones (`views.expiring`), never every reservation ever made.
    pub reservations_expiry_examined: u64,
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
    /// Cold parts whose bytes were dropped from memory once their stored
    /// snapshot was known to match (read back from the part archive).
    pub parts_stored_away: u64,
    /// Records part indexes a start read back from the part archive to
    /// replay them (instead of holding them all from the load).
    pub part_indexes_read_back: u64,
    /// Ledger epochs this node started (as a location's owner) or moved to.
    pub epochs_started: u64,
    pub epochs_joined: u64,
    /// Cells carried from late changes to an older ledger epoch.
    pub late_cells_carried: u64,
    /// Batch certificates whose signature this node checked.
    pub certs_verified: u64,
    /// Parts whose sales were written to the stored index (since start),
    /// and their entries; parts whose sales then left memory.
    pub cold_sale_parts_written: u64,
    pub cold_sale_entries_written: u64,
    pub cold_sale_parts_dropped: u64,
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
            epoch_ops_max: epochs::EPOCH_OPS_MIN,
            epoch_ops_per_key: epochs::EPOCH_OPS_PER_KEY,
            epoch_keys: HashMap::new(),
            pending_retired: Vec::new(),
            pending_part_indexes: BTreeMap::new(),
            indexed_parts: Default::default(),
            index_replay: HashMap::new(),
            part_archive: None,
            cold_sales: None,
            sales_stored: false,
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
            awaiting_commit: false,
            batch_in_flight: false,
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
            signing: None,
            members: crate::signing::Membership::default(),
            certs: crate::signing::CertBook::default(),
        };
        e.members.set_own(e.cfg.node_id);
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

    /// Whether an earlier flushed batch is not yet durable (set by the loop
    /// before each batch it executes; see `batch_in_flight`).
    pub fn set_batch_in_flight(&mut self, in_flight: bool) {
        self.batch_in_flight = in_flight;
    }

    /// Reads cold closed records parts back from `archive` instead of
    /// holding their bytes (set before documents load). Also reads what the archive holds of the sale index of closed parts
    /// (`coldsales`); if that fails, every sale is held in memory.
    pub fn set_part_archive(&mut self, archive: std::sync::Arc<dyn crate::lazydoc::PartArchive>) {
        self.cold_sales = match archive.cold_sales() {
            Ok(state) => state.map(crate::coldsales::ColdSales::from_state),
            Err(e) => {
                tracing::error!(error = %e, "the stored sale index cannot be read; every sale is held in memory");
                None
            }
        };
        self.part_archive = Some(archive);
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

    /// Registers a configured peer so grants can name it before its directory
    /// entry has synced.
    pub fn add_configured_peer(&mut self, name: &str, id: NodeId) {
        self.admit_configured(id);
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
}
