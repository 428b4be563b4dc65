//! The end-to-end tests live in `tests/tests/`; their helpers are in the
//! dev-only `storemesh-testkit` crate.
