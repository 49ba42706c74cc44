//! The cloud image (`tests/images/build.sh cloud`): real cloud-init.
//!
//! Debian bookworm with systemd, cloud-init, OpenSSH and sudo boots from a
//! seed vmctl generated. Two worlds run side by side (the seed tool is
//! agent-wide): one with the default tool (an installed genisoimage, mkisofs
//! or xorriso), one with the pure-Rust ISO writer. In each, cloud-init must
//! have run from vmctl's seed (its instance id), created the VMFile's user
//! (not the image's default) with vmctl's passwordless sudo rule, set the
//! hostname, installed the pinned host key and nothing else, and a shell
//! provisioner must get root through `sudo -n`. The first provisioning step
//! waits for cloud-init to finish (as one does with real cloud images): its
//! config stage restarts sshd, and a step that cannot connect at that
//! moment waits for SSH and runs then (it once failed the provision).

use super::*;

/// The cloud guest image, built once (cached outside the repo).
fn cloud_image() -> &'static PathBuf {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let out = Command::new(repo().join("tests/images/build.sh"))
            .arg("cloud")
            .stderr(Stdio::inherit())
            .output()
            .expect("tests/images/build.sh runs");
        assert!(out.status.success(), "building the cloud guest failed");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// The cloud image boots to SSH in 70–150 s under TCG on a loaded 2-core
/// machine; two of them boot at once here.
const CLOUD_BOOT: &str = "600";

struct Case {
    vm: &'static str,
    user: &'static str,
    hostname: &'static str,
    /// `VMCTL_SEED_TOOL=builtin` for this world's agent.
    builtin: bool,
}

/// The ISO 9660 application identifier of the seed (which tool wrote it).
fn seed_application_id(seed: &Path) -> String {
    let iso = std::fs::read(seed).unwrap();
    // Primary volume descriptor at sector 16; application id at offset 574, 128 bytes.
    let pvd = &iso[16 * 2048..17 * 2048];
    assert_eq!(&pvd[..6], b"\x01CD001", "a primary volume descriptor");
    String::from_utf8_lossy(&pvd[574..574 + 128])
        .trim()
        .to_owned()
}

