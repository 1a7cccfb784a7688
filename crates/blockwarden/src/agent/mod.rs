//! `blockwarden agent`: configuration → data dir lock → catalog (embedded redb, or etcd with
//! `--etcd`) → session lease → recovery → NBD (TCP + Unix socket), peer and HTTP API
//! listeners, reconciler, heartbeat → shutdown on SIGINT/SIGTERM.

mod attach;
mod control;
pub mod datadir;
mod exports;
mod hooks;
mod insync;
mod lifecycle;
mod membership;
mod metrics;
mod node;
mod placement;
mod reconcile;
mod recovery;
mod replicated;
mod session;
mod switch;

use std::sync::Arc;

use anyhow::{Context, Result};
use catalog::{ClusterStore, EmbeddedCatalog, EtcdCatalog, EtcdOptions, Expect, Level};
use tokio::sync::watch;

use crate::config::{AgentConfig, AgentFlags};
use control::AgentControl;
use datadir::DataDir;
use exports::NodeExports;
use node::Node;

/// Worker threads of the agent's runtime. Two match this project's 2-core target hosts; the
/// blocking I/O threads of each volume are separate (see `store`).
const RUNTIME_WORKERS: usize = 2;

/// Key prefix of everything blockwarden keeps in etcd.
const ETCD_PREFIX: &str = "/blockwarden/";

/// Runs the agent until a shutdown signal.
pub fn run(flags: &AgentFlags) -> Result<()> {
    let config = AgentConfig::resolve(flags)?;
    crate::logging::init(config.log_level);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKERS)
        .thread_name("bw-agent")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let data = DataDir::open(&config.data_dir)?;
        if config.etcd.is_empty() {
            let catalog = EmbeddedCatalog::open(data.catalog_path())?;
            run_node(config, data, catalog).await
        } else {
            let catalog = EtcdCatalog::connect(&config.etcd, ETCD_PREFIX, EtcdOptions::default())
                .await
                .with_context(|| {
                    format!(
                        "cannot join the cluster through etcd at {}",
                        config.etcd.join(",")
                    )
                })?;
            run_node(config, data, catalog).await
        }
    })
}

