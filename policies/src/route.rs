//! Routing a request to an API and an operation: the longest segment-aligned API path prefix,
//! then the operation whose method and `urlTemplate` match. Matching ignores ASCII case, as
//! APIM's does.

use crate::catalog::{Catalog, PathApis};
use crate::decide::{host_of, trim_slashes, Request};
use crate::ids::{ApiId, OperationId};

/// Whether a path holds a dot segment (`.` or `..`, a dot written as itself or as `%2e`),
/// which a proxy that normalises paths (RFC 3986 §5.2.4, Envoy's `normalize_path`) has
/// removed. Such a path routes to no API: decided by its prefix, it would reach the upstream
/// still holding the `..` the upstream resolves, outside the API it was decided for.
pub(crate) fn has_dot_segment(path: &str) -> bool {
    if !path.bytes().any(|b| b == b'.' || b == b'%') {
        return false;
    }
    segments(path).any(|segment| {
        let (mut rest, mut dots) = (segment, 0);
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('.') {
                rest = after;
            } else if rest.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("%2e")) {
                rest = &rest[3..];
            } else {
                return false;
            }
            dots += 1;
        }
        dots <= 2
    })
}

/// The non-empty `/`-separated segments of a path.
pub(crate) fn segments(path: &str) -> Segments<'_> {
    Segments { rest: path }
}

/// The iterator of [`segments`]: a plain scan, as paths are short.
pub(crate) struct Segments<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let bytes = self.rest.as_bytes();
        let mut start = 0;
        while start < bytes.len() && bytes[start] == b'/' {
            start += 1;
        }
        if start == bytes.len() {
            self.rest = "";
            return None;
        }
        let mut end = start + 1;
        while end < bytes.len() && bytes[end] != b'/' {
            end += 1;
        }
        // Both ends are at a '/' or an end of the text: char boundaries.
        let segment = &self.rest[start..end];
        self.rest = &self.rest[end..];
        Some(segment)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Literal(String),
    /// A parameter, by its name (`id` of `{id}`).
    Param(Box<str>),
}

/// One template segment: `items`, `{id}`, or a mix such as `{id}.json`.
#[derive(Debug, Clone, PartialEq)]
struct Segment(Vec<Piece>);

/// A compiled `urlTemplate`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct UrlTemplate {
    segments: Vec<Segment>,
    /// A trailing `/*` (or `{*name}`) matches the rest of the path.
    rest: bool,
    /// The name of a trailing `{*name}`.
    rest_name: Option<Box<str>>,
    /// The query part (`?a={b}&c=d`): each parameter's name, and the template parameter its
    /// value fills (`b` of `a={b}`), if any.
    query: Vec<(Box<str>, Option<Box<str>>)>,
    /// Literal characters, to prefer the most specific of several matching templates.
    pub specificity: usize,
    /// For a template of literal segments only: them joined by single slashes, lower case, no
    /// outer slashes (`items/latest`), which a path in its normal form matches as text.
    literal: Option<Box<str>>,
}

