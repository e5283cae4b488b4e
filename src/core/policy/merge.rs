//! A Deployment's settings under its policy: the policy's defaults where the Deployment's own
//! annotations say nothing, its required checks always, and its guard-rails checked against the
//! result. Errors name the annotation place and the policy, e.g. `fledge.dev/steps[2].setWeight: a
//! jump from 5 to 80 exceeds maxStepWeight 25 of RolloutPolicy shop/defaults`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_yaml_ng::Value as Yaml;

use super::window::PromotionWindows;
use super::{Policy, PolicyRules};
use crate::core::analysis::ANNOTATION_ANALYSIS;
use crate::core::spec::{
    self, ANNOTATION_HTTP_ROUTES, ANNOTATION_ROUTER, ANNOTATION_STEPS, CanarySpec, SpecError, Step,
    Weight,
};

/// Where the annotations' places are in a policy's spec, for a policy's own problems.
const PLACES: [(&str, &str); 4] = [
    (ANNOTATION_STEPS, "spec.steps"),
    (ANNOTATION_ANALYSIS, "spec.analysis"),
    (ANNOTATION_ROUTER, "spec.router"),
    (ANNOTATION_HTTP_ROUTES, "spec.httpRoutes"),
];

/// The settings of Deployment `name` with `annotations` under `policy`.
pub fn resolve(
    name: &str,
    annotations: &BTreeMap<String, String>,
    policy: Option<&Policy>,
) -> Result<CanarySpec, SpecError> {
    let Some(policy) = policy else {
        return spec::parse(name, annotations);
    };
    let own = policy_problems(policy);
    if !own.is_empty() {
        return Err(SpecError {
            problems: own
                .into_iter()
                .map(|p| format!("{} is invalid: {p}", policy.id))
                .collect(),
        });
    }
    let mut problems = Vec::new();
    let effective = merged_annotations(annotations, policy, &mut problems);
    let mut spec = match spec::parse(name, &effective) {
        Ok(spec) => spec,
        Err(e) => {
            problems.extend(e.problems);
            return Err(SpecError { problems });
        }
    };
    check_guard_rails(&spec, &policy.rules, &policy.id.to_string(), &mut problems);
    if !problems.is_empty() {
        return Err(SpecError { problems });
    }
    // Read without problems by `policy_problems` above.
    spec.windows = windows(&policy.rules).unwrap_or_default();
    spec.progress_deadline = policy
        .rules
        .progress_deadline_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs);
    spec.policy = Some(policy.id.clone());
    Ok(spec)
}

/// The annotations with the policy's defaults filled in where the Deployment has none, and the
/// policy's required checks added to the Deployment's own.
fn merged_annotations(
    annotations: &BTreeMap<String, String>,
    policy: &Policy,
    problems: &mut Vec<String>,
) -> BTreeMap<String, String> {
    let rules = &policy.rules;
    let mut merged = annotations.clone();
    let mut default = |key: &str, value: Option<String>| {
        if let Some(value) = value {
            merged.entry(key.to_owned()).or_insert(value);
        }
    };
    default(ANNOTATION_STEPS, rules.steps.as_ref().map(json_text));
    default(
        ANNOTATION_ROUTER,
        rules.router.map(|r| r.as_str().to_owned()),
    );
    // Routes go with the router: a Deployment that picks its own router does not inherit them.
    if !annotations.contains_key(ANNOTATION_ROUTER) {
        default(
            ANNOTATION_HTTP_ROUTES,
            rules.http_routes.as_ref().map(|r| r.join(",")),
        );
    }
    let policy_checks = rules.analysis.as_deref().unwrap_or_default();
    let required = required_checks(rules);
    match annotations.get(ANNOTATION_ANALYSIS) {
        None if !policy_checks.is_empty() => {
            merged.insert(ANNOTATION_ANALYSIS.to_owned(), json_text(policy_checks));
        }
        None => {}
        Some(text) if required.is_empty() => {
            merged.insert(ANNOTATION_ANALYSIS.to_owned(), text.clone());
        }
        Some(text) => {
            // An annotation that is not a list is reported by the parser as it stands.
            let Ok(Yaml::Sequence(mut own)) = serde_yaml_ng::from_str::<Yaml>(text) else {
                return merged;
            };
            for (i, check) in own.iter().enumerate() {
                let Some(name) = check.get("name").and_then(Yaml::as_str) else {
                    continue;
                };
                if required.contains(&name) {
                    problems.push(format!(
                        "{ANNOTATION_ANALYSIS}[{i}].name: {name:?} is a required check of {}, which runs as the policy defines it; give yours another name",
                        policy.id
                    ));
                }
            }
            own.extend(
                policy_checks
                    .iter()
                    .filter(|c| required.contains(&check_name(c)))
                    .filter_map(|c| serde_yaml_ng::to_value(c).ok()),
            );
            merged.insert(ANNOTATION_ANALYSIS.to_owned(), json_text(&own));
        }
    }
    merged
}

fn check_name(check: &serde_json::Value) -> &str {
    check["name"].as_str().unwrap_or_default()
}

fn required_checks(rules: &PolicyRules) -> Vec<&str> {
    rules
        .guard_rails
        .as_ref()
        .and_then(|g| g.required_checks.as_ref())
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect()
}

fn json_text<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn windows(rules: &PolicyRules) -> Result<PromotionWindows, super::WindowError> {
    PromotionWindows::read(
        rules.promotion_windows.as_deref().unwrap_or_default(),
        "spec.promotionWindows",
    )
}

