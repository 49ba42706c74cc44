//! The typed resources: VirtualMachine, Image, Provision, Snapshot and
//! Node, their specs and statuses (Snapshot's in [`crate::snapshot`],
//! Node's in [`crate::node`]).
//!
//! Status follows KubeVirt's shape: one display `phase`, a list of
//! `conditions`, `observedGeneration`, and for VMs a start-failure counter with
//! a backoff deadline. Desired power state is in the spec, never in status.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::{Condition, Kind, Object, ObjectMeta, Time};
pub use crate::node::{NodeAddress, NodeResources, NodeSpec, NodeStatus};
pub use crate::snapshot::{SnapshotPhase, SnapshotSpec, SnapshotStatus};

/// Generates a typed resource struct for one kind, with conversions to and
/// from the kind-erased [`Object`].
macro_rules! resource {
    ($(#[$doc:meta])* $name:ident, $kind:expr, $spec:ty, $status:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct $name {
            /// Always `vmctl/v1alpha1`.
            pub api_version: String,
            /// The kind's name.
            pub kind: Kind,
            /// Metadata.
            pub metadata: ObjectMeta,
            /// What the user wants.
            pub spec: $spec,
            /// What the controllers observed.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub status: Option<$status>,
        }

        impl $name {
            /// The kind of this resource.
            pub const KIND: Kind = $kind;

            /// A new resource with the given name and spec and no status.
            pub fn new(name: impl Into<String>, spec: $spec) -> Self {
                $name {
                    api_version: crate::meta::API_VERSION.to_owned(),
                    kind: $kind,
                    metadata: ObjectMeta::named(name),
                    spec,
                    status: None,
                }
            }

            /// Converts into the kind-erased form the store keeps.
            pub fn to_object(&self) -> Object {
                Object {
                    api_version: self.api_version.clone(),
                    kind: $kind,
                    metadata: self.metadata.clone(),
                    spec: serde_json::to_value(&self.spec).expect("specs always serialise"),
                    status: self
                        .status
                        .as_ref()
                        .map(|s| serde_json::to_value(s).expect("statuses always serialise")),
                }
            }

            /// Converts from the kind-erased form. Fails if the object is of
            /// another kind or its spec or status do not match the types.
            pub fn from_object(obj: &Object) -> Result<Self, serde_json::Error> {
                if obj.kind != $kind {
                    return Err(<serde_json::Error as serde::de::Error>::custom(format!(
                        "expected kind {}, found {}",
                        $kind, obj.kind
                    )));
                }
                Ok($name {
                    api_version: obj.api_version.clone(),
                    kind: $kind,
                    metadata: obj.metadata.clone(),
                    spec: serde_json::from_value(obj.spec.clone())?,
                    status: obj.status.clone().map(serde_json::from_value).transpose()?,
                })
            }
        }
    };
}

resource!(
    /// A virtual machine.
    VirtualMachine,
    Kind::VirtualMachine,
    VirtualMachineSpec,
    VirtualMachineStatus
);
resource!(
    /// A base disk image that VMs boot from (a copy-on-write overlay is made per VM).
    Image,
    Kind::Image,
    ImageSpec,
    ImageStatus
);
resource!(
    /// The provisioning steps run over SSH on one VM after it boots.
    Provision,
    Kind::Provision,
    ProvisionSpec,
    ProvisionStatus
);
resource!(
    /// A point-in-time copy of one VM's disks, and of its memory when it
    /// runs, that the VM can be restored to.
    Snapshot,
    Kind::Snapshot,
    SnapshotSpec,
    SnapshotStatus
);
resource!(
    /// A host running an agent, as that agent registered it: its labels,
    /// capacity, API address and `Ready` condition. Never applied by users.
    Node,
    Kind::Node,
    NodeSpec,
    NodeStatus
);

/// Any one resource, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
#[expect(
    clippy::large_enum_variant,
    reason = "resources are handled a few at a time; boxing would only complicate matching"
)]
pub enum Resource {
    /// A VirtualMachine.
    VirtualMachine(VirtualMachine),
    /// An Image.
    Image(Image),
    /// A Provision.
    Provision(Provision),
    /// A Snapshot.
    Snapshot(Snapshot),
    /// A Node.
    Node(Node),
}