impl UrlTemplate {
    pub fn parse(template: &str) -> Result<UrlTemplate, String> {
        let (path, query_part) = template.split_once('?').unwrap_or((template, ""));
        let query = query_part
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                let param = value
                    .strip_prefix('{')
                    .and_then(|v| v.strip_suffix('}'))
                    .map(Box::from);
                (Box::from(name), param)
            })
            .collect();
        let mut segments = Vec::new();
        let mut rest = false;
        let mut rest_name = None;
        let mut specificity = 0;
        let parts: Vec<&str> = segments_of(path);
        for (i, s) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            if last && (*s == "*" || (s.starts_with("{*") && s.ends_with('}'))) {
                rest = true;
                rest_name = s
                    .strip_prefix("{*")
                    .and_then(|n| n.strip_suffix('}'))
                    .map(Box::from);
                break;
            }
            let mut pieces = Vec::new();
            let mut text = *s;
            while !text.is_empty() {
                if let Some(open) = text.find('{') {
                    if open > 0 {
                        pieces.push(Piece::Literal(text[..open].to_ascii_lowercase()));
                        specificity += open;
                    }
                    let close = text[open..]
                        .find('}')
                        .ok_or_else(|| format!("unclosed '{{' in urlTemplate '{template}'"))?;
                    if matches!(pieces.last(), Some(Piece::Param(_))) {
                        return Err(format!(
                            "two parameters with nothing between them in urlTemplate '{template}'"
                        ));
                    }
                    pieces.push(Piece::Param(Box::from(&text[open + 1..open + close])));
                    text = &text[open + close + 1..];
                } else {
                    pieces.push(Piece::Literal(text.to_ascii_lowercase()));
                    specificity += text.len();
                    text = "";
                }
            }
            segments.push(Segment(pieces));
        }
        let literal = (!rest)
            .then(|| {
                segments
                    .iter()
                    .map(|s| match s.0.as_slice() {
                        [Piece::Literal(l)] => Some(l.as_str()),
                        _ => None,
                    })
                    .collect::<Option<Vec<&str>>>()
            })
            .flatten()
            .map(|parts| parts.join("/").into_boxed_str());
        Ok(UrlTemplate {
            segments,
            rest,
            rest_name,
            query,
            specificity,
            literal,
        })
    }

    /// Does the path below the API's prefix match? A template with another number of
    /// segments is told apart by the count alone; the path is split again only for one that
    /// may match.
    pub fn matches(&self, below: &Below<'_>) -> bool {
        if let (Some(literal), true) = (&self.literal, below.normal) {
            // Single slashes, lower case: one comparison, whatever the segments.
            let text = below.text.strip_prefix('/').unwrap_or(below.text);
            return text == &**literal;
        }
        let fits = if self.rest {
            below.segments >= self.segments.len()
        } else {
            below.segments == self.segments.len()
        };
        fits && self
            .segments
            .iter()
            .zip(segments(below.text))
            .all(|(seg, text)| match seg.0.as_slice() {
                // The usual segments, a literal or a parameter (a segment is never empty). A
                // literal is lower case, so a path without upper case matches it as it is.
                [Piece::Literal(l)] if !below.upper => text == l,
                [Piece::Literal(l)] => text.eq_ignore_ascii_case(l),
                [Piece::Param(_)] => true,
                pieces => match_pieces(pieces, text),
            })
    }
}

/// The path below an API's prefix (see [`below`]), how many segments it has, and whether it has
/// upper case.
pub(crate) struct Below<'a> {
    text: &'a str,
    segments: usize,
    upper: bool,
    /// In its normal form: lower case, single slashes, no slash at its end.
    normal: bool,
}

impl<'a> Below<'a> {
    pub fn new(text: &'a str) -> Self {
        // A segment begins at each byte that is not a '/' and follows one or the start.
        let (mut segments, mut upper) = (0, false);
        let mut previous = b'/';
        for &b in text.as_bytes() {
            segments += usize::from(previous == b'/' && b != b'/');
            upper |= b.is_ascii_uppercase();
            previous = b;
        }
        Below {
            text,
            segments,
            upper,
            normal: false,
        }
    }
}

impl<'a> Below<'a> {
    /// The path below an API's prefix in a path that is its own normal form (no upper case, no
    /// doubled slashes), whose segments were counted already.
    pub fn normal(text: &'a str, segments: usize) -> Self {
        Below {
            text,
            segments,
            upper: false,
            normal: true,
        }
    }
}

/// What routing needs to know of a path without its outer slashes, from one look at it: whether
/// it is its own normal form (lower case, single slashes), and how many slashes it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PathShape {
    pub upper: bool,
    pub doubled: bool,
    pub slashes: usize,
}

/// Each byte's low bit, and each byte's high bit, of a word of eight bytes.
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The high bit of each byte of `word` that is `b`.
fn bytes_equal(word: u64, b: u8) -> u64 {
    let zero_if_equal = word ^ (ONES * u64::from(b));
    // A byte is zero when neither its high bit nor (adding 0x7f to the others) a carry into it
    // is set. No carry crosses into the next byte.
    !(((zero_if_equal & !HIGHS) + !HIGHS) | zero_if_equal) & HIGHS
}

/// The high bit of each byte of `word` that is an ASCII upper-case letter.
fn upper_case(word: u64) -> u64 {
    let low = word & !HIGHS;
    // Adding 0x80 - c sets a byte's high bit when its low seven bits are at least c; no carry
    // crosses into the next byte. Bytes of 0x80 and above are no ASCII letter.
    let from_a = low + ONES * (0x80 - u64::from(b'A'));
    let past_z = low + ONES * (0x80 - u64::from(b'Z') - 1);
    from_a & !past_z & !word & HIGHS
}

