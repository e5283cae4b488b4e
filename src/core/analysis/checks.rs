//! `fledge.dev/analysis`: the YAML list of named checks, parsed and checked.
//!
//! Like the steps, every problem names its place (`fledge.dev/analysis[0].successCondition`) and
//! says how to fix it, all problems are reported at once, and unknown fields are errors. What
//! depends on the steps (which checks an `analysis` step names, `startingStep`) is checked by
//! [`link`] once both are parsed.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_yaml_ng::Value as Yaml;

use super::{
    ANNOTATION_ANALYSIS, Check, Condition, JobCheck, NoData, PrometheusAuth, PrometheusQuery,
    Provider, SecretValue, Variables, WebRequest,
};
use crate::core::spec::{
    ANNOTATION_STEPS, Step, TextCache, check_dns1035, check_dns1123_subdomain, describe,
    flow_nesting, is_header_name, parse_duration, similar, yaml_text,
};

/// Limits checked before the YAML parser runs (see `spec::read_steps`). Checks are longer than
/// steps (queries, Job specs), and a Job spec written inline nests deeper.
const MAX_ANALYSIS_BYTES: usize = 32 * 1024;
const MAX_ANALYSIS_NESTING: usize = 24;
/// Check names become part of Job names; DNS-1123 labels are at most this long.
const MAX_CHECK_NAME: usize = 63;

/// Time between measurements when `interval` is not given (only allowed when there is one).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// How long a Prometheus query or web request may take when `timeout` is not given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Errors in a row tolerated when `consecutiveErrorLimit` is not given (Argo Rollouts' default).
pub const DEFAULT_CONSECUTIVE_ERROR_LIMIT: u32 = 4;

const CHECK_FIELDS: [&str; 15] = [
    "name",
    "interval",
    "count",
    "initialDelay",
    "successCondition",
    "failureCondition",
    "failureLimit",
    "inconclusiveLimit",
    "consecutiveErrorLimit",
    "noData",
    "dryRun",
    "startingStep",
    "prometheus",
    "web",
    "job",
];
const PROVIDERS: [&str; 3] = ["prometheus", "web", "job"];
const METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// One check as the annotation alone says it, before the steps are known.
#[derive(Clone, Debug)]
pub(crate) struct ParsedCheck {
    /// Its place in the list, for messages.
    index: usize,
    check: Check,
    interval_given: bool,
    starting_step: Option<usize>,
}

/// What a text holds: the checks that parsed, the names of all (those with problems too, so
/// that steps naming them are not reported twice), and the problems.
#[derive(Clone, Debug, Default)]
pub(crate) struct ParsedChecks {
    checks: Vec<ParsedCheck>,
    names: Vec<String>,
    problems: Vec<String>,
}

static CHECKS_CACHE: Mutex<TextCache<ParsedChecks>> = Mutex::new(TextCache::new());

/// Parses the text of `fledge.dev/analysis`, remembered by text.
pub(crate) fn parse(text: &str) -> ParsedChecks {
    TextCache::get_or_parse(&CHECKS_CACHE, text, MAX_ANALYSIS_BYTES, read)
}

/// The checks, completed with what the steps say, and the problems between the two. `steps` is
/// `None` when the steps had problems of their own: their indices are then unreliable, so only
/// what does not depend on them is checked.
pub(crate) fn link(
    parsed: ParsedChecks,
    steps: Option<&[Step]>,
    problems: &mut Vec<String>,
) -> Vec<Check> {
    // An annotation that could not be read at all names nothing, and says so itself.
    let unreadable = parsed.names.is_empty() && !parsed.problems.is_empty();
    problems.extend(parsed.problems);
    let mut named: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, step) in steps.unwrap_or_default().iter().enumerate() {
        let Step::Analysis { checks } = step else {
            continue;
        };
        for (j, name) in checks.iter().enumerate() {
            named.entry(name).or_insert(i);
            if unreadable || parsed.names.contains(name) {
                continue;
            }
            let at = format!("{ANNOTATION_STEPS}[{i}].analysis.checks[{j}]");
            problems.push(if parsed.names.is_empty() {
                format!(
                    "{at}: no check named {name:?}; define it in {ANNOTATION_ANALYSIS}, e.g. `- name: {name}`"
                )
            } else {
                format!(
                    "{at}: no check named {name:?} in {ANNOTATION_ANALYSIS}{}; it has {}",
                    hint(name, parsed.names.iter().map(String::as_str)),
                    parsed.names.join(", ")
                )
            });
        }
    }
    let step_count = steps.map(<[Step]>::len);
    parsed
        .checks
        .into_iter()
        .map(|p| {
            let at = format!("{ANNOTATION_ANALYSIS}[{}]", p.index);
            let mut check = p.check;
            if steps.is_none() {
                check.starting_step = p.starting_step.or(Some(0));
                return check;
            }
            match named.get(check.name.as_str()) {
                Some(step) => {
                    if p.starting_step.is_some() {
                        problems.push(format!(
                            "{at}.startingStep: {:?} runs in the analysis step {ANNOTATION_STEPS}[{step}]; \
                             startingStep is only for background checks (ones no analysis step names); remove it",
                            check.name
                        ));
                    }
                    check.starting_step = None;
                }
                None => {
                    let start = p.starting_step.unwrap_or(0);
                    if let Some(count) = step_count.filter(|count| start >= *count) {
                        problems.push(format!(
                            "{at}.startingStep: {start} is past the last step; there are {count} steps, numbered from 0"
                        ));
                    }
                    if !p.interval_given {
                        problems.push(format!(
                            "{at}.interval: missing; {:?} is a background check (no analysis step names it), \
                             which measures again and again: give the time between measurements, e.g. `interval: 1m`",
                            check.name
                        ));
                    }
                    check.starting_step = Some(start);
                }
            }
            check
        })
        .collect()
}

fn read(text: &str) -> ParsedChecks {
    let mut out = ParsedChecks::default();
    let problems = &mut out.problems;
    if text.len() > MAX_ANALYSIS_BYTES {
        problems.push(format!(
            "{ANNOTATION_ANALYSIS}: {} bytes is too long; at most {MAX_ANALYSIS_BYTES} bytes",
            text.len()
        ));
        return out;
    }
    if flow_nesting(text) > MAX_ANALYSIS_NESTING {
        problems.push(format!(
            "{ANNOTATION_ANALYSIS}: brackets nested more than {MAX_ANALYSIS_NESTING} deep; write deep parts such as Job specs in block style"
        ));
        return out;
    }
    let doc: Yaml = match serde_yaml_ng::from_str(text) {
        Ok(doc) => doc,
        Err(e) => {
            problems.push(format!("{ANNOTATION_ANALYSIS}: not valid YAML: {e}"));
            return out;
        }
    };
    let Yaml::Sequence(items) = doc else {
        problems.push(format!(
            "{ANNOTATION_ANALYSIS}: expected a YAML list of checks such as `- name: error-rate`, found {}",
            describe(&doc)
        ));
        return out;
    };
    if items.is_empty() {
        problems.push(format!(
            "{ANNOTATION_ANALYSIS}: the list is empty; add a check or remove the annotation"
        ));
    }
    for (index, item) in items.iter().enumerate() {
        let at = format!("{ANNOTATION_ANALYSIS}[{index}]");
        let before = out.problems.len();
        let name = read_check(&at, item, &mut out.problems);
        let Some((name, parsed)) = name else { continue };
        if out.names.contains(&name) {
            out.problems.push(format!(
                "{at}.name: {name:?} is used twice; each check needs its own name"
            ));
        } else {
            out.names.push(name);
        }
        if let Some(mut parsed) = parsed.filter(|_| out.problems.len() == before) {
            parsed.index = index;
            out.checks.push(parsed);
        }
    }
    out
}

