//! A nesting check of YAML/JSON text run before the YAML parser.
//!
//! libyaml (under `serde_yaml`) takes time quadratic in the nesting of
//! flow collections (40,000 `[` took 7–11 s) before `serde_yaml`'s own
//! recursion limit of 128 stops it. This linear scan, without recursion,
//! measures the nesting of block levels (by indentation and `- `) and of
//! flow collections (`[`, `{`), skipping quoted strings, comments and
//! block scalars, and stops at [`MAX_NESTING`]. Our own code because the
//! YAML crates offer no nesting limit checked before parsing.

use crate::diag::Problem;
use crate::limits::MAX_NESTING;

use super::CODE;

/// Nesting of brackets counted without reading the YAML at all, past
/// which text is refused even if the reading scan were fooled: it bounds
/// what libyaml can be made to do (no real file has 1,024 unmatched `[`).
const BACKSTOP: usize = 1024;

/// A problem when the text nests deeper than [`MAX_NESTING`], at the
/// place where it first does.
pub fn check(src: &str) -> Option<Problem> {
    scan(src).or_else(|| backstop(src))
}

fn too_deep(at: usize) -> Problem {
    Problem::error(
        CODE,
        (at, 1),
        format!("the manifest is nested too deeply (more than {MAX_NESTING} levels)"),
    )
    .label("too deep")
    .help(format!(
        "a vmctl object nests about 6 levels; vmctl accepts at most {MAX_NESTING} \
         (compare with `vmctl schema`)"
    ))
}

