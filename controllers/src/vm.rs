//! The VirtualMachine controller: drives each VM to its `powerState`.
//!
//! ```text
//!   Pending ──image Ready──▶ (Starting) ──ok──▶ Running ◀──resume── Suspended
//!      │                         │                │  └────suspend────▲
//!      │                         │ error          └──stop──▶ Stopped
//!      │                         ▼
//!      │                   CrashLoopBackOff ── retryAfter passed ──▶ (Starting)
//!      ▼
//!   deletion requested ──▶ Terminating ── destroy, drop finalizer ──▶ gone
//! ```
//!
//! Each reconcile is observe → plan → act. Observe: read the VM's Image
//! from the store and ask the hypervisor for the instance ([`Observed`]).
//! Plan: the pure [`plan`] names the next [`Step`] (its decisions are drawn
//! in [`mod@plan`]). Act: perform that one step, fold its effect into the
//! observation, and plan again until a step ends the reconcile. The
//! hypervisor's view of the instance decides, so a run after a crash picks
//! up wherever the last one stopped.
//!
//! The finalizer `vmctl.dev/vm-teardown` makes a deleted VM's instance be
//! destroyed before the object goes (its Snapshots are deleted first, and
//! their state removed from its disks). The agent's apply creates every VM
//! with it; the controller adds it before the first start when it is
//! missing, so nothing exists on the host before it is stored. Start
//! failures are counted in `status.startFailures`, with a `retryAfter`
//! deadline growing exponentially, and reported by a Warning note `BackOff`.
//!
//! A running VM with an SSH address is probed by a [`Prober`] (fresh short
//! SSH connections, the pinned host key); the VM is `Ready` once its
//! `SshReady` condition is True, so `apply --wait` and `up` return when
//! `vmctl ssh` works. A guest on a `tap` network has no address until a
//! [`Discoverer`] finds it by the VM's MAC (neighbour table of the bridge,
//! then dnsmasq leases): until then `AddressReady` and `SshReady` are
//! False (`WaitingForAddress`, then `IPDiscoveryTimeout` with the manual's
//! hints) and the VM is not Ready; once found, the address is
//! `status.runtime.sshHost` (port 22) and probing starts.

mod plan;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use vmctl_api::{Image, ImagePhase, Kind, NoteType, Object, ObjectRef, VirtualMachine, VmPhase};
use vmctl_store::{Change, Event};

pub use self::plan::{
    Elsewhere, Here, ImageNotReady, NODE_LOST, Observed, Step, disks, plan, ports, restart_digest,
};
use crate::address::{Discoverer, Discovery, Sources, Wanted};
use crate::drivers::{DriverError, InstanceSpec, InstanceState, LocalImage, SshTarget};
use crate::probe::{Answered, Prober, Readiness, Watched};
use crate::runtime::{Action, Reconciler, Relations};
use crate::{Context, Error};

/// The finalizer that makes a deleted VM wait for its teardown.
pub const FINALIZER: &str = "vmctl.dev/vm-teardown";

/// The reason of `Ready=False` (and a Warning note) when the hypervisor
/// cannot tell the state of a VM's instance.
pub const HYPERVISOR_ERROR: &str = "HypervisorError";

/// Steps one reconcile performs at the most. The longest path is 9 steps
/// plus one or two per disk (ImageReady, AddFinalizer, Start,
/// RecreateRequired, Suspend, an AttachDisk or DetachDisk and a ResizeDisk
/// per disk, DiskShrinkRefused, DiskResizePending, RestartRequired,
/// Report); a plan that has not ended by this bound is a
/// bug, and the VM is looked at again later instead of spinning.
pub const MAX_STEPS: usize = 48;

