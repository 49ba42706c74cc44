//! `vmctl describe KIND NAME`.

use std::process::ExitCode;

use vmctl_api::Object;

use super::{Globals, age, kind_arg, name_arg, table};
use crate::output::print;

/// A note as the API returns it.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NoteIn {
    pub seq: u64,
    pub time: vmctl_api::Time,
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
    pub message: String,
    pub object: vmctl_api::ObjectRef,
}

/// Renders the description of an object and its notes.
pub(crate) fn render(o: &Object, notes: &[NoteIn]) -> String {
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
            let mut rest = st.clone();
            if let Some(obj) = rest.as_object_mut() {
                obj.remove("phase");
                obj.remove("conditions");
                obj.remove("observedGeneration");
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
        for n in notes.iter().rev().take(20).rev() {
            rows.push(vec![
                format!("  {}", n.type_),
                n.reason.clone(),
                age(Some(n.time)),
                n.message.clone(),
            ]);
        }
        s.push_str(&table(&rows));
    }
    s
}

/// Describes one object.
pub fn run(g: &Globals, kind: &str, name: &str) -> miette::Result<ExitCode> {
    let kind = kind_arg(kind)?;
    name_arg(name)?;
    let client = g.client()?;
    let o = super::objects::get_object(&client, kind, name)?;
    let notes: Vec<NoteIn> = client.call(
        "GET",
        &format!("/v1/notes/{}/{name}", kind.short()),
        None::<&()>,
    )?;
    print(&render(&o, &notes))?;
    Ok(ExitCode::SUCCESS)
}
