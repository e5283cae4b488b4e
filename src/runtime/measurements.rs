//! Measurements in flight, for the controller.
//!
//! A reconcile never waits for a provider: it starts the measurements that are due as tasks and
//! returns. Each task measures (with the check's timeout), judges the reading, keeps the result
//! here and asks for a reconcile of its Deployment; that reconcile folds the result into the
//! rollout state (and so acts on it: a failure turns traffic back in the same reconcile) and
//! stores it. A result is forgotten only once a stored state holds it, so a failed write loses
//! nothing; recording is by index, so a result folded twice counts once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::DynamicObject;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::core::analysis::condition::{self, Judgement};
use crate::core::analysis::schedule::{self, CheckRun, Due};
use crate::core::analysis::{Check, Provider, Variables};
use crate::core::rollout::RolloutState;
use crate::runtime::analysis::{self, MeasureContext};

/// Extra time a task gives a provider beyond the check's own timeout before it counts an error:
/// the provider's own timeout should fire first and say more.
const GRACE: Duration = Duration::from_secs(2);

type DeploymentRef = ObjectRef<DynamicObject>;

/// One measurement, identified as the state identifies it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct MeasurementKey {
    deployment: DeploymentRef,
    hash: String,
    check: String,
    run: String,
    index: u32,
}

/// A measurement taken and judged, waiting to be folded into the state.
#[derive(Clone, Debug)]
pub struct Completed {
    key: MeasurementKey,
    pub at: Timestamp,
    pub judged: Judgement,
}

impl Completed {
    /// The check it measured.
    pub fn check(&self) -> &str {
        &self.key.check
    }

    /// Its place in the run: 0 for the first.
    pub fn index(&self) -> u32 {
        self.key.index
    }

    /// Whether `run`, the run of its check in a state about canary `hash`, is the run it was
    /// taken for.
    fn belongs_to(&self, hash: &str, run: &CheckRun) -> bool {
        self.key.hash == hash && self.key.run == run.label()
    }
}

#[derive(Default)]
struct Book {
    in_flight: HashMap<MeasurementKey, AbortHandle>,
    done: HashMap<DeploymentRef, Vec<Completed>>,
}

/// What the measuring tasks share with the controller.
pub struct Measurements {
    client: Client,
    http: reqwest::Client,
    default_prometheus: Option<String>,
    book: Arc<Mutex<Book>>,
    /// Asks for a reconcile of a Deployment whose measurement came in.
    trigger: mpsc::UnboundedSender<DeploymentRef>,
}

/// Where one Deployment's measurements run: its namespace, its owner reference (for Jobs) and
/// the values of the variables.
pub struct Subject {
    pub deployment: DeploymentRef,
    pub owner: OwnerReference,
    pub variables: Variables,
}

