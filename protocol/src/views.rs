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

/// All materialized views of one node.
#[derive(Default)]
pub struct Views {
    /// product → location → cells.
    pub stock: HashMap<u64, BTreeMap<String, StockEntry>>,
    /// Node directory from the mesh document.
    pub nodes: BTreeMap<NodeTag, NodeInfo>,
    pub customers: HashMap<String, CustomerView>,
    pub by_email: HashMap<String, BTreeSet<String>>,
    pub by_phone: HashMap<String, BTreeSet<String>>,
    /// customer pseudonym (records written before pseudonyms: the id) →
    /// (records document, record key) of its purchases.
    pub purchases: HashMap<String, BTreeSet<(String, String)>>,
    /// Customer pseudonym (keyed hash of the id under one of its keys, as
    /// sale records hold it) → customer id, for every key in the key store.
    pub pseudonyms: HashMap<String, String>,
    /// sale id → (records document, key): for lookups by the return desk.
    /// When two nodes used one id, this node's own sale, else the first by
    /// document name; the others are in `sale_collisions`.
    pub sales: SaleIndex,
    /// Keys of this node's own grant records (`grt/<id>`): answering a rights
    /// request twice is refused by them after a restart.
    pub own_grants: std::collections::HashSet<String>,
    /// sale id → every (records document, key) holding a sale of that id,
    /// for ids that more than one node used.
    pub sale_collisions: HashMap<String, BTreeSet<(String, String)>>,
    /// (kind/id, node) → alarm.
    pub alarms: BTreeMap<(String, String), Alarm>,
    /// Names of configured peers, known before their directory entry arrives.
    pub configured: BTreeMap<String, NodeTag>,
    /// Names and locations bound to node ids by this node's operator (its
    /// own name and location, its configured peers): a peer's directory
    /// entry never overrides them (`crate::authority`).
    pub bound: crate::authority::Bindings,
    /// The product catalogue.
    pub products: HashMap<u64, ProductView>,
    pub by_sku: HashMap<String, BTreeSet<u64>>,
    pub by_barcode: HashMap<String, BTreeSet<u64>>,
    /// transfer id → sending node's name → what was sent and whether it was
    /// received. Ids are chain-wide, but two nodes apart from each other may
    /// use one id for two transfers: both stay in effect exactly.
    pub transfers: HashMap<String, BTreeMap<String, TransferView>>,
    /// destination location → transfer ids (for `incoming`).
    pub transfers_to: HashMap<String, BTreeSet<String>>,
    /// original sale id → product → units returned against it.
    pub returned: HashMap<String, BTreeMap<u64, u64>>,
    /// location → (records document, key) of its adjustments.
    pub adjustments: HashMap<String, BTreeSet<(String, String)>>,
    /// Retired node → its successor (from the mesh document).
    pub retired: BTreeMap<NodeTag, NodeTag>,
    /// reservation id → creating node's name → reservation (two nodes apart
    /// may have used one id: both hold their units).
    pub reservations: HashMap<String, BTreeMap<String, ReservationView>>,
    /// Open reservations ordered by expiry: (expires_at_ms, id). Expiry
    /// reads the due ones from the front instead of scanning every
    /// reservation ever made.
    pub expiring: BTreeSet<(u64, String, String)>,
    /// (product, location, fulfilling node) → units held by open reservations.
    pub reserved: HashMap<(u64, String, NodeTag), i64>,
    /// product → purchases naming a customer: (at_ms, customer, location, sale id).
    pub buyers: HashMap<u64, BTreeSet<(u64, String, String, String)>>,
    /// count id → node that took it → count session (and finished counts),
    /// from the records; two nodes may have used one id while apart.
    pub count_sessions: HashMap<String, BTreeMap<String, crate::counts::CountSession>>,
    /// import id → importing node → what it booked where (`imports.rs`).
    pub imports: HashMap<String, BTreeMap<String, crate::imports::ImportSeen>>,
    /// Import ids noted since the last `Engine::settle_ownerless_imports`.
    pub imports_pending: BTreeSet<String>,
    /// Locations declared with `POST /api/locations` (the `mesh` document).
    pub declared: BTreeMap<String, crate::layout::DeclaredLocation>,
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

/// sale id → the records document holding `sale/<id>` (DESIGN §7: history
/// lookups without a map entry per sale in memory). Ids are kept as a 64-bit
/// hash and documents as an index into a table of names: 12 bytes per sale
/// instead of three strings. A hash may stand for more than one id; the
/// engine checks the document for the id's key ([`crate::engine::Engine::sale_doc`])
/// and an id whose hash a different id already holds is kept exactly in
/// `spill`.
#[derive(Default)]
pub struct SaleIndex {
    /// Random keys per process: placement never shows outside, and ids
    /// crafted to collide cannot be made offline.
    keys: std::collections::hash_map::RandomState,
    names: Vec<String>,
    name_ix: HashMap<String, u32>,
    by_hash: HashMap<(u32, u32), u32>,
    spill: HashMap<String, u32>,
}

impl SaleIndex {
    fn hash(&self, id: &str) -> (u32, u32) {
        use std::hash::BuildHasher;
        let v = self.keys.hash_one(id);
        ((v >> 32) as u32, v as u32)
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

    /// Documents that may hold sale `id`: the exact entry first.
    pub fn candidates(&self, id: &str) -> impl Iterator<Item = &str> {
        let exact = self.spill.get(id);
        let hashed = self.by_hash.get(&self.hash(id));
        exact
            .into_iter()
            .chain(hashed.filter(|h| Some(*h) != exact))
            .filter_map(|i| self.names.get(*i as usize).map(String::as_str))
    }

    /// The document held for `id`'s hash, if any (it may be another id's).
    pub fn hashed(&self, id: &str) -> Option<&str> {
        let i = self.by_hash.get(&self.hash(id))?;
        self.names.get(*i as usize).map(String::as_str)
    }

    /// Points `id` at `doc`. `slot_is_id` says whether the document held
    /// for `id`'s hash is a sale of this very id (else a different id holds
    /// the hash, and `id` is kept exactly).
    pub fn set(&mut self, id: &str, doc: &str, slot_is_id: bool) {
        let d = self.intern(doc);
        if let Some(e) = self.spill.get_mut(id) {
            *e = d;
            return;
        }
        let h = self.hash(id);
        match self.by_hash.entry(h) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(d);
            }
            std::collections::hash_map::Entry::Occupied(mut o) if slot_is_id => {
                o.insert(d);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.spill.insert(id.to_string(), d);
            }
        }
    }

    /// Ids held (hash slots plus exact entries).
    pub fn len(&self) -> usize {
        self.by_hash.len() + self.spill.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
