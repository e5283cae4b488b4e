//! Hostile policies: generated `RolloutPolicy` specs (steps, checks, routers, guard-rails with any
//! integers, windows with any days, times and zone names) and Deployment annotations, through
//! [`PolicySnapshot::select`], [`merge::policy_problems`] and [`resolve`], and windows at any
//! instant. None may panic; every problem names its place (`spec.…`, `fledge.dev/…`, or the policy
//! by name); a window that is closed always opens later, and is open then.
//!
//! Cases: 20,000 policies + 20,000 window instants; `HOSTILE_SCALE=N` multiplies them. The seed is
//! fixed so that CI is repeatable.

use std::collections::BTreeMap;

use fledge::core::policy::window::WindowState;
use fledge::core::policy::{
    GuardRails, Policy, PolicyId, PolicyKind, PolicyRules, PolicySnapshot, PromotionWindow,
    PromotionWindows, RouterName, Weekday, merge, resolve,
};
use k8s_openapi::jiff::Timestamp;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Value, json};

fn scale() -> u32 {
    std::env::var("HOSTILE_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new_with_rng(
        Config {
            cases: cases * scale(),
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    )
}

fn step() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-50i64..200).prop_map(|w| json!({"setWeight": w})),
        (0.0f64..120.0).prop_map(|w| json!({"setWeight": w})),
        select(vec!["1m", "30s", "0s", "soon", "", "1h2m3s", "-1m"])
            .prop_map(|d| json!({"pause": {"duration": d}})),
        Just(json!({"pause": {}})),
        select(vec!["error-rate", "smoke", "", "nope"])
            .prop_map(|c| json!({"analysis": {"checks": [c]}})),
        Just(
            json!({"setHeaderRoute": {"name": "beta", "match": [{"headerName": "x", "headerValue": {"exact": "1"}}]}})
        ),
        Just(json!({"setMirrorRoute": {"name": "shadow", "percentage": 20}})),
        Just(json!({"setWeight": 5, "pause": {}})),
        Just(json!("setWeight")),
        Just(json!([1, 2])),
        Just(json!({})),
    ]
}

