//! The endpoints that make the API the only way `vmctl` reaches a VM
//! (issue 13): the serial console and an SSH tunnel as upgraded byte
//! streams, `exec` with stdout and stderr streamed apart, files in and
//! out with their modes, the SSH material for the system `ssh`, and
//! image inspection (a host tool, `qemu-img`, run here rather than by the
//! CLI).
//!
//! ```text
//!  GET  /v1/vms/{name}/console  ─ Upgrade: tcp ─▶ 101 ◀══ bytes ══▶ <workDir>/serial.sock
//!  GET  /v1/vms/{name}/tunnel   ─ Upgrade: tcp ─▶ 101 ◀══ bytes ══▶ guest sshd (sshHost:sshPort)
//!  GET  /v1/vms/{name}/ssh      ─▶ user, pinned host key, generated private key
//!  POST /v1/vms/{name}/exec     ─▶ NDJSON: stdout/stderr pieces … exit | error
//!  PUT  /v1/vms/{name}/files    ─▶ body = file, ?path=&mode= (SFTP, mode set exactly)
//!  GET  /v1/vms/{name}/files    ─▶ body = file, x-vmctl-file-mode: 0755
//!  POST /v1/images/inspect      ─▶ format and sizes of a local image file
//! ```
//!
//! The target of an upgrade (the console socket, the guest's port) is
//! opened before answering 101, so that a stopped VM is an ordinary JSON
//! error rather than a stream that closes at once.

use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use vmctl_api::streams::{
    ExecEvent, ExecRequest, FILE_MODE_HEADER, FileWritten, ImageInfo, InspectRequest, SshAccess,
    Utf8Pieces,
};
use vmctl_api::{Kind, ObjectRef, VirtualMachine};
use vmctl_controllers::drivers::SshTarget;
use vmctl_controllers::drivers::ssh::SshError;
use vmctl_controllers::drivers::ssh::remote::{self, Output};
use vmctl_store::Store;

use crate::api::{ApiError, AppState};
use crate::openapi::{Bytes200, NdJson, SwitchingProtocols, UpgradeRequest};
use crate::rejection::{ApiBytes, ApiJson, ApiPath as Path, ApiQuery as Query, MAX_BODY_BYTES};

type ApiResult<T> = Result<T, ApiError>;

/// Largest file `vmctl cp` carries either way, in bytes: the limit of a
/// provisioning upload (256 MiB); the agent holds the whole file in memory.
pub const MAX_COPY_BYTES: usize = vmctl_api::limits::FileUse::Upload.max_bytes() as usize;

/// How long opening the guest's SSH port for a tunnel may take, with the
/// retries of [`open_guest_ssh`].
const TUNNEL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a tunnel's new connection is watched for being closed before
/// the guest's sshd said anything (see [`open_guest_ssh`]).
const TUNNEL_BANNER_WATCH: Duration = Duration::from_millis(300);
/// Pause between a tunnel's connections closed before the banner.
const TUNNEL_RETRY: Duration = Duration::from_millis(200);

/// Opens the guest's SSH port `host:port` for a tunnel: a connection that
/// is closed before sshd sent anything (with QEMU's user networking the
/// host side is accepted and then closed when the guest refuses: sshd
/// restarting, as cloud-init does seconds after the first boot's
/// `SshReady`) is made again, every [`TUNNEL_RETRY`], within
/// [`TUNNEL_CONNECT_TIMEOUT`]. A connection on which sshd said something
/// (its banner, RFC 4253 4.2), or still silent after
/// [`TUNNEL_BANNER_WATCH`] (a slow guest, or a server that waits for the
/// client), is handed over with nothing read from it.
///
/// Errors: the last connect error, or `UnexpectedEof` when every
/// connection was closed before the banner.
async fn open_guest_ssh(host: &str, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let deadline = tokio::time::Instant::now() + TUNNEL_CONNECT_TIMEOUT;
    loop {
        let tcp = tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect((host, port)))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let mut first = [0u8; 1];
        let closed = match tokio::time::timeout(TUNNEL_BANNER_WATCH, tcp.peek(&mut first)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        };
        if !closed {
            return Ok(tcp);
        }
        drop(tcp);
        if tokio::time::Instant::now() + TUNNEL_RETRY >= deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "every connection was closed before the SSH banner (is sshd running in the guest?)",
            ));
        }
        tokio::time::sleep(TUNNEL_RETRY).await;
    }
}

