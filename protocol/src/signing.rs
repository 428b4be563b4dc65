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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::Engine;
use crate::ids::{NodeId, NodeTag, NODE_TAG_BYTES};

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

/// A certificate received ahead of its changes.
struct PendingCert {
    cert: Cert,
    /// `None` until one of its changes needs it; then whether it held (the
    /// signer).
    checked: Option<Option<NodeId>>,
    /// The batch number it arrived in (dropped `PENDING_FLUSHES_MAX` later).
    at_flush: u64,
}

/// A certificate of changes of live documents, held in memory.
struct HeldCert {
    cert: Cert,
    /// Live documents it is linked to; dropped at 0.
    docs: u32,
}

/// The certificates a node holds and the ones it received ahead of their
/// changes. Memory: only certificates linked to documents that are live
/// here (not cooled, not retired) and that this process made or received;
/// everything else is in the archive (redb).
#[derive(Default)]
pub(crate) struct CertBook {
    held: HashMap<CertId, HeldCert>,
    /// `Cert::bytes` of everything in `held`.
    held_bytes: usize,
    by_doc: HashMap<String, Vec<CertId>>,
    pending: HashMap<CertId, PendingCert>,
    pending_hashes: HashMap<[u8; 32], CertId>,
    /// Own changes committed since the last flush (document, hash).
    own_new: Vec<(String, [u8; 32])>,
    /// Peers sent a message with some of `own_new` in this batch, and the
    /// outbox position of the first: the batch's certificate goes there.
    await_own: Vec<(NodeId, usize)>,
    /// Certificates and links new since the last flush: persisted with it.
    unsaved: Vec<Cert>,
    unsaved_links: Vec<(String, CertId)>,
    /// Certificates of each document's changes new since the last flush,
    /// for the pushes after its commit (`committing` once flushed).
    to_push: BTreeMap<String, BTreeSet<CertId>>,
    committing: BTreeMap<String, BTreeSet<CertId>>,
    committing_certs: HashMap<CertId, Cert>,
    /// Certificates queued to a peer over its current connection, with the
    /// batch number they went out in (see `CERT_RESEND_FLUSHES`).
    sent: HashMap<(NodeId, CertId), u64>,
    /// Introductions sent to a peer over its current connection.
    intro_sent: HashSet<(NodeId, NodeId)>,
    /// Verified introductions held, by member (own ones included).
    intros: BTreeMap<NodeId, Vec<(NodeId, Introduction)>>,
    unsaved_intros: Vec<Introduction>,
    flushes: u64,
    archive: Option<Box<dyn CertArchive>>,
}

impl CertBook {
    fn link(&mut self, doc: &str, cert: &Cert, id: CertId) -> bool {
        let list = self.by_doc.entry(doc.to_string()).or_default();
        if list.contains(&id) {
            return false;
        }
        list.push(id);
        let bytes = &mut self.held_bytes;
        self.held
            .entry(id)
            .or_insert_with(|| {
                *bytes += cert.bytes();
                HeldCert {
                    cert: cert.clone(),
                    docs: 0,
                }
            })
            .docs += 1;
        true
    }

    /// Drops a document's certificates from memory (they stay stored).
    fn forget_doc(&mut self, doc: &str) {
        for id in self.by_doc.remove(doc).unwrap_or_default() {
            if let Some(h) = self.held.get_mut(&id) {
                h.docs = h.docs.saturating_sub(1);
                if h.docs == 0 {
                    if let Some(h) = self.held.remove(&id) {
                        self.held_bytes = self.held_bytes.saturating_sub(h.cert.bytes());
                    }
                }
            }
        }
    }

    fn hold_pending(&mut self, cert: Cert) {
        let id = cert.id();
        if let Some(p) = self.pending.get_mut(&id) {
            p.at_flush = self.flushes;
            return;
        }
        if self.pending_hashes.len() + cert.hashes.len() > PENDING_HASHES_MAX {
            self.pending.clear();
            self.pending_hashes.clear();
        }
        for h in &cert.hashes {
            self.pending_hashes.insert(*h, id);
        }
        self.pending.insert(
            id,
            PendingCert {
                cert,
                checked: None,
                at_flush: self.flushes,
            },
        );
    }