/// What is wrong with a policy by itself, each with its place in the policy's spec: its steps and
/// checks read as the annotations are, its guard-rails against its own steps, its windows.
pub fn policy_problems(policy: &Policy) -> Vec<String> {
    let rules = &policy.rules;
    let mut annotations = BTreeMap::new();
    if let Some(steps) = &rules.steps {
        annotations.insert(ANNOTATION_STEPS.to_owned(), json_text(steps));
    }
    if let Some(checks) = &rules.analysis {
        annotations.insert(ANNOTATION_ANALYSIS.to_owned(), json_text(checks));
    }
    if let Some(router) = rules.router {
        annotations.insert(ANNOTATION_ROUTER.to_owned(), router.as_str().to_owned());
    }
    if let Some(routes) = &rules.http_routes {
        annotations.insert(ANNOTATION_HTTP_ROUTES.to_owned(), routes.join(","));
    }
    let mut problems = Vec::new();
    if let Err(e) = windows(rules) {
        problems.push(e.to_string());
    }
    if let Some(text) = rules
        .guard_rails
        .as_ref()
        .and_then(|g| g.min_pause.as_ref())
        && let Err(why) = spec::parse_duration(text)
    {
        problems.push(format!("spec.guardRails.minPause: {text:?} {why}"));
    }
    for name in required_checks(rules) {
        if !rules
            .analysis
            .iter()
            .flatten()
            .any(|c| check_name(c) == name)
        {
            problems.push(format!(
                "spec.guardRails.requiredChecks: {name:?} is not a check of spec.analysis"
            ));
        }
    }
    // The steps are what the checks are linked to; without any, a placeholder step lets the
    // checks be read (as background checks) without a complaint about missing steps.
    let has_steps = annotations.contains_key(ANNOTATION_STEPS);
    if !has_steps {
        annotations.insert(ANNOTATION_STEPS.to_owned(), "[{pause: {}}]".to_owned());
    }
    let id = policy.id.to_string();
    // The name only matters for the Service names derived from a Deployment's name.
    match spec::parse("policy", &annotations) {
        Ok(spec) if has_steps => check_guard_rails(&spec, rules, &id, &mut problems),
        Ok(_) => {}
        Err(e) => problems.extend(e.problems.into_iter().filter_map(|p| {
            // Without steps of its own, a policy's background checks only need to be readable.
            if !has_steps && p.contains(".startingStep:") {
                return None;
            }
            Some(in_policy(&p))
        })),
    }
    problems
}

/// A problem's annotation place as the place in a policy's spec.
fn in_policy(problem: &str) -> String {
    PLACES
        .iter()
        .find_map(|(annotation, field)| {
            problem
                .strip_prefix(annotation)
                .map(|rest| format!("{field}{rest}"))
        })
        .unwrap_or_else(|| problem.to_owned())
}

/// The guard-rails the steps and router must keep; each breach names its step and the policy.
fn check_guard_rails(spec: &CanarySpec, rules: &PolicyRules, id: &str, problems: &mut Vec<String>) {
    let Some(rails) = &rules.guard_rails else {
        return;
    };
    if let Some(max) = rails.max_step_weight {
        let max_bp =
            u16::try_from(max.saturating_mul(100)).unwrap_or(if max < 0 { 0 } else { u16::MAX });
        let mut previous = Weight::ZERO;
        for (i, step) in spec.steps.iter().enumerate() {
            let Step::SetWeight(w) = step else { continue };
            if w.basis_points().saturating_sub(previous.basis_points()) > max_bp {
                problems.push(format!(
                    "{ANNOTATION_STEPS}[{i}].setWeight: a jump from {previous} to {w} exceeds maxStepWeight {max} of {id}; add steps in between"
                ));
            }
            previous = *w;
        }
    }
    if let Some(min) = rails
        .min_pause
        .as_deref()
        .and_then(|t| spec::parse_duration(t).ok())
    {
        check_min_pause(
            &spec.steps,
            min,
            rails.min_pause.as_deref().unwrap_or_default(),
            id,
            problems,
        );
    }
    if let Some(allowed) = &rails.allowed_routers
        && !allowed.iter().any(|r| r.as_str() == spec.router.name())
    {
        let names: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
        problems.push(format!(
            "{ANNOTATION_ROUTER}: the router {} is not one of allowedRouters {} of {id}",
            spec.router.name(),
            names.join(", ")
        ));
    }
}

/// Between two weight steps, the pauses must add up to `min`; an untimed pause waits for a person,
/// which is long enough.
fn check_min_pause(
    steps: &[Step],
    min: Duration,
    text: &str,
    id: &str,
    problems: &mut Vec<String>,
) {
    let mut paused: Option<Duration> = None;
    let mut last_weight: Option<usize> = None;
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::SetWeight(_) => {
                if let (Some(prev), Some(p)) = (last_weight, paused)
                    && p < min
                {
                    problems.push(format!(
                        "{ANNOTATION_STEPS}[{i}].setWeight: {} of pause since {ANNOTATION_STEPS}[{prev}] is less than minPause {text} of {id}; add a pause such as `- pause: {{duration: {text}}}` before it",
                        spec::format_duration(p)
                    ));
                }
                last_weight = Some(i);
                paused = Some(Duration::ZERO);
            }
            Step::PauseFor(d) => paused = paused.map(|p| p.saturating_add(*d)),
            Step::PauseUntilPromoted => paused = paused.map(|_| Duration::MAX),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
