//! `vmctl delete KIND NAME | -f FILE`.

use std::path::Path;
use std::process::ExitCode;

use vmctl_api::ObjectRef;

use super::{Globals, kind_arg, name_arg};
use crate::output::print;

/// Requests deletion; objects with finalizers go once controllers clean up.
pub fn run(
    g: &Globals,
    kind: Option<&str>,
    name: Option<&str>,
    file: Option<&Path>,
    wait: Option<std::time::Duration>,
) -> miette::Result<ExitCode> {
    let refs: Vec<ObjectRef> = match (kind, name, file) {
        (_, _, Some(f)) => match super::load_or_report(f)? {
            Ok(l) => l
                .resources
                .iter()
                .rev()
                .map(|r| ObjectRef::new(r.kind(), r.name()))
                .collect(),
            Err(code) => return Ok(code),
        },
        (Some(k), Some(n), None) => {
            name_arg(n)?;
            vec![ObjectRef::new(kind_arg(k)?, n)]
        }
        _ => {
            return Err(miette::miette!(
                code = "vmctl::cli::usage",
                help = "write `vmctl delete vm NAME` or `vmctl delete -f VMFile.kdl`",
                "delete needs a kind and a name, or -f FILE"
            ));
        }
    };
    let client = g.client()?;
    let mut out = String::new();
    for r in &refs {
        let gone: Option<serde_json::Value> = match client.call(
            "DELETE",
            &format!("/v1/objects/{}/{}", r.kind.short(), r.name),
            None::<&()>,
        ) {
            Err(crate::client::ClientError::Api { status: 404, .. }) => {
                return Err(crate::diag::not_found(r.kind, &r.name));
            }
            res => res?,
        };
        let what = if gone.is_some() {
            "deletion requested"
        } else {
            "deleted"
        };
        out.push_str(&format!("{r} {what}\n"));
    }
    print(&out)?;
    if let Some(timeout) = wait {
        let deadline = std::time::Instant::now() + timeout;
        for r in &refs {
            loop {
                let path = format!("/v1/objects/{}/{}", r.kind.short(), r.name);
                match client.call::<serde_json::Value>("GET", &path, None::<&()>) {
                    Err(crate::client::ClientError::Api { status: 404, .. }) => {
                        eprintln!("{r} gone");
                        break;
                    }
                    Err(e) => return Err(e.into()),
                    Ok(o) if std::time::Instant::now() >= deadline => {
                        return Err(miette::miette!(
                            code = "vmctl::delete::timeout",
                            help = format!(
                                "run `vmctl describe {} {}`: its finalizers {} have not run",
                                r.kind.short(),
                                r.name,
                                o["metadata"]["finalizers"]
                            ),
                            "{r} still exists after {}s",
                            timeout.as_secs()
                        ));
                    }
                    Ok(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
