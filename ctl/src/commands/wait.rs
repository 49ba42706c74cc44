//! Waiting until applied objects are Ready, with live per-object progress.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use vmctl_api::{Object, ObjectRef};

use crate::client::{Awaited, Client, LogSource, LogStart, States};

/// Where one object stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    /// Not there yet; the text says what it is doing.
    Progressing(String),
    /// Ready at its current generation.
    Ready,
    /// At its spec but not Ready by design: a VM whose spec asks it to be
    /// `Stopped` or `Suspended` reports that phase at its current
    /// generation (its `Ready` condition stays False: it serves nothing).
    /// The text is the phase.
    AtSpec(String),
    /// Failed for a reason retrying will not fix (or not soon).
    Failed(String),
    /// Its controller observed the current generation and refused part of
    /// the spec change (a condition of [`REFUSED_CHANGES`]); the object
    /// runs on as it was. The text is the condition's type and message.
    Refused(String),
}

/// Conditions that say a spec change was refused and will not happen
/// unless the spec changes again: waiting longer cannot help.
const REFUSED_CHANGES: &[&str] = &["DiskShrinkRefused"];

/// `o`'s status conditions (none when it has no status or they do not
/// parse).
pub(crate) fn conditions(o: &Object) -> Vec<vmctl_api::Condition> {
    o.status
        .as_ref()
        .and_then(|s| s.get("conditions"))
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default()
}

fn ready_condition(o: &Object) -> Option<vmctl_api::Condition> {
    conditions(o).into_iter().find(|c| c.type_ == "Ready")
}

/// A condition of `o` that is True for its current generation.
fn current_true(o: &Object, types: &[&str]) -> Option<vmctl_api::Condition> {
    conditions(o).into_iter().find(|c| {
        types.contains(&c.type_.as_str())
            && c.status == vmctl_api::ConditionStatus::True
            && c.observed_generation >= o.metadata.generation
    })
}

/// `Reason: message` (or the reason alone).
fn reason_message(c: &vmctl_api::Condition) -> String {
    if c.message.is_empty() {
        c.reason.clone()
    } else {
        format!("{}: {}", c.reason, c.message)
    }
}

/// What a wait that ended well still warns about: a VM that runs with an
/// older spec (`RestartRequired`, e.g. a disk hot-unplug the guest did
/// not complete: reason `HotPlugFailed`).
fn warning(r: &ObjectRef, o: &Object) -> Option<String> {
    let c = current_true(o, &["RestartRequired"])?;
    Some(format!(
        "warning: {r}: RestartRequired ({})",
        reason_message(&c)
    ))
}

/// An Image's download progress: bytes done and the total when known.
fn download(o: &Object) -> Option<(u64, Option<u64>)> {
    let st = o.status.as_ref()?;
    if st.get("phase")?.as_str()? != "Downloading" {
        return None;
    }
    let bytes = st["progress"]["bytes"].as_u64()?;
    Some((bytes, st["progress"]["total"].as_u64().filter(|t| *t > 0)))
}

/// How a wait shows where each object stands: on a terminal, one live line
/// per object (a bar with bytes, rate and ETA while an Image downloads);
/// piped, a plain line per change (`  vm/web: Booting`).
#[derive(Clone)]
pub(crate) struct Progress {
    live: Option<Live>,
}

#[derive(Clone)]
struct Live {
    multi: indicatif::MultiProgress,
    /// Whether spinners turn by themselves (not in tests: their frame
    /// would depend on time).
    tick: bool,
    bars: std::sync::Arc<std::sync::Mutex<BTreeMap<ObjectRef, indicatif::ProgressBar>>>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("live", &self.live.is_some())
            .finish()
    }
}

const STAGE_STYLE: &str = "{spinner} {prefix}: {wide_msg}";
const BAR_STYLE: &str = "{spinner} {prefix}: Downloading [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}";
const BYTES_STYLE: &str = "{spinner} {prefix}: Downloading {binary_bytes} {binary_bytes_per_sec}";
const DONE_STYLE: &str = "  {prefix}: {wide_msg}";

fn style(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template)
        .expect("the templates are valid")
        .progress_chars("=> ")
}

