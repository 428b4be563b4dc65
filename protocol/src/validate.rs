//! Validation of changes received from peers (DESIGN §3, "Incoming changes are
//! validated"): every op of every new change must write only keys its author
//! owns, cumulative cells never decrease, and values are in range. A message with
//! one invalid change is rejected whole, before anything of it is applied.

use std::collections::{BTreeSet, HashMap};

use automerge::{ActorId, Automerge, Change, ChangeHash, ReadDoc, ScalarValue, ROOT};

use crate::authority::{Authority, Unauthorized};
use crate::ids::{ActorKey, NodeTag, CELL_MAX};
use crate::layout::{parse_mesh_key, parse_node_info, parse_record_key, CustomerKey, DocId};
use crate::views::{scalar_u64, Views};

/// Largest record (a JSON string in a records document) a peer accepts.
pub const RECORD_BYTES_MAX: usize = 64 * 1024;

/// Automerge chunk types: the byte after the magic bytes and the checksum.
pub(crate) const CHUNK_DOCUMENT: u8 = 0;
pub(crate) const CHUNK_CHANGE: u8 = 1;
pub(crate) const CHUNK_COMPRESSED_CHANGE: u8 = 2;
pub(crate) const CHUNK_BUNDLE: u8 = 3;

/// The type of an Automerge chunk (`None` if it is too short to have one).
pub(crate) fn chunk_type(chunk: &[u8]) -> Option<u8> {
    chunk.get(8).copied()
}

/// Splits an Automerge sync-message chunk (a document, one change, several
/// concatenated change chunks, or a bundle) into changes, without applying
/// anything.
pub fn changes_in_chunk(chunk: &[u8]) -> Result<Vec<Change>, String> {
    const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
    let mut out = Vec::new();
    let mut rest = chunk;
    while !rest.is_empty() {
        if rest.len() < 9 || rest[..4] != MAGIC {
            return Err("chunk does not start with the Automerge magic bytes".into());
        }
        let kind = rest[8];
        let (len, len_bytes) = read_uleb(&rest[9..]).ok_or("bad chunk length")?;
        let total = 9usize
            .checked_add(len_bytes)
            .and_then(|v| v.checked_add(usize::try_from(len).ok()?))
            .ok_or("chunk length overflows")?;
        if total > rest.len() {
            return Err("truncated chunk".into());
        }
        let (this, tail) = rest.split_at(total);
        match kind {
            CHUNK_DOCUMENT => {
                let doc = Automerge::load(this).map_err(|e| format!("bad document chunk: {e}"))?;
                out.extend(doc.get_changes(&[]));
            }
            CHUNK_CHANGE | CHUNK_COMPRESSED_CHANGE => {
                out.push(Change::from_bytes(this.to_vec()).map_err(|e| format!("bad change: {e}"))?)
            }
            CHUNK_BUNDLE => out.extend(changes_in_bundle(this)?),
            k => return Err(format!("unknown chunk type {k}")),
        }
        rest = tail;
    }
    Ok(out)
}

/// The hashes of the changes in a sequence of chunks (as `changes_in_chunk`
/// splits them), and whether one of them is a whole document (whose changes
/// are then not listed: its sender sends every certificate of the document).
pub fn chunk_change_hashes(chunk: &[u8]) -> Result<(Vec<[u8; 32]>, bool), String> {
    let mut out = Vec::new();
    let mut whole_doc = false;
    let mut rest = chunk;
    while !rest.is_empty() {
        if rest.len() < 9 {
            return Err("truncated chunk".into());
        }
        let kind = rest[8];
        let (len, len_bytes) = read_uleb(&rest[9..]).ok_or("bad chunk length")?;
        let total = 9usize
            .checked_add(len_bytes)
            .and_then(|v| v.checked_add(usize::try_from(len).ok()?))
            .ok_or("chunk length overflows")?;
        if total > rest.len() {
            return Err("truncated chunk".into());
        }
        let (this, tail) = rest.split_at(total);
        if kind == CHUNK_DOCUMENT {
            whole_doc = true;
        } else {
            out.extend(changes_in_chunk(this)?.iter().map(|c| c.hash().0));
        }
        rest = tail;
    }
    Ok((out, whole_doc))
}

