//! The mutating admission call-out, as kube-apiserver's `MutatingAdmissionWebhook` plugin makes it:
//! rules, namespaceSelector (the labels of the request's namespace; of the object itself for
//! Namespaces; cluster-scoped objects always match) and objectSelector matching (against the old
//! or the new object), reinvocation (`reinvocationPolicy: IfNeeded`), an `admission.k8s.io/v1`
//! AdmissionReview POSTed over HTTPS verified with the configuration's CA bundle (`?timeout=Ns`
//! appended to the URL), the answer checked (apiVersion, kind, uid), a `JSONPatch` applied, a
//! denial turned into the API error the API server returns, warnings passed on, and
//! `failurePolicy` applied when the call fails.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::selectors::LabelSelector;
use super::status::ApiError;
use super::{UserInfo, lock};

/// What happens when the webhook cannot be called or answers garbage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    Fail,
    Ignore,
}

/// `reinvocationPolicy`: whether a webhook is called again, once, when a webhook after it in the
/// chain changed the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReinvocationPolicy {
    Never,
    IfNeeded,
}

/// One `rules[]` entry of a webhook configuration (`*` matches anything).
#[derive(Clone, Debug)]
pub struct WebhookRule {
    pub api_groups: Vec<String>,
    pub api_versions: Vec<String>,
    pub resources: Vec<String>,
    pub operations: Vec<String>,
}

/// One mutating webhook of a `MutatingWebhookConfiguration`.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// The webhook's name (`webhooks[].name`), used in error messages.
    pub name: String,
    /// `https://host:port/path`: the host is the TLS server name checked against the certificate.
    pub url: String,
    /// Connect here instead of resolving the URL's host (a Service DNS name, for instance).
    pub connect_to: Option<SocketAddr>,
    /// PEM of the CA that signs the webhook's certificate (`caBundle`, decoded).
    pub ca_bundle_pem: String,
    pub rules: Vec<WebhookRule>,
    /// `objectSelector` in label-selector syntax; `None` matches every object.
    pub object_selector: Option<String>,
    /// `namespaceSelector` in label-selector syntax; `None` matches every namespace.
    pub namespace_selector: Option<String>,
    pub failure_policy: FailurePolicy,
    pub reinvocation_policy: ReinvocationPolicy,
    /// `timeoutSeconds` (upstream's default: 10 s); a call that takes longer fails with
    /// `context deadline exceeded`, then `failurePolicy` decides.
    pub timeout: Duration,
}

impl WebhookConfig {
    /// fledge's webhook as its manifests (docs/install.md) register it: apps/v1 Deployments,
    /// CREATE and UPDATE, objects labelled `fledge.dev/enabled=true`, `failurePolicy: Fail`,
    /// `reinvocationPolicy: IfNeeded`, 5 s.
    pub fn fledge(url: impl Into<String>, ca_bundle_pem: impl Into<String>) -> Self {
        WebhookConfig {
            name: "deployments.fledge.dev".into(),
            url: url.into(),
            connect_to: None,
            ca_bundle_pem: ca_bundle_pem.into(),
            rules: vec![WebhookRule {
                api_groups: vec!["apps".into()],
                api_versions: vec!["v1".into()],
                resources: vec!["deployments".into()],
                operations: vec!["CREATE".into(), "UPDATE".into()],
            }],
            object_selector: Some("fledge.dev/enabled=true".into()),
            namespace_selector: None,
            failure_policy: FailurePolicy::Fail,
            reinvocation_policy: ReinvocationPolicy::IfNeeded,
            timeout: Duration::from_secs(5),
        }
    }

    fn rule_matches(&self, group: &str, version: &str, resource: &str, operation: &str) -> bool {
        let any = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        self.rules.iter().any(|r| {
            any(&r.api_groups, group)
                && any(&r.api_versions, version)
                && any(&r.resources, resource)
                && any(&r.operations, operation)
        })
    }

