//! A fleet for the scale benches (`controller_memory`, `step_lateness`): opted-in Deployments with
//! their Services spread over namespaces in the API server stand-in, and a real `fledge serve`
//! process (webhook and controller, the bench's release build) watching them all as its own user.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::{Value, json};

use super::apiserver::{ApiServer, UserInfo, WebhookConfig};

pub const DEPLOYMENTS: &str = "apps/v1/deployments";
pub const SERVICES: &str = "v1/services";
pub const SPLITS: &str = "split.smi-spec.io/v1alpha2/trafficsplits";
/// The stand-in's storage keys, as a [`super::apiserver::Change`] names its object's resource.
pub const DEPLOYMENTS_STORED: &str = "deployments.apps";
pub const SPLITS_STORED: &str = "trafficsplits.split.smi-spec.io";

pub type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A setting from the environment, or its default.
pub fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How many Deployments, over how many namespaces: Deployment `i` is `app-i` in namespace
/// `team-(i mod namespaces)`.
#[derive(Clone, Copy, Debug)]
pub struct Fleet {
    pub deployments: usize,
    pub namespaces: usize,
}

impl Fleet {
    /// `FLEDGE_BENCH_DEPLOYMENTS` (default `deployments`) over `FLEDGE_BENCH_NAMESPACES` (100).
    pub fn from_env(deployments: usize) -> Fleet {
        let deployments = env_or("FLEDGE_BENCH_DEPLOYMENTS", deployments).max(1);
        Fleet {
            deployments,
            namespaces: env_or("FLEDGE_BENCH_NAMESPACES", 100).clamp(1, deployments),
        }
    }

    pub fn namespace_names(&self) -> Vec<String> {
        (0..self.namespaces)
            .map(|n| format!("team-{n:02}"))
            .collect()
    }

    /// Namespace and name of Deployment `i`.
    pub fn at(&self, i: usize) -> (String, String) {
        (
            format!("team-{:02}", i % self.namespaces),
            format!("app-{i}"),
        )
    }

    /// Creates every Deployment (running `app:1`, with `steps`) and its Service, 32 at a time,
    /// then waits until the stand-in's Deployment controller has made each available.
    pub async fn create(&self, api: &ApiServer, steps: &str) -> BenchResult<()> {
        let creates = futures::stream::iter(0..self.deployments)
            .map(|i| async move {
                let (ns, name) = self.at(i);
                api.create(DEPLOYMENTS, &ns, deployment(&ns, &name, "app:1", steps))
                    .await
                    .map_err(|e| format!("creating {ns}/{name}: {e:?}"))?;
                api.create(SERVICES, &ns, service(&ns, &name))
                    .await
                    .map_err(|e| format!("creating Service {ns}/{name}: {e:?}"))?;
                Ok::<_, String>(())
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        creates.into_iter().collect::<Result<Vec<_>, _>>()?;
        for i in 0..self.deployments {
            let (ns, name) = self.at(i);
            api.wait_for(DEPLOYMENTS, &ns, &name, Duration::from_secs(300), |d| {
                d.is_some_and(|d| d["status"]["availableReplicas"] == 2)
            })
            .await?;
        }
        Ok(())
    }
}

/// Deployment `ns/name`, opted in by its label, with 2 replicas running `image`.
pub fn deployment(ns: &str, name: &str, image: &str, steps: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"app": name, "fledge.dev/enabled": "true"},
                     "annotations": {"fledge.dev/steps": steps}},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "app", "image": image,
                                        "env": [{"name": "MODE", "value": "production"}]}]}}},
    })
}

/// The root Service of Deployment `ns/name`.
pub fn service(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"selector": {"app": name}, "ports": [{"port": 80}]}})
}

/// The value at quantile `q` of sorted samples.
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    sorted
        .get(((sorted.len() as f64 * q) as usize).min(last))
        .copied()
}

/// CPU time (user + system) process `pid` used so far, in seconds (the bench's own process: the
/// stand-in's share).
pub fn cpu_seconds(pid: u32) -> BenchResult<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .ok_or("no command in stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).ok_or("no utime")?.parse::<f64>()?
        + fields.get(12).ok_or("no stime")?.parse::<f64>()?;
    // USER_HZ is 100 on Linux.
    Ok(ticks / 100.0)
}

