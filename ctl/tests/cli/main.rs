//! The `vmctl` binary as a user runs it.

#[path = "../common/agent_program.rs"]
mod agent_program;
pub use agent_program::vmctl_bin;
mod agent;
mod client;
mod commands;
mod etcd;
mod finalizers;
mod images;
mod large_apply;
mod nodes;
mod parser_faults;
mod propolis;
mod ready;
mod separate_agent;
mod socket;
mod tls;
mod tunnel;
mod watch_mode;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn vmctl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(crate::vmctl_bin());
    cmd.args(args).current_dir(repo()).env("NO_COLOR", "1");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(s) = stdin {
        use std::io::Write;
        // A command that fails before reading its input (`apply -f - --prune`)
        // closes it: a broken pipe then is no failure of the test (it was, by
        // a race, whenever vmctl exited before the write).
        if let Err(e) = child.stdin.take().unwrap().write_all(s.as_bytes()) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
    }
    child.wait_with_output().unwrap()
}

fn example_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![repo().join("examples")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("kdl" | "yaml" | "yml" | "json")
            ) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_example_validates() {
    let files = example_files();
    assert!(files.len() >= 6, "examples/ lost files: {files:?}");
    for f in files {
        let out = vmctl(&["validate", "-f", f.to_str().unwrap()], None);
        assert!(
            out.status.success(),
            "{} failed:\n{}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("is valid"));
    }
}

#[test]
fn validate_rejects_bad_files_with_located_diagnostics() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("VMFile.kdl");
    std::fs::write(
        &f,
        "vm \"web\" {\n    image-url \"https://example.com/a.qcow2\"\n    vcpus 70000\n}\n",
    )
    .unwrap();
    let out = vmctl(&["validate", "-f", f.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vcpus 70000 is out of range"), "{err}");
    assert!(
        err.contains("VMFile.kdl:3:11"),
        "the diagnostic names file, line and column: {err}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout for an invalid file"
    );
}

#[test]
fn validate_json_reports_lines_and_columns() {
    let out = vmctl(
        &["validate", "-o", "json", "-f", "-"],
        Some("vm \"a\" {\n  vcpus 0\n}\n"),
    );
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    let problems = v["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p["line"] == 2 && p["message"].as_str().unwrap().contains("vcpus 0"))
    );
}

#[test]
fn missing_vmfile_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(crate::vmctl_bin())
        .arg("validate")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vmctl::vmfile::not_found") && err.contains("VMFile.kdl not found"),
        "{err}"
    );
}

#[test]
fn convert_output_is_a_manifest_that_validates_again() {
    let files = [
        "examples/multi-vm/VMFile.kdl",
        // nodeSelector, nodeName and evictAfterSeconds survive the trip.
        "examples/placement/VMFile.kdl",
    ];
    for (file, fmt) in files
        .iter()
        .flat_map(|f| ["yaml", "json"].map(|fmt| (*f, fmt)))
    {
        let out = vmctl(&["convert", "-f", file, "-o", fmt], None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        if file.contains("placement") {
            for field in [
                "nodeSelector",
                "topology.vmctl.dev/rack",
                "nodeName",
                "evictAfterSeconds",
            ] {
                assert!(text.contains(field), "{field} not in ({fmt}):\n{text}");
            }
        }
        let back = vmctl(&["convert", "-f", "-", "-o", fmt], Some(&text));
        assert!(
            back.status.success(),
            "{}",
            String::from_utf8_lossy(&back.stderr)
        );
        assert_eq!(
            String::from_utf8(back.stdout).unwrap(),
            text,
            "convert is stable on its own output ({fmt})"
        );
    }
}

#[test]
fn convert_shares_one_image_between_two_vms() {
    let out = vmctl(
        &[
            "convert",
            "-f",
            "examples/multi-vm/VMFile.kdl",
            "-o",
            "json",
        ],
        None,
    );
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = v.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "Image").count(), 1);
    assert_eq!(kinds.iter().filter(|k| **k == "VirtualMachine").count(), 2);
    assert_eq!(kinds.iter().filter(|k| **k == "Provision").count(), 2);
}

#[test]
fn schema_prints_the_checked_in_schema() {
    for (arg, file) in [
        ("vm", "vm"),
        ("Image", "image"),
        ("provisions", "provision"),
    ] {
        let out = vmctl(&["schema", arg], None);
        assert!(out.status.success());
        let want =
            std::fs::read_to_string(repo().join(format!("schemas/{file}.schema.json"))).unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), want);
    }
    let bad = vmctl(&["schema", "gadget"], None);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown kind `gadget`"));
}

#[test]
fn completions_and_man_page_come_from_the_clap_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let out = vmctl(&["completions", shell], None);
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains("apply") && text.contains("validate"),
            "{shell}"
        );
    }
    let man = vmctl(&["man"], None);
    let text = String::from_utf8(man.stdout).unwrap();
    assert!(
        text.starts_with(".ie") && text.contains(".TH vmctl 1"),
        "{text}"
    );
}

#[test]
fn every_command_has_help() {
    let out = vmctl(&["--help"], None);
    let text = String::from_utf8(out.stdout).unwrap();
    for cmd in [
        "validate",
        "convert",
        "schema",
        "agent",
        "apply",
        "get",
        "describe",
        "delete",
        "diff",
        "history",
        "events",
        "ssh",
        "exec",
        "cp",
        "log",
        "provision",
        "image",
        "create",
        "start",
        "stop",
        "suspend",
        "resume",
        "destroy",
        "list",
        "status",
        "up",
        "down",
        "reload",
        "console",
        "completions",
        "man",
    ] {
        assert!(
            text.contains(&format!("  {cmd} ")),
            "`{cmd}` missing from --help:\n{text}"
        );
        let sub = vmctl(&[cmd, "--help"], None);
        assert!(sub.status.success(), "{cmd} --help");
    }
}
