//! Resident memory of a real `fledge serve` process (webhook + controller) watching 1,000 opted-in
//! Deployments with 100 canaries in flight, against the API server stand-in.
//! `cargo bench --bench controller_memory` (FLEDGE_BENCH_DEPLOYMENTS=1000, FLEDGE_BENCH_CANARIES=100).
//! With FLEDGE_BENCH_CHECKS=2 every canary also runs two background Prometheus checks every 10 s
//! against a real Prometheus, and the CPU fledge uses over FLEDGE_BENCH_WINDOW seconds (default 30)
//! is reported with the measurements it recorded.
#[path = "../tests/support/mod.rs"]
mod support;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::apiserver::{ApiServer, ApiServerConfig, UserInfo, WebhookConfig};

const NS: &str = "bench";
const DEPLOYMENTS: &str = "apps/v1/deployments";
const SERVICES: &str = "v1/services";
const SPLITS: &str = "split.smi-spec.io/v1alpha2/trafficsplits";

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

fn deployment(name: &str, image: &str) -> Value {
    deployment_with_checks(name, image, 0)
}

/// Two kinds of Prometheus check about the canary's Service, `checks` of them, every 10 s.
fn analysis(checks: usize) -> String {
    (0..checks)
        .map(|i| {
            let query = if i % 2 == 0 {
                r#"sum(rate(http_requests_total{service="{{canaryService}}",code=~"5.."}[1m])) or vector(0)"#
            } else {
                r#"sum(rate(http_requests_total{service="{{canaryService}}"}[1m]))"#
            };
            format!(
                "- name: check-{i}\n  interval: 10s\n  successCondition: result >= 0\n  prometheus:\n    query: '{query}'\n"
            )
        })
        .collect()
}

fn deployment_with_checks(name: &str, image: &str, checks: usize) -> Value {
    let mut d = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS,
                     "labels": {"app": name, "fledge.dev/enabled": "true"},
                     "annotations": {"fledge.dev/steps": "- setWeight: 10\n- pause: {}\n"}},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "app", "image": image,
                                        "env": [{"name": "MODE", "value": "production"}]}]}}},
    });
    if checks > 0 {
        d["metadata"]["annotations"]["fledge.dev/analysis"] = json!(analysis(checks));
    }
    d
}

/// The `fledge serve` child, killed however the bench ends: an early error must not leave it
/// running (and using the machine) after the bench.
struct Killed(std::process::Child);

impl Killed {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time (user + system) a process used so far, in seconds.
fn cpu_seconds(pid: u32) -> BenchResult<f64> {
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

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// VmRSS of a process, in MiB.
fn rss_mib(pid: u32) -> BenchResult<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .ok_or("no VmRSS")?
        .parse()?;
    Ok(kib / 1024.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> BenchResult<()> {
    let total = env_or("FLEDGE_BENCH_DEPLOYMENTS", 1000);
    let canaries = env_or("FLEDGE_BENCH_CANARIES", 100).min(total);
    let checks = env_or("FLEDGE_BENCH_CHECKS", 0);
    let window = Duration::from_secs(env_or("FLEDGE_BENCH_WINDOW", 30) as u64);
    let prometheus = if checks > 0 {
        let prom = support::prometheus::Prometheus::start().await;
        for i in 0..canaries {
            prom.exporter()
                .requests(&format!("app-{i}-canary"), "200", 100);
        }
        prom.wait_for_scrape().await;
        Some(prom)
    } else {
        None
    };
    let dir = std::env::temp_dir().join(format!("fledge-memory-bench-{}", std::process::id()));
    let certs = support::webhook::serving_certs(&dir);
    let api = ApiServer::start(ApiServerConfig {
        namespaces: vec![NS.into()],
        record_history: false,
        ..ApiServerConfig::default()
    })
    .await;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig_yaml(NS))?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_fledge"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "-n",
            NS,
            "--identity",
            "bench",
        ])
        .arg("--tls-cert")
        .arg(dir.join(fledge::runtime::certs::CERT_FILE))
        .arg("--tls-key")
        .arg(dir.join(fledge::runtime::certs::KEY_FILE))
        .args(
            prometheus
                .iter()
                .flat_map(|p| ["--prometheus-address".to_owned(), p.url()]),
        )
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "warn,fledge=info")
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let child = Killed(child);
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
        }
    });
    let port = port_rx.recv_timeout(Duration::from_secs(30))?;
    let mut hook = WebhookConfig::fledge(
        format!("https://fledge.fledge.svc:{port}/mutate"),
        certs.ca_cert_pem.clone(),
    );
    hook.connect_to = Some(format!("127.0.0.1:{port}").parse()?);
    api.set_webhooks(vec![hook]);

    for i in 0..total {
        let name = format!("app-{i}");
        api.create(DEPLOYMENTS, NS, deployment(&name, "app:1"))
            .await?;
        api.create(
            SERVICES,
            NS,
            json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80}]}}),
        )
        .await?;
    }
    for i in 0..total {
        api.wait_for(
            DEPLOYMENTS,
            NS,
            &format!("app-{i}"),
            Duration::from_secs(120),
            |d| d.is_some_and(|d| d["status"]["availableReplicas"] == 2),
        )
        .await?;
    }
    let idle = rss_mib(child.id())?;
    let user = UserInfo::user("bench");
    for i in 0..canaries {
        api.apply_as_user(
            &user,
            deployment_with_checks(&format!("app-{i}"), "app:2", checks),
        )
        .await?;
    }
    for i in 0..canaries {
        let name = format!("app-{i}");
        let waited = api
            .wait_for(SPLITS, NS, &name, Duration::from_secs(120), |s| {
                s.is_some_and(|s| s["spec"]["backends"][1]["weight"] == 1000)
            })
            .await;
        if let Err(e) = waited {
            let state = api
                .get(DEPLOYMENTS, NS, &name)
                .map(|d| d["metadata"]["annotations"]["fledge.dev/state"].clone());
            return Err(format!("{name} never reached 10 % (state {state:?}): {e}").into());
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let busy = rss_mib(child.id())?;
    println!(
        "fledge serve (webhook + controller), {total} opted-in Deployments: resident {idle:.1} MiB; \
         with {canaries} canaries in flight at 10 %: {busy:.1} MiB (target < 64 MB: {})",
        if busy * 1.048_576 < 64.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    if checks > 0 {
        let before = cpu_seconds(child.id())?;
        tokio::time::sleep(window).await;
        let used = cpu_seconds(child.id())? - before;
        let rss = rss_mib(child.id())?;
        let mut measured = 0;
        let mut other = 0;
        for d in api.list(DEPLOYMENTS, Some(NS)) {
            let Some(state) = d["metadata"]["annotations"]["fledge.dev/state"].as_str() else {
                continue;
            };
            let state: fledge::core::rollout::RolloutState = serde_json::from_str(state)?;
            for run in state.checks.values() {
                measured += run.taken;
                other += run.taken - run.successful;
            }
        }
        println!(
            "{canaries} canaries with {checks} Prometheus checks every 10 s each: over {}s, {:.1}% of one core \
             ({used:.2} s CPU), resident {rss:.1} MiB; {measured} measurements recorded in all, {other} not successful",
            window.as_secs(),
            used / window.as_secs_f64() * 100.0,
        );
    }
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
