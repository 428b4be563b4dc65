//! Bounds on what a peer's Automerge chunks inflate to, checked before
//! Automerge sees them.
//!
//! Automerge inflates DEFLATE-compressed data without a limit and before it
//! checks a chunk's checksum: a compressed change chunk of 2 KB of zeros made
//! a receiver allocate 456 MiB. Here the chunk headers are parsed by hand
//! (the layout is Automerge's binary format: magic, checksum, type, length;
//! for documents and bundles the column metadata) and every compressed part
//! is inflated into a sink that counts, stopping one byte past the budget.
//! Nothing is kept: on success Automerge inflates the same bytes again, now
//! known to be bounded.

use std::io::Read;

/// Bytes all the compressed parts of one sync message or push may inflate to,
/// together. Honest data is far below: a change is one group commit of at
/// most a few thousand ops, and the largest document of a 100,000-product,
/// 1,000,000-sale chain (BENCHMARKS.md row 5: 1,541 documents, 37 MB saved in
/// all) is a few MB. 64 MiB per message bounds what one frame (1 MiB, which
/// DEFLATE could inflate to ~1 GiB) or one reassembled message can cost.
pub const INFLATED_BYTES_MAX: usize = 64 << 20;

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_DOCUMENT: u8 = 0;
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED_CHANGE: u8 = 2;
const CHUNK_BUNDLE: u8 = 3;
/// Bit of a column specification saying the column is DEFLATE-compressed.
const COLUMN_DEFLATE: u64 = 0b1000;
const HASH_BYTES: usize = 32;

/// Why a chunk was refused.
pub const INFLATE_REFUSED: &str = "compressed data inflates past the limit";

/// Checks that the compressed parts of `data` (one or more concatenated
/// Automerge chunks) inflate to at most `*budget` bytes in all, and takes
/// what they inflate to from the budget.
pub fn check_inflation(data: &[u8], budget: &mut usize) -> Result<(), String> {
    let mut rest = data;
    while !rest.is_empty() {
        if rest.len() < 9 || rest[..4] != MAGIC {
            return Err("chunk does not start with the Automerge magic bytes".into());
        }
        let kind = rest[8];
        let mut r = Reader { b: &rest[9..] };
        let len = r.uleb()?;
        let body = r.take(len)?;
        let consumed = rest.len() - r.b.len();
        match kind {
            CHUNK_COMPRESSED_CHANGE => inflate_counted(body, budget)?,
            CHUNK_CHANGE => {}
            CHUNK_DOCUMENT => check_document(body, budget)?,
            CHUNK_BUNDLE => check_bundle(body, budget)?,
            k => return Err(format!("unknown chunk type {k}")),
        }
        rest = &rest[consumed..];
    }
    Ok(())
}

/// A document chunk: actors, heads, change-column metadata, op-column
/// metadata, then the change columns' data and the op columns' data.
fn check_document(body: &[u8], budget: &mut usize) -> Result<(), String> {
    let mut r = Reader { b: body };
    let actors = r.count()?;
    for _ in 0..actors {
        let n = r.uleb()?;
        r.take(n)?;
    }
    let heads = r.count()?;
    for _ in 0..heads {
        r.take(HASH_BYTES as u64)?;
    }
    let change_cols = r.columns()?;
    let op_cols = r.columns()?;
    for (spec, len) in change_cols.into_iter().chain(op_cols) {
        let data = r.take(len)?;
        if spec & COLUMN_DEFLATE != 0 {
            inflate_counted(data, budget)?;
        }
    }
    Ok(())
}

/// A bundle chunk: deps, actors, change-column metadata and data, op-column
/// metadata and data.
fn check_bundle(body: &[u8], budget: &mut usize) -> Result<(), String> {
    let mut r = Reader { b: body };
    let deps = r.count()?;
    for _ in 0..deps {
        r.take(HASH_BYTES as u64)?;
    }
    let actors = r.count()?;
    for _ in 0..actors {
        let n = r.uleb()?;
        r.take(n)?;
    }
    for _ in 0..2 {
        let cols = r.columns()?;
        for (spec, len) in cols {
            let data = r.take(len)?;
            if spec & COLUMN_DEFLATE != 0 {
                inflate_counted(data, budget)?;
            }
        }
    }
    Ok(())
}

