//! Shared folders (`spec.shares`): virtio-fs through `virtiofsd`, or 9p.
//!
//! ```text
//!   prepare: find virtiofsd ──▶ SharePlan per share (tag, type) ──▶ vm.json
//!                                        │                     └──▶ seed: bootcmd mounts
//!   start:   check host dirs; per virtio-fs share spawn virtiofsd
//!            (socket <sock dir>/fsN.sock), wait for its socket; then QEMU
//!            (-chardev socket + vhost-user-fs-pci; guest RAM a shared memfd)
//! ```
//!
//! Which transport is used:
//!
//! * **virtio-fs** whenever a usable `virtiofsd` is found (`VMCTL_VIRTIOFSD`,
//!   then `virtiofsd` in `PATH`, `/usr/libexec/virtiofsd`,
//!   `/usr/lib/qemu/virtiofsd`). It is faster than 9p and it is the only
//!   one Debian's cloud kernel (`linux-image-cloud-amd64`, used by Debian's
//!   genericcloud images) has: that kernel is built without 9p. QEMU needs
//!   the guest RAM shared with virtiofsd: `-object
//!   memory-backend-memfd,…,share=on` and `-machine memory-backend=` (QEMU
//!   docs, "virtio-fs" in docs/system/devices/vhost-user.rst). The Rust
//!   virtiofsd (`--shared-dir`) is used as is; QEMU's older C one
//!   (`-o source=`, Debian bookworm's `/usr/lib/qemu/virtiofsd`) sets up
//!   its namespace sandbox as root only, so it is used only when the
//!   agent runs as root.
//! * **9p** (`-virtfs local,…,security_model=none`) when there is none,
//!   or `VMCTL_VIRTIOFSD=none`. The guest kernel needs 9p and 9pnet_virtio.
//!
//! Read-only shares are mounted `-o ro` in the guest either way. The host
//! enforces it too with 9p (`readonly=on`) and with a Rust virtiofsd that
//! has `--readonly`; QEMU's C virtiofsd has no such option, so there the
//! guest's read-only mount is what keeps it read-only (guest root could
//! remount it read-write).
//!
//! Each virtiofsd serves one QEMU: it exits when QEMU disconnects (QEMU
//! ended), so it never outlives it, and like QEMU it is in its own process
//! group and outlives an agent restart (the adopted QEMU keeps its shares).
//! One that never got its QEMU (a failed start) is killed by the agent.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmctl_api::{Share, ShareRuntime, ShareType};

use super::Layout;
use super::process;

/// Environment variable naming the virtiofsd to use, or `none` for 9p.
pub const VIRTIOFSD_ENV: &str = "VMCTL_VIRTIOFSD";

/// Where virtiofsd is looked for after `PATH`.
const VIRTIOFSD_PATHS: &[&str] = &["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"];

/// How long a virtiofsd may take to create its socket.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

/// A virtiofsd program and its command-line dialect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Virtiofsd {
    /// The program.
    pub path: PathBuf,
    /// The Rust virtiofsd (`--shared-dir`); else QEMU's C one (`-o source=`).
    pub rust: bool,
    /// It has `--readonly` (Rust virtiofsd 1.11 and later).
    pub readonly: bool,
}

/// How one share is served, as saved in `vm.json` at prepare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SharePlan {
    /// The host directory.
    pub host_path: String,
    /// The guest mount path.
    pub mount_path: String,
    /// Read-only.
    #[serde(default)]
    pub read_only: bool,
    /// The transport.
    #[serde(rename = "type")]
    pub type_: ShareType,
    /// The mount tag (`vmctl-share<N>`; at most 31 bytes, 9p's limit).
    pub tag: String,
}

impl SharePlan {
    /// What status reports of it.
    pub fn runtime(&self) -> ShareRuntime {
        ShareRuntime {
            mount_path: self.mount_path.clone(),
            host_path: self.host_path.clone(),
            type_: self.type_,
            read_only: self.read_only,
            tag: self.tag.clone(),
        }
    }

