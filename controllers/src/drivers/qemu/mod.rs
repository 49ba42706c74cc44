//! The QEMU hypervisor driver (Linux).
//!
//! One work dir per VM, `<data_dir>/vms/<name>/` (mode 0700):
//!
//! ```text
//!   disk.qcow2      overlay on the cached base image        (disk.rs)
//!   seed.iso        cloud-init NoCloud seed                  (crate::seed)
//!   id_ed25519*     key vmctl logs in with; host_ed25519* the pinned host key
//!   vm.json         what prepare saw of the spec; start builds the argv from it
//!   ssh-port        forwarded host port, reused across restarts while free
//!   qmp.sock        QMP                                      (qmp.rs)
//!   qmp-events.sock a second QMP monitor, for events
//!   serial.sock     serial console; console.log its transcript
//!                   (the three sockets are symlinks to a short private
//!                   directory when their paths would not fit sun_path;
//!                   layout.rs)
//!   qemu.pid        written by QEMU; qemu.log its stderr
//!   exit.status     how the last QEMU ended                  (process.rs)
//!   stop.requested  present when vmctl asked it to end
//!   virtiofsd-N.pid virtiofsd of shared folder N; virtiofsd-N.log its
//!                   output; its socket fsN.sock is with QEMU's (shares.rs)
//! ```
//!
//! Lifecycle, as QMP sees it:
//!
//! ```text
//!            prepare            start (spawn, wait for QMP)
//!   (none) ──────────▶ Stopped ─────────────────────────────▶ Running
//!                        ▲  ▲     stop: system_powerdown,         │  ▲
//!                        │  └──── then SIGTERM, SIGKILL  ────────┘  │ cont
//!                        │  QEMU died (exit.status)          stop    │
//!                        └──────────────────────────────── Suspended ◀┘
//! ```
//!
//! QEMU runs under a supervisor that outlives the agent, so a restarted
//! agent adopts it: the pidfile names a live process whose command line
//! carries this VM's QMP socket, and QMP answers. Nothing keeps per-VM
//! state in memory except locks; every call observes the host first.

pub mod accel;
pub mod args;
pub mod disk;
mod error;
pub mod hotplug;
mod layout;
mod ports;
pub mod process;
pub mod qmp;
pub mod shares;
pub mod snapshot;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmctl_api::{
    DiskRuntime, Display, Network, PortForward, ROOT_DISK, VmRuntime, default_ssh_user,
};

pub use self::error::{QMP_COMMAND_FAILED, QMP_CONNECT_FAILED, QemuError, SPAWN_FAILED};
pub use self::layout::{Layout, SOCKET_PATH_MAX};

use self::accel::{Accel, AccelError};
use self::args::{LaunchPlan, qemu_args};
use self::error::io_err;
use self::process::Exit;
use self::qmp::Qmp;
use super::{
    BoxFuture, DriverError, Hypervisor, InstanceSpec, InstanceState, InstanceStatus, Result,
    SnapshotInfo,
};
use crate::seed::{SeedSpec, SeedTool, build_seed, ensure_vm_keys};

/// Settings of the QEMU driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuConfig {
    /// vmctl's data dir; work dirs are `<data_dir>/vms/<name>`.
    pub data_dir: PathBuf,
    /// The emulator.
    pub qemu_binary: PathBuf,
    /// A fixed accelerator; `None` detects one.
    pub accel: Option<Accel>,
    /// What writes the seed ISO.
    pub seed_tool: SeedTool,
    /// How long a started QEMU may take to answer QMP.
    pub start_timeout: Duration,
    /// How long one QMP command may take.
    pub qmp_timeout: Duration,
    /// How long QEMU has after SIGTERM before SIGKILL.
    pub kill_grace: Duration,
    /// How long a disk hot-unplug waits for the guest to release the disk
    /// ([`hotplug::UNPLUG_TIMEOUT`] by default).
    pub unplug_timeout: Duration,
    /// How long `stop` and `destroy` wait for another operation on the
    /// same VM before ending QEMU regardless (10 s by default).
    pub lock_wait: Duration,
}

impl QemuConfig {
    /// Defaults for `data_dir`: `qemu-system-x86_64` from `PATH`, detected
    /// accelerator.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        QemuConfig {
            data_dir: data_dir.into(),
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            accel: None,
            seed_tool: SeedTool::Auto,
            start_timeout: Duration::from_secs(30),
            qmp_timeout: Duration::from_secs(10),
            kill_grace: Duration::from_secs(5),
            unplug_timeout: hotplug::UNPLUG_TIMEOUT,
            lock_wait: Duration::from_secs(10),
        }
    }

    /// Applies `VMCTL_ACCEL` (`kvm`, `tcg`, `auto`), which wins over the
    /// config's accelerator.
    pub fn with_env_overrides(mut self) -> Result<Self, AccelError> {
        let env = std::env::var(accel::ACCEL_ENV).ok();
        self.accel = accel::resolve_override(env.as_deref(), self.accel)?;
        Ok(self)
    }
}

/// What `prepare` saved of the spec: the part `start` needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmConfig {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Networking.
    pub network: Network,
    /// The NIC's MAC, derived from the VM's uid when first prepared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Names of the extra disks attached at start, in order
    /// (`disk-<name>.qcow2` in the work dir, serial `<name>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<String>,
    /// The graphics console.
    #[serde(default, skip_serializing_if = "Display::is_none")]
    pub display: Display,
    /// The shared folders and how each is served (decided at prepare,
    /// when the seed that mounts them is built).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<shares::SharePlan>,
}

impl VmConfig {
    fn mac(&self, name: &str) -> String {
        self.mac.clone().unwrap_or_else(|| args::mac_for(name))
    }
}

/// How the last QEMU of a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastExit {
    /// Its exit code or signal.
    pub exit: Exit,
    /// Whether vmctl asked it to end (stop, destroy); if not, it died or
    /// the guest powered off by itself.
    pub requested: bool,
}

