//! Faults of issue 18 (items 1–4): inputs that made the parsers take
//! exponential time, overflow the stack, crash or flood while rendering,
//! or hang on files a VMFile names. Each test names the fault it pins.

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vmctl_api::diag::FileDiagnostics;
use vmctl_api::limits::{MAX_NESTING, MAX_PROBLEMS};
use vmctl_api::vmfile::{Context, parse};

fn ctx(dir: &Path) -> Context {
    Context {
        base_dir: dir.to_path_buf(),
        home: Some("/home/user".into()),
        backend: None,
    }
}

/// Runs `f` on a thread with a small stack (deep recursion overflows it)
/// and fails if it takes longer than `limit` (the faults took minutes or
/// forever; the fixed code takes milliseconds).
fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .stack_size(512 * 1024)
        .spawn(move || tx.send(f()).unwrap())
        .unwrap();
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("did not finish within {limit:?}"))
}

fn kdl_err(src: String) -> FileDiagnostics {
    bounded(Duration::from_secs(20), move || {
        let dir = tempfile::tempdir().unwrap();
        parse("VMFile.kdl", &src, &ctx(dir.path())).expect_err("the file must be rejected")
    })
}

fn manifest_err(file: &'static str, src: String) -> FileDiagnostics {
    bounded(Duration::from_secs(20), move || {
        vmctl_api::manifest::parse(file, &src).expect_err("the manifest must be rejected")
    })
}

#[test]
fn parser_malformed_nesting_is_not_exponential() {
    // 12 lines took 2.5 s and gave 16,382 errors; each line doubled both.
    for lines in [12, 16, 30] {
        let src = format!("vm \"web\" {{\n{}", "provision /-{\n".repeat(lines));
        let started = Instant::now();
        let d = kdl_err(src);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{lines} lines took {:?}",
            started.elapsed()
        );
        assert!(d.error_count() <= lines + 1, "{} errors", d.error_count());
        assert!(d.problems.len() <= MAX_PROBLEMS);
        let first = &d.problems[0];
        assert_eq!(first.span.offset(), 9, "located at the first unclosed `{{`");
        assert!(first.message.contains("never closed"), "{}", first.message);
        assert_eq!(first.code, vmctl_api::vmfile::PARSE_CODE);
    }
}

#[test]
fn parser_malformed_nesting_hidden_behind_unicode_newlines_is_not_exponential() {
    // KDL ends comments and strings at U+2028 etc. too: a check that
    // only knew `\n` let these through to the parser (14 lines: 1.9 s).
    for src in [
        format!(
            "vm \"web\" {{\n{}}}\n",
            "// c\u{2028}provision /-{\n".repeat(30)
        ),
        format!(
            "vm \"web\" {{\n{}}}\n",
            "x \"c\u{0085}provision /-{\"\n".repeat(30)
        ),
    ] {
        let started = Instant::now();
        let d = kdl_err(src);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(d.error_count() <= 31, "{} errors", d.error_count());
    }
}

#[test]
fn parser_unclosed_strings_and_stray_braces_are_located_at_once() {
    let d = kdl_err(format!("vm \"web {{\n{}", "provision /-{\n".repeat(20)));
    assert!(d.problems[0].message.contains("string is never closed"));
    let d = kdl_err(format!("vm \"web\" {{ }}\n{}", "}\n".repeat(5000)));
    assert_eq!(d.error_count(), 5000);
    assert_eq!(d.problems.len(), MAX_PROBLEMS);
    assert!(d.problems[0].message.contains("unexpected `}`"));
}

