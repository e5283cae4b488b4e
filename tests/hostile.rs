//! Hostile input: mutated and random AdmissionReviews thrown at the decision
//! ([`fledge::core::admission::review::parse`], [`fledge::core::admission::decide`] and
//! [`fledge::core::admission::review::answer`]), at [`fledge::runtime::server::review`], and at the HTTP handler
//! (`POST /mutate`, driven in-process). None may panic or hang; every reply must be a well-formed
//! AdmissionReview under the request's uid (or a 4xx with a reason when there is no uid); every patch
//! must apply to the request's object, keep the stable template, and be stable under reinvocation.
//!
//! Inputs come from realistic seeds built here plus every `tests/data/*.json`: structure-aware
//! mutations of the seeds' JSON, byte-level mutations of their text, and random bytes and JSON. Each
//! case runs on one shared tokio runtime under a timeout, so a hang fails loudly instead of stalling.
//!
//! Cases: 20,000 hostile fledge fields + 20,000 mangled structures + 20,000 mangled bytes and random
//! JSON at the decision and `review`, and 40,000 mixed through the HTTP handler; `HOSTILE_SCALE=N`
//! multiplies them (a longer soak). The seed is fixed so that CI is repeatable; `HOSTILE_SEED=random`
//! explores (the seed used is printed, to replay a failure). `--nocapture` shows the counts per test
//! and where cases ended.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use fledge::core::admission::review as wire;
use fledge::core::admission::{self, AdmissionOutcome, ReviewRequest};
use fledge::core::spec::{
    ANNOTATION_HOLD, ANNOTATION_ROOT_SERVICE, ANNOTATION_STABLE_HASH, ANNOTATION_STATE,
    ANNOTATION_STEPS, LABEL_ENABLED,
};
use fledge::core::template;
use fledge::runtime::server::{self, AppState, BadRequest, MAX_BODY_BYTES};
use http_body_util::BodyExt as _;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{Value, json};
use tower::ServiceExt as _;

/// Longer than any case should take even in a debug build on a loaded machine; a case that takes
/// longer is a hang.
const CASE_TIMEOUT: Duration = Duration::from_secs(5);
/// The same for the fixed cases, whose bodies are up to 3 MiB.
const FIXED_CASE_TIMEOUT: Duration = Duration::from_secs(60);

const STEPS: &str =
    "- setWeight: 5\n- pause: {duration: 2m}\n- setWeight: 50\n- pause: {}\n- setWeight: 100\n";

// ---------------------------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------------------------

/// A Deployment `web` as the API server sends it, running `image`.
fn deployment(image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "uid": "6b1c7a0e-0d6c-4d59-9b0e-2b0c7f8a4e11",
            "resourceVersion": "1200",
            "generation": 3,
            "creationTimestamp": "2025-01-02T03:04:05Z",
            "labels": {"app": "web", LABEL_ENABLED: "true"},
            "annotations": {
                ANNOTATION_STEPS: STEPS,
                "deployment.kubernetes.io/revision": "3",
                "kubectl.kubernetes.io/last-applied-configuration":
                    "{\"apiVersion\":\"apps/v1\",\"kind\":\"Deployment\",\"metadata\":{\"name\":\"web\"}}\n",
            },
            "managedFields": [{
                "manager": "kubectl-client-side-apply",
                "operation": "Update",
                "apiVersion": "apps/v1",
                "time": "2025-01-02T03:04:05Z",
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {}}}}}
            }]
        },
        "spec": {
            "replicas": 4,
            "revisionHistoryLimit": 10,
            "progressDeadlineSeconds": 600,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": {"app": "web"},
                    "annotations": {"prometheus.io/scrape": "true"}
                },
                "spec": {
                    "containers": [{
                        "name": "web",
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
                        "env": [{"name": "MODE", "value": "prod"}],
                        "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}},
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 5}
                    }],
                    "restartPolicy": "Always",
                    "terminationGracePeriodSeconds": 30
                }
            }
        },
        "status": {"replicas": 4, "readyReplicas": 4, "observedGeneration": 3}
    })
}

fn with_annotation(mut object: Value, key: &str, value: &str) -> Value {
    object["metadata"]["annotations"][key] = json!(value);
    object
}

fn template_hash(object: &Value) -> String {
    template::hash(&object["spec"]["template"])
}

fn state(phase: &str, hash: &str) -> String {
    json!({"phase": phase, "hash": hash, "step": 1, "weight": "5", "message": "checks pass"})
        .to_string()
}

/// `pending` as the webhook stores it: held (paused) against the template of `stable`.
fn recorded(stable: Value, pending: &Value) -> Value {
    let mut object = with_annotation(pending.clone(), ANNOTATION_HOLD, "true");
    object["spec"]["paused"] = json!(true);
    with_annotation(object, ANNOTATION_STABLE_HASH, &template_hash(&stable))
}

fn review(operation: &str, object: Option<Value>, old: Option<Value>) -> Value {
    let mut review = fledge::core::admission::review::deployment_review(
        "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kubernetes-admin",
        object.as_ref().unwrap_or(&Value::Null),
        old.as_ref(),
    );
    review["request"]["operation"] = json!(operation);
    review["request"]["object"] = json!(object);
    review["request"]["name"] = json!("web");
    review["request"]["namespace"] = json!("shop");
    review
}

fn update(old: Value, new: Value) -> Value {
    review("UPDATE", Some(new), Some(old))
}

/// Realistic reviews, one per path through the decision, plus every `tests/data/*.json`.
fn seeds() -> &'static [Value] {
    static SEEDS: OnceLock<Vec<Value>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let v1 = deployment("registry.example.com/web:1.0.0");
        let v2 = deployment("registry.example.com/web:2.0.0");
        let v3 = deployment("registry.example.com/web:3.0.0");
        let h2 = template_hash(&v2);
        let mut scaled = v1.clone();
        scaled["spec"]["replicas"] = json!(10);
        let mut unlabelled = v2.clone();
        unlabelled["metadata"]["labels"] = json!({"app": "web"});
        let mut no_steps = v2.clone();
        no_steps["metadata"]["annotations"] = json!({"example.com/team": "shop"});
        let mut sts = review("UPDATE", Some(v2.clone()), Some(v1.clone()));
        sts["request"]["kind"]["kind"] = json!("StatefulSet");
        let mut json_steps = with_annotation(
            with_annotation(
                v2.clone(),
                ANNOTATION_STEPS,
                r#"[{"setWeight": 0.01}, {"pause": {"duration": "1h30m"}}, {"setWeight": 12.5}, {"pause": {}}]"#,
            ),
            ANNOTATION_ROOT_SERVICE,
            "frontend",
        );
        json_steps["metadata"]["name"] = json!("checkout-api");
        let mut dry = update(v1.clone(), v2.clone());
        dry["request"]["dryRun"] = json!(true);
        let mut generated = v1.clone();
        generated["metadata"]
            .as_object_mut()
            .expect("metadata")
            .remove("name");
        generated["metadata"]["generateName"] = json!("web-");
        let mut generated = review("CREATE", Some(generated), None);
        generated["request"]["name"] = json!("");
        let pending = with_annotation(
            recorded(v1.clone(), &v2),
            ANNOTATION_STATE,
            &state("Progressing", &h2),
        );
        let same_canary = v2.clone();

        let mut seeds = vec![
            review("CREATE", Some(v1.clone()), None),
            review(
                "CREATE",
                Some(with_annotation(
                    recorded(v1.clone(), &v2),
                    ANNOTATION_STATE,
                    &state("Paused", &h2),
                )),
                None,
            ),
            update(v1.clone(), v2.clone()),
            update(pending.clone(), same_canary),
            update(
                with_annotation(v1.clone(), ANNOTATION_STATE, &state("Aborted", &h2)),
                v2.clone(),
            ),
            update(
                with_annotation(v1.clone(), ANNOTATION_STATE, &state("Promoting", &h2)),
                v2.clone(),
            ),
            update(pending.clone(), {
                let mut v = pending.clone();
                v["spec"]["template"] = v3["spec"]["template"].clone();
                v
            }),
            update(v1.clone(), scaled),
            update(v1.clone(), unlabelled),
            update(v1.clone(), no_steps),
            update(v1.clone(), json_steps),
            review("DELETE", None, Some(v1.clone())),
            sts,
            dry,
            generated,
        ];
        seeds.extend(fixtures());
        seeds
    })
}

/// Every `tests/data/*.json` that is JSON, whatever it holds.
fn fixtures() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut paths: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    paths
        .iter()
        .filter_map(|p| {
            let text = std::fs::read(p).ok()?;
            match serde_json::from_slice(&text) {
                Ok(v) => Some(v),
                Err(e) => {
                    eprintln!("hostile: skipping {} as a seed: {e}", p.display());
                    None
                }
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Rendering: JSON text with raw tokens and duplicate keys that `serde_json::Value` cannot hold
// ---------------------------------------------------------------------------------------------

/// A string starting with this is written as raw JSON text (e.g. `1e400`, `"\ud800"`).
const RAW: &str = "\u{1}\u{2}raw\u{3}";
/// An object key starting with this is written without the marker: a duplicate of another key.
const DUP: &str = "\u{1}\u{2}dup\u{3}";

fn write_json(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::String(s) => match s.strip_prefix(RAW) {
            Some(raw) => out.extend_from_slice(raw.as_bytes()),
            None => write_string(s, out),
        },
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            out.push(b'{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key.strip_prefix(DUP).unwrap_or(key), out);
                out.push(b':');
                write_json(item, out);
            }
            out.push(b'}');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("scalar"),
    }
}

/// A JSON string literal; the common case (nothing to escape) without serde_json, which is slow
/// at it in a debug build.
fn write_string(s: &str, out: &mut Vec<u8>) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("string");
    }
}

