//! The Propolis hypervisor driver (illumos: bhyve through propolis-server).
//!
//! A VM is an illumos zone of a propolis brand whose propolis-server
//! runs it; its disk is a ZFS clone; its NIC a VNIC:
//!
//! ```text
//!   prepare   image   zfs list {pool}/images/{image}@latest, else import it:
//!                     zfs create -p -V SIZE {pool}/images/{image};
//!                     qemu-img convert -n -O raw FILE /dev/zvol/rdsk/…;
//!                     zfs snapshot {pool}/images/{image}@latest
//!             disk    zfs clone -p {pool}/images/{image}@latest {pool}/vms/{vm}
//!                     (zfs set volsize=NG when disk-gib grows it)
//!             VNIC    dladm show-vnic, else dladm create-vnic -t -l LINK -m MAC
//!             zone    zonecfg -z {vm} 'create -b; set brand=…; …'; zoneadm -z {vm} install
//!                     (an incomplete install is uninstalled and done again)
//!   start     zoneadm -z {vm} boot; wait for propolis-server; PUT /instance
//!             with the full spec; PUT /instance/state "Run"; state-monitor
//!             until Running
//!   stop      PUT /instance/state "Stop", state-monitor until Stopped (at
//!             most the stop timeout); zoneadm -z {vm} halt
//!   destroy   stop; zoneadm -z {vm} uninstall -F; zonecfg -z {vm} delete -F;
//!             zfs destroy -r {pool}/vms/{vm}; dladm delete-vnic (if vmctl made it)
//! ```
//!
//! Every step observes first (`zfs list`, `zoneadm list -p`, `dladm
//! show-vnic`, `GET /instance`), so a prepare or destroy interrupted
//! halfway is finished by the next reconcile. Host commands go through a
//! [`CommandRunner`]: the real one on illumos, a [`SimulatedHost`] in tests.
//!
//! Each VM's propolis-server listens on its own address: the configured
//! one for the first VM, the next ports for the others; it is handed to
//! the zone as the `vmctl-listen-addr` attribute of its configuration.
//! One propolis-server hosts one instance and has no suspend: suspend and
//! resume are refused. State changes come from the state-monitor long
//! poll ([`Hypervisor::changes`]), the console from the serial WebSocket
//! ([`serial`]).
//!
//! Work dir `<data_dir>/vms/<name>/`: `vm.json` (what prepare decided),
//! `seed.iso`, keys, `console.log`, `serial.sock`, `serial.offset`.

pub mod api;
pub mod host;
pub mod serial;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmctl_api::{DiskRuntime, Network, ROOT_DISK, VmRuntime};

pub use self::api::{Client, ClientError, PropolisState};
pub use self::host::{CommandOutput, CommandRunner, HostCommand, SimulatedHost, SystemRunner};

use self::api::{
    Board, BootOrderEntry, Chipset, Component, EnsureRequest, Init, InstanceMetadata,
    InstanceProperties, InstanceSpec, PciPath, RequestedState, SerialPortNumber,
};
use super::{
    BoxFuture, DriverError, Hypervisor, InstanceSpec as VmInstanceSpec, InstanceState,
    InstanceStatus, Result,
};
use crate::seed::{SeedTool, build_seed, ensure_vm_keys};

/// Diagnostic code: propolis-server does not answer.
pub const UNREACHABLE: &str = "vmctl::propolis::unreachable";
/// Diagnostic code: propolis-server refused a request or the instance failed.
pub const API_FAILED: &str = "vmctl::propolis::api_failed";
/// Diagnostic code: a host command (zfs, zoneadm, zonecfg, dladm) failed.
pub const HOST_COMMAND_FAILED: &str = "vmctl::propolis::host_command_failed";
/// Diagnostic code: the spec asks for something Propolis cannot do.
pub const UNSUPPORTED: &str = "vmctl::propolis::unsupported";

/// Settings of the Propolis driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropolisConfig {
    /// vmctl's data dir; work dirs are `<data_dir>/vms/<name>`.
    pub data_dir: PathBuf,
    /// The ZFS pool of images (`{pool}/images/…`) and VM disks (`{pool}/vms/…`).
    pub pool: String,
    /// The zone brand that runs propolis-server.
    pub brand: String,
    /// Zone paths are `<zone_root>/<vm>`.
    pub zone_root: PathBuf,
    /// The first VM's propolis-server address; later VMs get the next ports.
    pub server: SocketAddr,
    /// The physical link VNICs are created on; `None`: VNICs must exist.
    pub vnic_link: Option<String>,
    /// What writes the cloud-init seed ISO.
    pub seed_tool: SeedTool,
    /// How long a start may take: zone boot, server up, instance Running.
    pub start_timeout: Duration,
    /// How long one API request may take.
    pub http_timeout: Duration,
}

