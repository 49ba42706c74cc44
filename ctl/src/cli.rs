//! Raw command-line arguments (clap).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// vmctl: declarative local virtual machines.
///
/// Describe VMs in VMFile.kdl (or YAML/JSON manifests); vmctl turns them into
/// VirtualMachine, Image and Provision resources.
#[derive(Debug, Parser)]
#[command(name = "vmctl", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats for commands that print resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable text.
    Text,
    /// Multi-document YAML.
    Yaml,
    /// JSON.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a VMFile or manifest and report every problem with its location.
    ///
    /// Exits 0 when the file is valid (warnings are printed but accepted),
    /// 1 when it has errors.
    Validate {
        /// VMFile.kdl, a YAML/JSON manifest, a directory of them, or - for stdin.
        #[arg(short = 'f', long = "file", default_value = "VMFile.kdl")]
        file: PathBuf,
        /// Output format of the result.
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },
    /// Print the resources a VMFile or manifest becomes.
    Convert {
        /// VMFile.kdl, a YAML/JSON manifest, a directory of them, or - for stdin.
        #[arg(short = 'f', long = "file", default_value = "VMFile.kdl")]
        file: PathBuf,
        /// Output format: yaml (multi-document) or json (an array).
        #[arg(short = 'o', long = "output", value_enum, default_value = "yaml")]
        output: Output,
    },
    /// Print the JSON Schema of a kind (vm, image, provision), or of all kinds.
    Schema {
        /// The kind: VirtualMachine (vm), Image (image) or Provision (provision).
        kind: Option<String>,
    },
}
