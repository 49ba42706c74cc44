//! Reading one `vm` block.

use kdl::{KdlEntry, KdlNode};
use miette::SourceSpan;

use super::reader::{CODE, Reader, Spanned, name_span};
use super::{Context, SpanMap};
use crate::diag::Problem;
use crate::limits::{FileUse, human_bytes};
use crate::localfile::LocalFileError;
use crate::node::{LABEL_HELP, check_label_key, check_label_value};
use crate::resources::{
    CloudInit, DEFAULT_FORWARD_ADDRESS, Disk, Display, ExecAction, ImageSource, LocalFile, Network,
    PortForward, PowerState, Probe, Protocol, Provision, ProvisionSpec, ProvisionStep, Resource,
    Share, SshConfig, TcpSocketAction, UpdatePolicy, VirtualMachine, VirtualMachineSpec,
    default_ssh_user,
};

const VM_NODES: &[&str] = &[
    "image",
    "image-url",
    "vcpus",
    "memory",
    "disk",
    "network",
    "cloud-init",
    "ssh",
    "provision",
    "power-state",
    "update-policy",
    "stop-timeout",
    "port-forward",
    "display",
    "probe",
    "share",
    "node-selector",
    "node",
    "evict-after",
];

/// A VM block read from the file, with the spans of its fields.
#[derive(Debug)]
pub struct VmDraft {
    pub name: Spanned<String>,
    pub image_source: Option<Spanned<ImageSource>>,
    pub checksum: Option<Spanned<String>>,
    spec: VirtualMachineSpec,
    steps: Vec<ProvisionStep>,
    vm_spans: SpanMap,
    prov_spans: SpanMap,
}

impl VmDraft {
    /// The VirtualMachine and, when there are steps, its Provision, each
    /// with the spans of its fields.
    pub fn into_resources(mut self, image_name: Option<String>) -> Vec<(Resource, SpanMap)> {
        // A VM without a usable image source has already been reported;
        // the placeholder keeps validation of the other fields going.
        self.spec.image = image_name.unwrap_or_else(|| "missing-image".to_owned());
        let mut vm = VirtualMachine::new(self.name.value.clone(), self.spec);
        vm.metadata
            .labels
            .insert("vmctl.dev/vm".into(), self.name.value.clone());
        let mut out = vec![(Resource::VirtualMachine(vm), self.vm_spans)];
        if !self.steps.is_empty() {
            let spec = ProvisionSpec {
                vm: self.name.value.clone(),
                steps: self.steps,
                run_token: None,
            };
            let mut p = Provision::new(self.name.value.clone(), spec);
            p.metadata
                .labels
                .insert("vmctl.dev/vm".into(), self.name.value);
            out.push((Resource::Provision(p), self.prov_spans));
        }
        out
    }
}

