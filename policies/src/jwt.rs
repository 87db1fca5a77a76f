//! `validate-jwt` (APIM's policy reference, "Validate JWT"): the check compiled at load (where
//! the token is, the keys, audiences, issuers, required claims) and run per call against the
//! call's time. Signatures are verified with RustCrypto's `hmac`, `rsa` and `p256` (HS256/384/512,
//! RS256/384/512, ES256; pure Rust, so they build for `wasm32-wasip1`); the token is read and
//! its claims checked here, with the call's clock and APIM's rules.
//!
//! Keys: symmetric keys in `issuer-signing-keys` (`<key>` holds base64), RSA keys there by
//! `n` and `e`, and keys of an `openid-config` URL given in the snapshot's `jwks` (a JWK set
//! per URL). Fetching `openid-config` through a cluster is not done yet: such a URL without
//! keys in the snapshot is refused at load, never skipped.

use crate::clock::Millis;
use crate::expr::Value;
use crate::policy::Text;
use crate::xml::Element;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hashbrown::HashMap;
use hmac::{Hmac, Mac};
use rsa::signature::Verifier;
use rsa::{BigUint, RsaPublicKey};
use serde_json::Value as Json;

/// A key that verifies signatures of one family.
#[derive(Clone)]
pub(crate) enum KeyMaterial {
    Hmac(Vec<u8>),
    Rsa(RsaPublicKey),
    Ec(p256::ecdsa::VerifyingKey),
}

impl KeyMaterial {
    fn family(&self) -> &'static str {
        match self {
            KeyMaterial::Hmac(_) => "HS",
            KeyMaterial::Rsa(_) => "RS",
            KeyMaterial::Ec(_) => "ES",
        }
    }

    /// Does `signature` sign `message` under this key with `alg`?
    fn verifies(&self, alg: &str, message: &[u8], signature: &[u8]) -> bool {
        // Constant time, by `verify_slice`.
        macro_rules! hmac {
            ($digest:ty, $key:expr) => {
                <Hmac<$digest> as Mac>::new_from_slice($key).is_ok_and(|mut mac| {
                    mac.update(message);
                    mac.verify_slice(signature).is_ok()
                })
            };
        }
        // PKCS#1 v1.5 on the key as loaded: nothing of the key is copied per call.
        fn rsa<D>(key: &RsaPublicKey, message: &[u8], signature: &[u8]) -> bool
        where
            D: sha2::Digest + rsa::pkcs8::AssociatedOid,
        {
            key.verify(
                rsa::Pkcs1v15Sign::new::<D>(),
                &D::digest(message),
                signature,
            )
            .is_ok()
        }
        match (self, alg) {
            (KeyMaterial::Hmac(k), "HS256") => hmac!(sha2::Sha256, k),
            (KeyMaterial::Hmac(k), "HS384") => hmac!(sha2::Sha384, k),
            (KeyMaterial::Hmac(k), "HS512") => hmac!(sha2::Sha512, k),
            (KeyMaterial::Rsa(k), "RS256") => rsa::<sha2::Sha256>(k, message, signature),
            (KeyMaterial::Rsa(k), "RS384") => rsa::<sha2::Sha384>(k, message, signature),
            (KeyMaterial::Rsa(k), "RS512") => rsa::<sha2::Sha512>(k, message, signature),
            (KeyMaterial::Ec(k), "ES256") => p256::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|sig| k.verify(message, &sig).is_ok()),
            _ => false,
        }
    }
}

fn b64url(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')).ok()
}

/// An RSA public key from its base64url modulus and exponent (a JWK's, or a `<key>`'s).
fn rsa_key(n: &str, e: &str) -> Option<KeyMaterial> {
    let (n, e) = (b64url(n)?, b64url(e)?);
    RsaPublicKey::new(BigUint::from_bytes_be(&n), BigUint::from_bytes_be(&e))
        .ok()
        .map(KeyMaterial::Rsa)
}