    /// Whether `namespaceSelector` selects `namespace` (the request's Namespace object; `None`
    /// for other cluster-scoped objects, which always match).
    pub fn namespace_matches(&self, namespace: Option<&Value>) -> bool {
        let (Some(sel), Some(ns)) = (&self.namespace_selector, namespace) else {
            return true;
        };
        LabelSelector::parse(sel).is_ok_and(|sel| sel.matches_object(ns))
    }

    /// Whether this webhook is called for the request (rules, then objectSelector on the new or
    /// the old object).
    pub fn matches(
        &self,
        group: &str,
        version: &str,
        resource: &str,
        operation: &str,
        object: Option<&Value>,
        old: Option<&Value>,
    ) -> bool {
        if !self.rule_matches(group, version, resource, operation) {
            return false;
        }
        let Some(sel) = &self.object_selector else {
            return true;
        };
        let Ok(sel) = LabelSelector::parse(sel) else {
            return false;
        };
        object.is_some_and(|o| sel.matches_object(o)) || old.is_some_and(|o| sel.matches_object(o))
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Gvk<'a> {
    group: &'a str,
    version: &'a str,
    kind: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Gvr<'a> {
    group: &'a str,
    version: &'a str,
    resource: &'a str,
}

/// `admission.k8s.io/v1` AdmissionRequest, fields in the Go struct's order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewRequest<'a> {
    uid: &'a str,
    kind: Gvk<'a>,
    resource: Gvr<'a>,
    request_kind: Gvk<'a>,
    request_resource: Gvr<'a>,
    name: &'a str,
    namespace: &'a str,
    operation: &'a str,
    user_info: &'a UserInfo,
    object: Option<&'a Value>,
    old_object: Option<&'a Value>,
    dry_run: bool,
    options: &'a Value,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Review<'a> {
    api_version: &'a str,
    kind: &'a str,
    request: ReviewRequest<'a>,
}

/// What the API server knows about the request under admission.
pub struct Attributes<'a> {
    pub uid: String,
    pub group: &'a str,
    pub version: &'a str,
    pub kind: &'a str,
    pub resource: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
    pub operation: &'a str,
    pub user: &'a UserInfo,
    pub object: &'a Value,
    pub old_object: Option<&'a Value>,
    pub dry_run: bool,
    pub options: Value,
}

/// A call made, for tests to inspect.
#[derive(Clone, Debug)]
pub struct WebhookCall {
    pub webhook: String,
    pub review: Value,
    /// The answer, or why there is none.
    pub response: Result<Value, String>,
    /// From sending the review to having the answer (or giving up): the webhook's share of the
    /// request, network and TLS included.
    pub took: Duration,
}

/// A request the webhook stopped: denied (`failure == false`) or failed to call.
pub struct Rejection {
    pub error: ApiError,
    pub call: WebhookCall,
    pub failure: bool,
}

/// The outcome of one webhook: the (possibly patched) object and warnings, or the error the
/// API server returns.
pub struct Admitted {
    pub object: Value,
    pub warnings: Vec<String>,
    pub call: WebhookCall,
}

