//! The client side of the agent's streaming endpoints (`agent/src/streams.rs`):
//! console and SSH tunnel as upgraded connections, exec output as it
//! comes, files both ways, SSH material and image inspection.
//!
//! An upgraded connection (hyper's `upgrade::on` after `101 Switching
//! Protocols`) is handed back as a plain blocking [`UnixStream`], so the
//! terminal and pipe code stays simple blocking I/O: on the agent's
//! socket, the socket it was, with the bytes hyper had already read past
//! the answer's head; over TLS, one end of a socket pair whose other end
//! a task of the client's runtime relays to and from the TLS stream
//! (decrypting cannot happen in the caller's blocking reads).

use std::os::unix::net::UnixStream;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, UPGRADE};
use hyper_util::rt::TokioIo;
use vmctl_api::streams::{
    ExecEvent, ExecRequest, FILE_MODE_HEADER, FileWritten, ImageInfo, InspectRequest, SshAccess,
    UPGRADE_PROTOCOL,
};

use super::{Client, ClientError, RequestTimeout, api_path, decode, hyper_error, query_value};

/// Largest file `vmctl cp` carries either way, in bytes (the agent's
/// limit, that of a provisioning upload: 256 MiB).
pub const MAX_COPY_BYTES: u64 = vmctl_api::limits::FileUse::Upload.max_bytes();

/// What the default request timeout allows a copy per MiB it carries on
/// top of [`super::DEFAULT_REQUEST_TIMEOUT`] (a download counts as
/// [`MAX_COPY_BYTES`]: its size is known only once it arrives). The agent
/// answers once the whole file is written or read over SFTP.
pub const DEFAULT_COPY_TIMEOUT_PER_MIB: Duration = Duration::from_secs(1);

/// A connection switched to a raw byte stream, both ways.
#[derive(Debug)]
pub struct Upgraded {
    /// The connection, in blocking mode.
    pub stream: UnixStream,
    /// Bytes of the stream that arrived together with the agent's answer,
    /// to be used before reading `stream`.
    pub early: Vec<u8>,
    /// The runtime whose task relays a TLS stream to `stream`, kept
    /// running as long as this is.
    _relay: Option<std::sync::Arc<tokio::runtime::Runtime>>,
}

/// A file read from a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// Its content.
    pub data: Vec<u8>,
    /// Its permission bits (`0o755`).
    pub mode: u32,
}

/// `/v1/vms/NAME/WHAT`.
fn vm_path(name: &str, what: &str) -> String {
    api_path(&["vms", name, what])
}

/// `path?key=value&…`, values percent-encoded.
fn with_query(path: &str, query: &[(&str, &str)]) -> String {
    let q: Vec<String> = query
        .iter()
        .map(|(k, v)| format!("{k}={}", query_value(v)))
        .collect();
    format!("{path}?{}", q.join("&"))
}

impl RequestTimeout {
    /// The limit of a copy of `bytes` bytes (`None`: no limit).
    fn limit_copy(self, bytes: u64) -> Option<Duration> {
        match self {
            RequestTimeout::Default => {
                let mib = u32::try_from(bytes.div_ceil(1 << 20)).unwrap_or(u32::MAX);
                self.limit(0)
                    .map(|d| d + DEFAULT_COPY_TIMEOUT_PER_MIB.saturating_mul(mib))
            }
            other => other.limit(0),
        }
    }
}

