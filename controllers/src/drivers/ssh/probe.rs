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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::connect::{self, Endpoint};
use super::error::SshError;
use crate::drivers::SshTarget;

/// What an SSH server sends first (RFC 4253, 4.2).
const BANNER: &[u8] = b"SSH-";

/// Bound on a probe's handshake once the banner came: the key exchange and
/// the host key check. Generous, because only one probe of an address
/// shakes hands at a time (see [`probe_ssh`]) and a guest still booting
/// under TCG (OpenSSH re-executing itself per connection, cloud-init
/// running) can take seconds for it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Probes `target` once: TCP connect and the `SSH-` banner (peeked, so
/// that the handshake on the same connection reads it again) within
/// `timeout`, then the handshake and the pinned host key within
/// [`HANDSHAKE_TIMEOUT`] of the banner.
///
/// Two bounds, because they bound different things: the first, how long
/// one connection may sit unanswered (with QEMU's user networking a
/// connection opened before the guest listens can stall for seconds, so
/// the prober keeps it short while the guest boots and opens fresh
/// ones); the second, the guest's work once sshd is there (a key
/// exchange and a signature, slow on a busy TCG guest), which no fresh
/// connection would do sooner.
///
/// Errors: [`SshError::Connect`] when nothing answers with a banner in
/// time (refused, closed, silent), or (kind `WouldBlock`, at once) when
/// another probe of the address is shaking hands, [`SshError::Handshake`],
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
    let busy = || {
        connect_err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            "another probe of this address is shaking hands with its sshd",
        ))
    };
    // sshd answered another probe, which is shaking hands with it now: no
    // new connection (each one costs the guest an sshd process).
    let hs = handshakes(&addr);
    if hs.turn.try_lock().is_err() {
        return Err(busy());
    }
    let passed_before = hs.passed.load(Ordering::Acquire);
    // Read as the prober shows it, after "… timed out" is appended
    // (DriverError::Timeout): "Cannot connect to ADDR: the wait of 650 ms
    // for the SSH banner timed out".
    let timed_out = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the wait of {} ms for the {what}", timeout.as_millis()),
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
    tracing::debug!(vm = %ep.vm, %addr, "SSH banner seen");
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    // sshd is there. One handshake at a time per address, and none of
    // the other attempts waits for its turn: the prober has several in
    // flight while the guest boots, and when sshd comes up they all pass
    // the banner at once. Their handshakes would share the guest's CPU
    // (one vCPU under TCG), and connections held open waiting count
    // against sshd's MaxStartups (10 by default, sshd_config(5)) and keep
    // an sshd process each busy: with 16 of them a Debian cloud guest's
    // OpenSSH never finished a handshake in 10 minutes. So the others
    // close their connection at once (and new attempts make none, above)
    // while one shakes hands; the prober stops them all once it passed.
    // One that takes its turn after another's handshake passed (since
    // this one began) has its answer without shaking hands again.
    let Ok(turn) = hs.turn.clone().try_lock_owned() else {
        return Err(busy());
    };
    if hs.passed.load(Ordering::Acquire) != passed_before {
        tracing::debug!(vm = %ep.vm, "another probe's SSH handshake passed since the banner");
        return Ok(());
    }
    let tcp = tcp.into_std().map_err(connect_err)?;
    tcp.set_nonblocking(false).map_err(connect_err)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    super::blocking(move || {
        let _turn = turn;
        let sess = ep.handshake(tcp, left)?;
        // Before the turn is released (the end of this closure).
        hs.passed.fetch_add(1, Ordering::AcqRel);
        tracing::debug!(vm = %ep.vm, "SSH handshake done, host key pinned");
        connect::disconnect(&sess);
        Ok(())
    })
    .await
}

/// The probe handshakes with one address: whose turn it is, and how many
/// have passed.
#[derive(Debug, Default)]
struct Handshakes {
    turn: Arc<tokio::sync::Mutex<()>>,
    passed: AtomicU64,
}

