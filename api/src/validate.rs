//! Validation of typed resources, shared by the VMFile and manifest readers.
//!
//! Checks return [`FieldError`]s naming the field by its path in the
//! manifest form (`spec.vcpus`); each reader maps paths back to spans in its
//! own source so the user sees the exact place.

use crate::meta::{API_VERSION, Kind};
use crate::names::{NAME_HELP, check_name};
use crate::resources::{
    CloudInit, ImageSource, ImageSpec, Network, ProvisionSpec, ProvisionStep, Resource,
    VirtualMachineSpec,
};

/// Valid range of `vcpus`.
pub const VCPUS: (u64, u64) = (1, 255);
/// Valid range of memory in MiB.
pub const MEMORY_MIB: (u64, u64) = (1, 16 * 1024 * 1024);
/// Valid range of disk size in GiB.
pub const DISK_GIB: (u64, u64) = (1, 64 * 1024);
/// Valid range of the stop (ACPI) timeout in seconds.
pub const STOP_TIMEOUT: (u64, u64) = (1, 3600);
/// Valid range of the SSH timeout in seconds.
pub const SSH_TIMEOUT: (u64, u64) = (1, 24 * 3600);
/// Allowed readiness probe period and timeout, in seconds.
pub const PROBE_SECONDS: (u64, u64) = (1, 3600);
/// Allowed readiness probe failure threshold.
pub const PROBE_FAILURE_THRESHOLD: (u64, u64) = (1, 100);
/// Valid range of `evictAfterSeconds`: at least a second (`0` would
/// re-place a VM, and throw its disk away, on the first missed
/// heartbeat), at most 30 days (leave it out to never re-place).
pub const EVICT_AFTER: (u64, u64) = (1, 30 * 24 * 3600);

/// The hypervisor backend that will run the VMs, for the checks only it
/// can decide ([`for_backend`]). The VMFile does not name it: the agent's
/// driver does (`GET /v1/healthz` → `driver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// QEMU/KVM on Linux (`--driver qemu`).
    Qemu,
    /// Propolis/bhyve on illumos (`--driver propolis`).
    Propolis,
}

impl Backend {
    /// The backend of an agent driver name; `None` for drivers that accept
    /// every spec (`fake`) or are unknown.
    pub fn from_driver(driver: &str) -> Option<Backend> {
        match driver {
            "qemu" => Some(Backend::Qemu),
            "propolis" => Some(Backend::Propolis),
            _ => None,
        }
    }

    /// The driver name, as `--driver` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Qemu => "qemu",
            Backend::Propolis => "propolis",
        }
    }
}

/// What `backend` cannot run in `resource`, by field path (empty when it
/// can run all of it). Networking follows the manual ("Network modes"):
/// `vnic` is an illumos VNIC, so Propolis only; `user` (SLIRP) and `tap`
/// (a Linux bridge) are QEMU's. A VNC console (`display`) is QEMU's only. Run in addition to [`validate`] when the
/// backend is known: by `vmctl apply` (located in the file) and by the
/// agent's apply (for every API client).
pub fn for_backend(resource: &Resource, backend: Backend) -> Vec<FieldError> {
    let Resource::VirtualMachine(vm) = resource else {
        return Vec::new();
    };
    let mut errs = network_for_backend(vm, backend);
    if backend == Backend::Propolis && vm.spec.display == crate::resources::Display::Vnc {
        errs.push(
            FieldError::new(
                "spec.display",
                "the Propolis backend this agent runs (--driver propolis) has no VNC console yet",
            )
            .help("leave `display` out and use `vmctl console` (the serial console)"),
        );
    }
    if backend == Backend::Propolis && !vm.spec.shares.is_empty() {
        errs.push(
            FieldError::new(
                "spec.shares[0]",
                "the Propolis backend this agent runs (--driver propolis) cannot share host folders",
            )
            .help("leave `share` out; copy files in with `vmctl cp` or a `provision \"file\"` step"),
        );
    }
    errs
}

