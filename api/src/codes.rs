//! Every diagnostic code vmctl emits, with what to do about it.
//!
//! The codes of the manual of the tool we replace (`vm_manager::…`) exist
//! here under our crate name (`vmctl::…`), with the manual's help text or
//! better. A test scans the source tree so that a code cannot be used
//! without being registered here.

/// One diagnostic code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    /// The code, e.g. `vmctl::vm::not_found`.
    pub code: &'static str,
    /// When it is emitted.
    pub trigger: &'static str,
    /// What the user should do about it.
    pub help: &'static str,
}

const fn c(code: &'static str, trigger: &'static str, help: &'static str) -> Code {
    Code {
        code,
        trigger,
        help,
    }
}

/// The codes of the manual's error table, under our crate name.
pub const MANUAL: &[&str] = &[
    "vmctl::qemu::spawn_failed",
    "vmctl::qemu::qmp_connect_failed",
    "vmctl::qemu::qmp_command_failed",
    "vmctl::image::overlay_creation_failed",
    "vmctl::network::ip_discovery_timeout",
    "vmctl::propolis::unreachable",
    "vmctl::cloudinit::iso_failed",
    "vmctl::ssh::failed",
    "vmctl::ssh::keygen_failed",
    "vmctl::image::download_failed",
    "vmctl::image::format_detection_failed",
    "vmctl::image::conversion_failed",
    "vmctl::vm::not_found",
    "vmctl::vm::invalid_state",
    "vmctl::backend::not_available",
    "vmctl::vmfile::not_found",
    "vmctl::vmfile::parse_failed",
    "vmctl::vmfile::validation",
    "vmctl::provision::failed",
    "vmctl::io",
];

