//! The HTTPS webhook server: `POST /mutate`, `GET /livez`, `GET /readyz`, `GET /metrics`.
//!
//! The only IO around the pure [`crate::core::admission`] decision. Every request gets an answer: a
//! well-formed AdmissionReview carrying the request's uid when there is one, otherwise an HTTP 4xx
//! naming what is wrong.

pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::core::admission::{self, review};
use crate::core::policy::PolicySnapshot;
use crate::runtime::policies::PolicyWatch;

/// Larger request bodies get 413. The API server caps objects at about 1.5 MiB, and a review holds
/// two of them.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// A request (body included) that takes longer gets 408: a slow client must not hold a worker.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS setup: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("starting the webhook's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// The outcome label of `fledge_admission_reviews_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReviewLabels {
    decision: &'static str,
}

/// The decisions a review is counted under, each with its counter created up front: looking a
/// label up in the family on every review would take its lock.
const DECISIONS: [&str; 4] = ["allow", "patch", "deny", "invalid"];

/// Webhook metrics, served at `/metrics` in Prometheus text format.
pub struct ServerMetrics {
    registry: Registry,
    reviews: Family<ReviewLabels, Counter>,
    /// `reviews`' counters for [`DECISIONS`], in that order.
    by_decision: [Counter; DECISIONS.len()],
    duration: Histogram,
    /// The controller's, served here too.
    pub controller: crate::runtime::controller::ControllerMetrics,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        let reviews = Family::<ReviewLabels, Counter>::default();
        // 25 µs … ~0.8 s: the decision takes tens of microseconds; the tail shows trouble.
        let duration = Histogram::new(exponential_buckets(0.000_025, 2.0, 16));
        let mut registry = Registry::with_prefix("fledge");
        registry.register(
            "admission_reviews",
            "AdmissionReviews answered, by decision (allow, patch, deny, invalid)",
            reviews.clone(),
        );
        registry.register(
            "admission_review_duration_seconds",
            "Time to read, decide and answer one AdmissionReview",
            duration.clone(),
        );
        let controller = crate::runtime::controller::ControllerMetrics::register(&mut registry);
        let by_decision =
            DECISIONS.map(|decision| reviews.get_or_create(&ReviewLabels { decision }).clone());
        ServerMetrics {
            registry,
            reviews,
            by_decision,
            duration,
            controller,
        }
    }
}

impl ServerMetrics {
    fn observe(&self, decision: &'static str, started: Instant) {
        match DECISIONS.iter().position(|d| *d == decision) {
            Some(i) => self.by_decision[i].inc(),
            None => self.reviews.get_or_create(&ReviewLabels { decision }).inc(),
        };
        self.duration.observe(started.elapsed().as_secs_f64());
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// What the handlers share.
#[derive(Clone, Default)]
pub struct AppState {
    pub metrics: Arc<ServerMetrics>,
    /// Cleared when draining, so `/readyz` turns away new traffic first.
    pub ready: Arc<AtomicBool>,
    /// The policies and namespace labels the decision takes; `/readyz` waits for their first sync.
    pub policies: PolicyWatch,
}

/// The axum application, without TLS (tests drive it in-process too). No layers: `mutate` bounds
/// its body's size and time itself (the other routes read no body), and the state is shared behind
/// one `Arc`, so a review costs no more shared-count updates than it must.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Arc::new(state))
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if !state.ready.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if !state.policies.is_synced() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the policies and namespaces have not been listed yet",
        )
            .into_response()
    } else {
        "ok".into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn mutate(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let read =
        tokio::time::timeout(REQUEST_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES)).await;
    let (label, response) = match read {
        Err(_) => (
            "invalid",
            (
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request was not complete within {}s",
                    REQUEST_TIMEOUT.as_secs()
                ),
            )
                .into_response(),
        ),
        Ok(Err(e)) if is_over_limit(&e) => (
            "invalid",
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is over the {} MiB limit",
                    MAX_BODY_BYTES >> 20
                ),
            )
                .into_response(),
        ),
        Ok(Err(e)) => (
            "invalid",
            (
                StatusCode::BAD_REQUEST,
                format!("the request body could not be read: {e}"),
            )
                .into_response(),
        ),
        Ok(Ok(_)) if !is_json(&parts.headers) => (
            "invalid",
            (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "expected Content-Type: application/json",
            )
                .into_response(),
        ),
        Ok(Ok(body)) => match review(&body, &state.policies.current()) {
            Ok((label, json)) => (
                label,
                ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
            ),
            Err(bad) => ("invalid", (StatusCode::BAD_REQUEST, bad.0).into_response()),
        },
    };
    state.metrics.observe(label, started);
    response
}

/// Whether reading the body stopped at [`MAX_BODY_BYTES`] (a declared length over it included).
fn is_over_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// A request that cannot be answered with an AdmissionReview: the reason, for an HTTP 400.
#[derive(Debug, PartialEq, Eq)]
pub struct BadRequest(pub String);

