//! Hostile input for `fledge.dev/analysis`: generated annotation texts (valid fragments of checks
//! mixed with garbage, then mangled byte by byte) through [`fledge::core::spec::parse`], generated
//! step lists naming checks, and generated CEL conditions through
//! [`fledge::core::analysis::Condition::compile`], `evaluate` and
//! [`fledge::core::analysis::condition::judge`]. None may panic or hang; every problem must name
//! its place under `fledge.dev/analysis` or `fledge.dev/steps`.
//!
//! Cases: 60,000 annotation texts + 20,000 step lists + 20,000 conditions; `HOSTILE_SCALE=N`
//! multiplies them. The seed is fixed so that CI is repeatable; `HOSTILE_SEED=random` explores
//! (the seed is printed, to replay a failure).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fledge::core::analysis::condition::{Judgement, judge};
use fledge::core::analysis::{
    ANNOTATION_ANALYSIS, Check, Condition, NoData, PrometheusQuery, Provider, Reading,
};
use fledge::core::spec::{self, ANNOTATION_STEPS};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::json;

/// Longer than any case takes in a debug build on a loaded machine: a slower case is a hang.
const CASE_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Annotation texts
// ---------------------------------------------------------------------------------------------

/// Fields as users write them, valid on their own.
const FIELDS: &[&str] = &[
    "name: smoke",
    "name: error-rate",
    "interval: 30s",
    "interval: 1m",
    "count: 4",
    "initialDelay: 1m",
    "successCondition: result < 0.01",
    "successCondition: results.all(x, x < 0.5)",
    "failureCondition: result > 0.1",
    "failureCondition: \"isNaN(result) || result.errors > 3\"",
    "failureLimit: 1",
    "inconclusiveLimit: 2",
    "consecutiveErrorLimit: 4",
    "noData: fail",
    "noData: pass",
    "dryRun: true",
    "startingStep: 1",
    "prometheus: {query: up}",
    "prometheus:\n    query: 'sum(rate(x{service=\"{{canaryService}}\",code=~\"5..\"}[{{interval}}]))'\n    address: http://prometheus:9090\n    timeout: 5s",
    "prometheus: {query: up, auth: {bearerToken: {secretKeyRef: {name: prom, key: token}}}}",
    "prometheus: {query: up, auth: {basic: {username: u, password: p}}}",
    "web: {url: \"http://{{canaryService}}/healthz\", jsonPath: $.status}",
    "web:\n    url: https://x/{{namespace}}\n    method: POST\n    headers: [{name: A, value: b}, {name: C, valueFrom: {secretKeyRef: {name: s, key: k}}}]\n    body: '{\"a\": \"{{deployment}}\"}'",
    "job: {spec: {template: {spec: {restartPolicy: Never, containers: [{name: a, image: b}]}}}}",
    "job:\n    spec:\n      backoffLimit: 1\n      template:\n        spec:\n          restartPolicy: OnFailure\n          containers:\n          - name: e2e\n            image: curl\n            resources: {limits: {cpu: 1}}",
];

/// Keys, right and wrong, for garbage values.
const KEYS: &[&str] = &[
    "name",
    "interval",
    "count",
    "initialDelay",
    "successCondition",
    "failureCondition",
    "failureLimit",
    "consecutiveErrorLimit",
    "noData",
    "dryRun",
    "startingStep",
    "prometheus",
    "web",
    "job",
    "query",
    "url",
    "spec",
    "auth",
    "headers",
    "jsonPath",
    "secretKeyRef",
    "sucessCondition",
    "\"\"",
    "? [a]",
    "<<",
    "1",
];

/// Values that break things: YAML oddities, huge and odd numbers, deep brackets, bad CEL,
/// unknown variables, anchors and tags.
const VALUES: &[&str] = &[
    "",
    "~",
    "null",
    "[",
    "{",
    "]",
    "{{",
    "}}",
    "'{{nope}}'",
    "\"{{ canaryService }}\"",
    "-1",
    "0",
    "99999999999999999999999",
    "1e309",
    ".nan",
    ".inf",
    "0x1F",
    "true",
    "[1, 2, [3]]",
    "{a: {b: {c: {d: {e: 1}}}}}",
    "&a x",
    "*a",
    "!!binary aGVsbG8=",
    "!custom {}",
    "result <",
    "result * 100 < 1",
    "results.all(x, results.all(y, results.all(z, x < y)))",
    "(((((((((((((((((((1)))))))))))))))))))",
    "'é ✓ \\u0000'",
    "\"\\t\\n\"",
    "|\n    multi\n    line",
    "{query: [up]}",
    "{spec: [1]}",
    "{spec: {template: {spec: {containers: 5}}}}",
    "{url: ftp://x}",
    "{bearerToken: {secretKeyRef: {name: UPPER, key: 'a b'}}}",
    "- a\n  - b",
];

fn garbage_field() -> impl Strategy<Value = String> {
    prop_oneof![
        (select(KEYS), select(VALUES)).prop_map(|(k, v)| format!("{k}: {v}")),
        "[ -~]{0,24}",
        "\\PC{0,12}",
    ]
}

