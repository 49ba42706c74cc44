//! The driver traits the controllers act through.
//!
//! ```text
//!   ImageController ──▶ ImageFetcher   (ensure an image is on disk)
//!   VmController    ──▶ Hypervisor     (prepare / start / stop / … one instance)
//!   SnapshotCtl     ──▶ Hypervisor     (create / restore / delete snapshots)
//!   ProvisionCtl    ──▶ Provisioner    (wait for SSH, run steps)
//! ```
//!
//! The traits know nothing of QEMU: QMP sockets, pidfiles and command lines
//! live inside the QEMU driver, zones and propolis-server's API inside the
//! Propolis one. Every method is idempotent where the name allows it
//! (`prepare` of a prepared instance, `destroy` of a missing one), because
//! reconcilers run again after a crash without knowing how far they got.
//!
//! The traits return boxed futures so that they can be used as
//! `Arc<dyn Trait>` without the `async-trait` crate.

pub mod cached;
pub mod fake;
pub mod propolis;
pub mod qemu;
pub mod ssh;

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use vmctl_api::{ImageSpec, PortForward, ProvisionStep, SshConfig, VirtualMachineSpec, VmRuntime};

/// A boxed, sendable future, as the driver traits return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Everything a driver operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The instance (or image, or VM) the operation needs does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The operation is not possible in the instance's current state.
    #[error("cannot {op} {name}: instance is {state:?}")]
    InvalidState {
        /// The operation attempted.
        op: &'static str,
        /// The instance's name.
        name: String,
        /// Its state at the time.
        state: InstanceState,
    },
    /// The operation did not finish in time.
    #[error("{0} timed out")]
    Timeout(String),
    /// A failure injected by the fake driver.
    #[error("injected failure: {0}")]
    Injected(String),
    /// A host I/O operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A host address (and port) the operation needs is taken by another
    /// socket (`EADDRINUSE`), described by the backend.
    #[error("{0}")]
    AddressInUse(String),
    /// No connection to the guest could be made (SSH refused, dropped or
    /// silent during the handshake, e.g. while the guest restarts sshd), so
    /// the operation did not start and nothing ran; the same request may
    /// succeed once the guest answers again.
    #[error("{0}")]
    Unreachable(String),
    /// Any other backend failure, described by the backend.
    #[error("{0}")]
    Backend(String),
    /// A failure that retrying the same request cannot fix (the source
    /// refused it, or what it holds is unusable), described by the
    /// backend. Controllers report it as final and wait for the spec to
    /// change instead of retrying.
    #[error("{0}")]
    Permanent(String),
}

impl DriverError {
    /// Whether this failure is [`DriverError::Permanent`].
    pub fn is_permanent(&self) -> bool {
        matches!(self, DriverError::Permanent(_))
    }
}

/// Short for `Result<T, DriverError>`.
pub type Result<T, E = DriverError> = std::result::Result<T, E>;

/// The observed state of a hypervisor instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    /// Prepared (disk, seed) but not running.
    Stopped,
    /// Executing.
    Running,
    /// Paused in memory.
    Suspended,
}

/// What the hypervisor reports about one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceStatus {
    /// Its state.
    pub state: InstanceState,
    /// Runtime details, as shown in the VM's `status.runtime`.
    pub runtime: VmRuntime,
    /// The port forwards in place now (the user's, not vmctl's own SSH
    /// forward); `None` when the backend does not report them or the
    /// instance does not run.
    pub port_forwards: Option<Vec<PortForward>>,
}

/// What the hypervisor needs to prepare an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// The VM's name; instances are keyed by it.
    pub name: String,
    /// The VM object's uid (stable for the object's life; the NIC's MAC is
    /// derived from it).
    pub uid: String,
    /// The VM's spec.
    pub spec: VirtualMachineSpec,
    /// The base image the instance boots from.
    pub image: LocalImage,
}

