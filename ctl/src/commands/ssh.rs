//! `vmctl ssh [NAME] [-- CMD…]`, `vmctl exec NAME -- CMD…`, `vmctl cp`
//! and the hidden `vmctl tunnel NAME`: all through the agent's API (the
//! CLI reads nothing of a VM's work directory and speaks no SSH itself).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use vmctl_api::limits::count;
use vmctl_api::streams::{ExecEvent, SshAccess};

use super::{Globals, name_arg};

/// Picks the VM: the given name, or the only VM of VMFile.kdl in the
/// current directory.
fn resolve_name(name: Option<&str>) -> miette::Result<String> {
    if let Some(n) = name {
        name_arg(n)?;
        return Ok(n.to_owned());
    }
    let loaded = super::load_vmfile(std::path::Path::new(vmctl_api::load::VMFILE_NAME))?;
    match loaded.vm_names.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(miette::miette!(
            code = "vmctl::vm::not_found",
            help = "name the VM: `vmctl ssh NAME`",
            "VMFile.kdl defines no VMs"
        )),
        many => Err(miette::miette!(
            code = "vmctl::cli::ambiguous_vm",
            help = format!("name one of them: {}", many.join(", ")),
            "VMFile.kdl defines {} VMs ({}); name one",
            many.len(),
            many.join(", ")
        )),
    }
}

/// Hands off to the system `ssh`, which reaches the guest through the
/// agent (`ProxyCommand` = `vmctl tunnel NAME`) with the host key pinned
/// and the key the agent hands out, both in a private temporary
/// directory removed when `ssh` ends.
pub fn ssh(
    g: &Globals,
    name: Option<&str>,
    user: Option<&str>,
    key: Option<&PathBuf>,
    cmd: &[String],
) -> miette::Result<ExitCode> {
    let name = resolve_name(name)?;
    super::ready::wait_ssh_ready(g, &name)?;
    let client = g.client()?;
    let access = client.ssh_access(&name)?;
    let files = SshFiles::write(&name, &access, key)?;
    let user = user.map_or(access.user.clone(), str::to_owned);
    // The host name is only the alias the pinned key is filed under: the
    // ProxyCommand (`vmctl tunnel NAME`) is the only way to the guest.
    let mut c = std::process::Command::new("ssh");
    c.args(ssh_args(g, &name, &files)?)
        .arg("-l")
        .arg(&user)
        .arg(host_alias(&name));
    if !cmd.is_empty() {
        c.arg("--").args(cmd);
    }
    let status = c.status().map_err(|e| {
        miette::miette!(
            code = "vmctl::ssh::failed",
            help = "install openssh-client",
            "cannot run ssh: {e}"
        )
    })?;
    files.remove();
    Ok(ExitCode::from(
        status.code().unwrap_or(255).clamp(0, 255) as u8
    ))
}

/// The name `ssh` knows the VM by: its host key is pinned under it, and
/// it never resolves (the tunnel is the only way there).
fn host_alias(name: &str) -> String {
    format!("vmctl-{name}")
}

/// The private key and `known_hosts` file of one `vmctl ssh`, in a
/// directory only this user can read (removed when dropped).
struct SshFiles {
    dir: tempfile::TempDir,
    key: PathBuf,
    known_hosts: PathBuf,
}

impl SshFiles {
    /// Removes the key and the known_hosts file (also done when dropped).
    fn remove(self) {
        let _ = self.dir.close();
    }

    fn write(name: &str, access: &SshAccess, key: Option<&PathBuf>) -> miette::Result<Self> {
        let fail = |what: &str, e: std::io::Error| {
            crate::diag::error(
                "vmctl::ssh::failed",
                format!("cannot write the {what}: {e}"),
            )
        };
        // tempfile creates the directory 0700 and files 0600 whatever the umask.
        let dir = tempfile::Builder::new()
            .prefix("vmctl-ssh-")
            .tempdir()
            .map_err(|e| fail("temporary directory", e))?;
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!("{} {}\n", host_alias(name), access.host_key.trim()),
        )
        .map_err(|e| fail("known_hosts file", e))?;
        let key = match (key, &access.private_key, &access.private_key_path) {
            (Some(k), _, _) => std::path::absolute(k).unwrap_or_else(|_| k.clone()),
            (None, Some(pem), _) => {
                let path = dir.path().join("id_ed25519");
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| fail("private key", e))?;
                f.write_all(pem.as_bytes())
                    .map_err(|e| fail("private key", e))?;
                path
            }
            (None, None, Some(p)) => {
                // The VM's ssh block names a key of its own: a path on the
                // agent's host, which is this one when it is the user's.
                let home = std::env::var_os("HOME").map(PathBuf::from);
                match (p.strip_prefix("~/"), home) {
                    (Some(rest), Some(home)) => home.join(rest),
                    _ => PathBuf::from(p),
                }
            }
            (None, None, None) => {
                return Err(crate::diag::error_help(
                    "vmctl::ssh::failed",
                    "pass --key PATH",
                    format!("the agent has no key for VM {name}"),
                ));
            }
        };
        Ok(SshFiles {
            dir,
            key,
            known_hosts,
        })
    }
}

