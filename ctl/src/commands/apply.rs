//! `vmctl apply -f FILE [--wait] [--watch]`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use vmctl_api::load::Loaded;
use vmctl_api::wire::{ApplyOutcome, ApplyRequest, ApplyResponse};
use vmctl_api::{Object, ObjectRef, Resource};

use super::Globals;
use crate::cli::Output;
use crate::client::Client;
use crate::output::print;

/// Flags of `vmctl apply`.
#[derive(Debug, Clone)]
pub struct ApplyArgs {
    /// The file, directory or `-`.
    pub file: PathBuf,
    /// Compute without writing.
    pub dry_run: bool,
    /// Delete what the file dropped.
    pub prune: bool,
    /// Output format.
    pub output: Output,
    /// Wait until Ready.
    pub wait: bool,
    /// How long to wait.
    pub timeout: Duration,
    /// Re-apply on every save.
    pub watch: bool,
}

fn request(loaded: &Loaded, file: &Path, a: &ApplyArgs) -> ApplyRequest {
    super::objects::apply_request(
        loaded.resources.iter().map(Resource::to_object).collect(),
        Some(file),
        "apply",
        a.dry_run,
        a.prune,
    )
}

/// How `apply` reports an outcome.
pub(crate) fn outcome_word(o: ApplyOutcome) -> &'static str {
    match o {
        ApplyOutcome::Created => "created",
        ApplyOutcome::Configured => "configured",
        ApplyOutcome::Unchanged => "unchanged",
        ApplyOutcome::Pruned => "pruned",
    }
}

fn render(resp: &ApplyResponse, a: &ApplyArgs, only_changes: bool) -> String {
    match a.output {
        Output::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(resp).expect("serialises")
        ),
        Output::Yaml => serde_yaml::to_string(resp).expect("serialises"),
        Output::Text => {
            let suffix = if a.dry_run { " (dry run)" } else { "" };
            let mut out = String::new();
            for r in &resp.results {
                if only_changes && r.outcome == ApplyOutcome::Unchanged {
                    continue;
                }
                let what = outcome_word(r.outcome);
                out.push_str(&format!("{} {what}{suffix}\n", r.object));
            }
            out
        }
    }
}

/// Fails unless the agent's answer has a result for every object sent, in
/// order: an apply is a success only when every object is acknowledged.
pub(crate) fn check_acknowledged(req: &ApplyRequest, resp: &ApplyResponse) -> miette::Result<()> {
    let acked: Vec<&ObjectRef> = resp
        .results
        .iter()
        .filter(|r| r.outcome != ApplyOutcome::Pruned)
        .map(|r| &r.object)
        .collect();
    let missing: Vec<String> = req
        .objects
        .iter()
        .map(Object::object_ref)
        .filter(|r| !acked.contains(&r))
        .map(|r| r.to_string())
        .collect();
    if missing.is_empty() && acked.len() == req.objects.len() {
        return Ok(());
    }
    let shown = missing
        .iter()
        .take(5)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    let more = missing.len().saturating_sub(5);
    Err(miette::miette!(
        code = "vmctl::apply::incomplete",
        help = "run the apply again; `vmctl get` shows what was written",
        "the agent acknowledged {} of the {} sent{}",
        acked.len().min(req.objects.len()),
        vmctl_api::limits::count(req.objects.len() as u64, "object", "objects"),
        if missing.is_empty() {
            String::new()
        } else if more > 0 {
            format!("; not acknowledged: {shown} and {more} more")
        } else {
            format!("; not acknowledged: {shown}")
        }
    ))
}