/// Reads one `vm "name" { … }` block.
pub fn read_vm(rd: &mut Reader, node: &KdlNode, ctx: &Context) -> Option<VmDraft> {
    let entries = rd.entries(node, &[], 1);
    let name = match entries.args.first() {
        Some(e) => rd.string(e, "the VM name")?,
        None => {
            rd.push(
                Problem::error(CODE, name_span(node), "`vm` needs a name")
                    .label("missing name")
                    .help("write it as `vm \"dev\" { … }`"),
            );
            return None;
        }
    };
    let mut d = VmDraft {
        name: name.clone(),
        image_source: None,
        checksum: None,
        spec: VirtualMachineSpec {
            image: String::new(),
            vcpus: 1,
            memory_mib: 1024,
            disk_gib: None,
            disks: Vec::new(),
            network: Network::User,
            cloud_init: None,
            ssh: None,
            power_state: PowerState::Running,
            update_policy: UpdatePolicy::RestartRequired,
            stop_timeout_seconds: None,
            port_forwards: Vec::new(),
            display: Display::None,
            readiness_probes: Vec::new(),
            shares: Vec::new(),
            node_selector: Default::default(),
            node_name: None,
            evict_after_seconds: None,
        },
        steps: Vec::new(),
        vm_spans: SpanMap::new(),
        prov_spans: SpanMap::new(),
    };
    for key in ["", "metadata.name", "spec"] {
        d.vm_spans.insert(key.into(), name.span);
        d.prov_spans.insert(key.into(), name.span);
    }
    d.prov_spans.insert("spec.vm".into(), name.span);
    let Some(children) = node.children() else {
        rd.push(
            Problem::error(CODE, name.span, format!("VM `{}` has no image", name.value))
                .label("no block")
                .help("give it a block with an image: `vm \"dev\" { image-url \"https://…\" }`"),
        );
        return Some(d);
    };
    let mut first: std::collections::HashMap<&str, SourceSpan> = Default::default();
    let mut image_node_span = None;
    for child in children.nodes() {
        let cname = child.name().value();
        if !VM_NODES.contains(&cname) {
            rd.unknown_node(child, "a `vm` block", VM_NODES);
            continue;
        }
        // `disk "data" size="10G"` is an extra disk (many may be given;
        // duplicate names are caught by validation); `disk 20` the root's.
        let extra_disk = cname == "disk"
            && child
                .entries()
                .iter()
                .any(|e| e.name().is_some_and(|n| n.value() == "size"));
        if extra_disk {
            read_extra_disk(rd, child, &mut d);
            continue;
        }
        // Many forwards may be given; clashes are caught by validation.
        if cname == "port-forward" {
            read_port_forward(rd, child, &mut d);
            continue;
        }
        if cname == "probe" {
            read_probe(rd, child, &mut d);
            continue;
        }
        // Many shares may be given; duplicate mount paths are caught by
        // validation.
        if cname == "share" {
            read_share(rd, child, ctx, &mut d);
            continue;
        }
        if cname != "provision" {
            let key = if cname == "image-url" { "image" } else { cname };
            if let Some(f) = first.get(key) {
                if key == "image" {
                    rd.push(
                        Problem::error(CODE, name_span(child), "a VM has exactly one image source")
                            .label("second image source")
                            .help("keep either `image` (a local file) or `image-url` (a download), not both"),
                    );
                } else {
                    rd.duplicate(child, *f);
                }
                continue;
            }
            first.insert(key, name_span(child));
        }
        match cname {
            "image" | "image-url" => {
                image_node_span = Some(name_span(child));
                read_image(rd, child, ctx, &mut d);
            }
            "vcpus" => {
                if let Some(v) = rd
                    .leaf(child, "vcpus 2")
                    .and_then(|e| rd.integer(e, "vcpus"))
                {
                    d.vm_spans.insert("spec.vcpus".into(), v.span);
                    d.spec.vcpus = u32::try_from(v.value).unwrap_or(u32::MAX);
                    if v.value > u64::from(u32::MAX) {
                        rd.error(
                            v.span,
                            format!("vcpus {} is out of range", v.value),
                            "vcpus must be between 1 and 255",
                        );
                    }
                }
            }
            "memory" => {
                if let Some(e) = rd.leaf(child, "memory 2048")
                    && let Some(v) = read_size(rd, e, "memory", 1)
                {
                    d.vm_spans.insert("spec.memoryMib".into(), v.span);
                    d.spec.memory_mib = v.value;
                }
            }
            "disk" => {
                if let Some(e) = rd.leaf(child, "disk 20")
                    && let Some(v) = read_size(rd, e, "disk", 1024)
                {
                    d.vm_spans.insert("spec.diskGib".into(), v.span);
                    d.spec.disk_gib = Some(v.value);
                }
            }
            "stop-timeout" => {
                if let Some(v) = rd
                    .leaf(child, "stop-timeout 60")
                    .and_then(|e| rd.integer(e, "stop-timeout"))
                {
                    // Range-checked by validation, with this span.
                    d.vm_spans.insert("spec.stopTimeoutSeconds".into(), v.span);
                    d.spec.stop_timeout_seconds = Some(u32::try_from(v.value).unwrap_or(u32::MAX));
                }
            }
            "evict-after" => {
                if let Some(v) = rd
                    .leaf(child, "evict-after 300")
                    .and_then(|e| rd.integer(e, "evict-after"))
                {
                    // Range-checked by validation, with this span.
                    d.vm_spans.insert("spec.evictAfterSeconds".into(), v.span);
                    d.spec.evict_after_seconds = Some(v.value);
                }
            }
            "node" => {
                if let Some(s) = rd
                    .leaf(child, "node \"host-b\"")
                    .and_then(|e| rd.string(e, "node"))
                {
                    // Checked by validation, with this span.
                    d.vm_spans.insert("spec.nodeName".into(), s.span);
                    d.spec.node_name = Some(s.value);
                }
            }
            "node-selector" => read_node_selector(rd, child, &mut d),
            "network" => read_network(rd, child, &mut d),
            "cloud-init" => read_cloud_init(rd, child, ctx, &mut d),
            "ssh" => read_ssh(rd, child, ctx, &mut d),
            "provision" => read_provision(rd, child, ctx, &mut d),
            "power-state" => {
                if let Some(s) = rd
                    .leaf(child, "power-state \"running\"")
                    .and_then(|e| rd.string(e, "power-state"))
                {
                    d.vm_spans.insert("spec.powerState".into(), s.span);
                    match s.value.to_ascii_lowercase().as_str() {
                        "running" => d.spec.power_state = PowerState::Running,
                        "stopped" => d.spec.power_state = PowerState::Stopped,
                        "suspended" => d.spec.power_state = PowerState::Suspended,
                        other => rd.error(
                            s.span,
                            format!("unknown power state `{other}`"),
                            "use \"running\", \"stopped\" or \"suspended\"",
                        ),
                    }
                }
            }
            "display" => {
                if let Some(s) = rd
                    .leaf(child, "display \"vnc\"")
                    .and_then(|e| rd.string(e, "display"))
                {
                    d.vm_spans.insert("spec.display".into(), s.span);
                    match s.value.to_ascii_lowercase().as_str() {
                        "vnc" => d.spec.display = Display::Vnc,
                        "none" => d.spec.display = Display::None,
                        other => rd.error(
                            s.span,
                            format!("unknown display `{other}`"),
                            "use \"vnc\" (a VNC server on 127.0.0.1) or \"none\" (the default: serial console only)",
                        ),
                    }
                }
            }
            "update-policy" => {
                if let Some(s) = rd
                    .leaf(child, "update-policy \"restart\"")
                    .and_then(|e| rd.string(e, "update-policy"))
                {
                    d.vm_spans.insert("spec.updatePolicy".into(), s.span);
                    match s.value.as_str() {
                        "restart" => d.spec.update_policy = UpdatePolicy::Restart,
                        "restart-required" => d.spec.update_policy = UpdatePolicy::RestartRequired,
                        "recreate" => d.spec.update_policy = UpdatePolicy::Recreate,
                        other => rd.error(s.span, format!("unknown update policy `{other}`"), "use \"restart-required\" (report and wait), \"restart\" (restart the VM) or \"recreate\" (also rebuild the disk when the image changes)"),
                    }
                }
            }
            _ => unreachable!("checked against VM_NODES"),
        }
    }
    if d.image_source.is_none() && image_node_span.is_none() {
        rd.push(
            Problem::error(
                CODE,
                name.span,
                format!("VM `{}` has no image source", name.value),
            )
            .label("no image")
            .help("add `image \"path/to/disk.qcow2\"` or `image-url \"https://…/disk.qcow2\"`"),
        );
    }
    Some(d)
}

