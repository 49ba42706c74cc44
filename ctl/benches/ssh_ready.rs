//! `vmctl up && vmctl ssh NAME -- true` against a raw QEMU boot-to-SSH of
//! the same image with the same QEMU arguments (issue 15, item 1). Goal:
//! median ratio ≤ 1.05 over alternating pairs.
//!
//! * vmctl: a VMFile with one VM (tiny guest, no provisioners); the time
//!   from starting `vmctl up` until `vmctl ssh NAME -- true` exited 0. The
//!   agent runs already (started once, as a user's would be).
//! * raw: the QEMU command line vmctl ran for a warm-up VM (read from
//!   /proc), its work dir paths and SSH port replaced, with a fresh qcow2
//!   overlay of the image and a copy of that VM's cloud-init seed; the time
//!   from `qemu-img create` until `ssh … true` exited 0, polled with fresh
//!   short connections (banner within 300 ms, every 100 ms), then `ssh`.
//!
//! Run: `cargo build --release -p vmctl -p vmctl-agent && cargo bench -p vmctl --bench ssh_ready`
//! (`BENCH_RUNS`, default 5 pairs; `BENCH_AGENT_LOG=FILE` keeps the
//! agent's log). Needs qemu-system-x86_64, qemu-img,
//! genisoimage, ssh and the tiny image (`tests/images/build.sh tiny`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

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
        "build the binaries first: cargo build --release -p vmctl -p vmctl-agent"
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

/// Sends `sig` to `pid`; a process already gone is fine.
fn signal(pid: u32, sig: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// QEMU processes whose command line contains `needle`, with their argv.
fn qemus(needle: &str) -> Vec<(u32, Vec<String>)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| {
            let pid: u32 = p.file_name().to_str()?.parse().ok()?;
            let raw = std::fs::read(p.path().join("cmdline")).ok()?;
            let argv: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is =
                argv.first()?.contains("qemu-system") && argv.iter().any(|a| a.contains(needle));
            is.then_some((pid, argv))
        })
        .collect()
}

/// A fresh connection answered by an SSH banner within 300 ms.
fn banner(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"SSH-"
}

fn ssh_true(key: &Path, port: u16) -> bool {
    Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string()])
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
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
        .success()
}

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
            // `BENCH_AGENT_LOG=FILE` keeps the agent's log (with RUST_LOG).
            .stderr(match std::env::var_os("BENCH_AGENT_LOG") {
                Some(f) => Stdio::from(std::fs::File::create(f).unwrap()),
                None => Stdio::null(),
            })
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
            .stdin(Stdio::null())
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
}

impl Drop for Agent {
    fn drop(&mut self) {
        signal(self.child.id(), Signal::SIGTERM);
        let _ = self.child.wait();
        for (pid, _) in qemus(&self.data.display().to_string()) {
            signal(pid, Signal::SIGKILL);
        }
    }
}

/// `vmctl up` of VM `name`, then `vmctl ssh NAME -- true`; seconds. The
/// VM is destroyed afterwards (not timed).
fn vmctl_run(agent: &Agent, dir: &Path, image: &Path, name: &str) -> f64 {
    let file = dir.join(format!("{name}.kdl"));
    std::fs::write(
        &file,
        format!(
            "vm \"{name}\" {{\n    image \"{}\"\n    vcpus 1\n    memory 512\n}}\n",
            image.display()
        ),
    )
    .unwrap();
    let t0 = Instant::now();
    agent.ok(&["up", "-f", file.to_str().unwrap(), "--timeout", "600"]);
    let out = agent.vmctl(&["ssh", name, "--", "true"]);
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "the first ssh after up failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    secs
}

/// What the raw side replays: vmctl's argv for the warm-up VM, whose work
/// dir was `work` and SSH port `port`, and copies of its seed and key in
/// `files`.
struct Template {
    argv: Vec<String>,
    work: PathBuf,
    port: u16,
    files: PathBuf,
}

