//! The policy-expression subset the edge evaluates: APIM's C# `@(...)` (and `@{ return ...; }`)
//! limited to the context members, literals and operators listed in SPEC §3. Expressions are
//! parsed and type-checked once, at load time; anything outside the subset is a load error
//! that quotes the expression. Evaluation works on a [`Facts`] view of the call.

use std::fmt;

/// A member of `context` that an expression may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Member {
    SubscriptionId,
    SubscriptionName,
    SubscriptionKey,
    ProductId,
    ProductName,
    ApiId,
    ApiName,
    ApiPath,
    OperationId,
    OperationName,
    OperationMethod,
    RequestIpAddress,
    RequestMethod,
    RequestUrlPath,
    ResponseStatusCode,
}

impl Member {
    fn from_path(path: &str) -> Option<Member> {
        use Member::*;
        Some(match path {
            "context.Subscription.Id" => SubscriptionId,
            "context.Subscription.Name" => SubscriptionName,
            "context.Subscription.Key" => SubscriptionKey,
            "context.Product.Id" => ProductId,
            "context.Product.Name" => ProductName,
            "context.Api.Id" => ApiId,
            "context.Api.Name" => ApiName,
            "context.Api.Path" => ApiPath,
            "context.Operation.Id" => OperationId,
            "context.Operation.Name" => OperationName,
            "context.Operation.Method" => OperationMethod,
            "context.Request.IpAddress" => RequestIpAddress,
            "context.Request.Method" => RequestMethod,
            "context.Request.Url.Path" => RequestUrlPath,
            "context.Response.StatusCode" => ResponseStatusCode,
            _ => return None,
        })
    }

    fn ty(self) -> Ty {
        if self == Member::ResponseStatusCode {
            Ty::Int
        } else {
            Ty::Str
        }
    }

    /// The object that is null when this member has nothing to read (`context.Subscription`).
    pub fn owner(self) -> &'static str {
        use Member::*;
        match self {
            SubscriptionId | SubscriptionName | SubscriptionKey => "context.Subscription",
            ProductId | ProductName => "context.Product",
            ApiId | ApiName | ApiPath => "context.Api",
            OperationId | OperationName | OperationMethod => "context.Operation",
            RequestIpAddress | RequestMethod | RequestUrlPath => "context.Request",
            ResponseStatusCode => "context.Response",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    Str,
    Int,
    Bool,
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ty::Str => "string",
            Ty::Int => "int",
            Ty::Bool => "bool",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Add,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

/// A compiled expression.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr {
    Str(String),
    Int(i64),
    Bool(bool),
    Member(Member),
    /// `context.Request.Headers.GetValueOrDefault(name, default)`; name lower-cased.
    Header(String, String),
    /// `context.Request.Url.Query.GetValueOrDefault(name, default)`.
    Query(String, String),
    Not(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
}

/// A value of an expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl Value {
    /// The value as text, as `ToString()` gives it; a string is moved, not copied.
    pub fn into_text(self) -> String {
        match self {
            Value::Str(s) => s,
            other => other.to_string(),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) => f.write_str(s),
            Value::Int(i) => write!(f, "{i}"),
            // C#'s bool.ToString().
            Value::Bool(b) => f.write_str(if *b { "True" } else { "False" }),
        }
    }
}

/// What an expression can see of a call.
pub(crate) trait Facts {
    /// A member's value; `None` when its owner is null (no subscription, no response yet...).
    fn member(&self, m: Member) -> Option<String>;
    fn status(&self) -> Option<u16>;
    fn header(&self, lower_name: &str) -> Option<&str>;
    fn query(&self, name: &str) -> Option<String>;
}

/// Evaluation failed: the expression read a member of a null object, as APIM's would throw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NullReference(pub &'static str);