/// Reads `disk "name" size="10G"`: an extra disk.
fn read_extra_disk(rd: &mut Reader, node: &KdlNode, d: &mut VmDraft) {
    let entries = rd.entries(node, &["size"], 1);
    rd.no_children(node);
    let name = match entries.args.first() {
        Some(e) => rd.string(e, "the disk name"),
        None => {
            rd.push(
                Problem::error(CODE, name_span(node), "an extra disk needs a name")
                    .label("missing name")
                    .help("write it as `disk \"data\" size=\"10G\"`"),
            );
            None
        }
    };
    let size = entries
        .props
        .get("size")
        .and_then(|e| read_size(rd, e, "disk size", 1024));
    let (Some(name), Some(size)) = (name, size) else {
        return;
    };
    let i = d.spec.disks.len();
    d.vm_spans
        .insert(format!("spec.disks[{i}]"), name_span(node));
    d.vm_spans
        .insert(format!("spec.disks[{i}].name"), name.span);
    d.vm_spans
        .insert(format!("spec.disks[{i}].sizeGib"), size.span);
    d.spec.disks.push(Disk {
        name: name.value,
        size_gib: size.value,
    });
}

/// Reads `node-selector { zone "a"; disk "ssd" }`: the labels the VM's
/// node must carry, one child per label, named by its key, with its value
/// as argument (a key with `/` is quoted: `"topology.vmctl.dev/zone"
/// "eu-1"`). Keys and values are checked here, each at its own span, with
/// the rules of node labels; a bad pair is left out of the spec so that
/// validation does not report it again.
fn read_node_selector(rd: &mut Reader, node: &KdlNode, d: &mut VmDraft) {
    rd.entries(node, &[], 0);
    d.vm_spans
        .insert("spec.nodeSelector".into(), name_span(node));
    let mut seen: std::collections::HashMap<&str, SourceSpan> = Default::default();
    for c in node.children().map(|c| c.nodes()).unwrap_or_default() {
        let key = c.name().value();
        if let Some(f) = seen.get(key) {
            rd.duplicate(c, *f);
            continue;
        }
        seen.insert(key, name_span(c));
        let value = rd
            .leaf(c, &format!("{key} \"value\""))
            .and_then(|e| rd.string(e, "a node-selector value"));
        if let Err(m) = check_label_key(key) {
            rd.push(
                Problem::error(CODE, name_span(c), m)
                    .label("not a label key")
                    .help(LABEL_HELP),
            );
            continue;
        }
        let Some(value) = value else { continue };
        if let Err(m) = check_label_value(key, &value.value) {
            rd.push(
                Problem::error(CODE, value.span, m)
                    .label("not a label value")
                    .help(LABEL_HELP),
            );
            continue;
        }
        d.vm_spans
            .insert(format!("spec.nodeSelector.{key}"), value.span);
        d.spec.node_selector.insert(key.to_owned(), value.value);
    }
}

/// Reads `port-forward host=8080 guest=80 [protocol="udp"]
/// [address="0.0.0.0"]`.
fn read_port_forward(rd: &mut Reader, node: &KdlNode, d: &mut VmDraft) {
    const PROPS: &[&str] = &["host", "guest", "protocol", "address"];
    let entries = rd.entries(node, PROPS, 0);
    rd.no_children(node);
    let example = "write it as `port-forward host=8080 guest=80` (optionally protocol=\"udp\", address=\"0.0.0.0\")";
    let port = |rd: &mut Reader, key: &str| -> Option<Spanned<u16>> {
        let Some(e) = entries.props.get(key) else {
            rd.push(
                Problem::error(
                    CODE,
                    name_span(node),
                    format!("`port-forward` needs `{key}=`, the {key} port"),
                )
                .label(format!("no {key} port"))
                .help(example),
            );
            return None;
        };
        let v = rd.integer(e, &format!("{key} port"))?;
        match u16::try_from(v.value) {
            Ok(p) => Some(Spanned {
                value: p,
                span: v.span,
            }),
            Err(_) => {
                rd.error(
                    v.span,
                    format!("{key} port {} is out of range", v.value),
                    "ports are 1-65535",
                );
                None
            }
        }
    };
    let host = port(rd, "host");
    let guest = port(rd, "guest");
    let protocol = match entries.props.get("protocol") {
        None => Some(Protocol::Tcp),
        Some(e) => {
            let s = rd.string(e, "protocol");
            match s.as_ref().map(|s| s.value.to_ascii_lowercase()) {
                Some(p) if p == "tcp" => Some(Protocol::Tcp),
                Some(p) if p == "udp" => Some(Protocol::Udp),
                Some(other) => {
                    let span = s.map_or_else(|| rd.vspan(e), |s| s.span);
                    rd.error(
                        span,
                        format!("unknown protocol `{other}`"),
                        "use protocol=\"tcp\" (the default) or protocol=\"udp\"",
                    );
                    None
                }
                None => None,
            }
        }
    };
    let address = match entries.props.get("address") {
        None => None,
        Some(e) => match rd.string(e, "address") {
            Some(a) => Some(a),
            None => return,
        },
    };
    let (Some(host), Some(guest), Some(protocol)) = (host, guest, protocol) else {
        return;
    };
    let i = d.spec.port_forwards.len();
    let at = format!("spec.portForwards[{i}]");
    d.vm_spans.insert(at.clone(), name_span(node));
    d.vm_spans.insert(format!("{at}.hostPort"), host.span);
    d.vm_spans.insert(format!("{at}.guestPort"), guest.span);
    if let Some(e) = entries.props.get("protocol") {
        d.vm_spans.insert(format!("{at}.protocol"), rd.vspan(e));
    }
    if let Some(a) = &address {
        d.vm_spans.insert(format!("{at}.address"), a.span);
    }
    d.spec.port_forwards.push(PortForward {
        host_port: host.value,
        guest_port: guest.value,
        protocol,
        address: address.map_or_else(|| DEFAULT_FORWARD_ADDRESS.to_owned(), |a| a.value),
    });
}

