//! Port forwards (issue 15 item 3) on the tiny guest: busybox `httpd`
//! in the guest answers on the forwarded host port; a forward added to
//! the running VM answers without a restart of QEMU, a removed one stops
//! answering, and a host port another program holds gives the VM a
//! `PortForwardsReady` condition naming it while the VM stays Ready and
//! its other forwards work. Then readiness probes of the user's own on the
//! same VM. One VM, to keep TCG boots few.

use std::io::{Read, Write};

use super::*;

fn vmfile(img: &str, forwards: &[(u16, u16)]) -> String {
    vmfile_probed(img, forwards, "")
}

/// [`vmfile`] with `probes` (VMFile lines) in the VM's block.
fn vmfile_probed(img: &str, forwards: &[(u16, u16)], probes: &str) -> String {
    let mut fwd: String = forwards
        .iter()
        .map(|(h, g)| format!("    port-forward host={h} guest={g}\n"))
        .collect();
    fwd.push_str(probes);
    format!(
        "vm \"pf\" {{\n    image \"{img}\"\n    memory 512\n{fwd}    ssh {{\n        user \"root\"\n    }}\n}}\n"
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The body of `GET /` on 127.0.0.1:`port`, or why not.
fn http_get(port: u16) -> Result<String, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    match out.split_once("\r\n\r\n") {
        Some((_, body)) => Ok(body.trim().to_owned()),
        None => Err(format!("no HTTP answer: {out:?}")),
    }
}

/// Whether nothing listens on 127.0.0.1:`port` any more.
fn refused(port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    matches!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

fn vm(w: &World) -> serde_json::Value {
    w.json(&["get", "vm", "pf", "-o", "json"])
}

fn cond(v: &serde_json::Value, ty: &str) -> serde_json::Value {
    v["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == ty).cloned())
        .unwrap_or_default()
}

fn state_of(v: &serde_json::Value, host: u16) -> String {
    v["status"]["portForwards"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["hostPort"] == host).cloned())
        .map(|e| e["state"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

#[test]
fn forwards_answer_are_added_and_removed_live_and_a_busy_host_port_is_a_condition() {
    let w = World::new();
    let p = w.project();
    let img = tiny_image().display().to_string();
    let (p80, p81) = (free_port(), free_port());
    // Another program holds this one.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let pbusy = busy.local_addr().unwrap().port();
    std::fs::write(p.join("VMFile.kdl"), vmfile(&img, &[(p80, 80)])).unwrap();
    w.ok(&["up", "--timeout", BOOT]);
    let v = vm(&w);
    assert_eq!(state_of(&v, p80), "Active", "{v}");
    assert_eq!(cond(&v, "PortForwardsReady")["status"], "True", "{v}");

    // Two web servers in the guest, on ports 80 and 81.
    let serve = "for p in 80 81; do mkdir -p /tmp/w$p && echo port-$p > /tmp/w$p/index.html && httpd -p $p -h /tmp/w$p; done; echo started";
    let out = w.ok(&["exec", "pf", "--", "sh", "-c", serve]);
    assert!(out.contains("started"), "{out}");
    wait_until("the forward answers", Duration::from_secs(30), || {
        http_get(p80).as_deref() == Ok("port-80")
    });

    // Added live: the new forward answers, QEMU is the same process; the
    // one whose host port is held fails alone, the VM stays Ready.
    let pids = w.qemu_pids();
    assert_eq!(pids.len(), 1);
    std::fs::write(
        p.join("VMFile.kdl"),
        vmfile(&img, &[(p80, 80), (p81, 81), (pbusy, 81)]),
    )
    .unwrap();
    w.ok(&["apply"]);
    wait_until("the added forward answers", Duration::from_secs(60), || {
        http_get(p81).as_deref() == Ok("port-81")
    });
    wait_until("the busy port's condition", Duration::from_secs(60), || {
        cond(&vm(&w), "PortForwardsReady")["reason"] == "HostPortInUse"
    });
    let v = vm(&w);
    let c = cond(&v, "PortForwardsReady");
    assert_eq!(c["status"], "False", "{c}");
    let msg = c["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("host port {pbusy}/tcp")) && msg.contains("in use"),
        "{msg}"
    );
    assert_eq!(state_of(&v, pbusy), "Failed", "{v}");
    assert_eq!(state_of(&v, p81), "Active", "{v}");
    assert_eq!(cond(&v, "Ready")["status"], "True", "{v}");
    assert_eq!(v["status"]["phase"], "Running");
    assert_eq!(
        http_get(p80).as_deref(),
        Ok("port-80"),
        "the others still work"
    );
    assert_eq!(w.qemu_pids(), pids, "no restart for forwards");
    assert_ne!(cond(&v, "RestartRequired")["status"], "True", "{v}");

    // Shown by get -o wide, list and describe, with the failure.
    let wide = w.ok(&["get", "vm", "-o", "wide"]);
    assert!(
        wide.contains(&format!("127.0.0.1:{p81}->81/tcp"))
            && wide.contains(&format!("127.0.0.1:{pbusy}->81/tcp (Failed)")),
        "{wide}"
    );
    let list = w.ok(&["list"]);
    assert!(list.contains(&format!("127.0.0.1:{p80}->80/tcp")), "{list}");
    let describe = w.ok(&["describe", "vm", "pf"]);
    assert!(
        describe.contains("Port forwards:") && describe.contains("HostPortInUse"),
        "{describe}"
    );
    let events = w.ok(&["events"]);
    assert!(
        events
            .lines()
            .any(|l| l.contains("Warning") && l.contains("HostPortInUse")),
        "{events}"
    );

    // Once the port is free, the forward is tried again and works.
    drop(busy);
    wait_until("the freed port's forward", Duration::from_secs(90), || {
        http_get(pbusy).as_deref() == Ok("port-81")
    });
    assert_eq!(
        cond(&vm(&w), "PortForwardsReady")["status"],
        "True",
        "{}",
        vm(&w)
    );

    // Removed live: it stops answering, the others keep answering.
    std::fs::write(p.join("VMFile.kdl"), vmfile(&img, &[(p81, 81)])).unwrap();
    w.ok(&["apply"]);
    wait_until(
        "the removed forwards to stop answering",
        Duration::from_secs(60),
        || refused(p80) && refused(pbusy),
    );
    assert_eq!(http_get(p81).as_deref(), Ok("port-81"));
    assert_eq!(w.qemu_pids(), pids, "no restart for forwards");
    let v = vm(&w);
    assert_eq!(
        v["status"]["portForwards"].as_array().unwrap().len(),
        1,
        "{v}"
    );

    // Readiness probes of the user's own (issue 15 item 2), on the same VM
    // and live (no restart): a failing one keeps the VM not Ready and is
    // named; once all pass it is Ready; one that starts failing (the web
    // server stops) makes it not Ready again, named.
    let probes = "    probe \"tcp\" port=81 period=1 failure-threshold=1\n    probe \"exec\" {\n        command \"test -e /tmp/ready\"\n        period 1\n    }\n";
    std::fs::write(
        p.join("VMFile.kdl"),
        vmfile_probed(&img, &[(p81, 81)], probes),
    )
    .unwrap();
    w.ok(&["apply"]);
    wait_until("the exec probe to fail", Duration::from_secs(60), || {
        cond(&vm(&w), "Ready")["reason"] == "ProbeFailed"
    });
    let ready = cond(&vm(&w), "Ready");
    assert_eq!(ready["status"], "False", "{ready}");
    let msg = ready["message"].as_str().unwrap();
    assert!(
        msg.contains("probe 1 (exec \"test -e /tmp/ready\") fails: exited with code 1"),
        "{msg}"
    );
    let describe = w.ok(&["describe", "vm", "pf"]);
    assert!(
        describe.contains("ProbesReady") && describe.contains("probe 1 (exec"),
        "{describe}"
    );
    w.ok(&["exec", "pf", "--", "touch", "/tmp/ready"]);
    wait_until(
        "Ready once every probe passes",
        Duration::from_secs(60),
        || cond(&vm(&w), "Ready")["status"] == "True",
    );
    assert_eq!(cond(&vm(&w), "ProbesReady")["status"], "True");
    w.ok(&[
        "exec",
        "pf",
        "--",
        "sh",
        "-c",
        "kill $(ps | awk '/httpd -p 81/ && !/awk/ {print $1}')",
    ]);
    wait_until("the tcp probe to fail", Duration::from_secs(60), || {
        cond(&vm(&w), "Ready")["status"] == "False"
    });
    let msg = cond(&vm(&w), "Ready")["message"].to_string();
    assert!(msg.contains("probe 0 (tcp 81) fails"), "{msg}");
    assert_eq!(w.qemu_pids(), pids, "no restart for probes");

    w.ok(&["delete", "-f", "VMFile.kdl", "--wait"]);
}
