//! Leader election with a coordination.k8s.io Lease: every replica serves the webhook, only the
//! holder of the Lease runs the controller, and a replica that loses the Lease stops it at once.
//!
//! As client-go's `leaderelection`, a replica never compares the holder's `renewTime` with its
//! own wall clock (the two nodes' clocks may disagree by any amount): it records, by its own
//! monotonic clock, when it last saw the Lease change, and takes it over only when the Lease has
//! stayed unchanged for `leaseDurationSeconds` since. The holder gives the Lease up on shutdown,
//! as client-go's `ReleaseOnCancel`, so that another replica takes over at once.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What a replica should do about the Lease, decided from what it read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseStep {
    /// Ours: renew it.
    Renew,
    /// Absent, released, or someone else's and unchanged for its whole duration: take it.
    Acquire,
    /// Someone else's and changed within its duration: wait.
    Wait,
}

/// Pure: what to do, as `me`, with the Lease `lease` (`None`: no Lease, or one without a spec)
/// that this replica has seen unchanged for `unchanged_for` by its own monotonic clock.
///
/// The remote `renewTime` and `acquireTime` play no part: they were written by another node's
/// clock. The wait is the Lease's own `leaseDurationSeconds` (this replica's duration when the
/// Lease has none).
pub fn step(lease: Option<&LeaseSpec>, unchanged_for: Duration, me: &LeaseConfig) -> LeaseStep {
    let Some(spec) = lease else {
        return LeaseStep::Acquire;
    };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == me.identity => LeaseStep::Renew,
        None | Some("") => LeaseStep::Acquire,
        Some(_) => {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .filter(|s| *s > 0)
                .map_or(me.duration, Duration::from_secs);
            if unchanged_for >= duration {
                LeaseStep::Acquire
            } else {
                LeaseStep::Wait
            }
        }
    }
}

/// What this replica last saw of the Lease, and since when by its own monotonic clock.
#[derive(Debug, Default)]
pub struct Observer {
    seen: Option<Seen>,
}

#[derive(Debug)]
struct Seen {
    /// `(metadata.resourceVersion, spec)`, `None` for no Lease: any write changes the first.
    record: Option<(Option<String>, Option<LeaseSpec>)>,
    since: Instant,
}

impl Observer {
    /// Pure: records `lease` as read at `now` and answers how long it has been seen unchanged.
    /// A change of the resourceVersion or of the spec (holder, renewTime, ...) restarts the count.
    pub fn observe(&mut self, lease: Option<&Lease>, now: Instant) -> Duration {
        let record = lease.map(|l| (l.metadata.resource_version.clone(), l.spec.clone()));
        match &self.seen {
            Some(seen) if seen.record == record => now.saturating_duration_since(seen.since),
            _ => {
                self.seen = Some(Seen { record, since: now });
                Duration::ZERO
            }
        }
    }
}

/// How one replica takes part.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This replica's name (the pod's, in a cluster).
    pub identity: String,
    /// How long a Lease stays valid without renewal (written as `leaseDurationSeconds`, rounded
    /// up to whole seconds).
    pub duration: Duration,
    /// How often the holder renews (and others look); well under `duration`: the holder stops
    /// leading when it has not renewed for `duration - renew_every`.
    pub renew_every: Duration,
}

/// Pure: how long the holder keeps leading without a successful renewal. Shorter than the
/// duration others wait (counted from when they see the renewal, which is after the round that
/// wrote it started), so that the controller has stopped before anyone else may start theirs.
pub fn renew_deadline(config: &LeaseConfig) -> Duration {
    config.duration.saturating_sub(config.renew_every)
}

/// Pure: how long to wait before starting the controller again after it ended for the
/// `restarts`-th time in a row: `renew_every`, doubling, at most `duration`.
pub fn restart_delay(restarts: u32, config: &LeaseConfig) -> Duration {
    config
        .renew_every
        .saturating_mul(2_u32.saturating_pow(restarts))
        .min(config.duration.max(config.renew_every))
}

