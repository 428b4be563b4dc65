//! Wire format between peers: length-prefixed frames on one ordered QUIC stream.
//!
//! Every frame is `u32 length (big endian) | u8 version | payload`. The payload is
//! a postcard-encoded (compact binary serde) message; with version
//! [`FRAME_VERSION_DEFLATE`] it is that message compressed with raw DEFLATE
//! (used for payloads of [`DEFLATE_MIN_BYTES`] and more when it makes them
//! smaller: Automerge sync messages carry changes uncompressed, and often a
//! whole document). Frames over [`FRAME_BYTES_MAX`], before or after
//! inflating, are a protocol violation: the receiver disconnects the peer
//! instead of allocating.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// Wire protocol version, checked in the hello. 2: compressed frames.
/// 3: sync messages may carry their changes as an Automerge bundle.
/// 4: records documents in parts (`rec/<tag>/<month>/<part>`), count-session
/// records (`cntl`, `cntz`), declared locations, and validation that refuses
/// what version 3 accepted (extra bytes, plaintext profile fields): nodes of
/// version 3 would refuse version 4's documents, so the two refuse each other
/// at the hello instead.
/// 5: ledger epochs (`ledger/<location>/<bucket>/<epoch>`, carried `b/…`
/// cells): version 4 would refuse both.
/// 6: reservation holds in the ledger (`<product>/<actor>/h/<to>`, `/u`),
/// written with the reservation's grant: version 5 would refuse them.
/// 7: signed changes (`Msg::Certs`, one batch certificate per commit batch,
/// sent before every frame that carries changes; uncertified changes are
/// refused).
pub const PROTOCOL_VERSION: u32 = 7;
/// Version byte at the start of every frame payload.
pub const FRAME_VERSION: u8 = 1;
/// Version byte of a frame whose payload is DEFLATE-compressed.
pub const FRAME_VERSION_DEFLATE: u8 = 2;
/// Payloads this large or larger are compressed (if that makes them smaller).
pub const DEFLATE_MIN_BYTES: usize = 1024;
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
    /// The sender's replicated state when it sent the hello (optional extension,
    /// see [`Hello::encode_frame`]). Two in-sync peers need nothing more.
    #[serde(skip)]
    pub digest: Option<HelloDigest>,
}

/// What a hello says about the sender's state: the sync root digest over every
/// document's heads and the customer key-store digest (`sync::Msg::Root`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloDigest {
    pub root: [u8; 32],
    pub keys: [u8; 32],
}

/// Tag of the digest extension after the version-1 hello fields.
pub const HELLO_EXT_DIGEST: u8 = 1;
/// Largest hello frame body accepted (version byte + payload).
pub const HELLO_BYTES_MAX: usize = 4096;

