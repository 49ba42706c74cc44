//! sled and etcd side by side, through the same `Store` trait (a plain
//! harness: the figures are throughputs and latency percentiles).
//!
//! `cargo bench -p vmctl-store --bench backends`
//!
//! * durable writes/s with 1 and 16 writers (sled: fsync; etcd: a 3-member
//!   cluster on 127.0.0.1, every write a quorum commit);
//! * write → watcher latency p50/p99 with 1 and 100 watchers;
//! * list of 10,000 objects;
//! * then `etcdctl check perf --load=l` (Debian's `etcd-client`) against
//!   the same cluster: etcd's own write throughput on this disk, the limit
//!   the etcd rows are judged against (`VMCTL_BENCH_CHECK_PERF=s|m|l|xl`
//!   picks the load, `0` skips it; it takes a minute).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use vmctl_api::{Kind, Object, ObjectMeta};
use vmctl_store::testing::{EtcdCluster, unique_prefix};
use vmctl_store::{EtcdOptions, EtcdStore, SledStore, Store};

fn vm(name: &str, spec: serde_json::Value) -> Object {
    Object::new(Kind::VirtualMachine, ObjectMeta::named(name), spec)
}

async fn writes_per_second(s: &Arc<dyn Store>, writers: usize, total: usize, tag: &str) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let s = s.clone();
            let tag = tag.to_owned();
            tokio::spawn(async move {
                for i in (w..total).step_by(writers) {
                    s.apply(vm(&format!("{tag}-{i}"), json!({"i": i})), None, None)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// p50 and p99 of write → delivery to each of `watchers` watchers.
async fn watch_latency(s: &Arc<dyn Store>, watchers: usize, writes: usize) -> (Duration, Duration) {
    let base = Instant::now();
    let from = s.last_seq().await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..watchers {
        let mut w = s.watch(from).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(writes);
            while lat.len() < writes {
                let ev = w.next().await.unwrap();
                if let vmctl_store::Change::Applied { object, .. } = &ev.change
                    && let Some(t) = object.spec["t"].as_u64()
                {
                    let now = base.elapsed();
                    lat.push(now.saturating_sub(Duration::from_nanos(t)));
                }
            }
            lat
        }));
    }
    for i in 0..writes {
        let t = base.elapsed().as_nanos() as u64;
        s.apply(vm(&format!("lat-{i}"), json!({"t": t})), None, None)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    (percentile(&all, 0.5), percentile(&all, 0.99))
}

async fn list_10k(s: &Arc<dyn Store>) -> Duration {
    writes_per_second(s, 16, 10_000, "list").await;
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let l = s.list(None).await.unwrap();
        times.push(start.elapsed());
        assert!(l.objects.len() >= 10_000);
    }
    times.sort();
    times[2]
}

async fn run(name: &str, s: Arc<dyn Store>) {
    let w1 = writes_per_second(&s, 1, 500, "w1").await;
    let w16 = writes_per_second(&s, 16, 4_000, "w16").await;
    let (p50_1, p99_1) = watch_latency(&s, 1, 300).await;
    let (p50_100, p99_100) = watch_latency(&s, 100, 300).await;
    let list = list_10k(&s).await;
    println!(
        "| {name} | {w1:.0} | {w16:.0} | {:.2} / {:.2} | {:.2} / {:.2} | {:.0} |",
        p50_1.as_secs_f64() * 1e3,
        p99_1.as_secs_f64() * 1e3,
        p50_100.as_secs_f64() * 1e3,
        p99_100.as_secs_f64() * 1e3,
        list.as_secs_f64() * 1e3,
    );
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    println!(
        "| store | writes/s, 1 writer | writes/s, 16 writers | watch p50 / p99 ms, 1 watcher | watch p50 / p99 ms, 100 watchers | list 10,000 ms |"
    );
    println!("|---|---|---|---|---|---|");
    let dir =
        tempfile::tempdir_in(std::env::var_os("VMCTL_BENCH_DIR").unwrap_or(".".into())).unwrap();
    let sled: Arc<dyn Store> = Arc::new(SledStore::open(dir.path().join("db")).unwrap());
    rt.block_on(run("sled (fsync)", sled));
    let cluster = EtcdCluster::start(3).expect("etcd starts");
    let mut opts = EtcdOptions::new(cluster.endpoints());
    opts.prefix = unique_prefix();
    let etcd: Arc<dyn Store> =
        rt.block_on(async { Arc::new(EtcdStore::connect(opts).await.unwrap()) });
    rt.block_on(run("etcd (3 members, loopback)", etcd));
    check_perf(&cluster);
    drop(cluster);
}

/// Runs `etcdctl check perf` against `cluster` and prints its verdict
/// lines (throughput, slowest request, stddev).
fn check_perf(cluster: &EtcdCluster) {
    let load = std::env::var("VMCTL_BENCH_CHECK_PERF").unwrap_or_else(|_| "l".into());
    if load == "0" {
        return;
    }
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", cluster.endpoints().join(",")))
        .args(["check", "perf", &format!("--load={load}")])
        .args(["--auto-compact", "--auto-defrag"])
        .output();
    match out {
        Ok(out) => {
            println!("\n`etcdctl check perf --load={load}` on the same cluster:");
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            for line in text.split(['\n', '\r']).map(str::trim) {
                if line.starts_with("PASS") || line.starts_with("FAIL") {
                    println!("    {line}");
                }
            }
        }
        Err(e) => println!(
            "\n`etcdctl check perf` not run: {e} (install etcd-client: scripts/install-prereqs)"
        ),
    }
}