/// A key of a JWK set: RSA, EC on P-256, or a symmetric key.
fn jwk_key(jwk: &Json) -> Result<KeyMaterial, String> {
    let field = |f: &str| jwk.get(f).and_then(Json::as_str);
    match field("kty") {
        Some("RSA") => match (field("n"), field("e")) {
            (Some(n), Some(e)) => {
                rsa_key(n, e).ok_or_else(|| "its 'n' and 'e' are not an RSA key".into())
            }
            _ => Err("an RSA key needs 'n' and 'e'".into()),
        },
        Some("EC") => {
            if field("crv") != Some("P-256") {
                return Err(format!(
                    "curve {:?} is not supported (P-256 is)",
                    field("crv").unwrap_or("")
                ));
            }
            let (Some(x), Some(y)) = (field("x").and_then(b64url), field("y").and_then(b64url))
            else {
                return Err("an EC key needs 'x' and 'y'".into());
            };
            let mut point = vec![4u8];
            point.extend(x);
            point.extend(y);
            p256::ecdsa::VerifyingKey::from_sec1_bytes(&point)
                .map(KeyMaterial::Ec)
                .map_err(|_| "its 'x' and 'y' are not a point of P-256".into())
        }
        Some("oct") => field("k")
            .and_then(b64url)
            .map(KeyMaterial::Hmac)
            .ok_or_else(|| "a symmetric key needs 'k' (base64url)".into()),
        other => Err(format!(
            "key type {:?} is not supported",
            other.unwrap_or("")
        )),
    }
}

/// Where the token is read from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TokenSource {
    /// A request header (lower-case name).
    Header(String),
    Query(String),
    Value(Text),
}

/// A verification key, with the `kid` it answers to when it has one.
#[derive(Clone)]
pub(crate) struct SigningKey {
    pub kid: Option<String>,
    pub key: KeyMaterial,
}

impl std::fmt::Debug for SigningKey {
    // Never the key itself: a symmetric key is a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({:?}, {})", self.kid, self.key.family())
    }
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.kid == other.kid && self.key.family() == other.key.family()
    }
}

/// A `<claim>` of `required-claims`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RequiredClaim {
    pub name: String,
    /// `match="all"` (the default): every value must be in the token; `any`: one.
    pub all: bool,
    pub separator: Option<String>,
    pub values: Vec<String>,
}

/// A compiled `validate-jwt`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct JwtCheck {
    pub source: TokenSource,
    pub status: u16,
    pub message: Option<String>,
    pub require_expiration: bool,
    pub require_scheme: Option<String>,
    /// Seconds.
    pub clock_skew: i64,
    pub keys: Vec<SigningKey>,
    pub audiences: Vec<String>,
    pub issuers: Vec<String>,
    pub claims: Vec<RequiredClaim>,
    /// `output-token-variable-name`: a variable that receives the token.
    pub output_variable: Option<String>,
    /// Tokens whose signature one of `keys` verified.
    pub verified: VerifiedTokens,
}

/// The digests of tokens whose signature a policy's keys verified, so that a token presented
/// again is not verified again (an RS256 or ES256 verification costs milliseconds in a wasm
/// VM). Only the signature is remembered: lifetime, audience, issuer and claims are checked on
/// every call. Bounded: when full, it starts again empty. The keys are the policy's own and a
/// new snapshot compiles new policies, so a key that changes never meets a stale entry.
#[derive(Default)]
pub(crate) struct VerifiedTokens(std::sync::Mutex<Vec<crate::keys::Digest>>);

/// The most tokens one policy remembers.
const VERIFIED_TOKENS: usize = 1024;

impl VerifiedTokens {
    fn knows(&self, token: &crate::keys::Digest) -> bool {
        self.0
            .lock()
            .is_ok_and(|known| known.iter().any(|k| crate::keys::same_digest(k, token)))
    }

    fn remember(&self, token: crate::keys::Digest) {
        if let Ok(mut known) = self.0.lock() {
            if known.len() >= VERIFIED_TOKENS {
                known.clear();
            }
            known.push(token);
        }
    }
}

/// A copy starts with nothing remembered.
impl Clone for VerifiedTokens {
    fn clone(&self) -> Self {
        VerifiedTokens::default()
    }
}

