//! Reading an expression's text into the typed tree: tokens, then a precedence-climbing parser
//! that checks types as it builds (C#'s rules for what the subset covers), under limits that
//! bound the tree's size and depth.

use super::{BinOp, Expr, FormatPiece, Member, StrFn, Ty};

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Int(i64),
    Punct(&'static str),
}

/// Punctuation, longest first.
const PUNCT: [&str; 25] = [
    "&&", "||", "==", "!=", "<=", ">=", "??", "<", ">", "!", "+", "-", "*", "/", "%", "(", ")",
    ".", ",", ";", "{", "}", "?", ":", "[",
];

/// A quoted literal starting at `i` (the quote): its text and the index after it.
fn quoted_literal(src: &str, i: usize, quote: u8) -> Result<(String, usize), String> {
    let b = src.as_bytes();
    let mut s = String::new();
    let mut j = i + 1;
    loop {
        let Some(&d) = b.get(j) else {
            return Err("unterminated string literal".into());
        };
        match d {
            _ if d == quote => return Ok((s, j + 1)),
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
}

fn tokenize(src: &str) -> Result<Vec<Tok>, String> {
    let b = src.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    'outer: while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'"' || c == b'\'' {
            let (s, next) = quoted_literal(src, i, c)?;
            if c == b'\'' && s.chars().count() != 1 {
                return Err("a character literal holds one character".into());
            }
            out.push(Tok::Str(s));
            i = next;
            continue;
        }
        if c.is_ascii_digit() {
            let j = i + b[i..].iter().take_while(|d| d.is_ascii_digit()).count();
            let n: i64 = src[i..j]
                .parse()
                .ok()
                .filter(|n| *n <= i32::MAX as i64)
                .ok_or_else(|| format!("integer literal {} is out of range", &src[i..j]))?;
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
        if c == b']' {
            out.push(Tok::Punct("]"));
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

/// The most operators (binary and conditional operators, method calls, indexers) one
/// expression may hold, and the deepest its parentheses, arguments and unary operators may
/// nest. Together they bound the compiled tree's depth, so that compiling, evaluating and
/// dropping it recurse a bounded number of times in any stack (wasmtime's, V8's, a thread's).
pub(crate) const MAX_OPERATORS: usize = 256;
pub(crate) const MAX_NESTING: usize = 32;

/// What a fault over one of the limits above starts with: such an expression is refused in
/// every mode (it is too large to run safely), where one outside the subset may be skipped.
pub(crate) const OVER_LIMIT: &str = "over the edge's limits: ";

type Typed = (Expr, Ty);

struct Parser {
    toks: Vec<Tok>,
    i: usize,
    /// Operators read so far.
    operators: usize,
    /// Parentheses, arguments and unary operators open around the token being read.
    nesting: usize,
}

/// Types a string operation accepts: text, or the null that stands for none.
fn stringy(t: Ty) -> bool {
    matches!(t, Ty::Str | Ty::Null)
}

fn type_name(word: &str) -> Option<Ty> {
    Some(match word {
        "string" | "String" => Ty::Str,
        "int" | "Int32" => Ty::Int,
        "bool" | "Boolean" => Ty::Bool,
        _ => return None,
    })
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.i)
    }
    fn peek_punct(&self, p: &str) -> bool {
        matches!(self.peek(), Some(Tok::Punct(q)) if *q == p)
    }
    fn eat(&mut self, p: &str) -> bool {
        if self.peek_punct(p) {
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
    fn ident(&mut self) -> Option<String> {
        match self.peek() {
            Some(Tok::Ident(w)) => {
                let w = w.clone();
                self.i += 1;
                Some(w)
            }
            _ => None,
        }
    }

    /// Counts one more operator: an error past [`MAX_OPERATORS`].
    fn operator(&mut self) -> Result<(), String> {
        self.operators += 1;
        if self.operators > MAX_OPERATORS {
            return Err(format!(
                "{OVER_LIMIT}more than {MAX_OPERATORS} operators in one expression"
            ));
        }
        Ok(())
    }

    /// Runs `f` one level deeper: an error past [`MAX_NESTING`].
    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, String>) -> Result<T, String> {
        self.nesting += 1;
        if self.nesting > MAX_NESTING {
            return Err(format!(
                "{OVER_LIMIT}parentheses, arguments and unary operators nested more than {MAX_NESTING} deep"
            ));
        }
        let out = f(self)?;
        self.nesting -= 1;
        Ok(out)
    }

    fn expr(&mut self) -> Result<Typed, String> {
        let c = self.coalesce()?;
        if !self.eat("?") {
            return Ok(c);
        }
        self.operator()?;
        if c.1 != Ty::Bool {
            return Err(format!("the condition of '?:' must be a bool, not {}", c.1));
        }
        let a = self.nested(Self::expr)?;
        self.expect(":")?;
        let b = self.nested(Self::expr)?;
        let ty = unify(a.1, b.1)
            .ok_or_else(|| format!("the branches of '?:' are {} and {}", a.1, b.1))?;
        Ok((Expr::Cond(Box::new(c.0), Box::new(a.0), Box::new(b.0)), ty))
    }

    fn coalesce(&mut self) -> Result<Typed, String> {
        let l = self.or()?;
        if !self.eat("??") {
            return Ok(l);
        }
        self.operator()?;
        let r = self.nested(Self::coalesce)?;
        typed(BinOp::Coalesce, l, r)
    }

    fn binary(
        &mut self,
        ops: &[(&'static str, BinOp)],
        next: fn(&mut Self) -> Result<Typed, String>,
    ) -> Result<Typed, String> {
        let mut left = next(self)?;
        'again: loop {
            for (p, op) in ops {
                if self.eat(p) {
                    self.operator()?;
                    let right = next(self)?;
                    left = typed(*op, left, right)?;
                    continue 'again;
                }
            }
            return Ok(left);
        }
    }

    fn or(&mut self) -> Result<Typed, String> {
        self.binary(&[("||", BinOp::Or)], Self::and)
    }
    fn and(&mut self) -> Result<Typed, String> {
        self.binary(&[("&&", BinOp::And)], Self::equality)
    }
    fn equality(&mut self) -> Result<Typed, String> {
        self.binary(&[("==", BinOp::Eq), ("!=", BinOp::Ne)], Self::relation)
    }
    fn relation(&mut self) -> Result<Typed, String> {
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
    fn sum(&mut self) -> Result<Typed, String> {
        self.binary(&[("+", BinOp::Add), ("-", BinOp::Sub)], Self::product)
    }
    fn product(&mut self) -> Result<Typed, String> {
        self.binary(
            &[("*", BinOp::Mul), ("/", BinOp::Div), ("%", BinOp::Rem)],
            Self::unary,
        )
    }

    /// A cast ahead: `(string)`, `(int)`, `(bool)` and their .NET names.
    fn cast_ahead(&self) -> Option<Ty> {
        match (
            self.toks.get(self.i),
            self.toks.get(self.i + 1),
            self.toks.get(self.i + 2),
        ) {
            (Some(Tok::Punct("(")), Some(Tok::Ident(w)), Some(Tok::Punct(")"))) => type_name(w),
            _ => None,
        }
    }

    fn unary(&mut self) -> Result<Typed, String> {
        if self.eat("!") {
            let (e, t) = self.nested(Self::unary)?;
            if t != Ty::Bool {
                return Err(format!("'!' needs a bool, not {t}"));
            }
            return Ok((Expr::Not(Box::new(e)), Ty::Bool));
        }
        if self.eat("-") {
            let (e, t) = self.nested(Self::unary)?;
            if t != Ty::Int {
                return Err(format!("'-' needs an int, not {t}"));
            }
            return Ok(match e {
                Expr::Int(n) => (Expr::Int(-n), Ty::Int),
                e => (Expr::Neg(Box::new(e)), Ty::Int),
            });
        }
        if let Some(ty) = self.cast_ahead() {
            self.i += 3;
            let (e, t) = self.nested(Self::unary)?;
            return match t {
                _ if t == ty => Ok((e, ty)),
                Ty::Object => Ok((Expr::Cast(ty, Box::new(e)), ty)),
                Ty::Null if ty == Ty::Str => Ok((e, Ty::Str)),
                _ => Err(format!("a cast of {t} to {ty} is not supported")),
            };
        }
        let p = self.primary()?;
        self.postfix(p)
    }

    /// Arguments of a call, after its '(' and through its ')'.
    fn arguments(&mut self) -> Result<Vec<Typed>, String> {
        let mut args = Vec::new();
        if self.eat(")") {
            return Ok(args);
        }
        loop {
            args.push(self.nested(Self::expr)?);
            if self.eat(")") {
                return Ok(args);
            }
            self.expect(",")?;
        }
    }

    fn string_literal(&mut self) -> Result<String, String> {
        match self.toks.get(self.i).cloned() {
            Some(Tok::Str(s)) => {
                self.i += 1;
                Ok(s)
            }
            _ => Err("expected a string literal argument".into()),
        }
    }

    /// `StringComparison.X` as an argument: whether it ignores case.
    fn comparison(&mut self) -> Result<bool, String> {
        let mut path = self.ident().ok_or("expected a StringComparison")?;
        while self.eat(".") {
            path.push('.');
            path.push_str(&self.ident().ok_or("expected a member name after '.'")?);
        }
        match path
            .strip_prefix("StringComparison.")
            .or(path.strip_prefix("System.StringComparison."))
        {
            Some("Ordinal" | "InvariantCulture" | "CurrentCulture") => Ok(false),
            Some(
                "OrdinalIgnoreCase" | "InvariantCultureIgnoreCase" | "CurrentCultureIgnoreCase",
            ) => Ok(true),
            _ => Err(format!("'{path}' is not supported at the edge")),
        }
    }

    /// A method or property after '.', on `recv`.
    fn member_of(&mut self, recv: Typed, name: &str) -> Result<Typed, String> {
        let (r, rt) = recv;
        self.operator()?;
        if rt == Ty::DateTime {
            return self.date_member(r, name);
        }
        if name == "Length" {
            if !stringy(rt) {
                return Err(format!("'Length' of {rt} is not supported"));
            }
            return Ok((Expr::Call(StrFn::Length, Box::new(r), Vec::new()), Ty::Int));
        }
        if !self.eat("(") {
            return Err(format!("'.{name}' is not supported at the edge"));
        }
        if name == "ToString" {
            self.expect(")")?;
            return Ok(match (rt, r) {
                (Ty::Str, r) => (r, Ty::Str),
                (_, r) => (Expr::Call(StrFn::ToText, Box::new(r), Vec::new()), Ty::Str),
            });
        }
        if !(stringy(rt) || (rt == Ty::Object && name == "Equals")) {
            return Err(format!(
                "'.{name}(...)' of {rt} is not supported at the edge"
            ));
        }
        let with_case = |ignore_case| match name {
            "StartsWith" => Some(StrFn::StartsWith { ignore_case }),
            "EndsWith" => Some(StrFn::EndsWith { ignore_case }),
            "Contains" => Some(StrFn::Contains { ignore_case }),
            "Equals" => Some(StrFn::Equals { ignore_case }),
            "IndexOf" => Some(StrFn::IndexOf { ignore_case }),
            _ => None,
        };
        if with_case(false).is_some() {
            let arg = self.nested(Self::expr)?;
            let ignore_case = if self.eat(",") {
                self.comparison()?
            } else {
                false
            };
            self.expect(")")?;
            if !(stringy(arg.1) || (name == "Equals" && arg.1 == Ty::Object)) {
                return Err(format!("'{name}' needs a string argument, not {}", arg.1));
            }
            let f = with_case(ignore_case).ok_or("unreachable")?;
            let ty = if name == "IndexOf" { Ty::Int } else { Ty::Bool };
            return Ok((Expr::Call(f, Box::new(r), vec![arg.0]), ty));
        }
        let args = self.arguments()?;
        let types: Vec<Ty> = args.iter().map(|a| a.1).collect();
        let f = match (name, types.as_slice()) {
            ("ToLower" | "ToLowerInvariant", []) => StrFn::ToLower,
            ("ToUpper" | "ToUpperInvariant", []) => StrFn::ToUpper,
            ("Trim", []) => StrFn::Trim,
            ("Substring", [Ty::Int] | [Ty::Int, Ty::Int]) => StrFn::Substring,
            ("Replace", [a, b]) if stringy(*a) && stringy(*b) => StrFn::Replace,
            ("Split", [Ty::Str]) => {
                // Only as `Split(separator)[index]`: the subset has no arrays.
                if !self.eat("[") {
                    return Err("'Split(...)' is supported only as Split(separator)[index]".into());
                }
                let (index, it) = self.nested(Self::expr)?;
                self.expect("]")?;
                if it != Ty::Int {
                    return Err(format!("an array index must be an int, not {it}"));
                }
                let mut args: Vec<Expr> = args.into_iter().map(|a| a.0).collect();
                args.push(index);
                return Ok((Expr::Call(StrFn::SplitAt, Box::new(r), args), Ty::Str));
            }
            _ => {
                let shown: Vec<String> = types.iter().map(Ty::to_string).collect();
                return Err(format!(
                    "'.{name}({})' is not supported at the edge",
                    shown.join(", ")
                ));
            }
        };
        let ty = Ty::Str;
        Ok((
            Expr::Call(f, Box::new(r), args.into_iter().map(|a| a.0).collect()),
            ty,
        ))
    }

    /// A property or method of a DateTime: its parts, `Add*` of whole units, `ToString` with a
    /// culture-invariant standard format.
    fn date_member(&mut self, on: Expr, name: &str) -> Result<Typed, String> {
        use super::{DateFn, DateFormat, DatePart};
        let part = match name {
            "Year" => Some(DatePart::Year),
            "Month" => Some(DatePart::Month),
            "Day" => Some(DatePart::Day),
            "Hour" => Some(DatePart::Hour),
            "Minute" => Some(DatePart::Minute),
            "Second" => Some(DatePart::Second),
            _ => None,
        };
        if let Some(part) = part {
            return Ok((Expr::Date(DateFn::Part(part), Box::new(on)), Ty::Int));
        }
        let unit = match name {
            "AddDays" => Some(86_400_000),
            "AddHours" => Some(3_600_000),
            "AddMinutes" => Some(60_000),
            "AddSeconds" => Some(1_000),
            "AddMilliseconds" => Some(1),
            _ => None,
        };
        if !self.eat("(") {
            return Err(format!("'DateTime.{name}' is not supported at the edge"));
        }
        if let Some(unit) = unit {
            let (n, nt) = self.nested(Self::expr)?;
            self.expect(")")?;
            if nt != Ty::Int {
                return Err(format!("'{name}' takes a whole number here, not {nt}"));
            }
            return Ok((
                Expr::Date(DateFn::Add(Box::new(n), unit), Box::new(on)),
                Ty::DateTime,
            ));
        }
        if name != "ToString" {
            return Err(format!(
                "'DateTime.{name}(...)' is not supported at the edge"
            ));
        }
        if self.eat(")") {
            return Err("DateTime.ToString() depends on the culture: give a format, \"o\", \"s\", \"u\" or \"R\"".into());
        }
        let format = self.string_literal()?;
        self.expect(")")?;
        let f = match format.as_str() {
            "o" | "O" => DateFormat::RoundTrip,
            "s" => DateFormat::Sortable,
            "u" => DateFormat::Universal,
            "R" | "r" => DateFormat::Rfc1123,
            other => {
                return Err(format!(
                    "DateTime format \"{other}\" is not supported at the edge: \"o\", \"s\", \"u\" or \"R\""
                ))
            }
        };
        Ok((Expr::Date(DateFn::Format(f), Box::new(on)), Ty::Str))
    }

    fn postfix(&mut self, mut e: Typed) -> Result<Typed, String> {
        loop {
            if self.peek_punct(".") {
                self.i += 1;
                let name = self.ident().ok_or("expected a member name after '.'")?;
                e = self.member_of(e, &name)?;
            } else if self.peek_punct("[") {
                return Err(format!("indexing a {} is not supported at the edge", e.1));
            } else {
                return Ok(e);
            }
        }
    }

    /// `<T>` after a generic method's name.
    fn type_argument(&mut self, path: &str) -> Result<Ty, String> {
        if !self.eat("<") {
            return Err(format!("'{path}' needs a type argument: {path}<T>(...)"));
        }
        let word = self.ident().ok_or("expected a type name")?;
        self.expect(">")?;
        type_name(&word).ok_or_else(|| format!("'{path}<{word}>' is not supported at the edge"))
    }

    /// A call of a known function (a method of a context object or a static one).
    fn function(&mut self, path: &str) -> Result<Option<Typed>, String> {
        let generic = path == "context.Variables.GetValueOrDefault";
        if !(self.peek_punct("(") || (generic && self.peek_punct("<"))) {
            return Ok(None);
        }
        let known = matches!(
            path,
            "context.Request.Headers.GetValueOrDefault"
                | "context.Request.Headers.ContainsKey"
                | "context.Request.Url.Query.GetValueOrDefault"
                | "context.Request.Url.Query.ContainsKey"
                | "context.Variables.GetValueOrDefault"
                | "context.Variables.ContainsKey"
                | "int.Parse"
                | "Int32.Parse"
                | "string.Format"
                | "String.Format"
                | "string.IsNullOrEmpty"
                | "String.IsNullOrEmpty"
        );
        if !known {
            return Err(format!("'{path}(...)' is not supported at the edge"));
        }
        self.operator()?;
        let ty = if generic && self.peek_punct("<") {
            Some(self.type_argument(path)?)
        } else {
            None
        };
        self.expect("(")?;
        let out = match path {
            "context.Request.Headers.GetValueOrDefault"
            | "context.Request.Url.Query.GetValueOrDefault" => {
                let name = self.string_literal()?;
                let default = if self.eat(",") {
                    let (d, dt) = self.nested(Self::expr)?;
                    if !stringy(dt) {
                        return Err(format!(
                            "the default of '{path}' must be a string, not {dt}"
                        ));
                    }
                    d
                } else {
                    Expr::Str(String::new())
                };
                self.expect(")")?;
                if path.contains("Headers") {
                    (
                        Expr::Header(name.to_ascii_lowercase(), Box::new(default)),
                        Ty::Str,
                    )
                } else {
                    (Expr::Query(name, Box::new(default)), Ty::Str)
                }
            }
            "context.Request.Headers.ContainsKey" => {
                let name = self.string_literal()?;
                self.expect(")")?;
                (Expr::HasHeader(name.to_ascii_lowercase()), Ty::Bool)
            }
            "context.Request.Url.Query.ContainsKey" => {
                let name = self.string_literal()?;
                self.expect(")")?;
                (
                    Expr::Binary(
                        BinOp::Ne,
                        Box::new(Expr::Query(name, Box::new(Expr::Null))),
                        Box::new(Expr::Null),
                    ),
                    Ty::Bool,
                )
            }
            "context.Variables.GetValueOrDefault" => {
                let name = self.string_literal()?;
                // Without a type argument, T is the default's type, or object without one.
                let given = if self.eat(",") {
                    Some(self.nested(Self::expr)?)
                } else {
                    None
                };
                let ty = ty.unwrap_or(match &given {
                    Some((_, Ty::Null)) => Ty::Str,
                    Some((_, t)) => *t,
                    None => Ty::Object,
                });
                let default = if let Some((d, dt)) = given {
                    if !(dt == ty || (ty == Ty::Str && dt == Ty::Null)) {
                        return Err(format!(
                            "the default of GetValueOrDefault<{ty}> must be {ty}, not {dt}"
                        ));
                    }
                    d
                } else {
                    // default(T)
                    match ty {
                        Ty::Int => Expr::Int(0),
                        Ty::Bool => Expr::Bool(false),
                        _ => Expr::Null,
                    }
                };
                self.expect(")")?;
                (Expr::VariableOr(name, ty, Box::new(default)), ty)
            }
            "context.Variables.ContainsKey" => {
                let name = self.string_literal()?;
                self.expect(")")?;
                (Expr::HasVariable(name), Ty::Bool)
            }
            "int.Parse" | "Int32.Parse" => {
                let args = self.arguments()?;
                match args.as_slice() {
                    [(_, t)] if stringy(*t) => {}
                    _ => return Err("int.Parse takes one string".into()),
                }
                let (e, _) = args
                    .into_iter()
                    .next()
                    .ok_or("int.Parse takes one string")?;
                (Expr::ParseInt(Box::new(e)), Ty::Int)
            }
            "string.IsNullOrEmpty" | "String.IsNullOrEmpty" => {
                let args = self.arguments()?;
                match args.as_slice() {
                    [(_, t)] if stringy(*t) || *t == Ty::Object => {}
                    _ => return Err("string.IsNullOrEmpty takes one string".into()),
                }
                let (e, _) = args.into_iter().next().ok_or("string.IsNullOrEmpty")?;
                (Expr::IsNullOrEmpty(Box::new(e)), Ty::Bool)
            }
            _ => {
                // string.Format
                let format = self.string_literal()?;
                let mut args = Vec::new();
                while self.eat(",") {
                    args.push(self.nested(Self::expr)?.0);
                }
                self.expect(")")?;
                (
                    Expr::Format(format_pieces(&format, args.len())?, args),
                    Ty::Str,
                )
            }
        };
        Ok(Some(out))
    }

    fn primary(&mut self) -> Result<Typed, String> {
        let tok = self.toks.get(self.i).cloned().ok_or("unexpected end")?;
        self.i += 1;
        match tok {
            Tok::Str(s) => Ok((Expr::Str(s), Ty::Str)),
            Tok::Int(n) => Ok((Expr::Int(n), Ty::Int)),
            Tok::Punct("(") => {
                let e = self.nested(Self::expr)?;
                self.expect(")")?;
                Ok(e)
            }
            Tok::Ident(w) if w == "true" || w == "false" => Ok((Expr::Bool(w == "true"), Ty::Bool)),
            Tok::Ident(w) if w == "null" => Ok((Expr::Null, Ty::Null)),
            Tok::Ident(first) => {
                let mut path = first;
                loop {
                    if let Some(m) = Member::from_path(&path) {
                        return Ok((Expr::Member(m), m.ty()));
                    }
                    if path == "string.Empty" || path == "String.Empty" {
                        return Ok((Expr::Str(String::new()), Ty::Str));
                    }
                    if path == "DateTime.UtcNow" || path == "System.DateTime.UtcNow" {
                        return Ok((Expr::UtcNow, Ty::DateTime));
                    }
                    if let Some(call) = self.function(&path)? {
                        return Ok(call);
                    }
                    if path == "context.Variables" && self.eat("[") {
                        let name = self.string_literal()?;
                        self.expect("]")?;
                        self.operator()?;
                        return Ok((Expr::Variable(name), Ty::Object));
                    }
                    if path == "context.Response" && !self.peek_punct(".") {
                        return Ok((Expr::Response, Ty::Object));
                    }
                    if !(self.peek_punct(".")
                        && matches!(self.toks.get(self.i + 1), Some(Tok::Ident(_))))
                    {
                        return Err(format!("'{path}' is not supported at the edge"));
                    }
                    self.i += 1;
                    path.push('.');
                    path.push_str(&self.ident().ok_or("expected a member name")?);
                }
            }
            Tok::Punct(p) => Err(format!("unexpected '{p}'")),
        }
    }
}

/// The type two values unify to, for `?:`.
fn unify(a: Ty, b: Ty) -> Option<Ty> {
    Some(match (a, b) {
        _ if a == b => a,
        (Ty::Str, Ty::Null) | (Ty::Null, Ty::Str) => Ty::Str,
        (Ty::Object, Ty::Str | Ty::Null) | (Ty::Str | Ty::Null, Ty::Object) => Ty::Object,
        _ => return None,
    })
}

/// `string.Format`'s format: literal text and `{index}` holes (`{{` and `}}` escape braces).
fn format_pieces(format: &str, args: usize) -> Result<Vec<FormatPiece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut digits = String::new();
                for d in chars.by_ref() {
                    if d == '}' {
                        break;
                    }
                    digits.push(d);
                }
                let index: usize = digits.trim().parse().map_err(|_| {
                    format!("the format item {{{digits}}} of string.Format is not supported")
                })?;
                if index >= args {
                    return Err(format!(
                        "string.Format's format refers to argument {index}, but has {args}"
                    ));
                }
                if !text.is_empty() {
                    pieces.push(FormatPiece::Text(std::mem::take(&mut text)));
                }
                pieces.push(FormatPiece::Arg(index));
            }
            '}' => return Err("string.Format's format has a lone '}'".into()),
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(FormatPiece::Text(text));
    }
    Ok(pieces)
}

fn typed(op: BinOp, (l, lt): Typed, (r, rt): Typed) -> Result<Typed, String> {
    use Ty::*;
    let text_like = |t: Ty| matches!(t, Str | Null | Object);
    if op == BinOp::Add && (lt == DateTime || rt == DateTime) {
        return Err("a DateTime is written only through a format: .ToString(\"o\"), (\"s\"), (\"u\") or (\"R\")".into());
    }
    let ty = match op {
        BinOp::Add if lt == Int && rt == Int => Int,
        BinOp::Add if text_like(lt) || text_like(rt) => Str,
        BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem if lt == Int && rt == Int => Int,
        BinOp::Eq | BinOp::Ne if lt == rt || (text_like(lt) && text_like(rt)) => Bool,
        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge
            if (lt == Int && rt == Int) || (lt == DateTime && rt == DateTime) =>
        {
            Bool
        }
        BinOp::And | BinOp::Or if lt == Bool && rt == Bool => Bool,
        BinOp::Coalesce if stringy(lt) && stringy(rt) => Str,
        BinOp::Coalesce if lt == Object => Object,
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
    let e = p.expr()?;
    if block {
        p.expect(";")?;
    }
    if p.i != p.toks.len() {
        return Err("unexpected text after the expression".into());
    }
    if e.1 == Ty::DateTime {
        return Err(
            "a DateTime is written only through a format: .ToString(\"o\"), (\"s\"), (\"u\") or (\"R\")"
                .into(),
        );
    }
    Ok(e)
}
