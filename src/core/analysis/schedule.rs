//! Each check's measurements in the rollout state, and which measurement is due when.
//!
//! Measurement `i` of a run falls due at `started + initialDelay + i × interval`, counted from the
//! stored start: a restarted controller takes the next one at its time, never repeats a recorded
//! one (results are keyed by index) and never skips one (the next index is the count recorded).
//! A measurement that comes in late pushes none of the later ones.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use super::condition::Judgement;
use super::{Check, Outcome};

/// Measurements kept per check in the state: the newest ones.
pub const KEPT_MEASUREMENTS: usize = 10;

/// Where a run of a check stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunPhase {
    /// Measuring.
    Running,
    /// Every measurement taken, within the limits.
    Successful,
    /// More failures than `failureLimit`.
    Failed,
    /// More inconclusive measurements than `inconclusiveLimit`: waits for a person.
    Inconclusive,
    /// More errors in a row than `consecutiveErrorLimit`.
    Error,
}

impl RunPhase {
    pub fn name(self) -> &'static str {
        match self {
            RunPhase::Running => "Running",
            RunPhase::Successful => "Successful",
            RunPhase::Failed => "Failed",
            RunPhase::Inconclusive => "Inconclusive",
            RunPhase::Error => "Error",
        }
    }
}

/// One measurement as the state keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Measurement {
    /// Its place in the run: 0 for the first.
    pub index: u32,
    /// When the provider answered.
    #[serde(with = "super::super::rollout::rfc3339_required")]
    pub at: Timestamp,
    /// The value as shown (`0.071`, `no data`, `error`).
    pub value: String,
    pub outcome: Outcome,
    /// What the judgement said: `0.071 is not "result < 0.01"`, the error, the Job's end.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// The run of one check for the current canary, in `fledge.dev/state`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckRun {
    /// The index of the `analysis` step that runs it; `None` in the background.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    #[serde(with = "super::super::rollout::rfc3339_required")]
    pub started: Timestamp,
    pub phase: RunPhase,
    /// Measurements recorded so far: the index of the next one.
    #[serde(default)]
    pub taken: u32,
    #[serde(default)]
    pub successful: u32,
    #[serde(default)]
    pub failed: u32,
    #[serde(default)]
    pub inconclusive: u32,
    #[serde(default)]
    pub errors: u32,
    #[serde(default)]
    pub consecutive_errors: u32,
    /// The newest [`KEPT_MEASUREMENTS`], oldest first.
    #[serde(default)]
    pub measurements: Vec<Measurement>,
}

/// The runs of the current canary's checks, by check name.
pub type CheckRuns = BTreeMap<String, CheckRun>;

impl CheckRun {
    pub fn new(step: Option<usize>, started: Timestamp) -> CheckRun {
        CheckRun {
            step,
            started,
            phase: RunPhase::Running,
            taken: 0,
            successful: 0,
            failed: 0,
            inconclusive: 0,
            errors: 0,
            consecutive_errors: 0,
            measurements: Vec::new(),
        }
    }

    /// The run's name in its Jobs' names: the step that runs it (or `bg`) and its start in
    /// seconds, base 36, so that a retried canary's runs never meet the Jobs of the runs before.
    pub fn label(&self) -> String {
        let place = match self.step {
            Some(step) => format!("s{step}"),
            None => "bg".to_owned(),
        };
        format!(
            "{place}-{}",
            base36(self.started.as_second().unsigned_abs())
        )
    }

    /// When measurement `index` falls due.
    pub fn due_at(&self, check: &Check, index: u32) -> Timestamp {
        let offset = check.initial_delay + check.interval * index;
        let offset = SignedDuration::try_from(offset).unwrap_or(SignedDuration::MAX);
        self.started.checked_add(offset).unwrap_or(Timestamp::MAX)
    }

    /// How many measurements the run takes: the check's `count`; without one, a single one
    /// inline and as many as fit in the background.
    pub fn count(&self, check: &Check) -> Option<u32> {
        check.count.or(self.step.map(|_| 1))
    }