impl Client {
    /// Asks for `path` as a byte stream (`Connection: Upgrade`, `Upgrade:
    /// tcp`) and returns the switched connection; the switch happens
    /// within the request timeout, the stream itself has none.
    ///
    /// Errors: the agent's refusal ([`ClientError::Api`], e.g. the VM is
    /// not running), [`ClientError::Protocol`] when it does not switch.
    fn upgrade(&self, path: &str) -> Result<Upgraded, ClientError> {
        self.timed(0, async {
            let req = super::request("GET", path)?
                .header(CONNECTION, "upgrade")
                .header(UPGRADE, UPGRADE_PROTOCOL)
                .body(Full::new(Bytes::new()))
                .map_err(|e| ClientError::Protocol(format!("bad request {path:?}: {e}")))?;
            let resp = self.send_request(req).await?;
            let status = resp.status().as_u16();
            if status != 101 {
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| hyper_error(e, "in the middle of its answer"))?
                    .to_bytes();
                return decode::<serde_json::Value>(status, &body).and_then(|_| {
                    Err(ClientError::Protocol(format!(
                        "{path} answered {status} instead of switching protocols"
                    )))
                });
            }
            let upgraded = hyper::upgrade::on(resp)
                .await
                .map_err(|e| ClientError::Protocol(format!("switching protocols failed: {e}")))?;
            let upgraded = match upgraded.downcast::<TokioIo<tokio::net::UnixStream>>() {
                Ok(parts) => {
                    let stream = parts.io.into_inner().into_std().map_err(ClientError::Io)?;
                    stream.set_nonblocking(false).map_err(ClientError::Io)?;
                    return Ok(Upgraded {
                        stream,
                        early: parts.read_buf.to_vec(),
                        _relay: None,
                    });
                }
                Err(other) => other,
            };
            // TLS: relay through a socket pair (hyper's `Upgraded` replays
            // the bytes it had read, so nothing comes early).
            let (ours, theirs) = UnixStream::pair().map_err(ClientError::Io)?;
            theirs.set_nonblocking(true).map_err(ClientError::Io)?;
            let theirs = tokio::net::UnixStream::from_std(theirs).map_err(ClientError::Io)?;
            self.rt.spawn(async move {
                let mut tls = TokioIo::new(upgraded);
                let mut theirs = theirs;
                // Each side's end is passed on as a shutdown of the other's
                // writing half, as the socket's own would be.
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut theirs).await;
            });
            Ok(Upgraded {
                stream: ours,
                early: Vec::new(),
                _relay: Some(self.rt.clone()),
            })
        })
    }

    /// `GET /v1/vms/NAME/console` (upgraded): the serial console of VM
    /// `name`, both ways.
    ///
    /// Errors: a 409 `vmctl::vm::invalid_state` when it is not running.
    pub fn console(&self, name: &str) -> Result<Upgraded, ClientError> {
        self.upgrade(&vm_path(name, "console"))
    }

    /// `GET /v1/vms/NAME/tunnel` (upgraded): a byte stream to the SSH port
    /// of VM `name` (the `ProxyCommand` of `vmctl ssh`).
    ///
    /// Errors: a 409 when it is not running, a 502 when its SSH port does
    /// not accept.
    pub fn tunnel(&self, name: &str) -> Result<Upgraded, ClientError> {
        self.upgrade(&vm_path(name, "tunnel"))
    }

    /// `GET /v1/vms/NAME/ssh`: what the system `ssh` needs to log in to VM
    /// `name` through the tunnel.
    pub fn ssh_access(&self, name: &str) -> Result<SshAccess, ClientError> {
        self.call("GET", &vm_path(name, "ssh"), None::<&()>)
    }

    /// `POST /v1/vms/NAME/exec`: runs `command` on VM `name`, calling
    /// `on_event` with every event as it arrives (output pieces, then
    /// `exit` or `error`); returns the last event, `None` when the stream
    /// ended without one. The head of the answer arrives within the
    /// request timeout; the output has none.
    ///
    /// Errors: the agent's refusal; [`ClientError::Io`] with what
    /// `on_event` returned (e.g. a broken pipe on our stdout).
    pub fn exec(
        &self,
        name: &str,
        command: &[String],
        mut on_event: impl FnMut(&ExecEvent) -> std::io::Result<()>,
    ) -> Result<Option<ExecEvent>, ClientError> {
        let body = serde_json::to_vec(&ExecRequest {
            command: command.to_vec(),
        })
        .expect("requests serialise");
        let resp = self.send("POST", &vm_path(name, "exec"), Some(&body))?;
        let mut resp = self.streamed(resp)?;
        let mut pending: Vec<u8> = Vec::new();
        let mut last = None;
        while let Some(c) = resp.chunk()? {
            pending.extend_from_slice(&c);
            while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                let ev: ExecEvent = serde_json::from_slice(&line)
                    .map_err(|e| ClientError::Protocol(format!("exec stream: {e}")))?;
                on_event(&ev).map_err(ClientError::Io)?;
                last = Some(ev);
            }
        }
        Ok(last.filter(|ev| matches!(ev, ExecEvent::Exit { .. } | ExecEvent::Error { .. })))
    }

    /// `PUT /v1/vms/NAME/files?path=…&mode=…`: writes `data` to the
    /// absolute path `path` on VM `name` with the permission bits `mode`.
    /// The default timeout grows with the size
    /// ([`DEFAULT_COPY_TIMEOUT_PER_MIB`]).
    pub fn put_file(
        &self,
        name: &str,
        path: &str,
        data: Vec<u8>,
        mode: u32,
    ) -> Result<FileWritten, ClientError> {
        let uri = with_query(
            &vm_path(name, "files"),
            &[("path", path), ("mode", &format!("{:04o}", mode & 0o7777))],
        );
        let limit = self.request_timeout.limit_copy(data.len() as u64);
        let (status, body) = self.within(limit, async {
            let req = super::request("PUT", &uri)?
                .header(CONTENT_TYPE, "application/octet-stream")
                .body(Full::new(Bytes::from(data)))
                .map_err(|e| ClientError::Protocol(format!("bad request {uri:?}: {e}")))?;
            let resp = self.send_request(req).await?;
            let status = resp.status().as_u16();
            Ok((status, collect(resp.into_body()).await?))
        })?;
        decode(status, &body)
    }

    /// `GET /v1/vms/NAME/files?path=…`: the file `path` of VM `name`, with
    /// its mode.
    pub fn get_file(&self, name: &str, path: &str) -> Result<RemoteFile, ClientError> {
        let uri = with_query(&vm_path(name, "files"), &[("path", path)]);
        let limit = self.request_timeout.limit_copy(MAX_COPY_BYTES);
        let (status, mode, body) = self.within(limit, async {
            let resp = self.exchange("GET", &uri, Vec::new()).await?;
            let status = resp.status().as_u16();
            let mode = resp
                .headers()
                .get(FILE_MODE_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| u32::from_str_radix(v, 8).ok());
            Ok((status, mode, collect(resp.into_body()).await?))
        })?;
        if status >= 400 {
            return decode::<serde_json::Value>(status, &body).and_then(|_| {
                Err(ClientError::Protocol(format!(
                    "HTTP {status} without an error"
                )))
            });
        }
        let mode =
            mode.ok_or_else(|| ClientError::Protocol(format!("no {FILE_MODE_HEADER} header")))?;
        Ok(RemoteFile {
            data: body.to_vec(),
            mode,
        })
    }

    /// `POST /v1/images/inspect`: what the agent makes of the image file at
    /// the absolute `path` on its host.
    pub fn inspect_image(&self, path: &str) -> Result<ImageInfo, ClientError> {
        let req = InspectRequest {
            path: path.to_owned(),
        };
        self.call("POST", &api_path(&["images", "inspect"]), Some(&req))
    }
}

