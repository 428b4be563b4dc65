//! Diagnostic probe for issue 14 (where a store node's memory, restart time
//! and disk per sale go). Builds a store node's history through the
//! production engine and store (a real redb file), single-unit sales in group
//! commits, then reopens it as `run` does.
//!
//! ```text
//! cargo run --release -p storemesh-benches --example history_probe -- 20000 120000 32
//! cargo run --release -p storemesh-benches --example history_probe -- restart  # fresh process
//! cargo run --release -p storemesh-benches --example history_probe -- tables   # bytes per table
//! cargo run --release -p storemesh-benches --example history_probe -- load     # from snapshots only
//! ```
//! Files: `$TMPDIR/storemesh-probe.redb`, `$TMPDIR/storemesh-probe-snaps.bin`.
use std::time::Instant;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use storemesh_benches::fixtures::{apply, receipt, sale, NOW_MS};
use storemesh_node::store::Store;
use storemesh_protocol::engine::Engine;
use storemesh_protocol::testkit;

fn probe_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(name)
}

fn rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1 << 20) as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(|s| s.as_str()) == Some("tables") {
        use redb::{ReadableDatabase, ReadableTableMetadata, TableHandle};
        let db = redb::Database::open(probe_path("storemesh-probe.redb")).unwrap();
        let tx = db.begin_read().unwrap();
        for h in tx.list_tables().unwrap() {
            let name = h.name().to_string();
            let t = tx.open_untyped_table(h).unwrap();
            let st = t.stats().unwrap();
            println!(
                "{name}: {} entries, stored {} B, metadata {} B, fragmented {} B",
                t.len().unwrap(),
                st.stored_bytes(),
                st.metadata_bytes(),
                st.fragmented_bytes()
            );
        }
        return;
    }
    if args.get(1).map(|s| s.as_str()) == Some("restart") {
        let t = Instant::now();
        let store = std::sync::Arc::new(Store::open(&probe_path("storemesh-probe.redb")).unwrap());
        println!("store open: {:?} rss {:.0} MiB", t.elapsed(), rss_mib());
        let mut e = Engine::new(testkit::config(0, 64), [9, 9, 9, 7]);
        // As `storemesh run` opens it (PROBE_HELD=1: cold parts hold their bytes).
        if std::env::var_os("PROBE_HELD").is_none() {
            e.set_part_archive(store.clone());
        }
        store
            .for_each_doc(|d| {
                let (r, t1) = (rss_mib(), Instant::now());
                e.load_doc_with_index(&d.id, &d.parts, d.heads_log.clone(), d.index.as_deref())
                    .unwrap();
                if std::env::var_os("PROBE_VERBOSE").is_some() {
                    println!(
                        "  {} parts {} bytes {} +{:.0} MiB {:?}",
                        d.id,
                        d.parts.len(),
                        d.parts.iter().map(|p| p.len()).sum::<usize>(),
                        rss_mib() - r,
                        t1.elapsed()
                    );
                }
                Ok(())
            })
            .unwrap();
        println!("restart: docs {:?} rss {:.0} MiB", t.elapsed(), rss_mib());
        e.finish_open();
        println!(
            "restart: + views {:?} rss {:.0} MiB, {} parts opened from their index",
            t.elapsed(),
            rss_mib(),
            e.stats.parts_opened_indexed
        );
        let (cold, cold_bytes) = e.cold_parts();
        println!(
            "sale index: {} sales in {} bytes; cold parts {cold} holding {cold_bytes} bytes",
            e.views.sales().len(),
            e.views.sales().entry_bytes()
        );
        // As the node's loop does after a start: batches write the indexes
        // of parts that had none (the next restart opens them unread).
        let t = Instant::now();
        loop {
            let r = e
                .commit(storemesh_benches::fixtures::NOW_MS, |b| {
                    if b.is_empty() {
                        Ok(())
                    } else {
                        store.commit(b)
                    }
                })
                .unwrap();
            if r.batch.is_empty() {
                break;
            }
        }
        println!(
            "indexes written: {} in {:?}; sales of {} parts written to the stored sale index, {} parts' sales dropped from memory",
            e.stats.parts_indexed,
            t.elapsed(),
            e.stats.cold_sale_parts_written,
            e.stats.cold_sale_parts_dropped
        );
        println!(
            "sale index after: {} sales in {} bytes; rss {:.0} MiB",
            e.views.sales().len(),
            e.views.sales().entry_bytes(),
            rss_mib()
        );
        return;
    }
    if args.get(1).map(|s| s.as_str()) == Some("load") {
        let snaps: Vec<(String, Vec<u8>)> =
            postcard::from_bytes(&std::fs::read(probe_path("storemesh-probe-snaps.bin")).unwrap())
                .unwrap();
        let base = rss_mib();
        let t = Instant::now();
        let mut e = Engine::new(testkit::config(0, 64), [9, 9, 9, 8]);
        for (id, b) in &snaps {
            e.load_doc(id, std::slice::from_ref(b), Vec::new()).unwrap();
        }
        println!(
            "fresh process from snapshots: load {:?} rss {:.0} MiB (base {base:.0})",
            t.elapsed(),
            rss_mib()
        );
        e.finish_open();
        println!("  + views: {:?} rss {:.0} MiB", t.elapsed(), rss_mib());
        return;
    }
    let products: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let sales: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(50_000);
    let per_commit: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(32);
    let path = probe_path("storemesh-probe.redb");
    let _ = std::fs::remove_file(&path);
    let store = std::sync::Arc::new(Store::open(&path).unwrap());
    let cfg = testkit::config(0, 64);
    let mut e = Engine::new(cfg.clone(), [0, 1, 2, 3]);
    // PROBE_ARCHIVE=1: as `storemesh run` sells (cold parts and the sale
    // index of closed parts in the store).
    if std::env::var_os("PROBE_ARCHIVE").is_some() {
        e.set_part_archive(store.clone());
    }
    if let Some(k) = std::env::var("PROBE_OPS_PER_KEY")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        e.set_epoch_ops_per_key(k);
    }
    e.finish_open();
    let loc = e.config().location.clone();
    let all: Vec<u64> = (1..=products).collect();
    for (i, chunk) in all.chunks(500).enumerate() {
        let b = apply(
            &mut e,
            receipt(&format!("rcv-{i}"), &loc, chunk, 1_000_000),
            NOW_MS,
        );
        store.commit(&b).unwrap();
    }
    println!("stocked: rss {:.0} MiB", rss_mib());
    let base = rss_mib();
    let t = Instant::now();
    let mut x = 1u64;
    for i in 0..sales {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let p = 1 + (x >> 33) % products;
        let now = NOW_MS + i * 40;
        e.execute(sale(&format!("s-{i}"), p), now, &|_| None)
            .unwrap();
        if (i + 1) % per_commit == 0 {
            e.commit(now, |b| store.commit(b)).unwrap();
        }
        // The node's timer ticks (cooling closed records parts) every ~100 ms.
        if (i + 1) % 512 == 0 {
            e.tick(now);
        }
        if (i + 1) % 10_000 == 0 {
            println!(
                "{} sales: rss {:.0} MiB (+{:.1} KiB/sale) {:.0}/s; sale index {} in memory, {} bytes",
                i + 1,
                rss_mib(),
                (rss_mib() - base) * 1024.0 / (i + 1) as f64,
                (i + 1) as f64 / t.elapsed().as_secs_f64(),
                e.views.sales().len(),
                e.views.sales().entry_bytes()
            );
        }
    }
    let b = e.flush(NOW_MS + sales * 40);
    store.commit(&b).unwrap();
    let (cold, cold_bytes) = e.cold_parts();
    println!(
        "cold records parts {cold} ({cold_bytes} bytes); epochs started {}",
        e.stats.epochs_started
    );
    let sizes: Vec<String> = e
        .views
        .index_sizes()
        .iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    println!("views: {}", sizes.join(" "));
    for (id, heads) in e.documents().iter().take(3) {
        println!("doc {id} heads {}", heads.len());
    }
    let nchanges: usize = e
        .documents()
        .iter()
        .filter_map(|(id, _)| e.doc(id).map(|d| d.get_changes(&[]).len()))
        .sum();
    println!("total changes {nchanges}");
    for prefix in ["ledger/", "rec/", "mesh", "cust/"] {
        let ids: Vec<String> = e
            .documents()
            .into_iter()
            .map(|(i, _)| i)
            .filter(|i| i.starts_with(prefix))
            .collect();
        let bytes: Vec<Vec<u8>> = ids.iter().filter_map(|i| e.document_bytes(i)).collect();
        let before = rss_mib();
        let docs: Vec<automerge::Automerge> = bytes
            .iter()
            .map(|b| automerge::Automerge::load(b).unwrap())
            .collect();
        println!(
            "{prefix}: {} docs, {} saved bytes, loaded +{:.0} MiB",
            docs.len(),
            bytes.iter().map(|b| b.len()).sum::<usize>(),
            rss_mib() - before
        );
        drop(docs);
    }
    drop(e);
    drop(store);
    println!("dropped: rss {:.0} MiB", rss_mib());
    let size = std::fs::metadata(&path).unwrap().len();
    println!(
        "file {} bytes, {:.0} B/sale",
        size,
        size as f64 / sales as f64
    );
    let t = Instant::now();
    let store = Store::open(&path).unwrap();
    let mut e = Engine::new(cfg, [9, 9, 9, 9]);
    let stored = store.load_docs().unwrap();
    println!(
        "load_docs: {:?} rss {:.0} MiB, {} docs, {} parts, {} bytes",
        t.elapsed(),
        rss_mib(),
        stored.len(),
        stored.iter().map(|d| d.parts.len()).sum::<usize>(),
        stored
            .iter()
            .map(|d| d.parts.iter().map(|p| p.len()).sum::<usize>())
            .sum::<usize>()
    );
    for d in stored {
        e.load_doc_with_index(&d.id, &d.parts, d.heads_log, d.index.as_deref())
            .unwrap();
    }
    let t_load = t.elapsed();
    e.finish_open();
    println!(
        "reopen: load {:?} total {:?} rss {:.0} MiB",
        t_load,
        t.elapsed(),
        rss_mib()
    );
    let snaps: Vec<(String, Vec<u8>)> = e
        .documents()
        .into_iter()
        .filter_map(|(i, _)| e.document_bytes(&i).map(|b| (i, b)))
        .collect();
    std::fs::write(
        probe_path("storemesh-probe-snaps.bin"),
        postcard::to_stdvec(&snaps).unwrap(),
    )
    .unwrap();
    let cfg2 = e.config().clone();
    drop(e);
    println!(
        "dropped engine: rss {:.0} MiB; snapshots {} bytes",
        rss_mib(),
        snaps.iter().map(|s| s.1.len()).sum::<usize>()
    );
    let t = Instant::now();
    let mut e = Engine::new(cfg2, [9, 9, 9, 8]);
    for (id, b) in &snaps {
        e.load_doc(id, std::slice::from_ref(b), Vec::new()).unwrap();
    }
    println!(
        "from snapshots: load {:?} rss {:.0} MiB",
        t.elapsed(),
        rss_mib()
    );
    e.finish_open();
    println!(
        "from snapshots + views: {:?} rss {:.0} MiB",
        t.elapsed(),
        rss_mib()
    );
}
