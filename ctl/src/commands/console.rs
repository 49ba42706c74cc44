//! `vmctl console NAME`: the VM's serial console over its socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use vmctl_api::Object;

use super::{Globals, name_arg};

/// Copies the serial socket to stdout and stdin to the socket until the
/// guest closes it or the user types Ctrl-] and Enter.
pub fn run(g: &Globals, name: &str) -> miette::Result<ExitCode> {
    name_arg(name)?;
    let client = g.client()?;
    let o: Object = client.call("GET", &format!("/v1/objects/vm/{name}"), None::<&()>)?;
    let work = o
        .status
        .as_ref()
        .and_then(|s| s["runtime"]["workDir"].as_str())
        .map(PathBuf::from)
        .ok_or_else(|| {
            miette::miette!(
                code = "vmctl::vm::invalid_state",
                help = format!("start it: vmctl start {name}"),
                "VM {name} has not started"
            )
        })?;
    let sock = work.join("serial.sock");
    let mut s = UnixStream::connect(&sock).map_err(|e| {
        miette::miette!(
            code = "vmctl::vm::invalid_state",
            help = "is the VM running? (`vmctl status`)",
            "cannot attach to {}: {e}",
            sock.display()
        )
    })?;
    eprintln!("attached to {name}'s console (Ctrl-] then Enter to detach)");
    let mut reader = s.try_clone().map_err(|e| miette::miette!("{e}"))?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                break;
            }
        }
        eprintln!("\nconsole closed");
        std::process::exit(0);
    });
    let mut line = String::new();
    loop {
        line.clear();
        if std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| miette::miette!("{e}"))?
            == 0
            || line.contains('\u{1d}')
        {
            break;
        }
        if s.write_all(line.as_bytes()).is_err() {
            break;
        }
    }
    eprintln!("detached");
    Ok(ExitCode::SUCCESS)
}
