//! YAML/JSON manifests: same validation, and manifest → YAML → manifest is identity.

use std::collections::BTreeMap;

use proptest::prelude::*;
use vmctl_api::manifest::{parse, to_yaml};
use vmctl_api::resources::*;

#[test]
fn manifests_go_through_the_same_validation() {
    let src = r#"apiVersion: vmctl/v1alpha1
kind: VirtualMachine
metadata:
  name: ../x
spec:
  image: base
  vcpus: 70000
---
apiVersion: vmctl/v1alpha1
kind: Gadget
metadata:
  name: g
spec: {}
"#;
    let d = parse("bad.yaml", src).unwrap_err();
    let text = d.render_plain();
    assert!(text.contains("metadata.name"), "{text}");
    assert!(text.contains("vcpus 70000 is out of range"), "{text}");
    assert!(text.contains("unknown kind `Gadget`"), "{text}");
    crate::settings().bind(|| insta::assert_snapshot!("manifest_errors", text));
}

#[test]
fn manifest_placement_fields_are_validated_at_their_field() {
    let good = r#"apiVersion: vmctl/v1alpha1
kind: VirtualMachine
metadata:
  name: web
spec:
  image: base
  nodeSelector:
    zone: a
    topology.vmctl.dev/rack: r-1
    gpu: ""
  nodeName: host-b
  evictAfterSeconds: 300
"#;
    let (res, _) = parse("vm.yaml", good).unwrap_or_else(|d| panic!("{}", d.render_plain()));
    let Resource::VirtualMachine(v) = &res[0] else {
        panic!()
    };
    assert_eq!(v.spec.node_selector["zone"], "a");
    assert_eq!(v.spec.node_selector["topology.vmctl.dev/rack"], "r-1");
    assert_eq!(v.spec.node_selector["gpu"], "");
    assert_eq!(v.spec.node_name.as_deref(), Some("host-b"));
    assert_eq!(v.spec.evict_after_seconds, Some(300));
    for (from, to, says, at) in [
        (
            "zone: a",
            "\"zo ne\": a",
            "spec.nodeSelector.zo ne: label key `zo ne`",
            "\"zo ne\"",
        ),
        (
            "zone: a",
            "zone: a b",
            "spec.nodeSelector.zone: label value `a b` (of `zone`)",
            "zone:",
        ),
        (
            "nodeName: host-b",
            "nodeName: Host_B",
            "spec.nodeName: node name `Host_B` contains an uppercase letter",
            "nodeName:",
        ),
        (
            "evictAfterSeconds: 300",
            "evictAfterSeconds: 0",
            "spec.evictAfterSeconds: evict-after (seconds) 0 is out of range",
            "evictAfterSeconds:",
        ),
    ] {
        let bad = good.replace(from, to);
        let d = parse("vm.yaml", &bad).unwrap_err();
        let text = d.render_plain();
        assert_eq!(d.error_count(), 1, "{to}: {text}");
        let p = &d.problems[0];
        assert!(p.message.contains(says), "{to}: {text}");
        assert!(p.help.is_some(), "{to}: no help in {text}");
        // Located at the field, not at the top of the document.
        assert_eq!(p.span.offset(), bad.find(at).unwrap(), "{to}: {text}");
    }
    // A negative or a string is no number of seconds; a key given twice
    // is refused by the YAML reader.
    for (from, to, says) in [
        (
            "evictAfterSeconds: 300",
            "evictAfterSeconds: -5",
            "spec.evictAfterSeconds: invalid type: integer `-5`",
        ),
        (
            "evictAfterSeconds: 300",
            "evictAfterSeconds: soon",
            "spec.evictAfterSeconds: invalid type: string \"soon\"",
        ),
        (
            "    gpu: \"\"",
            "    gpu: \"\"\n    zone: b",
            "spec.nodeSelector: duplicate entry with key \"zone\"",
        ),
    ] {
        let d = parse("vm.yaml", &good.replace(from, to)).unwrap_err();
        let text = d.render_plain();
        assert_eq!(d.error_count(), 1, "{to}: {text}");
        assert!(d.problems[0].message.contains(says), "{to}: {text}");
    }
}

#[test]
fn a_host_port_forwarded_by_two_vms_of_a_manifest_is_located_at_the_second() {
    let src = r#"apiVersion: vmctl/v1alpha1
kind: VirtualMachine
metadata:
  name: a
spec:
  image: base
  portForwards:
  - hostPort: 8080
    guestPort: 80
---
apiVersion: vmctl/v1alpha1
kind: VirtualMachine
metadata:
  name: b
spec:
  image: base
  portForwards:
  - hostPort: 8081
    guestPort: 80
  - hostPort: 8080
    guestPort: 81
    protocol: TCP
"#;
    let d = parse("vms.yaml", src).unwrap_err();
    let text = d.render_plain();
    assert_eq!(d.error_count(), 1, "{text}");
    let p = &d.problems[0];
    assert!(
        p.message.contains(
            "spec.portForwards[1].hostPort: host port 8080/tcp is already forwarded by VM `a`"
        ),
        "{text}"
    );
    // At the second entry's `hostPort` of VM b, not the first.
    let second = src.rfind("hostPort: 8080").unwrap();
    assert_eq!(p.span.offset(), second, "{text}");
    // Without the clash, the forwards read with their defaults.
    let (res, _) = parse(
        "vms.yaml",
        &src.replace(
            "hostPort: 8080\n    guestPort: 81",
            "hostPort: 8082\n    guestPort: 81",
        ),
    )
    .unwrap();
    let Resource::VirtualMachine(b) = &res[1] else {
        panic!()
    };
    assert_eq!(b.spec.port_forwards[1], PortForward::tcp(8082, 81));
}