impl Resource {
    /// The resource's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Resource::VirtualMachine(_) => Kind::VirtualMachine,
            Resource::Image(_) => Kind::Image,
            Resource::Provision(_) => Kind::Provision,
            Resource::Snapshot(_) => Kind::Snapshot,
            Resource::Node(_) => Kind::Node,
        }
    }

    /// The resource's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Resource::VirtualMachine(r) => &r.metadata,
            Resource::Image(r) => &r.metadata,
            Resource::Provision(r) => &r.metadata,
            Resource::Snapshot(r) => &r.metadata,
            Resource::Node(r) => &r.metadata,
        }
    }

    /// The resource's metadata, mutably.
    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Resource::VirtualMachine(r) => &mut r.metadata,
            Resource::Image(r) => &mut r.metadata,
            Resource::Provision(r) => &mut r.metadata,
            Resource::Snapshot(r) => &mut r.metadata,
            Resource::Node(r) => &mut r.metadata,
        }
    }

    /// The resource's name.
    pub fn name(&self) -> &str {
        &self.metadata().name
    }

    /// Converts into the kind-erased form the store keeps.
    pub fn to_object(&self) -> Object {
        match self {
            Resource::VirtualMachine(r) => r.to_object(),
            Resource::Image(r) => r.to_object(),
            Resource::Provision(r) => r.to_object(),
            Resource::Snapshot(r) => r.to_object(),
            Resource::Node(r) => r.to_object(),
        }
    }

    /// Converts from the kind-erased form.
    pub fn from_object(obj: &Object) -> Result<Self, serde_json::Error> {
        Ok(match obj.kind {
            Kind::VirtualMachine => Resource::VirtualMachine(VirtualMachine::from_object(obj)?),
            Kind::Image => Resource::Image(Image::from_object(obj)?),
            Kind::Provision => Resource::Provision(Provision::from_object(obj)?),
            Kind::Snapshot => Resource::Snapshot(Snapshot::from_object(obj)?),
            Kind::Node => Resource::Node(Node::from_object(obj)?),
        })
    }
}

// ---------------------------------------------------------------- shared ----

/// A local file whose content matters to the spec. The digest is taken when
/// the file is applied, so that editing the file later is a spec change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalFile {
    /// Absolute path on the host.
    pub path: String,
    /// `sha256:<hex>` of the content when it was applied. Filled in by the
    /// parser when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

// -------------------------------------------------------- VirtualMachine ----

/// The desired power state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum PowerState {
    /// Booted and executing.
    #[default]
    Running,
    /// Shut down; the disk is kept.
    Stopped,
    /// Paused in memory.
    Suspended,
}

/// What happens when a spec change cannot be applied to a running VM
/// (vcpus, memory, disk, network, image, cloud-init).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum UpdatePolicy {
    /// Report a `RestartRequired` condition and keep running; the change
    /// takes effect at the next stop/start.
    #[default]
    RestartRequired,
    /// Stop the VM and start it again with the new spec (the disk is kept).
    /// A change that needs a new disk (the image) is still only reported
    /// (`RecreateRequired`).
    Restart,
    /// Like `Restart`, and a change that needs a new disk (the image)
    /// destroys the VM's disk and recreates it from the new image. Only
    /// this policy, `vmctl reload` and delete ever destroy a disk.
    Recreate,
}

