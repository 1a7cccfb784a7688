//! The `/v1` HTTP server: accept loop, per-connection hyper driver, routing and handlers.
//!
//! Each handler validates what it can without the agent (names, sizes, query parameters,
//! body shape), then makes exactly one `Control` call and encodes its answer.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bw_types::Name;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::control::{Control, EventFollow};
use crate::error::{ApiError, ErrorCode};
use crate::http::{self, read_body, Reject, Resp};
use crate::types::{
    size_from_json, AddReplica, AttachVolume, CreateVolume, EventQuery, ResizeVolume,
    VolumeSettings, DEFAULT_EVENT_LIMIT, MAX_EVENT_LIMIT,
};

/// The committed OpenAPI document, served at `/v1/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../../../docs/openapi.json");

/// Connections served at once; the accept loop waits for a free slot when hit (the kernel's
/// backlog then holds new clients). The CLI opens one per command, so this is ample.
pub const MAX_CONNECTIONS: usize = 256;

/// Time a client gets to send a request's headers (slowloris guard); then the connection closes.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// After shutdown, how long open connections get to finish their current request.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serialized events buffered per follower before the forwarder waits for the socket.
const FOLLOW_CHUNKS: usize = 64;

/// Every route and its methods. The router serves exactly these, and a test checks that
/// `docs/openapi.json` documents exactly these.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/v1/volumes", &["GET", "POST"]),
    ("/v1/volumes/{name}", &["GET", "DELETE", "PATCH"]),
    ("/v1/volumes/{name}/resize", &["POST"]),
    ("/v1/volumes/{name}/attach", &["POST"]),
    ("/v1/volumes/{name}/detach", &["POST"]),
    ("/v1/volumes/{name}/replicas", &["POST"]),
    ("/v1/volumes/{name}/replicas/{node}", &["DELETE"]),
    ("/v1/nodes", &["GET"]),
    ("/v1/status", &["GET"]),
    ("/v1/events", &["GET"]),
    ("/v1/openapi.json", &["GET"]),
    ("/metrics", &["GET"]),
];

/// Serves the API on `listener` until `shutdown` becomes true (or its sender is dropped), then
/// stops accepting, ends event streams, and gives open requests `SHUTDOWN_GRACE` to finish.
pub async fn serve<C: Control>(
    listener: TcpListener,
    control: Arc<C>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = wait_shutdown(&mut shutdown) => break,
            p = slots.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let stream = tokio::select! {
            _ = wait_shutdown(&mut shutdown) => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        conns.spawn(serve_conn(
            stream,
            control.clone(),
            shutdown.clone(),
            permit,
        ));
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, drain).await;
    conns.abort_all();
}

