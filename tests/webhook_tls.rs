//! The webhook as the API server meets it: the real `fledge` binary started with `fledge serve` on an
//! ephemeral port, certificates made by `fledge certs`, a real TLS client, and AdmissionReview
//! fixtures shaped like what kube-apiserver sends (`tests/data`, described in its README).
//!
//! Every test starts its own server; the child process is killed when the test's [`Server`] is
//! dropped, so also when an assertion fails. Nothing here measures speed: the timeouts only keep a
//! broken server from hanging the suite and are generous for a loaded machine.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ProtocolVersion, RootCertStore, SupportedProtocolVersion};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const FLEDGE: &str = env!("CARGO_BIN_EXE_fledge");
/// How long any single step may take before the test gives up.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The name the API server dials: `<service>.<namespace>.svc`.
const HOST: &str = "fledge.fledge.svc";
/// How often the server looks for rotated certificate files. (`200ms` would do, but the flag's
/// parser takes only whole h/m/s units so far.)
const RELOAD_INTERVAL: &str = "200ms";
/// The body limit promised in the issue: larger bodies get 413.
const MAX_BODY: usize = 3 * 1024 * 1024;
const BOTH_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
const TLS12_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

// ---------------------------------------------------------------------------------------------
// Files and processes

/// What one `fledge certs` run wrote.
struct CertSet {
    dir: PathBuf,
    ca_pem: String,
    /// The serving certificate (`tls.crt`).
    leaf: CertificateDer<'static>,
}

/// Runs `fledge certs` for Service `fledge` in namespace `fledge`, plus IP 127.0.0.1, into `dir`.
fn fledge_certs(dir: &Path) -> CertSet {
    let output = Command::new(FLEDGE)
        .args(["certs", "--service", "fledge", "--namespace", "fledge"])
        .args(["--ip", "127.0.0.1", "--out"])
        .arg(dir)
        .output()
        .expect("run fledge certs");
    assert!(
        output.status.success(),
        "fledge certs failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).expect("ca.pem");
    // stdout is the caBundle for the MutatingWebhookConfiguration: base64 of ca.pem.
    let bundle = String::from_utf8(output.stdout).expect("caBundle is text");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(bundle.trim())
        .expect("caBundle is base64");
    assert_eq!(
        decoded,
        ca_pem.as_bytes(),
        "caBundle must be base64 of ca.pem"
    );
    CertSet {
        dir: dir.to_path_buf(),
        ca_pem,
        leaf: leaf_of(&dir.join("tls.crt")),
    }
}

fn leaf_of(path: &Path) -> CertificateDer<'static> {
    let pem = std::fs::read(path).expect("read certificate");
    CertificateDer::from_pem_slice(&pem).expect("a PEM certificate")
}

/// Replaces `dst`'s `tls.key` and `tls.crt` with `src`'s, each by an atomic rename, as a Secret
/// volume update or cert-manager would.
fn rotate(src: &Path, dst: &Path) {
    for name in ["tls.key", "tls.crt"] {
        let staged = dst.join(format!(".{name}.new"));
        std::fs::copy(src.join(name), &staged).expect("stage rotated file");
        std::fs::rename(&staged, dst.join(name)).expect("rename rotated file over the served one");
    }
}

/// Kills the child process when dropped (also on panic), unless it has already exited.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// A running `fledge serve`.
struct Server {
    child: ChildGuard,
    addr: SocketAddr,
    /// Everything the server wrote to stderr so far (its log), for failure messages.
    log: Arc<Mutex<String>>,
    /// The certificates it was started with; `tls.crt` and `tls.key` in this directory are served.
    certs: CertSet,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(tag: &str) -> Server {
        Server::start_with(tag, &[])
    }