/// Desired state of a virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineSpec {
    /// The name of the Image the VM boots from.
    pub image: String,
    /// Number of virtual CPUs (1–255).
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Memory in MiB (16–4194304).
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Disk size in GiB; when unset the overlay has the base image's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u64>,
    /// Extra (data) disks, empty qcow2 files in the VM's work dir, attached
    /// in this order after the root disk. Kept across stop/start; removed
    /// with the VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    /// Networking.
    #[serde(default)]
    pub network: Network,
    /// Guest initialisation through cloud-init's NoCloud seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
    /// How vmctl connects over SSH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshConfig>,
    /// Desired power state.
    #[serde(default)]
    pub power_state: PowerState,
    /// What to do when a change needs a restart.
    #[serde(default)]
    pub update_policy: UpdatePolicy,
    /// How long a stop waits for the guest to shut down after the ACPI
    /// power button before QEMU is quit (then killed); default 30 seconds.
    /// `vmctl stop --timeout S` sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout_seconds: Option<u32>,
    /// Host ports forwarded to guest ports (user networking only). Added
    /// and removed on a running VM live, without a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_forwards: Vec<PortForward>,
    /// A graphics console (VMFile `display "vnc"`); none by default.
    #[serde(default, skip_serializing_if = "Display::is_none")]
    pub display: Display,
    /// Readiness probes of the user's own (VMFile `probe "exec" { … }`,
    /// `probe "tcp" port=80`), run by the agent over SSH once SSH answers:
    /// the VM is `Ready` only while every one passes. Changed live.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub readiness_probes: Vec<Probe>,
    /// Host directories shared with the guest (VMFile `share "./src"
    /// mount="/src"`), mounted by cloud-init at every boot. Changing them
    /// needs a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<Share>,
    /// Labels a node must carry for the VM to be placed on it (VMFile
    /// `node-selector { zone "a" }`), as Kubernetes' `nodeSelector`: every
    /// pair must match the Node's `metadata.labels`. Empty: any node.
    /// Read by the scheduler (etcd clusters); a one-host agent on sled
    /// runs every VM itself.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub node_selector: std::collections::BTreeMap<String, String>,
    /// The node the VM must run on (VMFile `node "host-b"`), as Kubernetes'
    /// `nodeName` asked by the user: the scheduler binds the VM to that
    /// node only, when it is Ready and has room. `None`: the scheduler
    /// chooses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Seconds after its node is lost (`NodeLost`) before the VM is
    /// re-placed on another node (VMFile `evict-after 300`), with a fresh
    /// disk from its image, provisioned again: what was on the lost node's
    /// disk is not carried over. `None`: never re-placed; the VM waits for
    /// its node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evict_after_seconds: Option<u64>,
}

/// A host directory shared with the guest (VMFile `share "./src"
/// mount="/src" read-only=#true`): virtio-fs through `virtiofsd`, or 9p
/// (`-virtfs`) where there is no usable virtiofsd and for read-only
/// shares (see `status.runtime.shares` for the transport used). The guest
/// mounts it at `mountPath` at every boot through cloud-init's `bootcmd`.
/// A VM with shares cannot be snapshotted while it runs (QEMU refuses to
/// save the state of virtio-fs and 9p devices).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Share {
    /// The directory on the host: an absolute path (a VMFile resolves a
    /// relative one against its own directory). It must exist when applied
    /// and when the VM starts.
    pub host_path: String,
    /// Where the guest mounts it: an absolute path, created if missing.
    pub mount_path: String,
    /// Mounted read-only in the guest, and enforced on the host (9p
    /// `readonly=on`, or virtiofsd `--readonly`): the guest cannot change
    /// the host's files.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// How a share reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ShareType {
    /// virtio-fs (`vhost-user-fs-pci` and a `virtiofsd` per share); the
    /// guest mounts it with `mount -t virtiofs TAG PATH`.
    #[serde(rename = "virtiofs")]
    Virtiofs,
    /// 9p over virtio (`-virtfs local,…`); the guest mounts it with `mount
    /// -t 9p -o trans=virtio,version=9p2000.L TAG PATH`.
    #[serde(rename = "9p")]
    NineP,
}

impl ShareType {
    /// The guest's file system type: `virtiofs` or `9p`.
    pub fn as_str(self) -> &'static str {
        match self {
            ShareType::Virtiofs => "virtiofs",
            ShareType::NineP => "9p",
        }
    }
}

/// One entry of `spec.shares` as the hypervisor serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShareRuntime {
    /// The guest path it is mounted at.
    pub mount_path: String,
    /// The host directory.
    pub host_path: String,
    /// `virtiofs` or `9p`.
    #[serde(rename = "type")]
    pub type_: ShareType,
    /// Whether it is read-only.
    #[serde(default)]
    pub read_only: bool,
    /// The mount tag the guest mounts it by.
    pub tag: String,
}

