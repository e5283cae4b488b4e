//! `fledge status --watch`: the status of `fledge status`, kept up to date from a watch on the
//! Deployments and re-rendered every second, so that a pause's time left counts down.
//!
//! Pure: what to print for each new view ([`View`]) and when a watched rollout has settled
//! ([`outcome`]). [`watch`] feeds them from the API server.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use serde_json::Value;

use super::{CheckStatus, CommandError, Status, status_of, status_text};
use crate::core::observe::DeploymentFacts;
use crate::core::policy::PolicySnapshot;
use crate::core::rollout::Phase;
use crate::core::spec::LABEL_ENABLED;
use crate::runtime::policies;

/// How often the view is rendered again without a change, for the countdown of a timed pause.
const TICK: Duration = Duration::from_secs(1);
/// Line wrapping off while a frame is drawn: a long line then takes one row, not several, so that
/// the frame's line count is the number of rows to clear next time.
const WRAP_OFF: &str = "\x1b[?7l";
const WRAP_ON: &str = "\x1b[?7h";

/// Moves the cursor up over a frame of `lines` lines and clears from there to the end of the screen.
fn clear_lines(lines: usize) -> String {
    format!("\x1b[{lines}A\x1b[J")
}

/// How the view is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// On a terminal: the frame is redrawn in place whenever it changes, countdowns included.
    Live,
    /// To a pipe or a log: a new frame whenever a rollout changes, but not for a countdown, so that
    /// a log does not get a frame per second.
    Log,
    /// NDJSON: a Deployment's status (as `fledge status NAME -o json`) on one line whenever it
    /// changes, countdowns aside. A Deployment that goes away prints nothing.
    Json,
}

/// What was printed, to print only what changed.
#[derive(Debug)]
pub struct View {
    style: Style,
    namespace: String,
    /// `Live`: the frame on screen; `Log`: the last frame printed, without countdowns.
    shown: Option<String>,
    /// `Json`: each Deployment's last printed status, without countdown.
    printed: BTreeMap<String, Status>,
}

/// A status without the countdowns (of a pause, and to the checks' next measurements), to tell a
/// change of the rollout from the passing of time.
fn steady(s: &Status) -> Status {
    Status {
        pause_left: None,
        analysis: s
            .analysis
            .iter()
            .map(|c| CheckStatus {
                next_in: None,
                ..c.clone()
            })
            .collect(),
        ..s.clone()
    }
}

impl View {
    pub fn new(style: Style, namespace: &str) -> View {
        View {
            style,
            namespace: namespace.to_owned(),
            shown: None,
            printed: BTreeMap::new(),
        }
    }

    /// What to write for `statuses` now, or `None` when nothing changed that this style shows.
    pub fn update(&mut self, statuses: &[Status]) -> Result<Option<String>, serde_json::Error> {
        match self.style {
            Style::Live => {
                let frame = status_text(statuses, &self.namespace);
                if self.shown.as_ref() == Some(&frame) {
                    return Ok(None);
                }
                let clear = self
                    .shown
                    .as_ref()
                    .map(|old| clear_lines(old.lines().count()))
                    .unwrap_or_default();
                let out = format!("{clear}{WRAP_OFF}{frame}{WRAP_ON}");
                self.shown = Some(frame);
                Ok(Some(out))
            }
            Style::Log => {
                let steady: Vec<Status> = statuses.iter().map(steady).collect();
                let key = status_text(&steady, &self.namespace);
                if self.shown.as_ref() == Some(&key) {
                    return Ok(None);
                }
                self.shown = Some(key);
                let frame = status_text(statuses, &self.namespace);
                // Frames of several lines (Deployments, or checks) are told apart by an empty line.
                let gap = if frame.lines().count() > 1 { "\n" } else { "" };
                Ok(Some(format!("{frame}{gap}")))
            }
            Style::Json => {
                self.printed
                    .retain(|name, _| statuses.iter().any(|s| s.name == *name));
                let mut out = String::new();
                for s in statuses {
                    let key = steady(s);
                    if self.printed.get(&s.name) != Some(&key) {
                        out += &serde_json::to_string(s)?;
                        out.push('\n');
                        self.printed.insert(s.name.clone(), key);
                    }
                }
                Ok((!out.is_empty()).then_some(out))
            }
        }
    }
}

/// How the rollout of a watched Deployment ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settled {
    /// The canary was promoted: its template is the stable one.
    Succeeded,
    /// No canary in flight nor pending: never one, not opted in, or the template went back to the
    /// stable one.
    NothingInFlight,
    /// The canary was aborted, or fledge cannot go on with it; why, as a sentence.
    Failed(String),
}

