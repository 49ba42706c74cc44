//! The agent is its own program: `vmctl` links neither it nor the
//! controllers, and runs `vmctl-agent` from its own directory.

use std::process::Command;

/// The packages `cargo tree` lists for `vmctl`, over every kind of edge
/// (normal, build and dev dependencies), by name.
fn vmctl_dependency_names() -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "-p", "vmctl", "-e", "all", "--prefix", "none"])
        .args(["--offline", "--locked", "--manifest-path"])
        .arg(crate::repo().join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn vmctl_links_neither_the_agent_nor_the_controllers() {
    let names = vmctl_dependency_names();
    // The listing is what it should be (guards against a broken parse).
    for expected in ["vmctl", "vmctl-api", "vmctl-agent-args", "hyper"] {
        assert!(names.iter().any(|n| n == expected), "{expected}: {names:?}");
    }
    for forbidden in ["vmctl-controllers", "vmctl-agent"] {
        assert!(
            !names.iter().any(|n| n == forbidden),
            "vmctl depends on {forbidden} (see `cargo tree -p vmctl -e all -i {forbidden}`): \
             the CLI must reach VMs through the agent's API only (issue 13)"
        );
    }
}

#[test]
fn vmctl_agent_without_the_agent_program_names_the_path_and_how_to_install() {
    // A `vmctl` alone in a directory: a hard link, so nothing is copied
    // (the target directory is one filesystem).
    let alone = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let vmctl = alone.path().join("vmctl");
    std::fs::hard_link(crate::vmctl_bin(), &vmctl).unwrap();
    let data = tempfile::tempdir().unwrap();
    let missing = alone.path().join("vmctl-agent");
    for args in [
        &["agent", "--driver", "fake"][..],
        // An auto-start looks in the same place.
        &["get", "vm"][..],
    ] {
        let data_dir = data.path().join(args[0]);
        let out = Command::new(&vmctl)
            .args(args)
            .arg("--data-dir")
            .arg(&data_dir)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        // Compared without the diagnostic's line wrapping.
        let flat = squeeze(&err);
        for want in [
            "vmctl::agent::not_installed",
            &format!("{} does not exist", missing.display()),
            "cargo install --path agent",
            "cargo build -p vmctl-agent",
        ] {
            assert!(
                flat.contains(&squeeze(want)),
                "{args:?}: no {want:?} in {err}"
            );
        }
        assert!(!data_dir.exists(), "{args:?} changed nothing");
    }
}

/// `text` without whitespace and the diagnostic's frame (`│`).
fn squeeze(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_whitespace() && *c != '│')
        .collect()
}

/// Found as: `scripts/demo` built `-p vmctl` only, so its `vmctl up`
/// failed on a fresh clone with `vmctl::agent::not_installed`. Every
/// `cargo build` or `cargo install` of vmctl that the scripts and the
/// README give must build the agent too.
#[test]
fn scripts_and_readme_never_build_vmctl_without_the_agent() {
    let repo = crate::repo();
    let mut files = vec![repo.join("README.md")];
    for dir in ["scripts", ".ci"] {
        for e in std::fs::read_dir(repo.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                files.push(p);
            }
        }
    }
    let mut checked = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for (n, line) in text.lines().enumerate() {
            let builds_vmctl = (line.contains("cargo build") || line.contains("cargo install"))
                && line.split_whitespace().any(|w| w == "vmctl");
            if !builds_vmctl {
                continue;
            }
            checked += 1;
            assert!(
                line.contains("vmctl-agent") || line.contains("--path agent"),
                "{}:{}: builds vmctl but not vmctl-agent, which `vmctl` needs: {line}",
                f.display(),
                n + 1
            );
        }
    }
    assert!(checked > 0, "found no build command to check");
}

/// The fault (new-user tryout): when the agent a command started exited
/// at once (here: a bad `agent.toml`), `vmctl` said only "no vmctl agent
/// answers" and advised dropping `--no-autostart`, which was not given;
/// the reason was in the agent's log alone. Now the error says the agent
/// it started exited, with its exit code and the end of its log.
#[test]
fn an_auto_started_agent_that_exits_is_reported_with_its_reason_not_no_autostart_advice() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("agent.toml"), "driver = \"nope\"\n").unwrap();
    let out = Command::new(crate::vmctl_bin())
        .args(["get", "vm", "--data-dir"])
        .arg(data.path())
        .env("NO_COLOR", "1")
        .env_remove("VMCTL_SOCKET")
        .env_remove("VMCTL_DATA_DIR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let flat = squeeze(&err);
    for want in [
        "vmctl::agent::start_failed",
        "the vmctl agent this command started exited with code",
        // The agent's own words, from its log.
        "agent.toml",
        "nope",
    ] {
        assert!(flat.contains(&squeeze(want)), "no {want:?} in {err}");
    }
    assert!(!err.contains("--no-autostart"), "wrong advice: {err}");
}