/// The last `tail` bytes of `bytes` (fewer than eight) in the low bytes of a word, zeros
/// above. The word is put together in registers: bytes stored one by one and read back as a
/// word would wait for the stores.
fn tail_word(bytes: &[u8], tail: usize) -> u64 {
    if tail == 0 {
        return 0;
    }
    match bytes.last_chunk::<8>() {
        // The last eight bytes, less those already read as part of a word.
        Some(&last) => u64::from_le_bytes(last) >> (8 * (8 - tail)),
        None => bytes.iter().rev().fold(0, |w, &b| (w << 8) | u64::from(b)),
    }
}

impl PathShape {
    /// Reads the path eight bytes at a time (a short path costs a few words, not a loop per
    /// byte).
    pub fn of(path: &str) -> Self {
        let bytes = path.as_bytes();
        let (words, tail) = bytes.as_chunks::<8>();
        let last = tail_word(bytes, tail.len());
        let (mut upper, mut doubled, mut slashes) = (0u64, 0u64, 0u64);
        // The high bit of the previous word's last byte when it was a slash, moved to bit 7.
        let mut slash_before = 0u64;
        let words = words.iter().map(|&w| u64::from_le_bytes(w));
        for word in words.chain(std::iter::once(last)) {
            upper |= upper_case(word);
            let slash = bytes_equal(word, b'/');
            // Bytes are in little-endian order: a byte's neighbour before it is 8 bits lower.
            doubled |= slash & ((slash << 8) | slash_before);
            slash_before = (slash >> 56) & 0x80;
            // Each byte's slash as 0 or 1, summed into the top byte (at most 8).
            slashes += ((slash >> 7).wrapping_mul(ONES)) >> 56;
        }
        PathShape {
            upper: upper != 0,
            doubled: doubled != 0,
            slashes: slashes as usize,
        }
    }

    /// Whether the path must be rewritten before routing (upper case or doubled slashes).
    pub fn needs_normalising(&self) -> bool {
        self.upper || self.doubled
    }
}

/// The length of the first `n` segments of a path in its normal form, without outer slashes (all
/// of it when it has fewer): up to its `n`-th slash, found a word at a time.
pub(crate) fn first_segments(path: &str, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let bytes = path.as_bytes();
    let (words, tail) = bytes.as_chunks::<8>();
    let words = words.iter().map(|&w| u64::from_le_bytes(w));
    let mut seen = 0;
    for (i, word) in words
        .chain(std::iter::once(tail_word(bytes, tail.len())))
        .enumerate()
    {
        let mut slash = bytes_equal(word, b'/');
        let here = (((slash >> 7).wrapping_mul(ONES)) >> 56) as usize;
        if seen + here >= n {
            // This word holds the n-th: drop the slashes before it, lowest first.
            for _ in 1..n - seen {
                slash &= slash - 1;
            }
            return i * 8 + slash.trailing_zeros() as usize / 8;
        }
        seen += here;
    }
    bytes.len()
}

/// The part of `path` after its first `depth` segments.
pub(crate) fn below(path: &str, depth: usize) -> &str {
    let mut segments = segments(path);
    for _ in 0..depth {
        if segments.next().is_none() {
            return "";
        }
    }
    segments.rest
}

fn segments_of(path: &str) -> Vec<&str> {
    segments(path).collect()
}

fn match_pieces(pieces: &[Piece], text: &str) -> bool {
    capture_pieces(pieces, text, &mut ())
}

/// Where [`capture_pieces`] keeps what parameters matched: nowhere (`()`, for routing), or a
/// list of names and texts.
trait Captures<'t> {
    fn len(&self) -> usize;
    fn push(&mut self, name: &'t str, text: &'t str);
    fn truncate(&mut self, len: usize);
}

impl<'t> Captures<'t> for () {
    fn len(&self) -> usize {
        0
    }
    fn push(&mut self, _: &'t str, _: &'t str) {}
    fn truncate(&mut self, _: usize) {}
}

impl<'t> Captures<'t> for Vec<(&'t str, &'t str)> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn push(&mut self, name: &'t str, text: &'t str) {
        Vec::push(self, (name, text));
    }
    fn truncate(&mut self, len: usize) {
        Vec::truncate(self, len);
    }
}