/// Reconciles VirtualMachines.
#[derive(Debug)]
pub struct VmReconciler {
    ctx: Arc<Context>,
    /// The hypervisor reports state changes itself: a running VM needs no
    /// liveness polling, only a slow safety-net look.
    event_driven: bool,
    /// Probes running guests over SSH; its results go into `SshReady` and
    /// `Ready` when a VM is reported.
    prober: Arc<Prober>,
    /// Finds the addresses of guests on `tap` networks; its results go
    /// into `status.runtime.sshHost` and `AddressReady`.
    discoverer: Arc<Discoverer>,
    /// VM name → when its hypervisor first failed to answer, since it last
    /// did ([`RuntimeConfig::inspect_grace`](crate::RuntimeConfig)).
    failing_since: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// In a cluster: the VMs last seen bound to this node (see
    /// `applied_triggers`).
    bound: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl VmReconciler {
    /// A VirtualMachine reconciler using `ctx`.
    pub fn new(ctx: Arc<Context>) -> Self {
        let event_driven = ctx.drivers.hypervisor.changes().is_some();
        let prober = Arc::new(Prober::new(ctx.drivers.provisioner.clone()));
        let discoverer = Arc::new(Discoverer::new(Sources {
            lease_files: ctx.config.dnsmasq_leases.clone(),
        }));
        VmReconciler {
            ctx,
            event_driven,
            prober,
            discoverer,
            failing_since: Default::default(),
            bound: Default::default(),
        }
    }

    /// The prober of this reconciler's VMs.
    pub fn prober(&self) -> &Arc<Prober> {
        &self.prober
    }

    /// The VM's SSH timeout: `ssh { timeout … }`, else the configured one.
    fn ssh_timeout(&self, spec: &vmctl_api::VirtualMachineSpec) -> Duration {
        spec.ssh
            .as_ref()
            .and_then(|s| s.timeout_seconds)
            .map_or(self.ctx.config.ssh_timeout, |s| {
                Duration::from_secs(s.into())
            })
    }

    /// For a VM up on a `tap` network whose hypervisor gives no address:
    /// has the discoverer look for the guest's IPv4 by its MAC, puts the
    /// address once found into the instance's runtime (SSH on port 22),
    /// and returns how the search stands. `None` (and no search) for
    /// every other VM.
    fn discover(&self, o: &mut Observed) -> Option<Discovery> {
        let vmctl_api::Network::Tap { bridge } = &o.spec.network else {
            self.discoverer.forget(&o.name);
            return None;
        };
        let timeout = self.ssh_timeout(&o.spec);
        let runtime = &mut o.instance.as_mut()?.runtime;
        let (None, Some(mac)) = (&runtime.ssh_host, &runtime.mac) else {
            self.discoverer.forget(&o.name);
            return None;
        };
        let wanted = Wanted {
            mac: mac.clone(),
            bridge: bridge.clone(),
            timeout,
        };
        // What the status holds of this boot (an agent restarted while
        // the VM ran); a start resets AddressReady.
        let known = o
            .status
            .runtime
            .as_ref()
            .and_then(|r| r.ssh_host.as_deref()?.parse().ok())
            .filter(|_| crate::conditions::is_true(&o.status.conditions, "AddressReady"));
        let d = self.discoverer.watch(&o.name, wanted, known);
        if let Some(ip) = d.address() {
            runtime.ssh_host = Some(ip.to_string());
            runtime.ssh_port = Some(22);
        }
        Some(d)
    }

    /// Stops probing VM `name` and looking for its address (stopped,
    /// restarted, deleted).
    fn forget(&self, name: &str) {
        self.prober.forget(name);
        self.discoverer.forget(name);
    }

    /// Has the prober probe the running VM of `o` and returns what it
    /// found; `None` (and no probing) when the VM has no SSH address.
    fn probe(&self, o: &Observed) -> Option<Readiness> {
        let runtime = o.instance.as_ref()?.runtime.clone();
        if runtime.ssh_host.is_none() || runtime.ssh_port.is_none() || runtime.work_dir.is_none() {
            self.prober.forget(&o.name);
            return None;
        }
        let ssh_timeout = self.ssh_timeout(&o.spec);
        let watched = Watched {
            target: SshTarget {
                vm: o.name.clone(),
                runtime,
                ssh: o.spec.ssh.clone(),
            },
            ssh_timeout,
            probes: o.spec.readiness_probes.clone(),
            network_up: self.ctx.drivers.hypervisor.guest_network_up(&o.name),
        };
        let answered = Answered {
            ssh: crate::conditions::is_true(&o.status.conditions, "SshReady"),
            probes: crate::conditions::is_true(&o.status.conditions, "ProbesReady"),
        };
        Some(self.prober.watch(&o.name, watched, answered))
    }
}

/// How often a deleted VM looks again whether its Snapshots are gone.
const SNAPSHOT_WAIT: Duration = Duration::from_millis(250);

/// How often a running VM is looked at when the hypervisor reports its
/// changes itself (QMP events): only to catch a lost event.
const EVENT_DRIVEN_LIVENESS: Duration = Duration::from_secs(60);

/// The image a VM boots from, if it is Ready (in a cluster: on `node`,
/// by its entry in the Image's `status.nodes`).
fn ready_image(obj: Option<&Object>, node: Option<&str>) -> Result<LocalImage, ImageNotReady> {
    let not_ready = |reason, message| ImageNotReady { reason, message };
    let Some(obj) = obj else {
        return Err(not_ready(
            "ImageNotFound",
            "the image does not exist".into(),
        ));
    };
    let image = Image::from_object(obj).map_err(|e| not_ready("ImageInvalid", e.to_string()))?;
    let mut status = image.status.unwrap_or_default();
    if let Some(n) = node {
        status = status.nodes.remove(n).unwrap_or_default();
    }
    match (status.phase, status.path) {
        (ImagePhase::Ready, Some(path)) => Ok(LocalImage {
            path,
            format: status.format.unwrap_or_else(|| "raw".into()),
            size_bytes: status.size_bytes.unwrap_or_default(),
            virtual_size_bytes: status.virtual_size_bytes,
        }),
        (phase, _) => Err(not_ready(
            "ImageNotReady",
            format!("the image is {phase:?}"),
        )),
    }
}

/// After a step: plan again, or return.
enum Flow {
    Next,
    Done(Action),
}

impl VmReconciler {
    /// Reads what [`plan`] needs: the VM, its Image and the hypervisor's
    /// instance (neither for a VM being deleted: its teardown must not
    /// depend on them).
    async fn observe(&self, obj: &Object) -> Result<Observed, Error> {
        let vm = VirtualMachine::from_object(obj).map_err(Error::decode(Kind::VirtualMachine))?;
        let mut o = Observed {
            name: vm.metadata.name.clone(),
            generation: vm.metadata.generation,
            deleting: vm.metadata.deletion_timestamp.is_some(),
            finalizer: vm.metadata.finalizers.iter().any(|f| f == FINALIZER),
            status: vm.status.unwrap_or_default(),
            image: Err(ImageNotReady {
                reason: "ImageNotReady",
                message: "not looked at: the VM is being deleted".into(),
            }),
            instance: None,
            now: Utc::now(),
            readiness: None,
            address: None,
            snapshots: Vec::new(),
            live_disk_resize: self.ctx.drivers.hypervisor.resizes_disks_live(),
            here: Here {
                node: self.ctx.config.node.clone(),
                work_dir: (self.ctx.drivers.hypervisor)
                    .work_dir(&vm.metadata.name)
                    .map(|d| d.display().to_string()),
            },
            spec: vm.spec,
            live_disk_hotplug: self.ctx.drivers.hypervisor.hotplugs_disks(),
        };
        if o.deleting {
            let all = self.ctx.list(Kind::Snapshot).await?;
            o.snapshots = crate::snapshot::of_vm(&all, &o.name)
                .map(|s| s.metadata.name.clone())
                .collect();
            return Ok(o);
        }
        let image_ref = ObjectRef::new(Kind::Image, o.spec.image.clone());
        let cfg = &self.ctx.config;
        o.image = ready_image(
            self.ctx.get(&image_ref).await?.as_ref(),
            cfg.cluster.then_some(cfg.node.name.as_str()),
        );
        o.instance = self
            .ctx
            .drivers
            .hypervisor
            .status(&o.name)
            .await
            .map_err(Error::driver("inspect", &obj.object_ref()))?;
        // A status written before `diskImage` existed: the disk was made
        // from the image the spec names.
        if o.instance.is_some() && o.status.disk_image.is_none() {
            o.status.disk_image = Some(o.spec.image.clone());
        }
        Ok(o)
    }

