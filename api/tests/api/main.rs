//! Integration tests of the resource model: VMFile translation, diagnostics,
//! manifests, schemas.

mod fuzz;
mod manifests;
mod parser_faults;
mod vmfile;

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Insta settings that hide machine-specific paths.
pub fn settings() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.add_filter(&regex_escape(&repo_root().display().to_string()), "[REPO]");
    if let Some(home) = std::env::var_os("HOME") {
        let home = home.to_string_lossy().into_owned();
        if home.len() > 1 {
            s.add_filter(&format!("{}/", regex_escape(&home)), "[HOME]/");
        }
    }
    s.add_filter(r"/tmp/\.tmp[A-Za-z0-9]+", "[TMP]");
    s.set_prepend_module_to_snapshot(false);
    s
}

fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[test]
fn checked_in_schemas_match_the_types() {
    for kind in vmctl_api::Kind::ALL {
        let path = repo_root()
            .join("schemas")
            .join(vmctl_api::schema::schema_file_name(kind));
        let want = vmctl_api::schema::schema_json(kind);
        if std::env::var_os("VMCTL_BLESS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} drifted from the types; regenerate with `VMCTL_BLESS=1 cargo test -p vmctl-api --test api`",
            path.display()
        );
    }
}
