//! What every libFuzzer target shares: panic handling that matches the
//! stable harnesses' rule — a panic that *escapes* the entry point is a
//! finding; one the product catches itself (the bundle parser's guard in
//! `validate.rs`, the last-line guard in `step.rs`, the harness's own guard
//! around Automerge's change encoder) is not.
//!
//! libfuzzer-sys installs a panic hook that aborts at once, before any
//! `catch_unwind` can run; [`init`] replaces it with one that only records
//! the message, and [`guarded`] aborts (which libFuzzer records as a crash,
//! keeping the input in `artifacts/<target>/`) when a panic got out.

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Call from `fuzz_target!(init: ...)`.
pub fn init() {
    std::panic::set_hook(Box::new(|info| {
        let msg = format!("{info}");
        LAST_PANIC.with(|p| *p.borrow_mut() = msg);
    }));
}

/// Runs one input; a panic escaping `f` aborts with its message.
pub fn guarded(f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        let msg = LAST_PANIC.with(|p| p.borrow().clone());
        eprintln!("fuzz finding: a panic escaped the target: {msg}");
        std::process::abort();
    }
}
