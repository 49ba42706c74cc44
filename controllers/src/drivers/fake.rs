//! In-memory drivers for testing and benchmarking the control plane.
//!
//! The three fakes share one [`FakeWorld`]: its instances stand in for
//! hypervisor processes, which outlive an agent, so a test can stop the
//! controllers, reopen the store and start them again against the same
//! world. Every operation waits [`FakeConfig::latency`] first; failures are
//! injected through the config, which tests may change while controllers run
//! ([`FakeWorld::configure`]).
//!
//! The fake is never the default: the agent selects it with
//! `--driver fake` or `VMCTL_DRIVER=fake`, configured by [`FakeConfig::from_env`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vmctl_api::{DiskRuntime, ImageSpec, PortForward, ProvisionStep, ROOT_DISK, VmRuntime};

use super::{
    BoxFuture, DriverError, Hypervisor, ImageFetcher, InstanceSpec, InstanceState, InstanceStatus,
    LocalImage, OutputFn, ProgressFn, Provisioner, Result, SnapshotInfo, SshTarget, StepOutcome,
};

/// Latency and injected failures of the fake drivers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeConfig {
    /// How long every operation takes.
    pub latency: Duration,
    /// VM name → how many of its next starts fail.
    pub fail_starts: HashMap<String, u32>,
    /// VM name → how many of its next prepares fail.
    pub fail_prepares: HashMap<String, u32>,
    /// Images whose fetch fails.
    pub fail_images: HashSet<String>,
    /// VMs that never answer SSH.
    pub ssh_unreachable: HashSet<String>,
    /// (VM name, step index) of provisioning steps that exit 1.
    pub fail_steps: HashSet<(String, u32)>,
    /// (VM name, step index) → how many of that step's next runs cannot
    /// connect ([`DriverError::Unreachable`]: nothing of it runs), as when
    /// the guest restarts sshd.
    pub unreachable_steps: HashMap<(String, u32), u32>,
    /// (VM name, [`vmctl_api::Probe::describe`]) of readiness probes that
    /// fail.
    pub failing_probes: HashSet<(String, String)>,
    /// Host ports another program holds: a port forward from one fails as
    /// QEMU's would ([`DriverError::AddressInUse`]).
    pub busy_ports: HashSet<u16>,
    /// VMs whose snapshots cannot be saved (as a full disk would refuse).
    pub fail_snapshots: HashSet<String>,
    /// VMs whose snapshots cannot be listed (as a monitor that refuses
    /// `query-named-block-nodes`, or a `qemu-img` that fails, would).
    pub fail_snapshot_lists: HashSet<String>,
    /// The data directory the fake's instances live in: work dirs are
    /// `<data_dir>/vms/<name>` (default `/fake`, nothing is written
    /// there). Two fake worlds with different data directories stand for
    /// two agents' hosts or data directories.
    pub data_dir: Option<std::path::PathBuf>,
    /// VMs whose disk hot-plugs and hot-unplugs fail (as a QEMU without a
    /// free root port, or a guest that does not release a disk, would).
    pub fail_hotplugs: HashSet<String>,
    /// VMs whose hypervisor does not answer (as a wedged QEMU's QMP does
    /// not): inspecting them and deleting their snapshots fail; stop and
    /// destroy still end them (they kill).
    pub unresponsive: HashSet<String>,
}

/// The error of a VM in [`FakeConfig::unresponsive`].
fn unresponsive(name: &str) -> DriverError {
    DriverError::Injected(format!("the hypervisor of {name} does not answer"))
}

/// Errors reading a [`FakeConfig`] from the environment.
#[derive(Debug, thiserror::Error)]
pub enum FakeConfigError {
    /// A variable's value is not in the expected form.
    #[error("invalid {var}={value:?}: expected {expected}")]
    Invalid {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
}

impl FakeConfig {
    /// The work dir of VM `name`: `<data_dir>/vms/<name>`.
    pub fn work_dir(&self, name: &str) -> std::path::PathBuf {
        let root = self
            .data_dir
            .as_deref()
            .unwrap_or(std::path::Path::new("/fake"));
        root.join("vms").join(name)
    }

