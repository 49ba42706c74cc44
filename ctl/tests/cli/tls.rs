//! Any agent is the door (issue 17 item 4): `vmctl cluster` makes the
//! CA and certificates, an agent serves its API on TCP with mutual TLS,
//! and `vmctl --server` / contexts talk to it. Real TLS, the real agent
//! program, the fake driver; every agent on its own 127.0.0.x address.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::agent::{Agent, stderr};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A free port on `ip` (a 127.0.0.x address of this test's own).
fn free_addr(ip: &str) -> SocketAddr {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
}

/// A cluster directory and its contexts file; commands run with an
/// XDG data directory of their own, where no local agent may appear.
struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("cluster")
    }

    fn contexts(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    /// `vmctl ARGS` with this cluster's contexts file and an empty local
    /// data directory.
    fn vmctl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(crate::vmctl_bin());
        cmd.args(args)
            .arg("--contexts")
            .arg(self.contexts())
            .env("XDG_DATA_HOME", self.dir.path().join("xdg-data"))
            .env("XDG_CONFIG_HOME", self.dir.path().join("xdg-config"))
            .env_remove("VMCTL_DATA_DIR")
            .env_remove("VMCTL_SOCKET")
            .env_remove("VMCTL_SERVER")
            .env_remove("VMCTL_CONTEXT")
            .env("NO_COLOR", "1")
            .env("USER", "tester")
            .current_dir(crate::repo())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.vmctl(args, None);
        assert!(out.status.success(), "vmctl {args:?}: {}", stderr(&out));
        stdout(&out)
    }

    /// `cluster init` in this cluster's directory, with a context for
    /// `admin` at `server`.
    fn init(&self, server: &str) {
        let dir = self.ca_dir();
        self.ok(&[
            "cluster",
            "init",
            "--dir",
            dir.to_str().unwrap(),
            "--server",
            server,
        ]);
    }

    /// Issues agent `name`'s certificate for `ip`; its directory.
    fn issue_agent(&self, name: &str, ip: &str) -> PathBuf {
        let dir = self.ca_dir();
        self.ok(&[
            "cluster",
            "issue",
            "agent",
            name,
            "--address",
            ip,
            "--dir",
            dir.to_str().unwrap(),
        ]);
        dir.join("agents").join(name)
    }

    fn user_dir(&self, name: &str) -> PathBuf {
        self.ca_dir().join("users").join(name)
    }
}

/// An agent on the fake driver listening with TLS on `addr`.
fn tls_agent(addr: SocketAddr, tls_dir: &Path) -> Agent {
    Agent::start_with(
        "fake",
        &[
            ("VMCTL_LISTEN", &addr.to_string()),
            ("VMCTL_TLS_DIR", tls_dir.to_str().unwrap()),
            ("VMCTL_NODE_NAME", "node-a"),
        ],
    )
}

fn agent_log(a: &Agent) -> String {
    std::fs::read_to_string(a.dir.path().join("agent.log")).unwrap_or_default()
}

