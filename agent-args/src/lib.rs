//! The vmctl agent's command line, defined once for the two ways to run
//! it: the `vmctl-agent` program (the agent itself) and `vmctl agent`,
//! which parses and explains the same flags, then execs the `vmctl-agent`
//! installed next to it. This crate has no agent code in it, so `vmctl`
//! links neither the agent nor its controllers.
//!
//! [`AgentArgs::to_args`] turns parsed flags back into arguments, which is
//! how `vmctl agent` hands them on.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

/// The agent program's file name; `vmctl` looks for it in its own
/// directory.
pub const AGENT_BIN: &str = "vmctl-agent";

/// The agent's exit code when another agent holds the data directory's
/// lock (`<data-dir>/agent.lock`): whoever started it should wait for that
/// agent instead.
pub const EXIT_AGENT_LOCKED: u8 = 3;

/// Where the agent keeps its state and listens; global options of `vmctl`
/// too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct AgentPaths {
    /// Data directory of the agent [default: $XDG_DATA_HOME/vmctl or ~/.local/share/vmctl].
    #[arg(long, global = true, env = "VMCTL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The agent's socket [default: <data-dir>/agent.sock].
    #[arg(long, global = true, env = "VMCTL_SOCKET")]
    pub socket: Option<PathBuf>,
}

/// The agent's store, as `--store`, `VMCTL_STORE` and `store =` in
/// `agent.toml` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Embedded sled database in the data directory.
    Sled,
    /// etcd v3 cluster.
    Etcd,
}

/// The agent's own flags (each with its environment variable, which clap
/// merges). Flags and variables win over `<data-dir>/agent.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct AgentArgs {
    /// Hypervisor driver: qemu, or fake (in memory, for tests and
    /// benchmarks) [default: `driver` in <data-dir>/agent.toml, else qemu].
    #[arg(long, env = "VMCTL_DRIVER")]
    pub driver: Option<String>,
    /// Where objects are kept: sled (embedded, in the data directory) or
    /// etcd (shared; needs --etcd-endpoints) [default: `store` in
    /// <data-dir>/agent.toml, else sled].
    #[arg(long, env = "VMCTL_STORE", value_enum)]
    pub store: Option<StoreKind>,
    /// etcd client URLs, comma-separated (e.g. http://127.0.0.1:2379)
    /// [default: `endpoints` under [etcd] in <data-dir>/agent.toml].
    #[arg(long, env = "VMCTL_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Prefix of every etcd key of this installation [default: `prefix`
    /// under [etcd] in <data-dir>/agent.toml, else /vmctl/].
    #[arg(long, env = "VMCTL_ETCD_PREFIX")]
    pub etcd_prefix: Option<String>,
    /// Settings of the Propolis driver.
    #[command(flatten)]
    pub propolis: PropolisArgs,
    /// Let the members of this group use the agent: its socket gets the
    /// group and mode 0660 (default: 0600, this user only). Put the
    /// socket outside the data directory (--socket), which stays 0700.
    #[arg(long, env = "VMCTL_SOCKET_GROUP")]
    pub socket_group: Option<String>,
    /// This agent's node name, recorded in the status of the VMs it runs
    /// (status.nodeName); an agent of another node leaves them alone
    /// [default: the host name].
    #[arg(long, env = "VMCTL_NODE_NAME")]
    pub node_name: Option<String>,
    /// Labels of this agent's Node, comma-separated KEY=VALUE pairs
    /// (e.g. zone=a,rack=1), shown by `vmctl get nodes -o wide`
    /// [default: `node-labels` in <data-dir>/agent.toml, else none].
    #[arg(
        long,
        env = "VMCTL_NODE_LABELS",
        value_delimiter = ',',
        value_name = "KEY=VALUE"
    )]
    pub node_labels: Vec<String>,
    /// TTL of this agent's node lease in etcd, whole seconds (2 to 3600):
    /// the agent posts its Node's heartbeat every third of it, and the
    /// Node is marked not Ready once its heartbeat is older than the TTL
    /// plus 2 s (store etcd only) [default: `node-lease-ttl` in
    /// <data-dir>/agent.toml, else 10].
    #[arg(long, env = "VMCTL_NODE_LEASE_TTL", value_name = "SECONDS")]
    pub node_lease_ttl: Option<u64>,
    /// Stop this node's VMs when its node lease is lost (store etcd): cut
    /// off from the cluster, its VMs may be re-placed on other nodes
    /// (`evict-after`), and a fenced host does not run a second copy beside
    /// them [default: `fence` in <data-dir>/agent.toml, else off: the VMs
    /// run on, unmanaged, until the lease is back].
    #[arg(long, env = "VMCTL_FENCE")]
    pub fence: bool,
    /// dnsmasq lease files to read, comma-separated absolute paths, to find
    /// the address of a guest on a `tap` network (after the bridge's
    /// neighbour table, before /var/lib/misc/dnsmasq.leases and the other
    /// usual places) [default: `dnsmasq-leases` in <data-dir>/agent.toml].
    #[arg(
        long,
        env = "VMCTL_DNSMASQ_LEASES",
        value_delimiter = ',',
        value_name = "PATH"
    )]
    pub dnsmasq_leases: Vec<PathBuf>,
    /// Settings of the TLS listener.
    #[command(flatten)]
    pub door: DoorArgs,
}

