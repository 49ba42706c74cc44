//! `vmctl provision [NAME]`: re-run provisioning, recorded as a spec change.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use vmctl_api::{Kind, ObjectRef};

use super::{Globals, name_arg};

/// The VMs to provision: the one named, or those of the VMFile (filtered by `--name`).
fn targets(name: Option<&str>, file: &Path, filter: Option<&str>) -> miette::Result<Vec<String>> {
    if let Some(n) = name {
        name_arg(n)?;
        return Ok(vec![n.to_owned()]);
    }
    let loaded = super::load_vmfile(file)?;
    let names: Vec<String> = loaded
        .vm_names
        .into_iter()
        .filter(|n| filter.is_none_or(|f| f == n))
        .collect();
    if names.is_empty() {
        return Err(miette::miette!(
            code = "vmctl::vm::not_found",
            help = "check --name against the VMs of the file",
            "no matching VM in {}",
            file.display()
        ));
    }
    Ok(names)
}

/// Bumps each Provision's run token and waits until it has run again.
pub fn run(
    g: &Globals,
    name: Option<&str>,
    file: &Path,
    filter: Option<&str>,
    timeout: Duration,
) -> miette::Result<ExitCode> {
    let names = targets(name, file, filter)?;
    let client = g.client()?;
    let mut refs = Vec::new();
    for n in &names {
        let token = format!(
            "{}",
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
        );
        super::objects::get_object(&client, Kind::VirtualMachine, n)?;
        let r = super::objects::edit_spec(&client, Kind::Provision, n, "provision", |spec| {
            spec["runToken"] = serde_json::Value::String(token);
        })?;
        println!(
            "{} re-run requested (generation {})",
            r.object, r.generation
        );
        refs.push(r.object);
    }
    let refs: Vec<ObjectRef> = refs;
    super::wait::wait_ready(&client, &refs, timeout)
}