fn backstop(src: &str) -> Option<Problem> {
    let mut depth = 0usize;
    for (i, c) in src.bytes().enumerate() {
        match c {
            b'[' | b'{' => {
                depth += 1;
                if depth > BACKSTOP {
                    return Some(too_deep(i));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

fn scan(src: &str) -> Option<Problem> {
    let b = src.as_bytes();
    let n = b.len();
    let mut flow = 0usize;
    // Indentation of each open block level.
    let mut indents: Vec<usize> = Vec::new();
    let mut line_indent = 0usize;
    // Lines indented more than this belong to a block scalar (`|`, `>`).
    let mut block_scalar: Option<usize> = None;
    let mut line_start = true;
    // Whether the next non-blank character begins a node (so `[`, `{` and
    // quotes are syntax there, not part of a plain scalar).
    let mut node_start = false;
    let mut i = 0;
    while i < n {
        if line_start {
            let ind = b[i..].iter().take_while(|&&c| c == b' ').count();
            let j = i + ind;
            line_start = false;
            match b.get(j) {
                None => break,
                Some(b'\n' | b'\r') => {
                    i = line_end(b, j) + 1;
                    line_start = true;
                    continue;
                }
                Some(b'\t') => {}
                Some(_) => {
                    if let Some(parent) = block_scalar {
                        if ind > parent {
                            i = line_end(b, j);
                            continue;
                        }
                        block_scalar = None;
                    }
                }
            }
            if flow == 0 {
                let rest = &b[j..];
                let marker = |m: &[u8]| {
                    ind == 0
                        && rest.starts_with(m)
                        && rest.get(3).is_none_or(|c| c.is_ascii_whitespace())
                };
                if marker(b"---") || marker(b"...") {
                    indents.clear();
                    node_start = true;
                    i = j + 3;
                    continue;
                }
                if rest[0] == b'#' || (ind == 0 && rest[0] == b'%') {
                    i = line_end(b, j);
                    continue;
                }
                while indents.last().is_some_and(|&top| top >= ind) {
                    indents.pop();
                }
                indents.push(ind);
                if indents.len() > MAX_NESTING {
                    return Some(too_deep(j));
                }
                line_indent = ind;
                node_start = true;
            }
            i = j;
            continue;
        }
        let c = b[i];
        let next_blank = b.get(i + 1).is_none_or(|c| c.is_ascii_whitespace());
        let after_blank = i == 0 || b[i - 1].is_ascii_whitespace();
        match c {
            b'\n' => {
                line_start = true;
                i += 1;
            }
            b' ' | b'\t' | b'\r' => i += 1,
            b'#' if after_blank => i = line_end(b, i),
            b'"' | b'\'' if node_start || (flow > 0 && quote_may_start(b, i)) => {
                match quoted_end(b, i) {
                    Some(end) => i = end,
                    // Unclosed: the parser reports it.
                    None => return None,
                }
                node_start = false;
            }
            b'[' | b'{' if node_start || flow > 0 => {
                flow += 1;
                if indents.len() + flow > MAX_NESTING {
                    return Some(too_deep(i));
                }
                node_start = false;
                i += 1;
            }
            b']' | b'}' if flow > 0 => {
                flow -= 1;
                i += 1;
            }
            b'-' | b'?' if flow == 0 && node_start && next_blank => {
                // A sequence entry or complex key: one more block level.
                indents.push(column(b, i) + 1);
                if indents.len() > MAX_NESTING {
                    return Some(too_deep(i));
                }
                i += 1;
            }
            b':' if next_blank
                || (flow > 0 && matches!(b.get(i + 1), Some(b',' | b']' | b'}'))) =>
            {
                node_start = flow == 0;
                i += 1;
            }
            b'|' | b'>' if flow == 0 && node_start => {
                block_scalar = Some(line_indent);
                node_start = false;
                i = line_end(b, i);
            }
            b'&' | b'!' if node_start => {
                // Anchor or tag: the node starts after it.
                while i < n && !b[i].is_ascii_whitespace() {
                    i += 1;
                }
            }
            _ => {
                node_start = false;
                i += 1;
            }
        }
    }
    None
}

/// The index of the `\n` ending the line that holds `i` (or the end).
fn line_end(b: &[u8], i: usize) -> usize {
    b[i..]
        .iter()
        .position(|&c| c == b'\n')
        .map_or(b.len(), |p| i + p)
}

/// The column of `i` in its line.
fn column(b: &[u8], i: usize) -> usize {
    i - b[..i]
        .iter()
        .rposition(|&c| c == b'\n')
        .map_or(0, |p| p + 1)
}

/// In a flow collection a quote starts a string only where a scalar may start.
fn quote_may_start(b: &[u8], i: usize) -> bool {
    i == 0
        || matches!(
            b[i - 1],
            b'[' | b'{' | b',' | b':' | b' ' | b'\t' | b'\n' | b'\r'
        )
}

/// The index after the quoted scalar at `start` (`"…"` with `\` escapes,
/// `'…'` with `''`), which may span lines.
fn quoted_end(b: &[u8], start: usize) -> Option<usize> {
    let q = b[start];
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' if q == b'"' => i += 2,
            c if c == q => {
                if q == b'\'' && b.get(i + 1) == Some(&b'\'') {
                    i += 2;
                } else {
                    return Some(i + 1);
                }
            }
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn real_manifests_pass() {
        for src in [
            "kind: VirtualMachine\nmetadata:\n  name: a\n  labels: {app: web}\nspec:\n  vcpus: 2\n",
            "[{\"kind\": \"Image\", \"spec\": {\"source\": {\"url\": \"http://x/[[[\"}}}]",
            "spec:\n  steps:\n  - shell:\n      inline: |\n        {{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{\n        [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n      x: 1\n",
            "a: 'it''s [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[['\nb: plain [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n",
            "# [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n---\na: \"x\\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\"\n",
        ] {
            assert!(check(src).is_none(), "{src}: {:?}", check(src));
        }
    }

    #[test]
    fn deep_flow_collections_stop_at_the_limit() {
        for src in [
            "[".repeat(40_000),
            format!("a: {}", "{\"a\": ".repeat(40_000)),
        ] {
            let p = check(&src).expect("too deep");
            assert!(p.message.contains("nested too deeply"));
            assert!(p.span.offset() < 400);
        }
    }

    #[test]
    fn the_backstop_counts_brackets_anywhere() {
        let hidden = format!("a: |\n  {}\n", "[".repeat(2_000));
        assert!(
            super::scan(&hidden).is_none(),
            "block scalar content is text"
        );
        assert!(check(&hidden).is_some(), "but not 2,000 levels of it");
        assert!(check(&format!("a: |\n  {}\n", "[".repeat(500))).is_none());
    }

    #[test]
    fn deep_block_nesting_stops_at_the_limit() {
        let mut src = String::new();
        for d in 0..100 {
            src.push_str(&format!("{}k{d}:\n", " ".repeat(d)));
        }
        assert!(check(&src).is_some());
        let seq = format!("{}a\n", "- ".repeat(100));
        assert!(check(&seq).is_some());
    }
}