/// The check's name (when it has a usable one) and the check (when it has no problems).
fn read_check(
    at: &str,
    item: &Yaml,
    problems: &mut Vec<String>,
) -> Option<(String, Option<ParsedCheck>)> {
    let before = problems.len();
    let fields = fields(
        at,
        item,
        &CHECK_FIELDS,
        "{name: error-rate, successCondition: result < 0.01, prometheus: {query: …}}",
        problems,
    )?;
    let name = check_name(at, fields.get("name").copied());
    let name = take(name, problems)?;
    let field = |key: &str| fields.get(key).copied();
    let place = |key: &str| format!("{at}.{key}");
    let read = |problems: &mut Vec<String>| -> Option<ParsedCheck> {
        let interval = field("interval").map(|v| duration(&place("interval"), v, false));
        let count = field("count").map(|v| whole(&place("count"), v, 1));
        let initial_delay =
            field("initialDelay").map(|v| duration(&place("initialDelay"), v, true));
        let failure_limit = field("failureLimit").map(|v| whole(&place("failureLimit"), v, 0));
        let inconclusive_limit =
            field("inconclusiveLimit").map(|v| whole(&place("inconclusiveLimit"), v, 0));
        let error_limit =
            field("consecutiveErrorLimit").map(|v| whole(&place("consecutiveErrorLimit"), v, 0));
        let starting_step = field("startingStep").map(|v| whole(&place("startingStep"), v, 0));
        let no_data = field("noData").map(|v| no_data(&place("noData"), v));
        let dry_run = field("dryRun").map(|v| match v {
            Yaml::Bool(b) => Ok(*b),
            other => Err(format!(
                "{}: expected true or false, found {}",
                place("dryRun"),
                describe(other)
            )),
        });
        let provider = provider(at, &fields, problems);
        let success = field("successCondition")
            .map(|v| condition(&place("successCondition"), v, provider.as_ref()));
        let failure = field("failureCondition")
            .map(|v| condition(&place("failureCondition"), v, provider.as_ref()));
        let judged_by_conditions = match &provider {
            Some(Provider::Job(_)) => {
                for key in ["successCondition", "failureCondition"] {
                    if fields.contains_key(key) {
                        problems.push(format!(
                            "{}: a job check is judged by its Job (Complete passes, Failed fails), not by conditions; remove it",
                            place(key)
                        ));
                    }
                }
                false
            }
            _ => true,
        };
        if judged_by_conditions && provider.is_some() && success.is_none() && failure.is_none() {
            problems.push(format!(
                "{at}: no condition; give successCondition, failureCondition or both, e.g. `successCondition: result < 0.01`"
            ));
        }
        let count = take_opt(count, problems);
        if let (Some(Some(count)), None) = (count, &interval)
            && count > 1
        {
            problems.push(format!(
                "{}: missing; a check that measures {count} times needs the time between measurements, e.g. `interval: 30s`",
                place("interval")
            ));
        }
        // Every field's problem is reported before any missing value ends the check.
        let interval = take_opt(interval, problems);
        let initial_delay = take_opt(initial_delay, problems);
        let success = take_opt(success, problems);
        let failure = take_opt(failure, problems);
        let failure_limit = take_opt(failure_limit, problems);
        let inconclusive_limit = take_opt(inconclusive_limit, problems);
        let error_limit = take_opt(error_limit, problems);
        let no_data = take_opt(no_data, problems);
        let dry_run = take_opt(dry_run, problems);
        let starting_step = take_opt(starting_step, problems);
        let check = Check {
            name: name.clone(),
            interval: interval?.unwrap_or(DEFAULT_INTERVAL),
            count: count?,
            initial_delay: initial_delay?.unwrap_or_default(),
            success_condition: success?,
            failure_condition: failure?,
            failure_limit: failure_limit?.unwrap_or(0),
            inconclusive_limit: inconclusive_limit?.unwrap_or(0),
            consecutive_error_limit: error_limit?.unwrap_or(DEFAULT_CONSECUTIVE_ERROR_LIMIT),
            no_data: no_data?.unwrap_or_default(),
            dry_run: dry_run?.unwrap_or(false),
            starting_step: None,
            provider: provider?,
        };
        Some(ParsedCheck {
            index: 0,
            interval_given: fields.contains_key("interval"),
            starting_step: starting_step?.map(|n| n as usize),
            check,
        })
    };
    let check = read(problems).filter(|_| problems.len() == before);
    Some((name, check))
}

fn take<T>(r: Result<T, String>, problems: &mut Vec<String>) -> Option<T> {
    r.map_err(|p| problems.push(p)).ok()
}

/// An optional field: `Some(None)` when absent, `None` (and a problem) when wrong.
fn take_opt<T>(r: Option<Result<T, String>>, problems: &mut Vec<String>) -> Option<Option<T>> {
    r.transpose().map_err(|p| problems.push(p)).ok()
}

fn check_name(at: &str, name: Option<&Yaml>) -> Result<String, String> {
    match name {
        None => Err(format!(
            "{at}.name: missing; every check has a name that analysis steps use, e.g. `name: error-rate`"
        )),
        Some(Yaml::String(n)) if n.len() > MAX_CHECK_NAME => Err(format!(
            "{at}.name: {n:?} is {} characters long; at most {MAX_CHECK_NAME}",
            n.len()
        )),
        Some(Yaml::String(n)) if check_dns1035(n).is_ok() => Ok(n.clone()),
        Some(Yaml::String(n)) => Err(format!(
            "{at}.name: {n:?} is not a valid check name (lowercase letters, digits and '-', starting with a letter and ending with a letter or digit)"
        )),
        Some(other) => Err(format!(
            "{at}.name: expected a name such as error-rate, found {}",
            describe(other)
        )),
    }
}

/// The fields of a mapping; each unknown one is a problem (with a hint when it is close to a
/// known one) and is left out. `None` (and a problem) when `value` is not a mapping.
fn fields<'y>(
    at: &str,
    value: &'y Yaml,
    allowed: &[&str],
    example: &str,
    problems: &mut Vec<String>,
) -> Option<BTreeMap<String, &'y Yaml>> {
    let Yaml::Mapping(map) = value else {
        problems.push(format!(
            "{at}: expected a mapping such as `{example}`, found {}",
            describe(value)
        ));
        return None;
    };
    let mut fields = BTreeMap::new();
    for (key, value) in map {
        let key = yaml_text(key);
        if allowed.contains(&key.as_str()) {
            fields.insert(key, value);
        } else {
            problems.push(format!(
                "{at}.{key}: unknown field{}; expected {}",
                hint(&key, allowed.iter().copied()),
                allowed.join(", ")
            ));
        }
    }
    Some(fields)
}

/// ` (did you mean NAME?)` for the first of `known` that `word` looks like a typo of, else empty.
fn hint<'k>(word: &str, mut known: impl Iterator<Item = &'k str>) -> String {
    known
        .find(|k| similar(word, k) || (word.len() >= 4 && edit_distance(word, k) <= 2))
        .map(|k| format!(" (did you mean {k}?)"))
        .unwrap_or_default()
}

/// Levenshtein distance, ignoring case; words are short field names.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

