//! Where the agent keeps its state and listens, and which store it uses.
//!
//! Each setting comes from the command-line flag, else its environment
//! variable (clap merges those two), else the config file
//! `<data_dir>/agent.toml` ([`CONFIG_FILE`]), else its default. The file
//! lives in the data directory, as the kubelet's `config.yaml` lives in
//! `/var/lib/kubelet`: one agent owns one data directory, and an agent that
//! `vmctl` starts by itself reads the same file.
//!
//! ```toml
//! driver = "qemu"            # or "fake"
//! store = "etcd"             # or "sled" (default)
//!
//! [etcd]
//! endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
//! prefix = "/vmctl/"         # default; one per installation sharing an etcd
//!
//! [propolis]                 # driver = "propolis" (illumos)
//! addr = "127.0.0.1:12400"   # the first VM's propolis-server; later VMs the next ports
//! pool = "rpool"             # ZFS: {pool}/images/{image}@latest → {pool}/vms/{vm}
//! brand = "nebula-vm"        # the zone brand that runs propolis-server
//! zone-root = "/zones"
//! vnic-link = "igb0"         # create VNICs on this link (default: they must exist)
//! start-timeout = 120        # seconds
//! host = "system"            # or "simulated" (Linux, against a mock propolis-server)
//! ```
//!
//! `dnsmasq-leases = ["/run/br0.leases"]` (top level, before any table)
//! adds dnsmasq lease files to those read to find the address of a guest
//! on a `tap` network. `node-labels = ["zone=a", "rack=1"]` labels this
//! agent's Node, and `node-lease-ttl = 10` (seconds; store etcd) sets the
//! TTL of its node lease (top level too). `listen = "10.0.0.2:7443"` and
//! `tls-dir = "/etc/vmctl/tls"` (top level) serve the API on TCP with
//! mutual TLS too ([`DoorConfig`]).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// The agent's config file name inside its data directory.
pub const CONFIG_FILE: &str = "agent.toml";

/// The node lease TTLs accepted, in seconds: etcd's minimum lease is 2 s;
/// an hour is already far too long to notice a dead node.
pub const NODE_LEASE_TTL_RANGE: std::ops::RangeInclusive<u64> = 2..=3600;

/// The agent's settings, resolved once from flags, environment and the
/// config file ([`AgentConfig::resolve`]).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The data directory (`$XDG_DATA_HOME/vmctl`).
    pub data_dir: PathBuf,
    /// The Unix socket path (default `<data_dir>/agent.sock`).
    pub socket: PathBuf,
    /// The hypervisor driver: `qemu` (default) or `fake` (tests only).
    pub driver: String,
    /// How much of the event log compaction keeps (sled), or how many
    /// revisions etcd keeps before compaction (`retention.window`).
    pub retention: vmctl_store::Retention,
    /// Where the objects live: sled (default) or etcd.
    pub store: StoreConfig,
    /// Settings of the Propolis driver (used with `driver = "propolis"`).
    pub propolis: PropolisSettings,
    /// A group whose members may use the agent (`--socket-group`): the
    /// socket gets that group and mode 0660. `None` (the default): mode
    /// 0600, this user only.
    pub socket_group: Option<String>,
    /// The TTL of the etcd agent lease (store etcd only; default
    /// [`crate::lease::DEFAULT_TTL`], 10 s, whole seconds, at least 2 s):
    /// how long a killed agent's prefix waits for another agent.
    pub lease_ttl: std::time::Duration,
    /// This agent's node name (`--node-name` / `VMCTL_NODE_NAME`, default
    /// the host name in lowercase, see [`default_node_name`]): the name of
    /// the Node it registers, recorded in `status.nodeName` of the VMs
    /// whose instances it makes; the VM controller leaves instances of
    /// other nodes alone (`NodeLost`). A DNS-1123 subdomain.
    pub node_name: String,
    /// Labels of this agent's Node (`--node-labels` / `VMCTL_NODE_LABELS`
    /// or `node-labels` in the config file), each checked
    /// ([`vmctl_api::node::parse_label`]).
    pub node_labels: BTreeMap<String, String>,
    /// The TTL of this agent's node lease (store etcd; `--node-lease-ttl`
    /// / `VMCTL_NODE_LEASE_TTL` or `node-lease-ttl` in the config file;
    /// whole seconds, [`NODE_LEASE_TTL_RANGE`], default 10 s): the Node's
    /// heartbeat is written every third of it, and the Node is marked not
    /// Ready once its heartbeat is older than it + 2 s.
    pub node_lease_ttl: Duration,
    /// Whether this agent stops its VMs when it loses its node lease
    /// (store etcd; `--fence` / `VMCTL_FENCE`): cut off from the cluster,
    /// its VMs may be re-placed elsewhere (`evictAfterSeconds`), and a
    /// fenced host does not run a second copy beside them. Default off:
    /// the VMs run on, unmanaged, until the lease is back.
    pub fence: bool,
    /// dnsmasq lease files read (before the usual ones) to find the
    /// address of a guest on a `tap` network: `--dnsmasq-leases`,
    /// `VMCTL_DNSMASQ_LEASES` or `dnsmasq-leases` in the config file.
    pub dnsmasq_leases: Vec<PathBuf>,
    /// The TCP listener with mutual TLS (`--listen` and `--tls-dir`, or
    /// `listen` and `tls-dir` in the config file); `None`: the Unix socket
    /// only.
    pub door: Option<DoorConfig>,
}