/// Every code, sorted by name.
pub const CODES: &[Code] = &[
    c(
        "vmctl::agent::config",
        "`vmctl agent`'s settings cannot be used: <data-dir>/agent.toml is unreadable, not TOML, has an unknown key or a bad value (file:line:column), or etcd is selected without endpoints",
        "fix the named line of <data-dir>/agent.toml (keys: driver, store, and under [etcd]: endpoints, prefix), or the flag / VMCTL_* variable; flags win over variables, variables over the file",
    ),
    c(
        "vmctl::agent::error",
        "the agent answered with an error that carries no code",
        "see the message; the agent's log (<data-dir>/agent.log) may say more",
    ),
    c(
        "vmctl::agent::failed",
        "`vmctl agent` could not start or stopped with an error",
        "see the message and the agent's log (<data-dir>/agent.log)",
    ),
    c(
        "vmctl::agent::forward_failed",
        "a request about a VM of another node could not be forwarded to that node's agent: it has no TLS address (--listen), does not answer, or refused this agent's certificate",
        "check that node's agent (`vmctl get node NODE -o wide`, its log) and that both agents have certificates of the same cluster CA; or send the request to it directly with `vmctl --server`",
    ),
    c(
        "vmctl::agent::io",
        "talking to the agent over its socket failed",
        "the agent may have stopped; run the command again (it starts one) or see <data-dir>/agent.log",
    ),
    c(
        "vmctl::agent::locked",
        "`vmctl agent` did not start: another agent holds the data directory (exit code 3)",
        "use the running agent (vmctl talks to it), or stop it first",
    ),
    c(
        "vmctl::agent::not_installed",
        "`vmctl agent`, or a command that starts an agent, found no `vmctl-agent` program next to `vmctl`",
        "install both programs into one directory: `cargo install --path ctl` and `cargo install --path agent` (or copy vmctl and vmctl-agent together); from a source tree, `cargo build -p vmctl-agent`",
    ),
    c(
        "vmctl::agent::protocol",
        "the agent's answer is not what this vmctl expects",
        "are vmctl and the agent the same version? restart the agent",
    ),
    c(
        "vmctl::agent::start_failed",
        "no agent answered, and the one the command started exited or did not answer within 30 s",
        "the message shows the end of its log (<data-dir>/agent.log): fix what it says and run the command again; `vmctl agent` runs one in the foreground",
    ),
    c(
        "vmctl::agent::timeout",
        "the agent accepted the connection but did not answer within --request-timeout",
        "see the agent's log (<data-dir>/agent.log); if it is only busy, raise --request-timeout (0: no limit)",
    ),
    c(
        "vmctl::agent::unreachable",
        "no agent answers on the socket",
        "start one with `vmctl agent`, or drop --no-autostart",
    ),
    c(
        "vmctl::api::already_exists",
        "a create-only request named an object that exists",
        "pick another name, or apply (create or update) instead of creating",
    ),
    c(
        "vmctl::api::bad_request",
        "the agent refused a malformed or invalid request",
        "fix the request; `vmctl validate` checks files before they are applied",
    ),
    c(
        "vmctl::api::conflict",
        "the object changed between reading and writing it",
        "the object changed meanwhile; read it again and retry",
    ),
    c(
        "vmctl::api::method_not_allowed",
        "the endpoint exists but not with this HTTP method",
        "use a method the endpoint allows (the error names them; see agent/openapi.json)",
    ),
    c(
        "vmctl::api::no_route",
        "the agent has no such endpoint",
        "see agent/openapi.json; are vmctl and the agent the same version?",
    ),
    c(
        "vmctl::api::not_found",
        "the agent has no such object",
        "run `vmctl get` to list objects",
    ),
    c(
        "vmctl::api::panic",
        "the agent failed internally while answering",
        "internal error; see the agent log and please report it",
    ),
    c(
        "vmctl::api::payload_too_large",
        "a request body is larger than the agent accepts",
        "split the file into several applies; the limits are in the README and agent/openapi.json",
    ),
    c(
        "vmctl::api::protected_finalizer",
        "a finalizer owned by vmctl's controllers was to be changed by hand",
        "let the controller clear it; pass --force only if that controller can never run again",
    ),
    c(
        "vmctl::api::request_timeout",
        "the client did not send the request body in time",
        "send the whole body at once; the agent closes slow requests",
    ),
    c(
        "vmctl::api::too_old",
        "a watch started from a compacted resource version",
        "list again and watch from the listing's resourceVersion",
    ),
    c(
        "vmctl::api::unknown_kind",
        "the agent was asked for a kind it does not know",
        "kinds are vm, image, provision, snapshot and node",
    ),
    c(
        "vmctl::apply::failed",
        "an applied object failed while `--wait` waited for it",
        "run `vmctl describe KIND NAME` for the failing condition",
    ),
    c(
        "vmctl::apply::incomplete",
        "the agent's answer to an apply did not acknowledge every object",
        "run the apply again; `vmctl get` shows what was written",
    ),
    c(
        "vmctl::apply::prune_needs_file",
        "`apply --prune` was given standard input",
        "apply from a file or directory to prune",
    ),
    c(
        "vmctl::apply::refused",
        "`--wait` saw an applied spec change refused by its controller (e.g. a disk asked to shrink); the object runs on as it was",
        "change the spec back as the message says (e.g. a disk size at least the one it has) and apply again; `vmctl describe KIND NAME` shows the condition",
    ),
    c(
        "vmctl::apply::timeout",
        "objects were not Ready before `--timeout`",
        "raise --timeout, or run `vmctl describe` on the objects still waiting",
    ),
    c(
        "vmctl::apply::watch_needs_file",
        "`apply --watch` was given standard input",
        "name a file with -f",
    ),
    c(
        "vmctl::backend::not_available",
        "the requested hypervisor backend is not supported here",
        "backends are `qemu` (default) and `fake` (in memory, for tests); this platform has no other",
    ),
    c(
        "vmctl::cli::ambiguous_vm",
        "a VM name was left out but VMFile.kdl defines several VMs",
        "name one of the VMs of VMFile.kdl",
    ),
    c(
        "vmctl::cli::bad_name",
        "a name argument is not a DNS-1123 label",
        crate::names::NAME_HELP,
    ),
    c(
        "vmctl::cli::bad_selector",
        "a label selector is not key=value",
        "write -l key=value",
    ),
    c(
        "vmctl::cli::unknown_kind",
        "a kind argument is not vm, image, provision, snapshot or node",
        "kinds are vm, image, provision, snapshot and node",
    ),
    c(
        "vmctl::cli::usage",
        "the arguments do not fit together",
        "see `vmctl help COMMAND`",
    ),
    c(
        "vmctl::cloudinit::invalid",
        "the cloud-init settings cannot make a seed",
        "check the VM's cloud-init block (user-data file, SSH key)",
    ),
    c(
        "vmctl::cloudinit::iso_failed",
        "writing the cloud-init seed ISO failed",
        "install genisoimage, mkisofs or xorriso, or set VMCTL_SEED_TOOL=builtin (pure-Rust writer)",
    ),
    c(
        "vmctl::cluster::exists",
        "`vmctl cluster init` found a CA in its directory, or `cluster issue` a certificate of that name, and --force was not given",
        "pass --force to replace it (a new CA makes every certificate of the old one useless), or use another --dir or name",
    ),
    c(
        "vmctl::cluster::failed",
        "`vmctl cluster` could not make or write a key or certificate",
        "check the permissions of the cluster directory (--dir)",
    ),
    c(
        "vmctl::cluster::no_ca",
        "`vmctl cluster issue` found no ca.crt and ca.key in the cluster directory",
        "run `vmctl cluster init --dir DIR` first, or pass the --dir that has the CA",
    ),
    c(
        "vmctl::config::contexts",
        "the contexts file cannot be read or written, is invalid, has no context of the name asked for, or --server is not https://HOST:PORT or has no certificate to go with it",
        "`vmctl config get-contexts` lists the contexts; `vmctl cluster issue user NAME --server URL` or `vmctl config set-context` writes one",
    ),
    c(
        "vmctl::delete::timeout",
        "objects still existed when `delete --wait` gave up",
        "run `vmctl describe KIND NAME`: its finalizers have not run",
    ),
    c(
        "vmctl::disk::shrink_refused",
        "a VM's disk size was lowered below its current size",
        "disks only grow; keep the size, or `vmctl reload` to recreate the VM with a new disk",
    ),
    c(
        "vmctl::get::resync",
        "a watch ended because the agent asked for a resync",
        "run the command again",
    ),
    c(
        "vmctl::image::backing_file",
        "an image refers to a backing file",
        "use a self-contained image (`qemu-img convert` flattens it)",
    ),
    c(
        "vmctl::image::bad_url",
        "an image URL is malformed",
        "give an http://, https:// or file:// URL",
    ),
    c(
        "vmctl::image::cache_failed",
        "the image cache directory cannot be written",
        "check the permissions and free space of the data directory",
    ),
    c(
        "vmctl::image::checksum_mismatch",
        "a download's digest differs from the pinned checksum",
        "check the checksum against the image's publisher; the download was discarded",
    ),
    c(
        "vmctl::image::conversion_failed",
        "converting an image's format failed",
        "ensure qemu-img is installed and there is enough disk space",
    ),
    c(
        "vmctl::image::download_failed",
        "downloading an image failed",
        "check network connectivity and the URL",
    ),
    c(
        "vmctl::image::external_reference",
        "an image refers to a file outside itself (a qcow2 external data file)",
        "use a self-contained image: `qemu-img convert -O qcow2 IN OUT` makes one",
    ),
    c(
        "vmctl::image::format_detection_failed",
        "an image's format cannot be detected",
        "ensure qemu-img is installed and the file is a valid disk image",
    ),
    c(
        "vmctl::image::in_use",
        "an image that VMs use was to be deleted",
        "delete the VMs that use it first",
    ),
    c(
        "vmctl::image::invalid",
        "an Image's spec is invalid",
        "fix the URL or checksum given",
    ),
    c(
        "vmctl::image::invalid_checksum",
        "a checksum is not sha256:<hex> or sha512:<hex>",
        "write the checksum as sha256:<64 hex digits> or sha512:<128 hex digits>",
    ),
    c(
        "vmctl::image::not_found",
        "an image (object or local file) does not exist",
        "run `vmctl image list` to see images, or check the image's path",
    ),
    c(
        "vmctl::image::overlay_creation_failed",
        "creating a VM's qcow2 overlay disk failed",
        "ensure qemu-img is installed and the base image exists and is readable",
    ),
    c(
        "vmctl::image::unsupported_compression",
        "an image is compressed or archived in a way vmctl does not unpack, or a local image file is compressed",
        "vmctl unpacks gzip, xz and zstd downloads; unpack anything else yourself and give the disk image inside",
    ),
    c(
        "vmctl::image::unsupported_format",
        "an image is neither raw nor a plain qcow2 (vmdk, vhdx, vdi, encrypted qcow2, …)",
        "convert it: `qemu-img convert -O qcow2 IN OUT`",
    ),
    c(
        "vmctl::image::unsupported_url",
        "an image URL has a scheme other than http, https or file",
        "give an http://, https:// or file:// URL",
    ),
    c(
        "vmctl::io",
        "reading or writing a local file failed",
        "check the path and its permissions",
    ),
    c(
        "vmctl::manifest::invalid",
        "a YAML or JSON manifest has errors",
        "fix the problems shown; `vmctl validate` lists them all with their location",
    ),
    c(
        "vmctl::network::ip_discovery_timeout",
        "the guest's IP address was not found in time",
        "the guest may have no DHCP lease; check its network config and cloud-init (`vmctl log NAME --console`)",
    ),
    c(
        "vmctl::node::not_found",
        "a command named a node that is not registered",
        "`vmctl get nodes` lists the nodes; a node is registered by its agent when that agent starts (its --node-name, by default the host name)",
    ),
    c(
        "vmctl::node::ready",
        "a Node was to be deleted while it is Ready (its agent runs and would register it again)",
        "stop that node's agent first (its Node turns NotReady when it stops, or within its node lease TTL + 2 s if it was killed: `vmctl get nodes`), then delete the Node",
    ),
    c(
        "vmctl::propolis::api_failed",
        "propolis-server refused a request, or the instance went to Failed (illumos backend)",
        "see the message for the request and propolis-server's answer; the VM's zone log and `vmctl log NAME --console` may say more",
    ),
    c(
        "vmctl::propolis::host_command_failed",
        "a host command of the Propolis backend (zfs, zoneadm, zonecfg, dladm, qemu-img) failed",
        "run the command shown by hand to see why; vmctl finishes an interrupted prepare or destroy on its next try",
    ),
    c(
        "vmctl::propolis::unreachable",
        "propolis-server cannot be reached (illumos backend)",
        "ensure propolis-server is running and listening on the expected address",
    ),
    c(
        "vmctl::propolis::unsupported",
        "the VM asks for something the Propolis backend cannot do (suspend, user or tap networking)",
        "use `network \"vnic\" name=\"vnic0\"` (or \"none\"); stop the VM instead of suspending it",
    ),
    c(
        "vmctl::provision::failed",
        "a provisioning step failed",
        "check the provisioner's config and the VM's SSH reachability; `vmctl log NAME --provision` shows the output",
    ),
    c(
        "vmctl::provision::not_found",
        "a VM has no Provision object",
        "add provision blocks to the VM in its VMFile and apply it",
    ),
    c(
        "vmctl::qemu::hotplug_failed",
        "an extra disk could not be attached to or detached from a running QEMU (hot-plug)",
        "the disk is attached or detached at the next start: stop and start the VM, or set update-policy \"restart\"; the message says why (no free PCIe root port, a guest that did not release the disk)",
    ),
    c(
        "vmctl::qemu::qmp_command_failed",
        "QEMU rejected a QMP command",
        "see the message; the VM's console log (`vmctl log NAME --console`) may say more",
    ),
    c(
        "vmctl::qemu::qmp_connect_failed",
        "QEMU's QMP socket cannot be reached",
        "QEMU may have exited before its QMP socket was ready; check the logs in the VM's work directory",
    ),
    c(
        "vmctl::qemu::share_failed",
        "a shared folder could not be served when the VM started (its host folder is gone, or virtiofsd did not start)",
        "create the host folder again (or remove the `share`), check virtiofsd-N.log in the VM's work dir, then start the VM; VMCTL_VIRTIOFSD=none uses 9p instead",
    ),
    c(
        "vmctl::qemu::snapshot_failed",
        "QEMU or qemu-img could not save, restore, list or delete a snapshot",
        "see the message and `vmctl describe snapshot NAME`; a full disk or a disk that is not qcow2 are the usual causes",
    ),
    c(
        "vmctl::qemu::spawn_failed",
        "the QEMU process failed to start",
        "ensure qemu-system-x86_64 is installed and in PATH, and KVM is available (/dev/kvm), or set VMCTL_ACCEL=tcg",
    ),
    c(
        "vmctl::schema::unknown_kind",
        "`vmctl schema` was given an unknown kind",
        "kinds are VirtualMachine (vm), Image (image), Provision (provision), Snapshot (snapshot) and Node (node)",
    ),
    c(
        "vmctl::snapshot::exists",
        "`vmctl snapshot create VM NAME` named a snapshot that exists already",
        "pick another name, or leave it out for a generated one (VM-YYYYMMDD-HHMMSS)",
    ),
    c(
        "vmctl::snapshot::needs_stopped_vm",
        "a restore of a disk-only snapshot (taken while the VM was stopped) to a running VM",
        "stop the VM (`vmctl stop NAME`), restore, then start it (`vmctl start NAME`)",
    ),
    c(
        "vmctl::snapshot::not_found",
        "a snapshot command named a snapshot that does not exist",
        "`vmctl snapshot list` shows the snapshots of every VM",
    ),
    c(
        "vmctl::snapshot::not_ready",
        "a restore of a snapshot that is not Ready (still being saved, or its save failed)",
        "wait for it (`vmctl snapshot list`), or delete a Failed one and create another",
    ),
    c(
        "vmctl::snapshot::restore_failed",
        "the agent could not bring a VM back to a snapshot",
        "see `vmctl describe snapshot NAME` (its Restored condition) and the VM's events",
    ),
    c(
        "vmctl::snapshot::vm_changed",
        "an apply that changes which VM an existing snapshot is of",
        "a snapshot stays with its VM: create a new snapshot of the other VM (`vmctl snapshot create VM`)",
    ),
    c(
        "vmctl::snapshot::vm_deleting",
        "a snapshot or restore of a VM that is being deleted",
        "wait for the deletion to end; its snapshots go with it",
    ),
    c(
        "vmctl::snapshot::vm_not_found",
        "a snapshot or restore of a VM that does not exist",
        "check the name with `vmctl get vm`",
    ),
    c(
        "vmctl::ssh::failed",
        "an SSH connection or command failed",
        "check the SSH key, the guest's reachability and that sshd runs in it",
    ),
    c(
        "vmctl::ssh::host_key_mismatch",
        "the guest's host key differs from the one pinned for it",
        "the guest is not the one vmctl created; `vmctl reload` recreates it with a new pinned key",
    ),
    c(
        "vmctl::ssh::keygen_failed",
        "generating an Ed25519 key failed",
        "internal error; please report it",
    ),
    c(
        "vmctl::ssh::no_address",
        "`vmctl ssh`, `exec` or `cp` on a VM without an SSH address (its network is \"none\")",
        "give it a network with SSH (`network \"user\"`, the default, or `network \"tap\"`) and apply again; `vmctl console NAME` reaches it meanwhile",
    ),
    c(
        "vmctl::ssh::not_ready",
        "`vmctl ssh`, `exec` or `cp` waited for the VM to answer SSH (its `SshReady` condition) longer than its SSH timeout",
        "check the guest's console (`vmctl log NAME --console`) and `vmctl describe vm NAME`; raise `ssh { timeout … }` if it boots slowly",
    ),
    c(
        "vmctl::store::failed",
        "the agent's store failed",
        "see the agent log",
    ),
    c(
        "vmctl::store::no_space",
        "the filesystem holding the agent's store is full (HTTP 507); the write was not stored",
        "free space there (`df -h` on the path in the message); writes work again by themselves, no restart needed",
    ),
    c(
        "vmctl::store::unavailable",
        "the agent's store (etcd) cannot be reached now; the message names its endpoints",
        "the agent retries by itself; start etcd or fix --etcd-endpoints",
    ),
    c(
        "vmctl::store::unusable",
        "the agent's store is corrupt or newer than this agent",
        "see the agent log",
    ),
    c(
        "vmctl::tls::files",
        "a certificate, private key or CA file of the TLS listener (`--tls-dir`) or of a context cannot be read, is not PEM, or the key does not match the certificate",
        "issue them again with `vmctl cluster issue agent NAME --address IP` (or `issue user`) and point --tls-dir (or the context) at the directory it writes",
    ),
    c(
        "vmctl::tls::handshake",
        "the TLS handshake with a remote agent failed: it refused this client's certificate (none, or of another CA), or its own certificate is not of the context's CA or does not name the host",
        "use a certificate of the cluster's CA (`vmctl cluster issue user NAME`), that CA's ca.crt as certificate-authority, and an agent certificate issued for the host in --server",
    ),
    c(
        "vmctl::validate::unsupported_by_backend",
        "the file asks for what the agent's backend cannot run (e.g. `network \"user\"` or `\"tap\"` with --driver propolis, `\"vnic\"` with --driver qemu); each place is shown in the file",
        "change the file as the diagnostic says, or run an agent with the driver the file is written for",
    ),
    c(
        "vmctl::vm::exists",
        "`vmctl create` was given the name of an existing VM",
        "pick another name, or `vmctl destroy NAME` first",
    ),
    c(
        "vmctl::vm::failed",
        "`vmctl ssh`, `exec` or `cp` on a VM whose phase is Failed",
        "see why with `vmctl describe vm NAME`",
    ),
    c(
        "vmctl::vm::invalid_state",
        "the operation does not fit the VM's current state",
        "check the VM's state with `vmctl status NAME`",
    ),
    c(
        "vmctl::vm::not_found",
        "no VM has this name",
        "run `vmctl list` to see available VMs",
    ),
    c(
        "vmctl::vm::timeout",
        "a VM did not reach the wanted state in time",
        "run `vmctl describe vm NAME`, or raise --timeout",
    ),
    c(
        "vmctl::vmfile::not_found",
        "VMFile.kdl (or the named file) does not exist",
        "create VMFile.kdl in the current directory or name a file with -f/--file",
    ),
    c(
        "vmctl::vmfile::parse_failed",
        "a VMFile is not valid KDL",
        "check the VMFile.kdl syntax (https://kdl.dev); strings need double quotes",
    ),
    c(
        "vmctl::vmfile::too_large",
        "a VMFile or manifest is larger than vmctl reads (32 MiB)",
        "split it into several files in one directory and apply the directory",
    ),
    c(
        "vmctl::vmfile::validation",
        "a VMFile parses but has invalid values",
        "fix the problems shown; `vmctl validate` lists them all with their location",
    ),
    c(
        "vmctl::vmfile::warning",
        "a file is accepted with warnings",
        "the file is applied; fix the warnings when convenient",
    ),
];

