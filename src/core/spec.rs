//! The user contract: fledge's label and annotations, parsed into a typed [`CanarySpec`].
//!
//! Every error names the exact place (`fledge.dev/steps[2].setWeight`) and says how to fix it, and
//! unknown `fledge.dev/*` annotation keys are errors: a typo must never be silently ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde_yaml_ng::Value as Yaml;

/// The opt-in label; the webhook's `objectSelector` matches it.
pub const LABEL_ENABLED: &str = "fledge.dev/enabled";
/// Label fledge adds to the canary Deployment's selector and pods.
pub const LABEL_TRACK: &str = "fledge.dev/track";
/// The canary steps (YAML or JSON list).
pub const ANNOTATION_STEPS: &str = "fledge.dev/steps";
/// The Service that clients address; default: the Deployment's name.
pub const ANNOTATION_ROOT_SERVICE: &str = "fledge.dev/root-service";
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
const USER_ANNOTATIONS: [&str; 2] = [ANNOTATION_STEPS, ANNOTATION_ROOT_SERVICE];
/// Keys fledge writes itself; users leave them alone.
pub const FLEDGE_ANNOTATIONS: [&str; 3] =
    [ANNOTATION_STABLE_HASH, ANNOTATION_HOLD, ANNOTATION_STATE];
/// Step kinds Argo Rollouts users know that fledge reserves but does not run yet.
const RESERVED_STEPS: [&str; 7] = [
    "analysis",
    "experiment",
    "setCanaryScale",
    "setHeaderRoute",
    "setMirrorRoute",
    "plugin",
    "replicaProgressionThreshold",
];
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
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::SetWeight(w) => write!(f, "setWeight {w}%"),
            Step::PauseFor(d) => write!(f, "pause {}", format_duration(*d)),
            Step::PauseUntilPromoted => write!(f, "pause until promoted"),
        }
    }
}

/// What the user asked for on one Deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanarySpec {
    pub steps: Vec<Step>,
    pub root_service: String,
}

/// Whether a Deployment takes part, judged by its label and annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptIn {
    /// No `fledge.dev/enabled: "true"` label.
    Disabled,
    /// Labelled but without `fledge.dev/steps`: template changes roll out as a plain Deployment update.
    WithoutSteps,
    /// Labelled, with steps.
    Enabled,
}