    /// Reads the configuration from the environment:
    ///
    /// * `VMCTL_FAKE_LATENCY_MS`: latency of every operation (default 0);
    /// * `VMCTL_FAKE_FAIL_STARTS`: `vm=n,…`, the first `n` starts of `vm` fail;
    /// * `VMCTL_FAKE_FAIL_PREPARES`: `vm=n,…`, the first `n` prepares of `vm` fail;
    /// * `VMCTL_FAKE_FAIL_IMAGES`: `image,…`, fetches that fail;
    /// * `VMCTL_FAKE_SSH_UNREACHABLE`: `vm,…`, VMs that never answer SSH;
    /// * `VMCTL_FAKE_BUSY_PORTS`: `port,…`, host ports another program holds;
    /// * `VMCTL_FAKE_FAIL_SNAPSHOTS`: `vm,…`, VMs whose snapshots fail;
    /// * `VMCTL_FAKE_FAIL_SNAPSHOT_LISTS`: `vm,…`, VMs whose snapshots cannot be listed;
    /// * `VMCTL_FAKE_FAIL_HOTPLUGS`: `vm,…`, VMs whose disk hot-plugs fail.
    pub fn from_env() -> Result<Self, FakeConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Like [`from_env`](Self::from_env), reading variables through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, FakeConfigError> {
        let mut cfg = FakeConfig::default();
        if let Some(v) = get("VMCTL_FAKE_LATENCY_MS") {
            let ms = v
                .trim()
                .parse::<u64>()
                .map_err(|_| FakeConfigError::Invalid {
                    var: "VMCTL_FAKE_LATENCY_MS",
                    value: v.clone(),
                    expected: "milliseconds",
                })?;
            cfg.latency = Duration::from_millis(ms);
        }
        for (var, map) in [
            ("VMCTL_FAKE_FAIL_STARTS", &mut cfg.fail_starts),
            ("VMCTL_FAKE_FAIL_PREPARES", &mut cfg.fail_prepares),
        ] {
            let Some(v) = get(var) else { continue };
            for item in v.split(',').filter(|s| !s.trim().is_empty()) {
                let parsed = item
                    .split_once('=')
                    .and_then(|(vm, n)| Some((vm.trim().to_owned(), n.trim().parse().ok()?)));
                let (vm, n) = parsed.ok_or_else(|| FakeConfigError::Invalid {
                    var,
                    value: v.clone(),
                    expected: "vm=count,…",
                })?;
                map.insert(vm, n);
            }
        }
        let names = |var: &str| -> HashSet<String> {
            get(var)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        cfg.fail_images = names("VMCTL_FAKE_FAIL_IMAGES");
        cfg.ssh_unreachable = names("VMCTL_FAKE_SSH_UNREACHABLE");
        cfg.fail_snapshots = names("VMCTL_FAKE_FAIL_SNAPSHOTS");
        cfg.fail_snapshot_lists = names("VMCTL_FAKE_FAIL_SNAPSHOT_LISTS");
        cfg.fail_hotplugs = names("VMCTL_FAKE_FAIL_HOTPLUGS");
        for p in names("VMCTL_FAKE_BUSY_PORTS") {
            let port = p.parse().map_err(|_| FakeConfigError::Invalid {
                var: "VMCTL_FAKE_BUSY_PORTS",
                value: p.clone(),
                expected: "port,…",
            })?;
            cfg.busy_ports.insert(port);
        }
        Ok(cfg)
    }
}

/// One fake hypervisor instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeInstance {
    /// Its state.
    pub state: InstanceState,
    /// Its runtime details.
    pub runtime: VmRuntime,
    /// How many times it was started.
    pub starts: u32,
    /// Its port forwards in place (none while stopped).
    pub forwards: Vec<PortForward>,
    /// Its snapshots, oldest first.
    pub snapshots: Vec<SnapshotInfo>,
    /// Every restore, in order: (snapshot, whether memory state was
    /// loaded, i.e. the instance was running or paused).
    pub restores: Vec<(String, bool)>,
}

impl FakeInstance {
    fn status(&self) -> InstanceStatus {
        InstanceStatus {
            state: self.state,
            runtime: self.runtime.clone(),
            port_forwards: (self.state != InstanceState::Stopped).then(|| self.forwards.clone()),
        }
    }
}

#[derive(Debug, Default)]
struct WorldState {
    config: FakeConfig,
    instances: BTreeMap<String, FakeInstance>,
    images: BTreeMap<String, LocalImage>,
    /// (VM, step index) of every step run, in order.
    steps_run: Vec<(String, u32)>,
    /// Instances ever created, for tests that look for duplicates.
    created: u64,
}

/// The shared state of the fake drivers; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct FakeWorld {
    state: Arc<Mutex<WorldState>>,
}

