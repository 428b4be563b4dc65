//! The store's tests: real redb files and the simulated disk (crashes, failed syncs).

use super::*;
use crate::simdisk::SimDisk;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use storemesh_protocol::engine::{Engine, EngineConfig, Policy};
use storemesh_protocol::ops::{Op, OpReply, QtyLine, Receipt, Sale, SaleLine};

fn chunk(doc: &str, seq: u64, bytes: &[u8]) -> DocWrite {
    DocWrite::Chunk {
        doc: doc.into(),
        seq,
        bytes: bytes.to_vec(),
    }
}

fn rec(n: u8) -> IdemRecord {
    IdemRecord {
        body_hash: [n; 32],
        reply: OpReply {
            kind: storemesh_protocol::ops::ReplyKind::Created,
            body: format!("{{\"n\":{n}}}"),
        },
    }
}

/// `rec` as the store gives it back: the hash's first
/// `IDEM_HASH_BYTES`, zeros after them.
fn kept(mut r: IdemRecord) -> IdemRecord {
    r.body_hash[storemesh_protocol::ops::IDEM_HASH_BYTES..].fill(0);
    r
}

/// Records written by the releases before `idem3` (in `idem2`, the compact
/// form with the whole hash; in `idem`, postcard) still answer replays, and
/// a new record is shorter than its `idem2` form.
#[test]
fn idempotency_records_of_earlier_releases_still_replay() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.redb")).unwrap();
    let sale_reply = IdemRecord {
        body_hash: [3; 32],
        reply: OpReply {
            kind: storemesh_protocol::ops::ReplyKind::Created,
            body: r#"{"sale_id":"0f8fad5b-d9cb-469f-a165-70867728950e","lines":[{"product_id":12345,"stock_level":50,"available":49}]}"#.into(),
        },
    };
    store
        .with_db(|db| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(IDEM2)?;
                let v2 = crate::idemcodec::encode(&sale_reply)?;
                t.insert("sale/old-2", v2.as_slice())?;
                let mut t = tx.open_table(IDEM)?;
                // As those releases wrote it: the reply's HTTP status as a number.
                let old = rec(4);
                let v1 = postcard::to_stdvec(&(old.body_hash, 201u16, old.reply.body))?;
                t.insert("sale/old-1", v1.as_slice())?;
            }
            tx.commit()?;
            Ok(())
        })
        .unwrap();
    assert_eq!(store.idem("sale/old-2").unwrap(), Some(sale_reply.clone()));
    assert_eq!(store.idem("sale/old-1").unwrap(), Some(rec(4)));
    let key = "sale/0f8fad5b-d9cb-469f-a165-70867728950e";
    store
        .commit(&Batch {
            idem: vec![(key.into(), sale_reply.clone())],
            ..Batch::default()
        })
        .unwrap();
    let back = store.idem(key).unwrap().unwrap();
    assert_eq!(
        back.reply, sale_reply.reply,
        "the reply comes back byte for byte"
    );
    assert!(back.same_body(&[3; 32]) && !back.same_body(&[4; 32]));
    let v2 = crate::idemcodec::encode(&sale_reply).unwrap().len();
    let v3 = crate::idemcodec::encode3(key, &sale_reply).unwrap().len();
    assert!(v3 + 16 + 36 <= v2, "idem3 {v3} B, idem2 {v2} B");
}

