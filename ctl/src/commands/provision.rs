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
    if let Some(f) = filter
        && !loaded.vm_names.iter().any(|n| n == f)
    {
        return Err(crate::diag::error_help(
            "vmctl::vm::not_found",
            format!("VMs in {}: {}", file.display(), loaded.vm_names.join(", ")),
            format!("no VM named {f} in {}", file.display()),
        ));
    }
    // Only VMs with provision blocks have something to re-run.
    let names: Vec<String> = loaded
        .vm_names
        .iter()
        .filter(|n| filter.is_none_or(|f| f == n.as_str()))
        .filter(|n| {
            loaded
                .resources
                .iter()
                .any(|r| matches!(r, vmctl_api::Resource::Provision(p) if &p.spec.vm == *n))
        })
        .cloned()
        .collect();
    if names.is_empty() {
        return Err(crate::diag::error_help(
            "vmctl::provision::not_found",
            "add provision blocks to the VM in the VMFile and run `vmctl up`",
            format!(
                "{} has no provisioners in {}",
                filter.map_or("no VM".to_owned(), |f| format!("VM {f}")),
                file.display()
            ),
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
    // Every target is checked before any is changed.
    for n in &names {
        let vm = super::objects::get_object(&client, Kind::VirtualMachine, n)?;
        super::objects::get_object(&client, Kind::Provision, n)?;
        // Provisioners run on a running VM only; waiting would time out.
        let power = vm.spec["powerState"].as_str().unwrap_or("Running");
        if power != "Running" {
            return Err(crate::diag::error_help(
                "vmctl::vm::invalid_state",
                format!("start it first: `vmctl start {n}`"),
                format!("VM {n} is {power}; provisioning needs it running"),
            ));
        }
    }
    let mut refs = Vec::new();
    for n in &names {
        let token = format!(
            "{}",
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
        );
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