fn any_external_seed_tool() -> bool {
    ["genisoimage", "mkisofs", "xorriso"].iter().any(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// `vmctl exec VM -- ARGS`, retried while the SSH connection itself cannot
/// be made (never once the command ran). cloud-init's config stage
/// restarts sshd (`ssh_pwauth` → `systemctl restart ssh`) 10–20 s after
/// sshd first answers, and `vmctl exec` (like a provisioning step)
/// connects only once, so a command that lands in that window fails with
/// "SSH handshake ... failed". The VMFile's first step waits for
/// cloud-init, so this only guards against it.
fn exec_retrying(w: &World, vm: &str, args: &[&str]) -> Output {
    let mut all = vec!["exec", vm, "--"];
    all.extend_from_slice(args);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = w.vmctl(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        let transport = !out.status.success()
            && (err.contains("SSH handshake with") || err.contains("Cannot connect to"));
        if !transport || Instant::now() > deadline {
            return out;
        }
        eprintln!("[{vm}] exec {args:?}: no SSH connection (sshd restarting?), retrying");
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Brings up one cloud VM in its own world and checks what cloud-init did.
fn cloud_vm(c: &Case) {
    let mut w = World::new();
    if c.builtin {
        // Before the first command: the agent it auto-starts inherits it.
        w.env.push(("VMCTL_SEED_TOOL", "builtin"));
    }
    let p = w.project();
    let vmfile = format!(
        r#"vm "{vm}" {{
    image "{img}"
    memory 1024
    cloud-init {{
        hostname "{host}"
    }}
    ssh {{
        user "{user}"
        timeout {CLOUD_BOOT}
    }}
    provision "shell" {{
        inline "cloud-init status --wait"
    }}
    provision "shell" {{
        inline "sudo -n true && sudo -n id -u > /tmp/sudo-uid"
    }}
    provision "shell" {{
        inline "echo \"root wrote this for $(id -un)\" | sudo -n tee /root/by-root > /dev/null"
    }}
}}
"#,
        vm = c.vm,
        img = cloud_image().display(),
        host = c.hostname,
        user = c.user,
    );
    std::fs::write(p.join("VMFile.kdl"), &vmfile).unwrap();

    let t0 = Instant::now();
    let out = w.vmctl(&["apply", "--wait", "--timeout", CLOUD_BOOT]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        let console = w.vmctl(&["log", c.vm, "--console", "--tail", "60"]);
        panic!(
            "{}: apply --wait failed after {:.0}s:\n{err}\n--- console (tail) ---\n{}\n--- events ---\n{}",
            c.vm,
            t0.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&console.stdout),
            String::from_utf8_lossy(&w.vmctl(&["events"]).stdout),
        );
    }
    eprintln!(
        "[{}] apply --wait (boot, cloud-init, 3 provision steps) took {:.1}s",
        c.vm,
        t0.elapsed().as_secs_f64()
    );
    assert!(err.contains("all 3 objects are Ready"), "{}: {err}", c.vm);

    // The seed: written by the tool this world asked for.
    let vm = &w.json(&["get", "vm", c.vm, "-o", "json"]);
    assert_eq!(vm["status"]["phase"], "Running", "{vm}");
    let rt = &vm["status"]["runtime"];
    assert_eq!(rt["backend"], "qemu", "{vm}");
    let seed = PathBuf::from(rt["seedIso"].as_str().expect("seedIso in status"));
    let app = seed_application_id(&seed);
    if c.builtin {
        assert!(app.starts_with("VMCTL"), "pure-Rust seed, got {app:?}");
    } else if any_external_seed_tool() {
        assert!(
            !app.starts_with("VMCTL"),
            "an installed ISO tool wrote the seed, got {app:?}"
        );
    }
    let instance_id = rt["instanceId"].as_str().expect("instanceId in status");
    assert!(!instance_id.is_empty(), "{vm}");
    let work = PathBuf::from(rt["workDir"].as_str().unwrap());

    let exec = |args: &[&str]| {
        let out = exec_retrying(&w, c.vm, args);
        assert!(
            out.status.success(),
            "{}: vmctl exec {args:?} failed ({:?}):\n{}\n{}",
            c.vm,
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };

    // cloud-init's instance is the one of vmctl's seed (written in its
    // first stage, before sshd starts).
    assert_eq!(
        exec(&["cat", "/var/lib/cloud/data/instance-id"]).trim(),
        instance_id,
        "cloud-init's instance is vmctl's seed"
    );

    // The VMFile's user, made by cloud-init (not the image: it has no such user).
    assert_eq!(exec(&["id", "-un"]).trim(), c.user);
    let pw = exec(&["getent", "passwd", c.user]);
    let fields: Vec<&str> = pw.trim_end().split(':').collect();
    assert_eq!(fields.len(), 7, "{pw}");
    assert_ne!(fields[2], "0", "an ordinary user: {pw}");
    assert_eq!(fields[5], format!("/home/{}", c.user), "{pw}");
    assert_eq!(
        fields[6], "/bin/bash",
        "the generated user-data's shell: {pw}"
    );
    let passwd_status = exec(&["sudo", "-n", "passwd", "-S", c.user]);
    assert_eq!(
        passwd_status.split_whitespace().nth(1),
        Some("L"),
        "password locked: {passwd_status}"
    );
    let sudoers = exec(&["sudo", "-n", "cat", "/etc/sudoers.d/90-cloud-init-users"]);
    assert!(
        sudoers
            .lines()
            .any(|l| l.trim() == format!("{} ALL=(ALL) NOPASSWD:ALL", c.user)),
        "{sudoers}"
    );

    // The hostname from `cloud-init { hostname }`, not the VM's name.
    assert_eq!(exec(&["hostname"]).trim(), c.hostname);

    // The pinned host key is the guest's, and cloud-init generated no other.
    let pinned = std::fs::read_to_string(work.join("host_ed25519.pub")).unwrap();
    // (cloud-init writes the seed's public host key with mode 0600)
    let guest = exec(&["sudo", "-n", "cat", "/etc/ssh/ssh_host_ed25519_key.pub"]);
    assert_eq!(
        guest.split_whitespace().nth(1),
        pinned.split_whitespace().nth(1),
        "guest host key = vmctl's"
    );
    let keys = exec(&["sh", "-c", "ls /etc/ssh/ssh_host_*_key"]);
    assert_eq!(keys.trim(), "/etc/ssh/ssh_host_ed25519_key", "{keys}");

    // Passwordless sudo in the provisioners.
    let prov = &w.json(&["get", "provision", c.vm, "-o", "json"]);
    assert_eq!(prov["status"]["phase"], "Succeeded", "{prov}");
    assert_eq!(prov["status"]["vmInstanceId"], instance_id, "{prov}");
    let steps = prov["status"]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3, "{prov}");
    assert!(
        steps
            .iter()
            .all(|s| s["phase"] == "Succeeded" && s["exitCode"] == 0),
        "{prov}"
    );
    assert_eq!(exec(&["cat", "/tmp/sudo-uid"]).trim(), "0");
    assert_eq!(
        exec(&["stat", "-c", "%U", "/tmp/sudo-uid"]).trim(),
        c.user,
        "the step ran as the VMFile's user"
    );
    assert_eq!(
        exec(&["sudo", "-n", "cat", "/root/by-root"]).trim(),
        format!("root wrote this for {}", c.user)
    );
    assert_eq!(
        exec_retrying(&w, c.vm, &["cat", "/root/by-root"])
            .status
            .code(),
        Some(1),
        "without sudo the user cannot read root's files"
    );

    // cloud-init finished (the first step waited for it) without errors.
    let log = std::fs::read_to_string(work.join("provision.log")).unwrap();
    assert!(log.contains("status: done"), "{log}");
    assert_eq!(exec(&["cloud-init", "status"]).trim(), "status: done");
    let result: serde_json::Value =
        serde_json::from_str(&exec(&["cat", "/run/cloud-init/result.json"])).unwrap();
    assert_eq!(
        result["v1"]["datasource"]
            .as_str()
            .unwrap_or_default()
            .split_whitespace()
            .next(),
        Some("DataSourceNoCloud"),
        "{result}"
    );
    assert_eq!(result["v1"]["errors"], serde_json::json!([]), "{result}");
    eprintln!(
        "[{}] all checks done at {:.1}s",
        c.vm,
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn cloud_image_cloud_init_user_hostname_and_sudo_with_both_seed_writers() {
    cloud_image(); // once, before the threads
    let cases = [
        Case {
            vm: "cloudgen",
            user: "alice",
            hostname: "alice-box",
            builtin: false,
        },
        Case {
            vm: "cloudrs",
            user: "bob",
            hostname: "bob-box",
            builtin: true,
        },
    ];
    let t0 = Instant::now();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|c| {
                std::thread::Builder::new()
                    .name(c.vm.to_owned())
                    .spawn_scoped(s, || cloud_vm(c))
                    .unwrap()
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    eprintln!(
        "cloud scenario: 2 worlds in parallel took {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    for r in results {
        if let Err(panic) = r {
            std::panic::resume_unwind(panic);
        }
    }
}
