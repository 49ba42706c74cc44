//! Wire types of the agent's streaming endpoints: `vmctl console`, `exec`,
//! `cp`, the SSH tunnel and the host-tool endpoints, which make the API
//! the only way `vmctl` reaches a VM (issue 13).
//!
//! Byte streams (console, tunnel) are HTTP/1.1 upgrades: the client sends
//! `Connection: Upgrade` and `Upgrade: tcp` (as Docker's attach does), the
//! agent answers `101 Switching Protocols`, and from then on the
//! connection carries the raw bytes both ways.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::wire::ErrorBody;

/// The `Upgrade` protocol of the console and tunnel endpoints: a raw byte
/// stream.
pub const UPGRADE_PROTOCOL: &str = "tcp";

/// Response header of `GET /v1/vms/{name}/files`: the file's permission
/// bits in octal (`0755`).
pub const FILE_MODE_HEADER: &str = "x-vmctl-file-mode";

/// `POST /v1/vms/{name}/exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecRequest {
    /// The command and its arguments, as `execvp` takes them; the agent
    /// quotes each for the guest's shell. Its stdin is at end-of-file.
    pub command: Vec<String>,
}

/// One line of the NDJSON stream `POST /v1/vms/{name}/exec` answers with:
/// output pieces in the order they were read, then one `exit` or `error`.
///
/// Output is text: bytes that are not UTF-8 arrive as U+FFFD (a sequence
/// split between two reads is kept whole).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ExecEvent {
    /// Bytes the command wrote to its stdout.
    Stdout {
        /// The text.
        data: String,
    },
    /// Bytes the command wrote to its stderr.
    Stderr {
        /// The text.
        data: String,
    },
    /// The command ended: its exit code (128 + N when killed by signal N).
    Exit {
        /// The exit code.
        code: i32,
    },
    /// The command could not be run, or its output stopped midway.
    Error {
        /// What went wrong.
        error: ErrorBody,
    },
}

/// `PUT /v1/vms/{name}/files`: what was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileWritten {
    /// The absolute path on the guest.
    pub path: String,
    /// Bytes written.
    pub bytes: u64,
    /// The permission bits the file has now (`0o644` = 420).
    pub mode: u32,
}

/// `GET /v1/vms/{name}/ssh`: what the system `ssh` needs to log in to
/// the VM through `GET /v1/vms/{name}/tunnel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SshAccess {
    /// The user to log in as.
    pub user: String,
    /// The host key vmctl generated and pinned for the VM, in OpenSSH
    /// public key format (`ssh-ed25519 AAAA… comment`).
    pub host_key: String,
    /// The private key vmctl generated for the VM (OpenSSH format); absent
    /// when the VM's `ssh` block names a key of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    /// The key the VM's `ssh` block names, as written there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_path: Option<String>,
}

/// `POST /v1/images/inspect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InspectRequest {
    /// An absolute path to an image file on the agent's host.
    pub path: String,
}

/// `POST /v1/images/inspect`: what the agent makes of a local image file
/// (the same checks and `qemu-img info` an Image with that path gets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageInfo {
    /// The file.
    pub path: String,
    /// Its format (`qcow2`, `raw`).
    pub format: String,
    /// File size in bytes.
    pub size_bytes: u64,
    /// Virtual disk size in bytes, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size_bytes: Option<u64>,
}

/// Turns a byte stream into UTF-8 text piece by piece without breaking a
/// character that straddles two pieces: the incomplete tail of one piece
/// waits for the next. Invalid bytes become U+FFFD.
#[derive(Debug, Default)]
pub struct Utf8Pieces {
    pending: Vec<u8>,
}

impl Utf8Pieces {
    /// The text of `bytes` after what was pending; an incomplete character
    /// at the end (at most 3 bytes) is kept for the next call.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let keep = match std::str::from_utf8(&self.pending) {
            Ok(_) => 0,
            // An error at the end with no length: the input stops inside
            // a character that may yet be completed.
            Err(e) if e.error_len().is_none() => self.pending.len() - e.valid_up_to(),
            Err(_) => incomplete_tail(&self.pending),
        };
        let tail = self.pending.split_off(self.pending.len() - keep);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = tail;
        text
    }

    /// What is left at the end of the stream (an incomplete character as
    /// U+FFFD), empty when nothing is.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// Length of an incomplete UTF-8 sequence at the end of `b` (0 if none).
fn incomplete_tail(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let i = b.len() - back;
        let lead = b[i];
        if lead & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back
        }
        let need = match lead {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0,
        };
        return if back < need { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_output_keeps_characters_split_between_reads() {
        let text = "héllo → wörld ✓";
        let bytes = text.as_bytes();
        // Every split point, including inside multi-byte characters.
        for cut in 0..=bytes.len() {
            let mut p = Utf8Pieces::default();
            let mut out = p.push(&bytes[..cut]);
            out += &p.push(&bytes[cut..]);
            out += &p.finish();
            assert_eq!(out, text, "cut at {cut}");
        }
    }

    #[test]
    fn exec_output_with_invalid_bytes_is_replaced_not_held_back() {
        let mut p = Utf8Pieces::default();
        assert_eq!(p.push(b"a\xffb"), "a\u{fffd}b");
        // Invalid byte before an incomplete character: both handled.
        assert_eq!(p.push(b"x\xff\xe2\x86"), "x\u{fffd}");
        assert_eq!(p.push(b"\x92"), "→");
        assert_eq!(p.push(b"\xe2"), "");
        assert_eq!(p.finish(), "\u{fffd}");
    }

    #[test]
    fn exec_events_are_tagged_by_type() {
        let line = serde_json::to_string(&ExecEvent::Stderr { data: "x".into() }).unwrap();
        assert_eq!(line, r#"{"type":"stderr","data":"x"}"#);
        let exit: ExecEvent = serde_json::from_str(r#"{"type":"exit","code":3}"#).unwrap();
        assert_eq!(exit, ExecEvent::Exit { code: 3 });
    }
}