/// A part index belongs to exactly the stored form it was written with:
/// any later write of the document without a new index drops it, and so
/// does retiring the document.
#[test]
fn a_part_index_lives_only_as_long_as_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("n.redb")).unwrap();
    let doc = "rec/aa/202612/0";
    let index_of = |store: &Store| {
        store
            .load_docs()
            .unwrap()
            .into_iter()
            .find(|d| d.id == doc)
            .and_then(|d| d.index)
    };
    store
        .commit(&Batch {
            docs: vec![DocWrite::Snapshot {
                doc: doc.into(),
                bytes: b"snap".to_vec(),
            }],
            part_indexes: vec![(doc.into(), b"idx".to_vec())],
            ..Batch::default()
        })
        .unwrap();
    assert_eq!(index_of(&store), Some(b"idx".to_vec()));
    // Another document's write leaves it.
    store
        .commit(&Batch {
            docs: vec![chunk("mesh", 1, b"m")],
            ..Batch::default()
        })
        .unwrap();
    assert_eq!(index_of(&store), Some(b"idx".to_vec()));
    // A chunk of this part (a late change) drops it.
    store
        .commit(&Batch {
            docs: vec![chunk(doc, 1, b"late")],
            ..Batch::default()
        })
        .unwrap();
    assert_eq!(index_of(&store), None);
    // Indexed again, then retired: gone with the document.
    store
        .commit(&Batch {
            docs: vec![DocWrite::Snapshot {
                doc: doc.into(),
                bytes: b"snap2".to_vec(),
            }],
            part_indexes: vec![(doc.into(), b"idx2".to_vec())],
            ..Batch::default()
        })
        .unwrap();
    assert_eq!(index_of(&store), Some(b"idx2".to_vec()));
    store
        .commit(&Batch {
            retired: vec![doc.into()],
            ..Batch::default()
        })
        .unwrap();
    assert!(store.load_docs().unwrap().iter().all(|d| d.id != doc));
    let tx = store.with_db(|db| Ok(db.begin_read()?)).unwrap();
    assert!(tx
        .open_table(PART_INDEX)
        .unwrap()
        .get(doc)
        .unwrap()
        .is_none());
}

/// The sale index of closed parts: entries, parts and shared ids read back
/// (also after a rewrite of the file), lookups by range, and a key that is
/// never replaced by another.
#[test]
fn the_stored_sale_index_round_trips_and_keeps_its_key() {
    use storemesh_protocol::coldsales::{ColdPart, ColdSalesWrites};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("n.redb")).unwrap();
    let empty = store.cold_sales_state().unwrap();
    assert!(empty.key.is_none() && empty.parts.is_empty() && empty.shared.is_empty());
    let part = |n: u32| ColdPart {
        number: n,
        doc: format!("rec/aa/202612/{n}"),
        heads: vec![[n as u8; 32]],
    };
    let fp = |x: u64| x << 24;
    store
        .commit(&Batch {
            cold_sales: ColdSalesWrites {
                key: Some([7; 32]),
                parts: vec![part(0), part(1)],
                entries: vec![fp(5), fp(5) | 1, fp(9)],
                shared: vec!["s-1".into()],
            },
            ..Batch::default()
        })
        .unwrap();
    let check = |store: &Store| {
        let st = store.cold_sales_state().unwrap();
        assert_eq!(st.key, Some([7; 32]));
        assert_eq!(st.parts, vec![part(0), part(1)]);
        assert_eq!(st.shared, vec!["s-1".to_string()]);
        assert_eq!(
            store.cold_sale_entries(fp(5), fp(5) | 0xFF_FFFF).unwrap(),
            vec![fp(5), fp(5) | 1]
        );
        assert!(store
            .cold_sale_entries(fp(6), fp(6) | 0xFF_FFFF)
            .unwrap()
            .is_empty());
    };
    check(&store);
    // Another key is refused, nothing of its batch is written.
    let other = store.commit(&Batch {
        cold_sales: ColdSalesWrites {
            key: Some([8; 32]),
            entries: vec![fp(6)],
            ..Default::default()
        },
        ..Batch::default()
    });
    assert!(other.is_err());
    check(&store);
    // The rewrite of the file (after an erasure) copies every table.
    store.scrub().unwrap();
    check(&store);
}

