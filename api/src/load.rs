//! Loading resources from a path: a VMFile, a manifest, a directory of
//! them, or standard input.

use std::io::Read;
use std::path::{Path, PathBuf};

use miette::Diagnostic;

use crate::diag::FileDiagnostics;
use crate::limits::{MAX_SOURCE_BYTES, human_bytes};
use crate::resources::Resource;

/// The name of the VMFile looked for in the current directory.
pub const VMFILE_NAME: &str = "VMFile.kdl";

/// What a file format is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// VMFile.kdl.
    Kdl,
    /// A YAML or JSON manifest.
    Manifest,
}

/// Why resources could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The named file does not exist.
    #[error("{} not found", path.display())]
    NotFound {
        /// The path that was looked for.
        path: PathBuf,
    },
    /// The file exists but could not be read.
    #[error("cannot read {}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_SOURCE_BYTES`].
    #[error("{} is larger than {} (vmctl reads VMFiles and manifests up to that size)", path.display(), human_bytes(MAX_SOURCE_BYTES))]
    TooLarge {
        /// The path (`-` for standard input).
        path: PathBuf,
    },
    /// A directory held no VMFiles or manifests.
    #[error("{} holds no .kdl, .yaml, .yml or .json files", path.display())]
    EmptyDir {
        /// The directory.
        path: PathBuf,
    },
    /// One or more files have errors.
    #[error("{}", .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FileDiagnostics>),
    /// Two files define the same object.
    #[error("{kind} `{name}` is defined in both {first} and {second}")]
    Duplicate {
        /// Kind of the object.
        kind: String,
        /// Its name.
        name: String,
        /// The first file.
        first: String,
        /// The second file.
        second: String,
    },
}

impl LoadError {
    /// The diagnostic code: for invalid files, that of the first error
    /// (`vmctl::vmfile::parse_failed` for a KDL syntax error).
    pub fn code(&self) -> &'static str {
        match self {
            LoadError::NotFound { .. } | LoadError::EmptyDir { .. } => "vmctl::vmfile::not_found",
            LoadError::Io { .. } => "vmctl::io",
            LoadError::TooLarge { .. } => "vmctl::vmfile::too_large",
            LoadError::Invalid(files) => files
                .iter()
                .flat_map(|f| &f.problems)
                .find(|p| p.severity == crate::validate::Severity::Error)
                .map_or("vmctl::vmfile::validation", |p| p.code),
            LoadError::Duplicate { .. } => "vmctl::vmfile::validation",
        }
    }
}

impl Diagnostic for LoadError {
    fn code<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        Some(Box::new(LoadError::code(self)))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        let help = match self {
            LoadError::EmptyDir { .. } => "name a file, or a directory with VMFiles or manifests",
            LoadError::Io { .. } => "check the file's permissions",
            LoadError::Duplicate { .. } => "names must be unique across the files applied together",
            LoadError::NotFound { .. } | LoadError::Invalid(_) | LoadError::TooLarge { .. } => {
                crate::codes::help(LoadError::code(self))?
            }
        };
        Some(Box::new(help))
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        match self {
            LoadError::Invalid(files) => Some(Box::new(files.iter().map(|d| d as &dyn Diagnostic))),
            _ => None,
        }
    }
}

/// Resources loaded from one or more files.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The resources, in file order.
    pub resources: Vec<Resource>,
    /// The source file of each resource (same index).
    pub sources: Vec<String>,
    /// Names of the VMs defined by VMFiles, in file order.
    pub vm_names: Vec<String>,
    /// Warnings of files that were accepted.
    pub warnings: Vec<FileDiagnostics>,
    /// Every source read, as read: [`Loaded::check_backend`] parses them
    /// again (stdin cannot be read twice).
    pub texts: Vec<SourceText>,
}

/// One source file's text, kept by [`load`] and [`parse_text`].
#[derive(Debug, Clone)]
pub struct SourceText {
    /// The file (`<cwd>/stdin` for standard input).
    pub path: PathBuf,
    /// Its name as shown to the user.
    pub display: String,
    /// Its text.
    pub text: String,
}

impl Loaded {
    /// Checks the loaded resources against what `backend` can run
    /// ([`crate::validate::for_backend`]). When one cannot run, the sources
    /// are parsed again with the backend known, so each problem is shown at
    /// its place in its file, as any other validation error.
    ///
    /// # Errors
    /// [`LoadError::Invalid`] with every file's diagnostics when a resource
    /// asks for something `backend` cannot do.
    pub fn check_backend(&self, backend: crate::validate::Backend) -> Result<(), LoadError> {
        if self
            .resources
            .iter()
            .all(|r| crate::validate::for_backend(r, backend).is_empty())
        {
            return Ok(());
        }
        let mut again = Loaded::default();
        let invalid: Vec<FileDiagnostics> = self
            .texts
            .iter()
            .filter_map(|t| {
                parse_text_for(&t.path, &t.display, &t.text, Some(backend), &mut again).err()
            })
            .collect();
        if invalid.is_empty() {
            // Cannot happen (the same texts, now with the backend's checks);
            // the agent's apply refuses such an object anyway.
            return Ok(());
        }
        Err(LoadError::Invalid(invalid))
    }
}

