//! Which partition a record goes to.
//!
//! Keyed records: `fnv1a_64(key) % partitions`. FNV-1a (64-bit, offset basis
//! `0xcbf29ce484222325`, prime `0x100000001b3`) is stable across versions and
//! platforms and trivial to reimplement in another client, which matters
//! because producers in any language must agree on it. Keyless records are
//! spread round-robin by each publish stream.

/// FNV-1a, 64-bit.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    crate::storage::key_hash(bytes)
}

/// The partition for `key` in a topic with `partitions` partitions.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    (fnv1a64(key) % partitions as u64) as u32
}

/// The partition for `record`: by key hash, or round-robin on the caller's
/// cursor `rr` for keyless records.
pub fn partition_of(record: &crate::protocol::RawRecord, partitions: u32, rr: &mut u32) -> u32 {
    match record.key_bytes() {
        Some(k) => partition_for_key(k, partitions),
        None => {
            *rr = rr.wrapping_add(1);
            *rr % partitions
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_reference_vectors() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn same_key_same_partition() {
        for n in 1..17 {
            assert_eq!(
                partition_for_key(b"order-42", n),
                partition_for_key(b"order-42", n)
            );
            assert!(partition_for_key(b"order-42", n) < n);
        }
    }
}
