//! The real Prometheus server (`/usr/bin/prometheus`, Debian package `prometheus`), scraping an
//! exporter that the test drives.
//!
//! ```ignore
//! let prom = Prometheus::start().await;            // ready, and has scraped the exporter once
//! prom.exporter().requests("web-canary", "500", 3); // http_requests_total{service,code} += 3
//! prom.wait_for_scrape().await;                    // the change is in Prometheus now
//! let url = prom.url();                            // http://127.0.0.1:PORT for the check
//! prom.stop().await;                               // "Prometheus is down" (restart() brings it back)
//! ```
//!
//! Each [`Prometheus`] has its own port, temporary TSDB and config (`scrape_interval: 1s`, job
//! `exporter`); dropping it kills the process. The binary is `$FLEDGE_TEST_PROMETHEUS`, else
//! `/usr/bin/prometheus`, else `prometheus` on the PATH; without one the test panics saying how to
//! install it (nothing is skipped).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// An HTTP exporter on 127.0.0.1 serving `/metrics` in Prometheus' text format: the counter
/// `http_requests_total{service, code}` and any gauges the test sets.
pub struct Exporter {
    addr: SocketAddr,
    state: Arc<Mutex<ExporterState>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ExporterState {
    requests: BTreeMap<(String, String), u64>,
    /// Series (`name{labels}`) → value.
    gauges: BTreeMap<String, f64>,
    scrapes: u64,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(state: &Mutex<ExporterState>) -> std::sync::MutexGuard<'_, ExporterState> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Exporter {
    pub async fn start() -> Exporter {
        let state = Arc::new(Mutex::new(ExporterState::default()));
        let shared = state.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let state = shared.clone();
                async move {
                    let mut s = lock(&state);
                    s.scrapes += 1;
                    ([("content-type", "text/plain; version=0.0.4")], render(&s))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the exporter");
        let addr = listener.local_addr().expect("the exporter's address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Exporter { addr, state, task }
    }

    /// `host:port`, as a scrape target.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    /// Counts `n` more requests answered with `code` by `service`
    /// (`http_requests_total{service="…",code="…"}`).
    pub fn requests(&self, service: &str, code: &str, n: u64) {
        self.counter()(service, code, n);
    }

    /// [`Exporter::requests`] as a function a task can own, to drive traffic in the background.
    pub fn counter(&self) -> impl Fn(&str, &str, u64) + Send + Sync + 'static {
        let state = self.state.clone();
        move |service, code, n| {
            *lock(&state)
                .requests
                .entry((service.to_string(), code.to_string()))
                .or_default() += n;
        }
    }

    /// Sets gauge `name{labels}` to `value` (NaN and ±Inf allowed).
    pub fn gauge(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        lock(&self.state).gauges.insert(series(name, labels), value);
    }

    /// Removes gauge `name{labels}` (its series goes stale in Prometheus).
    pub fn remove_gauge(&self, name: &str, labels: &[(&str, &str)]) {
        lock(&self.state).gauges.remove(&series(name, labels));
    }

    /// How many times `/metrics` was scraped.
    pub fn scrapes(&self) -> u64 {
        lock(&self.state).scrapes
    }
}

fn series(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let labels: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{name}{{{}}}", labels.join(","))
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

fn render(s: &ExporterState) -> String {
    let mut out = String::from(
        "# HELP http_requests_total Requests served, by service and status code.\n\
         # TYPE http_requests_total counter\n",
    );
    for ((service, code), n) in &s.requests {
        let name = series(
            "http_requests_total",
            &[("service", service), ("code", code)],
        );
        out.push_str(&format!("{name} {n}\n"));
    }
    let mut typed = std::collections::BTreeSet::new();
    for (name, v) in &s.gauges {
        let metric = name.split('{').next().unwrap_or(name);
        if typed.insert(metric.to_string()) {
            out.push_str(&format!("# TYPE {metric} gauge\n"));
        }
        out.push_str(&format!("{name} {}\n", number(*v)));
    }
    out
}

/// A running Prometheus and the exporter it scrapes.
pub struct Prometheus {
    exporter: Exporter,
    port: u16,
    dir: tempfile::TempDir,
    binary: PathBuf,
    child: Option<tokio::process::Child>,
    http: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
    }
}

fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FLEDGE_TEST_PROMETHEUS") {
        return path.into();
    }
    let default = PathBuf::from("/usr/bin/prometheus");
    if default.exists() {
        return default;
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("prometheus"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "the Prometheus server is needed by this test and was not found (/usr/bin/prometheus, \
                 $FLEDGE_TEST_PROMETHEUS or PATH): install it with \
                 `apt-get update && apt-get install -y prometheus` (.ci/run does)"
            )
        })
}

/// A free port on 127.0.0.1 (free when asked; Prometheus binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Prometheus {
    /// Starts the exporter and Prometheus; returns once Prometheus is ready and has scraped the
    /// exporter at least once.
    pub async fn start() -> Prometheus {
        let binary = binary();
        let exporter = Exporter::start().await;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: exporter\n    static_configs:\n      - targets: ['{}']\n",
            exporter.target()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("write the config");
        let http = fledge::runtime::analysis::http_client().expect("an HTTP client");
        let mut prom = Prometheus {
            exporter,
            port: free_port(),
            dir,
            binary,
            child: None,
            http,
        };
        prom.launch().await;
        prom
    }

    async fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("prometheus.log")).expect("a log");
        let child = tokio::process::Command::new(&self.binary)
            .arg(format!(
                "--config.file={}",
                self.dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.binary.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = self
                .http
                .get(format!("{}/-/ready", self.url()))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready
                && self
                    .query("up{job=\"exporter\"} == 1")
                    .await
                    .is_some_and(|r| r.as_array().is_some_and(|a| !a.is_empty()))
            {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("Prometheus exited ({status}): {}", self.log());
            }
            if Instant::now() > deadline {
                panic!(
                    "Prometheus on port {} not ready with a scrape after 60 s: {}",
                    self.port,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Prometheus' log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `http://127.0.0.1:PORT` (the same across [`Prometheus::restart`]).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn exporter(&self) -> &Exporter {
        &self.exporter
    }

    /// Waits until Prometheus holds what the exporter serves now: two more scrapes (the first
    /// may have been under way; once the second starts, the first is stored).
    pub async fn wait_for_scrape(&self) {
        let target = self.exporter.scrapes() + 2;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.exporter.scrapes() < target {
            assert!(
                Instant::now() < deadline,
                "no scrape for 30 s: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The `data.result` of an instant query, or `None` when Prometheus does not answer one.
    pub async fn query(&self, query: &str) -> Option<Value> {
        let answer: Value = self
            .http
            .get(format!("{}/api/v1/query", self.url()))
            .query(&[("query", query)])
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?
            .bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())?;
        (answer["status"] == "success").then(|| answer["data"]["result"].clone())
    }

    /// Kills Prometheus (its port refuses connections until [`Prometheus::restart`]).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts Prometheus again on the same port with the same TSDB (what it stored survives);
    /// returns once it is ready and has scraped again.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.launch().await;
    }
}