impl FakeWorld {
    /// A world with no instances or images.
    pub fn new(config: FakeConfig) -> Self {
        FakeWorld {
            state: Arc::new(Mutex::new(WorldState {
                config,
                ..Default::default()
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, WorldState> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the configuration (latency, injected failures) at runtime.
    pub fn configure(&self, f: impl FnOnce(&mut FakeConfig)) {
        f(&mut self.lock().config);
    }

    /// A copy of the instances, by VM name.
    pub fn instances(&self) -> BTreeMap<String, FakeInstance> {
        self.lock().instances.clone()
    }

    /// How many instances were ever created (a recreated VM counts twice).
    pub fn instances_created(&self) -> u64 {
        self.lock().created
    }

    /// Every provisioning step run so far, as (VM, step index).
    pub fn steps_run(&self) -> Vec<(String, u32)> {
        self.lock().steps_run.clone()
    }

    async fn delay(&self) {
        let latency = self.lock().config.latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }

    /// The three drivers, sharing this world.
    pub fn drivers(&self) -> crate::Drivers {
        crate::Drivers {
            hypervisor: Arc::new(FakeHypervisor(self.clone())),
            images: Arc::new(FakeImageFetcher(self.clone())),
            provisioner: Arc::new(FakeProvisioner(self.clone())),
        }
    }
}

/// The fake [`Hypervisor`].
#[derive(Debug, Clone)]
pub struct FakeHypervisor(pub FakeWorld);

impl FakeHypervisor {
    fn transition(
        &self,
        op: &'static str,
        name: &str,
        from: &[InstanceState],
        to: InstanceState,
    ) -> Result<InstanceStatus> {
        let mut w = self.0.lock();
        let inst = w
            .instances
            .get_mut(name)
            .ok_or_else(|| DriverError::NotFound(name.to_owned()))?;
        if inst.state == to {
            return Ok(inst.status());
        }
        if !from.contains(&inst.state) {
            return Err(DriverError::InvalidState {
                op,
                name: name.to_owned(),
                state: inst.state,
            });
        }
        inst.state = to;
        if to == InstanceState::Stopped {
            // The hypervisor process and its forwards are gone.
            inst.forwards.clear();
        }
        Ok(inst.status())
    }
}

impl Hypervisor for FakeHypervisor {
    fn backend(&self) -> &'static str {
        "fake"
    }

    fn work_dir(&self, name: &str) -> Option<std::path::PathBuf> {
        Some(self.0.lock().config.work_dir(name))
    }

    fn prepare<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFuture<'a, Result<InstanceStatus>> {
        Box::pin(async move {
            self.0.delay().await;
            let mut w = self.0.lock();
            if let Some(n) = w.config.fail_prepares.get_mut(&spec.name)
                && *n > 0
            {
                *n -= 1;
                return Err(DriverError::Injected(format!("prepare of {}", spec.name)));
            }
            // Disks as QEMU's: the root disk has the image's size unless
            // the spec asks more; a disk grows, never shrinks.
            let root = spec
                .image
                .virtual_size_bytes
                .unwrap_or(spec.image.size_bytes)
                .max(spec.spec.disk_gib.unwrap_or(0) << 30);
            if let Some(inst) = w.instances.get_mut(&spec.name) {
                grow_disk(&mut inst.runtime, ROOT_DISK, root);
                // Extra disks are attached and detached while stopped,
                // and the display changes then.
                if inst.state == InstanceState::Stopped {
                    inst.runtime.vnc = fake_vnc(spec);
                    let want = &spec.spec.disks;
                    inst.runtime
                        .disks
                        .retain(|d| d.name == ROOT_DISK || want.iter().any(|s| s.name == d.name));
                }
                for d in &spec.spec.disks {
                    let attached = inst.runtime.disks.iter().any(|x| x.name == d.name);
                    if attached || inst.state == InstanceState::Stopped {
                        grow_disk(&mut inst.runtime, &d.name, d.size_gib << 30);
                    }
                }
                return Ok(inst.status());
            }
            w.created += 1;
            let port = 20000 + (w.created % 40000) as u16;
            let work_dir = w.config.work_dir(&spec.name);
            let runtime = VmRuntime {
                backend: "fake".to_owned(),
                overlay: Some(work_dir.join("disk.qcow2").display().to_string()),
                work_dir: Some(work_dir.display().to_string()),
                ssh_host: Some("127.0.0.1".to_owned()),
                ssh_port: Some(port),
                vnc: fake_vnc(spec),
                instance_id: Some(uuid::Uuid::new_v4().to_string()),
                disks: std::iter::once(DiskRuntime {
                    name: ROOT_DISK.to_owned(),
                    size_bytes: root,
                    path: Some(format!("/fake/vms/{}/disk.qcow2", spec.name)),
                })
                .chain(spec.spec.disks.iter().map(|d| DiskRuntime {
                    name: d.name.clone(),
                    size_bytes: d.size_gib << 30,
                    path: Some(format!("/fake/vms/{}/disk-{}.qcow2", spec.name, d.name)),
                }))
                .collect(),
                // As the QEMU driver serves them where virtiofsd is found.
                shares: spec
                    .spec
                    .shares
                    .iter()
                    .enumerate()
                    .map(|(i, s)| vmctl_api::ShareRuntime {
                        mount_path: s.mount_path.clone(),
                        host_path: s.host_path.clone(),
                        type_: vmctl_api::ShareType::Virtiofs,
                        read_only: s.read_only,
                        tag: format!("vmctl-share{i}"),
                    })
                    .collect(),
                ..Default::default()
            };
            let inst = FakeInstance {
                state: InstanceState::Stopped,
                runtime,
                starts: 0,
                forwards: Vec::new(),
                snapshots: Vec::new(),
                restores: Vec::new(),
            };
            let status = inst.status();
            w.instances.insert(spec.name.clone(), inst);
            Ok(status)
        })
    }

    fn start<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<InstanceStatus>> {
        Box::pin(async move {
            self.0.delay().await;
            {
                let mut w = self.0.lock();
                if let Some(n) = w.config.fail_starts.get_mut(name)
                    && *n > 0
                {
                    *n -= 1;
                    return Err(DriverError::Injected(format!("start of {name}")));
                }
                if let Some(inst) = w.instances.get_mut(name)
                    && inst.state == InstanceState::Stopped
                {
                    inst.starts += 1;
                }
            }
            self.transition(
                "start",
                name,
                &[InstanceState::Stopped],
                InstanceState::Running,
            )
        })
    }

    fn stop<'a>(&'a self, name: &'a str, _timeout: Duration) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.0.delay().await;
            let from = [InstanceState::Running, InstanceState::Suspended];
            self.transition("stop", name, &from, InstanceState::Stopped)
                .map(drop)
        })
    }

