//! Extra disks attached to and detached from a running QEMU (hot-plug),
//! and which of a running QEMU's block devices are vmctl's disks.
//!
//! ```text
//!   attach: file made (or grown) ─▶ blockdev-add disk-<name> (qcow2 over
//!           disk-<name>-file) ─▶ device_add virtio-blk-pci id=disk-<name>,
//!           serial=<name>, bus=<a free root port>   (on failure: blockdev-del)
//!   detach: device_del disk-<name> ─▶ the guest ejects it (ACPI PCI
//!           hot-plug on q35's root ports) ─▶ gone from query-block (polled,
//!           at most UNPLUG_TIMEOUT) ─▶ blockdev-del disk-<name>
//! ```
//!
//! The node names, device id and serial are those `-blockdev`/`-device`
//! give a disk attached at start (args.rs), so a hot-plugged disk and one
//! attached at start look the same to the guest and to QMP. Devices on
//! pcie.0 cannot be unplugged (QEMU docs/pcie.txt, 5. Hot-plug), which is
//! why a VM starts with its extra disks on PCIe root ports of their own
//! and [`args::SPARE_PORTS`] empty ones. A QEMU started by an older vmctl
//! (disks on pcie.0 through `-drive`, no spare port) refuses both; the
//! controller then falls back to attaching or detaching at the next start.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use vmctl_api::ROOT_DISK;

use super::args;
use super::disk::{self, DiskError};
use super::qmp::{Qmp, QmpError};

/// Diagnostic code of a failed hot-plug or hot-unplug.
pub const HOTPLUG_FAILED: &str = "vmctl::qemu::hotplug_failed";

/// How long a hot-unplug waits for the guest to let the disk go, unless
/// configured otherwise (`QemuConfig::unplug_timeout`). Under
/// ACPI PCI hot-plug a Linux guest ejects it within milliseconds; a guest
/// that is still booting, or has no hot-plug support, never does.
pub const UNPLUG_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a pending unplug is looked at.
const UNPLUG_POLL: Duration = Duration::from_millis(100);

/// Errors of a hot-plug or hot-unplug.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// QEMU is not running.
    #[error("QEMU is not running")]
    NotRunning,
    /// Every root port holds a device (or the QEMU has none).
    #[error(
        "no free PCIe root port (a VM starts with {} spare; a restart places every disk on its own port and frees them again)",
        args::SPARE_PORTS
    )]
    NoFreePort,
    /// The disk's device sits on a bus without hot-plug.
    #[error("disk {0} is on pcie.0, which has no hot-plug (attached by an older vmctl)")]
    NotHotPluggable(String),
    /// The guest did not let the disk go in time.
    #[error("the guest did not release disk {disk} within {:?}", timeout)]
    UnplugTimeout {
        /// The disk.
        disk: String,
        /// How long it was given.
        timeout: Duration,
    },
    /// The disk's file could not be made or grown.
    #[error("disk file")]
    Disk(#[from] DiskError),
    /// A QMP command failed.
    #[error("QMP")]
    Qmp(#[from] QmpError),
}

/// One of vmctl's disks in a running QEMU's `query-block`.
#[derive(Debug, Clone, PartialEq)]
pub struct Attached {
    /// [`ROOT_DISK`] or the extra disk's name.
    pub disk: String,
    /// The BlockBackend name of a disk attached with `-drive` (the root
    /// disk, and extra disks of a QEMU started by an older vmctl); `None`
    /// for one attached with `-blockdev` or `blockdev-add`.
    pub device: Option<String>,
    /// The top (qcow2) node's name.
    pub node: String,
    /// The QOM path of the guest device (`…/virtio-backend`).
    pub qdev: Option<String>,
    /// The virtual size in bytes.
    pub size: Option<u64>,
    /// `inserted.image` (ImageInfo: snapshots, …).
    pub image: Value,
}

impl Attached {
    /// The QMP arguments that name its block device for `block_resize`
    /// (`device` for a BlockBackend name, else `node-name`).
    pub fn block_target(&self) -> Value {
        match &self.device {
            Some(d) => json!({ "device": d }),
            None => json!({ "node-name": self.node }),
        }
    }

    /// The id or QOM path `device_del` takes: the virtio-blk-pci proxy,
    /// the parent of the `virtio-backend` QMP reports.
    fn device_path(&self) -> Option<String> {
        let q = self.qdev.as_deref()?;
        Some(q.strip_suffix("/virtio-backend").unwrap_or(q).to_owned())
    }
}

/// vmctl's disks among `query-block`'s answer `blocks`, the root disk
/// first: `disk0`; extra disks by BlockBackend `disk-<name>` (`-drive`) or,
/// without one, by node `disk-<name>` (`-blockdev`, `blockdev-add`). The
/// seed and anything else are left out.
pub fn attached(blocks: &Value) -> Vec<Attached> {
    let mut out = Vec::new();
    for b in blocks.as_array().into_iter().flatten() {
        let Some(node) = b.pointer("/inserted/node-name").and_then(Value::as_str) else {
            continue;
        };
        let device = b
            .get("device")
            .and_then(Value::as_str)
            .filter(|d| !d.is_empty());
        let disk = match device {
            Some("disk0") => ROOT_DISK,
            Some(d) => match d.strip_prefix("disk-") {
                Some(name) => name,
                None => continue,
            },
            None => match node.strip_prefix("disk-") {
                Some(name) => name,
                None => continue,
            },
        };
        let a = Attached {
            disk: disk.to_owned(),
            device: device.map(str::to_owned),
            node: node.to_owned(),
            qdev: b.get("qdev").and_then(Value::as_str).map(str::to_owned),
            size: b
                .pointer("/inserted/image/virtual-size")
                .and_then(Value::as_u64),
            image: b.pointer("/inserted/image").cloned().unwrap_or(Value::Null),
        };
        if a.disk == ROOT_DISK {
            out.insert(0, a);
        } else {
            out.push(a);
        }
    }
    out
}

/// vmctl's disks of the running QEMU behind `q` ([`attached`]).
pub async fn query(q: &mut Qmp) -> Result<Vec<Attached>, QmpError> {
    Ok(attached(&q.execute("query-block", None).await?))
}

/// The lowest numbered of the root ports among `peripherals` (QMP
/// `qom-list` of `/machine/peripheral`; ports are named by
/// [`args::port_id`]) that is not in `used`.
pub fn pick_port(peripherals: &Value, used: &[String]) -> Option<String> {
    peripherals
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| t == "child<pcie-root-port>")
        })
        .filter_map(|p| p.get("name").and_then(Value::as_str))
        .filter_map(|id| {
            let n = id.strip_prefix(args::PORT_PREFIX)?.parse::<usize>().ok()?;
            Some((n, id.to_owned()))
        })
        .filter(|(_, id)| !used.contains(id))
        .min()
        .map(|(_, id)| id)
}

