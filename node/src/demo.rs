//! `storemesh demo`: a guided tour on loopback.

/// Runs the demo; with `serve` it keeps the mesh running after the tour.
pub async fn run(serve: bool) -> anyhow::Result<()> {
    anyhow::bail!("demo is not wired yet (serve={serve})")
}
