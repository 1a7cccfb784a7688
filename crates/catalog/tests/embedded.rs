//! The embedded backend against the shared contract, plus what only a file-backed store has:
//! the cross-process lock, the schema guard and corrupt records.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use catalog::testing::{contract_suite, sample_volume, CONTRACT_EVENT_RETENTION};
use catalog::{Catalog, CatalogError, EmbeddedCatalog, Expect, Key};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("bw-catalog-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// Goal: the embedded backend meets the contract the etcd backend will also run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_meets_catalog_contract() {
    let dir = TempDir::new("contract");
    let base = dir.0.clone();
    contract_suite(|ns| {
        let path = base.join(format!("{ns}.redb"));
        async move { EmbeddedCatalog::open_with_retention(path, CONTRACT_EVENT_RETENTION).unwrap() }
    })
    .await;
}

// Goal: a second opener (another agent on the same data dir) gets a clear error naming the file.
#[tokio::test]
async fn second_open_of_same_file_is_refused_naming_path() {
    let dir = TempDir::new("lock");
    let path = dir.0.join("catalog.redb");
    let first = EmbeddedCatalog::open(&path).unwrap();
    let err = EmbeddedCatalog::open(&path)
        .err()
        .expect("second open must fail");
    assert!(matches!(err, CatalogError::Locked { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("already open"),
        "{msg}"
    );
    drop(first);
    EmbeddedCatalog::open(&path).expect("lock released on drop");
}

// Goal: a file written by a newer schema is refused rather than misread.
#[tokio::test]
async fn newer_schema_is_refused() {
    let dir = TempDir::new("schema");
    let path = dir.0.join("catalog.redb");
    drop(EmbeddedCatalog::open(&path).unwrap());
    {
        let db = redb::Database::create(&path).unwrap();
        let w = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
            w.open_table(def)
                .unwrap()
                .insert("schema_version", catalog::SCHEMA_VERSION + 1)
                .unwrap();
        }
        w.commit().unwrap();
    }
    let err = EmbeddedCatalog::open(&path)
        .err()
        .expect("newer schema must be refused");
    assert!(
        matches!(err, CatalogError::SchemaTooNew { found, .. } if found == catalog::SCHEMA_VERSION + 1),
        "{err:?}"
    );
    assert!(err.to_string().contains("upgrade"), "{err}");
}

// Goal: a record that no longer parses is reported with its key, not a panic.
#[tokio::test]
async fn corrupt_record_is_reported_with_its_key() {
    let dir = TempDir::new("corrupt");
    let c = EmbeddedCatalog::open(dir.0.join("catalog.redb")).unwrap();
    let v = sample_volume("bad", "id-b");
    let op = catalog::TxnOp {
        key: Key::volume(&v.name),
        expect: Expect::Absent,
        change: catalog::Change::Put(b"{not json".to_vec()),
    };
    c.txn(vec![op]).await.unwrap();
    let err = c.get_volume(&v.name).await.unwrap_err();
    assert!(
        matches!(err, CatalogError::Corrupt { ref key, .. } if key == "volumes/bad"),
        "{err:?}"
    );
    assert!(c.list_volumes().await.is_err());
}

// Goal: records written before a field existed still read (serde defaults), so adding a
// field needs no schema bump.
#[tokio::test]
async fn older_record_without_new_fields_reads_with_defaults() {
    let dir = TempDir::new("compat");
    let c = EmbeddedCatalog::open(dir.0.join("catalog.redb")).unwrap();
    let old = br#"{"id":"x1","name":"old","size_bytes":4096,"replicas":1,"created_at_ms":5}"#;
    let op = catalog::TxnOp {
        key: Key::volume(&bw_types::Name::new("old").unwrap()),
        expect: Expect::Absent,
        change: catalog::Change::Put(old.to_vec()),
    };
    c.txn(vec![op]).await.unwrap();
    let (v, _) = c
        .get_volume(&bw_types::Name::new("old").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (v.size_bytes, v.state, v.attachment, v.generation.0),
        (4096, catalog::VolumeState::Creating, None, 0)
    );
}

// Goal: the embedded backend's in-memory leases and change feed meet the same
// `ClusterStore` contract as etcd, so single-node agents run the cluster code paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_meets_cluster_store_contract() {
    let dir = TempDir::new("cluster");
    let base = dir.0.clone();
    catalog::testing::cluster::cluster_suite(|ns| {
        let path = base.join(format!("{ns}.redb"));
        async move { EmbeddedCatalog::open(path).unwrap() }
    })
    .await;
}

// Goal: leases die with the process, so keys bound to them are gone after a reopen (a
// restarted single-node agent must not find itself still "owning" a volume).
#[tokio::test]
async fn lease_bound_keys_are_dropped_on_reopen() {
    use catalog::ClusterStore;
    let dir = TempDir::new("orphans");
    let path = dir.0.join("catalog.redb");
    let vol = bw_types::Name::new("v").unwrap();
    let node = bw_types::NodeId("n1".into());
    let g = {
        let c = EmbeddedCatalog::open(&path).unwrap();
        let lease = c.grant(std::time::Duration::from_secs(60)).await.unwrap();
        c.register_alive(&node, lease.id).await.unwrap();
        c.put_volume(&sample_volume("v", "id-v"), Expect::Absent)
            .await
            .unwrap();
        c.acquire_owner(&vol, &node, lease.id)
            .await
            .unwrap()
            .unwrap()
            .generation
    };
    let c = EmbeddedCatalog::open(&path).unwrap();
    assert!(c.get_owner(&vol).await.unwrap().is_none());
    assert!(c.list_alive().await.unwrap().is_empty());
    assert!(
        c.get_volume(&vol).await.unwrap().is_some(),
        "unleased keys stay"
    );
    let lease = c.grant(std::time::Duration::from_secs(60)).await.unwrap();
    let again = c
        .acquire_owner(&vol, &node, lease.id)
        .await
        .unwrap()
        .unwrap();
    assert!(
        again.generation > g,
        "generations keep growing across restarts"
    );
}
