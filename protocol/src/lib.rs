//! storemesh's sans-IO core: the stock and customer ledger, its Automerge
//! documents, materialized views, the node state machine and the sync protocol.
//!
//! Nothing in this crate touches a socket, a file, a clock or a global RNG: time
//! and randomness are arguments, effects are returned as values. The `node`
//! crate runs it over redb and QUIC; the `sim` crate runs it over a simulated
//! network and disk.

pub mod arbitration;
pub mod authority;
pub mod coldsales;
pub mod counts;
pub mod crypto;
pub mod engine;
pub mod fuzz;
pub mod history;
pub mod ids;
pub mod imports;
pub mod inflate;
pub mod layout;
pub mod lazydoc;
pub mod ledger;
pub mod ops;
pub mod rebalance;
pub mod recordids;
pub mod reservations;
pub mod retail;
pub mod saleindex;
pub mod signing;
pub mod step;
pub mod sync;
pub mod testkit;
pub mod time;
pub mod validate;
pub mod views;
pub mod wire;

pub use engine::{Batch, DocWrite, Engine, EngineConfig, Policy};
