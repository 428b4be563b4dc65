//! Bounds on what a peer's Automerge chunks expand to, checked before
//! Automerge sees them.
//!
//! Automerge inflates DEFLATE-compressed data without a limit and before it
//! checks a chunk's checksum: a compressed change chunk of 2 KB of zeros made
//! a receiver allocate 456 MiB. Its columns are run-length encoded too, and
//! it decodes a run by its claimed length: a 35-byte bundle whose op column
//! claimed a run of 777 million rows made it allocate past 2 GiB (found by
//! the coverage-guided `change` fuzz target). Here the chunk headers are
//! parsed by hand (Automerge's binary format: magic, checksum, type, length;
//! the change header; the column metadata), every compressed part is inflated
//! into a buffer that stops one byte past the budget, and every column's runs
//! are counted without being decoded. What the chunk expands to — inflated
//! bytes, and its rows at a fixed cost each — is taken from one budget per
//! message. Nothing is kept: on success Automerge decodes the same bytes
//! again, now known to be bounded.

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

/// Budget bytes one decoded change costs (a change's metadata row in a
/// bundle or document: Automerge makes one `Change` of it, with its actor,
/// dependencies and hash, a few hundred bytes). 64 MiB of budget is 262,144
/// changes per message; the largest honest document (a ledger epoch, at most
/// `EPOCH_OPS_PER_KEY` ops per cell, one change per group commit) is far below.
pub const CHANGE_ROW_BYTES: usize = 256;
/// Budget bytes one decoded op costs (a row of the op columns): 64 MiB of
/// budget is 2,097,152 ops per message.
pub const OP_ROW_BYTES: usize = 32;

/// Why a chunk was refused.
pub const INFLATE_REFUSED: &str = "compressed data inflates past the limit";
/// Why a chunk was refused: its run-length encoded columns claim more rows
/// than the budget allows.
pub const ROWS_REFUSED: &str = "columns claim more rows than the limit";

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
            CHUNK_COMPRESSED_CHANGE => {
                let inflated = inflate_counted(body, budget)?;
                check_change(&inflated, budget)?
            }
            CHUNK_CHANGE => check_change(body, budget)?,
            CHUNK_DOCUMENT => check_document(body, budget)?,
            CHUNK_BUNDLE => check_bundle(body, budget)?,
            k => return Err(format!("unknown chunk type {k}")),
        }
        rest = &rest[consumed..];
    }
    Ok(())
}

/// A change chunk's body (after inflating, for a compressed one): deps,
/// actor, seq, start op, time, message, other actors, then the op columns'
/// metadata and data.
fn check_change(body: &[u8], budget: &mut usize) -> Result<(), String> {
    let mut r = Reader { b: body };
    let deps = r.count()?;
    for _ in 0..deps {
        r.take(HASH_BYTES as u64)?;
    }
    let n = r.uleb()?;
    r.take(n)?;
    r.uleb()?; // seq
    r.uleb()?; // start op
    r.uleb()?; // time (signed LEB128: the same bytes)
    let n = r.uleb()?;
    r.take(n)?; // message
    let others = r.count()?;
    for _ in 0..others {
        let n = r.uleb()?;
        r.take(n)?;
    }
    let cols = r.columns()?;
    let ops = column_rows(&mut r, cols, budget)?;
    charge_rows(0, ops, budget)
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
    let changes = column_rows(&mut r, change_cols, budget)?;
    let ops = column_rows(&mut r, op_cols, budget)?;
    charge_rows(changes, ops, budget)
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
    let change_cols = r.columns()?;
    let changes = column_rows(&mut r, change_cols, budget)?;
    let op_cols = r.columns()?;
    let ops = column_rows(&mut r, op_cols, budget)?;
    charge_rows(changes, ops, budget)
}

/// Reads the data of `cols` (inflating the compressed ones, counted) and
/// returns the most rows any of them claims.
fn column_rows(
    r: &mut Reader<'_>,
    cols: Vec<(u64, u64)>,
    budget: &mut usize,
) -> Result<u64, String> {
    let mut rows = 0u64;
    for (spec, len) in cols {
        let data = r.take(len)?;
        let n = if spec & COLUMN_DEFLATE != 0 {
            rows_in_column(spec, &inflate_counted(data, budget)?)
        } else {
            rows_in_column(spec, data)
        };
        rows = rows.max(n);
    }
    Ok(rows)
}

/// Takes the cost of a chunk's decoded rows from the budget.
fn charge_rows(changes: u64, ops: u64, budget: &mut usize) -> Result<(), String> {
    let cost = changes
        .saturating_mul(CHANGE_ROW_BYTES as u64)
        .saturating_add(ops.saturating_mul(OP_ROW_BYTES as u64));
    if cost > *budget as u64 {
        return Err(format!(
            "{ROWS_REFUSED} ({changes} changes, {ops} ops; {INFLATED_BYTES_MAX} bytes per message)"
        ));
    }
    *budget -= cost as usize;
    Ok(())
}

