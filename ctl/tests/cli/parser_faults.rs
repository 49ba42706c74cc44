//! Faults of issue 18 (items 1–4) through the real `vmctl` binary:
//! `validate`, `convert` and `apply --dry-run` on each input end at once
//! with exit 1, a located message and bounded output, never a panic, an
//! abort or a hang.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `vmctl ARGS` with no agent (none is needed to reject a file),
/// killing it after 60 s so that a hang fails the test instead of stalling it.
fn run(data: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(crate::vmctl_bin())
        .args(["--no-autostart", "--data-dir"])
        .arg(data)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("vmctl {args:?} still runs after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Every command that loads a file rejects `name` (with content `src`)
/// with exit 1, `want` in its diagnostics and at most `max_bytes` of them.
fn rejected_everywhere(name: &str, src: &str, want: &str, max_bytes: usize) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join(name);
    std::fs::write(&f, src).unwrap();
    let f = f.to_str().unwrap();
    let data = dir.path().join("data");
    for args in [
        &["validate", "-f", f][..],
        &["convert", "-f", f],
        &["apply", "--dry-run", "-f", f],
    ] {
        let out = run(&data, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked") && !err.contains("overflowed"),
            "{args:?}:\n{err}"
        );
        assert_eq!(out.status.code(), Some(1), "{args:?}:\n{err}");
        assert!(err.contains(want), "{args:?}: no `{want}` in:\n{err}");
        assert!(
            err.len() <= max_bytes,
            "{args:?}: {} bytes of diagnostics",
            err.len()
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn cli_parser_malformed_nesting_is_not_exponential() {
    // Sixteen lines took more than a minute and printed ~16 MB.
    let src = format!("vm \"web\" {{\n{}", "provision /-{\n".repeat(16));
    rejected_everywhere("VMFile.kdl", &src, "VMFile.kdl:1:10", 16_000);
    rejected_everywhere("VMFile.kdl", &src, "this block is never closed", 16_000);
}

#[test]
fn cli_parser_deep_nesting_exits_1_instead_of_overflowing_the_stack() {
    // 1,300 `a{` aborted with exit 134.
    rejected_everywhere(
        "VMFile.kdl",
        &"a{\n".repeat(1_300),
        "blocks are nested too deeply (more than 32 levels)",
        2_000,
    );
    rejected_everywhere(
        "VMFile.kdl",
        &"a{\n".repeat(1_300),
        "VMFile.kdl:33:2",
        2_000,
    );
    for (name, src) in [
        (
            "deep.json",
            format!("{}{}", "[".repeat(40_000), "]".repeat(40_000)),
        ),
        (
            "deep.yaml",
            format!("kind: Image\nspec: {}\n", "[".repeat(40_000)),
        ),
    ] {
        let started = Instant::now();
        rejected_everywhere(name, &src, "nested too deeply", 2_000);
        // 7–11 s before, for each of the three runs.
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{name}: {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn cli_diagnostics_long_line_does_not_panic() {
    // Exit 101, "Formatting argument out of range".
    rejected_everywhere(
        "VMFile.kdl",
        &format!("{}x\n", " ".repeat(65_536)),
        "VMFile.kdl:1:65537",
        2_000,
    );
}

#[test]
fn cli_diagnostics_flood_is_bounded() {
    // `vm "db" {` 1,000 times: 13.7 s and 13.6 MB on stderr.
    rejected_everywhere(
        "VMFile.kdl",
        &"vm \"db\" {\n".repeat(1_000),
        "nested too deeply",
        2_000,
    );
    let dup = "vm \"db\" { image-url \"https://example.com/a.qcow2\" }\n".repeat(1_000);
    rejected_everywhere("VMFile.kdl", &dup, "… and 979 more", 30_000);
    rejected_everywhere(
        "VMFile.kdl",
        &dup,
        "VMFile.kdl is invalid: 999 errors",
        30_000,
    );
}

#[test]
fn cli_validate_json_output_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("VMFile.kdl");
    std::fs::write(
        &f,
        "vm \"db\" { image-url \"https://example.com/a.qcow2\" }\n".repeat(1_000),
    )
    .unwrap();
    let out = run(
        &dir.path().join("data"),
        &["validate", "-o", "json", "-f", f.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(
        v["problems"].as_array().unwrap().len(),
        vmctl_api::limits::MAX_PROBLEMS
    );
    assert_eq!(v["omitted"], 999 - vmctl_api::limits::MAX_PROBLEMS);
    assert!(out.stdout.len() < 30_000);
}

#[test]
fn cli_vmfile_named_device_or_fifo_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    for (step, want) in [
        (
            "provision \"shell\" { script \"/dev/zero\"; }".to_owned(),
            "script /dev/zero is a character device, not a regular file",
        ),
        (
            format!(
                "provision \"file\" {{ source \"{}\"; destination \"/x\"; }}",
                fifo.display()
            ),
            "is a FIFO (named pipe), not a regular file",
        ),
        (
            "cloud-init { ssh-key \"/dev/zero\"; }".to_owned(),
            "ssh-key /dev/zero is a character device",
        ),
    ] {
        let src =
            format!("vm \"a\" {{\n  image-url \"https://example.com/a.qcow2\"\n  {step}\n}}\n");
        rejected_everywhere("VMFile.kdl", &src, want, 4_000);
        rejected_everywhere("VMFile.kdl", &src, "VMFile.kdl:3:", 4_000);
    }
}

#[test]
fn cli_endless_vmfile_stops_at_the_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&dir.path().join("data"), &["validate", "-f", "/dev/zero"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/dev/zero is larger than 32 MiB"), "{err}");
    assert!(err.contains("vmctl::vmfile::too_large"), "{err}");
}
