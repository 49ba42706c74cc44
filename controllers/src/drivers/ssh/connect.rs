//! Resolving where and as whom to connect, and opening one authenticated
//! session with the host key checked against the pinned one.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ssh_key::{HashAlg, PublicKey};
use ssh2::{MethodType, Session};

use super::error::SshError;
use crate::drivers::SshTarget;
use crate::seed::keys::{HOST_KEY, USER_KEY};

/// Keys tried from `~/.ssh` when the spec names none, in OpenSSH's order.
const HOME_KEYS: &[&str] = &["id_ed25519", "id_ecdsa", "id_rsa"];

/// Everything needed to open a session to one VM, resolved from its
/// [`SshTarget`] once per operation.
#[derive(Debug, Clone)]
pub(super) struct Endpoint {
    /// The VM's name.
    pub vm: String,
    /// Host to connect to.
    pub host: String,
    /// Port to connect to.
    pub port: u16,
    /// User to log in as.
    pub user: String,
    /// Private keys to offer, in order; all exist.
    pub keys: Vec<PathBuf>,
    /// The host key vmctl generated for the VM.
    pub pinned: PublicKey,
    /// The VM's work directory (for `provision.log`).
    pub work_dir: PathBuf,
}

impl Endpoint {
    /// Resolves `target`: address from the runtime, user from the `ssh`
    /// block (default `vm`), keys as [`key_candidates`] gives them and the
    /// pinned host key from the work directory.
    ///
    /// A work directory without `host_ed25519.pub` is an error, not a reason
    /// to trust whatever key the guest presents: every VM vmctl prepares gets
    /// one (even with raw user-data, where it travels in vendor-data), so its
    /// absence means the directory is not what we think it is.
    pub fn resolve(target: &SshTarget) -> Result<Self, SshError> {
        let vm = target.vm.clone();
        let rt = &target.runtime;
        let host = rt
            .ssh_host
            .clone()
            .ok_or_else(|| SshError::NoAddress { vm: vm.clone() })?;
        let work_dir = PathBuf::from(
            rt.work_dir
                .as_deref()
                .ok_or_else(|| SshError::NoWorkDir { vm: vm.clone() })?,
        );
        let pinned = read_pinned(&vm, &work_dir)?;
        let user = target
            .ssh
            .as_ref()
            .map(|s| s.user.clone())
            .unwrap_or_else(vmctl_api::default_ssh_user);
        let explicit = target.ssh.as_ref().and_then(|s| s.private_key.as_deref());
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let candidates = key_candidates(&work_dir, explicit, home.as_deref());
        let keys: Vec<PathBuf> = candidates.iter().filter(|p| p.is_file()).cloned().collect();
        if keys.is_empty() {
            return Err(SshError::NoKey { tried: candidates });
        }
        Ok(Self {
            vm,
            host,
            port: rt.ssh_port.unwrap_or(22),
            user,
            keys,
            pinned,
            work_dir,
        })
    }

    /// `host:port`, for messages.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Opens a session: TCP connect, handshake, host key check, public key
    /// authentication. `timeout` bounds each of the blocking operations;
    /// the returned session has no timeout, as a provisioning command may
    /// be silent for long.
    pub fn connect(&self, timeout: Duration) -> Result<Session, SshError> {
        self.connect_watched(timeout).map(|(sess, _)| sess)
    }

    /// [`Endpoint::connect`], also returning a second handle on the
    /// session's socket, for `poll(2)` while the session is in
    /// non-blocking mode (`ssh2::Session` only exposes a raw descriptor,
    /// which safe code cannot poll).
    pub fn connect_watched(&self, timeout: Duration) -> Result<(Session, TcpStream), SshError> {
        let addr = self.addr();
        let connect_err = |source| SshError::Connect {
            addr: addr.clone(),
            source,
        };
        let sock = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(connect_err)?
            .next()
            .ok_or_else(|| connect_err(std::io::Error::other("no address")))?;
        let tcp = TcpStream::connect_timeout(&sock, timeout).map_err(connect_err)?;
        let watch = tcp.try_clone().map_err(connect_err)?;
        let sess = self.handshake(tcp, timeout)?;
        let mut tried = Vec::new();
        for key in &self.keys {
            tried.push(key.clone());
            match sess.userauth_pubkey_file(&self.user, None, key, None) {
                Ok(()) if sess.authenticated() => break,
                Ok(()) => {}
                Err(e) => tracing::debug!(vm = %self.vm, key = %key.display(), "key refused: {e}"),
            }
        }
        if !sess.authenticated() {
            return Err(SshError::Auth {
                user: self.user.clone(),
                addr,
                tried,
            });
        }
        sess.set_timeout(0);
        Ok((sess, watch))
    }