impl Measurements {
    /// The measurements, and the stream of Deployments to reconcile when results come in.
    pub fn new(
        client: Client,
        http: reqwest::Client,
        default_prometheus: Option<String>,
    ) -> (Measurements, mpsc::UnboundedReceiver<DeploymentRef>) {
        let (trigger, triggered) = mpsc::unbounded_channel();
        let measurements = Measurements {
            client,
            http,
            default_prometheus,
            book: Arc::default(),
            trigger,
        };
        (measurements, triggered)
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the results that came in for `deployment` into `state`; returns those recorded.
    pub fn fold(
        &self,
        deployment: &DeploymentRef,
        state: &mut RolloutState,
        checks: &[Check],
    ) -> Vec<Completed> {
        let results = self
            .book()
            .done
            .get(deployment)
            .cloned()
            .unwrap_or_default();
        let mut recorded = Vec::new();
        for result in results {
            let Some(check) = checks.iter().find(|c| c.name == result.key.check) else {
                continue;
            };
            let Some(run) = state.checks.get_mut(&result.key.check) else {
                continue;
            };
            if result.belongs_to(&state.hash, run)
                && run.record(check, result.key.index, result.at, &result.judged)
            {
                recorded.push(result);
            }
        }
        recorded
    }

    /// Forgets the results of `deployment` that `stored` holds or can no longer use.
    pub fn forget(&self, deployment: &DeploymentRef, stored: Option<&RolloutState>) {
        let mut book = self.book();
        let Some(results) = book.done.get_mut(deployment) else {
            return;
        };
        results.retain(|result| {
            stored.is_some_and(|state| {
                state.checks.get(&result.key.check).is_some_and(|run| {
                    result.belongs_to(&state.hash, run) && result.key.index >= run.taken
                })
            })
        });
        if results.is_empty() {
            book.done.remove(deployment);
        }
    }

    /// Starts the measurements in `due` that are not running or waiting already.
    pub fn start(&self, subject: &Subject, hash: &str, due: Vec<Due>, checks: &[Check]) {
        for due in due {
            let Some(check) = checks.iter().find(|c| c.name == due.check).cloned() else {
                continue;
            };
            let key = MeasurementKey {
                deployment: subject.deployment.clone(),
                hash: hash.to_owned(),
                check: due.check.clone(),
                run: due.run.clone(),
                index: due.index,
            };
            let mut book = self.book();
            let waiting = book
                .done
                .get(&subject.deployment)
                .is_some_and(|results| results.iter().any(|r| r.key == key));
            if waiting || book.in_flight.contains_key(&key) {
                continue;
            }
            let context = MeasureContext {
                client: self.client.clone(),
                http: self.http.clone(),
                namespace: subject.deployment.namespace.clone().unwrap_or_default(),
                default_prometheus: self.default_prometheus.clone(),
                variables: Variables {
                    interval: crate::core::spec::format_duration(check.interval),
                    ..subject.variables.clone()
                },
                owner: subject.owner.clone(),
            };
            let job_name = schedule::job_name(
                &subject.deployment.name,
                hash,
                &check.name,
                &due.run,
                due.index,
            );
            let book_handle = Arc::clone(&self.book);
            let trigger = self.trigger.clone();
            let task_key = key.clone();
            let task = tokio::spawn(async move {
                let reading = take(&context, &check, &job_name).await;
                let judged = condition::judge(&check, &reading);
                let deployment = task_key.deployment.clone();
                {
                    let mut book = book_handle.lock().unwrap_or_else(PoisonError::into_inner);
                    book.in_flight.remove(&task_key);
                    book.done
                        .entry(deployment.clone())
                        .or_default()
                        .push(Completed {
                            key: task_key,
                            at: Timestamp::now(),
                            judged,
                        });
                }
                // The controller is gone when this fails: nobody waits for the result.
                let _ = trigger.send(deployment);
            });
            book.in_flight.insert(key, task.abort_handle());
        }
    }

    /// Measurements running now, all Deployments together.
    pub fn in_flight(&self) -> usize {
        self.book().in_flight.len()
    }
}

/// One measurement, bounded by the check's timeout; a Job check runs as long as its Job does
/// (the Job's own `activeDeadlineSeconds` bounds it).
async fn take(
    context: &MeasureContext,
    check: &Check,
    job_name: &str,
) -> crate::core::analysis::Reading {
    let limit = match &check.provider {
        Provider::Prometheus(p) => Some(p.timeout),
        Provider::Web(w) => Some(w.timeout),
        Provider::Job(_) => None,
    };
    let measure = analysis::measure(context, check, job_name);
    match limit {
        Some(limit) => tokio::time::timeout(limit + GRACE, measure)
            .await
            .unwrap_or_else(|_| {
                crate::core::analysis::Reading::Error(format!(
                    "no answer within {}",
                    crate::core::spec::format_duration(limit)
                ))
            }),
        None => measure.await,
    }
}

impl Drop for Measurements {
    /// A controller that stops (or loses its lease) stops measuring.
    fn drop(&mut self) {
        for (_, task) in self.book().in_flight.drain() {
            task.abort();
        }
    }
}
