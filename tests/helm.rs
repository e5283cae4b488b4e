//! The Helm chart `charts/fledge`, rendered by the real `helm` (`.ci/install-helm`): lint, every
//! certificate mode and the main value combinations, the schema, every rendered object applied to
//! the API server stand-in with `fieldValidation=Strict`, README's install commands followed word
//! for word, and least privilege: the chart's ClusterRole and Role grant exactly the requests that
//! `fledge serve`, run as the chart runs it, makes in a representative set of scenarios.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use fledge::core::rollout::Phase;
use support::apiserver::{ApiRequest, ApiServer, ApiServerConfig, UserInfo};
use support::chart::{self, CHART, RELEASE_NS, helm, only, template};
use support::e2e::{self, DEPLOYMENTS, NS, WAIT};
use support::kubectl::{kubectl, plugin_dir};

const CERT_MANAGER_CRDS: &str = include_str!("support/crds/cert-manager-minimal.yaml");
const SERVICE_MONITOR_CRD: &str = include_str!("support/crds/servicemonitor-minimal.yaml");

/// base64 of a PEM, for the existing-Secret mode (the chart only passes it on).
const SOME_CA_BUNDLE: &str = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==";

/// The value combinations every test renders: each certificate mode, and the other main values.
fn combinations() -> Vec<Vec<String>> {
    let set = |pairs: &[&str]| -> Vec<String> {
        pairs
            .iter()
            .flat_map(|p| ["--set".to_owned(), (*p).to_owned()])
            .collect()
    };
    vec![
        set(&[]),
        set(&["certificates.mode=certManager"]),
        set(&[
            "certificates.mode=certManager",
            "certificates.certManager.issuerRef.name=corp-ca",
            "certificates.certManager.issuerRef.kind=ClusterIssuer",
        ]),
        set(&[
            "certificates.mode=secret",
            "certificates.secret.name=corp-tls",
            &format!("certificates.secret.caBundle={SOME_CA_BUNDLE}"),
        ]),
        set(&[
            "serviceMonitor.enabled=true",
            "webhook.failurePolicy=Ignore",
            "webhook.namespaceOptIn=false",
            "podDisruptionBudget.enabled=false",
            "controller.namespace=shop",
            "controller.splitApi=v1alpha4",
            "replicaCount=3",
            "image.tag=0.2.0",
        ]),
    ]
}

