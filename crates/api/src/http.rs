//! HTTP plumbing of the server: the response body type, JSON/error responses, bounded body
//! reading and query-string parsing. No routing and no knowledge of `Control` here.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::{ApiError, ErrorBody, ErrorCode};

/// Largest request body accepted. Our requests are a few hundred bytes; 1 MiB leaves room for
/// any future bulk request while bounding memory per connection. Over it: 413.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Time allowed to receive a request body once headers arrived; a client trickling its body
/// slower than this gets 400 and the connection's slot back.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A response body: all at once, or a stream of chunks (newline-delimited JSON events) that
/// ends when its sender is dropped.
pub enum RespBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            RespBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RespBody::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, RespBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RespBody::Full(None) => SizeHint::with_exact(0),
            RespBody::Stream(_) => SizeHint::default(),
        }
    }
}

pub type Resp = Response<RespBody>;

fn with_type(mut r: Resp, content_type: &'static str) -> Resp {
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub fn bytes(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(RespBody::Full(Some(body.into())));
    *r.status_mut() = status;
    with_type(r, content_type)
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Resp {
    match serde_json::to_vec(value) {
        Ok(v) => bytes(status, "application/json", v),
        Err(e) => error(ApiError::internal(format!("cannot encode the answer: {e}"))),
    }
}

pub fn no_content() -> Resp {
    let mut r = Response::new(RespBody::Full(None));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

pub fn stream(content_type: &'static str, rx: mpsc::Receiver<Bytes>) -> Resp {
    with_type(Response::new(RespBody::Stream(rx)), content_type)
}

/// The error envelope with the code's own status.
pub fn error(e: ApiError) -> Resp {
    let status =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error_with_status(status, e)
}

/// The error envelope with a status the code does not imply (405, 413).
pub fn error_with_status(status: StatusCode, e: ApiError) -> Resp {
    let body = serde_json::to_vec(&ErrorBody { error: e }).unwrap_or_default();
    bytes(status, "application/json", body)
}

/// A request failure decided before `Control` is called: the envelope plus its status.
pub struct Reject(pub StatusCode, pub ApiError);

impl Reject {
    pub fn bad(message: impl Into<String>) -> Reject {
        Reject(StatusCode::BAD_REQUEST, ApiError::bad_request(message))
    }

    pub fn code(code: ErrorCode, message: impl Into<String>) -> Reject {
        let e = ApiError::new(code, message);
        Reject(
            StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
            e,
        )
    }

    pub fn into_response(self) -> Resp {
        error_with_status(self.0, self.1)
    }
}

/// Reads the whole body, refusing more than `MAX_BODY_BYTES` (413) or a stalled sender (400).
pub async fn read_body(body: Incoming) -> Result<Bytes, Reject> {
    let too_big = || {
        Reject(
            StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::bad_request(format!(
                "request body is larger than the limit of {MAX_BODY_BYTES} bytes"
            )),
        )
    };
    // A declared length over the limit is refused before reading a byte.
    if body.size_hint().lower() > MAX_BODY_BYTES as u64 {
        return Err(too_big());
    }
    let collected = tokio::time::timeout(
        BODY_READ_TIMEOUT,
        Limited::new(body, MAX_BODY_BYTES).collect(),
    )
    .await;
    match collected {
        Err(_) => Err(Reject::bad(format!(
            "request body not received within {BODY_READ_TIMEOUT:?}"
        ))),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_big()),
        Ok(Err(e)) => Err(Reject::bad(format!("cannot read the request body: {e}"))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Parses a body that must be a JSON object.
pub fn json_object(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, Reject> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(other) => Err(Reject::bad(format!(
            "request body must be a JSON object, not {}",
            kind_of(&other)
        ))),
        Err(e) => Err(Reject::bad(format!("request body is not valid JSON: {e}"))),
    }
}

fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Decodes a validated JSON object into a request type.
pub fn decode<T: serde::de::DeserializeOwned>(
    m: serde_json::Map<String, serde_json::Value>,
) -> Result<T, Reject> {
    serde_json::from_value(serde_json::Value::Object(m))
        .map_err(|e| Reject::bad(format!("invalid request body: {e}")))
}

/// Query parameters as (name, value) pairs; names must be among `allowed`, each at most once.
pub fn query<'a>(q: Option<&'a str>, allowed: &[&str]) -> Result<Vec<(&'a str, &'a str)>, Reject> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if !allowed.contains(&k) {
            return Err(Reject::bad(format!(
                "unknown query parameter {k:?}; allowed: {}",
                allowed.join(", ")
            )));
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(Reject::bad(format!("query parameter {k:?} given twice")));
        }
        out.push((k, v));
    }
    Ok(out)
}

pub fn param_bool(name: &str, v: &str) -> Result<bool, Reject> {
    match v {
        "true" | "1" | "" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(Reject::bad(format!(
            "query parameter {name} must be true or false, not {v:?}"
        ))),
    }
}

pub fn param_u64(name: &str, v: &str) -> Result<u64, Reject> {
    v.parse().map_err(|_| {
        Reject::bad(format!(
            "query parameter {name} must be a non-negative integer, not {v:?}"
        ))
    })
}
