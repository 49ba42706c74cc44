//! A minimal QMP client: one Unix-socket connection, the capabilities
//! handshake, then commands answered in order. Asynchronous events
//! (`{"event": …}`) are skipped; every read has a deadline.
//!
//! QEMU serves one QMP client at a time on a socket, so the driver opens
//! a connection per operation and drops it right after.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected to.
    #[error("Cannot connect to QMP socket {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP I/O failed")]
    Io(#[source] std::io::Error),
    /// QEMU did not answer in time.
    #[error("QMP {0} timed out")]
    Timeout(String),
    /// QEMU closed the connection.
    #[error("QMP connection closed during {0}")]
    Closed(String),
    /// QEMU answered with an error.
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// QEMU sent something that is not QMP.
    #[error("Unexpected QMP message: {0}")]
    Protocol(String),
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
    next_id: u64,
}

/// How long a connect to a busy monitor (EAGAIN) waits before trying again.
const BUSY_RETRY: Duration = Duration::from_millis(25);

impl Qmp {
    /// Connects to `path`, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        // QEMU's monitor serves one client at a time; the others wait in
        // the socket's listen backlog, and a connect to a full backlog
        // fails at once with EAGAIN. That is a busy monitor, not a dead
        // one: try again until the timeout.
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, UnixStream::connect(path)).await {
                Err(_) => return Err(QmpError::Timeout("connect".into())),
                Ok(Ok(stream)) => break stream,
                Ok(Err(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && tokio::time::Instant::now() + BUSY_RETRY < deadline =>
                {
                    tokio::time::sleep(BUSY_RETRY).await;
                }
                Ok(Err(source)) => {
                    return Err(QmpError::Connect {
                        path: path.to_owned(),
                        source,
                    });
                }
            }
        };
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
            timeout,
            next_id: 0,
        };
        let greeting = qmp.read_message("greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs `command` and returns its `return` value.
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        tokio::time::timeout(self.timeout, self.writer.write_all(line.as_bytes()))
            .await
            .map_err(|_| QmpError::Timeout(command.to_owned()))?
            .map_err(QmpError::Io)?;
        loop {
            let reply = self.read_message(command).await?;
            if reply.get("event").is_some() {
                tracing::debug!(event = %reply, "QMP event");
                continue;
            }
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let s = |k| err.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(QmpError::Protocol(reply.to_string()));
        }
    }

    /// Waits, without a deadline, for the next asynchronous event
    /// (`{"event": "SHUTDOWN", …}`); `Closed` when QEMU went away.
    pub async fn next_event(&mut self) -> Result<Value, QmpError> {
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .await
                .map_err(QmpError::Io)?;
            if n == 0 {
                return Err(QmpError::Closed("event wait".into()));
            }
            let msg: Value = serde_json::from_str(&line)
                .map_err(|_| QmpError::Protocol(line.trim().to_owned()))?;
            if msg.get("event").is_some() {
                return Ok(msg);
            }
        }
    }

    /// `query-status`'s `status` field (`running`, `paused`, `shutdown`, …).
    pub async fn query_status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| QmpError::Protocol(v.to_string()))
    }

    async fn read_message(&mut self, during: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = tokio::time::timeout(self.timeout, self.reader.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Timeout(during.to_owned()))?
            .map_err(QmpError::Io)?;
        if n == 0 {
            return Err(QmpError::Closed(during.to_owned()));
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Protocol(line.trim().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    /// A real QEMU without a machine: starts in well under a second.
    async fn bare_qemu(dir: &Path) -> (tokio::process::Child, PathBuf) {
        let sock = dir.join("qmp.sock");
        let child = tokio::process::Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "none",
                "-accel",
                "tcg",
                "-nographic",
                "-nodefaults",
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Up to 60 s: QEMU took over 5 s to create its socket on a loaded
        // machine (found as this test failing while builds ran).
        for _ in 0..1200 {
            if sock.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (child, sock)
    }

    #[tokio::test]
    async fn handshake_status_stop_cont_and_errors_against_real_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, sock) = bare_qemu(dir.path()).await;
        let mut q = Qmp::connect(&sock, Duration::from_secs(5)).await.unwrap();
        assert_eq!(q.query_status().await.unwrap(), "running");
        q.execute("stop", None).await.unwrap();
        assert_eq!(q.query_status().await.unwrap(), "paused");
        q.execute("cont", None).await.unwrap();
        assert_eq!(q.query_status().await.unwrap(), "running");
        let err = q.execute("no-such-command", None).await.unwrap_err();
        assert!(matches!(err, QmpError::Command { ref class, .. } if class == "CommandNotFound"));
        q.execute("quit", None).await.unwrap();
        let st = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        assert!(st.unwrap().unwrap().success());
    }

    #[tokio::test]
    async fn connect_to_missing_socket_fails() {
        let dir = tempfile::tempdir().unwrap();
        let err = Qmp::connect(&dir.path().join("nope"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Connect { .. }));
    }
}