/// The changes of a bundle chunk. Bundles are an experimental Automerge
/// format: a panic in its parser on a peer's bytes is caught and turned into an
/// error like any other malformed chunk.
fn changes_in_bundle(chunk: &[u8]) -> Result<Vec<Change>, String> {
    let parse = || -> Result<Vec<Change>, String> {
        let bundle = automerge::Bundle::try_from(chunk).map_err(|e| format!("bad bundle: {e}"))?;
        bundle.to_changes().map_err(|e| format!("bad bundle: {e}"))
    };
    std::panic::catch_unwind(parse).unwrap_or_else(|_| Err("bad bundle: parser failed".into()))
}

fn read_uleb(b: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Why `validate_changes` refused a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// One of its changes depends on changes the receiver lacks (and the
    /// message does not carry): the sender is behind or ahead, not hostile.
    #[error("change depends on changes this node does not have")]
    MissingDeps,
    /// A change breaks a rule of the layout.
    #[error("{0}")]
    Invalid(String),
    /// A change's author has no right to write it (`crate::authority`).
    #[error(transparent)]
    Unauthorized(#[from] crate::authority::Unauthorized),
}

impl From<String> for Refusal {
    fn from(s: String) -> Refusal {
        Refusal::Invalid(s)
    }
}

impl From<&str> for Refusal {
    fn from(s: &str) -> Refusal {
        Refusal::Invalid(s.to_string())
    }
}

/// What validation learned about a set of new changes.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Changes written by this node's tag that this replica did not have: a fork.
    pub own_changes_from_elsewhere: usize,
    /// Keys the new changes write (the views to recompute once they are applied).
    pub keys: std::collections::BTreeSet<String>,
    /// Nodes that wrote the new changes (for "last heard from").
    pub authors: std::collections::BTreeSet<NodeTag>,
}