/// The agent's TCP listener for other hosts: mutual TLS only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoorConfig {
    /// The address to listen on.
    pub listen: std::net::SocketAddr,
    /// The directory of `ca.crt`, `agent.crt` and `agent.key`
    /// ([`vmctl_tls::Identity::agent_dir`]), absolute.
    pub tls_dir: PathBuf,
}

/// Settings of the Propolis driver, each `None` when given nowhere (the
/// driver's default then applies: see
/// `vmctl_controllers::drivers::propolis::PropolisConfig::new`). Flags
/// `--propolis-*`, variables `VMCTL_PROPOLIS_*`, or `[propolis]` in the
/// config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PropolisSettings {
    /// Where host commands run: `system` (illumos) or `simulated`.
    pub host: Option<String>,
    /// The first VM's propolis-server address, `IP:PORT`.
    pub addr: Option<String>,
    /// The ZFS pool (or dataset) of images and VM disks.
    pub pool: Option<String>,
    /// The zone brand.
    pub brand: Option<String>,
    /// The directory zone paths are made under.
    pub zone_root: Option<String>,
    /// The physical link VNICs are created on.
    pub vnic_link: Option<String>,
    /// How long a start may take, in seconds.
    pub start_timeout: Option<u64>,
}

impl PropolisSettings {
    /// The names of the settings with their environment variables, in the
    /// order `[propolis]` documents them.
    pub const VARS: [(&'static str, &'static str); 7] = [
        ("host", "VMCTL_PROPOLIS_HOST"),
        ("addr", "VMCTL_PROPOLIS_ADDR"),
        ("pool", "VMCTL_PROPOLIS_POOL"),
        ("brand", "VMCTL_PROPOLIS_BRAND"),
        ("zone-root", "VMCTL_PROPOLIS_ZONE_ROOT"),
        ("vnic-link", "VMCTL_PROPOLIS_VNIC_LINK"),
        ("start-timeout", "VMCTL_PROPOLIS_START_TIMEOUT"),
    ];

    /// A setting by its environment variable's name (`VMCTL_PROPOLIS_ADDR`),
    /// as the driver's config reads it; `None` when not set.
    pub fn lookup(&self, var: &str) -> Option<String> {
        match var {
            "VMCTL_PROPOLIS_HOST" => self.host.clone(),
            "VMCTL_PROPOLIS_ADDR" => self.addr.clone(),
            "VMCTL_PROPOLIS_POOL" => self.pool.clone(),
            "VMCTL_PROPOLIS_BRAND" => self.brand.clone(),
            "VMCTL_PROPOLIS_ZONE_ROOT" => self.zone_root.clone(),
            "VMCTL_PROPOLIS_VNIC_LINK" => self.vnic_link.clone(),
            "VMCTL_PROPOLIS_START_TIMEOUT" => self.start_timeout.map(|t| t.to_string()),
            _ => None,
        }
    }

    /// Each setting from `self`, else from `other`.
    fn or(self, other: PropolisSettings) -> PropolisSettings {
        PropolisSettings {
            host: self.host.or(other.host),
            addr: self.addr.or(other.addr),
            pool: self.pool.or(other.pool),
            brand: self.brand.or(other.brand),
            zone_root: self.zone_root.or(other.zone_root),
            vnic_link: self.vnic_link.or(other.vnic_link),
            start_timeout: self.start_timeout.or(other.start_timeout),
        }
    }
}