fn item() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![4 => select(FIELDS).prop_map(str::to_owned), 1 => garbage_field()],
        0..9,
    )
    .prop_map(|fields| {
        let mut text = String::from("- ");
        for (i, field) in fields.iter().enumerate() {
            if i > 0 {
                text.push_str("\n  ");
            }
            text.push_str(field);
        }
        text
    })
}

/// Byte-level damage: characters inserted, removed or replaced at random places.
#[derive(Clone, Debug)]
enum Damage {
    Insert(Index, char),
    Remove(Index),
    Replace(Index, char),
}

fn damage() -> impl Strategy<Value = Damage> {
    let chars = prop_oneof![
        select(vec![
            '[', ']', '{', '}', ':', '-', ' ', '\n', '\t', '\'', '"', '#', '&', '*', '!', '|', '>',
            '%', '@', '`', ',', '?', '\\', '\u{0}', 'é', '\u{feff}',
        ]),
        any::<char>(),
    ];
    prop_oneof![
        (any::<Index>(), chars.clone()).prop_map(|(i, c)| Damage::Insert(i, c)),
        any::<Index>().prop_map(Damage::Remove),
        (any::<Index>(), chars).prop_map(|(i, c)| Damage::Replace(i, c)),
    ]
}

fn apply(text: &str, damage: &[Damage]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for d in damage {
        let at = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len) };
        match d {
            Damage::Insert(i, c) => {
                let at = at(i, chars.len() + 1);
                chars.insert(at, *c);
            }
            Damage::Remove(i) if !chars.is_empty() => {
                let at = at(i, chars.len());
                chars.remove(at);
            }
            Damage::Replace(i, c) if !chars.is_empty() => {
                let at = at(i, chars.len());
                chars[at] = *c;
            }
            _ => {}
        }
    }
    chars.into_iter().collect()
}

fn analysis_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (vec(item(), 0..4), vec(damage(), 0..3)).prop_map(|(items, damage)| apply(&items.join("\n"), &damage)),
        1 => "\\PC{0,64}",
        1 => (1usize..40, select(vec!["[", "{a: ", "- ", "  "])).prop_map(|(n, open)| open.repeat(n)),
    ]
}

const STEP_TEXTS: &[&str] = &[
    "- setWeight: 5",
    "- pause: {}",
    "- analysis: {checks: [smoke]}",
    "- analysis: {checks: [smoke, error-rate]}",
    "- analysis: {checks: [nope]}",
    "- analysis: {checks: []}",
    "- analysis: {templates: [{templateName: x}]}",
    "- analysis: {checks: smoke}",
    "- analysis: {checks: [smoke, smoke]}",
    "- analysis: {checks: [{a: 1}]}",
    "- analysis:",
    "- analysis: [smoke]",
    "- setWeight: 500",
];

fn steps_text() -> impl Strategy<Value = String> {
    (vec(select(STEP_TEXTS), 0..6), vec(damage(), 0..2))
        .prop_map(|(steps, damage)| apply(&steps.join("\n"), &damage))
}

