//! Runs a node: storage, engine task, transport and HTTP API.

use std::path::Path;

/// Runs the node in `data_dir` until SIGINT/SIGTERM.
pub async fn run(data_dir: &Path) -> anyhow::Result<()> {
    anyhow::bail!("run is not wired yet ({})", data_dir.display())
}
