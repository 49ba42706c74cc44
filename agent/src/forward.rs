//! Forwarding (issue 17, "any agent is the door"): a stream operation on
//! a VM that another node's agent runs (console, tunnel, SSH material,
//! exec, files, logs and provision output) goes to that agent, at its
//! Node's `status.address.tcp`, over mutual TLS with this agent's own
//! certificate (an agent certificate is good for client authentication).
//!
//! ```text
//!  client ──▶ agent X: /v1/vms/NAME/… or /v1/logs/NAME
//!               │ VM's status.nodeName = X, or unknown, or no TLS identity ──▶ served here
//!               │ else Node's status.address.tcp ──TLS (X's agent.crt)──▶ owning agent
//!               ▼                                   (x-vmctl-forwarded-by: X; never forwarded twice)
//!        the owner's answer, streamed back; a 101 is joined both ways
//! ```

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use vmctl_api::{Kind, ObjectRef};

use crate::api::{ApiError, AppState};

/// The header a forwarded request carries: the forwarding agent's node
/// name. A request with it is served where it arrives.
pub const FORWARDED_BY: &str = "x-vmctl-forwarded-by";

/// How long connecting and the TLS handshake to the owning agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// This agent's side of forwarding: its node name and TLS client settings.
pub struct Forwarder {
    node: String,
    connector: vmctl_tls::TlsConnector,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// The forwarder of an agent named `node` with the TLS files of
    /// `tls_dir`; `None` (logged) when they cannot be used: requests are
    /// then served locally.
    pub fn new(node: &str, tls_dir: &std::path::Path) -> Option<Arc<Forwarder>> {
        let id = vmctl_tls::Identity::agent_dir(tls_dir);
        match vmctl_tls::client_config(&id) {
            Ok(c) => Some(Arc::new(Forwarder {
                node: node.to_owned(),
                connector: vmctl_tls::TlsConnector::from(c),
            })),
            Err(e) => {
                tracing::warn!(error = %vmctl_api::error_chain(&e), "cannot forward to other agents");
                None
            }
        }
    }
}

/// The VM a forwardable path is about: `/v1/vms/NAME/…` or `/v1/logs/NAME`.
fn vm_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/")?;
    let (what, rest) = rest.split_once('/')?;
    match what {
        "vms" => rest.split_once('/').map(|(name, _)| name),
        "logs" => (!rest.contains('/')).then_some(rest),
        _ => None,
    }
}

fn bad_gateway(message: String, help: &'static str) -> Response {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "vmctl::agent::forward_failed",
        message,
        Some(help),
    )
    .into_response()
}

/// The middleware: forwards a request about another node's VM, serves
/// the rest here.
pub(crate) async fn forward(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let Some(fw) = st.forwarder() else {
        return next.run(req).await;
    };
    if req.headers().contains_key(FORWARDED_BY) {
        return next.run(req).await;
    }
    let Some(name) = vm_of(req.uri().path()).map(str::to_owned) else {
        return next.run(req).await;
    };
    let owner = match owner_address(&st, &fw.node, &name).await {
        Ok(Some(o)) => o,
        // Here, unknown, or the store cannot say: the handler answers.
        Ok(None) => return next.run(req).await,
        Err(resp) => return *resp,
    };
    proxy(&fw, req, &name, owner).await
}

/// `(node, address)` of the agent that runs VM `name`, when it is another
/// node's; `None` when it is this one's (or nobody's yet).
async fn owner_address(
    st: &AppState,
    me: &str,
    name: &str,
) -> Result<Option<(String, String)>, Box<Response>> {
    let store = st.store.clone();
    let vm = ObjectRef::new(Kind::VirtualMachine, name.to_owned());
    let Ok(Some(obj)) = store.get(&vm).await else {
        return Ok(None);
    };
    let node = obj
        .status
        .as_ref()
        .and_then(|s| s.get("nodeName"))
        .and_then(|n| n.as_str())
        .filter(|n| !n.is_empty() && *n != me)
        .map(str::to_owned);
    let Some(node) = node else {
        return Ok(None);
    };
    let n = ObjectRef::new(Kind::Node, node.clone());
    let addr = match store.get(&n).await {
        Ok(Some(o)) => o
            .status
            .as_ref()
            .and_then(|s| s.pointer("/address/tcp"))
            .and_then(|a| a.as_str())
            .map(str::to_owned),
        _ => None,
    };
    match addr {
        Some(a) => Ok(Some((node, a))),
        None => Err(Box::new(bad_gateway(
            format!("VM {name} runs on node {node}, whose agent has no TLS address to forward to"),
            "start that node's agent with --listen IP:PORT --tls-dir DIR (its Node's \
             status.address.tcp), or send the request to it directly (vmctl --server)",
        ))),
    }
}

/// Sends `req` to the agent at `addr` and streams its answer back; a
/// switch of protocols is joined both ways.
async fn proxy(
    fw: &Forwarder,
    mut req: Request,
    vm: &str,
    (node, addr): (String, String),
) -> Response {
    let failed = |why: String| {
        bad_gateway(
            format!("cannot forward to node {node}'s agent at {addr} (VM {vm} runs there): {why}"),
            "check that agent (its log, `vmctl get node NODE`), and that both agents' \
             certificates are of the same cluster CA",
        )
    };
    let Ok(sock) = addr.parse::<std::net::SocketAddr>() else {
        return failed("not an IP:PORT".into());
    };
    let Ok(server_name) = vmctl_tls::server_name(&sock.ip().to_string()) else {
        return failed("not an IP address".into());
    };
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(sock).await?;
        let _ = tcp.set_nodelay(true);
        fw.connector.connect(server_name, tcp).await
    };
    let tls = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return failed(e.to_string()),
        Err(_) => return failed(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs())),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(tls)).await {
        Ok(x) => x,
        Err(e) => return failed(e.to_string()),
    };
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "forwarded connection ended with an error");
        }
    });
    let client_side = hyper::upgrade::on(&mut req);
    if let Ok(v) = HeaderValue::from_str(&fw.node) {
        req.headers_mut().insert(FORWARDED_BY, v);
    }
    tracing::debug!(%vm, %node, %addr, path = %req.uri().path(), "forwarding");
    let mut resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return failed(e.to_string()),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let owner_side = hyper::upgrade::on(&mut resp);
        let what = format!("forwarded stream of {vm} to {node}");
        tokio::spawn(async move {
            let (Ok(a), Ok(b)) = (client_side.await, owner_side.await) else {
                tracing::debug!(%what, "a side did not switch protocols");
                return;
            };
            let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
            if let Err(e) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
                tracing::debug!(%what, error = %e, "stream ended with an error");
            }
        });
    }
    resp.map(Body::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_vms_stream_paths_are_forwarded() {
        assert_eq!(vm_of("/v1/vms/web/console"), Some("web"));
        assert_eq!(vm_of("/v1/vms/web/files"), Some("web"));
        assert_eq!(vm_of("/v1/logs/web"), Some("web"));
        assert_eq!(vm_of("/v1/objects/vm/web"), None);
        assert_eq!(vm_of("/v1/vms/web"), None);
        assert_eq!(vm_of("/v1/healthz"), None);
        assert_eq!(vm_of("/v1/watch"), None);
    }
}