/// The agent's TCP listener for other hosts: mutual TLS only, never
/// plaintext (issue 17, "any agent is the door").
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
#[command(next_help_heading = "TLS listener (other hosts)")]
pub struct DoorArgs {
    /// Also serve the API on this TCP address with mutual TLS (needs
    /// --tls-dir): every client must present a certificate of the cluster
    /// CA, and a failed handshake is refused and logged with the peer's
    /// address. Recorded as the Node's status.address.tcp [default:
    /// `listen` in <data-dir>/agent.toml, else none: the Unix socket only].
    #[arg(long, env = "VMCTL_LISTEN", value_name = "IP:PORT")]
    pub listen: Option<String>,
    /// The directory of this agent's TLS files, as `vmctl cluster issue
    /// agent NAME --address IP` writes them: ca.crt (the cluster CA that
    /// client certificates must chain to), agent.crt (its certificate,
    /// naming the --listen address) and agent.key (its private key)
    /// [default: `tls-dir` in <data-dir>/agent.toml].
    #[arg(long, env = "VMCTL_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
}

impl AgentArgs {
    /// The flags as arguments that parse back to `self` (values taken from
    /// environment variables become flags, which mean the same).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: Option<String>| {
            if let Some(v) = value {
                out.push(format!("--{name}").into());
                out.push(v.into());
            }
        };
        flag("driver", self.driver.clone());
        flag(
            "store",
            self.store
                .and_then(|s| s.to_possible_value())
                .map(|v| v.get_name().to_owned()),
        );
        flag(
            "etcd-endpoints",
            (!self.etcd_endpoints.is_empty()).then(|| self.etcd_endpoints.join(",")),
        );
        flag("etcd-prefix", self.etcd_prefix.clone());
        let p = &self.propolis;
        flag("propolis-host", p.host.clone());
        flag("propolis-addr", p.addr.clone());
        flag("propolis-pool", p.pool.clone());
        flag("propolis-brand", p.brand.clone());
        flag("propolis-zone-root", p.zone_root.clone());
        flag("propolis-vnic-link", p.vnic_link.clone());
        flag(
            "propolis-start-timeout",
            p.start_timeout.map(|t| t.to_string()),
        );
        flag("socket-group", self.socket_group.clone());
        flag("node-name", self.node_name.clone());
        flag(
            "node-labels",
            (!self.node_labels.is_empty()).then(|| self.node_labels.join(",")),
        );
        flag("node-lease-ttl", self.node_lease_ttl.map(|t| t.to_string()));
        if self.fence {
            out.push("--fence".into());
        }
        for p in &self.dnsmasq_leases {
            out.push("--dnsmasq-leases".into());
            out.push(p.clone().into_os_string());
        }
        if let Some(l) = &self.door.listen {
            out.push("--listen".into());
            out.push(l.into());
        }
        if let Some(d) = &self.door.tls_dir {
            out.push("--tls-dir".into());
            out.push(d.clone().into_os_string());
        }
        out
    }
}

