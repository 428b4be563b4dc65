//! Materialized views: what reads are served from. Every view is a function of
//! the documents; `Engine::recompute_*` rebuilds the affected entries from the
//! documents after every applied change, so views never drift (DESIGN §5.5).

pub use crate::saleindex::SaleIndex;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::{Automerge, ReadDoc, ScalarValue, Value, ROOT};
use serde::{Deserialize, Serialize};

use crate::ids::{ActorKey, NodeInfo, NodeTag};
use crate::layout::{
    customer_range, ledger_carried_range, ledger_product_range, parse_ledger_any, CustomerKey,
    LedgerField, RecordKind,
};
use crate::ledger::StockEntry;

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
            add_cell(&mut e, doc, &key, actor, field, &value, conflict, heads);
        }
    }
    e
}

/// Every product's cells in a ledger document, read in one ordered pass over
/// its keys (live and carried), as [`read_entry`] reads each product's:
/// what a whole document's views are rebuilt from (a restart, a document
/// received whole) without a range lookup and a key list per product.
/// Products without a cell are absent.
pub fn read_entries<D: ReadDoc>(doc: &D) -> HashMap<u64, StockEntry> {
    let mut out: HashMap<u64, StockEntry> = HashMap::new();
    // Keys come sorted: a product's keys are contiguous, so the entry being
    // filled is looked up only when the product changes.
    let mut cur: Option<(u64, StockEntry)> = None;
    for i in doc.map_range(ROOT, ..) {
        let Ok((p, actor, field, _)) = parse_ledger_any(&i.key) else {
            continue;
        };
        let value = Value::from(i.value);
        if cur.as_ref().is_none_or(|(q, _)| *q != p) {
            if let Some((q, e)) = cur.take() {
                out.insert(q, e);
            }
            // Carried keys (`b/…`) come after every live key: a product's
            // entry may already be there.
            cur = Some((p, out.remove(&p).unwrap_or_default()));
        }
        if let Some((_, e)) = cur.as_mut() {
            add_cell(e, doc, &i.key, actor, field, &value, i.conflict, None);
        }
    }
    if let Some((q, e)) = cur {
        out.insert(q, e);
    }
    out
}

/// A counter cell's value: a non-negative integer, else `None`.
pub fn scalar_u64(s: &ScalarValue) -> Option<u64> {
    match s {
        ScalarValue::Uint(n) => Some(*n),
        ScalarValue::Int(n) if *n >= 0 => Some(*n as u64),
        _ => None,
    }
}

