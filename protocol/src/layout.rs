//! The document layout (DESIGN §3): which document holds what, and the flat keys
//! inside each document's root map.
//!
//! | document | id | keys (root map) | writer |
//! |---|---|---|---|
//! | mesh directory | `mesh` | `<tag>/info` = JSON [`NodeInfo`] | the node `<tag>` |
//! | ledger | `ledger/<location>/<bucket>` | `<product>/<actor>/r`, `/d`, `/g/<to-tag>`, `/h/<to-tag>` (held for reservations), `/u` (released) = uint | the actor |
//! | records | `rec/<tag>/<yyyymm>` | `<kind>/<client id>` = JSON record | the node `<tag>` |
//! | customers | `cust/<bucket>` | `<customer>/p/<field>` (any node), `<customer>/<actor>/e` and `/s` (loyalty earned/spent, the actor), `<customer>/x` (erased, any node) | see left |
//!
//! Only flat keys are used, so two nodes may start the same document
//! independently and still merge, and no key is ever created by two writers
//! except the free-for-all customer profile fields (whose conflicts are exposed).

use crate::ids::{
    validate_client_id, validate_name, validate_product_id, ActorKey, NodeInfo, NodeTag,
};
use crate::time::civil_from_days;

/// Identifies a document. The string form is used on the wire and on disk.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DocId {
    Mesh,
    /// A ledger document of one epoch (DESIGN §7): epoch 0 is encoded
    /// without a suffix; a later epoch starts with no history and carries
    /// the cells of the one before under `b/…` keys.
    Ledger {
        location: String,
        bucket: u32,
        epoch: u32,
    },
    /// A node's records of one month, in parts of at most
    /// [`RECORDS_PER_PART_MAX`] records (part 0 is encoded without a suffix).
    Records {
        tag: NodeTag,
        month: u32,
        part: u32,
    },
    Customers {
        bucket: u32,
    },
    Products {
        bucket: u32,
    },
}

impl DocId {
    pub fn encode(&self) -> String {
        match self {
            DocId::Mesh => "mesh".into(),
            DocId::Ledger {
                location,
                bucket,
                epoch: 0,
            } => format!("ledger/{location}/{bucket}"),
            DocId::Ledger {
                location,
                bucket,
                epoch,
            } => format!("ledger/{location}/{bucket}/{epoch}"),
            DocId::Records {
                tag,
                month,
                part: 0,
            } => format!("rec/{tag}/{month}"),
            DocId::Records { tag, month, part } => format!("rec/{tag}/{month}/{part}"),
            DocId::Customers { bucket } => format!("cust/{bucket}"),
            DocId::Products { bucket } => format!("prod/{bucket}"),
        }
    }

    /// Parses and validates a document id received from a peer.
    pub fn parse(text: &str, buckets: u32) -> Result<DocId, String> {
        let parts: Vec<&str> = text.split('/').collect();
        let bucket = |s: &str| -> Result<u32, String> {
            let b: u32 = s.parse().map_err(|_| format!("bad bucket in {text:?}"))?;
            if b >= buckets {
                return Err(format!("bucket {b} out of range in {text:?}"));
            }
            Ok(b)
        };
        match parts.as_slice() {
            ["mesh"] => Ok(DocId::Mesh),
            ["ledger", loc, b] => {
                validate_name("location", loc)?;
                Ok(DocId::Ledger {
                    location: (*loc).to_string(),
                    bucket: bucket(b)?,
                    epoch: 0,
                })
            }
            ["ledger", loc, b, e] => {
                validate_name("location", loc)?;
                // Epoch 0 has one spelling only (no suffix).
                let epoch = match e.parse::<u32>() {
                    Ok(n) if (1..=LEDGER_EPOCH_MAX).contains(&n) && *e == n.to_string() => n,
                    _ => return Err(format!("bad ledger epoch in {text:?}")),
                };
                Ok(DocId::Ledger {
                    location: (*loc).to_string(),
                    bucket: bucket(b)?,
                    epoch,
                })
            }
            ["rec", tag, month] => records_id(text, tag, month, None),
            ["rec", tag, month, part] => records_id(text, tag, month, Some(part)),
            ["cust", b] => Ok(DocId::Customers { bucket: bucket(b)? }),
            ["prod", b] => Ok(DocId::Products { bucket: bucket(b)? }),
            _ => Err(format!("unknown document id {text:?}")),
        }
    }
}