    fn start_with(tag: &str, extra_args: &[&str]) -> Server {
        // Named after the test, to find its files (and the server's log) when one fails.
        let dir = tempfile::Builder::new()
            .prefix(&format!("fledge-webhook-tls-{tag}-"))
            .tempdir()
            .expect("temp dir");
        let certs = fledge_certs(&dir.path().join("served"));
        let mut child = Command::new(FLEDGE)
            .args(["serve", "--webhook-only", "--listen", "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(certs.dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(certs.dir.join("tls.key"))
            .args(["--tls-reload-interval", RELOAD_INTERVAL])
            .args(extra_args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("FLEDGE_DRAIN_TIMEOUT")
            .env_remove("FLEDGE_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fledge serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let child = ChildGuard(child);
        let log = Arc::new(Mutex::new(String::new()));
        let (found, listening) = mpsc::channel();
        {
            // Keeps draining stderr for the server's whole life, so it never blocks on a full pipe.
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(addr) = listening_addr(&line) {
                        let _ = found.send(addr);
                    }
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let addr = match listening.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => panic!(
                "fledge serve did not log `webhook listening on`; its log:\n{}",
                log.lock().unwrap_or_else(|e| e.into_inner())
            ),
        };
        Server {
            child,
            addr,
            log,
            certs,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A connection as the API server makes it: TLS 1.3 or 1.2, trusting `ca.pem`, to the Service name.
    async fn connect(&self) -> Conn {
        let config = client_config(&[&self.certs.ca_pem], BOTH_VERSIONS);
        match Conn::open(self.addr, config, HOST).await {
            Ok(conn) => conn,
            Err(e) => panic!(
                "cannot connect to the webhook: {e}\nserver log:\n{}",
                self.log()
            ),
        }
    }

    /// Sends SIGTERM, as the kubelet does (no libc: `kill -TERM <pid>`).
    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Waits for the process to exit, up to `within`.
    fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.0.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The address in the server's `webhook listening on 127.0.0.1:PORT` log line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("webhook listening on ")?;
    rest.split_whitespace().next()?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The TLS client

fn client_config(
    cas: &[&str],
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("add CA");
        }
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    // What kube-apiserver's webhook client offers for an HTTP/1.1 transport.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(name.to_owned()).expect("server name");
    let connect = async {
        let tcp = TcpStream::connect(addr).await?;
        TlsConnector::from(config).connect(name, tcp).await
    };
    tokio::time::timeout(TIMEOUT, connect)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("TLS connect timed out")))
}

/// A request body: given chunks, sent with a Content-Length or chunked.
struct TestBody {
    chunks: VecDeque<Bytes>,
    with_length: bool,
}

impl TestBody {
    fn full(bytes: impl Into<Bytes>) -> TestBody {
        TestBody {
            chunks: VecDeque::from([bytes.into()]),
            with_length: true,
        }
    }

    fn empty() -> TestBody {
        TestBody {
            chunks: VecDeque::new(),
            with_length: true,
        }
    }

    /// `Transfer-Encoding: chunked`, no Content-Length: the server only learns the size by reading.
    fn chunked(bytes: &[u8], chunk: usize) -> TestBody {
        TestBody {
            chunks: bytes.chunks(chunk).map(Bytes::copy_from_slice).collect(),
            with_length: false,
        }
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(
            self.get_mut()
                .chunks
                .pop_front()
                .map(|c| Ok(Frame::data(c))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.with_length && self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.with_length {
            SizeHint::with_exact(self.chunks.iter().map(|c| c.len() as u64).sum())
        } else {
            SizeHint::default()
        }
    }
}

/// An HTTP response, body read whole.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    content_type: String,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// One HTTP/1.1 keep-alive connection over TLS.
struct Conn {
    sender: SendRequest<TestBody>,
    peer_leaf: CertificateDer<'static>,
    version: Option<ProtocolVersion>,
    alpn: Option<Vec<u8>>,
}

impl Conn {
    async fn open(addr: SocketAddr, config: Arc<ClientConfig>, name: &str) -> Result<Conn, String> {
        let stream = tls_connect(addr, config, name)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (_, session) = stream.get_ref();
        let peer_leaf = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or("no peer certificate")?
            .clone()
            .into_owned();
        let version = session.protocol_version();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Conn {
            sender,
            peer_leaf,
            version,
            alpn,
        })
    }

    async fn try_send(
        &mut self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: TestBody,
    ) -> Result<Reply, String> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, HOST);
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        let request = request.body(body).expect("request");
        let exchange = async {
            self.sender
                .ready()
                .await
                .map_err(|e| format!("connection not ready: {e}"))?;
            let response = self
                .sender
                .send_request(request)
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let status = response.status();
            let content_type = response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading the response body: {e}"))?
                .to_bytes();
            Ok(Reply {
                status,
                content_type,
                body,
            })
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no response within {TIMEOUT:?}")))
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: TestBody,
    ) -> Reply {
        self.try_send(method, path, content_type, body)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    async fn get(&mut self, path: &str) -> Reply {
        self.send(Method::GET, path, None, TestBody::empty()).await
    }

    /// `POST /mutate` with `Content-Type: application/json`, as the API server sends reviews.
    async fn post_json(&mut self, body: impl Into<Bytes>) -> Reply {
        self.send(
            Method::POST,
            "/mutate",
            Some("application/json"),
            TestBody::full(body),
        )
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures and answers

fn data_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(data_path(name)).unwrap_or_else(|e| panic!("tests/data/{name}: {e}"))
}

fn fixture(name: &str) -> Value {
    serde_json::from_slice(&fixture_bytes(name))
        .unwrap_or_else(|e| panic!("tests/data/{name}: {e}"))
}

/// Posts an AdmissionReview and returns its answer's `response`, after checking that the answer
/// is a well-formed AdmissionReview for this request.
async fn answer(conn: &mut Conn, review: &Value) -> Value {
    let reply = conn.post_json(serde_json::to_vec(review).unwrap()).await;
    check_answer(
        &reply,
        review["request"]["uid"].as_str().expect("request.uid"),
    )
}

fn check_answer(reply: &Reply, uid: &str) -> Value {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(
        reply.content_type.starts_with("application/json"),
        "Content-Type {:?}",
        reply.content_type
    );
    let mut review = reply.json();
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1", "{review}");
    assert_eq!(review["kind"], "AdmissionReview", "{review}");
    let response = review["response"].take();
    assert_eq!(response["uid"], uid, "the uid must be echoed: {response}");
    response
}

/// Posts fixture `name` as committed (pretty-printed, byte for byte) and returns the request it
/// holds and the answer's `response`.
async fn answer_fixture(conn: &mut Conn, name: &str) -> (Value, Value) {
    let review = fixture(name);
    let reply = conn.post_json(fixture_bytes(name)).await;
    let response = check_answer(&reply, review["request"]["uid"].as_str().expect("uid"));
    (review["request"].clone(), response)
}

/// The JSONPatch of an answer: `patchType: JSONPatch` and `patch` as base64 (Go's `[]byte`).
fn patch_of(response: &Value) -> json_patch::Patch {
    assert_eq!(response["allowed"], true, "{response}");
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let encoded = response["patch"]
        .as_str()
        .unwrap_or_else(|| panic!("patch must be a base64 string: {response}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("patch is base64");
    serde_json::from_slice(&bytes).expect("patch is a JSONPatch")
}

fn patch_paths(patch: &json_patch::Patch) -> Vec<String> {
    serde_json::to_value(patch)
        .unwrap()
        .as_array()
        .expect("a JSONPatch is an array")
        .iter()
        .map(|op| op["path"].as_str().expect("path").to_owned())
        .collect()
}

fn patched(object: &Value, patch: &json_patch::Patch) -> Value {
    let mut object = object.clone();
    json_patch::patch(&mut object, patch).expect("the patch applies to request.object");
    object
}

fn assert_allowed_unchanged(response: &Value) {
    assert_eq!(response["allowed"], true, "{response}");
    assert!(
        response.get("patch").is_none(),
        "no patch expected: {response}"
    );
    assert!(
        response.get("patchType").is_none(),
        "no patchType expected: {response}"
    );
}

fn annotation<'a>(object: &'a Value, key: &str) -> &'a str {
    object["metadata"]["annotations"][key]
        .as_str()
        .unwrap_or_else(|| panic!("annotation {key} missing"))
}

fn template_hash(object: &Value) -> String {
    fledge::core::template::hash(&object["spec"]["template"])
}

// ---------------------------------------------------------------------------------------------
// The fixtures themselves

/// Every fixture in `tests/data`.
const FIXTURES: [&str; 11] = [
    "create-valid.json",
    "create-invalid-steps.json",
    "update-new-template.json",
    "update-new-template-dry-run.json",
    "update-scale-only.json",
    "update-reapply-aborted.json",
    "update-promotion.json",
    "update-revert.json",
    "update-resume.json",
    "update-not-opted-in.json",
    "pod-create.json",
];

/// `value` without its `null`s: Go writes `creationTimestamp: null` for an unset time, the typed
/// Rust objects leave it out.
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// `object` read as the typed Kubernetes `K` and written back must be `object` again: then every
/// field name is one Kubernetes knows and every value has its type.
fn assert_round_trips<K>(name: &str, which: &str, object: &Value)
where
    K: serde::de::DeserializeOwned + serde::Serialize,
{
    let typed: K = serde_json::from_value(object.clone())
        .unwrap_or_else(|e| panic!("{name}: {which} is not a valid object: {e}"));
    assert_eq!(
        serde_json::to_value(&typed).unwrap(),
        without_nulls(object),
        "{name}: {which} has fields the Kubernetes types do not know"
    );
}

#[test]
fn fixtures_are_admission_reviews_of_valid_kubernetes_objects() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Pod;
    use kube::core::DynamicObject;
    use kube::core::admission::AdmissionReview;

    let mut on_disk: Vec<String> = std::fs::read_dir(data_path(""))
        .expect("tests/data")
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".json"))
        .collect();
    on_disk.sort();
    let mut listed = FIXTURES.map(str::to_owned).to_vec();
    listed.sort();
    assert_eq!(
        on_disk, listed,
        "list every fixture in FIXTURES and in tests/data/README.md"
    );
    let readme = std::fs::read_to_string(data_path("README.md")).expect("tests/data/README.md");

    for name in FIXTURES {
        assert!(
            readme.contains(&format!("`{name}`")),
            "{name} is not described in the README"
        );
        let review = fixture(name);
        let text = String::from_utf8(fixture_bytes(name)).unwrap();
        serde_json::from_str::<AdmissionReview<DynamicObject>>(&text)
            .unwrap_or_else(|e| panic!("{name}: not an AdmissionReview: {e}"));
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1", "{name}");
        let request = &review["request"];
        assert_eq!(request["kind"], request["requestKind"], "{name}");
        assert_eq!(request["resource"], request["requestResource"], "{name}");
        let options_kind = match request["operation"].as_str() {
            Some("CREATE") => "CreateOptions",
            Some("UPDATE") => "UpdateOptions",
            other => panic!("{name}: unexpected operation {other:?}"),
        };
        assert_eq!(request["options"]["kind"], options_kind, "{name}");
        assert_eq!(
            request["options"]["dryRun"].is_array(),
            request["dryRun"] == true,
            "{name}: dryRun and options.dryRun disagree"
        );
        if options_kind == "CreateOptions" {
            assert!(request["oldObject"].is_null(), "{name}");
        }
        for which in ["object", "oldObject"] {
            let object = &request[which];
            if object.is_null() {
                continue;
            }
            match request["kind"]["kind"].as_str() {
                Some("Deployment") => assert_round_trips::<Deployment>(name, which, object),
                Some("Pod") => assert_round_trips::<Pod>(name, which, object),
                other => panic!("{name}: unexpected kind {other:?}"),
            }
        }
    }
    // The benchmark's review is kept near the size of a real one.
    let size = fixture_bytes("update-new-template.json").len();
    assert!((6_000..20_000).contains(&size), "{size} bytes");
}

// ---------------------------------------------------------------------------------------------
// Decisions

#[tokio::test]
async fn creates_are_allowed_or_denied_naming_the_bad_step() {
    let server = Server::start("create");
    let mut conn = server.connect().await;

    let (request, response) = answer_fixture(&mut conn, "create-valid.json").await;
    assert_eq!(request["operation"], "CREATE");
    assert_allowed_unchanged(&response);

    let (_, response) = answer_fixture(&mut conn, "create-invalid-steps.json").await;
    assert_eq!(response["allowed"], false, "{response}");
    assert_eq!(
        response["status"]["message"],
        "fledge.dev/steps[2].setWeight: 150 is not between 0 and 100"
    );
    assert!(response.get("patch").is_none(), "{response}");
}

#[tokio::test]
async fn a_new_template_keeps_the_stable_one_and_becomes_the_pending_canary() {
    let server = Server::start("new-template");
    let mut conn = server.connect().await;

    let (request, response) = answer_fixture(&mut conn, "update-new-template.json").await;
    let (object, old) = (&request["object"], &request["oldObject"]);
    assert_eq!(
        object["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/example/web:1.1.0"
    );
    let patch = patch_of(&response);
    assert_eq!(
        patch_paths(&patch),
        [
            "/metadata/annotations/fledge.dev~1stable-hash",
            "/spec/paused",
            "/metadata/annotations/fledge.dev~1hold",
        ]
    );
    let result = patched(object, &patch);
    // The new template goes through exactly as sent (defaulted fields, `creationTimestamp: null`);
    // the Deployment is held, and the stable template's identity is recorded.
    assert_eq!(result["spec"]["template"], object["spec"]["template"]);
    assert_eq!(result["spec"]["paused"], true);
    assert_eq!(
        annotation(&result, "fledge.dev/stable-hash"),
        template_hash(old)
    );
    assert_eq!(annotation(&result, "fledge.dev/hold"), "true");
    // Nothing else changes: labels, other annotations, managedFields, status.
    let mut expected = object.clone();
    expected["spec"]["paused"] = json!(true);
    let annotations = expected["metadata"]["annotations"].as_object_mut().unwrap();
    annotations.insert("fledge.dev/stable-hash".into(), json!(template_hash(old)));
    annotations.insert("fledge.dev/hold".into(), json!("true"));
    assert_eq!(result, expected);
    let hash = template_hash(object);
    let warnings = response["warnings"]
        .as_array()
        .expect("a warning for kubectl");
    assert_eq!(warnings.len(), 1, "{response}");
    let warning = warnings[0].as_str().unwrap();
    assert!(
        warning.contains(&hash) && warning.contains("held as a canary"),
        "{warning}"
    );

    // A server-side dry run gets the very same answer (sideEffects: None).
    let (dry_request, dry) = answer_fixture(&mut conn, "update-new-template-dry-run.json").await;
    assert_eq!(dry_request["dryRun"], true);
    assert_eq!(dry_request["object"], request["object"]);
    let mut dry_as_wet = dry.clone();
    dry_as_wet["uid"] = response["uid"].clone();
    assert_eq!(dry_as_wet, response);

    // Reinvocation: the API server may call again with the webhook's own output; nothing changes.
    let mut again = fixture("update-new-template.json");
    again["request"]["uid"] = json!("7a1c4e2f-3b5d-4f6a-8c9e-0d1b2a3c4e5f");
    again["request"]["object"] = result;
    assert_allowed_unchanged(&answer(&mut conn, &again).await);

    let metrics = conn.get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = metrics.text();
    for line in [
        "fledge_admission_reviews_total{decision=\"patch\"} 2",
        "fledge_admission_reviews_total{decision=\"allow\"} 1",
        "fledge_admission_review_duration_seconds_count 3",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}

#[tokio::test]
async fn changes_that_are_not_a_new_canary_pass_or_stay_on_the_stable_template() {
    let server = Server::start("no-canary");
    let mut conn = server.connect().await;

    // Scaling: the template is unchanged.
    let (request, response) = answer_fixture(&mut conn, "update-scale-only.json").await;
    assert_ne!(
        request["object"]["spec"]["replicas"],
        request["oldObject"]["spec"]["replicas"]
    );
    assert_eq!(
        request["object"]["spec"]["template"],
        request["oldObject"]["spec"]["template"]
    );
    assert_allowed_unchanged(&response);
    assert!(response.get("warnings").is_none(), "{response}");

    // The opt-in label is removed in the same apply that changes the image: a plain update.
    let (request, response) = answer_fixture(&mut conn, "update-not-opted-in.json").await;
    assert_eq!(
        request["oldObject"]["metadata"]["labels"]["fledge.dev/enabled"],
        "true"
    );
    assert!(
        request["object"]["metadata"]["labels"]
            .get("fledge.dev/enabled")
            .is_none()
    );
    assert_ne!(
        request["object"]["spec"]["template"],
        request["oldObject"]["spec"]["template"]
    );
    assert_allowed_unchanged(&response);

    // Not a Deployment at all.
    let (request, response) = answer_fixture(&mut conn, "pod-create.json").await;
    assert_eq!(request["kind"]["kind"], "Pod");
    assert_allowed_unchanged(&response);

    // fledge's controller unpausing the canary it promotes (its field manager, state Promoting).
    let (request, response) = answer_fixture(&mut conn, "update-promotion.json").await;
    let state: Value =
        serde_json::from_str(annotation(&request["oldObject"], "fledge.dev/state")).unwrap();
    assert_eq!(state["phase"], "Promoting");
    assert_eq!(state["hash"], template_hash(&request["object"]));
    assert_eq!(request["object"]["spec"]["paused"], false);
    assert_allowed_unchanged(&response);

    // The template of an aborted canary applied again: nothing changes, it stays aborted and held.
    let (request, response) = answer_fixture(&mut conn, "update-reapply-aborted.json").await;
    let (object, old) = (&request["object"], &request["oldObject"]);
    let state: Value = serde_json::from_str(annotation(old, "fledge.dev/state")).unwrap();
    assert_eq!(state["phase"], "Aborted");
    assert_eq!(state["hash"], template_hash(object));
    assert_allowed_unchanged(&response);
    let warning = response["warnings"][0].as_str().expect("a warning");
    assert!(
        warning.contains("was aborted") && warning.contains("fledge retry web"),
        "{warning}"
    );

    // `kubectl apply` of the previous manifest: a rollback, unpaused, the hold record gone.
    let (request, response) = answer_fixture(&mut conn, "update-revert.json").await;
    let (object, old) = (&request["object"], &request["oldObject"]);
    assert_eq!(
        annotation(old, "fledge.dev/stable-hash"),
        template_hash(object)
    );
    let result = patched(object, &patch_of(&response));
    assert_eq!(result["spec"]["paused"], false);
    assert_eq!(result["spec"]["template"], object["spec"]["template"]);
    assert!(
        result["metadata"]["annotations"]
            .get("fledge.dev/hold")
            .is_none()
    );
    assert!(
        result["metadata"]["annotations"]
            .get("fledge.dev/stable-hash")
            .is_none()
    );
    assert!(
        response["warnings"][0]
            .as_str()
            .unwrap_or_default()
            .contains("rollback"),
        "{response}"
    );

    // `kubectl rollout resume` of a held Deployment: denied, with the way forward.
    let (request, response) = answer_fixture(&mut conn, "update-resume.json").await;
    assert_eq!(request["options"]["fieldManager"], "kubectl-rollout");
    assert_eq!(response["allowed"], false, "{response}");
    let message = response["status"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("kubectl fledge promote web")
            && message.contains("kubectl fledge abort web"),
        "{message}"
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP

#[tokio::test]
async fn health_and_metrics_endpoints_answer() {
    let server = Server::start("health");
    let mut conn = server.connect().await;
    for path in ["/livez", "/readyz"] {
        let reply = conn.get(path).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
        assert_eq!(reply.text(), "ok", "{path}");
    }
    let metrics = conn.get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics
            .content_type
            .starts_with("application/openmetrics-text"),
        "{:?}",
        metrics.content_type
    );
    // Families without samples yet are left out; the duration histogram is always there.
    let text = metrics.text();
    assert!(
        text.contains("# TYPE fledge_admission_review_duration_seconds histogram"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(conn.get("/nope").await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        conn.get("/mutate").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[tokio::test]
async fn hostile_input_gets_a_review_under_its_uid_or_a_clear_4xx() {
    let server = Server::start("hostile");
    let mut conn = server.connect().await;
    let review = fixture_bytes("update-new-template.json");

    // Exactly the limit is fine (a review padded with whitespace) ...
    let mut padded = review.clone();
    padded.resize(MAX_BODY, b' ');
    let (_, expected) = answer_fixture(&mut conn, "update-new-template.json").await;
    let reply = conn.post_json(padded.clone()).await;
    assert_eq!(
        check_answer(&reply, "7a1c4e2f-3b5d-4f6a-8c9e-0d1b2a3c4e51"),
        expected
    );
    // ... one byte more is 413, announced by Content-Length ...
    padded.push(b' ');
    let reply = conn.post_json(padded.clone()).await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text()
    );
    assert!(
        reply.text().contains("over the 3 MiB limit"),
        "{}",
        reply.text()
    );
    // ... or found out while reading a chunked body.
    let mut conn = server.connect().await;
    let reply = conn
        .send(
            Method::POST,
            "/mutate",
            Some("application/json"),
            TestBody::chunked(&padded, 64 * 1024),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text()
    );

    // Not an AdmissionReview, and no uid to answer under: 400 saying why.
    let mut conn = server.connect().await;
    let deep = "[".repeat(100_000);
    let bad_requests: [(&str, &[u8], &str); 6] = [
        ("garbage", b"GET / HTTP/1.1 ... not JSON", "fledge cannot read this AdmissionReview"),
        ("empty", b"", "fledge cannot read this AdmissionReview"),
        ("not UTF-8", b"{\"request\": \"\xff\xfe\"}", "fledge cannot read this AdmissionReview"),
        ("deeply nested", deep.as_bytes(), "fledge cannot read this AdmissionReview"),
        (
            "no request",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            "the AdmissionReview has no request to answer",
        ),
        (
            "empty uid",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":""}}"#,
            "fledge cannot read this AdmissionReview",
        ),
    ];
    for (what, body, message) in bad_requests {
        let reply = conn.post_json(body.to_vec()).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{what}: {}",
            reply.text()
        );
        assert!(
            reply.text().starts_with(message),
            "{what}: {}",
            reply.text()
        );
    }

    // Unreadable, but with a uid: an AdmissionReview denying it, under that uid, so the API server
    // shows the reason.
    let mut unknown_operation = fixture("update-new-template.json");
    unknown_operation["request"]["uid"] = json!("hostile-1");
    unknown_operation["request"]["operation"] = json!("EXPLODE");
    let mut object_not_an_object = fixture("create-valid.json");
    object_not_an_object["request"]["uid"] = json!("hostile-2");
    object_not_an_object["request"]["object"] = json!("a string");
    let minimal = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                         "request": {"uid": "hostile-3"}});
    for review in [unknown_operation, object_not_an_object, minimal] {
        let response = answer(&mut conn, &review).await;
        assert_eq!(response["allowed"], false, "{response}");
        let message = response["status"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("fledge cannot read this AdmissionReview"),
            "{response}"
        );
        assert!(response.get("patch").is_none(), "{response}");
    }

    // The wrong media type, or none: 415.
    for content_type in [Some("text/plain"), Some("application/yaml"), None] {
        let reply = conn
            .send(
                Method::POST,
                "/mutate",
                content_type,
                TestBody::full(review.clone()),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        assert_eq!(reply.text(), "expected Content-Type: application/json");
    }
    // Parameters and case do not matter.
    let reply = conn
        .send(
            Method::POST,
            "/mutate",
            Some("Application/JSON; charset=utf-8"),
            TestBody::full(review.clone()),
        )
        .await;
    assert_eq!(
        check_answer(&reply, "7a1c4e2f-3b5d-4f6a-8c9e-0d1b2a3c4e51"),
        expected
    );

    // After all that, the same connection still serves, and the failures were counted.
    let metrics = conn.get("/metrics").await.text();
    assert!(
        metrics.contains("fledge_admission_reviews_total{decision=\"invalid\"}"),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------------------------
// TLS

#[tokio::test]
async fn tls12_clients_and_the_ip_san_work_and_plain_http_gets_no_answer() {
    let server = Server::start("tls");

    let mut tls13 = server.connect().await;
    assert_eq!(tls13.version, Some(ProtocolVersion::TLSv1_3));
    assert_eq!(tls13.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(tls13.peer_leaf, server.certs.leaf);

    // A TLS 1.2-only client, dialing the IP address (the certificate has it as a SAN).
    let config = client_config(&[&server.certs.ca_pem], TLS12_ONLY);
    let mut tls12 = Conn::open(server.addr, config, "127.0.0.1")
        .await
        .unwrap_or_else(|e| panic!("TLS 1.2 client: {e}\n{}", server.log()));
    assert_eq!(tls12.version, Some(ProtocolVersion::TLSv1_2));
    assert_eq!(tls12.alpn.as_deref(), Some(&b"http/1.1"[..]));
    let (_, response) = answer_fixture(&mut tls12, "update-new-template.json").await;
    patch_of(&response);

    // A client that trusts another CA is refused.
    let other = tempfile::tempdir().expect("temp dir");
    let other = fledge_certs(other.path());
    let stranger = tls_connect(
        server.addr,
        client_config(&[&other.ca_pem], BOTH_VERSIONS),
        HOST,
    )
    .await;
    assert!(
        stranger.is_err(),
        "a certificate from an untrusted CA was accepted"
    );

    // Plain HTTP to the TLS port gets no HTTP answer (at most a TLS alert, then the connection ends).
    let mut plain = TcpStream::connect(server.addr).await.expect("TCP connect");
    plain
        .write_all(b"GET /livez HTTP/1.1\r\nHost: fledge.fledge.svc\r\n\r\n")
        .await
        .expect("write");
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut received)).await;
    assert!(
        !received.starts_with(b"HTTP/"),
        "plain HTTP got an HTTP answer: {}",
        String::from_utf8_lossy(&received)
    );
    if let Some(first) = received.first() {
        assert_eq!(
            *first, 0x15,
            "only a TLS alert record may come back: {received:?}"
        );
    }

    // The server is unharmed.
    assert_eq!(tls13.get("/livez").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart_or_dropped_connections() {
    let server = Server::start("rotate");
    let mut kept = server.connect().await;
    assert_eq!(kept.peer_leaf, server.certs.leaf);
    assert_eq!(kept.get("/livez").await.status, StatusCode::OK);

    // A fresh `fledge certs` run (a new CA too), moved over the served files.
    let next_dir = tempfile::tempdir().expect("temp dir");
    let next = fledge_certs(next_dir.path());
    assert_ne!(next.leaf, server.certs.leaf);
    rotate(&next.dir, &server.certs.dir);

    // New connections get the new certificate once the server notices the files changed.
    let trusts_both = client_config(&[&server.certs.ca_pem, &next.ca_pem], BOTH_VERSIONS);
    let deadline = Instant::now() + TIMEOUT;
    let mut fresh = loop {
        match Conn::open(server.addr, Arc::clone(&trusts_both), HOST).await {
            Ok(conn) if conn.peer_leaf == next.leaf => break conn,
            Ok(conn) => assert_eq!(conn.peer_leaf, server.certs.leaf, "an unknown certificate"),
            Err(e) => panic!(
                "connecting during rotation: {e}\nserver log:\n{}",
                server.log()
            ),
        }
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was not served within {TIMEOUT:?}; server log:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        server.log().contains("reloaded the serving certificate"),
        "{}",
        server.log()
    );
    let (_, response) = answer_fixture(&mut fresh, "update-new-template.json").await;
    patch_of(&response);

    // The connection made before the rotation still answers.
    let (_, response) = answer_fixture(&mut kept, "update-new-template.json").await;
    patch_of(&response);
    assert_eq!(kept.peer_leaf, server.certs.leaf);

    // Clients that only know the old CA are now refused.
    let old_only = client_config(&[&server.certs.ca_pem], BOTH_VERSIONS);
    assert!(tls_connect(server.addr, old_only, HOST).await.is_err());
}

// ---------------------------------------------------------------------------------------------
// Slow clients and shutdown, spoken as raw HTTP/1.1 over TLS (to stop half-way through a request)

/// A raw HTTP/1.1 response.
struct RawResponse {
    status: u16,
    /// Lowercase names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response head from `stream` within `within`; the body is left to [`read_response`].
async fn read_head(stream: &mut TlsStream<TcpStream>, within: Duration) -> RawResponse {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("no response head within {within:?}"))
            .expect("read response head");
        assert!(
            n > 0,
            "connection closed before a response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..end].to_vec()).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    RawResponse {
        status,
        headers,
        body: buf[end + 4..].to_vec(),
    }
}

/// Reads a whole response (head, then a body of Content-Length bytes) within `within`.
async fn read_response(stream: &mut TlsStream<TcpStream>, within: Duration) -> RawResponse {
    let deadline = tokio::time::Instant::now() + within;
    let mut response = read_head(stream, within).await;
    let length: usize = response
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Content-Length: {:?}", response.headers));
    let mut chunk = [0u8; 4096];
    while response.body.len() < length {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("no complete body within {within:?}"))
            .expect("read response body");
        assert!(n > 0, "connection closed mid-body");
        response.body.extend_from_slice(&chunk[..n]);
    }
    response
}

/// Starts `POST /mutate` of `length` bytes and returns once the server's handler is reading the
/// body: `Expect: 100-continue` makes the server say so with `100 Continue`.
async fn start_post(server: &Server, length: usize) -> TlsStream<TcpStream> {
    let config = client_config(&[&server.certs.ca_pem], BOTH_VERSIONS);
    let mut stream = tls_connect(server.addr, config, HOST)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}\nserver log:\n{}", server.log()));
    let head = format!(
        "POST /mutate HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n\
         Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("send head");
    let interim = read_head(&mut stream, TIMEOUT).await;
    assert_eq!(interim.status, 100, "expected 100 Continue");
    stream
}

async fn send(stream: &mut TlsStream<TcpStream>, bytes: &[u8]) {
    stream.write_all(bytes).await.expect("send");
    stream.flush().await.expect("flush");
}

#[tokio::test]
async fn a_body_that_stops_coming_gets_408() {
    let server = Server::start("slow-body");
    let review = fixture_bytes("update-new-template.json");
    let mut stream = start_post(&server, review.len()).await;
    send(&mut stream, &review[..review.len() / 2]).await;
    // The server gives up after its 10 s request timeout; allow plenty more on a loaded machine.
    let response = read_response(&mut stream, Duration::from_secs(40)).await;
    assert_eq!(response.status, 408, "{:?}", response.headers);
    assert_eq!(
        String::from_utf8_lossy(&response.body),
        "the request was not complete within 10s"
    );
}

#[tokio::test]
async fn a_request_head_that_stops_coming_is_cut_off() {
    let server = Server::start("slow-head");
    let config = client_config(&[&server.certs.ca_pem], BOTH_VERSIONS);
    let mut stream = tls_connect(server.addr, config, HOST)
        .await
        .expect("connect");
    send(
        &mut stream,
        b"POST /mutate HTTP/1.1\r\nHost: fledge.fledge.svc\r\n",
    )
    .await;
    // Like a slow body, a slow head must not hold a connection: a 408, or the connection closed.
    let mut received = Vec::new();
    let outcome =
        tokio::time::timeout(Duration::from_secs(40), stream.read_to_end(&mut received)).await;
    assert!(
        outcome.is_ok(),
        "the connection was still open after 40 s with half a request head"
    );
    assert!(
        received.is_empty() || received.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&received)
    );
}

#[tokio::test]
async fn sigterm_drains_the_request_in_flight_then_exits_cleanly() {
    let mut server = Server::start_with("sigterm", &["--drain-timeout", "20s"]);
    let review = fixture_bytes("update-new-template.json");
    let (first_half, second_half) = review.split_at(review.len() / 2);

    // A request in flight: the head and half the body sent, and the handler reading it.
    let mut stream = start_post(&server, review.len()).await;
    send(&mut stream, first_half).await;

    server.sigterm();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // New connections are no longer served (refused, or never answered).
    let config = client_config(&[&server.certs.ca_pem], BOTH_VERSIONS);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let probe = async {
            let mut conn = Conn::open(server.addr, Arc::clone(&config), HOST).await?;
            conn.try_send(Method::GET, "/livez", None, TestBody::empty())
                .await
        };
        match tokio::time::timeout(Duration::from_secs(2), probe).await {
            Ok(Ok(reply)) if reply.status == StatusCode::OK => {
                // SIGTERM not handled yet (a loaded machine): try again.
                assert!(
                    Instant::now() < deadline,
                    "still serving new connections after SIGTERM; log:\n{}",
                    server.log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => break,
        }
    }
    assert_eq!(
        server.wait_exit(Duration::ZERO),
        None,
        "exited with a request in flight; log:\n{}",
        server.log()
    );

    // The rest of the body: the request in flight gets its full, correct answer.
    send(&mut stream, second_half).await;
    let response = read_response(&mut stream, TIMEOUT).await;
    let reply = Reply {
        status: StatusCode::from_u16(response.status).expect("status"),
        content_type: response.header("content-type").unwrap_or_default().into(),
        body: Bytes::from(response.body),
    };
    let answer = check_answer(&reply, "7a1c4e2f-3b5d-4f6a-8c9e-0d1b2a3c4e51");
    let request = &fixture("update-new-template.json")["request"];
    let result = patched(&request["object"], &patch_of(&answer));
    assert_eq!(
        result["spec"]["template"],
        request["object"]["spec"]["template"]
    );
    assert_eq!(result["spec"]["paused"], true);
    drop(stream);

    // Then the process exits, successfully.
    let status = server
        .wait_exit(TIMEOUT)
        .unwrap_or_else(|| panic!("still running after draining; log:\n{}", server.log()));
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        server.log()
    );
    let log = server.log();
    assert!(log.contains("draining in-flight requests"), "{log}");
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "the port still accepts connections after exit"
    );
}
