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

use vmctl_api::{DiskRuntime, ImageSpec, ProvisionStep, ROOT_DISK, VmRuntime};

use super::{
    BoxFuture, DriverError, Hypervisor, ImageFetcher, InstanceSpec, InstanceState, InstanceStatus,
    LocalImage, OutputFn, ProgressFn, Provisioner, Result, SshTarget, StepOutcome,
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
    /// Reads the configuration from the environment:
    ///
    /// * `VMCTL_FAKE_LATENCY_MS`: latency of every operation (default 0);
    /// * `VMCTL_FAKE_FAIL_STARTS`: `vm=n,…`, the first `n` starts of `vm` fail;
    /// * `VMCTL_FAKE_FAIL_PREPARES`: `vm=n,…`, the first `n` prepares of `vm` fail;
    /// * `VMCTL_FAKE_FAIL_IMAGES`: `image,…`, fetches that fail;
    /// * `VMCTL_FAKE_SSH_UNREACHABLE`: `vm,…`, VMs that never answer SSH.
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
            return Ok(InstanceStatus {
                state: to,
                runtime: inst.runtime.clone(),
            });
        }
        if !from.contains(&inst.state) {
            return Err(DriverError::InvalidState {
                op,
                name: name.to_owned(),
                state: inst.state,
            });
        }
        inst.state = to;
        Ok(InstanceStatus {
            state: to,
            runtime: inst.runtime.clone(),
        })
    }
}

impl Hypervisor for FakeHypervisor {
    fn backend(&self) -> &'static str {
        "fake"
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
                // Extra disks are attached and detached while stopped.
                if inst.state == InstanceState::Stopped {
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
                return Ok(InstanceStatus {
                    state: inst.state,
                    runtime: inst.runtime.clone(),
                });
            }
            w.created += 1;
            let port = 20000 + (w.created % 40000) as u16;
            let runtime = VmRuntime {
                backend: "fake".to_owned(),
                work_dir: Some(format!("/fake/vms/{}", spec.name)),
                overlay: Some(format!("/fake/vms/{}/disk.qcow2", spec.name)),
                ssh_host: Some("127.0.0.1".to_owned()),
                ssh_port: Some(port),
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
                ..Default::default()
            };
            let inst = FakeInstance {
                state: InstanceState::Stopped,
                runtime: runtime.clone(),
                starts: 0,
            };
            w.instances.insert(spec.name.clone(), inst);
            Ok(InstanceStatus {
                state: InstanceState::Stopped,
                runtime,
            })
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
                    "disk {disk} of {name} cannot shrink to {bytes} bytes"
                )));
            }
            d.size_bytes = bytes;
            Ok(())
        })
    }

    fn status<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<InstanceStatus>>> {
        Box::pin(async move {
            // Observing is cheap in every real backend too: no latency.
            let w = self.0.lock();
            Ok(w.instances.get(name).map(|i| InstanceStatus {
                state: i.state,
                runtime: i.runtime.clone(),
            }))
        })
    }
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
