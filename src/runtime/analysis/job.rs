//! A Job check: one `batch/v1` Job per measurement, created from the check's JobSpec, owned by
//! the Deployment, and judged by how it ends.

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};

use super::{MeasureContext, MeasureError};
use crate::core::analysis::{JobCheck, Reading, Variables};

/// Label of a check's Job: the Deployment whose canary it judges.
pub const LABEL_DEPLOYMENT: &str = "fledge.dev/deployment";
/// Label of a check's Job: the canary's template hash.
pub const LABEL_CANARY_HASH: &str = "fledge.dev/canary-hash";
/// Label of a check's Job: the check's name.
pub const LABEL_CHECK: &str = "fledge.dev/check";

/// Watch errors in a row after which the wait gives up (the watcher backs off between them).
const WATCH_ERRORS: u32 = 5;

pub(super) async fn measure(
    ctx: &MeasureContext,
    check_name: &str,
    check: &JobCheck,
    job_name: &str,
) -> Result<Reading, MeasureError> {
    let ns = ctx.namespace.as_str();
    let labels = [
        (LABEL_DEPLOYMENT, ctx.variables.deployment.as_str()),
        (LABEL_CANARY_HASH, ctx.variables.canary_hash.as_str()),
        (LABEL_CHECK, check_name),
    ];
    let object = manifest(ctx, &labels, check, job_name)?;
    let api_err = |what: &'static str| {
        move |source| MeasureError::JobApi {
            namespace: ns.to_string(),
            name: job_name.to_string(),
            what,
            source: Box::new(source),
        }
    };
    let dynamic: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &ApiResource::erase::<Job>(&()));
    match dynamic.create(&PostParams::default(), &object).await {
        Ok(_) => {}
        // A restarted controller, or a second measurement racing this one: the Job with this
        // name is this measurement's; wait for it instead of starting another.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
            if let Some(existing) = jobs.get_opt(job_name).await.map_err(api_err("reading"))? {
                let theirs = existing.metadata.labels.unwrap_or_default();
                if labels
                    .iter()
                    .any(|(k, v)| theirs.get(*k).map(String::as_str) != Some(*v))
                {
                    return Err(MeasureError::JobNotOurs {
                        namespace: ns.to_string(),
                        name: job_name.to_string(),
                    });
                }
            }
        }
        Err(e) => return Err(api_err("creating")(e)),
    }
    wait(ctx, job_name).await
}

/// The Job to create: the check's spec (its texts' `{{variables}}` expanded; the pod template's
/// `restartPolicy` `Never` unless given, since a Job refuses the pod default `Always`), named
/// `job_name`, labelled, owned by the Deployment.
fn manifest(
    ctx: &MeasureContext,
    labels: &[(&str, &str)],
    check: &JobCheck,
    job_name: &str,
) -> Result<DynamicObject, MeasureError> {
    let invalid = |detail: &str| MeasureError::JobSpec {
        namespace: ctx.namespace.clone(),
        name: job_name.to_string(),
        detail: detail.to_string(),
    };
    let mut spec = check.spec.clone();
    if !spec.is_object() {
        return Err(invalid("the spec must be a batch/v1 JobSpec object"));
    }
    expand_strings(&ctx.variables, &mut spec);
    let pod_spec = spec
        .pointer_mut("/template/spec")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| invalid("no template.spec"))?;
    pod_spec
        .entry("restartPolicy")
        .or_insert_with(|| json!("Never"));
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let object = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name,
            "namespace": ctx.namespace,
            "labels": labels,
            "ownerReferences": [ctx.owner],
        },
        "spec": spec,
    });
    serde_json::from_value(object).map_err(|e| invalid(&e.to_string()))
}

/// Replaces `{{variables}}` in every string of `value` (keys are left as written).
fn expand_strings(variables: &Variables, value: &mut Value) {
    match value {
        Value::String(s) if s.contains("{{") => *s = variables.expand(s),
        Value::Array(items) => items.iter_mut().for_each(|v| expand_strings(variables, v)),
        Value::Object(map) => map.values_mut().for_each(|v| expand_strings(variables, v)),
        _ => {}
    }
}

/// Watches Job `name` until it is Complete or Failed.
async fn wait(ctx: &MeasureContext, name: &str) -> Result<Reading, MeasureError> {
    let ns = ctx.namespace.as_str();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(jobs, config).default_backoff().boxed();
    let deleted = || MeasureError::JobDeleted {
        namespace: ns.to_string(),
        name: name.to_string(),
    };
    let mut listed = false;
    let mut errors = 0;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(job) | watcher::Event::InitApply(job)) => {
                errors = 0;
                listed = true;
                if let Some(reading) = finished(&job, ns, name) {
                    return Ok(reading);
                }
            }
            Ok(watcher::Event::Delete(_)) => return Err(deleted()),
            Ok(watcher::Event::Init) => listed = false,
            Ok(watcher::Event::InitDone) => {
                errors = 0;
                if !listed {
                    return Err(deleted());
                }
            }
            Err(e) => {
                errors += 1;
                tracing::debug!(job = name, namespace = ns, error = %e, "watching a check's Job");
                if errors >= WATCH_ERRORS {
                    return Err(MeasureError::JobWatch {
                        namespace: ns.to_string(),
                        name: name.to_string(),
                        detail: e.to_string(),
                    });
                }
            }
        }
    }
    Err(MeasureError::JobWatch {
        namespace: ns.to_string(),
        name: name.to_string(),
        detail: "the watch ended".into(),
    })
}

/// The reading of a Job that ended (a `Complete` or `Failed` condition with status `True`).
pub(super) fn finished(job: &Job, ns: &str, name: &str) -> Option<Reading> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    let logs = format!("logs: kubectl logs job/{name} -n {ns}");
    for c in conditions.iter().filter(|c| c.status == "True") {
        match c.type_.as_str() {
            "Complete" => {
                return Some(Reading::Finished {
                    passed: true,
                    message: format!("Job {ns}/{name} completed; {logs}"),
                });
            }
            "Failed" => {
                let why = [c.reason.as_deref(), c.message.as_deref()]
                    .into_iter()
                    .flatten()
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(": ");
                let why = if why.is_empty() {
                    String::new()
                } else {
                    format!(": {why}")
                };
                return Some(Reading::Finished {
                    passed: false,
                    message: format!("Job {ns}/{name} failed{why}; {logs}"),
                });
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(conditions: Value) -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": "j"},
            "status": {"conditions": conditions},
        }))
        .expect("a Job")
    }

    #[test]
    fn only_terminal_true_conditions_end_the_wait() {
        assert_eq!(finished(&job(json!([])), "ns", "j"), None);
        let pending = json!([{"type": "SuccessCriteriaMet", "status": "True"},
                             {"type": "Complete", "status": "False"}]);
        assert_eq!(finished(&job(pending), "ns", "j"), None);
        assert_eq!(
            finished(
                &job(json!([{"type": "Complete", "status": "True"}])),
                "ns",
                "j"
            ),
            Some(Reading::Finished {
                passed: true,
                message: "Job ns/j completed; logs: kubectl logs job/j -n ns".into()
            })
        );
        let failed = json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                             "message": "Job has reached the specified backoff limit"}]);
        assert_eq!(
            finished(&job(failed), "ns", "j"),
            Some(Reading::Finished {
                passed: false,
                message: "Job ns/j failed: BackoffLimitExceeded: Job has reached the specified \
                          backoff limit; logs: kubectl logs job/j -n ns"
                    .into()
            })
        );
    }
}
