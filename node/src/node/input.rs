//! The idle engine thread's wait: on client commands and transport events
//! at once (commands first), without a runtime of its own.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::state::Cmd;
use crate::transport::TransportEvent;

/// What woke the idle engine thread.
pub(super) enum Next {
    Cmd(Cmd),
    Net(TransportEvent),
}

/// Waits until a command or a peer event arrives (a command first when both
/// are there). `None`: every command sender is gone, the loop ends. A closed
/// transport channel (the transport shut down) leaves commands only.
pub(super) fn wait_for_input(
    rx: &mut mpsc::Receiver<Cmd>,
    net: &mut mpsc::Receiver<TransportEvent>,
) -> Option<Next> {
    let mut net_open = true;
    block_on(std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(c) = rx.poll_recv(cx) {
            return std::task::Poll::Ready(c.map(Next::Cmd));
        }
        if net_open {
            match net.poll_recv(cx) {
                std::task::Poll::Ready(Some(e)) => {
                    return std::task::Poll::Ready(Some(Next::Net(e)))
                }
                std::task::Poll::Ready(None) => net_open = false,
                std::task::Poll::Pending => {}
            }
        }
        std::task::Poll::Pending
    }))
}

/// Wakes a thread parked in [`block_on`].
struct Unpark(std::thread::Thread);

impl std::task::Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a future to completion on this (non-runtime) thread, parking it
/// while the future waits: the engine thread waits on two channels at once
/// without a runtime of its own.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        // A wake between the poll and here leaves the token: park returns at once.
        std::thread::park();
    }
}
