//! Shared folders (issue 15 item 4) on the tiny guest: a read-write share
//! written from both sides, a read-only one that refuses a write in the
//! guest, both shown in status and `describe`; a snapshot of the running
//! VM is refused naming the shares; an agent killed and started again
//! leaves the shares working (virtiofsd outlives it, as QEMU does), and
//! virtiofsd ends with QEMU; a host folder gone while the VM is stopped
//! fails its start visibly. One VM, to keep TCG boots few.

use super::*;

fn vmfile(img: &str) -> String {
    format!(
        r#"vm "sh" {{
    image "{img}"
    memory 512
    share "./src" mount="/src"
    share "./docs" mount="/mnt/docs" read-only=#true
    ssh {{
        user "root"
    }}
}}
"#
    )
}

/// Runs a shell command in the guest, retrying while SSH comes up.
fn sh(w: &World, cmd: &str) -> String {
    let mut last = None;
    for _ in 0..60 {
        let out = w.vmctl(&["exec", "sh", "--", "sh", "-c", cmd]);
        if out.status.success() {
            return String::from_utf8(out.stdout).unwrap();
        }
        last = Some(out);
        std::thread::sleep(Duration::from_secs(2));
    }
    panic!("exec {cmd:?} failed: {last:?}");
}

/// The pids of the virtiofsd processes serving this test's shares.
fn virtiofsd_pids(w: &World) -> Vec<u32> {
    let project = w.project().display().to_string();
    let mut v: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("virtiofsd") && c.contains(&project)
            })
        })
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn a_shared_folder_is_read_and_written_from_both_sides_and_a_read_only_one_refuses_writes() {
    let w = World::new();
    let p = w.project();
    let img = tiny_image().display().to_string();
    for d in ["src", "docs"] {
        std::fs::create_dir_all(p.join(d)).unwrap();
    }
    std::fs::write(p.join("src/from-host.txt"), "hello from the host\n").unwrap();
    std::fs::write(p.join("docs/readme.txt"), "read me\n").unwrap();
    std::fs::write(p.join("VMFile.kdl"), vmfile(&img)).unwrap();
    w.ok(&["apply", "--wait", "--timeout", BOOT]);

    // Status: each share, how it is served.
    let vm = w.json(&["get", "vm", "sh", "-o", "json"]);
    let shares = vm["status"]["runtime"]["shares"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(shares.len(), 2, "{vm}");
    assert_eq!(shares[0]["mountPath"], "/src");
    assert_eq!(
        shares[0]["hostPath"],
        p.join("src").display().to_string(),
        "resolved against the VMFile's directory"
    );
    assert_eq!(shares[1]["readOnly"], true);
    let ty = shares[0]["type"].as_str().unwrap().to_owned();
    assert!(ty == "virtiofs" || ty == "9p", "{vm}");
    eprintln!("shares served by {ty}");
    let described = w.ok(&["describe", "vm", "sh"]);
    assert!(described.contains("Shared folders:"), "{described}");
    assert!(
        described
            .lines()
            .any(|l| l.contains("/mnt/docs") && l.contains(&ty) && l.contains("ro")),
        "{described}"
    );

    // Host → guest, guest → host.
    assert_eq!(sh(&w, "cat /src/from-host.txt"), "hello from the host\n");
    sh(
        &w,
        "echo hello from the guest > /src/from-guest.txt && sync",
    );
    assert_eq!(
        std::fs::read_to_string(p.join("src/from-guest.txt")).unwrap(),
        "hello from the guest\n"
    );
    std::fs::write(p.join("src/later.txt"), "written while it runs\n").unwrap();
    assert_eq!(sh(&w, "cat /src/later.txt"), "written while it runs\n");

    // Read-only: readable, and a write is refused in the guest.
    assert_eq!(sh(&w, "cat /mnt/docs/readme.txt"), "read me\n");
    let out = w.vmctl(&[
        "exec",
        "sh",
        "--",
        "sh",
        "-c",
        "echo no > /mnt/docs/new.txt",
    ]);
    assert!(!out.status.success(), "a write to a read-only share failed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(!p.join("docs/new.txt").exists());

    // A snapshot of the running VM: refused, naming the shares.
    let out = w.vmctl(&["snapshot", "create", "sh", "live"]);
    let created = String::from_utf8_lossy(&out.stderr).into_owned();
    let mut last = serde_json::Value::Null;
    let says_why = |last: &mut serde_json::Value| {
        *last = w.json(&["get", "snapshot", "live", "-o", "json"]);
        last["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter().any(|c| {
                c["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("shared folders"))
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !says_why(&mut last) {
        assert!(
            Instant::now() < deadline,
            "the snapshot does not say why it failed: {last}\n{created}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(last["status"]["phase"], "Failed", "{last}");

    // The agent killed and started again: the shares keep working, served
    // by the same virtiofsd (when virtio-fs is used).
    let fsd = virtiofsd_pids(&w);
    if ty == "virtiofs" {
        // One per share (QEMU's C virtiofsd forks a child into its
        // sandbox: the recorded one is the parent).
        for i in 0..2 {
            let f = w.data().join(format!("vms/sh/virtiofsd-{i}.pid"));
            let pid: u32 = std::fs::read_to_string(&f).unwrap().trim().parse().unwrap();
            assert!(
                fsd.contains(&pid),
                "share {i}'s virtiofsd {pid} runs: {fsd:?}"
            );
        }
    }
    let agent = w.agent_pid().expect("an agent runs");
    signal(agent, Signal::SIGKILL);
    std::thread::sleep(Duration::from_millis(500));
    let vm = w.json(&["get", "vm", "sh", "-o", "json"]);
    assert_eq!(vm["status"]["phase"], "Running", "{vm}");
    assert_eq!(virtiofsd_pids(&w), fsd, "virtiofsd outlived the agent");
    sh(&w, "echo again > /src/again.txt && sync");
    assert_eq!(
        std::fs::read_to_string(p.join("src/again.txt")).unwrap(),
        "again\n"
    );

    // Stopped: virtiofsd ends with QEMU.
    w.ok(&["stop", "sh", "--timeout", "120"]);
    wait_until("virtiofsd ended with QEMU", Duration::from_secs(10), || {
        virtiofsd_pids(&w).is_empty()
    });
    // A host folder gone while the VM was stopped: the start fails,
    // naming it, in the VM's Ready condition.
    std::fs::rename(p.join("src"), p.join("src-moved")).unwrap();
    let _ = w.vmctl(&["start", "sh", "--timeout", "30"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = w.json(&["get", "vm", "sh", "-o", "json"]);
        let said = last["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter().any(|c| {
                c["type"] == "Ready"
                    && c["message"].as_str().is_some_and(|m| {
                        m.contains("src does not exist") && m.contains("vmctl::qemu::share_failed")
                    })
            })
        });
        if said {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no share_failed condition: {last}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(w.qemu_pids().is_empty(), "QEMU was not started");
    std::fs::rename(p.join("src-moved"), p.join("src")).unwrap();
    w.ok(&["delete", "-f", "VMFile.kdl", "--wait"]);
    assert_eq!(
        std::fs::read_to_string(p.join("src/from-host.txt")).unwrap(),
        "hello from the host\n",
        "deleting the VM leaves the shared folder alone"
    );
}