    fn suspend<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.0.delay().await;
            self.transition(
                "suspend",
                name,
                &[InstanceState::Running],
                InstanceState::Suspended,
            )
            .map(drop)
        })
    }

    fn resume<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.0.delay().await;
            self.transition(
                "resume",
                name,
                &[InstanceState::Suspended],
                InstanceState::Running,
            )
            .map(drop)
        })
    }

    fn destroy<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.0.delay().await;
            self.0.lock().instances.remove(name);
            Ok(())
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
            self.0.delay().await;
            let mut w = self.0.lock();
            let inst = w
                .instances
                .get_mut(name)
                .ok_or_else(|| DriverError::NotFound(name.to_owned()))?;
            let d = inst
                .runtime
                .disks
                .iter_mut()
                .find(|d| d.name == disk)
                .ok_or_else(|| DriverError::NotFound(format!("disk {disk} of {name}")))?;
            if bytes < d.size_bytes {
                return Err(DriverError::Permanent(format!(
                    "disk {disk} of {name} cannot shrink to {}",
                    vmctl_api::limits::human_bytes(bytes)
                )));
            }
            d.size_bytes = bytes;
            Ok(())
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
            self.0.delay().await;
            let mut w = self.0.lock();
            if w.config.fail_hotplugs.contains(name) {
                return Err(DriverError::Injected(format!(
                    "hot-plug of disk {} of {name}",
                    disk.name
                )));
            }
            let path = w
                .config
                .work_dir(name)
                .join(format!("disk-{}.qcow2", disk.name));
            let inst = running_instance(&mut w, "attach a disk to", name)?;
            // Its file, like QEMU's, keeps the size it had if larger.
            grow_disk(&mut inst.runtime, &disk.name, disk.size_gib << 30);
            let d = inst.runtime.disks.iter_mut().find(|d| d.name == disk.name);
            let d = d.expect("just added");
            d.path = Some(path.display().to_string());
            Ok(d.clone())
        })
    }

    fn detach_disk<'a>(&'a self, name: &'a str, disk: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.0.delay().await;
            let mut w = self.0.lock();
            if w.config.fail_hotplugs.contains(name) {
                return Err(DriverError::Injected(format!(
                    "hot-unplug of disk {disk} of {name}"
                )));
            }
            let inst = running_instance(&mut w, "detach a disk from", name)?;
            inst.runtime.disks.retain(|d| d.name != disk);
            Ok(())
        })
    }

    fn snapshots<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<SnapshotInfo>>> {
        Box::pin(async move {
            let w = self.0.lock();
            if w.config.fail_snapshot_lists.contains(name) {
                return Err(DriverError::Injected(format!("snapshot list of {name}")));
            }
            w.instances
                .get(name)
                .map(|i| i.snapshots.clone())
                .ok_or_else(|| DriverError::NotFound(name.to_owned()))
        })
    }

    fn create_snapshot<'a>(
        &'a self,
        name: &'a str,
        snapshot: &'a str,
    ) -> BoxFuture<'a, Result<SnapshotInfo>> {
        Box::pin(async move {
            self.0.delay().await;
            let mut w = self.0.lock();
            if w.config.fail_snapshots.contains(name) {
                return Err(DriverError::Injected(format!("snapshot of {name}")));
            }
            let inst = w
                .instances
                .get_mut(name)
                .ok_or_else(|| DriverError::NotFound(name.to_owned()))?;
            if let Some(s) = inst.snapshots.iter().find(|s| s.name == snapshot) {
                return Ok(s.clone());
            }
            let memory = inst.state != InstanceState::Stopped;
            let info = SnapshotInfo {
                name: snapshot.to_owned(),
                memory,
                // The fake's "memory": a fixed size per MiB of nothing.
                vm_state_bytes: if memory { 1 << 20 } else { 0 },
                created: Some(chrono::Utc::now()),
                disks: inst.runtime.disks.iter().map(|d| d.name.clone()).collect(),
            };
            inst.snapshots.push(info.clone());
            Ok(info)
        })
    }

    fn restore_snapshot<'a>(
        &'a self,
        name: &'a str,
        snapshot: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.0.delay().await;
            let mut w = self.0.lock();
            let inst = w
                .instances
                .get_mut(name)
                .ok_or_else(|| DriverError::NotFound(name.to_owned()))?;
            let info = inst
                .snapshots
                .iter()
                .find(|s| s.name == snapshot)
                .ok_or_else(|| DriverError::NotFound(format!("snapshot {snapshot} of {name}")))?;
            let live = inst.state != InstanceState::Stopped;
            if live && !info.memory {
                return Err(DriverError::InvalidState {
                    op: "restore a disk-only snapshot to",
                    name: name.to_owned(),
                    state: inst.state,
                });
            }
            inst.restores.push((snapshot.to_owned(), live));
            Ok(())
        })
    }

    fn delete_snapshot<'a>(
        &'a self,
        name: &'a str,
        snapshot: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.0.delay().await;
            let mut w = self.0.lock();
            if w.config.unresponsive.contains(name) {
                return Err(unresponsive(name));
            }
            if let Some(inst) = w.instances.get_mut(name) {
                inst.snapshots.retain(|s| s.name != snapshot);
            }
            Ok(())
        })
    }

    fn instances(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move { Ok(self.0.lock().instances.keys().cloned().collect()) })
    }

    fn status<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<InstanceStatus>>> {
        Box::pin(async move {
            // Observing is cheap in every real backend too: no latency.
            let w = self.0.lock();
            // A stopped instance has no hypervisor process to ask.
            let running = w
                .instances
                .get(name)
                .is_some_and(|i| i.state != InstanceState::Stopped);
            if w.config.unresponsive.contains(name) && running {
                return Err(unresponsive(name));
            }
            Ok(w.instances.get(name).map(FakeInstance::status))
        })
    }

    fn add_port_forward<'a>(
        &'a self,
        name: &'a str,
        fwd: &'a PortForward,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.0.delay().await;
            let mut w = self.0.lock();
            // As a host's sockets: another program's port, or another
            // instance's forward, is in use.
            let held = w.config.busy_ports.contains(&fwd.host_port)
                || w.instances.iter().any(|(n, i)| {
                    i.forwards
                        .iter()
                        .any(|g| g.clashes_with(fwd) && !(n == name && g == fwd))
                });
            if held {
                return Err(DriverError::AddressInUse(format!(
                    "host port {}/{} on {} is in use",
                    fwd.host_port,
                    fwd.protocol.as_str(),
                    fwd.address
                )));
            }
            let inst = w
                .instances
                .get_mut(name)
                .ok_or_else(|| DriverError::NotFound(name.to_owned()))?;
            if inst.state == InstanceState::Stopped {
                return Err(DriverError::InvalidState {
                    op: "forward a port of",
                    name: name.to_owned(),
                    state: inst.state,
                });
            }
            if !inst.forwards.contains(fwd) {
                inst.forwards.push(fwd.clone());
            }
            Ok(())
        })
    }

    fn remove_port_forward<'a>(
        &'a self,
        name: &'a str,
        fwd: &'a PortForward,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.0.delay().await;
            let mut w = self.0.lock();
            if let Some(inst) = w.instances.get_mut(name) {
                inst.forwards.retain(|g| g != fwd);
            }
            Ok(())
        })
    }
}