/// Records per records document: a node starts the next part of the month
/// once its current part holds this many. Automerge's cost of applying
/// changes to a loaded document grows with the document (measured: 60,000
/// sale records in one document took 11.7 s and 2.3 GiB to reload from a
/// snapshot plus 45 chunks), and a `save()` stalls the engine thread in
/// proportion to it; small parts keep both bounded, and a part that is full
/// never changes again.
pub const RECORDS_PER_PART_MAX: usize = 2048;
/// Highest ledger epoch accepted from a peer: a cut every few thousand
/// changes of one document reaches this after billions of sales.
pub const LEDGER_EPOCH_MAX: u32 = 1_000_000;
/// Highest records part number accepted from a peer (a month of 2 billion
/// records), so a part number is never a way to make a node allocate.
pub const RECORDS_PART_MAX: u32 = 1_000_000;

fn records_id(text: &str, tag: &str, month: &str, part: Option<&str>) -> Result<DocId, String> {
    let tag = NodeTag::parse(tag).ok_or_else(|| format!("bad tag in {text:?}"))?;
    let month: u32 = month
        .parse()
        .map_err(|_| format!("bad month in {text:?}"))?;
    if !(190001..=999912).contains(&month) || month.is_multiple_of(100) || month % 100 > 12 {
        return Err(format!("bad month in {text:?}"));
    }
    let part = match part {
        None => 0,
        // Part 0 has one spelling only (no suffix), so a document has one id.
        Some(p) => match p.parse::<u32>() {
            Ok(n) if (1..=RECORDS_PART_MAX).contains(&n) && p == n.to_string() => n,
            _ => return Err(format!("bad records part in {text:?}")),
        },
    };
    Ok(DocId::Records { tag, month, part })
}

/// Which cumulative cell of a ledger entry a key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedgerField {
    Received,
    Removed,
    Granted(NodeTag),
    /// Units this actor reserved for node `to` (written in the change that
    /// grants them, so a reservation's hold is never apart from its units).
    Held(NodeTag),
    /// Units of reservations this actor closed (fulfilled, cancelled,
    /// expired): released from the holds on its node.
    Released,
}

pub fn ledger_key(product: u64, actor: ActorKey, field: LedgerField) -> String {
    match field {
        LedgerField::Received => format!("{product}/{}/r", actor.hex()),
        LedgerField::Removed => format!("{product}/{}/d", actor.hex()),
        LedgerField::Granted(to) => format!("{product}/{}/g/{to}", actor.hex()),
        LedgerField::Held(to) => format!("{product}/{}/h/{to}", actor.hex()),
        LedgerField::Released => format!("{product}/{}/u", actor.hex()),
    }
}

/// The key range holding every cell of one product in a ledger document.
pub fn ledger_product_range(product: u64) -> std::ops::Range<String> {
    // '0' follows '/' in ASCII, so this covers exactly the keys "<product>/…".
    format!("{product}/")..format!("{product}0")
}

/// Prefix of the keys under which a ledger epoch carries cells of the epoch
/// before it (`b/<product>/<actor>/…`). Any node may write them, only in an
/// epoch after 0; a reader takes, per cell, the maximum of the carried and
/// the live values (every cell is cumulative, so a carried value is a lower
/// bound of the writer's own).
pub const LEDGER_CARRIED_PREFIX: &str = "b/";

pub fn ledger_carried_key(product: u64, actor: ActorKey, field: LedgerField) -> String {
    format!(
        "{LEDGER_CARRIED_PREFIX}{}",
        ledger_key(product, actor, field)
    )
}

/// The key range holding every carried cell of one product.
pub fn ledger_carried_range(product: u64) -> std::ops::Range<String> {
    format!("{LEDGER_CARRIED_PREFIX}{product}/")..format!("{LEDGER_CARRIED_PREFIX}{product}0")
}

/// Parses a live or carried ledger key; the flag says whether it is carried.
pub fn parse_ledger_any(key: &str) -> Result<(u64, ActorKey, LedgerField, bool), String> {
    match key.strip_prefix(LEDGER_CARRIED_PREFIX) {
        Some(rest) => parse_ledger_key(rest).map(|(p, a, f)| (p, a, f, true)),
        None => parse_ledger_key(key).map(|(p, a, f)| (p, a, f, false)),
    }
}

