//! Raw command-line arguments (clap).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// vmctl: declarative local virtual machines.
///
/// Describe VMs in VMFile.kdl (or YAML/JSON manifests); vmctl turns them into
/// VirtualMachine, Image and Provision resources (and Snapshot, by
/// `vmctl snapshot`).
#[derive(Debug, Parser)]
#[command(name = "vmctl", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
    /// The data directory and the agent's socket.
    #[command(flatten)]
    pub paths: vmctl_agent_args::AgentPaths,
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
    /// Which remote agent to talk to, and with which certificate.
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// A remote agent over mutual TLS instead of the local socket (see
/// `vmctl config --help` for how the agent is chosen).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Remote agent (mutual TLS)")]
pub struct RemoteArgs {
    /// Talk to the agent at https://HOST:PORT (its --listen address) over
    /// mutual TLS, never starting one, with the certificates of --context
    /// or the current context (or the three flags below).
    #[arg(long, global = true, env = "VMCTL_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// Use this context of the contexts file (`local`: the local agent's
    /// socket) [default: the file's current-context].
    #[arg(long, global = true, env = "VMCTL_CONTEXT", value_name = "NAME")]
    pub context: Option<String>,
    /// The contexts file [default: $XDG_CONFIG_HOME/vmctl/config.yaml, or
    /// ~/.config/vmctl/config.yaml].
    #[arg(long, global = true, env = "VMCTL_CONFIG", value_name = "FILE")]
    pub contexts: Option<PathBuf>,
    /// The cluster CA's certificate (PEM) the agent's must chain to.
    #[arg(long, global = true, value_name = "FILE")]
    pub certificate_authority: Option<PathBuf>,
    /// This user's certificate (PEM), from `vmctl cluster issue user`.
    #[arg(long, global = true, value_name = "FILE")]
    pub client_certificate: Option<PathBuf>,
    /// This user's private key (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    pub client_key: Option<PathBuf>,
}

