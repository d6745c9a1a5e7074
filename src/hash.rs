//! A fast hasher for integer keys (frame numbers). SipHash's DoS resistance
//! buys nothing here: the keys are frame numbers chosen by the library's own
//! allocator, and a cache hit must cost a few nanoseconds.

use std::hash::{BuildHasherDefault, Hasher};

/// Multiply-rotate hashing of machine words (the scheme rustc uses).
#[derive(Default, Clone, Copy)]
pub(crate) struct WordHasher(u64);

const K: u64 = 0x517c_c1b7_2722_0a95;

impl Hasher for WordHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(K);
    }
    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

pub(crate) type BuildWordHasher = BuildHasherDefault<WordHasher>;
pub(crate) type WordMap<K, V> = std::collections::HashMap<K, V, BuildWordHasher>;
