//! The signing tables of the store (issue #16): batch certificates, which
//! documents each covers, and introductions received from peers. Written in
//! the batch's transaction by [`write`].

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use storemesh_protocol::engine::Batch;

use super::{decode, encode, Store};

/// Batch certificates (`signing::Cert`): id → 4-byte LE count of the
/// documents linked to it, then the postcard certificate. Deleted when the
/// last document linked to it is (a retired ledger epoch).
pub(super) const CERTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("certs");
/// (document, certificate id) → (): which certificates cover a document's
/// changes (read when a peer needs changes no longer certified in memory).
pub(super) const DOC_CERTS: TableDefinition<(&str, &[u8]), ()> = TableDefinition::new("doc_certs");
/// Introductions received from peers: (member id, introducer key) →
/// postcard `Introduction` (signature verified again at load).
pub(super) const INTROS: TableDefinition<(&[u8], &[u8]), &[u8]> =
    TableDefinition::new("introductions");

/// Adds `delta` to a stored certificate's count of linked documents; at 0
/// after a removal (`removed`: some of `delta` was links removed) the
/// certificate is deleted.
fn cert_refs(
    certs: &mut redb::Table<&[u8], &[u8]>,
    id: &[u8; 32],
    delta: i64,
    removed: bool,
) -> Result<()> {
    let Some(mut v) = certs.get(id.as_slice())?.map(|v| v.value().to_vec()) else {
        return Ok(());
    };
    if v.len() < 4 {
        bail!("corrupt certificate record {}", hex::encode(id));
    }
    let n = i64::from(u32::from_le_bytes([v[0], v[1], v[2], v[3]])) + delta;
    if n <= 0 && removed {
        certs.remove(id.as_slice())?;
        return Ok(());
    }
    if delta == 0 {
        return Ok(());
    }
    v[..4].copy_from_slice(&(n.clamp(0, i64::from(u32::MAX)) as u32).to_le_bytes());
    certs.insert(id.as_slice(), v.as_slice())?;
    Ok(())
}

/// Writes a batch's certificates, their links and introductions, and drops
/// the links of the documents it retires (a certificate goes with its last
/// link), in the batch's transaction. Each certificate's count of links is
/// written once per batch (a batch's certificate is linked to every
/// document it touched: rewriting the whole record per link was most of
/// the commit's added cost when signing).
pub(super) fn write(tx: &WriteTransaction, batch: &Batch) -> Result<()> {
    let mut certs = tx.open_table(CERTS)?;
    let mut doc_certs = tx.open_table(DOC_CERTS)?;
    // Certificate → (links added − links removed, whether any was removed).
    let mut refs: BTreeMap<[u8; 32], (i64, bool)> = BTreeMap::new();
    for (doc, id) in &batch.cert_links {
        if doc_certs
            .insert((doc.as_str(), id.as_slice()), ())?
            .is_none()
        {
            refs.entry(*id).or_default().0 += 1;
        }
    }
    for d in &batch.retired {
        let d = d.as_str();
        let linked: Vec<Vec<u8>> = doc_certs
            .range((d, &[][..])..)?
            .map_while(|e| {
                e.ok()
                    .filter(|(k, _)| k.value().0 == d)
                    .map(|(k, _)| k.value().1.to_vec())
            })
            .collect();
        for id in linked {
            doc_certs.remove((d, id.as_slice()))?;
            if let Ok(id) = <[u8; 32]>::try_from(id.as_slice()) {
                let r = refs.entry(id).or_default();
                r.0 -= 1;
                r.1 = true;
            }
        }
    }
    for c in &batch.certs {
        let id = c.id();
        if certs.get(id.as_slice())?.is_some() {
            continue;
        }
        let (n, removed) = refs.remove(&id).unwrap_or_default();
        if n <= 0 && removed {
            // Linked and unlinked in this very batch: kept nowhere.
            continue;
        }
        let mut v = (n.clamp(0, i64::from(u32::MAX)) as u32)
            .to_le_bytes()
            .to_vec();
        v.extend(encode(c)?);
        certs.insert(id.as_slice(), v.as_slice())?;
    }
    for (id, (n, removed)) in refs {
        cert_refs(&mut certs, &id, n, removed)?;
    }
    let mut intros = tx.open_table(INTROS)?;
    for i in &batch.intros {
        intros.insert(
            (i.member.as_slice(), i.by_key.as_slice()),
            encode(i)?.as_slice(),
        )?;
    }
    Ok(())
}

