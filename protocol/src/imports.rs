//! Bookings at a location no node owns: one physical event, one accounting.
//!
//! `import counts` may book rows at a location without a node of its own (a
//! warehouse: opening balances), and any node may record a receipt there (a
//! delivery to the warehouse). A count sets on hand to what was counted,
//! relative to the importing node's view; two nodes importing the same file
//! (one import id) while apart each applied the whole correction, so the
//! units were added twice — and two nodes recording one delivery (one
//! receipt id, the same lines) each added its units. As for transfers into
//! such a location (booked only by the sending node), one node's booking
//! stands: a booking made after another node's booking of the id (its record
//! names those it saw, and the nodes whose units there it counted over
//! before their record arrived) is never it; of the bookings made apart, the first by
//! (time, node name) — every node sees the same records, so all agree on it.
//! Every later node, once it sees the first's record, reverses its own rows
//! there: one count record per page of up to `ops::LINES_MAX` lines
//! (`<id>.<loc>.undo<k>`, read like any count), plus a marker
//! (`imp/<id>.<loc>.undone`), all in one operation. Run once per batch for
//! the ids noted since (`Engine::settle_ownerless_imports`).
//!
//! Imports and receipts share the index (`Views::imports`): an import under
//! its id, a receipt under `rcv/<receipt_id>` (client ids have no `/`, so
//! the two never meet), its reversal's records under `rcv~<receipt_id>`.
//! Two receipts of one id are one delivery only with the same lines (per
//! product); with other lines they are two operations that collided while
//! apart, and both stand (CONTRACT v2). A receipt adds its units whatever the
//! others booked, so of one delivery's receipts the first by (time, node
//! name) of all of them stands, seen or not: a rule that more knowledge never
//! reverses (an import's count is relative to what its node saw, so there the
//! rule above holds).

use std::collections::{BTreeMap, BTreeSet};

use crate::ops::LINES_MAX;

/// Other importers an import record names as booked before it, at most
/// (a chain has far fewer nodes).
pub const SEEN_MAX: usize = 256;

/// Prefix of a receipt's key in the index (`Views::imports`).
pub(crate) const RECEIPT_KEY: &str = "rcv/";

/// The index key of receipt `id`.
pub fn receipt_key(id: &str) -> String {
    format!("{RECEIPT_KEY}{id}")
}

/// What a node knows of one node's import (or receipt) of an id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportSeen {
    pub at_ms: u64,
    /// Locations the import booked rows at.
    pub locations: BTreeSet<String>,
    /// Locations where this node's booking was reversed.
    pub undone: BTreeSet<String>,
    /// Nodes whose import of the id this one was booked after.
    pub seen: BTreeSet<String>,
    /// Nodes whose units at an ownerless location of the import this one
    /// was counted over, their import record not known then: if one of
    /// them imported the id too (and not after this one), this booking came
    /// after it — its basis holds that booking (seed 8 of the #16 sweep).
    pub counted_over: BTreeSet<String>,
    /// A receipt's units per product (empty for an import): receipts of one
    /// id are one delivery only when these are equal.
    pub lines: BTreeMap<u64, u64>,
}

/// Units per product of a record's `lines` (bounded: records come from peers).
pub(crate) fn summed_lines(v: &serde_json::Value) -> BTreeMap<u64, u64> {
    let mut out: BTreeMap<u64, u64> = BTreeMap::new();
    for l in v["lines"].as_array().into_iter().flatten().take(LINES_MAX) {
        let e = out
            .entry(l["product_id"].as_u64().unwrap_or(0))
            .or_default();
        *e = e.saturating_add(l["quantity"].as_u64().unwrap_or(0));
    }
    out
}

