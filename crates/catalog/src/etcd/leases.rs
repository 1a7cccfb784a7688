//! `ClusterStore` on etcd: leases through `/v3/lease/*`, the owner transaction, watches.

use std::time::Duration;

use bw_types::{Generation, Name, NodeId};
use serde_json::json;
use tokio::sync::mpsc;

use super::store::{rev, EtcdCatalog, TXN};
use super::transport::{backend, Retry};
use super::txn::lease_error;
use super::wire::{self, LeaseResponse, StreamMessage, TxnResponse};
use crate::kv::{decode, encode, Change, Expect, Key, Prefix, Result, Revision, Rows, TxnOp};
use crate::lease::{
    contended, held_from, Acquired, ClusterStore, Held, Lease, LeaseId, OwnerRecord, WatchEvent,
    ACQUIRE_ATTEMPTS, MIN_LEASE_TTL,
};
use crate::records::now_ms;
use crate::CatalogError;

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}

impl ClusterStore for EtcdCatalog {
    async fn grant(&self, ttl: Duration) -> Result<Lease> {
        let ttl_s = ttl.max(MIN_LEASE_TTL).as_secs_f64().ceil() as i64;
        // Safe to repeat: a lease granted by a lost answer expires unused after its TTL.
        let r: LeaseResponse = self
            .inner
            .transport
            .call(
                "/v3/lease/grant",
                &json!({ "TTL": ttl_s.to_string() }),
                Retry::Always,
            )
            .await
            .map_err(|e| e.into_catalog("grant a lease"))?;
        if !r.error.is_empty() {
            return Err(backend("grant a lease", r.error));
        }
        Ok(Lease {
            id: LeaseId(r.id),
            ttl: secs(r.ttl),
        })
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<Duration> {
        let m: StreamMessage<LeaseResponse> = self
            .inner
            .transport
            .call("/v3/lease/keepalive", &wire::lease_id(id.0), Retry::Always)
            .await
            .map_err(|e| e.into_catalog("renew a lease"))?;
        // etcd answers a gone lease with TTL 0 (omitted).
        match m.result {
            Some(r) if r.ttl > 0 => Ok(secs(r.ttl)),
            _ => Err(CatalogError::LeaseExpired { lease: id }),
        }
    }

    async fn revoke(&self, id: LeaseId) -> Result<()> {
        let r = self
            .inner
            .transport
            .call::<serde_json::Value>("/v3/lease/revoke", &wire::lease_id(id.0), Retry::Always)
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.is_lease_not_found() => Ok(()),
            Err(e) => Err(e.into_catalog("revoke a lease")),
        }
    }

    async fn time_to_live(&self, id: LeaseId) -> Result<Option<Duration>> {
        let r: LeaseResponse = self
            .inner
            .transport
            .call("/v3/lease/timetolive", &wire::lease_id(id.0), Retry::Always)
            .await
            .map_err(|e| e.into_catalog("read a lease"))?;
        // -1: gone. Whole seconds, rounded down: 0 is alive with under a second left.
        Ok((r.ttl >= 0).then(|| secs(r.ttl)))
    }

    async fn list_at(&self, prefix: Prefix) -> Result<(Rows, Revision)> {
        self.list_rows(prefix).await
    }

    fn watch_prefix(&self, prefix: Prefix, from: Revision) -> mpsc::Receiver<WatchEvent> {
        self.watch_full(self.full(prefix.as_str()), from)
    }

    /// One `Txn`: if the owner key does not exist, create it bound to `lease`; else range
    /// it, so the "no" names the holder in the same round trip. The remaining TTL costs one
    /// more (cheap, leader-local) call.
    async fn acquire_owner(
        &self,
        volume: &Name,
        node: &NodeId,
        lease: LeaseId,
    ) -> Result<Result<Acquired, Held>> {
        let rel = Key::owner(volume);
        let key = self.full(rel.as_str());
        let rec = OwnerRecord {
            node: node.clone(),
            lease,
            since_ms: now_ms(),
        };
        let body = wire::txn(
            vec![wire::absent(&key)],
            vec![wire::put(&key, &encode(&rec), Some(lease.0))],
            vec![wire::range_op(&key)],
        );
        // For `lease_error` to name the lease.
        let as_op = [TxnOp {
            key: rel.clone(),
            expect: Expect::Absent,
            change: Change::PutWithLease(Vec::new(), lease),
        }];
        for _ in 0..ACQUIRE_ATTEMPTS {
            let resp: TxnResponse = self
                .inner
                .transport
                .call(TXN, &body, Retry::UnlessSent)
                .await
                .map_err(|e| lease_error(e, &as_op, "acquire a volume"))?;
            if resp.succeeded {
                let generation = Generation(rev(resp.header.revision).0);
                return Ok(Ok(Acquired { generation }));
            }
            let holder = resp
                .responses
                .into_iter()
                .next()
                .and_then(|r| r.response_range)
                .and_then(|r| r.kvs.into_iter().next());
            if let Some(kv) = holder {
                let owner: OwnerRecord = decode(rel.as_str(), &kv.value)?;
                let held = held_from(owner, Generation(rev(kv.create_revision).0));
                return Ok(Err(self.with_ttl(held).await));
            }
        }
        Err(contended(volume))
    }

    /// Deletes the owner key only if its `create_revision` is still `generation`.
    async fn release_owner(&self, volume: &Name, generation: Generation) -> Result<bool> {
        let key = self.full(Key::owner(volume).as_str());
        let gen = i64::try_from(generation.0).unwrap_or(i64::MAX);
        let body = wire::txn(
            vec![wire::created_at(&key, gen)],
            vec![wire::delete(&key, None)],
            vec![],
        );
        let resp: TxnResponse = self
            .inner
            .transport
            .call(TXN, &body, Retry::UnlessSent)
            .await
            .map_err(|e| e.into_catalog("release a volume"))?;
        Ok(resp.succeeded)
    }
}
