//! HTTPS for the API: `[api.tls] cert = "PATH", key = "PATH"` serves the API
//! over TLS (rustls), and `storemesh init --https` makes a self-signed
//! certificate for the node's names.
//!
//! A store's LAN is no safe place for bearer tokens in clear text; a
//! self-signed certificate whose SHA-256 fingerprint the clients pin is enough
//! there, and a chain's own CA-issued certificate works the same way.
//!
//! The handshake itself runs in the HTTP accept loop (`http.rs`), in each
//! connection's own task, within `[api] header_timeout_ms` and under the
//! `max_connections` limit, so one slow or silent client cannot hold up others.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest;

use crate::config::TlsConfig;

/// File names `init --https` writes in the data directory.
pub const CERT_FILE_NAME: &str = "https-cert.pem";
pub const KEY_FILE_NAME: &str = "https-key.pem";
/// Largest certificate or key file read (a PEM chain is a few KiB).
const PEM_BYTES_MAX: u64 = 1 << 20;

/// A `[api.tls]` path: relative paths are taken from the data directory.
fn resolve(dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

/// Loads `[api.tls]`'s certificate chain and key into a rustls server config.
pub fn server_config(tls: &TlsConfig, dir: &Path) -> anyhow::Result<rustls::ServerConfig> {
    let cert_path = resolve(dir, &tls.cert);
    let key_path = resolve(dir, &tls.key);
    let cert_pem = read_limited(&cert_path, "api.tls.cert")?;
    let key_pem = read_limited(&key_path, "api.tls.key")?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            anyhow!(
                "api.tls.cert {}: not a PEM certificate: {e}",
                cert_path.display()
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!(
            "api.tls.cert {}: no CERTIFICATE block found",
            cert_path.display()
        );
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        anyhow!(
            "api.tls.key {}: not a PEM private key: {e}",
            key_path.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow!("api.tls: the certificate and key do not fit together: {e}"))?;
    // axum is built with HTTP/1.1 only (no `http2` feature): say so in ALPN.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

fn read_limited(path: &Path, field: &str) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| {
        anyhow!(
            "cannot read {field} {}: {}",
            path.display(),
            crate::config::io_message(&e)
        )
    })?;
    let mut out = Vec::new();
    f.take(PEM_BYTES_MAX + 1)
        .read_to_end(&mut out)
        .with_context(|| format!("reading {field} {}", path.display()))?;
    if out.len() as u64 > PEM_BYTES_MAX {
        anyhow::bail!(
            "{field} {} is over {PEM_BYTES_MAX} bytes; not a certificate file",
            path.display()
        );
    }
    Ok(out)
}

/// SHA-256 of a certificate's DER bytes, lowercase hex (what `openssl x509
/// -fingerprint -sha256` shows, without the colons).
pub fn fingerprint_sha256(cert_der: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(cert_der))
}

/// The names a certificate made by `init --https` covers: localhost,
/// 127.0.0.1, ::1, the host name, and the configured listen host (unless it
/// is a wildcard address).
pub fn node_names(http_addr: &str) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Some(h) = host_name() {
        names.push(h);
    }
    let host = match http_addr.parse::<SocketAddr>() {
        Ok(sa) => Some(sa.ip().to_string()),
        Err(_) => http_addr
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(|c| c == '[' || c == ']').to_string()),
    };
    if let Some(h) = host {
        let wildcard = h
            .parse::<IpAddr>()
            .map(|ip| ip.is_unspecified())
            .unwrap_or(false);
        if !h.is_empty() && !wildcard {
            names.push(h);
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    names.retain(|n| seen.insert(n.to_ascii_lowercase()));
    names
}

fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end])
        .ok()?
        .trim()
        .to_ascii_lowercase();
    // Only a name a certificate can carry (DNS characters).
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    ok.then_some(name)
}

/// What `init --https` made.
pub struct MadeCert {
    pub tls: TlsConfig,
    pub fingerprint_sha256: String,
    pub names: Vec<String>,
}

