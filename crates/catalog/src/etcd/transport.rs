//! HTTP/1.1 to etcd's gateway, with endpoint failover and a short per-endpoint deadline.
//!
//! A call tries the endpoint that last answered, then each other one in turn. It moves on
//! when an endpoint cannot be reached, has no leader, or (for requests safe to repeat) does
//! not answer within the deadline. Every request carries gRPC metadata `hasleader: true`
//! ("require leader"), so a member cut off from the quorum refuses at once with
//! "etcdserver: no leader" instead of hanging. When a whole round fails that way the call
//! pauses briefly and tries another round, until its budget (`DEFAULT_CALL_DEADLINE`) is
//! spent: a leader election (~1-1.6 s, every member says "no leader") is ridden out, and
//! with 2 of 3 members dead the call still fails within the budget. When no endpoint
//! serves, the caller gets `CatalogError::Unavailable`, whose
//! message starts with "cluster store unavailable:" and lists what each endpoint said.
//!
//! One TCP connection per request: on a LAN a connect costs a round trip (~0.1 ms) against
//! a raft commit of ~3 ms, and it spares us stale pooled connections after a member restart.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use super::wire::ErrorBody;
use crate::kv::CatalogError;

/// Time one endpoint gets to answer a request before the next is tried. A healthy member
/// answers a write in ~3–30 ms (p99 on a busy 2-core host) and a keepalive in < 5 ms; a
/// leader election stalls requests ~1–1.6 s. 2 s covers an election, and keeps a call
/// against a cluster without quorum well under the 3 s an operator will wait.
pub const DEFAULT_ENDPOINT_DEADLINE: Duration = Duration::from_secs(2);

/// Time a whole call gets across all endpoints. Bounds the case where several members
/// are unreachable without a reset (dropped traffic: each connect would wait the full
/// endpoint deadline), so a command still fails within ~3.5 s; a healthy member reached
/// after a dead one answers in milliseconds, well within what is left.
/// It also bounds the rounds that ride out a leader election (~1-1.6 s, during which one
/// member may stay silent for a whole endpoint deadline): 3.5 s leaves a second round after
/// such a silence.
pub const DEFAULT_CALL_DEADLINE: Duration = Duration::from_millis(3500);

/// Pause between two rounds over the endpoints when none could serve (no leader, refused):
/// long enough not to hammer members mid-election, short next to an election's ~1-1.6 s.
const ROUND_PAUSE: Duration = Duration::from_millis(100);

/// Largest answer read into memory; a listing beyond this means a runaway key family.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// gRPC metadata the gateway forwards: refuse with "no leader" rather than hang.
const REQUIRE_LEADER: (&str, &str) = ("grpc-metadata-hasleader", "true");

/// Whether a request may be sent again to another member after one may have received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Reads, keepalives, revokes: repeating changes nothing.
    Always,
    /// Writes: only retried when the first member surely did not apply it (not reached,
    /// no leader). A write with no answer in time fails as `Unavailable` with an unknown
    /// outcome; its compare-and-swap guards make a re-read and retry by the caller safe.
    UnlessSent,
}

#[derive(Debug)]
pub enum CallError {
    /// No endpoint could serve; the text says why for each.
    Unavailable(String),
    /// etcd answered with an error (gRPC `code`).
    Etcd { code: i64, message: String },
    /// The answer was not the JSON we expect.
    Decode(String),
}

/// gRPC status codes etcd uses for the errors we tell apart.
pub const GRPC_NOT_FOUND: i64 = 5;
const GRPC_UNAVAILABLE: i64 = 14;

impl CallError {
    /// The catalog error for a failure while doing `what`.
    pub fn into_catalog(self, what: &str) -> CatalogError {
        match self {
            CallError::Unavailable(reason) => CatalogError::Unavailable { reason },
            CallError::Etcd { code, message } => {
                backend(what, format!("etcd error {code}: {message}"))
            }
            CallError::Decode(m) => backend(what, format!("unexpected answer from etcd: {m}")),
        }
    }

    pub fn is_lease_not_found(&self) -> bool {
        matches!(self, CallError::Etcd { code: GRPC_NOT_FOUND, message } if message.contains("lease not found"))
    }
}

pub fn backend(what: &str, message: String) -> CatalogError {
    CatalogError::Backend {
        context: what.to_owned(),
        source: message.into(),
    }
}

