//! The VMFile workflow of the manual (`up`, `down`, `reload`) and
//! `create`, all as thin layers over apply / delete.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use vmctl_api::load::Loaded;
use vmctl_api::{
    CloudInit, Image, ImageSource, ImageSpec, Kind, LocalFile, Network, PowerState, Resource,
    VirtualMachine, VirtualMachineSpec,
};

use super::{Globals, name_arg};
use crate::client::Client;

/// Loads the VMFile and keeps the VM named `only` (with its Image and
/// Provision), or everything.
fn load_filtered(
    file: &Path,
    only: Option<&str>,
    provision: bool,
) -> miette::Result<(Loaded, Vec<String>)> {
    let mut loaded = super::load_vmfile(file)?;
    let names: Vec<String> = loaded
        .vm_names
        .iter()
        .filter(|n| only.is_none_or(|o| o == n.as_str()))
        .cloned()
        .collect();
    if let Some(o) = only
        && names.is_empty()
    {
        return Err(miette::miette!(
            code = "vmctl::vm::not_found",
            help = format!("VMs in {}: {}", file.display(), loaded.vm_names.join(", ")),
            "no VM named {o} in {}",
            file.display()
        ));
    }
    let images: Vec<String> = loaded
        .resources
        .iter()
        .filter_map(|r| match r {
            Resource::VirtualMachine(vm) if names.contains(&vm.metadata.name) => {
                Some(vm.spec.image.clone())
            }
            _ => None,
        })
        .collect();
    loaded.resources.retain(|r| match r {
        Resource::VirtualMachine(vm) => names.contains(&vm.metadata.name),
        Resource::Image(i) => images.contains(&i.metadata.name),
        Resource::Provision(p) => provision && names.contains(&p.spec.vm),
        Resource::Snapshot(s) => names.contains(&s.spec.vm),
        // Never loaded: a file with a Node is refused.
        Resource::Node(_) => false,
    });
    Ok((loaded, names))
}

fn apply_and_wait(
    client: &Client,
    resources: &[Resource],
    file: Option<&Path>,
    verb: &str,
    timeout: Duration,
) -> miette::Result<ExitCode> {
    let req = super::objects::apply_request(
        resources.iter().map(Resource::to_object).collect(),
        file,
        verb,
        false,
        false,
    );
    let resp = super::objects::apply(client, &req)?;
    for r in &resp.results {
        eprintln!("{} {}", r.object, super::apply::outcome_word(r.outcome));
    }
    let refs: Vec<_> = resp.results.iter().map(|r| r.object.clone()).collect();
    super::wait::wait_ready(client, &refs, timeout)
}

/// `vmctl up`: apply the VMFile and wait until booted and provisioned.
pub fn up(
    g: &Globals,
    file: &Path,
    only: Option<&str>,
    no_provision: bool,
    timeout: Duration,
) -> miette::Result<ExitCode> {
    let (loaded, _) = load_filtered(file, only, !no_provision)?;
    let client = g.client()?;
    super::check_backend(&client, &loaded, file)?;
    apply_and_wait(&client, &loaded.resources, Some(file), "up", timeout)
}

