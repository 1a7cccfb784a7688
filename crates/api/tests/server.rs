//! The API server in-process on port 0, driven by the real client and by raw HTTP bytes.

mod fake;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use api::{AddReplica, Client, ClientError, CreateVolume, ErrorCode, Mode, VolumeSettings};
use fake::Fake;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running server; shuts down (and is awaited) on `stop`.
struct Server {
    addr: SocketAddr,
    client: Client,
    fake: Arc<Fake>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

async fn start() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = Arc::new(Fake::new());
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(api::serve(listener, fake.clone(), rx));
    let client = Client::new(&format!("http://{addr}")).unwrap();
    Server {
        addr,
        client,
        fake,
        stop,
        task,
    }
}

impl Server {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops")
            .unwrap();
    }
}

/// Sends raw bytes, reads the whole answer; returns (status, body).
async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(request).await; // the server may answer (and close) before reading all
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let _ = read.expect("server answers in time");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A request with a JSON body and `Connection: close`.
fn req(method: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn error_code(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error envelope: {body}"))
        .to_owned()
}

fn create(name: &str, size_bytes: u64) -> CreateVolume {
    CreateVolume {
        name: name.parse().unwrap(),
        size_bytes,
        replicas: None,
        mode: None,
        spread: None,
        nodes: Vec::new(),
        min_in_sync: None,
        resync_rate_bytes_per_s: None,
    }
}

// Goal: every volume operation round-trips through client → server → Control → client.
#[tokio::test]
async fn volume_lifecycle_through_client() {
    let s = start().await;
    let c = &s.client;
    let v = c.create_volume(&create("db1", 1 << 30)).await.unwrap();
    assert_eq!(
        (v.name.as_str(), v.size_bytes, v.mode),
        ("db1", 1 << 30, Mode::Sync)
    );
    assert_eq!(c.list_volumes().await.unwrap().len(), 1);
    assert_eq!(
        c.resize_volume("db1", 2 << 30).await.unwrap().size_bytes,
        2 << 30
    );
    let a = c.attach_volume("db1", None).await.unwrap();
    assert_eq!(
        (a.nbd_uri.as_str(), a.generation),
        ("nbd://127.0.0.1:10809/db1", 1)
    );
    let got = c.get_volume("db1").await.unwrap();
    assert_eq!(got.attached.unwrap().node, "node-1");
    let err = c.delete_volume("db1", false).await.unwrap_err();
    assert_eq!(err.api_error().unwrap().code, ErrorCode::InUse, "{err}");
    c.detach_volume("db1").await.unwrap();
    let settings = VolumeSettings {
        mode: Some(Mode::Async),
        resync_rate_bytes_per_s: Some(100 << 20),
        min_in_sync: None,
    };
    let v = c.set_volume("db1", &settings).await.unwrap();
    assert_eq!(
        (v.mode, v.resync_rate_bytes_per_s),
        (Mode::Async, Some(100 << 20))
    );
    let st = c.status().await.unwrap();
    assert_eq!((st.volumes, st.volumes_size_bytes), (1, 2 << 30));
    assert_eq!(c.list_nodes().await.unwrap()[0].name, "node-1");
    assert!(c
        .metrics_text()
        .await
        .unwrap()
        .contains("blockwarden_volumes"));
    c.delete_volume("db1", true).await.unwrap();
    assert!(c.list_volumes().await.unwrap().is_empty());
    s.stop().await;
}

// Goal: Control errors reach the client with their code, status and message.
#[tokio::test]
async fn control_errors_map_to_codes_and_statuses() {
    let s = start().await;
    let err = s.client.get_volume("nope").await.unwrap_err();
    match &err {
        ClientError::Api { status: 404, error } => {
            assert_eq!(error.code, ErrorCode::NotFound);
            assert!(error.message.contains("\"nope\""), "{}", error.message);
        }
        other => panic!("{other:?}"),
    }
    s.client.create_volume(&create("a", 4096)).await.unwrap();
    let dup = s
        .client
        .create_volume(&create("a", 4096))
        .await
        .unwrap_err();
    assert!(
        matches!(&dup, ClientError::Api { status: 409, error } if error.code == ErrorCode::AlreadyExists),
        "{dup:?}"
    );
    let full = s
        .client
        .create_volume(&create("huge", 1 << 50))
        .await
        .unwrap_err();
    assert!(
        matches!(&full, ClientError::Api { status: 507, error } if error.code == ErrorCode::NoSpace),
        "{full:?}"
    );
    let shrink = s.client.resize_volume("a", 1).await.unwrap_err();
    assert!(
        matches!(&shrink, ClientError::Api { status: 400, error } if error.code == ErrorCode::InvalidSize)
    );
    s.stop().await;
}

// Goal: malformed input at the HTTP layer gets a clear 4xx, never a crash; the server keeps serving.
#[tokio::test]
async fn bad_input_is_refused_with_clear_errors() {
    let s = start().await;
    let a = s.addr;
    let (st, _) = raw(a, b"GARBAGE\r\n\r\n").await;
    assert_eq!(st, 400, "garbage request line");
    let (st, body) = raw(a, &req("POST", "/v1/volumes", "{not json")).await;
    assert_eq!((st, error_code(&body).as_str()), (400, "bad_request"));
    assert!(body.contains("not valid JSON"), "{body}");
    let (st, body) = raw(a, &req("POST", "/v1/volumes", "[1,2]")).await;
    assert!(st == 400 && body.contains("JSON object"), "{body}");
    let (st, body) = raw(a, &req("POST", "/v1/volumes", r#"{"size":"1G"}"#)).await;
    assert!(st == 400 && body.contains("missing field `name`"), "{body}");
    let (st, body) = raw(
        a,
        &req("POST", "/v1/volumes", r#"{"name":"Bad Name","size":"1G"}"#),
    )
    .await;
    assert_eq!(
        (st, error_code(&body).as_str()),
        (400, "invalid_name"),
        "{body}"
    );
    for size in [r#""lots""#, "-1", "0", "1.5", r#""1.5""#, "true"] {
        let (st, body) = raw(
            a,
            &req(
                "POST",
                "/v1/volumes",
                &format!(r#"{{"name":"x","size":{size}}}"#),
            ),
        )
        .await;
        assert_eq!(
            (st, error_code(&body).as_str()),
            (400, "invalid_size"),
            "size {size}: {body}"
        );
    }
    let (st, body) = raw(
        a,
        &req(
            "POST",
            "/v1/volumes",
            r#"{"name":"x","size":"1G","replica":3}"#,
        ),
    )
    .await;
    assert!(
        st == 400 && body.contains("unknown field `replica`"),
        "{body}"
    );
    let (st, body) = raw(a, &req("GET", "/v1/volumes/UPPER", "")).await;
    assert_eq!(
        (st, error_code(&body).as_str()),
        (400, "invalid_name"),
        "{body}"
    );
    let (st, body) = raw(a, &req("GET", "/v1/volumes/a%20b", "")).await;
    assert!(
        st == 400 && body.contains("a b"),
        "percent-decoded name in the message: {body}"
    );
    let (st, body) = raw(a, &req("PATCH", "/v1/volumes/x", "{}")).await;
    assert!(st == 400 && body.contains("nothing to change"), "{body}");
    let (st, body) = raw(a, &req("GET", "/v1/events?limit=0", "")).await;
    assert_eq!(
        (st, error_code(&body).as_str()),
        (400, "bad_request"),
        "{body}"
    );
    let (st, body) = raw(a, &req("DELETE", "/v1/volumes/x?forse=1", "")).await;
    assert!(
        st == 400 && body.contains("unknown query parameter"),
        "{body}"
    );
    // Still serving after all that.
    let (st, body) = raw(
        a,
        &req("POST", "/v1/volumes", r#"{"name":"ok","size":"10G"}"#),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    assert_eq!(
        s.client.get_volume("ok").await.unwrap().size_bytes,
        10 << 30
    );
    s.stop().await;
}

// Goal: the body limit holds whether the size is declared up front or only discovered.
#[tokio::test]
async fn body_over_limit_is_413() {
    let s = start().await;
    let declared = format!(
        "POST /v1/volumes HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        api::http::MAX_BODY_BYTES + 1
    );
    let (st, body) = raw(s.addr, declared.as_bytes()).await;
    assert!(
        st == 413 && body.contains("larger than the limit"),
        "{st} {body}"
    );
    let mut chunked = b"POST /v1/volumes HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let chunk = vec![b' '; 64 << 10];
    for _ in 0..=(api::http::MAX_BODY_BYTES / chunk.len()) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (st, _) = raw(s.addr, &chunked).await;
    assert_eq!(st, 413, "undeclared length over the limit");
    s.stop().await;
}

// Goal: unknown routes are 404 JSON; known routes with a wrong method are 405 with Allow.
#[tokio::test]
async fn unknown_route_404_and_wrong_method_405() {
    let s = start().await;
    let (st, body) = raw(s.addr, &req("GET", "/v1/nothing", "")).await;
    assert_eq!((st, error_code(&body).as_str()), (404, "not_found"));
    let (st, body) = raw(s.addr, &req("GET", "/v1/volumes/", "")).await;
    assert_eq!(st, 404, "{body}");
    let mut s2 = TcpStream::connect(s.addr).await.unwrap();
    s2.write_all(&req("PUT", "/v1/volumes", "{}"))
        .await
        .unwrap();
    let mut out = String::new();
    s2.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("allow: get, post"),
        "{out}"
    );
    s.stop().await;
}

// Goal: history paging, and a followed stream that delivers new events and ends on shutdown.
#[tokio::test]
async fn events_history_and_follow_until_shutdown() {
    let s = start().await;
    for n in ["a", "b", "c"] {
        s.client.create_volume(&create(n, 4096)).await.unwrap();
    }
    let all = s.client.events(None, None).await.unwrap();
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    let page = s.client.events(Some(1), Some(1)).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].volume.as_deref(), Some("b"));
    let mut stream = s.client.follow_events(Some(2)).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.seq, 3, "replayed history after `since`");
    s.fake.emit("volume.io_error", "c");
    let ev = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((ev.seq, ev.kind.as_str()), (4, "volume.io_error"));
    s.stop.send(true).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("stream ends on shutdown");
    assert!(end.is_none(), "{end:?}");
    tokio::time::timeout(Duration::from_secs(10), s.task)
        .await
        .unwrap()
        .unwrap();
}

// Goal: a client pointed at no agent says so in words an operator acts on.
#[tokio::test]
async fn client_reports_agent_not_running() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let err = Client::new(&format!("http://{addr}/"))
        .unwrap()
        .status()
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("is it running?"), "{err}");
    for bad in [
        "https://h:1",
        "h:1",
        "http://h",
        "http://h:x",
        "http://h:1/v1",
    ] {
        assert!(
            matches!(Client::new(bad), Err(ClientError::BadUrl { .. })),
            "{bad}"
        );
    }
}

