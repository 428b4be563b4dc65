//! The stored form of idempotency records (issue 14: disk per sale).
//!
//! Every write keeps its reply for replays, so a year of sales keeps a year
//! of replies. As JSON with its 32-byte hash a sale's record took ~160 bytes,
//! more than half of a store node's file. Stored here instead: the hash, the
//! status, and the body as typed values — keys the API uses as one byte,
//! integers as varints — about a quarter of the JSON. A body is stored typed
//! only when it re-serialises to exactly the same bytes (checked at every
//! write); anything else (floats, escapes, whitespace) is kept as its JSON,
//! so a replay always returns the first answer byte for byte.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use storemesh_protocol::ops::{IdemRecord, OpReply, ReplyKind, IDEM_HASH_BYTES};

/// Object keys of the API's replies, stored as their index (≤ 255 entries;
/// append only: stored records refer to positions).
const KNOWN_KEYS: &[&str] = &[
    "sale_id",
    "lines",
    "product_id",
    "stock_level",
    "available",
    "error",
    "message",
    "return_id",
    "receipt_id",
    "transfer_id",
    "reservation_id",
    "adjustment_id",
    "count_id",
    "grant_id",
    "location",
    "quantity",
    "status",
    "customer_id",
    "points",
    "balance",
    "id",
    "from",
    "to",
    "sku",
    "lines_counted",
    "collisions",
];

/// A JSON value with its object keys in their original order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Compact {
    Null,
    Bool(bool),
    U(u64),
    I(i64),
    S(String),
    A(Vec<Compact>),
    O(Vec<(Key, Compact)>),
    /// The id of the record's own key (`sale/<id>` → `<id>`): a reply names
    /// its operation's id, which the table key already holds (`idem3` only).
    Id,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Key {
    Known(u8),
    Other(String),
}

impl Key {
    fn of(s: String) -> Key {
        match KNOWN_KEYS.iter().position(|k| *k == s) {
            Some(i) => Key::Known(i as u8),
            None => Key::Other(s),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            Key::Known(i) => KNOWN_KEYS.get(*i as usize).copied().unwrap_or(""),
            Key::Other(s) => s,
        }
    }
}

#[derive(Serialize, Deserialize)]
enum Body {
    Json(String),
    Typed(Compact),
}

/// The stored record. `status` is the HTTP status the request was first
/// answered with (`ReplyKind` as 201 or 200): records written before the
/// core returned typed outcomes hold the same number, so they decode the same.
#[derive(Serialize, Deserialize)]
struct Stored {
    hash: [u8; 32],
    status: u16,
    body: Body,
}

/// A reply as the `idem` table of older releases stored it (postcard of the
/// core's reply when it still held an HTTP status).
#[derive(Serialize, Deserialize)]
pub(crate) struct LegacyRecord {
    body_hash: [u8; 32],
    status: u16,
    body: String,
}

impl LegacyRecord {
    /// The typed record; an error for a status no release stored.
    pub(crate) fn typed(self) -> Result<IdemRecord, String> {
        Ok(IdemRecord {
            body_hash: self.body_hash,
            reply: OpReply {
                kind: kind_of(self.status)?,
                body: self.body,
            },
        })
    }
}

/// The stored number of a reply kind: the HTTP status the API answers it
/// with (`node/src/api/outcome.rs`), which is what records held before the
/// core's replies were typed. Fixed: stored records refer to these numbers.
fn status_of(kind: ReplyKind) -> u16 {
    match kind {
        ReplyKind::Created => 201,
        ReplyKind::Ok => 200,
    }
}

/// The kind of a stored status; an error for a number no release stored.
fn kind_of(status: u16) -> Result<ReplyKind, String> {
    match status {
        201 => Ok(ReplyKind::Created),
        200 => Ok(ReplyKind::Ok),
        _ => Err(format!("unknown reply status {status}")),
    }
}

/// The `idem3` form: the hash's first [`IDEM_HASH_BYTES`] and the body
/// without the operation's id (about 30 bytes per sale fewer than `idem2`
/// with a 36-character UUID id).
#[derive(Serialize, Deserialize)]
struct Stored3 {
    hash: [u8; IDEM_HASH_BYTES],
    status: u16,
    body: Body,
}

/// The id part of a client key (`sale/<id>`), `None` if it has none.
fn key_id(key: &str) -> Option<&str> {
    key.split_once('/')
        .map(|(_, id)| id)
        .filter(|id| !id.is_empty())
}

/// Replaces every string equal to `id` by [`Compact::Id`].
fn elide(c: &mut Compact, id: &str) {
    match c {
        Compact::S(x) if x == id => *c = Compact::Id,
        Compact::A(v) => v.iter_mut().for_each(|x| elide(x, id)),
        Compact::O(v) => v.iter_mut().for_each(|(_, x)| elide(x, id)),
        _ => {}
    }
}