/// Does a segment's text match its pieces (literals without case)? What each parameter
/// matched, the first way the segment matches, goes to `out`.
fn capture_pieces<'t>(pieces: &'t [Piece], text: &'t str, out: &mut impl Captures<'t>) -> bool {
    match pieces.split_first() {
        None => text.is_empty(),
        Some((Piece::Literal(l), rest)) => {
            text.len() >= l.len()
                && text.is_char_boundary(l.len())
                && text[..l.len()].eq_ignore_ascii_case(l)
                && capture_pieces(rest, &text[l.len()..], out)
        }
        Some((Piece::Param(name), rest)) => {
            let start = out.len();
            // The last piece takes the rest of the segment; another, as little as lets the
            // rest match.
            let first = if rest.is_empty() {
                text.len().max(1)
            } else {
                1
            };
            for i in (first..=text.len()).filter(|&i| text.is_char_boundary(i)) {
                out.push(name, &text[..i]);
                if capture_pieces(rest, &text[i..], out) {
                    return true;
                }
                out.truncate(start);
            }
            false
        }
    }
}

impl UrlTemplate {
    /// The template's parameters as a call matched them (`rewrite-uri` fills its own template
    /// with them): from the path below the API's prefix, as written (still percent-encoded),
    /// and from the query's parameters the template names (`?a={b}`), as written too.
    pub fn parameters<'t>(&'t self, below: &'t str, query: &'t str) -> Vec<(&'t str, &'t str)> {
        let mut out = Vec::new();
        let mut texts = segments(below);
        for seg in &self.segments {
            let Some(text) = texts.next() else { break };
            let start = out.len();
            if !capture_pieces(&seg.0, text, &mut out) {
                out.truncate(start);
            }
        }
        if let Some(name) = &self.rest_name {
            let taken: usize = self.segments.len();
            let rest = crate::route::below(below, taken);
            out.push((name, rest.strip_prefix('/').unwrap_or(rest)));
        }
        for (qname, param) in &self.query {
            if let Some(param) = param {
                let value = query.split('&').find_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (crate::decide::decode_component(k) == **qname).then_some(v)
                });
                if let Some(v) = value {
                    out.push((param, v));
                }
            }
        }
        out
    }

    /// The query parameters the template names (`a` of `?a={b}`).
    pub fn query_names(&self) -> impl Iterator<Item = &str> {
        self.query.iter().map(|(n, _)| &**n)
    }
}

// ---- routing a call to its API and operation ----

/// An API path looked up in the catalog's paths: hashed as the `String` keys are, compared
/// where it lies.
#[derive(Hash)]
struct PathText<'a>(&'a str);

impl hashbrown::Equivalent<String> for PathText<'_> {
    fn equivalent(&self, key: &String) -> bool {
        self.0 == key.as_str()
    }
}