#[test]
fn manifest_shares_need_an_existing_absolute_host_folder_and_distinct_mount_paths() {
    let dir = tempfile::tempdir().unwrap();
    let src_dir = dir.path().join("src");
    std::fs::create_dir(&src_dir).unwrap();
    let ok = format!(
        r#"apiVersion: vmctl/v1alpha1
kind: VirtualMachine
metadata:
  name: a
spec:
  image: base
  shares:
  - hostPath: {src}
    mountPath: /src
    readOnly: true
"#,
        src = src_dir.display()
    );
    let (res, _) = parse("vm.yaml", &ok).unwrap();
    let Resource::VirtualMachine(a) = &res[0] else {
        panic!()
    };
    assert_eq!(
        a.spec.shares,
        vec![Share {
            host_path: src_dir.display().to_string(),
            mount_path: "/src".into(),
            read_only: true,
        }]
    );
    let bad = format!(
        r#"apiVersion: vmctl/v1alpha1
kind: VirtualMachine
metadata:
  name: a
spec:
  image: base
  shares:
  - hostPath: {src}
    mountPath: /src
  - hostPath: {missing}
    mountPath: /m
  - hostPath: relative/dir
    mountPath: /r
  - hostPath: {src}
    mountPath: /src
"#,
        src = src_dir.display(),
        missing = dir.path().join("missing").display()
    );
    let d = parse("vm.yaml", &bad).unwrap_err();
    let text = d.render_plain();
    let at = |needle: &str| {
        let p = d
            .problems
            .iter()
            .find(|p| p.message.contains(needle))
            .unwrap_or_else(|| panic!("no `{needle}` in {text}"));
        &bad[p.span.offset()..p.span.offset() + p.span.len()]
    };
    // Each at its own entry's key.
    assert_eq!(at("missing does not exist"), "hostPath:");
    assert!(
        bad[..bad
            .find(&format!("{}", dir.path().join("missing").display()))
            .unwrap()]
            .ends_with("hostPath: ")
    );
    assert_eq!(at("`relative/dir` is not an absolute path"), "hostPath:");
    assert_eq!(
        at("`/src` is already the mount path of an earlier share"),
        "mountPath:"
    );
    let dup = d
        .problems
        .iter()
        .find(|p| p.message.contains("an earlier share"))
        .unwrap();
    assert_eq!(
        dup.span.offset(),
        bad.rfind("mountPath: /src").unwrap(),
        "{text}"
    );
    assert_eq!(d.error_count(), 3, "{text}");
}

#[test]
fn unknown_fields_are_rejected() {
    let src = "apiVersion: vmctl/v1alpha1\nkind: Image\nmetadata: {name: a}\nspec:\n  source: {url: 'https://e.com/a.img'}\n  chksum: x\n";
    let d = parse("x.yaml", src).unwrap_err();
    assert!(d.render_plain().contains("chksum"), "{}", d.render_plain());
}

/// The fault: `vmctl get KIND -o json|yaml` prints a `List` (as kubectl
/// does), which `apply -f` must read back as its items, not reject as an
/// unknown kind.
#[test]
fn a_list_from_get_is_read_as_its_items() {
    let vm = "{apiVersion: vmctl/v1alpha1, kind: VirtualMachine, metadata: {name: web}, spec: {image: base}}";
    let img = "{apiVersion: vmctl/v1alpha1, kind: Image, metadata: {name: base}, spec: {source: {url: 'https://e.com/a.img'}}}";
    let src = format!(
        "apiVersion: vmctl/v1alpha1\nkind: List\nmetadata: {{resourceVersion: 7}}\nitems:\n- {vm}\n- {img}\n"
    );
    let (res, _) = parse("list.yaml", &src).unwrap();
    let names: Vec<&str> = res.iter().map(|r| r.name()).collect();
    assert_eq!(names, ["web", "base"]);
    // In JSON too, and an empty List is no objects.
    let json = r#"{"apiVersion": "v1", "kind": "List", "items": []}"#;
    assert!(parse("list.json", json).unwrap().0.is_empty());
    // Its items go through the same validation.
    let bad = src.replace("name: web", "name: ../x");
    let d = parse("list.yaml", &bad).unwrap_err();
    assert!(
        d.render_plain().contains("metadata.name"),
        "{}",
        d.render_plain()
    );
    // Items that are not a list are a located error.
    let d = parse("list.yaml", "kind: List\nitems: 3\n").unwrap_err();
    let text = d.render_plain();
    assert!(text.contains("`items` of a List are not a list"), "{text}");
    assert!(text.contains("2 │ items: 3"), "{text}");
}

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,20}[a-z0-9]"
}