fn render(args: &[String]) -> Vec<Value> {
    template(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn kinds(objects: &[Value]) -> Vec<String> {
    let mut kinds: Vec<String> = objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    kinds.sort();
    kinds
}

#[test]
fn helm_lint_strict_passes_for_every_combination() {
    for args in combinations() {
        let mut all = vec!["lint", "--strict", CHART, "-n", RELEASE_NS];
        all.extend(args.iter().map(String::as_str));
        let out = helm(&all);
        assert!(
            out.status.success(),
            "helm {all:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The rendered webhook entries.
fn webhooks(objects: &[Value]) -> &Vec<Value> {
    only(objects, "MutatingWebhookConfiguration", None)["webhooks"]
        .as_array()
        .unwrap()
}

#[test]
fn the_webhook_configuration_is_the_one_the_issue_asks_for() {
    let objects = chart::default_render();
    only(objects, "MutatingWebhookConfiguration", Some("fledge"));
    let hooks = webhooks(objects);
    let names: Vec<&str> = hooks.iter().map(|h| h["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "deployments.fledge.dev",
            "namespaces.deployments.fledge.dev"
        ]
    );
    let excluded = serde_json::json!({
        "key": "kubernetes.io/metadata.name",
        "operator": "NotIn",
        "values": [RELEASE_NS, "kube-system"],
    });
    // A Deployment's own label, in any namespace but fledge's and kube-system.
    let labelled = &hooks[0];
    assert_eq!(
        labelled["objectSelector"],
        serde_json::json!({"matchLabels": {"fledge.dev/enabled": "true"}})
    );
    assert_eq!(
        labelled["namespaceSelector"],
        serde_json::json!({"matchExpressions": [excluded]})
    );
    // Its namespace's label, for Deployments without a label of their own; the same namespaces
    // excluded.
    let by_namespace = &hooks[1];
    assert_eq!(
        by_namespace["objectSelector"],
        serde_json::json!({"matchExpressions": [
            {"key": "fledge.dev/enabled", "operator": "DoesNotExist"},
        ]})
    );
    assert_eq!(
        by_namespace["namespaceSelector"],
        serde_json::json!({
            "matchLabels": {"fledge.dev/enabled": "true"},
            "matchExpressions": [excluded],
        })
    );
    // Apart from what they select, both are the same call of the same endpoint, field for field.
    let ca_bundle = &labelled["clientConfig"]["caBundle"];
    assert!(ca_bundle.is_string(), "{labelled}");
    for hook in hooks {
        let mut call = hook.as_object().unwrap().clone();
        for selecting in ["name", "objectSelector", "namespaceSelector"] {
            call.remove(selecting);
        }
        assert_eq!(
            Value::Object(call),
            serde_json::json!({
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "reinvocationPolicy": "IfNeeded",
                "matchPolicy": "Equivalent",
                "timeoutSeconds": 5,
                "rules": [{
                    "apiGroups": ["apps"], "apiVersions": ["v1"], "resources": ["deployments"],
                    "operations": ["CREATE", "UPDATE"], "scope": "Namespaced",
                }],
                "clientConfig": {
                    "service": {"name": "fledge", "namespace": RELEASE_NS, "path": "/mutate", "port": 443},
                    "caBundle": ca_bundle,
                },
            }),
            "{}",
            hook["name"]
        );
    }
    let ignore = render(&["--set".into(), "webhook.failurePolicy=Ignore".into()]);
    for hook in webhooks(&ignore) {
        assert_eq!(hook["failurePolicy"], "Ignore", "{}", hook["name"]);
    }
    // Namespace opt-in switched off: only a Deployment's own label reaches fledge.
    let off = render(&["--set".into(), "webhook.namespaceOptIn=false".into()]);
    let hooks = webhooks(&off);
    assert_eq!(hooks.len(), 1, "{hooks:?}");
    assert_eq!(hooks[0]["name"], "deployments.fledge.dev");
    assert_eq!(hooks[0]["objectSelector"], labelled["objectSelector"]);
}

#[test]
fn every_certificate_mode_renders_its_objects() {
    let by_mode = combinations();
    // Chart-generated: a Secret with the CA, the caBundle is that CA.
    let generated = render(&by_mode[0]);
    let secret = only(&generated, "Secret", Some("fledge-tls"));
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let mwc = only(&generated, "MutatingWebhookConfiguration", None);
    for hook in webhooks(&generated) {
        assert_eq!(hook["clientConfig"]["caBundle"], secret["data"]["ca.crt"]);
    }
    assert!(mwc["metadata"].get("annotations").is_none());
    assert!(
        !kinds(&generated)
            .iter()
            .any(|k| k.starts_with("Certificate/") || k.starts_with("Issuer/"))
    );
    // Two renders without a cluster make two CAs (lookup finds nothing): the Secret and the
    // caBundle of one render always agree.
    let again = render(&by_mode[0]);
    assert_ne!(
        only(&again, "Secret", None)["data"]["ca.crt"],
        secret["data"]["ca.crt"]
    );

    // cert-manager: its own CA chain, the caBundle injected.
    let cm = render(&by_mode[1]);
    assert_eq!(
        kinds(&cm)
            .into_iter()
            .filter(|k| k.starts_with("Certificate/") || k.starts_with("Issuer/"))
            .collect::<Vec<_>>(),
        [
            "Certificate/fledge-ca",
            "Certificate/fledge-tls",
            "Issuer/fledge-ca",
            "Issuer/fledge-selfsigned"
        ]
    );
    assert!(!kinds(&cm).iter().any(|k| k.starts_with("Secret/")));
    let mwc = only(&cm, "MutatingWebhookConfiguration", None);
    assert_eq!(
        mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "fledge/fledge-tls"
    );
    for hook in webhooks(&cm) {
        assert!(hook["clientConfig"].get("caBundle").is_none(), "{hook}");
    }
    let cert = only(&cm, "Certificate", Some("fledge-tls"));
    assert_eq!(cert["spec"]["secretName"], "fledge-tls");
    assert_eq!(
        cert["spec"]["dnsNames"],
        serde_json::json!([
            "fledge",
            "fledge.fledge",
            "fledge.fledge.svc",
            "fledge.fledge.svc.cluster.local"
        ])
    );
    // cert-manager with the user's issuer: only the serving Certificate.
    let corp = render(&by_mode[2]);
    let cert = only(&corp, "Certificate", None);
    assert_eq!(
        cert["spec"]["issuerRef"],
        serde_json::json!({"name": "corp-ca", "kind": "ClusterIssuer"})
    );
    assert!(!kinds(&corp).iter().any(|k| k.starts_with("Issuer/")));

    // An existing Secret: mounted by name, the caBundle as given, nothing made.
    let existing = render(&by_mode[3]);
    assert!(
        !kinds(&existing)
            .iter()
            .any(|k| k.starts_with("Secret/") || k.starts_with("Certificate/"))
    );
    for hook in webhooks(&existing) {
        assert_eq!(hook["clientConfig"]["caBundle"], SOME_CA_BUNDLE);
    }
    let deployment = only(&existing, "Deployment", None);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"],
        "corp-tls"
    );
}

#[test]
fn the_deployment_is_highly_available_and_restricted() {
    let objects = chart::default_render();
    let d = only(objects, "Deployment", Some("fledge"));
    assert_eq!(d["spec"]["replicas"], 2);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "fledge");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
        assert_eq!(c[probe]["httpGet"]["path"], path);
        assert_eq!(c[probe]["httpGet"]["scheme"], "HTTPS");
        assert_eq!(c[probe]["httpGet"]["port"], "webhook");
    }
    assert!(c["resources"]["requests"]["memory"].is_string());
    let env: Vec<&str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"POD_NAME") && env.contains(&"POD_NAMESPACE"),
        "{env:?}"
    );
    let spread = pod["topologySpreadConstraints"].as_array().unwrap();
    assert_eq!(spread.len(), 2);
    for s in spread {
        assert_eq!(
            s["labelSelector"]["matchLabels"],
            d["spec"]["selector"]["matchLabels"]
        );
    }
    let pdb = only(objects, "PodDisruptionBudget", Some("fledge"));
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(pdb["spec"]["selector"], d["spec"]["selector"]);
    let service = only(objects, "Service", Some("fledge"));
    let ports: Vec<(&str, u64, &str)> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["port"].as_u64().unwrap(),
                p["targetPort"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [("webhook", 443, "webhook"), ("metrics", 8443, "webhook")]
    );
    assert!(
        !kinds(objects)
            .iter()
            .any(|k| k.starts_with("ServiceMonitor/")),
        "off by default"
    );

    // The other values.
    let other = render(&combinations()[4]);
    let d = only(&other, "Deployment", None);
    assert_eq!(d["spec"]["replicas"], 3);
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "ghcr.io/fledge-dev/fledge:0.2.0");
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"--namespace=shop") && args.contains(&"--split-api=v1alpha4"),
        "{args:?}"
    );
    assert!(
        !kinds(&other)
            .iter()
            .any(|k| k.starts_with("PodDisruptionBudget/"))
    );
    let monitor = only(&other, "ServiceMonitor", None);
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["scheme"], "https");
    // Watching one namespace: the main ClusterRole is bound there only; the cluster-scoped reads
    // and writes of ClusterRole fledge-cluster stay bound cluster-wide.
    let binding = only(&other, "RoleBinding", Some("fledge"));
    assert_eq!(binding["metadata"]["namespace"], "shop");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], "fledge");
    let cluster_binding = only(&other, "ClusterRoleBinding", None);
    assert_eq!(cluster_binding["roleRef"]["name"], "fledge-cluster");
}

