//! Disks (issue 16) on the tiny guest: a data disk with its serial that
//! keeps its data across a stop and start, the root disk grown live, a
//! shrink refused visibly without stopping the VM, which then stops and
//! starts again. One VM, to keep TCG boots few.

use super::*;

fn vmfile(img: &str, root_gib: u32, data: &str) -> String {
    format!(
        r#"vm "dk" {{
    image "{img}"
    memory 512
    disk {root_gib}
{data}    ssh {{
        user "root"
    }}
}}
"#
    )
}

fn cond(obj: &serde_json::Value, ty: &str) -> Option<serde_json::Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == ty)
        .cloned()
}

fn root_bytes(w: &World) -> Option<u64> {
    let vm = w.json(&["get", "vm", "dk", "-o", "json"]);
    vm["status"]["runtime"]["disks"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == "root")?["sizeBytes"]
        .as_u64()
}

/// Runs a shell command in the guest, retrying while SSH comes up.
fn sh(w: &World, cmd: &str) -> String {
    let mut last = None;
    for _ in 0..60 {
        let out = w.vmctl(&["exec", "dk", "--", "sh", "-c", cmd]);
        if out.status.success() {
            return String::from_utf8(out.stdout).unwrap();
        }
        last = Some(out);
        std::thread::sleep(Duration::from_secs(2));
    }
    panic!("exec {cmd:?} failed: {last:?}");
}

/// The block device of the disk with serial `serial` (no udev in the tiny
/// guest, so /sys instead of /dev/disk/by-id).
const FIND: &str = "for b in /sys/block/vd*; do [ \"$(cat $b/serial 2>/dev/null)\" = data ] && echo ${b##*/}; done";

