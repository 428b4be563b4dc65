//! The certificate book: what a node holds in memory (certificates of its
//! live documents, certificates received ahead of their changes,
//! introductions) and its figures.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::{
    Cert, CertArchive, CertId, Introduction, INTRODUCED_MAX, INTROS_PER_FRAME_MAX,
    PENDING_FLUSHES_MAX, PENDING_HASHES_MAX,
};
use crate::ids::NodeId;

/// A certificate received ahead of its changes.
pub(crate) struct PendingCert {
    pub(crate) cert: Cert,
    /// `None` until one of its changes needs it; then whether it held (the
    /// signer).
    pub(crate) checked: Option<Option<NodeId>>,
    /// The batch number it arrived in (dropped `PENDING_FLUSHES_MAX` later).
    pub(crate) at_flush: u64,
}

/// A certificate of changes of live documents, held in memory.
pub(crate) struct HeldCert {
    pub(crate) cert: Cert,
    /// Live documents it is linked to; dropped at 0.
    pub(crate) docs: u32,
}

/// The certificates a node holds and the ones it received ahead of their
/// changes. Memory: only certificates linked to documents that are live
/// here (not cooled, not retired) and that this process made or received;
/// everything else is in the archive (redb).
#[derive(Default)]
pub(crate) struct CertBook {
    pub(crate) held: HashMap<CertId, HeldCert>,
    /// `Cert::bytes` of everything in `held`.
    pub(crate) held_bytes: usize,
    pub(crate) by_doc: HashMap<String, Vec<CertId>>,
    pub(crate) pending: HashMap<CertId, PendingCert>,
    pub(crate) pending_hashes: HashMap<[u8; 32], CertId>,
    /// Own changes committed since the last flush (document, hash).
    pub(crate) own_new: Vec<(String, [u8; 32])>,
    /// Peers sent a message with some of `own_new` in this batch, and the
    /// outbox position of the first: the batch's certificate goes there.
    pub(crate) await_own: Vec<(NodeId, usize)>,
    /// Certificates and links new since the last flush: persisted with it.
    pub(crate) unsaved: Vec<Cert>,
    pub(crate) unsaved_links: Vec<(String, CertId)>,
    /// Certificates of each document's changes new since the last flush,
    /// for the pushes after its commit (`committing` once flushed).
    pub(crate) to_push: BTreeMap<String, BTreeSet<CertId>>,
    pub(crate) committing: BTreeMap<String, BTreeSet<CertId>>,
    pub(crate) committing_certs: HashMap<CertId, Cert>,
    /// Certificates queued to a peer over its current connection, with the
    /// batch number they went out in (see `CERT_RESEND_FLUSHES`).
    pub(crate) sent: HashMap<(NodeId, CertId), u64>,
    /// Introductions sent to a peer over its current connection.
    pub(crate) intro_sent: HashSet<(NodeId, NodeId)>,
    /// Verified introductions held, by member (own ones included).
    pub(crate) intros: BTreeMap<NodeId, Vec<(NodeId, Introduction)>>,
    pub(crate) unsaved_intros: Vec<Introduction>,
    pub(crate) flushes: u64,
    pub(crate) archive: Option<Box<dyn CertArchive>>,
}

impl CertBook {
    /// Links a certificate to a document in memory; whether it was new.
    /// A certificate not held is in no document's list (`held` counts the
    /// lists holding each one), so only a held one is looked for — a batch's
    /// new certificate is linked to each of its documents without a scan of
    /// their lists, which grow by one certificate per batch.
    pub(crate) fn link(&mut self, doc: &str, cert: &Cert, id: CertId) -> bool {
        let known = self.held.contains_key(&id);
        let list = match self.by_doc.get_mut(doc) {
            Some(list) => list,
            None => self.by_doc.entry(doc.to_string()).or_default(),
        };
        if known && list.contains(&id) {
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
    pub(crate) fn forget_doc(&mut self, doc: &str) {
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

    pub(crate) fn hold_pending(&mut self, cert: Cert) {
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

    pub(crate) fn expire_pending(&mut self) {
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
    pub(crate) fn add_intro(&mut self, by: NodeId, intro: Introduction) -> bool {
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
    pub(crate) fn intros_for(&self, signers: &BTreeSet<NodeId>) -> Vec<Introduction> {
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
    pub(crate) certs: Vec<Cert>,
    /// It carries changes of this batch, certified only at the flush.
    pub(crate) own_pending: bool,
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
