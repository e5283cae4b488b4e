//! `fledge plan`: the webhook's very decision, run offline on two manifests, and what would follow
//! from it: the patch, the objects fledge creates, and the step timeline.

use std::fmt::Write as _;

use json_patch::PatchOperation;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::core::admission::{
    self, AdmissionOutcome, Decision, PatchReason, ReviewRequest, review,
};
use crate::core::analysis::{Check, Provider};
use crate::core::objects::{self, Desired, SplitApi};
use crate::core::podratio::PodShare;
use crate::core::policy::{self, Policy, PolicySnapshot};
use crate::core::rollout::{self, Timeline};
use crate::core::routes::RouteExtras;
use crate::core::spec::{self, CanarySpec, Router, Step, Weight, format_duration};
use crate::core::template;

/// Stands in for the stable ReplicaSet's `pod-template-hash`, which only the cluster knows.
pub const STABLE_HASH_PLACEHOLDER: &str = "STABLE-POD-TEMPLATE-HASH";

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{file}: not valid YAML: {source}")]
    Yaml {
        file: String,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("{file}: no apps/v1 Deployment in the file")]
    NoDeployment { file: String },
    #[error("{file}: {count} Deployments in the file; plan takes one")]
    ManyDeployments { file: String, count: usize },
    #[error("--from and --to hold different Deployments ({from} and {to})")]
    DifferentDeployments { from: String, to: String },
    #[error("building the AdmissionRequest: {0}")]
    Request(String),
}

/// The Kubernetes objects of one manifest file.
pub struct Manifest {
    pub file: String,
    pub objects: Vec<Value>,
}

impl Manifest {
    /// Reads a YAML (or JSON) stream of one or more documents.
    pub fn parse(file: &str, text: &str) -> Result<Manifest, PlanError> {
        let mut objects = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(text) {
            let value = Value::deserialize(doc).map_err(|source| PlanError::Yaml {
                file: file.to_owned(),
                source,
            })?;
            if !value.is_null() {
                objects.push(value);
            }
        }
        Ok(Manifest {
            file: file.to_owned(),
            objects,
        })
    }

    fn deployment(&self) -> Result<&Value, PlanError> {
        let found: Vec<&Value> = self
            .objects
            .iter()
            .filter(|o| o["kind"] == "Deployment" && o["apiVersion"] == "apps/v1")
            .collect();
        match found[..] {
            [one] => Ok(one),
            [] => Err(PlanError::NoDeployment {
                file: self.file.clone(),
            }),
            _ => Err(PlanError::ManyDeployments {
                file: self.file.clone(),
                count: found.len(),
            }),
        }
    }

    fn service(&self, name: &str) -> Option<&Value> {
        self.objects
            .iter()
            .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == name)
    }
}

/// Everything `fledge plan` reports.
pub struct Plan {
    pub name: String,
    pub operation: &'static str,
    pub decision: Decision,
    /// The parsed annotations, when valid.
    pub spec: Option<CanarySpec>,
    pub timeline: Option<Timeline>,
    /// The objects at the start of the canary (weight 0), when the change starts one.
    pub objects: Option<Result<Desired, String>>,
    /// The Deployment's `spec.replicas`: the stable pods a pod-ratio canary is measured against.
    pub stable_replicas: u64,
    /// The policy that governs the Deployment, if any; `spec` is merged with it.
    pub policy: Option<Policy>,
    /// The annotations the Deployment sets itself (to tell them from the policy's defaults).
    own_settings: Vec<&'static str>,
}

