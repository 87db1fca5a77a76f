//! `cors`, APIM's cross-origin resource sharing policy: its settings as compiled at load, and
//! what it answers. A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`)
//! is answered at the edge; an actual cross-origin call (one with `Origin`) gets the
//! `Access-Control-*` headers on its response. Where APIM's reference is silent, the Fetch
//! standard's CORS protocol decides (docs/choices.md).

use crate::decide::header;
use std::borrow::Cow;

/// Origins, methods or headers a `cors` allows: all (`*`) or those listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Allowed {
    Any,
    /// Compared without ASCII case; origins without a trailing `/`.
    Listed(Vec<String>),
}

impl Allowed {
    fn allows(&self, value: &str) -> bool {
        match self {
            Allowed::Any => true,
            Allowed::Listed(list) => list.iter().any(|v| v.eq_ignore_ascii_case(value)),
        }
    }
}

/// A compiled `<cors>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cors {
    pub allow_credentials: bool,
    /// `terminate-unmatched-request` (default true).
    pub terminate_unmatched: bool,
    pub origins: Allowed,
    /// Default: `GET` and `POST`.
    pub methods: Allowed,
    /// Default: none.
    pub headers: Allowed,
    pub expose: Vec<String>,
    /// `preflight-result-max-age`, seconds.
    pub max_age: Option<u64>,
}

/// A header of a CORS answer.
pub(crate) type AnswerHeader = (Cow<'static, str>, Cow<'static, str>);

/// An origin as it is compared: without a trailing `/` (APIM's examples write
/// `http://example.com/`; browsers send `http://example.com`).
pub(crate) fn normal_origin(origin: &str) -> &str {
    origin.trim().trim_end_matches('/')
}

impl Cors {
    /// Does this policy allow calls from `origin`?
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.origins.allows(normal_origin(origin))
    }

    /// `Access-Control-Allow-Origin` (and `-Credentials`) for an allowed `origin`: `*` when any
    /// origin is allowed (never with credentials: refused at load), else the origin itself,
    /// with `Vary: Origin`, since the answer then depends on it.
    fn origin_headers(&self, origin: &str, out: &mut Vec<AnswerHeader>) {
        match self.origins {
            Allowed::Any => out.push((
                Cow::Borrowed("access-control-allow-origin"),
                Cow::Borrowed("*"),
            )),
            Allowed::Listed(_) => {
                out.push((
                    Cow::Borrowed("access-control-allow-origin"),
                    Cow::Owned(origin.trim().to_string()),
                ));
                out.push((Cow::Borrowed("vary"), Cow::Borrowed("Origin")));
            }
        }
        if self.allow_credentials {
            out.push((
                Cow::Borrowed("access-control-allow-credentials"),
                Cow::Borrowed("true"),
            ));
        }
    }

    /// The answer to a preflight from an allowed `origin` for `method` with `requested`
    /// headers (`Access-Control-Request-Headers`): the method when it is allowed, the
    /// requested headers that are allowed, and the preflight's lifetime.
    pub fn preflight(
        &self,
        origin: &str,
        method: &str,
        requested: Option<&str>,
    ) -> Vec<AnswerHeader> {
        let mut out = Vec::with_capacity(5);
        self.origin_headers(origin, &mut out);
        if self.methods.allows(method.trim()) {
            out.push((
                Cow::Borrowed("access-control-allow-methods"),
                Cow::Owned(method.trim().to_string()),
            ));
        }
        let allowed: Vec<&str> = requested
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty() && self.headers.allows(h))
            .collect();
        if !allowed.is_empty() {
            out.push((
                Cow::Borrowed("access-control-allow-headers"),
                Cow::Owned(allowed.join(", ")),
            ));
        }
        if let Some(age) = self.max_age {
            out.push((
                Cow::Borrowed("access-control-max-age"),
                Cow::Owned(age.to_string()),
            ));
        }
        out
    }

    /// The headers an actual call from an allowed `origin` gets on its response.
    pub fn actual(&self, origin: &str) -> Vec<AnswerHeader> {
        let mut out = Vec::with_capacity(3);
        self.origin_headers(origin, &mut out);
        if !self.expose.is_empty() {
            out.push((
                Cow::Borrowed("access-control-expose-headers"),
                Cow::Owned(self.expose.join(", ")),
            ));
        }
        out
    }
}