fn network_for_backend(vm: &crate::resources::VirtualMachine, backend: Backend) -> Vec<FieldError> {
    let mode = match &vm.spec.network {
        Network::User => "user",
        Network::Tap { .. } => "tap",
        Network::Vnic { .. } => "vnic",
        Network::None => return Vec::new(),
    };
    let supported = match backend {
        Backend::Qemu => mode != "vnic",
        Backend::Propolis => mode == "vnic",
    };
    if supported {
        return Vec::new();
    }
    let help = match backend {
        Backend::Qemu => {
            "a VNIC exists on illumos only: write `network \"user\"` or `network \"tap\" bridge=\"br0\"` for QEMU"
        }
        Backend::Propolis => {
            "Propolis VMs attach to an illumos VNIC: write `network \"vnic\" name=\"vnic0\"` (or `network \"none\"`)"
        }
    };
    vec![
        FieldError::new(
            "spec.network",
            format!(
                "network `{mode}` is not supported by the {} backend this agent runs (--driver {})",
                match backend {
                    Backend::Qemu => "QEMU",
                    Backend::Propolis => "Propolis",
                },
                backend.as_str()
            ),
        )
        .help(help),
    ]
}

/// Whether a finding stops the file from being applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The file is rejected.
    Error,
    /// Reported, but the file is accepted.
    Warning,
}

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.network.bridge`.
    pub path: String,
    /// What is wrong, one sentence, no trailing period.
    pub message: String,
    /// What to do about it.
    pub help: Option<String>,
    /// Error or warning.
    pub severity: Severity,
}

impl FieldError {
    /// An error at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            message: message.into(),
            help: None,
            severity: Severity::Error,
        }
    }

    /// Adds a help line.
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Makes this a warning.
    pub fn warning(mut self) -> Self {
        self.severity = Severity::Warning;
        self
    }
}

/// Checks that `value` lies in `range`, naming the field in the message.
pub fn check_range(path: &str, what: &str, value: u64, range: (u64, u64)) -> Option<FieldError> {
    (value < range.0 || value > range.1).then(|| {
        FieldError::new(path, format!("{what} {value} is out of range")).help(format!(
            "{what} must be between {} and {}",
            range.0, range.1
        ))
    })
}

/// Validates one resource of any kind.
pub fn validate(resource: &Resource) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let (api_version, kind, name) = match resource {
        Resource::VirtualMachine(r) => (&r.api_version, r.kind, &r.metadata.name),
        Resource::Image(r) => (&r.api_version, r.kind, &r.metadata.name),
        Resource::Provision(r) => (&r.api_version, r.kind, &r.metadata.name),
        Resource::Snapshot(r) => (&r.api_version, r.kind, &r.metadata.name),
        Resource::Node(r) => (&r.api_version, r.kind, &r.metadata.name),
    };
    if api_version != API_VERSION {
        errs.push(
            FieldError::new(
                "apiVersion",
                format!("unsupported apiVersion `{api_version}`"),
            )
            .help(format!("this vmctl speaks `{API_VERSION}`")),
        );
    }
    if kind != resource.kind() {
        errs.push(FieldError::new(
            "kind",
            format!("kind {kind} does not match the object"),
        ));
    }
    if let Resource::Node(_) = resource {
        // A Node written by a user would fight its agent (which rewrites
        // its labels and status) or pose as a host that is not there.
        errs.push(
            FieldError::new(
                "kind",
                "kind Node cannot be applied: Nodes are registered by agents",
            )
            .help(
                "each agent registers its own Node (`vmctl get nodes` lists them); give it \
                 labels with `vmctl agent --node-labels KEY=VALUE,…` (or VMCTL_NODE_LABELS, or \
                 node-labels in agent.toml)",
            ),
        );
        return errs;
    }
    if let Err(msg) = check_name(name) {
        errs.push(FieldError::new("metadata.name", msg).help(NAME_HELP));
    }
    match resource {
        Resource::VirtualMachine(r) => validate_vm(&r.spec, &mut errs),
        Resource::Image(r) => validate_image(&r.spec, &mut errs),
        Resource::Provision(r) => validate_provision(&r.spec, &mut errs),
        Resource::Node(_) => {}
        Resource::Snapshot(r) => {
            if let Err(msg) = check_name(&r.spec.vm) {
                errs.push(
                    FieldError::new("spec.vm", format!("VM reference: {msg}")).help(NAME_HELP),
                );
            }
        }
    }
    errs
}

fn validate_vm(spec: &VirtualMachineSpec, errs: &mut Vec<FieldError>) {
    if let Err(msg) = check_name(&spec.image) {
        errs.push(FieldError::new("spec.image", format!("image reference: {msg}")).help(NAME_HELP));
    }
    errs.extend(check_range("spec.vcpus", "vcpus", spec.vcpus.into(), VCPUS));
    errs.extend(check_range(
        "spec.memoryMib",
        "memory (MiB)",
        spec.memory_mib,
        MEMORY_MIB,
    ));
    if let Some(d) = spec.disk_gib {
        errs.extend(check_range("spec.diskGib", "disk (GiB)", d, DISK_GIB));
    }
    validate_disks(spec, errs);
    if let Some(t) = spec.stop_timeout_seconds {
        errs.extend(check_range(
            "spec.stopTimeoutSeconds",
            "stop timeout (seconds)",
            t.into(),
            STOP_TIMEOUT,
        ));
    }
    validate_port_forwards(spec, errs);
    validate_probes(spec, errs);
    validate_shares(spec, errs);
    validate_placement(spec, errs);
    match &spec.network {
        Network::Tap { bridge } => {
            if let Err(m) = check_ifname(bridge) {
                errs.push(FieldError::new(
                    "spec.network.bridge",
                    format!("bridge {m}"),
                ));
            }
        }
        Network::Vnic { name } => {
            if let Err(m) = check_ifname(name) {
                errs.push(FieldError::new("spec.network.name", format!("VNIC {m}")));
            }
        }
        Network::User | Network::None => {}
    }
    if let Some(ci) = &spec.cloud_init {
        validate_cloud_init(ci, errs);
    }
    if let Some(ssh) = &spec.ssh {
        if !is_unix_user(&ssh.user) {
            errs.push(
                FieldError::new("spec.ssh.user", format!("`{}` is not a valid user name", ssh.user))
                    .help("user names are 1-32 lowercase letters, digits, '_' or '-', starting with a letter or '_'"),
            );
        }
        if let Some(t) = ssh.timeout_seconds {
            errs.extend(check_range(
                "spec.ssh.timeoutSeconds",
                "SSH timeout (s)",
                t.into(),
                SSH_TIMEOUT,
            ));
        }
        if let Some(k) = &ssh.private_key {
            check_abs("spec.ssh.privateKey", k, errs);
        }
    }
}

/// Checks the placement fields (issue 17): `nodeSelector` pairs follow
/// the syntax of node labels, `nodeName` that of node names. A VMFile's
/// selector is checked as it is read (its keys and values have spans of
/// their own there), so only manifests' bad pairs reach here.
fn validate_placement(spec: &VirtualMachineSpec, errs: &mut Vec<FieldError>) {
    use crate::node::{LABEL_HELP, NODE_NAME_HELP, check_label_key, check_label_value};
    for (key, value) in &spec.node_selector {
        let at = format!("spec.nodeSelector.{key}");
        if let Err(m) = check_label_key(key).and_then(|()| check_label_value(key, value)) {
            errs.push(FieldError::new(at, m).help(LABEL_HELP));
        }
    }
    if let Some(n) = &spec.node_name
        && let Err(m) = crate::node::check_node_name(n)
    {
        errs.push(FieldError::new("spec.nodeName", m).help(NODE_NAME_HELP));
    }
    if let Some(t) = spec.evict_after_seconds {
        errs.extend(check_range(
            "spec.evictAfterSeconds",
            "evict-after (seconds)",
            t,
            EVICT_AFTER,
        ));
    }
}

fn network_mode(n: &Network) -> &'static str {
    match n {
        Network::User => "user",
        Network::Tap { .. } => "tap",
        Network::Vnic { .. } => "vnic",
        Network::None => "none",
    }
}

fn validate_probes(spec: &VirtualMachineSpec, errs: &mut Vec<FieldError>) {
    for (i, p) in spec.readiness_probes.iter().enumerate() {
        let at = format!("spec.readinessProbes[{i}]");
        match (&p.exec, &p.tcp_socket) {
            (Some(_), Some(_)) | (None, None) => errs.push(
                FieldError::new(&at, "a probe has exactly one of `exec` and `tcpSocket`")
                    .help("split it into two probes, or give it a command (`exec`) or a port (`tcpSocket`)"),
            ),
            (Some(e), None) if e.command.trim().is_empty() => errs.push(
                FieldError::new(format!("{at}.exec.command"), "the probe's command is empty")
                    .help("give a command that exits 0 when the guest is ready, e.g. `systemctl is-active nginx`"),
            ),
            (None, Some(t)) if t.port == 0 => errs.push(
                FieldError::new(format!("{at}.tcpSocket.port"), "port 0 is out of range")
                    .help("ports are 1-65535"),
            ),
            _ => {}
        }
        for (field, what, v, range) in [
            (
                "periodSeconds",
                "probe period (s)",
                p.period_seconds,
                PROBE_SECONDS,
            ),
            (
                "timeoutSeconds",
                "probe timeout (s)",
                p.timeout_seconds,
                PROBE_SECONDS,
            ),
            (
                "failureThreshold",
                "probe failure threshold",
                p.failure_threshold,
                PROBE_FAILURE_THRESHOLD,
            ),
        ] {
            errs.extend(check_range(&format!("{at}.{field}"), what, v.into(), range));
        }
    }
}

fn validate_port_forwards(spec: &VirtualMachineSpec, errs: &mut Vec<FieldError>) {
    if !spec.port_forwards.is_empty() && spec.network != Network::User {
        let mode = network_mode(&spec.network);
        let help = match &spec.network {
            Network::None => {
                "a VM without a network cannot be reached: write `network \"user\"` to forward ports"
            }
            _ => {
                "a guest on a bridge or VNIC has its own address: reach its ports there, or write `network \"user\"` to forward host ports"
            }
        };
        errs.push(
            FieldError::new(
                "spec.portForwards[0]",
                format!(
                    "port forwards need user networking (QEMU's hostfwd); this VM's network is `{mode}`"
                ),
            )
            .help(help),
        );
    }
    for (i, f) in spec.port_forwards.iter().enumerate() {
        let at = format!("spec.portForwards[{i}]");
        for (field, what, port) in [
            ("hostPort", "host port", f.host_port),
            ("guestPort", "guest port", f.guest_port),
        ] {
            if port == 0 {
                errs.push(
                    FieldError::new(format!("{at}.{field}"), format!("{what} 0 is out of range"))
                        .help("ports are 1-65535"),
                );
            }
        }
        match f.address.parse::<std::net::Ipv4Addr>() {
            Err(_) => errs.push(
                FieldError::new(
                    format!("{at}.address"),
                    format!("address `{}` is not an IPv4 address", f.address),
                )
                .help("QEMU's user networking listens on IPv4 only: leave `address` out for 127.0.0.1 (this host only), or write \"0.0.0.0\" for every interface"),
            ),
            Ok(a) if !a.is_loopback() => errs.push(
                FieldError::new(
                    format!("{at}.address"),
                    format!(
                        "port forward {} is open to other hosts{}: they reach guest port {}",
                        f.describe(),
                        if a.is_unspecified() {
                            " (0.0.0.0 is every interface)"
                        } else {
                            ""
                        },
                        f.guest_port
                    ),
                )
                .help("leave `address` out to listen on 127.0.0.1 only")
                .warning(),
            ),
            Ok(_) => {}
        }
        if let Some(j) = spec.port_forwards[..i]
            .iter()
            .position(|g| g.clashes_with(f))
        {
            errs.push(
                FieldError::new(
                    format!("{at}.hostPort"),
                    format!(
                        "host port {}/{} is forwarded twice (port forwards {} and {})",
                        f.host_port,
                        f.protocol.as_str(),
                        j + 1,
                        i + 1
                    ),
                )
                .help("one host port (per protocol and address) reaches one guest port: keep one, or pick another host port"),
            );
        }
    }
}

