//! VMFile.kdl translation and diagnostics.

use std::path::Path;

use vmctl_api::resources::{ImageSource, Network, ProvisionStep, Resource};
use vmctl_api::vmfile::{Context, parse};

fn ctx(dir: &Path) -> Context {
    Context {
        base_dir: dir.to_path_buf(),
        home: Some("/home/user".into()),
        backend: None,
    }
}

fn parse_ok(src: &str) -> Vec<Resource> {
    let dir = tempfile::tempdir().unwrap();
    match parse("VMFile.kdl", src, &ctx(dir.path())) {
        Ok(t) => t.resources,
        Err(d) => panic!("{}", d.render_plain()),
    }
}

fn parse_err(src: &str) -> vmctl_api::diag::FileDiagnostics {
    let dir = tempfile::tempdir().unwrap();
    parse("VMFile.kdl", src, &ctx(dir.path())).expect_err("the file must be rejected")
}

fn vm(res: &[Resource], name: &str) -> vmctl_api::VirtualMachine {
    res.iter()
        .find_map(|r| match r {
            Resource::VirtualMachine(v) if v.metadata.name == name => Some(v.clone()),
            _ => None,
        })
        .unwrap()
}

#[test]
fn defaults_follow_the_manual() {
    let res = parse_ok(r#"vm "min" { image-url "https://example.com/a.qcow2" }"#);
    let v = vm(&res, "min");
    assert_eq!(v.spec.vcpus, 1);
    assert_eq!(v.spec.memory_mib, 1024);
    assert_eq!(v.spec.disk_gib, None);
    assert_eq!(v.spec.network, Network::User);
    assert!(v.spec.cloud_init.is_none());
    assert!(v.spec.ssh.is_none());
    assert_eq!(
        res.len(),
        2,
        "one Image and one VM, no Provision without steps"
    );
}

#[test]
fn ssh_user_defaults_to_vm_when_block_present() {
    let res = parse_ok(r#"vm "a" { image-url "https://example.com/a.qcow2"; ssh { } }"#);
    assert_eq!(vm(&res, "a").spec.ssh.unwrap().user, "vm");
}

#[test]
fn tap_bridge_is_read_from_child_node_and_from_property() {
    // Regression: the tool we replace ignored the child form and used br0.
    let res = parse_ok(
        r#"
vm "child" { image-url "https://example.com/a.qcow2"; network "tap" { bridge "brchild" } }
vm "prop" { image-url "https://example.com/a.qcow2"; network "tap" bridge="brprop" }
vm "default" { image-url "https://example.com/a.qcow2"; network "tap" }
"#,
    );
    assert_eq!(
        vm(&res, "child").spec.network,
        Network::Tap {
            bridge: "brchild".into()
        }
    );
    assert_eq!(
        vm(&res, "prop").spec.network,
        Network::Tap {
            bridge: "brprop".into()
        }
    );
    assert_eq!(
        vm(&res, "default").spec.network,
        Network::Tap {
            bridge: "br0".into()
        }
    );
}

#[test]
fn vnic_takes_a_name() {
    let res = parse_ok(
        r#"vm "a" { image-url "https://example.com/a.qcow2"; network "vnic" name="vnic0" }"#,
    );
    assert_eq!(
        vm(&res, "a").spec.network,
        Network::Vnic {
            name: "vnic0".into()
        }
    );
    let d = parse_err(r#"vm "a" { image-url "https://example.com/a.qcow2"; network "vnic" }"#);
    assert!(d.render_plain().contains("needs a VNIC name"));
}

#[test]
fn vms_with_one_url_share_one_image() {
    let res = parse_ok(
        r#"
vm "a" { image-url "https://example.com/img/debian.qcow2" }
vm "b" { image-url "https://example.com/img/debian.qcow2" }
vm "c" { image-url "https://example.com/other/debian.qcow2" }
"#,
    );
    let images: Vec<_> = res
        .iter()
        .filter(|r| matches!(r, Resource::Image(_)))
        .collect();
    assert_eq!(images.len(), 2, "two distinct URLs, two Images");
    assert_eq!(vm(&res, "a").spec.image, vm(&res, "b").spec.image);
    assert_ne!(vm(&res, "a").spec.image, vm(&res, "c").spec.image);
    assert!(vm(&res, "a").spec.image.starts_with("debian-qcow2-"));
}

#[test]
fn integers_are_never_truncated() {
    for (src, needle) in [
        ("vcpus 70000", "vcpus 70000 is out of range"),
        ("vcpus 99999999999999999999", "out of range"),
        ("vcpus 0", "vcpus 0 is out of range"),
        ("vcpus -1", "must be positive"),
        ("vcpus 1.5", "must be an integer"),
        (r#"vcpus "2""#, "must be an integer"),
        ("memory 0", "memory (MiB) 0 is out of range"),
        ("disk 0", "disk (GiB) 0 is out of range"),
        (r#"memory "lots""#, "is not a size"),
    ] {
        let d = parse_err(&format!(
            r#"vm "a" {{ image-url "https://example.com/a.qcow2"; {src} }}"#
        ));
        let text = d.render_plain();
        assert!(
            text.contains(needle),
            "{src}: expected {needle:?} in\n{text}"
        );
    }
}

#[test]
fn memory_accepts_unit_strings() {
    let res =
        parse_ok(r#"vm "a" { image-url "https://example.com/a.qcow2"; memory "2G"; disk "20G" }"#);
    assert_eq!(vm(&res, "a").spec.memory_mib, 2048);
    assert_eq!(vm(&res, "a").spec.disk_gib, Some(20));
}

#[test]
fn bad_names_are_rejected_with_located_diagnostics() {
    for name in ["../x", "a/b", "", "Web", &"a".repeat(64)] {
        let src = format!(r#"vm "{name}" {{ image-url "https://example.com/a.qcow2" }}"#);
        let d = parse_err(&src);
        let p = &d.problems[0];
        assert!(p.message.contains("name"), "{name:?}: {}", p.message);
        // The label points at the name string itself.
        assert_eq!(
            &src[p.span.offset()..p.span.offset() + p.span.len()],
            format!("\"{name}\"")
        );
    }
}

#[test]
fn five_mistakes_are_reported_in_one_run() {
    let src = r#"
vm "web" {
    image-url "https://example.com/a.qcow2"
    vcpus 70000
    memry 2048
    network "tapp"
    provision "shell" { }
    provision "file" { source "VMFile.kdl"; destination "relative" }
}
"#;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("VMFile.kdl"), src).unwrap();
    let d = parse("VMFile.kdl", src, &ctx(dir.path())).unwrap_err();
    assert_eq!(d.error_count(), 5, "{}", d.render_plain());
    crate::settings().bind(|| insta::assert_snapshot!("five_mistakes", d.render_plain()));
}

#[test]
fn unknown_nodes_and_properties_suggest_the_right_name() {
    let d = parse_err(
        r#"vm "a" {
    image-url "https://example.com/a.qcow2"
    cloud-init { hostnme "x" }
    network "tap" brige="br0"
}"#,
    );
    let text = d.render_plain();
    assert!(text.contains("did you mean `hostname`?"), "{text}");
    assert!(text.contains("did you mean `bridge`?"), "{text}");
}

#[test]
fn image_sources_are_exactly_one() {
    let both = parse_err(r#"vm "a" { image "/x.qcow2"; image-url "https://example.com/a.qcow2" }"#);
    assert!(both.render_plain().contains("exactly one image source"));
    let none = parse_err(r#"vm "a" { vcpus 1 }"#);
    assert!(none.render_plain().contains("has no image source"));
}

#[test]
fn vm_names_must_be_unique() {
    let d = parse_err(
        r#"vm "a" { image-url "https://example.com/a.qcow2" }
vm "a" { image-url "https://example.com/a.qcow2" }"#,
    );
    assert!(d.render_plain().contains("used twice"));
}

#[test]
fn paths_resolve_against_the_vmfile_dir_and_home() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("scripts")).unwrap();
    std::fs::write(dir.path().join("scripts/setup.sh"), "echo one\n").unwrap();
    let c = ctx(dir.path());
    let src = r#"vm "a" {
    image "~/images/base.qcow2"
    provision "shell" { script "scripts/setup.sh" }
}"#;
    let t = parse("VMFile.kdl", src, &c).unwrap();
    let img = t
        .resources
        .iter()
        .find_map(|r| {
            if let Resource::Image(i) = r {
                Some(i.clone())
            } else {
                None
            }
        })
        .unwrap();
    assert_eq!(
        img.spec.source,
        ImageSource::Path {
            path: "/home/user/images/base.qcow2".into()
        }
    );
    assert!(t.warnings.is_some(), "a missing local image is a warning");
    let prov = t
        .resources
        .iter()
        .find_map(|r| {
            if let Resource::Provision(p) = r {
                Some(p.clone())
            } else {
                None
            }
        })
        .unwrap();
    let ProvisionStep::Shell {
        script: Some(f), ..
    } = &prov.spec.steps[0]
    else {
        panic!()
    };
    assert_eq!(Path::new(&f.path), dir.path().join("scripts/setup.sh"));
}

#[test]
fn editing_a_script_changes_the_provision_spec() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("s.sh");
    let src = r#"vm "a" { image-url "https://example.com/a.qcow2"; provision "shell" { script "s.sh" } }"#;
    std::fs::write(&script, "echo one\n").unwrap();
    let before = parse("VMFile.kdl", src, &ctx(dir.path()))
        .unwrap()
        .resources;
    std::fs::write(&script, "echo two\n").unwrap();
    let after = parse("VMFile.kdl", src, &ctx(dir.path()))
        .unwrap()
        .resources;
    assert_ne!(before, after);
    std::fs::write(&script, "echo one\n").unwrap();
    let again = parse("VMFile.kdl", src, &ctx(dir.path()))
        .unwrap()
        .resources;
    assert_eq!(before, again);
}

#[test]
fn kdl_syntax_errors_are_located() {
    let d = parse_err("vm \"a\" {\n    vcpus 2\n    image-url \"unterminated\n}\n");
    assert!(
        d.problems
            .iter()
            .all(|p| p.code == "vmctl::vmfile::parse_failed")
    );
    assert!(d.problems[0].span.offset() > 0);
}

#[test]
fn examples_translate_as_snapshotted() {
    let root = crate::repo_root().join("examples");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    for dir in dirs {
        let file = dir.join("VMFile.kdl");
        if !file.exists() {
            continue;
        }
        let src = std::fs::read_to_string(&file).unwrap();
        let c = Context {
            base_dir: dir.clone(),
            home: Some("/home/user".into()),
            backend: None,
        };
        let t = parse("VMFile.kdl", &src, &c).unwrap_or_else(|d| panic!("{}", d.render_plain()));
        let name = format!("example_{}", dir.file_name().unwrap().to_string_lossy());
        crate::settings()
            .bind(|| insta::assert_snapshot!(name, vmctl_api::manifest::to_yaml(&t.resources)));
    }
}

#[test]
fn extra_disks_are_read_in_order_beside_the_root_disk_size() {
    let res = parse_ok(
        r#"vm "a" {
    image-url "https://example.com/a.qcow2"
    disk 4
    disk "data" size="10G"
    disk "logs" size=2
}"#,
    );
    let v = vm(&res, "a");
    assert_eq!(v.spec.disk_gib, Some(4));
    let disks: Vec<(&str, u64)> = v
        .spec
        .disks
        .iter()
        .map(|d| (d.name.as_str(), d.size_gib))
        .collect();
    assert_eq!(disks, [("data", 10), ("logs", 2)]);
}

#[test]
fn bad_extra_disks_are_located_errors() {
    for (disk, bad, says) in [
        (r#"disk "data" size="abc""#, r#""abc""#, "not a size"),
        (r#"disk "../x" size="1G""#, r#""../x""#, "escape"),
        (r#"disk "root" size="1G""#, r#""root""#, "root disk"),
        (
            r#"disk "a-very-long-disk-name-x" size="1G""#,
            r#""a-very-long-disk-name-x""#,
            "at most 20",
        ),
        (r#"disk "data" size="0G""#, r#""0G""#, "out of range"),
        (
            r#"disk "data" size="1G" bus="scsi""#,
            r#"bus="scsi""#,
            "unknown property",
        ),
    ] {
        let src =
            format!("vm \"a\" {{\n    image-url \"https://example.com/a.qcow2\"\n    {disk}\n}}");
        let d = parse_err(&src);
        assert_eq!(d.error_count(), 1, "{}", d.render_plain());
        let p = &d.problems[0];
        assert!(p.message.contains(says), "{disk}: {}", p.message);
        assert_eq!(
            &src[p.span.offset()..p.span.offset() + p.span.len()],
            bad,
            "{disk}"
        );
    }
    // The second of two disks with one name is the one pointed at.
    let src = "vm \"a\" {\n    image-url \"https://example.com/a.qcow2\"\n    disk \"data\" size=1\n    disk \"data\" size=2\n}";
    let d = parse_err(src);
    let p = &d.problems[0];
    assert!(
        p.message.contains("second disk named `data`"),
        "{}",
        p.message
    );
    assert_eq!(d.line_col(p.span.offset()).0, 4);
}

/// The text a problem's span covers.
fn spanned<'a>(src: &'a str, p: &vmctl_api::diag::Problem) -> &'a str {
    &src[p.span.offset()..p.span.offset() + p.span.len()]
}

#[test]
fn port_forwards_default_to_tcp_on_loopback_and_take_protocol_and_address() {
    use vmctl_api::{PortForward, Protocol};
    let dir = tempfile::tempdir().unwrap();
    let src = r#"vm "web" {
    image-url "https://example.com/a.qcow2"
    port-forward host=8080 guest=80
    port-forward host=5353 guest=53 protocol="udp"
    port-forward host=9090 guest=90 address="0.0.0.0"
}"#;
    let t = parse("VMFile.kdl", src, &ctx(dir.path())).unwrap();
    let Resource::VirtualMachine(v) = &t.resources[1] else {
        panic!()
    };
    assert_eq!(
        v.spec.port_forwards,
        vec![
            PortForward::tcp(8080, 80),
            PortForward {
                protocol: Protocol::Udp,
                ..PortForward::tcp(5353, 53)
            },
            PortForward {
                address: "0.0.0.0".into(),
                ..PortForward::tcp(9090, 90)
            },
        ]
    );
    // Every interface is taken as written, with a warning at its place.
    let w = t.warnings.expect("a warning for 0.0.0.0");
    assert_eq!(w.problems.len(), 1, "{}", w.render_plain());
    assert_eq!(spanned(src, &w.problems[0]), "\"0.0.0.0\"");
    assert!(
        w.problems[0].message.contains("open to other hosts"),
        "{}",
        w.render_plain()
    );
}

#[test]
fn bad_port_forwards_are_located_errors() {
    let src = r#"vm "web" {
    image-url "https://example.com/a.qcow2"
    port-forward host=70000 guest=80
    port-forward host=8080
    port-forward host=8081 guest=81 protocol="sctp"
    port-forward host=8082 guest=82 address="::1"
    port-forward host=8083 guest=0
}"#;
    let d = parse_err(src);
    let text = d.render_plain();
    assert_eq!(d.error_count(), 5, "{text}");
    let at = |needle: &str| {
        d.problems
            .iter()
            .find(|p| p.message.contains(needle))
            .map(|p| spanned(src, p).to_owned())
            .unwrap_or_else(|| panic!("no `{needle}` in {text}"))
    };
    assert_eq!(at("host port 70000 is out of range"), "70000");
    assert_eq!(at("needs `guest=`"), "port-forward");
    assert_eq!(at("unknown protocol `sctp`"), "\"sctp\"");
    assert_eq!(at("not an IPv4 address"), "\"::1\"");
    assert_eq!(at("guest port 0 is out of range"), "0");
}

#[test]
fn a_host_port_forwarded_twice_in_a_vm_or_across_vms_is_a_located_error() {
    let src = r#"vm "a" {
    image-url "https://example.com/a.qcow2"
    port-forward host=8080 guest=80
    port-forward host=8080 guest=81 address="0.0.0.0"
    port-forward host=8080 guest=82 protocol="udp"
}
vm "b" {
    image-url "https://example.com/a.qcow2"
    port-forward host=8082 guest=80
    port-forward host=8082 guest=80 protocol="udp"
    port-forward host=8080 guest=80
}"#;
    let d = parse_err(src);
    let text = d.render_plain();
    // UDP and TCP on one port do not clash; 0.0.0.0 clashes with 127.0.0.1.
    assert_eq!(d.error_count(), 2, "{text}");
    let twice = d
        .problems
        .iter()
        .find(|p| p.message.contains("forwarded twice"))
        .expect(&text);
    assert_eq!(spanned(src, twice), "8080");
    assert!(twice.span.offset() < src.find("vm \"b\"").unwrap());
    let cross = d
        .problems
        .iter()
        .find(|p| p.message.contains("already forwarded by VM `a`"))
        .expect(&text);
    assert_eq!(spanned(src, cross), "8080");
    assert!(
        cross.span.offset() > src.find("vm \"b\"").unwrap(),
        "{text}"
    );
}

#[test]
fn port_forwards_need_user_networking() {
    let src = r#"vm "a" {
    image-url "https://example.com/a.qcow2"
    network "tap" bridge="br0"
    port-forward host=8080 guest=80
}"#;
    let d = parse_err(src);
    let p = &d.problems[0];
    assert!(
        p.message.contains("need user networking"),
        "{}",
        d.render_plain()
    );
    assert!(p.message.contains("`tap`"), "{}", d.render_plain());
    assert_eq!(spanned(src, p), "port-forward");
}

#[test]
fn docker_port_notation_reads_into_a_forward() {
    use vmctl_api::{PortForward, Protocol};
    let f: PortForward = "8080:80".parse().unwrap();
    assert_eq!(f, PortForward::tcp(8080, 80));
    let f: PortForward = "0.0.0.0:5353:53/udp".parse().unwrap();
    assert_eq!(
        f,
        PortForward {
            address: "0.0.0.0".into(),
            protocol: Protocol::Udp,
            ..PortForward::tcp(5353, 53)
        }
    );
    for bad in [
        "80",
        "8080:80/sctp",
        "x:80",
        "8080:0",
        ":8080:80",
        "8080:80:",
    ] {
        let e = bad.parse::<PortForward>().unwrap_err();
        assert!(e.contains(bad) || e.contains("sctp"), "{bad}: {e}");
    }
}

#[test]
fn display_vnc_is_opt_in_and_refused_on_propolis_at_its_place() {
    use vmctl_api::Display;
    let base = r#"vm "a" { image-url "https://example.com/a.qcow2" }"#;
    assert_eq!(vm(&parse_ok(base), "a").spec.display, Display::None);
    let src = r#"vm "a" {
    image-url "https://example.com/a.qcow2"
    display "vnc"
}"#;
    assert_eq!(vm(&parse_ok(src), "a").spec.display, Display::Vnc);
    let dir = tempfile::tempdir().unwrap();
    let prop = Context {
        backend: Some(vmctl_api::validate::Backend::Propolis),
        ..ctx(dir.path())
    };
    let d = parse("VMFile.kdl", src, &prop).unwrap_err();
    let p = d
        .problems
        .iter()
        .find(|p| p.message.contains("no VNC console"))
        .unwrap_or_else(|| panic!("{}", d.render_plain()));
    assert_eq!(spanned(src, p), "\"vnc\"");
    let d = parse_err(&src.replace("\"vnc\"", "\"spice\""));
    assert!(
        d.problems[0].message.contains("unknown display `spice`"),
        "{}",
        d.render_plain()
    );
}