/// Reads `share "./src" mount="/src" [read-only=#true]`: a host directory
/// (resolved against the VMFile's directory, and required to exist now)
/// mounted in the guest.
fn read_share(rd: &mut Reader, node: &KdlNode, ctx: &Context, d: &mut VmDraft) {
    let example = "write it as `share \"./src\" mount=\"/src\"` (optionally read-only=#true)";
    let entries = rd.entries(node, &["mount", "read-only"], 1);
    rd.no_children(node);
    let host = match entries.args.first() {
        Some(e) => rd.string(e, "the shared folder"),
        None => {
            rd.push(
                Problem::error(CODE, name_span(node), "`share` needs the host folder")
                    .label("no folder")
                    .help(example),
            );
            None
        }
    };
    let mount = match entries.props.get("mount") {
        Some(e) => rd.string(e, "mount"),
        None => {
            rd.push(
                Problem::error(
                    CODE,
                    name_span(node),
                    "`share` needs `mount=`, the path in the guest",
                )
                .label("no mount path")
                .help(example),
            );
            None
        }
    };
    let read_only = match entries.props.get("read-only") {
        None => Some(false),
        Some(e) => match e.value() {
            kdl::KdlValue::Bool(b) => Some(*b),
            _ => {
                rd.error(
                    rd.vspan(e),
                    "read-only must be #true or #false",
                    "write `read-only=#true` (KDL v2 booleans have a `#`)",
                );
                None
            }
        },
    };
    let (Some(host), Some(mount), Some(read_only)) = (host, mount, read_only) else {
        return;
    };
    let path = ctx.resolve(&host.value);
    if let Err(msg) = crate::validate::check_share_dir(&path) {
        rd.push(
            Problem::error(CODE, host.span, msg)
                .label("not a directory")
                .help(format!(
                    "create it, or name an existing directory; relative paths are resolved against the VMFile's directory ({})",
                    ctx.base_dir.display()
                )),
        );
        return;
    }
    let i = d.spec.shares.len();
    let at = format!("spec.shares[{i}]");
    d.vm_spans.insert(at.clone(), name_span(node));
    d.vm_spans.insert(format!("{at}.hostPath"), host.span);
    d.vm_spans.insert(format!("{at}.mountPath"), mount.span);
    if let Some(e) = entries.props.get("read-only") {
        d.vm_spans.insert(format!("{at}.readOnly"), rd.vspan(e));
    }
    d.spec.shares.push(Share {
        host_path: path.to_string_lossy().into_owned(),
        mount_path: mount.value,
        read_only,
    });
}

