//! Signed authorship (issue 16, finding 1) with one signature per commit
//! batch: every change a node makes is covered by a **batch certificate**
//! ([`Cert`]) — its author's signature over the sorted list of the hashes
//! of every change the batch made, in every document. A receiver verifies a
//! certificate once (and only when one of its changes is new to it) and then
//! accepts each change whose hash it lists, provided the change's actor
//! names the certificate's signer and the signer is a member.
//!
//! The core knows signatures only through two small traits, so that it stays
//! free of key files and of any one algorithm: the node signs with its
//! identity key (ECDSA P-256, `node/src/signing.rs`: the public key is the
//! SubjectPublicKeyInfo whose SHA-256 *is* the node id), the simulator and
//! the in-memory test mesh with [`KeyedHashScheme`] (deterministic).
//!
//! Certificates travel in `Msg::Certs` frames sent just before the frames
//! that carry their changes (push, sync message, fallback), by whichever node
//! sends the changes: hubs forward the author's certificate. They are stored
//! in redb (`Batch::certs`, table `certs`, with a (document, certificate)
//! index); in memory a node keeps only the certificates of changes of its
//! live documents made or received since it started (see [`CertBook`]), and
//! reads the others through a [`CertArchive`] when a peer needs them.
//!
//! Who counts as an author ([`Membership`]): this node, its configured peers,
//! and nodes introduced ([`Introduction`]) by a node already accepted — a
//! chain that ends at this node's own configuration.

use std::collections::{BTreeMap, BTreeSet};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::{NodeId, NodeTag, NODE_TAG_BYTES};

pub(crate) mod book;

pub(crate) use book::CertBook;
pub use book::CertFigures;

/// A public key longer than this is refused (a P-256 SPKI is 91 bytes).
pub const SIG_KEY_BYTES_MAX: usize = 128;
/// A signature longer than this is refused (fixed-size P-256: 64 bytes).
pub const SIG_BYTES_MAX: usize = 128;
/// Change hashes in one certificate, at most. A batch makes one change per
/// document it touches, so this is reached only by batches over thousands of
/// documents (a large receipt); they get several certificates. 4,096 × 32 B
/// = 128 KiB keeps a certificate well under a frame.
pub const CERT_HASHES_MAX: usize = 4096;
/// Bytes of certificates in one `Msg::Certs` frame, at most (the frame limit
/// is 1 MiB; several frames are sent when needed).
pub const CERTS_FRAME_BYTES_MAX: usize = 256 * 1024;
/// Certificates in one `Msg::Certs` frame, at most.
pub const CERTS_PER_FRAME_MAX: usize = 1024;
/// Change hashes of certificates received ahead of their changes and held
/// until the changes arrive, at most (~70 bytes each in memory: ~9 MiB).
/// Over it every held one is dropped: their changes are refused as unsigned
/// and fetched again by the document's sync session, which sends the
/// certificates again.
pub const PENDING_HASHES_MAX: usize = 131_072;
/// A certificate received ahead of its changes is dropped after this many
/// batches without one received again. Changes follow their certificate in
/// the same stream (a message in parts: at most 128 frames later), and the
/// certificate is sent again with every message that carries its changes.
pub const PENDING_FLUSHES_MAX: u64 = 1024;
/// A certificate already sent to a peer over its connection is sent again
/// with a later message only this many batches after (well under the
/// receiver's `PENDING_FLUSHES_MAX`, so a receiver that dropped it gets it
/// again soon).
pub const CERT_RESEND_FLUSHES: u64 = 256;
/// (peer, certificate) pairs remembered as sent, at most (~50 bytes each);
/// over it all are forgotten and certificates are sent again.
pub const SENT_MAX: usize = 262_144;
/// Introductions followed from this node's configuration, at most (a chain
/// has few members; the bound keeps a hostile introducer from growing it).
pub const INTRODUCED_MAX: usize = 4096;
/// Introductions sent with one `Msg::Certs`, at most (a chain is short).
pub const INTROS_PER_FRAME_MAX: usize = 64;

/// Refusal reasons (`storemesh_rejected_changes_total{reason}`).
pub const REJECT_BAD_SIGNATURE: &str = "bad_signature";
pub const REJECT_UNKNOWN_AUTHOR: &str = "unknown_author";

/// A certificate's id: SHA-256 of its key and signed digest.
pub type CertId = [u8; 32];

/// Signs this node's certificates and introductions.
pub trait ChangeSigner: Send {
    fn public_key(&self) -> &[u8];
    fn sign(&self, digest: &[u8; 32]) -> Vec<u8>;
}

/// Checks signatures and maps public keys to node ids.
pub trait ChangeVerifier: Send {
    /// The node a public key belongs to; `None`: not a key of this scheme.
    fn node_id(&self, public_key: &[u8]) -> Option<NodeId>;
    fn verify(&self, public_key: &[u8], digest: &[u8; 32], sig: &[u8]) -> bool;
}

