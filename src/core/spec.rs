//! The user contract: fledge's label and annotations, parsed into a typed [`CanarySpec`].
//!
//! Every error names the exact place (`fledge.dev/steps[2].setWeight`) and says how to fix it, and
//! unknown `fledge.dev/*` annotation keys are errors: a typo must never be silently ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde_yaml_ng::Value as Yaml;

use crate::core::analysis::{ANNOTATION_ANALYSIS, Check, checks};
use crate::core::policy::{PolicyId, PromotionWindows};

/// The opt-in label; the webhook's `objectSelector` matches it.
pub const LABEL_ENABLED: &str = "fledge.dev/enabled";
/// Label fledge adds to the canary Deployment's selector and pods.
pub const LABEL_TRACK: &str = "fledge.dev/track";
/// The canary steps (YAML or JSON list).
pub const ANNOTATION_STEPS: &str = "fledge.dev/steps";
/// The Service that clients address; default: the Deployment's name.
pub const ANNOTATION_ROOT_SERVICE: &str = "fledge.dev/root-service";
/// How traffic reaches the canary: `smi` (the default), `gateway-api` or `pod-ratio`.
pub const ANNOTATION_ROUTER: &str = "fledge.dev/router";
/// With `gateway-api`: the user's HTTPRoutes (names in the Deployment's namespace, comma-separated)
/// whose references to the root Service fledge splits; without it fledge owns a GAMMA route.
pub const ANNOTATION_HTTP_ROUTES: &str = "fledge.dev/http-routes";
/// Written by the webhook while a template change is pending: the hash of the template the stable
/// pods run (the one before the change). A template with this hash again is a revert.
pub const ANNOTATION_STABLE_HASH: &str = "fledge.dev/stable-hash";
/// Written by the webhook: `"true"` while fledge, not the user, holds `spec.paused`.
pub const ANNOTATION_HOLD: &str = "fledge.dev/hold";
/// Written by the controller: the rollout state (JSON).
pub const ANNOTATION_STATE: &str = "fledge.dev/state";
/// On the canary Deployment and its pod template (never on the user's Deployment): the hash of the
/// template it runs, so that its pods are counted per template.
pub const ANNOTATION_CANARY_HASH: &str = "fledge.dev/canary-hash";

pub const PREFIX: &str = "fledge.dev/";
/// Keys a user writes.
const USER_ANNOTATIONS: [&str; 6] = [
    ANNOTATION_STEPS,
    ANNOTATION_ROOT_SERVICE,
    ANNOTATION_ROUTER,
    ANNOTATION_HTTP_ROUTES,
    ANNOTATION_ANALYSIS,
    crate::core::policy::ANNOTATION_POLICY,
];
/// Keys fledge writes itself; users leave them alone.
pub const FLEDGE_ANNOTATIONS: [&str; 3] =
    [ANNOTATION_STABLE_HASH, ANNOTATION_HOLD, ANNOTATION_STATE];
/// Step kinds Argo Rollouts users know that fledge reserves but does not run yet.
const RESERVED_STEPS: [&str; 4] = [
    "experiment",
    "setCanaryScale",
    "plugin",
    "replicaProgressionThreshold",
];
/// The step kinds fledge runs.
const STEP_KINDS: [&str; 5] = [
    "setWeight",
    "pause",
    "setHeaderRoute",
    "setMirrorRoute",
    "analysis",
];
/// HTTPRoute names are DNS-1123 subdomains of at most this many characters.
const MAX_ROUTE_NAME: usize = 253;
/// Header and mirror route names become part of HTTPRoute rule names (`fledge-NAME`), which are
/// DNS-1123 labels of at most 63 characters.
const MAX_STEP_ROUTE_NAME: usize = 56;
/// Kubernetes Service names are DNS-1035 labels of at most this many characters.
const MAX_SERVICE_NAME: usize = 63;
/// Suffixes of the Services fledge creates, e.g. `web-canary`.
pub const CANARY_SUFFIX: &str = "-canary";
pub const STABLE_SUFFIX: &str = "-stable";

/// A traffic weight in hundredths of a percent (basis points): 0..=10000, so 0.01 % steps are exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Weight(u16);

impl Weight {
    pub const ZERO: Weight = Weight(0);
    pub const FULL: Weight = Weight(10_000);

    /// From basis points; `None` above 100 %.
    pub fn from_basis_points(bp: u16) -> Option<Weight> {
        (bp <= Self::FULL.0).then_some(Weight(bp))
    }

    pub fn basis_points(self) -> u16 {
        self.0
    }

    /// Parses a decimal percentage such as `5`, `12.5` or `0.01`.
    pub fn parse_percent(text: &str) -> Result<Weight, WeightError> {
        let text = text.trim();
        if let Some(magnitude) = text.strip_prefix('-') {
            return Err(match Self::parse_percent(magnitude) {
                Err(WeightError::NotANumber) => WeightError::NotANumber,
                _ => WeightError::OutOfRange,
            });
        }
        let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
        let is_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !is_digits(whole) || (text.contains('.') && !is_digits(frac)) {
            return Err(WeightError::NotANumber);
        }
        let frac = frac.trim_end_matches('0');
        if frac.len() > 2 {
            return Err(WeightError::TooPrecise);
        }
        let whole = whole.trim_start_matches('0');
        // More than three digits is above 100 whatever they are (and would overflow the parse).
        if whole.len() > 3 {
            return Err(WeightError::OutOfRange);
        }
        let whole: u32 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| WeightError::NotANumber)?
        };
        let hundredths: u32 = format!("{frac:0<2}")
            .parse()
            .map_err(|_| WeightError::NotANumber)?;
        u16::try_from(whole * 100 + hundredths)
            .ok()
            .and_then(Weight::from_basis_points)
            .ok_or(WeightError::OutOfRange)
    }
}

impl fmt::Display for Weight {
    /// `5`, `12.5`, `0.01`: the shortest exact percentage.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / 100, self.0 % 100);
        match frac {
            0 => write!(f, "{whole}"),
            f10 if f10 % 10 == 0 => write!(f, "{whole}.{}", f10 / 10),
            _ => write!(f, "{whole}.{frac:02}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightError {
    NotANumber,
    OutOfRange,
    TooPrecise,
}

/// One canary step, named as in Argo Rollouts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this share of traffic to the canary.
    SetWeight(Weight),
    /// Wait wall-clock time before the next step.
    PauseFor(Duration),
    /// Wait for `fledge promote`.
    PauseUntilPromoted,
    /// Send the requests that match to the canary only (no `matches`: remove the route `name`).
    SetHeaderRoute {
        name: String,
        matches: Vec<HeaderMatch>,
    },
    /// Copy requests to the canary (`None`: remove the mirror `name`).
    SetMirrorRoute {
        name: String,
        mirror: Option<Mirror>,
    },
    /// Run these checks of `fledge.dev/analysis` and wait until they finish.
    Analysis { checks: Vec<String> },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::SetWeight(w) => write!(f, "setWeight {w}%"),
            Step::PauseFor(d) => write!(f, "pause {}", format_duration(*d)),
            Step::PauseUntilPromoted => write!(f, "pause until promoted"),
            Step::SetHeaderRoute { name, matches } if matches.is_empty() => {
                write!(f, "setHeaderRoute {name}: removed")
            }
            Step::SetHeaderRoute { name, matches } => {
                write!(f, "setHeaderRoute {name}: {}", describe_matches(matches))
            }
            Step::SetMirrorRoute { name, mirror: None } => {
                write!(f, "setMirrorRoute {name}: removed")
            }
            Step::SetMirrorRoute {
                name,
                mirror: Some(m),
            } if m.matches.is_empty() => write!(f, "setMirrorRoute {name}: {}% of all", m.percent),
            Step::SetMirrorRoute {
                name,
                mirror: Some(m),
            } => write!(
                f,
                "setMirrorRoute {name}: {}% of {}",
                m.percent,
                describe_matches(&m.matches)
            ),
            Step::Analysis { checks } => write!(f, "analysis {}", checks.join(", ")),
        }
    }
}

