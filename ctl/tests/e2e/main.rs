//! End-to-end: the `vmctl` binary, a real agent, real QEMU (TCG), a real
//! guest built from Debian packages (`tests/images/build.sh tiny`), real
//! sshd (dropbear) in it, and a real HTTP server for downloads.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

// Scenarios in their own files; they use this file's helpers (`super::*`).
#[path = "../common/agent_program.rs"]
mod agent_program;
pub use agent_program::vmctl_bin;
mod cloud;
mod cluster;
mod disks;
mod etcd;
mod host_faults;
mod more;
mod ports;
mod reach;
mod second_user;
mod shares;
mod snapshots;
mod tap;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The tiny guest image, built once (cached outside the repo).
fn tiny_image() -> &'static PathBuf {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let out = Command::new(repo().join("tests/images/build.sh"))
            .arg("tiny")
            .stderr(Stdio::inherit())
            .output()
            .expect("tests/images/build.sh runs");
        assert!(out.status.success(), "building the tiny guest failed");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// A static HTTP server on 127.0.0.1 serving `dir`.
struct Http {
    child: Child,
    port: u16,
}

impl Http {
    fn serve(dir: &Path) -> Http {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "HTTP server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Http { child, port }
    }

    fn url(&self, file: &str) -> String {
        format!("http://127.0.0.1:{}/{file}", self.port)
    }
}

