//! One SSH readiness probe: a fresh TCP connection, the server's banner,
//! the SSH handshake and the host key checked against the pinned one, each
//! bounded by one deadline. No authentication: the probe says that the
//! guest's sshd is there and is the VM's, not who may log in.
//!
//! With QEMU's user networking the host side accepts the TCP connection
//! before the guest listens (and retries the guest side with TCP backoff),
//! so a connect proves nothing and a long-lived attempt can stall for
//! seconds: the banner, peeked with a short deadline, is what says sshd is
//! there. The caller ([`crate::probe`]) starts fresh attempts on a short
//! period rather than waiting on one.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::connect::{self, Endpoint};
use super::error::SshError;
use crate::drivers::SshTarget;

/// What an SSH server sends first (RFC 4253, 4.2).
const BANNER: &[u8] = b"SSH-";

/// Probes `target` once within `timeout`: TCP connect, the `SSH-` banner
/// (peeked, so that the handshake on the same connection reads it again),
/// the handshake and the pinned host key.
///
/// Errors: [`SshError::Connect`] when nothing answers with a banner in
/// time (refused, closed, silent), [`SshError::Handshake`],
/// [`SshError::HostKeyMismatch`], and what resolving the target fails with
/// (no address, no work directory, no pinned key).
pub async fn probe_ssh(target: &SshTarget, timeout: Duration) -> Result<(), SshError> {
    let ep = Endpoint::resolve(target)?;
    let deadline = Instant::now() + timeout;
    let addr = ep.addr();
    let connect_err = |source| SshError::Connect {
        addr: addr.clone(),
        source,
    };
    let timed_out = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no {what} within {} ms", timeout.as_millis()),
        )
    };
    let tcp = tokio::time::timeout_at(deadline, TcpStream::connect((ep.host.as_str(), ep.port)))
        .await
        .map_err(|_| connect_err(timed_out("connection")))?
        .map_err(connect_err)?;
    let mut buf = [0u8; BANNER.len()];
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.peek(&mut buf))
            .await
            .map_err(|_| connect_err(timed_out("SSH banner")))?
            .map_err(connect_err)?;
        if n == 0 {
            return Err(connect_err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before the SSH banner",
            )));
        }
        if buf[..n] != BANNER[..n] {
            return Err(connect_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the server does not speak SSH",
            )));
        }
        if n == BANNER.len() {
            break;
        }
        // Part of the banner arrived: peek again once more is there.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let tcp = tcp.into_std().map_err(connect_err)?;
    tcp.set_nonblocking(false).map_err(connect_err)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    super::blocking(move || {
        let sess = ep.handshake(tcp, left)?;
        connect::disconnect(&sess);
        Ok(())
    })
    .await
}