/// A root port of the running QEMU behind `q` that holds no disk. Which
/// port a disk sits on is read from QOM (its device's `parent_bus`), not
/// from `query-pci`, whose view of the ports depends on the bus numbers
/// the guest's firmware has given them (none yet while it boots).
async fn free_port(q: &mut Qmp) -> Result<Option<String>, QmpError> {
    let mut used = Vec::new();
    for a in query(q).await? {
        let Some(dev) = a.device_path().filter(|_| a.device.is_none()) else {
            continue;
        };
        let bus = q
            .execute(
                "qom-get",
                Some(json!({ "path": dev, "property": "parent_bus" })),
            )
            .await?;
        // `/machine/peripheral/hotplug1/hotplug1`: the port's own bus.
        if let Some(port) = bus.as_str().and_then(|b| b.rsplit('/').next()) {
            used.push(port.to_owned());
        }
    }
    let peripherals = q
        .execute("qom-list", Some(json!({ "path": "/machine/peripheral" })))
        .await?;
    Ok(pick_port(&peripherals, &used))
}

/// Attaches extra disk `name` (file `path`, `bytes` long at least) to the
/// running QEMU behind `q`; the guest sees it with serial `name`. The file
/// is made when missing and grown when smaller (it is not open: the disk
/// is not attached). One attached already is left as it is.
pub async fn attach(q: &mut Qmp, name: &str, path: &Path, bytes: u64) -> Result<(), HotplugError> {
    if query(q).await?.iter().any(|a| a.disk == name) {
        return Ok(());
    }
    let port = free_port(q).await?.ok_or(HotplugError::NoFreePort)?;
    if path.exists() {
        let current = disk::virtual_size(path).await?;
        if let Some(b) = disk::growth(current, Some(bytes)) {
            disk::grow_file(path, b).await?;
        }
    } else {
        disk::create_blank(path, bytes).await?;
    }
    // A node left by an unplug that the guest finished late: not attached
    // (query-block above), so it can go.
    let node = format!("disk-{name}");
    let _ = q
        .execute("blockdev-del", Some(json!({ "node-name": node })))
        .await;
    q.execute("blockdev-add", Some(args::blockdev(name, path)))
        .await?;
    let device = json!({
        "driver": "virtio-blk-pci",
        "id": format!("disk-{name}"),
        "drive": node,
        "serial": name,
        "bus": port,
        // Slot 0, the only one a guest scans behind a PCIe port: QEMU
        // would otherwise put a second device on a port in another slot
        // (under ACPI hot-plug it does not refuse), invisible to the guest.
        "addr": "0",
    });
    if let Err(e) = q.execute("device_add", Some(device)).await {
        let _ = q
            .execute("blockdev-del", Some(json!({ "node-name": node })))
            .await;
        return Err(e.into());
    }
    Ok(())
}

