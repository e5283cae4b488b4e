//! The command line end to end: `fledge status --watch` following rollouts that fledge's real
//! webhook and controller run against the API server stand-in, and the binary as a kubectl plugin
//! through the real kubectl.
mod support;

use std::path::Path;
use std::process::{ExitStatus, Stdio};

use serde_json::Value;
use support::apiserver::ApiServer;
use support::e2e::*;
use support::kubectl::{kubectl, plugin_dir};
use tokio::io::AsyncReadExt;

use fledge::core::rollout::Phase;

const FLEDGE: &str = env!("CARGO_BIN_EXE_fledge");
const PAUSE_UNTIL_PROMOTED: &str = "- setWeight: 20\n- pause: {}\n";

/// A command running against the stand-in, its stdout read as it comes.
struct Running {
    child: tokio::process::Child,
    stdout: tokio::process::ChildStdout,
    output: Vec<u8>,
    /// Kept open: a program that reads its input (`script`) must not see it end.
    _stdin: tokio::process::ChildStdin,
}

impl Running {
    fn start(api: &ApiServer, program: &str, args: &[&str]) -> Running {
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .env("KUBECONFIG", kubeconfig(api))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program}: {e}"));
        Running {
            stdout: child.stdout.take().unwrap(),
            _stdin: child.stdin.take().unwrap(),
            child,
            output: Vec::new(),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }

    /// Reads until the output so far satisfies `wanted`.
    async fn until(&mut self, what: &str, wanted: impl Fn(&str) -> bool) {
        let read = async {
            let mut buf = [0; 4096];
            while !wanted(&self.text()) {
                let n = self.stdout.read(&mut buf).await.unwrap();
                assert!(n > 0, "output ended before {what}:\n{}", self.text());
                self.output.extend_from_slice(&buf[..n]);
            }
        };
        if tokio::time::timeout(WAIT, read).await.is_err() {
            panic!("no {what} within {WAIT:?}:\n{}", self.text());
        }
    }

