//! Snapshot tests of every command's output and its main errors, run as a
//! user runs them: the real binary, each test with its own agent (fake
//! driver) on its own data directory, and its own working directory for
//! VMFile.kdl discovery.
//!
//! A transcript is `$ vmctl ARGS`, the exit code, stdout and stderr, with
//! the volatile parts (paths, uids, times, ports, resource versions)
//! replaced by placeholders.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::agent::Agent;

mod snapshot_command;

/// An agent plus a working directory.
struct World {
    agent: Agent,
    work: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        World {
            agent: Agent::start(),
            work: tempfile::tempdir().unwrap(),
        }
    }

    fn dir(&self) -> &Path {
        self.work.path()
    }

    /// Writes a file in the working directory.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Runs `vmctl` in `cwd` against this agent (never starting another).
    fn run_in(&self, cwd: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(crate::vmctl_bin());
        cmd.arg("--no-autostart")
            .arg("--data-dir")
            .arg(self.agent.data_dir())
            .args(args)
            .current_dir(cwd)
            .env("NO_COLOR", "1")
            .env("USER", "tester")
            .env("COLUMNS", "100")
            .env_remove("VMCTL_DATA_DIR")
            .env_remove("VMCTL_SOCKET")
            .env_remove("RUST_LOG")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
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

    fn run(&self, args: &[&str]) -> Output {
        self.run_in(self.dir(), args, None)
    }

    /// Runs and asserts success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vmctl {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn redact(&self, text: &str) -> String {
        redact_paths(
            &drop_progress(text),
            &[(self.agent.dir.path(), "[DATA]"), (self.dir(), "[WORK]")],
        )
    }

    /// Like [`World::transcript`], with the conditions of JSON or YAML
    /// output sorted by type (their order depends on timing).
    fn transcript_sorted(&self, args: &[&str]) -> String {
        let mut out = self.run(args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        out.stdout = if args.contains(&"yaml") {
            sorted_yaml(&text)
        } else {
            sorted_json(&text)
        }
        .into_bytes();
        self.redact(&transcript(args, &out))
    }

    /// The redacted transcript of one run.
    fn transcript_in(&self, cwd: &Path, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run_in(cwd, args, stdin);
        self.redact(&transcript(args, &out))
    }

    fn transcript(&self, args: &[&str]) -> String {
        self.transcript_in(self.dir(), args, None)
    }

    /// Transcripts of several runs, one after the other.
    fn session(&self, runs: &[&[&str]]) -> String {
        runs.iter()
            .map(|a| self.transcript(a))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The VM's object as JSON.
    fn vm_json(&self, name: &str) -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["get", "vm", name, "-o", "json"])).unwrap();
        assert_eq!(
            v["kind"], "VirtualMachine",
            "get NAME prints the object itself"
        );
        v
    }
}

fn transcript(args: &[&str], out: &Output) -> String {
    let code = out.status.code().map_or("signal".into(), |c| c.to_string());
    format!(
        "$ vmctl {}\n[exit {code}]\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Drops the per-object progress lines of waits (`  vm/x: Pending …`):
/// which intermediate states a poll sees depends on timing. The outcome
/// (`all N objects are Ready`, or the error) stays.
fn drop_progress(text: &str) -> String {
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        let progress = ["  vm/", "  image/", "  provision/", "  snapshot/"]
            .iter()
            .any(|p| line.starts_with(p))
            && line.contains(": ");
        if !progress {
            out.push_str(line);
        }
    }
    out
}

fn sort_conditions(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(serde_json::Value::Array(c)) = m.get_mut("conditions") {
                c.sort_by(|a, b| a["type"].as_str().cmp(&b["type"].as_str()));
            }
            m.values_mut().for_each(sort_conditions);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(sort_conditions),
        _ => {}
    }
}

/// JSON output with conditions sorted (keys come out sorted too).
fn sorted_json(text: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(text).expect("JSON output");
    sort_conditions(&mut v);
    format!("{}\n", serde_json::to_string_pretty(&v).unwrap())
}