fn check() -> impl Strategy<Value = Value> {
    (
        select(vec!["error-rate", "smoke", "", "Bad Name"]),
        select(vec![json!("1m"), json!("0s"), json!(-1), json!(null)]),
        select(vec!["result < 0.01", "result <", "", "results.all(x, x > 0)"]),
        select(vec![
            json!({"web": {"url": "http://x/{{namespace}}"}}),
            json!({"prometheus": {"query": "up"}}),
            json!({"web": {"url": "http://x/{{nope}}"}}),
            json!({"job": {"spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "a", "image": "b"}]}}}}}),
            json!({}),
        ]),
    )
        .prop_map(|(name, interval, condition, provider)| {
            let mut c = json!({"name": name, "interval": interval, "successCondition": condition});
            for (k, v) in provider.as_object().into_iter().flatten() {
                c[k] = v.clone();
            }
            c
        })
}

fn window() -> impl Strategy<Value = PromotionWindow> {
    (
        vec(
            select(vec![
                Weekday::Mon,
                Weekday::Tue,
                Weekday::Wed,
                Weekday::Thu,
                Weekday::Fri,
                Weekday::Sat,
                Weekday::Sun,
            ]),
            0..4,
        ),
        select(vec![
            "00:00", "09:00", "23:59", "24:00", "9:00", "02:30", "25:00", "",
        ]),
        select(vec![
            "00:00", "16:00", "24:00", "02:45", "03:00", "aa:bb", "09:00",
        ]),
        select(vec![
            "UTC",
            "Europe/Berlin",
            "America/New_York",
            "Australia/Lord_Howe",
            "Asia/Kathmandu",
            "Mars/Olympus",
            "",
            "../../etc/passwd",
        ]),
    )
        .prop_map(|(days, start, end, zone)| PromotionWindow {
            days,
            start: start.into(),
            end: end.into(),
            time_zone: zone.into(),
        })
}

fn rules() -> impl Strategy<Value = PolicyRules> {
    (
        proptest::option::of(vec(step(), 0..6)),
        proptest::option::of(vec(check(), 0..3)),
        proptest::option::of(select(vec![
            RouterName::Smi,
            RouterName::GatewayApi,
            RouterName::PodRatio,
        ])),
        proptest::option::of(vec(select(vec!["public", "", "a/b"]), 0..3)),
        (
            proptest::option::of(any::<i32>()),
            proptest::option::of(select(vec!["1m", "30s", "soon", "", "99999999999h"])),
            proptest::option::of(vec(select(vec!["error-rate", "smoke", "x"]), 0..3)),
        ),
        proptest::option::of(vec(window(), 0..3)),
        any::<i32>(),
    )
        .prop_map(
            |(steps, analysis, router, routes, (max, min_pause, required), windows, priority)| {
                PolicyRules {
                    selector: None,
                    priority,
                    steps,
                    analysis,
                    router,
                    http_routes: routes.map(|r| r.into_iter().map(str::to_owned).collect()),
                    progress_deadline_seconds: Some(priority),
                    guard_rails: Some(GuardRails {
                        max_step_weight: max,
                        min_pause: min_pause.map(str::to_owned),
                        required_checks: required
                            .map(|r| r.into_iter().map(str::to_owned).collect()),
                        allowed_routers: router.map(|r| vec![r]),
                    }),
                    promotion_windows: windows,
                }
            },
        )
}

fn annotations() -> impl Strategy<Value = BTreeMap<String, String>> {
    (
        proptest::option::of(select(vec![
            "- setWeight: 5\n- pause: {duration: 1m}\n- setWeight: 20\n",
            "- setWeight: 90\n",
            "[{setWeight: 5}, {analysis: {checks: [error-rate]}}]",
            "- nope",
            "",
        ])),
        proptest::option::of(select(vec![
            "- name: error-rate\n  interval: 1m\n  successCondition: 'true'\n  web: {url: http://x}\n",
            "- name: smoke\n  web: {url: http://x}\n  successCondition: result == 1\n",
            "{",
        ])),
        proptest::option::of(select(vec!["smi", "gateway-api", "pod-ratio", "istio"])),
        proptest::option::of(select(vec!["defaults", "other", ""])),
    )
        .prop_map(|(steps, analysis, router, policy)| {
            let mut a = BTreeMap::new();
            let mut put = |k: &str, v: Option<&str>| {
                if let Some(v) = v {
                    a.insert(k.to_owned(), v.to_owned());
                }
            };
            put("fledge.dev/steps", steps);
            put("fledge.dev/analysis", analysis);
            put("fledge.dev/router", router);
            put("fledge.dev/policy", policy);
            a
        })
}

fn policy(name: &str, rules: PolicyRules) -> Policy {
    Policy {
        id: PolicyId {
            kind: PolicyKind::RolloutPolicy,
            namespace: Some("shop".into()),
            name: name.into(),
        },
        generation: 1,
        namespace_selector: None,
        rules,
    }
}

/// A problem names a place a user can find.
fn placed(problem: &str) -> bool {
    ["spec.", "fledge.dev/", "RolloutPolicy shop/", "metadata."]
        .iter()
        .any(|p| problem.starts_with(p))
}

#[test]
fn hostile_policies_never_panic_and_every_problem_has_its_place() {
    runner(20_000)
        .run(
            &(rules(), rules(), annotations()),
            |(first, second, annotations)| {
                let snapshot = PolicySnapshot {
                    policies: vec![policy("defaults", first), policy("other", second)],
                    namespaces: BTreeMap::new(),
                };
                for p in &snapshot.policies {
                    for problem in merge::policy_problems(p) {
                        prop_assert!(placed(&problem), "{problem}");
                    }
                }
                let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
                match snapshot.select("shop", &labels, &annotations) {
                    Err(e) => prop_assert!(e.to_string().contains("Policy"), "{e}"),
                    Ok(chosen) => {
                        if let Err(e) = resolve("web", &annotations, chosen) {
                            for problem in &e.problems {
                                prop_assert!(placed(problem), "{problem}");
                            }
                        }
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn a_closed_window_opens_later_and_is_open_then() {
    runner(20_000)
        .run(
            &(vec(window(), 1..3), -4_000_000_000i64..8_000_000_000),
            |(windows, second)| {
                let Ok(read) = PromotionWindows::read(&windows, "spec.promotionWindows") else {
                    return Ok(());
                };
                let now = Timestamp::from_second(second).unwrap();
                if let WindowState::OpensAt(at) = read.at(now) {
                    prop_assert!(at.timestamp() > now);
                    prop_assert_eq!(read.at(at.timestamp()), WindowState::Open, "{}", at);
                }
                Ok(())
            },
        )
        .unwrap();
}
