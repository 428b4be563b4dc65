//! TLS identity: unknown certificates, a cloned identity, how a rejected
//! key is found in a handshake error.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_certificates_are_refused_on_both_sides() {
    logs();
    let ia = Identity::generate("a").unwrap();
    let ib = Identity::generate("b").unwrap();
    let ic = Identity::generate("c").unwrap(); // known to nobody
    let ghost = Identity::generate("ghost").unwrap(); // A expects it where C listens
    let (sa, sb, sc) = (bind(), bind(), bind());
    let (aa, ab, ac) = (
        sa.local_addr().unwrap(),
        sb.local_addr().unwrap(),
        sc.local_addr().unwrap(),
    );
    let mut a = start(
        "a",
        config(
            &ia,
            "a",
            1,
            vec![entry("b", &ib, ab), entry("ghost", &ghost, ac)],
        ),
        sa,
    )
    .await;
    let mut b = start("b", config(&ib, "b", 2, vec![entry("a", &ia, aa)]), sb).await;
    // C trusts B and dials it; B does not know C's key.
    let mut c = start("c", config(&ic, "c", 3, vec![entry("b", &ib, ab)]), sc).await;

    let c_hex = ic.node_id.hex();
    // A dials C: A's server-certificate verifier rejects C's key.
    let ev = a
        .wait_for(
            "Refused C",
            |e| matches!(e, Refused { node_id: Some(n), .. } if *n == c_hex),
        )
        .await;
    assert!(
        matches!(&ev, Refused { addr, reason, .. } if *addr == ac && reason.contains("unknown key")),
        "{ev:?}"
    );
    // C dials B: B's client-certificate verifier rejects C's key.
    let ev = b
        .wait_for(
            "Refused C",
            |e| matches!(e, Refused { node_id: Some(n), .. } if *n == c_hex),
        )
        .await;
    assert!(
        matches!(&ev, Refused { addr, reason, .. } if *addr == ac && reason.contains("unknown key")),
        "{ev:?}"
    );
    // C learns that its certificate was rejected.
    c.wait_for("Refused at C", |e| matches!(e, Refused { reason, .. } if reason.contains("rejected this node's certificate")))
        .await;

    settle(&mut a, &mut b).await;
    a.t.send(b.id, text_frame("hi")).unwrap();
    expect_text(&mut b, a.id, "hi").await;
    assert_eq!(
        c.t.send(b.id, text_frame("x")),
        Err(SendError::NotConnected)
    );
    assert_eq!(
        a.t.send(ghost.node_id, text_frame("x")),
        Err(SendError::NotConnected)
    );

    // Let both of C's attempts repeat a few times, then check nothing leaked.
    c.wait_for("another refusal", |e| matches!(e, Refused { .. }))
        .await;
    a.drain();
    b.drain();
    c.drain();
    assert!(
        c.log.iter().all(|e| matches!(e, Refused { .. })),
        "{:#?}",
        c.log
    );
    for n in [&a, &b] {
        assert!(n.log.iter().all(|e| match e {
            PeerUp { peer, .. } | Frame { peer, .. } | PeerDown { peer, .. } =>
                *peer != ic.node_id && *peer != ghost.node_id,
            Refused { .. } => true,
        }));
    }
    assert!(c.t.connected().is_empty());
    tokio::join!(a.t.shutdown(), b.t.shutdown(), c.t.shutdown());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloned_identity_is_refused_while_the_original_is_connected() {
    logs();
    let (mut a, mut b, _ia, ib) = pair().await;
    let a_addr = a.t.local_addr();
    let a_conn = a.live(b.id).unwrap().0;
    let ups_before = a.ups(b.id);
    let mark = a.log.len();

    // Same identity as B, another process (nonce).
    let mut clone = start(
        "clone",
        config(
            &ib,
            "b",
            99,
            vec![PeerEntry {
                name: "a".into(),
                id: a.id,
                addr: a_addr,
            }],
        ),
        bind(),
    )
    .await;
    let ev = a
        .wait_for(
            "Refused clone",
            |e| matches!(e, Refused { reason, .. } if reason.contains("different process nonces")),
        )
        .await;
    assert!(
        matches!(&ev, Refused { node_id: Some(n), .. } if *n == ib.node_id.hex()),
        "{ev:?}"
    );
    clone
        .wait_for(
            "clone told",
            |e| matches!(e, Refused { reason, .. } if reason.contains("cloned identity")),
        )
        .await;

    // The original connection is untouched and still carries frames.
    a.t.send(b.id, text_frame("still here")).unwrap();
    expect_text(&mut b, a.id, "still here").await;
    a.drain();
    assert_eq!(a.live(b.id).map(|l| l.0), Some(a_conn));
    assert_eq!(a.live_nonce(b.id), Some(2));
    assert_eq!(a.ups(b.id), ups_before);
    assert!(!a.log[mark..].iter().any(|e| matches!(e, PeerDown { .. })));
    clone.drain();
    assert!(!clone
        .log
        .iter()
        .any(|e| matches!(e, PeerUp { .. } | Frame { .. })));

    // Once the original is gone, the other process may connect.
    b.t.shutdown().await;
    a.wait_for(
        "original down",
        |e| matches!(e, PeerDown { conn_id, .. } if *conn_id == a_conn),
    )
    .await;
    let ev = a.wait_for("clone up", |e| matches!(e, PeerUp { .. })).await;
    assert!(
        matches!(&ev, PeerUp { hello, peer, .. } if hello.nonce == 99 && *peer == ib.node_id),
        "{ev:?}"
    );
    clone
        .wait_for("clone up", |e| matches!(e, PeerUp { .. }))
        .await;
    tokio::join!(a.t.shutdown(), clone.t.shutdown());
}

#[test]
fn rejected_keys_are_found_in_handshake_errors() {
    let id = Identity::generate("x").unwrap().node_id;
    let err = rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
        Arc::new(KeyRejected { id, own: false }),
    )));
    let text = err.to_string();
    assert_eq!(rejected_key(&text, UNKNOWN_KEY_MARKER), Some(id));
    assert_eq!(rejected_key(&text, OWN_KEY_MARKER), None);
    assert_eq!(
        rejected_key("unknown peer key zz", UNKNOWN_KEY_MARKER),
        None
    );
}