/// Multi-document YAML output with conditions sorted.
fn sorted_yaml(text: &str) -> String {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| {
            let mut v: serde_json::Value = serde::Deserialize::deserialize(d).unwrap();
            sort_conditions(&mut v);
            serde_yaml::to_string(&v).unwrap()
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn redact_paths(text: &str, paths: &[(&Path, &str)]) -> String {
    let mut s = text.to_owned();
    for (p, with) in paths {
        // The canonical form too (/tmp may be a symlink).
        if let Ok(c) = p.canonicalize() {
            s = s.replace(&c.display().to_string(), with);
        }
        s = s.replace(&p.display().to_string(), with);
    }
    s.replace(&crate::repo().display().to_string(), "[REPO]")
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Snapshot settings: placeholders for what changes between runs.
/// [`settings`], for output that differs on a cluster: on etcd every VM
/// is bound by the scheduler (a `Scheduled` condition, its node shown
/// before it first runs) and an Image's status is kept per node
/// (`status.nodes`), so those snapshots are kept apart (`…@etcd.snap`).
fn store_settings() -> insta::Settings {
    let mut s = settings();
    if !crate::agent::test_store_env().is_empty() {
        s.set_snapshot_suffix("etcd");
    }
    s
}

fn settings() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.add_filter(
        r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        "[UID]",
    );
    s.add_filter(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)",
        "[TIME]",
    );
    // Ages: the value and the padding after it (its width varies).
    s.add_filter(r"\b\d+[smhd] ago\b", "[AGE] ago");
    s.add_filter(r"\b\d+[smhd] +", "[AGE] ");
    s.add_filter(r"\b\d+[smhd]\n", "[AGE]\n");
    s.add_filter(r"\b\d+[smhd]$", "[AGE]");
    s.add_filter(r"\[TIME\] +", "[TIME] ");
    // Repeated notes: `2m (x5 over 10m)`, and the padding its width varies.
    s.add_filter(r"over \d+[smhd]\) *", "over [AGE]) ");
    s.add_filter(r"LAST SEEN +", "LAST SEEN   ");
    s.add_filter(r"\bAGE +MESSAGE", "AGE   MESSAGE");
    s.add_filter(r"TIME +CHANGE", "TIME   CHANGE");
    s.add_filter(r#"("?resourceVersion"?:\s*)\d+"#, "$1[RV]");
    s.add_filter(r"ResourceVersion:  \d+", "ResourceVersion:  [RV]");
    s.add_filter(r#"("?runToken"?:\s*)"?\d+"?"#, "$1[TOKEN]");
    s.add_filter(r#"("?restored?Token"?:\s*)['"]?\d+['"]?"#, "$1[TOKEN]");
    // A digest of the started spec, which holds temporary paths.
    s.add_filter(r#"("?startedSpec"?:\s*)"?[0-9a-f]{16}"?"#, "$1[SPEC]");
    s.add_filter(r"\b200\d\d\b", "[PORT]");
    // The agent's node name is the host's.
    s.add_filter(r#"("?nodeName"?:\s*"?)[^\s",]+"#, "$1[NODE]");
    // A path miette wrapped across lines.
    s.add_filter(
        r"its log is [^\n]*\n\s*[^\n]*agent\.log",
        "its log is [DATA]/agent.log",
    );
    s.set_snapshot_path("snapshots");
    s.set_prepend_module_to_snapshot(false);
    s
}

/// A VMFile with two VMs sharing an image; `alpha` has a provisioner.
const TWO_VMS: &str = r#"vm "alpha" {
    image-url "https://example.com/debian.qcow2"
    vcpus 2
    memory 1024
    provision "shell" {
        inline "echo hello from alpha"
    }
}

vm "beta" {
    image-url "https://example.com/debian.qcow2"
    network "tap" bridge="br0"
}
"#;

const ONE_VM: &str = r#"vm "web" {
    image-url "https://example.com/debian.qcow2"
    vcpus 1
    memory 512
}
"#;

const KDL_SYNTAX_ERROR: &str = "vm \"web\" {\n    image-url \"https://example.com/debian.qcow2\"\n";

const VALIDATION_ERROR: &str = "vm \"web\" {\n    image-url \"https://example.com/debian.qcow2\"\n    vcpus 0\n    memroy 512\n}\n";

// ---------------------------------------------------------------- files

#[test]
fn validate_convert_and_schema() {
    let w = World::new();
    w.write("VMFile.kdl", TWO_VMS);
    w.write("bad/VMFile.kdl", VALIDATION_ERROR);
    w.write("syntax/VMFile.kdl", KDL_SYNTAX_ERROR);
    std::fs::create_dir_all(w.dir().join("empty")).unwrap();

    // Without -f, VMFile.kdl of the current directory is used.
    let valid = w.run(&["validate"]);
    assert_eq!(code(&valid), Some(0), "{}", stderr(&valid));
    let json = w.run(&["validate", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(
        v["objects"],
        serde_json::json!([
            "image/debian-qcow2-8beb404e",
            "vm/alpha",
            "provision/alpha",
            "vm/beta"
        ])
    );
    let bad = w.run(&["validate", "-f", "bad/VMFile.kdl"]);
    assert_eq!(code(&bad), Some(1));
    assert!(stderr(&bad).contains("vmctl::vmfile::validation"));
    assert!(
        stderr(&bad).contains("did you mean `memory`"),
        "{}",
        stderr(&bad)
    );
    let syntax = w.run(&["validate", "-f", "syntax/VMFile.kdl"]);
    assert!(stderr(&syntax).contains("vmctl::vmfile::parse_failed"));
    let empty_dir = w.dir().join("empty");
    let missing = w.run_in(&empty_dir, &["validate"], None);
    assert!(stderr(&missing).contains("vmctl::vmfile::not_found"));

    let bad_json = w.run(&["validate", "-f", "bad/VMFile.kdl", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&bad_json.stdout).unwrap();
    let codes: Vec<&str> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["vmctl::vmfile::validation"; 2]);

    let text = [
        w.transcript(&["validate"]),
        w.transcript(&["validate", "-f", "bad/VMFile.kdl"]),
        w.transcript(&["validate", "-f", "syntax/VMFile.kdl"]),
        w.transcript_in(&empty_dir, &["validate"], None),
        w.transcript(&["validate", "-f", "empty"]),
        w.transcript(&["validate", "-f", "bad/VMFile.kdl", "-o", "json"]),
    ]
    .join("\n");
    let convert = [
        w.transcript(&["convert"]),
        w.transcript(&["convert", "-f", "syntax/VMFile.kdl"]),
    ]
    .join("\n");
    let schema = w.transcript(&["schema", "gadget"]);
    settings().bind(|| {
        insta::assert_snapshot!("cmd_validate", text);
        insta::assert_snapshot!("cmd_convert", convert);
        insta::assert_snapshot!("cmd_schema_unknown_kind", schema);
    });

    // convert -o json is what convert -o yaml says, as JSON.
    let j: serde_json::Value = serde_json::from_str(&w.ok(&["convert", "-o", "json"])).unwrap();
    let y: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&w.ok(&["convert"]))
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(j, serde_json::Value::Array(y));
    // schema of every kind: one object keyed by kind.
    let all: serde_json::Value = serde_json::from_str(&w.ok(&["schema"])).unwrap();
    let keys: Vec<&String> = all.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["Image", "Node", "Provision", "Snapshot", "VirtualMachine"]
    );
}

// ---------------------------------------------------------------- declarative

#[test]
fn apply_dry_run_prune_and_diff() {
    let w = World::new();
    let f = w.write("VMFile.kdl", TWO_VMS);
    let first = w.session(&[
        &["diff"],
        &["apply", "--dry-run"],
        &["apply"],
        &["apply"],
        &["diff"],
    ]);
    assert_eq!(
        w.ok(&["get", "-o", "name"]),
        "vm/alpha\nvm/beta\nimage/debian-qcow2-8beb404e\nprovision/alpha\n"
    );
    // alpha changes, beta is dropped.
    std::fs::write(
        &f,
        TWO_VMS
            .replace("vcpus 2", "vcpus 4")
            .split("vm \"beta\"")
            .next()
            .unwrap(),
    )
    .unwrap();
    let second = w.session(&[
        &["diff"],
        &["apply", "--dry-run", "--prune"],
        &["apply"],
        &["apply", "--prune", "-o", "json"],
    ]);
    assert_eq!(w.vm_json("alpha")["spec"]["vcpus"], 4);
    let errors = [
        w.transcript_in(w.dir(), &["apply", "-f", "-", "--prune"], Some(ONE_VM)),
        w.transcript(&["apply", "-f", "missing.kdl"]),
    ]
    .join("\n");
    settings().bind(|| {
        insta::assert_snapshot!("cmd_apply_first", first);
        insta::assert_snapshot!("cmd_apply_prune", second);
        insta::assert_snapshot!("cmd_apply_errors", errors);
    });
    assert!(second.contains("vm/beta pruned"), "{second}");
}

const POWER_STATES: &str = r#"vm "on" {
    image-url "https://example.com/debian.qcow2"
}
vm "off" {
    image-url "https://example.com/debian.qcow2"
    power-state "stopped"
}
vm "paused" {
    image-url "https://example.com/debian.qcow2"
    power-state "suspended"
}
"#;

/// The fault (new-user tryout, on sled and etcd): `apply --wait` (and
/// `up`) of a VM with `power-state "stopped"` never returned: the wait
/// looked for the `Ready` condition, which only a running VM has. A wait
/// now ends when each object is at its spec, as `kubectl wait` on a
/// resource's own target: Ready when asked to run, the asked phase
/// (Stopped, Suspended) when asked not to, at the current generation.
#[test]
fn apply_wait_of_a_vm_asked_stopped_or_suspended_returns_at_its_spec() {
    let w = World::new();
    w.write("VMFile.kdl", POWER_STATES);
    let timed = |args: &[&str]| {
        let t = std::time::Instant::now();
        let out = w.run(args);
        let took = t.elapsed();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(
            took < std::time::Duration::from_secs(20),
            "{args:?} took {took:?}"
        );
        stderr(&out)
    };
    let err = timed(&["apply", "--wait", "--timeout", "30"]);
    assert!(err.contains("vm/off: Stopped, as its spec asks"), "{err}");
    assert!(
        err.contains("vm/paused: Suspended, as its spec asks"),
        "{err}"
    );
    assert!(
        err.contains(
            "all 4 objects are as their specs ask: 2 Ready, vm/off Stopped, vm/paused Suspended"
        ),
        "{err}"
    );
    for (vm, phase) in [
        ("on", "Running"),
        ("off", "Stopped"),
        ("paused", "Suspended"),
    ] {
        let o = w.vm_json(vm);
        assert_eq!(o["status"]["phase"], phase, "{o}");
        assert_eq!(
            o["status"]["observedGeneration"], o["metadata"]["generation"],
            "{o}"
        );
    }
    // `up` waits the same way.
    let err = timed(&["up", "--timeout", "30"]);
    assert!(err.contains("as their specs ask"), "{err}");
    // A change the stopped VM must observe first; then asked to run, the
    // wait is for Ready again (not merely for the phase).
    w.write(
        "VMFile.kdl",
        &POWER_STATES.replace(
            "power-state \"stopped\"",
            "power-state \"stopped\"\n    vcpus 2",
        ),
    );
    timed(&["apply", "--wait", "--timeout", "30"]);
    let off = w.vm_json("off");
    assert_eq!(off["spec"]["vcpus"], 2);
    assert_eq!(
        off["status"]["observedGeneration"], off["metadata"]["generation"],
        "{off}"
    );
    w.write(
        "VMFile.kdl",
        &POWER_STATES.replace("power-state \"stopped\"", "power-state \"running\""),
    );
    let err = timed(&["apply", "--wait", "--timeout", "30"]);
    assert!(
        err.contains("all 4 objects are as their specs ask: 3 Ready, vm/paused Suspended"),
        "{err}"
    );
    let off = w.vm_json("off");
    assert_eq!(off["status"]["phase"], "Running", "{off}");
    assert!(
        off["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True"),
        "{off}"
    );
}

#[test]
fn get_in_every_format_and_describe() {
    let w = World::new();
    w.write("VMFile.kdl", TWO_VMS);
    let out = w.run(&["apply", "--wait", "--timeout", "60"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let formats = w.session(&[
        &["get"],
        &["get", "-o", "wide"],
        &["get", "vm"],
        &["get", "image"],
        &["get", "provision", "-o", "name"],
        &["get", "vm", "-l", "vmctl.dev/vm=alpha", "-o", "name"],
        &["get", "vm", "alpha"],
        &["get", "vm", "alpha", "-o", "wide"],
        &["get", "vm", "alpha", "-o", "name"],
    ]);
    // With a name, the object itself; without, a List (as kubectl).
    let json = [
        w.transcript_sorted(&["get", "vm", "alpha", "-o", "json"]),
        w.transcript_sorted(&["get", "vm", "beta", "-o", "yaml"]),
        w.transcript_sorted(&["get", "provision", "-o", "json"]),
        w.transcript_sorted(&["get", "image", "-o", "yaml"]),
    ]
    .join("\n");
    let describe = w.session(&[
        &["describe", "vm", "alpha"],
        &["describe", "image", "debian-qcow2-8beb404e"],
    ]);
    let errors = w.session(&[
        &["get", "gadget"],
        &["get", "vm", "nope"],
        &["get", "vm", "-l", "novalue"],
        &["describe", "vm", "nope"],
        &["describe", "provision", "beta"],
        &["describe", "vm", "../x"],
        &["describe", "gadget"],
    ]);
    // Without a name: every object of the kind, by name, two empty lines apart.
    let describe_all = w.session(&[&["describe", "vm"]]);
    // (Digits and padding aside: ages tick between the runs.)
    let digitless = |s: String| {
        s.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("\n")
            .replace(char::is_numeric, "0")
    };
    assert_eq!(
        digitless(w.ok(&["describe", "vm"])),
        digitless(format!(
            "{}\n\n{}",
            w.ok(&["describe", "vm", "alpha"]),
            w.ok(&["describe", "vm", "beta"])
        )),
        "describe KIND is describe KIND NAME of each"
    );
    // json and yaml agree: one List document of the objects.
    // Two listings: the List's own resourceVersion is the store's revision when each was read,
    // which other installations sharing the etcd cluster move between the two reads (on sled it
    // stays): compare everything else.
    let listing = |text: String, yaml: bool| {
        let mut v: serde_json::Value = if yaml {
            serde_yaml::from_str(&text).unwrap()
        } else {
            serde_json::from_str(&text).unwrap()
        };
        assert!(v["metadata"]["resourceVersion"].as_u64().is_some(), "{v}");
        v["metadata"]["resourceVersion"].take();
        v
    };
    let j = listing(w.ok(&["get", "vm", "-o", "json"]), false);
    let y = listing(w.ok(&["get", "vm", "-o", "yaml"]), true);
    assert_eq!(j, y);
    assert_eq!(j["kind"], "List");
    assert_eq!(j["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(j["items"][0]["status"]["phase"], "Running");
    // With a name, the object itself, the same as in the list.
    let one: serde_json::Value =
        serde_json::from_str(&w.ok(&["get", "vm", "alpha", "-o", "json"])).unwrap();
    let one_yaml: serde_json::Value =
        serde_yaml::from_str(&w.ok(&["get", "vm", "alpha", "-o", "yaml"])).unwrap();
    assert_eq!(one, one_yaml);
    assert_eq!(one["kind"], "VirtualMachine");
    assert_eq!(one["metadata"]["name"], "alpha");
    assert_eq!(one["spec"], j["items"][0]["spec"]);
    // Both read back: `get -o json|yaml | apply -f -` changes nothing.
    for out in ["json", "yaml"] {
        for args in [&["get", "-o", out][..], &["get", "vm", "alpha", "-o", out]] {
            let text = w.ok(args);
            let back = w.run_in(w.dir(), &["apply", "-f", "-", "--dry-run"], Some(&text));
            let said = stdout(&back) + &stderr(&back);
            assert!(back.status.success(), "{args:?}: {said}");
            assert!(said.contains("vm/alpha unchanged"), "{args:?}: {said}");
        }
    }
    store_settings().bind(|| {
        insta::assert_snapshot!("cmd_get_formats", formats);
        insta::assert_snapshot!("cmd_get_json", json);
        insta::assert_snapshot!("cmd_describe", describe);
        insta::assert_snapshot!("cmd_describe_all", describe_all);
        insta::assert_snapshot!("cmd_get_describe_errors", errors);
    });
}

#[test]
fn delete_history_and_events() {
    let w = World::new();
    w.write("VMFile.kdl", ONE_VM);
    assert!(
        w.run(&["apply", "--wait", "--timeout", "60"])
            .status
            .success()
    );
    // History: the applied changes are deterministic; status updates are not.
    let hist = w.run(&["history", "vm", "web"]);
    let applied: String = stdout(&hist)
        .lines()
        .filter(|l| l.starts_with("SEQ") || l.contains("applied"))
        // Sequence numbers depend on how the controllers' writes interleave,
        // and their width (so the column's padding) on the store: etcd's
        // revisions on a shared cluster are longer than sled's sequence.
        .map(|l| {
            let digits = l.len() - l.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            let l = if digits > 0 {
                format!("[SEQ] {}", l[digits..].trim_start())
            } else if let Some(rest) = l.strip_prefix("SEQ") {
                format!("SEQ {}", rest.trim_start())
            } else {
                l.to_owned()
            };
            format!("{}\n", w.redact(&l))
        })
        .collect();
    let hist_json: Vec<serde_json::Value> =
        serde_json::from_str(&w.ok(&["history", "vm", "web", "-o", "json"])).unwrap();
    assert_eq!(hist_json[0]["change"]["type"], "applied");
    assert_eq!(hist_json[0]["change"]["created"], true);
    assert!(
        hist_json
            .iter()
            .any(|e| e["change"]["type"] == "statusUpdated"),
        "the controllers' status updates are recorded too"
    );
    let seqs: Vec<u64> = hist_json
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|p| p[0] < p[1]),
        "oldest first: {seqs:?}"
    );

    // Events: one line per note; the set is stable, the interleaving is not.
    // A controller records its note just after the status `--wait` saw.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while stdout(&w.run(&["events"])).lines().count() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let events = w.run(&["events"]);
    let mut lines: Vec<String> = stdout(&events)
        .lines()
        .skip(1)
        .map(|l| w.redact(l))
        .collect();
    lines.sort();
    let header = stdout(&events).lines().next().unwrap_or("").to_owned();
    let events_json: Vec<serde_json::Value> =
        serde_json::from_str(&w.ok(&["events", "-o", "json"])).unwrap();
    assert_eq!(events_json.len(), lines.len());

    let delete = w.session(&[
        &["delete", "vm", "nope"],
        &["delete", "vm"],
        &["delete", "gadget", "x"],
        &["history", "vm", "nope"],
        &["delete", "provision", "web"],
        &["delete", "vm", "web", "--wait", "--timeout", "30"],
        &["get", "vm"],
    ]);
    // The history outlives the object.
    let after = w.ok(&["history", "vm", "web"]);
    assert!(
        after.contains("deleted") || after.contains("finalizers"),
        "{after}"
    );
    let empty = World::new();
    let no_events = empty.session(&[
        &["events"],
        &["describe", "vm"],
        &["get", "vm", "-o", "json"],
    ]);
    assert_eq!(code(&hist), Some(0));
    let text = format!(
        "$ vmctl history vm web   (the `applied` rows)\n{applied}\n$ vmctl events   (sorted)\n{header}\n{}\n\n{no_events}",
        lines.join("\n"),
    );
    settings().bind(|| {
        insta::assert_snapshot!("cmd_history_events", text);
        insta::assert_snapshot!("cmd_delete", delete);
    });
}

/// The fault: a note recorded again and again (each suspend and resume of a
/// VM) was listed again and again by `events` and `describe`. Identical
/// notes are one row with a count and first/last time, as kubectl shows
/// events; `events -w` still prints each one as it is recorded.
#[test]
fn repeated_identical_notes_are_aggregated_with_count() {
    let w = World::new();
    w.write("VMFile.kdl", ONE_VM);
    assert!(
        w.run(&["apply", "--wait", "--timeout", "60"])
            .status
            .success()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while stdout(&w.run(&["events"])).lines().count() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // `events -w` from here: its listing first (the header), then the stream.
    let mut watch = Command::new(crate::vmctl_bin())
        .args(["--no-autostart", "--data-dir"])
        .arg(w.agent.data_dir())
        .args(["events", "-w"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut watched = Vec::new();
    let wait_for = |watched: &mut Vec<String>, done: &dyn Fn(&[String]) -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !done(watched) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => watched.push(l),
                Err(_) => panic!("events -w printed only:\n{}", watched.join("\n")),
            }
        }
    };
    wait_for(&mut watched, &|l| {
        l.iter().any(|l| l.starts_with("LAST SEEN"))
    });
    for _ in 0..3 {
        w.ok(&["suspend", "web"]);
        w.ok(&["resume", "web"]);
    }
    // A controller records its note just after the status the command saw.
    let count = |reason: &str| -> u64 {
        let events: Vec<serde_json::Value> =
            serde_json::from_str(&w.ok(&["events", "-o", "json"])).unwrap();
        events
            .iter()
            .filter(|e| e["reason"] == reason)
            .map(|e| e["count"].as_u64().unwrap())
            .sum()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while count("Resumed") < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let noted = |l: &[String], reason: &str| {
        l.iter()
            .filter(|l| l.contains(&format!("   {reason}   vm/web")))
            .count()
    };
    // The stream: each note once, as recorded, not aggregated.
    wait_for(&mut watched, &|l| noted(l, "Resumed") >= 3);
    watch.kill().unwrap();
    watch.wait().unwrap();
    assert_eq!(noted(&watched, "Suspended"), 3, "{watched:#?}");
    assert_eq!(noted(&watched, "Resumed"), 3, "{watched:#?}");

    // -o json: one entry per distinct note, with count and first/last time.
    let events: Vec<serde_json::Value> =
        serde_json::from_str(&w.ok(&["events", "-o", "json"])).unwrap();
    let reasons: Vec<&str> = events
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.len(), 4, "{events:#?}");
    assert_eq!(&reasons[2..], ["Suspended", "Resumed"], "by last seen");
    for e in &events[2..] {
        assert_eq!(e["count"], 3, "{e}");
        let t = |f: &str| chrono::DateTime::parse_from_rfc3339(e[f].as_str().unwrap()).unwrap();
        assert!(t("firstTimestamp") < t("lastTimestamp"), "{e}");
        assert_eq!(e["object"]["name"], "web");
    }
    for e in &events[..2] {
        assert_eq!(e["count"], 1, "{e}");
        assert_eq!(e["firstTimestamp"], e["lastTimestamp"], "{e}");
    }
    let yaml: serde_json::Value = serde_yaml::from_str(&w.ok(&["events", "-o", "yaml"])).unwrap();
    assert_eq!(yaml, serde_json::Value::Array(events));

    // The table and describe: one row each, `(x3 over …)`.
    let table = w.run(&["events"]);
    let mut rows: Vec<String> = stdout(&table).lines().map(str::to_owned).collect();
    // Pulled and Started may be recorded in either order.
    rows[1..3].sort();
    let describe = w.ok(&["describe", "vm", "web"]);
    let events_section = describe
        .split_once("Events:")
        .map(|(_, e)| format!("Events:{e}"))
        .unwrap_or_default();
    assert_eq!(
        events_section.matches("Suspended VM web").count(),
        1,
        "{describe}"
    );
    assert_eq!(events_section.matches("(x3 over ").count(), 2, "{describe}");
    let text = format!(
        "$ vmctl events   (the first two rows sorted)\n{}\n\n$ vmctl describe vm web   (its events)\n{events_section}",
        rows.join("\n")
    );
    settings().bind(|| insta::assert_snapshot!("cmd_events_aggregated", text));
}

// ---------------------------------------------------------------- imperative

#[test]
fn create_power_list_status_destroy() {
    let w = World::new();
    w.write(
        "key.pub",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx5dGVzdGtleWZvcnRoZWNsaXRlc3RzMDAwMDA tester\n",
    );
    let create = w.session(&[
        &[
            "create",
            "--name",
            "web",
            "--image-url",
            "https://example.com/debian.qcow2",
            "--vcpus",
            "2",
            "--memory",
            "2048",
            "--disk",
            "10",
            "--ssh-key",
            "key.pub",
        ],
        &[
            "create",
            "--name",
            "web",
            "--image-url",
            "https://example.com/other.qcow2",
        ],
        &["create", "--name", "nosource"],
        &[
            "create",
            "--name",
            "big",
            "--image-url",
            "https://example.com/debian.qcow2",
            "--vcpus",
            "999",
        ],
        &[
            "create",
            "--name",
            "../x",
            "--image-url",
            "https://example.com/debian.qcow2",
        ],
        &[
            "create",
            "--name",
            "k",
            "--image-url",
            "https://example.com/debian.qcow2",
            "--ssh-key",
            "nope.pub",
        ],
        &["list"],
        &["status", "web"],
    ]);
    // Without --start it stays Stopped: desired and observed.
    let vm = w.vm_json("web");
    assert_eq!(vm["spec"]["powerState"], "Stopped");
    assert_eq!(
        vm["spec"]["image"], "debian-qcow2-8beb404e",
        "the VMFile's image name"
    );
    assert_eq!(vm["spec"]["diskGib"], 10);
    assert!(vm["spec"]["cloudInit"]["sshKey"]["digest"].is_string());
    assert_eq!(
        vm["metadata"]["source"]["appliedBy"],
        "tester via vmctl create"
    );
    let power = w.session(&[
        &["start", "web"],
        &["list"],
        &["status", "web"],
        &["suspend", "web"],
        &["status", "web", "-o", "json"],
        &["resume", "web"],
        &["stop", "web"],
    ]);
    let vm = w.vm_json("web");
    assert_eq!(vm["status"]["phase"], "Stopped");
    assert_eq!(
        vm["metadata"]["source"]["appliedBy"],
        "tester via vmctl stop"
    );
    // Every power change is a recorded spec change.
    assert_eq!(vm["metadata"]["generation"], 5);

    // list -o json: the VM objects; status -o json: every field of the manual.
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&w.ok(&["list", "-o", "json"])).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["metadata"]["name"], "web");
    let status: serde_json::Value =
        serde_json::from_str(&w.ok(&["status", "web", "-o", "json"])).unwrap();
    for field in [
        "name", "id", "backend", "state", "vcpus", "memory", "disk", "network", "work_dir",
        "overlay", "seed_iso", "pid", "vnc", "ssh_port", "mac",
    ] {
        assert!(
            status.get(field).is_some(),
            "status -o json lacks {field}: {status}"
        );
    }
    assert_eq!(status["id"], vm["metadata"]["uid"]);

    let started = w.session(&[
        &[
            "create",
            "--name",
            "db",
            "--image-url",
            "https://example.com/debian.qcow2",
            "--bridge",
            "br0",
            "--start",
            "--timeout",
            "60",
        ],
        &["list"],
    ]);
    assert_eq!(w.vm_json("db")["status"]["phase"], "Running");
    let list_json = w.transcript_sorted(&["list", "-o", "json"]);
    let destroy = w.session(&[
        &["destroy", "db"],
        &["status", "db"],
        &["start", "db"],
        &["stop", "nope"],
        &["suspend", "nope"],
        &["resume", "nope"],
        &["destroy", "nope"],
        &["status", "../x"],
        &["list"],
    ]);
    assert!(
        !w.run(&["get", "vm", "db"]).status.success(),
        "destroy waits until the VM is gone"
    );
    store_settings().bind(|| {
        insta::assert_snapshot!("cmd_create", create);
        insta::assert_snapshot!("cmd_power", power);
        insta::assert_snapshot!("cmd_create_start", started);
        insta::assert_snapshot!("cmd_list_json", list_json);
        insta::assert_snapshot!("cmd_destroy", destroy);
    });
}

#[test]
fn list_with_no_vms_has_the_manual_columns() {
    let w = World::new();
    let out = w.run(&["list"]);
    assert!(out.status.success());
    let header: Vec<String> = stdout(&out)
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        &header[..7],
        ["NAME", "BACKEND", "VCPUS", "MEM", "NETWORK", "PID", "SSH"],
        "the manual's columns, in its order"
    );
    assert_eq!(w.ok(&["list", "-o", "json"]), "[]\n");
}

// ---------------------------------------------------------------- VMFile workflow

#[test]
fn up_down_reload_provision_with_file_and_name() {
    let w = World::new();
    w.write("VMFile.kdl", TWO_VMS);
    w.write("other/VMFile.kdl", ONE_VM);
    let up = w.session(&[
        &["up", "--name", "alpha", "--timeout", "60"],
        &["list"],
        &["provision", "--name", "alpha", "--timeout", "60"],
        &["provision", "--name", "beta"],
        &["provision", "--name", "gamma"],
        &["provision", "nope"],
        &["up", "--timeout", "60"],
        &["list"],
    ]);
    assert_eq!(w.vm_json("beta")["status"]["phase"], "Running");
    let down = w.session(&[
        &["down", "--name", "alpha"],
        &["list"],
        &["provision", "--timeout", "60"],
        &[
            "reload",
            "--name",
            "beta",
            "--no-provision",
            "--timeout",
            "60",
        ],
        &["up", "--file", "other/VMFile.kdl", "--timeout", "60"],
        &["down", "--file", "other/VMFile.kdl", "--destroy"],
        &["down", "--destroy"],
        &["list"],
    ]);
    let errors = w.session(&[
        &["up", "--name", "gamma"],
        &["down", "--name", "gamma"],
        &["reload", "--name", "gamma"],
        &["up", "--file", "missing/VMFile.kdl"],
    ]);
    // A directory without VMFile.kdl, one with a syntax error, one invalid.
    let empty = w.dir().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let syntax = w.write("syntax/VMFile.kdl", KDL_SYNTAX_ERROR);
    let invalid = w.write("invalid/VMFile.kdl", VALIDATION_ERROR);
    let mut file_errors = Vec::new();
    for (dir, what) in [
        (empty.as_path(), "vmctl::vmfile::not_found"),
        (syntax.parent().unwrap(), "vmctl::vmfile::parse_failed"),
        (invalid.parent().unwrap(), "vmctl::vmfile::validation"),
    ] {
        for cmd in [
            &["up"][..],
            &["down"],
            &["reload"],
            &["provision"],
            &["ssh"],
        ] {
            let out = w.run_in(dir, cmd, None);
            assert_eq!(code(&out), Some(1), "{cmd:?} in {}", dir.display());
            let err = stderr(&out);
            let last_code = err
                .lines()
                .rfind(|l| l.starts_with("vmctl::"))
                .unwrap_or("");
            assert_eq!(last_code, what, "{cmd:?} in {}:\n{err}", dir.display());
        }
        file_errors.push(w.transcript_in(dir, &["up"], None));
    }
    settings().bind(|| {
        insta::assert_snapshot!("cmd_up_provision", up);
        insta::assert_snapshot!("cmd_down_reload", down);
        insta::assert_snapshot!("cmd_workflow_errors", errors);
        insta::assert_snapshot!("cmd_vmfile_errors", file_errors.join("\n"));
    });
}

#[test]
fn reload_recreates_and_provision_is_a_recorded_rerun() {
    let w = World::new();
    w.write("VMFile.kdl", TWO_VMS);
    w.ok(&["up", "--timeout", "60"]);
    let uid = w.vm_json("alpha")["metadata"]["uid"].clone();
    let prov = |w: &World| -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&w.ok(&["get", "provision", "alpha", "-o", "json"])).unwrap();
        v
    };
    let before = prov(&w)["metadata"]["generation"].as_u64().unwrap();
    w.ok(&["provision", "alpha", "--timeout", "60"]);
    let p = prov(&w);
    assert_eq!(p["metadata"]["generation"].as_u64().unwrap(), before + 1);
    assert!(p["spec"]["runToken"].is_string());
    assert_eq!(
        p["metadata"]["source"]["appliedBy"],
        "tester via vmctl provision"
    );
    assert!(
        p["metadata"]["source"]["file"]
            .as_str()
            .unwrap()
            .ends_with("VMFile.kdl"),
        "the apply source is kept: {p}"
    );
    w.ok(&["reload", "--name", "alpha", "--timeout", "60"]);
    assert_ne!(
        w.vm_json("alpha")["metadata"]["uid"],
        uid,
        "reload recreates the VM"
    );
    // down stops, keeps the objects.
    w.ok(&["down"]);
    for vm in ["alpha", "beta"] {
        let v = w.vm_json(vm);
        assert_eq!(v["spec"]["powerState"], "Stopped");
        assert_eq!(v["status"]["phase"], "Stopped");
    }
}

