//! Finding the IPv4 address of a guest on a `tap` network, by its MAC, as
//! the manual's tool did ("IP Discovery"): the kernel's neighbour (ARP)
//! table on the VM's bridge first, then dnsmasq lease files. One worker
//! task per running tap VM looks on its own clock and keeps the latest
//! result; the VM reconciler reads it when it reports the VM (the address
//! becomes `status.runtime.sshHost`, port 22, and the `AddressReady`
//! condition says how the search stands). A result that changes wakes the
//! VM's reconcile through [`Discoverer::changes`].
//!
//! ```text
//!   watch(vm) ──▶ worker ── Searching: a look every 500 ms ── found ──▶ Found
//!                   │                                                  │
//!                   └── the VM's SSH timeout passed ──▶ TimedOut       │
//!                        (IPDiscoveryTimeout, the manual's hints;      │
//!                         looks again with backoff, 1 s … 10 s) ─found─┤
//!   Found: a look every 30 s; another address for the MAC replaces it ◀┘
//!   forget(vm) ── worker aborted (stopped, restarted, deleted)
//! ```
//!
//! Nothing is sent to make the guest known: the neighbour table holds the
//! guest once it has talked to the host (dnsmasq itself puts the entry
//! there when it answers a DHCP request by unicast, and any reply to the
//! host does), and the lease file holds it once dnsmasq served it. A sweep
//! of the bridge's subnet or a broadcast ping would send traffic to every
//! machine on the user's network (guests ignore broadcast pings by default,
//! `net.ipv4.icmp_echo_ignore_broadcasts`), so it is not done.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;
use tokio::time::Instant;

/// Period of looks while the guest boots.
pub const SEARCH_PERIOD: Duration = Duration::from_millis(500);
/// First period of looks after the timeout; it doubles up to
/// [`MAX_BACKOFF`], so a lease that comes late is still found.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest period of looks after the timeout.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Period of looks once the address is known (a new lease may move it).
pub const RECHECK_PERIOD: Duration = Duration::from_secs(30);
/// Bound on one run of `ip neigh`.
const IP_TIMEOUT: Duration = Duration::from_secs(5);

/// dnsmasq lease files read when no other is configured, in this order:
/// dnsmasq's compiled-in default `LEASEFILE` on Linux (`src/config.h`:
/// `/var/lib/misc/dnsmasq.leases`, Debian and Ubuntu use it), the one
/// Fedora's and RHEL's `/etc/dnsmasq.conf` sets, and the BSDs' default.
/// NetworkManager's shared connections write
/// `/var/lib/NetworkManager/dnsmasq-<bridge>.leases` ([`lease_files`]).
pub const DEFAULT_LEASE_FILES: [&str; 3] = [
    "/var/lib/misc/dnsmasq.leases",
    "/var/lib/dnsmasq/dnsmasq.leases",
    "/var/db/dnsmasq.leases",
];

/// The hints of the manual's "IP discovery timeout" (Troubleshooting), in
/// the condition's message.
pub const HINTS: &str = "verify that the bridge exists and has DHCP (e.g. dnsmasq --interface=BRIDGE --dhcp-range=…); \
check `ip neigh show dev BRIDGE` for the guest's MAC; \
ensure the guest has obtained a DHCP lease (`vmctl log NAME --console`)";

/// What to look for: the VM's MAC on its bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The NIC's MAC (`52:54:00:…`).
    pub mac: String,
    /// The bridge its TAP device is attached to.
    pub bridge: String,
    /// How long the search may take before the condition says
    /// `IPDiscoveryTimeout` (the VM's SSH timeout).
    pub timeout: Duration,
}

/// Where an address was found: the neighbour table, or a lease file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The kernel's neighbour table on this bridge.
    Neighbours(String),
    /// This dnsmasq lease file.
    Lease(PathBuf),
    /// The VM's status, written before the agent restarted.
    Status,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Neighbours(br) => write!(f, "the neighbour table of {br}"),
            Source::Lease(p) => write!(f, "the dnsmasq lease file {}", p.display()),
            Source::Status => f.write_str("the VM's status (found before the agent restarted)"),
        }
    }
}

