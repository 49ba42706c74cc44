//! The cluster CA and the certificates it issues (rcgen), and writing
//! them: private keys are created with mode 0600 (never widened, then
//! narrowed), and nothing existing is replaced unless asked.
//!
//! The CA's distinguished name is derived from its public key (`vmctl
//! cluster CA` and the first 8 bytes of its SHA-256, in hex), so that
//! two clusters' CAs never share a name and a loaded CA issues under the
//! same name without parsing its certificate.

use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use chrono::Datelike as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::Digest as _;

/// How long the CA's certificate is valid, in years (from January 1st
/// of the year it is made).
pub const CA_YEARS: i32 = 10;

/// How long an agent's or a user's certificate is valid, in years (from
/// January 1st of the year it is issued).
pub const CERT_YEARS: i32 = 5;

/// Why a certificate cannot be made or written.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// rcgen failed (key generation, signing, a PEM it cannot read).
    #[error("{what}: {why}")]
    Certificate {
        /// What was being made or read.
        what: String,
        /// rcgen's reason.
        why: String,
    },
    /// A subject alternative name that is neither an IP address nor a DNS name.
    #[error("`{0}` is not an IP address or a DNS name")]
    Address(String),
    /// A file or directory cannot be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file exists and replacing it was not asked for.
    #[error("{} already exists", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
}

fn rcgen_error(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> IssueError {
    let what = what.into();
    move |e| IssueError::Certificate {
        what,
        why: e.to_string(),
    }
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8). Write it with [`write_private`].
    pub key_pem: String,
}

/// The cluster CA: its key and certificate.
#[derive(Debug)]
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// Makes `params` valid from January 1st of this year (UTC) for `years`.
fn valid_for(params: &mut CertificateParams, years: i32) {
    let year = chrono::Utc::now().year();
    params.not_before = rcgen::date_time_ymd(year, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

/// The CA's parameters for its key: the name derived from the key, a CA
/// that signs end-entity certificates only (path length 0).
fn ca_params(key: &KeyPair) -> CertificateParams {
    let digest = sha2::Sha256::digest(key.public_key_raw());
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("vmctl cluster CA {}", hex::encode(&digest[..8])),
    );
    dn.push(DnType::OrganizationName, "vmctl");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    valid_for(&mut params, CA_YEARS);
    params
}

/// Parameters of an end-entity certificate named `cn` in organisation `o`.
fn leaf_params(cn: &str, o: &str, eku: Vec<ExtendedKeyUsagePurpose>) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, o);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = eku;
    params.use_authority_key_identifier_extension = true;
    valid_for(&mut params, CERT_YEARS);
    params
}

impl Ca {
    /// A new CA with a new key (ECDSA P-256).
    ///
    /// # Errors
    /// [`IssueError::Certificate`] when the key or certificate cannot be made.
    pub fn generate() -> Result<Ca, IssueError> {
        let key = KeyPair::generate().map_err(rcgen_error("a key for the CA"))?;
        let params = ca_params(&key);
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_error("the CA certificate"))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA of `cert_pem` and `key_pem`, as [`Ca::generate`] made them.
    ///
    /// # Errors
    /// [`IssueError::Certificate`] when the key is not PEM.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, IssueError> {
        let key = KeyPair::from_pem(key_pem).map_err(rcgen_error("the CA key"))?;
        let params = ca_params(&key);
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA's certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PEM (PKCS#8).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    fn sign(&self, params: CertificateParams, what: &str) -> Result<Issued, IssueError> {
        let key = KeyPair::generate().map_err(rcgen_error(format!("a key for {what}")))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_error(what))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The certificate of agent `name`, for server and client
    /// authentication, naming `addresses` (IP addresses or DNS names:
    /// those clients connect to) as subject alternative names.
    ///
    /// # Errors
    /// [`IssueError::Address`] for an address that is neither;
    /// [`IssueError::Certificate`] when signing fails.
    pub fn issue_agent(&self, name: &str, addresses: &[String]) -> Result<Issued, IssueError> {
        let mut params = leaf_params(
            name,
            "vmctl agent",
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        for a in addresses {
            params.subject_alt_names.push(san(a)?);
        }
        self.sign(params, &format!("the certificate of agent {name}"))
    }

    /// The certificate of user `name` (its common name), for client
    /// authentication only.
    ///
    /// # Errors
    /// [`IssueError::Certificate`] when signing fails.
    pub fn issue_user(&self, name: &str) -> Result<Issued, IssueError> {
        let params = leaf_params(
            name,
            "vmctl user",
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        );
        self.sign(params, &format!("the certificate of user {name}"))
    }
}