#[test]
fn readiness_probes_read_exec_and_tcp_in_block_or_property_form() {
    use vmctl_api::{ExecAction, Probe, TcpSocketAction};
    let dir = tempfile::tempdir().unwrap();
    let src = r#"vm "web" {
    image-url "https://example.com/a.qcow2"
    probe "exec" {
        command "systemctl is-active nginx"
        period 5
        timeout 2
    }
    probe "tcp" port=80 failure-threshold=1
}"#;
    let t = parse("VMFile.kdl", src, &ctx(dir.path())).unwrap();
    let Resource::VirtualMachine(v) = &t.resources[1] else {
        panic!()
    };
    let exec = Probe {
        period_seconds: 5,
        timeout_seconds: 2,
        ..Probe::new(
            Some(ExecAction {
                command: "systemctl is-active nginx".into(),
            }),
            None,
        )
    };
    let tcp = Probe {
        failure_threshold: 1,
        ..Probe::new(None, Some(TcpSocketAction { port: 80 }))
    };
    assert_eq!(v.spec.readiness_probes, vec![exec, tcp]);
    // Unset settings take Kubernetes-like defaults.
    assert_eq!(v.spec.readiness_probes[1].period_seconds, 10);
    assert_eq!(v.spec.readiness_probes[1].timeout_seconds, 3);
}