/// Reads `probe "exec" { command "systemctl is-active nginx"; period 5;
/// timeout 3 }` or `probe "tcp" port=80`: each setting either as a
/// property (`port=80`) or as a node in the block (`port 80`).
fn read_probe(rd: &mut Reader, node: &KdlNode, d: &mut VmDraft) {
    const KEYS: &[&str] = &["command", "port", "period", "timeout", "failure-threshold"];
    let example = "write it as `probe \"exec\" { command \"systemctl is-active nginx\"; period 5; timeout 3 }` or `probe \"tcp\" port=80`";
    let entries = rd.entries(node, KEYS, 1);
    let mut settings: std::collections::HashMap<String, (&KdlEntry, SourceSpan)> = entries
        .props
        .iter()
        .map(|(k, e)| (k.clone(), (*e, e.span())))
        .collect();
    if let Some(children) = node.children() {
        for c in children.nodes() {
            let key = c.name().value();
            if !KEYS.contains(&key) {
                rd.unknown_node(c, "a `probe` block", KEYS);
                continue;
            }
            if let Some((_, first)) = settings.get(key) {
                rd.duplicate(c, *first);
                continue;
            }
            if let Some(e) = rd.leaf(c, &format!("{key} …")) {
                settings.insert(key.to_owned(), (e, name_span(c)));
            }
        }
    }
    let kind = match entries.args.first() {
        None => {
            rd.push(
                Problem::error(
                    CODE,
                    name_span(node),
                    "`probe` needs its type, \"exec\" or \"tcp\"",
                )
                .label("no type")
                .help(example),
            );
            return;
        }
        Some(e) => match rd.string(e, "probe type") {
            Some(k) => k,
            None => return,
        },
    };
    let i = d.spec.readiness_probes.len();
    let at = format!("spec.readinessProbes[{i}]");
    let mut probe = Probe::new(None, None);
    let mut ok = true;
    let wrong_for = |rd: &mut Reader, key: &str, kind: &str, span: SourceSpan| {
        rd.error(
            span,
            format!("`{key}` is not a setting of a `{kind}` probe"),
            "an \"exec\" probe takes `command`, a \"tcp\" probe `port`; both take `period`, `timeout` and `failure-threshold`",
        );
    };
    match kind.value.to_ascii_lowercase().as_str() {
        "exec" => {
            if let Some((_, span)) = settings.get("port") {
                wrong_for(rd, "port", "exec", *span);
                ok = false;
            }
            match settings.get("command") {
                None => {
                    rd.push(
                        Problem::error(
                            CODE,
                            name_span(node),
                            "an \"exec\" probe needs a `command`",
                        )
                        .label("no command")
                        .help(example),
                    );
                    ok = false;
                }
                Some((e, _)) => match rd.string(e, "command") {
                    Some(c) => {
                        d.vm_spans.insert(format!("{at}.exec.command"), c.span);
                        probe.exec = Some(ExecAction { command: c.value });
                    }
                    None => ok = false,
                },
            }
        }
        "tcp" => {
            if let Some((_, span)) = settings.get("command") {
                wrong_for(rd, "command", "tcp", *span);
                ok = false;
            }
            match settings.get("port") {
                None => {
                    rd.push(
                        Problem::error(CODE, name_span(node), "a \"tcp\" probe needs a `port`")
                            .label("no port")
                            .help("write it as `probe \"tcp\" port=80`"),
                    );
                    ok = false;
                }
                Some((e, _)) => match rd.integer(e, "port") {
                    Some(v) => match u16::try_from(v.value) {
                        Ok(p) => {
                            d.vm_spans.insert(format!("{at}.tcpSocket.port"), v.span);
                            probe.tcp_socket = Some(TcpSocketAction { port: p });
                        }
                        Err(_) => {
                            rd.error(
                                v.span,
                                format!("port {} is out of range", v.value),
                                "ports are 1-65535",
                            );
                            ok = false;
                        }
                    },
                    None => ok = false,
                },
            }
        }
        other => {
            rd.error(
                kind.span,
                format!("unknown probe type `{other}`"),
                "use \"exec\" (a command that must exit 0) or \"tcp\" (a guest port that must accept a connection)",
            );
            return;
        }
    }
    for (key, field) in [
        ("period", "periodSeconds"),
        ("timeout", "timeoutSeconds"),
        ("failure-threshold", "failureThreshold"),
    ] {
        let Some((e, _)) = settings.get(key) else {
            continue;
        };
        let Some(v) = rd.integer(e, key) else {
            ok = false;
            continue;
        };
        d.vm_spans.insert(format!("{at}.{field}"), v.span);
        let n = u32::try_from(v.value).unwrap_or(u32::MAX);
        match key {
            "period" => probe.period_seconds = n,
            "timeout" => probe.timeout_seconds = n,
            _ => probe.failure_threshold = n,
        }
    }
    if ok {
        d.vm_spans.insert(at, name_span(node));
        d.spec.readiness_probes.push(probe);
    }
}

/// Reads a size: a plain integer in the node's unit (MiB for memory, GiB
/// for disk) or a string with a unit suffix (`"2G"`, `"512M"`).
fn read_size(rd: &mut Reader, e: &KdlEntry, what: &str, mib_per_unit: u64) -> Option<Spanned<u64>> {
    if let Some(s) = e.value().as_string() {
        let span = rd.vspan(e);
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mib: Option<u64> = match unit.trim().to_ascii_uppercase().as_str() {
            "M" | "MB" | "MIB" => Some(1),
            "G" | "GB" | "GIB" => Some(1024),
            "T" | "TB" | "TIB" => Some(1024 * 1024),
            _ => None,
        };
        let value = num
            .parse::<u64>()
            .ok()
            .zip(mib)
            .and_then(|(n, m)| n.checked_mul(m));
        return match value {
            Some(v) if v % mib_per_unit == 0 => Some(Spanned {
                value: v / mib_per_unit,
                span,
            }),
            Some(_) => {
                rd.error(
                    span,
                    format!("{what} `{s}` is not a whole number of GiB"),
                    "give the disk size in whole gigabytes",
                );
                None
            }
            None => {
                rd.error(
                    span,
                    format!("{what} `{s}` is not a size"),
                    format!(
                        "write a number ({} ) or a string with a unit like \"2G\" or \"512M\"",
                        if mib_per_unit == 1 { "MiB" } else { "GiB" }
                    ),
                );
                None
            }
        };
    }
    rd.integer(e, what)
}

