//! Stand-in provisioner for the QEMU driver until SSH provisioning lands:
//! Provisions fail with a reason that says so, instead of hanging.

use std::time::Duration;

use vmctl_api::ProvisionStep;
use vmctl_controllers::drivers::{
    BoxFuture, DriverError, OutputFn, Provisioner, Result, SshTarget, StepOutcome,
};

/// Fails every Provision with a clear reason.
#[derive(Debug)]
pub struct NotYet;

const WHY: &str = "SSH provisioning is not available in this build yet";

impl Provisioner for NotYet {
    fn wait_ssh<'a>(
        &'a self,
        _target: &'a SshTarget,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Err(DriverError::Backend(WHY.into())) })
    }

    fn run_step<'a>(
        &'a self,
        _target: &'a SshTarget,
        _index: u32,
        _step: &'a ProvisionStep,
        _output: OutputFn<'a>,
    ) -> BoxFuture<'a, Result<StepOutcome>> {
        Box::pin(async { Err(DriverError::Backend(WHY.into())) })
    }
}
