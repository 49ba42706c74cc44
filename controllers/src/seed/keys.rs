//! Per-VM SSH keys: the Ed25519 keypair vmctl logs in with and the VM's
//! own Ed25519 host key, generated before first boot and handed to
//! cloud-init, so the host key is pinned in `known_hosts` from the start
//! (no `StrictHostKeyChecking=no`, no trust on first use).
//!
//! Private keys are created with mode 0600 (never readable by others, not
//! even while being written) and reused when they already exist.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, LineEnding, PrivateKey, PublicKey};

use super::HostKey;
use super::atomic::write_atomic;

/// Diagnostic code of key errors.
pub const KEYGEN_FAILED: &str = "vmctl::ssh::keygen_failed";

/// File name of the user's private key in a VM's directory.
pub const USER_KEY: &str = "id_ed25519";
/// File name of the VM's private host key in a VM's directory.
pub const HOST_KEY: &str = "host_ed25519";

/// Errors of the key module.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key directory could not be created.
    #[error("Cannot create key directory {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An existing key could not be read or its mode fixed.
    #[error("Cannot read key {}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An existing key is not an OpenSSH private key.
    #[error("Key {} is not an OpenSSH private key", path.display())]
    Parse {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ssh_key::Error,
    },
    /// An existing key is encrypted or not Ed25519.
    #[error("Key {} must be an unencrypted Ed25519 key", path.display())]
    Unsupported {
        /// The key file.
        path: PathBuf,
    },
    /// Generating or encoding a key failed.
    #[error("Cannot generate an Ed25519 key")]
    Generate {
        /// Why.
        #[source]
        source: ssh_key::Error,
    },
    /// A key file could not be written.
    #[error("Cannot write key {}", path.display())]
    Write {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl KeyError {
    /// The diagnostic code, for miette.
    pub fn code(&self) -> &'static str {
        KEYGEN_FAILED
    }
}

/// An Ed25519 keypair on disk.
#[derive(Clone)]
pub struct KeyPair {
    /// The private key file (mode 0600).
    pub private_path: PathBuf,
    /// The public key file (`<private>.pub`).
    pub public_path: PathBuf,
    /// The private key in OpenSSH format.
    pub private_openssh: String,
    /// The public key as an `authorized_keys` line, with comment.
    pub public_openssh: String,
    /// The public key.
    pub public: PublicKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("KeyPair")
            .field("private_path", &self.private_path)
            .field("public_openssh", &self.public_openssh)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// The keypair as the host key handed to cloud-init.
    pub fn to_host_key(&self) -> HostKey {
        HostKey {
            private_openssh: self.private_openssh.clone(),
            public_openssh: self.public_openssh.clone(),
        }
    }

    /// `known_hosts` line pinning this key for `host` port `port`.
    pub fn known_hosts_line(&self, host: &str, port: u16) -> String {
        known_hosts_line(host, port, &self.public)
    }
}

/// A VM's keys.
#[derive(Debug, Clone)]
pub struct VmKeys {
    /// The key vmctl logs in with (`id_ed25519`).
    pub user: KeyPair,
    /// The VM's SSH host key (`host_ed25519`).
    pub host: KeyPair,
}

/// Makes sure `dir` holds the user keypair (`id_ed25519`, `.pub`) and the
/// host keypair (`host_ed25519`, `.pub`), generating what is missing and
/// reusing what exists. `comment` goes on generated keys (e.g.
/// `vmctl@web-1`).
pub fn ensure_vm_keys(dir: &Path, comment: &str) -> Result<VmKeys, KeyError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| KeyError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    Ok(VmKeys {
        user: ensure_keypair(&dir.join(USER_KEY), comment)?,
        host: ensure_keypair(&dir.join(HOST_KEY), comment)?,
    })
}

/// Makes sure `private_path` holds an Ed25519 private key and
/// `<private_path>.pub` its public key. An existing private key is reused
/// (its mode tightened to 0600 if it was looser, as ssh would refuse it);
/// the `.pub` is rewritten from it when missing or different.
pub fn ensure_keypair(private_path: &Path, comment: &str) -> Result<KeyPair, KeyError> {
    let public_path = pub_path(private_path);
    let key = match fs::read(private_path) {
        Ok(pem) => reuse(private_path, &pem)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519)
                .map_err(|source| KeyError::Generate { source })?;
            key.set_comment(comment);
            let pem = key
                .to_openssh(LineEnding::LF)
                .map_err(|source| KeyError::Generate { source })?;
            write_atomic(private_path, pem.as_bytes(), 0o600).map_err(|source| {
                KeyError::Write {
                    path: private_path.to_owned(),
                    source,
                }
            })?;
            tracing::info!(path = %private_path.display(), "generated Ed25519 key");
            key
        }
        Err(source) => {
            return Err(KeyError::Read {
                path: private_path.to_owned(),
                source,
            });
        }
    };
    let private_openssh = key
        .to_openssh(LineEnding::LF)
        .map_err(|source| KeyError::Generate { source })?
        .to_string();
    let public = key.public_key().clone();
    let public_openssh = public
        .to_openssh()
        .map_err(|source| KeyError::Generate { source })?;
    let want = format!("{public_openssh}\n");
    if fs::read_to_string(&public_path).ok().as_deref() != Some(&want) {
        write_atomic(&public_path, want.as_bytes(), 0o644).map_err(|source| KeyError::Write {
            path: public_path.clone(),
            source,
        })?;
    }
    Ok(KeyPair {
        private_path: private_path.to_owned(),
        public_path,
        private_openssh,
        public_openssh,
        public,
    })
}