/// A preflight's origin and requested method, when `method` and `headers` make one.
pub(crate) fn preflight<'r>(
    method: &str,
    headers: &'r [(String, String)],
) -> Option<(&'r str, &'r str)> {
    if !method.eq_ignore_ascii_case("OPTIONS") {
        return None;
    }
    Some((
        header(headers, "origin")?,
        header(headers, "access-control-request-method")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(items: &[&str]) -> Allowed {
        Allowed::Listed(items.iter().map(|s| s.to_string()).collect())
    }

    fn cors() -> Cors {
        Cors {
            allow_credentials: false,
            terminate_unmatched: true,
            origins: listed(&["https://app.contoso.com"]),
            methods: listed(&["GET", "POST"]),
            headers: listed(&["content-type", "x-custom"]),
            expose: vec!["x-ratelimit-remaining".into()],
            max_age: Some(300),
        }
    }

    fn find(h: &[AnswerHeader], name: &str) -> Option<String> {
        h.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.to_string())
    }

    #[test]
    fn origins_compare_without_case_or_trailing_slash() {
        let c = cors();
        assert!(c.allows_origin("https://app.contoso.com"));
        assert!(c.allows_origin("HTTPS://APP.contoso.com/"));
        assert!(!c.allows_origin("https://evil.example"));
        assert!(!c.allows_origin("https://app.contoso.com:8443"));
    }

    #[test]
    fn a_preflight_answer_names_what_is_allowed_of_what_was_asked() {
        let h = cors().preflight(
            "https://app.contoso.com",
            "POST",
            Some("Content-Type, X-Other"),
        );
        assert_eq!(
            find(&h, "access-control-allow-origin").as_deref(),
            Some("https://app.contoso.com")
        );
        assert_eq!(
            find(&h, "access-control-allow-methods").as_deref(),
            Some("POST")
        );
        assert_eq!(
            find(&h, "access-control-allow-headers").as_deref(),
            Some("Content-Type")
        );
        assert_eq!(find(&h, "access-control-max-age").as_deref(), Some("300"));
        assert_eq!(find(&h, "access-control-allow-credentials"), None);
        // A method not allowed is not named: the browser refuses the call.
        let h = cors().preflight("https://app.contoso.com", "DELETE", None);
        assert_eq!(find(&h, "access-control-allow-methods"), None);
        assert_eq!(find(&h, "access-control-allow-headers"), None);
    }

    #[test]
    fn any_origin_is_a_star_and_a_listed_one_is_echoed() {
        let mut c = cors();
        c.origins = Allowed::Any;
        let h = c.actual("https://x.example");
        assert_eq!(
            find(&h, "access-control-allow-origin").as_deref(),
            Some("*")
        );
        assert_eq!(find(&h, "vary"), None);
        assert_eq!(
            find(&h, "access-control-expose-headers").as_deref(),
            Some("x-ratelimit-remaining")
        );
        let mut c = cors();
        c.allow_credentials = true;
        let h = c.actual("https://app.contoso.com");
        assert_eq!(
            find(&h, "access-control-allow-origin").as_deref(),
            Some("https://app.contoso.com")
        );
        assert_eq!(find(&h, "vary").as_deref(), Some("Origin"));
        assert_eq!(
            find(&h, "access-control-allow-credentials").as_deref(),
            Some("true")
        );
    }

    #[test]
    fn only_options_with_origin_and_a_requested_method_is_a_preflight() {
        let h = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let both = h(&[
            ("Origin", "https://a"),
            ("Access-Control-Request-Method", "PUT"),
        ]);
        assert_eq!(preflight("OPTIONS", &both), Some(("https://a", "PUT")));
        assert_eq!(preflight("GET", &both), None);
        assert_eq!(preflight("OPTIONS", &h(&[("Origin", "https://a")])), None);
    }
}
