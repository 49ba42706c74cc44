//! vmctl's resource model: kinds, metadata, specs and statuses, the VMFile.kdl
//! and manifest parsers, validation and JSON schemas.

pub mod codes;
pub mod diag;
pub mod limits;
pub mod load;
pub mod localfile;
pub mod manifest;
pub mod meta;
pub mod names;
pub mod node;
pub mod paths;
pub mod resources;
pub mod schema;
pub mod snapshot;
pub mod streams;
pub mod validate;
pub mod vmfile;
pub mod wire;

pub use meta::*;
pub use resources::*;

/// An error and all its causes on one line (`outer: cause: root cause`),
/// as printed at the edge (API error bodies, status messages, logs).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

#[cfg(test)]
mod error_chain_tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn joins_every_cause() {
        let e = Outer(std::io::Error::other("root"));
        assert_eq!(super::error_chain(&e), "outer: root");
    }
}