impl Store {
    /// Every stored certificate linked to `doc`.
    pub fn doc_certs(&self, doc: &str) -> Result<Vec<storemesh_protocol::signing::Cert>> {
        self.with_db(|db| {
            let tx = db.begin_read()?;
            let links = tx.open_table(DOC_CERTS)?;
            let certs = tx.open_table(CERTS)?;
            let mut out = Vec::new();
            for e in links.range((doc, &[][..])..)? {
                let (k, _) = e?;
                let (d, id) = k.value();
                if d != doc {
                    break;
                }
                let Some(v) = certs.get(id)? else {
                    continue;
                };
                let v = v.value();
                if v.len() < 4 {
                    bail!("corrupt certificate record in {doc}");
                }
                out.push(decode(&v[4..], || format!("certificate of {doc}"))?);
            }
            Ok(out)
        })
    }

    /// Bytes and count of the stored certificates (figures, tests).
    pub fn cert_figures(&self) -> Result<(u64, u64, u64)> {
        self.with_db(|db| {
            let tx = db.begin_read()?;
            let certs = tx.open_table(CERTS)?;
            let links = tx.open_table(DOC_CERTS)?;
            let mut bytes = 0u64;
            let mut n = 0u64;
            for e in certs.iter()? {
                let (k, v) = e?;
                n += 1;
                bytes += (k.value().len() + v.value().len()) as u64;
            }
            Ok((n, bytes, redb::ReadableTableMetadata::len(&links)?))
        })
    }

    /// Every stored introduction (verified again by the engine).
    pub fn load_intros(&self) -> Result<Vec<storemesh_protocol::signing::Introduction>> {
        self.with_db(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(INTROS)?;
            let mut out = Vec::new();
            for item in t.iter()? {
                let (_, v) = item?;
                out.push(decode(v.value(), || "introduction".to_string())?);
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use storemesh_protocol::engine::Batch;
    use storemesh_protocol::ids::NodeId;
    use storemesh_protocol::signing::{Cert, KeyedHashScheme};

    use crate::store::Store;

    fn cert(n: u8) -> Cert {
        let signer = KeyedHashScheme::new([7; 32]).signer(NodeId([1; 32]));
        Cert::make(&signer, vec![[n; 32], [n.wrapping_add(1); 32]])
    }

    fn links(c: &Cert, docs: &[&str]) -> Vec<(String, storemesh_protocol::signing::CertId)> {
        docs.iter().map(|d| (d.to_string(), c.id())).collect()
    }

    /// A certificate's count of linked documents is written once per
    /// batch whatever the number of links, and the certificate goes with
    /// its last link — also when linked and unlinked in one batch.
    #[test]
    fn a_certificate_counts_its_links_and_goes_with_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (a, b) = (cert(1), cert(10));
        store
            .commit(&Batch {
                certs: vec![a.clone()],
                cert_links: links(&a, &["d1", "d2", "d3"]),
                ..Batch::default()
            })
            .unwrap();
        assert_eq!(store.cert_figures().unwrap().0, 1);
        assert_eq!(store.cert_figures().unwrap().2, 3, "three links");
        for d in ["d1", "d2", "d3"] {
            assert_eq!(store.doc_certs(d).unwrap(), vec![a.clone()], "{d}");
        }
        // The same certificate again and one more link: counted once more.
        store
            .commit(&Batch {
                certs: vec![a.clone()],
                cert_links: links(&a, &["d3", "d4"]),
                ..Batch::default()
            })
            .unwrap();
        assert_eq!(store.cert_figures().unwrap().2, 4);
        // Retiring all but one document keeps it; the last takes it away.
        let retire = |docs: &[&str]| Batch {
            retired: docs.iter().map(|d| d.to_string()).collect(),
            ..Batch::default()
        };
        store.commit(&retire(&["d1", "d2", "d3"])).unwrap();
        assert_eq!(store.cert_figures().unwrap().0, 1);
        assert_eq!(store.doc_certs("d4").unwrap(), vec![a.clone()]);
        store.commit(&retire(&["d4"])).unwrap();
        assert_eq!(
            store.cert_figures().unwrap().0,
            0,
            "gone with its last link"
        );
        // Linked to a document retired in the same batch: kept nowhere.
        store
            .commit(&Batch {
                certs: vec![b.clone()],
                cert_links: links(&b, &["d5"]),
                retired: vec!["d5".into()],
                ..Batch::default()
            })
            .unwrap();
        assert_eq!(store.cert_figures().unwrap(), (0, 0, 0));
    }
}
