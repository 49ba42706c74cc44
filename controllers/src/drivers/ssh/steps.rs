//! The blocking half: running a command with its output streamed line by
//! line, SFTP uploads, and the three step types on an open session.
//!
//! Output ordering: the channel is opened with
//! [`ExtendedData::Merge`], so libssh2 hands stderr bytes to the same
//! stream as stdout, in the order the packets arrived. That is the order
//! the guest's sshd read them from the command's two pipes — the closest
//! to "the order the guest printed them" SSH can give, and unlike polling
//! the two streams separately it cannot reorder lines that were already
//! ordered on the wire. The price is that a line cannot be told to be
//! stderr; provisioning logs do not need to.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ssh2::{ExtendedData, Session};
use vmctl_api::ProvisionStep;
use vmctl_api::limits::FileUse;
use vmctl_api::localfile;
use vmctl_api::resources::LocalFile;

use super::error::SshError;

/// Where a step's output lines go: the caller's callback (through a
/// channel, see `mod.rs`) and, for provisioning, `provision.log`.
pub(super) struct Sink {
    lines: tokio::sync::mpsc::Sender<String>,
    log: Option<(PathBuf, File)>,
}

impl Sink {
    /// A sink that sends lines to `lines` and, with `log`, appends them to
    /// that file.
    pub fn new(
        lines: tokio::sync::mpsc::Sender<String>,
        log: Option<&Path>,
    ) -> Result<Self, SshError> {
        let log = match log {
            Some(path) => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| SshError::Log {
                        path: path.to_owned(),
                        source,
                    })?;
                Some((path.to_owned(), f))
            }
            None => None,
        };
        Ok(Self { lines, log })
    }

    /// Writes a line to the log only (headers, footers).
    pub fn log_only(&mut self, line: &str) -> Result<(), SshError> {
        if let Some((path, f)) = &mut self.log {
            writeln!(f, "{line}").map_err(|source| SshError::Log {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// One line of output: logged, then handed to the caller. Fails with
    /// [`SshError::Cancelled`] once the caller is gone.
    fn line(&mut self, line: &str) -> Result<(), SshError> {
        self.log_only(line)?;
        self.lines
            .blocking_send(line.to_owned())
            .map_err(|_| SshError::Cancelled)
    }
}

/// Runs `command` on the guest, streaming its merged stdout and stderr to
/// `sink` line by line, and returns its exit status. A command killed by
/// a signal gets 128 + the signal's number, as a shell reports it.
pub(super) fn run_command(sess: &Session, command: &str, sink: &mut Sink) -> Result<i32, SshError> {
    let session_err = |what: &str| {
        let what = format!("{what} for `{command}`");
        move |source| SshError::Session { what, source }
    };
    let mut ch = sess
        .channel_session()
        .map_err(session_err("open a channel"))?;
    ch.handle_extended_data(ExtendedData::Merge)
        .map_err(session_err("merge stderr"))?;
    ch.exec(command).map_err(session_err("start the command"))?;
    // Nothing is ever typed into a step: its stdin is at end-of-file at
    // once (as `ssh -n`, Vagrant and Packer give), so a command that reads
    // stdin ends instead of waiting for input until the timeout.
    ch.send_eof()
        .map_err(session_err("close the command's stdin"))?;
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = ch.read(&mut buf).map_err(|source| SshError::Output {
            what: command.to_owned(),
            source,
        })?;
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let rest = pending.split_off(nl + 1);
            emit(sink, &pending)?;
            pending = rest;
        }
    }
    if !pending.is_empty() {
        emit(sink, &pending)?;
    }
    ch.wait_close().map_err(session_err("close the channel"))?;
    if let Some(sig) = ch.exit_signal().ok().and_then(|s| s.exit_signal) {
        return Ok(128 + signal_number(&sig));
    }
    ch.exit_status()
        .map_err(session_err("read the exit status"))
}

fn emit(sink: &mut Sink, raw: &[u8]) -> Result<(), SshError> {
    let mut line = raw.strip_suffix(b"\n").unwrap_or(raw);
    line = line.strip_suffix(b"\r").unwrap_or(line);
    sink.line(&String::from_utf8_lossy(line))
}

/// The number of a signal named as SSH names it (`TERM`, without `SIG`),
/// 127 for a name this host does not know.
pub(super) fn signal_number(name: &str) -> i32 {
    format!("SIG{}", name.trim_start_matches("SIG"))
        .parse::<nix::sys::signal::Signal>()
        .map_or(127, |s| s as i32)
}

/// Reads a step's local file, checking it still has the digest recorded
/// when the manifest was applied. Returns the content and its mode bits.
fn read_local(file: &LocalFile, use_: FileUse) -> Result<(Vec<u8>, u32), SshError> {
    let path = PathBuf::from(&file.path);
    let read_err = |source| SshError::LocalFile {
        path: path.clone(),
        source,
    };
    // Bounded and regular files only: a path in a stored spec may have
    // become a FIFO or a device since it was applied, and a manifest sent
    // to the API may carry a digest that was never checked here
    // (issue 18 item 4: a named file must never hang the agent).
    let data = localfile::read(&path, use_).map_err(|e| read_err(e.into()))?;
    let mode = std::fs::metadata(&path)
        .map_err(read_err)?
        .permissions()
        .mode()
        & 0o7777;
    if let Some(expected) = &file.digest {
        use sha2::Digest;
        let actual = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data)));
        if &actual != expected {
            return Err(SshError::DigestChanged {
                path,
                expected: expected.clone(),
                actual,
            });
        }
    }
    Ok((data, mode))
}