/// A readiness probe, in the manner of a Kubernetes container's
/// `readinessProbe` (exactly one of `exec` and `tcpSocket`): the agent
/// runs it every `periodSeconds` once the guest answers SSH; it must pass
/// once to count, and fail `failureThreshold` times in a row to stop
/// counting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    /// Run a command in the guest over SSH; it passes when it exits 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecAction>,
    /// Open a TCP connection to a guest port, from inside the guest (an SSH
    /// `direct-tcpip` channel to 127.0.0.1); it passes when the port
    /// accepts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocketAction>,
    /// Seconds between runs (1–3600; default 10).
    #[serde(default = "default_probe_period")]
    pub period_seconds: u32,
    /// Seconds one run may take, SSH connection included, before it
    /// counts as failed (1–3600; default 3).
    #[serde(default = "default_probe_timeout")]
    pub timeout_seconds: u32,
    /// Failures in a row that make a passing probe fail (1–100; default 3,
    /// Kubernetes' default).
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
}

/// A probe's command (Kubernetes' `ExecAction`, but one shell command
/// line, as a provisioning step's `inline`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecAction {
    /// The command line, run by the guest user's shell.
    pub command: String,
}

/// A probe's TCP connection (Kubernetes' `TCPSocketAction`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSocketAction {
    /// The guest port (1–65535), connected to on the guest's 127.0.0.1.
    pub port: u16,
}

fn default_probe_period() -> u32 {
    10
}
fn default_probe_timeout() -> u32 {
    3
}
fn default_failure_threshold() -> u32 {
    3
}

impl Probe {
    /// A probe of `exec` or `tcp_socket` with the default period, timeout
    /// and threshold.
    pub fn new(exec: Option<ExecAction>, tcp_socket: Option<TcpSocketAction>) -> Self {
        Probe {
            exec,
            tcp_socket,
            period_seconds: default_probe_period(),
            timeout_seconds: default_probe_timeout(),
            failure_threshold: default_failure_threshold(),
        }
    }

    /// What it checks, for people: `exec "systemctl is-active nginx"`,
    /// `tcp 80`.
    pub fn describe(&self) -> String {
        match (&self.exec, &self.tcp_socket) {
            (Some(e), _) => format!("exec {:?}", e.command),
            (None, Some(t)) => format!("tcp {}", t.port),
            (None, None) => "nothing".to_owned(),
        }
    }
}

/// A VM's graphics console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum Display {
    /// No graphics device: the serial console only.
    #[default]
    None,
    /// A VGA device and a VNC server on 127.0.0.1, on the first free
    /// display (port 5900-5999), without a password: anyone who can
    /// connect to 127.0.0.1 on the host sees the screen. Its address is
    /// `status.runtime.vnc`. Changing it needs a restart.
    #[serde(rename = "VNC")]
    Vnc,
}

impl Display {
    /// Whether there is no graphics console.
    pub fn is_none(&self) -> bool {
        *self == Display::None
    }
}

/// The transport protocol of a port forward, as Kubernetes spells it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    Serialize,
    Deserialize,
    JsonSchema,
)]
pub enum Protocol {
    /// TCP.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    /// `tcp` or `udp`: how QEMU's `hostfwd` and Docker's `-p 80/udp` write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// The host address a port forward listens on when none is given.
pub const DEFAULT_FORWARD_ADDRESS: &str = "127.0.0.1";

fn default_forward_address() -> String {
    DEFAULT_FORWARD_ADDRESS.to_owned()
}

/// A host port forwarded to a guest port (VMFile `port-forward host=8080
/// guest=80`, `vmctl create --port 8080:80`), through QEMU's user
/// networking (`hostfwd`).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortForward {
    /// The host port (1–65535) that listens on `address`.
    pub host_port: u16,
    /// The guest port (1–65535) connections are forwarded to.
    pub guest_port: u16,
    /// `TCP` (default) or `UDP`.
    #[serde(default)]
    pub protocol: Protocol,
    /// The host IPv4 address to listen on (Kubernetes' `hostIP`); default
    /// `127.0.0.1`, so only this host reaches the guest. Another address
    /// (`0.0.0.0`: every interface) is taken only as written, with a
    /// warning.
    #[serde(default = "default_forward_address")]
    pub address: String,
}

impl PortForward {
    /// A TCP forward on 127.0.0.1.
    pub fn tcp(host_port: u16, guest_port: u16) -> Self {
        PortForward {
            host_port,
            guest_port,
            protocol: Protocol::Tcp,
            address: default_forward_address(),
        }
    }

