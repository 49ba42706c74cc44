//! The disk part of the VM plan: what the spec asks of each disk's size
//! against what the hypervisor reports, as conditions and steps.
//!
//! ```text
//!   spec asks less than a disk has ──▶ DiskShrinkRefused True (+ Warning note);
//!                                      the disk keeps its size, the VM runs on
//!   spec asks more, instance up, backend resizes live (and no live resize
//!   failed for this generation) ──▶ ResizeDisk
//!   spec asks more, otherwise ──▶ DiskResizePending True (applies at the next
//!                                 start; a running VM also needs RestartRequired)
//!   an extra disk added to or removed from the spec of a running VM,
//!   backend hot-plugs (no hot-plug failed for this generation)
//!                               ──▶ AttachDisk / DetachDisk (live; a removed
//!                                   disk's file is kept until the VM is deleted)
//!   … otherwise, or a hot-plug failed ──▶ RestartRequired (attached or
//!                                   detached at the next start; reason
//!                                   HotPlugFailed after a failure)
//!   … of a paused VM whose backend hot-plugs ──▶ waits for the resume
//! ```
//!
//! A disk the hypervisor does not report (a backend that reports none, an
//! instance not prepared yet) is not judged.

use vmctl_api::{ConditionStatus, ROOT_DISK};

use super::Observed;

/// One GiB in bytes.
pub const GIB: u64 = 1 << 30;

/// Condition type: the spec asks a disk to shrink, which is refused.
pub const SHRINK_REFUSED: &str = "DiskShrinkRefused";
/// Condition type: a disk grows only at the next start.
pub const RESIZE_PENDING: &str = "DiskResizePending";
/// Reason of [`RESIZE_PENDING`] after a live resize failed; it is not
/// tried again for the same generation.
pub const LIVE_RESIZE_FAILED: &str = "LiveResizeFailed";

/// Reason of `RestartRequired` after a disk hot-plug or hot-unplug
/// failed; no disk is hot-plugged again for the same generation.
pub const HOTPLUG_FAILED: &str = "HotPlugFailed";

/// A disk whose size the spec and the hypervisor disagree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeChange {
    /// The disk's name ([`ROOT_DISK`] or an entry of `spec.disks`).
    pub disk: String,
    /// Its size now, in bytes.
    pub from: u64,
    /// The size the spec asks for, in bytes.
    pub to: u64,
}

impl SizeChange {
    /// `root: 2 GiB → 3 GiB`.
    pub fn describe(&self) -> String {
        format!(
            "{}: {} → {}",
            self.disk,
            human_size(self.from),
            human_size(self.to)
        )
    }
}

/// A disk size for notes and messages, in one unit whatever the size:
/// `3 GiB`, `2.2 GiB`, `512 MiB` (found as: a resize note said "from
/// 2361393152 bytes to 3 GiB").
pub fn human_size(bytes: u64) -> String {
    vmctl_api::limits::human_bytes(bytes)
}

/// The note of a disk attached live. Where the guest finds it, honestly:
/// `/dev/disk/by-id/` exists only where udev runs (found as: a tiny guest
/// without udev had no such path), the serial in sysfs always.
pub fn attached_note(vm: &str, disk: &str, size_bytes: u64) -> String {
    format!(
        "Attached disk {disk} ({}) to VM {vm} while it runs (live); the guest sees it as /dev/disk/by-id/virtio-{disk} where udev runs, otherwise as the /dev/vdX whose /sys/block/vdX/serial is {disk}",
        human_size(size_bytes)
    )
}

/// The message of the [`SHRINK_REFUSED`] condition and its Warning note
/// for VM `vm`, naming every disk of `shrink` (found as: a refused shrink
/// of the root and a data disk was noted as the root disk's alone).
pub fn shrink_refused(vm: &str, shrink: &[SizeChange]) -> (String, String) {
    let list: Vec<String> = shrink.iter().map(SizeChange::describe).collect();
    let kept: Vec<String> = shrink
        .iter()
        .map(|c| {
            format!(
                "{} at {} (the spec asks {})",
                c.disk,
                human_size(c.from),
                human_size(c.to)
            )
        })
        .collect();
    let (message, warning) = match shrink {
        [one] => (
            format!(
                "disks cannot shrink ({}); the disk keeps its size: set the size to at least {} again, or delete and recreate the VM for a smaller disk (that destroys it)",
                list.join(", "),
                // Sizes are asked in whole GiB.
                human_size(one.from.div_ceil(GIB) * GIB)
            ),
            format!("VM {vm} keeps disk {}: disks cannot shrink", kept[0]),
        ),
        _ => (
            format!(
                "disks cannot shrink ({}); each disk keeps its size: set each size to at least the one it has again, or delete and recreate the VM for smaller disks (that destroys them)",
                list.join(", ")
            ),
            format!(
                "VM {vm} keeps disks {}: disks cannot shrink",
                kept.join(", ")
            ),
        ),
    };
    (message, warning)
}