    fn expire_pending(&mut self) {
        let now = self.flushes;
        let old: Vec<CertId> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_sub(p.at_flush) > PENDING_FLUSHES_MAX)
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            if let Some(p) = self.pending.remove(&id) {
                for h in p.cert.hashes {
                    if self.pending_hashes.get(&h) == Some(&id) {
                        self.pending_hashes.remove(&h);
                    }
                }
            }
        }
    }

    /// Holds a verified introduction of `member` by `by`; whether it is new.
    fn add_intro(&mut self, by: NodeId, intro: Introduction) -> bool {
        let member = NodeId(intro.member);
        let held: usize = self.intros.values().map(Vec::len).sum();
        let list = self.intros.entry(member).or_default();
        if list.iter().any(|(b, _)| *b == by) || held >= INTRODUCED_MAX {
            return false;
        }
        list.push((by, intro));
        true
    }

    /// The introductions that chain `signers` to their introducers (each
    /// member's, then its introducers', a few levels up).
    fn intros_for(&self, signers: &BTreeSet<NodeId>) -> Vec<Introduction> {
        let mut out = Vec::new();
        let mut seen: BTreeSet<NodeId> = BTreeSet::new();
        let mut todo: Vec<NodeId> = signers.iter().copied().collect();
        while let Some(m) = todo.pop() {
            if !seen.insert(m) || out.len() >= INTROS_PER_FRAME_MAX {
                continue;
            }
            for (by, i) in self.intros.get(&m).into_iter().flatten() {
                if out.len() < INTROS_PER_FRAME_MAX {
                    out.push(i.clone());
                    todo.push(*by);
                }
            }
        }
        out
    }
}

/// The certificates a sync message needs (`Engine::chunk_certs`).
#[derive(Default)]
pub(crate) struct ChunkCerts {
    certs: Vec<Cert>,
    /// It carries changes of this batch, certified only at the flush.
    own_pending: bool,
}

/// Figures of the certificate book (metrics, tests, README).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CertFigures {
    /// Certificates held in memory, and their bytes.
    pub held: usize,
    pub held_bytes: usize,
    /// Documents whose certificates are in memory.
    pub docs: usize,
    /// Certificates received ahead of their changes.
    pub pending: usize,
    pub pending_hashes: usize,
}

impl Engine {
    /// Signs this node's changes with `signer` and verifies every peer's
    /// change with `verifier` from now on (unsigned changes are refused).
    pub fn set_signing(
        &mut self,
        signer: Box<dyn ChangeSigner>,
        verifier: Box<dyn ChangeVerifier>,
    ) {
        let own = verifier.node_id(signer.public_key());
        assert_eq!(
            own,
            Some(self.cfg.node_id),
            "the signing key must be this node's identity key"
        );
        self.signing = Some(Signing { signer, verifier });
        let configured: Vec<NodeId> = self.members.configured().iter().copied().collect();
        for id in configured {
            self.introduce(id);
        }
    }

    /// Where certificates no longer in memory are read from.
    pub fn set_cert_archive(&mut self, archive: Box<dyn CertArchive>) {
        self.certs.archive = Some(archive);
    }

    /// Whether changes are signed and verified.
    pub fn signs(&self) -> bool {
        self.signing.is_some()
    }

    /// The nodes whose changes this node accepts.
    pub fn members(&self) -> &Membership {
        &self.members
    }

    pub fn cert_figures(&self) -> CertFigures {
        CertFigures {
            held: self.certs.held.len(),
            held_bytes: self.certs.held_bytes,
            docs: self.certs.by_doc.len(),
            pending: self.certs.pending.len(),
            pending_hashes: self.certs.pending_hashes.len(),
        }
    }

    /// Registers a configured peer as a member (and introduces it).
    pub(crate) fn admit_configured(&mut self, id: NodeId) {
        self.members.add_configured(id);
        self.introduce(id);
    }

    /// Signs this node's introduction of a configured peer (kept in memory:
    /// made again at every start from the configuration).
    fn introduce(&mut self, member: NodeId) {
        let Some(signing) = &self.signing else {
            return;
        };
        let intro = Introduction::make(signing.signer.as_ref(), member);
        self.certs.add_intro(self.cfg.node_id, intro);
    }

