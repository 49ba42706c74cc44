//! The Node kind: one host that runs an agent, as the agent registers it
//! (Kubernetes' Node, as a kubelet registers it).
//!
//! Nodes are written by agents only: a manifest with `kind: Node` is
//! refused (see [`crate::validate`]). Each agent creates its Node (named
//! by its `--node-name`, labelled by its `--node-labels`) when it starts,
//! and keeps `status` current:
//!
//! ```text
//!              agent starts                    heartbeat older than
//!   (none) ──── registers ───▶ Ready=True ───── TTL + 2 s ────────▶ Ready=False
//!                                │  ▲ heartbeat    (another agent's   NodeStatusUnknown
//!                                │  └─ every TTL/3   controllers)         │
//!                                │                                       │
//!                                └── agent stops ──▶ Ready=False          │
//!                                                    AgentStopped         │
//!                  agent (re)starts, or its heartbeat gets through ◀─────┘
//! ```
//!
//! On etcd the heartbeat (`status.lastHeartbeatTime`) is written every
//! third of the node lease's TTL (`status.leaseTtlSeconds`), beside the
//! etcd lease that holds the node's name while its agent lives. On sled
//! the single agent registers its Node when it starts and writes no
//! heartbeat after (nobody else can read that store while it runs); it
//! marks it `AgentStopped` when it stops.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::{Condition, ConditionStatus, Time};

/// The node lease's TTL when none is configured (`--node-lease-ttl`), and
/// the TTL a Node without `status.leaseTtlSeconds` (registered on sled) is
/// judged by, in seconds.
pub const DEFAULT_LEASE_TTL_SECONDS: u64 = 10;

/// How much older than its TTL a Node's heartbeat may be before the
/// controllers mark it `Ready=False` (`NodeStatusUnknown`): room for one
/// late write, in seconds.
pub const HEARTBEAT_GRACE_SECONDS: u64 = 2;

/// `Ready=True`: the agent registered the Node and posts its heartbeat.
pub const REASON_AGENT_READY: &str = "AgentReady";

/// `Ready=False`: the heartbeat stopped for longer than the TTL + 2 s,
/// as the controllers of another agent saw (Kubernetes' reason).
pub const REASON_STATUS_UNKNOWN: &str = "NodeStatusUnknown";

/// `Ready=False`: the agent stopped (SIGTERM) and said so.
pub const REASON_AGENT_STOPPED: &str = "AgentStopped";

/// What a user may set on a Node: nothing yet (labels come from the
/// agent's `--node-labels`). Placement (issue 17) adds fields here.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {}

/// Amounts of a node's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeResources {
    /// Logical CPUs the agent may run vCPUs on (the host's online CPUs,
    /// as far as the agent's CPU affinity and cgroup allow).
    pub vcpus: u32,
    /// Memory, MiB (1 MiB = 2^20 bytes): the host's total memory (Linux
    /// `MemTotal`); 0 where it cannot be read.
    pub memory_mib: u64,
    /// Free disk space of the filesystem holding the agent's data
    /// directory (images and VM disks), GiB (2^30 bytes), rounded down, as
    /// of the last status the agent wrote.
    pub disk_gib: u64,
}

/// Where a node's agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeAddress {
    /// The absolute path of the agent's Unix socket, on its host.
    pub socket: String,
    /// `HOST:PORT` of the agent's TCP (TLS) listener; none yet (reserved
    /// for agents that serve other hosts, issue 17).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
}

/// Observed state of a node, written by its agent (and `Ready=False` by
/// another agent's controllers when its heartbeat stops).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Conditions: `Ready` (reasons [`REASON_AGENT_READY`],
    /// [`REASON_STATUS_UNKNOWN`], [`REASON_AGENT_STOPPED`]).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Generation of the spec this status reflects.
    #[serde(default)]
    pub observed_generation: u64,
    /// What the host has.
    #[serde(default)]
    pub capacity: NodeResources,
    /// What VMs may use of it: equal to `capacity` for now (no reserve
    /// is kept for the host yet).
    #[serde(default)]
    pub allocatable: NodeResources,
    /// The accelerator VMs start with here: `kvm` or `tcg` (QEMU, as the
    /// driver detected or was told by `VMCTL_ACCEL`); absent when the
    /// driver has none (the fake one) or has not said yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
    /// The agent's hypervisor driver: `qemu`, `propolis` or `fake`.
    #[serde(default)]
    pub driver: String,
    /// Where the agent's API answers.
    #[serde(default)]
    pub address: NodeAddress,
    /// The agent's version (its `vmctl-agent --version`).
    #[serde(default)]
    pub agent_version: String,
    /// When the agent last wrote this status, by its clock: every third
    /// of `leaseTtlSeconds` on etcd; on sled, when the agent started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// The TTL of the node's etcd lease, seconds: the Node is marked
    /// `Ready=False` once its heartbeat is older than this plus
    /// [`HEARTBEAT_GRACE_SECONDS`]. Absent on sled (no lease; judged by
    /// [`DEFAULT_LEASE_TTL_SECONDS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ttl_seconds: Option<u64>,
}

