//! Limits on what vmctl reads, so that no input can make it crash, hang or
//! flood the terminal: the size of a VMFile or manifest, how deeply its
//! blocks nest, the files it names, and how many problems are kept and shown.
//!
//! Each limit is far above what a real file needs; passing one is a
//! located error, never a crash. README.md lists them for users.

/// Largest VMFile or manifest read, in bytes (32 MiB; a VMFile of 10,000
/// VMs is about 1 MiB, its JSON about 4 MiB).
pub const MAX_SOURCE_BYTES: u64 = 32 * 1024 * 1024;

/// Deepest nesting of blocks (`{ … }` in a VMFile; mappings, sequences and
/// flow collections in YAML/JSON) accepted. A VMFile needs 2 levels, a
/// manifest about 6.
pub const MAX_NESTING: usize = 32;

/// Most problems kept per file; the rest are counted ("… and 991 more").
pub const MAX_PROBLEMS: usize = 20;

/// Longest source line shown in a diagnostic, in characters; longer lines
/// are clipped around the problem's span.
pub const MAX_SHOWN_LINE_CHARS: usize = 160;

/// Longest message, label or help text shown, in characters (they may
/// quote the input).
pub const MAX_SHOWN_TEXT_CHARS: usize = 400;

/// Largest accepted `POST /v1/apply` body: 32 MiB, about 80,000 small VMs
/// as JSON (a 10,000-VM VMFile is about 4 MiB).
pub const MAX_APPLY_BODY_BYTES: usize = 32 << 20;

/// Largest accepted body of every other endpoint: 64 KiB.
pub const MAX_BODY_BYTES: usize = 64 << 10;

/// What a local file named by a VMFile or manifest is used for; each use
/// has its own size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileUse {
    /// `cloud-init { ssh-key "…" }`: a public key file.
    SshKey,
    /// `cloud-init { user-data "…" }`: cloud-init user-data.
    UserData,
    /// `provision "shell" { script "…" }`: a script run on the guest.
    Script,
    /// `provision "file" { source "…" }`: a file uploaded to the guest.
    Upload,
}

impl FileUse {
    /// The largest accepted file, in bytes: 1 MiB for an SSH public key,
    /// 16 MiB for user-data and scripts, 256 MiB for uploads (uploads are
    /// held in memory while sent; bigger content belongs in the image).
    pub const fn max_bytes(self) -> u64 {
        const MIB: u64 = 1024 * 1024;
        match self {
            FileUse::SshKey => MIB,
            FileUse::UserData | FileUse::Script => 16 * MIB,
            FileUse::Upload => 256 * MIB,
        }
    }

    /// How the VMFile names this use (`ssh-key`, `user-data`, `script`, `source`).
    pub fn what(self) -> &'static str {
        match self {
            FileUse::SshKey => "ssh-key",
            FileUse::UserData => "user-data",
            FileUse::Script => "script",
            FileUse::Upload => "source",
        }
    }
}

/// A byte count for messages: `512 bytes`, `16 MiB`, `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: &[&str] = &["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {unit}")
    } else {
        format!("{v:.1} {unit}")
    }
}

/// `n` and a noun in the singular or plural, as `n` asks: `1 step`,
/// `2 steps`, `0 objects` (found as: "all 1 objects are Ready").
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `text` cut to at most `max` characters, with `…` marking the cut.
pub fn clip_text(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => text.into(),
        Some((at, _)) => {
            let keep = text[..at].char_indices().last().map_or(0, |(i, _)| i);
            format!("{}…", &text[..keep]).into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_picks_a_unit() {
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(16 * 1024 * 1024), "16 MiB");
        assert_eq!(human_bytes(1536 * 1024 * 1024), "1.5 GiB");
        assert_eq!(human_bytes(MAX_APPLY_BODY_BYTES as u64), "32 MiB");
        assert_eq!(human_bytes(MAX_BODY_BYTES as u64), "64 KiB");
        assert_eq!(human_bytes(4_400_000), "4.2 MiB");
    }

    #[test]
    fn count_says_one_in_the_singular_and_others_in_the_plural() {
        assert_eq!(count(1, "step", "steps"), "1 step");
        assert_eq!(count(0, "step", "steps"), "0 steps");
        assert_eq!(count(2, "byte", "bytes"), "2 bytes");
    }

    #[test]
    fn clip_text_keeps_short_text_and_marks_cuts() {
        assert_eq!(clip_text("abc", 3), "abc");
        assert_eq!(clip_text("abcd", 3), "ab…");
        assert_eq!(clip_text("ééééé", 3).chars().count(), 3);
    }
}