/// Adds one ledger cell's value to `e` (the largest of concurrent values).
#[allow(clippy::too_many_arguments)]
fn add_cell<D: ReadDoc>(
    e: &mut StockEntry,
    doc: &D,
    key: &str,
    actor: ActorKey,
    field: LedgerField,
    value: &Value<'_>,
    conflict: bool,
    heads: Option<&[automerge::ChangeHash]>,
) {
    let mut n = value.as_scalar().and_then(scalar_u64).unwrap_or(0);
    if conflict {
        // Cells are cumulative: of concurrent values (carried by two
        // nodes, or two branches of a restored node) the largest holds,
        // whichever Automerge shows first.
        let all = match heads {
            None => doc.get_all(ROOT, key),
            Some(h) => doc.get_all_at(ROOT, key, h),
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
    /// Per kind (`recordids::INDEXED`: receipts, returns, client grants,
    /// adjustments), id → the records documents holding a record of it: an
    /// id in more than one is listed as a collision (`Engine::id_collisions`).
    pub(crate) record_ids: BTreeMap<RecordKind, crate::recordids::RecordIds>,
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
    /// (id, creator) of expired reservations with a line whose hold had not
    /// arrived when they expired and has not been released since
    /// (`Engine::release_late_holds`): only a fork of the creator makes
    /// them, so the set stays small.
    pub(crate) late_holds: BTreeSet<(String, String)>,
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
    /// Products whose hold the expiry did not release, not having seen it
    /// (lost with a fork of the creator, or only late), from the close record.
    #[serde(default)]
    pub unreleased: BTreeSet<u64>,
    /// Of those, the ones released since, their hold having arrived.
    #[serde(default)]
    pub released_late: BTreeSet<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferView {
    pub from: String,
    pub to: String,
    /// Units sent per product (empty until the sender's record has arrived),
    /// summed over the records documents holding a transfer of this id by
    /// this sender (a restored node may send an id of its own again in
    /// another month's document without knowing it: both are in transit).
    pub sent: BTreeMap<u64, u64>,
    pub received: bool,
    /// The records document of the sender's first record of the id.
    #[serde(default)]
    pub doc: String,
    /// Units sent per records document, kept only once a second document
    /// holds a transfer of this id by this sender (within one document the
    /// last record stands).
    #[serde(default)]
    pub sent_by_doc: BTreeMap<String, BTreeMap<u64, u64>>,
}

impl TransferView {
    /// Notes the lines of the sender's record of the transfer in `doc`.
    pub fn note_sent(&mut self, doc: &str, lines: BTreeMap<u64, u64>) {
        if self.sent_by_doc.is_empty() && (self.doc.is_empty() || self.doc == doc) {
            self.doc = doc.to_string();
            self.sent = lines;
            return;
        }
        if self.sent_by_doc.is_empty() {
            let first = std::mem::take(&mut self.sent);
            self.sent_by_doc.insert(self.doc.clone(), first);
        }
        self.sent_by_doc.insert(doc.to_string(), lines);
        let mut sum: BTreeMap<u64, u64> = BTreeMap::new();
        for (p, q) in self.sent_by_doc.values().flatten() {
            let e = sum.entry(*p).or_default();
            *e = e.saturating_add(*q);
        }
        self.sent = sum;
    }
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
    /// Id → the records documents holding it, for a kind of
    /// `recordids::INDEXED`.
    pub fn record_ids(&self, kind: RecordKind) -> Option<&crate::recordids::RecordIds> {
        self.record_ids.get(&kind)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{INCARNATION_BYTES, NODE_TAG_BYTES};
    use crate::layout::{ledger_carried_key, ledger_key};
    use automerge::transaction::Transactable;

    fn actor(b: u8) -> ActorKey {
        ActorKey::new(NodeTag([b; NODE_TAG_BYTES]), [b; INCARNATION_BYTES])
    }

    /// The one-pass read of a whole ledger document gives every product the
    /// entry the per-product read gives it: live and carried keys, products
    /// whose decimal forms share prefixes (1, 10, 100, 2, 11), every field,
    /// concurrent values of one cell, and keys that are not ledger cells.
    #[test]
    fn one_pass_over_a_ledger_document_reads_what_each_product_reads() {
        let (a, b) = (actor(1), actor(2));
        let to = NodeTag([9; NODE_TAG_BYTES]);
        let fields = [
            LedgerField::Received,
            LedgerField::Removed,
            LedgerField::Granted(to),
            LedgerField::Held(to),
            LedgerField::Released,
        ];
        let products = [1u64, 10, 100, 2, 11, 1000, 7];
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        for (i, p) in products.iter().enumerate() {
            for (j, f) in fields.iter().enumerate() {
                if (i + j) % 2 == 0 {
                    tx.put(ROOT, ledger_key(*p, a, *f), (10 * i + j) as u64)
                        .unwrap();
                }
                if (i + j) % 3 == 0 {
                    tx.put(ROOT, ledger_carried_key(*p, b, *f), (7 * i + j) as u64)
                        .unwrap();
                }
            }
        }
        // Only carried cells for product 5; keys that are no ledger cells.
        tx.put(ROOT, ledger_carried_key(5, a, LedgerField::Received), 3u64)
            .unwrap();
        tx.put(ROOT, "x", "not a cell").unwrap();
        tx.put(ROOT, format!("01/{}/r", a.hex()), 99u64).unwrap();
        tx.commit();
        // Concurrent values of one cell (two branches): the largest holds.
        let mut other = doc.fork();
        let key = ledger_key(10, b, LedgerField::Received);
        let mut tx = doc.transaction();
        tx.put(ROOT, key.as_str(), 40u64).unwrap();
        tx.commit();
        let mut tx = other.transaction();
        tx.put(ROOT, key.as_str(), 45u64).unwrap();
        tx.commit();
        doc.merge(&mut other).unwrap();
        let all = read_entries(&doc);
        let mut expected: Vec<u64> = products.to_vec();
        expected.push(5);
        expected.sort_unstable();
        let mut got: Vec<u64> = all.keys().copied().collect();
        got.sort_unstable();
        assert_eq!(got, expected);
        for p in expected.iter().chain([3u64, 4].iter()) {
            assert_eq!(
                all.get(p).cloned().unwrap_or_default(),
                read_entry(&doc, *p, None),
                "product {p}"
            );
        }
        assert_eq!(
            all[&10].cells.get(&b).map(|c| c.received),
            Some(45),
            "the larger of two concurrent values"
        );
    }
}
