//! The providers that measure a check ([`crate::core::analysis`] says what a measurement means):
//! a Prometheus instant query, a web request, or a Job in the Deployment's namespace.
//!
//! One entry point, [`measure`], which never panics and never fails: whatever goes wrong becomes
//! a [`Reading::Error`] whose text names the check's address, URL, Secret or Job. Its future is
//! `Send`, so the controller can `tokio::spawn` it. A Job measurement waits for the Job to end
//! (bounded by the Job's own `activeDeadlineSeconds`); the caller bounds it further if it wants.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Api;
use kube::api::{DeleteParams, ListParams};

use crate::core::analysis::{Check, Provider, Reading, SecretValue, Variables};

mod job;
mod prometheus;
mod web;

pub use job::{LABEL_CANARY_HASH, LABEL_CHECK, LABEL_DEPLOYMENT};

/// The most of an answer's body read; a longer one is an error (a hostile or confused server
/// must not fill the controller's memory).
pub const MAX_BODY: usize = 1 << 20;

/// What a measurement needs besides the check.
#[derive(Clone)]
pub struct MeasureContext {
    pub client: kube::Client,
    /// See [`http_client`].
    pub http: reqwest::Client,
    /// The Deployment's namespace: Secrets are read and Jobs created there.
    pub namespace: String,
    /// `fledge serve --prometheus-address`, for checks without `prometheus.address`.
    pub default_prometheus: Option<String>,
    pub variables: Variables,
    /// The user's Deployment: the owner of the Jobs, so that deleting it deletes them.
    pub owner: OwnerReference,
}

/// Why a measurement failed; shown to the user as the text of [`Reading::Error`].
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error(
        "no Prometheus address: set `prometheus.address` in the check or start the controller with `fledge serve --prometheus-address`"
    )]
    NoPrometheusAddress,
    #[error("Secret {namespace}/{name} not found")]
    SecretNotFound { namespace: String, name: String },
    #[error("Secret {namespace}/{name} has no key {key:?}")]
    SecretKeyMissing {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("Secret {namespace}/{name} key {key:?} is not UTF-8 text")]
    SecretNotText {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("reading Secret {namespace}/{name}: {source}")]
    SecretRead {
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("invalid URL {url:?}: {detail}")]
    InvalidUrl { url: String, detail: String },
    #[error("invalid HTTP method {0:?}")]
    InvalidMethod(String),
    #[error("{url}: header {name:?} is not a valid HTTP header")]
    InvalidHeader { url: String, name: String },
    #[error("{method} {url} timed out after {timeout:?}")]
    Timeout {
        method: String,
        url: String,
        timeout: Duration,
    },
    #[error("{method} {url}: {detail}")]
    Request {
        method: String,
        url: String,
        detail: String,
    },
    #[error("{method} {url} answered {status}{}", excerpt(body))]
    Status {
        method: String,
        url: String,
        status: u16,
        body: String,
    },
    #[error("{method} {url}: the answer is larger than {MAX_BODY} bytes")]
    TooLarge { method: String, url: String },
    #[error("Prometheus at {address}: {error_type}: {error}")]
    PrometheusError {
        address: String,
        error_type: String,
        error: String,
    },
    #[error(
        "Prometheus at {address}: the query returned a {result_type}; use an instant vector or scalar"
    )]
    PrometheusResultType {
        address: String,
        result_type: String,
    },
    #[error("Prometheus at {address}: the query returned {value}, which no condition can compare")]
    PrometheusInfinite { address: String, value: String },
    #[error("Prometheus at {address}: unreadable answer: {detail}")]
    PrometheusAnswer { address: String, detail: String },
    #[error("{url}: invalid jsonPath {path:?}: {detail}")]
    JsonPath {
        url: String,
        path: String,
        detail: String,
    },
    #[error("{url}: the answer is not JSON, so jsonPath {path:?} cannot apply: {detail}")]
    NotJson {
        url: String,
        path: String,
        detail: String,
    },
    #[error("Job {namespace}/{name}: invalid spec: {detail}")]
    JobSpec {
        namespace: String,
        name: String,
        detail: String,
    },
    #[error("Job {namespace}/{name}: {what}: {source}")]
    JobApi {
        namespace: String,
        name: String,
        what: &'static str,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(
        "Job {namespace}/{name} exists but was not created by fledge for this check (labels {LABEL_DEPLOYMENT}, {LABEL_CANARY_HASH}, {LABEL_CHECK} differ)"
    )]
    JobNotOurs { namespace: String, name: String },
    #[error("Job {namespace}/{name}: watching it failed: {detail}")]
    JobWatch {
        namespace: String,
        name: String,
        detail: String,
    },
    #[error("Job {namespace}/{name} was deleted before it finished")]
    JobDeleted { namespace: String, name: String },
}

/// The first characters of an error answer, for the message.
fn excerpt(body: &str) -> String {
    let text = body.trim();
    if text.is_empty() {
        return String::new();
    }
    let mut cut: String = text.chars().take(200).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    format!(": {cut}")
}

/// An HTTP client for [`MeasureContext::http`]: rustls with the ring provider (installed as the
/// process default when none is), the system's roots.
pub fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may win the race; either way a provider is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
}

