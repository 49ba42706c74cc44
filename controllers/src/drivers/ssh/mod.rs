//! The SSH [`Provisioner`]: libssh2 (`ssh2`) sessions to a VM, host key
//! pinned to the one vmctl generated for it.
//!
//! ```text
//!   wait_ssh ── loop { spawn_blocking(connect) ; sleep(backoff) } until deadline
//!   run_step ── spawn_blocking(connect ─▶ step ─▶ lines ──mpsc──▶ output)
//!                                              └─▶ provision.log
//! ```
//!
//! libssh2 is blocking, so every session lives on a `spawn_blocking`
//! thread; output lines cross back to the async side over a bounded
//! channel, which gives the command backpressure and lets the borrowed
//! `output` callback stay on the caller's task. Each operation opens its
//! own session: steps are few and long, a handshake is milliseconds, and a
//! session never outlives a guest reboot half-way.
//!
//! Host keys are never trusted on first use: after the handshake the
//! server's key must equal `<work_dir>/host_ed25519.pub`, the key vmctl
//! generated and handed to cloud-init. A different key, or no pinned key
//! at all, is an error ([`HOST_KEY_MISMATCH`], [`SshError::HostKeyMissing`]).
//!
//! Dropping a future stops its blocking thread at the next output line (a
//! silent remote command runs on until it ends); there is no keepalive,
//! so a guest that vanishes mid-command is noticed only by TCP.

mod connect;
mod error;
mod probe;
pub mod remote;
mod steps;
#[cfg(test)]
mod tests;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;
use vmctl_api::ProvisionStep;

pub use error::{HOST_KEY_MISMATCH, PROVISION_FAILED, SSH_FAILED, SshError};
pub use probe::probe_ssh;

/// An error and all its causes on one line, for the edge that prints it.
pub fn error_chain(e: &SshError) -> String {
    error::chain(e)
}

use super::{BoxFuture, OutputFn, Provisioner, Result, SshTarget, StepOutcome};
use connect::Endpoint;
use steps::Sink;

/// File in a VM's work directory that step output is appended to.
pub const PROVISION_LOG: &str = "provision.log";

/// First pause between connection attempts; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest pause between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Bound on each blocking connect, handshake and authentication.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on connecting for a step, once `wait_ssh` has succeeded.
const STEP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Output lines buffered between the SSH thread and the caller.
const LINE_BUFFER: usize = 1024;

/// The SSH provisioner. Stateless: everything about a VM comes from its
/// [`SshTarget`], so one instance serves every VM.
#[derive(Debug, Clone, Default)]
pub struct SshProvisioner;

impl SshProvisioner {
    /// A provisioner.
    pub fn new() -> Self {
        Self
    }
}

impl Provisioner for SshProvisioner {
    fn wait_ssh<'a>(
        &'a self,
        target: &'a SshTarget,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { Ok(wait_ssh(target, timeout).await?) })
    }

    fn run_step<'a>(
        &'a self,
        target: &'a SshTarget,
        index: u32,
        step: &'a ProvisionStep,
        output: OutputFn<'a>,
    ) -> BoxFuture<'a, Result<StepOutcome>> {
        Box::pin(async move {
            let exit_code = run_step(target, index, step, output).await?;
            Ok(StepOutcome { exit_code })
        })
    }

    fn probe_ssh<'a>(
        &'a self,
        target: &'a SshTarget,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { probe_ssh(target, timeout).await.map_err(error::probe_error) })
    }

    fn run_probe<'a>(
        &'a self,
        target: &'a SshTarget,
        probe: &'a vmctl_api::Probe,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { Ok(probe::run_probe(target, probe, timeout).await?) })
    }
}