/// The instance `name`, which must be running for `op`.
fn running_instance<'w>(
    w: &'w mut WorldState,
    op: &'static str,
    name: &str,
) -> Result<&'w mut FakeInstance> {
    let inst = w
        .instances
        .get_mut(name)
        .ok_or_else(|| DriverError::NotFound(name.to_owned()))?;
    if inst.state != InstanceState::Running {
        return Err(DriverError::InvalidState {
            op,
            name: name.to_owned(),
            state: inst.state,
        });
    }
    Ok(inst)
}

/// The VNC address a fake instance reports: QEMU's first display.
fn fake_vnc(spec: &InstanceSpec) -> Option<String> {
    (spec.spec.display == vmctl_api::Display::Vnc).then(|| "127.0.0.1:5900".to_owned())
}

/// Grows disk `name` of `rt` to `bytes` (adding it if missing); never shrinks.
fn grow_disk(rt: &mut VmRuntime, name: &str, bytes: u64) {
    match rt.disks.iter_mut().find(|d| d.name == name) {
        Some(d) => d.size_bytes = d.size_bytes.max(bytes),
        None => rt.disks.push(DiskRuntime {
            name: name.to_owned(),
            size_bytes: bytes,
            path: None,
        }),
    }
}

/// The fake [`ImageFetcher`]: every image is a 1 MiB qcow2 under `/fake/images`.
#[derive(Debug, Clone)]
pub struct FakeImageFetcher(pub FakeWorld);