/// Validates `changes` (those not yet in `doc`) for document `doc_id`.
pub fn validate_changes(
    doc_id: &DocId,
    doc: &Automerge,
    seqs: &mut ActorSeqs,
    changes: &mut [Change],
    own_tag: NodeTag,
    buckets: u32,
    auth: Option<AuthView<'_>>,
) -> Result<Verdict, Refusal> {
    let mut verdict = Verdict::default();
    // Nodes whose directory entries arrive in this very message (a
    // retirement may name a successor whose entry travels with it).
    let mut entries_in_message = std::collections::BTreeSet::new();
    if matches!(doc_id, DocId::Mesh) {
        for c in changes.iter() {
            for op in &c.decode().operations {
                if let automerge::legacy::Key::Map(k) = &op.key {
                    if let Ok(t) = parse_mesh_key(k) {
                        entries_in_message.insert(t);
                    }
                }
            }
        }
    }
    let ctx = auth.map(|a| (a, &entries_in_message));
    seqs.refresh(doc);
    // Apply a change's checks in each actor's own order, so that the running
    // maximum of a cumulative cell is compared with its predecessor.
    changes.sort_by(|a, b| {
        (a.actor_id().to_bytes(), a.seq()).cmp(&(b.actor_id().to_bytes(), b.seq()))
    });
    let mut last: HashMap<String, u64> = HashMap::new();
    let in_message: HashMap<ChangeHash, &Change> = changes.iter().map(|c| (c.hash(), c)).collect();
    // Every op of the message's new changes: (actor, counter) → key; and
    // each new change's ops with their predecessors, checked after the loop
    // (a predecessor may be in a change that sorts later).
    let mut msg_ops: HashMap<(ActorId, u64), String> = HashMap::new();
    let mut preds_to_check: Vec<(ChangeHash, Vec<KeyPreds>)> = Vec::new();
    // The previous new change, if by the same actor: the next must follow it.
    let mut prev: Option<(&ActorId, u64)> = None;
    // The previous new change's highest op counter (same actor as `prev`).
    let mut prev_op: Option<u64> = None;
    for change in changes.iter() {
        if doc.get_change_meta_by_hash(&change.hash()).is_some() {
            continue;
        }
        // A change is checked against its predecessors, so they must be known:
        // a change held back for missing dependencies would be applied later
        // without this check (a peer could lower a cell by reordering).
        for dep in change.deps() {
            if !in_message.contains_key(dep) && doc.get_change_meta_by_hash(dep).is_none() {
                return Err(Refusal::MissingDeps);
            }
        }
        let prev_max_op = match prev {
            Some((a, _)) if a == change.actor_id() => prev_op,
            _ => None,
        };
        check_sequence(seqs, change, &mut prev)?;
        prev_op = Some(change.max_op());
        // Storemesh never writes Automerge's "extra bytes" (its author footer):
        // a footer on a change after an actor's first trips an assertion in
        // Automerge, and nothing else is meant to be there.
        if !change.extra_bytes().is_empty() {
            return Err(
                "change carries extra bytes (an author footer) storemesh never writes".into(),
            );
        }
        let author = ActorKey::from_bytes(change.actor_id().to_bytes())
            .ok_or("change by an actor id that is not a storemesh actor")?;
        if author.tag() == own_tag {
            verdict.own_changes_from_elsewhere += 1;
        }
        verdict.authors.insert(author.tag());
        // Decoding unwraps actor indices that a peer's bytes may leave
        // dangling (an op's pred naming an actor the change does not list;
        // found by the coverage-guided `change` fuzz target): a panic there
        // is a malformed change, refused like any other.
        let expanded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| change.decode()))
            .map_err(|_| {
            "change cannot be decoded (an op names an unknown actor)".to_string()
        })?;
        // Automerge keeps a change under the hash of the bytes it arrived
        // in but writes it out (`save_after`, sync) re-encoded from its
        // decoded form: a change in a non-canonical encoding (found by the
        // coverage-guided `receive` fuzz target: a value column run-length
        // coded another way) would be stored and forwarded under another
        // hash than the one in the document's graph, so memory and disk
        // disagree after a restart. Only canonical changes are accepted.
        let reencoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Change::from(expanded.clone()).hash()
        }));
        if reencoded.ok() != Some(change.hash()) {
            return Err("change is not in Automerge's canonical encoding".into());
        }
        check_op_ids(
            doc,
            seqs,
            &in_message,
            change,
            prev_max_op,
            &expanded.operations,
        )?;
        let mut with_preds = Vec::new();
        for (i, op) in expanded.operations.iter().enumerate() {
            if let automerge::legacy::Key::Map(k) = &op.key {
                let counter = change.start_op().get().saturating_add(i as u64);
                msg_ops.insert((change.actor_id().clone(), counter), k.to_string());
                if !op.pred.is_empty() {
                    with_preds.push((k.to_string(), op.pred.iter().cloned().collect()));
                }
            }
        }
        preds_to_check.push((change.hash(), with_preds));
        for op in &expanded.operations {
            if !matches!(op.obj, automerge::legacy::ObjectId::Root) {
                return Err("change writes a nested object; storemesh documents are flat".into());
            }
            let key = match &op.key {
                automerge::legacy::Key::Map(k) => k.to_string(),
                automerge::legacy::Key::Seq(_) => return Err("change writes a list element".into()),
            };
            let value = match &op.action {
                automerge::legacy::OpType::Put(v) => Some(v.clone()),
                // A delete names the ops it removes; one that names none is
                // never written by Automerge and broke encoding the document
                // again (found by the `change_fields` fuzz target).
                automerge::legacy::OpType::Delete if op.pred.is_empty() => {
                    return Err(format!("change deletes {key:?} without naming what").into());
                }
                automerge::legacy::OpType::Delete => None,
                _ => return Err(format!("change uses an unsupported operation on {key:?}").into()),
            };
            check_op(
                doc_id,
                doc,
                author,
                &key,
                value.as_ref(),
                buckets,
                &mut last,
            )?;
            if let Some((a, in_message)) = ctx {
                authorize_op(doc_id, a, in_message, author, &key, value.as_ref())?;
            }
            verdict.keys.insert(key);
        }
    }
    let mut frontiers = HashMap::new();
    for (hash, ops) in &preds_to_check {
        let frontier = doc_frontier(doc, &in_message, hash, &mut frontiers);
        for (key, preds) in ops {
            check_preds(doc, &msg_ops, &frontier, key, preds)?;
        }
    }
    Ok(verdict)
}

