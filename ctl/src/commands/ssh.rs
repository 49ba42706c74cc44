//! `vmctl ssh [NAME] [-- CMD…]` and `vmctl exec NAME -- CMD…`.

use std::path::PathBuf;
use std::process::ExitCode;

use vmctl_api::VirtualMachine;
use vmctl_controllers::drivers::SshTarget;

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

/// The SSH target of a running VM, with optional user/key overrides.
fn target(
    g: &Globals,
    name: &str,
    user: Option<&str>,
    key: Option<&PathBuf>,
) -> miette::Result<SshTarget> {
    let client = g.client()?;
    let obj = super::objects::get_object(&client, vmctl_api::Kind::VirtualMachine, name)?;
    let vm = VirtualMachine::from_object(&obj)
        .map_err(|e| miette::miette!("unexpected VM object: {e}"))?;
    let runtime = vm
        .status
        .and_then(|s| s.runtime)
        .filter(|r| r.ssh_port.is_some() && r.work_dir.is_some());
    let Some(runtime) = runtime else {
        return Err(miette::miette!(
            code = "vmctl::vm::invalid_state",
            help = format!("start it and wait: `vmctl get vm {name} -w`"),
            "VM {name} is not running"
        ));
    };
    let mut ssh = vm.spec.ssh.unwrap_or_default();
    if ssh.user.is_empty() {
        ssh.user = vmctl_api::default_ssh_user();
    }
    if let Some(u) = user {
        ssh.user = u.to_owned();
    }
    if let Some(k) = key {
        ssh.private_key = Some(
            std::path::absolute(k)
                .unwrap_or_else(|_| k.clone())
                .display()
                .to_string(),
        );
    }
    Ok(SshTarget {
        vm: name.to_owned(),
        runtime,
        ssh: Some(ssh),
    })
}

/// Hands off to the system `ssh` with the pinned host key.
pub fn ssh(
    g: &Globals,
    name: Option<&str>,
    user: Option<&str>,
    key: Option<&PathBuf>,
    cmd: &[String],
) -> miette::Result<ExitCode> {
    let name = resolve_name(name)?;
    super::ready::wait_ssh_ready(g, &name)?;
    let t = target(g, &name, user, key)?;
    let known = vmctl_controllers::drivers::ssh::write_known_hosts(&t).map_err(|e| {
        crate::diag::error(
            "vmctl::ssh::failed",
            format!("cannot pin the host key: {e}"),
        )
    })?;
    let work = PathBuf::from(t.runtime.work_dir.clone().unwrap_or_default());
    let ssh_cfg = t.ssh.clone().unwrap_or_default();
    let key = ssh_cfg
        .private_key
        .map(PathBuf::from)
        .unwrap_or_else(|| work.join("id_ed25519"));
    let mut c = std::process::Command::new("ssh");
    c.arg("-i")
        .arg(&key)
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg("-p")
        .arg(t.runtime.ssh_port.unwrap_or(22).to_string())
        .arg(format!(
            "{}@{}",
            ssh_cfg.user,
            t.runtime
                .ssh_host
                .clone()
                .unwrap_or_else(|| "127.0.0.1".into())
        ));
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
    Ok(ExitCode::from(
        status.code().unwrap_or(255).clamp(0, 255) as u8
    ))
}

/// Runs a command without a terminal over libssh2 and returns its exit code.
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
    let t = target(g, name, None, None)?;
    let command = cmd
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| miette::miette!("{e}"))?;
    let out = |line: &str| println!("{line}");
    let code = rt
        .block_on(vmctl_controllers::drivers::ssh::exec(&t, &command, &out))
        .map_err(|e| crate::diag::error("vmctl::ssh::failed", e))?;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
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

/// `vmctl cp LOCAL NAME:REMOTE` or `vmctl cp NAME:REMOTE LOCAL` over SFTP.
pub fn cp(g: &Globals, src: &str, dst: &str) -> miette::Result<ExitCode> {
    // A VM side is `name:/path`; a local path containing ':' must be written `./a:b`.
    fn remote(s: &str) -> Option<(&str, &str)> {
        let (n, p) = s.split_once(':')?;
        (vmctl_api::names::check_name(n).is_ok() && !n.is_empty()).then_some((n, p))
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| miette::miette!("{e}"))?;
    let fail = |e: vmctl_controllers::drivers::ssh::SshError| {
        miette::miette!(
            code = e.code(),
            help = e.help().unwrap_or("check the paths"),
            "{}",
            vmctl_controllers::drivers::ssh::error_chain(&e)
        )
    };
    match (remote(src), remote(dst)) {
        (None, Some((name, path))) => {
            super::ready::wait_ssh_ready(g, name)?;
            let t = target(g, name, None, None)?;
            let n = rt
                .block_on(vmctl_controllers::drivers::ssh::copy_to(
                    &t,
                    std::path::Path::new(src),
                    path,
                ))
                .map_err(fail)?;
            eprintln!("copied {n} bytes to {name}:{path}");
        }
        (Some((name, path)), None) => {
            super::ready::wait_ssh_ready(g, name)?;
            let t = target(g, name, None, None)?;
            let n = rt
                .block_on(vmctl_controllers::drivers::ssh::copy_from(
                    &t,
                    path,
                    std::path::Path::new(dst),
                ))
                .map_err(fail)?;
            eprintln!("copied {n} bytes from {name}:{path}");
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
