//! Stocktakes: count sessions uploaded in pages, full counts, and the parts
//! a large count is written in.
//!
//! A real stocktake covers thousands of products and is scanned over hours
//! while the till keeps selling. A session takes pages of at most
//! `LINES_MAX` lines (`POST /api/counts/{id}/lines`); each line's delta is
//! taken against this node's view as of the line's own `counted_at` and
//! applied at once, so sales between scanning and finishing are not erased.
//! A product sent again is a recount: its new line's basis includes the
//! session's earlier correction, so the product ends at the new count.
//! `finish` with scope `full` sets every product of the location that the
//! session did not count to 0.
//!
//! A peer refuses a record over `validate::RECORD_BYTES_MAX`, and one refused
//! record blocks the whole records document of this node — so nothing here
//! writes an unbounded record: each page is one record, and the products a
//! full count sets to 0 are written in parts of `ZERO_PART_LINES_MAX`.

use std::collections::BTreeMap;

/// Products one session may count: the contract's locations of 100,000
/// products with room to spare; the owning node keeps one entry per counted
/// product (about 100 bytes) while the session is open.
pub const SESSION_PRODUCTS_MAX: usize = 1_000_000;
/// Sessions open at once at one node (each may hold a large line map).
pub const SESSIONS_OPEN_MAX: usize = 64;
/// Products per part of a full count's zeroing: an entry `[product, basis,
/// delta]` is at most ~60 bytes of JSON, so a part stays under 64 KiB.
pub const ZERO_PART_LINES_MAX: usize = 800;
/// Lines per page record: `[product, counted, basis, delta, counted_at_ms]`
/// is at most ~90 bytes of JSON; 500 of them stay under 64 KiB.
pub const PAGE_LINES_MAX: usize = crate::ops::LINES_MAX;

/// What a node knows of a count (a session or a one-shot count).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CountSession {
    pub location: String,
    /// Name of the node that takes the session's lines.
    pub node: String,
    /// page → (lines, units delta), from the page records.
    pub pages: BTreeMap<u64, (u64, i64)>,
    /// The owning node's lines while the session is open: product → line.
    pub lines: BTreeMap<u64, LineState>,
    /// The finish result (the body `finish` answers), once finished.
    pub finished: Option<serde_json::Value>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineState {
    pub counted: u64,
    /// Page of the latest line for the product.
    pub page: u64,
    /// Sum of the deltas the session applied to the product.
    pub delta_total: i64,
    /// `counted_at` of the latest line (unix ms).
    pub counted_at_ms: u64,
    /// When the latest line was applied (its page's arrival, unix ms).
    pub applied_ms: u64,
}

impl CountSession {
    pub fn units_delta(&self) -> i64 {
        self.pages.values().map(|(_, d)| *d).sum()
    }

    /// The body of `GET /api/counts/{id}`.
    pub fn status_json(&self, id: &str) -> serde_json::Value {
        if let Some(f) = &self.finished {
            let mut v = f.clone();
            v["node"] = self.node.clone().into();
            v["pages"] = self.pages.len().into();
            return v;
        }
        let lines_counted = if self.lines.is_empty() {
            self.pages.values().map(|(n, _)| *n).sum::<u64>()
        } else {
            self.lines.len() as u64
        };
        serde_json::json!({"count_id": id, "location": self.location, "node": self.node, "status": "open", "lines_counted": lines_counted, "pages": self.pages.len(), "units_delta": self.units_delta()})
    }
}