#[test]
fn bad_readiness_probes_are_located_errors() {
    let src = r#"vm "web" {
    image-url "https://example.com/a.qcow2"
    probe "http" port=80
    probe "exec"
    probe "tcp" port=70000
    probe "tcp" command="true" port=22
    probe "exec" command="true" period=0
    probe "exec" { command "true"; perod 3; }
}"#;
    let d = parse_err(src);
    let text = d.render_plain();
    let at = |needle: &str| {
        d.problems
            .iter()
            .find(|p| p.message.contains(needle))
            .map(|p| spanned(src, p).to_owned())
            .unwrap_or_else(|| panic!("no `{needle}` in {text}"))
    };
    assert_eq!(at("unknown probe type `http`"), "\"http\"");
    assert_eq!(at("needs a `command`"), "probe");
    assert_eq!(at("port 70000 is out of range"), "70000");
    assert!(at("`command` is not a setting of a `tcp` probe").contains("command"));
    assert_eq!(at("probe period (s) 0 is out of range"), "0");
    assert_eq!(at("unknown node `perod`"), "perod");
    assert_eq!(d.error_count(), 6, "{text}");
}

#[test]
fn shares_resolve_against_the_vmfile_dir_and_default_to_read_write() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::create_dir(dir.path().join("docs")).unwrap();
    let abs = dir.path().join("docs").display().to_string();
    let src = format!(
        r#"vm "web" {{
    image-url "https://example.com/a.qcow2"
    share "./src" mount="/src"
    share "{abs}" mount="/mnt/docs" read-only=#true
}}"#
    );
    let t = parse("VMFile.kdl", &src, &ctx(dir.path())).unwrap();
    let Resource::VirtualMachine(v) = &t.resources[1] else {
        panic!()
    };
    assert_eq!(
        v.spec.shares,
        vec![
            vmctl_api::Share {
                host_path: dir.path().join("src").display().to_string(),
                mount_path: "/src".into(),
                read_only: false,
            },
            vmctl_api::Share {
                host_path: abs,
                mount_path: "/mnt/docs".into(),
                read_only: true,
            },
        ]
    );
}