    /// Performs `step`, changing `obj` (the object as last written) and
    /// `o` as the step did.
    async fn act(&self, obj: &mut Object, o: &mut Observed, step: Step) -> Result<Flow, Error> {
        let ctx = &self.ctx;
        let hv = &ctx.drivers.hypervisor;
        let r = obj.object_ref();
        let name = o.name.clone();
        let driver = |op| Error::driver(op, &r);
        let done = Ok(Flow::Done(Action::await_change()));
        match step {
            Step::NodeLost { condition, warning } => {
                self.forget(&name);
                if o.node_lost(condition)
                    && let Some(msg) = warning
                {
                    self.note(&r, NoteType::Warning, NODE_LOST, msg).await;
                }
                ctx.write_status(obj, &o.status).await?;
                return done;
            }
            Step::Forget => return done,
            Step::Teardown => {
                self.forget(&name);
                o.terminating();
                let written = ctx.write_status(obj, &o.status).await?;
                hv.destroy(&name).await.map_err(driver("destroy"))?;
                let msg = format!("Destroyed VM {name} and its resources");
                self.note(&r, NoteType::Normal, "Destroyed", msg).await;
                ctx.remove_finalizer(&written, FINALIZER).await?;
                return done;
            }
            Step::DeleteSnapshots { names } => {
                o.terminating();
                ctx.write_status(obj, &o.status).await?;
                for s in &names {
                    let sr = ObjectRef::new(Kind::Snapshot, s.clone());
                    match ctx.store.request_delete(&sr, None).await {
                        Ok(_) | Err(vmctl_store::StoreError::NotFound(_)) => {}
                        Err(e) => {
                            return Err(crate::runtime::controller::ControllerError::from(e).into());
                        }
                    }
                }
                // Their deletion is not tied to this VM by the watch (a
                // deleted Snapshot no longer names it): look again soon.
                return Ok(Flow::Done(Action::requeue(SNAPSHOT_WAIT)));
            }
            Step::SetCondition { condition, warning } => {
                let reason = condition.type_.clone();
                if o.set_condition(condition)
                    && let Some(msg) = warning
                {
                    self.note(&r, NoteType::Warning, &reason, msg).await;
                }
            }
            Step::WaitForImage => {
                o.waiting_for_image();
                ctx.write_status(obj, &o.status).await?;
                // The image's status change wakes this VM.
                return done;
            }
            Step::AddFinalizer => {
                if let Some(written) = ctx.add_finalizer(obj, FINALIZER).await? {
                    *obj = written;
                }
                o.finalizer = true;
            }
            Step::Recreate { disk_image } => {
                hv.destroy(&name).await.map_err(driver("destroy"))?;
                let msg = format!(
                    "Recreating VM {name}: its disk was made from image {disk_image}, the spec names {} (updatePolicy Recreate)",
                    o.spec.image
                );
                self.note(&r, NoteType::Normal, "Recreating", msg).await;
                o.recreating();
                ctx.write_status(obj, &o.status).await?;
                return Ok(Flow::Done(Action::requeue(Duration::ZERO)));
            }
            Step::Crashed => {
                let how = o
                    .instance
                    .as_ref()
                    .and_then(|i| i.runtime.last_exit.clone())
                    .unwrap_or_else(|| "exited".into());
                let msg = format!(
                    "VM {name} stopped unexpectedly (its hypervisor process {how}); restarting"
                );
                self.note(&r, NoteType::Warning, "Crashed", msg.clone())
                    .await;
                return self.start_failed(obj, o, DriverError::Backend(msg)).await;
            }
            Step::BackOff { until } => {
                o.backing_off();
                ctx.write_status(obj, &o.status).await?;
                let wait = (until - o.now).to_std().unwrap_or_default();
                return Ok(Flow::Done(Action::requeue(wait)));
            }
            Step::Start { prepare } => {
                if prepare && let Ok(image) = o.image.clone() {
                    let spec = InstanceSpec {
                        name: name.clone(),
                        uid: obj.metadata.uid.clone().unwrap_or_else(|| name.clone()),
                        spec: o.spec.clone(),
                        image,
                    };
                    // Any driver's prepare error is the VM's: in its status
                    // and events, and retried with backoff like a start.
                    match hv.prepare(&spec).await {
                        Ok(prepared) => o.prepared(prepared),
                        Err(e) => return self.prepare_failed(obj, o, e).await,
                    }
                }
                // A new boot: nothing found of the last one holds.
                self.forget(&name);
                match hv.start(&name).await {
                    Ok(st) => {
                        let port = st
                            .runtime
                            .ssh_port
                            .map(|p| format!(", SSH on port {p}"))
                            .unwrap_or_default();
                        o.started(st);
                        self.note(
                            &r,
                            NoteType::Normal,
                            "Started",
                            format!("Started VM {name}{port}"),
                        )
                        .await;
                    }
                    Err(e) => return self.start_failed(obj, o, e).await,
                }
            }
            Step::Suspend => {
                hv.suspend(&name).await.map_err(driver("suspend"))?;
                self.note(
                    &r,
                    NoteType::Normal,
                    "Suspended",
                    format!("Suspended VM {name}"),
                )
                .await;
                o.now_in(InstanceState::Suspended);
            }
            Step::Resume => {
                hv.resume(&name).await.map_err(driver("resume"))?;
                self.note(
                    &r,
                    NoteType::Normal,
                    "Resumed",
                    format!("Resumed VM {name}"),
                )
                .await;
                o.now_in(InstanceState::Running);
            }
            Step::Stop => {
                hv.stop(&name, self.stop_timeout(&o.spec))
                    .await
                    .map_err(driver("stop"))?;
                self.note(
                    &r,
                    NoteType::Normal,
                    "Stopped",
                    format!("Stopped VM {name}"),
                )
                .await;
                o.now_in(InstanceState::Stopped);
            }
            Step::ResizeDisk { disk, from, to } => {
                let (from_h, to_h) = (disks::human_size(from), disks::human_size(to));
                match hv.resize_disk(&name, &disk, to).await {
                    Ok(()) => {
                        o.disk_resized(&disk, to);
                        let msg = format!(
                            "Grew disk {disk} of VM {name} from {from_h} to {to_h} while it runs (live); grow the partition and filesystem in the guest to use it"
                        );
                        self.note(&r, NoteType::Normal, "DiskResized", msg).await;
                    }
                    Err(e) => {
                        let err = vmctl_api::error_chain(&e);
                        o.disk_resize_failed(&disk, &err);
                        let msg = format!(
                            "Cannot grow disk {disk} of VM {name} to {to_h} live ({err}); it grows at the next start"
                        );
                        self.note(&r, NoteType::Warning, "ResizeFailed", msg).await;
                    }
                }
            }
            Step::AttachDisk { disk } => match hv.attach_disk(&name, &disk).await {
                Ok(attached) => {
                    let msg = disks::attached_note(&name, &disk.name, attached.size_bytes);
                    o.disk_attached(attached);
                    self.note(&r, NoteType::Normal, "DiskAttached", msg).await;
                }
                Err(e) => {
                    let err = vmctl_api::error_chain(&e);
                    o.disk_hotplug_failed(&disk.name, true, &err);
                    let msg = format!(
                        "Cannot attach disk {} to VM {name} live ({err}); it is attached at the next start",
                        disk.name
                    );
                    self.note(&r, NoteType::Warning, disks::HOTPLUG_FAILED, msg)
                        .await;
                }
            },
            Step::DetachDisk { disk } => match hv.detach_disk(&name, &disk).await {
                Ok(()) => {
                    o.disk_detached(&disk);
                    let msg = format!(
                        "Detached disk {disk} from VM {name} while it runs (live); its file is kept until the VM is deleted"
                    );
                    self.note(&r, NoteType::Normal, "DiskDetached", msg).await;
                }
                Err(e) => {
                    let err = vmctl_api::error_chain(&e);
                    o.disk_hotplug_failed(&disk, false, &err);
                    let msg = format!(
                        "Cannot detach disk {disk} from VM {name} live ({err}); it is detached at the next start"
                    );
                    self.note(&r, NoteType::Warning, disks::HOTPLUG_FAILED, msg)
                        .await;
                }
            },
            Step::ForwardPorts { remove, add } => {
                for f in &remove {
                    match hv.remove_port_forward(&name, f).await {
                        Ok(()) => {
                            let msg = format!("Removed port forward {} of VM {name}", f.describe());
                            self.note(&r, NoteType::Normal, "PortForwardRemoved", msg)
                                .await;
                        }
                        Err(e) => {
                            let msg = format!(
                                "Cannot remove port forward {} of VM {name} ({}); tried again later",
                                f.describe(),
                                vmctl_api::error_chain(&e)
                            );
                            self.note(&r, NoteType::Warning, "PortForwardFailed", msg)
                                .await;
                        }
                    }
                    o.forward_removed(f);
                }
                for f in &add {
                    match hv.add_port_forward(&name, f).await {
                        Ok(()) => {
                            o.forward_added(f);
                            let msg = format!("Forwarding {} to VM {name}", f.describe());
                            self.note(&r, NoteType::Normal, "PortForwardAdded", msg)
                                .await;
                        }
                        Err(e) => {
                            let (reason, message) = self.forward_failure(&name, f, &e).await;
                            if o.forward_failed(f, reason, &message) {
                                let msg = format!(
                                    "Cannot forward {} to VM {name}: {message}; the VM and its other forwards keep working",
                                    f.describe()
                                );
                                self.note(&r, NoteType::Warning, reason, msg).await;
                            }
                        }
                    }
                }
            }
            Step::Restart => {
                hv.stop(&name, self.stop_timeout(&o.spec))
                    .await
                    .map_err(driver("stop"))?;
                let msg =
                    format!("Restarting VM {name} to apply a spec change (updatePolicy Restart)");
                self.note(&r, NoteType::Normal, "Restarting", msg).await;
                o.restarting();
                ctx.write_status(obj, &o.status).await?;
                return Ok(Flow::Done(Action::requeue(Duration::ZERO)));
            }
            Step::Report { phase } => {
                // A paused guest keeps its address.
                o.address = match phase {
                    VmPhase::Running | VmPhase::Suspended => self.discover(o),
                    _ => {
                        self.discoverer.forget(&name);
                        None
                    }
                };
                o.readiness = match phase {
                    VmPhase::Running => self.probe(o),
                    _ => {
                        self.prober.forget(&name);
                        None
                    }
                };
                let before = address_reason(o);
                o.report(phase);
                ctx.write_status(obj, &o.status).await?;
                self.note_address(&r, o, before).await;
                let liveness = if self.event_driven {
                    EVENT_DRIVEN_LIVENESS.max(ctx.config.liveness)
                } else {
                    ctx.config.liveness
                };
                return Ok(Flow::Done(match phase {
                    // A failed port forward is tried again when its wait ends.
                    VmPhase::Running | VmPhase::Suspended => Action::requeue(
                        plan::ports::next_retry(o).map_or(liveness, |d| d.min(liveness)),
                    ),
                    _ => Action::await_change(),
                }));
            }
        }
        Ok(Flow::Next)
    }

