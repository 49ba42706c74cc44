//! Snapshots of a QEMU VM: qcow2 internal snapshots on the VM's disks
//! (the root overlay and every extra disk; never the read-only seed).
//!
//! ```text
//!   QEMU running (or paused)          QEMU not running
//!   QMP jobs (QEMU ≥ 6.0):            qemu-img snapshot:
//!     snapshot-save  (disks + memory,   -c  (disks only)
//!                     vmstate on root)
//!     snapshot-load                     -a  (disks only)
//!     snapshot-delete                   -d
//!   listed by query-block             listed by qemu-img info
//! ```
//!
//! A job is followed with `query-jobs` until it concludes, then dismissed.
//! The tag on the disks is `vmctl-<snapshot name>`: qcow2 looks snapshots
//! up by id *or* tag, and ids are numbers, so a bare name like `1` could
//! name another snapshot. Tags without the prefix (made by hand) are left
//! alone.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::Command;
use vmctl_api::ROOT_DISK;

use super::qmp::{Qmp, QmpError};
use super::{Layout, QemuDriver, QemuError, disk_path, process, read_config};
use crate::drivers::{DriverError, InstanceState, SnapshotInfo};

/// Diagnostic code of a failed snapshot operation.
pub const SNAPSHOT_FAILED: &str = "vmctl::qemu::snapshot_failed";

/// The prefix of vmctl's tags on a qcow2 disk.
const TAG_PREFIX: &str = "vmctl-";

/// How long a snapshot job may run (a save writes the guest's memory; a
/// load reads it back). `stop` and `destroy` do not wait for it.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// How often a running job is looked at.
const JOB_POLL: Duration = Duration::from_millis(100);

/// Errors of the snapshot operations.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// `qemu-img` could not be run.
    #[error("Cannot run qemu-img")]
    Spawn(#[source] std::io::Error),
    /// `qemu-img` failed on a disk.
    #[error("qemu-img snapshot {op} on {} failed: {stderr}", path.display())]
    Tool {
        /// `-c`, `-a`, `-d` or `info`.
        op: &'static str,
        /// The disk file.
        path: PathBuf,
        /// qemu-img's standard error.
        stderr: String,
    },
    /// A QMP command failed.
    #[error("QMP")]
    Qmp(#[from] QmpError),
    /// A snapshot job ended with an error.
    #[error("{job} failed: {error}")]
    Job {
        /// The job's command.
        job: &'static str,
        /// QEMU's message.
        error: String,
    },
    /// The running VM has shared folders, whose state QEMU cannot save
    /// (virtio-fs and 9p devices block savevm and migration).
    #[error(
        "a running VM with shared folders has no memory snapshots: QEMU cannot save or load the state of its virtio-fs or 9p devices; stop the VM (vmctl stop) to snapshot or restore its disks, or remove its shares"
    )]
    SharedFolders,
    /// A memory snapshot cannot be loaded: the disks attached to the
    /// running guest are not those it was saved with (its device state
    /// would not match the machine; QEMU can hang in the load).
    #[error(
        "snapshot {snapshot} holds the memory of a VM with disks ({}), but the running VM has ({}): loading it into different devices could wedge QEMU; stop the VM (vmctl stop) to restore its disks only, or attach/detach disks to match first",
        saved.join(", "),
        attached.join(", ")
    )]
    DisksChanged {
        /// The snapshot's name.
        snapshot: String,
        /// The disks holding the snapshot, root first.
        saved: Vec<String>,
        /// The disks attached to the guest now, root first.
        attached: Vec<String>,
    },
    /// A memory snapshot cannot be loaded while the guest has not finished
    /// a disk hot-unplug (a `device_del` QEMU still holds pending).
    #[error(
        "the guest has not released disk(s) {} it was asked to detach; a memory snapshot cannot be loaded while that unplug is pending: stop the VM (vmctl stop) to restore its disks only",
        disks.join(", ")
    )]
    UnplugPending {
        /// The disks whose unplug is pending.
        disks: Vec<String>,
    },
    /// Loading a memory snapshot into the running QEMU failed; QEMU was
    /// ended, since a failed load leaves the guest's memory half-written.
    #[error(
        "{cause}; QEMU was ended, as a failed load leaves the guest's memory half-written: its disks may or may not be at the snapshot, so restore again with the VM stopped for a known state"
    )]
    LoadFailed {
        /// Why the load failed (in the message, not a source: it is said once).
        cause: Box<SnapshotError>,
    },
    /// A snapshot job did not end in time.
    #[error("{job} did not finish within {} s", JOB_TIMEOUT.as_secs())]
    JobTimeout {
        /// The job's command.
        job: &'static str,
    },
}