/// The fault (new-user tryout): `vmctl down` wrote its own wait (300 s)
/// into each VM's spec as `stopTimeoutSeconds`, and `vmctl stop` without
/// `--timeout` wrote 30 over the VMFile's `stop-timeout`. Now only an
/// explicit `vmctl stop --timeout S` changes the VM's grace period.
#[test]
fn down_and_stop_without_timeout_keep_the_vms_own_stop_timeout() {
    let w = World::new();
    w.write(
        "VMFile.kdl",
        "vm \"web\" {\n    image-url \"https://example.com/debian.qcow2\"\n    stop-timeout 45\n}\nvm \"db\" {\n    image-url \"https://example.com/debian.qcow2\"\n}\n",
    );
    w.ok(&["up", "--timeout", "60"]);
    let grace = |w: &World, vm: &str| w.vm_json(vm)["spec"]["stopTimeoutSeconds"].clone();
    w.ok(&["down"]);
    assert_eq!(grace(&w, "web"), 45, "down keeps the file's stop-timeout");
    assert!(grace(&w, "db").is_null(), "down writes no stop timeout");
    w.ok(&["start", "web"]);
    w.ok(&["stop", "web"]);
    assert_eq!(grace(&w, "web"), 45, "stop without --timeout keeps it");
    w.ok(&["start", "web"]);
    w.ok(&["stop", "web", "--timeout", "12"]);
    assert_eq!(grace(&w, "web"), 12, "stop --timeout S sets it");
    assert_eq!(w.vm_json("web")["status"]["phase"], "Stopped");
}

