//! Header maps read from the host without panicking.
//!
//! HTTP/1.1 lets a header value carry bytes that are not UTF-8 (obs-text, RFC 9110 §5.5), and
//! Envoy passes them on. The proxy-wasm SDK decodes header maps and values with
//! `String::from_utf8(..).unwrap()`, so one such byte from any client panicked the filter and
//! killed its worker's VM. Here the same ABI calls are made directly and the bytes decoded with
//! the replacement character (U+FFFD) where they are not UTF-8: such a call is decided like any
//! other, and a malformed map from the host reads as no headers rather than a panic.

/// Header pairs in strings kept from one call to the next, so that a VM reads each call's
/// headers without allocating once it has seen calls like it. A string grown past
/// [`KEPT_CAPACITY`] is let go before the next map is read, so what is kept stays small.
#[derive(Default)]
pub struct KeptPairs {
    pairs: Vec<(String, String)>,
    len: usize,
}

/// The most bytes a kept header string holds on to between calls.
pub const KEPT_CAPACITY: usize = 4096;

impl KeptPairs {
    /// The pairs of the last map read.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs[..self.len]
    }

    /// The next pair to fill, its strings emptied.
    fn next(&mut self) -> &mut (String, String) {
        if self.len == self.pairs.len() {
            self.pairs.push(Default::default());
        }
        let pair = &mut self.pairs[self.len];
        self.len += 1;
        pair.0.clear();
        pair.1.clear();
        pair
    }
}

/// Reads a serialized header map (the ABI's layout: a count, then each pair's key and value
/// sizes as little-endian u32, then each key and value followed by a NUL) into `kept`, names
/// and values decoded lossily. `None` when the bytes are not such a map; `kept` then holds no
/// pairs.
pub fn parse_map_into(bytes: &[u8], kept: &mut KeptPairs) -> Option<()> {
    kept.len = 0;
    for s in kept.pairs.iter_mut().flat_map(|(k, v)| [k, v]) {
        if s.capacity() > KEPT_CAPACITY {
            *s = String::new();
        }
    }
    let parsed = parse_pairs(bytes, kept);
    if parsed.is_none() {
        kept.len = 0;
    }
    parsed
}

fn parse_pairs(bytes: &[u8], kept: &mut KeptPairs) -> Option<()> {
    if bytes.is_empty() {
        return Some(());
    }
    let word = |at: usize| -> Option<usize> {
        let b = bytes.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let count = word(0)?;
    // The sizes the count promises must be there before anything is allocated for them.
    let mut at = count.checked_mul(8)?.checked_add(4)?;
    if at > bytes.len() {
        return None;
    }
    // Each key and value is followed by a NUL.
    let mut field = |len: usize| -> Option<&[u8]> {
        let end = at.checked_add(len)?;
        let found = bytes.get(at..end)?;
        if bytes.get(end) != Some(&0) {
            return None;
        }
        at = end + 1;
        Some(found)
    };
    for i in 0..count {
        let (key_len, value_len) = (word(4 + i * 8)?, word(8 + i * 8)?);
        let key = field(key_len)?;
        let value = field(value_len)?;
        let (k, v) = kept.next();
        push_text(k, key);
        push_text(v, value);
    }
    Some(())
}

/// Bytes as text appended to `out`, with U+FFFD where they are not UTF-8 (checked whole first:
/// the usual case, and much faster than the lossy decoder's chunks).
fn push_text(out: &mut String, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => out.push_str(text),
        Err(_) => out.push_str(&String::from_utf8_lossy(bytes)),
    }
}