/// The qcow2 tag of snapshot `name`.
fn tag(name: &str) -> String {
    format!("{TAG_PREFIX}{name}")
}

/// One disk's snapshots, by tag: (tag, vm-state-size, date-sec).
type DiskSnapshots = Vec<(String, u64, i64)>;

/// The snapshot list of one `ImageInfo` (`qemu-img info`, `query-block`).
fn parse_snapshots(image: &Value) -> DiskSnapshots {
    image
        .get("snapshots")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|s| {
            Some((
                s.get("name")?.as_str()?.to_owned(),
                s.get("vm-state-size").and_then(Value::as_u64).unwrap_or(0),
                s.get("date-sec").and_then(Value::as_i64).unwrap_or(0),
            ))
        })
        .collect()
}

/// vmctl's snapshots over every disk (`(disk, its snapshots)`, root first):
/// one entry per tag, holding the disks that have it.
fn merge(disks: &[(String, DiskSnapshots)]) -> Vec<SnapshotInfo> {
    let mut out: Vec<SnapshotInfo> = Vec::new();
    for (disk, snaps) in disks {
        for (t, vm_state, date) in snaps {
            let Some(name) = t.strip_prefix(TAG_PREFIX) else {
                continue;
            };
            match out.iter_mut().find(|i| i.name == name) {
                Some(i) => i.disks.push(disk.clone()),
                None => out.push(SnapshotInfo {
                    name: name.to_owned(),
                    memory: *vm_state > 0,
                    vm_state_bytes: *vm_state,
                    created: chrono::DateTime::from_timestamp(*date, 0),
                    disks: vec![disk.clone()],
                }),
            }
        }
    }
    out
}

/// The block devices of a running QEMU that are vmctl's disks:
/// (disk name, node name, its snapshots), root first.
async fn running_disks(q: &mut Qmp) -> Result<Vec<(String, String, DiskSnapshots)>, QmpError> {
    Ok(super::hotplug::query(q)
        .await?
        .into_iter()
        .map(|a| {
            let snaps = parse_snapshots(&a.image);
            (a.disk, a.node, snaps)
        })
        .collect())
}