/// Writes `data` to `remote` and sets its mode to exactly `mode` (the
/// create mode alone would be masked by the guest's umask).
///
/// The bytes go through an exec channel running `cat`, not SFTP: libssh2's
/// pipelined SFTP writes stalled against dropbear with OpenSSH's
/// sftp-server for a 1 MiB file, and the handle's close then blocked for
/// ever (the fault `vmctl cp` of a mebibyte hit). A channel's stdin is
/// plain SSH flow control, and any guest with a POSIX shell has `cat` and
/// `chmod`. Every blocking call is bounded by [`UPLOAD_STALL`].
pub(super) fn upload(
    sess: &Session,
    local: &Path,
    data: &[u8],
    remote: &str,
    mode: u32,
) -> Result<(), SshError> {
    let session_err = |what: String| move |source| SshError::Session { what, source };
    let upload_err = |source| SshError::Upload {
        local: local.to_owned(),
        remote: remote.to_owned(),
        source,
    };
    let remote_path = Path::new(remote);
    let dir = remote_path
        .parent()
        .map(|d| d.display().to_string())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/".to_owned());
    let command = format!("cat > {f} && chmod {mode:o} {f}", f = sh_quote(remote),);
    sess.set_timeout(u32::try_from(UPLOAD_STALL.as_millis()).unwrap_or(u32::MAX));
    let result = (|| {
        // The directory first, on a channel of its own: a command that
        // exits without reading its stdin would leave the write waiting.
        let mut check = sess
            .channel_session()
            .map_err(session_err("open a channel".to_owned()))?;
        check
            .exec(&format!("[ -d {} ]", sh_quote(&dir)))
            .map_err(session_err(format!("look for {dir} on the guest")))?;
        check.send_eof().map_err(|e| upload_err(e.into()))?;
        let mut sink = Vec::new();
        check.read_to_end(&mut sink).map_err(upload_err)?;
        check.wait_eof().map_err(|e| upload_err(e.into()))?;
        check.wait_close().map_err(|e| upload_err(e.into()))?;
        if check.exit_status().map_err(|e| upload_err(e.into()))? != 0 {
            return Err(SshError::RemoteDirMissing { dir: dir.clone() });
        }
        let mut ch = sess
            .channel_session()
            .map_err(session_err("open a channel".to_owned()))?;
        ch.exec(&command)
            .map_err(session_err(format!("start the upload of {remote}")))?;
        ch.write_all(data).map_err(upload_err)?;
        ch.send_eof().map_err(|e| upload_err(e.into()))?;
        let mut sink = Vec::new();
        ch.read_to_end(&mut sink).map_err(upload_err)?;
        let mut stderr = String::new();
        let _ = ch.stderr().read_to_string(&mut stderr);
        ch.wait_eof().map_err(|e| upload_err(e.into()))?;
        ch.wait_close().map_err(|e| upload_err(e.into()))?;
        match ch.exit_status().map_err(|e| upload_err(e.into()))? {
            0 => Ok(()),
            code => Err(upload_err(std::io::Error::other(format!(
                "the guest's `cat`/`chmod` exited with {code}: {}",
                stderr.trim()
            )))),
        }
    })();
    sess.set_timeout(0);
    result
}