/// A running `fledge serve` (all namespaces), killed and its files removed however the bench ends:
/// an early error must not leave it using the machine.
pub struct Serve {
    child: Child,
    pub port: u16,
    pub ca_cert_pem: String,
    /// Whom the stand-in sees making fledge's requests.
    pub user: UserInfo,
    /// When the process was spawned.
    pub spawned: Instant,
    dir: PathBuf,
    http: reqwest::Client,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Serve {
    /// Starts `fledge serve` against `api` with `args` added, and waits until it listens.
    pub async fn start(api: &ApiServer, args: &[String]) -> BenchResult<Serve> {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let dir = std::env::temp_dir().join(format!("fledge-fleet-bench-{}", std::process::id()));
        let certs = super::webhook::serving_certs(&dir);
        let user = UserInfo::service_account("fledge", "fledge");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig_yaml_as(user.clone(), "default"))?;
        let spawned = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_fledge"))
            .args(["serve", "--listen", "127.0.0.1:0", "--identity", "bench"])
            .arg("--tls-cert")
            .arg(dir.join(fledge::runtime::certs::CERT_FILE))
            .arg("--tls-key")
            .arg(dir.join(fledge::runtime::certs::KEY_FILE))
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "warn,fledge=info")
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(port) = line
                    .split("webhook listening on 127.0.0.1:")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|p| p.parse::<u16>().ok())
                {
                    let _ = port_tx.send(port);
                }
                // fledge's warnings and errors, for whoever runs the bench.
                if line.contains(" WARN ") || line.contains(" ERROR ") {
                    eprintln!("fledge: {line}");
                }
            }
        });
        // Killed on drop from here on.
        let mut serve = Serve {
            child,
            port: 0,
            ca_cert_pem: certs.ca_cert_pem.clone(),
            user,
            spawned,
            dir,
            http: reqwest::Client::new(),
        };
        serve.port =
            tokio::task::spawn_blocking(move || port_rx.recv_timeout(Duration::from_secs(30)))
                .await??;
        serve.http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(
                certs.ca_cert_pem.as_bytes(),
            )?)
            .resolve("fledge.fledge.svc", ([127, 0, 0, 1], serve.port).into())
            .build()?;
        Ok(serve)
    }

    /// fledge's webhook as the chart registers it for labelled Deployments, at this process.
    pub fn webhook(&self) -> BenchResult<WebhookConfig> {
        let mut hook = WebhookConfig::fledge(
            format!("https://fledge.fledge.svc:{}/mutate", self.port),
            self.ca_cert_pem.clone(),
        );
        hook.connect_to = Some(format!("127.0.0.1:{}", self.port).parse()?);
        Ok(hook)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// VmRSS, in MiB.
    pub fn rss_mib(&self) -> BenchResult<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .ok_or("no VmRSS")?
            .parse()?;
        Ok(kib / 1024.0)
    }

    /// CPU time (user + system) used so far, in seconds.
    pub fn cpu_seconds(&self) -> BenchResult<f64> {
        cpu_seconds(self.pid())
    }

    /// fledge's `/metrics` page.
    async fn metrics_text(&self) -> BenchResult<String> {
        Ok(self
            .http
            .get(format!("https://fledge.fledge.svc:{}/metrics", self.port))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// The sum of the samples at `/metrics` of `series`: a metric's name (every label set), or
    /// one series (`fledge_controller_reconciles_total{result="ok"}`).
    pub async fn metric(&self, series: &str) -> BenchResult<f64> {
        let text = self.metrics_text().await?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                let labelled = !series.contains('{')
                    && name
                        .strip_prefix(series)
                        .is_some_and(|rest| rest.starts_with('{'));
                (name == series || labelled).then(|| value.parse::<f64>().ok())?
            })
            .sum())
    }

    /// The bucket at or below which fraction `q` of histogram `name`'s observations fall (an upper
    /// bound of its quantile), and its mean, in seconds.
    pub async fn histogram(&self, name: &str, q: f64) -> BenchResult<(f64, f64)> {
        let text = self.metrics_text().await?;
        let buckets: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?.strip_prefix("_bucket{le=\"")?;
                let (le, count) = rest.split_once("\"} ")?;
                Some((le.parse().ok()?, count.parse().ok()?))
            })
            .collect();
        let count = self.metric(&format!("{name}_count")).await?;
        let sum = self.metric(&format!("{name}_sum")).await?;
        let at = buckets
            .iter()
            .find(|(_, n)| *n >= count * q)
            .map_or(f64::NAN, |(le, _)| *le);
        Ok((at, sum / count.max(1.0)))
    }

    /// Reconciles done with the caches listed (`ok` and `error`; not the deferred ones).
    pub async fn reconciles(&self) -> BenchResult<f64> {
        Ok(self
            .metric("fledge_controller_reconciles_total{result=\"ok\"}")
            .await?
            + self
                .metric("fledge_controller_reconciles_total{result=\"error\"}")
                .await?)
    }

    /// The webhook's own time per review so far: (reviews, seconds in all), from fledge's
    /// `fledge_admission_review_duration_seconds` (body read to answer written).
    pub async fn review_time(&self) -> BenchResult<(f64, f64)> {
        Ok((
            self.metric("fledge_admission_review_duration_seconds_count")
                .await?,
            self.metric("fledge_admission_review_duration_seconds_sum")
                .await?,
        ))
    }
}