#[test]
fn parser_deep_nesting_does_not_overflow_the_stack() {
    // 1,300 levels overflowed an 8 MiB stack; the check runs on 512 KiB.
    for depth in [1_300, 100_000] {
        let d = kdl_err("a{\n".repeat(depth));
        assert_eq!(d.error_count(), 1);
        let p = &d.problems[0];
        assert!(p.message.contains("nested too deeply"), "{}", p.message);
        // At the `{` of line MAX_NESTING + 1, where the limit is passed.
        assert_eq!(d.line_col(p.span.offset()), (MAX_NESTING + 1, 2));
    }
    // Real nesting still parses.
    let dir = tempfile::tempdir().unwrap();
    parse(
        "VMFile.kdl",
        "vm \"a\" { image-url \"https://example.com/a.qcow2\"; provision \"shell\" { inline \"echo {\" } }",
        &ctx(dir.path()),
    )
    .unwrap();
}

#[test]
fn manifest_deep_nesting_is_refused_at_once() {
    // 40,000 levels of YAML or JSON took 7–11 s.
    for (file, src) in [
        (
            "deep.json",
            format!("{}{}", "[".repeat(40_000), "]".repeat(40_000)),
        ),
        (
            "deep.yaml",
            format!("kind: VirtualMachine\nspec: {}\n", "{a: ".repeat(40_000)),
        ),
        (
            "block.yaml",
            (0..60)
                .map(|d| format!("{}k{d}:\n", " ".repeat(d)))
                .collect(),
        ),
    ] {
        let started = Instant::now();
        let d = manifest_err(file, src);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{file}: {:?}",
            started.elapsed()
        );
        assert_eq!(d.error_count(), 1, "{file}");
        assert!(
            d.problems[0].message.contains("nested too deeply"),
            "{file}: {}",
            d.problems[0].message
        );
        assert!(
            d.problems[0].span.offset() < 2_000,
            "{file}: located where the limit is passed"
        );
    }
}

#[test]
fn diagnostics_long_line_renders_without_panicking() {
    // 65,536 spaces and an `x`: miette panicked ("Formatting argument out
    // of range") padding to the column.
    let d = kdl_err(format!("{}x\n", " ".repeat(65_536)));
    let text = bounded(Duration::from_secs(20), move || d.render_plain());
    assert!(text.contains("VMFile.kdl:1:65537"), "{text}");
    assert!(text.contains("unknown node `x`"), "{text}");
    assert!(text.len() < 4_000, "{} bytes:\n{text}", text.len());
    // A huge line of JSON is clipped too.
    let d = manifest_err(
        "big.json",
        format!(
            "{{\"kind\": \"Gadget\", \"x\": \"{}\"}}",
            "y".repeat(200_000)
        ),
    );
    let text = d.render_plain();
    assert!(text.len() < 4_000, "{} bytes", text.len());
}

#[test]
fn diagnostics_flood_is_bounded() {
    // `vm "db" {` 1,000 times took 13.7 s and wrote 13.6 MB.
    let d = kdl_err("vm \"db\" {\n".repeat(1_000));
    let text = d.render_plain();
    assert!(text.contains("nested too deeply"), "{text}");
    assert!(text.len() < 4_000, "{} bytes", text.len());

    // 999 duplicate names: counted, but only MAX_PROBLEMS kept and shown.
    let d = kdl_err("vm \"db\" { image-url \"https://example.com/a.qcow2\" }\n".repeat(1_000));
    assert_eq!(d.error_count(), 999);
    assert_eq!(d.problems.len(), MAX_PROBLEMS);
    assert_eq!(d.omitted(), 999 - MAX_PROBLEMS);
    assert_eq!(d.to_string(), "VMFile.kdl is invalid: 999 errors");
    let started = Instant::now();
    let text = d.render_plain();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        text.contains(&format!("… and {} more", 999 - MAX_PROBLEMS)),
        "{text}"
    );
    assert!(text.len() < 30_000, "{} bytes", text.len());
}

#[test]
fn diagnostics_multi_line_span_shows_its_first_line_only() {
    // A block on a node that takes none: the span is the whole block.
    let body = "  inline \"x\"\n".repeat(10_000);
    let d = kdl_err(format!(
        "vm \"a\" {{\n  image-url \"https://example.com/a.qcow2\"\n  vcpus 2 {{\n{body}  }}\n}}\n"
    ));
    let text = d.render_plain();
    assert!(text.contains("does not take a block"), "{text}");
    assert!(text.len() < 4_000, "{} bytes:\n{text}", text.len());
}

