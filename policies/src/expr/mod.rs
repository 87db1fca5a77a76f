//! The policy-expression subset the edge evaluates: APIM's C# `@(...)` (and `@{ return ...; }`)
//! limited to the context members, literals, operators and methods listed in SPEC §3 and §3a.
//! Expressions are parsed and type-checked once, at load time, into a typed tree (string, int,
//! bool, null, and the object a variable holds); anything outside the subset is a load error
//! that quotes the expression. Evaluation works on a [`Facts`] view of the call and follows
//! C#'s semantics for what it covers: a member of a null object, a failed cast or parse, a
//! missing variable are evaluation errors, as APIM's would throw.
//!
//! Its rooms: [`parse`] (tokens to the typed tree); evaluation is here.

mod parse;

pub(crate) use parse::{compile, is_expression, OVER_LIMIT};
#[cfg(test)]
pub(crate) use parse::{MAX_EXPRESSION_BYTES, MAX_NESTING, MAX_OPERATORS};

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
    RequestUrlHost,
    /// The path as the call came, before any `rewrite-uri`.
    RequestOriginalUrlPath,
    ResponseStatusCode,
    /// The subscription owner's id.
    UserId,
    DeploymentRegion,
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
            "context.Request.Url.Host" => RequestUrlHost,
            "context.Request.OriginalUrl.Path" => RequestOriginalUrlPath,
            // The edge changes no host: the original is the one received.
            "context.Request.OriginalUrl.Host" => RequestUrlHost,
            "context.User.Id" => UserId,
            "context.Deployment.Region" => DeploymentRegion,
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
            RequestIpAddress
            | RequestMethod
            | RequestUrlPath
            | RequestUrlHost
            | RequestOriginalUrlPath => "context.Request",
            ResponseStatusCode => "context.Response",
            UserId => "context.User",
            DeploymentRegion => "context.Deployment",
        }
    }
}

/// The static type of an expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    Str,
    Int,
    Bool,
    /// The literal `null`: a string that is not there.
    Null,
    /// What `context.Variables["name"]` gives: any value, to be cast before most uses.
    Object,
    /// `DateTime.UtcNow` and what is computed from it.
    DateTime,
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ty::Str => "string",
            Ty::Int => "int",
            Ty::Bool => "bool",
            Ty::Null => "null",
            Ty::Object => "object",
            Ty::DateTime => "DateTime",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
    /// `??`
    Coalesce,
}

/// A method or property of a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StrFn {
    StartsWith {
        ignore_case: bool,
    },
    EndsWith {
        ignore_case: bool,
    },
    Contains {
        ignore_case: bool,
    },
    Equals {
        ignore_case: bool,
    },
    IndexOf {
        ignore_case: bool,
    },
    ToLower,
    ToUpper,
    Trim,
    /// `Substring(start)` or `Substring(start, length)`, in UTF-16 units as .NET counts.
    Substring,
    Replace,
    /// `Length`, in UTF-16 units.
    Length,
    /// `Split(separator)[index]`: the one use of an array the subset has.
    SplitAt,
    ToText,
}

/// A compiled expression.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr {
    Str(String),
    Int(i64),
    Bool(bool),
    Null,
    Member(Member),
    /// `context.Response` as an object, for `context.Response != null`.
    Response,
    /// `context.Request.Headers.GetValueOrDefault(name, default)`; name lower-cased.
    Header(String, Box<Expr>),
    /// `context.Request.Headers.ContainsKey(name)`; name lower-cased.
    HasHeader(String),
    /// `context.Request.Url.Query.GetValueOrDefault(name, default)`.
    Query(String, Box<Expr>),
    /// `context.Variables["name"]`: an object; a missing variable is an error.
    Variable(String),
    /// `context.Variables.GetValueOrDefault<T>(name[, default])`.
    VariableOr(String, Ty, Box<Expr>),
    /// `context.Variables.ContainsKey(name)`.
    HasVariable(String),
    /// `(string)`, `(int)`, `(bool)` of an object.
    Cast(Ty, Box<Expr>),
    Not(Box<Expr>),
    Neg(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `c ? a : b`
    Cond(Box<Expr>, Box<Expr>, Box<Expr>),
    /// A string method on a receiver, with its arguments.
    Call(StrFn, Box<Expr>, Vec<Expr>),
    /// `string.Format(format, args...)`: the format's literal pieces and holes.
    Format(Vec<FormatPiece>, Vec<Expr>),
    /// `int.Parse(text)`.
    ParseInt(Box<Expr>),
    /// `string.IsNullOrEmpty(text)`.
    IsNullOrEmpty(Box<Expr>),
    /// `DateTime.UtcNow`: the call's time.
    UtcNow,
    /// A method or property of a DateTime.
    Date(DateFn, Box<Expr>),
}

