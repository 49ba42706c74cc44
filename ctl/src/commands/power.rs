//! The manual's imperative VM commands, as thin layers over apply: `start`,
//! `stop`, `suspend`, `resume` change `spec.powerState` (recorded in the
//! log like any spec change); `destroy` deletes; `list` and `status` read.

use std::process::ExitCode;
use std::time::Duration;

use vmctl_api::{Kind, Object, ObjectRef, PowerState, VirtualMachine};

use super::{Globals, name_arg, table};
use crate::cli::Output;
use crate::client::{Awaited, Client};
use crate::output::print;

fn get_vm(client: &Client, name: &str) -> miette::Result<Object> {
    super::objects::get_object(client, Kind::VirtualMachine, name)
}

/// Sets `powerState` (and the stop's grace period, if given) through apply,
/// keeping the object's apply source.
pub(crate) fn set_power(
    client: &Client,
    name: &str,
    want: PowerState,
    verb: &str,
    stop_timeout_seconds: Option<u32>,
) -> miette::Result<u64> {
    let r = super::objects::edit_spec(client, Kind::VirtualMachine, name, verb, |spec| {
        spec["powerState"] = serde_json::to_value(want).expect("serialises");
        if let Some(secs) = stop_timeout_seconds {
            spec["stopTimeoutSeconds"] = secs.into();
        }
    })?;
    Ok(r.generation)
}

/// What a wait for a VM's phase sees in its current state.
enum PhaseCheck {
    /// It reports the phase for the generation (or a later one).
    Reached,
    /// It failed, or was deleted; the error says so.
    Failed(miette::Report),
}

/// The phase of `o` (`Pending` without a status) and the generation its
/// status observed.
fn phase_of(o: &Object) -> (String, u64) {
    let st = o.status.clone().unwrap_or_default();
    (
        st["phase"].as_str().unwrap_or("Pending").to_owned(),
        st["observedGeneration"].as_u64().unwrap_or(0),
    )
}

/// Waits (watching) until the VM reports `phase` for generation
/// `generation` or later; prints each phase it passes through.
pub(crate) fn wait_phase(
    client: &Client,
    name: &str,
    generation: u64,
    phase: &str,
    timeout: Duration,
) -> miette::Result<()> {
    let r = ObjectRef::new(Kind::VirtualMachine, name);
    let mut last = String::new();
    let check = |states: &crate::client::States| {
        let Some(o) = states.get(&r).cloned().flatten() else {
            return Some(PhaseCheck::Failed(crate::diag::not_found(
                Kind::VirtualMachine,
                name,
            )));
        };
        let (now, observed) = phase_of(&o);
        if observed >= generation && now == phase {
            return Some(PhaseCheck::Reached);
        }
        if now != last {
            eprintln!("  vm/{name}: {now}");
            last = now.clone();
        }
        if observed >= generation && (now == "Failed" || now == "CrashLoopBackOff") {
            let st = o.status.clone().unwrap_or_default();
            let reason = st["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                .map(|c| {
                    format!(
                        "{}: {}",
                        c["reason"].as_str().unwrap_or(""),
                        c["message"].as_str().unwrap_or("")
                    )
                })
                .unwrap_or_default();
            return Some(PhaseCheck::Failed(miette::miette!(
                code = "vmctl::vm::invalid_state",
                help = format!("run `vmctl describe vm {name}`"),
                "VM {name} is {now}: {reason}"
            )));
        }
        None
    };
    match client.await_condition(std::slice::from_ref(&r), check, Some(timeout))? {
        Awaited::Done(PhaseCheck::Reached) => Ok(()),
        Awaited::Done(PhaseCheck::Failed(e)) => Err(e),
        Awaited::TimedOut(states) => {
            let now = states
                .get(&r)
                .cloned()
                .flatten()
                .map_or_else(|| "gone".to_owned(), |o| phase_of(&o).0);
            Err(miette::miette!(
                code = "vmctl::vm::timeout",
                help = format!("run `vmctl describe vm {name}`"),
                "VM {name} did not reach {phase} in {}s (it is {now})",
                timeout.as_secs()
            ))
        }
    }
}

