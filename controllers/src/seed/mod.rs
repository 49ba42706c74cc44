//! The cloud-init NoCloud seed of a VM and its SSH keys.
//!
//! ```text
//!  ensure_vm_keys(dir) ──▶ VmKeys { user, host }      (keys.rs, 0600 on disk)
//!          │
//!          ▼
//!  SeedSpec { instance_id, hostname, user, authorized_keys, host_key, … }
//!          │  user_data / meta_data / vendor_data     (userdata.rs)
//!          ▼
//!  build_seed(spec, out, tool) ──▶ seed.iso, label `cidata`
//!          genisoimage | mkisofs | xorriso            (iso.rs)
//!          or the pure-Rust writer                    (iso9660.rs)
//! ```
//!
//! The seed holds `user-data`, `meta-data`, optionally `network-config`,
//! and, when the user brings raw user-data and vmctl has a host key, a
//! `vendor-data` that installs the host key, so it stays pinned either way.
//! It carries the VM's private host key, so it is written with mode 0600.

mod atomic;
pub mod iso;
pub mod iso9660;
pub mod keys;
pub mod userdata;

use std::io;
use std::path::{Path, PathBuf};

pub use iso::{LABEL, SeedTool, UnknownSeedTool, find_in_path};
pub use iso9660::{IsoError, IsoImage};
pub use keys::{KeyError, KeyPair, VmKeys, ensure_keypair, ensure_vm_keys, known_hosts_line};
pub use userdata::{meta_data, user_data, vendor_data};

/// Diagnostic code of seed errors.
pub const ISO_FAILED: &str = "vmctl::cloudinit::iso_failed";
/// Diagnostic code of an invalid [`SeedSpec`].
pub const INVALID_SEED: &str = "vmctl::cloudinit::invalid";

/// What goes into a VM's NoCloud seed.
#[derive(Clone, Default)]
pub struct SeedSpec {
    /// cloud-init's instance id. It must change when the VM is recreated
    /// (e.g. the VM's name and uid), so cloud-init runs its
    /// once-per-instance modules on the new disk.
    pub instance_id: String,
    /// The guest's hostname (RFC 1123).
    pub hostname: String,
    /// The login user created by the generated user-data.
    pub user: String,
    /// `authorized_keys` lines for `user`.
    pub authorized_keys: Vec<String>,
    /// The VM's SSH host key, pinned by vmctl.
    pub host_key: Option<HostKey>,
    /// The user's own user-data, passed through untouched instead of the
    /// generated one.
    pub raw_user_data: Option<Vec<u8>>,
    /// A `network-config` (v1 or v2 YAML), passed through.
    pub network_config: Option<String>,
    /// Shell command lines for cloud-init's `bootcmd` (run at every boot,
    /// early): the mounts of the shared folders. In the generated
    /// user-data; with the user's own user-data, in the vendor-data.
    pub bootcmd: Vec<String>,
}

impl std::fmt::Debug for SeedSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeedSpec")
            .field("instance_id", &self.instance_id)
            .field("hostname", &self.hostname)
            .field("user", &self.user)
            .field("authorized_keys", &self.authorized_keys)
            .field("host_key", &self.host_key)
            .field("raw_user_data", &self.raw_user_data.as_ref().map(Vec::len))
            .field("network_config", &self.network_config.is_some())
            .field("bootcmd", &self.bootcmd)
            .finish()
    }
}

/// An SSH host keypair in OpenSSH format, for cloud-init's `ssh_keys`.
#[derive(Clone, PartialEq, Eq)]
pub struct HostKey {
    /// The private key (`-----BEGIN OPENSSH PRIVATE KEY-----` …).
    pub private_openssh: String,
    /// The public key line (`ssh-ed25519 AAAA… comment`).
    pub public_openssh: String,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey")
            .field("public_openssh", &self.public_openssh)
            .finish_non_exhaustive()
    }
}