/// Copies `from` to `to` until `from` ends, each piece written whole as
/// soon as it is read; returns the bytes copied.
///
/// Not `std::io::copy`: on Linux it moves bytes between a socket and a
/// pipe with splice(2), and a splice from a blocking socket into a pipe
/// holds the pipe's lock while it waits for the socket. ssh, reading that
/// pipe (our stdout) for bytes already in it, then blocks uninterruptibly
/// until the guest sends more, which the guest does only once ssh has
/// answered: the session hung right after the first exchange.
pub fn relay(mut from: impl std::io::Read, mut to: impl std::io::Write) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
        total += n as u64;
    }
}

/// The whole body.
async fn collect(body: Incoming) -> Result<Bytes, ClientError> {
    Ok(body
        .collect()
        .await
        .map_err(|e| hyper_error(e, "in the middle of its answer"))?
        .to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cp_paths_with_special_characters_reach_the_agent_intact() {
        assert_eq!(
            with_query("/v1/vms/a/files", &[("path", "/tmp/a b&c=d#e?f%")]),
            "/v1/vms/a/files?path=%2Ftmp%2Fa%20b%26c%3Dd%23e%3Ff%25"
        );
    }

    #[test]
    fn the_tunnel_relays_a_mebibyte_both_ways_intact() {
        use std::os::unix::net::UnixStream;
        let (a, b) = UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            super::relay(&sent[..], &a).unwrap();
            a.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        super::relay(&b, &mut got).unwrap();
        writer.join().unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "the bytes arrive unchanged and in order");
    }

    #[test]
    fn copies_get_time_by_size_unless_a_timeout_is_given() {
        let d = RequestTimeout::Default.limit_copy(10 << 20).unwrap();
        assert_eq!(
            d,
            super::super::DEFAULT_REQUEST_TIMEOUT + 10 * DEFAULT_COPY_TIMEOUT_PER_MIB
        );
        assert_eq!(
            RequestTimeout::Limit(Duration::from_secs(3)).limit_copy(10 << 20),
            Some(Duration::from_secs(3))
        );
        assert_eq!(RequestTimeout::Unlimited.limit_copy(1), None);
    }
}