/// What a policy remembers is not part of what it is.
impl PartialEq for VerifiedTokens {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for VerifiedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |k| k.len());
        write!(f, "VerifiedTokens({n})")
    }
}

/// Why a token was refused: the text of the response when the policy names no message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Missing,
    Invalid,
}

impl Refusal {
    /// The message when the policy has no `failed-validation-error-message` (a choice of the
    /// edge: APIM's text depends on the fault, `docs/choices.md`).
    pub fn default_message(self) -> &'static str {
        match self {
            Refusal::Missing => "JWT not present.",
            Refusal::Invalid => "Invalid JWT.",
        }
    }
}

/// Seconds since the epoch as a JWT claim holds them (a number, maybe with a fraction).
fn seconds(v: &Json) -> Option<f64> {
    v.as_f64()
}

/// The values of a claim as `required-claims` compares them: strings of an array, a string
/// split by the separator, or the text of a number or bool.
fn claim_values(v: &Json, separator: Option<&str>) -> Vec<String> {
    match v {
        Json::Array(items) => items
            .iter()
            .flat_map(|i| claim_values(i, separator))
            .collect(),
        Json::String(s) => match separator {
            Some(sep) if !sep.is_empty() => s.split(sep).map(str::to_string).collect(),
            _ => vec![s.clone()],
        },
        Json::Null => Vec::new(),
        other => vec![other.to_string()],
    }
}

impl JwtCheck {
    /// The token, from the place the policy names: `None` when it is not there. A scheme the
    /// policy requires must lead it; `Bearer ` is taken off in any case.
    pub fn token<'t>(&self, raw: Option<&'t str>) -> Result<&'t str, Refusal> {
        let raw = raw
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Refusal::Missing)?;
        let strip = |scheme: &str| {
            raw.get(..scheme.len())
                .filter(|head| head.eq_ignore_ascii_case(scheme))
                .and_then(|_| raw[scheme.len()..].strip_prefix(' '))
                .map(str::trim_start)
        };
        match &self.require_scheme {
            Some(scheme) => strip(scheme).ok_or(Refusal::Invalid),
            None => Ok(strip("Bearer").unwrap_or(raw)),
        }
    }

    /// Verifies a token at `now`: its signature by one of the keys, then its lifetime,
    /// audience, issuer and required claims.
    pub fn verify(&self, token: &str, now: Millis) -> Result<(), Refusal> {
        let mut parts = token.split('.');
        let (Some(head), Some(body), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::Invalid);
        };
        // A token verified before had a header and a signature that decode: only its claims
        // are read again.
        let digest = crate::keys::key_digest(token);
        if !self.verified.knows(&digest) {
            self.signed(token, head, body, sig)?;
            self.verified.remember(digest);
        }
        let claims: serde_json::Map<String, Json> =
            serde_json::from_slice(&b64url(body).ok_or(Refusal::Invalid)?)
                .map_err(|_| Refusal::Invalid)?;
        self.claims_hold(&claims, now)
    }

    /// Is the token signed by one of the policy's keys (of its `alg`, and its `kid` if both
    /// name one)?
    fn signed(&self, token: &str, head: &str, body: &str, sig: &str) -> Result<(), Refusal> {
        let header: Json = serde_json::from_slice(&b64url(head).ok_or(Refusal::Invalid)?)
            .map_err(|_| Refusal::Invalid)?;
        let alg = header
            .get("alg")
            .and_then(Json::as_str)
            .ok_or(Refusal::Invalid)?;
        let kid = header.get("kid").and_then(Json::as_str);
        let signature = b64url(sig).ok_or(Refusal::Invalid)?;
        let message = &token.as_bytes()[..head.len() + 1 + body.len()];
        let signed = self.keys.iter().any(|k| {
            alg.starts_with(k.key.family())
                && match (kid, &k.kid) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                }
                && k.key.verifies(alg, message, &signature)
        });
        if signed {
            Ok(())
        } else {
            Err(Refusal::Invalid)
        }
    }

    fn claims_hold(
        &self,
        claims: &serde_json::Map<String, Json>,
        now: Millis,
    ) -> Result<(), Refusal> {
        let now = now as f64 / 1000.0;
        let skew = self.clock_skew as f64;
        match claims.get("exp") {
            Some(exp) => {
                let exp = seconds(exp).ok_or(Refusal::Invalid)?;
                if now > exp + skew {
                    return Err(Refusal::Invalid);
                }
            }
            None if self.require_expiration => return Err(Refusal::Invalid),
            None => {}
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = seconds(nbf).ok_or(Refusal::Invalid)?;
            if now < nbf - skew {
                return Err(Refusal::Invalid);
            }
        }
        if !self.audiences.is_empty() {
            let aud = claims
                .get("aud")
                .map(|a| claim_values(a, None))
                .unwrap_or_default();
            if !aud.iter().any(|a| self.audiences.contains(a)) {
                return Err(Refusal::Invalid);
            }
        }
        if !self.issuers.is_empty() {
            let iss = claims.get("iss").and_then(Json::as_str);
            if !iss.is_some_and(|i| self.issuers.iter().any(|want| want == i)) {
                return Err(Refusal::Invalid);
            }
        }
        for c in &self.claims {
            let Some(v) = claims.get(&c.name) else {
                return Err(Refusal::Invalid);
            };
            if c.values.is_empty() {
                continue;
            }
            let have = claim_values(v, c.separator.as_deref());
            let held = |want: &String| have.contains(want);
            let ok = if c.all {
                c.values.iter().all(held)
            } else {
                c.values.iter().any(held)
            };
            if !ok {
                return Err(Refusal::Invalid);
            }
        }
        Ok(())
    }
}

