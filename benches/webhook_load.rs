//! Load on the real webhook over TLS keep-alive, against a ceiling measured in the same run: a bare
//! axum + rustls server with the same TLS setup that reads the body and returns a canned
//! AdmissionReview without parsing anything. A third server answers with `server::review` alone
//! (no layers, no metrics), which tells the review's cost from the router's.
//!
//! `cargo bench --bench webhook_load` (needs `wrk` on PATH: `apt-get update && apt-get install -y wrk`). Settings by
//! environment: FLEDGE_BENCH_SECONDS (default 10), FLEDGE_BENCH_CONNECTIONS (default 64),
//! FLEDGE_BENCH_ROUNDS (default 5; servers alternate, best round of each is kept: rounds of one server
//! differ by up to 25 % on a shared machine),
//! FLEDGE_BENCH_WORKERS (server threads; default one per core, as `fledge serve`),
//! FLEDGE_BENCH_BODIES (comma-separated fixtures; default tests/data/update-new-template.json, the
//! patch path, and tests/data/update-scale-only.json, the common path). Bodies are compacted first,
//! as the API server sends JSON. The end prints the fledge / ceiling ratio of every body together:
//! targets >= 50 % for a template change (a patch), >= 70 % for the common path.
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use fledge::runtime::server::{self, AppState, tls};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