/// Waits up to 5 s for the agent's log to contain `text`.
fn wait_for_log(a: &Agent, text: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = agent_log(a);
        if log.contains(text) || std::time::Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn cluster_init_writes_keys_0600_and_refuses_to_replace_a_ca_without_force() {
    let c = Cluster::new();
    let dir = c.ca_dir();
    let d = dir.to_str().unwrap();
    c.ok(&["cluster", "init", "--dir", d]);
    c.issue_agent("a", "127.0.0.1");
    for key in [
        dir.join("ca.key"),
        dir.join("users/admin/user.key"),
        dir.join("agents/a/agent.key"),
    ] {
        assert_eq!(mode(&key), 0o600, "{}", key.display());
    }
    let ca = std::fs::read(dir.join("ca.crt")).unwrap();
    let again = c.vmctl(&["cluster", "init", "--dir", d], None);
    assert_eq!(again.status.code(), Some(1));
    let err = stderr(&again);
    assert!(err.contains("vmctl::cluster::exists"), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(dir.join("ca.crt")).unwrap(), ca, "unchanged");
    // An agent's certificate is not replaced by accident either.
    let out = c.vmctl(
        &[
            "cluster",
            "issue",
            "agent",
            "a",
            "--address",
            "127.0.0.1",
            "--dir",
            d,
        ],
        None,
    );
    assert!(
        stderr(&out).contains("vmctl::cluster::exists"),
        "{}",
        stderr(&out)
    );
    c.ok(&["cluster", "init", "--dir", d, "--force"]);
    assert_ne!(std::fs::read(dir.join("ca.crt")).unwrap(), ca, "a new CA");
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
}

#[test]
fn vmctl_server_applies_gets_and_deletes_through_an_agents_tls_port() {
    let c = Cluster::new();
    let addr = free_addr("127.0.0.21");
    let server = format!("https://{addr}");
    c.init(&server);
    let tls_dir = c.issue_agent("node-a", "127.0.0.21");
    let a = tls_agent(addr, &tls_dir);

    // The context `cluster init --server` wrote is the current one.
    let contexts = c.ok(&["config", "get-contexts"]);
    assert!(
        contexts.contains("*") && contexts.contains(&server),
        "{contexts}"
    );
    assert_eq!(
        c.ok(&["config", "current-context"]).trim(),
        "admin@127.0.0.21"
    );

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("VMFile.kdl");
    std::fs::write(
        &f,
        "vm \"web\" {\n    image-url \"https://example.com/debian.qcow2\"\n    vcpus 1\n}\n",
    )
    .unwrap();
    let fs = f.to_str().unwrap();
    let applied = c.ok(&["apply", "-f", fs, "--wait", "--timeout", "60"]);
    assert!(applied.contains("vm/web created"), "{applied}");
    let vms = c.ok(&["get", "vm"]);
    assert!(vms.contains("web") && vms.contains("Running"), "{vms}");
    // The same through --server with the files as flags (no context).
    let user = c.user_dir("admin");
    let flags = [
        "--server",
        server.as_str(),
        "--context",
        "local",
        "--certificate-authority",
        &user.join("ca.crt").display().to_string(),
        "--client-certificate",
        &user.join("user.crt").display().to_string(),
        "--client-key",
        &user.join("user.key").display().to_string(),
    ]
    .map(str::to_owned);
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend(["get", "node", "node-a", "-o", "json"]);
    let node: serde_json::Value = serde_json::from_str(&c.ok(&args)).unwrap();
    assert_eq!(node["status"]["address"]["tcp"], addr.to_string());
    assert_eq!(
        node["status"]["address"]["socket"],
        a.socket().display().to_string()
    );
    // The local agent sees what was applied remotely.
    let local = a.vmctl(&["get", "vm", "web", "-o", "name"], None);
    assert_eq!(stdout(&local).trim(), "vm/web");

    c.ok(&["delete", "vm", "web", "--wait", "--timeout", "60"]);
    let gone = c.vmctl(&["get", "vm", "web"], None);
    assert_eq!(gone.status.code(), Some(1), "{}", stderr(&gone));

    // No local agent was started for any of it.
    assert!(!c.dir.path().join("xdg-data/vmctl").exists());

    // `use-context local` goes back to the local socket (none here).
    c.ok(&["config", "use-context", "local"]);
    let out = c.vmctl(&["get", "vm", "--no-autostart"], None);
    assert!(
        stderr(&out).contains("vmctl::agent::unreachable") && stderr(&out).contains("agent.sock"),
        "{}",
        stderr(&out)
    );
    let unknown = c.vmctl(&["config", "use-context", "nope"], None);
    assert!(
        stderr(&unknown).contains("vmctl::config::contexts"),
        "{}",
        stderr(&unknown)
    );
}

#[test]
fn a_client_certificate_of_another_ca_is_refused_and_logged() {
    let c = Cluster::new();
    let addr = free_addr("127.0.0.22");
    let server = format!("https://{addr}");
    c.init(&server);
    let a = tls_agent(addr, &c.issue_agent("node-a", "127.0.0.22"));
    // Another cluster's admin, pointed at this agent (with this
    // cluster's CA to check the agent by: only the client is foreign).
    let other = Cluster::new();
    other.init(&server);
    let theirs = other.user_dir("admin");
    let out = c.vmctl(
        &[
            "--server",
            &server,
            "--context",
            "local",
            "--certificate-authority",
            c.user_dir("admin").join("ca.crt").to_str().unwrap(),
            "--client-certificate",
            theirs.join("user.crt").to_str().unwrap(),
            "--client-key",
            theirs.join("user.key").to_str().unwrap(),
            "get",
            "vm",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("vmctl::tls::handshake"), "{err}");
    assert!(err.contains("not issued by the cluster's CA"), "{err}");
    let log = wait_for_log(&a, "not issued by the cluster CA");
    assert!(
        log.contains("TLS handshake refused") && log.contains("not issued by the cluster CA"),
        "{log}"
    );
    // (The log may be coloured: `peer`, then `=`, then the address.)
    assert!(
        log.contains("peer") && log.contains("127.0.0.1:"),
        "the peer's address is logged: {log}"
    );
    // The other cluster's context, whole: its CA does not vouch for this
    // agent's certificate either.
    let out = other.vmctl(&["get", "vm"], None);
    assert!(
        stderr(&out).contains("is not issued by the CA of the certificate-authority file"),
        "{}",
        stderr(&out)
    );
}

/// A TLS client with this cluster's CA and no certificate of its own.
fn tls_without_client_certificate(ca: &Path, addr: SocketAddr) -> std::io::Result<String> {
    use vmctl_tls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for c in
        <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::pem_slice_iter(
            &pem,
        )
    {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(vmctl_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = vmctl_tls::server_name(&addr.ip().to_string()).unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    tls.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn no_client_certificate_and_plaintext_http_are_refused_and_logged() {
    let c = Cluster::new();
    let addr = free_addr("127.0.0.23");
    c.init(&format!("https://{addr}"));
    let a = tls_agent(addr, &c.issue_agent("node-a", "127.0.0.23"));

    let answer = tls_without_client_certificate(&c.user_dir("admin").join("ca.crt"), addr);
    assert!(
        !answer.as_deref().unwrap_or("").contains("200"),
        "answered without a client certificate: {answer:?}"
    );
    let log = wait_for_log(&a, "presented no certificate");
    assert!(log.contains("the client presented no certificate"), "{log}");

    let mut plain = TcpStream::connect(addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain
        .write_all(b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    let got = String::from_utf8_lossy(&got);
    assert!(!got.contains("HTTP/1.1"), "plaintext HTTP answered: {got}");
    let log = wait_for_log(&a, "does not speak TLS");
    assert!(log.contains("the client does not speak TLS"), "{log}");

    // `vmctl --server http://…` is refused before anything is sent.
    let out = c.vmctl(&["--server", &format!("http://{addr}"), "get", "vm"], None);
    assert!(
        stderr(&out).contains("the scheme must be https"),
        "{}",
        stderr(&out)
    );
}

/// The fake driver has no serial console or SSH server; the tunnel's
/// target is the VM's `sshHost:sshPort`, so a TCP echo server there
/// stands for the guest. Upgraded streams (console, tunnel) over TLS are
/// relayed through the client's runtime.
#[test]
fn the_ssh_tunnel_streams_both_ways_over_tls() {
    let c = Cluster::new();
    let addr = free_addr("127.0.0.24");
    c.init(&format!("https://{addr}"));
    let _a = tls_agent(addr, &c.issue_agent("node-a", "127.0.0.24"));
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("VMFile.kdl");
    std::fs::write(
        &f,
        "vm \"tun\" {\n    image-url \"https://example.com/debian.qcow2\"\n}\n",
    )
    .unwrap();
    c.ok(&[
        "apply",
        "-f",
        f.to_str().unwrap(),
        "--wait",
        "--timeout",
        "60",
    ]);
    let vm: serde_json::Value =
        serde_json::from_str(&c.ok(&["get", "vm", "tun", "-o", "json"])).unwrap();
    let rt = &vm["status"]["runtime"];
    let guest = format!(
        "{}:{}",
        rt["sshHost"].as_str().unwrap(),
        rt["sshPort"].as_u64().unwrap()
    );
    let Ok(echo) = TcpListener::bind(&guest) else {
        eprintln!("skipped: {guest} (the fake VM's SSH address) is taken on this host");
        return;
    };
    std::thread::spawn(move || {
        let (mut s, _) = echo.accept().unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
    });
    let data: String = (0..20_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let out = c.vmctl(&["tunnel", "tun"], Some(&data));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).len(), data.len());
    assert!(stdout(&out) == data, "the bytes come back unchanged");
}