pub fn parse_ledger_key(key: &str) -> Result<(u64, ActorKey, LedgerField), String> {
    let mut it = key.split('/');
    let product: u64 = it
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("bad product in ledger key {key:?}"))?;
    validate_product_id("product", product)?;
    if product.to_string().len() != key.find('/').unwrap_or(0) {
        return Err(format!("non-canonical product in ledger key {key:?}"));
    }
    let actor = it
        .next()
        .and_then(ActorKey::parse)
        .ok_or_else(|| format!("bad actor in ledger key {key:?}"))?;
    let field = match (it.next(), it.next(), it.next()) {
        (Some("r"), None, None) => LedgerField::Received,
        (Some("d"), None, None) => LedgerField::Removed,
        (Some("g"), Some(to), None) => LedgerField::Granted(
            NodeTag::parse(to).ok_or_else(|| format!("bad grantee in ledger key {key:?}"))?,
        ),
        (Some("h"), Some(to), None) => LedgerField::Held(
            NodeTag::parse(to).ok_or_else(|| format!("bad holder in ledger key {key:?}"))?,
        ),
        (Some("u"), None, None) => LedgerField::Released,
        _ => return Err(format!("bad field in ledger key {key:?}")),
    };
    Ok((product, actor, field))
}

pub fn mesh_info_key(tag: NodeTag) -> String {
    format!("{tag}/info")
}

/// `retired/<tag>` → JSON {"successor": tag, …}: written by any node (the
/// operator runs `storemesh node retire` wherever they are); once retired a
/// node stays retired.
pub fn retired_key(tag: NodeTag) -> String {
    format!("retired/{tag}")
}

pub fn parse_retired_key(key: &str) -> Option<NodeTag> {
    key.strip_prefix("retired/").and_then(NodeTag::parse)
}

/// The successor named in a retirement value.
pub fn parse_retirement(json: &str) -> Result<NodeTag, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("bad retirement: {e}"))?;
    v["successor"]
        .as_str()
        .and_then(NodeTag::parse)
        .ok_or_else(|| "retirement without a successor".into())
}

/// `loc/<location>` → JSON {"location", "timezone"?, "owner"?, …}: a location
/// the chain knows without a node of its own (a warehouse), declared by an
/// operator at any node (`POST /api/locations`).
pub fn location_key(location: &str) -> String {
    format!("loc/{location}")
}

pub fn parse_location_key(key: &str) -> Option<&str> {
    key.strip_prefix("loc/")
        .filter(|l| validate_name("location", l).is_ok())
}

/// A declared location's value: its JSON, checked.
pub fn parse_declared_location(json: &str) -> Result<DeclaredLocation, String> {
    let d: DeclaredLocation =
        serde_json::from_str(json).map_err(|e| format!("bad declared location: {e}"))?;
    validate_name("location", &d.location)?;
    if let Some(o) = &d.owner {
        validate_name("owner", o)?;
    }
    if let Some(t) = &d.timezone {
        crate::time::validate_timezone(t)?;
    }
    Ok(d)
}

/// A location declared with `POST /api/locations`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeclaredLocation {
    pub location: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// The node that acts for the location (receives its transfers, counts it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default)]
    pub at_ms: u64,
}

/// A record id made of `base` and a suffix that stays a valid record id
/// (at most 128 characters): a long base is replaced by a hash of it. The
/// record's body names the base in full.
pub fn part_id(base: &str, suffix: &str) -> String {
    let id = format!("{base}{suffix}");
    if id.len() <= crate::ids::CLIENT_ID_LEN_MAX {
        return id;
    }
    use sha2::Digest;
    let h = hex::encode(sha2::Sha256::digest(base.as_bytes()));
    format!("#{}{suffix}", &h[..40])
}

pub fn parse_mesh_key(key: &str) -> Result<NodeTag, String> {
    match key.split_once('/') {
        Some((tag, "info")) => NodeTag::parse(tag).ok_or_else(|| format!("bad mesh key {key:?}")),
        _ => Err(format!("bad mesh key {key:?}")),
    }
}

pub fn parse_node_info(json: &str) -> Result<NodeInfo, String> {
    let info: NodeInfo = serde_json::from_str(json).map_err(|e| format!("bad node info: {e}"))?;
    validate_name("node name", &info.name)?;
    if let Some(l) = &info.location {
        validate_name("location", l)?;
    }
    Ok(info)
}

/// Kinds of records a node keeps in its own records documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordKind {
    Sale,
    Return,
    Receipt,
    Count,
    Grant,
    Overdraft,
    Deficit,
    Fork,
    Adjustment,
    Transfer,
    TransferReceipt,
    Redeem,
    Import,
    Reservation,
    ReservationClose,
    /// One page of a count session's lines.
    CountLines,
    /// A part of the products a full count set to 0.
    CountZero,
}