/// A setting of the Propolis driver that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid {var}={value:?}: expected {expected}")]
pub struct ConfigError {
    /// The variable.
    pub var: &'static str,
    /// Its value.
    pub value: String,
    /// What was expected.
    pub expected: &'static str,
}

/// The default propolis-server address (the manual's).
pub const DEFAULT_SERVER: &str = "127.0.0.1:12400";

impl PropolisConfig {
    /// Defaults: pool `rpool`, brand `nebula-vm`, zones under `/zones`,
    /// server `127.0.0.1:12400`, existing VNICs only.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        PropolisConfig {
            data_dir: data_dir.into(),
            pool: "rpool".into(),
            brand: "nebula-vm".into(),
            zone_root: PathBuf::from("/zones"),
            server: DEFAULT_SERVER.parse().expect("a valid address"),
            vnic_link: None,
            seed_tool: SeedTool::Auto,
            start_timeout: Duration::from_secs(120),
            http_timeout: Duration::from_secs(10),
        }
    }

    /// Applies the environment: `VMCTL_PROPOLIS_ADDR` (`IP:PORT`),
    /// `VMCTL_PROPOLIS_POOL`, `VMCTL_PROPOLIS_BRAND`,
    /// `VMCTL_PROPOLIS_ZONE_ROOT`, `VMCTL_PROPOLIS_VNIC_LINK`,
    /// `VMCTL_PROPOLIS_START_TIMEOUT` (seconds).
    ///
    /// # Errors
    /// A value that is not of the expected form, or a ZFS or zone name
    /// with characters the tools do not accept.
    pub fn with_lookup(
        mut self,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let bad = |var, value: &str, expected| ConfigError {
            var,
            value: value.to_owned(),
            expected,
        };
        if let Some(v) = get("VMCTL_PROPOLIS_ADDR") {
            self.server = v
                .trim()
                .parse()
                .map_err(|_| bad("VMCTL_PROPOLIS_ADDR", &v, "IP:PORT, e.g. 127.0.0.1:12400"))?;
        }
        let plain = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
        };
        if let Some(v) = get("VMCTL_PROPOLIS_POOL") {
            if !plain(&v) || v.starts_with('/') {
                return Err(bad("VMCTL_PROPOLIS_POOL", &v, "a ZFS pool or dataset name"));
            }
            self.pool = v.trim_end_matches('/').to_owned();
        }
        if let Some(v) = get("VMCTL_PROPOLIS_BRAND") {
            if !plain(&v) {
                return Err(bad("VMCTL_PROPOLIS_BRAND", &v, "a zone brand name"));
            }
            self.brand = v;
        }
        if let Some(v) = get("VMCTL_PROPOLIS_ZONE_ROOT") {
            if !v.starts_with('/') || !plain(&v) {
                return Err(bad("VMCTL_PROPOLIS_ZONE_ROOT", &v, "an absolute path"));
            }
            self.zone_root = PathBuf::from(v);
        }
        if let Some(v) = get("VMCTL_PROPOLIS_VNIC_LINK") {
            if !plain(&v) || v.contains('/') {
                return Err(bad("VMCTL_PROPOLIS_VNIC_LINK", &v, "a datalink name"));
            }
            self.vnic_link = Some(v);
        }
        if let Some(v) = get("VMCTL_PROPOLIS_START_TIMEOUT") {
            let s: u64 = v
                .trim()
                .parse()
                .map_err(|_| bad("VMCTL_PROPOLIS_START_TIMEOUT", &v, "seconds"))?;
            self.start_timeout = Duration::from_secs(s);
        }
        Ok(self)
    }
}

/// What prepare decided for a VM, kept in `vm.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRecord {
    /// Always `propolis` (the data dir may hold QEMU work dirs too).
    pub backend: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Networking (`vnic` or `none`).
    pub network: Network,
    /// The VNIC's MAC, derived from the VM's uid.
    pub mac: String,
    /// Whether vmctl created the VNIC (and so deletes it).
    pub vnic_created: bool,
    /// The VM's propolis-server.
    pub server: SocketAddr,
    /// The propolis instance id.
    pub instance_id: uuid::Uuid,
    /// The NIC's interface id.
    pub interface_id: uuid::Uuid,
    /// The image dataset the disk was cloned from.
    pub image_dataset: String,
    /// Disk size set with `zfs set volsize`, GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u64>,
}

/// The background tasks of a running VM.
#[derive(Debug)]
struct VmTasks {
    instance: uuid::Uuid,
    watcher: tokio::task::AbortHandle,
    _serial: Option<serial::SerialBridge>,
}