/// What went wrong with one endpoint.
enum Attempt {
    /// The request surely did not reach etcd (connect failed).
    NotSent(String),
    /// It may have: the connection broke or the deadline passed after sending.
    Sent(String),
}

pub struct Transport {
    /// `host:port` of each member's client URL.
    endpoints: Vec<String>,
    /// Index of the endpoint to try first: the last one that answered.
    preferred: AtomicUsize,
    /// Per endpoint.
    deadline: Duration,
    /// Per call, across endpoints.
    budget: Duration,
}

impl Transport {
    /// Accepts `http://host:port` URLs (a trailing `/` is fine; TLS is not supported yet).
    pub fn new(
        urls: &[String],
        deadline: Duration,
        budget: Duration,
    ) -> Result<Transport, CatalogError> {
        let mut endpoints = Vec::new();
        for url in urls {
            let bad = |why: &str| backend("parse etcd endpoints", format!("{url:?}: {why}"));
            let rest = url
                .strip_prefix("http://")
                .ok_or_else(|| bad("expected http://host:port"))?;
            let authority = rest.trim_end_matches('/');
            if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
                return Err(bad("expected http://host:port"));
            }
            endpoints.push(authority.to_owned());
        }
        if endpoints.is_empty() {
            return Err(backend(
                "parse etcd endpoints",
                "no endpoint given".to_owned(),
            ));
        }
        Ok(Transport {
            endpoints,
            preferred: AtomicUsize::new(0),
            deadline,
            budget,
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The deadline of the next attempt, or `None` if the call's budget is spent.
    fn attempt_deadline(&self, call_deadline: Instant) -> Option<Instant> {
        let now = Instant::now();
        (now < call_deadline).then(|| (now + self.deadline).min(call_deadline))
    }

    /// POSTs `body` to `path` and decodes the answer, failing over between endpoints.
    pub async fn call<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
        retry: Retry,
    ) -> Result<T, CallError> {
        let body = Bytes::from(serde_json::to_vec(body).expect("JSON values serialize"));
        let call_deadline = Instant::now() + self.budget;
        // Rounds over all endpoints: a leader election (~1-1.6 s) makes every member answer
        // "no leader" at once; trying again within the call's budget rides it out, while a
        // cluster without quorum still fails when the budget is spent.
        loop {
            let mut failures = Vec::new();
            match self
                .round(path, &body, retry, call_deadline, &mut failures)
                .await
            {
                Some(result) => return result,
                None if Instant::now() + ROUND_PAUSE < call_deadline => {
                    tokio::time::sleep(ROUND_PAUSE).await
                }
                None => {
                    return Err(CallError::Unavailable(format!(
                        "no etcd member could serve the request ({})",
                        failures.join("; ")
                    )))
                }
            }
        }
    }

    /// One pass over the endpoints. `None`: every endpoint failed in a way that changed
    /// nothing (the reasons are in `failures`); `Some`: the call's outcome.
    async fn round<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Bytes,
        retry: Retry,
        call_deadline: Instant,
        failures: &mut Vec<String>,
    ) -> Option<Result<T, CallError>> {
        let first = self.preferred.load(Ordering::Relaxed);
        for i in 0..self.endpoints.len() {
            let idx = (first + i) % self.endpoints.len();
            let ep = &self.endpoints[idx];
            let Some(deadline) = self.attempt_deadline(call_deadline) else {
                failures.push(format!(
                    "{ep}: not tried, the call's {:?} were spent",
                    self.budget
                ));
                continue;
            };
            let err = match self.exchange(ep, path, body.clone(), deadline).await {
                Ok((status, bytes)) => match answer(status, &bytes) {
                    Ok(()) => {
                        self.preferred.store(idx, Ordering::Relaxed);
                        return Some(
                            serde_json::from_slice(&bytes)
                                .map_err(|e| CallError::Decode(format!("{path} from {ep}: {e}"))),
                        );
                    }
                    Err(err) => err,
                },
                Err(Attempt::NotSent(why)) => {
                    failures.push(format!("{ep}: {why}"));
                    continue;
                }
                Err(Attempt::Sent(why)) if retry == Retry::Always => {
                    failures.push(format!("{ep}: {why}"));
                    continue;
                }
                Err(Attempt::Sent(why)) => return Some(Err(self.unknown_outcome(idx, &why))),
            };
            // With "require leader" a member without one refuses before doing anything.
            let no_leader = err.message.contains("no leader");
            if no_leader || (err.code == GRPC_UNAVAILABLE && retry == Retry::Always) {
                failures.push(format!("{ep}: {}", err.message));
            } else if err.code == GRPC_UNAVAILABLE {
                return Some(Err(self.unknown_outcome(idx, &err.message)));
            } else {
                return Some(Err(CallError::Etcd {
                    code: err.code,
                    message: err.message,
                }));
            }
        }
        self.preferred
            .store((first + 1) % self.endpoints.len(), Ordering::Relaxed);
        None
    }

