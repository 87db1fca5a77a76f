//! What the proxy-wasm runtime offers beyond the stream: shared data, custom metrics, timers
//! and callouts.
//!
//! Envoy offers them all. Google's Service Extensions (a CDN edge runtime) offers none: each
//! such host call answers `Unimplemented`, on which the SDK's wrappers panic, and a panic kills
//! the VM. So the filter asks once, with raw host calls that return the status instead:
//!
//! - shared data ([`shared_data_offered`]): without it, counters live in the VM itself
//!   ([`VmData`]), one set per VM instance (documented as per-instance counters), and neither
//!   `snapshotSource` nor `counters` can be configured (both need timers and callouts, which such
//!   a runtime lacks as well);
//! - metrics ([`define_counter`]): without them, none are kept.

use crate::slots::SharedData;
use apim_edge_policies::StoreError;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// The most bytes (keys and values) the counters held in a VM may take: a write past it is
/// refused, and `failureMode` decides the call. Slots drop expired windows on every write, so
/// this bounds live counters, not their history.
pub const VM_DATA_BYTES: usize = 2 << 20;

/// proxy-wasm statuses the probes tell apart.
#[cfg(target_arch = "wasm32")]
const OK: u32 = 0;
#[cfg(target_arch = "wasm32")]
const NOT_FOUND: u32 = 1;

/// Key/value data with proxy-wasm shared data's semantics (a missing key has no CAS value; a
/// set with `cas: None`, or on a missing key, always wins; otherwise the CAS must match), held
/// in the VM, with its bytes bounded by a limit.
pub struct VmData {
    map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: Cell<u32>,
    bytes: Cell<usize>,
    limit: usize,
}

impl VmData {
    /// Empty, bounded to `limit` bytes.
    pub fn with_limit(limit: usize) -> VmData {
        VmData {
            map: RefCell::default(),
            next_cas: Cell::new(0),
            bytes: Cell::new(0),
            limit,
        }
    }

    /// The bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.bytes.get()
    }
}

impl Default for VmData {
    fn default() -> Self {
        VmData::with_limit(VM_DATA_BYTES)
    }
}

impl SharedData for VmData {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        Ok(match self.map.borrow().get(key) {
            Some((v, c)) => (Some(v.clone()), Some(*c)),
            None => (None, None),
        })
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        let mut map = self.map.borrow_mut();
        let held = match map.get(key) {
            Some((old, current)) => {
                if cas.is_some_and(|cas| cas != *current) {
                    return Ok(false);
                }
                old.len()
            }
            None => 0,
        };
        let key_bytes = if map.contains_key(key) { 0 } else { key.len() };
        let after = self.bytes.get() - held + value.len() + key_bytes;
        if after > self.limit && value.len() > held {
            return Err(StoreError::Unavailable(format!(
                "the counters held in this VM would take {after} bytes, past their limit of {}",
                self.limit
            )));
        }
        let cas = self.next_cas.get().wrapping_add(1).max(1);
        self.next_cas.set(cas);
        self.bytes.set(after);
        map.insert(key.to_string(), (value.to_vec(), cas));
        Ok(true)
    }
}

#[cfg(target_arch = "wasm32")]
mod raw {
    extern "C" {
        pub fn proxy_get_shared_data(
            key_data: *const u8,
            key_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
            return_cas: *mut u32,
        ) -> u32;
        pub fn proxy_define_metric(
            metric_type: u32,
            name_data: *const u8,
            name_size: usize,
            return_id: *mut u32,
        ) -> u32;
    }
}

/// Whether the runtime offers shared data: a read of a key nobody writes answers `NotFound`
/// (or `Ok`) where it does, `Unimplemented` where it does not.
#[cfg(target_arch = "wasm32")]
pub fn shared_data_offered() -> bool {
    let key = "apim-edge/probe";
    let (mut data, mut size, mut cas) = (std::ptr::null_mut::<u8>(), 0usize, 0u32);
    // SAFETY: the pointers are to locals that live across the call; a value the host returns
    // was allocated in this VM by `proxy_on_memory_allocate` (the SDK's allocator), so it is
    // taken back as a Vec of that size and dropped.
    let status = unsafe {
        raw::proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
    };
    if status == OK && !data.is_null() {
        drop(unsafe { Vec::from_raw_parts(data, size, size) });
    }
    status == OK || status == NOT_FOUND
}

/// Defines a counter metric; `None` where the runtime has no custom metrics (or refuses this
/// one).
#[cfg(target_arch = "wasm32")]
pub fn define_counter(name: &str) -> Option<u32> {
    let mut id = 0u32;
    // SAFETY: the name and the id are valid for the call. Metric type 0 is a counter.
    let status = unsafe { raw::proxy_define_metric(0, name.as_ptr(), name.len(), &mut id) };
    (status == OK).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_data_has_shared_data_semantics() -> Result<(), StoreError> {
        let d = VmData::default();
        assert_eq!(d.get("k")?, (None, None));
        assert!(d.set("k", b"a", None)?);
        let (v, cas) = d.get("k")?;
        assert_eq!(v.as_deref(), Some(&b"a"[..]));
        let cas = cas.unwrap_or_default();
        assert!(!d.set("k", b"b", Some(cas + 1))?, "a stale CAS loses");
        assert!(d.set("k", b"b", Some(cas))?);
        assert!(d.set("k", b"c", None)?, "no CAS always wins");
        assert_eq!(d.get("k")?.0.as_deref(), Some(&b"c"[..]));
        Ok(())
    }

    #[test]
    fn vm_data_refuses_a_write_past_its_limit_and_keeps_what_it_had() -> Result<(), StoreError> {
        let d = VmData::with_limit(100);
        assert!(d.set("a", &[0; 60], None)?);
        let refused = d.set("b", &[0; 60], None);
        assert!(
            matches!(&refused, Err(e) if e.to_string().contains("past their limit of 100")),
            "{refused:?}"
        );
        assert_eq!(d.get("b")?, (None, None));
        // Shrinking is always allowed, and frees room.
        assert!(d.set("a", &[0; 10], None)?);
        assert!(d.set("b", &[0; 60], None)?);
        assert_eq!(d.bytes(), 10 + 60 + 2);
        Ok(())
    }
}