fn describe_matches(matches: &[HeaderMatch]) -> String {
    matches
        .iter()
        .map(|m| match &m.value {
            HeaderValue::Exact(v) => format!("{}={v}", m.name),
            HeaderValue::Prefix(v) => format!("{}={v}*", m.name),
            HeaderValue::Regex(v) => format!("{}~{v}", m.name),
        })
        .collect::<Vec<_>>()
        .join(" and ")
}

/// One header condition of a header or mirror route (Argo Rollouts' `headerName`/`headerValue`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    pub name: String,
    pub value: HeaderValue,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderValue {
    Exact(String),
    Prefix(String),
    Regex(String),
}

/// What a mirror copies: `percent` of the requests that match all of `matches` (every request of
/// the routed rules when empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    pub percent: u8,
    pub matches: Vec<HeaderMatch>,
}

/// How traffic reaches the canary (`fledge.dev/router`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Router {
    /// An SMI TrafficSplit with the root Service as apex.
    #[default]
    Smi,
    /// Gateway API HTTPRoute weights: fledge's own route with the root Service as parent (GAMMA,
    /// for a mesh) when `http_routes` is empty, else the user's routes (at a gateway).
    GatewayApi { http_routes: Vec<String> },
    /// No traffic object: the root Service selects stable and canary pods, and the weight is the
    /// canary's share of the pods.
    PodRatio,
}

impl Router {
    /// The name users write in `fledge.dev/router`.
    pub fn name(&self) -> &'static str {
        match self {
            Router::Smi => "smi",
            Router::GatewayApi { .. } => "gateway-api",
            Router::PodRatio => "pod-ratio",
        }
    }

    /// The name, saying so when it is the default: `smi (the default)`.
    pub fn named(&self, explicit: bool) -> String {
        if explicit {
            self.name().to_owned()
        } else {
            format!("{} (the default)", self.name())
        }
    }

    /// Whether fledge owns a traffic object for this router (a TrafficSplit or a GAMMA route).
    pub fn owns_traffic_object(&self) -> bool {
        match self {
            Router::Smi => true,
            Router::GatewayApi { http_routes } => http_routes.is_empty(),
            Router::PodRatio => false,
        }
    }

    fn parse(text: &str) -> Option<Router> {
        match text.trim() {
            "smi" => Some(Router::Smi),
            "gateway-api" => Some(Router::GatewayApi {
                http_routes: Vec::new(),
            }),
            "pod-ratio" => Some(Router::PodRatio),
            _ => None,
        }
    }

    /// The router the annotations name, leniently: the default when missing or unknown. For
    /// cleaning up after a Deployment whose settings are gone or invalid.
    pub fn of(annotations: &BTreeMap<String, String>) -> Router {
        match annotations
            .get(ANNOTATION_ROUTER)
            .and_then(|r| Router::parse(r))
        {
            Some(Router::GatewayApi { .. }) => Router::GatewayApi {
                http_routes: annotations
                    .get(ANNOTATION_HTTP_ROUTES)
                    .map(|r| split_route_names(r))
                    .unwrap_or_default(),
            },
            Some(router) => router,
            None => Router::Smi,
        }
    }
}

fn split_route_names(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

/// What the user asked for on one Deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanarySpec {
    pub steps: Vec<Step>,
    pub root_service: String,
    pub router: Router,
    /// The checks of `fledge.dev/analysis`; background ones have a `starting_step`.
    pub checks: Vec<Check>,
    /// The policy these settings were merged with, if any.
    pub policy: Option<PolicyId>,
    /// The policy's promotion windows (empty: any time).
    pub windows: PromotionWindows,
    /// The policy's readiness deadline for the canary, for Deployments that keep Kubernetes' default.
    pub progress_deadline: Option<Duration>,
}

/// Whether a Deployment takes part, judged by its label, its namespace's label and its policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptIn {
    /// Neither it nor its namespace opts in, or it opts out with `fledge.dev/enabled: "false"`.
    Disabled,
    /// Opted in, without steps of its own or from its policy: template changes roll out as a plain
    /// Deployment update.
    WithoutSteps,
    /// Opted in, with steps.
    Enabled,
}

/// The Deployment's own `fledge.dev/enabled` label decides (`"true"` in, anything else out);
/// without one, its namespace's label does (`namespace_opted_in`). `policy_steps`: the policy
/// that governs it brings steps.
pub fn opt_in(
    labels: Option<&BTreeMap<String, String>>,
    annotations: Option<&BTreeMap<String, String>>,
    namespace_opted_in: bool,
    policy_steps: bool,
) -> OptIn {
    let opted = opted_in(labels, namespace_opted_in);
    let has_steps = policy_steps || annotations.is_some_and(|a| a.contains_key(ANNOTATION_STEPS));
    match (opted, has_steps) {
        (false, _) => OptIn::Disabled,
        (true, false) => OptIn::WithoutSteps,
        (true, true) => OptIn::Enabled,
    }
}

/// Whether a Deployment is opted in, by its own label or else its namespace's.
pub fn opted_in(labels: Option<&BTreeMap<String, String>>, namespace_opted_in: bool) -> bool {
    match labels.and_then(|l| l.get(LABEL_ENABLED)) {
        Some(v) => v == "true",
        None => namespace_opted_in,
    }
}

/// Every problem found in a Deployment's fledge annotations; each line names its place.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", summary(.problems))]
pub struct SpecError {
    pub problems: Vec<String>,
}

/// The problems joined by `; `, the first [`MAX_PROBLEMS`] of them, then how many more there are.
pub fn summary(problems: &[String]) -> String {
    let mut text = problems
        .iter()
        .take(MAX_PROBLEMS)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > MAX_PROBLEMS {
        text.push_str(&format!(
            "; and {} more problems",
            problems.len() - MAX_PROBLEMS
        ));
    }
    text
}

/// Parses the annotations of Deployment `name`. Checks every `fledge.dev/*` key, the steps and the
/// root Service, and that the Service names fledge derives from `name` are valid.
pub fn parse(name: &str, annotations: &BTreeMap<String, String>) -> Result<CanarySpec, SpecError> {
    let mut problems = Vec::new();
    check_keys(annotations, &mut problems);
    check_derived_names(name, &mut problems);
    let before_steps = problems.len();
    let steps = match annotations.get(ANNOTATION_STEPS) {
        Some(text) => parse_steps(text, &mut problems),
        None => {
            problems.push(format!(
                "{ANNOTATION_STEPS}: missing; add a list of steps such as `- setWeight: 10`"
            ));
            Vec::new()
        }
    };
    let root_service = match annotations.get(ANNOTATION_ROOT_SERVICE) {
        Some(svc) => {
            if let Err(why) = check_dns1035(svc) {
                problems.push(format!("{ANNOTATION_ROOT_SERVICE}: {svc:?} {why}"));
            }
            svc.clone()
        }
        None => name.to_owned(),
    };
    // Steps with problems of their own are missing from `steps`, so their indices are not checked
    // against the checks.
    let clean_steps = (problems.len() == before_steps).then_some(steps.as_slice());
    let parsed_checks = annotations
        .get(ANNOTATION_ANALYSIS)
        .map(|text| checks::parse(text))
        .unwrap_or_default();
    let checks = checks::link(parsed_checks, clean_steps, &mut problems);
    let router = parse_router(annotations, &mut problems);
    check_steps_for_router(&steps, &router, annotations, &mut problems);
    if problems.is_empty() {
        Ok(CanarySpec {
            steps,
            root_service,
            router,
            checks,
            policy: None,
            windows: PromotionWindows::default(),
            progress_deadline: None,
        })
    } else {
        Err(SpecError { problems })
    }
}

