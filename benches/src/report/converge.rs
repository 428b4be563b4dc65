//! Row 3: convergence after a partition. 5 nodes in a full mesh, each stocking
//! every product at its own location; partition into {0,1} | {2,3,4}; 2,000
//! sales on each side; heal; time until all views are identical, and the sync
//! bytes against the encoded size of the changes made during the partition.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use storemesh_node::config::Role;
use storemesh_protocol::engine::parse_heads;
use storemesh_protocol::ids::{ActorKey, NodeTag};

use super::nodes::{mix, stock, Mesh};
use super::{fmt_int, Figure, Mode, Section, Verdict};
use crate::http::{post_json, Conn};
use crate::stats::{median, spread};

const SIDE_A: [usize; 2] = [0, 1];
const SIDE_B: [usize; 3] = [2, 3, 4];

/// Sells `n` single-unit sales at node `i` with `conc` concurrent clients.
async fn sell(
    mesh: &Mesh,
    i: usize,
    n: usize,
    conc: usize,
    products: u64,
    tag: String,
) -> Result<()> {
    let addr = mesh.addr(i);
    let token = mesh.token(i).to_string();
    let mut tasks = Vec::new();
    for c in 0..conc {
        let token = token.clone();
        let tag = tag.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr);
            let mut k = c;
            while k < n {
                let p = 1 + mix(((c as u64) << 32) ^ k as u64 ^ mix(tag.len() as u64 + k as u64)) % products;
                let body = serde_json::json!({"sale_id": format!("{tag}-{k}"), "lines": [{"product_id": p, "quantity": 1, "unit_price": 500}]});
                let (s, v) = post_json(&mut conn, "/api/sales", &token, &body).await?;
                if s != 201 {
                    bail!("sale refused: HTTP {s} {v}");
                }
                k += conc;
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Encoded bytes and count of the changes node `i` has beyond `before`, split
/// by whether their author is on side A.
async fn changes_since(
    mesh: &Mesh,
    i: usize,
    before: BTreeMap<String, Vec<String>>,
    side_a: BTreeSet<NodeTag>,
) -> Option<(u64, u64, u64, u64)> {
    mesh.nodes[i]
        .shared
        .query(move |e| {
            let (mut a_bytes, mut a_n, mut b_bytes, mut b_n) = (0u64, 0u64, 0u64, 0u64);
            for (id, _) in e.documents() {
                let Some(doc) = e.doc(&id) else { continue };
                let heads = before.get(&id).map(|h| parse_heads(h)).unwrap_or_default();
                for c in doc.get_changes(&heads) {
                    let len = c.raw_bytes().len() as u64;
                    let on_a = ActorKey::from_bytes(c.actor_id().to_bytes())
                        .is_some_and(|a| side_a.contains(&a.tag()));
                    if on_a {
                        a_bytes += len;
                        a_n += 1;
                    } else {
                        b_bytes += len;
                        b_n += 1;
                    }
                }
            }
            (a_bytes, a_n, b_bytes, b_n)
        })
        .await
}

struct Round {
    converge_ms: f64,
    wire_to_converge: u64,
    wire_to_quiet: u64,
    msgs_to_quiet: u64,
    change_bytes: u64,
    delivery_bytes: u64,
    changes: u64,
    views_equal: bool,
    by_kind: [u64; storemesh_protocol::sync::MSG_KINDS.len()],
}

/// "push 1200, sync 3400, …": the non-zero kinds, largest first.
fn by_kind_text(by_kind: &[u64]) -> String {
    let mut v: Vec<(&str, u64)> = storemesh_protocol::sync::MSG_KINDS
        .iter()
        .copied()
        .zip(by_kind.iter().copied())
        .filter(|(_, b)| *b > 0)
        .collect();
    v.sort_by_key(|b| std::cmp::Reverse(b.1));
    v.iter()
        .map(|(k, b)| format!("{k} {b}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn run(mode: Mode) -> Result<Section> {
    let products: u64 = 10_000;
    let sales_per_side = 2_000usize;
    let hold = mode.pick(Duration::from_secs(3), Duration::from_secs(60));
    // Quick mode (CI): one round of the same workload (about 25 s).
    let rounds = mode.pick(3, 5);
    let mut s = Section::new("3 · Convergence after a partition (5 nodes, 2 + 3)");
    let names = ["n0", "n1", "n2", "n3", "n4"];
    let mut links = Vec::new();
    for a in 0..5 {
        for b in a + 1..5 {
            links.push((a, b));
        }
    }
    let mesh = Mesh::start(
        &names,
        |_| Role::Store,
        &links,
        |c| {
            c.sync.anti_entropy_ms = 5_000;
        },
    )
    .await?;
    for i in 0..5 {
        mesh.wait_connected(i, 4, Duration::from_secs(20)).await?;
    }
    let all: Vec<u64> = (1..=products).collect();
    let setup = Instant::now();
    for i in 0..5 {
        stock(
            mesh.addr(i),
            mesh.token(i),
            &mesh.location(i),
            &all,
            1_000_000,
            "rcv",
        )
        .await?;
    }
    mesh.wait_same(&[0, 1, 2, 3, 4], Duration::from_secs(120))
        .await?;
    mesh.wait_quiet(Duration::from_millis(300), Duration::from_secs(60))
        .await?;
    let setup_s = setup.elapsed().as_secs_f64();
    let side_a: BTreeSet<NodeTag> = SIDE_A
        .iter()
        .map(|i| mesh.nodes[*i].shared.node_id.tag())
        .collect();
    let mut out = Vec::new();
    for round in 0..rounds {
        let before: BTreeMap<String, Vec<String>> = mesh.nodes[0]
            .shared
            .query(|e| e.documents())
            .await
            .unwrap_or_default()
            .into_iter()
            .collect();
        let cut_at = Instant::now();
        for a in SIDE_A {
            for b in SIDE_B {
                mesh.set_link(a, b, true);
            }
        }
        for a in SIDE_A {
            mesh.wait_connected(a, 1, Duration::from_secs(10)).await?;
        }
        for b in SIDE_B {
            mesh.wait_connected(b, 2, Duration::from_secs(10)).await?;
        }
        let mut sells = Vec::new();
        for (side, members) in [(0usize, &SIDE_A[..]), (1, &SIDE_B[..])] {
            for (k, &i) in members.iter().enumerate() {
                let n = sales_per_side / members.len()
                    + usize::from(k < sales_per_side % members.len());
                sells.push(sell(
                    &mesh,
                    i,
                    n,
                    4,
                    products,
                    format!("r{round}-s{side}-n{i}"),
                ));
            }
        }
        for r in futures_join(sells).await {
            r?;
        }
        mesh.wait_same(&SIDE_A, Duration::from_secs(60)).await?;
        mesh.wait_same(&SIDE_B, Duration::from_secs(60)).await?;
        if let Some(rest) = hold.checked_sub(cut_at.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        mesh.wait_quiet(Duration::from_millis(200), Duration::from_secs(30))
            .await?;
        let c0 = mesh.total();
        let heal = Instant::now();
        for a in SIDE_A {
            for b in SIDE_B {
                mesh.set_link(a, b, false);
            }
        }
        let took = mesh
            .wait_same(&[0, 1, 2, 3, 4], Duration::from_secs(120))
            .await?;
        let c1 = mesh.total();
        mesh.wait_quiet(Duration::from_millis(300), Duration::from_secs(60))
            .await?;
        let c2 = mesh.total();
        let _ = heal;
        // Views: every node's published rows are identical.
        let rows: Vec<_> = mesh
            .nodes
            .iter()
            .map(|n| {
                let r = n.shared.read.read().unwrap_or_else(|p| p.into_inner());
                let mut v: Vec<_> = r
                    .rows
                    .iter()
                    .flat_map(|(p, m)| m.iter().map(move |(l, row)| (*p, l.clone(), row.on_hand)))
                    .collect();
                v.sort();
                v
            })
            .collect();
        let views_equal = rows.iter().all(|r| *r == rows[0]);
        let (ab, an, bb, bn) = changes_since(&mesh, 0, before, side_a.clone())
            .await
            .unwrap_or_default();
        let r = Round {
            converge_ms: took.as_secs_f64() * 1000.0,
            wire_to_converge: c1.bytes_out - c0.bytes_out,
            wire_to_quiet: c2.bytes_out - c0.bytes_out,
            msgs_to_quiet: c2.msgs_out - c0.msgs_out,
            change_bytes: ab + bb,
            delivery_bytes: ab * SIDE_B.len() as u64 + bb * SIDE_A.len() as u64,
            changes: an + bn,
            views_equal,
            by_kind: c2.minus(&c0).by_kind,
        };
        eprintln!(
            "  partition round {}: converged {:.0} ms after heal, {} wire bytes / {} change bytes ({} changes), views equal: {}",
            round + 1,
            r.converge_ms,
            r.wire_to_quiet,
            r.change_bytes,
            r.changes,
            r.views_equal
        );
        eprintln!("    wire bytes by kind: {}", by_kind_text(&r.by_kind));
        out.push(r);
    }
    mesh.shutdown().await;
    let f = |g: &dyn Fn(&Round) -> f64| out.iter().map(g).collect::<Vec<f64>>();
    let conv = f(&|r| r.converge_ms);
    let ratio = f(&|r| r.wire_to_quiet as f64 / r.change_bytes as f64);
    let ratio_delivery = f(&|r| r.wire_to_quiet as f64 / r.delivery_bytes as f64);
    let all_equal = out.iter().all(|r| r.views_equal);
    s.figures.push(
        Figure::new("3", "time from heal to identical views")
            .value(format!("{:.0} ms", median(&conv)))
            .target(
                "≤ 1,000 ms",
                Verdict::of(median(&conv) <= 1000.0 && all_equal),
            ),
    );
    s.figures.push(
        Figure::new("3", "sync bytes after heal / encoded changes")
            .value(format!(
                "{} B",
                fmt_int(median(&f(&|r| r.wire_to_quiet as f64)))
            ))
            .baseline(format!(
                "{} B of changes",
                fmt_int(median(&f(&|r| r.change_bytes as f64)))
            ))
            .ratio(format!("{:.2}×", median(&ratio)))
            .target("≤ 2×", Verdict::of(median(&ratio) <= 2.0)),
    );
    s.note(format!(
        "5 in-process nodes, full mesh (10 QUIC links), {} products stocked at each node's own \
         location (setup and initial sync {setup_s:.1} s). Each round: cut the 6 links between \
         {{n0, n1}} and {{n2, n3, n4}}; {} single-unit sales on each side over HTTP (4 \
         concurrent clients per node); hold the partition {:.0} s in all; heal; poll the summary \
         digest of every node every 5 ms until all are equal (the views are recomputed from the \
         documents before a digest answer is given); then check that the published stock rows \
         of all 5 nodes are identical. Wire bytes: sync frames sent by all nodes from the heal \
         on (`storemesh_sync_bytes_out_total`: framing included; QUIC/TLS overhead not included). \
         Change bytes: encoded size of every Automerge change made during the partition \
         (ledger cells and sale records). {rounds} rounds on the same mesh.\n",
        fmt_int(products as f64),
        fmt_int(sales_per_side as f64),
        hold.as_secs_f64()
    ));
    s.note("| | median (min–max) |\n|---|---|");
    for (i, r) in out.iter().enumerate() {
        s.note(format!(
            "| round {}: sync bytes by message kind | {} |",
            i + 1,
            by_kind_text(&r.by_kind)
        ));
    }
    s.note(format!(
        "| heal → identical views, ms | {} |",
        spread(&conv, 0)
    ));
    s.note(format!(
        "| sync bytes, heal → converged | {} |",
        spread(&f(&|r| r.wire_to_converge as f64), 0)
    ));
    s.note(format!(
        "| sync bytes, heal → quiet | {} |",
        spread(&f(&|r| r.wire_to_quiet as f64), 0)
    ));
    s.note(format!(
        "| sync frames, heal → quiet | {} |",
        spread(&f(&|r| r.msgs_to_quiet as f64), 0)
    ));
    s.note(format!(
        "| changes made in the partition | {} |",
        spread(&f(&|r| r.changes as f64), 0)
    ));
    s.note(format!(
        "| their encoded bytes | {} |",
        spread(&f(&|r| r.change_bytes as f64), 0)
    ));
    s.note(format!("| wire / change bytes | {} |", spread(&ratio, 2)));
    s.note(format!(
        "| wire / minimum delivery (side A's changes × 3 nodes + side B's × 2) | {} |",
        spread(&ratio_delivery, 2)
    ));
    s.note(format!(
        "| all views identical after every heal | {} |",
        if all_equal { "yes" } else { "**no**" }
    ));
    Ok(s)
}

/// Awaits all futures concurrently (no extra dependency).
async fn futures_join<F: std::future::Future>(fs: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = fs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("ready")).collect()
}