    /// Docker's notation: `127.0.0.1:8080->80/tcp`.
    pub fn describe(&self) -> String {
        format!(
            "{}:{}->{}/{}",
            self.address,
            self.host_port,
            self.guest_port,
            self.protocol.as_str()
        )
    }

    /// Whether `self` and `other` need the same host socket: one protocol,
    /// one port, and the same address or either on every address
    /// (`0.0.0.0`).
    pub fn clashes_with(&self, other: &PortForward) -> bool {
        let any = |a: &str| a == "0.0.0.0";
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && (self.address == other.address || any(&self.address) || any(&other.address))
    }
}

impl std::str::FromStr for PortForward {
    type Err = String;

    /// Docker's `-p` notation: `8080:80`, `127.0.0.1:8080:80`,
    /// `8080:80/udp` (the address is checked by validation).
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "write HOST:GUEST (8080:80), ADDRESS:HOST:GUEST (127.0.0.1:8080:80), optionally with /tcp or /udp";
        let (ports, protocol) = match s.rsplit_once('/') {
            None => (s, Protocol::Tcp),
            Some((p, proto)) => match proto.to_ascii_lowercase().as_str() {
                "tcp" => (p, Protocol::Tcp),
                "udp" => (p, Protocol::Udp),
                other => {
                    return Err(format!(
                        "unknown protocol `{other}` in `{s}`: use tcp or udp"
                    ));
                }
            },
        };
        let parts: Vec<&str> = ports.rsplitn(3, ':').collect();
        let (guest, host, address) = match parts.as_slice() {
            [guest, host] => (*guest, *host, DEFAULT_FORWARD_ADDRESS),
            [guest, host, address] if !address.is_empty() => (*guest, *host, *address),
            _ => return Err(format!("`{s}` is not a port forward: {usage}")),
        };
        let port = |p: &str, what: &str| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "{what} port `{p}` in `{s}` is not a port (1-65535): {usage}"
            )),
        };
        Ok(PortForward {
            host_port: port(host, "host")?,
            guest_port: port(guest, "guest")?,
            protocol,
            address: address.to_owned(),
        })
    }
}

/// An extra disk of a VM (VMFile `disk "data" size="10G"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Disk {
    /// The disk's name: a DNS-1123 label of at most 20 characters, not
    /// `root`. It is also the disk's virtio serial, so the guest sees it as
    /// `/dev/disk/by-id/virtio-<name>` (and `/sys/block/vdX/serial`).
    pub name: String,
    /// Size in GiB (1–65536). Disks only grow.
    pub size_gib: u64,
}

fn default_vcpus() -> u32 {
    1
}
fn default_memory() -> u64 {
    1024
}

/// Networking mode of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "mode", rename_all = "camelCase", deny_unknown_fields)]
pub enum Network {
    /// QEMU user-mode (SLIRP) networking; SSH through a forwarded loopback port.
    #[default]
    User,
    /// A TAP device on a Linux bridge.
    Tap {
        /// The bridge to attach to.
        #[serde(default = "default_bridge")]
        bridge: String,
    },
    /// An illumos VNIC (Propolis backend).
    Vnic {
        /// The VNIC's name.
        name: String,
    },
    /// No network device.
    None,
}

fn default_bridge() -> String {
    "br0".to_owned()
}

/// cloud-init settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudInit {
    /// Guest hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// A public key file to authorise for the SSH user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_key: Option<LocalFile>,
    /// A raw user-data file passed through instead of the generated one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<LocalFile>,
}

/// SSH connection settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SshConfig {
    /// User to connect as (default `vm`).
    #[serde(default = "default_ssh_user")]
    pub user: String,
    /// Private key file; default: the generated key, then `~/.ssh` defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    /// How long to wait for SSH to answer after boot, in seconds (default 120).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
}

/// The SSH user when none is given.
pub fn default_ssh_user() -> String {
    "vm".to_owned()
}

/// Display phase of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum VmPhase {
    /// Accepted, waiting for its image or to be scheduled.
    #[default]
    Pending,
    /// Disk and seed being prepared, hypervisor starting.
    Starting,
    /// Running.
    Running,
    /// Paused.
    Suspended,
    /// Shutting down.
    Stopping,
    /// Not running.
    Stopped,
    /// Start failed; retrying with backoff.
    CrashLoopBackOff,
    /// An error that retrying will not fix.
    Failed,
    /// Being deleted.
    Terminating,
}