/// How the search for one VM's address stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// Not found yet, within the timeout.
    Searching {
        /// What was looked at and why nothing was found, for people.
        message: String,
    },
    /// Not found within the timeout; still looked for, with backoff.
    TimedOut {
        /// What was looked at, why nothing was found and the hints.
        message: String,
    },
    /// Found.
    Found {
        /// The guest's IPv4 address.
        address: Ipv4Addr,
        /// Where it was found.
        source: Source,
        /// When it was first found (the condition's lastTransitionTime);
        /// `None` when the VM's status already held it (see
        /// [`Discoverer::watch`]) and the stored time stands.
        since: Option<DateTime<Utc>>,
    },
}

impl Discovery {
    /// The address, once found.
    pub fn address(&self) -> Option<Ipv4Addr> {
        match self {
            Discovery::Found { address, .. } => Some(*address),
            _ => None,
        }
    }
}

/// One entry of `ip -j neigh show dev BRIDGE` (iproute2's JSON output).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Neighbour {
    /// The neighbour's address (IPv4 or IPv6).
    pub dst: String,
    /// Its link-layer address; absent while unresolved (`INCOMPLETE`,
    /// `FAILED`).
    #[serde(default)]
    pub lladdr: Option<String>,
    /// NUD states (`REACHABLE`, `STALE`, `DELAY`, `PROBE`, `PERMANENT`, …).
    #[serde(default)]
    pub state: Vec<String>,
}

/// Parses the output of `ip -j neigh show …`. An empty output (iproute2
/// prints nothing, not `[]`, for an empty table on some versions) is an
/// empty table.
///
/// # Errors
/// The output is not iproute2's JSON array of neighbours.
pub fn parse_neighbours(json: &str) -> Result<Vec<Neighbour>, serde_json::Error> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(json)
}

/// The IPv4 address the neighbour table gives `mac`, if any: an entry with
/// that link-layer address (compared without regard to case) in a state
/// other than `FAILED` or `INCOMPLETE`.
pub fn neighbour_address(table: &[Neighbour], mac: &str) -> Option<Ipv4Addr> {
    table
        .iter()
        .filter(|n| {
            n.lladdr
                .as_deref()
                .is_some_and(|l| l.eq_ignore_ascii_case(mac))
        })
        .filter(|n| !n.state.iter().any(|s| s == "FAILED" || s == "INCOMPLETE"))
        .find_map(|n| n.dst.parse().ok())
}

/// One IPv4 lease of a dnsmasq lease file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// When it expires, in seconds since the epoch; 0: never.
    pub expiry: u64,
    /// The client's hardware address, as dnsmasq writes it.
    pub mac: String,
    /// The address leased.
    pub address: Ipv4Addr,
    /// The client's host name; `None` for dnsmasq's `*`.
    pub hostname: Option<String>,
}

/// The IPv4 leases of a dnsmasq lease file: lines `EXPIRY MAC IP HOSTNAME
/// CLIENTID` (dnsmasq `src/lease.c`, `lease_update_file`). DHCPv6 lines
/// (after the `duid` line: an IAID where the MAC is, an IPv6 address) and
/// malformed lines are skipped.
pub fn parse_leases(text: &str) -> Vec<Lease> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let expiry = f.next()?.parse().ok()?;
            let mac = f.next()?;
            let address = f.next()?.parse().ok()?;
            let hostname = f.next().filter(|h| *h != "*").map(str::to_owned);
            Some(Lease {
                expiry,
                mac: mac.to_owned(),
                address,
                hostname,
            })
        })
        .collect()
}

/// The address `leases` give `mac` at `now` (seconds since the epoch): the
/// lease of that MAC that is not expired and expires last.
pub fn lease_address(leases: &[Lease], mac: &str, now: u64) -> Option<Ipv4Addr> {
    leases
        .iter()
        .filter(|l| l.mac.eq_ignore_ascii_case(mac))
        .filter(|l| l.expiry == 0 || l.expiry > now)
        .max_by_key(|l| if l.expiry == 0 { u64::MAX } else { l.expiry })
        .map(|l| l.address)
}