/// What compiling a `validate-jwt` found wrong: outside the edge's subset, or not valid APIM.
pub(crate) enum JwtFault {
    Unsupported(String),
    Invalid(String),
}

/// The keys of one `<key>` of `issuer-signing-keys`.
fn signing_key(el: &Element) -> Result<SigningKey, JwtFault> {
    let kid = el.attr("id").map(str::to_string);
    if el.attr("certificate-id").is_some() {
        return Err(JwtFault::Unsupported(
            "a <key> by 'certificate-id' is not supported at the edge: give the key itself".into(),
        ));
    }
    let key = match (el.attr("n"), el.attr("e")) {
        (Some(n), Some(e)) => rsa_key(n, e).ok_or_else(|| {
            JwtFault::Invalid("the 'n' and 'e' of a <key> are not an RSA key (base64url)".into())
        })?,
        _ => STANDARD
            .decode(el.text.trim())
            .ok()
            .filter(|k| !k.is_empty())
            .map(KeyMaterial::Hmac)
            .ok_or_else(|| JwtFault::Invalid("a <key> must hold a base64 key".into()))?,
    };
    Ok(SigningKey { kid, key })
}

/// The keys the snapshot gives for an `openid-config` URL.
fn openid_keys(url: &str, jwks: &HashMap<String, Json>) -> Result<Vec<SigningKey>, JwtFault> {
    let set = jwks.get(url).ok_or_else(|| {
        JwtFault::Unsupported(format!(
            "<openid-config url=\"{url}\"> is fetched by APIM; at the edge its keys must be in the snapshot's jwks under that URL"
        ))
    })?;
    let keys = set.get("keys").and_then(Json::as_array).ok_or_else(|| {
        JwtFault::Invalid(format!(
            "the snapshot's jwks for \"{url}\" is not a JWK set (no 'keys')"
        ))
    })?;
    keys.iter()
        .enumerate()
        .map(|(i, jwk)| {
            let key = jwk_key(jwk).map_err(|why| {
                JwtFault::Invalid(format!(
                    "key {i} of the snapshot's jwks for \"{url}\": {why}"
                ))
            })?;
            Ok(SigningKey {
                kid: jwk.get("kid").and_then(Json::as_str).map(str::to_string),
                key,
            })
        })
        .collect()
}

/// The texts of an element's children named `name` (`<audience>` of `<audiences>`).
fn texts(el: &Element, list: &str, item: &str) -> Vec<String> {
    el.children
        .iter()
        .filter(|c| c.name == list)
        .flat_map(|c| c.children.iter().filter(|i| i.name == item))
        .map(|i| i.text.trim().to_string())
        .collect()
}

