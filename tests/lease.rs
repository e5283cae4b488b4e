//! Leader election against the API-server stand-in: replicas of `run_while_leader` with real
//! clocks and short durations.

mod support;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use support::apiserver::{ApiServer, ApiServerConfig};

use fledge::runtime::lease::{self, LeaseConfig};

const LEASES: &str = "coordination.k8s.io/v1/leases";
const NS: &str = "default";
const WAIT: Duration = Duration::from_secs(20);

async fn stand_in() -> ApiServer {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("fledge=debug"))
        .with_test_writer()
        .try_init();
    ApiServer::start(ApiServerConfig::default()).await
}

/// One replica's leader-election half; dropping it shuts it down (as SIGTERM would).
struct Replica {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Replica {
    /// Resolves `shutdown` and waits until `run_while_leader` returned.
    async fn shut_down(mut self) {
        self.stop.take();
        let task = &mut self.task;
        tokio::time::timeout(WAIT, task)
            .await
            .expect("run_while_leader returns after shutdown")
            .expect("run_while_leader does not panic");
    }
}

fn replica<F, Fut>(
    api: &ApiServer,
    lease: &str,
    identity: &str,
    duration: Duration,
    lead: F,
) -> Replica
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = LeaseConfig {
        name: lease.into(),
        namespace: NS.into(),
        identity: identity.into(),
        duration,
        renew_every: Duration::from_millis(100),
    };
    let task = tokio::spawn(lease::run_while_leader(api.client(), config, lead, async {
        let _ = stopped.await;
    }));
    Replica {
        stop: Some(stop),
        task,
    }
}

/// Counts a controller's starts and how many run at once (across replicas sharing it).
#[derive(Clone, Default)]
struct Controllers {
    running: Arc<AtomicUsize>,
    most_at_once: Arc<AtomicUsize>,
}

/// A controller of one replica: `starts` counts its starts; it runs until aborted.
#[derive(Clone, Default)]
struct Controller {
    starts: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
}

/// Decrements on drop: when an aborted task is gone.
struct Running(Vec<Arc<AtomicUsize>>);

impl Drop for Running {
    fn drop(&mut self) {
        for counter in &self.0 {
            counter.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Controller {
    fn lead(
        &self,
        all: &Controllers,
    ) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + 'static {
        let (me, all) = (self.clone(), all.clone());
        move || {
            me.starts.fetch_add(1, Ordering::SeqCst);
            me.running.fetch_add(1, Ordering::SeqCst);
            let now = all.running.fetch_add(1, Ordering::SeqCst) + 1;
            all.most_at_once.fetch_max(now, Ordering::SeqCst);
            let guard = Running(vec![me.running.clone(), all.running.clone()]);
            Box::pin(async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            })
        }
    }

    fn starts(&self) -> usize {
        self.starts.load(Ordering::SeqCst)
    }

    fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }
}

