//! The per-host vmctl agent.
//!
//! The agent is the only process that opens the store. It runs the
//! controllers and serves JSON over HTTP on a Unix socket (mode 0600, in a
//! 0700 data directory). Streams (watch) are newline-delimited JSON.
//!
//! ```text
//!  vmctl ──HTTP/unix──▶ api (axum) ──async──▶ Store (sled or etcd)
//!                                                        │ watch
//!                                                 controllers ──▶ drivers
//! ```

pub mod actions;
pub mod api;
pub mod cache;
pub mod compaction;
pub mod config;
pub mod door;
pub mod finalizers;
pub mod forward;
pub mod http;
pub mod lease;
pub mod node;
pub mod openapi;
pub mod rejection;
pub mod server;
pub mod snapshots;
pub mod socket;
pub mod streams;

pub use config::{
    AgentConfig, AgentOverrides, ConfigError, PropolisSettings, StoreConfig, StoreKind,
};
pub use server::{AgentError, run, run_until};
