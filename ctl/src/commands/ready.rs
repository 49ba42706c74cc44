//! Waiting until a VM answers SSH, before `vmctl ssh`, `exec` and `cp`
//! connect: the agent's `SshReady` condition, watched, with one line on
//! stderr saying what is awaited. Without it a connect right after `up`
//! hangs silently while QEMU's user networking retries the guest side.

use std::time::Duration;

use vmctl_api::{ConditionStatus, Kind, ObjectRef, PowerState, VirtualMachine, VmPhase};

use super::Globals;
use crate::client::{Awaited, States};

/// How long to wait when the VM's spec sets no SSH timeout (as the agent).
const DEFAULT_SSH_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether waiting for `vm` is over: its `SshReady` condition is True, or
/// waiting cannot help (not meant to run, Failed, running without an SSH
/// address: the caller reports those).
fn settled(vm: &VirtualMachine) -> bool {
    let Some(st) = &vm.status else {
        return vm.spec.power_state != PowerState::Running;
    };
    let ssh = st.conditions.iter().find(|c| c.type_ == "SshReady");
    if ssh.is_some_and(|c| c.status == ConditionStatus::True) {
        return true;
    }
    if vm.spec.power_state != PowerState::Running || st.phase == VmPhase::Failed {
        return true;
    }
    // Running and up to date, yet never probed: no SSH address to probe.
    st.phase == VmPhase::Running
        && st.observed_generation >= vm.metadata.generation
        && ssh.is_none()
}

/// Whether `vm` is on a `tap` network whose guest address the agent has
/// not found (its `AddressReady` condition is False).
fn unaddressed(vm: &VirtualMachine) -> bool {
    vm.status.as_ref().is_some_and(|st| {
        st.conditions
            .iter()
            .any(|c| c.type_ == "AddressReady" && c.status != ConditionStatus::True)
    })
}

/// Why the VM is not ready, from its `Ready` condition, for messages.
fn why(vm: &VirtualMachine) -> String {
    let Some(st) = &vm.status else {
        return "Pending".into();
    };
    match st.conditions.iter().find(|c| c.type_ == "Ready") {
        Some(c) if !c.message.is_empty() => format!("{:?}: {}", st.phase, c.message),
        Some(c) => format!("{:?} ({})", st.phase, c.reason),
        None => format!("{:?}", st.phase),
    }
}

/// Refuses, with what to do, a VM whose guest cannot answer SSH now
/// however long one waits: suspended (its guest is paused: a connection
/// would hang until it is resumed), stopped or asked to stop, failed, or
/// running without an SSH address (`network "none"`). Found as: `vmctl
/// ssh` on a suspended VM hung silently for good, and `exec` failed after
/// 30 s with a handshake timeout.
///
/// Errors: `vmctl::vm::invalid_state` (suspended, stopped),
/// `vmctl::vm::failed`, `vmctl::ssh::no_address`.
fn cannot_answer(vm: &VirtualMachine) -> miette::Result<()> {
    let name = &vm.metadata.name;
    let phase = vm.status.as_ref().map(|s| s.phase);
    if vm.spec.power_state == PowerState::Suspended || phase == Some(VmPhase::Suspended) {
        return Err(miette::miette!(
            code = "vmctl::vm::invalid_state",
            help = format!("resume it first: `vmctl resume {name}`"),
            "vm/{name} is suspended: its guest is paused and cannot answer SSH"
        ));
    }
    if vm.spec.power_state == PowerState::Stopped {
        return Err(miette::miette!(
            code = "vmctl::vm::invalid_state",
            help = format!("start it first: `vmctl start {name}`"),
            "vm/{name} is stopped (its powerState is Stopped)"
        ));
    }
    if phase == Some(VmPhase::Failed) {
        return Err(miette::miette!(
            code = "vmctl::vm::failed",
            help = format!("see why: `vmctl describe vm {name}`"),
            "vm/{name} failed ({})",
            why(vm)
        ));
    }
    if vm.spec.network == vmctl_api::Network::None {
        let network = super::power::network(vm);
        return Err(miette::miette!(
            code = "vmctl::ssh::no_address",
            help = "give it a network with SSH (`network \"user\"`, the default, or `network \"tap\"`) and apply again; `vmctl console NAME` reaches it meanwhile",
            "vm/{name} has no SSH address: its network is \"{network}\""
        ));
    }
    Ok(())
}