/// Runs `lead()` only while this replica holds the Lease; when the Lease is lost (another holder,
/// or no successful renewal within [`renew_deadline`]) the task is aborted on the spot, and this
/// replica goes back to waiting. A task that ends (returns or panics) while this replica leads is
/// started again after [`restart_delay`]. When `shutdown` resolves, the task is stopped and, if
/// this replica holds the Lease, the Lease is released; then this returns.
pub async fn run_while_leader<F, Fut>(
    client: Client,
    config: LeaseConfig,
    lead: F,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let leases: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observer = Observer::default();
    // Aborted however this future ends, dropped included: a replica that stops must stop leading.
    let mut leading = Leading::new(lead, &config);
    // The Lease as this replica last wrote it, while it holds it; and when it must stop leading
    // if no renewal succeeds.
    let mut held: Option<Lease> = None;
    let mut deadline: Option<Instant> = None;
    tokio::pin!(shutdown);
    'rounds: loop {
        let round = Instant::now();
        let bound = deadline.map_or(round + config.renew_every, |d| {
            d.min(round + config.renew_every)
        });
        let outcome =
            match tokio::time::timeout_at(bound, try_hold(&leases, &config, &mut observer)).await {
                Ok(outcome) => outcome.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {:?}", bound - round)),
            };
        match outcome {
            Ok(Some(lease)) => {
                held = Some(lease);
                deadline = Some(round + renew_deadline(&config));
                if !leading.is_leading() {
                    tracing::info!(identity = %config.identity, lease = %config.name, "leading: controller starts");
                    leading.start();
                }
            }
            Ok(None) => {
                held = None;
                deadline = None;
                if leading.is_leading() {
                    leading.stop(&config, "another replica holds the Lease");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, lease = %config.name, "Lease");
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    held = None;
                    deadline = None;
                    leading.stop(&config, &format!("the Lease could not be renewed: {e}"));
                }
            }
        }
        let next = round + config.renew_every;
        loop {
            tokio::select! {
                () = &mut shutdown => break 'rounds,
                () = tokio::time::sleep_until(next) => break,
                () = until(deadline) => {
                    held = None;
                    deadline = None;
                    leading.stop(&config, "the Lease was not renewed in time");
                }
                () = leading.supervise(&config) => {}
            }
        }
    }
    leading.stop_and_wait(&config).await;
    if let Some(lease) = held {
        release(&leases, lease, &config).await;
    }
}

/// Resolves at `at`; never when `None`.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The controller task, while this replica leads.
struct Leading<F> {
    lead: F,
    task: Task,
    /// A task that ran this long before it ended is started again without the backoff its
    /// earlier ends accumulated (`config.duration`).
    healthy_after: Duration,
}

enum Task {
    /// Not leading.
    Idle,
    Running {
        handle: JoinHandle<()>,
        started: Instant,
        /// How many times in a row it ended soon after it started.
        restarts: u32,
    },
    /// Leading, the task ended: start it again at `at`.
    Restarting { at: Instant, restarts: u32 },
}

impl<F, Fut> Leading<F>
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn new(lead: F, config: &LeaseConfig) -> Self {
        Leading {
            lead,
            task: Task::Idle,
            healthy_after: config.duration,
        }
    }

    fn is_leading(&self) -> bool {
        !matches!(self.task, Task::Idle)
    }

    fn start(&mut self) {
        self.spawn(0);
    }

    fn spawn(&mut self, restarts: u32) {
        self.task = Task::Running {
            handle: tokio::spawn((self.lead)()),
            started: Instant::now(),
            restarts,
        };
    }

    /// Aborts the task on the spot.
    fn stop(&mut self, config: &LeaseConfig, why: &str) {
        tracing::warn!(identity = %config.identity, reason = why, "no longer leading: controller stops");
        if let Task::Running { handle, .. } = std::mem::replace(&mut self.task, Task::Idle) {
            handle.abort();
        }
    }

    /// Aborts the task and waits until it is gone: nothing of it runs once this returns.
    async fn stop_and_wait(&mut self, config: &LeaseConfig) {
        if let Task::Running { handle, .. } = std::mem::replace(&mut self.task, Task::Idle) {
            tracing::info!(identity = %config.identity, "shutting down: controller stops");
            handle.abort();
            let _ = handle.await;
        }
    }

    /// Resolves when the task ended (and a restart is scheduled) or was restarted; never when
    /// not leading. Cancel-safe: the state changes only after an await completed.
    async fn supervise(&mut self, config: &LeaseConfig) {
        match &mut self.task {
            Task::Idle => std::future::pending().await,
            Task::Running {
                handle,
                started,
                restarts,
            } => {
                let ended = handle.await;
                let restarts = if started.elapsed() >= self.healthy_after {
                    0
                } else {
                    *restarts
                };
                let delay = restart_delay(restarts, config);
                let how = match ended {
                    Ok(()) => "returned".to_owned(),
                    Err(e) if e.is_panic() => "panicked".to_owned(),
                    Err(e) => e.to_string(),
                };
                tracing::error!(identity = %config.identity, how = %how, restart_in = ?delay, "controller ended while leading; restarting");
                self.task = Task::Restarting {
                    at: Instant::now() + delay,
                    restarts: restarts.saturating_add(1),
                };
            }
            Task::Restarting { at, restarts } => {
                let restarts = *restarts;
                tokio::time::sleep_until(*at).await;
                tracing::info!(identity = %config.identity, restarts, "controller starts again");
                self.spawn(restarts);
            }
        }
    }
}