impl NodeStatus {
    /// The `Ready` condition, if reported.
    pub fn ready(&self) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == "Ready")
    }

    /// Whether `Ready` is `True`.
    pub fn is_ready(&self) -> bool {
        self.ready()
            .is_some_and(|c| c.status == ConditionStatus::True)
    }

    /// How old the heartbeat may be before the Node is not Ready: the
    /// lease TTL (or the default) plus the grace.
    pub fn heartbeat_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.lease_ttl_seconds.unwrap_or(DEFAULT_LEASE_TTL_SECONDS) + HEARTBEAT_GRACE_SECONDS,
        )
    }
}

/// Checks a node name as Kubernetes does: a DNS-1123 subdomain, 1–253
/// characters of lowercase letters, digits, `-` and `.`, each
/// `.`-separated part 1–63 characters starting and ending with a letter
/// or digit (a lowercase host name fits). Returns what is wrong.
pub fn check_node_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err(format!(
            "node name `{}` must have 1 to 253 characters",
            name.escape_default()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.'))
    {
        let what = if c.is_ascii_uppercase() {
            "an uppercase letter".to_owned()
        } else {
            format!("`{}`", c.escape_default())
        };
        return Err(format!(
            "node name `{}` contains {what}",
            name.escape_default()
        ));
    }
    for part in name.split('.') {
        if part.is_empty() || part.len() > 63 {
            return Err(format!(
                "node name `{name}` has a `.`-separated part that is empty or longer than 63 characters"
            ));
        }
        if part.starts_with('-') || part.ends_with('-') {
            return Err(format!(
                "node name `{name}`: each `.`-separated part must start and end with a letter or digit"
            ));
        }
    }
    Ok(())
}

/// The help line shown with a node name error.
pub const NODE_NAME_HELP: &str = "node names are DNS-1123 subdomains: lowercase letters, digits, \
'-' and '.', at most 253 characters (e.g. `host-b` or `host-b.example.com`)";

/// Checks one node label, `key=value`, and splits it. Keys are 1–63
/// characters of letters, digits, `-`, `_` and `.` starting and ending
/// with a letter or digit, optionally after a `prefix/` that is a DNS
/// subdomain (`topology.vmctl.dev/zone`); values are empty or up to 63
/// such characters (Kubernetes' label syntax). Returns what is wrong.
pub fn parse_label(label: &str) -> Result<(String, String), String> {
    let Some((key, value)) = label.split_once('=') else {
        return Err(format!("label `{label}` has no `=`; write KEY=VALUE"));
    };
    check_label_key(key)?;
    check_label_value(key, value)?;
    Ok((key.to_owned(), value.to_owned()))
}

/// Whether `s` is a label name part: 1–63 letters, digits, `-`, `_` and
/// `.`, starting and ending with a letter or digit.
fn label_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Checks a label key, as [`parse_label`] does (also the keys of a VM's
/// `nodeSelector`). Returns what is wrong.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && check_node_name(p).is_err()
    {
        return Err(format!(
            "label key `{key}`: its prefix `{p}` is not a DNS subdomain (lowercase letters, digits, `-` and `.`)"
        ));
    }
    if !label_name_part(name) {
        return Err(format!(
            "label key `{key}` must be 1 to 63 letters, digits, `-`, `_` or `.`, starting and \
             ending with a letter or digit"
        ));
    }
    Ok(())
}

/// Checks the value of the label `key`, as [`parse_label`] does (also the
/// values of a VM's `nodeSelector`). Returns what is wrong.
pub fn check_label_value(key: &str, value: &str) -> Result<(), String> {
    if !value.is_empty() && !label_name_part(value) {
        return Err(format!(
            "label value `{value}` (of `{key}`) must be empty or 1 to 63 letters, digits, `-`, \
             `_` or `.`, starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// The help line shown with a label error.
pub const LABEL_HELP: &str = "label keys are 1-63 letters, digits, '-', '_' or '.' (starting and \
ending with a letter or digit), optionally after a DNS prefix and '/' (`topology.vmctl.dev/zone`); \
values are empty or the same characters";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_dns_subdomains() {
        for good in ["a", "host-b", "host-b.example.com", "10.0.0.1"] {
            check_node_name(good).unwrap();
        }
        for (bad, says) in [
            ("", "1 to 253"),
            ("Host", "uppercase"),
            ("a_b", "`_`"),
            ("a..b", "empty"),
            ("-a", "start and end"),
            ("a/b", "`/`"),
        ] {
            let e = check_node_name(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn labels_follow_the_kubernetes_syntax() {
        assert_eq!(parse_label("zone=a").unwrap(), ("zone".into(), "a".into()));
        assert_eq!(parse_label("ssd=").unwrap(), ("ssd".into(), String::new()));
        assert_eq!(
            parse_label("topology.vmctl.dev/zone=eu-1").unwrap().0,
            "topology.vmctl.dev/zone"
        );
        for (bad, says) in [
            ("zone", "no `=`"),
            ("=a", "label key"),
            ("zone=a b", "label value"),
            ("zo ne=a", "label key"),
            ("Bad_/k=v", "prefix"),
            ("k=-a", "label value"),
        ] {
            let e = parse_label(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