/// Runs the admission decision on `from` → `to` (a CREATE when there is no `from`). Services are
/// looked up in every manifest given.
pub fn plan(
    from: Option<&Manifest>,
    to: &Manifest,
    extra: &[Manifest],
    split_api: SplitApi,
    policies: &PolicySnapshot,
) -> Result<Plan, PlanError> {
    let new = to.deployment()?;
    let old = from.map(Manifest::deployment).transpose()?;
    let name = new["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if let Some(old_name) = old.and_then(|o| o["metadata"]["name"].as_str())
        && old_name != name
    {
        return Err(PlanError::DifferentDeployments {
            from: old_name.to_owned(),
            to: name,
        });
    }
    let applied = old.map(|old| as_applied(old, new));
    let new = applied.as_ref().unwrap_or(new);
    let req = request(old, new)?;
    let decision = admission::decide(&req, policies);
    let meta = req.object.as_ref().map(|o| &o.metadata);
    let annotations = meta.and_then(|m| m.annotations.clone()).unwrap_or_default();
    let labels = meta.and_then(|m| m.labels.clone()).unwrap_or_default();
    let namespace = req.namespace.as_deref().unwrap_or_default();
    let policy = policies
        .select(namespace, &labels, &annotations)
        .ok()
        .flatten();
    let spec = policy::resolve(&name, &annotations, policy).ok();
    let own_settings = [
        spec::ANNOTATION_STEPS,
        spec::ANNOTATION_ROUTER,
        crate::core::analysis::ANNOTATION_ANALYSIS,
    ]
    .into_iter()
    .filter(|k| annotations.contains_key(*k))
    .collect();
    let policy = policy.cloned();
    let timeline = spec
        .as_ref()
        .map(|s| rollout::timeline(&s.steps, &s.checks));
    let objects = match (&decision.outcome, &spec) {
        (
            AdmissionOutcome::Patch(
                PatchReason::Hold | PatchReason::HoldReplaced | PatchReason::HoldTakenOver,
                patch,
            ),
            Some(spec),
        ) => {
            let mut stored = new.clone();
            Some(
                json_patch::patch(&mut stored, patch)
                    .map_err(|e| e.to_string())
                    .and_then(|()| {
                        let manifests = from.into_iter().chain([to]).chain(extra);
                        canary_objects(&stored, spec, manifests, split_api)
                    }),
            )
        }
        _ => None,
    };
    Ok(Plan {
        stable_replicas: new["spec"]["replicas"].as_u64().unwrap_or(1),
        name,
        operation: if old.is_some() { "UPDATE" } else { "CREATE" },
        decision,
        spec,
        timeline,
        objects,
        policy,
        own_settings,
    })
}

/// `new` as `kubectl apply` of it over `old` stores it: fields the manifest does not mention are
/// kept, and fledge's own (`spec.paused`, its annotations) are never in a user's manifest.
fn as_applied(old: &Value, new: &Value) -> Value {
    let mut merged = new.clone();
    if merged["spec"].get("paused").is_none()
        && let Some(paused) = old["spec"].get("paused")
        && merged["spec"].is_object()
    {
        merged["spec"]["paused"] = paused.clone();
    }
    for key in spec::FLEDGE_ANNOTATIONS {
        if let Some(value) = old["metadata"]["annotations"].get(key)
            && merged["metadata"].is_object()
        {
            if !merged["metadata"]["annotations"].is_object() {
                merged["metadata"]["annotations"] = json!({});
            }
            if merged["metadata"]["annotations"].get(key).is_none() {
                merged["metadata"]["annotations"][key] = value.clone();
            }
        }
    }
    merged
}

fn request(old: Option<&Value>, new: &Value) -> Result<ReviewRequest, PlanError> {
    let mut review = review::deployment_review("fledge-plan", "fledge-plan", new, old);
    review["request"]["dryRun"] = json!(true);
    // As kubectl does for a manifest without one.
    if review["request"]["namespace"].is_null() {
        review["request"]["namespace"] = json!("default");
    }
    let body = serde_json::to_vec(&review).map_err(|e| PlanError::Request(e.to_string()))?;
    review::parse(&body).map_err(|e| PlanError::Request(e.to_string()))
}

fn canary_objects<'m>(
    stored: &Value,
    spec: &CanarySpec,
    manifests: impl Iterator<Item = &'m Manifest>,
    split_api: SplitApi,
) -> Result<Desired, String> {
    // Held: `spec.template` is the canary's.
    let template = template::of_deployment(stored).ok_or("the Deployment has no spec.template")?;
    let manifests: Vec<&Manifest> = manifests.collect();
    let root = manifests
        .iter()
        .find_map(|m| m.service(&spec.root_service))
        .ok_or_else(|| {
            format!(
                "root Service {} is not in the files given; add it to --to or pass --service FILE",
                spec.root_service
            )
        })?;
    objects::desired(&objects::Inputs {
        deployment: stored,
        canary_hash: &template::hash(template),
        root_service: root,
        stable_pod_template_hash: STABLE_HASH_PLACEHOLDER,
        size: Weight::ZERO,
        weight: Weight::ZERO,
        router: &spec.router,
        extras: &RouteExtras::default(),
        split_api,
    })
    .map_err(|e| e.to_string())
}

/// The human-readable report.
pub fn render_text(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Deployment {} ({})", plan.name, plan.operation);
    match &plan.decision.outcome {
        AdmissionOutcome::Allow(reason) => {
            let _ = writeln!(out, "Decision: allow unchanged: {reason}");
        }
        AdmissionOutcome::Deny(denial) => {
            let _ = writeln!(out, "Decision: deny");
            for problem in &denial.problems {
                let _ = writeln!(out, "  {problem}");
            }
        }
        AdmissionOutcome::Patch(reason, patch) => {
            let _ = writeln!(out, "Decision: allow with patch: {reason}");
            let _ = writeln!(out, "\nPatch (JSONPatch, {} operations):", patch.0.len());
            for op in &patch.0 {
                let _ = writeln!(out, "  {}", describe_op(op));
            }
        }
    }
    for warning in &plan.decision.warnings {
        let _ = writeln!(out, "Warning: {warning}");
    }
    if let Some(policy) = &plan.policy {
        render_policy(&mut out, plan, policy);
    }
    match &plan.objects {
        Some(Ok(desired)) => render_objects(&mut out, plan, desired),
        Some(Err(why)) => {
            let _ = writeln!(out, "\nObjects: cannot be computed: {why}");
        }
        None => {}
    }
    if let Some(timeline) = &plan.timeline {
        render_timeline(&mut out, plan, timeline);
    }
    out
}

