//! The parts of propolis-server's REST API the driver uses, written from
//! its published OpenAPI document (`openapi/propolis-server` in
//! oxidecomputer/propolis):
//!
//! ```text
//!   PUT /instance                 InstanceEnsureRequest → 201
//!   GET /instance                 InstanceGetResponse
//!   PUT /instance/state           "Run" | "Stop" | "Reboot" → 204
//!   GET /instance/state-monitor   {gen} → {gen, state, migration} once gen is reached
//!   GET /instance/serial          WebSocket (see serial.rs)
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An instance's state, as propolis-server reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PropolisState {
    /// Being initialised.
    Creating,
    /// Run was requested.
    Starting,
    /// The guest runs.
    Running,
    /// Stop was requested.
    Stopping,
    /// Stopped; this server cannot run it again.
    Stopped,
    /// Reboot was requested.
    Rebooting,
    /// Live migration.
    Migrating,
    /// Being repaired after a fault.
    Repairing,
    /// Failed.
    Failed,
    /// Torn down.
    Destroyed,
}

impl PropolisState {
    /// States after which this server will not run the instance again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            PropolisState::Stopped | PropolisState::Failed | PropolisState::Destroyed
        )
    }

    /// States in which the guest runs or is about to (vmctl's Running).
    pub fn is_running(self) -> bool {
        matches!(
            self,
            PropolisState::Starting
                | PropolisState::Running
                | PropolisState::Rebooting
                | PropolisState::Migrating
                | PropolisState::Repairing
        )
    }
}

/// A requested state change (`PUT /instance/state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RequestedState {
    /// Start the vCPUs.
    Run,
    /// Stop the instance for good.
    Stop,
    /// Reset the guest.
    Reboot,
}

/// `InstanceProperties`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceProperties {
    /// The instance's id (vmctl keeps one per VM).
    pub id: uuid::Uuid,
    /// The VM's name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Oxide rack metadata; vmctl fills in placeholders.
    pub metadata: InstanceMetadata,
}

/// `InstanceMetadata` (Oxide's silo, project and sled; unused by vmctl).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceMetadata {
    /// Project id.
    pub project_id: uuid::Uuid,
    /// Silo id.
    pub silo_id: uuid::Uuid,
    /// Sled id.
    pub sled_id: uuid::Uuid,
    /// Sled model.
    pub sled_model: String,
    /// Sled revision.
    pub sled_revision: u32,
    /// Sled serial number.
    pub sled_serial: String,
}

impl InstanceMetadata {
    /// Placeholders: vmctl runs on one host, outside any rack.
    pub fn standalone() -> Self {
        InstanceMetadata {
            project_id: uuid::Uuid::nil(),
            silo_id: uuid::Uuid::nil(),
            sled_id: uuid::Uuid::nil(),
            sled_model: "vmctl".into(),
            sled_revision: 0,
            sled_serial: "vmctl".into(),
        }
    }
}

/// `InstanceEnsureRequest` with `init = {method: "Spec", value: {spec}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnsureRequest {
    /// Who the instance is.
    pub properties: InstanceProperties,
    /// How it is initialised.
    pub init: Init,
}

/// `InstanceInitializationMethod` (only `Spec`: vmctl does not migrate).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "method", content = "value")]
pub enum Init {
    /// A new instance from a full spec.
    Spec {
        /// The spec.
        spec: InstanceSpec,
    },
}

/// `InstanceSpec`: the board and the components, keyed by id.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceSpec {
    /// CPUs, memory, chipset.
    pub board: Board,
    /// Devices and backends by id.
    pub components: BTreeMap<String, Component>,
}

/// `Board`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Board {
    /// vCPUs (1–255).
    pub cpus: u8,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// The chipset.
    pub chipset: Chipset,
}

/// `Chipset`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Chipset {
    /// Intel 440FX.
    I440Fx {
        /// PCIe extended configuration access.
        enable_pcie: bool,
    },
}

/// `PciPath`: bus/device/function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PciPath {
    /// Bus.
    pub bus: u8,
    /// Device.
    pub device: u8,
    /// Function.
    pub function: u8,
}

impl PciPath {
    /// Device `device` on bus 0, function 0.
    pub fn slot(device: u8) -> Self {
        PciPath {
            bus: 0,
            device,
            function: 0,
        }
    }
}

/// `BootOrderEntry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootOrderEntry {
    /// A disk device's component id.
    pub id: String,
}

/// `SerialPortNumber`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SerialPortNumber {
    /// COM1 (0x3f8), the console.
    Com1,
}

/// The `Component` kinds vmctl uses.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", content = "component", rename_all = "snake_case")]
pub enum Component {
    /// A virtio-blk disk on `backend_id`.
    VirtioDisk {
        /// The storage backend's id.
        backend_id: String,
        /// Where it sits.
        pci_path: PciPath,
    },
    /// A virtio-net NIC on `backend_id`.
    VirtioNic {
        /// The network backend's id.
        backend_id: String,
        /// Correlation id of the interface.
        interface_id: uuid::Uuid,
        /// Where it sits.
        pci_path: PciPath,
    },
    /// A serial port.
    SerialPort {
        /// Which one.
        num: SerialPortNumber,
    },
    /// Boot order.
    BootSettings {
        /// Disks to try, in order.
        order: Vec<BootOrderEntry>,
    },
    /// A file or device as a disk's storage.
    FileStorageBackend {
        /// The path (as the zone sees it).
        path: String,
        /// Read-only?
        readonly: bool,
        /// Block size in bytes.
        block_size: u32,
    },
    /// A viona VNIC as a NIC's backend.
    VirtioNetworkBackend {
        /// The VNIC.
        vnic_name: String,
    },
}