/// Runs VM instances: QEMU, Propolis, or the fake.
pub trait Hypervisor: Send + Sync + Debug {
    /// The backend's name as shown in `status.runtime.backend`.
    fn backend(&self) -> &'static str;
    /// The accelerator VMs start with (`kvm` or `tcg` for QEMU, `bhyve`
    /// for Propolis), as the node's status shows it; `None` for a backend
    /// without one (the fake). QEMU may boot a probe to find out the
    /// first time (at most a few seconds, then cached per boot).
    fn accelerator(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async { None })
    }
    /// The work directory this driver keeps VM `name`'s instance in (its
    /// disk, seed, sockets), as `status.runtime.workDir` records it:
    /// `<data-dir>/vms/<name>` for QEMU and Propolis. An instance recorded
    /// in another work dir belongs to another agent, which this one does
    /// not act on (the VM controller reports it `NodeLost`). `None` when
    /// the backend cannot say; then only the node name is compared.
    fn work_dir(&self, name: &str) -> Option<std::path::PathBuf> {
        let _ = name;
        None
    }
    /// Whether the guest of the instance `name` has brought its network
    /// interface up since this backend started the instance: `Some(false)`
    /// until then, `None` when the backend cannot tell (an instance it did
    /// not start itself, or no such signal). The SSH probe ([`crate::probe`])
    /// connects sparingly before: with QEMU's user networking each
    /// connection made while the guest's network is down waits inside
    /// QEMU (up to 75 s) and reaches sshd later, all at once.
    fn guest_network_up(&self, name: &str) -> Option<bool> {
        let _ = name;
        None
    }
    /// Creates the instance's disk, seed and configuration if it does not
    /// exist yet; a prepared instance is brought to the spec where that
    /// can be done while stopped (a disk grows; one the spec asks smaller
    /// keeps its size, which the controller reports: never an error).
    fn prepare<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFuture<'a, Result<InstanceStatus>>;
    /// Boots a prepared, stopped instance.
    fn start<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<InstanceStatus>>;
    /// Shuts an instance down, forcefully after `timeout`.
    fn stop<'a>(&'a self, name: &'a str, timeout: Duration) -> BoxFuture<'a, Result<()>>;
    /// Pauses a running instance.
    fn suspend<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>>;
    /// Continues a paused instance.
    fn resume<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>>;
    /// Stops the instance if needed and removes everything it owns. A
    /// missing instance is not an error.
    fn destroy<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>>;
    /// The instance's state, `None` if it does not exist.
    fn status<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<InstanceStatus>>>;
    /// The names of the instances this driver has made (running or not),
    /// whatever the store says: what the agent stops when it fences itself
    /// (`--fence`, having lost its node lease). Default: none known (a
    /// driver that cannot list its instances cannot fence).
    fn instances(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// Whether [`resize_disk`](Self::resize_disk) grows the disk of a
    /// running instance live (the guest sees the new size at once). When
    /// not, a growth waits for the next start, where
    /// [`prepare`](Self::prepare) applies it.
    fn resizes_disks_live(&self) -> bool {
        false
    }
    /// Grows disk `disk` (`root`, or the name of an extra disk) of the
    /// running or paused instance `name` to `bytes`. Disks never shrink:
    /// a smaller `bytes` is an error. Backends that cannot do it live
    /// refuse with [`DriverError::Permanent`].
    fn resize_disk<'a>(
        &'a self,
        name: &'a str,
        disk: &'a str,
        bytes: u64,
    ) -> BoxFuture<'a, Result<()>> {
        let _ = (disk, bytes);
        Box::pin(async move {
            Err(DriverError::Permanent(format!(
                "the {} backend cannot grow a disk of running VM {name}; it grows at the next start",
                self.backend()
            )))
        })
    }
    /// Whether [`attach_disk`](Self::attach_disk) and
    /// [`detach_disk`](Self::detach_disk) work on a running instance
    /// (hot-plug). When not, an extra disk added to or removed from a
    /// running VM's spec waits for the next start, where
    /// [`prepare`](Self::prepare) attaches or detaches it.
    fn hotplugs_disks(&self) -> bool {
        false
    }
    /// Attaches extra disk `disk` to the running instance `name`, live:
    /// its file is made (`disk.size_gib` GiB) when missing and grown when
    /// smaller, and the guest sees it with its name as serial, as after a
    /// start. Returns the disk as [`status`](Self::status) will report it.
    /// One attached already is not an error. Backends without hot-plug
    /// refuse with [`DriverError::Permanent`].
    fn attach_disk<'a>(
        &'a self,
        name: &'a str,
        disk: &'a vmctl_api::Disk,
    ) -> BoxFuture<'a, Result<vmctl_api::DiskRuntime>> {
        let _ = disk;
        Box::pin(async move { Err(no_hotplug(self.backend(), name)) })
    }
    /// Detaches extra disk `disk` from the running instance `name`, live,
    /// once the guest has released it (a guest that does not is an
    /// error). Its file is kept (until [`destroy`](Self::destroy)). One not
    /// attached is not an error. Backends without hot-plug refuse with
    /// [`DriverError::Permanent`].
    fn detach_disk<'a>(&'a self, name: &'a str, disk: &'a str) -> BoxFuture<'a, Result<()>> {
        let _ = disk;
        Box::pin(async move { Err(no_hotplug(self.backend(), name)) })
    }
    /// Puts port forward `fwd` in place on the running (or paused)
    /// instance `name`, live. A host port another socket holds is
    /// [`DriverError::AddressInUse`]. Backends without port forwards
    /// refuse with [`DriverError::Permanent`].
    fn add_port_forward<'a>(
        &'a self,
        name: &'a str,
        fwd: &'a PortForward,
    ) -> BoxFuture<'a, Result<()>> {
        let _ = fwd;
        Box::pin(async move { Err(no_port_forwards(self.backend(), name)) })
    }
    /// Takes port forward `fwd` away from the running (or paused)
    /// instance `name`, live; one not in place is not an error.
    fn remove_port_forward<'a>(
        &'a self,
        name: &'a str,
        fwd: &'a PortForward,
    ) -> BoxFuture<'a, Result<()>> {
        let _ = fwd;
        Box::pin(async move { Err(no_port_forwards(self.backend(), name)) })
    }
    /// The snapshots of instance `name`, oldest first; an instance that
    /// does not exist is [`DriverError::NotFound`]. Backends without
    /// snapshots answer an empty list.
    fn snapshots<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<SnapshotInfo>>> {
        let _ = name;
        Box::pin(async move { Ok(Vec::new()) })
    }
    /// Saves snapshot `snapshot` of instance `name`: of every disk, and of
    /// the memory and device state when the instance runs (or is paused),
    /// which then goes on running; a stopped instance's disks only. One
    /// that exists already is returned as it is. Backends without
    /// snapshots refuse with [`DriverError::Permanent`].
    fn create_snapshot<'a>(
        &'a self,
        name: &'a str,
        snapshot: &'a str,
    ) -> BoxFuture<'a, Result<SnapshotInfo>> {
        let _ = snapshot;
        Box::pin(async move { Err(no_snapshots(self.backend(), name)) })
    }
    /// Brings instance `name` back to snapshot `snapshot`: a running (or
    /// paused) instance to its memory state too, staying in the run state
    /// it had; a stopped one to its disks only. A running instance and a
    /// snapshot without memory state is [`DriverError::InvalidState`]
    /// (stop it first); a snapshot it does not have is
    /// [`DriverError::NotFound`].
    fn restore_snapshot<'a>(
        &'a self,
        name: &'a str,
        snapshot: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        let _ = snapshot;
        Box::pin(async move { Err(no_snapshots(self.backend(), name)) })
    }
    /// Removes snapshot `snapshot` of instance `name` from its disks; a
    /// missing snapshot or instance is not an error.
    fn delete_snapshot<'a>(
        &'a self,
        name: &'a str,
        snapshot: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        let _ = (name, snapshot);
        Box::pin(async move { Ok(()) })
    }
    /// Names of instances whose state changed by itself (the guest powered
    /// off or paused, the hypervisor process died), for backends that are
    /// told; `None` when the controller has to poll [`status`](Self::status).
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        None
    }
}