/// Which store the agent keeps its objects in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// sled in `<data_dir>/db`: embedded, no setup (the default).
    Sled,
    /// etcd v3 (`--store etcd --etcd-endpoints URL,…`).
    Etcd {
        /// Client URLs, e.g. `http://127.0.0.1:2379`.
        endpoints: Vec<String>,
        /// Key prefix of this installation (default `/vmctl/`).
        prefix: String,
    },
}

pub use vmctl_agent_args::StoreKind;

/// Settings given as flags or environment variables (`None`: not given, so
/// the config file or the default decides).
#[derive(Debug, Clone, Default)]
pub struct AgentOverrides {
    /// `--driver` / `VMCTL_DRIVER`.
    pub driver: Option<String>,
    /// `--store` / `VMCTL_STORE`.
    pub store: Option<StoreKind>,
    /// `--etcd-endpoints` / `VMCTL_ETCD_ENDPOINTS` (comma-separated).
    pub etcd_endpoints: Option<Vec<String>>,
    /// `--etcd-prefix` / `VMCTL_ETCD_PREFIX`.
    pub etcd_prefix: Option<String>,
    /// `--node-name` / `VMCTL_NODE_NAME`.
    pub node_name: Option<String>,
    /// `--node-labels` / `VMCTL_NODE_LABELS` (`KEY=VALUE` each).
    pub node_labels: Option<Vec<String>>,
    /// `--node-lease-ttl` / `VMCTL_NODE_LEASE_TTL`, seconds.
    pub node_lease_ttl: Option<u64>,
    /// `--fence` / `VMCTL_FENCE` (`Some(true)` when given).
    pub fence: Option<bool>,
    /// `--propolis-*` / `VMCTL_PROPOLIS_*`.
    pub propolis: PropolisSettings,
    /// `--dnsmasq-leases` / `VMCTL_DNSMASQ_LEASES`.
    pub dnsmasq_leases: Option<Vec<PathBuf>>,
    /// `--listen` / `VMCTL_LISTEN` (`IP:PORT`).
    pub listen: Option<String>,
    /// `--tls-dir` / `VMCTL_TLS_DIR`.
    pub tls_dir: Option<PathBuf>,
}

/// The config file's keys; anything else is refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    driver: Option<Spanned<String>>,
    store: Option<Spanned<StoreKind>>,
    etcd: Option<EtcdSection>,
    propolis: Option<PropolisSection>,
    #[serde(rename = "dnsmasq-leases")]
    dnsmasq_leases: Option<Vec<Spanned<PathBuf>>>,
    #[serde(rename = "node-labels")]
    node_labels: Option<Vec<Spanned<String>>>,
    #[serde(rename = "node-lease-ttl")]
    node_lease_ttl: Option<Spanned<u64>>,
    fence: Option<Spanned<bool>>,
    listen: Option<Spanned<String>>,
    #[serde(rename = "tls-dir")]
    tls_dir: Option<Spanned<PathBuf>>,
    /// `node_labels`, checked by [`read_file`].
    #[serde(skip)]
    node_labels_checked: Option<BTreeMap<String, String>>,
    /// `propolis`, checked by [`read_file`].
    #[serde(skip)]
    propolis_settings: PropolisSettings,
}

/// The `[propolis]` table of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct PropolisSection {
    host: Option<Spanned<String>>,
    addr: Option<Spanned<String>>,
    pool: Option<Spanned<String>>,
    brand: Option<Spanned<String>>,
    zone_root: Option<Spanned<String>>,
    vnic_link: Option<Spanned<String>>,
    start_timeout: Option<Spanned<u64>>,
}

/// The `[etcd]` table of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EtcdSection {
    endpoints: Option<Spanned<Vec<Spanned<String>>>>,
    prefix: Option<Spanned<String>>,
}

/// The drivers `driver =` accepts.
const DRIVERS: [&str; 3] = ["qemu", "propolis", "fake"];

