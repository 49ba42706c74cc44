//! The `vmctl` binary under test, and the `vmctl-agent` program next to it
//! that `vmctl agent` (and every auto-start) runs.
//!
//! `cargo test -p vmctl` builds `vmctl` but not `vmctl-agent` (the CLI does
//! not link the agent), so a test run could find no agent, or an agent
//! built from older sources. Both stop the tests at once with what to do,
//! instead of agents that never answer. `scripts/test` builds it first.

use std::path::Path;
use std::sync::OnceLock;
use std::time::SystemTime;

/// The `vmctl` binary, once `vmctl-agent` beside it is checked to be built
/// from the current sources.
pub fn vmctl_bin() -> &'static str {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(check_agent_program);
    env!("CARGO_BIN_EXE_vmctl")
}

fn check_agent_program() {
    let agent = Path::new(env!("CARGO_BIN_EXE_vmctl")).with_file_name("vmctl-agent");
    let build = "build it first: `cargo build -p vmctl-agent` (scripts/test does)";
    let built = match std::fs::metadata(&agent).and_then(|m| m.modified()) {
        Ok(t) => t,
        Err(e) => panic!(
            "{} is missing ({e}): these tests run `vmctl agent`, which runs that program; {build}",
            agent.display()
        ),
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut newest = (SystemTime::UNIX_EPOCH, root.join("Cargo.lock"));
    for dir in [
        "api/src",
        "store/src",
        "controllers/src",
        "agent/src",
        "agent-args/src",
        "tls/src",
    ] {
        newest_in(&root.join(dir), &mut newest);
    }
    assert!(
        newest.0 <= built,
        "{} is older than its source {}; {build}",
        agent.display(),
        newest.1.display()
    );
}

/// The latest modification time of a file under `dir`, and that file.
fn newest_in(dir: &Path, newest: &mut (SystemTime, std::path::PathBuf)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            newest_in(&p, newest);
        } else if let Ok(t) = e.metadata().and_then(|m| m.modified())
            && t > newest.0
        {
            *newest = (t, p);
        }
    }
}
