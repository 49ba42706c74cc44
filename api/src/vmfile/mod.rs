//! VMFile.kdl → typed resources.
//!
//! Reading happens in two passes. The first walks the KDL tree and builds
//! typed specs, recording the span of every field it fills (`SpanMap`). The
//! second runs the shared validation of [`crate::validate`] and maps each
//! finding's field path back to a span. Every problem of the file is
//! collected, so five mistakes are reported in one run.

mod guard;
mod reader;
mod vm;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kdl::KdlDocument;
use miette::SourceSpan;

use crate::diag::{FileDiagnostics, Problem};
use crate::resources::{Image, ImageSource, ImageSpec, Resource};
use crate::validate::{Severity, validate};

pub use reader::CODE as VALIDATION_CODE;
pub use vm::digest_file as digest;

/// Diagnostic code of KDL syntax errors.
pub const PARSE_CODE: &str = "vmctl::vmfile::parse_failed";

/// Where a VMFile lives, for resolving the paths it names.
#[derive(Debug, Clone)]
pub struct Context {
    /// The directory relative paths are resolved against.
    pub base_dir: PathBuf,
    /// The home directory `~` expands to.
    pub home: Option<PathBuf>,
    /// The backend that will run the VMs, when known: its checks
    /// ([`crate::validate::for_backend`]) are located in the file too.
    pub backend: Option<crate::validate::Backend>,
}

impl Context {
    /// The context of a VMFile at `path`, with `~` from `$HOME`.
    pub fn for_file(path: &Path) -> Self {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base_dir = abs
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        Context {
            base_dir,
            home: std::env::var_os("HOME").map(PathBuf::from),
            backend: None,
        }
    }

    /// Resolves a path as written in the VMFile.
    pub fn resolve(&self, p: &str) -> PathBuf {
        let expanded = match (p.strip_prefix('~'), &self.home) {
            (Some(rest), Some(home)) if rest.is_empty() || rest.starts_with('/') => {
                home.join(rest.trim_start_matches('/'))
            }
            _ => PathBuf::from(p),
        };
        let joined = if expanded.is_absolute() {
            expanded
        } else {
            self.base_dir.join(expanded)
        };
        // Lexical clean-up of `.` components only: `..` is kept because
        // symlinks make its lexical removal wrong.
        joined
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect()
    }
}

/// What a VMFile became.
#[derive(Debug, Clone)]
pub struct Translation {
    /// The resources, Images first, then each VM followed by its Provision.
    pub resources: Vec<Resource>,
    /// The names of the VMs, in file order.
    pub vm_names: Vec<String>,
    /// Warnings (no errors: a file with errors does not translate).
    pub warnings: Option<FileDiagnostics>,
}

/// Field path → span, per resource, for locating validation findings.
pub(crate) type SpanMap = HashMap<String, SourceSpan>;

