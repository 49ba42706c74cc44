//! `vmctl describe KIND [NAME]`.

use std::collections::HashMap;
use std::process::ExitCode;

use vmctl_api::{Object, ObjectRef};

use super::events::{AggregatedNote, NoteIn, aggregate};
use super::{Globals, age, kind_arg, name_arg, table};
use crate::output::print;

/// How many (aggregated) notes a description shows, the most recent.
const EVENTS_SHOWN: usize = 20;

/// What separates the descriptions of several objects: two empty lines,
/// as `kubectl describe` does.
const SEPARATOR: &str = "\n\n";

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
            let mut conds: Vec<vmctl_api::Condition> = st
                .get("conditions")
                .and_then(|c| serde_json::from_value(c.clone()).ok())
                .unwrap_or_default();
            // Ready first, then by type: the same order every time.
            conds.sort_by(|a, b| {
                (a.type_ != "Ready", &a.type_).cmp(&(b.type_ != "Ready", &b.type_))
            });
            if !conds.is_empty() {
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
    if notes.is_empty() {
        s.push_str("Events:           <none>\n");
    } else {
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
    s
}

/// Describes one object, or with no `name` every object of `kind` (by
/// name, separated as `kubectl describe` separates them).
pub fn run(g: &Globals, kind: &str, name: Option<&str>) -> miette::Result<ExitCode> {
    let kind = kind_arg(kind)?;
    if let Some(name) = name {
        name_arg(name)?;
    }
    let client = g.client()?;
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
                render(o, &aggregate(notes))
            })
            .collect();
        print(&text.join(SEPARATOR))?;
        return Ok(ExitCode::SUCCESS);
    };
    let o = super::objects::get_object(&client, kind, name)?;
    let notes = client.notes(Some(&ObjectRef::new(kind, name)))?;
    print(&render(&o, &aggregate(notes)))?;
    Ok(ExitCode::SUCCESS)
}