/// Reads an AdmissionReview body and answers it: the decision label and the response JSON. A body
/// that is not an AdmissionReview at all yields [`BadRequest`].
pub fn review(
    body: &[u8],
    policies: &PolicySnapshot,
) -> Result<(&'static str, Vec<u8>), BadRequest> {
    let encoded = |json: Result<Vec<u8>, serde_json::Error>| {
        json.map_err(|e| BadRequest(format!("fledge could not encode its answer: {e}")))
    };
    match review::parse(body) {
        Ok(request) => {
            let decision = admission::decide(&request, policies);
            let label = decision.outcome.label();
            tracing::debug!(
                uid = %request.uid,
                name = %request.name,
                namespace = request.namespace.as_deref().unwrap_or(""),
                decision = label,
                "admission review"
            );
            let json = review::answer(&request.types.api_version, &request.uid, &decision);
            Ok((label, encoded(json)?))
        }
        Err(review::ReviewError::NoRequest) => {
            Err(BadRequest(review::ReviewError::NoRequest.to_string()))
        }
        Err(error) => {
            // Answer under the request's uid when it can be found, so the API server shows the reason.
            let uid = review::uid(body).filter(|uid| !uid.is_empty());
            let message = format!("fledge cannot read this AdmissionReview: {error}");
            match uid {
                Some(uid) => Ok(("invalid", encoded(review::unreadable(&uid, &message))?)),
                None => Err(BadRequest(message)),
            }
        }
    }
}

/// [`serve`] on a tokio runtime of its own (one worker per core, threads named `fledge-webhook`),
/// so that nothing else scheduled on the caller's runtime (the controller's reconciles) can delay
/// a review: with `failurePolicy: Fail`, a late answer blocks users' updates. `shutdown` is awaited
/// on the caller's runtime.
pub async fn serve_isolated(
    listener: std::net::TcpListener,
    cert: Arc<tls::ReloadingCert>,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
        .thread_name("fledge-webhook")
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("fledge-webhook".into())
        .spawn(move || {
            // A dropped `stop` (the caller gone) stops the server too.
            let until_stopped = async {
                let _ = stopped.await;
            };
            let _ = done.send(runtime.block_on(serve(listener, cert, state, until_stopped, drain)));
        })
        .map_err(ServeError::Runtime)?;
    let gone = |_| {
        ServeError::Runtime(std::io::Error::other(
            "the webhook's thread ended without a result",
        ))
    };
    let mut finished = std::pin::pin!(finished);
    tokio::select! {
        result = &mut finished => return result.map_err(gone)?,
        () = shutdown => {}
    }
    let _ = stop.send(());
    finished.await.map_err(gone)?
}

/// Serves the webhook over TLS on `listener` until `shutdown` resolves, then drains in-flight
/// requests for up to `drain`.
pub async fn serve(
    listener: std::net::TcpListener,
    cert: Arc<tls::ReloadingCert>,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) -> Result<(), ServeError> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let config =
        axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls::server_config(cert)?));
    let handle = axum_server::Handle::<SocketAddr>::new();
    let mut server = axum_server::from_tcp_rustls(listener, config)
        .map_err(|source| ServeError::Listen {
            addr: addr.clone(),
            source,
        })?
        .handle(handle.clone());
    // axum-server turns hyper's header read timeout off; a client that never finishes its request
    // head would otherwise hold a connection (and a graceful shutdown) forever.
    server
        .http_builder()
        .http1()
        .header_read_timeout(REQUEST_TIMEOUT);
    state.ready.store(true, Ordering::Relaxed);
    let app = router(state.clone());
    let serving = server.serve(app.into_make_service());
    tokio::pin!(serving);
    tokio::select! {
        result = &mut serving => return result.map_err(|source| ServeError::Listen { addr, source }),
        () = shutdown => {}
    }
    tracing::info!(
        drain_seconds = drain.as_secs(),
        "shutting down: draining in-flight requests"
    );
    state.ready.store(false, Ordering::Relaxed);
    handle.graceful_shutdown(Some(drain));
    serving
        .await
        .map_err(|source| ServeError::Listen { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn review_body(object: Value) -> Vec<u8> {
        serde_json::to_vec(&review::deployment_review("u-1", "alice", &object, None)).unwrap()
    }

    fn answer(body: &[u8]) -> Value {
        serde_json::from_slice(&review(body, &PolicySnapshot::default()).unwrap().1).unwrap()
    }

    #[test]
    fn unreadable_reviews_are_answered_under_their_uid() {
        let body = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u-9","operation":"CREATE"}}"#;
        let r = answer(body);
        assert_eq!(r["response"]["uid"], "u-9");
        assert_eq!(r["response"]["allowed"], false);
        assert!(
            r["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .starts_with("fledge cannot read this AdmissionReview")
        );
    }

    #[test]
    fn bodies_without_a_uid_are_bad_requests() {
        for body in [
            &b"garbage"[..],
            b"{}",
            br#"{"request":{"uid":""}}"#,
            b"[1,2]",
        ] {
            let err = review(body, &PolicySnapshot::default()).unwrap_err();
            assert!(
                err.0.starts_with("fledge cannot read") || err.0.contains("no request"),
                "{err:?}"
            );
        }
        let no_request = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#;
        assert_eq!(
            review(no_request, &PolicySnapshot::default()).unwrap_err(),
            BadRequest("the AdmissionReview has no request to answer".into())
        );
    }

    #[test]
    fn a_valid_review_gets_its_decision() {
        let object = json!({"metadata": {"name": "web"}, "spec": {"template": {}}});
        let (label, _) = review(&review_body(object.clone()), &PolicySnapshot::default()).unwrap();
        assert_eq!(label, "allow");
        let r = answer(&review_body(object));
        assert_eq!(r["response"]["uid"], "u-1");
        assert_eq!(r["response"]["allowed"], true);
    }

    #[test]
    fn metrics_count_decisions() {
        let metrics = ServerMetrics::default();
        metrics.observe("patch", Instant::now());
        let text = metrics.encode().unwrap();
        assert!(
            text.contains("fledge_admission_reviews_total{decision=\"patch\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fledge_admission_review_duration_seconds_count 1"),
            "{text}"
        );
    }
}