/// Why the agent's settings cannot be used. Nothing has been changed when
/// it is returned.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file exists but cannot be read.
    #[error("cannot read the agent config file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML, has an unknown key or a bad value.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// 1-based column (in characters).
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// etcd was selected but no endpoint was given anywhere.
    #[error("store etcd (from {from}) needs the etcd endpoints")]
    NoEndpoints {
        /// Where `etcd` was selected: a flag/variable or the file.
        from: String,
        /// The config file that could give them.
        path: PathBuf,
    },
    /// A flag or variable has a value the config file would refuse too, or
    /// one that would be ignored without a word.
    #[error("{flag}: {message}")]
    Flag {
        /// The flag and its variable, e.g. `--etcd-prefix / VMCTL_ETCD_PREFIX`.
        flag: &'static str,
        /// What is wrong.
        message: String,
        /// What to do.
        help: String,
    },
}

impl ConfigError {
    /// What the user can do about it.
    pub fn help(&self) -> String {
        match self {
            ConfigError::Read { path, .. } => format!(
                "make {} readable by the agent's user, or remove it to use the defaults",
                path.display()
            ),
            ConfigError::Invalid { path, .. } => format!(
                "fix {} (keys: driver = \"qemu\"|\"propolis\"|\"fake\", store = \"sled\"|\"etcd\", \
                 under [etcd]: endpoints = [\"http://HOST:2379\", …], prefix = \"/vmctl/\", \
                 dnsmasq-leases = [\"/ABSOLUTE/PATH\", …], \
                 node-labels = [\"KEY=VALUE\", …], node-lease-ttl = SECONDS, fence = true, \
                 listen = \"IP:PORT\", tls-dir = \"/ABSOLUTE/PATH\", \
                 under [propolis]: host, addr, pool, brand, zone-root, vnic-link, start-timeout), \
                 or remove it to use the defaults",
                path.display()
            ),
            ConfigError::Flag { help, .. } => help.clone(),
            ConfigError::NoEndpoints { path, .. } => format!(
                "pass --etcd-endpoints http://HOST:2379[,…], set VMCTL_ETCD_ENDPOINTS, \
                 or add endpoints = [\"http://HOST:2379\"] under [etcd] in {}",
                path.display()
            ),
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..text.floor_char_boundary(offset.min(text.len()))];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// The config file's settings, checked; `None` when there is no file.
fn read_file(path: &Path) -> Result<Option<FileSettings>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let invalid = |span: Range<usize>, message: String| {
        let (line, column) = line_column(&text, span.start);
        ConfigError::Invalid {
            path: path.to_owned(),
            line,
            column,
            message,
        }
    };
    let file: FileSettings = toml::from_str(&text)
        .map_err(|e| invalid(e.span().unwrap_or(0..0), e.message().trim().to_owned()))?;
    if let Some(d) = &file.driver
        && !DRIVERS.contains(&d.get_ref().as_str())
    {
        return Err(invalid(
            d.span(),
            format!(
                "unknown driver `{}`, expected `qemu`, `propolis` or `fake`",
                d.get_ref()
            ),
        ));
    }
    if let Some(etcd) = &file.etcd {
        if let Some(eps) = &etcd.endpoints {
            if eps.get_ref().is_empty() {
                return Err(invalid(
                    eps.span(),
                    "etcd endpoints are empty; give at least one URL such as http://HOST:2379"
                        .into(),
                ));
            }
            for ep in eps.get_ref() {
                if let Err(why) = check_endpoint(ep.get_ref()) {
                    return Err(invalid(ep.span(), why));
                }
            }
        }
        if let Some(p) = &etcd.prefix
            && let Err(why) = vmctl_store::etcd::check_prefix(p.get_ref())
        {
            return Err(invalid(p.span(), why));
        }
    }
    for p in file.dnsmasq_leases.iter().flatten() {
        if !p.get_ref().is_absolute() {
            return Err(invalid(
                p.span(),
                format!(
                    "dnsmasq lease file `{}` is not an absolute path",
                    p.get_ref().display()
                ),
            ));
        }
    }
    if let Some(t) = &file.node_lease_ttl
        && let Err(why) = check_lease_ttl(*t.get_ref())
    {
        return Err(invalid(t.span(), why));
    }
    if let Some(l) = &file.listen
        && let Err(why) = parse_listen(l.get_ref())
    {
        return Err(invalid(l.span(), why));
    }
    if let Some(d) = &file.tls_dir
        && !d.get_ref().is_absolute()
    {
        return Err(invalid(
            d.span(),
            format!(
                "tls-dir `{}` is not an absolute path",
                d.get_ref().display()
            ),
        ));
    }
    let mut file = file;
    if let Some(labels) = &file.node_labels {
        let mut out = BTreeMap::new();
        for l in labels {
            add_label(&mut out, l.get_ref()).map_err(|why| invalid(l.span(), why))?;
        }
        file.node_labels_checked = Some(out);
    }
    if let Some(section) = &file.propolis {
        file.propolis_settings = propolis_section(section, &invalid)?;
    }
    Ok(Some(file))
}

/// The `[propolis]` table of the config file, each value checked as the
/// driver checks it (so a bad one is located here, not at the first VM).
fn propolis_section(
    section: &PropolisSection,
    invalid: &impl Fn(Range<usize>, String) -> ConfigError,
) -> Result<PropolisSettings, ConfigError> {
    use vmctl_controllers::drivers::propolis::PropolisConfig;
    let text = |v: &Option<Spanned<String>>| v.as_ref().map(|v| v.get_ref().clone());
    let settings = PropolisSettings {
        host: text(&section.host),
        addr: text(&section.addr),
        pool: text(&section.pool),
        brand: text(&section.brand),
        zone_root: text(&section.zone_root),
        vnic_link: text(&section.vnic_link),
        start_timeout: section.start_timeout.as_ref().map(|t| *t.get_ref()),
    };
    let span = |key: &str| match key {
        "host" => section.host.as_ref().map(Spanned::span),
        "addr" => section.addr.as_ref().map(Spanned::span),
        "pool" => section.pool.as_ref().map(Spanned::span),
        "brand" => section.brand.as_ref().map(Spanned::span),
        "zone-root" => section.zone_root.as_ref().map(Spanned::span),
        "vnic-link" => section.vnic_link.as_ref().map(Spanned::span),
        _ => section.start_timeout.as_ref().map(Spanned::span),
    };
    for (key, var) in PropolisSettings::VARS {
        let Some(value) = settings.lookup(var) else {
            continue;
        };
        let at = span(key).unwrap_or(0..0);
        if key == "host" && value != "system" && value != "simulated" {
            return Err(invalid(
                at,
                format!("propolis host `{value}`: expected \"system\" or \"simulated\""),
            ));
        }
        if let Err(e) = PropolisConfig::new("/").with_lookup(|v| (v == var).then(|| value.clone()))
        {
            return Err(invalid(
                at,
                format!("propolis {key} `{value}`: expected {}", e.expected),
            ));
        }
    }
    Ok(settings)
}

/// The flags' and variables' etcd settings, checked as the config file's
/// are (the tryout found `--etcd-endpoints ftp://…` and `--etcd-prefix
/// vmctl/` accepted), and refused when they would be ignored: endpoints or
/// a prefix while the store is sled.
fn check_given(given: &AgentOverrides, file_store: Option<StoreKind>) -> Result<(), ConfigError> {
    const EPS: &str = "--etcd-endpoints / VMCTL_ETCD_ENDPOINTS";
    const PREFIX: &str = "--etcd-prefix / VMCTL_ETCD_PREFIX";
    let etcd = given.store.or(file_store) == Some(StoreKind::Etcd);
    if let Some(eps) = &given.etcd_endpoints {
        for ep in eps.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            check_endpoint(ep).map_err(|message| ConfigError::Flag {
                flag: EPS,
                message,
                help: "give etcd client URLs, comma-separated: http://HOST:2379[,…]".into(),
            })?;
        }
    }
    if let Some(p) = &given.etcd_prefix
        && let Err(message) = vmctl_store::etcd::check_prefix(p)
    {
        return Err(ConfigError::Flag {
            flag: PREFIX,
            message,
            help: "write it as /NAME/, e.g. --etcd-prefix /vmctl/".into(),
        });
    }
    let unused = match (&given.etcd_endpoints, &given.etcd_prefix) {
        (Some(_), _) => Some(EPS),
        (None, Some(_)) => Some(PREFIX),
        (None, None) => None,
    };
    if let Some(p) = given
        .dnsmasq_leases
        .iter()
        .flatten()
        .find(|p| !p.is_absolute())
    {
        return Err(ConfigError::Flag {
            flag: "--dnsmasq-leases / VMCTL_DNSMASQ_LEASES",
            message: format!("`{}` is not an absolute path", p.display()),
            help: "give absolute paths, comma-separated: --dnsmasq-leases /run/br0.leases".into(),
        });
    }
    if let (Some(true), false) = (given.fence, etcd) {
        return Err(ConfigError::Flag {
            flag: "--fence / VMCTL_FENCE",
            message: "given, but the store is sled: one host has no node lease to lose".into(),
            help: "add --store etcd (or VMCTL_STORE=etcd, or store = \"etcd\" in agent.toml), \
                   or drop --fence"
                .into(),
        });
    }
    if let (Some(ttl), false) = (given.node_lease_ttl, etcd) {
        return Err(ConfigError::Flag {
            flag: NODE_LEASE_TTL,
            message: format!(
                "{ttl} given, but the store is sled, which has no node lease (its one agent \
                 registers its Node and keeps it Ready while it runs)"
            ),
            help: "add --store etcd (or VMCTL_STORE=etcd, or store = \"etcd\" in agent.toml), \
                   or drop --node-lease-ttl"
                .into(),
        });
    }
    if let Some(ttl) = given.node_lease_ttl {
        check_lease_ttl(ttl).map_err(|message| ConfigError::Flag {
            flag: NODE_LEASE_TTL,
            message,
            help: "give whole seconds, e.g. --node-lease-ttl 10 (the default)".into(),
        })?;
    }
    if let Some(labels) = &given.node_labels {
        let mut out = BTreeMap::new();
        for l in labels.iter().map(|l| l.trim()).filter(|l| !l.is_empty()) {
            add_label(&mut out, l).map_err(|message| ConfigError::Flag {
                flag: "--node-labels / VMCTL_NODE_LABELS",
                message,
                help: "write comma-separated KEY=VALUE pairs, e.g. --node-labels zone=a,rack=1 \
                       (keys and values: letters, digits, '-', '_' and '.', at most 63; a key \
                       may have a DNS prefix, as in topology.vmctl.dev/zone=a)"
                    .into(),
            })?;
        }
    }
    if let (Some(flag), false) = (unused, etcd) {
        return Err(ConfigError::Flag {
            flag,
            message: "given, but the store is sled, which would ignore it".into(),
            help:
                "add --store etcd (or VMCTL_STORE=etcd, or store = \"etcd\" in agent.toml) to keep \
                   the objects in etcd, or drop the etcd settings"
                    .into(),
        });
    }
    Ok(())
}

