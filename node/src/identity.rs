//! A node's long-lived identity: an ECDSA P-256 key and a self-signed certificate.
//!
//! The node id is the SHA-256 of the certificate's SubjectPublicKeyInfo (the whole
//! DER structure), so a certificate can be re-issued under the same key without
//! changing the id. Peers pin ids, not certificates: there is no CA and no hostname
//! check (see `transport`).
//!
//! On disk (`dir/node.key`, `dir/node.crt`) both files are PEM: the key as PKCS#8
//! (`PRIVATE KEY`), the certificate as `CERTIFICATE`. The key file is created with
//! mode 0600 in one `open` call, so it is never readable by others, not even for an
//! instant. DER files are accepted on load too.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PublicKeyData};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use storemesh_protocol::ids::NodeId;

/// File name of the private key inside the identity directory.
pub const KEY_FILE: &str = "node.key";
/// File name of the certificate inside the identity directory.
pub const CERT_FILE: &str = "node.crt";

/// A node's key pair and certificate. `Debug` never prints the key.
#[derive(Clone)]
pub struct Identity {
    /// The self-signed certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo.
    pub node_id: NodeId,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id)
            .field("cert_der", &format_args!("{} bytes", self.cert_der.len()))
            .field("key_der", &format_args!("<redacted>"))
            .finish()
    }
}

impl Identity {
    /// Generates a fresh ECDSA P-256 key and a self-signed certificate whose
    /// common name and subject alternative name are `name`.
    pub fn generate(name: &str) -> anyhow::Result<Identity> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| anyhow!("cannot generate a key pair: {e}"))?;
        let mut params = CertificateParams::new(vec![name.to_string()])
            .map_err(|e| anyhow!("cannot use {name:?} as a certificate name: {e}"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let cert = params
            .self_signed(&key)
            .map_err(|e| anyhow!("cannot sign the node certificate: {e}"))?;
        let cert_der = cert.der().to_vec();
        let node_id = node_id_of_cert(&cert_der)?;
        debug_assert_eq!(node_id.0, sha256(&key.subject_public_key_info()));
        Ok(Identity {
            cert_der,
            key_der: key.serialize_der(),
            node_id,
        })
    }

    /// Writes `dir/node.key` (mode 0600, created exclusively) and `dir/node.crt`.
    /// Refuses if `dir/node.key` already exists. Creates `dir` (mode 0700) if missing.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        create_private_dir(dir)?;
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        let key_pem = pem_encode("PRIVATE KEY", &self.key_der);
        let cert_pem = pem_encode("CERTIFICATE", &self.cert_der);

        let mut key_file = match create_key_file(&key_path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
                "identity key {} already exists: refusing to overwrite a node identity",
                key_path.display()
            ),
            Err(e) => bail!("cannot create identity key {}: {e}", key_path.display()),
        };
        let result = (|| -> anyhow::Result<()> {
            key_file
                .write_all(key_pem.as_bytes())
                .and_then(|()| key_file.sync_all())
                .with_context(|| format!("cannot write identity key {}", key_path.display()))?;
            write_file_atomically(&cert_path, cert_pem.as_bytes()).with_context(|| {
                format!("cannot write identity certificate {}", cert_path.display())
            })?;
            sync_dir(dir);
            Ok(())
        })();
        if result.is_err() {
            // Leave no key without its certificate behind: a later `save` must work.
            let _ = fs::remove_file(&key_path);
        }
        result
    }

    /// Reads `dir/node.key` and `dir/node.crt` and checks that they belong together.
    pub fn load(dir: &Path) -> anyhow::Result<Identity> {
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        let key_raw = fs::read(&key_path)
            .map_err(|e| anyhow!("cannot read identity key {}: {e}", key_path.display()))?;
        warn_if_exposed(&key_path);
        let cert_raw = fs::read(&cert_path).map_err(|e| {
            anyhow!(
                "cannot read identity certificate {}: {e}",
                cert_path.display()
            )
        })?;

        let key_der = if looks_like_pem(&key_raw) {
            PrivatePkcs8KeyDer::from_pem_slice(&key_raw)
                .map_err(|e| {
                    anyhow!(
                        "identity key {} is not a PEM PKCS#8 private key: {e}",
                        key_path.display()
                    )
                })?
                .secret_pkcs8_der()
                .to_vec()
        } else {
            key_raw
        };
        let key = KeyPair::try_from(key_der.as_slice()).map_err(|e| {
            anyhow!(
                "identity key {} is not a usable PKCS#8 private key: {e}",
                key_path.display()
            )
        })?;

        let cert_der = if looks_like_pem(&cert_raw) {
            CertificateDer::from_pem_slice(&cert_raw)
                .map_err(|e| {
                    anyhow!(
                        "identity certificate {} is not a PEM certificate: {e}",
                        cert_path.display()
                    )
                })?
                .to_vec()
        } else {
            cert_raw
        };
        let node_id = node_id_of_cert(&cert_der)
            .map_err(|e| anyhow!("identity certificate {}: {e}", cert_path.display()))?;
        if sha256(&key.subject_public_key_info()) != node_id.0 {
            bail!(
                "identity key {} does not belong to certificate {}",
                key_path.display(),
                cert_path.display()
            );
        }
        Ok(Identity {
            cert_der,
            key_der,
            node_id,
        })
    }

    /// Whether `dir/node.key` exists.
    pub fn exists(dir: &Path) -> bool {
        dir.join(KEY_FILE).exists()
    }
}

