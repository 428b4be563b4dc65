//! storemesh's deterministic simulator.
//!
//! A run drives N nodes built from the production protocol core (`Engine`) and
//! the production storage (`Store` over a simulated disk), through a copy of the
//! production request path, over a simulated network with simulated time. All
//! randomness comes from one seeded RNG, so a seed replays byte for byte.
//!
//! - [`run_seed`]: one random run (workload + fault menu + invariant checks);
//! - [`scenario`]: a described scenario (topology, rates, partition schedule);
//! - [`selftest`]: planted bugs the checkers must find.

pub mod books;
pub mod check;
pub mod client;
pub mod driver;
pub mod hostile;
pub mod invariant;
pub mod net;
pub mod options;
pub mod scenario;
pub mod selftest;
pub mod workload;
pub mod world;

pub use driver::{run_seed, RunReport};
pub use invariant::Violation;
pub use options::{Bug, Derived, FaultKind, Options, Topology};
