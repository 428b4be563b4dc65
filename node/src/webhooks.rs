//! Webhooks: the node pushes its events to the chain's other systems (ERP,
//! marketing, e-commerce) instead of making them poll.
//!
//! `[[webhooks]] name, url, secret, events = ["stock","sales","alarms"]`.
//!
//! How an event travels:
//! 1. The **journal writer** (one task) turns what the node committed into
//!    numbered journal entries in `DIR/webhooks.redb`: stock rows from the
//!    persisted change feed (the one `/api/changes` pages through; its
//!    position is kept with the journal, so a restart continues where it
//!    stopped), and sales and alarms new in the engine's views (the ids
//!    already journaled are kept in the same file). One redb transaction per
//!    pass holds the entries, the feed position and the seen ids together.
//! 2. One **sender** per webhook reads the journal after its cursor, POSTs
//!    `{"webhook", "cursor", "items"}` with the HMAC-SHA256 signature of the
//!    body, and only after a 2xx answer persists the batch's cursor: at least
//!    once, in journal order. Failures are retried with exponential backoff
//!    (capped). The cursor is the journal position of the batch's last entry.
//! 3. Entries every webhook has acknowledged are deleted.
//!
//! The change feed keeps only the latest value per (product, location), so a
//! journal that is full (a receiver down for long) pauses the copying without
//! losing stock: the latest values are copied when there is room again.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::config::{EventKind, WebhookConfig};
use crate::state::{HookStatus, Shared};

/// Items in one POST, at most.
pub const BATCH_ITEMS_MAX: usize = 500;
/// Body of one POST, at most (the batch is cut before the item that would
/// pass it); with [`WEBHOOKS_MAX`](crate::config::WEBHOOKS_MAX) this bounds
/// the memory in flight.
pub const BATCH_BYTES_MAX: usize = 1 << 20;
/// Journal entries written in one pass of the writer, at most.
pub const JOURNAL_PASS_MAX: usize = 1000;
/// Journal entries kept while some webhook has not acknowledged them, at most
/// (~200 bytes each). When full, copying pauses; stock is not lost (the
/// change feed keeps the latest values), sales and alarms are picked up later.
pub const JOURNAL_ENTRIES_MAX: u64 = 1_000_000;
/// First retry delay after a failed delivery; doubled per failure up to the cap.
pub const RETRY_MIN_MS: u64 = 250;
/// Longest wait between retries: a receiver back up is found within this.
pub const RETRY_MAX_MS: u64 = 30_000;
/// One POST's deadline (connect, send, answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Writer's pass period when nothing wakes it (sales and alarms are found by
/// looking at the views; stock changes wake it at once).
pub const POLL_MS: u64 = 500;
/// Longest `last_error` kept (the receiver's text is cut).
const ERROR_TEXT_MAX: usize = 300;
/// journal position → item JSON.
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
/// "next" (next journal position), "feed" (change-feed sequence copied),
/// "cursor/<webhook>" (last acknowledged journal position).
const STATE: TableDefinition<&str, u64> = TableDefinition::new("state");
/// (kind, id) of sales and alarms already journaled.
const SEEN: TableDefinition<(&str, &str), ()> = TableDefinition::new("seen");

/// The name of the webhook journal in the data directory.
pub const FILE_NAME: &str = "webhooks.redb";

/// `sha256=<hex HMAC-SHA256 of body with secret>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    use hmac::Mac;
    // HMAC takes a key of any length; new_from_slice cannot fail for it.
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The change feed's last sequence (what the journal writer copies up to).
pub(crate) fn feed_max(sh: &Shared) -> u64 {
    sh.read.read().map(|r| r.seq_max).unwrap_or(0)
}

/// The webhook lines of `/metrics`.
pub fn metrics_text(sh: &Shared, out: &mut String) {
    let hooks = sh.webhooks.snapshot();
    if hooks.is_empty() {
        return;
    }
    let fm = feed_max(sh);
    out.push_str("# HELP storemesh_webhook_lag Events a webhook has not acknowledged yet.\n# TYPE storemesh_webhook_lag gauge\n");
    for (name, s) in &hooks {
        out.push_str(&format!(
            "storemesh_webhook_lag{{webhook=\"{name}\"}} {}\n",
            sh.webhooks.lag(s, fm)
        ));
    }
    out.push_str("# HELP storemesh_webhook_cursor Last journal position a webhook acknowledged.\n# TYPE storemesh_webhook_cursor gauge\n");
    for (name, s) in &hooks {
        out.push_str(&format!(
            "storemesh_webhook_cursor{{webhook=\"{name}\"}} {}\n",
            s.cursor
        ));
    }
    out.push_str("# HELP storemesh_webhook_failures_total Deliveries that failed (to be retried).\n# TYPE storemesh_webhook_failures_total counter\n");
    for (name, s) in &hooks {
        out.push_str(&format!(
            "storemesh_webhook_failures_total{{webhook=\"{name}\"}} {}\n",
            s.failures
        ));
    }
}