/// The node id of a certificate: SHA-256 of its SubjectPublicKeyInfo DER (the whole
/// structure, algorithm identifier included).
pub fn node_id_of_cert(cert_der: &[u8]) -> anyhow::Result<NodeId> {
    let (rest, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| anyhow!("not a valid X.509 certificate: {e}"))?;
    if !rest.is_empty() {
        bail!(
            "not a valid X.509 certificate: {} trailing bytes",
            rest.len()
        );
    }
    Ok(NodeId(sha256(cert.tbs_certificate.subject_pki.raw)))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn looks_like_pem(raw: &[u8]) -> bool {
    raw.iter()
        .position(|b| !b.is_ascii_whitespace())
        .is_some_and(|i| raw[i..].starts_with(b"-----BEGIN"))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= n {
                b64.push(ALPHABET[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // The alphabet is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| anyhow!("cannot create identity directory {}: {e}", dir.display()))
}

fn create_key_file(path: &Path) -> std::io::Result<fs::File> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Applied by open(2) itself: the file never exists with wider permissions.
        options.mode(0o600);
    }
    options.open(path)
}

fn write_file_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp: PathBuf = path.to_path_buf();
    tmp.set_extension("crt.tmp");
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

fn warn_if_exposed(key_path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(key_path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %key_path.display(),
                    mode = format_args!("{mode:o}"),
                    "identity key is readable by other users; run chmod 600 on it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = key_path;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::generate("store-1").unwrap();
        assert!(!Identity::exists(dir.path()));
        id.save(dir.path()).unwrap();
        assert!(Identity::exists(dir.path()));
        let back = Identity::load(dir.path()).unwrap();
        assert_eq!(back.node_id, id.node_id);
        assert_eq!(back.cert_der, id.cert_der);
        assert_eq!(back.key_der, id.key_der);
        assert!(!format!("{id:?}").contains(&hex::encode(&id.key_der)));

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        // A second save never overwrites the key.
        let other = Identity::generate("store-2").unwrap();
        let err = other.save(dir.path()).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(Identity::load(dir.path()).unwrap().node_id, id.node_id);
    }

    #[test]
    fn node_id_is_sha256_of_the_whole_spki() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = CertificateParams::new(vec!["a".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let id = node_id_of_cert(cert.der()).unwrap();
        assert_eq!(id.0, sha256(&key.subject_public_key_info()));
        // The same key under a re-issued certificate keeps its id.
        let params2 = CertificateParams::new(vec!["b".to_string()]).unwrap();
        let cert2 = params2.self_signed(&key).unwrap();
        assert_ne!(cert.der().as_ref(), cert2.der().as_ref());
        assert_eq!(node_id_of_cert(cert2.der()).unwrap(), id);
        // Matches what rustls/webpki sees as the SPKI.
        let hex = id.hex();
        assert_eq!(NodeId::parse(&hex).unwrap(), id);
        assert!(node_id_of_cert(b"garbage").is_err());
        let mut trailing = cert.der().to_vec();
        trailing.push(0);
        assert!(node_id_of_cert(&trailing).is_err());
    }

    #[test]
    fn load_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let err = Identity::load(dir.path()).unwrap_err().to_string();
        assert!(err.starts_with("cannot read identity key "), "{err}");
        assert!(err.contains("node.key"), "{err}");
        assert!(!err.contains('\n'));

        let a = Identity::generate("a").unwrap();
        a.save(dir.path()).unwrap();
        // Swap in someone else's certificate.
        let b = Identity::generate("b").unwrap();
        fs::write(
            dir.path().join(CERT_FILE),
            pem_encode("CERTIFICATE", &b.cert_der),
        )
        .unwrap();
        let err = Identity::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("does not belong"), "{err}");

        fs::write(dir.path().join(CERT_FILE), "not a cert").unwrap();
        let err = Identity::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("node.crt"), "{err}");

        // DER files are accepted as well.
        fs::write(dir.path().join(CERT_FILE), &a.cert_der).unwrap();
        assert_eq!(Identity::load(dir.path()).unwrap().node_id, a.node_id);
    }

    #[test]
    fn pem_matches_the_reference_encoder() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(pem_encode("CERTIFICATE", cert.der()), cert.pem());
        for len in 0..7 {
            let der: Vec<u8> = (0..len as u8).collect();
            let pem = pem_encode("CERTIFICATE", &der);
            let back = CertificateDer::from_pem_slice(pem.as_bytes());
            if len > 0 {
                assert_eq!(back.unwrap().as_ref(), &der[..]);
            }
        }
    }
}
