//! Issue 17 item 6: three agents (real `vmctl-agent` processes, the fake
//! driver) on one real 3-member etcd cluster, each its own node: 1,000
//! VMs with mixed node selectors applied through one agent are placed,
//! within capacity, spread, and Running; a node killed with SIGKILL is
//! marked not Ready within its lease TTL + 2 s and its VMs `NodeLost`;
//! the scheduler's agent killed, another takes over and keeps binding; the
//! killed node, restarted, runs its VMs again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmctl_store::testing::{EtcdCluster, unique_prefix};

use super::etcd::{eventually, request};

/// vCPUs a node may hand out per host CPU here (`VMCTL_CPU_ALLOCATION_RATIO`):
/// enough for a third of the VMs and some, on any test machine.
const CPU_RATIO: &str = "400";

/// The node lease TTL of the agents, seconds.
const TTL: u64 = 2;

/// One agent process.
struct Agent {
    name: String,
    dir: PathBuf,
    child: Option<Child>,
    endpoints: Vec<String>,
    prefix: String,
    zone: String,
}

impl Agent {
    fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join(format!("{}.log", self.name))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_vmctl-agent"))
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--socket")
            .arg(self.socket())
            .args(["--driver", "fake", "--store", "etcd"])
            .arg("--etcd-endpoints")
            .arg(self.endpoints.join(","))
            .args(["--etcd-prefix", &self.prefix])
            .args(["--node-name", &self.name])
            .arg("--node-labels")
            .arg(format!("zone={}", self.zone))
            .args(["--node-lease-ttl", &TTL.to_string()])
            .env("VMCTL_CPU_ALLOCATION_RATIO", CPU_RATIO)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the agent binary runs");
        self.child = Some(child);
    }

    /// SIGKILL: no lease revoked, nothing written.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", self.name))).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn health(socket: &Path) -> Option<Value> {
    request(socket, "GET", "/v1/healthz", "").map(|(_, h)| h)
}

