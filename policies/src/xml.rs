//! Reading policy documents in both of APIM's formats.
//!
//! The escaped format is plain XML. The raw format (`application/vnd.ms-azure-apim.policy.raw+xml`)
//! writes the C# of `@(...)` and `@{...}` unescaped, so `"`, `<`, `>` and `&&` stand bare inside
//! attribute values and text. A pre-pass ([`protect_expressions`]) finds each expression by
//! balancing its brackets (skipping C# string and char literals and comments), escapes what XML
//! would choke on, and leaves everything already escaped alone. The result is parsed by
//! quick-xml into a small element tree whose positions point back into the document as written.

use quick_xml::events::Event;
use quick_xml::Reader;

/// The largest policy document read: APIM's own limit on a policy document.
pub(crate) const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// The deepest nesting of elements read (`<policies>` and its sections count): deeper than any
/// real document, shallow enough that every walk of the tree fits any stack.
pub(crate) const MAX_DEPTH: usize = 64;

/// The most elements one document may hold.
pub(crate) const MAX_ELEMENTS: usize = 10_000;

/// A 1-based line and column in the original document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Pos {
    pub line: u32,
    pub column: u32,
}

/// An element of a policy document.
#[derive(Debug, Clone)]
pub(crate) struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
    /// The element's own text (not its children's), entities resolved, trimmed.
    pub text: String,
    pub pos: Pos,
}

impl Element {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A fault in a document, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct XmlError {
    pub pos: Pos,
    pub message: String,
}

/// Maps positions in the protected text back to the original.
struct OffsetMap {
    /// (offset in protected text, offset in original), at every place they start to differ.
    marks: Vec<(usize, usize)>,
}

impl OffsetMap {
    fn original(&self, out: usize) -> usize {
        let i = self.marks.partition_point(|(o, _)| *o <= out);
        if i == 0 {
            return out;
        }
        let (o, inp) = self.marks[i - 1];
        inp + (out - o)
    }
}

/// The line and column of a byte offset of `text` (one look, for an error).
pub(crate) fn position_of(text: &str, offset: usize) -> Pos {
    Positions::new(text).at(offset)
}

/// Positions in one text: its line starts found once, and the last position asked kept, so that
/// positions asked in order (every element of a document, as it is read) cost time in
/// proportion to the text between them, never a scan from the start.
pub(crate) struct Positions<'t> {
    text: &'t [u8],
    /// The offset where each line starts.
    line_starts: Vec<usize>,
    /// The last position asked: its offset, and its position.
    last: std::cell::Cell<(usize, Pos)>,
}

impl<'t> Positions<'t> {
    pub(crate) fn new(text: &'t str) -> Self {
        let text = text.as_bytes();
        let mut line_starts = vec![0];
        line_starts.extend(
            text.iter()
                .enumerate()
                .filter(|(_, &b)| b == b'\n')
                .map(|(i, _)| i + 1),
        );
        Positions {
            text,
            line_starts,
            last: std::cell::Cell::new((0, Pos { line: 1, column: 1 })),
        }
    }

    /// Columns count characters: the bytes that do not continue a UTF-8 sequence.
    fn chars(bytes: &[u8]) -> u32 {
        bytes.iter().filter(|&&b| (b & 0xC0) != 0x80).count() as u32
    }

    pub(crate) fn at(&self, offset: usize) -> Pos {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let start = self.line_starts[line - 1];
        let (last_offset, last_pos) = self.last.get();
        let column = if last_pos.line as usize == line && last_offset <= offset {
            last_pos.column + Self::chars(&self.text[last_offset..offset])
        } else {
            1 + Self::chars(&self.text[start..offset])
        };
        let pos = Pos {
            line: line as u32,
            column,
        };
        self.last.set((offset, pos));
        pos
    }
}

/// The context an expression stands in: element text, or an attribute value with its quote.
#[derive(Clone, Copy, PartialEq)]
enum Place {
    Text,
    Attr(u8),
}

/// Where something that must be closed was opened, and what it was.
struct Unterminated(usize, &'static str);

struct Protector<'a> {
    src: &'a [u8],
    i: usize,
    out: Vec<u8>,
    marks: Vec<(usize, usize)>,
}

impl<'a> Protector<'a> {
    fn copy(&mut self, n: usize) {
        let end = (self.i + n).min(self.src.len());
        self.out.extend_from_slice(&self.src[self.i..end]);
        self.i = end;
    }