fn read_image(rd: &mut Reader, node: &KdlNode, ctx: &Context, d: &mut VmDraft) {
    let is_url = node.name().value() == "image-url";
    let entries = rd.entries(node, &["checksum"], 1);
    rd.no_children(node);
    let Some(arg) = entries.args.first() else {
        let ex = if is_url {
            "image-url \"https://example.com/disk.qcow2\""
        } else {
            "image \"images/disk.qcow2\""
        };
        rd.push(
            Problem::error(
                CODE,
                name_span(node),
                format!("`{}` needs a value", node.name().value()),
            )
            .label("missing value")
            .help(format!("write it as `{ex}`")),
        );
        return;
    };
    let Some(s) = rd.string(arg, node.name().value()) else {
        return;
    };
    if let Some(c) = entries.props.get("checksum")
        && let Some(c) = rd.string(c, "checksum")
    {
        if let Err(m) = crate::validate::check_checksum(&c.value) {
            rd.error(
                c.span,
                m,
                "write it as `checksum=\"sha256:<64 hex digits>\"` or `sha512:<128 hex digits>`",
            );
        }
        d.checksum = Some(c);
    }
    if is_url {
        if let Err(m) = crate::validate::check_url(&s.value) {
            rd.error(
                s.span,
                m,
                "give an http://, https:// or file:// URL of a disk image",
            );
            return;
        }
        d.image_source = Some(Spanned {
            value: ImageSource::Url { url: s.value },
            span: s.span,
        });
    } else {
        let path = ctx.resolve(&s.value);
        if let Some(kind) = not_regular(&path) {
            rd.push(
                Problem::error(
                    CODE,
                    s.span,
                    format!(
                        "image file {} is {kind}, not a regular file",
                        path.display()
                    ),
                )
                .label("not a regular file")
                .help("name a disk image file (qcow2, raw, …)"),
            );
            return;
        }
        if !path.exists() {
            rd.push(
                Problem::error(
                    CODE,
                    s.span,
                    format!("image file {} does not exist (yet)", path.display()),
                )
                .label("not found")
                .help(format!(
                    "the Image will wait until it exists; relative paths are resolved against {}",
                    ctx.base_dir.display()
                ))
                .warning(),
            );
        }
        d.image_source = Some(Spanned {
            value: ImageSource::Path {
                path: path.to_string_lossy().into_owned(),
            },
            span: s.span,
        });
    }
}

fn read_network(rd: &mut Reader, node: &KdlNode, d: &mut VmDraft) {
    let entries = rd.entries(node, &["bridge", "name"], 1);
    let Some(mode) = entries
        .args
        .first()
        .and_then(|e| rd.string(e, "network mode"))
    else {
        if entries.args.is_empty() {
            rd.push(
                Problem::error(CODE, name_span(node), "`network` needs a mode")
                    .label("missing mode")
                    .help("write `network \"user\"`, `\"tap\"`, `\"vnic\"` or `\"none\"`"),
            );
        }
        return;
    };
    d.vm_spans.insert("spec.network".into(), mode.span);
    // The bridge or VNIC name may be a property or a child node; the tool we
    // replace silently ignored the child form.
    let mut attrs: std::collections::HashMap<&str, Spanned<String>> = Default::default();
    for key in ["bridge", "name"] {
        if let Some(e) = entries.props.get(key)
            && let Some(v) = rd.string(e, key)
        {
            attrs.insert(key, v);
        }
    }
    if let Some(children) = node.children() {
        for c in children.nodes() {
            let cname = c.name().value();
            let key = match cname {
                "bridge" => "bridge",
                "name" => "name",
                _ => {
                    rd.unknown_node(c, "a `network` block", &["bridge", "name"]);
                    continue;
                }
            };
            let Some(v) = rd
                .leaf(c, &format!("{key} \"br0\""))
                .and_then(|e| rd.string(e, key))
            else {
                continue;
            };
            if let Some(prev) = attrs.get(key) {
                rd.push(
                    Problem::error(
                        CODE,
                        v.span,
                        format!("`{key}` is given both as a property and in the block"),
                    )
                    .label("second value")
                    .help(format!("keep one: the property says `{}`", prev.value)),
                );
                continue;
            }
            attrs.insert(key, v);
        }
    }
    let wrong = |rd: &mut Reader,
                 key: &str,
                 mode: &str,
                 attrs: &std::collections::HashMap<&str, Spanned<String>>| {
        if let Some(v) = attrs.get(key) {
            rd.error(
                v.span,
                format!("`{key}` does not apply to network mode `{mode}`"),
                match key {
                    "bridge" => "only `network \"tap\"` takes a bridge",
                    _ => "only `network \"vnic\"` takes a name",
                },
            );
        }
    };
    d.spec.network = match mode.value.as_str() {
        "user" | "none" => {
            wrong(rd, "bridge", &mode.value, &attrs);
            wrong(rd, "name", &mode.value, &attrs);
            if mode.value == "user" {
                Network::User
            } else {
                Network::None
            }
        }
        "tap" => {
            wrong(rd, "name", "tap", &attrs);
            let bridge = attrs.get("bridge").map(|b| {
                d.vm_spans.insert("spec.network.bridge".into(), b.span);
                b.value.clone()
            });
            Network::Tap {
                bridge: bridge.unwrap_or_else(|| "br0".into()),
            }
        }
        "vnic" => {
            wrong(rd, "bridge", "vnic", &attrs);
            match attrs.get("name") {
                Some(n) => {
                    d.vm_spans.insert("spec.network.name".into(), n.span);
                    Network::Vnic {
                        name: n.value.clone(),
                    }
                }
                None => {
                    rd.error(
                        mode.span,
                        "network mode `vnic` needs a VNIC name",
                        "write `network \"vnic\" name=\"vnic0\"`",
                    );
                    return;
                }
            }
        }
        other => {
            let help = match crate::diag::did_you_mean(other, &["user", "tap", "vnic", "none"]) {
                Some(s) => format!(
                    "did you mean \"{s}\"? Modes are \"user\", \"tap\", \"vnic\" and \"none\""
                ),
                None => "modes are \"user\", \"tap\", \"vnic\" and \"none\"".into(),
            };
            rd.push(
                Problem::error(CODE, mode.span, format!("unknown network mode `{other}`"))
                    .label("unknown mode")
                    .help(help),
            );
            return;
        }
    };
}