impl RecordKind {
    pub fn prefix(self) -> &'static str {
        match self {
            RecordKind::Sale => "sale",
            RecordKind::Return => "ret",
            RecordKind::Receipt => "rcv",
            RecordKind::Count => "cnt",
            RecordKind::Grant => "grt",
            RecordKind::Overdraft => "ovd",
            RecordKind::Deficit => "def",
            RecordKind::Fork => "fork",
            RecordKind::Adjustment => "adj",
            RecordKind::Transfer => "trf",
            RecordKind::TransferReceipt => "trr",
            RecordKind::Redeem => "rdm",
            RecordKind::Import => "imp",
            RecordKind::Reservation => "rsv",
            RecordKind::ReservationClose => "rsc",
            RecordKind::CountLines => "cntl",
            RecordKind::CountZero => "cntz",
        }
    }
    pub fn parse(prefix: &str) -> Option<RecordKind> {
        Some(match prefix {
            "sale" => RecordKind::Sale,
            "ret" => RecordKind::Return,
            "rcv" => RecordKind::Receipt,
            "cnt" => RecordKind::Count,
            "grt" => RecordKind::Grant,
            "ovd" => RecordKind::Overdraft,
            "def" => RecordKind::Deficit,
            "fork" => RecordKind::Fork,
            "adj" => RecordKind::Adjustment,
            "trf" => RecordKind::Transfer,
            "trr" => RecordKind::TransferReceipt,
            "rdm" => RecordKind::Redeem,
            "imp" => RecordKind::Import,
            "rsv" => RecordKind::Reservation,
            "rsc" => RecordKind::ReservationClose,
            "cntl" => RecordKind::CountLines,
            "cntz" => RecordKind::CountZero,
            _ => return None,
        })
    }
}

pub fn record_key(kind: RecordKind, id: &str) -> String {
    format!("{}/{id}", kind.prefix())
}

pub fn parse_record_key(key: &str) -> Result<(RecordKind, &str), String> {
    let (k, id) = key
        .split_once('/')
        .ok_or_else(|| format!("bad record key {key:?}"))?;
    let kind = RecordKind::parse(k).ok_or_else(|| format!("bad record kind in {key:?}"))?;
    validate_client_id("record id", id)?;
    Ok((kind, id))
}

