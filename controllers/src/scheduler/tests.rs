use super::*;

fn node(labels: &[(&str, &str)], ready: bool, vcpus: u64, memory_mib: u64) -> NodeInfo {
    NodeInfo {
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ready,
        vcpus,
        memory_mib,
        fresh_until: None,
    }
}

fn now() -> chrono::DateTime<Utc> {
    Utc::now()
}

fn req(vcpus: u64, memory_mib: u64) -> Request {
    Request {
        vcpus,
        memory_mib,
        ..Request::default()
    }
}

#[test]
fn the_least_allocated_node_that_fits_is_chosen_and_ties_go_by_vms_then_name() {
    let nodes: BTreeMap<String, NodeInfo> = [
        ("a".to_owned(), node(&[], true, 8, 8192)),
        ("b".to_owned(), node(&[], true, 8, 8192)),
    ]
    .into();
    let mut used = HashMap::new();
    assert_eq!(
        choose(&req(1, 512), &nodes, &used, now()),
        Decision::Bind("a".into())
    );
    used.insert(
        "a".to_owned(),
        Usage {
            vcpus: 1,
            memory_mib: 512,
            vms: 1,
        },
    );
    assert_eq!(
        choose(&req(1, 512), &nodes, &used, now()),
        Decision::Bind("b".into())
    );
}

#[test]
fn spread_stays_even_over_many_unconstrained_vms() {
    let nodes: BTreeMap<String, NodeInfo> = (0..3)
        .map(|i| (format!("n{i}"), node(&[], true, 1000, 1 << 20)))
        .collect();
    let mut used: HashMap<String, Usage> = HashMap::new();
    for _ in 0..999 {
        let r = req(1, 64);
        let Decision::Bind(n) = choose(&r, &nodes, &used, now()) else {
            panic!("unschedulable")
        };
        used.entry(n).or_default().add(&r);
    }
    for n in nodes.keys() {
        assert_eq!(used[n].vms, 333, "{used:?}");
    }
}

#[test]
fn an_unschedulable_vm_is_told_why_per_node() {
    let nodes: BTreeMap<String, NodeInfo> = [
        ("a".to_owned(), node(&[("zone", "a")], true, 8, 1024)),
        ("b".to_owned(), node(&[("zone", "a")], true, 8, 1024)),
        ("c".to_owned(), node(&[("zone", "b")], true, 8, 1 << 20)),
        ("d".to_owned(), node(&[("zone", "a")], false, 8, 1 << 20)),
    ]
    .into();
    let mut r = req(1, 4096);
    r.selector.insert("zone".into(), "a".into());
    assert_eq!(
        choose(&r, &nodes, &HashMap::new(), now()),
        Decision::Unschedulable(
            "0/4 nodes available: 2 insufficient memory, 1 did not match the node selector, 1 not Ready"
                .into()
        )
    );
    // vCPUs are counted with what is bound already.
    let used: HashMap<String, Usage> = [(
        "c".to_owned(),
        Usage {
            vcpus: 8,
            memory_mib: 0,
            vms: 8,
        },
    )]
    .into();
    assert_eq!(
        choose(
            &req(1, 64),
            &[("c".to_owned(), nodes["c"].clone())].into(),
            &used,
            now()
        ),
        Decision::Unschedulable("0/1 nodes available: 1 insufficient vCPUs".into())
    );
    assert_eq!(
        choose(&req(1, 64), &BTreeMap::new(), &HashMap::new(), now()),
        Decision::Unschedulable(
            "0/0 nodes available: no node is registered (start an agent on etcd)".into()
        )
    );
}

#[test]
fn a_pinned_vm_goes_to_its_node_only() {
    let nodes: BTreeMap<String, NodeInfo> = [
        ("a".to_owned(), node(&[], true, 8, 8192)),
        ("b".to_owned(), node(&[], true, 8, 8192)),
    ]
    .into();
    let mut r = req(1, 512);
    r.pin = Some("b".into());
    assert_eq!(
        choose(&r, &nodes, &HashMap::new(), now()),
        Decision::Bind("b".into())
    );
    // Pinned to a node that is there but not Ready: said per node.
    let mut down = nodes.clone();
    down.get_mut("b").unwrap().ready = false;
    r.pin = Some("b".into());
    assert_eq!(
        choose(&r, &down, &HashMap::new(), now()),
        Decision::Unschedulable(
            "0/2 nodes available: 1 not Ready, 1 not the VM's node (spec.nodeName)".into()
        )
    );
    r.pin = Some("z".into());
    assert_eq!(
        choose(&r, &nodes, &HashMap::new(), now()),
        Decision::Unschedulable(
            "0/2 nodes available: no node is named z (spec.nodeName); `vmctl get nodes` lists them"
                .into()
        )
    );
}

#[test]
fn a_binding_names_the_node_and_leaves_observed_generation_at_zero() {
    let s = bound_status(&Value::Null, "b", 0);
    assert_eq!(s["nodeName"], "b");
    assert_eq!(s["observedGeneration"], 0);
    assert!(!marked_unschedulable(&s));
    let u = unschedulable_status(&Value::Null, "0/1 nodes available: 1 not Ready").unwrap();
    assert!(marked_unschedulable(&u));
    assert!(unschedulable_status(&u, "0/1 nodes available: 1 not Ready").is_none());
}

#[test]
fn a_node_whose_heartbeat_is_overdue_is_not_chosen_though_still_marked_ready() {
    let mut late = node(&[], true, 8, 8192);
    late.fresh_until = Some(now() - chrono::Duration::seconds(1));
    let mut fresh = node(&[], true, 8, 8192);
    fresh.fresh_until = Some(now() + chrono::Duration::seconds(10));
    let nodes: BTreeMap<String, NodeInfo> =
        [("a".to_owned(), late), ("b".to_owned(), fresh)].into();
    assert_eq!(
        choose(&req(1, 64), &nodes, &HashMap::new(), now()),
        Decision::Bind("b".into())
    );
}