#[test]
fn data_disk_keeps_its_serial_and_data_root_grows_live_and_a_shrink_is_refused_visibly() {
    let w = World::new();
    let p = w.project();
    let img = tiny_image().display().to_string();
    let data = "    disk \"data\" size=\"1G\"\n";
    std::fs::write(p.join("VMFile.kdl"), vmfile(&img, 1, data)).unwrap();
    w.ok(&["apply", "--wait", "--timeout", BOOT]);

    // The data disk: visible with its serial and size; data written to it
    // survives a stop and start.
    let dev = sh(&w, FIND).trim().to_owned();
    assert!(dev.starts_with("vd"), "no disk with serial `data`: {dev:?}");
    let sectors = sh(&w, &format!("cat /sys/block/{dev}/size"));
    assert_eq!(sectors.trim(), ((1u64 << 30) / 512).to_string());
    sh(
        &w,
        &format!(
            "echo vmctl-data-marker | dd of=/dev/{dev} bs=512 count=1 conv=notrunc,fsync 2>/dev/null"
        ),
    );
    w.ok(&["stop", "dk", "--timeout", "120"]);
    w.ok(&["start", "dk", "--timeout", BOOT]);
    let dev = sh(&w, FIND).trim().to_owned();
    let back = sh(
        &w,
        &format!("dd if=/dev/{dev} bs=512 count=1 2>/dev/null | head -c 17"),
    );
    assert_eq!(
        back.trim(),
        "vmctl-data-marker",
        "the data disk kept its data"
    );

    // The root disk grows live: the guest sees it, QEMU is the same.
    let pid = w.qemu_pids();
    std::fs::write(p.join("VMFile.kdl"), vmfile(&img, 2, data)).unwrap();
    w.ok(&["apply"]);
    wait_until("root disk 2 GiB", Duration::from_secs(60), || {
        root_bytes(&w) == Some(2 << 30)
    });
    assert_eq!(
        sh(&w, "cat /sys/block/vda/size").trim(),
        ((2u64 << 30) / 512).to_string(),
        "the guest sees the new size without a restart"
    );
    assert_eq!(w.qemu_pids(), pid, "not restarted");
    let events = w.ok(&["events"]);
    assert!(events.contains("DiskResized"), "{events}");

    // A shrink: refused visibly (`apply --wait` fails, naming the VM and
    // the disk), the VM runs on, stops and starts again.
    std::fs::write(p.join("VMFile.kdl"), vmfile(&img, 1, data)).unwrap();
    let out = w.vmctl(&["apply", "--wait", "--timeout", "120"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("vmctl::apply::refused")
            && err.contains("vm/dk refused the change"),
        "{err}"
    );
    wait_until("DiskShrinkRefused", Duration::from_secs(60), || {
        let vm = w.json(&["get", "vm", "dk", "-o", "json"]);
        cond(&vm, "DiskShrinkRefused").is_some_and(|c| c["status"] == "True")
    });
    let events = w.ok(&["events"]);
    assert!(
        events.lines().any(|l| l.contains("Warning")
            && l.contains("DiskShrinkRefused")
            && l.contains("cannot shrink")),
        "{events}"
    );
    assert_eq!(w.qemu_pids(), pid, "the VM runs on");
    w.ok(&["stop", "dk", "--timeout", "120"]);
    w.ok(&["start", "dk", "--timeout", BOOT]);
    assert_eq!(
        sh(&w, "cat /sys/block/vda/size").trim(),
        ((2u64 << 30) / 512).to_string()
    );
    assert_eq!(root_bytes(&w), Some(2 << 30));

    let work = w.data().join("vms/dk");
    assert!(work.join("disk-data.qcow2").exists());
    w.ok(&["delete", "-f", "VMFile.kdl", "--wait"]);
    assert!(!work.exists(), "the data disk goes with the VM");
}

/// The block device with serial `serial`, empty when the guest has none.
fn find(serial: &str) -> String {
    format!(
        "for b in /sys/block/vd*; do [ \"$(cat $b/serial 2>/dev/null)\" = {serial} ] && echo ${{b##*/}}; done; true"
    )
}

/// The extra disks the VM's status shows attached, by name.
fn attached(w: &World) -> Vec<String> {
    let vm = w.json(&["get", "vm", "dk", "-o", "json"]);
    let mut names: Vec<String> = vm["status"]["runtime"]["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["name"].as_str())
        .filter(|n| *n != "root")
        .map(str::to_owned)
        .collect();
    names.sort();
    names
}

#[test]
fn a_data_disk_added_to_a_running_vm_is_hot_plugged_and_removed_live() {
    let w = World::new();
    let p = w.project();
    let img = tiny_image().display().to_string();
    let data = "    disk \"data\" size=\"1G\"\n";
    let both = "    disk \"data\" size=\"1G\"\n    disk \"logs\" size=\"2G\"\n";
    std::fs::write(p.join("VMFile.kdl"), vmfile(&img, 1, data)).unwrap();
    w.ok(&["apply", "--wait", "--timeout", BOOT]);
    assert!(sh(&w, &find("data")).trim().starts_with("vd"));
    assert_eq!(sh(&w, &find("logs")).trim(), "");
    let pid = w.qemu_pids();

    // Added: attached live, the guest sees it by its serial and size.
    std::fs::write(p.join("VMFile.kdl"), vmfile(&img, 1, both)).unwrap();
    w.ok(&["apply"]);
    wait_until("disk logs attached", Duration::from_secs(60), || {
        attached(&w) == ["data", "logs"]
    });
    let mut dev = String::new();
    wait_until("the guest sees disk logs", Duration::from_secs(60), || {
        dev = sh(&w, &find("logs")).trim().to_owned();
        !dev.is_empty()
    });
    assert_eq!(
        sh(&w, &format!("cat /sys/block/{dev}/size")).trim(),
        ((2u64 << 30) / 512).to_string()
    );
    sh(
        &w,
        &format!(
            "echo vmctl-logs-marker | dd of=/dev/{dev} bs=512 count=1 conv=notrunc,fsync 2>/dev/null"
        ),
    );
    assert_eq!(w.qemu_pids(), pid, "not restarted");
    let vm = w.json(&["get", "vm", "dk", "-o", "json"]);
    assert!(
        cond(&vm, "RestartRequired").is_none_or(|c| c["status"] == "False"),
        "{vm}"
    );
    let events = w.ok(&["events"]);
    assert!(
        events
            .lines()
            .any(|l| l.contains("DiskAttached") && l.contains("disk logs")),
        "{events}"
    );

    // Removed again: detached live, gone from the guest; its file stays.
    std::fs::write(p.join("VMFile.kdl"), vmfile(&img, 1, data)).unwrap();
    w.ok(&["apply"]);
    wait_until("disk logs detached", Duration::from_secs(90), || {
        attached(&w) == ["data"]
    });
    wait_until(
        "the guest no longer sees disk logs",
        Duration::from_secs(60),
        || sh(&w, &find("logs")).trim().is_empty(),
    );
    assert!(
        sh(&w, &find("data")).trim().starts_with("vd"),
        "disk data stays"
    );
    assert_eq!(w.qemu_pids(), pid, "not restarted");
    let events = w.ok(&["events"]);
    assert!(
        events
            .lines()
            .any(|l| l.contains("DiskDetached") && l.contains("disk logs")),
        "{events}"
    );
    let work = w.data().join("vms/dk");
    assert!(
        work.join("disk-logs.qcow2").exists(),
        "kept until the VM is deleted"
    );

    // A disk attached at start is removed live too, and added back with
    // the data it had.
    std::fs::write(p.join("VMFile.kdl"), vmfile(&img, 1, "")).unwrap();
    w.ok(&["apply"]);
    wait_until("disk data detached", Duration::from_secs(90), || {
        attached(&w).is_empty()
    });
    assert_eq!(sh(&w, &find("data")).trim(), "");
    std::fs::write(p.join("VMFile.kdl"), vmfile(&img, 1, both)).unwrap();
    w.ok(&["apply"]);
    wait_until("both attached", Duration::from_secs(90), || {
        attached(&w) == ["data", "logs"]
    });
    let mut dev = String::new();
    wait_until(
        "the guest sees disk logs again",
        Duration::from_secs(60),
        || {
            dev = sh(&w, &find("logs")).trim().to_owned();
            !dev.is_empty()
        },
    );
    assert_eq!(
        sh(
            &w,
            &format!("dd if=/dev/{dev} bs=512 count=1 2>/dev/null | head -c 17")
        )
        .trim(),
        "vmctl-logs-marker",
        "the disk kept its data"
    );
    assert_eq!(w.qemu_pids(), pid, "never restarted");

    w.ok(&["delete", "-f", "VMFile.kdl", "--wait"]);
    assert!(!work.exists(), "the disks go with the VM");
}
