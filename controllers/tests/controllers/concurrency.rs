//! Concurrent writers and controllers: conflicts are retried, nothing is lost.

use std::sync::Arc;

use vmctl_api::{Kind, ObjectRef, VirtualMachine};
use vmctl_store::Store;

use crate::common::*;

/// Read-modify-write with the expected resourceVersion, retried on conflict.
async fn bump_memory_and_label(store: &Arc<dyn Store>, name: &str, writer: usize) -> u32 {
    let r = ObjectRef::new(Kind::VirtualMachine, name);
    let mut conflicts = 0;
    loop {
        let obj = store.get(&r).await.unwrap().unwrap();
        let mut vm = VirtualMachine::from_object(&obj).unwrap();
        vm.spec.memory_mib += 1;
        vm.metadata
            .labels
            .insert(format!("writer-{writer}"), "yes".into());
        match store
            .apply(vm.to_object(), None, Some(obj.metadata.resource_version))
            .await
        {
            Ok(_) => return conflicts,
            Err(e) if is_conflict(&e) => conflicts += 1,
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_applies_and_reconciles_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), world()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    for v in 0..3 {
        apply(&s, vm(&format!("vm{v}"), "img")).await;
    }
    const WRITERS: usize = 8;
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        for v in 0..3 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                bump_memory_and_label(&s, &format!("vm{v}"), writer).await
            }));
        }
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.unwrap();
    }
    eprintln!("writer conflicts retried: {conflicts}");

    for v in 0..3 {
        let name = format!("vm{v}");
        let (obj, _) = vm_status(&s, &name).await.unwrap();
        let vm = VirtualMachine::from_object(&obj).unwrap();
        assert_eq!(
            vm.spec.memory_mib,
            1024 + WRITERS as u64,
            "no increment lost"
        );
        assert_eq!(vm.metadata.labels.len(), WRITERS, "no label lost");
        assert_eq!(obj.metadata.generation, 1 + WRITERS as u64);
    }
    eventually(
        "every VM Ready at its latest generation",
        WAIT,
        async || {
            for v in 0..3 {
                let (obj, st) = vm_status(&s, &format!("vm{v}")).await.unwrap();
                if !(is_ready(&obj) && st.observed_generation == obj.metadata.generation) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    agent.stop().await;
}
