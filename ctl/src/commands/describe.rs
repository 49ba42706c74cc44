//! `vmctl describe KIND [NAME]`.

use std::collections::HashMap;
use std::process::ExitCode;

use vmctl_api::{Object, ObjectRef};

use super::events::{AggregatedNote, NoteIn, aggregate};
use super::{Globals, age, kind_arg, name_arg_of, table};
use crate::output::print;

/// How many (aggregated) notes a description shows, the most recent.
const EVENTS_SHOWN: usize = 20;

/// What separates the descriptions of several objects: two empty lines,
/// as `kubectl describe` does.
const SEPARATOR: &str = "\n\n";

/// The events section: the most recent [`EVENTS_SHOWN`] aggregated notes.
fn events(s: &mut String, notes: &[AggregatedNote]) {
    if notes.is_empty() {
        s.push_str("Events:           <none>\n");
        return;
    }
    s.push_str("Events:\n");
    let mut rows = vec![vec![
        "  TYPE".into(),
        "REASON".into(),
        "AGE".into(),
        "MESSAGE".into(),
    ]];
    for n in &notes[notes.len().saturating_sub(EVENTS_SHOWN)..] {
        rows.push(vec![
            format!("  {}", n.type_),
            n.reason.clone(),
            n.seen(),
            n.message.clone(),
        ]);
    }
    s.push_str(&table(&rows));
}

/// The conditions section (Ready first, then by type).
fn conditions(s: &mut String, mut conds: Vec<vmctl_api::Condition>) {
    if conds.is_empty() {
        return;
    }
    conds.sort_by(|a, b| (a.type_ != "Ready", &a.type_).cmp(&(b.type_ != "Ready", &b.type_)));
    s.push_str("Conditions:\n");
    let mut rows = vec![vec![
        "  TYPE".into(),
        "STATUS".into(),
        "REASON".into(),
        "AGE".into(),
        "MESSAGE".into(),
    ]];
    for c in conds {
        rows.push(vec![
            format!("  {}", c.type_),
            format!("{:?}", c.status),
            c.reason,
            age(c.last_transition_time),
            c.message,
        ]);
    }
    s.push_str(&table(&rows));
}

/// Renders the description of a Node: its labels, address, capacity and
/// allocatable, conditions, the VMs on it (`status.nodeName`, among
/// `vms`) and its notes.
pub(crate) fn render_node(o: &Object, vms: &[Object], notes: &[AggregatedNote]) -> String {
    let m = &o.metadata;
    let st: vmctl_api::NodeStatus = o
        .status
        .as_ref()
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default();
    let mut s = String::new();
    s.push_str(&format!("Name:             {}\n", m.name));
    s.push_str(&format!("Kind:             {}\n", o.kind));
    s.push_str(&format!(
        "Status:           {}\n",
        super::get::node_state(o.status.as_ref().map(|_| &st))
    ));
    s.push_str(&format!(
        "Created:          {}\n",
        m.creation_timestamp.map_or("-".into(), |t| format!(
            "{} ({} ago)",
            t.to_rfc3339(),
            age(Some(t))
        ))
    ));
    if let Some(d) = m.deletion_timestamp {
        s.push_str(&format!(
            "Deletion:         requested {} ago\n",
            age(Some(d))
        ));
    }
    s.push_str(&format!(
        "Labels:           {}\n",
        super::get::labels_cell(o).replace(',', ", ")
    ));
    if o.status.is_none() {
        s.push_str("Reported:         not yet (its agent has written no status)\n");
    } else {
        s.push_str(&format!("Address:          {}\n", st.address.socket));
        if let Some(tcp) = &st.address.tcp {
            s.push_str(&format!("TCP address:      {tcp}\n"));
        }
        s.push_str(&format!("Agent version:    {}\n", st.agent_version));
        s.push_str(&format!(
            "Driver:           {} (accelerator {})\n",
            st.driver,
            st.accelerator.as_deref().unwrap_or("-")
        ));
        s.push_str(&format!(
            "Last heartbeat:   {}\n",
            st.last_heartbeat_time.map_or("-".into(), |t| format!(
                "{} ({} ago)",
                t.to_rfc3339(),
                age(Some(t))
            ))
        ));
        s.push_str(&format!(
            "Node lease TTL:   {}\n",
            st.lease_ttl_seconds
                .map_or("- (store sled)".into(), |t| format!("{t}s"))
        ));
        s.push_str("Resources:\n");
        let (c, a) = (st.capacity, st.allocatable);
        s.push_str(&table(&[
            vec!["  RESOURCE".into(), "CAPACITY".into(), "ALLOCATABLE".into()],
            vec!["  vcpus".into(), c.vcpus.to_string(), a.vcpus.to_string()],
            vec![
                "  memory".into(),
                format!("{}Mi", c.memory_mib),
                format!("{}Mi", a.memory_mib),
            ],
            vec![
                "  disk (free)".into(),
                format!("{}Gi", c.disk_gib),
                format!("{}Gi", a.disk_gib),
            ],
        ]));
        conditions(&mut s, st.conditions.clone());
    }
    let here: Vec<&Object> = vms
        .iter()
        .filter(|vm| {
            vm.status
                .as_ref()
                .and_then(|st| st.get("nodeName"))
                .and_then(|n| n.as_str())
                == Some(m.name.as_str())
        })
        .collect();
    if here.is_empty() {
        s.push_str("VMs:              <none>\n");
    } else {
        s.push_str("VMs:\n");
        let mut rows = vec![vec![
            "  NAME".into(),
            "PHASE".into(),
            "VCPUS".into(),
            "MEMORY".into(),
        ]];
        for vm in here {
            let field = |f: &str| vm.spec.get(f).map_or("-".into(), |v| v.to_string());
            rows.push(vec![
                format!("  {}", vm.metadata.name),
                // As `get vm` shows it (`NodeLost` for a VM lost with it).
                super::get::phase(vm),
                field("vcpus"),
                format!("{}Mi", field("memoryMib")),
            ]);
        }
        s.push_str(&table(&rows));
    }
    events(&mut s, notes);
    s
}