/// `vmctl start|stop|suspend|resume NAME`.
///
/// `grace` (stop only) is the guest's grace period in seconds, written to
/// `spec.stopTimeoutSeconds` only when given (`vmctl stop --timeout S`):
/// otherwise the VM keeps its own (its file's `stop-timeout`, default 30 s).
/// `wait` bounds the wait for the phase; `None` for a stop means the VM's
/// grace period plus 60 s (the agent forces the stop after the grace).
pub fn power(
    g: &Globals,
    name: &str,
    want: PowerState,
    verb: &str,
    grace: Option<u32>,
    wait: Option<Duration>,
) -> miette::Result<ExitCode> {
    name_arg(name)?;
    let client = g.client()?;
    let phase = match want {
        PowerState::Running => "Running",
        PowerState::Stopped => "Stopped",
        PowerState::Suspended => "Suspended",
    };
    let grace = grace.filter(|_| want == PowerState::Stopped);
    let generation = set_power(&client, name, want, verb, grace)?;
    let wait = match wait {
        Some(w) => w,
        None => {
            let secs = match grace {
                Some(s) => s,
                None => stop_timeout_of(&get_vm(&client, name)?),
            };
            Duration::from_secs(u64::from(secs) + 60)
        }
    };
    wait_phase(&client, name, generation, phase, wait)?;
    println!("vm/{name} {}", phase.to_lowercase());
    Ok(ExitCode::SUCCESS)
}

/// The VM's grace period for a stop, in seconds: `spec.stopTimeoutSeconds`,
/// 30 when unset (the agent's default).
fn stop_timeout_of(vm: &Object) -> u32 {
    vm.spec["stopTimeoutSeconds"]
        .as_u64()
        .and_then(|s| u32::try_from(s).ok())
        .unwrap_or(30)
}

