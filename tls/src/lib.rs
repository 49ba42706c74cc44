//! Mutual TLS between `vmctl` and the agents (issue 17, "any agent is the
//! door"): every peer proves itself with a certificate of the cluster CA.
//!
//! ```text
//!  vmctl cluster init ──▶ DIR/ca.crt, DIR/ca.key (0600)
//!  vmctl cluster issue agent NAME --address IP ──▶ DIR/agents/NAME/{ca.crt, agent.crt, agent.key}
//!  vmctl cluster issue user NAME              ──▶ DIR/users/NAME/{ca.crt, user.crt, user.key}
//!
//!  vmctl (user.crt) ──TLS 1.2/1.3, both sides verified against ca.crt──▶ agent (agent.crt)
//! ```
//!
//! An agent's certificate serves both ways (server and client
//! authentication), so that an agent can forward a request to another
//! with its own identity. A user's certificate is for client
//! authentication only; its common name is the user's name.
//!
//! [`server_config`] and [`client_config`] build the rustls settings from
//! those files; the `issue` feature (the CLI only) creates them
//! ([`issue`]). The crypto provider is ring's, the one reqwest's rustls
//! already builds.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub use rustls;
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A TLS server name (a host name or IP address) that owns its text.
pub type ServerNameOwned = ServerName<'static>;

#[cfg(feature = "issue")]
pub mod issue;

/// The cluster CA's certificate in a directory of certificates.
pub const CA_CERT: &str = "ca.crt";
/// The cluster CA's private key (only in the directory `cluster init`
/// made; never copied to an agent).
pub const CA_KEY: &str = "ca.key";
/// An agent's certificate in its directory (`--tls-dir`).
pub const AGENT_CERT: &str = "agent.crt";
/// An agent's private key in its directory.
pub const AGENT_KEY: &str = "agent.key";
/// A user's certificate in its directory.
pub const USER_CERT: &str = "user.crt";
/// A user's private key in its directory.
pub const USER_KEY: &str = "user.key";

/// Why TLS material cannot be used. Nothing is listened on or connected
/// to when it is returned.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is not PEM, or holds no item of the kind expected.
    #[error("{} holds no {what}: {why}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// `certificate` or `private key`.
        what: &'static str,
        /// What the PEM parser said.
        why: String,
    },
    /// rustls refused the material (a key that does not match its
    /// certificate, a CA certificate it cannot use).
    #[error("{what}: {why}")]
    Refused {
        /// What was being built.
        what: String,
        /// rustls' reason.
        why: String,
    },
    /// A host name or address that cannot be a TLS server name.
    #[error("`{0}` is not a host name or IP address")]
    ServerName(String),
}

/// The files one peer presents and trusts: its certificate and key, and
/// the cluster CA it checks the other side against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Its certificate (PEM; the chain, leaf first).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// The cluster CA's certificate (PEM).
    pub ca: PathBuf,
}

impl Identity {
    /// An agent's files in `dir` ([`AGENT_CERT`], [`AGENT_KEY`], [`CA_CERT`]),
    /// as `vmctl cluster issue agent` writes them.
    pub fn agent_dir(dir: &Path) -> Self {
        Identity {
            cert: dir.join(AGENT_CERT),
            key: dir.join(AGENT_KEY),
            ca: dir.join(CA_CERT),
        }
    }

    /// A user's files in `dir` ([`USER_CERT`], [`USER_KEY`], [`CA_CERT`]),
    /// as `vmctl cluster issue user` writes them.
    pub fn user_dir(dir: &Path) -> Self {
        Identity {
            cert: dir.join(USER_CERT),
            key: dir.join(USER_KEY),
            ca: dir.join(CA_CERT),
        }
    }

    fn certs(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        certificates(&self.cert)
    }