/// Host ports that two VMs of one file forward: the VM's index in
/// `resources` and an error at the later forward. Checked across the
/// resources of a file (VMFile or manifest); VMs applied from different
/// files that clash get a `PortForwardsReady` condition instead.
pub fn port_clashes<'a>(
    resources: impl IntoIterator<Item = &'a Resource>,
) -> Vec<(usize, FieldError)> {
    use crate::resources::{PortForward, Protocol};
    // By (protocol, host port): the few forwards that could clash.
    let mut seen: std::collections::HashMap<(Protocol, u16), Vec<(&str, &PortForward)>> =
        Default::default();
    let mut out = Vec::new();
    for (ri, r) in resources.into_iter().enumerate() {
        let Resource::VirtualMachine(vm) = r else {
            continue;
        };
        for (i, f) in vm.spec.port_forwards.iter().enumerate() {
            let earlier = seen.get(&(f.protocol, f.host_port)).into_iter().flatten();
            if let Some((other, _)) = earlier.into_iter().find(|(_, g)| g.clashes_with(f)) {
                out.push((
                    ri,
                    FieldError::new(
                        format!("spec.portForwards[{i}].hostPort"),
                        format!(
                            "host port {}/{} is already forwarded by VM `{other}`",
                            f.host_port,
                            f.protocol.as_str()
                        ),
                    )
                    .help("a host port (per protocol and address) reaches one VM: pick another host port for one of them"),
                ));
            }
        }
        // Within one VM, `validate` reports a clash.
        for f in &vm.spec.port_forwards {
            seen.entry((f.protocol, f.host_port))
                .or_default()
                .push((&vm.metadata.name, f));
        }
    }
    out
}

