//! `vmctl console NAME`: the VM's serial console, a byte stream through
//! the agent (`GET /v1/vms/NAME/console`, upgraded).
//!
//! On a terminal, stdin is put in raw mode (every key, Ctrl-C included,
//! goes to the guest) and restored on every way out; Ctrl-] detaches. From
//! a pipe, bytes are copied as they come and end of input detaches.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use rustix::termios::{OptionalActions, Termios, tcgetattr, tcsetattr};

use super::{Globals, name_arg};

/// The detach key: Ctrl-] (GS), as telnet and virsh use.
pub const DETACH: u8 = 0x1d;

/// Why [`pump_input`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detached {
    /// The user typed Ctrl-].
    Key,
    /// Input ended.
    Eof,
    /// The console socket went away.
    Closed,
}

/// Copies `input` to the console `sock` byte for byte until Ctrl-], end
/// of input or a closed socket. Bytes before a Ctrl-] in one read are sent.
pub fn pump_input(mut input: impl Read, mut sock: impl Write) -> Detached {
    let mut buf = [0u8; 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Detached::Eof,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Detached::Eof,
        };
        let (data, key) = match buf[..n].iter().position(|b| *b == DETACH) {
            Some(i) => (&buf[..i], true),
            None => (&buf[..n], false),
        };
        if sock.write_all(data).and_then(|()| sock.flush()).is_err() {
            return Detached::Closed;
        }
        if key {
            return Detached::Key;
        }
    }
}

/// Raw mode on the terminal of stdin while alive; the old mode comes back
/// when dropped.
struct RawMode(Termios);

impl RawMode {
    fn enable() -> std::io::Result<RawMode> {
        let old = tcgetattr(std::io::stdin())?;
        let mut raw = old.clone();
        raw.make_raw();
        tcsetattr(std::io::stdin(), OptionalActions::Now, &raw)?;
        Ok(RawMode(old))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore_terminal(&self.0);
    }
}

fn restore_terminal(mode: &Termios) {
    let _ = tcsetattr(std::io::stdin(), OptionalActions::Now, mode);
}

/// Attaches the terminal to the VM's serial console, through the agent.
pub fn run(g: &Globals, name: &str) -> miette::Result<ExitCode> {
    name_arg(name)?;
    let client = g.client()?;
    let up = client.console(name)?;
    let s = up.stream;
    let tty = std::io::stdin().is_terminal();
    eprint!(
        "attached to {name}'s console ({}){}",
        if tty {
            "Ctrl-] to detach"
        } else {
            "end of input detaches"
        },
        if tty { "\r\n" } else { "\n" }
    );
    let raw = if tty {
        Some(RawMode::enable().map_err(|e| {
            miette::miette!(
                code = "vmctl::io",
                "cannot put the terminal in raw mode: {e}"
            )
        })?)
    } else {
        None
    };
    let saved = raw.as_ref().map(|r| r.0.clone());
    let mut reader = s.try_clone().map_err(|e| miette::miette!("{e}"))?;
    let early = up.early;
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        if !early.is_empty() {
            let _ = out.write_all(&early).and_then(|()| out.flush());
        }
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                break;
            }
        }
        // The guest side went away (QEMU stopped): put the terminal back
        // before leaving, since the main thread is blocked reading stdin.
        if let Some(mode) = saved {
            restore_terminal(&mode);
        }
        eprintln!("\nconsole closed");
        std::process::exit(0);
    });
    let why = pump_input(std::io::stdin().lock(), &s);
    drop(raw);
    match why {
        Detached::Key => eprintln!("\ndetached"),
        Detached::Eof => eprintln!("detached (end of input)"),
        Detached::Closed => eprintln!("\nconsole closed"),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn input_is_copied_until_ctrl_bracket() {
        let mut sent = Vec::new();
        let why = pump_input(&b"ls -l\r\x03more\x1dnot sent"[..], &mut sent);
        assert_eq!(why, Detached::Key);
        assert_eq!(sent, b"ls -l\r\x03more", "Ctrl-C goes to the guest");
    }

    #[test]
    fn end_of_input_detaches_and_a_closed_socket_stops() {
        let mut sent = Vec::new();
        assert_eq!(pump_input(&b"abc"[..], &mut sent), Detached::Eof);
        assert_eq!(sent, b"abc");
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        // Writing to a socket whose peer is gone fails (EPIPE; Rust ignores SIGPIPE).
        assert_eq!(pump_input(&b"x"[..], &a), Detached::Closed);
    }
}
