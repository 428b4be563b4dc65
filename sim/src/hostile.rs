//! The `hostile-forge` fault (issue 16): one member node, once per seed in a
//! share of the seeds, sends an honest peer writes that only others may
//! make — under its own actor, over its own authenticated link: a retirement
//! of another node to a successor nobody holds, a directory entry claiming
//! the receiver's own name, a deficit record naming the receiver as its
//! writer, and a rights request in a made-up node's name. The invariant:
//! the honest receiver refuses every one (counted as `unauthorized`) and
//! holds none of them afterwards.
//!
//! `hostile-impersonate` (issue 16 finding 1), in the same act: the hostile
//! node writes as another member — a receipt of 1,000 units under the
//! victim's actor id at the receiver's location, once certified with its
//! own key and once without a certificate. The invariant: both refused as `bad_signature`,
//! the receiver's stock unchanged. The `hostile-forge` writes are signed
//! with the hostile node's own key (it holds it), so they are judged on
//! what they write.
//!
//! The forgeries are delivered straight into the receiver's engine (not
//! through the simulated network) and draw nothing from the world's random
//! generator: a seed runs exactly as it would without them unless one is
//! accepted. The hostile node and the event come from a generator of their
//! own, derived from the seed. When the drawn node cannot act for
//! [`WAIT_EVENTS`] (down, a clone, no honest peer linked to it), any member
//! that can acts in its place; an act no member could make during the
//! events happens on the healed mesh before the final convergence
//! (`Driver::heal_and_quiesce`), so every seed with a hostile member sees it.

use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use storemesh_protocol::ids::{product_bucket, ActorKey, NodeId};
use storemesh_protocol::layout::{ledger_key, DocId, LedgerField};
use storemesh_protocol::rebalance::{RightsRequest, REQUEST_HOPS_MAX};
use storemesh_protocol::signing::{certify_chunk, REJECT_BAD_SIGNATURE};
use storemesh_protocol::sync::{Msg, REJECT_UNAUTHORIZED};
use storemesh_protocol::wire::encode_frame;

use crate::invariant::Violation;
use crate::options::FaultKind;
use crate::world::World;

/// Share of seeds with a hostile node.
pub const HOSTILE_SEED_SHARE: f64 = 0.3;
/// Forgeries sent per hostile act.
pub const FORGERIES: u64 = 4;
/// Events the drawn hostile node may fail to act (down, unlinked) before
/// any other member that can act does so in its place.
pub const WAIT_EVENTS: usize = 20;
/// Changes written as another member per hostile act (self-signed, unsigned).
pub const IMPERSONATIONS: u64 = 2;
/// The product of the impersonated receipt.
const IMPERSONATED_PRODUCT: u64 = 1;

/// Which node turns hostile, and from which event on (`None`: none); `every`
/// (`--hostile`) gives every seed one, drawn as in the seeds that have one.
pub fn draw(
    seed: u64,
    nodes: usize,
    events: usize,
    faults: bool,
    every: bool,
) -> Option<(usize, usize)> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x686f_7374_696c_6521);
    let drawn = rng.gen_bool(HOSTILE_SEED_SHARE);
    if !faults || nodes < 2 || events < 8 || !(drawn || every) {
        return None;
    }
    Some((
        rng.gen_range(0..nodes),
        rng.gen_range(events / 4..=events / 2),
    ))
}

/// One forged change by a fresh incarnation of `actor`'s node on top of
/// `base` (the receiver's own copy of the document, so that its
/// dependencies are known there and only its authorization is judged).
fn forged(base: Option<Vec<u8>>, actor: ActorKey, key: &str, value: &str) -> Option<Vec<u8>> {
    let base = match base {
        Some(b) => Automerge::load(&b).ok()?,
        None => Automerge::new(),
    };
    let mut d = base.with_actor(actor.automerge());
    let mut tx = d.transaction();
    tx.put(ROOT, key, value).ok()?;
    tx.commit();
    Some(d.get_last_local_change()?.raw_bytes().to_vec())
}