/// Takes one measurement of `check`. `job_name` names the Job of a Job check
/// ([`crate::core::analysis::schedule::job_name`]); other providers ignore it.
pub async fn measure(ctx: &MeasureContext, check: &Check, job_name: &str) -> Reading {
    let result = match &check.provider {
        Provider::Prometheus(query) => prometheus::measure(ctx, query).await,
        Provider::Web(request) => web::measure(ctx, request).await,
        Provider::Job(job) => job::measure(ctx, &check.name, job, job_name).await,
    };
    result.unwrap_or_else(|e| Reading::Error(e.to_string()))
}

/// Deletes the Jobs of `deployment`'s checks in `namespace` (background propagation: their pods
/// go with them), except those of canary `keep_canary_hash` when given.
pub async fn delete_jobs(
    client: kube::Client,
    namespace: &str,
    deployment: &str,
    keep_canary_hash: Option<&str>,
) -> Result<(), kube::Error> {
    let mut selector = format!("{LABEL_DEPLOYMENT}={deployment}");
    if let Some(hash) = keep_canary_hash {
        selector.push_str(&format!(",{LABEL_CANARY_HASH}!={hash}"));
    }
    let jobs: Api<Job> = Api::namespaced(client, namespace);
    jobs.delete_collection(
        &DeleteParams::background(),
        &ListParams::default().labels(&selector),
    )
    .await
    .map(|_| ())
}

/// The text of `value`: inline (with variables expanded) or read from its Secret in
/// `ctx.namespace` (as stored, without surrounding whitespace, such as the newline a file
/// given to `kubectl create secret --from-file` ends with).
async fn resolve(ctx: &MeasureContext, value: &SecretValue) -> Result<String, MeasureError> {
    match value {
        SecretValue::Literal(text) => Ok(ctx.variables.expand(text)),
        SecretValue::SecretKey { name, key } => {
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
            let secret =
                secrets
                    .get_opt(name)
                    .await
                    .map_err(|source| MeasureError::SecretRead {
                        namespace: ctx.namespace.clone(),
                        name: name.clone(),
                        source: Box::new(source),
                    })?;
            let Some(secret) = secret else {
                return Err(MeasureError::SecretNotFound {
                    namespace: ctx.namespace.clone(),
                    name: name.clone(),
                });
            };
            let bytes = secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|b| b.0.clone())
                .or_else(|| {
                    // Only API servers that do not convert `stringData` keep it.
                    secret
                        .string_data
                        .as_ref()
                        .and_then(|d| d.get(key))
                        .map(|s| s.clone().into_bytes())
                })
                .ok_or_else(|| MeasureError::SecretKeyMissing {
                    namespace: ctx.namespace.clone(),
                    name: name.clone(),
                    key: key.clone(),
                })?;
            let text = String::from_utf8(bytes).map_err(|_| MeasureError::SecretNotText {
                namespace: ctx.namespace.clone(),
                name: name.clone(),
                key: key.clone(),
            })?;
            Ok(text.trim().to_string())
        }
    }
}

/// An answer's status and body (at most [`MAX_BODY`] bytes).
struct Answer {
    status: reqwest::StatusCode,
    body: Vec<u8>,
}

/// Sends `request` and reads the answer, turning every failure into a [`MeasureError`] that
/// names `method` and `url` (which must not carry secrets).
async fn send(
    request: reqwest::RequestBuilder,
    method: &str,
    url: &str,
    timeout: Duration,
) -> Result<Answer, MeasureError> {
    let fail = |e: reqwest::Error| {
        if e.is_timeout() {
            MeasureError::Timeout {
                method: method.to_string(),
                url: url.to_string(),
                timeout,
            }
        } else {
            MeasureError::Request {
                method: method.to_string(),
                url: url.to_string(),
                detail: describe(&e),
            }
        }
    };
    // reqwest's timeout covers connecting, the headers and the body; the outer one is a guard.
    let read = async {
        let mut response = request.timeout(timeout).send().await.map_err(fail)?;
        let status = response.status();
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BODY as u64)
        {
            return Err(MeasureError::TooLarge {
                method: method.to_string(),
                url: url.to_string(),
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(fail)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(MeasureError::TooLarge {
                    method: method.to_string(),
                    url: url.to_string(),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status, body })
    };
    match tokio::time::timeout(timeout + Duration::from_secs(1), read).await {
        Ok(answer) => answer,
        Err(_) => Err(MeasureError::Timeout {
            method: method.to_string(),
            url: url.to_string(),
            timeout,
        }),
    }
}

/// The causes of a request error, without reqwest's own "error sending request for url (…)",
/// which repeats the URL the message already names.
fn describe(e: &reqwest::Error) -> String {
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !causes.iter().any(|c: &String| c.contains(&text)) {
            causes.push(text);
        }
        source = s.source();
    }
    if causes.is_empty() {
        return e.to_string();
    }
    causes.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The controller spawns measurements: the future must be `Send`.
    #[allow(dead_code)]
    fn measure_is_send(ctx: &'static MeasureContext, check: &'static Check) {
        fn send<T: Send>(_: T) {}
        send(measure(ctx, check, "job"));
    }

    #[test]
    fn error_answers_are_cut_short() {
        let e = MeasureError::Status {
            method: "GET".into(),
            url: "http://x/".into(),
            status: 503,
            body: "y".repeat(1000),
        };
        let text = e.to_string();
        assert!(
            text.starts_with("GET http://x/ answered 503: yyy"),
            "{text}"
        );
        assert!(text.chars().count() < 250, "{text}");
        let e = MeasureError::Status {
            method: "GET".into(),
            url: "http://x/".into(),
            status: 503,
            body: " \n".into(),
        };
        assert_eq!(e.to_string(), "GET http://x/ answered 503");
    }
}