impl Expr {
    pub fn eval(&self, facts: &dyn Facts) -> Result<Value, NullReference> {
        Ok(match self {
            Expr::Str(s) => Value::Str(s.clone()),
            Expr::Int(i) => Value::Int(*i),
            Expr::Bool(b) => Value::Bool(*b),
            Expr::Member(Member::ResponseStatusCode) => {
                Value::Int(facts.status().ok_or(NullReference("context.Response"))? as i64)
            }
            Expr::Member(m) => Value::Str(facts.member(*m).ok_or(NullReference(m.owner()))?),
            Expr::Header(n, d) => Value::Str(facts.header(n).unwrap_or(d).to_string()),
            Expr::Query(n, d) => Value::Str(facts.query(n).unwrap_or_else(|| d.clone())),
            Expr::Not(e) => Value::Bool(!e.eval(facts)?.truthy()),
            Expr::Binary(op, l, r) => {
                if *op == BinOp::And {
                    return Ok(Value::Bool(
                        l.eval(facts)?.truthy() && r.eval(facts)?.truthy(),
                    ));
                }
                if *op == BinOp::Or {
                    return Ok(Value::Bool(
                        l.eval(facts)?.truthy() || r.eval(facts)?.truthy(),
                    ));
                }
                let (a, b) = (l.eval(facts)?, r.eval(facts)?);
                match (op, &a, &b) {
                    (BinOp::Add, Value::Int(x), Value::Int(y)) => Value::Int(x.wrapping_add(*y)),
                    (BinOp::Add, _, _) => Value::Str(format!("{a}{b}")),
                    (BinOp::Eq, _, _) => Value::Bool(a == b),
                    (BinOp::Ne, _, _) => Value::Bool(a != b),
                    (_, Value::Int(x), Value::Int(y)) => Value::Bool(match op {
                        BinOp::Lt => x < y,
                        BinOp::Le => x <= y,
                        BinOp::Gt => x > y,
                        _ => x >= y,
                    }),
                    // Type checking at load time rules this out.
                    _ => Value::Bool(false),
                }
            }
        })
    }
}

impl Value {
    fn truthy(&self) -> bool {
        matches!(self, Value::Bool(true))
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Int(i64),
    Punct(&'static str),
}

fn tokenize(src: &str) -> Result<Vec<Tok>, String> {
    const PUNCT: [&str; 16] = [
        "&&", "||", "==", "!=", "<=", ">=", "<", ">", "!", "+", "(", ")", ".", ",", ";", "{",
    ];
    let b = src.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    'outer: while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'"' {
            let mut s = String::new();
            let mut j = i + 1;
            loop {
                let Some(&d) = b.get(j) else {
                    return Err("unterminated string literal".into());
                };
                match d {
                    b'"' => break,
                    b'\\' => {
                        let e = *b.get(j + 1).ok_or("unterminated string literal")?;
                        s.push(match e {
                            b'n' => '\n',
                            b't' => '\t',
                            b'r' => '\r',
                            b'0' => '\0',
                            b'\\' | b'"' | b'\'' => e as char,
                            _ => return Err(format!("unsupported escape \\{}", e as char)),
                        });
                        j += 2;
                    }
                    _ => {
                        let ch = src[j..].chars().next().ok_or("bad character")?;
                        s.push(ch);
                        j += ch.len_utf8();
                    }
                }
            }
            out.push(Tok::Str(s));
            i = j + 1;
            continue;
        }
        if c.is_ascii_digit() {
            let j = i + b[i..].iter().take_while(|d| d.is_ascii_digit()).count();
            let n = src[i..j]
                .parse()
                .map_err(|_| format!("integer literal {} is out of range", &src[i..j]))?;
            out.push(Tok::Int(n));
            i = j;
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            let j = i + b[i..]
                .iter()
                .take_while(|d| d.is_ascii_alphanumeric() || **d == b'_')
                .count();
            out.push(Tok::Ident(src[i..j].to_string()));
            i = j;
            continue;
        }
        for p in PUNCT {
            if src[i..].starts_with(p) {
                out.push(Tok::Punct(p));
                i += p.len();
                continue 'outer;
            }
        }
        if c == b'}' {
            out.push(Tok::Punct("}"));
            i += 1;
            continue;
        }
        let ch = src[i..].chars().next().unwrap_or('?');
        return Err(format!("'{ch}' is not supported"));
    }
    Ok(out)
}

/// The longest expression compiled, in bytes.
pub(crate) const MAX_EXPRESSION_BYTES: usize = 16 * 1024;

