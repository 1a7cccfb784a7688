//! A small async client for the CLI: one HTTP/1.1 connection per call over plain TCP.
//!
//! Only `http://host:port` agent URLs are supported (the API listens on loopback or a
//! trusted network; TLS is out of scope for now).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::error::{ApiError, ErrorBody};
use crate::types::{
    AddReplica, AttachVolume, Attached, CreateVolume, EventView, NodeView, ResizeVolume,
    StatusView, VolumeSettings, VolumeView,
};

/// Time to establish the TCP connection; the agent is local or near, so longer means down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Time for a whole call (not a followed event stream). Control operations finish in
/// milliseconds (SPEC §6); this only bounds a hung agent.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest answer read into memory (a listing of many volumes is well under this).
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Longest line accepted on an event stream; a longer one means a broken stream.
pub const MAX_EVENT_LINE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid agent URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot connect to the agent at {url} (is it running?)")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    /// The connection broke, or the answer was not what the API promises.
    #[error("bad exchange with the agent at {url}: {message}")]
    Protocol { url: String, message: String },
    /// The agent refused the request; `error.message` is meant for the operator.
    #[error("{error}")]
    Api { status: u16, error: ApiError },
}

impl ClientError {
    /// The API's error, if the agent answered with one.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            ClientError::Api { error, .. } => Some(error),
            _ => None,
        }
    }
}

type Result<T, E = ClientError> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
pub struct Client {
    /// `http://host:port`, for messages.
    url: String,
    /// `host:port`, to connect to and for the Host header.
    authority: String,
}

impl Client {
    /// Accepts `http://host:port` with an optional trailing `/`.
    pub fn new(base_url: &str) -> Result<Client> {
        let bad = |reason: &str| ClientError::BadUrl {
            url: base_url.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = base_url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http://host:port URLs are supported"))?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains('/') || authority.contains('@') {
            return Err(bad("expected http://host:port with no path"));
        }
        let port = authority
            .rsplit_once(':')
            .map(|(_, p)| p)
            .ok_or_else(|| bad("the port is missing"))?;
        port.parse::<u16>()
            .map_err(|_| bad("the port is not a number"))?;
        Ok(Client {
            url: format!("http://{authority}"),
            authority: authority.to_owned(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn list_volumes(&self) -> Result<Vec<VolumeView>> {
        self.call(Method::GET, "/v1/volumes", None::<&()>).await
    }

    pub async fn create_volume(&self, req: &CreateVolume) -> Result<VolumeView> {
        self.call(Method::POST, "/v1/volumes", Some(req)).await
    }

    pub async fn get_volume(&self, name: &str) -> Result<VolumeView> {
        self.call(Method::GET, &volume_path(name, ""), None::<&()>)
            .await
    }

    pub async fn resize_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeView> {
        self.call(
            Method::POST,
            &volume_path(name, "/resize"),
            Some(&ResizeVolume { size_bytes }),
        )
        .await
    }

    pub async fn delete_volume(&self, name: &str, force: bool) -> Result<()> {
        let path = format!(
            "{}{}",
            volume_path(name, ""),
            if force { "?force=true" } else { "" }
        );
        self.call_empty(Method::DELETE, &path, None::<&()>).await
    }

    pub async fn attach_volume(&self, name: &str, node: Option<&str>) -> Result<Attached> {
        let node = node
            .map(|n| n.parse())
            .transpose()
            .map_err(|e| ClientError::Api {
                status: 400,
                error: ApiError::new(
                    crate::ErrorCode::InvalidName,
                    format!("invalid node name: {e}"),
                ),
            })?;
        self.call(
            Method::POST,
            &volume_path(name, "/attach"),
            Some(&AttachVolume { node }),
        )
        .await
    }

    pub async fn detach_volume(&self, name: &str) -> Result<()> {
        self.call_empty(Method::POST, &volume_path(name, "/detach"), None::<&()>)
            .await
    }

    pub async fn set_volume(&self, name: &str, settings: &VolumeSettings) -> Result<VolumeView> {
        self.call(Method::PATCH, &volume_path(name, ""), Some(settings))
            .await
    }

    /// Adds a replica; the answer is the volume with the new replica (not yet in sync).
    pub async fn add_replica(&self, name: &str, req: &AddReplica) -> Result<VolumeView> {
        self.call(Method::POST, &volume_path(name, "/replicas"), Some(req))
            .await
    }

    /// Removes the replica on `node` (a node name, sent as typed).
    pub async fn remove_replica(&self, name: &str, node: &str) -> Result<VolumeView> {
        let path = volume_path(name, &format!("/replicas/{}", encode_segment(node)));
        self.call(Method::DELETE, &path, None::<&()>).await
    }

    pub async fn list_nodes(&self) -> Result<Vec<NodeView>> {
        self.call(Method::GET, "/v1/nodes", None::<&()>).await
    }

    pub async fn status(&self) -> Result<StatusView> {
        self.call(Method::GET, "/v1/status", None::<&()>).await
    }

    /// Stored events with `seq > since` (or the newest ones), at most `limit` (server default if `None`).
    pub async fn events(&self, since: Option<u64>, limit: Option<u32>) -> Result<Vec<EventView>> {
        let mut q = Vec::new();
        q.extend(since.map(|s| format!("since={s}")));
        q.extend(limit.map(|l| format!("limit={l}")));
        let path = if q.is_empty() {
            "/v1/events".to_owned()
        } else {
            format!("/v1/events?{}", q.join("&"))
        };
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// Opens the live stream (`since`: also replay retained events after that seq).
    pub async fn follow_events(&self, since: Option<u64>) -> Result<EventStream> {
        let path = match since {
            Some(s) => format!("/v1/events?follow=true&since={s}"),
            None => "/v1/events?follow=true".to_owned(),
        };
        let fut = self.send(Method::GET, &path, None);
        let (status, body) = self.timed(fut).await?;
        if !status.is_success() {
            let bytes = self.timed(self.read_all(body)).await?;
            return Err(self.error_from(status, &bytes));
        }
        Ok(EventStream {
            url: self.url.clone(),
            body,
            buf: BytesMut::new(),
        })
    }

    pub async fn metrics_text(&self) -> Result<String> {
        let bytes = self.raw(Method::GET, "/metrics").await?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.protocol("metrics are not UTF-8 text"))
    }

    /// The served OpenAPI document.
    pub async fn openapi(&self) -> Result<serde_json::Value> {
        self.call(Method::GET, "/v1/openapi.json", None::<&()>)
            .await
    }

    async fn raw(&self, method: Method, path: &str) -> Result<Bytes> {
        self.timed(async {
            let (status, body) = self.send(method, path, None).await?;
            let bytes = self.read_all(body).await?;
            if status.is_success() {
                Ok(bytes)
            } else {
                Err(self.error_from(status, &bytes))
            }
        })
        .await
    }

    async fn call<T: DeserializeOwned, B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let body = body.map(|b| serde_json::to_vec(b).expect("request types always serialize"));
        let bytes = self.timed(self.exchange(method, path, body)).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| self.protocol(&format!("cannot decode the answer: {e}")))
    }

    async fn call_empty<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<()> {
        let body = body.map(|b| serde_json::to_vec(b).expect("request types always serialize"));
        self.timed(self.exchange(method, path, body))
            .await
            .map(drop)
    }

    /// Sends a request and returns the body of a success answer, or the API error.
    async fn exchange(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Bytes> {
        let (status, body) = self.send(method, path, body).await?;
        let bytes = self.read_all(body).await?;
        if status.is_success() {
            Ok(bytes)
        } else {
            Err(self.error_from(status, &bytes))
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Incoming)> {
        let connect =
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.authority)).await;
        let stream = match connect {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(ClientError::Connect {
                    url: self.url.clone(),
                    source,
                })
            }
            Err(_) => {
                let source = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
                return Err(ClientError::Connect {
                    url: self.url.clone(),
                    source,
                });
            }
        };
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol(&format!("HTTP handshake failed: {e}")))?;
        // Drives the connection; ends when the response body is done or dropped.
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.authority);
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| self.protocol(&format!("cannot build the request for {path}: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.protocol(&format!("request failed: {e}")))?;
        Ok((resp.status(), resp.into_body()))
    }

    async fn read_all(&self, body: Incoming) -> Result<Bytes> {
        match Limited::new(body, MAX_RESPONSE_BYTES).collect().await {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) => Err(self.protocol(&format!("cannot read the answer: {e}"))),
        }
    }

