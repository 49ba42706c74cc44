//! Seeds built by every available tool, read back by isoinfo, xorriso,
//! blkid and the pure-Rust reader.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use super::*;

fn spec(keys: &VmKeys) -> SeedSpec {
    SeedSpec {
        instance_id: "web-1-0f9c2a".into(),
        hostname: "web-1".into(),
        user: "dev".into(),
        authorized_keys: vec![keys.user.public_openssh.clone()],
        host_key: Some(keys.host.to_host_key()),
        raw_user_data: None,
        network_config: Some("version: 2\nethernets:\n  eth0:\n    dhcp4: true\n".into()),
        bootcmd: Vec::new(),
    }
}

/// Runs a program if installed: `None` (with a note) when it is not.
fn run(program: &str, args: &[&str]) -> Option<Vec<u8>> {
    let Some(path) = find_in_path(program) else {
        eprintln!("note: {program} not installed; skipping that check");
        return None;
    };
    let out = Command::new(path).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(out.stdout)
}

/// Checks an image with every reader there is.
fn check_seed(iso: &Path, files: &[(&str, Vec<u8>)], tool: SeedTool) {
    let mode = fs::metadata(iso).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{tool}: the seed holds a private key");
    let p = iso.to_str().unwrap();

    if let Some(label) = run("blkid", &["-o", "value", "-s", "LABEL", p]) {
        assert_eq!(
            String::from_utf8(label).unwrap().trim(),
            "cidata",
            "{tool}: blkid"
        );
    }
    if let Some(info) = run("isoinfo", &["-d", "-i", p]) {
        let info = String::from_utf8(info).unwrap();
        assert!(info.contains("Volume id: cidata"), "{tool}: {info}");
        assert!(
            info.contains("Rock Ridge signatures version 1 found"),
            "{tool}: {info}"
        );
        assert!(
            info.contains("Joliet with UCS level 3 found"),
            "{tool}: {info}"
        );
        let listing = String::from_utf8(run("isoinfo", &["-R", "-l", "-i", p]).unwrap()).unwrap();
        for (name, data) in files {
            assert!(
                listing
                    .lines()
                    .any(|l| l.trim_end().ends_with(&format!("]  {name}"))),
                "{tool}: {name} not in\n{listing}"
            );
            let path = format!("/{name}");
            let rr = run("isoinfo", &["-R", "-x", &path, "-i", p]).unwrap();
            assert!(&rr == data, "{tool}: Rock Ridge contents of {name}");
            let joliet = run("isoinfo", &["-J", "-x", &path, "-i", p]).unwrap();
            assert!(&joliet == data, "{tool}: Joliet contents of {name}");
        }
    }
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("x");
    if run(
        "xorriso",
        &[
            "-osirrox",
            "on",
            "-indev",
            p,
            "-extract",
            "/",
            dest.to_str().unwrap(),
        ],
    )
    .is_some()
    {
        let mut names: Vec<String> = fs::read_dir(&dest)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut want: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
        want.sort();
        assert_eq!(names, want, "{tool}: xorriso sees");
        for (name, data) in files {
            assert_eq!(
                &fs::read(dest.join(name)).unwrap(),
                data,
                "{tool}: xorriso {name}"
            );
        }
    }
}

fn build_and_check(tool: SeedTool) {
    if !tool.is_available() {
        eprintln!("note: {tool} not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = ensure_vm_keys(&dir.path().join("keys"), "vmctl@web-1").unwrap();
    let spec = spec(&keys);
    let out = dir.path().join("seed.iso");
    assert_eq!(build_seed(&spec, &out, tool).unwrap(), tool);
    let files = spec.files();
    assert_eq!(
        files.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        ["user-data", "meta-data", "network-config"]
    );
    check_seed(&out, &files, tool);
    if tool == SeedTool::PureRust {
        let v = iso9660::read::read(&fs::read(&out).unwrap()).unwrap();
        assert_eq!(v.label, "cidata");
        assert!(v.rock_ridge_announced);
        let mut want = files.clone();
        want.sort();
        let got: Vec<(&str, &[u8])> = v
            .rock_ridge
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        let want: Vec<(&str, &[u8])> = want.iter().map(|(n, d)| (*n, d.as_slice())).collect();
        assert_eq!(got, want);
    }
    // Rebuilding replaces the seed in place and leaves nothing behind.
    build_seed(&spec, &out, tool).unwrap();
    let mut left: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["keys", "seed.iso"]);
}

#[test]
fn seed_built_by_genisoimage_reads_back() {
    build_and_check(SeedTool::Genisoimage);
}

#[test]
fn seed_built_by_mkisofs_reads_back() {
    build_and_check(SeedTool::Mkisofs);
}

#[test]
fn seed_built_by_xorriso_reads_back() {
    build_and_check(SeedTool::Xorriso);
}

#[test]
fn seed_built_by_pure_rust_writer_reads_back() {
    build_and_check(SeedTool::PureRust);
}

#[test]
fn auto_uses_the_detected_tool() {
    let dir = tempfile::tempdir().unwrap();
    let keys = ensure_vm_keys(dir.path(), "c").unwrap();
    let used = build_seed(&spec(&keys), &dir.path().join("s.iso"), SeedTool::Auto).unwrap();
    assert_eq!(used, SeedTool::detect());
}

#[test]
fn generated_user_data_with_real_keys_matches_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let keys = ensure_vm_keys(dir.path(), "vmctl@web-1").unwrap();
    let yaml = user_data(&spec(&keys));
    insta::with_settings!({prepend_module_to_snapshot => false, filters => vec![
        (r"AAAAC3NzaC1lZDI1NTE5AAAAI[A-Za-z0-9+/=]+", "[PUBKEY]"),
        (r"(?m)^    [A-Za-z0-9+/=]{1,70}\n", ""),
    ]}, {
        insta::assert_snapshot!("user_data_real_keys", yaml);
    });
}