// ---------------------------------------------------------------- ssh, log, images

#[test]
fn ssh_exec_and_log_errors() {
    let w = World::new();
    w.write("VMFile.kdl", TWO_VMS);
    w.write("one/VMFile.kdl", ONE_VM);
    w.ok(&[
        "create",
        "--name",
        "idle",
        "--image-url",
        "https://example.com/debian.qcow2",
    ]);
    let one = w.dir().join("one");
    let text = [
        w.transcript(&["ssh"]),
        w.transcript(&["ssh", "nope"]),
        w.transcript(&["ssh", "idle"]),
        w.transcript_in(&one, &["ssh"], None),
        w.transcript(&["exec", "nope", "--", "true"]),
        w.transcript(&["exec", "idle", "--", "true"]),
        w.transcript(&["cp", "a", "b"]),
        w.transcript(&["log", "nope"]),
        w.transcript(&["log", "idle"]),
        w.transcript(&["log", "idle", "--follow"]),
    ]
    .join("\n");
    assert!(text.contains("alpha, beta"), "the names are listed: {text}");
    settings().bind(|| insta::assert_snapshot!("cmd_ssh_log_errors", text));
}

#[test]
fn log_of_a_provisioned_vm() {
    let w = World::new();
    w.write("VMFile.kdl", TWO_VMS);
    w.ok(&["up", "--name", "alpha", "--timeout", "60"]);
    let text = w.session(&[
        &["log", "alpha"],
        &["log", "alpha", "--console", "-n", "5"],
        &["log", "alpha", "--provision"],
    ]);
    settings().bind(|| insta::assert_snapshot!("cmd_log", text));
}