    /// Reads to the end and waits for the exit: the status, all of stdout, and stderr.
    async fn end(mut self) -> (ExitStatus, String, String) {
        let done = async {
            self.stdout.read_to_end(&mut self.output).await.unwrap();
            self.child.wait_with_output().await.unwrap()
        };
        let Ok(out) = tokio::time::timeout(WAIT, done).await else {
            panic!("still running after {WAIT:?}");
        };
        let stdout = String::from_utf8_lossy(&self.output).into_owned();
        (
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The columns of a `fledge status` line: name, phase, and the weight without its `%`.
fn columns(line: &str) -> (&str, &str, &str) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let weight = words
        .iter()
        .position(|w| *w == "weight")
        .map_or("", |i| words[i + 1].trim_end_matches('%'));
    (words[0], words[1], weight)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_a_canary_from_apply_to_success_and_exits_0() {
    let mut c = stable_v1(PAUSE_UNTIL_PROMOTED).await;
    // With the controller stopped, the watch starts where a user's may right after `kubectl
    // apply`: the canary is pending, not started, and there is something to wait for.
    c.controller_task.abort();
    apply(&c.api, deployment("web:2", PAUSE_UNTIL_PROMOTED)).await;
    let mut watch = Running::start(&c.api, FLEDGE, &["status", "web", "--watch"]);
    watch
        .until("the pending canary", |out| {
            out.contains("is waiting for the controller")
        })
        .await;
    c.controller_task = start_controller(&c.api, &c.metrics);
    watch
        .until("the pause at 20%", |out| {
            out.lines().any(|l| columns(l).1 == "Paused")
        })
        .await;
    fledge(&c.api, &["promote", "web"]).await;
    let (status, out, stderr) = watch.end().await;
    assert!(status.success(), "{status}: {out}{stderr}");
    assert!(!out.contains('\x1b'), "a pipe gets no escapes: {out:?}");
    let lines: Vec<String> = out.lines().map(str::to_owned).collect();
    let phases: Vec<&str> = lines.iter().map(|l| columns(l).1).collect();
    assert_eq!(phases.first(), Some(&"Idle"), "{out}");
    assert_eq!(phases.last(), Some(&"Succeeded"), "{out}");
    let paused = lines.iter().find(|l| columns(l).1 == "Paused").unwrap();
    assert!(
        paused.contains(
            "step 2/2  weight     20% [##--------]  step 2/2: paused until `fledge promote web`"
        ),
        "{paused}"
    );
    let mut weights: Vec<&str> = lines.iter().map(|l| columns(l).2).collect();
    weights.dedup();
    assert_eq!(weights, ["0", "20", "100", "0"], "{out}");
    let mut deduped = lines.clone();
    deduped.dedup();
    assert_eq!(deduped, lines, "a frame only when something changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_exits_1_when_the_canary_is_aborted() {
    let c = stable_v1(PAUSE_UNTIL_PROMOTED).await;
    apply(&c.api, deployment("web:2", PAUSE_UNTIL_PROMOTED)).await;
    wait_phase(&c.api, Phase::Paused).await;
    let mut watch = Running::start(&c.api, FLEDGE, &["status", "web", "-n", NS, "-w"]);
    watch.until("the pause", |out| out.contains("Paused")).await;
    fledge(&c.api, &["abort", "web"]).await;
    let (status, out, stderr) = watch.end().await;
    assert_eq!(status.code(), Some(1), "{out}{stderr}");
    assert_eq!(
        out.lines().last().map(|l| columns(l).1),
        Some("Aborted"),
        "{out}"
    );
    assert!(
        stderr.contains("Error: web was aborted: aborted by `fledge abort` at step 2/2"),
        "{stderr}"
    );
    // Watching it again ends at once: it stays aborted.
    let again = Running::start(&c.api, FLEDGE, &["status", "web", "-w"]);
    let (status, _, stderr) = again.end().await;
    assert_eq!(status.code(), Some(1), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_json_is_one_object_per_change_and_a_countdown_is_not_a_change() {
    let steps = "- setWeight: 20\n- pause: {duration: 3s}\n";
    let c = stable_v1(steps).await;
    apply(&c.api, deployment("web:2", steps)).await;
    let watch = Running::start(&c.api, FLEDGE, &["status", "web", "-w", "-o", "json"]);
    let (status, out, stderr) = watch.end().await;
    assert!(status.success(), "{status}: {out}{stderr}");
    let objects: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for o in &objects {
        for key in [
            "name",
            "namespace",
            "phase",
            "step",
            "steps",
            "weight",
            "message",
        ] {
            assert!(o.get(key).is_some(), "{key} in {o}");
        }
    }
    let last = objects.last().unwrap();
    assert_eq!(
        (last["name"].as_str(), last["phase"].as_str()),
        (Some("web"), Some("Succeeded"))
    );
    let paused = objects.iter().find(|o| o["phase"] == "Paused").unwrap();
    assert!(paused["pauseLeft"].is_string(), "{paused}");
    let steady: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut o = o.clone();
            o.as_object_mut().unwrap().remove("pauseLeft");
            o
        })
        .collect();
    let mut deduped = steady.clone();
    deduped.dedup();
    assert_eq!(deduped, steady, "no object for a countdown tick:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_without_a_name_shows_every_opted_in_deployment_until_ctrl_c() {
    let c = stable_v1(PAUSE_UNTIL_PROMOTED).await;
    let mut watch = Running::start(&c.api, FLEDGE, &["status", "--watch"]);
    watch
        .until("web's line", |out| {
            out.lines().any(|l| columns(l) == ("web", "Idle", "0"))
        })
        .await;
    apply(&c.api, deployment("web:2", PAUSE_UNTIL_PROMOTED)).await;
    watch
        .until("the pause", |out| {
            out.lines().any(|l| columns(l) == ("web", "Paused", "20"))
        })
        .await;
    let pid = watch.child.id().unwrap();
    let kill = std::process::Command::new("bash")
        .args(["-c", &format!("kill -INT {pid}")])
        .status()
        .unwrap();
    assert!(kill.success());
    let (status, out, stderr) = watch.end().await;
    assert!(
        status.success(),
        "Ctrl-C ends a watch of everything cleanly: {status}\n{out}{stderr}"
    );
    assert_eq!(stderr, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_ends_at_once_when_there_is_nothing_to_wait_for_or_nothing_found() {
    let c = stable_v1(PAUSE_UNTIL_PROMOTED).await;
    let out = fledge(&c.api, &["status", "web", "-w"]).await;
    assert_eq!(columns(&out), ("web", "Idle", "0"));
    assert!(out.trim_end().ends_with("no canary"), "{out}");
    let (status, _, stderr) = Running::start(&c.api, FLEDGE, &["status", "nope", "-w"])
        .end()
        .await;
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("Deployment shop/nope not found"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_on_a_terminal_redraws_the_frame_in_place() {
    let c = stable_v1(PAUSE_UNTIL_PROMOTED).await;
    apply(&c.api, deployment("web:2", PAUSE_UNTIL_PROMOTED)).await;
    wait_phase(&c.api, Phase::Paused).await;
    // `script` (util-linux) runs the watch on a pseudo-terminal, as a user's shell would.
    let command = format!("{FLEDGE} status web --watch");
    let mut watch = Running::start(&c.api, "script", &["-qefc", &command, "/dev/null"]);
    watch
        .until("the first frame", |out| {
            out.contains("\x1b[?7l") && out.contains("Paused")
        })
        .await;
    fledge(&c.api, &["promote", "web"]).await;
    let (status, out, stderr) = watch.end().await;
    assert!(status.success(), "{status}: {out:?}{stderr}");
    assert!(
        out.starts_with("\x1b[?7l"),
        "the first frame clears nothing: {out:?}"
    );
    // Every later frame moves up over the one-line frame before it and clears it.
    let frames: Vec<&str> = out.split("\x1b[1A\x1b[J").collect();
    assert!(frames.len() >= 2, "{out:?}");
    assert!(frames.last().unwrap().contains("Succeeded"), "{out:?}");
}

/// `kubectl ARGS` with the plugin first on `PATH`; it must succeed. Returns its stdout.
async fn kubectl_with_plugin(api: &ApiServer, plugins: &Path, args: &[&str]) -> String {
    let path = std::env::join_paths(std::iter::once(plugins.to_owned()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    let mut command = std::process::Command::new(kubectl());
    command.args(args).env("PATH", path);
    let output = run_command(api, command).await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "kubectl {args:?}: {}\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_runs_fledge_as_its_plugin() {
    let kubectl = kubectl();
    let c = stable_v1(PAUSE_UNTIL_PROMOTED).await;
    let plugins = plugin_dir(&c.api);
    apply(&c.api, deployment("web:2", PAUSE_UNTIL_PROMOTED)).await;
    wait_phase(&c.api, Phase::Paused).await;

    let listed = kubectl_with_plugin(&c.api, &plugins, &["plugin", "list"]).await;
    assert!(listed.contains("kubectl-fledge"), "{kubectl:?}: {listed}");
    let help = kubectl_with_plugin(&c.api, &plugins, &["fledge", "--help"]).await;
    assert!(help.contains("Usage: kubectl fledge"), "{help}");

    let status =
        kubectl_with_plugin(&c.api, &plugins, &["fledge", "status", "web", "-n", NS]).await;
    assert_eq!(columns(&status), ("web", "Paused", "20"), "{status}");
    assert!(status.contains("step 2/2"), "{status}");
    let json =
        kubectl_with_plugin(&c.api, &plugins, &["fledge", "status", "web", "-o", "json"]).await;
    let json: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        (json["phase"].as_str(), json["weight"].as_str()),
        (Some("Paused"), Some("20"))
    );

    let promoted = kubectl_with_plugin(&c.api, &plugins, &["fledge", "promote", "web"]).await;
    assert!(promoted.starts_with("web: "), "{promoted}");
    let done = wait_phase(&c.api, Phase::Succeeded).await;
    assert_eq!(image(&done), "web:2");
    let watched =
        kubectl_with_plugin(&c.api, &plugins, &["fledge", "status", "web", "--watch"]).await;
    assert_eq!(columns(&watched).1, "Succeeded", "{watched}");
}

/// `web` as a user's manifest file: the root Service and the opted-in Deployment running `image`.
fn manifest(image: &str) -> String {
    let docs = [root_service(), deployment(image, PAUSE_UNTIL_PROMOTED)];
    docs.iter()
        .map(|d| serde_yaml_ng::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("---\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_rollout_status_waits_for_the_canary_and_kubectl_diff_shows_no_drift() {
    let c = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let (v1, v2) = (dir.path().join("v1.yaml"), dir.path().join("v2.yaml"));
    std::fs::write(&v1, manifest("web:1")).unwrap();
    std::fs::write(&v2, manifest("web:2")).unwrap();
    let kubectl_path = kubectl();
    let kubectl_bin = kubectl_path.to_str().unwrap();
    let run = |args: &[&str]| Running::start(&c.api, kubectl_bin, args);
    let (status, out, err) = run(&["apply", "-f", v1.to_str().unwrap()]).end().await;
    assert!(status.success(), "{out}{err}");
    let (status, ..) = run(&["rollout", "status", "deployment/web", "--timeout=20s"])
        .end()
        .await;
    assert!(status.success());

    let (status, out, err) = run(&["apply", "-f", v2.to_str().unwrap()]).end().await;
    assert!(status.success(), "{out}{err}");
    assert_held(&c.api, "web:2", "web:1");
    // What Git holds is what the cluster shows: no drift for a GitOps tool.
    let (status, out, err) = run(&["diff", "-f", v2.to_str().unwrap()]).end().await;
    assert!(
        status.success(),
        "kubectl diff after the apply:\n{out}{err}"
    );
    assert!(out.is_empty(), "{out}");

    // `kubectl rollout status` waits through the canary ...
    let waiting = run(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    wait_phase(&c.api, Phase::Paused).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (status, ..) = run(&["rollout", "status", "deployment/web", "--timeout=1s"])
        .end()
        .await;
    assert!(
        !status.success(),
        "rollout status ended while the canary runs"
    );
    fledge(&c.api, &["promote", "web"]).await;
    // ... and returns 0 only once the promotion rolled the new template out.
    let (status, out, err) = waiting.end().await;
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("successfully rolled out"), "{out}");
    let web = c.api.get(DEPLOYMENTS, NS, "web").unwrap();
    assert!(matches!(
        phase(Some(&web)),
        Some(Phase::Promoting | Phase::Succeeded)
    ));
    assert_ne!(web["spec"]["paused"], true);
    assert_eq!(running_images(&c.api), ["web:2"]);
    wait_phase(&c.api, Phase::Succeeded).await;
}

/// The runnable examples plan as README says, and the analysis example shows where its checks run.
#[test]
fn the_examples_plan() {
    let plan = |from: &str, to: &str| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_fledge"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["plan", "--from", from, "--to", to])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        text
    };
    assert!(plan("examples/web-v1.yaml", "examples/web-v2.yaml").contains("setWeight 50%"));
    let analysed = plan("examples/web-v2.yaml", "examples/web-v3-analysis.yaml");
    assert!(analysed.contains("analysis smoke"), "{analysed}");
    assert!(
        analysed.contains("error-rate") && analysed.contains("every 30s until promotion"),
        "{analysed}"
    );
}

/// `fledge plan --policy`: a plain Deployment in an opted-in namespace is held with its policy's
/// steps, and a Deployment whose own steps break the policy's guard-rails is denied.
#[test]
fn the_policy_example_plans() {
    let plan = |from: &str, to: &str| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_fledge"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "plan",
                "--from",
                from,
                "--to",
                to,
                "--policy",
                "examples/policy-shop.yaml",
            ])
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    let (held, text) = plan("examples/shop-api-v1.yaml", "examples/shop-api-v2.yaml");
    assert!(held, "{text}");
    for line in [
        "Decision: allow with patch: new pod template",
        "Policy: RolloutPolicy shop/defaults (priority 10)",
        "  steps: the policy's",
        "  checks: error-rate (the policy's)",
        "  promotion window: Mon,Tue,Wed,Thu,Fri 09:00-16:00 Europe/Berlin",
        "setWeight 25%",
    ] {
        assert!(text.contains(line), "{line:?} in\n{text}");
    }
    assert!(!text.contains("cannot be computed"), "{text}");
    let (allowed, text) = plan("examples/web-v1.yaml", "examples/web-v2.yaml");
    assert!(!allowed, "{text}");
    assert!(
        text.contains("fledge.dev/steps[2].setWeight: a jump from 5 to 50 exceeds maxStepWeight 25 of RolloutPolicy shop/defaults"),
        "{text}"
    );
}