    /// A write that may or may not have been applied; the next call starts elsewhere.
    fn unknown_outcome(&self, idx: usize, why: &str) -> CallError {
        self.preferred
            .store((idx + 1) % self.endpoints.len(), Ordering::Relaxed);
        CallError::Unavailable(format!(
            "{}: {why}; the change may or may not have been applied",
            self.endpoints[idx]
        ))
    }

    /// Opens a streaming answer (watch), failing over like `call`; the deadline covers
    /// only getting the response head.
    pub async fn open_stream(&self, path: &str, body: &Value) -> Result<Incoming, CallError> {
        let body = Bytes::from(serde_json::to_vec(body).expect("JSON values serialize"));
        let mut failures = Vec::new();
        let first = self.preferred.load(Ordering::Relaxed);
        let call_deadline = Instant::now() + self.budget;
        for i in 0..self.endpoints.len() {
            let idx = (first + i) % self.endpoints.len();
            let ep = &self.endpoints[idx];
            let Some(deadline) = self.attempt_deadline(call_deadline) else {
                break;
            };
            match send(ep, path, body.clone(), deadline).await {
                Ok((status, incoming)) if status.is_success() => return Ok(incoming),
                Ok((status, _)) => failures.push(format!("{ep}: HTTP {status}")),
                Err(Attempt::NotSent(why) | Attempt::Sent(why)) => {
                    failures.push(format!("{ep}: {why}"))
                }
            }
        }
        self.preferred
            .store((first + 1) % self.endpoints.len(), Ordering::Relaxed);
        Err(CallError::Unavailable(format!(
            "no etcd member could serve the watch ({})",
            failures.join("; ")
        )))
    }

    async fn exchange(
        &self,
        ep: &str,
        path: &str,
        body: Bytes,
        deadline: Instant,
    ) -> Result<(StatusCode, Bytes), Attempt> {
        let (status, incoming) = send(ep, path, body, deadline).await?;
        let collected = timeout_at(
            deadline,
            Limited::new(incoming, MAX_RESPONSE_BYTES).collect(),
        )
        .await
        .map_err(|_| Attempt::Sent(format!("no complete answer within {:?}", self.deadline)))?
        .map_err(|e| Attempt::Sent(format!("reading the answer failed: {e}")))?;
        Ok((status, collected.to_bytes()))
    }
}

