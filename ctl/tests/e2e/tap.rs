//! `network "tap"`: the VM's NIC is a tap really attached to a bridge, and
//! the agent finds the guest's address by its MAC (the bridge's neighbour
//! table, then dnsmasq's leases) and reaches it over the bridge.

use super::*;

/// The agent runs in a network namespace of its own (with a bridge holding
/// 10.77.0.1/24) and a private mount namespace whose /etc is an overlay
/// holding the bridge helper's ACL, so nothing on the host changes. No DHCP
/// serves the bridge at first: the search for the guest's address times out
/// with the manual's hints (`AddressReady` False, `IPDiscoveryTimeout`).
/// Then dnsmasq starts on the bridge (writing its leases where the agent's
/// `--dnsmasq-leases` points), the guest's DHCP client gets a lease, the
/// agent still looking finds the address, records it as `sshHost` (port
/// 22), provisions the guest over the bridge, and `exec` and `ssh` reach it.
#[test]
fn a_tap_vm_gets_its_address_from_dnsmasq_and_is_provisioned_over_it() {
    let w = World::new();
    let t = w.dir.path();
    for d in ["upper", "work"] {
        std::fs::create_dir_all(t.join(d)).unwrap();
    }
    std::fs::create_dir_all(w.data()).unwrap();
    let leases = t.join("dnsmasq.leases");
    let script = format!(
        "set -e
mount -t overlay overlay -o lowerdir=/etc,upperdir={t}/upper,workdir={t}/work /etc
mkdir -p /etc/qemu && echo 'allow br-vmctl' > /etc/qemu/bridge.conf
ip link set lo up
ip link add br-vmctl type bridge
ip link set br-vmctl up
ip addr add 10.77.0.1/24 dev br-vmctl
exec {bin} agent --data-dir {data} --dnsmasq-leases {leases}",
        t = t.display(),
        bin = crate::vmctl_bin(),
        data = w.data().display(),
        leases = leases.display(),
    );
    let log = std::fs::File::create(t.join("agent.out")).unwrap();
    let mut agent = Command::new("unshare")
        .args(["--mount", "--net", "--propagation", "private", "sh", "-c"])
        .arg(&script)
        .env("VMCTL_ACCEL", "tcg")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("unshare runs");
    wait_until(
        "the agent in its namespace",
        Duration::from_secs(30),
        || w.agent_pid().is_some(),
    );
    let ns = agent.id().to_string();
    let netns = |args: &[&str]| -> String {
        let out = Command::new("nsenter")
            .args(["-t", &ns, "-n"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    std::fs::write(
        w.project().join("VMFile.kdl"),
        format!(
            r#"vm "tapvm" {{
    image "{img}"
    memory 256
    network "tap" {{
        bridge "br-vmctl"
    }}
    ssh {{
        timeout 8
    }}
    provision "shell" {{
        inline "echo provisioned-over-tap > /tmp/tap-proof"
    }}
}}
"#,
            img = tiny_image().display()
        ),
    )
    .unwrap();
    w.ok(&["apply"]);

    // No DHCP on the bridge: after the VM's SSH timeout (8 s) the search
    // has timed out, says so with the hints, and the VM is not Ready.
    let cond = |vm: &serde_json::Value, t: &str| {
        vm["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == t).cloned())
            .unwrap_or_default()
    };
    let mut vm = serde_json::Value::Null;
    wait_until(
        "AddressReady False with reason IPDiscoveryTimeout",
        Duration::from_secs(120),
        || {
            vm = w.json(&["get", "vm", "tapvm", "-o", "json"]);
            cond(&vm, "AddressReady")["reason"] == "IPDiscoveryTimeout"
        },
    );
    let mac = vm["status"]["runtime"]["mac"].as_str().unwrap().to_owned();
    let timeout = cond(&vm, "AddressReady");
    assert_eq!(timeout["status"], "False", "{vm}");
    let msg = timeout["message"].as_str().unwrap();
    for says in [
        "IP discovery timeout",
        mac.as_str(),
        "br-vmctl",
        "has DHCP",
        "ip neigh show dev br-vmctl",
        "DHCP lease",
        "vmctl log tapvm --console",
    ] {
        assert!(msg.contains(says), "the message says {says:?}: {msg}");
    }
    assert_eq!(cond(&vm, "Ready")["status"], "False", "{vm}");
    assert_eq!(cond(&vm, "Ready")["reason"], "IPDiscoveryTimeout", "{vm}");
    assert_eq!(cond(&vm, "SshReady")["status"], "False", "{vm}");
    assert!(vm["status"]["runtime"]["sshHost"].is_null(), "{vm}");
    assert!(
        vm["status"]["runtime"]["sshPort"].is_null(),
        "no host port forward on a tap network: {vm}"
    );
    let prov = w.json(&["get", "provision", "tapvm", "-o", "json"]);
    assert_eq!(
        prov["status"]["phase"], "Pending",
        "waits for an address: {prov}"
    );
    let links = netns(&["bridge", "link"]);
    assert!(
        links.contains("master br-vmctl"),
        "a tap is enslaved to the bridge:\n{links}"
    );

    // DHCP comes late; the agent still looks, with backoff.
    let mut dnsmasq = Command::new("nsenter")
        .args(["-t", &ns, "-n", "dnsmasq", "--keep-in-foreground"])
        .args([
            "--conf-file=/dev/null",
            "--port=0",
            "--user=root",
            "--interface=br-vmctl",
            "--bind-interfaces",
            "--except-interface=lo",
            "--dhcp-range=10.77.0.100,10.77.0.200,12h",
            "--log-dhcp",
        ])
        .arg(format!("--dhcp-leasefile={}", leases.display()))
        .arg(format!("--pid-file={}", t.join("dnsmasq.pid").display()))
        .arg(format!(
            "--log-facility={}",
            t.join("dnsmasq.log").display()
        ))
        .spawn()
        .expect("dnsmasq (dnsmasq-base) runs");
    w.ok(&["apply", "--wait", "--timeout", BOOT]);

    let vm = w.json(&["get", "vm", "tapvm", "-o", "json"]);
    let host = vm["status"]["runtime"]["sshHost"]
        .as_str()
        .unwrap_or_else(|| panic!("the address is in status: {vm}"))
        .to_owned();
    assert!(host.starts_with("10.77.0."), "{vm}");
    assert_eq!(vm["status"]["runtime"]["sshPort"], 22, "{vm}");
    let found = cond(&vm, "AddressReady");
    assert_eq!(found["status"], "True", "{vm}");
    assert_eq!(found["reason"], "AddressFound", "{vm}");
    eprintln!("AddressReady: {}", found["message"]);
    assert!(
        found["message"].as_str().unwrap().starts_with(&host),
        "{found}"
    );
    assert_eq!(cond(&vm, "SshReady")["status"], "True", "{vm}");
    assert_eq!(cond(&vm, "Ready")["status"], "True", "{vm}");
    // It is the address dnsmasq leased to the VM's MAC.
    let lease_text = std::fs::read_to_string(&leases).unwrap();
    assert!(
        lease_text
            .lines()
            .any(|l| l.contains(&mac) && l.split_whitespace().nth(2) == Some(host.as_str())),
        "dnsmasq leased {host} to {mac}:\n{lease_text}"
    );
    eprintln!("dnsmasq leases:\n{lease_text}");

    // The search's turns are notes of the VM.
    let events = w.ok(&["events"]);
    assert!(
        events.contains("IPDiscoveryTimeout") && events.contains(&format!("has address {host}")),
        "{events}"
    );

    // Provisioned over the bridge; exec and ssh reach the guest the same way.
    let prov = w.json(&["get", "provision", "tapvm", "-o", "json"]);
    assert_eq!(prov["status"]["phase"], "Succeeded", "{prov}");
    assert_eq!(
        w.ok(&["exec", "tapvm", "--", "cat", "/tmp/tap-proof"]),
        "provisioned-over-tap\n"
    );
    let addr = w.ok(&[
        "ssh", "tapvm", "--", "ip", "-4", "-o", "addr", "show", "eth0",
    ]);
    assert!(addr.contains(&format!("inet {host}/")), "{addr}");

    w.ok(&["delete", "-f", "VMFile.kdl", "--wait", "--timeout", "60"]);
    assert!(w.qemu_pids().is_empty());
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    let _ = agent.kill();
    let _ = agent.wait();
}