/// Most shared folders of one VM (each is a PCI device and, for
/// virtio-fs, a `virtiofsd` process).
pub const SHARES_MAX: usize = 16;

fn validate_shares(spec: &VirtualMachineSpec, errs: &mut Vec<FieldError>) {
    if spec.shares.len() > SHARES_MAX {
        errs.push(
            FieldError::new(
                format!("spec.shares[{SHARES_MAX}]"),
                format!(
                    "{} shared folders; a VM may have at most {SHARES_MAX}",
                    spec.shares.len()
                ),
            )
            .help("share a common parent directory instead of many siblings"),
        );
    }
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    for (i, sh) in spec.shares.iter().enumerate() {
        let at = format!("spec.shares[{i}]");
        check_abs(&format!("{at}.hostPath"), &sh.host_path, errs);
        if sh.host_path.chars().any(char::is_control) {
            errs.push(
                FieldError::new(
                    format!("{at}.hostPath"),
                    "the host path contains a control character",
                )
                .help("rename the directory, or share a parent whose path has none"),
            );
        }
        let m = &sh.mount_path;
        if let Err(msg) = check_mount_path(m) {
            errs.push(
                FieldError::new(format!("{at}.mountPath"), msg)
                    .help("give an absolute guest path such as `/src` or `/home/vm/project`"),
            );
            continue;
        }
        let norm = m.trim_end_matches('/').to_owned();
        if let Some(j) = seen.insert(norm, i) {
            errs.push(
                FieldError::new(
                    format!("{at}.mountPath"),
                    format!(
                        "`{m}` is already the mount path of an earlier share (of {})",
                        spec.shares[j].host_path
                    ),
                )
                .help("each share needs its own mount path in the guest"),
            );
        }
    }
}

