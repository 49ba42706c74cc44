//! The agent's settings: flags, variables, the config file, and their checks.

use super::*;

/// Issue 18 item 8: `--data-dir .vmctl` reached QEMU as a relative
/// pidfile path, resolved in the VM's work dir ("cannot create PID
/// file"), and the VM crash-looped.
#[test]
fn relative_data_dir_is_made_absolute_once() {
    let cfg = AgentConfig::new(PathBuf::from(".vmctl"));
    assert!(cfg.data_dir.is_absolute(), "{}", cfg.data_dir.display());
    assert_eq!(
        cfg.data_dir,
        std::env::current_dir().unwrap().join(".vmctl")
    );
    assert!(cfg.socket.is_absolute());
    assert!(cfg.db_dir().is_absolute());
    assert_eq!(absolute(Path::new("/a/b")).unwrap(), Path::new("/a/b"));
}

/// `--node-name` names the node recorded in the VMs' status (default
/// the host name); an empty one or one with spaces is refused.
#[test]
fn node_name_defaults_to_the_host_name_and_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let named = |n: Option<&str>| {
        AgentConfig::resolve(
            data.clone(),
            AgentOverrides {
                node_name: n.map(str::to_owned),
                ..Default::default()
            },
        )
    };
    let default = named(None).unwrap().node_name;
    assert_eq!(default, default_node_name());
    vmctl_api::node::check_node_name(&default).unwrap();
    let host = vmctl_controllers::host_name().to_ascii_lowercase();
    if vmctl_api::node::check_node_name(&host).is_ok() {
        assert_eq!(default, host);
    }
    assert_eq!(named(Some("host-b")).unwrap().node_name, "host-b");
    for bad in ["", "host b"] {
        let err = named(Some(bad)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--node-name / VMCTL_NODE_NAME: node name"),
            "{err}"
        );
    }
}

/// Issue 17 item 1: `--node-labels zone=a,rack=1` (or
/// `VMCTL_NODE_LABELS`, or `node-labels` in agent.toml) labels the
/// agent's Node; a bad label, a key given twice, or a bad
/// `--node-lease-ttl` is refused naming the flag (or the file's line),
/// and the TTL is refused on sled, which would ignore it.
#[test]
fn node_labels_and_lease_ttl_are_parsed_and_bad_ones_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let etcd = |labels: &[&str], ttl: Option<u64>| AgentOverrides {
        store: Some(StoreKind::Etcd),
        etcd_endpoints: Some(vec!["http://127.0.0.1:2379".into()]),
        node_labels: Some(labels.iter().map(|l| l.to_string()).collect()),
        node_lease_ttl: ttl,
        ..Default::default()
    };
    let cfg =
        AgentConfig::resolve(data.clone(), etcd(&["zone=a", " rack=1", ""], Some(4))).unwrap();
    assert_eq!(
        cfg.node_labels,
        BTreeMap::from([
            ("rack".to_owned(), "1".to_owned()),
            ("zone".to_owned(), "a".to_owned())
        ])
    );
    assert_eq!(cfg.node_lease_ttl, Duration::from_secs(4));
    let cfg = AgentConfig::resolve(data.clone(), AgentOverrides::default()).unwrap();
    assert!(cfg.node_labels.is_empty());
    assert_eq!(cfg.node_lease_ttl, Duration::from_secs(10));

    for (given, flag, says) in [
        (etcd(&["zone"], None), "--node-labels", "has no `=`"),
        (etcd(&["zone=a b"], None), "--node-labels", "label value"),
        (etcd(&["-zone=a"], None), "--node-labels", "label key"),
        (
            etcd(&["zone=a", "zone=b"], None),
            "--node-labels",
            "given twice",
        ),
        (etcd(&[], Some(1)), "--node-lease-ttl", "out of range"),
        (etcd(&[], Some(7200)), "--node-lease-ttl", "out of range"),
        (
            AgentOverrides {
                node_lease_ttl: Some(5),
                ..Default::default()
            },
            "--node-lease-ttl",
            "the store is sled",
        ),
        (
            AgentOverrides {
                fence: Some(true),
                ..Default::default()
            },
            "--fence",
            "the store is sled",
        ),
    ] {
        let err = AgentConfig::resolve(data.clone(), given).unwrap_err();
        assert!(matches!(err, ConfigError::Flag { .. }), "{err}");
        let shown = err.to_string();
        assert!(shown.starts_with(flag), "{shown}");
        assert!(shown.contains(says), "{shown}");
    }

    // Fencing: off unless asked, by flag or file (store etcd).
    assert!(!cfg.fence);
    let mut given = etcd(&[], None);
    given.fence = Some(true);
    assert!(AgentConfig::resolve(data.clone(), given).unwrap().fence);

    let (_d, data) = with_file("node-labels = [\"zone=b\"]\nnode-lease-ttl = 3\nfence = true\n");
    let cfg = AgentConfig::resolve(data.clone(), AgentOverrides::default()).unwrap();
    assert!(cfg.fence);
    assert_eq!(cfg.node_labels.get("zone").map(String::as_str), Some("b"));
    assert_eq!(cfg.node_lease_ttl, Duration::from_secs(3));
    // The flag wins over the file.
    let given = AgentOverrides {
        node_labels: Some(vec!["zone=c".into()]),
        ..Default::default()
    };
    let cfg = AgentConfig::resolve(data, given).unwrap();
    assert_eq!(cfg.node_labels.get("zone").map(String::as_str), Some("c"));
    for (text, line, column, says) in [
        (
            "node-labels = [\"zone=a\", \"rack\"]\n",
            1,
            26,
            "has no `=`",
        ),
        ("node-lease-ttl = 1\n", 1, 18, "out of range"),
    ] {
        let (_d, data) = with_file(text);
        let err = AgentConfig::resolve(data, AgentOverrides::default()).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { line: l, column: c, message, .. }
                if (*l, *c) == (line, column) && message.contains(says)),
            "{text:?}: {err:?}"
        );
    }
}