/// The size in bytes the spec asks for disk `name`, if it asks one.
fn wanted(o: &Observed, name: &str) -> Option<u64> {
    if name == ROOT_DISK {
        return o.spec.disk_gib.map(|g| g.saturating_mul(GIB));
    }
    o.spec
        .disks
        .iter()
        .find(|d| d.name == name)
        .map(|d| d.size_gib.saturating_mul(GIB))
}

/// Extra disks the spec lists that the instance does not have, and disks
/// the instance has that the spec no longer lists: (attach, detach). Empty
/// when there is no instance or it reports no disks.
pub fn attachment_changes(o: &Observed) -> (Vec<String>, Vec<String>) {
    let Some(inst) = o.instance.as_ref().filter(|i| !i.runtime.disks.is_empty()) else {
        return (Vec::new(), Vec::new());
    };
    let has = |name: &str| inst.runtime.disks.iter().any(|d| d.name == name);
    let attach = o
        .spec
        .disks
        .iter()
        .filter(|d| !has(&d.name))
        .map(|d| d.name.clone())
        .collect();
    let detach = inst
        .runtime
        .disks
        .iter()
        .filter(|d| d.name != ROOT_DISK && !o.spec.disks.iter().any(|s| s.name == d.name))
        .map(|d| d.name.clone())
        .collect();
    (attach, detach)
}

/// Disks the spec asks to be larger or smaller than the hypervisor
/// reports them: (grow, shrink).
pub fn size_changes(o: &Observed) -> (Vec<SizeChange>, Vec<SizeChange>) {
    let (mut grow, mut shrink) = (Vec::new(), Vec::new());
    let Some(inst) = &o.instance else {
        return (grow, shrink);
    };
    for d in &inst.runtime.disks {
        let Some(to) = wanted(o, &d.name) else {
            continue;
        };
        let change = SizeChange {
            disk: d.name.clone(),
            from: d.size_bytes,
            to,
        };
        if to > d.size_bytes {
            grow.push(change);
        } else if to < d.size_bytes {
            shrink.push(change);
        }
    }
    (grow, shrink)
}

/// Whether a live resize failed for this generation (then the growth
/// waits for the next start instead of being tried again).
pub fn live_resize_failed(o: &Observed) -> bool {
    o.status.conditions.iter().any(|c| {
        c.type_ == RESIZE_PENDING
            && c.status == ConditionStatus::True
            && c.reason == LIVE_RESIZE_FAILED
            && c.observed_generation == o.generation
    })
}

/// Whether a disk hot-plug or hot-unplug failed for this generation (then
/// disks are attached and detached at the next start instead).
pub fn hotplug_failed(o: &Observed) -> bool {
    o.status.conditions.iter().any(|c| {
        c.type_ == "RestartRequired"
            && c.status == ConditionStatus::True
            && c.reason == HOTPLUG_FAILED
            && c.observed_generation == o.generation
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 16 fault (f): a resize note said "from 2361393152 bytes to
    /// 3 GiB"; every size is now in one human unit.
    #[test]
    fn a_resize_note_says_every_size_in_one_human_unit() {
        let odd = 2_361_393_152;
        let grow = SizeChange {
            disk: "root".into(),
            from: odd,
            to: 3 * GIB,
        };
        assert_eq!(grow.describe(), "root: 2.2 GiB → 3 GiB");
        assert_eq!(human_size(512 << 20), "512 MiB");
        let shrink = SizeChange {
            disk: "root".into(),
            from: odd,
            to: 2 * GIB,
        };
        let (message, warning) = shrink_refused("web", &[shrink]);
        assert!(!message.contains("bytes") && !warning.contains("bytes"));
        // A size is asked in whole GiB: at least the next one up.
        assert!(
            message.contains("set the size to at least 3 GiB again"),
            "{message}"
        );
        assert_eq!(
            warning,
            "VM web keeps disk root at 2.2 GiB (the spec asks 2 GiB): disks cannot shrink"
        );
    }

    /// Issue 16 fault (b): the note promised /dev/disk/by-id/virtio-data,
    /// which a guest without udev does not have.
    #[test]
    fn the_attach_note_names_the_serial_for_guests_without_udev() {
        let note = attached_note("web", "data", GIB);
        assert_eq!(
            note,
            "Attached disk data (1 GiB) to VM web while it runs (live); the guest sees it as /dev/disk/by-id/virtio-data where udev runs, otherwise as the /dev/vdX whose /sys/block/vdX/serial is data"
        );
    }
}