impl Drop for VmTasks {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// The Propolis driver.
#[derive(Debug)]
pub struct PropolisDriver {
    config: PropolisConfig,
    runner: Arc<dyn CommandRunner>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    changes: tokio::sync::broadcast::Sender<String>,
    tasks: Mutex<HashMap<String, VmTasks>>,
}

fn host_err(cmd: &HostCommand, out: &CommandOutput) -> DriverError {
    let why = out.stderr.trim();
    let why = if why.is_empty() {
        out.stdout.trim()
    } else {
        why
    };
    DriverError::Backend(format!(
        "host command `{cmd}` failed (exit {}): {why} [{HOST_COMMAND_FAILED}]",
        out.code
    ))
}

fn api_err(name: &str, e: ClientError) -> DriverError {
    let code = if e.is_unreachable() {
        UNREACHABLE
    } else {
        API_FAILED
    };
    DriverError::Backend(format!("VM {name}: {e} [{code}]"))
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DriverError {
    let context = context.into();
    move |source| DriverError::Io { context, source }
}

/// The zone state `zoneadm list -p` reports (`configured`, `incomplete`,
/// `installed`, `ready`, `running`, …), `None` when there is no zone.
fn zone_state(out: &CommandOutput) -> Option<String> {
    if !out.success() {
        return None;
    }
    out.stdout
        .lines()
        .next()
        .and_then(|l| l.split(':').nth(2))
        .map(str::to_owned)
}

impl PropolisDriver {
    /// A driver running host commands through `runner`. A relative data
    /// dir is made absolute.
    pub fn new(mut config: PropolisConfig, runner: Arc<dyn CommandRunner>) -> Self {
        config.data_dir = std::path::absolute(&config.data_dir).unwrap_or(config.data_dir);
        PropolisDriver {
            config,
            runner,
            locks: Mutex::new(HashMap::new()),
            changes: tokio::sync::broadcast::channel(1024).0,
            tasks: Mutex::new(HashMap::new()),
        }
    }

    /// The driver's settings.
    pub fn config(&self) -> &PropolisConfig {
        &self.config
    }

    /// The work dir of VM `name`.
    pub fn work_dir(&self, name: &str) -> PathBuf {
        self.config.data_dir.join("vms").join(name)
    }

    /// The ZFS volume of VM `name`'s disk.
    pub fn vm_dataset(&self, name: &str) -> String {
        format!("{}/vms/{name}", self.config.pool)
    }

    /// The ZFS volume image `image` is imported into.
    pub fn image_dataset(&self, image: &str) -> String {
        format!("{}/images/{image}", self.config.pool)
    }

    fn lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_owned()).or_default().clone()
    }

    fn client(&self, rec: &VmRecord) -> Client {
        Client::new(rec.server, self.config.http_timeout)
    }

    async fn run(&self, program: &str, args: &[&str]) -> Result<CommandOutput> {
        let cmd = HostCommand::new(program, args.iter().copied());
        tracing::debug!(command = %cmd, "host command");
        self.runner
            .run(&cmd)
            .await
            .map_err(io_err(format!("Cannot run `{cmd}`")))
    }

    /// Runs a command that must succeed.
    async fn must(&self, program: &str, args: &[&str]) -> Result<CommandOutput> {
        let out = self.run(program, args).await?;
        if out.success() {
            Ok(out)
        } else {
            Err(host_err(
                &HostCommand::new(program, args.iter().copied()),
                &out,
            ))
        }
    }

    async fn exists(&self, dataset: &str) -> Result<bool> {
        Ok(self
            .run("zfs", &["list", "-H", "-o", "name", dataset])
            .await?
            .success())
    }

    async fn zone(&self, name: &str) -> Result<Option<String>> {
        Ok(zone_state(
            &self.run("zoneadm", &["-z", name, "list", "-p"]).await?,
        ))
    }

    fn read_record(&self, name: &str) -> Option<VmRecord> {
        let rec: VmRecord =
            serde_json::from_slice(&std::fs::read(self.work_dir(name).join("vm.json")).ok()?)
                .ok()?;
        (rec.backend == "propolis").then_some(rec)
    }

    fn write_record(&self, name: &str, rec: &VmRecord) -> Result<()> {
        let json = serde_json::to_vec_pretty(rec).map_err(|e| io_err("")(e.into()))?;
        std::fs::write(self.work_dir(name).join("vm.json"), json)
            .map_err(io_err("Cannot write vm.json"))
    }

    /// The server address for a new VM: the configured one, or the next
    /// port not used by another VM of this driver.
    fn allocate_server(&self, name: &str) -> SocketAddr {
        let used: std::collections::HashSet<SocketAddr> =
            std::fs::read_dir(self.config.data_dir.join("vms"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let other = e.file_name().to_string_lossy().into_owned();
                    (other != name).then(|| self.read_record(&other)).flatten()
                })
                .map(|r| r.server)
                .collect();
        let mut addr = self.config.server;
        while used.contains(&addr) && addr.port() < u16::MAX {
            addr.set_port(addr.port() + 1);
        }
        addr
    }

