//! The Helm chart in `helm/tailgate`, rendered without the helm binary by
//! `tests/helm/render` (Go's text/template with sprig and Helm's functions),
//! validated by `tests/helm/validate.py` against values.schema.json and the
//! Kubernetes schemas, and checked for the facts a deployment depends on.
//! When `helm` is on PATH, `helm lint` and `helm template` run too.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};
use tailgate_contract::config::{ConfigFile, Validate};
use tailgate_gateway::config::RawConfig;
use tailgate_ingester::config::RawIngesterConfig;
use tailgate_sampling_rules::Rules;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The oldest Kubernetes the chart supports (Chart.yaml) and the newest the schemas know.
const KUBERNETES: [&str; 2] = ["1.25.0", "1.37.0"];

fn chart() -> PathBuf {
    Path::new(ROOT).join("helm/tailgate")
}

/// Builds the renderer once per test binary.
fn renderer() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helm-render");
        let out = Command::new("go")
            .args(["build", "-o"])
            .arg(&bin)
            .arg("./tests/helm/render")
            .current_dir(ROOT)
            .env("GO111MODULE", "off")
            .env("GOPATH", "/usr/share/gocode")
            .output()
            .expect("go (README: the test command installs it with scripts/ensure-chart-tools)");
        assert!(
            out.status.success(),
            "building the chart renderer failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        bin
    })
}

/// Renders the chart with values files (paths under the repository, or YAML
/// text written to a temporary file); `Err` holds the renderer's message.
fn try_render(values: &[&str]) -> Result<Value, String> {
    let mut cmd = Command::new(renderer());
    let mut written = Vec::new();
    for v in values {
        let path = if v.ends_with(".yaml") && !v.contains('\n') {
            Path::new(ROOT).join(v)
        } else {
            let p = temp_file("values", "yaml");
            std::fs::write(&p, v).unwrap();
            written.push(p.clone());
            p
        };
        cmd.arg("-f").arg(path);
    }
    let out = cmd
        .args(["-name", "tg", "-namespace", "tracing"])
        .arg(chart())
        .output()
        .expect("run the renderer");
    for p in written {
        let _ = std::fs::remove_file(p);
    }
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("renderer JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn render(values: &[&str]) -> Value {
    try_render(values).unwrap_or_else(|e| panic!("{values:?} did not render: {e}"))
}

/// Problems validate.py found (values schema, Kubernetes schemas); empty when valid.
fn problems(rendered: &Value) -> String {
    let file = temp_file("rendered", "json");
    std::fs::write(&file, rendered.to_string()).unwrap();
    let out = Command::new("python3")
        .arg(Path::new(ROOT).join("tests/helm/validate.py"))
        .arg(chart().join("values.schema.json"))
        .arg(&file)
        .args(KUBERNETES)
        .output()
        .expect("python3 (README: the test command installs kubernetes-validate)");
    let _ = std::fs::remove_file(&file);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.success(),
        text.trim().is_empty(),
        "validate.py: {text}"
    );
    text
}

/// A file name under the test temp dir that no other test in this run uses:
/// tests run in parallel and may render the same values, so a name made from
/// the content alone let one test delete the file another was reading.
fn temp_file(kind: &str, ext: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{kind}-{}-{}.{ext}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn find<'a>(rendered: &'a Value, kind: &str, name: &str) -> &'a Value {
    manifests(rendered)
        .find(|m| m["kind"] == kind && m["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} rendered"))
}

