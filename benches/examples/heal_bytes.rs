//! Diagnostic probe for issue 18 (row 7's heal bytes): where the bytes of a
//! heal go on the anchor's workload, on the in-memory mesh of the production
//! engine (no transport, no timing). A hub `n0` peered with two stores; each
//! store receives 50 units of products 1..=10,000 (20 receipts of 500 lines);
//! `n2` is cut off; 2,000 single-unit sales at each store, one commit each
//! (products mulberry32 seed 1 / 2, `% 10,000 + 1`, as in row 7); heal; every
//! frame until the mesh is quiet is recorded and split by message kind, and
//! each frame's payload is compressed again at other DEFLATE levels.
//!
//! ```text
//! cargo run --release -p storemesh-benches --example heal_bytes
//! ```
use std::io::{Read, Write};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use storemesh_benches::workload::Mulberry32;
use storemesh_protocol::sync::{Msg, MSG_KINDS};
use storemesh_protocol::testkit::{receipt, sale, TestMesh};
use storemesh_protocol::wire::{FRAME_VERSION, FRAME_VERSION_DEFLATE};

const PRODUCTS: u64 = 10_000;
const SALES: usize = 2_000;

/// The frame's payload (postcard), inflated if it travelled compressed.
fn payload(body: &[u8]) -> Vec<u8> {
    match body.split_first() {
        Some((&FRAME_VERSION, p)) => p.to_vec(),
        Some((&FRAME_VERSION_DEFLATE, z)) => {
            let mut out = Vec::new();
            flate2::read::DeflateDecoder::new(z)
                .read_to_end(&mut out)
                .expect("an honest frame inflates");
            out
        }
        _ => panic!("unknown frame version"),
    }
}

/// Wire size (length prefix and version byte included) of `payload` sent
/// compressed at `level` when that is smaller, as `wire::encode_frame` does.
fn wire_at(payload: &[u8], level: u32) -> usize {
    if payload.len() < storemesh_protocol::wire::DEFLATE_MIN_BYTES {
        return 5 + payload.len();
    }
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(level));
    z.write_all(payload).unwrap();
    let z = z.finish().unwrap();
    5 + z.len().min(payload.len())
}

fn main() {
    let mut m = TestMesh::new(3, 64);
    m.connect(0, 1);
    m.connect(0, 2);
    let all: Vec<u64> = (1..=PRODUCTS).collect();
    for (i, loc) in [(1usize, "loc1"), (2, "loc2")] {
        for (k, chunk) in all.chunks(500).enumerate() {
            let lines: Vec<(u64, u64)> = chunk.iter().map(|p| (*p, 50)).collect();
            m.execute(i, receipt(&format!("{loc}-rcv-{k}"), loc, &lines))
                .unwrap();
            m.commit(i);
        }
    }
    m.settle();
    m.disconnect(0, 2);
    let (mut gb, mut gc) = (Mulberry32::new(1), Mulberry32::new(2));
    for k in 0..SALES {
        for (i, g, tag) in [(1usize, &mut gb, "b"), (2, &mut gc, "c")] {
            let p = u64::from(g.next()) % PRODUCTS + 1;
            m.execute(
                i,
                sale(&format!("{tag}-{k}"), Some(&format!("loc{i}")), &[(p, 1)]),
            )
            .unwrap();
            m.commit(i);
        }
        if k % 50 == 0 {
            m.settle();
        }
    }
    m.settle();
    // The heal: record every frame until quiet.
    m.connect(0, 2);
    let mut frames: Vec<(usize, usize, Vec<u8>)> = Vec::new();
    for _ in 0..10_000 {
        let keys: Vec<(usize, usize)> = m.links.keys().copied().collect();
        let mut moved = 0;
        for (a, b) in keys {
            while let Some(f) = m.links.get_mut(&(a, b)).and_then(|q| q.pop_front()) {
                moved += 1;
                m.now_ms += 1;
                let now = m.now_ms;
                let from = m.id(a);
                m.nodes[b].engine.receive(from, &f[4..], now).unwrap();
                m.commit(b);
                frames.push((a, b, f));
            }
        }
        if moved == 0 {
            break;
        }
    }
    let roots: Vec<_> = m.nodes.iter().map(|n| n.engine.digest_root()).collect();
    assert!(roots.windows(2).all(|w| w[0] == w[1]), "did not converge");

    let levels = [1u32, 6, 9];
    let mut by_kind = vec![(0usize, 0usize, [0usize; 3], 0usize); MSG_KINDS.len()];
    let (mut changes_b, mut heads_b, mut need_b, mut sync_data_b, mut n_sync_changes) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let (mut bloom_b, mut last_sync_b, mut n_bloom, mut n_empty) = (0usize, 0usize, 0usize, 0usize);
    let mut doc_names_b = 0usize;
    let mut per_link = std::collections::BTreeMap::<(usize, usize), usize>::new();
    for (a, b, f) in &frames {
        let p = payload(&f[4..]);
        let msg: Msg = postcard::from_bytes(&p).unwrap();
        let k = msg.kind_index();
        let e = &mut by_kind[k];
        e.0 += 1;
        e.1 += f.len();
        for (i, l) in levels.iter().enumerate() {
            e.2[i] += wire_at(&p, *l);
        }
        e.3 += p.len();
        *per_link.entry((*a, *b)).or_default() += f.len();
        if let Msg::Sync { data, doc } = &msg {
            sync_data_b += data.len();
            doc_names_b += doc.len();
            if let Ok(sm) = automerge::sync::Message::decode(data) {
                changes_b += sm.changes.iter().map(|c| c.len()).sum::<usize>();
                heads_b += 32 * sm.heads.len();
                need_b += 32 * sm.need.len();
                for h in &sm.have {
                    let b = h.bloom.to_bytes().len();
                    bloom_b += b;
                    n_bloom += usize::from(b > 0);
                    last_sync_b += 32 * h.last_sync.len();
                }
                if sm.changes.is_empty() && sm.need.is_empty() {
                    n_empty += 1;
                }
                if !sm.changes.is_empty() {
                    n_sync_changes += 1;
                }
            }
        }
    }
    let total: usize = by_kind.iter().map(|e| e.1).sum();
    println!("heal frames: {}, wire bytes {total}", frames.len());
    for (k, e) in by_kind.iter().enumerate() {
        if e.0 > 0 {
            println!(
                "  {:<6} {:>5} frames {:>8} B wire ({:>8} B payload; DEFLATE level 1/6/9: {} / {} / {})",
                MSG_KINDS[k], e.0, e.1, e.3, e.2[0], e.2[1], e.2[2]
            );
        }
    }
    for (l, i) in levels.iter().zip(0..) {
        println!(
            "  all frames at level {l}: {} B",
            by_kind.iter().map(|e| e.2[i]).sum::<usize>()
        );
    }
    println!(
        "  sync data {sync_data_b} B: change chunks {changes_b} B in {n_sync_changes} messages, heads {heads_b} B, need {need_b} B, the rest (have/Bloom, framing) {} B",
        sync_data_b - changes_b - heads_b - need_b
    );
    println!(
        "  of the rest: Bloom filters {bloom_b} B ({n_bloom} non-empty), have.last_sync {last_sync_b} B; document names {doc_names_b} B; sync messages without changes or needs: {n_empty}"
    );
    for ((a, b), v) in per_link {
        println!("  n{a} -> n{b}: {v} B");
    }
}