/// Start-failure bookkeeping for backoff.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartFailure {
    /// Consecutive failed starts.
    pub count: u32,
    /// When the last start failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// Not retried before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<Time>,
}

/// What is known about the running VM.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmRuntime {
    /// Hypervisor backend (`qemu`, `propolis`, `fake`).
    #[serde(default)]
    pub backend: String,
    /// Work directory on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<String>,
    /// The qcow2 overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<String>,
    /// The cloud-init seed ISO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_iso: Option<String>,
    /// Hypervisor process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The VNC server's address (`127.0.0.1:5900`) of a running VM with
    /// `display: VNC`, as the hypervisor reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc: Option<String>,
    /// SSH host (127.0.0.1 for user networking, else the guest IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_host: Option<String>,
    /// SSH port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_port: Option<u16>,
    /// The NIC's MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The instance id given to cloud-init; changes when the VM is recreated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// How the hypervisor process last ended, when the VM is not running
    /// (`exited with code 0`, `killed by signal 9`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// The disks as the hypervisor reports them (the root disk first, named
    /// [`ROOT_DISK`]); empty when the backend does not report them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskRuntime>,
    /// The shared folders (`spec.shares`) as the instance was prepared or
    /// started: how each reaches the guest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<ShareRuntime>,
}

/// The name of a VM's root disk (the one made from its image) in
/// `status.runtime.disks` and in conditions and notes.
pub const ROOT_DISK: &str = "root";

/// One disk of a VM as the hypervisor reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskRuntime {
    /// The disk's name: [`ROOT_DISK`] or the name of an entry of `spec.disks`.
    pub name: String,
    /// Its virtual size in bytes, as the hypervisor sees it now (a running
    /// VM's guest sees this size).
    pub size_bytes: u64,
    /// The file (or volume) holding it on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Whether a port forward is in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum PortForwardState {
    /// Not in place: the VM is not running (or not observed yet).
    #[default]
    Pending,
    /// Listening on the host and forwarding to the guest.
    Active,
    /// Could not be set up (the host port is in use, …): see `message`.
    /// Tried again every 30 seconds while the VM runs.
    Failed,
}

/// One entry of `spec.portForwards` and how it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortForwardStatus {
    /// The host port.
    pub host_port: u16,
    /// The guest port.
    pub guest_port: u16,
    /// `TCP` or `UDP`.
    pub protocol: Protocol,
    /// The host address it listens on.
    pub address: String,
    /// Whether it is in place.
    pub state: PortForwardState,
    /// CamelCase, when not Active: `NotRunning`, `HostPortInUse`,
    /// `PortForwardFailed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why it failed (or is pending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When `state` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// A Failed forward is not tried again before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<Time>,
}

impl PortForwardStatus {
    /// The forward this entry is about.
    pub fn forward(&self) -> PortForward {
        PortForward {
            host_port: self.host_port,
            guest_port: self.guest_port,
            protocol: self.protocol,
            address: self.address.clone(),
        }
    }
}

/// Observed state of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStatus {
    /// Display phase.
    #[serde(default)]
    pub phase: VmPhase,
    /// Conditions: `ImageReady`, `Ready`, `SshReady`, `RestartRequired`, …
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Generation of the spec this status reflects.
    #[serde(default)]
    pub observed_generation: u64,
    /// Start failures and backoff.
    #[serde(default)]
    pub start_failures: StartFailure,
    /// The node (the agent's `--node-name`, by default its host name) whose
    /// agent made and runs the VM's instance: its disk lives there, in
    /// `runtime.workDir`. Set when the instance is prepared, started or
    /// adopted; an agent of another node (or with another data directory)
    /// does not act on the instance and reports the VM `NodeLost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Runtime details of the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<VmRuntime>,
    /// Digest of the spec fields that need a restart (vcpus, memory,
    /// network, cloud-init) as the running instance was started with; a spec
    /// that differs raises `RestartRequired` or restarts, per `updatePolicy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_spec: Option<String>,
    /// The Image the VM's disk was created from; a spec naming another
    /// image raises `RecreateRequired` (or recreates, per `updatePolicy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_image: Option<String>,
    /// Each entry of `spec.portForwards`, in order, with its state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_forwards: Vec<PortForwardStatus>,
}