/// Parses and translates the VMFile text `src` named `file`.
pub fn parse(file: &str, src: &str, ctx: &Context) -> Result<Translation, FileDiagnostics> {
    let src = Arc::new(src.to_owned());
    // The KDL parser is only safe on structurally sound text: see `guard`.
    let unsound = guard::check(&src);
    if !unsound.is_empty() {
        return Err(FileDiagnostics::new(file, src, unsound));
    }
    let doc = match KdlDocument::parse_v2(&src) {
        Ok(doc) => doc,
        Err(e) => {
            let problems = e
                .diagnostics
                .iter()
                .map(|d| {
                    Problem::error(
                        PARSE_CODE,
                        d.span,
                        d.message.clone().unwrap_or_else(|| "invalid KDL".into()),
                    )
                    .label(d.label.clone().unwrap_or_else(|| "here".into()))
                    .help(d.help.clone().unwrap_or_else(|| {
                        "check the KDL syntax (https://kdl.dev); strings need double quotes".into()
                    }))
                })
                .collect();
            return Err(FileDiagnostics::new(file, src, problems));
        }
    };
    let mut rd = reader::Reader::new(src.clone());
    let mut drafts: Vec<vm::VmDraft> = Vec::new();
    let mut seen: HashMap<String, SourceSpan> = HashMap::new();
    for node in doc.nodes() {
        if node.name().value() != "vm" {
            rd.unknown_node(node, "a VMFile", &["vm"]);
            continue;
        }
        if let Some(d) = vm::read_vm(&mut rd, node, ctx) {
            if let Some(first) = seen.get(&d.name.value) {
                rd.push(
                    Problem::error(
                        reader::CODE,
                        d.name.span,
                        format!("VM name `{}` is used twice", d.name.value),
                    )
                    .label("duplicate name")
                    .help(format!(
                        "VM names must be unique in a file; the first is at offset {}",
                        first.offset()
                    )),
                );
            } else {
                seen.insert(d.name.value.clone(), d.name.span);
            }
            drafts.push(d);
        }
    }
    if doc.nodes().is_empty() {
        rd.push(
            Problem::error(reader::CODE, (0, 0), "the VMFile defines no VMs")
                .label("empty file")
                .help("add a block like `vm \"dev\" { image-url \"https://…/image.qcow2\" }`"),
        );
    }

    let images = share_images(&mut rd, &drafts);
    let mut resources = Vec::new();
    for (img, spans) in images.values() {
        resources.push((Resource::Image(img.clone()), spans.clone()));
    }
    let mut vm_names = Vec::new();
    for d in drafts {
        vm_names.push(d.name.value.clone());
        let image_name = images
            .get(&source_key(
                &d.image_source.as_ref().map(|s| s.value.clone()),
            ))
            .map(|(img, _)| img.metadata.name.clone());
        resources.extend(d.into_resources(image_name));
    }
    for (res, spans) in &resources {
        let for_backend = ctx
            .backend
            .map(|b| crate::validate::for_backend(res, b))
            .unwrap_or_default();
        for fe in validate(res).into_iter().chain(for_backend) {
            let span = locate(spans, &fe.path);
            let mut p = Problem::error(reader::CODE, span, fe.message).maybe_help(fe.help);
            if fe.severity == Severity::Warning {
                p = p.warning();
            }
            rd.push(p);
        }
    }
    for (i, fe) in crate::validate::port_clashes(resources.iter().map(|(r, _)| r)) {
        let span = locate(&resources[i].1, &fe.path);
        rd.push(Problem::error(reader::CODE, span, fe.message).maybe_help(fe.help));
    }
    // The same span can be reported by both passes (e.g. a bad VM name is
    // also a bad Provision name): keep the first of each.
    let mut seen_msgs = std::collections::HashSet::new();
    let problems: Vec<Problem> = rd
        .problems
        .into_iter()
        .filter(|p| seen_msgs.insert((p.span.offset(), p.message.clone())))
        .collect();
    let diags = FileDiagnostics::new(file, src, problems);
    if diags.has_errors() {
        return Err(diags);
    }
    Ok(Translation {
        resources: resources.into_iter().map(|(r, _)| r).collect(),
        vm_names,
        warnings: (!diags.problems.is_empty()).then_some(diags),
    })
}

/// Finds the span of `path`, or of its closest enclosing field.
fn locate(spans: &SpanMap, path: &str) -> SourceSpan {
    let mut p = path.to_owned();
    loop {
        if let Some(s) = spans.get(&p) {
            return *s;
        }
        match p.rfind(['.', '[']) {
            Some(i) => p.truncate(i),
            None => return spans.get("").copied().unwrap_or_else(|| (0, 0).into()),
        }
    }
}

/// The cache key of an image source.
fn source_key(src: &Option<ImageSource>) -> String {
    match src {
        Some(ImageSource::Url { url: u }) => format!("url:{u}"),
        Some(ImageSource::Path { path: p }) => format!("path:{p}"),
        None => String::new(),
    }
}

/// One Image per distinct source; two VMs with one URL share it. Their
/// checksums must agree.
fn share_images(
    rd: &mut reader::Reader,
    drafts: &[vm::VmDraft],
) -> BTreeMap<String, (Image, SpanMap)> {
    let mut out: BTreeMap<String, (Image, SpanMap)> = BTreeMap::new();
    for d in drafts {
        let Some(src) = &d.image_source else { continue };
        let key = source_key(&Some(src.value.clone()));
        let checksum = d.checksum.as_ref().map(|c| c.value.clone());
        if let Some((img, _)) = out.get(&key) {
            if img.spec.checksum.is_some() && checksum.is_some() && img.spec.checksum != checksum {
                let span = d.checksum.as_ref().map(|c| c.span).unwrap_or(src.span);
                rd.push(
                    Problem::error(
                        reader::CODE,
                        span,
                        "two VMs give different checksums for the same image",
                    )
                    .label("conflicting checksum")
                    .help("one image source has one content: make the checksums agree"),
                );
            }
            continue;
        }
        let name = crate::names::image_name(&src.value);
        let mut spans = SpanMap::new();
        spans.insert(String::new(), src.span);
        let path = match &src.value {
            ImageSource::Url { .. } => "spec.source.url",
            ImageSource::Path { .. } => "spec.source.path",
        };
        spans.insert(path.to_owned(), src.span);
        if let Some(c) = &d.checksum {
            spans.insert("spec.checksum".to_owned(), c.span);
        }
        let img = Image::new(
            name,
            ImageSpec {
                source: src.value.clone(),
                checksum,
            },
        );
        out.insert(key, (img, spans));
    }
    out
}

#[cfg(test)]
mod tests;
