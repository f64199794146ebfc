//! The sampling rules file end to end: the `tailgate rules` commands on the
//! shipped examples, a gateway deciding and redacting by rules, and hot
//! reload, including a Kubernetes ConfigMap's symlink swap and a broken file.

// Test code reports failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use opentelemetry_proto::tonic::common::v1::any_value::Value;
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};
use support::{
    amqp_url,
    broker::TestQueue,
    gateway::Gateway,
    otlp::{self, hex, order_trace, trace_id},
};

const BIN: &str = env!("CARGO_BIN_EXE_tailgate");
const SALT: (&str, &str) = ("TAILGATE_REDACT_SALT", "test-salt");

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(support::unique(tag));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What the shipped example traces must get from the shipped pipeline rules:
/// trace number (byte 5 of the ID) → (decision, rule).
fn expected() -> BTreeMap<u8, (&'static str, &'static str)> {
    BTreeMap::from([
        (1, ("drop", "drop-health-checks")),
        (2, ("keep", "order-failed")),
        (3, ("keep", "order-status-failure")),
        (4, ("keep", "mes-slow")),
        (5, ("keep", "order-slow")),
        (6, ("keep", "incomplete")),
        (7, ("keep", "routine-orders")),
        (8, ("keep", "staging-errors")),
        (9, ("keep", "staging-rest")),
        (10, ("drop", "staging-rest")),
        (11, ("drop", "random")),
    ])
}

fn trace_number(trace_hex: &str) -> u8 {
    u8::from_str_radix(&trace_hex[10..12], 16).unwrap()
}