/// Applies the file's resources through the agent.
pub fn run(g: &Globals, a: &ApplyArgs) -> miette::Result<ExitCode> {
    if a.prune && a.file == Path::new("-") {
        return Err(miette::miette!(
            code = "vmctl::apply::prune_needs_file",
            help = "apply from a file or directory to prune",
            "--prune needs a file: objects are pruned by the file they were applied from"
        ));
    }
    if a.watch && a.file == Path::new("-") {
        return Err(miette::miette!(
            code = "vmctl::apply::watch_needs_file",
            help = "name a file with -f",
            "--watch needs a file to watch"
        ));
    }
    let loaded = match super::load_or_report(&a.file)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let client = g.client()?;
    super::check_backend(&client, &loaded, &a.file)?;
    let req = request(&loaded, &a.file, a);
    let resp = client.apply(&req)?;
    check_acknowledged(&req, &resp)?;
    print(&render(&resp, a, false))?;
    if a.watch {
        return watch(&client, a, loaded);
    }
    if a.wait && !a.dry_run {
        let refs: Vec<ObjectRef> = resp
            .results
            .iter()
            .filter(|r| r.outcome != ApplyOutcome::Pruned)
            .map(|r| r.object.clone())
            .collect();
        return super::wait::wait_ready(&client, &refs, a.timeout);
    }
    Ok(ExitCode::SUCCESS)
}

/// What `--watch` looks at: the directories to watch (the file's own, and
/// those of every local file its resources read: scripts, uploads, keys),
/// non-recursively, and the paths in them whose changes matter.
#[derive(Debug, Default, PartialEq)]
struct Watched {
    dirs: Vec<PathBuf>,
    /// The VMFile or manifest itself, and every local file its resources read.
    files: std::collections::BTreeSet<PathBuf>,
    /// With `-f DIR`: that directory, whose `.kdl`/`.yaml`/`.yml`/`.json`
    /// files all matter.
    manifest_dir: Option<PathBuf>,
}

impl Watched {
    fn of(file: &Path, loaded: &Loaded) -> Self {
        let mut dirs = std::collections::BTreeSet::new();
        let mut w = Watched::default();
        let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
        if abs.is_dir() {
            dirs.insert(abs.clone());
            w.manifest_dir = Some(abs);
        } else {
            dirs.insert(abs.parent().map(Path::to_path_buf).unwrap_or(abs.clone()));
            w.files.insert(abs);
        }
        for r in &loaded.resources {
            let v = serde_json::to_value(r.to_object().spec).unwrap_or_default();
            collect_paths(&v, &mut |p| {
                let p = Path::new(p);
                if let Some(parent) = p.parent() {
                    dirs.insert(parent.to_path_buf());
                }
                w.files.insert(p.to_path_buf());
            });
        }
        w.dirs = dirs.into_iter().filter(|d| d.is_dir()).collect();
        w
    }

    /// Whether a change of `path` may change what the file applies. Other
    /// files in the same directories (an editor's swap file, or the log
    /// `apply --watch 2> log` itself writes) are ignored: reacting to them
    /// made a watch that printed into its own directory loop forever.
    fn matters(&self, path: &Path) -> bool {
        self.files.contains(path)
            || self.manifest_dir.as_deref().is_some_and(|d| {
                path.parent() == Some(d)
                    && path
                        .extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| matches!(e, "kdl" | "yaml" | "yml" | "json"))
            })
    }
}

/// Calls `f` with every `path` field next to a `digest` (a LocalFile).
fn collect_paths(v: &serde_json::Value, f: &mut impl FnMut(&str)) {
    match v {
        serde_json::Value::Object(m) => {
            if let (Some(p), true) = (
                m.get("path").and_then(|p| p.as_str()),
                m.contains_key("digest"),
            ) {
                f(p);
            }
            m.values().for_each(|x| collect_paths(x, f));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_paths(x, f)),
        _ => {}
    }
}

enum Wake {
    /// Files changed: the paths the event names.
    Changed(Vec<PathBuf>),
    Interrupted,
}

