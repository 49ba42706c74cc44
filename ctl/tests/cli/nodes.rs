//! Nodes (issue 17 item 1): each agent registers its own, `vmctl get
//! nodes` / `describe node` / `history node` show it, users cannot apply
//! one, and a Ready one cannot be deleted. Runs on sled and, with
//! `VMCTL_TEST_STORE=etcd`, on etcd.

use std::time::{Duration, Instant};

use crate::agent::{Agent, stderr, test_store_env};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `vmctl ARGS` against `a`, asserting success; its stdout.
fn ok(a: &Agent, args: &[&str]) -> String {
    let out = a.vmctl(args, None);
    assert!(out.status.success(), "vmctl {args:?}: {}", stderr(&out));
    stdout(&out)
}

/// The table's rows, each split on whitespace (the header first).
fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

fn host_cpus() -> usize {
    std::thread::available_parallelism().unwrap().get()
}

/// Issue 17 item 1: the agent's Node is Ready at once, named by
/// `VMCTL_NODE_NAME`, labelled by `VMCTL_NODE_LABELS`, with the host's
/// vCPUs and memory, the agent's socket as its address, and the VMs on
/// it counted; `vmctl get` without a kind leaves it out, a manifest of
/// kind Node is refused, and a Ready Node cannot be deleted.
#[test]
fn get_nodes_shows_the_agents_node_ready_with_its_labels_and_capacity() {
    let a = Agent::start_with(
        "fake",
        &[
            ("VMCTL_NODE_NAME", "node-a"),
            ("VMCTL_NODE_LABELS", "zone=a,rack=1"),
        ],
    );
    let t = rows(&ok(&a, &["get", "nodes"]));
    assert_eq!(t[0], ["NAME", "STATUS", "VCPUS", "MEMORY", "AGE"]);
    assert_eq!(t.len(), 2, "one node: {t:?}");
    let row = &t[1];
    assert_eq!((row[0].as_str(), row[1].as_str()), ("node-a", "Ready"));
    assert_eq!(row[2], host_cpus().to_string(), "the host's vCPUs");
    let mib: u64 = row[3].strip_suffix("Mi").unwrap().parse().unwrap();
    assert!(mib > 0, "{row:?}");

    let t = rows(&ok(&a, &["get", "node", "-o", "wide"]));
    assert_eq!(
        t[0],
        [
            "NAME",
            "STATUS",
            "VCPUS",
            "MEMORY",
            "ACCEL",
            "LABELS",
            "VMS",
            "ALLOCATED",
            "ADDRESS",
            "AGE"
        ]
    );
    let socket = a.socket().display().to_string();
    // Allocatable: 16 vCPUs per CPU, memory as it is.
    let allocated = format!("0/{}vCPU,0/{}", host_cpus() * 16, row[3]);
    assert_eq!(
        t[1][..9],
        [
            "node-a",
            "Ready",
            &host_cpus().to_string(),
            &row[3],
            "-",
            "rack=1,zone=a",
            "0",
            &allocated,
            &socket
        ]
    );

    let j: serde_json::Value =
        serde_json::from_str(&ok(&a, &["get", "node", "node-a", "-o", "json"])).unwrap();
    assert_eq!(j["kind"], "Node");
    assert_eq!(j["metadata"]["labels"]["zone"], "a");
    assert_eq!(j["metadata"]["labels"]["rack"], "1");
    let st = &j["status"];
    assert_eq!(st["capacity"]["vcpus"], host_cpus() as u64);
    assert_eq!(st["capacity"]["memoryMib"], mib);
    assert!(st["capacity"]["diskGib"].is_u64(), "{st}");
    assert_eq!(
        st["allocatable"]["vcpus"].as_u64(),
        Some(host_cpus() as u64 * 16),
        "{st}"
    );
    assert_eq!(st["allocatable"]["memoryMib"], st["capacity"]["memoryMib"]);
    assert_eq!(st["address"]["socket"], socket.as_str());
    assert_eq!(st["driver"], "fake");
    assert!(!st["agentVersion"].as_str().unwrap().is_empty());
    assert!(st["lastHeartbeatTime"].is_string(), "{st}");
    let ready = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&"True".into(), &"AgentReady".into())
    );
    // Only on etcd is there a node lease (whose TTL judges the heartbeat).
    let on_etcd = !test_store_env().is_empty();
    assert_eq!(
        st["leaseTtlSeconds"].as_u64(),
        on_etcd.then_some(10),
        "{st}"
    );

    // A VM on it is counted and listed.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("VMFile.kdl");
    std::fs::write(
        &f,
        "vm \"web\" {\n    image-url \"https://example.com/debian.qcow2\"\n    vcpus 1\n}\n",
    )
    .unwrap();
    let fs = f.to_str().unwrap();
    ok(&a, &["apply", "-f", fs, "--wait", "--timeout", "60"]);
    let t = rows(&ok(&a, &["get", "nodes", "-o", "wide"]));
    assert_eq!(t[1][6], "1", "{t:?}");
    // Its vCPU and memory (the default 1024 MiB) are allocated on the node.
    assert!(t[1][7].starts_with("1/"), "{t:?}");
    assert!(t[1][7].contains(",1024/"), "{t:?}");
    // Where the VM's instance is (status.nodeName), in `get vm -o wide`
    // and, last, in `list`.
    let t = rows(&ok(&a, &["get", "vm", "-o", "wide"]));
    let col = t[0]
        .iter()
        .position(|h| h == "NODE")
        .expect("a NODE column");
    assert_eq!(t[1][col], "node-a", "{t:?}");
    let t = rows(&ok(&a, &["list"]));
    assert_eq!(t[0].last().map(String::as_str), Some("NODE"), "{t:?}");
    assert_eq!(t[1].last().map(String::as_str), Some("node-a"), "{t:?}");
    let d = ok(&a, &["describe", "node", "node-a"]);
    for want in [
        "Name:             node-a",
        "Kind:             Node",
        "Status:           Ready",
        "Labels:           rack=1, zone=a",
        &format!("Address:          {socket}"),
        "  vcpus",
        "VMs:",
        "  web",
    ] {
        assert!(d.contains(want), "{want:?} not in:\n{d}");
    }
    assert!(
        rows(&d)
            .iter()
            .any(|r| r.len() >= 3 && r[..3] == ["Ready", "True", "AgentReady"]),
        "{d}"
    );
    let h = ok(&a, &["history", "node", "node-a"]);
    assert!(h.contains("applied"), "{h}");
    assert!(h.contains("Ready True (AgentReady)"), "{h}");

    // `vmctl get` lists what was applied, not the node.
    let all = ok(&a, &["get"]);
    assert!(!all.contains("node-a"), "{all}");
    assert!(all.contains("web"), "{all}");

    // Nodes are the agents' to write.
    let manifest = "apiVersion: vmctl/v1alpha1\nkind: Node\nmetadata:\n  name: node-x\nspec: {}\n";
    let out = a.vmctl(&["apply", "-f", "-"], Some(manifest));
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("Nodes are registered by agents"),
        "{}",
        stderr(&out)
    );
    let out = a.vmctl(&["delete", "node", "node-a"], None);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Node node-a is Ready"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("vmctl::node::ready"),
        "{}",
        stderr(&out)
    );
    assert_eq!(rows(&ok(&a, &["get", "nodes"]))[1][1], "Ready");
}