/// The rows a column claims, counted from its run headers without decoding
/// the values (Automerge's column encodings: type 0 group, 1 actor, 2
/// integer, 6 value metadata are run-length encoded unsigned LEB128; 3 delta
/// is run-length encoded signed LEB128; 4 boolean is alternating run lengths;
/// 5 string is run-length encoded length-prefixed bytes; 7 value is raw bytes
/// whose rows the metadata column gives). A run-length column is a sequence
/// of a signed count n and then: n > 0, one value repeated n times; n < 0,
/// -n literal values; n = 0, an unsigned count of nulls. Counting stops at
/// anything malformed (Automerge refuses it later); what was claimed until
/// then counts.
fn rows_in_column(spec: u64, data: &[u8]) -> u64 {
    let mut r = Reader { b: data };
    let mut rows = 0u64;
    match spec & 0b111 {
        7 => 0,
        4 => {
            while let Ok(n) = r.uleb() {
                rows = rows.saturating_add(n);
            }
            rows
        }
        t => {
            let value = |r: &mut Reader<'_>| -> Result<(), String> {
                if t == 5 {
                    let n = r.uleb()?;
                    r.take(n)?;
                } else {
                    r.uleb()?;
                }
                Ok(())
            };
            while let Ok(n) = r.sleb() {
                match n {
                    0 => match r.uleb() {
                        Ok(nulls) => rows = rows.saturating_add(nulls),
                        Err(_) => break,
                    },
                    n if n > 0 => {
                        rows = rows.saturating_add(n as u64);
                        if value(&mut r).is_err() {
                            break;
                        }
                    }
                    n => {
                        let k = n.unsigned_abs();
                        rows = rows.saturating_add(k);
                        let mut ok = true;
                        for _ in 0..k {
                            if value(&mut r).is_err() {
                                ok = false;
                                break;
                            }
                        }
                        if !ok {
                            break;
                        }
                    }
                }
            }
            rows
        }
    }
}

/// Inflates raw DEFLATE data, at most one byte past the budget; takes the
/// inflated size from the budget and returns the inflated bytes. A first
/// pass inflates into a counting sink, so that data past the budget (a zero
/// bomb) is refused without ever being held; only data within the budget is
/// then inflated into memory, for its rows to be counted.
fn inflate_counted(z: &[u8], budget: &mut usize) -> Result<Vec<u8>, String> {
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
    let mut out = Vec::with_capacity(n as usize);
    flate2::read::DeflateDecoder::new(z)
        .take(n)
        .read_to_end(&mut out)
        .map_err(|e| format!("bad compressed data: {e}"))?;
    *budget -= out.len();
    Ok(out)
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

    /// A signed LEB128 number.
    fn sleb(&mut self) -> Result<i64, String> {
        let mut v: i64 = 0;
        for (i, byte) in self.b.iter().enumerate().take(10) {
            v |= i64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                if i < 9 && byte & 0x40 != 0 {
                    v |= -1i64 << (7 * (i + 1));
                }
                self.b = &self.b[i + 1..];
                return Ok(v);
            }
        }
        Err("bad number in a chunk".into())
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

    /// Found by the coverage-guided `change` target (seed 7, after 6.76
    /// million executions): a 35-byte bundle whose op column claims one run
    /// of ~777 million rows. Automerge's unbundling decoded it row by row and
    /// allocated past 2 GiB; the claim is now refused before Automerge sees it.
    #[test]
    fn a_bundle_claiming_a_huge_run_of_rows_is_refused() {
        let input = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/regressions/change/oom-bundle-run-of-777m-rows"),
        )
        .unwrap();
        assert_eq!(input[8], CHUNK_BUNDLE);
        let mut budget = INFLATED_BYTES_MAX;
        let e = check_inflation(&input, &mut budget).unwrap_err();
        assert!(e.contains(ROWS_REFUSED), "{e}");
    }

    /// Honest bundles and change chunks pass and are charged for their rows.
    #[test]
    fn honest_bundles_and_changes_pass_with_their_rows_counted() {
        let mut doc = automerge::Automerge::new();
        for i in 0..300u64 {
            let mut tx = doc.transaction();
            tx.put(automerge::ROOT, format!("k{}", i % 7), i as i64)
                .unwrap();
            tx.put(automerge::ROOT, "n", format!("v{i}")).unwrap();
            tx.commit();
        }
        let hashes: Vec<_> = doc.get_changes(&[]).iter().map(|c| c.hash()).collect();
        let bundle = doc.bundle(hashes).unwrap();
        let mut budget = INFLATED_BYTES_MAX;
        check_inflation(bundle.bytes(), &mut budget).unwrap();
        let charged = INFLATED_BYTES_MAX - budget;
        assert!(
            charged >= 300 * CHANGE_ROW_BYTES + 600 * OP_ROW_BYTES,
            "300 changes and 600 ops charged, got {charged} bytes"
        );
        for c in doc.get_changes(&[]) {
            let mut budget = INFLATED_BYTES_MAX;
            check_inflation(c.raw_bytes(), &mut budget).unwrap();
            assert_eq!(INFLATED_BYTES_MAX - budget, 2 * OP_ROW_BYTES);
        }
        let mut budget = INFLATED_BYTES_MAX;
        check_inflation(&doc.save(), &mut budget).unwrap();
        assert!(INFLATED_BYTES_MAX - budget >= 300 * CHANGE_ROW_BYTES + 600 * OP_ROW_BYTES);
        // A budget too small for the rows refuses them.
        let mut budget = 100 * CHANGE_ROW_BYTES;
        let e = check_inflation(bundle.bytes(), &mut budget).unwrap_err();
        assert!(e.contains(ROWS_REFUSED), "{e}");
    }
}
