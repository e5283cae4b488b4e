//! The rollout state machine: stored state + what the controller observed + now → next state, the
//! objects to converge to, and when to look again. Pure: the controller does the IO around it.
//!
//! Every call takes at most one step, so each weight is written and observable; the controller
//! calls again at once whenever the state changed.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::{Phase, RolloutState};
use crate::core::analysis::Check;
use crate::core::analysis::schedule::{CheckRun, CheckRuns, RunPhase};
use crate::core::objects::canary_pods;
use crate::core::podratio::PodShare;
use crate::core::policy::Policy;
use crate::core::policy::window::WindowState;
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
    /// The policy that governs the Deployment now; a canary that starts keeps it in its state.
    pub policy: Option<&'a Policy>,
    /// The policy fixed into this canary's settings (`spec.policy`) has been deleted: the canary holds.
    pub policy_missing: bool,
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
    /// The events of the transitions passed through on the way, announced before `event`: a
    /// pause that ends goes on to its next step in the same pass, and a weight set goes on into
    /// the pause after it.
    pub passed_through: Vec<Event>,
}

impl Next {
    /// The events to announce, in order.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.passed_through.iter().chain(&self.event)
    }
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
            passed_through: Vec::new(),
        };
    };
    match (state, obs.pending()) {
        (Some(s), Some(pending)) if s.hash == pending => match s.phase {
            Phase::Progressing | Phase::Paused => {
                // The next step falls due when the pause ends, not a state write and a watch
                // event later: the weight it sets is written in this pass.
                let n = go_on(
                    progress(s, spec, obs, now),
                    "PauseEnded",
                    |_| true,
                    spec,
                    obs,
                    now,
                );
                // A pause after a weight starts with that weight's write: one state to store
                // for both, and the canary grows for the weight after the pause at once.
                go_on(
                    n,
                    "WeightSet",
                    |after| after.phase == Phase::Paused,
                    spec,
                    obs,
                    now,
                )
            }
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

/// `n`, or, when its event is `reason`, the step after it in the same pass if that step's state
/// satisfies `then`; `n`'s events are then passed through.
fn go_on(
    n: Next,
    reason: &str,
    then: impl Fn(&RolloutState) -> bool,
    spec: &CanarySpec,
    obs: &Observation,
    now: Timestamp,
) -> Next {
    let (Some(event), Some(after)) = (&n.event, &n.state) else {
        return n;
    };
    if event.reason != reason {
        return n;
    }
    let then_next = progress(after, spec, obs, now);
    match &then_next.state {
        Some(then_state) if then(then_state) => {
            let mut passed_through = n.passed_through;
            passed_through.extend(n.event);
            passed_through.extend(then_next.passed_through);
            Next {
                passed_through,
                ..then_next
            }
        }
        _ => n,
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
        passed_through: Vec::new(),
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
        passed_through: Vec::new(),
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
        checks: CheckRuns::new(),
        // The policy as it is now is this canary's for good.
        policy: obs.policy.cloned().map(Box::new),
    };
    Next {
        state: Some(state),
        target: Target::Canary {
            size: Weight::ZERO,
            weight: Weight::ZERO,
        },
        requeue: Some(obs.progress_deadline),
        passed_through: Vec::new(),
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
    // A timed pause sizes the canary for the weight after it: its end is known, and the pods that
    // weight needs are then ready when it comes, instead of holding the step while they start.
    // Not with pod ratio, where the canary's pods are its traffic.
    let ahead = match spec.router {
        Router::PodRatio => None,
        Router::Smi | Router::GatewayApi { .. } => spec.steps.get(s.step + 1),
    };
    let size = match (spec.steps.get(s.step), ahead) {
        (Some(Step::SetWeight(w)), _) | (Some(Step::PauseFor(_)), Some(Step::SetWeight(w))) => {
            (*w).max(s.weight)
        }
        _ => s.weight,
    };
    // While a timed pause grows the canary for the next weight, the pods of the current weight
    // are what it needs: the scale-up is not an outage to record, and the next step waits for
    // the rest (with its own deadline) only if they are not ready when the pause ends.
    let growing = matches!(spec.steps.get(s.step), Some(Step::PauseFor(_))) && size > s.weight;
    let serves_current = growing
        && obs.canary.ready_replicas
            >= canary_pods(&spec.router, obs.stable_replicas, s.weight).max(1);
    if !obs.canary.available && !serves_current {
        return unavailable(s, size, obs, now);
    }
    let mut state = RolloutState {
        unavailable_since: None,
        ..s.clone()
    };
    let hold = |state: RolloutState, requeue: Option<Duration>| Next {
        passed_through: Vec::new(),
        target: Target::Canary {
            size,
            weight: state.weight,
        },
        state: Some(state),
        requeue,
        event: None,
    };
    let total = spec.steps.len();
    start_runs(&mut state, spec, now);
    if let Some(stopped) = stopped_by_checks(s, state.clone(), spec, obs, size) {
        return stopped;
    }
    let position = if s.step < total {
        format!("step {}/{total}", s.step + 1)
    } else {
        format!("all {total} steps done")
    };
    if obs.policy_missing {
        let policy = spec
            .policy
            .as_ref()
            .map_or_else(|| "its policy".to_owned(), ToString::to_string);
        state.phase = Phase::Paused;
        state.message = format!(
            "{position}: {policy} was deleted; the canary holds at {}% (recreate it to go on, or `fledge abort {}`)",
            state.weight, obs.name
        );
        let news = s.message != state.message;
        return Next {
            event: news.then(|| Event {
                warning: true,
                ..info("PolicyMissing", state.message.clone())
            }),
            ..hold(state, None)
        };
    }
    // Outside the policy's promotion windows, neither more weight nor the promotion.
    let closed = |mut state: RolloutState, what: &str| {
        let WindowState::OpensAt(opens) = spec.windows.at(now) else {
            return None;
        };
        let policy = spec
            .policy
            .as_ref()
            .map_or_else(String::new, |p| format!(" of {p}"));
        state.phase = Phase::Paused;
        state.message = format!(
            "{position}: {what} waits for the promotion windows{policy}; the next opens {}",
            WindowState::OpensAt(opens.clone())
        );
        let news = s.message != state.message;
        let wait = Duration::try_from(opens.timestamp().duration_since(now)).unwrap_or_default();
        Some(Next {
            event: news.then(|| info("OutsidePromotionWindow", state.message.clone())),
            ..hold(state, Some(wait))
        })
    };
    let Some(step) = spec.steps.get(s.step) else {
        let unfinished = unfinished_runs(&state, spec, |check, run| {
            run.step.is_none() && check.count.is_some()
        });
        if !unfinished.is_empty() {
            state.message = format!(
                "all {total} steps done: waiting for background analysis {} before promoting",
                unfinished.join(", ")
            );
            return hold(state, None);
        }
        if let Some(wait) = closed(state.clone(), "the promotion") {
            return wait;
        }
        // Background checks measure until the steps end.
        for run in state.checks.values_mut() {
            if run.phase == RunPhase::Running {
                run.phase = RunPhase::Successful;
            }
        }
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
    match step {
        Step::SetWeight(w) => {
            if *w > s.weight
                && let Some(wait) = closed(state.clone(), &format!("{w}% of traffic"))
            {
                return wait;
            }
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
            // The same text for the whole pause: a countdown would rewrite the state (a
            // Deployment write and a webhook call) at every pass. `fledge status` shows the time
            // left ([`pause_left`]).
            let ends = started
                .checked_add(SignedDuration::try_from(*d).unwrap_or(SignedDuration::MAX))
                .unwrap_or(Timestamp::MAX);
            state.message = format!(
                "{position}: paused for {}, until {}",
                crate::core::spec::format_duration(*d),
                ends.strftime("%Y-%m-%dT%H:%M:%SZ")
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
        Step::Analysis { checks } => {
            let unfinished = unfinished_runs(&state, spec, |_, run| run.step == Some(s.step));
            if unfinished.is_empty() {
                return advance(
                    state,
                    info(
                        "AnalysisPassed",
                        format!("{position}: analysis {} passed", checks.join(", ")),
                    ),
                );
            }
            state.message = format!(
                "{position}: analysis: waiting for {}",
                unfinished.join(", ")
            );
            hold(state, None)
        }
    }
}

/// Starts the runs of the checks due to begin: background ones from their starting step, and the
/// current `analysis` step's own (a check named by an earlier step runs afresh).
fn start_runs(state: &mut RolloutState, spec: &CanarySpec, now: Timestamp) {
    for check in &spec.checks {
        if check.starting_step.is_some_and(|from| state.step >= from)
            && !state.checks.contains_key(&check.name)
        {
            state
                .checks
                .insert(check.name.clone(), CheckRun::new(None, now));
        }
    }
    if let Some(Step::Analysis { checks }) = spec.steps.get(state.step) {
        for name in checks {
            if state.checks.get(name).and_then(|run| run.step) != Some(state.step) {
                state
                    .checks
                    .insert(name.clone(), CheckRun::new(Some(state.step), now));
            }
        }
    }
}

/// The runs that acting (not `dryRun`) checks still owe, among those `which` selects, as
/// `name taken/count` for the message.
fn unfinished_runs(
    state: &RolloutState,
    spec: &CanarySpec,
    which: impl Fn(&Check, &CheckRun) -> bool,
) -> Vec<String> {
    acting_runs(state, spec)
        .filter(|(check, run)| which(check, run) && run.phase != RunPhase::Successful)
        .map(|(check, run)| {
            let count = run.count(check).map_or("∞".to_owned(), |c| c.to_string());
            format!("{} ({}/{count} measurements)", check.name, run.taken)
        })
        .collect()
}

/// The runs of the checks that act on the canary, with their checks.
fn acting_runs<'a>(
    state: &'a RolloutState,
    spec: &'a CanarySpec,
) -> impl Iterator<Item = (&'a Check, &'a CheckRun)> {
    state.checks.iter().filter_map(|(name, run)| {
        let check = spec.checks.iter().find(|c| &c.name == name)?;
        (!check.dry_run).then_some((check, run))
    })
}

/// A failed check aborts the canary at once, traffic back to stable; an inconclusive one holds it
/// at its weight until a person decides.
fn stopped_by_checks(
    s: &RolloutState,
    mut state: RolloutState,
    spec: &CanarySpec,
    obs: &Observation,
    size: Weight,
) -> Option<Next> {
    let failed = acting_runs(&state, spec)
        .find(|(_, run)| matches!(run.phase, RunPhase::Failed | RunPhase::Error));
    if let Some((check, run)) = failed {
        let reason = match run.phase {
            RunPhase::Error => "AnalysisError",
            _ => "AnalysisFailed",
        };
        let message = format!(
            "{}: aborted, traffic back to stable. {}",
            run.verdict(check),
            how_to_go_on(obs.name)
        );
        state.phase = Phase::Aborted;
        state.weight = Weight::ZERO;
        state.message = message.clone();
        return Some(Next {
            state: Some(state),
            target: Target::Nothing,
            requeue: None,
            passed_through: Vec::new(),
            event: Some(Event {
                reason,
                message,
                warning: true,
            }),
        });
    }
    let (check, run) =
        acting_runs(&state, spec).find(|(_, run)| run.phase == RunPhase::Inconclusive)?;
    let message = format!(
        "{}: inconclusive, the canary stays at {}%: `kubectl fledge promote {name}` goes on, `kubectl fledge abort {name}` rolls back",
        run.verdict(check),
        state.weight,
        name = obs.name
    );
    let entering = s.phase != Phase::Paused || s.message != message;
    state.phase = Phase::Paused;
    state.message = message.clone();
    Some(Next {
        target: Target::Canary {
            size,
            weight: state.weight,
        },
        state: Some(state),
        requeue: None,
        passed_through: Vec::new(),
        event: entering.then_some(Event {
            reason: "AnalysisInconclusive",
            message,
            warning: true,
        }),
    })
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
            passed_through: Vec::new(),
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
        passed_through: Vec::new(),
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
            passed_through: Vec::new(),
        };
    };
    Next {
        state: Some(state),
        target,
        requeue: None,
        passed_through: Vec::new(),
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
        (Command::Promote, Phase::Progressing | Phase::Paused)
            if s.checks
                .values()
                .any(|run| run.phase == RunPhase::Inconclusive) =>
        {
            let mut checks = s.checks.clone();
            let accepted: Vec<&str> = s
                .checks
                .iter()
                .filter(|(_, run)| run.phase == RunPhase::Inconclusive)
                .map(|(name, _)| name.as_str())
                .collect();
            checks.values_mut().for_each(CheckRun::accept);
            Ok(RolloutState {
                phase: Phase::Progressing,
                message: format!(
                    "{position}: inconclusive analysis {} accepted by `fledge promote`",
                    accepted.join(", ")
                ),
                checks,
                ..s.clone()
            })
        }
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
            checks: CheckRuns::new(),
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
    use crate::core::analysis::Outcome;
    use crate::core::analysis::schedule::due;
    use crate::core::builders::{mk_check, mk_judged};
    use crate::core::objects::canary_replicas;
    use crate::core::spec::Step::{PauseFor, PauseUntilPromoted, SetWeight};

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
            policy: None,
            windows: Default::default(),
            progress_deadline: None,
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
            policy: None,
            policy_missing: false,
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
            checks: Default::default(),
            policy: None,
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
    fn a_timed_pause_sizes_the_canary_for_the_weight_after_it() {
        let spec = spec();
        let canary = |size, weight| Target::Canary { size, weight };
        // Paused for 2 minutes at 5 %: sized for the 50 % that follows.
        let n = next(Some(&state(Phase::Paused, 1, w(500))), &obs(&spec), t(10));
        assert_eq!(n.target, canary(w(5000), w(500)));
        // So when the pause ends, the pods are there and the weight goes out in the same pass.
        let mut sized = obs(&spec);
        sized.canary.ready_replicas = canary_replicas(4, w(5000));
        let n = next(Some(&state(Phase::Paused, 1, w(500))), &sized, t(120));
        let after = n.state.unwrap();
        assert_eq!((after.step, after.weight), (3, w(5000)));
        // While it grows, the pods of the current 5 % are enough: the pause goes on as it was,
        // with nothing to store, and the canary waits only if it has none of them.
        let growing = Observation {
            canary: CanaryStatus {
                available: false,
                ready_replicas: 1,
            },
            ..obs(&spec)
        };
        let paused = next(Some(&state(Phase::Paused, 1, w(500))), &obs(&spec), t(0))
            .state
            .unwrap();
        let n = next(Some(&paused), &growing, t(10));
        assert_eq!(n.state.as_ref(), Some(&paused));
        assert_eq!(n.target, canary(w(5000), w(500)));
        assert_eq!(n.requeue, Some(Duration::from_secs(110)));
        let n = next(Some(&paused), &without_canary_pods(&spec), t(10));
        assert_eq!(n.state.unwrap().unavailable_since, Some(t(10)));
        // Not ready when the pause ends: the 50 % step waits for them.
        let n = next(Some(&paused), &growing, t(120));
        let after = n.state.unwrap();
        assert_eq!(
            (after.step, after.weight, after.unavailable_since),
            (2, w(500), Some(t(120)))
        );
        // A pause that waits for a person keeps the canary as it is.
        let n = next(Some(&state(Phase::Paused, 3, w(5000))), &obs(&spec), t(10));
        assert_eq!(n.target, canary(w(5000), w(5000)));
        // So does pod ratio, where more canary pods would be more of the traffic.
        let pod_ratio = CanarySpec {
            router: Router::PodRatio,
            ..spec.clone()
        };
        let n = next(
            Some(&state(Phase::Paused, 1, w(500))),
            &obs(&pod_ratio),
            t(10),
        );
        assert_eq!(n.target, canary(w(500), w(500)));
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
        let after = n.state.as_ref().unwrap();
        assert_eq!(
            (
                after.phase,
                after.step,
                after.weight,
                after.unavailable_since
            ),
            (Phase::Paused, 1, w(500), None)
        );
        // The timed pause after the weight starts in the same pass, and grows the canary for
        // the weight after it.
        assert_eq!(
            n.target,
            Target::Canary {
                size: w(5000),
                weight: w(500)
            }
        );
        let reasons: Vec<_> = n.events().map(|e| e.reason).collect();
        assert_eq!(reasons, ["WeightSet", "Paused"]);
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
        assert!(
            n.state
                .as_ref()
                .unwrap()
                .message
                .ends_with("paused for 2m, until 2027-01-15T08:02:00Z"),
            "{:?}",
            n.state
        );
        // Later in the pause the state is the same: nothing to write.
        assert_eq!(next(n.state.as_ref(), &obs(&spec), t(100)).state, n.state);
        // A controller started anew sees the same stored start: no lost or replayed pause time.
        let restarted = n.state.unwrap();
        assert_eq!(
            next(Some(&restarted), &obs(&spec), t(119)).requeue,
            Some(Duration::from_secs(1))
        );
        // The pause ends, and the weight step after it is taken in the same pass, and so is
        // the pause after that weight.
        let n = next(Some(&restarted), &obs(&spec), t(120));
        let reasons: Vec<_> = n.events().map(|e| e.reason).collect();
        assert_eq!(reasons, ["PauseEnded", "WeightSet", "Paused"]);
        assert_eq!(
            n.target,
            Target::Canary {
                size: w(5000),
                weight: w(5000)
            }
        );
        let s = n.state.unwrap();
        assert_eq!(
            (s.phase, s.step, s.step_started),
            (Phase::Paused, 3, Some(t(120)))
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
        assert!(n.state.unwrap().message.contains("paused for 2m, until"));
        assert_eq!(
            pause_left(started, Duration::from_secs(120), t(120)),
            Duration::from_secs(1)
        );
        let n = next(
            Some(&s),
            &obs(&spec),
            started + SignedDuration::from_secs(120),
        );
        assert_eq!(
            n.passed_through.first().map(|e| e.reason),
            Some("PauseEnded")
        );
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
            policy: None,
            windows: Default::default(),
            progress_deadline: None,
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
            events.extend(n.events().map(|e| e.reason));
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
    /// [`spec`] under `RolloutPolicy shop/defaults`, open Fridays 09:00–10:00 UTC. `t(0)` is
    /// Friday 2027-01-15 08:00 UTC.
    fn windowed() -> CanarySpec {
        use crate::core::policy::{
            PolicyId, PolicyKind, PromotionWindow, PromotionWindows, Weekday,
        };
        CanarySpec {
            policy: Some(PolicyId {
                kind: PolicyKind::RolloutPolicy,
                namespace: Some("shop".into()),
                name: "defaults".into(),
            }),
            windows: PromotionWindows::read(
                &[PromotionWindow {
                    days: vec![Weekday::Fri],
                    start: "09:00".into(),
                    end: "10:00".into(),
                    time_zone: "UTC".into(),
                }],
                "spec.promotionWindows",
            )
            .unwrap(),
            ..spec()
        }
    }

    #[test]
    fn more_weight_waits_for_a_promotion_window() {
        let spec = windowed();
        let start = state(Phase::Progressing, 0, Weight::ZERO);
        let n = next(Some(&start), &obs(&spec), t(0));
        let waiting = n.state.clone().unwrap();
        assert_eq!(
            (waiting.phase, waiting.weight, waiting.step),
            (Phase::Paused, Weight::ZERO, 0)
        );
        assert_eq!(n.requeue, Some(Duration::from_secs(3600)));
        assert_eq!(
            waiting.message,
            "step 1/5: 5% of traffic waits for the promotion windows of RolloutPolicy shop/defaults; the next opens Fri 2027-01-15 09:00 UTC"
        );
        assert_eq!(n.event.map(|e| e.reason), Some("OutsidePromotionWindow"));
        // Said once, not at every look.
        let again = next(Some(&waiting), &obs(&spec), t(60));
        assert_eq!(again.event, None);
        assert_eq!(again.requeue, Some(Duration::from_secs(3540)));
        // The window opens: the step goes ahead.
        let open = next(Some(&waiting), &obs(&spec), t(3600)).state.unwrap();
        assert_eq!(
            (open.phase, open.weight, open.step),
            (Phase::Paused, w(500), 1)
        );
        // Pauses count down outside windows too: only weight and promotion wait.
        let paused = next(Some(&open), &obs(&spec), t(7300)).state.unwrap();
        assert_eq!(paused.step, 2);
    }

    #[test]
    fn promotion_waits_for_the_next_window_even_days_ahead() {
        let spec = windowed();
        let done = state(Phase::Progressing, 5, Weight::FULL);
        // Friday 10:00 has passed: the next window is a week later.
        let n = next(Some(&done), &obs(&spec), t(7200));
        let s = n.state.unwrap();
        assert_eq!(s.phase, Phase::Paused);
        assert!(s.message.starts_with("all 5 steps done: the promotion waits for the promotion windows of RolloutPolicy shop/defaults; the next opens Fri 2027-01-22 09:00"), "{}", s.message);
        assert_eq!(n.requeue, Some(Duration::from_secs(7 * 86400 - 3600)));
        let promoted = next(Some(&s), &obs(&spec), t(7 * 86400 + 3600))
            .state
            .unwrap();
        assert_eq!(promoted.phase, Phase::Promoting);
    }

    #[test]
    fn a_deleted_policy_holds_the_canary_where_it_is() {
        let spec = windowed();
        let running = state(Phase::Progressing, 2, w(500));
        let o = Observation {
            policy_missing: true,
            ..obs(&spec)
        };
        let n = next(Some(&running), &o, t(3600));
        let held = n.state.clone().unwrap();
        assert_eq!(
            (held.phase, held.weight, held.step),
            (Phase::Paused, w(500), 2)
        );
        assert_eq!(
            held.message,
            "step 3/5: RolloutPolicy shop/defaults was deleted; the canary holds at 5% (recreate it to go on, or `fledge abort web`)"
        );
        assert_eq!(
            n.target,
            Target::Canary {
                size: w(5000),
                weight: w(500)
            }
        );
        let event = n.event.unwrap();
        assert!(event.warning && event.reason == "PolicyMissing");
        assert_eq!(next(Some(&held), &o, t(3700)).event, None);
        // Recreated: on it goes.
        assert_eq!(
            next(Some(&held), &obs(&spec), t(3700))
                .state
                .unwrap()
                .weight,
            w(5000)
        );
    }

    #[test]
    fn a_canary_keeps_the_policy_it_started_with() {
        let spec = spec();
        let policy = crate::core::policy::tests::mk_policy("shop", "defaults", 0, "web");
        let o = Observation {
            policy: Some(&policy),
            held: true,
            ..obs(&spec)
        };
        let started = next(None, &o, t(0)).state.unwrap();
        assert_eq!(started.policy.as_deref(), Some(&policy));
        let later = next(Some(&started), &obs(&spec), t(1)).state.unwrap();
        assert_eq!(later.policy.as_deref(), Some(&policy));
    }

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
                // One step at a time (and the one after a pause that ends), never backwards;
                // or a fresh canary of a settled template.
                let fresh = settled_phase(s.phase)
                    && (next_state.phase, next_state.step) == (Phase::Progressing, 0);
                let pause_ended = n.passed_through.iter().any(|e| e.reason == "PauseEnded");
                assert!(
                    fresh
                        || next_state.step == s.step
                        || next_state.step == s.step + 1
                        || (pause_ended && next_state.step == s.step + 2),
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
                    assert!(n.events().next().is_some(), "{case}");
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
            policy: None,
            windows: Default::default(),
            progress_deadline: None,
        };
        let (weights, _) = walk(&spec);
        assert_eq!(
            weights,
            vec![Weight::ZERO, w(1), w(25), Weight::FULL, Weight::ZERO]
        );
    }

    /// 10 %, the inline check `smoke`, 50 %; `error-rate` in the background from step 2.
    fn analysed() -> CanarySpec {
        let mut error_rate = mk_check("error-rate", None);
        error_rate.starting_step = Some(1);
        error_rate.failure_limit = 1;
        CanarySpec {
            steps: vec![
                SetWeight(w(1000)),
                Step::Analysis {
                    checks: vec!["smoke".into()],
                },
                SetWeight(w(5000)),
            ],
            checks: vec![mk_check("smoke", Some(2)), error_rate],
            ..spec()
        }
    }

    /// `s` with measurement `outcomes` recorded for `check`.
    fn measured(
        mut s: RolloutState,
        spec: &CanarySpec,
        check: &str,
        outcomes: &[Outcome],
    ) -> RolloutState {
        let c = spec.checks.iter().find(|c| c.name == check).unwrap();
        let run = s.checks.get_mut(check).unwrap();
        for o in outcomes {
            let index = run.taken;
            assert!(run.record(c, index, t(30), &mk_judged(*o, "0.071")));
        }
        s
    }

    #[test]
    fn an_analysis_step_starts_its_checks_and_passes_only_when_they_succeed() {
        let spec = analysed();
        let o = obs(&spec);
        let at_step = state(Phase::Progressing, 1, w(1000));
        let n = next(Some(&at_step), &o, t(5));
        let s = n.state.unwrap();
        assert_eq!(s.step, 1, "held: {}", s.message);
        assert_eq!(s.checks["smoke"].step, Some(1));
        assert_eq!(s.checks["smoke"].started, t(5));
        assert_eq!(s.checks["error-rate"].step, None, "background from step 2");
        assert!(
            s.message.contains("waiting for smoke (0/2 measurements)"),
            "{}",
            s.message
        );
        assert_eq!(
            n.target,
            Target::Canary {
                size: w(1000),
                weight: w(1000)
            }
        );
        let (due, _) = due(&s.checks, &spec.checks, t(5));
        assert_eq!(due.len(), 2, "{due:?}");
        // Started once: a second look keeps the runs' start.
        let again = next(Some(&s), &o, t(6)).state.unwrap();
        assert_eq!(again.checks, s.checks);
        let one = measured(s.clone(), &spec, "smoke", &[Outcome::Successful]);
        assert_eq!(next(Some(&one), &o, t(7)).state.unwrap().step, 1);
        let two = measured(one, &spec, "smoke", &[Outcome::Successful]);
        let n = next(Some(&two), &o, t(8));
        assert_eq!(n.state.as_ref().unwrap().step, 2);
        assert_eq!(n.event.unwrap().reason, "AnalysisPassed");
    }

    #[test]
    fn a_failed_check_aborts_at_once_with_what_failed_and_what_to_do() {
        let spec = analysed();
        let o = obs(&spec);
        let started = next(Some(&state(Phase::Paused, 1, w(1000))), &o, t(5))
            .state
            .unwrap();
        let once = measured(started.clone(), &spec, "error-rate", &[Outcome::Failed]);
        assert_eq!(
            next(Some(&once), &o, t(6)).state.unwrap().phase,
            Phase::Paused,
            "within the limit"
        );
        let twice = measured(
            started,
            &spec,
            "error-rate",
            &[Outcome::Failed, Outcome::Failed],
        );
        let n = next(Some(&twice), &o, t(6));
        assert_eq!(
            n.target,
            Target::Nothing,
            "traffic back to stable in this very call"
        );
        let s = n.state.unwrap();
        assert_eq!((s.phase, s.weight), (Phase::Aborted, Weight::ZERO));
        assert!(
            s.message.starts_with(
                r#"error-rate: 0.071 is not "result < 0.01" (2 failures, limit 1): aborted"#
            ),
            "{}",
            s.message
        );
        assert!(
            s.message.contains("kubectl fledge retry web"),
            "{}",
            s.message
        );
        let event = n.event.unwrap();
        assert_eq!((event.reason, event.warning), ("AnalysisFailed", true));
        // Errors past the limit abort too.
        let erring = next(Some(&state(Phase::Paused, 1, w(1000))), &o, t(5))
            .state
            .unwrap();
        let erring = measured(erring, &spec, "error-rate", &[Outcome::Error; 5]);
        let n = next(Some(&erring), &o, t(6));
        assert_eq!(n.event.unwrap().reason, "AnalysisError");
        assert!(
            n.state
                .unwrap()
                .message
                .contains("(5 errors in a row, limit 4)")
        );
    }

    #[test]
    fn an_inconclusive_check_holds_the_weight_until_promote_or_abort() {
        let spec = analysed();
        let o = obs(&spec);
        let started = next(Some(&state(Phase::Progressing, 1, w(1000))), &o, t(5))
            .state
            .unwrap();
        let unsure = measured(started, &spec, "smoke", &[Outcome::Inconclusive]);
        let n = next(Some(&unsure), &o, t(6));
        assert_eq!(
            n.target,
            Target::Canary {
                size: w(1000),
                weight: w(1000)
            }
        );
        assert_eq!(n.event.as_ref().unwrap().reason, "AnalysisInconclusive");
        let held = n.state.unwrap();
        assert_eq!(held.phase, Phase::Paused);
        assert!(
            held.message.contains("kubectl fledge promote web"),
            "{}",
            held.message
        );
        assert_eq!(next(Some(&held), &o, t(60)).event, None, "announced once");
        assert_eq!(next(Some(&held), &o, t(60)).state.unwrap().step, 1);
        let promoted = command(Some(&held), &spec, Command::Promote, "web", t(61)).unwrap();
        assert_eq!(promoted.checks["smoke"].phase, RunPhase::Successful);
        assert_eq!(next(Some(&promoted), &o, t(62)).state.unwrap().step, 2);
        let aborted = command(Some(&held), &spec, Command::Abort, "web", t(61)).unwrap();
        assert_eq!(aborted.phase, Phase::Aborted);
        let retried = command(Some(&aborted), &spec, Command::Retry, "web", t(62)).unwrap();
        assert!(retried.checks.is_empty(), "a retry measures afresh");
    }

    #[test]
    fn dry_run_checks_measure_but_never_act() {
        let mut spec = analysed();
        spec.checks.iter_mut().for_each(|c| c.dry_run = true);
        let o = obs(&spec);
        let started = next(Some(&state(Phase::Progressing, 1, w(1000))), &o, t(5))
            .state
            .unwrap();
        assert_eq!(started.step, 2, "the step does not wait for a dry run");
        let s = next(Some(&state(Phase::Progressing, 2, w(1000))), &o, t(5))
            .state
            .unwrap();
        let failing = measured(s, &spec, "error-rate", &[Outcome::Failed; 2]);
        let n = next(Some(&failing), &o, t(6));
        assert_ne!(n.state.unwrap().phase, Phase::Aborted);
    }

    #[test]
    fn counted_background_checks_finish_before_promotion_and_unbounded_ones_end_with_it() {
        let mut spec = analysed();
        spec.steps.remove(1);
        spec.checks.remove(0);
        spec.checks[0].starting_step = Some(0);
        spec.checks[0].count = Some(2);
        let o = obs(&spec);
        let end = next(Some(&state(Phase::Progressing, 2, w(5000))), &o, t(5))
            .state
            .unwrap();
        assert_eq!(end.phase, Phase::Progressing);
        assert!(
            end.message
                .contains("waiting for background analysis error-rate (0/2"),
            "{}",
            end.message
        );
        let done = measured(end, &spec, "error-rate", &[Outcome::Successful; 2]);
        assert_eq!(
            next(Some(&done), &o, t(6)).state.unwrap().phase,
            Phase::Promoting
        );
        spec.checks[0].count = None;
        let o = obs(&spec);
        let end = next(Some(&state(Phase::Progressing, 2, w(5000))), &o, t(5))
            .state
            .unwrap();
        let s = next(Some(&end), &o, t(6)).state.unwrap();
        assert_eq!(s.phase, Phase::Promoting);
        assert_eq!(s.checks["error-rate"].phase, RunPhase::Successful);
    }
}
