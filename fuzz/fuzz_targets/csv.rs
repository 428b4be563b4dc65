//! libFuzzer target `csv`: `storemesh_node::fuzz::exec_csv`, the stable
//! harness's entry point (no logic of its own).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: storemesh_fuzz::init(), |data: &[u8]| {
    storemesh_fuzz::guarded(|| storemesh_node::fuzz::exec_csv(data));
});