fn duration(at: &str, value: &Yaml, zero_ok: bool) -> Result<Duration, String> {
    let d = match value {
        // A bare number means seconds, as in pause steps.
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
    if d.is_zero() && !zero_ok {
        return Err(format!("{at}: must be longer than 0s"));
    }
    Ok(d)
}

/// A whole number of at least `min`.
fn whole(at: &str, value: &Yaml, min: u32) -> Result<u32, String> {
    let n = match value {
        Yaml::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    };
    match n {
        Some(n) if n >= min => Ok(n),
        _ => Err(format!(
            "{at}: expected a whole number of at least {min}, found {}",
            match value {
                Yaml::Number(n) => n.to_string(),
                other => describe(other).to_owned(),
            }
        )),
    }
}

fn no_data(at: &str, value: &Yaml) -> Result<NoData, String> {
    match value {
        Yaml::String(s) if s == "inconclusive" => Ok(NoData::Inconclusive),
        Yaml::String(s) if s == "fail" => Ok(NoData::Fail),
        Yaml::String(s) if s == "pass" => Ok(NoData::Pass),
        other => Err(format!(
            "{at}: {} is not one of inconclusive (the default), fail and pass",
            match other {
                Yaml::String(s) => format!("{s:?}"),
                other => describe(other).to_owned(),
            }
        )),
    }
}

fn condition(at: &str, value: &Yaml, provider: Option<&Provider>) -> Result<Condition, String> {
    let text = match value {
        Yaml::String(s) => s.clone(),
        // `successCondition: true` reads as a boolean; it is a valid CEL text too.
        Yaml::Bool(b) => b.to_string(),
        other => {
            return Err(format!(
                "{at}: expected a CEL condition such as `result < 0.01`, found {}",
                describe(other)
            ));
        }
    };
    let condition = Condition::compile(&text).map_err(|why| {
        let names = if why.contains("Undeclared reference") {
            "; conditions read `result`, `results`, `isNaN(x)` and `isInf(x)`"
        } else {
            ""
        };
        format!("{at}: {text:?} {why}{names}")
    })?;
    if let Some(Provider::Prometheus(_)) = provider
        && let Some(why) = condition.misfits_numbers()
    {
        return Err(format!(
            "{at}: {text:?} cannot judge Prometheus values, which are decimal numbers: {why}; \
             write decimals in arithmetic, e.g. `result * 100.0 < 1.0`"
        ));
    }
    Ok(condition)
}

fn provider(
    at: &str,
    fields: &BTreeMap<String, &Yaml>,
    problems: &mut Vec<String>,
) -> Option<Provider> {
    let given: Vec<&str> = PROVIDERS
        .iter()
        .copied()
        .filter(|p| fields.contains_key(*p))
        .collect();
    let before = problems.len();
    let provider = match given.as_slice() {
        ["prometheus"] => prometheus(&format!("{at}.prometheus"), fields["prometheus"], problems),
        ["web"] => web(&format!("{at}.web"), fields["web"], problems),
        ["job"] => job(&format!("{at}.job"), fields["job"], problems),
        [] => {
            problems.push(format!(
                "{at}: no provider; give exactly one of prometheus, web and job"
            ));
            None
        }
        several => {
            problems.push(format!(
                "{at}: give exactly one provider, found {}",
                several.join(" and ")
            ));
            None
        }
    };
    provider.filter(|_| problems.len() == before)
}

fn prometheus(at: &str, value: &Yaml, problems: &mut Vec<String>) -> Option<Provider> {
    let fields = fields(
        at,
        value,
        &["query", "address", "timeout", "auth"],
        "{query: sum(rate(http_requests_total[1m]))}",
        problems,
    )?;
    let query = required_text(at, &fields, "query", "a PromQL query", problems);
    let address = take_opt(
        fields
            .get("address")
            .map(|v| url(&format!("{at}.address"), v)),
        problems,
    );
    let timeout = timeout(at, &fields, problems);
    let auth = match fields.get("auth") {
        None => Some(None),
        Some(v) => prometheus_auth(&format!("{at}.auth"), v, problems).map(Some),
    };
    Some(Provider::Prometheus(PrometheusQuery {
        query: query?,
        address: address?,
        timeout: timeout?,
        auth: auth?,
    }))
}

fn prometheus_auth(at: &str, value: &Yaml, problems: &mut Vec<String>) -> Option<PrometheusAuth> {
    let auth = fields(
        at,
        value,
        &["bearerToken", "basic"],
        "{bearerToken: {secretKeyRef: {name: prometheus, key: token}}}",
        problems,
    )?;
    match (auth.get("bearerToken"), auth.get("basic")) {
        (Some(token), None) => {
            secret_value(&format!("{at}.bearerToken"), token, problems).map(PrometheusAuth::Bearer)
        }
        (None, Some(basic)) => {
            let at = format!("{at}.basic");
            let parts = fields(
                &at,
                basic,
                &["username", "password"],
                "{username: fledge, password: {secretKeyRef: {name: prometheus, key: password}}}",
                problems,
            )?;
            let mut part = |key: &str| match parts.get(key) {
                Some(v) => secret_value(&format!("{at}.{key}"), v, problems),
                None => {
                    problems.push(format!("{at}.{key}: missing"));
                    None
                }
            };
            let username = part("username");
            let password = part("password");
            Some(PrometheusAuth::Basic {
                username: username?,
                password: password?,
            })
        }
        _ => {
            problems.push(format!("{at}: give exactly one of bearerToken and basic"));
            None
        }
    }
}

/// A text inline, or `{secretKeyRef: {name, key}}`.
fn secret_value(at: &str, value: &Yaml, problems: &mut Vec<String>) -> Option<SecretValue> {
    const EXAMPLE: &str = "{secretKeyRef: {name: prometheus, key: token}}";
    match value {
        Yaml::String(s) => Some(SecretValue::Literal(s.clone())),
        Yaml::Number(n) => Some(SecretValue::Literal(n.to_string())),
        Yaml::Mapping(_) => secret_key_ref_in(at, value, EXAMPLE, problems),
        other => {
            problems.push(format!(
                "{at}: expected text or `{EXAMPLE}`, found {}",
                describe(other)
            ));
            None
        }
    }
}

/// `{secretKeyRef: {name, key}}`, as a secret value or a header's `valueFrom`.
fn secret_key_ref_in(
    at: &str,
    value: &Yaml,
    example: &str,
    problems: &mut Vec<String>,
) -> Option<SecretValue> {
    let outer = fields(at, value, &["secretKeyRef"], example, problems)?;
    let Some(reference) = outer.get("secretKeyRef") else {
        problems.push(format!("{at}.secretKeyRef: missing; write `{example}`"));
        return None;
    };
    let at = format!("{at}.secretKeyRef");
    let inner = fields(
        &at,
        reference,
        &["name", "key"],
        "{name: prometheus, key: token}",
        problems,
    )?;
    let name = match inner.get("name") {
        Some(Yaml::String(n)) => check_dns1123_subdomain(n)
            .map(|()| n.clone())
            .map_err(|why| format!("{at}.name: {n:?} {why}")),
        Some(other) => Err(format!(
            "{at}.name: expected the name of a Secret, found {}",
            describe(other)
        )),
        None => Err(format!(
            "{at}.name: missing; the name of a Secret in the Deployment's namespace"
        )),
    };
    let key = match inner.get("key") {
        Some(Yaml::String(k)) if is_secret_key(k) => Ok(k.clone()),
        Some(Yaml::String(k)) => Err(format!(
            "{at}.key: {k:?} is not a Secret key (letters, digits, '-', '_' and '.', at most 253)"
        )),
        Some(other) => Err(format!(
            "{at}.key: expected a key of the Secret, found {}",
            describe(other)
        )),
        None => Err(format!("{at}.key: missing; the key of the Secret to read")),
    };
    let name = take(name, problems);
    let key = take(key, problems);
    Some(SecretValue::SecretKey {
        name: name?,
        key: key?,
    })
}

fn is_secret_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn web(at: &str, value: &Yaml, problems: &mut Vec<String>) -> Option<Provider> {
    let fields = fields(
        at,
        value,
        &["url", "method", "headers", "body", "jsonPath", "timeout"],
        "{url: \"http://{{canaryService}}/healthz\"}",
        problems,
    )?;
    let url = match fields.get("url") {
        Some(v) => take(url(&format!("{at}.url"), v), problems),
        None => {
            problems.push(format!(
                "{at}.url: missing; e.g. `url: http://{{{{canaryService}}}}/healthz`"
            ));
            None
        }
    };
    let method = match fields.get("method") {
        None => Some("GET".to_owned()),
        Some(Yaml::String(m)) if METHODS.contains(&m.as_str()) => Some(m.clone()),
        Some(other) => {
            let text = yaml_text(other);
            problems.push(format!(
                "{at}.method: {text:?} is not a method fledge sends{}; use {}",
                hint(&text, METHODS.iter().copied()),
                METHODS.join(", ")
            ));
            None
        }
    };
    let headers = match fields.get("headers") {
        None => Some(Vec::new()),
        Some(v) => headers(&format!("{at}.headers"), v, problems),
    };
    let body = match fields.get("body") {
        None => Some(None),
        Some(Yaml::String(b)) => take(variables(&format!("{at}.body"), b), problems).map(Some),
        Some(other) => {
            problems.push(format!(
                "{at}.body: expected text (write JSON as a quoted or block string), found {}",
                describe(other)
            ));
            None
        }
    };
    let json_path = match fields.get("jsonPath") {
        None => Some(None),
        Some(Yaml::String(p)) => match serde_json_path::JsonPath::parse(p) {
            Ok(_) => Some(Some(p.clone())),
            Err(e) => {
                problems.push(format!(
                    "{at}.jsonPath: {p:?} is not an RFC 9535 JSONPath: {e}; e.g. `$.status`"
                ));
                None
            }
        },
        Some(other) => {
            problems.push(format!(
                "{at}.jsonPath: expected a JSONPath such as `$.status`, found {}",
                describe(other)
            ));
            None
        }
    };
    let timeout = timeout(at, &fields, problems);
    Some(Provider::Web(WebRequest {
        url: url?,
        method: method?,
        headers: headers?,
        body: body?,
        json_path: json_path?,
        timeout: timeout?,
    }))
}

/// `[{name, value}]` or `[{name, valueFrom: {secretKeyRef: {name, key}}}]`.
fn headers(
    at: &str,
    value: &Yaml,
    problems: &mut Vec<String>,
) -> Option<Vec<(String, SecretValue)>> {
    let Yaml::Sequence(items) = value else {
        problems.push(format!(
            "{at}: expected a list such as `[{{name: Accept, value: application/json}}]`, found {}",
            describe(value)
        ));
        return None;
    };
    let before = problems.len();
    let mut headers = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let Some(header) = fields(
            &at,
            item,
            &["name", "value", "valueFrom"],
            "{name: Accept, value: application/json}",
            problems,
        ) else {
            continue;
        };
        let name = match header.get("name") {
            Some(Yaml::String(n)) if is_header_name(n) => Some(n.clone()),
            Some(Yaml::String(n)) => {
                problems.push(format!(
                    "{at}.name: {n:?} is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"
                ));
                None
            }
            Some(other) => {
                problems.push(format!(
                    "{at}.name: expected a header name, found {}",
                    describe(other)
                ));
                None
            }
            None => {
                problems.push(format!("{at}.name: missing"));
                None
            }
        };
        let value = match (header.get("value"), header.get("valueFrom")) {
            (Some(Yaml::String(v)), None) => {
                take(variables(&format!("{at}.value"), v), problems).map(SecretValue::Literal)
            }
            (Some(Yaml::Number(n)), None) => Some(SecretValue::Literal(n.to_string())),
            (Some(other), None) => {
                problems.push(format!(
                    "{at}.value: expected text, found {}",
                    describe(other)
                ));
                None
            }
            (None, Some(from)) => secret_key_ref_in(
                &format!("{at}.valueFrom"),
                from,
                "{secretKeyRef: {name: api, key: token}}",
                problems,
            ),
            _ => {
                problems.push(format!("{at}: give exactly one of value and valueFrom"));
                None
            }
        };
        if let (Some(name), Some(value)) = (name, value) {
            headers.push((name, value));
        }
    }
    (problems.len() == before).then_some(headers)
}

