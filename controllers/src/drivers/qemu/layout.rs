//! Where a VM's files are in its work dir.

use std::path::{Path, PathBuf};

/// Where a VM's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The work dir.
    pub root: PathBuf,
}

impl Layout {
    /// The layout of the work dir `root`.
    pub fn new(root: &Path) -> Self {
        Layout {
            root: root.to_owned(),
        }
    }
    /// The qcow2 overlay.
    pub fn disk(&self) -> PathBuf {
        self.root.join("disk.qcow2")
    }
    /// The cloud-init seed.
    pub fn seed(&self) -> PathBuf {
        self.root.join("seed.iso")
    }
    /// Digest of what the seed was built from.
    pub fn seed_digest_file(&self) -> PathBuf {
        self.root.join("seed.digest")
    }
    /// The QMP socket.
    pub fn qmp_sock(&self) -> PathBuf {
        self.root.join("qmp.sock")
    }
    /// A second QMP monitor, held open by the agent for QMP events.
    pub fn events_sock(&self) -> PathBuf {
        self.root.join("qmp-events.sock")
    }
    /// The serial console socket.
    pub fn serial_sock(&self) -> PathBuf {
        self.root.join("serial.sock")
    }
    /// The serial console transcript.
    pub fn console_log(&self) -> PathBuf {
        self.root.join("console.log")
    }
    /// QEMU's pidfile.
    pub fn pidfile(&self) -> PathBuf {
        self.root.join("qemu.pid")
    }
    /// QEMU's standard error.
    pub fn stderr_log(&self) -> PathBuf {
        self.root.join("qemu.log")
    }
    /// How the last QEMU ended.
    pub fn exit_file(&self) -> PathBuf {
        self.root.join("exit.status")
    }
    /// Marker: vmctl asked the running QEMU to end.
    pub fn stop_marker(&self) -> PathBuf {
        self.root.join("stop.requested")
    }
    /// The saved [`VmConfig`].
    pub fn config_file(&self) -> PathBuf {
        self.root.join("vm.json")
    }
    /// The forwarded SSH port.
    pub fn port_file(&self) -> PathBuf {
        self.root.join("ssh-port")
    }
    /// cloud-init's instance id.
    pub fn instance_id_file(&self) -> PathBuf {
        self.root.join("instance-id")
    }
}