/// The most binary operators one expression may hold, and the deepest its parentheses and `!`
/// may nest. Together they bound the compiled tree's depth, so that compiling, evaluating and
/// dropping it recurse a bounded number of times in any stack (wasmtime's, V8's, a thread's).
pub(crate) const MAX_OPERATORS: usize = 256;
pub(crate) const MAX_NESTING: usize = 32;

/// What a fault over one of the limits above starts with: such an expression is refused in
/// every mode (it is too large to run safely), where one outside the subset may be skipped.
pub(crate) const OVER_LIMIT: &str = "over the edge's limits: ";

struct Parser {
    toks: Vec<Tok>,
    i: usize,
    /// Binary operators read so far.
    operators: usize,
    /// Parentheses and `!` open around the token being read.
    nesting: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.i)
    }
    fn eat(&mut self, p: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Punct(q)) if *q == p) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, p: &str) -> Result<(), String> {
        if self.eat(p) {
            Ok(())
        } else {
            Err(format!("expected '{p}'"))
        }
    }

    fn binary(
        &mut self,
        ops: &[(&'static str, BinOp)],
        next: fn(&mut Self) -> Result<(Expr, Ty), String>,
    ) -> Result<(Expr, Ty), String> {
        let mut left = next(self)?;
        'again: loop {
            for (p, op) in ops {
                if self.eat(p) {
                    self.operators += 1;
                    if self.operators > MAX_OPERATORS {
                        return Err(format!(
                            "{OVER_LIMIT}more than {MAX_OPERATORS} operators in one expression"
                        ));
                    }
                    let right = next(self)?;
                    left = typed(*op, left, right)?;
                    continue 'again;
                }
            }
            return Ok(left);
        }
    }

    fn or(&mut self) -> Result<(Expr, Ty), String> {
        self.binary(&[("||", BinOp::Or)], Self::and)
    }
    fn and(&mut self) -> Result<(Expr, Ty), String> {
        self.binary(&[("&&", BinOp::And)], Self::equality)
    }
    fn equality(&mut self) -> Result<(Expr, Ty), String> {
        self.binary(&[("==", BinOp::Eq), ("!=", BinOp::Ne)], Self::relation)
    }
    fn relation(&mut self) -> Result<(Expr, Ty), String> {
        self.binary(
            &[
                ("<=", BinOp::Le),
                (">=", BinOp::Ge),
                ("<", BinOp::Lt),
                (">", BinOp::Gt),
            ],
            Self::sum,
        )
    }
    fn sum(&mut self) -> Result<(Expr, Ty), String> {
        self.binary(&[("+", BinOp::Add)], Self::unary)
    }
    /// Enters a parenthesis or a `!`: an error past [`MAX_NESTING`].
    fn nest(&mut self) -> Result<(), String> {
        self.nesting += 1;
        if self.nesting > MAX_NESTING {
            return Err(format!(
                "{OVER_LIMIT}parentheses and '!' nested more than {MAX_NESTING} deep"
            ));
        }
        Ok(())
    }

    fn unary(&mut self) -> Result<(Expr, Ty), String> {
        if self.eat("!") {
            self.nest()?;
            let (e, t) = self.unary()?;
            self.nesting -= 1;
            if t != Ty::Bool {
                return Err(format!("'!' needs a bool, not {t}"));
            }
            return Ok((Expr::Not(Box::new(e)), Ty::Bool));
        }
        self.primary()
    }

    fn string_arg(&mut self) -> Result<String, String> {
        match self.toks.get(self.i).cloned() {
            Some(Tok::Str(s)) => {
                self.i += 1;
                Ok(s)
            }
            _ => Err("expected a string literal argument".into()),
        }
    }

    fn primary(&mut self) -> Result<(Expr, Ty), String> {
        let tok = self.toks.get(self.i).cloned().ok_or("unexpected end")?;
        self.i += 1;
        match tok {
            Tok::Str(s) => Ok((Expr::Str(s), Ty::Str)),
            Tok::Int(n) => Ok((Expr::Int(n), Ty::Int)),
            Tok::Punct("(") => {
                self.nest()?;
                let e = self.or()?;
                self.expect(")")?;
                self.nesting -= 1;
                Ok(e)
            }
            Tok::Ident(w) if w == "true" || w == "false" => Ok((Expr::Bool(w == "true"), Ty::Bool)),
            Tok::Ident(first) => {
                let mut path = first;
                while self.eat(".") {
                    match self.toks.get(self.i).cloned() {
                        Some(Tok::Ident(n)) => {
                            self.i += 1;
                            path.push('.');
                            path.push_str(&n);
                        }
                        _ => return Err("expected a member name after '.'".into()),
                    }
                }
                if self.eat("(") {
                    let name = self.string_arg()?;
                    let default = if self.eat(",") {
                        self.string_arg()?
                    } else {
                        String::new()
                    };
                    self.expect(")")?;
                    return match path.as_str() {
                        "context.Request.Headers.GetValueOrDefault" => {
                            Ok((Expr::Header(name.to_ascii_lowercase(), default), Ty::Str))
                        }
                        "context.Request.Url.Query.GetValueOrDefault" => {
                            Ok((Expr::Query(name, default), Ty::Str))
                        }
                        _ => Err(format!("'{path}(...)' is not supported at the edge")),
                    };
                }
                let m = Member::from_path(&path)
                    .ok_or_else(|| format!("'{path}' is not supported at the edge"))?;
                Ok((Expr::Member(m), m.ty()))
            }
            Tok::Punct(p) => Err(format!("unexpected '{p}'")),
        }
    }
}

