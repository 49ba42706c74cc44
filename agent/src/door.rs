//! Any agent is the door (issue 17): the API on TCP with mutual TLS, for
//! `vmctl --server` and other agents, beside the Unix socket.
//!
//! ```text
//!  TCP accept ──▶ permit (own cap) ──▶ TLS handshake (≤ header timeout)
//!                                        │ no client certificate, one of another CA,
//!                                        │ plaintext, timeout ──▶ closed, warn! with the peer
//!                                        ▼
//!                              the same router as the socket (crate::http)
//! ```
//!
//! Client certificates are required and must chain to the cluster CA of
//! `--tls-dir` (rustls' `WebPkiClientVerifier`); there is no plaintext
//! TCP. The files are read once, at start: a replaced certificate takes
//! effect when the agent restarts.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use vmctl_tls::TlsAcceptor;

use crate::config::DoorConfig;
use crate::http::{Incoming, Limits};

/// Why the TLS listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum DoorError {
    /// The TLS files of `--tls-dir` cannot be used.
    #[error("cannot use the TLS files in {}", dir.display())]
    Files {
        /// The directory.
        dir: std::path::PathBuf,
        /// Why.
        #[source]
        source: vmctl_tls::TlsError,
    },
    /// The address cannot be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl DoorError {
    /// What to do about it.
    pub fn help(&self) -> String {
        match self {
            DoorError::Files { dir, .. } => format!(
                "{} needs ca.crt, agent.crt and agent.key as `vmctl cluster issue agent NAME \
                 --address IP` writes them (in CLUSTER-DIR/agents/NAME): issue them and copy \
                 that directory here",
                dir.display()
            ),
            DoorError::Bind { .. } => "give --listen an address of this host and a free port \
                 (`ss -ltn` shows the ports in use)"
                .into(),
        }
    }
}

/// The TLS listener, bound.
pub struct Door {
    listener: TcpListener,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Door {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Door")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// Reads the TLS files of `cfg` and binds its address.
///
/// # Errors
/// [`DoorError::Files`] when a file is missing or unusable (nothing is
/// bound then), [`DoorError::Bind`] when the address is taken or not
/// this host's.
pub async fn bind(cfg: &DoorConfig) -> Result<Door, DoorError> {
    let id = vmctl_tls::Identity::agent_dir(&cfg.tls_dir);
    let config = vmctl_tls::server_config(&id).map_err(|source| DoorError::Files {
        dir: cfg.tls_dir.clone(),
        source,
    })?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| DoorError::Bind {
            addr: cfg.listen,
            source,
        })?;
    Ok(Door {
        listener,
        acceptor: TlsAcceptor::from(config),
    })
}

impl Door {
    /// The address bound (with the port the system chose for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

impl Incoming for Door {
    type Accepted = (TcpStream, SocketAddr);
    type Io = tokio_rustls::server::TlsStream<TcpStream>;

    async fn accept(&self) -> std::io::Result<Self::Accepted> {
        self.listener.accept().await
    }

    fn ready(
        &self,
        (tcp, peer): Self::Accepted,
        timeout: Duration,
    ) -> impl Future<Output = Option<Self::Io>> + Send + 'static {
        let acceptor = self.acceptor.clone();
        async move {
            let _ = tcp.set_nodelay(true);
            let accept = acceptor.accept(tcp).into_fallible();
            match tokio::time::timeout(timeout, accept).await {
                Ok(Ok(tls)) => Some(tls),
                Ok(Err((e, tcp))) => {
                    tracing::warn!(
                        %peer,
                        error = %vmctl_tls::explain_refusal(&e),
                        "TLS handshake refused"
                    );
                    linger(tcp).await;
                    None
                }
                Err(_) => {
                    tracing::warn!(
                        %peer,
                        timeout_s = timeout.as_secs(),
                        "TLS handshake refused: not done within the header timeout"
                    );
                    None
                }
            }
        }
    }
}

/// Closes a refused connection so that the client reads the TLS alert
/// that says why: our end is shut for writing (after the alert), and
/// what the client sent meanwhile (with TLS 1.3 its request follows its
/// half of the handshake at once) is read and dropped for up to 1 s.
/// Closed with unread data, the socket would answer with a reset, which
/// can overtake the alert.
async fn linger(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _ = tcp.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// Serves `app` on the socket `listener` and, when there is one, on the
/// TLS listener `door`, until `shutdown` resolves; each with the
/// connection limits of [`crate::http`] (a cap of its own).
pub async fn serve(
    listener: tokio::net::UnixListener,
    door: Option<Door>,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let Some(door) = door else {
        return crate::http::serve(listener, app, limits, shutdown).await;
    };
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let shutdown = async move {
        shutdown.await;
        let _ = tx.send(true);
    };
    let tls = crate::http::serve(door, app.clone(), limits.clone(), stopped());
    let unix = crate::http::serve(listener, app, limits, stopped());
    tokio::join!(shutdown, unix, tls);
}
