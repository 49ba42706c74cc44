//! Host commands of the Propolis driver (`zfs`, `zoneadm`, `zonecfg`,
//! `dladm`, `qemu-img`) behind a small runner trait.
//!
//! The driver observes before it acts (`zfs list`, `zoneadm list -p`,
//! `dladm show-vnic`), so every step can run again after a crash. Two
//! runners exist:
//!
//! * [`SystemRunner`] runs the programs (an illumos host);
//! * [`SimulatedHost`] keeps datasets, zones and VNICs in memory and
//!   answers like the illumos tools do, recording every command, so that
//!   tests on Linux can check the exact sequences. It can tell a mock
//!   propolis-server when a zone boots or halts (the server runs in the
//!   zone), and can fail chosen commands.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::drivers::BoxFuture;

/// One host command: a program and its arguments (no shell).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCommand {
    /// The program, e.g. `zfs`.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
}

impl HostCommand {
    /// `program` with `args`.
    pub fn new<I, S>(program: &str, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        HostCommand {
            program: program.to_owned(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }
}

/// The command as a shell would show it; arguments with spaces or
/// semicolons are quoted.
impl fmt::Display for HostCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.program)?;
        for a in &self.args {
            if a.is_empty() || a.contains([' ', ';', '"', '\'']) {
                write!(f, " '{}'", a.replace('\'', "'\\''"))?;
            } else {
                write!(f, " {a}")?;
            }
        }
        Ok(())
    }
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl CommandOutput {
    /// Whether the command exited 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }

    fn ok(stdout: impl Into<String>) -> Self {
        CommandOutput {
            code: 0,
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    fn fail(code: i32, stderr: impl Into<String>) -> Self {
        CommandOutput {
            code,
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }
}

/// Runs host commands.
pub trait CommandRunner: Send + Sync + fmt::Debug {
    /// Runs `cmd` to its end. `Err` only when it could not be run at all
    /// (missing program); a non-zero exit is `Ok`.
    fn run<'a>(&'a self, cmd: &'a HostCommand) -> BoxFuture<'a, std::io::Result<CommandOutput>>;
}

/// Runs the programs of the host (illumos: `/usr/sbin/zfs` and friends
/// from `PATH`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemRunner;

impl CommandRunner for SystemRunner {
    fn run<'a>(&'a self, cmd: &'a HostCommand) -> BoxFuture<'a, std::io::Result<CommandOutput>> {
        Box::pin(async move {
            let out = tokio::process::Command::new(&cmd.program)
                .args(&cmd.args)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output()
                .await?;
            Ok(CommandOutput {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        })
    }
}

/// A ZFS dataset of the simulated host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dataset {
    /// `volsize` of a volume, as given.
    pub volsize: Option<String>,
    /// The snapshot it was cloned from.
    pub origin: Option<String>,
}

/// A zone of the simulated host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zone {
    /// `configured`, `incomplete`, `installed` or `running`.
    pub state: String,
    /// The `zonecfg` commands it was created with.
    pub config: String,
}

/// What the simulated host holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostState {
    /// Datasets (volumes) by name.
    pub datasets: BTreeMap<String, Dataset>,
    /// Snapshots, `dataset@name`.
    pub snapshots: BTreeSet<String>,
    /// Zones by name.
    pub zones: BTreeMap<String, Zone>,
    /// VNICs: name → (link, MAC).
    pub vnics: BTreeMap<String, (String, String)>,
    /// Every command run, in order.
    pub log: Vec<HostCommand>,
}

#[derive(Debug, Default)]
struct Sim {
    state: HostState,
    /// Command prefixes (as displayed) that fail the next time they run.
    fail: Vec<String>,
}

/// An in-memory illumos host: `zfs`, `zoneadm`, `zonecfg`, `dladm` and
/// `qemu-img` answer as the real tools do for the forms the driver uses.
/// Cheap to clone (shared state).
///
/// With a state file the host survives an agent restart; with a mock
/// control URL, zone boot and halt start and end the mock
/// propolis-server (`POST {url}/zone/boot`, `/zone/halt`).
#[derive(Debug, Clone, Default)]
pub struct SimulatedHost {
    sim: Arc<Mutex<Sim>>,
    state_file: Option<PathBuf>,
    mock_control: Option<String>,
}

impl SimulatedHost {
    /// An empty host.
    pub fn new() -> Self {
        Self::default()
    }

    /// A host kept in `file` (JSON), loaded now if it exists.
    pub fn with_state_file(mut self, file: PathBuf) -> Self {
        if let Ok(bytes) = std::fs::read(&file)
            && let Ok(state) = serde_json::from_slice(&bytes)
        {
            self.lock().state = state;
        }
        self.state_file = Some(file);
        self
    }

    /// Zone boots and halts are sent to the mock propolis-server's control
    /// listener at `url` (`http://127.0.0.1:PORT`).
    pub fn with_mock_control(mut self, url: impl Into<String>) -> Self {
        self.mock_control = Some(url.into().trim_end_matches('/').to_owned());
        self
    }

    fn lock(&self) -> MutexGuard<'_, Sim> {
        self.sim.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of what the host holds.
    pub fn state(&self) -> HostState {
        self.lock().state.clone()
    }

    /// Every command run so far, as displayed.
    pub fn commands(&self) -> Vec<String> {
        self.lock()
            .state
            .log
            .iter()
            .map(|c| c.to_string())
            .collect()
    }

    /// Forgets the recorded commands (the host's objects stay).
    pub fn clear_log(&self) {
        self.lock().state.log.clear();
    }

    /// The next command starting with `prefix` (as displayed) fails with
    /// exit 1; a failed `zoneadm install` leaves the zone `incomplete`, as
    /// an interrupted install does.
    pub fn fail_next(&self, prefix: &str) {
        self.lock().fail.push(prefix.to_owned());
    }

    fn save(&self, state: &HostState) {
        if let Some(f) = &self.state_file
            && let Ok(json) = serde_json::to_vec(state)
        {
            let _ = std::fs::write(f, json);
        }
    }

    async fn tell_mock(&self, what: &str) -> Result<(), String> {
        let Some(url) = &self.mock_control else {
            return Ok(());
        };
        let r = reqwest::Client::new()
            .post(format!("{url}/zone/{what}"))
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| format!("mock control {url}: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("mock control {url}: {}", r.status()));
        }
        Ok(())
    }

    fn simulate(&self, cmd: &HostCommand) -> (CommandOutput, Option<&'static str>) {
        let mut sim = self.lock();
        sim.state.log.push(cmd.clone());
        let shown = cmd.to_string();
        let injected = sim
            .fail
            .iter()
            .position(|p| shown.starts_with(p.as_str()))
            .map(|i| sim.fail.remove(i));
        let args: Vec<&str> = cmd.args.iter().map(String::as_str).collect();
        let st = &mut sim.state;
        if injected.is_some() {
            // An install interrupted halfway leaves an incomplete zone.
            if let ("zoneadm", ["-z", z, "install", ..]) = (cmd.program.as_str(), &args[..])
                && let Some(zone) = st.zones.get_mut(*z)
            {
                zone.state = "incomplete".into();
            }
            let out = CommandOutput::fail(1, format!("{}: injected failure", cmd.program));
            self.save(st);
            return (out, None);
        }
        let mut hook = None;
        let out = match (cmd.program.as_str(), &args[..]) {
            ("zfs", ["list", "-H", "-o", "name", ds]) => {
                if st.datasets.contains_key(*ds) || st.snapshots.contains(*ds) {
                    CommandOutput::ok(format!("{ds}\n"))
                } else {
                    CommandOutput::fail(1, format!("cannot open '{ds}': dataset does not exist\n"))
                }
            }
            ("zfs", ["create", "-p", "-V", size, ds]) => {
                if st.datasets.contains_key(*ds) {
                    CommandOutput::fail(
                        1,
                        format!("cannot create '{ds}': dataset already exists\n"),
                    )
                } else {
                    st.datasets.insert(
                        (*ds).to_owned(),
                        Dataset {
                            volsize: Some((*size).to_owned()),
                            origin: None,
                        },
                    );
                    CommandOutput::ok("")
                }
            }
            ("zfs", ["snapshot", snap]) => match snap.split_once('@') {
                Some((ds, _)) if st.datasets.contains_key(ds) => {
                    if st.snapshots.insert((*snap).to_owned()) {
                        CommandOutput::ok("")
                    } else {
                        CommandOutput::fail(
                            1,
                            format!("cannot create snapshot '{snap}': dataset already exists\n"),
                        )
                    }
                }
                _ => CommandOutput::fail(
                    1,
                    format!("cannot open '{snap}': dataset does not exist\n"),
                ),
            },
            ("zfs", ["clone", "-p", snap, ds]) => {
                if !st.snapshots.contains(*snap) {
                    CommandOutput::fail(
                        1,
                        format!("cannot open '{snap}': dataset does not exist\n"),
                    )
                } else if st.datasets.contains_key(*ds) {
                    CommandOutput::fail(
                        1,
                        format!("cannot create '{ds}': dataset already exists\n"),
                    )
                } else {
                    let volsize = snap
                        .split_once('@')
                        .and_then(|(o, _)| st.datasets.get(o))
                        .and_then(|d| d.volsize.clone());
                    st.datasets.insert(
                        (*ds).to_owned(),
                        Dataset {
                            volsize,
                            origin: Some((*snap).to_owned()),
                        },
                    );
                    CommandOutput::ok("")
                }
            }
            ("zfs", ["set", prop, ds]) => {
                match (prop.strip_prefix("volsize="), st.datasets.get_mut(*ds)) {
                    (Some(v), Some(d)) => {
                        d.volsize = Some(v.to_owned());
                        CommandOutput::ok("")
                    }
                    (_, None) => CommandOutput::fail(
                        1,
                        format!("cannot open '{ds}': dataset does not exist\n"),
                    ),
                    (None, _) => CommandOutput::fail(2, format!("invalid property '{prop}'\n")),
                }
            }
            ("zfs", ["destroy", "-r", ds]) => {
                if st.datasets.remove(*ds).is_some() {
                    let prefix = format!("{ds}@");
                    st.snapshots.retain(|s| !s.starts_with(&prefix));
                    CommandOutput::ok("")
                } else {
                    CommandOutput::fail(1, format!("cannot open '{ds}': dataset does not exist\n"))
                }
            }
            ("qemu-img", ["convert", "-n", "-O", "raw", _src, dev]) => {
                let ds = dev.strip_prefix("/dev/zvol/rdsk/").unwrap_or(dev);
                if st.datasets.contains_key(ds) {
                    CommandOutput::ok("")
                } else {
                    CommandOutput::fail(
                        1,
                        format!("qemu-img: Could not open '{dev}': No such file or directory\n"),
                    )
                }
            }
            ("zoneadm", ["-z", z, "list", "-p"]) => match st.zones.get(*z) {
                Some(zone) => {
                    CommandOutput::ok(format!("-:{z}:{}:/zones/{z}:-:-:excl\n", zone.state))
                }
                None => CommandOutput::fail(1, format!("zoneadm: {z}: No such zone configured\n")),
            },
            ("zonecfg", ["-z", z, "delete", "-F"]) => {
                match st.zones.get(*z).map(|zn| zn.state.as_str()) {
                    Some("configured") => {
                        st.zones.remove(*z);
                        CommandOutput::ok("")
                    }
                    Some(s) => CommandOutput::fail(
                        1,
                        format!("Zone {z} is {s}; it must be uninstalled first\n"),
                    ),
                    None => CommandOutput::fail(1, format!("{z}: No such zone configured\n")),
                }
            }
            ("zonecfg", ["-z", z, script]) => {
                if st.zones.contains_key(*z) {
                    CommandOutput::fail(1, format!("Zone {z} already exists; create not allowed\n"))
                } else {
                    st.zones.insert(
                        (*z).to_owned(),
                        Zone {
                            state: "configured".into(),
                            config: (*script).to_owned(),
                        },
                    );
                    CommandOutput::ok("")
                }
            }
            ("zoneadm", ["-z", z, op, rest @ ..]) => {
                let state = st.zones.get(*z).map(|zn| zn.state.clone());
                let (from, to): (&[&str], &str) = match (*op, rest) {
                    ("install", []) => (&["configured"], "installed"),
                    ("uninstall", ["-F"]) => (&["installed", "incomplete"], "configured"),
                    ("boot", []) => (&["installed"], "running"),
                    ("halt", []) => (&["running"], "installed"),
                    _ => (&[], ""),
                };
                match state {
                    None => {
                        CommandOutput::fail(1, format!("zoneadm: {z}: No such zone configured\n"))
                    }
                    Some(_) if to.is_empty() => {
                        CommandOutput::fail(2, format!("zoneadm: unknown subcommand {op}\n"))
                    }
                    Some(s) if from.contains(&s.as_str()) => {
                        if let Some(zone) = st.zones.get_mut(*z) {
                            zone.state = to.to_owned();
                        }
                        hook = match *op {
                            "boot" => Some("boot"),
                            "halt" => Some("halt"),
                            _ => None,
                        };
                        CommandOutput::ok("")
                    }
                    Some(s) => CommandOutput::fail(
                        1,
                        format!("zoneadm: zone '{z}': {op} operation is invalid for {s} zones.\n"),
                    ),
                }
            }
            ("dladm", ["show-vnic", "-p", "-o", "LINK,MACADDRESS", v]) => match st.vnics.get(*v) {
                Some((link, mac)) => {
                    CommandOutput::ok(format!("{link}:{}\n", mac.replace(':', "\\:")))
                }
                None => CommandOutput::fail(
                    1,
                    format!("dladm: invalid vnic name '{v}': object not found\n"),
                ),
            },
            ("dladm", ["create-vnic", "-t", "-l", link, "-m", mac, v]) => {
                if st.vnics.contains_key(*v) {
                    CommandOutput::fail(1, "dladm: vnic creation failed: object already exists\n")
                } else {
                    st.vnics
                        .insert((*v).to_owned(), ((*link).to_owned(), (*mac).to_owned()));
                    CommandOutput::ok("")
                }
            }
            ("dladm", ["delete-vnic", v]) => {
                if st.vnics.remove(*v).is_some() {
                    CommandOutput::ok("")
                } else {
                    CommandOutput::fail(1, "dladm: vnic deletion failed: object not found\n")
                }
            }
            (p, _) => CommandOutput::fail(127, format!("{p}: not simulated: {shown}\n")),
        };
        self.save(st);
        (out, hook)
    }
}

impl CommandRunner for SimulatedHost {
    fn run<'a>(&'a self, cmd: &'a HostCommand) -> BoxFuture<'a, std::io::Result<CommandOutput>> {
        Box::pin(async move {
            let (out, hook) = self.simulate(cmd);
            if let Some(what) = hook
                && let Err(e) = self.tell_mock(what).await
            {
                return Ok(CommandOutput::fail(1, e));
            }
            Ok(out)
        })
    }
}