fn render(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * 1024);
    write_json(value, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

const INTERESTING_STRINGS: &[&str] = &[
    "",
    " ",
    "true",
    "True",
    "false",
    "null",
    "0",
    "-1",
    "apps",
    "v1",
    "Deployment",
    "CREATE",
    "UPDATE",
    "DELETE",
    "CONNECT",
    "create",
    "admission.k8s.io/v1",
    "admission.k8s.io/v1beta1",
    "AdmissionReview",
    "web",
    "web-canary",
    "Web",
    "a-very-long-deployment-name-that-is-over-fifty-six-characters",
    "fledge.dev/steps",
    "fledge.dev/state",
    "fledge.dev/canary-hash",
    "fledge.dev/canary-template",
    "fledge.dev/enabled",
    "fledge.dev/stepz",
    "Aborted",
    "Promoting",
    "\u{0}",
    "\u{202e}gnp.exe",
    "🦀🦀🦀",
    "\u{fffd}",
    "e\u{301}",
    "a~b/c",
    "~1~0/",
    "\\",
    "\"",
    "\n\r\t",
    "{}",
    "[]",
    "${HOME}",
    "%s%n",
];

const FLEDGE_KEYS: &[&str] = &[
    ANNOTATION_STEPS,
    ANNOTATION_ROOT_SERVICE,
    ANNOTATION_STABLE_HASH,
    ANNOTATION_HOLD,
    ANNOTATION_STATE,
    LABEL_ENABLED,
    "fledge.dev/",
    "fledge.dev/step",
    "fledge.dev/Steps",
    "fledge.dev/root_service",
    "fledge.dev/a/b",
    "fledge.dev/~",
    "fledge.dev/~0~1",
    "fledge.dev",
    "FLEDGE.DEV/steps",
    "example.com/x/y~z",
    "/",
    "~",
    "",
];

/// Raw JSON text spliced in place of a value: numbers serde_json cannot hold, bad escapes, junk.
const RAW_TOKENS: &[&str] = &[
    "1e400",
    "-1e400",
    "1e-400",
    "123456789012345678901234567890",
    "-123456789012345678901234567890",
    "18446744073709551616",
    "-9223372036854775809",
    "-0",
    "-0.0",
    "1E+2",
    "0.1e1",
    "\"\\ud800\"",
    "\"\\udc00\\ud800\"",
    "\"\\u0000\"",
    "\"\\uD83E\\uDD80\"",
    "\"\\x41\"",
    "\"\t\"",
    "NaN",
    "Infinity",
    "tru",
    "nul",
    "01",
    "1.",
    ".5",
    "+1",
    "[",
    "{",
    "\"",
    "[1,]",
    "{\"a\":1,}",
    "{\"a\" 1}",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
];

// Text is made from a seed by [`Rng`]: composing strategies for it is slow to generate in a debug
// build. The cases stay readable: failures print the body, and mutations hold the text they insert.

/// Short plain words, odd and well-known strings, fledge keys, random Unicode, long repeats.
fn text() -> impl Strategy<Value = String> {
    any::<u64>().prop_map(|seed| random_string(&mut Rng(seed)))
}

/// Keys: anything [`text`] makes, more often fledge's own.
fn key() -> impl Strategy<Value = String> {
    any::<u64>().prop_map(|seed| {
        let mut rng = Rng(seed);
        if rng.below(4) == 0 {
            rng.pick(FLEDGE_KEYS).to_owned()
        } else {
            random_string(&mut rng)
        }
    })
}

/// Random JSON: nulls, booleans, extreme numbers, odd strings, raw tokens, and nests up to `depth`.
/// Made from a seed rather than composed from strategies, which would be slow to generate; proptest
/// still shrinks the depth (and the seed).
fn json_value() -> impl Strategy<Value = Value> {
    (any::<u64>(), 0..4u32).prop_map(|(seed, depth)| random_json(&mut Rng(seed), depth))
}

/// splitmix64: a small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

fn random_string(rng: &mut Rng) -> String {
    const PLAIN: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789./~-";
    match rng.below(6) {
        0 | 1 => (0..rng.below(13))
            .map(|_| char::from(rng.pick(PLAIN)))
            .collect(),
        2 => rng.pick(INTERESTING_STRINGS).to_owned(),
        3 => rng.pick(FLEDGE_KEYS).to_owned(),
        4 => (0..rng.below(17))
            .map(|_| char::from_u32((rng.next() % 0x11_0000) as u32).unwrap_or('\u{fffd}'))
            .collect(),
        _ => {
            let c = char::from_u32((rng.next() % 0x11_0000) as u32).unwrap_or('x');
            c.to_string().repeat(rng.below(1000))
        }
    }
}

fn random_json(rng: &mut Rng, depth: u32) -> Value {
    const NUMBERS: &[i64] = &[
        0,
        1,
        -1,
        100,
        150,
        655,
        700,
        10_000,
        65_535,
        65_536,
        i64::MIN,
        i64::MAX,
    ];
    const FLOATS: &[f64] = &[0.125, 12.5, 0.01, -0.0, 1e308, f64::MIN_POSITIVE, 5e-324];
    match rng.below(if depth == 0 { 8 } else { 11 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.next().is_multiple_of(2)),
        2 => match rng.below(5) {
            0 => Value::from(rng.pick(NUMBERS)),
            1 => Value::from(rng.pick(FLOATS)),
            2 => Value::from(rng.next() as i64),
            3 => Value::from(rng.next()),
            _ => Value::from(f64::from_bits(rng.next())),
        },
        3..=5 => Value::String(random_string(rng)),
        6 | 7 => Value::String(format!("{RAW}{}", rng.pick(RAW_TOKENS))),
        8 => Value::Array(
            (0..rng.below(5))
                .map(|_| random_json(rng, depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.below(5))
                .map(|_| (random_string(rng), random_json(rng, depth - 1)))
                .collect(),
        ),
    }
}

/// setWeight values, from the plausible to the hostile.
const WEIGHTS: &[&str] = &[
    "5",
    "0",
    "100",
    "150",
    "0.125",
    "-1",
    "abc",
    "1e400",
    "700",
    "655.36",
    "999.99",
    "65536",
    "99999999999999999999",
    "0.01",
    "12.5",
    "100.00",
    "007",
    ".5",
    "1.",
    "0x10",
    ".inf",
    "-.inf",
    ".nan",
    "~",
    "null",
    "true",
    "[5]",
    "{a: 1}",
    "&a 5",
    "*a",
    "!!binary aGVsbG8=",
    "!!str 5",
    "!!int 5",
    "!!float 5",
    "\"5\"",
    "'12.5'",
    "5%",
    "1_000",
    "+5",
    "0o17",
    "- 5",
    "[[[5]]]",
    "!<tag:yaml.org,2002:str> 5",
    "|\n  5",
    "\"\\u0000\"",
    "\"700\"",
    "'999'",
    "1e2",
    "0.0000",
];

/// pause durations, from the plausible to the hostile.
const DURATIONS: &[&str] = &[
    "2m",
    "0s",
    "0",
    "90",
    "1h30m",
    "1.5",
    "-5",
    "99999999999999999999h",
    "5 minutes",
    "1m1h",
    "!!int 3",
    "&d 5m",
    "*d",
    "null",
    "{}",
    "[1m]",
    "18446744073709551615",
    "18446744073709551616",
    "5124095576030431h",
    "5124095576030432h",
    "307445734561825860m",
    "1h1h",
    "1s1m",
    "h",
    "1x",
    "1h 30m",
    "1h30m ",
    "١s",
    "1\u{0}s",
    ".inf",
    "~",
    "!!binary aGVsbG8=",
    "1e400",
];

/// Whole steps that are odd in shape.
const ODD_STEPS: &[&str] = &[
    "- pause: {}",
    "- pause:",
    "- pause: null",
    "- pause: {duration: }",
    "- analysis: {templates: [{templateName: rate}]}",
    "- setweight: 5",
    "- set_weight: 5",
    "- setCanaryScale: {weight: 5}",
    "- {setWeight: 5, pause: {}}",
    "- {}",
    "- []",
    "- setWeight",
    "- - - - 5",
    "- &a {setWeight: 5}",
    "- *a",
    "- *undefined",
    "- !!binary aGVsbG8=",
    "- ? [a, b]\n  : 5",
    "- {? {a: 1} : 2}",
    "- setWeight: &w 5\n- setWeight: *w",
    "- <<: {setWeight: 5}",
    "- <<: *a",
    "---",
    "...",
    "- \"setWeight\": 5",
    "- !custom {setWeight: 5}",
    "- {[1]: 5}",
    "- {1: 5}",
    "- {null: 5}",
    "- pause: !!map {duration: 5m}",
    "\t- setWeight: 5",
    "%YAML 1.2\n---",
    "- setWeight: 5 # comment",
    "- [setWeight, 5]",
    "- pause: {duration: 5m, duration: 6m}",
    "- pause: {duration: 5m, extra: 1}",
    "- setWeight: 5\n  pause: {}",
    "  - setWeight: 5",
    "- {setWeight: 5",
    "- \"\\ud800\"",
];

/// Up to `max` characters from `alphabet`.
fn chars(rng: &mut Rng, alphabet: &[u8], max: usize) -> String {
    (0..=rng.below(max + 1))
        .skip(1)
        .map(|_| char::from(rng.pick(alphabet)))
        .collect()
}

fn printable(rng: &mut Rng, max: usize) -> String {
    (0..rng.below(max + 1))
        .map(|_| char::from(0x20 + (rng.next() % 0x5f) as u8))
        .collect()
}

fn yaml_weight(rng: &mut Rng) -> String {
    match rng.below(7) {
        0..=3 => rng.pick(WEIGHTS).to_owned(),
        4 => (rng.next() as u32).to_string(),
        5 => format!("{}.{}", rng.below(1000), rng.below(1000)),
        _ => printable(rng, 10),
    }
}

fn yaml_duration(rng: &mut Rng) -> String {
    match rng.below(5) {
        0..=2 => rng.pick(DURATIONS).to_owned(),
        3 => format!(
            "1{}{}",
            chars(rng, b"0123456789", 25),
            chars(rng, b"hmsx ", 3)
        ),
        _ => printable(rng, 10),
    }
}

fn yaml_item(rng: &mut Rng) -> String {
    match rng.below(12) {
        0..=3 => format!("- setWeight: {}", yaml_weight(rng)),
        4..=6 => format!("- pause: {{duration: {}}}", yaml_duration(rng)),
        7..=9 => rng.pick(ODD_STEPS).to_owned(),
        10 => printable(rng, 20) + &chars(rng, b"\n\t :-", 4),
        _ => random_string(rng),
    }
}

/// Text for `fledge.dev/steps`: YAML-ish lists, JSON, deep nesting, alias bombs, junk.
fn steps_text() -> impl Strategy<Value = String> {
    prop_oneof![
        // Shrinking `n` keeps the first items: the same seed makes the same sequence.
        8 => (any::<u64>(), 0..8usize).prop_map(|(seed, n)| {
            let mut rng = Rng(seed);
            (0..n).map(|_| yaml_item(&mut rng)).collect::<Vec<_>>().join("\n")
        }),
        2 => vec(json_value(), 0..4).prop_map(|items| Value::Array(items).to_string()),
        // Nesting up to a little past serde_yaml_ng's recursion limit (128), and small alias bombs:
        // a debug build parses big ones slowly, so the fixed cases below take those.
        1 => (1..160usize).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n))),
        1 => (1..160usize).prop_map(|n| "- ".repeat(n) + "5"),
        1 => (1..160usize).prop_map(|n| "{a: ".repeat(n) + &"}".repeat(n)),
        1 => (1..5usize, 2..6usize).prop_map(|(levels, width)| alias_bomb(levels, width)),
        1 => text(),
    ]
}

