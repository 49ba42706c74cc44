//! Small typed readers over KDL nodes that record a located [`Problem`] for
//! every mistake instead of stopping at the first one.

use std::collections::HashMap;

use kdl::{KdlEntry, KdlNode, KdlValue};
use miette::SourceSpan;

use crate::diag::{Problem, did_you_mean};

/// Diagnostic code of every VMFile validation problem.
pub const CODE: &str = "vmctl::vmfile::validation";

/// A value with the span it came from.
#[derive(Debug, Clone)]
pub struct Spanned<T> {
    /// The value.
    pub value: T,
    /// Where it is in the file.
    pub span: SourceSpan,
}

/// Collects problems while reading one file.
#[derive(Debug)]
pub struct Reader {
    /// The source text.
    pub src: std::sync::Arc<String>,
    /// Problems found so far.
    pub problems: Vec<Problem>,
}

/// The entries of a node, split into arguments and properties.
#[derive(Debug)]
pub struct Entries<'a> {
    /// Positional arguments.
    pub args: Vec<&'a KdlEntry>,
    /// Properties by name.
    pub props: HashMap<String, &'a KdlEntry>,
}

fn type_name(v: &KdlValue) -> &'static str {
    match v {
        KdlValue::String(_) => "a string",
        KdlValue::Integer(_) => "an integer",
        KdlValue::Float(_) => "a number with a fraction",
        KdlValue::Bool(_) => "a boolean",
        KdlValue::Null => "#null",
    }
}

/// The span of a node's name only, for labels that point at the node.
pub fn name_span(node: &KdlNode) -> SourceSpan {
    node.name().span()
}

/// The span of an entry's value within `src`, without the leading
/// whitespace and the `key=` part of a property.
pub fn value_span(src: &str, entry: &KdlEntry) -> SourceSpan {
    let span = entry.span();
    let Some(fmt) = entry.format() else {
        return span;
    };
    let repr = fmt.value_repr.as_str();
    let text = src
        .get(span.offset()..span.offset() + span.len())
        .unwrap_or("");
    match (repr.is_empty(), text.rfind(repr)) {
        (false, Some(at)) => (span.offset() + at, repr.len()).into(),
        _ => span,
    }
}

impl Reader {
    /// A reader over `src`.
    pub fn new(src: std::sync::Arc<String>) -> Self {
        Reader {
            src,
            problems: Vec::new(),
        }
    }

    /// The span of an entry's value.
    pub fn vspan(&self, entry: &KdlEntry) -> SourceSpan {
        value_span(&self.src, entry)
    }

    /// Records a problem.
    pub fn push(&mut self, p: Problem) {
        self.problems.push(p);
    }

    /// Records an error at `span`.
    pub fn error(&mut self, span: SourceSpan, message: impl Into<String>, help: impl Into<String>) {
        self.problems
            .push(Problem::error(CODE, span, message).help(help));
    }