/// Node `h` forges writes to one honest live peer that has a session with
/// it. `Ok(false)`: no such peer now (tried again at a later event).
pub fn forge(w: &mut World, h: usize) -> Result<bool, Violation> {
    if !w.alive(h) || w.nodes[h].is_clone {
        return Ok(false);
    }
    let hid = w.nodes[h].cfg.node_id;
    let n = w.nodes.len();
    let Some(p) = (0..n).find(|&p| {
        p != h
            && w.alive(p)
            && !w.nodes[p].is_clone
            && w.nodes[p].cfg.node_id != hid
            && w.nodes[p]
                .life
                .as_ref()
                .is_some_and(|l| l.engine().connected_peers().contains(&hid))
    }) else {
        return Ok(false);
    };
    let victim = (0..n)
        .map(|k| (h + 1 + k) % n)
        .find(|v| *v != h && w.nodes[*v].cfg.node_id != hid)
        .unwrap_or(p);
    let (p_name, p_loc, p_tag) = (
        w.nodes[p].cfg.name.clone(),
        w.nodes[p].cfg.location.clone(),
        w.nodes[p].cfg.node_id.tag(),
    );
    let v_tag = w.nodes[victim].cfg.node_id.tag();
    let ev = w.event;
    let actor = ActorKey::new(hid.tag(), [0xf0, 0x0d, (ev >> 8) as u8, ev as u8]);
    let made_up = NodeId([0x5a; 32]);
    let rec_doc = DocId::Records {
        tag: hid.tag(),
        month: 202601,
        part: 0,
    }
    .encode();
    let rec_key = format!("def/hostile-{ev}");
    let now = w.now_ms;
    let Some(life) = w.nodes[p].life.as_mut() else {
        return Ok(false);
    };
    let mesh = life.engine().document_bytes("mesh");
    let retirement = serde_json::json!({"successor": made_up.tag().hex()}).to_string();
    let info =
        serde_json::json!({"name": p_name, "location": p_loc, "role": "store", "policy": "strict"})
            .to_string();
    let record = serde_json::json!({"count_id": rec_key, "node": p_name, "location": p_loc, "product_id": 1, "deficit": 1, "at_ms": now}).to_string();
    let signer = crate::world::signing_scheme(w.seed).signer(hid);
    let mut frames = Vec::new();
    for (doc, base, key, value) in [
        (
            "mesh".to_string(),
            mesh.clone(),
            format!("retired/{v_tag}"),
            retirement,
        ),
        (
            "mesh".to_string(),
            mesh,
            format!("{}/info", hid.tag()),
            info,
        ),
        (
            rec_doc.clone(),
            life.engine().document_bytes(&rec_doc),
            rec_key.clone(),
            record,
        ),
    ] {
        let Some(data) = forged(base, actor, &key, &value) else {
            return Ok(false);
        };
        let Ok(cert) = certify_chunk(&signer, &data) else {
            return Ok(false);
        };
        frames.push(Msg::Certs {
            certs: vec![cert],
            intros: vec![],
        });
        frames.push(Msg::Push {
            doc,
            data,
            seen: vec![],
        });
    }
    frames.push(Msg::Rights(RightsRequest {
        req_id: 1 + ev as u64,
        origin: made_up.hex(),
        product_id: 1,
        location: p_loc.clone(),
        quantity: 1,
        hops_left: REQUEST_HOPS_MAX,
    }));
    // Impersonation: a receipt under the victim's actor id.
    let buckets = life.engine().config().buckets;
    let ledger = DocId::Ledger {
        location: p_loc.clone(),
        bucket: product_bucket(IMPERSONATED_PRODUCT, buckets),
        epoch: 0,
    }
    .encode();
    let as_victim = ActorKey::new(v_tag, [0xf0, 0x0e, (ev >> 8) as u8, ev as u8]);
    for signed in [true, false] {
        let key = ledger_key(IMPERSONATED_PRODUCT, as_victim, LedgerField::Received);
        let mut d = Automerge::new().with_actor(as_victim.automerge());
        let mut tx = d.transaction();
        if tx.put(ROOT, key, 1_000u64 + u64::from(signed)).is_err() {
            return Ok(false);
        }
        tx.commit();
        let Some(data) = d.get_last_local_change().map(|c| c.raw_bytes().to_vec()) else {
            return Ok(false);
        };
        if signed {
            let Ok(cert) = certify_chunk(&signer, &data) else {
                return Ok(false);
            };
            frames.push(Msg::Certs {
                certs: vec![cert],
                intros: vec![],
            });
        }
        frames.push(Msg::Push {
            doc: ledger.clone(),
            data,
            seen: vec![],
        });
    }
    let stock_before = life.engine().totals(IMPERSONATED_PRODUCT, Some(&p_loc));
    let bad_sig_before = life
        .engine()
        .stats
        .rejected_by_reason
        .get(REJECT_BAD_SIGNATURE)
        .copied()
        .unwrap_or(0);
    let before = life
        .engine()
        .stats
        .rejected_by_reason
        .get(REJECT_UNAUTHORIZED)
        .copied()
        .unwrap_or(0);
    for m in &frames {
        let Ok(f) = encode_frame(m) else {
            return Ok(false);
        };
        if let Err(err) = life.node.receive_between_steps(hid, &f[4..], now) {
            return Err(violation(w, format!("forged frame broke the link: {err}")));
        }
    }
    let e = life.engine();
    let refused = e
        .stats
        .rejected_by_reason
        .get(REJECT_UNAUTHORIZED)
        .copied()
        .unwrap_or(0)
        - before;
    let bad_sig = e
        .stats
        .rejected_by_reason
        .get(REJECT_BAD_SIGNATURE)
        .copied()
        .unwrap_or(0)
        - bad_sig_before;
    let stock_moved = e.totals(IMPERSONATED_PRODUCT, Some(&p_loc)) != stock_before;
    if bad_sig != IMPERSONATIONS || stock_moved {
        return Err(violation(
            w,
            format!(
                "n{p} accepted n{h} writing as n{victim}: refused {bad_sig} of {IMPERSONATIONS} as bad_signature, stock moved {stock_moved}"
            ),
        ));
    }
    let retired_to_made_up = e.views.retired().get(&v_tag) == Some(&made_up.tag());
    let name_taken = e.views.tag_of(&p_name) != Some(p_tag);
    let record_held = e.record(&rec_doc, &rec_key).is_some();
    if refused != FORGERIES || retired_to_made_up || name_taken || record_held {
        return Err(violation(
            w,
            format!(
                "n{p} accepted a forgery of n{h}: refused {refused} of {FORGERIES}, retired to a made-up node {retired_to_made_up}, own name taken {name_taken}, forged record held {record_held}"
            ),
        ));
    }
    if let Some(life) = w.nodes[p].life.as_mut() {
        life.impersonations_received += IMPERSONATIONS;
    }
    w.fire(FaultKind::HostileForge);
    w.fire(FaultKind::HostileImpersonate);
    let item = format!("hostile {h} -> {p} t={now}");
    w.trace(item.as_bytes());
    Ok(true)
}

fn violation(w: &World, message: String) -> Violation {
    Violation {
        seed: w.seed,
        event: w.event,
        time_ms: w.now_ms,
        invariant: "hostile-writes-refused",
        message,
    }
}
