//! `vmctl agent`: run the agent in the foreground.

use std::process::ExitCode;

use super::Globals;

/// Runs the agent until SIGTERM/SIGINT.
pub fn run(g: &Globals, driver: String) -> miette::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut cfg = vmctl_agent::AgentConfig::new(g.data_dir.clone());
    cfg.socket = g.checked_socket()?.to_owned();
    cfg.driver = driver;
    let rt = tokio::runtime::Runtime::new()
        .map_err(|e| miette::miette!("cannot start the runtime: {e}"))?;
    match rt.block_on(vmctl_agent::run(cfg)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            let msg = vmctl_api::error_chain(&e);
            let code = match e {
                vmctl_agent::AgentError::Driver(_) => "vmctl::backend::not_available",
                _ => "vmctl::agent::failed",
            };
            Err(crate::diag::error_help(code, e.help(), msg))
        }
    }
}
