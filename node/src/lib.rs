//! storemesh node: the IO shell around the sans-IO core — redb storage, QUIC
//! transport, HTTP API, configuration, identity, CLI and the demo.

pub mod api;
mod books_api;
pub mod cli;
pub mod config;
pub mod csvio;
pub mod dashboard;
pub mod demo;
pub mod fuzz;
pub mod http;
pub mod https;
mod idemcodec;
pub mod identity;
pub mod node;
pub mod server;
pub mod signing;
pub mod simdisk;
pub mod store;
pub mod transport;
pub mod webhooks;