impl Progress {
    /// Live lines when stderr is a terminal (and `TERM` is not `dumb`),
    /// plain lines otherwise.
    pub(crate) fn new() -> Self {
        use std::io::IsTerminal as _;
        let tty =
            std::io::stderr().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb");
        Progress {
            live: tty.then(|| Live {
                multi: indicatif::MultiProgress::with_draw_target(
                    indicatif::ProgressDrawTarget::stderr(),
                ),
                tick: true,
                bars: Default::default(),
            }),
        }
    }

    /// Live lines drawn on `term` (tests).
    #[cfg(test)]
    fn on(term: indicatif::InMemoryTerm) -> Self {
        Progress {
            live: Some(Live {
                multi: indicatif::MultiProgress::with_draw_target(
                    indicatif::ProgressDrawTarget::term_like(Box::new(term)),
                ),
                tick: false,
                bars: Default::default(),
            }),
        }
    }

    /// Prints a line above the live lines (or just prints it).
    pub(crate) fn println(&self, line: &str) {
        match &self.live {
            Some(l) => {
                let _ = l.multi.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    /// Shows `r`'s new state; `o` is the object, for download progress.
    fn show(&self, r: &ObjectRef, st: &State, o: Option<&Object>) {
        let Some(l) = &self.live else {
            match st {
                State::Progressing(s) => eprintln!("  {r}: {s}"),
                State::Ready => eprintln!("  {r}: Ready"),
                State::AtSpec(p) => eprintln!("  {r}: {p}, as its spec asks"),
                State::Failed(s) => eprintln!("  {r}: Failed: {s}"),
                State::Refused(s) => eprintln!("  {r}: Refused: {s}"),
            }
            return;
        };
        let mut bars = l.bars.lock().expect("not poisoned");
        let bar = bars.entry(r.clone()).or_insert_with(|| {
            let b = l.multi.add(indicatif::ProgressBar::new_spinner());
            b.set_style(style(STAGE_STYLE));
            b.set_prefix(r.to_string());
            if l.tick {
                b.enable_steady_tick(Duration::from_millis(120));
            }
            b
        });
        match (st, o.and_then(download)) {
            (State::Progressing(_), Some((bytes, Some(total)))) => {
                bar.set_style(style(BAR_STYLE));
                bar.set_length(total);
                bar.set_position(bytes);
            }
            (State::Progressing(_), Some((bytes, None))) => {
                bar.set_style(style(BYTES_STYLE));
                bar.set_position(bytes);
            }
            (State::Progressing(s), None) => {
                bar.set_style(style(STAGE_STYLE));
                bar.set_message(s.clone());
            }
            (State::Ready, _) => {
                bar.set_style(style(DONE_STYLE));
                bar.finish_with_message("Ready");
            }
            (State::AtSpec(p), _) => {
                bar.set_style(style(DONE_STYLE));
                bar.finish_with_message(format!("{p}, as its spec asks"));
            }
            (State::Failed(s), _) => {
                bar.set_style(style(DONE_STYLE));
                bar.finish_with_message(format!("Failed: {s}"));
            }
            (State::Refused(s), _) => {
                bar.set_style(style(DONE_STYLE));
                bar.finish_with_message(format!("Refused: {s}"));
            }
        }
    }

    /// Stops the live lines, leaving them as they last were.
    fn finish(&self) {
        if let Some(l) = &self.live {
            for b in l.bars.lock().expect("not poisoned").values() {
                if !b.is_finished() {
                    b.abandon();
                }
            }
        }
    }
}

/// Classifies an object by its status.
pub(crate) fn state(o: &Object) -> State {
    let st = o.status.as_ref();
    let phase = st
        .and_then(|s| s.get("phase"))
        .and_then(|p| p.as_str())
        .unwrap_or("Pending");
    let observed = st
        .and_then(|s| s.get("observedGeneration"))
        .and_then(|g| g.as_u64())
        .unwrap_or(0);
    let ready = ready_condition(o);
    if phase == "Downloading"
        && let Some(bytes) = st.and_then(|s| s["progress"]["bytes"].as_u64())
    {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let done = match st.and_then(|s| s["progress"]["total"].as_u64()) {
            Some(t) if t > 0 => format!(
                "{:.0}% ({:.1} of {:.1} MiB)",
                bytes as f64 * 100.0 / t as f64,
                mib(bytes),
                mib(t)
            ),
            _ => format!("{:.1} MiB", mib(bytes)),
        };
        return State::Progressing(format!("Downloading {done}"));
    }
    // In a cluster, a VM not placed yet says why (the scheduler's
    // `Scheduled=False`, e.g. Unschedulable: 0/3 nodes available: …).
    if let Some(c) = conditions(o)
        .into_iter()
        .find(|c| c.type_ == "Scheduled" && c.status == vmctl_api::ConditionStatus::False)
        && st.and_then(|s| s.get("nodeName")).is_none()
    {
        return State::Progressing(format!("{phase} ({})", reason_message(&c)));
    }
    if observed < o.metadata.generation {
        return State::Progressing(format!(
            "{phase} (waiting for generation {} to be observed)",
            o.metadata.generation
        ));
    }
    // Found as: `disk 2` re-applied as `disk 1` (refused) and `apply
    // --wait` said "all Ready", exit 0.
    if let Some(c) = current_true(o, REFUSED_CHANGES) {
        return State::Refused(format!("{}: {}", c.type_, c.message));
    }
    let reason = ready.as_ref().map(reason_message).unwrap_or_default();
    // What a wait waits for is the object at its spec (as `kubectl wait`
    // on a resource's own target): for a VM asked to be Stopped or
    // Suspended, that phase, not Ready (which only a running VM is).
    if o.kind == vmctl_api::Kind::VirtualMachine
        && let Some(want) = o.spec.get("powerState").and_then(|p| p.as_str())
        && want != "Running"
        && phase == want
    {
        return State::AtSpec(phase.to_owned());
    }
    if phase == "Failed" {
        return State::Failed(if reason.is_empty() {
            "Failed".into()
        } else {
            reason
        });
    }
    match ready {
        Some(c) if c.status == vmctl_api::ConditionStatus::True => State::Ready,
        _ if reason.is_empty() => State::Progressing(phase.to_owned()),
        _ => State::Progressing(format!("{phase} ({reason})")),
    }
}

/// What one Provision's output stream has printed: the log's byte offset
/// after the last whole line printed, so that the wait prints the rest
/// itself once it is over (the agent sends what is appended only every
/// 200 ms). Shared by the stream's thread and the wait.
#[derive(Debug, Default)]
struct LogTail {
    /// The VM whose provision log is streamed, once known.
    vm: Option<String>,
    /// Byte offset of the log after the last whole line printed.
    pos: u64,
    /// A line not ended yet.
    pending: Vec<u8>,
    /// The wait is over: the stream prints nothing more.
    done: bool,
}

impl LogTail {
    /// Prints the whole lines of `bytes` (after what is pending).
    fn print(&mut self, bytes: &[u8], progress: &Progress) {
        self.pending.extend_from_slice(bytes);
        while let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=i).collect();
            self.pos += line.len() as u64;
            let vm = self.vm.as_deref().unwrap_or("?");
            progress.println(&format!(
                "  [{vm}] {}",
                String::from_utf8_lossy(&line[..line.len() - 1])
            ));
        }
    }

    /// Ends the stream: prints what the log holds after the last line
    /// printed (an unended last line too).
    fn finish(tail: &std::sync::Mutex<LogTail>, client: &Client, progress: &Progress) {
        let mut t = tail.lock().expect("not poisoned");
        t.done = true;
        let Some(vm) = t.vm.clone() else {
            return;
        };
        let rest = client
            .logs(&vm, LogSource::Provision, LogStart::Offset(t.pos), false)
            .and_then(|r| r.body());
        if let Ok(rest) = rest {
            t.pending.clear();
            t.print(&rest, progress);
            if !t.pending.is_empty() {
                let line = String::from_utf8_lossy(&t.pending).into_owned();
                progress.println(&format!("  [{vm}] {line}"));
            }
        }
    }
}

/// Streams what a Provision's steps print, prefixed with the VM's name, to
/// stderr until the wait ends ([`LogTail::finish`]). Waits (watching) for
/// the Provision to name its VM and for that VM to have a work directory,
/// where the log is.
fn stream_provision_output(
    client: &Client,
    r: &ObjectRef,
    progress: &Progress,
) -> std::sync::Arc<std::sync::Mutex<LogTail>> {
    let tail = std::sync::Arc::new(std::sync::Mutex::new(LogTail::default()));
    let client = client.clone();
    let progress = progress.clone();
    let r = r.clone();
    let shared = tail.clone();
    std::thread::spawn(move || {
        let names_vm = |s: &States| {
            s.get(&r)?
                .as_ref()?
                .spec
                .get("vm")?
                .as_str()
                .map(str::to_owned)
        };
        let Ok(Awaited::Done(vm)) =
            client.await_condition(std::slice::from_ref(&r), names_vm, None)
        else {
            return;
        };
        let vm_ref = ObjectRef::new(vmctl_api::Kind::VirtualMachine, vm.clone());
        let has_work_dir = |s: &States| {
            s.get(&vm_ref)?
                .as_ref()?
                .status
                .as_ref()?
                .get("runtime")?
                .get("workDir")?
                .as_str()
                .map(|_| ())
        };
        if !matches!(
            client.await_condition(std::slice::from_ref(&vm_ref), has_work_dir, None),
            Ok(Awaited::Done(()))
        ) {
            return;
        }
        // Only what this run prints: from the log's current end.
        let Ok(before) = client
            .logs(&vm, LogSource::Provision, LogStart::Tail(0), false)
            .and_then(|r| r.body())
        else {
            return;
        };
        {
            let mut t = shared.lock().expect("not poisoned");
            if t.done {
                return;
            }
            t.vm = Some(vm.clone());
            t.pos = before.len() as u64;
        }
        let from = LogStart::Offset(before.len() as u64);
        let Ok(mut resp) = client.logs(&vm, LogSource::Provision, from, true) else {
            return;
        };
        while let Ok(Some(chunk)) = resp.chunk() {
            let mut t = shared.lock().expect("not poisoned");
            if t.done {
                return;
            }
            t.print(&chunk, &progress);
        }
    });
    tail
}

/// Waits (watching) until the objects are all Ready, one fails, or
/// `timeout` passes. Prints each object's progress to stderr when it
/// changes, and what provisioning steps print, line by line.
pub(crate) fn wait_ready(
    client: &Client,
    refs: &[ObjectRef],
    timeout: Duration,
) -> miette::Result<ExitCode> {
    let progress = Progress::new();
    let tails: Vec<_> = refs
        .iter()
        .filter(|r| r.kind == vmctl_api::Kind::Provision)
        .map(|r| stream_provision_output(client, r, &progress))
        .collect();
    let mut last: BTreeMap<ObjectRef, State> = BTreeMap::new();
    // Done: the warnings of the objects as they ended; or the first one
    // that failed or refused its change.
    let check = |states: &States| -> Option<Result<Vec<String>, Ended>> {
        let mut all_ready = true;
        for r in refs {
            let o = states.get(r).and_then(Option::as_ref);
            let st = match o {
                Some(o) => state(o),
                None => State::Failed("deleted while waiting".into()),
            };
            if last.get(r) != Some(&st) {
                progress.show(r, &st, o);
                last.insert(r.clone(), st.clone());
            }
            match st {
                State::Ready | State::AtSpec(_) => {}
                State::Failed(why) => return Some(Err(Ended::Failed(r.clone(), why))),
                State::Refused(why) => return Some(Err(Ended::Refused(r.clone(), why))),
                State::Progressing(_) => all_ready = false,
            }
        }
        all_ready.then(|| {
            Ok(refs
                .iter()
                .filter_map(|r| warning(r, states.get(r)?.as_ref()?))
                .collect())
        })
    };
    let awaited = client.await_condition(refs, check, Some(timeout));
    // The provision output up to now, whatever the outcome (a failure's
    // last lines say why).
    for t in &tails {
        LogTail::finish(t, client, &progress);
    }
    progress.finish();
    match awaited? {
        Awaited::Done(Ok(warnings)) => {
            for w in warnings {
                eprintln!("{w}");
            }
            let at_spec: Vec<(&ObjectRef, &str)> = last
                .iter()
                .filter_map(|(r, s)| match s {
                    State::AtSpec(p) => Some((r, p.as_str())),
                    _ => None,
                })
                .collect();
            eprintln!("{}", summary(refs.len(), &at_spec));
            Ok(ExitCode::SUCCESS)
        }
        Awaited::Done(Err(Ended::Refused(r, why))) => Err(miette::miette!(
            code = "vmctl::apply::refused",
            help = format!(
                "change the spec back as the message says and apply again; `vmctl describe {} {}` shows the condition",
                r.kind.short(),
                r.name
            ),
            "{r} refused the change: {why}"
        )),
        Awaited::Done(Err(Ended::Failed(r, reason))) => Err(miette::miette!(
            code = "vmctl::apply::failed",
            help = format!(
                "run `vmctl describe {} {}` for details",
                r.kind.short(),
                r.name
            ),
            "{r} failed: {reason}"
        )),
        Awaited::TimedOut(_) => {
            let pending: Vec<String> = last
                .iter()
                .filter_map(|(r, s)| match s {
                    State::Progressing(p) => Some(format!("{r}: {p}")),
                    _ => None,
                })
                .collect();
            Err(miette::miette!(
                code = "vmctl::apply::timeout",
                help = "raise --timeout, or run `vmctl describe` on the objects still waiting",
                "timed out after {}s; not Ready: {}",
                timeout.as_secs(),
                pending.join("; ")
            ))
        }
    }
}

/// Why a wait ended before every object was Ready.
enum Ended {
    /// This object failed ([`State::Failed`]).
    Failed(ObjectRef, String),
    /// This object's controller refused its spec change ([`State::Refused`]).
    Refused(ObjectRef, String),
}

/// The last line of a wait that ended well: `all 3 objects are Ready`,
/// `vm/web is Ready`, or which objects are at a spec that is not Ready
/// (a VM asked to be Stopped).
fn summary(total: usize, at_spec: &[(&ObjectRef, &str)]) -> String {
    let listed: Vec<String> = at_spec.iter().map(|(r, p)| format!("{r} {p}")).collect();
    match (total, at_spec) {
        (1, []) => "1 object is Ready".to_owned(),
        (1, [(r, p)]) => format!("{r} is {p}, as its spec asks"),
        (n, []) => format!("all {n} objects are Ready"),
        (n, _) => format!(
            "all {n} objects are as their specs ask: {} Ready, {}",
            n - at_spec.len(),
            listed.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(generation: u64, status: serde_json::Value) -> Object {
        let mut o = Object::new(
            vmctl_api::Kind::VirtualMachine,
            vmctl_api::ObjectMeta::named("a"),
            serde_json::json!({}),
        );
        o.metadata.generation = generation;
        o.status = Some(status);
        o
    }

    #[test]
    fn a_wait_on_a_terminal_shows_stages_and_a_download_bar() {
        let term = indicatif::InMemoryTerm::new(10, 140);
        let p = Progress::on(term.clone());
        let vm = ObjectRef::new(vmctl_api::Kind::VirtualMachine, "web");
        let img = ObjectRef::new(vmctl_api::Kind::Image, "base");
        let mut image = obj(
            1,
            serde_json::json!({"phase": "Downloading",
            "progress": {"bytes": 3 << 20, "total": 12 << 20}}),
        );
        image.kind = vmctl_api::Kind::Image;
        p.show(&img, &state(&image), Some(&image));
        p.show(
            &vm,
            &State::Progressing("Pending (ImageNotReady)".into()),
            None,
        );
        p.show(&vm, &State::Progressing("Booting".into()), None);
        let pvm = ObjectRef::new(vmctl_api::Kind::Provision, "web");
        p.show(&pvm, &State::Failed("StepFailed: exit 1".into()), None);
        p.println("  [web] hello");
        p.finish();
        let screen = term.contents();
        // The rate and ETA depend on time.
        insta::with_settings!({filters => vec![
            (r"\d+(\.\d+)? [KMG]?i?B/s", "[RATE]"),
            (r"ETA \d+\w", "ETA [ETA]"),
        ]}, {
            insta::assert_snapshot!(screen);
        });
    }

    #[test]
    fn ready_needs_the_current_generation_observed() {
        let ready = serde_json::json!({"phase": "Running", "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Running", "message": ""}]});
        assert_eq!(state(&obj(1, ready.clone())), State::Ready);
        assert!(matches!(state(&obj(2, ready)), State::Progressing(_)));
    }

    /// Tryout of issue 17: `apply --wait` of a VM no node could take said
    /// "waiting for generation 1 to be observed" until its timeout; it
    /// shows the scheduler's reason now.
    #[test]
    fn a_vm_no_node_can_take_shows_why_while_waited_for() {
        let st = serde_json::json!({"phase": "Pending", "observedGeneration": 0,
            "conditions": [{"type": "Scheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/2 nodes available: 2 did not match the node selector"}]});
        assert_eq!(
            state(&obj(1, st)),
            State::Progressing(
                "Pending (Unschedulable: 0/2 nodes available: 2 did not match the node selector)"
                    .into()
            )
        );
        // Once bound, the usual wait for the VM controller.
        let bound = serde_json::json!({"phase": "Pending", "nodeName": "b",
            "conditions": [{"type": "Scheduled", "status": "True", "reason": "Scheduled",
            "message": "bound"}]});
        assert_eq!(
            state(&obj(1, bound)),
            State::Progressing("Pending (waiting for generation 1 to be observed)".into())
        );
    }

    /// Issue 16 fault 4: a refused shrink left the wait "all Ready".
    #[test]
    fn a_refused_shrink_at_the_current_generation_ends_the_wait_refused() {
        let status = |cond_gen: u64| {
            serde_json::json!({"phase": "Running", "observedGeneration": 2,
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Running", "message": ""},
                {"type": "DiskShrinkRefused", "status": "True", "reason": "SizeBelowCurrent",
                 "message": "disks cannot shrink (root: 2 GiB → 1 GiB)", "observedGeneration": cond_gen}]})
        };
        assert_eq!(
            state(&obj(2, status(2))),
            State::Refused("DiskShrinkRefused: disks cannot shrink (root: 2 GiB → 1 GiB)".into())
        );
        // Not yet judged for generation 3: waits.
        let mut later = obj(3, status(2));
        later.status.as_mut().unwrap()["observedGeneration"] = 3.into();
        assert_eq!(state(&later), State::Ready);
    }

