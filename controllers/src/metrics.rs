//! The agent's metrics, in the Prometheus exposition format (served by the
//! agent as `GET /metrics`; issue 17 item 8).
//!
//! One process-wide set, like the default registry of Prometheus' own
//! client libraries: the controllers' workers, the store wrapper
//! ([`MeteredStore`]) and the agent's scrape handler write to it without
//! passing a handle through every constructor. We use the maintained
//! `prometheus-client` crate for the types and the text encoding
//! (OpenMetrics 1.0, which Prometheus scrapes).
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `vmctl_vms` | gauge | `phase`, `node` (set at each scrape from the agent's cache) |
//! | `vmctl_reconciles_total` | counter | `controller`, `result` (`ok`, `error`, `conflict`, `panic`) |
//! | `vmctl_reconcile_duration_seconds` | histogram | `controller` |
//! | `vmctl_workqueue_depth` | gauge | `controller` (objects due and waiting for a worker, set after each reconcile) |
//! | `vmctl_store_request_duration_seconds` | histogram | `operation` (`apply`, `update_status`, …) |
//! | `vmctl_store_errors_total` | counter | `operation`, `error` (`unavailable`, `conflict`, `not_found`, `too_old`, `other`) |
//! | `vmctl_watch_delay_seconds` | histogram | none: from an event's commit time to its delivery to a watcher |
//! | `vmctl_scheduler_bindings_total` | counter | none: VMs bound by this agent's scheduler |
//! | `vmctl_scheduler_unschedulable_vms` | gauge | none: VMs its last pass could not place |

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use vmctl_api::{ApplySource, Kind, Note, Object, ObjectRef};
use vmctl_store::{Event, Listing, RecordedNote, Store, StoreError, Watch, WatchItem, Written};

/// The `Content-Type` of [`Metrics::encode`]'s text (OpenMetrics 1.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of a metric per controller.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// The controller's name (`vm-controller`, `image-controller`,
    /// `provision-controller`, `snapshot-controller`).
    pub controller: String,
}

/// Labels of a reconcile's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// The controller's name.
    pub controller: String,
    /// `ok`, `error`, `conflict` or `panic`.
    pub result: String,
}

/// Labels of a store request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// The store method: `apply`, `update_status`, `set_finalizers`,
    /// `request_delete`, `record_note`, `get`, `list`.
    pub operation: String,
}

/// Labels of a failed store request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The store method.
    pub operation: String,
    /// `unavailable`, `conflict`, `not_found`, `too_old` or `other`.
    pub error: String,
}

