//! Fixed windows (`quota`, `quota-by-key`): windows of `period` from an origin (the
//! subscription's start, or `first-period-start`), counting calls and bytes.

use super::*;
use crate::clock::{ceil_seconds, window_start, NEVER_SECONDS};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Window {
    start: Millis,
    calls: u64,
    bytes: u64,
}

impl Window {
    /// Counts `n` more calls in the window (the rest of a lease, beyond its first call).
    pub(crate) fn count_more(&mut self, n: u64) {
        self.calls = self.calls.saturating_add(n);
    }
}

/// A fixed window's state (the [`HEAD`], then start, calls and bytes); `None` when never
/// written (or written in another layout).
pub(crate) fn decode_window(bytes: &[u8]) -> Option<Window> {
    if bytes.len() != WINDOW || !current(bytes) {
        return None;
    }
    Some(Window {
        start: i64_at(bytes, HEAD),
        calls: u64_at(bytes, HEAD + 8),
        bytes: u64_at(bytes, HEAD + 16),
    })
}

/// The bytes of a fixed window's state.
pub(crate) const WINDOW: usize = HEAD + 24;

/// Writes window `w` as the state.
pub(crate) fn encode_window(w: &Window, period: Millis, state: &mut State<'_>) {
    state.set(&window_bytes(w, period));
}

/// Window `w` as a state's bytes.
pub(crate) fn window_bytes(w: &Window, period: Millis) -> [u8; WINDOW] {
    let expiry = if period <= 0 {
        Millis::MAX
    } else {
        w.start.saturating_add(period).saturating_add(CLOCK_SKEW)
    };
    let mut out = [0u8; WINDOW];
    out[..EXPIRY].copy_from_slice(&expiry.to_le_bytes());
    out[EXPIRY] = LAYOUT_VERSION;
    out[HEAD..HEAD + 8].copy_from_slice(&w.start.to_le_bytes());
    for (i, x) in [w.calls, w.bytes].into_iter().enumerate() {
        out[HEAD + 8 + i * 8..HEAD + 16 + i * 8].copy_from_slice(&x.to_le_bytes());
    }
    out
}

/// Fixed windows of `period` from `origin`, allowing `calls` and/or `bandwidth_kb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FixedWindows {
    pub origin: Millis,
    pub period: Millis,
    pub calls: Option<u64>,
    pub bandwidth_kb: Option<u64>,
}

impl FixedWindows {
    pub(crate) fn current(&self, bytes: &[u8], now: Millis) -> Window {
        let start = window_start(self.origin, self.period, now);
        match decode_window(bytes) {
            // A worker whose clock is behind counts in the window a worker ahead has begun,
            // rather than starting its own over it.
            Some(w) if w.start >= start => w,
            _ => Window {
                start,
                ..Window::default()
            },
        }
    }

    pub(crate) fn seconds_left(&self, w: &Window, now: Millis) -> u64 {
        if self.period <= 0 {
            NEVER_SECONDS
        } else {
            ceil_seconds(w.start + self.period - now).max(1)
        }
    }

    pub(crate) fn verdict(&self, w: &Window, now: Millis) -> Verdict {
        if let Some(calls) = self.calls {
            if w.calls >= calls {
                return Verdict::QuotaExceeded {
                    bandwidth: false,
                    seconds: self.seconds_left(w, now),
                };
            }
        }
        if let Some(kb) = self.bandwidth_kb {
            if w.bytes >= kb.saturating_mul(1024) {
                return Verdict::QuotaExceeded {
                    bandwidth: true,
                    seconds: self.seconds_left(w, now),
                };
            }
        }
        Verdict::Admitted {
            remaining: self
                .calls
                .map(|c| c.saturating_sub(w.calls))
                .unwrap_or(u64::MAX),
        }
    }

    /// Admits and counts a call of weight `n`; returns the verdict and the window it counted in.
    pub fn admit(
        &self,
        store: &dyn CounterStore,
        key: &CounterName<'_>,
        now: Millis,
        n: u64,
    ) -> Result<(Verdict, Millis), StoreError> {
        update(store, key, |state| {
            let (counted, verdict) = self.admit_in(state.bytes(), now, n);
            if let Some(w) = &counted {
                encode_window(w, self.period, state);
            }
            (counted.is_some(), verdict)
        })
    }

    /// [`admit`](Self::admit) on a window's bytes: the window to write when the call is
    /// counted, the verdict, and the window's start.
    pub(crate) fn admit_in(
        &self,
        bytes: &[u8],
        now: Millis,
        n: u64,
    ) -> (Option<Window>, (Verdict, Millis)) {
        let mut w = self.current(bytes, now);
        match self.verdict(&w, now) {
            Verdict::Admitted { .. } => {
                w.calls += n;
                let remaining = self
                    .calls
                    .map(|c| c.saturating_sub(w.calls))
                    .unwrap_or(u64::MAX);
                (Some(w), (Verdict::Admitted { remaining }, w.start))
            }
            denied => (None, (denied, w.start)),
        }
    }

    /// Whether a call would be admitted, without counting it.
    pub fn check(
        &self,
        store: &dyn CounterStore,
        key: &CounterName<'_>,
        now: Millis,
    ) -> Result<Verdict, StoreError> {
        let current = store.get(key)?;
        let w = self.current(current.as_ref().map_or(&[][..], |(b, _)| b), now);
        Ok(self.verdict(&w, now))
    }

    /// Adds calls and bytes at `now` unconditionally (completion).
    pub fn add(
        &self,
        store: &dyn CounterStore,
        key: &CounterName<'_>,
        now: Millis,
        calls: u64,
        bytes: u64,
    ) -> Result<(), StoreError> {
        if calls == 0 && bytes == 0 {
            return Ok(());
        }
        update(store, key, |state| {
            let w = self.add_in(state.bytes(), now, calls, bytes);
            encode_window(&w, self.period, state);
            (true, ())
        })
    }

    /// [`add`](Self::add) on a window's bytes: the window to write.
    pub(crate) fn add_in(&self, state: &[u8], now: Millis, calls: u64, bytes: u64) -> Window {
        let mut w = self.current(state, now);
        w.calls = w.calls.saturating_add(calls);
        w.bytes = w.bytes.saturating_add(bytes);
        w
    }

    /// Takes back `n` calls counted in the window starting at `start`.
    pub fn release(
        &self,
        store: &dyn CounterStore,
        key: &CounterName<'_>,
        start: Millis,
        n: u64,
    ) -> Result<(), StoreError> {
        update(store, key, |state| {
            match release_window(state.bytes(), start, n) {
                Some(w) => {
                    encode_window(&w, self.period, state);
                    (true, ())
                }
                None => (false, ()),
            }
        })
    }
}

/// [`FixedWindows::release`] on a window's bytes: the window to write, if the calls were
/// counted in it.
pub(crate) fn release_window(bytes: &[u8], start: Millis, n: u64) -> Option<Window> {
    match decode_window(bytes) {
        Some(mut w) if w.start == start && w.calls >= n => {
            w.calls -= n;
            Some(w)
        }
        _ => None,
    }
}