/// Parses a listen address, `IP:PORT` (`[IPv6]:PORT`).
fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        format!("listen address `{s}` is not IP:PORT (e.g. 10.0.0.2:7443 or [::1]:7443)")
    })
}

/// The TLS listener from the flags (`given`) or else the file: both the
/// address and the directory, or neither. The agent never listens on TCP
/// without TLS, and refuses a directory it would ignore.
fn door(given: &AgentOverrides, file: &FileSettings) -> Result<Option<DoorConfig>, ConfigError> {
    const LISTEN: &str = "--listen / VMCTL_LISTEN";
    const TLS_DIR: &str = "--tls-dir / VMCTL_TLS_DIR";
    let listen = match (&given.listen, &file.listen) {
        (Some(l), _) => Some(parse_listen(l).map_err(|message| ConfigError::Flag {
            flag: LISTEN,
            message,
            help: "give an IP address and port of this host, e.g. --listen 10.0.0.2:7443".into(),
        })?),
        // Checked by read_file.
        (None, Some(l)) => parse_listen(l.get_ref()).ok(),
        (None, None) => None,
    };
    let tls_dir = match (&given.tls_dir, &file.tls_dir) {
        (Some(d), _) => Some(absolute(d).unwrap_or_else(|_| d.clone())),
        (None, Some(d)) => Some(d.get_ref().clone()),
        (None, None) => None,
    };
    match (listen, tls_dir) {
        (Some(listen), Some(tls_dir)) => Ok(Some(DoorConfig { listen, tls_dir })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::Flag {
            flag: LISTEN,
            message: "given without --tls-dir: the agent never listens on TCP without TLS".into(),
            help: "add --tls-dir DIR (VMCTL_TLS_DIR, or tls-dir in agent.toml) with the files \
                   `vmctl cluster issue agent NAME --address IP` writes (ca.crt, agent.crt, \
                   agent.key)"
                .into(),
        }),
        (None, Some(_)) => Err(ConfigError::Flag {
            flag: TLS_DIR,
            message: "given without --listen, which would leave it unused".into(),
            help: "add --listen IP:PORT (VMCTL_LISTEN, or listen in agent.toml), or drop \
                   --tls-dir"
                .into(),
        }),
    }
}