    /// Stored introductions by other nodes, loaded at start-up.
    pub fn load_intros(&mut self, intros: Vec<Introduction>) {
        let Some(signing) = &self.signing else {
            return;
        };
        let mut ok = Vec::new();
        for i in intros {
            if let Some(by) = i.verify(signing.verifier.as_ref()) {
                ok.push((by, i));
            }
        }
        for (by, i) in ok {
            let member = NodeId(i.member);
            if self.certs.add_intro(by, i) {
                self.members.add_introduction(by, member);
            }
        }
    }

    /// Certificates linked to documents, loaded into memory (the in-memory
    /// test mesh's copy of a node; the node reads them on demand instead).
    pub fn load_certs(&mut self, certs: Vec<(String, Cert)>) {
        for (doc, c) in certs {
            let id = c.id();
            self.certs.link(&doc, &c, id);
        }
    }

    /// Every certificate held in memory with its documents (what a copy of
    /// this node's data directory holds, for the in-memory test mesh).
    pub fn held_certs(&self) -> Vec<(String, Cert)> {
        let mut out = Vec::new();
        for (doc, ids) in &self.certs.by_doc {
            for id in ids {
                if let Some(h) = self.certs.held.get(id) {
                    out.push((doc.clone(), h.cert.clone()));
                }
            }
        }
        out
    }

    /// Certifies every change of this node's own (its tag, any incarnation)
    /// in the documents held that no certificate in memory or in the archive
    /// lists: history written before signing existed (protocol < 7). Run once
    /// at the upgrade; the certificates are stored with the next batch.
    /// Returns how many changes it certified.
    pub fn certify_own_history(&mut self) -> usize {
        let Some(signing) = &self.signing else {
            return 0;
        };
        let mut total = 0;
        let ids: Vec<String> = self.docs.keys().cloned().collect();
        let mut new: Vec<(String, Cert)> = Vec::new();
        for id in ids {
            let known: HashSet<[u8; 32]> = self
                .doc_certs_all(&id)
                .into_iter()
                .flat_map(|c| c.hashes)
                .collect();
            let Some(slot) = self.docs.get(&id) else {
                continue;
            };
            let own: Vec<[u8; 32]> = slot
                .doc
                .get_changes(&[])
                .into_iter()
                .filter(|c| actor_tag(c.actor_id().to_bytes()) == Some(self.tag))
                .map(|c| c.hash().0)
                .filter(|h| !known.contains(h))
                .collect();
            for part in own.chunks(CERT_HASHES_MAX) {
                total += part.len();
                new.push((
                    id.clone(),
                    Cert::make(signing.signer.as_ref(), part.to_vec()),
                ));
            }
        }
        for (doc, c) in new {
            let cid = c.id();
            self.certs.link(&doc, &c, cid);
            self.certs.unsaved.push(c);
            self.certs.unsaved_links.push((doc, cid));
        }
        total
    }

    /// Notes a change this node just committed (certified at the flush).
    pub(crate) fn note_own_change(&mut self, doc: &str, hash: Option<automerge::ChangeHash>) {
        if let (Some(h), true) = (hash, self.signing.is_some()) {
            self.certs.own_new.push((doc.to_string(), h.0));
        }
    }