/// The running webhook tasks of a node.
pub struct Service {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Service {
    /// Stops the tasks and waits for them, so the journal file is closed.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                tracing::warn!("a webhook task did not stop in 5 s");
            }
        }
    }
}

fn get_state(db: &Database, key: &str) -> anyhow::Result<u64> {
    let tx = db.begin_read()?;
    let t = tx.open_table(STATE)?;
    Ok(t.get(key)?.map(|v| v.value()).unwrap_or(0))
}

/// Opens the journal and starts the writer and one sender per webhook.
/// `None` when no webhook is configured.
pub fn start(dir: &Path, shared: Arc<Shared>) -> anyhow::Result<Option<Service>> {
    let hooks = shared.cfg.webhooks.clone();
    if hooks.is_empty() {
        return Ok(None);
    }
    let path = dir.join(FILE_NAME);
    let db = Database::create(&path)
        .with_context(|| format!("cannot open the webhook journal {}", path.display()))?;
    {
        let tx = db.begin_write()?;
        tx.open_table(JOURNAL)?;
        tx.open_table(STATE)?;
        tx.open_table(SEEN)?;
        tx.commit()?;
    }
    let db = Arc::new(db);
    let next = get_state(&db, "next")?.max(1);
    let feed = get_state(&db, "feed")?;
    // The node's database may have been replaced by an older copy: a feed
    // position past its end would skip every change until it caught up.
    let feed = if feed > feed_max(&shared) { 0 } else { feed };
    shared
        .webhooks
        .journal_last
        .store(next - 1, Ordering::Relaxed);
    shared.webhooks.feed_copied.store(feed, Ordering::Relaxed);
    let first_unpruned = {
        let tx = db.begin_read()?;
        let t = tx.open_table(JOURNAL)?;
        let first = t.first()?.map(|(k, _)| k.value());
        first.unwrap_or(next)
    };
    {
        let mut g = shared
            .webhooks
            .hooks
            .write()
            .unwrap_or_else(|p| p.into_inner());
        g.clear();
        for h in &hooks {
            let stored = get_state(&db, &format!("cursor/{}", h.name))?;
            // A webhook new to this journal starts at its oldest kept entry.
            let cursor = if stored == 0 {
                first_unpruned.saturating_sub(1)
            } else {
                stored
            };
            g.insert(
                h.name.clone(),
                HookStatus {
                    events: h.events.clone(),
                    cursor,
                    ..HookStatus::default()
                },
            );
        }
    }
    let mut seen = Seen::default();
    {
        let tx = db.begin_read()?;
        let t = tx.open_table(SEEN)?;
        for e in t.iter()? {
            let (k, _) = e?;
            let (kind, id) = k.value();
            match kind {
                "sale" => seen.sales.insert(id.to_string()),
                _ => seen.alarms.insert(id.to_string()),
            };
        }
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let (wake_tx, wake_rx) = watch::channel(next - 1);
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(REQUEST_TIMEOUT / 2)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("cannot build the webhook HTTP client")?;
    let mut tasks = Vec::new();
    let writer = Writer {
        db: db.clone(),
        shared: shared.clone(),
        next,
        feed,
        seen: Arc::new(Mutex::new(seen)),
        sale_seq: None,
        wants: hooks
            .iter()
            .flat_map(|h| h.events.iter().copied())
            .collect(),
    };
    tasks.push(tokio::spawn(writer.run(stop_rx.clone(), wake_tx)));
    for h in hooks {
        let sender = Sender {
            db: db.clone(),
            shared: shared.clone(),
            client: client.clone(),
            hook: h,
        };
        tasks.push(tokio::spawn(sender.run(stop_rx.clone(), wake_rx.clone())));
    }
    tracing::info!(webhooks = tasks.len() - 1, "webhooks started");
    Ok(Some(Service {
        stop: stop_tx,
        tasks,
    }))
}

struct Writer {
    db: Arc<Database>,
    shared: Arc<Shared>,
    next: u64,
    feed: u64,
    seen: Arc<Mutex<Seen>>,
    /// The engine's sale feed position read up to (`None`: look at every
    /// sale held, at start and after falling behind the bounded feed).
    sale_seq: Option<storemesh_protocol::history::SaleFeedPos>,
    wants: HashSet<EventKind>,
}

/// Ids of sales and alarms already in the journal.
#[derive(Default)]
struct Seen {
    sales: HashSet<String>,
    alarms: HashSet<String>,
}

/// One pass's findings, written in one transaction.
struct Pass {
    entries: Vec<Value>,
    feed_to: u64,
    seen: Vec<(String, String)>,
    /// The sale feed position to read from next, once this pass is written.
    sale_seq: Option<Option<storemesh_protocol::history::SaleFeedPos>>,
}

impl Writer {
    async fn run(mut self, mut stop: watch::Receiver<bool>, wake: watch::Sender<u64>) {
        let mut changes = self.shared.changes.subscribe();
        loop {
            let more = match self.pass().await {
                Ok(more) => {
                    let _ = wake.send(self.next - 1);
                    more
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "webhook journal pass failed");
                    false
                }
            };
            if more {
                tokio::task::yield_now().await;
                if *stop.borrow() {
                    return;
                }
                continue;
            }
            tokio::select! {
                _ = stop.changed() => return,
                _ = changes.recv() => {}
                _ = tokio::time::sleep(Duration::from_millis(POLL_MS)) => {}
            }
            if *stop.borrow() {
                return;
            }
        }
    }

    /// Copies what is new into the journal; true when there is more to copy.
    async fn pass(&mut self) -> anyhow::Result<bool> {
        let min_cursor = {
            let g = self
                .shared
                .webhooks
                .hooks
                .read()
                .unwrap_or_else(|p| p.into_inner());
            g.values().map(|s| s.cursor).min().unwrap_or(0)
        };
        let kept = (self.next - 1).saturating_sub(min_cursor);
        let room = JOURNAL_ENTRIES_MAX.saturating_sub(kept) as usize;
        let budget = room.min(JOURNAL_PASS_MAX);
        let mut pass = Pass {
            entries: Vec::new(),
            feed_to: self.feed,
            seen: Vec::new(),
            sale_seq: None,
        };
        let mut more = false;
        if budget > 0 && self.wants.contains(&EventKind::Stock) {
            let r = self.shared.read.read().unwrap_or_else(|p| p.into_inner());
            for (seq, (p, l)) in r.by_seq.range(self.feed.saturating_add(1)..) {
                if pass.entries.len() >= budget {
                    more = true;
                    break;
                }
                if let Some(row) = r.rows.get(p).and_then(|m| m.get(l)) {
                    pass.entries.push(json!({
                        "event": "stock", "product_id": p, "location": &**l,
                        "on_hand": row.on_hand, "available": row.available,
                        "incoming": row.incoming, "reserved": row.reserved, "seq": seq,
                    }));
                }
                pass.feed_to = *seq;
            }
        }
        let want_sales = self.wants.contains(&EventKind::Sales);
        let want_alarms = self.wants.contains(&EventKind::Alarms);
        let left = budget.saturating_sub(pass.entries.len());
        if left > 0 && (want_sales || want_alarms) {
            let seen = self.seen.clone();
            let sale_seq = self.sale_seq;
            let found = self
                .shared
                .query(move |e| {
                    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    let mut sales: Vec<(String, Value)> = Vec::new();
                    let mut complete = true;
                    // Where the next pass reads the feed from.
                    let mut next_seq = Some(e.sale_feed_next());
                    match sale_seq.map(|s| (s, e.sales_since(s))) {
                        _ if !want_sales => {}
                        Some((_, Some(feed))) => {
                            for (pos, id) in feed {
                                if seen.sales.contains(id) {
                                    continue;
                                }
                                if sales.len() >= left {
                                    complete = false;
                                    next_seq = Some(pos);
                                    break;
                                }
                                let rec = e.sale_doc(id).and_then(|(d, k)| e.record(&d, &k));
                                match rec {
                                    Some(rec) => sales.push((id.to_string(), rec)),
                                    // Noted but not readable: look at every
                                    // sale next time rather than pass it by.
                                    None => {
                                        complete = false;
                                        next_seq = None;
                                        break;
                                    }
                                }
                            }
                        }
                        // First pass, the feed moved on past what this
                        // writer read, or the engine was reopened: every
                        // sale held, unseen ones only (parsed only then).
                        _ => e.for_each_sale(|id, json| {
                            if seen.sales.contains(id) {
                                return true;
                            }
                            if sales.len() >= left {
                                complete = false;
                                next_seq = None;
                                return false;
                            }
                            if let Ok(rec) = serde_json::from_str(json) {
                                sales.push((id.to_string(), rec));
                            }
                            true
                        }),
                    }
                    let mut alarms: Vec<(String, Value)> = Vec::new();
                    if want_alarms {
                        for ((kid, node), a) in e.views.alarms() {
                            let key = format!("{kid}@{node}");
                            if seen.alarms.contains(&key) {
                                continue;
                            }
                            if sales.len() + alarms.len() >= left {
                                complete = false;
                                break;
                            }
                            alarms.push((
                                key,
                                json!({"kind": a.kind, "node": a.node, "id": a.id, "record": a.record}),
                            ));
                        }
                    }
                    (sales, alarms, next_seq, complete)
                })
                .await;
            if let Some((mut sales, alarms, next_seq, complete)) = found {
                // Taken over only once this pass is in the journal.
                pass.sale_seq = Some(next_seq);
                more |= !complete;
                // Several new sales in one pass go out in the order they happened.
                sales.sort_by(|a, b| {
                    let at = |v: &Value| v.get("at_ms").and_then(Value::as_u64).unwrap_or(0);
                    at(&a.1).cmp(&at(&b.1)).then_with(|| a.0.cmp(&b.0))
                });
                for (id, rec) in sales {
                    pass.entries
                        .push(json!({"event": "sales", "sale_id": id, "sale": rec}));
                    pass.seen.push(("sale".into(), id));
                }
                for (key, mut a) in alarms {
                    a["event"] = json!("alarms");
                    pass.entries.push(a);
                    pass.seen.push(("alarm".into(), key));
                }
            }
        }
        // Prune what every webhook acknowledged; write the pass.
        let db = self.db.clone();
        let next = self.next;
        let entries = std::mem::take(&mut pass.entries);
        let n = entries.len() as u64;
        let feed_to = pass.feed_to;
        let seen_new = pass.seen.clone();
        let changed = n > 0 || feed_to != self.feed;
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let tx = db.begin_write()?;
            {
                let mut j = tx.open_table(JOURNAL)?;
                if min_cursor > 0 {
                    j.retain_in(..=min_cursor, |_, _| false)?;
                }
                for (i, mut e) in entries.into_iter().enumerate() {
                    let pos = next + i as u64;
                    e["cursor"] = json!(pos);
                    j.insert(pos, e.to_string().as_bytes())?;
                }
                let mut s = tx.open_table(STATE)?;
                s.insert("next", next + n)?;
                s.insert("feed", feed_to)?;
                let mut seen = tx.open_table(SEEN)?;
                for (a, b) in &seen_new {
                    seen.insert((a.as_str(), b.as_str()), ())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
        .context("journal write task")??;
        if changed {
            let mut s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            for (kind, id) in pass.seen {
                match kind.as_str() {
                    "sale" => s.sales.insert(id),
                    _ => s.alarms.insert(id),
                };
            }
        }
        self.next += n;
        self.feed = feed_to;
        if let Some(seq) = pass.sale_seq {
            self.sale_seq = seq;
        }
        let reg = &self.shared.webhooks;
        reg.journal_last.store(self.next - 1, Ordering::Relaxed);
        reg.feed_copied.store(self.feed, Ordering::Relaxed);
        Ok(more)
    }
}

struct Sender {
    db: Arc<Database>,
    shared: Arc<Shared>,
    client: reqwest::Client,
    hook: WebhookConfig,
}

/// A batch read from the journal: its items (filtered by the webhook's events)
/// and the journal position it covers up to.
struct Batch {
    items: Vec<Value>,
    body_bytes: usize,
    to: u64,
}

impl Sender {
    fn cursor(&self) -> u64 {
        let g = self
            .shared
            .webhooks
            .hooks
            .read()
            .unwrap_or_else(|p| p.into_inner());
        g.get(&self.hook.name).map(|s| s.cursor).unwrap_or(0)
    }

    async fn read_batch(&self, cursor: u64) -> anyhow::Result<Batch> {
        let db = self.db.clone();
        let events: Vec<&'static str> = self.hook.events.iter().map(|e| e.as_str()).collect();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Batch> {
            let tx = db.begin_read()?;
            let t = tx.open_table(JOURNAL)?;
            let mut b = Batch {
                items: Vec::new(),
                body_bytes: 0,
                to: cursor,
            };
            for e in t.range(cursor.saturating_add(1)..)? {
                let (k, v) = e?;
                let bytes = v.value();
                if b.items.len() >= BATCH_ITEMS_MAX
                    || (!b.items.is_empty() && b.body_bytes + bytes.len() + 1 > BATCH_BYTES_MAX)
                {
                    break;
                }
                let item: Value = serde_json::from_slice(bytes).context("journal entry")?;
                let kind = item.get("event").and_then(Value::as_str).unwrap_or("");
                if events.contains(&kind) {
                    b.body_bytes += bytes.len() + 1;
                    b.items.push(item);
                }
                b.to = k.value();
            }
            Ok(b)
        })
        .await
        .context("journal read task")?
    }

    async fn persist_cursor(&self, to: u64) -> anyhow::Result<()> {
        let db = self.db.clone();
        let key = format!("cursor/{}", self.hook.name);
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let tx = db.begin_write()?;
            tx.open_table(STATE)?.insert(key.as_str(), to)?;
            tx.commit()?;
            Ok(())
        })
        .await
        .context("cursor write task")?
    }

    async fn post(&self, body: Vec<u8>) -> Result<(), String> {
        let sig = signature(&self.hook.secret, &body);
        let resp = self
            .client
            .post(&self.hook.url)
            .header("content-type", "application/json")
            .header("x-storemesh-signature", sig)
            .header(
                "user-agent",
                concat!("storemesh/", env!("CARGO_PKG_VERSION")),
            )
            .body(body)
            .send()
            .await
            .map_err(|e| {
                // reqwest's error chain says what failed (connect refused, timeout).
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                msg
            })?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered HTTP {}", status.as_u16()))
        }
    }

    async fn run(self, mut stop: watch::Receiver<bool>, mut wake: watch::Receiver<u64>) {
        let name = self.hook.name.clone();
        let mut retry_ms = RETRY_MIN_MS;
        loop {
            if *stop.borrow() {
                return;
            }
            let cursor = self.cursor();
            let batch = match self.read_batch(cursor).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(webhook = %name, error = %format!("{e:#}"), "cannot read the webhook journal");
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep(Duration::from_millis(RETRY_MAX_MS)) => continue,
                    }
                }
            };
            if batch.to == cursor {
                // Nothing new: wait for the writer (or a periodic look).
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = wake.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(POLL_MS * 4)) => {}
                }
                continue;
            }
            let delivered = if batch.items.is_empty() {
                // Only entries this webhook does not subscribe to: pass them.
                Ok(())
            } else {
                let body = json!({"webhook": name, "cursor": batch.to, "items": batch.items});
                let body = body.to_string().into_bytes();
                tokio::select! {
                    _ = stop.changed() => return,
                    r = self.post(body) => r,
                }
            };
            match delivered {
                Ok(()) => {
                    if let Err(e) = self.persist_cursor(batch.to).await {
                        tracing::error!(webhook = %name, error = %format!("{e:#}"), "cannot persist the webhook cursor");
                    }
                    let now = self.shared.now_ms();
                    let n = batch.items.len() as u64;
                    self.shared.webhooks.update(&name, |s| {
                        s.cursor = batch.to;
                        if n > 0 {
                            s.last_error = None;
                            s.last_delivery_ms = now;
                            s.batches_delivered += 1;
                            s.items_delivered += n;
                        }
                    });
                    retry_ms = RETRY_MIN_MS;
                }
                Err(msg) => {
                    let mut msg = msg;
                    if msg.len() > ERROR_TEXT_MAX {
                        let mut cut = ERROR_TEXT_MAX;
                        while !msg.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        msg.truncate(cut);
                    }
                    tracing::warn!(webhook = %name, error = %msg, retry_in_ms = retry_ms, "webhook delivery failed");
                    self.shared.webhooks.update(&name, |s| {
                        s.last_error = Some(msg);
                        s.failures += 1;
                    });
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep(Duration::from_millis(retry_ms)) => {}
                    }
                    retry_ms = (retry_ms * 2).min(RETRY_MAX_MS);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        let s = signature("Jefe", b"what do ya want for nothing?");
        assert_eq!(
            s,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