/// The VM `name` with a runtime (it has been started); a 409 otherwise.
async fn running_vm(store: &dyn Store, name: &str) -> ApiResult<VirtualMachine> {
    vmctl_api::names::check_name(name)
        .map_err(|m| ApiError::bad_request(m, vmctl_api::names::NAME_HELP))?;
    let r = ObjectRef::new(Kind::VirtualMachine, name.to_owned());
    let obj = store.get(&r).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "vmctl::vm::not_found",
            format!("VM {name} not found"),
            Some("run `vmctl list` to see available VMs"),
        )
    })?;
    let vm = VirtualMachine::from_object(&obj).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "vmctl::store::failed",
            format!("stored VM {name} does not decode: {e}"),
            Some("see the agent log"),
        )
    })?;
    if vm
        .status
        .as_ref()
        .and_then(|s| s.runtime.as_ref())
        .is_none()
    {
        return Err(not_running(name));
    }
    Ok(vm)
}

fn not_running(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "vmctl::vm::invalid_state",
        format!("VM {name} is not running"),
        Some(&format!("start it and wait: `vmctl get vm {name} -w`")),
    )
}

/// The SSH target of a running VM, as the provisioner builds it.
async fn ssh_target(store: &dyn Store, name: &str) -> ApiResult<SshTarget> {
    let vm = running_vm(store, name).await?;
    let runtime = vm
        .status
        .and_then(|s| s.runtime)
        .filter(|r| r.ssh_port.is_some() && r.ssh_host.is_some())
        .ok_or_else(|| not_running(name))?;
    let mut ssh = vm.spec.ssh.unwrap_or_default();
    if ssh.user.is_empty() {
        ssh.user = vmctl_api::default_ssh_user();
    }
    Ok(SshTarget {
        vm: name.to_owned(),
        runtime,
        ssh: Some(ssh),
    })
}

/// An SSH driver error as an API error: a VM not ready is the caller's
/// state (409), a relative path its request (400), anything else the
/// guest's side failing (502).
fn ssh_error(e: &SshError) -> ApiError {
    let message = vmctl_controllers::drivers::ssh::error_chain(e);
    match e {
        SshError::NoAddress { vm } | SshError::NoWorkDir { vm } => not_running(vm),
        SshError::RelativeDestination(_) => {
            ApiError::bad_request(message, "give an absolute path on the guest (NAME:/path)")
        }
        _ => ApiError::new(StatusCode::BAD_GATEWAY, e.code(), message, e.help()),
    }
}

/// Answers 101 and, once the client has switched, copies bytes both ways
/// between it and `target` until both sides are done.
fn switch<T>(on_upgrade: OnUpgrade, what: String, mut target: T) -> SwitchingProtocols
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(%what, error = %e, "client did not switch protocols");
                return;
            }
        };
        let mut client = TokioIo::new(upgraded);
        match tokio::io::copy_bidirectional(&mut client, &mut target).await {
            Ok((up, down)) => tracing::debug!(%what, up, down, "stream ended"),
            Err(e) => tracing::debug!(%what, error = %e, "stream ended with an error"),
        }
    });
    SwitchingProtocols
}

/// `GET /v1/vms/{name}/console`: the serial console, both ways.
pub(crate) async fn console(
    State(st): State<AppState>,
    Path(name): Path<String>,
    upgrade: UpgradeRequest,
) -> ApiResult<SwitchingProtocols> {
    let vm = running_vm(&*st.store, &name).await?;
    let on_upgrade = upgrade.accept()?;
    let work = vm
        .status
        .and_then(|s| s.runtime)
        .and_then(|r| r.work_dir)
        .map(std::path::PathBuf::from)
        .ok_or_else(|| not_running(&name))?;
    // A symlink to a short path when the work dir's would not fit sun_path.
    let sock = work.join("serial.sock");
    let sock = std::fs::read_link(&sock).unwrap_or(sock);
    let serial = tokio::net::UnixStream::connect(&sock).await.map_err(|e| {
        ApiError::new(
            StatusCode::CONFLICT,
            "vmctl::vm::invalid_state",
            format!(
                "cannot attach to VM {name}'s console ({}): {e}",
                sock.display()
            ),
            Some("is the VM running? (`vmctl status`)"),
        )
    })?;
    Ok(switch(on_upgrade, format!("console of {name}"), serial))
}