    /// The guest's mount command line (`sh` syntax, paths quoted), run
    /// from cloud-init's `bootcmd` at every boot.
    pub fn mount_command(&self) -> String {
        let mut opts = match self.type_ {
            ShareType::Virtiofs => Vec::new(),
            ShareType::NineP => vec!["trans=virtio", "version=9p2000.L", "msize=262144"],
        };
        if self.read_only {
            opts.push("ro");
        }
        let opts = if opts.is_empty() {
            String::new()
        } else {
            format!(" -o {}", opts.join(","))
        };
        let dir = sh_quote(&self.mount_path);
        format!(
            "mkdir -p {dir} && mount -t {}{opts} {} {dir}",
            self.type_.as_str(),
            self.tag
        )
    }
}

/// `s` single-quoted for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The plans of `shares`: virtio-fs when `virtiofsd` is usable, else 9p.
pub fn plan(shares: &[Share], virtiofsd: Option<&Virtiofsd>) -> Vec<SharePlan> {
    shares
        .iter()
        .enumerate()
        .map(|(i, s)| SharePlan {
            host_path: s.host_path.clone(),
            mount_path: s.mount_path.clone(),
            read_only: s.read_only,
            type_: if virtiofsd.is_some() {
                ShareType::Virtiofs
            } else {
                ShareType::NineP
            },
            tag: format!("vmctl-share{i}"),
        })
        .collect()
}