fn typed(op: BinOp, (l, lt): (Expr, Ty), (r, rt): (Expr, Ty)) -> Result<(Expr, Ty), String> {
    let ty = match op {
        BinOp::Add if lt == Ty::Int && rt == Ty::Int => Ty::Int,
        BinOp::Add if lt == Ty::Str || rt == Ty::Str => Ty::Str,
        BinOp::Eq | BinOp::Ne if lt == rt => Ty::Bool,
        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge if lt == Ty::Int && rt == Ty::Int => Ty::Bool,
        BinOp::And | BinOp::Or if lt == Ty::Bool && rt == Ty::Bool => Ty::Bool,
        _ => return Err(format!("operator {op:?} does not apply to {lt} and {rt}")),
    };
    Ok((Expr::Binary(op, Box::new(l), Box::new(r)), ty))
}

/// Does this text hold a policy expression?
pub(crate) fn is_expression(text: &str) -> bool {
    let t = text.trim_start();
    t.starts_with("@(") || t.starts_with("@{")
}

/// Compiles `@(expr)` or `@{ return expr; }`. The error names what is outside the subset; the
/// caller quotes the expression.
pub(crate) fn compile(text: &str) -> Result<(Expr, Ty), String> {
    let t = text.trim();
    let (body, block) = if let Some(b) = t.strip_prefix("@(").and_then(|b| b.strip_suffix(')')) {
        (b, false)
    } else if let Some(b) = t.strip_prefix("@{").and_then(|b| b.strip_suffix('}')) {
        (b, true)
    } else {
        return Err("an expression must be the whole value: @(...) or @{...}".into());
    };
    if t.len() > MAX_EXPRESSION_BYTES {
        return Err(format!(
            "{OVER_LIMIT}the expression is {} bytes, more than {MAX_EXPRESSION_BYTES}",
            t.len()
        ));
    }
    if block && !body.trim_start().starts_with("return") {
        return Err("only a single 'return ...;' statement is supported in @{...}".into());
    }
    let mut p = Parser {
        toks: tokenize(body)?,
        i: 0,
        operators: 0,
        nesting: 0,
    };
    if block {
        p.i += 1;
    }
    let e = p.or()?;
    if block {
        p.expect(";")?;
    }
    if p.i != p.toks.len() {
        return Err("unexpected text after the expression".into());
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct F;
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
        assert_eq!(e.eval(&F), Err(NullReference("context.Product")));
    }

    #[test]
    fn outside_the_subset_is_refused() {
        for (src, why) in [
            ("@(context.Variables[\"x\"])", "'['"),
            ("@(DateTime.UtcNow)", "'DateTime.UtcNow'"),
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
}
