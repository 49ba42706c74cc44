//! Diagnostics: coded errors with the help of the registry ([`crate::codes`]),
//! and located diagnostics for VMFiles and manifests.
//!
//! A file with five mistakes reports all five at once: [`FileDiagnostics`]
//! is one miette diagnostic naming the file, whose related diagnostics are
//! the individual [`Problem`]s, each with a label on the exact span.

use std::fmt;
use std::sync::{Arc, OnceLock};

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceSpan};

use crate::limits::{MAX_PROBLEMS, MAX_SHOWN_LINE_CHARS, MAX_SHOWN_TEXT_CHARS, clip_text};

pub use crate::validate::Severity;

/// An error with `code` and the registry's help for it.
pub fn error(code: &'static str, message: impl std::fmt::Display) -> miette::Report {
    let mut d = miette::MietteDiagnostic::new(message.to_string()).with_code(code);
    if let Some(h) = crate::codes::help(code) {
        d = d.with_help(h);
    }
    miette::Report::new(d)
}

/// An error with `code` and a specific help line.
pub fn error_help(
    code: &'static str,
    help: impl std::fmt::Display,
    message: impl std::fmt::Display,
) -> miette::Report {
    miette::Report::new(
        miette::MietteDiagnostic::new(message.to_string())
            .with_code(code)
            .with_help(help.to_string()),
    )
}

/// Makes miette print reports as vmctl's programs do: no terminal
/// hyperlinks, long lines wrapped. Call once, first thing in `main`.
pub fn set_report_hook() {
    miette::set_hook(Box::new(|_| {
        Box::new(
            miette::MietteHandlerOpts::new()
                .terminal_links(false)
                .wrap_lines(true)
                .build(),
        )
    }))
    .ok();
}

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
///
/// At most [`MAX_PROBLEMS`] problems are kept (errors before warnings,
/// duplicates dropped); the others are only counted, and rendering ends
/// with "… and N more". Rendering clips long lines around each span
/// ([`MAX_SHOWN_LINE_CHARS`]) and shows only the first line of a span, so
/// any input renders in bounded time and size.
#[derive(Debug, Clone)]
pub struct FileDiagnostics {
    /// The file's name as shown to the user.
    pub file: String,
    source: NamedSource<Arc<String>>,
    /// The problems kept, in source order (at most [`MAX_PROBLEMS`]).
    pub problems: Vec<Problem>,
    /// Boxed to keep `Result<_, FileDiagnostics>` small.
    rest: Box<Rest>,
}

/// What [`FileDiagnostics`] keeps besides the problems.
#[derive(Debug, Clone, Default)]
struct Rest {
    omitted_errors: usize,
    omitted_warnings: usize,
    shown: OnceLock<Vec<Shown>>,
}

impl FileDiagnostics {
    /// Collects problems for the file `name` with the text `src`: drops
    /// duplicates (same span and message) and keeps the first
    /// [`MAX_PROBLEMS`], errors first.
    pub fn new(name: impl Into<String>, src: Arc<String>, mut problems: Vec<Problem>) -> Self {
        let file = name.into();
        problems.sort_by_key(|p| (p.span.offset(), p.span.len()));
        let mut seen = std::collections::HashSet::new();
        problems.retain(|p| seen.insert((p.span.offset(), p.span.len(), p.message.clone())));
        let errors = problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .count();
        let warnings = problems.len() - errors;
        let keep_errors = errors.min(MAX_PROBLEMS);
        let keep_warnings = warnings.min(MAX_PROBLEMS - keep_errors);
        let (mut e, mut w) = (0, 0);
        problems.retain(|p| {
            let (n, max) = match p.severity {
                Severity::Error => (&mut e, keep_errors),
                Severity::Warning => (&mut w, keep_warnings),
            };
            *n += 1;
            *n <= max
        });
        FileDiagnostics {
            source: NamedSource::new(file.clone(), src),
            file,
            problems,
            rest: Box::new(Rest {
                omitted_errors: errors - keep_errors,
                omitted_warnings: warnings - keep_warnings,
                shown: OnceLock::new(),
            }),
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
        self.error_count() > 0
    }

    /// Number of errors, those not kept included.
    pub fn error_count(&self) -> usize {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .count()
            + self.rest.omitted_errors
    }

    /// Number of problems found but not kept (see [`MAX_PROBLEMS`]).
    pub fn omitted(&self) -> usize {
        self.rest.omitted_errors + self.rest.omitted_warnings
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

    fn shown(&self) -> &[Shown] {
        self.rest.shown.get_or_init(|| {
            let mut lines = LineCursor::default();
            let mut out: Vec<Shown> = self
                .problems
                .iter()
                .map(|p| Shown::new(&self.file, self.text(), &mut lines, p))
                .collect();
            if self.omitted() > 0 {
                out.push(Shown::more(self.omitted()));
            }
            out
        })
    }
}

impl fmt::Display for FileDiagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let errors = self.error_count();
        let warnings = self.problems.len() + self.omitted() - errors;
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
        Some(Box::new(self.shown().iter().map(|p| p as &dyn Diagnostic)))
    }
}

