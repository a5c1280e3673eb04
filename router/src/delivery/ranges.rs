//! Settled offsets above a queue group's floor, kept as ranges.
//!
//! Several consumers ack out of order, so a partition's floor lags behind a
//! spread of settled offsets. Keeping those as half-open ranges instead of
//! one entry each makes them cheap in memory and, more importantly, cheap to
//! store: they are written as one small row per 4,096-offset chunk that
//! changed (`queue_done`), not one row inserted per ack and deleted again
//! when the floor passes it.

use std::collections::BTreeMap;

/// Offsets per stored chunk.
pub const CHUNK: u64 = 4096;

/// A set of `u64` offsets as disjoint, non-adjacent half-open ranges.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end (exclusive).
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// True if `o` is in the set.
    pub fn contains(&self, o: u64) -> bool {
        self.ranges
            .range(..=o)
            .next_back()
            .is_some_and(|(_, &end)| o < end)
    }

    /// Adds `o`, merging with neighbouring ranges.
    pub fn insert(&mut self, o: u64) {
        self.insert_range(o, o + 1);
    }

    /// Adds `[start, end)`.
    pub fn insert_range(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // A range starting at or before `end` and reaching `start` overlaps
        // or touches: absorb every such range.
        while let Some((&s, &e)) = self.ranges.range(..=end).next_back() {
            if e < start {
                break;
            }
            self.ranges.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// Removes every offset below `floor`; returns the removed ranges
    /// (clipped at `floor`).
    pub fn remove_below(&mut self, floor: u64) -> Vec<(u64, u64)> {
        let mut removed = Vec::new();
        while let Some((&s, &e)) = self.ranges.first_key_value() {
            if s >= floor {
                break;
            }
            self.ranges.remove(&s);
            removed.push((s, e.min(floor)));
            if e > floor {
                self.ranges.insert(floor, e);
                break;
            }
        }
        removed
    }

    /// The ranges in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }

    /// Encodes the part of the set inside chunk `chunk` (offsets
    /// `chunk * CHUNK ..`) as pairs of little-endian `u16` (start, end)
    /// relative to the chunk; empty if nothing of the set is in it.
    pub fn encode_chunk(&self, chunk: u64) -> Vec<u8> {
        let base = chunk * CHUNK;
        let top = base + CHUNK;
        let mut out = Vec::new();
        // The range holding `base`, if any, starts before it.
        let first = self
            .ranges
            .range(..=base)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(base);
        for (&s, &e) in self.ranges.range(first..top) {
            let (s, e) = (s.max(base), e.min(top));
            if s < e {
                out.extend_from_slice(&((s - base) as u16).to_le_bytes());
                // `e - base` can be CHUNK itself, which needs 13 bits.
                out.extend_from_slice(&((e - base) as u16).to_le_bytes());
            }
        }
        out
    }

    /// Adds the ranges of a chunk encoded by [`RangeSet::encode_chunk`].
    /// Malformed bytes (odd length, inverted or oversized ranges) are
    /// ignored pair by pair: the worst outcome is a redelivery.
    pub fn decode_chunk(&mut self, chunk: u64, bytes: &[u8]) {
        let base = chunk * CHUNK;
        for pair in bytes.chunks_exact(4) {
            let s = u16::from_le_bytes([pair[0], pair[1]]) as u64;
            let e = u16::from_le_bytes([pair[2], pair[3]]) as u64;
            if s < e && e <= CHUNK {
                self.insert_range(base + s, base + e);
            }
        }
    }
}

/// The chunks `[start, end)` touches.
pub fn chunks_of(start: u64, end: u64) -> std::ops::RangeInclusive<u64> {
    start / CHUNK..=(end.max(start + 1) - 1) / CHUNK
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn merges_neighbours_and_splits_at_the_floor() {
        let mut s = RangeSet::default();
        for o in [5, 7, 6, 10, 4] {
            s.insert(o);
        }
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(4, 8), (10, 11)]);
        assert_eq!(s.remove_below(6), vec![(4, 6)]);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(6, 8), (10, 11)]);
        assert!(s.contains(7) && !s.contains(8) && s.contains(10));
    }

    #[test]
    fn chunk_encoding_clips_ranges_that_cross_chunks() {
        let mut s = RangeSet::default();
        s.insert_range(CHUNK - 2, CHUNK + 3);
        s.insert_range(3 * CHUNK, 4 * CHUNK);
        let mut back = RangeSet::default();
        for c in 0..5 {
            back.decode_chunk(c, &s.encode_chunk(c));
        }
        assert_eq!(back, s);
        assert!(s.encode_chunk(2).is_empty());
        assert_eq!(s.encode_chunk(3).len(), 4);
    }

    proptest! {
        /// The set behaves as a set of offsets, and encoding every chunk
        /// round-trips it.
        #[test]
        fn matches_a_plain_set(
            ops in proptest::collection::vec((0u64..3 * CHUNK, 0u8..10), 1..400)
        ) {
            let mut s = RangeSet::default();
            let mut model = BTreeSet::new();
            for (o, kind) in ops {
                if kind == 0 {
                    s.remove_below(o);
                    model.retain(|&x| x >= o);
                } else {
                    s.insert(o);
                    model.insert(o);
                }
                // Ranges stay disjoint and non-adjacent.
                let rs: Vec<_> = s.iter().collect();
                for w in rs.windows(2) {
                    prop_assert!(w[0].1 < w[1].0);
                }
            }
            for o in 0..3 * CHUNK {
                prop_assert_eq!(s.contains(o), model.contains(&o));
            }
            let mut back = RangeSet::default();
            for c in 0..3 {
                back.decode_chunk(c, &s.encode_chunk(c));
            }
            prop_assert_eq!(back, s);
        }
    }
}