/// `GET /v1/vms/{name}/tunnel`: a TCP stream to the guest's SSH port.
pub(crate) async fn tunnel(
    State(st): State<AppState>,
    Path(name): Path<String>,
    upgrade: UpgradeRequest,
) -> ApiResult<SwitchingProtocols> {
    let t = ssh_target(&*st.store, &name).await?;
    let on_upgrade = upgrade.accept()?;
    let host = t.runtime.ssh_host.clone().unwrap_or_default();
    let port = t.runtime.ssh_port.unwrap_or(22);
    let tcp = open_guest_ssh(&host, port).await.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "vmctl::ssh::failed",
            format!("cannot connect to VM {name}'s SSH port {host}:{port}: {e}"),
            Some("wait until it has booted (`vmctl get vm NAME -w` shows when it is Ready), or see `vmctl log NAME --console`"),
        )
    })?;
    let _ = tcp.set_nodelay(true);
    Ok(switch(on_upgrade, format!("ssh tunnel to {name}"), tcp))
}

/// `GET /v1/vms/{name}/ssh`.
pub(crate) async fn ssh_access(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<SshAccess>> {
    let t = ssh_target(&*st.store, &name).await?;
    let a = tokio::task::spawn_blocking(move || remote::access(&t))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "vmctl::api::panic",
                e.to_string(),
                None,
            )
        })?
        .map_err(|e| ssh_error(&e))?;
    Ok(Json(SshAccess {
        user: a.user,
        host_key: a.host_key,
        private_key: a.private_key,
        private_key_path: a.private_key_path,
    }))
}

/// Quotes `s` for a POSIX shell (the guest's login shell runs the command).
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// One NDJSON line.
fn line(ev: &ExecEvent) -> Bytes {
    let mut l = serde_json::to_vec(ev).expect("exec events serialise");
    l.push(b'\n');
    Bytes::from(l)
}

