//! Identifiers, names, quantity ranges and the stable bucket hash.
//!
//! Everything here is pure: it is used by the HTTP layer to validate input and by
//! the document layer to build keys, so the rules live in one place.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Largest `product_id` accepted: 2^53 − 1, the largest integer JavaScript holds exactly.
pub const PRODUCT_ID_MAX: u64 = (1 << 53) - 1;
/// Largest quantity in one line (CONTRACT.md).
pub const QUANTITY_MAX: u64 = 1_000_000_000;
/// Largest cumulative cell value: cells are kept below 2^53 so every client can read them.
pub const CELL_MAX: u64 = 1 << 53;
/// Longest client-chosen id (`sale_id`, `receipt_id`, …).
pub const CLIENT_ID_LEN_MAX: usize = 128;
/// Longest node or location name.
pub const NAME_LEN_MAX: usize = 64;
/// Bytes of the node id that make up a node's tag (12 hex characters).
pub const NODE_TAG_BYTES: usize = 6;
/// Bytes of per-process randomness appended to the tag to form an actor id.
pub const INCARNATION_BYTES: usize = 4;

/// A node's identity: SHA-256 of its certificate's SubjectPublicKeyInfo.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    pub fn parse(text: &str) -> Result<NodeId, String> {
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "node id must be 64 lowercase hex characters (got {} characters)",
                text.len()
            ));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(text.to_ascii_lowercase(), &mut out)
            .map_err(|e| format!("node id is not hex: {e}"))?;
        Ok(NodeId(out))
    }

    /// The short, stable tag used inside document keys.
    pub fn tag(&self) -> NodeTag {
        let mut t = [0u8; NODE_TAG_BYTES];
        t.copy_from_slice(&self.0[..NODE_TAG_BYTES]);
        NodeTag(t)
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}
impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", &self.hex()[..12])
    }
}

/// First bytes of a node id; identifies the owner of keys in documents.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeTag(pub [u8; NODE_TAG_BYTES]);

impl NodeTag {
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn parse(text: &str) -> Option<NodeTag> {
        if text.len() != NODE_TAG_BYTES * 2 {
            return None;
        }
        let mut t = [0u8; NODE_TAG_BYTES];
        hex::decode_to_slice(text, &mut t).ok()?;
        Some(NodeTag(t))
    }
}
impl fmt::Display for NodeTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}
impl fmt::Debug for NodeTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeTag({})", self.hex())
    }
}

/// An Automerge actor: the node tag followed by per-process random bytes.
///
/// A fresh incarnation at every process start means a node restored from a backup
/// (or a copied data directory) never reuses an actor, and — because stock cells
/// are keyed by actor — two branches of a forked node write *different* keys, so
/// their totals add up exactly instead of overwriting each other (DESIGN §3).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActorKey(pub [u8; NODE_TAG_BYTES + INCARNATION_BYTES]);

impl ActorKey {
    pub fn new(tag: NodeTag, incarnation: [u8; INCARNATION_BYTES]) -> ActorKey {
        let mut a = [0u8; NODE_TAG_BYTES + INCARNATION_BYTES];
        a[..NODE_TAG_BYTES].copy_from_slice(&tag.0);
        a[NODE_TAG_BYTES..].copy_from_slice(&incarnation);
        ActorKey(a)
    }
    pub fn tag(&self) -> NodeTag {
        let mut t = [0u8; NODE_TAG_BYTES];
        t.copy_from_slice(&self.0[..NODE_TAG_BYTES]);
        NodeTag(t)
    }
    pub fn from_bytes(b: &[u8]) -> Option<ActorKey> {
        if b.len() != NODE_TAG_BYTES + INCARNATION_BYTES {
            return None;
        }
        let mut a = [0u8; NODE_TAG_BYTES + INCARNATION_BYTES];
        a.copy_from_slice(b);
        Some(ActorKey(a))
    }
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn parse(text: &str) -> Option<ActorKey> {
        let mut a = [0u8; NODE_TAG_BYTES + INCARNATION_BYTES];
        if text.len() != a.len() * 2 {
            return None;
        }
        hex::decode_to_slice(text, &mut a).ok()?;
        Some(ActorKey(a))
    }
    pub fn automerge(&self) -> automerge::ActorId {
        automerge::ActorId::from(&self.0[..])
    }
}
impl fmt::Debug for ActorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Actor({})", self.hex())
    }
}