    /// At the end of `flush`: one certificate over every change this batch
    /// made (several only past `CERT_HASHES_MAX`), and what to persist.
    pub(crate) fn certify_batch(&mut self, batch: &mut crate::engine::Batch) {
        self.certs.flushes += 1;
        if self.certs.flushes.is_multiple_of(16) {
            self.certs.expire_pending();
        }
        let mut own_certs = Vec::new();
        if let Some(signing) = &self.signing {
            let own = std::mem::take(&mut self.certs.own_new);
            for part in own.chunks(CERT_HASHES_MAX) {
                let c = Cert::make(
                    signing.signer.as_ref(),
                    part.iter().map(|(_, h)| *h).collect(),
                );
                let id = c.id();
                let docs: BTreeSet<&str> = part.iter().map(|(d, _)| d.as_str()).collect();
                for d in docs {
                    // A document retired in this batch keeps nothing.
                    if !self.docs.contains_key(d) {
                        continue;
                    }
                    self.certs.link(d, &c, id);
                    self.certs.unsaved_links.push((d.to_string(), id));
                    self.certs
                        .to_push
                        .entry(d.to_string())
                        .or_default()
                        .insert(id);
                }
                own_certs.push(c.clone());
                self.certs.unsaved.push(c);
            }
        }
        // Messages queued in this batch that carry its own changes: the
        // certificate goes just ahead of the first one to each peer (last
        // positions first, so earlier ones stay valid).
        let mut awaiting = std::mem::take(&mut self.certs.await_own);
        awaiting.sort_by_key(|(_, pos)| std::cmp::Reverse(*pos));
        for (peer, pos) in awaiting {
            if own_certs.is_empty() {
                break;
            }
            let msg = crate::sync::Msg::Certs {
                certs: own_certs.clone(),
                intros: Vec::new(),
            };
            match crate::wire::encode_frame(&msg) {
                Ok(f) => {
                    self.stats.sync_messages_out += 1;
                    self.stats.sync_bytes_out += f.len() as u64;
                    if let Some(b) = self.stats.sync_bytes_out_by_kind.get_mut(msg.kind_index()) {
                        *b += f.len() as u64;
                    }
                    for c in &own_certs {
                        self.certs.sent.insert((peer, c.id()), self.certs.flushes);
                    }
                    let at = pos.min(self.outbox.len());
                    self.outbox.insert(at, (peer, f));
                }
                Err(e) => tracing::error!(error = %e, "cannot encode a certificate frame"),
            }
        }
        batch.certs = std::mem::take(&mut self.certs.unsaved);
        batch.cert_links = std::mem::take(&mut self.certs.unsaved_links);
        batch.intros = std::mem::take(&mut self.certs.unsaved_intros);
        self.certs.committing = std::mem::take(&mut self.certs.to_push);
        let mut certs = HashMap::new();
        for id in self.certs.committing.values().flatten() {
            if let Some(h) = self.certs.held.get(id) {
                certs.entry(*id).or_insert_with(|| h.cert.clone());
            }
        }
        self.certs.committing_certs = certs;
        if self.certs.sent.len() > SENT_MAX {
            self.certs.sent.clear();
        }
    }

    /// A document left memory for good or went cold: its certificates stay
    /// stored (when there is an archive to read them back from) and leave
    /// memory.
    pub(crate) fn forget_doc_certs(&mut self, doc: &str, retired: bool) {
        if retired || self.certs.archive.is_some() {
            self.certs.forget_doc(doc);
        }
        if retired {
            self.certs.unsaved_links.retain(|(d, _)| d != doc);
            self.certs.to_push.remove(doc);
        }
    }

    /// This engine replaces `old`, reopened from storage after a failed
    /// commit while the connections stay up (`NodeLoop::replace_engine`).
    /// Peers send a certificate, and an introduction, once per connection:
    /// they will not send again what `old` received over those connections.
    /// So the certificates `old` held ahead of their changes move here (they
    /// are verified when a change needs them, as on receipt), and so do the
    /// introductions it verified (stored with the next batch: the failed one
    /// may have held them).
    pub(crate) fn adopt_received_certs(&mut self, old: &mut Engine) {
        if self.signing.is_none() {
            return;
        }
        let mut pending: Vec<PendingCert> = std::mem::take(&mut old.certs.pending)
            .into_values()
            .collect();
        // Oldest first, so that a bounded book keeps the newest.
        pending.sort_by_key(|p| p.at_flush);
        for p in pending {
            self.certs.hold_pending(p.cert);
        }
        let own = self.cfg.node_id;
        for (member, list) in std::mem::take(&mut old.certs.intros) {
            for (by, intro) in list {
                if by == own {
                    // Made again from the configuration at every start.
                    continue;
                }
                if self.certs.add_intro(by, intro.clone()) {
                    self.members.add_introduction(by, member);
                    self.certs.unsaved_intros.push(intro);
                }
            }
        }
    }

    /// A peer's connection is up: introductions go to it again.
    pub(crate) fn certs_peer_up(&mut self, peer: NodeId) {
        self.certs.intro_sent.retain(|(p, _)| *p != peer);
        self.certs.sent.retain(|(p, _), _| *p != peer);
    }

