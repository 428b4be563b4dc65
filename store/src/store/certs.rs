//! The signing tables of the store (issue #16): batch certificates, which
//! documents each covers, and introductions received from peers. Written in
//! the batch's transaction by [`write`].
//!
//! A batch's certificate covers every document the batch touched (64 sales:
//! 65 documents). Writing one `doc_certs` row per document and batch dirtied
//! one more B-tree leaf per document in every commit (profiled: the added
//! pages' writes and fsync were ~60 % of what signing cost a durable group
//! commit). So a batch's links go to the end of `cert_log` instead — one
//! row per certificate, appended — and are folded into `doc_certs` and
//! `certs` every `LOG_ROWS_MAX` rows (each document's links of those
//! batches in one go), before any retirement, and for batches too large to
//! gain from it. Reads look in both.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{bail, Context, Result};
use redb::{
    ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};
use storemesh_protocol::engine::Batch;
use storemesh_protocol::signing::CertId;

use super::{decode, encode, Store};

/// Batch certificates (`signing::Cert`): id → 4-byte LE count of the
/// documents linked to it, then the postcard certificate. Deleted when the
/// last document linked to it is (a retired ledger epoch).
pub(super) const CERTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("certs");
/// (document, certificate id) → (): which certificates cover a document's
/// changes (read when a peer needs changes no longer certified in memory).
pub(super) const DOC_CERTS: TableDefinition<(&str, &[u8]), ()> = TableDefinition::new("doc_certs");
/// Links of recent batches not folded into `doc_certs` / `certs` yet:
/// sequence → one certificate's row (see [`LogRow`]). At most
/// `LOG_ROWS_MAX` rows; empty after a fold.
pub(super) const CERT_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("cert_log");
/// Introductions received from peers: (member id, introducer key) →
/// postcard `Introduction` (signature verified again at load).
pub(super) const INTROS: TableDefinition<(&[u8], &[u8]), &[u8]> =
    TableDefinition::new("introductions");

/// Rows `cert_log` holds before they are folded (a fold writes each
/// document's links of these batches at once: one leaf per document per
/// fold instead of per batch). A read of a document's certificates scans
/// them all, so it stays small.
pub(super) const LOG_ROWS_MAX: u64 = 32;
/// A batch with more links than this is written to `doc_certs` directly
/// (its pages are dirtied anyway; the log would only make reads scan it).
pub(super) const LOG_BATCH_LINKS_MAX: usize = 512;

/// One row of `cert_log`: a certificate id, its postcard body when the
/// batch brought it (`certs` or an earlier row may hold it instead), and
/// the documents the batch linked to it. Stored as: 32-byte id, u32 LE
/// body length, body, then per document a u16 LE length and its bytes.
struct LogRow<'a> {
    id: CertId,
    body: &'a [u8],
    docs: Vec<&'a str>,
}

impl<'a> LogRow<'a> {
    fn encode(id: &CertId, body: &[u8], docs: &[&str]) -> Result<Vec<u8>> {
        let mut v =
            Vec::with_capacity(36 + body.len() + docs.iter().map(|d| d.len() + 2).sum::<usize>());
        v.extend_from_slice(id);
        v.extend_from_slice(
            &u32::try_from(body.len())
                .context("certificate too large")?
                .to_le_bytes(),
        );
        v.extend_from_slice(body);
        for d in docs {
            v.extend_from_slice(
                &u16::try_from(d.len())
                    .context("document id too long")?
                    .to_le_bytes(),
            );
            v.extend_from_slice(d.as_bytes());
        }
        Ok(v)
    }

    fn parse(v: &'a [u8]) -> Result<LogRow<'a>> {
        fn take<'b>(v: &mut &'b [u8], n: usize) -> Result<&'b [u8]> {
            if v.len() < n {
                bail!("corrupt certificate log row");
            }
            let (a, b) = v.split_at(n);
            *v = b;
            Ok(a)
        }
        let mut rest = v;
        let id: CertId = take(&mut rest, 32)?.try_into()?;
        let n = u32::from_le_bytes(take(&mut rest, 4)?.try_into()?) as usize;
        let body = take(&mut rest, n)?;
        let mut docs = Vec::new();
        while !rest.is_empty() {
            let n = u16::from_le_bytes(take(&mut rest, 2)?.try_into()?) as usize;
            let d = std::str::from_utf8(take(&mut rest, n)?)
                .context("corrupt certificate log row (document id)")?;
            docs.push(d);
        }
        Ok(LogRow { id, body, docs })
    }
}

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