/// Stored certificates, read on demand: those of documents whose
/// certificates are no longer in memory (closed records parts gone cold,
/// anything written before this process started). The node reads its redb
/// store; the in-memory test mesh has none (it keeps everything in memory).
pub trait CertArchive: Send {
    /// Every stored certificate linked to `doc`.
    fn doc_certs(&self, doc: &str) -> Vec<Cert>;
}

/// One author's signature over the hashes of every change one of its
/// commit batches made (sorted, without duplicates).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cert {
    /// The signer's public key, in the scheme's form.
    pub key: Vec<u8>,
    pub hashes: Vec<[u8; 32]>,
    pub sig: Vec<u8>,
}

impl Cert {
    /// What the signature covers.
    pub fn digest(hashes: &[[u8; 32]]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"storemesh batch certificate v1");
        h.update((hashes.len() as u64).to_le_bytes());
        for x in hashes {
            h.update(x);
        }
        h.finalize().into()
    }

    /// Signs `hashes` (sorted and de-duplicated here).
    pub fn make(signer: &dyn ChangeSigner, mut hashes: Vec<[u8; 32]>) -> Cert {
        hashes.sort_unstable();
        hashes.dedup();
        let sig = signer.sign(&Self::digest(&hashes));
        Cert {
            key: signer.public_key().to_vec(),
            hashes,
            sig,
        }
    }

    pub fn id(&self) -> CertId {
        let mut h = Sha256::new();
        h.update(&self.key);
        h.update(Self::digest(&self.hashes));
        h.finalize().into()
    }

    /// Bytes it takes on the wire and, roughly, in memory.
    pub fn bytes(&self) -> usize {
        self.key.len() + self.sig.len() + self.hashes.len() * 32 + 24
    }

    /// Sizes within the limits, hashes sorted (as signed).
    pub fn well_formed(&self) -> bool {
        self.key.len() <= SIG_KEY_BYTES_MAX
            && self.sig.len() <= SIG_BYTES_MAX
            && !self.hashes.is_empty()
            && self.hashes.len() <= CERT_HASHES_MAX
            && self.hashes.windows(2).all(|w| w[0] < w[1])
    }

    /// The signer, if the signature holds.
    pub fn verify(&self, verifier: &dyn ChangeVerifier) -> Option<NodeId> {
        let node = verifier.node_id(&self.key)?;
        verifier
            .verify(&self.key, &Self::digest(&self.hashes), &self.sig)
            .then_some(node)
    }
}

/// Certifies every change in `chunk` (change chunks or a bundle) with
/// `signer`: what a node that wrote them sends ahead of them (tests and the
/// simulator's hostile node build their frames with it).
pub fn certify_chunk(signer: &dyn ChangeSigner, chunk: &[u8]) -> Result<Cert, String> {
    let (hashes, _) = crate::validate::chunk_change_hashes(chunk)?;
    Ok(Cert::make(signer, hashes))
}

/// Why a change is refused before it is validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SigRefusal {
    pub reason: &'static str,
    pub detail: String,
}

/// The tag a change's actor id names (the first bytes of the actor).
pub fn actor_tag(actor: &[u8]) -> Option<NodeTag> {
    let b: [u8; NODE_TAG_BYTES] = actor.get(..NODE_TAG_BYTES)?.try_into().ok()?;
    Some(NodeTag(b))
}

/// An introduction: node `by` (the holder of `by_key`) admits `member` to
/// the chain. Made by a node for each of its configured peers (what
/// `storemesh peer add` writes) and sent with the certificates of the
/// member's changes, so that nodes that never peered with the member (a
/// store behind a hub) accept it. It binds no name and no location: an
/// introduced member owns only its own keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Introduction {
    pub member: [u8; 32],
    pub by_key: Vec<u8>,
    pub sig: Vec<u8>,
}

/// What an introduction's signature covers.
pub fn introduction_digest(member: &NodeId) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"storemesh introduction v1");
    h.update(member.0);
    h.finalize().into()
}

impl Introduction {
    pub fn make(signer: &dyn ChangeSigner, member: NodeId) -> Introduction {
        Introduction {
            member: member.0,
            by_key: signer.public_key().to_vec(),
            sig: signer.sign(&introduction_digest(&member)),
        }
    }

    /// The introducer, if the signature holds.
    pub fn verify(&self, verifier: &dyn ChangeVerifier) -> Option<NodeId> {
        let by = verifier.node_id(&self.by_key)?;
        verifier
            .verify(
                &self.by_key,
                &introduction_digest(&NodeId(self.member)),
                &self.sig,
            )
            .then_some(by)
    }
}

/// The nodes whose changes this node accepts.
#[derive(Clone, Debug, Default)]
pub struct Membership {
    own: Option<NodeId>,
    configured: BTreeSet<NodeId>,
    /// Verified introductions: introducer → introduced.
    introductions: BTreeMap<NodeId, BTreeSet<NodeId>>,
    /// The closure: own, configured, and introduced by an accepted node.
    accepted: BTreeSet<NodeId>,
}

impl Membership {
    pub fn set_own(&mut self, id: NodeId) {
        self.own = Some(id);
        self.recompute();
    }

    pub fn add_configured(&mut self, id: NodeId) {
        self.configured.insert(id);
        self.recompute();
    }

