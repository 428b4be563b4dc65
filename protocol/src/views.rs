//! Materialized views: what reads are served from. Every view is a function of
//! the documents; `Engine::recompute_*` rebuilds the affected entries from the
//! documents after every applied change, so views never drift (DESIGN §5.5).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::{Automerge, ReadDoc, ScalarValue, Value, ROOT};
use serde::{Deserialize, Serialize};

use crate::ids::{ActorKey, NodeInfo, NodeTag};
use crate::layout::{
    customer_range, ledger_carried_range, ledger_product_range, parse_ledger_any, CustomerKey,
    LedgerField,
};
use crate::ledger::StockEntry;
use crate::validate::scalar_u64;

/// The compact per-(product, location) row that is persisted and served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockRow {
    pub on_hand: i64,
    /// Rights this node holds there (what it can sell), never below 0 here.
    pub available: i64,
    /// Units in transfers to this location that have not been received yet.
    #[serde(default)]
    pub incoming: i64,
    /// Units held for open reservations at this location (all nodes).
    #[serde(default)]
    pub reserved: i64,
    /// Node-local change sequence (set by the node when it persists the row).
    #[serde(default)]
    pub seq: u64,
}

/// Reads every cell of `product` from a ledger document.
pub fn read_entry<D: ReadDoc>(
    doc: &D,
    product: u64,
    heads: Option<&[automerge::ChangeHash]>,
) -> StockEntry {
    let mut e = StockEntry::default();
    for range in [ledger_product_range(product), ledger_carried_range(product)] {
        let items: Vec<(String, Value<'static>, bool)> = match heads {
            None => doc
                .map_range(ROOT, range)
                .map(|i| {
                    (
                        i.key.to_string(),
                        Value::from(i.value).to_owned(),
                        i.conflict,
                    )
                })
                .collect(),
            Some(h) => doc
                .map_range_at(ROOT, range, h)
                .map(|i| {
                    (
                        i.key.to_string(),
                        Value::from(i.value).to_owned(),
                        i.conflict,
                    )
                })
                .collect(),
        };
        for (key, value, conflict) in items {
            let Ok((p, actor, field, _)) = parse_ledger_any(&key) else {
                continue;
            };
            if p != product {
                continue;
            }
            let mut n = value.as_scalar().and_then(scalar_u64).unwrap_or(0);
            if conflict {
                // Cells are cumulative: of concurrent values (carried by two
                // nodes, or two branches of a restored node) the largest holds,
                // whichever Automerge shows first.
                let all = match heads {
                    None => doc.get_all(ROOT, key.as_str()),
                    Some(h) => doc.get_all_at(ROOT, key.as_str(), h),
                };
                for (v, _) in all.into_iter().flatten() {
                    n = n.max(v.as_scalar().and_then(scalar_u64).unwrap_or(0));
                }
            }
            let c = e.cells.entry(actor).or_default();
            match field {
                LedgerField::Received => c.received = c.received.max(n),
                LedgerField::Removed => c.removed = c.removed.max(n),
                LedgerField::Granted(to) => {
                    let g = c.granted.entry(to).or_default();
                    *g = (*g).max(n);
                }
                LedgerField::Held(to) => {
                    let g = c.held.entry(to).or_default();
                    *g = (*g).max(n);
                }
                LedgerField::Released => c.released = c.released.max(n),
            }
        }
    }
    e
}

/// A customer as every node sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerView {
    pub profile: BTreeMap<String, serde_json::Value>,
    /// Field → losing values of concurrent edits, until the field is written again.
    pub conflicts: BTreeMap<String, Vec<serde_json::Value>>,
    pub earned: BTreeMap<ActorKey, u64>,
    pub spent: BTreeMap<ActorKey, u64>,
    pub erased: bool,
}

