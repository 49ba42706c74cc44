//! One module per command.

mod agent;
mod apply;
mod cluster;
mod config;
mod console;
mod convert;
mod delete;
mod describe;
mod diff;
mod events;
mod get;
mod history;
mod image;
mod log;
mod objects;
mod patch;
mod power;
mod provision;
mod ready;
mod schema;
mod snapshot;
mod ssh;
mod validate;
mod wait;
mod workflow;

use std::process::ExitCode;

use crate::cli::{Cli, ClusterCommand, Command, IssueCommand};

/// Runs the command.
pub fn dispatch(cli: Cli) -> miette::Result<ExitCode> {
    let g = Globals::new(&cli)?;
    match cli.command {
        Command::Agent(args) => agent::run(&g, &args),
        Command::Apply {
            file,
            dry_run,
            prune,
            output,
            wait,
            timeout,
            watch,
        } => apply::run(
            &g,
            &apply::ApplyArgs {
                file,
                dry_run,
                prune,
                output,
                wait,
                timeout: std::time::Duration::from_secs(timeout),
                watch,
            },
        ),
        Command::Get {
            kind,
            name,
            output,
            selector,
            watch,
        } => get::run(
            &g,
            kind.as_deref(),
            name.as_deref(),
            output,
            &selector,
            watch,
        ),
        Command::Describe { kind, name } => describe::run(&g, &kind, name.as_deref()),
        Command::Delete {
            kind,
            name,
            file,
            wait,
            timeout,
        } => delete::run(
            &g,
            kind.as_deref(),
            name.as_deref(),
            file.as_deref(),
            wait.then(|| std::time::Duration::from_secs(timeout)),
        ),
        Command::Patch {
            kind,
            name,
            add_finalizer,
            remove_finalizer,
            force,
            resource_version,
        } => patch::run(
            &g,
            &kind,
            &name,
            &vmctl_api::wire::PatchRequest {
                add_finalizers: add_finalizer,
                remove_finalizers: remove_finalizer,
                force,
                resource_version,
            },
        ),
        Command::Diff { file } => diff::run(&g, &file),
        Command::History { kind, name, output } => history::run(&g, &kind, &name, output),
        Command::Events { output, watch } => events::run(&g, output, watch),
        Command::Ssh {
            name,
            user,
            key,
            command,
        } => ssh::ssh(&g, name.as_deref(), user.as_deref(), key.as_ref(), &command),
        Command::Exec { name, command } => ssh::exec(&g, &name, &command),
        Command::Cp { src, dst } => ssh::cp(&g, &src, &dst),
        Command::Tunnel { name } => ssh::tunnel(&g, &name),
        Command::Image { command } => image::run(&g, command),
        Command::Snapshot { command } => snapshot::run(&g, command),
        Command::Console { name } => console::run(&g, &name),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "vmctl", &mut out);
            crate::output::print(&String::from_utf8_lossy(&out))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .map_err(|e| miette::miette!("{e}"))?;
            crate::output::print(&String::from_utf8_lossy(&out))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Create {
            name,
            image,
            image_url,
            vcpus,
            memory,
            disk,
            bridge,
            ports,
            cloud_init,
            ssh_key,
            start,
            timeout,
        } => workflow::create(
            &g,
            workflow::CreateArgs {
                name,
                image,
                image_url,
                vcpus,
                memory,
                disk,
                bridge,
                ports,
                cloud_init,
                ssh_key,
                start,
                timeout: secs(timeout),
            },
        ),
        Command::Start { name, timeout } => power::power(
            &g,
            &name,
            vmctl_api::PowerState::Running,
            "start",
            None,
            Some(secs(timeout)),
        ),
        Command::Stop { name, timeout } => power::power(
            &g,
            &name,
            vmctl_api::PowerState::Stopped,
            "stop",
            timeout.map(|t| u32::try_from(t).unwrap_or(u32::MAX)),
            None,
        ),
        Command::Suspend { name, timeout } => power::power(
            &g,
            &name,
            vmctl_api::PowerState::Suspended,
            "suspend",
            None,
            Some(secs(timeout)),
        ),
        Command::Resume { name, timeout } => power::power(
            &g,
            &name,
            vmctl_api::PowerState::Running,
            "resume",
            None,
            Some(secs(timeout)),
        ),
        Command::Destroy { name, timeout } => power::destroy(&g, &name, secs(timeout)),
        Command::List { output } => power::list(&g, output),
        Command::Status { name, output } => power::status(&g, &name, output),
        Command::Up {
            file,
            name,
            no_provision,
            timeout,
        } => workflow::up(&g, &file, name.as_deref(), no_provision, secs(timeout)),
        Command::Down {
            file,
            name,
            destroy,
            timeout,
        } => workflow::down(&g, &file, name.as_deref(), destroy, secs(timeout)),
        Command::Reload {
            file,
            name,
            no_provision,
            timeout,
        } => workflow::reload(&g, &file, name.as_deref(), no_provision, secs(timeout)),
        Command::Provision {
            name,
            file,
            only,
            timeout,
        } => provision::run(
            &g,
            name.as_deref(),
            &file,
            only.as_deref(),
            std::time::Duration::from_secs(timeout),
        ),
        Command::Log {
            name,
            console,
            provision,
            tail,
            follow,
        } => log::run(&g, &name, console, provision, tail, follow),
        Command::Validate { file, output } => validate::run(&file, output),
        Command::Convert { file, output } => convert::run(&file, output),
        Command::Schema { kind } => schema::run(kind.as_deref()),
        Command::Cluster { command } => match command {
            ClusterCommand::Init {
                dir,
                force,
                user,
                context_name,
            } => cluster::init(&g, dir, force, &user, context_name.as_deref()),
            ClusterCommand::Issue {
                command:
                    IssueCommand::Agent {
                        name,
                        addresses,
                        dir,
                        force,
                    },
            } => cluster::issue_agent(dir, &name, &addresses, force),
            ClusterCommand::Issue {
                command:
                    IssueCommand::User {
                        name,
                        dir,
                        force,
                        context_name,
                    },
            } => cluster::issue_user(&g, dir, &name, force, context_name.as_deref()),
        },
        Command::Config { command } => config::run(&g, command),
    }
}