impl Drop for Http {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One user's world: a data dir, the files of a project, an agent.
struct World {
    dir: tempfile::TempDir,
    env: Vec<(&'static str, &'static str)>,
}

impl World {
    fn new() -> World {
        World {
            dir: tempfile::tempdir().unwrap(),
            env: Vec::new(),
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn project(&self) -> PathBuf {
        let p = self.dir.path().join("project");
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn vmctl(&self, args: &[&str]) -> Output {
        // Global flags first: anything after a `--` in `args` goes to the guest.
        Command::new(crate::vmctl_bin())
            .arg("--data-dir")
            .arg(self.data())
            .args(args)
            .current_dir(self.project())
            .env("VMCTL_ACCEL", "tcg")
            .envs(self.env.iter().copied())
            .env_remove("VMCTL_DRIVER")
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.vmctl(args);
        assert!(
            out.status.success(),
            "vmctl {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    fn agent_pid(&self) -> Option<u32> {
        let sock = self.data().join("agent.sock");
        let out = Command::new("curl")
            .args(["-s", "--unix-socket"])
            .arg(&sock)
            .arg("http://x/v1/healthz")
            .output()
            .ok()?;
        serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()?["pid"]
            .as_u64()
            .map(|p| p as u32)
    }

    /// Runs `vmctl console NAME` on a pseudo-terminal, types `keys` once
    /// attached, then Ctrl-]; returns what the terminal showed.
    fn console_session(&self, name: &str, keys: &str) -> String {
        use std::io::Write;
        let cmd = format!(
            "{} --data-dir {} console {name}",
            crate::vmctl_bin(),
            self.data().display()
        );
        let mut child = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("script(1) from util-linux runs");
        let mut stdin = child.stdin.take().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        // Wake the shell, then the command.
        stdin.write_all(b"\r").unwrap();
        std::thread::sleep(Duration::from_secs(1));
        stdin.write_all(keys.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_secs(4));
        stdin.write_all(b"\x1d").unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// PIDs of QEMU processes whose command line names this world's data dir.
    fn qemu_pids(&self) -> Vec<u32> {
        // /proc, not `pgrep`: no process-control programs are needed.
        let data = self.data().display().to_string();
        let mut v: Vec<u32> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|p| {
                let pid: u32 = p.file_name().to_str()?.parse().ok()?;
                let raw = std::fs::read(p.path().join("cmdline")).ok()?;
                let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
                (cmdline.starts_with("qemu-system") && cmdline.contains(&data)).then_some(pid)
            })
            .collect();
        v.sort();
        v
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(pid) = self.agent_pid() {
            signal(pid, Signal::SIGTERM);
        }
        for pid in self.qemu_pids() {
            signal(pid, Signal::SIGKILL);
        }
    }
}

/// Sends `sig` to `pid` through `kill(2)` (no `kill` program needed); a
/// process already gone is fine.
fn signal(pid: u32, sig: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

fn sha256_file(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

const BOOT: &str = "300";

#[test]
fn quick_start_provisions_the_tiny_guest_and_survives_an_agent_kill() {
    let w = World::new();
    let www = w.dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::copy(tiny_image(), www.join("tiny.qcow2")).unwrap();
    let zst = Command::new("zstd")
        .args(["-q", "-f", "-o"])
        .arg(www.join("tiny.qcow2.zst"))
        .arg(www.join("tiny.qcow2"))
        .status()
        .unwrap();
    assert!(zst.success());
    let digest = sha256_file(&www.join("tiny.qcow2"));
    let http = Http::serve(&www);
    let p = w.project();
    std::fs::write(
        p.join("setup.sh"),
        "#!/bin/sh\necho \"script on $(hostname)\"\necho to-stderr >&2\n",
    )
    .unwrap();
    std::fs::write(p.join("app.conf"), "answer=42\n").unwrap();
    std::fs::set_permissions(
        p.join("app.conf"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    let vmfile = format!(
        r#"vm "qs" {{
    image-url "{url}" checksum="sha256:{digest}"
    memory 512
    cloud-init {{
        hostname "qs"
    }}
    ssh {{
        user "vm"
    }}
    provision "shell" {{
        inline "echo inline on $(hostname)"
    }}
    provision "shell" {{
        script "setup.sh"
    }}
    provision "file" {{
        source "app.conf"
        destination "/tmp/app.conf"
    }}
}}

vm "zst" {{
    image-url "{zurl}"
    memory 512
    cloud-init {{
        hostname "zst"
    }}
}}
"#,
        url = http.url("tiny.qcow2"),
        zurl = http.url("tiny.qcow2.zst"),
    );
    std::fs::write(p.join("VMFile.kdl"), &vmfile).unwrap();

    let t0 = Instant::now();
    let out = w.vmctl(&["apply", "--wait", "--timeout", BOOT]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "apply --wait failed:\n{err}");
    eprintln!(
        "apply --wait of 2 VMs with provisioning took {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    assert!(err.contains("all 5 objects are Ready"), "{err}");

    // get/describe tell the truth.
    let images = w.json(&["get", "image", "-o", "json"])["items"].take();
    assert_eq!(images.as_array().unwrap().len(), 2);
    for img in images.as_array().unwrap() {
        assert_eq!(img["status"]["phase"], "Ready");
        assert_eq!(img["status"]["format"], "qcow2");
    }
    let vms = w.json(&["get", "vm", "-o", "json"])["items"].take();
    for vm in vms.as_array().unwrap() {
        assert_eq!(vm["status"]["phase"], "Running", "{vm}");
        assert_eq!(vm["status"]["runtime"]["backend"], "qemu");
        assert_eq!(vm["status"]["runtime"]["sshHost"], "127.0.0.1");
    }
    let prov = w.json(&["get", "provision", "qs", "-o", "json"]);
    assert_eq!(prov["status"]["phase"], "Succeeded");
    let steps = prov["status"]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3);
    assert!(
        steps
            .iter()
            .all(|s| s["exitCode"] == 0 && s["phase"] == "Succeeded")
    );
    let describe = w.ok(&["describe", "vm", "qs"]);
    assert!(describe.contains("Started VM qs"), "{describe}");

    // The provision log holds every step's output in order.
    let work = PathBuf::from(
        vms.as_array()
            .unwrap()
            .iter()
            .find(|v| v["metadata"]["name"] == "qs")
            .unwrap()["status"]["runtime"]["workDir"]
            .as_str()
            .unwrap(),
    );
    let log = std::fs::read_to_string(work.join("provision.log")).unwrap();
    let (a, b) = (
        log.find("inline on qs").unwrap(),
        log.find("script on qs").unwrap(),
    );
    assert!(a < b && log.contains("to-stderr"), "{log}");

    // The same log through the agent, and the guest's serial console.
    let tail = w.ok(&["log", "qs", "--provision", "--tail", "1"]);
    assert_eq!(tail.lines().count(), 1, "{tail}");
    assert!(tail.contains("exited with code 0"), "{tail}");
    assert!(w.ok(&["log", "qs", "--console"]).contains("ssh ready"));

    // ssh and exec work, with the pinned host key and exit codes.
    assert_eq!(w.ok(&["ssh", "qs", "--", "hostname"]).trim(), "qs");
    assert_eq!(
        w.vmctl(&["ssh", "qs", "--", "exit 7"]).status.code(),
        Some(7)
    );
    let mode = w.ok(&["exec", "qs", "--", "stat", "-c", "%a", "/tmp/app.conf"]);
    assert_eq!(mode.trim(), "640", "upload keeps the local file's mode");
    assert_eq!(
        w.ok(&["exec", "qs", "--", "cat", "/tmp/app.conf"]),
        "answer=42\n"
    );
    // cp both ways over SFTP; the mode is kept on upload.
    let up = p.join("up.bin");
    std::fs::write(&up, b"bytes\x00\x01 for cp").unwrap();
    std::fs::set_permissions(&up, std::os::unix::fs::PermissionsExt::from_mode(0o604)).unwrap();
    w.ok(&["cp", up.to_str().unwrap(), "qs:/tmp/up.bin"]);
    assert_eq!(
        w.ok(&["exec", "qs", "--", "stat", "-c", "%a", "/tmp/up.bin"])
            .trim(),
        "604"
    );
    let down = p.join("down.bin");
    w.ok(&["cp", "qs:/tmp/up.bin", down.to_str().unwrap()]);
    assert_eq!(std::fs::read(&down).unwrap(), std::fs::read(&up).unwrap());
    // The fault: `vmctl cp` of a mebibyte hung (libssh2's SFTP writes
    // stalled against the guest's dropbear, and the close then blocked the
    // agent for ever). A mebibyte both ways, intact, mode kept.
    let mib: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let big = p.join("mib.bin");
    std::fs::write(&big, &mib).unwrap();
    std::fs::set_permissions(&big, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    w.ok(&["cp", big.to_str().unwrap(), "qs:/tmp/mib.bin"]);
    assert_eq!(
        w.ok(&["exec", "qs", "--", "stat", "-c", "%a %s", "/tmp/mib.bin"])
            .trim(),
        "640 1048576"
    );
    let back = p.join("mib-back.bin");
    w.ok(&["cp", "qs:/tmp/mib.bin", back.to_str().unwrap()]);
    assert!(
        std::fs::read(&back).unwrap() == mib,
        "a mebibyte comes back intact"
    );
    // A missing directory is still told apart.
    let out = w.vmctl(&["cp", big.to_str().unwrap(), "qs:/nonexistent/dir/x"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/dir"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        w.vmctl(&["exec", "zst", "--", "sh", "-c", "exit 3"])
            .status
            .code(),
        Some(3)
    );
    assert_eq!(w.ok(&["exec", "zst", "--", "hostname"]).trim(), "zst");

    // Agent kill -9: a new agent adopts both QEMUs, no duplicates, provisioning not re-run.
    let qemus = w.qemu_pids();
    assert_eq!(qemus.len(), 2, "one QEMU per VM");
    let agent = w.agent_pid().expect("agent answers");
    signal(agent, Signal::SIGKILL);
    std::thread::sleep(Duration::from_millis(500));
    let vms = w.json(&["get", "vm", "-o", "json"])["items"].take(); // auto-starts a new agent
    assert_ne!(w.agent_pid(), Some(agent));
    std::thread::sleep(Duration::from_secs(6)); // a liveness round
    assert_eq!(
        w.qemu_pids(),
        qemus,
        "same QEMU processes, none started twice"
    );
    for vm in vms.as_array().unwrap() {
        assert_eq!(vm["status"]["phase"], "Running");
    }
    assert_eq!(
        std::fs::read_to_string(work.join("provision.log")).unwrap(),
        log,
        "no re-run on agent restart"
    );

    // Editing a script re-runs provisioning; a failing step fails the Provision with its exit code.
    std::fs::write(p.join("setup.sh"), "#!/bin/sh\necho edited\nexit 4\n").unwrap();
    let out = w.vmctl(&["apply", "--wait", "--timeout", BOOT]);
    assert!(!out.status.success(), "a failing step fails apply --wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("provision/qs failed"), "{err}");
    // The wait ends the output stream by reading the log's rest itself:
    // the failing step's last lines are there (not lost to the agent's
    // 200 ms follow interval).
    assert!(err.contains("[qs] edited"), "{err}");
    let prov = w.json(&["get", "provision", "qs", "-o", "json"]);
    assert_eq!(prov["status"]["phase"], "Failed");
    assert_eq!(prov["status"]["steps"][1]["exitCode"], 4);
    assert_ne!(
        prov["status"]["steps"][2]["phase"], "Succeeded",
        "steps after a failure do not run"
    );

    // Delete: finalizers stop QEMU and remove the work directory.
    w.ok(&["delete", "-f", "VMFile.kdl", "--wait", "--timeout", "120"]);
    assert!(w.qemu_pids().is_empty(), "QEMU stopped");
    assert!(!work.exists(), "work directory removed");
}

#[test]
fn download_faults_fail_the_image_with_the_reason_and_cache_nothing() {
    let w = World::new();
    let www = w.dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("small.img"), vec![7u8; 4096]).unwrap();
    let http = Http::serve(&www);
    let cases = [
        (
            "missing",
            format!("image-url \"{}\"", http.url("nope.qcow2")),
            "404",
        ),
        (
            "badsum",
            format!(
                "image-url \"{}\" checksum=\"sha256:{}\"",
                http.url("small.img"),
                "0".repeat(64)
            ),
            "hecksum",
        ),
        (
            // A missing local file may yet appear: the Image backs off and
            // waits for it, so the apply ends at its timeout.
            "nolocal",
            "image \"/nonexistent/base.qcow2\"".to_owned(),
            "nonexistent",
        ),
    ];
    for (name, src, needle) in cases {
        let timeout = if name == "nolocal" { "5" } else { "60" };
        let file = w.project().join(format!("{name}.kdl"));
        std::fs::write(&file, format!("vm \"{name}\" {{\n    {src}\n}}\n")).unwrap();
        let out = w.vmctl(&[
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--wait",
            "--timeout",
            timeout,
        ]);
        assert!(!out.status.success(), "{name} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle),
            "{name}: expected {needle:?} in\n{err}"
        );
    }
    // Nothing half-downloaded is mistaken for an image.
    let images = w.data().join("images");
    if images.exists() {
        for e in walk(&images) {
            let n = e.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                n != "image" && n != "meta.json",
                "cached after a failure: {}",
                e.display()
            );
        }
    }
    // `vmctl image`: pull (with a checksum), list, inspect, rm.
    std::fs::copy(tiny_image(), www.join("tiny.qcow2")).unwrap();
    let digest = sha256_file(&www.join("tiny.qcow2"));
    let pulled = w.ok(&[
        "image",
        "pull",
        &http.url("tiny.qcow2"),
        "--name",
        "tiny",
        "--checksum",
        &format!("sha256:{digest}"),
    ]);
    assert!(pulled.starts_with("image/tiny qcow2"), "{pulled}");
    let list = w.ok(&["image", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("tiny ") && l.contains("Ready") && l.contains("qcow2")),
        "{list}"
    );
    let info = w.ok(&["image", "inspect", tiny_image().to_str().unwrap()]);
    assert!(info.contains("format:        qcow2"), "{info}");
    let cached = |w: &World| {
        walk(&w.data().join("images"))
            .iter()
            .any(|p| p.file_name().is_some_and(|n| n == "image"))
    };
    assert!(cached(&w), "the pulled image is in the cache");
    w.ok(&["image", "rm", "tiny"]);
    assert!(!w.ok(&["image", "list", "-o", "json"]).contains("\"tiny\""));
    assert!(!cached(&w), "image rm removed the downloaded file");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn qemu_killed_from_outside_is_noticed_and_restarted_with_backoff() {
    // This guest also boots from the pure-Rust seed writer (the agent it
    // starts inherits the setting).
    let mut w = World::new();
    w.env.push(("VMCTL_SEED_TOOL", "builtin"));
    let p = w.project();
    std::fs::write(
        p.join("VMFile.kdl"),
        format!(
            "vm \"crashy\" {{\n    image \"{}\"\n    memory 512\n    cloud-init {{\n        hostname \"crashy\"\n    }}\n}}\n",
            tiny_image().display()
        ),
    )
    .unwrap();
    w.ok(&["apply", "--wait", "--timeout", BOOT]);
    let seed = std::fs::read(w.data().join("vms/crashy/seed.iso")).unwrap();
    let pvd = String::from_utf8_lossy(&seed[32768..34816]).into_owned();
    assert!(
        pvd.contains("VMCTL") && !pvd.contains("GENISOIMAGE"),
        "seed written by the pure-Rust writer"
    );
    wait_until(
        "SSH with the pure-Rust seed",
        Duration::from_secs(240),
        || {
            w.vmctl(&["exec", "crashy", "--", "hostname"])
                .status
                .success()
        },
    );
    let before = w.qemu_pids();
    assert_eq!(before.len(), 1);
    signal(before[0], Signal::SIGKILL);
    wait_until("a Crashed note", Duration::from_secs(60), || {
        w.ok(&["events"]).contains("Crashed")
    });
    wait_until("a new QEMU", Duration::from_secs(120), || {
        let now = w.qemu_pids();
        now.len() == 1 && now != before
    });
    wait_until("Running again", Duration::from_secs(60), || {
        w.json(&["get", "vm", "crashy", "-o", "json"])["status"]["phase"] == "Running"
    });
    let events = w.ok(&["events"]);
    assert!(events.contains("BackOff"), "{events}");
    assert_eq!(
        w.ok(&["ssh", "crashy", "--", "hostname"]).trim(),
        "crashy",
        "{events}"
    );
}

#[test]
fn imperative_tutorial_create_start_suspend_resume_stop_destroy() {
    let w = World::new();
    let img = tiny_image().to_str().unwrap().to_owned();
    let out = w.ok(&[
        "create", "--name", "imp", "--image", &img, "--memory", "512",
    ]);
    assert!(out.contains("vm/imp created"), "{out}");
    let again = w.vmctl(&["create", "--name", "imp", "--image", &img]);
    assert!(
        !again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("already exists")
    );
    let list = w.ok(&["list"]);
    assert!(
        list.starts_with("NAME") && list.contains("BACKEND") && list.contains("SSH"),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|l| l.starts_with("imp ") && l.contains("Stopped")),
        "{list}"
    );
    assert!(w.qemu_pids().is_empty(), "created stopped: no QEMU");
    w.ok(&["start", "imp", "--timeout", BOOT]);
    wait_until("SSH", Duration::from_secs(240), || {
        w.vmctl(&["exec", "imp", "--", "true"]).status.success()
    });
    assert_eq!(w.ok(&["ssh", "imp", "--", "hostname"]).trim(), "imp");
    // The serial console in raw mode on a real terminal (`script` gives it
    // a pty): a command typed at the guest's shell runs, Ctrl-] detaches.
    let out = w.console_session("imp", "echo con-$((6*7))\r");
    assert!(out.contains("con-42"), "console output:\n{out}");
    assert!(out.contains("detached"), "{out}");
    w.ok(&["suspend", "imp"]);
    let st = w.json(&["status", "imp", "-o", "json"]);
    assert_eq!(st["state"], "Suspended");
    assert_eq!(st["backend"], "qemu");
    assert!(st["pid"].as_str().unwrap().parse::<u32>().is_ok(), "{st}");
    w.ok(&["resume", "imp"]);
    assert_eq!(w.ok(&["exec", "imp", "--", "hostname"]).trim(), "imp");
    w.ok(&["stop", "imp", "--timeout", "120"]);
    assert!(w.qemu_pids().is_empty(), "stopped: no QEMU");
    let hist = w.ok(&["history", "vm", "imp"]);
    for verb in [
        "vmctl create",
        "vmctl start",
        "vmctl suspend",
        "vmctl resume",
        "vmctl stop",
    ] {
        assert!(hist.contains(verb), "history records {verb}:\n{hist}");
    }
    let work = PathBuf::from(
        w.json(&["status", "imp", "-o", "json"])["work_dir"]
            .as_str()
            .unwrap(),
    );
    w.ok(&["destroy", "imp"]);
    assert!(!work.exists(), "destroy removes the work directory");
    assert!(!w.ok(&["list"]).contains("imp "));
}

#[test]
fn declarative_tutorial_up_ssh_reload_provision_down() {
    let w = World::new();
    let p = w.project();
    let img = tiny_image().display().to_string();
    let vmfile = |extra: &str| {
        format!(
            r#"vm "web" {{
    image "{img}"
    memory 512
    cloud-init {{
        hostname "web"
    }}
    ssh {{
        user "vm"
    }}
    provision "shell" {{
        inline "echo first >> /tmp/marker"
    }}
{extra}}}

vm "db" {{
    image "{img}"
    memory 512
}}
"#
        )
    };
    std::fs::write(p.join("VMFile.kdl"), vmfile("")).unwrap();

    // `up --name` brings up one VM of the file and streams its provisioning.
    let out = w.vmctl(&["up", "--name", "web", "--timeout", BOOT]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("[web] ==>"),
        "provisioning output streamed: {err}"
    );
    assert_eq!(w.qemu_pids().len(), 1, "only web is up");

    // Several VMs and no name: ssh lists them.
    let amb = w.vmctl(&["ssh", "--", "hostname"]);
    let amb_err = String::from_utf8_lossy(&amb.stderr);
    assert!(
        !amb.status.success() && amb_err.contains("web, db"),
        "{amb_err}"
    );
    assert_eq!(
        w.ok(&["ssh", "web", "--", "cat", "/tmp/marker"]).trim(),
        "first"
    );

    // Add a provisioner and reload: a new VM (new disk, marker gone) provisioned again.
    let old_id =
        w.json(&["get", "vm", "web", "-o", "json"])["status"]["runtime"]["instanceId"].clone();
    std::fs::write(
        p.join("VMFile.kdl"),
        vmfile("    provision \"shell\" {\n        inline \"echo second >> /tmp/marker\"\n    }\n"),
    )
    .unwrap();
    w.ok(&["reload", "--name", "web", "--timeout", BOOT]);
    let new_id =
        w.json(&["get", "vm", "web", "-o", "json"])["status"]["runtime"]["instanceId"].clone();
    assert_ne!(old_id, new_id, "reload recreates the VM");
    assert_eq!(
        w.ok(&["exec", "web", "--", "cat", "/tmp/marker"]),
        "first\nsecond\n"
    );

    // `provision` re-runs the steps on the running VM, recorded in history.
    w.ok(&["provision", "--name", "web"]);
    assert_eq!(
        w.ok(&["exec", "web", "--", "cat", "/tmp/marker"]),
        "first\nsecond\nfirst\nsecond\n"
    );
    assert!(
        w.ok(&["history", "provision", "web"])
            .contains("vmctl provision")
    );

    // powerState edits in the file are live: suspend and resume the same
    // QEMU, provisioning not repeated.
    let pids = w.qemu_pids();
    let with_power = |state: &str| {
        vmfile(&format!(
            "    provision \"shell\" {{\n        inline \"echo second >> /tmp/marker\"\n    }}\n    power-state \"{state}\"\n"
        ))
        .split("\nvm \"db\"")
        .next()
        .unwrap()
        .to_owned()
    };
    let phase = |w: &World| {
        w.json(&["get", "vm", "web", "-o", "json"])["status"]["phase"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    std::fs::write(p.join("web.kdl"), with_power("suspended")).unwrap();
    w.ok(&["apply", "-f", "web.kdl"]);
    wait_until("Suspended", Duration::from_secs(60), || {
        phase(&w) == "Suspended"
    });
    assert_eq!(
        w.json(&["status", "web", "-o", "json"])["state"],
        "Suspended"
    );
    std::fs::write(p.join("web.kdl"), with_power("running")).unwrap();
    w.ok(&["apply", "-f", "web.kdl"]);
    wait_until("Running", Duration::from_secs(60), || {
        phase(&w) == "Running"
    });
    assert_eq!(w.qemu_pids(), pids, "the same QEMU, paused and continued");
    assert_eq!(
        w.ok(&["exec", "web", "--", "cat", "/tmp/marker"]),
        "first\nsecond\nfirst\nsecond\n",
        "a power-state edit does not re-run provisioning"
    );

    // down stops, down --destroy deletes.
    w.ok(&["down", "--name", "web"]);
    assert!(w.qemu_pids().is_empty());
    assert_eq!(w.json(&["status", "web", "-o", "json"])["state"], "Stopped");
    w.ok(&["down", "--name", "web", "--destroy"]);
    assert!(!w.ok(&["list"]).contains("web "));
}
