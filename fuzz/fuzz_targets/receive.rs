//! libFuzzer target `receive`: `storemesh_protocol::fuzz::Harness::exec("receive", ..)`,
//! the stable harness's entry point (no logic of its own).
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use storemesh_protocol::fuzz::Harness;

static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();

fuzz_target!(init: storemesh_fuzz::init(), |data: &[u8]| {
    let h = HARNESS.get_or_init(|| Mutex::new(Harness::new()));
    let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
    storemesh_fuzz::guarded(|| h.exec("receive", data));
});