    /// Every certificate of a document: in memory and in the archive.
    fn doc_certs_all(&self, doc: &str) -> Vec<Cert> {
        let mut seen: HashSet<CertId> = HashSet::new();
        let mut out = Vec::new();
        for id in self.certs.by_doc.get(doc).into_iter().flatten() {
            if let Some(h) = self.certs.held.get(id) {
                if seen.insert(*id) {
                    out.push(h.cert.clone());
                }
            }
        }
        if let Some(a) = &self.certs.archive {
            for c in a.doc_certs(doc) {
                if seen.insert(c.id()) {
                    out.push(c);
                }
            }
        }
        out
    }

    /// The certificates covering `hashes` of `doc` (`None`: every one of the
    /// document, for a whole-document chunk): memory first, the archive only
    /// for what memory lacks.
    fn certs_covering(&self, doc: &str, hashes: Option<&[[u8; 32]]>) -> Vec<Cert> {
        let Some(hashes) = hashes else {
            return self.doc_certs_all(doc);
        };
        let mut missing: HashSet<[u8; 32]> = hashes.iter().copied().collect();
        let mut out = Vec::new();
        let pick = |c: &Cert, missing: &mut HashSet<[u8; 32]>, out: &mut Vec<Cert>| {
            if c.hashes.iter().any(|h| missing.contains(h)) {
                for h in &c.hashes {
                    missing.remove(h);
                }
                out.push(c.clone());
            }
        };
        for id in self.certs.by_doc.get(doc).into_iter().flatten() {
            if missing.is_empty() {
                break;
            }
            if let Some(h) = self.certs.held.get(id) {
                pick(&h.cert, &mut missing, &mut out);
            }
        }
        if !missing.is_empty() {
            if let Some(a) = &self.certs.archive {
                for c in a.doc_certs(doc) {
                    if missing.is_empty() {
                        break;
                    }
                    pick(&c, &mut missing, &mut out);
                }
            }
        }
        out
    }

    /// Queues `certs` for `peer` (several frames when large), with the
    /// introductions of their signers it was not sent yet on this connection.
    pub(crate) fn send_certs(&mut self, peer: NodeId, certs: Vec<Cert>) {
        let Some(signing) = &self.signing else {
            return;
        };
        // A batch's certificate covers all its documents, whose messages go
        // out one after the other: each certificate once per peer, and again
        // only `CERT_RESEND_FLUSHES` batches later (the peer may have dropped
        // it meanwhile).
        let now = self.certs.flushes;
        let certs: Vec<Cert> = certs
            .into_iter()
            .filter(|c| {
                let at = self.certs.sent.entry((peer, c.id())).or_insert(u64::MAX);
                let due = *at == u64::MAX || now.saturating_sub(*at) > CERT_RESEND_FLUSHES;
                if due {
                    *at = now;
                }
                due
            })
            .collect();
        if certs.is_empty() {
            return;
        }
        // The peer knows itself and us; anyone else it may not.
        let signers: BTreeSet<NodeId> = certs
            .iter()
            .filter_map(|c| signing.verifier.node_id(&c.key))
            .filter(|id| *id != peer && *id != self.cfg.node_id)
            .filter(|id| !self.certs.intro_sent.contains(&(peer, *id)))
            .collect();
        let mut intros = self.certs.intros_for(&signers);
        for s in signers {
            self.certs.intro_sent.insert((peer, s));
        }
        let mut frame: Vec<Cert> = Vec::new();
        let mut bytes = 0;
        for c in certs {
            let b = c.bytes();
            if !frame.is_empty()
                && (bytes + b > CERTS_FRAME_BYTES_MAX || frame.len() >= CERTS_PER_FRAME_MAX)
            {
                let certs = std::mem::take(&mut frame);
                let intros = std::mem::take(&mut intros);
                self.send(peer, &crate::sync::Msg::Certs { certs, intros });
                bytes = 0;
            }
            bytes += b;
            frame.push(c);
        }
        self.send(
            peer,
            &crate::sync::Msg::Certs {
                certs: frame,
                intros,
            },
        );
    }

