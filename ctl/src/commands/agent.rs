//! `vmctl agent`: run the agent in the foreground.

use std::process::ExitCode;

use super::Globals;

/// Runs the agent until SIGTERM/SIGINT.
pub fn run(
    g: &Globals,
    driver: String,
    store: crate::cli::StoreKind,
    etcd_endpoints: Vec<String>,
    etcd_prefix: String,
) -> miette::Result<ExitCode> {
    let store = match store {
        crate::cli::StoreKind::Sled => vmctl_agent::StoreConfig::Sled,
        crate::cli::StoreKind::Etcd => {
            let endpoints: Vec<String> = etcd_endpoints
                .into_iter()
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty())
                .collect();
            if endpoints.is_empty() {
                return Err(crate::diag::error_help(
                    "vmctl::agent::failed",
                    "pass --etcd-endpoints http://HOST:2379[,…] or set VMCTL_ETCD_ENDPOINTS",
                    "--store etcd needs the etcd endpoints",
                ));
            }
            vmctl_agent::StoreConfig::Etcd {
                endpoints,
                prefix: etcd_prefix,
            }
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut cfg = vmctl_agent::AgentConfig::new(g.data_dir.clone());
    cfg.socket = g.checked_socket()?.to_owned();
    cfg.driver = driver;
    cfg.store = store;
    let rt = tokio::runtime::Runtime::new()
        .map_err(|e| miette::miette!("cannot start the runtime: {e}"))?;
    match rt.block_on(vmctl_agent::run(cfg)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            let msg = vmctl_api::error_chain(&e);
            if let vmctl_agent::AgentError::Locked(_) = e {
                // A distinct exit code: `connect` then waits for the winner.
                eprintln!(
                    "{:?}",
                    crate::diag::error_help("vmctl::agent::locked", e.help(), msg)
                );
                return Ok(ExitCode::from(crate::client::EXIT_AGENT_LOCKED));
            }
            let code = match e {
                vmctl_agent::AgentError::Driver(_) | vmctl_agent::AgentError::Propolis(_) => {
                    "vmctl::backend::not_available"
                }
                _ => "vmctl::agent::failed",
            };
            Err(crate::diag::error_help(code, e.help(), msg))
        }
    }
}
