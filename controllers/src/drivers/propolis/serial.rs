//! The serial console of a Propolis VM, bridged to the files `vmctl log
//! --console` and `vmctl console` use with every backend.
//!
//! ```text
//!   propolis-server  GET /instance/serial?from_start=N  (WebSocket, binary frames)
//!        │  ▲
//!        ▼  │ typed bytes
//!   bridge task ──▶ console.log   (appended; serial.offset = bytes of this
//!        │  ▲                      instance already in it, so a reconnect
//!        ▼  │                      resumes without loss or repetition)
//!   serial.sock   (Unix socket: every client sees the output, its input
//!                  goes to the guest)
//! ```
//!
//! The bridge lives in the agent; a restarted agent starts a new one and
//! catches up from `serial.offset` with the server's history.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::tungstenite::Message;

use super::api::Client;

/// The transcript of the console, in the VM's work dir.
pub const CONSOLE_LOG: &str = "console.log";
/// The console socket, in the VM's work dir.
pub const SERIAL_SOCK: &str = "serial.sock";
/// Bytes of the current instance's console output already in the log.
pub const SERIAL_OFFSET: &str = "serial.offset";

/// A running bridge; ended (and its socket removed) by [`SerialBridge::stop`]
/// or when dropped.
#[derive(Debug)]
pub struct SerialBridge {
    tasks: Vec<tokio::task::AbortHandle>,
    sock: PathBuf,
}

impl Drop for SerialBridge {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.sock);
    }
}

impl SerialBridge {
    /// Ends the bridge and removes its socket.
    pub fn stop(self) {
        drop(self);
    }
}

/// Bytes of the current instance's output already logged in `dir`.
pub fn read_offset(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join(SERIAL_OFFSET))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// A new instance's output starts at byte 0.
pub fn reset_offset(dir: &Path) -> std::io::Result<()> {
    std::fs::write(dir.join(SERIAL_OFFSET), "0")
}

/// Starts bridging the console of the instance behind `client` to `dir`.
///
/// # Errors
/// When the console socket cannot be bound.
pub fn spawn(client: Client, dir: &Path, vm: &str) -> std::io::Result<SerialBridge> {
    let sock = dir.join(SERIAL_SOCK);
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)?;
    let (out_tx, _) = broadcast::channel::<Bytes>(256);
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(64);
    let accept = tokio::spawn(accept_clients(listener, out_tx.clone(), in_tx));
    let pump = tokio::spawn(pump(client, dir.to_owned(), vm.to_owned(), out_tx, in_rx));
    Ok(SerialBridge {
        tasks: vec![accept.abort_handle(), pump.abort_handle()],
        sock,
    })
}

async fn accept_clients(
    listener: tokio::net::UnixListener,
    out: broadcast::Sender<Bytes>,
    input: mpsc::Sender<Bytes>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        let mut rx = out.subscribe();
        let input = input.clone();
        tokio::spawn(async move {
            let (mut r, mut w) = stream.into_split();
            let writer = tokio::spawn(async move {
                loop {
                    match rx.recv().await {
                        Ok(b) => {
                            if w.write_all(&b).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
            let mut buf = [0u8; 1024];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if input.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                            break;
                        }
                    }
                }
            }
            writer.abort();
        });
    }
}

/// Connects to the serial WebSocket (again and again, resuming at the
/// logged offset) and copies bytes both ways until aborted.
async fn pump(
    client: Client,
    dir: PathBuf,
    vm: String,
    out: broadcast::Sender<Bytes>,
    mut input: mpsc::Receiver<Bytes>,
) {
    let log_path = dir.join(CONSOLE_LOG);
    let mut offset = read_offset(&dir);
    loop {
        match tokio_tungstenite::connect_async(client.serial_url(offset)).await {
            Ok((ws, _)) => {
                tracing::debug!(vm = %vm, offset, "serial console connected");
                let (mut tx, mut rx) = ws.split();
                let mut log = match tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log_path)
                    .await
                {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::warn!(vm = %vm, error = %e, "cannot open the console log");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                loop {
                    tokio::select! {
                        msg = rx.next() => match msg {
                            Some(Ok(Message::Binary(b))) => {
                                if let Err(e) = log.write_all(&b).await {
                                    tracing::warn!(vm = %vm, error = %e, "cannot write the console log");
                                }
                                offset += b.len() as u64;
                                let _ = tokio::fs::write(dir.join(SERIAL_OFFSET), offset.to_string()).await;
                                let _ = out.send(b);
                            }
                            // Text frames are control messages (migration); ignored.
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => break,
                        },
                        typed = input.recv() => match typed {
                            Some(b) => {
                                if tx.send(Message::Binary(b)).await.is_err() {
                                    break;
                                }
                            }
                            None => return,
                        },
                    }
                }
                tracing::debug!(vm = %vm, "serial console disconnected");
            }
            Err(e) => tracing::debug!(vm = %vm, error = %e, "serial console not reachable"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Typed while disconnected: nobody reads it.
        while input.try_recv().is_ok() {}
    }
}