/// Which policy governs the Deployment, what it contributes and what the Deployment overrides.
fn render_policy(out: &mut String, plan: &Plan, policy: &Policy) {
    let rules = &policy.rules;
    let _ = writeln!(out, "\nPolicy: {} (priority {})", policy.id, rules.priority);
    let origin = |key: &str, policy_has: bool| match (plan.own_settings.contains(&key), policy_has)
    {
        (true, true) => "the Deployment's own, over the policy's",
        (true, false) => "the Deployment's own",
        (false, true) => "the policy's",
        (false, false) => "the default",
    };
    let _ = writeln!(
        out,
        "  steps: {}",
        origin(spec::ANNOTATION_STEPS, rules.steps.is_some())
    );
    if let Some(spec) = &plan.spec {
        let _ = writeln!(
            out,
            "  router: {} ({})",
            spec.router.name(),
            origin(spec::ANNOTATION_ROUTER, rules.router.is_some())
        );
        let names: Vec<&str> = spec.checks.iter().map(|c| c.name.as_str()).collect();
        let _ = writeln!(
            out,
            "  checks: {} ({})",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            },
            origin(
                crate::core::analysis::ANNOTATION_ANALYSIS,
                rules.analysis.is_some()
            )
        );
    }
    if let Some(g) = &rules.guard_rails {
        let mut rails = Vec::new();
        if let Some(w) = g.max_step_weight {
            rails.push(format!("maxStepWeight {w}"));
        }
        if let Some(p) = &g.min_pause {
            rails.push(format!("minPause {p}"));
        }
        if let Some(c) = &g.required_checks {
            rails.push(format!("requiredChecks {}", c.join(", ")));
        }
        if let Some(r) = &g.allowed_routers {
            let names: Vec<&str> = r.iter().map(|r| r.as_str()).collect();
            rails.push(format!("allowedRouters {}", names.join(", ")));
        }
        let _ = writeln!(out, "  guard-rails: {}", rails.join("; "));
    }
    for w in rules.promotion_windows.iter().flatten() {
        let days: Vec<String> = w.days.iter().map(|d| format!("{d:?}")).collect();
        let _ = writeln!(
            out,
            "  promotion window: {} {}-{} {}",
            days.join(","),
            w.start,
            w.end,
            w.time_zone
        );
    }
}

fn describe_op(op: &PatchOperation) -> String {
    let summary = |v: &Value| match v {
        Value::String(s) if s.len() > 48 => format!("<{} bytes>", s.len()),
        Value::Object(_) | Value::Array(_) => {
            let images = images(v);
            if images.is_empty() {
                "<object>".to_owned()
            } else {
                format!("<pod template: {}>", images.join(", "))
            }
        }
        other => other.to_string(),
    };
    match op {
        PatchOperation::Add(a) => format!("add     {} = {}", a.path, summary(&a.value)),
        PatchOperation::Replace(r) => format!("replace {} = {}", r.path, summary(&r.value)),
        PatchOperation::Remove(r) => format!("remove  {}", r.path),
        other => format!("{other:?}"),
    }
}

