//! The rollout: its persisted state and the schedule its steps follow.
//!
//! The state lives on the Deployment in the `fledge.dev/state` annotation, written by the controller;
//! the webhook only reads it (to keep an aborted template aborted and to let promotion through).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::core::analysis::Check;
use crate::core::analysis::schedule::CheckRuns;
use crate::core::policy::Policy;
use crate::core::routes::SavedRules;
use crate::core::spec::{ANNOTATION_STATE, Step, Weight};

pub mod machine;

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// No canary.
    Idle,
    /// Walking the steps.
    Progressing,
    /// At a `pause` step.
    Paused,
    /// All steps done: the stable Deployment is taking the canary's template.
    Promoting,
    /// The canary's template is the stable one.
    Succeeded,
    /// Traffic went back to stable; the canary template stays aborted (and the Deployment held)
    /// until it changes or is retried.
    Aborted,
    /// The template was reverted to the stable one: traffic on stable, canary removed, unpaused.
    RolledBack,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Idle,
        Phase::Progressing,
        Phase::Paused,
        Phase::Promoting,
        Phase::Succeeded,
        Phase::Aborted,
        Phase::RolledBack,
    ];
}

impl Phase {
    /// The phase's name, as `fledge status` and the metrics' labels show it.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Idle => "Idle",
            Phase::Progressing => "Progressing",
            Phase::Paused => "Paused",
            Phase::Promoting => "Promoting",
            Phase::Succeeded => "Succeeded",
            Phase::Aborted => "Aborted",
            Phase::RolledBack => "RolledBack",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The persisted rollout state (`fledge.dev/state`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutState {
    pub phase: Phase,
    /// `fledge.dev/canary-hash` of the template this state is about.
    pub hash: String,
    /// Index of the current step.
    #[serde(default)]
    pub step: usize,
    /// Canary traffic share now.
    #[serde(default)]
    pub weight: Weight,
    #[serde(default)]
    pub message: String,
    /// When the current step began: pauses count from here, so they survive restarts.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rfc3339")]
    pub step_started: Option<Timestamp>,
    /// Since when the canary has not been available: the progress deadline counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rfc3339")]
    pub unavailable_since: Option<Timestamp>,
    /// The `spec.rules` of the user's HTTPRoutes without fledge's fields (router `gateway-api`
    /// at a gateway), by route name: as fledge first found them, then with the user's edits since
    /// (`routes::user_rules`); what fledge splits from and a restore gives back. Empty
    /// otherwise, and in states stored before routers existed.
    #[serde(default, skip_serializing_if = "SavedRules::is_empty")]
    pub saved_routes: SavedRules,
    /// The runs of the canary's checks (`fledge.dev/analysis`), by check name.
    #[serde(default, skip_serializing_if = "CheckRuns::is_empty")]
    pub checks: CheckRuns,
    /// The policy that governed the Deployment when this canary started, as it was then: the
    /// canary keeps it to the end, whatever happens to the policy meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Box<Policy>>,
}

impl RolloutState {
    /// Whether this canary keeps the policy copied at its start (`policy`, none if it had none):
    /// while it is in flight, and once aborted (`fledge abort`, `fledge retry`).
    pub fn keeps_policy(&self) -> bool {
        matches!(
            self.phase,
            Phase::Progressing | Phase::Paused | Phase::Promoting | Phase::Aborted
        )
    }
}

/// Times as RFC 3339 text, as Kubernetes writes them.
mod rfc3339 {
    use k8s_openapi::jiff::Timestamp;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.collect_str(t),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| text.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// A required time as RFC 3339 text.
pub(crate) mod rfc3339_required {
    use k8s_openapi::jiff::Timestamp;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(t)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "{ANNOTATION_STATE}: cannot read fledge's rollout state ({0}); it is written by fledge's controller: remove the annotation to reset the rollout"
)]
pub struct StateError(#[source] serde_json::Error);

/// The state recorded on a Deployment, if any.
pub fn read_state(
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<Option<RolloutState>, StateError> {
    annotations
        .and_then(|a| a.get(ANNOTATION_STATE))
        .map(|text| serde_json::from_str(text).map_err(StateError))
        .transpose()
}

impl Serialize for Weight {
    /// As the percentage text (`"12.5"`): exact, and readable in `kubectl get -o yaml`.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Weight::parse_percent(&text)
            .map_err(|e| serde::de::Error::custom(format!("weight {text:?}: {e:?}")))
    }
}

/// The earliest moment a step can start, counted from when the canary became available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Earliest {
    /// How many `pause: {}` gates (`fledge promote`) come before.
    pub promotions: usize,
    /// Wall-clock time after the last of those promotions (or after the start, if none).
    pub after: Duration,
}

impl fmt::Display for Earliest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let after = crate::core::spec::format_duration(self.after);
        match self.promotions {
            0 => write!(f, "+{after}"),
            1 => write!(f, "promote +{after}"),
            n => write!(f, "promote #{n} +{after}"),
        }
    }
}