/// Checks a guest mount path of a share: absolute, not `/`, no `.` or
/// `..` components, no control characters (it ends up in a shell command
/// line of the guest's boot, quoted).
pub fn check_mount_path(m: &str) -> Result<(), String> {
    if !m.starts_with('/') {
        return Err(format!("mount path `{m}` is not an absolute path"));
    }
    if m.trim_end_matches('/').is_empty() {
        return Err("the guest's root `/` cannot be a mount path".to_owned());
    }
    if m.chars().any(char::is_control) {
        return Err(format!("mount path {m:?} contains a control character"));
    }
    if m.split('/').any(|c| c == "." || c == "..") {
        return Err(format!("mount path `{m}` has a `.` or `..` component"));
    }
    if m.len() > 1024 {
        return Err("the mount path is longer than 1024 bytes".to_owned());
    }
    Ok(())
}

/// Checks that the host directory of a share exists and is a directory
/// (following symbolic links): a message saying what it is otherwise.
pub fn check_share_dir(path: &std::path::Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(m) => Err(format!(
            "shared folder {} is {}, not a directory",
            path.display(),
            crate::localfile::kind_of(m.file_type()).unwrap_or("a regular file")
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("shared folder {} does not exist", path.display()))
        }
        Err(e) => Err(format!("cannot read shared folder {}: {e}", path.display())),
    }
}

