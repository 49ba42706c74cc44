//! The agent lease of an installation: which agent runs the controllers of
//! one key prefix (until issue 17's per-node leases); and the node leases:
//! which agent holds a node name (`P@lease/node/{name}`), alive while it
//! runs.
//!
//! etcd's lock pattern: the key `P@lease/agent` is created, in one
//! transaction that requires it absent, attached to an etcd lease with a
//! TTL; the holder keeps the lease alive (keep-alive requests, every third
//! of the TTL) and the key goes with the lease when it is revoked (a
//! holder that stops) or expires (a holder killed or cut off from etcd for
//! longer than the TTL). The key's value says who holds it
//! ([`LeaseHolder`]), so that a refused agent can name it.

use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use vmctl_api::Time;

use super::EtcdStore;
use crate::error::Result;
use crate::event;

/// Who holds (or asks for) an installation's agent lease: the value of
/// its key, JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseHolder {
    /// The host's name.
    pub host: String,
    /// This boot of the host (Linux: `/proc/sys/kernel/random/boot_id`;
    /// `None` where there is none): with `host` and `data_dir`, tells a
    /// dead predecessor of this agent from another live agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The agent's process id.
    pub pid: u32,
    /// The agent's API: the path of its Unix socket.
    pub socket: String,
    /// The agent's data directory.
    pub data_dir: String,
    /// When it took the lease.
    pub since: Time,
}

impl std::fmt::Display for LeaseHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the agent with pid {} on host {} (socket {}, data directory {}, holding it since {})",
            self.pid,
            self.host,
            self.socket,
            self.data_dir,
            self.since.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }
}

impl LeaseHolder {
    /// Whether `self` (the current holder) is an earlier agent of this
    /// very host, boot and data directory as `me`. The caller holds that
    /// data directory's lock, so such a holder is dead (killed before it
    /// could revoke its lease) and its lease may be revoked at once.
    /// Without a boot id this is never true (the lease then expires by
    /// itself within its TTL).
    pub fn is_predecessor_of(&self, me: &LeaseHolder) -> bool {
        self.boot_id.is_some()
            && self.boot_id == me.boot_id
            && self.host == me.host
            && self.data_dir == me.data_dir
    }
}

/// What [`EtcdStore::acquire_lease`] found.
#[derive(Debug)]
pub enum LeaseOutcome {
    /// The caller holds the lease now.
    Acquired(AgentLease),
    /// Another agent holds it.
    Held {
        /// Who (as it wrote when it took the lease).
        holder: LeaseHolder,
        /// Its etcd lease id (for [`EtcdStore::revoke_lease`]).
        lease: i64,
    },
}

/// A held agent lease. Keep it alive ([`AgentLease::keep_alive`]) more
/// often than its TTL, and release it when stopping
/// ([`AgentLease::release`]); dropping it lets it expire within the TTL.
///
/// The same type holds a node lease ([`EtcdStore::acquire_node_lease`]).
#[derive(Debug)]
pub struct AgentLease {
    store: EtcdStore,
    /// The key attached to the lease (`P@lease/agent`, `P@lease/node/N`).
    key: Vec<u8>,
    id: i64,
    ttl: Duration,
    expires: Instant,
}

impl EtcdStore {
    /// The key of the installation's agent lease: `P@lease/agent`.
    fn lease_key(&self) -> Vec<u8> {
        self.key("lease", "agent")
    }

    /// The key of node `node`'s lease: `P@lease/node/{node}`.
    fn node_lease_key(&self, node: &str) -> Vec<u8> {
        self.key("lease", &format!("node/{node}"))
    }

    /// Takes the installation's agent lease for `me`, with this TTL (whole
    /// seconds, at least etcd's minimum of 2 s), unless another agent holds
    /// it. Two round trips: a lease grant, then one transaction that
    /// creates the key if it is absent and else reads it.
    ///
    /// Errors: [`StoreError::Unavailable`] when etcd cannot be reached
    /// (nothing taken).
    pub async fn acquire_lease(&self, me: &LeaseHolder, ttl: Duration) -> Result<LeaseOutcome> {
        self.acquire_lease_at(self.lease_key(), me, ttl).await
    }

    /// Takes the lease of node `node` for `me` (the agent that registers
    /// that Node), as [`EtcdStore::acquire_lease`] takes the agent lease:
    /// held by one agent at a time, kept alive by it, gone within the TTL
    /// after it dies. [`LeaseOutcome::Held`]: another agent runs under
    /// that node name.
    ///
    /// Errors: [`StoreError::Unavailable`] when etcd cannot be reached.
    pub async fn acquire_node_lease(
        &self,
        node: &str,
        me: &LeaseHolder,
        ttl: Duration,
    ) -> Result<LeaseOutcome> {
        self.acquire_lease_at(self.node_lease_key(node), me, ttl)
            .await
    }

