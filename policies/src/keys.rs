//! Subscription keys: SHA-256 digests made at load time, and a lookup that never compares a
//! whole digest in variable time. The catalog never holds a plain key.

use crate::ids::SubscriptionId;
use hashbrown::HashMap;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// SHA-256 of a key's UTF-8 bytes.
pub type Digest = [u8; 32];

/// The digest of a subscription key (every keyed call pays for it once).
pub fn key_digest(key: &str) -> Digest {
    Sha256::digest(key.as_bytes()).into()
}

/// Lower-case hex of a digest, the `primaryKeySha256` form.
pub fn digest_hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 64 hex digits.
pub(crate) fn parse_digest_hex(text: &str) -> Option<Digest> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        d[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(d)
}

/// Subscription keys by digest. An entry is found by an 8-byte prefix of the digest (a leak of
/// which tells nothing about a key), then the whole digest is compared in constant time. Two
/// digests sharing a prefix (about one chance in 2^64 per pair) go to a short overflow list.
#[derive(Default)]
pub(crate) struct KeyIndex {
    entries: HashMap<u64, (Digest, SubscriptionId)>,
    overflow: Vec<(Digest, SubscriptionId)>,
}

/// Compares two digests in constant time.
pub(crate) fn same_digest(a: &Digest, b: &Digest) -> bool {
    bool::from(a.ct_eq(b))
}

fn prefix(d: &Digest) -> u64 {
    let mut p = [0u8; 8];
    p.copy_from_slice(&d[..8]);
    u64::from_le_bytes(p)
}

impl KeyIndex {
    /// Adds a key; returns the subscription that already holds it, if any.
    pub fn insert(&mut self, d: Digest, subscription: SubscriptionId) -> Option<SubscriptionId> {
        if let Some(existing) = self.find(&d) {
            return Some(existing);
        }
        match self.entries.entry(prefix(&d)) {
            hashbrown::hash_map::Entry::Vacant(v) => {
                v.insert((d, subscription));
            }
            hashbrown::hash_map::Entry::Occupied(_) => self.overflow.push((d, subscription)),
        }
        None
    }

    /// How many keys are indexed.
    pub fn len(&self) -> usize {
        self.entries.len() + self.overflow.len()
    }

    /// The subscription holding the key with this digest.
    pub fn find(&self, d: &Digest) -> Option<SubscriptionId> {
        let (candidate, sub) = self.entries.get(&prefix(d))?;
        if same_digest(candidate, d) {
            return Some(*sub);
        }
        let mut found = None;
        for (candidate, sub) in &self.overflow {
            if same_digest(candidate, d) {
                found = Some(*sub);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Keys of one block and of more, and the lengths where one becomes two, digest as the
        /// streaming SHA-256 does.
        #[test]
        fn a_key_digests_as_streaming_sha256_does(key in "[a-zA-Z0-9é-]{0,70}") {
            let streaming: Digest = Sha256::digest(key.as_bytes()).into();
            proptest::prop_assert_eq!(key_digest(&key), streaming);
        }
    }

    #[test]
    fn a_key_digest_is_sha256() {
        // FIPS 180-4's example "abc", and the empty message.
        assert_eq!(
            digest_hex(&key_digest("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            digest_hex(&key_digest("")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        for len in [55, 56, 64] {
            let key = "k".repeat(len);
            assert_eq!(
                key_digest(&key),
                <[u8; 32]>::from(Sha256::digest(key.as_bytes()))
            );
        }
    }

    #[test]
    fn digest_round_trip_and_lookup() {
        let d = key_digest("k1");
        assert_eq!(parse_digest_hex(&digest_hex(&d)), Some(d));
        let mut idx = KeyIndex::default();
        assert_eq!(idx.insert(d, SubscriptionId(7)), None);
        assert_eq!(idx.insert(d, SubscriptionId(8)), Some(SubscriptionId(7)));
        assert_eq!(idx.find(&key_digest("k1")), Some(SubscriptionId(7)));
        assert_eq!(idx.find(&key_digest("k2")), None);
        // A digest sent as if it were the key is just another key.
        assert_eq!(idx.find(&key_digest(&digest_hex(&d))), None);
    }

    #[test]
    fn digests_sharing_a_prefix_are_both_found() {
        let mut idx = KeyIndex::default();
        let a = [1u8; 32];
        let mut b = [1u8; 32];
        b[31] = 2;
        assert_eq!(idx.insert(a, SubscriptionId(1)), None);
        assert_eq!(idx.insert(b, SubscriptionId(2)), None);
        assert_eq!(idx.insert(b, SubscriptionId(3)), Some(SubscriptionId(2)));
        assert_eq!(
            (idx.find(&a), idx.find(&b), idx.len()),
            (Some(SubscriptionId(1)), Some(SubscriptionId(2)), 2)
        );
        let mut c = [1u8; 32];
        c[31] = 3;
        assert_eq!(idx.find(&c), None);
    }

    #[test]
    fn digests_differing_in_any_byte_differ() {
        let a = key_digest("k1");
        assert!(same_digest(&a, &a));
        for i in 0..32 {
            let mut b = a;
            b[i] ^= 0x80;
            assert!(!same_digest(&a, &b), "byte {i}");
        }
    }

    #[test]
    fn hex_is_strict() {
        assert!(parse_digest_hex("abc").is_none());
        assert!(parse_digest_hex(&"g".repeat(64)).is_none());
    }
}
