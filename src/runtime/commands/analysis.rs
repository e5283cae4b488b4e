//! The checks of `fledge status`: one entry per run of a check of the current canary, from the
//! rollout state, with what the check's definition (`fledge.dev/analysis`) adds: its conditions,
//! its limits and when it measures next. When the settings cannot be read, the state alone.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use crate::core::analysis::schedule::{CheckRun, Measurement, RunPhase};
use crate::core::analysis::{Check, Outcome, Provider};
use crate::core::rollout::machine;
use crate::core::rollout::{Phase, RolloutState};
use crate::core::spec::{CanarySpec, format_duration};

/// One check of the current canary, as `fledge status` shows it (in JSON, an entry of `analysis`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckStatus {
    pub name: String,
    /// 1-based: the `analysis` step that runs it; `None` for a background check.
    pub step: Option<usize>,
    pub phase: RunPhase,
    /// `prometheus`, `web` or `job`; `None` when the settings cannot be read.
    pub provider: Option<&'static str>,
    /// The value of the newest measurement, as shown (`0.071`, `no data`, `error`).
    pub last_value: Option<String>,
    pub last_outcome: Option<Outcome>,
    pub success_condition: Option<String>,
    pub failure_condition: Option<String>,
    /// Measurements taken, and how many the run takes (`None`: until the steps end, or unknown).
    pub taken: u32,
    pub count: Option<u32>,
    pub successful: u32,
    pub failed: u32,
    pub inconclusive: u32,
    pub errors: u32,
    pub consecutive_errors: u32,
    pub failure_limit: Option<u32>,
    pub inconclusive_limit: Option<u32>,
    pub consecutive_error_limit: Option<u32>,
    /// When the next measurement falls due (RFC 3339), while the canary walks its steps.
    pub next_measurement: Option<String>,
    /// How long until then, for the text: `in 12s`, `due now`. Not in JSON (it changes every
    /// second; `nextMeasurement` does not).
    #[serde(skip)]
    pub next_in: Option<String>,
    /// Measured and shown, never acts.
    pub dry_run: bool,
    /// The newest measurements the state keeps, oldest first.
    pub measurements: Vec<Measurement>,
}

/// The checks of `state`'s canary, in name order. `spec` (when the settings are valid) adds the
/// definitions; a run whose check is no longer defined is shown from the state alone.
pub fn check_statuses(
    state: &RolloutState,
    spec: Option<&CanarySpec>,
    now: Timestamp,
) -> Vec<CheckStatus> {
    let walking = matches!(state.phase, Phase::Progressing | Phase::Paused);
    state
        .checks
        .iter()
        .map(|(name, run)| {
            let check = spec.and_then(|s| s.checks.iter().find(|c| &c.name == name));
            check_status(name, run, check, walking, now)
        })
        .collect()
}

fn check_status(
    name: &str,
    run: &CheckRun,
    check: Option<&Check>,
    walking: bool,
    now: Timestamp,
) -> CheckStatus {
    let last = run.measurements.last();
    // Measurements are taken only while the canary walks its steps.
    let next = check
        .filter(|_| walking)
        .and_then(|c| run.next_measurement(c, now).map(|(index, _)| (c, index)))
        .map(|(c, index)| {
            let offset = c.initial_delay + c.interval * index;
            let left = machine::pause_left(run.started, offset, now);
            let at = SignedDuration::try_from(offset)
                .ok()
                .and_then(|o| run.started.checked_add(o).ok())
                .unwrap_or(Timestamp::MAX);
            (at, left)
        });
    CheckStatus {
        name: name.to_owned(),
        step: run.step.map(|s| s + 1),
        phase: run.phase,
        provider: check.map(|c| provider_name(&c.provider)),
        last_value: last.map(|m| m.value.clone()),
        last_outcome: last.map(|m| m.outcome),
        success_condition: check
            .and_then(|c| c.success_condition.as_ref())
            .map(|c| c.text().to_owned()),
        failure_condition: check
            .and_then(|c| c.failure_condition.as_ref())
            .map(|c| c.text().to_owned()),
        taken: run.taken,
        count: check.and_then(|c| run.count(c)),
        successful: run.successful,
        failed: run.failed,
        inconclusive: run.inconclusive,
        errors: run.errors,
        consecutive_errors: run.consecutive_errors,
        failure_limit: check.map(|c| c.failure_limit),
        inconclusive_limit: check.map(|c| c.inconclusive_limit),
        consecutive_error_limit: check.map(|c| c.consecutive_error_limit),
        next_measurement: next.map(|(at, _)| at.to_string()),
        next_in: next.map(|(_, left)| relative(left)),
        dry_run: check.is_some_and(|c| c.dry_run),
        measurements: run.measurements.clone(),
    }
}