/// The flag and variable of the node lease TTL, for messages.
const NODE_LEASE_TTL: &str = "--node-lease-ttl / VMCTL_NODE_LEASE_TTL";

/// Checks a node lease TTL in seconds against [`NODE_LEASE_TTL_RANGE`].
fn check_lease_ttl(secs: u64) -> Result<(), String> {
    if NODE_LEASE_TTL_RANGE.contains(&secs) {
        return Ok(());
    }
    Err(format!(
        "node lease TTL {secs} s is out of range: {} to {} seconds",
        NODE_LEASE_TTL_RANGE.start(),
        NODE_LEASE_TTL_RANGE.end()
    ))
}

/// Checks one node label (`KEY=VALUE`) and adds it to `labels`; a key
/// given twice is refused (which one was meant?).
fn add_label(labels: &mut BTreeMap<String, String>, label: &str) -> Result<(), String> {
    let (k, v) = vmctl_api::node::parse_label(label)?;
    if labels.contains_key(&k) {
        return Err(format!("label key `{k}` is given twice"));
    }
    labels.insert(k, v);
    Ok(())
}

/// Checks a `--node-name`: a DNS-1123 subdomain, as Kubernetes' node
/// names (a lowercase host name fits).
fn check_node_name(name: &str) -> Result<(), ConfigError> {
    vmctl_api::node::check_node_name(name).map_err(|message| ConfigError::Flag {
        flag: "--node-name / VMCTL_NODE_NAME",
        message,
        help: format!(
            "give a name such as the host's (`host-b`), or drop it to use the host name; {}",
            vmctl_api::node::NODE_NAME_HELP
        ),
    })
}