/// Runs a snapshot job to its end and dismisses it.
async fn run_job(q: &mut Qmp, job: &'static str, args: Value) -> Result<(), SnapshotError> {
    let id = args["job-id"].as_str().unwrap_or_default().to_owned();
    q.execute(job, Some(args)).await?;
    let deadline = tokio::time::Instant::now() + JOB_TIMEOUT;
    loop {
        let jobs = q.execute("query-jobs", None).await?;
        let this = jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j.get("id").and_then(Value::as_str) == Some(id.as_str()));
        let status = this.and_then(|j| j.get("status")).and_then(Value::as_str);
        if status == Some("concluded") || this.is_none() {
            let error = this
                .and_then(|j| j.get("error"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            if this.is_some() {
                q.execute("job-dismiss", Some(json!({ "id": id }))).await?;
            }
            return match error {
                Some(error) => Err(SnapshotError::Job { job, error }),
                None => Ok(()),
            };
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(SnapshotError::JobTimeout { job });
        }
        tokio::time::sleep(JOB_POLL).await;
    }
}

/// Runs `qemu-img` with `args` on `path`; its standard output.
async fn qemu_img(op: &'static str, args: &[&str], path: &Path) -> Result<String, SnapshotError> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(args).arg(path);
    output(cmd, op, path).await
}

/// `qemu-img snapshot OP TAG` on the qcow2 disk `path`. `qemu-img
/// snapshot` has no `-f`: the format is given in `--image-opts` (a comma
/// in the path doubled), so it is never probed.
async fn qemu_img_snapshot(op: &'static str, t: &str, path: &Path) -> Result<(), SnapshotError> {
    let opts = format!(
        "driver=qcow2,file.driver=file,file.filename={}",
        path.display().to_string().replace(',', ",,")
    );
    let mut cmd = Command::new("qemu-img");
    cmd.args(["snapshot", "-q", "--image-opts", op, t])
        .arg(opts);
    output(cmd, op, path).await.map(drop)
}

/// Runs `cmd` (qemu-img doing `op` on `path`); its standard output.
async fn output(mut cmd: Command, op: &'static str, path: &Path) -> Result<String, SnapshotError> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(SnapshotError::Spawn)?;
    if !out.status.success() {
        return Err(SnapshotError::Tool {
            op,
            path: path.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The disk files of a VM whose QEMU is not running, root first, with
/// their snapshots.
async fn stopped_disks(l: &Layout) -> Result<Vec<(String, PathBuf, DiskSnapshots)>, SnapshotError> {
    let extra = read_config(l).map(|c| c.disks).unwrap_or_default();
    let mut out = Vec::new();
    for disk in std::iter::once(ROOT_DISK.to_owned()).chain(extra) {
        let path = disk_path(l, &disk);
        if !path.exists() {
            continue;
        }
        let info = qemu_img(
            "info",
            &["info", "--output=json", "-f", "qcow2", "--force-share"],
            &path,
        )
        .await?;
        let image: Value = serde_json::from_str(&info).unwrap_or(Value::Null);
        out.push((disk, path, parse_snapshots(&image)));
    }
    Ok(out)
}

/// The extra disks whose files are in the work dir of `l`
/// (`disk-NAME.qcow2`) but that are not among `attached`, by name, sorted.
fn unattached_disk_files(l: &Layout, attached: &[String]) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(&l.root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let f = e.file_name().into_string().ok()?;
            let name = f.strip_prefix("disk-")?.strip_suffix(".qcow2")?.to_owned();
            (!attached.contains(&name)).then_some(name)
        })
        .collect();
    out.sort();
    out
}

impl QemuDriver {
    fn snapshot_err(&self, name: &str) -> impl FnOnce(SnapshotError) -> QemuError {
        let name = name.to_owned();
        move |source| QemuError::Snapshot { name, source }
    }

    /// vmctl's snapshots of `name`; `None` when it has no instance.
    pub(super) async fn do_snapshots(
        &self,
        name: &str,
    ) -> Result<Option<Vec<SnapshotInfo>>, QemuError> {
        let l = self.layout(name);
        if read_config(&l).is_none() {
            return Ok(None);
        }
        let err = self.snapshot_err(name);
        if process::running_pid(&l).is_some() {
            let mut q = self.qmp(name, &l).await?;
            let disks = running_disks(&mut q)
                .await
                .map_err(|e| self.snapshot_err(name)(e.into()))?;
            let disks: Vec<_> = disks.into_iter().map(|(d, _, s)| (d, s)).collect();
            return Ok(Some(merge(&disks)));
        }
        let disks = stopped_disks(&l).await.map_err(err)?;
        let disks: Vec<_> = disks.into_iter().map(|(d, _, s)| (d, s)).collect();
        Ok(Some(merge(&disks)))
    }

    /// Saves snapshot `snapshot` of `name` (see [`crate::drivers::Hypervisor::create_snapshot`]).
    pub(super) async fn do_create_snapshot(
        &self,
        name: &str,
        snapshot: &str,
    ) -> Result<SnapshotInfo, DriverError> {
        let existing = self
            .do_snapshots(name)
            .await?
            .ok_or_else(|| DriverError::NotFound(name.to_owned()))?;
        if let Some(s) = existing.into_iter().find(|s| s.name == snapshot) {
            return Ok(s);
        }
        let l = self.layout(name);
        let err = self.snapshot_err(name);
        let t = tag(snapshot);
        if process::running_pid(&l).is_some() {
            if super::read_config(&l).is_some_and(|c| !c.shares.is_empty()) {
                return Err(err(SnapshotError::SharedFolders).into());
            }
            let mut q = self.qmp(name, &l).await?;
            let disks = running_disks(&mut q)
                .await
                .map_err(|e| self.snapshot_err(name)(e.into()))?;
            let Some((_, root, _)) = disks.first().filter(|(d, _, _)| d == ROOT_DISK) else {
                return Err(DriverError::NotFound(format!(
                    "the root disk of the running QEMU of {name}"
                )));
            };
            let args = json!({
                "job-id": format!("save-{t}"),
                "tag": t,
                "vmstate": root,
                "devices": disks.iter().map(|(_, n, _)| n.clone()).collect::<Vec<_>>(),
            });
            run_job(&mut q, "snapshot-save", args).await.map_err(err)?;
        } else {
            for (_, path, _) in stopped_disks(&l).await.map_err(self.snapshot_err(name))? {
                qemu_img_snapshot("-c", &t, &path)
                    .await
                    .map_err(self.snapshot_err(name))?;
            }
        }
        self.do_snapshots(name)
            .await?
            .and_then(|all| all.into_iter().find(|s| s.name == snapshot))
            .ok_or_else(|| {
                DriverError::Backend(format!(
                    "snapshot {snapshot} of {name} is not on its disks after saving it"
                ))
            })
    }

    /// Restores `name` to `snapshot` (see [`crate::drivers::Hypervisor::restore_snapshot`]).
    pub(super) async fn do_restore_snapshot(
        &self,
        name: &str,
        snapshot: &str,
    ) -> Result<(), DriverError> {
        let info = self
            .do_snapshots(name)
            .await?
            .ok_or_else(|| DriverError::NotFound(name.to_owned()))?
            .into_iter()
            .find(|s| s.name == snapshot)
            .ok_or_else(|| DriverError::NotFound(format!("snapshot {snapshot} of VM {name}")))?;
        if process::running_pid(&self.layout(name)).is_some() && !info.memory {
            return Err(DriverError::InvalidState {
                op: "restore a disk-only snapshot to",
                name: name.to_owned(),
                state: InstanceState::Running,
            });
        }
        let l = self.layout(name);
        let Some(pid) = process::running_pid(&l) else {
            return self
                .on_saved_disks(name, &info, "snapshot-load", "-a")
                .await;
        };
        let err = self.snapshot_err(name);
        if super::read_config(&l).is_some_and(|c| !c.shares.is_empty()) {
            return Err(err(SnapshotError::SharedFolders).into());
        }
        self.check_loadable(name, &l, &info).await.map_err(err)?;
        let load = async {
            let mut q = self.qmp(name, &l).await.map_err(|e| SnapshotError::Job {
                job: "snapshot-load",
                error: vmctl_api::error_chain(&e),
            })?;
            let disks = running_disks(&mut q).await?;
            let node = |want: &dyn Fn(&str) -> bool| -> Vec<String> {
                disks
                    .iter()
                    .filter(|(d, _, _)| want(d))
                    .map(|(_, n, _)| n.clone())
                    .collect()
            };
            let t = tag(&info.name);
            let args = json!({
                "job-id": format!("snapshot-load-{t}"),
                "tag": t,
                "devices": node(&|d| info.disks.iter().any(|x| x == d)),
                "vmstate": node(&|d| d == ROOT_DISK).first(),
            });
            run_job(&mut q, "snapshot-load", args).await
        };
        match load.await {
            Ok(()) => Ok(()),
            Err(cause) => {
                tracing::warn!(vm = name, error = %cause, "snapshot-load failed; ending QEMU");
                if let Err(k) = self.kill(name, &l, pid).await {
                    tracing::warn!(vm = name, error = %k, "cannot end QEMU after a failed load");
                }
                let cause = Box::new(cause);
                Err(self.snapshot_err(name)(SnapshotError::LoadFailed { cause }).into())
            }
        }
    }

    /// Refuses to load memory snapshot `info` into the running QEMU of
    /// `name` when the guest's disks are not those it was saved with, or a
    /// disk unplug is pending: QEMU's load expects the same devices, and
    /// was seen to hang (and then ignore SIGTERM) when they differed.
    async fn check_loadable(
        &self,
        name: &str,
        l: &Layout,
        info: &SnapshotInfo,
    ) -> Result<(), SnapshotError> {
        let pending: Vec<String> = std::fs::read_to_string(l.unplug_pending())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if !pending.is_empty() {
            return Err(SnapshotError::UnplugPending { disks: pending });
        }
        let mut q = self.qmp(name, l).await.map_err(|e| SnapshotError::Job {
            job: "snapshot-load",
            error: vmctl_api::error_chain(&e),
        })?;
        // Disks with a guest device; a block node left without one (an
        // unplug the guest finished late) is not part of the machine.
        let attached: Vec<String> = super::hotplug::query(&mut q)
            .await?
            .into_iter()
            .filter(|a| a.qdev.is_some() || a.device.is_some())
            .map(|a| a.disk)
            .collect();
        // A disk detached since keeps its file, and the snapshot's tag on
        // it: query-block no longer lists it, so look at the files.
        let mut saved = info.disks.clone();
        let t = tag(&info.name);
        for extra in unattached_disk_files(l, &attached) {
            let path = super::disk_path(l, &extra);
            let out = qemu_img(
                "info",
                &["info", "--output=json", "-f", "qcow2", "--force-share"],
                &path,
            )
            .await?;
            let image: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
            if parse_snapshots(&image).iter().any(|(x, _, _)| *x == t) && !saved.contains(&extra) {
                saved.push(extra);
            }
        }
        let mut a = attached.clone();
        let mut s = saved.clone();
        a.sort();
        s.sort();
        if a != s {
            return Err(SnapshotError::DisksChanged {
                snapshot: info.name.clone(),
                saved,
                attached,
            });
        }
        Ok(())
    }

    /// Deletes `snapshot` of `name` where it is (see [`crate::drivers::Hypervisor::delete_snapshot`]).
    pub(super) async fn do_delete_snapshot(
        &self,
        name: &str,
        snapshot: &str,
    ) -> Result<(), DriverError> {
        let Some(all) = self.do_snapshots(name).await? else {
            return Ok(());
        };
        let Some(info) = all.into_iter().find(|s| s.name == snapshot) else {
            return Ok(());
        };
        self.on_saved_disks(name, &info, "snapshot-delete", "-d")
            .await
    }

    /// Runs QMP job `job` (QEMU running: `snapshot-load` also loads the
    /// memory state from the root disk) or `qemu-img snapshot OP` (not
    /// running) on the disks that hold snapshot `info` of `name`.
    async fn on_saved_disks(
        &self,
        name: &str,
        info: &SnapshotInfo,
        job: &'static str,
        op: &'static str,
    ) -> Result<(), DriverError> {
        let l = self.layout(name);
        let t = tag(&info.name);
        let err = || self.snapshot_err(name);
        if process::running_pid(&l).is_some() {
            let mut q = self.qmp(name, &l).await?;
            let disks = running_disks(&mut q).await.map_err(|e| err()(e.into()))?;
            let node = |want: &dyn Fn(&str) -> bool| -> Vec<String> {
                disks
                    .iter()
                    .filter(|(d, _, _)| want(d))
                    .map(|(_, n, _)| n.clone())
                    .collect()
            };
            let devices = node(&|d| info.disks.iter().any(|x| x == d));
            let mut args = json!({ "job-id": format!("{job}-{t}"), "tag": t, "devices": devices });
            if job == "snapshot-load" {
                args["vmstate"] = json!(node(&|d| d == ROOT_DISK).first());
            }
            run_job(&mut q, job, args).await.map_err(err())?;
        } else {
            for (disk, path, _) in stopped_disks(&l).await.map_err(err())? {
                if info.disks.contains(&disk) {
                    qemu_img_snapshot(op, &t, &path).await.map_err(err())?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_vmctls_tags_are_listed_one_entry_per_snapshot_with_its_disks() {
        let root = vec![
            ("vmctl-before".to_owned(), 5 << 20, 1_700_000_000),
            ("by-hand".to_owned(), 0, 1_700_000_001),
        ];
        let data = vec![("vmctl-before".to_owned(), 0, 1_700_000_000)];
        let got = merge(&[("root".into(), root), ("data".into(), data)]);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].name, "before");
        assert!(got[0].memory);
        assert_eq!(got[0].vm_state_bytes, 5 << 20);
        assert_eq!(got[0].disks, vec!["root".to_owned(), "data".to_owned()]);
        assert_eq!(got[0].created.unwrap().timestamp(), 1_700_000_000);
    }

    /// A name that is all digits would also match a qcow2 snapshot *id*;
    /// the prefix keeps `1` from naming the first snapshot on the disk.
    #[tokio::test]
    async fn a_numeric_snapshot_name_never_names_another_snapshot_by_id() {
        let dir = tempfile::tempdir().unwrap();
        // A comma in the path: `--image-opts` needs it doubled.
        let path = dir.path().join("d,1.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&path)
            .arg("1M")
            .status()
            .unwrap();
        assert!(st.success());
        for name in ["first", "1"] {
            qemu_img_snapshot("-c", &tag(name), &path).await.unwrap();
        }
        // Deleting snapshot "1" removes the one named 1, not id 1 ("first").
        qemu_img_snapshot("-d", &tag("1"), &path).await.unwrap();
        let info = qemu_img("info", &["info", "--output=json", "-f", "qcow2"], &path)
            .await
            .unwrap();
        let names: Vec<String> = merge(&[(
            "root".into(),
            parse_snapshots(&serde_json::from_str(&info).unwrap()),
        )])
        .into_iter()
        .map(|s| s.name)
        .collect();
        assert_eq!(names, vec!["first".to_owned()]);
    }
}