pub fn provider_name(provider: &Provider) -> &'static str {
    match provider {
        Provider::Prometheus(_) => "prometheus",
        Provider::Web(_) => "web",
        Provider::Job(_) => "job",
    }
}

/// `in 12s`, or `due now`.
fn relative(left: Duration) -> String {
    if left.is_zero() {
        "due now".to_owned()
    } else {
        format!("in {}", format_duration(left))
    }
}

/// `n/limit`, or `n` when the limit is unknown.
fn against(n: u32, limit: Option<u32>) -> String {
    match limit {
        Some(limit) => format!("{n}/{limit}"),
        None => n.to_string(),
    }
}

/// The line of one check under its Deployment's, e.g.
/// `  error-rate             step 3      Running       last 0.004 (Successful)  measured 2/5  successful 2  failed 0/1  inconclusive 0/0  errors 0/4  next in 12s  success if result < 0.01`.
pub fn check_line(c: &CheckStatus) -> String {
    let place = match c.step {
        Some(step) => format!("step {step}"),
        None => "background".to_owned(),
    };
    let last = match (&c.last_value, c.last_outcome) {
        (Some(value), Some(outcome)) => format!("last {value} ({})", outcome.name()),
        _ => "no measurement yet".to_owned(),
    };
    let conditions = if c.provider == Some("job") {
        "job".to_owned()
    } else {
        let texts: Vec<String> = [
            c.success_condition
                .as_ref()
                .map(|t| format!("success if {t}")),
            c.failure_condition
                .as_ref()
                .map(|t| format!("failure if {t}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        match (texts.is_empty(), c.provider) {
            (false, _) => texts.join(", "),
            (true, Some(_)) => "no condition".to_owned(),
            (true, None) => "no definition".to_owned(),
        }
    };
    let count = c.count.map_or("∞".to_owned(), |n| n.to_string());
    let errors = if c.errors == c.consecutive_errors {
        format!("errors {}", against(c.errors, c.consecutive_error_limit))
    } else {
        format!(
            "errors {} ({} in a row)",
            c.errors,
            against(c.consecutive_errors, c.consecutive_error_limit)
        )
    };
    let next = c
        .next_in
        .as_ref()
        .map(|n| format!("  next {n}"))
        .unwrap_or_default();
    let name = if c.dry_run {
        format!("{} (dry run)", c.name)
    } else {
        c.name.clone()
    };
    // The conditions last: on a terminal `--watch` cuts long lines, and they are the longest part.
    format!(
        "  {name:<22} {place:<11} {:<13} {last}  measured {}/{count}  successful {}  failed {}  inconclusive {}  {errors}{next}  {conditions}",
        c.phase.name(),
        c.taken,
        c.successful,
        against(c.failed, c.failure_limit),
        against(c.inconclusive, c.inconclusive_limit),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::analysis::JobCheck;
    use crate::core::builders::{mk_check, mk_judged, mk_state};
    use crate::core::spec::{Router, Step, Weight};

    fn t(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    #[test]
    fn without_a_definition_the_state_alone_is_shown() {
        let check = mk_check("error-rate", Some(3));
        let mut run = CheckRun::new(None, t(0));
        run.record(&check, 0, t(1), &mk_judged(Outcome::Successful, "0.004"));
        let mut state = mk_state(Phase::Progressing, "c2", 0, Weight::ZERO);
        state.checks.insert("error-rate".into(), run);
        let [c] = &check_statuses(&state, None, t(5))[..] else {
            panic!("one check")
        };
        assert_eq!(
            (
                c.phase,
                c.taken,
                c.count,
                c.failure_limit,
                c.next_measurement.as_deref()
            ),
            (RunPhase::Running, 1, None, None, None)
        );
        let line = check_line(c);
        assert!(
            line.ends_with("last 0.004 (Successful)  measured 1/∞  successful 1  failed 0  inconclusive 0  errors 0  no definition"),
            "{line}"
        );
    }

    #[test]
    fn errors_in_a_row_are_told_from_all_errors() {
        let mut check = mk_check("latency", Some(10));
        check.consecutive_error_limit = 3;
        let mut run = CheckRun::new(None, t(0));
        for (i, o) in [Outcome::Error, Outcome::Successful, Outcome::Error]
            .into_iter()
            .enumerate()
        {
            run.record(&check, i as u32, t(i as i64), &mk_judged(o, "1"));
        }
        let c = check_status("latency", &run, Some(&check), false, t(5));
        assert!(
            check_line(&c).contains("errors 2 (1/3 in a row)"),
            "{}",
            check_line(&c)
        );
        assert_eq!(c.next_in, None, "no measurement outside the steps");
    }

    /// An inline check `error-rate` (3 × 10 s after 5 s) at step 2, a background dry-run Job
    /// check `smoke`, and their runs as the state holds them at second 17.
    fn mk_spec_and_state(phase: Phase) -> (CanarySpec, RolloutState) {
        let mut error_rate = mk_check("error-rate", Some(3));
        error_rate.initial_delay = Duration::from_secs(5);
        error_rate.failure_limit = 1;
        let mut smoke = mk_check("smoke", None);
        smoke.dry_run = true;
        smoke.starting_step = Some(0);
        smoke.provider = Provider::Job(JobCheck {
            spec: serde_json::json!({"template": {}}),
        });
        let mut inline = CheckRun::new(Some(1), t(0));
        inline.record(&error_rate, 0, t(6), &mk_judged(Outcome::Failed, "0.071"));
        let mut background = CheckRun::new(None, t(10));
        background.record(&smoke, 0, t(11), &mk_judged(Outcome::Successful, "passed"));
        let mut state = mk_state(phase, "c2", 1, Weight::parse_percent("5").unwrap());
        state.checks.insert("error-rate".into(), inline);
        state.checks.insert("smoke".into(), background);
        let spec = CanarySpec {
            steps: vec![
                Step::SetWeight(Weight::parse_percent("5").unwrap()),
                Step::Analysis {
                    checks: vec!["error-rate".into()],
                },
            ],
            root_service: "web".into(),
            router: Router::Smi,
            checks: vec![error_rate, smoke],
            policy: None,
            windows: Default::default(),
            progress_deadline: None,
        };
        (spec, state)
    }

    #[test]
    fn each_check_shows_its_counts_limits_and_next_measurement() {
        let (spec, state) = mk_spec_and_state(Phase::Progressing);
        let checks = check_statuses(&state, Some(&spec), t(17));
        let [error_rate, smoke] = &checks[..] else {
            panic!("two checks: {checks:?}")
        };
        // Measurement 1 of error-rate falls due at 5 + 10 s.
        assert_eq!(
            error_rate.next_measurement.as_deref(),
            Some(t(15).to_string().as_str())
        );
        assert_eq!(error_rate.next_in.as_deref(), Some("due now"));
        assert_eq!(
            (
                error_rate.step,
                error_rate.count,
                error_rate.failed,
                error_rate.failure_limit
            ),
            (Some(2), Some(3), 1, Some(1))
        );
        let line = check_line(error_rate);
        assert_eq!(
            line,
            "  error-rate             step 2      Running       last 0.071 (Failed)  measured 1/3  successful 0  failed 1/1  inconclusive 0/0  errors 0/4  next due now  success if result < 0.01"
        );
        assert_eq!(smoke.next_in.as_deref(), Some("in 3s"), "due at 20 s");
        let line = check_line(smoke);
        assert!(
            line.starts_with("  smoke (dry run)        background  Running       last passed (Successful)  measured 1/∞"),
            "{line}"
        );
        assert!(line.ends_with("  next in 3s  job"), "{line}");
        let json = serde_json::to_value(smoke).unwrap();
        for key in [
            "name",
            "phase",
            "lastValue",
            "lastOutcome",
            "successCondition",
            "failureCondition",
            "successful",
            "failed",
            "inconclusive",
            "errors",
            "failureLimit",
            "inconclusiveLimit",
            "consecutiveErrorLimit",
            "nextMeasurement",
            "dryRun",
            "measurements",
        ] {
            assert!(json.get(key).is_some(), "{key} in {json}");
        }
        assert!(json.get("nextIn").is_none(), "{json}");
        assert_eq!(json["dryRun"], true);
        assert_eq!(json["provider"], "job");
        assert_eq!(json["lastOutcome"], "Successful");
        assert_eq!(json["failureCondition"], serde_json::Value::Null);
        assert_eq!(
            serde_json::to_value(error_rate).unwrap()["successCondition"],
            "result < 0.01"
        );
        assert_eq!(json["measurements"][0]["value"], "passed");
        assert_eq!(json["nextMeasurement"], t(20).to_string());
    }

    #[test]
    fn nothing_is_due_once_the_canary_stopped() {
        let (spec, state) = mk_spec_and_state(Phase::Aborted);
        for c in check_statuses(&state, Some(&spec), t(17)) {
            assert_eq!((c.next_measurement, c.next_in), (None, None), "{}", c.name);
        }
    }
}