/// Waits (watching) until VM `name` answers SSH, at most its SSH timeout
/// (`ssh { timeout … }`, default 120 s). Returns at once, printing
/// nothing, when it already does or waiting cannot help; otherwise prints
/// one line to stderr (`waiting for vm/web to answer SSH …`).
///
/// Errors: the VM does not exist (`vmctl::vm::not_found`), cannot answer
/// SSH now (see [`cannot_answer`]), SSH did not answer in time
/// (`vmctl::ssh::not_ready`, with the VM's last state), or the agent
/// failed.
pub(crate) fn wait_ssh_ready(g: &Globals, name: &str) -> miette::Result<()> {
    let client = g.client()?;
    let r = ObjectRef::new(Kind::VirtualMachine, name);
    let decode = |o: &vmctl_api::Object| {
        VirtualMachine::from_object(o).map_err(|e| miette::miette!("unexpected VM object: {e}"))
    };
    let vm = decode(&super::objects::get_object(
        &client,
        Kind::VirtualMachine,
        name,
    )?)?;
    cannot_answer(&vm)?;
    if settled(&vm) {
        return Ok(());
    }
    let timeout = vm
        .spec
        .ssh
        .as_ref()
        .and_then(|s| s.timeout_seconds)
        .map_or(DEFAULT_SSH_TIMEOUT, |s| Duration::from_secs(s.into()));
    eprintln!(
        "waiting for vm/{name} to answer SSH (at most {} s; now {})",
        timeout.as_secs(),
        why(&vm)
    );
    let mut last = vm;
    let check = |s: &States| -> Option<Result<(), ()>> {
        let Some(o) = s.get(&r).and_then(Option::as_ref) else {
            return Some(Err(()));
        };
        let vm = decode(o).ok()?;
        let done = settled(&vm);
        last = vm;
        done.then_some(Ok(()))
    };
    match client.await_condition(std::slice::from_ref(&r), check, Some(timeout))? {
        Awaited::Done(Ok(())) => cannot_answer(&last),
        Awaited::Done(Err(())) => Err(crate::diag::not_found(Kind::VirtualMachine, name)),
        Awaited::TimedOut(_) if unaddressed(&last) => Err(miette::miette!(
            code = "vmctl::network::ip_discovery_timeout",
            help = format!(
                "verify that the VM's bridge exists and has DHCP; check `ip neigh show dev BRIDGE` for the VM's MAC (`vmctl get vm {name} -o yaml`: status.runtime.mac); ensure the guest has obtained a DHCP lease (`vmctl log {name} --console`)"
            ),
            "vm/{name} has no IP address after {} s ({})",
            timeout.as_secs(),
            why(&last)
        )),
        Awaited::TimedOut(_) => Err(miette::miette!(
            code = "vmctl::ssh::not_ready",
            help = format!(
                "check the guest's console (`vmctl log {name} --console`) and `vmctl describe vm {name}`; raise `ssh {{ timeout … }}` if it boots slowly"
            ),
            "vm/{name} did not answer SSH within {} s ({})",
            timeout.as_secs(),
            why(&last)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_with(conditions: serde_json::Value) -> VirtualMachine {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "vmctl/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": { "name": "tapvm" },
            "spec": { "image": "a" },
            "status": { "phase": "Running", "conditions": conditions },
        }))
        .unwrap()
    }

    /// A `vmctl ssh` that gives up on a tap VM without an address says
    /// `vmctl::network::ip_discovery_timeout`, not that SSH did not answer.
    #[test]
    fn a_vm_whose_address_is_not_found_is_told_apart() {
        let cond = |status: &str, reason: &str| {
            serde_json::json!([{ "type": "AddressReady", "status": status, "reason": reason,
                "message": "", "lastTransitionTime": null, "observedGeneration": 1 }])
        };
        assert!(unaddressed(&vm_with(cond("False", "IPDiscoveryTimeout"))));
        assert!(unaddressed(&vm_with(cond("False", "WaitingForAddress"))));
        assert!(!unaddressed(&vm_with(cond("True", "AddressFound"))));
        assert!(!unaddressed(&vm_with(serde_json::json!([]))));
    }
}
