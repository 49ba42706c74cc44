//! vmctl's resource model: kinds, metadata, specs and statuses, the VMFile.kdl
//! and manifest parsers, validation and JSON schemas.

pub mod meta;

pub use meta::*;