    /// The zone's configuration, as one `zonecfg` command string.
    pub fn zone_config(&self, name: &str, rec: &VmRecord) -> String {
        let mut parts = vec![
            "create -b".to_owned(),
            format!("set brand={}", self.config.brand),
            format!(
                "set zonepath={}",
                self.config.zone_root.join(name).display()
            ),
            "set ip-type=exclusive".to_owned(),
            "set autoboot=false".to_owned(),
            format!(
                "add attr; set name=vmctl-listen-addr; set type=string; set value={}; end",
                rec.server
            ),
            format!(
                "add device; set match=/dev/zvol/rdsk/{}; end",
                self.vm_dataset(name)
            ),
            format!(
                "add fs; set dir=/vmctl; set special={}; set type=lofs; set options=ro; end",
                self.work_dir(name).display()
            ),
        ];
        if let Network::Vnic { name: vnic } = &rec.network {
            parts.push(format!("add net; set physical={vnic}; end"));
        }
        parts.join("; ")
    }

    /// The full instance spec of VM `name`, with paths as its zone sees them.
    pub fn instance_spec(&self, name: &str, rec: &VmRecord) -> Result<InstanceSpec> {
        let cpus = u8::try_from(rec.vcpus).map_err(|_| {
            DriverError::Permanent(format!(
                "VM {name}: spec.vcpus is {}; Propolis takes at most 255 [{UNSUPPORTED}]",
                rec.vcpus
            ))
        })?;
        let mut c = std::collections::BTreeMap::new();
        c.insert(
            "boot-disk-backend".to_owned(),
            Component::FileStorageBackend {
                path: format!("/dev/zvol/rdsk/{}", self.vm_dataset(name)),
                readonly: false,
                block_size: 512,
            },
        );
        c.insert(
            "boot-disk".to_owned(),
            Component::VirtioDisk {
                backend_id: "boot-disk-backend".into(),
                pci_path: PciPath::slot(4),
            },
        );
        if self.work_dir(name).join("seed.iso").exists() {
            c.insert(
                "seed-disk-backend".to_owned(),
                Component::FileStorageBackend {
                    path: "/vmctl/seed.iso".into(),
                    readonly: true,
                    block_size: 512,
                },
            );
            c.insert(
                "seed-disk".to_owned(),
                Component::VirtioDisk {
                    backend_id: "seed-disk-backend".into(),
                    pci_path: PciPath::slot(5),
                },
            );
        }
        if let Network::Vnic { name: vnic } = &rec.network {
            c.insert(
                "net0-backend".to_owned(),
                Component::VirtioNetworkBackend {
                    vnic_name: vnic.clone(),
                },
            );
            c.insert(
                "net0".to_owned(),
                Component::VirtioNic {
                    backend_id: "net0-backend".into(),
                    interface_id: rec.interface_id,
                    pci_path: PciPath::slot(6),
                },
            );
        }
        c.insert(
            "com1".to_owned(),
            Component::SerialPort {
                num: SerialPortNumber::Com1,
            },
        );
        c.insert(
            "boot-settings".to_owned(),
            Component::BootSettings {
                order: vec![BootOrderEntry {
                    id: "boot-disk".into(),
                }],
            },
        );
        Ok(InstanceSpec {
            board: Board {
                cpus,
                memory_mb: rec.memory_mib,
                chipset: Chipset::I440Fx { enable_pcie: false },
            },
            components: c,
        })
    }

    fn new_record(&self, spec: &VmInstanceSpec) -> VmRecord {
        VmRecord {
            backend: "propolis".into(),
            vcpus: spec.spec.vcpus,
            memory_mib: spec.spec.memory_mib,
            network: spec.spec.network.clone(),
            mac: super::qemu::args::mac_for(&spec.uid),
            vnic_created: false,
            server: self.allocate_server(&spec.name),
            instance_id: uuid::Uuid::new_v4(),
            interface_id: uuid::Uuid::new_v4(),
            image_dataset: self.image_dataset(&spec.spec.image),
            disk_gib: None,
        }
    }