    fn copy_until(&mut self, terminator: &[u8]) {
        match find(&self.src[self.i..], terminator) {
            Some(p) => self.copy(p + terminator.len()),
            None => self.copy(self.src.len() - self.i),
        }
    }

    fn replace(&mut self, consumed: usize, with: &[u8]) {
        self.out.extend_from_slice(with);
        self.i += consumed;
        self.marks.push((self.out.len(), self.i));
    }

    fn starts_with(&self, s: &[u8]) -> bool {
        self.src[self.i..].starts_with(s)
    }

    /// An entity at the cursor (`&quot;`, `&#34;`...): its length and the character it stands for.
    fn entity(&self) -> Option<(usize, u8)> {
        let rest = &self.src[self.i..];
        let end = rest.iter().take(12).position(|&b| b == b';')?;
        let name = &rest[1..end];
        let c = match name {
            b"quot" => b'"',
            b"apos" => b'\'',
            b"lt" => b'<',
            b"gt" => b'>',
            b"amp" => b'&',
            _ if name.first() == Some(&b'#') => {
                let n = if name.get(1) == Some(&b'x') {
                    u32::from_str_radix(std::str::from_utf8(&name[2..]).ok()?, 16).ok()?
                } else {
                    std::str::from_utf8(&name[1..]).ok()?.parse().ok()?
                };
                if n < 128 {
                    n as u8
                } else {
                    b'?'
                }
            }
            _ => return None,
        };
        Some((end + 1, c))
    }

    /// Reads one logical character of an expression, escaping it as its place needs.
    fn expression_char(&mut self, place: Place) -> u8 {
        let b = self.src[self.i];
        if b == b'&' {
            if let Some((len, c)) = self.entity() {
                self.copy(len);
                return c;
            }
            self.replace(1, b"&amp;");
            return b'&';
        }
        match (b, place) {
            (b'<', _) => self.replace(1, b"&lt;"),
            (b'>', _) => self.replace(1, b"&gt;"),
            (b'"', Place::Attr(b'"')) => self.replace(1, b"&quot;"),
            (b'\'', Place::Attr(b'\'')) => self.replace(1, b"&apos;"),
            _ => self.copy(1),
        }
        b
    }