/// The node name when none is given: the host name in lowercase (as the
/// kubelet's), with any character a node name cannot have turned into
/// `-` (`my_host` → `my-host`); `localhost` when nothing is left.
pub fn default_node_name() -> String {
    let host = vmctl_controllers::host_name().to_ascii_lowercase();
    if vmctl_api::node::check_node_name(&host).is_ok() {
        return host;
    }
    let mapped: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let parts: Vec<String> = mapped
        .split('.')
        .map(|p| {
            p.chars()
                .take(63)
                .collect::<String>()
                .trim_matches('-')
                .to_owned()
        })
        .filter(|p| !p.is_empty())
        .collect();
    let mut name = parts.join(".");
    name.truncate(253);
    let name = name.trim_matches(|c| c == '-' || c == '.').to_owned();
    if vmctl_api::node::check_node_name(&name).is_ok() {
        name
    } else {
        "localhost".into()
    }
}

/// Checks that an endpoint is an `http://` or `https://` URL with a host.
fn check_endpoint(ep: &str) -> Result<(), String> {
    let bad =
        |why: &str| format!("etcd endpoint `{ep}` {why}; expected a URL such as http://HOST:2379");
    let Some((scheme, rest)) = ep.split_once("://") else {
        return Err(bad("has no scheme"));
    };
    if scheme != "http" && scheme != "https" {
        return Err(bad("is not http or https"));
    }
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || ep.chars().any(|c| c.is_whitespace() || c == ',') {
        return Err(bad("is not a valid URL"));
    }
    Ok(())
}

pub use vmctl_api::paths::{
    PathError, SOCKET_PATH_MAX, absolute, check_socket_path, default_data_dir, default_socket,
};

impl AgentConfig {
    /// Settings with every default for `data_dir`, made absolute (see
    /// [`absolute`]; kept as given if the working directory is unknown).
    pub fn new(data_dir: PathBuf) -> Self {
        let data_dir = absolute(&data_dir).unwrap_or(data_dir);
        let socket = default_socket(&data_dir);
        AgentConfig {
            data_dir,
            socket,
            driver: "qemu".into(),
            retention: vmctl_store::Retention::default(),
            store: StoreConfig::Sled,
            propolis: PropolisSettings::default(),
            socket_group: None,
            lease_ttl: crate::lease::DEFAULT_TTL,
            node_name: default_node_name(),
            node_labels: BTreeMap::new(),
            node_lease_ttl: Duration::from_secs(vmctl_api::node::DEFAULT_LEASE_TTL_SECONDS),
            fence: false,
            dnsmasq_leases: Vec::new(),
            door: None,
        }
    }

