//! The stored sale index of closed records parts (`storemesh_protocol::
//! coldsales`, issue 14): written in the batch's transaction by [`write`],
//! read once at a start ([`Store::cold_sales_state`]) and per lookup
//! ([`Store::cold_sale_entries`]).

use anyhow::{bail, Result};
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use storemesh_protocol::coldsales::{ColdPart, ColdSalesState, COLD_KEY_BYTES};
use storemesh_protocol::engine::Batch;

use super::{decode, encode, Store, META};

/// Entries: (40-bit fingerprint of a sale id | 24-bit part number) → ().
/// Fixed-width keys without values: 8 bytes an entry in redb's leaves.
pub(super) const SALE_INDEX: TableDefinition<u64, ()> = TableDefinition::new("sale_index");
/// Part number → postcard `ColdPart` (its document and the heads of the
/// part index its entries were written from).
pub(super) const SALE_INDEX_PARTS: TableDefinition<u32, &[u8]> =
    TableDefinition::new("sale_index_parts");
/// Sale ids held by more than one records document → ().
pub(super) const SALE_INDEX_SHARED: TableDefinition<&str, ()> =
    TableDefinition::new("sale_index_shared");
/// Meta key of the fingerprint key (written once, with the first entries).
const SALE_INDEX_KEY: &str = "sale_index_key";

/// Writes a batch's part of the sale index in its transaction.
pub(super) fn write(tx: &WriteTransaction, batch: &Batch) -> Result<()> {
    let w = &batch.cold_sales;
    if w.is_empty() {
        return Ok(());
    }
    if let Some(key) = &w.key {
        let mut meta = tx.open_table(META)?;
        // One key for the file's life: entries written under another would
        // never be found again.
        if let Some(old) = meta.get(SALE_INDEX_KEY)? {
            if old.value() != key.as_slice() {
                bail!("the sale index key is already stored with another value; refusing to replace it");
            }
        }
        meta.insert(SALE_INDEX_KEY, key.as_slice())?;
    }
    let mut parts = tx.open_table(SALE_INDEX_PARTS)?;
    for p in &w.parts {
        parts.insert(p.number, encode(p)?.as_slice())?;
    }
    let mut entries = tx.open_table(SALE_INDEX)?;
    for e in &w.entries {
        entries.insert(*e, ())?;
    }
    let mut shared = tx.open_table(SALE_INDEX_SHARED)?;
    for id in &w.shared {
        shared.insert(id.as_str(), ())?;
    }
    Ok(())
}

/// Creates the tables (a file from an earlier release has none).
pub(super) fn init(tx: &WriteTransaction) -> Result<()> {
    tx.open_table(SALE_INDEX)?;
    tx.open_table(SALE_INDEX_PARTS)?;
    tx.open_table(SALE_INDEX_SHARED)?;
    Ok(())
}

impl Store {
    /// The stored key, parts and shared ids of the sale index.
    pub fn cold_sales_state(&self) -> Result<ColdSalesState> {
        self.with_db(|db| {
            let tx = db.begin_read()?;
            let key = match tx.open_table(META)?.get(SALE_INDEX_KEY)? {
                Some(v) => {
                    let Ok(k) = <[u8; COLD_KEY_BYTES]>::try_from(v.value()) else {
                        bail!("corrupt sale index key in the store");
                    };
                    Some(k)
                }
                None => None,
            };
            let mut parts = Vec::new();
            for item in tx.open_table(SALE_INDEX_PARTS)?.iter()? {
                let (k, v) = item?;
                let n = k.value();
                let p: ColdPart = decode(v.value(), || format!("sale index part {n}"))?;
                if p.number != n {
                    bail!("corrupt sale index part {n}");
                }
                parts.push(p);
            }
            let mut shared = Vec::new();
            for item in tx.open_table(SALE_INDEX_SHARED)?.iter()? {
                shared.push(item?.0.value().to_string());
            }
            Ok(ColdSalesState { key, parts, shared })
        })
    }

    /// Entries of the sale index from `lo` to `hi` (inclusive), in order.
    pub fn cold_sale_entries(&self, lo: u64, hi: u64) -> Result<Vec<u64>> {
        self.with_db(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(SALE_INDEX)?;
            let mut out = Vec::new();
            for item in t.range(lo..=hi)? {
                out.push(item?.0.value());
            }
            Ok(out)
        })
    }
}
