//! Tests against a real sshd, started per test on 127.0.0.1 with a
//! temporary config whose host key is the one `ensure_vm_keys` generated
//! in a temporary VM work directory, as the QEMU driver does for a guest.
//! The guest is this machine, so "remote" files are checked on the local
//! filesystem.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use vmctl_api::resources::LocalFile;
use vmctl_api::{ProvisionStep, SshConfig, VmRuntime};

use super::*;
use crate::drivers::DriverError;
use crate::seed::ensure_vm_keys;

const SSHD: &str = "/usr/sbin/sshd";

/// An sshd serving one fake VM.
struct Sshd {
    child: Child,
    target: SshTarget,
    /// The VM's work directory (keys, provision.log).
    work: tempfile::TempDir,
    /// sshd's config, pidfile and authorized_keys.
    conf: tempfile::TempDir,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// VM `vm`'s SSH target on 127.0.0.1:`port`, its keys in `work`, with
/// the default user.
fn local_target(vm: &str, work: &Path, port: u16) -> SshTarget {
    SshTarget {
        vm: vm.into(),
        runtime: VmRuntime {
            work_dir: Some(work.display().to_string()),
            ssh_host: Some("127.0.0.1".into()),
            ssh_port: Some(port),
            ..Default::default()
        },
        ssh: None,
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Sshd {
    async fn start() -> Self {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: the SSH driver's tests need a real sshd (Debian package openssh-server)"
        );
        // sshd refuses to start without its privilege separation directory.
        fs::create_dir_all("/run/sshd").unwrap();
        let work = tempfile::tempdir().unwrap();
        let conf = tempfile::tempdir().unwrap();
        let keys = ensure_vm_keys(work.path(), "vmctl@test").unwrap();
        let authorized = conf.path().join("authorized_keys");
        fs::write(&authorized, format!("{}\n", keys.user.public_openssh)).unwrap();
        let port = free_port();
        let config = conf.path().join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
                 StrictModes no\nUsePAM no\nPidFile {}\nSubsystem sftp internal-sftp\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nLogLevel ERROR\n",
                keys.host.private_path.display(),
                authorized.display(),
                conf.path().join("sshd.pid").display(),
            ),
        )
        .unwrap();
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let target = SshTarget {
            vm: "test-vm".into(),
            runtime: VmRuntime {
                work_dir: Some(work.path().display().to_string()),
                ssh_host: Some("127.0.0.1".into()),
                ssh_port: Some(port),
                ..Default::default()
            },
            ssh: Some(SshConfig {
                user: current_user(),
                private_key: None,
                timeout_seconds: None,
            }),
        };
        let sshd = Self {
            child,
            target,
            work,
            conf,
        };
        wait_ssh(&sshd.target, Duration::from_secs(15))
            .await
            .expect("test sshd answers");
        sshd
    }

