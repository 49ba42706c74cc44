//! What the agent's API does on a guest for `vmctl exec`, `cp` and `ssh`:
//! a command with stdout and stderr kept apart, files in and out as bytes
//! with their modes, and the SSH material (pinned host key, user key) the
//! system `ssh` needs.
//!
//! ```text
//!   exec ── spawn_blocking(connect ─▶ channel (stderr not merged)
//!                 └─ non-blocking reads of both streams, poll(2) on the socket
//!                       ──mpsc──▶ Output::Stdout / Output::Stderr ──▶ caller
//! ```
//!
//! Unlike a provisioning step ([`super::steps::run_command`]), whose
//! output goes to a log where a line need not say which stream it came
//! from, `vmctl exec` must give the caller's stdout and stderr back
//! separately. Reading one of the channel's streams in blocking mode could
//! wait forever while the other fills the SSH window, so both are read in
//! non-blocking mode and the thread sleeps in `poll(2)` on the session's
//! socket when neither has data.

use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use ssh_key::PublicKey;

use super::connect::{self, Endpoint};
use super::error::SshError;
use super::{STEP_CONNECT_TIMEOUT, blocking, connect_retrying, retrying, steps};
use crate::drivers::SshTarget;
use crate::seed::keys::USER_KEY;

/// A piece of a command's output, in the order it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Bytes the command wrote to its stdout.
    Stdout(Vec<u8>),
    /// Bytes the command wrote to its stderr.
    Stderr(Vec<u8>),
}

/// How long the reader sleeps in `poll(2)` at most before looking whether
/// the caller is still there (a silent command is cancelled within this).
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Runs `command` (a shell command line) on `target` with its stdin at
/// end-of-file, sending its stdout and stderr to `out` as they arrive,
/// kept apart; returns its exit code (128 + the signal's number for a
/// command killed by a signal, as a shell reports it).
///
/// Errors: connection failures as [`SshError`]; [`SshError::Cancelled`]
/// once `out` is closed (the caller went away), which also ends the
/// command's channel.
pub async fn exec(
    target: &SshTarget,
    command: &str,
    out: tokio::sync::mpsc::Sender<Output>,
) -> Result<i32, SshError> {
    let ep = Endpoint::resolve(target)?;
    let command = command.to_owned();
    blocking(move || {
        let (sess, sock) = retrying(&ep, STEP_CONNECT_TIMEOUT, Endpoint::connect_watched)?;
        let r = run_split(&sess, &sock, &command, &out);
        connect::disconnect(&sess);
        r
    })
    .await
}

fn run_split(
    sess: &ssh2::Session,
    sock: &TcpStream,
    command: &str,
    out: &tokio::sync::mpsc::Sender<Output>,
) -> Result<i32, SshError> {
    let session_err = |what: &str| {
        let what = format!("{what} for `{command}`");
        move |source| SshError::Session { what, source }
    };
    let mut ch = sess
        .channel_session()
        .map_err(session_err("open a channel"))?;
    ch.exec(command).map_err(session_err("start the command"))?;
    ch.send_eof()
        .map_err(session_err("close the command's stdin"))?;
    // Left non-blocking on every early return: freeing a channel whose
    // command still runs waits, in blocking mode, for the guest to close
    // it, i.e. for the command to end. Dropping the session instead
    // closes the connection, and sshd hangs the command up.
    sess.set_blocking(false);
    let read_err = |source| SshError::Output {
        what: command.to_owned(),
        source,
    };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let mut progressed = false;
        for id in [0, ssh2::EXTENDED_DATA_STDERR] {
            match ch.stream(id).read(&mut buf) {
                Ok(0) => {}
                Ok(n) => {
                    progressed = true;
                    let data = buf[..n].to_vec();
                    let piece = if id == 0 {
                        Output::Stdout(data)
                    } else {
                        Output::Stderr(data)
                    };
                    if out.blocking_send(piece).is_err() {
                        return Err(SshError::Cancelled);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(read_err(e)),
            }
        }
        if progressed {
            continue;
        }
        if ch.eof() {
            break;
        }
        if out.is_closed() {
            return Err(SshError::Cancelled);
        }
        wait_readable(sock, POLL_INTERVAL).map_err(read_err)?;
    }
    sess.set_blocking(true);
    ch.wait_close().map_err(session_err("close the channel"))?;
    if let Some(sig) = ch.exit_signal().ok().and_then(|s| s.exit_signal) {
        return Ok(128 + steps::signal_number(&sig));
    }
    ch.exit_status()
        .map_err(session_err("read the exit status"))
}

/// Sleeps until `sock` (the session's socket) has something to read, or
/// `timeout` passes.
fn wait_readable(sock: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, ms) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Writes `data` to the absolute path `remote` on `target` over SFTP with
/// exactly the mode `mode` (the permission bits, e.g. `0o755`). Returns
/// the bytes written.
///
/// Errors: [`SshError::RelativeDestination`] for a relative path,
/// [`SshError::RemoteDirMissing`] when its directory does not exist, and
/// connection or SFTP failures.
pub async fn upload(
    target: &SshTarget,
    data: Vec<u8>,
    remote: &str,
    mode: u32,
) -> Result<u64, SshError> {
    if !remote.starts_with('/') {
        return Err(SshError::RelativeDestination(remote.to_owned()));
    }
    let ep = Endpoint::resolve(target)?;
    let remote = remote.to_owned();
    blocking(move || {
        let sess = connect_retrying(&ep, STEP_CONNECT_TIMEOUT)?;
        let r = steps::upload(
            &sess,
            Path::new("the uploaded data"),
            &data,
            &remote,
            mode & 0o7777,
        );
        connect::disconnect(&sess);
        r.map(|()| data.len() as u64)
    })
    .await
}

/// A file read from a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// Its content.
    pub data: Vec<u8>,
    /// Its permission bits (`0o644`), as the guest reports them.
    pub mode: u32,
}