/// Renders the description of an object and its notes (aggregated, oldest
/// first).
pub(crate) fn render(o: &Object, notes: &[AggregatedNote]) -> String {
    let m = &o.metadata;
    let mut s = String::new();
    s.push_str(&format!("Name:             {}\n", m.name));
    s.push_str(&format!("Kind:             {}\n", o.kind));
    s.push_str(&format!(
        "UID:              {}\n",
        m.uid.as_deref().unwrap_or("-")
    ));
    s.push_str(&format!("Generation:       {}\n", m.generation));
    s.push_str(&format!("ResourceVersion:  {}\n", m.resource_version));
    s.push_str(&format!(
        "Created:          {}\n",
        m.creation_timestamp.map_or("-".into(), |t| format!(
            "{} ({} ago)",
            t.to_rfc3339(),
            age(Some(t))
        ))
    ));
    if let Some(d) = m.deletion_timestamp {
        s.push_str(&format!(
            "Deletion:         requested {} ago\n",
            age(Some(d))
        ));
    }
    if !m.labels.is_empty() {
        let l: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        s.push_str(&format!("Labels:           {}\n", l.join(", ")));
    }
    if !m.finalizers.is_empty() {
        s.push_str(&format!("Finalizers:       {}\n", m.finalizers.join(", ")));
    }
    if let Some(src) = &m.source {
        s.push_str(&format!(
            "Applied from:     {} by {}\n",
            src.file.as_deref().unwrap_or("-"),
            src.applied_by.as_deref().unwrap_or("-")
        ));
    }
    s.push_str("Spec:\n");
    for line in serde_yaml::to_string(&o.spec).unwrap_or_default().lines() {
        s.push_str(&format!("  {line}\n"));
    }
    match &o.status {
        None => s.push_str("Status:           not reported yet\n"),
        Some(st) => {
            let phase = st.get("phase").and_then(|p| p.as_str()).unwrap_or("-");
            let observed = st
                .get("observedGeneration")
                .and_then(|g| g.as_u64())
                .unwrap_or(0);
            s.push_str(&format!("Phase:            {phase}\n"));
            s.push_str(&format!("Observed gen:     {observed}\n"));
            let conds: Vec<vmctl_api::Condition> = st
                .get("conditions")
                .and_then(|c| serde_json::from_value(c.clone()).ok())
                .unwrap_or_default();
            // Ready first, then by type: the same order every time.
            conditions(&mut s, conds);
            let forwards: Vec<vmctl_api::PortForwardStatus> = st
                .get("portForwards")
                .and_then(|c| serde_json::from_value(c.clone()).ok())
                .unwrap_or_default();
            if !forwards.is_empty() {
                s.push_str("Port forwards:\n");
                let mut rows = vec![vec![
                    "  FORWARD".into(),
                    "STATE".into(),
                    "REASON".into(),
                    "AGE".into(),
                    "MESSAGE".into(),
                ]];
                for e in forwards {
                    rows.push(vec![
                        format!("  {}", e.forward().describe()),
                        format!("{:?}", e.state),
                        e.reason.clone().unwrap_or_default(),
                        age(e.last_transition_time),
                        e.message.clone().unwrap_or_default(),
                    ]);
                }
                s.push_str(&table(&rows));
            }
            let shares: Vec<vmctl_api::ShareRuntime> = st
                .pointer("/runtime/shares")
                .and_then(|c| serde_json::from_value(c.clone()).ok())
                .unwrap_or_default();
            if !shares.is_empty() {
                s.push_str("Shared folders:\n");
                let mut rows = vec![vec![
                    "  MOUNT".into(),
                    "HOST PATH".into(),
                    "TYPE".into(),
                    "MODE".into(),
                ]];
                for sh in shares {
                    rows.push(vec![
                        format!("  {}", sh.mount_path),
                        sh.host_path,
                        sh.type_.as_str().to_owned(),
                        if sh.read_only { "ro" } else { "rw" }.to_owned(),
                    ]);
                }
                s.push_str(&table(&rows));
            }
            let mut rest = st.clone();
            if let Some(obj) = rest.as_object_mut() {
                obj.remove("phase");
                obj.remove("conditions");
                obj.remove("observedGeneration");
                obj.remove("portForwards");
            }
            if rest.as_object().is_some_and(|o| !o.is_empty()) {
                s.push_str("Status:\n");
                for line in serde_yaml::to_string(&rest).unwrap_or_default().lines() {
                    s.push_str(&format!("  {line}\n"));
                }
            }
        }
    }
    events(&mut s, notes);
    s
}