/// Writes certificates (id, postcard body), links and retirements straight
/// into `certs` and `doc_certs`: each certificate's count of links is
/// written once per call, and a certificate goes with its last link.
fn apply(
    certs: &mut redb::Table<&[u8], &[u8]>,
    doc_certs: &mut redb::Table<(&str, &[u8]), ()>,
    bodies: &[(CertId, &[u8])],
    links: &[(&str, CertId)],
    retired: &[String],
) -> Result<()> {
    // Certificate → (links added − links removed, whether any was removed).
    let mut refs: BTreeMap<[u8; 32], (i64, bool)> = BTreeMap::new();
    for (doc, id) in links {
        if doc_certs.insert((*doc, id.as_slice()), ())?.is_none() {
            refs.entry(*id).or_default().0 += 1;
        }
    }
    for d in retired {
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
    for (id, body) in bodies {
        if certs.get(id.as_slice())?.is_some() {
            continue;
        }
        let (n, removed) = refs.remove(id).unwrap_or_default();
        if n <= 0 && removed {
            // Linked and unlinked in this very batch: kept nowhere.
            continue;
        }
        let mut v = (n.clamp(0, i64::from(u32::MAX)) as u32)
            .to_le_bytes()
            .to_vec();
        v.extend_from_slice(body);
        certs.insert(id.as_slice(), v.as_slice())?;
    }
    for (id, (n, removed)) in refs {
        cert_refs(certs, &id, n, removed)?;
    }
    Ok(())
}

/// Folds every row of `cert_log` into `certs` and `doc_certs`, in the order
/// the batches wrote them (each document's links of all of them at once),
/// and empties it.
fn fold_log(
    log: &mut redb::Table<u64, &[u8]>,
    certs: &mut redb::Table<&[u8], &[u8]>,
    doc_certs: &mut redb::Table<(&str, &[u8]), ()>,
) -> Result<()> {
    let mut rows: Vec<Vec<u8>> = Vec::new();
    for e in log.iter()? {
        let (_, v) = e?;
        rows.push(v.value().to_vec());
    }
    if rows.is_empty() {
        return Ok(());
    }
    let parsed: Vec<LogRow> = rows
        .iter()
        .map(|r| LogRow::parse(r))
        .collect::<Result<_>>()?;
    // Bodies first (a later row may link a certificate an earlier one
    // brought), links sorted by document (neighbouring keys, one leaf each).
    let mut bodies: Vec<(CertId, &[u8])> = Vec::new();
    let mut seen: HashSet<CertId> = HashSet::new();
    for r in &parsed {
        if !r.body.is_empty() && seen.insert(r.id) {
            bodies.push((r.id, r.body));
        }
    }
    let mut links: Vec<(&str, CertId)> = parsed
        .iter()
        .flat_map(|r| r.docs.iter().map(move |d| (*d, r.id)))
        .collect();
    links.sort_unstable();
    links.dedup();
    apply(certs, doc_certs, &bodies, &links, &[])?;
    log.retain(|_, _| false)?;
    Ok(())
}

/// Writes a batch's certificates, their links and introductions, and drops
/// the links of the documents it retires (a certificate goes with its last
/// link), in the batch's transaction: appended to `cert_log` (see the
/// module's comment), or folded with the log into `certs` / `doc_certs`.
pub(super) fn write(tx: &WriteTransaction, batch: &Batch) -> Result<()> {
    if !batch.intros.is_empty() {
        let mut intros = tx.open_table(INTROS)?;
        for i in &batch.intros {
            intros.insert(
                (i.member.as_slice(), i.by_key.as_slice()),
                encode(i)?.as_slice(),
            )?;
        }
    }
    if batch.certs.is_empty() && batch.cert_links.is_empty() && batch.retired.is_empty() {
        return Ok(());
    }
    let mut bodies: Vec<(CertId, Vec<u8>)> = Vec::with_capacity(batch.certs.len());
    for c in &batch.certs {
        bodies.push((c.id(), encode(c)?));
    }
    // The batch's links by certificate, in their order.
    let mut by_cert: Vec<(CertId, Vec<&str>)> = Vec::new();
    let mut at: HashMap<CertId, usize> = HashMap::new();
    for (doc, id) in &batch.cert_links {
        let i = *at.entry(*id).or_insert_with(|| {
            by_cert.push((*id, Vec::new()));
            by_cert.len() - 1
        });
        by_cert[i].1.push(doc.as_str());
    }
    for (id, _) in &bodies {
        if !at.contains_key(id) {
            at.insert(*id, by_cert.len());
            by_cert.push((*id, Vec::new()));
        }
    }
    let mut log = tx.open_table(CERT_LOG)?;
    let rows = log.len()?;
    let logged = batch.retired.is_empty()
        && batch.cert_links.len() <= LOG_BATCH_LINKS_MAX
        && rows + by_cert.len() as u64 <= LOG_ROWS_MAX
        // A row stores a document id's length in 2 bytes.
        && batch
            .cert_links
            .iter()
            .all(|(d, _)| d.len() <= usize::from(u16::MAX));
    if logged {
        let first = log.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0);
        let body_of: HashMap<&CertId, &[u8]> =
            bodies.iter().map(|(id, b)| (id, b.as_slice())).collect();
        for (seq, (id, docs)) in (first..).zip(&by_cert) {
            let body = body_of.get(id).copied().unwrap_or(&[]);
            log.insert(seq, LogRow::encode(id, body, docs)?.as_slice())?;
        }
        return Ok(());
    }
    let mut certs = tx.open_table(CERTS)?;
    let mut doc_certs = tx.open_table(DOC_CERTS)?;
    fold_log(&mut log, &mut certs, &mut doc_certs)?;
    let bodies: Vec<(CertId, &[u8])> = bodies.iter().map(|(id, b)| (*id, b.as_slice())).collect();
    let links: Vec<(&str, CertId)> = batch
        .cert_links
        .iter()
        .map(|(d, id)| (d.as_str(), *id))
        .collect();
    apply(&mut certs, &mut doc_certs, &bodies, &links, &batch.retired)
}