/// Longest extra disk name: it is the virtio-blk serial, which holds 20
/// bytes.
pub const DISK_NAME_MAX: usize = 20;

fn validate_disks(spec: &VirtualMachineSpec, errs: &mut Vec<FieldError>) {
    let mut seen = std::collections::HashSet::new();
    for (i, d) in spec.disks.iter().enumerate() {
        let path = format!("spec.disks[{i}]");
        let help = "a disk name is 1-20 lowercase letters, digits or '-', starting and ending with a letter or digit (it becomes the disk's serial: /dev/disk/by-id/virtio-NAME)";
        if let Err(m) = check_name(&d.name) {
            errs.push(FieldError::new(format!("{path}.name"), format!("disk {m}")).help(help));
        } else if d.name.len() > DISK_NAME_MAX {
            errs.push(
                FieldError::new(
                    format!("{path}.name"),
                    format!(
                        "disk name `{}` is {} characters long; at most {DISK_NAME_MAX} fit a disk's serial",
                        d.name,
                        d.name.len()
                    ),
                )
                .help(help),
            );
        } else if d.name == crate::resources::ROOT_DISK {
            errs.push(
                FieldError::new(format!("{path}.name"), "`root` names the VM's root disk")
                    .help("give the extra disk another name; size the root disk with `disk 20` (spec.diskGib)"),
            );
        } else if !seen.insert(d.name.as_str()) {
            errs.push(
                FieldError::new(
                    format!("{path}.name"),
                    format!("a second disk named `{}`", d.name),
                )
                .help("each disk of a VM needs its own name"),
            );
        }
        errs.extend(check_range(
            &format!("{path}.sizeGib"),
            "disk (GiB)",
            d.size_gib,
            DISK_GIB,
        ));
    }
}

fn validate_cloud_init(ci: &CloudInit, errs: &mut Vec<FieldError>) {
    if let Some(h) = &ci.hostname
        && let Err(m) = check_name(h)
    {
        errs.push(
            FieldError::new(
                "spec.cloudInit.hostname",
                format!("hostname: {}", m.replacen("name", "hostname", 1)),
            )
            .help("a hostname is a DNS label: lowercase letters, digits and '-'"),
        );
    }
    if let Some(f) = &ci.ssh_key {
        check_abs("spec.cloudInit.sshKey.path", &f.path, errs);
    }
    if let Some(f) = &ci.user_data {
        check_abs("spec.cloudInit.userData.path", &f.path, errs);
    }
    if ci.ssh_key.is_some() && ci.user_data.is_some() {
        errs.push(
            FieldError::new("spec.cloudInit.sshKey", "ssh-key is ignored when user-data is given")
                .help("put the key in your user-data's ssh_authorized_keys, or drop user-data to let vmctl generate it")
                .warning(),
        );
    }
}