    async fn timed<T>(&self, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                url: self.url.clone(),
                timeout: REQUEST_TIMEOUT,
            }),
        }
    }

    fn error_from(&self, status: StatusCode, body: &[u8]) -> ClientError {
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(b) => ClientError::Api {
                status: status.as_u16(),
                error: b.error,
            },
            Err(_) => {
                let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                self.protocol(&format!("HTTP {status} without an error body: {text:?}"))
            }
        }
    }

    fn protocol(&self, message: &str) -> ClientError {
        ClientError::Protocol {
            url: self.url.clone(),
            message: message.to_owned(),
        }
    }
}

/// `/v1/volumes/<name><suffix>` with the name percent-encoded, so whatever the operator typed
/// reaches the server (which answers `invalid_name` with the name as typed).
fn volume_path(name: &str, suffix: &str) -> String {
    format!("/v1/volumes/{}{suffix}", encode_segment(name))
}

/// Percent-encodes everything but unreserved characters, for one path segment.
fn encode_segment(s: &str) -> String {
    let mut p = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~') {
            p.push(b as char);
        } else {
            p.push_str(&format!("%{b:02X}"));
        }
    }
    p
}

/// A followed event stream; `next` yields events until the agent ends the stream.
pub struct EventStream {
    url: String,
    body: Incoming,
    buf: BytesMut,
}

impl EventStream {
    /// The next event, `None` when the stream ended (agent shut down), or an error.
    pub async fn next(&mut self) -> Option<Result<EventView>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(i + 1);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(
                    serde_json::from_slice(&line)
                        .map_err(|e| self.protocol(format!("bad event line: {e}"))),
                );
            }
            if self.buf.len() > MAX_EVENT_LINE_BYTES {
                return Some(Err(self.protocol(format!(
                    "event line longer than {MAX_EVENT_LINE_BYTES} bytes"
                ))));
            }
            match self.body.frame().await {
                None => return None,
                Some(Err(e)) => return Some(Err(self.protocol(format!("stream broke: {e}")))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    fn protocol(&self, message: String) -> ClientError {
        ClientError::Protocol {
            url: self.url.clone(),
            message,
        }
    }
}
