//! A node's own side of signing: keys and membership at start-up, its
//! batches' certificates, what survives an engine reopened under live
//! connections, and the certificates it holds or reads back from the
//! archive.

use std::collections::{HashMap, HashSet};

use crate::engine::Engine;
use crate::ids::NodeId;
use crate::signing::book::{CertFigures, PendingCert};
use crate::signing::{
    actor_tag, Cert, CertArchive, CertId, ChangeSigner, ChangeVerifier, Introduction, Membership,
    Signing, CERT_HASHES_MAX, SENT_MAX,
};

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
    pub(super) fn introduce(&mut self, member: NodeId) {
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
                let mut docs: Vec<&String> = part.iter().map(|(d, _)| d).collect();
                docs.sort_unstable();
                docs.dedup();
                let pushes = !self.sessions.is_empty();
                for d in docs {
                    // A document retired in this batch keeps nothing.
                    if !self.docs.contains_key(d.as_str()) {
                        continue;
                    }
                    self.certs.link(d, &c, id);
                    self.certs.unsaved_links.push((d.clone(), id));
                    // Read only by the pushes after the commit (to peers
                    // with a session): kept only when there are some.
                    if pushes || self.certs.to_push.contains_key(d.as_str()) {
                        self.certs.to_push.entry(d.clone()).or_default().insert(id);
                    }
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
    pub(super) fn doc_certs_all(&self, doc: &str) -> Vec<Cert> {
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
    pub(super) fn certs_covering(&self, doc: &str, hashes: Option<&[[u8; 32]]>) -> Vec<Cert> {
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
}