/// The longest any blocking call of an upload may wait for the guest
/// (a stalled transfer ends with an error instead of hanging the agent).
pub(super) const UPLOAD_STALL: std::time::Duration = std::time::Duration::from_secs(25);

/// `s` as one word for a POSIX shell: in single quotes, each `'` written
/// as `'\''`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Path a `shell script` step's script is uploaded to.
pub(super) fn script_path(index: u32) -> String {
    format!("/tmp/vmctl-provision-{index}.sh")
}

/// One line describing a step, for `provision.log`'s header.
pub(super) fn describe(step: &ProvisionStep) -> String {
    match step {
        ProvisionStep::Shell {
            inline: Some(cmd), ..
        } => format!("shell inline: {}", cmd.lines().next().unwrap_or("")),
        ProvisionStep::Shell {
            script: Some(f), ..
        } => format!("shell script: {}", f.path),
        ProvisionStep::Shell { .. } => "shell".to_owned(),
        ProvisionStep::File {
            source,
            destination,
        } => format!("file: {} -> {destination}", source.path),
    }
}

/// Runs one step on `sess`; returns its exit code (0 for an upload).
pub(super) fn run_step(
    sess: &Session,
    index: u32,
    step: &ProvisionStep,
    sink: &mut Sink,
) -> Result<i32, SshError> {
    match step {
        ProvisionStep::Shell {
            inline: Some(cmd), ..
        } => run_command(sess, cmd, sink),
        ProvisionStep::Shell {
            script: Some(file), ..
        } => {
            let (data, _) = read_local(file, FileUse::Script)?;
            let remote = script_path(index);
            upload(sess, Path::new(&file.path), &data, &remote, 0o755)?;
            run_command(sess, &remote, sink)
        }
        ProvisionStep::Shell { .. } => Err(SshError::EmptyShell),
        ProvisionStep::File {
            source,
            destination,
        } => {
            if !destination.starts_with('/') {
                return Err(SshError::RelativeDestination(destination.clone()));
            }
            let (data, mode) = read_local(source, FileUse::Upload)?;
            upload(sess, Path::new(&source.path), &data, destination, mode)?;
            Ok(0)
        }
    }
}

#[cfg(test)]
mod named_file_tests {
    use super::*;

    fn local(path: &Path) -> LocalFile {
        LocalFile {
            path: path.display().to_string(),
            digest: None,
        }
    }

    /// Issue 18 item 4, the agent's side: a provisioner's script or upload
    /// that became a device or FIFO after it was applied is refused at
    /// once instead of being read forever (or waiting for a writer).
    #[test]
    fn provision_named_device_or_fifo_is_refused_not_read_forever() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("script.sh");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let t0 = std::time::Instant::now();
        for (path, use_) in [
            (fifo.as_path(), FileUse::Script),
            (Path::new("/dev/zero"), FileUse::Upload),
        ] {
            let err = vmctl_api::error_chain(&read_local(&local(path), use_).unwrap_err());
            assert!(err.contains("not a regular file"), "{path:?}: {err}");
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    }

    /// A script that grew past its limit after it was applied is refused
    /// with the limit named, not sent.
    #[test]
    fn provision_named_file_over_its_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.sh");
        let f = File::create(&big).unwrap();
        f.set_len(FileUse::Script.max_bytes() + 1).unwrap();
        let err = vmctl_api::error_chain(&read_local(&local(&big), FileUse::Script).unwrap_err());
        assert!(err.contains("16 MiB"), "{err}");
    }
}