/// What the subset does with a DateTime.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum DateFn {
    /// `AddDays(n)`, `AddHours(n)`, ...: the argument and the milliseconds of its unit.
    Add(Box<Expr>, i64),
    /// `Year`, `Month`, `Day`, `Hour`, `Minute`, `Second`.
    Part(DatePart),
    /// `ToString(format)` with a standard format: `o`, `s`, `u`, `R`.
    Format(DateFormat),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DatePart {
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
}

/// .NET's standard DateTime formats the subset writes (culture-invariant ones only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DateFormat {
    /// `o`: round-trip, `2026-01-05T10:00:00.0000000Z`.
    RoundTrip,
    /// `s`: sortable, `2026-01-05T10:00:00`.
    Sortable,
    /// `u`: universal sortable, `2026-01-05 10:00:00Z`.
    Universal,
    /// `R`: RFC 1123, `Mon, 05 Jan 2026 10:00:00 GMT`.
    Rfc1123,
}

/// A piece of a `string.Format` format: literal text or the index of an argument.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum FormatPiece {
    Text(String),
    Arg(usize),
}

/// A value of an expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    Null,
    /// An instant, in milliseconds since the Unix epoch (UTC).
    DateTime(i64),
}

impl Value {
    /// The value as text, as `ToString()` gives it (null as the empty text a policy attribute
    /// gets); a string is moved, not copied.
    pub fn into_text(self) -> String {
        match self {
            Value::Str(s) => s,
            other => other.to_string(),
        }
    }

    fn truthy(&self) -> bool {
        matches!(self, Value::Bool(true))
    }

    /// The type a value has at run time, for the checks of casts.
    fn ty(&self) -> Ty {
        match self {
            Value::Str(_) => Ty::Str,
            Value::Int(_) => Ty::Int,
            Value::Bool(_) => Ty::Bool,
            Value::Null => Ty::Null,
            Value::DateTime(_) => Ty::DateTime,
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
            Value::Null => Ok(()),
            // Never reached from a policy: a DateTime is written only through a format.
            Value::DateTime(ms) => f.write_str(&format_date(*ms, DateFormat::RoundTrip)),
        }
    }
}

/// A call's variables (`set-variable`), in the order they were first set. Calls set a few.
pub(crate) type Variables = Vec<(String, Value)>;

/// What an expression can see of a call.
pub(crate) trait Facts {
    /// A member's value; `None` when its owner is null (no subscription, no response yet...).
    fn member(&self, m: Member) -> Option<String>;
    fn status(&self) -> Option<u16>;
    fn header(&self, lower_name: &str) -> Option<&str>;
    fn query(&self, name: &str) -> Option<String>;
    /// A variable set by `set-variable` earlier in the call.
    fn variable(&self, name: &str) -> Option<&Value>;
    /// The call's time (`DateTime.UtcNow`).
    fn now(&self) -> Option<i64> {
        None
    }
}

/// Evaluation failed as APIM's would throw: what was null, or what went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EvalError {
    /// A member of a null object was read (`context.Product` outside a product).
    Null(&'static str),
    /// A cast, parse, index or division that C# refuses.
    Throw(&'static str),
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EvalError::Null(what) => write!(f, "{what} is null"),
            EvalError::Throw(why) => f.write_str(why),
        }
    }
}

