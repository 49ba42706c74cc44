//! 1,000 VMs applied → Ready through the agent, sled and etcd side by side
//! in one run (a plain harness: the figure is a wall-clock time).
//!
//! `cargo bench -p vmctl-agent --bench ready`
//!
//! Each run starts a real agent in process (`run_until`, `--driver fake`,
//! its own data dir and socket), posts one Image and N VirtualMachines to
//! `/v1/apply` over the Unix socket (batches of 250, as `vmctl apply`
//! would), and polls `/v1/objects/vm` every 100 ms until every VM has the
//! condition `Ready=True`. The time is from the first apply request to
//! the poll that saw them all. etcd: a 3-member cluster on 127.0.0.1
//! started by the bench, each run under its own key prefix.
//! `VMCTL_BENCH_VMS` (default 1000) and `VMCTL_BENCH_RUNS` (default 3)
//! change the size; the median run is printed.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use vmctl_agent::{AgentConfig, StoreConfig, run_until};
use vmctl_store::testing::{EtcdCluster, unique_prefix};

/// One HTTP/1.1 request over the agent's socket: status and JSON body.
fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, serde_json::Value)> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n")?.1;
    Some((status, serde_json::from_str(body).unwrap_or_default()))
}

fn ready(o: &serde_json::Value) -> bool {
    o["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// Seconds from the first apply request to every one of `n` VMs Ready.
fn ready_time(rt: &tokio::runtime::Runtime, store: StoreConfig, n: usize) -> Duration {
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

    let start = Instant::now();
    let image = json!({"apiVersion": "vmctl/v1alpha1", "kind": "Image", "metadata": {"name": "img"},
        "spec": {"source": {"path": "/images/img.qcow2"}}});
    let vms: Vec<_> = (0..n)
        .map(|i| {
            json!({"apiVersion": "vmctl/v1alpha1", "kind": "VirtualMachine",
                "metadata": {"name": format!("vm{i}")}, "spec": {"image": "img"}})
        })
        .collect();
    let mut batches: Vec<Vec<serde_json::Value>> = vec![vec![image]];
    batches.extend(vms.chunks(250).map(<[_]>::to_vec));
    for objects in batches {
        let (code, body) = request(
            &socket,
            "POST",
            "/v1/apply",
            &json!({ "objects": objects }).to_string(),
        )
        .expect("the agent answers apply");
        assert_eq!(code, 200, "{body}");
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    let took = loop {
        let (code, list) = request(&socket, "GET", "/v1/objects/vm", "").expect("list answers");
        assert_eq!(code, 200, "{list}");
        let items = list["items"].as_array().expect("a list has items");
        if items.iter().filter(|o| ready(o)).count() == n {
            break start.elapsed();
        }
        assert!(Instant::now() < deadline, "{n} VMs not Ready after 600 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = stop.send(());
    rt.block_on(agent).unwrap().unwrap();
    took
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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
    let fmt = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (s, e) = (median(sled.clone()), median(etcd.clone()));
    println!("| store | {n} VMs applied → Ready, median s | runs s |");
    println!("|---|---|---|");
    println!("| sled (fsync) | {:.2} | {} |", s.as_secs_f64(), fmt(&sled));
    println!(
        "| etcd (3 members, loopback) | {:.2} | {} |",
        e.as_secs_f64(),
        fmt(&etcd)
    );
    println!("etcd / sled: {:.2}×", e.as_secs_f64() / s.as_secs_f64());
}
