//! Kubernetes Events for rollout transitions.
//!
//! An Event is named after the transition it announces: the Deployment, the state it leaves (as
//! stored) and the reason. It is created before the new state is stored, so a process killed in
//! between announces the same transition again under the same name, and the API server keeps one
//! (409 AlreadyExists). A generated name would lose the Event (store first) or repeat it
//! (announce first).

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::{Api, Client};
use sha2::{Digest, Sha256};

use crate::core::rollout::machine;

/// The `action` of every Event fledge records.
const ACTION: &str = "Rollout";
/// events.k8s.io/v1 refuses a longer `note`.
const MAX_NOTE_BYTES: usize = 1024;

/// Who records the Events: the controller, or a user's command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reporter {
    /// `reportingController`, e.g. `fledge.dev/controller`.
    pub controller: String,
    /// `reportingInstance`: the pod, or the user's machine.
    pub instance: String,
}

/// The Event announcing `event` for the Deployment `regarding`, whose `fledge.dev/state` as
/// stored before the transition is `stored_state`, and whose pod template has `template_hash`.
pub fn transition_event(
    regarding: ObjectReference,
    stored_state: Option<&str>,
    template_hash: &str,
    event: &machine::Event,
    reporter: &Reporter,
    now: Timestamp,
) -> Event {
    let name = regarding.name.clone().unwrap_or_default();
    let uid = regarding.uid.clone().unwrap_or_default();
    let mut hasher = Sha256::new();
    for part in [
        uid.as_str(),
        stored_state.unwrap_or_default(),
        template_hash,
        event.reason,
    ] {
        // Length-prefixed, so that no two different tuples hash alike.
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    let digest: String = hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{digest}")),
            namespace: regarding.namespace.clone(),
            ..ObjectMeta::default()
        },
        action: Some(ACTION.to_owned()),
        reason: Some(event.reason.to_owned()),
        note: Some(truncated(&event.message, MAX_NOTE_BYTES)),
        type_: Some(if event.warning { "Warning" } else { "Normal" }.to_owned()),
        event_time: Some(MicroTime(now)),
        regarding: Some(regarding),
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(reporter.instance.clone()),
        ..Event::default()
    }
}

/// `text`, cut at a character boundary to at most `max` bytes (ending in `…` when cut).
fn truncated(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let ellipsis = '…';
    let mut end = max - ellipsis.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ellipsis}", &text[..end])
}

/// Records `event`; one already recorded under its name counts as recorded.
pub async fn record(client: &Client, event: &Event) -> Result<(), kube::Error> {
    let namespace = event.metadata.namespace.as_deref().unwrap_or("default");
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    match events.create(&Default::default(), event).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> ObjectReference {
        ObjectReference {
            api_version: Some("apps/v1".into()),
            kind: Some("Deployment".into()),
            name: Some("web".into()),
            namespace: Some("shop".into()),
            uid: Some("u-1".into()),
            ..ObjectReference::default()
        }
    }

    fn weight_set(message: &str) -> machine::Event {
        machine::Event {
            reason: "WeightSet",
            message: message.to_owned(),
            warning: false,
        }
    }

    fn reporter() -> Reporter {
        Reporter {
            controller: "fledge.dev/controller".into(),
            instance: "fledge-0".into(),
        }
    }

    fn name_of(state: &str, event: &machine::Event, now: Timestamp) -> String {
        transition_event(web(), Some(state), "c2", event, &reporter(), now)
            .metadata
            .name
            .unwrap()
    }

    #[test]
    fn the_same_transition_has_the_same_name_whenever_it_is_announced() {
        let event = weight_set("step 1/3: canary weight 5%");
        let first = name_of(r#"{"step":0}"#, &event, Timestamp::UNIX_EPOCH);
        assert_eq!(first, name_of(r#"{"step":0}"#, &event, Timestamp::now()));
        assert!(first.starts_with("web.") && first.len() == "web.".len() + 16);
        // Another state left, another reason, another Deployment: another Event.
        assert_ne!(first, name_of(r#"{"step":1}"#, &event, Timestamp::now()));
        let other_reason = machine::Event {
            reason: "Promoting",
            ..event.clone()
        };
        assert_ne!(
            first,
            name_of(r#"{"step":0}"#, &other_reason, Timestamp::now())
        );
        let other = ObjectReference {
            uid: Some("u-2".into()),
            ..web()
        };
        let other = transition_event(
            other,
            Some(r#"{"step":0}"#),
            "c2",
            &event,
            &reporter(),
            Timestamp::now(),
        );
        assert_ne!(Some(first), other.metadata.name);
    }

    #[test]
    fn the_event_carries_what_kubectl_shows() {
        let now = Timestamp::UNIX_EPOCH;
        let warning = machine::Event {
            reason: "ProgressDeadlineExceeded",
            message: "canary web-canary was not available within 600s".into(),
            warning: true,
        };
        let e = transition_event(web(), Some("{}"), "c2", &warning, &reporter(), now);
        assert_eq!(e.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reason.as_deref(), Some("ProgressDeadlineExceeded"));
        assert_eq!(e.note, Some(warning.message));
        assert_eq!(e.action.as_deref(), Some(ACTION));
        assert_eq!(e.regarding, Some(web()));
        assert_eq!(e.event_time, Some(MicroTime(now)));
        assert_eq!(
            (e.reporting_controller, e.reporting_instance),
            (
                Some("fledge.dev/controller".into()),
                Some("fledge-0".into())
            )
        );
    }
}
