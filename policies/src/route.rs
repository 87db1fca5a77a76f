//! Routing a request to an API and an operation: the longest segment-aligned API path prefix,
//! then the operation whose method and `urlTemplate` match. Matching ignores ASCII case, as
//! APIM's does.

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
    Param,
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
    /// Literal characters, to prefer the most specific of several matching templates.
    pub specificity: usize,
}

impl UrlTemplate {
    pub fn parse(template: &str) -> Result<UrlTemplate, String> {
        let path = template.split('?').next().unwrap_or("");
        let mut segments = Vec::new();
        let mut rest = false;
        let mut specificity = 0;
        let parts: Vec<&str> = segments_of(path);
        for (i, s) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            if last && (*s == "*" || (s.starts_with("{*") && s.ends_with('}'))) {
                rest = true;
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
                    if pieces.last() == Some(&Piece::Param) {
                        return Err(format!(
                            "two parameters with nothing between them in urlTemplate '{template}'"
                        ));
                    }
                    pieces.push(Piece::Param);
                    text = &text[open + close + 1..];
                } else {
                    pieces.push(Piece::Literal(text.to_ascii_lowercase()));
                    specificity += text.len();
                    text = "";
                }
            }
            segments.push(Segment(pieces));
        }
        Ok(UrlTemplate {
            segments,
            rest,
            specificity,
        })
    }

    /// Does the path below the API's prefix match? A template with another number of
    /// segments is told apart by the count alone; the path is split again only for one that
    /// may match.
    pub fn matches(&self, below: &Below<'_>) -> bool {
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
                [Piece::Param] => true,
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
        }
    }
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
    match pieces.split_first() {
        None => text.is_empty(),
        Some((Piece::Literal(l), rest)) => {
            text.len() >= l.len()
                && text.is_char_boundary(l.len())
                && text[..l.len()].eq_ignore_ascii_case(l)
                && match_pieces(rest, &text[l.len()..])
        }
        Some((Piece::Param, rest)) => {
            if rest.is_empty() {
                return !text.is_empty();
            }
            (1..=text.len())
                .filter(|&i| text.is_char_boundary(i))
                .any(|i| match_pieces(rest, &text[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn specificity_prefers_literals() {
        let a = UrlTemplate::parse("/items/{id}").unwrap();
        let b = UrlTemplate::parse("/items/latest").unwrap();
        assert!(b.specificity > a.specificity);
    }
}
