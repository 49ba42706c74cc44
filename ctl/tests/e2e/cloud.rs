//! The cloud image (`tests/images/build.sh cloud`): real cloud-init.
#[allow(unused_imports)]
use super::*;
