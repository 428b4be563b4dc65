//! The data-file rewrite after a customer erasure (issue 17): it used to run
//! on the engine thread and stall every sale for its whole copy (about a
//! second per 100 MB). The copy now runs on a thread of its own; a test-only
//! failpoint holds it mid-way, so the test can show — by order of events,
//! not by timing — that sales are answered while it runs, that none of them
//! is lost when the rewritten file replaces the old one, and that the erased
//! key is gone from the file afterwards.
//!
//! Its own test binary: the failpoint holds every rewrite of the process.

use std::time::Duration;

use storemesh_node::node::failpoints;
use storemesh_testkit::*;

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn customer_key(m: &mut Mesh, id: &str) -> [u8; 32] {
    m.stop(0).await;
    let path = storemesh_node::node::db_path(&m.dirs[0].0);
    let key = {
        let store = storemesh_node::store::Store::open(&path).unwrap();
        let keys = store.load_keys().unwrap();
        match keys.into_iter().find(|(c, _)| c == id).map(|(_, e)| e) {
            Some(storemesh_protocol::crypto::KeyEntry::Keys(k)) => *k.iter().next().unwrap(),
            other => panic!("no key for {id}: {other:?}"),
        }
    };
    m.restart(0).await;
    key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_are_served_and_kept_while_the_data_file_is_rewritten() {
    const SALES: usize = 40;
    let mut m = Mesh::start(&[("store-a", Role::Store, Policy::Strict)], &[]).await;
    let http = reqwest::Client::new();
    let c = m.clients[0].clone();
    let r = http
        .put(format!("{}/api/customers/c-5", c.base))
        .bearer_auth(&c.token)
        .json(&serde_json::json!({"name": "Bo Example", "email": "bo@example.org"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let (st, _) = c
        .post("/api/receipts", receipt("r1", "store-a", &[(3, 1000)]))
        .await
        .unwrap();
    assert_eq!(st, 201);
    let key = customer_key(&mut m, "c-5").await;
    let path = storemesh_node::node::db_path(&m.dirs[0].0);
    assert!(
        contains(&std::fs::read(&path).unwrap(), &key),
        "key in the file before"
    );

    // Hold the rewrite that the erasure starts, before its copy.
    failpoints::hold_scrub(true);
    let held_before = failpoints::scrubs_held();
    let done_before = failpoints::scrubs_done();
    let c = m.clients[0].clone();
    let r = http
        .delete(format!("{}/api/customers/c-5", c.base))
        .bearer_auth(&c.token)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    wait_for(Duration::from_secs(20), || async {
        failpoints::scrubs_held() > held_before
    })
    .await
    .expect("the erasure starts a rewrite of the data file");

    // The rewrite is running (held): sales are answered meanwhile.
    let mut tasks = Vec::new();
    for i in 0..SALES {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.post("/api/sales", sale(&format!("s-{i}"), None, &[(3, 1)]))
                .await
                .unwrap()
                .0
        }));
    }
    for t in tasks {
        // Before the fix the engine thread itself ran the copy: no answer.
        let st = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("a sale is answered while the data file is rewritten")
            .unwrap();
        assert_eq!(st, 201, "a sale during the rewrite");
    }
    assert_eq!(
        failpoints::scrubs_done(),
        done_before,
        "every sale was answered before the rewrite finished"
    );
    assert_eq!(stock_level(&c, 3).await, Some(1000 - SALES as i64));

    // Let the copy run: the sales committed during it are replayed into the
    // new file before it replaces the old one.
    failpoints::hold_scrub(false);
    wait_for(Duration::from_secs(30), || async {
        failpoints::scrubs_done() > done_before
    })
    .await
    .expect("the rewrite finishes");
    assert!(
        !contains(&std::fs::read(&path).unwrap(), &key),
        "the erased key's bytes are gone from the data file"
    );
    // One more write after the swap lands in the new file.
    let (st, _) = c
        .post("/api/sales", sale("s-after", None, &[(3, 1)]))
        .await
        .unwrap();
    assert_eq!(st, 201);

    // No write lost: everything is in the file a restart reads.
    m.restart(0).await;
    let c = m.clients[0].clone();
    for i in 0..SALES {
        let (st, v) = c.get(&format!("/api/sales/s-{i}")).await.unwrap();
        assert_eq!(st, 200, "sale s-{i} after the restart: {v}");
    }
    let (st, _) = c.get("/api/sales/s-after").await.unwrap();
    assert_eq!(st, 200);
    assert_eq!(stock_level(&c, 3).await, Some(1000 - SALES as i64 - 1));
    let r = http
        .get(format!("{}/api/customers/c-5", c.base))
        .bearer_auth(&c.token)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    let body = r.text().await.unwrap();
    assert!(!body.contains("Bo Example"), "{st} {body}");
    m.stop(0).await;
    assert!(!contains(&std::fs::read(&path).unwrap(), &key));
    m.shutdown().await;
}