    async fn do_prepare(&self, spec: &VmInstanceSpec) -> Result<InstanceStatus> {
        let name = &spec.name;
        let dir = self.work_dir(name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(format!("Cannot create {}", dir.display())))?;
        if unsupported_network(name, &spec.spec.network).is_some() {
            // Nothing is made on the host; start refuses with the reason,
            // which the VM's Ready condition then shows.
            let rec = match self.read_record(name) {
                Some(mut r) => {
                    r.network = spec.spec.network.clone();
                    r
                }
                None => self.new_record(spec),
            };
            self.write_record(name, &rec)?;
            return self
                .observe(name)
                .await?
                .ok_or_else(|| DriverError::NotFound(name.clone()));
        }
        if let Some(d) = spec.spec.disks.first() {
            return Err(DriverError::Permanent(format!(
                "VM {name}: spec.disks: extra disk `{}`: the Propolis backend does not attach extra disks yet; remove the `disk \"{}\" size=…` line or use the qemu driver [{UNSUPPORTED}]",
                d.name, d.name
            )));
        }
        let network = spec.spec.network.clone();
        self.write_seed(spec, &dir).await?;

        let mut rec = match self.read_record(name) {
            Some(mut r) => {
                r.vcpus = spec.spec.vcpus;
                r.memory_mib = spec.spec.memory_mib;
                if r.network != network {
                    r.network = network;
                    r.vnic_created = false;
                }
                r
            }
            None => self.new_record(spec),
        };
        // Recorded before anything is made on the host, so that a destroy
        // after a crash here knows what is vmctl's.
        self.write_record(name, &rec)?;

        // The image, imported once into a volume with a @latest snapshot
        // (the snapshot is made last: it marks a complete import).
        let snap = format!("{}@latest", rec.image_dataset);
        if !self.exists(&snap).await? {
            if self.exists(&rec.image_dataset).await? {
                self.must("zfs", &["destroy", "-r", &rec.image_dataset])
                    .await?;
            }
            let bytes = spec
                .image
                .virtual_size_bytes
                .unwrap_or(spec.image.size_bytes)
                .max(1);
            let size = format!("{}M", bytes.div_ceil(1 << 20));
            self.must("zfs", &["create", "-p", "-V", &size, &rec.image_dataset])
                .await?;
            let dev = format!("/dev/zvol/rdsk/{}", rec.image_dataset);
            self.must(
                "qemu-img",
                &["convert", "-n", "-O", "raw", &spec.image.path, &dev],
            )
            .await?;
            self.must("zfs", &["snapshot", &snap]).await?;
        }

        // The VM's disk.
        let vm_ds = self.vm_dataset(name);
        if !self.exists(&vm_ds).await? {
            self.must("zfs", &["clone", "-p", &snap, &vm_ds]).await?;
            rec.disk_gib = None;
        }
        if let Some(gib) = spec.spec.disk_gib {
            match rec.disk_gib {
                // Disks only grow: a smaller size keeps the volume as it
                // is, and the VM controller reports the refusal (from the
                // size `observe` reports).
                Some(old) if gib <= old => {}
                _ => {
                    self.must("zfs", &["set", &format!("volsize={gib}G"), &vm_ds])
                        .await?;
                    rec.disk_gib = Some(gib);
                }
            }
        }

        // The VNIC.
        if let Network::Vnic { name: vnic } = &rec.network {
            let show = self
                .run("dladm", &["show-vnic", "-p", "-o", "LINK,MACADDRESS", vnic])
                .await?;
            if !show.success() {
                let Some(link) = self.config.vnic_link.clone() else {
                    return Err(DriverError::Permanent(format!(
                        "VM {name}: spec.network: VNIC {vnic} does not exist; create it (`dladm create-vnic -l LINK {vnic}`) or set VMCTL_PROPOLIS_VNIC_LINK so that vmctl creates it [{HOST_COMMAND_FAILED}]"
                    )));
                };
                let vnic = vnic.clone();
                self.must(
                    "dladm",
                    &["create-vnic", "-t", "-l", &link, "-m", &rec.mac, &vnic],
                )
                .await?;
                rec.vnic_created = true;
                self.write_record(name, &rec)?;
            }
        }

        // The zone.
        let mut state = self.zone(name).await?;
        if state.is_none() {
            let script = self.zone_config(name, &rec);
            self.must("zonecfg", &["-z", name, &script]).await?;
            state = Some("configured".into());
        }
        if state.as_deref() == Some("incomplete") {
            // An install that was interrupted: start it over.
            self.must("zoneadm", &["-z", name, "uninstall", "-F"])
                .await?;
            state = Some("configured".into());
        }
        if state.as_deref() == Some("configured") {
            self.must("zoneadm", &["-z", name, "install"]).await?;
        }
        self.write_record(name, &rec)?;
        self.observe(name)
            .await?
            .ok_or_else(|| DriverError::NotFound(name.clone()))
    }

    /// The cloud-init seed, rebuilt when its content changes (the running
    /// instance keeps the one it has open).
    async fn write_seed(&self, spec: &VmInstanceSpec, dir: &Path) -> Result<()> {
        let name = &spec.name;
        let keys = ensure_vm_keys(dir, &format!("vmctl@{name}")).map_err(|e| {
            DriverError::Backend(format!("keys of {name}: {}", vmctl_api::error_chain(&e)))
        })?;
        let id_file = dir.join("instance-id");
        let instance_id = match std::fs::read_to_string(&id_file) {
            Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
            _ => {
                let id = format!("{name}-{}", uuid::Uuid::new_v4().simple());
                std::fs::write(&id_file, &id).map_err(io_err("Cannot write the instance id"))?;
                id
            }
        };
        let seed = super::qemu::seed_spec(spec, instance_id, &keys)?;
        let digest = seed.digest();
        let digest_file = dir.join("seed.digest");
        let out = dir.join("seed.iso");
        if out.exists() && std::fs::read_to_string(&digest_file).is_ok_and(|d| d.trim() == digest) {
            return Ok(());
        }
        let tool = self.config.seed_tool;
        let tmp = out.clone();
        tokio::task::spawn_blocking(move || build_seed(&seed, &tmp, tool))
            .await
            .map_err(|e| io_err("Seed builder panicked")(std::io::Error::other(e)))?
            .map_err(|e| {
                DriverError::Backend(format!("seed of {name}: {}", vmctl_api::error_chain(&e)))
            })?;
        std::fs::write(&digest_file, &digest).map_err(io_err("Cannot record the seed digest"))
    }