    /// Splits a node's entries, reporting duplicate and unknown properties
    /// and more positional arguments than `max_args`.
    pub fn entries<'a>(
        &mut self,
        node: &'a KdlNode,
        allowed_props: &[&str],
        max_args: usize,
    ) -> Entries<'a> {
        let mut out = Entries {
            args: Vec::new(),
            props: HashMap::new(),
        };
        let node_name = node.name().value();
        for e in node.entries() {
            match e.name() {
                None => {
                    if out.args.len() == max_args {
                        let what = match max_args {
                            0 => format!("`{node_name}` takes no arguments"),
                            1 => format!("`{node_name}` takes one argument"),
                            n => format!("`{node_name}` takes at most {n} arguments"),
                        };
                        self.error(
                            value_span(&self.src, e),
                            format!("unexpected argument: {what}"),
                            "remove the extra value",
                        );
                    } else {
                        out.args.push(e);
                    }
                }
                Some(key) => {
                    let key = key.value();
                    if !allowed_props.contains(&key) {
                        let help = match did_you_mean(key, allowed_props) {
                            Some(s) => format!("did you mean `{s}`?"),
                            None if allowed_props.is_empty() => {
                                format!("`{node_name}` has no properties")
                            }
                            None => format!("`{node_name}` accepts: {}", allowed_props.join(", ")),
                        };
                        self.push(
                            Problem::error(
                                CODE,
                                e.span(),
                                format!("unknown property `{key}` on `{node_name}`"),
                            )
                            .label("unknown property")
                            .help(help),
                        );
                    } else if out.props.insert(key.to_owned(), e).is_some() {
                        self.error(
                            e.span(),
                            format!("property `{key}` is given twice"),
                            "keep one of them",
                        );
                    }
                }
            }
        }
        out
    }

    /// Reports children on a node that takes none.
    pub fn no_children(&mut self, node: &KdlNode) {
        if let Some(c) = node.children() {
            self.error(
                c.span(),
                format!("`{}` does not take a block", node.name().value()),
                "remove the `{ … }` block",
            );
        }
    }

    /// Reads the single argument of a leaf node (`vcpus 2`), reporting a
    /// missing value, extra values, properties and children.
    pub fn leaf<'a>(&mut self, node: &'a KdlNode, example: &str) -> Option<&'a KdlEntry> {
        let entries = self.entries(node, &[], 1);
        self.no_children(node);
        let first = entries.args.first().copied();
        if first.is_none() {
            self.push(
                Problem::error(
                    CODE,
                    name_span(node),
                    format!("`{}` needs a value", node.name().value()),
                )
                .label("missing value")
                .help(format!("write it as `{example}`")),
            );
        }
        first
    }

    /// Reads a string value.
    pub fn string(&mut self, entry: &KdlEntry, what: &str) -> Option<Spanned<String>> {
        match entry.value() {
            KdlValue::String(s) => Some(Spanned {
                value: s.clone(),
                span: value_span(&self.src, entry),
            }),
            other => {
                self.push(
                    Problem::error(
                        CODE,
                        value_span(&self.src, entry),
                        format!("{what} must be a string, found {}", type_name(other)),
                    )
                    .label("expected a string")
                    .help("put the value in double quotes"),
                );
                None
            }
        }
    }

    /// Reads a non-negative integer that fits in a u64 (ranges are checked
    /// later, so that no value is ever silently truncated).
    pub fn integer(&mut self, entry: &KdlEntry, what: &str) -> Option<Spanned<u64>> {
        let span = value_span(&self.src, entry);
        match entry.value() {
            KdlValue::Integer(i) => match u64::try_from(*i) {
                Ok(v) => Some(Spanned { value: v, span }),
                Err(_) if *i < 0 => {
                    self.push(
                        Problem::error(CODE, span, format!("{what} must be positive, found {i}"))
                            .label("negative")
                            .help("write a whole number of 1 or more, without a sign"),
                    );
                    None
                }
                Err(_) => {
                    self.push(
                        Problem::error(CODE, span, format!("{what} {i} is out of range"))
                            .label("too large")
                            .help("write a smaller whole number"),
                    );
                    None
                }
            },
            other => {
                self.push(
                    Problem::error(
                        CODE,
                        span,
                        format!("{what} must be an integer, found {}", type_name(other)),
                    )
                    .label("expected an integer")
                    .help(format!(
                        "write a whole number without quotes, e.g. `{} 2`",
                        what.split(' ').next().unwrap_or(what)
                    )),
                );
                None
            }
        }
    }

    /// Reports an unknown child node with a suggestion.
    pub fn unknown_node(&mut self, node: &KdlNode, context: &str, known: &[&str]) {
        let name = node.name().value();
        let help = match did_you_mean(name, known) {
            Some(s) => format!("did you mean `{s}`?"),
            None => format!("{context} accepts: {}", known.join(", ")),
        };
        self.push(
            Problem::error(
                CODE,
                name_span(node),
                format!("unknown node `{name}` in {context}"),
            )
            .label("unknown node")
            .help(help),
        );
    }

    /// Reports a node given twice where only one is allowed.
    pub fn duplicate(&mut self, node: &KdlNode, first: SourceSpan) {
        let name = node.name().value();
        let line_hint = format!(
            "`{name}` is already set at offset {}; keep one of them",
            first.offset()
        );
        self.push(
            Problem::error(CODE, name_span(node), format!("`{name}` is given twice"))
                .label("second definition")
                .help(line_hint),
        );
    }
}
