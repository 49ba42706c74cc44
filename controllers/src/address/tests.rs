//! Parsing the neighbour table and dnsmasq lease files, in their real
//! formats, and looking in lease files.

use std::path::Path;

use tokio::sync::broadcast;

use super::*;

/// `ip -j neigh show dev br-t` (iproute2 6.1) of a bridge holding a
/// resolved, a stale and an unresolved IPv4 neighbour and an IPv6 one.
const NEIGH: &str = r#"[{"dst":"10.9.0.9","lladdr":"52:54:00:11:22:33","state":["STALE"]},{"dst":"10.9.0.8","state":["INCOMPLETE"]},{"dst":"10.9.0.7","lladdr":"52:54:00:aa:bb:cc","state":["REACHABLE"]},{"dst":"fe80::1","lladdr":"52:54:00:aa:bb:cc","state":["PERMANENT"]}]"#;

#[test]
fn the_neighbour_table_gives_the_ipv4_address_of_a_mac_in_any_case() {
    let t = parse_neighbours(NEIGH).unwrap();
    assert_eq!(t.len(), 4);
    assert_eq!(t[1].lladdr, None);
    assert_eq!(
        neighbour_address(&t, "52:54:00:AA:BB:CC"),
        Some(Ipv4Addr::new(10, 9, 0, 7)),
        "the IPv6 entry of the same MAC is not taken"
    );
    assert_eq!(
        neighbour_address(&t, "52:54:00:11:22:33"),
        Some(Ipv4Addr::new(10, 9, 0, 9)),
        "a STALE entry still names the guest"
    );
    assert_eq!(neighbour_address(&t, "52:54:00:00:00:01"), None);
}

#[test]
fn a_failed_neighbour_entry_and_an_empty_table_give_nothing() {
    let failed = r#"[{"dst":"10.9.0.7","lladdr":"52:54:00:aa:bb:cc","state":["FAILED"]}]"#;
    let t = parse_neighbours(failed).unwrap();
    assert_eq!(neighbour_address(&t, "52:54:00:aa:bb:cc"), None);
    // An empty bridge prints `[]`; some iproute2 versions print nothing.
    assert!(parse_neighbours("[]\n").unwrap().is_empty());
    assert!(parse_neighbours("").unwrap().is_empty());
    assert!(parse_neighbours("Cannot find device").is_err());
}

/// A dnsmasq 2.90 lease file: IPv4 leases (the first line as dnsmasq
/// wrote it for the tiny guest's busybox udhcpc in the tap e2e test: no
/// host name, a client id), an infinite one, then the DHCPv6 part (the
/// server's DUID, a lease whose second field is an IAID).
const LEASES: &str = "\
1796142579 52:54:00:58:9a:42 10.77.0.141 * 01:52:54:00:58:9a:42
1764650000 52:54:00:aa:bb:cc 10.9.0.150 tiny 01:52:54:00:aa:bb:cc
1764650100 52:54:00:11:22:33 10.9.0.151 * *
0 52:54:00:44:55:66 10.9.0.152 forever *
duid 00:01:00:01:2e:d1:c3:10:52:54:00:12:34:56
1764650200 1234567 fd00::15 tiny6 00:01:00:01:2e:d1:c3:10:52:54:00:aa:bb:cc
";

#[test]
fn dnsmasq_leases_are_read_and_the_dhcpv6_part_is_skipped() {
    let l = parse_leases(LEASES);
    assert_eq!(l.len(), 4, "{l:?}");
    assert_eq!(l[0].expiry, 1_796_142_579);
    assert_eq!(l[0].mac, "52:54:00:58:9a:42");
    assert_eq!(l[0].address, Ipv4Addr::new(10, 77, 0, 141));
    assert_eq!(l[0].hostname, None, "`*` is no host name");
    assert_eq!(l[1].address, Ipv4Addr::new(10, 9, 0, 150));
    assert_eq!(l[1].hostname.as_deref(), Some("tiny"));
    assert_eq!(l[3].expiry, 0);
    let now = 1_764_640_000;
    assert_eq!(
        lease_address(&l, "52:54:00:58:9a:42", now),
        Some(Ipv4Addr::new(10, 77, 0, 141))
    );
    assert_eq!(
        lease_address(&l, "52:54:00:AA:BB:CC", now),
        Some(Ipv4Addr::new(10, 9, 0, 150))
    );
    assert_eq!(
        lease_address(&l, "52:54:00:44:55:66", u64::MAX - 1),
        Some(Ipv4Addr::new(10, 9, 0, 152)),
        "expiry 0 never expires"
    );
    assert_eq!(lease_address(&l, "52:54:00:12:34:56", now), None);
}

#[test]
fn an_expired_lease_is_not_taken_and_the_latest_lease_of_a_mac_wins() {
    let text = "\
1000 52:54:00:aa:bb:cc 10.9.0.100 old *
3000 52:54:00:aa:bb:cc 10.9.0.120 new *
2000 52:54:00:aa:bb:cc 10.9.0.110 mid *
";
    let l = parse_leases(text);
    assert_eq!(
        lease_address(&l, "52:54:00:aa:bb:cc", 1500),
        Some(Ipv4Addr::new(10, 9, 0, 120))
    );
    assert_eq!(lease_address(&l, "52:54:00:aa:bb:cc", 3000), None);
}