/// An op's key and the ops it names as overwritten.
type KeyPreds = (String, Vec<automerge::legacy::OpId>);

/// The document's changes a new change of the message builds on: its
/// dependencies in the document, and those of its ancestors in the message.
///
/// Memoized over the message (`memo`: change → its frontier, sorted): each
/// change's frontier is the union of its dependencies' (a dependency in the
/// document is its own frontier). Walking every change's ancestors afresh
/// was quadratic in a message's changes: a new node receiving a document of
/// thousands of changes spent 35 % of its sync there (BENCHMARKS row 5).
fn doc_frontier(
    doc: &Automerge,
    in_message: &HashMap<ChangeHash, &Change>,
    of: &ChangeHash,
    memo: &mut HashMap<ChangeHash, Vec<ChangeHash>>,
) -> Vec<ChangeHash> {
    let in_doc = |d: &ChangeHash| doc.get_change_meta_by_hash(d).is_some();
    // Depth-first without recursion (a chain may be thousands of changes
    // long): a change is finished once all its dependencies in the message
    // are. Change hashes cover their dependencies, so there is no cycle.
    let mut stack = vec![(*of, false)];
    while let Some((h, deps_done)) = stack.pop() {
        if memo.contains_key(&h) {
            continue;
        }
        let Some(c) = in_message.get(&h) else {
            memo.insert(h, Vec::new());
            continue;
        };
        if !deps_done {
            stack.push((h, true));
            for d in c.deps() {
                if !memo.contains_key(d) && !in_doc(d) && in_message.contains_key(d) {
                    stack.push((*d, false));
                }
            }
            continue;
        }
        let mut out = BTreeSet::new();
        for d in c.deps() {
            if in_doc(d) {
                out.insert(*d);
            } else if let Some(f) = memo.get(d) {
                out.extend(f.iter().copied());
            }
        }
        memo.insert(h, out.into_iter().collect());
    }
    memo.get(of).cloned().unwrap_or_default()
}

/// An op overwrites (or deletes) only ops of its own key. Automerge does not
/// check it: a change whose put named an op of another key as predecessor was
/// applied, and the document could then no longer be saved (an assertion in
/// Automerge's change collector, `op_set2/change/collector.rs:299`, found by
/// the `change` fuzz target). A predecessor is either an op of the message's
/// new changes, of the same key, or an op of the key visible in the document
/// at what the change builds on (for an honest change, exactly the values it
/// overwrote).
fn check_preds(
    doc: &Automerge,
    msg_ops: &HashMap<(ActorId, u64), String>,
    frontier: &[ChangeHash],
    key: &str,
    preds: &[automerge::legacy::OpId],
) -> Result<(), String> {
    let refused = || format!("an op on {key:?} overwrites an op of another key");
    let is = |e: &automerge::ObjId, p: &automerge::legacy::OpId| matches!(e, automerge::ObjId::Id(c, a, _) if *c == p.counter() && a == p.actor());
    let mut current: Option<Vec<automerge::ObjId>> = None;
    let mut visible: Option<Vec<automerge::ObjId>> = None;
    for p in preds {
        if let Some(k) = msg_ops.get(&(p.actor().clone(), p.counter())) {
            if k != key {
                return Err(refused());
            }
            continue;
        }
        // Fast path: the op is a current value of the key.
        let cur = match &current {
            Some(c) => c,
            None => current.insert(
                doc.get_all(ROOT, key)
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .map(|(_, e)| e)
                    .collect(),
            ),
        };
        if cur.iter().any(|e| is(e, p)) {
            continue;
        }
        let vis = match &visible {
            Some(v) => v,
            None => visible.insert(
                doc.get_all_at(ROOT, key, frontier)
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .map(|(_, e)| e)
                    .collect(),
            ),
        };
        if !vis.iter().any(|e| is(e, p)) {
            return Err(refused());
        }
    }
    Ok(())
}

