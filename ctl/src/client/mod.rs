//! The client of the agent's API: typed methods over HTTP/1.1 (hyper) on
//! the agent's Unix socket or, for a remote agent (`--server`, a context),
//! over TCP with mutual TLS (tokio-rustls), with connect and request
//! timeouts that name the agent, and the local agent's auto-start.
//!
//! This module is the only place that knows the API's paths: commands call
//! [`Client::get`], [`Client::list`], [`Client::apply`], [`Client::watch`],
//! [`Client::await_condition`] and the like. The client is blocking: it
//! owns a small tokio runtime that drives hyper, so commands stay plain
//! synchronous code.

pub mod streams;
mod wait;
mod wire;

pub use wait::{Awaited, States};
pub use wire::{LogSource, LogStart, NoteIn, Watch, WatchEvent, WatchItem};

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use vmctl_api::wire::{ApplyRequest, ApplyResponse, ErrorBody, Health, ObjectList};
use vmctl_api::{Kind, Object, ObjectRef};

/// How long a request may take when `--request-timeout` is not given: from
/// connecting until the whole answer of a non-streaming call is read, or
/// until the head of a streaming one arrives.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What the default timeout allows an apply for each object it carries on
/// top of [`DEFAULT_REQUEST_TIMEOUT`] (10,000 objects: 100 s more): the
/// agent answers once it has stored them all.
pub const DEFAULT_APPLY_TIMEOUT_PER_OBJECT: Duration = Duration::from_millis(10);

/// How long one request may take (`--request-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestTimeout {
    /// Not given: [`DEFAULT_REQUEST_TIMEOUT`], and for an apply
    /// [`DEFAULT_APPLY_TIMEOUT_PER_OBJECT`] more per object.
    Default,
    /// Given: exactly this long for any request.
    Limit(Duration),
    /// `0`: no limit.
    Unlimited,
}

impl RequestTimeout {
    /// From `--request-timeout`: absent is the default, zero no limit.
    pub fn from_arg(arg: Option<Duration>) -> Self {
        match arg {
            None => RequestTimeout::Default,
            Some(d) if d.is_zero() => RequestTimeout::Unlimited,
            Some(d) => RequestTimeout::Limit(d),
        }
    }

    /// The limit of a request that carries `objects` objects (`None`: no
    /// limit).
    fn limit(self, objects: usize) -> Option<Duration> {
        match self {
            RequestTimeout::Default => Some(
                DEFAULT_REQUEST_TIMEOUT
                    + DEFAULT_APPLY_TIMEOUT_PER_OBJECT
                        .saturating_mul(u32::try_from(objects).unwrap_or(u32::MAX)),
            ),
            RequestTimeout::Limit(d) => Some(d),
            RequestTimeout::Unlimited => None,
        }
    }
}

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
    /// Something accepted the connection but gave no (complete) answer in
    /// time: a hung or overloaded agent.
    #[error("the vmctl agent on {agent} did not answer within {}", seconds(*after))]
    Timeout {
        /// The socket path or `https://HOST:PORT`.
        agent: String,
        /// The request timeout that passed.
        after: Duration,
        /// The agent's log file (a local agent's only).
        log: Option<PathBuf>,
    },
    /// Nothing accepts TCP connections at a remote agent's address.
    #[error("no vmctl agent answers at {server}: {why}")]
    RemoteUnreachable {
        /// `https://HOST:PORT`.
        server: String,
        /// The connection's error.
        why: String,
    },
    /// The TLS handshake with a remote agent failed: it refused this
    /// client's certificate, or its own did not verify.
    #[error("the TLS handshake with {server} failed: {why}")]
    Handshake {
        /// `https://HOST:PORT`.
        server: String,
        /// rustls' reason.
        why: String,
    },
    /// The certificates of the context (or flags) cannot be used.
    #[error("the TLS settings for {server} cannot be used")]
    TlsFiles {
        /// `https://HOST:PORT`.
        server: String,
        /// Why.
        #[source]
        source: vmctl_tls::TlsError,
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
    /// The agent this command started (no agent answered) exited or did
    /// not answer in time; `why` says which, with the end of what it wrote
    /// to its log.
    #[error("the vmctl agent this command started {why}")]
    StartFailed {
        /// The agent's log file.
        log: PathBuf,
        /// `exited with code 1 before it answered: …` or `did not answer
        /// on SOCKET within 30 s`.
        why: String,
    },
    /// The agent program is not where `vmctl` looks for it (see
    /// [`agent_program`]).
    #[error("the vmctl agent program is not installed: {} {why}", path.display())]
    AgentNotInstalled {
        /// Where it was looked for: `vmctl-agent` next to this `vmctl`.
        path: PathBuf,
        /// What is wrong there (`does not exist`, `is not executable`).
        why: String,
    },
}

