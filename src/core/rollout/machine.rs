//! The rollout state machine: stored state + what the controller observed + now → next state, the
//! objects to converge to, and when to look again. Pure: the controller does the IO around it.
//!
//! Every call takes at most one step, so each weight is written and observable; the controller
//! calls again at once whenever the state changed.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::{Phase, RolloutState};
use crate::core::objects::canary_pods;
use crate::core::podratio::PodShare;
use crate::core::spec::{CanarySpec, Router, Step, Weight};

/// What the controller read from the cluster, as plain values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation<'a> {
    pub name: &'a str,
    /// The parsed settings; `None` when the Deployment is not (or no longer) opted in.
    pub spec: Option<&'a CanarySpec>,
    /// Hash of the Deployment's `spec.template`: the template the user applied.
    pub template_hash: &'a str,
    /// `fledge.dev/stable-hash`: while a change is pending, the template the stable pods run.
    pub stable_hash: Option<&'a str>,
    /// `fledge.dev/hold`: fledge (not the user) holds the Deployment paused.
    pub held: bool,
    /// The user's Deployment's `spec.replicas`.
    pub stable_replicas: u64,
    /// The Deployment's own `progressDeadlineSeconds`.
    pub progress_deadline: Duration,
    pub canary: CanaryStatus,
    /// The user's Deployment has rolled out its current template (all replicas updated and available).
    pub stable_rolled_out: bool,
}

impl Observation<'_> {
    /// The template waiting to be canaried: `spec.template`, when it is not the stable one.
    pub fn pending(&self) -> Option<&str> {
        self.stable_hash
            .filter(|stable| *stable != self.template_hash)
            .map(|_| self.template_hash)
    }
}

/// The `NAME-canary` Deployment as observed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CanaryStatus {
    /// It runs the pending template and its rollout is complete (`Available`, all replicas updated).
    pub available: bool,
    /// Ready pods of the pending template.
    pub ready_replicas: u64,
}

/// The objects the controller converges to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// None of fledge's objects: traffic back to the stable pods first, then everything deleted.
    Nothing,
    /// The canary Deployment sized for `size`, both Services, and the split at `weight`.
    Canary { size: Weight, weight: Weight },
    /// All traffic on the canary while the user's Deployment, unpaused, rolls out the canary's
    /// template with its own strategy.
    Promote,
}

/// A Kubernetes Event to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub reason: &'static str,
    pub message: String,
    pub warning: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Next {
    /// The state to store; `None` removes it (the Deployment left fledge).
    pub state: Option<RolloutState>,
    pub target: Target,
    /// Look again after this long even if nothing changes (a pause or a deadline ends).
    pub requeue: Option<Duration>,
    pub event: Option<Event>,
}

/// The next step of the rollout of one Deployment.
pub fn next(state: Option<&RolloutState>, obs: &Observation, now: Timestamp) -> Next {
    let Some(spec) = obs.spec else {
        return Next {
            event: state.filter(|s| in_flight(s.phase)).map(|_| {
                info(
                    "OptedOut",
                    format!(
                        "{} left fledge: traffic back to stable, canary objects removed",
                        obs.name
                    ),
                )
            }),
            state: None,
            target: Target::Nothing,
            requeue: None,
        };
    };
    match (state, obs.pending()) {
        (Some(s), Some(pending)) if s.hash == pending => match s.phase {
            Phase::Progressing | Phase::Paused => progress(s, spec, obs, now),
            Phase::Promoting => promote(s, obs),
            Phase::Aborted => settled(state),
            // Applied again after a rollback or a success: a fresh canary, once fledge holds it.
            Phase::Idle | Phase::Succeeded | Phase::RolledBack if obs.held => {
                start(state, pending, obs, now)
            }
            Phase::Idle | Phase::Succeeded | Phase::RolledBack => settled(state),
        },
        // The user keeps the Deployment paused: the canary starts when they resume.
        (_, Some(_)) if !obs.held => settled(state),
        (previous, Some(pending)) => start(previous, pending, obs, now),
        // Unpaused by the promotion: the Deployment rolls the canary's template out.
        (Some(s), None) if s.phase == Phase::Promoting && s.hash == obs.template_hash => {
            promote(s, obs)
        }
        // The template is the stable one again while a canary was pending, running or aborted.
        (Some(s), None) if in_flight(s.phase) || s.phase == Phase::Aborted => rolled_back(s, obs),
        (state, None) => settled(state),
    }
}

fn in_flight(phase: Phase) -> bool {
    matches!(phase, Phase::Progressing | Phase::Paused | Phase::Promoting)
}

fn info(reason: &'static str, message: String) -> Event {
    Event {
        reason,
        message,
        warning: false,
    }
}

/// Nothing to do: the state stays as it is and no canary objects exist.
fn settled(state: Option<&RolloutState>) -> Next {
    Next {
        state: state.cloned(),
        target: Target::Nothing,
        requeue: None,
        event: None,
    }
}

/// A revert: all traffic back to stable, the canary removed, the rollout settled.
fn rolled_back(s: &RolloutState, obs: &Observation) -> Next {
    let message = format!(
        "rolled back: the pod template is the stable one ({}) again; canary {} removed, all traffic on the stable pods",
        obs.template_hash, s.hash
    );
    Next {
        state: Some(RolloutState {
            phase: Phase::RolledBack,
            weight: Weight::ZERO,
            message: message.clone(),
            unavailable_since: None,
            ..s.clone()
        }),
        target: Target::Nothing,
        requeue: None,
        event: Some(info("RolledBack", message)),
    }
}

