//! The registry client's TLS: rustls with the platform's trust roots, as reqwest sets it up
//! itself, except that the roots are loaded at the first https handshake, once, for both of the
//! [`super::Registry`]'s HTTP clients. Loading them reads the CA bundle and every file of
//! `/etc/ssl/certs` (about 2.7 ms here); reqwest did it for each client it built, so every
//! `ovbd rpull` and daemon start paid twice, for plain-http registries too.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::{Arc, OnceLock};

/// The platform's verifier (`rustls-platform-verifier`, which reqwest uses), made when a
/// certificate is first checked. Handshake signatures need no roots: they are checked with the
/// provider's algorithms, as that verifier checks them.
#[derive(Debug)]
pub(super) struct PlatformRoots {
    provider: Arc<CryptoProvider>,
    verifier: OnceLock<Result<Arc<rustls_platform_verifier::Verifier>, rustls::Error>>,
}

impl PlatformRoots {
    fn new(provider: Arc<CryptoProvider>) -> PlatformRoots {
        PlatformRoots {
            provider,
            verifier: OnceLock::new(),
        }
    }

    fn verifier(&self) -> Result<&rustls_platform_verifier::Verifier, rustls::Error> {
        let made = self.verifier.get_or_init(|| {
            rustls_platform_verifier::Verifier::new(self.provider.clone()).map(Arc::new)
        });
        match made {
            Ok(v) => Ok(v),
            Err(e) => Err(e.clone()),
        }
    }

    /// Whether the roots were loaded (tests).
    #[cfg(test)]
    pub(super) fn loaded(&self) -> bool {
        self.verifier.get().is_some()
    }
}

impl ServerCertVerifier for PlatformRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verifier()?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The TLS configuration of both HTTP clients: the platform's roots (loaded on first use, the
/// returned [`PlatformRoots`]), or only `roots` if there are some (tests: a self-signed
/// server). HTTP/1.1, TLS 1.2 and 1.3, as reqwest configures rustls itself.
pub(super) fn client_config(
    roots: &[CertificateDer<'static>],
) -> Result<(ClientConfig, Option<Arc<PlatformRoots>>), rustls::Error> {
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let (verifier, platform): (Arc<dyn ServerCertVerifier>, _) = if roots.is_empty() {
        let p = Arc::new(PlatformRoots::new(provider.clone()));
        (p.clone(), Some(p))
    } else {
        let mut store = RootCertStore::empty();
        for r in roots {
            store.add(r.clone())?;
        }
        let v = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        (v, None)
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((config, platform))
}