fn local_file() -> impl Strategy<Value = LocalFile> {
    ("/[a-z]{1,8}/[a-z]{1,8}", "[0-9a-f]{64}").prop_map(|(path, d)| LocalFile {
        path,
        digest: Some(format!("sha256:{d}")),
    })
}

fn vm() -> impl Strategy<Value = Resource> {
    (
        name(),
        name(),
        1u32..=255,
        1u64..=65536,
        proptest::option::of(1u64..=1000),
        prop_oneof![
            Just(Network::User),
            Just(Network::None),
            name().prop_map(|b| Network::Tap {
                bridge: b
                    .chars()
                    .take(15)
                    .collect::<String>()
                    .trim_end_matches('-')
                    .to_owned()
            }),
        ],
        proptest::option::of((
            proptest::option::of(name()),
            proptest::option::of(local_file()),
        )),
        proptest::option::of(("[a-z_][a-z0-9_]{0,10}", proptest::option::of(1u32..=3600))),
        prop_oneof![
            Just(PowerState::Running),
            Just(PowerState::Stopped),
            Just(PowerState::Suspended)
        ],
        placement(),
    )
        .prop_map(
            |(n, image, vcpus, memory_mib, disk_gib, network, ci, ssh, power_state, placement)| {
                let (node_selector, node_name, evict_after_seconds) = placement;
                Resource::VirtualMachine(VirtualMachine::new(
                    n,
                    VirtualMachineSpec {
                        image,
                        vcpus,
                        memory_mib,
                        disk_gib,
                        network,
                        cloud_init: ci.map(|(hostname, ssh_key)| CloudInit {
                            hostname,
                            ssh_key,
                            user_data: None,
                        }),
                        ssh: ssh.map(|(user, timeout_seconds)| SshConfig {
                            user,
                            private_key: None,
                            timeout_seconds,
                        }),
                        power_state,
                        update_policy: UpdatePolicy::RestartRequired,
                        stop_timeout_seconds: None,
                        disks: Vec::new(),
                        port_forwards: Vec::new(),
                        display: Display::None,
                        readiness_probes: Vec::new(),
                        shares: Vec::new(),
                        node_selector,
                        node_name,
                        evict_after_seconds,
                    },
                ))
            },
        )
}

/// `nodeSelector`, `nodeName` and `evictAfterSeconds` (issue 17), valid
/// ones: keys with and without a prefix, empty values, values that YAML
/// would read as numbers or booleans if they were not quoted.
fn placement() -> impl Strategy<Value = (BTreeMap<String, String>, Option<String>, Option<u64>)> {
    let key = prop_oneof![
        "[a-z][a-z0-9_.-]{0,10}[a-z0-9]",
        "[a-z]{1,8}\\.vmctl\\.dev/[a-z]{1,8}",
    ];
    let value = prop_oneof![
        "[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,10}[a-zA-Z0-9])?",
        Just(String::new()),
        Just("true".to_owned()),
        Just("1e3".to_owned()),
        Just("0x1f".to_owned()),
    ];
    (
        proptest::collection::btree_map(key, value, 0..4),
        proptest::option::of(name()),
        proptest::option::of(1u64..=30 * 24 * 3600),
    )
}

fn image() -> impl Strategy<Value = Resource> {
    (
        name(),
        prop_oneof![
            "/[a-z]{1,8}/[a-z]{1,8}\\.qcow2".prop_map(|path| ImageSource::Path { path }),
            "https://[a-z]{1,8}\\.com/[a-z]{1,8}\\.img".prop_map(|url| ImageSource::Url { url }),
        ],
        proptest::option::of("[0-9a-f]{64}".prop_map(|h| format!("sha256:{h}"))),
    )
        .prop_map(|(n, source, checksum)| {
            Resource::Image(Image::new(n, ImageSpec { source, checksum }))
        })
}

fn provision() -> impl Strategy<Value = Resource> {
    let step = prop_oneof![
        ".{0,40}".prop_map(|s| ProvisionStep::Shell {
            inline: Some(s),
            script: None
        }),
        local_file().prop_map(|f| ProvisionStep::Shell {
            inline: None,
            script: Some(f)
        }),
        (local_file(), "/[a-z]{1,8}/[a-z.]{1,8}").prop_map(|(source, destination)| {
            ProvisionStep::File {
                source,
                destination,
            }
        }),
    ];
    (name(), proptest::collection::vec(step, 1..5)).prop_map(|(n, steps)| {
        Resource::Provision(Provision::new(
            n.clone(),
            ProvisionSpec {
                vm: n,
                steps,
                run_token: None,
            },
        ))
    })
}

proptest! {
    #[test]
    fn manifest_to_yaml_to_manifest_is_identity(
        resources in proptest::collection::vec(prop_oneof![vm(), image(), provision()], 1..6)
    ) {
        let yaml = to_yaml(&resources);
        let (back, _warnings) = parse("gen.yaml", &yaml).map_err(|d| TestCaseError::fail(d.render_plain()))?;
        prop_assert_eq!(back, resources);
    }
}