fn validate_image(spec: &ImageSpec, errs: &mut Vec<FieldError>) {
    match &spec.source {
        ImageSource::Path { path: p } => check_abs("spec.source.path", p, errs),
        ImageSource::Url { url: u } => {
            if let Err(m) = check_url(u) {
                errs.push(
                    FieldError::new("spec.source.url", m)
                        .help("give an http://, https:// or file:// URL"),
                );
            }
        }
    }
    if let Some(c) = &spec.checksum
        && let Err(m) = check_checksum(c)
    {
        errs.push(
            FieldError::new("spec.checksum", m)
                .help("write it as `sha256:<64 hex digits>` or `sha512:<128 hex digits>`"),
        );
    }
}

fn validate_provision(spec: &ProvisionSpec, errs: &mut Vec<FieldError>) {
    if let Err(msg) = check_name(&spec.vm) {
        errs.push(FieldError::new("spec.vm", format!("VM reference: {msg}")).help(NAME_HELP));
    }
    for (i, step) in spec.steps.iter().enumerate() {
        let at = format!("spec.steps[{i}]");
        match step {
            ProvisionStep::Shell { inline, script } => match (inline, script) {
                (Some(_), Some(_)) => errs.push(
                    FieldError::new(
                        format!("{at}.script"),
                        "a shell provisioner has both `inline` and `script`",
                    )
                    .help("keep exactly one of them; use two provision blocks to run both"),
                ),
                (None, None) => errs.push(
                    FieldError::new(at.clone(), "a shell provisioner needs `inline` or `script`")
                        .help("add `inline \"command\"` or `script \"path/to/script.sh\"`"),
                ),
                (None, Some(s)) => check_abs(&format!("{at}.script.path"), &s.path, errs),
                (Some(_), None) => {}
            },
            ProvisionStep::File {
                source,
                destination,
            } => {
                check_abs(&format!("{at}.source.path"), &source.path, errs);
                if !destination.starts_with('/') {
                    errs.push(
                        FieldError::new(
                            format!("{at}.destination"),
                            format!("destination `{destination}` is not an absolute path"),
                        )
                        .help("give the full path on the guest, e.g. `/home/vm/app.conf`"),
                    );
                }
            }
        }
    }
}

fn check_abs(path: &str, value: &str, errs: &mut Vec<FieldError>) {
    if !value.starts_with('/') {
        errs.push(FieldError::new(path, format!("`{value}` is not an absolute path")).help(
            "manifests carry absolute host paths; VMFiles resolve relative paths against their directory",
        ));
    }
}

/// Checks a Linux interface name (bridges, TAP devices, VNICs).
pub fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("name `{name}` must be 1-15 characters"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c.is_whitespace() || c == ':')
        || name == "."
        || name == ".."
    {
        return Err(format!(
            "name `{name}` contains characters not allowed in an interface name"
        ));
    }
    Ok(())
}

fn is_unix_user(u: &str) -> bool {
    let mut chars = u.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && u.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Checks an image URL.
pub fn check_url(u: &str) -> Result<(), String> {
    match url::Url::parse(u) {
        Ok(url) if matches!(url.scheme(), "http" | "https" | "file") => {
            if url.path().ends_with('/') || url.path().is_empty() {
                Err(format!("URL `{u}` does not name a file"))
            } else {
                Ok(())
            }
        }
        Ok(url) => Err(format!("URL scheme `{}` is not supported", url.scheme())),
        Err(e) => Err(format!("`{u}` is not a valid URL: {e}")),
    }
}

/// Checks a `sha256:`/`sha512:` checksum.
pub fn check_checksum(c: &str) -> Result<(), String> {
    let (algo, hex) = c
        .split_once(':')
        .ok_or_else(|| format!("checksum `{c}` has no algorithm prefix"))?;
    let want = match algo {
        "sha256" => 64,
        "sha512" => 128,
        other => return Err(format!("checksum algorithm `{other}` is not supported")),
    };
    if hex.len() != want || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("{algo} checksum must be {want} hex digits"));
    }
    Ok(())
}

/// Which kinds a manifest may contain, for error messages.
pub fn kinds_list() -> String {
    Kind::APPLIED
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