/// The highest sequence number of every actor in a document, kept up to date
/// incrementally from the heads it was last computed at (Automerge computes
/// "changes since these heads" from its vector clocks, so a refresh costs the
/// changes added since, not the history).
///
/// Automerge asserts (panics) unless an actor's new change carries exactly its
/// count of changes so far plus one; since every change it accepted satisfied
/// that, the count equals the highest sequence number kept here, and the check
/// is exact whatever the shape of the history (a walk through ancestors, as
/// before, had to give up on long histories and let changes through).
#[derive(Debug, Default)]
pub struct ActorSeqs {
    heads: Vec<ChangeHash>,
    max_seq: HashMap<ActorId, u64>,
    /// Every actor's highest op counter: its next change must start above.
    max_op: HashMap<ActorId, u64>,
}

impl ActorSeqs {
    fn refresh(&mut self, doc: &Automerge) {
        let heads = doc.get_heads();
        if heads == self.heads {
            return;
        }
        for m in doc.get_changes_meta(&self.heads) {
            let o = self.max_op.entry(m.actor.as_ref().clone()).or_default();
            *o = (*o).max(m.max_op);
            let s = self.max_seq.entry(m.actor.into_owned()).or_default();
            *s = (*s).max(m.seq);
        }
        self.heads = heads;
    }

    /// The actor's highest sequence number in the document (0: none).
    fn seq_of(&self, actor: &ActorId) -> u64 {
        self.max_seq.get(actor).copied().unwrap_or(0)
    }
}

/// Op ids are (counter, actor) and Automerge relies on their order without
/// checking it: a change must start above every op of its dependencies and
/// of its actor's earlier changes, and each op must come after the ops it
/// overwrites. (A peer's change re-sent with its dependencies cleared passed
/// every other check and corrupted the op order of the document; found by
/// the `change_fields` fuzz target.)
fn check_op_ids(
    doc: &Automerge,
    seqs: &ActorSeqs,
    in_message: &HashMap<ChangeHash, &Change>,
    c: &Change,
    prev_max_op: Option<u64>,
    ops: &[automerge::legacy::Op],
) -> Result<(), String> {
    let start = c.start_op().get();
    let mut floor =
        prev_max_op.unwrap_or_else(|| seqs.max_op.get(c.actor_id()).copied().unwrap_or(0));
    for dep in c.deps() {
        let m = match in_message.get(dep) {
            Some(d) => d.max_op(),
            None => doc.get_change_meta_by_hash(dep).map_or(0, |m| m.max_op),
        };
        floor = floor.max(m);
    }
    if start <= floor {
        return Err(format!(
            "change's op ids (from {start}) do not follow those of its history (up to {floor})"
        ));
    }
    for (i, op) in ops.iter().enumerate() {
        let counter = start.saturating_add(i as u64);
        if op.pred.iter().any(|p| p.counter() >= counter) {
            return Err("an op overwrites an op that is not older than itself".into());
        }
    }
    Ok(())
}

/// Every new change must carry its actor's next sequence number: Automerge
/// refuses a repeated one with an error only sometimes, and a skipped one
/// trips an assertion (a panic) deep in its change graph. A peer's honest
/// changes never skip, so a gap means forged or damaged changes. Changes come
/// sorted by actor and sequence number; `prev` is the previous new change's
/// actor and number.
fn check_sequence<'a>(
    seqs: &ActorSeqs,
    c: &'a Change,
    prev: &mut Option<(&'a ActorId, u64)>,
) -> Result<(), String> {
    let (actor, seq) = (c.actor_id(), c.seq());
    let expected = match *prev {
        Some((a, s)) if a == actor => s.saturating_add(1),
        _ => seqs.seq_of(actor).saturating_add(1),
    };
    *prev = Some((actor, seq));
    if seq != expected {
        return Err(format!(
            "change does not carry its actor's next sequence number (seq {seq}, expected {expected})"
        ));
    }
    Ok(())
}