    /// Whether the run wants no more measurements: it ended, or took all it counts.
    pub fn finished(&self, check: &Check) -> bool {
        self.phase != RunPhase::Running
            || self.count(check).is_some_and(|count| self.taken >= count)
    }

    /// The next measurement: its index and how long until it is due (zero when due now).
    pub fn next_measurement(&self, check: &Check, now: Timestamp) -> Option<(u32, Duration)> {
        if self.finished(check) {
            return None;
        }
        let index = self.taken;
        let wait = Duration::try_from(self.due_at(check, index).duration_since(now))
            .unwrap_or(Duration::ZERO);
        Some((index, wait))
    }

    /// Records measurement `index`; one already recorded (or not the next) is ignored, so that a
    /// result delivered twice counts once. Returns whether it was recorded.
    pub fn record(&mut self, check: &Check, index: u32, at: Timestamp, judged: &Judgement) -> bool {
        if index != self.taken || self.finished(check) {
            return false;
        }
        self.taken += 1;
        match judged.outcome {
            Outcome::Successful => self.successful += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::Inconclusive => self.inconclusive += 1,
            Outcome::Error => self.errors += 1,
        }
        if judged.outcome == Outcome::Error {
            self.consecutive_errors += 1;
        } else {
            self.consecutive_errors = 0;
        }
        self.measurements.push(Measurement {
            index,
            at,
            value: judged.value.clone(),
            outcome: judged.outcome,
            detail: judged.detail.clone(),
        });
        let excess = self.measurements.len().saturating_sub(KEPT_MEASUREMENTS);
        self.measurements.drain(..excess);
        self.phase = if self.failed > check.failure_limit {
            RunPhase::Failed
        } else if self.consecutive_errors > check.consecutive_error_limit {
            RunPhase::Error
        } else if self.inconclusive > check.inconclusive_limit {
            RunPhase::Inconclusive
        } else if self.count(check).is_some_and(|count| self.taken >= count) {
            RunPhase::Successful
        } else {
            RunPhase::Running
        };
        true
    }

    /// A person looked at an inconclusive run and said go on (`fledge promote`): an inline run
    /// counts as passed; a background one measures on with its inconclusive count cleared.
    pub fn accept(&mut self) {
        if self.phase != RunPhase::Inconclusive {
            return;
        }
        if self.step.is_some() {
            self.phase = RunPhase::Successful;
        } else {
            self.phase = RunPhase::Running;
            self.inconclusive = 0;
        }
    }

    /// Why the run stopped the canary, for the Event and the status: the check, the value, the
    /// condition and the limit, e.g. `error-rate: 0.071 is not "result < 0.01" (2 failures, limit 1)`.
    pub fn verdict(&self, check: &Check) -> String {
        let detail = self
            .measurements
            .last()
            .map_or("", |m| reason(&m.value, &m.detail));
        let count = match self.phase {
            RunPhase::Failed => plural(self.failed, "failure", "failures", check.failure_limit),
            RunPhase::Error => plural(
                self.consecutive_errors,
                "error in a row",
                "errors in a row",
                check.consecutive_error_limit,
            ),
            RunPhase::Inconclusive => plural(
                self.inconclusive,
                "inconclusive",
                "inconclusive",
                check.inconclusive_limit,
            ),
            RunPhase::Running | RunPhase::Successful => format!(
                "{} of {} measurements",
                self.taken,
                self.count(check).map_or("∞".to_owned(), |c| c.to_string())
            ),
        };
        format!("{}: {detail} ({count})", check.name)
    }
}