/// A data directory holding `agent.toml` with `text`.
fn with_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(CONFIG_FILE), text).unwrap();
    let data = dir.path().to_path_buf();
    (dir, data)
}

/// The fault (new-user tryout): `--etcd-endpoints ftp://…`, an endpoint
/// without a scheme and `--etcd-prefix vmctl/` were accepted from flags
/// although the config file refuses them, and `--etcd-endpoints`
/// without `--store etcd` was silently ignored (sled was used).
#[test]
fn etcd_flags_are_checked_like_the_file_and_never_silently_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let etcd = |eps: &[&str], prefix: Option<&str>| AgentOverrides {
        store: Some(StoreKind::Etcd),
        etcd_endpoints: Some(eps.iter().map(|e| e.to_string()).collect()),
        etcd_prefix: prefix.map(str::to_owned),
        ..Default::default()
    };
    for (given, says) in [
        (etcd(&["ftp://127.0.0.1:2379"], None), "not http or https"),
        (etcd(&["127.0.0.1:2379"], None), "no scheme"),
        (
            etcd(&["http://127.0.0.1:2379"], Some("vmctl/")),
            "must start and end",
        ),
        (
            etcd(&["http://127.0.0.1:2379"], Some("/vmctl")),
            "must start and end",
        ),
        (
            etcd(&["http://127.0.0.1:2379"], Some("/a@b/")),
            "must not contain `@`",
        ),
    ] {
        let err = AgentConfig::resolve(data.clone(), given).unwrap_err();
        assert!(matches!(err, ConfigError::Flag { .. }), "{err}");
        assert!(err.to_string().contains(says), "{err}");
    }
    let sled = AgentOverrides {
        etcd_endpoints: Some(vec!["http://127.0.0.1:2379".into()]),
        ..Default::default()
    };
    let err = AgentConfig::resolve(data.clone(), sled).unwrap_err();
    assert!(err.to_string().contains("the store is sled"), "{err}");
    assert!(err.help().contains("--store etcd"), "{err}");
    // Valid flags still work, and the file may select etcd for them.
    let cfg = AgentConfig::resolve(data.clone(), etcd(&["https://e:2379"], Some("/a/"))).unwrap();
    assert_eq!(
        cfg.store,
        StoreConfig::Etcd {
            endpoints: vec!["https://e:2379".into()],
            prefix: "/a/".into()
        }
    );
    std::fs::write(data.join(CONFIG_FILE), "store = \"etcd\"\n").unwrap();
    let given = AgentOverrides {
        etcd_endpoints: Some(vec!["http://e:2379".into()]),
        ..Default::default()
    };
    AgentConfig::resolve(data, given).unwrap();
}