fn start(
    previous: Option<&RolloutState>,
    pending: &str,
    obs: &Observation,
    now: Timestamp,
) -> Next {
    let replaced = previous.filter(|s| in_flight(s.phase));
    let message = match replaced {
        Some(old) => format!(
            "new template {pending} replaces canary {} and starts at step 1",
            old.hash
        ),
        None => format!("canary {pending} started"),
    };
    let state = RolloutState {
        phase: Phase::Progressing,
        hash: pending.to_owned(),
        step: 0,
        weight: Weight::ZERO,
        message: message.clone(),
        step_started: Some(now),
        unavailable_since: Some(now),
        // Users' routes still split for the canary this one replaces are restored from these.
        saved_routes: previous.map(|s| s.saved_routes.clone()).unwrap_or_default(),
    };
    Next {
        state: Some(state),
        target: Target::Canary {
            size: Weight::ZERO,
            weight: Weight::ZERO,
        },
        requeue: Some(obs.progress_deadline),
        event: Some(info(
            if replaced.is_some() {
                "CanaryReplaced"
            } else {
                "CanaryStarted"
            },
            message,
        )),
    }
}

fn progress(s: &RolloutState, spec: &CanarySpec, obs: &Observation, now: Timestamp) -> Next {
    let size = match spec.steps.get(s.step) {
        Some(Step::SetWeight(w)) => (*w).max(s.weight),
        _ => s.weight,
    };
    if !obs.canary.available {
        return unavailable(s, size, obs, now);
    }
    let mut state = RolloutState {
        unavailable_since: None,
        ..s.clone()
    };
    let hold = |state: RolloutState, requeue: Option<Duration>| Next {
        target: Target::Canary {
            size,
            weight: state.weight,
        },
        state: Some(state),
        requeue,
        event: None,
    };
    let total = spec.steps.len();
    let Some(step) = spec.steps.get(s.step) else {
        state.phase = Phase::Promoting;
        state.message = format!("all {total} steps done: promoting");
        let event = info("Promoting", state.message.clone());
        return Next {
            event: Some(event),
            ..hold(state, None)
        };
    };
    let advance = |mut state: RolloutState, event: Event| {
        state.step += 1;
        state.phase = Phase::Progressing;
        state.step_started = Some(now);
        state.message = event.message.clone();
        Next {
            event: Some(event),
            ..hold(state, None)
        }
    };
    // Entering a pause is announced; the countdown in its message is not.
    let pause = |mut state: RolloutState, requeue: Option<Duration>| {
        let entering = state.phase != Phase::Paused;
        state.phase = Phase::Paused;
        Next {
            event: entering.then(|| info("Paused", state.message.clone())),
            ..hold(state, requeue)
        }
    };
    let position = format!("step {}/{total}", s.step + 1);
    match step {
        Step::SetWeight(w) => {
            let needed = canary_pods(&spec.router, obs.stable_replicas, *w);
            if obs.canary.ready_replicas < needed {
                state.message = format!(
                    "{position}: waiting for {needed} ready canary pods before {w}% of traffic"
                );
                return hold(state, None);
            }
            state.weight = *w;
            let effective = match spec.router {
                Router::PodRatio => format!(
                    " (pod ratio: {})",
                    PodShare::nearest(obs.stable_replicas, *w)
                ),
                Router::Smi | Router::GatewayApi { .. } => String::new(),
            };
            advance(
                state,
                info(
                    "WeightSet",
                    format!("{position}: canary weight {w}%{effective}"),
                ),
            )
        }
        Step::PauseFor(d) => {
            let started = s.step_started.unwrap_or(now);
            let elapsed = elapsed(started, now);
            if elapsed >= *d {
                return advance(
                    state,
                    info(
                        "PauseEnded",
                        format!(
                            "{position}: pause of {} ended",
                            crate::core::spec::format_duration(*d)
                        ),
                    ),
                );
            }
            let left = *d - elapsed;
            state.message = format!(
                "{position}: paused, {} left",
                crate::core::spec::format_duration(shown(left))
            );
            pause(state, Some(left))
        }
        Step::PauseUntilPromoted => {
            state.message = format!("{position}: paused until `fledge promote {}`", obs.name);
            pause(state, None)
        }
        Step::SetHeaderRoute { .. } => {
            advance(state, info("HeaderRouteSet", format!("{position}: {step}")))
        }
        Step::SetMirrorRoute { .. } => {
            advance(state, info("MirrorRouteSet", format!("{position}: {step}")))
        }
        // Not parsed yet: `analysis` is still a reserved step kind.
        Step::Analysis { .. } => hold(state, None),
    }
}

/// The canary is not (or no longer) available: wait, with no traffic on it while it has no ready
/// pod, and abort when the Deployment's own progress deadline has passed.
fn unavailable(s: &RolloutState, size: Weight, obs: &Observation, now: Timestamp) -> Next {
    let since = s.unavailable_since.unwrap_or(now);
    let deadline = obs.progress_deadline;
    let waited = elapsed(since, now);
    if waited >= deadline {
        let message = format!(
            "canary {}-canary was not available within {}s (progressDeadlineSeconds): aborted, traffic back to stable. {}",
            obs.name,
            deadline.as_secs(),
            how_to_go_on(obs.name)
        );
        let state = RolloutState {
            phase: Phase::Aborted,
            weight: Weight::ZERO,
            message: message.clone(),
            unavailable_since: None,
            ..s.clone()
        };
        return Next {
            state: Some(state),
            target: Target::Nothing,
            requeue: None,
            event: Some(Event {
                reason: "ProgressDeadlineExceeded",
                message,
                warning: true,
            }),
        };
    }
    // A reason already given for the wait (say, by the controller: a missing root Service) stays.
    let message = match s.unavailable_since {
        Some(_) => s.message.clone(),
        None => format!("waiting for canary {}-canary to be available", obs.name),
    };
    let state = RolloutState {
        unavailable_since: Some(since),
        message,
        ..s.clone()
    };
    Next {
        state: Some(state),
        target: Target::Canary {
            size,
            weight: routable(s.weight, obs),
        },
        requeue: Some(deadline - waited),
        event: None,
    }
}