impl ImageFetcher for FakeImageFetcher {
    fn lookup<'a>(
        &'a self,
        name: &'a str,
        _spec: &'a ImageSpec,
    ) -> BoxFuture<'a, Result<Option<LocalImage>>> {
        Box::pin(async move { Ok(self.0.lock().images.get(name).cloned()) })
    }

    fn ensure<'a>(
        &'a self,
        name: &'a str,
        _spec: &'a ImageSpec,
        progress: ProgressFn<'a>,
    ) -> BoxFuture<'a, Result<LocalImage>> {
        Box::pin(async move {
            const SIZE: u64 = 1 << 20;
            self.0.delay().await;
            if self.0.lock().config.fail_images.contains(name) {
                return Err(DriverError::Injected(format!("fetch of image {name}")));
            }
            progress(SIZE / 2, Some(SIZE));
            progress(SIZE, Some(SIZE));
            let img = LocalImage {
                path: format!("/fake/images/{name}.qcow2"),
                format: "qcow2".to_owned(),
                size_bytes: SIZE,
                virtual_size_bytes: Some(8 << 30),
            };
            self.0.lock().images.insert(name.to_owned(), img.clone());
            Ok(img)
        })
    }

    fn remove<'a>(&'a self, name: &'a str, _spec: &'a ImageSpec) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.0.lock().images.remove(name);
            Ok(())
        })
    }
}

/// The fake [`Provisioner`]: SSH answers unless configured otherwise; steps
/// exit 0 unless listed in [`FakeConfig::fail_steps`].
#[derive(Debug, Clone)]
pub struct FakeProvisioner(pub FakeWorld);

