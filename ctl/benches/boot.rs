//! Boot benchmark on real QEMU (TCG) with the tiny test guest:
//!
//! 1. apply → SSH-ready with vmctl, against `plain-qemu-boot.sh` (keys,
//!    seed, overlay and QEMU by hand) booting the same image, measured side
//!    by side in alternating order; SSH-ready means `ssh … true` succeeded,
//!    polled the same way for both. Goal: vmctl ÷ plain ≤ 1.03.
//! 2. Four VMs from one VMFile in parallel, against the same four applied
//!    one after another (each waited to SSH-ready). Goal: ≤ 0.5.
//!
//! Run: `cargo build --release -p vmctl -p vmctl-agent && cargo bench -p vmctl --bench boot`
//! (`BENCH_RUNS`, default 7, pairs for 1; `BENCH_GROUP_RUNS`, default 2, for 2).
//! Needs qemu-system-x86_64, qemu-img, genisoimage, ssh and the tiny image
//! (`tests/images/build.sh tiny`, built on first use).

use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn vmctl_bin() -> PathBuf {
    // Benches are built in target/<profile>/deps; the binary sits one level up.
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("vmctl");
    assert!(
        bin.exists() && bin.with_file_name("vmctl-agent").exists(),
        "build the binaries first: cargo build --release -p vmctl -p vmctl-agent ({})",
        bin.display()
    );
    bin
}

fn tiny_image() -> PathBuf {
    let out = Command::new(repo().join("tests/images/build.sh"))
        .arg("tiny")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "building the tiny guest failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether the forwarded port answers with an SSH banner within 300 ms.
/// User-mode networking accepts the TCP connection before the guest
/// listens, so only the banner says sshd is there.
fn banner(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"SSH-"
}

/// Waits for the SSH banner (polled every 100 ms), then until `ssh … true`
/// succeeds: the same for both sides, fine-grained so that no poll
/// interval dominates the figure.
fn wait_ssh(key: &Path, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !banner(port) {
        assert!(Instant::now() < deadline, "no SSH banner on port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    loop {
        let ok = Command::new("ssh")
            .arg("-i")
            .arg(key)
            .args(["-p", &port.to_string()])
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=2",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "vm@127.0.0.1",
                "true",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "no SSH on port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A vmctl agent with its own data dir, in the foreground as a child.
struct Agent {
    data: PathBuf,
    child: Child,
}

impl Agent {
    fn start(dir: &Path) -> Agent {
        let data = dir.join("data");
        let child = Command::new(vmctl_bin())
            .arg("agent")
            .arg("--data-dir")
            .arg(&data)
            .env("VMCTL_ACCEL", "tcg")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let a = Agent { data, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !a.vmctl(&["get", "vm"]).status.success() {
            assert!(Instant::now() < deadline, "agent did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        a
    }

    fn vmctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(vmctl_bin())
            .arg("--no-autostart")
            .arg("--data-dir")
            .arg(&self.data)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.vmctl(args);
        assert!(
            out.status.success(),
            "vmctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The generated key and forwarded port of VM `name`.
    fn ssh_of(&self, name: &str) -> (PathBuf, u16) {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["get", "vm", name, "-o", "json"])).unwrap();
        let rt = &v[0]["status"]["runtime"];
        (
            PathBuf::from(rt["workDir"].as_str().unwrap()).join("id_ed25519"),
            u16::try_from(rt["sshPort"].as_u64().unwrap()).unwrap(),
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Stop the agent, then its QEMUs (which outlive it by design).
        signal(self.child.id(), Signal::SIGTERM);
        let _ = self.child.wait();
        // /proc, not `pgrep`: no process-control programs are needed.
        let data = self.data.display().to_string();
        for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let raw = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmdline.starts_with("qemu-system") && cmdline.contains(&data) {
                signal(pid, Signal::SIGKILL);
            }
        }
    }
}

fn vm_node(name: &str, image: &Path) -> String {
    format!(
        "vm \"{name}\" {{\n    image \"{}\"\n    vcpus 1\n    memory 512\n}}\n",
        image.display()
    )
}

/// vmctl: apply --wait, then SSH-ready, for every VM of `files` applied in turn.
fn vmctl_boot(image: &Path, groups: &[Vec<String>]) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let t0 = Instant::now();
    for (i, names) in groups.iter().enumerate() {
        let file = dir.path().join(format!("VMFile-{i}.kdl"));
        let text: String = names.iter().map(|n| vm_node(n, image)).collect();
        std::fs::write(&file, text).unwrap();
        agent.ok(&[
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--wait",
            "--timeout",
            "600",
        ]);
        for n in names {
            let (key, port) = agent.ssh_of(n);
            wait_ssh(&key, port);
        }
    }
    t0.elapsed().as_secs_f64()
}

/// The plain script, then SSH-ready.
fn plain_boot(image: &Path) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("vm");
    let port = free_port();
    let t0 = Instant::now();
    let st = Command::new(repo().join("ctl/benches/plain-qemu-boot.sh"))
        .arg(image)
        .arg(&t)
        .arg(port.to_string())
        .status()
        .unwrap();
    assert!(st.success(), "plain-qemu-boot.sh failed");
    wait_ssh(&t.join("id"), port);
    let secs = t0.elapsed().as_secs_f64();
    if let Some(pid) = std::fs::read_to_string(t.join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
    {
        signal(pid, Signal::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(300));
    secs
}

/// Sends `sig` to `pid` through `kill(2)`; a process already gone is fine.
fn signal(pid: u32, sig: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not run this.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let image = tiny_image();
    let runs = env_usize("BENCH_RUNS", 7);
    let group_runs = env_usize("BENCH_GROUP_RUNS", 2);
    eprintln!("image {}", image.display());
    // One boot of each to warm the page cache and the accelerator probe.
    plain_boot(&image);
    vmctl_boot(&image, &[vec!["warm".into()]]);

    let (mut plain, mut ours) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let one = || vec![vec!["bench".to_owned()]];
        // Alternate the order so drift in machine load hits both alike.
        if i % 2 == 0 {
            plain.push(plain_boot(&image));
            ours.push(vmctl_boot(&image, &one()));
        } else {
            ours.push(vmctl_boot(&image, &one()));
            plain.push(plain_boot(&image));
        }
        eprintln!(
            "run {}: plain {:.2}s, vmctl {:.2}s",
            i + 1,
            plain[i],
            ours[i]
        );
    }
    let (p, o) = (median(&mut plain), median(&mut ours));
    println!(
        "apply → SSH-ready, tiny guest, TCG ({runs} runs): plain QEMU script median {p:.2}s, vmctl median {o:.2}s, ratio {:.3} (goal ≤ 1.03)",
        o / p
    );

    if group_runs == 0 {
        return;
    }
    let names: Vec<String> = (1..=4).map(|i| format!("par-{i}")).collect();
    let (mut serial, mut parallel) = (Vec::new(), Vec::new());
    for i in 0..group_runs {
        let one_by_one: Vec<Vec<String>> = names.iter().map(|n| vec![n.clone()]).collect();
        serial.push(vmctl_boot(&image, &one_by_one));
        parallel.push(vmctl_boot(&image, std::slice::from_ref(&names)));
        eprintln!(
            "group run {}: 4 one after another {:.2}s, 4 at once {:.2}s",
            i + 1,
            serial[i],
            parallel[i]
        );
    }
    let (s, par) = (median(&mut serial), median(&mut parallel));
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "4 VMs → all SSH-ready ({group_runs} runs, {cores} cores): one after another median {s:.2}s, in parallel median {par:.2}s, ratio {:.3} (goal ≤ 0.5)",
        par / s
    );
}