fn parse_router(annotations: &BTreeMap<String, String>, problems: &mut Vec<String>) -> Router {
    let router = match annotations.get(ANNOTATION_ROUTER) {
        None => Router::Smi,
        Some(text) => Router::parse(text).unwrap_or_else(|| {
            problems.push(format!(
                "{ANNOTATION_ROUTER}: {text:?} is not a router; use smi (the default), gateway-api or pod-ratio"
            ));
            Router::Smi
        }),
    };
    let Some(text) = annotations.get(ANNOTATION_HTTP_ROUTES) else {
        return router;
    };
    if router.name() != "gateway-api" {
        problems.push(format!(
            "{ANNOTATION_HTTP_ROUTES}: names HTTPRoutes, which only the router gateway-api uses; the router is {}; \
             add {ANNOTATION_ROUTER}: gateway-api or remove {ANNOTATION_HTTP_ROUTES}",
            router.named(annotations.contains_key(ANNOTATION_ROUTER))
        ));
        return router;
    }
    let names = split_route_names(text);
    if names.is_empty() {
        problems.push(format!(
            "{ANNOTATION_HTTP_ROUTES}: no route names; list HTTPRoutes such as `web,web-admin`, or remove the annotation for a route fledge owns (GAMMA)"
        ));
    }
    for (i, route) in names.iter().enumerate() {
        if let Err(why) = check_dns1123_subdomain(route) {
            problems.push(format!("{ANNOTATION_HTTP_ROUTES}[{i}]: {route:?} {why}"));
        }
        if names[..i].contains(route) {
            problems.push(format!(
                "{ANNOTATION_HTTP_ROUTES}[{i}]: {route:?} is named twice"
            ));
        }
    }
    Router::GatewayApi { http_routes: names }
}

/// Header and mirror steps need an HTTP router: each one the router cannot do is a problem that
/// names the step and the router.
fn check_steps_for_router(
    steps: &[Step],
    router: &Router,
    annotations: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) {
    let named = router.named(annotations.contains_key(ANNOTATION_ROUTER));
    for (i, step) in steps.iter().enumerate() {
        let why = match (step, router) {
            (_, Router::GatewayApi { .. }) => continue,
            (Step::SetHeaderRoute { .. }, Router::Smi) => {
                "SMI TrafficSplits send requests by weight only: fledge writes no HTTPRouteGroup matches, \
                 which only TrafficSplit v1alpha3/v1alpha4 (not Linkerd's v1alpha1/v1alpha2) could carry"
            }
            (Step::SetHeaderRoute { .. }, _) => {
                "pod ratio has no traffic object: the root Service picks pods, not requests"
            }
            (Step::SetMirrorRoute { .. }, Router::Smi) => "SMI has no request mirroring",
            (Step::SetMirrorRoute { .. }, _) => {
                "pod ratio has no traffic object: the root Service cannot copy requests"
            }
            _ => continue,
        };
        let kind = match step {
            Step::SetHeaderRoute { .. } => "setHeaderRoute",
            _ => "setMirrorRoute",
        };
        problems.push(format!(
            "{ANNOTATION_STEPS}[{i}].{kind}: the router {named} cannot do this ({why}); use {ANNOTATION_ROUTER}: gateway-api"
        ));
    }
}

fn check_keys(annotations: &BTreeMap<String, String>, problems: &mut Vec<String>) {
    let known: Vec<&str> = USER_ANNOTATIONS
        .iter()
        .chain(&FLEDGE_ANNOTATIONS)
        .copied()
        .collect();
    for key in annotations.keys().filter(|k| k.starts_with(PREFIX)) {
        if known.contains(&key.as_str()) {
            continue;
        }
        if key == LABEL_ENABLED {
            problems.push(format!(
                "{key}: this is a label, not an annotation; move it to metadata.labels"
            ));
            continue;
        }
        let hint = USER_ANNOTATIONS
            .iter()
            .find(|k| similar(key, k))
            .map(|k| format!(" (did you mean {k}?)"))
            .unwrap_or_default();
        problems.push(format!(
            "{key}: unknown fledge annotation{hint}; fledge reads {}",
            USER_ANNOTATIONS.join(", ")
        ));
    }
}

fn check_derived_names(name: &str, problems: &mut Vec<String>) {
    let longest = format!("{name}{CANARY_SUFFIX}");
    if let Err(why) = check_dns1035(&longest) {
        problems.push(format!(
            "metadata.name: fledge creates Services {name}{CANARY_SUFFIX} and {name}{STABLE_SUFFIX}, but {longest:?} {why}; \
             give the Deployment a shorter name that starts with a letter and has no dots"
        ));
    }
}

/// Why `name` is empty or longer than `kind` names may be, if it is.
fn check_length(name: &str, max: usize, kind: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > max {
        return Err(format!(
            "is {} characters long; {kind} names have at most {max}",
            name.len()
        ));
    }
    Ok(())
}

/// Why `name` is not a DNS-1035 label (what Service names must be), if it is not one.
pub fn check_dns1035(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    check_length(name, MAX_SERVICE_NAME, "Service")?;
    let ok = bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err("is not a valid Service name (lowercase letters, digits and '-', starting with a letter and ending with a letter or digit)".into())
    }
}

/// Why `name` is not a DNS-1123 subdomain (what HTTPRoute names must be), if it is not one.
pub fn check_dns1123_subdomain(name: &str) -> Result<(), String> {
    check_length(name, MAX_ROUTE_NAME, "HTTPRoute")?;
    let label_ok = |label: &str| {
        let bytes = label.as_bytes();
        !bytes.is_empty()
            && bytes[0].is_ascii_alphanumeric()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
    };
    if name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err("is not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit)".into())
    }
}

/// Same words but for case, `-`/`_`, or a missing/extra trailing `s`: the usual typos.
pub(crate) fn similar(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        s.to_ascii_lowercase()
            .replace(['-', '_'], "")
            .trim_end_matches('s')
            .to_owned()
    };
    norm(a) == norm(b)
}

/// Limits checked before the YAML parser runs: its time grows with the square of the nesting
/// depth, and a webhook must answer hostile input quickly. Real step lists are far inside both.
const MAX_STEPS_BYTES: usize = 16 * 1024;
const MAX_STEPS_NESTING: usize = 16;
/// Problems listed in one answer at the most; the rest are counted.
const MAX_PROBLEMS: usize = 20;

/// How many distinct texts a [`TextCache`] remembers. A cluster has few: most Deployments share a
/// handful of step lists and checks, or those of one policy.
const TEXT_CACHE_SIZE: usize = 64;

/// Results parsed earlier, by annotation text: the webhook reads the same texts on every template
/// change, and YAML parsing is most of the decision's time. Parsing is a pure function of the
/// text, so a remembered result is the result. When full, the entries are replaced in turn.
pub(crate) struct TextCache<T> {
    entries: Vec<(String, T)>,
    next: usize,
}

impl<T: Clone> TextCache<T> {
    pub(crate) const fn new() -> Self {
        TextCache {
            entries: Vec::new(),
            next: 0,
        }
    }

    /// `parse(text)`, remembered. Texts longer than `max_bytes` are refused by `parse` without
    /// parsing; they are not worth keeping.
    pub(crate) fn get_or_parse(
        cache: &Mutex<Self>,
        text: &str,
        max_bytes: usize,
        parse: impl FnOnce(&str) -> T,
    ) -> T {
        if text.len() > max_bytes {
            return parse(text);
        }
        let lock = || cache.lock().unwrap_or_else(PoisonError::into_inner);
        let known = lock()
            .entries
            .iter()
            .find(|(key, _)| key == text)
            .map(|(_, parsed)| parsed.clone());
        known.unwrap_or_else(|| {
            let parsed = parse(text);
            let mut cache = lock();
            let entry = (text.to_owned(), parsed.clone());
            if cache.entries.len() < TEXT_CACHE_SIZE {
                cache.entries.push(entry);
            } else {
                let at = cache.next;
                if let Some(slot) = cache.entries.get_mut(at) {
                    *slot = entry;
                }
                cache.next = (at + 1) % TEXT_CACHE_SIZE;
            }
            parsed
        })
    }
}

