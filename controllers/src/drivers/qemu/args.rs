//! The QEMU command line, as a pure function of a [`LaunchPlan`].
//!
//! A plan is everything that decides the argv: the VM's spec (CPUs,
//! memory, network), the accelerator, the SSH port and the work dir.
//! Nothing here touches the host, so the argv is snapshot-tested.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vmctl_api::Network;

use super::Layout;
use super::accel::Accel;

/// How the VM is networked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "mode")]
pub enum NetPlan {
    /// SLIRP with SSH forwarded from `127.0.0.1:ssh_port`.
    User {
        /// Host port forwarded to the guest's port 22.
        ssh_port: u16,
    },
    /// A TAP device on a bridge, through `qemu-bridge-helper`.
    Bridge {
        /// The bridge.
        bridge: String,
    },
    /// No NIC.
    None,
}

/// Everything the command line depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LaunchPlan {
    /// The VM's name.
    pub name: String,
    /// Its work dir.
    pub work_dir: PathBuf,
    /// The directory of its sockets (see [`Layout`]).
    pub sock_dir: PathBuf,
    /// The accelerator.
    pub accel: Accel,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Networking.
    pub net: NetPlan,
    /// The NIC's MAC address.
    pub mac: String,
    /// Whether a cloud-init seed is attached.
    pub seed: bool,
    /// Extra disks, by name, attached after the seed
    /// (`disk-<name>.qcow2` in the work dir; the name is the serial).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<String>,
}

/// Errors turning a spec into a plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The network mode needs another backend.
    #[error("Network mode {0} is not supported by the QEMU driver")]
    UnsupportedNetwork(&'static str),
}

impl LaunchPlan {
    /// The plan for a VM with `network`, given the host-side choices.
    #[expect(clippy::too_many_arguments, reason = "one plain field per argument")]
    pub fn new(
        name: &str,
        mac: &str,
        layout: &Layout,
        accel: Accel,
        vcpus: u32,
        memory_mib: u64,
        network: &Network,
        ssh_port: u16,
        seed: bool,
    ) -> Result<Self, PlanError> {
        let net = match network {
            Network::User => NetPlan::User { ssh_port },
            Network::Tap { bridge } => NetPlan::Bridge {
                bridge: bridge.clone(),
            },
            Network::Vnic { .. } => return Err(PlanError::UnsupportedNetwork("vnic")),
            Network::None => NetPlan::None,
        };
        Ok(LaunchPlan {
            name: name.to_owned(),
            work_dir: layout.root.clone(),
            sock_dir: layout.sock_dir.clone(),
            accel,
            vcpus,
            memory_mib,
            net,
            mac: mac.to_owned(),
            seed,
            disks: Vec::new(),
        })
    }
}

/// A stable, locally administered MAC (`0x52` has the local bit set) in
/// QEMU's `52:54:00` range, derived from the VM's uid: DHCP leases survive
/// restarts, and a VM deleted and created again under the same name gets
/// a new address.
pub fn mac_for(uid: &str) -> String {
    let h = Sha256::digest(uid.as_bytes());
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
}

