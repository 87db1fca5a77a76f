//! The expression subset: what compiles, what it gives, what is refused.

// Test helpers may unwrap: a failure here is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use proptest::prelude::*;

struct F;

/// The variables every test call has set.
fn variables() -> &'static [(&'static str, Value)] {
    static V: std::sync::OnceLock<Vec<(&'static str, Value)>> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        vec![
            ("tier", Value::Str("gold".into())),
            ("limit", Value::Int(40)),
            ("vip", Value::Bool(true)),
            ("none", Value::Null),
        ]
    })
}

impl Facts for F {
    fn member(&self, m: Member) -> Option<String> {
        match m {
            Member::SubscriptionId => Some("sub-1".into()),
            Member::RequestIpAddress => Some("10.0.0.1".into()),
            _ => None,
        }
    }
    fn status(&self) -> Option<u16> {
        Some(201)
    }
    fn header(&self, n: &str) -> Option<&str> {
        (n == "x-a").then_some("A")
    }
    fn query(&self, n: &str) -> Option<String> {
        (n == "q").then(|| "Q".into())
    }
    fn variable(&self, name: &str) -> Option<&Value> {
        variables().iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
    /// 2026-01-05T10:07:09.250Z, a Monday.
    fn now(&self) -> Option<i64> {
        Some(1_767_607_629_250)
    }
}

fn eval(src: &str) -> Value {
    compile(src).unwrap().0.eval(&F).unwrap()
}

#[test]
fn members_literals_and_operators() {
    assert_eq!(
        eval("@(context.Subscription.Id)"),
        Value::Str("sub-1".into())
    );
    assert_eq!(
        eval(
            r#"@(context.Request.Headers.GetValueOrDefault("X-A", "d") + "-" + context.Request.Url.Query.GetValueOrDefault("z", "dz"))"#
        ),
        Value::Str("A-dz".into())
    );
    assert_eq!(
        eval("@(context.Response.StatusCode >= 200 && context.Response.StatusCode < 300)"),
        Value::Bool(true)
    );
    assert_eq!(
        eval("@(!(1 + 2 == 3) || \"a\" != \"b\")"),
        Value::Bool(true)
    );
    assert_eq!(
        eval("@{ return context.Request.IpAddress; }"),
        Value::Str("10.0.0.1".into())
    );
    assert_eq!(eval("@(\"n\" + 5)"), Value::Str("n5".into()));
}

#[test]
fn null_owner_is_an_evaluation_error() {
    let (e, _) = compile("@(context.Product.Name)").unwrap();
    assert_eq!(e.eval(&F), Err(EvalError::Null("context.Product")));
}

#[test]
fn outside_the_subset_is_refused() {
    for (src, why) in [
        (
            "@(context.Variables[\"tier\"].ToLower())",
            "'.ToLower(...)' of object",
        ),
        (
            "@(context.Request.Headers[\"a\"])",
            "'context.Request.Headers' is not supported",
        ),
        (
            "@(context.Variables.GetValueOrDefault<JObject>(\"x\"))",
            "GetValueOrDefault<JObject>",
        ),
        ("@((int)\"1\")", "a cast of string to int"),
        ("@(\"a\".Split(','))", "Split(separator)[index]"),
        ("@(string.Format(\"{0:D2}\", 1))", "format item {0:D2}"),
        ("@(string.Format(\"{1}\", 1))", "refers to argument 1"),
        ("@(true ? 1 : \"a\")", "branches of '?:'"),
        ("@(1 ?? 2)", "does not apply"),
        ("@(context.Variables[\"limit\"] < 3)", "does not apply"),
        // Local time depends on the machine's zone: only UtcNow is given.
        ("@(DateTime.Now)", "'DateTime.Now'"),
        ("@(context.User.Email)", "'context.User.Email'"),
        ("@(1 < \"a\")", "does not apply"),
        ("@{ var x = 1; return x; }", "single 'return"),
        (
            "@(context.Request.Body.As<string>())",
            "'context.Request.Body.As'",
        ),
    ] {
        let err = compile(src).unwrap_err();
        assert!(err.contains(why), "{src}: {err}");
    }
}

/// `"a" + "a" + …` with `n` operators.
fn chain(n: usize) -> String {
    format!("@({})", vec!["\"a\""; n + 1].join(" + "))
}

/// `!` and parentheses `n` deep around `true`.
fn nested(n: usize) -> String {
    format!("@({}true{})", "!(".repeat(n / 2), ")".repeat(n / 2))
}

#[test]
fn limits_hold_at_their_values_and_refuse_just_past() {
    let (e, _) = compile(&chain(MAX_OPERATORS)).unwrap();
    assert_eq!(
        e.eval(&F).unwrap().into_text(),
        "a".repeat(MAX_OPERATORS + 1)
    );
    let past = compile(&chain(MAX_OPERATORS + 1)).unwrap_err();
    assert!(
        past.starts_with(OVER_LIMIT) && past.contains("more than 256 operators"),
        "{past}"
    );
    let (e, _) = compile(&nested(MAX_NESTING)).unwrap();
    assert_eq!(e.eval(&F).unwrap().into_text(), "True");
    let past = compile(&nested(MAX_NESTING + 2)).unwrap_err();
    assert!(
        past.starts_with(OVER_LIMIT) && past.contains("nested more than 32 deep"),
        "{past}"
    );
    // Thousands deep are refused as quickly, without recursing that deep.
    let deep = format!("@({}1{})", "(".repeat(50_000), ")".repeat(50_000));
    assert!(compile(&deep).unwrap_err().starts_with(OVER_LIMIT));
    let long = format!("@(\"{}\")", "x".repeat(MAX_EXPRESSION_BYTES));
    assert!(compile(&long).unwrap_err().contains("more than 16384"));
}

fn eval_err(src: &str) -> EvalError {
    compile(src).unwrap().0.eval(&F).unwrap_err()
}

fn text(src: &str) -> String {
    eval(src).into_text()
}

#[test]
fn variables_read_as_apim_reads_them() {
    assert_eq!(text(r#"@((string)context.Variables["tier"])"#), "gold");
    assert_eq!(
        eval(r#"@((int)context.Variables["limit"] + 2)"#),
        Value::Int(42)
    );
    assert_eq!(
        eval(r#"@((bool)context.Variables["vip"])"#),
        Value::Bool(true)
    );
    assert_eq!(
        eval(r#"@(context.Variables.GetValueOrDefault<int>("limit", 5) * 2)"#),
        Value::Int(80)
    );
    assert_eq!(
        eval(r#"@(context.Variables.GetValueOrDefault<int>("missing"))"#),
        Value::Int(0)
    );
    assert_eq!(
        eval(r#"@(context.Variables.GetValueOrDefault<string>("missing"))"#),
        Value::Null
    );
    assert_eq!(
        text(r#"@(context.Variables.GetValueOrDefault<string>("missing", "bronze"))"#),
        "bronze"
    );
    assert_eq!(
        eval(r#"@(context.Variables.GetValueOrDefault("tier") == "gold")"#),
        Value::Bool(true)
    );
    assert_eq!(
        eval(r#"@(context.Variables.ContainsKey("tier") && !context.Variables.ContainsKey("x"))"#),
        Value::Bool(true)
    );
    assert_eq!(
        eval(r#"@(context.Variables["none"] == null)"#),
        Value::Bool(true)
    );
    assert_eq!(
        eval(r#"@(context.Variables["tier"] == string.Empty)"#),
        Value::Bool(false)
    );
    assert_eq!(text(r#"@((string)context.Variables["none"] ?? "d")"#), "d");
    // APIM: "throws an exception if the specified type does not match the actual type".
    assert!(matches!(
        eval_err(r#"@(context.Variables.GetValueOrDefault<int>("tier"))"#),
        EvalError::Throw(_)
    ));
    assert!(matches!(
        eval_err(r#"@((int)context.Variables["tier"])"#),
        EvalError::Throw(_)
    ));
    assert!(matches!(
        eval_err(r#"@((string)context.Variables["unset"])"#),
        EvalError::Throw(_)
    ));
}

#[test]
fn string_methods_count_as_dotnet_does() {
    assert_eq!(
        eval(r#"@("Gold-Tier".StartsWith("gold", StringComparison.OrdinalIgnoreCase))"#),
        Value::Bool(true)
    );
    assert_eq!(
        eval(r#"@("Gold-Tier".StartsWith("gold"))"#),
        Value::Bool(false)
    );
    assert_eq!(
        eval(r#"@("abc".EndsWith("bc") && "abc".Contains("b"))"#),
        Value::Bool(true)
    );
    assert_eq!(
        eval(r#"@(context.Subscription.Id.Equals("SUB-1", StringComparison.OrdinalIgnoreCase))"#),
        Value::Bool(true)
    );
    assert_eq!(
        eval(r#"@(context.Subscription.Id.Equals("SUB-1"))"#),
        Value::Bool(false)
    );
    assert_eq!(
        text(r#"@("MiXed".ToLower() + "MiXed".ToUpperInvariant())"#),
        "mixedMIXED"
    );
    assert_eq!(text(r#"@("  a b ".Trim())"#), "a b");
    assert_eq!(text(r#"@("gateway".Substring(4))"#), "way");
    assert_eq!(text(r#"@("gateway".Substring(0, 4))"#), "gate");
    assert_eq!(eval(r#"@("héllo".Length)"#), Value::Int(5));
    // Length and Substring count UTF-16 units, as .NET does: an emoji is two.
    assert_eq!(eval(r#"@("a😀b".Length)"#), Value::Int(4));
    assert_eq!(text(r#"@("a😀b".Substring(3))"#), "b");
    assert_eq!(eval(r#"@("a😀b".IndexOf("b"))"#), Value::Int(3));
    assert_eq!(text(r#"@("a-b-c".Replace("-", "+"))"#), "a+b+c");
    assert_eq!(text(r#"@("k1.k2.k3".Split('.')[1])"#), "k2");
    assert_eq!(text(r#"@((5).ToString() + true.ToString())"#), "5True");
    assert!(matches!(
        eval_err(r#"@("abc".Substring(2, 5))"#),
        EvalError::Throw(_)
    ));
    assert!(matches!(
        eval_err(r#"@("a.b".Split('.')[2])"#),
        EvalError::Throw(_)
    ));
    assert_eq!(
        eval_err(r#"@(context.Variables.GetValueOrDefault<string>("none").ToLower())"#),
        EvalError::Null("the string a method is called on")
    );
}

#[test]
fn arithmetic_conditionals_and_formats() {
    assert_eq!(eval("@(7 / 2 + 7 % 2 * 10 - -1)"), Value::Int(14));
    assert_eq!(eval("@(-7 / 2)"), Value::Int(-3));
    assert_eq!(eval("@(2147483647 + 1)"), Value::Int(i32::MIN as i64));
    assert!(matches!(eval_err("@(1 / (2 - 2))"), EvalError::Throw(_)));
    assert_eq!(
        text(r#"@(context.Response.StatusCode >= 500 ? "bad" : "ok")"#),
        "ok"
    );
    assert_eq!(eval(r#"@(context.Response != null)"#), Value::Bool(true));
    assert_eq!(text(r#"@(true ? null : "x")"#), "");
    assert_eq!(eval(r#"@(int.Parse("41") + 1)"#), Value::Int(42));
    assert!(matches!(
        eval_err(r#"@(int.Parse("4x"))"#),
        EvalError::Throw(_)
    ));
    assert_eq!(
        text(r#"@(string.Format("{0}/{1}/{0}{{x}}", context.Subscription.Id, 3))"#),
        "sub-1/3/sub-1{x}"
    );
    assert_eq!(eval(r#"@(string.IsNullOrEmpty(""))"#), Value::Bool(true));
    assert_eq!(
        eval(r#"@(context.Request.Headers.ContainsKey("X-A"))"#),
        Value::Bool(true)
    );
    assert_eq!(
        eval(r#"@(context.Request.Url.Query.ContainsKey("q"))"#),
        Value::Bool(true)
    );
    assert_eq!(
        text(r#"@(context.Request.Headers.GetValueOrDefault("none", string.Empty) ?? "n")"#),
        ""
    );
}

proptest! {
    /// Any text compiles or is refused, and what compiles evaluates or fails: never a panic.
    #[test]
    fn arbitrary_text_never_panics(body in "[ -~]{0,80}") {
        if let Ok((e, _)) = compile(&format!("@({body})")) {
            let _ = e.eval(&F);
        }
    }

    /// Expressions built from the subset's own pieces compile, and evaluate without a panic.
    #[test]
    fn subset_pieces_never_panic(
        parts in proptest::collection::vec(prop_oneof![
            Just("context.Variables.GetValueOrDefault<int>(\"limit\")"),
            Just("(int)context.Variables[\"limit\"]"),
            Just("int.Parse(\"-3\")"),
            Just("\"abc\".Length"),
            Just("\"x\".IndexOf(\"y\")"),
            Just("0"),
            Just("-1"),
            Just("2147483647"),
        ], 1..6),
        ops in proptest::collection::vec(prop_oneof![
            Just("+"), Just("-"), Just("*"), Just("/"), Just("%")
        ], 5),
    ) {
        let mut src = String::from(parts[0]);
        for (p, op) in parts[1..].iter().zip(&ops) {
            src.push_str(op);
            src.push_str(p);
        }
        let (e, t) = compile(&format!("@({src})")).unwrap();
        prop_assert_eq!(t, Ty::Int);
        let _ = e.eval(&F);
    }
}

/// `DateTime.UtcNow` (SPEC §3a): the call's time in .NET's culture-invariant standard formats
/// (`o`, `s`, `u`, `R`), its parts, `Add*` of whole units, and comparisons; a DateTime is
/// never written without a format, since `ToString()` and `+` depend on the culture.
#[test]
fn utc_now_is_the_calls_time_in_dotnet_standard_formats() {
    let text = |src: &str| match eval(src) {
        Value::Str(s) => s,
        other => panic!("{src}: {other:?}"),
    };
    assert_eq!(
        text(r#"@(DateTime.UtcNow.ToString("o"))"#),
        "2026-01-05T10:07:09.2500000Z"
    );
    assert_eq!(
        text(r#"@(DateTime.UtcNow.ToString("s"))"#),
        "2026-01-05T10:07:09"
    );
    assert_eq!(
        text(r#"@(DateTime.UtcNow.ToString("u"))"#),
        "2026-01-05 10:07:09Z"
    );
    assert_eq!(
        text(r#"@(DateTime.UtcNow.ToString("R"))"#),
        "Mon, 05 Jan 2026 10:07:09 GMT"
    );
    assert_eq!(
        text(r#"@(DateTime.UtcNow.AddDays(-5).AddHours(1).ToString("r"))"#),
        "Wed, 31 Dec 2025 11:07:09 GMT"
    );
    assert_eq!(eval("@(DateTime.UtcNow.Year)"), Value::Int(2026));
    assert_eq!(
        eval("@(DateTime.UtcNow.Hour * 60 + DateTime.UtcNow.Minute)"),
        Value::Int(607)
    );
    assert_eq!(
        eval("@(DateTime.UtcNow.AddSeconds(1) > DateTime.UtcNow)"),
        Value::Bool(true)
    );
    assert_eq!(
        eval("@(DateTime.UtcNow == DateTime.UtcNow.AddMilliseconds(0))"),
        Value::Bool(true)
    );
    for (src, why) in [
        (
            "@(DateTime.UtcNow)",
            "a DateTime is written only through a format",
        ),
        ("@(DateTime.UtcNow.ToString())", "depends on the culture"),
        (
            r#"@("at " + DateTime.UtcNow)"#,
            "a DateTime is written only through a format",
        ),
        (
            r#"@(DateTime.UtcNow.ToString("yyyy"))"#,
            "DateTime format \"yyyy\" is not supported",
        ),
        (
            "@(DateTime.UtcNow.Ticks)",
            "'DateTime.Ticks' is not supported",
        ),
    ] {
        let e = compile(src).unwrap_err();
        assert!(e.contains(why), "{src}: {e}");
    }
}