/// Why a measurement came out as it did: its judgement's detail, or else its value.
pub fn reason<'a>(value: &'a str, detail: &'a str) -> &'a str {
    if detail.is_empty() { value } else { detail }
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

fn plural(n: u32, one: &str, many: &str, limit: u32) -> String {
    format!("{n} {}, limit {limit}", if n == 1 { one } else { many })
}

/// The name of the Job for measurement `index` of `check` in `run` (the step that runs the check,
/// or `bg` in the background) of canary `canary_hash` of `deployment`: the same inputs give the
/// same name, so a restarted controller finds the Job it created instead of starting a second.
/// At most 63 characters (Jobs label their pods with their name); a long name is cut and keeps a
/// hash of the whole so that it stays unique.
pub fn job_name(deployment: &str, canary_hash: &str, check: &str, run: &str, index: u32) -> String {
    use sha2::{Digest, Sha256};
    let hash: String = canary_hash.chars().take(10).collect();
    let full = format!("{deployment}-{hash}-{check}-{run}-{index}");
    if full.len() <= 63 {
        return full;
    }
    let digest = Sha256::digest(full.as_bytes());
    let tag: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let keep: String = full.chars().take(63 - tag.len() - 1).collect();
    format!("{}-{tag}", keep.trim_end_matches(['-', '.']))
}

/// A measurement to take now.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Due {
    pub check: String,
    /// [`CheckRun::label`] of its run.
    pub run: String,
    pub index: u32,
}

