//! Disks (issue 16) as the commands show them, against the fake driver:
//! what `apply --wait` says of a change the VM cannot take, what `get -o
//! wide` and the notes say of each disk.

use super::*;

/// A VM with a root disk of `root` GiB and `data`'s lines.
fn disk_vm(root: u32, data: &str) -> String {
    format!(
        r#"vm "web" {{
    image-url "https://example.com/debian.qcow2"
    vcpus 1
    memory 512
    disk {root}
{data}}}
"#
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Issue 16 fault 4: `disk 2` re-applied as `disk 1` (refused: disks
/// never shrink) made `apply --wait` exit 0 with "all Ready", and the
/// Warning note named the root disk alone when a data disk's shrink was
/// refused too.
#[test]
fn apply_wait_fails_when_a_disk_shrink_is_refused_and_names_every_disk() {
    let w = World::new();
    w.write(
        "VMFile.kdl",
        &disk_vm(10, "    disk \"data\" size=\"2G\"\n"),
    );
    w.ok(&["apply", "--wait"]);
    w.write("VMFile.kdl", &disk_vm(9, "    disk \"data\" size=\"1G\"\n"));
    let out = w.run(&["apply", "--wait", "--timeout", "30"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("vmctl::apply::refused"), "{err}");
    assert!(
        !err.contains("are Ready") && !err.contains("is Ready"),
        "{err}"
    );
    let flat = err.split_whitespace().collect::<Vec<_>>().join(" ");
    for what in [
        "vm/web refused the change: DiskShrinkRefused: disks cannot shrink",
        "root: 10 GiB → 9 GiB, data: 2 GiB → 1 GiB",
    ] {
        assert!(flat.contains(what), "{what} not in:\n{err}");
    }
    let events = w.ok(&["events"]);
    assert!(
        events.lines().any(|l| l.contains("Warning")
            && l.contains("DiskShrinkRefused")
            && l.contains("root at 10 GiB")
            && l.contains("data at 2 GiB")),
        "{events}"
    );
    // `up` waits the same way.
    let up = w.run(&["up", "--timeout", "30"]);
    assert!(!up.status.success(), "{}", stderr(&up));
    assert!(
        stderr(&up).contains("vmctl::apply::refused"),
        "{}",
        stderr(&up)
    );
    // The VM runs on with its disks; asking their sizes again is fine.
    w.write(
        "VMFile.kdl",
        &disk_vm(10, "    disk \"data\" size=\"2G\"\n"),
    );
    w.ok(&["apply", "--wait", "--timeout", "30"]);
}

/// Issue 16 fault (a): a data disk removed from a running VM whose guest
/// did not release it (hot-unplug failed: `RestartRequired`, reason
/// `HotPlugFailed`) was not mentioned by `apply --wait`.
#[test]
fn apply_wait_warns_when_a_disk_detach_failed_and_the_vm_needs_a_restart() {
    let w = World::with_env(&[("VMCTL_FAKE_FAIL_HOTPLUGS", "web")]);
    w.write(
        "VMFile.kdl",
        &disk_vm(10, "    disk \"data\" size=\"1G\"\n"),
    );
    w.ok(&["apply", "--wait"]);
    w.write("VMFile.kdl", &disk_vm(10, ""));
    let out = w.run(&["apply", "--wait", "--timeout", "30"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.lines().any(
            |l| l.starts_with("warning: vm/web: RestartRequired (HotPlugFailed:")
                && l.contains("disk data could not be detached live")
        ),
        "{err}"
    );
    assert!(
        err.contains("1 object is Ready") || err.contains("objects are Ready"),
        "{err}"
    );
}

/// Issue 16 fault (c): `vmctl get vm -o wide` showed no disks.
#[test]
fn get_vm_wide_shows_every_disk_with_its_size() {
    let w = World::new();
    w.write(
        "VMFile.kdl",
        &disk_vm(10, "    disk \"data\" size=\"1G\"\n"),
    );
    w.ok(&["apply", "--wait"]);
    let wide = w.ok(&["get", "vm", "-o", "wide"]);
    let mut lines = wide.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let at = header
        .iter()
        .position(|h| *h == "DISKS")
        .expect("a DISKS column");
    assert_eq!(row[at], "root:10GiB,data:1GiB", "{wide}");
}