fn uint(v: Option<&ScalarValue>, key: &str) -> Result<u64, String> {
    let n = match v {
        Some(ScalarValue::Uint(n)) => *n,
        Some(ScalarValue::Int(n)) if *n >= 0 => *n as u64,
        _ => return Err(format!("cell {key:?} must hold a non-negative integer")),
    };
    if n > CELL_MAX {
        return Err(format!("cell {key:?} exceeds 2^53"));
    }
    Ok(n)
}

/// The largest current value of a key in the document (all conflicting values).
pub fn current_uint(doc: &Automerge, key: &str) -> u64 {
    doc.get_all(ROOT, key)
        .ok()
        .map(|vals| {
            vals.iter()
                .filter_map(|(v, _)| v.as_scalar().and_then(scalar_u64))
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

fn cumulative(
    doc: &Automerge,
    key: &str,
    value: Option<&ScalarValue>,
    last: &mut HashMap<String, u64>,
) -> Result<(), String> {
    let n = uint(value, key)?;
    let before = last
        .get(key)
        .copied()
        .unwrap_or_else(|| current_uint(doc, key));
    if n < before {
        return Err(format!(
            "change lowers cumulative cell {key:?} from {before} to {n}"
        ));
    }
    last.insert(key.to_string(), n);
    Ok(())
}

pub(crate) fn check_op(
    doc_id: &DocId,
    doc: &Automerge,
    author: ActorKey,
    key: &str,
    value: Option<&ScalarValue>,
    buckets: u32,
    last: &mut HashMap<String, u64>,
) -> Result<(), String> {
    match doc_id {
        DocId::Ledger { bucket, epoch, .. } => {
            let (product, actor, _, carried) = crate::layout::parse_ledger_any(key)?;
            if carried {
                // A lower bound of a cell carried into a later epoch: any
                // node may write one (the reader takes the maximum), never
                // in epoch 0, and never deleted.
                if *epoch == 0 {
                    return Err(format!("carried cell {key:?} in a first epoch"));
                }
                if crate::ids::product_bucket(product, buckets) != *bucket {
                    return Err(format!(
                        "product {product} does not belong in bucket {bucket}"
                    ));
                }
                return match value {
                    Some(_) => uint(value, key).map(|_| ()),
                    None => Err(format!("carried cell {key:?} deleted")),
                };
            }
            if actor != author {
                return Err(format!(
                    "change by {} writes another writer's cell {key:?}",
                    author.hex()
                ));
            }
            if crate::ids::product_bucket(product, buckets) != *bucket {
                return Err(format!(
                    "product {product} does not belong in bucket {bucket}"
                ));
            }
            cumulative(doc, key, value, last)
        }
        DocId::Mesh if key.starts_with("retired/") => {
            crate::layout::parse_retired_key(key).ok_or_else(|| format!("bad mesh key {key:?}"))?;
            match value {
                Some(ScalarValue::Str(s)) => crate::layout::parse_retirement(s).map(|_| ()),
                _ => Err("a retirement can not be undone".into()),
            }
        }
        DocId::Mesh if key.starts_with("loc/") => {
            let loc = crate::layout::parse_location_key(key)
                .ok_or_else(|| format!("bad mesh key {key:?}"))?;
            match value {
                Some(ScalarValue::Str(s)) => {
                    let d = crate::layout::parse_declared_location(s)?;
                    if d.location != loc {
                        return Err(format!("declared location {key:?} names another location"));
                    }
                    Ok(())
                }
                _ => Err("declared locations are JSON strings".into()),
            }
        }
        DocId::Mesh => {
            let tag = parse_mesh_key(key)?;
            if tag != author.tag() {
                return Err(format!(
                    "change writes another node's directory entry {key:?}"
                ));
            }
            match value {
                Some(ScalarValue::Str(s)) => parse_node_info(s).map(|_| ()),
                _ => Err("directory entries are JSON strings".into()),
            }
        }
        DocId::Records { tag, .. } => {
            if *tag != author.tag() {
                return Err("change writes into another node's records".into());
            }
            parse_record_key(key)?;
            match value {
                Some(ScalarValue::Str(s)) if s.len() <= RECORD_BYTES_MAX => Ok(()),
                _ => Err(format!("record {key:?} must be a JSON string up to 64 KiB")),
            }
        }
        DocId::Products { bucket } => {
            let (product, _) = crate::layout::parse_product_key(key)?;
            if crate::ids::product_bucket(product, buckets) != *bucket {
                return Err(format!(
                    "product {product} does not belong in bucket {bucket}"
                ));
            }
            match value {
                None | Some(ScalarValue::Null) => Ok(()),
                Some(ScalarValue::Str(s)) if s.len() <= 4096 => Ok(()),
                _ => Err(format!("catalogue field {key:?} has an unsupported value")),
            }
        }
        DocId::Customers { .. } => match CustomerKey::parse(key)? {
            CustomerKey::Profile { .. } => match value {
                None | Some(ScalarValue::Null) | Some(ScalarValue::Boolean(_)) => Ok(()),
                // Personal data travels only as ciphertext: plaintext in a
                // change would stay in every history, out of erasure's reach.
                Some(ScalarValue::Str(s))
                    if s.len() <= 4096 && s.starts_with(crate::crypto::ENC_PREFIX) =>
                {
                    Ok(())
                }
                Some(ScalarValue::Str(_)) => Err(format!(
                    "profile field {key:?} is not ciphertext; personal data is refused in clear"
                )),
                _ => Err(format!("profile field {key:?} has an unsupported value")),
            },
            CustomerKey::Earned { actor, .. } | CustomerKey::Spent { actor, .. } => {
                if actor != author {
                    return Err(format!(
                        "change writes another writer's loyalty cell {key:?}"
                    ));
                }
                cumulative(doc, key, value, last)
            }
            CustomerKey::Erased { .. } => match value {
                Some(ScalarValue::Str(_)) => Ok(()),
                _ => Err("an erasure can not be undone".into()),
            },
        },
    }
}

/// The author's rights beyond the key it writes (DESIGN §7): checks that
/// need the receiver's view of the chain (`crate::authority`). Run after
/// `check_op`, so keys and values are well-formed here.
fn authorize_op(
    doc_id: &DocId,
    auth: AuthView<'_>,
    in_message: &std::collections::BTreeSet<NodeTag>,
    author: ActorKey,
    key: &str,
    value: Option<&ScalarValue>,
) -> Result<(), Refusal> {
    let text = match value {
        Some(ScalarValue::Str(s)) => s.as_str(),
        _ => return Ok(()),
    };
    match doc_id {
        DocId::Mesh if key.starts_with("retired/") => {
            let retired = crate::layout::parse_retired_key(key)
                .ok_or_else(|| format!("bad mesh key {key:?}"))?;
            let successor = crate::layout::parse_retirement(text)?;
            Ok(auth.check_retirement(author.tag(), retired, successor, in_message)?)
        }
        DocId::Mesh if key.starts_with("loc/") => Ok(()),
        DocId::Mesh => {
            let info = parse_node_info(text)?;
            Ok(auth
                .views
                .bound
                .check_directory_entry(author.tag(), &info)?)
        }
        DocId::Records { .. } => {
            #[derive(serde::Deserialize)]
            struct Writer {
                node: Option<String>,
                reservation_id: Option<String>,
                creator: Option<String>,
            }
            let Ok(w) = serde_json::from_str::<Writer>(text) else {
                // Not an object: names no writer, and nothing indexes it.
                return Ok(());
            };
            if let Some(n) = &w.node {
                auth.check_record_node(author.tag(), n)?;
            }
            if let (Ok((crate::layout::RecordKind::ReservationClose, _)), Some(id), Some(c)) =
                (parse_record_key(key), &w.reservation_id, &w.creator)
            {
                auth.check_reservation_close(author.tag(), id, c)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Checks changes a node wrote itself with the per-op rules a peer applies
/// (`check_op`: owned keys, ranges, record sizes and ids) — the simulator's
/// proof that no honest node ever writes a change that blocks its own
/// replication. Sequence and dependency checks need the receiver's document
/// and are left to `validate_changes`.
pub fn check_changes_as_peer(
    doc_id: &DocId,
    changes: &[Change],
    buckets: u32,
) -> Result<(), String> {
    let empty = Automerge::new();
    let mut last: HashMap<String, u64> = HashMap::new();
    for change in changes {
        let author = ActorKey::from_bytes(change.actor_id().to_bytes())
            .ok_or("change by an actor id that is not a storemesh actor")?;
        for op in &change.decode().operations {
            let automerge::legacy::Key::Map(k) = &op.key else {
                return Err("change writes a list element".into());
            };
            let value = match &op.action {
                automerge::legacy::OpType::Put(v) => Some(v.clone()),
                automerge::legacy::OpType::Delete => None,
                _ => return Err(format!("change uses an unsupported operation on {k:?}")),
            };
            // Cumulative cells are compared within the changes only (the
            // receiver's earlier values are not at hand here).
            if value.is_none() && matches!(doc_id, DocId::Customers { .. }) {
                continue;
            }
            check_op(
                doc_id,
                &empty,
                author,
                k,
                value.as_ref(),
                buckets,
                &mut last,
            )?;
        }
    }
    Ok(())
}

/// What validation needs to know about the chain to authorize a change.
#[derive(Clone, Copy)]
pub struct AuthView<'a> {
    pub own: NodeTag,
    pub views: &'a Views,
    pub authority: &'a Authority,
}

impl AuthView<'_> {
    /// Whether `tag` is a member this node knows: itself, a configured peer,
    /// or a node with a directory entry (`in_message`: entries arriving in
    /// the same message), and not retired.
    pub fn is_member(&self, tag: NodeTag, in_message: &BTreeSet<NodeTag>) -> bool {
        let known = tag == self.own
            || self.views.bound.has_name(tag)
            || self.views.nodes.contains_key(&tag)
            || in_message.contains(&tag);
        known && !self.views.retired.contains_key(&tag)
    }

    /// A retirement of `retired` to `successor` written by `author`.
    pub fn check_retirement(
        &self,
        author: NodeTag,
        retired: NodeTag,
        successor: NodeTag,
        in_message: &BTreeSet<NodeTag>,
    ) -> Result<(), Unauthorized> {
        if let Some(admins) = &self.authority.administrators {
            if !admins.contains(&author) {
                return Err(Unauthorized(format!(
                    "retirement written by {author}, not an administrator here"
                )));
            }
        }
        if successor == retired {
            return Err(Unauthorized("a node can not succeed itself".into()));
        }
        if !self.is_member(successor, in_message) {
            return Err(Unauthorized(format!(
                "retirement names a successor {successor} that is no member here"
            )));
        }
        Ok(())
    }

    /// A close of reservation `id` (created by `creator`) written by
    /// `author`: only the fulfilling node (or its successor) closes one. A
    /// close that arrives before its reservation is let through (the
    /// fulfiller is not known yet).
    pub fn check_reservation_close(
        &self,
        author: NodeTag,
        id: &str,
        creator: &str,
    ) -> Result<(), Unauthorized> {
        let fulfiller = self
            .views
            .reservations
            .get(id)
            .and_then(|m| m.get(creator))
            .and_then(|r| r.fulfil_by);
        match fulfiller {
            Some(f) if self.views.resolve(f) != self.views.resolve(author) => Err(Unauthorized(
                format!("{author} closes reservation {id:?}, which another node fulfils"),
            )),
            _ => Ok(()),
        }
    }

    /// A record written by `author` that names `node` as its writer.
    pub fn check_record_node(&self, author: NodeTag, node: &str) -> Result<(), Unauthorized> {
        match self.views.tag_of(node) {
            Some(t) if t != author => Err(Unauthorized(format!(
                "record by {author} names another node ({node:?}) as its writer"
            ))),
            _ => Ok(()),
        }
    }
}