/// Output formats of `get`.
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
    /// The agent is its own program, `vmctl-agent`, installed next to
    /// `vmctl`: this runs it with these flags.
    Agent(vmctl_agent_args::AgentArgs),
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
    /// is given, and a `List` (`kind: List`, `items`) otherwise. Without a
    /// kind, every kind that is applied (not nodes: `vmctl get nodes`).
    Get {
        /// Kind: vm, image, provision, snapshot, node; all applied kinds when omitted.
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
        /// Kind: vm, image, provision, snapshot, node.
        kind: String,
        /// Name; every object of the kind when omitted.
        name: Option<String>,
    },
    /// Delete an object, or every object of a file.
    Delete {
        /// Kind: vm, image, provision, snapshot, node (one that is not Ready).
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
        /// Kind: vm, image, provision, snapshot.
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
        /// Kind: vm, image, provision, snapshot, node.
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
    ///
    /// A VM that is still booting is waited for until it answers SSH (its
    /// `SshReady` condition; one line on stderr says so), at most its SSH
    /// timeout (`ssh { timeout … }`, default 120 s). A suspended, stopped
    /// or failed VM, or one without a network, is refused at once.
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
    ///
    /// A VM that is still booting is waited for until it answers SSH (its
    /// `SshReady` condition; one line on stderr says so), at most its SSH
    /// timeout (`ssh { timeout … }`, default 120 s). A suspended, stopped
    /// or failed VM, or one without a network, is refused at once.
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
    /// Save a VM's disks (and memory, when it runs) and bring it back
    /// to that point later: create, list, restore, delete.
    ///
    /// A snapshot of a running (or suspended) VM holds its disks and its
    /// memory, and restoring it brings the VM back running where it was;
    /// a snapshot of a stopped VM holds its disks only and can be
    /// restored to a stopped VM only. Snapshots are qcow2 internal
    /// snapshots on the VM's own disks: deleting the VM deletes them.
    /// Each is a Snapshot object (`vmctl get snapshots`, `vmctl describe
    /// snapshot NAME`), and every snapshot and restore is in the VM's
    /// history (`vmctl history vm NAME`).
    Snapshot {
        /// The snapshot command.
        #[command(subcommand)]
        command: SnapshotCommand,
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
        /// Forward a host port to a guest port, Docker's way:
        /// `8080:80`, `127.0.0.1:8080:80`, `5353:53/udp` (on 127.0.0.1
        /// unless an address is given; user networking only). Repeatable.
        #[arg(long = "port", value_name = "[ADDRESS:]HOST:GUEST[/PROTO]")]
        ports: Vec<vmctl_api::PortForward>,
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
        /// Given, it is kept in the VM's spec (stopTimeoutSeconds) for later
        /// stops; without it the VM's own applies (its VMFile's
        /// `stop-timeout`, default 30).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout: Option<u64>,
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
    ///
    /// A VM that is still booting is waited for until it answers SSH (its
    /// `SshReady` condition; one line on stderr says so), at most its SSH
    /// timeout (`ssh { timeout … }`, default 120 s). A suspended, stopped
    /// or failed VM, or one without a network, is refused at once.
    Cp {
        /// LOCAL or NAME:/path.
        src: String,
        /// NAME:/path or LOCAL.
        dst: String,
    },
    /// Create the cluster CA and the certificates of agents and users, for
    /// mutual TLS between hosts (`vmctl-agent --listen`, `vmctl --server`).
    ///
    /// The CA's key stays in the cluster directory; each agent gets a
    /// directory of its own (`agents/NAME`: ca.crt, agent.crt, agent.key)
    /// to copy to its host and pass as `--tls-dir`, and each user one
    /// (`users/NAME`: ca.crt, user.crt, user.key) that a context names.
    /// Private keys are written with mode 0600.
    Cluster {
        /// The cluster command.
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Show and choose contexts: the remote agents vmctl talks to, each
    /// with the certificates to reach it (as kubectl's kubeconfig).
    ///
    /// The agent a command talks to: `--server URL` (with the certificates
    /// of --context or the current context, or the --certificate-authority,
    /// --client-certificate and --client-key flags); else `--context NAME`;
    /// else the local agent when --socket or --data-dir is given; else the
    /// file's current context; else the local agent's socket. vmctl never
    /// starts a remote agent.
    Config {
        /// The config command.
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print the JSON Schema of a kind (vm, image, provision, snapshot), or of all kinds.
    Schema {
        /// The kind: VirtualMachine (vm), Image (image), Provision (provision)
        /// or Snapshot (snapshot).
        kind: Option<String>,
    },
}

/// `vmctl snapshot` subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a VM (its disks; its memory too when it runs).
    ///
    /// Refused for a VM that does not exist or is being deleted. Without
    /// --wait it returns once the Snapshot object exists; the save runs
    /// in the agent (`vmctl snapshot list` shows its phase).
    Create {
        /// The VM.
        vm: String,
        /// The snapshot's name [default: VM-YYYYMMDD-HHMMSS, UTC].
        name: Option<String>,
        /// Wait until the snapshot is Ready; exit non-zero if it fails.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Output: the Snapshot object as JSON or YAML instead of a line.
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },
    /// List snapshots (of one VM, or of every VM).
    List {
        /// Only the snapshots of this VM.
        vm: Option<String>,
        /// Output format (json and yaml print a `List` of the objects).
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: GetOutput,
    },
    /// Bring a VM back to a snapshot.
    ///
    /// A running VM with a snapshot that has memory state continues from
    /// that moment (disks and memory); a stopped VM gets the snapshot's
    /// disks and stays stopped. A snapshot without memory state (taken
    /// while the VM was stopped) needs the VM stopped first. Refused for a
    /// snapshot that does not exist or is not Ready, and for a VM being
    /// deleted.
    Restore {
        /// The snapshot.
        name: String,
        /// Wait until the restore is done; exit non-zero if it failed.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Delete a snapshot (its saved state is removed from the VM's disks).
    Delete {
        /// The snapshot.
        name: String,
        /// Wait until it is gone.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
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

/// `vmctl cluster` subcommands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Create the cluster CA (DIR/ca.crt, DIR/ca.key) and a certificate
    /// for the first user (DIR/users/USER); with --server, a context for
    /// that user, made current.
    ///
    /// Refused when DIR already has a CA, unless --force: a new CA makes
    /// every certificate of the old one useless.
    Init {
        /// The cluster directory [default: $XDG_CONFIG_HOME/vmctl/cluster].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Replace an existing CA (and the first user's certificate).
        #[arg(long)]
        force: bool,
        /// The first user's name (its certificate's common name).
        #[arg(long, default_value = "admin", value_name = "NAME")]
        user: String,
        /// With --server https://HOST:PORT: also write a context of that
        /// name for this user and that agent, and make it the current one
        /// [default name: USER@HOST].
        #[arg(long = "context-name", value_name = "NAME")]
        context_name: Option<String>,
    },
    /// Issue a certificate of the cluster CA to an agent or a user.
    Issue {
        /// Whom to issue it to.
        #[command(subcommand)]
        command: IssueCommand,
    },
}

/// `vmctl cluster issue` subcommands.
#[derive(Debug, Subcommand)]
pub enum IssueCommand {
    /// An agent's certificate (server and client authentication) in
    /// DIR/agents/NAME: ca.crt, agent.crt, agent.key. Copy that directory
    /// to the agent's host and start it with `--listen IP:PORT --tls-dir
    /// DIR/agents/NAME`.
    Agent {
        /// The agent's name (its node name, by custom).
        name: String,
        /// An IP address or DNS name clients reach the agent at; the
        /// certificate is valid for these only (repeatable).
        #[arg(long = "address", required = true, value_name = "IP|DNS")]
        addresses: Vec<String>,
        /// The cluster directory [default: $XDG_CONFIG_HOME/vmctl/cluster].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Replace an existing certificate of that name.
        #[arg(long)]
        force: bool,
    },
    /// A user's certificate (client authentication; the common name is
    /// the user's name) in DIR/users/NAME: ca.crt, user.crt, user.key.
    User {
        /// The user's name.
        name: String,
        /// The cluster directory [default: $XDG_CONFIG_HOME/vmctl/cluster].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Replace an existing certificate of that name.
        #[arg(long)]
        force: bool,
        /// With --server https://HOST:PORT: also write a context of that
        /// name for this user and that agent, and make it the current one
        /// [default name: NAME@HOST].
        #[arg(long = "context-name", value_name = "NAME")]
        context_name: Option<String>,
    },
}

/// `vmctl config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// List the contexts; the current one is marked `*`.
    GetContexts {
        /// Output format: a table (text), or the file's contexts as YAML or JSON.
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },
    /// Print the current context's name (`local` when there is none).
    CurrentContext,
    /// Make NAME the current context (`local`: the local agent's socket).
    UseContext {
        /// The context.
        name: String,
    },
    /// Add a context, or change one: its agent (--server), CA
    /// (--certificate-authority), certificate (--client-certificate) and
    /// key (--client-key); a new one needs all four.
    SetContext {
        /// The context's name.
        name: String,
    },
    /// Remove a context (the current one too: then the local agent is).
    DeleteContext {
        /// The context.
        name: String,
    },
}