    /// Before a push of `doc`'s new changes to `targets`: the certificates
    /// of those changes, each sent once per peer per round of pushes (a
    /// batch's certificate covers all its documents).
    pub(crate) fn send_push_certs(&mut self, targets: &[NodeId], doc: &str) {
        if self.signing.is_none() {
            return;
        }
        let ids: Vec<CertId> = self
            .certs
            .committing
            .get(doc)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        if ids.is_empty() {
            return;
        }
        for p in targets {
            let certs: Vec<Cert> = ids
                .iter()
                .filter(|id| !self.certs.sent.contains_key(&(*p, **id)))
                .filter_map(|id| self.certs.committing_certs.get(id).cloned())
                .collect();
            self.send_certs(*p, certs);
        }
    }

    /// The certificates of the changes in `chunks` of `doc` (a sync message
    /// or fallback about to be sent; every certificate of the document for a
    /// whole-document chunk). Sent with [`Engine::send_chunk_certs`] just
    /// before the message.
    pub(crate) fn chunk_certs(&self, doc: &str, chunks: &[&[u8]]) -> ChunkCerts {
        if self.signing.is_none() {
            return ChunkCerts::default();
        }
        let mut hashes = Vec::new();
        let mut whole_doc = false;
        for c in chunks {
            match crate::validate::chunk_change_hashes(c) {
                Ok((hs, whole)) => {
                    hashes.extend(hs);
                    whole_doc |= whole;
                }
                Err(e) => {
                    tracing::error!(doc, error = %e, "cannot list the changes of an outgoing chunk")
                }
            }
        }
        if hashes.is_empty() && !whole_doc {
            return ChunkCerts::default();
        }
        // This batch's own changes (committed before a peer's changes were
        // merged) are certified only at the flush.
        let own_pending = self
            .certs
            .own_new
            .iter()
            .any(|(d, h)| d == doc && (whole_doc || hashes.contains(h)));
        ChunkCerts {
            certs: self.certs_covering(doc, (!whole_doc).then_some(&hashes[..])),
            own_pending,
        }
    }

    /// Sends what [`Engine::chunk_certs`] found; if the message carries this
    /// batch's own changes, the batch's certificate is put ahead of it at
    /// the flush (frames leave only after the commit).
    pub(crate) fn send_chunk_certs(&mut self, peer: NodeId, c: ChunkCerts) {
        self.send_certs(peer, c.certs);
        if c.own_pending && !self.certs.await_own.iter().any(|(p, _)| *p == peer) {
            self.certs.await_own.push((peer, self.outbox.len()));
        }
    }

    /// A `Msg::Certs` frame: introductions verified and kept, certificates
    /// held (unverified) until one of their changes arrives.
    pub(crate) fn on_certs(
        &mut self,
        peer: NodeId,
        certs: Vec<Cert>,
        intros: Vec<Introduction>,
    ) -> Result<(), String> {
        if certs.len() > CERTS_PER_FRAME_MAX || intros.len() > INTROS_PER_FRAME_MAX {
            return Err("certificate frame over the limit".into());
        }
        for i in &intros {
            if i.by_key.len() > SIG_KEY_BYTES_MAX || i.sig.len() > SIG_BYTES_MAX {
                return Err("malformed introduction".into());
            }
        }
        if certs.iter().any(|c| !c.well_formed()) {
            return Err("malformed certificate".into());
        }
        if self.signing.is_none() {
            return Ok(());
        }
        for i in intros {
            self.receive_intro(peer, i);
        }
        for c in certs {
            self.certs.hold_pending(c);
        }
        Ok(())
    }

    /// A peer's introduction: kept (and the member accepted once its
    /// introducer is) if its signature holds; refused and counted if not.
    fn receive_intro(&mut self, peer: NodeId, intro: Introduction) {
        let Some(signing) = &self.signing else {
            return;
        };
        let member = NodeId(intro.member);
        if self
            .certs
            .intros
            .get(&member)
            .is_some_and(|l| l.iter().any(|(_, i)| *i == intro))
        {
            return;
        }
        let Some(by) = intro.verify(signing.verifier.as_ref()) else {
            let reason = REJECT_BAD_SIGNATURE;
            self.stats.rejected_messages += 1;
            *self.stats.rejected_by_reason.entry(reason).or_default() += 1;
            tracing::warn!(peer = %peer.hex(), reason, "refused an introduction whose signature does not hold");
            return;
        };
        if self.certs.add_intro(by, intro.clone()) {
            self.members.add_introduction(by, member);
            self.certs.unsaved_intros.push(intro);
        }
    }