/// `10 s`, `0.5 s`.
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

impl ClientError {
    /// The diagnostic code: for an API error, the agent's own code.
    pub fn code(&self) -> &str {
        match self {
            ClientError::Unreachable { .. } => "vmctl::agent::unreachable",
            ClientError::Timeout { .. } => "vmctl::agent::timeout",
            ClientError::RemoteUnreachable { .. } => "vmctl::agent::unreachable",
            ClientError::Handshake { .. } => "vmctl::tls::handshake",
            ClientError::TlsFiles { .. } => "vmctl::tls::files",
            ClientError::Api { body, .. } if !body.code.is_empty() => &body.code,
            ClientError::Api { .. } => "vmctl::agent::error",
            ClientError::Io(_) | ClientError::HungUp(_) => "vmctl::agent::io",
            ClientError::Protocol(_) => "vmctl::agent::protocol",
            ClientError::AgentNotInstalled { .. } => "vmctl::agent::not_installed",
            ClientError::StartFailed { .. } => "vmctl::agent::start_failed",
        }
    }

    /// Whether this is the agent's 404 (`vmctl::api::not_found` and the like).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Api { status: 404, .. })
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
            ClientError::StartFailed { log, .. } => Some(Box::new(format!(
                "its log is {}: fix what it says and run the command again; `vmctl agent` runs one in the foreground, its output on the terminal",
                log.display()
            ))),
            ClientError::Timeout { log: Some(log), .. } => Some(Box::new(format!(
                "see its log, {}; if it is only busy, raise --request-timeout (0: no limit)",
                log.display()
            ))),
            ClientError::Timeout { log: None, .. } => Some(Box::new(
                "see the agent's log on its host; if it is only busy, raise --request-timeout (0: no limit)",
            )),
            ClientError::Handshake { .. } => Some(Box::new(
                "the client certificate (the context's client-certificate, or --client-certificate) \
                 must be issued by the cluster's CA (`vmctl cluster issue user NAME`), the \
                 certificate-authority must be that CA's ca.crt, and the agent's certificate must \
                 name the host of --server (`vmctl cluster issue agent NAME --address HOST`)",
            )),
            ClientError::TlsFiles { .. } => Some(Box::new(
                "check the context's certificate-authority, client-certificate and client-key \
                 (`vmctl config get-contexts -o yaml`), or reissue them with `vmctl cluster issue user`",
            )),
            ClientError::RemoteUnreachable { .. } => Some(Box::new(
                "check the address (--server, or the context's server: `vmctl config get-contexts`) \
                 and that the agent there runs with --listen on it; vmctl never starts a remote agent",
            )),
            ClientError::Api { help: Some(h), .. } => Some(Box::new(h)),
            _ => vmctl_api::codes::help(ClientError::code(self))
                .map(|h| Box::new(h) as Box<dyn std::fmt::Display>),
        }
    }
}

/// A connection target: the agent's socket or TLS address, the request
/// timeout, and the runtime that drives the connections. Cheap to clone
/// (clones share the runtime).
#[derive(Debug, Clone)]
pub struct Client {
    /// The socket path (of a local agent; for a remote one, unused).
    pub socket: PathBuf,
    /// A remote agent, reached over TLS instead of the socket.
    remote: Option<Arc<Remote>>,
    /// The agent's log, named in errors.
    log: PathBuf,
    /// The request timeout.
    request_timeout: RequestTimeout,
    rt: Arc<tokio::runtime::Runtime>,
    /// The agent's first `/v1/healthz` answer (kept by [`Client::ping`]).
    first_health: Arc<std::sync::OnceLock<Health>>,
}

/// A response whose body has not been read yet.
#[derive(Debug)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    body: Incoming,
    rt: Arc<tokio::runtime::Runtime>,
}