/// One snapshot of an instance, as the hypervisor keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its name (the qcow2 snapshot tag: the Snapshot object's name).
    pub name: String,
    /// Whether memory and device state were saved with the disks.
    pub memory: bool,
    /// Bytes of memory state saved (0 without).
    pub vm_state_bytes: u64,
    /// When it was saved.
    pub created: Option<vmctl_api::Time>,
    /// The disks holding it (`root` first, then extra disks by name).
    pub disks: Vec<String>,
}

/// What a backend without snapshots answers.
fn no_snapshots(backend: &str, name: &str) -> DriverError {
    DriverError::Permanent(format!(
        "the {backend} backend cannot take or restore snapshots of VM {name}"
    ))
}

/// What a backend without disk hot-plug answers.
fn no_hotplug(backend: &str, name: &str) -> DriverError {
    DriverError::Permanent(format!(
        "the {backend} backend cannot attach or detach a disk of running VM {name}; it is done at the next start"
    ))
}

/// What a backend without port forwards answers.
fn no_port_forwards(backend: &str, name: &str) -> DriverError {
    DriverError::Permanent(format!(
        "the {backend} backend cannot forward ports to VM {name}"
    ))
}

/// An image available on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    /// Path of the image file.
    pub path: String,
    /// Its format (`qcow2`, `raw`).
    pub format: String,
    /// File size in bytes.
    pub size_bytes: u64,
    /// Virtual disk size in bytes, when known.
    pub virtual_size_bytes: Option<u64>,
}