pub fn opt_in(
    labels: Option<&BTreeMap<String, String>>,
    annotations: Option<&BTreeMap<String, String>>,
) -> OptIn {
    let labelled = labels
        .and_then(|l| l.get(LABEL_ENABLED))
        .is_some_and(|v| v == "true");
    let has_steps = annotations.is_some_and(|a| a.contains_key(ANNOTATION_STEPS));
    match (labelled, has_steps) {
        (false, _) => OptIn::Disabled,
        (true, false) => OptIn::WithoutSteps,
        (true, true) => OptIn::Enabled,
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
    if problems.is_empty() {
        Ok(CanarySpec {
            steps,
            root_service,
        })
    } else {
        Err(SpecError { problems })
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
            "{key}: unknown fledge annotation{hint}; fledge reads {} and {}",
            USER_ANNOTATIONS[0], USER_ANNOTATIONS[1]
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

/// Why `name` is not a DNS-1035 label (what Service names must be), if it is not one.
pub fn check_dns1035(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > MAX_SERVICE_NAME {
        return Err(format!(
            "is {} characters long; Service names have at most {MAX_SERVICE_NAME}",
            name.len()
        ));
    }
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

/// Same words but for case, `-`/`_`, or a missing/extra trailing `s`: the usual typos.
fn similar(a: &str, b: &str) -> bool {
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

/// How many distinct steps texts [`parse_steps`] remembers. A cluster has few: most Deployments
/// share a handful of step lists, or one from a policy.
const STEPS_CACHE_SIZE: usize = 64;

/// Steps parsed earlier, by annotation text: the webhook reads the same text on every template
/// change, and YAML parsing is most of the decision's time. Parsing is a pure function of the
/// text, so a remembered result is the result.
static STEPS_CACHE: Mutex<StepsCache> = Mutex::new(StepsCache {
    entries: Vec::new(),
    next: 0,
});

/// A small cache keyed by the text; when full, the entries are replaced in turn.
struct StepsCache {
    entries: Vec<(String, ParsedSteps)>,
    next: usize,
}

/// The steps of a text and the problems found in it.
#[derive(Clone)]
struct ParsedSteps {
    steps: Vec<Step>,
    problems: Vec<String>,
}

fn parse_steps(text: &str, problems: &mut Vec<String>) -> Vec<Step> {
    // Texts over the limit are refused without parsing; they are not worth keeping.
    if text.len() > MAX_STEPS_BYTES {
        return read_steps(text, problems);
    }
    let cache = || STEPS_CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    let known = cache()
        .entries
        .iter()
        .find(|(key, _)| key == text)
        .map(|(_, parsed)| parsed.clone());
    let parsed = known.unwrap_or_else(|| {
        let mut found = Vec::new();
        let parsed = ParsedSteps {
            steps: read_steps(text, &mut found),
            problems: found,
        };
        let mut cache = cache();
        let entry = (text.to_owned(), parsed.clone());
        if cache.entries.len() < STEPS_CACHE_SIZE {
            cache.entries.push(entry);
        } else {
            let at = cache.next;
            if let Some(slot) = cache.entries.get_mut(at) {
                *slot = entry;
            }
            cache.next = (at + 1) % STEPS_CACHE_SIZE;
        }
        parsed
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
fn flow_nesting(text: &str) -> usize {
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
        reserved if RESERVED_STEPS.contains(&reserved) => Err(format!(
            "{at}: this step kind is reserved but not supported yet; use setWeight and pause"
        )),
        other => {
            let hint = ["setWeight", "pause"]
                .iter()
                .chain(&RESERVED_STEPS)
                .find(|k| similar(other, k))
                .map(|k| format!(" (did you mean {k}?)"))
                .unwrap_or_default();
            Err(format!(
                "{at}: unknown step kind{hint}; expected setWeight or pause"
            ))
        }
    }
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

fn yaml_text(v: &Yaml) -> String {
    match v {
        Yaml::String(s) => s.clone(),
        other => serde_yaml_ng::to_string(other)
            .map(|s| s.trim_end().to_owned())
            .unwrap_or_else(|_| describe(other).to_owned()),
    }
}

fn describe(v: &Yaml) -> &'static str {
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
            "fledge.dev/steps[0].setweight: unknown step kind (did you mean setWeight?); expected setWeight or pause"
        );
        assert_eq!(
            problem("- wait: 5"),
            "fledge.dev/steps[0].wait: unknown step kind; expected setWeight or pause"
        );
        assert_eq!(
            problem("- setWeight: 5\n- analysis: {templates: [{templateName: rate}]}"),
            "fledge.dev/steps[1].analysis: this step kind is reserved but not supported yet; use setWeight and pause"
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
                "fledge.dev/colour: unknown fledge annotation; fledge reads fledge.dev/steps and fledge.dev/root-service",
                "fledge.dev/enabled: this is a label, not an annotation; move it to metadata.labels",
                "fledge.dev/rootService: unknown fledge annotation (did you mean fledge.dev/root-service?); fledge reads fledge.dev/steps and fledge.dev/root-service",
                "fledge.dev/step: unknown fledge annotation (did you mean fledge.dev/steps?); fledge reads fledge.dev/steps and fledge.dev/root-service",
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

    #[test]
    fn opt_in_needs_the_label_value_true() {
        let label = |v: &str| Some(annotations(&[(LABEL_ENABLED, v)]));
        let steps = Some(annotations(&[(ANNOTATION_STEPS, "- setWeight: 5")]));
        assert_eq!(
            opt_in(label("true").as_ref(), steps.as_ref()),
            OptIn::Enabled
        );
        assert_eq!(opt_in(label("true").as_ref(), None), OptIn::WithoutSteps);
        assert_eq!(
            opt_in(label("yes").as_ref(), steps.as_ref()),
            OptIn::Disabled
        );
        assert_eq!(opt_in(None, steps.as_ref()), OptIn::Disabled);
    }
}
