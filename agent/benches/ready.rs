//! 1,000 VMs applied → Ready through the agent, sled and etcd side by side
//! in one run (a plain harness: the figure is a wall-clock time).
//!
//! `cargo bench -p vmctl-agent --bench ready`
//!
//! Each run starts a real agent in process (`run_until`, `--driver fake`,
//! its own data dir and socket), posts one Image and N VirtualMachines to
//! `/v1/apply` over the Unix socket (batches of 250, as `vmctl apply`
//! would), and follows `/v1/watch` from the store's resourceVersion before
//! the first apply, as `vmctl apply --wait` does, until the last status
//! written of every VM has the condition `Ready=True`. The time is from
//! the first apply request to the event that made the last VM Ready.
//! (Polling `/v1/objects/vm`, as this bench first did, serialised and
//! parsed all 1,000 VMs ten times a second in the unoptimized build: a
//! good part of the CPU the agent had on this 2-core machine.) etcd: a 3-member cluster on 127.0.0.1
//! started by the bench, each run under its own key prefix.
//! `VMCTL_BENCH_VMS` (default 1000) and `VMCTL_BENCH_RUNS` (default 3)
//! change the size; the median run is printed, with the store writes per
//! VM (the store's resourceVersion at the end minus at the start, from
//! `/v1/healthz`'s `lastSeq`, over N: every write, note or status of the
//! run, the Image's few included, counts once).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{apply_in_batches, env_usize, follow, last_seq, median, request};
use serde_json::json;
use vmctl_agent::{AgentConfig, StoreConfig, run_until};
use vmctl_api::Kind;
use vmctl_store::Change;
use vmctl_store::testing::{EtcdCluster, unique_prefix};

fn ready(status: &serde_json::Value) -> bool {
    status["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// Follows `/v1/watch?after=AFTER` until `n` VMs are Ready by their last
/// status event; returns when the last one became so.
fn watch_until_ready(socket: &Path, after: u64, n: usize) -> Instant {
    let mut ready_vms = std::collections::HashSet::new();
    follow(socket, after, |ev| {
        if ev.object.kind != Kind::VirtualMachine {
            return false;
        }
        match &ev.change {
            Change::StatusUpdated { status } if ready(status) => {
                ready_vms.insert(ev.object.name.clone());
            }
            Change::StatusUpdated { .. } | Change::Deleted => {
                ready_vms.remove(&ev.object.name);
            }
            _ => {}
        }
        ready_vms.len() == n
    });
    Instant::now()
}

/// One run: seconds from the first apply request to every one of `n` VMs
/// Ready, and the store writes that took per VM.
fn ready_time(rt: &tokio::runtime::Runtime, store: StoreConfig, n: usize) -> (Duration, f64) {
    let dir =
        tempfile::tempdir_in(std::env::var_os("VMCTL_BENCH_DIR").unwrap_or(".".into())).unwrap();
    let socket = dir.path().join("agent.sock");
    let mut cfg = AgentConfig::new(dir.path().join("data"));
    cfg.socket = socket.clone();
    cfg.driver = "fake".into();
    cfg.store = store;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = rt.spawn(run_until(cfg, async {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !request(&socket, "GET", "/v1/healthz", "")
        .is_some_and(|(c, h)| c == 200 && h.get("storeError").is_none())
    {
        assert!(
            Instant::now() < deadline,
            "the agent did not become healthy"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let seq_before = last_seq(&socket);
    let watcher = {
        let socket = socket.clone();
        std::thread::spawn(move || watch_until_ready(&socket, seq_before, n))
    };
    let start = Instant::now();
    let vms: Vec<_> = (0..n)
        .map(|i| {
            json!({"apiVersion": "vmctl/v1alpha1", "kind": "VirtualMachine",
                "metadata": {"name": format!("vm{i}")}, "spec": {"image": "img"}})
        })
        .collect();
    apply_in_batches(&socket, vms);
    eprintln!("  applied in {:.2} s", start.elapsed().as_secs_f64());
    let took = watcher.join().expect("the watch saw every VM Ready") - start;
    // What the watch said, as a listing says it.
    let (code, list) = request(&socket, "GET", "/v1/objects/vm", "").expect("list answers");
    assert_eq!(code, 200, "{list}");
    let items = list["items"].as_array().expect("a list has items");
    assert_eq!(items.iter().filter(|o| ready(&o["status"])).count(), n);
    let writes = last_seq(&socket).saturating_sub(seq_before) as f64 / n as f64;
    let _ = stop.send(());
    rt.block_on(agent).unwrap().unwrap();
    (took, writes)
}

fn main() {
    let n = env_usize("VMCTL_BENCH_VMS", 1000);
    let runs = env_usize("VMCTL_BENCH_RUNS", 3).max(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sled: Vec<_> = (0..runs)
        .map(|_| ready_time(&rt, StoreConfig::Sled, n))
        .collect();
    let cluster = EtcdCluster::start(3).expect("etcd starts (scripts/install-prereqs)");
    let etcd: Vec<_> = (0..runs)
        .map(|_| {
            ready_time(
                &rt,
                StoreConfig::Etcd {
                    endpoints: cluster.endpoints(),
                    prefix: unique_prefix(),
                },
                n,
            )
        })
        .collect();
    drop(cluster);
    let times = |v: &[(Duration, f64)]| -> Vec<Duration> { v.iter().map(|r| r.0).collect() };
    let fmt = |v: &[(Duration, f64)]| {
        v.iter()
            .map(|(d, _)| format!("{:.2}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let writes = |v: &[(Duration, f64)]| {
        v.iter()
            .map(|(_, w)| format!("{w:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (s, e) = (median(times(&sled)), median(times(&etcd)));
    println!("| store | {n} VMs applied → Ready, median s | runs s | store writes per VM |");
    println!("|---|---|---|---|");
    println!(
        "| sled (fsync) | {:.2} | {} | {} |",
        s.as_secs_f64(),
        fmt(&sled),
        writes(&sled)
    );
    println!(
        "| etcd (3 members, loopback) | {:.2} | {} | {} |",
        e.as_secs_f64(),
        fmt(&etcd),
        writes(&etcd)
    );
    println!("etcd / sled: {:.2}×", e.as_secs_f64() / s.as_secs_f64());
}