/// Node and location names: 1–64 of `a-z 0-9 - _ .`.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_LEN_MAX {
        return Err(format!("{what} must be 1-{NAME_LEN_MAX} characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
    {
        return Err(format!(
            "{what} {name:?} may only contain a-z, 0-9, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// Client ids: 1–128 printable ASCII characters (no spaces or controls, no '/',
/// which separates the parts of document keys and URL paths).
pub fn validate_client_id(field: &str, id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > CLIENT_ID_LEN_MAX {
        return Err(format!("{field} must be 1-{CLIENT_ID_LEN_MAX} characters"));
    }
    if !id.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b'/') {
        return Err(format!(
            "{field} must be printable ASCII without spaces or '/'"
        ));
    }
    Ok(())
}

pub fn validate_product_id(field: &str, id: u64) -> Result<(), String> {
    if id == 0 || id > PRODUCT_ID_MAX {
        return Err(format!("{field} must be an integer in 1..=2^53-1"));
    }
    Ok(())
}

pub fn validate_quantity(field: &str, q: u64) -> Result<(), String> {
    if q == 0 || q > QUANTITY_MAX {
        return Err(format!("{field} must be an integer in 1..=1000000000"));
    }
    Ok(())
}

pub fn validate_counted(field: &str, q: u64) -> Result<(), String> {
    if q > QUANTITY_MAX {
        return Err(format!("{field} must be an integer in 0..=1000000000"));
    }
    Ok(())
}

/// FNV-1a, 64-bit: the mesh-wide stable hash for buckets. Never change it: the
/// bucket of a product decides which document holds it on every node.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Bucket of a product: `fnv1a64(product_id as 8 little-endian bytes) mod buckets`.
pub fn product_bucket(product_id: u64, buckets: u32) -> u32 {
    debug_assert!(buckets > 0);
    (fnv1a64(&product_id.to_le_bytes()) % u64::from(buckets.max(1))) as u32
}

/// Bucket of a customer: `fnv1a64(customer_id bytes) mod buckets`.
pub fn customer_bucket(customer_id: &str, buckets: u32) -> u32 {
    (fnv1a64(customer_id.as_bytes()) % u64::from(buckets.max(1))) as u32
}

/// The product id given to a SKU first seen in an import: stable on every
/// node, in 1..=2^53-1. (A SKU already in the catalogue keeps its product id.)
pub fn product_id_for_sku(sku: &str) -> u64 {
    fnv1a64(format!("sku:{sku}").as_bytes()) % PRODUCT_ID_MAX + 1
}

/// A name → tag directory entry, as published by each node in the mesh document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub location: Option<String>,
    pub role: String,
    pub policy: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_the_published_function() {
        // Test vectors of FNV-1a 64.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn buckets_are_stable_and_in_range() {
        assert_eq!(product_bucket(12345, 64), product_bucket(12345, 64));
        for p in 1..2000u64 {
            assert!(product_bucket(p, 64) < 64);
        }
        assert_ne!(product_bucket(1, 64), product_bucket(2, 64));
    }

    #[test]
    fn names_and_ids() {
        assert!(validate_name("name", "store-1").is_ok());
        assert!(validate_name("name", "Store").is_err());
        assert!(validate_name("name", "").is_err());
        assert!(validate_name("name", &"a".repeat(65)).is_err());
        assert!(validate_client_id("sale_id", "s-1").is_ok());
        assert!(validate_client_id("sale_id", "a b").is_err());
        assert!(validate_client_id("sale_id", &"x".repeat(129)).is_err());
        assert!(validate_product_id("product_id", 0).is_err());
        assert!(validate_product_id("product_id", PRODUCT_ID_MAX).is_ok());
        assert!(validate_product_id("product_id", PRODUCT_ID_MAX + 1).is_err());
        assert!(validate_quantity("quantity", 0).is_err());
        assert!(validate_counted("counted", 0).is_ok());
        assert!(NodeId::parse("zz").is_err());
        let id = NodeId::parse(&"ab".repeat(32)).unwrap();
        assert_eq!(id.hex(), "ab".repeat(32));
        let a = ActorKey::new(id.tag(), [1, 2, 3, 4]);
        assert_eq!(a.tag(), id.tag());
        assert_eq!(ActorKey::parse(&a.hex()), Some(a));
    }
}

macro_rules! hex_serde {
    ($t:ty, $what:literal) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.hex())
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                <$t>::parse(&s).ok_or_else(|| serde::de::Error::custom(concat!("bad ", $what)))
            }
        }
    };
}
hex_serde!(NodeTag, "node tag");
hex_serde!(ActorKey, "actor");