// Goal: the committed OpenAPI document is valid JSON, served verbatim, and documents exactly
// the routes and methods the router serves.
#[tokio::test]
async fn openapi_document_matches_router() {
    let doc: serde_json::Value =
        serde_json::from_str(api::OPENAPI_JSON).expect("docs/openapi.json parses");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0"));
    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "parameters")
        {
            documented.push(format!("{} {path}", method.to_ascii_uppercase()));
        }
    }
    let mut served: Vec<String> = api::ROUTES
        .iter()
        .flat_map(|(p, ms)| ms.iter().map(move |m| format!("{m} {p}")))
        .collect();
    documented.sort();
    served.sort();
    assert_eq!(documented, served);
    let s = start().await;
    assert_eq!(s.client.openapi().await.unwrap(), doc);
    // Every served (route, method) reaches a handler: no 405 and no route-level 404/500.
    for (path, methods) in api::ROUTES {
        for m in *methods {
            let p = path
                .replace("{name}", "probe")
                .replace("{node}", "probe-node");
            let (st, body) = raw(s.addr, &req(m, &p, "{}")).await;
            let unrouted = matches!(st, 405 | 500) || (st == 404 && body.contains("no such route"));
            assert!(!unrouted, "{m} {p} -> {st} {body}");
        }
    }
    s.stop().await;
}