    /// Checks one new change against the certificates received: listed by a
    /// certificate whose signature holds, signed by the node its actor
    /// names, a member here. Verifies each certificate at most once.
    fn check_change(&mut self, actor: &[u8], hash: &[u8; 32]) -> Result<CertId, SigRefusal> {
        let bad = |detail: String| SigRefusal {
            reason: REJECT_BAD_SIGNATURE,
            detail,
        };
        let Some(signing) = &self.signing else {
            return Err(bad("not signing".into()));
        };
        let Some(id) = self.certs.pending_hashes.get(hash).copied() else {
            return Err(bad(format!(
                "change {} arrived without a certificate",
                hex::encode(&hash[..8])
            )));
        };
        let Some(p) = self.certs.pending.get_mut(&id) else {
            return Err(bad("certificate dropped".into()));
        };
        let signer = match p.checked {
            Some(s) => s,
            None => {
                let s = p.cert.verify(signing.verifier.as_ref());
                p.checked = Some(s);
                self.stats.certs_verified += 1;
                s
            }
        };
        let Some(node) = signer else {
            let key_node = signing.verifier.node_id(&p.cert.key);
            return Err(bad(match key_node {
                Some(n) => format!(
                    "certificate by {} does not verify for change {}",
                    n.tag().hex(),
                    hex::encode(&hash[..8])
                ),
                None => "certificate key is not a node key".into(),
            }));
        };
        if actor_tag(actor) != Some(node.tag()) {
            return Err(bad(format!(
                "change signed by node {} but written with another node's actor id",
                node.tag().hex()
            )));
        }
        if !self.members.accepts(&node) {
            return Err(SigRefusal {
                reason: REJECT_UNKNOWN_AUTHOR,
                detail: format!("author {} is not a member here", node.tag().hex()),
            });
        }
        Ok(id)
    }

    /// Verifies every change in `changes` that `doc` does not hold yet.
    /// `Ok`: the certificates to link once the changes are applied. Skipped
    /// when this engine does not sign (single-engine tests, benchmarks).
    pub(crate) fn verify_certified(
        &mut self,
        doc: &str,
        changes: &[automerge::Change],
    ) -> Result<BTreeSet<CertId>, SigRefusal> {
        if self.signing.is_none() {
            return Ok(BTreeSet::new());
        }
        let mut out = BTreeSet::new();
        for c in changes {
            let h = c.hash();
            let held = self
                .docs
                .get(doc)
                .is_some_and(|s| automerge::ReadDoc::get_change_by_hash(&*s.doc, &h).is_some());
            if held {
                continue;
            }
            out.insert(self.check_change(c.actor_id().to_bytes(), &h.0)?);
        }
        Ok(out)
    }

    /// Links the certificates of changes just applied to their document
    /// (stored with the next batch, forwarded with its pushes).
    pub(crate) fn accept_certs(&mut self, doc: &str, ids: BTreeSet<CertId>) {
        for id in ids {
            let cert = match (self.certs.pending.get(&id), self.certs.held.get(&id)) {
                (Some(p), _) => p.cert.clone(),
                (None, Some(h)) => h.cert.clone(),
                (None, None) => continue,
            };
            let stored_before = self.certs.held.contains_key(&id);
            if self.certs.link(doc, &cert, id) {
                if !stored_before {
                    self.certs.unsaved.push(cert);
                }
                self.certs.unsaved_links.push((doc.to_string(), id));
            }
            self.certs
                .to_push
                .entry(doc.to_string())
                .or_default()
                .insert(id);
        }
    }

    /// Whether a change of an older ledger epoch (never applied, only read
    /// by `carry_late_changes`) is certified by its author, a member.
    pub(crate) fn late_change_certified(&mut self, c: &automerge::Change) -> bool {
        if self.signing.is_none() {
            return true;
        }
        let h = c.hash();
        match self.check_change(c.actor_id().to_bytes(), &h.0) {
            Ok(_) => true,
            Err(r) => {
                self.stats.rejected_messages += 1;
                *self.stats.rejected_by_reason.entry(r.reason).or_default() += 1;
                tracing::warn!(reason = r.reason, detail = %r.detail, "ignored a late change of an older epoch");
                false
            }
        }
    }
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