    /// At `@(` or `@{`: copies the whole expression, protected. Errors on an unbalanced one.
    fn expression(&mut self, place: Place) -> Result<(), Unterminated> {
        let start = self.i;
        self.copy(1); // '@'
        let mut depth = 0usize;
        loop {
            if self.i >= self.src.len() {
                return Err(Unterminated(start, "policy expression"));
            }
            let verbatim = self.starts_with(b"@\"") || self.starts_with(b"$@\"");
            let c = self.expression_char(place);
            match c {
                b'(' | b'{' | b'[' => depth += 1,
                b')' | b'}' | b']' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        return Ok(());
                    }
                }
                b'"' | b'\'' => self.literal(c, false, place)?,
                b'@' | b'$' if verbatim => {
                    while self.i < self.src.len() {
                        let q = self.expression_char(place);
                        if q == b'"' {
                            break;
                        }
                    }
                    self.literal(b'"', true, place)?;
                }
                // Comments are escaped like the code around them: they may hold `"`, `<`, `&`.
                b'/' if self.starts_with(b"/") => {
                    while self.i < self.src.len() && self.src[self.i] != b'\n' {
                        self.expression_char(place);
                    }
                }
                b'/' if self.starts_with(b"*") => {
                    let mut previous = 0u8;
                    while self.i < self.src.len() {
                        let c = self.expression_char(place);
                        if previous == b'*' && c == b'/' {
                            break;
                        }
                        previous = c;
                    }
                }
                _ => {}
            }
        }
    }

    /// Skips the rest of a C# string or char literal whose opening quote was read.
    fn literal(&mut self, quote: u8, verbatim: bool, place: Place) -> Result<(), Unterminated> {
        let start = self.i.saturating_sub(1);
        loop {
            if self.i >= self.src.len() {
                return Err(Unterminated(start, "string literal in a policy expression"));
            }
            let c = self.expression_char(place);
            if c == b'\\' && !verbatim {
                if self.i < self.src.len() {
                    self.expression_char(place);
                }
            } else if c == quote {
                if verbatim && self.i < self.src.len() && self.src[self.i] == b'"' {
                    self.expression_char(place);
                    continue;
                }
                return Ok(());
            }
        }
    }

    fn run(mut self) -> Result<(String, OffsetMap), Unterminated> {
        while self.i < self.src.len() {
            if self.starts_with(b"<!--") {
                self.copy_until(b"-->");
            } else if self.starts_with(b"<![CDATA[") {
                self.copy_until(b"]]>");
            } else if self.starts_with(b"<?") || self.starts_with(b"<!") {
                self.copy_until(b">");
            } else if self.starts_with(b"<") {
                self.tag()?;
            } else if self.starts_with(b"@(") || self.starts_with(b"@{") {
                self.expression(Place::Text)?;
            } else {
                self.copy(1);
            }
        }
        let text = String::from_utf8(self.out)
            .map_err(|e| Unterminated(e.utf8_error().valid_up_to(), "UTF-8 text"))?;
        Ok((text, OffsetMap { marks: self.marks }))
    }

    fn tag(&mut self) -> Result<(), Unterminated> {
        self.copy(1);
        while self.i < self.src.len() {
            let b = self.src[self.i];
            match b {
                b'>' => {
                    self.copy(1);
                    return Ok(());
                }
                b'"' | b'\'' => {
                    self.copy(1);
                    while self.i < self.src.len() && self.src[self.i] != b {
                        if self.starts_with(b"@(") || self.starts_with(b"@{") {
                            self.expression(Place::Attr(b))?;
                        } else {
                            self.copy(1);
                        }
                    }
                    self.copy(1);
                }
                _ => self.copy(1),
            }
        }
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Escapes the C# of raw-format expressions so that the document is well-formed XML.
fn protect_expressions(src: &str) -> Result<(String, OffsetMap), XmlError> {
    let p = Protector {
        src: src.as_bytes(),
        i: 0,
        out: Vec::with_capacity(src.len() + 64),
        marks: Vec::new(),
    };
    p.run().map_err(|Unterminated(at, what)| XmlError {
        pos: position_of(src, at),
        message: format!("unterminated {what}"),
    })
}

/// Parses a policy document (either format) into its root element.
pub(crate) fn parse_document(src: &str) -> Result<Element, XmlError> {
    if src.len() > MAX_DOCUMENT_BYTES {
        return Err(XmlError {
            pos: Pos { line: 1, column: 1 },
            message: format!(
                "the document is {} bytes; a policy document may have at most {MAX_DOCUMENT_BYTES} (256 KiB, APIM's own limit)",
                src.len()
            ),
        });
    }
    let (text, map) = protect_expressions(src)?;
    let positions = Positions::new(src);
    let at = |offset: u64| positions.at(map.original(offset as usize));
    let mut elements = 0usize;
    let mut reader = Reader::from_str(&text);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let before = reader.buffer_position();
        let event = reader.read_event().map_err(|e| XmlError {
            pos: at(reader.error_position()),
            message: e.to_string(),
        })?;
        let xml_err = |message: String| XmlError {
            pos: at(before),
            message,
        };
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                let mut attrs = Vec::new();
                for a in e.attributes() {
                    let a = a.map_err(|e| xml_err(e.to_string()))?;
                    let value = a
                        .unescape_value()
                        .map_err(|e| xml_err(format!("in attribute: {e}")))?;
                    attrs.push((
                        String::from_utf8_lossy(a.key.as_ref()).into_owned(),
                        value.into_owned(),
                    ));
                }
                let el = Element {
                    name,
                    attrs,
                    children: Vec::new(),
                    text: String::new(),
                    pos: at(before),
                };
                if root.is_some() && stack.is_empty() {
                    return Err(xml_err("content after the root element".into()));
                }
                elements += 1;
                if elements > MAX_ELEMENTS {
                    return Err(xml_err(format!(
                        "more than {MAX_ELEMENTS} elements in one policy document"
                    )));
                }
                if matches!(event, Event::Start(_)) && stack.len() >= MAX_DEPTH {
                    return Err(xml_err(format!(
                        "elements nested more than {MAX_DEPTH} deep"
                    )));
                }
                if matches!(event, Event::Start(_)) {
                    stack.push(el);
                } else {
                    close(&mut stack, &mut root, el);
                }
            }
            Event::End(_) => {
                let el = stack
                    .pop()
                    .ok_or_else(|| xml_err("unexpected closing tag".into()))?;
                close(&mut stack, &mut root, el);
            }
            Event::Text(t) => {
                let s = t.decode().map_err(|e| xml_err(e.to_string()))?;
                push_text(&mut stack, &s, &xml_err)?;
            }
            Event::GeneralRef(r) => {
                let name = r.decode().map_err(|e| xml_err(e.to_string()))?;
                let s = quick_xml::escape::unescape(&format!("&{name};"))
                    .map_err(|e| xml_err(e.to_string()))?
                    .into_owned();
                push_text(&mut stack, &s, &xml_err)?;
            }
            Event::CData(t) => {
                let s = t.decode().map_err(|e| xml_err(e.to_string()))?.into_owned();
                push_text(&mut stack, &s, &xml_err)?;
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if let Some(open) = stack.last() {
        return Err(XmlError {
            pos: open.pos,
            message: format!("element <{}> is not closed", open.name),
        });
    }
    let mut root = root.ok_or(XmlError {
        pos: Pos { line: 1, column: 1 },
        message: "the document has no root element".into(),
    })?;
    trim_all(&mut root);
    Ok(root)
}

fn push_text(
    stack: &mut [Element],
    s: &str,
    err: &dyn Fn(String) -> XmlError,
) -> Result<(), XmlError> {
    match stack.last_mut() {
        Some(el) => el.text.push_str(s),
        None if s.trim().is_empty() => {}
        None => return Err(err("text outside the root element".into())),
    }
    Ok(())
}

fn close(stack: &mut [Element], root: &mut Option<Element>, el: Element) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(el),
        None => *root = Some(el),
    }
}

