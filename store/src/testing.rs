//! A real etcd cluster for tests: members on 127.0.0.1 with free ports and
//! temporary data directories, run from the `etcd` binary (Debian's
//! `etcd-server`; `scripts/install-prereqs` installs it), never a system
//! service.
//!
//! Members are started through `setpriv --pdeathsig KILL` from one
//! long-lived thread, so they die with the test process even when it is
//! killed; [`EtcdCluster`] also kills them (SIGKILL) when dropped.
//! [`EtcdCluster::shared`] is one cluster per test process, for tests that
//! isolate themselves with a key prefix ([`unique_prefix`]).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// One etcd member.
#[derive(Debug)]
struct Member {
    name: String,
    client: u16,
    peer: u16,
    data_dir: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster; dropping it kills every member.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    dir: PathBuf,
    /// Remove `dir` on drop (not for the shared cluster, which is never dropped).
    owned: bool,
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns children from one thread that lives as long as the process, so
/// that `--pdeathsig` (which follows the spawning thread) fires only when
/// the process ends.
fn spawn(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("etcd-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // Every sender is gone only at process exit: stay alive.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawner thread starts");
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    tx.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .map_err(std::io::Error::other)?;
    answer.recv().map_err(std::io::Error::other)?
}

/// A port free on 127.0.0.1 right now.
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A key prefix no other test uses: `/test-<uuid>/`.
pub fn unique_prefix() -> String {
    format!("/test-{}/", uuid::Uuid::new_v4().simple())
}

/// A plain HTTP/1.0 request to etcd's client port (its JSON gateway);
/// returns the body, or `None` when the member does not answer.
fn http(port: u16, method: &str, path: &str, body: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().ok()?,
        Duration::from_millis(300),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

impl EtcdCluster {
    /// Starts `n` members in a new temporary directory and waits until the
    /// cluster is healthy (about 2 s). Errors: `etcd` missing, or not
    /// healthy within 30 s (the members' logs are in the message).
    pub fn start(n: usize) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("vmctl-etcd-")
            .tempdir()?
            .keep();
        Self::start_in(dir, n, true)
    }

    /// One cluster for the whole test process (3 members), started on
    /// first use. Tests share it through distinct key prefixes.
    pub fn shared() -> &'static EtcdCluster {
        static SHARED: OnceLock<EtcdCluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            remove_stale_dirs();
            let dir =
                std::env::temp_dir().join(format!("vmctl-etcd-shared-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temporary directory");
            Self::start_in(dir, 3, false).expect("the shared etcd cluster starts")
        })
    }

    fn start_in(dir: PathBuf, n: usize, owned: bool) -> std::io::Result<Self> {
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            members.push(Member {
                name: format!("m{i}"),
                client: free_port()?,
                peer: free_port()?,
                data_dir: dir.join(format!("m{i}")),
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            members,
            initial_cluster,
            token: format!("vmctl-{}", uuid::Uuid::new_v4().simple()),
            dir,
            owned,
        };
        for i in 0..n {
            c.launch(i)?;
        }
        c.wait_healthy(Duration::from_secs(30))?;
        Ok(c)
    }

    fn launch(&mut self, i: usize) -> std::io::Result<()> {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", m.name)))?;
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--", "etcd"])
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            // Faster elections than the WAN defaults (100 ms / 1 s): loopback.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = spawn(cmd).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot run etcd (install etcd-server: scripts/install-prereqs): {e}"),
            )
        })?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Client URLs of every member, e.g. `http://127.0.0.1:40123`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// The client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client)
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: a cluster has members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether member `i` answers `/health` with `true`.
    pub fn member_healthy(&self, i: usize) -> bool {
        self.members[i].child.is_some()
            && http(self.members[i].client, "GET", "/health", "")
                .is_some_and(|b| b.contains("\"health\":\"true\""))
    }

    /// Waits until every running member is healthy.
    pub fn wait_healthy(&self, timeout: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let running: Vec<usize> = (0..self.members.len())
                .filter(|&i| self.members[i].child.is_some())
                .collect();
            if running.iter().all(|&i| self.member_healthy(i)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "etcd cluster not healthy after {timeout:?}; logs in {}",
                    self.dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The index of the current leader, asked of a running member.
    pub fn leader(&self) -> Option<usize> {
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let Some(body) = http(m.client, "POST", "/v3/maintenance/status", "{}") else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let leader = v["leader"].as_str()?.to_owned();
            let me = v["header"]["member_id"].as_str()?.to_owned();
            if leader == me {
                return self.members.iter().position(|x| x.client == m.client);
            }
            // Ask the others which of them is `leader`.
            for (j, o) in self.members.iter().enumerate() {
                if o.child.is_none() {
                    continue;
                }
                let Some(b) = http(o.client, "POST", "/v3/maintenance/status", "{}") else {
                    continue;
                };
                let ov: serde_json::Value = serde_json::from_str(&b).ok()?;
                if ov["header"]["member_id"].as_str() == Some(leader.as_str()) {
                    return Some(j);
                }
            }
        }
        None
    }

    /// Kills member `i` with SIGKILL (no chance to flush anything).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data directory (after [`kill`](Self::kill)).
    pub fn restart(&mut self, i: usize) -> std::io::Result<()> {
        if self.members[i].child.is_none() {
            self.launch(i)?;
        }
        Ok(())
    }

    /// The directory holding the members' data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes shared clusters' directories left by test processes that are gone.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("vmctl-etcd-shared-")
            && let Ok(pid) = pid.parse::<u32>()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