fn manifests(rendered: &Value) -> impl Iterator<Item = &Value> {
    rendered["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["object"])
}

fn kinds(rendered: &Value) -> Vec<String> {
    manifests(rendered)
        .map(|m| {
            format!(
                "{}/{}",
                m["kind"].as_str().unwrap(),
                m["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// The element of a list of named objects (containers, env, volumes) called `name`.
fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list}"))
}

fn container<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    named(&deployment["spec"]["template"]["spec"]["containers"], name)
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    named(&container["env"], name)
}

/// Each `(variable, key)`: the variable names the file that the Secret
/// `secret`, mounted read-only and readable by the pod's user and group
/// only, holds `key` in; no variable carries a secret's value.
fn assert_secret_files(
    deployment: &Value,
    container: &Value,
    secret: &str,
    files: &[(&str, &str)],
) {
    let volume = named(
        &deployment["spec"]["template"]["spec"]["volumes"],
        "secrets",
    );
    assert_eq!(volume["secret"]["secretName"], secret);
    assert_eq!(volume["secret"]["defaultMode"], 0o440);
    let mount = named(&container["volumeMounts"], "secrets");
    assert_eq!(mount["readOnly"], true);
    let dir = mount["mountPath"].as_str().unwrap();
    for (var, key) in files {
        assert_eq!(env(container, var)["value"], format!("{dir}/{key}"));
        let items = volume["secret"]["items"].as_array().unwrap();
        assert!(
            items.iter().any(|i| i["key"] == *key && i["path"] == *key),
            "{key} is mounted: {items:?}"
        );
    }
    let names: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for secret_var in ["TAILGATE_RABBITMQ__URL", "TAILGATE_CLICKHOUSE__PASSWORD"] {
        assert!(
            !names.contains(&secret_var),
            "{secret_var} in the environment: {names:?}"
        );
    }
}

fn port(ports: &Value, name: &str) -> i64 {
    ports
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_i64().or(p["port"].as_i64()))
        .unwrap_or_else(|| panic!("no port {name} in {ports}"))
}

fn sha256(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

const VALUE_SETS: [&str; 5] = [
    "helm/tailgate/ci/default-values.yaml",
    "helm/tailgate/ci/autoscaling-values.yaml",
    "helm/tailgate/ci/existing-secrets-values.yaml",
    "helm/tailgate/ci/servicemonitor-values.yaml",
    "helm/tailgate/ci/gateway-only-values.yaml",
];

/// Every value set in helm/tailgate/ci renders, its values pass
/// values.schema.json, its manifests pass the Kubernetes schemas of the
/// oldest and newest supported versions, and the gateway and ingester
/// accept the configuration files the chart writes for them.
#[test]
fn every_value_set_renders_validates_and_configures_the_binaries() {
    for set in VALUE_SETS {
        let r = render(&[set]);
        assert_eq!(problems(&r), "", "{set}");
        let config = find(&r, "ConfigMap", "tg-tailgate-config");
        let gateway: RawConfig =
            ConfigFile::from_yaml(config["data"]["gateway.yaml"].as_str().unwrap())
                .unwrap_or_else(|e| panic!("{set}: gateway.yaml: {e}"));
        gateway
            .validate()
            .unwrap_or_else(|e| panic!("{set}: gateway.yaml: {e}"));
        if let Some(text) = config["data"]["ingester.yaml"].as_str() {
            let ingester: RawIngesterConfig = ConfigFile::from_yaml(text).unwrap();
            ingester.validate().unwrap();
        }
        if let Some(rules) = manifests(&r).find(|m| m["metadata"]["name"] == "tg-tailgate-rules") {
            let text = rules["data"]["rules.yaml"].as_str().unwrap();
            Rules::from_yaml(text, "rules.yaml").unwrap_or_else(|e| panic!("{set}: {e}"));
        }
        if which_helm() {
            helm_agrees(set);
        }
    }
}

fn which_helm() -> bool {
    Command::new("helm")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `helm lint` passes and `helm template` renders the same kinds of objects.
fn helm_agrees(set: &str) {
    let values = Path::new(ROOT).join(set);
    let lint = Command::new("helm")
        .args(["lint", "--strict", "-f"])
        .arg(&values)
        .arg(chart())
        .output()
        .unwrap();
    assert!(
        lint.status.success(),
        "helm lint {set}: {}",
        String::from_utf8_lossy(&lint.stdout)
    );
    let template = Command::new("helm")
        .args(["template", "tg", "-n", "tracing", "-f"])
        .arg(&values)
        .arg(chart())
        .output()
        .unwrap();
    assert!(template.status.success(), "helm template {set}");
    let text = String::from_utf8_lossy(&template.stdout);
    for kind in kinds(&render(&[set])) {
        let (k, name) = kind.split_once('/').unwrap();
        assert!(
            text.contains(&format!("kind: {k}")) && text.contains(&format!("name: {name}")),
            "helm template {set} lacks {kind}"
        );
    }
}

/// Defaults: the gateway pods listen on the OTLP, cluster and admin ports,
/// are probed on /healthz and /readyz, advertise their pod IP, take the
/// RabbitMQ URL from the chart's Secret, find peers through a headless
/// Service that publishes not-ready pods, read the rules from a mounted
/// directory (so edits hot-reload), get more time to stop than the handoff
/// needs, and run as non-root on a read-only root filesystem.
#[test]
fn defaults_wire_the_gateway_cluster_together() {
    let r = render(&[]);
    let dep = find(&r, "Deployment", "tg-tailgate-gateway");
    let pod = &dep["spec"]["template"]["spec"];
    let c = container(dep, "gateway");
    assert_eq!(dep["spec"]["replicas"], 3);
    assert_eq!(
        c["args"],
        serde_json::json!(["gateway", "--config", "/etc/tailgate/config/gateway.yaml"])
    );
    for (name, number) in [
        ("otlp-grpc", 4317),
        ("otlp-http", 4318),
        ("cluster", 4319),
        ("admin", 8888),
    ] {
        assert_eq!(port(&c["ports"], name), number);
    }
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(
        env(c, "POD_IP")["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    // The broker URL comes from a file of the mounted Secret, not the
    // environment.
    assert_secret_files(
        dep,
        c,
        "tg-tailgate",
        &[("TAILGATE_RABBITMQ__URL_FILE", "rabbitmq-url")],
    );
    let secret = find(&r, "Secret", "tg-tailgate");
    assert!(
        secret["stringData"]["rabbitmq-url"]
            .as_str()
            .unwrap()
            .starts_with("amqp://")
    );

    // Peer discovery: the configured DNS name is the headless Service's.
    let peers = find(&r, "Service", "tg-tailgate-peers");
    assert_eq!(peers["spec"]["clusterIP"], "None");
    assert_eq!(peers["spec"]["publishNotReadyAddresses"], true);
    assert_eq!(port(&peers["spec"]["ports"], "cluster"), 4319);
    assert_eq!(
        peers["spec"]["selector"],
        dep["spec"]["selector"]["matchLabels"]
    );
    let config_text = find(&r, "ConfigMap", "tg-tailgate-config")["data"]["gateway.yaml"]
        .as_str()
        .unwrap()
        .to_owned();
    let config = RawConfig::from_yaml(&config_text)
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(
        config.cluster.dns.as_deref(),
        Some("tg-tailgate-peers.tracing.svc.cluster.local:4319")
    );
    let otlp = find(&r, "Service", "tg-tailgate");
    assert_eq!(otlp["spec"]["type"], "ClusterIP");
    assert_eq!(port(&otlp["spec"]["ports"], "otlp-grpc"), 4317);
    assert_eq!(port(&otlp["spec"]["ports"], "otlp-http"), 4318);

    // Rules: a directory mount of the rules ConfigMap, no subPath.
    let mount = named(&c["volumeMounts"], "rules");
    assert_eq!(mount["mountPath"], "/etc/tailgate/rules");
    assert!(mount.get("subPath").is_none());
    let volume = named(&pod["volumes"], "rules");
    assert_eq!(volume["configMap"]["name"], "tg-tailgate-rules");
    assert_eq!(
        config.rules.file.as_deref(),
        Some(Path::new("/etc/tailgate/rules/rules.yaml"))
    );

    // Shutdown: Kubernetes waits longer than the gateway's handoff may take.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > config.shutdown_grace.as_secs(), "{grace}");
    assert_eq!(
        dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );

    // Security and scheduling.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let uid = pod["securityContext"]["runAsUser"].as_u64().unwrap();
    assert!(
        dockerfile.contains(&format!("USER {uid}:{uid}")),
        "the image runs as {uid}"
    );
    let anti =
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(
        anti["podAffinityTerm"]["topologyKey"],
        "kubernetes.io/hostname"
    );
    assert_eq!(
        dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
        "8888"
    );
    assert_eq!(
        find(&r, "PodDisruptionBudget", "tg-tailgate-gateway")["spec"]["maxUnavailable"],
        1
    );

    // The ingester: its own Deployment, ClickHouse credentials from the Secret.
    let ing = find(&r, "Deployment", "tg-tailgate-ingester");
    let ic = container(ing, "ingester");
    assert_eq!(ing["spec"]["replicas"], 2);
    for (var, key) in [
        ("TAILGATE_CLICKHOUSE__URL", "clickhouse-url"),
        ("TAILGATE_CLICKHOUSE__USER", "clickhouse-user"),
    ] {
        assert_eq!(env(ic, var)["valueFrom"]["secretKeyRef"]["key"], key);
    }
    assert_secret_files(
        ing,
        ic,
        "tg-tailgate",
        &[
            ("TAILGATE_RABBITMQ__URL_FILE", "rabbitmq-url"),
            ("TAILGATE_CLICKHOUSE__PASSWORD_FILE", "clickhouse-password"),
        ],
    );
    assert_eq!(port(&ic["ports"], "admin"), 8889);
    let ingester_text = find(&r, "ConfigMap", "tg-tailgate-config")["data"]["ingester.yaml"]
        .as_str()
        .unwrap();
    let ingester = RawIngesterConfig::from_yaml(ingester_text).unwrap();
    assert_eq!(ingester.rabbitmq.exchange, "tailgate.traces");
    assert!(config_text.contains("exchange: tailgate.traces"));
}

/// The config checksum on the pod template is the config file's: a config
/// change rolls the gateways, an edit of the rules does not (the rules are
/// hot-reloaded), and a different Secret rolls them too.
#[test]
fn config_checksum_rolls_pods_but_rules_edits_do_not() {
    let annotations = |r: &Value| {
        find(r, "Deployment", "tg-tailgate-gateway")["spec"]["template"]["metadata"]["annotations"]
            .clone()
    };
    let base = render(&[]);
    let config = find(&base, "ConfigMap", "tg-tailgate-config")["data"]["gateway.yaml"]
        .as_str()
        .unwrap();
    assert_eq!(
        annotations(&base)["checksum/config"],
        sha256(config.trim_end())
    );

    let wait = render(&["gateway:\n  config:\n    buffer:\n      decision_wait_secs: 7\n"]);
    assert_ne!(
        annotations(&wait)["checksum/config"],
        annotations(&base)["checksum/config"]
    );
    let text = find(&wait, "ConfigMap", "tg-tailgate-config")["data"]["gateway.yaml"]
        .as_str()
        .unwrap();
    let cfg = RawConfig::from_yaml(text).unwrap().validate().unwrap();
    assert_eq!(cfg.buffer.decision_wait.as_secs(), 7);
    assert_eq!(
        cfg.buffer.trace_timeout.as_secs(),
        30,
        "other defaults stay"
    );

    let rules =
        render(&["rules:\n  content: |\n    rules:\n      - name: all\n        action: keep\n"]);
    assert_eq!(annotations(&rules), annotations(&base));
    assert_ne!(
        find(&rules, "ConfigMap", "tg-tailgate-rules")["data"],
        find(&base, "ConfigMap", "tg-tailgate-rules")["data"]
    );

    let secret = render(&["connections:\n  clickhousePassword: s3cret\n"]);
    assert_ne!(
        annotations(&secret)["checksum/secret"],
        annotations(&base)["checksum/secret"]
    );
}

/// Autoscaling on: an HPA drives the gateway Deployment (which then has no
/// fixed replica count) on CPU and memory, scales down one pod at a time,
/// and the network policies admit OTLP only from the given namespaces and
/// the cluster port only from other gateways.
#[test]
fn autoscaling_and_network_policies() {
    let r = render(&["helm/tailgate/ci/autoscaling-values.yaml"]);
    let dep = find(&r, "Deployment", "tg-tailgate-gateway");
    assert!(dep["spec"].get("replicas").is_none());
    let hpa = find(&r, "HorizontalPodAutoscaler", "tg-tailgate-gateway");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "tg-tailgate-gateway");
    assert_eq!(hpa["spec"]["maxReplicas"], 20);
    let metrics: Vec<_> = hpa["spec"]["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["resource"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(metrics, ["cpu", "memory"]);
    assert_eq!(
        hpa["spec"]["behavior"]["scaleDown"]["policies"][0]["value"],
        1
    );
    let required = &dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
    assert_eq!(required[0]["topologyKey"], "kubernetes.io/hostname");

    let np = find(&r, "NetworkPolicy", "tg-tailgate-gateway");
    let rules = np["spec"]["ingress"].as_array().unwrap();
    assert_eq!(
        rules[0]["from"][0]["namespaceSelector"]["matchLabels"]["tailgate.io/sends-traces"],
        "true"
    );
    assert_eq!(rules[1]["ports"][0]["port"], "cluster");
    assert_eq!(
        rules[1]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "gateway"
    );
    find(&r, "NetworkPolicy", "tg-tailgate-ingester");
}

/// Existing Secret and rules ConfigMap: the chart creates neither, and the
/// pods use the named ones (and the rules key) instead.
#[test]
fn existing_secret_and_rules_config_map_are_used() {
    let r = render(&["helm/tailgate/ci/existing-secrets-values.yaml"]);
    let all = kinds(&r);
    assert!(!all.iter().any(|k| k.starts_with("Secret/")), "{all:?}");
    assert!(
        !all.contains(&"ConfigMap/tg-tailgate-rules".to_owned()),
        "{all:?}"
    );
    assert!(
        !all.iter().any(|k| k.starts_with("ServiceAccount/")),
        "{all:?}"
    );
    let dep = find(&r, "Deployment", "tg-tailgate-gateway");
    let c = container(dep, "gateway");
    assert_secret_files(
        dep,
        c,
        "tailgate-connections",
        &[("TAILGATE_RABBITMQ__URL_FILE", "rabbitmq-url")],
    );
    assert_eq!(c["image"], "ghcr.io/tailgate/tailgate:0.1.0-rc1");
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "tracing");
    let volume = named(&pod["volumes"], "rules");
    assert_eq!(volume["configMap"]["name"], "sre-sampling-rules");
    let annotations = &dep["spec"]["template"]["metadata"]["annotations"];
    assert!(annotations.get("checksum/secret").is_none());
    let text = find(&r, "ConfigMap", "tg-tailgate-config")["data"]["gateway.yaml"]
        .as_str()
        .unwrap();
    let cfg = RawConfig::from_yaml(text).unwrap().validate().unwrap();
    assert_eq!(
        cfg.rules.file.as_deref(),
        Some(Path::new("/etc/tailgate/rules/sampling.yaml"))
    );
    let ing = find(&r, "Deployment", "tg-tailgate-ingester");
    assert_secret_files(
        ing,
        container(ing, "ingester"),
        "tailgate-connections",
        &[("TAILGATE_CLICKHOUSE__PASSWORD_FILE", "clickhouse-password")],
    );
}

/// ServiceMonitor on: it selects the two metrics Services (gateway peers and
/// ingester) by label, and both name the port it scrapes.
#[test]
fn service_monitor_scrapes_gateways_and_ingesters() {
    let r = render(&["helm/tailgate/ci/servicemonitor-values.yaml"]);
    let sm = find(&r, "ServiceMonitor", "tg-tailgate");
    assert_eq!(sm["metadata"]["labels"]["release"], "kube-prometheus-stack");
    let selector = sm["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let port_name = sm["spec"]["endpoints"][0]["port"].as_str().unwrap();
    let scraped: Vec<_> = manifests(&r)
        .filter(|m| m["kind"] == "Service")
        .filter(|m| {
            selector
                .iter()
                .all(|(k, v)| &m["metadata"]["labels"][k] == v)
        })
        .collect();
    let names: Vec<_> = scraped
        .iter()
        .map(|s| s["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tg-tailgate-peers", "tg-tailgate-ingester"]);
    for s in scraped {
        assert!(port(&s["spec"]["ports"], port_name) > 0);
    }
    let dep = find(&r, "Deployment", "tg-tailgate-gateway");
    assert!(
        dep["spec"]["template"]["metadata"]["annotations"]
            .get("prometheus.io/scrape")
            .is_none()
    );
}

/// Bad values are refused before anything is deployed: wrong types and
/// unknown keys by values.schema.json, and settings that would break the
/// handoff or leave gateways without rules by the templates, with a message.
#[test]
fn bad_values_are_refused_with_a_message() {
    let wrong_type = render(&["gateway:\n  replicaCount: three\n"]);
    assert!(problems(&wrong_type).contains("gateway.replicaCount"));
    let typo = render(&["gatway:\n  replicaCount: 2\n"]);
    assert!(problems(&typo).contains("'gatway' was unexpected"));
    let bad_url = render(&["connections:\n  rabbitmqUrl: rabbitmq:5672\n"]);
    assert!(problems(&bad_url).contains("connections.rabbitmqUrl"));

    let short_grace = try_render(&["gateway:\n  terminationGracePeriodSeconds: 20\n"]).unwrap_err();
    assert!(
        short_grace.contains("must exceed gateway.shutdownGraceSecs"),
        "{short_grace}"
    );
    let no_rules = try_render(&["rules:\n  content: \"\"\n"]).unwrap_err();
    assert!(no_rules.contains("rules.content is required"), "{no_rules}");
}

/// Every value the chart has is documented in helm/tailgate/README.md's table.
#[test]
fn every_value_is_in_the_readme_table() {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<String>) {
        const LEAVES: [&str; 6] = [
            "gateway.config",
            "ingester.config",
            "gateway.resources",
            "ingester.resources",
            "podSecurityContext",
            "securityContext",
        ];
        match v.as_object() {
            Some(map) if !map.is_empty() && !LEAVES.contains(&prefix) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            _ => out.push(prefix.to_owned()),
        }
    }
    let mut keys = Vec::new();
    walk("", &render(&[])["values"], &mut keys);
    let readme = std::fs::read_to_string(chart().join("README.md")).unwrap();
    let missing: Vec<_> = keys
        .iter()
        .filter(|k| !readme.contains(&format!("| `{k}` |")))
        .collect();
    assert!(
        keys.len() > 60 && missing.is_empty(),
        "undocumented: {missing:?}"
    );
}

/// Journeys in the chart: the ingesters mount the rules ConfigMap and run
/// the stuck-journey finder on it, and the optional PrometheusRule alerts
/// on stuck journeys (max over ingesters, which all see the same tables)
/// with an annotation that says how to list and look them up.
#[test]
fn journeys_finder_and_alerts() {
    let r = render(&["helm/tailgate/ci/servicemonitor-values.yaml"]);
    assert_eq!(problems(&r), "");
    let config = find(&r, "ConfigMap", "tg-tailgate-config");
    let ingester: RawIngesterConfig =
        ConfigFile::from_yaml(config["data"]["ingester.yaml"].as_str().unwrap()).unwrap();
    let ingester = ingester.validate().unwrap();
    assert_eq!(
        ingester.journeys.rules_file.as_deref(),
        Some(Path::new("/etc/tailgate/rules/rules.yaml"))
    );
    assert_eq!(
        ingester.journeys.trace_link.as_deref(),
        Some("https://jaeger.example/trace/{trace_id}")
    );
    let dep = find(&r, "Deployment", "tg-tailgate-ingester");
    let mounts = &container(dep, "ingester")["volumeMounts"];
    assert_eq!(named(mounts, "rules")["mountPath"], "/etc/tailgate/rules");
    let volumes = &dep["spec"]["template"]["spec"]["volumes"];
    assert_eq!(
        named(volumes, "rules")["configMap"]["name"],
        "tg-tailgate-rules"
    );

    let rule = find(&r, "PrometheusRule", "tg-tailgate-journeys");
    assert_eq!(
        rule["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let alert = &rule["spec"]["groups"][0]["rules"][0];
    assert_eq!(alert["alert"], "TailgateJourneysStuck");
    assert_eq!(
        alert["expr"],
        "max by (journey, status) (tailgate_journeys_stuck) > 0"
    );
    let how = alert["annotations"]["description"].as_str().unwrap();
    assert!(
        how.contains("kubectl -n tracing exec deploy/tg-tailgate-ingester -- tailgate journey {{ $labels.journey }} --stuck"),
        "{how}"
    );

    // Without the finder: no rules mount, no journeys config, no alerts.
    let r = render(&[
        "helm/tailgate/ci/servicemonitor-values.yaml",
        "journeys:\n  finder: false\n",
    ]);
    assert!(manifests(&r).all(|m| m["kind"] != "PrometheusRule"));
    let config = find(&r, "ConfigMap", "tg-tailgate-config");
    assert!(
        !config["data"]["ingester.yaml"]
            .as_str()
            .unwrap()
            .contains("rules_file")
    );
}
