//! storemesh node: the IO shell around the sans-IO core — QUIC transport,
//! HTTP API, configuration, identity, CLI and the demo — over the redb store
//! of the `storemesh-store` crate (re-exported as `store` and `simdisk`).

pub mod api;
pub mod cli;
pub mod config;
pub mod csvio;
pub mod dashboard;
pub mod demo;
pub mod fuzz;
pub mod http;
pub mod https;
pub mod identity;
pub mod memory;
pub mod node;
pub mod server;
pub mod signing;
pub mod state;
pub mod transport;
pub mod webhooks;

// Storage lives in its own crate (`storemesh-store`), shared with the
// simulator; re-exported under its old paths.
pub use storemesh_store::{simdisk, store};
