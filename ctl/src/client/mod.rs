//! A small blocking HTTP/1.1 client for the agent's Unix socket, and the
//! agent auto-start.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use vmctl_api::wire::ErrorBody;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No agent answers on the socket.
    #[error("no vmctl agent answers on {}", socket.display())]
    Unreachable {
        /// The socket tried.
        socket: PathBuf,
        /// The agent's log file.
        log: PathBuf,
    },
    /// The agent answered with an error.
    #[error("{}", body.message)]
    Api {
        /// The HTTP status.
        status: u16,
        /// The error body.
        body: ErrorBody,
        /// Its help line.
        help: Option<String>,
    },
    /// Talking to the agent failed.
    #[error("talking to the agent failed")]
    Io(#[source] std::io::Error),
    /// The agent closed the connection before its answer was complete:
    /// nothing it may have done is acknowledged.
    #[error("the agent closed the connection {0}; the request may or may not have taken effect")]
    HungUp(String),
    /// The agent's answer was not what this vmctl expects.
    #[error("unexpected answer from the agent: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The diagnostic code: for an API error, the agent's own code.
    pub fn code(&self) -> &str {
        match self {
            ClientError::Unreachable { .. } => "vmctl::agent::unreachable",
            ClientError::Api { body, .. } if !body.code.is_empty() => &body.code,
            ClientError::Api { .. } => "vmctl::agent::error",
            ClientError::Io(_) | ClientError::HungUp(_) => "vmctl::agent::io",
            ClientError::Protocol(_) => "vmctl::agent::protocol",
        }
    }
}

impl miette::Diagnostic for ClientError {
    fn code<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        Some(Box::new(ClientError::code(self)))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        match self {
            ClientError::Unreachable { log, .. } => Some(Box::new(format!(
                "start one with `vmctl agent`, or drop --no-autostart; its log is {}",
                log.display()
            ))),
            ClientError::Api { help: Some(h), .. } => Some(Box::new(h)),
            _ => vmctl_api::codes::help(ClientError::code(self))
                .map(|h| Box::new(h) as Box<dyn std::fmt::Display>),
        }
    }
}

/// A connection target.
#[derive(Debug, Clone)]
pub struct Client {
    /// The socket path.
    pub socket: PathBuf,
}

/// A response whose body has not been read yet.
#[derive(Debug)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    chunked: bool,
    content_length: Option<u64>,
    reader: BufReader<UnixStream>,
}

impl Response {
    /// Reads the whole body; fails if the connection ends before the
    /// `Content-Length` or the last chunk.
    pub fn body(mut self) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        if self.chunked {
            while let Some(chunk) = self.next_chunk()? {
                out.extend(chunk);
            }
        } else if let Some(len) = self.content_length {
            (&mut self.reader)
                .take(len)
                .read_to_end(&mut out)
                .map_err(ClientError::Io)?;
            if (out.len() as u64) < len {
                return Err(ClientError::HungUp(format!(
                    "after {} of the {len} bytes of its answer",
                    out.len()
                )));
            }
        } else {
            self.reader.read_to_end(&mut out).map_err(ClientError::Io)?;
        }
        Ok(out)
    }

    fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).map_err(ClientError::Io)? == 0 {
            return Err(ClientError::HungUp("in the middle of its answer".into()));
        }
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| ClientError::Protocol(format!("bad chunk header {line:?}")))?;
        if size == 0 {
            return Ok(None);
        }
        let mut buf = vec![0; size + 2];
        self.reader.read_exact(&mut buf).map_err(ClientError::Io)?;
        buf.truncate(size);
        Ok(Some(buf))
    }

    /// Calls `f` with each line of a newline-delimited JSON stream until it
    /// returns false or the stream ends.
    pub fn lines(mut self, mut f: impl FnMut(&[u8]) -> bool) -> Result<(), ClientError> {
        let mut pending = Vec::new();
        loop {
            let chunk = if self.chunked {
                match self.next_chunk()? {
                    Some(c) => c,
                    None => return Ok(()),
                }
            } else {
                let mut buf = vec![0; 8192];
                let n = self.reader.read(&mut buf).map_err(ClientError::Io)?;
                if n == 0 {
                    return Ok(());
                }
                buf.truncate(n);
                buf
            };
            pending.extend(chunk);
            while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                if !f(&line[..line.len() - 1]) {
                    return Ok(());
                }
            }
        }
    }
}