fn trim_all(el: &mut Element) {
    let t = el.text.trim();
    if t.len() != el.text.len() {
        el.text = t.to_string();
    }
    for c in &mut el.children {
        trim_all(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_format_expressions_survive() {
        let doc = r#"<!-- lead --><policies><inbound>
  <set-header name="x" exists-action="override"><value>@(context.Request.Headers.GetValueOrDefault("a","<b>") + "&&")</value></set-header>
  <rate-limit-by-key calls="1" renewal-period="1" counter-key="@(context.Request.Headers.GetValueOrDefault("k", ""))" increment-condition="@(context.Response.StatusCode >= 200 && context.Response.StatusCode < 300)" />
</inbound></policies>"#;
        let root = parse_document(doc).unwrap();
        assert_eq!(root.name, "policies");
        let inbound = &root.children[0];
        assert_eq!(
            inbound.children[0].children[0].text,
            r#"@(context.Request.Headers.GetValueOrDefault("a","<b>") + "&&")"#
        );
        assert_eq!(
            inbound.children[1].attr("increment-condition"),
            Some("@(context.Response.StatusCode >= 200 && context.Response.StatusCode < 300)")
        );
        assert_eq!(inbound.children[1].pos, Pos { line: 3, column: 3 });
    }

    #[test]
    fn escaped_format_is_left_alone() {
        let doc = r#"<policies><inbound><check-header name="a" failed-check-httpcode="401" failed-check-error-message="@(&quot;x)&quot; + &quot;&amp;&quot;)" ignore-case="true" /></inbound></policies>"#;
        let root = parse_document(doc).unwrap();
        assert_eq!(
            root.children[0].children[0].attr("failed-check-error-message"),
            Some(r#"@("x)" + "&")"#)
        );
    }

    #[test]
    fn multi_statement_blocks_and_verbatim_strings() {
        let doc = "<policies><inbound><set-body>@{ var s = @\"a\"\"}\"; if (s.Length > 1) { return \"<\"; } return s; }</set-body></inbound></policies>";
        let root = parse_document(doc).unwrap();
        assert!(root.children[0].children[0].text.ends_with("return s; }"));
    }

    #[test]
    fn errors_carry_original_positions() {
        let doc = "<policies>\n  <inbound>\n    <x a=\"@(\"<\")\" b=1 />\n</policies>";
        let e = parse_document(doc).unwrap_err();
        assert_eq!(e.pos.line, 3, "{e:?}");
        let e = parse_document("<policies>\n<inbound>@(\"x\"\n</inbound></policies>").unwrap_err();
        assert_eq!(e.message, "unterminated policy expression");
        assert_eq!(
            e.pos,
            Pos {
                line: 2,
                column: 10
            }
        );
    }

    #[test]
    fn comments_inside_code_are_escaped_too() {
        let doc = "<policies><inbound><set-body>@{\n// As<string>() & \"quotes\"\n/* a < b */ return \"x\"; }</set-body><x a=\"@{ // c \"q\"\n return 1; }\" /></inbound></policies>";
        let root = parse_document(doc).unwrap();
        assert!(root.children[0].children[0]
            .text
            .contains("// As<string>() & \"quotes\""));
        assert!(root.children[0].children[1]
            .attr("a")
            .unwrap()
            .contains("// c \"q\""));
    }

    #[test]
    fn unterminated_string_literal_is_named() {
        let e = parse_document(
            "<policies><inbound><set-body>@{ var s = \"abc; }</set-body></inbound></policies>",
        )
        .unwrap_err();
        assert_eq!(
            e.message,
            "unterminated string literal in a policy expression"
        );
        assert_eq!(
            e.pos,
            Pos {
                line: 1,
                column: 41
            }
        );
    }

    #[test]
    fn unclosed_element_is_named() {
        let e = parse_document("<policies><inbound></policies>").unwrap_err();
        assert!(
            e.message.contains("inbound") || e.message.contains("mismatch"),
            "{e:?}"
        );
    }

    /// `<policies>` with `depth` elements nested inside one another.
    fn nested(depth: usize) -> String {
        format!(
            "<policies>{}{}</policies>",
            "<a>".repeat(depth - 1),
            "</a>".repeat(depth - 1)
        )
    }

    #[test]
    fn nesting_elements_and_size_hold_at_their_limits_and_refuse_past() {
        assert!(parse_document(&nested(MAX_DEPTH)).is_ok());
        let e = parse_document(&nested(MAX_DEPTH + 1)).unwrap_err();
        assert_eq!(e.message, "elements nested more than 64 deep");
        assert_eq!(
            e.pos,
            Pos {
                line: 1,
                column: 1 + 10 + 3 * (MAX_DEPTH - 1) as u32
            }
        );
        // 50,000 deep is refused as quickly, and nothing walks it.
        assert!(parse_document(&nested(50_000)).is_err());
        let flat = |n: usize| format!("<policies>{}</policies>", "<b/>".repeat(n - 1));
        assert!(parse_document(&flat(MAX_ELEMENTS)).is_ok());
        let e = parse_document(&flat(MAX_ELEMENTS + 1)).unwrap_err();
        assert!(
            e.message.contains("more than 10000 elements"),
            "{}",
            e.message
        );
        let big = |n: usize| format!("<policies>{}</policies>", " ".repeat(n - 21));
        assert!(parse_document(&big(MAX_DOCUMENT_BYTES)).is_ok());
        let e = parse_document(&big(MAX_DOCUMENT_BYTES + 1)).unwrap_err();
        assert!(e.message.contains("at most 262144"), "{}", e.message);
    }

    #[test]
    fn positions_asked_in_any_order_are_the_same_as_one_at_a_time() {
        let text = "ab\ncdé\n\nxyz";
        let p = Positions::new(text);
        let all: Vec<usize> = (0..=text.len()).collect();
        // Counted directly: newlines before, and characters since the last one.
        let naive = |o: usize| {
            let before = &text[..o];
            Pos {
                line: before.matches('\n').count() as u32 + 1,
                column: before.rsplit('\n').next().unwrap_or("").chars().count() as u32 + 1,
            }
        };
        let all: Vec<usize> = all
            .into_iter()
            .filter(|&o| text.is_char_boundary(o))
            .collect();
        let fresh: Vec<Pos> = all.iter().map(|&o| naive(o)).collect();
        let in_order: Vec<Pos> = all.iter().map(|&o| p.at(o)).collect();
        let backwards: Vec<Pos> = all.iter().rev().map(|&o| p.at(o)).collect();
        assert_eq!(in_order, fresh);
        assert_eq!(backwards.into_iter().rev().collect::<Vec<_>>(), fresh);
        assert_eq!(p.at(6), Pos { line: 2, column: 4 });
        assert_eq!(p.at(text.len()), Pos { line: 4, column: 4 });
    }
}
