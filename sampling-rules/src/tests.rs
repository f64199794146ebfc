//! Tests of the rules language as an SRE writes it: every operator,
//! combinator, action, redaction and validation error, and the properties
//! that make decisions safe to spread over many nodes.

use crate::{Decision, RuleError, Rules, SecretRef, SpanRef, TraceId, TraceView};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::Event},
};
use proptest::prelude::*;
use std::time::{Duration, Instant};

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn s(v: &str) -> Value {
    Value::StringValue(v.into())
}

/// A trace as (resource, span) pairs.
#[derive(Clone)]
struct T(TraceId, Vec<(Resource, Span)>);

impl TraceView for T {
    fn trace_id(&self) -> TraceId {
        self.0
    }
    fn spans(&self) -> impl Iterator<Item = SpanRef<'_>> {
        self.1.iter().map(|(r, span)| SpanRef {
            resource: Some(r),
            scope: None,
            span,
        })
    }
}

fn resource(service: &str, env: &str) -> Resource {
    Resource {
        attributes: vec![
            kv("service.name", s(service)),
            kv("deployment.environment", s(env)),
        ],
        ..Default::default()
    }
}

/// Builds spans fluently: `sp(1, None).name("x").ms(0, 10)`.
fn sp(id: u8, parent: Option<u8>) -> Span {
    Span {
        trace_id: vec![7; 16],
        span_id: vec![id; 8],
        parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
        name: format!("span-{id}"),
        kind: 2,
        start_time_unix_nano: 1_000_000_000,
        end_time_unix_nano: 1_010_000_000,
        ..Default::default()
    }
}

trait SpanExt {
    fn name(self, n: &str) -> Span;
    fn ms(self, start: u64, end: u64) -> Span;
    fn attr(self, k: &str, v: Value) -> Span;
    fn error(self) -> Span;
    fn event(self, n: &str) -> Span;
}

impl SpanExt for Span {
    fn name(mut self, n: &str) -> Span {
        self.name = n.into();
        self
    }
    fn ms(mut self, start: u64, end: u64) -> Span {
        self.start_time_unix_nano = start * 1_000_000;
        self.end_time_unix_nano = end * 1_000_000;
        self
    }
    fn attr(mut self, k: &str, v: Value) -> Span {
        self.attributes.push(kv(k, v));
        self
    }
    fn error(mut self) -> Span {
        self.status = Some(Status {
            code: 2,
            message: "boom".into(),
        });
        self
    }
    fn event(mut self, n: &str) -> Span {
        self.events.push(Event {
            name: n.into(),
            ..Default::default()
        });
        self
    }
}

fn trace(spans: Vec<(&str, Span)>) -> T {
    T(
        TraceId([7; 16]),
        spans
            .into_iter()
            .map(|(svc, span)| (resource(svc, "production"), span))
            .collect(),
    )
}

/// The secrets a test's rules may refer to: `salt_env: SALT` is "pepper";
/// files are read for real.
fn env(secret: SecretRef<'_>) -> Result<String, String> {
    match secret {
        SecretRef::Env("SALT") => Ok("pepper".to_owned()),
        SecretRef::Env(var) => Err(format!("environment variable {var} is not set")),
        SecretRef::File(_) => secret.read(),
    }
}

fn rules(yaml: &str) -> Rules {
    Rules::from_yaml_with_secrets(yaml, "test.yaml", &env).unwrap_or_else(|e| panic!("{e}"))
}

fn errors(yaml: &str) -> Vec<RuleError> {
    Rules::from_yaml_with_secrets(yaml, "test.yaml", &env)
        .expect_err("should not compile")
        .errors
}

/// The rule that decided, or "drop:<rule>".
fn decide(r: &Rules, t: &T) -> String {
    match r.decide(t, Instant::now()) {
        Decision::Keep(k) => k.rule.to_string(),
        Decision::Drop { rule } => format!("drop:{rule}"),
    }
}

/// One rule `hit` with the given condition, then a catch-all drop.
fn when(condition: &str) -> Rules {
    rules(&format!(
        "rules:\n  - name: hit\n    when:\n{}\n    action: keep\n  - name: rest\n    action: drop\n",
        indent(condition, 6)
    ))
}