/// Makes a self-signed certificate (ECDSA P-256) for `names`, writes the
/// certificate and its key (mode 0600) into `dir`, and returns the
/// `[api.tls]` config that points at them.
pub fn make_self_signed(dir: &Path, names: Vec<String>) -> anyhow::Result<MadeCert> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("generating the HTTPS key")?;
    let mut params = rcgen::CertificateParams::new(names.clone())
        .map_err(|e| anyhow!("a name cannot go into the certificate: {e}"))?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        names
            .iter()
            .find(|n| n.parse::<IpAddr>().is_err())
            .cloned()
            .unwrap_or_else(|| "storemesh".into()),
    );
    dn.push(rcgen::DnType::OrganizationName, "storemesh node");
    params.distinguished_name = dn;
    // Valid from a day ago (clocks of LAN clients drift) for ten years: the
    // clients pin this certificate; renewing means pinning a new one.
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    let cert = params
        .self_signed(&key)
        .context("signing the HTTPS certificate")?;
    let cert_path = dir.join(CERT_FILE_NAME);
    let key_path = dir.join(KEY_FILE_NAME);
    write_new(&key_path, key.serialize_pem().as_bytes(), true)?;
    if let Err(e) = write_new(&cert_path, cert.pem().as_bytes(), false) {
        let _ = std::fs::remove_file(&key_path);
        return Err(e);
    }
    // Absolute paths: the config stays right wherever the node is started from.
    let abs = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
    Ok(MadeCert {
        tls: TlsConfig {
            cert: abs(cert_path),
            key: abs(key_path),
        },
        fingerprint_sha256: fingerprint_sha256(cert.der()),
        names,
    })
}

fn write_new(path: &Path, bytes: &[u8], private: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = options.open(path).map_err(|e| {
        anyhow!(
            "cannot create {}: {} (remove it to make a new certificate)",
            path.display(),
            crate::config::io_message(&e)
        )
    })?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_loopback_and_the_listen_host() {
        let n = node_names("192.168.7.20:8400");
        for want in ["localhost", "127.0.0.1", "::1", "192.168.7.20"] {
            assert!(n.iter().any(|x| x == want), "{want} missing from {n:?}");
        }
        let n = node_names("0.0.0.0:8400");
        assert!(!n.iter().any(|x| x == "0.0.0.0"));
        let n = node_names("till-3.store.lan:8400");
        assert!(n.iter().any(|x| x == "till-3.store.lan"));
        let n = node_names("[::]:8400");
        assert!(!n.iter().any(|x| x == "::"));
    }

    #[test]
    fn made_certificate_loads_and_fingerprint_matches() {
        let dir = tempfile::tempdir().unwrap();
        let made = make_self_signed(dir.path(), node_names("127.0.0.1:0")).unwrap();
        server_config(&made.tls, dir.path()).unwrap();
        let pem = std::fs::read(&made.tls.cert).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        assert_eq!(fingerprint_sha256(&der), made.fingerprint_sha256);
        assert_eq!(made.fingerprint_sha256.len(), 64);
        // A second run refuses to overwrite the key.
        assert!(make_self_signed(dir.path(), vec!["localhost".into()]).is_err());
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.pem"), "not pem").unwrap();
        std::fs::write(dir.path().join("k.pem"), "not pem").unwrap();
        let cfg = TlsConfig {
            cert: "c.pem".into(),
            key: "k.pem".into(),
        };
        let e = server_config(&cfg, dir.path()).unwrap_err().to_string();
        assert!(e.contains("api.tls.cert"), "{e}");
        let cfg = TlsConfig {
            cert: "missing.pem".into(),
            key: "k.pem".into(),
        };
        let e = server_config(&cfg, dir.path()).unwrap_err().to_string();
        assert!(e.contains("cannot read api.tls.cert"), "{e}");
    }
}
