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
}

fn ready_condition(o: &Object) -> Option<vmctl_api::Condition> {
    let conds = o.status.as_ref()?.get("conditions")?.clone();
    let conds: Vec<vmctl_api::Condition> = serde_json::from_value(conds).ok()?;
    conds.into_iter().find(|c| c.type_ == "Ready")
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
    if observed < o.metadata.generation {
        return State::Progressing(format!(
            "{phase} (waiting for generation {} to be observed)",
            o.metadata.generation
        ));
    }
    let reason = ready
        .as_ref()
        .map(|c| {
            if c.message.is_empty() {
                c.reason.clone()
            } else {
                format!("{}: {}", c.reason, c.message)
            }
        })
        .unwrap_or_default();
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
    let check = |states: &States| -> Option<Result<(), (ObjectRef, String)>> {
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
                State::Failed(reason) => return Some(Err((r.clone(), reason))),
                State::Progressing(_) => all_ready = false,
            }
        }
        all_ready.then_some(Ok(()))
    };
    let awaited = client.await_condition(refs, check, Some(timeout));
    // The provision output up to now, whatever the outcome (a failure's
    // last lines say why).
    for t in &tails {
        LogTail::finish(t, client, &progress);
    }
    progress.finish();
    match awaited? {
        Awaited::Done(Ok(())) => {
            let at_spec: Vec<String> = last
                .iter()
                .filter_map(|(r, s)| match s {
                    State::AtSpec(p) => Some(format!("{r} {p}")),
                    _ => None,
                })
                .collect();
            if at_spec.is_empty() {
                eprintln!("all {} objects are Ready", refs.len());
            } else {
                eprintln!(
                    "all {} objects are as their specs ask: {} Ready, {}",
                    refs.len(),
                    refs.len() - at_spec.len(),
                    at_spec.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Awaited::Done(Err((r, reason))) => Err(miette::miette!(
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