#[test]
fn round_trip_snapshot_replaces_chunks_and_heads_log_is_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/node.redb");
    let store = Store::open(&path).unwrap();
    let a = "ledger/loc-a/1";
    let b = "ledger/loc-a/2";
    store
        .commit(&Batch {
            docs: vec![chunk(a, 1, b"a1"), chunk(a, 2, b"a2"), chunk(b, 1, b"b1")],
            heads: vec![(a.into(), vec!["aa".into()])],
            ..Batch::default()
        })
        .unwrap();
    let docs = store.load_docs().unwrap();
    assert_eq!(docs.len(), 2);
    // Never snapshotted: an empty snapshot first, so parts.len() is the next seq.
    assert_eq!(docs[0].parts, vec![vec![], b"a1".to_vec(), b"a2".to_vec()]);
    assert_eq!(docs[1].parts, vec![vec![], b"b1".to_vec()]);
    store
        .commit(&Batch {
            docs: vec![DocWrite::Snapshot {
                doc: a.into(),
                bytes: b"SNAP".to_vec(),
            }],
            heads: vec![(a.into(), vec!["bb".into(), "cc".into()])],
            ..Batch::default()
        })
        .unwrap();
    store
        .commit(&Batch {
            docs: vec![chunk(a, 1, b"a1'")],
            ..Batch::default()
        })
        .unwrap();
    // Re-writing identical bytes is harmless; other bytes at a stored seq are refused.
    store
        .commit(&Batch {
            docs: vec![chunk(a, 1, b"a1'")],
            ..Batch::default()
        })
        .unwrap();
    assert!(store
        .commit(&Batch {
            docs: vec![chunk(a, 1, b"other")],
            ..Batch::default()
        })
        .is_err());
    assert!(store
        .commit(&Batch {
            docs: vec![chunk(a, 0, b"x")],
            ..Batch::default()
        })
        .is_err());

    // Heads log: 3 commits of 250 entries for `a` (plus overwrites), 10 for `b`.
    for round in 0..3u64 {
        let mut batch = Batch::default();
        for i in 0..250u64 {
            let ms = round * 250 + i;
            batch.heads_log.push((a.into(), ms, vec![format!("h{ms}")]));
        }
        // An entry with the same (doc, ms) replaces, it does not add.
        batch
            .heads_log
            .push((a.into(), round * 250, vec![format!("h{}", round * 250)]));
        batch
            .heads_log
            .push((b.into(), round, vec![format!("b{round}")]));
        store.commit(&batch).unwrap();
    }
    drop(store);
    let store = Store::open(&path).unwrap();
    let docs = store.load_docs().unwrap();
    assert_eq!(docs[0].id, a);
    assert_eq!(docs[0].parts, vec![b"SNAP".to_vec(), b"a1'".to_vec()]);
    let log = &docs[0].heads_log;
    assert_eq!(log.len(), HEADS_LOG_MAX);
    assert_eq!(log.first().unwrap().0, 750 - HEADS_LOG_MAX as u64);
    assert_eq!(log.last().unwrap(), &(749, vec!["h749".to_string()]));
    assert!(log.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(docs[1].heads_log.len(), 3);
    assert_eq!(
        store.heads().unwrap(),
        vec![(a.to_string(), vec!["bb".to_string(), "cc".to_string()])]
    );
    let s = store.stats();
    assert_eq!((s.commits, s.failed_commits), (0, 0), "stats are per open");
}

#[test]
fn rows_idem_sync_states_and_meta_persist() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let p1 = NodeId([1; 32]);
    let p2 = NodeId([2; 32]);
    {
        let store = Store::open(&path).unwrap();
        store
            .commit(&Batch {
                rows: vec![
                    (
                        (7, "loc-a".into()),
                        StockRow {
                            on_hand: 5,
                            available: 3,
                            ..Default::default()
                        },
                    ),
                    (
                        (7, "loc-b".into()),
                        StockRow {
                            on_hand: -1,
                            available: 0,
                            ..Default::default()
                        },
                    ),
                ],
                idem: vec![("sale/s1".into(), rec(1)), ("rcv/r1".into(), rec(2))],
                sync_states: vec![
                    (p1, "ledger/loc-a/1".into(), vec![1, 2]),
                    (p2, "ledger/loc-a/1".into(), vec![3]),
                    (p1, "mesh".into(), vec![4]),
                ],
                ..Batch::default()
            })
            .unwrap();
        store
            .commit(&Batch {
                rows: vec![(
                    (7, "loc-a".into()),
                    StockRow {
                        on_hand: 4,
                        available: 2,
                        ..Default::default()
                    },
                )],
                ..Batch::default()
            })
            .unwrap();
        store.set_meta("node_id", &[9; 32]).unwrap();
        assert!(store.set_meta(SCHEMA_KEY, b"x").is_err());
        let s = store.stats();
        assert_eq!(s.commits, 2);
        assert!(s.total_commit >= s.last_commit);
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(
        store.load_rows().unwrap(),
        vec![
            (
                (7, "loc-a".to_string()),
                StockRow {
                    on_hand: 4,
                    available: 2,
                    ..Default::default()
                }
            ),
            (
                (7, "loc-b".to_string()),
                StockRow {
                    on_hand: -1,
                    available: 0,
                    ..Default::default()
                }
            ),
        ]
    );
    assert_eq!(store.idem("sale/s1").unwrap(), Some(kept(rec(1))));
    assert_eq!(store.idem("rcv/r1").unwrap(), Some(kept(rec(2))));
    assert_eq!(store.idem("sale/s2").unwrap(), None);
    assert_eq!(
        store.sync_states(&p1).unwrap(),
        vec![
            ("ledger/loc-a/1".to_string(), vec![1, 2]),
            ("mesh".to_string(), vec![4])
        ]
    );
    assert_eq!(
        store.sync_states(&p2).unwrap(),
        vec![("ledger/loc-a/1".to_string(), vec![3])]
    );
    assert!(store.sync_states(&NodeId([3; 32])).unwrap().is_empty());
    assert_eq!(store.get_meta("node_id").unwrap(), Some(vec![9; 32]));
    assert_eq!(store.get_meta("nothing").unwrap(), None);
}