/// C#'s `int` arithmetic wraps at 32 bits; values are kept in an `i64`.
fn int32(v: i64) -> i64 {
    v as i32 as i64
}

/// UTF-16 units of a text, as .NET indexes strings.
fn units(s: &str) -> Vec<u16> {
    s.encode_utf16().collect()
}

fn lower_if(s: &str, ignore_case: bool) -> std::borrow::Cow<'_, str> {
    if ignore_case {
        std::borrow::Cow::Owned(s.to_lowercase())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

impl Expr {
    pub fn eval(&self, facts: &dyn Facts) -> Result<Value, EvalError> {
        Ok(match self {
            Expr::Str(s) => Value::Str(s.clone()),
            Expr::Int(i) => Value::Int(*i),
            Expr::Bool(b) => Value::Bool(*b),
            Expr::Null => Value::Null,
            Expr::Member(Member::ResponseStatusCode) => {
                Value::Int(facts.status().ok_or(EvalError::Null("context.Response"))? as i64)
            }
            Expr::Member(m) => Value::Str(facts.member(*m).ok_or(EvalError::Null(m.owner()))?),
            // Any non-null value stands for the response object; only `== null` reads it.
            Expr::UtcNow => Value::DateTime(facts.now().ok_or(EvalError::Throw(
                "DateTime.UtcNow: the time is not known here",
            ))?),
            Expr::Date(f, on) => {
                let Value::DateTime(ms) = on.eval(facts)? else {
                    return Err(EvalError::Throw("a DateTime method of another value"));
                };
                match f {
                    DateFn::Add(n, unit) => match n.eval(facts)? {
                        Value::Int(n) => Value::DateTime(
                            n.checked_mul(*unit)
                                .and_then(|d| ms.checked_add(d))
                                .ok_or(EvalError::Throw("a DateTime out of range"))?,
                        ),
                        _ => {
                            return Err(EvalError::Throw(
                                "a DateTime added a value that is not a number",
                            ))
                        }
                    },
                    DateFn::Part(p) => Value::Int(date_part(ms, *p)),
                    DateFn::Format(f) => Value::Str(format_date(ms, *f)),
                }
            }
            Expr::Response => match facts.status() {
                Some(s) => Value::Int(s as i64),
                None => Value::Null,
            },
            Expr::Header(n, d) => match facts.header(n) {
                Some(v) => Value::Str(v.to_string()),
                None => d.eval(facts)?,
            },
            Expr::HasHeader(n) => Value::Bool(facts.header(n).is_some()),
            Expr::Query(n, d) => match facts.query(n) {
                Some(v) => Value::Str(v),
                None => d.eval(facts)?,
            },
            Expr::Variable(n) => facts.variable(n).cloned().ok_or(EvalError::Throw(
                "a variable read with context.Variables[...] is not set",
            ))?,
            Expr::VariableOr(n, ty, d) => match facts.variable(n) {
                None => d.eval(facts)?,
                Some(v)
                    if *ty == Ty::Object
                        || v.ty() == *ty
                        || (*ty == Ty::Str && *v == Value::Null) =>
                {
                    v.clone()
                }
                Some(_) => {
                    return Err(EvalError::Throw(
                        "context.Variables.GetValueOrDefault<T>: the variable is not of type T",
                    ))
                }
            },
            Expr::HasVariable(n) => Value::Bool(facts.variable(n).is_some()),
            Expr::Cast(ty, e) => {
                let v = e.eval(facts)?;
                match (ty, &v) {
                    (Ty::Str, Value::Str(_) | Value::Null) => v,
                    (_, Value::Null) => {
                        return Err(EvalError::Null("the value cast to a number or bool"))
                    }
                    _ if v.ty() == *ty => v,
                    _ => return Err(EvalError::Throw("invalid cast of a variable's value")),
                }
            }
            Expr::Not(e) => Value::Bool(!e.eval(facts)?.truthy()),
            Expr::Neg(e) => match e.eval(facts)? {
                Value::Int(i) => Value::Int(int32(i.wrapping_neg())),
                _ => return Err(EvalError::Throw("'-' of a value that is not a number")),
            },
            Expr::Cond(c, a, b) => {
                if c.eval(facts)?.truthy() {
                    a.eval(facts)?
                } else {
                    b.eval(facts)?
                }
            }
            Expr::Binary(op, l, r) => return binary(*op, l, r, facts),
            Expr::Call(f, recv, args) => return call(*f, recv, args, facts),
            Expr::Format(pieces, args) => {
                let values = args
                    .iter()
                    .map(|a| a.eval(facts))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut out = String::new();
                for p in pieces {
                    match p {
                        FormatPiece::Text(t) => out.push_str(t),
                        FormatPiece::Arg(i) => {
                            // The compiler checked every index against the arguments.
                            if let Some(v) = values.get(*i) {
                                out.push_str(&v.to_string());
                            }
                        }
                    }
                }
                Value::Str(out)
            }
            Expr::ParseInt(e) => {
                match e.eval(facts)? {
                    Value::Str(s) => Value::Int(s.trim().parse::<i32>().map_err(|_| {
                        EvalError::Throw("int.Parse: the text is not a 32-bit integer")
                    })? as i64),
                    Value::Null => return Err(EvalError::Null("the text given to int.Parse")),
                    _ => return Err(EvalError::Throw("int.Parse of a value that is not text")),
                }
            }
            Expr::IsNullOrEmpty(e) => Value::Bool(match e.eval(facts)? {
                Value::Null => true,
                Value::Str(s) => s.is_empty(),
                _ => false,
            }),
        })
    }

    /// Does the expression read `context.Variables`?
    pub fn reads_variables(&self) -> bool {
        self.any(&|e| {
            matches!(
                e,
                Expr::Variable(_) | Expr::VariableOr(..) | Expr::HasVariable(_)
            )
        })
    }

    /// Does the expression read member `m` of `context`?
    pub fn reads_member(&self, m: Member) -> bool {
        self.any(&|e| matches!(e, Expr::Member(x) if *x == m))
    }

    /// Is `p` true of this expression or of any inside it?
    fn any(&self, p: &dyn Fn(&Expr) -> bool) -> bool {
        if p(self) {
            return true;
        }
        match self {
            Expr::Str(_)
            | Expr::Int(_)
            | Expr::Bool(_)
            | Expr::Null
            | Expr::Member(_)
            | Expr::Response
            | Expr::HasHeader(_)
            | Expr::Variable(_)
            | Expr::HasVariable(_)
            | Expr::UtcNow => false,
            Expr::Date(DateFn::Add(n, _), on) => n.any(p) || on.any(p),
            Expr::Date(_, on) => on.any(p),
            Expr::VariableOr(_, _, d) | Expr::Header(_, d) | Expr::Query(_, d) => d.any(p),
            Expr::Cast(_, e)
            | Expr::Not(e)
            | Expr::Neg(e)
            | Expr::ParseInt(e)
            | Expr::IsNullOrEmpty(e) => e.any(p),
            Expr::Binary(_, a, b) => a.any(p) || b.any(p),
            Expr::Cond(c, a, b) => c.any(p) || a.any(p) || b.any(p),
            Expr::Call(_, r, args) => r.any(p) || args.iter().any(|a| a.any(p)),
            Expr::Format(_, args) => args.iter().any(|a| a.any(p)),
        }
    }
}

/// The civil date and time of an instant (UTC).
fn civil(ms: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn date_part(ms: i64, p: DatePart) -> i64 {
    let t = civil(ms);
    i64::from(match p {
        DatePart::Year => t.year(),
        DatePart::Month => i32::from(u8::from(t.month())),
        DatePart::Day => i32::from(t.day()),
        DatePart::Hour => i32::from(t.hour()),
        DatePart::Minute => i32::from(t.minute()),
        DatePart::Second => i32::from(t.second()),
    })
}

/// An instant in one of .NET's standard formats, as `DateTime.UtcNow.ToString(f)` writes it.
pub(crate) fn format_date(ms: i64, f: DateFormat) -> String {
    let t = civil(ms);
    let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
    let (h, mi, s) = (t.hour(), t.minute(), t.second());
    match f {
        DateFormat::RoundTrip => format!(
            "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:07}Z",
            t.nanosecond() / 100
        ),
        DateFormat::Sortable => format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}"),
        DateFormat::Universal => format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}Z"),
        DateFormat::Rfc1123 => {
            const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
            const MONTHS: [&str; 12] = [
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
            ];
            format!(
                "{}, {d:02} {} {y:04} {h:02}:{mi:02}:{s:02} GMT",
                DAYS[usize::from(t.weekday().number_days_from_monday())],
                MONTHS[usize::from(mo - 1)]
            )
        }
    }
}