/// Errors of building a seed.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// A field of the [`SeedSpec`] is unusable.
    #[error("Invalid {field} {value:?}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The requested ISO tool is not installed.
    #[error("{tool} is not installed")]
    ToolMissing {
        /// The tool.
        tool: SeedTool,
    },
    /// The ISO tool could not be started.
    #[error("Cannot run {tool}")]
    Spawn {
        /// The tool.
        tool: SeedTool,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The ISO tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed {
        /// The tool.
        tool: SeedTool,
        /// Its exit status.
        status: String,
        /// The end of its standard error.
        stderr: String,
    },
    /// The pure-Rust writer refused the files.
    #[error("Cannot lay out the seed image")]
    Image {
        /// Why.
        #[source]
        source: IsoError,
    },
    /// The seed, or a staging file, could not be written.
    #[error("Cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl SeedError {
    /// The diagnostic code, for miette.
    pub fn code(&self) -> &'static str {
        match self {
            SeedError::Invalid { .. } => INVALID_SEED,
            _ => ISO_FAILED,
        }
    }

    /// What the user can do about it.
    pub fn help(&self) -> Option<&'static str> {
        match self {
            SeedError::ToolMissing { .. } => Some(
                "install genisoimage or xorriso, or use the built-in writer (seed tool `auto` or `builtin`)",
            ),
            SeedError::ToolFailed { .. } | SeedError::Spawn { .. } => {
                Some("try the built-in writer (seed tool `builtin`)")
            }
            _ => None,
        }
    }
}

impl SeedSpec {
    /// Checks the fields that end up in the guest's configuration.
    pub fn validate(&self) -> Result<(), SeedError> {
        let invalid = |field, value: &str, reason| {
            Err(SeedError::Invalid {
                field,
                value: value.to_owned(),
                reason,
            })
        };
        let id = &self.instance_id;
        if id.is_empty() || id.len() > 255 || !id.chars().all(|c| c.is_ascii_graphic()) {
            return invalid(
                "instance id",
                id,
                "must be 1-255 printable ASCII characters without spaces",
            );
        }
        if !is_hostname(&self.hostname) {
            return invalid(
                "hostname",
                &self.hostname,
                "must be RFC 1123 labels of letters, digits and '-'",
            );
        }
        if self.raw_user_data.is_none() && !is_username(&self.user) {
            return invalid(
                "user",
                &self.user,
                "must match [a-z_][a-z0-9_-]* and be at most 32 characters",
            );
        }
        for key in &self.authorized_keys {
            if key.trim().is_empty() || key.trim().contains('\n') {
                return invalid("authorized key", key, "must be one non-empty line");
            }
        }
        Ok(())
    }

    /// The seed's files, in the order they go on the image.
    pub fn files(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut files = vec![
            (
                "user-data",
                self.raw_user_data
                    .clone()
                    .unwrap_or_else(|| user_data(self).into_bytes()),
            ),
            ("meta-data", meta_data(self).into_bytes()),
        ];
        if let Some(net) = &self.network_config {
            files.push(("network-config", net.clone().into_bytes()));
        }
        if self.raw_user_data.is_some() && (self.host_key.is_some() || !self.bootcmd.is_empty()) {
            files.push((
                "vendor-data",
                vendor_data(self.host_key.as_ref(), &self.bootcmd).into_bytes(),
            ));
        }
        files
    }
}

impl SeedSpec {
    /// A digest of the seed's files: equal digests, equal seeds.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for (name, data) in self.files() {
            h.update(name.as_bytes());
            h.update((data.len() as u64).to_le_bytes());
            h.update(&data);
        }
        hex::encode(h.finalize())
    }
}

/// Builds the seed for `spec` at `out` (atomically, mode 0600) with
/// `tool`, and returns the tool used ([`SeedTool::Auto`] resolved).
pub fn build_seed(spec: &SeedSpec, out: &Path, tool: SeedTool) -> Result<SeedTool, SeedError> {
    spec.validate()?;
    let files = spec.files();
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (*n, d.as_slice())).collect();
    let used = iso::write_iso(&refs, out, tool)?;
    tracing::debug!(path = %out.display(), tool = %used, "built cloud-init seed");
    Ok(used)
}

fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn is_username(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(b'a'..=b'z' | b'_'))
        && s.len() <= 32
        && b.all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
}

#[cfg(test)]
mod tests;
