//! Certificates and introductions between nodes: sent ahead of the frames
//! that carry their changes, received and held, checked once per
//! certificate when a change needs them.

use std::collections::BTreeSet;

use crate::engine::Engine;
use crate::ids::NodeId;
use crate::signing::book::ChunkCerts;
use crate::signing::{
    actor_tag, Cert, CertId, Introduction, SigRefusal, CERTS_FRAME_BYTES_MAX, CERTS_PER_FRAME_MAX,
    CERT_RESEND_FLUSHES, INTROS_PER_FRAME_MAX, REJECT_BAD_SIGNATURE, REJECT_UNKNOWN_AUTHOR,
    SIG_BYTES_MAX, SIG_KEY_BYTES_MAX,
};

impl Engine {
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