/// Encodes the record of client key `key` for the `idem3` table.
pub fn encode3(key: &str, rec: &IdemRecord) -> Result<Vec<u8>, postcard::Error> {
    let body = match (typed(&rec.reply.body), key_id(key)) {
        (Some(mut c), Some(id)) => {
            elide(&mut c, id);
            Body::Typed(c)
        }
        (Some(c), None) => Body::Typed(c),
        (None, _) => Body::Json(rec.reply.body.clone()),
    };
    let mut hash = [0u8; IDEM_HASH_BYTES];
    hash.copy_from_slice(&rec.body_hash[..IDEM_HASH_BYTES]);
    postcard::to_stdvec(&Stored3 {
        hash,
        status: status_of(rec.reply.kind),
        body,
    })
}

/// Decodes a record of the `idem3` table stored under `key`. The hash's
/// bytes past [`IDEM_HASH_BYTES`] read as zeros ([`IdemRecord::same_body`]
/// compares only the stored ones).
pub fn decode3(key: &str, bytes: &[u8]) -> Result<IdemRecord, String> {
    let s: Stored3 = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
    let mut body_hash = [0u8; 32];
    body_hash[..IDEM_HASH_BYTES].copy_from_slice(&s.hash);
    let body = match s.body {
        Body::Json(j) => j,
        Body::Typed(c) => {
            serde_json::to_string(&Out(&c, key_id(key).unwrap_or(""))).map_err(|e| e.to_string())?
        }
    };
    Ok(IdemRecord {
        body_hash,
        reply: OpReply {
            kind: kind_of(s.status)?,
            body,
        },
    })
}

/// Encodes a record for the `idem2` table, as releases before `idem3` did
/// (kept to test that their records still replay).
#[cfg(test)]
pub fn encode(rec: &IdemRecord) -> Result<Vec<u8>, postcard::Error> {
    let body = match typed(&rec.reply.body) {
        Some(c) => Body::Typed(c),
        None => Body::Json(rec.reply.body.clone()),
    };
    postcard::to_stdvec(&Stored {
        hash: rec.body_hash,
        status: status_of(rec.reply.kind),
        body,
    })
}

/// Decodes a record of the `idem2` table.
pub fn decode(bytes: &[u8]) -> Result<IdemRecord, String> {
    let s: Stored = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
    let body = match s.body {
        Body::Json(j) => j,
        Body::Typed(c) => serde_json::to_string(&Out(&c, "")).map_err(|e| e.to_string())?,
    };
    Ok(IdemRecord {
        body_hash: s.hash,
        reply: OpReply {
            kind: kind_of(s.status)?,
            body,
        },
    })
}

/// The typed form of `json`, only if it gives back exactly these bytes.
fn typed(json: &str) -> Option<Compact> {
    let In(c) = serde_json::from_str::<In>(json).ok()?;
    let again = serde_json::to_string(&Out(&c, "")).ok()?;
    (again == json).then_some(c)
}

/// Parses JSON keeping object keys in order; floats are refused (kept as JSON).
struct In(Compact);

impl<'de> Deserialize<'de> for In {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<In, D::Error> {
        d.deserialize_any(InVisitor).map(In)
    }
}

struct InVisitor;

