//! `[api.tls]` (CONTRACT v2): the certificate and key the API is served
//! with over HTTPS (loading them is `crate::https`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[api.tls]`. Relative paths are taken from the data directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file: the server certificate, then any intermediates.
    pub cert: PathBuf,
    /// PEM file: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsConfig {
    pub fn check(&self) -> Result<(), String> {
        for (field, p) in [("api.tls.cert", &self.cert), ("api.tls.key", &self.key)] {
            if p.as_os_str().is_empty() {
                return Err(format!("{field} must name a PEM file"));
            }
        }
        Ok(())
    }
}