impl Client {
    /// Sends a request and reads the status line and headers.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let mut s = UnixStream::connect(&self.socket).map_err(ClientError::Io)?;
        let body = body.unwrap_or(b"");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: vmctl\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let written = s
            .write_all(head.as_bytes())
            .and_then(|()| s.write_all(body));
        // The agent may answer before reading the whole body (413) and
        // close: its answer is still readable, so read it whatever the
        // write did, and fail only when there is none.
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        let read = reader.read_line(&mut line);
        match (written, read) {
            (_, Ok(n)) if n > 0 => {}
            (Err(e), _) => {
                return Err(ClientError::HungUp(format!(
                    "while it was sent the request ({e})"
                )));
            }
            (Ok(()), Ok(_)) => return Err(ClientError::HungUp("without answering".into())),
            (Ok(()), Err(e)) => return Err(ClientError::Io(e)),
        }
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ClientError::Protocol(format!("bad status line {line:?}")))?;
        let mut chunked = false;
        let mut content_length = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).map_err(ClientError::Io)? == 0 {
                return Err(ClientError::HungUp("in the middle of its answer".into()));
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("transfer-encoding")
                    && v.trim().eq_ignore_ascii_case("chunked")
                {
                    chunked = true;
                } else if k.eq_ignore_ascii_case("content-length") {
                    content_length =
                        Some(v.trim().parse().map_err(|_| {
                            ClientError::Protocol(format!("bad Content-Length {v:?}"))
                        })?);
                }
            }
        }
        Ok(Response {
            status,
            chunked,
            content_length,
            reader,
        })
    }

    /// Sends a JSON request and decodes a JSON answer, turning error
    /// statuses into [`ClientError::Api`].
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let bytes = body.map(|b| serde_json::to_vec(b).expect("requests serialise"));
        let resp = self.send(method, path, bytes.as_deref())?;
        let status = resp.status;
        let body = resp.body()?;
        if status >= 400 {
            let err: ErrorBody = serde_json::from_slice(&body).map_err(|_| {
                ClientError::Protocol(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)))
            })?;
            return Err(ClientError::Api {
                status,
                help: err.help.clone(),
                body: err,
            });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Whether an agent answers.
    pub fn ping(&self) -> bool {
        self.call::<serde_json::Value>("GET", "/v1/healthz", None::<&()>)
            .is_ok()
    }
}

/// How long [`connect`] waits for an agent it started (or one another
/// `vmctl` started at the same moment) to answer, in seconds.
pub const AUTOSTART_WAIT_SECS: u64 = 30;

/// The exit code of `vmctl agent` when another agent holds the data
/// directory's lock (`DATA_DIR/agent.lock`).
pub const EXIT_AGENT_LOCKED: u8 = 3;

/// Connects to the agent, starting one in the background when none answers
/// (unless `autostart` is false), and waits up to [`AUTOSTART_WAIT_SECS`]
/// for it.
///
/// Several `vmctl` commands may start an agent at the same moment: one
/// takes the lock, the others exit at once with [`EXIT_AGENT_LOCKED`] while
/// the winner may still be opening its store, so that exit means "keep
/// waiting for the winner". Any other exit means the agent failed.
///
/// Errors: [`ClientError::Unreachable`] when no agent answers in time or
/// the started agent failed (its log says why); [`ClientError::Io`] when
/// the data directory, the log or the process cannot be created.
pub fn connect(data_dir: &Path, socket: &Path, autostart: bool) -> Result<Client, ClientError> {
    let client = Client {
        socket: socket.to_path_buf(),
    };
    if client.ping() {
        return Ok(client);
    }
    let log = data_dir.join("agent.log");
    let unreachable = || ClientError::Unreachable {
        socket: socket.to_path_buf(),
        log: log.clone(),
    };
    if !autostart {
        return Err(unreachable());
    }
    std::fs::create_dir_all(data_dir).map_err(ClientError::Io)?;
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(ClientError::Io)?;
    let exe = std::env::current_exe().map_err(ClientError::Io)?;
    eprintln!("starting the vmctl agent (log: {})", log.display());
    let mut child = Command::new(exe)
        .arg("agent")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().map_err(ClientError::Io)?)
        .stderr(logf)
        .process_group(0)
        .spawn()
        .map_err(ClientError::Io)?;
    let deadline = Instant::now() + Duration::from_secs(AUTOSTART_WAIT_SECS);
    let mut lost_the_race = false;
    while Instant::now() < deadline {
        if client.ping() {
            return Ok(client);
        }
        if !lost_the_race && let Ok(Some(status)) = child.try_wait() {
            if status.code() != Some(EXIT_AGENT_LOCKED.into()) {
                return Err(unreachable());
            }
            // Another agent holds the lock and is starting: wait for it.
            lost_the_race = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(unreachable())
}

use std::os::unix::process::CommandExt as _;