static STEPS_CACHE: Mutex<TextCache<ParsedSteps>> = Mutex::new(TextCache::new());

/// The steps of a text and the problems found in it.
#[derive(Clone)]
struct ParsedSteps {
    steps: Vec<Step>,
    problems: Vec<String>,
}

fn parse_steps(text: &str, problems: &mut Vec<String>) -> Vec<Step> {
    let parsed = TextCache::get_or_parse(&STEPS_CACHE, text, MAX_STEPS_BYTES, |text| {
        let mut problems = Vec::new();
        ParsedSteps {
            steps: read_steps(text, &mut problems),
            problems,
        }
    });
    problems.extend(parsed.problems);
    parsed.steps
}

fn read_steps(text: &str, problems: &mut Vec<String>) -> Vec<Step> {
    if text.len() > MAX_STEPS_BYTES {
        problems.push(format!(
            "{ANNOTATION_STEPS}: {} bytes is too long; at most {MAX_STEPS_BYTES} bytes",
            text.len()
        ));
        return Vec::new();
    }
    if flow_nesting(text) > MAX_STEPS_NESTING {
        problems.push(format!(
            "{ANNOTATION_STEPS}: brackets nested more than {MAX_STEPS_NESTING} deep; steps need three at most"
        ));
        return Vec::new();
    }
    let doc: Yaml = match serde_yaml_ng::from_str(text) {
        Ok(doc) => doc,
        Err(e) => {
            problems.push(format!("{ANNOTATION_STEPS}: not valid YAML: {e}"));
            return Vec::new();
        }
    };
    let Yaml::Sequence(items) = doc else {
        problems.push(format!(
            "{ANNOTATION_STEPS}: expected a YAML list of steps such as `- setWeight: 10`, found {}",
            describe(&doc)
        ));
        return Vec::new();
    };
    if items.is_empty() {
        problems.push(format!(
            "{ANNOTATION_STEPS}: the list is empty; add at least one step such as `- setWeight: 10`"
        ));
    }
    items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| {
            parse_step(&format!("{ANNOTATION_STEPS}[{i}]"), item)
                .map_err(|p| problems.push(p))
                .ok()
        })
        .collect()
}

/// The deepest nesting of YAML flow collections (`[` and `{`). Brackets inside quoted text count
/// too: a guard that quoting could switch off would be no guard.
pub(crate) fn flow_nesting(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    for b in text.bytes() {
        match b {
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

fn parse_step(at: &str, item: &Yaml) -> Result<Step, String> {
    let Yaml::Mapping(map) = item else {
        return Err(format!(
            "{at}: expected a step such as `setWeight: 10` or `pause: {{duration: 1m}}`, found {}",
            describe(item)
        ));
    };
    let mut entries = map.iter();
    let (Some((key, value)), None) = (entries.next(), entries.next()) else {
        let keys: Vec<String> = map.keys().map(yaml_text).collect();
        return Err(format!(
            "{at}: a step has exactly one kind, found {} ({}); write each as its own list item",
            if keys.is_empty() {
                "none".to_owned()
            } else {
                keys.len().to_string()
            },
            keys.join(", ")
        ));
    };
    let kind = yaml_text(key);
    let at = format!("{at}.{kind}");
    match kind.as_str() {
        "setWeight" => parse_weight(&at, value).map(Step::SetWeight),
        "pause" => parse_pause(&at, value),
        "setHeaderRoute" => parse_header_route(&at, value),
        "setMirrorRoute" => parse_mirror_route(&at, value),
        "analysis" => parse_analysis_step(&at, value),
        reserved if RESERVED_STEPS.contains(&reserved) => Err(format!(
            "{at}: this step kind is reserved but not supported yet; use {}",
            STEP_KINDS.join(", ")
        )),
        other => {
            let hint = STEP_KINDS
                .iter()
                .chain(&RESERVED_STEPS)
                .find(|k| similar(other, k))
                .map(|k| format!(" (did you mean {k}?)"))
                .unwrap_or_default();
            Err(format!(
                "{at}: unknown step kind{hint}; expected {}",
                STEP_KINDS.join(", ")
            ))
        }
    }
}

/// The fields of a route step's mapping, each checked against `allowed`.
fn route_fields<'y>(
    at: &str,
    value: &'y Yaml,
    allowed: &[&str],
    example: &str,
) -> Result<BTreeMap<String, &'y Yaml>, String> {
    let Yaml::Mapping(map) = value else {
        return Err(format!(
            "{at}: expected a mapping such as `{example}`, found {}",
            describe(value)
        ));
    };
    let mut fields = BTreeMap::new();
    for (key, value) in map {
        let key = yaml_text(key);
        if !allowed.contains(&key.as_str()) {
            return Err(format!(
                "{at}.{key}: unknown field; expected {}",
                allowed.join(", ")
            ));
        }
        fields.insert(key, value);
    }
    Ok(fields)
}

/// The `name` of a header or mirror route: part of the rule name `fledge-NAME`.
fn route_step_name(at: &str, fields: &BTreeMap<String, &Yaml>) -> Result<String, String> {
    let Some(name) = fields.get("name") else {
        return Err(format!("{at}.name: missing; every route step has a name"));
    };
    let Yaml::String(name) = name else {
        return Err(format!(
            "{at}.name: expected a name, found {}",
            describe(name)
        ));
    };
    if name.len() > MAX_STEP_ROUTE_NAME {
        return Err(format!(
            "{at}.name: {name:?} is {} characters long; at most {MAX_STEP_ROUTE_NAME}",
            name.len()
        ));
    }
    match check_dns1035(name) {
        Ok(()) => Ok(name.clone()),
        Err(_) => Err(format!(
            "{at}.name: {name:?} is not a valid route name (lowercase letters, digits and '-', starting with a letter)"
        )),
    }
}

fn parse_header_route(at: &str, value: &Yaml) -> Result<Step, String> {
    let fields = route_fields(
        at,
        value,
        &["name", "match"],
        "{name: beta, match: [{headerName: x-beta, headerValue: {exact: \"1\"}}]}",
    )?;
    let name = route_step_name(at, &fields)?;
    let matches = match fields.get("match") {
        None => Vec::new(),
        Some(m) => {
            let matches = parse_header_matches(&format!("{at}.match"), m)?;
            if matches.is_empty() {
                return Err(format!(
                    "{at}.match: empty; give at least one header, or write only `{{name: {name}}}` to remove the route"
                ));
            }
            matches
        }
    };
    Ok(Step::SetHeaderRoute { name, matches })
}

fn parse_mirror_route(at: &str, value: &Yaml) -> Result<Step, String> {
    let fields = route_fields(
        at,
        value,
        &["name", "percentage", "match"],
        "{name: shadow, percentage: 20}",
    )?;
    let name = route_step_name(at, &fields)?;
    if fields.len() == 1 {
        return Ok(Step::SetMirrorRoute { name, mirror: None });
    }
    let percent = match fields.get("percentage") {
        None => 100,
        Some(Yaml::Number(n)) => n
            .as_u64()
            .filter(|p| *p <= 100)
            .and_then(|p| u8::try_from(p).ok())
            .ok_or_else(|| {
                format!("{at}.percentage: {n} is not a whole number between 0 and 100")
            })?,
        Some(other) => {
            return Err(format!(
                "{at}.percentage: expected a whole number between 0 and 100, found {}",
                describe(other)
            ));
        }
    };
    let matches = match fields.get("match") {
        None => Vec::new(),
        Some(m) => parse_header_matches(&format!("{at}.match"), m)?,
    };
    Ok(Step::SetMirrorRoute {
        name,
        mirror: Some(Mirror { percent, matches }),
    })
}

/// `{checks: [NAME, …]}`: names of checks in `fledge.dev/analysis`, checked against them later.
fn parse_analysis_step(at: &str, value: &Yaml) -> Result<Step, String> {
    let fields = route_fields(at, value, &["checks"], "{checks: [error-rate]}").map_err(|e| {
        if e.starts_with(&format!("{at}.templates:")) {
            format!(
                "{at}.templates: unknown field; fledge runs the checks of {ANNOTATION_ANALYSIS}, named in `checks`, e.g. `analysis: {{checks: [error-rate]}}`"
            )
        } else {
            e
        }
    })?;
    let Some(list) = fields.get("checks") else {
        return Err(format!(
            "{at}.checks: missing; name checks of {ANNOTATION_ANALYSIS}, e.g. `checks: [error-rate]`"
        ));
    };
    let Yaml::Sequence(items) = list else {
        return Err(format!(
            "{at}.checks: expected a list of check names such as `[error-rate]`, found {}",
            describe(list)
        ));
    };
    if items.is_empty() {
        return Err(format!(
            "{at}.checks: empty; name at least one check of {ANNOTATION_ANALYSIS}"
        ));
    }
    let mut checks: Vec<String> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Yaml::String(name) = item else {
            return Err(format!(
                "{at}.checks[{i}]: expected a check name, found {}",
                describe(item)
            ));
        };
        if checks.contains(name) {
            return Err(format!("{at}.checks[{i}]: {name:?} is named twice"));
        }
        checks.push(name.clone());
    }
    Ok(Step::Analysis { checks })
}