/// Every VM: name → (phase, nodeName, Ready condition's reason).
fn vms(socket: &Path) -> BTreeMap<String, (String, String, String)> {
    let Some((200, list)) = request(socket, "GET", "/v1/objects/vm", "") else {
        return BTreeMap::new();
    };
    let items = list["items"].as_array().cloned().unwrap_or_default();
    items
        .iter()
        .map(|o| {
            let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            let ready = o["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .map(|c| text(&c["reason"]))
                .unwrap_or_default();
            (
                text(&o["metadata"]["name"]),
                (
                    text(&o["status"]["phase"]),
                    text(&o["status"]["nodeName"]),
                    ready,
                ),
            )
        })
        .collect()
}

fn node_ready(socket: &Path, name: &str) -> Option<String> {
    let (code, o) = request(socket, "GET", &format!("/v1/objects/node/{name}"), "")?;
    (code == 200).then(|| {
        o["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
            .map(|c| {
                format!(
                    "{}/{}",
                    c["status"].as_str().unwrap_or(""),
                    c["reason"].as_str().unwrap_or("")
                )
            })
            .unwrap_or_default()
    })
}

/// VM `i`'s manifest: `selector` as its node selector, 1 vCPU, 32 MiB.
fn vm(i: usize, selector: Option<&str>) -> Value {
    let mut spec = json!({"image": "img", "vcpus": 1, "memoryMib": 32});
    if let Some(zone) = selector {
        spec["nodeSelector"] = json!({"zone": zone});
    }
    json!({"apiVersion": "vmctl/v1alpha1", "kind": "VirtualMachine",
           "metadata": {"name": format!("vm{i:04}")}, "spec": spec})
}

fn apply(socket: &Path, objects: Vec<Value>) {
    let body = json!({ "objects": objects }).to_string();
    let (code, out) = request(socket, "POST", "/v1/apply", &body).expect("the agent answers");
    assert_eq!(code, 200, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_place_a_thousand_vms_and_survive_losing_a_node_and_the_scheduler() {
    let cluster = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
        .await
        .unwrap()
        .expect("etcd starts (scripts/install-prereqs installs etcd-server)");
    let prefix = unique_prefix();
    let root = tempfile::tempdir().unwrap();
    let mut agents: Vec<Agent> = ["a", "b", "c"]
        .iter()
        .map(|z| {
            let dir = root.path().join(format!("node-{z}"));
            std::fs::create_dir_all(&dir).unwrap();
            Agent {
                name: format!("node-{z}"),
                dir,
                child: None,
                endpoints: cluster.endpoints(),
                prefix: prefix.clone(),
                zone: (*z).to_owned(),
            }
        })
        .collect();
    // A first, so that it holds the agent lease (the scheduler).
    agents[0].start();
    let s = agents[0].socket();
    eventually("A runs the scheduler", Duration::from_secs(30), || {
        health(&s).is_some_and(|h| h["controllers"] == "running")
    })
    .await;
    agents[1].start();
    agents[2].start();
    let sockets: Vec<PathBuf> = agents.iter().map(Agent::socket).collect();
    let s = sockets[0].clone();
    eventually("three nodes Ready", Duration::from_secs(30), || {
        ["node-a", "node-b", "node-c"]
            .iter()
            .all(|n| node_ready(&s, n).as_deref() == Some("True/AgentReady"))
    })
    .await;

    // 1,000 VMs: 200 for zone a, 100 for zone b, the rest anywhere.
    let selector = |i: usize| match i % 10 {
        0 | 1 => Some("a"),
        2 => Some("b"),
        _ => None,
    };
    let mut objects = vec![json!({"apiVersion": "vmctl/v1alpha1", "kind": "Image",
        "metadata": {"name": "img"}, "spec": {"source": {"path": "/images/img.qcow2"}}})];
    objects.extend((0..1000).map(|i| vm(i, selector(i))));
    let t = Instant::now();
    apply(&sockets[0], objects);
    let s = sockets[0].clone();
    let mut last = BTreeMap::new();
    eventually("1,000 VMs Running", Duration::from_secs(180), || {
        last = vms(&s);
        last.len() == 1000 && last.values().all(|v| v.0 == "Running")
    })
    .await;
    eprintln!("1,000 VMs applied → Running in {:?}", t.elapsed());
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for (name, (_, node, _)) in &last {
        let i: usize = name[2..].parse().unwrap();
        if let Some(zone) = selector(i) {
            assert_eq!(node, &format!("node-{zone}"), "{name} is off its selector");
        }
        *per_node.entry(node.clone()).or_default() += 1;
    }
    eprintln!("VMs per node: {per_node:?}");
    // Within capacity: each node's allocatable vCPUs cover its VMs.
    for n in ["node-a", "node-b", "node-c"] {
        let (_, o) = request(&sockets[0], "GET", &format!("/v1/objects/node/{n}"), "").unwrap();
        let vcpus = o["status"]["allocatable"]["vcpus"].as_u64().unwrap();
        assert!(
            per_node[n] as u64 <= vcpus,
            "{n}: {} VMs, {vcpus} vCPUs",
            per_node[n]
        );
        // Spread: the unconstrained VMs even out the nodes, within ±10 %.
        let share = per_node[n] as f64 / 1000.0 * 3.0;
        assert!((0.9..=1.1).contains(&share), "{n}: {per_node:?}");
    }

    // kill -9 C: its Node is not Ready within TTL + 2 s, its VMs NodeLost.
    agents[2].kill();
    let killed = Instant::now();
    let s = sockets[0].clone();
    eventually("node-c not Ready", Duration::from_secs(TTL + 5), || {
        node_ready(&s, "node-c").as_deref() == Some("False/NodeStatusUnknown")
    })
    .await;
    let marked = killed.elapsed();
    eprintln!("node-c marked not Ready {marked:?} after SIGKILL");
    // The heartbeat every TTL/3 + TTL + 2 s, and this poll's 100 ms.
    assert!(
        marked <= Duration::from_secs(TTL + 2) + Duration::from_millis(TTL * 1000 / 3 + 300),
        "{marked:?}"
    );
    let on_c = per_node["node-c"];
    eventually("node-c's VMs NodeLost", Duration::from_secs(20), || {
        last = vms(&s);
        last.values()
            .filter(|v| v.1 == "node-c" && v.2 == "NodeLost")
            .count()
            == on_c
    })
    .await;

    // kill -9 A (the scheduler's agent): B takes over and binds new VMs.
    agents[0].kill();
    let killed = Instant::now();
    let s = sockets[1].clone();
    eventually("B runs the scheduler", Duration::from_secs(20), || {
        health(&s).is_some_and(|h| h["controllers"] == "running")
    })
    .await;
    eprintln!(
        "B took the scheduler over {:?} after SIGKILL of A",
        killed.elapsed()
    );
    apply(&sockets[1], (1000..1010).map(|i| vm(i, None)).collect());
    eventually(
        "new VMs bound to B and Running",
        Duration::from_secs(30),
        || {
            last = vms(&s);
            (1000..1010).all(|i| {
                last.get(&format!("vm{i:04}"))
                    .is_some_and(|v| v.0 == "Running" && v.1 == "node-b")
            })
        },
    )
    .await;

    // C restarted: it runs its VMs again (the fake driver's instances died
    // with it: each is started again), as node-c.
    agents[2].start();
    eventually(
        "node-c's VMs Ready again on node-c",
        Duration::from_secs(60),
        || {
            last = vms(&s);
            let mine: Vec<_> = last.values().filter(|v| v.1 == "node-c").collect();
            mine.len() == on_c && mine.iter().all(|v| v.0 == "Running" && v.2 != "NodeLost")
        },
    )
    .await;
    for a in &agents {
        assert!(!a.log().contains("panicked"), "{}: {}", a.name, a.log());
    }
    drop(agents);
    drop(cluster);
}