/// How a controller started on a fleet that already exists.
pub struct Startup {
    /// From spawning `fledge serve` until its reconciles stopped: every Deployment listed, watched
    /// and reconciled.
    pub took: Duration,
    pub reconciles: f64,
    /// fledge's requests meanwhile, by verb.
    pub requests: std::collections::BTreeMap<&'static str, usize>,
}

/// Starts `fledge serve` on `fleet`, already created, and waits until its reconciles reach the
/// fleet's size and then stop for 2 s (the Deployments' ReplicaSets trigger reconciles of their
/// Deployments too, so the count alone does not tell when the last one was done).
pub async fn start_on(
    api: &ApiServer,
    fleet: &Fleet,
    args: &[String],
) -> BenchResult<(Serve, Startup)> {
    let serve = Serve::start(api, args).await?;
    let mut last = (0.0, serve.spawned.elapsed());
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = serve.reconciles().await.unwrap_or(0.0);
        if now != last.0 {
            last = (now, serve.spawned.elapsed());
        } else if now >= fleet.deployments as f64
            && serve.spawned.elapsed() > last.1 + Duration::from_secs(2)
        {
            break;
        }
        if Instant::now() > deadline {
            return Err(
                format!("only {now} reconciles of {} after 300 s", fleet.deployments).into(),
            );
        }
    }
    let mut requests = std::collections::BTreeMap::new();
    for r in api.requests_by(&serve.user) {
        *requests.entry(r.verb).or_default() += 1;
    }
    Ok((
        serve,
        Startup {
            took: last.1,
            reconciles: last.0,
            requests,
        },
    ))
}

/// fledge's requests other than watches over `window`, once settled: (about Deployments and
/// what fledge makes for them, the Lease's renewals).
pub async fn settled_requests(api: &ApiServer, serve: &Serve, window: Duration) -> (usize, usize) {
    let before = api.requests_by(&serve.user).len();
    tokio::time::sleep(window).await;
    let requests = api.requests_by(&serve.user);
    let (lease, other): (Vec<_>, Vec<_>) = requests[before..]
        .iter()
        .filter(|r| r.verb != "watch")
        .partition(|r| r.resource == "leases");
    (other.len(), lease.len())
}

/// One line about what settled Deployments cost.
pub fn print_settled(fleet: &Fleet, (requests, lease): (usize, usize), window: Duration, rss: f64) {
    println!(
        "settled: {requests} requests beyond the watches over {}s, {:.4} per settled Deployment \
         (target 0: {}), besides {lease} Lease renewals; resident {rss:.1} MiB",
        window.as_secs(),
        requests as f64 / fleet.deployments as f64,
        if requests == 0 { "met" } else { "NOT met" },
    );
}

/// What a burst of template changes cost at admission.
pub struct Burst {
    /// Each `kubectl apply`, as its client waited for it.
    pub applies: Vec<Duration>,
    /// The webhook calls those applies made (the stand-in's POST, network and TLS included).
    pub webhook: Vec<Duration>,
    /// Each apply without its webhook calls: the stand-in's own share.
    pub stand_in: Vec<Duration>,
    /// Calls that failed or timed out.
    pub failed_calls: usize,
    pub failed_applies: usize,
    /// fledge's own time per review over the burst (its metrics).
    pub review_mean: Duration,
    /// The [`Probe`]'s reviews meanwhile (a scale change, every 20 ms).
    pub probe: Vec<Duration>,
}