fn reuse(path: &Path, pem: &[u8]) -> Result<PrivateKey, KeyError> {
    let key = PrivateKey::from_openssh(pem).map_err(|source| KeyError::Parse {
        path: path.to_owned(),
        source,
    })?;
    if key.is_encrypted() || key.algorithm() != Algorithm::Ed25519 {
        return Err(KeyError::Unsupported {
            path: path.to_owned(),
        });
    }
    let read_err = |source| KeyError::Read {
        path: path.to_owned(),
        source,
    };
    let mode = fs::metadata(path).map_err(read_err)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "private key was readable by others; setting mode 0600");
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(read_err)?;
    }
    Ok(key)
}

fn pub_path(private_path: &Path) -> PathBuf {
    let mut s = private_path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// A `known_hosts` line pinning `key` for `host:port`, in the form ssh
/// looks up: `[127.0.0.1]:2222 ssh-ed25519 AAAA…` (bare host for port 22).
/// The key's comment is left out.
pub fn known_hosts_line(host: &str, port: u16, key: &PublicKey) -> String {
    let mut key = key.clone();
    key.set_comment("");
    let encoded = key.to_openssh().expect("an in-memory public key encodes");
    let encoded = encoded.trim_end();
    if port == 22 {
        format!("{host} {encoded}")
    } else {
        format!("[{host}]:{port} {encoded}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn ensure_vm_keys_generates_private_keys_0600_and_public_keys() {
        let dir = tempfile::tempdir().unwrap();
        let keys = ensure_vm_keys(&dir.path().join("vm"), "vmctl@web-1").unwrap();
        for kp in [&keys.user, &keys.host] {
            assert_eq!(mode(&kp.private_path), 0o600);
            let pem = fs::read_to_string(&kp.private_path).unwrap();
            assert!(pem.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
            let public = fs::read_to_string(&kp.public_path).unwrap();
            assert!(public.starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"));
            assert!(public.ends_with(" vmctl@web-1\n"));
            assert_eq!(public.trim_end(), kp.public_openssh);
        }
        assert_eq!(mode(&dir.path().join("vm")), 0o700);
        assert_ne!(keys.user.public_openssh, keys.host.public_openssh);
        assert!(keys.user.private_path.ends_with("id_ed25519"));
        assert!(keys.host.public_path.ends_with("host_ed25519.pub"));
    }

    #[test]
    fn ensure_vm_keys_reuses_existing_keys() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_vm_keys(dir.path(), "a").unwrap();
        let pem_before = fs::read(&first.user.private_path).unwrap();
        fs::remove_file(&first.host.public_path).unwrap();
        let second = ensure_vm_keys(dir.path(), "b").unwrap();
        assert_eq!(first.user.public_openssh, second.user.public_openssh);
        assert_eq!(first.host.public_openssh, second.host.public_openssh);
        assert_eq!(fs::read(&second.user.private_path).unwrap(), pem_before);
        assert!(second.host.public_path.exists(), "a lost .pub is rewritten");
    }

    #[test]
    fn loose_private_key_mode_is_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let kp = ensure_keypair(&dir.path().join("k"), "c").unwrap();
        fs::set_permissions(&kp.private_path, fs::Permissions::from_mode(0o644)).unwrap();
        ensure_keypair(&kp.private_path, "c").unwrap();
        assert_eq!(mode(&kp.private_path), 0o600);
    }

    #[test]
    fn garbage_key_file_is_an_error_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(&path, "not a key").unwrap();
        let err = ensure_keypair(&path, "c").unwrap_err();
        assert!(matches!(err, KeyError::Parse { .. }), "{err:?}");
        assert_eq!(err.code(), "vmctl::ssh::keygen_failed");
        assert_eq!(fs::read_to_string(&path).unwrap(), "not a key");
    }

    #[test]
    fn known_hosts_line_pins_key_without_comment() {
        let dir = tempfile::tempdir().unwrap();
        let kp = ensure_keypair(&dir.path().join("h"), "comment").unwrap();
        let line = kp.known_hosts_line("127.0.0.1", 2222);
        let body = kp.public_openssh.strip_suffix(" comment").unwrap();
        assert_eq!(line, format!("[127.0.0.1]:2222 {body}"));
        assert_eq!(
            kp.known_hosts_line("10.0.0.5", 22),
            format!("10.0.0.5 {body}")
        );
    }

    #[test]
    fn debug_never_shows_the_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let kp = ensure_keypair(&dir.path().join("k"), "c").unwrap();
        assert!(!format!("{kp:?}").contains("PRIVATE"));
    }

    #[test]
    fn ssh_keygen_accepts_generated_keys() {
        let Some(keygen) = super::super::iso::find_in_path("ssh-keygen") else {
            eprintln!("note: ssh-keygen not installed; skipping");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let kp = ensure_keypair(&dir.path().join("k"), "c").unwrap();
        let out = std::process::Command::new(keygen)
            .arg("-y")
            .arg("-f")
            .arg(&kp.private_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let derived = String::from_utf8(out.stdout).unwrap();
        assert!(
            kp.public_openssh.starts_with(
                derived
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
                    .as_str()
            )
        );
    }
}