    /// Waits until the VM's propolis-server answers; its instance, if any.
    async fn wait_server(
        &self,
        name: &str,
        client: &Client,
        deadline: tokio::time::Instant,
    ) -> Result<Option<api::Instance>> {
        loop {
            match client.instance().await {
                Ok(i) => return Ok(i),
                Err(e) if e.is_unreachable() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(api_err(name, e)),
            }
        }
    }

    /// Follows the state monitor until `done(state)` holds; a terminal
    /// state that is not wanted is an error.
    async fn wait_state(
        &self,
        name: &str,
        client: &Client,
        deadline: tokio::time::Instant,
        done: impl Fn(PropolisState) -> bool,
    ) -> Result<PropolisState> {
        let mut generation = 0;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(DriverError::Timeout(format!(
                    "VM {name}: propolis-server state change"
                )));
            }
            let r = client
                .state_monitor(generation + 1, left)
                .await
                .map_err(|e| api_err(name, e))?;
            generation = r.generation;
            if done(r.state) {
                return Ok(r.state);
            }
            if r.state.is_terminal() {
                return Err(DriverError::Backend(format!(
                    "VM {name}: the propolis instance went to {:?} [{API_FAILED}]",
                    r.state
                )));
            }
        }
    }

    async fn do_start(&self, name: &str) -> Result<InstanceStatus> {
        let rec = self
            .read_record(name)
            .ok_or_else(|| DriverError::NotFound(name.to_owned()))?;
        if let Some(e) = unsupported_network(name, &rec.network) {
            return Err(e);
        }
        let dir = self.work_dir(name);
        let client = self.client(&rec);
        let deadline = tokio::time::Instant::now() + self.config.start_timeout;
        let mut fresh_boot = false;
        match self.zone(name).await?.as_deref() {
            Some("running") => {}
            Some("installed" | "ready") => {
                self.must("zoneadm", &["-z", name, "boot"]).await?;
                fresh_boot = true;
            }
            other => {
                return Err(DriverError::Backend(format!(
                    "VM {name}: its zone is {}; it must be installed to boot (prepare makes it) [{HOST_COMMAND_FAILED}]",
                    other.unwrap_or("missing")
                )));
            }
        }
        let mut instance = if fresh_boot {
            self.wait_server(name, &client, deadline).await?
        } else {
            match client.instance().await {
                Ok(i) => i,
                Err(e) if e.is_unreachable() => {
                    // A running zone without its server: boot it again.
                    tracing::info!(vm = name, error = %e, "no propolis-server in the running zone; rebooting the zone");
                    self.stop_tasks(name);
                    self.must("zoneadm", &["-z", name, "halt"]).await?;
                    self.must("zoneadm", &["-z", name, "boot"]).await?;
                    fresh_boot = true;
                    self.wait_server(name, &client, deadline).await?
                }
                Err(e) => return Err(api_err(name, e)),
            }
        };
        let stale = |i: &api::Instance| i.properties.id != rec.instance_id || i.state.is_terminal();
        if instance.as_ref().is_some_and(stale) && !fresh_boot {
            // A server whose instance ended (or another instance): only a
            // new propolis-server can run it again. Reboot the zone.
            tracing::info!(vm = name, "propolis instance ended; rebooting its zone");
            self.stop_tasks(name);
            self.must("zoneadm", &["-z", name, "halt"]).await?;
            self.must("zoneadm", &["-z", name, "boot"]).await?;
            instance = self.wait_server(name, &client, deadline).await?;
        }
        match &instance {
            Some(i) if stale(i) => {
                return Err(DriverError::Backend(format!(
                    "VM {name}: the propolis-server at {} holds instance {} in state {:?} after a zone boot [{API_FAILED}]",
                    rec.server, i.properties.id, i.state
                )));
            }
            Some(_) => {}
            None => {
                let spec = self.instance_spec(name, &rec)?;
                let req = EnsureRequest {
                    properties: InstanceProperties {
                        id: rec.instance_id,
                        name: name.to_owned(),
                        description: format!("vmctl VM {name}"),
                        metadata: InstanceMetadata::standalone(),
                    },
                    init: Init::Spec { spec },
                };
                client.ensure(&req).await.map_err(|e| api_err(name, e))?;
                serial::reset_offset(&dir).map_err(io_err("Cannot reset serial.offset"))?;
            }
        }
        self.ensure_tasks(name, &rec);
        if !instance.is_some_and(|i| i.state.is_running()) {
            client
                .request_state(RequestedState::Run)
                .await
                .map_err(|e| api_err(name, e))?;
        }
        self.wait_state(name, &client, deadline, |s| s == PropolisState::Running)
            .await?;
        self.observe(name)
            .await?
            .ok_or_else(|| DriverError::NotFound(name.to_owned()))
    }

    async fn do_stop(&self, name: &str, timeout: Duration) -> Result<()> {
        let rec = self
            .read_record(name)
            .ok_or_else(|| DriverError::NotFound(name.to_owned()))?;
        self.halt(name, &rec, timeout).await
    }

    /// Stops the instance (at most `timeout`), then halts the zone.
    async fn halt(&self, name: &str, rec: &VmRecord, timeout: Duration) -> Result<()> {
        if self.zone(name).await?.as_deref() != Some("running") {
            self.stop_tasks(name);
            return Ok(());
        }
        let client = self.client(rec);
        match client.instance().await {
            Ok(Some(i)) if !i.state.is_terminal() => {
                match client.request_state(RequestedState::Stop).await {
                    Ok(()) => {
                        let deadline = tokio::time::Instant::now() + timeout;
                        if let Err(e) = self
                            .wait_state(name, &client, deadline, PropolisState::is_terminal)
                            .await
                        {
                            tracing::warn!(vm = name, error = %e, "instance did not stop; halting its zone");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(vm = name, error = %e, "Stop refused; halting the zone")
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(vm = name, error = %e, "no propolis-server; halting the zone"),
        }
        self.stop_tasks(name);
        self.must("zoneadm", &["-z", name, "halt"]).await?;
        Ok(())
    }

    async fn do_destroy(&self, name: &str) -> Result<()> {
        let rec = self.read_record(name);
        if let Some(rec) = &rec {
            self.halt(name, rec, Duration::from_secs(10)).await?;
        }
        self.stop_tasks(name);
        let mut state = self.zone(name).await?;
        if state.as_deref() == Some("running") {
            self.must("zoneadm", &["-z", name, "halt"]).await?;
            state = Some("installed".into());
        }
        if matches!(state.as_deref(), Some("installed" | "incomplete" | "ready")) {
            self.must("zoneadm", &["-z", name, "uninstall", "-F"])
                .await?;
            state = Some("configured".into());
        }
        if state.is_some() {
            self.must("zonecfg", &["-z", name, "delete", "-F"]).await?;
        }
        let vm_ds = self.vm_dataset(name);
        if self.exists(&vm_ds).await? {
            self.must("zfs", &["destroy", "-r", &vm_ds]).await?;
        }
        if let Some(rec) = &rec
            && rec.vnic_created
            && let Network::Vnic { name: vnic } = &rec.network
            && self
                .run("dladm", &["show-vnic", "-p", "-o", "LINK,MACADDRESS", vnic])
                .await?
                .success()
        {
            self.must("dladm", &["delete-vnic", vnic]).await?;
        }
        let dir = self.work_dir(name);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err(format!("Cannot remove {}", dir.display()))(e));
            }
            _ => {}
        }
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        Ok(())
    }

    /// What the host and propolis-server say about VM `name`.
    async fn observe(&self, name: &str) -> Result<Option<InstanceStatus>> {
        let Some(rec) = self.read_record(name) else {
            return Ok(None);
        };
        let dir = self.work_dir(name);
        let zone = self.zone(name).await?;
        let mut last_exit = None;
        let state = if zone.as_deref() == Some("running") {
            match self.client(&rec).instance().await {
                Ok(Some(i)) if i.properties.id == rec.instance_id && i.state.is_running() => {
                    self.ensure_tasks(name, &rec);
                    InstanceState::Running
                }
                Ok(Some(i)) => {
                    last_exit = Some(format!("propolis instance {:?}", i.state));
                    InstanceState::Stopped
                }
                Ok(None) => InstanceState::Stopped,
                Err(e) if e.is_unreachable() => {
                    // Not observable means not serving: reported stopped,
                    // so that the controller starts it again (and backs off
                    // while the server stays away).
                    last_exit = Some(format!("propolis-server at {} does not answer", rec.server));
                    InstanceState::Stopped
                }
                Err(e) => return Err(api_err(name, e)),
            }
        } else {
            InstanceState::Stopped
        };
        if zone.as_deref() != Some("running") {
            self.stop_tasks(name);
        }
        let path = |p: PathBuf| p.exists().then(|| p.display().to_string());
        let runtime = VmRuntime {
            backend: "propolis".into(),
            work_dir: Some(dir.display().to_string()),
            overlay: Some(format!("/dev/zvol/rdsk/{}", self.vm_dataset(name))),
            seed_iso: path(dir.join("seed.iso")),
            pid: None,
            vnc: None,
            ssh_host: None,
            ssh_port: None,
            mac: matches!(rec.network, Network::Vnic { .. }).then(|| rec.mac.clone()),
            instance_id: std::fs::read_to_string(dir.join("instance-id"))
                .ok()
                .map(|s| s.trim().to_owned()),
            last_exit,
            // The volume's size when vmctl set it (a clone has the image's).
            disks: rec
                .disk_gib
                .map(|gib| DiskRuntime {
                    name: ROOT_DISK.to_owned(),
                    size_bytes: gib << 30,
                    path: Some(format!("/dev/zvol/rdsk/{}", self.vm_dataset(name))),
                })
                .into_iter()
                .collect(),
            shares: Vec::new(),
        };
        Ok(Some(InstanceStatus {
            state,
            runtime,
            port_forwards: None,
        }))
    }

    /// Starts the state watcher and the serial bridge of a running VM,
    /// once per instance.
    fn ensure_tasks(&self, name: &str, rec: &VmRecord) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if tasks
            .get(name)
            .is_some_and(|t| t.instance == rec.instance_id)
        {
            return;
        }
        let client = self.client(rec);
        let serial = match serial::spawn(client.clone(), &self.work_dir(name), name) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(vm = name, error = %e, "cannot open the console socket");
                None
            }
        };
        let watcher = tokio::spawn(watch_state(client, name.to_owned(), self.changes.clone()));
        tasks.insert(
            name.to_owned(),
            VmTasks {
                instance: rec.instance_id,
                watcher: watcher.abort_handle(),
                _serial: serial,
            },
        );
    }

    fn stop_tasks(&self, name: &str) {
        let t = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        drop(t);
    }
}