/// Describes one object, or with no `name` every object of `kind` (by
/// name, separated as `kubectl describe` separates them).
pub fn run(g: &Globals, kind: &str, name: Option<&str>) -> miette::Result<ExitCode> {
    let kind = kind_arg(kind)?;
    if let Some(name) = name {
        name_arg_of(kind, name)?;
    }
    let client = g.client()?;
    // A Node's description lists the VMs on it.
    let vms = if kind == vmctl_api::Kind::Node {
        client
            .list(Some(vmctl_api::Kind::VirtualMachine), &[])?
            .items
    } else {
        Vec::new()
    };
    let describe = |o: &Object, notes: &[AggregatedNote]| match o.kind {
        vmctl_api::Kind::Node => render_node(o, &vms, notes),
        _ => render(o, notes),
    };
    let Some(name) = name else {
        let list = client.list(Some(kind), &[])?;
        let mut objects = list.items;
        if objects.is_empty() {
            eprintln!("No resources found.");
            return Ok(ExitCode::SUCCESS);
        }
        objects.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        // One read of the notes for all of them.
        let notes = client.notes(None)?;
        let mut by_object: HashMap<ObjectRef, Vec<NoteIn>> = HashMap::new();
        for n in notes {
            by_object.entry(n.object.clone()).or_default().push(n);
        }
        let text: Vec<String> = objects
            .iter()
            .map(|o| {
                let notes = by_object.remove(&o.object_ref()).unwrap_or_default();
                describe(o, &aggregate(notes))
            })
            .collect();
        print(&text.join(SEPARATOR))?;
        return Ok(ExitCode::SUCCESS);
    };
    let o = super::objects::get_object(&client, kind, name)?;
    let notes = client.notes(Some(&ObjectRef::new(kind, name)))?;
    print(&describe(&o, &aggregate(notes)))?;
    Ok(ExitCode::SUCCESS)
}