impl<F> Drop for Leading<F> {
    fn drop(&mut self) {
        if let Task::Running { handle, .. } = &self.task {
            handle.abort();
        }
    }
}

/// One round: read the Lease and create, renew or take it over when [`step`] says so. Writes carry
/// the read resourceVersion, so two replicas racing for it cannot both win. Answers the Lease as
/// written when this replica holds it.
async fn try_hold(
    leases: &Api<Lease>,
    config: &LeaseConfig,
    observer: &mut Observer,
) -> Result<Option<Lease>, kube::Error> {
    let current = leases.get_opt(&config.name).await?;
    let unchanged_for = observer.observe(current.as_ref(), Instant::now());
    let spec = current.as_ref().and_then(|l| l.spec.as_ref());
    let decided = step(spec, unchanged_for, config);
    if decided == LeaseStep::Wait {
        return Ok(None);
    }
    // Written for others to read; never compared with anyone's clock.
    let now = MicroTime(Timestamp::now());
    let previous = spec.cloned().unwrap_or_default();
    let (transitions, acquired) = if decided == LeaseStep::Renew {
        (
            previous.lease_transitions.unwrap_or(0),
            previous.acquire_time.unwrap_or_else(|| now.clone()),
        )
    } else {
        (
            previous
                .lease_transitions
                .map_or(0, |t| t.saturating_add(1)),
            now.clone(),
        )
    };
    let held = LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(whole_seconds(config.duration)),
        acquire_time: Some(acquired),
        renew_time: Some(now),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    let written = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(held),
            };
            leases.create(&PostParams::default(), &lease).await
        }
        Some(mut lease) => {
            lease.spec = Some(held);
            leases
                .replace(&config.name, &PostParams::default(), &lease)
                .await
        }
    };
    match written {
        Ok(lease) => {
            observer.observe(Some(&lease), Instant::now());
            Ok(Some(lease))
        }
        // Someone else wrote first: theirs, this round.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
        Err(e) => Err(e),
    }
}

/// `duration` in whole seconds, rounded up, at least 1 (what `leaseDurationSeconds` allows).
fn whole_seconds(duration: Duration) -> i32 {
    let seconds = duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0));
    i32::try_from(seconds.max(1)).unwrap_or(i32::MAX)
}

/// Pure: the Lease given up, as client-go's `ReleaseOnCancel` writes it: no holder, a duration of
/// one second, renew and acquire time now, the transitions kept. `lease` (its resourceVersion
/// included) is the one this replica last wrote, so the write fails if anyone wrote since.
pub fn released(mut lease: Lease, now: Timestamp) -> Lease {
    let transitions = lease.spec.as_ref().and_then(|s| s.lease_transitions);
    lease.spec = Some(LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: transitions,
        ..LeaseSpec::default()
    });
    lease
}