/// A remote agent: where it is, and the TLS connector with this user's
/// certificate.
struct Remote {
    /// `https://HOST:PORT`.
    server: String,
    host: String,
    port: u16,
    /// What the agent's certificate must name.
    name: vmctl_tls::ServerNameOwned,
    connector: vmctl_tls::TlsConnector,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Remote {
    /// [`ClientError::Handshake`] when `e` is (or was caused by) a TLS
    /// error: with TLS 1.3 the agent refuses a client certificate after
    /// the client's side of the handshake is done, so the refusal arrives
    /// as an alert on the first read.
    fn refused(&self, e: &(dyn std::error::Error + 'static)) -> Option<ClientError> {
        let mut source = Some(e);
        while let Some(s) = source {
            let tls = s.downcast_ref::<vmctl_tls::rustls::Error>().or_else(|| {
                s.downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .and_then(|inner| inner.downcast_ref::<vmctl_tls::rustls::Error>())
            });
            if let Some(t) = tls {
                return Some(ClientError::Handshake {
                    server: self.server.clone(),
                    why: vmctl_tls::explain(t),
                });
            }
            source = s.source();
        }
        None
    }

    /// [`ClientError::Handshake`] when a TLS error caused `e`, else
    /// [`hyper_error`]`(e, when)`.
    fn or_refused(&self, e: hyper::Error, when: &str) -> ClientError {
        self.refused(&e).unwrap_or_else(|| hyper_error(e, when))
    }
}

/// Maps hyper's errors: a connection the agent closed or reset before its
/// answer was complete is [`ClientError::HungUp`] (`when` says at which
/// point); a write it stopped reading is "while it was sent the request".
fn hyper_error(e: hyper::Error, when: &str) -> ClientError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                BrokenPipe => ClientError::HungUp(format!("while it was sent the request ({io})")),
                ConnectionReset | UnexpectedEof => ClientError::HungUp(format!("{when} ({io})")),
                kind => ClientError::Io(std::io::Error::new(kind, io.to_string())),
            };
        }
        source = s.source();
    }
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return ClientError::HungUp(when.into());
    }
    ClientError::Protocol(vmctl_api::error_chain(&e))
}

impl Response {
    /// The next piece of the body as it arrives; `None` at its end. No
    /// timeout: streams (watch, follow) may be quiet for long.
    ///
    /// Errors: [`ClientError::HungUp`] when the connection ends before the
    /// body does.
    pub fn chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        let rt = self.rt.clone();
        rt.block_on(self.chunk_async())
    }

    async fn chunk_async(&mut self) -> Result<Option<Bytes>, ClientError> {
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(hyper_error(e, "in the middle of its answer")),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// Reads the whole body; fails if the connection ends before it does.
    pub fn body(mut self) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        while let Some(c) = self.chunk()? {
            out.extend_from_slice(&c);
        }
        Ok(out)
    }

    /// Calls `f` with each line (without its newline) of a line-delimited
    /// stream until it returns false or the stream ends.
    pub fn lines(mut self, mut f: impl FnMut(&[u8]) -> bool) -> Result<(), ClientError> {
        let mut pending = Vec::new();
        while let Some(c) = self.chunk()? {
            pending.extend_from_slice(&c);
            while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                if !f(&line[..line.len() - 1]) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// Characters of a path segment or query value sent as they are: RFC
/// 3986's unreserved ones. Everything else is percent-encoded.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `/v1/` followed by the percent-encoded `segments`.
fn api_path(segments: &[&str]) -> String {
    let mut p = String::from("/v1");
    for s in segments {
        p.push('/');
        p.extend(utf8_percent_encode(s, UNRESERVED));
    }
    p
}

/// A request to the agent: `method path` with its `Host` header.
fn request(method: &str, path: &str) -> Result<hyper::http::request::Builder, ClientError> {
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|e| ClientError::Protocol(format!("bad method {method:?}: {e}")))?;
    Ok(Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, "vmctl"))
}

/// A query value, percent-encoded.
fn query_value(v: &str) -> String {
    utf8_percent_encode(v, UNRESERVED).to_string()
}

impl Client {
    /// A client of the agent on `socket` (whose log is `log`, named in
    /// errors).
    ///
    /// Errors: [`ClientError::Io`] when the runtime cannot be created.
    pub fn new(
        socket: &Path,
        log: &Path,
        request_timeout: RequestTimeout,
    ) -> Result<Self, ClientError> {
        // One worker thread drives the connections even while the caller
        // is busy between reads of a stream.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(ClientError::Io)?;
        Ok(Client {
            socket: socket.to_path_buf(),
            remote: None,
            log: log.to_path_buf(),
            request_timeout,
            rt: Arc::new(rt),
            first_health: Arc::default(),
        })
    }

    /// A client of the remote agent `remote` over mutual TLS.
    ///
    /// Errors: [`ClientError::TlsFiles`] when its certificates cannot be
    /// used; [`ClientError::Io`] when the runtime cannot be created.
    pub fn over_tls(
        remote: &crate::contexts::Remote,
        request_timeout: RequestTimeout,
    ) -> Result<Self, ClientError> {
        let files = |source| ClientError::TlsFiles {
            server: remote.server.clone(),
            source,
        };
        let config = vmctl_tls::client_config(&remote.identity).map_err(files)?;
        let name = vmctl_tls::server_name(&remote.host).map_err(files)?;
        let mut client = Client::new(Path::new(""), Path::new(""), request_timeout)?;
        client.remote = Some(Arc::new(Remote {
            server: remote.server.clone(),
            host: remote.host.clone(),
            port: remote.port,
            name,
            connector: vmctl_tls::TlsConnector::from(config),
        }));
        Ok(client)
    }