/// What a user can do with an aborted canary; the Deployment stays held with the aborted template.
pub fn how_to_go_on(name: &str) -> String {
    format!(
        "{name} stays paused with the aborted template: change the template, apply the previous one to roll back, or run `kubectl fledge retry {name}`"
    )
}

/// The canary's share of traffic that may be routed now: none while it has no ready pod.
fn routable(weight: Weight, obs: &Observation) -> Weight {
    if obs.canary.ready_replicas == 0 {
        Weight::ZERO
    } else {
        weight
    }
}

fn promote(s: &RolloutState, obs: &Observation) -> Next {
    let mut state = s.clone();
    let target = if s.weight < Weight::FULL {
        // First all traffic to the canary, once it has the stable's capacity.
        if obs.canary.available && obs.canary.ready_replicas >= obs.stable_replicas.max(1) {
            state.weight = Weight::FULL;
            state.message = "promoting: all traffic on the canary".to_owned();
        } else {
            state.message = format!(
                "promoting: waiting for {} ready canary pods before moving all traffic",
                obs.stable_replicas.max(1)
            );
        }
        Target::Canary {
            size: Weight::FULL,
            weight: routable(state.weight, obs),
        }
    } else if obs.held || !obs.stable_rolled_out {
        state.message = format!(
            "promoting: {} is rolling out the canary's template",
            obs.name
        );
        Target::Promote
    } else {
        state.phase = Phase::Succeeded;
        state.weight = Weight::ZERO;
        state.message = format!("promoted: {} runs template {}", obs.name, s.hash);
        return Next {
            event: Some(info("Promoted", state.message.clone())),
            state: Some(state),
            target: Target::Nothing,
            requeue: None,
        };
    };
    Next {
        state: Some(state),
        target,
        requeue: None,
        event: None,
    }
}

/// The time from `earlier` to `later` to the nanosecond (stored times keep their fraction), zero
/// if the clock went back. Whole seconds would end a pause up to a second early.
fn elapsed(earlier: Timestamp, later: Timestamp) -> Duration {
    Duration::try_from(later.duration_since(earlier)).unwrap_or(Duration::ZERO)
}

/// `d` rounded up to whole seconds, for people: a pause with 0.4 s left says `1s`, not `0s`.
fn shown(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

/// The time left in a timed pause of length `length` that started at `started`, as the machine
/// counts it (to the nanosecond) and rounded up to whole seconds for display: `fledge status`
/// shows this very figure.
pub fn pause_left(started: Timestamp, length: Duration, now: Timestamp) -> Duration {
    shown(length.saturating_sub(elapsed(started, now)))
}

/// What a user asks with `fledge promote|abort|retry NAME`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// End the current pause (timed or `pause: {}`).
    Promote,
    /// Traffic back to stable, canary removed; the template stays aborted.
    Abort,
    /// Start an aborted canary again from step 1.
    Retry,
}