    /// Issue 16 fault (a): a disk hot-unplug that failed left the VM
    /// needing a restart, and `apply --wait` said only "Ready".
    #[test]
    fn a_vm_that_needs_a_restart_is_a_warning_of_a_wait_that_ended_well() {
        let r = ObjectRef::new(vmctl_api::Kind::VirtualMachine, "web");
        let o = obj(
            2,
            serde_json::json!({"phase": "Running", "observedGeneration": 2,
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Running", "message": ""},
                {"type": "RestartRequired", "status": "True", "reason": "HotPlugFailed",
                 "message": "disk data could not be detached live (busy)", "observedGeneration": 2}]}),
        );
        assert_eq!(state(&o), State::Ready);
        assert_eq!(
            warning(&r, &o).as_deref(),
            Some(
                "warning: vm/web: RestartRequired (HotPlugFailed: disk data could not be detached live (busy))"
            )
        );
        let fine = obj(
            2,
            serde_json::json!({"phase": "Running", "observedGeneration": 2,
            "conditions": [{"type": "RestartRequired", "status": "False", "reason": "UpToDate",
                "message": "", "observedGeneration": 2}]}),
        );
        assert_eq!(warning(&r, &fine), None);
    }

    /// Issue 16 fault (g): "all 1 objects are Ready".
    #[test]
    fn the_summary_of_a_wait_counts_in_the_singular_and_plural() {
        let off = ObjectRef::new(vmctl_api::Kind::VirtualMachine, "off");
        assert_eq!(summary(1, &[]), "1 object is Ready");
        assert_eq!(summary(3, &[]), "all 3 objects are Ready");
        assert_eq!(
            summary(1, &[(&off, "Stopped")]),
            "vm/off is Stopped, as its spec asks"
        );
        assert_eq!(
            summary(2, &[(&off, "Stopped")]),
            "all 2 objects are as their specs ask: 1 Ready, vm/off Stopped"
        );
    }

    #[test]
    fn failed_phase_carries_the_ready_reason() {
        let failed = serde_json::json!({"phase": "Failed", "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "False", "reason": "ImageNotFound", "message": "no such file"}]});
        assert_eq!(
            state(&obj(1, failed)),
            State::Failed("ImageNotFound: no such file".into())
        );
    }
}