    pub fn configured(&self) -> &BTreeSet<NodeId> {
        &self.configured
    }

    /// Records `by`'s introduction of `member` (its signature verified).
    /// Returns whether it was new.
    pub fn add_introduction(&mut self, by: NodeId, member: NodeId) -> bool {
        let total: usize = self.introductions.values().map(BTreeSet::len).sum();
        if total >= INTRODUCED_MAX {
            return false;
        }
        let new = self.introductions.entry(by).or_default().insert(member);
        if new {
            self.recompute();
        }
        new
    }

    pub fn accepts(&self, id: &NodeId) -> bool {
        self.accepted.contains(id)
    }

    pub fn accepted(&self) -> &BTreeSet<NodeId> {
        &self.accepted
    }

    fn recompute(&mut self) {
        let mut acc: BTreeSet<NodeId> = self.configured.clone();
        acc.extend(self.own);
        loop {
            let before = acc.len();
            for (by, members) in &self.introductions {
                if acc.contains(by) {
                    acc.extend(members.iter().copied());
                }
            }
            if acc.len() == before {
                break;
            }
        }
        self.accepted = acc;
    }
}

/// This node's signer and the verifier of its peers' signatures.
pub(crate) struct Signing {
    pub signer: Box<dyn ChangeSigner>,
    pub verifier: Box<dyn ChangeVerifier>,
}

/// A deterministic signature scheme for the simulator and the in-memory test
/// mesh: a node's public key is its node id, its secret is derived from a
/// seed and the id, and a signature is HMAC-SHA256(secret, digest). Only the
/// node's own signer holds its secret; the verifier is the simulated world's
/// oracle, which knows every secret (as a real verifier knows every public
/// key). It models what the checks need — no node can sign as another —
/// while keeping every run of a seed byte-for-byte reproducible, which
/// ECDSA's random nonces would not.
#[derive(Clone, Debug)]
pub struct KeyedHashScheme {
    seed: [u8; 32],
}

type HmacSha256 = Hmac<Sha256>;

impl KeyedHashScheme {
    pub fn new(seed: [u8; 32]) -> KeyedHashScheme {
        KeyedHashScheme { seed }
    }

    fn secret(&self, id: &NodeId) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"storemesh keyed-hash test scheme");
        h.update(self.seed);
        h.update(id.0);
        h.finalize().into()
    }

    fn mac(&self, id: &NodeId, digest: &[u8; 32]) -> Vec<u8> {
        let mut m = HmacSha256::new_from_slice(&self.secret(id)).expect("any key length");
        m.update(digest);
        m.finalize().into_bytes().to_vec()
    }

    /// The signer of node `id` (holds only that node's secret).
    pub fn signer(&self, id: NodeId) -> KeyedHashSigner {
        KeyedHashSigner {
            scheme: self.clone(),
            id,
        }
    }
}

pub struct KeyedHashSigner {
    scheme: KeyedHashScheme,
    id: NodeId,
}

impl ChangeSigner for KeyedHashSigner {
    fn public_key(&self) -> &[u8] {
        &self.id.0
    }

    fn sign(&self, digest: &[u8; 32]) -> Vec<u8> {
        self.scheme.mac(&self.id, digest)
    }
}

impl ChangeVerifier for KeyedHashScheme {
    fn node_id(&self, public_key: &[u8]) -> Option<NodeId> {
        Some(NodeId(public_key.try_into().ok()?))
    }

    fn verify(&self, public_key: &[u8], digest: &[u8; 32], sig: &[u8]) -> bool {
        let Some(id) = self.node_id(public_key) else {
            return false;
        };
        let mut m = HmacSha256::new_from_slice(&self.secret(&id)).expect("any key length");
        m.update(digest);
        m.verify_slice(sig).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> NodeId {
        NodeId([b; 32])
    }

    #[test]
    fn a_certificate_verifies_only_with_its_signers_key_and_hashes() {
        let scheme = KeyedHashScheme::new([7; 32]);
        let s2 = scheme.signer(id(2));
        let c = Cert::make(&s2, vec![[9u8; 32], [3u8; 32], [9u8; 32]]);
        assert!(c.well_formed(), "sorted, de-duplicated");
        assert_eq!(c.hashes.len(), 2);
        assert_eq!(c.verify(&scheme), Some(id(2)));
        let mut more = c.clone();
        more.hashes.push([10u8; 32]);
        assert_eq!(more.verify(&scheme), None, "a hash added");
        let mut other = c.clone();
        other.key = id(1).0.to_vec();
        assert_eq!(other.verify(&scheme), None, "another node's key");
        assert_ne!(c.id(), other.id());
    }

    #[test]
    fn introductions_chain_only_from_accepted_nodes() {
        let mut m = Membership::default();
        m.set_own(id(1));
        m.add_configured(id(2));
        m.add_introduction(id(9), id(4));
        assert!(!m.accepts(&id(4)));
        m.add_introduction(id(2), id(3));
        assert!(m.accepts(&id(3)));
        m.add_introduction(id(3), id(9));
        assert!(m.accepts(&id(9)) && m.accepts(&id(4)), "chains follow");
    }
}