/// What a `validate-jwt`'s children say: keys, audiences, issuers and required claims.
pub(crate) type Trust = (
    Vec<SigningKey>,
    Vec<String>,
    Vec<String>,
    Vec<RequiredClaim>,
);

/// The keys, audiences, issuers and claims of a `validate-jwt`; the caller reads its
/// attributes (they follow the policy compiler's rules for literals and expressions).
pub(crate) fn children(el: &Element, jwks: &HashMap<String, Json>) -> Result<Trust, JwtFault> {
    let mut keys = Vec::new();
    let mut claims = Vec::new();
    for c in &el.children {
        match c.name.as_str() {
            "openid-config" => {
                let url = c
                    .attr("url")
                    .ok_or_else(|| JwtFault::Invalid("<openid-config> needs 'url'".into()))?;
                keys.extend(openid_keys(url, jwks)?);
            }
            "issuer-signing-keys" => {
                for k in c.children.iter().filter(|k| k.name == "key") {
                    keys.push(signing_key(k)?);
                }
            }
            "audiences" | "issuers" => {}
            "required-claims" => {
                for claim in c.children.iter().filter(|k| k.name == "claim") {
                    let name = claim
                        .attr("name")
                        .ok_or_else(|| JwtFault::Invalid("<claim> needs 'name'".into()))?;
                    let all = match claim.attr("match").unwrap_or("all") {
                        "all" => true,
                        "any" => false,
                        other => {
                            return Err(JwtFault::Invalid(format!(
                                "'match' of <claim> must be all or any, not \"{other}\""
                            )))
                        }
                    };
                    claims.push(RequiredClaim {
                        name: name.to_string(),
                        all,
                        separator: claim.attr("separator").map(str::to_string),
                        values: claim
                            .children
                            .iter()
                            .filter(|v| v.name == "value")
                            .map(|v| v.text.trim().to_string())
                            .collect(),
                    });
                }
            }
            "decryption-keys" => {
                return Err(JwtFault::Unsupported(
                    "encrypted tokens (<decryption-keys>) are not supported at the edge".into(),
                ))
            }
            other => {
                return Err(JwtFault::Invalid(format!(
                    "<{other}> is not allowed inside <validate-jwt>"
                )))
            }
        }
    }
    if keys.is_empty() {
        return Err(JwtFault::Invalid(
            "<validate-jwt> has no key to verify signatures with (issuer-signing-keys or openid-config)"
                .into(),
        ));
    }
    Ok((
        keys,
        texts(el, "audiences", "audience"),
        texts(el, "issuers", "issuer"),
        claims,
    ))
}