/// Follows the state monitor of one instance and reports every change
/// on `tx`, until the instance is gone or the task is aborted. No polling:
/// each request waits for the next generation.
async fn watch_state(client: Client, name: String, tx: tokio::sync::broadcast::Sender<String>) {
    let mut generation = 0;
    let mut failures: u32 = 0;
    loop {
        match client.state_monitor(generation + 1, api::LONG_POLL).await {
            Ok(r) => {
                failures = 0;
                if r.generation != generation {
                    tracing::debug!(vm = %name, state = ?r.state, generation = r.generation, "propolis state");
                    let _ = tx.send(name.clone());
                }
                generation = r.generation;
                if r.state == PropolisState::Destroyed {
                    return;
                }
            }
            Err(e) if e.is_no_instance() => {
                let _ = tx.send(name.clone());
                return;
            }
            Err(e) => {
                if failures == 0 {
                    tracing::info!(vm = %name, error = %e, "propolis state monitor failed");
                    let _ = tx.send(name.clone());
                }
                failures = failures.saturating_add(1);
                tokio::time::sleep(Duration::from_millis(200 * u64::from(failures.min(25)))).await;
            }
        }
    }
}

/// The located refusal of a network mode Propolis cannot attach.
fn unsupported_network(name: &str, network: &Network) -> Option<DriverError> {
    let mode = match network {
        Network::Vnic { .. } | Network::None => return None,
        Network::User => "user",
        Network::Tap { .. } => "tap",
    };
    Some(DriverError::Permanent(format!(
        "VM {name}: spec.network: mode `{mode}` is not supported by the Propolis backend, which attaches VMs to illumos VNICs; write `network \"vnic\" name=\"vnic0\"` (or `network \"none\"`) in the VM [{UNSUPPORTED}]"
    )))
}

