use storemesh_sim::driver::*;
use storemesh_sim::Options;
fn main() {
    let seed: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let opts = Options::default();
    let mut drv = Driver::new(seed, &opts).map_err(|e| e.1.clone()).unwrap();
    drv.setup().unwrap();
    let mut err = None;
    for ev in 1..=opts.events { if let Err(v) = drv.step(ev) { err = Some(v); break; } }
    if err.is_none() { err = drv.heal_and_quiesce().err(); }
    println!("{:?}", err.as_ref().map(|v| v.to_string()));
    let w = &drv.w;
    for (i, n) in w.nodes.iter().enumerate() {
        println!("{i} {} tag {} clone={} retired={} incarnations={:?} restarts={}", n.name, n.cfg.node_id.tag().hex(), n.is_clone, n.retired, n.incarnations.iter().map(|(a, t)| (a.hex(), *t)).collect::<Vec<_>>(), n.stats.restarts);
    }
    let e = &w.nodes[0].life.as_ref().unwrap().engine;
    for a in e.views.alarms.values() { println!("alarm {} {} {}", a.kind, a.node, a.record); }
    let p: u64 = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(0);
    let loc = std::env::args().nth(3).unwrap_or_default();
    history(w, p, &loc);
    if let Some(en) = e.views.entry(p, &loc) { for (a, c) in &en.cells { println!("cell {} {:?}", a.hex(), c); } }
}
#[allow(dead_code)]
fn history(w: &storemesh_sim::world::World, p: u64, loc: &str) {
    use automerge::ReadDoc;
    let e = &w.nodes[0].life.as_ref().unwrap().engine;
    for (id, _) in e.documents() {
        if !id.starts_with(&format!("ledger/{loc}/")) { continue; }
        let d = e.doc(&id).unwrap();
        for c in d.get_changes(&[]) {
            let a = hex::encode(c.actor_id().to_bytes());
            if !a.starts_with("78ed") { continue; }
            for op in c.decode().operations {
                if let automerge::legacy::Key::Map(k) = &op.key { if k.to_string().starts_with(&format!("{p}/")) { println!("{id} t={} actor {a} seq {} {k} = {:?}", c.timestamp(), c.seq(), op.action); } }
            }
        }
    }
}