/// Settings of the Propolis driver (`vmctl agent --driver propolis`), each
/// [default: the same key under [propolis] in <data-dir>/agent.toml, else
/// the driver's default].
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
#[command(next_help_heading = "Propolis driver (illumos)")]
pub struct PropolisArgs {
    /// Where host commands (zfs, zoneadm, zonecfg, dladm) run: system
    /// (illumos), or simulated (any OS, against a mock propolis-server)
    /// [default: system].
    #[arg(
        long = "propolis-host",
        env = "VMCTL_PROPOLIS_HOST",
        value_name = "HOST"
    )]
    pub host: Option<String>,
    /// The first VM's propolis-server address; later VMs use the next
    /// ports [default: 127.0.0.1:12400].
    #[arg(
        long = "propolis-addr",
        env = "VMCTL_PROPOLIS_ADDR",
        value_name = "IP:PORT"
    )]
    pub addr: Option<String>,
    /// ZFS pool of images ({pool}/images/IMAGE@latest) and VM disks
    /// ({pool}/vms/VM) [default: rpool].
    #[arg(
        long = "propolis-pool",
        env = "VMCTL_PROPOLIS_POOL",
        value_name = "POOL"
    )]
    pub pool: Option<String>,
    /// Zone brand that runs propolis-server [default: nebula-vm].
    #[arg(
        long = "propolis-brand",
        env = "VMCTL_PROPOLIS_BRAND",
        value_name = "BRAND"
    )]
    pub brand: Option<String>,
    /// Directory of the VMs' zone paths [default: /zones].
    #[arg(
        long = "propolis-zone-root",
        env = "VMCTL_PROPOLIS_ZONE_ROOT",
        value_name = "DIR"
    )]
    pub zone_root: Option<String>,
    /// Physical link to create VNICs on [default: none; VNICs must exist].
    #[arg(
        long = "propolis-vnic-link",
        env = "VMCTL_PROPOLIS_VNIC_LINK",
        value_name = "LINK"
    )]
    pub vnic_link: Option<String>,
    /// How long a start may take (zone boot, server up, instance Running),
    /// in seconds [default: 120].
    #[arg(
        long = "propolis-start-timeout",
        env = "VMCTL_PROPOLIS_START_TIMEOUT",
        value_name = "SECONDS"
    )]
    pub start_timeout: Option<u64>,
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    /// Every flag the agent has, each with a value it accepts: the first
    /// possible value, else a number (which text and numbers both take);
    /// a switch alone.
    fn every_flag() -> Vec<String> {
        let mut argv = vec!["agent".to_owned()];
        for arg in Cli::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" {
                continue;
            }
            // A switch (`--fence`) takes no value.
            if !arg.get_action().takes_values() {
                argv.push(format!("--{long}"));
                continue;
            }
            let value = arg
                .get_possible_values()
                .last()
                .map_or("7".to_owned(), |v| v.get_name().to_owned());
            argv.push(format!("--{long}"));
            argv.push(value);
        }
        argv
    }

    #[test]
    fn to_args_hands_on_every_flag_a_new_one_included() {
        let argv = every_flag();
        assert!(argv.len() > 20, "{argv:?}");
        let parsed = Cli::try_parse_from(&argv).unwrap().agent;
        assert_ne!(parsed, AgentArgs::default());
        let again =
            Cli::try_parse_from(std::iter::once(OsString::from("agent")).chain(parsed.to_args()))
                .unwrap()
                .agent;
        assert_eq!(again, parsed, "a flag is missing from AgentArgs::to_args");
    }

    #[test]
    fn to_args_keeps_several_etcd_endpoints_apart() {
        let parsed =
            Cli::try_parse_from(["agent", "--etcd-endpoints", "http://a:2379,http://b:2379"])
                .unwrap()
                .agent;
        assert_eq!(parsed.etcd_endpoints.len(), 2);
        let again =
            Cli::try_parse_from(std::iter::once(OsString::from("agent")).chain(parsed.to_args()))
                .unwrap()
                .agent;
        assert_eq!(again, parsed);
    }
}