/// The raw QEMU boot of `tpl`; seconds until `ssh … true` succeeded.
fn raw_run(tpl: &Template, image: &Path, format: &str) -> f64 {
    let (template, work, port) = (&tpl.argv, &tpl.work, tpl.port);
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path();
    std::fs::copy(tpl.files.join("seed.iso"), t.join("seed.iso")).unwrap();
    std::fs::copy(tpl.files.join("id_ed25519"), t.join("id")).unwrap();
    let new_port = free_port();
    let (from, to) = (work.display().to_string(), t.display().to_string());
    let argv: Vec<String> = template[1..]
        .iter()
        .map(|a| {
            a.replace(&from, &to).replace(
                &format!("127.0.0.1:{port}-"),
                &format!("127.0.0.1:{new_port}-"),
            )
        })
        .collect();
    let t0 = Instant::now();
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(image)
        .arg(t.join("disk.qcow2"))
        .status()
        .unwrap();
    assert!(st.success());
    let mut qemu = Command::new(&template[0])
        .args(&argv)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    while !(banner(new_port) && ssh_true(&t.join("id"), new_port)) {
        assert!(Instant::now() < deadline, "raw QEMU: no SSH");
        std::thread::sleep(Duration::from_millis(100));
    }
    let secs = t0.elapsed().as_secs_f64();
    let _ = qemu.kill();
    let _ = qemu.wait();
    secs
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

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not run this.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let image = tiny_image();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());

    // Warm-up VM: its QEMU argv is the raw side's template.
    vmctl_run(&agent, dir.path(), &image, "warm");
    let v: serde_json::Value =
        serde_json::from_str(&agent.ok(&["get", "vm", "warm", "-o", "json"])).unwrap();
    let rt = &v["status"]["runtime"];
    let work = PathBuf::from(rt["workDir"].as_str().unwrap());
    let port = u16::try_from(rt["sshPort"].as_u64().unwrap()).unwrap();
    let img: serde_json::Value =
        serde_json::from_str(&agent.ok(&["get", "image", "-o", "json"])).unwrap();
    let format = img["items"][0]["status"]["format"]
        .as_str()
        .unwrap_or("qcow2")
        .to_owned();
    let (_, argv) = qemus(&work.display().to_string())
        .into_iter()
        .next()
        .expect("the warm-up VM's QEMU runs");
    let files = dir.path().join("template");
    std::fs::create_dir_all(&files).unwrap();
    for f in ["seed.iso", "id_ed25519"] {
        std::fs::copy(work.join(f), files.join(f)).unwrap();
    }
    agent.ok(&["destroy", "warm"]);
    eprintln!("template: {}", argv.join(" "));
    let tpl = Template {
        argv,
        work,
        port,
        files,
    };
    raw_run(&tpl, &image, &format);

    let (mut raw, mut ours, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let name = format!("bench-{i}");
        let (r, o) = if i % 2 == 0 {
            let r = raw_run(&tpl, &image, &format);
            (r, vmctl_run(&agent, dir.path(), &image, &name))
        } else {
            let o = vmctl_run(&agent, dir.path(), &image, &name);
            (raw_run(&tpl, &image, &format), o)
        };
        agent.ok(&["destroy", &name]);
        eprintln!(
            "pair {}: raw {r:.2}s, vmctl up+ssh {o:.2}s, ratio {:.3}",
            i + 1,
            o / r
        );
        raw.push(r);
        ours.push(o);
        ratios.push(o / r);
    }
    let (r, o, q) = (median(&mut raw), median(&mut ours), median(&mut ratios));
    println!(
        "vmctl up && vmctl ssh NAME -- true ÷ raw QEMU boot-to-SSH (same argv, tiny guest, TCG, {runs} alternating pairs): medians {o:.2}s ÷ {r:.2}s; median ratio {q:.3} (goal ≤ 1.05)"
    );
}