fn job(at: &str, value: &Yaml, problems: &mut Vec<String>) -> Option<Provider> {
    let fields = fields(
        at,
        value,
        &["spec"],
        "{spec: {template: {spec: {restartPolicy: Never, containers: [{name: smoke, image: curlimages/curl}]}}}}",
        problems,
    )?;
    let at = format!("{at}.spec");
    let Some(spec) = fields.get("spec") else {
        problems.push(format!(
            "{at}: missing; give a batch/v1 JobSpec, e.g. `{{template: {{spec: {{restartPolicy: Never, containers: [...]}}}}}}`"
        ));
        return None;
    };
    let json = match serde_json::to_value(spec) {
        Ok(json @ serde_json::Value::Object(_)) => json,
        Ok(_) => {
            problems.push(format!(
                "{at}: expected a batch/v1 JobSpec (a mapping), found {}",
                describe(spec)
            ));
            return None;
        }
        Err(e) => {
            problems.push(format!("{at}: cannot be read as JSON: {e}"));
            return None;
        }
    };
    let parsed: k8s_openapi::api::batch::v1::JobSpec = match serde_json::from_value(json.clone()) {
        Ok(parsed) => parsed,
        Err(e) => {
            problems.push(format!("{at}: not a batch/v1 JobSpec: {e}"));
            return None;
        }
    };
    let before = problems.len();
    // Every string of the spec is expanded when the Job is made: check its variables now.
    variables_in(&at, &json, problems);
    // The Kubernetes types skip fields they do not know: compare with what they kept.
    match serde_json::to_value(&parsed) {
        Ok(kept) => unknown_fields(&at, &json, &kept, problems),
        Err(e) => problems.push(format!("{at}: cannot be written back as JSON: {e}")),
    }
    let restart = parsed
        .template
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref());
    if !matches!(restart, Some("Never" | "OnFailure")) {
        problems.push(format!(
            "{at}.template.spec.restartPolicy: {}; a Job's pods need Never or OnFailure",
            restart.map_or("missing (Always by default)".to_owned(), |r| format!(
                "{r:?}"
            ))
        ));
    }
    (problems.len() == before).then_some(Provider::Job(JobCheck { spec: json }))
}

/// A problem for each string inside `value` with an unknown `{{variable}}`, at its place.
fn variables_in(at: &str, value: &serde_json::Value, problems: &mut Vec<String>) {
    use serde_json::Value as J;
    match value {
        J::String(text) => {
            if let Err(problem) = variables(at, text) {
                problems.push(problem);
            }
        }
        J::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                variables_in(&format!("{at}[{i}]"), item, problems);
            }
        }
        J::Object(fields) => {
            for (key, item) in fields {
                variables_in(&format!("{at}.{key}"), item, problems);
            }
        }
        J::Null | J::Bool(_) | J::Number(_) => {}
    }
}

