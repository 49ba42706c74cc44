//! Located diagnostics for VMFiles and manifests.
//!
//! A file with five mistakes reports all five at once: [`FileDiagnostics`]
//! is one miette diagnostic naming the file, whose related diagnostics are
//! the individual [`Problem`]s, each with a label on the exact span.

use std::fmt;
use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceSpan};

pub use crate::validate::Severity;

/// One located problem in a source file.
#[derive(Debug, Clone)]
pub struct Problem {
    /// Diagnostic code, e.g. `vmctl::vmfile::validation`.
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
    /// Where, in bytes into the source.
    pub span: SourceSpan,
    /// The text of the label under the span.
    pub label: String,
    /// What to do about it.
    pub help: Option<String>,
    /// Error or warning.
    pub severity: Severity,
}

impl Problem {
    /// An error at `span`.
    pub fn error(
        code: &'static str,
        span: impl Into<SourceSpan>,
        message: impl Into<String>,
    ) -> Self {
        Problem {
            code,
            message: message.into(),
            span: span.into(),
            label: "here".to_owned(),
            help: None,
            severity: Severity::Error,
        }
    }

    /// Sets the label text.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// Sets the help line.
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Sets the help line if there is one.
    pub fn maybe_help(mut self, help: Option<String>) -> Self {
        self.help = help;
        self
    }

    /// Makes this a warning.
    pub fn warning(mut self) -> Self {
        self.severity = Severity::Warning;
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Problem {}

impl Diagnostic for Problem {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.code))
    }

    fn severity(&self) -> Option<miette::Severity> {
        Some(match self.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        })
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        Some(Box::new(std::iter::once(LabeledSpan::new_with_span(
            Some(self.label.clone()),
            self.span,
        ))))
    }
}

/// Every problem found in one file.
#[derive(Debug, Clone)]
pub struct FileDiagnostics {
    /// The file's name as shown to the user.
    pub file: String,
    source: NamedSource<Arc<String>>,
    /// The problems, in source order.
    pub problems: Vec<Problem>,
}

impl FileDiagnostics {
    /// Collects problems for the file `name` with the text `src`.
    pub fn new(name: impl Into<String>, src: Arc<String>, mut problems: Vec<Problem>) -> Self {
        let file = name.into();
        problems.sort_by_key(|p| (p.span.offset(), p.span.len()));
        FileDiagnostics {
            source: NamedSource::new(file.clone(), src),
            file,
            problems,
        }
    }

    /// The text of the file.
    pub fn text(&self) -> &str {
        self.source.inner().as_str()
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = self.text().get(..offset).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let column = before
            .rsplit('\n')
            .next()
            .map(|l| l.chars().count())
            .unwrap_or(0)
            + 1;
        (line, column)
    }

    /// Whether any problem is an error (warnings alone do not reject a file).
    pub fn has_errors(&self) -> bool {
        self.problems.iter().any(|p| p.severity == Severity::Error)
    }

    /// Number of errors.
    pub fn error_count(&self) -> usize {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .count()
    }

    /// Renders the diagnostics as plain text without colours (for tests and logs).
    pub fn render_plain(&self) -> String {
        let handler =
            miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
                .with_width(100);
        let mut out = String::new();
        handler
            .render_report(&mut out, self)
            .expect("rendering to a String cannot fail");
        out
    }
}

impl fmt::Display for FileDiagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let errors = self.error_count();
        let warnings = self.problems.len() - errors;
        let plural = |n: usize, w: &str| {
            if n == 1 {
                format!("{n} {w}")
            } else {
                format!("{n} {w}s")
            }
        };
        match (errors, warnings) {
            (0, w) => write!(f, "{}: {}", self.file, plural(w, "warning")),
            (e, 0) => write!(f, "{} is invalid: {}", self.file, plural(e, "error")),
            (e, w) => write!(
                f,
                "{} is invalid: {}, {}",
                self.file,
                plural(e, "error"),
                plural(w, "warning")
            ),
        }
    }
}

impl std::error::Error for FileDiagnostics {}

impl Diagnostic for FileDiagnostics {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        let code = self
            .problems
            .iter()
            .find(|p| p.severity == Severity::Error)
            .map(|p| p.code);
        Some(Box::new(code.unwrap_or("vmctl::vmfile::warning")))
    }

    fn severity(&self) -> Option<miette::Severity> {
        Some(if self.has_errors() {
            miette::Severity::Error
        } else {
            miette::Severity::Warning
        })
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.source)
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        Some(Box::new(self.problems.iter().map(|p| p as &dyn Diagnostic)))
    }
}

/// Suggests the closest of `candidates` to `input`, if it is close enough.
pub fn did_you_mean<'a>(input: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(input, c), *c))
        .filter(|(score, _)| *score > 0.75)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}