impl CustomerView {
    pub fn points(&self) -> i64 {
        let e: i128 = self.earned.values().map(|v| i128::from(*v)).sum();
        let s: i128 = self.spent.values().map(|v| i128::from(*v)).sum();
        (e - s).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    }
    pub fn is_empty(&self) -> bool {
        self.profile.is_empty() && self.earned.is_empty() && self.spent.is_empty() && !self.erased
    }
}

pub fn scalar_json(v: &ScalarValue) -> serde_json::Value {
    match v {
        ScalarValue::Str(s) => {
            // Tags are stored as a JSON array string; other fields as plain strings.
            if s.starts_with('[') {
                serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.to_string()))
            } else {
                serde_json::Value::String(s.to_string())
            }
        }
        ScalarValue::Boolean(b) => serde_json::Value::Bool(*b),
        ScalarValue::Uint(n) => serde_json::json!(n),
        ScalarValue::Int(n) => serde_json::json!(n),
        _ => serde_json::Value::Null,
    }
}

/// A stored profile value as JSON: encrypted strings are decrypted with the
/// customer's keys (unreadable after erasure → `None`).
fn profile_json(
    v: &ScalarValue,
    keys: Option<&crate::crypto::KeyEntry>,
) -> Option<serde_json::Value> {
    match v {
        ScalarValue::Str(s) if s.starts_with(crate::crypto::ENC_PREFIX) => {
            let plain = crate::crypto::decrypt(keys, s)?;
            Some(scalar_json(&ScalarValue::Str(plain.into())))
        }
        other => Some(scalar_json(other)),
    }
}

pub fn read_customer(
    doc: &Automerge,
    customer: &str,
    key_entry: Option<&crate::crypto::KeyEntry>,
) -> CustomerView {
    let mut v = CustomerView::default();
    let keys: Vec<String> = doc
        .map_range(ROOT, customer_range(customer))
        .map(|i| i.key.to_string())
        .collect();
    for key in keys {
        let Ok(ck) = CustomerKey::parse(&key) else {
            continue;
        };
        if ck.customer() != customer {
            continue;
        }
        let Ok(all) = doc.get_all(ROOT, key.as_str()) else {
            continue;
        };
        match ck {
            CustomerKey::Profile { field, .. } => {
                // Automerge orders conflicting values deterministically; the last is the winner.
                let mut vals: Vec<serde_json::Value> = all
                    .iter()
                    .filter_map(|(val, _)| val.as_scalar().and_then(|s| profile_json(s, key_entry)))
                    .collect();
                if let Some(win) = vals.pop() {
                    if !win.is_null() {
                        v.profile.insert(field.clone(), win);
                    }
                    if !vals.is_empty() {
                        v.conflicts.insert(field, vals);
                    }
                }
            }
            CustomerKey::Earned { actor, .. } => {
                let n = all
                    .iter()
                    .filter_map(|(val, _)| val.as_scalar().and_then(scalar_u64))
                    .max()
                    .unwrap_or(0);
                v.earned.insert(actor, n);
            }
            CustomerKey::Spent { actor, .. } => {
                let n = all
                    .iter()
                    .filter_map(|(val, _)| val.as_scalar().and_then(scalar_u64))
                    .max()
                    .unwrap_or(0);
                v.spent.insert(actor, n);
            }
            CustomerKey::Erased { .. } => v.erased = true,
        }
    }
    if v.erased || matches!(key_entry, Some(crate::crypto::KeyEntry::Erased)) {
        v.erased = true;
        v.profile.clear();
        v.conflicts.clear();
    }
    v
}

/// An overdraft, deficit or fork repair, as listed by `/api/overdrafts`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alarm {
    pub kind: String,
    pub node: String,
    pub id: String,
    pub record: serde_json::Value,
}