/// Inflates raw DEFLATE data into a counting sink, at most one byte past the
/// budget; takes the inflated size from the budget.
fn inflate_counted(z: &[u8], budget: &mut usize) -> Result<(), String> {
    let limit = *budget as u64 + 1;
    let n = std::io::copy(
        &mut flate2::read::DeflateDecoder::new(z).take(limit),
        &mut std::io::sink(),
    )
    .map_err(|e| format!("bad compressed data: {e}"))?;
    if n >= limit {
        return Err(format!(
            "{INFLATE_REFUSED} ({INFLATED_BYTES_MAX} bytes per message)"
        ));
    }
    *budget -= n as usize;
    Ok(())
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn uleb(&mut self) -> Result<u64, String> {
        let mut v: u64 = 0;
        for (i, byte) in self.b.iter().enumerate().take(10) {
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.b = &self.b[i + 1..];
                return Ok(v);
            }
        }
        Err("bad length in a chunk".into())
    }

    /// A count of entries that take at least one byte each: never more than
    /// the bytes left (so no loop runs for a forged count).
    fn count(&mut self) -> Result<u64, String> {
        let n = self.uleb()?;
        if n > self.b.len() as u64 {
            return Err("count in a chunk exceeds its bytes".into());
        }
        Ok(n)
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let n = usize::try_from(n).map_err(|_| "length in a chunk overflows")?;
        if n > self.b.len() {
            return Err("truncated chunk".into());
        }
        let (a, b) = self.b.split_at(n);
        self.b = b;
        Ok(a)
    }

    fn columns(&mut self) -> Result<Vec<(u64, u64)>, String> {
        let n = self.count()?;
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let spec = self.uleb()?;
            let len = self.uleb()?;
            out.push((spec, len));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut z, data).unwrap();
        z.finish().unwrap()
    }

    /// A compressed change chunk whose body is `z` (the checksum is not
    /// checked before inflating: that is the attack).
    fn compressed_chunk(z: &[u8]) -> Vec<u8> {
        let mut c = MAGIC.to_vec();
        c.extend_from_slice(&[0, 0, 0, 0, CHUNK_COMPRESSED_CHANGE]);
        let mut n = z.len() as u64;
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                c.push(b);
                break;
            }
            c.push(b | 0x80);
        }
        c.extend_from_slice(z);
        c
    }

    #[test]
    fn a_zero_bomb_is_refused_and_honest_chunks_pass() {
        // 128 MiB of zeros deflate to ~130 KB.
        let z = deflate(&vec![0u8; 128 << 20]);
        let bomb = compressed_chunk(&z);
        let mut budget = INFLATED_BYTES_MAX;
        let e = check_inflation(&bomb, &mut budget).unwrap_err();
        assert!(e.contains(INFLATE_REFUSED), "{e}");

        // An honest document with compressed columns, and its changes.
        let mut doc = automerge::Automerge::new();
        for i in 0..2000u64 {
            let mut tx = doc.transaction();
            tx.put(automerge::ROOT, format!("k{i}"), "x".repeat(300))
                .unwrap();
            tx.commit();
        }
        let saved = doc.save();
        let mut budget = INFLATED_BYTES_MAX;
        check_inflation(&saved, &mut budget).unwrap();
        assert!(
            budget < INFLATED_BYTES_MAX,
            "columns were inflated and counted"
        );
        let mut budget = INFLATED_BYTES_MAX;
        check_inflation(&doc.save_after(&[]), &mut budget).unwrap();
        for c in doc.get_changes(&[]).iter().take(5) {
            let mut budget = INFLATED_BYTES_MAX;
            check_inflation(c.raw_bytes(), &mut budget).unwrap();
        }
        // A document whose column inflates past the budget.
        let mut budget = 1000;
        assert!(check_inflation(&saved, &mut budget).is_err());
    }
}