/// The QEMU driver.
#[derive(Debug)]
pub struct QemuDriver {
    config: QemuConfig,
    accel: tokio::sync::OnceCell<Accel>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Names of VMs whose QEMU reported an event or ended.
    changes: tokio::sync::broadcast::Sender<String>,
    /// The QEMU pid whose events monitor this driver holds (or tried), per VM.
    watched: Arc<Mutex<HashMap<String, u32>>>,
    /// Per VM started by this driver: its QEMU's pid, and whether the
    /// guest has brought its NIC up since (QMP event
    /// `NIC_RX_FILTER_CHANGED`, emitted when the guest first changes the
    /// NIC's receive filter, as it does bringing the interface up: QEMU's
    /// qapi/net.json). See [`Hypervisor::guest_network_up`].
    nic_up: Arc<Mutex<HashMap<String, (u32, bool)>>>,
}

/// The QMP event that says the guest brought its NIC up (see
/// [`QemuDriver::nic_up`]).
const NIC_EVENT: &str = "NIC_RX_FILTER_CHANGED";

/// QMP events that change what `status` reports.
const STATE_EVENTS: &[&str] = &[
    "SHUTDOWN",
    "POWERDOWN",
    "RESET",
    "STOP",
    "RESUME",
    "SUSPEND",
    "WAKEUP",
    "GUEST_PANICKED",
    "BLOCK_IO_ERROR",
];

impl QemuDriver {
    /// A driver keeping its VMs under `config.data_dir`. A relative data
    /// dir or emulator path is made absolute here: QEMU runs in the VM's
    /// work dir, where a relative path would name another file.
    pub fn new(mut config: QemuConfig) -> Self {
        config.data_dir = std::path::absolute(&config.data_dir).unwrap_or(config.data_dir);
        if config.qemu_binary.components().count() > 1 {
            config.qemu_binary =
                std::path::absolute(&config.qemu_binary).unwrap_or(config.qemu_binary);
        }
        QemuDriver {
            config,
            accel: tokio::sync::OnceCell::new(),
            locks: Mutex::new(HashMap::new()),
            changes: tokio::sync::broadcast::channel(1024).0,
            watched: Arc::new(Mutex::new(HashMap::new())),
            nic_up: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Holds the events monitor of `name`'s running QEMU open (once per
    /// QEMU): each state event, and QEMU's end, is sent on `changes`, so
    /// the VM controller hears of a guest that powered off or a QEMU that
    /// died without polling. The monitor is connected before this returns,
    /// so no event after a start is missed. A QEMU without the monitor
    /// (started by an older vmctl) is left to the controller's slow resync.
    async fn watch_events(&self, name: &str, l: &Layout, pid: u32) {
        {
            let mut w = self.watched.lock().unwrap_or_else(|p| p.into_inner());
            if w.insert(name.to_owned(), pid) == Some(pid) {
                return;
            }
        }
        let mut q = match Qmp::connect(&l.events_sock(), self.config.qmp_timeout).await {
            Ok(q) => q,
            Err(e) => {
                // Not retried for this QEMU: its VM is polled instead.
                tracing::info!(vm = %name, error = %e, "no QMP events monitor; polling");
                return;
            }
        };
        let name = name.to_owned();
        let (tx, watched, nic_up) = (
            self.changes.clone(),
            self.watched.clone(),
            self.nic_up.clone(),
        );
        tokio::spawn(async move {
            tracing::debug!(vm = %name, "watching QMP events");
            loop {
                match q.next_event().await {
                    Ok(ev) => {
                        let kind = ev.get("event").and_then(serde_json::Value::as_str);
                        if kind == Some(NIC_EVENT) {
                            let mut n = nic_up.lock().unwrap_or_else(|p| p.into_inner());
                            if let Some((p, up)) = n.get_mut(&name)
                                && *p == pid
                                && !*up
                            {
                                *up = true;
                                tracing::debug!(vm = %name, "the guest brought its NIC up");
                                let _ = tx.send(name.clone());
                            }
                        }
                        if kind.is_some_and(|k| STATE_EVENTS.contains(&k)) {
                            tracing::info!(vm = %name, event = kind.unwrap_or("?"), "QMP event");
                            let _ = tx.send(name.clone());
                        } else {
                            tracing::debug!(vm = %name, event = kind.unwrap_or("?"), "QMP event");
                        }
                    }
                    Err(e) => {
                        tracing::debug!(vm = %name, error = %e, "QMP events ended");
                        break;
                    }
                }
            }
            {
                let mut w = watched.lock().unwrap_or_else(|p| p.into_inner());
                if w.get(&name) == Some(&pid) {
                    w.remove(&name);
                }
            }
            // The monitor closes when QEMU ends: look again.
            let _ = tx.send(name);
        });
    }

    /// The driver's settings.
    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// The work dir layout of VM `name`.
    pub fn layout(&self, name: &str) -> Layout {
        Layout::new(&self.config.data_dir.join("vms").join(name))
    }

    /// The accelerator VMs start with: the configured one, else detected
    /// once per driver (and cached per boot in the data dir).
    pub async fn accel(&self) -> Accel {
        if let Some(a) = self.config.accel {
            return a;
        }
        *self
            .accel
            .get_or_init(|| accel::detect(&self.config.data_dir, &self.config.qemu_binary))
            .await
    }

    /// How the last QEMU of `name` ended, if it ran and is gone.
    pub fn last_exit(&self, name: &str) -> Option<LastExit> {
        let l = self.layout(name);
        if process::running_pid(&l).is_some() {
            return None;
        }
        process::read_exit(&l).map(|exit| LastExit {
            exit,
            requested: l.stop_marker().exists(),
        })
    }

    /// The pid of the running QEMU of `name`.
    pub fn pid(&self, name: &str) -> Option<u32> {
        process::running_pid(&self.layout(name))
    }

    fn lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_owned()).or_default().clone()
    }