/// QEMU's `-opt key=value,…` values escape a comma by doubling it.
fn esc(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The arguments after the program name.
pub fn qemu_args(plan: &LaunchPlan) -> Vec<String> {
    let l = Layout::with_sock_dir(&plan.work_dir, &plan.sock_dir);
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
    push(&["-name", &format!("guest={},debug-threads=on", plan.name)]);
    push(&["-machine", "q35", "-accel", &plan.accel.to_string()]);
    push(&["-cpu", plan.accel.cpu_model()]);
    push(&[
        "-smp",
        &plan.vcpus.to_string(),
        "-m",
        &plan.memory_mib.to_string(),
    ]);
    // No default devices: every device the guest sees is listed below.
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    push(&[
        "-drive",
        &format!(
            "file={},if=none,id=disk0,format=qcow2,discard=unmap",
            esc(&l.disk())
        ),
        "-device",
        "virtio-blk-pci,drive=disk0,bootindex=0",
    ]);
    if plan.seed {
        // virtio-blk, read-only: an IDE cdrom on q35 is AHCI, which
        // Debian's cloud kernel cannot read.
        push(&[
            "-drive",
            &format!(
                "file={},if=none,id=seed0,format=raw,readonly=on",
                esc(&l.seed())
            ),
            "-device",
            "virtio-blk-pci,drive=seed0",
        ]);
    }
    for name in &plan.disks {
        // The serial is the disk's name: the guest sees
        // /dev/disk/by-id/virtio-<name>.
        push(&[
            "-drive",
            &format!(
                "file={},if=none,id=disk-{name},format=qcow2,discard=unmap",
                esc(&plan.work_dir.join(format!("disk-{name}.qcow2")))
            ),
            "-device",
            &format!("virtio-blk-pci,drive=disk-{name},serial={name}"),
        ]);
    }
    match &plan.net {
        NetPlan::User { ssh_port } => push(&[
            "-netdev",
            &format!("user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22"),
        ]),
        NetPlan::Bridge { bridge } => push(&["-netdev", &format!("bridge,id=net0,br={bridge}")]),
        NetPlan::None => {}
    }
    if plan.net != NetPlan::None {
        push(&[
            "-device",
            &format!("virtio-net-pci,netdev=net0,mac={}", plan.mac),
        ]);
    }
    push(&["-device", "virtio-rng-pci"]);
    // The console goes to a socket (for `vmctl console`) and is logged
    // whether or not anyone is attached.
    push(&[
        "-chardev",
        &format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            esc(&l.serial_sock()),
            esc(&l.console_log())
        ),
        "-serial",
        "chardev:serial0",
    ]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", esc(&l.qmp_sock())),
    ]);
    // A second monitor that the agent keeps open: QMP events (shutdown,
    // stop, resume, reset, panic) and its end when QEMU goes. The first
    // one serves commands, one connection at a time.
    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp-events,path={},server=on,wait=off",
            esc(&l.events_sock())
        ),
        "-mon",
        "chardev=qmp-events,mode=control",
    ]);
    push(&["-pidfile", &l.pidfile().display().to_string()]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(network: &Network, accel: Accel) -> LaunchPlan {
        LaunchPlan::new(
            "web-1",
            &mac_for("5f0c1e2a-uid"),
            &Layout::with_sock_dir(Path::new("/data/vms/web-1"), Path::new("/data/vms/web-1")),
            accel,
            2,
            1024,
            network,
            2222,
            true,
        )
        .unwrap()
    }

    #[test]
    fn user_network_tcg_argv() {
        insta::assert_yaml_snapshot!(qemu_args(&plan(&Network::User, Accel::Tcg)));
    }

    #[test]
    fn kvm_uses_host_cpu() {
        let args = qemu_args(&plan(&Network::User, Accel::Kvm));
        let i = args.iter().position(|a| a == "-cpu").unwrap();
        assert_eq!(args[i + 1], "host");
        assert!(args.contains(&"kvm".to_owned()));
    }

    #[test]
    fn ssh_is_forwarded_on_loopback_only() {
        let args = qemu_args(&plan(&Network::User, Accel::Tcg));
        assert!(args.contains(&"user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22".to_owned()));
    }

    #[test]
    fn bridge_and_no_network() {
        let tap = Network::Tap {
            bridge: "br0".into(),
        };
        let args = qemu_args(&plan(&tap, Accel::Tcg));
        assert!(args.contains(&"bridge,id=net0,br=br0".to_owned()));
        let args = qemu_args(&plan(&Network::None, Accel::Tcg));
        assert!(!args.iter().any(|a| a.contains("net0")));
    }

    #[test]
    fn vnic_is_refused() {
        let vnic = Network::Vnic { name: "v0".into() };
        let err = LaunchPlan::new(
            "a",
            "52:54:00:00:00:01",
            &Layout::with_sock_dir(Path::new("/x"), Path::new("/x")),
            Accel::Tcg,
            1,
            512,
            &vnic,
            1,
            false,
        );
        assert!(matches!(err, Err(PlanError::UnsupportedNetwork("vnic"))));
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let p = LaunchPlan::new(
            "a",
            "52:54:00:00:00:01",
            &Layout::with_sock_dir(Path::new("/d,x/a"), Path::new("/d,x/a")),
            Accel::Tcg,
            1,
            512,
            &Network::None,
            1,
            false,
        )
        .unwrap();
        assert!(
            qemu_args(&p)
                .iter()
                .any(|a| a.starts_with("file=/d,,x/a/disk.qcow2,"))
        );
    }

    #[test]
    fn extra_disks_follow_the_seed_with_their_name_as_serial() {
        let p = LaunchPlan {
            disks: vec!["data".into(), "logs".into()],
            ..plan(&Network::User, Accel::Tcg)
        };
        let args = qemu_args(&p);
        let seed = args
            .iter()
            .position(|a| a == "virtio-blk-pci,drive=seed0")
            .unwrap();
        let data = args
            .iter()
            .position(|a| a == "virtio-blk-pci,drive=disk-data,serial=data")
            .unwrap();
        let logs = args
            .iter()
            .position(|a| a == "virtio-blk-pci,drive=disk-logs,serial=logs")
            .unwrap();
        assert!(seed < data && data < logs);
        assert!(args.contains(
            &"file=/data/vms/web-1/disk-data.qcow2,if=none,id=disk-data,format=qcow2,discard=unmap"
                .to_owned()
        ));
        // No extra disk: the argv is as before.
        assert!(
            !qemu_args(&plan(&Network::User, Accel::Tcg))
                .iter()
                .any(|a| a.contains("disk-"))
        );
    }

    #[test]
    fn mac_is_stable_and_local() {
        assert_eq!(mac_for("web-1"), mac_for("web-1"));
        assert_ne!(mac_for("web-1"), mac_for("web-2"));
        assert!(mac_for("web-1").starts_with("52:54:00:"));
        // 0x52: unicast (bit 0 clear), locally administered (bit 1 set).
        assert_eq!(0x52 & 0b11, 0b10);
    }
}
