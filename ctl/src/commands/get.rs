//! `vmctl get [KIND [NAME]]`.

use std::collections::HashMap;
use std::process::ExitCode;

use vmctl_api::{Kind, Object, Resource};

use super::{Globals, age, kind_arg, name_arg, name_arg_of, table};
use crate::cli::GetOutput;
use crate::client::WatchItem;
use crate::output::print;

/// The PHASE (STATE) cell of an object: its `status.phase`, `NodeLost`
/// for a VM lost with its node, `Terminating`/`Pending` without a status.
pub(crate) fn phase(o: &Object) -> String {
    // A VM lost with its node shows so (as kubectl shows a Pod's reason,
    // `NodeLost`, in its STATUS column); its phase stays as last reported.
    if o.kind == vmctl_api::Kind::VirtualMachine
        && super::wait::conditions(o)
            .iter()
            .any(|c| c.type_ == "Ready" && c.reason == "NodeLost")
    {
        return "NodeLost".into();
    }
    o.status
        .as_ref()
        .and_then(|s| s.get("phase"))
        .and_then(|p| p.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            if o.metadata.deletion_timestamp.is_some() {
                "Terminating"
            } else {
                "Pending"
            }
            .into()
        })
}

/// A VM's port forwards in Docker's notation (`127.0.0.1:8080->80/tcp`),
/// comma-separated, a failed one marked `(Failed)`; `-` when none.
pub(crate) fn ports_cell(vm: &vmctl_api::VirtualMachine) -> String {
    if vm.spec.port_forwards.is_empty() {
        return "-".into();
    }
    let entries = vm
        .status
        .as_ref()
        .map(|s| s.port_forwards.as_slice())
        .unwrap_or_default();
    vm.spec
        .port_forwards
        .iter()
        .map(|f| {
            let failed = entries
                .iter()
                .any(|e| e.forward() == *f && e.state == vmctl_api::PortForwardState::Failed);
            if failed {
                format!("{} (Failed)", f.describe())
            } else {
                f.describe()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The node a VM's instance is on (`status.nodeName`), `<none>` before
/// one made it (kubectl's NODE column of pods).
pub(crate) fn node_cell(vm: &vmctl_api::VirtualMachine) -> String {
    vm.status
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_else(|| "<none>".into())
}

/// A VM's disks and their sizes, `root:10GiB,data:1GiB`: as the
/// hypervisor reports them when it does (what the guest sees), else as
/// the spec asks (`root:image` when the root disk is the image's size).
pub(crate) fn disks_cell(vm: &vmctl_api::VirtualMachine) -> String {
    let size = |b: u64| vmctl_api::limits::human_bytes(b).replace(' ', "");
    let reported = vm
        .status
        .as_ref()
        .and_then(|s| s.runtime.as_ref())
        .map(|r| r.disks.as_slice())
        .unwrap_or_default();
    let cells: Vec<String> = if reported.is_empty() {
        let root = vm
            .spec
            .disk_gib
            .map_or("image".into(), |g| format!("{g}GiB"));
        std::iter::once(format!("{}:{root}", vmctl_api::ROOT_DISK))
            .chain(
                vm.spec
                    .disks
                    .iter()
                    .map(|d| format!("{}:{}GiB", d.name, d.size_gib)),
            )
            .collect()
    } else {
        reported
            .iter()
            .map(|d| format!("{}:{}", d.name, size(d.size_bytes)))
            .collect()
    };
    cells.join(",")
}

/// Bytes as `0B`, `512Ki`, `64Mi`, `1.5Gi` (kubectl's binary suffixes).
pub(crate) fn human_size(b: u64) -> String {
    match b {
        0 => "0B".into(),
        b if b >= 1 << 30 => format!("{:.1}Gi", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{}Mi", b.div_ceil(1 << 20)),
        b => format!("{}Ki", b.div_ceil(1 << 10)),
    }
}

/// A Node's STATUS: `Ready`, `NotReady`, or `Unknown` before its agent
/// reported (as kubectl shows nodes).
pub(crate) fn node_state(status: Option<&vmctl_api::NodeStatus>) -> &'static str {
    match status.and_then(|s| s.ready()).map(|c| c.status) {
        Some(vmctl_api::ConditionStatus::True) => "Ready",
        Some(vmctl_api::ConditionStatus::False) => "NotReady",
        _ => "Unknown",
    }
}

/// A Node's labels as `k=v,k=v`, `<none>` without any (kubectl's).
pub(crate) fn labels_cell(o: &Object) -> String {
    if o.metadata.labels.is_empty() {
        return "<none>".into();
    }
    let l: Vec<String> = o
        .metadata
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    l.join(",")
}

/// What rows need beyond their object: for `get nodes -o wide`, how many
/// VMs each node runs (VMs by `status.nodeName`).
#[derive(Debug, Default)]
pub(crate) struct RowContext {
    /// VMs per node name.
    pub vms_per_node: HashMap<String, usize>,
    /// vCPUs and memory (MiB) the VMs bound to each node ask, by node name.
    pub allocated: HashMap<String, (u64, u64)>,
}

impl RowContext {
    /// Counts the VMs of each node among `vms`, and what they ask.
    pub(crate) fn from_vms(vms: &[Object]) -> Self {
        let mut cx = RowContext::default();
        for vm in vms {
            if let Some(n) = vm
                .status
                .as_ref()
                .and_then(|s| s.get("nodeName"))
                .and_then(|n| n.as_str())
            {
                *cx.vms_per_node.entry(n.to_owned()).or_default() += 1;
                if let Ok(v) = vmctl_api::VirtualMachine::from_object(vm) {
                    let a = cx.allocated.entry(n.to_owned()).or_default();
                    a.0 += u64::from(v.spec.vcpus);
                    a.1 += v.spec.memory_mib;
                }
            }
        }
        cx
    }
}

/// One table row for an object, with what it needs beyond itself.
pub(crate) fn row_in(o: &Object, wide: bool, cx: &RowContext) -> Vec<String> {
    let gen_cols = |o: &Object| {
        let observed = o
            .status
            .as_ref()
            .and_then(|s| s.get("observedGeneration"))
            .and_then(|g| g.as_u64())
            .unwrap_or(0);
        vec![o.metadata.generation.to_string(), observed.to_string()]
    };
    if let Ok(Resource::Node(n)) = Resource::from_object(o) {
        let st = n.status.unwrap_or_default();
        let mut r = vec![
            n.metadata.name.clone(),
            node_state(Some(&st)).to_owned(),
            st.capacity.vcpus.to_string(),
            format!("{}Mi", st.capacity.memory_mib),
        ];
        if wide {
            r.push(st.accelerator.clone().unwrap_or_else(|| "-".into()));
            r.push(labels_cell(o));
            r.push(
                cx.vms_per_node
                    .get(&n.metadata.name)
                    .copied()
                    .unwrap_or(0)
                    .to_string(),
            );
            let (cpu, mem) = cx
                .allocated
                .get(&n.metadata.name)
                .copied()
                .unwrap_or_default();
            r.push(format!(
                "{cpu}/{}vCPU,{mem}/{}Mi",
                st.allocatable.vcpus, st.allocatable.memory_mib
            ));
            r.push(st.address.tcp.clone().unwrap_or(st.address.socket.clone()));
        }
        r.push(age(o.metadata.creation_timestamp));
        return r;
    }
    let mut r = vec![o.metadata.name.clone(), phase(o)];
    match Resource::from_object(o) {
        Ok(Resource::VirtualMachine(vm)) => {
            r.push(vm.spec.vcpus.to_string());
            r.push(format!("{}Mi", vm.spec.memory_mib));
            r.push(vm.spec.image.clone());
            if wide {
                r.push(format!("{:?}", vm.spec.power_state));
                r.push(node_cell(&vm));
                let ports = ports_cell(&vm);
                let disks = disks_cell(&vm);
                let rt = vm.status.and_then(|s| s.runtime).unwrap_or_default();
                r.push(rt.pid.map_or("-".into(), |p| p.to_string()));
                r.push(rt.ssh_port.map_or("-".into(), |p| {
                    format!("{}:{p}", rt.ssh_host.unwrap_or_default())
                }));
                r.push(ports);
                r.push(disks);
            }
        }
        Ok(Resource::Image(img)) => {
            r.push(match &img.spec.source {
                vmctl_api::ImageSource::Url { url } => url.clone(),
                vmctl_api::ImageSource::Path { path } => path.clone(),
            });
            if wide {
                let st = img.status.unwrap_or_default();
                r.push(st.format.unwrap_or_else(|| "-".into()));
                r.push(
                    st.size_bytes
                        .map_or("-".into(), |b| format!("{}Mi", b / (1024 * 1024))),
                );
            }
        }
        Ok(Resource::Provision(p)) => {
            r.push(p.spec.vm.clone());
            r.push(p.spec.steps.len().to_string());
        }
        Ok(Resource::Snapshot(s)) => {
            let st = s.status.unwrap_or_default();
            r.push(s.spec.vm.clone());
            let saved = st.creation_time.is_some();
            r.push(if !saved {
                "-".into()
            } else if st.memory {
                "yes".into()
            } else {
                "no".into()
            });
            r.push(
                st.size_bytes
                    .filter(|_| saved)
                    .map_or("-".into(), human_size),
            );
            if wide {
                r.push(if st.disks.is_empty() {
                    "-".into()
                } else {
                    st.disks.join(",")
                });
                r.push(age(st.last_restore_time));
            }
        }
        Ok(Resource::Node(_)) | Err(_) => {}
    }
    if wide {
        r.extend(gen_cols(o));
    }
    r.push(age(o.metadata.creation_timestamp));
    r
}

/// The header of a kind's table.
pub(crate) fn header(kind: Kind, wide: bool) -> Vec<String> {
    let mut h: Vec<&str> = match kind {
        Kind::VirtualMachine => vec!["NAME", "PHASE", "VCPUS", "MEMORY", "IMAGE"],
        Kind::Image => vec!["NAME", "PHASE", "SOURCE"],
        Kind::Provision => vec!["NAME", "PHASE", "VM", "STEPS"],
        Kind::Snapshot => vec!["NAME", "PHASE", "VM", "MEMORY", "SIZE"],
        Kind::Node => vec!["NAME", "STATUS", "VCPUS", "MEMORY"],
    };
    if wide {
        match kind {
            Kind::VirtualMachine => h.extend(["POWER", "NODE", "PID", "SSH", "PORTS", "DISKS"]),
            Kind::Image => h.extend(["FORMAT", "SIZE"]),
            Kind::Provision => {}
            Kind::Snapshot => h.extend(["DISKS", "RESTORED"]),
            Kind::Node => h.extend(["ACCEL", "LABELS", "VMS", "ALLOCATED", "ADDRESS"]),
        }
        if kind != Kind::Node {
            h.extend(["GEN", "OBSERVED"]);
        }
    }
    h.push("AGE");
    h.into_iter().map(str::to_owned).collect()
}

/// `-o json|yaml` of a listing: a `List` document as kubectl prints,
/// `{"apiVersion", "kind": "List", "metadata": {"resourceVersion"}, "items"}`.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct List<'a> {
    api_version: &'static str,
    kind: &'static str,
    metadata: ListMeta,
    items: &'a [Object],
}

/// The list's metadata: the resource version to watch from.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    resource_version: u64,
}

/// Renders a listing: a table (one per kind), names, or one `List`
/// document holding the objects as `items`.
pub(crate) fn render(objects: &[Object], resource_version: u64, output: GetOutput) -> String {
    render_in(objects, resource_version, output, &RowContext::default())
}

/// [`render`], with what the rows need beyond their objects.
pub(crate) fn render_in(
    objects: &[Object],
    resource_version: u64,
    output: GetOutput,
    cx: &RowContext,
) -> String {
    let list = || List {
        api_version: vmctl_api::API_VERSION,
        kind: "List",
        metadata: ListMeta { resource_version },
        items: objects,
    };
    match output {
        GetOutput::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(&list()).expect("serialises")
        ),
        GetOutput::Yaml => serde_yaml::to_string(&list()).expect("serialises"),
        GetOutput::Name => objects
            .iter()
            .map(|o| format!("{}\n", o.object_ref()))
            .collect(),
        GetOutput::Table | GetOutput::Wide => {
            let wide = output == GetOutput::Wide;
            let mut out = String::new();
            for kind in Kind::ALL {
                let of_kind: Vec<&Object> = objects.iter().filter(|o| o.kind == kind).collect();
                if of_kind.is_empty() {
                    continue;
                }
                if !out.is_empty() {
                    out.push('\n');
                }
                let mut rows = vec![header(kind, wide)];
                rows.extend(of_kind.iter().map(|o| row_in(o, wide, cx)));
                out.push_str(&table(&rows));
            }
            out
        }
    }
}

/// Renders one named object: in JSON or YAML the object itself (not a
/// list), else as a listing of it.
pub(crate) fn render_one(o: &Object, output: GetOutput, cx: &RowContext) -> String {
    match output {
        GetOutput::Json => format!("{}\n", serde_json::to_string_pretty(o).expect("serialises")),
        GetOutput::Yaml => serde_yaml::to_string(o).expect("serialises"),
        _ => render_in(std::slice::from_ref(o), 0, output, cx),
    }
}

/// What the rows of `kind` need: the VMs per node for `get nodes -o
/// wide` (one more listing), nothing else.
fn context_for(
    client: &crate::client::Client,
    kind: Option<Kind>,
    output: GetOutput,
) -> miette::Result<RowContext> {
    if kind == Some(Kind::Node) && output == GetOutput::Wide {
        let vms = client.list(Some(Kind::VirtualMachine), &[])?;
        return Ok(RowContext::from_vms(&vms.items));
    }
    Ok(RowContext::default())
}

/// Lists objects.
pub fn run(
    g: &Globals,
    kind: Option<&str>,
    name: Option<&str>,
    output: GetOutput,
    selector: &[String],
    watch: bool,
) -> miette::Result<ExitCode> {
    let kind = kind.map(kind_arg).transpose()?;
    if let Some(n) = name {
        match kind {
            Some(k) => name_arg_of(k, n)?,
            None => name_arg(n)?,
        }
    }
    for s in selector {
        if !s.contains('=') {
            return Err(miette::miette!(
                code = "vmctl::cli::bad_selector",
                help = "write -l key=value",
                "selector `{s}` has no `=`"
            ));
        }
    }
    let client = g.client()?;
    let cx = context_for(&client, kind, output)?;
    if let (Some(k), Some(n)) = (kind, name) {
        let o = super::objects::get_object(&client, k, n)?;
        if watch {
            let mut w = Watcher::new(output, cx);
            print(&w.object(&o))?;
            return watch_rows(&client, kind, name, o.metadata.resource_version, w);
        }
        print(&render_one(&o, output, &cx))?;
        return Ok(ExitCode::SUCCESS);
    }
    let list = client.list(kind, selector)?;
    let (mut objects, rv) = (list.items, list.resource_version);
    if kind.is_none() {
        // As `kubectl get all` leaves nodes out: what was applied (and
        // can be applied again from `-o yaml`).
        objects.retain(|o| o.kind != Kind::Node);
    }
    if watch {
        let mut w = Watcher::new(output, cx);
        if matches!(output, GetOutput::Table | GetOutput::Wide) {
            // One aligned table first; each change then is a row.
            if !objects.is_empty() {
                print(&render_in(&objects, rv, output, &w.cx))?;
                w.printed = true;
            }
        } else {
            for o in &objects {
                print(&w.object(o))?;
            }
        }
        return watch_rows(&client, kind, name, rv, w);
    }
    if objects.is_empty() && matches!(output, GetOutput::Table | GetOutput::Wide) {
        eprintln!("No resources found.");
        return Ok(ExitCode::SUCCESS);
    }
    print(&render_in(&objects, rv, output, &cx))?;
    Ok(ExitCode::SUCCESS)
}

/// How `get --watch` prints each object as it changes: a table row, or
/// the object itself (as kubectl does, not a list), YAML documents
/// separated by `---`.
struct Watcher {
    output: GetOutput,
    printed: bool,
    /// What rows need beyond their object (as when the watch started).
    cx: RowContext,
}

impl Watcher {
    fn new(output: GetOutput, cx: RowContext) -> Self {
        Watcher {
            output,
            printed: false,
            cx,
        }
    }

    /// The text for one object's current state.
    fn object(&mut self, o: &Object) -> String {
        let text = match self.output {
            GetOutput::Table | GetOutput::Wide => {
                let wide = self.output == GetOutput::Wide;
                if self.printed {
                    table(&[row_in(o, wide, &self.cx)])
                } else {
                    table(&[header(o.kind, wide), row_in(o, wide, &self.cx)])
                }
            }
            GetOutput::Yaml if self.printed => {
                format!("---\n{}", render_one(o, self.output, &self.cx))
            }
            _ => render_one(o, self.output, &self.cx),
        };
        self.printed = true;
        text
    }
}

/// Prints one row (or document) per change of a matching object until the
/// stream ends or the user interrupts.
fn watch_rows(
    client: &crate::client::Client,
    kind: Option<Kind>,
    name: Option<&str>,
    after: u64,
    mut w: Watcher,
) -> miette::Result<ExitCode> {
    let mut watch = client.watch(after)?;
    let mut failure = None;
    while let Some(item) = watch.next_item()? {
        let ev = match item {
            WatchItem::Resync(m) => {
                failure = Some(m);
                break;
            }
            WatchItem::Event(ev) => ev,
        };
        let r = &ev.object;
        if kind.is_some_and(|k| k != r.kind)
            || (kind.is_none() && r.kind == Kind::Node)
            || name.is_some_and(|n| n != r.name)
            || ev.change_type() == "noted"
        {
            continue;
        }
        let text = match client.get_opt(r.kind, &r.name)? {
            Some(o) => w.object(&o),
            None => format!("{r} deleted\n"),
        };
        print(&text)?;
    }
    match failure {
        Some(m) => Err(miette::miette!(
            code = "vmctl::get::resync",
            help = "run the command again",
            "watch ended: {m}"
        )),
        None => Ok(ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmctl_api::{VirtualMachine, VirtualMachineSpec, VirtualMachineStatus};

    fn vm(node: Option<&str>) -> Object {
        let spec: VirtualMachineSpec =
            serde_json::from_value(serde_json::json!({"image": "base"})).unwrap();
        let mut vm = VirtualMachine::new("web", spec);
        vm.status = Some(VirtualMachineStatus {
            node_name: node.map(str::to_owned),
            ..Default::default()
        });
        vm.to_object()
    }

    /// The NODE cell of a row under `get vm -o wide`, found by its header.
    fn node_of(o: &Object) -> String {
        let h = header(Kind::VirtualMachine, true);
        let r = row_in(o, true, &RowContext::default());
        assert_eq!(h.len(), r.len(), "{h:?} / {r:?}");
        let col = h.iter().position(|c| c == "NODE").expect("a NODE column");
        r[col].clone()
    }

    #[test]
    fn get_vm_wide_shows_the_node_of_the_instance_or_none() {
        assert_eq!(node_of(&vm(Some("host-b"))), "host-b");
        // Not placed yet: kubectl's `<none>`.
        assert_eq!(node_of(&vm(None)), "<none>");
        let mut no_status = vm(None);
        no_status.status = None;
        assert_eq!(node_of(&no_status), "<none>");
        // Only the wide table has it.
        assert!(!header(Kind::VirtualMachine, false).contains(&"NODE".to_owned()));
    }

    /// Tryout of issue 17: a VM lost with its node still read `Running`
    /// in `get vm` and `list`; only `describe` said `NodeLost`.
    #[test]
    fn a_vm_lost_with_its_node_shows_node_lost_as_its_phase() {
        let mut o = vm(Some("host-b"));
        o.status = Some(serde_json::json!({"phase": "Running", "nodeName": "host-b",
            "conditions": [{"type": "Ready", "status": "False", "reason": "NodeLost",
            "message": "node host-b is not Ready"}]}));
        assert_eq!(row_in(&o, false, &RowContext::default())[1], "NodeLost");
        let mut running = vm(Some("host-b"));
        running.status = Some(serde_json::json!({"phase": "Running", "nodeName": "host-b",
            "conditions": [{"type": "Ready", "status": "True", "reason": "Running"}]}));
        assert_eq!(
            row_in(&running, false, &RowContext::default())[1],
            "Running"
        );
    }
}