impl Store {
    /// Every stored certificate linked to `doc` (folded links first, then
    /// those still in `cert_log`).
    pub fn doc_certs(&self, doc: &str) -> Result<Vec<storemesh_protocol::signing::Cert>> {
        self.with_db(|db| {
            let tx = db.begin_read()?;
            let links = tx.open_table(DOC_CERTS)?;
            let certs = tx.open_table(CERTS)?;
            let mut ids: Vec<CertId> = Vec::new();
            for e in links.range((doc, &[][..])..)? {
                let (k, _) = e?;
                let (d, id) = k.value();
                if d != doc {
                    break;
                }
                if let Ok(id) = CertId::try_from(id) {
                    ids.push(id);
                }
            }
            let rows: Vec<Vec<u8>> = match tx.open_table(CERT_LOG) {
                Ok(log) => log
                    .iter()?
                    .map(|e| e.map(|(_, v)| v.value().to_vec()))
                    .collect::<std::result::Result<_, _>>()?,
                Err(redb::TableError::TableDoesNotExist(_)) => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            let mut logged: HashMap<CertId, &[u8]> = HashMap::new();
            for r in &rows {
                let r = LogRow::parse(r)?;
                if !r.body.is_empty() {
                    logged.entry(r.id).or_insert(r.body);
                }
                if r.docs.contains(&doc) {
                    ids.push(r.id);
                }
            }
            let mut seen: HashSet<CertId> = HashSet::new();
            let mut out = Vec::new();
            for id in ids {
                if !seen.insert(id) {
                    continue;
                }
                if let Some(v) = certs.get(id.as_slice())? {
                    let v = v.value();
                    if v.len() < 4 {
                        bail!("corrupt certificate record in {doc}");
                    }
                    out.push(decode(&v[4..], || format!("certificate of {doc}"))?);
                } else if let Some(body) = logged.get(&id) {
                    out.push(decode(body, || format!("logged certificate of {doc}"))?);
                }
            }
            Ok(out)
        })
    }

    /// Certificates stored, their bytes, and (document, certificate)
    /// links, the rows of `cert_log` counted as if folded (figures, tests).
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
            let mut link_count = links.len()?;
            let log = tx.open_table(CERT_LOG)?;
            let mut new_certs: HashSet<CertId> = HashSet::new();
            let mut new_links: HashSet<(String, CertId)> = HashSet::new();
            for e in log.iter()? {
                let (_, v) = e?;
                let r = LogRow::parse(v.value())?;
                if !r.body.is_empty()
                    && certs.get(r.id.as_slice())?.is_none()
                    && new_certs.insert(r.id)
                {
                    n += 1;
                    bytes += (32 + 4 + r.body.len()) as u64;
                }
                for d in r.docs {
                    if links.get((d, r.id.as_slice()))?.is_none()
                        && new_links.insert((d.to_string(), r.id))
                    {
                        link_count += 1;
                    }
                }
            }
            Ok((n, bytes, link_count))
        })
    }

    /// Rows waiting in `cert_log` (tests).
    pub fn cert_log_rows(&self) -> Result<u64> {
        self.with_db(|db| {
            let tx = db.begin_read()?;
            Ok(tx.open_table(CERT_LOG)?.len()?)
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

    /// A batch's links to the documents it touched are one appended
    /// `cert_log` row, not one `doc_certs` row per document (the per-document
    /// rows dirtied a B-tree leaf per document in every commit); they are
    /// folded every `LOG_ROWS_MAX` rows and before a retirement, and read
    /// back the same from either place, also after a reopen.
    #[test]
    fn links_are_logged_per_batch_and_folded_later() {
        use super::LOG_ROWS_MAX;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let docs: Vec<String> = (0..65).map(|i| format!("l/{i}")).collect();
        let doc_refs: Vec<&str> = docs.iter().map(String::as_str).collect();
        let mut made = Vec::new();
        let sorted = |mut v: Vec<Cert>| {
            v.sort_by_key(|c| c.id());
            v
        };
        {
            let store = Store::open(&path).unwrap();
            for b in 0..(LOG_ROWS_MAX as u8 + 3) {
                let c = cert(b.wrapping_mul(2).wrapping_add(40));
                let mut linked: Vec<&str> = doc_refs.clone();
                linked.push("rec/x");
                store
                    .commit(&Batch {
                        certs: vec![c.clone()],
                        cert_links: links(&c, &linked),
                        ..Batch::default()
                    })
                    .unwrap();
                made.push(c);
                let rows = store.cert_log_rows().unwrap();
                assert!(rows <= LOG_ROWS_MAX, "the log is bounded: {rows}");
                if b == 0 {
                    assert_eq!(rows, 1, "66 links, one row");
                }
            }
            // Folded once (the 33rd batch), the last two still logged.
            assert_eq!(store.cert_log_rows().unwrap(), 2);
            let n = made.len() as u64;
            assert_eq!(store.cert_figures().unwrap().0, n);
            assert_eq!(store.cert_figures().unwrap().2, n * 66);
            assert_eq!(
                sorted(store.doc_certs("rec/x").unwrap()),
                sorted(made.clone())
            );
        }
        let made = sorted(made);
        let store = Store::open(&path).unwrap();
        assert_eq!(
            sorted(store.doc_certs("l/7").unwrap()),
            made,
            "after a reopen"
        );
        // Retiring folds first: every link of the document goes, from both.
        store
            .commit(&Batch {
                retired: doc_refs.clone().into_iter().map(String::from).collect(),
                ..Batch::default()
            })
            .unwrap();
        assert_eq!(store.cert_log_rows().unwrap(), 0);
        assert!(store.doc_certs("l/7").unwrap().is_empty());
        assert_eq!(
            sorted(store.doc_certs("rec/x").unwrap()),
            made,
            "kept by rec/x"
        );
        assert_eq!(store.cert_figures().unwrap().2, made.len() as u64);
        store
            .commit(&Batch {
                retired: vec!["rec/x".into()],
                ..Batch::default()
            })
            .unwrap();
        assert_eq!(
            store.cert_figures().unwrap(),
            (0, 0, 0),
            "gone with their last link"
        );
    }
}
