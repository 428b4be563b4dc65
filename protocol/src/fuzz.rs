//! Fuzz targets that run on stable Rust (no cargo-fuzz, which needs nightly):
//! each target takes arbitrary bytes and must neither panic nor hang; inputs
//! are produced by mutating a seed corpus taken from real traffic between
//! honest engines (frames, Automerge chunks, operation JSON). The driver is
//! random-mutation (not coverage-guided): splices, bit flips, byte and
//! varint edits, truncations, and for structured targets edits *inside* a
//! decoded message, so inputs get past the frame and postcard layers into
//! validation and Automerge.
//!
//! Sans-IO like the rest of `protocol/`: the runners (a short one in
//! `tests/fuzz.rs`, a long one in `examples/fuzz.rs`) keep crashes as files.

use std::collections::BTreeMap;

use crate::engine::Engine;
use crate::ops::Op;
use crate::sync::Msg;
use crate::testkit::{self, TestMesh};

/// The targets, by name.
pub const TARGETS: &[&str] = &["frame", "receive", "change", "change_fields", "op_json"];

/// Longest input a mutation produces: bounded work per execution.
pub const INPUT_BYTES_MAX: usize = 64 * 1024;

/// A small deterministic generator (xorshift64*): runs replay from a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// Mutates `input`, using `corpus` for splices.
pub fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let len = out.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = [0, 1, 0x7f, 0x80, 0xff][rng.below(5)];
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let b = rng.next_u64() as u8;
                out.splice(i..i, std::iter::repeat_n(b, n));
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = (1 + rng.below(16)).min(len - i);
                out.drain(i..i + n);
            }
            4 if len > 0 => out.truncate(rng.below(len)),
            5 if !corpus.is_empty() => {
                // Splice a piece of another input in.
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let a = rng.below(other.len());
                    let b = a + rng.below(other.len() - a + 1);
                    let i = rng.below(len + 1);
                    out.splice(i..i, other[a..b].iter().copied());
                }
            }
            6 if len > 0 => {
                // A varint made huge: lengths and counts are where limits live.
                let i = rng.below(len);
                let big = [0xff, 0xff, 0xff, 0xff, 0x0f];
                out.splice(i..(i + 1).min(len), big);
            }
            7 if len >= 2 => {
                // Copy a run within the input (repeated structures).
                let a = rng.below(len);
                let n = (1 + rng.below(64)).min(len - a);
                let piece = out[a..a + n].to_vec();
                let i = rng.below(len + 1);
                out.splice(i..i, piece);
            }
            _ => {
                let i = rng.below(len + 1);
                out.insert(i, rng.next_u64() as u8);
            }
        }
    }
    out.truncate(INPUT_BYTES_MAX);
    out
}

/// A mesh of two honest engines after some traffic: the victim (node 0)
/// and the peer whose frames are fuzzed (node 1).
pub struct Harness {
    pub mesh: TestMesh,
    /// Frames node 1 sent node 0 (postcard payloads, uncompressed).
    pub frames: Vec<Vec<u8>>,
    /// Automerge chunks from those frames (changes, documents, bundles).
    pub chunks: Vec<Vec<u8>>,
    /// Single changes from those frames, with their document.
    pub changes: Vec<(String, automerge::Change)>,
    pub execs: u64,
}

/// Operations that make honest traffic touching every kind of document.
fn seed_ops() -> Vec<(usize, Op)> {
    let mut ops = vec![
        (1, testkit::receipt("r1", "loc1", &[(5, 10), (6, 3)])),
        (0, testkit::receipt("r0", "loc0", &[(5, 4)])),
        (1, testkit::sale("s1", None, &[(5, 2)])),
    ];
    for v in op_json_seeds() {
        if let Ok(op) = serde_json::from_slice::<Op>(&v) {
            ops.push((1, op));
        }
    }
    ops
}