fn indent(text: &str, n: usize) -> String {
    text.lines()
        .map(|l| format!("{}{l}", " ".repeat(n)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn hits(condition: &str, t: &T) -> bool {
    decide(&when(condition), t) == "hit"
}

fn order(status: &str) -> T {
    trace(vec![
        (
            "shop-api",
            sp(1, None)
                .name("POST /orders")
                .ms(0, 300)
                .attr("order.id", s("ord-1"))
                .attr("http.status_code", Value::IntValue(201)),
        ),
        (
            "crm-api",
            sp(2, Some(1))
                .name("crm.create")
                .ms(10, 200)
                .attr("order.status", s(status))
                .attr("retries", Value::DoubleValue(1.5)),
        ),
        (
            "mes-api",
            sp(3, Some(2))
                .name("mes.price")
                .ms(20, 150)
                .attr("cached", Value::BoolValue(false))
                .event("price.calculated"),
        ),
    ])
}

/// `=` and `!=` on strings, integers, doubles and booleans; `!=` also holds where the field is missing.
#[test]
fn equality() {
    let t = order("PRICE_CALCULATED");
    assert!(hits("attributes.order.status: PRICE_CALCULATED", &t));
    assert!(hits(
        "attributes.order.status: { \"=\": PRICE_CALCULATED }",
        &t
    ));
    assert!(!hits("attributes.order.status: SHIPPED", &t));
    assert!(hits("attributes.http.status_code: 201", &t));
    assert!(hits("attributes.retries: 1.5", &t));
    assert!(hits("attributes.cached: false", &t));
    assert!(hits("service.name: { \"!=\": nobody }", &t));
    assert!(hits("attributes.missing: { \"!=\": x }", &t));
    assert!(!hits(
        "every_span:\n  service.name: { \"!=\": mes-api }",
        &t
    ));
}

/// `>`, `<`, `>=`, `<=` on numbers (integers against doubles too) and durations.
#[test]
fn ordering() {
    let t = order("x");
    assert!(hits(
        "attributes.http.status_code: { \">=\": 200, \"<\": 300 }",
        &t
    ));
    assert!(!hits("attributes.http.status_code: { \">\": 201 }", &t));
    assert!(hits("attributes.retries: { \"<=\": 2 }", &t));
    assert!(hits("trace.duration: { \">=\": 300ms }", &t));
    assert!(!hits("trace.duration: { \">\": 300ms }", &t));
    assert!(hits("span.duration: { \"<\": 1s }", &t));
    assert!(hits("trace.span_count: { \">\": 2 }", &t));
}

/// `in` / `not-in`, `exists` / `not-exists`, `starts-with`, `contains`,
/// `does-not-contain`, `matches`, and event names.
#[test]
fn set_existence_and_text_operators() {
    let t = order("MANUFACTURING_APPROVED");
    assert!(hits("service.name: { in: [mes-api, mes-db] }", &t));
    assert!(hits("root.service.name: { not-in: [crm-api] }", &t));
    assert!(!hits(
        "every_span:\n  service.name: { not-in: [crm-api] }",
        &t
    ));
    assert!(hits("attributes.order.id: exists", &t));
    assert!(hits("attributes.order.id: { exists: true }", &t));
    assert!(hits("attributes.user.email: not-exists", &t));
    assert!(!hits("every_span:\n  attributes.order.id: exists", &t));
    assert!(hits("span.name: { starts-with: POST }", &t));
    assert!(hits(
        "attributes.order.status: { contains: MANUFACTURING }",
        &t
    ));
    assert!(hits("root.span.name: { does-not-contain: healthz }", &t));
    assert!(hits(
        "attributes.order.status: { matches: \"^MANUFACTURING_(APPROVED|STARTED)$\" }",
        &t
    ));
    assert!(
        hits(
            "attributes.http.status_code: { matches: \"^2\\\\d\\\\d$\" }",
            &t
        ),
        "numbers match as text"
    );
    assert!(hits("event.name: price.calculated", &t));
    assert!(hits("event.name: { not-in: [refund] }", &t));
}

/// Built-in fields: status code, span kind, service, scope; trace facts.
#[test]
fn builtin_fields() {
    let mut t = order("x");
    assert!(hits("span.kind: SERVER", &t));
    assert!(!hits("span.kind: CLIENT", &t));
    assert!(hits("status.code: UNSET", &t));
    assert!(hits("trace.has_error: false", &t));
    assert!(hits("trace.has_root: true", &t));
    assert!(hits("resource.deployment.environment: production", &t));
    t.1[1].1.trace_state = "vendor=abc, ot=th:8".into();
    assert!(hits("trace_state.vendor: abc", &t));
    assert!(hits("trace_state.ot: { starts-with: \"th:\" }", &t));
    assert!(hits("trace_state.other: not-exists", &t));
    t.1[2].1 = t.1[2].1.clone().error();
    assert!(hits("status.code: error", &t));
    assert!(hits("status.message: boom", &t));
    assert!(hits("trace.has_error: true", &t));
    t.1.remove(0);
    assert!(hits("trace.has_root: false", &t));
    assert!(
        !hits("root.service.name: exists", &t),
        "root fields are false without a root"
    );
}

/// `all`, `any`, `not`, a mapping (implicit all), `any_span` (the same span) and `every_span`.
#[test]
fn combinators() {
    let t = order("x");
    assert!(hits(
        "any:\n  - service.name: nobody\n  - service.name: mes-api",
        &t
    ));
    assert!(!hits(
        "all:\n  - service.name: nobody\n  - service.name: mes-api",
        &t
    ));
    assert!(hits("not:\n  service.name: nobody", &t));
    assert!(
        hits("service.name: mes-api\nattributes.order.id: exists", &t),
        "different spans may satisfy a mapping"
    );
    assert!(
        !hits(
            "any_span:\n  service.name: mes-api\n  attributes.order.id: exists",
            &t
        ),
        "any_span needs one span to satisfy all"
    );
    assert!(hits(
        "any_span:\n  service.name: shop-api\n  attributes.order.id: exists",
        &t
    ));
    assert!(hits("every_span:\n  span.duration: { \"<\": 1s }", &t));
    assert!(hits(
        "not:\n  any:\n    - trace.has_error: true\n    - trace.span_count: { \">\": 10 }",
        &t
    ));
}

/// The first matching rule decides; nothing matching is a drop named `no-rule-matched`.
#[test]
fn first_match_and_no_match() {
    let r = rules(
        "rules:\n  - name: a\n    when: {service.name: mes-api}\n    action: keep\n  - name: b\n    when: {service.name: shop-api}\n    action: keep\n",
    );
    assert_eq!(decide(&r, &order("x")), "a");
    let none = trace(vec![("other", sp(1, None))]);
    assert_eq!(decide(&r, &none), "drop:no-rule-matched");
}

fn id(n: u64) -> TraceId {
    let mut b = [3u8; 16];
    b[8..].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
    TraceId(b)
}

fn with_id(t: &T, n: u64) -> T {
    T(id(n), t.1.clone())
}

/// `sample: {rate: N}` keeps 1 in N within binomial bounds, with adjusted count N.
#[test]
fn sample_rate() {
    let r = rules("rules:\n  - name: tenth\n    action: { sample: { rate: 10 } }\n");
    let base = order("x");
    let n = 10_000;
    let mut kept = 0;
    for i in 0..n {
        if let Decision::Keep(k) = r.decide(&with_id(&base, i), Instant::now()) {
            assert!((k.adjusted_count - 10.0).abs() < 0.01);
            assert!(k.threshold.is_some());
            kept += 1;
        }
    }
    // n·p = 1000, σ = 30: ±5σ.
    assert!((850..=1150).contains(&kept), "kept {kept}");
}

/// An order's trace (any ID) whose spans carry `order.id` = `order`.
fn order_with(order: &str, trace: u64) -> T {
    let t = trace_of_order(order);
    with_id(&t, trace)
}

fn trace_of_order(order: &str) -> T {
    trace(vec![
        ("shop-api", sp(1, None).attr("order.id", s(order))),
        ("crm-api", sp(2, Some(1)).attr("order.id", s(order))),
    ])
}

/// `sample: {rate: N, by: field}` decides by the field's value alone: every
/// trace of an order gets the order's answer, whatever its trace ID, so 1
/// in N orders is kept whole. Kept traces carry the threshold, adjusted
/// count N, and the key's randomness (for `rv`); a trace without the field
/// is sampled by its own randomness.
#[test]
fn sample_by_key() {
    let r = rules(
        "rules:
  - name: orders
    action: { sample: { rate: 10, by: attributes.order.id } }
",
    );
    let mut kept_orders = 0;
    for o in 0..2_000u64 {
        let order = format!("ord-{o}");
        let answers: Vec<Decision> = (0..5)
            .map(|t| r.decide(&order_with(&order, o * 100 + t), Instant::now()))
            .collect();
        assert!(
            answers.iter().all(|a| a.is_keep() == answers[0].is_keep()),
            "order {order}: its traces were decided differently"
        );
        if let Decision::Keep(k) = &answers[0] {
            kept_orders += 1;
            assert!((k.adjusted_count - 10.0).abs() < 0.01);
            let (th, rv) = (k.threshold.expect("a threshold"), k.randomness.expect("rv"));
            assert!(th.keeps(rv));
            assert_eq!(rv, crate::Randomness::of_key(&order));
        }
    }
    // n·p = 200, σ ≈ 13.4: ±5σ.
    assert!(
        (133..=267).contains(&kept_orders),
        "kept {kept_orders} orders"
    );
    // No key: the trace's own randomness, no explicit rv.
    let keyless = trace(vec![("shop-api", sp(1, None))]);
    let kept = (0..1_000)
        .filter_map(|i| match r.decide(&with_id(&keyless, i), Instant::now()) {
            Decision::Keep(k) => Some(k),
            Decision::Drop { .. } => None,
        })
        .inspect(|k| assert!(k.randomness.is_none()))
        .count();
    assert!((40..=160).contains(&kept), "kept {kept} keyless traces");
}

/// `by` names one span field; anything else is refused where it stands.
#[test]
fn sample_by_key_errors() {
    let e = errors(
        "rules:
  - name: orders
    action: { sample: { rate: 10, by: nonsense } }
",
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!((e[0].pos.line, e[0].pos.column), (3, 39), "{e:?}");
    assert!(e[0].message.contains("cannot be a sampling key"), "{e:?}");
    let e = errors(
        "rules:
  - name: orders
    action: { sample: { by: attributes.order.id } }
",
    );
    assert!(e[0].message.contains("needs a `rate`"), "{e:?}");
}

/// `rate_limit` keeps at most its budget per key per second, without a threshold.
#[test]
fn rate_limit_action() {
    let r = rules(
        "rules:\n  - name: limited\n    action: { rate_limit: { traces_per_sec: 3, key: [root.service.name] } }\n",
    );
    let now = Instant::now();
    let shop = order("x");
    let other = trace(vec![("billing", sp(1, None))]);
    let kept = (0..20)
        .filter(|i| r.decide(&with_id(&shop, *i), now).is_keep())
        .count();
    assert_eq!(kept, 3);
    assert!(
        r.decide(&with_id(&other, 99), now).is_keep(),
        "another key has its own budget"
    );
    let later = now + Duration::from_secs(1);
    match r.decide(&with_id(&shop, 100), later) {
        Decision::Keep(k) => {
            assert!(
                k.threshold.is_none(),
                "a rate limit is not consistent sampling"
            );
            assert!(k.adjusted_count >= 1.0);
        }
        Decision::Drop { .. } => panic!("budget refills after a second"),
    }
}

/// `throughput` keeps rare keys whole and thins busy ones toward the target.
#[test]
fn throughput_action() {
    let r = rules(
        "rules:\n  - name: even\n    action: { throughput: { target_per_sec: 5, key: [span.name] } }\n",
    );
    let busy = trace(vec![("shop-api", sp(1, None).name("GET /catalog"))]);
    let rare = trace(vec![("shop-api", sp(1, None).name("POST /orders"))]);
    let t0 = Instant::now();
    let mut busy_kept = 0;
    let mut rare_kept = 0;
    // 20 s of traffic: 500 busy traces a second, one rare trace a second.
    for i in 0..10_000u64 {
        let now = t0 + Duration::from_millis(i * 2);
        busy_kept += usize::from(r.decide(&with_id(&busy, i), now).is_keep());
        if i % 500 == 0 {
            rare_kept += usize::from(r.decide(&with_id(&rare, 1_000_000 + i), now).is_keep());
        }
    }
    assert_eq!(rare_kept, 20);
    // 5/s over 20 s is 100; the first window over-keeps while the rate is learnt.
    assert!((60..=600).contains(&busy_kept), "busy kept {busy_kept}");
}

/// The rule set is chosen by the resource attribute named in `select_set_by`;
/// traces of other environments get the default set.
#[test]
fn rule_sets() {
    let r = rules(
        "select_set_by: deployment.environment\nsets:\n  production:\n    - name: prod\n      action: keep\n  default:\n    - name: other\n      action: drop\n",
    );
    assert_eq!(decide(&r, &order("x")), "prod");
    let staging = T(
        TraceId([7; 16]),
        vec![(resource("shop-api", "staging"), sp(1, None))],
    );
    assert_eq!(decide(&r, &staging), "drop:other");
}

/// `case_insensitive: true` matches `User.Email` as `user.email`; a value
/// that is not a boolean, or an unknown value rule, is refused where it stands.
#[test]
fn redaction_case_insensitive() {
    let r = rules(
        "rules:\n  - name: all\n    action: keep\nredact:\n  case_insensitive: true\n  salt: s\n  hash: [User.Email]\n",
    );
    let mut attrs = vec![kv("user.EMAIL", s("anna@example.com"))];
    r.redaction().attributes(&mut attrs);
    assert!(
        matches!(&attrs[0].value, Some(AnyValue { value: Some(Value::StringValue(h)) }) if h.starts_with("sha256:")),
        "{attrs:?}"
    );
    let e = errors("rules:\n  - name: all\n    action: keep\nredact:\n  case_insensitive: 3\n");
    assert_eq!((e[0].pos.line, e[0].pos.column), (5, 21), "{e:?}");
    let e = errors("rules:\n  - name: all\n    action: keep\nredact:\n  values: [email, phone]\n");
    assert_eq!((e[0].pos.line, e[0].pos.column), (5, 19), "{e:?}");
    assert!(e[0].message.contains("unknown value rule `phone`"), "{e:?}");
}

/// The redact section removes, hashes (salted) and masks attributes of
/// spans, events and resources.
#[test]
fn redaction() {
    let r = rules(
        "rules:\n  - name: all\n    action: keep\nredact:\n  salt_env: SALT\n  remove: [payment.card_number]\n  hash: [user.email]\n  mask:\n    - key: user.phone\n      pattern: '\\d'\n      replacement: '#'\n",
    );
    let span = sp(1, None)
        .attr("payment.card_number", s("4111"))
        .attr("user.email", s("anna@example.com"))
        .attr("user.phone", s("+7 912"));
    let mut req = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("user.email", s("ops@example.com"))],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![span],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    r.redaction().apply(&mut req);
    let span = &req.resource_spans[0].scope_spans[0].spans[0];
    let get = |k: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key == k)
            .and_then(|kv| kv.value.clone()?.value)
    };
    assert_eq!(get("payment.card_number"), None);
    assert_eq!(get("user.phone"), Some(s("+# ###")));
    let Some(Value::StringValue(email)) = get("user.email") else {
        panic!("email gone")
    };
    assert!(email.starts_with("sha256:"), "{email}");
    let resource_email = &req.resource_spans[0].resource.as_ref().unwrap().attributes[0];
    assert_ne!(
        resource_email.value,
        Some(AnyValue {
            value: Some(s("ops@example.com"))
        })
    );
}

/// The hashed value of `user.email` under the rules' salt.
fn hashed_email(r: &Rules) -> Value {
    let mut req = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![sp(1, None).attr("user.email", s("anna@example.com"))],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    r.redaction().apply(&mut req);
    let attrs = &req.resource_spans[0].scope_spans[0].spans[0].attributes;
    attrs[0]
        .value
        .clone()
        .and_then(|v| v.value)
        .expect("hashed")
}

/// `salt_file` reads the salt from a file (a mounted Secret), without its
/// trailing line break: it hashes as the same salt given inline does. A
/// file that cannot be read, or is empty, is an error at the value's
/// `line:column` that names the file and never shows its content; giving
/// the salt twice is refused.
#[test]
fn salt_from_a_file() {
    let dir = std::env::temp_dir().join(format!("tailgate-salt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let salt = dir.join("salt");
    std::fs::write(&salt, "pepper\n").unwrap();
    let empty = dir.join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let yaml = |key: &str, value: &str| {
        format!(
            "rules:\n  - name: all\n    action: keep\nredact:\n  {key}: '{value}'\n  hash: [user.email]\n"
        )
    };
    let from_file = rules(&yaml("salt_file", &salt.display().to_string()));
    let inline = rules(&yaml("salt", "pepper"));
    let from_env = rules(&yaml("salt_env", "SALT"));
    assert_eq!(hashed_email(&from_file), hashed_email(&inline));
    assert_eq!(hashed_email(&from_file), hashed_email(&from_env));
    assert_ne!(
        hashed_email(&from_file),
        hashed_email(&rules(&yaml("salt", "other")))
    );

    let missing = dir.join("missing");
    for (path, text) in [(&missing, "cannot read"), (&empty, "is empty")] {
        let path = path.display().to_string();
        let e = errors(&yaml("salt_file", &path));
        assert_eq!((e[0].pos.line, e[0].pos.column), (5, 14), "{e:?}");
        assert!(e[0].message.contains(&path), "{e:?}");
        assert!(e[0].message.contains(text), "{e:?}");
    }
    std::fs::write(&salt, "pepper-secret-value").unwrap();
    let e = errors(&format!(
        "rules:\n  - name: all\n    action: keep\nredact:\n  salt_file: '{}'\n  salt_env: SALT\n  hash: [user.email]\n",
        salt.display()
    ));
    assert_eq!((e[0].pos.line, e[0].pos.column), (6, 3), "{e:?}");
    assert!(e[0].message.contains("both give the salt"), "{e:?}");
    assert!(!format!("{e:?}").contains("pepper-secret-value"), "{e:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Asserts one error at `line:column` whose message contains `text`.
fn assert_error(yaml: &str, line: u64, column: u64, text: &str) {
    let errs = errors(yaml);
    assert!(
        errs.iter()
            .any(|e| e.pos.line == line && e.pos.column == column && e.message.contains(text)),
        "no error {line}:{column} containing {text:?} in:\n{}",
        errs.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn validation_errors_name_line_and_column() {
    // Unknown key in a rule.
    assert_error(
        "rules:\n  - name: a\n    acton: keep\n",
        3,
        5,
        "unknown key `acton`",
    );
    // Unknown top-level key.
    assert_error("rule:\n  - name: a\n", 1, 1, "unknown key `rule`");
    // Wrong type: a number where a duration is needed.
    assert_error(
        "rules:\n  - name: a\n    when: { trace.duration: { \">\": 5 } }\n    action: keep\n",
        3,
        36,
        "not a valid value",
    );
    // Bad regex.
    assert_error(
        "rules:\n  - name: a\n    when:\n      span.name: { matches: \"(unclosed\" }\n    action: keep\n",
        4,
        29,
        "invalid regular expression",
    );
    // Unknown operator.
    assert_error(
        "rules:\n  - name: a\n    when:\n      span.name: { \"~=\": x }\n    action: keep\n",
        4,
        20,
        "unknown operator `~=`",
    );
    // Unknown field, with a hint for attributes.
    let errs = errors("rules:\n  - name: a\n    when:\n      order.id: exists\n    action: keep\n");
    assert_eq!((errs[0].pos.line, errs[0].pos.column), (4, 7));
    assert!(
        errs[0]
            .hint
            .as_deref()
            .unwrap_or("")
            .contains("attributes.order.id")
    );
    // Missing default set.
    assert_error(
        "select_set_by: deployment.environment\nsets:\n  production:\n    - name: a\n      action: keep\n",
        2,
        1,
        "no `default` set",
    );
    // A rule after a catch-all can never match.
    assert_error(
        "rules:\n  - name: all\n    action: keep\n  - name: errors\n    when: {trace.has_error: true}\n    action: keep\n",
        4,
        11,
        "can never match",
    );
    // Missing action, missing name, duplicate name.
    assert_error(
        "rules:\n  - name: a\n    when: {trace.has_error: true}\n",
        2,
        5,
        "needs an `action`",
    );
    assert_error("rules:\n  - action: keep\n", 2, 5, "needs a `name`");
    assert_error(
        "rules:\n  - name: a\n    when: {trace.has_error: true}\n    action: keep\n  - name: a\n    action: drop\n",
        5,
        11,
        "used twice",
    );
    // Wrong types elsewhere: a list instead of a mapping, an order on a boolean.
    assert_error(
        "rules:\n  - name: a\n    when: [x]\n    action: keep\n",
        3,
        11,
        "must be a mapping",
    );
    assert_error(
        "rules:\n  - name: a\n    when: { trace.has_error: { \">\": true } }\n    action: keep\n",
        3,
        32,
        "no order",
    );
    // Bad actions.
    assert_error(
        "rules:\n  - name: a\n    action: { sample: { rate: 0 } }\n",
        3,
        31,
        "at least 1",
    );
    assert_error(
        "rules:\n  - name: a\n    action: keeps\n",
        3,
        13,
        "not an action",
    );
    // Hash without a salt; salt_env naming an unset variable.
    assert_error(
        "rules:\n  - name: a\n    action: keep\nredact:\n  hash: [user.email]\n",
        5,
        3,
        "needs a salt",
    );
    assert_error(
        "rules:\n  - name: a\n    action: keep\nredact:\n  salt_env: NOPE\n  hash: [x]\n",
        5,
        13,
        "NOPE is not set",
    );
    // YAML syntax.
    let errs = errors("rules:\n  - name: [a\n");
    assert!(errs[0].pos.line >= 2, "{:?}", errs[0]);
}

/// Every error is reported, not only the first, as `file:line:column`.
#[test]
fn all_errors_are_reported_with_the_file() {
    let err = Rules::from_yaml_with_secrets(
        "rules:\n  - name: a\n    acton: keep\n  - name: b\n    when: { nope: 1 }\n    action: keep\n",
        "rules.yaml",
        &env,
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("rules.yaml:3:5: unknown key `acton`"),
        "{text}"
    );
    assert!(
        text.contains("rules.yaml:5:13: unknown field `nope`"),
        "{text}"
    );
    assert!(text.contains("hint:"), "{text}");
}

/// The shipped examples compile; the default example decides as the built-in policy does.
#[test]
fn examples_compile() {
    let default = rules(include_str!("../examples/default.yaml"));
    let pipeline = Rules::from_yaml_with_secrets(
        include_str!("../examples/order-pipeline.yaml"),
        "order-pipeline.yaml",
        &|s| match s {
            SecretRef::Env("TAILGATE_REDACT_SALT") => Ok("s".to_owned()),
            other => Err(format!("{other:?}")),
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(pipeline.len() > 8);
    let builtin = Rules::default_policy(
        Duration::from_secs(1),
        crate::Probability::new(0.05).unwrap(),
    );
    let slow = trace(vec![("shop-api", sp(1, None).ms(0, 1500))]);
    let failed = trace(vec![("shop-api", sp(1, None).error())]);
    for t in [&slow, &failed] {
        assert_eq!(decide(&default, t), decide(&builtin, t));
    }
    for n in 0..2000 {
        let t = with_id(&order("x"), n);
        assert_eq!(decide(&default, &t), decide(&builtin, &t), "trace {n}");
    }
}

fn arbitrary_trace() -> impl Strategy<Value = (u64, Vec<(u8, bool, u64, u8)>)> {
    // (trace number, spans as (service index, error, duration ms, kind))
    (
        any::<u64>(),
        prop::collection::vec((0u8..4, any::<bool>(), 0u64..3000, 0u8..6), 1..12),
    )
}

fn build(n: u64, spans: &[(u8, bool, u64, u8)]) -> T {
    const SERVICES: [&str; 4] = ["shop-api", "crm-api", "mes-api", "mes-db"];
    let spans = spans
        .iter()
        .enumerate()
        .map(|(i, (svc, err, dur, kind))| {
            let i = u8::try_from(i).unwrap_or(0) + 1;
            let mut span = sp(i, (i > 1).then_some(1))
                .ms(0, *dur)
                .attr("order.id", s("o"));
            span.kind = i32::from(*kind);
            if *err {
                span = span.error();
            }
            (resource(SERVICES[usize::from(*svc)], "production"), span)
        })
        .collect();
    T(id(n), spans)
}

const STATELESS: &str = "rules:
  - name: mes-errors
    when:
      any_span: { service.name: mes-api, status.code: ERROR }
    action: keep
  - name: slow
    when: { trace.duration: { \">=\": 1s } }
    action: { sample: { rate: 2 } }
  - name: servers
    when:
      every_span: { span.kind: { in: [SERVER, CLIENT] } }
    action: drop
  - name: rest
    action: { sample: { rate: 5 } }
";

proptest! {
    /// A trace's decision does not depend on the order its spans arrived in,
    /// nor on the node: a second, separately compiled copy of the rules agrees.
    #[test]
    fn decisions_ignore_arrival_order_and_node((n, spans) in arbitrary_trace(), seed in any::<u64>()) {
        let node_a = rules(STATELESS);
        let node_b = rules(STATELESS);
        let t = build(n, &spans);
        let mut shuffled = t.clone();
        // A deterministic permutation from the seed.
        let len = shuffled.1.len();
        for i in (1..len).rev() {
            let j = usize::try_from(seed.rotate_left(u32::try_from(i).unwrap_or(0)) % (i as u64 + 1)).unwrap_or(0);
            shuffled.1.swap(i, j);
        }
        prop_assert_eq!(node_a.decide(&t, Instant::now()), node_b.decide(&shuffled, Instant::now()));
    }

    /// `sample: {rate: N}` keeps 1 in N within binomial bounds for any N.
    #[test]
    fn sample_keeps_one_in_n(rate in 1u32..50, offset in any::<u64>()) {
        let r = rules(&format!("rules:\n  - name: s\n    action: {{ sample: {{ rate: {rate} }} }}\n"));
        let n = 4000u64;
        let base = order("x");
        let kept = (0..n).filter(|i| r.decide(&with_id(&base, offset.wrapping_add(*i)), Instant::now()).is_keep()).count();
        let p = 1.0 / f64::from(rate);
        let mean = n as f64 * p;
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        prop_assert!((kept as f64 - mean).abs() <= 5.0 * sd + 1.0, "rate {} kept {} expected {}", rate, kept, mean);
    }
}

/// The gateway skips decoding span attributes and events when no rule reads
/// them; every place a rule can name a span field is seen: conditions at
/// any depth, root conditions, per-key samplers' keys, and rule sets.
#[test]
fn reads_span_attributes_finds_every_place_a_field_is_named() {
    let default = Rules::default_policy(
        std::time::Duration::from_secs(5),
        crate::Probability::new(0.1).unwrap(),
    );
    assert!(!default.reads_span_attributes());
    assert!(!when("span.name: checkout\nspan.duration: { '>=': 1s }").reads_span_attributes());
    assert!(!when("root.status.message: { contains: timeout }").reads_span_attributes());
    assert!(when("not:\n  any:\n    - attributes.order.status: NEW").reads_span_attributes());
    assert!(when("root.event.name: exception").reads_span_attributes());
    assert!(rules(
        "rules:\n  - name: even\n    action: { throughput: { target_per_sec: 5, key: [attributes.order.status] } }\n"
    )
    .reads_span_attributes());
    assert!(!rules(
        "rules:\n  - name: even\n    action: { throughput: { target_per_sec: 5, key: [span.name] } }\n"
    )
    .reads_span_attributes());
    assert!(rules(
        "select_set_by: deployment.environment\nsets:\n  production:\n    - name: prod\n      when:\n        attributes.order.status: NEW\n      action: keep\n  default:\n    - name: other\n      action: drop\n"
    )
    .reads_span_attributes());
    // The benchmark's file exists to measure the full decode.
    assert!(
        rules(include_str!("../../benches/rules/order-attributes.yaml")).reads_span_attributes()
    );
}

proptest! {
    /// Fuzz, the rules file: any text, and the shipped example damaged at
    /// any byte, is refused with located errors or compiled, never a panic.
    #[test]
    fn fuzz_rules_files(
        text in ".{0,400}",
        at in any::<proptest::sample::Index>(),
        byte in any::<u8>(),
    ) {
        if let Err(e) = Rules::from_yaml(&text, "fuzz.yaml") {
            prop_assert!(!e.to_string().is_empty());
        }
        let mut example = include_bytes!("../examples/order-pipeline.yaml").to_vec();
        let at = at.index(example.len());
        example[at] = byte;
        if let Ok(text) = std::str::from_utf8(&example)
            && let Err(e) = Rules::from_yaml(text, "fuzz.yaml")
        {
            prop_assert!(e.to_string().contains("fuzz.yaml"), "{}", e);
        }
    }
}

const JOURNEYS: &str = "rules:
  - name: all
    action: keep
journeys:
  - name: order
    key: attributes.order.id
    status: attributes.order.status
    max_time_in_status:
      NEW: 5m
      PRICE_CALCULATED: 10m
      MANUFACTURING_STARTED: 8h
    default_max_time: 1h
    terminal: [SHIPPED, CANCELLED]
    capture: [attributes.messaging.destination.name, span.kind]
";

/// A journey reads its key, status and captured fields from one span: any
/// scalar key (an integer order ID becomes its text), no event without a key.
#[test]
fn journey_fields_of_a_span() {
    let r = rules(JOURNEYS);
    let [j] = r.journeys() else {
        panic!("one journey")
    };
    assert_eq!(j.name(), "order");
    assert_eq!(j.span_attribute_key(), Some("order.id"));
    let res = resource("crm", "production");
    let span = sp(1, None)
        .attr("order.id", Value::IntValue(4711))
        .attr("order.status", s("PRICE_CALCULATED"))
        .attr("messaging.destination.name", s("orders"));
    let at = |span: &Span| {
        j.event(&SpanRef {
            resource: Some(&res),
            scope: None,
            span,
        })
    };
    let f = at(&span).expect("the span carries the key");
    assert_eq!(f.key, "4711");
    assert_eq!(f.status, "PRICE_CALCULATED");
    assert_eq!(
        f.captured,
        [
            (
                "attributes.messaging.destination.name".to_owned(),
                "orders".to_owned()
            ),
            ("span.kind".to_owned(), "2".to_owned()),
        ]
    );
    let no_status = sp(2, None).attr("order.id", s("4712"));
    assert_eq!(at(&no_status).expect("key").status, "");
    assert_eq!(at(&sp(3, None).attr("order.status", s("NEW"))), None);
    assert_eq!(
        at(&sp(4, None).attr("order.id", s(""))),
        None,
        "an empty key is no key"
    );
    // Limits: listed, the default for the rest, none once terminal.
    assert_eq!(j.max_time_in("NEW"), Some(Duration::from_secs(300)));
    assert_eq!(j.max_time_in("PACKED"), Some(Duration::from_secs(3600)));
    assert_eq!(j.max_time_in("SHIPPED"), None);
    assert!(j.is_terminal("CANCELLED"));
    assert!(
        j.describe().contains("PRICE_CALCULATED 10m"),
        "{}",
        j.describe()
    );
}

/// A long value is cut at a character boundary, so one span cannot make
/// an event large.
#[test]
fn journey_values_are_bounded() {
    let r = rules(JOURNEYS);
    let res = resource("crm", "production");
    let long = "é".repeat(400);
    let span = sp(1, None).attr("order.id", s(&long));
    let f = r.journeys()[0]
        .event(&SpanRef {
            resource: Some(&res),
            scope: None,
            span: &span,
        })
        .expect("key");
    assert!(f.key.len() <= crate::MAX_VALUE_BYTES && f.key.len() >= crate::MAX_VALUE_BYTES - 1);
    assert!(long.starts_with(&f.key));
}

/// Every problem in a `journeys` section is reported at once, each at its
/// line and column.
#[test]
fn journey_errors() {
    let e = errors(
        "rules:
  - name: all
    action: keep
journeys:
  - name: order id
    key: span.name
    status: nonsense
    max_time_in_status:
      NEW: soon
      SHIPPED: 1h
    terminal: [SHIPPED]
    colour: blue
  - key: attributes.order.id
  - name: order
    key: attributes.order.id
  - name: order
    key: attributes.x
",
    );
    let at: Vec<(u64, u64, &str)> = e
        .iter()
        .map(|e| (e.pos.line, e.pos.column, e.message.as_str()))
        .collect();
    let has = |line: u64, column: u64, text: &str| {
        assert!(
            at.iter()
                .any(|(l, c, m)| *l == line && *c == column && m.contains(text)),
            "expected {line}:{column} `{text}` in {at:#?}"
        );
    };
    has(5, 11, "may hold only letters");
    has(6, 10, "cannot be a journey key");
    has(7, 13, "cannot be a journey status");
    has(9, 12, "must be a duration");
    has(10, 7, "has a limit but is terminal");
    has(12, 5, "unknown key `colour`");
    has(13, 5, "needs a `name`");
    has(16, 5, "used twice");
    assert_eq!(e.len(), 8, "{at:#?}");
    let e = errors(
        "rules:
  - name: all
    action: keep
journeys:
  - name: order
    key: attributes.order.id
    terminal: [DONE]
",
    );
    assert!(e[0].message.contains("need a `status` field"), "{e:?}");
}