/// `ssh` options for a session through the agent: the tunnel as
/// `ProxyCommand`, only the pinned host key, only the given key, and no
/// connection sharing (a user's `ControlMaster` could otherwise send the
/// command over a shared connection to another machine).
fn ssh_args(g: &Globals, name: &str, files: &SshFiles) -> miette::Result<Vec<String>> {
    let exe = std::env::current_exe().map_err(|e| {
        crate::diag::error("vmctl::ssh::failed", format!("cannot find this vmctl: {e}"))
    })?;
    let mut proxy = vec![exe.display().to_string()];
    match g.selection()? {
        // The tunnel goes through the same remote agent, with the same
        // certificates (resolved: the proxy needs no contexts file).
        crate::contexts::Selection::Remote(r) => proxy.extend([
            "--server".into(),
            r.server.clone(),
            "--certificate-authority".into(),
            r.identity.ca.display().to_string(),
            "--client-certificate".into(),
            r.identity.cert.display().to_string(),
            "--client-key".into(),
            r.identity.key.display().to_string(),
        ]),
        crate::contexts::Selection::Local => proxy.extend([
            "--data-dir".into(),
            g.data_dir.display().to_string(),
            "--socket".into(),
            g.socket.display().to_string(),
            "--no-autostart".into(),
        ]),
    }
    match g.request_timeout {
        crate::client::RequestTimeout::Default => {}
        crate::client::RequestTimeout::Limit(d) => {
            proxy.extend([
                "--request-timeout".into(),
                humantime::format_duration(d).to_string(),
            ]);
        }
        crate::client::RequestTimeout::Unlimited => {
            proxy.extend(["--request-timeout".into(), "0".into()]);
        }
    }
    proxy.extend(["tunnel".into(), name.to_owned()]);
    let proxy = proxy
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
        // ssh expands %-tokens in ProxyCommand.
        .replace('%', "%%");
    Ok(vec![
        "-F".into(),
        "none".into(),
        "-i".into(),
        files.key.display().to_string(),
        "-o".into(),
        format!("ProxyCommand={proxy}"),
        "-o".into(),
        format!("UserKnownHostsFile={}", files.known_hosts.display()),
        "-o".into(),
        "GlobalKnownHostsFile=none".into(),
        "-o".into(),
        format!("HostKeyAlias={}", host_alias(name)),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        "ControlMaster=no".into(),
        "-o".into(),
        "ControlPath=none".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
    ])
}

/// `vmctl tunnel NAME` (hidden; ssh's ProxyCommand): copies stdin to the
/// guest's SSH port through the agent, and what comes back to stdout.
///
/// stdin and stdout are used as plain files: Rust's `Stdout` is
/// line-buffered, and binary SSH packets without a newline would wait in
/// its buffer while ssh waits for them. Both directions go through
/// [`relay`](crate::client::streams::relay), never `std::io::copy` (see
/// there).
pub fn tunnel(g: &Globals, name: &str) -> miette::Result<ExitCode> {
    use std::os::fd::AsFd;
    name_arg(name)?;
    let io_err = |e: std::io::Error| crate::diag::error("vmctl::agent::io", e);
    let stdin = std::fs::File::from(
        std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(io_err)?,
    );
    let mut stdout = std::fs::File::from(
        std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .map_err(io_err)?,
    );
    let client = g.client()?;
    let up = client.tunnel(name)?;
    let to_guest = up.stream.try_clone().map_err(io_err)?;
    let from_guest = up.stream;
    // Ends when ssh closes our stdin (then the guest sees end of input, as
    // with `nc -N`); the process may exit before.
    std::thread::spawn(move || {
        let _ = crate::client::streams::relay(stdin, &to_guest);
        let _ = to_guest.shutdown(std::net::Shutdown::Write);
    });
    let _ = stdout
        .write_all(&up.early)
        .and_then(|()| crate::client::streams::relay(from_guest, stdout).map(|_| ()));
    Ok(ExitCode::SUCCESS)
}