/// The handshakes with `addr` (see [`Handshakes`]). One per address ever
/// probed (a few bytes each; addresses are reused).
fn handshakes(addr: &str) -> Arc<Handshakes> {
    static ALL: OnceLock<Mutex<HashMap<String, Arc<Handshakes>>>> = OnceLock::new();
    ALL.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(addr.to_owned())
        .or_default()
        .clone()
}

/// Output of an exec probe kept for its failure message, in bytes.
const PROBE_OUTPUT_LIMIT: usize = 4096;

/// Runs a readiness probe of the user's own on `target` once: an
/// authenticated SSH session, then the probe's command (passing when it
/// exits 0) or a `direct-tcpip` channel to the probe's port on the guest's
/// 127.0.0.1 (passing when the guest's sshd could connect to it: RFC 4254,
/// 7.2). `timeout` bounds each blocking SSH operation and the whole run.
///
/// Errors: [`SshError::ProbeFailed`] when the probe ran and did not pass
/// (the exit code and the output's last line, or the refusal), and the
/// connection errors of [`Endpoint::connect`] when it could not run.
pub async fn run_probe(
    target: &SshTarget,
    probe: &vmctl_api::Probe,
    timeout: Duration,
) -> Result<(), SshError> {
    let ep = Endpoint::resolve(target)?;
    let probe = probe.clone();
    let run = super::blocking(move || {
        let sess = ep.connect(timeout)?;
        sess.set_timeout(
            u32::try_from(timeout.as_millis())
                .unwrap_or(u32::MAX)
                .max(1),
        );
        let r = probe_on(&sess, &probe);
        connect::disconnect(&sess);
        r
    });
    tokio::time::timeout(timeout + Duration::from_millis(500), run)
        .await
        .unwrap_or_else(|_| {
            Err(SshError::ProbeFailed(format!(
                "no answer within {} s",
                timeout.as_secs_f64()
            )))
        })
}

/// [`run_probe`] on a connected session.
fn probe_on(sess: &ssh2::Session, probe: &vmctl_api::Probe) -> Result<(), SshError> {
    use std::io::Read as _;
    if let Some(t) = &probe.tcp_socket {
        return match sess.channel_direct_tcpip("127.0.0.1", t.port, None) {
            Ok(mut ch) => {
                let _ = ch.close();
                Ok(())
            }
            Err(e) => Err(SshError::ProbeFailed(format!(
                "port {} in the guest does not accept connections ({})",
                t.port,
                e.message()
            ))),
        };
    }
    let Some(exec) = &probe.exec else {
        return Err(SshError::ProbeFailed("the probe has nothing to run".into()));
    };
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        SshError::ProbeFailed(format!("could not {what}: {e}"))
    };
    let mut ch = sess
        .channel_session()
        .map_err(|e| failed("open a channel", &e))?;
    ch.handle_extended_data(ssh2::ExtendedData::Merge)
        .map_err(|e| failed("merge stderr", &e))?;
    ch.exec(&exec.command)
        .map_err(|e| failed("start the command", &e))?;
    ch.send_eof().map_err(|e| failed("close its stdin", &e))?;
    // The output is read to its end (the command ends only once it is
    // read), keeping its last PROBE_OUTPUT_LIMIT bytes.
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = ch.read(&mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                SshError::ProbeFailed("the command did not end within the probe's timeout".into())
            } else {
                failed("read its output", &e)
            }
        })?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.len() > PROBE_OUTPUT_LIMIT {
            out.drain(..out.len() - PROBE_OUTPUT_LIMIT);
        }
    }
    ch.wait_close()
        .map_err(|e| failed("close the channel", &e))?;
    let code = ch
        .exit_status()
        .map_err(|e| failed("read the exit status", &e))?;
    if code == 0 {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    Err(SshError::ProbeFailed(if last.is_empty() {
        format!("exited with code {code}")
    } else {
        format!("exited with code {code}: {last}")
    }))
}