#[test]
fn bad_shares_are_located_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::write(dir.path().join("file.txt"), "x").unwrap();
    let src = r#"vm "web" {
    image-url "https://example.com/a.qcow2"
    share "./missing" mount="/m"
    share "./file.txt" mount="/f"
    share "./src" mount="src"
    share "./src" mount="/a"
    share "./src" mount="/a/"
    share "./src"
    share "./src" mount="/b" read-only="yes"
    share "./src" mount="/"
}"#;
    let d = parse("VMFile.kdl", src, &ctx(dir.path())).unwrap_err();
    let text = d.render_plain();
    let at = |needle: &str| {
        d.problems
            .iter()
            .find(|p| p.message.contains(needle))
            .map(|p| spanned(src, p).to_owned())
            .unwrap_or_else(|| panic!("no `{needle}` in {text}"))
    };
    assert_eq!(at("missing does not exist"), "\"./missing\"");
    assert_eq!(at("is a regular file, not a directory"), "\"./file.txt\"");
    assert_eq!(at("mount path `src` is not an absolute path"), "\"src\"");
    assert_eq!(
        at("`/a/` is already the mount path of an earlier share"),
        "\"/a/\"",
        "a duplicate mount path, trailing slash or not"
    );
    assert_eq!(at("needs `mount=`"), "share");
    assert_eq!(at("read-only must be #true or #false"), "\"yes\"");
    assert_eq!(at("the guest's root `/` cannot be a mount path"), "\"/\"");
    assert!(
        text.contains("relative paths are resolved against"),
        "{text}"
    );
    assert_eq!(d.error_count(), 7, "{text}");
}