    /// The SSH handshake on the connected `tcp`, and the server's host key
    /// checked against the pinned one; `timeout` bounds each blocking
    /// operation (and stays set on the returned, unauthenticated session).
    pub fn handshake(&self, tcp: TcpStream, timeout: Duration) -> Result<Session, SshError> {
        let addr = self.addr();
        let mut sess = Session::new().map_err(|source| SshError::Session {
            what: "create an SSH session".into(),
            source,
        })?;
        // Only the pinned key's algorithm: a guest that also has RSA or
        // ECDSA host keys must show the Ed25519 one, which we can check.
        sess.method_pref(MethodType::HostKey, "ssh-ed25519")
            .map_err(|source| SshError::Session {
                what: "restrict host key algorithms".into(),
                source,
            })?;
        sess.set_tcp_stream(tcp);
        sess.set_timeout(
            u32::try_from(timeout.as_millis())
                .unwrap_or(u32::MAX)
                .max(1),
        );
        sess.handshake()
            .map_err(|source| SshError::Handshake { addr, source })?;
        self.check_host_key(&sess)?;
        Ok(sess)
    }

    fn check_host_key(&self, sess: &Session) -> Result<(), SshError> {
        let expected = self.pinned.fingerprint(HashAlg::Sha256).to_string();
        let mismatch = |actual: String| SshError::HostKeyMismatch {
            vm: self.vm.clone(),
            addr: self.addr(),
            expected: expected.clone(),
            actual,
        };
        let Some((blob, kind)) = sess.host_key() else {
            return Err(mismatch("no host key".into()));
        };
        let pinned = self.pinned.to_bytes().map_err(|e| SshError::HostKeyRead {
            path: self.work_dir.join(format!("{HOST_KEY}.pub")),
            reason: e.to_string(),
        })?;
        if blob == pinned.as_slice() {
            return Ok(());
        }
        let actual = match PublicKey::from_bytes(blob) {
            Ok(k) => k.fingerprint(HashAlg::Sha256).to_string(),
            Err(_) => format!("a {kind:?} key"),
        };
        Err(mismatch(actual))
    }
}

/// Ends a session politely, so that the guest's sshd logs a disconnect
/// rather than a broken pipe. Failing to say goodbye is not an error.
pub(super) fn disconnect(sess: &Session) {
    let _ = sess.disconnect(None, "vmctl done", None);
}

/// The private keys to offer, in order: the one the `ssh` block names
/// (alone: naming a key is a choice, not a hint); otherwise the key vmctl
/// generated in the work directory, then `~/.ssh`'s defaults.
pub(super) fn key_candidates(
    work_dir: &Path,
    explicit: Option<&str>,
    home: Option<&Path>,
) -> Vec<PathBuf> {
    if let Some(p) = explicit {
        let path = match (p.strip_prefix("~/"), home) {
            (Some(rest), Some(home)) => home.join(rest),
            _ => PathBuf::from(p),
        };
        return vec![path];
    }
    let mut out = vec![work_dir.join(USER_KEY)];
    if let Some(home) = home {
        out.extend(HOME_KEYS.iter().map(|k| home.join(".ssh").join(k)));
    }
    out
}

/// Reads `<work_dir>/host_ed25519.pub`.
pub(super) fn read_pinned(vm: &str, work_dir: &Path) -> Result<PublicKey, SshError> {
    let path = work_dir.join(format!("{HOST_KEY}.pub"));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SshError::HostKeyMissing {
                vm: vm.to_owned(),
                path,
            });
        }
        Err(e) => {
            return Err(SshError::HostKeyRead {
                path,
                reason: e.to_string(),
            });
        }
    };
    PublicKey::from_openssh(text.trim()).map_err(|e| SshError::HostKeyRead {
        path,
        reason: e.to_string(),
    })
}
