//! An in-memory mesh of engines for tests: links are ordered frame queues that
//! can be delivered partially, cut and reconnected. Persistence is skipped (the
//! node crate tests the store); everything else is the production code path.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::engine::{Engine, EngineConfig, Policy};
use crate::ids::NodeId;
use crate::ops::{
    Count, CountLine, Grant, IdemRecord, Op, OpError, OpReply, QtyLine, Receipt, Sale, SaleLine,
};

/// A receipt of `lines` (product, quantity) at `location`.
pub fn receipt(id: &str, location: &str, lines: &[(u64, u64)]) -> Op {
    Op::Receipt(Receipt {
        receipt_id: id.into(),
        location: location.into(),
        lines: lines
            .iter()
            .map(|(p, q)| QtyLine {
                sku: None,
                product_id: *p,
                quantity: *q,
            })
            .collect(),
        ..Default::default()
    })
}

/// A count of `lines` (product, counted) at `location`.
pub fn count(id: &str, loc: &str, lines: &[(u64, u64)]) -> Op {
    Op::Count(Count {
        count_id: id.into(),
        location: loc.into(),
        lines: lines
            .iter()
            .map(|(p, c)| CountLine {
                product_id: *p,
                counted: *c,
            })
            .collect(),
        ..Default::default()
    })
}

/// A grant of `q` units of product `p` at `loc` to node `to`.
pub fn grant(id: &str, p: u64, loc: &str, to: &str, q: u64) -> Op {
    Op::Grant(Grant {
        grant_id: id.into(),
        product_id: p,
        location: loc.into(),
        to: to.into(),
        quantity: q,
        ..Default::default()
    })
}

