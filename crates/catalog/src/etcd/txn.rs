//! A catalog transaction as one etcd `Txn`.
//!
//! Each op with an expectation becomes a compare (`Absent` → `create_revision == 0`,
//! `At(r)` → `mod_revision == r`) and a range of its key in the failure branch; each change
//! becomes a put (with its lease, if any) or a delete in the success branch. When etcd
//! takes the failure branch, the ranges show the state the compares saw (the branch runs
//! atomically with them), so evaluating the expectations again names the first failing key.

use super::store::{rev, EtcdCatalog, TXN};
use super::transport::{backend, CallError, Retry};
use super::wire::{self, TxnResponse};
use crate::kv::{CatalogError, Change, Expect, Result, Revision, TxnOp};

pub(super) async fn run(cat: &EtcdCatalog, ops: Vec<TxnOp>) -> Result<Revision> {
    let mut compare = Vec::new();
    let mut success = Vec::new();
    let mut failure = Vec::new();
    let mut compared = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let key = cat.full(op.key.as_str());
        let guard = match op.expect {
            Expect::Absent => Some(wire::absent(&key)),
            Expect::At(r) => Some(wire::modified_at(
                &key,
                i64::try_from(r.0).unwrap_or(i64::MAX),
            )),
            Expect::Any => None,
        };
        if let Some(g) = guard {
            compare.push(g);
            failure.push(wire::range_op(&key));
            compared.push(i);
        }
        match &op.change {
            Change::Put(v) => success.push(wire::put(&key, v, None)),
            Change::PutWithLease(v, lease) => success.push(wire::put(&key, v, Some(lease.0))),
            Change::Delete => success.push(wire::delete(&key, None)),
            Change::Check => {}
        }
    }
    let resp: TxnResponse = cat
        .inner
        .transport
        .call(
            TXN,
            &wire::txn(compare, success, failure),
            Retry::UnlessSent,
        )
        .await
        .map_err(|e| lease_error(e, &ops, "commit a transaction"))?;
    if resp.succeeded {
        return Ok(rev(resp.header.revision));
    }
    Err(first_conflict(&ops, &compared, &resp))
}

/// `LeaseExpired` naming the transaction's lease if etcd refused it for an unknown lease.
pub(super) fn lease_error(e: CallError, ops: &[TxnOp], what: &str) -> CatalogError {
    let lease = ops.iter().find_map(|op| match op.change {
        Change::PutWithLease(_, l) => Some(l),
        _ => None,
    });
    match lease {
        Some(lease) if e.is_lease_not_found() => CatalogError::LeaseExpired { lease },
        _ => e.into_catalog(what),
    }
}

/// The conflict for the first op (in op order) whose expectation the failure branch's
/// ranges show unmet.
fn first_conflict(ops: &[TxnOp], compared: &[usize], resp: &TxnResponse) -> CatalogError {
    for (j, &i) in compared.iter().enumerate() {
        let found = resp
            .responses
            .get(j)
            .and_then(|r| r.response_range.as_ref())
            .and_then(|r| r.kvs.first())
            .map(|kv| rev(kv.mod_revision));
        let op = &ops[i];
        let holds = match op.expect {
            Expect::Absent => found.is_none(),
            Expect::At(want) => found == Some(want),
            Expect::Any => true,
        };
        if !holds {
            return CatalogError::Conflict {
                key: op.key.clone(),
                expected: op.expect,
                found,
            };
        }
    }
    backend(
        "commit a transaction",
        "etcd refused the transaction, yet every expectation holds".to_owned(),
    )
}