/// `levels` anchors, each a list of `width` aliases of the one before: width^levels nodes if expanded.
fn alias_bomb(levels: usize, width: usize) -> String {
    let mut out = format!("- &a0 [{}]\n", vec!["setWeight"; width].join(", "));
    for level in 1..levels {
        let aliases = vec![format!("*a{}", level - 1); width].join(", ");
        out.push_str(&format!("- &a{level} [{aliases}]\n"));
    }
    out
}

/// `fledge.dev/state` values, from the real shape to junk.
fn state_text() -> impl Strategy<Value = String> {
    const PHASES: &[&str] = &[
        "Idle",
        "Progressing",
        "Paused",
        "Promoting",
        "Succeeded",
        "Aborted",
        "aborted",
        "",
        "Unknown",
    ];
    any::<u64>().prop_map(|seed| {
        let mut rng = Rng(seed);
        match rng.below(6) {
            0..=3 => {
                let weight = match rng.below(3) {
                    0 => Value::String(yaml_weight(&mut rng)),
                    1 => random_json(&mut rng, 0),
                    _ => Value::Null,
                };
                json!({
                    "phase": rng.pick(PHASES),
                    "hash": random_string(&mut rng),
                    "step": rng.next(),
                    "weight": weight,
                    "message": random_string(&mut rng),
                })
                .to_string()
            }
            4 => random_json(&mut rng, 2).to_string(),
            _ => random_string(&mut rng),
        }
    })
}

#[derive(Clone, Copy, Debug)]
enum Side {
    Object,
    Old,
    Both,
}

impl Side {
    fn pointers(self) -> &'static [&'static str] {
        match self {
            Side::Object => &["/request/object"],
            Side::Old => &["/request/oldObject"],
            Side::Both => &["/request/object", "/request/oldObject"],
        }
    }
}

fn side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::Object), Just(Side::Old), Just(Side::Both)]
}

#[derive(Clone, Debug)]
enum StrEdit {
    Truncate(Index),
    Insert(Index, String),
    Repeat(u8),
    Upper,
    Replace(String),
}

#[derive(Clone, Debug)]
enum TemplateEdit {
    /// The object gets the old object's template (no template change).
    NewIsOld,
    Swap,
    /// The object's canary annotations are set for its own template (the SameCanary path).
    RecordOwn,
    /// The old object's state is `phase` for the object's template (AbortedKept, Promotion).
    StateFor(&'static str),
    /// A template annotation of about this many bytes (near the 256 KiB annotation budget).
    Big(usize),
    Image(String),
}

/// One structure-aware change to a seed's JSON.
#[derive(Clone, Debug)]
enum Mutation {
    Replace(Index, Value),
    Raw(Index, &'static str),
    Delete(Index),
    Duplicate(Index),
    DupKey(Index, Value),
    Retype(Index, u8),
    EditString(Index, StrEdit),
    Nest(Index, usize, bool),
    Steps(Side, String),
    Annotation(Side, String, String),
    Label(Side, String, String),
    State(Side, String),
    Template(TemplateEdit),
    Field(&'static str, Value),
}

const FIELDS: &[&str] = &[
    "/apiVersion",
    "/kind",
    "/request",
    "/request/uid",
    "/request/operation",
    "/request/kind/group",
    "/request/kind/kind",
    "/request/name",
    "/request/namespace",
    "/request/dryRun",
    "/request/object",
    "/request/oldObject",
    "/request/object/metadata",
    "/request/object/metadata/name",
    "/request/object/metadata/annotations",
    "/request/object/metadata/labels",
    "/request/object/spec",
    "/request/object/spec/template",
    "/request/oldObject/spec/template",
    "/request/oldObject/metadata/annotations",
];

fn str_edit() -> impl Strategy<Value = StrEdit> {
    prop_oneof![
        any::<Index>().prop_map(StrEdit::Truncate),
        (any::<Index>(), text()).prop_map(|(i, s)| StrEdit::Insert(i, s)),
        (0u8..8).prop_map(StrEdit::Repeat),
        Just(StrEdit::Upper),
        text().prop_map(StrEdit::Replace),
    ]
}

fn template_edit() -> impl Strategy<Value = TemplateEdit> {
    prop_oneof![
        8 => Just(TemplateEdit::NewIsOld),
        4 => Just(TemplateEdit::Swap),
        12 => Just(TemplateEdit::RecordOwn),
        12 => select(&["Aborted", "Promoting", "Paused", "Idle"]).prop_map(TemplateEdit::StateFor),
        // Rare: big templates are slow to hash in a debug build; a fixed test covers the limit.
        1 => select(&[1_000usize, 262_000]).prop_map(TemplateEdit::Big),
        8 => text().prop_map(TemplateEdit::Image),
    ]
}

fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => select(INTERESTING_STRINGS).prop_map(|s| Value::String(s.to_owned())),
        2 => json_value(),
        1 => Just(Value::Null),
    ]
}

/// A change anywhere in the review: replace, delete, duplicate, retype, nest a node.
fn generic_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), json_value()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        1 => (any::<Index>(), select(RAW_TOKENS)).prop_map(|(i, t)| Mutation::Raw(i, t)),
        2 => any::<Index>().prop_map(Mutation::Delete),
        1 => any::<Index>().prop_map(Mutation::Duplicate),
        1 => (any::<Index>(), json_value()).prop_map(|(i, v)| Mutation::DupKey(i, v)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, k)| Mutation::Retype(i, k)),
        2 => (any::<Index>(), str_edit()).prop_map(|(i, e)| Mutation::EditString(i, e)),
        1 => (any::<Index>(), 1..150usize, any::<bool>()).prop_map(|(i, d, a)| Mutation::Nest(i, d, a)),
    ]
}