/// Labels of the VM count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmLabels {
    /// `status.phase` (`Pending` without a status).
    pub phase: String,
    /// `status.nodeName`, empty when no agent has reported the VM.
    pub node: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Buckets from 1 ms to about 33 s, doubling.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The process's metrics; see the module docs for what each one is.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// VMs per phase and node.
    pub vms: Family<VmLabels, Gauge>,
    /// Reconciles per controller and outcome.
    pub reconciles: Family<ResultLabels, Counter>,
    /// Reconcile durations per controller, in seconds.
    pub reconcile_seconds: HistogramFamily<ControllerLabels>,
    /// Objects in each controller's work queue.
    pub workqueue_depth: Family<ControllerLabels, Gauge>,
    /// Store request durations per operation, in seconds.
    pub store_seconds: HistogramFamily<OperationLabels>,
    /// Failed store requests per operation and error.
    pub store_errors: Family<ErrorLabels, Counter>,
    /// From an event's commit to its delivery to a watcher, in seconds.
    pub watch_delay_seconds: Histogram,
    /// VMs bound to a node by this agent's scheduler.
    pub bindings: Counter,
    /// VMs this agent's scheduler could not place at its last pass.
    pub unschedulable: Gauge,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            vms: Family::default(),
            reconciles: Family::default(),
            reconcile_seconds: Family::new_with_constructor(seconds_histogram),
            workqueue_depth: Family::default(),
            store_seconds: Family::new_with_constructor(seconds_histogram),
            store_errors: Family::default(),
            watch_delay_seconds: seconds_histogram(),
            bindings: Counter::default(),
            unschedulable: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("vmctl_vms", "VMs per phase and node", m.vms.clone());
        r.register(
            "vmctl_reconciles",
            "Reconciles per controller and outcome",
            m.reconciles.clone(),
        );
        r.register(
            "vmctl_reconcile_duration_seconds",
            "How long a reconcile took",
            m.reconcile_seconds.clone(),
        );
        r.register(
            "vmctl_workqueue_depth",
            "Objects in a controller's work queue",
            m.workqueue_depth.clone(),
        );
        r.register(
            "vmctl_store_request_duration_seconds",
            "How long a store request took",
            m.store_seconds.clone(),
        );
        r.register(
            "vmctl_store_errors",
            "Failed store requests per operation and error",
            m.store_errors.clone(),
        );
        r.register(
            "vmctl_watch_delay_seconds",
            "From an event's commit to its delivery to a watcher",
            m.watch_delay_seconds.clone(),
        );
        r.register(
            "vmctl_scheduler_bindings",
            "VMs bound to a node by this agent's scheduler",
            m.bindings.clone(),
        );
        r.register(
            "vmctl_scheduler_unschedulable_vms",
            "VMs this agent's scheduler could not place at its last pass",
            m.unschedulable.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The process's metrics (created on first use).
    pub fn global() -> &'static Metrics {
        static METRICS: OnceLock<Metrics> = OnceLock::new();
        METRICS.get_or_init(Metrics::new)
    }

    /// Sets `vmctl_vms` from `vms` (VirtualMachine objects; others are
    /// skipped): the count per phase and node, replacing the last one.
    pub fn set_vms<'a>(&self, vms: impl IntoIterator<Item = &'a Object>) {
        self.vms.clear();
        for vm in vms.into_iter().filter(|o| o.kind == Kind::VirtualMachine) {
            let st = vm.status.as_ref();
            let field = |k: &str| {
                st.and_then(|s| s.get(k))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            };
            let labels = VmLabels {
                phase: field("phase").unwrap_or_else(|| "Pending".into()),
                node: field("nodeName").unwrap_or_default(),
            };
            self.vms.get_or_create(&labels).inc();
        }
    }

    /// Every metric in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }

    /// Counts a reconcile of `controller` that ended as `result` after
    /// `started`.
    pub fn reconciled(&self, controller: &str, result: &str, started: Instant) {
        self.reconciles
            .get_or_create(&ResultLabels {
                controller: controller.into(),
                result: result.into(),
            })
            .inc();
        self.reconcile_seconds
            .get_or_create(&ControllerLabels {
                controller: controller.into(),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Sets the work queue depth of `controller`.
    pub fn queue_depth(&self, controller: &str, depth: usize) {
        self.workqueue_depth
            .get_or_create(&ControllerLabels {
                controller: controller.into(),
            })
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    fn store_request<T>(&self, operation: &str, started: Instant, r: &Result<T, StoreError>) {
        self.store_seconds
            .get_or_create(&OperationLabels {
                operation: operation.into(),
            })
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = r {
            let error = match e {
                StoreError::Unavailable { .. } => "unavailable",
                StoreError::Conflict { .. } => "conflict",
                StoreError::NotFound(_) => "not_found",
                StoreError::TooOld { .. } => "too_old",
                _ => "other",
            };
            self.store_errors
                .get_or_create(&ErrorLabels {
                    operation: operation.into(),
                    error: error.into(),
                })
                .inc();
        }
    }
}

/// A [`Store`] that times each request and counts its failures in
/// [`Metrics::global`], and measures each watch event's delay; otherwise
/// exactly the store it wraps.
#[derive(Debug)]
pub struct MeteredStore(pub Arc<dyn Store>);

impl MeteredStore {
    async fn timed<T>(
        &self,
        operation: &str,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let r = f.await;
        Metrics::global().store_request(operation, started, &r);
        r
    }
}

#[async_trait::async_trait]
impl Store for MeteredStore {
    async fn apply(
        &self,
        obj: Object,
        source: Option<ApplySource>,
        expected_rv: Option<u64>,
    ) -> vmctl_store::Result<Written> {
        self.timed("apply", self.0.apply(obj, source, expected_rv))
            .await
    }

    async fn update_status(
        &self,
        r: &ObjectRef,
        status: serde_json::Value,
        expected_rv: Option<u64>,
    ) -> vmctl_store::Result<Written> {
        self.timed(
            "update_status",
            self.0.update_status(r, status, expected_rv),
        )
        .await
    }

    async fn set_finalizers(
        &self,
        r: &ObjectRef,
        finalizers: Vec<String>,
        expected_rv: Option<u64>,
    ) -> vmctl_store::Result<Written> {
        self.timed(
            "set_finalizers",
            self.0.set_finalizers(r, finalizers, expected_rv),
        )
        .await
    }

    async fn request_delete(
        &self,
        r: &ObjectRef,
        expected_rv: Option<u64>,
    ) -> vmctl_store::Result<Written> {
        self.timed("request_delete", self.0.request_delete(r, expected_rv))
            .await
    }

    async fn record_note(&self, note: Note) -> vmctl_store::Result<u64> {
        self.timed("record_note", self.0.record_note(note)).await
    }

    async fn get(&self, r: &ObjectRef) -> vmctl_store::Result<Option<Object>> {
        self.timed("get", self.0.get(r)).await
    }

    async fn list(&self, kind: Option<Kind>) -> vmctl_store::Result<Listing> {
        self.timed("list", self.0.list(kind)).await
    }

    async fn watch(&self, after: u64) -> vmctl_store::Result<Watch> {
        let inner = self.0.watch(after).await?;
        // Ends after the first error, as every watch does.
        Ok(Watch::with_bookmarks(futures::stream::unfold(
            Some(inner),
            |w| async move {
                let mut w = w?;
                let item = w.next_item().await;
                if let Ok(WatchItem::Event(ev)) = &item {
                    let delay = (chrono::Utc::now() - ev.time).num_microseconds();
                    if let Some(us) = delay {
                        Metrics::global()
                            .watch_delay_seconds
                            .observe(us.max(0) as f64 / 1e6);
                    }
                }
                let next = item.is_ok().then_some(w);
                Some((item, next))
            },
        )))
    }

    async fn history(&self, r: &ObjectRef) -> vmctl_store::Result<Vec<Event>> {
        self.0.history(r).await
    }

    async fn notes(&self, object: Option<&ObjectRef>) -> vmctl_store::Result<Vec<RecordedNote>> {
        self.0.notes(object).await
    }

    async fn last_seq(&self) -> vmctl_store::Result<u64> {
        self.0.last_seq().await
    }

    fn describe(&self) -> String {
        self.0.describe()
    }

    fn mark_unreachable(&self) {
        self.0.mark_unreachable();
    }
}