/// Waits until `target` accepts an authenticated SSH session with the
/// pinned host key, retrying transport and authentication failures with
/// backoff (250 ms doubling to 2 s) for at most `timeout`. A host key
/// mismatch fails at once.
pub async fn wait_ssh(target: &SshTarget, timeout: Duration) -> Result<(), SshError> {
    let ep = Endpoint::resolve(target)?;
    let start = Instant::now();
    let deadline = start + timeout;
    let mut backoff = FIRST_BACKOFF;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let per_attempt = left.clamp(Duration::from_millis(100), ATTEMPT_TIMEOUT);
        let ep2 = ep.clone();
        let err = match blocking(move || ep2.connect(per_attempt).map(|s| connect::disconnect(&s)))
            .await
        {
            Ok(()) => {
                tracing::debug!(vm = %ep.vm, addr = %ep.addr(), attempts, "SSH answers");
                return Ok(());
            }
            Err(e) if e.is_transient() => e,
            Err(e) => return Err(e),
        };
        let now = Instant::now();
        if now + backoff >= deadline {
            return Err(SshError::Timeout {
                user: ep.user.clone(),
                addr: ep.addr(),
                attempts,
                timeout,
                last: error::chain(&err),
            });
        }
        tracing::debug!(vm = %ep.vm, attempts, "SSH not ready: {}", error::chain(&err));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Connects for one operation once `wait_ssh` has succeeded, retrying
/// transient failures (a connection refused or dropped during the
/// handshake, e.g. while cloud-init restarts sshd just after first boot)
/// with backoff for at most `within`. Only the connection is retried,
/// never a command that started. Runs on a blocking thread.
fn connect_retrying(ep: &Endpoint, within: Duration) -> Result<ssh2::Session, SshError> {
    retrying(ep, within, Endpoint::connect)
}

/// [`connect_retrying`] with the connect function given.
fn retrying<T>(
    ep: &Endpoint,
    within: Duration,
    connect: impl Fn(&Endpoint, Duration) -> Result<T, SshError>,
) -> Result<T, SshError> {
    let deadline = std::time::Instant::now() + within;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let per_attempt = left.clamp(Duration::from_millis(100), ATTEMPT_TIMEOUT);
        match connect(ep, per_attempt) {
            Err(e) if e.is_transient() && std::time::Instant::now() + backoff < deadline => {
                tracing::info!(vm = %ep.vm, "SSH connect failed, retrying: {}", error::chain(&e));
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            r => return r,
        }
    }
}

/// Runs provisioning step `index` on `target`, streaming output lines to
/// `output` and appending them, under a header, to the VM's
/// `provision.log`. Returns the step's exit code (0 for a file upload).
pub async fn run_step(
    target: &SshTarget,
    index: u32,
    step: &ProvisionStep,
    output: OutputFn<'_>,
) -> Result<i32, SshError> {
    let ep = Endpoint::resolve(target)?;
    let log = ep.work_dir.join(PROVISION_LOG);
    let step = step.clone();
    with_lines(output, move |tx| {
        let mut sink = Sink::new(tx, Some(&log))?;
        let started = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        sink.log_only(&format!(
            "==> {started} step {index}: {}",
            steps::describe(&step)
        ))?;
        let result = match connect_retrying(&ep, STEP_CONNECT_TIMEOUT) {
            Ok(sess) => {
                let code = steps::run_step(&sess, index, &step, &mut sink);
                connect::disconnect(&sess);
                code
            }
            Err(e) if e.is_transient() => Err(SshError::NotStarted {
                within: STEP_CONNECT_TIMEOUT,
                source: Box::new(e),
            }),
            Err(e) => Err(e),
        };
        let footer = match &result {
            Ok(code) => format!("==> step {index} exited with code {code}"),
            Err(e @ SshError::NotStarted { .. }) => {
                format!("==> step {index} did not start: {}", error::chain(e))
            }
            Err(e) => format!("==> step {index} failed: {}", error::chain(e)),
        };
        sink.log_only(&footer)?;
        result
    })
    .await
}

/// Runs `command` on `target` (as `vmctl exec` does), streaming its merged
/// stdout and stderr to `output` line by line; returns its exit code.
/// Nothing is written to `provision.log`.
pub async fn exec(
    target: &SshTarget,
    command: &str,
    output: OutputFn<'_>,
) -> Result<i32, SshError> {
    let ep = Endpoint::resolve(target)?;
    let command = command.to_owned();
    with_lines(output, move |tx| {
        let mut sink = Sink::new(tx, None)?;
        let sess = connect_retrying(&ep, STEP_CONNECT_TIMEOUT)?;
        let code = steps::run_command(&sess, &command, &mut sink);
        connect::disconnect(&sess);
        code
    })
    .await
}

/// Copies the local file `local` to the absolute path `remote` on
/// `target` over SFTP, keeping its mode (`vmctl cp`). Returns the bytes copied.
pub async fn copy_to(target: &SshTarget, local: &Path, remote: &str) -> Result<u64, SshError> {
    if !remote.starts_with('/') {
        return Err(SshError::RelativeDestination(remote.to_owned()));
    }
    let ep = Endpoint::resolve(target)?;
    let (local, remote) = (local.to_owned(), remote.to_owned());
    blocking(move || {
        let local_err = |source| SshError::LocalFile {
            path: local.clone(),
            source,
        };
        // The agent reads what `vmctl cp` names: regular files within the
        // upload limit only, so a device or FIFO cannot hang it.
        let data = vmctl_api::localfile::read(&local, vmctl_api::limits::FileUse::Upload)
            .map_err(|e| local_err(e.into()))?;
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&local).map_err(local_err)?.permissions(),
        ) & 0o7777;
        let sess = connect_retrying(&ep, STEP_CONNECT_TIMEOUT)?;
        let r = steps::upload(&sess, &local, &data, &remote, mode);
        connect::disconnect(&sess);
        r.map(|()| data.len() as u64)
    })
    .await
}

