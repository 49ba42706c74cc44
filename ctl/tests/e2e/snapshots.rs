//! Snapshots (issue 16 item 3) on the tiny guest: a file written to the
//! root disk, a snapshot, the file deleted, a restore, and the file is
//! back: for the running VM (disks and memory, restored live, QEMU the
//! same) and for the stopped one (disks only). Deleting the VM deletes its
//! snapshots. One VM for every case, to keep TCG boots few.

use super::*;

fn vmfile(img: &str) -> String {
    format!(
        r#"vm "sn" {{
    image "{img}"
    memory 512
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
        let out = w.vmctl(&["exec", "sn", "--", "sh", "-c", cmd]);
        if out.status.success() {
            return String::from_utf8(out.stdout).unwrap();
        }
        last = Some(out);
        std::thread::sleep(Duration::from_secs(2));
    }
    panic!("exec {cmd:?} failed: {last:?}");
}

/// The tiny guest runs from its initramfs: its root disk's filesystem is
/// mounted here to put files on the disk.
const MOUNT: &str = "mkdir -p /mnt/r && mount /dev/vda1 /mnt/r";

/// What `/mnt/r/FILE` holds when read from the disk (remounted, so not
/// from the page cache), or `missing`.
fn read_from_disk(w: &World, file: &str) -> String {
    sh(
        w,
        &format!("umount /mnt/r 2>/dev/null; {MOUNT} && (cat /mnt/r/{file} || echo missing); umount /mnt/r"),
    )
    .trim()
    .to_owned()
}

fn snapshot(w: &World, name: &str) -> serde_json::Value {
    w.json(&["get", "snapshot", name, "-o", "json"])
}