#[test]
fn helm_renders_the_crds_of_crds_dir_before_everything_else_only_when_asked() {
    let crds = chart::crds();
    let names: Vec<&str> = crds
        .iter()
        .map(|c| {
            assert_eq!(c["kind"], "CustomResourceDefinition");
            c["metadata"]["name"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        names,
        [
            "rolloutpolicies.fledge.dev",
            "clusterrolloutpolicies.fledge.dev"
        ]
    );
    // `helm template` leaves crds/ out; `helm install` creates them first, which `--include-crds`
    // shows: as the files hold them, ahead of the templates.
    let plain = chart::default_render();
    assert!(
        !kinds(plain)
            .iter()
            .any(|k| k.starts_with("CustomResourceDefinition/")),
        "crds/ only: no CRD in templates/"
    );
    let with_crds = template(&["--include-crds"]);
    assert_eq!(with_crds[..crds.len()], crds[..]);
    assert_eq!(kinds(&with_crds[crds.len()..]), kinds(plain));
}

#[test]
fn bad_values_are_refused_by_the_schema_with_the_place() {
    for (value, says) in [
        (
            "webhook.failurePolicy=Sometimes",
            "at '/webhook/failurePolicy': value must be one of 'Fail', 'Ignore'",
        ),
        (
            "certificates.mode=vault",
            "at '/certificates/mode': value must be one of",
        ),
        ("replicaCount=0", "at '/replicaCount'"),
        ("controller.splitApi=v2", "at '/controller/splitApi'"),
        (
            "replicaCont=3",
            "additional properties 'replicaCont' not allowed",
        ),
        (
            "certificates.mode=secret",
            "at '/certificates/secret/caBundle'",
        ),
    ] {
        let out = helm(&[
            "template", "fledge", CHART, "-n", RELEASE_NS, "--set", value,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value} must be refused");
        assert!(
            stderr.contains("values don't meet the specifications of the schema"),
            "{value}: {stderr}"
        );
        assert!(stderr.contains(says), "{value}: {stderr}");
    }
}

/// Server-side apply of `object` (as Helm 4 installs) with `fieldValidation=Strict`, as the
/// default user; the resource found through discovery, as helm finds it.
async fn apply_strict(
    client: &kube::Client,
    discovery: &kube::Discovery,
    object: &Value,
) -> Result<(), String> {
    let (group, version) = match object["apiVersion"].as_str().unwrap().rsplit_once('/') {
        Some((g, v)) => (g, v),
        None => ("", object["apiVersion"].as_str().unwrap()),
    };
    let gvk = kube::api::GroupVersionKind::gvk(group, version, object["kind"].as_str().unwrap());
    let (resource, caps) = discovery
        .resolve_gvk(&gvk)
        .ok_or_else(|| format!("the stand-in does not serve {gvk:?}"))?;
    let api: kube::Api<kube::api::DynamicObject> = match caps.scope {
        kube::discovery::Scope::Namespaced => kube::Api::namespaced_with(
            client.clone(),
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or(RELEASE_NS),
            &resource,
        ),
        kube::discovery::Scope::Cluster => kube::Api::all_with(client.clone(), &resource),
    };
    let name = object["metadata"]["name"].as_str().unwrap();
    api.patch(
        name,
        &kube::api::PatchParams::apply("helm")
            .force()
            .validation_strict(),
        &kube::api::Patch::Apply(object),
    )
    .await
    .map(|_| ())
    .map_err(|e| format!("{} {name}: {e}", object["kind"]))
}

async fn stand_in(extra_crds: Vec<String>) -> ApiServer {
    ApiServer::start(ApiServerConfig {
        namespaces: vec![RELEASE_NS.into(), NS.into()],
        extra_crds,
        ..ApiServerConfig::default()
    })
    .await
}

const CRDS: &str = "apiextensions.k8s.io/v1/customresourcedefinitions";

/// What `helm install` does with the rendered `crds` before anything else: creates them (here with
/// strict field validation, like every object) and waits until each is Established. Returns the
/// discovery made after that, which finds the resources they define.
async fn install_crds(api: &ApiServer, crds: &[Value]) -> kube::Discovery {
    let client = api.client();
    let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
    for crd in crds {
        assert_eq!(crd["kind"], "CustomResourceDefinition");
        apply_strict(&client, &discovery, crd).await.unwrap();
        let name = crd["metadata"]["name"].as_str().unwrap();
        api.wait_for(CRDS, "", name, WAIT, |c| {
            c.and_then(|c| c["status"]["conditions"].as_array())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Established" && c["status"] == "True")
                })
        })
        .await
        .unwrap();
    }
    kube::Discovery::new(client).run().await.unwrap()
}

fn is_crd(object: &Value) -> bool {
    object["kind"] == "CustomResourceDefinition"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rendered_object_applies_with_strict_field_validation() {
    let api = stand_in(vec![CERT_MANAGER_CRDS.into(), SERVICE_MONITOR_CRD.into()]).await;
    let client = api.client();
    let discovery = install_crds(&api, &chart::crds()).await;
    for crd in chart::crds() {
        let gvk = kube::api::GroupVersionKind::gvk(
            crd["spec"]["group"].as_str().unwrap(),
            crd["spec"]["versions"][0]["name"].as_str().unwrap(),
            crd["spec"]["names"]["kind"].as_str().unwrap(),
        );
        assert!(discovery.resolve_gvk(&gvk).is_some(), "{gvk:?} is served");
    }
    let mut failures = Vec::new();
    for mut args in combinations() {
        // With the CRDs, which must apply strictly too (a second time here, unchanged).
        args.push("--include-crds".into());
        for object in render(&args) {
            if let Err(e) = apply_strict(&client, &discovery, &object).await {
                failures.push(format!("{args:?}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "refused:\n{}", failures.join("\n"));
    // Strict really is strict: a misspelled field is refused.
    let mut typo = only(chart::default_render(), "PodDisruptionBudget", None).clone();
    typo["spec"]["minAvailabel"] = 1.into();
    let refused = apply_strict(&client, &discovery, &typo).await.unwrap_err();
    assert!(refused.contains("minAvailabel"), "{refused}");
}

/// A shell line's words, `# comment` removed.
fn words(line: &str) -> Vec<String> {
    line.split(" #")
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// README's install section: the helm command, and the first canary's commands.
fn readme_install() -> (Vec<String>, Vec<Vec<String>>) {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Install\n")
        .nth(1)
        .expect("README has an Install section");
    let section = section.split("\n## ").next().unwrap();
    let blocks: Vec<Vec<Vec<String>>> = section
        .split("```sh\n")
        .skip(1)
        .map(|b| {
            b.split("```")
                .next()
                .unwrap()
                .lines()
                .map(words)
                .filter(|w| !w.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(blocks.len(), 2, "{section}");
    assert_eq!(blocks[0].len(), 1, "one install command");
    assert_eq!(blocks[1].len(), 3, "a first canary in three commands");
    assert!(
        section.contains("`kubectl create namespace shop`"),
        "{section}"
    );
    // The test installs the CRDs as `helm install` does, before the templates.
    assert!(
        section.contains("CRDs from the chart's `crds/` first"),
        "{section}"
    );
    (blocks[0][0].clone(), blocks[1].clone())
}

/// `helm install` of the rendered `objects` (crds/ included) into a fresh stand-in: the release
/// namespace made by `--create-namespace`, and shop as README's `kubectl create namespace shop`
/// makes it (kubectl creates with protobuf, which the stand-in does not speak); then the CRDs, and
/// the other objects as helm applies them.
async fn helm_install(objects: &[Value], extra_crds: Vec<String>) -> ApiServer {
    let api = stand_in(extra_crds).await;
    let crds: Vec<Value> = objects.iter().filter(|o| is_crd(o)).cloned().collect();
    assert!(!crds.is_empty(), "rendered with --include-crds");
    let discovery = install_crds(&api, &crds).await;
    let client = api.client();
    for object in objects.iter().filter(|o| !is_crd(o)) {
        apply_strict(&client, &discovery, object).await.unwrap();
    }
    api
}

/// The rendered webhooks as rendered, caBundle included, at the replica listening on `port`.
fn webhooks_at(objects: &[Value], port: u16) -> Vec<support::apiserver::WebhookConfig> {
    chart::webhook_configs(objects, port, None)
        .into_iter()
        .map(|mut hook| {
            hook.connect_to = Some(([127, 0, 0, 1], port).into());
            hook
        })
        .collect()
}

/// A `fledge serve` process run as the chart's Deployment runs it, as its ServiceAccount.
struct Replica {
    child: Child,
    port: u16,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts one replica of the rendered Deployment `d` as pod `pod`: its container's args and env,
/// with the Secret volume at `tls` and the listener on a free local port.
fn start_replica(api: &ApiServer, d: &Value, pod: &str, tls: &Path, user: &UserInfo) -> Replica {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let container = &d["spec"]["template"]["spec"]["containers"][0];
    let mount = container["volumeMounts"][0]["mountPath"].as_str().unwrap();
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            if a.starts_with("--listen=") {
                format!("--listen=127.0.0.1:{port}")
            } else {
                a.replace(&format!("{mount}/"), &format!("{}/", tls.display()))
            }
        })
        .collect();
    let dir = tls.parent().unwrap().join(pod);
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        api.kubeconfig_yaml_as(user.clone(), RELEASE_NS),
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_fledge"));
    command
        .args(&args)
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("FLEDGE_NAMESPACE");
    for e in container["env"].as_array().unwrap() {
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.namespace") => RELEASE_NS.to_owned(),
            Some("metadata.name") => pod.to_owned(),
            Some(other) => panic!("env from {other}: resolve it here"),
            None => e["value"].as_str().unwrap().to_owned(),
        };
        command.env(e["name"].as_str().unwrap(), value);
    }
    let log = std::fs::File::create(dir.join("log")).unwrap();
    let child = command.stdout(Stdio::null()).stderr(log).spawn().unwrap();
    let replica = Replica { child, port };
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{pod} did not listen: {}",
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    replica
}

/// What one RBAC rule entry grants: (verb, group, resource[/subresource]).
type Grant = (String, String, String);

/// Every (verb, group, resource) a rendered Role or ClusterRole grants.
fn grants(role: &Value) -> BTreeSet<Grant> {
    let list = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        assert!(
            rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(),
            "{rule}"
        );
        for group in list(&rule["apiGroups"]) {
            for resource in list(&rule["resources"]) {
                for verb in list(&rule["verbs"]) {
                    assert!(
                        ![&group, &resource, &verb].contains(&&"*".to_owned()),
                        "no wildcards: {rule}"
                    );
                    out.insert((verb, group.clone(), resource.clone()));
                }
            }
        }
    }
    out
}

fn grant_of(r: &ApiRequest) -> Grant {
    let resource = if r.subresource.is_empty() {
        r.resource.clone()
    } else {
        format!("{}/{}", r.resource, r.subresource)
    };
    (r.verb.to_owned(), r.group.clone(), resource)
}

fn show(g: &Grant) -> String {
    format!(
        "{:<8} {}/{}",
        g.0,
        if g.1.is_empty() { "core" } else { &g.1 },
        g.2
    )
}

/// ClusterRole grants for code that the run in this file does not reach yet: the analysis
/// providers (`runtime::analysis`, their requests tested in tests/analysis_providers.rs). Not
/// reported unused; remove an entry as soon as the run here makes the request.
const NOT_EXERCISED_HERE: &[(&str, &str, &str)] = &[
    ("create", "batch", "jobs"),
    ("get", "batch", "jobs"),
    ("list", "batch", "jobs"),
    ("watch", "batch", "jobs"),
    ("deletecollection", "batch", "jobs"),
    ("get", "", "secrets"),
];

/// A role bound to fledge's ServiceAccount, and where its grants hold: everywhere (a
/// ClusterRoleBinding) or in one namespace (a RoleBinding), as RBAC grants them.
struct Bound {
    /// `ClusterRole fledge`, or `ClusterRole fledge in shop` for a RoleBinding's.
    name: String,
    namespace: Option<String>,
    grants: BTreeSet<Grant>,
}

impl Bound {
    /// Whether it grants `g` for a request in `namespace` (`None`: cluster-scoped, or across
    /// namespaces, which only a ClusterRoleBinding grants).
    fn allows(&self, g: &Grant, namespace: Option<&str>) -> bool {
        self.grants.contains(g)
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| namespace == Some(ns))
    }
}

/// The rendered roles bound to the rendered ServiceAccount; every rendered role must be bound.
fn bound_roles(objects: &[Value]) -> Vec<Bound> {
    let sa = only(objects, "ServiceAccount", None);
    let sa_name = &sa["metadata"]["name"];
    let mut bound = Vec::new();
    let mut roles_bound = BTreeSet::new();
    for binding in objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding")
    {
        let to_sa = binding["subjects"].as_array().unwrap().iter().any(|s| {
            s["kind"] == "ServiceAccount" && s["name"] == *sa_name && s["namespace"] == RELEASE_NS
        });
        if !to_sa {
            continue;
        }
        let (kind, role_name) = (
            binding["roleRef"]["kind"].as_str().unwrap(),
            binding["roleRef"]["name"].as_str().unwrap(),
        );
        let role = only(objects, kind, Some(role_name));
        let namespace = (binding["kind"] == "RoleBinding").then(|| {
            binding["metadata"]["namespace"]
                .as_str()
                .unwrap()
                .to_owned()
        });
        if kind == "Role" {
            assert_eq!(
                role["metadata"]["namespace"].as_str(),
                namespace.as_deref(),
                "a RoleBinding binds a Role of its own namespace: {binding}"
            );
        }
        roles_bound.insert(format!("{kind}/{role_name}"));
        bound.push(Bound {
            name: match (kind, &namespace) {
                ("ClusterRole", Some(ns)) => format!("{kind} {role_name} in {ns}"),
                _ => format!("{kind} {role_name}"),
            },
            namespace,
            grants: grants(role),
        });
    }
    for role in objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
    {
        let id = format!(
            "{}/{}",
            role["kind"].as_str().unwrap(),
            role["metadata"]["name"].as_str().unwrap()
        );
        assert!(roles_bound.contains(&id), "{id} is bound to nothing");
    }
    bound
}

/// Compares the requests made with the rendered roles where their bindings put them; the report
/// lists, role by role, what each request used, and what is missing and what is unused. A request
/// uses the narrowest binding that allows it (a namespace's before a cluster-wide one), so a
/// cluster-wide grant that only repeats a namespaced one shows as unused.
fn least_privilege(objects: &[Value], requests: &[ApiRequest]) -> Result<String, String> {
    let check = check_rbac(objects, requests);
    let wrong: Vec<&str> = check
        .problems
        .iter()
        .chain(&check.unused)
        .map(String::as_str)
        .collect();
    if wrong.is_empty() {
        Ok(check.report)
    } else {
        Err(format!("{}\n{}", check.report, wrong.join("\n")))
    }
}

/// The requests against the rendered RBAC: what each one used, what is wrong (`problems`: missing
/// grants, Leases and Secrets beyond their bounds), and what is `unused`.
struct RbacCheck {
    report: String,
    problems: Vec<String>,
    unused: Vec<String>,
}

fn check_rbac(objects: &[Value], requests: &[ApiRequest]) -> RbacCheck {
    let mut bound = bound_roles(objects);
    bound.sort_by_key(|b| b.namespace.is_none());
    let mut used: Vec<BTreeSet<Grant>> = vec![BTreeSet::new(); bound.len()];
    let mut missing = BTreeSet::new();
    let mut problems = Vec::new();
    for r in requests {
        let g = grant_of(r);
        match bound
            .iter()
            .position(|b| b.allows(&g, r.namespace.as_deref()))
        {
            Some(i) => {
                used[i].insert(g);
            }
            None => {
                missing.insert((g, r.namespace.clone()));
            }
        }
        if r.resource == "leases" && r.namespace.as_deref() != Some(RELEASE_NS) {
            problems.push(format!(
                "a Lease request outside the release namespace: {r:?}"
            ));
        }
    }
    for role in objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
    {
        for g in grants(role) {
            if g.2 == "secrets" && g.0 != "get" {
                problems.push(format!("Secrets are granted beyond get: {}", show(&g)));
            }
            if g.2 == "leases" && role["kind"] == "ClusterRole" {
                problems.push(format!("Leases granted by a ClusterRole: {}", show(&g)));
            }
        }
    }
    let mut report = String::from("fledge serve's requests, as RBAC rules:\n");
    for (b, used) in bound.iter().zip(&used) {
        for g in used {
            report += &format!("  {}  {}\n", b.name, show(g));
        }
    }
    for (g, ns) in &missing {
        problems.push(format!(
            "missing: {} ({}) -- add it to charts/fledge/templates/rbac.yaml",
            show(g),
            ns.as_deref()
                .map_or("cluster-wide".to_owned(), |ns| format!("in namespace {ns}"))
        ));
    }
    let mut unused = Vec::new();
    for (b, used) in bound.iter().zip(&used) {
        for g in b
            .grants
            .difference(used)
            .filter(|g| !NOT_EXERCISED_HERE.contains(&(g.0.as_str(), g.1.as_str(), g.2.as_str())))
        {
            unused.push(format!(
                "unused: {} grants {} -- remove it from charts/fledge/templates/rbac.yaml",
                b.name,
                show(g)
            ));
        }
    }
    RbacCheck {
        report,
        problems,
        unused,
    }
}

const ROLLOUT_POLICIES: &str = "fledge.dev/v1alpha1/rolloutpolicies";
const CLUSTER_ROLLOUT_POLICIES: &str = "fledge.dev/v1alpha1/clusterrolloutpolicies";

/// How long a policy's status may take: the leader counts the Deployments a policy governs on
/// every change of a policy or a namespace's labels, and at least every 30 s
/// (`runtime::policies::STATUS_EVERY`). A count taken just after the leader started, before its
/// cache of Deployments was filled, is wrong until that next count.
const POLICY_STATUS_WAIT: Duration = Duration::from_secs(30 + WAIT.as_secs());

/// Waits until the leader has written the policy's status: its generation seen, `Ready=True`, and
/// `deployments` Deployments governed.
async fn wait_policy_status(api: &ApiServer, gvr: &str, ns: &str, name: &str, deployments: i64) {
    api.wait_for(gvr, ns, name, POLICY_STATUS_WAIT, |p| {
        p.is_some_and(|p| {
            let status = &p["status"];
            status["observedGeneration"] == p["metadata"]["generation"]
                && status["deployments"] == deployments
                && status["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
        })
    })
    .await
    .unwrap();
}

/// `kubectl ARGS` as a developer, with fledge as its plugin.
fn kubectl_command(plugins: &Path, kubeconfig: &Path, args: &[String]) -> Command {
    let path = std::env::join_paths(std::iter::once(plugins.to_owned()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    let mut command = Command::new(kubectl());
    command
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", kubeconfig)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    command
}

/// README's install commands word for word (helm's `install` as `template`, the same arguments, and
/// the CRDs of crds/ installed first as `helm install` does), with the rendered chart's
/// `fledge serve` as two replicas under its ServiceAccount and both rendered webhooks; then README's
/// first canary to promotion under a RolloutPolicy, a second one aborted with the CLI, and a
/// Deployment opted in by its namespace's label under a ClusterRolloutPolicy; meanwhile leader
/// election and the policies' status. Every request the replicas made must be granted by the
/// chart's RBAC, and every grant used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_install_and_first_canary_use_exactly_the_charts_rbac() {
    let (install, canary) = readme_install();
    assert_eq!(install[..3], ["helm", "install", "fledge"], "{install:?}");
    let mut args: Vec<&str> = install[1..].iter().map(String::as_str).collect();
    args[0] = "template";
    // `helm install` creates crds/ before the templates; `helm template` prints them only so.
    args.push("--include-crds");
    let out = helm(&args);
    assert!(
        out.status.success(),
        "helm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects = chart::documents(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        objects
            .iter()
            .filter(|o| is_crd(o))
            .cloned()
            .collect::<Vec<_>>(),
        chart::crds()
    );

    let api = helm_install(&objects, vec![e2e::gateway_api_crd()]).await;

    // The pods: the chart's Deployment, as its ServiceAccount, with its Secret's certificate.
    let d = only(&objects, "Deployment", None);
    let sa = only(&objects, "ServiceAccount", None);
    assert_eq!(
        d["spec"]["template"]["spec"]["serviceAccountName"],
        sa["metadata"]["name"]
    );
    let fledge_sa = UserInfo::service_account(RELEASE_NS, sa["metadata"]["name"].as_str().unwrap());
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "fledge-helm-{}-{}",
        std::process::id(),
        api.addr().port()
    ));
    let tls = dir.join("tls");
    chart::write_tls_secret(&objects, &tls);
    let first = start_replica(&api, d, "fledge-0", &tls, &fledge_sa);
    // The first replica takes the Lease before the second one looks.
    api.wait_for(
        "coordination.k8s.io/v1/leases",
        RELEASE_NS,
        "fledge-controller",
        WAIT,
        |l| l.is_some_and(|l| l["spec"]["holderIdentity"] == "fledge-0"),
    )
    .await
    .unwrap();
    let second = start_replica(&api, d, "fledge-1", &tls, &fledge_sa);
    api.set_webhooks(webhooks_at(&objects, first.port));

    // README's first canary, as a developer with kubectl and the plugin.
    let developer = UserInfo::user("dev");
    let kubeconfig = dir.join("kubeconfig-dev");
    std::fs::write(
        &kubeconfig,
        api.kubeconfig_yaml_as(developer.clone(), "default"),
    )
    .unwrap();
    let plugins = plugin_dir(&api);
    // `kubectl apply -f FILE` as kubectl's client-side apply does it (the stand-in serves no
    // OpenAPI, which the real kubectl's apply downloads); `kubectl fledge ...` by the real kubectl.
    let kubectl_apply = |line: &[String]| {
        assert_eq!(line[..3], ["kubectl", "apply", "-f"], "{line:?}");
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(&line[3]);
        chart::documents(&std::fs::read_to_string(path).unwrap())
    };
    for object in kubectl_apply(&canary[0]) {
        api.apply_as_user(&developer, object).await.unwrap();
    }
    api.wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
        d.is_some_and(|d| d["status"]["availableReplicas"] == 4)
    })
    .await
    .unwrap();
    // The platform team's RolloutPolicy for web (which web's annotations satisfy, so its canaries
    // run as before): the leader counts web under it, and the canaries below run under it.
    let platform = UserInfo::user("platform");
    let web_policy = serde_json::json!({
        "apiVersion": "fledge.dev/v1alpha1", "kind": "RolloutPolicy",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "guardRails": {"allowedRouters": ["smi"]}},
    });
    api.apply_as_user(&platform, web_policy).await.unwrap();
    wait_policy_status(&api, ROLLOUT_POLICIES, NS, "web", 1).await;
    for object in kubectl_apply(&canary[1]) {
        api.apply_as_user(&developer, object).await.unwrap();
    }
    assert_eq!(canary[2][..2], ["kubectl", "fledge"], "{:?}", canary[2]);
    let mut watch = kubectl_command(&plugins, &kubeconfig, &canary[2][1..]);
    let watch_out = dir.join("watch.out");
    watch
        .stdout(std::fs::File::create(&watch_out).unwrap())
        .stderr(Stdio::piped());
    let watching = watch.spawn().unwrap();
    // The timed pause at 5 %, then the open one at 50 %: each ended with `fledge promote`.
    for weight in [500, 5000] {
        api.wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            e2e::state(d)
                .is_some_and(|s| s.phase == Phase::Paused && s.weight.basis_points() == weight)
        })
        .await
        .unwrap();
        // The watch reports the pause before it is ended: it started as a process of its own,
        // and the controller may be faster than its first list.
        let shown = format!(" {}% ", weight / 100);
        let reported =
            |l: &str| l.starts_with("web ") && l.contains("Paused") && l.contains(&shown);
        let deadline = std::time::Instant::now() + WAIT;
        while !std::fs::read_to_string(&watch_out)
            .unwrap_or_default()
            .lines()
            .any(reported)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the watch never reported the pause at{shown}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        e2e::fledge(&api, &["promote", "web"]).await;
    }
    e2e::wait_phase(&api, Phase::Succeeded).await;
    let watched = tokio::task::spawn_blocking(move || watching.wait_with_output().unwrap())
        .await
        .unwrap();
    let shown = std::fs::read_to_string(&watch_out).unwrap();
    assert!(
        watched.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    // Each report's first line is the Deployment's (the policy's name follows, indented).
    assert!(
        shown.contains("Paused")
            && shown
                .lines()
                .rfind(|l| l.starts_with("web "))
                .is_some_and(|l| l.contains("Succeeded")),
        "{shown}"
    );
    assert!(shown.contains("policy: RolloutPolicy shop/web"), "{shown}");

    // A second canary, aborted with the CLI: traffic back, canary objects deleted.
    let v3 = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/web-v2.yaml"))
        .unwrap()
        .replace("web:1.1.0", "web:1.2.0");
    for object in chart::documents(&v3) {
        api.apply_as_user(&developer, object).await.unwrap();
    }
    e2e::wait_phase(&api, Phase::Paused).await;
    e2e::fledge(&api, &["abort", "web"]).await;
    e2e::wait_phase(&api, Phase::Aborted).await;
    e2e::wait_until_nothing_is_left(&api).await;

    // Namespace opt-in: the platform team labels shop, and a ClusterRolloutPolicy gives the `api`
    // Deployments of opted-in namespaces the Gateway API router (GAMMA: fledge's own HTTPRoute). A
    // mesh user's Deployment with steps but no label of its own (so through the chart's second
    // webhook entry), to its pause and aborted: what all that needs is granted too.
    kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(api.client_as(platform.clone()))
        .patch(
            NS,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                serde_json::json!({"metadata": {"labels": {"fledge.dev/enabled": "true"}}}),
            ),
        )
        .await
        .unwrap();
    let api_app = |image: &str| {
        serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "api", "namespace": NS, "labels": {"app": "api"},
                         "annotations": {"fledge.dev/steps": "- setWeight: 50\n- pause: {}\n"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "api"}},
                     "template": {"metadata": {"labels": {"app": "api"}},
                                  "spec": {"containers": [{"name": "api", "image": image}]}}},
        })
    };
    let api_service = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "api", "namespace": NS},
        "spec": {"selector": {"app": "api"}, "ports": [{"name": "http", "port": 80}]},
    });
    api.apply_as_user(&developer, api_service).await.unwrap();
    api.apply_as_user(&developer, api_app("api:1"))
        .await
        .unwrap();
    api.wait_for(DEPLOYMENTS, NS, "api", WAIT, |d| {
        d.is_some_and(|d| d["status"]["availableReplicas"] == 2)
    })
    .await
    .unwrap();
    let mesh_policy = serde_json::json!({
        "apiVersion": "fledge.dev/v1alpha1", "kind": "ClusterRolloutPolicy",
        "metadata": {"name": "mesh"},
        "spec": {"namespaceSelector": {"matchLabels": {"fledge.dev/enabled": "true"}},
                 "selector": {"matchLabels": {"app": "api"}},
                 "router": "gateway-api"},
    });
    api.apply_as_user(&platform, mesh_policy).await.unwrap();
    // Counted under it by the leader, whose webhook (the one called) then knows shop opted in.
    wait_policy_status(&api, CLUSTER_ROLLOUT_POLICIES, "", "mesh", 1).await;
    api.apply_as_user(&developer, api_app("api:2"))
        .await
        .unwrap();
    let paused_api =
        |d: Option<&serde_json::Value>| e2e::state(d).is_some_and(|s| s.phase == Phase::Paused);
    api.wait_for(DEPLOYMENTS, NS, "api", WAIT, paused_api)
        .await
        .unwrap();
    assert!(
        api.get("gateway.networking.k8s.io/v1/httproutes", NS, "api")
            .is_some(),
        "fledge's GAMMA route, the router of the ClusterRolloutPolicy"
    );
    let calls = api.webhook_calls();
    assert!(
        calls.iter().any(|c| {
            c.webhook == "namespaces.deployments.fledge.dev"
                && c.review["request"]["name"] == "api"
                && c.review["request"]["operation"] == "UPDATE"
        }),
        "api's new template went through the namespace opt-in entry"
    );
    // fledge's own canary Deployment carries api's labels and opts out: neither webhook entry sends
    // it to fledge.
    assert!(
        !calls
            .iter()
            .any(|c| c.review["request"]["name"] == "api-canary"),
        "no webhook call for api-canary"
    );
    e2e::fledge(&api, &["abort", "api"]).await;
    api.wait_for(
        "gateway.networking.k8s.io/v1/httproutes",
        NS,
        "api",
        WAIT,
        |r| r.is_none(),
    )
    .await
    .unwrap();

    // Leader election: the holder renewed the Lease at least once, the other replica only looked.
    api.wait_for(
        "coordination.k8s.io/v1/leases",
        RELEASE_NS,
        "fledge-controller",
        WAIT,
        |l| l.is_some_and(|l| l["spec"]["renewTime"] != l["spec"]["acquireTime"]),
    )
    .await
    .unwrap();
    drop((first, second));

    let requests = api.requests_by(&fledge_sa);
    let report = least_privilege(&objects, &requests);
    let _ = std::fs::remove_dir_all(&dir);
    match report {
        Ok(report) => eprintln!("{report}"),
        Err(diff) => panic!("the chart's RBAC is not exactly what fledge uses:\n{diff}"),
    }
}