/// A subject alternative name: an IP address (brackets allowed) or a DNS name.
fn san(a: &str) -> Result<SanType, IssueError> {
    let bare = a.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let dns_ok = !a.is_empty()
        && a.len() <= 253
        && a.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !dns_ok {
        return Err(IssueError::Address(a.to_owned()));
    }
    a.to_ascii_lowercase()
        .try_into()
        .map(SanType::DnsName)
        .map_err(|_| IssueError::Address(a.to_owned()))
}

/// Creates directory `dir` (and its parents) with mode 0700.
///
/// # Errors
/// [`IssueError::Write`].
pub fn create_dir(dir: &Path) -> Result<(), IssueError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| IssueError::Write {
            path: dir.to_owned(),
            source,
        })
}

/// Writes a private key to `path` with mode 0600 from its creation: a
/// new file made with `O_EXCL` next to it, then renamed over `path`, so a
/// key is never readable by others, not even for a moment, and a reader
/// sees the old key or the new one whole.
///
/// # Errors
/// [`IssueError::Exists`] when `path` exists and `replace` is false;
/// [`IssueError::Write`] when writing fails.
pub fn write_private(path: &Path, contents: &str, replace: bool) -> Result<(), IssueError> {
    write_mode(path, contents, replace, 0o600)
}

/// Writes a certificate to `path` (mode 0644), as [`write_private`] does.
///
/// # Errors
/// As [`write_private`].
pub fn write_public(path: &Path, contents: &str, replace: bool) -> Result<(), IssueError> {
    write_mode(path, contents, replace, 0o644)
}

fn write_mode(path: &Path, contents: &str, replace: bool, mode: u32) -> Result<(), IssueError> {
    let err = |source| IssueError::Write {
        path: path.to_owned(),
        source,
    };
    if !replace && path.symlink_metadata().is_ok() {
        return Err(IssueError::Exists {
            path: path.to_owned(),
        });
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    let written = f
        .write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| {
            if replace {
                std::fs::rename(&tmp, path)
            } else {
                // Not over a file that appeared meanwhile.
                std::fs::hard_link(&tmp, path).and_then(|()| std::fs::remove_file(&tmp))
            }
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(match e.kind() {
            std::io::ErrorKind::AlreadyExists => IssueError::Exists {
                path: path.to_owned(),
            },
            _ => err(e),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_loaded_ca_issues_certificates_that_chain_to_its_certificate() {
        let ca = Ca::generate().unwrap();
        let again = Ca::load(ca.cert_pem(), &ca.key_pem()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let agent = again
            .issue_agent("a", &["127.0.0.2".into(), "host-a.example".into()])
            .unwrap();
        write_public(&dir.path().join(crate::CA_CERT), ca.cert_pem(), false).unwrap();
        write_public(&dir.path().join(crate::AGENT_CERT), &agent.cert_pem, false).unwrap();
        write_private(&dir.path().join(crate::AGENT_KEY), &agent.key_pem, false).unwrap();
        let id = crate::Identity::agent_dir(dir.path());
        crate::server_config(&id).unwrap();
        crate::client_config(&id).unwrap();
    }

    #[test]
    fn private_keys_are_0600_and_not_replaced_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        write_private(&p, "one", false).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            write_private(&p, "two", false),
            Err(IssueError::Exists { .. })
        ));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "one");
        write_private(&p, "two", true).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn agent_addresses_are_ip_addresses_or_dns_names() {
        assert!(matches!(san("127.0.0.2"), Ok(SanType::IpAddress(_))));
        assert!(matches!(san("[::1]"), Ok(SanType::IpAddress(_))));
        assert!(matches!(san("host-b.example"), Ok(SanType::DnsName(_))));
        assert!(san("not a name").is_err());
        assert!(san("127.0.0.2:7443").is_err());
    }
}
