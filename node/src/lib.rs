//! storemesh node: the IO shell around the sans-IO core — redb storage, QUIC
//! transport, HTTP API, configuration, identity, CLI and the demo.

pub mod demo;
pub mod server;