/// The measurements due now in `runs`, and how long until the next one after them falls due.
/// The caller asks only while the canary walks its steps.
pub fn due(runs: &CheckRuns, checks: &[Check], now: Timestamp) -> (Vec<Due>, Option<Duration>) {
    let mut now_due = Vec::new();
    let mut soonest: Option<Duration> = None;
    for (name, run) in runs {
        let Some(check) = checks.iter().find(|c| &c.name == name) else {
            continue;
        };
        match run.next_measurement(check, now) {
            Some((index, wait)) if wait.is_zero() => now_due.push(Due {
                check: name.clone(),
                run: run.label(),
                index,
            }),
            Some((_, wait)) => soonest = Some(soonest.map_or(wait, |s| s.min(wait))),
            None => {}
        }
    }
    (now_due, soonest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::builders::{mk_check, mk_judged};

    fn t(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    #[test]
    fn measurements_fall_due_from_the_stored_start_without_drift() {
        let mut check = mk_check("error-rate", Some(3));
        check.initial_delay = Duration::from_secs(5);
        let mut run = CheckRun::new(None, t(0));
        assert_eq!(
            run.next_measurement(&check, t(0)),
            Some((0, Duration::from_secs(5)))
        );
        assert_eq!(
            run.next_measurement(&check, t(7)),
            Some((0, Duration::ZERO))
        );
        // Recorded late, at 9 s: the next is still due at 5 + 10 s.
        assert!(run.record(&check, 0, t(9), &mk_judged(Outcome::Successful, "0")));
        assert_eq!(
            run.next_measurement(&check, t(9)),
            Some((1, Duration::from_secs(6)))
        );
        // A restart long after: the next index, due at once; none skipped, none repeated.
        assert_eq!(
            run.next_measurement(&check, t(100)),
            Some((1, Duration::ZERO))
        );
        assert!(!run.record(&check, 0, t(100), &mk_judged(Outcome::Failed, "1")));
        assert!(!run.record(&check, 2, t(100), &mk_judged(Outcome::Failed, "1")));
        assert_eq!((run.taken, run.failed), (1, 0));
        assert!(run.record(&check, 1, t(101), &mk_judged(Outcome::Successful, "0")));
        assert!(run.record(&check, 2, t(102), &mk_judged(Outcome::Successful, "0")));
        assert_eq!(run.phase, RunPhase::Successful);
        assert_eq!(run.next_measurement(&check, t(200)), None);
        let indexes: Vec<u32> = run.measurements.iter().map(|m| m.index).collect();
        assert_eq!(indexes, [0, 1, 2]);
    }

    #[test]
    fn limits_decide_the_phase() {
        let mut check = mk_check("error-rate", Some(10));
        check.failure_limit = 1;
        check.consecutive_error_limit = 2;
        check.inconclusive_limit = 1;
        let judge = |run: &mut CheckRun, outcomes: &[Outcome]| {
            for o in outcomes {
                let index = run.taken;
                run.record(&check, index, t(i64::from(index)), &mk_judged(*o, "0.5"));
            }
            run.phase
        };
        use Outcome::*;
        let new = || CheckRun::new(None, t(0));
        assert_eq!(judge(&mut new(), &[Failed]), RunPhase::Running);
        assert_eq!(
            judge(&mut new(), &[Failed, Successful, Failed]),
            RunPhase::Failed
        );
        assert_eq!(judge(&mut new(), &[Error, Error]), RunPhase::Running);
        assert_eq!(judge(&mut new(), &[Error, Error, Error]), RunPhase::Error);
        assert_eq!(
            judge(&mut new(), &[Error, Error, Successful, Error, Error]),
            RunPhase::Running,
            "only errors in a row count"
        );
        assert_eq!(
            judge(&mut new(), &[Inconclusive, Inconclusive]),
            RunPhase::Inconclusive
        );
        let mut failed = new();
        judge(&mut failed, &[Failed, Failed]);
        assert_eq!(
            failed.verdict(&check),
            r#"error-rate: 0.5 is not "result < 0.01" (2 failures, limit 1)"#
        );
        assert!(
            !failed.record(&check, 2, t(5), &mk_judged(Successful, "0")),
            "ended"
        );
    }

    #[test]
    fn the_state_keeps_the_newest_ten_and_inline_runs_measure_once_by_default() {
        let unbounded = mk_check("latency", None);
        let mut run = CheckRun::new(None, t(0));
        for i in 0..25 {
            assert!(run.record(
                &unbounded,
                i,
                t(i64::from(i)),
                &mk_judged(Outcome::Successful, "1")
            ));
        }
        assert_eq!(run.measurements.len(), KEPT_MEASUREMENTS);
        assert_eq!(run.measurements[0].index, 15);
        assert_eq!(run.phase, RunPhase::Running);
        let mut inline = CheckRun::new(Some(2), t(0));
        assert_eq!(inline.label(), format!("s2-{}", base36(1_800_000_000)));
        assert_eq!(base36(0), "0");
        assert_eq!(base36(36 * 36 + 1), "101");
        assert!(inline.record(&unbounded, 0, t(1), &mk_judged(Outcome::Successful, "1")));
        assert_eq!(inline.phase, RunPhase::Successful);
    }

    #[test]
    fn accepting_an_inconclusive_run() {
        let check = mk_check("smoke", Some(3));
        let mut inline = CheckRun::new(Some(1), t(0));
        inline.record(
            &check,
            0,
            t(0),
            &mk_judged(Outcome::Inconclusive, "no data"),
        );
        assert_eq!(inline.phase, RunPhase::Inconclusive);
        inline.accept();
        assert_eq!(inline.phase, RunPhase::Successful);
        let mut background = CheckRun::new(None, t(0));
        background.record(
            &check,
            0,
            t(0),
            &mk_judged(Outcome::Inconclusive, "no data"),
        );
        background.accept();
        assert_eq!(
            (background.phase, background.inconclusive),
            (RunPhase::Running, 0)
        );
        assert_eq!(
            background.next_measurement(&check, t(10)),
            Some((1, Duration::ZERO))
        );
    }

    #[test]
    fn due_lists_what_to_measure_now_and_when_to_look_next() {
        let checks = [mk_check("a", Some(2)), mk_check("b", None)];
        let runs = CheckRuns::from([
            ("a".to_owned(), CheckRun::new(Some(0), t(0))),
            ("b".to_owned(), CheckRun::new(None, t(3))),
            ("gone".to_owned(), CheckRun::new(None, t(0))),
        ]);
        let (now, next) = due(&runs, &checks, t(1));
        assert_eq!(
            now,
            [Due {
                check: "a".into(),
                run: format!("s0-{}", base36(1_800_000_000)),
                index: 0
            }]
        );
        assert_eq!(next, Some(Duration::from_secs(2)));
        let roundtrip: CheckRuns =
            serde_json::from_str(&serde_json::to_string(&runs).unwrap()).unwrap();
        assert_eq!(roundtrip, runs);
    }

    #[test]
    fn job_names_are_deterministic_short_and_unique() {
        assert_eq!(
            job_name("web", "abcdef123456", "smoke", "s2", 0),
            "web-abcdef1234-smoke-s2-0"
        );
        let long = "d".repeat(60);
        let a = job_name(&long, "abcdef123456", "smoke", "s2", 0);
        let b = job_name(&long, "abcdef123456", "smoke", "s2", 1);
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
        assert_eq!(a, job_name(&long, "abcdef123456", "smoke", "s2", 0));
    }
}