/// `vmctl down`: stop the VMFile's VMs, or delete them with `--destroy`.
pub fn down(
    g: &Globals,
    file: &Path,
    only: Option<&str>,
    destroy: bool,
    timeout: Duration,
) -> miette::Result<ExitCode> {
    let (_, names) = load_filtered(file, only, false)?;
    for n in &names {
        if destroy {
            super::power::destroy(g, n, timeout)?;
        } else {
            // The VM's own grace period (its file's `stop-timeout`), never
            // this command's wait written into its spec (found by the
            // new-user tryout: `down` set stopTimeoutSeconds to 300).
            super::power::power(g, n, PowerState::Stopped, "down", None, Some(timeout))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `vmctl reload`: destroy and recreate the VMFile's VMs (a new disk and a
/// new cloud-init instance), then provision them again.
pub fn reload(
    g: &Globals,
    file: &Path,
    only: Option<&str>,
    no_provision: bool,
    timeout: Duration,
) -> miette::Result<ExitCode> {
    let (loaded, names) = load_filtered(file, only, !no_provision)?;
    let client = g.client()?;
    // Before anything is destroyed.
    super::check_backend(&client, &loaded, file)?;
    for n in &names {
        if super::objects::exists(&client, Kind::VirtualMachine, n)? {
            super::power::destroy(g, n, timeout)?;
        }
    }
    apply_and_wait(&client, &loaded.resources, Some(file), "reload", timeout)
}

/// Flags of `vmctl create`.
#[derive(Debug, Clone)]
pub struct CreateArgs {
    /// VM name.
    pub name: String,
    /// Local image.
    pub image: Option<PathBuf>,
    /// Image URL.
    pub image_url: Option<String>,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory: u64,
    /// Disk in GiB.
    pub disk: Option<u64>,
    /// TAP bridge.
    pub bridge: Option<String>,
    /// Port forwards (`--port`).
    pub ports: Vec<vmctl_api::PortForward>,
    /// Raw user-data file.
    pub cloud_init: Option<PathBuf>,
    /// Public key file.
    pub ssh_key: Option<PathBuf>,
    /// Start it.
    pub start: bool,
    /// How long to wait with --start.
    pub timeout: Duration,
}

fn local_file(p: &Path) -> miette::Result<LocalFile> {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let digest = vmctl_api::vmfile::digest(&abs).map_err(|e| {
        miette::miette!(
            code = "vmctl::io",
            help = "check the path",
            "cannot read {}: {e}",
            abs.display()
        )
    })?;
    Ok(LocalFile {
        path: abs.display().to_string(),
        digest: Some(digest),
    })
}

/// `vmctl create`: a VirtualMachine (+ Image) applied like any other;
/// Stopped unless `--start`. An existing name is an error, not an overwrite.
pub fn create(g: &Globals, a: CreateArgs) -> miette::Result<ExitCode> {
    name_arg(&a.name)?;
    let source = match (&a.image, &a.image_url) {
        (Some(p), None) => ImageSource::Path {
            path: std::path::absolute(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string(),
        },
        (None, Some(u)) => ImageSource::Url { url: u.clone() },
        _ => {
            return Err(miette::miette!(
                code = "vmctl::vmfile::validation",
                help = "give exactly one of --image PATH or --image-url URL",
                "a VM needs exactly one image source"
            ));
        }
    };
    let image = Image::new(
        vmctl_api::names::image_name(&source),
        ImageSpec {
            source,
            checksum: None,
        },
    );
    let cloud_init = if a.cloud_init.is_some() || a.ssh_key.is_some() {
        Some(CloudInit {
            hostname: Some(a.name.clone()),
            ssh_key: a.ssh_key.as_deref().map(local_file).transpose()?,
            user_data: a.cloud_init.as_deref().map(local_file).transpose()?,
        })
    } else {
        Some(CloudInit {
            hostname: Some(a.name.clone()),
            ssh_key: None,
            user_data: None,
        })
    };
    let spec = VirtualMachineSpec {
        image: image.metadata.name.clone(),
        vcpus: a.vcpus,
        memory_mib: a.memory,
        disk_gib: a.disk,
        network: a
            .bridge
            .clone()
            .map_or(Network::User, |bridge| Network::Tap { bridge }),
        cloud_init,
        ssh: None,
        power_state: if a.start {
            PowerState::Running
        } else {
            PowerState::Stopped
        },
        update_policy: Default::default(),
        stop_timeout_seconds: None,
        disks: Vec::new(),
        port_forwards: a.ports.clone(),
        display: Default::default(),
        readiness_probes: Vec::new(),
        shares: Vec::new(),
        node_selector: Default::default(),
        node_name: None,
        evict_after_seconds: None,
    };
    let vm = VirtualMachine::new(a.name.clone(), spec);
    let resources = vec![Resource::Image(image), Resource::VirtualMachine(vm)];
    for r in &resources {
        let (errs, warnings): (Vec<_>, Vec<_>) = vmctl_api::validate::validate(r)
            .into_iter()
            .partition(|e| e.severity == vmctl_api::validate::Severity::Error);
        for w in warnings {
            let help = w.help.map(|h| format!(" ({h})")).unwrap_or_default();
            eprintln!("warning: {}{help}", w.message);
        }
        if let Some(first) = errs.first() {
            let message = errs
                .iter()
                .map(|e| e.message.clone())
                .collect::<Vec<_>>()
                .join("; ");
            return Err(match &first.help {
                Some(h) => crate::diag::error_help("vmctl::vmfile::validation", h, message),
                None => crate::diag::error("vmctl::vmfile::validation", message),
            });
        }
    }
    let client = g.client()?;
    if super::objects::exists(&client, Kind::VirtualMachine, &a.name)? {
        return Err(miette::miette!(
            code = "vmctl::vm::exists",
            help = format!("pick another name, or `vmctl destroy {}` first", a.name),
            "VM {} already exists",
            a.name
        ));
    }
    if a.start {
        return apply_and_wait(&client, &resources, None, "create", a.timeout);
    }
    let req = super::objects::apply_request(
        resources.iter().map(Resource::to_object).collect(),
        None,
        "create",
        false,
        false,
    );
    super::objects::apply(&client, &req)?;
    println!(
        "vm/{} created (stopped; `vmctl start {}` boots it)",
        a.name, a.name
    );
    Ok(ExitCode::SUCCESS)
}