/// `kubectl apply` of `manifest(namespace, name)` (a new template) to the first `canaries`
/// Deployments, as user `bench`, 32 at a time.
pub async fn burst(
    api: &ApiServer,
    serve: &Serve,
    fleet: &Fleet,
    canaries: usize,
    manifest: impl Fn(&str, &str) -> Value,
) -> BenchResult<Burst> {
    let user = UserInfo::user("bench");
    let calls_before = api.webhook_calls().len();
    let (reviews_before, seconds_before) = serve.review_time().await?;
    let probe = Probe::start(
        serve,
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/update-scale-only.json"
        ))?,
        Duration::from_millis(20),
    )?;
    let applies = futures::stream::iter(0..canaries)
        .map(|i| {
            let user = user.clone();
            let (ns, name) = fleet.at(i);
            let object = manifest(&ns, &name);
            async move {
                let started = Instant::now();
                let result = api.apply_as_user(&user, object).await;
                (name, started.elapsed(), result.is_ok())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let probe = tokio::task::spawn_blocking(move || probe.stop()).await?;
    let (reviews, seconds) = serve.review_time().await?;
    let calls = api.webhook_calls();
    let calls = calls.get(calls_before..).unwrap_or_default();
    let mut out = Burst {
        applies: Vec::new(),
        webhook: Vec::new(),
        stand_in: Vec::new(),
        failed_calls: calls.iter().filter(|c| c.response.is_err()).count(),
        failed_applies: 0,
        review_mean: Duration::from_secs_f64(
            (seconds - seconds_before) / (reviews - reviews_before).max(1.0),
        ),
        probe,
    };
    for (name, took, ok) in applies {
        if !ok {
            out.failed_applies += 1;
            continue;
        }
        let webhook: Vec<Duration> = calls
            .iter()
            .filter(|c| {
                c.review["request"]["userInfo"]["username"] == "bench"
                    && c.review["request"]["name"] == name.as_str()
            })
            .map(|c| c.took)
            .collect();
        out.applies.push(took);
        out.stand_in
            .push(took.saturating_sub(webhook.iter().sum::<Duration>()));
        out.webhook.extend(webhook);
    }
    for v in [&mut out.applies, &mut out.webhook, &mut out.stand_in] {
        v.sort_unstable();
    }
    Ok(out)
}

/// `p50 …, p99 …, max …` of sorted durations, in ms.
pub fn spread(sorted: &[Duration]) -> String {
    let ms = |q: f64| quantile(sorted, q).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
        ms(0.5),
        ms(0.99),
        ms(1.0),
        sorted.len()
    )
}

impl Startup {
    pub fn print(&self, fleet: &Fleet) {
        println!(
            "startup: {} Deployments in {} namespaces listed, watched and reconciled in {:.2} s \
             (target < 10 s: {}); {} reconciles; fledge's requests meanwhile: {:?}",
            fleet.deployments,
            fleet.namespaces,
            self.took.as_secs_f64(),
            if self.took < Duration::from_secs(10) {
                "met"
            } else {
                "NOT met"
            },
            self.reconciles,
            self.requests,
        );
    }
}

impl Burst {
    pub fn print(&self) {
        println!(
            "burst of {} template changes (kubectl apply, 32 at a time): {} failed",
            self.applies.len() + self.failed_applies,
            self.failed_applies
        );
        println!(
            "  apply, as the client waits:        {}",
            spread(&self.applies)
        );
        println!(
            "  its webhook calls (stand-in's POST): {} (target p99 < 100 ms: {}); {} calls failed or timed out",
            spread(&self.webhook),
            if quantile(&self.webhook, 0.99).is_some_and(|p| p < Duration::from_millis(100)) {
                "met"
            } else {
                "NOT met"
            },
            self.failed_calls
        );
        println!(
            "  the stand-in's own share:          {}",
            spread(&self.stand_in)
        );
        println!(
            "  a probe's reviews meanwhile (own thread and connection, not queued behind the stand-in): {}",
            spread(&self.probe)
        );
        println!(
            "  fledge's own time per review (its metrics, read to answer): {:.2} ms mean",
            self.review_mean.as_secs_f64() * 1e3
        );
    }
}

/// Reviews sent straight to fledge's webhook from a thread and runtime of their own, one at a
/// time over one kept-alive connection: the webhook's latency as a client that is not queued
/// behind the stand-in's own work sees it.
pub struct Probe {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Duration>>,
}

impl Probe {
    /// Sends `body` (an AdmissionReview) every `every` until [`Probe::stop`].
    pub fn start(serve: &Serve, body: Vec<u8>, every: Duration) -> BenchResult<Probe> {
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(
                serve.ca_cert_pem.as_bytes(),
            )?)
            .resolve("fledge.fledge.svc", ([127, 0, 0, 1], serve.port).into())
            .build()?;
        let url = format!("https://fledge.fledge.svc:{}/mutate", serve.port);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut took = Vec::new();
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return took;
            };
            runtime.block_on(async {
                while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    let started = Instant::now();
                    let answered = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .and_then(reqwest::Response::error_for_status);
                    if let Ok(response) = answered
                        && response.bytes().await.is_ok()
                    {
                        took.push(started.elapsed());
                    }
                    tokio::time::sleep(every.saturating_sub(started.elapsed())).await;
                }
            });
            took
        });
        Ok(Probe { stop, thread })
    }

    /// Stops sending; the latencies, sorted.
    pub fn stop(self) -> Vec<Duration> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut took = self.thread.join().unwrap_or_default();
        took.sort_unstable();
        took
    }
}
