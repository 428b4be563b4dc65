//! History kept by a node (DESIGN §7, issue 14): records parts that go
//! cold, the index of records (sale lookup, purchase history, alarms), and
//! the bounded feed of noted sales that webhooks read.

use std::collections::{BTreeSet, HashMap};

use automerge::{ReadDoc, ROOT};

use crate::engine::Engine;
use crate::ids::{ActorKey, NodeTag};
use crate::layout::{self, DocId, RecordKind};
use crate::views::Alarm;

/// A position in an engine's feed of noted sales (see `Engine::sales_since`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaleFeedPos {
    engine: ActorKey,
    seq: u64,
}

/// Sale ids kept in the feed of recently noted sales (webhooks read it);
/// about 60 bytes each, so at most ~4 MiB whatever the history.
pub const SALE_FEED_MAX: usize = 65_536;

impl Engine {
    /// Cools closed records parts (DESIGN §7): a part is closed once its
    /// writer has a later part or month here. Cooling keeps the saved bytes
    /// and heads only; a reader loads the part again and the next pass cools
    /// it again. At most `saves_max` parts that need a `save()` (warmed or
    /// written since they were loaded) are cooled per call, so a pass never
    /// stalls the loop; parts that still hold their loaded bytes are free.
    /// Returns the number of parts cooled.
    pub fn cool_closed_parts(&mut self, saves_max: usize) -> usize {
        let mut latest: HashMap<NodeTag, (u32, u32)> = HashMap::new();
        for slot in self.docs.values() {
            if let DocId::Records { tag, month, part } = slot.id {
                let e = latest.entry(tag).or_insert((month, part));
                *e = (*e).max((month, part));
            }
        }
        let (mut cooled, mut saves) = (0, 0);
        for (id, slot) in self.docs.iter_mut() {
            let DocId::Records { tag, month, part } = slot.id else {
                continue;
            };
            if slot.doc.is_cold() || self.dirty_docs.contains(id) {
                continue;
            }
            if latest.get(&tag) == Some(&(month, part)) {
                // Open: written to (ours) or still arriving (a peer's).
                slot.doc.drop_saved();
                continue;
            }
            if !slot.puts.is_empty() || !slot.dels.is_empty() || slot.persisted != slot.doc.heads()
            {
                continue;
            }
            if !slot.doc.has_saved() {
                if saves >= saves_max {
                    continue;
                }
                saves += 1;
            }
            slot.doc.cool();
            cooled += 1;
        }
        self.stats.parts_cooled += cooled as u64;
        cooled
    }

    /// Closed records parts held cold, and their saved bytes.
    pub fn cold_parts(&self) -> (usize, usize) {
        self.docs
            .values()
            .filter(|s| s.doc.is_cold())
            .fold((0, 0), |(n, b), s| (n + 1, b + s.doc.saved_len()))
    }

    /// Indexes a record (sale → customer history and sale lookup; alarms).
    pub(crate) fn note_record(&mut self, doc: &str, key: &str, json: &str) {
        let Ok((kind, id)) = layout::parse_record_key(key) else {
            return;
        };
        // Most records are sales without a customer: all they index is their
        // id, and parsing them is most of a restart's scan of the history.
        if kind == RecordKind::Sale && !json.contains("\"customer") {
            self.note_sale_id(id, doc, key);
            return;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
            return;
        };
        let node = v
            .get("node")
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_string();
        self.note_retail_record(kind, id, doc, key, &v);
        if matches!(kind, RecordKind::Count | RecordKind::CountLines) {
            self.note_count_record(kind, &v);
        }
        match kind {
            RecordKind::Grant if doc.starts_with(&format!("rec/{}/", self.tag)) => {
                self.views.own_grants.insert(key.to_string());
            }
            RecordKind::Sale => {
                self.note_sale_id(id, doc, key);
                // A pseudonym; records written before pseudonyms hold the id.
                let named = v
                    .get("customer")
                    .or_else(|| v.get("customer_id"))
                    .and_then(|c| c.as_str());
                if let Some(c) = named {
                    self.views
                        .purchases
                        .entry(c.to_string())
                        .or_default()
                        .insert((doc.to_string(), key.to_string()));
                }
            }
            RecordKind::Overdraft | RecordKind::Deficit | RecordKind::Fork => {
                let kind_s = match kind {
                    RecordKind::Overdraft => "overdraft",
                    RecordKind::Deficit => "deficit",
                    _ => "fork",
                };
                self.views.alarms.insert(
                    (format!("{kind_s}/{id}"), node.clone()),
                    Alarm {
                        kind: kind_s.into(),
                        node,
                        id: id.to_string(),
                        record: v,
                    },
                );
            }
            _ => {}
        }
    }

    /// Indexes a sale id. Two nodes apart from each other may have used one
    /// id: this node's own sale is the one looked up (returns at this node
    /// refer to it), else the first by document; all are kept.
    fn note_sale_id(&mut self, id: &str, doc: &str, key: &str) {
        let tag_of = |d: &str| d.split('/').nth(1).map(str::to_string);
        let Some((old_doc, _)) = self.sale_doc(id) else {
            // The hash slot is free or held by another id.
            self.views.sales.set(id, doc, false);
            self.feed_sale(id);
            return;
        };
        if old_doc == doc {
            return;
        }
        self.feed_sale(id);
        let replace = if tag_of(&old_doc) == tag_of(doc) {
            true
        } else {
            let c = self
                .views
                .sale_collisions
                .entry(id.to_string())
                .or_default();
            c.insert((old_doc.clone(), key.to_string()));
            c.insert((doc.to_string(), key.to_string()));
            let own = self.tag.hex();
            let mine = |d: &str| tag_of(d).as_deref() == Some(own.as_str());
            mine(doc) || (!mine(&old_doc) && doc < old_doc.as_str())
        };
        if replace {
            let slot_is_id = self.views.sales.hashed(id) == Some(old_doc.as_str());
            self.views.sales.set(id, doc, slot_is_id);
        }
    }