    /// The reason and message of a port forward `f` of VM `name` that
    /// failed with `err`; a host port in use names the VM that forwards
    /// it, when one of vmctl's does.
    async fn forward_failure(
        &self,
        name: &str,
        f: &vmctl_api::PortForward,
        err: &DriverError,
    ) -> (&'static str, String) {
        if !matches!(err, DriverError::AddressInUse(_)) {
            return (plan::ports::FAILED, vmctl_api::error_chain(err));
        }
        let holder = self
            .ctx
            .list(Kind::VirtualMachine)
            .await
            .unwrap_or_default()
            .iter()
            .filter(|o| o.metadata.name != name)
            .filter_map(|o| VirtualMachine::from_object(o).ok())
            .find(|vm| {
                vm.status.as_ref().is_some_and(|st| {
                    st.port_forwards.iter().any(|e| {
                        e.state == vmctl_api::PortForwardState::Active
                            && e.forward().clashes_with(f)
                    })
                })
            })
            .map(|vm| vm.metadata.name);
        let by = match holder {
            Some(vm) => format!(" (VM {vm} forwards it)"),
            None => String::new(),
        };
        (
            plan::ports::IN_USE,
            format!("{err}{by}: free the port or pick another host port for this forward"),
        )
    }

    /// Notes the address search's turns, for `describe` and `events`: a
    /// Warning `IPDiscoveryTimeout` when it times out, a Normal
    /// `AddressFound` when the address is found or moves. `before`: the
    /// `AddressReady` reason and message before this report.
    async fn note_address(&self, r: &ObjectRef, o: &Observed, before: Option<(String, String)>) {
        let Some((reason, message)) = address_reason(o) else {
            return;
        };
        if before.as_ref() == Some(&(reason.clone(), message.clone())) {
            return;
        }
        let name = &o.name;
        match reason.as_str() {
            "IPDiscoveryTimeout" if before.as_ref().is_none_or(|(r, _)| *r != reason) => {
                let msg = format!("VM {name}: {message}");
                self.note(r, NoteType::Warning, "IPDiscoveryTimeout", msg)
                    .await;
            }
            // Not when only where it was found from changes (an agent
            // restarted while the VM ran).
            "AddressFound"
                if before.as_ref().is_none_or(|(r, m)| {
                    *r != reason || m.split(' ').next() != message.split(' ').next()
                }) =>
            {
                let msg = format!("VM {name} has address {message}");
                self.note(r, NoteType::Normal, "AddressFound", msg).await;
            }
            _ => {}
        }
    }

