//! The HTTP JSON API of blockwarden (SPEC §4), versioned under `/v1`.
//!
//! - [`types`]: wire types shared by server and client (`VolumeView`, `CreateVolume`, …).
//! - [`error`]: the wire error (`ApiError` = `ErrorCode` + message) and its HTTP statuses.
//! - [`control`]: the `Control` trait, the seam the agent implements.
//! - [`server`]: `serve(listener, control, shutdown)`: hyper http1 on tokio, routing,
//!   validation, event streaming; `ROUTES` lists what it serves.
//! - [`http`]: response bodies, bounded body reading, query parsing (server plumbing).
//! - [`client`]: the small async `Client` the CLI uses.
//!
//! Data flow: CLI → `Client` → HTTP → `server` (validate) → `Control` (agent) → JSON answer.
//! The committed OpenAPI document `docs/openapi.json` is served at `/v1/openapi.json`.

pub mod client;
pub mod control;
pub mod error;
pub mod http;
pub mod server;
pub mod types;

pub use client::{Client, ClientError, EventStream};
pub use control::{Control, EventFollow};
pub use error::{ApiError, ErrorBody, ErrorCode};
pub use server::{serve, OPENAPI_JSON, ROUTES};
pub use types::{
    AddReplica, AttachVolume, Attached, AttachmentView, CreateVolume, EventQuery, EventView, Level,
    Mode, NodeView, ReplicaView, ResizeVolume, ResyncView, StatusView, VolumeSettings, VolumeState,
    VolumeView,
};
