//! Issue 17 item 7: 1,000 VMs over 3 nodes applied → Running, and the
//! scheduler's bindings per second (a plain harness: wall-clock times).
//!
//! `cargo bench -p vmctl-agent --bench cluster`
//!
//! Each run starts a 3-member etcd cluster's worth of agents: three
//! `vmctl-agent` processes (the bench profile's build, `--driver fake`,
//! `--store etcd`, each its own node, data dir and socket, under a new key
//! prefix of one shared 3-member etcd cluster on 127.0.0.1), waits for the
//! three Nodes to be Ready, then posts one Image and N unconstrained VMs
//! to the first agent's `/v1/apply` in batches of 250 (as `vmctl apply`
//! would) while following `/v1/watch` from before the first apply. It
//! times, from the first apply request:
//!
//! * **bound**: every VM's status names a node (the scheduler's bindings);
//!   bindings per second = N ÷ (last binding − first binding);
//! * **Running**: every VM's last status has `phase: Running` (each on its
//!   node's agent).
//!
//! `VMCTL_BENCH_VMS` (default 1000) and `VMCTL_BENCH_RUNS` (default 3)
//! change the size; medians are printed, and the VMs per node of the last
//! run.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{apply_in_batches, env_usize, follow, last_seq, median, request};
use serde_json::json;
use vmctl_api::Kind;
use vmctl_store::Change;
use vmctl_store::testing::{EtcdCluster, unique_prefix};

/// An agent process, killed when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(dir: &Path, name: &str, endpoints: &[String], prefix: &str) -> Agent {
    let child = Command::new(env!("CARGO_BIN_EXE_vmctl-agent"))
        .arg("--data-dir")
        .arg(dir.join(name))
        .arg("--socket")
        .arg(dir.join(format!("{name}.sock")))
        .args(["--driver", "fake", "--store", "etcd"])
        .arg("--etcd-endpoints")
        .arg(endpoints.join(","))
        .args(["--etcd-prefix", prefix, "--node-name", name])
        // Room for every VM on any one node: placement is by spread here.
        .env("VMCTL_CPU_ALLOCATION_RATIO", "1000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the agent binary runs");
    Agent(child)
}

fn node_ready(socket: &Path, name: &str) -> bool {
    request(socket, "GET", &format!("/v1/objects/node/{name}"), "").is_some_and(|(c, o)| {
        c == 200
            && o["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
    })
}

/// What one run measured.
struct Run {
    bound: Duration,
    running: Duration,
    bindings_per_s: f64,
    per_node: BTreeMap<String, usize>,
}

fn run(cluster: &EtcdCluster, n: usize) -> Run {
    let dir =
        tempfile::tempdir_in(std::env::var_os("VMCTL_BENCH_DIR").unwrap_or(".".into())).unwrap();
    let prefix = unique_prefix();
    let names = ["node-a", "node-b", "node-c"];
    let mut agents = Vec::new();
    for name in names {
        agents.push(start_agent(dir.path(), name, &cluster.endpoints(), &prefix));
        // The first holds the agent lease (the scheduler), as in a cluster
        // brought up one host at a time.
        let socket: PathBuf = dir.path().join(format!("{name}.sock"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !node_ready(&socket, name) {
            assert!(Instant::now() < deadline, "{name} did not become Ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let socket = dir.path().join("node-a.sock");
    let seq_before = last_seq(&socket);
    let watcher = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            let mut node: HashMap<String, String> = HashMap::new();
            let mut running = std::collections::HashSet::new();
            let (mut first_bound, mut all_bound) = (None, None);
            follow(&socket, seq_before, |ev| {
                if ev.object.kind != Kind::VirtualMachine {
                    return false;
                }
                if let Change::StatusUpdated { status } = &ev.change {
                    if let Some(n) = status["nodeName"].as_str() {
                        first_bound.get_or_insert_with(Instant::now);
                        node.insert(ev.object.name.clone(), n.to_owned());
                    }
                    if status["phase"] == "Running" {
                        running.insert(ev.object.name.clone());
                    } else {
                        running.remove(&ev.object.name);
                    }
                }
                if all_bound.is_none() && node.len() == n {
                    all_bound = Some(Instant::now());
                }
                running.len() == n
            });
            (
                first_bound.unwrap(),
                all_bound.unwrap(),
                Instant::now(),
                node,
            )
        })
    };
    let start = Instant::now();
    let vms: Vec<_> = (0..n)
        .map(|i| {
            json!({"apiVersion": "vmctl/v1alpha1", "kind": "VirtualMachine",
                "metadata": {"name": format!("vm{i}")},
                "spec": {"image": "img", "memoryMib": 64}})
        })
        .collect();
    apply_in_batches(&socket, vms);
    let (first_bound, all_bound, all_running, node) =
        watcher.join().expect("the watch saw every VM Running");
    let mut per_node = BTreeMap::new();
    for n in node.values() {
        *per_node.entry(n.clone()).or_default() += 1;
    }
    drop(agents);
    Run {
        bound: all_bound - start,
        running: all_running - start,
        bindings_per_s: n as f64 / (all_bound - first_bound).as_secs_f64().max(1e-6),
        per_node,
    }
}

fn main() {
    let n = env_usize("VMCTL_BENCH_VMS", 1000);
    let runs = env_usize("VMCTL_BENCH_RUNS", 3).max(1);
    let cluster = EtcdCluster::start(3).expect("etcd starts (scripts/install-prereqs)");
    let results: Vec<Run> = (0..runs).map(|_| run(&cluster, n)).collect();
    drop(cluster);
    let secs = |f: fn(&Run) -> Duration| {
        results
            .iter()
            .map(|r| format!("{:.2}", f(r).as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut rates: Vec<f64> = results.iter().map(|r| r.bindings_per_s).collect();
    rates.sort_by(f64::total_cmp);
    println!("| {n} VMs over 3 nodes (fake driver, etcd 3 members) | median | runs |");
    println!("|---|---|---|");
    println!(
        "| applied → all bound, s | {:.2} | {} |",
        median(results.iter().map(|r| r.bound).collect()).as_secs_f64(),
        secs(|r| r.bound)
    );
    println!(
        "| applied → all Running, s | {:.2} | {} |",
        median(results.iter().map(|r| r.running).collect()).as_secs_f64(),
        secs(|r| r.running)
    );
    println!(
        "| scheduler bindings per second | {:.0} | {} |",
        rates[rates.len() / 2],
        rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "VMs per node (last run): {:?}",
        results.last().map(|r| &r.per_node)
    );
}
