//! Reaching the guest: SSH readiness in status, and the commands that
//! connect waiting for it.

use super::*;

/// The fault: `vmctl up` returned Ready while the tiny guest still booted,
/// and `vmctl ssh` right after hung silently in a stalled connect (QEMU's
/// user networking accepts the connection before sshd listens). Now `up`
/// returns once the agent's probe saw sshd with the pinned host key, and
/// the first `ssh` succeeds at once.
#[test]
fn ssh_right_after_up_does_not_hang_in_a_stalled_connect() {
    let w = World::new();
    let img = tiny_image().display().to_string();
    std::fs::write(
        w.project().join("VMFile.kdl"),
        format!("vm \"quick\" {{\n    image \"{img}\"\n    memory 512\n}}\n"),
    )
    .unwrap();
    w.ok(&["up", "--timeout", BOOT]);
    let up_done = chrono::Utc::now();
    let v = w.json(&["get", "vm", "quick", "-o", "json"]);
    let conds = v["status"]["conditions"].as_array().unwrap().clone();
    let cond = |t: &str| conds.iter().find(|c| c["type"] == t).cloned().unwrap();
    assert_eq!(cond("SshReady")["status"], "True", "{conds:?}");
    assert_eq!(cond("Ready")["status"], "True", "{conds:?}");
    let since: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(cond("SshReady")["lastTransitionTime"].clone()).unwrap();
    assert!(
        since <= up_done,
        "SSH answered ({since}) before up returned ({up_done})"
    );

    // The first try works, without waiting and without a stalled connect.
    let t0 = Instant::now();
    let out = w.vmctl(&["ssh", "quick", "--", "echo", "reached"]);
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "reached");
    assert!(!err.contains("waiting for"), "nothing to wait for: {err}");
    assert!(took < Duration::from_secs(10), "ssh took {took:?}");
}
