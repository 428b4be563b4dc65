//! Outgoing sync message shaping: hiding the `MessageV2` capability from
//! a peer holding part of a document, and bundling many changes into one
//! Automerge bundle.

use std::collections::BTreeSet;

use automerge::sync as amsync;
use automerge::ChangeHash;

use super::BUNDLE_MIN_CHANGES;
use crate::validate::{chunk_type, CHUNK_CHANGE, CHUNK_COMPRESSED_CHANGE};

/// Removes the peer's `MessageV2` capability from the session while the peer
/// is known to hold part of the document; returns the capabilities to put
/// back after the message is generated.
pub(crate) fn hide_v2_if_partial(state: &mut amsync::State) -> Option<Vec<amsync::Capability>> {
    let partial = state.their_heads.as_ref().is_some_and(|h| !h.is_empty());
    let caps = state.their_capabilities.as_ref()?;
    if !partial || !caps.contains(&amsync::Capability::MessageV2) {
        return None;
    }
    let without = caps
        .iter()
        .filter(|c| **c != amsync::Capability::MessageV2)
        .cloned()
        .collect();
    state.their_capabilities.replace(without)
}

/// Replaces the change chunks of an outgoing sync message by one Automerge
/// bundle of the same changes when there are at least [`BUNDLE_MIN_CHANGES`]
/// of them. The changes sent are the hashes the message added to the
/// session's `sent_hashes`. A whole-document message (Automerge sends one
/// when more than a third of the document is missing) is already columnar
/// and stays as it is; so does anything the bundle cannot be made of.
pub(crate) fn bundle_changes(
    doc: &automerge::Automerge,
    msg: &mut amsync::Message,
    sent_before: &BTreeSet<ChangeHash>,
    sent_after: &BTreeSet<ChangeHash>,
) -> Option<usize> {
    let only_changes = !msg.changes.is_empty()
        && msg
            .changes
            .iter()
            .all(|c| matches!(chunk_type(c), Some(CHUNK_CHANGE | CHUNK_COMPRESSED_CHANGE)));
    if !only_changes {
        return None;
    }
    let hashes: Vec<ChangeHash> = sent_after.difference(sent_before).copied().collect();
    let n = hashes.len();
    if n < BUNDLE_MIN_CHANGES {
        return None;
    }
    match doc.bundle(hashes) {
        Ok(b) => {
            msg.changes = vec![b.bytes().to_vec()].into();
            Some(n)
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot bundle a sync message's changes");
            None
        }
    }
}