    fn private_key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        let pem = read(&self.key)?;
        PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
            path: self.key.clone(),
            what: "private key",
            why: e.to_string(),
        })
    }

    /// Why rustls refused this identity's certificate with its key.
    fn pair_refused(&self, e: rustls::Error) -> TlsError {
        TlsError::Refused {
            what: format!(
                "the certificate {} with the key {}",
                self.cert.display(),
                self.key.display()
            ),
            why: e.to_string(),
        }
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in certificates(&self.ca)? {
            roots.add(c).map_err(|e| TlsError::Refused {
                what: format!("the CA certificate {}", self.ca.display()),
                why: e.to_string(),
            })?;
        }
        Ok(roots)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The certificates of a PEM file, in order; at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let bad = |why: String| TlsError::Pem {
        path: path.to_owned(),
        what: "certificate",
        why,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE section".into()));
    }
    Ok(certs)
}

/// The crypto provider of every configuration: ring's.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn refused(what: &str) -> impl Fn(rustls::Error) -> TlsError + '_ {
    move |e| TlsError::Refused {
        what: what.to_owned(),
        why: e.to_string(),
    }
}

/// The settings of an agent's TLS listener: it presents `id`'s
/// certificate and **requires** a client certificate that chains to
/// `id.ca` (rustls' `WebPkiClientVerifier`; a client without one, or with
/// one of another CA, fails the handshake).
///
/// # Errors
/// [`TlsError::Read`] / [`TlsError::Pem`] for a missing or malformed
/// file, [`TlsError::Refused`] when the key does not match the
/// certificate or the CA certificate cannot be used.
pub fn server_config(id: &Identity) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(id.roots()?), provider.clone())
            .build()
            .map_err(|e| TlsError::Refused {
                what: format!("the CA certificate {}", id.ca.display()),
                why: e.to_string(),
            })?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(refused("the TLS protocol versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.certs()?, id.private_key()?)
        .map_err(|e| id.pair_refused(e))?;
    Ok(Arc::new(config))
}

/// The settings of a client of an agent (`vmctl --server`, or an agent
/// forwarding to another): it presents `id`'s certificate and accepts
/// only a server whose certificate chains to `id.ca` and names the host
/// it connects to.
///
/// # Errors
/// As [`server_config`].
pub fn client_config(id: &Identity) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(refused("the TLS protocol versions"))?
        .with_root_certificates(id.roots()?)
        .with_client_auth_cert(id.certs()?, id.private_key()?)
        .map_err(|e| id.pair_refused(e))?;
    Ok(Arc::new(config))
}

/// The TLS server name of `host` (an IP address, bracketed or not, or a
/// DNS name): what the agent's certificate must name.
///
/// # Errors
/// [`TlsError::ServerName`] when it is neither.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_owned()).map_err(|_| TlsError::ServerName(host.to_owned()))
}

/// A TLS error in words a user can act on: who refused what.
pub fn explain(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::AlertReceived(A::CertificateRequired) => {
            "the agent requires a client certificate, and none was presented".into()
        }
        E::AlertReceived(A::UnknownCA | A::BadCertificate | A::DecryptError) => {
            "the agent refused this client's certificate: it is not issued by the cluster's CA"
                .into()
        }
        E::AlertReceived(A::CertificateExpired) => {
            "the agent refused this client's certificate: it has expired".into()
        }
        E::AlertReceived(a) => format!("the agent refused the connection ({a:?})"),
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "the agent's certificate is not issued by the CA of the certificate-authority file"
                .into()
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the agent's certificate does not name the host connected to".into()
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the agent's certificate has expired".into()
        }
        other => other.to_string(),
    }
}

/// Why an agent refused a client's handshake, in words for its log.
pub fn explain_refusal(e: &std::io::Error) -> String {
    use rustls::{CertificateError as C, Error as E};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return e.to_string();
    };
    match tls {
        E::InvalidMessage(_) => "the client does not speak TLS (plaintext?)".into(),
        E::NoCertificatesPresented => "the client presented no certificate".into(),
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "the client's certificate is not issued by the cluster CA".into()
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the client's certificate has expired".into()
        }
        other => other.to_string(),
    }
}