/// Copies `remote` on `target` to the local path `local` over SFTP; the
/// local file appears whole or not at all (temp file, then rename).
pub async fn copy_from(target: &SshTarget, remote: &str, local: &Path) -> Result<u64, SshError> {
    let ep = Endpoint::resolve(target)?;
    let (local, remote) = (local.to_owned(), remote.to_owned());
    blocking(move || {
        use std::io::Read as _;
        let sess = connect_retrying(&ep, STEP_CONNECT_TIMEOUT)?;
        let session_err = |what: String| move |source| SshError::Session { what, source };
        let sftp = sess.sftp().map_err(session_err("start SFTP".to_owned()))?;
        let mut f = sftp
            .open(Path::new(&remote))
            .map_err(session_err(format!("open {remote} on the guest")))?;
        let mut data = Vec::new();
        f.read_to_end(&mut data)
            .map_err(|source| SshError::Output {
                what: remote.clone(),
                source,
            })?;
        connect::disconnect(&sess);
        let dir = local
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let write_err = |source| SshError::KnownHosts {
            path: local.clone(),
            source,
        };
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(write_err)?;
        tmp.write_all(&data).map_err(write_err)?;
        tmp.as_file().sync_all().map_err(write_err)?;
        tmp.persist(&local).map_err(|e| write_err(e.error))?;
        Ok(data.len() as u64)
    })
    .await
}

/// The `known_hosts` line pinning `target`'s host key at its SSH address,
/// for `vmctl ssh` to hand to `ssh -o UserKnownHostsFile=…`.
pub fn known_hosts_line(target: &SshTarget) -> Result<String, SshError> {
    let host = target
        .runtime
        .ssh_host
        .as_deref()
        .ok_or_else(|| SshError::NoAddress {
            vm: target.vm.clone(),
        })?;
    let work_dir = target
        .runtime
        .work_dir
        .as_deref()
        .ok_or_else(|| SshError::NoWorkDir {
            vm: target.vm.clone(),
        })?;
    let key = connect::read_pinned(&target.vm, Path::new(work_dir))?;
    let port = target.runtime.ssh_port.unwrap_or(22);
    Ok(crate::seed::known_hosts_line(host, port, &key))
}

/// Writes a `known_hosts` file holding only `target`'s pinned key to
/// `<work_dir>/known_hosts` (mode 0644, replaced atomically) and returns
/// its path.
pub fn write_known_hosts(target: &SshTarget) -> Result<PathBuf, SshError> {
    let line = known_hosts_line(target)?;
    // known_hosts_line checked that work_dir is set.
    let dir = PathBuf::from(target.runtime.work_dir.as_deref().unwrap_or_default());
    let path = dir.join("known_hosts");
    let write_err = |source| SshError::KnownHosts {
        path: path.clone(),
        source,
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(write_err)?;
    writeln!(tmp, "{line}").map_err(write_err)?;
    tmp.persist(&path).map_err(|e| write_err(e.error))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(write_err)?;
    Ok(path)
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SshError> + Send + 'static,
) -> Result<T, SshError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SshError::Worker(e.to_string()))?
}

/// Runs `f` on a blocking thread, handing every line it sends to `output`
/// on this task, as it arrives.
async fn with_lines<T: Send + 'static>(
    output: OutputFn<'_>,
    f: impl FnOnce(tokio::sync::mpsc::Sender<String>) -> Result<T, SshError> + Send + 'static,
) -> Result<T, SshError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(LINE_BUFFER);
    let task = tokio::task::spawn_blocking(move || f(tx));
    // Ends when the blocking side drops its sender, i.e. when `f` returns.
    while let Some(line) = rx.recv().await {
        output(&line);
    }
    task.await.map_err(|e| SshError::Worker(e.to_string()))?
}
