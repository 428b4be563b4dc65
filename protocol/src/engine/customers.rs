//! Customers: the customer key store (keys, pseudonyms, sealing personal
//! fields) and the customer operations (profile, loyalty, erasure,
//! redemption).

use automerge::ScalarValue;

use super::{xor32, Engine};
use crate::ids::{customer_bucket, CELL_MAX};
use crate::layout::{self, CustomerKey, DocId};
use crate::ops::{OpError, OpReply};
use crate::views::read_customer;

impl Engine {
    /// Loads the persisted key store (before `finish_open`).
    pub fn load_keys(&mut self, entries: Vec<(String, crate::crypto::KeyEntry)>) {
        for (c, e) in entries {
            self.set_key_entry(&c, e);
        }
    }

    /// Merges a key-store entry; returns true if it changed anything.
    pub(crate) fn set_key_entry(
        &mut self,
        customer: &str,
        incoming: crate::crypto::KeyEntry,
    ) -> bool {
        let merged = match self.keys.get(customer) {
            Some(old) => old.merge(&incoming),
            None => incoming,
        };
        if matches!(&merged, crate::crypto::KeyEntry::Keys(k) if k.len() > crate::crypto::KEYS_PER_CUSTOMER_MAX)
        {
            // Refused whole: keeping some would evict keys data is written under.
            *self
                .stats
                .rejected_by_reason
                .entry("key_limit")
                .or_default() += 1;
            tracing::warn!(
                "customer key entry would exceed {} keys; refused",
                crate::crypto::KEYS_PER_CUSTOMER_MAX
            );
            return false;
        }
        if self.keys.get(customer) == Some(&merged) {
            return false;
        }
        if let Some(old) = self.keys.get(customer) {
            let h = crate::sync::key_digest(customer, old);
            xor32(&mut self.keys_digest, &h);
            if let crate::crypto::KeyEntry::Keys(ks) = old {
                for k in ks {
                    self.views
                        .pseudonyms
                        .remove(&crate::crypto::customer_pseudonym(k, customer));
                }
            }
        }
        if let crate::crypto::KeyEntry::Keys(ks) = &merged {
            for k in ks {
                self.views.pseudonyms.insert(
                    crate::crypto::customer_pseudonym(k, customer),
                    customer.to_string(),
                );
            }
        }
        let h = crate::sync::key_digest(customer, &merged);
        xor32(&mut self.keys_digest, &h);
        self.keys.insert(customer.to_string(), merged);
        true
    }

    /// Records a key-store change for persistence and for the peers.
    pub(crate) fn key_changed(&mut self, customer: &str) {
        if let Some(e) = self.keys.get(customer) {
            self.pending_keys.insert(customer.to_string(), e.clone());
        }
    }

    /// The key new values of this customer are encrypted with (created on first use).
    fn customer_key(&mut self, customer: &str) -> Option<[u8; 32]> {
        match self.keys.get(customer) {
            Some(e) => e.current().copied(),
            None => {
                use sha2::{Digest, Sha256};
                self.nonce_counter += 1;
                let mut h = Sha256::new();
                h.update(self.entropy);
                h.update(b"customer-key");
                h.update(self.actor.0);
                h.update(self.nonce_counter.to_le_bytes());
                let key: [u8; 32] = h.finalize().into();
                self.set_key_entry(customer, crate::crypto::KeyEntry::Keys([key].into()));
                self.key_changed(customer);
                Some(key)
            }
        }
    }

    /// What a record holds instead of the customer id: its pseudonym under
    /// the customer's current key (created on first use). `None` for an
    /// erased customer: the record then names nobody.
    pub(crate) fn pseudonym_of(&mut self, customer: Option<&str>) -> Option<String> {
        let c = customer?;
        let key = self.customer_key(c)?;
        Some(crate::crypto::customer_pseudonym(&key, c))
    }

    /// Every pseudonym a customer's records may carry (one per key it has).
    pub fn pseudonyms_of(&self, customer: &str) -> Vec<String> {
        match self.keys.get(customer) {
            Some(crate::crypto::KeyEntry::Keys(ks)) => ks
                .iter()
                .map(|k| crate::crypto::customer_pseudonym(k, customer))
                .collect(),
            _ => Vec::new(),
        }
    }

    fn seal(&mut self, key: &[u8; 32], plain: &str) -> String {
        self.nonce_counter += 1;
        let mut material = self.actor.0.to_vec();
        material.extend_from_slice(&self.nonce_counter.to_le_bytes());
        material.extend_from_slice(&self.entropy);
        crate::crypto::encrypt(key, &material, plain)
    }

    /// Rebuilds one customer's view (after its keys changed).
    pub(crate) fn refresh_customer(&mut self, customer: &str, now_ms: u64) {
        let doc_id = self.customer_doc(customer).encode();
        // The view is rebuilt from the document: this batch's writes go in first.
        self.commit_pending_writes(&doc_id, now_ms);
        let view = match self.docs.get(&doc_id) {
            Some(slot) => read_customer(&slot.doc, customer, self.keys.get(customer)),
            None => return,
        };
        self.views.set_customer(customer, view);
        self.pending_customers.insert(customer.to_string());
    }

    pub(super) fn customer_doc(&self, customer: &str) -> DocId {
        DocId::Customers {
            bucket: customer_bucket(customer, self.cfg.buckets),
        }
    }