async fn wait_holder(api: &ApiServer, lease: &str, holder: &str) -> Value {
    api.wait_for(LEASES, NS, lease, WAIT, |l| {
        l.is_some_and(|l| l["spec"]["holderIdentity"] == holder)
    })
    .await
    .unwrap()
    .unwrap()
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_shutdown_the_holder_releases_the_lease_and_another_replica_takes_over_at_once() {
    let api = stand_in().await;
    let all = Controllers::default();
    let (a, b) = (Controller::default(), Controller::default());
    let duration = Duration::from_secs(10);
    let ra = replica(&api, "fledge", "a", duration, a.lead(&all));
    wait_holder(&api, "fledge", "a").await;
    let rb = replica(&api, "fledge", "b", duration, b.lead(&all));
    // b has seen a's renewals for a while.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!((a.running(), b.starts()), (1, 0));

    let shutdown = Instant::now();
    ra.shut_down().await;
    assert_eq!(a.running(), 0, "a's controller stopped before it returned");
    let taken = wait_holder(&api, "fledge", "b").await;
    eventually("b's controller runs", || b.running() == 1).await;
    let took = shutdown.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "b took over {took:?} after a's shutdown, lease duration {duration:?}"
    );
    assert_eq!(taken["spec"]["leaseTransitions"], 1);
    assert_eq!(all.most_at_once.load(Ordering::SeqCst), 1);
    assert_eq!(a.starts(), 1);
    rb.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_lease_has_no_holder_and_a_one_second_duration() {
    let api = stand_in().await;
    let a = Controller::default();
    let ra = replica(
        &api,
        "fledge",
        "a",
        Duration::from_secs(10),
        a.lead(&Controllers::default()),
    );
    let held = wait_holder(&api, "fledge", "a").await;
    ra.shut_down().await;
    let lease = api.get(LEASES, NS, "fledge").unwrap();
    let spec = &lease["spec"];
    assert!(spec.get("holderIdentity").is_none(), "{lease}");
    assert_eq!(spec["leaseDurationSeconds"], 1);
    assert_eq!(spec["leaseTransitions"], held["spec"]["leaseTransitions"]);
    assert!(spec["renewTime"].is_string() && spec["acquireTime"].is_string());
    assert_eq!(a.running(), 0);

    // A replica that shuts down without holding the Lease does not write it.
    let version = lease["metadata"]["resourceVersion"].clone();
    let leases: Api<Lease> = Api::namespaced(api.client(), NS);
    let mut theirs: Lease = serde_json::from_value(lease).unwrap();
    let spec = theirs.spec.get_or_insert_default();
    spec.holder_identity = Some("c".into());
    spec.lease_duration_seconds = Some(30);
    let theirs = leases
        .replace("fledge", &PostParams::default(), &theirs)
        .await
        .unwrap();
    assert_ne!(
        theirs.metadata.resource_version,
        version.as_str().map(String::from)
    );
    let rb = replica(
        &api,
        "fledge",
        "b",
        Duration::from_secs(10),
        Controller::default().lead(&Controllers::default()),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    rb.shut_down().await;
    let after = api.get(LEASES, NS, "fledge").unwrap();
    assert_eq!(after["spec"]["holderIdentity"], "c");
    assert_eq!(
        after["metadata"]["resourceVersion"].as_str(),
        theirs.metadata.resource_version.as_deref()
    );
}

/// Clock skew: another node's renewTime far ahead of or behind this node's clock. The Lease is
/// taken over when it has stayed unchanged for its duration as this replica counts, not when
/// its renewTime plus duration passes by this replica's wall clock (never, or at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_lease_is_taken_after_its_duration_by_the_local_clock_whatever_its_renew_time() {
    let api = stand_in().await;
    let leases: Api<Lease> = Api::namespaced(api.client(), NS);
    let cases = [
        ("ahead", "2126-01-01T00:00:00.000000Z"),
        ("behind", "1990-01-01T00:00:00.000000Z"),
    ];
    for (name, renewed) in cases {
        let ghost: Lease = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "holderIdentity": "ghost",
                "leaseDurationSeconds": 2,
                "acquireTime": renewed,
                "renewTime": renewed,
                "leaseTransitions": 4
            }
        }))
        .unwrap();
        leases.create(&PostParams::default(), &ghost).await.unwrap();
    }
    let started = Instant::now();
    let b = Controller::default();
    let all = Controllers::default();
    let replicas = [
        replica(&api, "ahead", "b", Duration::from_secs(10), b.lead(&all)),
        replica(&api, "behind", "b", Duration::from_secs(10), b.lead(&all)),
    ];
    for (name, _) in cases {
        let taken = wait_holder(&api, name, "b").await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(5),
            "{name}: taken after {took:?}"
        );
        assert_eq!(taken["spec"]["leaseTransitions"], 5);
        assert_eq!(taken["spec"]["leaseDurationSeconds"], 10);
    }
    for r in replicas {
        r.shut_down().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_that_returns_or_panics_is_started_again_while_leading() {
    let api = stand_in().await;
    let starts = Arc::new(AtomicUsize::new(0));
    let counted = starts.clone();
    let lead = move || {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            match n {
                0 => {}
                1 => panic!("the controller fails"),
                _ => std::future::pending().await,
            }
        }
    };
    let ra = replica(&api, "fledge", "a", Duration::from_secs(2), lead);
    wait_holder(&api, "fledge", "a").await;
    eventually("a third start", || starts.load(Ordering::SeqCst) == 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        starts.load(Ordering::SeqCst),
        3,
        "a running controller is left alone"
    );
    let lease = wait_holder(&api, "fledge", "a").await;
    assert_eq!(lease["spec"]["leaseTransitions"], 0, "it kept the Lease");
    ra.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_lease_is_taken_stops_its_controller_at_once() {
    let api = stand_in().await;
    let a = Controller::default();
    let ra = replica(
        &api,
        "fledge",
        "a",
        Duration::from_secs(10),
        a.lead(&Controllers::default()),
    );
    wait_holder(&api, "fledge", "a").await;
    eventually("a's controller runs", || a.running() == 1).await;
    // Another writer takes it (with the resourceVersion it read, as any elector would).
    let leases: Api<Lease> = Api::namespaced(api.client(), NS);
    let mut taken = leases.get("fledge").await.unwrap();
    let spec = taken.spec.get_or_insert_default();
    spec.holder_identity = Some("thief".into());
    spec.lease_duration_seconds = Some(60);
    leases
        .replace("fledge", &PostParams::default(), &taken)
        .await
        .unwrap();
    let stolen = Instant::now();
    eventually("a's controller stops", || a.running() == 0).await;
    assert!(
        stolen.elapsed() < Duration::from_secs(1),
        "{:?}",
        stolen.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!((a.starts(), a.running()), (1, 0));
    ra.shut_down().await;
    let after = wait_holder(&api, "fledge", "thief").await;
    assert_eq!(
        after["spec"]["leaseDurationSeconds"], 60,
        "not released by a"
    );
}

/// Three replicas shut down one after another: each time one other takes over, at once, and
/// never do two controllers run together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_three_replicas_one_leads_at_a_time_and_the_next_follows_at_once() {
    let api = stand_in().await;
    let all = Controllers::default();
    let duration = Duration::from_secs(10);
    let mut replicas: Vec<(String, Controller, Replica)> = ["a", "b", "c"]
        .into_iter()
        .map(|id| {
            let c = Controller::default();
            let r = replica(&api, "fledge", id, duration, c.lead(&all));
            (id.to_owned(), c, r)
        })
        .collect();
    let mut transitions = 0;
    while !replicas.is_empty() {
        let lease = api
            .wait_for(LEASES, NS, "fledge", WAIT, |l| {
                l.is_some_and(|l| l["spec"]["holderIdentity"].is_string())
            })
            .await
            .unwrap()
            .unwrap();
        let holder = lease["spec"]["holderIdentity"].as_str().unwrap().to_owned();
        assert_eq!(lease["spec"]["leaseTransitions"], transitions);
        let at = replicas.iter().position(|(id, ..)| *id == holder).unwrap();
        let (_, controller, leader) = replicas.remove(at);
        eventually("the holder's controller runs", || controller.running() == 1).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(all.running.load(Ordering::SeqCst), 1);
        let shutdown = Instant::now();
        leader.shut_down().await;
        assert_eq!(controller.running(), 0);
        if !replicas.is_empty() {
            eventually("another replica leads", || {
                all.running.load(Ordering::SeqCst) == 1
            })
            .await;
            assert!(shutdown.elapsed() < Duration::from_secs(3));
            transitions += 1;
        }
    }
    assert_eq!(all.most_at_once.load(Ordering::SeqCst), 1);
}