/// How the rollout of `deployment` ended, or `None` while there is something to wait for: a canary
/// in flight, or a new template the controller has not started yet. A settled state counts only
/// when it is about the pending template, so a past rollout's `Succeeded` does not end the watch of
/// a template just applied.
pub fn outcome(deployment: &Value, policies: &PolicySnapshot) -> Option<Settled> {
    let facts = DeploymentFacts::read(deployment, policies);
    let name = &facts.name;
    if let Some(why) = &facts.invalid {
        return Some(Settled::Failed(format!(
            "{name}'s fledge settings are invalid: {why}"
        )));
    }
    let state = match &facts.state {
        Ok(state) => state.as_ref(),
        // The controller stops at an unreadable state too, until someone repairs it.
        Err(e) => return Some(Settled::Failed(format!("{name}: {e}"))),
    };
    let pending = facts.pending();
    match state {
        Some(s) if pending.is_none_or(|p| p == s.hash) => match s.phase {
            // Also a revert the controller has not rolled back yet.
            Phase::Progressing | Phase::Paused | Phase::Promoting => None,
            Phase::Succeeded => Some(Settled::Succeeded),
            Phase::Aborted => Some(Settled::Failed(format!(
                "{name} was aborted: {}",
                s.message
            ))),
            // Rolled back to the stable template: it runs, nothing is pending.
            Phase::Idle | Phase::RolledBack => Some(Settled::NothingInFlight),
        },
        _ if facts.spec.is_some() && pending.is_some() => None,
        _ => Some(Settled::NothingInFlight),
    }
}

/// How [`watch`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The watched rollout settled (with a NAME only).
    Settled(Settled),
    /// `stop` resolved (Ctrl-C).
    Stopped,
}