fn refused(op: &str, name: &str) -> DriverError {
    DriverError::Permanent(format!(
        "cannot {op} VM {name}: Propolis cannot pause a VM (propolis-server has no suspend); stop it instead [{UNSUPPORTED}]"
    ))
}

impl Hypervisor for PropolisDriver {
    fn backend(&self) -> &'static str {
        "propolis"
    }

    fn accelerator(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async { Some("bhyve".to_owned()) })
    }

    fn work_dir(&self, name: &str) -> Option<PathBuf> {
        Some(PropolisDriver::work_dir(self, name))
    }

    fn prepare<'a>(&'a self, spec: &'a VmInstanceSpec) -> BoxFuture<'a, Result<InstanceStatus>> {
        Box::pin(async move {
            let lock = self.lock(&spec.name);
            let _guard = lock.lock().await;
            self.do_prepare(spec).await
        })
    }

    fn start<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<InstanceStatus>> {
        Box::pin(async move {
            let lock = self.lock(name);
            let _guard = lock.lock().await;
            self.do_start(name).await
        })
    }

    fn stop<'a>(&'a self, name: &'a str, timeout: Duration) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let lock = self.lock(name);
            let _guard = lock.lock().await;
            self.do_stop(name, timeout).await
        })
    }

    fn suspend<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { Err(refused("suspend", name)) })
    }

    fn resume<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { Err(refused("resume", name)) })
    }

    fn destroy<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let lock = self.lock(name);
            let _guard = lock.lock().await;
            self.do_destroy(name).await
        })
    }

    fn status<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<InstanceStatus>>> {
        Box::pin(async move { self.observe(name).await })
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        Some(self.changes.subscribe())
    }
}