#[test]
fn image_commands() {
    let w = World::new();
    let text = w.session(&[
        &["image", "list"],
        &["image", "pull", "ftp://example.com/x.img"],
        &["image", "pull", "not a url"],
        &[
            "image",
            "pull",
            "https://example.com/x.img",
            "--checksum",
            "md5:abc",
        ],
        &[
            "image",
            "pull",
            "https://example.com/x.img",
            "--name",
            "../x",
        ],
        &["image", "inspect", "nope"],
        &["image", "inspect", "../nope.img"],
        &["image", "rm", "nope"],
        &[
            "image",
            "pull",
            "https://example.com/img/tiny.raw",
            "--timeout",
            "60",
        ],
        &[
            "image",
            "pull",
            "https://example.com/img/tiny.raw",
            "--name",
            "tiny",
            "--timeout",
            "60",
        ],
        &[
            "create",
            "--name",
            "user",
            "--image-url",
            "https://example.com/img/tiny.raw",
        ],
        &["image", "list"],
        &["image", "inspect", "tiny"],
        &["image", "rm", "tiny-raw-70310420"],
        &["image", "prune"],
        &["image", "prune"],
        &["image", "list", "-o", "json"],
    ]);
    // The pulled image is the one the VM uses (one naming rule).
    assert_eq!(w.vm_json("user")["spec"]["image"], "tiny-raw-70310420");
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&w.ok(&["image", "list", "-o", "json"])).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["usedBy"], serde_json::json!(["user"]));
    store_settings().bind(|| insta::assert_snapshot!("cmd_image", text));
}

