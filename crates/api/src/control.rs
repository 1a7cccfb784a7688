//! The seam between the HTTP layer and the agent: the server decodes and validates a request,
//! calls one `Control` method, and encodes its answer. The agent implements it; tests use an
//! in-memory fake.
//!
//! Implement with plain `async fn`s; their futures must be `Send` (the server runs them on
//! tokio's multi-threaded runtime).

use std::future::Future;

use bw_types::Name;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::types::{
    AddReplica, Attached, CreateVolume, EventQuery, EventView, NodeView, StatusView,
    VolumeSettings, VolumeView,
};

/// A live event stream: the server writes each event as one JSON line until the sender is
/// dropped, the client goes away (then the receiver is dropped, which the sender sees as a
/// closed channel), or the server shuts down.
pub type EventFollow = mpsc::Receiver<EventView>;

pub trait Control: Send + Sync + 'static {
    /// Create a volume; `AlreadyExists` if the name is taken, `NoSpace` if it cannot be placed.
    /// The server has validated the name and that `size_bytes > 0`.
    fn create_volume(
        &self,
        req: CreateVolume,
    ) -> impl Future<Output = Result<VolumeView, ApiError>> + Send;

    fn list_volumes(&self) -> impl Future<Output = Result<Vec<VolumeView>, ApiError>> + Send;

    /// `NotFound` if there is no such volume.
    fn get_volume(&self, name: Name) -> impl Future<Output = Result<VolumeView, ApiError>> + Send;

    /// Grow (or refuse to shrink, `InvalidSize`) a volume; `size_bytes > 0` is checked already.
    fn resize_volume(
        &self,
        name: Name,
        size_bytes: u64,
    ) -> impl Future<Output = Result<VolumeView, ApiError>> + Send;

    /// `InUse` if attached, unless `force` (then detach first).
    fn delete_volume(
        &self,
        name: Name,
        force: bool,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;

    /// Attach explicitly on `node` (by name), or on the answering agent's node if `None`.
    /// `InUse` naming the holder if another node has it.
    fn attach_volume(
        &self,
        name: Name,
        node: Option<Name>,
    ) -> impl Future<Output = Result<Attached, ApiError>> + Send;

    /// Release an explicit attachment. `InUse` while NBD connections are open.
    fn detach_volume(&self, name: Name) -> impl Future<Output = Result<(), ApiError>> + Send;

    /// Change settings; the server has checked that at least one is set.
    fn set_volume(
        &self,
        name: Name,
        settings: VolumeSettings,
    ) -> impl Future<Output = Result<VolumeView, ApiError>> + Send;

    /// Add a replica on `req.node` and start filling it in the background; answers at once
    /// with the volume (the new replica not yet in sync). `NotFound` for an unknown volume or
    /// node, `AlreadyExists` if that node already holds a replica. The server has validated
    /// both names.
    fn add_replica(
        &self,
        name: Name,
        req: AddReplica,
    ) -> impl Future<Output = Result<VolumeView, ApiError>> + Send;

    /// Remove the replica on `node`. `NotFound` if the volume has no replica there; refused
    /// when it would leave no replica or fewer than `min_in_sync`.
    fn remove_replica(
        &self,
        name: Name,
        node: Name,
    ) -> impl Future<Output = Result<VolumeView, ApiError>> + Send;

    fn list_nodes(&self) -> impl Future<Output = Result<Vec<NodeView>, ApiError>> + Send;

    fn status(&self) -> impl Future<Output = Result<StatusView, ApiError>> + Send;

    /// Stored events, oldest first (see `EventQuery`).
    fn events(
        &self,
        query: EventQuery,
    ) -> impl Future<Output = Result<Vec<EventView>, ApiError>> + Send;

    /// Retained events with `seq > since`, then live ones as they happen; `None`: only events
    /// appended from now on (a CLI wanting `tail -f` reads `events` first, then follows from
    /// the last `seq`). `catalog::follow_events` provides exactly this stream.
    fn follow_events(
        &self,
        since: Option<u64>,
    ) -> impl Future<Output = Result<EventFollow, ApiError>> + Send;

    /// The Prometheus text exposition for `GET /metrics`.
    fn metrics_text(&self) -> impl Future<Output = String> + Send;
}