/// Reads a local file path and captures its content digest, so that an
/// edit to the file is a change of the spec. Only a regular file within
/// the size limit of its use is accepted (see [`crate::localfile`]).
fn read_file(
    rd: &mut Reader,
    e: &KdlEntry,
    use_: FileUse,
    ctx: &Context,
) -> Option<Spanned<LocalFile>> {
    let what = use_.what();
    let s = rd.string(e, what)?;
    let path = ctx.resolve(&s.value);
    match crate::localfile::digest(&path, use_) {
        Ok(digest) => Some(Spanned {
            value: LocalFile {
                path: path.to_string_lossy().into_owned(),
                digest: Some(digest),
            },
            span: s.span,
        }),
        Err(err) => {
            let (label, help) = match &err {
                LocalFileError::NotRegular { .. } => (
                    "not a regular file",
                    "name a regular file: its content is read to take its digest".to_owned(),
                ),
                LocalFileError::TooLarge { .. } => (
                    "too large",
                    format!(
                        "a {what} file may be at most {}; put bigger content in the image",
                        human_bytes(use_.max_bytes())
                    ),
                ),
                LocalFileError::NotFound | LocalFileError::Io(_) => (
                    "cannot read",
                    format!(
                        "paths are resolved against the VMFile's directory ({}); `~` is your home",
                        ctx.base_dir.display()
                    ),
                ),
            };
            let msg = match err {
                LocalFileError::Io(e) => format!("cannot read {what} {}: {e}", path.display()),
                e => format!("{what} {} {e}", path.display()),
            };
            rd.push(Problem::error(CODE, s.span, msg).label(label).help(help));
            None
        }
    }
}

/// What the existing `path` is when it is not a regular file (`None` when
/// it is one or does not exist), without opening it.
fn not_regular(path: &std::path::Path) -> Option<&'static str> {
    let ft = std::fs::metadata(path).ok()?.file_type();
    crate::localfile::kind_of(ft)
}

/// `sha256:<hex>` of the regular file at `path`, at most
/// [`FileUse::Upload`]'s size limit (see [`crate::localfile::digest`] for
/// a use's own limit). Errors: the file is missing (`NotFound`), not a
/// regular file, too large, or unreadable.
pub fn digest_file(path: &std::path::Path) -> std::io::Result<String> {
    crate::localfile::digest(path, FileUse::Upload).map_err(|e| match e {
        LocalFileError::Io(e) => e,
        LocalFileError::NotFound => std::io::Error::from_raw_os_error(libc::ENOENT),
        e => std::io::Error::other(e.to_string()),
    })
}

fn read_cloud_init(rd: &mut Reader, node: &KdlNode, ctx: &Context, d: &mut VmDraft) {
    rd.entries(node, &[], 0);
    let mut ci = CloudInit::default();
    d.vm_spans.insert("spec.cloudInit".into(), name_span(node));
    const KNOWN: &[&str] = &["hostname", "ssh-key", "user-data"];
    let mut seen: std::collections::HashMap<String, SourceSpan> = Default::default();
    for c in node.children().map(|c| c.nodes()).unwrap_or_default() {
        let cname = c.name().value();
        if !KNOWN.contains(&cname) {
            rd.unknown_node(c, "a `cloud-init` block", KNOWN);
            continue;
        }
        if let Some(f) = seen.insert(cname.to_owned(), name_span(c)) {
            rd.duplicate(c, f);
            continue;
        }
        let Some(e) = rd.leaf(c, &format!("{cname} \"…\"")) else {
            continue;
        };
        match cname {
            "hostname" => {
                if let Some(h) = rd.string(e, "hostname") {
                    d.vm_spans.insert("spec.cloudInit.hostname".into(), h.span);
                    ci.hostname = Some(h.value);
                }
            }
            "ssh-key" => {
                if let Some(f) = read_file(rd, e, FileUse::SshKey, ctx) {
                    d.vm_spans.insert("spec.cloudInit.sshKey".into(), f.span);
                    ci.ssh_key = Some(f.value);
                }
            }
            _ => {
                if let Some(f) = read_file(rd, e, FileUse::UserData, ctx) {
                    d.vm_spans.insert("spec.cloudInit.userData".into(), f.span);
                    ci.user_data = Some(f.value);
                }
            }
        }
    }
    d.spec.cloud_init = Some(ci);
}