    fn feed_sale(&mut self, id: &str) {
        if self.sale_feed.len() >= SALE_FEED_MAX {
            self.sale_feed.pop_front();
        }
        self.sale_feed
            .push_back((self.sale_feed_next, id.to_string()));
        self.sale_feed_next += 1;
    }

    /// Sale ids noted since `from` (a value of [`Engine::sale_feed_next`]
    /// of this very engine), in the order it noted them; `None` when some of
    /// them left the bounded feed, or `from` is another engine's position (a
    /// reopened engine numbers its sales anew): read them with
    /// [`Engine::for_each_sale`] then.
    pub fn sales_since(
        &self,
        from: SaleFeedPos,
    ) -> Option<impl Iterator<Item = (SaleFeedPos, &str)>> {
        let front = self
            .sale_feed
            .front()
            .map_or(self.sale_feed_next, |(s, _)| *s);
        if from.engine != self.actor || from.seq < front || from.seq > self.sale_feed_next {
            return None;
        }
        let skip = (from.seq - front) as usize;
        let engine = self.actor;
        Some(
            self.sale_feed
                .iter()
                .skip(skip)
                .map(move |(s, id)| (SaleFeedPos { engine, seq: *s }, id.as_str())),
        )
    }

    /// The position the next noted sale gets.
    pub fn sale_feed_next(&self) -> SaleFeedPos {
        SaleFeedPos {
            engine: self.actor,
            seq: self.sale_feed_next,
        }
    }

    /// Every sale record held, part by part, as (id, JSON text), without
    /// keeping cold parts loaded; `f` returns false to stop.
    pub fn for_each_sale(&self, mut f: impl FnMut(&str, &str) -> bool) {
        let prefix = format!("{}/", RecordKind::Sale.prefix());
        for slot in self.docs.values() {
            if !matches!(slot.id, DocId::Records { .. }) {
                continue;
            }
            let go = slot.doc.peek(|d| {
                for item in d.map_range(ROOT, prefix.clone()..) {
                    let Some(id) = item.key.strip_prefix(prefix.as_str()) else {
                        break;
                    };
                    let value: automerge::Value<'static> = item.value.into();
                    let Some(json) = value.as_str() else {
                        continue;
                    };
                    if !f(id, json) {
                        return false;
                    }
                }
                true
            });
            if !go {
                return;
            }
        }
    }

    /// The records document and key of sale `id` (this node's own sale when
    /// two nodes used the id). Loads a cold part that may hold it.
    pub fn sale_doc(&self, id: &str) -> Option<(String, String)> {
        let key = layout::record_key(RecordKind::Sale, id);
        let doc = self.views.sales.candidates(id).find(|d| {
            self.docs
                .get(*d)
                .is_some_and(|s| s.doc.get(ROOT, key.as_str()).ok().flatten().is_some())
        })?;
        Some((doc.to_string(), key))
    }

    /// The sale record of `id` and the other sales of that id, if two
    /// nodes used it (`collisions`).
    pub fn sale_json(&self, id: &str) -> Option<serde_json::Value> {
        let (d, k) = self.sale_doc(id)?;
        let mut v = self.record(&d, &k)?;
        if let Some(all) = self.views.sale_collisions.get(id) {
            let others: Vec<serde_json::Value> = all
                .iter()
                .filter(|(od, ok)| (od, ok) != (&d, &k))
                .filter_map(|(od, ok)| self.record(od, ok))
                .collect();
            v["collisions"] = others.into();
        }
        Some(v)
    }

    /// Reads a stored record by (document, key).
    pub fn record(&self, doc: &str, key: &str) -> Option<serde_json::Value> {
        let slot = self.docs.get(doc)?;
        let (v, _) = slot.doc.get(ROOT, key).ok().flatten()?;
        serde_json::from_str(v.as_str()?).ok()
    }

    /// Reads a record by key from any part of a month's records documents
    /// (`month_doc` is the month's first part, `rec/<tag>/<month>`).
    pub fn record_in_month(&self, month_doc: &str, key: &str) -> Option<serde_json::Value> {
        // Parts are `<month_doc>/<n>`: '0' follows '/', so this range holds
        // exactly the month's first part and its later ones.
        let end = format!("{month_doc}0");
        self.docs
            .range::<str, _>((
                std::ops::Bound::Included(month_doc),
                std::ops::Bound::Excluded(end.as_str()),
            ))
            .find_map(|(d, _)| self.record(d, key))
    }

    /// Purchases of a customer, newest first.
    pub fn purchases(&self, customer: &str) -> Vec<serde_json::Value> {
        let mut names = self.pseudonyms_of(customer);
        names.push(customer.to_string());
        let mut out: Vec<serde_json::Value> = names
            .iter()
            .filter_map(|n| self.views.purchases.get(n))
            .flatten()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|(d, k)| self.record(d, k))
            .collect();
        out.sort_by_key(|v| {
            std::cmp::Reverse(v.get("at_ms").and_then(|t| t.as_u64()).unwrap_or(0))
        });
        out
    }
}
