//! A structural check of VMFile text run before the KDL parser.
//!
//! The `kdl` crate (6.7.1, the newest release) recovers from errors by
//! backtracking: on unclosed blocks such as `provision /-{` its time and
//! error count double with every line (12 lines: 2.5 s and 16,382
//! errors), and it recurses once per block, so 1,300 nested blocks
//! overflow the stack. This scan is linear and uses no recursion: it skips
//! strings and comments as KDL v2 defines them, matches `{` with `}` and
//! stops at [`MAX_NESTING`]. Only text that passes is handed to `kdl`.
//! It is our own code because no crate offers a bounded KDL pre-scan.

use crate::diag::Problem;
use crate::limits::MAX_NESTING;

use super::PARSE_CODE;

const KDL_HELP: &str = "check the KDL syntax (https://kdl.dev); strings need double quotes";

/// Problems that make the text unsafe or pointless to hand to the KDL
/// parser: unbalanced or too deeply nested blocks, strings or comments
/// that are never closed. Empty when the structure is sound.
pub fn check(src: &str) -> Vec<Problem> {
    let b = src.as_bytes();
    let mut problems = Vec::new();
    // Offsets of the `{` still open.
    let mut open: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                // To the end of the line, whichever of KDL's newlines ends it.
                while i < b.len() && newline_len(b, i) == 0 {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => match block_comment_end(b, i) {
                Some(end) => i = end,
                None => {
                    problems.push(
                        Problem::error(PARSE_CODE, (i, 2), "this comment is never closed")
                            .label("`/*` without `*/`")
                            .help("close it with `*/` (block comments nest)"),
                    );
                    return problems;
                }
            },
            b'"' => match quoted_end(b, i) {
                Ok(end) => i = end,
                Err(at) => {
                    problems.push(unclosed_string(i, at));
                    return problems;
                }
            },
            b'#' => {
                let hashes = b[i..].iter().take_while(|&&c| c == b'#').count();
                if b.get(i + hashes) == Some(&b'"') {
                    match raw_end(b, i, hashes) {
                        Ok(end) => i = end,
                        Err(at) => {
                            problems.push(unclosed_string(i, at));
                            return problems;
                        }
                    }
                } else {
                    i += hashes;
                }
            }
            b'{' => {
                open.push(i);
                if open.len() > MAX_NESTING {
                    problems.push(
                        Problem::error(
                            PARSE_CODE,
                            (i, 1),
                            format!(
                                "blocks are nested too deeply (more than {MAX_NESTING} levels)"
                            ),
                        )
                        .label("too deep")
                        .help(format!(
                            "a VMFile nests blocks two levels deep (`vm {{ provision {{ … }} }}`); \
                             close the blocks above, vmctl accepts at most {MAX_NESTING} levels"
                        )),
                    );
                    return problems;
                }
                i += 1;
            }
            b'}' => {
                if open.pop().is_none() {
                    problems.push(
                        Problem::error(PARSE_CODE, (i, 1), "unexpected `}`: no block is open here")
                            .label("unmatched `}`")
                            .help("remove it, or add the `{` it should close"),
                    );
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    for at in open {
        problems.push(
            Problem::error(PARSE_CODE, (at, 1), "this block is never closed")
                .label("`{` without `}`")
                .help("close the block with `}`"),
        );
    }
    problems
}

fn unclosed_string(start: usize, at: usize) -> Problem {
    Problem::error(
        PARSE_CODE,
        (start, at.saturating_sub(start).max(1)),
        "this string is never closed",
    )
    .label("no closing quote")
    .help(format!(
        "{KDL_HELP}; a string on one line ends with `\"` on that line, \
         a multi-line string is written `\"\"\"` … `\"\"\"`"
    ))
}

/// The index after the `*/` closing the (nestable) comment at `start`.
fn block_comment_end(b: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = start;
    while i + 1 < b.len() {
        match (b[i], b[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// The length in bytes of the KDL v2 newline at `i` (CR, LF, VT, FF,
/// NEL U+0085, LS U+2028, PS U+2029), or 0. The parser ends comments and
/// single-line strings at every one of them, so this scan must too.
fn newline_len(b: &[u8], i: usize) -> usize {
    match b[i..] {
        [b'\n' | b'\r' | 0x0B | 0x0C, ..] => 1,
        [0xC2, 0x85, ..] => 2,
        [0xE2, 0x80, 0xA8 | 0xA9, ..] => 3,
        _ => 0,
    }
}

/// The length in bytes of the whitespace or newline character at `i`, or 0.
fn space_len(b: &[u8], i: usize) -> usize {
    match std::str::from_utf8(&b[i..b.len().min(i + 4)])
        .ok()
        .or_else(|| {
            // A cut inside a later character: decode the first one only.
            (1..4)
                .rev()
                .find_map(|n| std::str::from_utf8(b.get(i..i + n)?).ok())
        })
        .and_then(|s| s.chars().next())
    {
        Some(c) if c.is_whitespace() => c.len_utf8(),
        _ => 0,
    }
}

/// The index after the quoted string (`"…"` or `"""…"""`) at `start`, or
/// `Err(where it was found unclosed)`.
fn quoted_end(b: &[u8], start: usize) -> Result<usize, usize> {
    let multi = b[start..].starts_with(b"\"\"\"");
    let mut i = start + if multi { 3 } else { 1 };
    while i < b.len() {
        match b[i] {
            b'\\' => {
                i += 1;
                // A whitespace escape swallows all following whitespace,
                // newlines included.
                if i < b.len() && space_len(b, i) > 0 {
                    while i < b.len() && space_len(b, i) > 0 {
                        i += space_len(b, i);
                    }
                } else {
                    i += 1;
                }
            }
            b'"' if multi => {
                if b[i..].starts_with(b"\"\"\"") {
                    return Ok(i + 3);
                }
                i += 1;
            }
            b'"' => return Ok(i + 1),
            _ if !multi && newline_len(b, i) > 0 => return Err(i),
            _ => i += 1,
        }
    }
    Err(b.len())
}

/// The index after the raw string (`#"…"#`, `##"""…"""##`, …) at `start`
/// with `hashes` leading `#`, or `Err(where it was found unclosed)`.
fn raw_end(b: &[u8], start: usize, hashes: usize) -> Result<usize, usize> {
    let open = start + hashes;
    let multi = b[open..].starts_with(b"\"\"\"");
    let quotes = if multi { 3 } else { 1 };
    let mut i = open + quotes;
    while i < b.len() {
        if b[i] == b'"'
            && b[i..].len() >= quotes + hashes
            && b[i..i + quotes].iter().all(|&c| c == b'"')
            && b[i + quotes..i + quotes + hashes]
                .iter()
                .all(|&c| c == b'#')
        {
            return Ok(i + quotes + hashes);
        }
        if !multi && newline_len(b, i) > 0 {
            return Err(i);
        }
        i += 1;
    }
    Err(b.len())
}

#[cfg(test)]
mod tests {
    use super::check;

    fn messages(src: &str) -> Vec<String> {
        check(src).into_iter().map(|p| p.message).collect()
    }

    #[test]
    fn sound_files_pass() {
        for src in [
            "vm \"a\" { provision \"shell\" { inline \"echo }\" } }",
            "vm \"a\" { /* { nested /* } */ */ cpus 2 }",
            "vm \"a\" { inline #\"echo \"{\" \"#; x ##\"\"\"\n}\n\"\"\"## }",
            "vm \"a\" { inline \"\"\"\n  { unbalanced\n  \"\"\" }",
            "vm \"a\" { inline \"a \\\n   b {\" } // }\n",
            "vm \"a\" { /-provision { } ; #true }",
        ] {
            assert!(messages(src).is_empty(), "{src}: {:?}", messages(src));
        }
    }

    #[test]
    fn unbalanced_blocks_are_located() {
        let p = check("vm \"a\" {\n  provision /-{\n");
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].span.offset(), 7);
        assert!(p[0].message.contains("never closed"));
        let p = check("vm \"a\" { }\n}\n");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].span.offset(), 11);
    }

    #[test]
    fn nesting_stops_at_the_limit() {
        let src = "a{".repeat(100_000);
        let p = check(&src);
        assert_eq!(p.len(), 1);
        assert!(p[0].message.contains("nested too deeply"));
        assert_eq!(p[0].span.offset(), 2 * super::MAX_NESTING + 1);
    }

    #[test]
    fn every_kdl_newline_ends_comments_and_strings() {
        for nl in [
            "\u{0085}", "\u{2028}", "\u{2029}", "\u{000B}", "\u{000C}", "\r",
        ] {
            // The parser sees the `{` after the comment: so must the check.
            let p = check(&format!("vm \"a\" {{\n// c{nl}provision /-{{\n}}\n"));
            assert_eq!(p.len(), 1, "{nl:?}: {:?}", messages("x"));
            assert!(p[0].message.contains("never closed"));
            assert!(messages(&format!("vm \"a{nl}{{\"\n}}"))[0].contains("string is never closed"));
        }
        // A whitespace escape may swallow any of them.
        assert!(messages("vm \"a\\\u{00A0}\u{2028} b\" { }").is_empty());
    }

    #[test]
    fn unclosed_strings_and_comments_are_located() {
        assert!(messages("vm \"a {\n}")[0].contains("string is never closed"));
        assert!(messages("vm #\"a {\n}")[0].contains("string is never closed"));
        assert!(messages("vm \"a\" /* {")[0].contains("comment is never closed"));
    }
}
