//! Analysis: the checks that judge a canary (`fledge.dev/analysis`), what one measurement means,
//! and when each check measures next. Pure: the providers that measure live in
//! `runtime::analysis`.
//!
//! - [`checks`] parses the annotation into [`Check`]s (every error names its place);
//! - [`condition`] compiles and evaluates the CEL conditions, bounded in time and size;
//! - [`schedule`] keeps each check's measurements in the rollout state and says which are due.

use std::time::Duration;

pub mod checks;
pub mod condition;
pub mod schedule;

pub use condition::Condition;

/// The checks of a Deployment: a YAML list of named checks.
pub const ANNOTATION_ANALYSIS: &str = "fledge.dev/analysis";

/// One named check, as the user wrote it in `fledge.dev/analysis`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    /// Time between two measurements.
    pub interval: Duration,
    /// How many measurements make the check; `None`: as many as fit until the rollout ends (only a
    /// background check can run unbounded; an inline one without `count` measures once).
    pub count: Option<u32>,
    /// Wait before the first measurement.
    pub initial_delay: Duration,
    pub success_condition: Option<Condition>,
    pub failure_condition: Option<Condition>,
    /// Failed measurements tolerated; one more fails the check.
    pub failure_limit: u32,
    /// Inconclusive measurements tolerated; one more holds the canary.
    pub inconclusive_limit: u32,
    /// Errors in a row tolerated; one more fails the check.
    pub consecutive_error_limit: u32,
    pub no_data: NoData,
    /// Measured and shown, never acts.
    pub dry_run: bool,
    /// A background check (one that no `analysis` step names) starts at this step index; 0 by
    /// default. `None` for a check that an `analysis` step names.
    pub starting_step: Option<usize>,
    pub provider: Provider,
}

/// What an empty result (no series, or NaN) counts as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NoData {
    #[default]
    Inconclusive,
    Fail,
    Pass,
}

/// Where a check's measurements come from. Texts may hold `{{variables}}` (see [`Variables`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Provider {
    Prometheus(PrometheusQuery),
    Web(WebRequest),
    Job(JobCheck),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrometheusQuery {
    pub query: String,
    /// `None`: the address `fledge serve --prometheus-address` was given.
    pub address: Option<String>,
    pub timeout: Duration,
    pub auth: Option<PrometheusAuth>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrometheusAuth {
    Bearer(SecretValue),
    Basic {
        username: SecretValue,
        password: SecretValue,
    },
}

/// A text given inline or read from a key of a Secret in the Deployment's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretValue {
    Literal(String),
    SecretKey { name: String, key: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebRequest {
    pub url: String,
    pub method: String,
    pub headers: Vec<(String, SecretValue)>,
    pub body: Option<String>,
    /// RFC 9535 JSONPath into the JSON answer; `None`: the whole answer (JSON, or else its text).
    pub json_path: Option<String>,
    pub timeout: Duration,
}

/// An in-cluster test: a Job created from `spec` (a `batch/v1` JobSpec, as JSON) per measurement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobCheck {
    pub spec: serde_json::Value,
}

/// The values `{{name}}` stands for in queries, URLs, headers and bodies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variables {
    pub namespace: String,
    pub deployment: String,
    pub canary_service: String,
    pub stable_service: String,
    pub root_service: String,
    pub canary_hash: String,
    pub stable_pod_template_hash: String,
    /// The check's interval, in Prometheus' duration syntax (`30s`).
    pub interval: String,
}

/// What a provider read, before any condition judged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reading {
    /// A value for the conditions: a number (a Prometheus scalar or one-sample vector), a list of
    /// numbers (a vector), or any JSON (a web answer).
    Value(serde_json::Value),
    /// An empty vector, or NaN: the check's `noData` decides, and no condition sees it.
    NoData,
    /// The provider could not measure (unreachable, timeout, non-2xx, bad answer).
    Error(String),
    /// A Job ended: `passed` is its Complete condition (else Failed); the message names the Job.
    Finished { passed: bool, message: String },
}

/// What one measurement counts as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    Successful,
    Failed,
    Inconclusive,
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Successful,
        Outcome::Failed,
        Outcome::Inconclusive,
        Outcome::Error,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Successful => "Successful",
            Outcome::Failed => "Failed",
            Outcome::Inconclusive => "Inconclusive",
            Outcome::Error => "Error",
        }
    }
}

impl Variables {
    /// The names `{{…}}` may use, as written.
    pub const NAMES: [&'static str; 8] = [
        "namespace",
        "deployment",
        "canaryService",
        "stableService",
        "rootService",
        "canaryHash",
        "stablePodTemplateHash",
        "interval",
    ];

    fn value(&self, name: &str) -> Option<&str> {
        Some(match name {
            "namespace" => &self.namespace,
            "deployment" => &self.deployment,
            "canaryService" => &self.canary_service,
            "stableService" => &self.stable_service,
            "rootService" => &self.root_service,
            "canaryHash" => &self.canary_hash,
            "stablePodTemplateHash" => &self.stable_pod_template_hash,
            "interval" => &self.interval,
            _ => return None,
        })
    }

    /// `text` with every `{{name}}` (spaces inside the braces allowed) replaced by its value. The
    /// parser refuses unknown names at apply time; one met here anyway is left as written.
    pub fn expand(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            out.push_str(&rest[..open]);
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                rest = &rest[open..];
                break;
            };
            match self.value(after[..close].trim()) {
                Some(value) => out.push_str(value),
                None => out.push_str(&rest[open..open + 2 + close + 2]),
            }
            rest = &after[close + 2..];
        }
        out.push_str(rest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Variables {
        Variables {
            namespace: "shop".into(),
            deployment: "web".into(),
            canary_service: "web-canary".into(),
            stable_service: "web-stable".into(),
            root_service: "web".into(),
            canary_hash: "abc".into(),
            stable_pod_template_hash: "5d8f".into(),
            interval: "30s".into(),
        }
    }

    #[test]
    fn variables_expand_and_unknown_ones_stay() {
        let v = vars();
        assert_eq!(
            v.expand(r#"rate(x{service="{{canaryService}}",ns="{{ namespace }}"}[{{interval}}])"#),
            r#"rate(x{service="web-canary",ns="shop"}[30s])"#
        );
        assert_eq!(v.expand("{{nope}} {{deployment}}"), "{{nope}} web");
        assert_eq!(v.expand("a {{deployment"), "a {{deployment");
        assert_eq!(v.expand("{{}}{{"), "{{}}{{");
        for name in Variables::NAMES {
            assert_ne!(
                v.expand(&format!("{{{{{name}}}}}")),
                format!("{{{{{name}}}}}")
            );
        }
    }
}
