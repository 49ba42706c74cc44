//! YAML (multi-document) and JSON manifests → typed resources, through the
//! same validation as VMFiles.

use std::sync::Arc;

use miette::SourceSpan;
use serde::de::DeserializeOwned;

use crate::diag::{FileDiagnostics, Problem};
use crate::limits::FileUse;
use crate::meta::Kind;
use crate::resources::{Image, Node, Provision, ProvisionStep, Resource, Snapshot, VirtualMachine};
use crate::validate::{Severity, kinds_list, validate};

/// Diagnostic code of manifest problems.
pub const CODE: &str = "vmctl::manifest::invalid";

mod guard;

/// One document of a multi-document YAML stream, with its byte offset.
fn split_documents(src: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in src.split_inclusive('\n') {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") || trimmed == "..." {
            docs.push((start, &src[start..offset]));
            start = offset + line.len();
        }
        offset += line.len();
    }
    docs.push((start, &src[start..]));
    docs.into_iter()
        .filter(|(_, d)| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

/// Best-effort span of a field path (`spec.network.bridge`) in a document:
/// each path segment is searched for as a key after the previous one.
fn locate(doc: &str, base: usize, path: &str) -> SourceSpan {
    let mut pos = 0;
    let mut found = None;
    // `portForwards[2].hostPort`: the third `hostPort:` after `portForwards:`.
    let mut skip = 0;
    for seg in path.split('.') {
        let key = seg.split('[').next().unwrap_or(seg);
        if key.is_empty() {
            continue;
        }
        let pats = [format!("{key}:"), format!("\"{key}\"")];
        let mut hit = None;
        for _ in 0..=skip {
            hit = pats
                .iter()
                .filter_map(|p| doc[pos..].find(p.as_str()).map(|i| (i, p.len())))
                .min();
            match hit {
                Some((i, len)) => pos += i + len,
                None => break,
            }
        }
        match hit {
            Some((_, len)) => found = Some((base + pos - len, len)),
            None => break,
        }
        skip = seg
            .split_once('[')
            .and_then(|(_, i)| i.trim_end_matches(']').parse().ok())
            .unwrap_or(0);
    }
    found.map(Into::into).unwrap_or_else(|| (base, 0).into())
}

fn typed<T: DeserializeOwned>(doc: &str, base: usize, problems: &mut Vec<Problem>) -> Option<T> {
    match serde_yaml::from_str::<T>(doc) {
        Ok(v) => Some(v),
        Err(e) => {
            let span: SourceSpan = match e.location() {
                Some(l) => (base + l.index().min(doc.len()), 1).into(),
                None => (base, 0).into(),
            };
            let msg = e.to_string();
            // serde_yaml appends " at line N column M": the label shows it.
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_owned();
            problems.push(
                Problem::error(CODE, span, msg)
                    .label("here")
                    .help("compare with `vmctl schema` or the files in examples/"),
            );
            None
        }
    }
}

/// Fills in missing content digests of local files so that later edits are
/// visible as spec changes.
fn fill_digests(res: &mut Resource, doc: &str, base: usize, problems: &mut Vec<Problem>) {
    let mut files = Vec::new();
    match res {
        Resource::VirtualMachine(vm) => {
            if let Some(ci) = &mut vm.spec.cloud_init {
                files.extend(ci.ssh_key.as_mut().map(|f| ("sshKey", FileUse::SshKey, f)));
                files.extend(
                    ci.user_data
                        .as_mut()
                        .map(|f| ("userData", FileUse::UserData, f)),
                );
            }
        }
        Resource::Provision(p) => {
            for step in &mut p.spec.steps {
                match step {
                    ProvisionStep::Shell {
                        script: Some(f), ..
                    } => files.push(("script", FileUse::Script, f)),
                    ProvisionStep::File { source, .. } => {
                        files.push(("source", FileUse::Upload, source))
                    }
                    ProvisionStep::Shell { .. } => {}
                }
            }
        }
        Resource::Image(_) | Resource::Snapshot(_) | Resource::Node(_) => {}
    }
    for (key, use_, f) in files {
        if f.digest.is_some() || !f.path.starts_with('/') {
            continue;
        }
        match crate::localfile::digest(std::path::Path::new(&f.path), use_) {
            Ok(d) => f.digest = Some(d),
            Err(e) => problems.push(
                Problem::error(
                    CODE,
                    locate(doc, base, &format!("{key}.path")),
                    match e {
                        crate::localfile::LocalFileError::Io(e) => {
                            format!("cannot read {}: {e}", f.path)
                        }
                        e => format!("{key} {} {e}", f.path),
                    },
                )
                .label("cannot read")
                .help("the file must exist, be a regular file and within its size limit when the manifest is applied"),
            ),
        }
    }
}

/// Checks that the host folder of each share exists now, as a VMFile's
/// reader does (a relative path is already refused by validation).
fn check_shares(res: &Resource, doc: &str, base: usize, problems: &mut Vec<Problem>) {
    let Resource::VirtualMachine(vm) = res else {
        return;
    };
    for (i, sh) in vm.spec.shares.iter().enumerate() {
        if !sh.host_path.starts_with('/') {
            continue;
        }
        if let Err(msg) = crate::validate::check_share_dir(std::path::Path::new(&sh.host_path)) {
            problems.push(
                Problem::error(
                    CODE,
                    locate(doc, base, &format!("spec.shares[{i}].hostPath")),
                    msg,
                )
                .label("not a directory")
                .help("create it, or name an existing directory (an absolute path on the agent's host)"),
            );
        }
    }
}

/// Parses a YAML or JSON manifest named `file`.
pub fn parse(
    file: &str,
    src: &str,
) -> Result<(Vec<Resource>, Option<FileDiagnostics>), FileDiagnostics> {
    parse_for(file, src, None)
}

/// [`parse`], with the checks of `backend` ([`crate::validate::for_backend`])
/// located in the manifest too when it is known.
///
/// # Errors
/// As [`parse`].
pub fn parse_for(
    file: &str,
    src: &str,
    backend: Option<crate::validate::Backend>,
) -> Result<(Vec<Resource>, Option<FileDiagnostics>), FileDiagnostics> {
    let src_arc = Arc::new(src.to_owned());
    // The YAML parser is slow on deep nesting: see `guard`.
    if let Some(p) = guard::check(src) {
        return Err(FileDiagnostics::new(file, src_arc, vec![p]));
    }
    let mut problems = Vec::new();
    let mut out = Vec::new();
    let docs = split_documents(src);
    if docs.is_empty() {
        problems.push(
            Problem::error(CODE, (0, 0), "the manifest has no objects")
                .label("empty")
                .help(format!("a manifest holds objects of kind {}", kinds_list())),
        );
    }
    for (base, doc) in docs {
        let value: serde_yaml::Value = match typed(doc, base, &mut problems) {
            Some(v) => v,
            None => continue,
        };
        // A JSON array (what `vmctl convert -o json` prints) holds several
        // objects, and so does a `List` (what `vmctl get -o json|yaml`
        // prints without a name, as kubectl does) in its `items`.
        let items: Vec<(serde_yaml::Value, bool)> = match value {
            serde_yaml::Value::Sequence(items) => items.into_iter().map(|v| (v, false)).collect(),
            mut v if v.get("kind").and_then(|k| k.as_str()) == Some("List") => {
                match v.get_mut("items").map(std::mem::take) {
                    Some(serde_yaml::Value::Sequence(items)) => {
                        items.into_iter().map(|v| (v, false)).collect()
                    }
                    None | Some(serde_yaml::Value::Null) => Vec::new(),
                    Some(_) => {
                        problems.push(
                            Problem::error(
                                CODE,
                                locate(doc, base, "items"),
                                "the `items` of a List are not a list",
                            )
                            .label("not a list")
                            .help("write `items:` as a list of objects"),
                        );
                        Vec::new()
                    }
                }
            }
            v => vec![(v, true)],
        };
        for (value, whole_doc) in items {
            let Some(mut res) = one_object(doc, base, value, whole_doc, &mut problems) else {
                continue;
            };
            let for_backend = backend
                .map(|b| crate::validate::for_backend(&res, b))
                .unwrap_or_default();
            for fe in validate(&res).into_iter().chain(for_backend) {
                let mut p = Problem::error(
                    CODE,
                    locate(doc, base, &fe.path),
                    format!("{}: {}", fe.path, fe.message),
                )
                .maybe_help(fe.help);
                if fe.severity == Severity::Warning {
                    p = p.warning();
                }
                problems.push(p);
            }
            fill_digests(&mut res, doc, base, &mut problems);
            check_shares(&res, doc, base, &mut problems);
            out.push((res, doc, base));
        }
    }
    for (i, fe) in crate::validate::port_clashes(out.iter().map(|(r, _, _)| r)) {
        let (_, doc, base) = &out[i];
        problems.push(
            Problem::error(
                CODE,
                locate(doc, *base, &fe.path),
                format!("{}: {}", fe.path, fe.message),
            )
            .maybe_help(fe.help),
        );
    }
    let out: Vec<Resource> = out.into_iter().map(|(r, _, _)| r).collect();
    let diags = FileDiagnostics::new(file, src_arc, problems);
    if diags.has_errors() {
        return Err(diags);
    }
    let warnings = (!diags.problems.is_empty()).then_some(diags);
    Ok((out, warnings))
}

/// Reads one object: from the document text when it is the whole document
/// (so errors are located), else from its value.
fn one_object(
    doc: &str,
    base: usize,
    value: serde_yaml::Value,
    whole_doc: bool,
    problems: &mut Vec<Problem>,
) -> Option<Resource> {
    let kind_val = value
        .get("kind")
        .and_then(|k| k.as_str())
        .map(str::to_owned);
    let kind = match kind_val.as_deref().map(|k| (k, Kind::parse(k))) {
        Some((k, Some(kind))) if kind.as_str() == k => kind,
        Some((k, _)) => {
            problems.push(
                Problem::error(
                    CODE,
                    locate(doc, base, "kind"),
                    format!("unknown kind `{k}`"),
                )
                .label("unknown kind")
                .help(format!("kinds are {}", kinds_list())),
            );
            return None;
        }
        None => {
            problems.push(
                Problem::error(CODE, (base, 0), "the object has no `kind`")
                    .label("no kind")
                    .help(format!("add `kind:` with one of {}", kinds_list())),
            );
            return None;
        }
    };
    match kind {
        Kind::VirtualMachine => get::<VirtualMachine>(doc, base, value, whole_doc, problems)
            .map(Resource::VirtualMachine),
        Kind::Image => get::<Image>(doc, base, value, whole_doc, problems).map(Resource::Image),
        Kind::Provision => {
            get::<Provision>(doc, base, value, whole_doc, problems).map(Resource::Provision)
        }
        Kind::Snapshot => {
            get::<Snapshot>(doc, base, value, whole_doc, problems).map(Resource::Snapshot)
        }
        // Read as a Node so that validation refuses it with its reason
        // ("registered by agents"), located at `kind`, whatever its fields.
        Kind::Node => Some(Resource::Node(Node::new(
            value
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(|n| n.as_str())
                .unwrap_or_default(),
            Default::default(),
        ))),
    }
}

fn get<T: DeserializeOwned>(
    doc: &str,
    base: usize,
    value: serde_yaml::Value,
    whole_doc: bool,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    if whole_doc {
        return typed(doc, base, problems);
    }
    serde_yaml::from_value(value)
        .map_err(|e| {
            problems.push(
                Problem::error(CODE, (base, 0), e.to_string()).help("compare with `vmctl schema`"),
            )
        })
        .ok()
}

/// Renders resources as a multi-document YAML stream.
pub fn to_yaml(resources: &[Resource]) -> String {
    let mut out = String::new();
    for (i, r) in resources.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml::to_string(r).expect("resources always serialise"));
    }
    out
}
