//! `apply --watch` reacts to the files that matter and prints a refusal
//! once: a watch whose output went to a file in the watched directory used
//! to wake itself with its own writes and print the same error about ten
//! times a second for as long as the file stayed invalid.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent::Agent;

fn wait_for(log: &std::path::Path, what: &str, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(what).count() >= n {
            return text;
        }
        assert!(Instant::now() < deadline, "no {what:?} ×{n} in:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn watch_mode_logging_into_the_watched_directory_prints_a_refusal_once() {
    let a = Agent::start();
    let project = a.dir.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    let vmfile = project.join("VMFile.kdl");
    let good = |mem: u32| format!("vm \"w\" {{\n    image \"w.qcow2\"\n    memory {mem}\n}}\n");
    std::fs::write(&vmfile, good(128)).unwrap();
    let log = project.join("watch.log");
    let mut child = Command::new(crate::vmctl_bin())
        .args(["apply", "--watch", "--no-autostart", "--data-dir"])
        .arg(a.data_dir())
        .current_dir(&project)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for(&log, "watching", 1);

    std::fs::write(&vmfile, "vm \"w\" {\n    vcpus 0\n").unwrap();
    wait_for(&log, "never closed", 1);
    // Long enough for tens of self-inflicted wake-ups at the old rate.
    std::thread::sleep(Duration::from_secs(3));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("never closed").count(), 1, "{text}");

    // A fix is applied once, and a new mistake is reported again.
    std::fs::write(&vmfile, good(256)).unwrap();
    wait_for(&log, "re-applied", 1);
    std::fs::write(&vmfile, "vm \"w\" {\n    vcpus 0\n").unwrap();
    let text = wait_for(&log, "never closed", 2);
    assert_eq!(text.matches("re-applied").count(), 1, "{text}");

    let _ = child.kill();
    let _ = child.wait();
}
