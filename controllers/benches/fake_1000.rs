//! 1,000 VMs (and their Images) applied to a fresh sled store, reconciled
//! by the controllers with the zero-latency fake drivers: time from the
//! first apply until every VM is Ready. Prints each run and the median.
//!
//! `cargo bench -p vmctl-controllers --bench fake_1000`; tune with
//! `BENCH_VMS` (1000), `BENCH_IMAGES` (10), `BENCH_RUNS` (3).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use vmctl_api::{Image, Kind, VirtualMachine};
use vmctl_controllers::{FakeConfig, FakeWorld, RuntimeConfig, run};
use vmctl_store::{Change, SledStore, Store};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ready(status: &serde_json::Value) -> bool {
    status["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

async fn one_run(vms: usize, images: usize) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let world = FakeWorld::new(FakeConfig::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let controllers = tokio::spawn(run(
        store.clone(),
        world.drivers(),
        RuntimeConfig::default(),
        shutdown,
    ));
    let mut watch = store.watch(store.last_seq().await.unwrap()).await.unwrap();

    let start = Instant::now();
    let mut writers = Vec::new();
    const WRITERS: usize = 16;
    for w in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for i in (w..images).step_by(WRITERS) {
                let spec = serde_json::from_value(json!({"source": {"path": format!("/img/{i}")}}));
                let obj = Image::new(format!("img{i}"), spec.unwrap()).to_object();
                store.apply(obj, None, None).await.unwrap();
            }
            for i in (w..vms).step_by(WRITERS) {
                let spec = serde_json::from_value(json!({"image": format!("img{}", i % images)}));
                let obj = VirtualMachine::new(format!("vm{i}"), spec.unwrap()).to_object();
                store.apply(obj, None, None).await.unwrap();
            }
        }));
    }
    let mut ready_vms = HashSet::new();
    while ready_vms.len() < vms {
        let ev = watch.next().await.unwrap();
        if ev.object.kind != Kind::VirtualMachine {
            continue;
        }
        if let Change::StatusUpdated { status } = &ev.change
            && ready(status)
        {
            ready_vms.insert(ev.object.name.clone());
        }
    }
    let elapsed = start.elapsed();
    for w in writers {
        w.await.unwrap();
    }
    stop.send(true).unwrap();
    controllers.await.unwrap().unwrap();
    elapsed
}

fn main() {
    let vms = env("BENCH_VMS", 1000);
    let images = env("BENCH_IMAGES", 10).max(1);
    let runs = env("BENCH_RUNS", 3).max(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut times: Vec<Duration> = (0..runs)
        .map(|i| {
            let t = rt.block_on(one_run(vms, images));
            println!(
                "run {i}: {vms} VMs, {images} images: all Ready in {:.3} s",
                t.as_secs_f64()
            );
            t
        })
        .collect();
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "fake_1000: median {:.3} s over {runs} runs ({vms} VMs, {images} images, fsync on)",
        median.as_secs_f64()
    );
}