/// `[{headerName, headerValue: {exact|prefix|regex: TEXT}}]`.
fn parse_header_matches(at: &str, value: &Yaml) -> Result<Vec<HeaderMatch>, String> {
    let Yaml::Sequence(items) = value else {
        return Err(format!(
            "{at}: expected a list such as `[{{headerName: x-beta, headerValue: {{exact: \"1\"}}}}]`, found {}",
            describe(value)
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("{at}[{i}]");
            let fields = route_fields(
                &at,
                item,
                &["headerName", "headerValue"],
                "{headerName: x-beta, headerValue: {exact: \"1\"}}",
            )?;
            let name = match fields.get("headerName") {
                Some(Yaml::String(n)) if is_header_name(n) => n.clone(),
                Some(Yaml::String(n)) => {
                    return Err(format!(
                        "{at}.headerName: {n:?} is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"
                    ));
                }
                Some(other) => {
                    return Err(format!(
                        "{at}.headerName: expected a header name, found {}",
                        describe(other)
                    ));
                }
                None => return Err(format!("{at}.headerName: missing")),
            };
            let value = fields
                .get("headerValue")
                .ok_or_else(|| format!("{at}.headerValue: missing; use {{exact: TEXT}}, {{prefix: TEXT}} or {{regex: TEXT}}"))?;
            let kinds = route_fields(
                &format!("{at}.headerValue"),
                value,
                &["exact", "prefix", "regex"],
                "{exact: \"1\"}",
            )?;
            let mut kinds = kinds.into_iter();
            let (Some((kind, text)), None) = (kinds.next(), kinds.next()) else {
                return Err(format!(
                    "{at}.headerValue: give exactly one of exact, prefix and regex"
                ));
            };
            let text = match text {
                Yaml::String(s) => s.clone(),
                Yaml::Number(n) => n.to_string(),
                other => {
                    return Err(format!(
                        "{at}.headerValue.{kind}: expected text, found {}",
                        describe(other)
                    ));
                }
            };
            let value = match kind.as_str() {
                "exact" => HeaderValue::Exact(text),
                "prefix" => HeaderValue::Prefix(text),
                _ => HeaderValue::Regex(text),
            };
            Ok(HeaderMatch { name, value })
        })
        .collect()
}

/// An HTTP field name (RFC 9110 token), as Gateway API's `HTTPHeaderName` takes it.
pub(crate) fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn parse_weight(at: &str, value: &Yaml) -> Result<Weight, String> {
    let text = match value {
        Yaml::Number(n) => n.to_string(),
        Yaml::String(s) => s.clone(),
        other => {
            return Err(format!(
                "{at}: expected a number between 0 and 100, found {}",
                describe(other)
            ));
        }
    };
    Weight::parse_percent(&text).map_err(|e| match e {
        WeightError::NotANumber => {
            format!("{at}: expected a number between 0 and 100, found {text:?}")
        }
        WeightError::OutOfRange => format!("{at}: {text} is not between 0 and 100"),
        WeightError::TooPrecise => {
            format!("{at}: {text} has more than two decimal places; the finest weight is 0.01")
        }
    })
}

fn parse_pause(at: &str, value: &Yaml) -> Result<Step, String> {
    let map = match value {
        // `- pause:` with nothing after it reads as null; it means the same as `pause: {}`.
        Yaml::Null => return Ok(Step::PauseUntilPromoted),
        Yaml::Mapping(map) => map,
        other => {
            return Err(format!(
                "{at}: expected `{{duration: 1m}}` or `{{}}` (wait for `fledge promote`), found {}",
                describe(other)
            ));
        }
    };
    let mut duration = None;
    for (key, value) in map {
        let key = yaml_text(key);
        if key != "duration" {
            return Err(format!(
                "{at}.{key}: unknown field; pause takes only `duration` (or nothing, to wait for `fledge promote`)"
            ));
        }
        duration = Some(parse_duration_value(&format!("{at}.duration"), value)?);
    }
    Ok(duration.map_or(Step::PauseUntilPromoted, Step::PauseFor))
}

fn parse_duration_value(at: &str, value: &Yaml) -> Result<Duration, String> {
    let duration = match value {
        // A bare number means seconds, as in Argo Rollouts.
        Yaml::Number(n) => n.as_u64().map(Duration::from_secs).ok_or_else(|| {
            format!("{at}: {n} is not a whole number of seconds; use e.g. 30s, 5m or 1h30m")
        })?,
        Yaml::String(s) => parse_duration(s).map_err(|why| format!("{at}: {s:?} {why}"))?,
        other => {
            return Err(format!(
                "{at}: expected a duration such as 30s, 5m or 1h30m, found {}",
                describe(other)
            ));
        }
    };
    if duration.is_zero() {
        return Err(format!(
            "{at}: must be longer than 0s; to wait for `fledge promote`, write `pause: {{}}`"
        ));
    }
    Ok(duration)
}

/// Parses `30s`, `5m`, `1h30m`, `2h`, `1h5m10s` (units h, m, s, each at most once, in that order).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const USAGE: &str = "is not a duration; use e.g. 30s, 5m or 1h30m";
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(USAGE.into());
    }
    let mut total: u64 = 0;
    let mut last_unit = usize::MAX;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(USAGE.into());
        }
        let amount: u64 = rest[..digits]
            .parse()
            .map_err(|_| "is too long".to_owned())?;
        let unit = rest[digits..]
            .chars()
            .next()
            .ok_or_else(|| format!("{USAGE} (the number {amount} needs a unit: s, m or h)"))?;
        let (rank, seconds) = match unit {
            'h' => (0, 3600),
            'm' => (1, 60),
            's' => (2, 1),
            _ => return Err(USAGE.into()),
        };
        if last_unit != usize::MAX && rank <= last_unit {
            return Err(format!("{USAGE} (units go h, m, s, each once)"));
        }
        last_unit = rank;
        total = amount
            .checked_mul(seconds)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(|| "is too long".to_owned())?;
        rest = &rest[digits + 1..];
    }
    Ok(Duration::from_secs(total))
}

