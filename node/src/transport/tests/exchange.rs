//! Frames and hellos: exchange both ways, bad frames, the digest in hellos,
//! mismatched hellos, start-up errors.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_frames_both_ways() {
    logs();
    let (mut a, mut b, _ia, ib) = pair().await;
    let (a_up, b_up) = (
        a.lifecycle(b.id).unwrap().unwrap(),
        b.lifecycle(a.id).unwrap().unwrap(),
    );
    let hello_seen_by_a = a.log.iter().rev().find_map(|e| match e {
        PeerUp { hello, name, .. } => Some((hello.clone(), name.clone())),
        _ => None,
    });
    let (h, name) = hello_seen_by_a.unwrap();
    assert_eq!(
        (h.nonce, h.node_id.as_str(), name.as_str()),
        (2, ib.node_id.hex().as_str(), "b")
    );

    for i in 0..200 {
        a.t.send(b.id, text_frame(&format!("a{i}"))).unwrap();
        b.t.send(a.id, text_frame(&format!("b{i}"))).unwrap();
    }
    for i in 0..200 {
        expect_text(&mut b, a.id, &format!("a{i}")).await;
        expect_text(&mut a, b.id, &format!("b{i}")).await;
    }
    // Frames carry the live connection id.
    assert!(a
        .log
        .iter()
        .all(|e| !matches!(e, Frame { conn_id, .. } if *conn_id != a_up)));
    assert!(b
        .log
        .iter()
        .all(|e| !matches!(e, Frame { conn_id, .. } if *conn_id != b_up)));

    // The largest legal frame passes; anything malformed is refused locally.
    let mut big = vec![7u8; FRAME_BYTES_MAX];
    big[0] = FRAME_VERSION;
    a.t.send(b.id, raw_frame(&big)).unwrap();
    let ev = b.wait_for("big frame", |e| matches!(e, Frame { .. })).await;
    assert!(matches!(ev, Frame { body, .. } if body == big));
    big.push(0);
    assert!(matches!(
        a.t.send(b.id, raw_frame(&big)),
        Err(SendError::InvalidFrame(_))
    ));
    assert!(matches!(
        a.t.send(b.id, vec![0, 0, 0, 9, 1]),
        Err(SendError::InvalidFrame(_))
    ));
    let stranger = Identity::generate("x").unwrap().node_id;
    assert_eq!(
        a.t.send(stranger, text_frame("x")),
        Err(SendError::NotConnected)
    );

    // Graceful shutdown delivers what was queued, then closes with a reason.
    for i in 0..50 {
        a.t.send(b.id, text_frame(&format!("last{i}"))).unwrap();
    }
    a.t.shutdown().await;
    for i in 0..50 {
        expect_text(&mut b, a.id, &format!("last{i}")).await;
    }
    let down = b
        .wait_for("PeerDown", |e| matches!(e, PeerDown { .. }))
        .await;
    assert!(
        matches!(&down, PeerDown { conn_id, reason, .. } if *conn_id == b_up && reason.contains("shut down")),
        "{down:?}"
    );
    let down = a
        .wait_for("own PeerDown", |e| matches!(e, PeerDown { .. }))
        .await;
    assert!(
        matches!(&down, PeerDown { reason, .. } if reason == "shutdown"),
        "{down:?}"
    );
    assert_eq!(a.t.send(b.id, text_frame("late")), Err(SendError::Shutdown));
    assert!(b.lifecycle(a.id).unwrap().is_none());
    b.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_or_empty_frames_disconnect_the_peer() {
    logs();
    let (mut a, mut b, _ia, _ib) = pair().await;
    for (raw, expect) in [
        (
            ((FRAME_BYTES_MAX + 1) as u32).to_be_bytes().to_vec(),
            "exceeds",
        ),
        (vec![0, 0, 0, 0], "empty frame"),
    ] {
        let (b_conn, _) = b.live(a.id).unwrap();
        let a_conn = a.live(b.id).unwrap().0;
        // Bypass `send`'s checks: write raw bytes on the stream.
        let mut bytes = raw.clone();
        bytes.extend_from_slice(&[1; 16]);
        {
            let st = a.t.inner.lock();
            let live = st.peers[&b.id].live.as_ref().unwrap();
            live.tx.as_ref().unwrap().try_send(bytes).unwrap();
        }
        let ev = b
            .wait_for("PeerDown", |e| matches!(e, PeerDown { .. }))
            .await;
        assert!(
            matches!(&ev, PeerDown { conn_id, reason, .. } if *conn_id == b_conn && reason.contains(expect)),
            "{ev:?}"
        );
        let ev = a
            .wait_for("PeerDown", |e| matches!(e, PeerDown { .. }))
            .await;
        assert!(
            matches!(&ev, PeerDown { conn_id, reason, .. } if *conn_id == a_conn && reason.contains("protocol violation")),
            "{ev:?}"
        );
        assert!(!b.log.iter().any(|e| matches!(e, Frame { .. })));
        // The supervisors reconnect.
        settle(&mut a, &mut b).await;
        assert_ne!(b.live(a.id).unwrap().0, b_conn);
    }
    tokio::join!(a.t.shutdown(), b.t.shutdown());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_carry_the_digest_set_last() {
    logs();
    let (mut a, mut b, _ia, _ib) = pair().await;
    // Before any digest is set, hellos carry none.
    let first_hello = |n: &Node| {
        n.log.iter().rev().find_map(|e| match e {
            PeerUp { hello, .. } => Some(hello.clone()),
            _ => None,
        })
    };
    assert_eq!(first_hello(&a).unwrap().digest, None);
    let da = HelloDigest {
        root: [1; 32],
        keys: [2; 32],
    };
    let db = HelloDigest {
        root: [3; 32],
        keys: [4; 32],
    };
    a.t.set_hello_digest(Some(HelloDigest {
        root: [9; 32],
        keys: [9; 32],
    }));
    a.t.set_hello_digest(Some(da));
    b.t.set_hello_digest(Some(db));
    a.t.set_blocked(b.id, true);
    a.wait_for("down", |e| matches!(e, PeerDown { .. })).await;
    b.wait_for("down", |e| matches!(e, PeerDown { .. })).await;
    a.t.set_blocked(b.id, false);
    let ev = a.wait_for("up", |e| matches!(e, PeerUp { .. })).await;
    assert!(
        matches!(&ev, PeerUp { hello, .. } if hello.digest == Some(db)),
        "{ev:?}"
    );
    let ev = b.wait_for("up", |e| matches!(e, PeerUp { .. })).await;
    assert!(
        matches!(&ev, PeerUp { hello, .. } if hello.digest == Some(da)),
        "{ev:?}"
    );
    tokio::join!(a.t.shutdown(), b.t.shutdown());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_hellos_are_refused_with_the_reason() {
    logs();
    let ia = Identity::generate("a").unwrap();
    let ib = Identity::generate("b").unwrap();
    let (sa, sb) = (bind(), bind());
    let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    let mut cb = config(&ib, "b", 2, vec![entry("a", &ia, aa)]);
    cb.hello.buckets = 32;
    let mut a = start("a", config(&ia, "a", 1, vec![entry("b", &ib, ab)]), sa).await;
    let mut b = start("b", cb, sb).await;
    for n in [&mut a, &mut b] {
        n.wait_for(
            "bucket refusal",
            |e| matches!(e, Refused { reason, .. } if reason.contains("buckets")),
        )
        .await;
    }
    a.drain();
    b.drain();
    assert_eq!(a.ups(b.id) + b.ups(a.id), 0);
    tokio::join!(a.t.shutdown(), b.t.shutdown());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_reports_an_address_in_use_clearly() {
    let taken = bind();
    let ia = Identity::generate("a").unwrap();
    let mut cfg = config(&ia, "a", 1, vec![]);
    cfg.listen = taken.local_addr().unwrap();
    let (tx, _rx) = mpsc::channel(8);
    let err = Transport::start(cfg.clone(), tx.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("address in use"), "{err}");
    cfg.keep_alive = cfg.idle_timeout;
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let err = Transport::start(cfg, tx).await.unwrap_err().to_string();
    assert!(err.contains("keep-alive"), "{err}");
}
