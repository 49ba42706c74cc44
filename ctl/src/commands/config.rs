//! `vmctl config`: the contexts file ([`crate::contexts`]), as kubectl's
//! `config get-contexts`, `current-context`, `use-context`,
//! `set-context` and `delete-context`.

use std::process::ExitCode;

use super::Globals;
use crate::cli::{ConfigCommand, Output};
use crate::contexts::{Context, ContextError, ContextsFile, LOCAL};

/// A [`ContextError`] as a diagnostic.
pub(crate) fn context_error(e: ContextError) -> miette::Report {
    crate::diag::error_help(
        "vmctl::config::contexts",
        e.help(),
        vmctl_api::error_chain(&e),
    )
}

/// Runs a `vmctl config` command.
pub fn run(g: &Globals, command: ConfigCommand) -> miette::Result<ExitCode> {
    let path = g.contexts_file();
    let mut file = ContextsFile::load(&path).map_err(context_error)?;
    match command {
        ConfigCommand::GetContexts { output } => {
            let text = match output {
                Output::Text => table(&file),
                Output::Yaml => serde_yaml::to_string(&file.contexts).expect("contexts serialise"),
                Output::Json => {
                    let mut t =
                        serde_json::to_string_pretty(&file.contexts).expect("contexts serialise");
                    t.push('\n');
                    t
                }
            };
            crate::output::print(&text)?;
        }
        ConfigCommand::CurrentContext => {
            let name = file.current_context.as_deref().unwrap_or(LOCAL);
            crate::output::print(&format!("{name}\n"))?;
        }
        ConfigCommand::UseContext { name } => {
            if name == LOCAL {
                file.current_context = None;
            } else {
                file.get(&name, &path).map_err(context_error)?;
                file.current_context = Some(name.clone());
            }
            file.save(&path).map_err(context_error)?;
            eprintln!("switched to context {name}");
        }
        ConfigCommand::SetContext { name } => {
            set_context(g, &mut file, &name)?;
            file.save(&path).map_err(context_error)?;
            eprintln!("context {name} written to {}", path.display());
        }
        ConfigCommand::DeleteContext { name } => {
            file.get(&name, &path).map_err(context_error)?;
            file.contexts.retain(|c| c.name != name);
            if file.current_context.as_deref() == Some(name.as_str()) {
                file.current_context = None;
            }
            file.save(&path).map_err(context_error)?;
            eprintln!("deleted context {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `CURRENT NAME SERVER USER-CERTIFICATE`, kubectl's columns.
fn table(file: &ContextsFile) -> String {
    let mut rows = vec![vec![
        "CURRENT".to_owned(),
        "NAME".into(),
        "SERVER".into(),
        "CLIENT-CERTIFICATE".into(),
    ]];
    for c in &file.contexts {
        let current = file.current_context.as_deref() == Some(c.name.as_str());
        rows.push(vec![
            if current { "*" } else { "" }.into(),
            c.name.clone(),
            c.server.clone(),
            c.client_certificate.display().to_string(),
        ]);
    }
    let mut widths = [0usize; 4];
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// Adds context `name` from the global flags, or changes the fields given.
fn set_context(g: &Globals, file: &mut ContextsFile, name: &str) -> miette::Result<()> {
    let usage = |msg: String, help: &str| crate::diag::error_help("vmctl::cli::usage", help, msg);
    if name == LOCAL || name.is_empty() {
        return Err(usage(
            format!("a context cannot be named `{name}`"),
            "`local` means the local agent's socket: pick another name",
        ));
    }
    let r = &g.remote;
    if let Some(s) = &r.server {
        crate::contexts::parse_server(s).map_err(context_error)?;
    }
    let abs = |p: &std::path::PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
    let old = file.contexts.iter().find(|c| c.name == name).cloned();
    let context = match old {
        Some(mut c) => {
            if let Some(s) = &r.server {
                c.server = s.clone();
            }
            if let Some(p) = &r.certificate_authority {
                c.certificate_authority = abs(p);
            }
            if let Some(p) = &r.client_certificate {
                c.client_certificate = abs(p);
            }
            if let Some(p) = &r.client_key {
                c.client_key = abs(p);
            }
            c
        }
        None => match (
            &r.server,
            &r.certificate_authority,
            &r.client_certificate,
            &r.client_key,
        ) {
            (Some(s), Some(ca), Some(cert), Some(key)) => Context {
                name: name.to_owned(),
                server: s.clone(),
                certificate_authority: abs(ca),
                client_certificate: abs(cert),
                client_key: abs(key),
            },
            _ => {
                return Err(usage(
                    format!("context {name} is new and needs all of its settings"),
                    "pass --server https://HOST:PORT --certificate-authority CA.crt \
                     --client-certificate USER.crt --client-key USER.key",
                ));
            }
        },
    };
    file.upsert(context);
    Ok(())
}