/// `rules check` passes the shipped examples and the benchmark's file, and
/// reports every error of a broken file with file:line:column; `rules test` gives the expected
/// decision, rule and adjusted count for each shipped example trace.
#[test]
fn rules_check_and_test_commands() {
    for example in [
        "sampling-rules/examples/default.yaml",
        "sampling-rules/examples/order-pipeline.yaml",
        "sampling-rules/examples/order-journeys.yaml",
        "benches/rules/order-attributes.yaml",
        "benches/rules/default-policy.yaml",
        "benches/rules/default-policy-journeys.yaml",
    ] {
        let out = Command::new(BIN)
            .args(["rules", "check"])
            .arg(repo(example))
            .env(SALT.0, SALT.1)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{example}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok,"));
    }

    let dir = scratch("rules-check");
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "rules:\n  - name: a\n    when: {span.name: {matches: \"(x\"}}\n    action: keep\n  - name: b\n    acton: drop\n").unwrap();
    let out = Command::new(BIN)
        .args(["rules", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let at = |line_col: &str| format!("{}:{line_col}:", bad.display());
    assert!(
        stderr.contains(&at("3:33")),
        "regex error located: {stderr}"
    );
    assert!(stderr.contains(&at("6:5")), "unknown key located: {stderr}");
    assert!(stderr.contains("hint:"), "{stderr}");

    let out = Command::new(BIN)
        .args(["rules", "test"])
        .arg(repo("sampling-rules/examples/order-pipeline.yaml"))
        .arg("--traces")
        .arg(repo("sampling-rules/examples/traces/order-pipeline.json"))
        .env(SALT.0, SALT.1)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut got = BTreeMap::new();
    for line in stdout.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        got.insert(
            trace_number(cols[0]),
            (cols[1].to_owned(), cols[2].to_owned(), cols[3].to_owned()),
        );
    }
    for (n, (decision, rule)) in expected() {
        let (d, r, adjusted) = &got[&n];
        assert_eq!(
            (d.as_str(), r.as_str()),
            (decision, rule),
            "trace {n}:\n{stdout}"
        );
        let want = match rule {
            "staging-rest" if decision == "keep" => "2",
            _ if decision == "keep" => "1",
            _ => "-",
        };
        assert_eq!(adjusted, want, "adjusted count of trace {n}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A gateway running the shipped pipeline rules keeps and drops the example
/// traces as `rules test` says, tags kept spans with their rule, and hashes
/// `user.email` before it leaves the gateway.
#[tokio::test(flavor = "multi_thread")]
async fn gateway_decides_by_rules_and_redacts() {
    let mut q = TestQueue::new("rules-gw").await;
    let rules = repo("sampling-rules/examples/order-pipeline.yaml");
    let gw = Gateway::start(
        &amqp_url(),
        &q.exchange,
        &[
            ("TAILGATE_RULES__FILE", rules.to_str().unwrap()),
            ("TAILGATE_BUFFER__TRACE_TIMEOUT_SECS", "1"),
            SALT,
        ],
    );
    let json = std::fs::read(repo("sampling-rules/examples/traces/order-pipeline.json")).unwrap();
    let resp = reqwest::Client::new()
        .post(gw.http_url())
        .header("content-type", "application/json")
        .body(json)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let want_kept: BTreeMap<u8, &str> = expected()
        .into_iter()
        .filter(|(_, (d, _))| *d == "keep")
        .map(|(n, (_, r))| (n, r))
        .collect();
    let mut got = BTreeMap::new();
    for m in q.take(want_kept.len()).await {
        for span in m.spans() {
            let rule = span
                .attributes
                .iter()
                .find(|kv| kv.key == "sampling.rule")
                .and_then(|kv| kv.value.clone()?.value);
            assert_eq!(
                rule,
                Some(Value::StringValue(m.header("sampling_rule").unwrap()))
            );
            if let Some(email) = span.attributes.iter().find(|kv| kv.key == "user.email") {
                let Some(Value::StringValue(v)) = email.value.clone().and_then(|v| v.value) else {
                    panic!()
                };
                assert!(
                    v.starts_with("sha256:") && !v.contains("anna"),
                    "user.email not redacted: {v}"
                );
            }
        }
        got.insert(
            trace_number(&m.trace_id()),
            m.header("sampling_rule").unwrap(),
        );
    }
    let got: BTreeMap<u8, &str> = got.iter().map(|(n, r)| (*n, r.as_str())).collect();
    assert_eq!(got, want_kept);
    gw.wait_metric("tailgate_traces_decided_total", &[], 11.0)
        .await;
    assert_eq!(
        gw.metric(
            "tailgate_traces_decided_total",
            &[("rule", "drop-health-checks")]
        )
        .await,
        1.0
    );
    q.delete().await;
}

/// Writes a rules version into a fresh `..<name>` directory and points the
/// `..data` symlink at it atomically, as the kubelet updates a ConfigMap volume.
fn publish_version(dir: &Path, name: &str, text: &str) {
    let version = dir.join(format!("..{name}"));
    std::fs::create_dir_all(&version).unwrap();
    std::fs::write(version.join("rules.yaml"), text).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{name}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

fn keep_all(rule: &str) -> String {
    format!("rules:\n  - name: {rule}\n    action: keep\n")
}

/// A new rules version is picked up without a restart (through a ConfigMap
/// symlink swap); a broken version is refused, counted, and the previous
/// rules stay in force; the rules hash gauge follows the rules in force.
#[tokio::test(flavor = "multi_thread")]
async fn rules_hot_reload() {
    let mut q = TestQueue::new("reload").await;
    let dir = scratch("reload");
    publish_version(&dir, "v1", &keep_all("v1"));
    std::os::unix::fs::symlink("..data/rules.yaml", dir.join("rules.yaml")).unwrap();
    let file = dir.join("rules.yaml");
    let gw = Gateway::start(
        &amqp_url(),
        &q.exchange,
        &[
            ("TAILGATE_RULES__FILE", file.to_str().unwrap()),
            ("TAILGATE_RULES__CHECK_INTERVAL_SECS", "0.05"),
        ],
    );
    let send = |n: u64| {
        let url = gw.grpc_url();
        async move {
            otlp::send_grpc(&url, otlp::request(&order_trace(trace_id(55, n), 5, None)))
                .await
                .unwrap();
            hex(&trace_id(55, n))
        }
    };
    let rule_of = |m: &support::broker::Received| m.header("sampling_rule").unwrap();

    let a = send(1).await;
    let m = q.next().await.unwrap();
    assert_eq!((m.trace_id(), rule_of(&m)), (a, "v1".to_owned()));
    let hash_v1 = gw.metric("tailgate_rules_hash", &[]).await;

    publish_version(&dir, "v2", &keep_all("v2"));
    gw.wait_metric("tailgate_rules_reloads_total", &[], 1.0)
        .await;
    assert_ne!(gw.metric("tailgate_rules_hash", &[]).await, hash_v1);
    let b = send(2).await;
    let m = q.next().await.unwrap();
    assert_eq!((m.trace_id(), rule_of(&m)), (b, "v2".to_owned()));

    publish_version(&dir, "v3", "rules:\n  - name: v3\n    action: kep\n");
    gw.wait_metric("tailgate_rules_reload_failures_total", &[], 1.0)
        .await;
    let c = send(3).await;
    let m = q.next().await.unwrap();
    assert_eq!(
        (m.trace_id(), rule_of(&m)),
        (c, "v2".to_owned()),
        "the previous rules stay in force"
    );
    assert!(
        gw.logs().contains("rules.yaml:3:13"),
        "the refused file's error is logged with its location"
    );
    assert_eq!(gw.metric("tailgate_rules_reloads_total", &[]).await, 1.0);
    q.delete().await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// A gateway refuses to start on a broken rules file, naming the problem.
#[test]
fn gateway_refuses_broken_rules_at_start() {
    let dir = scratch("refuse");
    let file = dir.join("rules.yaml");
    std::fs::write(
        &file,
        "rules:\n  - name: x\n    when: {trace.duration: {\">\": 5}}\n    action: keep\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["gateway", "--check-config"])
        .env("TAILGATE_RULES__FILE", &file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rules.yaml:3:34"), "{stderr}");
    assert!(stderr.contains("1500ms"), "hint about durations: {stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}
