//! Optimistic concurrency and finalizers from the command line: a stale
//! resourceVersion in a file is a clear conflict, and `vmctl patch` removes
//! a finalizer that would keep an object Terminating forever.

use std::time::{Duration, Instant};

use crate::agent::Agent;

fn held_image(rv: Option<u64>, url: &str) -> String {
    let rv = rv.map_or(String::new(), |rv| format!("  resourceVersion: {rv}\n"));
    format!(
        "apiVersion: vmctl/v1alpha1\nkind: Image\nmetadata:\n  name: held\n{rv}  finalizers:\n  - example.com/hold\nspec:\n  source:\n    url: {url}\n"
    )
}

#[test]
fn a_user_finalizer_that_keeps_an_object_terminating_is_removed_with_vmctl_patch() {
    let a = Agent::start();
    let out = a.vmctl(
        &["apply", "-f", "-"],
        Some(&held_image(None, "https://example.com/a.img")),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let del = a.vmctl(&["delete", "image", "held"], None);
    assert!(
        del.status.success(),
        "{}",
        String::from_utf8_lossy(&del.stderr)
    );
    // The controller's own finalizer is refused without --force.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let get = a.vmctl(&["get", "image", "held", "-o", "json"], None);
        let v: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
        let f = v["metadata"]["finalizers"].to_string();
        if !f.contains("vmctl.dev/") {
            // The image controller cleaned up and dropped its own.
            assert!(f.contains("example.com/hold"), "{v}");
            break;
        }
        let refused = a.vmctl(
            &[
                "patch",
                "image",
                "held",
                "--remove-finalizer",
                "vmctl.dev/image-cache",
            ],
            None,
        );
        let err = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(1), "{err}");
        assert!(
            err.contains("vmctl::api::protected_finalizer") && err.contains("--force"),
            "{err}"
        );
        assert!(Instant::now() < deadline, "still {f}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let patch = a.vmctl(
        &[
            "patch",
            "image",
            "held",
            "--remove-finalizer",
            "example.com/hold",
        ],
        None,
    );
    assert!(
        patch.status.success(),
        "{}",
        String::from_utf8_lossy(&patch.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&patch.stdout),
        "image/held deleted (its last finalizer was removed while it was being deleted)\n"
    );
    let gone = a.vmctl(&["get", "image", "held"], None);
    assert_eq!(gone.status.code(), Some(1));
    let help = crate::vmctl(&["patch", "--help"], None);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--remove-finalizer") && help.contains("--force"),
        "{help}"
    );
}

#[test]
fn an_apply_with_a_stale_resource_version_is_a_clear_conflict() {
    let a = Agent::start();
    let out = a.vmctl(
        &["apply", "-f", "-", "-o", "json"],
        Some(&held_image(None, "https://example.com/a.img")),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let read_rv = v["results"][0]["resourceVersion"].as_u64().unwrap();
    // Someone else changes it meanwhile.
    let other = a.vmctl(
        &["apply", "-f", "-"],
        Some(&held_image(None, "https://example.com/b.img")),
    );
    assert!(other.status.success());
    let stale = a.vmctl(
        &["apply", "-f", "-"],
        Some(&held_image(Some(read_rv), "https://example.com/c.img")),
    );
    let err = String::from_utf8_lossy(&stale.stderr);
    assert_eq!(stale.status.code(), Some(1), "{err}");
    assert!(
        err.contains("vmctl::api::conflict")
            && err.contains("was changed since it was read")
            && err.contains(&read_rv.to_string()),
        "{err}"
    );
    let get = a.vmctl(&["get", "image", "held", "-o", "json"], None);
    let v: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(v["spec"]["source"]["url"], "https://example.com/b.img");
}