    /// Stops sshd (as a guest restarting it does) and starts it again on
    /// the same port after `down`.
    fn restart_after(&mut self, down: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down);
        self.child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(self.conf.path().join("sshd_config"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
    }

    fn log(&self) -> String {
        fs::read_to_string(self.work.path().join(PROVISION_LOG)).unwrap_or_default()
    }
}

/// Collects output lines.
#[derive(Default)]
struct Lines(Mutex<Vec<String>>);

impl Lines {
    fn push(&self, l: &str) {
        self.0.lock().unwrap().push(l.to_owned());
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

fn inline(cmd: &str) -> ProvisionStep {
    ProvisionStep::Shell {
        inline: Some(cmd.into()),
        script: None,
    }
}

fn local(path: &Path) -> LocalFile {
    LocalFile {
        path: path.display().to_string(),
        digest: Some(vmctl_api::vmfile::digest(path).unwrap()),
    }
}

fn write_mode(path: &Path, content: &str, mode: u32) {
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// A step index unlikely to collide with a concurrent test's script path.
fn unique_index() -> u32 {
    rand::random::<u32>() % 1_000_000 + 1_000
}

async fn step(sshd: &Sshd, index: u32, step: &ProvisionStep, lines: &Lines) -> Result<i32> {
    let out = |l: &str| lines.push(l);
    let outcome = SshProvisioner::new()
        .run_step(&sshd.target, index, step, &out)
        .await?;
    Ok(outcome.exit_code)
}

#[tokio::test]
async fn shell_inline_streams_lines_and_logs_them_under_a_header() {
    let sshd = Sshd::start().await;
    let lines = Lines::default();
    let code = step(&sshd, 0, &inline("echo one; printf 'two\\nthree'"), &lines)
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert_eq!(lines.take(), ["one", "two", "three"]);
    let log = sshd.log();
    let body: Vec<&str> = log.lines().collect();
    assert!(body[0].starts_with("==> "), "{log}");
    assert!(body[0].ends_with(" step 0: shell inline: echo one; printf 'two\\nthree'"));
    assert_eq!(
        &body[1..],
        ["one", "two", "three", "==> step 0 exited with code 0"]
    );
}

#[tokio::test]
async fn lines_reach_the_callback_while_the_command_still_runs() {
    let sshd = Sshd::start().await;
    let seen_before_end = Mutex::new(None);
    let marker = sshd.work.path().join("finished");
    let cmd = format!("echo early; sleep 1; touch {}", marker.display());
    let out = |l: &str| {
        if l == "early" {
            *seen_before_end.lock().unwrap() = Some(!marker.exists());
        }
    };
    exec(&sshd.target, &cmd, &out).await.unwrap();
    assert_eq!(*seen_before_end.lock().unwrap(), Some(true));
}

#[tokio::test]
async fn stdout_and_stderr_keep_the_order_the_guest_printed_them() {
    let sshd = Sshd::start().await;
    let lines = Lines::default();
    // Pauses so that each line reaches sshd before the next is written:
    // sshd reads stdout and stderr from separate pipes, so lines written
    // within one of its poll rounds have no order to keep.
    let cmd = "echo out1; sleep 0.2; echo err1 >&2; sleep 0.2; echo out2; sleep 0.2; echo err2 >&2";
    let code = step(&sshd, 0, &inline(cmd), &lines).await.unwrap();
    assert_eq!(code, 0);
    assert_eq!(lines.take(), ["out1", "err1", "out2", "err2"]);
}

#[tokio::test]
async fn failing_step_returns_its_exit_code_and_stops_the_run() {
    let sshd = Sshd::start().await;
    let marker = sshd.work.path().join("must-not-exist");
    let steps = [
        inline("echo first"),
        inline("echo failing >&2; exit 3"),
        inline(&format!("touch {}", marker.display())),
    ];
    let lines = Lines::default();
    // The loop of ProvisionController (provision.rs): stop at the first
    // non-zero exit.
    let mut codes = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let code = step(&sshd, i as u32, s, &lines).await.unwrap();
        codes.push(code);
        if code != 0 {
            break;
        }
    }
    assert_eq!(codes, [0, 3]);
    assert!(!marker.exists());
    assert_eq!(lines.take(), ["first", "failing"]);
    assert!(sshd.log().contains("==> step 1 exited with code 3\n"));
}

#[tokio::test]
async fn shell_script_is_uploaded_executable_and_run() {
    let sshd = Sshd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("setup.sh");
    // Mode 0600 locally: the uploaded copy is made executable anyway.
    write_mode(&script, "#!/bin/sh\necho \"running $0\"\nexit 7\n", 0o600);
    let index = unique_index();
    let s = ProvisionStep::Shell {
        inline: None,
        script: Some(local(&script)),
    };
    let lines = Lines::default();
    let code = step(&sshd, index, &s, &lines).await.unwrap();
    let remote = PathBuf::from(format!("/tmp/vmctl-provision-{index}.sh"));
    assert_eq!(code, 7);
    assert_eq!(lines.take(), [format!("running {}", remote.display())]);
    assert_eq!(mode(&remote), 0o755);
    fs::remove_file(remote).unwrap();
}

#[tokio::test]
async fn file_upload_keeps_the_local_mode() {
    let sshd = Sshd::start().await;
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    for (name, m) in [("private.conf", 0o640), ("tool", 0o750), ("plain", 0o644)] {
        let from = src.path().join(name);
        write_mode(&from, &format!("content of {name}\n"), m);
        let to = dst.path().join(name);
        let s = ProvisionStep::File {
            source: local(&from),
            destination: to.display().to_string(),
        };
        let code = step(&sshd, 0, &s, &Lines::default()).await.unwrap();
        assert_eq!(code, 0);
        assert_eq!(
            fs::read_to_string(&to).unwrap(),
            format!("content of {name}\n")
        );
        assert_eq!(mode(&to), m, "{name}");
    }
}

#[tokio::test]
async fn file_upload_overwrites_and_narrows_an_existing_file() {
    let sshd = Sshd::start().await;
    let src = tempfile::tempdir().unwrap();
    let from = src.path().join("f");
    write_mode(&from, "new\n", 0o600);
    let to = src.path().join("existing");
    write_mode(&to, "old content, longer\n", 0o777);
    let s = ProvisionStep::File {
        source: local(&from),
        destination: to.display().to_string(),
    };
    step(&sshd, 0, &s, &Lines::default()).await.unwrap();
    assert_eq!(fs::read_to_string(&to).unwrap(), "new\n");
    assert_eq!(mode(&to), 0o600);
}

#[tokio::test]
async fn file_upload_to_a_missing_remote_directory_is_a_clear_error() {
    let sshd = Sshd::start().await;
    let src = tempfile::tempdir().unwrap();
    let from = src.path().join("f");
    write_mode(&from, "x", 0o644);
    let missing = src.path().join("no/such/dir");
    let s = ProvisionStep::File {
        source: local(&from),
        destination: missing.join("f").display().to_string(),
    };
    let err = step(&sshd, 0, &s, &Lines::default()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("Remote directory {} does not exist", missing.display())
    );
    assert!(sshd.log().contains("==> step 0 failed: Remote directory"));
}

#[tokio::test]
async fn file_changed_since_apply_is_refused() {
    let sshd = Sshd::start().await;
    let src = tempfile::tempdir().unwrap();
    let from = src.path().join("f");
    write_mode(&from, "applied", 0o644);
    let source = local(&from);
    fs::write(&from, "edited afterwards").unwrap();
    let to = src.path().join("dest");
    let s = ProvisionStep::File {
        source,
        destination: to.display().to_string(),
    };
    let err = step(&sshd, 0, &s, &Lines::default()).await.unwrap_err();
    assert!(
        err.to_string().contains("changed since it was applied"),
        "{err}"
    );
    assert!(!to.exists());
}

#[tokio::test]
async fn relative_destination_is_refused() {
    let sshd = Sshd::start().await;
    let src = tempfile::tempdir().unwrap();
    let from = src.path().join("f");
    write_mode(&from, "x", 0o644);
    let s = ProvisionStep::File {
        source: local(&from),
        destination: "etc/motd".into(),
    };
    let err = step(&sshd, 0, &s, &Lines::default()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "Destination etc/motd is not an absolute path"
    );
}

#[tokio::test]
async fn host_key_mismatch_is_refused_at_once() {
    let sshd = Sshd::start().await;
    // Another VM's host key where this VM's pinned key should be.
    let other = tempfile::tempdir().unwrap();
    let other_keys = ensure_vm_keys(other.path(), "vmctl@other").unwrap();
    fs::copy(
        &other_keys.host.public_path,
        sshd.work.path().join("host_ed25519.pub"),
    )
    .unwrap();

    let started = std::time::Instant::now();
    let err = wait_ssh(&sshd.target, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "not retried");
    assert!(matches!(err, SshError::HostKeyMismatch { .. }), "{err:?}");
    assert_eq!(err.code(), "vmctl::ssh::host_key_mismatch");
    let expected = other_keys
        .host
        .public
        .fingerprint(ssh_key::HashAlg::Sha256)
        .to_string();
    assert!(
        err.to_string()
            .contains(&format!("expected {expected}, got SHA256:"))
    );

    let marker = sshd.work.path().join("ran");
    let e = step(
        &sshd,
        0,
        &inline(&format!("touch {}", marker.display())),
        &Lines::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, DriverError::Backend(ref m) if m.contains("does not match")),
        "{e}"
    );
    assert!(!marker.exists());
}

#[tokio::test]
async fn missing_pinned_host_key_fails_closed() {
    let sshd = Sshd::start().await;
    fs::remove_file(sshd.work.path().join("host_ed25519.pub")).unwrap();
    let err = wait_ssh(&sshd.target, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::HostKeyMissing { .. }), "{err:?}");
    assert!(err.help().unwrap().contains("recreate the VM"));
}

#[tokio::test]
async fn wait_ssh_timeout_says_what_was_tried() {
    let work = tempfile::tempdir().unwrap();
    ensure_vm_keys(work.path(), "t").unwrap();
    let port = free_port();
    let target = local_target("down", work.path(), port);
    let err: DriverError = SshProvisioner::new()
        .wait_ssh(&target, Duration::from_millis(1500))
        .await
        .unwrap_err();
    let DriverError::Timeout(msg) = &err else {
        panic!("{err:?}")
    };
    assert!(
        msg.starts_with(&format!("waiting 1.5s for SSH as vm@127.0.0.1:{port} (")),
        "{msg}"
    );
    assert!(
        msg.contains("attempts of TCP connect, handshake, host key check"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!(
            "last error: Cannot connect to 127.0.0.1:{port}: Connection refused"
        )),
        "{msg}"
    );
}

#[tokio::test]
async fn wrong_user_fails_authentication_naming_the_keys_tried() {
    let sshd = Sshd::start().await;
    let mut target = sshd.target.clone();
    target.ssh = Some(SshConfig {
        user: "nobody-such-user".into(),
        private_key: Some(sshd.work.path().join("id_ed25519").display().to_string()),
        timeout_seconds: None,
    });
    let err = exec(&target, "true", &|_: &str| {}).await.unwrap_err();
    assert!(matches!(err, SshError::Auth { .. }), "{err:?}");
    assert!(err.to_string().contains("id_ed25519"), "{err}");
}

#[tokio::test]
async fn exec_returns_the_exit_code_and_signal_deaths() {
    let sshd = Sshd::start().await;
    let lines = Lines::default();
    let out = |l: &str| lines.push(l);
    assert_eq!(
        exec(&sshd.target, "echo hi; exit 42", &out).await.unwrap(),
        42
    );
    assert_eq!(lines.take(), ["hi"]);
    assert_eq!(
        exec(&sshd.target, "kill -TERM $$", &out).await.unwrap(),
        143
    );
    assert_eq!(sshd.log(), "", "exec does not write provision.log");
}

#[tokio::test]
async fn known_hosts_pins_the_generated_host_key_for_ssh() {
    let sshd = Sshd::start().await;
    let path = write_known_hosts(&sshd.target).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    let port = sshd.target.runtime.ssh_port.unwrap();
    let host_pub = fs::read_to_string(sshd.work.path().join("host_ed25519.pub")).unwrap();
    let body: Vec<&str> = host_pub.split_whitespace().take(2).collect();
    assert_eq!(text, format!("[127.0.0.1]:{port} {}\n", body.join(" ")));
    // OpenSSH's own client accepts it as the host's key.
    if Path::new("/usr/bin/ssh").exists() {
        let out = Command::new("/usr/bin/ssh")
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", path.display()))
            .arg("-i")
            .arg(sshd.work.path().join("id_ed25519"))
            .args(["-p", &port.to_string()])
            .arg(format!("{}@127.0.0.1", current_user()))
            .arg("echo ok")
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "ok\n",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn key_candidates_follow_the_manual() {
    let work = Path::new("/vms/web");
    let home = Path::new("/home/u");
    assert_eq!(
        connect::key_candidates(work, None, Some(home)),
        [
            "/vms/web/id_ed25519",
            "/home/u/.ssh/id_ed25519",
            "/home/u/.ssh/id_ecdsa",
            "/home/u/.ssh/id_rsa"
        ]
        .map(PathBuf::from)
    );
    assert_eq!(
        connect::key_candidates(work, Some("~/.ssh/deploy"), Some(home)),
        [PathBuf::from("/home/u/.ssh/deploy")]
    );
    assert_eq!(
        connect::key_candidates(work, Some("/keys/k"), None),
        [PathBuf::from("/keys/k")]
    );
}

#[test]
fn error_codes() {
    assert_eq!(
        SshError::RemoteDirMissing { dir: "/x".into() }.code(),
        "vmctl::provision::failed"
    );
    assert_eq!(
        SshError::NoAddress { vm: "v".into() }.code(),
        "vmctl::ssh::failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_started_while_sshd_restarts_connects_when_it_is_back() {
    let mut sshd = Sshd::start().await;
    let target = sshd.target.clone();
    let lines = Lines::default();
    let out = |l: &str| lines.push(l);
    // The command starts while sshd is down; it comes back 2 s later.
    let restart = tokio::task::spawn_blocking(move || {
        sshd.restart_after(Duration::from_secs(2));
        sshd
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let code = exec(&target, "echo back", &out).await.unwrap();
    assert_eq!(code, 0);
    assert_eq!(lines.take(), ["back"]);
    drop(restart.await.unwrap());
}

/// Issue 18 item 10: a step that reads stdin (`read -r x`, `cat`) waited
/// forever for input that never came. Every command's stdin is at
/// end-of-file, as with `ssh -n`: inline steps, scripts and `exec`.
#[tokio::test]
async fn steps_that_read_stdin_see_end_of_file_instead_of_waiting_forever() {
    let sshd = Sshd::start().await;
    // `timeout 10` on the guest side ends a hung read with 124, so the old
    // fault fails the assertions instead of hanging the test.
    let bound = Duration::from_secs(30);
    let lines = Lines::default();

    let read = inline("timeout 10 sh -c 'read -r x; echo \"read=$? x=[$x]\"'; echo next");
    let code = tokio::time::timeout(bound, step(&sshd, 0, &read, &lines))
        .await
        .expect("an inline step reading stdin ends")
        .unwrap();
    assert_eq!(code, 0);
    assert_eq!(lines.take(), ["read=1 x=[]", "next"]);

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("reads.sh");
    write_mode(
        &script,
        "#!/bin/sh\ntimeout 10 cat >/dev/null\necho \"cat=$?\"\n",
        0o700,
    );
    let index = unique_index();
    let s = ProvisionStep::Shell {
        inline: None,
        script: Some(local(&script)),
    };
    let code = tokio::time::timeout(bound, step(&sshd, index, &s, &lines))
        .await
        .expect("a script reading stdin ends")
        .unwrap();
    assert_eq!((code, lines.take()), (0, vec!["cat=0".to_owned()]));
    fs::remove_file(format!("/tmp/vmctl-provision-{index}.sh")).unwrap();

    let out = |l: &str| lines.push(l);
    let code = tokio::time::timeout(
        bound,
        exec(&sshd.target, "timeout 10 cat; echo \"done $?\"", &out),
    )
    .await
    .expect("exec of a command reading stdin ends")
    .unwrap();
    assert_eq!((code, lines.take()), (0, vec!["done 0".to_owned()]));
}

/// Runs `command` with [`remote::exec`]; returns its exit code, stdout and stderr.
async fn exec_split(sshd: &Sshd, command: &str) -> (i32, Vec<u8>, Vec<u8>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let run = remote::exec(&sshd.target, command, tx);
    let collect = async {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(p) = rx.recv().await {
            match p {
                remote::Output::Stdout(b) => out.extend(b),
                remote::Output::Stderr(b) => err.extend(b),
            }
        }
        (out, err)
    };
    let (code, (out, err)) = tokio::join!(run, collect);
    (code.unwrap(), out, err)
}

#[tokio::test]
async fn exec_for_the_api_keeps_stdout_and_stderr_apart_with_the_exit_code() {
    let sshd = Sshd::start().await;
    let (code, out, err) = exec_split(
        &sshd,
        "printf out1; printf 'err1\\n' >&2; sleep 0.2; printf 'out2\\n'; exit 3",
    )
    .await;
    assert_eq!(code, 3);
    assert_eq!(out, b"out1out2\n");
    assert_eq!(err, b"err1\n");
}

/// The deadlock a blocking read of one stream would have: the command
/// fills the SSH window with stderr while the reader waits on stdout.
#[tokio::test]
async fn exec_with_stderr_past_the_ssh_window_does_not_deadlock() {
    let sshd = Sshd::start().await;
    let t0 = std::time::Instant::now();
    let (code, out, err) = tokio::time::timeout(
        Duration::from_secs(60),
        exec_split(
            &sshd,
            "head -c 4000000 /dev/zero >&2; head -c 3000000 /dev/zero; echo end >&2",
        ),
    )
    .await
    .expect("no deadlock");
    assert_eq!(code, 0);
    assert_eq!(out.len(), 3_000_000);
    assert_eq!(err.len(), 4_000_004);
    eprintln!("7 MB through exec in {:?}", t0.elapsed());
}

#[tokio::test]
async fn exec_stops_when_the_caller_goes_away() {
    let sshd = Sshd::start().await;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let run = tokio::spawn({
        let target = sshd.target.clone();
        async move { remote::exec(&target, "sleep 30", tx).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(rx);
    let r = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("a silent command is cancelled within the poll interval")
        .unwrap();
    assert!(matches!(r, Err(SshError::Cancelled)), "{r:?}");
}

#[tokio::test]
async fn download_returns_the_file_with_its_mode_and_refuses_one_over_the_limit() {
    let sshd = Sshd::start().await;
    let f = sshd.work.path().join("remote.bin");
    write_mode(&f, "data\u{0}", 0o751);
    let got = remote::download(&sshd.target, f.to_str().unwrap(), 1024)
        .await
        .unwrap();
    assert_eq!(got.data, b"data\0");
    assert_eq!(got.mode, 0o751);
    let err = remote::download(&sshd.target, f.to_str().unwrap(), 3)
        .await
        .unwrap_err();
    assert!(error_chain(&err).contains("larger than"), "{err:?}");
    let err = remote::download(&sshd.target, sshd.work.path().to_str().unwrap(), 1024)
        .await
        .unwrap_err();
    assert!(error_chain(&err).contains("not a regular file"), "{err:?}");
}

#[tokio::test]
async fn upload_for_the_api_sets_exactly_the_mode_given() {
    let sshd = Sshd::start().await;
    let dest = sshd.work.path().join("up.bin");
    let n = remote::upload(&sshd.target, b"abc".to_vec(), dest.to_str().unwrap(), 0o705)
        .await
        .unwrap();
    assert_eq!(n, 3);
    assert_eq!(fs::read(&dest).unwrap(), b"abc");
    assert_eq!(mode(&dest), 0o705);
}

#[test]
fn access_hands_out_the_pinned_host_key_and_the_generated_key() {
    let work = tempfile::tempdir().unwrap();
    let keys = ensure_vm_keys(work.path(), "vmctl@test").unwrap();
    let target = SshTarget {
        vm: "v".into(),
        runtime: VmRuntime {
            work_dir: Some(work.path().display().to_string()),
            ..Default::default()
        },
        ssh: None,
    };
    let a = remote::access(&target).unwrap();
    assert_eq!(a.user, vmctl_api::default_ssh_user());
    let pinned = fs::read_to_string(work.path().join("host_ed25519.pub")).unwrap();
    let key_of = |s: &str| s.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    assert_eq!(key_of(&a.host_key), key_of(&pinned));
    assert!(
        a.private_key
            .as_deref()
            .is_some_and(|k| k.contains("OPENSSH PRIVATE KEY"))
    );
    let _ = keys;
}

/// The fault of issue 15's first faster probe: up to 16 probe connections
/// were in flight when a Debian cloud guest's OpenSSH came up, all passed
/// the banner, and the ones waiting for their turn to shake hands held
/// their connections (and an sshd process each) open; under TCG the guest
/// never finished a handshake in 10 minutes. Now, while one probe shakes
/// hands with an address, another that saw the banner closes its
/// connection at once, and a new one opens none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_do_not_pile_onto_an_sshd_slow_to_shake_hands() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // An "sshd" that sends its banner 300 ms after each connection and
    // then never answers the key exchange, until told to hang up.
    let work = tempfile::tempdir().unwrap();
    ensure_vm_keys(work.path(), "vmctl@test").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let (hang_up, hung_up) = tokio::sync::watch::channel(false);
    let counted = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            let mut hung_up = hung_up.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = conn.write_all(b"SSH-2.0-Slow_1.0\r\n").await;
                let mut buf = [0u8; 4096];
                loop {
                    tokio::select! {
                        r = conn.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { break },
                        _ = hung_up.changed() => break,
                    }
                }
            });
        }
    });
    let target = local_target("slow-vm", work.path(), port);

    // Two probes at once: both see the banner; one shakes hands (and
    // stalls), the other closes at once instead of waiting for its turn.
    let (t1, t2) = (target.clone(), target.clone());
    let mut first = tokio::spawn(async move { probe_ssh(&t1, Duration::from_secs(3)).await });
    let started = std::time::Instant::now();
    let mut second = tokio::spawn(async move { probe_ssh(&t2, Duration::from_secs(3)).await });
    let (done, other) = tokio::select! {
        r = &mut first => (r.unwrap(), second),
        r = &mut second => (r.unwrap(), first),
    };
    let err = done.expect_err("a probe waiting for its turn gives up");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "it gave up at once, not after the handshake bound: {:?}",
        started.elapsed()
    );
    assert!(
        matches!(&err, SshError::Connect { source, .. } if source.kind() == std::io::ErrorKind::WouldBlock),
        "{err:?}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);

    // While that handshake lasts, a new probe makes no connection at all.
    let err = probe_ssh(&target, Duration::from_secs(3))
        .await
        .expect_err("busy");
    assert!(
        matches!(&err, SshError::Connect { source, .. } if source.kind() == std::io::ErrorKind::WouldBlock),
        "{err:?}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "no new connection");

    // The handshake ends (here: the server hangs up); the next probe
    // connects again.
    hang_up.send_replace(true);
    let err = other.await.unwrap().expect_err("the server hung up");
    assert!(
        matches!(err, SshError::Handshake { .. } | SshError::Connect { .. }),
        "{err:?}"
    );
    assert!(
        !matches!(&err, SshError::Connect { source, .. } if source.kind() == std::io::ErrorKind::WouldBlock),
        "{err:?}"
    );
    let _ = probe_ssh(&target, Duration::from_secs(1)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 3, "a fresh connection");
}