#[cfg(target_arch = "wasm32")]
mod host {
    use super::{parse_map_into, push_text, KeptPairs};
    use proxy_wasm::types::{MapType, Status};
    use std::ptr::null_mut;

    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_get_header_map_pairs(
            map_type: MapType,
            return_map_data: *mut *mut u8,
            return_map_size: *mut usize,
        ) -> Status;
        fn proxy_get_header_map_value(
            map_type: MapType,
            key_data: *const u8,
            key_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
        ) -> Status;
    }

    /// What the host returned: bytes it wrote into memory the guest allocated for them
    /// (`proxy_on_memory_allocate`), now owned here.
    ///
    /// # Safety
    /// `data` and `size` must be what the host returned from a call that answered `Ok`.
    unsafe fn returned(data: *mut u8, size: usize) -> Vec<u8> {
        if data.is_null() {
            Vec::new()
        } else {
            // SAFETY: the SDK's `proxy_on_memory_allocate` hands out a boxed slice of exactly
            // `size` bytes (align 1), the layout of a `Vec<u8>` of capacity `size`, so this
            // takes that allocation back as it was made (as the SDK's own readers do).
            unsafe { Vec::from_raw_parts(data, size, size) }
        }
    }

    /// Every pair of header map `map`, into `kept`; none when the host has no such map or
    /// answers with something that is not one.
    pub fn map_pairs_into(map: MapType, kept: &mut KeptPairs) {
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: the ABI call writes only through the two pointers given.
        let bytes = match unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) } {
            // SAFETY: the host answered Ok, so `data` and `size` are its answer.
            Status::Ok => unsafe { returned(data, size) },
            _ => Vec::new(),
        };
        let _ = parse_map_into(&bytes, kept);
    }

    /// The value of header `name` in map `map`, or `None` when it is absent.
    pub fn map_value(map: MapType, name: &str) -> Option<String> {
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: the key is read from `name`'s bytes; the call writes only through the two
        // pointers given.
        let status = unsafe {
            proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size)
        };
        match status {
            // SAFETY: the host answered Ok, so `data` and `size` are its answer.
            Status::Ok => {
                let mut value = String::new();
                push_text(&mut value, &unsafe { returned(data, size) });
                Some(value)
            }
            _ => None,
        }
    }
}

#[cfg(target_arch = "wasm32")]
pub use host::{map_pairs_into, map_value};

#[cfg(test)]
mod tests {
    use super::*;

    /// The pairs of a serialized map, as a vector.
    fn parse_map(bytes: &[u8]) -> Option<Vec<(String, String)>> {
        let mut kept = KeptPairs::default();
        parse_map_into(bytes, &mut kept)?;
        Some(kept.pairs().to_vec())
    }

    fn serialized(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend_from_slice(k);
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out
    }

    #[test]
    fn a_map_reads_as_its_pairs() {
        let bytes = serialized(&[(b":path", b"/echo/items/1"), (b"x-empty", b"")]);
        assert_eq!(
            parse_map(&bytes),
            Some(vec![
                (":path".to_string(), "/echo/items/1".to_string()),
                ("x-empty".to_string(), String::new()),
            ])
        );
        assert_eq!(parse_map(&[]), Some(vec![]));
    }

    #[test]
    fn a_value_that_is_not_utf8_reads_with_the_replacement_character() {
        let bytes = serialized(&[(b"x-note", b"caf\xe9 cr\xe8me"), (b"x-next", b"ok")]);
        assert_eq!(
            parse_map(&bytes),
            Some(vec![
                ("x-note".to_string(), "caf\u{fffd} cr\u{fffd}me".to_string()),
                ("x-next".to_string(), "ok".to_string()),
            ])
        );
    }

    #[test]
    fn kept_pairs_are_refilled_whole_and_let_go_of_large_strings() {
        let mut kept = KeptPairs::default();
        let long = vec![b'x'; KEPT_CAPACITY + 1];
        let three = serialized(&[(b"a", &long), (b"b", b"2"), (b"c", b"3")]);
        assert_eq!(parse_map_into(&three, &mut kept), Some(()));
        assert_eq!(kept.pairs().len(), 3);
        assert_eq!(
            parse_map_into(&serialized(&[(b"d", b"4")]), &mut kept),
            Some(())
        );
        assert_eq!(kept.pairs(), &[("d".to_string(), "4".to_string())]);
        assert!(kept
            .pairs
            .iter()
            .all(|(k, v)| k.capacity() <= KEPT_CAPACITY && v.capacity() <= KEPT_CAPACITY));
        // A map that does not read leaves no pairs, not the last call's.
        assert_eq!(parse_map_into(&[1, 0, 0, 0], &mut kept), None);
        assert!(kept.pairs().is_empty());
    }

    #[test]
    fn a_malformed_map_is_refused_not_a_panic() {
        let good = serialized(&[(b"a", b"b"), (b"cc", b"dd")]);
        // Cut anywhere, it is not a map.
        for end in 1..good.len() {
            assert_eq!(parse_map(&good[..end]), None, "cut at {end}");
        }
        // A count far beyond the bytes, sizes that overflow.
        assert_eq!(parse_map(&[0xff, 0xff, 0xff, 0x7f, 1, 0, 0, 0]), None);
        let mut huge = serialized(&[(b"a", b"b")]);
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_map(&huge), None);
    }
}