/// Profile fields a customer document may hold.
pub const PROFILE_FIELDS: [&str; 5] = ["name", "email", "phone", "marketing_consent", "tags"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CustomerKey {
    Profile { customer: String, field: String },
    Earned { customer: String, actor: ActorKey },
    Spent { customer: String, actor: ActorKey },
    Erased { customer: String },
}

impl CustomerKey {
    pub fn encode(&self) -> String {
        match self {
            CustomerKey::Profile { customer, field } => format!("{customer}/p/{field}"),
            CustomerKey::Earned { customer, actor } => format!("{customer}/{}/e", actor.hex()),
            CustomerKey::Spent { customer, actor } => format!("{customer}/{}/s", actor.hex()),
            CustomerKey::Erased { customer } => format!("{customer}/x"),
        }
    }
    pub fn customer(&self) -> &str {
        match self {
            CustomerKey::Profile { customer, .. }
            | CustomerKey::Earned { customer, .. }
            | CustomerKey::Spent { customer, .. }
            | CustomerKey::Erased { customer } => customer,
        }
    }
    pub fn parse(key: &str) -> Result<CustomerKey, String> {
        let parts: Vec<&str> = key.split('/').collect();
        let customer = parts.first().copied().unwrap_or("");
        validate_client_id("customer_id", customer)?;
        let customer = customer.to_string();
        match parts.as_slice() {
            [_, "p", field] if PROFILE_FIELDS.contains(field) => Ok(CustomerKey::Profile {
                customer,
                field: (*field).to_string(),
            }),
            [_, actor, "e"] => Ok(CustomerKey::Earned {
                customer,
                actor: ActorKey::parse(actor).ok_or("bad actor in customer key")?,
            }),
            [_, actor, "s"] => Ok(CustomerKey::Spent {
                customer,
                actor: ActorKey::parse(actor).ok_or("bad actor in customer key")?,
            }),
            [_, "x"] => Ok(CustomerKey::Erased { customer }),
            _ => Err(format!("bad customer key {key:?}")),
        }
    }
}

/// Catalogue fields a product document may hold (`<product>/<field>`).
pub const PRODUCT_FIELDS: [&str; 4] = ["sku", "barcodes", "external_ids", "name"];

pub fn product_key(product: u64, field: &str) -> String {
    format!("{product}/{field}")
}

pub fn parse_product_key(key: &str) -> Result<(u64, &str), String> {
    let (p, field) = key
        .split_once('/')
        .ok_or_else(|| format!("bad product key {key:?}"))?;
    let product: u64 = p.parse().map_err(|_| format!("bad product key {key:?}"))?;
    validate_product_id("product", product)?;
    if product.to_string() != p || !PRODUCT_FIELDS.contains(&field) {
        return Err(format!("bad product key {key:?}"));
    }
    Ok((product, field))
}

/// Range of every key of one customer in its bucket document.
pub fn customer_range(customer: &str) -> std::ops::Range<String> {
    // '0' follows '/' in ASCII.
    format!("{customer}/")..format!("{customer}0")
}

/// Month bucket `yyyymm` of a unix time in milliseconds (UTC, proleptic Gregorian).
pub fn month_of(unix_ms: u64) -> u32 {
    let days = (unix_ms / 86_400_000) as i64;
    let (y, m, _) = civil_from_days(days);
    (y as u32) * 100 + m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_ids_round_trip() {
        let t = NodeTag([1, 2, 3, 4, 5, 6]);
        for d in [
            DocId::Mesh,
            DocId::Ledger {
                location: "store-1".into(),
                bucket: 7,
                epoch: 0,
            },
            DocId::Ledger {
                location: "store-1".into(),
                bucket: 7,
                epoch: 12,
            },
            DocId::Records {
                tag: t,
                month: 202611,
                part: 0,
            },
            DocId::Records {
                tag: t,
                month: 202611,
                part: 3,
            },
            DocId::Customers { bucket: 63 },
            DocId::Products { bucket: 1 },
        ] {
            assert_eq!(DocId::parse(&d.encode(), 64).unwrap(), d);
        }
        assert!(DocId::parse("ledger/store-1/64", 64).is_err());
        assert!(DocId::parse("ledger/Store/1", 64).is_err());
        // Epoch 0 has one spelling; epochs are bounded.
        assert!(DocId::parse("ledger/store-1/1/0", 64).is_err());
        assert!(DocId::parse("ledger/store-1/1/01", 64).is_err());
        assert!(DocId::parse("ledger/store-1/1/1000001", 64).is_err());
        assert_eq!(
            DocId::parse("ledger/store-1/1/3", 64).unwrap().encode(),
            "ledger/store-1/1/3"
        );
        assert!(DocId::parse("rec/010203040506/202613", 64).is_err());
        assert!(DocId::parse("rec/010203040506/202611/0", 64).is_err());
        assert!(DocId::parse("rec/010203040506/202611/01", 64).is_err());
        assert!(DocId::parse("rec/010203040506/202611/1000001", 64).is_err());
        assert_eq!(
            DocId::parse("rec/010203040506/202611", 64)
                .unwrap()
                .encode(),
            "rec/010203040506/202611"
        );
        assert!(DocId::parse("x", 64).is_err());
    }

    #[test]
    fn ledger_keys_round_trip_and_sort_by_product() {
        let a = ActorKey::new(NodeTag([9; 6]), [1; 4]);
        for f in [
            LedgerField::Received,
            LedgerField::Removed,
            LedgerField::Granted(NodeTag([3; 6])),
            LedgerField::Held(NodeTag([4; 6])),
            LedgerField::Released,
        ] {
            let k = ledger_key(123, a, f);
            assert_eq!(parse_ledger_key(&k).unwrap(), (123, a, f));
            assert!(ledger_product_range(123).contains(&k));
            assert!(!ledger_product_range(12).contains(&k));
            assert!(!ledger_product_range(1234).contains(&k));
        }
        assert!(parse_ledger_key("0123/x/r").is_err());
        assert!(parse_ledger_key(&format!("0123/{}/r", a.hex())).is_err());
        assert!(parse_ledger_key(&format!("123/{}/q", a.hex())).is_err());
    }

    #[test]
    fn customer_keys() {
        let a = ActorKey::new(NodeTag([9; 6]), [1; 4]);
        for k in [
            CustomerKey::Profile {
                customer: "c1".into(),
                field: "email".into(),
            },
            CustomerKey::Earned {
                customer: "c1".into(),
                actor: a,
            },
            CustomerKey::Spent {
                customer: "c1".into(),
                actor: a,
            },
            CustomerKey::Erased {
                customer: "c1".into(),
            },
        ] {
            assert_eq!(CustomerKey::parse(&k.encode()).unwrap(), k);
            assert!(customer_range("c1").contains(&k.encode()));
            assert!(!customer_range("c").contains(&k.encode()));
        }
        assert!(CustomerKey::parse("c1/p/password").is_err());
    }

    #[test]
    fn months() {
        assert_eq!(month_of(0), 197001);
        // 2026-11-27T10:00:00Z
        assert_eq!(month_of(1_795_773_600_000), 202611);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
    }
}