/// Watches the opted-in Deployments of `namespace` (or `name` alone, opted in or not) and writes
/// the view to `out` as it changes, until `stop` resolves or, with a `name`, its rollout settles.
///
/// A failure before the first complete listing is returned (a wrong namespace, no access); after
/// it the watch is retried with backoff, as a controller's is.
pub async fn watch(
    client: Client,
    namespace: &str,
    name: Option<&str>,
    style: Style,
    out: &mut impl Write,
    stop: impl Future<Output = ()>,
) -> Result<Ending, CommandError> {
    // Read once: a watch is short, and the policy of a canary in flight is fixed in its state.
    let policies = policies::list(&client, Some(namespace)).await?;
    let api: Api<Deployment> = Api::namespaced(client, namespace);
    let config = match name {
        Some(name) => watcher::Config::default().fields(&format!("metadata.name={name}")),
        None if policies.namespace_opted_in(namespace) => {
            watcher::Config::default().labels(&format!("{LABEL_ENABLED}!=false"))
        }
        None => watcher::Config::default().labels(&format!("{LABEL_ENABLED}=true")),
    };
    let (store, writer) = reflector::store();
    let mut events = std::pin::pin!(reflector(writer, watcher(api, config).default_backoff()));
    let mut stop = std::pin::pin!(stop);
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut view = View::new(style, namespace);
    let mut listed = false;
    loop {
        tokio::select! {
            () = &mut stop => return Ok(Ending::Stopped),
            event = events.next() => match event {
                Some(Ok(watcher::Event::InitDone)) => listed = true,
                Some(Ok(_)) => {}
                Some(Err(e)) if listed => {
                    tracing::warn!(error = %e, "watching Deployments: retrying");
                    continue;
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err(CommandError::WatchEnded),
            },
            _ = ticks.tick() => {}
        }
        if !listed {
            continue;
        }
        let mut deployments = store
            .state()
            .iter()
            .map(|d| serde_json::to_value(&**d))
            .collect::<Result<Vec<_>, _>>()?;
        deployments.sort_by(|a, b| {
            a["metadata"]["name"]
                .as_str()
                .cmp(&b["metadata"]["name"].as_str())
        });
        let now = Timestamp::now();
        let statuses: Vec<Status> = deployments
            .iter()
            .map(|d| status_of(d, &policies, now))
            .collect();
        if let Some(text) = view.update(&statuses)? {
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
        if let Some(name) = name {
            // The field selector lets this Deployment alone through.
            let deployment = deployments.first().ok_or_else(|| CommandError::NotFound {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })?;
            if let Some(outcome) = outcome(deployment, &policies) {
                return Ok(Ending::Settled(outcome));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::builders::{self, mk_hash, mk_held, with_annotation};
    use crate::core::spec::Weight;
    use serde_json::json;

    /// The outcome without policies.
    fn settled(deployment: &Value) -> Option<Settled> {
        outcome(deployment, &PolicySnapshot::default())
    }

    fn mk_status(name: &str, phase: Phase, weight: &str, pause_left: Option<&str>) -> Status {
        Status {
            name: name.into(),
            namespace: "shop".into(),
            phase,
            step: 2,
            steps: 4,
            weight: Weight::parse_percent(weight).unwrap(),
            message: format!("{name} is {phase}"),
            pause_left: pause_left.map(Into::into),
            canary: Some("c2".into()),
            router: "smi",
            traffic: vec!["TrafficSplit web".into()],
            analysis: Vec::new(),
            policy: None,
        }
    }

    #[test]
    fn live_redraws_over_the_previous_frame_and_counts_down() {
        let mut view = View::new(Style::Live, "shop");
        let first = view
            .update(&[mk_status("web", Phase::Paused, "20", Some("30s"))])
            .unwrap()
            .unwrap();
        assert!(
            first.starts_with(WRAP_OFF),
            "nothing to clear yet: {first:?}"
        );
        assert!(first.contains("[##--------]  web is Paused (30s left)\n"));
        assert!(first.ends_with(WRAP_ON));
        let same = [mk_status("web", Phase::Paused, "20", Some("30s"))];
        assert_eq!(view.update(&same).unwrap(), None, "no change, no redraw");
        let two = [
            mk_status("api", Phase::Progressing, "5", None),
            mk_status("web", Phase::Paused, "20", Some("29s")),
        ];
        let next = view.update(&two).unwrap().unwrap();
        assert!(next.starts_with("\x1b[1A\x1b[J\x1b[?7l"), "{next:?}");
        assert!(next.contains("(29s left)"));
        let last = view.update(&[]).unwrap().unwrap();
        assert!(
            last.starts_with("\x1b[2A\x1b[J"),
            "clears both lines: {last:?}"
        );
        assert!(last.contains("no Deployment in shop is opted in to fledge\n"));
    }

    #[test]
    fn a_log_gets_a_frame_per_change_not_per_countdown_tick() {
        let mut view = View::new(Style::Log, "shop");
        let paused = |left| [mk_status("web", Phase::Paused, "20", Some(left))];
        let first = view.update(&paused("30s")).unwrap().unwrap();
        assert!(first.ends_with("web is Paused (30s left)\n"), "{first:?}");
        assert!(!first.contains('\x1b'), "no escapes in a log");
        assert_eq!(view.update(&paused("29s")).unwrap(), None);
        let next = view
            .update(&[mk_status("web", Phase::Progressing, "50", None)])
            .unwrap()
            .unwrap();
        assert!(next.contains("Progressing"));
        let two = view
            .update(&[
                mk_status("api", Phase::Idle, "0", None),
                mk_status("web", Phase::Progressing, "50", None),
            ])
            .unwrap()
            .unwrap();
        assert_eq!(two.lines().count(), 3, "two lines and a gap: {two:?}");
        assert!(two.ends_with("\n\n"));
    }

    #[test]
    fn json_prints_each_changed_deployment_on_one_line() {
        let mut view = View::new(Style::Json, "shop");
        let both = view
            .update(&[
                mk_status("api", Phase::Idle, "0", None),
                mk_status("web", Phase::Paused, "20", Some("30s")),
            ])
            .unwrap()
            .unwrap();
        let lines: Vec<Value> = both
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["pauseLeft"], "30s");
        assert_eq!(lines[1]["phase"], "Paused");
        let ticked = [
            mk_status("api", Phase::Idle, "0", None),
            mk_status("web", Phase::Paused, "20", Some("29s")),
        ];
        assert_eq!(view.update(&ticked).unwrap(), None);
        let changed = view
            .update(&[
                mk_status("api", Phase::Progressing, "0", None),
                mk_status("web", Phase::Paused, "20", Some("28s")),
            ])
            .unwrap()
            .unwrap();
        assert_eq!(changed.lines().count(), 1);
        assert!(changed.contains(r#""name":"api""#), "{changed}");
        // A Deployment that went and came back is printed again.
        view.update(&[]).unwrap();
        assert!(view.update(&ticked).unwrap().is_some());
    }

    #[test]
    fn a_check_that_changes_is_a_change_its_countdown_is_not() {
        let with_check = |taken: u32, next_in: &str| {
            let mut s = mk_status("web", Phase::Progressing, "5", None);
            s.analysis = vec![CheckStatus {
                name: "error-rate".into(),
                step: None,
                phase: crate::core::analysis::schedule::RunPhase::Running,
                provider: Some("web"),
                last_value: None,
                last_outcome: None,
                success_condition: None,
                failure_condition: None,
                taken,
                count: Some(5),
                successful: taken,
                failed: 0,
                inconclusive: 0,
                errors: 0,
                consecutive_errors: 0,
                failure_limit: Some(0),
                inconclusive_limit: Some(0),
                consecutive_error_limit: Some(4),
                next_measurement: Some(format!("2027-01-15T08:00:{}0Z", taken)),
                next_in: Some(next_in.into()),
                dry_run: false,
                measurements: Vec::new(),
            }];
            [s]
        };
        let mut log = View::new(Style::Log, "shop");
        let first = log.update(&with_check(1, "in 9s")).unwrap().unwrap();
        assert_eq!(
            first.lines().count(),
            3,
            "a line, the check's, a gap: {first:?}"
        );
        assert!(first.contains("next in 9s"), "{first}");
        assert_eq!(log.update(&with_check(1, "in 8s")).unwrap(), None);
        assert!(log.update(&with_check(2, "in 9s")).unwrap().is_some());
        let mut json = View::new(Style::Json, "shop");
        assert!(json.update(&with_check(1, "in 9s")).unwrap().is_some());
        assert_eq!(json.update(&with_check(1, "in 8s")).unwrap(), None);
        assert!(json.update(&with_check(2, "in 9s")).unwrap().is_some());
        let mut live = View::new(Style::Live, "shop");
        live.update(&with_check(1, "in 9s")).unwrap();
        let ticked = live.update(&with_check(1, "in 8s")).unwrap().unwrap();
        assert!(
            ticked.starts_with("\x1b[2A\x1b[J"),
            "redrawn over both lines: {ticked:?}"
        );
    }

    const STABLE: &str = "- setWeight: 20\n- pause: {}\n";

    /// Deployment `web` whose template runs `image`, held against the template of `stable` when
    /// given, with a stored state.
    fn mk_deployment(image: &str, stable: Option<&str>, state: Option<(&str, &str)>) -> Value {
        let d = match stable {
            Some(stable) => mk_held(stable, image),
            None => builders::mk_deployment(image),
        };
        let d = with_annotation(d, "fledge.dev/steps", STABLE);
        match state {
            Some((phase, hash)) => with_annotation(
                d,
                "fledge.dev/state",
                &json!({"phase": phase, "hash": hash, "step": 1, "weight": "20", "message": "why not"})
                    .to_string(),
            ),
            None => d,
        }
    }

    #[test]
    fn a_rollout_settles_at_success_or_abort_of_the_pending_template() {
        let v2 = mk_hash("web:2");
        let held = |phase| mk_deployment("web:2", Some("web:1"), Some((phase, &v2)));
        let unpaused = |phase| mk_deployment("web:2", None, Some((phase, &v2)));
        assert_eq!(settled(&held("Paused")), None);
        assert_eq!(settled(&held("Promoting")), None);
        assert_eq!(settled(&unpaused("Promoting")), None);
        assert_eq!(settled(&unpaused("Succeeded")), Some(Settled::Succeeded));
        assert_eq!(
            settled(&held("Aborted")),
            Some(Settled::Failed("web was aborted: why not".into()))
        );
        // A new template over a settled one: the controller has yet to start it.
        for phase in ["Succeeded", "Aborted"] {
            let v3 = mk_deployment("web:3", Some("web:1"), Some((phase, &v2)));
            assert_eq!(settled(&v3), None);
        }
        // Back to the stable template: the rollback is waited for, then nothing is in flight.
        let reverted = |phase| mk_deployment("web:1", None, Some((phase, &v2)));
        assert_eq!(settled(&reverted("Paused")), None);
        assert_eq!(
            settled(&reverted("RolledBack")),
            Some(Settled::NothingInFlight)
        );
    }

    #[test]
    fn nothing_to_wait_for_without_a_canary_and_a_failure_when_fledge_cannot_run_it() {
        assert_eq!(
            settled(&mk_deployment("web:1", None, None)),
            Some(Settled::NothingInFlight)
        );
        assert_eq!(
            settled(&mk_deployment("web:2", Some("web:1"), None)),
            None,
            "a pending canary waits for the controller"
        );
        let mut not_opted_in = mk_deployment("web:2", Some("web:1"), None);
        not_opted_in["metadata"]["labels"] = json!({});
        assert_eq!(settled(&not_opted_in), Some(Settled::NothingInFlight));
        let mut invalid = mk_deployment("web:2", Some("web:1"), None);
        invalid["metadata"]["annotations"]["fledge.dev/steps"] = json!("- setWeight: 150\n");
        assert!(matches!(settled(&invalid), Some(Settled::Failed(why)) if why.contains("150")));
        let mut unreadable = mk_deployment("web:2", Some("web:1"), None);
        unreadable["metadata"]["annotations"]["fledge.dev/state"] = json!("{");
        assert!(matches!(settled(&unreadable), Some(Settled::Failed(_))));
    }
}
