//! `vmctl tunnel`'s relay (ssh's ProxyCommand) between the agent's
//! upgraded connection and ssh's pipes.

use std::io::{Read, Write};

use vmctl::client::streams::relay;

/// ssh (reading its ProxyCommand's stdout pipe a byte at a time) must
/// get the bytes already in that pipe while the tunnel waits for the
/// guest's next ones: the guest sends them only after ssh answers.
#[test]
fn ssh_through_the_tunnel_does_not_stall_after_the_first_exchange() {
    use std::os::unix::net::UnixStream;
    use std::time::Duration;
    let (guest, tunnel) = UnixStream::pair().unwrap();
    let (mut ssh_reads, stdout) = std::io::pipe().unwrap();
    // As `tunnel` holds its stdout.
    let stdout = std::fs::File::from(std::os::fd::OwnedFd::from(stdout));
    let relayed = std::thread::spawn(move || relay(tunnel, stdout));
    let banner = b"SSH-2.0-guest\r\n";
    (&guest).write_all(banner).unwrap();
    // The relay has copied the banner and waits for the guest again.
    std::thread::sleep(Duration::from_millis(300));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while got.len() < banner.len() && ssh_reads.read_exact(&mut b).is_ok() {
            got.push(b[0]);
        }
        let _ = tx.send(got);
    });
    let got = rx.recv_timeout(Duration::from_secs(5));
    // The guest hangs up: ends the relay (and frees a stuck reader).
    drop(guest);
    assert_eq!(
        got.expect(
            "ssh could not read bytes already in its pipe while the tunnel waited for the guest"
        ),
        banner
    );
    assert_eq!(relayed.join().unwrap().unwrap(), banner.len() as u64);
}