/// The lease files to read for `bridge`, in order: `configured` (the
/// agent's `dnsmasq-leases`), then [`DEFAULT_LEASE_FILES`], then
/// NetworkManager's file for the bridge.
pub fn lease_files(configured: &[PathBuf], bridge: &str) -> Vec<PathBuf> {
    configured
        .iter()
        .cloned()
        .chain(DEFAULT_LEASE_FILES.iter().map(PathBuf::from))
        .chain(std::iter::once(PathBuf::from(format!(
            "/var/lib/NetworkManager/dnsmasq-{bridge}.leases"
        ))))
        .collect()
}

/// Reads the neighbour table of `bridge` with `ip -j neigh show dev
/// BRIDGE`.
///
/// iproute2's `ip` rather than rtnetlink through a crate: it is already a
/// prerequisite (the TAP device is made by QEMU's bridge helper, and the
/// tests build bridges with it), its JSON output is stable, it needs no
/// privileges to read the table, and the manual's tool did the same; a
/// netlink crate would add a dependency tree to read one small table a
/// few times a minute.
async fn read_neighbours(bridge: &str) -> Result<Vec<Neighbour>, String> {
    let run = tokio::process::Command::new("ip")
        .args(["-j", "-4", "neigh", "show", "dev", bridge])
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(IP_TIMEOUT, run).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("cannot run `ip neigh` (iproute2): {e}")),
        Err(_) => return Err("`ip neigh` did not answer".into()),
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "`ip neigh show dev {bridge}` failed: {}",
            err.trim()
        ));
    }
    parse_neighbours(&String::from_utf8_lossy(&out.stdout))
        .map_err(|e| format!("`ip -j neigh` printed something else than JSON: {e}"))
}

/// Where the agent looks, beside the neighbour table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// dnsmasq lease files read before [`DEFAULT_LEASE_FILES`] (the agent's
    /// `dnsmasq-leases`).
    pub lease_files: Vec<PathBuf>,
}

/// One look for `w`'s MAC: the neighbour table of its bridge, then the
/// lease files. `Err`: nothing found, and what was looked at, for people.
pub async fn look(w: &Wanted, sources: &Sources) -> Result<(Ipv4Addr, Source), String> {
    let mut notes = Vec::new();
    match read_neighbours(&w.bridge).await {
        Ok(table) => match neighbour_address(&table, &w.mac) {
            Some(ip) => return Ok((ip, Source::Neighbours(w.bridge.clone()))),
            None => notes.push(format!("not in the neighbour table of {}", w.bridge)),
        },
        Err(e) => notes.push(e),
    }
    let now = u64::try_from(Utc::now().timestamp()).unwrap_or_default();
    let mut read = Vec::new();
    for path in lease_files(&sources.lease_files, &w.bridge) {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                if let Some(ip) = lease_address(&parse_leases(&text), &w.mac, now) {
                    return Ok((ip, Source::Lease(path)));
                }
                read.push(path.display().to_string());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => notes.push(format!("cannot read {}: {e}", path.display())),
        }
    }
    notes.push(if read.is_empty() {
        "no dnsmasq lease file found".to_owned()
    } else {
        format!("no lease in {}", read.join(", "))
    });
    Err(notes.join("; "))
}

/// One VM's worker.
struct Worker {
    wanted: Wanted,
    result: Arc<Mutex<Discovery>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Finds the addresses of running tap VMs (see the module docs). One per
/// agent, shared by the VM reconciles.
pub struct Discoverer {
    sources: Arc<Sources>,
    workers: Mutex<HashMap<String, Worker>>,
    changes: broadcast::Sender<String>,
}

impl std::fmt::Debug for Discoverer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.workers.lock().map_or(0, |w| w.len());
        f.debug_struct("Discoverer").field("workers", &n).finish()
    }
}

impl Discoverer {
    /// A discoverer reading `sources` beside the neighbour tables.
    pub fn new(sources: Sources) -> Self {
        Discoverer {
            sources: Arc::new(sources),
            workers: Mutex::new(HashMap::new()),
            changes: broadcast::channel(1024).0,
        }
    }

