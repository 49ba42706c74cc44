//! Answers of the API that `vmctl_api::wire` does not define: notes, the
//! watch stream's lines, log sources.

use std::time::Instant;

use vmctl_api::ObjectRef;

use super::{ClientError, Response};

/// A note as the API returns it (`GET /v1/notes`, `GET /v1/notes/{kind}/{name}`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NoteIn {
    /// The store's sequence number of the note.
    pub seq: u64,
    /// When it was recorded.
    pub time: vmctl_api::Time,
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub type_: String,
    /// CamelCase reason (`Started`).
    pub reason: String,
    /// The sentence.
    pub message: String,
    /// The object it is about.
    pub object: ObjectRef,
    /// The component that recorded it (`vm-controller`), when known.
    #[serde(default)]
    pub source: Option<String>,
}

/// Which log of a VM `GET /v1/logs/{name}` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSource {
    /// The serial console's output.
    Console,
    /// What provisioning steps printed.
    Provision,
}

impl LogSource {
    /// The `source=` value.
    pub fn as_str(self) -> &'static str {
        match self {
            LogSource::Console => "console",
            LogSource::Provision => "provision",
        }
    }
}

/// Where a log read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStart {
    /// The last N lines (0: the whole log).
    Tail(usize),
    /// The current end: only what is appended from now.
    End,
    /// This byte offset (what follows the first N bytes).
    Offset(u64),
}

/// One committed change, as `GET /v1/watch` streams it (the store's
/// `Event`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct WatchEvent {
    /// Its sequence number: the resourceVersion it gave the object.
    pub seq: u64,
    /// When it was committed.
    pub time: vmctl_api::Time,
    /// The object it is about.
    pub object: ObjectRef,
    /// What happened: `{"type": "applied" | "statusUpdated" |
    /// "finalizersSet" | "deletionRequested" | "deleted" | "noted", …}`.
    pub change: serde_json::Value,
}

impl WatchEvent {
    /// The change's type (`applied`, `statusUpdated`, `deleted`, `noted`, …).
    pub fn change_type(&self) -> &str {
        self.change["type"].as_str().unwrap_or("")
    }
}

/// One line of the watch stream.
#[derive(Debug, Clone)]
pub enum WatchItem {
    /// A change.
    Event(WatchEvent),
    /// The watcher fell behind or the log was compacted: list again and
    /// watch from the listing's resourceVersion. The stream ends after it.
    Resync(String),
}

/// An open `GET /v1/watch` stream.
#[derive(Debug)]
pub struct Watch {
    resp: Response,
    pending: Vec<u8>,
}

impl Watch {
    pub(super) fn new(resp: Response) -> Result<Self, ClientError> {
        Ok(Watch {
            resp,
            pending: Vec::new(),
        })
    }

    /// The next line, waiting as long as it takes; `None` when the stream
    /// ends (the agent stopped).
    ///
    /// Errors: [`ClientError::HungUp`] when the connection breaks;
    /// [`ClientError::Protocol`] for a line that is not a change.
    pub fn next_item(&mut self) -> Result<Option<WatchItem>, ClientError> {
        self.next_before(None).map(|r| r.flatten())
    }

    /// Like [`Watch::next_item`], giving up at `deadline`: `Ok(None)` then.
    pub fn next_before(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<Option<WatchItem>>, ClientError> {
        let rt = self.resp.rt.clone();
        rt.block_on(async {
            let next = self.next_async();
            match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), next)
                    .await
                    .map_or(Ok(None), |r| r.map(Some)),
                None => next.await.map(Some),
            }
        })
    }

    async fn next_async(&mut self) -> Result<Option<WatchItem>, ClientError> {
        loop {
            if let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                let line = &line[..line.len() - 1];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return parse_line(line).map(Some);
            }
            match self.resp.chunk_async().await? {
                Some(c) => self.pending.extend_from_slice(&c),
                None => return Ok(None),
            }
        }
    }
}

fn parse_line(line: &[u8]) -> Result<WatchItem, ClientError> {
    let v: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| ClientError::Protocol(format!("bad watch line: {e}")))?;
    if v["type"] == "resync" {
        return Ok(WatchItem::Resync(
            v["message"].as_str().unwrap_or("resync").to_owned(),
        ));
    }
    serde_json::from_value(v)
        .map(WatchItem::Event)
        .map_err(|e| ClientError::Protocol(format!("bad watch event: {e}")))
}