pub async fn call(hook: &WebhookConfig, attrs: &Attributes<'_>) -> Result<Admitted, Rejection> {
    let review = Review {
        api_version: "admission.k8s.io/v1",
        kind: "AdmissionReview",
        request: ReviewRequest {
            uid: &attrs.uid,
            kind: Gvk {
                group: attrs.group,
                version: attrs.version,
                kind: attrs.kind,
            },
            resource: Gvr {
                group: attrs.group,
                version: attrs.version,
                resource: attrs.resource,
            },
            request_kind: Gvk {
                group: attrs.group,
                version: attrs.version,
                kind: attrs.kind,
            },
            request_resource: Gvr {
                group: attrs.group,
                version: attrs.version,
                resource: attrs.resource,
            },
            name: attrs.name,
            namespace: attrs.namespace,
            operation: attrs.operation,
            user_info: attrs.user,
            object: Some(attrs.object),
            old_object: attrs.old_object,
            dry_run: attrs.dry_run,
            options: &attrs.options,
        },
    };
    let body = serde_json::to_vec(&review).expect("a review serializes");
    let review_value: Value = serde_json::from_slice(&body).expect("just serialized");
    let url = format!(
        "{}{}timeout={}s",
        hook.url,
        if hook.url.contains('?') { "&" } else { "?" },
        hook.timeout.as_secs().max(1)
    );
    let started = Instant::now();
    let failed = |why: String| {
        let call = WebhookCall {
            webhook: hook.name.clone(),
            review: review_value.clone(),
            response: Err(why.clone()),
            took: started.elapsed(),
        };
        Rejection {
            error: ApiError::internal(format!("failed calling webhook {:?}: {why}", hook.name)),
            call,
            failure: true,
        }
    };
    let answer = match tokio::time::timeout(hook.timeout, post(hook, &url, body)).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            return Err(failed(format!("failed to call webhook: Post {url:?}: {e}")));
        }
        Err(_) => {
            return Err(failed(format!(
                "failed to call webhook: Post {url:?}: context deadline exceeded"
            )));
        }
    };
    let call = WebhookCall {
        webhook: hook.name.clone(),
        review: review_value.clone(),
        response: Ok(answer.clone()),
        took: started.elapsed(),
    };
    let invalid = |why: String| {
        let mut call = call.clone();
        call.response = Err(why.clone());
        Rejection {
            error: ApiError::internal(format!(
                "failed calling webhook {:?}: received invalid webhook response: {why}",
                hook.name
            )),
            call,
            failure: true,
        }
    };
    if answer["apiVersion"] != "admission.k8s.io/v1" || answer["kind"] != "AdmissionReview" {
        return Err(invalid(format!(
            "expected webhook response of admission.k8s.io/v1, Kind=AdmissionReview, got {}, Kind={}",
            answer["apiVersion"].as_str().unwrap_or_default(),
            answer["kind"].as_str().unwrap_or_default()
        )));
    }
    let response = &answer["response"];
    if !response.is_object() {
        return Err(invalid("response was absent".into()));
    }
    if response["uid"].as_str() != Some(attrs.uid.as_str()) {
        return Err(invalid(format!(
            "expected response.uid={:?}, got {:?}",
            attrs.uid,
            response["uid"].as_str().unwrap_or_default()
        )));
    }
    let warnings: Vec<String> = response["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w.as_str().map(str::to_string))
        .collect();
    if response["allowed"].as_bool() != Some(true) {
        return Err(Rejection {
            error: denied(&hook.name, &response["status"]),
            call,
            failure: false,
        });
    }
    let mut object = attrs.object.clone();
    if let Some(patch) = response["patch"].as_str() {
        match response["patchType"].as_str() {
            Some("JSONPatch") => {}
            other => {
                return Err(invalid(format!(
                    "expected patchType JSONPatch, got {:?}",
                    other.unwrap_or_default()
                )));
            }
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .map_err(|e| invalid(format!("patch is not base64: {e}")))?;
        let ops: json_patch::Patch = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(format!("patch is not a JSON patch: {e}")))?;
        json_patch::patch(&mut object, &ops).map_err(|e| {
            let mut call = call.clone();
            call.response = Err(e.to_string());
            Rejection {
                error: ApiError::internal(e.to_string()),
                call,
                failure: true,
            }
        })?;
    }
    Ok(Admitted {
        object,
        warnings,
        call,
    })
}

/// `webhookerrors.ToStatusErr`.
fn denied(name: &str, status: &Value) -> ApiError {
    let mut err = if status.is_object() {
        ApiError::from_status(status)
    } else {
        ApiError::new(400, "", "")
    };
    if !status.is_object() || status.get("code").is_none() {
        err.code = 400;
    }
    if err.code < 400 {
        err.code = 400;
    }
    let denied_by = format!("admission webhook {name:?} denied the request");
    err.message = if !err.message.is_empty() {
        format!("{denied_by}: {}", err.message)
    } else if !err.reason.is_empty() {
        format!("{denied_by}: {}", err.reason)
    } else {
        format!("{denied_by} without explanation")
    };
    err
}

