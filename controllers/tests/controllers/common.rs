//! The test harness: a store, a fake world, and controllers that can be
//! stopped, killed and restarted.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use vmctl_api::{
    Image, Kind, Note, Object, ObjectRef, Provision, ProvisionStatus, VirtualMachine,
    VirtualMachineStatus,
};
use vmctl_controllers::{BackoffPolicy, FakeConfig, FakeWorld, RuntimeConfig, run};
use vmctl_store::{SledStore, Store, StoreError};

/// Quick backoffs so failure tests finish in well under a second.
pub fn config() -> RuntimeConfig {
    RuntimeConfig {
        concurrency: 8,
        backoff: BackoffPolicy {
            base: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        start_backoff: BackoffPolicy {
            base: Duration::from_millis(50),
            max: Duration::from_millis(400),
        },
        resync: None,
        ..RuntimeConfig::default()
    }
}

/// Controllers running on a store.
pub struct Agent {
    pub store: Arc<dyn Store>,
    pub world: FakeWorld,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), vmctl_controllers::RunError>>,
}

impl Agent {
    /// Opens (or reopens) the store in `dir` and starts the controllers.
    pub async fn start(dir: &Path, world: FakeWorld) -> Agent {
        Self::start_with(dir, world, config()).await
    }

    pub async fn start_with(dir: &Path, world: FakeWorld, config: RuntimeConfig) -> Agent {
        let store = open(dir).await;
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(run(store.clone(), world.drivers(), config, shutdown));
        Agent {
            store,
            world,
            stop,
            task,
        }
    }

    /// Stops gracefully: in-flight reconciles finish.
    pub async fn stop(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap().unwrap();
    }

    /// Stops at once, as a killed agent would.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Opens a store, retrying while a killed agent's last blocking calls still hold it.
pub async fn open(dir: &Path) -> Arc<dyn Store> {
    for _ in 0..200 {
        match SledStore::open(dir) {
            Ok(s) => return Arc::new(s),
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
    Arc::new(SledStore::open(dir).expect("store opens"))
}

pub fn world() -> FakeWorld {
    FakeWorld::new(FakeConfig::default())
}

pub fn image(name: &str) -> Object {
    let spec = serde_json::from_value(json!({"path": format!("/images/{name}.qcow2")})).unwrap();
    let spec = vmctl_api::ImageSpec {
        source: spec,
        checksum: None,
    };
    Image::new(name, spec).to_object()
}

pub fn vm(name: &str, image: &str) -> Object {
    vm_with(name, json!({"image": image}))
}

pub fn vm_with(name: &str, spec: serde_json::Value) -> Object {
    VirtualMachine::new(name, serde_json::from_value(spec).unwrap()).to_object()
}

pub fn provision(name: &str, vm: &str, steps: usize) -> Object {
    let steps: Vec<_> = (0..steps)
        .map(|i| json!({"type": "shell", "inline": format!("echo {i}")}))
        .collect();
    let spec = serde_json::from_value(json!({"vm": vm, "steps": steps})).unwrap();
    Provision::new(name, spec).to_object()
}

pub async fn apply(store: &Arc<dyn Store>, obj: Object) -> Object {
    store.apply(obj, None, None).await.unwrap().object.unwrap()
}

pub async fn delete(store: &Arc<dyn Store>, r: ObjectRef) {
    store.request_delete(&r, None).await.unwrap();
}

pub async fn get(store: &Arc<dyn Store>, kind: Kind, name: &str) -> Option<Object> {
    store.get(&ObjectRef::new(kind, name)).await.unwrap()
}

pub async fn vm_status(
    store: &Arc<dyn Store>,
    name: &str,
) -> Option<(Object, VirtualMachineStatus)> {
    let obj = get(store, Kind::VirtualMachine, name).await?;
    let status = VirtualMachine::from_object(&obj)
        .unwrap()
        .status
        .unwrap_or_default();
    Some((obj, status))
}

pub async fn provision_status(
    store: &Arc<dyn Store>,
    name: &str,
) -> Option<(Object, ProvisionStatus)> {
    let obj = get(store, Kind::Provision, name).await?;
    let status = Provision::from_object(&obj)
        .unwrap()
        .status
        .unwrap_or_default();
    Some((obj, status))
}

pub fn is_ready(obj: &Object) -> bool {
    obj.status
        .as_ref()
        .and_then(|s| s.get("conditions"))
        .and_then(|c| c.as_array())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

pub async fn notes(store: &Arc<dyn Store>, kind: Kind, name: &str) -> Vec<Note> {
    let r = ObjectRef::new(kind, name);
    store
        .notes(Some(&r))
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.note)
        .collect()
}

pub async fn reasons(store: &Arc<dyn Store>, kind: Kind, name: &str) -> Vec<String> {
    notes(store, kind, name)
        .await
        .into_iter()
        .map(|n| n.reason)
        .collect()
}

/// Polls `cond` until it holds, panicking with `what` after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond().await {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Applies the VirtualMachine `vm`, then waits (at most [`WAIT`]) until
/// it is Ready.
pub async fn apply_until_ready(store: &Arc<dyn Store>, vm: Object) {
    let name = vm.metadata.name.clone();
    apply(store, vm).await;
    eventually(&format!("vm/{name} Ready"), WAIT, async || {
        get(store, Kind::VirtualMachine, &name)
            .await
            .is_some_and(|o| is_ready(&o))
    })
    .await;
}

/// Every object of `kind` Ready.
pub async fn all_ready(store: &Arc<dyn Store>, kind: Kind) -> bool {
    store
        .list(Some(kind))
        .await
        .unwrap()
        .objects
        .iter()
        .all(is_ready)
}

pub fn is_conflict(e: &StoreError) -> bool {
    matches!(e, StoreError::Conflict { .. })
}

pub const WAIT: Duration = Duration::from_secs(10);