#[test]
fn placement_reads_node_selector_pin_and_evict_after() {
    let res = parse_ok(
        r#"vm "web" {
    image-url "https://example.com/a.qcow2"
    node-selector {
        zone "a"
        disk "ssd"
        "topology.vmctl.dev/rack" "r-1"
        gpu ""
    }
    node "host-b"
    evict-after 300
}"#,
    );
    let v = vm(&res, "web");
    let selector: Vec<(&str, &str)> = v
        .spec
        .node_selector
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        selector,
        [
            ("disk", "ssd"),
            ("gpu", ""),
            ("topology.vmctl.dev/rack", "r-1"),
            ("zone", "a")
        ]
    );
    assert_eq!(v.spec.node_name.as_deref(), Some("host-b"));
    assert_eq!(v.spec.evict_after_seconds, Some(300));
    // Left out, they stay unset: any node, never re-placed.
    let v = vm(
        &parse_ok(r#"vm "min" { image-url "https://example.com/a.qcow2" }"#),
        "min",
    );
    assert!(v.spec.node_selector.is_empty());
    assert_eq!(v.spec.node_name, None);
    assert_eq!(v.spec.evict_after_seconds, None);
}

#[test]
fn bad_placement_settings_are_located_errors() {
    for (setting, bad, says) in [
        (
            r#"node-selector { "zo ne" "a" }"#,
            r#""zo ne""#,
            "label key `zo ne`",
        ),
        (
            r#"node-selector { -zone "a" }"#,
            "-zone",
            "label key `-zone`",
        ),
        (
            r#"node-selector { "Bad_/zone" "a" }"#,
            r#""Bad_/zone""#,
            "prefix `Bad_`",
        ),
        (
            r#"node-selector { zone "a b" }"#,
            r#""a b""#,
            "label value `a b`",
        ),
        (
            r#"node-selector { zone "-a" }"#,
            r#""-a""#,
            "label value `-a`",
        ),
        (r#"node-selector { zone 3 }"#, "3", "must be a string"),
        ("node-selector { zone }", "zone", "`zone` needs a value"),
        (
            r#"node-selector { zone "a"; zone "b" }"#,
            "zone",
            "`zone` is given twice",
        ),
        (
            r#"node-selector "a" { zone "a" }"#,
            r#""a""#,
            "`node-selector` takes no arguments",
        ),
        (r#"node "Host-B""#, r#""Host-B""#, "uppercase"),
        (r#"node "host_b""#, r#""host_b""#, "contains `_`"),
        (r#"node """#, r#""""#, "1 to 253"),
        ("node 7", "7", "node must be a string"),
        ("node", "node", "`node` needs a value"),
        (
            "evict-after 0",
            "0",
            "evict-after (seconds) 0 is out of range",
        ),
        ("evict-after 9999999999", "9999999999", "is out of range"),
        ("evict-after -5", "-5", "evict-after must be positive"),
        (r#"evict-after "300""#, r#""300""#, "must be an integer"),
        ("evict-after 1.5", "1.5", "must be an integer"),
    ] {
        let src = format!(
            "vm \"a\" {{\n    image-url \"https://example.com/a.qcow2\"\n    {setting}\n}}"
        );
        let d = parse_err(&src);
        let text = d.render_plain();
        assert_eq!(d.error_count(), 1, "{setting}: {text}");
        let p = &d.problems[0];
        assert!(p.message.contains(says), "{setting}: {}", p.message);
        assert_eq!(spanned(&src, p), bad, "{setting}");
        // On the setting's own line, with what to do.
        assert_eq!(d.line_col(p.span.offset()).0, 3, "{setting}");
        assert!(p.help.is_some(), "{setting}: no help in {text}");
    }
    // A second `node-selector` block, `node` or `evict-after` is refused
    // like any other setting given twice.
    for twice in [
        "node-selector { zone \"a\" }\n    node-selector { disk \"ssd\" }",
        "node \"a\"\n    node \"b\"",
        "evict-after 1\n    evict-after 2",
    ] {
        let src =
            format!("vm \"a\" {{\n    image-url \"https://example.com/a.qcow2\"\n    {twice}\n}}");
        let d = parse_err(&src);
        assert_eq!(d.error_count(), 1, "{}", d.render_plain());
        assert!(d.problems[0].message.contains("is given twice"));
        assert_eq!(d.line_col(d.problems[0].span.offset()).0, 4, "{twice}");
    }
}