/// A sale of `lines` (product, quantity) at `location` (`None`: the node picks).
pub fn sale(id: &str, location: Option<&str>, lines: &[(u64, u64)]) -> Op {
    Op::Sale(Sale {
        sale_id: id.into(),
        location: location.map(str::to_string),
        customer_id: None,
        currency: None,
        lines: lines
            .iter()
            .map(|(p, q)| SaleLine {
                sku: None,
                product_id: *p,
                quantity: *q,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
}

/// A restocking return of `quantity` of `product` at `loc0`, checked
/// against the original sale `sale`.
pub fn return_of(id: &str, sale: &str, product: u64, quantity: u64) -> Op {
    use crate::ops::{Disposition, Return, ReturnLine};
    Op::Return(Return {
        return_id: id.into(),
        location: "loc0".into(),
        original_sale_id: Some(sale.into()),
        customer_id: None,
        lines: vec![ReturnLine {
            product_id: product,
            quantity,
            disposition: Disposition::Restock,
        }],
        occurred_at: None,
        register_id: None,
        staff_id: None,
    })
}

/// An in-memory stand-in for the node's redb certificate tables: what the
/// batches stored, read back by the engine when memory lacks it.
#[derive(Clone, Default)]
pub struct MemArchive(
    pub std::sync::Arc<std::sync::Mutex<HashMap<String, Vec<crate::signing::Cert>>>>,
);

impl MemArchive {
    /// Stores a committed batch's certificates under their documents.
    pub fn store(&self, batch: &crate::engine::Batch) {
        let by_id: HashMap<crate::signing::CertId, &crate::signing::Cert> =
            batch.certs.iter().map(|c| (c.id(), c)).collect();
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (doc, id) in &batch.cert_links {
            let cert = by_id
                .get(id)
                .map(|c| (*c).clone())
                .or_else(|| m.values().flatten().find(|c| c.id() == *id).cloned());
            if let Some(c) = cert {
                let list = m.entry(doc.clone()).or_default();
                if !list.contains(&c) {
                    list.push(c);
                }
            }
        }
        for d in &batch.retired {
            m.remove(d);
        }
    }
}

impl crate::signing::CertArchive for MemArchive {
    fn doc_certs(&self, doc: &str) -> Vec<crate::signing::Cert> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(doc).cloned().unwrap_or_default()
    }
}

pub struct TestNode {
    pub engine: Engine,
    /// Where this node's certificates are "stored" (`None`: it keeps them
    /// all in memory).
    pub archive: Option<MemArchive>,
    /// Idempotency records that reached "disk".
    pub idem: HashMap<String, IdemRecord>,
}

pub struct TestMesh {
    pub nodes: Vec<TestNode>,
    /// (from, to) → frames in flight, in order.
    pub links: BTreeMap<(usize, usize), VecDeque<Vec<u8>>>,
    pub now_ms: u64,
}

pub fn node_id(i: usize) -> NodeId {
    let mut b = [0u8; 32];
    b[0] = 0xa0 + i as u8;
    b[31] = i as u8;
    NodeId(b)
}

/// The signature scheme of the in-memory mesh (deterministic).
pub fn scheme() -> crate::signing::KeyedHashScheme {
    crate::signing::KeyedHashScheme::new([0x5e; 32])
}

/// Makes `e` sign with its own key of [`scheme`] and verify its peers'.
pub fn sign(e: &mut Engine) {
    let id = e.config().node_id;
    e.set_signing(Box::new(scheme().signer(id)), Box::new(scheme()));
}

pub fn config(i: usize, buckets: u32) -> EngineConfig {
    EngineConfig {
        node_id: node_id(i),
        name: format!("n{i}"),
        location: format!("loc{i}"),
        role: "store".into(),
        policy: Policy::Strict,
        buckets,
        loyalty_points_per_unit: 1,
        timezone: None,
    }
}

impl TestMesh {
    pub fn new(n: usize, buckets: u32) -> TestMesh {
        TestMesh::with_configured(n, buckets, |_, _| true)
    }

    /// A mesh in which node `i` has node `j` in its configuration only if
    /// `configured(i, j)` (e.g. a hub topology: stores know only the hub).
    /// Every node signs its changes and verifies its peers'.
    pub fn with_configured(
        n: usize,
        buckets: u32,
        configured: impl Fn(usize, usize) -> bool,
    ) -> TestMesh {
        let mut nodes = Vec::new();
        for i in 0..n {
            let mut e = Engine::new(config(i, buckets), [i as u8, 1, 2, 3]);
            sign(&mut e);
            for j in 0..n {
                if j != i && configured(i, j) {
                    e.add_configured_peer(&format!("n{j}"), node_id(j));
                }
            }
            e.finish_open();
            nodes.push(TestNode {
                engine: e,
                idem: HashMap::new(),
                archive: None,
            });
        }
        let mut m = TestMesh {
            nodes,
            links: BTreeMap::new(),
            now_ms: 1_795_773_600_000,
        };
        for i in 0..n {
            m.commit(i);
        }
        m
    }

    pub fn id(&self, i: usize) -> NodeId {
        self.nodes[i].engine.config().node_id
    }

    /// The node at the far end of one of `from`'s links that has identity `id`
    /// (a cloned identity may exist twice in a mesh, but not on one node's links).
    fn index_of(&self, from: usize, id: NodeId) -> Option<usize> {
        self.links
            .keys()
            .find(|(a, b)| *a == from && self.id(*b) == id)
            .map(|(_, b)| *b)
    }

    /// Adds a copy of node `i`'s data directory running as a new process (same
    /// identity, fresh incarnation), unconnected. Returns its index.
    pub fn clone_node(&mut self, i: usize, incarnation: [u8; 4]) -> usize {
        let src = &self.nodes[i].engine;
        let mut e = Engine::new(src.config().clone(), incarnation);
        sign(&mut e);
        for (id, _) in src.documents() {
            if let Some(bytes) = src.document_bytes(&id) {
                e.load_doc(&id, &[bytes], Vec::new())
                    .expect("a saved document loads");
            }
        }
        e.load_certs(src.held_certs());
        for j in 0..self.nodes.len() {
            if self.id(j) != self.id(i) {
                let name = self.nodes[j].engine.config().name.clone();
                e.add_configured_peer(&name, self.id(j));
            }
        }
        e.finish_open();
        let idem = self.nodes[i].idem.clone();
        self.nodes.push(TestNode {
            engine: e,
            idem,
            archive: None,
        });
        self.nodes.len() - 1
    }

    /// Flushes node `i`, "persists" and releases its frames onto the links.
    pub fn commit(&mut self, i: usize) {
        let now = self.now_ms;
        let node = &mut self.nodes[i];
        // As the node loop's step does before its flush.
        node.engine.settle_ownerless_imports(now);
        let batch = node.engine.flush(now);
        if let Some(a) = &node.archive {
            a.store(&batch);
        }
        for (k, r) in batch.idem {
            node.idem.insert(k, r);
        }
        node.engine.committed(now);
        let out = node.engine.take_outgoing();
        for (peer, frame) in out {
            if let Some(j) = self.index_of(i, peer) {
                if let Some(q) = self.links.get_mut(&(i, j)) {
                    q.push_back(frame);
                }
            }
        }
    }

    pub fn execute(&mut self, i: usize, op: Op) -> Result<OpReply, OpError> {
        self.now_ms += 7;
        let now = self.now_ms;
        let node = &mut self.nodes[i];
        let idem = node.idem.clone();
        node.engine.execute(op, now, &|k| idem.get(k).cloned())
    }

    pub fn connected(&self, a: usize, b: usize) -> bool {
        self.links.contains_key(&(a, b))
    }

    /// Connects `a` and `b`; as over the real transport, each hello carries
    /// the sender's current digest.
    pub fn connect(&mut self, a: usize, b: usize) {
        let (ha, hb) = (
            self.nodes[a].engine.hello_digest(),
            self.nodes[b].engine.hello_digest(),
        );
        self.connect_with(a, b, Some(ha), Some(hb));
    }

    /// Connects `a` and `b` with the given hello digests (`None`: a peer whose
    /// hello carries none; a stale digest: a hello sent before a commit).
    pub fn connect_with(
        &mut self,
        a: usize,
        b: usize,
        hello_a: Option<crate::wire::HelloDigest>,
        hello_b: Option<crate::wire::HelloDigest>,
    ) {
        if a == b || self.connected(a, b) {
            return;
        }
        self.links.insert((a, b), VecDeque::new());
        self.links.insert((b, a), VecDeque::new());
        let (ia, ib) = (self.id(a), self.id(b));
        let now = self.now_ms;
        self.nodes[a]
            .engine
            .peer_up_with_digest(ib, Vec::new(), hello_b, now);
        self.nodes[b]
            .engine
            .peer_up_with_digest(ia, Vec::new(), hello_a, now);
        self.commit(a);
        self.commit(b);
    }

    pub fn disconnect(&mut self, a: usize, b: usize) {
        if self.links.remove(&(a, b)).is_none() {
            return;
        }
        self.links.remove(&(b, a));
        let (ia, ib) = (self.id(a), self.id(b));
        self.nodes[a].engine.peer_down(ib);
        self.nodes[b].engine.peer_down(ia);
        self.commit(a);
        self.commit(b);
    }

    /// Delivers up to `k` frames on the link a → b; returns how many.
    pub fn deliver(&mut self, a: usize, b: usize, k: usize) -> usize {
        let mut n = 0;
        while n < k {
            let Some(frame) = self.links.get_mut(&(a, b)).and_then(|q| q.pop_front()) else {
                break;
            };
            n += 1;
            self.now_ms += 1;
            let now = self.now_ms;
            let from = self.id(a);
            let body = &frame[4..];
            if let Err(e) = self.nodes[b].engine.receive(from, body, now) {
                panic!("protocol violation between honest engines: {e}");
            }
            self.commit(b);
        }
        n
    }

    /// Delivers the frames in flight on a → b to b's engine without committing
    /// b's batch in between (frames and operations interleave in one batch).
    pub fn deliver_into_open_batch(&mut self, a: usize, b: usize) -> usize {
        let frames: Vec<Vec<u8>> = self
            .links
            .get_mut(&(a, b))
            .map(|q| q.drain(..).collect())
            .unwrap_or_default();
        let from = self.id(a);
        for f in &frames {
            self.now_ms += 1;
            let now = self.now_ms;
            if let Err(e) = self.nodes[b].engine.receive(from, &f[4..], now) {
                panic!("protocol violation between honest engines: {e}");
            }
        }
        frames.len()
    }

    /// Takes node `i`'s frames for peers without committing its open batch,
    /// for sans-IO tests of what those frames carry (a node never does this:
    /// `Engine::commit` releases frames only once the batch is durable).
    pub fn take_frames_of_open_batch(&mut self, i: usize) -> Vec<(NodeId, Vec<u8>)> {
        self.nodes[i].engine.take_outgoing()
    }

    /// Delivers everything until no frame is in flight (bounded).
    pub fn settle(&mut self) -> usize {
        let mut total = 0;
        for _ in 0..10_000 {
            let keys: Vec<(usize, usize)> = self.links.keys().copied().collect();
            let mut moved = 0;
            for (a, b) in keys {
                moved += self.deliver(a, b, usize::MAX);
            }
            total += moved;
            if moved == 0 {
                return total;
            }
        }
        panic!("mesh did not settle after 10,000 rounds");
    }

    /// Gives node `i` a certificate archive: from now on it keeps in memory
    /// only the certificates of its live documents, as the node does.
    pub fn use_archive(&mut self, i: usize) {
        let a = MemArchive::default();
        a.store(&crate::engine::Batch {
            certs: self.nodes[i]
                .engine
                .held_certs()
                .into_iter()
                .map(|(_, c)| c)
                .collect(),
            cert_links: self.nodes[i]
                .engine
                .held_certs()
                .into_iter()
                .map(|(d, c)| (d, c.id()))
                .collect(),
            ..Default::default()
        });
        self.nodes[i].engine.set_cert_archive(Box::new(a.clone()));
        self.nodes[i].archive = Some(a);
    }

    pub fn full_mesh(&mut self) {
        for a in 0..self.nodes.len() {
            for b in a + 1..self.nodes.len() {
                self.connect(a, b);
            }
        }
    }
}
