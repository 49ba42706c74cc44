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
    /// Data directory of the agent [default: $XDG_DATA_HOME/vmctl or ~/.local/share/vmctl].
    #[arg(long, global = true, env = "VMCTL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The agent's socket [default: <data-dir>/agent.sock].
    #[arg(long, global = true, env = "VMCTL_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Do not start an agent when none answers.
    #[arg(long, global = true)]
    pub no_autostart: bool,
    /// How long one request to the agent may take before vmctl gives up
    /// (`10s`, `2m`; plain seconds; 0: no limit) [default: 30s, and 10 ms
    /// more per object of an apply]. Streams (watch, follow) have no limit
    /// once they started.
    #[arg(long, global = true, env = "VMCTL_REQUEST_TIMEOUT",
          value_parser = crate::client::parse_request_timeout)]
    pub request_timeout: Option<std::time::Duration>,
}

/// Output formats of `get`.
/// The agent's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// Embedded sled database in the data directory.
    Sled,
    /// etcd v3 cluster.
    Etcd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GetOutput {
    /// A table.
    Table,
    /// A table with more columns.
    Wide,
    /// JSON: the object itself with a NAME, else a `List` of `items`.
    Json,
    /// YAML: the object itself with a NAME, else a `List` of `items`.
    Yaml,
    /// `kind/name` per line.
    Name,
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
    /// Run the agent in the foreground (for a service manager).
    ///
    /// vmctl starts one in the background by itself when none is running.
    Agent {
        /// Hypervisor driver: qemu, or fake (in memory, for tests and
        /// benchmarks) [default: `driver` in <data-dir>/agent.toml, else qemu].
        #[arg(long, env = "VMCTL_DRIVER")]
        driver: Option<String>,
        /// Where objects are kept: sled (embedded, in the data directory) or
        /// etcd (shared; needs --etcd-endpoints) [default: `store` in
        /// <data-dir>/agent.toml, else sled].
        #[arg(long, env = "VMCTL_STORE", value_enum)]
        store: Option<StoreKind>,
        /// etcd client URLs, comma-separated (e.g. http://127.0.0.1:2379)
        /// [default: `endpoints` under [etcd] in <data-dir>/agent.toml].
        #[arg(long, env = "VMCTL_ETCD_ENDPOINTS", value_delimiter = ',')]
        etcd_endpoints: Vec<String>,
        /// Prefix of every etcd key of this installation [default: `prefix`
        /// under [etcd] in <data-dir>/agent.toml, else /vmctl/].
        #[arg(long, env = "VMCTL_ETCD_PREFIX")]
        etcd_prefix: Option<String>,
        #[command(flatten)]
        propolis: PropolisArgs,
        /// Let the members of this group use the agent: its socket gets the
        /// group and mode 0660 (default: 0600, this user only). Put the
        /// socket outside the data directory (--socket), which stays 0700.
        #[arg(long, env = "VMCTL_SOCKET_GROUP")]
        socket_group: Option<String>,
    },
    /// Create or update the resources of a VMFile or manifest.
    ///
    /// Prints created / configured / unchanged per object.
    Apply {
        /// VMFile.kdl, a YAML/JSON manifest, a directory of them, or - for stdin.
        #[arg(short = 'f', long = "file", default_value = "VMFile.kdl")]
        file: PathBuf,
        /// Show what would change without changing anything.
        #[arg(long)]
        dry_run: bool,
        /// Delete objects earlier applied from this file that it no longer has
        /// (deleting a VM deletes its disk).
        #[arg(long)]
        prune: bool,
        /// Output format of the result.
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
        /// Wait until every applied object is Ready; exit non-zero with the
        /// failing condition's reason.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Re-apply whenever the file (or a script or file it uses) is saved.
        #[arg(long, conflicts_with_all = ["wait", "dry_run"])]
        watch: bool,
    },
    /// List objects, or show one.
    ///
    /// As with kubectl, `-o json|yaml` prints the object itself when a NAME
    /// is given, and a `List` (`kind: List`, `items`) otherwise.
    Get {
        /// Kind: vm, image, provision; all kinds when omitted.
        kind: Option<String>,
        /// One object's name.
        name: Option<String>,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: GetOutput,
        /// Only objects with these labels (key=value, repeatable).
        #[arg(short = 'l', long = "selector")]
        selector: Vec<String>,
        /// After listing, print a row whenever a listed kind changes (Ctrl-C to stop).
        #[arg(short = 'w', long = "watch")]
        watch: bool,
    },
    /// Show objects in detail: spec, status, conditions and recent notes.
    ///
    /// With a name, that object; without, every object of the kind, by name.
    /// Repeated identical notes show once, with a count: `2m (x5 over 10m)`.
    Describe {
        /// Kind: vm, image, provision.
        kind: String,
        /// Name; every object of the kind when omitted.
        name: Option<String>,
    },
    /// Delete an object, or every object of a file.
    Delete {
        /// Kind: vm, image, provision.
        kind: Option<String>,
        /// Name.
        name: Option<String>,
        /// Delete every object this file defines.
        #[arg(short = 'f', long = "file", conflicts_with_all = ["kind", "name"])]
        file: Option<PathBuf>,
        /// Wait until the objects are gone (their finalizers have run).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Add or remove an object's finalizers (e.g. one that keeps it Terminating).
    ///
    /// A finalizer makes a deleted object wait until it is removed. Finalizers
    /// you set (in a file's metadata.finalizers or with --add-finalizer) are
    /// yours; those under vmctl.dev/ belong to vmctl's controllers and change
    /// only with --force. Removing the last finalizer of a Terminating object
    /// deletes it.
    #[command(group(clap::ArgGroup::new("change").required(true).multiple(true).args(["add_finalizer", "remove_finalizer"])))]
    Patch {
        /// Kind: vm, image, provision.
        kind: String,
        /// Name.
        name: String,
        /// Add this finalizer (repeatable).
        #[arg(long, value_name = "FINALIZER")]
        add_finalizer: Vec<String>,
        /// Remove this finalizer (repeatable).
        #[arg(long, value_name = "FINALIZER")]
        remove_finalizer: Vec<String>,
        /// Allow changing finalizers of vmctl's controllers (vmctl.dev/...):
        /// the cleanup they guard (VM teardown, image file removal) is skipped.
        #[arg(long)]
        force: bool,
        /// Fail with a conflict unless the object is at this resourceVersion.
        #[arg(long)]
        resource_version: Option<u64>,
    },
    /// Show how the live objects differ from a file (exit 1 when they differ).
    Diff {
        /// VMFile.kdl, a YAML/JSON manifest, a directory of them, or - for stdin.
        #[arg(short = 'f', long = "file", default_value = "VMFile.kdl")]
        file: PathBuf,
    },
    /// Show every recorded change of one object, oldest first.
    History {
        /// Kind: vm, image, provision.
        kind: String,
        /// Name.
        name: String,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },
    /// Show notes (Kubernetes-style events) recorded by the controllers.
    ///
    /// Identical notes (same object, type, reason and message) show once,
    /// with a count and when they were first and last seen: `2m (x5 over
    /// 10m)`; `-o json|yaml` carries `count`, `firstTimestamp` and
    /// `lastTimestamp`. `--watch` then prints each new note as it comes.
    Events {
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
        /// Keep printing new notes as they are recorded (Ctrl-C to stop).
        #[arg(short = 'w', long = "watch")]
        watch: bool,
    },
    /// Open an SSH session (or run a command) on a VM with the system `ssh`, through the agent.
    ///
    /// The host key is the one vmctl generated and pinned for the VM; the
    /// name may be left out when VMFile.kdl in this directory has one VM.
    Ssh {
        /// The VM.
        name: Option<String>,
        /// Log in as this user instead of the VMFile's.
        #[arg(long)]
        user: Option<String>,
        /// Use this private key instead of the VM's.
        #[arg(long)]
        key: Option<PathBuf>,
        /// A command to run instead of a login shell.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Run a command on a VM without a terminal; exits with its exit code.
    Exec {
        /// The VM.
        name: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Pipe stdin and stdout to a VM's SSH port through the agent (the
    /// ProxyCommand of `vmctl ssh`).
    #[command(hide = true)]
    Tunnel {
        /// The VM.
        name: String,
    },
    /// Show a VM's console and provision logs.
    Log {
        /// The VM.
        name: String,
        /// Only the serial console log (boot and cloud-init output).
        #[arg(long)]
        console: bool,
        /// Only the provision log.
        #[arg(long)]
        provision: bool,
        /// Only the last N lines (0 = all).
        #[arg(short = 'n', long, default_value_t = 0)]
        tail: usize,
        /// Keep printing what is appended (needs --console or --provision).
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Run a VM's provisioners again (recorded in its history) and wait for them.
    Provision {
        /// The VM; without it, every VM of the VMFile (see --name).
        name: Option<String>,
        /// The VMFile to take VM names from.
        #[arg(short = 'f', long = "file", default_value = "VMFile.kdl")]
        file: PathBuf,
        /// Only this VM of the VMFile.
        #[arg(long = "name")]
        only: Option<String>,
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Manage images: pull, list, inspect, rm, prune.
    Image {
        /// The image command.
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Create a VM (stopped unless --start), as the manual's `vmctl create`.
    Create {
        /// VM name.
        #[arg(long)]
        name: String,
        /// Path to a local disk image.
        #[arg(long, conflicts_with = "image_url")]
        image: Option<PathBuf>,
        /// URL to download an image from.
        #[arg(long)]
        image_url: Option<String>,
        /// Number of virtual CPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory in MiB.
        #[arg(long, default_value_t = 1024)]
        memory: u64,
        /// Disk size in GiB.
        #[arg(long)]
        disk: Option<u64>,
        /// Bridge for TAP networking (default: user networking).
        #[arg(long)]
        bridge: Option<String>,
        /// A cloud-init user-data file, passed through.
        #[arg(long = "cloud-init")]
        cloud_init: Option<PathBuf>,
        /// An SSH public key file to authorise.
        #[arg(long = "ssh-key")]
        ssh_key: Option<PathBuf>,
        /// Start it and wait until it runs.
        #[arg(long)]
        start: bool,
        /// How long --start waits, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Start a VM and wait until it runs.
    Start {
        /// The VM.
        name: String,
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Stop a VM (ACPI shutdown, forced after the agent's stop timeout) and wait.
    Stop {
        /// The VM.
        name: String,
        /// Graceful shutdown timeout in seconds: how long the guest has to
        /// power off after the ACPI button before QEMU is quit, then killed.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout: u64,
    },
    /// Pause a running VM.
    Suspend {
        /// The VM.
        name: String,
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Continue a paused VM.
    Resume {
        /// The VM.
        name: String,
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Delete a VM and everything it owns (disk, seed, work directory).
    Destroy {
        /// The VM.
        name: String,
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// List VMs with the manual's columns.
    List {
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },
    /// Show one VM's details (the manual's fields).
    Status {
        /// The VM.
        name: String,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },
    /// Bring up the VMs of a VMFile: apply, boot, provision, wait.
    Up {
        /// The VMFile.
        #[arg(short = 'f', long = "file", default_value = "VMFile.kdl")]
        file: PathBuf,
        /// Only this VM.
        #[arg(long)]
        name: Option<String>,
        /// Do not apply the provisioners.
        #[arg(long)]
        no_provision: bool,
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
    },
    /// Stop the VMs of a VMFile, or delete them with --destroy.
    Down {
        /// The VMFile.
        #[arg(short = 'f', long = "file", default_value = "VMFile.kdl")]
        file: PathBuf,
        /// Only this VM.
        #[arg(long)]
        name: Option<String>,
        /// Delete the VMs and their disks.
        #[arg(long)]
        destroy: bool,
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Destroy and recreate the VMs of a VMFile, then provision them again.
    Reload {
        /// The VMFile.
        #[arg(short = 'f', long = "file", default_value = "VMFile.kdl")]
        file: PathBuf,
        /// Only this VM.
        #[arg(long)]
        name: Option<String>,
        /// Do not apply the provisioners.
        #[arg(long)]
        no_provision: bool,
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
    },
    /// Attach to a VM's serial console (type Ctrl-] then Enter to detach).
    Console {
        /// The VM.
        name: String,
    },
    /// Print a shell completion script (e.g. `vmctl completions bash > /etc/bash_completion.d/vmctl`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), generated from these definitions.
    Man,
    /// Copy a file to or from a VM through the agent (SFTP on its side; the mode is kept both ways).
    Cp {
        /// LOCAL or NAME:/path.
        src: String,
        /// NAME:/path or LOCAL.
        dst: String,
    },
    /// Print the JSON Schema of a kind (vm, image, provision), or of all kinds.
    Schema {
        /// The kind: VirtualMachine (vm), Image (image) or Provision (provision).
        kind: Option<String>,
    },
}

/// `vmctl image` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Download an image into the cache (as an Image object) and wait for it.
    Pull {
        /// http(s):// or file:// URL; `.zst`/`.zstd` are decompressed.
        url: String,
        /// The Image's name [default: from the URL's file name].
        #[arg(long)]
        name: Option<String>,
        /// Expected digest, `sha256:<hex>` or `sha512:<hex>`.
        #[arg(long)]
        checksum: Option<String>,
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// List images with their size, format and the VMs that use them.
    List {
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },
    /// Show a disk image file's format and sizes (qemu-img), or an Image object.
    Inspect {
        /// A file path or an image name.
        target: String,
    },
    /// Delete an image (refused while a VM uses it).
    Rm {
        /// The image's name.
        name: String,
    },
    /// Delete every image no VM uses.
    Prune,
}

/// Settings of the Propolis driver (`vmctl agent --driver propolis`), each
/// [default: the same key under [propolis] in <data-dir>/agent.toml, else
/// the driver's default].
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Propolis driver (illumos)")]
pub struct PropolisArgs {
    /// Where host commands (zfs, zoneadm, zonecfg, dladm) run: system
    /// (illumos), or simulated (any OS, against a mock propolis-server)
    /// [default: system].
    #[arg(
        long = "propolis-host",
        env = "VMCTL_PROPOLIS_HOST",
        value_name = "HOST"
    )]
    pub host: Option<String>,
    /// The first VM's propolis-server address; later VMs use the next
    /// ports [default: 127.0.0.1:12400].
    #[arg(
        long = "propolis-addr",
        env = "VMCTL_PROPOLIS_ADDR",
        value_name = "IP:PORT"
    )]
    pub addr: Option<String>,
    /// ZFS pool of images ({pool}/images/IMAGE@latest) and VM disks
    /// ({pool}/vms/VM) [default: rpool].
    #[arg(
        long = "propolis-pool",
        env = "VMCTL_PROPOLIS_POOL",
        value_name = "POOL"
    )]
    pub pool: Option<String>,
    /// Zone brand that runs propolis-server [default: nebula-vm].
    #[arg(
        long = "propolis-brand",
        env = "VMCTL_PROPOLIS_BRAND",
        value_name = "BRAND"
    )]
    pub brand: Option<String>,
    /// Directory of the VMs' zone paths [default: /zones].
    #[arg(
        long = "propolis-zone-root",
        env = "VMCTL_PROPOLIS_ZONE_ROOT",
        value_name = "DIR"
    )]
    pub zone_root: Option<String>,
    /// Physical link to create VNICs on [default: none; VNICs must exist].
    #[arg(
        long = "propolis-vnic-link",
        env = "VMCTL_PROPOLIS_VNIC_LINK",
        value_name = "LINK"
    )]
    pub vnic_link: Option<String>,
    /// How long a start may take (zone boot, server up, instance Running),
    /// in seconds [default: 120].
    #[arg(
        long = "propolis-start-timeout",
        env = "VMCTL_PROPOLIS_START_TIMEOUT",
        value_name = "SECONDS"
    )]
    pub start_timeout: Option<u64>,
}