#[test]
fn a_refused_batch_leaves_nothing_behind() {
    let store = Store::open_backend(SimDisk::new()).unwrap();
    store
        .commit(&Batch {
            docs: vec![chunk("mesh", 1, b"m1")],
            ..Batch::default()
        })
        .unwrap();
    // Rows, idem, sync state and a first chunk are written before the clash is found.
    let bad = Batch {
        docs: vec![chunk("ledger/loc-a/3", 1, b"x"), chunk("mesh", 1, b"clash")],
        rows: vec![(
            (1, "loc-a".into()),
            StockRow {
                on_hand: 1,
                available: 1,
                ..Default::default()
            },
        )],
        idem: vec![("sale/s9".into(), rec(9))],
        heads_log: vec![("ledger/loc-a/3".into(), 5, vec![])],
        sync_states: vec![(NodeId([1; 32]), "mesh".into(), vec![1])],
        heads: vec![("mesh".into(), vec!["x".into()])],
        keys: vec![],
        retired: vec![],
        part_indexes: vec![("mesh".into(), vec![1])],
        ..Default::default()
    };
    let err = store.commit(&bad).unwrap_err();
    assert!(
        format!("{err:#}").contains("refusing to overwrite"),
        "{err:#}"
    );
    assert_eq!(store.stats().failed_commits, 1);
    assert!(store.load_rows().unwrap().is_empty());
    assert_eq!(store.idem("sale/s9").unwrap(), None);
    assert!(store.sync_states(&NodeId([1; 32])).unwrap().is_empty());
    assert!(store.heads().unwrap().is_empty());
    let docs = store.load_docs().unwrap();
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].parts, vec![vec![], b"m1".to_vec()]);
    // The store keeps working.
    store
        .commit(&Batch {
            docs: vec![chunk("mesh", 2, b"m2")],
            ..Batch::default()
        })
        .unwrap();
}

#[test]
fn open_errors_are_clear_and_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let store = Store::open(&path).unwrap();
    let err = format!("{:#}", Store::open(&path).unwrap_err());
    assert!(err.contains("locked"), "{err}");
    drop(store);

    let junk = dir.path().join("junk.redb");
    std::fs::write(&junk, vec![0x5a; 64 * 1024]).unwrap();
    let err = format!("{:#}", Store::open(&junk).unwrap_err());
    assert!(
        err.contains("corrupt") || err.contains("not a storemesh"),
        "{err}"
    );

    // A valid file with damaged pages: an error or older data, never a panic.
    let good = dir.path().join("good.redb");
    {
        let s = Store::open(&good).unwrap();
        for i in 0..50u64 {
            s.commit(&Batch {
                docs: vec![chunk("mesh", i + 1, &[i as u8; 3000])],
                idem: vec![(format!("sale/{i}"), rec(i as u8))],
                ..Batch::default()
            })
            .unwrap();
        }
    }
    let bytes = std::fs::read(&good).unwrap();
    for (n, at) in [8192usize, bytes.len() / 2, bytes.len() - 5000]
        .into_iter()
        .enumerate()
    {
        let mut b = bytes.clone();
        for x in &mut b[at..at + 512] {
            *x ^= 0xa5;
        }
        let p = dir.path().join(format!("damaged{n}.redb"));
        std::fs::write(&p, &b).unwrap();
        // Each outcome is data, or an error that names the damage; redb's
        // own asserts on damaged pages (an `unreachable!` in its B-tree
        // code, in release builds) are caught by `guarded`.
        let clear = |e: &anyhow::Error| {
            let t = format!("{e:#}");
            assert!(
                ["damaged", "corrupt", "checksum", "I/O error", "invalid"]
                    .iter()
                    .any(|w| t.contains(w)),
                "damaged at {at}: an error that does not say what is wrong: {t}"
            );
        };
        match Store::open(&p) {
            Ok(s) => match s.load_docs() {
                Ok(d) => eprintln!(
                    "damaged at {at}: opened; load_docs -> {} parts",
                    d.first().map_or(0, |d| d.parts.len())
                ),
                Err(e) => {
                    eprintln!("damaged at {at}: opened; load_docs -> {e:#}");
                    clear(&e);
                }
            },
            Err(e) => {
                eprintln!("damaged at {at}: {e:#}");
                clear(&e);
            }
        }
    }
}