/// A change to what fledge reads: steps, annotations, labels, state, templates, request fields.
fn fledge_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (side(), steps_text()).prop_map(|(s, t)| Mutation::Steps(s, t)),
        2 => (side(), key(), text()).prop_map(|(s, k, v)| Mutation::Annotation(s, k, v)),
        1 => (side(), key(), text()).prop_map(|(s, k, v)| Mutation::Label(s, k, v)),
        2 => (side(), state_text()).prop_map(|(s, t)| Mutation::State(s, t)),
        3 => template_edit().prop_map(Mutation::Template),
        2 => (select(FIELDS), field_value()).prop_map(|(f, v)| Mutation::Field(f, v)),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![1 => generic_mutation(), 2 => fledge_mutation()]
}

/// One byte-level change to serialized JSON.
#[derive(Clone, Debug)]
enum ByteEdit {
    Flip(Index, u8),
    Set(Index, u8),
    Insert(Index, Vec<u8>),
    Token(Index, &'static str),
    Delete(Index, u16),
    Truncate(Index),
    Copy(Index, Index, u16),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        2 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| ByteEdit::Flip(i, b)),
        2 => (any::<Index>(), select(b"{}[]\",:\\0-e.tfn \x00\x7f\xff\xc3".as_slice())).prop_map(|(i, b)| ByteEdit::Set(i, b)),
        1 => (any::<Index>(), vec(any::<u8>(), 1..8)).prop_map(|(i, b)| ByteEdit::Insert(i, b)),
        2 => (any::<Index>(), select(RAW_TOKENS)).prop_map(|(i, t)| ByteEdit::Token(i, t)),
        2 => (any::<Index>(), 1u16..64).prop_map(|(i, n)| ByteEdit::Delete(i, n)),
        1 => any::<Index>().prop_map(ByteEdit::Truncate),
        1 => (any::<Index>(), any::<Index>(), 1u16..256).prop_map(|(a, b, n)| ByteEdit::Copy(a, b, n)),
    ]
}

/// A hostile request body, described so that proptest can shrink it.
#[derive(Clone, Debug)]
enum Input {
    Structured {
        seed: Index,
        mutations: Vec<Mutation>,
    },
    Bytes {
        seed: Index,
        mutations: Vec<Mutation>,
        edits: Vec<ByteEdit>,
    },
    RandomBytes(Vec<u8>),
    RandomJson(Value),
    /// A review envelope around a random request.
    RandomReview(Value),
}

/// Seeds with any mutations.
fn structured() -> impl Strategy<Value = Input> {
    (any::<Index>(), vec(mutation(), 1..5))
        .prop_map(|(seed, mutations)| Input::Structured { seed, mutations })
}

/// Seeds with hostile values where fledge looks: most of these reach the decision.
fn fledge_fields() -> impl Strategy<Value = Input> {
    (any::<Index>(), vec(fledge_mutation(), 1..5))
        .prop_map(|(seed, mutations)| Input::Structured { seed, mutations })
}

/// Seeds with their structure broken in a few places, and maybe a hostile value where fledge looks.
fn mangled_structure() -> impl Strategy<Value = Input> {
    (
        any::<Index>(),
        vec(generic_mutation(), 1..4),
        vec(fledge_mutation(), 0..2),
    )
        .prop_map(|(seed, mut mutations, fledge)| {
            mutations.extend(fledge);
            Input::Structured { seed, mutations }
        })
}

fn unstructured() -> impl Strategy<Value = Input> {
    prop_oneof![
        5 => (any::<Index>(), vec(mutation(), 0..2), vec(byte_edit(), 1..6))
            .prop_map(|(seed, mutations, edits)| Input::Bytes { seed, mutations, edits }),
        2 => vec(any::<u8>(), 0..512).prop_map(Input::RandomBytes),
        2 => json_value().prop_map(Input::RandomJson),
        1 => json_value().prop_map(|request| Input::RandomReview(json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request,
        }))),
    ]
}

fn any_input() -> impl Strategy<Value = Input> {
    prop_oneof![3 => structured(), 2 => unstructured()]
}

// ---------------------------------------------------------------------------------------------
// Applying mutations
// ---------------------------------------------------------------------------------------------

fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// A node of `value` as a JSON pointer, chosen by a random walk from the root seeded with `index`:
/// at each node, stop with probability 1/4, else step into a random child.
fn pick(value: &Value, index: &Index) -> String {
    let mut rng = Rng(index.index(usize::MAX) as u64);
    let mut next = move || rng.next();
    let mut at = String::new();
    let mut node = value;
    loop {
        let len = match node {
            Value::Object(map) => map.len(),
            Value::Array(items) => items.len(),
            _ => 0,
        };
        let roll = next();
        if len == 0 || roll % 4 == 0 {
            return at;
        }
        let i = (roll >> 2) as usize % len;
        match node {
            Value::Object(map) => {
                let (key, child) = map.iter().nth(i).expect("in range");
                at.push('/');
                at.push_str(&escape(key));
                node = child;
            }
            Value::Array(items) => {
                at.push_str(&format!("/{i}"));
                node = &items[i];
            }
            _ => unreachable!(),
        }
    }
}

/// Sets the value at `pointer`, creating objects on the way where there is nothing.
fn set_at(root: &mut Value, pointer: &str, value: Value) {
    if pointer.is_empty() {
        *root = value;
        return;
    }
    let mut node = root;
    let tokens: Vec<String> = pointer[1..].split('/').map(unescape).collect();
    for (i, token) in tokens.iter().enumerate() {
        let last = i + 1 == tokens.len();
        if node.is_null() {
            *node = json!({});
        }
        let next = match node {
            Value::Object(map) => map.entry(token.clone()).or_insert(Value::Null),
            Value::Array(items) => match token.parse::<usize>() {
                Ok(n) if n < items.len() => &mut items[n],
                _ => return,
            },
            _ => return,
        };
        if last {
            *next = value;
            return;
        }
        node = next;
    }
}

fn remove_at(root: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        *root = Value::Null;
        return;
    };
    match root.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.remove(&unescape(last));
        }
        Some(Value::Array(items)) => {
            if let Ok(n) = last.parse::<usize>()
                && n < items.len()
            {
                items.remove(n);
            }
        }
        _ => {}
    }
}

fn retype(value: Value, kind: u8) -> Value {
    match (kind % 8, value) {
        (0, v) => Value::String(v.to_string()),
        (1, Value::String(s)) => s.parse::<f64>().ok().map_or(json!(s.len()), Value::from),
        (1, v) => json!(v.to_string().len()),
        (2, v) => Value::Array(vec![v]),
        (3, v) => Value::Object([("value".to_owned(), v)].into_iter().collect()),
        (4, Value::Object(map)) => Value::Array(map.into_iter().map(|(_, v)| v).collect()),
        (4, Value::Array(items)) => Value::Object(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (i.to_string(), v))
                .collect(),
        ),
        (5, v) => Value::Bool(!v.is_null()),
        (6, _) => Value::Null,
        (_, Value::String(s)) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        (_, v) => v,
    }
}

fn edit_string(s: &str, edit: &StrEdit) -> String {
    let chars: Vec<char> = s.chars().collect();
    match edit {
        StrEdit::Truncate(i) => chars[..i.index(chars.len() + 1)].iter().collect(),
        StrEdit::Insert(i, text) => {
            let at = i.index(chars.len() + 1);
            let mut out: String = chars[..at].iter().collect();
            out.push_str(text);
            out.extend(&chars[at..]);
            out
        }
        StrEdit::Repeat(n) => s.repeat(usize::from(*n)),
        StrEdit::Upper => s.to_uppercase(),
        StrEdit::Replace(text) => text.clone(),
    }
}

