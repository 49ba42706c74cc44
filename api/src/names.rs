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

/// The cache key of an image source: two sources with one key are one Image.
pub fn image_source_key(src: &crate::resources::ImageSource) -> String {
    match src {
        crate::resources::ImageSource::Url { url } => format!("url:{url}"),
        crate::resources::ImageSource::Path { path } => format!("path:{path}"),
    }
}

/// The name of the Image made for a source: the URL's or path's file name
/// plus a short digest of the source. A VMFile, `vmctl create` and
/// `vmctl image pull` all name an image this way, so they share it.
pub fn image_name(src: &crate::resources::ImageSource) -> String {
    let file = match src {
        crate::resources::ImageSource::Url { url } => url::Url::parse(url)
            .ok()
            .and_then(|u| {
                u.path_segments()
                    .and_then(|mut s| s.next_back().map(str::to_owned))
            })
            .unwrap_or_default(),
        crate::resources::ImageSource::Path { path } => std::path::Path::new(path)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    derive_name(&file, &image_source_key(src))
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

    #[test]
    fn image_names_come_from_the_file_name_and_a_digest_of_the_source() {
        use crate::resources::ImageSource;
        let url = ImageSource::Url {
            url: "https://example.com/debian.qcow2".into(),
        };
        assert_eq!(image_name(&url), "debian-qcow2-8beb404e");
        let path = ImageSource::Path {
            path: "/var/img/Debian 12.qcow2".into(),
        };
        let n = image_name(&path);
        assert!(n.starts_with("debian-12-qcow2-"), "{n}");
        assert_ne!(
            n,
            image_name(&ImageSource::Path {
                path: "/other/Debian 12.qcow2".into()
            }),
            "same file name, different source: different images"
        );
        assert!(
            image_name(&ImageSource::Url {
                url: "https://example.com/".into()
            })
            .starts_with("image-")
        );
    }

    proptest! {
        #[test]
        fn derived_names_are_always_valid(text in ".{0,200}", key in ".{0,50}") {
            let n = derive_name(&text, &key);
            prop_assert!(check_name(&n).is_ok(), "{n}");
        }
    }
}