/// Download progress reported by [`ImageFetcher::ensure`]: bytes done, total if known.
pub type ProgressFn<'a> = &'a (dyn Fn(u64, Option<u64>) + Send + Sync);

/// Makes images available locally (copy, download, decompress, verify).
pub trait ImageFetcher: Send + Sync + Debug {
    /// The image if it is already available and matches `spec`, without
    /// fetching anything.
    fn lookup<'a>(
        &'a self,
        name: &'a str,
        spec: &'a ImageSpec,
    ) -> BoxFuture<'a, Result<Option<LocalImage>>>;
    /// Makes the image available, fetching it if needed.
    fn ensure<'a>(
        &'a self,
        name: &'a str,
        spec: &'a ImageSpec,
        progress: ProgressFn<'a>,
    ) -> BoxFuture<'a, Result<LocalImage>>;
    /// Removes what [`ensure`](Self::ensure) stored for `spec` (a downloaded
    /// file), never a user's own file. Removing nothing is not an error.
    fn remove<'a>(&'a self, name: &'a str, spec: &'a ImageSpec) -> BoxFuture<'a, Result<()>>;
}

/// Where and how to reach a VM over SSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// The VM's name.
    pub vm: String,
    /// The VM's runtime (host, port, instance id).
    pub runtime: VmRuntime,
    /// The SSH settings of the VM's spec.
    pub ssh: Option<SshConfig>,
}

/// How one step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepOutcome {
    /// The exit code (0 for a successful file upload).
    pub exit_code: i32,
}

/// Output of a running step, line by line.
pub type OutputFn<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// Runs provisioning steps on a VM.
pub trait Provisioner: Send + Sync + Debug {
    /// Waits until the VM answers SSH, at most `timeout`.
    fn wait_ssh<'a>(
        &'a self,
        target: &'a SshTarget,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<()>>;
    /// One readiness probe of the VM's sshd: a fresh connection answered
    /// by an SSH banner within `timeout`, then a handshake and the host
    /// key the VM was given (bounded by the driver). `Err` says why not
    /// (nothing listening yet, another host key, …); the prober
    /// ([`crate::probe`]) repeats it.
    fn probe_ssh<'a>(
        &'a self,
        target: &'a SshTarget,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<()>>;
    /// Runs a readiness probe of the user's own ([`vmctl_api::Probe`])
    /// once, within `timeout`: `Ok` when it passes, `Err` saying why not
    /// (the command's exit code and output, the refused port, or that the
    /// guest could not be reached).
    fn run_probe<'a>(
        &'a self,
        target: &'a SshTarget,
        probe: &'a vmctl_api::Probe,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<()>>;
    /// Runs one step. A step that ran and exited non-zero is `Ok` with its
    /// exit code; `Err` means it could not be run at all, and
    /// [`DriverError::Unreachable`] that no connection could be made, so
    /// that nothing of it ran and it may be run again.
    fn run_step<'a>(
        &'a self,
        target: &'a SshTarget,
        index: u32,
        step: &'a ProvisionStep,
        output: OutputFn<'a>,
    ) -> BoxFuture<'a, Result<StepOutcome>>;
}
