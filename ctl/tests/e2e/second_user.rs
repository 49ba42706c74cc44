//! Issue 13's proof that the API is the only door: the CLI runs as a
//! second Unix user who may use the agent's socket (through the group
//! `--socket-group` names) but cannot read the agent's data directory,
//! and every command of the manual works against a real guest.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::*;

const USER: &str = "vmctl-e2e";
const GROUP: &str = "vmctl-e2e-sock";

/// Creates the group and the user (a member of it) when missing.
fn ensure_user() {
    let has = |db: &str, name: &str| {
        Command::new("getent")
            .args([db, name])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    if !has("group", GROUP) {
        let st = Command::new("groupadd").arg(GROUP).status().unwrap();
        assert!(st.success() || has("group", GROUP), "groupadd {GROUP}");
    }
    if !has("passwd", USER) {
        let st = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/bin/sh", "-G", GROUP, USER])
            .status()
            .unwrap();
        assert!(st.success() || has("passwd", USER), "useradd {USER}");
    }
    let st = Command::new("usermod")
        .args(["-aG", GROUP, USER])
        .status()
        .unwrap();
    assert!(st.success(), "usermod -aG {GROUP} {USER}");
}

/// An agent run by this (root) process, its socket usable by [`GROUP`].
struct SharedAgent {
    child: Child,
    data: PathBuf,
    socket: PathBuf,
    /// Holds the data dir (0700) and the socket's directory (0755).
    _dirs: tempfile::TempDir,
    /// The second user's home and project directory.
    home: PathBuf,
}

impl Drop for SharedAgent {
    fn drop(&mut self) {
        signal(self.child.id(), Signal::SIGTERM);
        let _ = self.child.wait();
        // QEMUs of this data dir.
        let data = self.data.display().to_string();
        for p in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let raw = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmdline.starts_with("qemu-system") && cmdline.contains(&data) {
                signal(pid, Signal::SIGKILL);
            }
        }
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

impl SharedAgent {
    fn start() -> SharedAgent {
        ensure_user();
        let dirs = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dirs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = dirs.path().join("data");
        let run = dirs.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = run.join("agent.sock");
        let log = std::fs::File::create(dirs.path().join("agent.log")).unwrap();
        let child = Command::new(crate::vmctl_bin())
            .arg("--data-dir")
            .arg(&data)
            .arg("--socket")
            .arg(&socket)
            .args(["agent", "--socket-group", GROUP])
            .env("VMCTL_ACCEL", "tcg")
            .env_remove("VMCTL_DRIVER")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the agent did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        // The second user's home: its own, outside the agent's reach
        // requirements (the agent is root and reads it anyway).
        let home = PathBuf::from(format!("/tmp/{USER}-home-{}", std::process::id()));
        std::fs::create_dir_all(&home).unwrap();
        chown_user(&home);
        SharedAgent {
            child,
            data,
            socket,
            _dirs: dirs,
            home,
        }
    }

    /// The `setpriv` prefix that runs a program as [`USER`] with its groups.
    fn as_user() -> Vec<String> {
        [
            "setpriv",
            &format!("--reuid={USER}"),
            &format!("--regid={USER}"),
            "--init-groups",
            "--",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// Runs `vmctl ARGS` as the second user, in its home.
    fn vmctl(&self, args: &[&str]) -> Output {
        let pre = Self::as_user();
        Command::new(&pre[0])
            .args(&pre[1..])
            .arg(crate::vmctl_bin())
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--no-autostart")
            .args(args)
            .current_dir(&self.home)
            .env("HOME", &self.home)
            .env("NO_COLOR", "1")
            .env_remove("VMCTL_DRIVER")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs `vmctl ARGS` as the second user with `input` on its stdin.
    fn vmctl_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let pre = Self::as_user();
        let mut child = Command::new(&pre[0])
            .args(&pre[1..])
            .arg(crate::vmctl_bin())
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--no-autostart")
            .args(args)
            .current_dir(&self.home)
            .env("HOME", &self.home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        out
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.vmctl(args);
        assert!(
            out.status.success(),
            "vmctl {args:?} as {USER} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `vmctl console NAME` as the second user on a pseudo-terminal: types
    /// `keys` once attached, then Ctrl-]; returns what the terminal showed.
    fn console_session(&self, name: &str, keys: &str) -> String {
        use std::io::Write;
        let mut cmd = Self::as_user();
        cmd.extend([
            crate::vmctl_bin().to_owned(),
            "--socket".into(),
            self.socket.display().to_string(),
            "--no-autostart".into(),
            "console".into(),
            name.into(),
        ]);
        let mut child = Command::new("script")
            .args(["-qec", &cmd.join(" "), "/dev/null"])
            .current_dir(&self.home)
            .env("HOME", &self.home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("script(1) from util-linux runs");
        let mut stdin = child.stdin.take().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        stdin.write_all(b"\r").unwrap();
        std::thread::sleep(Duration::from_secs(1));
        stdin.write_all(keys.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_secs(4));
        stdin.write_all(b"\x1d").unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn chown_user(p: &Path) {
    let st = Command::new("chown")
        .arg(format!("{USER}:{USER}"))
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn a_second_user_with_only_the_socket_runs_every_command_against_a_real_guest() {
    let a = SharedAgent::start();
    // The premise: the socket is the group's, the data dir nobody else's.
    let sock_mode = std::fs::metadata(&a.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(sock_mode, 0o660, "--socket-group gives the group rw");
    let pre = SharedAgent::as_user();
    let ls = Command::new(&pre[0])
        .args(&pre[1..])
        .arg("ls")
        .arg(&a.data)
        .output()
        .unwrap();
    assert!(
        !ls.status.success(),
        "{USER} must not read the agent's data dir"
    );
    let h = &a.home;
    std::fs::write(
        h.join("setup.sh"),
        "#!/bin/sh\necho \"script on $(hostname)\"\n",
    )
    .unwrap();
    std::fs::write(h.join("app.conf"), "answer=42\n").unwrap();
    std::fs::set_permissions(h.join("app.conf"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::write(
        h.join("VMFile.kdl"),
        format!(
            r#"vm "second" {{
    image "{img}"
    memory 512
    cloud-init {{
        hostname "second"
    }}
    provision "shell" {{
        script "setup.sh"
    }}
    provision "file" {{
        source "app.conf"
        destination "/tmp/app.conf"
    }}
}}
"#,
            img = tiny_image().display()
        ),
    )
    .unwrap();
    for f in ["setup.sh", "app.conf", "VMFile.kdl"] {
        chown_user(&h.join(f));
    }

    let out = a.vmctl(&["apply", "--wait", "--timeout", BOOT]);
    assert!(
        out.status.success(),
        "apply --wait as {USER}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // log: console and provision logs, --tail, through the agent.
    assert!(a.ok(&["log", "second", "--console"]).contains("ssh ready"));
    let tail = a.ok(&["log", "second", "--provision", "--tail", "1"]);
    assert_eq!(tail.lines().count(), 1, "{tail}");
    assert!(tail.contains("exited with code 0"), "{tail}");

    // exec: stdout and stderr apart, the exit code kept.
    let out = a.vmctl(&[
        "exec",
        "second",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_eq!(
        a.ok(&["exec", "second", "--", "stat", "-c", "%a", "/tmp/app.conf"])
            .trim(),
        "640"
    );

    // cp both ways, the mode kept both ways.
    let up = h.join("up.bin");
    std::fs::write(&up, b"bytes\x00\x01 for cp").unwrap();
    std::fs::set_permissions(&up, std::fs::Permissions::from_mode(0o705)).unwrap();
    chown_user(&up);
    a.ok(&["cp", "up.bin", "second:/tmp/up.bin"]);
    assert_eq!(
        a.ok(&["exec", "second", "--", "stat", "-c", "%a", "/tmp/up.bin"])
            .trim(),
        "705"
    );
    a.ok(&["cp", "second:/tmp/up.bin", "down.bin"]);
    let down = h.join("down.bin");
    assert_eq!(std::fs::read(&down).unwrap(), std::fs::read(&up).unwrap());
    assert_eq!(
        std::fs::metadata(&down).unwrap().permissions().mode() & 0o7777,
        0o705
    );

    // ssh: the system ssh through the agent's tunnel (ProxyCommand `vmctl
    // tunnel`), pinned host key; the second user cannot reach the guest's
    // forwarded port's key or known_hosts any other way.
    assert_eq!(a.ok(&["ssh", "second", "--", "echo", "ok"]), "ok\n");
    assert_eq!(a.ok(&["ssh", "second", "--", "hostname"]).trim(), "second");
    assert_eq!(
        a.vmctl(&["ssh", "second", "--", "exit 7"]).status.code(),
        Some(7)
    );
    // A mebibyte through the tunnel, both ways (the session used to stall
    // after the key exchange: splice held ssh's pipe).
    let mib: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let up = a.vmctl_stdin(&["ssh", "second", "--", "cat > /tmp/mib.bin"], &mib);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let out = a.vmctl(&["ssh", "second", "--", "cat", "/tmp/mib.bin"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == mib,
        "1 MiB through the tunnel, up and back, arrives intact ({} bytes)",
        out.stdout.len()
    );

    // provision: run again on request.
    let before = a.ok(&["log", "second", "--provision"]);
    a.ok(&["provision", "second", "--timeout", BOOT]);
    let after = a.ok(&["log", "second", "--provision"]);
    assert!(
        after.len() > before.len(),
        "provisioning ran again:\n{after}"
    );

    // image inspect of a local file: the agent runs qemu-img.
    let small = h.join("small.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&small)
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success());
    chown_user(&small);
    let info = a.ok(&["image", "inspect", "small.qcow2"]);
    assert!(info.contains("format:        qcow2"), "{info}");
    assert!(
        info.contains("virtual size:  16Mi (16777216 bytes)"),
        "{info}"
    );

    // console: a shell on the serial console.
    let screen = a.console_session("second", "echo con$((6*7))sole\r");
    assert!(screen.contains("con42sole"), "{screen}");

    a.ok(&["delete", "vm", "second", "--wait", "--timeout", "120"]);
}