/// `name=image` of each container in a pod template.
fn images(template: &Value) -> Vec<String> {
    template["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{}={}",
                c["name"].as_str().unwrap_or("?"),
                c["image"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

fn labels(selector: &Value) -> String {
    selector
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
        .collect::<Vec<_>>()
        .join(",")
}

fn render_objects(out: &mut String, plan: &Plan, d: &Desired) {
    let _ = writeln!(
        out,
        "\nObjects fledge creates for the canary (owned by Deployment {}; canary weight 0 until it is available):",
        plan.name
    );
    let deploy = &d.canary_deployment;
    let _ = writeln!(
        out,
        "  Deployment   {:<20} {} replica(s), {}",
        deploy["metadata"]["name"].as_str().unwrap_or_default(),
        deploy["spec"]["replicas"],
        images(&deploy["spec"]["template"]).join(", ")
    );
    for svc in [&d.canary_service, &d.stable_service] {
        let ports: Vec<String> = svc["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                format!(
                    "{}→{}",
                    p["port"],
                    p.get("targetPort").unwrap_or(&p["port"])
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "  Service      {:<20} ports {}, selects {}",
            svc["metadata"]["name"].as_str().unwrap_or_default(),
            ports.join(" "),
            labels(&svc["spec"]["selector"])
        );
    }
    let router = plan.spec.as_ref().map(|s| &s.router);
    match (&d.traffic, router) {
        (Some(split), Some(Router::Smi)) => {
            let backends = weights(&split["spec"]["backends"], "service");
            let _ = writeln!(
                out,
                "  TrafficSplit {:<20} {}, apex {}: {}",
                split["metadata"]["name"].as_str().unwrap_or_default(),
                split["apiVersion"].as_str().unwrap_or_default(),
                split["spec"]["service"].as_str().unwrap_or_default(),
                backends.join(", ")
            );
        }
        (Some(route), _) => {
            let backends = weights(&route["spec"]["rules"][0]["backendRefs"], "name");
            let _ = writeln!(
                out,
                "  HTTPRoute    {:<20} parent Service {} port {} (GAMMA): {}",
                route["metadata"]["name"].as_str().unwrap_or_default(),
                route["spec"]["parentRefs"][0]["name"]
                    .as_str()
                    .unwrap_or_default(),
                route["spec"]["parentRefs"][0]["port"],
                backends.join(", ")
            );
        }
        (None, Some(Router::GatewayApi { http_routes })) => {
            let _ = writeln!(
                out,
                "  HTTPRoute    {:<20} (yours) each backendRef to Service {} becomes {}-stable and {}-canary with weights; \
                 restored exactly at promotion, abort and opt-out",
                http_routes.join(","),
                plan.spec
                    .as_ref()
                    .map(|s| s.root_service.as_str())
                    .unwrap_or_default(),
                plan.name,
                plan.name
            );
        }
        (None, _) => {
            let _ = writeln!(
                out,
                "  (pod ratio: no traffic object; Service {} selects stable and canary pods, the weight is the canary's share of {} stable pods)",
                plan.spec
                    .as_ref()
                    .map(|s| s.root_service.as_str())
                    .unwrap_or_default(),
                plan.stable_replicas
            );
        }
    }
    let _ = writeln!(
        out,
        "  ({STABLE_HASH_PLACEHOLDER} is the live stable ReplicaSet's pod-template-hash; -o yaml prints the objects in full)"
    );
}

/// `NAME WEIGHT` of each backend of a TrafficSplit (`service`) or an HTTPRoute rule (`name`).
fn weights(backends: &Value, name_key: &str) -> Vec<String> {
    backends
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| format!("{} {}", b[name_key].as_str().unwrap_or("?"), b["weight"]))
        .collect()
}

fn render_timeline(out: &mut String, plan: &Plan, timeline: &Timeline) {
    let when = match plan.decision.outcome {
        AdmissionOutcome::Patch(..) => "",
        _ => " (on the next pod template change)",
    };
    let _ = writeln!(
        out,
        "\nSteps{when}, times from when {}-canary is available:",
        plan.name
    );
    let _ = writeln!(
        out,
        "  {:<5} {:<24} {:>8}  earliest start",
        "step", "action", "weight"
    );
    let total = timeline.steps.len();
    let checks = plan.spec.as_ref().map_or(&[][..], |s| &s.checks[..]);
    for (i, s) in timeline.steps.iter().enumerate() {
        let holds = match &s.step {
            Step::Analysis { checks: names } => format!(
                "  (holds at least {})",
                format_duration(rollout::analysis_minimum(names, checks))
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "  {:<5} {:<24} {:>8}  {}{}{holds}",
            format!("{}/{total}", i + 1),
            s.step.to_string(),
            format!("{}%", s.weight),
            s.starts,
            pod_share(plan, s.weight)
                .filter(|share| !share.exact())
                .map(|share| format!("  (pod ratio: {share})"))
                .unwrap_or_default()
        );
        if let Step::Analysis { checks: names } = &s.step {
            for name in names {
                let run = match checks.iter().find(|c| &c.name == name) {
                    Some(check) => describe_run(check, true),
                    None => "not defined in fledge.dev/analysis".to_owned(),
                };
                let _ = writeln!(out, "          {name:<20} {run}");
            }
        }
    }
    let _ = writeln!(
        out,
        "  {:<5} {:<24} {:>8}  {}",
        "", "promote", "100%", timeline.promotion
    );
    if timeline.promotion.promotions > 0 {
        let _ = writeln!(
            out,
            "  (\"promote\" is `fledge promote {}` at a `pause: {{}}` step)",
            plan.name
        );
    }
    let background = background_lines(checks, timeline);
    if !background.is_empty() {
        let _ = writeln!(out, "\nBackground analysis (measures while the steps run):");
        for line in background {
            let _ = writeln!(out, "  {line}");
        }
    }
}

/// `prometheus`, `web` or `job`.
fn provider_name(provider: &Provider) -> &'static str {
    match provider {
        Provider::Prometheus(_) => "prometheus",
        Provider::Web(_) => "web",
        Provider::Job(_) => "job",
    }
}

/// How a run of `check` measures, e.g. `web, 3 × 10s after 5s: at least 25s`, `job, once: at
/// least 0s`, `prometheus, every 1m until promotion`.
fn describe_run(check: &Check, inline: bool) -> String {
    let interval = format_duration(check.interval);
    let delay = if check.initial_delay.is_zero() {
        String::new()
    } else {
        format!(" after {}", format_duration(check.initial_delay))
    };
    let measures = match check.count.or(inline.then_some(1)) {
        Some(1) => format!("once{delay}"),
        Some(n) => format!("{n} × {interval}{delay}"),
        None => format!("every {interval}{delay} until promotion"),
    };
    let lasts = rollout::minimum_run(check, inline)
        .map(|d| format!(": at least {}", format_duration(d)))
        .unwrap_or_default();
    let dry = if check.dry_run {
        " (dry run: measured, never waited for)"
    } else if !inline && check.count.is_some() {
        "; promotion waits for it"
    } else {
        ""
    };
    format!("{}, {measures}{lasts}{dry}", provider_name(&check.provider))
}

/// Where the step at `index` is, `step 2/5`; past the last, `the end of the steps`.
fn step_position(index: usize, total: usize) -> String {
    if index < total {
        format!("step {}/{total}", index + 1)
    } else {
        "the end of the steps".to_owned()
    }
}

/// A line per background check: where it starts and how it measures.
fn background_lines(checks: &[Check], timeline: &Timeline) -> Vec<String> {
    checks
        .iter()
        .filter_map(|c| Some((c, c.starting_step?)))
        .map(|(c, from)| {
            let starts = timeline
                .steps
                .get(from)
                .map_or(timeline.promotion, |s| s.starts);
            format!(
                "{:<20} from {} ({starts}): {}",
                c.name,
                step_position(from, timeline.steps.len()),
                describe_run(c, false)
            )
        })
        .collect()
}

/// `-o json` of one check: how it measures and the least time a run takes (`null`: until
/// promotion).
fn check_json(check: &Check, inline: bool) -> Value {
    json!({
        "name": check.name,
        "provider": provider_name(&check.provider),
        "count": check.count.or(inline.then_some(1)),
        "interval": format_duration(check.interval),
        "initialDelay": format_duration(check.initial_delay),
        "minimum": rollout::minimum_run(check, inline).map(format_duration),
        "dryRun": check.dry_run,
    })
}

/// `-o json`: the report as data.
pub fn to_json(plan: &Plan) -> Value {
    let (decision, reason, patch) = match &plan.decision.outcome {
        AdmissionOutcome::Allow(r) => ("allow", r.to_string(), Value::Null),
        AdmissionOutcome::Deny(denial) => ("deny", denial.to_string(), Value::Null),
        AdmissionOutcome::Patch(r, p) => (
            "patch",
            r.to_string(),
            serde_json::to_value(p).unwrap_or_default(),
        ),
    };
    let checks = plan.spec.as_ref().map_or(&[][..], |s| &s.checks[..]);
    let steps: Vec<Value> = plan
        .timeline
        .iter()
        .flat_map(|t| &t.steps)
        .map(|s| {
            let mut step = json!({"step": s.step.to_string(), "weight": s.weight.to_string(), "earliest": s.starts.to_string()});
            if let Some(share) = pod_share(plan, s.weight) {
                step["effectiveWeight"] = json!(share.effective.to_string());
                step["canaryPods"] = json!(share.canary_pods);
            }
            if let Step::Analysis { checks: names } = &s.step {
                step["minimum"] = json!(format_duration(rollout::analysis_minimum(names, checks)));
                step["analysis"] = names
                    .iter()
                    .map(|name| match checks.iter().find(|c| &c.name == name) {
                        Some(check) => check_json(check, true),
                        None => json!({"name": name}),
                    })
                    .collect();
            }
            step
        })
        .collect();
    let background: Vec<Value> = checks
        .iter()
        .filter_map(|c| Some((c, c.starting_step?)))
        .map(|(c, from)| {
            let mut check = check_json(c, false);
            check["startingStep"] = json!(from);
            check["earliest"] = json!(plan.timeline.as_ref().map(|t| {
                t.steps
                    .get(from)
                    .map_or(t.promotion, |s| s.starts)
                    .to_string()
            }));
            check["until"] = json!(if c.count.is_some() {
                "count"
            } else {
                "promotion"
            });
            check
        })
        .collect();
    json!({
        "deployment": plan.name,
        "operation": plan.operation,
        "decision": decision,
        "reason": reason,
        "warnings": plan.decision.warnings,
        "patch": patch,
        "objects": match &plan.objects {
            Some(Ok(d)) => json!(d.all()),
            Some(Err(e)) => json!({"error": e}),
            None => Value::Null,
        },
        "router": plan.spec.as_ref().map(|s| s.router.name()),
        "policy": plan.policy.as_ref().map(|p| json!({"name": p.id.to_string(), "spec": p.rules})),
        "steps": steps,
        "backgroundAnalysis": background,
        "promotion": plan.timeline.as_ref().map(|t| t.promotion.to_string()),
    })
}

/// With pod ratio: the canary pods a weight takes and the share they really get.
fn pod_share(plan: &Plan, weight: Weight) -> Option<PodShare> {
    plan.spec
        .as_ref()
        .filter(|s| s.router == Router::PodRatio)
        .map(|_| PodShare::nearest(plan.stable_replicas, weight))
}

/// `-o yaml`: the objects as a YAML stream ready for `kubectl apply --dry-run=server -f -`.
pub fn to_yaml(plan: &Plan) -> Result<String, serde_yaml_ng::Error> {
    let mut out = format!(
        "# fledge plan: Deployment {}: {}\n",
        plan.name,
        to_json(plan)["reason"].as_str().unwrap_or_default()
    );
    if let (Some(spec), Some(timeline)) = (&plan.spec, &plan.timeline) {
        let total = timeline.steps.len();
        for (i, s) in timeline.steps.iter().enumerate() {
            let Step::Analysis { checks: names } = &s.step else {
                continue;
            };
            let _ = writeln!(
                out,
                "# analysis at step {}/{total} (earliest {}, holds at least {}):",
                i + 1,
                s.starts,
                format_duration(rollout::analysis_minimum(names, &spec.checks))
            );
            for name in names {
                if let Some(check) = spec.checks.iter().find(|c| &c.name == name) {
                    let _ = writeln!(out, "#   {name}: {}", describe_run(check, true));
                }
            }
        }
        for line in background_lines(&spec.checks, timeline) {
            let _ = writeln!(out, "# background analysis: {line}");
        }
    }
    if let Some(Ok(desired)) = &plan.objects {
        for object in desired.all() {
            out.push_str("---\n");
            out.push_str(&serde_yaml_ng::to_string(object)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = include_str!("../../examples/web-v1.yaml");
    const V2: &str = include_str!("../../examples/web-v2.yaml");

    fn manifest(text: &str) -> Manifest {
        Manifest::parse("test.yaml", text).unwrap()
    }

    #[test]
    fn the_examples_plan_a_canary() {
        let plan = plan(
            Some(&manifest(V1)),
            &manifest(V2),
            &[],
            SplitApi::V1Alpha2,
            &PolicySnapshot::default(),
        )
        .unwrap();
        assert!(matches!(
            plan.decision.outcome,
            AdmissionOutcome::Patch(PatchReason::Hold, _)
        ));
        let desired = plan.objects.as_ref().unwrap().as_ref().unwrap();
        assert_eq!(desired.canary_deployment["metadata"]["name"], "web-canary");
        assert_eq!(
            desired.canary_deployment["spec"]["template"]["spec"]["containers"][0]["image"],
            "ghcr.io/example/web:1.1.0"
        );
        let text = render_text(&plan);
        assert!(text.contains("Decision: allow with patch"), "{text}");
        assert!(text.contains("held (spec.paused)"), "{text}");
        assert!(text.contains("add     /spec/paused = true"), "{text}");
        assert!(text.contains("TrafficSplit web"), "{text}");
        assert!(text.contains("1/5"), "{text}");
        let yaml = to_yaml(&plan).unwrap();
        assert_eq!(
            yaml.matches("\n---\n").count() + usize::from(yaml.starts_with("---")),
            4,
            "{yaml}"
        );
    }

    #[test]
    fn a_create_shows_the_steps_for_the_next_change() {
        let plan = plan(
            None,
            &manifest(V1),
            &[],
            SplitApi::V1Alpha2,
            &PolicySnapshot::default(),
        )
        .unwrap();
        assert_eq!(plan.operation, "CREATE");
        assert!(render_text(&plan).contains("on the next pod template change"));
    }

    #[test]
    fn denials_list_each_problem() {
        let bad = V2
            .replace("setWeight: 50", "setWeight: 150")
            .replace("duration: 2m", "duration: soon");
        let plan = plan(
            Some(&manifest(V1)),
            &manifest(&bad),
            &[],
            SplitApi::V1Alpha2,
            &PolicySnapshot::default(),
        )
        .unwrap();
        let text = render_text(&plan);
        assert!(
            text.contains("Decision: deny\n  fledge.dev/steps[1].pause.duration"),
            "{text}"
        );
        assert!(
            text.contains("\n  fledge.dev/steps[2].setWeight: 150 is not between 0 and 100"),
            "{text}"
        );
    }

    #[test]
    fn a_revert_of_an_in_flight_canary_is_a_rollback() {
        // `--from` the live Deployment, held at v2 (its `kubectl get -o yaml`), `--to` v1.
        let held = plan(
            Some(&manifest(V1)),
            &manifest(V2),
            &[],
            SplitApi::V1Alpha2,
            &PolicySnapshot::default(),
        )
        .unwrap();
        let AdmissionOutcome::Patch(_, patch) = &held.decision.outcome else {
            panic!("not held")
        };
        let mut live = manifest(V2).deployment().unwrap().clone();
        json_patch::patch(&mut live, patch).unwrap();
        let live = Manifest {
            file: "live.yaml".into(),
            objects: vec![live],
        };
        let plan = plan(
            Some(&live),
            &manifest(V1),
            &[],
            SplitApi::V1Alpha2,
            &PolicySnapshot::default(),
        )
        .unwrap();
        assert!(matches!(
            plan.decision.outcome,
            AdmissionOutcome::Patch(PatchReason::Revert, _)
        ));
        let text = render_text(&plan);
        assert!(
            text.contains("Decision: allow with patch: rollback"),
            "{text}"
        );
        assert!(text.contains("add     /spec/paused = false"), "{text}");
    }

    #[test]
    fn a_long_name_is_denied_at_its_own_place() {
        let name = "a".repeat(57);
        let long = |text: &str| manifest(&text.replace("name: web\n", &format!("name: {name}\n")));
        let plan = plan(
            Some(&long(V1)),
            &long(V2),
            &[],
            SplitApi::V1Alpha2,
            &PolicySnapshot::default(),
        )
        .unwrap();
        let text = render_text(&plan);
        assert!(
            text.contains("Decision: deny\n  metadata.name: fledge creates Services"),
            "{text}"
        );
        assert!(!text.contains("fledge.dev/metadata.name"), "{text}");
    }

    #[test]
    fn a_missing_root_service_is_explained() {
        let deployment_only = |text: &str| manifest(text.split("\n---\n").next().unwrap());
        let plan = plan(
            Some(&deployment_only(V1)),
            &deployment_only(V2),
            &[],
            SplitApi::V1Alpha2,
            &PolicySnapshot::default(),
        )
        .unwrap();
        let text = render_text(&plan);
        assert!(
            text.contains("root Service web is not in the files given"),
            "{text}"
        );
        let with_service = super::plan(
            Some(&deployment_only(V1)),
            &deployment_only(V2),
            &[manifest(V1)],
            SplitApi::V1Alpha2,
            &PolicySnapshot::default(),
        );
        assert!(matches!(with_service.unwrap().objects, Some(Ok(_))));
    }

    #[test]
    fn file_errors_name_the_file() {
        let err = Manifest::parse("bad.yaml", "a: [").err().unwrap();
        assert!(err.to_string().starts_with("bad.yaml: not valid YAML"));
        let err = plan(
            None,
            &manifest("kind: Service\napiVersion: v1\n"),
            &[],
            SplitApi::V1Alpha2,
            &PolicySnapshot::default(),
        )
        .err()
        .unwrap();
        assert_eq!(
            err.to_string(),
            "test.yaml: no apps/v1 Deployment in the file"
        );
    }

    #[test]
    fn routers_show_their_traffic_and_pod_ratio_its_effective_weights() {
        let with = |router: &str| {
            let annotate =
                |text: &str| text.replace("  annotations:\n", &format!("  annotations:\n{router}"));
            plan(
                Some(&manifest(&annotate(V1))),
                &manifest(&annotate(V2)),
                &[],
                SplitApi::V1Alpha2,
                &PolicySnapshot::default(),
            )
            .unwrap()
        };
        let ratio = with("    fledge.dev/router: pod-ratio\n");
        let text = render_text(&ratio);
        assert!(text.contains("pod ratio: no traffic object"), "{text}");
        assert!(
            text.contains(
                "(pod ratio: asked 5 %; with 4 stable pods the nearest is 20 % (1 canary pod))"
            ),
            "{text}"
        );
        let json = to_json(&ratio);
        assert_eq!(json["router"], "pod-ratio");
        assert_eq!(json["steps"][0]["effectiveWeight"], "20");
        assert_eq!(json["steps"][0]["canaryPods"], 1);
        let gamma = render_text(&with("    fledge.dev/router: gateway-api\n"));
        assert!(gamma.contains("HTTPRoute    web"), "{gamma}");
        assert!(
            gamma.contains("(GAMMA): web-stable 10000, web-canary 0"),
            "{gamma}"
        );
        let gateway = render_text(&with(
            "    fledge.dev/router: gateway-api\n    fledge.dev/http-routes: web-public\n",
        ));
        assert!(gateway.contains("HTTPRoute    web-public"), "{gateway}");
        assert!(
            gateway.contains(
                "(yours) each backendRef to Service web becomes web-stable and web-canary"
            ),
            "{gateway}"
        );
    }

    /// The examples' plan with analysis put in by hand (the parser of `fledge.dev/analysis` is
    /// separate): 5 %, an `analysis` step of `error-rate` (3 × 10 s after 5 s) and `smoke` (a Job,
    /// once), 50 %, `pause: {}`; in the background `latency` from step 3, 6 × 10 s, and `shadow`
    /// (dry run, unbounded) from the start.
    fn with_analysis() -> Plan {
        use crate::core::analysis::JobCheck;
        use crate::core::builders::mk_check;
        use std::time::Duration;
        let mut p = plan(
            Some(&manifest(V1)),
            &manifest(V2),
            &[],
            SplitApi::V1Alpha2,
            &PolicySnapshot::default(),
        )
        .unwrap();
        let mut error_rate = mk_check("error-rate", Some(3));
        error_rate.initial_delay = Duration::from_secs(5);
        let mut smoke = mk_check("smoke", None);
        smoke.provider = Provider::Job(JobCheck { spec: json!({}) });
        let mut latency = mk_check("latency", Some(6));
        latency.starting_step = Some(2);
        let mut shadow = mk_check("shadow", None);
        shadow.starting_step = Some(0);
        shadow.dry_run = true;
        let spec = p.spec.as_mut().unwrap();
        spec.steps = vec![
            Step::SetWeight(Weight::parse_percent("5").unwrap()),
            Step::Analysis {
                checks: vec!["error-rate".into(), "smoke".into()],
            },
            Step::SetWeight(Weight::parse_percent("50").unwrap()),
            Step::PauseUntilPromoted,
        ];
        spec.checks = vec![error_rate, smoke, latency, shadow];
        p.timeline = Some(rollout::timeline(&spec.steps, &spec.checks));
        p
    }

    #[test]
    fn analysis_steps_list_their_checks_and_hold_the_timeline() {
        let plan = with_analysis();
        let text = render_text(&plan);
        assert!(
            text.contains(
                "  2/4   analysis error-rate, smoke       5%  +0s  (holds at least 25s)\n          error-rate           web, 3 × 10s after 5s: at least 25s\n          smoke                job, once: at least 0s\n  3/4   setWeight 50%                 50%  +25s\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("\nBackground analysis (measures while the steps run):\n  latency              from step 3/4 (+25s): web, 6 × 10s: at least 50s; promotion waits for it\n  shadow               from step 1/4 (+0s): web, every 10s until promotion (dry run: measured, never waited for)\n"),
            "{text}"
        );
        // latency ends at +75s, after the `pause: {}` reached at +25s: 50 s after its promotion.
        assert!(
            text.contains("        promote                      100%  promote +50s"),
            "{text}"
        );
        let json = to_json(&plan);
        let step = &json["steps"][1];
        assert_eq!(step["minimum"], "25s");
        assert_eq!(step["analysis"][0]["name"], "error-rate");
        assert_eq!(step["analysis"][0]["count"], 3);
        assert_eq!(step["analysis"][0]["interval"], "10s");
        assert_eq!(step["analysis"][0]["initialDelay"], "5s");
        assert_eq!(step["analysis"][0]["minimum"], "25s");
        assert_eq!(step["analysis"][1]["provider"], "job");
        assert_eq!(
            step["analysis"][1]["count"], 1,
            "inline without count: once"
        );
        assert_eq!(json["steps"][2]["earliest"], "+25s");
        assert!(json["steps"][0].get("analysis").is_none());
        let background = &json["backgroundAnalysis"];
        assert_eq!(background[0]["name"], "latency");
        assert_eq!(background[0]["startingStep"], 2);
        assert_eq!(background[0]["earliest"], "+25s");
        assert_eq!(background[0]["until"], "count");
        assert_eq!(background[1]["until"], "promotion");
        assert_eq!(background[1]["minimum"], Value::Null);
        assert_eq!(background[1]["dryRun"], true);
        assert_eq!(json["promotion"], "promote +50s");
        let yaml = to_yaml(&plan).unwrap();
        assert!(
            yaml.contains("# analysis at step 2/4 (earliest +0s, holds at least 25s):\n#   error-rate: web, 3 × 10s after 5s: at least 25s\n"),
            "{yaml}"
        );
        assert!(yaml.contains("# background analysis: latency "), "{yaml}");
        let no_analysis = plan_without_checks();
        assert_eq!(to_json(&no_analysis)["backgroundAnalysis"], json!([]));
        assert!(!render_text(&no_analysis).contains("Background analysis"));
    }

    fn plan_without_checks() -> Plan {
        plan(
            Some(&manifest(V1)),
            &manifest(V2),
            &[],
            SplitApi::V1Alpha2,
            &PolicySnapshot::default(),
        )
        .unwrap()
    }
}