/// The registered code `code`.
pub fn lookup(code: &str) -> Option<&'static Code> {
    CODES
        .binary_search_by(|c| c.code.cmp(code))
        .ok()
        .map(|i| &CODES[i])
}

/// The help text of `code`, if it is registered.
pub fn help(code: &str) -> Option<&'static str> {
    lookup(code).map(|c| c.help)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    #[test]
    fn codes_are_sorted_unique_and_helpful() {
        for w in CODES.windows(2) {
            assert!(
                w[0].code < w[1].code,
                "CODES must be sorted and unique: {} before {}",
                w[0].code,
                w[1].code
            );
        }
        for c in CODES {
            assert!(c.code.starts_with("vmctl::"), "{}", c.code);
            assert!(
                c.code[7..]
                    .chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch == '_' || ch == ':'),
                "{}",
                c.code
            );
            assert!(!c.help.trim().is_empty(), "{} has no help", c.code);
            assert!(!c.trigger.trim().is_empty(), "{} has no trigger", c.code);
        }
    }

    #[test]
    fn every_code_of_the_manual_is_registered_with_help() {
        assert_eq!(MANUAL.len(), 20, "the manual's table has 20 codes");
        for code in MANUAL {
            let c = lookup(code).unwrap_or_else(|| panic!("manual code {code} is not registered"));
            assert!(!c.help.is_empty());
        }
        assert_eq!(help("vmctl::nope"), None);
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                if name != "tests" && name != "target" {
                    rust_files(&p, out);
                }
            } else if name.ends_with(".rs") && name != "tests.rs" {
                out.push(p);
            }
        }
    }

    /// Codes written in source: `"vmctl::…"` literals and `code(vmctl::…)`
    /// attributes, outside `#[cfg(test)]` modules.
    fn codes_in(text: &str) -> BTreeSet<String> {
        let text = text.split("#[cfg(test)]").next().unwrap_or(text);
        let mut out = BTreeSet::new();
        for (open, close) in [("\"vmctl::", '"'), ("code(vmctl::", ')')] {
            let mut rest = text;
            while let Some(i) = rest.find(open) {
                let after = &rest[i + open.len() - "vmctl::".len()..];
                let end = after.find(close).unwrap_or(after.len());
                out.insert(after[..end].trim().to_owned());
                rest = &after[end..];
            }
        }
        out
    }

    #[test]
    fn every_code_used_in_the_source_is_registered() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut files = Vec::new();
        for dir in [
            "api/src",
            "store/src",
            "controllers/src",
            "agent/src",
            "agent-args/src",
            "ctl/src",
            "tls/src",
        ] {
            rust_files(&root.join(dir), &mut files);
        }
        assert!(files.len() > 30, "the source tree was not found: {files:?}");
        let mut used = BTreeSet::new();
        let mut missing = Vec::new();
        for f in &files {
            for code in codes_in(&std::fs::read_to_string(f).unwrap()) {
                if lookup(&code).is_none() {
                    missing.push(format!("{code} ({})", f.display()));
                }
                used.insert(code);
            }
        }
        assert!(
            missing.is_empty(),
            "codes used but not registered in api/src/codes.rs: {missing:#?}"
        );
        // The scan finds what it should (guards against a broken scanner).
        for code in [
            "vmctl::vm::not_found",
            "vmctl::vmfile::parse_failed",
            "vmctl::qemu::spawn_failed",
            "vmctl::agent::unreachable",
        ] {
            assert!(used.contains(code), "{code} not found by the scan");
        }
    }

    #[test]
    fn the_scanner_reads_both_forms() {
        let found = codes_in(
            "let a = \"vmctl::a::b\"; #[diagnostic(code(vmctl::c::d), help(\"x\"))]\n#[cfg(test)]\nmod tests { \"vmctl::e::f\" }",
        );
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            ["vmctl::a::b", "vmctl::c::d"]
        );
    }
}