fn apply(root: &mut Value, mutation: &Mutation) {
    match mutation {
        Mutation::Replace(i, v) => {
            let at = pick(root, i);
            set_at(root, &at, v.clone());
        }
        Mutation::Raw(i, token) => {
            let at = pick(root, i);
            set_at(root, &at, Value::String(format!("{RAW}{token}")));
        }
        Mutation::Delete(i) => {
            let at = pick(root, i);
            remove_at(root, &at);
        }
        Mutation::Duplicate(i) => {
            let at = pick(root, i);
            let Some((parent, last)) = at.rsplit_once('/') else {
                return;
            };
            let Some(copy) = root.pointer(&at).cloned() else {
                return;
            };
            match root.pointer_mut(parent) {
                Some(Value::Array(items)) => items.push(copy),
                Some(Value::Object(map)) => {
                    map.insert(
                        format!("{DUP}{}", unescape(last).trim_start_matches(DUP)),
                        copy,
                    );
                }
                _ => {}
            }
        }
        Mutation::DupKey(i, v) => {
            let at = pick(root, i);
            let Some((parent, last)) = at.rsplit_once('/') else {
                return;
            };
            if let Some(Value::Object(map)) = root.pointer_mut(parent) {
                map.insert(
                    format!("{DUP}{}", unescape(last).trim_start_matches(DUP)),
                    v.clone(),
                );
            }
        }
        Mutation::Retype(i, kind) => {
            let at = pick(root, i);
            if let Some(node) = root.pointer_mut(&at) {
                *node = retype(node.take(), *kind);
            }
        }
        Mutation::EditString(i, edit) => {
            let at = pick(root, i);
            if let Some(node) = root.pointer_mut(&at)
                && let Value::String(s) = node
                && !s.starts_with(RAW)
            {
                *s = edit_string(s, edit);
            }
        }
        Mutation::Nest(i, depth, array) => {
            let at = pick(root, i);
            if let Some(node) = root.pointer_mut(&at) {
                let mut v = node.take();
                for _ in 0..*depth {
                    v = if *array {
                        Value::Array(vec![v])
                    } else {
                        Value::Object([("a".to_owned(), v)].into_iter().collect())
                    };
                }
                *node = v;
            }
        }
        Mutation::Steps(side, text) => {
            for object in side.pointers() {
                let at = format!("{object}/metadata/annotations/{}", escape(ANNOTATION_STEPS));
                set_at(root, &at, Value::String(text.clone()));
            }
        }
        Mutation::Annotation(side, key, value) | Mutation::Label(side, key, value) => {
            let field = if matches!(mutation, Mutation::Label(..)) {
                "labels"
            } else {
                "annotations"
            };
            for object in side.pointers() {
                let at = format!("{object}/metadata/{field}/{}", escape(key));
                set_at(root, &at, Value::String(value.clone()));
            }
        }
        Mutation::State(side, text) => {
            for object in side.pointers() {
                let at = format!("{object}/metadata/annotations/{}", escape(ANNOTATION_STATE));
                set_at(root, &at, Value::String(text.clone()));
            }
        }
        Mutation::Template(edit) => edit_template(root, edit),
        Mutation::Field(pointer, value) => set_at(root, pointer, value.clone()),
    }
}

fn edit_template(root: &mut Value, edit: &TemplateEdit) {
    const NEW: &str = "/request/object/spec/template";
    const OLD: &str = "/request/oldObject/spec/template";
    let new = root.pointer(NEW).cloned();
    let old = root.pointer(OLD).cloned();
    match edit {
        TemplateEdit::NewIsOld => {
            if let Some(old) = old {
                set_at(root, NEW, old);
            }
        }
        TemplateEdit::Swap => {
            if let (Some(new), Some(old)) = (new, old) {
                set_at(root, NEW, old);
                set_at(root, OLD, new);
            }
        }
        // The stored object held against the incoming template: a revert.
        TemplateEdit::RecordOwn => {
            if let Some(new) = new {
                let annotations = "/request/oldObject/metadata/annotations";
                set_at(
                    root,
                    &format!("{annotations}/{}", escape(ANNOTATION_STABLE_HASH)),
                    Value::String(template::hash(&new)),
                );
                set_at(
                    root,
                    &format!("{annotations}/{}", escape(ANNOTATION_HOLD)),
                    Value::String("true".into()),
                );
            }
        }
        TemplateEdit::StateFor(phase) => {
            if let Some(new) = new {
                let at = format!(
                    "/request/oldObject/metadata/annotations/{}",
                    escape(ANNOTATION_STATE)
                );
                set_at(
                    root,
                    &at,
                    Value::String(state(phase, &template::hash(&new))),
                );
            }
        }
        TemplateEdit::Big(bytes) => set_at(
            root,
            &format!("{NEW}/metadata/annotations/blob"),
            Value::String("x".repeat(*bytes)),
        ),
        TemplateEdit::Image(image) => set_at(
            root,
            &format!("{NEW}/spec/containers/0/image"),
            Value::String(image.clone()),
        ),
    }
}

fn edit_bytes(bytes: &mut Vec<u8>, edit: &ByteEdit) {
    let at = |i: &Index, len: usize| i.index(len + 1);
    match edit {
        ByteEdit::Flip(i, bit) => {
            if !bytes.is_empty() {
                let n = i.index(bytes.len());
                bytes[n] ^= 1 << bit;
            }
        }
        ByteEdit::Set(i, b) => {
            if !bytes.is_empty() {
                let n = i.index(bytes.len());
                bytes[n] = *b;
            }
        }
        ByteEdit::Insert(i, new) => {
            let n = at(i, bytes.len());
            bytes.splice(n..n, new.iter().copied());
        }
        ByteEdit::Token(i, token) => {
            let n = at(i, bytes.len());
            bytes.splice(n..n, token.bytes());
        }
        ByteEdit::Delete(i, len) => {
            let n = at(i, bytes.len());
            let end = (n + usize::from(*len)).min(bytes.len());
            bytes.drain(n..end);
        }
        ByteEdit::Truncate(i) => {
            let n = at(i, bytes.len());
            bytes.truncate(n);
        }
        ByteEdit::Copy(from, to, len) => {
            let start = at(from, bytes.len());
            let end = (start + usize::from(*len)).min(bytes.len());
            let chunk = bytes[start..end].to_vec();
            let n = at(to, bytes.len());
            bytes.splice(n..n, chunk);
        }
    }
}

impl Input {
    fn body(&self) -> Vec<u8> {
        let mutated = |seed: &Index, mutations: &[Mutation]| {
            let seeds = seeds();
            let mut value = seeds[seed.index(seeds.len())].clone();
            for m in mutations {
                apply(&mut value, m);
            }
            value
        };
        match self {
            Input::Structured { seed, mutations } => render(&mutated(seed, mutations)),
            Input::Bytes {
                seed,
                mutations,
                edits,
            } => {
                let mut bytes = render(&mutated(seed, mutations));
                for edit in edits {
                    edit_bytes(&mut bytes, edit);
                }
                bytes
            }
            Input::RandomBytes(bytes) => bytes.clone(),
            Input::RandomJson(value) | Input::RandomReview(value) => render(value),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running cases: one runtime, a timeout per case, counts per outcome
// ---------------------------------------------------------------------------------------------

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// Shrinking a panic re-runs it hundreds of times: print a panic outside this file (in fledge or a
/// dependency) once per place. The failing case's report names the panic and the body either way.
fn quiet_repeated_panics() {
    let default = std::panic::take_hook();
    let seen = Mutex::new(std::collections::HashSet::new());
    std::panic::set_hook(Box::new(move |info| {
        let place = info.location().map(ToString::to_string).unwrap_or_default();
        let ours = place.starts_with(file!());
        if ours || seen.lock().map_or(true, |mut seen| seen.insert(place)) {
            default(info);
        }
    }));
}

/// The body, printable in a failure message.
fn show(body: &[u8]) -> String {
    const MAX: usize = 2000;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    let more = if body.len() > MAX { " …" } else { "" };
    format!("({} bytes) {text:?}{more}", body.len())
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic payload".to_owned())
}

/// What one test thread is working on, for the watchdog: since when, for how long at most, the body.
type Case = (Instant, Duration, Arc<[u8]>);

#[derive(Default)]
struct Watch(Mutex<Option<Case>>);

/// Ends a watched case, even when it panics.
struct Watched(Arc<Watch>);

impl Drop for Watched {
    fn drop(&mut self) {
        if let Ok(mut case) = self.0.0.lock() {
            *case = None;
        }
    }
}

/// Runs `work` on this thread, watched: a panic fails the case (proptest catches it and shrinks);
/// a case still running a second after `limit` is a hang, and a watchdog thread ends the whole run
/// at once, printing the body and saving it to a file (a stuck case cannot be stopped otherwise).
fn watched<T>(
    body: &[u8],
    limit: Duration,
    work: impl FnOnce() -> Result<T, TestCaseError>,
) -> Result<T, TestCaseError> {
    static WATCHES: Mutex<Vec<Arc<Watch>>> = Mutex::new(Vec::new());
    static WATCHDOG: OnceLock<()> = OnceLock::new();
    thread_local! {
        static WATCH: Arc<Watch> = {
            let watch = Arc::new(Watch::default());
            WATCHES.lock().expect("watches").push(watch.clone());
            watch
        };
    }
    WATCHDOG.get_or_init(|| {
        quiet_repeated_panics();
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_millis(100));
                for watch in WATCHES.lock().expect("watches").iter() {
                    let case = watch.0.lock().expect("watch");
                    if let Some((since, limit, body)) = case.as_ref()
                        && since.elapsed() > *limit + Duration::from_secs(1)
                    {
                        let file = std::env::temp_dir()
                            .join(format!("hostile-hang-{}.json", std::process::id()));
                        let saved = std::fs::write(&file, body)
                            .map_or_else(|e| e.to_string(), |()| file.display().to_string());
                        eprintln!(
                            "HANG: no answer within {limit:?} (body saved to {saved})\nbody: {}",
                            show(body)
                        );
                        std::process::abort();
                    }
                }
            }
        });
    });
    let watch = WATCH.with(Arc::clone);
    *watch.0.lock().expect("watch") = Some((Instant::now(), limit, Arc::from(body)));
    let _watched = Watched(watch);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
        .unwrap_or_else(|panic| Err(fail(format!("panicked: {}", panic_text(panic)), body)))
}