/// `vmctl destroy NAME`: deletes the VM (and its Provision); the finalizer
/// stops it and removes its work directory.
pub fn destroy(g: &Globals, name: &str, timeout: Duration) -> miette::Result<ExitCode> {
    name_arg(name)?;
    let client = g.client()?;
    get_vm(&client, name)?;
    for kind in [Kind::Provision, Kind::VirtualMachine] {
        match client.delete(kind, name) {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    if !super::objects::wait_gone(&client, Kind::VirtualMachine, name, timeout)? {
        return Err(miette::miette!(
            code = "vmctl::vm::timeout",
            help = format!("run `vmctl describe vm {name}`"),
            "VM {name} still exists after {}s",
            timeout.as_secs()
        ));
    }
    println!("vm/{name} destroyed");
    Ok(ExitCode::SUCCESS)
}

/// The VM's network as `status` shows it: `user`, `tap:BRIDGE`,
/// `vnic:NAME` or `none`.
pub(super) fn network(vm: &VirtualMachine) -> String {
    match &vm.spec.network {
        vmctl_api::Network::User => "user".into(),
        vmctl_api::Network::Tap { bridge } => format!("tap:{bridge}"),
        vmctl_api::Network::Vnic { name } => format!("vnic:{name}"),
        vmctl_api::Network::None => "none".into(),
    }
}

/// The networking mode alone, as the manual's `list` shows it.
fn network_mode(vm: &VirtualMachine) -> &'static str {
    match &vm.spec.network {
        vmctl_api::Network::User => "user",
        vmctl_api::Network::Tap { .. } => "tap",
        vmctl_api::Network::Vnic { .. } => "vnic",
        vmctl_api::Network::None => "none",
    }
}

/// `vmctl list`: the manual's columns (MEM in MiB, NETWORK the mode), then
/// PORTS, STATE and NODE (`status.nodeName`, `<none>` before the VM was
/// placed), last so that the manual's columns keep their places.
pub fn list(g: &Globals, output: Output) -> miette::Result<ExitCode> {
    let client = g.client()?;
    let vms = client.list(Some(Kind::VirtualMachine), &[])?;
    if output != Output::Text {
        let text = if output == Output::Json {
            format!(
                "{}\n",
                serde_json::to_string_pretty(&vms.items).expect("serialises")
            )
        } else {
            serde_yaml::to_string(&vms.items).expect("serialises")
        };
        return print(&text).map(|()| ExitCode::SUCCESS);
    }
    let mut rows = vec![
        [
            "NAME", "BACKEND", "VCPUS", "MEM", "NETWORK", "PID", "SSH", "PORTS", "STATE", "NODE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for o in &vms.items {
        let Ok(vm) = VirtualMachine::from_object(o) else {
            continue;
        };
        let st = vm.status.clone().unwrap_or_default();
        let rt = st.runtime.clone().unwrap_or_default();
        rows.push(vec![
            vm.metadata.name.clone(),
            if rt.backend.is_empty() {
                "-".into()
            } else {
                rt.backend.clone()
            },
            vm.spec.vcpus.to_string(),
            vm.spec.memory_mib.to_string(),
            network_mode(&vm).into(),
            rt.pid.map_or("-".into(), |p| p.to_string()),
            rt.ssh_port.map_or("-".into(), |p| p.to_string()),
            super::get::ports_cell(&vm),
            super::get::phase(o),
            super::get::node_cell(&vm),
        ]);
    }
    print(&table(&rows))?;
    Ok(ExitCode::SUCCESS)
}

/// `vmctl status NAME`: every field the manual lists.
pub fn status(g: &Globals, name: &str, output: Output) -> miette::Result<ExitCode> {
    name_arg(name)?;
    let client = g.client()?;
    let o = get_vm(&client, name)?;
    let vm = VirtualMachine::from_object(&o)
        .map_err(|e| miette::miette!("unexpected VM object: {e}"))?;
    let st = vm.status.clone().unwrap_or_default();
    let rt = st.runtime.clone().unwrap_or_default();
    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let fields: Vec<(&str, String)> = vec![
        ("name", vm.metadata.name.clone()),
        ("id", dash(vm.metadata.uid.clone())),
        (
            "backend",
            if rt.backend.is_empty() {
                "-".into()
            } else {
                rt.backend.clone()
            },
        ),
        ("state", format!("{:?}", st.phase)),
        ("vcpus", vm.spec.vcpus.to_string()),
        ("memory", format!("{} MiB", vm.spec.memory_mib)),
        (
            "disk",
            vm.spec
                .disk_gib
                .map_or("base image size".into(), |d| format!("{d} GiB")),
        ),
        ("network", network(&vm)),
        ("work dir", dash(rt.work_dir.clone())),
        ("overlay", dash(rt.overlay.clone())),
        ("seed iso", dash(rt.seed_iso.clone())),
        ("pid", dash(rt.pid.map(|p| p.to_string()))),
        ("vnc", dash(rt.vnc.clone())),
        ("ssh port", dash(rt.ssh_port.map(|p| p.to_string()))),
        ("ports", super::get::ports_cell(&vm)),
        ("mac", dash(rt.mac.clone())),
    ];
    match output {
        Output::Json | Output::Yaml => {
            let map: serde_json::Map<String, serde_json::Value> = fields
                .iter()
                .map(|(k, v)| (k.replace(' ', "_"), serde_json::Value::String(v.clone())))
                .collect();
            let text = if output == Output::Json {
                format!(
                    "{}\n",
                    serde_json::to_string_pretty(&map).expect("serialises")
                )
            } else {
                serde_yaml::to_string(&map).expect("serialises")
            };
            print(&text)?;
        }
        Output::Text => {
            let text: String = fields
                .iter()
                .map(|(k, v)| format!("{:<10} {v}\n", format!("{k}:")))
                .collect();
            print(&text)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