async fn run_node<C: ClusterStore>(config: AgentConfig, data: DataDir, catalog: C) -> Result<()> {
    let catalog = Arc::new(catalog);
    let node_id = data.node_id()?;
    check_name_unique(&*catalog, &config, &node_id).await?;
    let session = reconcile::start_session(
        &*catalog,
        &bw_types::NodeId(node_id.clone()),
        config.lease_ttl,
    )
    .await
    .context("cannot obtain a session lease")?;
    let node = Arc::new(Node::new(config.clone(), &data, catalog, node_id, session));
    node.catalog
        .put_node(&node.own_record(), Expect::Any)
        .await
        .context("cannot register this node")?;
    let reattach = recovery::recover(&node).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let nbd_tcp = tokio::net::TcpListener::bind(config.nbd_listen)
        .await
        .with_context(|| format!("cannot listen for NBD on {}", config.nbd_listen))?;
    match std::fs::remove_file(&config.nbd_socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot remove stale socket {}", config.nbd_socket.display())
            })
        }
    }
    let nbd_unix = tokio::net::UnixListener::bind(&config.nbd_socket)
        .with_context(|| format!("cannot listen for NBD on {}", config.nbd_socket.display()))?;
    let api = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .with_context(|| format!("cannot listen for the API on {}", config.api_listen))?;
    if node.cluster {
        let peer = tokio::net::TcpListener::bind(config.peer_listen)
            .await
            .with_context(|| format!("cannot listen for peers on {}", config.peer_listen))?;
        let provider: Arc<dyn peer::ReplicaProvider> = Arc::new(Provider(node.clone()));
        tasks.spawn(peer::serve(
            peer,
            provider,
            node.peer_stats.clone(),
            stop_rx.clone(),
        ));
        tasks.spawn(reconcile::reconcile_loop(node.clone(), stop_rx.clone()));
        tasks.spawn(reconcile::membership_loop(node.clone(), stop_rx.clone()));
    }
    let exports: Arc<dyn nbd_server::Exports> = Arc::new(NodeExports(node.clone()));
    tasks.spawn(nbd_server::serve_tcp(
        nbd_tcp,
        exports.clone(),
        node.nbd_stats.clone(),
        stop_rx.clone(),
    ));
    tasks.spawn(nbd_server::serve_unix(
        nbd_unix,
        exports,
        node.nbd_stats.clone(),
        stop_rx.clone(),
    ));
    tasks.spawn(api::serve(
        api,
        Arc::new(AgentControl(node.clone())),
        stop_rx.clone(),
    ));
    tasks.spawn(reconcile::session_supervisor(node.clone(), stop_rx.clone()));
    tasks.spawn(reconcile::heartbeat_loop(node.clone(), stop_rx.clone()));

    for rec in reattach {
        if let Err(e) = node.acquire(&rec.name, true).await {
            let msg = format!(
                "volume {}: explicit attachment not restored after restart: {e}",
                rec.name
            );
            node.event(Level::Warning, "volume.attach_lost", Some(&rec.name), msg)
                .await;
        }
    }
    let mode = if node.cluster {
        format!("cluster via etcd {}", config.etcd.join(","))
    } else {
        "embedded".into()
    };
    let msg = format!(
        "agent {} started ({mode}, {} replica(s) here); NBD on {} and {}, API on http://{}",
        config.node_name,
        node.replicas.lock().unwrap().len(),
        config.nbd_listen,
        config.nbd_socket.display(),
        config.api_listen
    );
    node.event(Level::Info, "node.started", None, msg).await;
    // Test harnesses and scripts wait for this exact phrase.
    eprintln!(
        "blockwarden agent ready: nbd={} api=http://{} socket={}{}",
        config.nbd_listen,
        config.api_listen,
        config.nbd_socket.display(),
        if node.cluster {
            format!(" peer={}", config.peer_listen)
        } else {
            String::new()
        }
    );

    wait_for_signal().await;
    log::info!("shutting down: closing NBD connections and flushing volumes");
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    shutdown_volumes(&node).await;
    node.event(
        Level::Info,
        "node.stopped",
        None,
        format!("agent {} stopped", config.node_name),
    )
    .await;
    // Revoking the lease drops this node's owner keys and alive key at once, so another
    // node can attach its volumes without waiting for the TTL.
    let _ = node.catalog.revoke(node.session().lease_id()).await;
    let _ = std::fs::remove_file(&config.nbd_socket);
    drop(data);
    Ok(())
}

/// Refuses to start a second node under a name another node already uses.
async fn check_name_unique<C: ClusterStore>(
    catalog: &C,
    config: &AgentConfig,
    node_id: &str,
) -> Result<()> {
    let nodes = catalog
        .list_nodes()
        .await
        .context("cannot read the node list")?;
    if let Some((other, _)) = nodes
        .iter()
        .find(|(n, _)| n.name.as_str() == config.node_name && n.id.0 != node_id)
    {
        anyhow::bail!(
            "node name {} is already used by node {} (data dir of another host?); choose another --node-name",
            config.node_name,
            other.id
        );
    }
    Ok(())
}

/// The peer server's view of this node's replicas.
struct Provider<C: ClusterStore>(Arc<Node<C>>);

impl<C: ClusterStore> peer::ReplicaProvider for Provider<C> {
    fn open(
        &self,
        volume: &bw_types::VolumeId,
    ) -> Result<Arc<store::Replica>, peer::ProviderError> {
        self.0
            .replica(volume)
            .ok_or_else(|| peer::ProviderError::UnknownVolume(volume.clone()))
    }
}

/// Flushes and closes every replica: a clean stop leaves nothing only in the page cache.
async fn shutdown_volumes<C: ClusterStore>(node: &Node<C>) {
    let replicas: Vec<_> = std::mem::take(&mut *node.replicas.lock().unwrap())
        .into_values()
        .collect();
    for r in replicas {
        let (tx, rx) = tokio::sync::oneshot::channel();
        bw_types::BlockDevice::submit(
            r.volume(),
            bw_types::IoRequest::Flush,
            Box::new(move |res| {
                let _ = tx.send(res);
            }),
        );
        match rx.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => log::error!("final flush failed: {e}"),
            Err(_) => log::error!("final flush was dropped"),
        }
        let _ = tokio::task::spawn_blocking(move || r.volume().close()).await;
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        log::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM received"),
        _ = int.recv() => log::info!("SIGINT received"),
    }
}