struct Load {
    requests_per_sec: f64,
    /// Server CPU time (user + system) per request: robust to what else the machine does.
    cpu_us_per_request: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: String,
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> BenchResult<()> {
    let seconds: u64 = env_or("FLEDGE_BENCH_SECONDS", 10);
    let connections: u64 = env_or("FLEDGE_BENCH_CONNECTIONS", 64);
    let rounds: usize = env_or("FLEDGE_BENCH_ROUNDS", 5);
    let bodies: String = env_or(
        "FLEDGE_BENCH_BODIES",
        "tests/data/update-new-template.json,tests/data/update-scale-only.json".to_owned(),
    );

    let dir = std::env::temp_dir().join(format!("fledge-bench-{}", std::process::id()));
    let certs = fledge::runtime::certs::generate(&fledge::runtime::certs::CertRequest {
        service: "fledge".into(),
        namespace: "fledge".into(),
        dns: vec![],
        ips: vec!["127.0.0.1".parse()?],
        validity_days: 1,
    })?;
    fledge::runtime::certs::write_to_dir(&certs, &dir)?;
    let cert = tls::ReloadingCert::load(tls::CertFiles {
        cert: dir.join(fledge::runtime::certs::CERT_FILE),
        key: dir.join(fledge::runtime::certs::KEY_FILE),
    })?;
    println!(
        "wrk 1 thread, {connections} keep-alive connections, {seconds}s per run, {rounds} rounds alternating ceiling and fledge; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut ratios = Vec::new();
    for fixture in bodies.split(',') {
        let body = serde_json::to_vec(&serde_json::from_slice::<serde_json::Value>(
            &std::fs::read(fixture)?,
        )?)?;
        let (label, canned) = server::review(&body, &Default::default()).map_err(|e| e.0)?;
        let body_path = dir.join("body.json");
        std::fs::write(&body_path, &body)?;
        let script = dir.join("post.lua");
        std::fs::write(
            &script,
            format!(
                "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nlocal f = io.open(\"{}\", \"rb\")\nwrk.body = f:read(\"*a\")\nf:close()\n",
                body_path.display()
            ),
        )?;
        println!(
            "\n{fixture}: {} bytes, decision {label}, answer {} bytes",
            body.len(),
            canned.len()
        );
        let mut best_ceiling: Option<Load> = None;
        let mut best_review: Option<Load> = None;
        let mut best_fledge: Option<Load> = None;
        for round in 1..=rounds {
            let canned = Bytes::from(canned.clone());
            let bare =
                Router::new().route("/mutate", post(move |_body: Bytes| async move { canned }));
            let ceiling = run(bare, &cert, &script, seconds, connections)?;
            report(&format!("  round {round} ceiling"), &ceiling);
            // The review alone, without the router's layers and metrics: splits fledge's cost.
            let review_only = Router::new().route(
                "/mutate",
                post(|body: Bytes| async move {
                    server::review(&body, &Default::default())
                        .map_or_else(|e| e.0.into_bytes(), |(_, json)| json)
                }),
            );
            let review_only = run(review_only, &cert, &script, seconds, connections)?;
            report(&format!("  round {round} review "), &review_only);
            let fledge = run(
                server::router(AppState::default()),
                &cert,
                &script,
                seconds,
                connections,
            )?;
            report(&format!("  round {round} fledge "), &fledge);
            keep_best(&mut best_ceiling, ceiling);
            keep_best(&mut best_review, review_only);
            keep_best(&mut best_fledge, fledge);
        }
        if let (Some(ceiling), Some(review_only), Some(fledge)) =
            (best_ceiling, best_review, best_fledge)
        {
            println!("  best of {rounds} rounds:");
            report("    ceiling (canned reply)", &ceiling);
            report("    review only, no layers", &review_only);
            report("    fledge webhook        ", &fledge);
            let ratio = fledge.requests_per_sec / ceiling.requests_per_sec;
            // A template change is answered with a patch; everything else is the common path.
            let target = if label == "patch" { 0.5 } else { 0.7 };
            println!(
                "    fledge / ceiling throughput: {:.1} % (target >= {:.0} %: {})",
                ratio * 100.0,
                target * 100.0,
                if ratio >= target { "met" } else { "NOT met" }
            );
            ratios.push((fixture.to_owned(), label, ratio, target));
        }
    }
    println!("\nfledge / ceiling throughput, this run:");
    for (fixture, label, ratio, target) in &ratios {
        println!(
            "  {fixture} ({label}): {:.1} % (target >= {:.0} %: {})",
            ratio * 100.0,
            target * 100.0,
            if ratio >= target { "met" } else { "NOT met" }
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn keep_best(best: &mut Option<Load>, load: Load) {
    if best
        .as_ref()
        .is_none_or(|b| load.requests_per_sec > b.requests_per_sec)
    {
        *best = Some(load);
    }
}

fn report(name: &str, load: &Load) {
    println!(
        "{name}: {:>9.0} reviews/s   server CPU {:>5.1} µs/review   p50 {:>6.2} ms   p99 {:>6.2} ms{}",
        load.requests_per_sec,
        load.cpu_us_per_request,
        load.p50_ms,
        load.p99_ms,
        if load.errors.is_empty() {
            String::new()
        } else {
            format!("   ({})", load.errors)
        }
    );
}

/// Serves `app` with fledge's TLS setup on its own runtime while wrk loads it.
fn run(
    app: Router,
    cert: &Arc<tls::ReloadingCert>,
    script: &Path,
    seconds: u64,
    connections: u64,
) -> BenchResult<Load> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("https://{}/mutate", listener.local_addr()?);
    let config = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls::server_config(
        cert.clone(),
    )?));
    // As `fledge serve` runs: one worker per core (FLEDGE_BENCH_WORKERS overrides, e.g. 1 to leave
    // wrk a core of its own).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(env_or("FLEDGE_BENCH_WORKERS", cores))
        .enable_all()
        .build()?;
    let _entered = runtime.enter();
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(listener, config)?.handle(handle.clone());
    runtime.spawn(server.serve(app.into_make_service()));
    let cpu_before = process_cpu_seconds()?;
    let output = Command::new("wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s")])
        .args(["--latency", "--timeout", "5s", "-s"])
        .arg(script)
        .arg(&url)
        .output()
        .map_err(|e| format!("running wrk (apt-get update && apt-get install -y wrk): {e}"))?;
    let cpu = process_cpu_seconds()? - cpu_before;
    handle.graceful_shutdown(Some(Duration::from_secs(1)));
    runtime.shutdown_timeout(Duration::from_secs(2));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut load = parse_wrk(&text).ok_or_else(|| format!("unexpected wrk output:\n{text}"))?;
    let requests = load.requests_per_sec * seconds as f64;
    load.cpu_us_per_request = cpu * 1e6 / requests.max(1.0);
    Ok(load)
}

/// User + system CPU seconds of this process so far (`/proc/self/stat`, in clock ticks of 1/100 s).
fn process_cpu_seconds() -> BenchResult<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th of them.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| -> BenchResult<f64> {
        Ok(fields
            .get(i)
            .ok_or("short /proc/self/stat")?
            .parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

fn parse_wrk(text: &str) -> Option<Load> {
    let millis = |value: &str| -> Option<f64> {
        let (number, unit) = value.split_at(value.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = number.parse().ok()?;
        Some(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => return None,
        })
    };
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    };
    let errors = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Socket errors") || l.starts_with("Non-2xx"))
        .collect::<Vec<_>>()
        .join("; ");
    Some(Load {
        requests_per_sec: field("Requests/sec:")?.parse().ok()?,
        cpu_us_per_request: 0.0,
        p50_ms: millis(field("50%")?)?,
        p99_ms: millis(field("99%")?)?,
        errors,
    })
}