/// Runs a command without a terminal on the guest, through the agent:
/// its stdout and stderr to ours, its exit code as ours.
pub fn exec(g: &Globals, name: &str, cmd: &[String]) -> miette::Result<ExitCode> {
    name_arg(name)?;
    if cmd.is_empty() {
        return Err(miette::miette!(
            code = "vmctl::cli::usage",
            help = "write `vmctl exec NAME -- command args`",
            "no command given"
        ));
    }
    super::ready::wait_ssh_ready(g, name)?;
    let client = g.client()?;
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let last = client.exec(name, cmd, |ev| match ev {
        ExecEvent::Stdout { data } => out.write_all(data.as_bytes()).and_then(|()| out.flush()),
        ExecEvent::Stderr { data } => err.write_all(data.as_bytes()).and_then(|()| err.flush()),
        _ => Ok(()),
    });
    match last {
        Ok(Some(ExecEvent::Exit { code })) => Ok(ExitCode::from(code.clamp(0, 255) as u8)),
        Ok(Some(ExecEvent::Error { error })) => Err(crate::diag::error_help(
            "vmctl::ssh::failed",
            error.help.unwrap_or_else(|| "see the agent log".into()),
            error.message,
        )),
        Ok(_) => Err(crate::diag::error(
            "vmctl::agent::io",
            "the agent ended the command's output without its exit code",
        )),
        // stdout closed (`vmctl exec … | head`): quietly, as a broken pipe should.
        Err(crate::client::ClientError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// `vmctl cp LOCAL NAME:REMOTE` or `vmctl cp NAME:REMOTE LOCAL`, through
/// the agent (SFTP on its side); the file's mode is kept both ways.
pub fn cp(g: &Globals, src: &str, dst: &str) -> miette::Result<ExitCode> {
    // A VM side is `name:/path`; a local path containing ':' must be written `./a:b`.
    fn remote(s: &str) -> Option<(&str, &str)> {
        let (n, p) = s.split_once(':')?;
        (vmctl_api::names::check_name(n).is_ok() && !n.is_empty()).then_some((n, p))
    }
    match (remote(src), remote(dst)) {
        (None, Some((name, path))) => {
            let local = Path::new(src);
            // Regular files within the copy limit only: a FIFO or device
            // would never end.
            let data = vmctl_api::localfile::read(local, vmctl_api::limits::FileUse::Upload)
                .map_err(|e| {
                    crate::diag::error_help(
                        "vmctl::cli::usage",
                        "give a readable regular file",
                        vmctl_api::error_chain(&e),
                    )
                })?;
            let mode = std::fs::metadata(local)
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o644);
            super::ready::wait_ssh_ready(g, name)?;
            let client = g.client()?;
            let w = client.put_file(name, path, data, mode)?;
            eprintln!(
                "copied {} to {name}:{} (mode {:04o})",
                count(w.bytes, "byte", "bytes"),
                w.path,
                w.mode
            );
        }
        (Some((name, path)), None) => {
            super::ready::wait_ssh_ready(g, name)?;
            let client = g.client()?;
            let f = client.get_file(name, path)?;
            write_local(Path::new(dst), &f.data, f.mode)?;
            eprintln!(
                "copied {} from {name}:{path} (mode {:04o})",
                count(f.data.len() as u64, "byte", "bytes"),
                f.mode
            );
        }
        _ => {
            return Err(miette::miette!(
                code = "vmctl::cli::usage",
                help = "write `vmctl cp LOCAL NAME:/path` or `vmctl cp NAME:/path LOCAL`",
                "exactly one side of cp must be a VM path (NAME:/path)"
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `data` to `path` with exactly `mode`: whole or not at all (a
/// temporary file beside it, then renamed over it).
fn write_local(path: &Path, data: &[u8], mode: u32) -> miette::Result<()> {
    let fail = |e: std::io::Error| {
        crate::diag::error_help(
            "vmctl::cli::usage",
            "check that the directory exists and is writable",
            format!("cannot write {}: {e}", path.display()),
        )
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(fail)?;
    tmp.write_all(data).map_err(fail)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(fail)?;
    tmp.as_file().sync_all().map_err(fail)?;
    tmp.persist(path).map_err(|e| fail(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cp_from_a_vm_keeps_the_mode_and_replaces_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "old").unwrap();
        write_local(&p, b"new", 0o751).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o751
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn ssh_never_shares_a_connection_and_trusts_only_the_pinned_key() {
        let g = Globals {
            data_dir: "/d/100%".into(),
            socket: "/run/a b/agent.sock".into(),
            autostart: true,
            request_timeout: crate::client::RequestTimeout::Limit(std::time::Duration::from_secs(
                90,
            )),
            remote: crate::cli::RemoteArgs::default(),
            local_paths: true,
        };
        let access = SshAccess {
            user: "vm".into(),
            host_key: "ssh-ed25519 AAAA test".into(),
            private_key: Some("KEY".into()),
            private_key_path: None,
        };
        let files = SshFiles::write("web", &access, None).unwrap();
        let args = ssh_args(&g, "web", &files).unwrap().join(" ");
        for want in [
            "ControlMaster=no",
            "ControlPath=none",
            "StrictHostKeyChecking=yes",
            "HostKeyAlias=vmctl-web",
            "--no-autostart --request-timeout '1m 30s' tunnel web",
            "'/run/a b/agent.sock'",
            "--data-dir /d/100%% ",
        ] {
            assert!(args.contains(want), "{want} in {args}");
        }
        assert_eq!(
            std::fs::read_to_string(&files.known_hosts).unwrap(),
            "vmctl-web ssh-ed25519 AAAA test\n"
        );
        let meta = std::fs::metadata(&files.key).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let dir = files.dir.path().to_owned();
        drop(files);
        assert!(!dir.exists(), "the key does not outlive the session");
    }
}