/// Whether node `me`'s booking `mine` of one id at ownerless location `l`
/// is to be reversed, given every booking of the id this node knows of
/// (`all`, by node name; `at_ms == 0`: only a reversal marker known).
///
/// The decision must not change as more bookings become known, or every node
/// may reverse its own (each in favour of one that later turned out to come
/// after another): a node that reversed never gets its booking back.
/// - A receipt adds units whatever the others booked, so any one booking
///   standing counts the delivery once: the first by (time, node name) of
///   all of them, which more knowledge only moves earlier (seeds 671, 685
///   and 730 of a 2,000-seed sweep).
/// - An import's count is relative to what its node saw, so a booking made
///   after seeing another's (`seen`) or counted over another importer's
///   units (`counted_over`) never stands; of the others, the first by
///   (time, node name). A node named in `seen` whose own record is not known
///   here yet is taken to have booked at `l` (its record will say so; seed
///   1243: a node that knew only a later booking which had seen a third
///   reversed its own in favour of it, then the third's record made that one
///   "after" too, and no booking stood). Still not monotone in one case: an
///   import booked at several locations after seeing another's booking at
///   another location only counts as "after" here until that record arrives.
pub(crate) fn yields_at(
    me: &str,
    mine: &ImportSeen,
    all: &BTreeMap<String, ImportSeen>,
    l: &str,
    receipt: bool,
) -> bool {
    let at_l: Vec<(&String, &ImportSeen)> = all
        .iter()
        .filter(|(_, s)| s.at_ms != 0 && s.locations.contains(l))
        .filter(|(_, s)| s.lines == mine.lines)
        .collect();
    if receipt {
        return at_l
            .iter()
            .map(|(n, s)| (s.at_ms, n.as_str()))
            .min()
            .is_some_and(|first| first.1 != me);
    }
    // A booking this one saw, at `l` or of unknown place.
    let saw_at_l = |who: &str, s: &ImportSeen| {
        s.seen.iter().any(|n| {
            n.as_str() != who
                && all.get(n).is_none_or(|o| {
                    o.at_ms == 0 || (o.locations.contains(l) && o.lines == mine.lines)
                })
        })
    };
    let after_other = |who: &str, s: &ImportSeen| {
        saw_at_l(who, s)
            || at_l.iter().any(|(n, o)| {
                n.as_str() != who && s.counted_over.contains(*n) && !o.seen.contains(who)
            })
    };
    after_other(me, mine)
        || at_l
            .iter()
            .filter(|(n, s)| !after_other(n, s))
            .map(|(n, s)| (s.at_ms, n.as_str()))
            .min()
            .is_some_and(|first| first.1 != me)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn booking(at_ms: u64, seen: &[&str]) -> ImportSeen {
        ImportSeen {
            at_ms,
            locations: BTreeSet::from(["wh".to_string()]),
            seen: seen.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// With every booking known, the one that stands (the only one not
    /// yielding), and that it never yields whatever subset of the others'
    /// records it knows (records arrive in any order; a reversal is final).
    fn check_monotone(bookings: &BTreeMap<String, ImportSeen>, receipt: bool) -> String {
        let standing: Vec<&String> = bookings
            .iter()
            .filter(|(n, b)| !yields_at(n, b, bookings, "wh", receipt))
            .map(|(n, _)| n)
            .collect();
        assert_eq!(standing.len(), 1, "exactly one stands: {standing:?}");
        let w = standing[0].clone();
        let others: Vec<&String> = bookings.keys().filter(|n| **n != w).collect();
        for mask in 0..(1u32 << others.len()) {
            let known: BTreeMap<String, ImportSeen> = bookings
                .iter()
                .filter(|(n, _)| {
                    **n == w
                        || others
                            .iter()
                            .position(|o| o == n)
                            .is_some_and(|i| mask & (1 << i) != 0)
                })
                .map(|(n, b)| (n.clone(), b.clone()))
                .collect();
            assert!(
                !yields_at(&w, &bookings[&w], &known, "wh", receipt),
                "{w} yields knowing {:?}",
                known.keys().collect::<Vec<_>>()
            );
        }
        w
    }

    /// Seed 1243 (imports): n0 booked after seeing n2's booking but with the
    /// earliest clock; n4 apart. n4 knowing only n0's record yielded to it.
    #[test]
    fn an_import_that_stands_never_yields_whatever_it_knows() {
        let b: BTreeMap<String, ImportSeen> = [
            ("n0".to_string(), booking(1_000, &["n2"])),
            ("n2".to_string(), booking(3_000, &[])),
            ("n4".to_string(), booking(2_000, &[])),
        ]
        .into();
        assert_eq!(check_monotone(&b, false), "n4");
        // Apart, all of them: the first by time.
        let b: BTreeMap<String, ImportSeen> = [
            ("a".to_string(), booking(5, &[])),
            ("b".to_string(), booking(4, &[])),
            ("c".to_string(), booking(6, &["a"])),
        ]
        .into();
        assert_eq!(check_monotone(&b, false), "b");
    }

    /// Seeds 671, 685, 730 (receipts): the first by (time, node) of all.
    #[test]
    fn a_receipt_that_stands_never_yields_whatever_it_knows() {
        let b: BTreeMap<String, ImportSeen> = [
            ("n0".to_string(), booking(60_000, &[])),
            ("n1".to_string(), booking(0, &["n0"])),
            ("n2".to_string(), booking(1_000, &[])),
        ]
        .into();
        // at_ms 0 means "only a marker known": use 1 for the earliest clock.
        let mut b = b;
        if let Some(x) = b.get_mut("n1") {
            x.at_ms = 1;
        }
        assert_eq!(check_monotone(&b, true), "n1");
    }
}
