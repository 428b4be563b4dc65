//! Wire format between peers: length-prefixed frames on one ordered QUIC stream.
//!
//! Every frame is `u32 length (big endian) | u8 version | payload`. The payload is
//! a postcard-encoded (compact binary serde) message. Frames over [`FRAME_BYTES_MAX`] are a protocol
//! violation: the receiver disconnects the peer instead of allocating.

use serde::{Deserialize, Serialize};

/// Wire protocol version, checked in the hello.
pub const PROTOCOL_VERSION: u32 = 1;
/// Version byte at the start of every frame payload.
pub const FRAME_VERSION: u8 = 1;
/// Largest frame on the wire. Automerge sync messages larger than this are split
/// into chunks (see `sync`), so no honest peer ever exceeds it.
pub const FRAME_BYTES_MAX: usize = 1 << 20;
/// Largest chunk of a split sync message; leaves room for the frame envelope.
pub const CHUNK_BYTES_MAX: usize = 512 * 1024;

/// The first frame on a connection, sent by both sides. A connection is
/// authenticated only after the peer's hello matched its TLS identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    /// Hex SHA-256 of the sender's certificate SPKI; must equal what TLS saw.
    pub node_id: String,
    pub name: String,
    /// Buckets per location/customer space; peers with different values refuse each other.
    pub buckets: u32,
    /// Random per process start: two live processes with one identity differ here.
    pub nonce: u64,
}

impl Hello {
    /// Checks a peer's hello against ours and against the TLS-verified node id.
    pub fn check(&self, ours: &Hello, tls_node_id: &str) -> Result<(), String> {
        if self.protocol_version != ours.protocol_version {
            return Err(format!(
                "peer speaks protocol {} but this node speaks {}",
                self.protocol_version, ours.protocol_version
            ));
        }
        if self.node_id != tls_node_id {
            return Err("hello node id does not match the TLS certificate".into());
        }
        if self.buckets != ours.buckets {
            return Err(format!(
                "peer uses {} buckets but this mesh uses {}: every node of a mesh must use the same value",
                self.buckets, ours.buckets
            ));
        }
        Ok(())
    }
}

/// Encodes one frame (length prefix included).
pub fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    let payload = postcard::to_stdvec(value).map_err(|e| e.to_string())?;
    let len = payload.len() + 1;
    if len > FRAME_BYTES_MAX {
        return Err(format!(
            "frame of {len} bytes exceeds the {FRAME_BYTES_MAX} limit"
        ));
    }
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(FRAME_VERSION);
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a frame body (after the length prefix): version byte + payload.
pub fn decode_frame<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, String> {
    match body.split_first() {
        Some((&FRAME_VERSION, payload)) => {
            postcard::from_bytes(payload).map_err(|e| format!("malformed frame: {e}"))
        }
        Some((v, _)) => Err(format!("unknown frame version {v}")),
        None => Err("empty frame".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let h = Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: "ab".repeat(32),
            name: "a".into(),
            buckets: 64,
            nonce: 7,
        };
        let f = encode_frame(&h).unwrap();
        let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
        assert_eq!(len, f.len() - 4);
        let back: Hello = decode_frame(&f[4..]).unwrap();
        assert_eq!(back, h);
        assert!(decode_frame::<Hello>(&[]).is_err());
        assert!(decode_frame::<Hello>(&[9, 1, 2]).is_err());
        assert!(decode_frame::<Hello>(&[FRAME_VERSION, 0xff]).is_err());
        let mut other = h.clone();
        other.buckets = 32;
        assert!(other.check(&h, &h.node_id).is_err());
        assert!(h.check(&h, &"cd".repeat(32)).is_err());
        assert!(h.check(&h, &h.node_id).is_ok());
    }
}
