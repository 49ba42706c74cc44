//! `vmctl ssh`, `exec` and `cp` wait for the VM to answer SSH (its
//! `SshReady` condition) instead of hanging in a connect (fake driver).

use std::time::{Duration, Instant};

use crate::agent::{Agent, stderr};

/// Runs `vmctl ARGS` (an `ssh`, `exec` or `cp`) against agent `a`, its
/// global flags first (what follows `--` goes to the guest).
fn guest_command(a: &Agent, args: &[&str]) -> std::process::Output {
    std::process::Command::new(crate::vmctl_bin())
        .arg("--no-autostart")
        .arg("--data-dir")
        .arg(a.data_dir())
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// The fault: `vmctl ssh` right after `up` blocked silently ~19 s inside a
/// stalled TCP connect. Now it says what it waits for, and a guest that
/// never answers ends in a clear error when the VM's SSH timeout passes.
#[test]
fn ssh_exec_and_cp_say_what_they_wait_for_and_give_up_clearly() {
    let a = Agent::start_with("fake", &[("VMCTL_FAKE_SSH_UNREACHABLE", "mute")]);
    let out = a.vmctl(
        &["apply", "-f", "-"],
        Some("vm \"mute\" {\n  image-url \"https://e.com/x.img\"\n  ssh { timeout 2; }\n}\n"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("f");
    std::fs::write(&local, "x").unwrap();
    let local = local.to_str().unwrap();
    for args in [
        vec!["exec", "mute", "--", "true"],
        vec!["ssh", "mute", "--", "true"],
        vec!["cp", local, "mute:/tmp/f"],
    ] {
        let t0 = Instant::now();
        let out = guest_command(&a, &args);
        let took = t0.elapsed();
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert_eq!(
            err.matches("waiting for vm/mute to answer SSH").count(),
            1,
            "{args:?}: one line says what is awaited: {err}"
        );
        assert!(err.contains("vmctl::ssh::not_ready"), "{args:?}: {err}");
        assert!(
            err.contains("did not answer SSH within 2 s"),
            "{args:?}: {err}"
        );
        assert!(
            took < Duration::from_secs(15),
            "{args:?}: bounded by the SSH timeout, took {took:?}"
        );
    }
}

/// Found as: `vmctl ssh` on a suspended VM hung silently for good (its
/// guest paused, the connection never answered), `exec` and `cp` failed
/// after 30 s with a handshake timeout, and a stopped VM's error pointed
/// to a `vmctl wait` that does not exist. A VM whose guest cannot answer
/// SSH now is refused at once, saying what to do.
#[test]
fn ssh_exec_and_cp_refuse_at_once_a_vm_that_cannot_answer_ssh_now() {
    let a = Agent::start();
    let vmfile = "vm \"web\" {\n  image-url \"https://e.com/x.img\"\n}\n\
                  vm \"dark\" {\n  image-url \"https://e.com/x.img\"\n  network \"none\"\n}\n";
    let out = a.vmctl(
        &["apply", "-f", "-", "--wait", "--timeout", "60"],
        Some(vmfile),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("f");
    std::fs::write(&local, "x").unwrap();
    let local = local.to_str().unwrap();
    let refused = |vm: &str, code: &str, says: &str, help: &str| {
        for args in [
            vec!["exec", vm, "--", "true"],
            vec!["ssh", vm, "--", "true"],
            vec!["cp", local, &format!("{vm}:/tmp/f")],
        ] {
            let t0 = Instant::now();
            let out = guest_command(&a, &args);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
            for part in [code, says, help] {
                assert!(err.contains(part), "{args:?}: {part:?} not in: {err}");
            }
            assert!(!err.contains("waiting for"), "{args:?}: no wait: {err}");
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{args:?}: at once, took {:?}",
                t0.elapsed()
            );
        }
    };
    refused(
        "dark",
        "vmctl::ssh::no_address",
        "vm/dark has no SSH address: its network is \"none\"",
        "vmctl console NAME",
    );
    let out = a.vmctl(&["suspend", "web"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    refused(
        "web",
        "vmctl::vm::invalid_state",
        "vm/web is suspended: its guest is paused and cannot answer SSH",
        "vmctl resume web",
    );
    let out = a.vmctl(&["stop", "web"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    refused(
        "web",
        "vmctl::vm::invalid_state",
        "vm/web is stopped",
        "vmctl start web",
    );
}