impl Hello {
    /// Encodes the hello as one frame (length prefix included).
    ///
    /// Layout of the payload: the protocol-1 hello fields (postcard), then
    /// optional extensions, each a tag byte and its postcard body. Peers that do
    /// not know an extension ignore the trailing bytes (postcard's `from_bytes`
    /// reads only the fields it knows), so the extension needs no new protocol
    /// version; a peer that sends none gets the old exchange (`Msg::Root`).
    pub fn encode_frame(&self) -> Result<Vec<u8>, String> {
        let mut payload = postcard::to_stdvec(self).map_err(|e| e.to_string())?;
        if let Some(d) = &self.digest {
            payload.push(HELLO_EXT_DIGEST);
            payload.extend(postcard::to_stdvec(d).map_err(|e| e.to_string())?);
        }
        let len = payload.len() + 1;
        if len > HELLO_BYTES_MAX {
            return Err(format!("hello of {len} bytes exceeds {HELLO_BYTES_MAX}"));
        }
        let mut out = Vec::with_capacity(4 + len);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.push(FRAME_VERSION);
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Decodes a hello frame body (after the length prefix). Unknown extension
    /// tags are ignored (a newer peer); a malformed digest extension is an error.
    pub fn decode_frame(body: &[u8]) -> Result<Hello, String> {
        if body.len() > HELLO_BYTES_MAX {
            return Err(format!("hello of {} bytes is over the limit", body.len()));
        }
        let payload = match body.split_first() {
            Some((&FRAME_VERSION, payload)) => payload,
            Some((v, _)) => return Err(format!("unknown frame version {v}")),
            None => return Err("empty frame".into()),
        };
        let (mut hello, rest): (Hello, &[u8]) =
            postcard::take_from_bytes(payload).map_err(|e| format!("malformed hello: {e}"))?;
        if let Some((&HELLO_EXT_DIGEST, ext)) = rest.split_first() {
            // Bytes after the digest belong to later extensions.
            let (d, _later): (HelloDigest, &[u8]) = postcard::take_from_bytes(ext)
                .map_err(|e| format!("malformed hello digest: {e}"))?;
            hello.digest = Some(d);
        }
        Ok(hello)
    }

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
    if payload.len() + 1 > FRAME_BYTES_MAX {
        return Err(format!(
            "frame of {} bytes exceeds the {FRAME_BYTES_MAX} limit",
            payload.len() + 1
        ));
    }
    let (version, body) = match deflate(&payload) {
        Some(z) => (FRAME_VERSION_DEFLATE, z),
        None => (FRAME_VERSION, payload),
    };
    let len = body.len() + 1;
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(version);
    out.extend_from_slice(&body);
    Ok(out)
}

/// The payload compressed, if it is large enough to try and gets smaller.
fn deflate(payload: &[u8]) -> Option<Vec<u8>> {
    if payload.len() < DEFLATE_MIN_BYTES {
        return None;
    }
    let mut z = flate2::write::DeflateEncoder::new(
        Vec::with_capacity(payload.len() / 2),
        flate2::Compression::fast(),
    );
    z.write_all(payload).ok()?;
    let out = z.finish().ok()?;
    (out.len() < payload.len()).then_some(out)
}

/// Decodes a frame body (after the length prefix): version byte + payload.
pub fn decode_frame<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, String> {
    match body.split_first() {
        Some((&FRAME_VERSION, payload)) => {
            postcard::from_bytes(payload).map_err(|e| format!("malformed frame: {e}"))
        }
        Some((&FRAME_VERSION_DEFLATE, z)) => {
            // Inflate at most one byte past the limit: a small frame must not
            // expand into an allocation the frame limit exists to prevent.
            let mut payload = Vec::new();
            flate2::read::DeflateDecoder::new(z)
                .take(FRAME_BYTES_MAX as u64)
                .read_to_end(&mut payload)
                .map_err(|e| format!("malformed compressed frame: {e}"))?;
            if payload.len() + 1 > FRAME_BYTES_MAX {
                return Err(format!(
                    "compressed frame inflates past the {FRAME_BYTES_MAX}-byte limit"
                ));
            }
            postcard::from_bytes(&payload).map_err(|e| format!("malformed frame: {e}"))
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
            digest: None,
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

    #[test]
    fn hello_digest_extension_round_trips_and_stays_compatible() {
        let mut h = Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: "ab".repeat(32),
            name: "store-1".into(),
            buckets: 64,
            nonce: 7,
            digest: None,
        };
        // Without the extension the frame is the protocol-1 hello, byte for byte.
        let plain = h.encode_frame().unwrap();
        assert_eq!(plain, encode_frame(&h).unwrap());
        assert_eq!(Hello::decode_frame(&plain[4..]).unwrap(), h);
        h.digest = Some(HelloDigest {
            root: [3; 32],
            keys: [4; 32],
        });
        let f = h.encode_frame().unwrap();
        assert_eq!(f.len(), plain.len() + 1 + 64);
        assert_eq!(Hello::decode_frame(&f[4..]).unwrap(), h);
        // A peer that does not know the extension reads the same hello without it.
        let old: Hello = decode_frame(&f[4..]).unwrap();
        assert_eq!(old.digest, None);
        assert_eq!(old.nonce, 7);
        // Unknown extensions are ignored; a truncated digest is refused; no
        // prefix of the frame and no garbage panics.
        let mut unknown = plain[4..].to_vec();
        unknown.extend_from_slice(&[9, 1, 2, 3]);
        assert_eq!(Hello::decode_frame(&unknown).unwrap().digest, None);
        assert!(Hello::decode_frame(&f[4..f.len() - 1]).is_err());
        for n in 0..f.len() - 4 {
            let _ = Hello::decode_frame(&f[4..4 + n]);
        }
        assert!(Hello::decode_frame(&vec![FRAME_VERSION; HELLO_BYTES_MAX + 1]).is_err());
        let mut seed = 1u64;
        for _ in 0..2000 {
            let mut b = f[4..].to_vec();
            for _ in 0..3 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let i = (seed >> 33) as usize % b.len();
                b[i] = (seed >> 17) as u8;
            }
            let _ = Hello::decode_frame(&b);
        }
    }

    #[test]
    fn large_frames_travel_compressed_and_bombs_are_refused() {
        // A compressible message goes as a smaller version-2 frame and comes back.
        let text: String = (0..4000).map(|i| format!("cell/{} ", i % 50)).collect();
        let f = encode_frame(&text).unwrap();
        assert_eq!(f[4], FRAME_VERSION_DEFLATE);
        assert!(f.len() < text.len() / 4, "{} bytes", f.len());
        assert_eq!(decode_frame::<String>(&f[4..]).unwrap(), text);
        // Small or incompressible payloads stay plain.
        assert_eq!(
            encode_frame(&"short".to_string()).unwrap()[4],
            FRAME_VERSION
        );
        let mut seed = 7u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                (seed >> 33) as u8
            })
            .collect();
        let f = encode_frame(&noise).unwrap();
        assert_eq!(f[4], FRAME_VERSION);
        assert_eq!(decode_frame::<Vec<u8>>(&f[4..]).unwrap(), noise);
        // A frame that inflates past the frame limit is refused, not allocated.
        let zeros = vec![0u8; FRAME_BYTES_MAX * 4];
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&zeros).unwrap();
        let mut bomb = vec![FRAME_VERSION_DEFLATE];
        bomb.extend(z.finish().unwrap());
        assert!(bomb.len() < 16 * 1024);
        let e = decode_frame::<Vec<u8>>(&bomb).unwrap_err();
        assert!(e.contains("limit"), "{e}");
        // Garbage after the compressed-frame byte is an error, never a panic.
        assert!(decode_frame::<String>(&[FRAME_VERSION_DEFLATE, 1, 2, 3]).is_err());
        assert!(decode_frame::<String>(&[FRAME_VERSION_DEFLATE]).is_err());
    }
}
