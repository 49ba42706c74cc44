//! `vmctl agent`: run the agent in the foreground.

use std::process::ExitCode;

use super::Globals;

/// Runs the agent until SIGTERM/SIGINT.
pub fn run(
    g: &Globals,
    driver: Option<String>,
    store: Option<crate::cli::StoreKind>,
    etcd_endpoints: Vec<String>,
    etcd_prefix: Option<String>,
    propolis: crate::cli::PropolisArgs,
    socket_group: Option<String>,
) -> miette::Result<ExitCode> {
    // Flags and environment (merged by clap) win over <data-dir>/agent.toml.
    let given = vmctl_agent::AgentOverrides {
        driver,
        store: store.map(|s| match s {
            crate::cli::StoreKind::Sled => vmctl_agent::StoreKind::Sled,
            crate::cli::StoreKind::Etcd => vmctl_agent::StoreKind::Etcd,
        }),
        etcd_endpoints: (!etcd_endpoints.is_empty()).then_some(etcd_endpoints),
        etcd_prefix,
        propolis: vmctl_agent::PropolisSettings {
            host: propolis.host,
            addr: propolis.addr,
            pool: propolis.pool,
            brand: propolis.brand,
            zone_root: propolis.zone_root,
            vnic_link: propolis.vnic_link,
            start_timeout: propolis.start_timeout,
        },
    };
    let mut cfg = vmctl_agent::AgentConfig::resolve(g.data_dir.clone(), given).map_err(|e| {
        crate::diag::error_help("vmctl::agent::config", e.help(), vmctl_api::error_chain(&e))
    })?;
    cfg.socket = g.checked_socket()?.to_owned();
    cfg.socket_group = socket_group;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
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