/// A problem for each key of `given` that `kept` lacks: a field the Kubernetes types do not know.
fn unknown_fields(
    at: &str,
    given: &serde_json::Value,
    kept: &serde_json::Value,
    problems: &mut Vec<String>,
) {
    use serde_json::Value as J;
    match (given, kept) {
        (J::Object(given), J::Object(kept)) => {
            for (key, value) in given {
                match kept.get(key) {
                    Some(kept) => unknown_fields(&format!("{at}.{key}"), value, kept, problems),
                    None if value.is_null() => {}
                    None => problems.push(format!("{at}.{key}: unknown field")),
                }
            }
        }
        (J::Array(given), J::Array(kept)) => {
            for (i, (given, kept)) in given.iter().zip(kept).enumerate() {
                unknown_fields(&format!("{at}[{i}]"), given, kept, problems);
            }
        }
        _ => {}
    }
}

fn timeout(
    at: &str,
    fields: &BTreeMap<String, &Yaml>,
    problems: &mut Vec<String>,
) -> Option<Duration> {
    match fields.get("timeout") {
        None => Some(DEFAULT_TIMEOUT),
        Some(v) => take(duration(&format!("{at}.timeout"), v, false), problems),
    }
}

fn required_text(
    at: &str,
    fields: &BTreeMap<String, &Yaml>,
    key: &str,
    what: &str,
    problems: &mut Vec<String>,
) -> Option<String> {
    let at = format!("{at}.{key}");
    match fields.get(key) {
        Some(Yaml::String(s)) if !s.trim().is_empty() => take(variables(&at, s), problems),
        Some(Yaml::String(_)) | None => {
            problems.push(format!("{at}: missing; give {what}"));
            None
        }
        Some(other) => {
            problems.push(format!(
                "{at}: expected {what} as text, found {}",
                describe(other)
            ));
            None
        }
    }
}

/// An `http://` or `https://` address, variables allowed.
fn url(at: &str, value: &Yaml) -> Result<String, String> {
    let Yaml::String(text) = value else {
        return Err(format!(
            "{at}: expected an http:// or https:// address, found {}",
            describe(value)
        ));
    };
    if !(text.starts_with("http://") || text.starts_with("https://")) {
        return Err(format!(
            "{at}: {text:?} is not an http:// or https:// address"
        ));
    }
    variables(at, text)
}