#[test]
fn diagnostics_keep_errors_before_warnings() {
    // Many warnings (missing image files) must not push out the error.
    let mut src = String::new();
    for i in 0..50 {
        src.push_str(&format!("vm \"w{i}\" {{ image \"missing{i}.qcow2\" }}\n"));
    }
    src.push_str("vm \"bad\" { image-url \"https://example.com/a.qcow2\"; vcpus \"two\" }\n");
    let d = kdl_err(src);
    assert_eq!(d.error_count(), 1);
    assert!(
        d.problems
            .iter()
            .any(|p| p.message.contains("must be an integer"))
    );
    assert_eq!(d.problems.len(), MAX_PROBLEMS);
}

fn vmfile_naming(file_line: &str) -> String {
    format!("vm \"a\" {{\n  image-url \"https://example.com/a.qcow2\"\n  {file_line}\n}}\n")
}

#[test]
fn vmfile_named_devices_and_fifos_are_refused_without_reading() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    let fifo = fifo.display().to_string();
    for (line, want) in [
        (
            "provision \"shell\" { script \"/dev/zero\"; }".to_owned(),
            "script /dev/zero is a character device, not a regular file",
        ),
        (
            format!("provision \"shell\" {{ script \"{fifo}\"; }}"),
            "is a FIFO (named pipe), not a regular file",
        ),
        (
            format!("provision \"file\" {{ source \"{fifo}\"; destination \"/x\"; }}"),
            "is a FIFO",
        ),
        (
            "provision \"file\" { source \"/dev/urandom\"; destination \"/x\"; }".to_owned(),
            "character device",
        ),
        (
            "cloud-init { user-data \"/dev/zero\"; }".to_owned(),
            "user-data /dev/zero is a character device",
        ),
        (
            "cloud-init { ssh-key \"/\"; }".to_owned(),
            "ssh-key / is a directory",
        ),
        (
            format!("ssh {{ private-key \"{fifo}\"; }}"),
            "is a FIFO (named pipe), not a regular file",
        ),
        (
            "ssh { private-key \"/dev/zero\"; }".to_owned(),
            "private key /dev/zero is a character device",
        ),
    ] {
        let src = vmfile_naming(&line);
        let d = kdl_err(src.clone());
        assert_eq!(d.error_count(), 1, "{line}: {}", d.render_plain());
        let p = &d.problems[0];
        assert!(p.message.contains(want), "{line}: {}", p.message);
        assert_eq!(p.label, "not a regular file");
        // Located on the path's string.
        assert!(src[p.span.offset()..].starts_with('"'), "{line}");
    }
}

#[test]
fn vmfile_image_that_is_not_a_regular_file_is_refused() {
    let d = kdl_err("vm \"a\" {\n  image \"/dev/zero\"\n}\n".to_owned());
    let text = d.render_plain();
    assert!(
        text.contains("image file /dev/zero is a character device, not a regular file"),
        "{text}"
    );
}

#[test]
fn vmfile_named_files_over_their_limit_are_refused() {
    use vmctl_api::limits::FileUse;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("big.pub");
    std::fs::write(&key, vec![b'k'; FileUse::SshKey.max_bytes() as usize + 1]).unwrap();
    let src = vmfile_naming(&format!("cloud-init {{ ssh-key \"{}\"; }}", key.display()));
    let d = kdl_err(src);
    let p = &d.problems[0];
    assert!(
        p.message.contains("the limit for a ssh-key file is 1 MiB"),
        "{}",
        p.message
    );
    assert_eq!(p.label, "too large");
    // The same file is fine as a script (16 MiB).
    let ok = vmfile_naming(&format!(
        "provision \"shell\" {{ script \"{}\"; }}",
        key.display()
    ));
    parse("VMFile.kdl", &ok, &ctx(dir.path())).unwrap();
}