#[test]
fn a_panic_inside_the_store_is_an_error_and_the_file_is_opened_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let s = Store::open(&path).unwrap();
    s.commit(&Batch {
        docs: vec![chunk("mesh", 1, b"m1")],
        ..Batch::default()
    })
    .unwrap();
    // What redb does on a damaged page: it asserts (`unreachable!`).
    let err = s
        .with_db(|_| -> Result<()> { unreachable!("a damaged page") })
        .unwrap_err();
    assert!(err.chain().any(|c| c.is::<Damaged>()), "{err:#}");
    let text = format!("{err:#}");
    assert!(
        text.contains("damaged") && text.contains("a damaged page") && text.contains("node.redb"),
        "{text}"
    );
    assert!(
        s.db.read().unwrap().is_none(),
        "the handle redb panicked in is closed"
    );
    // The next operation opens the (undamaged) file afresh and finds its data.
    let docs = s.load_docs().unwrap();
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].parts.last().unwrap(), b"m1");
}

#[test]
fn disk_full_is_an_error_not_a_panic() {
    let disk = SimDisk::new();
    let store = Store::open_backend(disk.clone()).unwrap();
    store
        .commit(&Batch {
            docs: vec![chunk("mesh", 1, b"m1")],
            ..Batch::default()
        })
        .unwrap();
    disk.set_capacity(Some(disk.snapshot_synced().len() as u64));
    let big = Batch {
        docs: vec![chunk("mesh", 2, &vec![7u8; 4 << 20])],
        ..Batch::default()
    };
    let err = store.commit(&big).unwrap_err();
    assert!(format!("{err:#}").contains("no space"), "{err:#}");
    assert_eq!(store.stats().failed_commits, 1);
    // The owner reopens the store over the disk (after freeing space).
    drop(store);
    disk.set_capacity(None);
    let store = Store::open_backend(disk.clone()).unwrap();
    assert_eq!(
        store.load_docs().unwrap()[0].parts,
        vec![vec![], b"m1".to_vec()]
    );
    store.commit(&big).unwrap();
}

// ---- the engine over a crashing disk ----

const LOC: &str = "loc-a";

fn cfg() -> EngineConfig {
    EngineConfig {
        node_id: NodeId([7; 32]),
        name: "store-1".into(),
        location: LOC.into(),
        role: "store".into(),
        policy: Policy::Strict,
        buckets: 64,
        loyalty_points_per_unit: 0,
        timezone: None,
    }
}

fn receipt(id: &str, p: u64, q: u64) -> Op {
    Op::Receipt(Receipt {
        receipt_id: id.into(),
        location: LOC.into(),
        lines: vec![QtyLine {
            sku: None,
            product_id: p,
            quantity: q,
        }],
        ..Default::default()
    })
}