#[test]
fn malformed_lease_lines_are_skipped() {
    let text = "garbage\n\n12 52:54:00:aa:bb:cc not-an-ip x *\nx 52:54:00:aa:bb:cc 10.0.0.1 x *\n";
    assert!(parse_leases(text).is_empty());
}

#[test]
fn configured_lease_files_are_read_before_the_defaults_and_network_managers() {
    let files = lease_files(&[PathBuf::from("/run/br0.leases")], "br0");
    assert_eq!(files[0], Path::new("/run/br0.leases"));
    assert_eq!(files[1], Path::new("/var/lib/misc/dnsmasq.leases"));
    assert_eq!(
        files.last().unwrap(),
        Path::new("/var/lib/NetworkManager/dnsmasq-br0.leases")
    );
}

#[tokio::test]
async fn a_look_on_a_missing_bridge_finds_the_lease_and_says_what_it_read() {
    let dir = tempfile::tempdir().unwrap();
    let leases = dir.path().join("dnsmasq.leases");
    std::fs::write(&leases, LEASES.replace("1764650000 ", "0 ")).unwrap();
    let w = Wanted {
        mac: "52:54:00:aa:bb:cc".into(),
        bridge: "vmctl-no-such-br".into(),
        timeout: Duration::from_secs(1),
    };
    let sources = Sources {
        lease_files: vec![leases.clone()],
    };
    let (ip, source) = look(&w, &sources).await.unwrap();
    assert_eq!(ip, Ipv4Addr::new(10, 9, 0, 150));
    assert_eq!(source, Source::Lease(leases.clone()));

    let other = Wanted {
        mac: "52:54:00:00:00:01".into(),
        ..w
    };
    let why = look(&other, &sources).await.unwrap_err();
    assert!(why.contains("vmctl-no-such-br"), "{why}");
    assert!(why.contains(&leases.display().to_string()), "{why}");
}

/// Waits for the next change `d` reports for VM `name` and returns how
/// its search stands then.
async fn next(
    d: &Discoverer,
    rx: &mut broadcast::Receiver<String>,
    name: &str,
    w: &Wanted,
) -> Discovery {
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a change within 10 s")
        .unwrap();
    assert_eq!(got, name);
    d.watch(name, w.clone(), None)
}

/// No DHCP at first: the search times out with the manual's hints and
/// goes on; a lease written late is found.
#[tokio::test]
async fn the_search_times_out_with_the_hints_and_a_late_lease_is_still_found() {
    let dir = tempfile::tempdir().unwrap();
    let leases = dir.path().join("late.leases");
    let d = Discoverer::new(Sources {
        lease_files: vec![leases.clone()],
    });
    let mut rx = d.changes();
    let w = Wanted {
        mac: "52:54:00:58:9a:42".into(),
        bridge: "vmctl-no-such-br".into(),
        timeout: Duration::ZERO,
    };
    assert!(matches!(
        d.watch("tapvm", w.clone(), None),
        Discovery::Searching { .. }
    ));
    let Discovery::TimedOut { message } = next(&d, &mut rx, "tapvm", &w).await else {
        panic!("timed out")
    };
    for says in [
        "IP discovery timeout",
        "52:54:00:58:9a:42",
        "ip neigh show dev vmctl-no-such-br",
        "DHCP lease",
        "vmctl log tapvm --console",
        "still looking",
    ] {
        assert!(message.contains(says), "{says:?}: {message}");
    }
    std::fs::write(&leases, LEASES.replace("1796142579 ", "0 ")).unwrap();
    let found = next(&d, &mut rx, "tapvm", &w).await;
    let Discovery::Found {
        address,
        source,
        since,
    } = found
    else {
        panic!("found: {found:?}")
    };
    assert_eq!(address, Ipv4Addr::new(10, 77, 0, 141));
    assert_eq!(source, Source::Lease(leases));
    assert!(since.is_some());
    d.forget("tapvm");
}

/// An agent restarted while the VM ran starts from the address in the
/// status (no flap to not Ready), then says where it is found.
#[tokio::test]
async fn a_known_address_stands_from_the_start_and_learns_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let leases = dir.path().join("dnsmasq.leases");
    std::fs::write(&leases, LEASES.replace("1796142579 ", "0 ")).unwrap();
    let d = Discoverer::new(Sources {
        lease_files: vec![leases.clone()],
    });
    let mut rx = d.changes();
    let w = Wanted {
        mac: "52:54:00:58:9a:42".into(),
        bridge: "vmctl-no-such-br".into(),
        timeout: Duration::from_secs(60),
    };
    let ip = Ipv4Addr::new(10, 77, 0, 141);
    let first = d.watch("tapvm", w.clone(), Some(ip));
    assert_eq!(first.address(), Some(ip));
    let then = next(&d, &mut rx, "tapvm", &w).await;
    assert_eq!(
        then,
        Discovery::Found {
            address: ip,
            source: Source::Lease(leases),
            since: None
        }
    );
}
