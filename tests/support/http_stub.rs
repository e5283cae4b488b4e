//! A tiny HTTP server for checks to call: answers every request with what the test set, and
//! records each request (method, path and query, headers, body).
//!
//! ```ignore
//! let stub = HttpStub::start().await;
//! stub.answer(200, r#"{"ok": true}"#);
//! // ... point a web or Prometheus check at stub.url() ...
//! assert_eq!(stub.requests()[0].header("authorization"), Some("Bearer t0ken"));
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};

/// One request received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    /// Path and query, as sent.
    pub uri: String,
    /// Names lower-case, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Received {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct State {
    status: u16,
    body: String,
    content_type: String,
    delay: Duration,
    received: Vec<Received>,
}

/// A running stub; dropping it stops it.
pub struct HttpStub {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl HttpStub {
    /// Starts on 127.0.0.1 answering `200 {}` (JSON) until told otherwise.
    pub async fn start() -> HttpStub {
        let state = Arc::new(Mutex::new(State {
            status: 200,
            body: "{}".into(),
            content_type: "application/json".into(),
            delay: Duration::ZERO,
            received: Vec::new(),
        }));
        let shared = state.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = shared.clone();
                async move {
                    let (status, body, content_type, delay) = {
                        let mut s = lock(&state);
                        s.received.push(Received {
                            method: method.to_string(),
                            uri: uri.to_string(),
                            headers: headers
                                .iter()
                                .map(|(k, v)| {
                                    (k.as_str().to_string(), v.to_str().unwrap_or("").to_string())
                                })
                                .collect(),
                            body: String::from_utf8_lossy(&body).into_owned(),
                        });
                        (s.status, s.body.clone(), s.content_type.clone(), s.delay)
                    };
                    tokio::time::sleep(delay).await;
                    (
                        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                        [("content-type", content_type)],
                        body,
                    )
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the stub");
        let addr = listener.local_addr().expect("the stub's address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        HttpStub { addr, state, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers `status` with `body` from now on (`content-type: application/json` unless
    /// [`HttpStub::content_type`] says otherwise).
    pub fn answer(&self, status: u16, body: &str) {
        let mut s = lock(&self.state);
        s.status = status;
        s.body = body.to_string();
    }

    pub fn content_type(&self, content_type: &str) {
        lock(&self.state).content_type = content_type.to_string();
    }

    /// Waits this long before answering.
    pub fn delay(&self, delay: Duration) {
        lock(&self.state).delay = delay;
    }

    /// The requests so far, oldest first.
    pub fn requests(&self) -> Vec<Received> {
        lock(&self.state).received.clone()
    }
}