/// An agent restarted under another node name: its old Node was marked
/// stopped when it stopped (`AgentStopped`) and, not Ready, can be
/// deleted; the new one is Ready and cannot.
#[test]
fn a_stopped_agents_node_is_not_ready_and_can_be_deleted() {
    let mut a = Agent::start_with("fake", &[("VMCTL_NODE_NAME", "before")]);
    assert_eq!(
        rows(&ok(&a, &["get", "nodes"]))[1][..2],
        ["before", "Ready"]
    );
    assert!(a.stop().success());
    a.set_env("VMCTL_NODE_NAME", "after");
    a.spawn();
    let t = rows(&ok(&a, &["get", "nodes"]));
    let state = |name: &str| t.iter().find(|r| r[0] == name).map(|r| r[1].clone());
    assert_eq!(state("before").as_deref(), Some("NotReady"), "{t:?}");
    assert_eq!(state("after").as_deref(), Some("Ready"), "{t:?}");
    let d = ok(&a, &["describe", "node", "before"]);
    assert!(d.contains("AgentStopped"), "{d}");
    assert!(d.contains("the agent stopped at "), "{d}");

    let out = a.vmctl(&["delete", "node", "after"], None);
    assert!(!out.status.success(), "a Ready node was deleted");
    ok(&a, &["delete", "node", "before"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = rows(&ok(&a, &["get", "nodes"]));
        if t.iter().all(|r| r[0] != "before") {
            assert!(t.iter().any(|r| r[0] == "after"), "{t:?}");
            break;
        }
        assert!(Instant::now() < deadline, "still listed: {t:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
