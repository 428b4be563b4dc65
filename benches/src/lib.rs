//! Benchmark support: fixtures for the criterion micro-benchmarks, and the
//! pieces of the `storemesh-bench` report (a keep-alive HTTP load generator, a
//! UDP relay that can cut a link and counts its bytes, workload generators,
//! statistics and machine facts).

pub mod fixtures;
pub mod http;
pub mod machine;
pub mod proxy;
pub mod report;
pub mod stats;
pub mod workload;
