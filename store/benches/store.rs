//! Store benchmarks (a plain harness: the figures are throughputs and
//! latency percentiles, which criterion's per-iteration model fits badly).
//!
//! Run: `cargo bench -p vmctl-store --bench store` (append `-- latency`
//! for the latency rows only, `-- open` for open time and peak RSS after
//! 501,000 events). The database lives in `$VMCTL_BENCH_DIR` (default: the
//! system temp dir); use a real disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vmctl_api::{Kind, Object, ObjectMeta, ObjectRef};
use vmctl_store::{Durability, Options, Retention, SledStore};

fn tempdir() -> tempfile::TempDir {
    match std::env::var_os("VMCTL_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

fn vm(name: &str) -> Object {
    Object::new(
        Kind::VirtualMachine,
        ObjectMeta::named(name),
        serde_json::json!({"cpus": 2, "memory": "2GiB"}),
    )
}

fn status(n: u64) -> serde_json::Value {
    serde_json::json!({"phase": "Running", "heartbeat": n, "conditions": [{"type": "Ready", "status": "True"}]})
}

fn writes_per_second(writers: usize, per_writer: u64, durability: Durability) -> f64 {
    let dir = tempdir();
    let s = SledStore::open_with(
        dir.path().join("db"),
        Options {
            durability,
            ..Options::default()
        },
    )
    .unwrap();
    for w in 0..writers {
        s.apply(vm(&format!("w{w}")), None, None).unwrap();
    }
    let start = Instant::now();
    std::thread::scope(|sc| {
        for w in 0..writers {
            let s = &s;
            sc.spawn(move || {
                let r = ObjectRef::new(Kind::VirtualMachine, format!("w{w}"));
                for n in 0..per_writer {
                    s.update_status(&r, status(n), None).unwrap();
                }
            });
        }
    });
    let rate = (writers as u64 * per_writer) as f64 / start.elapsed().as_secs_f64();
    let (flushes, spent) = s.flush_stats();
    eprintln!(
        "  ({writers} writers: {flushes} flushes, {:?} per flush)",
        spent / flushes.max(1) as u32
    );
    rate
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Time from the start of a durable write to its arrival at each watcher.
fn watch_latency(watchers: usize, writes: u64, durability: Durability) -> (Duration, Duration) {
    let dir = tempdir();
    let s = SledStore::open_with(
        dir.path().join("db"),
        Options {
            durability,
            ..Options::default()
        },
    )
    .unwrap();
    s.apply(vm("a"), None, None).unwrap();
    let base = Instant::now();
    let starts: Arc<Vec<AtomicU64>> =
        Arc::new((0..writes + 2).map(|_| AtomicU64::new(0)).collect());
    let from = s.last_seq();
    let handles: Vec<_> = (0..watchers)
        .map(|_| {
            let mut w = s.watch(from).unwrap();
            let starts = starts.clone();
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(writes as usize);
                for _ in 0..writes {
                    let ev = w.next_blocking().unwrap();
                    let now = base.elapsed().as_nanos() as u64;
                    let start = starts[(ev.seq - from - 1) as usize].load(Ordering::SeqCst);
                    lat.push(Duration::from_nanos(now.saturating_sub(start)));
                }
                lat
            })
        })
        .collect();
    let r = ObjectRef::new(Kind::VirtualMachine, "a");
    for n in 0..writes {
        starts[n as usize].store(base.elapsed().as_nanos() as u64, Ordering::SeqCst);
        s.update_status(&r, status(n), None).unwrap();
        std::thread::sleep(Duration::from_micros(500));
    }
    let mut all: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    all.sort();
    (percentile(&all, 0.5), percentile(&all, 0.99))
}

fn list_10k() -> Duration {
    let dir = tempdir();
    let s = SledStore::open_with(
        dir.path().join("db"),
        Options {
            durability: Durability::None,
            ..Options::default()
        },
    )
    .unwrap();
    for i in 0..10_000 {
        s.apply(vm(&format!("vm-{i:05}")), None, None).unwrap();
    }
    let mut times: Vec<Duration> = (0..11)
        .map(|_| {
            let t = Instant::now();
            assert_eq!(
                s.list(Some(Kind::VirtualMachine)).unwrap().objects.len(),
                10_000
            );
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn size_under_status_churn() -> (u64, u64, u64, u64) {
    let dir = tempdir();
    let s = SledStore::open_with(
        dir.path().join("db"),
        Options {
            durability: Durability::None,
            ..Options::default()
        },
    )
    .unwrap();
    for o in 0..100 {
        s.apply(vm(&format!("vm-{o}")), None, None).unwrap();
    }
    for n in 0..1_000 {
        for o in 0..100 {
            s.update_status(
                &ObjectRef::new(Kind::VirtualMachine, format!("vm-{o}")),
                status(n),
                None,
            )
            .unwrap();
        }
    }
    let events_before = s.last_seq();
    let before = s.size_on_disk().unwrap();
    let report = s.compact(&Retention::default()).unwrap();
    let after = s.size_on_disk().unwrap();
    (before, after, events_before, report.kept)
}

/// Peak and current resident set size of this process, in bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// A store of `objects` VMs with `updates` status updates each, written by
/// 8 threads (batched), then closed.
fn long_history(dir: &std::path::Path, objects: usize, updates: u64) {
    let s = SledStore::open_with(
        dir,
        Options {
            durability: Durability::None,
            ..Options::default()
        },
    )
    .unwrap();
    for o in 0..objects {
        s.apply(vm(&format!("vm-{o:04}")), None, None).unwrap();
    }
    std::thread::scope(|sc| {
        for t in 0..8 {
            let s = &s;
            sc.spawn(move || {
                for n in 0..updates {
                    for o in (t..objects).step_by(8) {
                        let r = ObjectRef::new(Kind::VirtualMachine, format!("vm-{o:04}"));
                        s.update_status(&r, status(n), None).unwrap();
                    }
                }
            });
        }
    });
}

/// In a child process (so its memory is its own): opens the store at `dir`
/// and prints `open <seconds> <peak RSS bytes> <replayed events> <bytes on disk>`.
fn open_child(dir: &str, full_check: bool) {
    let t = Instant::now();
    let s = SledStore::open_with(
        dir,
        Options {
            full_check,
            ..Options::default()
        },
    )
    .unwrap();
    let took = t.elapsed();
    println!(
        "open {} {} {} {}",
        took.as_secs_f64(),
        rss().0,
        s.open_report().replayed,
        s.size_on_disk().unwrap()
    );
}

/// Opens `dir` in a child process; (seconds, peak RSS in bytes, events
/// replayed, bytes on disk).
fn open_in_child(dir: &std::path::Path, full_check: bool) -> (f64, u64, u64, u64) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--bench", "__open_child"])
        .arg(dir)
        .arg(if full_check { "full" } else { "checkpoint" })
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("open "))
        .unwrap_or_else(|| panic!("child failed: {}", String::from_utf8_lossy(&out.stderr)))
        .split(' ')
        .collect();
    (
        f[1].parse().unwrap(),
        f[2].parse().unwrap(),
        f[3].parse().unwrap(),
        f[4].parse().unwrap(),
    )
}

/// Open time and peak RSS after 500,000 events: checkpoint check vs full
/// replay (what every open did before), then after the compaction the
/// agent runs at start.
fn open_after_long_history() {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let dir = tempdir();
    let db = dir.path().join("db");
    // Every step in its own process: a process that exits releases sled's
    // file lock at once (a dropped handle holds it for a while).
    let child = |what: &str| {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--bench", what])
            .arg(&db)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let t = Instant::now();
    child("__history_child");
    eprintln!("  (wrote 501,000 events in {:.1?})", t.elapsed());
    let show = |label: &str, (secs, peak, replayed, size): (f64, u64, u64, u64)| {
        println!(
            "open after 501,000 events, {label}: {secs:.2} s, peak RSS {:.0} MiB, \
             {replayed} events replayed ({:.0} MiB on disk)",
            mib(peak),
            mib(size)
        );
    };
    show("full replay (before)", open_in_child(&db, true));
    show("checkpoint (now)", open_in_child(&db, false));
    let t = Instant::now();
    let kept = child("__compact_child");
    eprintln!("  (compaction in {:.1?}: {kept})", t.elapsed());
    show("checkpoint, after compaction", open_in_child(&db, false));
    show(
        "checkpoint, after compaction, again",
        open_in_child(&db, false),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "__open_child") {
        return open_child(&args[i + 1], args[i + 2] == "full");
    }
    if let Some(i) = args.iter().position(|a| a == "__history_child") {
        long_history(std::path::Path::new(&args[i + 1]), 1_000, 500);
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "__compact_child") {
        let s = SledStore::open(&args[i + 1]).unwrap();
        let report = s.compact(&Retention::default()).unwrap();
        return println!("kept {} events", report.kept);
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` runs nothing.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if std::env::args().any(|a| a == "open") {
        return open_after_long_history();
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let only = |what: &str| std::env::args().any(|a| a == what);
    for d in [Durability::Fsync, Durability::SledFlush] {
        if only("latency") {
            break;
        }
        println!(
            "durable writes/s ({d:?}), 1 writer:   {:>8.0}",
            writes_per_second(1, 3_000, d)
        );
        println!(
            "durable writes/s ({d:?}), 16 writers: {:>8.0}",
            writes_per_second(16, 1_000, d)
        );
    }
    for d in [Durability::Fsync, Durability::SledFlush, Durability::None] {
        for watchers in [1, 100] {
            let (p50, p99) = watch_latency(watchers, 1_000, d);
            println!(
                "write start→watcher ({d:?}), {watchers:>3} watchers: p50 {p50:?}  p99 {p99:?}"
            );
        }
    }
    if only("latency") {
        return;
    }
    println!("list 10,000 objects (median of 11): {:?}", list_10k());
    let (before, after, events, kept) = size_under_status_churn();
    println!(
        "100,000 status updates: {:.1} MiB on disk, {events} events before compaction; \
         {:.1} MiB, {kept} events after (default retention)",
        mib(before),
        mib(after)
    );
}
