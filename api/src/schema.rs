//! JSON Schemas of every kind, generated from the types.

use crate::meta::Kind;
use crate::resources::{Image, Node, Provision, Snapshot, VirtualMachine};

/// The JSON Schema of one kind, pretty-printed with a trailing newline.
pub fn schema_json(kind: Kind) -> String {
    let schema = match kind {
        Kind::VirtualMachine => schemars::schema_for!(VirtualMachine),
        Kind::Image => schemars::schema_for!(Image),
        Kind::Provision => schemars::schema_for!(Provision),
        Kind::Snapshot => schemars::schema_for!(Snapshot),
        Kind::Node => schemars::schema_for!(Node),
    };
    let mut s = serde_json::to_string_pretty(&schema).expect("schemas always serialise");
    s.push('\n');
    s
}

/// The file name of a kind's schema under `schemas/`.
pub fn schema_file_name(kind: Kind) -> String {
    format!("{}.schema.json", kind.short())
}