/// Issue 14 item 4: the Propolis driver's settings were read from
/// `VMCTL_PROPOLIS_*` only. `[propolis]` in the config file gives them
/// too; a flag or variable wins per key; a bad value is located in the
/// file and the agent does not start.
#[test]
fn propolis_settings_come_from_the_config_file_and_flags_win_per_key() {
    let (_d, data) = with_file(
        "driver = \"propolis\"\n\n[propolis]\nhost = \"simulated\"\n\
         addr = \"127.0.0.1:13000\"\npool = \"tank/vmctl\"\nstart-timeout = 30\n",
    );
    let cfg = AgentConfig::resolve(data.clone(), AgentOverrides::default()).unwrap();
    assert_eq!(cfg.driver, "propolis");
    assert_eq!(
        cfg.propolis.lookup("VMCTL_PROPOLIS_HOST").as_deref(),
        Some("simulated")
    );
    assert_eq!(
        cfg.propolis.lookup("VMCTL_PROPOLIS_POOL").as_deref(),
        Some("tank/vmctl")
    );
    assert_eq!(
        cfg.propolis
            .lookup("VMCTL_PROPOLIS_START_TIMEOUT")
            .as_deref(),
        Some("30")
    );
    assert_eq!(cfg.propolis.lookup("VMCTL_PROPOLIS_BRAND"), None);
    let given = AgentOverrides {
        propolis: PropolisSettings {
            addr: Some("127.0.0.1:14000".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let cfg = AgentConfig::resolve(data, given).unwrap();
    assert_eq!(cfg.propolis.addr.as_deref(), Some("127.0.0.1:14000"));
    assert_eq!(cfg.propolis.pool.as_deref(), Some("tank/vmctl"));

    for (text, line, column, says) in [
        ("[propolis]\naddr = \"localhost\"\n", 2, 8, "IP:PORT"),
        (
            "[propolis]\n\npool = \"rpool; rm -rf /\"\n",
            3,
            8,
            "ZFS pool",
        ),
        ("[propolis]\nhost = \"remote\"\n", 2, 8, "\"simulated\""),
        (
            "[propolis]\nstart-timeout = \"soon\"\n",
            2,
            17,
            "expected u64",
        ),
        (
            "[propolis]\nzone_root = \"/zones\"\n",
            2,
            1,
            "unknown field",
        ),
    ] {
        let (_d, data) = with_file(text);
        let err = AgentConfig::resolve(data.clone(), AgentOverrides::default()).unwrap_err();
        let ConfigError::Invalid {
            line: l,
            column: c,
            message,
            ..
        } = &err
        else {
            panic!("{err}");
        };
        assert_eq!((*l, *c), (line, column), "{text:?}: {err}");
        assert!(message.contains(says), "{text:?}: {err}");
        assert!(err.to_string().contains("agent.toml"), "{err}");
    }
}

/// Issue 12 item 4: the store is selected by flag, environment *and*
/// the agent's config file; the file alone could not select it.
#[test]
fn config_file_selects_etcd_and_flags_or_env_win_over_it() {
    let (_d, data) = with_file(
        "driver = \"fake\"\nstore = \"etcd\"\n\n[etcd]\n\
         endpoints = [\"http://10.0.0.1:2379\", \"https://10.0.0.2:2379\"]\n\
         prefix = \"/site-a/\"\n",
    );
    let cfg = AgentConfig::resolve(data.clone(), AgentOverrides::default()).unwrap();
    assert_eq!(cfg.driver, "fake");
    assert_eq!(
        cfg.store,
        StoreConfig::Etcd {
            endpoints: vec![
                "http://10.0.0.1:2379".into(),
                "https://10.0.0.2:2379".into()
            ],
            prefix: "/site-a/".into(),
        }
    );
    // Each flag/variable wins over its own key only.
    let given = AgentOverrides {
        etcd_endpoints: Some(vec![" http://127.0.0.1:2379 ".into(), String::new()]),
        ..Default::default()
    };
    let cfg = AgentConfig::resolve(data.clone(), given).unwrap();
    assert_eq!(
        cfg.store,
        StoreConfig::Etcd {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/site-a/".into(),
        }
    );
    let given = AgentOverrides {
        driver: Some("qemu".into()),
        store: Some(StoreKind::Sled),
        ..Default::default()
    };
    let cfg = AgentConfig::resolve(data, given).unwrap();
    assert_eq!(
        (cfg.driver.as_str(), &cfg.store),
        ("qemu", &StoreConfig::Sled)
    );
}

#[test]
fn no_config_file_means_every_default() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig::resolve(dir.path().into(), AgentOverrides::default()).unwrap();
    assert_eq!(
        (cfg.driver.as_str(), &cfg.store),
        ("qemu", &StoreConfig::Sled)
    );
    let given = AgentOverrides {
        store: Some(StoreKind::Etcd),
        etcd_endpoints: Some(vec!["http://h:2379".into()]),
        ..Default::default()
    };
    let cfg = AgentConfig::resolve(dir.path().into(), given).unwrap();
    assert_eq!(
        cfg.store,
        StoreConfig::Etcd {
            endpoints: vec!["http://h:2379".into()],
            prefix: "/vmctl/".into()
        }
    );
}

/// Unknown keys and bad values in `agent.toml` are refused with the
/// file, line and column, never ignored or half-applied.
#[test]
fn config_file_unknown_keys_and_bad_values_are_located_errors_naming_the_file() {
    for (text, line, column, says) in [
        (
            "store = \"etcd\"\nstor = \"sled\"\n",
            2,
            1,
            "unknown field `stor`",
        ),
        (
            "[etcd]\nendpoint = [\"http://h:2379\"]\n",
            2,
            1,
            "unknown field `endpoint`",
        ),
        ("store = \"etc\"\n", 1, 9, "unknown variant `etc`"),
        ("driver = \"kvm\"\n", 1, 10, "unknown driver `kvm`"),
        (
            "[etcd]\nendpoints = \"http://h:2379\"\n",
            2,
            13,
            "invalid type: string",
        ),
        ("[etcd]\nendpoints = []\n", 2, 13, "endpoints are empty"),
        (
            "[etcd]\nendpoints = [\"http://a:2379\", \"10.0.0.1:2379\"]\n",
            2,
            31,
            "`10.0.0.1:2379` has no scheme",
        ),
        (
            "[etcd]\nendpoints = [\"ftp://a\"]\n",
            2,
            14,
            "is not http or https",
        ),
        (
            "[etcd]\nprefix = \"vmctl\"\n",
            2,
            10,
            "must start and end with `/`",
        ),
        (
            "[etcd]\nprefix = \"/a@b/\"\n",
            2,
            10,
            "must not contain `@`",
        ),
        ("store = etcd\n", 1, 9, ""),
    ] {
        let (_d, data) = with_file(text);
        let err = AgentConfig::resolve(data.clone(), AgentOverrides::default()).unwrap_err();
        let ConfigError::Invalid {
            path,
            line: l,
            column: c,
            message,
        } = &err
        else {
            panic!("{text:?}: {err:?}");
        };
        assert_eq!(path, &data.join("agent.toml"), "{text:?}");
        assert_eq!((*l, *c), (line, column), "{text:?}: {message}");
        assert!(message.contains(says), "{text:?}: {message}");
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("{}:{line}:{column}: ", path.display())),
            "{shown}"
        );
        assert!(err.help().contains("agent.toml"), "{}", err.help());
    }
}