/// Guesses the format of `path` with content `text`.
pub fn detect_format(path: &Path, text: &str) -> Format {
    match path.extension().and_then(|e| e.to_str()) {
        Some("kdl") => Format::Kdl,
        Some("yaml" | "yml" | "json") => Format::Manifest,
        _ => {
            let first = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("//"));
            match first {
                Some(l) if l.starts_with("vm ") || l.starts_with("vm\t") || l.starts_with("/*") => {
                    Format::Kdl
                }
                _ => Format::Manifest,
            }
        }
    }
}

/// Parses `text` of the file `path` (shown to the user as `display`).
pub fn parse_text(
    path: &Path,
    display: &str,
    text: &str,
    into: &mut Loaded,
) -> Result<(), FileDiagnostics> {
    parse_text_for(path, display, text, None, into)
}

/// [`parse_text`], with the checks of `backend` when it is known.
pub fn parse_text_for(
    path: &Path,
    display: &str,
    text: &str,
    backend: Option<crate::validate::Backend>,
    into: &mut Loaded,
) -> Result<(), FileDiagnostics> {
    into.texts.push(SourceText {
        path: path.to_owned(),
        display: display.to_owned(),
        text: text.to_owned(),
    });
    match detect_format(path, text) {
        Format::Kdl => {
            let ctx = crate::vmfile::Context {
                backend,
                ..crate::vmfile::Context::for_file(path)
            };
            let t = crate::vmfile::parse(display, text, &ctx)?;
            into.sources
                .extend(std::iter::repeat_n(display.to_owned(), t.resources.len()));
            into.resources.extend(t.resources);
            into.vm_names.extend(t.vm_names);
            into.warnings.extend(t.warnings);
        }
        Format::Manifest => {
            let (res, warnings) = crate::manifest::parse_for(display, text, backend)?;
            into.sources
                .extend(std::iter::repeat_n(display.to_owned(), res.len()));
            into.resources.extend(res);
            into.warnings.extend(warnings);
        }
    }
    Ok(())
}

/// Reads a whole source (VMFile or manifest) as UTF-8, at most
/// [`MAX_SOURCE_BYTES`]: a named `/dev/zero` ends with
/// [`LoadError::TooLarge`] instead of exhausting memory.
fn read_source(mut r: impl std::io::Read, path: &Path) -> Result<String, LoadError> {
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => LoadError::NotFound { path: path.into() },
        _ => LoadError::Io {
            path: path.into(),
            source,
        },
    };
    let mut bytes = Vec::new();
    std::io::Read::take(&mut r, MAX_SOURCE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_SOURCE_BYTES {
        return Err(LoadError::TooLarge { path: path.into() });
    }
    String::from_utf8(bytes).map_err(|e| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "it is not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        ))
    })
}

/// Loads a file, every VMFile/manifest of a directory (sorted), or stdin
/// for `-`. Every parser entry goes through here or [`parse_text`], which
/// bound size, nesting and the number of problems (see [`crate::limits`]).
pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    let mut loaded = Loaded::default();
    let mut invalid = Vec::new();
    let files: Vec<PathBuf> = if path == Path::new("-") {
        let text = read_source(std::io::stdin().lock(), path)?;
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        if let Err(d) = parse_text(&cwd.join("stdin"), "<stdin>", &text, &mut loaded) {
            invalid.push(d);
        }
        Vec::new()
    } else if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|source| LoadError::Io {
                path: path.into(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("kdl" | "yaml" | "yml" | "json")
                ) && p.is_file()
            })
            .collect();
        v.sort();
        if v.is_empty() {
            return Err(LoadError::EmptyDir { path: path.into() });
        }
        v
    } else {
        vec![path.to_path_buf()]
    };
    for f in files {
        // A named FIFO (`-f <(…)`) is read like a file; size is bounded.
        let file = std::fs::File::open(&f).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => LoadError::NotFound { path: f.clone() },
            _ => LoadError::Io {
                path: f.clone(),
                source,
            },
        })?;
        let text = read_source(file, &f)?;
        if let Err(d) = parse_text(&f, &f.display().to_string(), &text, &mut loaded) {
            invalid.push(d);
        }
    }
    if !invalid.is_empty() {
        return Err(LoadError::Invalid(invalid));
    }
    let mut seen = std::collections::HashMap::new();
    for (r, src) in loaded.resources.iter().zip(&loaded.sources) {
        let key = (r.kind(), r.name().to_owned());
        if let Some(first) = seen.insert(key, src.clone()) {
            // Images derived from one source are identical; anything else is a clash.
            if r.kind() != crate::meta::Kind::Image {
                return Err(LoadError::Duplicate {
                    kind: r.kind().to_string(),
                    name: r.name().to_owned(),
                    first,
                    second: src.clone(),
                });
            }
        }
    }
    Ok(loaded)
}
