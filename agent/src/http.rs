//! Serving the API on the socket so that no client can starve the others:
//! a header read timeout (hyper), a cap on open connections (a semaphore
//! taken before accept), the file-descriptor limit raised at start, and a
//! bounded graceful shutdown. Body limits and body read timeouts are
//! layers of the router ([`crate::api`]).
//!
//! ```text
//!  permit (≤ max_connections) ──▶ accept ──▶ hyper http1 (header_read_timeout)
//!       ▲                                        │ axum Router (body timeout, limits)
//!       └──────────── released when the connection ends ◀┘
//! ```
//!
//! Connections beyond the cap wait in the kernel's listen backlog until a
//! permit is free; a connection that sends no complete header within the
//! timeout (idle keep-alive included) is closed, which frees its permit.
//!
//! The same loop serves the Unix socket and the TLS listener
//! ([`crate::door`]), each with its own cap: a connection is made ready
//! ([`Incoming::ready`]: a TLS handshake, within the header timeout) in
//! its own task, holding its permit, so a slow handshake stalls nothing.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

/// Where connections come from: the agent's Unix socket, or its TLS
/// listener ([`crate::door`]).
pub trait Incoming: Send {
    /// An accepted connection, before [`Incoming::ready`].
    type Accepted: Send + 'static;
    /// A connection ready for HTTP.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Accepts the next connection; cancel-safe (no connection is lost
    /// when the future is dropped).
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Accepted>> + Send;
    /// Makes an accepted connection ready within `timeout`; `None` (logged)
    /// when it cannot be, and it is closed.
    fn ready(
        &self,
        conn: Self::Accepted,
        timeout: Duration,
    ) -> impl Future<Output = Option<Self::Io>> + Send + 'static;
}

impl Incoming for UnixListener {
    type Accepted = tokio::net::UnixStream;
    type Io = tokio::net::UnixStream;

    async fn accept(&self) -> std::io::Result<Self::Accepted> {
        UnixListener::accept(self).await.map(|(s, _)| s)
    }

    fn ready(
        &self,
        conn: Self::Accepted,
        _: Duration,
    ) -> impl Future<Output = Option<Self::Io>> + Send + 'static {
        std::future::ready(Some(conn))
    }
}

/// Limits of the HTTP server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long a client may take to send a request's header (from the
    /// moment the connection is ready for one, idle time included).
    pub header_read_timeout: Duration,
    /// At most this many connections are served at once.
    pub max_connections: usize,
    /// How long shutdown waits for open requests and streams.
    pub shutdown_grace: Duration,
}

/// Default header read timeout: 10 s.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// File descriptors kept free for the store, QEMU sockets and logs.
const FD_RESERVE: u64 = 512;

/// The most connections served at once, whatever the descriptor limit.
const MAX_CONNECTIONS: u64 = 4096;

impl Limits {
    /// Limits for a process that may open `nofile` file descriptors: half
    /// of what the reserve leaves, at most 4,096 and at least 16. An idle
    /// connection costs a task and hyper's buffers (~10 KiB), so the cap
    /// bounds memory too; beyond it, a request waits until the header
    /// timeout closes an idle connection.
    pub fn for_nofile(nofile: u64) -> Self {
        let cap = (nofile.saturating_sub(FD_RESERVE) / 2).clamp(16, MAX_CONNECTIONS);
        Limits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connections: cap as usize,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns the limit
/// now in force (the soft limit as it was when raising fails).
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft >= hard {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => hard,
        Err(e) => {
            tracing::warn!(error = %e, soft, hard, "cannot raise the open-files limit");
            soft
        }
    }
}

/// Serves `app` on `listener` (the socket, or the TLS listener) until
/// `shutdown` resolves, then lets open requests finish for up to
/// `limits.shutdown_grace`.
pub async fn serve<L: Incoming>(
    listener: L,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut warned_full = false;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => {
                warned_full = false;
                p
            }
            Err(_) => {
                if !warned_full {
                    tracing::warn!(
                        max = limits.max_connections,
                        "connection limit reached; new connections wait"
                    );
                    warned_full = true;
                }
                tokio::select! {
                    // Cancel-safe: a dropped acquire only loses its place in line.
                    p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                    // Cancel-safe: the shutdown future is pinned and polled again.
                    () = &mut shutdown => break,
                }
            }
        };
        let stream = tokio::select! {
            // Cancel-safe: Incoming::accept loses no connection when dropped.
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and the like: wait for descriptors to be freed
                    // instead of spinning (as axum::serve does).
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let ready = listener.ready(stream, limits.header_read_timeout);
        let builder = builder.clone();
        let mut closing = closing_rx.clone();
        tokio::spawn(async move {
            let Some(stream) = ready.await else {
                drop(permit);
                return;
            };
            // With upgrades: the console and the SSH tunnel switch the
            // connection to a raw byte stream (`crate::streams`). hyper-util's
            // `GracefulShutdown` does not take an upgradeable HTTP/1
            // connection, so shutdown reaches it through `closing`.
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                // Cancel-safe: the pinned connection is polled again below.
                r = conn.as_mut() => r,
                // Cancel-safe: waiting for a watch value loses nothing.
                () = async {
                    let _ = closing.wait_for(|c| *c).await;
                } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    tokio::select! {
        // Both arms only wait; the tasks they wait for run on regardless.
        // Every open connection holds a permit until it ends.
        _ = permits.acquire_many(limits.max_connections as u32) => {}
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::info!("requests still open after the shutdown grace period; closing them");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_leaves_descriptors_for_the_agent() {
        assert_eq!(Limits::for_nofile(1024).max_connections, 256);
        assert_eq!(Limits::for_nofile(100).max_connections, 16);
        assert_eq!(Limits::for_nofile(20_000).max_connections, 4096);
        assert_eq!(Limits::for_nofile(4096).max_connections, 1792);
    }
}