impl FakeProvisioner {
    /// Whether VM `vm` runs and is not configured to be unreachable.
    fn answers_ssh(&self, vm: &str) -> bool {
        let w = self.0.lock();
        let running = w
            .instances
            .get(vm)
            .is_some_and(|i| i.state == InstanceState::Running);
        running && !w.config.ssh_unreachable.contains(vm)
    }
}

impl Provisioner for FakeProvisioner {
    fn wait_ssh<'a>(
        &'a self,
        target: &'a SshTarget,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.0.delay().await;
            if !self.answers_ssh(&target.vm) {
                return Err(DriverError::Timeout(format!("SSH to {}", target.vm)));
            }
            Ok(())
        })
    }

    fn probe_ssh<'a>(
        &'a self,
        target: &'a SshTarget,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.0.delay().await;
            if !self.answers_ssh(&target.vm) {
                return Err(DriverError::Backend(format!(
                    "no SSH banner from {}",
                    target.vm
                )));
            }
            Ok(())
        })
    }

    fn run_probe<'a>(
        &'a self,
        target: &'a SshTarget,
        probe: &'a vmctl_api::Probe,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.0.delay().await;
            let what = probe.describe();
            let fails = self
                .0
                .lock()
                .config
                .failing_probes
                .contains(&(target.vm.clone(), what.clone()));
            if fails {
                return Err(DriverError::Backend(format!("{what} fails (injected)")));
            }
            Ok(())
        })
    }

    fn run_step<'a>(
        &'a self,
        target: &'a SshTarget,
        index: u32,
        step: &'a ProvisionStep,
        output: OutputFn<'a>,
    ) -> BoxFuture<'a, Result<StepOutcome>> {
        Box::pin(async move {
            self.0.delay().await;
            let fail = {
                let mut w = self.0.lock();
                let key = (target.vm.clone(), index);
                if let Some(n) = w.config.unreachable_steps.get_mut(&key).filter(|n| **n > 0) {
                    *n -= 1;
                    return Err(DriverError::Unreachable(format!(
                        "no SSH connection could be made to VM {}, so nothing ran",
                        target.vm
                    )));
                }
                w.steps_run.push((target.vm.clone(), index));
                w.config.fail_steps.contains(&(target.vm.clone(), index))
            };
            match step {
                ProvisionStep::Shell {
                    inline: Some(cmd), ..
                } => output(&format!("$ {cmd}")),
                ProvisionStep::Shell { .. } => output("$ <script>"),
                ProvisionStep::File { destination, .. } => output(&format!("upload {destination}")),
            }
            Ok(StepOutcome {
                exit_code: if fail { 1 } else { 0 },
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_read_from_the_environment() {
        let env: HashMap<&str, &str> = [
            ("VMCTL_FAKE_LATENCY_MS", "15"),
            ("VMCTL_FAKE_FAIL_STARTS", "a=2, b=1"),
            ("VMCTL_FAKE_FAIL_IMAGES", "debian,"),
        ]
        .into();
        let cfg = FakeConfig::from_lookup(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(cfg.latency, Duration::from_millis(15));
        assert_eq!(cfg.fail_starts.get("a"), Some(&2));
        assert_eq!(cfg.fail_starts.get("b"), Some(&1));
        assert!(cfg.fail_images.contains("debian"));
        assert!(FakeConfig::from_lookup(|_| Some("x".into())).is_err());
    }

    #[tokio::test]
    async fn injected_start_failures_are_used_up_then_starts_succeed() {
        let world = FakeWorld::new(FakeConfig::default());
        world.configure(|c| {
            c.fail_starts.insert("vm".into(), 1);
        });
        let hv = FakeHypervisor(world.clone());
        let spec = InstanceSpec {
            name: "vm".into(),
            uid: "uid-vm".into(),
            spec: serde_json::from_value(serde_json::json!({"image": "i"})).unwrap(),
            image: LocalImage {
                path: "/i".into(),
                format: "raw".into(),
                size_bytes: 1,
                virtual_size_bytes: None,
            },
        };
        hv.prepare(&spec).await.unwrap();
        assert!(matches!(
            hv.start("vm").await,
            Err(DriverError::Injected(_))
        ));
        assert_eq!(hv.start("vm").await.unwrap().state, InstanceState::Running);
        hv.destroy("vm").await.unwrap();
        assert!(hv.status("vm").await.unwrap().is_none());
    }
}
