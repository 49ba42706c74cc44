//! Many hosts, one cluster, with real QEMU (issue 17 item 6): two agents
//! on one prefix of the shared 3-member etcd cluster, each its own node
//! on its own 127.0.0.x TLS address, and a tiny guest pinned by its node
//! selector to node B. Everything is asked of agent A (its socket, or its
//! TLS port with the admin's certificate): `exec`, `log`, `console` and
//! `ssh` reach the guest on B through A's forwarding; a client
//! certificate of another CA is refused at A's door.

use std::net::{SocketAddr, TcpListener};

use super::*;

/// One node: an agent process (`vmctl agent`, which execs `vmctl-agent`)
/// with its own data directory, socket and TLS address. Its [`World`]
/// gives the local commands (`--data-dir`: the agent's socket) and, when
/// dropped, kills any QEMU left under its data directory.
struct Node {
    name: &'static str,
    addr: SocketAddr,
    child: Option<Child>,
    world: World,
}

impl Node {
    /// Starts node `name` (label `zone=ZONE`) on a free port of `ip`, on
    /// etcd at `prefix`, with the TLS files `cluster issue agent` wrote
    /// into `tls_dir`.
    fn start(name: &'static str, zone: &str, ip: &str, prefix: &str, tls_dir: &Path) -> Node {
        let addr = TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap();
        let world = World::new();
        std::fs::create_dir_all(world.data()).unwrap();
        let log = std::fs::File::create(world.dir.path().join("agent.log")).unwrap();
        let etcd = vmctl_store::testing::EtcdCluster::shared();
        let child = Command::new(crate::vmctl_bin())
            .arg("agent")
            .arg("--data-dir")
            .arg(world.data())
            .args(["--driver", "qemu", "--store", "etcd"])
            .arg("--etcd-endpoints")
            .arg(etcd.endpoints().join(","))
            .args(["--etcd-prefix", prefix, "--node-name", name])
            .arg("--node-labels")
            .arg(format!("zone={zone}"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--tls-dir")
            .arg(tls_dir)
            .env("VMCTL_ACCEL", "tcg")
            .env_remove("VMCTL_DRIVER")
            .env_remove("VMCTL_STORE")
            // Forwarding is logged at debug: the test reads what A forwarded.
            .env("RUST_LOG", "info,vmctl_agent::forward=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("vmctl agent runs");
        let node = Node {
            name,
            addr,
            child: Some(child),
            world,
        };
        wait_until(
            &format!("agent {name} answering"),
            Duration::from_secs(30),
            || node.world.agent_pid().is_some(),
        );
        node
    }

    fn server(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.world.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// SIGTERM, as a service manager stops it; SIGKILL after 20 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(child.id(), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                eprintln!("agent {} ignored SIGTERM for 20 s: killed", self.name);
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Then `world` drops: any QEMU left under this data dir is killed.
        self.stop();
    }
}

/// `vmctl ARGS` from outside any node: no local data directory, the
/// contexts file `contexts` (which `cluster init` wrote), and XDG
/// directories of the test's own, so no local agent is found or started.
fn remote(dir: &Path, contexts: &Path, args: &[&str]) -> Output {
    Command::new(crate::vmctl_bin())
        .arg("--contexts")
        .arg(contexts)
        .args(args)
        .current_dir(dir)
        .env("XDG_DATA_HOME", dir.join("xdg-data"))
        .env("XDG_CONFIG_HOME", dir.join("xdg-config"))
        .env_remove("VMCTL_DATA_DIR")
        .env_remove("VMCTL_SOCKET")
        .env_remove("VMCTL_SERVER")
        .env_remove("VMCTL_CONTEXT")
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn remote_ok(dir: &Path, contexts: &Path, args: &[&str]) -> String {
    let out = remote(dir, contexts, args);
    assert!(
        out.status.success(),
        "vmctl {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_vm_placed_on_node_b_is_reached_through_agent_a_and_a_foreign_ca_is_refused() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let ca = home.join("cluster");
    let contexts = home.join("config.yaml");
    let ca_s = ca.to_str().unwrap();
    let home_ok = |args: &[&str]| remote_ok(home, &contexts, args);

    // The CA and the admin's certificate (commands name agent A with
    // `--server` and the admin's files), and each agent's files.
    home_ok(&["cluster", "init", "--dir", ca_s]);
    for (name, ip) in [("node-a", "127.0.0.2"), ("node-b", "127.0.0.3")] {
        home_ok(&[
            "cluster",
            "issue",
            "agent",
            name,
            "--address",
            ip,
            "--dir",
            ca_s,
        ]);
    }
    let prefix = vmctl_store::testing::unique_prefix();
    let a = Node::start(
        "node-a",
        "a",
        "127.0.0.2",
        &prefix,
        &ca.join("agents/node-a"),
    );
    let b = Node::start(
        "node-b",
        "b",
        "127.0.0.3",
        &prefix,
        &ca.join("agents/node-b"),
    );
    let admin = ca.join("users/admin");
    let (ca_crt, crt, key) = (
        admin.join("ca.crt").display().to_string(),
        admin.join("user.crt").display().to_string(),
        admin.join("user.key").display().to_string(),
    );
    let server_a = a.server();
    // Through A's TLS port as the admin.
    let tls_a = |args: &[&str]| -> Output {
        let mut all = vec![
            "--server",
            &server_a,
            "--certificate-authority",
            &ca_crt,
            "--client-certificate",
            &crt,
            "--client-key",
            &key,
        ];
        all.extend(args);
        remote(home, &contexts, &all)
    };
    let tls_a_ok = |args: &[&str]| -> String {
        let out = tls_a(args);
        assert!(
            out.status.success(),
            "vmctl --server {server_a} {args:?} failed:\n{}\n{}\nagent A's log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            a.log()
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let aw = &a.world;
    wait_until("both nodes Ready", Duration::from_secs(30), || {
        let nodes = aw.ok(&["--no-autostart", "get", "nodes"]);
        [a.name, b.name].iter().all(|n| {
            nodes
                .lines()
                .any(|l| l.split_whitespace().take(2).eq([*n, "Ready"]))
        })
    });

    // Applied through A's socket; the scheduler binds it to B by its
    // selector, and B's agent boots and provisions it.
    let img = tiny_image().display().to_string();
    std::fs::write(
        aw.project().join("VMFile.kdl"),
        format!(
            r#"vm "far" {{
    image "{img}"
    memory 512
    node-selector {{
        zone "b"
    }}
    cloud-init {{
        hostname "far"
    }}
    ssh {{
        user "vm"
    }}
    provision "shell" {{
        inline "echo provisioned-on-$(hostname)"
    }}
}}
"#
        ),
    )
    .unwrap();
    let out = aw.vmctl(&["--no-autostart", "apply", "--wait", "--timeout", BOOT]);
    assert!(
        out.status.success(),
        "apply --wait through A failed:\n{}\nA's log:\n{}\nB's log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log(),
        b.log()
    );
    eprintln!("applied and Ready after {:.1}s", t0.elapsed().as_secs_f64());

    // Placed on B, shown so through A's door; B runs the QEMU, A none.
    let wide = tls_a_ok(&["get", "vm", "-o", "wide"]);
    // The cell under the header's NODE (columns are left-aligned).
    let col = wide.lines().next().unwrap().find("NODE").expect("NODE");
    let row = wide
        .lines()
        .find(|l| l.starts_with("far "))
        .unwrap_or_else(|| panic!("no row for far:\n{wide}"));
    assert_eq!(
        row[col..].split_whitespace().next(),
        Some("node-b"),
        "{wide}"
    );
    assert_eq!(b.world.qemu_pids().len(), 1, "B runs the guest");
    assert!(aw.qemu_pids().is_empty(), "A runs nothing");

    // Each stream operation, sent to A, reaches the guest on B: over A's
    // socket and over A's TLS port.
    assert_eq!(
        aw.ok(&["--no-autostart", "exec", "far", "--", "uname", "-n"])
            .trim(),
        "far"
    );
    assert_eq!(
        tls_a(&["exec", "far", "--", "sh", "-c", "exit 3"])
            .status
            .code(),
        Some(3),
        "the guest's exit code comes back through both agents"
    );
    let console_log = tls_a_ok(&["log", "far", "--console"]);
    assert!(console_log.contains("ssh ready"), "{console_log}");
    let prov_log = aw.ok(&["--no-autostart", "log", "far", "--provision"]);
    assert!(prov_log.contains("provisioned-on-far"), "{prov_log}");
    let term = aw.console_session("far", "echo con-$((6*7))\r");
    assert!(term.contains("con-42"), "console output:\n{term}");
    assert!(term.contains("detached"), "{term}");
    // ssh's ProxyCommand is `vmctl tunnel` to A's TLS port, joined to B.
    assert_eq!(tls_a_ok(&["ssh", "far", "--", "hostname"]).trim(), "far");
    assert_eq!(
        aw.ok(&["--no-autostart", "ssh", "far", "--", "true"]),
        "",
        "ssh through A's socket"
    );
    // Forwarded by A to B, each of them (A has no instance to serve them).
    let a_log = a.log();
    for path in [
        "/v1/vms/far/exec",
        "/v1/logs/far",
        "/v1/vms/far/console",
        "/v1/vms/far/ssh",
        "/v1/vms/far/tunnel",
    ] {
        assert!(
            a_log
                .lines()
                .any(|l| l.contains("forwarding") && l.contains(path) && l.contains("node-b")),
            "A forwarded {path} to node-b:\n{a_log}"
        );
    }

    // Another cluster's admin certificate, at A's door (with our CA to
    // check A by: only the client is foreign).
    let other = home.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let other_ca = other.join("cluster");
    remote_ok(
        &other,
        &other.join("config.yaml"),
        &["cluster", "init", "--dir", other_ca.to_str().unwrap()],
    );
    let theirs = other_ca.join("users/admin");
    let out = remote(
        home,
        &contexts,
        &[
            "--server",
            &server_a,
            "--certificate-authority",
            &ca_crt,
            "--client-certificate",
            theirs.join("user.crt").to_str().unwrap(),
            "--client-key",
            theirs.join("user.key").to_str().unwrap(),
            "exec",
            "far",
            "--",
            "true",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("vmctl::tls::handshake"), "{err}");
    assert!(err.contains("not issued by the cluster's CA"), "{err}");
    wait_until("A to log the refusal", Duration::from_secs(5), || {
        a.log().contains("TLS handshake refused")
    });

    // Deleted through A: B's agent stops QEMU and removes the instance.
    // Deleted through A (the file's objects: the Provision uses the VM):
    // B's agent stops QEMU and removes the instance.
    let vmfile = aw.project().join("VMFile.kdl");
    tls_a_ok(&[
        "delete",
        "-f",
        vmfile.to_str().unwrap(),
        "--wait",
        "--timeout",
        "120",
    ]);
    assert!(b.world.qemu_pids().is_empty(), "delete stopped B's QEMU");
    assert!(
        !b.world.data().join("vms/far").exists(),
        "delete removed the instance's directory on B"
    );
    let gone = tls_a(&["get", "vm", "far"]);
    assert_eq!(gone.status.code(), Some(1), "vm/far is gone");
    drop(b);
    drop(a);
    eprintln!("whole test: {:.1}s", t0.elapsed().as_secs_f64());
}