    /// Who holds node `node`'s lease now, if anyone (none: its agent
    /// stopped, or has not reached etcd for longer than the TTL).
    pub async fn node_lease_holder(&self, node: &str) -> Result<Option<LeaseHolder>> {
        let resp = self.range(self.node_lease_key(node), None).await?;
        resp.kvs()
            .first()
            .map(|kv| event::decode(kv.value()))
            .transpose()
    }

    async fn acquire_lease_at(
        &self,
        key: Vec<u8>,
        me: &LeaseHolder,
        ttl: Duration,
    ) -> Result<LeaseOutcome> {
        let secs = ttl.as_secs().max(2);
        loop {
            let asked = Instant::now();
            let grant = self
                .inner
                .client
                .lease_client()
                .grant(secs as i64, None)
                .await
                .map_err(|e| self.err(e))?;
            let id = grant.id();
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    event::encode(me)?,
                    Some(etcd_client::PutOptions::new().with_lease(id)),
                )])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = match self.kv().txn(txn).await {
                Ok(r) => r,
                Err(e) => {
                    // Maybe taken, maybe not: revoking the lease settles it
                    // (or its expiry, if etcd is gone).
                    let _ = self.revoke_lease(id).await;
                    return Err(self.err(e));
                }
            };
            if resp.succeeded() {
                return Ok(LeaseOutcome::Acquired(AgentLease {
                    store: self.clone(),
                    key,
                    id,
                    ttl: Duration::from_secs(secs),
                    expires: asked + Duration::from_secs(secs),
                }));
            }
            let _ = self.revoke_lease(id).await;
            let held = resp.op_responses().into_iter().find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            });
            // None: gone between the compare and the read; try again.
            if let Some(kv) = held {
                return Ok(LeaseOutcome::Held {
                    holder: event::decode(kv.value())?,
                    lease: kv.lease(),
                });
            }
        }
    }

    /// Revokes an etcd lease (and deletes the keys attached to it); one
    /// that no longer exists is no error.
    pub async fn revoke_lease(&self, id: i64) -> Result<()> {
        match self.inner.client.lease_client().revoke(id).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("lease not found") => {
                Ok(())
            }
            Err(e) => Err(self.err(e)),
        }
    }

    /// Who holds the installation's agent lease now, if anyone.
    pub async fn lease_holder(&self) -> Result<Option<LeaseHolder>> {
        let resp = self.range(self.lease_key(), None).await?;
        resp.kvs()
            .first()
            .map(|kv| event::decode(kv.value()))
            .transpose()
    }
}

impl AgentLease {
    /// What object writes are fenced by while this lease is held (see
    /// [`EtcdStore::fenced`]).
    pub fn fence(&self) -> super::Fence {
        super::Fence {
            key: self.key.clone(),
            id: self.id,
        }
    }

    /// The etcd lease id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Its TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// When it expires at the latest unless kept alive: the TTL after the
    /// last keep-alive (or grant) that etcd acknowledged was sent (etcd
    /// counts from when it received it, so etcd's expiry is never earlier).
    pub fn expires(&self) -> Instant {
        self.expires
    }

    /// Keeps the lease alive (one keep-alive request and its answer), then
    /// checks that the key is still this lease's. `Ok(false)`: the lease
    /// is gone (expired, revoked, or the key deleted): the caller no longer
    /// holds it. Errors: [`StoreError::Unavailable`] when etcd cannot be
    /// reached; the lease stays held until [`AgentLease::expires`].
    pub async fn keep_alive(&mut self) -> Result<bool> {
        let sent = Instant::now();
        match self
            .store
            .inner
            .client
            .lease_client()
            .keep_alive(self.id)
            .await
        {
            Ok(_) => {}
            Err(etcd_client::Error::LeaseKeepAliveError(e)) if e.contains("lease not found") => {
                return Ok(false);
            }
            Err(e) => return Err(self.store.err(e)),
        }
        self.expires = sent + self.ttl;
        let resp = self.store.range(self.key.clone(), None).await?;
        Ok(resp.kvs().first().is_some_and(|kv| kv.lease() == self.id))
    }

    /// Gives the lease up (revokes it: its key goes at once, so another
    /// agent can take it without waiting for the TTL).
    pub async fn release(self) -> Result<()> {
        self.store.revoke_lease(self.id).await
    }
}