/// Detaches extra disk `name` from the running QEMU behind `q`: asks the
/// guest to release it (`device_del`), waits until QEMU reports it gone
/// (at most `timeout`), then removes its block node. One not attached is
/// not an error (a node left behind is removed). A guest that never
/// releases it keeps it until QEMU ends; the unplug request stays pending.
pub async fn detach(q: &mut Qmp, name: &str, timeout: Duration) -> Result<(), HotplugError> {
    let node = format!("disk-{name}");
    let Some(a) = query(q).await?.into_iter().find(|a| a.disk == name) else {
        let _ = q
            .execute("blockdev-del", Some(json!({ "node-name": node })))
            .await;
        return Ok(());
    };
    // A `-drive` extra disk was placed on pcie.0 by an older vmctl.
    let Some(dev) = a.device_path().filter(|_| a.device.is_none()) else {
        return Err(HotplugError::NotHotPluggable(name.to_owned()));
    };
    match q.execute("device_del", Some(json!({ "id": dev }))).await {
        Ok(_) => {}
        // An unplug asked for before is still pending: wait for it.
        Err(QmpError::Command { ref desc, .. }) if desc.contains("in progress") => {}
        Err(QmpError::Command { ref desc, .. })
            if desc.contains("does not support hotplugging") =>
        {
            return Err(HotplugError::NotHotPluggable(name.to_owned()));
        }
        Err(e) => return Err(e.into()),
    }
    let deadline = tokio::time::Instant::now() + timeout;
    while query(q).await?.iter().any(|a| a.disk == name) {
        if tokio::time::Instant::now() >= deadline {
            return Err(HotplugError::UnplugTimeout {
                disk: name.to_owned(),
                timeout,
            });
        }
        tokio::time::sleep(UNPLUG_POLL).await;
    }
    q.execute("blockdev-del", Some(json!({ "node-name": node })))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_disk_extra_disks_of_either_kind_and_nothing_else_are_vmctls() {
        let blocks = json!([
            {"device": "seed0", "inserted": {"node-name": "#block1", "image": {"virtual-size": 1}}},
            {"device": "disk-old", "qdev": "/machine/peripheral-anon/device[2]/virtio-backend",
             "inserted": {"node-name": "#block3", "image": {"virtual-size": 3}}},
            {"device": "", "qdev": "/machine/peripheral/disk-data/virtio-backend",
             "inserted": {"node-name": "disk-data", "image": {"virtual-size": 4}}},
            {"device": "disk0", "inserted": {"node-name": "#block0", "image": {"virtual-size": 5}}},
            {"device": "", "inserted": {"node-name": "other"}},
            {"device": "cd0"},
        ]);
        let a = attached(&blocks);
        let names: Vec<_> = a.iter().map(|a| (a.disk.as_str(), a.size)).collect();
        assert_eq!(
            names,
            [("root", Some(5)), ("old", Some(3)), ("data", Some(4))]
        );
        assert_eq!(a[0].block_target(), json!({"device": "disk0"}));
        assert_eq!(a[2].block_target(), json!({"node-name": "disk-data"}));
        assert_eq!(
            a[2].device_path().as_deref(),
            Some("/machine/peripheral/disk-data")
        );
    }

    #[test]
    fn the_free_port_is_the_lowest_numbered_root_port_without_a_disk() {
        let peripherals = json!([
            {"name": "type", "type": "string"},
            {"name": "hotplug0", "type": "child<pcie-root-port>"},
            {"name": "hotplug10", "type": "child<pcie-root-port>"},
            {"name": "hotplug2", "type": "child<pcie-root-port>"},
            {"name": "hotplugx", "type": "child<pcie-root-port>"},
            {"name": "hotplug1", "type": "child<virtio-blk-pci>"},
            {"name": "disk-data", "type": "child<virtio-blk-pci>"},
        ]);
        let used = |ids: &[&str]| ids.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            pick_port(&peripherals, &used(&[])).as_deref(),
            Some("hotplug0")
        );
        assert_eq!(
            pick_port(&peripherals, &used(&["hotplug0"])).as_deref(),
            Some("hotplug2")
        );
        assert_eq!(
            pick_port(&peripherals, &used(&["hotplug0", "hotplug2"])).as_deref(),
            Some("hotplug10")
        );
        assert_eq!(
            pick_port(&peripherals, &used(&["hotplug0", "hotplug2", "hotplug10"])),
            None
        );
        assert_eq!(pick_port(&json!([]), &used(&[])), None);
    }
}
