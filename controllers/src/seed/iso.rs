//! Building the seed image with an installed ISO tool (genisoimage, mkisofs
//! or xorriso), or with the pure-Rust writer when none is installed.
//!
//! The tools read the files from a private (0700) staging directory and
//! write the image to stdout; the image is then written atomically by the
//! caller. The seed holds the VM's private host key, so it never exists on
//! disk with a looser mode than 0600.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;

use super::SeedError;
use super::atomic::{private_temp_dir, write_atomic};
use super::iso9660::IsoImage;

/// The NoCloud volume label.
pub const LABEL: &str = "cidata";

/// What builds the seed image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SeedTool {
    /// The first installed of genisoimage, mkisofs, xorriso; else the
    /// pure-Rust writer.
    #[default]
    Auto,
    /// `genisoimage`.
    Genisoimage,
    /// `mkisofs` (often genisoimage under another name).
    Mkisofs,
    /// `xorriso -as mkisofs`.
    Xorriso,
    /// The built-in ISO 9660 writer (Rock Ridge + Joliet).
    PureRust,
}

impl SeedTool {
    /// The external tools, in the order [`SeedTool::Auto`] tries them.
    pub const EXTERNAL: [SeedTool; 3] =
        [SeedTool::Genisoimage, SeedTool::Mkisofs, SeedTool::Xorriso];

    /// The program name, for the external tools.
    pub fn program(self) -> Option<&'static str> {
        match self {
            SeedTool::Genisoimage => Some("genisoimage"),
            SeedTool::Mkisofs => Some("mkisofs"),
            SeedTool::Xorriso => Some("xorriso"),
            SeedTool::Auto | SeedTool::PureRust => None,
        }
    }

    /// The tool [`SeedTool::Auto`] picks on this machine now.
    pub fn detect() -> SeedTool {
        Self::EXTERNAL
            .into_iter()
            .find(|t| t.program().and_then(find_in_path).is_some())
            .unwrap_or(SeedTool::PureRust)
    }

    /// Whether this tool can be used on this machine.
    pub fn is_available(self) -> bool {
        self.program().is_none_or(|p| find_in_path(p).is_some())
    }
}

impl fmt::Display for SeedTool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeedTool::Auto => "auto",
            SeedTool::PureRust => "builtin",
            t => t.program().unwrap_or_default(),
        })
    }
}

/// An unknown [`SeedTool`] name.
#[derive(Debug, thiserror::Error)]
#[error("Unknown seed tool {0:?}; expected auto, genisoimage, mkisofs, xorriso or builtin")]
pub struct UnknownSeedTool(pub String);

impl FromStr for SeedTool {
    type Err = UnknownSeedTool;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => SeedTool::Auto,
            "genisoimage" => SeedTool::Genisoimage,
            "mkisofs" => SeedTool::Mkisofs,
            "xorriso" => SeedTool::Xorriso,
            "builtin" | "pure-rust" => SeedTool::PureRust,
            _ => return Err(UnknownSeedTool(s.to_owned())),
        })
    }
}

/// Writes `files` as a `cidata` ISO at `out` (atomically, mode 0600) with
/// `tool`, and returns the tool that was used ([`SeedTool::Auto`] resolved).
pub fn write_iso(
    files: &[(&str, &[u8])],
    out: &Path,
    tool: SeedTool,
) -> Result<SeedTool, SeedError> {
    let tool = match tool {
        SeedTool::Auto => SeedTool::detect(),
        t => t,
    };
    let image = match tool.program() {
        None => files
            .iter()
            .fold(IsoImage::new(LABEL), |img, (name, data)| {
                img.file(*name, *data)
            })
            .build()
            .map_err(|source| SeedError::Image { source })?,
        Some(program) => {
            let path = find_in_path(program).ok_or(SeedError::ToolMissing { tool })?;
            run_tool(tool, &path, files, out)?
        }
    };
    write_atomic(out, &image, 0o600).map_err(|source| SeedError::Write {
        path: out.to_owned(),
        source,
    })?;
    Ok(tool)
}

fn run_tool(
    tool: SeedTool,
    program: &Path,
    files: &[(&str, &[u8])],
    out: &Path,
) -> Result<Vec<u8>, SeedError> {
    let staging = private_temp_dir(out).map_err(|source| SeedError::Write {
        path: out.to_owned(),
        source,
    })?;
    for (name, data) in files {
        let path = staging.path().join(name);
        write_atomic(&path, data, 0o600).map_err(|source| SeedError::Write { path, source })?;
    }
    let mut cmd = Command::new(program);
    if tool == SeedTool::Xorriso {
        cmd.args(["-as", "mkisofs", "-o", "-"]);
    } else {
        cmd.args(["-input-charset", "utf-8"]);
    }
    // -J Joliet, -r Rock Ridge with sane modes and owners; no -o: stdout.
    cmd.args(["-quiet", "-V", LABEL, "-J", "-r"])
        .args(files.iter().map(|(name, _)| OsStr::new(name)))
        .current_dir(staging.path())
        .stdin(Stdio::null());
    let output = cmd
        .output()
        .map_err(|source| SeedError::Spawn { tool, source })?;
    if !output.status.success() || output.stdout.is_empty() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(SeedError::ToolFailed {
            tool,
            status: output.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(output.stdout)
}

/// The first executable file named `program` in `$PATH`.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names_round_trip() {
        for t in [
            SeedTool::Auto,
            SeedTool::Genisoimage,
            SeedTool::Mkisofs,
            SeedTool::Xorriso,
            SeedTool::PureRust,
        ] {
            assert_eq!(t.to_string().parse::<SeedTool>().unwrap(), t);
        }
        assert!("cdrkit".parse::<SeedTool>().is_err());
    }

    #[test]
    fn auto_prefers_an_installed_external_tool() {
        let detected = SeedTool::detect();
        let any = SeedTool::EXTERNAL.iter().any(|t| t.is_available());
        assert_eq!(detected != SeedTool::PureRust, any);
        assert!(SeedTool::PureRust.is_available());
    }

    #[test]
    fn find_in_path_finds_sh_and_not_nonsense() {
        assert!(find_in_path("sh").is_some());
        assert!(find_in_path("vmctl-no-such-program").is_none());
    }
}