/// The virtiofsd this agent can use, if any (see the module docs).
pub fn find_virtiofsd() -> Option<Virtiofsd> {
    let env = std::env::var_os(VIRTIOFSD_ENV).filter(|v| !v.is_empty());
    let candidates: Vec<PathBuf> = match env {
        Some(v) if v == "none" => return None,
        Some(v) => vec![PathBuf::from(v)],
        None => std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("virtiofsd"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
            .into_iter()
            .chain(VIRTIOFSD_PATHS.iter().map(PathBuf::from))
            .collect(),
    };
    let path = candidates.into_iter().find(|p| is_executable(p))?;
    let help = Command::new(&path)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&help.stdout),
        String::from_utf8_lossy(&help.stderr)
    );
    let rust = text.contains("--shared-dir");
    if !rust && !nix::unistd::geteuid().is_root() {
        tracing::info!(path = %path.display(), "QEMU's C virtiofsd needs root: shares use 9p");
        return None;
    }
    Some(Virtiofsd {
        readonly: rust && text.contains("--readonly"),
        path,
        rust,
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The vhost-user socket of virtio-fs share `i`.
pub fn socket(sock_dir: &Path, i: usize) -> PathBuf {
    sock_dir.join(format!("fs{i}.sock"))
}

fn pidfile(l: &Layout, i: usize) -> PathBuf {
    l.root.join(format!("virtiofsd-{i}.pid"))
}

/// virtiofsd's command line for share `p` on `sock`.
pub fn virtiofsd_args(v: &Virtiofsd, p: &SharePlan, sock: &Path) -> Vec<String> {
    let mut a = vec![format!("--socket-path={}", sock.display())];
    if v.rust {
        a.push(format!("--shared-dir={}", p.host_path));
        a.push("--cache=auto".to_owned());
        if p.read_only && v.readonly {
            a.push("--readonly".to_owned());
        }
        if !nix::unistd::geteuid().is_root() {
            // Unprivileged: no namespace sandbox to set up.
            a.push("--sandbox=none".to_owned());
        }
    } else {
        // FUSE option syntax: a comma in the path is escaped.
        a.push("-o".to_owned());
        a.push(format!("source={}", p.host_path.replace(',', "\\,")));
        a.push("-o".to_owned());
        a.push("cache=auto".to_owned());
    }
    a
}

/// Why a share cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// The host folder is gone or no directory.
    #[error("{0}")]
    HostPath(String),
    /// virtiofsd could not be run or did not come up.
    #[error("virtiofsd for {host_path} did not start: {reason}")]
    Virtiofsd {
        /// The host folder.
        host_path: String,
        /// What happened, with the end of its log.
        reason: String,
    },
}

/// Checks that every share's host folder is still a directory.
pub fn check_host_paths(plans: &[SharePlan]) -> Result<(), ShareError> {
    for p in plans {
        vmctl_api::validate::check_share_dir(Path::new(&p.host_path))
            .map_err(|m| ShareError::HostPath(format!("{m} (spec.shares, {})", p.mount_path)))?;
    }
    Ok(())
}

/// Starts a virtiofsd for each virtio-fs share of `plans`, sockets in
/// `l.sock_dir`, and waits for their sockets. A virtiofsd left by an
/// earlier start is ended first. On error, the ones started are killed.
pub async fn start_virtiofsd(
    v: Option<&Virtiofsd>,
    plans: &[SharePlan],
    l: &Layout,
) -> Result<(), ShareError> {
    stop_virtiofsd(l, plans.len()).await;
    for (i, p) in plans.iter().enumerate() {
        if p.type_ != ShareType::Virtiofs {
            continue;
        }
        let fail = |reason: String| ShareError::Virtiofsd {
            host_path: p.host_path.clone(),
            reason,
        };
        let Some(v) = v else {
            stop_virtiofsd(l, plans.len()).await;
            return Err(fail(
                "no virtiofsd is installed any more (prepare found one): apply again to use 9p"
                    .to_owned(),
            ));
        };
        let sock = socket(&l.sock_dir, i);
        let _ = std::fs::remove_file(&sock);
        let log_path = l.root.join(format!("virtiofsd-{i}.log"));
        let started = spawn(v, p, &sock, &log_path);
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                stop_virtiofsd(l, plans.len()).await;
                return Err(fail(format!("cannot run {}: {e}", v.path.display())));
            }
        };
        let _ = std::fs::write(pidfile(l, i), pid.to_string());
        let deadline = tokio::time::Instant::now() + SOCKET_WAIT;
        while !sock.exists() {
            if !process::is_alive(pid) || tokio::time::Instant::now() >= deadline {
                stop_virtiofsd(l, plans.len()).await;
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                return Err(fail(format!(
                    "no socket {} ({})",
                    sock.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

fn spawn(v: &Virtiofsd, p: &SharePlan, sock: &Path, log: &Path) -> std::io::Result<u32> {
    let mut cmd = Command::new(&v.path);
    cmd.args(virtiofsd_args(v, p, sock));
    // Like QEMU: it outlives the agent.
    process::spawn_detached(cmd, log, "virtiofsd-reaper")
}

/// Ends the virtiofsd processes of the first `n` shares recorded in the
/// work dir that still run (and are virtiofsd: a recycled pid is left
/// alone).
pub async fn stop_virtiofsd(l: &Layout, n: usize) {
    for i in 0..n {
        let file = pidfile(l, i);
        let Some(pid) = process::read_pidfile(&file) else {
            continue;
        };
        let ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            let sock = format!("--socket-path={}", socket(&l.sock_dir, i).display());
            c.split(|b| *b == 0).any(|a| a == sock.as_bytes())
        });
        if ours && process::is_alive(pid) {
            let _ = process::kill(pid, process::Signal::SIGTERM);
            if !process::wait_gone(pid, Duration::from_secs(2)).await {
                let _ = process::kill(pid, process::Signal::SIGKILL);
            }
        }
        let _ = std::fs::remove_file(file);
    }
}

/// QEMU arguments of `plans`: the shared memory backend (when any share
/// is virtio-fs) and one device per share. Empty without shares, so the
/// argv of a VM without shares is unchanged.
pub fn qemu_args(plans: &[SharePlan], sock_dir: &Path, memory_mib: u64) -> Vec<String> {
    let esc = |s: &str| s.replace(',', ",,");
    let mut a = Vec::new();
    if plans.iter().any(|p| p.type_ == ShareType::Virtiofs) {
        a.push("-object".to_owned());
        a.push(format!(
            "memory-backend-memfd,id=mem0,size={memory_mib}M,share=on"
        ));
    }
    for (i, p) in plans.iter().enumerate() {
        match p.type_ {
            ShareType::Virtiofs => {
                a.push("-chardev".to_owned());
                a.push(format!(
                    "socket,id=fs{i},path={}",
                    esc(&socket(sock_dir, i).display().to_string())
                ));
                a.push("-device".to_owned());
                a.push(format!("vhost-user-fs-pci,chardev=fs{i},tag={}", p.tag));
            }
            ShareType::NineP => {
                a.push("-virtfs".to_owned());
                a.push(format!(
                    "local,id=fs{i},path={},mount_tag={},security_model=none{}",
                    esc(&p.host_path),
                    p.tag,
                    if p.read_only { ",readonly=on" } else { "" }
                ));
            }
        }
    }
    a
}

/// Whether the machine needs `memory-backend=mem0` (a virtio-fs share).
pub fn needs_shared_memory(plans: &[SharePlan]) -> bool {
    plans.iter().any(|p| p.type_ == ShareType::Virtiofs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(host: &str, mount: &str, ro: bool) -> Share {
        Share {
            host_path: host.into(),
            mount_path: mount.into(),
            read_only: ro,
        }
    }

    fn c_virtiofsd() -> Virtiofsd {
        Virtiofsd {
            path: "/usr/lib/qemu/virtiofsd".into(),
            rust: false,
            readonly: false,
        }
    }

    #[test]
    fn virtiofs_when_virtiofsd_is_there_else_9p() {
        let s = [
            share("/h/src", "/src", false),
            share("/h/doc", "/doc", true),
        ];
        let v = plan(&s, Some(&c_virtiofsd()));
        assert!(v.iter().all(|p| p.type_ == ShareType::Virtiofs));
        assert_eq!(v[1].tag, "vmctl-share1");
        let n = plan(&s, None);
        assert!(n.iter().all(|p| p.type_ == ShareType::NineP));
    }

    #[test]
    fn guest_mount_commands_quote_the_path_and_say_ro() {
        let v = plan(&[share("/h", "/my src/it's", true)], Some(&c_virtiofsd()));
        assert_eq!(
            v[0].mount_command(),
            r"mkdir -p '/my src/it'\''s' && mount -t virtiofs -o ro vmctl-share0 '/my src/it'\''s'"
        );
        let n = plan(&[share("/h", "/src", false)], None);
        assert_eq!(
            n[0].mount_command(),
            "mkdir -p '/src' && mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 vmctl-share0 '/src'"
        );
    }

    #[test]
    fn qemu_args_share_memory_only_for_virtiofs() {
        let sock = Path::new("/run/vm");
        let s = [share("/h/a,b", "/a", false), share("/h/ro", "/ro", true)];
        let v = qemu_args(&plan(&s, Some(&c_virtiofsd())), sock, 1024);
        assert_eq!(
            v,
            [
                "-object",
                "memory-backend-memfd,id=mem0,size=1024M,share=on",
                "-chardev",
                "socket,id=fs0,path=/run/vm/fs0.sock",
                "-device",
                "vhost-user-fs-pci,chardev=fs0,tag=vmctl-share0",
                "-chardev",
                "socket,id=fs1,path=/run/vm/fs1.sock",
                "-device",
                "vhost-user-fs-pci,chardev=fs1,tag=vmctl-share1",
            ]
        );
        let n = qemu_args(&plan(&s, None), sock, 1024);
        assert_eq!(
            n,
            [
                "-virtfs",
                "local,id=fs0,path=/h/a,,b,mount_tag=vmctl-share0,security_model=none",
                "-virtfs",
                "local,id=fs1,path=/h/ro,mount_tag=vmctl-share1,security_model=none,readonly=on",
            ]
        );
        assert!(qemu_args(&[], sock, 1024).is_empty());
    }

    #[test]
    fn virtiofsd_dialects() {
        let p = &plan(&[share("/h/a,b", "/a", true)], Some(&c_virtiofsd()))[0];
        let sock = Path::new("/run/fs0.sock");
        assert_eq!(
            virtiofsd_args(&c_virtiofsd(), p, sock),
            [
                "--socket-path=/run/fs0.sock",
                "-o",
                r"source=/h/a\,b",
                "-o",
                "cache=auto"
            ]
        );
        let rust = Virtiofsd {
            path: "/usr/libexec/virtiofsd".into(),
            rust: true,
            readonly: true,
        };
        let a = virtiofsd_args(&rust, p, sock);
        assert!(a.contains(&"--shared-dir=/h/a,b".to_owned()));
        assert!(a.contains(&"--readonly".to_owned()));
    }
}