/// Re-applies on every save until Ctrl-C. A save with errors prints the
/// diagnostics and changes nothing; a save that changes no object is skipped.
fn watch(client: &Client, a: &ApplyArgs, mut last: Loaded) -> miette::Result<ExitCode> {
    use notify::Watcher;
    let (tx, rx) = mpsc::channel::<Wake>();
    let ctrl = tx.clone();
    ctrlc::set_handler(move || {
        let _ = ctrl.send(Wake::Interrupted);
    })
    .map_err(|e| miette::miette!("cannot handle Ctrl-C: {e}"))?;
    let fs_tx = tx.clone();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && !matches!(ev.kind, notify::EventKind::Access(_))
        {
            let _ = fs_tx.send(Wake::Changed(ev.paths));
        }
    })
    .map_err(|e| miette::miette!("cannot watch files: {e}"))?;
    let mut watched = Watched::of(&a.file, &last);
    for d in &watched.dirs {
        watcher
            .watch(d, notify::RecursiveMode::NonRecursive)
            .map_err(|e| miette::miette!("cannot watch {}: {e}", d.display()))?;
    }
    eprintln!("watching {} for changes (Ctrl-C to stop)", a.file.display());
    let objects =
        |l: &Loaded| -> Vec<Object> { l.resources.iter().map(Resource::to_object).collect() };
    // The last refusal printed: the same one is not printed again until
    // the file changes what it says (bounded output whatever wakes us).
    let mut last_refusal: Option<String> = None;
    // The agent's backend, asked once: every re-apply is checked against it.
    let backend = client
        .connected_health()
        .ok()
        .and_then(|h| vmctl_api::validate::Backend::from_driver(&h.driver));
    while let Ok(Wake::Changed(paths)) = rx.recv() {
        let mut relevant = paths.iter().any(|p| watched.matters(p));
        // Debounce: editors write several events per save.
        let mut interrupted = false;
        while let Ok(w) = rx.recv_timeout(Duration::from_millis(100)) {
            match w {
                Wake::Interrupted => {
                    interrupted = true;
                    break;
                }
                Wake::Changed(paths) => relevant |= paths.iter().any(|p| watched.matters(p)),
            }
        }
        if interrupted {
            break;
        }
        if !relevant {
            continue;
        }
        let checked = vmctl_api::load::load(&a.file)
            .and_then(|l| backend.map_or(Ok(()), |b| l.check_backend(b)).map(|()| l));
        let refusal = match checked {
            Ok(l) => Ok(l),
            Err(vmctl_api::load::LoadError::Invalid(diags)) => Err(diags
                .into_iter()
                .map(|d| format!("{:?}\n", miette::Report::new(d)))
                .chain(["not applied: the running objects keep the last good spec\n".to_owned()])
                .collect::<String>()),
            Err(e) => Err(format!("{:?}\n", miette::Report::new(e))),
        };
        let loaded = match refusal {
            Ok(l) => {
                last_refusal = None;
                l
            }
            Err(text) => {
                if last_refusal.as_deref() != Some(&text) {
                    eprint!("{text}");
                    last_refusal = Some(text);
                }
                continue;
            }
        };
        if objects(&loaded) == objects(&last) {
            continue;
        }
        super::print_warnings(&loaded.warnings);
        let req = request(&loaded, &a.file, a);
        match client
            .apply(&req)
            .map_err(miette::Report::new)
            .and_then(|resp| check_acknowledged(&req, &resp).map(|()| resp))
        {
            Ok(resp) => {
                let stamp = chrono::Local::now().format("%H:%M:%S");
                let changes = render(&resp, a, true);
                if changes.is_empty() {
                    eprintln!("[{stamp}] re-applied: no changes");
                } else {
                    eprintln!("[{stamp}] re-applied:");
                    print(&changes)?;
                }
            }
            Err(e) => eprintln!("{e:?}"),
        }
        let new = Watched::of(&a.file, &loaded);
        for d in new.dirs.iter().filter(|d| !watched.dirs.contains(d)) {
            let _ = watcher.watch(d, notify::RecursiveMode::NonRecursive);
        }
        watched = new;
        last = loaded;
    }
    eprintln!("stopped watching");
    Ok(ExitCode::SUCCESS)
}