/// Finds line numbers of increasing offsets in one pass over the text.
#[derive(Debug, Default)]
struct LineCursor {
    offset: usize,
    line: usize,
}

impl LineCursor {
    /// The 0-based line of `offset` (offsets must not decrease).
    fn line_of(&mut self, text: &str, offset: usize) -> usize {
        if offset < self.offset {
            *self = LineCursor::default();
        }
        self.line += text.as_bytes()[self.offset..offset]
            .iter()
            .filter(|&&c| c == b'\n')
            .count();
        self.offset = offset;
        self.line
    }
}

/// A problem as rendered: texts clipped, and its own source, which is a
/// few lines around the span, each clipped to a window of
/// [`MAX_SHOWN_LINE_CHARS`] characters. (miette pads to the column of a
/// span, and panics past 65,535; it also prints whole lines and every
/// line of a span.)
#[derive(Debug, Clone)]
struct Shown {
    code: Option<&'static str>,
    message: String,
    label: String,
    help: Option<String>,
    severity: miette::Severity,
    span: Option<SourceSpan>,
    snippet: Option<Snippet>,
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Shown {}

impl Diagnostic for Shown {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.code.map(|c| Box::new(c) as Box<dyn fmt::Display>)
    }

    fn severity(&self) -> Option<miette::Severity> {
        Some(self.severity)
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.snippet.as_ref().map(|s| s as &dyn miette::SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let span = self.span?;
        Some(Box::new(std::iter::once(LabeledSpan::new_with_span(
            Some(self.label.clone()),
            span,
        ))))
    }
}

impl Shown {
    fn new(file: &str, text: &str, lines: &mut LineCursor, p: &Problem) -> Self {
        let clip = |s: &str| clip_text(s, MAX_SHOWN_TEXT_CHARS).into_owned();
        let (snippet, span) = Snippet::around(file, text, lines, p.span);
        Shown {
            code: Some(p.code),
            message: clip(&p.message),
            label: clip(&p.label),
            help: p.help.as_deref().map(clip),
            severity: match p.severity {
                Severity::Error => miette::Severity::Error,
                Severity::Warning => miette::Severity::Warning,
            },
            span: Some(span),
            snippet: Some(snippet),
        }
    }

