//! The JSON shapes of etcd's v3 gateway (field names from `rpc.proto`, snake_case as the
//! gateway emits them; `ID`/`TTL` keep their proto spelling). The gateway omits fields at
//! their zero value (`succeeded: false`, `type: PUT`, an empty `kvs`), so every field
//! defaults. int64 fields arrive as JSON strings; `bytes` fields as base64.

use serde::de::{Deserializer, Error as _};
use serde::Deserialize;
use serde_json::{json, Value};

use super::b64;

fn int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Text(String),
        Number(i64),
    }
    match Int::deserialize(d)? {
        Int::Text(s) => s.parse().map_err(D::Error::custom),
        Int::Number(n) => Ok(n),
    }
}

fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s = String::deserialize(d)?;
    b64::decode(&s).ok_or_else(|| D::Error::custom("invalid base64"))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Header {
    #[serde(deserialize_with = "int")]
    pub revision: i64,
    // `cluster_id`/`member_id` are uint64s beyond i64: not parsed, we have no use for them.
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct KeyValue {
    #[serde(deserialize_with = "bytes")]
    pub key: Vec<u8>,
    #[serde(deserialize_with = "bytes")]
    pub value: Vec<u8>,
    #[serde(deserialize_with = "int")]
    pub create_revision: i64,
    #[serde(deserialize_with = "int")]
    pub mod_revision: i64,
    #[serde(deserialize_with = "int")]
    pub lease: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RangeResponse {
    pub header: Header,
    pub kvs: Vec<KeyValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ResponseOp {
    pub response_range: Option<RangeResponse>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct TxnResponse {
    pub header: Header,
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
}

/// LeaseGrant, LeaseKeepAlive and LeaseTimeToLive answers share these fields.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct LeaseResponse {
    #[serde(rename = "ID", deserialize_with = "int")]
    pub id: i64,
    /// Seconds; absent (0) on a keepalive of a gone lease, -1 from TimeToLive.
    #[serde(rename = "TTL", deserialize_with = "int")]
    pub ttl: i64,
    pub error: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WatchResponse {
    pub header: Header,
    pub created: bool,
    pub canceled: bool,
    #[serde(deserialize_with = "int")]
    pub compact_revision: i64,
    pub cancel_reason: String,
    pub events: Vec<Event>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Event {
    /// `"DELETE"`, or absent for a put.
    #[serde(rename = "type")]
    pub kind: String,
    pub kv: KeyValue,
}

/// One message of a streaming answer (watch, keepalive).
#[derive(Debug, Deserialize)]
pub struct StreamMessage<T> {
    pub result: Option<T>,
    pub error: Option<Value>,
}

/// The gateway's error body for unary calls.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ErrorBody {
    pub message: String,
    pub error: String,
    pub code: i64,
}

/// The first key after every key starting with `prefix` (etcd's `range_end` for a prefix).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key: etcd's "\0" range_end
}

pub fn range(key: &[u8], range_end: Option<&[u8]>, limit: i64) -> Value {
    let mut v = json!({ "key": b64::encode(key), "limit": limit.to_string() });
    if let Some(end) = range_end {
        v["range_end"] = b64::encode(end).into();
    }
    v
}

pub fn put(key: &[u8], value: &[u8], lease: Option<i64>) -> Value {
    let mut v = json!({ "key": b64::encode(key), "value": b64::encode(value) });
    if let Some(l) = lease {
        v["lease"] = l.to_string().into();
    }
    json!({ "request_put": v })
}

pub fn delete(key: &[u8], range_end: Option<&[u8]>) -> Value {
    let mut v = json!({ "key": b64::encode(key) });
    if let Some(end) = range_end {
        v["range_end"] = b64::encode(end).into();
    }
    json!({ "request_delete_range": v })
}

pub fn range_op(key: &[u8]) -> Value {
    json!({ "request_range": range(key, None, 0) })
}

/// `create_revision(key) == 0`: the key does not exist.
pub fn absent(key: &[u8]) -> Value {
    created_at(key, 0)
}

pub fn created_at(key: &[u8], rev: i64) -> Value {
    json!({ "target": "CREATE", "result": "EQUAL", "key": b64::encode(key),
            "create_revision": rev.to_string() })
}

pub fn modified_at(key: &[u8], rev: i64) -> Value {
    json!({ "target": "MOD", "result": "EQUAL", "key": b64::encode(key),
            "mod_revision": rev.to_string() })
}

pub fn txn(compare: Vec<Value>, success: Vec<Value>, failure: Vec<Value>) -> Value {
    json!({ "compare": compare, "success": success, "failure": failure })
}

pub fn lease_id(id: i64) -> Value {
    json!({ "ID": id.to_string() })
}

pub fn watch_create(key: &[u8], range_end: &[u8], start_revision: i64) -> Value {
    json!({ "create_request": {
        "key": b64::encode(key),
        "range_end": b64::encode(range_end),
        "start_revision": start_revision.to_string(),
    }})
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the gateway's real answers (captured from etcd 3.4.23) parse, zero fields omitted.
    #[test]
    fn parses_gateway_answers() {
        let failed = r#"{"header":{"cluster_id":"15118495548433857066","member_id":"13668033151171901709","revision":"2","raft_term":"2"},"responses":[{"response_range":{"header":{"revision":"2"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy"}],"count":"1"}}]}"#;
        let t: TxnResponse = serde_json::from_str(failed).unwrap();
        assert!(!t.succeeded);
        let kv = &t.responses[0].response_range.as_ref().unwrap().kvs[0];
        assert_eq!(
            (kv.key.as_slice(), kv.value.as_slice()),
            (&b"foo"[..], &b"bar"[..])
        );
        assert_eq!(
            (kv.create_revision, kv.mod_revision, t.header.revision),
            (2, 2, 2)
        );
        let ka = r#"{"result":{"header":{"revision":"4"},"ID":"4111120150245555210"}}"#;
        let m: StreamMessage<LeaseResponse> = serde_json::from_str(ka).unwrap();
        assert_eq!(
            m.result.unwrap().ttl,
            0,
            "a gone lease's keepalive has no TTL"
        );
        let w = r#"{"result":{"header":{"revision":"4"},"events":[{"kv":{"key":"YQ==","create_revision":"3","mod_revision":"3","version":"1","value":"YmFy","lease":"4111120150245555210"}},{"type":"DELETE","kv":{"key":"YQ==","mod_revision":"4"}}]}}"#;
        let m: StreamMessage<WatchResponse> = serde_json::from_str(w).unwrap();
        let evs = m.result.unwrap().events;
        assert_eq!((evs[0].kind.as_str(), evs[1].kind.as_str()), ("", "DELETE"));
        assert_eq!(evs[0].kv.lease, 4111120150245555210);
    }

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/bw/events/"), b"/bw/events0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }
}