    /// The VM's lock for `stop` and `destroy`, waited for at most
    /// [`QemuConfig::lock_wait`]. `None` when another operation still holds
    /// it then (a snapshot job QEMU never finishes, a QMP call to a wedged
    /// QEMU): stop and destroy go ahead without it, since ending QEMU is
    /// what ends that operation too; a way out must never wait on it.
    async fn lock_to_end(&self, name: &str) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let lock = self.lock(name);
        match tokio::time::timeout(self.config.lock_wait, lock.lock_owned()).await {
            Ok(guard) => Some(guard),
            Err(_) => {
                tracing::warn!(
                    vm = name,
                    waited = ?self.config.lock_wait,
                    "another operation on this VM does not finish; ending QEMU without waiting for it"
                );
                None
            }
        }
    }

    async fn qmp(&self, name: &str, l: &Layout) -> Result<Qmp, QemuError> {
        Qmp::connect(&l.qmp_sock(), self.config.qmp_timeout)
            .await
            .map_err(|source| QemuError::QmpConnect {
                name: name.to_owned(),
                source,
            })
    }

    async fn command(&self, name: &str, l: &Layout, cmd: &str) -> Result<(), QemuError> {
        let mut q = self.qmp(name, l).await?;
        q.execute(cmd, None)
            .await
            .map(drop)
            .map_err(|source| QemuError::QmpCommand {
                name: name.to_owned(),
                source,
            })
    }

    async fn do_prepare(&self, spec: &InstanceSpec) -> Result<Option<InstanceStatus>, QemuError> {
        let name = &spec.name;
        let l = self.layout(name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&l.root)
            .map_err(io_err(format!("Cannot create {}", l.root.display())))?;
        let disk_err = |source| QemuError::Disk {
            name: name.clone(),
            source,
        };
        // The root disk on one side; the keys, the seed and what it needs
        // on the other, at once: two external tools (qemu-img,
        // genisoimage) that take a few tens of ms each, and key files
        // synced to disk, all of which the QEMU start waits for. The
        // disk goes first so that qemu-img runs while the keys are made.
        let root_disk_made = async {
            if process::running_pid(&l).is_some() && l.disk().exists() {
                // A running QEMU holds the image's lock: grow it through
                // QMP, and the guest sees the new size at once.
                let current = disk::virtual_size(&l.disk()).await.map_err(disk_err)?;
                let want = spec.spec.disk_gib.map(|g| g.saturating_mul(disk::GIB));
                if let Some(bytes) = disk::growth(current, want) {
                    self.block_resize(name, &l, ROOT_DISK, bytes).await?;
                }
            } else {
                disk::ensure_overlay(&spec.image, &l.disk(), spec.spec.disk_gib)
                    .await
                    .map_err(disk_err)?;
            }
            Ok::<(), QemuError>(())
        };
        let seed_made = async {
            let keys = ensure_vm_keys(&l.root, &format!("vmctl@{name}")).map_err(|source| {
                QemuError::Keys {
                    name: name.clone(),
                    source,
                }
            })?;
            let instance_id = match std::fs::read_to_string(l.instance_id_file()) {
                Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
                _ => {
                    let id = format!("{name}-{}", uuid::Uuid::new_v4().simple());
                    std::fs::write(l.instance_id_file(), &id)
                        .map_err(io_err("Cannot write the instance id"))?;
                    id
                }
            };
            // Shares: virtio-fs or 9p, decided now, as the seed mounts them.
            let share_plans = if process::running_pid(&l).is_some() {
                // The running QEMU serves the shares it started with; a
                // changed `spec.shares` waits for the restart (and its
                // seed with it).
                read_config(&l).map(|c| c.shares).unwrap_or_default()
            } else if spec.spec.shares.is_empty() {
                Vec::new()
            } else {
                let v = tokio::task::spawn_blocking(shares::find_virtiofsd)
                    .await
                    .map_err(|e| io_err("virtiofsd lookup panicked")(std::io::Error::other(e)))?;
                shares::plan(&spec.spec.shares, v.as_ref())
            };
            let mut seed = seed_spec(spec, instance_id, &keys)?;
            seed.bootcmd = share_plans
                .iter()
                .map(shares::SharePlan::mount_command)
                .collect();
            let seed_digest = seed.digest();
            let seed_current = std::fs::read_to_string(l.seed_digest_file())
                .is_ok_and(|d| d.trim() == seed_digest);
            // A changed cloud-init config gets a new seed at the next
            // start (same instance id: per-boot modules see it,
            // per-instance ones ran already). A running QEMU keeps the
            // one it has open.
            if !l.seed().exists() || (!seed_current && process::running_pid(&l).is_none()) {
                let (out, tool) = (l.seed(), self.config.seed_tool);
                tokio::task::spawn_blocking(move || build_seed(&seed, &out, tool))
                    .await
                    .map_err(|e| io_err("Seed builder panicked")(std::io::Error::other(e)))?
                    .map_err(|source| QemuError::Seed {
                        name: name.clone(),
                        source,
                    })?;
                std::fs::write(l.seed_digest_file(), &seed_digest)
                    .map_err(io_err("Cannot record the seed digest"))?;
            }
            Ok::<_, QemuError>(share_plans)
        };
        let (root_disk_made, seed_made) = tokio::join!(root_disk_made, seed_made);
        let share_plans = seed_made?;
        root_disk_made?;
        // Extra disks: made empty once, grown while QEMU is not running
        // (a running one is grown live through `resize_disk`). A disk left
        // out of the spec is detached at the next start; its file stays
        // until the VM is deleted.
        let running = process::running_pid(&l).is_some();
        for d in &spec.spec.disks {
            let bytes = d.size_gib.saturating_mul(disk::GIB);
            let path = disk_path(&l, &d.name);
            if !path.exists() {
                disk::create_blank(&path, bytes).await.map_err(disk_err)?;
            } else if !running {
                let current = disk::virtual_size(&path).await.map_err(disk_err)?;
                if let Some(b) = disk::growth(current, Some(bytes)) {
                    disk::grow_file(&path, b).await.map_err(disk_err)?;
                }
            }
        }
        if read_port(&l).is_none() {
            let port = free_port().map_err(io_err("Cannot find a free port"))?;
            write_port(&l, port)?;
        }
        let mac = read_config(&l)
            .and_then(|c| c.mac)
            .unwrap_or_else(|| args::mac_for(&spec.uid));
        let cfg = VmConfig {
            vcpus: spec.spec.vcpus,
            memory_mib: spec.spec.memory_mib,
            network: spec.spec.network.clone(),
            mac: Some(mac),
            disks: spec.spec.disks.iter().map(|d| d.name.clone()).collect(),
            display: spec.spec.display,
            shares: share_plans,
        };
        let json = serde_json::to_vec_pretty(&cfg).map_err(|e| io_err("")(e.into()))?;
        std::fs::write(l.config_file(), json).map_err(io_err("Cannot write vm.json"))?;
        self.observe(name, &l).await
    }

    /// Grows disk `disk` of the running QEMU of `name` to `bytes` with QMP
    /// `block_resize` (naming its BlockBackend or, for a disk attached with
    /// `-blockdev`, its node).
    async fn block_resize(
        &self,
        name: &str,
        l: &Layout,
        disk: &str,
        bytes: u64,
    ) -> Result<(), QemuError> {
        let mut q = self.qmp(name, l).await?;
        let qmp_err = |source| QemuError::QmpCommand {
            name: name.to_owned(),
            source,
        };
        let target = hotplug::query(&mut q)
            .await
            .map_err(qmp_err)?
            .into_iter()
            .find(|a| a.disk == disk)
            .map_or_else(
                || serde_json::json!({ "device": drive_id(disk) }),
                |a| a.block_target(),
            );
        let mut args = target;
        args["size"] = serde_json::json!(bytes);
        q.execute("block_resize", Some(args))
            .await
            .map(drop)
            .map_err(qmp_err)
    }

    /// Grows disk `disk` of `name` to `bytes`: live through QMP when QEMU
    /// runs (after checking that it is no shrink), else with `qemu-img`.
    async fn do_resize_disk(&self, name: &str, disk: &str, bytes: u64) -> Result<(), QemuError> {
        let l = self.layout(name);
        let path = disk_path(&l, disk);
        let disk_err = |source| QemuError::Disk {
            name: name.to_owned(),
            source,
        };
        if !path.exists() {
            return Err(QemuError::Io {
                context: format!("VM {name} has no disk {disk}"),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        if process::running_pid(&l).is_none() {
            return disk::grow_file(&path, bytes).await.map_err(disk_err);
        }
        let mut q = self.qmp(name, &l).await?;
        let current = disk_sizes(&mut q)
            .await
            .map_err(|source| QemuError::QmpCommand {
                name: name.to_owned(),
                source,
            })?
            .into_iter()
            .find(|(d, _)| d == disk)
            .map(|(_, size)| size);
        let Some(current) = current else {
            return Err(QemuError::Io {
                context: format!("the running QEMU of {name} has no disk {disk}"),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        };
        if bytes < current {
            return Err(disk_err(disk::DiskError::ShrinkRefused {
                requested_bytes: bytes,
                current_bytes: current,
            }));
        }
        drop(q);
        if bytes > current {
            self.block_resize(name, &l, disk, bytes).await?;
        }
        Ok(())
    }

    /// Attaches extra disk `disk` to the running QEMU of `name`
    /// ([`hotplug::attach`]) and records it in `vm.json`, so a stopped VM
    /// reports it and the next start attaches it.
    async fn do_attach_disk(
        &self,
        name: &str,
        disk: &vmctl_api::Disk,
    ) -> Result<DiskRuntime, QemuError> {
        let l = self.layout(name);
        let err = |source| QemuError::Hotplug {
            name: name.to_owned(),
            disk: disk.name.clone(),
            op: "attach",
            source: Box::new(source),
        };
        if process::running_pid(&l).is_none() {
            return Err(err(hotplug::HotplugError::NotRunning));
        }
        let path = disk_path(&l, &disk.name);
        let bytes = disk.size_gib.saturating_mul(disk::GIB);
        let mut q = self.qmp(name, &l).await?;
        hotplug::attach(&mut q, &disk.name, &path, bytes)
            .await
            .map_err(err)?;
        let size = hotplug::query(&mut q)
            .await
            .map_err(|e| err(e.into()))?
            .into_iter()
            .find(|a| a.disk == disk.name)
            .and_then(|a| a.size)
            .unwrap_or(bytes);
        self.record_disks(&l, |disks| {
            if !disks.contains(&disk.name) {
                disks.push(disk.name.clone());
            }
        })?;
        tracing::info!(vm = name, disk = %disk.name, "disk hot-plugged");
        Ok(DiskRuntime {
            name: disk.name.clone(),
            size_bytes: size,
            path: Some(path.display().to_string()),
        })
    }

    /// Detaches extra disk `disk` from the running QEMU of `name`
    /// ([`hotplug::detach`]) and drops it from `vm.json`; its file stays.
    async fn do_detach_disk(&self, name: &str, disk: &str) -> Result<(), QemuError> {
        let l = self.layout(name);
        let err = |source| QemuError::Hotplug {
            name: name.to_owned(),
            disk: disk.to_owned(),
            op: "detach",
            source: Box::new(source),
        };
        if process::running_pid(&l).is_none() {
            return Err(err(hotplug::HotplugError::NotRunning));
        }
        let mut q = self.qmp(name, &l).await?;
        let detached = hotplug::detach(&mut q, disk, self.config.unplug_timeout).await;
        if let Err(hotplug::HotplugError::UnplugTimeout { .. }) = &detached {
            // The device_del stays pending in QEMU until the guest acts
            // or QEMU ends: memory snapshots must not be loaded meanwhile.
            let mut pending = std::fs::read_to_string(l.unplug_pending()).unwrap_or_default();
            if !pending.lines().any(|d| d == disk) {
                pending.push_str(disk);
                pending.push('\n');
                let _ = std::fs::write(l.unplug_pending(), pending);
            }
        }
        detached.map_err(err)?;
        self.record_disks(&l, |disks| disks.retain(|d| d != disk))?;
        tracing::info!(vm = name, disk, "disk hot-unplugged");
        Ok(())
    }

    /// Changes the extra disks `vm.json` lists with `f`.
    fn record_disks(&self, l: &Layout, f: impl FnOnce(&mut Vec<String>)) -> Result<(), QemuError> {
        let Some(mut cfg) = read_config(l) else {
            return Ok(());
        };
        f(&mut cfg.disks);
        let json = serde_json::to_vec_pretty(&cfg).map_err(|e| io_err("")(e.into()))?;
        std::fs::write(l.config_file(), json).map_err(io_err("Cannot write vm.json"))
    }

    async fn do_start(&self, name: &str) -> Result<Option<InstanceStatus>, QemuError> {
        let l = self.layout(name);
        if process::running_pid(&l).is_some() {
            // Already running, maybe started by a previous agent: adopt it.
            return self.observe(name, &l).await;
        }
        let Some(cfg) = read_config(&l) else {
            return Ok(None);
        };
        let mut port = read_port(&l).unwrap_or(0);
        if matches!(cfg.network, Network::User) && !port_is_free(port) {
            port = free_port().map_err(io_err("Cannot find a free port"))?;
            write_port(&l, port)?;
        }
        // Where the sockets go now (this environment's runtime dir), not
        // where an earlier QEMU had them.
        let l = Layout::planned(&l.root);
        let accel = self.accel().await;
        let plan = LaunchPlan::new(
            name,
            &cfg.mac(name),
            &l,
            accel,
            cfg.vcpus,
            cfg.memory_mib,
            &cfg.network,
            port,
            l.seed().exists(),
        )
        .map_err(|source| QemuError::Plan {
            name: name.to_owned(),
            source,
        })?;
        let plan = LaunchPlan {
            disks: cfg.disks.clone(),
            vnc: cfg.display == Display::Vnc,
            shares: cfg.shares.clone(),
            ..plan
        };
        let share_err = |source| QemuError::Share {
            name: name.to_owned(),
            source,
        };
        shares::check_host_paths(&cfg.shares).map_err(share_err)?;
        let argv = qemu_args(&plan);
        for stale in [
            l.exit_file(),
            l.stop_marker(),
            l.pidfile(),
            l.unplug_pending(),
        ] {
            let _ = std::fs::remove_file(stale);
        }
        l.make_sock_dir().map_err(|e| QemuError::Spawn {
            name: name.to_owned(),
            reason: format!(
                "cannot make the socket directory {}: {e}",
                l.sock_dir.display()
            ),
        })?;
        if cfg
            .shares
            .iter()
            .any(|s| s.type_ == vmctl_api::ShareType::Virtiofs)
        {
            // QEMU connects to virtiofsd's socket as it starts.
            let v = tokio::task::spawn_blocking(shares::find_virtiofsd)
                .await
                .map_err(|e| io_err("virtiofsd lookup panicked")(std::io::Error::other(e)))?;
            shares::start_virtiofsd(v.as_ref(), &cfg.shares, &l)
                .await
                .map_err(share_err)?;
        }
        tracing::info!(vm = name, %accel, port, "starting QEMU");
        let started = self.spawn_and_wait(name, &argv, &l).await;
        if started.is_err() {
            // A virtiofsd whose QEMU never connected would wait forever.
            shares::stop_virtiofsd(&l, cfg.shares.len()).await;
        }
        started?;
        if let Some(pid) = process::running_pid(&l) {
            // Before the events monitor is connected (by observe): the
            // NIC comes up seconds into the boot, well after that.
            self.nic_up
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.to_owned(), (pid, false));
        }
        self.observe(name, &l).await
    }

    /// Spawns QEMU with `argv` and waits until QMP answers.
    async fn spawn_and_wait(
        &self,
        name: &str,
        argv: &[String],
        l: &Layout,
    ) -> Result<(), QemuError> {
        let l = l.clone();
        process::spawn_supervised(&self.config.qemu_binary, argv, &l).map_err(|e| {
            QemuError::Spawn {
                name: name.to_owned(),
                reason: format!("cannot run {}: {e}", self.config.qemu_binary.display()),
            }
        })?;
        let deadline = tokio::time::Instant::now() + self.config.start_timeout;
        loop {
            if let Some(exit) = process::read_exit(&l) {
                return Err(QemuError::Spawn {
                    name: name.to_owned(),
                    reason: format!("QEMU {exit}: {}", log_tail(&l.stderr_log())),
                });
            }
            if process::running_pid(&l).is_some()
                && Qmp::connect(&l.qmp_sock(), self.config.qmp_timeout)
                    .await
                    .is_ok()
            {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                if let Some(pid) = process::running_pid(&l) {
                    let _ = process::kill(pid, process::Signal::SIGKILL);
                }
                return Err(QemuError::Spawn {
                    name: name.to_owned(),
                    reason: format!(
                        "no QMP after {:?}: {}",
                        self.config.start_timeout,
                        log_tail(&l.stderr_log())
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    async fn do_stop(&self, name: &str, timeout: Duration) -> Result<(), QemuError> {
        let l = self.layout(name);
        let Some(pid) = process::running_pid(&l) else {
            return Ok(());
        };
        let _ = std::fs::write(l.stop_marker(), b"");
        match self.qmp(name, &l).await {
            Ok(mut q) => {
                // A paused guest cannot see the power button.
                if q.query_status().await.is_ok_and(|s| s != "running") {
                    let _ = q.execute("cont", None).await;
                }
                if let Err(e) = q.execute("system_powerdown", None).await {
                    tracing::warn!(vm = name, error = %e, "system_powerdown failed");
                }
            }
            Err(e) => tracing::warn!(vm = name, error = %e, "no QMP to power down"),
        }
        if process::wait_gone(pid, timeout).await {
            wait_exit_file(&l, EXIT_FILE_WAIT).await;
            return Ok(());
        }
        tracing::warn!(
            vm = name,
            ?timeout,
            "guest ignored ACPI power-off; sending QEMU SIGTERM"
        );
        self.kill(name, &l, pid).await
    }

    /// SIGTERM (QEMU ends cleanly, flushing its disks, even when QMP is
    /// wedged), then SIGKILL after the grace period.
    async fn kill(&self, name: &str, l: &Layout, pid: u32) -> Result<(), QemuError> {
        let _ = std::fs::write(l.stop_marker(), b"");
        if let Err(e) = process::kill(pid, process::Signal::SIGTERM) {
            tracing::warn!(vm = name, error = %e, "SIGTERM failed");
        }
        if process::wait_gone(pid, self.config.kill_grace).await {
            wait_exit_file(l, EXIT_FILE_WAIT).await;
            return Ok(());
        }
        process::kill(pid, process::Signal::SIGKILL)
            .map_err(io_err(format!("Cannot kill QEMU {pid}")))?;
        if process::wait_gone(pid, Duration::from_secs(5)).await {
            wait_exit_file(l, EXIT_FILE_WAIT).await;
            Ok(())
        } else {
            Err(QemuError::Io {
                context: format!("QEMU {pid} survived SIGKILL"),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            })
        }
    }

    async fn observe(&self, name: &str, l: &Layout) -> Result<Option<InstanceStatus>, QemuError> {
        let Some(cfg) = read_config(l) else {
            return Ok(None);
        };
        let pid = process::running_pid(l);
        if let Some(pid) = pid {
            self.watch_events(name, l, pid).await;
        }
        let qmp_err = |source| QemuError::QmpCommand {
            name: name.to_owned(),
            source,
        };
        let user_net = matches!(cfg.network, Network::User);
        let mut forwards = None;
        let mut vnc = None;
        let (state, sizes) = match pid {
            Some(_) => {
                let mut q = self.qmp(name, l).await?;
                let status = q.query_status().await.map_err(qmp_err)?;
                // What the guest sees now.
                let sizes = disk_sizes(&mut q).await.map_err(qmp_err)?;
                if cfg.display == Display::Vnc {
                    vnc = vnc_address(&mut q).await.map_err(qmp_err)?;
                }
                if user_net {
                    forwards = match ports::list(&mut q).await {
                        // The user's forwards: vmctl's own SSH one left out.
                        Ok(all) => Some(
                            all.into_iter()
                                .filter(|f| !is_ssh_forward(f, read_port(l)))
                                .collect::<Vec<_>>(),
                        ),
                        Err(e) => {
                            tracing::warn!(vm = name, error = %e, "cannot list port forwards");
                            None
                        }
                    };
                }
                (run_state(&status), sizes)
            }
            None => {
                self.note_exit(name, l).await;
                // What the next start attaches.
                let mut sizes = Vec::new();
                let names = std::iter::once(ROOT_DISK).chain(cfg.disks.iter().map(String::as_str));
                for disk in names {
                    let path = disk_path(l, disk);
                    if !path.exists() {
                        continue;
                    }
                    let size =
                        disk::virtual_size(&path)
                            .await
                            .map_err(|source| QemuError::Disk {
                                name: name.to_owned(),
                                source,
                            })?;
                    sizes.push((disk.to_owned(), size));
                }
                (InstanceState::Stopped, sizes)
            }
        };
        let disks = sizes
            .into_iter()
            .map(|(disk, size_bytes)| DiskRuntime {
                path: Some(disk_path(l, &disk).display().to_string()),
                name: disk,
                size_bytes,
            })
            .collect();
        let path = |p: PathBuf| p.exists().then(|| p.display().to_string());
        let runtime = VmRuntime {
            backend: "qemu".to_owned(),
            work_dir: Some(l.root.display().to_string()),
            overlay: path(l.disk()),
            seed_iso: path(l.seed()),
            pid: pid.filter(|_| state != InstanceState::Stopped),
            vnc: vnc.filter(|_| state != InstanceState::Stopped),
            ssh_host: user_net.then(|| "127.0.0.1".to_owned()),
            ssh_port: read_port(l).filter(|_| user_net),
            mac: (!matches!(cfg.network, Network::None)).then(|| cfg.mac(name)),
            instance_id: std::fs::read_to_string(l.instance_id_file())
                .ok()
                .map(|s| s.trim().to_owned()),
            last_exit: match pid {
                Some(_) => None,
                None => process::read_exit(l).map(|exit| {
                    if l.stop_marker().exists() {
                        format!("{exit} (stopped by vmctl)")
                    } else {
                        exit.to_string()
                    }
                }),
            },
            disks,
            shares: cfg.shares.iter().map(shares::SharePlan::runtime).collect(),
        };
        Ok(Some(InstanceStatus {
            state,
            runtime,
            port_forwards: forwards.filter(|_| state != InstanceState::Stopped),
        }))
    }

    /// Adds (`add`) or removes port forward `fwd` of the running QEMU of
    /// `name`.
    async fn forward(&self, name: &str, fwd: &PortForward, add: bool) -> Result<(), QemuError> {
        let l = self.layout(name);
        if process::running_pid(&l).is_none() {
            return Err(QemuError::Forward {
                name: name.to_owned(),
                source: ports::ForwardError::NotRunning,
            });
        }
        let mut q = self.qmp(name, &l).await?;
        let done = if add {
            ports::add(&mut q, fwd).await
        } else {
            ports::remove(&mut q, fwd).await
        };
        done.map_err(|source| QemuError::Forward {
            name: name.to_owned(),
            source,
        })
    }

    /// Logs how a QEMU that vmctl did not stop ended. QEMU is gone the
    /// moment its pid is; the supervisor writes the status a moment later.
    async fn note_exit(&self, name: &str, l: &Layout) {
        if !l.pidfile().exists() {
            return;
        }
        wait_exit_file(l, Duration::from_secs(1)).await;
        if let Some(exit) = process::read_exit(l)
            && !l.stop_marker().exists()
            && exit != Exit::Code(0)
        {
            tracing::warn!(vm = name, %exit, "QEMU died");
        }
    }
}

/// How long a stop waits for the supervisor to record QEMU's end.
const EXIT_FILE_WAIT: Duration = Duration::from_secs(2);

/// QEMU is gone the moment its pid is; its supervisor records how it ended
/// a moment later. Waits for that (at most `at_most`), so status can report it.
async fn wait_exit_file(l: &Layout, at_most: Duration) {
    for _ in 0..at_most.as_millis() / 50 {
        if process::read_exit(l).is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `query-status` run states to instance states. A guest stopped by an
/// error (I/O error, panic, watchdog) is not executing, so it is Suspended.
fn run_state(status: &str) -> InstanceState {
    match status {
        "paused" | "suspended" | "io-error" | "internal-error" | "guest-panicked" | "watchdog" => {
            InstanceState::Suspended
        }
        "shutdown" => InstanceState::Stopped,
        _ => InstanceState::Running,
    }
}

pub(crate) fn seed_spec(
    spec: &InstanceSpec,
    instance_id: String,
    keys: &crate::seed::VmKeys,
) -> Result<SeedSpec, QemuError> {
    // Bounded, regular files only: the path was checked when applied, but
    // it may have become a FIFO or device since (issue 18 item 4).
    let read = |path: &str, use_: vmctl_api::limits::FileUse| {
        vmctl_api::localfile::read(std::path::Path::new(path), use_)
            .map_err(|e| io_err(format!("Cannot read {path} for {}", spec.name))(e.into()))
    };
    let ci = spec.spec.cloud_init.as_ref();
    let mut authorized_keys = vec![keys.user.public_openssh.trim().to_owned()];
    if let Some(f) = ci.and_then(|c| c.ssh_key.as_ref()) {
        let text = String::from_utf8_lossy(&read(&f.path, vmctl_api::limits::FileUse::SshKey)?)
            .into_owned();
        authorized_keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    let raw_user_data = match ci.and_then(|c| c.user_data.as_ref()) {
        Some(f) => Some(read(&f.path, vmctl_api::limits::FileUse::UserData)?),
        None => None,
    };
    Ok(SeedSpec {
        instance_id,
        hostname: ci
            .and_then(|c| c.hostname.clone())
            .unwrap_or_else(|| spec.name.clone()),
        user: spec
            .spec
            .ssh
            .as_ref()
            .map(|s| s.user.clone())
            .unwrap_or_else(default_ssh_user),
        authorized_keys,
        host_key: Some(keys.host.to_host_key()),
        raw_user_data,
        network_config: None,
        bootcmd: Vec::new(),
    })
}

/// The QEMU block device id of disk `disk`.
fn drive_id(disk: &str) -> String {
    if disk == ROOT_DISK {
        "disk0".to_owned()
    } else {
        format!("disk-{disk}")
    }
}

/// The file of disk `disk` in the work dir.
pub fn disk_path(l: &Layout, disk: &str) -> PathBuf {
    if disk == ROOT_DISK {
        l.disk()
    } else {
        l.root.join(format!("disk-{disk}.qcow2"))
    }
}

/// The virtual size of each of vmctl's disks of a running QEMU, from QMP
/// `query-block` (the root disk first; the seed and unknown devices left
/// out; [`hotplug::attached`]).
async fn disk_sizes(q: &mut Qmp) -> Result<Vec<(String, u64)>, qmp::QmpError> {
    Ok(hotplug::query(q)
        .await?
        .into_iter()
        .filter_map(|a| Some((a.disk, a.size?)))
        .collect())
}

/// `host:port` of the VNC server of a running QEMU (QMP `query-vnc`),
/// `None` when it has none.
async fn vnc_address(q: &mut Qmp) -> Result<Option<String>, qmp::QmpError> {
    let v = q.execute("query-vnc", None).await?;
    if v.get("enabled").and_then(serde_json::Value::as_bool) != Some(true) {
        return Ok(None);
    }
    let field = |k| v.get(k).and_then(serde_json::Value::as_str);
    Ok(field("host")
        .zip(field("service"))
        .map(|(h, s)| format!("{h}:{s}")))
}

/// Whether `f` is vmctl's own SSH forward (127.0.0.1:`ssh_port` → 22).
fn is_ssh_forward(f: &PortForward, ssh_port: Option<u16>) -> bool {
    Some(f.host_port) == ssh_port
        && f.guest_port == 22
        && f.protocol == vmctl_api::Protocol::Tcp
        && f.address == "127.0.0.1"
}

fn read_config(l: &Layout) -> Option<VmConfig> {
    serde_json::from_slice(&std::fs::read(l.config_file()).ok()?).ok()
}

fn read_port(l: &Layout) -> Option<u16> {
    std::fs::read_to_string(l.port_file())
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn write_port(l: &Layout, port: u16) -> Result<(), QemuError> {
    std::fs::write(l.port_file(), port.to_string()).map_err(io_err("Cannot record the SSH port"))
}

/// A port free on 127.0.0.1 now (bound, read, released).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

fn port_is_free(port: u16) -> bool {
    port != 0 && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The last lines of QEMU's stderr, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    if tail.is_empty() {
        "(no output)".to_owned()
    } else {
        tail
    }
}

fn not_running(op: &'static str, name: &str) -> DriverError {
    DriverError::InvalidState {
        op,
        name: name.to_owned(),
        state: InstanceState::Stopped,
    }
}

impl Hypervisor for QemuDriver {
    fn guest_network_up(&self, name: &str) -> Option<bool> {
        let (pid, up) = *self
            .nic_up
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)?;
        // Only while that QEMU runs (not one started since by another agent).
        (process::running_pid(&self.layout(name)) == Some(pid)).then_some(up)
    }

    fn backend(&self) -> &'static str {
        "qemu"
    }

    fn accelerator(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move { Some(self.accel().await.to_string()) })
    }

    fn work_dir(&self, name: &str) -> Option<PathBuf> {
        Some(self.config.data_dir.join("vms").join(name))
    }

    /// The work dirs under `<data-dir>/vms`, by name.
    fn instances(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move {
            let dir = self.config.data_dir.join("vms");
            let mut names = Vec::new();
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
                Err(source) => {
                    return Err(DriverError::Io {
                        context: format!("cannot list {}", dir.display()),
                        source,
                    });
                }
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir())
                    && let Some(n) = entry.file_name().to_str()
                {
                    names.push(n.to_owned());
                }
            }
            names.sort();
            Ok(names)
        })
    }

    fn prepare<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFuture<'a, Result<InstanceStatus>> {
        Box::pin(async move {
            let lock = self.lock(&spec.name);
            let _guard = lock.lock().await;
            self.do_prepare(spec)
                .await?
                .ok_or_else(|| DriverError::NotFound(spec.name.clone()))
        })
    }

    fn start<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<InstanceStatus>> {
        Box::pin(async move {
            let lock = self.lock(name);
            let _guard = lock.lock().await;
            self.do_start(name)
                .await?
                .ok_or_else(|| DriverError::NotFound(name.to_owned()))
        })
    }

    fn stop<'a>(&'a self, name: &'a str, timeout: Duration) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let _guard = self.lock_to_end(name).await;
            if read_config(&self.layout(name)).is_none() {
                return Err(DriverError::NotFound(name.to_owned()));
            }
            Ok(self.do_stop(name, timeout).await?)
        })
    }

    fn suspend<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let lock = self.lock(name);
            let _guard = lock.lock().await;
            let l = self.layout(name);
            if process::running_pid(&l).is_none() {
                return Err(not_running("suspend", name));
            }
            Ok(self.command(name, &l, "stop").await?)
        })
    }

    fn resume<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let lock = self.lock(name);
            let _guard = lock.lock().await;
            let l = self.layout(name);
            if process::running_pid(&l).is_none() {
                return Err(not_running("resume", name));
            }
            Ok(self.command(name, &l, "cont").await?)
        })
    }

    fn destroy<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let _guard = self.lock_to_end(name).await;
            let l = self.layout(name);
            if let Some(pid) = process::running_pid(&l) {
                self.kill(name, &l, pid).await?;
            }
            if let Some(cfg) = read_config(&l) {
                shares::stop_virtiofsd(&l, cfg.shares.len()).await;
            }
            // QEMU's supervisor writes `exit.status` just after QEMU dies;
            // a removal racing with that write finds the directory not empty.
            let mut removed = std::fs::remove_dir_all(&l.root);
            for _ in 0..50 {
                match &removed {
                    Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        removed = std::fs::remove_dir_all(&l.root);
                    }
                    _ => break,
                }
            }
            match removed {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(QemuError::Io {
                        context: format!("Cannot remove {}", l.root.display()),
                        source: e,
                    })?;
                }
                _ => {}
            }
            l.remove_sock_dir()
                .map_err(io_err(format!("Cannot remove {}", l.sock_dir.display())))?;
            self.locks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
            Ok(())
        })
    }

    fn status<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<InstanceStatus>>> {
        Box::pin(async move {
            let l = self.layout(name);
            Ok(self.observe(name, &l).await?)
        })
    }

    fn resizes_disks_live(&self) -> bool {
        true
    }

    fn resize_disk<'a>(
        &'a self,
        name: &'a str,
        disk: &'a str,
        bytes: u64,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let lock = self.lock(name);
            let _guard = lock.lock().await;
            Ok(self.do_resize_disk(name, disk, bytes).await?)
        })
    }

    fn hotplugs_disks(&self) -> bool {
        true
    }

    fn attach_disk<'a>(
        &'a self,
        name: &'a str,
        disk: &'a vmctl_api::Disk,
    ) -> BoxFuture<'a, Result<DiskRuntime>> {
        Box::pin(async move {
            let lock = self.lock(name);
            let _guard = lock.lock().await;
            Ok(self.do_attach_disk(name, disk).await?)
        })
    }

    fn detach_disk<'a>(&'a self, name: &'a str, disk: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let lock = self.lock(name);
            let _guard = lock.lock().await;
            Ok(self.do_detach_disk(name, disk).await?)
        })
    }

    fn add_port_forward<'a>(
        &'a self,
        name: &'a str,
        fwd: &'a PortForward,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let lock = self.lock(name);
            let _guard = lock.lock().await;
            Ok(self.forward(name, fwd, true).await?)
        })
    }

    fn remove_port_forward<'a>(
        &'a self,
        name: &'a str,
        fwd: &'a PortForward,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let lock = self.lock(name);
            let _guard = lock.lock().await;
            Ok(self.forward(name, fwd, false).await?)
        })
    }

    fn snapshots<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<SnapshotInfo>>> {
        Box::pin(async move {
            let lock = self.lock(name);
            let _guard = lock.lock().await;
            self.do_snapshots(name)
                .await?
                .ok_or_else(|| DriverError::NotFound(name.to_owned()))
        })
    }

    fn create_snapshot<'a>(
        &'a self,
        name: &'a str,
        snapshot: &'a str,
    ) -> BoxFuture<'a, Result<SnapshotInfo>> {
        Box::pin(async move {
            let lock = self.lock(name);
            let _guard = lock.lock().await;
            self.do_create_snapshot(name, snapshot).await
        })
    }

    fn restore_snapshot<'a>(
        &'a self,
        name: &'a str,
        snapshot: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let lock = self.lock(name);
            let _guard = lock.lock().await;
            self.do_restore_snapshot(name, snapshot).await
        })
    }

    fn delete_snapshot<'a>(
        &'a self,
        name: &'a str,
        snapshot: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let lock = self.lock(name);
            let _guard = lock.lock().await;
            self.do_delete_snapshot(name, snapshot).await
        })
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        Some(self.changes.subscribe())
    }
}
