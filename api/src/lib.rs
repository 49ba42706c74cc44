//! vmctl's resource model: kinds, metadata, specs and statuses, the VMFile.kdl
//! and manifest parsers, validation and JSON schemas.

pub mod codes;
pub mod diag;
pub mod load;
pub mod manifest;
pub mod meta;
pub mod names;
pub mod resources;
pub mod schema;
pub mod validate;
pub mod vmfile;
pub mod wire;

pub use meta::*;
pub use resources::*;
