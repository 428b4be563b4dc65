//! libFuzzer target `http`: `storemesh_node::fuzz::HttpHarness::exec`, the
//! stable harness's entry point — a real node on a temporary directory, the
//! real router driven in process (no logic of its own).
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use storemesh_node::fuzz::HttpHarness;

static HARNESS: OnceLock<Mutex<HttpHarness>> = OnceLock::new();

fuzz_target!(init: storemesh_fuzz::init(), |data: &[u8]| {
    let h = HARNESS.get_or_init(|| Mutex::new(HttpHarness::new().expect("the node starts")));
    let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
    storemesh_fuzz::guarded(|| h.exec(data));
});
