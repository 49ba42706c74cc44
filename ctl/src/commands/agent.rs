//! `vmctl agent`: run the agent in the foreground.
//!
//! The agent is its own program, `vmctl-agent`, next to `vmctl`
//! ([`crate::client::agent_program`]); `vmctl` parses the same flags
//! ([`vmctl_agent_args::AgentArgs`]), so `vmctl agent --help` explains them,
//! then replaces itself with that program: its exit code, signals and
//! output are the agent's own.

use std::os::unix::process::CommandExt as _;
use std::process::ExitCode;

use super::Globals;

/// Execs `vmctl-agent` with the resolved data directory and socket and the
/// given flags. Returns only on failure.
///
/// Errors: `vmctl::agent::not_installed` naming the path looked at when the
/// program is missing; `vmctl::agent::failed` when it cannot be executed.
pub fn run(g: &Globals, args: &vmctl_agent_args::AgentArgs) -> miette::Result<ExitCode> {
    let socket = g.checked_socket()?;
    let program = crate::client::agent_program()?;
    let err = std::process::Command::new(&program)
        .arg("--data-dir")
        .arg(&g.data_dir)
        .arg("--socket")
        .arg(socket)
        .args(args.to_args())
        .exec();
    Err(crate::diag::error(
        "vmctl::agent::failed",
        format!("cannot run the agent program {}: {err}", program.display()),
    ))
}
