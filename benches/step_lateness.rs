//! Step lateness at scale: a real `fledge serve` process (webhook and controller) against the API
//! server stand-in, 10,000 opted-in Deployments in 100 namespaces, 1,000 canaries in flight at
//! once with timed pauses. Prints:
//! - startup: from spawning fledge to every Deployment listed, watched and reconciled;
//! - the API requests a settled Deployment costs beyond the watches;
//! - the webhook's latency under the burst of template changes that starts the canaries, with the
//!   stand-in's share told apart;
//! - step lateness: from a pause's end (its start in the rollout state plus its duration) to the
//!   TrafficSplit's write of the next weight, as the stand-in commits it;
//! - resident memory and CPU of the fledge process.
//!
//! `cargo bench --bench step_lateness` (FLEDGE_BENCH_DEPLOYMENTS=10000, FLEDGE_BENCH_NAMESPACES=100,
//! FLEDGE_BENCH_CANARIES=1000, FLEDGE_BENCH_PAUSE_SECONDS=30). `FLEDGE_BENCH_TRACE=N` also prints
//! the N-th canary's story: fledge's requests for it and every state stored, in order.
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fledge::core::rollout::RolloutState;
use support::apiserver::{ApiServer, ApiServerConfig, Change};
use support::fleet::{self, BenchResult, Fleet};

/// The weights the canaries go through, in basis points as the TrafficSplit carries them, and
/// the pause step before each of the last two.
const WEIGHTS: [u64; 3] = [1000, 4000, 7000];
const TIMED_PAUSES: [(usize, u64); 2] = [(1, 4000), (3, 7000)];

const FAILED_RECONCILES: &str = "fledge_controller_reconciles_total{result=\"error\"}";

/// When things happened, from the stand-in's change feed.
#[derive(Default)]
struct Timeline {
    /// (namespace, name, pause step) → when the pause ends.
    due: HashMap<(String, String, usize), SystemTime>,
    /// (namespace, name, canary weight) → when the TrafficSplit first carried it.
    written: HashMap<(String, String, u64), SystemTime>,
    lagged: u64,
}

impl Timeline {
    fn note(&mut self, change: &Change, pause: Duration, at: SystemTime) {
        let (resource, ns, name) = &change.key;
        if !ns.starts_with("team-") {
            return;
        }
        let object = &change.object;
        if resource == fleet::DEPLOYMENTS_STORED {
            let Some(state) = object["metadata"]["annotations"]["fledge.dev/state"].as_str() else {
                return;
            };
            let Ok(state) = serde_json::from_str::<RolloutState>(state) else {
                return;
            };
            if let Some(started) = state.step_started
                && TIMED_PAUSES.iter().any(|(step, _)| *step == state.step)
            {
                let ends = SystemTime::UNIX_EPOCH
                    + Duration::from_nanos(started.as_nanosecond().max(0) as u64)
                    + pause;
                self.due
                    .insert((ns.clone(), name.clone(), state.step), ends);
            }
        } else if resource == fleet::SPLITS_STORED {
            let canary = object["spec"]["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|b| {
                    b["service"]
                        .as_str()
                        .is_some_and(|s| s.ends_with("-canary"))
                })
                .and_then(|b| b["weight"].as_u64());
            if let Some(weight) = canary {
                self.written
                    .entry((ns.clone(), name.clone(), weight))
                    .or_insert(at);
            }
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> BenchResult<()> {
    let fleet = Fleet::from_env(10_000);
    let canaries = fleet::env_or("FLEDGE_BENCH_CANARIES", 1000).min(fleet.deployments);
    let pause = Duration::from_secs(fleet::env_or("FLEDGE_BENCH_PAUSE_SECONDS", 30) as u64);
    let steps = format!(
        "- setWeight: 10\n- pause: {{duration: {p}s}}\n- setWeight: 40\n- pause: {{duration: {p}s}}\n- setWeight: 70\n- pause: {{}}\n",
        p = pause.as_secs()
    );
    let trace: Option<usize> = std::env::var("FLEDGE_BENCH_TRACE")
        .ok()
        .map(|n| n.parse())
        .transpose()?;
    let api = ApiServer::start(ApiServerConfig {
        namespaces: fleet.namespace_names(),
        record_history: trace.is_some(),
        ..ApiServerConfig::default()
    })
    .await;
    let created = Instant::now();
    fleet.create(&api, &steps).await?;
    println!(
        "{} Deployments with their Services in {} namespaces created and available in {:.1} s",
        fleet.deployments,
        fleet.namespaces,
        created.elapsed().as_secs_f64()
    );

    let (serve, startup) = fleet::start_on(&api, &fleet, &[]).await?;
    startup.print(&fleet);
    let window = Duration::from_secs(20);
    let settled = fleet::settled_requests(&api, &serve, window).await;
    fleet::print_settled(&fleet, settled, window, serve.rss_mib()?);

    api.set_webhooks(vec![serve.webhook()?]);
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let mut changes = api.changes();
    let feed = {
        let timeline = timeline.clone();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match changes.recv().await {
                    Ok(change) => {
                        let at = SystemTime::now();
                        if let Ok(mut t) = timeline.lock() {
                            t.note(&change, pause, at);
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        if let Ok(mut t) = timeline.lock() {
                            t.lagged += n;
                        }
                    }
                    Err(RecvError::Closed) => break,
                }
            }
        })
    };
    let cpu_before = serve.cpu_seconds()?;
    let bench_cpu_before = fleet::cpu_seconds(std::process::id())?;
    let requests_before = api.requests_by(&serve.user).len();
    let (reconciles_before, reconcile_seconds_before, failed_before) = (
        serve.reconciles().await?,
        serve
            .metric("fledge_controller_reconcile_duration_seconds_sum")
            .await?,
        serve.metric(FAILED_RECONCILES).await?,
    );
    let run = Instant::now();
    let run_started = SystemTime::now();
    let burst = fleet::burst(&api, &serve, &fleet, canaries, |ns, name| {
        fleet::deployment(ns, name, "app:2", &steps)
    })
    .await?;
    burst.print();