/// Parses the annotations; every problem must name its place.
fn check_annotations(steps: Option<&str>, analysis: &str) -> Result<(), TestCaseError> {
    let mut annotations = BTreeMap::new();
    annotations.insert(ANNOTATION_ANALYSIS.to_owned(), analysis.to_owned());
    if let Some(steps) = steps {
        annotations.insert(ANNOTATION_STEPS.to_owned(), steps.to_owned());
    }
    let started = Instant::now();
    let parsed = spec::parse("web", &annotations);
    let took = started.elapsed();
    prop_assert!(
        took < CASE_TIMEOUT,
        "took {took:?}\nsteps: {steps:?}\nanalysis: {analysis:?}"
    );
    match parsed {
        Ok(spec) => {
            for check in &spec.checks {
                prop_assert!(!check.name.is_empty());
                if let Some(start) = check.starting_step {
                    prop_assert!(start < spec.steps.len());
                }
            }
        }
        Err(e) => {
            prop_assert!(!e.problems.is_empty());
            for problem in &e.problems {
                prop_assert!(
                    problem.starts_with(ANNOTATION_ANALYSIS)
                        || problem.starts_with(ANNOTATION_STEPS),
                    "problem without its place: {problem}\nsteps: {steps:?}\nanalysis: {analysis:?}"
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Conditions
// ---------------------------------------------------------------------------------------------

const ATOMS: &[&str] = &[
    "result",
    "results",
    "x",
    "y",
    "nope",
    "0",
    "1",
    "0.01",
    "-1",
    "1e308",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615u",
    "'ok'",
    "\"\"",
    "b'\\xff'",
    "true",
    "null",
    "[]",
    "[1, 2.5, 'a']",
    "{'a': 1}",
    "{1: 2, 1: 3}",
    "result.a",
    "result.errors",
    "results[0]",
    "results[-1]",
    "result[0]",
    "size(results)",
    "isNaN(result)",
    "isInf(result)",
    "int(result)",
    "double(result)",
    "string(result)",
    "type(result)",
    "has(result.a)",
];

fn condition() -> impl Strategy<Value = String> {
    let leaf = select(ATOMS).prop_map(str::to_owned);
    let expr = leaf.prop_recursive(5, 48, 3, |inner| {
        prop_oneof![
            (
                inner.clone(),
                select(vec![
                    "<", "<=", ">", ">=", "==", "!=", "&&", "||", "+", "-", "*", "/", "%", "in"
                ]),
                inner.clone()
            )
                .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
            inner.clone().prop_map(|a| format!("!{a}")),
            inner.clone().prop_map(|a| format!("-{a}")),
            (
                inner.clone(),
                select(vec!["all", "exists", "exists_one", "map", "filter"]),
                select(vec!["x", "y"]),
                inner.clone()
            )
                .prop_map(|(range, m, v, body)| format!("{range}.{m}({v}, {body})")),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(a, b, c)| format!("({a} ? {b} : {c})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("{a}[{b}]")),
            (
                select(vec![
                    "size", "isNaN", "isInf", "int", "uint", "double", "string", "max", "nope"
                ]),
                vec(inner.clone(), 0..3)
            )
                .prop_map(|(f, args)| format!("{f}({})", args.join(", "))),
            vec(inner, 0..4).prop_map(|items| format!("[{}]", items.join(", "))),
        ]
    });
    prop_oneof![
        6 => (expr, vec(damage(), 0..2)).prop_map(|(e, d)| apply(&e, &d)),
        1 => "[ -~]{0,40}",
        1 => (1usize..200, select(vec!["(", "[", "!", "-", "a.", "1 + ", "results.all(x, "])).prop_map(|(n, s)| s.repeat(n)),
    ]
}

fn check_with(condition: Condition) -> Check {
    Check {
        name: "c".into(),
        interval: Duration::from_secs(30),
        count: None,
        initial_delay: Duration::ZERO,
        success_condition: Some(condition.clone()),
        failure_condition: Some(condition),
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
}

/// Compiles `text`, and when it compiles evaluates and judges it on several measurements.
fn check_condition(text: &str) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let compiled = Condition::compile(text);
    let Ok(condition) = compiled else {
        prop_assert!(compiled.is_err());
        return Ok(());
    };
    prop_assert_eq!(condition.text(), text);
    // Judging evaluates the condition as failureCondition, then (unless it held) as
    // successCondition.
    let values = [
        json!(i64::MAX),
        json!((0..40).map(|i| f64::from(i) / 7.0).collect::<Vec<_>>()),
        json!({"a": 1, "errors": [1, 2], "nested": {"b": [null, true, "x"]}}),
    ];
    let check = check_with(condition);
    for value in values {
        let Judgement { value: shown, .. } = judge(&check, &Reading::Value(value));
        prop_assert!(shown.chars().count() <= 120);
    }
    let took = started.elapsed();
    prop_assert!(took < CASE_TIMEOUT, "took {took:?}: {text:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

fn scale() -> u32 {
    std::env::var("HOSTILE_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// The generator's seed: fixed, so that CI throws the same cases every time and a failure can be
/// replayed; `HOSTILE_SEED=<n>` picks another, `HOSTILE_SEED=random` a fresh one (printed).
fn seed() -> u64 {
    const FIXED: u64 = 0x616e_616c_7973_6973;
    match std::env::var("HOSTILE_SEED").as_deref() {
        Ok("random") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(FIXED, |d| d.as_nanos() as u64),
        Ok(n) => n.parse().unwrap_or(FIXED),
        Err(_) => FIXED,
    }
}

fn run<T: std::fmt::Debug>(
    test: &str,
    cases: u32,
    strategy: impl Strategy<Value = T>,
    check: impl Fn(T) -> Result<(), TestCaseError>,
) {
    let cases = cases * scale();
    let seed = seed();
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            max_shrink_time: 60_000,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let started = Instant::now();
    eprintln!("hostile_analysis: {test}: HOSTILE_SEED={seed}");
    let result = runner.run(&strategy, check);
    eprintln!(
        "hostile_analysis: {test}: {cases} cases in {:?}",
        started.elapsed()
    );
    if let Err(e) = result {
        panic!("{test}: {e}");
    }
}

#[test]
fn hostile_annotation_texts() {
    run("annotation texts", 60_000, analysis_text(), |text| {
        check_annotations(
            Some("- setWeight: 5\n- analysis: {checks: [smoke]}\n- setWeight: 50"),
            &text,
        )?;
        Ok(())
    });
}

#[test]
fn hostile_step_lists_naming_checks() {
    let checks = "- name: smoke\n  successCondition: result < 1\n  prometheus: {query: up}\n- name: bg\n  interval: 1m\n  startingStep: 1\n  failureCondition: result > 1\n  web: {url: 'http://{{canaryService}}'}";
    run(
        "step lists",
        20_000,
        (steps_text(), any::<bool>(), analysis_text()),
        |(steps, known, analysis)| {
            let analysis = if known { checks.to_owned() } else { analysis };
            check_annotations(Some(&steps), &analysis)?;
            check_annotations(None, &analysis)
        },
    );
}

#[test]
fn hostile_conditions() {
    run("conditions", 20_000, condition(), |text| {
        check_condition(&text)
    });
}