impl Catalog {
    /// The API of a request, and the part of its path below the API's (when the path is as it
    /// came, else found again by the operation).
    pub(crate) fn route<'r>(&self, req: &Request<'r>) -> Option<(ApiId, Option<Below<'r>>)> {
        // Nearly every path is its own normal form: its segments, lower case, joined by single
        // slashes (outer slashes aside). Then it is routed as it is, without a copy, and what is
        // below the API's path has the segments the API's path has not.
        let trimmed = trim_slashes(req.path);
        if has_dot_segment(trimmed) {
            return None;
        }
        let shape = PathShape::of(trimmed);
        if shape.needs_normalising() {
            return self.route_normalised(req).map(|a| (a, None));
        }
        let segments = if trimmed.is_empty() {
            0
        } else {
            shape.slashes + 1
        };
        self.longest_api(trimmed, req.host).map(|(a, end)| {
            let depth = self.apis[a.index()].depth;
            (
                a,
                Some(Below::normal(
                    &trimmed[end..],
                    segments.saturating_sub(depth),
                )),
            )
        })
    }

    /// [`Self::route`] for a path with upper case or doubled slashes: routed in its normal form.
    #[cold]
    pub(crate) fn route_normalised(&self, req: &Request) -> Option<ApiId> {
        let mut joined = String::with_capacity(req.path.len());
        for seg in segments(req.path) {
            if !joined.is_empty() {
                joined.push('/');
            }
            joined.extend(seg.chars().map(|c| c.to_ascii_lowercase()));
        }
        self.longest_api(&joined, req.host).map(|(a, _)| a)
    }

    /// The API for `host` whose path is the longest segment-aligned prefix of `path` (a normal
    /// form, without outer slashes), and that prefix's length. Prefixes are tried longest first,
    /// from the first `deepest` segments (no API path is longer), down to the empty path.
    pub(crate) fn longest_api(&self, path: &str, host: &str) -> Option<(ApiId, usize)> {
        let mut end = first_segments(path, self.deepest);
        loop {
            if let Some(a) = self
                .paths
                .get(&PathText(&path[..end]))
                .and_then(|apis| self.api_for_host(apis, host))
            {
                return Some((a, end));
            }
            if end == 0 {
                return None;
            }
            // The prefix one segment shorter: up to the '/' before this one's last segment.
            end = path.as_bytes()[..end]
                .iter()
                .rposition(|&b| b == b'/')
                .unwrap_or(0);
        }
    }

    /// Of the APIs at one path, the one bound to `host`, else the one bound to none. The host
    /// is looked at only when an API there is bound to some.
    pub(crate) fn api_for_host(&self, apis: &PathApis, host: &str) -> Option<ApiId> {
        if apis.bound.is_empty() {
            return apis.open;
        }
        let host = host_of(host);
        let bound = apis.bound.iter().find(|&&a| {
            self.apis[a.index()]
                .hostnames
                .iter()
                .any(|h| h.eq_ignore_ascii_case(host))
        });
        bound.copied().or(apis.open)
    }

    /// The operation of `api` whose method and template match: the most specific (the most
    /// literal characters), the first listed of equals.
    pub(crate) fn operation(
        &self,
        api: ApiId,
        req: &Request,
        below: Option<Below>,
    ) -> Option<OperationId> {
        let a = &self.apis[api.index()];
        let below = below.unwrap_or_else(|| Below::new(crate::route::below(req.path, a.depth)));
        let mut best: Option<(usize, OperationId)> = None;
        for (i, o) in a.operations.iter().enumerate() {
            // A request's method is nearly always written as its operation's.
            let method = o.method == req.method
                || o.method == "*"
                || o.method.eq_ignore_ascii_case(req.method);
            let specificity = o.template.specificity;
            if method && best.is_none_or(|(s, _)| specificity > s) && o.template.matches(&below) {
                best = Some((specificity, OperationId(i as u32)));
            }
        }
        best.map(|(_, i)| i)
    }

    /// The API a request routes to, if any.
    pub(crate) fn route_api(&self, req: &Request) -> Option<ApiId> {
        self.route(req).map(|(api, _)| api)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_written_plainly_or_percent_encoded_are_found() {
        for path in [
            "echo/../admin",
            "echo/./x",
            "echo/%2e%2e/admin",
            "echo/%2E./admin",
            "echo/.%2e",
            "..",
            "echo/x/..",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in [
            "echo/items/1",
            "echo/...",
            "echo/v1.2/x",
            "echo/.well-known/x",
            "echo/%2e%2e%2e",
            "echo/a%2eb",
            "",
        ] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }

    fn m(t: &str, p: &str) -> bool {
        UrlTemplate::parse(t).unwrap().matches(&Below::new(p))
    }

    #[test]
    fn below_an_api_path() {
        assert_eq!(below("/svc/api-1/items/42", 2), "/items/42");
        assert_eq!(below("//svc//api-1", 2), "");
        assert_eq!(below("/svc", 2), "");
        assert_eq!(below("/svc/x/", 0), "/svc/x/");
        assert!(m("/items/{id}", below("/svc/api/items/7", 2)));
        assert!(!m("/items/{id}", below("/svc/api/items", 2)));
    }

    #[test]
    fn templates() {
        assert!(m("/items/{id}", "/items/1"));
        assert!(m("/items/{id}", "/ITEMS/1"));
        assert!(!m("/items/{id}", "/items"));
        assert!(!m("/items/{id}", "/items/1/2"));
        assert!(m("/items/*", "/items/1/2"));
        assert!(m("/items/{*rest}", "/items/1/2"));
        assert!(m("/items/{id}.json", "/items/7.json"));
        assert!(!m("/items/{id}.json", "/items/.json"));
        assert!(m("/search?q={q}", "/search"));
        assert!(m("/", "/"));
        assert!(!m("/", "/x"));
    }

    proptest::proptest! {
        #[test]
        fn a_path_has_as_many_segments_as_it_splits_into(path in "[a/é]{0,24}") {
            let split: Vec<&str> = segments(&path).collect();
            proptest::prop_assert_eq!(Below::new(&path).segments, split.len());
            proptest::prop_assert!(split.iter().all(|s| !s.is_empty() && !s.contains('/')));
            proptest::prop_assert_eq!(split.concat(), path.replace('/', ""));
        }
    }

    proptest::proptest! {
        /// A template of literals matches a path of as many segments that are the same but for
        /// ASCII case: the template's own segments with random letters in upper case, or any
        /// other path.
        #[test]
        fn a_literal_segment_matches_whatever_its_case(
            template in proptest::collection::vec("[abé]{1,3}", 1..4),
            upper in proptest::collection::vec(proptest::bool::ANY, 12),
            other in proptest::option::of("[aAbBé/]{0,14}"),
        ) {
            let path = other.unwrap_or_else(|| {
                let path = format!("/{}", template.join("/"));
                path.chars()
                    .zip(upper.iter().cycle())
                    .map(|(c, &up)| if up { c.to_ascii_uppercase() } else { c })
                    .collect()
            });
            let parsed = UrlTemplate::parse(&format!("/{}", template.join("/"))).unwrap();
            let split: Vec<&str> = segments(&path).collect();
            let expected = split.len() == template.len()
                && split.iter().zip(&template).all(|(s, t)| s.eq_ignore_ascii_case(t));
            proptest::prop_assert_eq!(parsed.matches(&Below::new(&path)), expected);
        }
    }

    proptest::proptest! {
        /// The shape of a path, read a word at a time, is what a look at each byte finds.
        #[test]
        fn a_path_shape_is_what_each_byte_says(path in "[aZz@\\[/é.]{0,40}") {
            let b = path.as_bytes();
            let expected = PathShape {
                upper: b.iter().any(|c| c.is_ascii_uppercase()),
                doubled: path.contains("//"),
                slashes: b.iter().filter(|&&c| c == b'/').count(),
            };
            proptest::prop_assert_eq!(PathShape::of(&path), expected);
        }
    }

    proptest::proptest! {
        /// A path in its normal form matches a template as text exactly when it matches it
        /// segment by segment.
        #[test]
        fn a_normal_path_matches_as_its_segments_do(
            template in proptest::collection::vec("[ab]{1,2}|\\{id\\}", 0..4),
            rest in proptest::bool::ANY,
            path in "[ab/]{0,12}",
        ) {
            let template = format!("/{}{}", template.join("/"), if rest { "/*" } else { "" });
            let parsed = UrlTemplate::parse(&template).unwrap();
            let split: Vec<&str> = segments(&path).collect();
            let normal = split.iter().map(|s| format!("/{s}")).collect::<String>();
            proptest::prop_assert_eq!(
                parsed.matches(&Below::normal(&normal, split.len())),
                parsed.matches(&Below::new(&normal)),
                "template {} path {}", template, normal
            );
        }
    }

    proptest::proptest! {
        /// The first segments of a path, found a word at a time, end where a look at each byte
        /// finds its n-th slash.
        #[test]
        fn the_first_segments_end_at_the_nth_slash(path in "[ab/é]{0,40}", n in 0usize..8) {
            let expected = match n {
                0 => 0,
                n => path
                    .bytes()
                    .enumerate()
                    .filter(|&(_, b)| b == b'/')
                    .nth(n - 1)
                    .map_or(path.len(), |(i, _)| i),
            };
            proptest::prop_assert_eq!(first_segments(&path, n), expected);
        }
    }

    #[test]
    fn parameters_are_what_the_call_matched() {
        let t = UrlTemplate::parse("/stores/{store}/orders/{id}.json?expand={e}&x=1").unwrap();
        assert_eq!(
            t.parameters("/stores/12/orders/7.json", "a=1&expand=lines%20all"),
            vec![("store", "12"), ("id", "7"), ("e", "lines%20all")]
        );
        assert_eq!(t.query_names().collect::<Vec<_>>(), vec!["expand", "x"]);
        let rest = UrlTemplate::parse("/files/{*path}").unwrap();
        assert_eq!(rest.parameters("/files/a/b/c", ""), vec![("path", "a/b/c")]);
    }

    #[test]
    fn specificity_prefers_literals() {
        let a = UrlTemplate::parse("/items/{id}").unwrap();
        let b = UrlTemplate::parse("/items/latest").unwrap();
        assert!(b.specificity > a.specificity);
    }
}