fn binary(op: BinOp, l: &Expr, r: &Expr, facts: &dyn Facts) -> Result<Value, EvalError> {
    match op {
        BinOp::And => {
            return Ok(Value::Bool(
                l.eval(facts)?.truthy() && r.eval(facts)?.truthy(),
            ))
        }
        BinOp::Or => {
            return Ok(Value::Bool(
                l.eval(facts)?.truthy() || r.eval(facts)?.truthy(),
            ))
        }
        BinOp::Coalesce => {
            return match l.eval(facts)? {
                Value::Null => r.eval(facts),
                v => Ok(v),
            }
        }
        _ => {}
    }
    let (a, b) = (l.eval(facts)?, r.eval(facts)?);
    Ok(match (op, &a, &b) {
        (BinOp::Add, Value::Int(x), Value::Int(y)) => Value::Int(int32(x.wrapping_add(*y))),
        // `+` with a string on either side concatenates, null as empty.
        (BinOp::Add, _, _) => Value::Str(format!("{a}{b}")),
        (BinOp::Eq, _, _) => Value::Bool(a == b),
        (BinOp::Ne, _, _) => Value::Bool(a != b),
        (_, Value::Int(x), Value::Int(y)) => {
            let (x, y) = (*x, *y);
            match op {
                BinOp::Sub => Value::Int(int32(x.wrapping_sub(y))),
                BinOp::Mul => Value::Int(int32(x.wrapping_mul(y))),
                BinOp::Div | BinOp::Rem if y == 0 => {
                    return Err(EvalError::Throw("division by zero"))
                }
                BinOp::Div if x == i32::MIN as i64 && y == -1 => {
                    return Err(EvalError::Throw("arithmetic overflow"))
                }
                // Truncating toward zero, as C# does.
                BinOp::Div => Value::Int(x / y),
                BinOp::Rem => Value::Int(if y == -1 { 0 } else { x % y }),
                BinOp::Lt => Value::Bool(x < y),
                BinOp::Le => Value::Bool(x <= y),
                BinOp::Gt => Value::Bool(x > y),
                _ => Value::Bool(x >= y),
            }
        }
        (_, Value::DateTime(x), Value::DateTime(y)) => match op {
            BinOp::Lt => Value::Bool(x < y),
            BinOp::Le => Value::Bool(x <= y),
            BinOp::Gt => Value::Bool(x > y),
            BinOp::Ge => Value::Bool(x >= y),
            _ => return Err(EvalError::Throw("arithmetic on a DateTime")),
        },
        (BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem, _, _) => {
            return Err(EvalError::Throw(
                "arithmetic on a value that is not a number",
            ))
        }
        // Ordering of a null (a variable's object) is false, as C#'s lifted operators say;
        // type checking at load time rules out the rest.
        _ => Value::Bool(false),
    })
}

