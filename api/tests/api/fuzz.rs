//! Random and mutated VMFiles never panic and always yield either resources
//! or diagnostics located inside the file.

use proptest::prelude::*;
use vmctl_api::vmfile::{Context, parse};

const SEEDS: &[&str] = &[
    include_str!("../../../examples/full/VMFile.kdl"),
    include_str!("../../../examples/multi-vm/VMFile.kdl"),
    include_str!("../../../examples/omnios-builder/VMFile.kdl"),
];

fn check(src: &str) -> Result<(), TestCaseError> {
    let ctx = Context {
        base_dir: crate::repo_root().join("examples/full"),
        home: Some("/home/user".into()),
        backend: None,
    };
    match parse("VMFile.kdl", src, &ctx) {
        Ok(t) => {
            for r in &t.resources {
                prop_assert!(
                    vmctl_api::validate::validate(r)
                        .iter()
                        .all(|e| e.severity == vmctl_api::validate::Severity::Warning)
                );
            }
        }
        Err(d) => {
            prop_assert!(d.has_errors());
            for p in &d.problems {
                let end = p.span.offset() + p.span.len();
                prop_assert!(
                    end <= src.len(),
                    "span {:?} outside a file of {} bytes",
                    p.span,
                    src.len()
                );
                prop_assert!(src.is_char_boundary(p.span.offset()) && src.is_char_boundary(end));
            }
            // Rendering must not panic either.
            let _ = d.render_plain();
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize, usize),
    Insert(usize, String),
    Swap(usize, usize),
}

fn apply(src: &str, muts: &[Mutation]) -> String {
    let mut chars: Vec<char> = src.chars().collect();
    for m in muts {
        let n = chars.len().max(1);
        match m {
            Mutation::Delete(at, len) => {
                let at = at % n;
                let end = (at + len).min(chars.len());
                if at < end {
                    chars.drain(at..end);
                }
            }
            Mutation::Insert(at, s) => {
                let at = at % (chars.len() + 1);
                for (i, c) in s.chars().enumerate() {
                    chars.insert(at + i, c);
                }
            }
            Mutation::Swap(a, b) => {
                if !chars.is_empty() {
                    let (a, b) = (a % chars.len(), b % chars.len());
                    chars.swap(a, b);
                }
            }
        }
    }
    chars.into_iter().collect()
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0usize..20).prop_map(|(a, l)| Mutation::Delete(a, l)),
        (
            any::<usize>(),
            prop_oneof![
                Just("\"".to_owned()),
                Just("{".to_owned()),
                Just("}".to_owned()),
                Just(";".to_owned()),
                Just(" 70000".to_owned()),
                Just(" -1".to_owned()),
                Just(" x=1".to_owned()),
                Just("é".to_owned()),
                Just("\nvm \"Z\" {}".to_owned()),
                Just(" #null".to_owned()),
                Just("/-".to_owned()),
                ".{0,8}"
            ]
        )
            .prop_map(|(a, s)| Mutation::Insert(a, s)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn mutated_vmfiles_never_panic(seed in 0usize..3, muts in proptest::collection::vec(mutation(), 1..6)) {
        check(&apply(SEEDS[seed], &muts))?;
    }

    #[test]
    fn random_text_never_panics(src in "(vm|\"a\"|\\{|\\}|image-url|vcpus|[0-9]{1,25}|network|\"tap\"|bridge=|provision|\"shell\"|inline|[ \n;]|.){0,60}") {
        check(&src)?;
    }
}