// Goal: add-replica and remove-replica round-trip through the client with the new replica's
// id, state and progress, and their errors keep their codes.
#[tokio::test]
async fn replicas_added_and_removed_through_client() {
    let s = start().await;
    let c = &s.client;
    let mut req = create("r1", 1 << 30);
    req.replicas = Some(2);
    req.min_in_sync = Some(2);
    req.resync_rate_bytes_per_s = Some(50 << 20);
    let v = c.create_volume(&req).await.unwrap();
    assert_eq!((v.replicas, v.min_in_sync), (2, 2));
    assert_eq!(v.resync_rate_bytes_per_s, Some(50 << 20));
    let ids: Vec<u64> = v.replica_set.iter().map(|r| r.id).collect();
    assert_eq!(ids, [1, 2]);

    let add = AddReplica {
        node: "node-3".parse().unwrap(),
        resync_rate_bytes_per_s: Some(10 << 20),
    };
    let v = c.add_replica("r1", &add).await.unwrap();
    let r = v.replica_set.iter().find(|r| r.node == "node-3").unwrap();
    assert_eq!((r.id, r.state.as_str(), r.in_sync), (3, "resyncing", false));
    let p = r.resync.expect("progress while resyncing");
    assert_eq!((p.total_bytes, p.rate_bytes_per_s), (1 << 30, 10 << 20));
    assert!(v.degraded);

    let dup = c.add_replica("r1", &add).await.unwrap_err();
    assert!(
        matches!(&dup, ClientError::Api { status: 409, error } if error.code == ErrorCode::AlreadyExists),
        "{dup:?}"
    );
    let unknown = AddReplica {
        node: "nosuch".parse().unwrap(),
        resync_rate_bytes_per_s: None,
    };
    let e = c.add_replica("r1", &unknown).await.unwrap_err();
    assert_eq!(e.api_error().unwrap().code, ErrorCode::NotFound, "{e}");
    assert!(e.to_string().contains("nosuch"), "{e}");

    let v = c.remove_replica("r1", "node-3").await.unwrap();
    assert_eq!(v.replica_set.len(), 2);
    assert!(!v.degraded);
    let e = c.remove_replica("r1", "node-3").await.unwrap_err();
    assert_eq!(e.api_error().unwrap().code, ErrorCode::NotFound, "{e}");
    let e = c.remove_replica("r1", "Bad Node").await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Api { status: 400, error } if error.code == ErrorCode::InvalidName && error.message.contains("Bad Node")),
        "the node name as typed: {e:?}"
    );
    let e = c.remove_replica("ghost", "node-1").await.unwrap_err();
    assert_eq!(e.api_error().unwrap().code, ErrorCode::NotFound, "{e}");

    let v = c
        .set_volume(
            "r1",
            &VolumeSettings {
                min_in_sync: Some(1),
                ..VolumeSettings::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(v.min_in_sync, 1);
    s.stop().await;
}

// Goal: the replica routes refuse bad names (volume and node, each with its own message),
// bad rates, unknown fields and wrong methods with clear 4xx answers.
#[tokio::test]
async fn replica_routes_refuse_bad_input() {
    let s = start().await;
    let a = s.addr;
    s.client.create_volume(&create("v", 1 << 20)).await.unwrap();
    let post = |body: &str| req("POST", "/v1/volumes/v/replicas", body);

    let (st, body) = raw(a, &post(r#"{"node":"node-2","resync_rate":"100M"}"#)).await;
    assert_eq!(st, 200, "good request: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["replica_set"][1]["node"], "node-2", "{body}");
    assert_eq!(v["replica_set"][1]["resync"]["rate_bytes_per_s"], 100 << 20);

    let (st, body) = raw(a, &post(r#"{"node":"Node 2"}"#)).await;
    assert_eq!((st, error_code(&body).as_str()), (400, "invalid_name"));
    assert!(
        body.contains("invalid node name") && body.contains("Node 2"),
        "{body}"
    );
    let (st, body) = raw(a, &post(r#"{"node":7}"#)).await;
    assert_eq!(
        (st, error_code(&body).as_str()),
        (400, "invalid_name"),
        "{body}"
    );
    let (st, body) = raw(a, &post("{}")).await;
    assert!(st == 400 && body.contains("missing field `node`"), "{body}");
    let (st, body) = raw(a, &post(r#"{"node":"node-3","resync_rate":"fast"}"#)).await;
    assert_eq!(
        (st, error_code(&body).as_str()),
        (400, "invalid_size"),
        "{body}"
    );
    let (st, body) = raw(a, &post(r#"{"node":"node-3","rate":1}"#)).await;
    assert!(st == 400 && body.contains("unknown field `rate`"), "{body}");
    let (st, body) = raw(
        a,
        &req("POST", "/v1/volumes/BAD/replicas", r#"{"node":"node-3"}"#),
    )
    .await;
    assert!(
        st == 400 && body.contains("invalid volume name"),
        "the volume name is checked too: {body}"
    );

    let (st, body) = raw(a, &req("DELETE", "/v1/volumes/v/replicas/No%20de", "")).await;
    assert_eq!((st, error_code(&body).as_str()), (400, "invalid_name"));
    assert!(
        body.contains("invalid node name") && body.contains("No de"),
        "{body}"
    );
    let (st, body) = raw(a, &req("DELETE", "/v1/volumes/v/replicas/", "")).await;
    assert_eq!(st, 404, "an empty node segment is no route: {body}");
    let (st, _) = raw(a, &req("GET", "/v1/volumes/v/replicas/node-2", "")).await;
    assert_eq!(st, 405);
    let (st, body) = raw(a, &req("DELETE", "/v1/volumes/v/replicas/node-2", "")).await;
    assert_eq!(st, 200, "{body}");

    let (st, body) = raw(
        a,
        &req(
            "POST",
            "/v1/volumes",
            r#"{"name":"y","size":"1M","resync_rate":"x"}"#,
        ),
    )
    .await;
    assert_eq!(
        (st, error_code(&body).as_str()),
        (400, "invalid_size"),
        "{body}"
    );
    let (st, body) = raw(
        a,
        &req(
            "POST",
            "/v1/volumes",
            r#"{"name":"y","size":"1M","min_in_sync":2,"replicas":2,"resync_rate":0}"#,
        ),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    s.stop().await;
}

// Goal: the route matcher binds both placeholders and nothing else.
#[test]
fn route_matcher_binds_volume_and_node_segments() {
    let m = api::server::match_route("/v1/volumes/db/replicas/n-2").unwrap();
    assert_eq!(
        (m.tmpl, m.name, m.node),
        (
            "/v1/volumes/{name}/replicas/{node}",
            Some("db"),
            Some("n-2")
        )
    );
    let m = api::server::match_route("/v1/volumes/db/replicas").unwrap();
    assert_eq!((m.name, m.node), (Some("db"), None));
    assert!(api::server::match_route("/v1/volumes//replicas/x").is_none());
    assert!(api::server::match_route("/v1/volumes/db/replicas/x/y").is_none());
}