#[test]
fn etcd_selected_without_endpoints_names_where_it_was_selected() {
    let (_d, data) = with_file("store = \"etcd\"\n");
    let err = AgentConfig::resolve(data.clone(), AgentOverrides::default()).unwrap_err();
    assert!(matches!(err, ConfigError::NoEndpoints { .. }), "{err:?}");
    assert!(err.to_string().contains("agent.toml"), "{err}");
    assert!(
        err.help().contains("VMCTL_ETCD_ENDPOINTS"),
        "{}",
        err.help()
    );
    let dir = tempfile::tempdir().unwrap();
    let given = AgentOverrides {
        store: Some(StoreKind::Etcd),
        ..Default::default()
    };
    let err = AgentConfig::resolve(dir.path().into(), given).unwrap_err();
    assert!(err.to_string().contains("--store"), "{err}");
}

#[test]
fn unreadable_config_file_is_an_error_not_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the file should be: reading it fails for root too.
    std::fs::create_dir(dir.path().join(CONFIG_FILE)).unwrap();
    let err = AgentConfig::resolve(dir.path().into(), AgentOverrides::default()).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("agent.toml"), "{err}");
}

#[test]
fn dnsmasq_lease_files_come_from_the_flag_else_the_file_and_must_be_absolute() {
    let (_d, data) = with_file("dnsmasq-leases = [\"/run/br0.leases\", \"/run/br1.leases\"]\n");
    let cfg = AgentConfig::resolve(data.clone(), AgentOverrides::default()).unwrap();
    assert_eq!(
        cfg.dnsmasq_leases,
        [
            PathBuf::from("/run/br0.leases"),
            PathBuf::from("/run/br1.leases")
        ]
    );
    let given = AgentOverrides {
        dnsmasq_leases: Some(vec![PathBuf::from("/tmp/x.leases")]),
        ..Default::default()
    };
    let cfg = AgentConfig::resolve(data, given).unwrap();
    assert_eq!(cfg.dnsmasq_leases, [PathBuf::from("/tmp/x.leases")]);

    let (_d, data) = with_file("driver = \"qemu\"\ndnsmasq-leases = [\"leases\"]\n");
    let err = AgentConfig::resolve(data.clone(), AgentOverrides::default()).unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::Invalid {
                line: 2,
                column: 19,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("not an absolute path"), "{err}");
    let relative = AgentOverrides {
        dnsmasq_leases: Some(vec![PathBuf::from("x.leases")]),
        ..Default::default()
    };
    let (_d, data) = with_file("");
    let err = AgentConfig::resolve(data, relative).unwrap_err();
    assert!(err.to_string().contains("--dnsmasq-leases"), "{err}");
    assert!(err.help().contains("absolute"), "{err}");
}