/// Resolves once shutdown is requested; a dropped sender counts as a request.
async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn serve_conn<C: Control>(
    stream: TcpStream,
    control: Arc<C>,
    mut shutdown: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let sd = shutdown.clone();
    let svc = service_fn(move |req| {
        let (control, sd) = (control.clone(), sd.clone());
        async move { Ok::<_, Infallible>(handle(req, &*control, sd).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    // Connection errors (garbage, resets, timeouts) concern one client only: hyper has
    // already answered what could be answered, so they are dropped here.
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = wait_shutdown(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// A path matched against `ROUTES`: the template and the raw (still percent-encoded) values
/// of its placeholder segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch<'a> {
    pub tmpl: &'static str,
    /// The `{name}` segment (a volume name), if the route has one.
    pub name: Option<&'a str>,
    /// The `{node}` segment (a node name), if the route has one.
    pub node: Option<&'a str>,
}

/// Finds the route template for `path`. A placeholder matches one non-empty segment.
pub fn match_route(path: &str) -> Option<RouteMatch<'_>> {
    let segs: Vec<&str> = path.split('/').collect();
    'routes: for (tmpl, _) in ROUTES {
        let t: Vec<&str> = tmpl.split('/').collect();
        if t.len() != segs.len() {
            continue;
        }
        let mut m = RouteMatch {
            tmpl,
            name: None,
            node: None,
        };
        for (want, got) in t.iter().zip(&segs) {
            let slot = match *want {
                "{name}" => &mut m.name,
                "{node}" => &mut m.node,
                _ if want == got => continue,
                _ => continue 'routes,
            };
            if got.is_empty() {
                continue 'routes;
            }
            *slot = Some(*got);
        }
        return Some(m);
    }
    None
}

async fn handle<C: Control>(
    req: Request<Incoming>,
    ctl: &C,
    shutdown: watch::Receiver<bool>,
) -> Resp {
    let path = req.uri().path().to_owned();
    let Some(RouteMatch {
        tmpl,
        name: raw_name,
        node: raw_node,
    }) = match_route(&path)
    else {
        return http::error(ApiError::not_found(format!("no such route: {path}")));
    };
    let methods = ROUTES
        .iter()
        .find(|(t, _)| *t == tmpl)
        .map_or(&[][..], |(_, m)| *m);
    if !methods.contains(&req.method().as_str()) {
        let e = ApiError::bad_request(format!(
            "{} is not allowed on {path}; allowed: {}",
            req.method(),
            methods.join(", ")
        ));
        let mut r = http::error_with_status(StatusCode::METHOD_NOT_ALLOWED, e);
        if let Ok(v) = HeaderValue::from_str(&methods.join(", ")) {
            r.headers_mut().insert(ALLOW, v);
        }
        return r;
    }
    let name = match raw_name.map(|n| parse_name(&percent_decode(n))).transpose() {
        Ok(n) => n,
        Err(r) => return r.into_response(),
    };
    let node = match raw_node
        .map(|n| parse_node_name(&percent_decode(n)))
        .transpose()
    {
        Ok(n) => n,
        Err(r) => return r.into_response(),
    };
    let params = Params { name, node };
    match dispatch(tmpl, params, req, ctl, shutdown).await {
        Ok(r) => r,
        Err(r) => r.into_response(),
    }
}

fn parse_name(s: &str) -> Result<Name, Reject> {
    Name::new(s).map_err(|e| {
        Reject::code(
            ErrorCode::InvalidName,
            format!("invalid volume name {s:?}: {e}"),
        )
    })
}

fn parse_node_name(s: &str) -> Result<Name, Reject> {
    Name::new(s).map_err(|e| {
        Reject::code(
            ErrorCode::InvalidName,
            format!("invalid node name {s:?}: {e}"),
        )
    })
}

/// The validated placeholder segments of a request's path.
struct Params {
    name: Option<Name>,
    node: Option<Name>,
}

/// Decodes `%XX` escapes so an invalid name is reported as the client typed it.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lifts a `Control` error into a `Reject` carrying its own status.
fn ctl_err(e: ApiError) -> Reject {
    let status =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Reject(status, e)
}

async fn dispatch<C: Control>(
    tmpl: &'static str,
    params: Params,
    req: Request<Incoming>,
    ctl: &C,
    shutdown: watch::Receiver<bool>,
) -> Result<Resp, Reject> {
    let method = req.method().clone();
    let q = req.uri().query().map(str::to_owned);
    let q = q.as_deref();
    let ok = StatusCode::OK;
    // Routes with a `{name}` or `{node}` segment always carry one (match_route guarantees it).
    let name = || {
        params
            .name
            .clone()
            .ok_or_else(|| Reject::bad("missing volume name"))
    };
    let node = || {
        params
            .node
            .clone()
            .ok_or_else(|| Reject::bad("missing node name"))
    };
    match (tmpl, method) {
        ("/v1/volumes", Method::GET) => {
            Ok(http::json(ok, &ctl.list_volumes().await.map_err(ctl_err)?))
        }
        ("/v1/volumes", Method::POST) => {
            let req = create_request(req.into_body()).await?;
            Ok(http::json(
                StatusCode::CREATED,
                &ctl.create_volume(req).await.map_err(ctl_err)?,
            ))
        }
        ("/v1/volumes/{name}", Method::GET) => Ok(http::json(
            ok,
            &ctl.get_volume(name()?).await.map_err(ctl_err)?,
        )),
        ("/v1/volumes/{name}", Method::DELETE) => {
            let mut force = false;
            for (k, v) in http::query(q, &["force"])? {
                force = http::param_bool(k, v)?;
            }
            ctl.delete_volume(name()?, force).await.map_err(ctl_err)?;
            Ok(http::no_content())
        }
        ("/v1/volumes/{name}", Method::PATCH) => {
            let settings: VolumeSettings =
                body_with_size(req.into_body(), "resync_rate_bytes_per_s", false).await?;
            if settings.is_empty() {
                return Err(Reject::bad(
                    "nothing to change: give at least one of mode, resync_rate_bytes_per_s, min_in_sync",
                ));
            }
            Ok(http::json(
                ok,
                &ctl.set_volume(name()?, settings).await.map_err(ctl_err)?,
            ))
        }
        ("/v1/volumes/{name}/resize", Method::POST) => {
            let r: ResizeVolume = body_with_size(req.into_body(), "size_bytes", true).await?;
            Ok(http::json(
                ok,
                &ctl.resize_volume(name()?, r.size_bytes)
                    .await
                    .map_err(ctl_err)?,
            ))
        }
        ("/v1/volumes/{name}/attach", Method::POST) => {
            let a = attach_request(req.into_body()).await?;
            Ok(http::json(
                ok,
                &ctl.attach_volume(name()?, a.node).await.map_err(ctl_err)?,
            ))
        }
        ("/v1/volumes/{name}/detach", Method::POST) => {
            ctl.detach_volume(name()?).await.map_err(ctl_err)?;
            Ok(http::no_content())
        }
        ("/v1/volumes/{name}/replicas", Method::POST) => {
            let r = add_replica_request(req.into_body()).await?;
            Ok(http::json(
                ok,
                &ctl.add_replica(name()?, r).await.map_err(ctl_err)?,
            ))
        }
        ("/v1/volumes/{name}/replicas/{node}", Method::DELETE) => Ok(http::json(
            ok,
            &ctl.remove_replica(name()?, node()?)
                .await
                .map_err(ctl_err)?,
        )),
        ("/v1/nodes", Method::GET) => Ok(http::json(ok, &ctl.list_nodes().await.map_err(ctl_err)?)),
        ("/v1/status", Method::GET) => Ok(http::json(ok, &ctl.status().await.map_err(ctl_err)?)),
        ("/v1/events", Method::GET) => events(q, ctl, shutdown).await,
        ("/v1/openapi.json", Method::GET) => Ok(http::bytes(ok, "application/json", OPENAPI_JSON)),
        ("/metrics", Method::GET) => Ok(http::bytes(
            ok,
            "text/plain; version=0.0.4; charset=utf-8",
            ctl.metrics_text().await,
        )),
        (t, m) => Err(Reject(
            StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::internal(format!("route {m} {t} has no handler")),
        )),
    }
}

/// Checks the name and size fields with their own error codes, then decodes the rest.
async fn create_request(body: Incoming) -> Result<CreateVolume, Reject> {
    let m = http::json_object(&read_body(body).await?)?;
    match m.get("name") {
        Some(serde_json::Value::String(s)) => drop(parse_name(s)?),
        Some(_) => {
            return Err(Reject::code(
                ErrorCode::InvalidName,
                "name must be a string",
            ))
        }
        None => return Err(Reject::bad("missing field `name`")),
    }
    check_size(&m, "size_bytes", true)?;
    check_size(&m, "resync_rate_bytes_per_s", false)?;
    http::decode(m)
}

/// Checks the node name (`invalid_name`) and the rate (`invalid_size`), then decodes.
async fn add_replica_request(body: Incoming) -> Result<AddReplica, Reject> {
    let m = http::json_object(&read_body(body).await?)?;
    match m.get("node") {
        Some(serde_json::Value::String(s)) => drop(parse_node_name(s)?),
        Some(_) => {
            return Err(Reject::code(
                ErrorCode::InvalidName,
                "node must be a string",
            ))
        }
        None => return Err(Reject::bad("missing field `node`")),
    }
    check_size(&m, "resync_rate_bytes_per_s", false)?;
    http::decode(m)
}

/// Decodes a body whose size field (`field`, or its alias `size`/`resync_rate`) is checked
/// first so a bad size answers `invalid_size`.
async fn body_with_size<T: serde::de::DeserializeOwned>(
    body: Incoming,
    field: &str,
    required: bool,
) -> Result<T, Reject> {
    let m = http::json_object(&read_body(body).await?)?;
    check_size(&m, field, required)?;
    http::decode(m)
}

fn check_size(
    m: &serde_json::Map<String, serde_json::Value>,
    field: &str,
    required: bool,
) -> Result<(), Reject> {
    let alias = if field == "size_bytes" {
        "size"
    } else {
        "resync_rate"
    };
    let Some(v) = m.get(field).or_else(|| m.get(alias)) else {
        return if required {
            Err(Reject::bad(format!(
                "missing field `{field}` (or `{alias}`)"
            )))
        } else {
            Ok(())
        };
    };
    let n = size_from_json(v).map_err(|e| Reject::code(ErrorCode::InvalidSize, e))?;
    if n == 0 && required {
        return Err(Reject::code(
            ErrorCode::InvalidSize,
            "size must be greater than zero",
        ));
    }
    Ok(())
}

async fn attach_request(body: Incoming) -> Result<AttachVolume, Reject> {
    let bytes = read_body(body).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(AttachVolume::default());
    }
    let m = http::json_object(&bytes)?;
    if let Some(serde_json::Value::String(s)) = m.get("node") {
        parse_node_name(s)?;
    }
    http::decode(m)
}

async fn events<C: Control>(
    q: Option<&str>,
    ctl: &C,
    shutdown: watch::Receiver<bool>,
) -> Result<Resp, Reject> {
    let (mut since, mut limit, mut follow) = (None, DEFAULT_EVENT_LIMIT, false);
    for (k, v) in http::query(q, &["since", "limit", "follow"])? {
        match k {
            "since" => since = Some(http::param_u64(k, v)?),
            "limit" => {
                limit = http::param_u64(k, v)?.try_into().unwrap_or(u32::MAX);
                if limit == 0 || limit > MAX_EVENT_LIMIT {
                    return Err(Reject::bad(format!(
                        "limit must be between 1 and {MAX_EVENT_LIMIT}"
                    )));
                }
            }
            _ => follow = http::param_bool(k, v)?,
        }
    }
    if !follow {
        let list = ctl
            .events(EventQuery { since, limit })
            .await
            .map_err(ctl_err)?;
        return Ok(http::json(StatusCode::OK, &list));
    }
    let events = ctl.follow_events(since).await.map_err(ctl_err)?;
    Ok(http::stream(
        "application/x-ndjson",
        forward_events(events, shutdown),
    ))
}

/// Serializes events into newline-terminated JSON chunks until the source ends, the client
/// goes away (the body, and so `tx`'s receiver, is dropped) or the server shuts down.
fn forward_events(
    mut events: EventFollow,
    mut shutdown: watch::Receiver<bool>,
) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel::<Bytes>(FOLLOW_CHUNKS);
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = wait_shutdown(&mut shutdown) => break,
                _ = tx.closed() => break,
                ev = events.recv() => ev,
            };
            let Some(ev) = ev else { break };
            let mut line = serde_json::to_vec(&ev).unwrap_or_default();
            line.push(b'\n');
            if tx.send(Bytes::from(line)).await.is_err() {
                break;
            }
        }
    });
    rx
}