/// One row of the step schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledStep {
    pub step: Step,
    /// Canary traffic share while this step runs.
    pub weight: Weight,
    pub starts: Earliest,
}

/// When each step starts and when promotion follows, if every check passes and nobody waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeline {
    pub steps: Vec<ScheduledStep>,
    pub promotion: Earliest,
}

/// The least time a run of `check` takes: its first measurement after `initialDelay`, the last
/// `count − 1` intervals later. An `inline` run (an `analysis` step's) without `count` measures
/// once; a background one without `count` has no end of its own (`None`: until promotion).
pub fn minimum_run(check: &Check, inline: bool) -> Option<Duration> {
    let count = check.count.or(inline.then_some(1))?;
    Some(check.initial_delay + check.interval * count.saturating_sub(1))
}

/// The least time an `analysis` step naming `names` holds the canary: its checks run together, so
/// the longest of them; a `dryRun` check is not waited for.
pub fn analysis_minimum(names: &[String], checks: &[Check]) -> Duration {
    names
        .iter()
        .filter_map(|name| checks.iter().find(|c| &c.name == name))
        .filter(|c| !c.dry_run)
        .filter_map(|c| minimum_run(c, true))
        .max()
        .unwrap_or_default()
}

/// When each step starts and when promotion follows, with the `checks` of `fledge.dev/analysis`:
/// an `analysis` step holds for its [`analysis_minimum`], and promotion waits for the background
/// checks that have a `count` and act (not `dryRun`), counted from their starting step as if each
/// `pause: {}` were promoted at once.
pub fn timeline(steps: &[Step], checks: &[Check]) -> Timeline {
    let mut at = Earliest {
        promotions: 0,
        after: Duration::ZERO,
    };
    // When each `pause: {}` is reached, on the clock of the promotions before it.
    let mut gates = Vec::new();
    let mut weight = Weight::ZERO;
    let scheduled: Vec<ScheduledStep> = steps
        .iter()
        .map(|step| {
            let starts = at;
            match step {
                Step::SetWeight(w) => weight = *w,
                Step::PauseFor(d) => at.after += *d,
                Step::PauseUntilPromoted => {
                    gates.push(at.after);
                    at = Earliest {
                        promotions: at.promotions + 1,
                        after: Duration::ZERO,
                    }
                }
                Step::Analysis { checks: names } => at.after += analysis_minimum(names, checks),
                Step::SetHeaderRoute { .. } | Step::SetMirrorRoute { .. } => {}
            }
            ScheduledStep {
                step: step.clone(),
                weight,
                starts,
            }
        })
        .collect();
    let mut promotion = at;
    for check in checks.iter().filter(|c| !c.dry_run) {
        let (Some(from), Some(lasts)) = (check.starting_step, minimum_run(check, false)) else {
            continue;
        };
        let start = scheduled.get(from).map_or(at, |s| s.starts);
        let end = gates[start.promotions..at.promotions]
            .iter()
            .fold(start.after + lasts, |end, gate| end.saturating_sub(*gate));
        promotion.after = promotion.after.max(end);
    }
    Timeline {
        steps: scheduled,
        promotion,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(text: &str) -> Weight {
        Weight::parse_percent(text).unwrap()
    }

    fn at(promotions: usize, secs: u64) -> Earliest {
        Earliest {
            promotions,
            after: Duration::from_secs(secs),
        }
    }

    #[test]
    fn timeline_of_the_brief_example() {
        let steps = vec![
            Step::SetWeight(w("5")),
            Step::PauseFor(Duration::from_secs(120)),
            Step::SetWeight(w("50")),
            Step::PauseUntilPromoted,
            Step::SetWeight(Weight::FULL),
        ];
        let t = timeline(&steps, &[]);
        let rows: Vec<(Weight, Earliest)> = t.steps.iter().map(|s| (s.weight, s.starts)).collect();
        assert_eq!(
            rows,
            vec![
                (w("5"), at(0, 0)),
                (w("5"), at(0, 0)),
                (w("50"), at(0, 120)),
                (w("50"), at(0, 120)),
                (Weight::FULL, at(1, 0)),
            ]
        );
        assert_eq!(t.promotion, at(1, 0));
        assert_eq!(t.steps[4].starts.to_string(), "promote +0s");
        assert_eq!(t.steps[2].starts.to_string(), "+2m");
    }

    #[test]
    fn pauses_add_up_and_promotions_reset_the_clock() {
        let steps = vec![
            Step::PauseFor(Duration::from_secs(30)),
            Step::PauseFor(Duration::from_secs(60)),
            Step::PauseUntilPromoted,
            Step::PauseFor(Duration::from_secs(5)),
            Step::PauseUntilPromoted,
            Step::PauseFor(Duration::from_secs(7)),
        ];
        let t = timeline(&steps, &[]);
        assert_eq!(t.steps[2].starts, at(0, 90));
        assert_eq!(t.steps[4].starts, at(1, 5));
        assert_eq!(t.promotion, at(2, 7));
        assert_eq!(t.promotion.to_string(), "promote #2 +7s");
        assert!(t.steps.iter().all(|s| s.weight == Weight::ZERO));
    }

    #[test]
    fn analysis_steps_hold_for_their_longest_check_and_promotion_waits_for_counted_background_ones()
    {
        use crate::core::builders::mk_check;
        // 3 × 10 s after 5 s: 25 s; inline without count: once, at once.
        let mut error_rate = mk_check("error-rate", Some(3));
        error_rate.initial_delay = Duration::from_secs(5);
        let smoke = mk_check("smoke", None);
        // From step 2, 10 × 10 s: 90 s; unbounded ones do not hold promotion.
        let mut latency = mk_check("latency", Some(10));
        latency.starting_step = Some(1);
        let mut forever = mk_check("forever", None);
        forever.starting_step = Some(0);
        assert_eq!(minimum_run(&smoke, true), Some(Duration::ZERO));
        assert_eq!(minimum_run(&forever, false), None);
        let analysis = |names: &[&str]| Step::Analysis {
            checks: names.iter().map(|n| n.to_string()).collect(),
        };
        let mut shadow = mk_check("shadow", Some(100));
        shadow.dry_run = true;
        shadow.starting_step = Some(0);
        let mut slow_dry = mk_check("slow-dry", Some(100));
        slow_dry.dry_run = true;
        let checks = [error_rate, smoke, latency, forever, shadow, slow_dry];
        let steps = vec![
            Step::SetWeight(w("5")),
            analysis(&["error-rate", "smoke", "slow-dry"]),
            Step::PauseFor(Duration::from_secs(30)),
            analysis(&["smoke"]),
        ];
        let t = timeline(&steps, &checks);
        let starts: Vec<Earliest> = t.steps.iter().map(|s| s.starts).collect();
        assert_eq!(starts, [at(0, 0), at(0, 0), at(0, 25), at(0, 55)]);
        // latency starts at step 2 (+0s) and ends at +90s, after the steps (+55s).
        assert_eq!(t.promotion, at(0, 90));
        // latency starts at the `pause: {}` (+40s) and ends at +130s: promoted at once, 90 s
        // after the promotion.
        let gated = vec![
            Step::PauseFor(Duration::from_secs(40)),
            Step::PauseUntilPromoted,
            Step::PauseFor(Duration::from_secs(5)),
        ];
        assert_eq!(timeline(&gated, &checks).promotion, at(1, 90));
        // Steps that outlast it; and a starting step past the last starts when the steps end.
        let long_pause = vec![
            Step::SetWeight(w("5")),
            Step::PauseFor(Duration::from_secs(600)),
        ];
        assert_eq!(timeline(&long_pause, &checks).promotion, at(0, 600));
        assert_eq!(timeline(&long_pause[1..], &checks).promotion, at(0, 690));
    }

    #[test]
    fn state_round_trips_and_errors_name_the_annotation() {
        let state = RolloutState {
            phase: Phase::Aborted,
            hash: "abc".into(),
            step: 2,
            weight: w("12.5"),
            message: "canary not available within 600s".into(),
            step_started: None,
            unavailable_since: None,
            saved_routes: Default::default(),
            checks: Default::default(),
            policy: None,
        };
        let text = serde_json::to_string(&state).unwrap();
        assert!(text.contains(r#""weight":"12.5""#), "{text}");
        let annotations = BTreeMap::from([(ANNOTATION_STATE.to_owned(), text)]);
        assert_eq!(read_state(Some(&annotations)).unwrap(), Some(state));
        assert_eq!(read_state(None).unwrap(), None);
        let bad = BTreeMap::from([(ANNOTATION_STATE.to_owned(), "{".to_owned())]);
        let err = read_state(Some(&bad)).unwrap_err().to_string();
        assert!(
            err.starts_with("fledge.dev/state: cannot read fledge's rollout state"),
            "{err}"
        );
        let minimal = BTreeMap::from([(
            ANNOTATION_STATE.to_owned(),
            r#"{"phase":"Promoting","hash":"h"}"#.to_owned(),
        )]);
        assert_eq!(
            read_state(Some(&minimal)).unwrap().unwrap().phase,
            Phase::Promoting
        );
    }
}