/// Prints accepted files' warnings to stderr.
pub(crate) fn print_warnings(warnings: &[vmctl_api::diag::FileDiagnostics]) {
    for w in warnings {
        eprintln!("{:?}", miette::Report::new(w.clone()));
    }
}

/// Loads resources; on invalid files prints every file's diagnostics and
/// returns the exit code to end with.
pub(crate) fn load_or_report(
    file: &std::path::Path,
) -> miette::Result<Result<vmctl_api::load::Loaded, ExitCode>> {
    report(vmctl_api::load::load(file))
}

/// Loads a file for a command that needs its resources: warnings and every
/// invalid file's diagnostics are printed; an invalid file is then an error
/// with the code of its first problem (`vmctl::vmfile::parse_failed` for a
/// KDL syntax error).
pub(crate) fn load_vmfile(file: &std::path::Path) -> miette::Result<vmctl_api::load::Loaded> {
    match vmctl_api::load::load(file) {
        Ok(l) => {
            print_warnings(&l.warnings);
            Ok(l)
        }
        Err(e @ vmctl_api::load::LoadError::Invalid(_)) => {
            if let vmctl_api::load::LoadError::Invalid(diags) = &e {
                for d in diags {
                    eprintln!("{:?}", miette::Report::new(d.clone()));
                }
            }
            Err(crate::diag::error(
                e.code(),
                format!("{} has errors; nothing was changed", file.display()),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// Prints warnings of a load, or every file's diagnostics when it failed.
pub(crate) fn report(
    result: Result<vmctl_api::load::Loaded, vmctl_api::load::LoadError>,
) -> miette::Result<Result<vmctl_api::load::Loaded, ExitCode>> {
    match result {
        Ok(l) => {
            print_warnings(&l.warnings);
            Ok(Ok(l))
        }
        Err(vmctl_api::load::LoadError::Invalid(diags)) => {
            for d in diags {
                eprintln!("{:?}", miette::Report::new(d));
            }
            Ok(Err(ExitCode::FAILURE))
        }
        Err(e) => Err(e.into()),
    }
}

/// Checks loaded files against the backend of the agent `client` talks to
/// (its driver, from the `/v1/healthz` answer `connect` got): what that backend cannot run (e.g.
/// `network "user"` on Propolis) is shown at its place in its file, and
/// nothing is applied. Drivers that run anything (`fake`) skip the check;
/// the agent's apply checks again for every client.
///
/// # Errors
/// The agent does not answer; or a resource asks for something the backend
/// cannot do (code `vmctl::validate::unsupported_by_backend`, after the
/// located diagnostics are printed).
pub(crate) fn check_backend(
    client: &crate::client::Client,
    loaded: &vmctl_api::load::Loaded,
    file: &std::path::Path,
) -> miette::Result<()> {
    let health = client.connected_health()?;
    let Some(backend) = vmctl_api::validate::Backend::from_driver(&health.driver) else {
        return Ok(());
    };
    match loaded.check_backend(backend) {
        Ok(()) => Ok(()),
        Err(vmctl_api::load::LoadError::Invalid(diags)) => {
            for d in diags {
                eprintln!("{:?}", miette::Report::new(d));
            }
            Err(crate::diag::error_help(
                "vmctl::validate::unsupported_by_backend",
                format!(
                    "the agent runs VMs with --driver {}: change the file, or run an agent with \
                     the driver it is written for",
                    backend.as_str()
                ),
                format!(
                    "{} asks for what the {} backend cannot do; nothing was changed",
                    file.display(),
                    backend.as_str()
                ),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// Settings shared by every command, resolved once.
#[derive(Debug, Clone)]
pub struct Globals {
    /// The data directory.
    pub data_dir: std::path::PathBuf,
    /// The agent socket.
    pub socket: std::path::PathBuf,
    /// Whether to start an agent when none answers.
    pub autostart: bool,
    /// How long one request may take (`--request-timeout`).
    pub request_timeout: crate::client::RequestTimeout,
    /// `--server`, `--context` and the like: a remote agent.
    pub remote: crate::cli::RemoteArgs,
    /// Whether `--socket` or `--data-dir` (or their variables) were given:
    /// the local agent then, unless `--server` or `--context` is.
    pub local_paths: bool,
}

impl Globals {
    /// Paths made absolute once, here: the agent and QEMU run elsewhere.
    fn new(cli: &Cli) -> miette::Result<Self> {
        use vmctl_api::paths::{absolute, default_data_dir, default_socket};
        let data_dir = absolute(&cli.paths.data_dir.clone().unwrap_or_else(default_data_dir))
            .map_err(path_error)?;
        let socket = match &cli.paths.socket {
            Some(s) => absolute(s).map_err(path_error)?,
            None => default_socket(&data_dir),
        };
        Ok(Globals {
            data_dir,
            socket,
            autostart: !cli.no_autostart,
            request_timeout: crate::client::RequestTimeout::from_arg(cli.request_timeout),
            remote: cli.remote.clone(),
            local_paths: cli.paths.data_dir.is_some() || cli.paths.socket.is_some(),
        })
    }

    /// The contexts file: `--contexts`, `VMCTL_CONFIG`, else the default.
    pub fn contexts_file(&self) -> std::path::PathBuf {
        self.remote
            .contexts
            .clone()
            .unwrap_or_else(crate::contexts::default_path)
    }

    /// Which agent commands talk to ([`crate::contexts::Selection::resolve`]).
    pub fn selection(&self) -> miette::Result<crate::contexts::Selection> {
        let r = &self.remote;
        crate::contexts::Selection::resolve(&crate::contexts::Flags {
            file: Some(self.contexts_file()),
            server: r.server.clone(),
            context: r.context.clone(),
            ca: r.certificate_authority.clone(),
            cert: r.client_certificate.clone(),
            key: r.client_key.clone(),
            local_paths: self.local_paths,
        })
        .map_err(config::context_error)
    }

    /// The socket, checked to fit a Unix socket address.
    pub fn checked_socket(&self) -> miette::Result<&std::path::Path> {
        vmctl_api::paths::check_socket_path(&self.socket).map_err(path_error)?;
        Ok(&self.socket)
    }

    /// A client of the agent: a remote one over TLS (never started), else
    /// the local one, started when needed.
    pub fn client(&self) -> miette::Result<crate::client::Client> {
        if let crate::contexts::Selection::Remote(r) = self.selection()? {
            return Ok(crate::client::connect_remote(&r, self.request_timeout)?);
        }
        self.checked_socket()?;
        Ok(crate::client::connect(
            &self.data_dir,
            &self.socket,
            self.autostart,
            self.request_timeout,
        )?)
    }
}

fn path_error(e: vmctl_api::paths::PathError) -> miette::Report {
    crate::diag::error_help("vmctl::cli::usage", e.help(), vmctl_api::error_chain(&e))
}

/// Parses a kind argument.
pub(crate) fn kind_arg(s: &str) -> miette::Result<vmctl_api::Kind> {
    vmctl_api::Kind::parse(s).ok_or_else(|| {
        miette::miette!(
            code = "vmctl::cli::unknown_kind",
            help = "kinds are vm, image, provision, snapshot and node",
            "unknown kind `{s}`"
        )
    })
}

/// Checks the name argument of an object of `kind`: a node name (a DNS
/// subdomain, which may have dots) for a Node, else as [`name_arg`].
pub(crate) fn name_arg_of(kind: vmctl_api::Kind, s: &str) -> miette::Result<()> {
    if kind != vmctl_api::Kind::Node {
        return name_arg(s);
    }
    vmctl_api::node::check_node_name(s).map_err(|m| {
        miette::miette!(
            code = "vmctl::cli::bad_name",
            help = vmctl_api::node::NODE_NAME_HELP,
            "{m}"
        )
    })
}

/// Checks a name argument before it reaches the agent or a path.
pub(crate) fn name_arg(s: &str) -> miette::Result<()> {
    vmctl_api::names::check_name(s).map_err(|m| {
        miette::miette!(
            code = "vmctl::cli::bad_name",
            help = vmctl_api::names::NAME_HELP,
            "{m}"
        )
    })
}

/// Human age of a timestamp, kubectl style.
pub(crate) fn age(t: Option<vmctl_api::Time>) -> String {
    let Some(t) = t else { return "-".into() };
    let s = (chrono::Utc::now() - t).num_seconds().max(0);
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Renders rows as left-aligned columns separated by three spaces.
pub(crate) fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn secs(s: u64) -> std::time::Duration {
    std::time::Duration::from_secs(s)
}
