//! `vmctl cluster`: the cluster CA and the certificates of agents and
//! users, for mutual TLS between hosts ([`vmctl_tls`]).
//!
//! ```text
//!  DIR/ca.crt  DIR/ca.key (0600)                  cluster init
//!  DIR/agents/NAME/{ca.crt,agent.crt,agent.key}   cluster issue agent NAME --address …
//!  DIR/users/NAME/{ca.crt,user.crt,user.key}      cluster issue user NAME (and init's first user)
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use vmctl_tls::issue::{Ca, IssueError, Issued, create_dir, write_private, write_public};
use vmctl_tls::{AGENT_CERT, AGENT_KEY, CA_CERT, CA_KEY, USER_CERT, USER_KEY};

use super::Globals;
use crate::contexts::{Context, ContextsFile};

/// The cluster directory: `--dir`, else `$XDG_CONFIG_HOME/vmctl/cluster`,
/// made absolute (contexts name files in it).
fn cluster_dir(dir: Option<PathBuf>) -> miette::Result<PathBuf> {
    let dir = dir.unwrap_or_else(|| crate::contexts::config_dir().join("cluster"));
    std::path::absolute(&dir)
        .map_err(|e| crate::diag::error("vmctl::cli::usage", format!("{}: {e}", dir.display())))
}

/// An [`IssueError`] as a diagnostic.
fn issue_error(e: IssueError) -> miette::Report {
    match &e {
        IssueError::Exists { .. } => crate::diag::error_help(
            "vmctl::cluster::exists",
            "pass --force to replace it, or use another name or --dir",
            vmctl_api::error_chain(&e),
        ),
        IssueError::Address(_) => crate::diag::error_help(
            "vmctl::cli::usage",
            "give the IP addresses or DNS names clients connect to, without a port: \
             --address 127.0.0.2 --address host-b.example",
            vmctl_api::error_chain(&e),
        ),
        _ => crate::diag::error("vmctl::cluster::failed", vmctl_api::error_chain(&e)),
    }
}

/// Checks a user's or agent's name: it names a directory and a
/// certificate's common name.
fn check_name(what: &str, name: &str) -> miette::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        return Ok(());
    }
    Err(crate::diag::error_help(
        "vmctl::cli::usage",
        "use letters, digits, '-', '_', '.' and '@' (at most 64, not starting with '.' or '-')",
        format!("`{name}` cannot be {what}'s name"),
    ))
}

/// The CA of `dir`.
fn load_ca(dir: &Path) -> miette::Result<Ca> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f));
    match (read(CA_CERT), read(CA_KEY)) {
        (Ok(cert), Ok(key)) => Ca::load(&cert, &key).map_err(issue_error),
        (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(crate::diag::error_help(
                "vmctl::cluster::no_ca",
                format!(
                    "run `vmctl cluster init --dir {}` first, or pass the --dir that has {CA_CERT} and {CA_KEY}",
                    dir.display()
                ),
                format!("{} has no cluster CA", dir.display()),
            ))
        }
        (Err(e), _) | (_, Err(e)) => Err(crate::diag::error(
            "vmctl::cluster::failed",
            format!("cannot read the cluster CA in {}: {e}", dir.display()),
        )),
    }
}

/// Writes a certificate, its key and the CA's certificate into `dir`.
fn write_bundle(
    dir: &Path,
    ca: &Ca,
    issued: &Issued,
    (cert, key): (&str, &str),
    force: bool,
) -> miette::Result<()> {
    create_dir(dir).map_err(issue_error)?;
    // The key first: a bundle that exists is refused before anything changes.
    write_private(&dir.join(key), &issued.key_pem, force).map_err(issue_error)?;
    write_public(&dir.join(cert), &issued.cert_pem, true).map_err(issue_error)?;
    write_public(&dir.join(CA_CERT), ca.cert_pem(), true).map_err(issue_error)?;
    Ok(())
}

