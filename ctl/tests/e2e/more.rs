//! Watch mode, lifecycle edges, more faults, two VMs at once.
#[allow(unused_imports)]
use super::*;