/// Client operations as JSON (the HTTP bodies' content, after the API has
/// picked the operation by its path).
pub fn op_json_seeds() -> Vec<Vec<u8>> {
    [
        r#"{"Sale":{"sale_id":"s9","lines":[{"product_id":5,"quantity":1}]}}"#,
        r#"{"Receipt":{"receipt_id":"r9","location":"loc1","lines":[{"product_id":7,"quantity":5}]}}"#,
        r#"{"Count":{"count_id":"c9","location":"loc1","lines":[{"product_id":5,"counted":2}]}}"#,
        r#"{"Grant":{"grant_id":"g9","product_id":5,"location":"loc1","to":"n0","quantity":1}}"#,
        r#"{"CustomerPut":{"customer_id":"cust-1","update":{"name":"A","email":"a@example.org"}}}"#,
        r#"{"Return":{"return_id":"t9","location":"loc1","lines":[{"product_id":5,"quantity":1,"disposition":"restock"}]}}"#,
        r#"{"CustomerErase":{"customer_id":"cust-1"}}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

impl Harness {
    pub fn new() -> Harness {
        let mut mesh = TestMesh::new(2, 8);
        mesh.connect(0, 1);
        let mut frames = Vec::new();
        for (i, op) in seed_ops() {
            let _ = mesh.execute(i, op);
            mesh.commit(i);
            // Keep what node 1 sends node 0 as seeds, then deliver it.
            if let Some(q) = mesh.links.get(&(1, 0)) {
                frames.extend(q.iter().filter_map(|f| payload(&f[4..])));
            }
            mesh.settle();
        }
        let mut chunks = Vec::new();
        let mut changes = Vec::new();
        for f in &frames {
            if let Ok(msg) = postcard::from_bytes::<Msg>(f) {
                let (doc, found) = match msg {
                    Msg::Push { doc, data, .. } | Msg::Fallback { doc, data } => (doc, vec![data]),
                    Msg::Sync { doc, data } => match automerge::sync::Message::decode(&data) {
                        Ok(m) => (doc, m.changes.iter().map(|c| c.to_vec()).collect()),
                        Err(_) => continue,
                    },
                    _ => continue,
                };
                for c in found {
                    if let Ok(cs) = crate::validate::changes_in_chunk(&c) {
                        changes.extend(cs.into_iter().map(|ch| (doc.clone(), ch)));
                    }
                    chunks.push(c);
                }
            }
        }
        Harness {
            mesh,
            frames,
            chunks,
            changes,
            execs: 0,
        }
    }

    /// The seed corpus of a target.
    pub fn seeds(&self, target: &str) -> Vec<Vec<u8>> {
        match target {
            "frame" | "receive" => self.frames.clone(),
            "change" => self.chunks.clone(),
            "op_json" => op_json_seeds(),
            "change_fields" => (0u8..16)
                .map(|i| vec![i, i.wrapping_mul(37), 200, i])
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Runs one input through a target. A panic escaping this is a finding.
    pub fn exec(&mut self, target: &str, input: &[u8]) {
        self.execs += 1;
        match target {
            "frame" => {
                let mut body = vec![crate::wire::FRAME_VERSION];
                body.extend_from_slice(input);
                let _ = crate::wire::decode_frame::<Msg>(&body);
                let _ = crate::wire::decode_frame::<Msg>(input);
                let _ = crate::wire::Hello::decode_frame(input);
            }
            "receive" => {
                let mut body = vec![crate::wire::FRAME_VERSION];
                body.extend_from_slice(input);
                self.receive(&body);
            }
            "change" => {
                // The chunk as a push, and inside a sync message.
                let doc = ledger_doc();
                let push = Msg::Push {
                    doc: doc.clone(),
                    data: input.to_vec(),
                    seen: vec![],
                };
                if let Ok(f) = postcard::to_stdvec(&push) {
                    let mut body = vec![crate::wire::FRAME_VERSION];
                    body.extend_from_slice(&f);
                    self.receive(&body);
                }
                let sync = Msg::Fallback {
                    doc,
                    data: input.to_vec(),
                };
                if let Ok(f) = postcard::to_stdvec(&sync) {
                    let mut body = vec![crate::wire::FRAME_VERSION];
                    body.extend_from_slice(&f);
                    self.receive(&body);
                }
            }
            "change_fields" => {
                if let Some((doc, data)) = self.edit_change(input) {
                    let push = Msg::Push {
                        doc,
                        data,
                        seen: vec![],
                    };
                    if let Ok(f) = postcard::to_stdvec(&push) {
                        let mut body = vec![crate::wire::FRAME_VERSION];
                        body.extend_from_slice(&f);
                        self.receive(&body);
                    }
                }
            }
            "op_json" => {
                if let Ok(op) = serde_json::from_slice::<Op>(input) {
                    let _ = self.mesh.execute(0, op);
                    self.mesh.commit(0);
                }
            }
            t => panic!("unknown fuzz target {t}"),
        }
        // Keep the victim's state from growing without bound.
        if self.execs.is_multiple_of(2000) {
            *self = Harness::new_keeping(self.execs);
        }
    }

    /// An honest change edited field by field as `input` says, re-encoded
    /// with a valid checksum (so the edit reaches validation and Automerge,
    /// which random bytes never do). `None` if the encoder refuses the edit.
    pub fn edit_change(&self, input: &[u8]) -> Option<(String, Vec<u8>)> {
        use automerge::legacy::{Key, OpType};
        use automerge::ScalarValue;
        let (first, rest) = input.split_first()?;
        let (doc, base) = self
            .changes
            .get(usize::from(*first) % self.changes.len().max(1))?;
        let mut e = automerge::ExpandedChange::from(base);
        e.hash = None;
        let heads = self.mesh.nodes[0].engine.heads_of(doc).unwrap_or_default();
        for pair in rest.chunks(2) {
            let (what, v) = (pair[0], *pair.get(1).unwrap_or(&0));
            let v64 = u64::from(v);
            match what % 12 {
                0 => e.seq = v64,
                1 => e.seq = e.seq.saturating_add(v64),
                2 => {
                    e.start_op =
                        std::num::NonZeroU64::new(v64.max(1)).unwrap_or(std::num::NonZeroU64::MIN)
                }
                3 => e.deps.clear(),
                4 => e.deps = heads.clone(),
                5 => e.extra_bytes = vec![v; usize::from(v % 4)],
                6 => {
                    let mut b = e.actor_id.to_bytes().to_vec();
                    if let Some(x) = b.last_mut() {
                        *x ^= v;
                    }
                    e.actor_id = automerge::ActorId::from(b);
                }
                7 => {
                    if let Some(op) = e.operations.first_mut() {
                        op.action = OpType::Put(match v % 5 {
                            0 => ScalarValue::Int(-i64::from(v)),
                            1 => ScalarValue::Uint(u64::MAX - v64),
                            2 => ScalarValue::Str("x".repeat(usize::from(v)).into()),
                            3 => ScalarValue::Null,
                            _ => ScalarValue::Uint(v64 << 50),
                        });
                    }
                }
                8 => {
                    if let Some(op) = e.operations.first_mut() {
                        if let Key::Map(k) = &op.key {
                            let mut k = k.to_string();
                            let at = usize::from(v) % (k.len() + 1);
                            k.insert(at.min(k.len()), char::from(b'/' + v % 60));
                            while !k.is_char_boundary(k.len()) {
                                k.pop();
                            }
                            op.key = Key::Map(k.into());
                        }
                    }
                }
                9 => {
                    if let Some(op) = e.operations.first().cloned() {
                        e.operations.push(op);
                    }
                }
                10 => e.operations.truncate(usize::from(v % 3)),
                _ => {
                    if let Some(op) = e.operations.first_mut() {
                        op.action = match v % 3 {
                            0 => OpType::Delete,
                            1 => OpType::Increment(i64::from(v)),
                            _ => OpType::Make(automerge::ObjType::Map),
                        };
                    }
                }
            }
        }
        // The encoder itself asserts on some edits: those are not inputs a
        // peer could send, so they are skipped, not counted.
        let encoded = std::panic::catch_unwind(move || automerge::Change::from(e)).ok()?;
        Some((doc.clone(), encoded.raw_bytes().to_vec()))
    }

    fn new_keeping(execs: u64) -> Harness {
        let mut h = Harness::new();
        h.execs = execs;
        h
    }

    fn receive(&mut self, body: &[u8]) {
        let peer = testkit::node_id(1);
        let now = self.mesh.now_ms;
        let engine: &mut Engine = &mut self.mesh.nodes[0].engine;
        if engine.receive(peer, body, now).is_err() {
            // The shell disconnects; the next connection starts afresh.
            engine.peer_down(peer);
            engine.peer_up(peer, Vec::new(), now);
        }
        // What the victim would commit and send must work too.
        self.mesh.commit(0);
        self.mesh.links.values_mut().for_each(|q| q.clear());
    }
}

impl Default for Harness {
    fn default() -> Harness {
        Harness::new()
    }
}

fn ledger_doc() -> String {
    crate::layout::DocId::Ledger {
        location: "loc1".into(),
        bucket: crate::ids::product_bucket(5, 8),
        epoch: 0,
    }
    .encode()
}

/// The postcard payload of a frame body (inflated if compressed).
fn payload(body: &[u8]) -> Option<Vec<u8>> {
    let msg: Msg = crate::wire::decode_frame(body).ok()?;
    postcard::to_stdvec(&msg).ok()
}

/// What one run found.
#[derive(Debug, Default)]
pub struct RunStats {
    pub execs: u64,
    /// Panic message → the first input that caused it.
    pub crashes: BTreeMap<String, Vec<u8>>,
}

/// Runs `target` for `execs` mutated inputs from `seed`, catching panics.
/// `regressions` run first, unmutated.
pub fn run(target: &str, seed: u64, execs: u64, regressions: &[Vec<u8>]) -> RunStats {
    let mut h = Harness::new();
    let mut corpus = h.seeds(target);
    let mut rng = Rng::new(seed);
    let mut stats = RunStats::default();
    let inputs = regressions.iter().cloned().map(Some).chain(
        (0..execs).map(|_| None), // mutated below
    );
    for fixed in inputs {
        let input = match fixed {
            Some(i) => i,
            None if corpus.is_empty() => Vec::new(),
            None => {
                let base = corpus[rng.below(corpus.len())].clone();
                mutate(&mut rng, &base, &corpus)
            }
        };
        stats.execs += 1;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            h.exec(target, &input);
        }));
        if let Err(p) = r {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            stats.crashes.entry(what).or_insert(input);
            // The engine may be half-way through a change: start over.
            h = Harness::new_keeping(h.execs);
        } else if stats.execs.is_multiple_of(64) && corpus.len() < 4096 {
            // Keep some mutants as bases: deeper edits build up.
            corpus.push(input);
        }
    }
    stats
}