#[test]
fn manifest_named_devices_are_refused_without_reading() {
    let src = "apiVersion: vmctl/v1alpha1\nkind: Provision\nmetadata:\n  name: a\nspec:\n  vm: a\n  steps:\n  - type: shell\n    script:\n      path: /dev/zero\n".to_owned();
    let d = manifest_err("p.yaml", src);
    let p = &d.problems[0];
    assert!(
        p.message.contains("/dev/zero is a character device"),
        "{}",
        p.message
    );
}

#[test]
fn load_of_an_endless_source_stops_at_the_size_limit() {
    let e = bounded(Duration::from_secs(20), || {
        vmctl_api::load::load(Path::new("/dev/zero")).unwrap_err()
    });
    assert!(
        matches!(e, vmctl_api::load::LoadError::TooLarge { .. }),
        "{e}"
    );
    assert_eq!(e.code(), "vmctl::vmfile::too_large");
}

mod soup {
    use super::*;
    use proptest::prelude::*;

    const TOKENS: &[&str] = &[
        "provision",
        "/-",
        "(",
        ")",
        "(t)",
        "=",
        ";",
        "\n",
        "#true",
        "x=",
        "\"s\"",
        "1",
        "{",
        "{",
        "}",
        "\\",
        "/* c */",
        " ",
        "vcpus",
        "#\"r\"#",
        "-",
        ",",
    ];

    /// Pieces that change how the text around them is read: unclosed
    /// quotes, comment starts, KDL's other newlines.
    const TRICKY: &[&str] = &[
        "provision /-{",
        "provision /-{",
        "provision /-{",
        "//",
        "\u{2028}",
        "\u{85}",
        "\u{b}",
        "\"",
        "#\"",
        "\"#",
        "\"\"\"",
        "/*",
        "*/",
        "\\",
        "\n",
        "}",
        "\r",
    ];

    /// Token soup with balanced braces (what passes the structure check).
    fn balanced(tokens: &[usize]) -> String {
        let mut out = String::from("vm \"a\" {\n");
        let mut depth = 0usize;
        for &t in tokens {
            let tok = TOKENS[t % TOKENS.len()];
            match tok {
                "{" => depth += 1,
                "}" if depth == 0 => continue,
                "}" => depth -= 1,
                _ => {}
            }
            out.push_str(tok);
            out.push(' ');
        }
        out.push_str(&"}".repeat(depth + 1));
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Whatever passes the structure check, the KDL parser handles in
        /// bounded time (its backtracking blew up only on unclosed blocks).
        #[test]
        fn parser_time_is_bounded_on_token_soup(tokens in prop::collection::vec(0usize..64, 0..60)) {
            let src = balanced(&tokens);
            let dir = tempfile::tempdir().unwrap();
            let started = Instant::now();
            let _ = parse("VMFile.kdl", &src, &ctx(dir.path()));
            prop_assert!(started.elapsed() < Duration::from_secs(1), "{:?} for {src:?}", started.elapsed());
        }

        /// Unbalanced soups of tricky pieces: what the check lets through
        /// must parse fast, so the check reads the text as the parser does.
        #[test]
        fn parser_check_and_parser_agree_on_tricky_soup(tokens in prop::collection::vec(0usize..64, 0..80)) {
            let mut src = String::from("vm \"a\" {\n");
            for t in tokens {
                src.push_str(TRICKY[t % TRICKY.len()]);
                src.push(' ');
            }
            let dir = tempfile::tempdir().unwrap();
            let started = Instant::now();
            let _ = parse("VMFile.kdl", &src, &ctx(dir.path()));
            prop_assert!(started.elapsed() < Duration::from_secs(1), "{:?} for {src:?}", started.elapsed());
        }
    }
}