    /// Settings for `data_dir`: each one from `given` (flags and
    /// environment), else from `<data_dir>/agent.toml` when it exists, else
    /// the default (driver `qemu`, store sled, prefix `/vmctl/`). The socket
    /// is the default one; callers set another.
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file exists but cannot be read;
    /// [`ConfigError::Invalid`] (file, line, column) for bad TOML, an
    /// unknown key or a bad value; [`ConfigError::NoEndpoints`] when etcd
    /// is selected without endpoints.
    pub fn resolve(data_dir: PathBuf, given: AgentOverrides) -> Result<Self, ConfigError> {
        let mut cfg = AgentConfig::new(data_dir);
        let path = cfg.config_file();
        let file = read_file(&path)?.unwrap_or_default();
        check_given(&given, file.store.as_ref().map(|s| *s.get_ref()))?;
        cfg.door = door(&given, &file)?;
        if let Some(n) = &given.node_name {
            check_node_name(n)?;
            cfg.node_name = n.clone();
        }
        cfg.node_labels = match (&given.node_labels, &file.node_labels_checked) {
            // Checked by check_given.
            (Some(g), _) => {
                let mut out = BTreeMap::new();
                for l in g.iter().map(|l| l.trim()).filter(|l| !l.is_empty()) {
                    let _ = add_label(&mut out, l);
                }
                out
            }
            (None, Some(f)) => f.clone(),
            (None, None) => BTreeMap::new(),
        };
        if let Some(t) = given
            .node_lease_ttl
            .or(file.node_lease_ttl.as_ref().map(|t| *t.get_ref()))
        {
            cfg.node_lease_ttl = Duration::from_secs(t);
        }
        cfg.fence = given
            .fence
            .or(file.fence.as_ref().map(|f| *f.get_ref()))
            .unwrap_or(false);
        cfg.propolis = given.propolis.clone().or(file.propolis_settings.clone());
        cfg.dnsmasq_leases = match (&given.dnsmasq_leases, &file.dnsmasq_leases) {
            (Some(g), _) => g.clone(),
            (None, Some(f)) => f.iter().map(|p| p.get_ref().clone()).collect(),
            (None, None) => Vec::new(),
        };
        let etcd = file.etcd.unwrap_or_default();
        if let Some(d) = given.driver.or(file.driver.map(Spanned::into_inner)) {
            cfg.driver = d;
        }
        let (store, from) = match (given.store, file.store) {
            (Some(k), _) => (k, "--store or VMCTL_STORE".to_owned()),
            (None, Some(k)) => (k.into_inner(), path.display().to_string()),
            (None, None) => (StoreKind::Sled, String::new()),
        };
        cfg.store = match store {
            StoreKind::Sled => StoreConfig::Sled,
            StoreKind::Etcd => {
                let endpoints: Vec<String> = match given.etcd_endpoints {
                    Some(eps) => eps
                        .into_iter()
                        .map(|e| e.trim().to_owned())
                        .filter(|e| !e.is_empty())
                        .collect(),
                    None => etcd
                        .endpoints
                        .map(|eps| {
                            eps.into_inner()
                                .into_iter()
                                .map(Spanned::into_inner)
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                if endpoints.is_empty() {
                    return Err(ConfigError::NoEndpoints { from, path });
                }
                let prefix = given
                    .etcd_prefix
                    .or(etcd.prefix.map(Spanned::into_inner))
                    .unwrap_or_else(|| "/vmctl/".into());
                StoreConfig::Etcd { endpoints, prefix }
            }
        };
        Ok(cfg)
    }

    /// The config file, `<data_dir>/agent.toml`.
    pub fn config_file(&self) -> PathBuf {
        self.data_dir.join(CONFIG_FILE)
    }

    /// The store's directory.
    pub fn db_dir(&self) -> PathBuf {
        self.data_dir.join("db")
    }

    /// The agent's lock file.
    pub fn lock_file(&self) -> PathBuf {
        self.data_dir.join("agent.lock")
    }
}

#[cfg(test)]
mod tests;