    /// Records a note about the VM `r` (see [`Context::note`]).
    /// The hypervisor could not tell the state of the VM's instance
    /// (error `e`: QEMU not answering QMP, say): `Ready` and `SshReady` are
    /// False with reason `HypervisorError` and the error as the message,
    /// and one Warning note is written per distinct error, instead of the
    /// status going on saying Running and Ready. The runtime retries with
    /// backoff; the next inspection that works sets the status again.
    async fn report_uninspectable(&self, obj: &Object, e: &Error) -> Result<(), Error> {
        let vm = VirtualMachine::from_object(obj).map_err(Error::decode(Kind::VirtualMachine))?;
        if vm.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        let mut status = vm.status.unwrap_or_default();
        let message = format!(
            "{}; `vmctl stop {name}` or `vmctl delete vm {name}` end it",
            vmctl_api::error_chain(e),
            name = vm.metadata.name
        );
        let said = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.reason == HYPERVISOR_ERROR && c.message == message);
        if said {
            return Ok(());
        }
        let now = Utc::now();
        let generation = vm.metadata.generation;
        for type_ in ["Ready", "SshReady"] {
            let exists = type_ == "Ready" || status.conditions.iter().any(|c| c.type_ == type_);
            if exists {
                let cond = crate::conditions::condition(
                    type_,
                    false,
                    HYPERVISOR_ERROR,
                    message.clone(),
                    generation,
                );
                vmctl_api::set_condition(&mut status.conditions, cond, now);
            }
        }
        let msg = format!("VM {}: {message}", vm.metadata.name);
        self.note(&obj.object_ref(), NoteType::Warning, HYPERVISOR_ERROR, msg)
            .await;
        self.ctx.write_status(obj, &status).await?;
        Ok(())
    }