    /// The agent, as errors name it: its socket or `https://HOST:PORT`.
    pub fn agent(&self) -> String {
        match &self.remote {
            Some(r) => r.server.clone(),
            None => self.socket.display().to_string(),
        }
    }

    /// Whether this client talks to a remote agent over TLS.
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    fn timeout_error(&self, after: Duration) -> ClientError {
        ClientError::Timeout {
            agent: self.agent(),
            after,
            log: self.remote.is_none().then(|| self.log.clone()),
        }
    }

    /// Runs `fut` to completion within the timeout of a request that
    /// carries `objects` objects.
    fn timed<T>(
        &self,
        objects: usize,
        fut: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        self.within(self.request_timeout.limit(objects), fut)
    }

    /// Runs `fut` to completion within `limit` (`None`: no limit).
    fn within<T>(
        &self,
        limit: Option<Duration>,
        fut: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        self.rt.block_on(async {
            match limit {
                Some(t) => tokio::time::timeout(t, fut)
                    .await
                    .unwrap_or_else(|_| Err(self.timeout_error(t))),
                None => fut.await,
            }
        })
    }

    /// Connects, sends one JSON request and waits for the head of its
    /// answer.
    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let req = request(method, path)?
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Protocol(format!("bad request {path:?}: {e}")))?;
        self.send_request(req).await
    }

    /// Connects, sends `req` and waits for the head of its answer. The
    /// connection is driven with upgrades (a console or tunnel takes it
    /// over after `101 Switching Protocols`).
    async fn send_request(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let mut sender = match &self.remote {
            None => {
                let stream = tokio::net::UnixStream::connect(&self.socket)
                    .await
                    .map_err(ClientError::Io)?;
                self.handshake(stream)
                    .await
                    .map_err(|e| hyper_error(e, "before the request was sent"))?
                    .0
            }
            Some(r) => {
                let tcp = tokio::net::TcpStream::connect((r.host.as_str(), r.port))
                    .await
                    .map_err(|e| ClientError::RemoteUnreachable {
                        server: r.server.clone(),
                        why: e.to_string(),
                    })?;
                let _ = tcp.set_nodelay(true);
                let tls = r
                    .connector
                    .connect(r.name.clone(), tcp)
                    .await
                    .map_err(|e| r.refused(&e).unwrap_or(ClientError::Io(e)))?;
                let (mut sender, conn_error) = self
                    .handshake(tls)
                    .await
                    .map_err(|e| r.or_refused(e, "before the request was sent"))?;
                return match sender.send_request(req).await {
                    Ok(resp) => Ok(resp),
                    // The request may only hear "connection closed" while
                    // the connection itself failed on the agent's TLS
                    // alert (a refused certificate): that says why.
                    Err(e) => {
                        let conn = tokio::time::timeout(Duration::from_millis(500), conn_error)
                            .await
                            .ok()
                            .and_then(Result::ok);
                        Err(conn
                            .and_then(|c| r.refused(&c))
                            .unwrap_or_else(|| r.or_refused(e, "without answering")))
                    }
                };
            }
        };
        sender
            .send_request(req)
            .await
            .map_err(|e| hyper_error(e, "without answering"))
    }

    /// HTTP/1.1 on `io`, its connection driven (with upgrades) by the
    /// client's runtime; the receiver gets the connection's error if it
    /// fails.
    async fn handshake<IO>(
        &self,
        io: IO,
    ) -> Result<
        (
            hyper::client::conn::http1::SendRequest<Full<Bytes>>,
            tokio::sync::oneshot::Receiver<hyper::Error>,
        ),
        hyper::Error,
    >
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.rt.spawn(async move {
            // Its errors reach the request or the body reader, and `rx`.
            if let Err(e) = conn.with_upgrades().await {
                let _ = tx.send(e);
            }
        });
        Ok((sender, rx))
    }

    /// Sends a request and waits (within the request timeout) for the head
    /// of the answer; the body is read as it comes, without a timeout.
    /// Commands use the typed methods; this is for streams.
    fn send(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response, ClientError> {
        let body = body.map(<[u8]>::to_vec).unwrap_or_default();
        let resp = self.timed(0, self.exchange(method, path, body))?;
        Ok(Response {
            status: resp.status().as_u16(),
            body: resp.into_body(),
            rt: self.rt.clone(),
        })
    }

    /// Sends a JSON request and decodes a JSON answer, all within the
    /// request timeout, turning error statuses into [`ClientError::Api`].
    /// Commands use the typed methods.
    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        self.call_sized(method, path, body, 0)
    }

    /// [`Client::call`] for a request that carries `objects` objects.
    fn call_sized<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
        objects: usize,
    ) -> Result<T, ClientError> {
        let bytes = body
            .map(|b| serde_json::to_vec(b).expect("requests serialise"))
            .unwrap_or_default();
        self.call_bytes(method, path, bytes, objects)
    }

    /// [`Client::call_sized`] with the body already serialised.
    fn call_bytes<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        bytes: Vec<u8>,
        objects: usize,
    ) -> Result<T, ClientError> {
        let (status, body) = self.call_raw(method, path, bytes, objects)?;
        decode(status, &body)
    }

    /// Sends a request and reads its whole answer within the request
    /// timeout: its status and body.
    fn call_raw(
        &self,
        method: &str,
        path: &str,
        bytes: Vec<u8>,
        objects: usize,
    ) -> Result<(u16, Bytes), ClientError> {
        self.timed(objects, async {
            let resp = self.exchange(method, path, bytes).await?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| hyper_error(e, "in the middle of its answer"))?
                .to_bytes();
            Ok((status, body))
        })
    }

    /// Whether an agent answers: `Ok(false)` when nothing listens on the
    /// socket (or it hangs up at once).
    ///
    /// Errors: [`ClientError::Timeout`] when something accepts but does not
    /// answer in time.
    pub fn ping(&self) -> Result<bool, ClientError> {
        match self.health() {
            Ok(h) => {
                let _ = self.first_health.set(h);
                Ok(true)
            }
            Err(e @ ClientError::Timeout { .. }) => Err(e),
            Err(_) => Ok(false),
        }
    }

    /// `GET /v1/healthz`: the agent's version, driver and store, also
    /// while its store is unavailable (the agent answers 503 with the same
    /// body; `store_error` says why).
    pub fn health(&self) -> Result<Health, ClientError> {
        let (status, body) = self.call_raw("GET", &api_path(&["healthz"]), Vec::new(), 0)?;
        if status == 503
            && let Ok(h) = serde_json::from_slice::<Health>(&body)
        {
            return Ok(h);
        }
        decode(status, &body)
    }

    /// The agent's `/v1/healthz` answer from when this client connected
    /// ([`connect`] pings it), asked now only when there was none. For
    /// what an agent keeps while it runs (version, driver, data
    /// directory); `lastSeq` and the store's state need [`health`](Self::health).
    pub fn connected_health(&self) -> Result<Health, ClientError> {
        if let Some(h) = self.first_health.get() {
            return Ok(h.clone());
        }
        let h = self.health()?;
        Ok(self.first_health.get_or_init(|| h).clone())
    }

    /// `GET /v1/objects/KIND/NAME`. Errors: the agent's 404
    /// ([`ClientError::is_not_found`]) when there is no such object.
    pub fn get(&self, kind: Kind, name: &str) -> Result<Object, ClientError> {
        self.call(
            "GET",
            &api_path(&["objects", kind.short(), name]),
            None::<&()>,
        )
    }

    /// Like [`Client::get`], with `None` for an object that does not exist.
    pub fn get_opt(&self, kind: Kind, name: &str) -> Result<Option<Object>, ClientError> {
        match self.get(kind, name) {
            Ok(o) => Ok(Some(o)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /v1/objects[/KIND][?labels=k=v,…]`: every object (of `kind`)
    /// with all the `labels` (`key=value`), and the store's
    /// resourceVersion to watch from.
    pub fn list(&self, kind: Option<Kind>, labels: &[String]) -> Result<ObjectList, ClientError> {
        let mut path = match kind {
            Some(k) => api_path(&["objects", k.short()]),
            None => api_path(&["objects"]),
        };
        if !labels.is_empty() {
            path.push_str("?labels=");
            path.push_str(&query_value(&labels.join(",")));
        }
        self.call("GET", &path, None::<&()>)
    }

    /// `POST /v1/apply`: creates or updates the request's objects (a dry
    /// run only reports what would change).
    ///
    /// Errors: a request over the agent's limit
    /// ([`vmctl_api::limits::MAX_APPLY_BODY_BYTES`]) is refused here
    /// with the agent's 413 `vmctl::api::payload_too_large`, unsent: the
    /// agent refuses it before reading it and closes the connection, and
    /// hyper reports that broken write rather than the answer.
    pub fn apply(&self, req: &ApplyRequest) -> Result<ApplyResponse, ClientError> {
        use vmctl_api::limits::{MAX_APPLY_BODY_BYTES, human_bytes};
        let bytes = serde_json::to_vec(req).expect("requests serialise");
        let size = bytes.len();
        if size > MAX_APPLY_BODY_BYTES {
            let body = ErrorBody {
                code: "vmctl::api::payload_too_large".into(),
                message: format!(
                    "the request body ({}) is over the agent's limit of {}; nothing was sent",
                    human_bytes(size as u64),
                    human_bytes(MAX_APPLY_BODY_BYTES as u64)
                ),
                help: Some(
                    "apply the objects in several smaller files; the limits are in the README and agent/openapi.json"
                        .into(),
                ),
            };
            return Err(ClientError::Api {
                status: 413,
                help: body.help.clone(),
                body,
            });
        }
        self.call_bytes("POST", &api_path(&["apply"]), bytes, req.objects.len())
    }

    /// `DELETE /v1/objects/KIND/NAME`: requests deletion. Returns the object
    /// while finalizers keep it (Terminating), `None` once it is gone.
    pub fn delete(&self, kind: Kind, name: &str) -> Result<Option<Object>, ClientError> {
        self.call(
            "DELETE",
            &api_path(&["objects", kind.short(), name]),
            None::<&()>,
        )
    }

    /// `PATCH /v1/objects/KIND/NAME`: adds or removes finalizers. Returns the
    /// object after the change, `None` when removing the last finalizer of
    /// a Terminating object deleted it.
    pub fn patch(
        &self,
        kind: Kind,
        name: &str,
        patch: &vmctl_api::wire::PatchRequest,
    ) -> Result<Option<Object>, ClientError> {
        self.call(
            "PATCH",
            &api_path(&["objects", kind.short(), name]),
            Some(patch),
        )
    }

    /// `GET /v1/history/KIND/NAME`: every recorded event of the object,
    /// oldest first (the store's `Event` as JSON); empty when it was never
    /// recorded.
    pub fn history(&self, kind: Kind, name: &str) -> Result<Vec<serde_json::Value>, ClientError> {
        self.call(
            "GET",
            &api_path(&["history", kind.short(), name]),
            None::<&()>,
        )
    }

    /// `GET /v1/notes[/KIND/NAME]`: the notes controllers recorded (about
    /// one object), oldest first.
    pub fn notes(&self, object: Option<&ObjectRef>) -> Result<Vec<NoteIn>, ClientError> {
        let path = match object {
            Some(r) => api_path(&["notes", r.kind.short(), &r.name]),
            None => api_path(&["notes"]),
        };
        self.call("GET", &path, None::<&()>)
    }

    /// `GET /v1/watch?after=RV`: every change committed after the store's
    /// resourceVersion `after`, as it is committed. The head arrives within
    /// the request timeout; the stream itself has none.
    ///
    /// Errors: a 410 `vmctl::api::too_old` (see [`ClientError::is_gone`])
    /// when the log no longer reaches back to `after`: list again and watch
    /// from the listing's resourceVersion.
    pub fn watch(&self, after: u64) -> Result<Watch, ClientError> {
        let path = format!("{}?after={after}", api_path(&["watch"]));
        let resp = self.send("GET", &path, None)?;
        Watch::new(self.streamed(resp)?)
    }

    /// `GET /v1/logs/VM?source=…`: a VM's console or provision log from
    /// `start`, and with `follow` what is appended until the VM is
    /// deleted. The head arrives within the request timeout; the body has
    /// none.
    ///
    /// Errors: the agent's refusal (404 for an unknown VM, 409 when it has
    /// no work directory yet).
    pub fn logs(
        &self,
        vm: &str,
        source: LogSource,
        start: LogStart,
        follow: bool,
    ) -> Result<Response, ClientError> {
        let start = match start {
            LogStart::Tail(n) => format!("tail={n}"),
            LogStart::End => "skip_existing=true".to_owned(),
            LogStart::Offset(o) => format!("offset={o}"),
        };
        let path = format!(
            "{}?source={}&{start}&follow={follow}",
            api_path(&["logs", vm]),
            source.as_str()
        );
        let resp = self.send("GET", &path, None)?;
        self.streamed(resp)
    }

    /// A streamed answer, or its error status as [`ClientError::Api`].
    fn streamed(&self, resp: Response) -> Result<Response, ClientError> {
        if resp.status < 400 {
            return Ok(resp);
        }
        let status = resp.status;
        // The error body, within the request timeout (the timer is made
        // inside the runtime).
        let body = self.timed(0, async move {
            let mut resp = resp;
            let mut out = Vec::new();
            while let Some(c) = resp.chunk_async().await? {
                out.extend_from_slice(&c);
            }
            Ok(out)
        })?;
        decode::<serde_json::Value>(status, &body).map(|_| unreachable!("an error status"))
    }
}

impl ClientError {
    /// Whether this is the agent's 410 (`vmctl::api::too_old`): the watch
    /// asked for history that is compacted away.
    pub fn is_gone(&self) -> bool {
        matches!(self, ClientError::Api { status: 410, .. })
    }
}

/// Decodes a JSON answer; an error status becomes [`ClientError::Api`].
fn decode<T: DeserializeOwned>(status: u16, body: &[u8]) -> Result<T, ClientError> {
    if status >= 400 {
        let err: ErrorBody = serde_json::from_slice(body).map_err(|_| {
            ClientError::Protocol(format!("HTTP {status}: {}", String::from_utf8_lossy(body)))
        })?;
        return Err(ClientError::Api {
            status,
            help: err.help.clone(),
            body: err,
        });
    }
    serde_json::from_slice(body).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Parses `--request-timeout`: kubectl's form, a number with a unit (`10s`,
/// `2m`, `1h30m`) or plain seconds (`10`); zero means no limit.
pub fn parse_request_timeout(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(s.trim())
            .map_err(|e| format!("{e}; write a duration such as 10s, 2m, or 0 for no limit")),
    }
}

/// How long [`connect`] waits for an agent it started (or one another
/// `vmctl` started at the same moment) to answer, in seconds.
pub const AUTOSTART_WAIT_SECS: u64 = 30;

pub use vmctl_agent_args::EXIT_AGENT_LOCKED;

/// The agent program: `vmctl-agent` ([`vmctl_agent_args::AGENT_BIN`]) in
/// the directory of the running `vmctl` (symlinks resolved), as `cargo
/// build` and `cargo install` put them. The agent is a program of its own
/// so that `vmctl` links none of its controllers.
///
/// Errors: [`ClientError::AgentNotInstalled`] naming the path looked at
/// when nothing executable is there; [`ClientError::Io`] when the running
/// program's path is unknown.
pub fn agent_program() -> Result<PathBuf, ClientError> {
    use std::os::unix::fs::PermissionsExt as _;
    let exe = std::env::current_exe().map_err(ClientError::Io)?;
    let path = exe
        .parent()
        .unwrap_or(Path::new("/"))
        .join(vmctl_agent_args::AGENT_BIN);
    let why = match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Ok(path),
        Ok(_) => "is not an executable file".to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist".to_owned(),
        Err(e) => format!("cannot be read ({e})"),
    };
    Err(ClientError::AgentNotInstalled { path, why })
}

/// Connects to the remote agent `remote` over mutual TLS and asks its
/// `/v1/healthz`; never starts an agent.
///
/// Errors: [`ClientError::TlsFiles`] when the certificates cannot be used,
/// [`ClientError::RemoteUnreachable`] when nothing accepts at its address,
/// [`ClientError::Handshake`] when either side refuses the other's
/// certificate, [`ClientError::Timeout`] when it does not answer in time.
pub fn connect_remote(
    remote: &crate::contexts::Remote,
    request_timeout: RequestTimeout,
) -> Result<Client, ClientError> {
    let client = Client::over_tls(remote, request_timeout)?;
    let h = client.health()?;
    let _ = client.first_health.set(h);
    Ok(client)
}

/// Connects to the agent, starting one in the background when none answers
/// (unless `autostart` is false), and waits up to [`AUTOSTART_WAIT_SECS`]
/// for it. `request_timeout` bounds each request.
///
/// Several `vmctl` commands may start an agent at the same moment: one
/// takes the lock, the others exit at once with [`EXIT_AGENT_LOCKED`] while
/// the winner may still be opening its store, so that exit means "keep
/// waiting for the winner". Any other exit means the agent failed.
///
/// Errors: [`ClientError::Timeout`] when something accepts on the socket
/// but does not answer within the request timeout (a hung agent: no second
/// one is started); [`ClientError::Unreachable`] when no agent answers in
/// time and `autostart` is false; [`ClientError::StartFailed`] when the
/// agent it started exited (with the end of its log) or did not answer
/// within [`AUTOSTART_WAIT_SECS`];
/// [`ClientError::Io`] when the data directory, the log or the process
/// cannot be created.
pub fn connect(
    data_dir: &Path,
    socket: &Path,
    autostart: bool,
    request_timeout: RequestTimeout,
) -> Result<Client, ClientError> {
    let log = data_dir.join("agent.log");
    let client = Client::new(socket, &log, request_timeout)?;
    if client.ping()? {
        return Ok(client);
    }
    let unreachable = || ClientError::Unreachable {
        socket: socket.to_path_buf(),
        log: log.clone(),
    };
    if !autostart {
        return Err(unreachable());
    }
    // Before anything is created: a missing program changes nothing.
    let agent = agent_program()?;
    std::fs::create_dir_all(data_dir).map_err(ClientError::Io)?;
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(ClientError::Io)?;
    // Wakes the wait below when something happens to the socket's path
    // (an agent binds it: a hard link appears) or the started agent
    // exits; set up before the agent starts, so no event is missed.
    let (wake, woken) = std::sync::mpsc::channel::<Wake>();
    let watched = socket.to_path_buf();
    let fs_wake = wake.clone();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok_and(|ev| ev.paths.contains(&watched)) {
            let _ = fs_wake.send(Wake::Socket);
        }
    })
    .map_err(|e| ClientError::Io(std::io::Error::other(e)))?;
    // No directory, no socket: the agent fails to bind and exits, which
    // wakes the wait as well.
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = notify::Watcher::watch(&mut watcher, dir, notify::RecursiveMode::NonRecursive);
    }
    eprintln!("starting the vmctl agent (log: {})", log.display());
    // Where this agent's own lines start in the shared log.
    let log_start = logf.metadata().map(|m| m.len()).unwrap_or(0);
    let mut child = Command::new(agent)
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
    // The agent runs on after this vmctl: the thread only reports its
    // exit while we wait.
    std::thread::spawn(move || {
        if let Ok(status) = child.wait() {
            let _ = wake.send(Wake::Exited(status));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(AUTOSTART_WAIT_SECS);
    loop {
        if client.ping()? {
            return Ok(client);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match woken.recv_timeout(left) {
            Ok(Wake::Socket) => {}
            // Another agent holds the lock and is starting: wait for it to
            // bind the socket.
            Ok(Wake::Exited(status)) if status.code() == Some(EXIT_AGENT_LOCKED.into()) => {}
            // Found by the new-user tryout: this said only "no vmctl agent
            // answers" and advised dropping --no-autostart, which was not
            // given; the reason was in the log alone.
            Ok(Wake::Exited(status)) => {
                let how = match status.code() {
                    Some(c) => format!("exited with code {c}"),
                    None => format!("was killed ({status})"),
                };
                let why = match log_tail(&log, log_start) {
                    Some(tail) => format!("{how} before it answered:\n{tail}"),
                    None => format!("{how} before it answered, writing nothing to its log"),
                };
                return Err(ClientError::StartFailed {
                    log: log.clone(),
                    why,
                });
            }
            Err(_) => {
                return Err(ClientError::StartFailed {
                    log: log.clone(),
                    why: format!(
                        "did not answer on {} within {AUTOSTART_WAIT_SECS} s",
                        socket.display()
                    ),
                });
            }
        }
    }
}

/// The last lines (at most 8) the agent wrote to `log` after byte
/// `start`, unwrapped: a diagnostic's frame (`│`, indents) is dropped and
/// its wrapped lines are joined, so the error that shows them wraps them
/// once; `None` if it wrote nothing.
fn log_tail(log: &Path, start: u64) -> Option<String> {
    use std::io::{Read as _, Seek as _};
    let mut f = std::fs::File::open(log).ok()?;
    f.seek(std::io::SeekFrom::Start(start)).ok()?;
    let mut bytes = Vec::new();
    f.take(64 * 1024).read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<String> = Vec::new();
    for raw in text.lines() {
        let t = raw.trim_start_matches(|c: char| c.is_whitespace() || c == '│');
        let t = t.trim_end();
        if t.is_empty() {
            continue;
        }
        // A diagnostic's code (one word with `::`), its message (`×`),
        // its help, or anything unindented starts a line.
        let code = t.contains("::") && !t.contains(' ');
        let starts_one = code
            || ["×", "help:", "Error", "error"]
                .iter()
                .any(|m| t.starts_with(m))
            || !raw.starts_with(char::is_whitespace);
        match lines.last_mut() {
            Some(last) if !starts_one => {
                last.push(' ');
                last.push_str(t);
            }
            _ => lines.push(t.to_owned()),
        }
    }
    let tail = lines[lines.len().saturating_sub(8)..].join("\n");
    (!tail.is_empty()).then_some(tail)
}

/// What wakes [`connect`]'s wait for an agent it started.
enum Wake {
    /// The socket's path changed (an agent bound it).
    Socket,
    /// The started agent exited.
    Exited(std::process::ExitStatus),
}

use std::os::unix::process::CommandExt as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(
            api_path(&["objects", "vm", "a b/../c?d#e%"]),
            "/v1/objects/vm/a%20b%2F..%2Fc%3Fd%23e%25"
        );
        assert_eq!(query_value("app=web,tier=db"), "app%3Dweb%2Ctier%3Ddb");
    }

    #[test]
    fn request_timeout_takes_kubectls_forms() {
        assert_eq!(parse_request_timeout("0"), Ok(Duration::ZERO));
        assert_eq!(parse_request_timeout("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_request_timeout("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(
            parse_request_timeout("500ms"),
            Ok(Duration::from_millis(500))
        );
        assert!(parse_request_timeout("soon").is_err());
    }
}
