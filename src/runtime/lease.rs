//! Leader election with a coordination.k8s.io Lease: every replica serves the webhook, only the
//! holder of the Lease runs the controller, and a replica that loses the Lease stops it at once.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};

/// What a replica should do about the Lease, decided from what it read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// No Lease yet: create it, held by us.
    Create,
    /// Ours: renew it.
    Renew,
    /// Someone else's and expired: take it over.
    TakeOver,
    /// Someone else's and current: wait.
    Wait,
}

/// Pure: what to do with `lease` as `me` at `now`.
pub fn step(lease: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Step {
    let Some(spec) = lease else {
        return Step::Create;
    };
    if spec.holder_identity.as_deref() == Some(me) {
        return Step::Renew;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map_or(0, |t| t.0.as_second());
    if spec.holder_identity.is_none() || renewed + duration < now.as_second() {
        Step::TakeOver
    } else {
        Step::Wait
    }
}

/// How one replica takes part.
#[derive(Clone, Debug)]
pub struct Config {
    pub name: String,
    pub namespace: String,
    /// This replica's name (the pod's, in a cluster).
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub duration: Duration,
    /// How often the holder renews (and others look).
    pub renew_every: Duration,
}

/// Runs `lead()` only while this replica holds the Lease; when the Lease is lost (another holder,
/// or no successful renewal within its duration) the task is aborted on the spot, and this replica
/// goes back to waiting. Returns when `shutdown` resolves.
pub async fn run_while_leader<F, Fut>(
    client: Client,
    config: Config,
    lead: F,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let leases: Api<Lease> = Api::namespaced(client, &config.namespace);
    // Aborted however this future ends, dropped included: a replica that stops must stop leading.
    let mut leading = Leading(None);
    let mut last_renewal = tokio::time::Instant::now();
    tokio::pin!(shutdown);
    loop {
        let held = try_hold(&leases, &config).await;
        match (held, leading.0.is_some()) {
            (Ok(true), false) => {
                tracing::info!(identity = %config.identity, lease = %config.name, "leading: controller starts");
                leading.0 = Some(tokio::spawn(lead()));
                last_renewal = tokio::time::Instant::now();
            }
            (Ok(true), true) => last_renewal = tokio::time::Instant::now(),
            (Ok(false), true) => leading.stop(&config, "another replica holds the Lease"),
            (Err(e), true) if last_renewal.elapsed() >= config.duration => {
                leading.stop(&config, &format!("the Lease could not be renewed: {e}"))
            }
            (Err(e), _) => tracing::warn!(error = %e, "Lease"),
            (Ok(false), false) => {}
        }
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(config.renew_every) => {}
        }
    }
}

/// The controller task while leading.
struct Leading(Option<tokio::task::JoinHandle<()>>);

impl Leading {
    fn stop(&mut self, config: &Config, why: &str) {
        tracing::warn!(identity = %config.identity, reason = why, "no longer leading: controller stops");
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// One round: read the Lease and create, renew or take it over when [`step`] says so. Writes carry
/// the read resourceVersion, so two replicas racing for it cannot both win.
async fn try_hold(leases: &Api<Lease>, config: &Config) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let current = leases.get_opt(&config.name).await?;
    let spec = current.as_ref().and_then(|l| l.spec.as_ref());
    let micro = MicroTime(now);
    let held = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(i32::try_from(config.duration.as_secs()).unwrap_or(i32::MAX)),
        acquire_time: acquired.or(Some(micro.clone())),
        renew_time: Some(micro.clone()),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    let outcome = match (step(spec, &config.identity, now), current) {
        (Step::Wait, _) => return Ok(false),
        (Step::Create, _) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(held(0, None)),
            };
            leases
                .create(&PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
        (step, Some(mut lease)) => {
            let previous = lease.spec.clone().unwrap_or_default();
            let (transitions, acquired) = if step == Step::Renew {
                (
                    previous.lease_transitions.unwrap_or(0),
                    previous.acquire_time,
                )
            } else {
                (previous.lease_transitions.unwrap_or(0) + 1, None)
            };
            lease.spec = Some(held(transitions, acquired));
            leases
                .replace(&config.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
        (_, None) => return Ok(false),
    };
    match outcome {
        Ok(()) => Ok(true),
        // Someone else wrote first: theirs, this round.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    fn lease(holder: Option<&str>, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(t(renewed))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn who_holds_the_lease() {
        assert_eq!(step(None, "a", t(0)), Step::Create);
        assert_eq!(step(Some(&lease(Some("a"), 0)), "a", t(100)), Step::Renew);
        assert_eq!(step(Some(&lease(Some("b"), 0)), "a", t(15)), Step::Wait);
        assert_eq!(step(Some(&lease(Some("b"), 0)), "a", t(16)), Step::TakeOver);
        assert_eq!(step(Some(&lease(None, 0)), "a", t(1)), Step::TakeOver);
    }
}
