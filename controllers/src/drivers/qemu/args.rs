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
    /// A VGA device and a VNC server on 127.0.0.1 (the first free display).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vnc: bool,
    /// Shared folders (see `shares.rs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<super::shares::SharePlan>,
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
            vnc: false,
            shares: Vec::new(),
        })
    }
}

/// Empty PCIe root ports a VM starts with besides one per extra disk:
/// how many disks can be hot-plugged before a restart (which places every
/// disk on a port of its own and leaves this many spare again).
pub const SPARE_PORTS: usize = 4;

/// Root ports at the most: slots 0x10-0x1e of pcie.0, eight functions
/// each (0x1f holds q35's ICH9 LPC, SATA and SMBus functions).
pub const MAX_PORTS: usize = 15 * 8;

/// The pcie.0 slot of the first root port; devices placed by QEMU (root
/// disk, seed, NIC, RNG, VGA) take the free slots from 1 upwards.
const PORT_FIRST_SLOT: usize = 0x10;

/// How many root ports a VM with `disks` extra disks starts with.
pub fn hotplug_ports(disks: usize) -> usize {
    (disks + SPARE_PORTS).min(MAX_PORTS)
}

/// The QEMU device id of root port `i` (`hotplug<i>`).
pub fn port_id(i: usize) -> String {
    format!("{PORT_PREFIX}{i}")
}

/// The prefix of the root ports' device ids.
pub const PORT_PREFIX: &str = "hotplug";

/// The block node (QMP `blockdev-add` / `-blockdev` JSON) of extra disk
/// `name` stored in `path`: a qcow2 node `disk-<name>` over a file node
/// `disk-<name>-file`, discarding as the root disk does. Node names hold
/// at most 31 bytes; a disk name holds 20 (`vmctl_api::DISK_NAME_MAX`).
pub fn blockdev(name: &str, path: &Path) -> serde_json::Value {
    serde_json::json!({
        "driver": "qcow2",
        "node-name": format!("disk-{name}"),
        "discard": "unmap",
        "file": {
            "driver": "file",
            "filename": path.display().to_string(),
            "node-name": format!("disk-{name}-file"),
        },
    })
}

