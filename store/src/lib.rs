//! storemesh's storage, apart from the node's IO shell so that the node and
//! the simulator run the very same code over it: the redb store (`store`),
//! the compact form of idempotency records (`idemcodec`), and a simulated
//! disk for redb (`simdisk`) that the simulator and the crash tests cut the
//! power of. It owns the file layout of a node's data; it knows nothing of
//! HTTP, QUIC or the node loop.

mod idemcodec;
pub mod simdisk;
pub mod store;

pub use store::Store;
