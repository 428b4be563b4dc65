//! `storemesh run`: runs one node until SIGINT/SIGTERM, then shuts down cleanly.

use std::path::Path;

use crate::node::NodeHandle;

/// Runs the node in `data_dir` until SIGINT/SIGTERM.
pub async fn run(data_dir: &Path) -> anyhow::Result<()> {
    let node = NodeHandle::start(data_dir).await?;
    tracing::info!(
        node = %node.shared.cfg.name,
        http = %node.http_addr,
        quic = %node.quic_addr,
        "node running"
    );
    // The human banner only on a terminal: piped stderr stays pure log
    // lines (JSON lines with `--log-format json`).
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!(
            "storemesh node {} running: HTTP {}://{} QUIC {} (Ctrl-C to stop)",
            node.shared.cfg.name,
            if node.shared.cfg.api.tls.is_some() {
                "https"
            } else {
                "http"
            },
            node.http_addr,
            node.quic_addr
        );
    }
    wait_for_signal().await;
    tracing::info!("signal received; shutting down");
    node.shutdown().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut i), Ok(mut t)) => {
                tokio::select! {
                    _ = i.recv() => {}
                    _ = t.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
