//! Crypto-shredding of customers' personal data.
//!
//! Automerge keeps every change forever, so deleting a profile field leaves the
//! old value in the history of every replica. Personal fields are therefore
//! stored only encrypted (XChaCha20-Poly1305) under a per-customer key. The keys
//! live outside the documents, in a key store that is a small state-based CRDT:
//! per customer either a set of keys (concurrent creations on two nodes both
//! survive) or `Erased`, and `Erased` wins every merge. Erasing a customer
//! replaces its keys by `Erased` everywhere; what remains in any document's
//! history is ciphertext nobody can read, and a peer that was offline cannot
//! bring the keys back.

use std::collections::BTreeSet;

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Prefix of an encrypted field value in a document.
pub const ENC_PREFIX: &str = "enc1:";
/// Keys per customer at most: one per node that created one before it saw
/// another's, so at most the chain's node count. A merge never drops a key
/// (a dropped key makes everything written under it unreadable, and a peer
/// could push small keys to evict the real ones); an entry that would grow
/// past this is refused instead (`Engine::set_key_entry`).
pub const KEYS_PER_CUSTOMER_MAX: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyEntry {
    Keys(BTreeSet<[u8; 32]>),
    Erased,
}

impl KeyEntry {
    /// The semilattice join: union of keys; `Erased` absorbs everything.
    pub fn merge(&self, other: &KeyEntry) -> KeyEntry {
        match (self, other) {
            (KeyEntry::Erased, _) | (_, KeyEntry::Erased) => KeyEntry::Erased,
            (KeyEntry::Keys(a), KeyEntry::Keys(b)) => KeyEntry::Keys(a.union(b).copied().collect()),
        }
    }

    /// The key new values are encrypted with (deterministic on every node).
    pub fn current(&self) -> Option<&[u8; 32]> {
        match self {
            KeyEntry::Keys(k) => k.iter().next(),
            KeyEntry::Erased => None,
        }
    }
}

/// HMAC-SHA256 (RFC 2104), from the RustCrypto `hmac` crate.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use hmac::Mac;
    // HMAC takes keys of any length (longer ones are hashed first).
    let mut mac =
        <hmac::Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// Prefix of a customer pseudonym in sale, return and reservation records.
pub const PSEUDONYM_PREFIX: &str = "cp1:";

/// What sale, return and reservation records hold instead of the customer
/// id: a keyed hash of the id under one of the customer's keys. While the
/// customer exists every node recomputes it from the key store and finds the
/// purchase history; once the keys are erased nobody can link the records to
/// the id any more (the id space is small enough to try every id, the key
/// space is not).
pub fn customer_pseudonym(key: &[u8; 32], customer: &str) -> String {
    let mut msg = b"storemesh customer pseudonym\0".to_vec();
    msg.extend_from_slice(customer.as_bytes());
    let h = hmac_sha256(key, &msg);
    format!("{PSEUDONYM_PREFIX}{}", hex::encode(&h[..16]))
}

fn key_id(key: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(key)[..4])
}

/// Encrypts `plain` under `key` with a nonce that is unique per (actor, counter).
pub fn encrypt(key: &[u8; 32], nonce_material: &[u8], plain: &str) -> String {
    let nonce_bytes: [u8; 24] = {
        let d = Sha256::digest(nonce_material);
        let mut n = [0u8; 24];
        n.copy_from_slice(&d[..24]);
        n
    };
    let cipher = XChaCha20Poly1305::new(key.into());
    match cipher.encrypt(XNonce::from_slice(&nonce_bytes), plain.as_bytes()) {
        Ok(ct) => format!(
            "{ENC_PREFIX}{}:{}{}",
            key_id(key),
            hex::encode(nonce_bytes),
            hex::encode(ct)
        ),
        // Encryption of an in-memory buffer cannot fail; never store plaintext.
        Err(_) => String::new(),
    }
}

/// Decrypts a stored value with whichever of the customer's keys made it.
pub fn decrypt(entry: Option<&KeyEntry>, stored: &str) -> Option<String> {
    let rest = stored.strip_prefix(ENC_PREFIX)?;
    let (kid, body) = rest.split_once(':')?;
    let KeyEntry::Keys(keys) = entry? else {
        return None;
    };
    let key = keys.iter().find(|k| key_id(k) == kid)?;
    let raw = hex::decode(body).ok()?;
    if raw.len() < 24 {
        return None;
    }
    let (nonce, ct) = raw.split_at(24);
    let plain = XChaCha20Poly1305::new(key.into())
        .decrypt(XNonce::from_slice(nonce), ct)
        .ok()?;
    String::from_utf8(plain).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2 of RFC 4231.
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        let a = customer_pseudonym(&[1; 32], "c-77");
        assert!(a.starts_with(PSEUDONYM_PREFIX) && !a.contains("c-77"));
        assert_eq!(a, customer_pseudonym(&[1; 32], "c-77"));
        assert_ne!(a, customer_pseudonym(&[2; 32], "c-77"));
        assert_ne!(a, customer_pseudonym(&[1; 32], "c-78"));
    }

    #[test]
    fn round_trip_and_erasure_wins() {
        let k = [7u8; 32];
        let e = KeyEntry::Keys([k].into());
        let c = encrypt(&k, b"actor-1", "ada@example.test");
        assert!(!c.contains("ada"));
        assert_eq!(decrypt(Some(&e), &c).as_deref(), Some("ada@example.test"));
        assert_eq!(decrypt(Some(&KeyEntry::Erased), &c), None);
        assert_eq!(decrypt(None, &c), None);
        let other = KeyEntry::Keys([[9u8; 32]].into());
        let both = e.merge(&other);
        assert_eq!(
            decrypt(Some(&both), &c).as_deref(),
            Some("ada@example.test")
        );
        assert_eq!(both.merge(&KeyEntry::Erased), KeyEntry::Erased);
        assert_eq!(KeyEntry::Erased.merge(&both), KeyEntry::Erased);
        assert_eq!(both.merge(&e), both);
        assert_ne!(encrypt(&k, b"actor-2", "x"), encrypt(&k, b"actor-3", "x"));
    }
}