/// Reads the file `remote` on `target` over SFTP, with its mode. Files
/// over `max_bytes` are refused (the agent holds the whole file).
///
/// Errors: [`SshError::Session`] when the file cannot be opened or is not
/// a regular file, [`SshError::Output`] when it is too large or reading
/// fails midway, and connection failures.
pub async fn download(
    target: &SshTarget,
    remote: &str,
    max_bytes: u64,
) -> Result<Download, SshError> {
    let ep = Endpoint::resolve(target)?;
    let remote = remote.to_owned();
    blocking(move || {
        let sess = connect_retrying(&ep, STEP_CONNECT_TIMEOUT)?;
        // A stalled transfer ends with an error instead of hanging the agent.
        sess.set_timeout(u32::try_from(steps::UPLOAD_STALL.as_millis()).unwrap_or(u32::MAX));
        let r = read_remote(&sess, &remote, max_bytes);
        connect::disconnect(&sess);
        r
    })
    .await
}

fn read_remote(sess: &ssh2::Session, remote: &str, max_bytes: u64) -> Result<Download, SshError> {
    let session_err = |what: String| move |source| SshError::Session { what, source };
    let sftp = sess.sftp().map_err(session_err("start SFTP".to_owned()))?;
    let mut f = sftp
        .open(Path::new(remote))
        .map_err(session_err(format!("open {remote} on the guest")))?;
    let st = f
        .stat()
        .map_err(session_err(format!("stat {remote} on the guest")))?;
    let output_err = |source| SshError::Output {
        what: remote.to_owned(),
        source,
    };
    if !st.is_file() {
        return Err(output_err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let mut data = Vec::new();
    (&mut f)
        .take(max_bytes + 1)
        .read_to_end(&mut data)
        .map_err(output_err)?;
    if data.len() as u64 > max_bytes {
        return Err(output_err(std::io::Error::new(
            ErrorKind::FileTooLarge,
            format!(
                "larger than {}, the most a copy carries",
                vmctl_api::limits::human_bytes(max_bytes)
            ),
        )));
    }
    Ok(Download {
        data,
        mode: st.perm.unwrap_or(0o644) & 0o7777,
    })
}

/// What the system `ssh` needs to log in to a VM through the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// The user to log in as.
    pub user: String,
    /// The pinned host key, in OpenSSH public key format (`ssh-ed25519 AAAA…`).
    pub host_key: String,
    /// The private key vmctl generated for the VM (OpenSSH PEM), when the
    /// VM's `ssh` block names no key of its own.
    pub private_key: Option<String>,
    /// The key the VM's `ssh` block names (a path on the agent's host, as
    /// written), when it names one.
    pub private_key_path: Option<String>,
}

/// The SSH material of `target`: its user, its pinned host key and the
/// generated private key (unless its `ssh` block names its own).
///
/// Errors: [`SshError::NoWorkDir`], [`SshError::HostKeyMissing`] /
/// [`SshError::HostKeyRead`] for the pinned key, [`SshError::LocalFile`]
/// when the generated private key cannot be read.
pub fn access(target: &SshTarget) -> Result<Access, SshError> {
    let work_dir = target
        .runtime
        .work_dir
        .as_deref()
        .ok_or_else(|| SshError::NoWorkDir {
            vm: target.vm.clone(),
        })?;
    let work_dir = Path::new(work_dir);
    let pinned: PublicKey = connect::read_pinned(&target.vm, work_dir)?;
    let host_key = pinned.to_openssh().map_err(|e| SshError::HostKeyRead {
        path: work_dir.join("host_ed25519.pub"),
        reason: e.to_string(),
    })?;
    let ssh = target.ssh.clone().unwrap_or_default();
    let user = if ssh.user.is_empty() {
        vmctl_api::default_ssh_user()
    } else {
        ssh.user
    };
    let (private_key, private_key_path) = match ssh.private_key {
        Some(p) => (None, Some(p)),
        None => {
            let path = work_dir.join(USER_KEY);
            let key = vmctl_api::localfile::read(&path, vmctl_api::limits::FileUse::SshKey)
                .map_err(|e| SshError::LocalFile {
                    path: path.clone(),
                    source: e.into(),
                })?;
            (Some(String::from_utf8_lossy(&key).into_owned()), None)
        }
    };
    Ok(Access {
        user,
        host_key,
        private_key,
        private_key_path,
    })
}
