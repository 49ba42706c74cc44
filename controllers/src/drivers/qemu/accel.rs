//! Choosing the accelerator: KVM where it really runs guests, TCG otherwise.
//!
//! `/dev/kvm` opening is not enough: under nested virtualisation it can
//! open while guests crawl or hang. So detection boots a real payload (a
//! 1 MiB disk whose boot sector writes to `isa-debug-exit`) through
//! SeaBIOS with KVM and trusts KVM only if QEMU exits with the payload's
//! code within [`PROBE_TIMEOUT`]. With working KVM this takes ~0.2 s; on
//! the nested host this was written on it took 5.3 s (TCG: 0.16 s). The
//! answer is cached in the data dir per boot (`/proc/sys/kernel/random/boot_id`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::Command;

/// The environment variable that overrides the accelerator.
pub const ACCEL_ENV: &str = "VMCTL_ACCEL";

/// How long the KVM probe may take before KVM is declared unusable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `isa-debug-exit` turns the byte written into exit code `(v << 1) | 1`.
const PROBE_EXIT_CODE: i32 = 3;

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's emulator.
    Tcg,
}

impl Accel {
    /// The `-cpu` model that goes with the accelerator.
    pub fn cpu_model(self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Errors of accelerator selection.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    /// The override is not `kvm`, `tcg` or `auto`.
    #[error("Unknown accelerator {0:?}: expected kvm, tcg or auto")]
    Unknown(String),
}

impl FromStr for Accel {
    type Err = AccelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(AccelError::Unknown(s.to_owned())),
        }
    }
}

/// Parses an override: `kvm`/`tcg` fix the accelerator, `auto` or empty
/// leave it to detection.
pub fn parse_override(s: &str) -> Result<Option<Accel>, AccelError> {
    match s.trim() {
        "" => Ok(None),
        a if a.eq_ignore_ascii_case("auto") => Ok(None),
        a => a.parse().map(Some),
    }
}

/// The accelerator forced by the environment (first) or the config, if any.
pub fn resolve_override(
    env: Option<&str>,
    config: Option<Accel>,
) -> Result<Option<Accel>, AccelError> {
    match env.map(parse_override).transpose()?.flatten() {
        Some(a) => Ok(Some(a)),
        None => Ok(config),
    }
}

/// Detects the accelerator: TCG unless `/dev/kvm` opens read-write and the
/// probe boots under KVM in time. The result is cached in `data_dir`.
pub async fn detect(data_dir: &Path, qemu: &Path) -> Accel {
    let cache = data_dir.join("accel-probe.json");
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_owned();
    if let Some(a) = read_cache(&cache, &boot_id) {
        return a;
    }
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let accel = if kvm_opens && probe(data_dir, qemu, Accel::Kvm).await {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    tracing::info!(%accel, kvm_opens, "detected accelerator");
    let doc = serde_json::json!({ "boot_id": boot_id, "accel": accel });
    let _ = std::fs::write(&cache, doc.to_string());
    accel
}

fn read_cache(path: &Path, boot_id: &str) -> Option<Accel> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    if boot_id.is_empty() || v.get("boot_id")?.as_str()? != boot_id {
        return None;
    }
    serde_json::from_value(v.get("accel")?.clone()).ok()
}

/// The probe disk: a boot sector doing `mov al,1; out 0xf4,al; hlt`,
/// padded to 1 MiB (SeaBIOS ignores a 512-byte virtio disk).
fn probe_disk() -> Vec<u8> {
    let mut disk = vec![0u8; 1 << 20];
    disk[..5].copy_from_slice(&[0xb0, 0x01, 0xe6, 0xf4, 0xf4]);
    disk[510] = 0x55;
    disk[511] = 0xaa;
    disk
}

/// Boots the probe under `accel`; true if it exits with the payload's code
/// within [`PROBE_TIMEOUT`].
pub async fn probe(dir: &Path, qemu: &Path, accel: Accel) -> bool {
    let disk: PathBuf = dir.join(format!("accel-probe-{}.img", std::process::id()));
    if std::fs::create_dir_all(dir).is_err() || std::fs::write(&disk, probe_disk()).is_err() {
        return false;
    }
    let child = Command::new(qemu)
        .args(["-machine", "q35", "-accel", &accel.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args([
            "-m",
            "32",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,readonly=on",
            disk.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let ok = match child {
        Ok(mut child) => match tokio::time::timeout(PROBE_TIMEOUT, child.wait()).await {
            Ok(Ok(st)) => st.code() == Some(PROBE_EXIT_CODE),
            _ => {
                let _ = child.kill().await;
                false
            }
        },
        Err(_) => false,
    };
    let _ = std::fs::remove_file(&disk);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_override_wins_over_config() {
        assert_eq!(
            resolve_override(Some("tcg"), Some(Accel::Kvm)).unwrap(),
            Some(Accel::Tcg)
        );
        assert_eq!(
            resolve_override(Some(" KVM "), None).unwrap(),
            Some(Accel::Kvm)
        );
    }

    #[test]
    fn auto_or_empty_env_falls_back_to_config() {
        assert_eq!(
            resolve_override(Some("auto"), Some(Accel::Kvm)).unwrap(),
            Some(Accel::Kvm)
        );
        assert_eq!(resolve_override(Some(""), None).unwrap(), None);
        assert_eq!(
            resolve_override(None, Some(Accel::Tcg)).unwrap(),
            Some(Accel::Tcg)
        );
    }

    #[test]
    fn unknown_accelerator_is_refused() {
        let err = resolve_override(Some("hvf"), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Unknown accelerator \"hvf\": expected kvm, tcg or auto"
        );
    }

    #[test]
    fn cpu_model_follows_accelerator() {
        assert_eq!(Accel::Kvm.cpu_model(), "host");
        assert_eq!(Accel::Tcg.cpu_model(), "max");
    }

    #[tokio::test]
    async fn detection_is_cached_per_boot() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = Path::new("qemu-system-x86_64");
        let t = std::time::Instant::now();
        let first = detect(dir.path(), qemu).await;
        eprintln!("detected {first} in {:?}", t.elapsed());
        assert!(t.elapsed() < PROBE_TIMEOUT + Duration::from_secs(3));
        assert!(dir.path().join("accel-probe.json").exists());
        assert_eq!(detect(dir.path(), qemu).await, first);
    }

    #[tokio::test]
    async fn probe_payload_exits_under_tcg() {
        let dir = tempfile::tempdir().unwrap();
        assert!(probe(dir.path(), Path::new("qemu-system-x86_64"), Accel::Tcg).await);
    }
}