#[test]
fn a_deleted_file_is_back_after_a_restore_running_and_stopped_and_snapshots_go_with_the_vm() {
    let w = World::new();
    let p = w.project();
    let img = tiny_image().display().to_string();
    std::fs::write(p.join("VMFile.kdl"), vmfile(&img)).unwrap();
    w.ok(&["apply", "--wait", "--timeout", BOOT]);

    // Running: disks and memory.
    sh(&w, &format!("{MOUNT} && echo live > /mnt/r/keep && sync"));
    let out = w.ok(&["snapshot", "create", "sn", "live", "--wait", "-o", "json"]);
    let live: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(live["status"]["phase"], "Ready", "{live}");
    assert_eq!(live["status"]["memory"], true, "{live}");
    assert!(
        live["status"]["sizeBytes"].as_u64().unwrap() > 1 << 20,
        "{live}"
    );
    assert!(live["status"]["creationTime"].is_string(), "{live}");
    sh(&w, "rm /mnt/r/keep && sync");
    assert_eq!(read_from_disk(&w, "keep"), "missing");
    sh(&w, &format!("{MOUNT} && touch /mnt/r/mounted"));
    let pids = w.qemu_pids();
    w.ok(&["snapshot", "restore", "live", "--wait"]);
    // Memory is back too: the filesystem is mounted as it was at the
    // snapshot (the mount above came later and is gone with it).
    assert_eq!(
        sh(
            &w,
            "cat /mnt/r/keep; ls /mnt/r/mounted 2>&1 | grep -c 'No such'"
        )
        .trim(),
        "live\n1"
    );
    assert_eq!(read_from_disk(&w, "keep"), "live", "the disk is back");
    assert_eq!(w.qemu_pids(), pids, "restored live, not restarted");
    let vm = w.json(&["get", "vm", "sn", "-o", "json"]);
    assert_eq!(vm["status"]["phase"], "Running", "{vm}");

    // Stopped: disks only.
    sh(
        &w,
        &format!("{MOUNT} && echo off > /mnt/r/keep2 && umount /mnt/r"),
    );
    w.ok(&["stop", "sn", "--timeout", "120"]);
    w.ok(&["snapshot", "create", "sn", "off", "--wait"]);
    let off = snapshot(&w, "off");
    assert_eq!(off["status"]["memory"], false, "{off}");
    assert_eq!(off["status"]["sizeBytes"], 0, "{off}");
    w.ok(&["start", "sn", "--timeout", BOOT]);
    sh(&w, &format!("{MOUNT} && rm /mnt/r/keep2 && umount /mnt/r"));
    // A disk-only snapshot cannot be restored to the running VM: refused
    // by the agent, nothing changes.
    let refused = w.vmctl(&["snapshot", "restore", "off"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("vmctl::snapshot::needs_stopped_vm"), "{err}");
    assert_eq!(snapshot(&w, "off")["spec"].get("restoreToken"), None);
    w.ok(&["stop", "sn", "--timeout", "120"]);
    w.ok(&["snapshot", "restore", "off", "--wait"]);
    let vm = w.json(&["get", "vm", "sn", "-o", "json"]);
    assert_eq!(
        vm["status"]["phase"], "Stopped",
        "a stopped VM stays stopped"
    );
    w.ok(&["start", "sn", "--timeout", BOOT]);
    assert_eq!(read_from_disk(&w, "keep2"), "off");

    // In the VM's history and on the disk; a missing snapshot is an error.
    let history = w.ok(&["history", "vm", "sn"]);
    for what in [
        "SnapshotCreated: Saved snapshot live",
        "SnapshotRestored: Restored VM sn to snapshot live",
        "SnapshotCreated: Saved snapshot off",
        "SnapshotRestored: Restored VM sn to snapshot off",
    ] {
        assert!(history.contains(what), "{what} not in:\n{history}");
    }
    let missing = w.vmctl(&["snapshot", "restore", "nope"]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("vmctl::snapshot::not_found"), "{err}");
    let list = w.ok(&["snapshot", "list", "sn"]);
    assert!(list.contains("live") && list.contains("off"), "{list}");

    // Deleting the VM deletes its snapshots first.
    w.ok(&["delete", "-f", "VMFile.kdl", "--wait"]);
    let left = w.json(&["get", "snapshots", "-o", "json"]);
    assert_eq!(left["items"], serde_json::json!([]), "{left}");
    assert!(!w.data().join("vms/sn").exists());
}

/// A snapshot of the running VM created right after the agent was killed
/// (QEMU survives it) and a new agent adopted the VM: it is saved, with
/// memory, and reported Ready; QEMU is the same process.
#[test]
fn a_snapshot_taken_after_an_agent_kill_gets_its_status_on_qemu() {
    let w = World::new();
    let p = w.project();
    let img = tiny_image().display().to_string();
    std::fs::write(p.join("VMFile.kdl"), vmfile(&img)).unwrap();
    w.ok(&["apply", "--wait", "--timeout", BOOT]);
    let qemus = w.qemu_pids();
    assert_eq!(qemus.len(), 1, "one QEMU");

    let agent = w.agent_pid().expect("agent answers");
    signal(agent, Signal::SIGKILL);
    std::thread::sleep(Duration::from_millis(500));
    w.ok(&["get", "vm", "sn"]); // auto-starts a new agent
    assert_ne!(w.agent_pid(), Some(agent));

    let started = Instant::now();
    let out = w.ok(&[
        "snapshot",
        "create",
        "sn",
        "after",
        "--wait",
        "--timeout",
        "60",
        "-o",
        "json",
    ]);
    let made: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(made["status"]["phase"], "Ready", "{made}");
    assert_eq!(made["status"]["memory"], true, "{made}");
    eprintln!("saved in {:?} after the agent restart", started.elapsed());
    assert_eq!(w.qemu_pids(), qemus, "the same QEMU, not restarted");
    let vm = w.json(&["get", "vm", "sn", "-o", "json"]);
    assert_eq!(vm["status"]["phase"], "Running", "{vm}");
    w.ok(&["delete", "-f", "VMFile.kdl", "--wait"]);
}
