//! The transport security of the relay's connections: plain, or TLS through rustls (feature
//! `tls`).

use std::fmt;

/// The transport security of the relay's connections.
#[derive(Clone, Default)]
pub(crate) enum Tls {
    /// No TLS (`NoTls`): a Unix socket or a trusted network.
    #[default]
    Plain,
    /// TLS through rustls, as the connection string's `sslmode` asks (`prefer` by default:
    /// TLS when the server offers it; `require` refuses a plaintext server).
    #[cfg(feature = "tls")]
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Tls {
    /// A short name for logs and spans.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Tls::Plain => "none",
            #[cfg(feature = "tls")]
            Tls::Rustls(_) => "rustls",
        }
    }
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A rustls configuration that trusts only the CA certificates in `pem`, with rustls's `ring`
/// provider and its safe default protocol versions.
#[cfg(feature = "tls")]
pub(crate) fn config_from_pem(pem: &[u8]) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("the CA certificates do not parse as PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("a CA certificate was refused: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no certificate found in the PEM text".into());
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
