//! `engine::load_parts`: documents stored as a snapshot plus chunks load to
//! the same heads and values whether they take the one-pass path (this
//! version's bounded chunk count) or the chunk-by-chunk path (documents left
//! by earlier versions with thousands of chunks).

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ReadDoc, ROOT};
use storemesh_protocol::engine::{load_parts, CHUNKS_PER_SNAPSHOT_MAX};

fn stored(changes_after_snapshot: usize) -> (Vec<Vec<u8>>, AutoCommit) {
    let mut doc = AutoCommit::new();
    doc.put(ROOT, "seed", 1u64).unwrap();
    let mut parts = vec![doc.save()];
    for i in 0..changes_after_snapshot {
        doc.put(ROOT, format!("k{}", i % 7), i as u64).unwrap();
        doc.commit();
        parts.push(doc.save_incremental());
    }
    (parts, doc)
}

#[test]
fn both_load_paths_give_the_stored_document() {
    for n in [0, 10, CHUNKS_PER_SNAPSHOT_MAX as usize + 40] {
        let (parts, mut original) = stored(n);
        let loaded = load_parts(&parts).unwrap();
        assert_eq!(loaded.get_heads(), original.get_heads(), "{n} chunks");
        for k in 0..7 {
            let key = format!("k{k}");
            assert_eq!(
                loaded
                    .get(ROOT, key.as_str())
                    .unwrap()
                    .map(|(v, _)| v.to_string()),
                original
                    .get(ROOT, key.as_str())
                    .unwrap()
                    .map(|(v, _)| v.to_string()),
                "{n} chunks, key {key}"
            );
        }
    }
}

#[test]
fn damaged_bytes_do_not_panic_and_do_not_pass_for_the_document() {
    let (mut parts, mut original) = stored(3);
    parts[2] = vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3];
    // Either refused, or loaded without the damaged change (and so without
    // its heads): never passed off as the stored document.
    if let Ok(doc) = load_parts(&parts) {
        assert_ne!(doc.get_heads(), original.get_heads());
    }
}