    async fn note(&self, r: &ObjectRef, type_: NoteType, reason: &str, msg: String) {
        self.ctx.note(r, type_, Self::NAME, reason, msg).await;
    }

    /// A start that failed with `err` (or a crash): counted, reported in
    /// the status and by a Warning note `BackOff`, retried after a growing
    /// delay.
    async fn start_failed(
        &self,
        obj: &Object,
        o: &mut Observed,
        err: DriverError,
    ) -> Result<Flow, Error> {
        self.back_off(obj, o, Failed::Start, err).await
    }

    /// A prepare that failed with `err`: counted like a failed start,
    /// reported in the `Ready` condition (reason `PrepareFailed`) and by a
    /// Warning note `PrepareFailed`, retried after a growing delay.
    async fn prepare_failed(
        &self,
        obj: &Object,
        o: &mut Observed,
        err: DriverError,
    ) -> Result<Flow, Error> {
        self.back_off(obj, o, Failed::Prepare, err).await
    }

    /// What [`Self::start_failed`] and [`Self::prepare_failed`] share: one
    /// more failure counted, the backoff written to the status, a Warning
    /// note, and a requeue after the delay.
    async fn back_off(
        &self,
        obj: &Object,
        o: &mut Observed,
        failed: Failed,
        err: DriverError,
    ) -> Result<Flow, Error> {
        let ctx = &self.ctx;
        let count = o.status.start_failures.count.saturating_add(1);
        let delay = ctx.config.start_backoff.jittered(count);
        let (reason, lead, err) = match failed {
            Failed::Start => ("BackOff", "Back-off restarting failed VM", err.to_string()),
            Failed::Prepare => (
                "PrepareFailed",
                "Cannot prepare VM",
                vmctl_api::error_chain(&err),
            ),
        };
        match failed {
            Failed::Start => o.start_failed(delay, err.clone()),
            Failed::Prepare => o.prepare_failed(delay, err.clone()),
        }
        ctx.write_status(obj, &o.status).await?;
        let msg = format!(
            "{lead} {} (failure {count}: {err}); retry in {:.1}s",
            o.name,
            delay.as_secs_f64()
        );
        self.note(&obj.object_ref(), NoteType::Warning, reason, msg)
            .await;
        Ok(Flow::Done(Action::requeue(delay)))
    }