/// `vmctl cluster init`.
///
/// Errors: `vmctl::cluster::exists` when DIR has a CA and `force` is not
/// given; `vmctl::cluster::failed` when a file cannot be written.
pub fn init(
    g: &Globals,
    dir: Option<PathBuf>,
    force: bool,
    user: &str,
    context_name: Option<&str>,
) -> miette::Result<ExitCode> {
    check_name("a user", user)?;
    let dir = cluster_dir(dir)?;
    let context = context_for(g, user, context_name)?;
    if !force
        && let Some(f) = [CA_KEY, CA_CERT]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.symlink_metadata().is_ok())
    {
        return Err(crate::diag::error_help(
            "vmctl::cluster::exists",
            "pass --force to replace it (every certificate the old CA issued then stops \
             working), or use another --dir",
            format!(
                "{} already has a cluster CA ({})",
                dir.display(),
                f.display()
            ),
        ));
    }
    create_dir(&dir).map_err(issue_error)?;
    let ca = Ca::generate().map_err(issue_error)?;
    write_private(&dir.join(CA_KEY), &ca.key_pem(), force).map_err(issue_error)?;
    write_public(&dir.join(CA_CERT), ca.cert_pem(), force).map_err(issue_error)?;
    let mut out = format!(
        "created the cluster CA in {} ({CA_CERT}; its key {CA_KEY} stays there)\n",
        dir.display()
    );
    out.push_str(&issue_user_into(g, &dir, &ca, user, force, context)?);
    crate::output::print(&out)?;
    eprintln!(
        "next: `vmctl cluster issue agent NAME --address IP --dir {0}`, then start that agent \
         with `--listen IP:PORT --tls-dir {0}/agents/NAME`",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `vmctl cluster issue agent`.
///
/// Errors: `vmctl::cluster::no_ca` without a CA in DIR,
/// `vmctl::cluster::exists` when the agent has a certificate and `force`
/// is not given, `vmctl::cli::usage` for a bad name or address.
pub fn issue_agent(
    dir: Option<PathBuf>,
    name: &str,
    addresses: &[String],
    force: bool,
) -> miette::Result<ExitCode> {
    check_name("an agent", name)?;
    let dir = cluster_dir(dir)?;
    let ca = load_ca(&dir)?;
    let issued = ca.issue_agent(name, addresses).map_err(issue_error)?;
    let bundle = dir.join("agents").join(name);
    write_bundle(&bundle, &ca, &issued, (AGENT_CERT, AGENT_KEY), force)?;
    crate::output::print(&format!(
        "issued agent {name} for {}: {} ({CA_CERT}, {AGENT_CERT}, {AGENT_KEY})\n",
        addresses.join(", "),
        bundle.display()
    ))?;
    eprintln!(
        "next: copy {} to the agent's host and start it with `--listen {}:PORT --tls-dir DIR`",
        bundle.display(),
        addresses.first().map_or("IP", String::as_str)
    );
    Ok(ExitCode::SUCCESS)
}

/// `vmctl cluster issue user`.
///
/// Errors: as [`issue_agent`]; with `--server`, a contexts file that
/// cannot be read or written.
pub fn issue_user(
    g: &Globals,
    dir: Option<PathBuf>,
    name: &str,
    force: bool,
    context_name: Option<&str>,
) -> miette::Result<ExitCode> {
    check_name("a user", name)?;
    let dir = cluster_dir(dir)?;
    let context = context_for(g, name, context_name)?;
    let ca = load_ca(&dir)?;
    let out = issue_user_into(g, &dir, &ca, name, force, context)?;
    crate::output::print(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// The context to write for user `user` when `--server` is given: its
/// name and server.
fn context_for(
    g: &Globals,
    user: &str,
    name: Option<&str>,
) -> miette::Result<Option<(String, String)>> {
    let Some(server) = &g.remote.server else {
        if let Some(n) = name {
            return Err(crate::diag::error_help(
                "vmctl::cli::usage",
                "add --server https://HOST:PORT (the agent the context talks to)",
                format!("--context-name {n} needs --server"),
            ));
        }
        return Ok(None);
    };
    let (host, _) = crate::contexts::parse_server(server).map_err(super::config::context_error)?;
    let name = name.map_or_else(|| format!("{user}@{host}"), str::to_owned);
    Ok(Some((name, server.clone())))
}

/// Issues user `name`'s certificate into `dir/users/NAME` and, given a
/// context, writes it and makes it current; returns what to print.
fn issue_user_into(
    g: &Globals,
    dir: &Path,
    ca: &Ca,
    name: &str,
    force: bool,
    context: Option<(String, String)>,
) -> miette::Result<String> {
    let issued = ca.issue_user(name).map_err(issue_error)?;
    let bundle = dir.join("users").join(name);
    write_bundle(&bundle, ca, &issued, (USER_CERT, USER_KEY), force)?;
    let mut out = format!(
        "issued user {name}: {} ({CA_CERT}, {USER_CERT}, {USER_KEY})\n",
        bundle.display()
    );
    if let Some((context, server)) = context {
        let path = g.contexts_file();
        let mut file = ContextsFile::load(&path).map_err(super::config::context_error)?;
        file.upsert(Context {
            name: context.clone(),
            server,
            certificate_authority: bundle.join(CA_CERT),
            client_certificate: bundle.join(USER_CERT),
            client_key: bundle.join(USER_KEY),
        });
        file.current_context = Some(context.clone());
        file.save(&path).map_err(super::config::context_error)?;
        out.push_str(&format!(
            "context {context} written to {} (current)\n",
            path.display()
        ));
    }
    Ok(out)
}
