//! `vmctl patch KIND NAME --add-finalizer F --remove-finalizer F [--force]`.

use std::process::ExitCode;

use vmctl_api::wire::PatchRequest;

use super::Globals;
use crate::output::print;

/// Changes an object's finalizers through the agent and says what became
/// of the object: its finalizers now, or that it is gone.
pub fn run(g: &Globals, kind: &str, name: &str, patch: &PatchRequest) -> miette::Result<ExitCode> {
    let kind = super::kind_arg(kind)?;
    super::name_arg_of(kind, name)?;
    let client = g.client()?;
    let obj = client.patch(kind, name, patch)?;
    let line = match obj {
        None => format!(
            "{}/{name} deleted (its last finalizer was removed while it was being deleted)\n",
            kind.short()
        ),
        Some(o) if o.metadata.finalizers.is_empty() => {
            format!("{}/{name} patched: no finalizers\n", kind.short())
        }
        Some(o) => format!(
            "{}/{name} patched: finalizers {}\n",
            kind.short(),
            o.metadata.finalizers.join(", ")
        ),
    };
    print(&line)?;
    Ok(ExitCode::SUCCESS)
}
