//! Host-side faults of issue 18: a relative data dir (item 8), a VM name
//! whose socket paths overflow `sun_path` (item 5), provisioning steps and
//! `exec` that read stdin (item 10).
use super::*;

/// `vmctl ARGS` in the project dir with the data dir given only as the
/// relative `.vmctl`: through `VMCTL_DATA_DIR` when `env`, else `--data-dir`.
fn relative(w: &World, env: bool, args: &[&str]) -> Output {
    let mut cmd = Command::new(crate::vmctl_bin());
    if env {
        cmd.env("VMCTL_DATA_DIR", ".vmctl");
    } else {
        cmd.args(["--data-dir", ".vmctl"])
            .env_remove("VMCTL_DATA_DIR");
    }
    cmd.args(args)
        .current_dir(w.project())
        .env("VMCTL_ACCEL", "tcg")
        .env_remove("VMCTL_DRIVER")
        .env_remove("VMCTL_SOCKET")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(w: &World, env: bool, args: &[&str]) -> String {
    let out = relative(w, env, args);
    let log = std::fs::read_to_string(w.project().join(".vmctl/agent.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "vmctl {args:?} failed:\n{}\n{}\nagent log:\n{log}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Ends the agent and QEMUs of the project's `.vmctl` however the test ends.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let needle = self.0.display().to_string();
        for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let raw = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmdline.contains(&needle)
                && (cmdline.starts_with("qemu-system") || cmdline.contains(" agent "))
            {
                signal(pid, Signal::SIGKILL);
            }
        }
    }
}

/// Issue 18 items 8, 5 and 10 end to end: `VMCTL_DATA_DIR=.vmctl vmctl up`
/// made QEMU fail ("cannot create PID file") and crash-loop; a valid
/// 63-character name made `qmp-events.sock` too long for QEMU; a step
/// reading stdin hung until the `up` timeout.
#[test]
fn relative_data_dir_and_long_vm_name_come_up_and_steps_reading_stdin_end() {
    let w = World::new();
    let p = w.project();
    let _reaper = Reaper(p.join(".vmctl"));
    let img = tiny_image().display().to_string();
    let name = format!("vm-{}", "n".repeat(60));
    assert_eq!(name.len(), 63, "the longest valid name");
    std::fs::write(
        p.join("VMFile.kdl"),
        format!(
            r#"vm "{name}" {{
    image "{img}"
    memory 512
    ssh {{
        user "vm"
    }}
    provision "shell" {{
        inline "read -r x; echo stdin-eof=$?"
    }}
    provision "shell" {{
        inline "echo next step ran"
    }}
}}
"#
        ),
    )
    .unwrap();
    let data = p.join(".vmctl");
    let work = data.join("vms").join(&name);
    assert!(
        work.join("qmp-events.sock").as_os_str().len() > 107,
        "the socket paths in the work dir overflow sun_path"
    );

    let out = relative(&w, true, &["up", "--timeout", BOOT]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let log = std::fs::read_to_string(data.join("agent.log")).unwrap_or_default();
    assert!(out.status.success(), "{err}\nagent log:\n{log}");
    assert!(err.contains("stdin-eof=1"), "{err}");
    assert!(err.contains("next step ran"), "{err}");
    assert!(!log.contains("cannot create PID file"), "{log}");
    assert!(!log.contains("too long"), "{log}");

    // Everything is under the project's .vmctl, by absolute paths.
    let st: serde_json::Value =
        serde_json::from_str(&ok(&w, false, &["status", &name, "-o", "json"])).unwrap();
    assert_eq!(st["state"], "Running", "{st}");
    assert_eq!(
        st["work_dir"].as_str(),
        Some(work.to_str().unwrap()),
        "{st}"
    );
    let mut sock_dirs = Vec::new();
    for sock in ["qmp.sock", "qmp-events.sock", "serial.sock"] {
        let target = std::fs::read_link(work.join(sock)).unwrap();
        assert!(target.as_os_str().len() <= 107, "{}", target.display());
        sock_dirs.push(target.parent().unwrap().to_owned());
    }

    // `exec` of a command reading stdin ends too.
    assert_eq!(
        ok(
            &w,
            false,
            &["exec", &name, "--", "sh", "-c", "read -r x; echo $?"]
        )
        .trim(),
        "1"
    );

    ok(&w, true, &["down", "--destroy", "--timeout", "120"]);
    assert!(!work.exists(), "destroy removes the work dir");
    assert!(!sock_dirs[0].exists(), "and the socket directory");
}
