//! `vmctl snapshot` (issue 16 item 3) against the fake driver: what
//! create, list, get, describe, restore and delete print, and every
//! refusal (a VM that does not exist or is being deleted, a snapshot that
//! does not exist, a disk-only snapshot restored to a running VM), each
//! changing nothing.

use super::*;

#[test]
fn snapshot_create_list_restore_delete_and_their_refusals() {
    let w = World::new();
    w.write("VMFile.kdl", ONE_VM);
    w.ok(&["apply", "--wait"]);

    let create = w.session(&[
        &["snapshot", "create", "web", "before", "--wait"],
        &["snapshot", "create", "web", "before"],
        &["snapshot", "create", "nope", "first"],
        &["snapshot", "create", "web", "Bad_Name"],
    ]);
    assert!(
        !w.ok(&["get", "snapshots", "-o", "name"]).contains("first"),
        "a refused create writes nothing"
    );
    // Without a name: VM-YYYYMMDD-HHMMSS.
    let made: serde_json::Value =
        serde_json::from_str(&w.ok(&["snapshot", "create", "web", "--wait", "-o", "json"]))
            .unwrap();
    let generated = made["metadata"]["name"].as_str().unwrap().to_owned();
    let stamp = generated.strip_prefix("web-").unwrap();
    assert!(
        stamp.len() == 15 && stamp.chars().filter(|c| *c == '-').count() == 1,
        "{generated}"
    );
    assert_eq!(made["status"]["phase"], "Ready", "{made}");
    w.ok(&["snapshot", "delete", &generated, "--wait"]);

    let shown = w.session(&[
        &["snapshot", "list"],
        &["snapshot", "list", "web", "-o", "wide"],
        &["snapshot", "list", "other"],
        &["get", "snapshots"],
        &["describe", "snapshot", "before"],
    ]);
    let yaml = w.transcript_sorted(&["get", "snapshot", "before", "-o", "yaml"]);

    // A stopped VM's snapshot has no memory: restoring it to the running
    // VM is refused, and the spec keeps no restore request.
    w.ok(&["stop", "web"]);
    w.ok(&["snapshot", "create", "web", "off", "--wait"]);
    w.ok(&["start", "web"]);
    let restore = w.session(&[
        &["snapshot", "restore", "before", "--wait"],
        &["snapshot", "restore", "off"],
        &["snapshot", "restore", "nope"],
    ]);
    let off: serde_json::Value =
        serde_json::from_str(&w.ok(&["get", "snapshot", "off", "-o", "json"])).unwrap();
    assert_eq!(off["spec"].get("restoreToken"), None, "{off}");
    w.ok(&["stop", "web"]);
    w.ok(&["snapshot", "restore", "off", "--wait"]);
    let history = w.ok(&["history", "vm", "web"]);
    for what in [
        "SnapshotCreated: Saved snapshot before of VM web: disks (root) and memory",
        "SnapshotRestored: Restored VM web to snapshot before (its disks and memory)",
        "SnapshotCreated: Saved snapshot off of VM web: disks (root) only",
        "SnapshotRestored: Restored VM web to snapshot off (its disks (the VM is stopped))",
    ] {
        assert!(history.contains(what), "{what} not in:\n{history}");
    }

    // A VM being deleted (held by a user's finalizer): no new snapshot.
    w.ok(&["patch", "vm", "web", "--add-finalizer", "example.com/hold"]);
    w.ok(&["delete", "vm", "web"]);
    let deleting = w.session(&[&["snapshot", "create", "web", "late"]]);
    // Its snapshots go first (the VM still waits for the finalizer), then
    // the VM once the finalizer is removed.
    let until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    until("the VM's snapshots deleted", &|| {
        w.ok(&["get", "snapshots", "-o", "name"]).is_empty()
    });
    assert!(
        w.run(&["get", "vm", "web"]).status.success(),
        "the VM waits"
    );
    w.ok(&[
        "patch",
        "vm",
        "web",
        "--remove-finalizer",
        "example.com/hold",
    ]);
    until("the VM deleted", &|| {
        !w.run(&["get", "vm", "web"]).status.success()
    });
    let gone = w.session(&[&["get", "snapshots"], &["snapshot", "delete", "before"]]);
    let mut s = settings();
    // Beside the other commands' snapshots.
    s.set_snapshot_path("../snapshots");
    s.bind(|| {
        insta::assert_snapshot!("cmd_snapshot_create", create);
        insta::assert_snapshot!("cmd_snapshot_shown", shown);
        insta::assert_snapshot!("cmd_snapshot_yaml", yaml);
        insta::assert_snapshot!("cmd_snapshot_restore", restore);
        insta::assert_snapshot!("cmd_snapshot_deleting", deleting);
        insta::assert_snapshot!("cmd_snapshot_gone", gone);
    });
}

/// Issue 16 fault 3: two `vmctl snapshot create web` in the same second
/// (generated names are `VM-YYYYMMDD-HHMMSS`) both said "created", but
/// one Snapshot existed: the second apply had landed on the first. A
/// create is create-only now, and a generated name taken meanwhile is
/// retried as `…-2`, `…-3`.
#[test]
fn concurrent_snapshot_creates_with_generated_names_never_collide() {
    const N: usize = 4;
    let w = World::new();
    w.write("VMFile.kdl", ONE_VM);
    w.ok(&["apply", "--wait"]);
    let outs: Vec<Output> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..N)
            .map(|_| s.spawn(|| w.run(&["snapshot", "create", "web", "-o", "json"])))
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let mut said = std::collections::BTreeSet::new();
    for out in &outs {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        said.insert(made["metadata"]["name"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        said.len(),
        N,
        "each create names its own snapshot: {said:?}"
    );
    let listed = w.ok(&["get", "snapshots", "-o", "name"]);
    let exist: std::collections::BTreeSet<String> = listed
        .lines()
        .map(|l| l.trim_start_matches("snapshot/").to_owned())
        .collect();
    assert_eq!(exist, said, "every create made a Snapshot of its own");
    for n in &said {
        assert!(n.starts_with("web-") && n.len() <= 63, "{n}");
    }
}

/// Issue 16 fault (d): `vmctl snapshot list nosuch` exited 0 ("No
/// snapshots of VM nosuch."), as if the VM existed.
#[test]
fn snapshot_list_of_a_vm_that_does_not_exist_is_not_found() {
    let w = World::new();
    w.write("VMFile.kdl", ONE_VM);
    w.ok(&["apply", "--wait"]);
    let list = w.run(&["snapshot", "list", "nosuch"]);
    let get = w.run(&["get", "vm", "nosuch"]);
    assert!(!list.status.success());
    assert_eq!(
        list.status.code(),
        get.status.code(),
        "as other NotFound errors"
    );
    let err = String::from_utf8_lossy(&list.stderr);
    assert!(
        err.contains("vmctl::vm::not_found") && err.contains("VM nosuch not found"),
        "{err}"
    );
    // A VM that exists and has none: an empty listing, exit 0.
    let none = w.run(&["snapshot", "list", "web"]);
    assert!(none.status.success());
    assert_eq!(
        String::from_utf8_lossy(&none.stderr),
        "No snapshots of VM web.\n"
    );
}
