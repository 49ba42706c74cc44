//! The QEMU process: started under a small `sh` supervisor that outlives
//! the agent, found again through its pidfile, and its end recorded.
//!
//! ```text
//!   agent ──spawn──▶ /bin/sh (own process group, ignores SIGHUP)
//!                     └─ qemu … -pidfile qemu.pid      (foreground child)
//!                     on exit: echo $? > exit.status   (128+N = signal N)
//! ```
//!
//! `-daemonize` would detach QEMU too, but then nobody sees how it ended;
//! the supervisor is its parent and writes the exit status. The agent
//! reaps the supervisor from a thread while it lives; after an agent
//! restart, init does.
//!
//! No other host program is run for process control: signals go through
//! `nix` (a minimal container has no `kill`, `ps` or `mv`), liveness is
//! read from `/proc`, and the supervisor uses only shell builtins.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

pub use nix::sys::signal::Signal;

use super::Layout;

/// The shell the supervisor runs in. An absolute path: `PATH` may hold
/// nothing but QEMU's tools, and `/bin/sh` is in every Linux system
/// (Debian's is the essential `dash`).
const SHELL: &str = "/bin/sh";

/// The supervisor script: runs its arguments, then records the status.
/// Builtins only (no `mv`): the record is one short line written by one
/// `printf`, and readers take it as complete only once its newline is there.
const SUPERVISOR: &str = r#"trap '' HUP INT
"$@"
rc=$?
printf '%s\n' "$rc" > "$VMCTL_EXIT_FILE"
"#;

/// How a QEMU process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exited with code {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Starts `program args` under the supervisor, stderr to `qemu.log`.
/// Returns the supervisor's pid; QEMU's own is in the pidfile.
pub fn spawn_supervised(program: &Path, args: &[String], l: &Layout) -> std::io::Result<u32> {
    let mut cmd = Command::new(SHELL);
    cmd.arg("-c")
        .arg(SUPERVISOR)
        .arg("vmctl-qemu-supervisor")
        .arg(program)
        .args(args)
        .env("VMCTL_EXIT_FILE", l.exit_file())
        .current_dir(&l.root);
    spawn_detached(cmd, &l.stderr_log(), "qemu-reaper")
}

/// Starts `cmd` as a process that outlives the agent, as QEMU does: no
/// stdin, stdout and stderr appended to `log`, its own process group (a
/// Ctrl-C meant for the agent must not reach the VMs), and a thread named
/// `{reaper}-{pid}` that reaps it while this agent lives, so it is not
/// left a zombie that looks alive. Returns its pid.
pub fn spawn_detached(mut cmd: Command, log: &Path, reaper: &str) -> std::io::Result<u32> {
    use std::os::unix::process::CommandExt;
    let log = File::options().create(true).append(true).open(log)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()?;
    let pid = child.id();
    std::thread::Builder::new()
        .name(format!("{reaper}-{pid}"))
        .spawn(move || {
            let _ = child.wait();
        })?;
    Ok(pid)
}

/// The recorded exit of the last run, if it ended and the record is
/// complete (ends in a newline).
pub fn read_exit(l: &Layout) -> Option<Exit> {
    let rc: i32 = std::fs::read_to_string(l.exit_file())
        .ok()?
        .strip_suffix('\n')?
        .trim()
        .parse()
        .ok()?;
    Some(if rc > 128 {
        Exit::Signal(rc - 128)
    } else {
        Exit::Code(rc)
    })
}

/// The pid in QEMU's pidfile.
pub fn read_pidfile(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is a live process (not a zombie).
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Whether `pid` is a live QEMU serving this VM's QMP socket: a recycled
/// pid or another VM's QEMU must never be adopted.
pub fn is_our_qemu(pid: u32, l: &Layout) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let qmp = format!(
        "unix:{},",
        l.qmp_sock().display().to_string().replace(',', ",,")
    );
    is_alive(pid)
        && cmdline
            .split(|b| *b == 0)
            .any(|arg| arg.starts_with(qmp.as_bytes()))
}

/// The pid of this VM's running QEMU, if there is one.
pub fn running_pid(l: &Layout) -> Option<u32> {
    read_pidfile(&l.pidfile()).filter(|pid| is_our_qemu(*pid, l))
}

/// Sends `signal` to `pid` (through `kill(2)`, never the `kill` program).
/// A process that is already gone is not an error.
///
/// # Errors
/// The `errno` of `kill(2)` (e.g. `EPERM`) for a process still alive.
pub fn kill(pid: u32, signal: Signal) -> std::io::Result<()> {
    let target = i32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .map(nix::unistd::Pid::from_raw)
        .ok_or_else(|| std::io::Error::other(format!("{pid} is not a process id")))?;
    match nix::sys::signal::kill(target, signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(_) if !is_alive(pid) => Ok(()),
        Err(e) => Err(std::io::Error::from(e)),
    }
}

/// Waits until `pid` is gone; true if it went within `timeout`.
pub async fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !is_alive(pid) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn supervisor_records_exit_code_and_signal() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path());
        spawn_supervised(Path::new("/bin/sh"), &["-c".into(), "exit 7".into()], &l).unwrap();
        for _ in 0..50 {
            if read_exit(&l).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(read_exit(&l), Some(Exit::Code(7)));

        std::fs::remove_file(l.exit_file()).unwrap();
        let script = format!("echo $$ > {}; exec sleep 30", l.pidfile().display());
        spawn_supervised(Path::new("/bin/sh"), &["-c".into(), script], &l).unwrap();
        let mut pid = None;
        for _ in 0..50 {
            pid = read_pidfile(&l.pidfile());
            if pid.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pid = pid.unwrap();
        assert!(is_alive(pid));
        assert!(!is_our_qemu(pid, &l), "not a QEMU with our QMP socket");
        kill(pid, Signal::SIGKILL).unwrap();
        assert!(wait_gone(pid, Duration::from_secs(5)).await);
        for _ in 0..50 {
            if read_exit(&l).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(read_exit(&l), Some(Exit::Signal(9)));
        assert_eq!(Exit::Signal(9).to_string(), "killed by signal 9");
    }
}