#[test]
fn raw_user_data_passes_through_and_vendor_data_pins_the_host_key() {
    let dir = tempfile::tempdir().unwrap();
    let keys = ensure_vm_keys(dir.path(), "c").unwrap();
    let raw = b"#!/bin/sh\necho hello > /tmp/hello\n".to_vec();
    let spec = SeedSpec {
        raw_user_data: Some(raw.clone()),
        network_config: None,
        user: String::new(),
        ..spec(&keys)
    };
    let files = spec.files();
    assert_eq!(files[0], ("user-data", raw));
    assert_eq!(files[2].0, "vendor-data");
    let vendor = String::from_utf8(files[2].1.clone()).unwrap();
    assert!(vendor.contains(&keys.host.public_openssh));
    let out = dir.path().join("seed.iso");
    build_seed(&spec, &out, SeedTool::PureRust).unwrap();
    check_seed(&out, &files, SeedTool::PureRust);
}

#[test]
fn seed_holds_the_host_key_that_known_hosts_pins() {
    let dir = tempfile::tempdir().unwrap();
    let keys = ensure_vm_keys(dir.path(), "c").unwrap();
    let yaml = user_data(&spec(&keys));
    let line = keys.host.known_hosts_line("127.0.0.1", 2222);
    let pinned = line.split_whitespace().nth(2).unwrap();
    let public = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("ed25519_public: "))
        .unwrap();
    assert!(public.contains(pinned));
    for l in keys.host.private_openssh.lines() {
        assert!(yaml.contains(&format!("    {l}\n")));
    }
}

#[test]
fn invalid_specs_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let keys = ensure_vm_keys(dir.path(), "c").unwrap();
    let cases: Vec<(&str, SeedSpec)> = vec![
        (
            "instance id",
            SeedSpec {
                instance_id: "".into(),
                ..spec(&keys)
            },
        ),
        (
            "instance id",
            SeedSpec {
                instance_id: "a b".into(),
                ..spec(&keys)
            },
        ),
        (
            "hostname",
            SeedSpec {
                hostname: "web_1".into(),
                ..spec(&keys)
            },
        ),
        (
            "hostname",
            SeedSpec {
                hostname: "-web".into(),
                ..spec(&keys)
            },
        ),
        (
            "user",
            SeedSpec {
                user: "Root".into(),
                ..spec(&keys)
            },
        ),
        (
            "user",
            SeedSpec {
                user: "".into(),
                ..spec(&keys)
            },
        ),
        (
            "authorized key",
            SeedSpec {
                authorized_keys: vec!["a\nb".into()],
                ..spec(&keys)
            },
        ),
    ];
    let out = dir.path().join("seed.iso");
    for (field, s) in cases {
        let err = build_seed(&s, &out, SeedTool::PureRust).unwrap_err();
        assert!(
            matches!(err, SeedError::Invalid { field: f, .. } if f == field),
            "{err}"
        );
        assert_eq!(err.code(), INVALID_SEED);
    }
    assert!(!out.exists());
    assert!(
        SeedSpec {
            hostname: "a.b-c.d".into(),
            ..spec(&keys)
        }
        .validate()
        .is_ok()
    );
}

#[test]
fn missing_tool_is_reported_with_help() {
    let err = SeedError::ToolMissing {
        tool: SeedTool::Xorriso,
    };
    assert_eq!(err.to_string(), "xorriso is not installed");
    assert_eq!(err.code(), ISO_FAILED);
    assert!(err.help().unwrap().contains("builtin"));
}