impl Command {
    /// The Event announcing that this command produced `state`.
    pub fn event(self, state: &RolloutState) -> Event {
        let reason = match self {
            Command::Promote => "Resumed",
            Command::Abort => "Aborted",
            Command::Retry => "Retried",
        };
        Event {
            reason,
            message: state.message.clone(),
            warning: self == Command::Abort,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CommandRefused(pub String);

/// The state after a user's command, or why the command does not apply now.
pub fn command(
    state: Option<&RolloutState>,
    spec: &CanarySpec,
    cmd: Command,
    name: &str,
    now: Timestamp,
) -> Result<RolloutState, CommandRefused> {
    let refuse = |why: String| Err(CommandRefused(why));
    let Some(s) = state else {
        return refuse(format!("{name} has no canary"));
    };
    let position = format!("step {}/{}", s.step + 1, spec.steps.len());
    match (cmd, s.phase) {
        (Command::Promote, Phase::Progressing | Phase::Paused) => match spec.steps.get(s.step) {
            Some(Step::PauseFor(_) | Step::PauseUntilPromoted) => Ok(RolloutState {
                phase: Phase::Progressing,
                step: s.step + 1,
                step_started: Some(now),
                message: format!("{position}: pause ended by `fledge promote`"),
                ..s.clone()
            }),
            _ => refuse(format!(
                "{name} is not paused ({position}, phase {}); `fledge promote` ends a pause",
                s.phase
            )),
        },
        (Command::Abort, Phase::Progressing | Phase::Paused) => Ok(RolloutState {
            phase: Phase::Aborted,
            weight: Weight::ZERO,
            unavailable_since: None,
            message: format!(
                "aborted by `fledge abort` at {position}: traffic back to stable. {}",
                how_to_go_on(name)
            ),
            ..s.clone()
        }),
        (Command::Abort, Phase::Promoting) => refuse(format!(
            "{name} is being promoted: its template is becoming the stable one and can no longer be aborted"
        )),
        (Command::Retry, Phase::Aborted) => Ok(RolloutState {
            phase: Phase::Progressing,
            step: 0,
            weight: Weight::ZERO,
            step_started: Some(now),
            unavailable_since: Some(now),
            message: format!("canary {} retried by `fledge retry`", s.hash),
            ..s.clone()
        }),
        (Command::Retry, phase) => refuse(format!(
            "{name} is {phase}, not Aborted; `fledge retry` restarts an aborted canary"
        )),
        (_, Phase::Aborted) => refuse(format!(
            "{name}'s canary was aborted; `fledge retry {name}` starts it again"
        )),
        (_, phase) => refuse(format!("{name} has no canary in progress (phase {phase})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::objects::canary_replicas;
    use crate::core::spec::Step::{PauseFor, PauseUntilPromoted, SetWeight};
    use k8s_openapi::jiff::SignedDuration;

    const STABLE: &str = "stable-hash";
    const V2: &str = "v2-hash";
    const V3: &str = "v3-hash";
    /// A canary Deployment with no ready pod.
    const NO_CANARY_POD: CanaryStatus = CanaryStatus {
        available: false,
        ready_replicas: 0,
    };

    fn w(bp: u16) -> Weight {
        Weight::from_basis_points(bp).unwrap()
    }

    fn t(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    /// The brief's example: 5 %, 2 minutes, 50 %, wait for promote, 100 %.
    fn spec() -> CanarySpec {
        CanarySpec {
            steps: vec![
                SetWeight(w(500)),
                PauseFor(Duration::from_secs(120)),
                SetWeight(w(5000)),
                PauseUntilPromoted,
                SetWeight(Weight::FULL),
            ],
            root_service: "web".into(),
            router: Router::Smi,
            checks: Vec::new(),
        }
    }

    fn obs<'a>(spec: &'a CanarySpec) -> Observation<'a> {
        Observation {
            name: "web",
            spec: Some(spec),
            template_hash: V2,
            stable_hash: Some(STABLE),
            held: true,
            stable_replicas: 4,
            progress_deadline: Duration::from_secs(600),
            canary: CanaryStatus {
                available: true,
                ready_replicas: 4,
            },
            stable_rolled_out: true,
        }
    }

    fn state(phase: Phase, step: usize, weight: Weight) -> RolloutState {
        RolloutState {
            phase,
            hash: V2.into(),
            step,
            weight,
            message: String::new(),
            step_started: Some(t(0)),
            unavailable_since: None,
            saved_routes: Default::default(),
        }
    }

    /// A new canary at step 1, not available since `since`.
    fn waiting_since(since: Timestamp) -> RolloutState {
        RolloutState {
            unavailable_since: Some(since),
            ..state(Phase::Progressing, 0, Weight::ZERO)
        }
    }

    /// [`obs`] with a canary Deployment that has no ready pod.
    fn without_canary_pods(spec: &CanarySpec) -> Observation<'_> {
        Observation {
            canary: NO_CANARY_POD,
            ..obs(spec)
        }
    }

    fn phase_of(n: &Next) -> Option<Phase> {
        n.state.as_ref().map(|s| s.phase)
    }

    #[test]
    fn opting_out_removes_everything_and_forgets_the_state() {
        for phase in [
            Phase::Progressing,
            Phase::Paused,
            Phase::Promoting,
            Phase::Aborted,
            Phase::Succeeded,
        ] {
            let spec = spec();
            let o = Observation {
                spec: None,
                ..obs(&spec)
            };
            let n = next(Some(&state(phase, 1, w(500))), &o, t(10));
            assert_eq!(
                (n.state.clone(), n.target),
                (None, Target::Nothing),
                "{phase}"
            );
            assert_eq!(n.event.is_some(), in_flight(phase), "{phase}");
        }
    }

    #[test]
    fn nothing_pending_means_nothing_to_run() {
        let spec = spec();
        let o = Observation {
            stable_hash: None,
            held: false,
            ..obs(&spec)
        };
        assert_eq!(next(None, &o, t(0)), settled(None));
        let done = state(Phase::Succeeded, 5, Weight::ZERO);
        assert_eq!(next(Some(&done), &o, t(0)), settled(Some(&done)));
        let already_stable = Observation {
            template_hash: STABLE,
            ..obs(&spec)
        };
        assert_eq!(next(None, &already_stable, t(0)).target, Target::Nothing);
        // Paused by the user with a change pending: the canary waits for them.
        let user_paused = Observation {
            held: false,
            ..obs(&spec)
        };
        assert_eq!(next(None, &user_paused, t(0)), settled(None));
    }

    #[test]
    fn a_revert_rolls_back_whatever_was_pending_running_or_aborted() {
        let spec = spec();
        let reverted = Observation {
            template_hash: STABLE,
            stable_hash: None,
            held: false,
            ..obs(&spec)
        };
        for phase in [
            Phase::Progressing,
            Phase::Paused,
            Phase::Promoting,
            Phase::Aborted,
        ] {
            let n = next(Some(&state(phase, 3, w(5000))), &reverted, t(9));
            let s = n.state.clone().unwrap();
            assert_eq!(
                (s.phase, s.weight, n.target),
                (Phase::RolledBack, Weight::ZERO, Target::Nothing),
                "{phase}"
            );
            assert_eq!(n.event.unwrap().reason, "RolledBack");
            assert!(s.message.starts_with("rolled back"), "{}", s.message);
            // Settled: it stays so.
            assert_eq!(next(Some(&s), &reverted, t(10)), settled(Some(&s)));
            // Applying the reverted template again later is a fresh canary.
            let n = next(Some(&s), &obs(&spec), t(11));
            let fresh = n.state.unwrap();
            assert_eq!((fresh.phase, fresh.step), (Phase::Progressing, 0));
        }
    }

    #[test]
    fn a_pending_template_starts_at_zero_weight() {
        let spec = spec();
        let n = next(None, &obs(&spec), t(7));
        let s = n.state.unwrap();
        assert_eq!(
            (s.phase, s.hash.as_str(), s.step, s.weight),
            (Phase::Progressing, V2, 0, Weight::ZERO)
        );
        assert_eq!(
            (s.step_started, s.unavailable_since),
            (Some(t(7)), Some(t(7)))
        );
        assert_eq!(
            n.target,
            Target::Canary {
                size: Weight::ZERO,
                weight: Weight::ZERO
            }
        );
        assert_eq!(n.event.unwrap().reason, "CanaryStarted");
        assert_eq!(n.requeue, Some(Duration::from_secs(600)));
    }

    #[test]
    fn a_new_template_mid_canary_restarts_at_step_one() {
        let spec = spec();
        let o = Observation {
            template_hash: V3,
            ..obs(&spec)
        };
        for phase in [Phase::Progressing, Phase::Paused, Phase::Promoting] {
            let n = next(Some(&state(phase, 3, w(5000))), &o, t(50));
            let s = n.state.unwrap();
            assert_eq!(
                (s.phase, s.hash.as_str(), s.step, s.weight),
                (Phase::Progressing, V3, 0, Weight::ZERO)
            );
            assert_eq!(n.event.unwrap().reason, "CanaryReplaced", "{phase}");
        }
        for phase in [Phase::Aborted, Phase::Succeeded, Phase::Idle] {
            let n = next(Some(&state(phase, 3, Weight::ZERO)), &o, t(50));
            assert_eq!(n.event.unwrap().reason, "CanaryStarted", "{phase}");
        }
    }

    #[test]
    fn an_aborted_template_stays_aborted() {
        let spec = spec();
        let aborted = state(Phase::Aborted, 2, Weight::ZERO);
        let n = next(Some(&aborted), &obs(&spec), t(1000));
        assert_eq!(n, settled(Some(&aborted)));
    }

    #[test]
    fn weight_moves_only_once_the_canary_is_available() {
        let spec = spec();
        let s = waiting_since(t(0));
        let waiting = without_canary_pods(&spec);
        let n = next(Some(&s), &waiting, t(100));
        assert_eq!(
            n.target,
            Target::Canary {
                size: w(500),
                weight: Weight::ZERO
            }
        );
        assert_eq!(n.requeue, Some(Duration::from_secs(500)));
        assert_eq!(phase_of(&n), Some(Phase::Progressing));
        let n = next(Some(&s), &obs(&spec), t(100));
        let after = n.state.unwrap();
        assert_eq!(
            (after.step, after.weight, after.unavailable_since),
            (1, w(500), None)
        );
        assert_eq!(
            n.target,
            Target::Canary {
                size: w(500),
                weight: w(500)
            }
        );
        assert_eq!(n.event.unwrap().reason, "WeightSet");
    }

    #[test]
    fn the_progress_deadline_aborts() {
        let spec = spec();
        let s = waiting_since(t(0));
        let waiting = without_canary_pods(&spec);
        let n = next(Some(&s), &waiting, t(600));
        assert_eq!(phase_of(&n), Some(Phase::Aborted));
        assert_eq!(n.target, Target::Nothing);
        let event = n.event.unwrap();
        assert!(event.warning);
        assert_eq!(event.reason, "ProgressDeadlineExceeded");
        assert!(
            event
                .message
                .contains("within 600s (progressDeadlineSeconds)"),
            "{}",
            event.message
        );
    }

    #[test]
    fn a_canary_that_loses_its_pods_gets_no_traffic_but_keeps_its_place() {
        let spec = spec();
        let s = state(Phase::Paused, 3, w(5000));
        let broken = without_canary_pods(&spec);
        let n = next(Some(&s), &broken, t(10));
        assert_eq!(
            n.target,
            Target::Canary {
                size: w(5000),
                weight: Weight::ZERO
            }
        );
        let kept = n.state.unwrap();
        assert_eq!(
            (kept.step, kept.weight, kept.unavailable_since),
            (3, w(5000), Some(t(10)))
        );
        let degraded = Observation {
            canary: CanaryStatus {
                available: false,
                ready_replicas: 1,
            },
            ..obs(&spec)
        };
        assert_eq!(
            next(Some(&s), &degraded, t(10)).target,
            Target::Canary {
                size: w(5000),
                weight: w(5000)
            }
        );
    }

    #[test]
    fn set_weight_waits_for_capacity() {
        let spec = spec();
        let s = state(Phase::Progressing, 2, w(500));
        let small = Observation {
            canary: CanaryStatus {
                available: true,
                ready_replicas: 1,
            },
            ..obs(&spec)
        };
        let n = next(Some(&s), &small, t(10));
        assert_eq!(
            n.target,
            Target::Canary {
                size: w(5000),
                weight: w(500)
            }
        );
        assert_eq!(n.state.as_ref().unwrap().step, 2);
        assert!(
            n.state
                .unwrap()
                .message
                .contains("waiting for 2 ready canary pods")
        );
        let enough = Observation {
            canary: CanaryStatus {
                available: true,
                ready_replicas: 2,
            },
            ..obs(&spec)
        };
        assert_eq!(
            next(Some(&s), &enough, t(10)).target,
            Target::Canary {
                size: w(5000),
                weight: w(5000)
            }
        );
    }

    #[test]
    fn timed_pauses_count_from_the_stored_start() {
        let spec = spec();
        let s = state(Phase::Progressing, 1, w(500));
        let n = next(Some(&s), &obs(&spec), t(30));
        assert_eq!(phase_of(&n), Some(Phase::Paused));
        assert_eq!(n.requeue, Some(Duration::from_secs(90)));
        assert!(n.state.as_ref().unwrap().message.contains("1m30s left"));
        // A controller started anew sees the same stored start: no lost or replayed pause time.
        let restarted = n.state.unwrap();
        assert_eq!(
            next(Some(&restarted), &obs(&spec), t(119)).requeue,
            Some(Duration::from_secs(1))
        );
        let n = next(Some(&restarted), &obs(&spec), t(120));
        let s = n.state.unwrap();
        assert_eq!(
            (s.phase, s.step, s.step_started),
            (Phase::Progressing, 2, Some(t(120)))
        );
    }

    #[test]
    fn a_pause_lasts_its_whole_length_to_the_fraction_of_a_second() {
        let spec = spec();
        let started = t(0) + SignedDuration::from_millis(900);
        let mut s = state(Phase::Paused, 1, w(500));
        s.step_started = Some(started);
        // Stored and read back, as a restarted controller reads it: the fraction stays.
        let s: RolloutState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(s.step_started, Some(started));
        // 119.1 s into a 2m pause whose start was at .9: whole seconds would say 120 and end it.
        let n = next(Some(&s), &obs(&spec), t(120));
        assert_eq!(phase_of(&n), Some(Phase::Paused));
        assert_eq!(n.requeue, Some(Duration::from_millis(900)));
        assert!(n.state.unwrap().message.contains("paused, 1s left"));
        let n = next(
            Some(&s),
            &obs(&spec),
            started + SignedDuration::from_secs(120),
        );
        assert_eq!(n.state.unwrap().step, 2);
    }

    #[test]
    fn the_progress_deadline_is_not_cut_short_by_whole_seconds() {
        let spec = spec();
        let s = waiting_since(t(0) + SignedDuration::from_millis(999));
        let o = Observation {
            progress_deadline: Duration::from_secs(10),
            ..without_canary_pods(&spec)
        };
        let n = next(Some(&s), &o, t(10));
        assert_eq!(phase_of(&n), Some(Phase::Progressing));
        assert_eq!(n.requeue, Some(Duration::from_millis(999)));
        let n = next(Some(&s), &o, t(11));
        assert_eq!(phase_of(&n), Some(Phase::Aborted));
    }

    #[test]
    fn commands_are_announced_with_their_own_reason_and_the_stored_message() {
        let spec = spec();
        let paused = state(Phase::Paused, 3, w(5000));
        let aborted = command(Some(&paused), &spec, Command::Abort, "web", t(1)).unwrap();
        let e = Command::Abort.event(&aborted);
        assert_eq!((e.reason, e.warning), ("Aborted", true));
        assert_eq!(e.message, aborted.message);
        let retried = command(Some(&aborted), &spec, Command::Retry, "web", t(2)).unwrap();
        assert_eq!(Command::Retry.event(&retried).reason, "Retried");
        let resumed = command(Some(&paused), &spec, Command::Promote, "web", t(3)).unwrap();
        let e = Command::Promote.event(&resumed);
        assert_eq!((e.reason, e.warning), ("Resumed", false));
    }

    #[test]
    fn an_indefinite_pause_waits_for_promote() {
        let spec = spec();
        let s = state(Phase::Progressing, 3, w(5000));
        let n = next(Some(&s), &obs(&spec), t(10_000));
        assert_eq!((phase_of(&n), n.requeue), (Some(Phase::Paused), None));
        let paused = n.state.unwrap();
        assert_eq!(
            next(Some(&paused), &obs(&spec), t(99_999)).state.unwrap(),
            paused
        );
        let promoted = command(Some(&paused), &spec, Command::Promote, "web", t(20_000)).unwrap();
        assert_eq!(
            (promoted.phase, promoted.step, promoted.step_started),
            (Phase::Progressing, 4, Some(t(20_000)))
        );
    }

    #[test]
    fn promotion_moves_traffic_then_the_template_then_traffic_back() {
        let spec = spec();
        let done = state(Phase::Progressing, 5, Weight::FULL);
        let n = next(Some(&done), &obs(&spec), t(0));
        assert_eq!(phase_of(&n), Some(Phase::Promoting));
        let promoting = n.state.unwrap();
        // Stable template not yet the canary's: write it, traffic stays on the canary.
        assert_eq!(
            next(Some(&promoting), &obs(&spec), t(1)).target,
            Target::Promote
        );
        // Unpaused (the hold record gone with it), the Deployment still rolling out.
        let rolling = Observation {
            stable_hash: None,
            held: false,
            stable_rolled_out: false,
            ..obs(&spec)
        };
        assert_eq!(
            next(Some(&promoting), &rolling, t(2)).target,
            Target::Promote
        );
        let rolled = Observation {
            stable_rolled_out: true,
            ..rolling
        };
        let n = next(Some(&promoting), &rolled, t(3));
        assert_eq!(
            (phase_of(&n), n.target),
            (Some(Phase::Succeeded), Target::Nothing)
        );
        assert_eq!(n.event.unwrap().reason, "Promoted");
        // And it stays done.
        let succeeded = n.state.unwrap();
        assert_eq!(
            next(Some(&succeeded), &rolled, t(4)),
            settled(Some(&succeeded))
        );
    }

    #[test]
    fn promotion_waits_for_full_canary_capacity_before_moving_all_traffic() {
        let spec = CanarySpec {
            steps: vec![SetWeight(w(1000))],
            root_service: "web".into(),
            router: Router::Smi,
            checks: Vec::new(),
        };
        let s = state(Phase::Promoting, 1, w(1000));
        let small = Observation {
            canary: CanaryStatus {
                available: true,
                ready_replicas: 1,
            },
            ..obs(&spec)
        };
        let n = next(Some(&s), &small, t(0));
        assert_eq!(
            n.target,
            Target::Canary {
                size: Weight::FULL,
                weight: w(1000)
            }
        );
        let n = next(Some(&s), &obs(&spec), t(0));
        assert_eq!(
            n.target,
            Target::Canary {
                size: Weight::FULL,
                weight: Weight::FULL
            }
        );
    }

    #[test]
    fn commands_apply_only_where_they_make_sense() {
        let spec = spec();
        let at = |phase, step| state(phase, step, w(500));
        let err = |s: Option<&RolloutState>, c| command(s, &spec, c, "web", t(0)).unwrap_err().0;
        assert_eq!(err(None, Command::Promote), "web has no canary");
        assert_eq!(
            err(Some(&at(Phase::Progressing, 0)), Command::Promote),
            "web is not paused (step 1/5, phase Progressing); `fledge promote` ends a pause"
        );
        assert!(
            err(Some(&at(Phase::Promoting, 5)), Command::Abort)
                .contains("can no longer be aborted")
        );
        assert_eq!(
            err(Some(&at(Phase::Aborted, 2)), Command::Promote),
            "web's canary was aborted; `fledge retry web` starts it again"
        );
        assert_eq!(
            err(Some(&at(Phase::Succeeded, 5)), Command::Retry),
            "web is Succeeded, not Aborted; `fledge retry` restarts an aborted canary"
        );
        assert_eq!(
            err(Some(&at(Phase::Succeeded, 5)), Command::Abort),
            "web has no canary in progress (phase Succeeded)"
        );
        // A timed pause can be cut short too.
        let timed = command(
            Some(&at(Phase::Paused, 1)),
            &spec,
            Command::Promote,
            "web",
            t(5),
        )
        .unwrap();
        assert_eq!(timed.step, 2);
        let aborted = command(
            Some(&at(Phase::Paused, 3)),
            &spec,
            Command::Abort,
            "web",
            t(5),
        )
        .unwrap();
        assert_eq!(
            (aborted.phase, aborted.weight),
            (Phase::Aborted, Weight::ZERO)
        );
        let retried = command(Some(&aborted), &spec, Command::Retry, "web", t(9)).unwrap();
        assert_eq!(
            (
                retried.phase,
                retried.step,
                retried.weight,
                retried.unavailable_since
            ),
            (Phase::Progressing, 0, Weight::ZERO, Some(t(9)))
        );
    }

    /// A tiny ideal cluster: the canary is available at the size asked for, promotion rolls out at
    /// once. Drives `next` (and `fledge promote` where it waits) to the end, storing the state as
    /// JSON between calls exactly as the annotation does: a controller restarted at any call sees
    /// only what was stored, so the history must be the same.
    fn walk(spec: &CanarySpec) -> (Vec<Weight>, Vec<&'static str>) {
        let mut stored: Option<String> = None;
        let mut now = 0;
        let mut held = true;
        let mut canary_ready = 0;
        let mut weights = vec![];
        let mut events = vec![];
        for _ in 0..200 {
            let state: Option<RolloutState> =
                stored.as_deref().map(|j| serde_json::from_str(j).unwrap());
            let o = Observation {
                stable_hash: held.then_some(STABLE),
                held,
                canary: CanaryStatus {
                    available: canary_ready > 0,
                    ready_replicas: canary_ready,
                },
                ..obs(spec)
            };
            let n = next(state.as_ref(), &o, t(now));
            events.extend(n.event.iter().map(|e| e.reason));
            match n.target {
                Target::Canary { size, weight } => {
                    canary_ready = canary_replicas(o.stable_replicas, size.max(weight));
                    weights.push(weight);
                }
                // The unpause: the hold record goes with it.
                Target::Promote => held = false,
                Target::Nothing => weights.push(Weight::ZERO),
            }
            let next_state = n.state.clone();
            if next_state
                .as_ref()
                .is_some_and(|s| s.phase == Phase::Succeeded)
            {
                break;
            }
            let waiting = next_state == state;
            stored = next_state.map(|s| serde_json::to_string(&s).unwrap());
            if waiting {
                match n.requeue {
                    Some(d) => now += d.as_secs() as i64,
                    None => {
                        let s: RolloutState =
                            serde_json::from_str(stored.as_deref().unwrap()).unwrap();
                        let promoted =
                            command(Some(&s), spec, Command::Promote, "web", t(now)).unwrap();
                        stored = Some(serde_json::to_string(&promoted).unwrap());
                        events.push(Command::Promote.event(&promoted).reason);
                    }
                }
            }
        }
        weights.dedup();
        (weights, events)
    }

    #[test]
    fn the_whole_rollout_has_the_expected_history() {
        let (weights, events) = walk(&spec());
        assert_eq!(
            weights,
            vec![Weight::ZERO, w(500), w(5000), Weight::FULL, Weight::ZERO]
        );
        assert_eq!(
            events,
            vec![
                "CanaryStarted",
                "WeightSet",
                "Paused",
                "PauseEnded",
                "WeightSet",
                "Paused",
                "Resumed",
                "WeightSet",
                "Promoting",
                "Promoted"
            ]
        );
        assert_eq!(events.iter().filter(|e| **e == "Promoted").count(), 1);
    }

    /// Every phase × step × weight × hash of a stored state (and none) against every kind of
    /// observation at three moments: the rules that must hold whatever happens.
    #[test]
    fn every_state_against_every_observation_keeps_the_rules() {
        let spec = spec();
        let total = spec.steps.len();
        let allowed_weights: Vec<Weight> = [Weight::ZERO, Weight::FULL]
            .into_iter()
            .chain(spec.steps.iter().filter_map(|s| match s {
                SetWeight(w) => Some(*w),
                _ => None,
            }))
            .collect();
        let mut states: Vec<RolloutState> = Phase::ALL
            .into_iter()
            .flat_map(|phase| (0..=total).map(move |step| state(phase, step, Weight::ZERO)))
            .collect();
        states = vary(
            states,
            [Weight::ZERO, w(500), w(5000), Weight::FULL],
            |s, w| s.weight = w,
        );
        states = vary(states, [V2, V3], |s, hash| s.hash = hash.into());
        states = vary(states, [None, Some(t(0))], |s, since| {
            s.unavailable_since = since
        });
        let states: Vec<Option<RolloutState>> = std::iter::once(None)
            .chain(states.into_iter().map(Some))
            .collect();
        let mut observations = vary(vec![obs(&spec)], [None, Some(&spec)], |o, spec| {
            o.spec = spec
        });
        observations = vary(observations, [V2, V3, STABLE], |o, h| o.template_hash = h);
        observations = vary(observations, [None, Some(STABLE), Some(V2)], |o, h| {
            o.stable_hash = h
        });
        observations = vary(observations, [false, true], |o, held| o.held = held);
        let canaries = [
            NO_CANARY_POD,
            CanaryStatus {
                available: false,
                ready_replicas: 1,
            },
            CanaryStatus {
                available: true,
                ready_replicas: 1,
            },
            CanaryStatus {
                available: true,
                ready_replicas: 4,
            },
        ];
        observations = vary(observations, canaries, |o, c| o.canary = c);
        observations = vary(observations, [false, true], |o, r| o.stable_rolled_out = r);
        let mut cases = 0;
        for stored in &states {
            for o in &observations {
                for now in [t(0), t(60), t(10_000)] {
                    let n = next(stored.as_ref(), o, now);
                    check_rules(stored.as_ref(), o, &n, &allowed_weights);
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, states.len() * 2 * 3 * 3 * 2 * 4 * 2 * 3);
    }

    /// Each of `items` once with each of `values` set by `set`: one more dimension of a grid.
    fn vary<T: Clone, V: Copy>(
        items: Vec<T>,
        values: impl IntoIterator<Item = V> + Clone,
        set: impl Fn(&mut T, V),
    ) -> Vec<T> {
        items
            .into_iter()
            .flat_map(|item| {
                values.clone().into_iter().map({
                    let set = &set;
                    move |v| {
                        let mut varied = item.clone();
                        set(&mut varied, v);
                        varied
                    }
                })
            })
            .collect()
    }

    fn check_rules(stored: Option<&RolloutState>, o: &Observation, n: &Next, weights: &[Weight]) {
        let case = format!("{stored:?} with {o:?} gave {n:?}");
        // Not opted in: nothing of fledge's, no state.
        if o.spec.is_none() {
            assert!(n.state.is_none() && n.target == Target::Nothing, "{case}");
            return;
        }
        // No traffic to a canary without a ready pod.
        if let Target::Canary { weight, .. } = n.target {
            assert!(
                weight == Weight::ZERO || o.canary.ready_replicas > 0,
                "{case}"
            );
        }
        // An opted-in Deployment keeps its state; without one there is nothing to run.
        let Some(next_state) = &n.state else {
            assert!(stored.is_none() && n.target == Target::Nothing, "{case}");
            return;
        };
        // Weights are only ever 0, 100 % or a step's.
        assert!(weights.contains(&next_state.weight), "{case}");
        let settled_phase =
            |p: Phase| matches!(p, Phase::Idle | Phase::Succeeded | Phase::RolledBack);
        // A revert: whatever was pending, running or aborted is rolled back, traffic on stable.
        if let Some(s) = stored
            && o.pending().is_none()
            && (in_flight(s.phase) || s.phase == Phase::Aborted)
            && !(s.phase == Phase::Promoting && s.hash == o.template_hash)
        {
            assert_eq!(next_state.phase, Phase::RolledBack, "{case}");
            assert_eq!(
                (next_state.weight, n.target),
                (Weight::ZERO, Target::Nothing),
                "{case}"
            );
            assert!(n.event.is_some(), "{case}");
        }
        match stored {
            Some(s) if s.hash == next_state.hash => {
                // One step at a time, never backwards; or a fresh canary of a settled template.
                let fresh = settled_phase(s.phase)
                    && (next_state.phase, next_state.step) == (Phase::Progressing, 0);
                assert!(
                    fresh || next_state.step == s.step || next_state.step == s.step + 1,
                    "{case}"
                );
                // Settled rollouts stay settled, with nothing running, until a change is held.
                if settled_phase(s.phase) && !(o.held && o.pending() == Some(s.hash.as_str())) {
                    assert_eq!(next_state, s, "{case}");
                    assert_eq!(n.target, Target::Nothing, "{case}");
                }
                // An aborted template stays aborted while it is the held one.
                if s.phase == Phase::Aborted && o.pending() == Some(s.hash.as_str()) {
                    assert_eq!(next_state, s, "{case}");
                    assert_eq!(n.target, Target::Nothing, "{case}");
                }
                // Every change of phase or step is announced.
                if (s.phase, s.step) != (next_state.phase, next_state.step) {
                    assert!(n.event.is_some(), "{case}");
                }
            }
            // A new canary starts at step 1 with no traffic, and says so.
            _ if next_state.phase == Phase::Progressing => {
                assert_eq!(
                    (next_state.step, next_state.weight),
                    (0, Weight::ZERO),
                    "{case}"
                );
                assert!(n.event.is_some(), "{case}");
            }
            _ => assert_eq!(Some(next_state), stored, "{case}"),
        }
        // Promotion rewrites the stable template only with all traffic on a canary that has pods.
        if n.target == Target::Promote {
            assert_eq!(next_state.phase, Phase::Promoting, "{case}");
            assert_eq!(next_state.weight, Weight::FULL, "{case}");
        }
    }

    #[test]
    fn fractional_weights_are_exact() {
        let spec = CanarySpec {
            steps: vec![
                SetWeight(w(1)),
                SetWeight(w(25)),
                PauseFor(Duration::from_secs(5)),
            ],
            root_service: "web".into(),
            router: Router::Smi,
            checks: Vec::new(),
        };
        let (weights, _) = walk(&spec);
        assert_eq!(
            weights,
            vec![Weight::ZERO, w(1), w(25), Weight::FULL, Weight::ZERO]
        );
    }
}