/// An error in a streaming answer: the head said 200, the error came as the first message.
#[derive(serde::Deserialize)]
struct StreamError {
    error: StreamErrorBody,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct StreamErrorBody {
    grpc_code: i64,
    message: String,
}

/// `Ok` if the answer carries a result; else etcd's error, from an error status or from a
/// streaming answer whose first message is an error.
fn answer(status: StatusCode, bytes: &[u8]) -> Result<(), ErrorBody> {
    if status.is_success() {
        if !bytes.starts_with(br#"{"error""#) {
            return Ok(());
        }
        if let Ok(e) = serde_json::from_slice::<StreamError>(bytes) {
            return Err(ErrorBody {
                code: e.error.grpc_code,
                message: e.error.message,
                ..ErrorBody::default()
            });
        }
        return Ok(());
    }
    Err(serde_json::from_slice(bytes).unwrap_or_else(|_| ErrorBody {
        message: format!("HTTP {status}: {}", String::from_utf8_lossy(bytes)),
        ..ErrorBody::default()
    }))
}

/// Connects and sends one request; returns the status and the unread body.
async fn send(
    ep: &str,
    path: &str,
    body: Bytes,
    deadline: Instant,
) -> Result<(StatusCode, Incoming), Attempt> {
    let stream = timeout_at(deadline, TcpStream::connect(ep))
        .await
        .map_err(|_| Attempt::NotSent("connect timed out".to_owned()))?
        .map_err(|e| Attempt::NotSent(format!("cannot connect: {e}")))?;
    let _ = stream.set_nodelay(true); // small JSON requests: do not wait for Nagle
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Attempt::NotSent(format!("HTTP handshake failed: {e}")))?;
    // Drives the connection; ends when the response body and `sender` are dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(HOST, ep)
        .header(CONTENT_TYPE, "application/json")
        .header(REQUIRE_LEADER.0, REQUIRE_LEADER.1)
        .body(Full::new(body))
        .expect("a request built from valid parts");
    let resp = timeout_at(deadline, sender.send_request(req))
        .await
        .map_err(|_| Attempt::Sent("no answer in time".to_owned()))?
        .map_err(|e| Attempt::Sent(format!("the exchange failed: {e}")))?;
    Ok((resp.status(), resp.into_body()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: with every endpoint refusing connections, a call retries in rounds for its budget
    // (an election looks the same) and then fails with the message naming each endpoint.

    #[tokio::test]
    async fn all_endpoints_down_is_unavailable_naming_each() {
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect(); // listeners dropped: the ports now refuse
        let urls: Vec<String> = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        let t = Transport::new(&urls, DEFAULT_ENDPOINT_DEADLINE, DEFAULT_CALL_DEADLINE).unwrap();
        let started = std::time::Instant::now();
        let err = t
            .call::<Value>("/v3/kv/range", &serde_json::json!({}), Retry::Always)
            .await
            .unwrap_err()
            .into_catalog("read");
        // Refusals are retried in rounds (an election looks the same for ~1-1.6 s) until the
        // call's budget is spent, and no longer.
        let took = started.elapsed();
        assert!(
            took >= DEFAULT_CALL_DEADLINE - ROUND_PAUSE,
            "retried within the budget: {took:?}"
        );
        assert!(
            took < DEFAULT_CALL_DEADLINE + Duration::from_millis(500),
            "then gave up: {took:?}"
        );
        let msg = err.to_string();
        assert!(msg.starts_with("cluster store unavailable: "), "{msg}");
        for p in ports {
            assert!(
                msg.contains(&format!("127.0.0.1:{p}: cannot connect")),
                "{msg}"
            );
        }
    }

    // Goal: members that accept connections but never answer (a hung or blackholed member)
    // cost one endpoint deadline each, bounded by the call budget; a write that got no
    // answer is not re-sent and says its outcome is unknown. Method: listeners that never
    // accept (the kernel completes the handshake, nobody reads).
    #[tokio::test]
    async fn silent_members_fail_within_the_call_budget() {
        let hung: Vec<std::net::TcpListener> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let urls: Vec<String> = hung
            .iter()
            .map(|l| format!("http://{}", l.local_addr().unwrap()))
            .collect();
        let t = Transport::new(&urls, DEFAULT_ENDPOINT_DEADLINE, DEFAULT_CALL_DEADLINE).unwrap();
        let body = serde_json::json!({});
        let started = Instant::now();
        let read = t.call::<Value>("/v3/kv/range", &body, Retry::Always).await;
        let took = started.elapsed();
        let msg = read.unwrap_err().into_catalog("read").to_string();
        assert!(
            took >= DEFAULT_CALL_DEADLINE
                && took < DEFAULT_CALL_DEADLINE + Duration::from_millis(500),
            "{took:?}"
        );
        assert!(
            msg.contains("no answer in time") && msg.contains("not tried"),
            "{msg}"
        );
        let started = Instant::now();
        let write = t
            .call::<Value>("/v3/kv/txn", &body, Retry::UnlessSent)
            .await;
        let msg = write.unwrap_err().into_catalog("write").to_string();
        assert!(
            started.elapsed() < Duration::from_millis(2200),
            "one endpoint only"
        );
        assert!(msg.contains("may or may not have been applied"), "{msg}");
    }

    #[test]
    fn bad_endpoint_urls_are_refused() {
        for bad in ["127.0.0.1:2379", "https://h:1", "http://", "http://h:1/x"] {
            let t = Transport::new(
                &[bad.to_owned()],
                DEFAULT_ENDPOINT_DEADLINE,
                DEFAULT_CALL_DEADLINE,
            );
            assert!(t.is_err(), "{bad}");
        }
        assert!(Transport::new(&[], DEFAULT_ENDPOINT_DEADLINE, DEFAULT_CALL_DEADLINE).is_err());
    }
}