#[test]
fn the_rbac_check_names_what_is_missing_and_what_is_unused() {
    let request = |verb: &'static str, resource: &str, namespace: Option<&str>| ApiRequest {
        user: "system:serviceaccount:fledge:fledge".into(),
        verb,
        group: String::new(),
        resource: resource.into(),
        subresource: String::new(),
        namespace: namespace.map(str::to_owned),
        name: None,
        at: std::time::SystemTime::UNIX_EPOCH,
    };
    let diff = least_privilege(
        chart::default_render(),
        &[
            request("list", "services", None),
            request("list", "secrets", Some("shop")),
            request("watch", "namespaces", None),
        ],
    )
    .unwrap_err();
    for says in [
        "ClusterRole fledge  list     core/services",
        "ClusterRole fledge-cluster  watch    core/namespaces",
        "missing: list     core/secrets (in namespace shop)",
        "unused: ClusterRole fledge grants watch    apps/deployments",
        "unused: ClusterRole fledge-cluster grants list     core/namespaces",
        "unused: Role fledge-lease grants update   coordination.k8s.io/leases",
    ] {
        assert!(diff.contains(says), "{says}:\n{diff}");
    }
    // Watching one namespace: the main ClusterRole holds there only, cluster-scoped reads still
    // everywhere.
    let one_namespace = render(&["--set".into(), "controller.namespace=shop".into()]);
    let diff = least_privilege(
        &one_namespace,
        &[
            request("list", "services", Some("shop")),
            request("list", "services", None),
            request("list", "services", Some("other")),
            request("list", "namespaces", None),
        ],
    )
    .unwrap_err();
    for says in [
        "ClusterRole fledge in shop  list     core/services",
        "ClusterRole fledge-cluster  list     core/namespaces",
        "missing: list     core/services (cluster-wide)",
        "missing: list     core/services (in namespace other)",
    ] {
        assert!(diff.contains(says), "{says}:\n{diff}");
    }
}