    /// The spec's ACPI grace period, else the configured one.
    fn stop_timeout(&self, spec: &vmctl_api::VirtualMachineSpec) -> Duration {
        spec.stop_timeout_seconds
            .map_or(self.ctx.config.stop_timeout, |s| {
                Duration::from_secs(s.into())
            })
    }
}

impl VmReconciler {
    /// Records whether VM `name` is bound to this node (cluster).
    fn bound_here(&self, name: &str, here: bool) {
        let mut b = self
            .bound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if here {
            b.insert(name.to_owned());
        } else {
            b.remove(name);
        }
    }

    /// In a cluster: destroys this node's instance of a VM bound to
    /// another node (re-placed there while this node was lost: see the
    /// node lifecycle controller's eviction), so that no second copy runs.
    async fn destroy_stray(&self, obj: &Object) -> Result<(), Error> {
        let Some(node) = crate::context::vm_node(obj) else {
            return Ok(());
        };
        let name = &obj.metadata.name;
        let hv = &self.ctx.drivers.hypervisor;
        let r = obj.object_ref();
        if hv
            .status(name)
            .await
            .map_err(Error::driver("inspect", &r))?
            .is_none()
        {
            return Ok(());
        }
        self.forget(name);
        hv.destroy(name)
            .await
            .map_err(Error::driver("destroy", &r))?;
        let me = &self.ctx.config.node.name;
        let msg = format!(
            "Destroyed node {me}'s copy of VM {name} and its disk: the VM was re-placed on node {node} while node {me} was lost"
        );
        tracing::warn!(vm = %name, %node, "{msg}");
        self.note(&r, NoteType::Warning, "Destroyed", msg).await;
        Ok(())
    }
}

