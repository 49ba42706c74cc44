//! Driver tests against a real QEMU booting the tiny test image
//! (`tests/images/build.sh tiny`). Skipped, with a message, when the image
//! has not been built on this machine.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use super::*;
use crate::drivers::LocalImage;

fn tiny_image() -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/images/build.sh");
    let out = std::process::Command::new(script)
        .args(["tiny", "--print-path"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn instance(name: &str, image: &Path) -> InstanceSpec {
    let spec =
        serde_json::from_value(serde_json::json!({"image": "tiny", "memoryMib": 512})).unwrap();
    InstanceSpec {
        name: name.to_owned(),
        uid: format!("uid-{name}"),
        spec,
        image: LocalImage {
            path: image.display().to_string(),
            format: "qcow2".to_owned(),
            size_bytes: 0,
            virtual_size_bytes: None,
        },
    }
}

fn driver(data_dir: &Path) -> QemuDriver {
    let mut config = QemuConfig::new(data_dir);
    // This host's /dev/kvm opens but guests crawl: never detect in tests.
    config.accel = Some(Accel::Tcg);
    QemuDriver::new(config)
}

/// Reads the SSH banner through the forwarded port. SLIRP accepts the
/// connection before the guest listens, so a connect alone proves nothing.
async fn ssh_banner(port: u16) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.starts_with("SSH-").then_some(text)
}

async fn wait_ssh(port: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(b) = ssh_banner(port).await {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "no SSH banner on port {port} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn state(d: &QemuDriver, name: &str) -> Option<InstanceState> {
    d.status(name).await.unwrap().map(|s| s.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_image_boots_suspends_stops_is_adopted_and_dies_visibly() {
    let Some(image) = tiny_image() else {
        eprintln!("skipped: the tiny test image is not built (tests/images/build.sh tiny)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = driver(dir.path());
    let name = "boot-1";
    let spec = instance(name, &image);
    let t0 = Instant::now();

    let st = d.prepare(&spec).await.unwrap();
    assert_eq!(st.state, InstanceState::Stopped);
    let work = d.layout(name).root;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&work).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert!(work.join("disk.qcow2").exists() && work.join("seed.iso").exists());
    // prepare again leaves it as it is
    assert_eq!(d.prepare(&spec).await.unwrap(), st);

    let st = d.start(name).await.unwrap();
    assert_eq!(st.state, InstanceState::Running);
    let port = st.runtime.ssh_port.unwrap();
    let pid = st.runtime.pid.unwrap();
    assert_eq!(st.runtime.ssh_host.as_deref(), Some("127.0.0.1"));
    let banner = wait_ssh(port, Duration::from_secs(180)).await;
    eprintln!(
        "SSH banner {:?} after {:?}",
        banner.lines().next(),
        t0.elapsed()
    );

    // `disk` grows a running VM's disk through QMP; a smaller one keeps
    // the disk as it is (prepare does not fail: issue 16), and a live
    // resize to a smaller size is refused. Status reports what QEMU sees.
    let mut grown = spec.clone();
    grown.spec.disk_gib = Some(2);
    d.prepare(&grown).await.unwrap();
    let root = |st: &InstanceStatus| {
        st.runtime
            .disks
            .first()
            .map(|d| (d.name.clone(), d.size_bytes))
    };
    assert_eq!(
        root(&d.status(name).await.unwrap().unwrap()),
        Some((ROOT_DISK.to_owned(), 2 << 30))
    );
    grown.spec.disk_gib = Some(1);
    d.prepare(&grown).await.unwrap();
    d.resize_disk(name, ROOT_DISK, 3 << 30).await.unwrap();
    assert_eq!(
        root(&d.status(name).await.unwrap().unwrap()),
        Some((ROOT_DISK.to_owned(), 3 << 30))
    );
    let err = d
        .resize_disk(name, ROOT_DISK, 1 << 30)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(disk::SHRINK_REFUSED), "{err}");

    d.suspend(name).await.unwrap();
    assert_eq!(state(&d, name).await, Some(InstanceState::Suspended));
    d.resume(name).await.unwrap();
    assert_eq!(state(&d, name).await, Some(InstanceState::Running));
    wait_ssh(port, Duration::from_secs(30)).await;

    // An agent restart: a second driver adopts the VM instead of starting
    // another QEMU.
    let d2 = driver(dir.path());
    let st2 = d2.status(name).await.unwrap().unwrap();
    assert_eq!(
        (st2.state, st2.runtime.pid),
        (InstanceState::Running, Some(pid))
    );
    let st2 = d2.start(name).await.unwrap();
    assert_eq!(st2.runtime.pid, Some(pid));

    let t = Instant::now();
    d2.stop(name, Duration::from_secs(90)).await.unwrap();
    eprintln!("ACPI stop took {:?}", t.elapsed());
    assert_eq!(state(&d, name).await, Some(InstanceState::Stopped));
    let exit = wait_last_exit(&d, name).await;
    assert!(exit.requested, "{exit:?}");
    assert_eq!(exit.exit, Exit::Code(0), "the guest powered off cleanly");

    let st = d.start(name).await.unwrap();
    let pid = st.runtime.pid.unwrap();
    assert_eq!(
        st.runtime.ssh_port,
        Some(port),
        "the recorded port is reused"
    );
    process::kill(pid, process::Signal::SIGKILL).unwrap();
    assert!(process::wait_gone(pid, Duration::from_secs(5)).await);
    let st = d.status(name).await.unwrap().unwrap();
    assert_eq!((st.state, st.runtime.pid), (InstanceState::Stopped, None));
    let exit = wait_last_exit(&d, name).await;
    assert_eq!((exit.exit, exit.requested), (Exit::Signal(9), false));

    d.destroy(name).await.unwrap();
    assert!(!work.exists());
    assert_eq!(d.status(name).await.unwrap(), None);
    d.destroy(name).await.unwrap();
    eprintln!("whole lifecycle took {:?}", t0.elapsed());
}

#[tokio::test]
async fn unknown_instance_is_absent_or_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let d = driver(dir.path());
    assert_eq!(d.status("nope").await.unwrap(), None);
    assert!(matches!(
        d.start("nope").await,
        Err(DriverError::NotFound(_))
    ));
    assert!(matches!(
        d.stop("nope", Duration::ZERO).await,
        Err(DriverError::NotFound(_))
    ));
    assert!(matches!(
        d.suspend("nope").await,
        Err(DriverError::InvalidState { .. })
    ));
    d.destroy("nope").await.unwrap();
}

/// A blank disk: the firmware finds nothing to boot and ignores ACPI.
fn blank_image(dir: &Path) -> PathBuf {
    let image = dir.join("base.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    image
}

#[tokio::test]
async fn stop_escalates_to_sigterm_when_the_guest_ignores_acpi() {
    let dir = tempfile::tempdir().unwrap();
    let image = blank_image(dir.path());
    let d = driver(dir.path());
    let mut spec = instance("deaf", &image);
    spec.spec.memory_mib = 64;
    d.prepare(&spec).await.unwrap();
    let pid = d.start("deaf").await.unwrap().runtime.pid.unwrap();
    let t = Instant::now();
    d.stop("deaf", Duration::from_secs(1)).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(!process::is_alive(pid));
    assert_eq!(state(&d, "deaf").await, Some(InstanceState::Stopped));
    let exit = wait_last_exit(&d, "deaf").await;
    assert!(exit.requested);
    // Stopping a stopped instance is a no-op.
    d.stop("deaf", Duration::from_secs(1)).await.unwrap();
    d.destroy("deaf").await.unwrap();
}

#[tokio::test]
async fn qemu_that_cannot_start_reports_spawn_failed_with_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let image = blank_image(dir.path());
    let mut config = QemuConfig::new(dir.path());
    config.accel = Some(Accel::Tcg);
    config.seed_tool = SeedTool::PureRust;
    let d = QemuDriver::new(config);
    let mut spec = instance("bad", &image);
    spec.spec.memory_mib = 1 << 40; // more than QEMU can allocate
    d.prepare(&spec).await.unwrap();
    let err = d.start("bad").await.unwrap_err().to_string();
    assert!(err.contains(SPAWN_FAILED), "{err}");
    assert!(err.contains("QEMU for bad did not start"), "{err}");
    assert_eq!(state(&d, "bad").await, Some(InstanceState::Stopped));
}

#[test]
fn run_states_map_to_instance_states() {
    assert_eq!(run_state("running"), InstanceState::Running);
    assert_eq!(run_state("paused"), InstanceState::Suspended);
    assert_eq!(run_state("guest-panicked"), InstanceState::Suspended);
    assert_eq!(run_state("shutdown"), InstanceState::Stopped);
}

/// The "agent" of [`qemu_outlives_the_agent_process_and_is_adopted`]:
/// starts a VM in `VMCTL_TEST_AGENT_DIR` and exits. Does nothing when run
/// on its own.
#[tokio::test]
async fn helper_agent_starts_a_vm_and_exits() {
    let Some(dir) = std::env::var_os("VMCTL_TEST_AGENT_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let d = driver(&dir);
    let mut spec = instance("orphan", &blank_image(&dir));
    spec.spec.memory_mib = 64;
    d.prepare(&spec).await.unwrap();
    let pid = d.start("orphan").await.unwrap().runtime.pid.unwrap();
    std::fs::write(dir.join("started-pid"), pid.to_string()).unwrap();
}

#[tokio::test]
async fn qemu_outlives_the_agent_process_and_is_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "drivers::qemu::tests::helper_agent_starts_a_vm_and_exits",
        ])
        .env("VMCTL_TEST_AGENT_DIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let pid: u32 = std::fs::read_to_string(dir.path().join("started-pid"))
        .unwrap()
        .parse()
        .unwrap();
    // The agent process is gone; its QEMU is not.
    let d = driver(dir.path());
    let st = d.status("orphan").await.unwrap().unwrap();
    assert_eq!(
        (st.state, st.runtime.pid),
        (InstanceState::Running, Some(pid))
    );
    assert_eq!(d.start("orphan").await.unwrap().runtime.pid, Some(pid));
    d.destroy("orphan").await.unwrap();
    assert!(!process::is_alive(pid));
}

/// The supervisor writes the exit status just after QEMU is gone: give it a
/// moment on a loaded machine.
async fn wait_last_exit(d: &QemuDriver, name: &str) -> LastExit {
    for _ in 0..100 {
        if let Some(e) = d.last_exit(name) {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no exit status recorded for {name}");
}

/// Waits for `name` on the driver's change stream.
async fn changed(rx: &mut tokio::sync::broadcast::Receiver<String>, name: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Ok(n)) if n == name => return,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("change stream failed: {e}"),
            Err(_) => panic!("no change reported for {name} within {within:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qmp_events_report_pauses_and_death_without_polling_and_the_mac_follows_the_uid() {
    let dir = tempfile::tempdir().unwrap();
    let image = blank_image(dir.path());
    let d = driver(dir.path());
    let mut rx = d.changes().expect("the QEMU driver reports changes");
    let mut spec = instance("evented", &image);
    spec.spec.memory_mib = 64;
    let st = d.prepare(&spec).await.unwrap();
    assert_eq!(
        st.runtime.mac.as_deref(),
        Some(args::mac_for("uid-evented").as_str()),
        "the MAC derives from the uid, not the name"
    );
    let pid = d.start("evented").await.unwrap().runtime.pid.unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let mac = format!("mac={}", args::mac_for("uid-evented"));
    assert!(String::from_utf8_lossy(&cmdline).contains(&mac));

    // Paused behind the driver's back (another QMP client): the STOP event
    // reports it.
    let l = d.layout("evented");
    let mut q = qmp::Qmp::connect(&l.qmp_sock(), Duration::from_secs(5))
        .await
        .unwrap();
    q.execute("stop", None).await.unwrap();
    drop(q);
    changed(&mut rx, "evented", Duration::from_secs(10)).await;
    assert_eq!(state(&d, "evented").await, Some(InstanceState::Suspended));

    // Killed from outside: the events monitor closes and says so.
    process::kill(pid, process::Signal::SIGKILL).unwrap();
    changed(&mut rx, "evented", Duration::from_secs(10)).await;
    let st = d.status("evented").await.unwrap().unwrap();
    assert_eq!(st.state, InstanceState::Stopped);
    assert_eq!(st.runtime.last_exit.as_deref(), Some("killed by signal 9"));

    // A restart keeps the MAC.
    let st = d.start("evented").await.unwrap();
    assert_eq!(
        st.runtime.mac.as_deref(),
        Some(args::mac_for("uid-evented").as_str())
    );
    d.stop("evented", Duration::from_secs(1)).await.unwrap();
    let st = d.status("evented").await.unwrap().unwrap();
    let last = st.runtime.last_exit.unwrap();
    assert!(last.ends_with("(stopped by vmctl)"), "{last}");
    d.destroy("evented").await.unwrap();
}

#[tokio::test]
async fn a_changed_cloud_init_config_gets_a_new_seed_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let image = blank_image(dir.path());
    let d = driver(dir.path());
    let mut spec = instance("reseed", &image);
    spec.spec.memory_mib = 64;
    d.prepare(&spec).await.unwrap();
    let l = d.layout("reseed");
    let before = std::fs::read(l.seed()).unwrap();
    let id = std::fs::read_to_string(l.instance_id_file()).unwrap();
    d.prepare(&spec).await.unwrap();
    assert_eq!(
        std::fs::read(l.seed()).unwrap(),
        before,
        "unchanged config, same seed"
    );
    spec.spec.cloud_init =
        Some(serde_json::from_value(serde_json::json!({"hostname": "renamed"})).unwrap());
    d.prepare(&spec).await.unwrap();
    let after = std::fs::read(l.seed()).unwrap();
    assert_ne!(after, before, "the seed was rebuilt");
    assert!(after.windows(7).any(|w| w == b"renamed"));
    assert_eq!(
        std::fs::read_to_string(l.instance_id_file()).unwrap(),
        id,
        "same instance: no recreate"
    );
}

/// Issue 18 item 5: a valid 63-character VM name under a 25-character data
/// dir made `qmp-events.sock` 109 bytes; QEMU refused it and the VM
/// crash-looped. Its sockets now live in a short private directory that a
/// restarted agent finds again (adoption), and destroy removes it.
#[tokio::test]
async fn long_vm_name_sockets_fit_sun_path_start_adopt_stop_destroy() {
    let dir = tempfile::tempdir().unwrap();
    let image = blank_image(dir.path());
    // Long enough that even a short name overflows sun_path in the work dir.
    let data_dir = dir.path().join("d".repeat(100));
    let name = format!("v{}", "x".repeat(62));
    assert_eq!(name.len(), 63);
    let d = driver(&data_dir);
    let mut spec = instance(&name, &image);
    spec.spec.memory_mib = 64;
    d.prepare(&spec).await.unwrap();
    let st = d.start(&name).await.expect("QEMU starts with a long name");
    assert_eq!(st.state, InstanceState::Running);
    let pid = st.runtime.pid.unwrap();

    let l = d.layout(&name);
    assert!(!l.sockets_in_root());
    for sock in [l.qmp_sock(), l.events_sock(), l.serial_sock()] {
        assert!(sock.as_os_str().len() <= 107, "{}", sock.display());
        assert!(sock.exists(), "{} was made by QEMU", sock.display());
        let link = l.root.join(sock.file_name().unwrap());
        assert_eq!(std::fs::read_link(&link).unwrap(), sock);
    }
    // The console is reachable through the work dir's symlink.
    let serial = std::fs::read_link(l.root.join("serial.sock")).unwrap();
    tokio::net::UnixStream::connect(&serial).await.unwrap();

    // A restarted agent adopts it.
    let d2 = driver(&data_dir);
    let st2 = d2.start(&name).await.unwrap();
    assert_eq!(
        (st2.state, st2.runtime.pid),
        (InstanceState::Running, Some(pid))
    );
    d2.stop(&name, Duration::from_secs(1)).await.unwrap();
    assert!(!process::is_alive(pid));
    assert_eq!(state(&d2, &name).await, Some(InstanceState::Stopped));
    // And it starts again.
    assert_eq!(d2.start(&name).await.unwrap().state, InstanceState::Running);
    d2.destroy(&name).await.unwrap();
    assert!(!l.root.exists());
    assert!(!l.sock_dir.exists(), "destroy removes the socket directory");
}

/// The "agent" of [`stop_and_destroy_work_with_only_qemu_tools_on_path`]:
/// runs a VM's lifecycle in `VMCTL_TEST_QEMU_ONLY_DIR` with whatever
/// `PATH` it was given. Does nothing when run on its own.
#[tokio::test]
async fn helper_lifecycle_with_the_given_path() {
    let Some(dir) = std::env::var_os("VMCTL_TEST_QEMU_ONLY_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let mut config = QemuConfig::new(&dir);
    config.accel = Some(Accel::Tcg);
    config.kill_grace = Duration::from_secs(2);
    let d = QemuDriver::new(config);
    let mut spec = instance("bare", &blank_image(&dir));
    spec.spec.memory_mib = 64;
    d.prepare(&spec).await.unwrap();
    let pid = d.start("bare").await.unwrap().runtime.pid.unwrap();
    // The blank disk's firmware ignores ACPI: stop escalates to signals.
    d.stop("bare", Duration::from_millis(500)).await.unwrap();
    assert!(!process::is_alive(pid), "stop ended QEMU {pid}");
    let exit = wait_last_exit(&d, "bare").await;
    assert!(exit.requested, "{exit:?}");
    assert_eq!(state(&d, "bare").await, Some(InstanceState::Stopped));
    let pid = d.start("bare").await.unwrap().runtime.pid.unwrap();
    d.destroy("bare").await.unwrap();
    assert!(!process::is_alive(pid), "destroy ended QEMU {pid}");
    assert!(!d.layout("bare").root.exists());
    std::fs::write(dir.join("done"), "ok").unwrap();
}

/// Issue 18 item 19: the driver stopped QEMU by running `kill`, which a
/// debian:bookworm-slim + QEMU container does not have. With `PATH` holding
/// only QEMU's tools, a VM still starts, stops and is destroyed.
#[tokio::test]
async fn stop_and_destroy_work_with_only_qemu_tools_on_path() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for tool in ["qemu-system-x86_64", "qemu-img"] {
        let real = crate::seed::find_in_path(tool).expect("QEMU is installed");
        std::os::unix::fs::symlink(real, bin.join(tool)).unwrap();
    }
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "drivers::qemu::tests::helper_lifecycle_with_the_given_path",
            "--nocapture",
        ])
        .env("PATH", &bin)
        .env("VMCTL_TEST_QEMU_ONLY_DIR", &data)
        .output()
        .unwrap();
    assert!(
        out.status.success() && data.join("done").exists(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The fault: a VM's graphics console was not there at all (the manual's
/// QEMU backend had VNC on localhost and showed its address). Now it is
/// opt-in: off by default, and `display: VNC` puts a VNC server on
/// 127.0.0.1 whose address status shows and which answers RFB.
#[tokio::test]
async fn vnc_is_off_by_default_and_display_vnc_answers_rfb_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let image = blank_image(dir.path());
    let d = driver(dir.path());
    let mut plain = instance("novnc", &image);
    plain.spec.memory_mib = 64;
    d.prepare(&plain).await.unwrap();
    let st = d.start("novnc").await.unwrap();
    assert_eq!(st.runtime.vnc, None, "off by default");
    d.destroy("novnc").await.unwrap();

    let mut spec = instance("vnc", &image);
    spec.spec.memory_mib = 64;
    spec.spec.display = vmctl_api::Display::Vnc;
    d.prepare(&spec).await.unwrap();
    let st = d.start("vnc").await.unwrap();
    let addr = st.runtime.vnc.clone().expect("the VNC address in status");
    assert!(addr.starts_with("127.0.0.1:59"), "{addr}");
    let mut s = tokio::net::TcpStream::connect(addr.as_str()).await.unwrap();
    let mut banner = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&banner, b"RFB 003.008\n");
    // A stopped VM has no VNC address.
    d.stop("vnc", Duration::from_secs(1)).await.unwrap();
    let st = d.status("vnc").await.unwrap().unwrap();
    assert_eq!(st.runtime.vnc, None);
    d.destroy("vnc").await.unwrap();
}

/// Port forwards through the real QEMU's monitor, without a guest: put in
/// place and read back (vmctl's SSH forward left out), a host port that
/// another socket holds is `AddressInUse` naming it, removal takes it away
/// (and again is no error).
#[tokio::test]
async fn port_forwards_go_in_and_out_live_and_a_held_host_port_is_address_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let image = blank_image(dir.path());
    let d = driver(dir.path());
    let mut spec = instance("fwd", &image);
    spec.spec.memory_mib = 64;
    d.prepare(&spec).await.unwrap();
    let st = d.start("fwd").await.unwrap();
    assert_eq!(
        st.port_forwards,
        Some(vec![]),
        "the SSH forward is vmctl's own"
    );
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let f = vmctl_api::PortForward::tcp(port, 80);
    d.add_port_forward("fwd", &f).await.unwrap();
    let st = d.status("fwd").await.unwrap().unwrap();
    assert_eq!(st.port_forwards, Some(vec![f.clone()]));
    // QEMU listens there now.
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err());

    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = vmctl_api::PortForward::tcp(held.local_addr().unwrap().port(), 81);
    let err = d.add_port_forward("fwd", &busy).await.unwrap_err();
    assert!(matches!(err, DriverError::AddressInUse(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains(&format!("host port {}/tcp", busy.host_port)),
        "{err}"
    );
    let st = d.status("fwd").await.unwrap().unwrap();
    assert_eq!(st.port_forwards, Some(vec![f.clone()]), "the others stay");

    d.remove_port_forward("fwd", &f).await.unwrap();
    d.remove_port_forward("fwd", &f).await.unwrap();
    let st = d.status("fwd").await.unwrap().unwrap();
    assert_eq!(st.port_forwards, Some(vec![]));
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
    d.destroy("fwd").await.unwrap();
}

/// Hot-plug against a real QEMU whose guest (a blank disk: no OS) never
/// answers ACPI: disks go onto the spare root ports QEMU-side and are
/// reported and recorded; one more finds no free port; an unplug the guest
/// does not release times out. Both failures carry HOTPLUG_FAILED and say
/// why, and change nothing.
#[tokio::test]
async fn disks_hot_plug_onto_spare_root_ports_and_failures_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let image = blank_image(dir.path());
    let mut config = QemuConfig::new(dir.path());
    config.accel = Some(Accel::Tcg);
    config.unplug_timeout = Duration::from_secs(1);
    let d = QemuDriver::new(config);
    let mut spec = instance("plug", &image);
    spec.spec.memory_mib = 64;
    let disk = |name: &str| vmctl_api::Disk {
        name: name.into(),
        size_gib: 1,
    };
    spec.spec.disks = vec![disk("data")];
    d.prepare(&spec).await.unwrap();
    d.start("plug").await.unwrap();
    assert!(d.hotplugs_disks());

    let l = d.layout("plug");
    let spare: Vec<String> = (0..args::SPARE_PORTS).map(|i| format!("d{i}")).collect();
    for name in &spare {
        let got = d.attach_disk("plug", &disk(name)).await.unwrap();
        assert_eq!(got.size_bytes, 1 << 30);
        assert!(disk_path(&l, name).exists());
        // Attaching it again is a no-op.
        d.attach_disk("plug", &disk(name)).await.unwrap();
    }
    let names = |st: InstanceStatus| -> Vec<String> {
        st.runtime.disks.into_iter().map(|d| d.name).collect()
    };
    let mut want = vec![ROOT_DISK.to_owned(), "data".to_owned()];
    want.extend(spare.iter().cloned());
    assert_eq!(names(d.status("plug").await.unwrap().unwrap()), want);
    assert_eq!(read_config(&l).unwrap().disks, want[1..]);

    let err = d
        .attach_disk("plug", &disk("extra"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(hotplug::HOTPLUG_FAILED), "{err}");
    assert!(
        err.contains("Cannot attach disk extra of plug live"),
        "{err}"
    );
    assert!(err.contains("no free PCIe root port"), "{err}");
    assert!(!disk_path(&l, "extra").exists(), "nothing made");

    let err = d.detach_disk("plug", "d0").await.unwrap_err().to_string();
    assert!(
        err.contains("the guest did not release disk d0 within 1s"),
        "{err}"
    );
    assert_eq!(names(d.status("plug").await.unwrap().unwrap()), want);
    // A disk not attached: detached already.
    d.detach_disk("plug", "never").await.unwrap();
    d.destroy("plug").await.unwrap();
}

/// The fault (issue 16, found by a new-user tryout): a QEMU that stopped
/// answering (a snapshot load that never ended, after which QEMU ignored
/// SIGTERM) was still reported as running, `vmctl stop` waited behind the
/// snapshot operation for good, and deleting the VM never finished. A
/// SIGSTOPped QEMU is such a QEMU: its QMP socket accepts (the kernel
/// does) but nothing answers, and SIGTERM stays pending. Inspecting it is
/// an error within the QMP timeout, and stop and destroy end it even while
/// another operation holds the VM's lock.
#[tokio::test]
async fn a_wedged_qemu_is_an_error_not_running_and_stop_and_destroy_still_end_it() {
    let dir = tempfile::tempdir().unwrap();
    let image = blank_image(dir.path());
    let mut config = QemuConfig::new(dir.path());
    config.accel = Some(Accel::Tcg);
    config.qmp_timeout = Duration::from_secs(1);
    config.kill_grace = Duration::from_secs(1);
    config.lock_wait = Duration::from_secs(1);
    let d = QemuDriver::new(config);
    let mut spec = instance("wedged", &image);
    spec.spec.memory_mib = 64;
    d.prepare(&spec).await.unwrap();

    let wedge = |pid: u32| process::kill(pid, process::Signal::SIGSTOP).unwrap();
    let pid = d.start("wedged").await.unwrap().runtime.pid.unwrap();
    wedge(pid);
    let t = Instant::now();
    let err = d.status("wedged").await.unwrap_err().to_string();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(err.contains("QMP"), "{err}");

    // As a snapshot job that QEMU never finishes does.
    let held = d.lock("wedged").lock_owned().await;
    let t = Instant::now();
    d.stop("wedged", Duration::from_secs(1)).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert!(!process::is_alive(pid), "stop ended the wedged QEMU {pid}");
    assert_eq!(state(&d, "wedged").await, Some(InstanceState::Stopped));
    drop(held);

    let pid = d.start("wedged").await.unwrap().runtime.pid.unwrap();
    wedge(pid);
    let _held = d.lock("wedged").lock_owned().await;
    let t = Instant::now();
    d.destroy("wedged").await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert!(
        !process::is_alive(pid),
        "destroy ended the wedged QEMU {pid}"
    );
    assert!(!d.layout("wedged").root.exists());
}

/// The fault (issue 16, found by a new-user tryout): restoring a memory
/// snapshot into a running VM whose disks were no longer those it was
/// saved with (after a detach the guest never completed) hung QEMU in
/// `snapshot-load`. Now the restore is refused up front, saying why and
/// what to do, and QEMU goes on answering; restoring the disks of the
/// stopped VM still works.
#[tokio::test]
async fn a_memory_snapshot_is_never_loaded_into_a_vm_whose_disks_changed() {
    let dir = tempfile::tempdir().unwrap();
    let image = blank_image(dir.path());
    let mut config = QemuConfig::new(dir.path());
    config.accel = Some(Accel::Tcg);
    config.unplug_timeout = Duration::from_secs(1);
    let d = QemuDriver::new(config);
    let mut spec = instance("moved", &image);
    spec.spec.memory_mib = 64;
    let disk = |name: &str| vmctl_api::Disk {
        name: name.into(),
        size_gib: 1,
    };
    spec.spec.disks = vec![disk("data")];
    d.prepare(&spec).await.unwrap();
    d.start("moved").await.unwrap();
    let saved = d.create_snapshot("moved", "s1").await.unwrap();
    assert!(saved.memory, "{saved:?}");
    assert_eq!(saved.disks, vec![ROOT_DISK.to_owned(), "data".to_owned()]);

    d.attach_disk("moved", &disk("extra")).await.unwrap();
    let err = d
        .restore_snapshot("moved", "s1")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("with disks (root, data), but the running VM has (root, data, extra)"),
        "{err}"
    );
    assert!(err.contains("vmctl stop"), "{err}");
    assert_eq!(state(&d, "moved").await, Some(InstanceState::Running));

    // The blank guest never releases it: the unplug stays pending.
    d.detach_disk("moved", "extra").await.unwrap_err();
    let err = d
        .restore_snapshot("moved", "s1")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("has not released disk(s) extra"), "{err}");
    assert_eq!(state(&d, "moved").await, Some(InstanceState::Running));

    d.stop("moved", Duration::from_secs(1)).await.unwrap();
    d.restore_snapshot("moved", "s1").await.unwrap();

    // A disk the snapshot holds but the running VM no longer has (detached
    // since; its file stays): refused too (found by the second tryout).
    d.start("moved").await.unwrap();
    let saved = d.create_snapshot("moved", "s2").await.unwrap();
    assert_eq!(saved.disks, ["root", "data", "extra"]);
    d.stop("moved", Duration::from_secs(1)).await.unwrap();
    let l = d.layout("moved");
    d.record_disks(&l, |disks| disks.retain(|x| x != "extra"))
        .unwrap();
    d.start("moved").await.unwrap();
    let err = d
        .restore_snapshot("moved", "s2")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("with disks (root, data, extra), but the running VM has (root, data)"),
        "{err}"
    );
    assert_eq!(state(&d, "moved").await, Some(InstanceState::Running));
    d.destroy("moved").await.unwrap();
}

/// The fault (issue 16, second tryout): with several Snapshots, a change to
/// the VM had each of them open QMP at once; QEMU's monitor serves one
/// client at a time, and a connect to its full listen backlog failed at
/// once with EAGAIN. The VM was then reported `HypervisorError`, and a
/// `vmctl stop` in that moment was no ACPI shutdown but a kill. A busy
/// monitor is waited for: every one of many concurrent inspections of a
/// VM whose monitor another client holds for a second succeeds.
#[tokio::test]
async fn a_busy_monitor_is_waited_for_and_never_reported_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let image = blank_image(dir.path());
    let d = driver(dir.path());
    let mut spec = instance("busy", &image);
    spec.spec.memory_mib = 64;
    d.prepare(&spec).await.unwrap();
    d.start("busy").await.unwrap();
    let l = d.layout("busy");
    let held = Qmp::connect(&l.qmp_sock(), Duration::from_secs(5))
        .await
        .unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(held);
    });
    let all = futures::future::join_all((0..8).map(|_| d.status("busy"))).await;
    for st in all {
        let st = st.expect("a busy monitor is waited for").unwrap();
        assert_eq!(st.state, InstanceState::Running);
    }
    release.await.unwrap();
    d.destroy("busy").await.unwrap();
}