/// `POST /v1/vms/{name}/exec`.
pub(crate) async fn exec(
    State(st): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ExecRequest, MAX_BODY_BYTES>,
) -> ApiResult<NdJson<ExecEvent>> {
    let t = ssh_target(&*st.store, &name).await?;
    if req.command.is_empty() {
        return Err(ApiError::bad_request(
            "no command given",
            "send {\"command\": [\"program\", \"arg\", …]}",
        ));
    }
    let command: Vec<String> = req.command.iter().map(|a| shell_quote(a)).collect();
    let command = command.join(" ");
    let (lines, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let (out, mut pieces) = tokio::sync::mpsc::channel::<Output>(64);
        let run = remote::exec(&t, &command, out);
        let lines2 = lines.clone();
        // Ends when the SSH side drops its sender (the command ended) or
        // the client is gone (then the SSH side is cancelled in turn).
        let forward = async move {
            let (mut so, mut se) = (Utf8Pieces::default(), Utf8Pieces::default());
            while let Some(p) = pieces.recv().await {
                let ev = match p {
                    Output::Stdout(b) => ExecEvent::Stdout { data: so.push(&b) },
                    Output::Stderr(b) => ExecEvent::Stderr { data: se.push(&b) },
                };
                if matches!(&ev, ExecEvent::Stdout { data } | ExecEvent::Stderr { data } if data.is_empty())
                {
                    continue;
                }
                if lines2.send(line(&ev)).await.is_err() {
                    return;
                }
            }
            for ev in [
                ExecEvent::Stdout { data: so.finish() },
                ExecEvent::Stderr { data: se.finish() },
            ] {
                if matches!(&ev, ExecEvent::Stdout { data } | ExecEvent::Stderr { data } if !data.is_empty())
                {
                    let _ = lines2.send(line(&ev)).await;
                }
            }
        };
        let (result, ()) = tokio::join!(run, forward);
        let last = match result {
            Ok(code) => ExecEvent::Exit { code },
            Err(SshError::Cancelled) => return,
            Err(e) => {
                tracing::info!(vm = %t.vm, error = %vmctl_api::error_chain(&e), "exec failed");
                ExecEvent::Error {
                    error: vmctl_api::wire::ErrorBody {
                        code: e.code().into(),
                        message: vmctl_api::error_chain(&e),
                        help: e.help().map(Into::into),
                    },
                }
            }
        };
        let _ = lines.send(line(&last)).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Ok(NdJson::new(Body::from_stream(stream)))
}

/// The query of `PUT /v1/vms/{name}/files`.
#[derive(Debug, Deserialize, JsonSchema)]
pub(crate) struct UploadQuery {
    /// Absolute path on the guest.
    #[serde(default)]
    path: String,
    /// Permission bits in octal (`0644`, the default); set exactly.
    #[serde(default)]
    mode: Option<String>,
}

/// The query of `GET /v1/vms/{name}/files`.
#[derive(Debug, Deserialize, JsonSchema)]
pub(crate) struct DownloadQuery {
    /// Absolute path on the guest.
    #[serde(default)]
    path: String,
}

/// `PUT /v1/vms/{name}/files?path=/abs&mode=0644`: the body becomes the file.
pub(crate) async fn upload(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<UploadQuery>,
    ApiBytes(data): ApiBytes<MAX_COPY_BYTES>,
) -> ApiResult<Json<FileWritten>> {
    let t = ssh_target(&*st.store, &name).await?;
    if !q.path.starts_with('/') {
        return Err(ssh_error(&SshError::RelativeDestination(q.path)));
    }
    let mode = match q.mode.as_deref() {
        None => 0o644,
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                ApiError::bad_request(
                    format!("mode `{m}` is not octal permission bits"),
                    "write mode=0644 (octal, at most 7777)",
                )
            })?,
    };
    let bytes = remote::upload(&t, data.to_vec(), &q.path, mode)
        .await
        .map_err(|e| ssh_error(&e))?;
    Ok(Json(FileWritten {
        path: q.path,
        bytes,
        mode,
    }))
}

/// `GET /v1/vms/{name}/files?path=/abs`: the file, its mode in a header.
pub(crate) async fn download(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<DownloadQuery>,
) -> ApiResult<Bytes200> {
    let t = ssh_target(&*st.store, &name).await?;
    if !q.path.starts_with('/') {
        return Err(ssh_error(&SshError::RelativeDestination(q.path)));
    }
    let file = remote::download(&t, &q.path, MAX_COPY_BYTES as u64)
        .await
        .map_err(|e| ssh_error(&e))?;
    let mode = HeaderValue::from_str(&format!("{:04o}", file.mode)).expect("octal is ASCII");
    let mut headers = HeaderMap::new();
    headers.insert(header::HeaderName::from_static(FILE_MODE_HEADER), mode);
    Ok(Bytes200 {
        headers,
        body: Bytes::from(file.data),
    })
}

/// `POST /v1/images/inspect`: what an Image with this path would get.
pub(crate) async fn inspect(
    ApiJson(req): ApiJson<InspectRequest, MAX_BODY_BYTES>,
) -> ApiResult<Json<ImageInfo>> {
    if !req.path.starts_with('/') {
        return Err(ApiError::bad_request(
            format!("{} is not an absolute path", req.path),
            "give the image's absolute path on the agent's host",
        ));
    }
    let img = vmctl_controllers::images::local(&req.path)
        .await
        .map_err(|e| {
            let status = match e {
                vmctl_controllers::images::ImageError::NotFound(_) => StatusCode::NOT_FOUND,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            ApiError::new(
                status,
                e.code(),
                vmctl_api::error_chain(&e),
                Some(e.help().unwrap_or("check the file")),
            )
        })?;
    Ok(Json(ImageInfo {
        path: req.path,
        format: img.format,
        size_bytes: img.size_bytes,
        virtual_size_bytes: img.virtual_size_bytes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_arguments_reach_the_guest_shell_verbatim() {
        assert_eq!(shell_quote("ls"), "ls");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME;rm"), "'$HOME;rm'");
    }
}