#[derive(Debug, Deserialize)]
struct GetResponse {
    instance: Instance,
}

/// `Instance` as `GET /instance` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Instance {
    /// Who it is.
    pub properties: InstanceProperties,
    /// Its state.
    pub state: PropolisState,
}

/// `InstanceStateMonitorResponse` (the migration part is not used).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StateMonitorResponse {
    /// The state generation.
    #[serde(rename = "gen")]
    pub generation: u64,
    /// The state at that generation.
    pub state: PropolisState,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error_code: Option<String>,
    message: String,
}

/// Errors talking to propolis-server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers at the address (not listening, connection reset,
    /// timed out).
    #[error("propolis-server at {addr} does not answer: {reason}")]
    Unreachable {
        /// Where it should listen.
        addr: SocketAddr,
        /// What happened.
        reason: String,
    },
    /// It answered with an error status.
    #[error("propolis-server at {addr}: {method} {path} answered {status}: {message}")]
    Api {
        /// Where.
        addr: SocketAddr,
        /// The request's method.
        method: &'static str,
        /// The request's path.
        path: &'static str,
        /// HTTP status.
        status: u16,
        /// Its `error_code`, if any.
        code: Option<String>,
        /// Its message.
        message: String,
    },
    /// Its answer was not what the API document says.
    #[error("propolis-server at {addr}: unexpected answer to {path}: {reason}")]
    Decode {
        /// Where.
        addr: SocketAddr,
        /// The request's path.
        path: &'static str,
        /// What was wrong.
        reason: String,
    },
}

impl ClientError {
    /// Whether the server did not answer at all.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }

    /// Whether the server has no instance (404, or 410 from a long poll
    /// whose instance went away).
    pub fn is_no_instance(&self) -> bool {
        matches!(
            self,
            ClientError::Api {
                status: 404 | 410,
                ..
            }
        )
    }
}

/// A request body as JSON (reqwest is built without its `json` feature).
fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data serializes")
}

/// A client of one propolis-server.
#[derive(Debug, Clone)]
pub struct Client {
    addr: SocketAddr,
    http: reqwest::Client,
    timeout: Duration,
}

/// How long one long poll of the state monitor may wait before it is
/// asked again.
pub const LONG_POLL: Duration = Duration::from_secs(300);

impl Client {
    /// A client of the server at `addr`; every request but the long poll
    /// gives up after `timeout`.
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .build()
            .unwrap_or_default();
        Client {
            addr,
            http,
            timeout,
        }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn send(
        &self,
        method: &'static str,
        path: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            addr: self.addr,
            reason: vmctl_api::error_chain(&e),
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => (b.error_code, b.message),
            Err(_) => (None, text),
        };
        Err(ClientError::Api {
            addr: self.addr,
            method,
            path,
            status: status.as_u16(),
            code,
            message,
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        path: &'static str,
        resp: reqwest::Response,
    ) -> Result<T, ClientError> {
        let bytes = resp.bytes().await.map_err(|e| ClientError::Unreachable {
            addr: self.addr,
            reason: vmctl_api::error_chain(&e),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            addr: self.addr,
            path,
            reason: e.to_string(),
        })
    }

    /// `GET /instance`: the instance, `None` when the server has none.
    pub async fn instance(&self) -> Result<Option<Instance>, ClientError> {
        const PATH: &str = "/instance";
        let req = self.http.get(self.url(PATH)).timeout(self.timeout);
        match self.send("GET", PATH, req).await {
            Ok(resp) => Ok(Some(self.json::<GetResponse>(PATH, resp).await?.instance)),
            Err(e) if e.is_no_instance() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `PUT /instance`: creates the instance (a server with the same
    /// instance answers 201 too).
    pub async fn ensure(&self, req: &EnsureRequest) -> Result<(), ClientError> {
        const PATH: &str = "/instance";
        let r = self
            .http
            .put(self.url(PATH))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(to_json(req))
            .timeout(self.timeout);
        self.send("PUT", PATH, r).await.map(drop)
    }

    /// `PUT /instance/state`.
    pub async fn request_state(&self, state: RequestedState) -> Result<(), ClientError> {
        const PATH: &str = "/instance/state";
        let r = self
            .http
            .put(self.url(PATH))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(to_json(&state))
            .timeout(self.timeout);
        self.send("PUT", PATH, r).await.map(drop)
    }

    /// `GET /instance/state-monitor` with `{gen}`: waits (at most `wait`)
    /// until the state generation is at least `generation`.
    pub async fn state_monitor(
        &self,
        generation: u64,
        wait: Duration,
    ) -> Result<StateMonitorResponse, ClientError> {
        const PATH: &str = "/instance/state-monitor";
        let r = self
            .http
            .get(self.url(PATH))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(to_json(&serde_json::json!({ "gen": generation })))
            .timeout(wait);
        let resp = self.send("GET", PATH, r).await?;
        self.json(PATH, resp).await
    }

    /// The serial console's WebSocket URL, replaying from byte `from_start`
    /// of the instance's console output.
    pub fn serial_url(&self, from_start: u64) -> String {
        format!("ws://{}/instance/serial?from_start={from_start}", self.addr)
    }
}