impl<'de> Visitor<'de> for InVisitor {
    type Value = Compact;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON without floats")
    }
    fn visit_unit<E>(self) -> Result<Compact, E> {
        Ok(Compact::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Compact, E> {
        Ok(Compact::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Compact, E> {
        Ok(Compact::U(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Compact, E> {
        Ok(Compact::I(v))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Compact, E> {
        Err(E::custom("float"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Compact, E> {
        Ok(Compact::S(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Compact, E> {
        Ok(Compact::S(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Compact, A::Error> {
        let mut v = Vec::new();
        while let Some(In(x)) = a.next_element::<In>()? {
            v.push(x);
        }
        Ok(Compact::A(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Compact, A::Error> {
        let mut v = Vec::new();
        while let Some((k, In(x))) = a.next_entry::<String, In>()? {
            v.push((Key::of(k), x));
        }
        Ok(Compact::O(v))
    }
}

/// Writes a typed body back as JSON, keys in their stored order, with the
/// operation's id where the body names it ([`Compact::Id`]).
struct Out<'a>(&'a Compact, &'a str);

impl Serialize for Out<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Compact::Null => s.serialize_unit(),
            Compact::Bool(b) => s.serialize_bool(*b),
            Compact::U(u) => s.serialize_u64(*u),
            Compact::I(i) => s.serialize_i64(*i),
            Compact::S(x) => s.serialize_str(x),
            Compact::Id => s.serialize_str(self.1),
            Compact::A(v) => {
                let mut seq = s.serialize_seq(Some(v.len()))?;
                for x in v {
                    seq.serialize_element(&Out(x, self.1))?;
                }
                seq.end()
            }
            Compact::O(v) => {
                let mut map = s.serialize_map(Some(v.len()))?;
                for (k, x) in v {
                    map.serialize_entry(k.as_str(), &Out(x, self.1))?;
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(body: &str) -> IdemRecord {
        IdemRecord {
            body_hash: [7; 32],
            reply: OpReply {
                kind: ReplyKind::Created,
                body: body.to_string(),
            },
        }
    }

    #[test]
    fn replies_come_back_byte_for_byte() {
        for body in [
            r#"{"lines":[{"available":49,"product_id":12345,"stock_level":50}],"sale_id":"s-1"}"#,
            r#"{"sale_id":"s-1","lines":[{"product_id":1,"stock_level":-3,"available":0}]}"#,
            r#"{"error":"insufficient_stock","message":"only 2 left \u00e9 \"q\""}"#,
            r#"{"x":1.5,"y":[true,false,null]}"#,
            r#"{ "spaced": 1 }"#,
            "",
            "not json",
            r#"{"unknown_key":{"deep":[1,2,{"a":"b"}]},"n":18446744073709551615,"m":-9223372036854775808}"#,
        ] {
            let r = rec(body);
            let bytes = encode(&r).unwrap();
            assert_eq!(decode(&bytes).unwrap(), r, "{body}");
        }
    }

    #[test]
    fn a_sale_reply_is_a_fraction_of_its_json() {
        let body = r#"{"lines":[{"available":49,"product_id":12345,"stock_level":50}],"sale_id":"s-000123"}"#;
        let r = rec(body);
        let typed = encode(&r).unwrap().len();
        let json = postcard::to_stdvec(&r).unwrap().len();
        assert!(
            typed + body.len() / 2 < json,
            "typed {typed} B, JSON {json} B"
        );
    }

    /// A record as the release before typed outcomes wrote it (the same
    /// `Stored` layout, its status number written by hand) replays the same
    /// status and body byte for byte.
    #[test]
    fn records_written_with_a_status_number_replay_the_same() {
        let body =
            r#"{"lines":[{"available":49,"product_id":12345,"stock_level":50}],"sale_id":"s-1"}"#;
        for (status, kind) in [(201u16, ReplyKind::Created), (200, ReplyKind::Ok)] {
            let old = postcard::to_stdvec(&Stored {
                hash: [3; 32],
                status,
                body: Body::Typed(typed(body).unwrap()),
            })
            .unwrap();
            let rec = decode(&old).unwrap();
            assert_eq!(rec.body_hash, [3; 32]);
            assert_eq!(rec.reply.kind, kind);
            assert_eq!(rec.reply.body, body);
            assert_eq!(status_of(rec.reply.kind), status);
            // Written again by this release: the same bytes.
            assert_eq!(encode(&rec).unwrap(), old);
        }
        // A status no release stored is a corrupt record, not a guess.
        let odd = postcard::to_stdvec(&Stored {
            hash: [3; 32],
            status: 202,
            body: Body::Json("{}".into()),
        })
        .unwrap();
        assert!(decode(&odd).is_err());
    }

    /// The `idem` table of older releases: postcard of `{body_hash,
    /// reply: {status, body}}`.
    #[test]
    fn legacy_table_records_decode_typed() {
        #[derive(Serialize)]
        struct OldReply {
            status: u16,
            body: String,
        }
        #[derive(Serialize)]
        struct OldRecord {
            body_hash: [u8; 32],
            reply: OldReply,
        }
        let bytes = postcard::to_stdvec(&OldRecord {
            body_hash: [9; 32],
            reply: OldReply {
                status: 201,
                body: r#"{"sale_id":"s-9"}"#.into(),
            },
        })
        .unwrap();
        let rec = postcard::from_bytes::<LegacyRecord>(&bytes)
            .unwrap()
            .typed()
            .unwrap();
        assert_eq!(rec.body_hash, [9; 32]);
        assert_eq!(rec.reply.kind, ReplyKind::Created);
        assert_eq!(rec.reply.body, r#"{"sale_id":"s-9"}"#);
    }

    #[test]
    fn idem3_gives_replies_back_byte_for_byte_with_the_id_elided() {
        for (key, body) in [
            (
                "sale/s-1",
                r#"{"sale_id":"s-1","lines":[{"product_id":1,"stock_level":-3,"available":0}]}"#,
            ),
            (
                "sale/s-1",
                r#"{"note":"s-1 is not elided inside a longer string: s-1x","id":"s-1"}"#,
            ),
            ("rcv/r", r#"{"receipt_id":"r","lines":[]}"#),
            ("noslash", r#"{"x":"noslash"}"#),
            ("sale/", r#"{"sale_id":""}"#),
            ("sale/x", r#"{"x":1.5}"#),
            ("sale/x", "not json"),
        ] {
            let mut r = rec(body);
            let back = decode3(key, &encode3(key, &r).unwrap()).unwrap();
            r.body_hash[IDEM_HASH_BYTES..].fill(0);
            assert_eq!(back, r, "{key} {body}");
        }
        let (key, body) = ("sale/s-000123", r#"{"sale_id":"s-000123","lines":[]}"#);
        let with_id = encode3(key, &rec(body)).unwrap().len();
        let v2 = encode(&rec(body)).unwrap().len();
        // 16 hash bytes, and the id with its length byte.
        assert_eq!(with_id + 16 + "s-000123".len() + 1, v2);
    }

    #[test]
    fn garbage_does_not_decode_as_a_record() {
        assert!(decode(&[0xff, 0xff, 0xff]).is_err());
        assert!(decode(&[]).is_err());
        assert!(decode3("sale/x", &[0xff, 0xff]).is_err());
    }
}