/// `1h30m`, `2m`, `45s`, `0s`: the inverse of [`parse_duration`].
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

pub(crate) fn yaml_text(v: &Yaml) -> String {
    match v {
        Yaml::String(s) => s.clone(),
        other => serde_yaml_ng::to_string(other)
            .map(|s| s.trim_end().to_owned())
            .unwrap_or_else(|_| describe(other).to_owned()),
    }
}

pub(crate) fn describe(v: &Yaml) -> &'static str {
    match v {
        Yaml::Null => "nothing",
        Yaml::Bool(_) => "a boolean",
        Yaml::Number(_) => "a number",
        Yaml::String(_) => "a string",
        Yaml::Sequence(_) => "a list",
        Yaml::Mapping(_) => "a mapping",
        Yaml::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn steps(yaml: &str) -> Result<CanarySpec, SpecError> {
        parse("web", &annotations(&[(ANNOTATION_STEPS, yaml)]))
    }

    fn problem(yaml: &str) -> String {
        match steps(yaml) {
            Ok(spec) => panic!("expected an error for {yaml:?}, got {spec:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn w(text: &str) -> Weight {
        Weight::parse_percent(text).unwrap()
    }

    #[test]
    fn parses_the_brief_example() {
        let spec = parse(
            "web",
            &annotations(&[(
                ANNOTATION_STEPS,
                "- setWeight: 5\n- pause: {duration: 2m}\n- setWeight: 50\n- pause: {}\n- setWeight: 100\n",
            )]),
        )
        .unwrap();
        assert_eq!(
            spec,
            CanarySpec {
                steps: vec![
                    Step::SetWeight(w("5")),
                    Step::PauseFor(Duration::from_secs(120)),
                    Step::SetWeight(w("50")),
                    Step::PauseUntilPromoted,
                    Step::SetWeight(Weight::FULL),
                ],
                root_service: "web".into(),
                router: Router::Smi,
                checks: Vec::new(),
                policy: None,
                windows: Default::default(),
                progress_deadline: None,
            }
        );
    }

    #[test]
    fn json_is_yaml_too() {
        let spec =
            steps(r#"[{"setWeight": 0.01}, {"pause": {"duration": "1h30m"}}, {"pause": {}}]"#)
                .unwrap();
        assert_eq!(
            spec.steps,
            vec![
                Step::SetWeight(Weight(1)),
                Step::PauseFor(Duration::from_secs(5400)),
                Step::PauseUntilPromoted
            ]
        );
    }

    #[test]
    fn root_service_annotation_overrides_the_default() {
        let spec = parse(
            "web",
            &annotations(&[
                (ANNOTATION_STEPS, "- setWeight: 1"),
                (ANNOTATION_ROOT_SERVICE, "frontend"),
            ]),
        )
        .unwrap();
        assert_eq!(spec.root_service, "frontend");
    }

    #[test]
    fn weights_are_exact_hundredths() {
        for (text, bp) in [
            ("0", 0),
            ("0.01", 1),
            ("0.1", 10),
            ("0.10", 10),
            ("12.5", 1250),
            ("99.99", 9999),
            ("100", 10_000),
            ("100.00", 10_000),
            ("007", 700),
        ] {
            assert_eq!(Weight::parse_percent(text), Ok(Weight(bp)), "{text}");
        }
        for (text, err) in [
            ("100.01", WeightError::OutOfRange),
            ("150", WeightError::OutOfRange),
            ("655.36", WeightError::OutOfRange),
            ("999.99", WeightError::OutOfRange),
            ("-5", WeightError::OutOfRange),
            ("99999999999999999999999", WeightError::OutOfRange),
            ("0.125", WeightError::TooPrecise),
            ("abc", WeightError::NotANumber),
            ("", WeightError::NotANumber),
            ("1.", WeightError::NotANumber),
            (".5", WeightError::NotANumber),
            ("5%", WeightError::NotANumber),
            ("1e2", WeightError::NotANumber),
        ] {
            assert_eq!(Weight::parse_percent(text), Err(err), "{text}");
        }
    }

    #[test]
    fn weights_display_round_trips() {
        for bp in 0..=10_000u16 {
            let weight = Weight(bp);
            assert_eq!(Weight::parse_percent(&weight.to_string()), Ok(weight));
        }
        assert_eq!(Weight(1250).to_string(), "12.5");
        assert_eq!(Weight(1).to_string(), "0.01");
    }

    #[test]
    fn weight_errors_name_the_step() {
        assert_eq!(
            problem("- setWeight: 5\n- pause: {}\n- setWeight: 150"),
            "fledge.dev/steps[2].setWeight: 150 is not between 0 and 100"
        );
        assert_eq!(
            problem("- setWeight: 0.125"),
            "fledge.dev/steps[0].setWeight: 0.125 has more than two decimal places; the finest weight is 0.01"
        );
        assert_eq!(
            problem("- setWeight: [5]"),
            "fledge.dev/steps[0].setWeight: expected a number between 0 and 100, found a list"
        );
        assert_eq!(
            problem("- setWeight: five"),
            "fledge.dev/steps[0].setWeight: expected a number between 0 and 100, found \"five\""
        );
        assert_eq!(
            problem("- setWeight: -1"),
            "fledge.dev/steps[0].setWeight: -1 is not between 0 and 100"
        );
    }

    #[test]
    fn durations() {
        for (text, secs) in [
            ("30s", 30),
            ("5m", 300),
            ("1h30m", 5400),
            ("2h", 7200),
            ("1h5m10s", 3910),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
            assert_eq!(format_duration(Duration::from_secs(secs)), text);
        }
        for bad in [
            "",
            "5",
            "m",
            "5x",
            "1m1h",
            "1m1m",
            "1.5m",
            "-5s",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(
            steps("- pause: {duration: 90}").unwrap().steps,
            vec![Step::PauseFor(Duration::from_secs(90))]
        );
    }

    #[test]
    fn pause_errors_name_the_field() {
        assert_eq!(
            problem("- pause: {duration: 5 minutes}"),
            "fledge.dev/steps[0].pause.duration: \"5 minutes\" is not a duration; use e.g. 30s, 5m or 1h30m"
        );
        assert_eq!(
            problem("- pause: {durtion: 5m}"),
            "fledge.dev/steps[0].pause.durtion: unknown field; pause takes only `duration` (or nothing, to wait for `fledge promote`)"
        );
        assert_eq!(
            problem("- pause: {duration: 0s}"),
            "fledge.dev/steps[0].pause.duration: must be longer than 0s; to wait for `fledge promote`, write `pause: {}`"
        );
        assert_eq!(
            problem("- pause: 5m"),
            "fledge.dev/steps[0].pause: expected `{duration: 1m}` or `{}` (wait for `fledge promote`), found a string"
        );
        assert_eq!(
            problem("- pause: {duration: 1.5}"),
            "fledge.dev/steps[0].pause.duration: 1.5 is not a whole number of seconds; use e.g. 30s, 5m or 1h30m"
        );
        assert_eq!(
            steps("- pause:").unwrap().steps,
            vec![Step::PauseUntilPromoted]
        );
    }

    #[test]
    fn step_shape_errors() {
        assert_eq!(
            problem("setWeight: 5"),
            "fledge.dev/steps: expected a YAML list of steps such as `- setWeight: 10`, found a mapping"
        );
        assert_eq!(
            problem("[]"),
            "fledge.dev/steps: the list is empty; add at least one step such as `- setWeight: 10`"
        );
        assert_eq!(
            problem("- setWeight"),
            "fledge.dev/steps[0]: expected a step such as `setWeight: 10` or `pause: {duration: 1m}`, found a string"
        );
        assert_eq!(
            problem("- {setWeight: 5, pause: {}}"),
            "fledge.dev/steps[0]: a step has exactly one kind, found 2 (setWeight, pause); write each as its own list item"
        );
        assert_eq!(
            problem("- {}"),
            "fledge.dev/steps[0]: a step has exactly one kind, found none (); write each as its own list item"
        );
        assert!(problem("- [unclosed").starts_with("fledge.dev/steps: not valid YAML: "));
    }

    #[test]
    fn unknown_and_reserved_step_kinds() {
        assert_eq!(
            problem("- setweight: 5"),
            "fledge.dev/steps[0].setweight: unknown step kind (did you mean setWeight?); expected setWeight, pause, setHeaderRoute, setMirrorRoute, analysis"
        );
        assert_eq!(
            problem("- wait: 5"),
            "fledge.dev/steps[0].wait: unknown step kind; expected setWeight, pause, setHeaderRoute, setMirrorRoute, analysis"
        );
        assert_eq!(
            problem("- setWeight: 5\n- experiment: {templates: []}"),
            "fledge.dev/steps[1].experiment: this step kind is reserved but not supported yet; use setWeight, pause, setHeaderRoute, setMirrorRoute, analysis"
        );
        assert_eq!(
            problem("- setWeight: 5\n- analysis: {templates: [{templateName: rate}]}"),
            "fledge.dev/steps[1].analysis.templates: unknown field; fledge runs the checks of fledge.dev/analysis, named in `checks`, e.g. `analysis: {checks: [error-rate]}`"
        );
    }

    #[test]
    fn hostile_steps_are_refused_before_parsing() {
        let deep = format!("{}{}", "{a: ".repeat(50_000), "}".repeat(50_000));
        let started = std::time::Instant::now();
        assert_eq!(
            problem(&deep),
            "fledge.dev/steps: 250000 bytes is too long; at most 16384 bytes"
        );
        let nested = format!("- setWeight: {}5{}", "[".repeat(17), "]".repeat(17));
        assert!(problem(&nested).contains("nested more than 16 deep"));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(flow_nesting("- {pause: {duration: 1m}}\n- setWeight: 5"), 2);
    }

    #[test]
    fn long_lists_of_problems_are_cut_short() {
        let many = "- setWeight: 500\n".repeat(30);
        let message = problem(&many);
        assert!(message.ends_with("; and 10 more problems"), "{message}");
        assert_eq!(message.matches("is not between 0 and 100").count(), 20);
    }

    #[test]
    fn every_problem_is_reported() {
        let err = steps("- setWeight: 500\n- pause: {duration: soon}").unwrap_err();
        assert_eq!(err.problems.len(), 2);
        assert!(err.problems[0].starts_with("fledge.dev/steps[0].setWeight"));
        assert!(err.problems[1].starts_with("fledge.dev/steps[1].pause.duration"));
    }

    #[test]
    fn unknown_annotation_keys_are_errors() {
        let err = parse(
            "web",
            &annotations(&[
                (ANNOTATION_STEPS, "- setWeight: 5"),
                ("fledge.dev/step", "x"),
                ("fledge.dev/rootService", "x"),
                ("fledge.dev/colour", "x"),
                ("fledge.dev/enabled", "true"),
                ("example.com/other", "ignored"),
                (ANNOTATION_STABLE_HASH, "fledge-owned keys are known"),
            ]),
        )
        .unwrap_err();
        assert_eq!(
            err.problems,
            vec![
                "fledge.dev/colour: unknown fledge annotation; fledge reads fledge.dev/steps, fledge.dev/root-service, fledge.dev/router, fledge.dev/http-routes, fledge.dev/analysis, fledge.dev/policy",
                "fledge.dev/enabled: this is a label, not an annotation; move it to metadata.labels",
                "fledge.dev/rootService: unknown fledge annotation (did you mean fledge.dev/root-service?); fledge reads fledge.dev/steps, fledge.dev/root-service, fledge.dev/router, fledge.dev/http-routes, fledge.dev/analysis, fledge.dev/policy",
                "fledge.dev/step: unknown fledge annotation (did you mean fledge.dev/steps?); fledge reads fledge.dev/steps, fledge.dev/root-service, fledge.dev/router, fledge.dev/http-routes, fledge.dev/analysis, fledge.dev/policy",
            ]
        );
    }

    #[test]
    fn missing_steps_is_an_error_for_parse() {
        assert_eq!(
            parse("web", &BTreeMap::new()).unwrap_err().to_string(),
            "fledge.dev/steps: missing; add a list of steps such as `- setWeight: 10`"
        );
    }

    #[test]
    fn service_names() {
        assert_eq!(
            parse(
                "web",
                &annotations(&[
                    (ANNOTATION_STEPS, "- setWeight: 5"),
                    (ANNOTATION_ROOT_SERVICE, "Web")
                ])
            )
            .unwrap_err()
            .to_string(),
            "fledge.dev/root-service: \"Web\" is not a valid Service name (lowercase letters, digits and '-', starting with a letter and ending with a letter or digit)"
        );
        let long = "a".repeat(57);
        let err = parse(&long, &annotations(&[(ANNOTATION_STEPS, "- setWeight: 5")])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("metadata.name: fledge creates Services"),
            "{err}"
        );
        assert!(err.to_string().contains("is 64 characters long"), "{err}");
        assert!(
            parse(
                &"a".repeat(56),
                &annotations(&[(ANNOTATION_STEPS, "- setWeight: 5")])
            )
            .is_ok()
        );
        let err = parse(
            "web.v2",
            &annotations(&[(ANNOTATION_STEPS, "- setWeight: 5")]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("not a valid Service name"),
            "{err}"
        );
        assert!(check_dns1035("1web").is_err());
        assert!(check_dns1035("web-").is_err());
        assert!(check_dns1035("w").is_ok());
    }

    fn with_router(pairs: &[(&str, &str)], steps: &str) -> Result<CanarySpec, SpecError> {
        let mut all = annotations(pairs);
        all.insert(ANNOTATION_STEPS.into(), steps.into());
        parse("web", &all)
    }

    #[test]
    fn routers_and_their_routes() {
        assert_eq!(steps("- setWeight: 5").unwrap().router, Router::Smi);
        assert_eq!(
            with_router(&[(ANNOTATION_ROUTER, "pod-ratio")], "- setWeight: 5")
                .unwrap()
                .router,
            Router::PodRatio
        );
        assert_eq!(
            with_router(&[(ANNOTATION_ROUTER, "gateway-api")], "- setWeight: 5")
                .unwrap()
                .router,
            Router::GatewayApi {
                http_routes: vec![]
            }
        );
        assert_eq!(
            with_router(
                &[
                    (ANNOTATION_ROUTER, "gateway-api"),
                    (ANNOTATION_HTTP_ROUTES, "web, web-admin.v2")
                ],
                "- setWeight: 5"
            )
            .unwrap()
            .router,
            Router::GatewayApi {
                http_routes: vec!["web".into(), "web-admin.v2".into()]
            }
        );
        let problems =
            |pairs: &[(&str, &str)]| with_router(pairs, "- setWeight: 5").unwrap_err().problems;
        assert_eq!(
            problems(&[(ANNOTATION_ROUTER, "istio")]),
            vec![
                "fledge.dev/router: \"istio\" is not a router; use smi (the default), gateway-api or pod-ratio"
            ]
        );
        assert_eq!(
            problems(&[
                (ANNOTATION_ROUTER, "gateway-api"),
                (ANNOTATION_HTTP_ROUTES, "web,Web_2,web,-x")
            ]),
            vec![
                "fledge.dev/http-routes[1]: \"Web_2\" is not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit)",
                "fledge.dev/http-routes[2]: \"web\" is named twice",
                "fledge.dev/http-routes[3]: \"-x\" is not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit)",
            ]
        );
        assert!(
            problems(&[(ANNOTATION_HTTP_ROUTES, "web")])[0].starts_with(
                "fledge.dev/http-routes: names HTTPRoutes, which only the router gateway-api uses; the router is smi (the default)"
            )
        );
        assert!(
            problems(&[
                (ANNOTATION_ROUTER, "gateway-api"),
                (ANNOTATION_HTTP_ROUTES, " , ")
            ])[0]
                .starts_with("fledge.dev/http-routes: no route names")
        );
        assert!(check_dns1123_subdomain(&"a".repeat(254)).is_err());
        assert!(check_dns1123_subdomain("a.b-c.d").is_ok());
        assert!(check_dns1123_subdomain("a..b").is_err());
    }

    #[test]
    fn header_and_mirror_steps() {
        let gateway = [(ANNOTATION_ROUTER, "gateway-api")];
        let spec = with_router(
            &gateway,
            "- setHeaderRoute: {name: beta, match: [{headerName: x-beta, headerValue: {exact: \"1\"}}, {headerName: user-agent, headerValue: {prefix: curl/}}, {headerName: x-id, headerValue: {regex: '^7.*'}}]}\n\
             - setMirrorRoute: {name: shadow, percentage: 20}\n\
             - setMirrorRoute: {name: posts, match: [{headerName: x-b, headerValue: {exact: y}}]}\n\
             - setHeaderRoute: {name: beta}\n\
             - setMirrorRoute: {name: shadow}\n",
        )
        .unwrap();
        let header = |name: &str, value: HeaderValue| HeaderMatch {
            name: name.into(),
            value,
        };
        assert_eq!(
            spec.steps,
            vec![
                Step::SetHeaderRoute {
                    name: "beta".into(),
                    matches: vec![
                        header("x-beta", HeaderValue::Exact("1".into())),
                        header("user-agent", HeaderValue::Prefix("curl/".into())),
                        header("x-id", HeaderValue::Regex("^7.*".into())),
                    ]
                },
                Step::SetMirrorRoute {
                    name: "shadow".into(),
                    mirror: Some(Mirror {
                        percent: 20,
                        matches: vec![]
                    })
                },
                Step::SetMirrorRoute {
                    name: "posts".into(),
                    mirror: Some(Mirror {
                        percent: 100,
                        matches: vec![header("x-b", HeaderValue::Exact("y".into()))]
                    })
                },
                Step::SetHeaderRoute {
                    name: "beta".into(),
                    matches: vec![]
                },
                Step::SetMirrorRoute {
                    name: "shadow".into(),
                    mirror: None
                },
            ]
        );
        assert_eq!(
            spec.steps[0].to_string(),
            "setHeaderRoute beta: x-beta=1 and user-agent=curl/* and x-id~^7.*"
        );
        assert_eq!(
            spec.steps[1].to_string(),
            "setMirrorRoute shadow: 20% of all"
        );
        let problem = |steps: &str| with_router(&gateway, steps).unwrap_err().to_string();
        assert_eq!(
            problem("- setMirrorRoute: {name: m, percentage: 101}"),
            "fledge.dev/steps[0].setMirrorRoute.percentage: 101 is not a whole number between 0 and 100"
        );
        assert_eq!(
            problem("- setMirrorRoute: {name: m, percentage: -1}"),
            "fledge.dev/steps[0].setMirrorRoute.percentage: -1 is not a whole number between 0 and 100"
        );
        assert_eq!(
            problem("- setMirrorRoute: {percentage: 5}"),
            "fledge.dev/steps[0].setMirrorRoute.name: missing; every route step has a name"
        );
        assert_eq!(
            problem(
                "- setHeaderRoute: {name: b, match: [{headerName: x, headerValue: {exact: a, regex: b}}]}"
            ),
            "fledge.dev/steps[0].setHeaderRoute.match[0].headerValue: give exactly one of exact, prefix and regex"
        );
        assert_eq!(
            problem(
                "- setHeaderRoute: {name: b, match: [{headerName: 'x y', headerValue: {exact: a}}]}"
            ),
            "fledge.dev/steps[0].setHeaderRoute.match[0].headerName: \"x y\" is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"
        );
        assert_eq!(
            problem("- setHeaderRoute: {name: b, match: []}"),
            "fledge.dev/steps[0].setHeaderRoute.match: empty; give at least one header, or write only `{name: b}` to remove the route"
        );
        assert_eq!(
            problem("- setHeaderRoute: {name: B_1}"),
            "fledge.dev/steps[0].setHeaderRoute.name: \"B_1\" is not a valid route name (lowercase letters, digits and '-', starting with a letter)"
        );
        assert_eq!(
            problem("- setHeaderRoute: {name: b, matches: []}"),
            "fledge.dev/steps[0].setHeaderRoute.matches: unknown field; expected name, match"
        );
    }

    #[test]
    fn header_and_mirror_steps_are_denied_on_routers_that_cannot_do_them() {
        let steps = "- setHeaderRoute: {name: b, match: [{headerName: x, headerValue: {exact: a}}]}\n- setMirrorRoute: {name: m, percentage: 5}\n";
        assert_eq!(
            with_router(&[], steps).unwrap_err().problems,
            vec![
                "fledge.dev/steps[0].setHeaderRoute: the router smi (the default) cannot do this (SMI TrafficSplits send requests by weight only: fledge writes no HTTPRouteGroup matches, which only TrafficSplit v1alpha3/v1alpha4 (not Linkerd's v1alpha1/v1alpha2) could carry); use fledge.dev/router: gateway-api",
                "fledge.dev/steps[1].setMirrorRoute: the router smi (the default) cannot do this (SMI has no request mirroring); use fledge.dev/router: gateway-api",
            ]
        );
        let problems = with_router(&[(ANNOTATION_ROUTER, "pod-ratio")], steps)
            .unwrap_err()
            .problems;
        assert!(
            problems[0].contains("the router pod-ratio cannot do this"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("fledge.dev/steps[1].setMirrorRoute: the router pod-ratio"),
            "{problems:?}"
        );
        assert!(
            with_router(&[(ANNOTATION_ROUTER, "smi")], steps)
                .unwrap_err()
                .problems[0]
                .contains("the router smi cannot")
        );
        assert_eq!(
            Router::of(&annotations(&[
                (ANNOTATION_ROUTER, "gateway-api"),
                (ANNOTATION_HTTP_ROUTES, "a,b")
            ])),
            Router::GatewayApi {
                http_routes: vec!["a".into(), "b".into()]
            }
        );
        assert_eq!(
            Router::of(&annotations(&[(ANNOTATION_ROUTER, "nope")])),
            Router::Smi
        );
    }

    #[test]
    fn opt_in_needs_the_label_value_true_or_an_opted_in_namespace() {
        let label = |v: &str| Some(annotations(&[(LABEL_ENABLED, v)]));
        let steps = Some(annotations(&[(ANNOTATION_STEPS, "- setWeight: 5")]));
        for namespace in [false, true] {
            for policy_steps in [false, true] {
                let with = |labels: Option<BTreeMap<String, String>>,
                            a: Option<&BTreeMap<String, String>>| {
                    opt_in(labels.as_ref(), a, namespace, policy_steps)
                };
                assert_eq!(with(label("true"), steps.as_ref()), OptIn::Enabled);
                assert_eq!(
                    with(label("true"), None),
                    if policy_steps {
                        OptIn::Enabled
                    } else {
                        OptIn::WithoutSteps
                    }
                );
                // Any other value opts out, also of an opted-in namespace.
                assert_eq!(with(label("yes"), steps.as_ref()), OptIn::Disabled);
                assert_eq!(with(label("false"), steps.as_ref()), OptIn::Disabled);
                // No label: the namespace decides.
                assert_eq!(
                    with(None, steps.as_ref()),
                    if namespace {
                        OptIn::Enabled
                    } else {
                        OptIn::Disabled
                    }
                );
            }
        }
    }
}
