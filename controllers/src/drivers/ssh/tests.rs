//! Tests against a real sshd.