/// Issue 17 item 4: the TLS listener needs both an address and a TLS
/// directory, from flags or the file; never TCP without TLS, and never
/// a directory that would be ignored.
#[test]
fn listen_needs_a_tls_dir_and_a_tls_dir_needs_listen() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let given = |listen: Option<&str>, tls: Option<&str>| {
        AgentConfig::resolve(
            data.clone(),
            AgentOverrides {
                listen: listen.map(str::to_owned),
                tls_dir: tls.map(PathBuf::from),
                ..Default::default()
            },
        )
    };
    assert_eq!(given(None, None).unwrap().door, None);
    let door = given(Some("127.0.0.2:7443"), Some("/etc/vmctl/tls"))
        .unwrap()
        .door
        .unwrap();
    assert_eq!(door.listen.to_string(), "127.0.0.2:7443");
    assert_eq!(door.tls_dir, Path::new("/etc/vmctl/tls"));
    let err = given(Some("127.0.0.2:7443"), None).unwrap_err();
    assert!(err.to_string().contains("without --tls-dir"), "{err}");
    let err = given(None, Some("/etc/vmctl/tls")).unwrap_err();
    assert!(err.to_string().contains("without --listen"), "{err}");
    let err = given(Some("host-a:7443"), Some("/t")).unwrap_err();
    assert!(err.to_string().contains("is not IP:PORT"), "{err}");

    std::fs::write(
        data.join(CONFIG_FILE),
        "listen = \"127.0.0.3:7443\"\ntls-dir = \"/srv/tls\"\n",
    )
    .unwrap();
    let door = given(None, None).unwrap().door.unwrap();
    assert_eq!(door.listen.to_string(), "127.0.0.3:7443");
    assert_eq!(door.tls_dir, Path::new("/srv/tls"));
    std::fs::write(data.join(CONFIG_FILE), "tls-dir = \"relative\"\n").unwrap();
    let err = given(None, None).unwrap_err();
    assert!(err.to_string().contains("not an absolute path"), "{err}");
}
