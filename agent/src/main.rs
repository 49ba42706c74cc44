//! The `vmctl-agent` program: the agent in the foreground until SIGTERM or
//! SIGINT. Users run it as `vmctl agent` (which parses the same flags and
//! execs this program next to it), or `vmctl` starts it by itself.
//!
//! Exit codes: 0 after a signal; [`vmctl_agent_args::EXIT_AGENT_LOCKED`]
//! when another agent holds the data directory; 1 on any other error,
//! printed as a diagnostic with its code and help.

use std::process::ExitCode;

use clap::Parser;
use vmctl_agent::{AgentConfig, AgentError, AgentOverrides, PropolisSettings};
use vmctl_agent_args::{AgentArgs, AgentPaths, EXIT_AGENT_LOCKED};
use vmctl_api::diag::error_help as error;
use vmctl_api::paths::{absolute, check_socket_path, default_data_dir, default_socket};

/// vmctl-agent: the vmctl agent (store, controllers, HTTP API on a Unix
/// socket), in the foreground. Usually run as `vmctl agent`.
#[derive(Debug, Parser)]
#[command(name = "vmctl-agent", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    paths: AgentPaths,
    #[command(flatten)]
    agent: AgentArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vmctl_api::diag::set_report_hook();
    match run(cli) {
        Ok(code) => code,
        Err(report) => {
            eprintln!("{report:?}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> miette::Result<ExitCode> {
    let path_error = |e: vmctl_api::paths::PathError| {
        error("vmctl::cli::usage", e.help(), vmctl_api::error_chain(&e))
    };
    let data_dir =
        absolute(&cli.paths.data_dir.unwrap_or_else(default_data_dir)).map_err(path_error)?;
    let socket = match cli.paths.socket {
        Some(s) => absolute(&s).map_err(path_error)?,
        None => default_socket(&data_dir),
    };
    check_socket_path(&socket).map_err(path_error)?;
    let AgentArgs {
        driver,
        store,
        etcd_endpoints,
        etcd_prefix,
        propolis,
        socket_group,
        node_name,
        node_labels,
        node_lease_ttl,
        fence,
        dnsmasq_leases,
        door,
    } = cli.agent;
    // Flags and environment (merged by clap) win over <data-dir>/agent.toml.
    let given = AgentOverrides {
        driver,
        store,
        etcd_endpoints: (!etcd_endpoints.is_empty()).then_some(etcd_endpoints),
        etcd_prefix,
        node_name,
        node_labels: (!node_labels.is_empty()).then_some(node_labels),
        node_lease_ttl,
        fence: fence.then_some(true),
        dnsmasq_leases: (!dnsmasq_leases.is_empty()).then_some(dnsmasq_leases),
        listen: door.listen,
        tls_dir: door.tls_dir,
        propolis: PropolisSettings {
            host: propolis.host,
            addr: propolis.addr,
            pool: propolis.pool,
            brand: propolis.brand,
            zone_root: propolis.zone_root,
            vnic_link: propolis.vnic_link,
            start_timeout: propolis.start_timeout,
        },
    };
    let mut cfg = AgentConfig::resolve(data_dir, given)
        .map_err(|e| error("vmctl::agent::config", e.help(), vmctl_api::error_chain(&e)))?;
    cfg.socket = socket;
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
            if let AgentError::Locked(_) = e {
                // A distinct exit code: `vmctl` then waits for the winner.
                eprintln!("{:?}", error("vmctl::agent::locked", e.help(), msg));
                return Ok(ExitCode::from(EXIT_AGENT_LOCKED));
            }
            let code = match e {
                AgentError::Driver(_) | AgentError::Propolis(_) => "vmctl::backend::not_available",
                AgentError::Door(vmctl_agent::door::DoorError::Files { .. }) => "vmctl::tls::files",
                _ => "vmctl::agent::failed",
            };
            Err(error(code, e.help(), msg))
        }
    }
}
