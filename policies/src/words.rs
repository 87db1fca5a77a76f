//! Short byte strings compared and copied a word at a time: the names and paths a call is
//! decided by (a method, an API's path, a template's literal segments, a counter's name) and
//! the key it is keyed by are a few words long, and a call into the C library's `memcmp` or
//! `memcpy` costs more than comparing or copying them.

/// Whether `a` and `b` hold the same bytes. Each is read as at most a few overlapping words:
/// the first and the last of a width that fits, and the whole words between.
#[inline]
pub(crate) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    if let (Some(a8), Some(b8)) = (a.last_chunk::<8>(), b.last_chunk::<8>()) {
        // The whole words, then the last eight bytes (which may overlap the last whole word).
        let (aw, _) = a.as_chunks::<8>();
        let (bw, _) = b.as_chunks::<8>();
        let word = |w: &[u8; 8]| u64::from_ne_bytes(*w);
        return word(a8) == word(b8) && aw.iter().zip(bw).all(|(x, y)| word(x) == word(y));
    }
    // Fewer than eight: the first and the last four, two or one (overlapping).
    match (a.first_chunk::<4>(), a.last_chunk::<4>()) {
        (Some(af), Some(al)) => {
            let word = |w: &[u8; 4]| u32::from_ne_bytes(*w);
            let (bf, bl) = (b.first_chunk::<4>(), b.last_chunk::<4>());
            Some(word(af)) == bf.map(word) && Some(word(al)) == bl.map(word)
        }
        _ => match (a.first_chunk::<2>(), a.last_chunk::<2>()) {
            (Some(af), Some(al)) => {
                b.first_chunk::<2>() == Some(af) && b.last_chunk::<2>() == Some(al)
            }
            _ => a.first() == b.first(),
        },
    }
}

/// Copies `src` to the start of `dst` as two overlapping copies of a width that fits (the
/// first and the last bytes of it), each of a length known when it is built. More than 64
/// bytes are copied as the standard library does.
#[inline]
pub(crate) fn put_bytes(dst: &mut [u8], src: &[u8]) {
    /// The first and the last `W` bytes of `src` (at least `W` long) to `dst`.
    #[inline]
    fn ends<const W: usize>(dst: &mut [u8], src: &[u8]) {
        let n = src.len();
        if let (Some(d), Some(s)) = (dst.first_chunk_mut::<W>(), src.first_chunk::<W>()) {
            *d = *s;
        }
        if let (Some(d), Some(s)) = (dst[..n].last_chunk_mut::<W>(), src.last_chunk::<W>()) {
            *d = *s;
        }
    }
    match src.len() {
        0 => {}
        1 => dst[0] = src[0],
        2..4 => ends::<2>(dst, src),
        4..8 => ends::<4>(dst, src),
        8..16 => ends::<8>(dst, src),
        16..32 => ends::<16>(dst, src),
        32..=64 => ends::<32>(dst, src),
        n => dst[..n].copy_from_slice(src),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Compared a word at a time, two byte strings are the same exactly when every byte
        /// is: for every length around the widths read (0 to 40), equal, differing in any one
        /// byte, and of other lengths.
        #[test]
        fn bytes_compare_as_each_byte_does(
            a in proptest::collection::vec(any::<u8>(), 0..40),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
            longer in any::<bool>(),
        ) {
            prop_assert!(same_bytes(&a, &a.clone()));
            let mut b = a.clone();
            if longer || b.is_empty() {
                b.push(0);
            } else {
                b[flip.index(a.len())] ^= 1 << bit;
            }
            prop_assert!(!same_bytes(&a, &b));
            prop_assert!(!same_bytes(&b, &a));
        }
    }

    proptest! {
        /// Copied in overlapping widths, every byte of the source lands in its place and
        /// nothing after it changes: for every length from 0 to 80.
        #[test]
        fn bytes_copy_as_each_byte_does(
            src in proptest::collection::vec(any::<u8>(), 0..80),
            before in proptest::collection::vec(any::<u8>(), 80..81),
        ) {
            let mut dst = before.clone();
            put_bytes(&mut dst, &src);
            prop_assert_eq!(&dst[..src.len()], &src[..]);
            prop_assert_eq!(&dst[src.len()..], &before[src.len()..]);
        }
    }

    #[test]
    fn short_strings() {
        for (a, b, same) in [
            ("", "", true),
            ("a", "a", true),
            ("a", "b", false),
            ("GET", "GET", true),
            ("GET", "PUT", false),
            ("echo", "echo", true),
            ("echo", "ech0", false),
            ("resource", "resource", true),
            ("resource", "resourcE", false),
        ] {
            assert_eq!(same_bytes(a.as_bytes(), b.as_bytes()), same, "{a} {b}");
        }
    }
}