    pub(super) fn bump_loyalty(
        &mut self,
        customer: &str,
        earned: bool,
        add: u64,
    ) -> Result<(), OpError> {
        let actor = self.actor;
        if let Some(u) = &mut self.undo {
            if let std::collections::btree_map::Entry::Vacant(slot) =
                u.loyalty.entry((customer.to_string(), earned))
            {
                let old = self.views.customers.get(customer).and_then(|v| {
                    if earned {
                        v.earned.get(&actor).copied()
                    } else {
                        v.spent.get(&actor).copied()
                    }
                });
                slot.insert(old);
            }
        }
        let view = self
            .views
            .customers
            .entry(customer.to_string())
            .or_default();
        let cell = if earned {
            view.earned.entry(actor).or_default()
        } else {
            view.spent.entry(actor).or_default()
        };
        *cell = cell
            .checked_add(add)
            .filter(|v| *v <= CELL_MAX)
            .ok_or_else(|| OpError::BadRequest("points overflow".into()))?;
        let new = *cell;
        let key = if earned {
            CustomerKey::Earned {
                customer: customer.to_string(),
                actor,
            }
        } else {
            CustomerKey::Spent {
                customer: customer.to_string(),
                actor,
            }
        };
        let doc = self.customer_doc(customer);
        self.put(doc, key.encode(), ScalarValue::Uint(new));
        self.pending_customers.insert(customer.to_string());
        Ok(())
    }

    pub(super) fn customer_put(
        &mut self,
        id: &str,
        u: crate::ops::CustomerUpdate,
    ) -> Result<OpReply, OpError> {
        if self.views.customers.get(id).is_some_and(|c| c.erased) {
            return Err(OpError::NotFound(format!("customer {id} was erased")));
        }
        let doc = self.customer_doc(id);
        let mut fields: Vec<(&str, ScalarValue)> = Vec::new();
        if let Some(v) = u.name {
            fields.push(("name", ScalarValue::Str(v.into())))
        }
        if let Some(v) = u.email {
            fields.push(("email", ScalarValue::Str(v.into())))
        }
        if let Some(v) = u.phone {
            fields.push(("phone", ScalarValue::Str(v.into())))
        }
        if let Some(v) = u.marketing_consent {
            fields.push(("marketing_consent", ScalarValue::Boolean(v)))
        }
        if let Some(v) = u.tags {
            fields.push((
                "tags",
                ScalarValue::Str(serde_json::to_string(&v).unwrap_or_default().into()),
            ))
        }
        if fields.is_empty() {
            return Err(OpError::BadRequest(
                "no field to update (name, email, phone, marketing_consent, tags)".into(),
            ));
        }
        let Some(key) = self.customer_key(id) else {
            return Err(OpError::NotFound(format!("customer {id} was erased")));
        };
        let fields: Vec<(&str, ScalarValue, ScalarValue)> = fields
            .into_iter()
            .map(|(f, v)| match &v {
                // Personal data is stored only encrypted under the customer's key.
                ScalarValue::Str(plain) => {
                    let sealed = self.seal(&key, plain);
                    (f, v.clone(), ScalarValue::Str(sealed.into()))
                }
                _ => (f, v.clone(), v),
            })
            .collect();
        let mut view = self.views.customers.get(id).cloned().unwrap_or_default();
        for (f, plain, v) in fields {
            view.profile
                .insert(f.to_string(), crate::views::scalar_json(&plain));
            view.conflicts.remove(f);
            self.put(
                doc.clone(),
                CustomerKey::Profile {
                    customer: id.into(),
                    field: f.into(),
                }
                .encode(),
                v,
            );
        }
        self.views.set_customer(id, view);
        self.pending_customers.insert(id.to_string());
        Ok(Self::reply(
            crate::ops::ReplyKind::Ok,
            serde_json::json!({"customer_id": id}),
        ))
    }

    pub(super) fn customer_erase(&mut self, id: &str, now_ms: u64) -> Result<OpReply, OpError> {
        let doc_id = self.customer_doc(id);
        let known = self.views.customers.get(id).is_some_and(|c| !c.erased);
        if !known {
            return Err(OpError::NotFound(format!("unknown customer {id}")));
        }
        for f in layout::PROFILE_FIELDS {
            self.slot(&doc_id).dels.push(
                CustomerKey::Profile {
                    customer: id.into(),
                    field: f.into(),
                }
                .encode(),
            );
        }
        self.put(
            doc_id,
            CustomerKey::Erased {
                customer: id.into(),
            }
            .encode(),
            ScalarValue::Str(now_ms.to_string().into()),
        );
        // Crypto-shredding: the keys go, so no copy of the history can be read.
        self.set_key_entry(id, crate::crypto::KeyEntry::Erased);
        self.key_changed(id);
        let mut view = self.views.customers.get(id).cloned().unwrap_or_default();
        view.erased = true;
        view.profile.clear();
        view.conflicts.clear();
        self.views.set_customer(id, view);
        self.pending_customers.insert(id.to_string());
        Ok(Self::reply(
            crate::ops::ReplyKind::Ok,
            serde_json::json!({"customer_id": id, "erased": true}),
        ))
    }

    pub(super) fn redeem(&mut self, id: &str, r: crate::ops::Redeem) -> Result<OpReply, OpError> {
        let Some(view) = self.views.customers.get(id) else {
            return Err(OpError::NotFound(format!("unknown customer {id}")));
        };
        let points = view.points();
        if points < r.points as i64 {
            return Err(OpError::BadRequest(format!(
                "customer has {points} points, {} requested",
                r.points
            )));
        }
        self.bump_loyalty(id, false, r.points)?;
        let left = self
            .views
            .customers
            .get(id)
            .map(|v| v.points())
            .unwrap_or(0);
        Ok(Self::reply(
            crate::ops::ReplyKind::Created,
            serde_json::json!({"redeem_id": r.redeem_id, "loyalty_points": left}),
        ))
    }
}