async fn post(hook: &WebhookConfig, url: &str, body: Vec<u8>) -> Result<Value, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("parse: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err("webhook URLs must be https".into());
    }
    let host = uri.host().ok_or("no host")?.to_string();
    let port = uri.port_u16().unwrap_or(443);
    let addr = match hook.connect_to {
        Some(a) => a,
        None => tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| format!("dial tcp: lookup {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("dial tcp: lookup {host}: no such host"))?,
    };
    let key = (addr, host.clone(), hook.ca_bundle_pem.clone());
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let authority = uri
        .authority()
        .map(|a| a.to_string())
        .unwrap_or(host.clone());
    let body = Bytes::from(body);
    let request = || {
        hyper::Request::post(path.as_str())
            .header(hyper::header::HOST, authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json, */*")
            .body(Full::new(body.clone()))
            .map_err(|e| e.to_string())
    };
    // A kept connection the server closed meanwhile fails the send: then a new one, as Go's
    // transport does.
    let kept = match idle_connection(&key) {
        Some(mut sender) => sender
            .send_request(request()?)
            .await
            .ok()
            .map(|resp| (sender, resp)),
        None => None,
    };
    let (sender, resp) = match kept {
        Some(kept) => kept,
        None => {
            let mut sender = connect(hook, addr, &host).await?;
            let resp = sender
                .send_request(request()?)
                .await
                .map_err(|e| e.to_string())?;
            (sender, resp)
        }
    };
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if sender.is_ready() {
        lock(&IDLE).entry(key).or_default().push(sender);
    }
    if !status.is_success() {
        return Err(format!(
            "the server responded with the status code {} but did not return more information: {}",
            status.as_u16(),
            String::from_utf8_lossy(&bytes)
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("decoding the response: {e}"))
}

/// A webhook connection: its address, TLS server name and CA bundle.
type ConnectionKey = (SocketAddr, String, String);

/// Idle keep-alive connections to webhooks. kube-apiserver's webhook client keeps its connections
/// (Go's HTTP transport), so a review does not pay a TCP and TLS handshake each time; a call that
/// failed or timed out drops its connection.
static IDLE: LazyLock<Mutex<IdleConnections>> = LazyLock::new(Mutex::default);

type IdleConnections = HashMap<ConnectionKey, Vec<SendRequest<Full<Bytes>>>>;

/// An idle connection still open, if there is one.
fn idle_connection(key: &ConnectionKey) -> Option<SendRequest<Full<Bytes>>> {
    let mut idle = lock(&IDLE);
    let senders = idle.get_mut(key)?;
    while let Some(sender) = senders.pop() {
        if !sender.is_closed() && sender.is_ready() {
            return Some(sender);
        }
    }
    None
}

/// A new HTTPS connection verified with the hook's CA bundle.
async fn connect(
    hook: &WebhookConfig,
    addr: SocketAddr,
    host: &str,
) -> Result<SendRequest<Full<Bytes>>, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("dial tcp {addr}: connect: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(hook.ca_bundle_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("caBundle: {e}"))?;
        roots.add(cert).map_err(|e| format!("caBundle: {e}"))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: failed to verify certificate or handshake: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Options as the API server puts them in a review (`CreateOptions`/`UpdateOptions`).
pub fn options(
    create: bool,
    dry_run: bool,
    field_manager: Option<&str>,
    field_validation: &str,
) -> Value {
    let mut o = json!({
        "kind": if create { "CreateOptions" } else { "UpdateOptions" },
        "apiVersion": "meta.k8s.io/v1",
    });
    if dry_run {
        o["dryRun"] = json!(["All"]);
    }
    if let Some(m) = field_manager {
        o["fieldManager"] = json!(m);
    }
    if !field_validation.is_empty() {
        o["fieldValidation"] = json!(field_validation);
    }
    o
}