/// How many cases ran and where they ended, printed at the end of each test.
#[derive(Default)]
struct Counts(Mutex<BTreeMap<&'static str, usize>>);

impl Counts {
    fn add(&self, what: &'static str) {
        *self.0.lock().expect("counts").entry(what).or_default() += 1;
    }

    fn get(&self, what: &'static str) -> usize {
        self.0
            .lock()
            .expect("counts")
            .get(what)
            .copied()
            .unwrap_or(0)
    }

    fn report(&self, test: &str, started: Instant) {
        let counts = self.0.lock().expect("counts");
        let details: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        eprintln!(
            "hostile: {test}: {} in {:.1}s ({} seeds, {} of them from tests/data)",
            details.join(" "),
            started.elapsed().as_secs_f64(),
            seeds().len(),
            fixtures().len(),
        );
    }
}

fn scale() -> u32 {
    std::env::var("HOSTILE_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

/// The generator's seed: fixed, so that CI throws the same cases every time and a failure can be
/// replayed; `HOSTILE_SEED=<n>` picks another, `HOSTILE_SEED=random` a fresh one (printed) to explore.
fn seed() -> u64 {
    const FIXED: u64 = 0x6f6c_6564_6765_2021;
    match std::env::var("HOSTILE_SEED").as_deref() {
        Ok("random") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(FIXED, |d| d.as_nanos() as u64),
        Ok(n) => n.parse().unwrap_or(FIXED),
        Err(_) => FIXED,
    }
}

fn run(
    test: &str,
    cases: u32,
    strategy: impl Strategy<Value = Input>,
    check: fn(&[u8], &Arc<Counts>) -> Result<(), TestCaseError>,
) {
    let cases = cases * scale();
    let started = Instant::now();
    let counts = Arc::new(Counts::default());
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
    eprintln!("hostile: {test}: HOSTILE_SEED={seed}");
    let result = runner.run(&strategy, |input| {
        counts.add("cases");
        check(&input.body(), &counts)
    });
    counts.report(test, started);
    if let Err(e) = result {
        panic!("{test}: {e}");
    }
    // Shrinking runs extra cases; the generated ones alone must reach the count.
    assert!(counts.get("cases") >= cases as usize);
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

fn fail(message: impl Into<String>, body: &[u8]) -> TestCaseError {
    TestCaseError::fail(format!("{}\nbody: {}", message.into(), show(body)))
}

/// The apiVersion and kind a reply to `req` must carry: the review's own version (v1 when the
/// review names none), kind AdmissionReview.
fn reply_types(req: &ReviewRequest) -> (&str, &str) {
    let version = match req.types.api_version.as_str() {
        "" => V1,
        version => version,
    };
    (version, "AdmissionReview")
}

const V1: &str = "admission.k8s.io/v1";

/// Checks a reply is a well-formed AdmissionReview answering `uid`; returns it parsed.
fn check_reply(
    reply: &[u8],
    uid: &str,
    types: (&str, &str),
    body: &[u8],
) -> Result<Value, TestCaseError> {
    let v: Value = serde_json::from_slice(reply)
        .map_err(|e| fail(format!("the reply is not JSON: {e}"), body))?;
    let ok = |cond: bool, what: &str| {
        if cond {
            Ok(())
        } else {
            Err(fail(format!("{what}; reply: {}", show(reply)), body))
        }
    };
    ok(
        v["apiVersion"] == types.0 && v["kind"] == types.1,
        &format!("the reply is not an {}/{} review", types.0, types.1),
    )?;
    ok(v.get("request").is_none(), "the reply carries a request")?;
    let r = &v["response"];
    ok(r.is_object(), "the reply has no response")?;
    ok(r["uid"] == uid, &format!("the reply's uid is not {uid:?}"))?;
    let Some(allowed) = r["allowed"].as_bool() else {
        return Err(fail("response.allowed is not a boolean", body));
    };
    if !allowed {
        ok(
            r["status"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "a denial without a message",
        )?;
        ok(r.get("patch").is_none(), "a denial with a patch")?;
    }
    if let Some(warnings) = r.get("warnings") {
        ok(
            warnings
                .as_array()
                .is_some_and(|w| w.iter().all(Value::is_string)),
            "warnings are not a list of strings",
        )?;
    }
    match r.get("patch") {
        None => ok(r.get("patchType").is_none(), "a patchType without a patch")?,
        Some(_) => {
            ok(r["patchType"] == "JSONPatch", "patchType is not JSONPatch")?;
            ok(
                reply_patch(&v).is_some(),
                "response.patch is not the base64 of a JSON Patch",
            )?;
        }
    }
    Ok(v)
}

/// The patch in a reply, decoded.
fn reply_patch(reply: &Value) -> Option<json_patch::Patch> {
    let text = reply["response"]["patch"].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Target 1: the pure decision and its answer, for a body that parses into a request. Returns the
/// reply JSON.
fn check_decision(
    body: &[u8],
    req: &ReviewRequest,
    counts: &Counts,
) -> Result<Value, TestCaseError> {
    counts.add("decided");
    // (Determinism is checked too: `server::review` decides again and must answer the same.)
    let decision = admission::decide(req, &Default::default());
    counts.add(decision.outcome.label());
    let json = wire::answer(&req.types.api_version, &req.uid, &decision)
        .map_err(|e| fail(format!("the answer does not serialize: {e}"), body))?;
    let reply = check_reply(&json, &req.uid, reply_types(req), body)?;
    let r = &reply["response"];
    let allowed = !matches!(decision.outcome, AdmissionOutcome::Deny(_));
    if r["allowed"] != allowed {
        return Err(fail(
            format!("allowed is {} for {:?}", r["allowed"], decision.outcome),
            body,
        ));
    }
    let warnings = r
        .get("warnings")
        .map_or(0, |w| w.as_array().map_or(0, Vec::len));
    if warnings != decision.warnings.len() {
        return Err(fail("the reply lost warnings", body));
    }
    match &decision.outcome {
        AdmissionOutcome::Patch(_, patch) => {
            if reply_patch(&reply).as_ref() != Some(patch) {
                return Err(fail("the reply's patch is not the decision's", body));
            }
            check_patch(body, patch, counts)?;
        }
        _ => {
            if r.get("patch").is_some() {
                return Err(fail("a patch without a Patch decision", body));
            }
        }
    }
    Ok(reply)
}

/// The patch applies to the request's object; it never touches the template the user applied; and
/// the decision on the patched object (reinvocation: same review, same oldObject) changes nothing
/// more.
fn check_patch(
    body: &[u8],
    patch: &json_patch::Patch,
    counts: &Counts,
) -> Result<(), TestCaseError> {
    // The review as the API server holds it. `Value` refuses some JSON the lean reader skips over
    // (`1e400` in a field the decision ignores); no API server sends that, so such a case is only
    // counted.
    let Ok(mut review) = serde_json::from_slice::<Value>(body) else {
        counts.add("patch_unverifiable");
        return Ok(());
    };
    let Some(object_at) = locate(&review, &[("request", 2), ("object", 11)]) else {
        return Err(fail("a patch for a review without request.object", body));
    };
    let mut patched = review.pointer(&object_at).cloned().unwrap_or_default();
    json_patch::patch(&mut patched, &patch.0)
        .map_err(|e| fail(format!("the patch does not apply to the object: {e}"), body))?;
    let applied = review.pointer(&format!("{object_at}/spec/template"));
    if patched.pointer("/spec/template") != applied {
        return Err(fail(
            "the patch changed the pod template the user applied",
            body,
        ));
    }
    if let Some(object) = review.pointer_mut(&object_at) {
        *object = patched.clone();
    }
    let again = wire::parse(&serde_json::to_vec(&review).expect("json"))
        .map_err(|e| fail(format!("the patched review does not parse: {e}"), body))?;
    let second = admission::decide(&again, &Default::default());
    counts.add("reinvoked");
    match &second.outcome {
        AdmissionOutcome::Allow(_) => Ok(()),
        AdmissionOutcome::Deny(message) => Err(fail(
            format!("reinvocation denies what the first pass patched: {message}"),
            body,
        )),
        AdmissionOutcome::Patch(reason, patch2) => {
            let mut twice = patched.clone();
            json_patch::patch(&mut twice, &patch2.0)
                .map_err(|e| fail(format!("the reinvocation patch does not apply: {e}"), body))?;
            if twice == patched {
                Ok(())
            } else {
                Err(fail(
                    format!(
                        "reinvocation changed the object again ({reason:?}): {} then {}",
                        serde_json::to_string(&patch.0).unwrap_or_default(),
                        serde_json::to_string(&patch2.0).unwrap_or_default()
                    ),
                    body,
                ))
            }
        }
    }
}

/// The JSON pointer of a member: `(key, index)` per level, the key in an object, the index in an
/// array. serde reads a struct from an array too, field by field, so the envelope (apiVersion, kind,
/// request) and the request (…, object at 11, oldObject at 12) may come as arrays; harmless there,
/// since the object itself is still an object.
fn locate(root: &Value, path: &[(&str, usize)]) -> Option<String> {
    let mut at = String::new();
    let mut node = root;
    for (key, index) in path {
        (node, at) = match node {
            Value::Object(map) => (map.get(*key)?, format!("{at}/{}", escape(key))),
            Value::Array(items) => (items.get(*index)?, format!("{at}/{index}")),
            _ => return None,
        };
    }
    Some(at)
}

/// What `server::review` must answer: `Some((uid, apiVersion))` for an AdmissionReview reply, `None`
/// for a BadRequest. A readable review is answered under its own uid and version; an unreadable one
/// under the uid found in it (by `review::uid`, which reads nothing else), if any, in v1.
fn expected_reply(
    body: &[u8],
    parsed: &Result<ReviewRequest, wire::ReviewError>,
) -> Option<(String, String)> {
    match parsed {
        Ok(req) => Some((req.uid.clone(), reply_types(req).0.to_owned())),
        Err(wire::ReviewError::NoRequest) => None,
        Err(_) => wire::uid(body)
            .filter(|uid| !uid.is_empty())
            .map(|uid| (uid, V1.to_owned())),
    }
}

/// Cross-checks the uid an unreadable review is answered under with a reading of its own: when the
/// body is plain JSON with a non-empty `request.uid` string, that is the uid. (Only duplicate keys,
/// which `Value` takes the last of and serde's structs refuse, make the two differ; counted.)
fn check_uid_found(
    body: &[u8],
    expected: Option<&(String, String)>,
    counts: &Counts,
) -> Result<(), TestCaseError> {
    let plain = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        v.pointer("/request/uid")?
            .as_str()
            .filter(|uid| !uid.is_empty())
            .map(str::to_owned)
    });
    match (plain, expected) {
        (Some(plain), Some((uid, _))) if plain != *uid => Err(fail(
            format!("answered under uid {uid:?}, but request.uid is {plain:?}"),
            body,
        )),
        (Some(_), None) => {
            counts.add("uid_in_duplicate_keys");
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Target 2: `server::review`. `decided` is target 1's reply, when the body parsed.
fn check_review(
    body: &[u8],
    expected: Option<(String, String)>,
    decided: Option<&Value>,
    counts: &Counts,
) -> Result<Answer, TestCaseError> {
    let answer = server::review(body, &Default::default());
    match (&answer, expected) {
        (Ok((label, json)), Some((uid, version))) => {
            let reply = check_reply(json, &uid, (&version, "AdmissionReview"), body)?;
            match decided {
                Some(decided) => {
                    if &reply != decided {
                        return Err(fail("review() answers differently from the decision", body));
                    }
                }
                None => {
                    counts.add("invalid");
                    if *label != "invalid" || reply["response"]["allowed"] != false {
                        return Err(fail(
                            format!("an unreadable review must be denied as invalid, got {label}"),
                            body,
                        ));
                    }
                }
            }
        }
        (Err(BadRequest(message)), None) => {
            counts.add("bad_request");
            if message.is_empty() {
                return Err(fail("a BadRequest without a message", body));
            }
        }
        (Ok(_), None) => return Err(fail("review() answered a body without a request uid", body)),
        (Err(e), Some((uid, _))) => {
            return Err(fail(
                format!("review() refused a body with uid {uid:?}: {e:?}"),
                body,
            ));
        }
    }
    Ok(answer)
}

/// Targets 1 and 2 on one body, on the runtime under a timeout.
fn check_pure(body: &[u8], counts: &Arc<Counts>) -> Result<(), TestCaseError> {
    check_pure_within(body, counts, CASE_TIMEOUT).map(drop)
}

/// What `server::review` answers.
type Answer = Result<(&'static str, Vec<u8>), BadRequest>;

fn check_pure_within(
    body: &[u8],
    counts: &Arc<Counts>,
    limit: Duration,
) -> Result<Answer, TestCaseError> {
    watched(body, limit, || {
        let parsed = wire::parse(body);
        let decided = match &parsed {
            Ok(req) => Some(check_decision(body, req, counts)?),
            Err(_) => None,
        };
        let expected = expected_reply(body, &parsed);
        if parsed.is_err() {
            check_uid_found(body, expected.as_ref(), counts)?;
        }
        check_review(body, expected, decided.as_ref(), counts)
    })
}

/// Content types, and whether the handler must take the body as JSON. Mostly JSON, as the API
/// server sends; a few others, which get 415.
const CONTENT_TYPES: &[(Option<&str>, bool)] = &[
    (Some("application/json"), true),
    (Some("application/json; charset=utf-8"), true),
    (Some("APPLICATION/JSON"), true),
    (Some("text/plain"), false),
    (Some("application/jsonx"), false),
    (None, false),
];

/// The content type for a body: application/json 13 times in 16, the others once each.
fn content_type_for(body: &[u8]) -> (Option<&'static str>, bool) {
    let hash = body.iter().fold(0usize, |h, b| {
        h.wrapping_mul(31).wrapping_add(usize::from(*b))
    });
    CONTENT_TYPES
        .get((hash % 16).saturating_sub(10))
        .copied()
        .unwrap_or(CONTENT_TYPES[0])
}

async fn post(
    router: Router,
    body: Vec<u8>,
    content_type: Option<&str>,
) -> (StatusCode, Option<String>, Vec<u8>) {
    let mut request = Request::builder().method("POST").uri("/mutate");
    if let Some(ct) = content_type {
        request = request.header(header::CONTENT_TYPE, ct);
    }
    let request = request.body(Body::from(body)).expect("request");
    let response = router.oneshot(request).await.expect("infallible");
    let status = response.status();
    let ct = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    (status, ct, bytes)
}

fn router() -> Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER
        .get_or_init(|| server::router(AppState::default()))
        .clone()
}

/// Target 3: the HTTP handler. 200 with a well-formed review under the request's uid, 400 with a
/// text body when there is no uid to answer under, 415 for a body that does not say it is JSON;
/// never 5xx.
fn check_http(
    body: &[u8],
    content_type: (Option<&'static str>, bool),
    counts: &Counts,
    limit: Duration,
) -> Result<(), TestCaseError> {
    let (status, ct, reply) = watched(body, limit, || {
        runtime()
            .block_on(async {
                let call = post(router(), body.to_vec(), content_type.0);
                tokio::time::timeout(limit, call).await
            })
            .map_err(|_| {
                fail(
                    format!("the HTTP handler did not answer within {limit:?}"),
                    body,
                )
            })
    })?;
    counts.add(match status.as_u16() {
        200 => "http_200",
        400 => "http_400",
        413 => "http_413",
        415 => "http_415",
        _ => "http_other",
    });
    if status.is_server_error() {
        return Err(fail(format!("HTTP {status}: {}", show(&reply)), body));
    }
    let expected = if content_type.1 {
        Some(expected_reply(body, &wire::parse(body)))
    } else {
        None
    };
    match expected {
        None => {
            if status != StatusCode::UNSUPPORTED_MEDIA_TYPE || reply.is_empty() {
                return Err(fail(
                    format!("HTTP {status} for content type {:?}", content_type.0),
                    body,
                ));
            }
        }
        Some(Some((uid, version))) => {
            if status != StatusCode::OK || ct.as_deref() != Some("application/json") {
                return Err(fail(
                    format!("HTTP {status} ({ct:?}) for an answerable review"),
                    body,
                ));
            }
            check_reply(&reply, &uid, (&version, "AdmissionReview"), body)?;
        }
        Some(None) => {
            if status != StatusCode::BAD_REQUEST || reply.is_empty() {
                return Err(fail(
                    format!(
                        "HTTP {status} {} for a body without a request uid",
                        show(&reply)
                    ),
                    body,
                ));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The property tests
// ---------------------------------------------------------------------------------------------

#[test]
fn decision_and_review_survive_hostile_fledge_fields() {
    run(
        "decision_and_review_survive_hostile_fledge_fields",
        20_000,
        fledge_fields(),
        check_pure,
    );
}

#[test]
fn decision_and_review_survive_mangled_structure() {
    run(
        "decision_and_review_survive_mangled_structure",
        20_000,
        mangled_structure(),
        check_pure,
    );
}

#[test]
fn decision_and_review_survive_mangled_bytes_and_random_json() {
    run(
        "decision_and_review_survive_mangled_bytes_and_random_json",
        20_000,
        unstructured(),
        check_pure,
    );
}

#[test]
fn http_handler_answers_every_hostile_body() {
    fn check(body: &[u8], counts: &Arc<Counts>) -> Result<(), TestCaseError> {
        // The content type follows from the body, so that shrinking keeps it.
        check_http(body, content_type_for(body), counts, CASE_TIMEOUT)
    }
    run(
        "http_handler_answers_every_hostile_body",
        40_000,
        any_input(),
        check,
    );
}

// ---------------------------------------------------------------------------------------------
// Fixed regression cases
// ---------------------------------------------------------------------------------------------

fn seed_review(operation: &str, object: Value, old: Option<Value>) -> Vec<u8> {
    serde_json::to_vec(&review(operation, Some(object), old)).expect("json")
}

/// Runs a body through all three targets; returns `server::review`'s answer.
fn all_targets(body: &[u8]) -> Answer {
    let counts = Arc::new(Counts::default());
    let answer =
        check_pure_within(body, &counts, FIXED_CASE_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let json = (Some("application/json"), true);
    check_http(body, json, &counts, FIXED_CASE_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    answer
}

fn denial(answer: &Answer) -> String {
    let (label, json) = answer.as_ref().expect("an AdmissionReview reply");
    assert_eq!(*label, "deny");
    let v: Value = serde_json::from_slice(json).expect("json");
    v["response"]["status"]["message"]
        .as_str()
        .expect("message")
        .to_owned()
}

#[test]
fn nesting_ten_thousand_levels_deep_is_refused_gracefully() {
    for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
        let deep = format!("{}1{}", open.repeat(10_000), close.repeat(10_000));
        all_targets(deep.as_bytes()).expect_err("a bare nest is not a review");
        let body = seed_review("UPDATE", deployment("web:2"), Some(deployment("web:1")));
        let text = String::from_utf8(body).expect("utf8");
        // As the pod template: serde_json's recursion limit refuses it when the template is read,
        // and the review is denied saying so.
        let nested = text.replacen("\"template\":", &format!("\"template\":{deep},\"x\":"), 1);
        let message = denial(&all_targets(nested.as_bytes()));
        assert!(message.contains("recursion limit"), "{message}");
        // Where the decision does not look (status): skipped, and the review answered as usual.
        let skipped = text.replacen("\"status\":", &format!("\"status\":{deep},\"x\":"), 1);
        let (label, _) = all_targets(skipped.as_bytes()).expect("a review");
        assert_eq!(label, "patch");
        // Beside the request: skipped too.
        let beside = text.replacen("\"request\":", &format!("\"x\":{deep},\"request\":"), 1);
        let (label, _) = all_targets(beside.as_bytes()).expect("a review");
        assert_eq!(label, "patch");
    }
    // YAML nesting in the steps annotation, past serde_yaml_ng's recursion limit (128).
    for steps in [
        format!("{}{}", "[".repeat(200), "]".repeat(200)),
        "- ".repeat(10_000) + "5",
        "{a: ".repeat(200) + &"}".repeat(200),
    ] {
        let body = seed_review(
            "CREATE",
            with_annotation(deployment("web:1"), ANNOTATION_STEPS, &steps),
            None,
        );
        let message = denial(&all_targets(&body));
        assert!(message.starts_with("fledge.dev/steps"), "{message}");
    }
}

#[test]
fn objects_in_the_shape_of_lists_are_not_patched_blindly() {
    // serde reads a struct from a JSON array too (field by field, in order). A `spec` given as a
    // list must not be taken for one whose template is the list's first item: the patch
    // (`replace /spec/template`) could not apply to it.
    let old = deployment("web:1");
    let mut new = deployment("web:2");
    new["spec"] = json!([new["spec"].clone()]);
    let answer = all_targets(&seed_review("UPDATE", new, Some(old.clone())));
    assert!(answer.is_ok(), "{answer:?}");
    // metadata as a list read in field order (name, namespace, uid, labels, annotations): the patch's
    // `add /metadata/annotations/…` could not apply either.
    let mut new = deployment("web:2");
    let meta = new["metadata"].clone();
    new["metadata"] = json!([
        meta["name"],
        meta["namespace"],
        meta["uid"],
        meta["labels"],
        meta["annotations"]
    ]);
    let answer = all_targets(&seed_review("UPDATE", new, Some(old)));
    assert!(answer.is_ok(), "{answer:?}");
}

/// Runs `work` on a thread of its own and fails if it has not finished within `budget` (the thread is
/// left to finish on its own: it cannot be stopped).
fn within<T: Send + 'static>(
    budget: Duration,
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    let result = rx
        .recv_timeout(budget)
        .unwrap_or_else(|_| panic!("{what}: no answer within {budget:?}"));
    eprintln!("hostile: {what}: answered in {:?}", started.elapsed());
    result
}

#[test]
fn deeply_nested_yaml_steps_are_answered_quickly() {
    // 250 KB of nested flow collections in the steps annotation: under the API server's 256 KiB
    // annotation budget (which it checks only after the mutating webhooks anyway). The YAML scanner
    // reads all of it before serde_yaml_ng's recursion limit (128) can refuse it, in time quadratic
    // in the depth: the answer must not wait for that.
    for (open, close) in [("{a: ", "}"), ("[", "]")] {
        let depth = 250_000 / (open.len() + close.len());
        let steps = open.repeat(depth) + &close.repeat(depth);
        let body = seed_review(
            "CREATE",
            with_annotation(deployment("web:1"), ANNOTATION_STEPS, &steps),
            None,
        );
        let what = format!("steps of {depth} nested {open:?} ({} bytes)", steps.len());
        let answer = within(Duration::from_secs(2), &what, move || {
            server::review(&body, &Default::default())
        });
        assert!(denial(&answer).starts_with("fledge.dev/steps"));
    }
}

#[test]
fn a_body_of_2_9_mib_is_answered_and_one_over_the_limit_is_refused() {
    // Two templates of ~1.45 MiB each: readable, but too big to record as the canary.
    let blob = |c: &str| c.repeat(1_450 * 1024);
    let mut old = deployment("web:1");
    old["spec"]["template"]["metadata"]["annotations"]["blob"] = json!(blob("a"));
    let mut new = deployment("web:2");
    new["spec"]["template"]["metadata"]["annotations"]["blob"] = json!(blob("b"));
    let body = seed_review("UPDATE", new, Some(old));
    assert!(
        body.len() > 2_900_000 && body.len() < MAX_BODY_BYTES,
        "{}",
        body.len()
    );
    // The template is held where it is (`spec.template`), not copied into an annotation: its
    // size is the API server's business, and the answer is the hold.
    let answer = all_targets(&body);
    assert_eq!(answer.as_ref().map(|(label, _)| *label).ok(), Some("patch"));

    let mut over = body.clone();
    over.resize(MAX_BODY_BYTES + 1, b' ');
    let (status, _, reply) = runtime().block_on(post(router(), over, Some("application/json")));
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(!reply.is_empty());
}

#[test]
fn a_steps_annotation_of_100k_items_is_answered() {
    // Over the size limit: refused before the YAML parser runs, whatever it holds.
    let huge = "- setWeight: 1\n".repeat(100_000);
    let body = seed_review(
        "CREATE",
        with_annotation(deployment("web:1"), ANNOTATION_STEPS, &huge),
        None,
    );
    let message = denial(&all_targets(&body));
    assert!(message.contains("is too long; at most"), "{message}");
    // A long list within the limit is read.
    let long = "- setWeight: 1\n".repeat(1_000);
    let body = seed_review(
        "CREATE",
        with_annotation(deployment("web:1"), ANNOTATION_STEPS, &long),
        None,
    );
    let (label, _) = all_targets(&body).expect("a review");
    assert_eq!(label, "allow");
    // Every item wrong: the message lists the first problems and counts the rest.
    let invalid = "- setWeight: 150\n".repeat(900);
    let body = seed_review(
        "CREATE",
        with_annotation(deployment("web:1"), ANNOTATION_STEPS, &invalid),
        None,
    );
    let message = denial(&all_targets(&body));
    assert!(message.ends_with("; and 880 more problems"), "{message}");
    assert!(message.len() < 4_096, "{}", message.len());
}

#[test]
fn yaml_alias_bombs_are_refused_not_expanded() {
    for (levels, width) in [(9, 9), (12, 10), (30, 2)] {
        let body = seed_review(
            "CREATE",
            with_annotation(
                deployment("web:1"),
                ANNOTATION_STEPS,
                &alias_bomb(levels, width),
            ),
            None,
        );
        let message = denial(&all_targets(&body));
        assert!(message.starts_with("fledge.dev/steps"), "{message}");
    }
}

#[test]
fn weights_over_655_percent_are_denied_not_panicked_on() {
    // 656 * 100 basis points no longer fits the u16 the weight is parsed into.
    for weight in ["656", "700", "999", "999.99", "\"700\""] {
        let body = seed_review(
            "CREATE",
            with_annotation(
                deployment("web:1"),
                ANNOTATION_STEPS,
                &format!("- setWeight: {weight}"),
            ),
            None,
        );
        let message = denial(&all_targets(&body));
        assert!(message.contains("is not between 0 and 100"), "{message}");
    }
    // The same parse reads the weight in fledge's state annotation.
    let state = json!({"phase": "Paused", "hash": "x", "weight": "700"}).to_string();
    let body = seed_review(
        "UPDATE",
        deployment("web:2"),
        Some(with_annotation(
            deployment("web:1"),
            ANNOTATION_STATE,
            &state,
        )),
    );
    let message = denial(&all_targets(&body));
    assert!(
        message.starts_with("fledge.dev/state: cannot read"),
        "{message}"
    );
}

#[test]
fn unusual_numbers_and_escapes_are_answered() {
    let base = String::from_utf8(seed_review(
        "UPDATE",
        deployment("web:2"),
        Some(deployment("web:1")),
    ))
    .expect("utf8");
    for token in RAW_TOKENS {
        for (from, to) in [
            ("\"replicas\":4", format!("\"replicas\":{token}")),
            (
                "\"dryRun\":false",
                format!("\"dryRun\":false,\"extra\":{token}"),
            ),
            ("\"name\":\"web\"", format!("\"name\":{token}")),
        ] {
            let body = base.replacen(from, &to, 1);
            let _ = all_targets(body.as_bytes());
        }
    }
}
