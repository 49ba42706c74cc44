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
        "the agent acknowledged {} of the {} objects sent{}",
        acked.len().min(req.objects.len()),
        req.objects.len(),
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
    let req = request(&loaded, &a.file, a);
    let resp: ApplyResponse = client.call("POST", "/v1/apply", Some(&req))?;
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

/// The directories to watch: the file's own, and those of every local file
/// its resources read (scripts, uploads, keys), non-recursively.
fn watched_dirs(file: &Path, loaded: &Loaded) -> Vec<PathBuf> {
    let mut dirs = std::collections::BTreeSet::new();
    let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    dirs.insert(if abs.is_dir() {
        abs.clone()
    } else {
        abs.parent().map(Path::to_path_buf).unwrap_or(abs.clone())
    });
    for r in &loaded.resources {
        let v = serde_json::to_value(r.to_object().spec).unwrap_or_default();
        collect_paths(&v, &mut |p| {
            if let Some(parent) = Path::new(p).parent() {
                dirs.insert(parent.to_path_buf());
            }
        });
    }
    dirs.into_iter().filter(|d| d.is_dir()).collect()
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
    Changed,
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
            let _ = fs_tx.send(Wake::Changed);
        }
    })
    .map_err(|e| miette::miette!("cannot watch files: {e}"))?;
    let mut dirs = watched_dirs(&a.file, &last);
    for d in &dirs {
        watcher
            .watch(d, notify::RecursiveMode::NonRecursive)
            .map_err(|e| miette::miette!("cannot watch {}: {e}", d.display()))?;
    }
    eprintln!("watching {} for changes (Ctrl-C to stop)", a.file.display());
    let objects =
        |l: &Loaded| -> Vec<Object> { l.resources.iter().map(Resource::to_object).collect() };
    while let Ok(Wake::Changed) = rx.recv() {
        // Debounce: editors write several events per save.
        let mut interrupted = false;
        while let Ok(w) = rx.recv_timeout(Duration::from_millis(100)) {
            if matches!(w, Wake::Interrupted) {
                interrupted = true;
                break;
            }
        }
        if interrupted {
            break;
        }
        let loaded = match vmctl_api::load::load(&a.file) {
            Ok(l) => l,
            Err(vmctl_api::load::LoadError::Invalid(diags)) => {
                for d in diags {
                    eprintln!("{:?}", miette::Report::new(d));
                }
                eprintln!("not applied: the running objects keep the last good spec");
                continue;
            }
            Err(e) => {
                eprintln!("{:?}", miette::Report::new(e));
                continue;
            }
        };
        if objects(&loaded) == objects(&last) {
            continue;
        }
        super::print_warnings(&loaded.warnings);
        let req = request(&loaded, &a.file, a);
        match client
            .call::<ApplyResponse>("POST", "/v1/apply", Some(&req))
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
        let new_dirs = watched_dirs(&a.file, &loaded);
        for d in new_dirs.iter().filter(|d| !dirs.contains(d)) {
            let _ = watcher.watch(d, notify::RecursiveMode::NonRecursive);
        }
        dirs = new_dirs;
        last = loaded;
    }
    eprintln!("stopped watching");
    Ok(ExitCode::SUCCESS)
}