/// The `-device` value of extra disk `name`: virtio-blk with id
/// `disk-<name>` and serial `<name>`, on root port `port` (else pcie.0).
pub fn disk_device(name: &str, port: Option<&str>) -> String {
    let bus = port.map(|p| format!(",bus={p}")).unwrap_or_default();
    format!("virtio-blk-pci,drive=disk-{name},serial={name},id=disk-{name}{bus}")
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
    // virtio-fs needs guest RAM that virtiofsd can map: a shared memfd.
    let machine = if super::shares::needs_shared_memory(&plan.shares) {
        "q35,memory-backend=mem0"
    } else {
        "q35"
    };
    push(&["-machine", machine, "-accel", &plan.accel.to_string()]);
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
    // PCIe root ports: one per extra disk and a few spare, so that extra
    // disks can be hot-plugged and hot-unplugged while the VM runs (QEMU
    // docs/pcie.txt, 5. Hot-plug: "PCI Express root buses ... do not
    // support hot-plug", devices on pcie.0 are integrated endpoints; 5.1
    // (2): "Leave enough PCI Express Root Ports empty. Use multifunction
    // PCI Express Root Ports (up to 8 ports per pcie.0 slot)"). The root
    // disk and the seed stay on pcie.0: they are never unplugged.
    let ports = hotplug_ports(plan.disks.len());
    for i in 0..ports {
        let (slot, function) = (PORT_FIRST_SLOT + i / 8, i % 8);
        let multi = if function == 0 {
            ",multifunction=on"
        } else {
            ""
        };
        push(&[
            "-device",
            &format!(
                "pcie-root-port,id={},bus=pcie.0,chassis={},addr={slot:#x}.{function}{multi}",
                port_id(i),
                i + 1
            ),
        ]);
    }
    for (i, name) in plan.disks.iter().enumerate() {
        // Node and device as a hot-plug makes them (hotplug.rs): node
        // `disk-<name>` over `disk-<name>-file`, device id `disk-<name>`
        // whose serial is the disk's name, so the guest sees
        // /dev/disk/by-id/virtio-<name>. A disk past the last port (more
        // than MAX_PORTS) goes on pcie.0 and is detached at a restart only.
        let path = plan.work_dir.join(format!("disk-{name}.qcow2"));
        let device = disk_device(name, (i < ports).then(|| port_id(i)).as_deref());
        push(&["-blockdev", &blockdev(name, &path).to_string()]);
        push(&["-device", &device]);
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
    a.extend(super::shares::qemu_args(
        &plan.shares,
        &plan.sock_dir,
        plan.memory_mib,
    ));
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
    push(&["-device", "virtio-rng-pci"]);
    if plan.vnc {
        // Displays 0-99 (ports 5900-5999) on loopback: QEMU takes the
        // first free one; QMP `query-vnc` tells which.
        push(&["-device", "VGA", "-vnc", "127.0.0.1:0,to=99"]);
    }
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
    fn extra_disks_follow_the_seed_on_root_ports_with_their_name_as_serial() {
        let p = LaunchPlan {
            disks: vec!["data".into(), "logs".into()],
            ..plan(&Network::User, Accel::Tcg)
        };
        let args = qemu_args(&p);
        let at = |want: &str| args.iter().position(|a| a == want).unwrap();
        let seed = at("virtio-blk-pci,drive=seed0");
        let port0 =
            at("pcie-root-port,id=hotplug0,bus=pcie.0,chassis=1,addr=0x10.0,multifunction=on");
        let data = at("virtio-blk-pci,drive=disk-data,serial=data,id=disk-data,bus=hotplug0");
        let logs = at("virtio-blk-pci,drive=disk-logs,serial=logs,id=disk-logs,bus=hotplug1");
        assert!(seed < port0 && port0 < data && data < logs);
        // Two ports for the disks and the spare ones, all in slot 0x10.
        let ports: Vec<_> = args
            .iter()
            .filter(|a| a.starts_with("pcie-root-port"))
            .collect();
        assert_eq!(ports.len(), 2 + SPARE_PORTS, "{ports:?}");
        assert!(
            args.contains(
                &"pcie-root-port,id=hotplug5,bus=pcie.0,chassis=6,addr=0x10.5".to_owned()
            )
        );
        let node: serde_json::Value = serde_json::from_str(&args[data - 2]).unwrap();
        assert_eq!(args[data - 3], "-blockdev");
        assert_eq!(
            node,
            blockdev("data", Path::new("/data/vms/web-1/disk-data.qcow2"))
        );
        assert_eq!(node["file"]["filename"], "/data/vms/web-1/disk-data.qcow2");
        assert_eq!(node["node-name"], "disk-data");
        // No extra disk: no disk device, only the spare ports.
        let bare = qemu_args(&plan(&Network::User, Accel::Tcg));
        assert!(!bare.iter().any(|a| a.contains("disk-")));
        assert_eq!(
            bare.iter()
                .filter(|a| a.starts_with("pcie-root-port"))
                .count(),
            SPARE_PORTS
        );
    }

    #[test]
    fn root_ports_fill_slots_eight_functions_each_and_stop_before_slot_0x1f() {
        assert_eq!(hotplug_ports(0), SPARE_PORTS);
        assert_eq!(hotplug_ports(10_000), MAX_PORTS);
        let p = LaunchPlan {
            disks: (0..MAX_PORTS + 2).map(|i| format!("d{i}")).collect(),
            ..plan(&Network::None, Accel::Tcg)
        };
        let args = qemu_args(&p);
        assert!(
            args.contains(
                &"pcie-root-port,id=hotplug8,bus=pcie.0,chassis=9,addr=0x11.0,multifunction=on"
                    .to_owned()
            )
        );
        let last = port_id(MAX_PORTS - 1);
        assert!(
            args.iter()
                .any(|a| a.contains(&format!("id={last},")) && a.contains("addr=0x1e.7"))
        );
        // Past the last port a disk sits on pcie.0.
        let d = format!("d{}", MAX_PORTS);
        assert!(args.contains(&disk_device(&d, None)));
    }

    #[test]
    fn vnc_is_opt_in_and_on_loopback_only() {
        let off = qemu_args(&plan(&Network::User, Accel::Tcg));
        assert!(!off.iter().any(|a| a == "-vnc" || a == "VGA"));
        let on = qemu_args(&LaunchPlan {
            vnc: true,
            ..plan(&Network::User, Accel::Tcg)
        });
        let i = on.iter().position(|a| a == "-vnc").unwrap();
        assert_eq!(on[i + 1], "127.0.0.1:0,to=99");
        assert!(on.contains(&"VGA".to_owned()));
    }

    #[test]
    fn shares_add_a_shared_memory_backend_and_their_devices_only_when_present() {
        use vmctl_api::Share;
        let base = qemu_args(&plan(&Network::User, Accel::Tcg));
        assert!(base.contains(&"q35".to_owned()));
        assert!(!base.iter().any(|a| a.contains("mem0") || a.contains("fs0")));
        let v = super::super::shares::Virtiofsd {
            path: "/usr/lib/qemu/virtiofsd".into(),
            rust: false,
            readonly: false,
        };
        let share = Share {
            host_path: "/home/me/src".into(),
            mount_path: "/src".into(),
            read_only: false,
        };
        let with = qemu_args(&LaunchPlan {
            shares: super::super::shares::plan(std::slice::from_ref(&share), Some(&v)),
            ..plan(&Network::User, Accel::Tcg)
        });
        let i = with.iter().position(|a| a == "-machine").unwrap();
        assert_eq!(with[i + 1], "q35,memory-backend=mem0");
        assert!(with.contains(&"memory-backend-memfd,id=mem0,size=1024M,share=on".to_owned()));
        assert!(with.contains(&"socket,id=fs0,path=/data/vms/web-1/fs0.sock".to_owned()));
        assert!(with.contains(&"vhost-user-fs-pci,chardev=fs0,tag=vmctl-share0".to_owned()));
        // 9p needs no shared memory.
        let nine = qemu_args(&LaunchPlan {
            shares: super::super::shares::plan(&[share], None),
            ..plan(&Network::User, Accel::Tcg)
        });
        assert!(nine.contains(&"q35".to_owned()));
        assert!(!nine.iter().any(|a| a.contains("mem0")));
        assert!(nine.contains(&"-virtfs".to_owned()));
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