/// All materialized views of one node. Its maps are private to the core
/// (the engine keeps them); other crates read them through the query
/// methods below, read-only.
#[derive(Default)]
pub struct Views {
    /// product → location → cells.
    pub(crate) stock: HashMap<u64, BTreeMap<String, StockEntry>>,
    /// Node directory from the mesh document.
    pub(crate) nodes: BTreeMap<NodeTag, NodeInfo>,
    pub(crate) customers: HashMap<String, CustomerView>,
    pub(crate) by_email: HashMap<String, BTreeSet<String>>,
    pub(crate) by_phone: HashMap<String, BTreeSet<String>>,
    /// customer pseudonym (records written before pseudonyms: the id) →
    /// (records document, record key) of its purchases.
    pub(crate) purchases: HashMap<String, BTreeSet<(String, String)>>,
    /// Customer pseudonym (keyed hash of the id under one of its keys, as
    /// sale records hold it) → customer id, for every key in the key store.
    pub(crate) pseudonyms: HashMap<String, String>,
    /// sale id → (records document, key): for lookups by the return desk.
    /// When two nodes used one id, this node's own sale, else the first by
    /// document name; the others are in `sale_collisions`.
    pub(crate) sales: SaleIndex,
    /// Keys of this node's own grant records (`grt/<id>`): answering a rights
    /// request twice is refused by them after a restart.
    pub(crate) own_grants: std::collections::HashSet<String>,
    /// sale id → every (records document, key) holding a sale of that id,
    /// for ids that more than one node used.
    pub(crate) sale_collisions: HashMap<String, BTreeSet<(String, String)>>,
    /// (kind/id, node) → alarm.
    pub(crate) alarms: BTreeMap<(String, String), Alarm>,
    /// Names of configured peers, known before their directory entry arrives.
    pub(crate) configured: BTreeMap<String, NodeTag>,
    /// Names and locations bound to node ids by this node's operator (its
    /// own name and location, its configured peers): a peer's directory
    /// entry never overrides them (`crate::authority`).
    pub(crate) bound: crate::authority::Bindings,
    /// The product catalogue.
    pub(crate) products: HashMap<u64, ProductView>,
    pub(crate) by_sku: HashMap<String, BTreeSet<u64>>,
    pub(crate) by_barcode: HashMap<String, BTreeSet<u64>>,
    /// transfer id → sending node's name → what was sent and whether it was
    /// received. Ids are chain-wide, but two nodes apart from each other may
    /// use one id for two transfers: both stay in effect exactly.
    pub(crate) transfers: HashMap<String, BTreeMap<String, TransferView>>,
    /// destination location → transfer ids (for `incoming`).
    pub(crate) transfers_to: HashMap<String, BTreeSet<String>>,
    /// original sale id → product → units returned against it.
    pub(crate) returned: HashMap<String, BTreeMap<u64, u64>>,
    /// location → (records document, key) of its adjustments.
    pub(crate) adjustments: HashMap<String, BTreeSet<(String, String)>>,
    /// Retired node → its successor (from the mesh document).
    pub(crate) retired: BTreeMap<NodeTag, NodeTag>,
    /// reservation id → creating node's name → reservation (two nodes apart
    /// may have used one id: both hold their units).
    pub(crate) reservations: HashMap<String, BTreeMap<String, ReservationView>>,
    /// Open reservations ordered by expiry: (expires_at_ms, id). Expiry
    /// reads the due ones from the front instead of scanning every
    /// reservation ever made.
    pub(crate) expiring: BTreeSet<(u64, String, String)>,
    /// (product, location, fulfilling node) → units held by open reservations.
    pub(crate) reserved: HashMap<(u64, String, NodeTag), i64>,
    /// product → purchases naming a customer: (at_ms, customer, location, sale id).
    pub(crate) buyers: HashMap<u64, BTreeSet<(u64, String, String, String)>>,
    /// count id → node that took it → count session (and finished counts),
    /// from the records; two nodes may have used one id while apart.
    pub(crate) count_sessions: HashMap<String, BTreeMap<String, crate::counts::CountSession>>,
    /// import id → importing node → what it booked where (`imports.rs`).
    pub(crate) imports: HashMap<String, BTreeMap<String, crate::imports::ImportSeen>>,
    /// Import ids noted since the last `Engine::settle_ownerless_imports`.
    pub(crate) imports_pending: BTreeSet<String>,
    /// Locations declared with `POST /api/locations` (the `mesh` document).
    pub(crate) declared: BTreeMap<String, crate::layout::DeclaredLocation>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductView {
    pub sku: Option<String>,
    pub barcodes: Vec<String>,
    pub external_ids: BTreeMap<String, String>,
    pub name: Option<String>,
    /// Field → losing values of concurrent edits (e.g. two SKUs given at once).
    pub conflicts: BTreeMap<String, Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationView {
    pub location: String,
    pub lines: BTreeMap<u64, u64>,
    pub fulfil_by: Option<NodeTag>,
    pub expires_at_ms: u64,
    /// `None` while open; `fulfilled`, `cancelled` or `expired` once closed.
    pub closed: Option<String>,
    /// True once the creating node's record has arrived.
    pub known: bool,
    /// The ledger hold written with the reservation (protocol 6): its
    /// writer, and per product the writer's held cell once it includes this
    /// reservation. `None` for a reservation recorded before holds were in
    /// the ledger (its record alone holds its units).
    pub hold: Option<(crate::ids::ActorKey, BTreeMap<u64, u64>)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferView {
    pub from: String,
    pub to: String,
    /// Units sent per product (empty until the sender's record has arrived).
    pub sent: BTreeMap<u64, u64>,
    pub received: bool,
}

pub fn read_product(doc: &Automerge, product: u64) -> ProductView {
    let mut v = ProductView::default();
    for field in crate::layout::PRODUCT_FIELDS {
        let key = crate::layout::product_key(product, field);
        let Ok(all) = doc.get_all(ROOT, key.as_str()) else {
            continue;
        };
        let mut vals: Vec<String> = all
            .iter()
            .filter_map(|(val, _)| val.as_str().map(|s| s.to_string()))
            .collect();
        let Some(win) = vals.pop() else { continue };
        if !vals.is_empty() {
            v.conflicts.insert(field.to_string(), vals);
        }
        match field {
            "sku" => v.sku = Some(win),
            "name" => v.name = Some(win),
            "barcodes" => v.barcodes = serde_json::from_str(&win).unwrap_or_default(),
            _ => v.external_ids = serde_json::from_str(&win).unwrap_or_default(),
        }
    }
    v
}

/// Read-only queries for the API, the simulator's checkers and tests.
impl Views {
    /// Product → location → cells.
    pub fn stock(&self) -> &HashMap<u64, BTreeMap<String, StockEntry>> {
        &self.stock
    }
    /// The node directory (from the mesh document).
    pub fn nodes(&self) -> &BTreeMap<NodeTag, NodeInfo> {
        &self.nodes
    }
    /// Customer id → its view.
    pub fn customers(&self) -> &HashMap<String, CustomerView> {
        &self.customers
    }
    /// One customer's view.
    pub fn customer(&self, id: &str) -> Option<&CustomerView> {
        self.customers.get(id)
    }
    /// Normalised email → customer ids.
    pub fn by_email(&self) -> &HashMap<String, BTreeSet<String>> {
        &self.by_email
    }
    /// Normalised phone → customer ids.
    pub fn by_phone(&self) -> &HashMap<String, BTreeSet<String>> {
        &self.by_phone
    }
    /// Sale id → where its record is.
    pub fn sales(&self) -> &SaleIndex {
        &self.sales
    }
    /// (kind/id, node) → alarm.
    pub fn alarms(&self) -> &BTreeMap<(String, String), Alarm> {
        &self.alarms
    }
    /// One product's catalogue entry.
    pub fn product(&self, id: u64) -> Option<&ProductView> {
        self.products.get(&id)
    }
    /// The product catalogue.
    pub fn products(&self) -> &HashMap<u64, ProductView> {
        &self.products
    }
    /// SKU → products.
    pub fn by_sku(&self) -> &HashMap<String, BTreeSet<u64>> {
        &self.by_sku
    }
    /// Barcode → products.
    pub fn by_barcode(&self) -> &HashMap<String, BTreeSet<u64>> {
        &self.by_barcode
    }
    /// Location → (records document, key) of its adjustments.
    pub fn adjustments(&self) -> &HashMap<String, BTreeSet<(String, String)>> {
        &self.adjustments
    }
    /// Retired node → its successor.
    pub fn retired(&self) -> &BTreeMap<NodeTag, NodeTag> {
        &self.retired
    }
    /// Reservation id → creating node's name → reservation.
    pub fn reservations(&self) -> &HashMap<String, BTreeMap<String, ReservationView>> {
        &self.reservations
    }
    /// Import id → importing node → what it booked where.
    pub fn imports(&self) -> &HashMap<String, BTreeMap<String, crate::imports::ImportSeen>> {
        &self.imports
    }
    /// Locations declared with `POST /api/locations`.
    pub fn declared(&self) -> &BTreeMap<String, crate::layout::DeclaredLocation> {
        &self.declared
    }
    /// Entries of the indexes that grow with the history (memory probes):
    /// sales, customers with purchases, products with named buyers, sales
    /// with returns, products with stock.
    pub fn index_sizes(&self) -> [(&'static str, usize); 5] {
        [
            ("sales", self.sales.len()),
            ("purchases", self.purchases.len()),
            ("buyers", self.buyers.len()),
            ("returned", self.returned.len()),
            ("stock", self.stock.len()),
        ]
    }
}

impl Views {
    pub fn entry(&self, product: u64, location: &str) -> Option<&StockEntry> {
        self.stock.get(&product).and_then(|m| m.get(location))
    }

    /// The node that holds `tag`'s rights now (follows retirements, bounded).
    pub fn resolve(&self, tag: NodeTag) -> NodeTag {
        let mut t = tag;
        for _ in 0..16 {
            match self.retired.get(&t) {
                Some(next) if *next != t => t = *next,
                _ => break,
            }
        }
        t
    }

    /// The node called `name`: the one the operator bound it to, else the
    /// one node whose directory entry claims it (two claims name nobody: a
    /// peer's own directory entry never takes a name away from the node it
    /// belongs to).
    pub fn tag_of(&self, name: &str) -> Option<NodeTag> {
        if let Some(t) = self.bound.names.get(name) {
            return Some(*t);
        }
        let mut claims = self
            .nodes
            .iter()
            .filter(|(_, i)| i.name == name)
            .map(|(t, _)| *t);
        match (claims.next(), claims.next()) {
            (Some(t), None) => Some(t),
            _ => None,
        }
    }

    pub fn name_of(&self, tag: NodeTag) -> String {
        if let Some(n) = self.bound.name_of(tag) {
            return n.to_string();
        }
        self.nodes
            .get(&tag)
            .map(|i| i.name.clone())
            .unwrap_or_else(|| tag.hex())
    }

    /// The node that owns a location (the one whose own location it is):
    /// the node the operator bound it to, else the one claimant (a claimant
    /// bound to another location, or named otherwise by the operator while
    /// another claimant is named like the location, does not count; two
    /// claims name nobody).
    pub fn owner_of(&self, location: &str) -> Option<(NodeTag, &NodeInfo)> {
        if let Some(t) = self.bound.locations.get(location) {
            return self.nodes.get(t).map(|i| (*t, i));
        }
        let claims: Vec<(NodeTag, &NodeInfo)> = self
            .nodes
            .iter()
            .filter(|(t, i)| {
                i.location.as_deref() == Some(location) && !self.bound.has_location(**t)
            })
            .map(|(t, i)| (*t, i))
            .collect();
        let named: Vec<&(NodeTag, &NodeInfo)> = claims
            .iter()
            .filter(|(t, _)| self.bound.name_of(*t) == Some(location))
            .collect();
        let one = match (named.as_slice(), claims.as_slice()) {
            ([only], _) => Some(**only),
            ([], [only]) => Some(*only),
            _ => None,
        };
        one.or_else(|| {
            // A declared location may name the node that acts for it.
            let owner = self.declared.get(location)?.owner.as_deref()?;
            let t = self.tag_of(owner)?;
            self.nodes.get(&t).map(|i| (t, i))
        })
    }

    /// Whether the chain knows `location`: a node's own, or a declared one.
    pub fn knows_location(&self, location: &str) -> bool {
        self.declared.contains_key(location)
            || self
                .nodes
                .values()
                .any(|i| i.location.as_deref() == Some(location))
    }

    pub fn set_product(&mut self, product: u64, view: ProductView) {
        if let Some(old) = self.products.get(&product) {
            let old = old.clone();
            for s in old
                .sku
                .iter()
                .chain(old.conflicts.get("sku").into_iter().flatten())
            {
                if let Some(set) = self.by_sku.get_mut(s) {
                    set.remove(&product);
                    if set.is_empty() {
                        self.by_sku.remove(s);
                    }
                }
            }
            for b in &old.barcodes {
                if let Some(set) = self.by_barcode.get_mut(b) {
                    set.remove(&product);
                    if set.is_empty() {
                        self.by_barcode.remove(b);
                    }
                }
            }
        }
        for s in view.sku.iter() {
            self.by_sku.entry(s.clone()).or_default().insert(product);
        }
        for b in &view.barcodes {
            self.by_barcode
                .entry(b.clone())
                .or_default()
                .insert(product);
        }
        self.products.insert(product, view);
    }

    pub fn set_customer(&mut self, id: &str, view: CustomerView) {
        if let Some(old) = self.customers.get(id) {
            for (field, index) in [("email", &mut self.by_email), ("phone", &mut self.by_phone)] {
                if let Some(serde_json::Value::String(s)) = old.profile.get(field) {
                    if let Some(set) = index.get_mut(&s.to_lowercase()) {
                        set.remove(id);
                        if set.is_empty() {
                            index.remove(&s.to_lowercase());
                        }
                    }
                }
            }
        }
        for (field, index) in [("email", &mut self.by_email), ("phone", &mut self.by_phone)] {
            if let Some(serde_json::Value::String(s)) = view.profile.get(field) {
                index
                    .entry(s.to_lowercase())
                    .or_default()
                    .insert(id.to_string());
            }
        }
        if view.is_empty() {
            self.customers.remove(id);
        } else {
            self.customers.insert(id.to_string(), view);
        }
    }
}

/// sale id → the records documents that may hold `sale/<id>` (DESIGN §7:
/// history lookups without a map entry per sale in memory).
///
/// Each sale is one 64-bit entry (a 40-bit fingerprint of its id above the
/// 24-bit index of its document in a table of names): 8 bytes per sale, in
/// a sorted array that
/// recent sales reach in merges, so that no hash table's spare capacity
/// grows with the history (the 64-bit hash table this replaces cost ~27
/// bytes per sale at 2,000,000 sales). A fingerprint may stand for more
/// than one id (at 2,000,000 sales a new id matches one with probability
/// 2·10⁻⁶): every document under it is a candidate, and the engine
/// checks the document for the id's key ([`crate::engine::Engine::sale_doc`]).
/// An id found in more than one document (two nodes apart from each other
/// used it) has the document to look up first kept exactly in `preferred`.
#[derive(Default)]
pub struct SaleIndex {
    /// Random keys per process: placement never shows outside, and ids
    /// crafted to collide cannot be made offline.
    keys: std::collections::hash_map::RandomState,
    names: Vec<String>,
    name_ix: HashMap<String, u32>,
    /// `fingerprint << 24 | document`, sorted, without duplicates.
    sorted: Vec<u64>,
    /// `starts[b]`: the first position in `sorted` whose entry's top
    /// [`SALE_INDEX_BUCKET_BITS`] are ≥ `b` (one more slot at the end), so
    /// that a lookup searches ~`len / 65,536` entries instead of the whole
    /// array: at a start every stored sale is looked up once, and a binary
    /// search of millions of entries was 40 % of a restart.
    starts: Vec<u32>,
    /// Entries added since the last merge into `sorted`.
    recent: std::collections::BTreeSet<u64>,
    preferred: HashMap<String, u32>,
    /// Sales in documents whose index does not fit 24 bits (a node would
    /// have to hold 16 million records documents), kept exactly.
    overflow: HashMap<String, Vec<u32>>,
    /// During a start ([`SaleIndex::begin_bulk`]): entries collected
    /// unchecked, sorted once at its end. Looking each stored sale up before
    /// adding it was 40 % of a restart at 1.8 million sales.
    bulk: Option<Vec<u64>>,
}

/// Bits of an entry that name the document.
const SALE_INDEX_DOC_BITS: u32 = 24;
const SALE_INDEX_DOC_MASK: u64 = (1 << SALE_INDEX_DOC_BITS) - 1;

/// Pairs kept in `recent` before they are merged into the sorted array
/// (the merge moves the array's entries in place every 65,536 sales).
const SALE_INDEX_RECENT_MAX: usize = 65_536;

/// Top bits of an entry that pick its bucket in `starts` (256 KiB of
/// offsets, whatever the history).
const SALE_INDEX_BUCKET_BITS: u32 = 16;

impl SaleIndex {
    /// The id's fingerprint, shifted into place (the low 24 bits zero).
    fn fingerprint(&self, id: &str) -> u64 {
        use std::hash::BuildHasher;
        self.keys.hash_one(id) << SALE_INDEX_DOC_BITS
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
        let last = fp | SALE_INDEX_DOC_MASK;
        let from_sorted = self
            .bucket(fp)
            .iter()
            .skip_while(move |e| **e < fp)
            .take_while(move |e| **e <= last);
        let from_recent = self.recent.range(fp..=last);
        let docs = from_sorted
            .chain(from_recent)
            .map(|e| (e & SALE_INDEX_DOC_MASK) as u32)
            .chain(self.overflow.get(id).into_iter().flatten().copied());
        first
            .into_iter()
            .chain(docs.filter(move |d| Some(*d) != first))
            .filter_map(|i| self.names.get(i as usize).map(String::as_str))
    }

    /// Notes that `doc` holds a sale of `id`.
    pub fn add(&mut self, id: &str, doc: &str) {
        let d = self.intern(doc);
        if u64::from(d) > SALE_INDEX_DOC_MASK {
            let docs = self.overflow.entry(id.to_string()).or_default();
            if !docs.contains(&d) {
                docs.push(d);
            }
            return;
        }
        let entry = self.fingerprint(id) | u64::from(d);
        if let Some(bulk) = self.bulk.as_mut() {
            bulk.push(entry);
            return;
        }
        if self.bucket(entry).binary_search(&entry).is_ok() || !self.recent.insert(entry) {
            return;
        }
        if self.recent.len() >= SALE_INDEX_RECENT_MAX {
            self.merge();
        }
    }

    /// Starts a bulk load (a start notes every stored sale once): from now
    /// on [`SaleIndex::add`] collects entries unchecked and
    /// [`SaleIndex::candidates`] does not see them until
    /// [`SaleIndex::end_bulk`].
    pub fn begin_bulk(&mut self) {
        if self.bulk.is_none() {
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
        let Some(mut all) = self.bulk.take() else {
            return Vec::new();
        };
        all.append(&mut self.sorted);
        all.extend(std::mem::take(&mut self.recent));
        all.sort_unstable();
        all.dedup();
        // Exact: the collecting vector grew by doubling.
        all.shrink_to_fit();
        let mut shared = Vec::new();
        let mut i = 0;
        while i < all.len() {
            let fp = all[i] & !SALE_INDEX_DOC_MASK;
            let n = all[i..]
                .iter()
                .take_while(|e| *e & !SALE_INDEX_DOC_MASK == fp)
                .count();
            if n > 1 {
                let mut docs: Vec<String> = all[i..i + n]
                    .iter()
                    .filter_map(|e| self.names.get((e & SALE_INDEX_DOC_MASK) as usize))
                    .cloned()
                    .collect();
                docs.sort();
                shared.push((fp, docs));
            }
            i += n;
        }
        self.sorted = all;
        self.rebuild_starts();
        shared
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

    /// The entries of `sorted` in the bucket of `entry` (sorted).
    fn bucket(&self, entry: u64) -> &[u64] {
        let b = (entry >> (64 - SALE_INDEX_BUCKET_BITS)) as usize;
        match (self.starts.get(b), self.starts.get(b + 1)) {
            (Some(&lo), Some(&hi)) => self.sorted.get(lo as usize..hi as usize).unwrap_or(&[]),
            // Before the first merge, `starts` is empty: so is `sorted`.
            _ => &self.sorted,
        }
    }

    /// Merges `recent` into `sorted` in place, from the back (no second
    /// array: at millions of sales a copy was tens of MiB to allocate and
    /// zero at every merge), and rebuilds `starts`.
    fn merge(&mut self) {
        let recent: Vec<u64> = std::mem::take(&mut self.recent).into_iter().collect();
        let n = self.sorted.len();
        // Exact: a doubling growth would hold up to 8 spare bytes per sale.
        self.sorted.reserve_exact(recent.len());
        self.sorted.resize(n + recent.len(), 0);
        let (mut i, mut j, mut k) = (n, recent.len(), self.sorted.len());
        while j > 0 {
            k -= 1;
            if i > 0 && self.sorted[i - 1] > recent[j - 1] {
                self.sorted[k] = self.sorted[i - 1];
                i -= 1;
            } else {
                self.sorted[k] = recent[j - 1];
                j -= 1;
            }
        }
        debug_assert!(
            self.sorted.windows(2).all(|w| w[0] < w[1]),
            "sale index sorted"
        );
        self.rebuild_starts();
    }

    /// Rebuilds `starts` from `sorted`.
    fn rebuild_starts(&mut self) {
        let buckets = 1usize << SALE_INDEX_BUCKET_BITS;
        self.starts.clear();
        self.starts.reserve_exact(buckets + 1);
        let mut at = 0usize;
        for b in 0..buckets {
            while self
                .sorted
                .get(at)
                .is_some_and(|e| ((e >> (64 - SALE_INDEX_BUCKET_BITS)) as usize) < b)
            {
                at += 1;
            }
            self.starts.push(at as u32);
        }
        self.starts.push(self.sorted.len() as u32);
    }

    /// Heap bytes the index holds for its entries (its names and exact
    /// maps aside): what grows with the number of sales.
    pub fn entry_bytes(&self) -> usize {
        // A B-tree set holds up to 11 entries per node of ~100 bytes.
        self.sorted.capacity() * 8
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
        assert!(ix.sorted.windows(2).all(|w| w[0] < w[1]));
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

    /// A bulk load finds every id it collected, adds nothing twice, and
    /// names the fingerprints held under more than one document.
    #[test]
    fn a_bulk_load_finds_every_sale_and_names_shared_fingerprints() {
        let mut ix = SaleIndex::default();
        ix.add("before", "rec/a/202601");
        ix.begin_bulk();
        let n = SALE_INDEX_RECENT_MAX as u64 + 5;
        for i in 0..n {
            ix.add(&format!("s-{i}"), &format!("rec/a/2026{:02}", i % 12 + 1));
        }
        // Held twice (two nodes used it), and noted twice in one document.
        ix.add("s-3", "rec/b/202604");
        ix.add("s-7", "rec/a/202608");
        assert!(
            ix.candidates("s-9").next().is_none(),
            "unseen until the end"
        );
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