/// `controller.namespace=shop`: the main ClusterRole bound in shop only, the cluster-scoped reads
/// and writes cluster-wide. One replica; shop opted in by its label; a ClusterRolloutPolicy that
/// gives the Deployments of opted-in namespaces their steps (no selector, so it would select
/// fledge's canary Deployment too, were it not labelled `fledge.dev/enabled: "false"`, which keeps
/// it from both webhook entries) and a RolloutPolicy that selects nothing; a Deployment with
/// neither label nor annotations to its pause, replaced by a newer template (its canary Deployment
/// updated) and aborted. Every request must be granted where the bindings put the roles; unused
/// grants are the README test's business.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_namespace_with_namespace_opt_in_and_a_policy_with_steps_runs_under_the_charts_rbac() {
    let objects = template(&[
        "--include-crds",
        "--set",
        &format!("controller.namespace={NS}"),
    ]);
    let api = helm_install(&objects, vec![]).await;
    let d = only(&objects, "Deployment", None);
    let sa = only(&objects, "ServiceAccount", None);
    let fledge_sa = UserInfo::service_account(RELEASE_NS, sa["metadata"]["name"].as_str().unwrap());
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "fledge-helm-{}-{}",
        std::process::id(),
        api.addr().port()
    ));
    let tls = dir.join("tls");
    chart::write_tls_secret(&objects, &tls);
    let replica = start_replica(&api, d, "fledge-0", &tls, &fledge_sa);
    api.set_webhooks(webhooks_at(&objects, replica.port));

    let platform = UserInfo::user("platform");
    let developer = UserInfo::user("dev");
    api.apply_as_user(&developer, e2e::root_service())
        .await
        .unwrap();
    let web = |image: &str| {
        serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": NS, "labels": {"app": "web"}},
            "spec": {"replicas": 4, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "web", "image": image}]}}},
        })
    };
    api.apply_as_user(&developer, web("web:1")).await.unwrap();
    api.wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
        d.is_some_and(|d| d["status"]["availableReplicas"] == 4)
    })
    .await
    .unwrap();
    kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(api.client_as(platform.clone()))
        .patch(
            NS,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                serde_json::json!({"metadata": {"labels": {"fledge.dev/enabled": "true"}}}),
            ),
        )
        .await
        .unwrap();
    for policy in [
        serde_json::json!({
            "apiVersion": "fledge.dev/v1alpha1", "kind": "ClusterRolloutPolicy",
            "metadata": {"name": "opted-in"},
            "spec": {"namespaceSelector": {"matchLabels": {"fledge.dev/enabled": "true"}},
                     "steps": [{"setWeight": 20}, {"pause": {}}]},
        }),
        serde_json::json!({
            "apiVersion": "fledge.dev/v1alpha1", "kind": "RolloutPolicy",
            "metadata": {"name": "nothing", "namespace": NS},
            "spec": {"selector": {"matchLabels": {"app": "nothing"}}},
        }),
    ] {
        api.apply_as_user(&platform, policy).await.unwrap();
    }
    // web counted under the cluster policy: the replica knows shop opted in.
    wait_policy_status(&api, CLUSTER_ROLLOUT_POLICIES, "", "opted-in", 1).await;
    wait_policy_status(&api, ROLLOUT_POLICIES, NS, "nothing", 0).await;

    api.apply_as_user(&developer, web("web:2")).await.unwrap();
    let held = api.get(DEPLOYMENTS, NS, "web").unwrap();
    assert_eq!(held["spec"]["paused"], true, "held by the webhook: {held}");
    let v2 = e2e::state(
        api.wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            e2e::state(d).is_some_and(|s| s.phase == Phase::Paused)
        })
        .await
        .unwrap()
        .as_ref(),
    )
    .unwrap()
    .hash;
    assert_eq!(
        e2e::image(&api.get(DEPLOYMENTS, NS, "web-canary").unwrap()),
        "web:2"
    );
    // A newer template replaces the pending one: fledge updates its canary Deployment.
    api.apply_as_user(&developer, web("web:3")).await.unwrap();
    api.wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
        e2e::state(d).is_some_and(|s| s.phase == Phase::Paused && s.hash != v2)
    })
    .await
    .unwrap();
    assert_eq!(
        e2e::image(&api.get(DEPLOYMENTS, NS, "web-canary").unwrap()),
        "web:3"
    );
    let calls = api.webhook_calls();
    assert!(
        calls
            .iter()
            .all(|c| c.webhook == "namespaces.deployments.fledge.dev"
                && c.review["request"]["name"] == "web"),
        "only web, through the namespace opt-in entry: {:?}",
        calls
            .iter()
            .map(|c| (&c.webhook, &c.review["request"]["name"]))
            .collect::<Vec<_>>()
    );
    e2e::fledge(&api, &["abort", "web"]).await;
    e2e::wait_phase(&api, Phase::Aborted).await;
    e2e::wait_until_nothing_is_left(&api).await;
    drop(replica);

    let check = check_rbac(&objects, &api.requests_by(&fledge_sa));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        check.problems.is_empty(),
        "the chart's RBAC with controller.namespace does not cover fledge's requests:\n{}\n{}",
        check.report,
        check.problems.join("\n")
    );
    eprintln!("{}", check.report);
}