fn sale(id: &str, p: u64, q: u64) -> Op {
    Op::Sale(Sale {
        sale_id: id.into(),
        location: Some(LOC.into()),
        customer_id: None,
        currency: None,
        lines: vec![SaleLine {
            sku: None,
            product_id: p,
            quantity: q,
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// Opens the engine on what the store holds, as a restarted node does.
fn load_engine(store: &Store, incarnation: [u8; 4]) -> Engine {
    let mut eng = Engine::new(cfg(), incarnation);
    for d in store.load_docs().unwrap() {
        eng.load_doc(&d.id, &d.parts, d.heads_log).unwrap();
    }
    eng.finish_open();
    eng
}

/// What a client was told: the key of the operation and its stock delta.
#[derive(Default)]
struct Ledger {
    acked: Vec<(String, u64, i64)>,
    failed: Vec<(String, u64, i64)>,
}

impl Ledger {
    fn expected(&self) -> BTreeMap<u64, i64> {
        let mut m = BTreeMap::new();
        for (_, p, d) in &self.acked {
            *m.entry(*p).or_default() += d;
        }
        m
    }

    fn check(&self, store: &Store, eng: &Engine, ctx: &str) {
        for (k, _, _) in &self.acked {
            assert!(
                store.idem(k).unwrap().is_some(),
                "{ctx}: acknowledged {k} was lost"
            );
        }
        for (k, _, _) in &self.failed {
            assert!(
                store.idem(k).unwrap().is_none(),
                "{ctx}: {k} of a failed batch is present"
            );
            if let Some(id) = k.strip_prefix("sale/") {
                assert!(
                    eng.sale_doc(id).is_none(),
                    "{ctx}: record of failed sale {id} present"
                );
            }
        }
        for (k, _, _) in &self.acked {
            if let Some(id) = k.strip_prefix("sale/") {
                assert!(
                    eng.sale_doc(id).is_some(),
                    "{ctx}: record of sale {id} lost"
                );
            }
        }
        let rows: BTreeMap<u64, i64> = store
            .load_rows()
            .unwrap()
            .into_iter()
            .filter(|((_, l), _)| l == LOC)
            .map(|((p, _), r)| (p, r.on_hand))
            .collect();
        for p in 1..=PRODUCTS {
            let want = self.expected().get(&p).copied().unwrap_or(0);
            let got = eng.totals(p, Some(LOC)).map(|t| t.0).unwrap_or(0);
            assert_eq!(got, want, "{ctx}: on hand of product {p} in the documents");
            assert_eq!(
                rows.get(&p).copied().unwrap_or(0),
                want,
                "{ctx}: persisted row of product {p}"
            );
        }
    }
}

const PRODUCTS: u64 = 6;

/// How the power goes out in one life of the node.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Armed at a random I/O call: anywhere inside some later commit.
    CrashAtIo(u64),
    /// The fsync of one commit fails (its pages were written), then the power goes.
    FailedSync(usize),
    /// Power lost between `flush` and `commit`.
    BeforeCommit(usize),
}

fn crash_run(seed: u64) -> (usize, usize, usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut disk = SimDisk::new();
    let mut ledger = Ledger::default();
    let mut now = 1_750_000_000_000u64;
    let mut op_no = 0u64;
    let mut lost_unsynced = 0usize;
    for life in 0..4u8 {
        let store = Store::open_backend(disk.clone()).unwrap();
        let mut eng = load_engine(&store, [life, life + 1, 9, seed as u8]);
        ledger.check(&store, &eng, &format!("seed {seed} life {life} (start)"));
        let fault = match rng.gen_range(0..3) {
            0 => Fault::CrashAtIo(rng.gen_range(0..400)),
            1 => Fault::FailedSync(rng.gen_range(0..25)),
            _ => Fault::BeforeCommit(rng.gen_range(0..25)),
        };
        if let Fault::CrashAtIo(n) = fault {
            disk.crash_after_ios(n);
        }
        for b in 0usize.. {
            let mut pending = Vec::new();
            for _ in 0..rng.gen_range(1..12) {
                op_no += 1;
                now += rng.gen_range(0..3);
                let p = rng.gen_range(1..=PRODUCTS);
                let (key, op, delta) = if rng.gen_bool(0.35) {
                    let q = rng.gen_range(1..40);
                    (
                        format!("rcv/r{op_no}"),
                        receipt(&format!("r{op_no}"), p, q),
                        q as i64,
                    )
                } else {
                    let q = rng.gen_range(1..8);
                    (
                        format!("sale/s{op_no}"),
                        sale(&format!("s{op_no}"), p, q),
                        -(q as i64),
                    )
                };
                // Refused sales (not enough stock) change nothing.
                if eng
                    .execute(op, now, &|k| store.idem(k).ok().flatten())
                    .is_ok()
                {
                    pending.push((key, p, delta));
                }
            }
            let res = eng.commit(now, |batch| match fault {
                Fault::BeforeCommit(at) if b == at => {
                    disk.crash();
                    store.commit(batch)
                }
                Fault::FailedSync(at) if b == at => {
                    disk.fail_next_syncs(1);
                    let r = store.commit(batch);
                    assert!(r.is_err(), "a commit whose fsync failed must fail");
                    // Its pages reached the disk's cache but were never made durable.
                    assert!(
                        disk.has_unsynced(),
                        "the failed commit wrote nothing: the test would prove nothing"
                    );
                    lost_unsynced += 1;
                    disk.crash();
                    r
                }
                _ => store.commit(batch),
            });
            match res {
                Ok(_) => {
                    ledger.acked.extend(pending);
                }
                Err(_) => {
                    ledger.failed.extend(pending);
                    break;
                }
            }
            if b > 200 {
                // The armed crash is further away than this life lasts.
                disk.crash();
            }
        }
        assert!(disk.is_crashed());
        // Nothing may reach the disk after the crash: not the engine, not redb's shutdown.
        drop(eng);
        drop(store);
        disk = disk.restart();
    }
    let store = Store::open_backend(disk.clone()).unwrap();
    let eng = load_engine(&store, [5, 6, 7, 8]);
    ledger.check(&store, &eng, &format!("seed {seed} final"));
    (ledger.acked.len(), ledger.failed.len(), lost_unsynced)
}

#[test]
fn crash_at_any_point_keeps_every_acknowledged_operation_and_no_failed_one() {
    let (mut acked, mut failed, mut unsynced) = (0, 0, 0);
    for seed in 0..32 {
        let (a, f, u) = crash_run(seed);
        acked += a;
        failed += f;
        unsynced += u;
    }
    eprintln!("crash test: {acked} acknowledged ops kept, {failed} ops of failed batches absent, {unsynced} written-but-unsynced commits dropped");
    assert!(
        acked > 1000 && failed > 20 && unsynced > 3,
        "the runs must exercise every case"
    );
}

#[test]
fn chunk_after_reload_is_small() {
    let disk = SimDisk::new();
    let store = Store::open_backend(disk.clone()).unwrap();
    let mut eng = Engine::new(cfg(), [1, 2, 3, 4]);
    eng.finish_open();
    let mut now = 1_750_000_000_000u64;
    eng.execute(receipt("r0", 42, 1_000_000), now, &|_| None)
        .unwrap();
    store.commit(&eng.flush(now)).unwrap();
    for i in 0..1000 {
        now += 1;
        eng.execute(sale(&format!("s{i}"), 42, 1), now, &|_| None)
            .unwrap();
        eng.commit(now, |b| store.commit(b)).unwrap();
    }
    drop(eng);
    drop(store);
    let store = Store::open_backend(disk.restart()).unwrap();
    let docs = store.load_docs().unwrap();
    let ledger_doc = docs.iter().find(|d| d.id.starts_with("ledger/")).unwrap();
    let stored: usize = ledger_doc.parts.iter().map(|p| p.len()).sum();
    let next_seq = ledger_doc.parts.len() as u64;
    let mut eng = load_engine(&store, [5, 6, 7, 8]);
    assert_eq!(eng.totals(42, Some(LOC)).unwrap().0, 1_000_000 - 1000);
    store.commit(&eng.flush(now)).unwrap();
    now += 1;
    eng.execute(sale("after", 42, 1), now, &|k| store.idem(k).ok().flatten())
        .unwrap();
    let batch = eng.flush(now);
    let mut saw_ledger = false;
    for w in &batch.docs {
        match w {
            DocWrite::Chunk { doc, seq, bytes } => {
                assert!(
                    bytes.len() < 2048,
                    "chunk of {doc} after reload is {} bytes",
                    bytes.len()
                );
                if *doc == ledger_doc.id {
                    saw_ledger = true;
                    assert_eq!(*seq, next_seq, "the next chunk must not reuse a stored seq");
                    eprintln!("ledger doc: {stored} bytes stored; chunk for one sale after reload: {} bytes", bytes.len());
                }
            }
            DocWrite::Snapshot { doc, .. } => panic!("unexpected snapshot of {doc}"),
        }
    }
    assert!(saw_ledger);
    store.commit(&batch).unwrap();
    drop(eng);
    let eng = load_engine(&store, [9, 9, 9, 9]);
    assert_eq!(eng.totals(42, Some(LOC)).unwrap().0, 1_000_000 - 1001);
}