/// `text` when every `{{name}}` in it is one of [`Variables::NAMES`].
fn variables(at: &str, text: &str) -> Result<String, String> {
    let mut rest = text;
    let mut unknown = Vec::new();
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            break;
        };
        let name = after[..close].trim();
        if !Variables::NAMES.contains(&name) {
            unknown.push(format!(
                "{{{{{name}}}}}{}",
                hint(name, Variables::NAMES.iter().copied())
            ));
        }
        rest = &after[close + 2..];
    }
    if unknown.is_empty() {
        return Ok(text.to_owned());
    }
    let known: Vec<String> = Variables::NAMES
        .iter()
        .map(|n| format!("{{{{{n}}}}}"))
        .collect();
    Err(format!(
        "{at}: unknown variable {}; fledge knows {}",
        unknown.join(", "),
        known.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::spec::{self, CanarySpec, SpecError};

    const EXAMPLE: &str = r#"- name: error-rate
  interval: 30s
  count: 4
  failureLimit: 1
  successCondition: result < 0.01
  prometheus:
    query: sum(rate(http_requests_total{service="{{canaryService}}",code=~"5.."}[1m])) / sum(rate(http_requests_total{service="{{canaryService}}"}[1m]))
"#;

    fn parse_with(steps: &str, analysis: &str) -> Result<CanarySpec, SpecError> {
        let annotations = [
            (ANNOTATION_STEPS.to_owned(), steps.to_owned()),
            (ANNOTATION_ANALYSIS.to_owned(), analysis.to_owned()),
        ]
        .into_iter()
        .collect();
        spec::parse("web", &annotations)
    }

    fn checks(analysis: &str) -> Vec<Check> {
        match parse_with("- setWeight: 5\n- analysis: {checks: [smoke]}", analysis) {
            Ok(spec) => spec.checks,
            Err(e) => panic!("{analysis}: {e}"),
        }
    }

    /// The problems of a check named `smoke` that an analysis step runs.
    fn problems(analysis: &str) -> Vec<String> {
        match parse_with("- setWeight: 5\n- analysis: {checks: [smoke]}", analysis) {
            Ok(spec) => panic!("expected problems for {analysis:?}, got {spec:?}"),
            Err(e) => e.problems,
        }
    }

    fn problem(analysis: &str) -> String {
        let all = problems(analysis);
        assert_eq!(all.len(), 1, "{all:#?}");
        all[0].clone()
    }

    const PROM: &str = "prometheus: {query: up}";

    #[test]
    fn parses_the_issue_example() {
        let spec = parse_with("- setWeight: 5\n- pause: {}", EXAMPLE).unwrap();
        let [check] = spec.checks.as_slice() else {
            panic!("{:?}", spec.checks)
        };
        assert_eq!(check.name, "error-rate");
        assert_eq!(check.interval, Duration::from_secs(30));
        assert_eq!(check.count, Some(4));
        assert_eq!(check.failure_limit, 1);
        assert_eq!(
            check.success_condition.as_ref().map(Condition::text),
            Some("result < 0.01")
        );
        assert_eq!(check.failure_condition, None);
        // No analysis step names it: a background check from the first step.
        assert_eq!(check.starting_step, Some(0));
        let Provider::Prometheus(query) = &check.provider else {
            panic!("{:?}", check.provider)
        };
        assert!(
            query
                .query
                .starts_with("sum(rate(http_requests_total{service=\"{{canaryService}}\"")
        );
        assert_eq!(query.address, None);
        assert_eq!(query.timeout, DEFAULT_TIMEOUT);
        assert_eq!(query.auth, None);
    }

    #[test]
    fn defaults() {
        let [check] = checks(&format!(
            "- name: smoke\n  successCondition: result < 1\n  {PROM}"
        ))
        .try_into()
        .unwrap();
        assert_eq!(
            check,
            Check {
                name: "smoke".into(),
                interval: DEFAULT_INTERVAL,
                count: None,
                initial_delay: Duration::ZERO,
                success_condition: Condition::compile("result < 1").ok(),
                failure_condition: None,
                failure_limit: 0,
                inconclusive_limit: 0,
                consecutive_error_limit: 4,
                no_data: NoData::Inconclusive,
                dry_run: false,
                starting_step: None,
                provider: Provider::Prometheus(PrometheusQuery {
                    query: "up".into(),
                    address: None,
                    timeout: Duration::from_secs(10),
                    auth: None,
                }),
            }
        );
    }

    #[test]
    fn every_field() {
        let text = r#"
- name: smoke
  interval: 1m30s
  count: 3
  initialDelay: 2m
  successCondition: result.ok == true
  failureCondition: "result.errors > 5"
  failureLimit: 2
  inconclusiveLimit: 3
  consecutiveErrorLimit: 0
  noData: fail
  dryRun: true
  web:
    url: "https://{{canaryService}}.{{namespace}}:8080/check?h={{canaryHash}}"
    method: POST
    headers:
    - {name: Accept, value: application/json}
    - name: Authorization
      valueFrom: {secretKeyRef: {name: api-token, key: token}}
    body: '{"deployment": "{{deployment}}"}'
    jsonPath: $.summary
    timeout: 5s
- name: latency
  interval: 60
  failureCondition: result > 0.5
  noData: pass
  startingStep: 1
  prometheus:
    query: histogram_quantile(0.99, rate(x{pod_template_hash="{{stablePodTemplateHash}}"}[{{interval}}]))
    address: http://prometheus.monitoring:9090
    timeout: 30s
    auth: {basic: {username: fledge, password: {secretKeyRef: {name: prom, key: password}}}}
- name: token
  interval: 1m
  successCondition: "true"
  prometheus:
    query: up
    auth: {bearerToken: s3cret}
- name: e2e
  interval: 1m
  startingStep: 2
  job:
    spec:
      backoffLimit: 0
      template:
        spec:
          restartPolicy: Never
          containers:
          - name: e2e
            image: curlimages/curl
            args: ["http://{{canaryService}}"]
            resources: {limits: {cpu: 1}}
"#;
        let spec = parse_with(
            "- setWeight: 5\n- analysis: {checks: [smoke]}\n- setWeight: 50",
            text,
        )
        .unwrap();
        let [smoke, latency, token, e2e] = spec.checks.try_into().unwrap();
        assert_eq!(smoke.interval, Duration::from_secs(90));
        assert_eq!(smoke.count, Some(3));
        assert_eq!(smoke.initial_delay, Duration::from_secs(120));
        assert_eq!(smoke.failure_condition.unwrap().text(), "result.errors > 5");
        assert_eq!(
            (
                smoke.failure_limit,
                smoke.inconclusive_limit,
                smoke.consecutive_error_limit
            ),
            (2, 3, 0)
        );
        assert_eq!(smoke.no_data, NoData::Fail);
        assert!(smoke.dry_run);
        assert_eq!(smoke.starting_step, None);
        assert_eq!(
            smoke.provider,
            Provider::Web(WebRequest {
                url: "https://{{canaryService}}.{{namespace}}:8080/check?h={{canaryHash}}".into(),
                method: "POST".into(),
                headers: vec![
                    (
                        "Accept".into(),
                        SecretValue::Literal("application/json".into())
                    ),
                    (
                        "Authorization".into(),
                        SecretValue::SecretKey {
                            name: "api-token".into(),
                            key: "token".into()
                        }
                    ),
                ],
                body: Some("{\"deployment\": \"{{deployment}}\"}".into()),
                json_path: Some("$.summary".into()),
                timeout: Duration::from_secs(5),
            })
        );
        assert_eq!(latency.interval, Duration::from_secs(60));
        assert_eq!(latency.no_data, NoData::Pass);
        assert_eq!(latency.starting_step, Some(1));
        assert_eq!(
            latency.provider,
            Provider::Prometheus(PrometheusQuery {
                query: "histogram_quantile(0.99, rate(x{pod_template_hash=\"{{stablePodTemplateHash}}\"}[{{interval}}]))".into(),
                address: Some("http://prometheus.monitoring:9090".into()),
                timeout: Duration::from_secs(30),
                auth: Some(PrometheusAuth::Basic {
                    username: SecretValue::Literal("fledge".into()),
                    password: SecretValue::SecretKey {
                        name: "prom".into(),
                        key: "password".into()
                    },
                }),
            })
        );
        let Provider::Prometheus(PrometheusQuery { auth, .. }) = token.provider else {
            panic!()
        };
        assert_eq!(
            auth,
            Some(PrometheusAuth::Bearer(SecretValue::Literal(
                "s3cret".into()
            )))
        );
        assert_eq!(e2e.starting_step, Some(2));
        let Provider::Job(JobCheck { spec }) = e2e.provider else {
            panic!()
        };
        assert_eq!(
            spec["template"]["spec"]["containers"][0]["image"],
            "curlimages/curl"
        );
        assert_eq!(spec["backoffLimit"], 0);
    }

    #[test]
    fn errors_name_their_place() {
        let cases: &[(&str, &str)] = &[
            (
                "name: smoke\n  successCondition: result < 1",
                "fledge.dev/analysis[0]: no provider; give exactly one of prometheus, web and job",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  prometheus: {query: up}\n  web: {url: http://x}",
                "fledge.dev/analysis[0]: give exactly one provider, found prometheus and web",
            ),
            (
                "name: smoke\n  prometheus: {query: up}",
                "fledge.dev/analysis[0]: no condition; give successCondition, failureCondition or both, e.g. `successCondition: result < 0.01`",
            ),
            (
                "name: smoke\n  sucessCondition: result < 1\n  successCondition: result < 1\n  prometheus: {query: up}",
                "fledge.dev/analysis[0].sucessCondition: unknown field (did you mean successCondition?); expected name, interval, count, initialDelay, successCondition, failureCondition, failureLimit, inconclusiveLimit, consecutiveErrorLimit, noData, dryRun, startingStep, prometheus, web, job",
            ),
            (
                "name: smoke\n  successCondition: reslt < 1\n  prometheus: {query: up}",
                "fledge.dev/analysis[0].successCondition: \"reslt < 1\" cannot be evaluated: Undeclared reference to 'reslt'; conditions read `result`, `results`, `isNaN(x)` and `isInf(x)`",
            ),
            (
                "name: smoke\n  successCondition: result * 100 < 1\n  prometheus: {query: up}",
                "fledge.dev/analysis[0].successCondition: \"result * 100 < 1\" cannot judge Prometheus values, which are decimal numbers: Unsupported binary operator 'mul': Float(0.5), Int(100); write decimals in arithmetic, e.g. `result * 100.0 < 1.0`",
            ),
            (
                "name: smoke\n  failureCondition: result >\n  prometheus: {query: up}",
                "fledge.dev/analysis[0].failureCondition: \"result >\" is not valid CEL",
            ),
            (
                "name: smoke\n  successCondition: 5\n  prometheus: {query: up}",
                "fledge.dev/analysis[0].successCondition: expected a CEL condition such as `result < 0.01`, found a number",
            ),
            (
                "name: smoke\n  interval: 0s\n  successCondition: result < 1\n  prometheus: {query: up}",
                "fledge.dev/analysis[0].interval: must be longer than 0s",
            ),
            (
                "name: smoke\n  interval: soon\n  successCondition: result < 1\n  prometheus: {query: up}",
                "fledge.dev/analysis[0].interval: \"soon\" is not a duration; use e.g. 30s, 5m or 1h30m",
            ),
            (
                "name: smoke\n  count: 0\n  successCondition: result < 1\n  prometheus: {query: up}",
                "fledge.dev/analysis[0].count: expected a whole number of at least 1, found 0",
            ),
            (
                "name: smoke\n  count: 3\n  successCondition: result < 1\n  prometheus: {query: up}",
                "fledge.dev/analysis[0].interval: missing; a check that measures 3 times needs the time between measurements, e.g. `interval: 30s`",
            ),
            (
                "name: smoke\n  failureLimit: -1\n  successCondition: result < 1\n  prometheus: {query: up}",
                "fledge.dev/analysis[0].failureLimit: expected a whole number of at least 0, found -1",
            ),
            (
                "name: smoke\n  inconclusiveLimit: x\n  successCondition: result < 1\n  prometheus: {query: up}",
                "fledge.dev/analysis[0].inconclusiveLimit: expected a whole number of at least 0, found a string",
            ),
            (
                "name: smoke\n  consecutiveErrorLimit: 1.5\n  successCondition: result < 1\n  prometheus: {query: up}",
                "fledge.dev/analysis[0].consecutiveErrorLimit: expected a whole number of at least 0, found 1.5",
            ),
            (
                "name: smoke\n  noData: skip\n  successCondition: result < 1\n  prometheus: {query: up}",
                "fledge.dev/analysis[0].noData: \"skip\" is not one of inconclusive (the default), fail and pass",
            ),
            (
                "name: smoke\n  dryRun: yes please\n  successCondition: result < 1\n  prometheus: {query: up}",
                "fledge.dev/analysis[0].dryRun: expected true or false, found a string",
            ),
            (
                "name: smoke\n  initialDelay: [1]\n  successCondition: result < 1\n  prometheus: {query: up}",
                "fledge.dev/analysis[0].initialDelay: expected a duration such as 30s, 5m or 1h30m, found a list",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  prometheus: {}",
                "fledge.dev/analysis[0].prometheus.query: missing; give a PromQL query",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  prometheus: {query: up, adress: x}",
                "fledge.dev/analysis[0].prometheus.adress: unknown field (did you mean address?); expected query, address, timeout, auth",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  prometheus: {query: up, address: prometheus:9090}",
                "fledge.dev/analysis[0].prometheus.address: \"prometheus:9090\" is not an http:// or https:// address",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  prometheus: {query: up, timeout: 0s}",
                "fledge.dev/analysis[0].prometheus.timeout: must be longer than 0s",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  prometheus: {query: up, auth: {}}",
                "fledge.dev/analysis[0].prometheus.auth: give exactly one of bearerToken and basic",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  prometheus: {query: up, auth: {basic: {username: a}}}",
                "fledge.dev/analysis[0].prometheus.auth.basic.password: missing",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  prometheus: {query: up, auth: {bearerToken: {secretKeyRef: {name: Bad_Name, key: t}}}}",
                "fledge.dev/analysis[0].prometheus.auth.bearerToken.secretKeyRef.name: \"Bad_Name\" is not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit)",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  prometheus: {query: up, auth: {bearerToken: {secretKeyRef: {name: t, key: 'a b'}}}}",
                "fledge.dev/analysis[0].prometheus.auth.bearerToken.secretKeyRef.key: \"a b\" is not a Secret key (letters, digits, '-', '_' and '.', at most 253)",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  prometheus: {query: up, auth: {bearerToken: [x]}}",
                "fledge.dev/analysis[0].prometheus.auth.bearerToken: expected text or `{secretKeyRef: {name: prometheus, key: token}}`, found a list",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  prometheus: {query: 'rate(x[{{intervall}}])'}",
                "fledge.dev/analysis[0].prometheus.query: unknown variable {{intervall}} (did you mean interval?); fledge knows {{namespace}}, {{deployment}}, {{canaryService}}, {{stableService}}, {{rootService}}, {{canaryHash}}, {{stablePodTemplateHash}}, {{interval}}",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  web: {}",
                "fledge.dev/analysis[0].web.url: missing; e.g. `url: http://{{canaryService}}/healthz`",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  web: {url: 'http://{{canary}}/x'}",
                "fledge.dev/analysis[0].web.url: unknown variable {{canary}}; fledge knows {{namespace}}, {{deployment}}, {{canaryService}}, {{stableService}}, {{rootService}}, {{canaryHash}}, {{stablePodTemplateHash}}, {{interval}}",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  web: {url: http://x, method: get}",
                "fledge.dev/analysis[0].web.method: \"get\" is not a method fledge sends (did you mean GET?); use GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  web: {url: http://x, jsonPath: status}",
                "fledge.dev/analysis[0].web.jsonPath: \"status\" is not an RFC 9535 JSONPath",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  web: {url: http://x, body: {a: 1}}",
                "fledge.dev/analysis[0].web.body: expected text (write JSON as a quoted or block string), found a mapping",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  web: {url: http://x, body: '{{ nope }}'}",
                "fledge.dev/analysis[0].web.body: unknown variable {{nope}}",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  web: {url: http://x, headers: [{name: 'a b', value: x}]}",
                "fledge.dev/analysis[0].web.headers[0].name: \"a b\" is not an HTTP header name",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  web: {url: http://x, headers: [{name: a}]}",
                "fledge.dev/analysis[0].web.headers[0]: give exactly one of value and valueFrom",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  web: {url: http://x, headers: [{name: a, value: '{{who}}'}]}",
                "fledge.dev/analysis[0].web.headers[0].value: unknown variable {{who}}",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  web: {url: http://x, headers: [{name: a, valueFrom: {secretKeyRef: {name: s}}}]}",
                "fledge.dev/analysis[0].web.headers[0].valueFrom.secretKeyRef.key: missing; the key of the Secret to read",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  web: {url: http://x, headers: {a: b}}",
                "fledge.dev/analysis[0].web.headers: expected a list such as `[{name: Accept, value: application/json}]`, found a mapping",
            ),
            (
                "name: smoke\n  successCondition: result < 1\n  job: {spec: {template: {spec: {restartPolicy: Never, containers: []}}}}",
                "fledge.dev/analysis[0].successCondition: a job check is judged by its Job (Complete passes, Failed fails), not by conditions; remove it",
            ),
            (
                "name: smoke\n  job: {}",
                "fledge.dev/analysis[0].job.spec: missing; give a batch/v1 JobSpec",
            ),
            (
                "name: smoke\n  job: {spec: [1]}",
                "fledge.dev/analysis[0].job.spec: expected a batch/v1 JobSpec (a mapping), found a list",
            ),
            (
                "name: smoke\n  job: {spec: {template: {spec: {containers: [{name: a, image: b}]}}}}",
                "fledge.dev/analysis[0].job.spec.template.spec.restartPolicy: missing (Always by default); a Job's pods need Never or OnFailure",
            ),
            (
                "name: smoke\n  job: {spec: {template: {spec: {restartPolicy: Never, containers: [{name: a, imagee: b}]}}}}",
                "fledge.dev/analysis[0].job.spec.template.spec.containers[0].imagee: unknown field",
            ),
            (
                "name: smoke\n  job: {spec: {backoffLimit: lots, template: {}}}",
                "fledge.dev/analysis[0].job.spec: not a batch/v1 JobSpec: ",
            ),
            (
                "name: Smoke\n  successCondition: result < 1\n  prometheus: {query: up}",
                "fledge.dev/analysis[0].name: \"Smoke\" is not a valid check name",
            ),
        ];
        for (check, expected) in cases {
            let text = format!("- {check}");
            let all = match parse_with("- setWeight: 5\n- analysis: {checks: [smoke]}", &text) {
                Ok(spec) => panic!("expected problems for {text:?}, got {spec:?}"),
                Err(e) => e.problems,
            };
            // A check named wrongly is also missing for the step that names it.
            let all: Vec<&String> = all
                .iter()
                .filter(|p| !p.starts_with("fledge.dev/steps"))
                .collect();
            assert_eq!(all.len(), 1, "{text}: {all:#?}");
            assert!(
                all[0].starts_with(expected),
                "{text}:\n{}\n{expected}",
                all[0]
            );
        }
    }

    #[test]
    fn every_problem_is_reported() {
        let all = problems(
            "- name: smoke\n  interval: soon\n  count: 0\n  noData: x\n  successCondition: reslt\n  prometheus: {query: '', timeout: x}\n- name: smoke\n  nme: x\n- 5\n- {}",
        );
        let places: Vec<&str> = all
            .iter()
            .map(|p| p.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            places,
            vec![
                "fledge.dev/analysis[0].prometheus.query",
                "fledge.dev/analysis[0].prometheus.timeout",
                "fledge.dev/analysis[0].count",
                "fledge.dev/analysis[0].interval",
                "fledge.dev/analysis[0].successCondition",
                "fledge.dev/analysis[0].noData",
                "fledge.dev/analysis[1].nme",
                "fledge.dev/analysis[1]",
                "fledge.dev/analysis[1].name",
                "fledge.dev/analysis[2]",
                "fledge.dev/analysis[3].name",
            ],
            "{all:#?}"
        );
    }

    #[test]
    fn the_annotation_as_a_whole() {
        assert_eq!(
            problem("[]"),
            "fledge.dev/analysis: the list is empty; add a check or remove the annotation"
        );
        assert_eq!(
            problems("name: smoke")[0],
            "fledge.dev/analysis: expected a YAML list of checks such as `- name: error-rate`, found a mapping"
        );
        assert!(problems("- [unclosed")[0].starts_with("fledge.dev/analysis: not valid YAML: "));
        let started = std::time::Instant::now();
        let deep = format!("- {}{}", "{a: ".repeat(30), "}".repeat(30));
        assert!(problems(&deep)[0].contains("nested more than 24 deep"));
        let long = format!(
            "- name: smoke\n  prometheus: {{query: '{}'}}",
            "x".repeat(40_000)
        );
        assert!(problems(&long)[0].ends_with(" bytes is too long; at most 32768 bytes"));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn steps_and_checks_agree() {
        let two = format!(
            "- name: smoke\n  successCondition: result < 1\n  {PROM}\n- name: error-rate\n  interval: 1m\n  successCondition: result < 1\n  {PROM}"
        );
        let spec = parse_with(
            "- setWeight: 5\n- analysis: {checks: [smoke]}\n- setWeight: 50\n- analysis: {checks: [smoke, error-rate]}",
            &two,
        )
        .unwrap();
        assert_eq!(
            spec.steps[3],
            Step::Analysis {
                checks: vec!["smoke".into(), "error-rate".into()]
            }
        );
        assert_eq!(spec.steps[3].to_string(), "analysis smoke, error-rate");
        assert!(spec.checks.iter().all(|c| c.starting_step.is_none()));

        let err = |steps: &str, analysis: &str| parse_with(steps, analysis).unwrap_err().problems;
        assert_eq!(
            err(
                "- setWeight: 5\n- setWeight: 6\n- setWeight: 7\n- analysis: {checks: [smoke, error-rat]}",
                &two
            ),
            vec![
                "fledge.dev/steps[3].analysis.checks[1]: no check named \"error-rat\" in fledge.dev/analysis (did you mean error-rate?); it has smoke, error-rate"
            ]
        );
        let no_annotation = spec::parse(
            "web",
            &[(
                ANNOTATION_STEPS.to_owned(),
                "- analysis: {checks: [smoke]}".to_owned(),
            )]
            .into_iter()
            .collect(),
        )
        .unwrap_err();
        assert_eq!(
            no_annotation.problems,
            vec![
                "fledge.dev/steps[0].analysis.checks[0]: no check named \"smoke\"; define it in fledge.dev/analysis, e.g. `- name: smoke`"
            ]
        );
        assert_eq!(
            err(
                "- analysis: {checks: [smoke]}",
                &format!(
                    "- name: smoke\n  startingStep: 0\n  successCondition: result < 1\n  {PROM}"
                )
            ),
            vec![
                "fledge.dev/analysis[0].startingStep: \"smoke\" runs in the analysis step fledge.dev/steps[0]; startingStep is only for background checks (ones no analysis step names); remove it"
            ]
        );
        assert_eq!(
            err(
                "- setWeight: 5\n- setWeight: 10",
                &format!(
                    "- name: bg\n  interval: 1m\n  startingStep: 2\n  successCondition: result < 1\n  {PROM}"
                )
            ),
            vec![
                "fledge.dev/analysis[0].startingStep: 2 is past the last step; there are 2 steps, numbered from 0"
            ]
        );
        assert_eq!(
            err(
                "- setWeight: 5",
                &format!("- name: bg\n  successCondition: result < 1\n  {PROM}")
            ),
            vec![
                "fledge.dev/analysis[0].interval: missing; \"bg\" is a background check (no analysis step names it), which measures again and again: give the time between measurements, e.g. `interval: 1m`"
            ]
        );
        // A check with problems of its own is not also reported missing.
        assert_eq!(
            err(
                "- analysis: {checks: [smoke]}",
                "- name: smoke\n  prometheus: {query: up}"
            ),
            vec![
                "fledge.dev/analysis[0]: no condition; give successCondition, failureCondition or both, e.g. `successCondition: result < 0.01`"
            ]
        );
        // Steps with problems: their indices are not trusted, the rest is still checked.
        assert_eq!(
            err(
                "- setWeight: 500\n- analysis: {checks: [smoke]}",
                &format!("- name: smoke\n  successCondition: result < 1\n  {PROM}")
            ),
            vec!["fledge.dev/steps[0].setWeight: 500 is not between 0 and 100"]
        );
        let step_problem = |steps: &str| err(steps, &two)[0].clone();
        assert_eq!(
            step_problem("- analysis: {checks: []}"),
            "fledge.dev/steps[0].analysis.checks: empty; name at least one check of fledge.dev/analysis"
        );
        assert_eq!(
            step_problem("- analysis: {}"),
            "fledge.dev/steps[0].analysis.checks: missing; name checks of fledge.dev/analysis, e.g. `checks: [error-rate]`"
        );
        assert_eq!(
            step_problem("- analysis: {checks: smoke}"),
            "fledge.dev/steps[0].analysis.checks: expected a list of check names such as `[error-rate]`, found a string"
        );
        assert_eq!(
            step_problem("- analysis: {checks: [smoke, smoke]}"),
            "fledge.dev/steps[0].analysis.checks[1]: \"smoke\" is named twice"
        );
        assert_eq!(
            step_problem("- analysis: {checks: [{name: smoke}]}"),
            "fledge.dev/steps[0].analysis.checks[0]: expected a check name, found a mapping"
        );
    }

    #[test]
    fn variables_in_a_job_spec_are_checked_where_they_are() {
        let analysis = "- name: smoke\n  job:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers:\n            - name: t\n              image: curl\n              args: [\"http://{{canaryService}}/ok\", \"{{canarySvc}}\"]\n";
        assert_eq!(
            problem(analysis).split(';').next().unwrap(),
            "fledge.dev/analysis[0].job.spec.template.spec.containers[0].args[1]: unknown variable {{canarySvc}}"
        );
    }

    #[test]
    fn names_are_unique() {
        let text = format!(
            "- name: smoke\n  successCondition: result < 1\n  {PROM}\n- name: smoke\n  successCondition: result < 2\n  {PROM}"
        );
        assert_eq!(
            problem(&text),
            "fledge.dev/analysis[1].name: \"smoke\" is used twice; each check needs its own name"
        );
        let long = "a".repeat(64);
        assert!(
            problems(&format!(
                "- name: {long}\n  successCondition: result < 1\n  {PROM}"
            ))[0]
                .contains("is 64 characters long; at most 63")
        );
    }

    #[test]
    fn parsing_is_remembered_by_text() {
        let text = format!("- name: smoke\n  successCondition: result < 1\n  {PROM}");
        let first = parse(&text);
        let again = parse(&text);
        assert_eq!(first.names, again.names);
        assert_eq!(first.checks.len(), 1);
        assert_eq!(first.checks[0].check, again.checks[0].check);
    }

    #[test]
    fn typos_are_close() {
        assert_eq!(edit_distance("sucessCondition", "successCondition"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(
            hint("intervl", CHECK_FIELDS.iter().copied()),
            " (did you mean interval?)"
        );
        assert_eq!(hint("zzz", CHECK_FIELDS.iter().copied()), "");
    }
}
