//! Integration tests of the controllers against the fake drivers and a real
//! sled store in a temporary directory.

mod common;
mod concurrency;
mod disks;
mod failures;
mod lifecycle;
mod nodes;
mod readiness;
mod restart;
mod snapshots;
mod takeover;