/// The receiver of a string method, which must not be null.
fn receiver(v: Value, method: &'static str) -> Result<String, EvalError> {
    match v {
        Value::Str(s) => Ok(s),
        Value::Null => Err(EvalError::Null(method)),
        other => Ok(other.to_string()),
    }
}

/// A string argument; a null one is C#'s ArgumentNullException.
fn argument(v: Value) -> Result<String, EvalError> {
    match v {
        Value::Null => Err(EvalError::Throw("a string method was given null")),
        v => Ok(v.into_text()),
    }
}

fn int_argument(v: Value) -> Result<i64, EvalError> {
    match v {
        Value::Int(i) => Ok(i),
        _ => Err(EvalError::Throw(
            "a string method was given a value that is not a number",
        )),
    }
}

fn call(f: StrFn, recv: &Expr, args: &[Expr], facts: &dyn Facts) -> Result<Value, EvalError> {
    let r = recv.eval(facts)?;
    if f == StrFn::ToText {
        return match r {
            Value::Null => Err(EvalError::Null("the value of ToString()")),
            v => Ok(Value::Str(v.into_text())),
        };
    }
    let s = receiver(r, "the string a method is called on")?;
    let mut a = args.iter().map(|e| e.eval(facts));
    let mut next = || a.next().unwrap_or(Ok(Value::Null));
    Ok(match f {
        StrFn::StartsWith { ignore_case } => {
            let p = argument(next()?)?;
            Value::Bool(lower_if(&s, ignore_case).starts_with(&*lower_if(&p, ignore_case)))
        }
        StrFn::EndsWith { ignore_case } => {
            let p = argument(next()?)?;
            Value::Bool(lower_if(&s, ignore_case).ends_with(&*lower_if(&p, ignore_case)))
        }
        StrFn::Contains { ignore_case } => {
            let p = argument(next()?)?;
            Value::Bool(lower_if(&s, ignore_case).contains(&*lower_if(&p, ignore_case)))
        }
        // `a.Equals(null)` is false, not an error.
        StrFn::Equals { ignore_case } => match next()? {
            Value::Null => Value::Bool(false),
            p => {
                let p = p.into_text();
                Value::Bool(if ignore_case {
                    s.to_lowercase() == p.to_lowercase()
                } else {
                    s == p
                })
            }
        },
        StrFn::IndexOf { ignore_case } => {
            let p = argument(next()?)?;
            let (hay, needle) = (lower_if(&s, ignore_case), lower_if(&p, ignore_case));
            Value::Int(match hay.find(&*needle) {
                Some(byte) => hay[..byte].encode_utf16().count() as i64,
                None => -1,
            })
        }
        StrFn::ToLower => Value::Str(s.to_lowercase()),
        StrFn::ToUpper => Value::Str(s.to_uppercase()),
        StrFn::Trim => Value::Str(s.trim().to_string()),
        StrFn::Length => Value::Int(s.encode_utf16().count() as i64),
        StrFn::Substring => {
            let u = units(&s);
            let start = int_argument(next()?)?;
            let len = if args.len() > 1 {
                int_argument(next()?)?
            } else {
                u.len() as i64 - start
            };
            if start < 0 || len < 0 || start + len > u.len() as i64 {
                return Err(EvalError::Throw(
                    "Substring: the start or length is outside the string",
                ));
            }
            Value::Str(String::from_utf16_lossy(
                &u[start as usize..(start + len) as usize],
            ))
        }
        StrFn::Replace => {
            let from = argument(next()?)?;
            if from.is_empty() {
                return Err(EvalError::Throw("Replace: the text to replace is empty"));
            }
            let to = match next()? {
                Value::Null => String::new(),
                v => v.into_text(),
            };
            Value::Str(s.replace(&from, &to))
        }
        StrFn::SplitAt => {
            let sep = argument(next()?)?;
            let i = int_argument(next()?)?;
            // .NET: an empty separator leaves the string whole, one element.
            let piece = if sep.is_empty() {
                (i == 0).then_some(s.as_str())
            } else {
                s.split(sep.as_str()).nth(i.max(0) as usize)
            };
            match piece {
                Some(p) if i >= 0 => Value::Str(p.to_string()),
                _ => {
                    return Err(EvalError::Throw(
                        "Split(...)[i]: the index is outside the array",
                    ))
                }
            }
        }
        StrFn::ToText => Value::Str(s),
    })
}

#[cfg(test)]
mod tests;
