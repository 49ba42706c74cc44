//! The agent on etcd with real QEMU (issue 12 item 8): apply → SSH →
//! provision → delete, the agent started by `vmctl` itself and put on a
//! real 3-member etcd cluster by its config file.

use super::*;

impl World {
    /// A world whose agent keeps its objects in etcd: `<data>/agent.toml`
    /// names the test binary's shared 3-member cluster and a key prefix of
    /// its own. The agent `vmctl` starts reads it.
    fn on_etcd() -> World {
        let w = World::new();
        let cluster = vmctl_store::testing::EtcdCluster::shared();
        std::fs::create_dir_all(w.data()).unwrap();
        std::fs::write(
            w.data().join("agent.toml"),
            format!(
                "store = \"etcd\"\n[etcd]\nendpoints = {:?}\nprefix = \"{}\"\n",
                cluster.endpoints(),
                vmctl_store::testing::unique_prefix()
            ),
        )
        .unwrap();
        w
    }

    /// The agent's `/v1/healthz`.
    fn health(&self) -> serde_json::Value {
        let out = Command::new("curl")
            .args(["-s", "--unix-socket"])
            .arg(self.data().join("agent.sock"))
            .arg("http://x/v1/healthz")
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }
}

#[test]
fn apply_ssh_provision_delete_with_the_agent_on_etcd() {
    let w = World::on_etcd();
    let p = w.project();
    let img = tiny_image().display().to_string();
    std::fs::write(
        p.join("VMFile.kdl"),
        format!(
            r#"vm "ed" {{
    image "{img}"
    memory 512
    cloud-init {{
        hostname "ed"
    }}
    ssh {{
        user "vm"
    }}
    provision "shell" {{
        inline "echo provisioned-on-$(hostname) >> /tmp/marker"
    }}
}}
"#
        ),
    )
    .unwrap();

    let out = w.vmctl(&["apply", "--wait", "--timeout", BOOT]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "apply --wait failed:\n{err}");
    let health = w.health();
    assert!(
        health["store"]
            .as_str()
            .unwrap_or("")
            .starts_with("etcd at "),
        "the agent runs on etcd: {health}"
    );
    assert!(!w.data().join("db").exists(), "nothing went to sled");

    // SSH, and the provisioner ran once.
    assert_eq!(w.ok(&["ssh", "ed", "--", "hostname"]).trim(), "ed");
    assert_eq!(
        w.ok(&["exec", "ed", "--", "cat", "/tmp/marker"]),
        "provisioned-on-ed\n"
    );
    let prov = w.json(&["get", "provision", "ed", "-o", "json"]);
    assert_eq!(prov["status"]["phase"], "Succeeded", "{prov}");

    // `vmctl provision` re-runs it: a spec write and a status write through etcd.
    w.ok(&["provision", "--name", "ed"]);
    assert_eq!(
        w.ok(&["exec", "ed", "--", "cat", "/tmp/marker"]),
        "provisioned-on-ed\nprovisioned-on-ed\n"
    );
    assert!(
        w.ok(&["history", "provision", "ed"])
            .contains("vmctl provision")
    );

    // Delete: the finalizers run (QEMU stopped, work dir removed) and the
    // objects leave etcd.
    let work = PathBuf::from(
        w.json(&["get", "vm", "ed", "-o", "json"])["status"]["runtime"]["workDir"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(w.qemu_pids().len(), 1);
    w.ok(&["delete", "-f", "VMFile.kdl", "--wait"]);
    assert!(w.qemu_pids().is_empty(), "delete stops QEMU");
    assert!(!work.exists(), "delete removes the work directory");
    let all = w.json(&["get", "-o", "json"]);
    assert_eq!(all["items"], serde_json::json!([]), "{all}");
}