// ---------------------------------------------------------------- the rest

#[test]
fn completions_and_man_cover_every_subcommand() {
    let w = World::new();
    for shell in ["bash", "zsh", "fish"] {
        let out = w.ok(&["completions", shell]);
        assert!(out.len() > 1000, "{shell}: {} bytes", out.len());
        for sub in [
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
            "provision",
            "ssh",
            "console",
            "log",
            "image",
            "completions",
        ] {
            assert!(out.contains(sub), "{shell} completion lacks {sub}");
        }
        // Image subcommands and flags are completed too.
        assert!(out.contains("pull") && out.contains("prune"), "{shell}");
        assert!(
            out.contains("image-url") && out.contains("no-provision"),
            "{shell}"
        );
    }
    let bad = w.run(&["completions", "tcsh"]);
    assert_eq!(code(&bad), Some(2), "clap rejects unknown shells");
    let man = w.ok(&["man"]);
    assert!(man.contains(".TH vmctl 1"), "{man}");
    for sub in ["create", "up", "reload", "status", "image"] {
        assert!(
            man.contains(&format!("vmctl\\-{sub}")) || man.contains(sub),
            "{sub}"
        );
    }
}

#[test]
fn bad_names_never_reach_the_agent() {
    let w = World::new();
    let cases: &[&[&str]] = &[
        &["describe", "vm", "../x"],
        &["get", "vm", "../x"],
        &["delete", "vm", "../x"],
        &["history", "vm", "../x"],
        &["start", "../x"],
        &["stop", "../x"],
        &["suspend", "../x"],
        &["resume", "../x"],
        &["destroy", "../x"],
        &["status", "../x"],
        &["log", "../x"],
        &["ssh", "../x"],
        &["exec", "../x", "--", "true"],
        &["provision", "../x"],
        &["image", "rm", "../x"],
        &[
            "create",
            "--name",
            "../x",
            "--image-url",
            "https://e.com/a.img",
        ],
    ];
    for args in cases {
        let out = w.run(args);
        assert_eq!(code(&out), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("vmctl::cli::bad_name")
                && stderr(&out).contains("could escape the data directory"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let events: Vec<serde_json::Value> =
        serde_json::from_str(&w.ok(&["events", "-o", "json"])).unwrap();
    assert!(events.is_empty());
    assert_eq!(w.ok(&["get", "-o", "name"]), "");
    let text = w.session(&[
        &["start", "../x"],
        &[
            "create",
            "--name",
            "Web",
            "--image-url",
            "https://e.com/a.img",
        ],
    ]);
    settings().bind(|| insta::assert_snapshot!("cmd_bad_names", text));
}

#[test]
fn agent_errors_have_codes() {
    let dir = tempfile::tempdir().unwrap();
    let no_agent = Command::new(crate::vmctl_bin())
        .args(["--no-autostart", "--data-dir"])
        .arg(dir.path())
        .arg("list")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let bogus = Command::new(crate::vmctl_bin())
        .args(["agent", "--driver", "bogus", "--data-dir"])
        .arg(dir.path().join("d"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(code(&bogus), Some(1));
    let text = redact_paths(
        &[
            transcript(&["--no-autostart", "list"], &no_agent),
            transcript(&["agent", "--driver", "bogus"], &bogus),
        ]
        .join("\n"),
        &[(dir.path(), "[DATA]")],
    );
    settings().bind(|| insta::assert_snapshot!("cmd_agent_errors", text));
}

// ---------------------------------------------------------------- port forwards

/// Port forwards (issue 15 item 3) as every command shows them, with one
/// whose host port another program holds (the fake's
/// `VMCTL_FAKE_BUSY_PORTS`): `get -o wide`, `list`, `status`, `describe`,
/// `create --port` in Docker's notation and its errors.
#[test]
fn port_forwards_in_get_wide_list_status_describe_and_create() {
    let w = World {
        agent: Agent::start_with("fake", &[("VMCTL_FAKE_BUSY_PORTS", "9999")]),
        work: tempfile::tempdir().unwrap(),
    };
    w.write(
        "VMFile.kdl",
        r#"vm "web" {
    image-url "https://example.com/debian.qcow2"
    port-forward host=8080 guest=80
    port-forward host=9999 guest=90
    port-forward host=5353 guest=53 protocol="udp" address="0.0.0.0"
}
"#,
    );
    let apply = w.transcript(&["apply", "--wait", "--timeout", "60"]);
    let vm = w.vm_json("web");
    let states: Vec<&str> = vm["status"]["portForwards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["Active", "Failed", "Active"], "{vm}");
    let shown = w.session(&[&["get", "vm", "-o", "wide"], &["list"], &["status", "web"]]);
    let describe = w.transcript(&["describe", "vm", "web"]);
    let create = w.session(&[
        &[
            "create",
            "--name",
            "api",
            "--image-url",
            "https://example.com/debian.qcow2",
            "--port",
            "8081:80",
            "--port",
            "127.0.0.1:5354:53/udp",
            "--start",
        ],
        &[
            "create",
            "--name",
            "bad",
            "--image-url",
            "https://example.com/debian.qcow2",
            "--port",
            "8082",
        ],
        &[
            "create",
            "--name",
            "tapvm",
            "--image-url",
            "https://example.com/debian.qcow2",
            "--bridge",
            "br0",
            "--port",
            "8083:80",
        ],
        &["get", "vm", "api", "-o", "wide"],
    ]);
    assert_eq!(
        w.vm_json("api")["status"]["portForwards"][1]["state"],
        "Active"
    );
    store_settings().bind(|| {
        insta::assert_snapshot!("cmd_port_forwards_apply", apply);
        insta::assert_snapshot!("cmd_port_forwards_shown", shown);
        insta::assert_snapshot!("cmd_port_forwards_describe", describe);
        insta::assert_snapshot!("cmd_port_forwards_create", create);
    });
}

/// `display "vnc"` (issue 15 item 6): the VNC address the backend reports
/// is in `status`, `describe` and the object's `status.runtime.vnc`.
#[test]
fn display_vnc_address_in_status_and_describe() {
    let w = World::new();
    w.write(
        "VMFile.kdl",
        "vm \"desk\" {\n    image-url \"https://example.com/debian.qcow2\"\n    display \"vnc\"\n}\n",
    );
    w.ok(&["apply", "--wait", "--timeout", "60"]);
    let vm = w.vm_json("desk");
    assert_eq!(vm["spec"]["display"], "VNC");
    assert_eq!(vm["status"]["runtime"]["vnc"], "127.0.0.1:5900", "{vm}");
    let status = w.ok(&["status", "desk"]);
    assert!(status.contains("vnc:       127.0.0.1:5900"), "{status}");
    let describe = w.ok(&["describe", "vm", "desk"]);
    assert!(
        describe.contains("display: VNC") && describe.contains("vnc: 127.0.0.1:5900"),
        "{describe}"
    );
}
