//! Batch certificates signed with the node's identity key (ECDSA P-256,
//! SHA-256): the public key sent with a certificate is the key's
//! SubjectPublicKeyInfo, whose SHA-256 is the node id, so a receiver checks
//! "this key belongs to node X" with no key material beyond what `init`
//! already made. Stored certificates are read back through [`StoreArchive`].

use anyhow::anyhow;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
    ECDSA_P256_SHA256_FIXED_SIGNING,
};
use sha2::{Digest, Sha256};
use storemesh_protocol::ids::NodeId;
use storemesh_protocol::signing::{Cert, CertArchive, ChangeSigner, ChangeVerifier};

/// The node's store as the engine's certificate archive.
pub struct StoreArchive(pub std::sync::Arc<crate::store::Store>);

impl CertArchive for StoreArchive {
    fn doc_certs(&self, doc: &str) -> Vec<Cert> {
        match self.0.doc_certs(doc) {
            Ok(c) => c,
            Err(e) => {
                // The peer gets the changes without their certificates and
                // refuses them; the session retries later.
                tracing::error!(doc, error = %format!("{e:#}"), "cannot read stored certificates");
                Vec::new()
            }
        }
    }
}

/// DER header of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1,
/// a 66-byte BIT STRING), followed by the 65-byte uncompressed point.
const P256_SPKI_HEADER: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const P256_POINT_BYTES: usize = 65;

/// Signs with the node identity key.
pub struct NodeSigner {
    key: EcdsaKeyPair,
    spki: Vec<u8>,
    rng: SystemRandom,
}

impl NodeSigner {
    /// From the identity's PKCS#8 key.
    pub fn from_pkcs8(key_der: &[u8]) -> anyhow::Result<NodeSigner> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, key_der, &rng)
            .map_err(|e| anyhow!("the identity key cannot sign changes (not ECDSA P-256?): {e}"))?;
        let mut spki = P256_SPKI_HEADER.to_vec();
        spki.extend_from_slice(key.public_key().as_ref());
        Ok(NodeSigner { key, spki, rng })
    }
}

impl ChangeSigner for NodeSigner {
    fn public_key(&self) -> &[u8] {
        &self.spki
    }

    fn sign(&self, hash: &[u8; 32]) -> Vec<u8> {
        // Signing fails only if the system RNG does (then nothing works):
        // an empty signature is refused by every receiver, loudly.
        match self.key.sign(&self.rng, hash) {
            Ok(s) => s.as_ref().to_vec(),
            Err(e) => {
                tracing::error!(error = %e, "cannot sign a batch certificate");
                Vec::new()
            }
        }
    }
}

/// Verifies ECDSA P-256 signatures; a key's node id is SHA-256 of its SPKI.
pub struct NodeVerifier;

impl ChangeVerifier for NodeVerifier {
    fn node_id(&self, public_key: &[u8]) -> Option<NodeId> {
        if public_key.len() != P256_SPKI_HEADER.len() + P256_POINT_BYTES
            || public_key[..P256_SPKI_HEADER.len()] != P256_SPKI_HEADER
        {
            return None;
        }
        Some(NodeId(Sha256::digest(public_key).into()))
    }

    fn verify(&self, public_key: &[u8], hash: &[u8; 32], sig: &[u8]) -> bool {
        if self.node_id(public_key).is_none() {
            return false;
        }
        UnparsedPublicKey::new(
            &ECDSA_P256_SHA256_FIXED,
            &public_key[P256_SPKI_HEADER.len()..],
        )
        .verify(hash, sig)
        .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    #[test]
    fn the_signing_key_is_the_node_identity() {
        let id = Identity::generate("a").unwrap();
        let s = NodeSigner::from_pkcs8(&id.key_der).unwrap();
        assert_eq!(NodeVerifier.node_id(s.public_key()), Some(id.node_id));
        let h = [3u8; 32];
        let sig = s.sign(&h);
        assert!(NodeVerifier.verify(s.public_key(), &h, &sig));
        assert!(!NodeVerifier.verify(s.public_key(), &[4u8; 32], &sig));
        let other = Identity::generate("b").unwrap();
        let o = NodeSigner::from_pkcs8(&other.key_der).unwrap();
        assert!(!NodeVerifier.verify(o.public_key(), &h, &sig));
        assert!(!NodeVerifier.verify(&[0u8; 91], &h, &sig));
    }
}
