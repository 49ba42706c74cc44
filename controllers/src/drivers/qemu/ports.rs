//! Port forwards of a running QEMU's user networking, through the human
//! monitor (QMP `human-monitor-command`): `hostfwd_add` / `hostfwd_remove`
//! on netdev `net0`, and `info usernet` to see which are in place. QEMU
//! keeps them, so an adopted QEMU's forwards are read back, never
//! remembered.
//!
//! QEMU 7.2's monitor answers a refused rule with text, not a QMP error
//! ("Could not set up host forwarding rule …"), and does not say why: a
//! refused rule is explained by binding the same host address and port
//! here (`EADDRINUSE`: in use).

use vmctl_api::{PortForward, Protocol};

use super::qmp::{Qmp, QmpError};

/// The netdev id of a VM's user network (see `args.rs`).
const NETDEV: &str = "net0";

/// Runs one human monitor command; its text output.
async fn hmp(q: &mut Qmp, command_line: &str) -> Result<String, QmpError> {
    let out = q
        .execute(
            "human-monitor-command",
            Some(serde_json::json!({ "command-line": command_line })),
        )
        .await?;
    Ok(out.as_str().unwrap_or_default().trim().to_owned())
}

/// `tcp:127.0.0.1:8080`: the host side of a rule, as `hostfwd_remove` takes it.
fn host_side(f: &PortForward) -> String {
    format!("{}:{}:{}", f.protocol.as_str(), f.address, f.host_port)
}

/// Why QEMU could not set up or take away a forward.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The host address and port are taken by another socket.
    #[error("host port {port}/{protocol} on {address} is in use by another program or VM")]
    InUse {
        /// The host port.
        port: u16,
        /// `tcp` or `udp`.
        protocol: &'static str,
        /// The host address.
        address: String,
    },
    /// QEMU refused the rule, saying this.
    #[error("QEMU refused port forward {rule}: {said}")]
    Refused {
        /// The forward.
        rule: String,
        /// QEMU's answer.
        said: String,
    },
    /// The VM's QEMU is not running.
    #[error("the VM is not running")]
    NotRunning,
    /// The monitor command failed.
    #[error("QMP failed")]
    Qmp(#[from] QmpError),
}

/// Sets up `f` on the user network of the QEMU behind `q`.
pub async fn add(q: &mut Qmp, f: &PortForward) -> Result<(), ForwardError> {
    let rule = format!("{}-:{}", host_side(f), f.guest_port);
    let said = hmp(q, &format!("hostfwd_add {NETDEV} {rule}")).await?;
    if said.is_empty() {
        return Ok(());
    }
    if in_use(f) {
        return Err(ForwardError::InUse {
            port: f.host_port,
            protocol: f.protocol.as_str(),
            address: f.address.clone(),
        });
    }
    Err(ForwardError::Refused {
        rule: f.describe(),
        said,
    })
}

/// Takes `f` away; one that is not there is not an error.
pub async fn remove(q: &mut Qmp, f: &PortForward) -> Result<(), ForwardError> {
    let said = hmp(q, &format!("hostfwd_remove {NETDEV} {}", host_side(f))).await?;
    if said.ends_with("removed") || said.ends_with("not found") {
        return Ok(());
    }
    Err(ForwardError::Refused {
        rule: f.describe(),
        said,
    })
}

/// The host forwards in place (`info usernet`), every one of them (vmctl's
/// SSH forward too).
pub async fn list(q: &mut Qmp) -> Result<Vec<PortForward>, QmpError> {
    Ok(parse_usernet(&hmp(q, "info usernet").await?))
}

/// The `HOST_FORWARD` rows of `info usernet`:
///
/// ```text
///   Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
///   TCP[HOST_FORWARD]  13       127.0.0.1  8080       10.0.2.15    80     0     0
///   TCP[HOST_FORWARD]  16               *  8081       10.0.2.15    81     0     0
/// ```
///
/// (`*` is every address, 0.0.0.0). Connections and unreadable rows are
/// left out.
pub fn parse_usernet(text: &str) -> Vec<PortForward> {
    text.lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let [proto, _fd, src, sport, _dst, dport, ..] = cols.as_slice() else {
                return None;
            };
            let protocol = match *proto {
                "TCP[HOST_FORWARD]" => Protocol::Tcp,
                "UDP[HOST_FORWARD]" => Protocol::Udp,
                _ => return None,
            };
            Some(PortForward {
                host_port: sport.parse().ok()?,
                guest_port: dport.parse().ok()?,
                protocol,
                address: if *src == "*" { "0.0.0.0" } else { src }.to_owned(),
            })
        })
        .collect()
}

/// Whether `f`'s host address and port are taken now: binding them here
/// fails with `EADDRINUSE`.
fn in_use(f: &PortForward) -> bool {
    let addr = (f.address.as_str(), f.host_port);
    let res = match f.protocol {
        Protocol::Tcp => std::net::TcpListener::bind(addr).map(drop),
        Protocol::Udp => std::net::UdpSocket::bind(addr).map(drop),
    };
    matches!(res, Err(e) if e.kind() == std::io::ErrorKind::AddrInUse)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What QEMU 7.2 printed with vmctl's SSH forward, a TCP and a UDP
    /// forward on 127.0.0.1, one on every address, and a connection.
    const USERNET: &str = "Hub -1 (net0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n  TCP[ESTABLISHED]   18       127.0.0.1 40512       10.0.2.15    80     0     0\r\n  TCP[HOST_FORWARD]  16               * 18083       10.0.2.15    83     0     0\r\n  TCP[HOST_FORWARD]  13       127.0.0.1 18080       10.0.2.15    80     0     0\r\n  TCP[HOST_FORWARD]   8       127.0.0.1 18022       10.0.2.15    22     0     0\r\n  UDP[HOST_FORWARD]  14       127.0.0.1 18081       10.0.2.15    81     0     0\r\n";

    #[test]
    fn usernet_host_forwards_are_read_and_connections_left_out() {
        let got = parse_usernet(USERNET);
        let udp = PortForward {
            protocol: Protocol::Udp,
            ..PortForward::tcp(18081, 81)
        };
        let any = PortForward {
            address: "0.0.0.0".into(),
            ..PortForward::tcp(18083, 83)
        };
        assert_eq!(
            got,
            vec![
                any,
                PortForward::tcp(18080, 80),
                PortForward::tcp(18022, 22),
                udp
            ]
        );
        assert!(parse_usernet("").is_empty());
    }

    #[test]
    fn a_port_held_by_another_socket_is_in_use() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(in_use(&PortForward::tcp(port, 80)));
        drop(l);
        assert!(!in_use(&PortForward::tcp(port, 80)));
    }
}