// ----------------------------------------------------------------- Image ----

/// Where an image comes from: `{path: …}` or `{url: …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged, deny_unknown_fields)]
pub enum ImageSource {
    /// A file on the host.
    Path {
        /// Absolute path of the image file.
        path: String,
    },
    /// A URL to download into the cache (`.zst`/`.zstd` are decompressed).
    Url {
        /// The http(s) or file URL.
        url: String,
    },
}

/// An annotation `vmctl image pull` sets (to the time, RFC 3339) on an
/// Image whose fetch failed for good: each new value asks the image
/// controller for one more try.
pub const PULL_REQUESTED_ANNOTATION: &str = "vmctl.dev/pull-requested-at";

/// Desired state of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageSpec {
    /// Where the image comes from.
    pub source: ImageSource,
    /// Expected digest, `sha256:<hex>` or `sha512:<hex>`, verified while downloading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// Display phase of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum ImagePhase {
    /// Not looked at yet.
    #[default]
    Pending,
    /// Being downloaded.
    Downloading,
    /// Available on disk.
    Ready,
    /// Could not be made available.
    Failed,
}

/// Download progress, updated coarsely.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Bytes done.
    pub bytes: u64,
    /// Total bytes, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// Observed state of an image.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageStatus {
    /// Display phase.
    #[serde(default)]
    pub phase: ImagePhase,
    /// Conditions: `Ready`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Generation of the spec this status reflects.
    #[serde(default)]
    pub observed_generation: u64,
    /// Path of the usable image on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Detected format (`qcow2`, `raw`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Size of the file in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Virtual disk size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size_bytes: Option<u64>,
    /// Download progress while downloading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// In a cluster (etcd), each node's own state of the image, by node
    /// name: every node keeps its own copy (its cache is per host), and
    /// fetches it once a VM bound to it needs it (every node fetches an
    /// image no VM uses: one pulled or applied for its own sake). The fields above then
    /// sum the nodes up: `phase` is `Ready` once the image is ready on
    /// some node (its `Ready` condition says on which), and `path` is not
    /// set (each node's is in its entry). Empty on one host (sled).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub nodes: std::collections::BTreeMap<String, ImageStatus>,
}

// ------------------------------------------------------------- Provision ----

/// One provisioning step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum ProvisionStep {
    /// Run a command with the user's shell.
    Shell {
        /// The command line.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        inline: Option<String>,
        /// A local script, uploaded to `/tmp/vmctl-provision-<step>.sh` and run.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        script: Option<LocalFile>,
    },
    /// Upload a local file over SFTP, keeping its mode.
    File {
        /// The local file.
        source: LocalFile,
        /// Absolute path on the guest.
        destination: String,
    },
}

/// Desired state of a VM's provisioning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProvisionSpec {
    /// The VirtualMachine to provision.
    pub vm: String,
    /// Steps, run in order; the first failure stops the run.
    pub steps: Vec<ProvisionStep>,
    /// Changed by `vmctl provision` to ask for a re-run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_token: Option<String>,
}

/// Display phase of a Provision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum ProvisionPhase {
    /// Waiting for the VM to run and answer SSH.
    #[default]
    Pending,
    /// Steps are running.
    Running,
    /// Every step succeeded.
    Succeeded,
    /// A step failed or SSH never answered.
    Failed,
}

/// Display phase of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum StepPhase {
    /// Not run yet.
    #[default]
    Pending,
    /// Running now.
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited non-zero or could not run.
    Failed,
    /// Not run because an earlier step failed.
    Skipped,
}

/// What happened to one step in the last run.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepStatus {
    /// Index of the step (0-based).
    pub index: u32,
    /// Phase.
    pub phase: StepPhase,
    /// Exit code of a shell step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// When it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Error message, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Observed state of a Provision.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProvisionStatus {
    /// Display phase.
    #[serde(default)]
    pub phase: ProvisionPhase,
    /// Conditions: `Ready`, `SshReady`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Generation of the spec this status reflects.
    #[serde(default)]
    pub observed_generation: u64,
    /// Per-step results of the last run.
    #[serde(default)]
    pub steps: Vec<StepStatus>,
    /// The VM instance id the last run provisioned (a recreated VM re-runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_instance_id: Option<String>,
}