impl Reconciler for VmReconciler {
    type Error = Error;
    const KIND: Kind = Kind::VirtualMachine;
    const NAME: &'static str = "vm-controller";

    async fn reconcile(&self, obj: Arc<Object>) -> Result<Action, Error> {
        // In a cluster, a VM is the business of its node's agent only; the
        // scheduler binds it, the node lifecycle controller reports it
        // `NodeLost` when its node is.
        let ours = self.ctx.acts_on(crate::context::vm_node(&obj));
        if self.ctx.config.cluster {
            self.bound_here(&obj.metadata.name, ours);
        }
        if !ours {
            self.destroy_stray(&obj).await?;
            return Ok(Action::await_change());
        }
        let mut o = match self.observe(&obj).await {
            Ok(o) => o,
            Err(e @ Error::Driver { .. }) => {
                let failing_for = {
                    let mut m = self.failing_since.lock().unwrap_or_else(|p| p.into_inner());
                    let since = m
                        .entry(obj.metadata.name.clone())
                        .or_insert_with(std::time::Instant::now);
                    since.elapsed()
                };
                if failing_for < self.ctx.config.inspect_grace {
                    // A busy monitor, most likely: retried with backoff.
                    return Err(e);
                }
                self.report_uninspectable(&obj, &e).await?;
                // `vmctl stop` must end an instance nobody can inspect:
                // the driver's stop falls back to signals.
                let vm = VirtualMachine::from_object(&obj)
                    .map_err(Error::decode(Kind::VirtualMachine))?;
                if vm.spec.power_state == vmctl_api::PowerState::Stopped {
                    let name = &vm.metadata.name;
                    tracing::warn!(vm = %name, "stopping a VM whose hypervisor does not answer");
                    (self.ctx.drivers.hypervisor)
                        .stop(name, self.stop_timeout(&vm.spec))
                        .await
                        .map_err(Error::driver("stop", &obj.object_ref()))?;
                    return Ok(Action::requeue(Duration::ZERO));
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        if let Ok(mut m) = self.failing_since.lock() {
            m.remove(&o.name);
        }
        let mut obj = (*obj).clone();
        for _ in 0..MAX_STEPS {
            let step = plan(&o);
            tracing::trace!(?step, "planned");
            if let Flow::Done(action) = self.act(&mut obj, &mut o, step).await? {
                return Ok(action);
            }
        }
        tracing::error!(
            steps = MAX_STEPS,
            "the VM plan did not end; looking again later"
        );
        Ok(Action::requeue(self.ctx.config.liveness))
    }

    /// In a cluster, the scheduler's binding of a VM to this node (a
    /// status naming this node that no VM controller wrote yet: its
    /// `observedGeneration` is 0) starts this agent's work on it.
    fn status_triggers(&self, name: &str, status: &serde_json::Value) -> bool {
        if !self.ctx.config.cluster {
            return false;
        }
        let here = status.get("nodeName").and_then(|n| n.as_str())
            == Some(self.ctx.config.node.name.as_str());
        self.bound_here(name, here);
        self.ctx.is_fresh_binding_here(status)
    }

    /// In a cluster, a VM's spec change concerns this agent only when the
    /// VM is bound to its node (as last seen); a new VM is bound by the
    /// scheduler first, and its binding triggers the run.
    fn applied_triggers(&self, name: &str) -> bool {
        !self.ctx.config.cluster
            || self
                .bound
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(name)
    }

    fn external_triggers(&self) -> Vec<tokio::sync::broadcast::Receiver<String>> {
        let mut triggers = vec![self.prober.changes(), self.discoverer.changes()];
        triggers.extend(self.ctx.drivers.hypervisor.changes());
        triggers
    }

    fn related(&self, rel: &Relations, ev: &Event) -> Vec<ObjectRef> {
        match (&ev.change, ev.object.kind) {
            (Change::Noted { .. }, _) => Vec::new(),
            (_, Kind::Image) => rel.vms_using(&ev.object.name).collect(),
            _ => Vec::new(),
        }
    }
}

/// The reason and message of `o`'s `AddressReady` condition, if it has one.
fn address_reason(o: &Observed) -> Option<(String, String)> {
    o.status
        .conditions
        .iter()
        .find(|c| c.type_ == "AddressReady")
        .map(|c| (c.reason.clone(), c.message.clone()))
}

/// Which step of a start failed, for [`VmReconciler::back_off`].
#[derive(Debug, Clone, Copy)]
enum Failed {
    /// The driver's start (or a crash of the instance).
    Start,
    /// The driver's prepare (disk, seed, configuration).
    Prepare,
}