    /// Names of VMs whose search changed.
    pub fn changes(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    /// Makes sure VM `name`'s address is looked for as `wanted` says
    /// (a new worker when the MAC, bridge or timeout changed) and returns
    /// how the search stands. Needs a tokio runtime.
    ///
    /// `known`: the address the VM's status already holds for this boot
    /// (an agent restarted while the VM ran). A new worker starts from it,
    /// so the VM does not flap to not Ready; a look that finds another
    /// address replaces it.
    pub fn watch(&self, name: &str, wanted: Wanted, known: Option<Ipv4Addr>) -> Discovery {
        let mut workers = self.workers.lock().expect("not poisoned");
        if let Some(w) = workers.get(name)
            && w.wanted == wanted
        {
            return w.result.lock().expect("not poisoned").clone();
        }
        let first = match known {
            Some(address) => Discovery::Found {
                address,
                source: Source::Status,
                since: None,
            },
            None => Discovery::Searching {
                message: format!(
                    "looking for the IPv4 address of MAC {} on bridge {} (neighbour table, then dnsmasq leases)",
                    wanted.mac, wanted.bridge
                ),
            },
        };
        let result = Arc::new(Mutex::new(first.clone()));
        let task = tokio::spawn(search(
            name.to_owned(),
            wanted.clone(),
            self.sources.clone(),
            result.clone(),
            self.changes.clone(),
        ));
        workers.insert(
            name.to_owned(),
            Worker {
                wanted,
                result,
                task,
            },
        );
        first
    }

    /// Stops looking for VM `name`'s address (stopped, about to restart,
    /// deleted).
    pub fn forget(&self, name: &str) {
        self.workers.lock().expect("not poisoned").remove(name);
    }
}

/// Sets the result to `d` and wakes the VM if it changed.
fn publish(
    name: &str,
    result: &Mutex<Discovery>,
    changes: &broadcast::Sender<String>,
    d: Discovery,
) {
    let mut r = result.lock().expect("not poisoned");
    if *r != d {
        tracing::debug!(vm = name, discovery = ?d, "address");
        *r = d;
        drop(r);
        // No receiver (no controller running) is not an error.
        let _ = changes.send(name.to_owned());
    }
}

/// The worker of one VM (see the module docs).
async fn search(
    name: String,
    w: Wanted,
    sources: Arc<Sources>,
    result: Arc<Mutex<Discovery>>,
    changes: broadcast::Sender<String>,
) {
    let started = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let current = result.lock().expect("not poisoned").clone();
        let found = current.address();
        let wait = match look(&w, &sources).await {
            Ok((address, source)) => {
                let since = match current {
                    // Taken from the status: now it is known where from.
                    Discovery::Found {
                        source: Source::Status,
                        since,
                        ..
                    } if found == Some(address) => Some(since),
                    _ if found == Some(address) => None,
                    _ => Some(Some(Utc::now())),
                };
                if let Some(since) = since {
                    let d = Discovery::Found {
                        address,
                        source,
                        since,
                    };
                    publish(&name, &result, &changes, d);
                }
                RECHECK_PERIOD
            }
            // A known address stands: neighbour entries are dropped by
            // the kernel after a while without traffic.
            Err(_) if found.is_some() => RECHECK_PERIOD,
            Err(why) if started.elapsed() < w.timeout => {
                let message = format!(
                    "looking for the IPv4 address of MAC {} on bridge {}: {why}",
                    w.mac, w.bridge
                );
                publish(&name, &result, &changes, Discovery::Searching { message });
                SEARCH_PERIOD
            }
            Err(why) => {
                let hints = HINTS.replace("BRIDGE", &w.bridge).replace("NAME", &name);
                let message = format!(
                    "IP discovery timeout: no IPv4 address for MAC {} on bridge {} after {} s ({why}); still looking. Hints: {hints}",
                    w.mac,
                    w.bridge,
                    w.timeout.as_secs()
                );
                publish(&name, &result, &changes, Discovery::TimedOut { message });
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests;