    let mut peak = serve.rss_mib()?;
    let last = *WEIGHTS.last().ok_or("no weights")?;
    let deadline = Instant::now() + pause * 2 + Duration::from_secs(300);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak = peak.max(serve.rss_mib()?);
        let done = timeline.lock().map_or(0, |t| {
            t.written.keys().filter(|(_, _, w)| *w == last).count()
        });
        if done >= canaries {
            break;
        }
        if Instant::now() > deadline {
            println!("only {done} of {canaries} canaries reached the last weight in time");
            break;
        }
    }
    let cpu = serve.cpu_seconds()? - cpu_before;
    let bench_cpu = fleet::cpu_seconds(std::process::id())? - bench_cpu_before;
    let took = run.elapsed();
    feed.abort();
    let reconciles = serve.reconciles().await? - reconciles_before;
    // A write that lost to another writer: a 409, or a failed JSON patch `test` (422).
    let failed = serve.metric(FAILED_RECONCILES).await? - failed_before;
    let reconcile_seconds = serve
        .metric("fledge_controller_reconcile_duration_seconds_sum")
        .await?
        - reconcile_seconds_before;
    let mut requests = std::collections::BTreeMap::new();
    // When each TrafficSplit write reached the stand-in's handler, per Deployment.
    let mut split_patches: HashMap<(String, String), Vec<SystemTime>> = HashMap::new();
    for r in &api.requests_by(&serve.user)[requests_before..] {
        if (r.verb, r.resource.as_str()) == ("patch", "trafficsplits")
            && let (Some(ns), Some(name)) = (&r.namespace, &r.name)
        {
            split_patches
                .entry((ns.clone(), name.clone()))
                .or_default()
                .push(r.at);
        }
        if r.verb != "watch" && r.resource != "leases" {
            *requests
                .entry(format!("{} {}", r.verb, r.resource))
                .or_insert(0usize) += 1;
        }
    }

    if let Some(n) = trace {
        let (ns, name) = fleet.at(n);
        let since = |at: SystemTime| at.duration_since(run_started).unwrap_or_default();
        println!("the story of {ns}/{name}, in seconds since the burst began:");
        for r in &api.requests_by(&serve.user)[requests_before..] {
            if r.namespace.as_ref() == Some(&ns)
                && r.name.as_ref().is_some_and(|n| n.starts_with(&name))
            {
                let name = r.name.as_deref().unwrap_or_default();
                let (verb, resource) = (r.verb, &r.resource);
                println!(
                    "  {:7.3} {verb} {resource} {name}",
                    since(r.at).as_secs_f64()
                );
            }
        }
        let mut generation = None;
        for stored in api.history_of(fleet::DEPLOYMENTS_STORED, &ns, &name) {
            let meta = &stored.object["metadata"];
            // Status writes keep the generation: the same state again.
            if generation.replace(meta["generation"].clone()).as_ref() == Some(&meta["generation"])
            {
                continue;
            }
            if let Some(state) = meta["annotations"]["fledge.dev/state"].as_str() {
                println!(
                    "  resourceVersion {} generation {}: {state}",
                    stored.resource_version, meta["generation"]
                );
            }
        }
    }
    let (fledge_p99, fledge_mean) = serve
        .histogram("fledge_pause_end_lateness_seconds", 0.99)
        .await?;
    let timeline = timeline.lock().map_err(|_| "timeline poisoned")?;
    let mut late = Vec::new();
    // The same, per pause: the step after the second pause needs a second canary pod first.
    let mut late_by_weight: std::collections::BTreeMap<u64, Vec<Duration>> = Default::default();
    let (mut sent, mut served) = (Vec::new(), Vec::new());
    let mut missing = 0;
    for i in 0..canaries {
        let (ns, name) = fleet.at(i);
        for (step, weight) in TIMED_PAUSES {
            let due = timeline.due.get(&(ns.clone(), name.clone(), step));
            let written = timeline.written.get(&(ns.clone(), name.clone(), weight));
            match (due, written) {
                (Some(due), Some(written)) => {
                    let lateness = written.duration_since(*due).unwrap_or(Duration::ZERO);
                    late.push(lateness);
                    late_by_weight.entry(weight).or_default().push(lateness);
                    // The last write request that reached the stand-in before the commit.
                    if let Some(arrived) = split_patches
                        .get(&(ns.clone(), name.clone()))
                        .and_then(|at| at.iter().filter(|a| *a <= written).max())
                    {
                        sent.push(arrived.duration_since(*due).unwrap_or(Duration::ZERO));
                        served.push(written.duration_since(*arrived).unwrap_or(Duration::ZERO));
                    }
                }
                _ => missing += 1,
            }
        }
    }
    late.sort_unstable();
    sent.sort_unstable();
    served.sort_unstable();
    println!(
        "step lateness (pause end → TrafficSplit write of the next weight), {canaries} canaries × {} timed pauses of {}s: {} (target p99 < 1 s: {}); {missing} not seen; change feed lagged by {}",
        TIMED_PAUSES.len(),
        pause.as_secs(),
        fleet::spread(&late),
        if fleet::quantile(&late, 0.99).is_some_and(|p| p < Duration::from_secs(1)) {
            "met"
        } else {
            "NOT met"
        },
        timeline.lagged,
    );
    for (weight, late) in &mut late_by_weight {
        late.sort_unstable();
        println!(
            "  the pauses before {} %: {}",
            weight / 100,
            fleet::spread(late)
        );
    }
    println!(
        "  pause end → the write request at the stand-in's handler: {}",
        fleet::spread(&sent)
    );
    println!(
        "  the stand-in's own share (that request's arrival → its commit): {}",
        fleet::spread(&served)
    );
    println!(
        "  of which fledge's own (its fledge_pause_end_lateness_seconds: pause end → the reconcile that ends it): mean {:.1} ms, p99 ≤ {:.0} ms",
        fledge_mean * 1e3,
        fledge_p99 * 1e3
    );
    println!(
        "fledge serve over the {:.0} s of the canaries: {:.1} % of one core ({cpu:.1} s CPU); resident {:.1} MiB at the peak, {:.1} MiB now (target < 256 MB: {}; aim < 128 MB: {})",
        took.as_secs_f64(),
        cpu / took.as_secs_f64() * 100.0,
        peak,
        serve.rss_mib()?,
        if peak * 1.048_576 < 256.0 {
            "met"
        } else {
            "NOT met"
        },
        if peak * 1.048_576 < 128.0 {
            "met"
        } else {
            "NOT met"
        },
    );
    println!(
        "the run's work: {reconciles} reconciles ({:.1} per canary, {:.1} ms each on average; {failed} of them failed, 409s and failed tests included); fledge's requests {:.1} per canary: {requests:?}; \
         the bench process (stand-in and its Deployment controller) used {:.1} % of one core",
        reconciles / canaries.max(1) as f64,
        reconcile_seconds / reconciles.max(1.0) * 1e3,
        requests.values().sum::<usize>() as f64 / canaries.max(1) as f64,
        bench_cpu / took.as_secs_f64() * 100.0,
    );
    Ok(())
}
