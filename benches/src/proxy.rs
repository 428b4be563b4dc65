//! A UDP relay between QUIC peers on loopback: forwards datagrams both ways,
//! counts them, and can cut the link (drop everything) and heal it. Used to
//! partition nodes that run as separate OS processes, and to count the raw
//! bytes (QUIC and TLS overhead included) that crossed a link.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use tokio::net::UdpSocket;

const BUFFER_BYTES: libc::c_int = 4 << 20;

#[derive(Default)]
pub struct Counters {
    /// client → target (the side that dials through this relay → the listener).
    pub bytes_up: AtomicU64,
    pub packets_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub packets_down: AtomicU64,
    pub dropped: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub bytes_up: u64,
    pub packets_up: u64,
    pub bytes_down: u64,
    pub packets_down: u64,
}

impl Snapshot {
    pub fn bytes(&self) -> u64 {
        self.bytes_up + self.bytes_down
    }
    pub fn packets(&self) -> u64 {
        self.packets_up + self.packets_down
    }
    pub fn minus(&self, o: &Snapshot) -> Snapshot {
        Snapshot {
            bytes_up: self.bytes_up - o.bytes_up,
            packets_up: self.packets_up - o.packets_up,
            bytes_down: self.bytes_down - o.bytes_down,
            packets_down: self.packets_down - o.packets_down,
        }
    }
}

struct Shared {
    cut: AtomicBool,
    counters: Counters,
    /// First datagram forwarded after the last heal.
    first_after_heal: Mutex<Option<Instant>>,
}

/// A running relay; dropping it does not stop it (tasks end with the runtime).
#[derive(Clone)]
pub struct UdpRelay {
    pub listen: SocketAddr,
    shared: Arc<Shared>,
}

fn big_buffers(s: &UdpSocket) {
    let fd = s.as_raw_fd();
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: a valid socket fd and a c_int option value of the right size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&BUFFER_BYTES as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

impl UdpRelay {
    /// Listens on a free loopback port and relays to `target`.
    pub async fn start(target: SocketAddr) -> Result<UdpRelay> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        big_buffers(&front);
        let listen = front.local_addr()?;
        let shared = Arc::new(Shared {
            cut: AtomicBool::new(false),
            counters: Counters::default(),
            first_after_heal: Mutex::new(None),
        });
        let sh = shared.clone();
        tokio::spawn(async move {
            let mut ups: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else {
                    break;
                };
                if sh.cut.load(Ordering::Relaxed) {
                    sh.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let up = match ups.get(&from) {
                    Some(u) => u.clone(),
                    None => {
                        let Ok(u) = UdpSocket::bind("127.0.0.1:0").await else {
                            continue;
                        };
                        big_buffers(&u);
                        if u.connect(target).await.is_err() {
                            continue;
                        }
                        let u = Arc::new(u);
                        ups.insert(from, u.clone());
                        // Replies from the target go back to this client.
                        let (u2, f2, sh2) = (u.clone(), front.clone(), sh.clone());
                        tokio::spawn(async move {
                            let mut b = vec![0u8; 65536];
                            while let Ok(n) = u2.recv(&mut b).await {
                                if sh2.cut.load(Ordering::Relaxed) {
                                    sh2.counters.dropped.fetch_add(1, Ordering::Relaxed);
                                    continue;
                                }
                                sh2.note_first();
                                sh2.counters
                                    .bytes_down
                                    .fetch_add(n as u64, Ordering::Relaxed);
                                sh2.counters.packets_down.fetch_add(1, Ordering::Relaxed);
                                let _ = f2.send_to(&b[..n], from).await;
                            }
                        });
                        u
                    }
                };
                sh.note_first();
                sh.counters.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
                sh.counters.packets_up.fetch_add(1, Ordering::Relaxed);
                let _ = up.send(&buf[..n]).await;
            }
        });
        Ok(UdpRelay { listen, shared })
    }

    pub fn set_cut(&self, cut: bool) {
        if !cut {
            *self
                .shared
                .first_after_heal
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = None;
        }
        self.shared.cut.store(cut, Ordering::SeqCst);
    }

    /// When the first datagram crossed after the last heal.
    pub fn first_after_heal(&self) -> Option<Instant> {
        *self
            .shared
            .first_after_heal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> Snapshot {
        let c = &self.shared.counters;
        Snapshot {
            bytes_up: c.bytes_up.load(Ordering::Relaxed),
            packets_up: c.packets_up.load(Ordering::Relaxed),
            bytes_down: c.bytes_down.load(Ordering::Relaxed),
            packets_down: c.packets_down.load(Ordering::Relaxed),
        }
    }
}

impl Shared {
    fn note_first(&self) {
        let mut g = self
            .first_after_heal
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(Instant::now());
        }
    }
}
