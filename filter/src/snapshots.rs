//! Fetched snapshots, shared between worker VMs.
//!
//! With a `snapshotSource`, every worker VM ticks, but only one fetches at a time: the VM that
//! takes the fetch lease (a compare-and-swap on [`LEASE_KEY`], holding when the last fetch
//! started) calls the source with the `ETag` of the snapshot in force as `If-None-Match`. A
//! fetched snapshot is loaded before anything else happens to it; only one that loads is
//! published, under [`SNAPSHOT_KEY`] with the next version number, and every VM loads a newer
//! version on its next tick. A snapshot that does not load is never published: the last good
//! one stays in force everywhere.

use crate::slots::SharedData;
use apim_edge_policies::{Millis, StoreError};

pub const SNAPSHOT_KEY: &str = "apim-edge/snapshot";
pub const LEASE_KEY: &str = "apim-edge/snapshot-fetch";

/// A published snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub version: u64,
    pub etag: String,
    pub body: Vec<u8>,
}

fn encode(p: &Published) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + p.etag.len() + p.body.len());
    out.extend_from_slice(&p.version.to_le_bytes());
    out.extend_from_slice(&(p.etag.len().min(usize::from(u16::MAX)) as u16).to_le_bytes());
    out.extend_from_slice(&p.etag.as_bytes()[..p.etag.len().min(usize::from(u16::MAX))]);
    out.extend_from_slice(&p.body);
    out
}

fn decode(b: &[u8]) -> Option<Published> {
    let version = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
    let etag_len = usize::from(u16::from_le_bytes(b.get(8..10)?.try_into().ok()?));
    let etag = String::from_utf8(b.get(10..10 + etag_len)?.to_vec()).ok()?;
    Some(Published {
        version,
        etag,
        body: b.get(10 + etag_len..)?.to_vec(),
    })
}

/// The version and `ETag` of the published snapshot, if there is one.
pub fn current(shared: &dyn SharedData) -> Result<Option<(u64, String)>, StoreError> {
    let (bytes, _) = shared.get(SNAPSHOT_KEY)?;
    Ok(bytes
        .as_deref()
        .and_then(decode)
        .map(|p| (p.version, p.etag)))
}

/// The published snapshot, when it is newer than version `have`.
pub fn newer(shared: &dyn SharedData, have: u64) -> Result<Option<Published>, StoreError> {
    let (bytes, _) = shared.get(SNAPSHOT_KEY)?;
    Ok(bytes
        .as_deref()
        .and_then(decode)
        .filter(|p| p.version > have))
}

/// Takes the fetch lease when `refresh` has passed since the last fetch began; `true` when this
/// VM is the one to fetch now.
pub fn take_lease(
    shared: &dyn SharedData,
    now: Millis,
    refresh: Millis,
) -> Result<bool, StoreError> {
    let (bytes, cas) = shared.get(LEASE_KEY)?;
    let last = bytes
        .as_deref()
        .and_then(|b| b.get(..8)?.try_into().ok())
        .map(i64::from_le_bytes);
    if last.is_some_and(|t| now.saturating_sub(t) < refresh) {
        return Ok(false);
    }
    shared.set(LEASE_KEY, &now.to_le_bytes(), cas)
}

/// Gives the fetch lease back (a fetch that could not be made): the next tick of any VM
/// takes it.
pub fn release_lease(shared: &dyn SharedData) -> Result<bool, StoreError> {
    shared.set(LEASE_KEY, &Millis::MIN.to_le_bytes(), None)
}

/// Publishes a snapshot that loaded, as the next version. `None` when another VM published
/// first (its version is then picked up on the next tick).
pub fn publish(
    shared: &dyn SharedData,
    etag: &str,
    body: &[u8],
) -> Result<Option<u64>, StoreError> {
    let (bytes, cas) = shared.get(SNAPSHOT_KEY)?;
    let version = bytes.as_deref().and_then(decode).map_or(0, |p| p.version) + 1;
    let published = Published {
        version,
        etag: etag.to_string(),
        body: body.to_vec(),
    };
    Ok(shared
        .set(SNAPSHOT_KEY, &encode(&published), cas)?
        .then_some(version))
}

#[cfg(test)]
mod tests {
    use super::*;

    type R = Result<(), Box<dyn std::error::Error>>;
    use crate::testing::EnvoyLike;

    #[test]
    fn one_fetch_per_refresh_period() -> R {
        let shared = EnvoyLike::default();
        assert!(take_lease(&shared, 0, 10_000)?);
        // Every other VM's tick in the same period finds the lease taken.
        assert!(!take_lease(&shared, 1, 10_000)?);
        assert!(!take_lease(&shared, 9_999, 10_000)?);
        assert!(take_lease(&shared, 10_000, 10_000)?);
        // A fetch that could not be made gives the lease back: the next tick takes it.
        assert!(release_lease(&shared)?);
        assert!(take_lease(&shared, 10_001, 10_000)?);
        assert!(!take_lease(&shared, 10_002, 10_000)?);
        Ok(())
    }

    #[test]
    fn versions_only_move_forward() -> R {
        let shared = EnvoyLike::default();
        assert_eq!(newer(&shared, 0)?, None);
        assert_eq!(publish(&shared, "\"a\"", b"{}")?, Some(1));
        assert_eq!(publish(&shared, "\"b\"", b"{\"x\":1}")?, Some(2));
        let p = newer(&shared, 1)?.ok_or("absent")?;
        assert_eq!(
            (p.version, p.etag.as_str(), p.body.as_slice()),
            (2, "\"b\"", &b"{\"x\":1}"[..])
        );
        assert_eq!(newer(&shared, 2)?, None);
        assert_eq!(current(&shared)?, Some((2, "\"b\"".to_string())));
        Ok(())
    }
}
