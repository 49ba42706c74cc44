//! `vmctl diff -f FILE`: live objects against a file.

use std::process::ExitCode;

use vmctl_api::{Object, Resource};

use super::Globals;
use crate::output::print;

/// The parts of an object a file controls.
fn desired_view(o: &Object) -> serde_yaml::Value {
    let mut labels = o.metadata.labels.clone();
    labels.retain(|_, _| true);
    serde_yaml::to_value(serde_json::json!({
        "metadata": {"labels": labels, "annotations": o.metadata.annotations},
        "spec": o.spec,
    }))
    .unwrap_or_default()
}

/// Prints a unified diff per object that differs; exit 1 when any does.
pub fn run(g: &Globals, file: &std::path::Path) -> miette::Result<ExitCode> {
    let loaded = match super::load_or_report(file)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let client = g.client()?;
    let mut out = String::new();
    for r in &loaded.resources {
        let want = Resource::to_object(r);
        let live = client.get_opt(want.kind, &want.metadata.name)?;
        let new = serde_yaml::to_string(&desired_view(&want)).unwrap_or_default();
        let old = live
            .as_ref()
            .map(|o| serde_yaml::to_string(&desired_view(o)).unwrap_or_default())
            .unwrap_or_default();
        if old == new {
            continue;
        }
        let name = want.object_ref().to_string();
        let diff = similar::TextDiff::from_lines(&old, &new);
        out.push_str(
            &diff
                .unified_diff()
                .context_radius(3)
                .header(&format!("live/{name}"), &format!("file/{name}"))
                .to_string(),
        );
    }
    if out.is_empty() {
        eprintln!("no differences");
        return Ok(ExitCode::SUCCESS);
    }
    print(&out)?;
    Ok(ExitCode::FAILURE)
}