    fn more(n: usize) -> Self {
        Shown {
            code: None,
            message: format!("… and {n} more (only the first {MAX_PROBLEMS} problems are shown)"),
            label: String::new(),
            help: Some("fix these and run again to see the rest".into()),
            severity: miette::Severity::Advice,
            span: None,
            snippet: None,
        }
    }
}

/// A few clipped lines of a file, which report their original line and
/// column numbers to miette.
#[derive(Debug, Clone)]
struct Snippet {
    name: String,
    text: String,
    /// Per snippet line: its byte offset in `text`, its 0-based line in
    /// the file, and the character column of the file its first character is.
    lines: Vec<(usize, usize, usize)>,
}

impl Snippet {
    /// The snippet around `span` of `text` (the line of its start, with one
    /// line of context each side) and the span within the snippet.
    fn around(
        name: &str,
        text: &str,
        cursor: &mut LineCursor,
        span: SourceSpan,
    ) -> (Snippet, SourceSpan) {
        let floor = |mut i: usize| {
            i = i.min(text.len());
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            i
        };
        let start = floor(span.offset());
        let line_no = cursor.line_of(text, start);
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        // Only the first line of a span is shown.
        let end = floor(span.offset().saturating_add(span.len())).clamp(start, line_end);
        let col = text[line_start..start].chars().count();
        let width = MAX_SHOWN_LINE_CHARS;
        let first = if text[line_start..line_end].chars().count() <= width {
            0
        } else {
            col.saturating_sub(width / 3)
        };
        let mut snippet = Snippet {
            name: name.to_owned(),
            text: String::new(),
            lines: Vec::new(),
        };
        let prev = (line_start > 0).then(|| {
            let s = text[..line_start - 1].rfind('\n').map_or(0, |i| i + 1);
            &text[s..line_start - 1]
        });
        let next = (line_end < text.len()).then(|| {
            let rest = &text[line_end + 1..];
            &rest[..rest.find('\n').unwrap_or(rest.len())]
        });
        if let Some(p) = prev {
            snippet.push(p, line_no - 1, first, width);
            snippet.text.push('\n');
        }
        let at = snippet.text.len();
        snippet.push(&text[line_start..line_end], line_no, first, width);
        let line = &snippet.text[at..];
        // Byte offset in the snippet line of the character `c` of the file's line.
        let byte_of = |c: usize| {
            line.char_indices()
                .nth(c.saturating_sub(first))
                .map_or(line.len(), |(i, _)| i)
        };
        let s = at + byte_of(col);
        let e_col = col + text[start..end].chars().count();
        let e = (at + byte_of(e_col)).max(s);
        if let Some(n) = next {
            snippet.text.push('\n');
            snippet.push(n, line_no + 1, first, width);
        }
        (snippet, (s, e - s).into())
    }

    /// Appends the characters `first..first + width` of `line`, marking
    /// cut ends with `…` (in place of a character, so columns stay) and
    /// showing control characters as `�`.
    fn push(&mut self, line: &str, line_no: usize, first: usize, width: usize) {
        self.lines.push((self.text.len(), line_no, first));
        let line = line.strip_suffix('\r').unwrap_or(line);
        let total = line.chars().count();
        let last = (first + width).min(total);
        for (k, c) in line.chars().enumerate().skip(first).take(width) {
            let cut_before = k == first && first > 0;
            let cut_after = k + 1 == last && last < total;
            self.text.push(if cut_before || cut_after {
                '…'
            } else if c.is_control() && c != '\t' {
                '\u{FFFD}'
            } else {
                c
            });
        }
    }
}

impl miette::SourceCode for Snippet {
    fn read_span<'a>(
        &'a self,
        span: &SourceSpan,
        context_lines_before: usize,
        context_lines_after: usize,
    ) -> Result<Box<dyn miette::SpanContents<'a> + 'a>, miette::MietteError> {
        let inner =
            self.text
                .as_str()
                .read_span(span, context_lines_before, context_lines_after)?;
        let offset = inner.span().offset();
        let idx = self
            .lines
            .partition_point(|(start, _, _)| *start <= offset)
            .saturating_sub(1);
        let (start, line, first) = self.lines.get(idx).copied().unwrap_or((0, 0, 0));
        let column = first + self.text[start..offset.max(start)].chars().count();
        Ok(Box::new(miette::MietteSpanContents::new_named(
            self.name.clone(),
            inner.data(),
            *inner.span(),
            line,
            column,
            inner.line_count(),
        )))
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