/// Gives the Lease up (see [`released`]), bounded by `renew_every`: on failure the Lease simply
/// expires after its duration.
async fn release(leases: &Api<Lease>, lease: Lease, config: &LeaseConfig) {
    let lease = released(lease, Timestamp::now());
    let written = tokio::time::timeout(
        config.renew_every,
        leases.replace(&config.name, &PostParams::default(), &lease),
    )
    .await;
    match written {
        Ok(Ok(_)) => {
            tracing::info!(identity = %config.identity, lease = %config.name, "Lease released")
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, lease = %config.name, "the Lease could not be released")
        }
        Err(_) => tracing::warn!(lease = %config.name, "the Lease could not be released in time"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "me";

    fn me() -> LeaseConfig {
        LeaseConfig {
            name: "fledge".into(),
            namespace: "default".into(),
            identity: ME.into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }

    fn t(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn spec(holder: Option<&str>, duration: Option<i32>, renewed: Option<Timestamp>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: duration,
            renew_time: renewed.map(MicroTime),
            acquire_time: renewed.map(MicroTime),
            ..LeaseSpec::default()
        }
    }

    fn lease(rv: &str, spec: LeaseSpec) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("fledge".into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
        }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn no_lease_or_no_holder_is_acquired_at_once() {
        assert_eq!(step(None, Duration::ZERO, &me()), LeaseStep::Acquire);
        for holder in [None, Some("")] {
            let released = spec(holder, Some(15), Some(t(2_000_000_000)));
            assert_eq!(
                step(Some(&released), Duration::ZERO, &me()),
                LeaseStep::Acquire
            );
        }
        assert_eq!(
            step(Some(&LeaseSpec::default()), Duration::ZERO, &me()),
            LeaseStep::Acquire
        );
    }

    #[test]
    fn ours_is_renewed_whatever_the_times() {
        for unchanged in [Duration::ZERO, S(15), S(100_000)] {
            for renewed in [None, Some(t(0)), Some(t(4_000_000_000))] {
                let ours = spec(Some(ME), Some(15), renewed);
                assert_eq!(step(Some(&ours), unchanged, &me()), LeaseStep::Renew);
            }
        }
    }

    #[test]
    fn anothers_is_taken_after_its_duration_by_the_local_clock() {
        let theirs = spec(Some("other"), Some(15), Some(t(1_800_000_000)));
        assert_eq!(step(Some(&theirs), Duration::ZERO, &me()), LeaseStep::Wait);
        assert_eq!(step(Some(&theirs), S(15) - MS(1), &me()), LeaseStep::Wait);
        assert_eq!(step(Some(&theirs), S(15), &me()), LeaseStep::Acquire);
        assert_eq!(step(Some(&theirs), S(16), &me()), LeaseStep::Acquire);
        // Its own duration counts, not ours.
        let short = spec(Some("other"), Some(1), Some(t(1_800_000_000)));
        assert_eq!(step(Some(&short), MS(999), &me()), LeaseStep::Wait);
        assert_eq!(step(Some(&short), S(1), &me()), LeaseStep::Acquire);
        let long = spec(Some("other"), Some(60), Some(t(1_800_000_000)));
        assert_eq!(step(Some(&long), S(59), &me()), LeaseStep::Wait);
        assert_eq!(step(Some(&long), S(60), &me()), LeaseStep::Acquire);
    }

    #[test]
    fn without_a_valid_duration_ours_counts() {
        for duration in [None, Some(0), Some(-5)] {
            let theirs = spec(Some("other"), duration, Some(t(1_800_000_000)));
            assert_eq!(step(Some(&theirs), S(14), &me()), LeaseStep::Wait);
            assert_eq!(step(Some(&theirs), S(15), &me()), LeaseStep::Acquire);
        }
    }

    /// Clock skew: the holder's renewTime, however far from this replica's wall clock, changes
    /// nothing. Exhaustive over holders, durations, renew times and local observations.
    #[test]
    fn the_remote_renew_time_never_decides() {
        let now = Timestamp::now().as_second();
        let renew_times = [
            None,
            Some(t(0)),                     // the epoch: far in the past
            Some(t(now - 86_400 * 365)),    // a year behind
            Some(t(now - 16)),              // just expired by our wall clock
            Some(t(now)),                   // now
            Some(t(now + 3_600)),           // an hour ahead
            Some(t(now + 86_400 * 36_500)), // a century ahead
        ];
        let observed = [
            Duration::ZERO,
            MS(1),
            S(1),
            S(14),
            S(15),
            S(16),
            S(1_000_000),
        ];
        for holder in [None, Some(""), Some(ME), Some("other")] {
            for duration in [None, Some(-5), Some(0), Some(1), Some(15), Some(60)] {
                for unchanged in observed {
                    let decisions: Vec<LeaseStep> = renew_times
                        .iter()
                        .map(|r| step(Some(&spec(holder, duration, *r)), unchanged, &me()))
                        .collect();
                    assert!(
                        decisions.iter().all(|d| *d == decisions[0]),
                        "{holder:?} {duration:?} {unchanged:?}: {decisions:?}"
                    );
                    let wait = S(duration.filter(|d| *d > 0).map_or(15, |d| d as u64));
                    let expected = match holder {
                        Some(ME) => LeaseStep::Renew,
                        Some("other") if unchanged < wait => LeaseStep::Wait,
                        _ => LeaseStep::Acquire,
                    };
                    assert_eq!(
                        decisions[0], expected,
                        "{holder:?} {duration:?} {unchanged:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_observer_counts_from_the_last_change_it_saw() {
        let start = Instant::now();
        let mut observer = Observer::default();
        let held = lease("1", spec(Some("other"), Some(15), Some(t(4_000_000_000))));
        // First sight: the count starts now, whatever renewTime says.
        assert_eq!(observer.observe(Some(&held), start), Duration::ZERO);
        assert_eq!(observer.observe(Some(&held), start + S(10)), S(10));
        assert_eq!(observer.observe(Some(&held), start + S(15)), S(15));
        // A renewal (new resourceVersion and renewTime) restarts it.
        let renewed = lease("2", spec(Some("other"), Some(15), Some(t(4_000_000_005))));
        assert_eq!(
            observer.observe(Some(&renewed), start + S(20)),
            Duration::ZERO
        );
        assert_eq!(observer.observe(Some(&renewed), start + S(21)), S(1));
        // A write that changes only the resourceVersion restarts it too.
        let touched = lease("3", spec(Some("other"), Some(15), Some(t(4_000_000_005))));
        assert_eq!(
            observer.observe(Some(&touched), start + S(22)),
            Duration::ZERO
        );
        // So does a spec change under the same resourceVersion (a stand-in that does not bump it).
        let moved = lease("3", spec(Some("third"), Some(15), Some(t(4_000_000_005))));
        assert_eq!(
            observer.observe(Some(&moved), start + S(23)),
            Duration::ZERO
        );
        // Gone, then back as it was: both are changes.
        assert_eq!(observer.observe(None, start + S(24)), Duration::ZERO);
        assert_eq!(observer.observe(None, start + S(25)), S(1));
        assert_eq!(
            observer.observe(Some(&moved), start + S(26)),
            Duration::ZERO
        );
    }

    #[test]
    fn a_renew_time_from_a_skewed_clock_is_taken_over_after_the_local_duration() {
        let start = Instant::now();
        let far_future = Some(t(Timestamp::now().as_second() + 86_400 * 365));
        let far_past = Some(t(0));
        for renewed in [far_future, far_past] {
            let mut observer = Observer::default();
            let held = lease("7", spec(Some("other"), Some(15), renewed));
            let decide = |observer: &mut Observer, at| {
                let unchanged = observer.observe(Some(&held), at);
                step(held.spec.as_ref(), unchanged, &me())
            };
            assert_eq!(decide(&mut observer, start), LeaseStep::Wait);
            assert_eq!(decide(&mut observer, start + S(14)), LeaseStep::Wait);
            assert_eq!(decide(&mut observer, start + S(15)), LeaseStep::Acquire);
        }
    }

    #[test]
    fn the_holder_stops_before_anyone_else_may_start() {
        assert_eq!(renew_deadline(&me()), S(10));
        assert!(renew_deadline(&me()) < me().duration);
        let odd = LeaseConfig {
            renew_every: S(20),
            ..me()
        };
        assert_eq!(renew_deadline(&odd), Duration::ZERO);
    }

    #[test]
    fn restarts_back_off_up_to_the_lease_duration() {
        let delays: Vec<Duration> = (0..6).map(|n| restart_delay(n, &me())).collect();
        assert_eq!(delays, [S(5), S(10), S(15), S(15), S(15), S(15)]);
        assert_eq!(restart_delay(u32::MAX, &me()), S(15));
    }

    #[test]
    fn the_written_duration_is_rounded_up_to_whole_seconds() {
        assert_eq!(whole_seconds(S(15)), 15);
        assert_eq!(whole_seconds(MS(2_500)), 3);
        assert_eq!(whole_seconds(MS(10)), 1);
        assert_eq!(whole_seconds(Duration::ZERO), 1);
        assert_eq!(whole_seconds(Duration::MAX), i32::MAX);
    }

    #[test]
    fn a_released_lease_has_no_holder_and_keeps_its_version_and_transitions() {
        let mut ours = lease("42", spec(Some(ME), Some(15), Some(t(1_800_000_000))));
        if let Some(s) = ours.spec.as_mut() {
            s.lease_transitions = Some(3);
        }
        let now = t(1_800_000_100);
        let given_up = released(ours, now);
        assert_eq!(given_up.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(
            given_up.spec,
            Some(LeaseSpec {
                holder_identity: None,
                lease_duration_seconds: Some(1),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(3),
                ..LeaseSpec::default()
            })
        );
        // And anyone, at once, may take it.
        assert_eq!(
            step(
                given_up.spec.as_ref(),
                Duration::ZERO,
                &LeaseConfig {
                    identity: "other".into(),
                    ..me()
                }
            ),
            LeaseStep::Acquire
        );
    }

    /// The controller task: restarted after it returns or panics, at the backoff's pace; stopped
    /// on the spot when leading ends.
    #[tokio::test]
    async fn a_controller_task_that_ends_is_started_again() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let config = LeaseConfig {
            duration: S(2),
            renew_every: MS(20),
            ..me()
        };
        let starts = Arc::new(AtomicUsize::new(0));
        let counted = starts.clone();
        let mut leading = Leading::new(
            move || {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    match n {
                        0 => {}
                        1 => panic!("the controller fails"),
                        _ => std::future::pending().await,
                    }
                }
            },
            &config,
        );
        assert!(!leading.is_leading());
        leading.start();
        let begun = Instant::now();
        // It returned: a restart after 20 ms.
        leading.supervise(&config).await;
        assert!(matches!(leading.task, Task::Restarting { restarts: 1, .. }));
        assert!(leading.is_leading());
        leading.supervise(&config).await;
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        assert!(begun.elapsed() >= MS(20));
        // It panicked: a restart after 40 ms more.
        leading.supervise(&config).await;
        assert!(matches!(leading.task, Task::Restarting { restarts: 2, .. }));
        leading.supervise(&config).await;
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        assert!(begun.elapsed() >= MS(60));
        // It runs: nothing to do until it ends.
        assert!(
            tokio::time::timeout(MS(200), leading.supervise(&config))
                .await
                .is_err()
        );
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        leading.stop(&config, "test");
        assert!(!leading.is_leading());
        assert!(
            tokio::time::timeout(MS(200), leading.supervise(&config))
                .await
                .is_err(),
            "not leading: never restarted"
        );
        assert_eq!(starts.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_task_that_ran_a_while_restarts_without_the_accumulated_backoff() {
        let config = LeaseConfig {
            duration: MS(100),
            renew_every: MS(10),
            ..me()
        };
        let mut leading = Leading::new(|| tokio::time::sleep(MS(150)), &config);
        leading.task = Task::Running {
            handle: tokio::spawn(tokio::time::sleep(MS(150))),
            started: Instant::now(),
            restarts: 5,
        };
        leading.supervise(&config).await;
        assert!(matches!(leading.task, Task::Restarting { restarts: 1, .. }));
        leading.supervise(&config).await;
        assert!(matches!(leading.task, Task::Running { restarts: 1, .. }));
    }

    #[tokio::test]
    async fn stopping_on_shutdown_waits_until_the_task_is_gone() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let gone = Arc::new(AtomicBool::new(false));
        let flag = gone.clone();
        let mut leading = Leading::new(
            move || {
                let flag = Flag(flag.clone());
                async move {
                    let _flag = flag;
                    std::future::pending::<()>().await;
                }
            },
            &me(),
        );
        leading.start();
        tokio::task::yield_now().await;
        leading.stop_and_wait(&me()).await;
        assert!(gone.load(Ordering::SeqCst));
        assert!(!leading.is_leading());
    }
}