fn read_ssh(rd: &mut Reader, node: &KdlNode, ctx: &Context, d: &mut VmDraft) {
    rd.entries(node, &[], 0);
    let mut ssh = SshConfig {
        user: default_ssh_user(),
        private_key: None,
        timeout_seconds: None,
    };
    d.vm_spans.insert("spec.ssh".into(), name_span(node));
    const KNOWN: &[&str] = &["user", "private-key", "timeout"];
    let mut seen: std::collections::HashMap<String, SourceSpan> = Default::default();
    for c in node.children().map(|c| c.nodes()).unwrap_or_default() {
        let cname = c.name().value();
        if !KNOWN.contains(&cname) {
            rd.unknown_node(c, "an `ssh` block", KNOWN);
            continue;
        }
        if let Some(f) = seen.insert(cname.to_owned(), name_span(c)) {
            rd.duplicate(c, f);
            continue;
        }
        let Some(e) = rd.leaf(c, &format!("{cname} \"…\"")) else {
            continue;
        };
        match cname {
            "user" => {
                if let Some(u) = rd.string(e, "user") {
                    d.vm_spans.insert("spec.ssh.user".into(), u.span);
                    ssh.user = u.value;
                }
            }
            "private-key" => {
                if let Some(k) = rd.string(e, "private-key") {
                    let path = ctx.resolve(&k.value);
                    if let Some(kind) = not_regular(&path) {
                        rd.push(
                            Problem::error(
                                CODE,
                                k.span,
                                format!(
                                    "private key {} is {kind}, not a regular file",
                                    path.display()
                                ),
                            )
                            .label("not a regular file")
                            .help("name an SSH private key file"),
                        );
                        continue;
                    }
                    if !path.exists() {
                        rd.push(
                            Problem::error(CODE, k.span, format!("private key {} does not exist", path.display()))
                                .label("not found")
                                .help("vmctl will fail to connect until it exists; paths are relative to the VMFile")
                                .warning(),
                        );
                    }
                    d.vm_spans.insert("spec.ssh.privateKey".into(), k.span);
                    ssh.private_key = Some(path.to_string_lossy().into_owned());
                }
            }
            _ => {
                if let Some(t) = rd.integer(e, "timeout") {
                    d.vm_spans.insert("spec.ssh.timeoutSeconds".into(), t.span);
                    ssh.timeout_seconds = Some(u32::try_from(t.value).unwrap_or(u32::MAX));
                }
            }
        }
    }
    d.spec.ssh = Some(ssh);
}

fn read_provision(rd: &mut Reader, node: &KdlNode, ctx: &Context, d: &mut VmDraft) {
    let idx = d.steps.len();
    let at = format!("spec.steps[{idx}]");
    let entries = rd.entries(node, &[], 1);
    let Some(kind) = entries
        .args
        .first()
        .and_then(|e| rd.string(e, "provisioner type"))
    else {
        if entries.args.is_empty() {
            rd.push(
                Problem::error(CODE, name_span(node), "`provision` needs a type")
                    .label("missing type")
                    .help("write `provision \"shell\" { … }` or `provision \"file\" { … }`"),
            );
        }
        return;
    };
    d.prov_spans.insert(at.clone(), kind.span);
    let known: &[&str] = match kind.value.as_str() {
        "shell" => &["inline", "script"],
        "file" => &["source", "destination"],
        other => {
            let help = match crate::diag::did_you_mean(other, &["shell", "file"]) {
                Some(s) => format!("did you mean \"{s}\"?"),
                None => "provisioner types are \"shell\" and \"file\"".into(),
            };
            rd.push(
                Problem::error(
                    CODE,
                    kind.span,
                    format!("unknown provisioner type `{other}`"),
                )
                .label("unknown type")
                .help(help),
            );
            return;
        }
    };
    let mut inline = None;
    let mut script = None;
    let mut source = None;
    let mut destination = None;
    let mut seen: std::collections::HashMap<String, SourceSpan> = Default::default();
    let context = format!("a `provision \"{}\"` block", kind.value);
    for c in node.children().map(|c| c.nodes()).unwrap_or_default() {
        let cname = c.name().value();
        if !known.contains(&cname) {
            rd.unknown_node(c, &context, known);
            continue;
        }
        if let Some(f) = seen.insert(cname.to_owned(), name_span(c)) {
            rd.duplicate(c, f);
            continue;
        }
        let Some(e) = rd.leaf(c, &format!("{cname} \"…\"")) else {
            continue;
        };
        match cname {
            "inline" => {
                if let Some(s) = rd.string(e, "inline") {
                    d.prov_spans.insert(format!("{at}.inline"), s.span);
                    inline = Some(s.value);
                }
            }
            "script" => {
                // Keep the step even when the file is unreadable so the
                // "exactly one of" check still sees it.
                if let Some(f) = read_file(rd, e, FileUse::Script, ctx) {
                    d.prov_spans.insert(format!("{at}.script"), f.span);
                    script = Some(f.value);
                } else {
                    script = Some(LocalFile {
                        path: "/unreadable".into(),
                        digest: None,
                    });
                }
            }
            "source" => {
                if let Some(f) = read_file(rd, e, FileUse::Upload, ctx) {
                    d.prov_spans.insert(format!("{at}.source"), f.span);
                    source = Some(f.value);
                } else {
                    source = Some(LocalFile {
                        path: "/unreadable".into(),
                        digest: None,
                    });
                }
            }
            _ => {
                if let Some(s) = rd.string(e, "destination") {
                    d.prov_spans.insert(format!("{at}.destination"), s.span);
                    destination = Some(s.value);
                }
            }
        }
    }
    let step = if kind.value == "shell" {
        ProvisionStep::Shell { inline, script }
    } else {
        match (source, destination) {
            (Some(source), Some(destination)) => ProvisionStep::File {
                source,
                destination,
            },
            (s, dst) => {
                let missing = match (s.is_none(), dst.is_none()) {
                    (true, true) => "`source` and `destination`",
                    (true, false) => "`source`",
                    _ => "`destination`",
                };
                rd.error(
                    kind.span,
                    format!("a file provisioner needs {missing}"),
                    "write `provision \"file\" { source \"local/file\"; destination \"/absolute/path/on/guest\" }`",
                );
                // Keep indices aligned with the file for later steps.
                ProvisionStep::Shell {
                    inline: Some(String::new()),
                    script: None,
                }
            }
        }
    };
    d.steps.push(step);
}
