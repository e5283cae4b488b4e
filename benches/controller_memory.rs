//! Resident memory of a real `fledge serve` process (webhook + controller) watching 1,000 opted-in
//! Deployments with 100 canaries in flight, against the API server stand-in.
//! `cargo bench --bench controller_memory` (FLEDGE_BENCH_DEPLOYMENTS=1000, FLEDGE_BENCH_CANARIES=100).
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
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS,
                     "labels": {"app": name, "fledge.dev/enabled": "true"},
                     "annotations": {"fledge.dev/steps": "- setWeight: 10\n- pause: {}\n"}},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "app", "image": image,
                                        "env": [{"name": "MODE", "value": "production"}]}]}}},
    })
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
        api.apply_as_user(&user, deployment(&format!("app-{i}"), "app:2"))
            .await?;
    }
    for i in 0..canaries {
        api.wait_for(
            SPLITS,
            NS,
            &format!("app-{i}"),
            Duration::from_secs(120),
            |s| s.is_some_and(|s| s["spec"]["backends"][1]["weight"] == 1000),
        )
        .await?;
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
    child.kill()?;
    child.wait()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