/// A value for the variable `output-token-variable-name` names: the token's text (the edge
/// has no `Jwt` object; `docs/choices.md`).
pub(crate) fn token_variable(token: &str) -> Value {
    Value::Str(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(keys: Vec<SigningKey>) -> JwtCheck {
        JwtCheck {
            source: TokenSource::Header("authorization".into()),
            status: 401,
            message: None,
            require_expiration: true,
            require_scheme: None,
            clock_skew: 0,
            keys,
            audiences: vec!["api://orders".into()],
            issuers: vec!["https://issuer.example".into()],
            claims: vec![RequiredClaim {
                name: "roles".into(),
                all: false,
                separator: None,
                values: vec!["reader".into(), "writer".into()],
            }],
            output_variable: None,
            verified: VerifiedTokens::default(),
        }
    }

    fn hs256(claims: &Json, secret: &[u8]) -> String {
        let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(claims.to_string());
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret).unwrap();
        mac.update(format!("{head}.{body}").as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{head}.{body}.{sig}")
    }

    #[test]
    fn claims_are_checked_with_the_calls_clock() {
        let c = check(vec![SigningKey {
            kid: None,
            key: KeyMaterial::Hmac(b"s3cret".to_vec()),
        }]);
        let good = serde_json::json!({"exp": 2000, "nbf": 1000, "aud": ["x", "api://orders"], "iss": "https://issuer.example", "roles": ["writer"]});
        let t = hs256(&good, b"s3cret");
        assert_eq!(c.verify(&t, 1_500_000), Ok(()));
        assert_eq!(c.verify(&t, 2_000_000), Ok(()), "exp itself is still valid");
        assert_eq!(c.verify(&t, 2_001_000), Err(Refusal::Invalid), "expired");
        assert_eq!(
            c.verify(&t, 999_000),
            Err(Refusal::Invalid),
            "not yet valid"
        );
        assert_eq!(
            c.verify(&hs256(&good, b"other"), 1_500_000),
            Err(Refusal::Invalid)
        );
        let mut skewed = c.clone();
        skewed.clock_skew = 5;
        assert_eq!(skewed.verify(&t, 2_004_000), Ok(()));
        for (field, value) in [
            ("aud", serde_json::json!("api://other")),
            ("iss", serde_json::json!("https://other")),
            ("roles", serde_json::json!(["admin"])),
        ] {
            let mut bad = good.clone();
            bad[field] = value;
            assert_eq!(
                c.verify(&hs256(&bad, b"s3cret"), 1_500_000),
                Err(Refusal::Invalid),
                "{field}"
            );
        }
        let mut no_exp = good.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            c.verify(&hs256(&no_exp, b"s3cret"), 1_500_000),
            Err(Refusal::Invalid)
        );
        assert_eq!(c.verify("garbage", 1_500_000), Err(Refusal::Invalid));
        assert_eq!(c.verify("a.b.c", 1_500_000), Err(Refusal::Invalid));
    }

    /// A verified signature is remembered (by the token's digest), the claims are not: a
    /// remembered token that expires is refused, one with another signature is verified (and
    /// refused), and what is remembered stays bounded.
    #[test]
    fn a_verified_signature_is_remembered_and_the_claims_are_checked_every_time() {
        let c = check(vec![SigningKey {
            kid: None,
            key: KeyMaterial::Hmac(b"s3cret".to_vec()),
        }]);
        let remembered = |c: &JwtCheck| c.verified.0.lock().map(|k| k.len()).unwrap_or(0);
        let good = serde_json::json!({"exp": 2000, "aud": "api://orders", "iss": "https://issuer.example", "roles": "reader"});
        let t = hs256(&good, b"s3cret");
        assert_eq!(c.verify(&t, 1_500_000), Ok(()));
        assert_eq!(remembered(&c), 1);
        assert_eq!(c.verify(&t, 1_600_000), Ok(()));
        assert_eq!(remembered(&c), 1);
        assert_eq!(c.verify(&t, 2_001_000), Err(Refusal::Invalid), "expired");
        // The same header and claims under another signature: not the remembered token.
        let forged = format!("{}.AAAA", t.rsplit_once('.').map_or("", |(m, _)| m));
        assert_eq!(c.verify(&forged, 1_500_000), Err(Refusal::Invalid));
        assert_eq!(remembered(&c), 1);
        for i in 0..VERIFIED_TOKENS + 5 {
            let mut claims = good.clone();
            claims["n"] = serde_json::json!(i);
            assert_eq!(c.verify(&hs256(&claims, b"s3cret"), 1_500_000), Ok(()));
        }
        assert!(remembered(&c) <= VERIFIED_TOKENS);
        // A copy of the policy (a new snapshot) remembers nothing.
        assert_eq!(remembered(&c.clone()), 0);
    }

    #[test]
    fn the_token_is_found_with_its_scheme() {
        let mut c = check(Vec::new());
        assert_eq!(c.token(Some("Bearer abc")), Ok("abc"));
        assert_eq!(c.token(Some("abc")), Ok("abc"));
        assert_eq!(c.token(Some("  ")), Err(Refusal::Missing));
        assert_eq!(c.token(None), Err(Refusal::Missing));
        c.require_scheme = Some("Bearer".into());
        assert_eq!(c.token(Some("bearer abc")), Ok("abc"));
        assert_eq!(c.token(Some("abc")), Err(Refusal::Invalid));
        assert_eq!(c.token(Some("Basic abc")), Err(Refusal::Invalid));
    }
}
