//! Object names: DNS-1123 labels, because they become directory names.

use sha2::{Digest, Sha256};

/// The longest name accepted (a DNS label).
pub const MAX_NAME_LEN: usize = 63;

/// Checks that `name` is a DNS-1123 label: 1–63 characters of lowercase
/// letters, digits and `-`, starting and ending with a letter or digit.
/// Returns a sentence saying what is wrong.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name is empty".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name is {} characters long; at most {MAX_NAME_LEN} are allowed",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        let what = if c.is_ascii_uppercase() {
            "an uppercase letter".to_owned()
        } else if c == '/' || c == '.' {
            format!("`{c}`, which could escape the data directory")
        } else {
            format!("`{}`", c.escape_default())
        };
        return Err(format!("name `{}` contains {what}", name.escape_default()));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!(
            "name `{name}` must start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// The help line shown with every name error.
pub const NAME_HELP: &str = "names are DNS-1123 labels: 1-63 lowercase letters, digits and '-', \
starting and ending with a letter or digit (e.g. `web-1`)";

/// Turns arbitrary text into a valid name: lowercase, runs of other
/// characters become `-`, trimmed, and a short digest of `key` appended so
/// that two different keys never share a name.
pub fn derive_name(text: &str, key: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    let suffix = &digest[..8];
    let mut base: String = out
        .trim_matches('-')
        .chars()
        .take(MAX_NAME_LEN - 9)
        .collect();
    while base.ends_with('-') {
        base.pop();
    }
    if base.is_empty() {
        format!("image-{suffix}")
    } else {
        format!("{base}-{suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_labels() {
        for ok in ["a", "web-1", "0db", &"a".repeat(63)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_paths_and_bad_labels() {
        for bad in [
            "",
            "../x",
            "a/b",
            "Web",
            "-a",
            "a-",
            ".",
            "a_b",
            "a b",
            &"a".repeat(64),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    proptest! {
        #[test]
        fn derived_names_are_always_valid(text in ".{0,200}", key in ".{0,50}") {
            let n = derive_name(&text, &key);
            prop_assert!(check_name(&n).is_ok(), "{n}");
        }
    }
}
