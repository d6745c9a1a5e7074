//! A deterministic byte pattern: the content of generated files, which a
//! receiver can verify at any offset without a copy of the file. A test and
//! benchmark aid: a server has no use for it.

/// An odd constant (2^64 / golden ratio): multiplying by it is a bijection,
/// so no two words of one file are equal.
const K: u64 = 0x9E37_79B9_7F4A_7C15;

/// The bytes of a generated file: the little-endian 8-byte word `w` (bytes
/// `8w..8w+8` of the file) is a mix of `w` and the seed, so every word of a
/// file differs from every other and two seeds give different files. A
/// receiver checks what it got at any offset with [`Pattern::check`]; a
/// shifted, duplicated or stale page does not pass.
///
/// A test and benchmark aid, not part of sending: it is what
/// [`PageFile::pattern`](super::PageFile::pattern) writes, and what the
/// tests, the doctests and `examples/parallel_sendfile`'s clients check
/// what they received against (every byte of a response, at any offset,
/// with no copy of the file).
///
/// ```
/// use lwbuf::sendfile::Pattern;
/// let p = Pattern::new(7);
/// let mut buf = [0u8; 100];
/// p.fill(4093, &mut buf);
/// assert_eq!(p.check(4093, &buf), None);
/// buf[50] ^= 1;
/// assert_eq!(p.check(4093, &buf), Some(50));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pattern {
    seed: u64,
}

impl Pattern {
    /// The pattern of `seed`.
    pub const fn new(seed: u64) -> Pattern {
        Pattern { seed }
    }

    /// The seed.
    pub const fn seed(&self) -> u64 {
        self.seed
    }

    #[inline(always)]
    fn word(&self, w: u64) -> u64 {
        let x = (w ^ self.seed).wrapping_mul(K);
        x ^ (x >> 29)
    }

    /// The byte at file offset `offset`.
    pub fn byte_at(&self, offset: u64) -> u8 {
        self.word(offset / 8).to_le_bytes()[(offset % 8) as usize]
    }

    /// Fill `buf` with the file's bytes from `offset` on.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let head = ((8 - offset % 8) % 8).min(buf.len() as u64) as usize;
        let (h, rest) = buf.split_at_mut(head);
        for (i, b) in h.iter_mut().enumerate() {
            *b = self.byte_at(offset + i as u64);
        }
        let base = (offset + head as u64) / 8;
        let body = (rest.len() / 8) * 8;
        let (words, tail) = rest.split_at_mut(body);
        for (i, c) in words.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&self.word(base + i as u64).to_le_bytes());
        }
        let tail_off = offset + (head + body) as u64;
        for (i, b) in tail.iter_mut().enumerate() {
            *b = self.byte_at(tail_off + i as u64);
        }
    }

    /// The index of the first byte of `buf` that is not the file's byte at
    /// `offset + index`, or `None` if all are.
    pub fn check(&self, offset: u64, buf: &[u8]) -> Option<usize> {
        let head = ((8 - offset % 8) % 8).min(buf.len() as u64) as usize;
        for (i, &b) in buf[..head].iter().enumerate() {
            if b != self.byte_at(offset + i as u64) {
                return Some(i);
            }
        }
        let base = (offset + head as u64) / 8;
        let body = &buf[head..];
        // Blocks of 8 words without an early exit per word (the compiler
        // keeps the multiplies in flight); a block that differs is searched
        // word by word below.
        const BLOCK: usize = 64;
        let mut skip = 0;
        for (b, block) in body.chunks_exact(BLOCK).enumerate() {
            let w0 = base + (b * BLOCK / 8) as u64;
            let mut diff = 0u64;
            for (j, c) in block.chunks_exact(8).enumerate() {
                let got = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                diff |= got ^ self.word(w0 + j as u64);
            }
            if diff != 0 {
                break;
            }
            skip += BLOCK;
        }
        let base = base + (skip / 8) as u64;
        let head = head + skip;
        let body = &body[skip..];
        let mut chunks = body.chunks_exact(8);
        for (i, c) in chunks.by_ref().enumerate() {
            let got = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            if got != self.word(base + i as u64) {
                let want = self.word(base + i as u64).to_le_bytes();
                let j = c.iter().zip(want).position(|(a, b)| *a != b).unwrap_or(0);
                return Some(head + i * 8 + j);
            }
        }
        let done = head + (body.len() / 8) * 8;
        for (i, &b) in chunks.remainder().iter().enumerate() {
            if b != self.byte_at(offset + (done + i) as u64) {
                return Some(done + i);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::Pattern;

    #[test]
    fn check_finds_the_first_wrong_byte_anywhere() {
        let p = Pattern::new(9);
        for offset in [0u64, 3, 8, 61, 4093] {
            let mut buf = vec![0u8; 1000];
            p.fill(offset, &mut buf);
            assert_eq!(p.check(offset, &buf), None);
            for bad in [0, 1, 7, 8, 63, 64, 65, 200, 511, 512, 990, 999] {
                let mut b = buf.clone();
                b[bad] ^= 0x40;
                b[bad + (1000 - bad) / 2] ^= 0x01; // a later error must not mask it
                assert_eq!(p.check(offset, &b), Some(bad), "offset {offset}, byte {bad}");
            }
        }
    }
}
