//! A small deterministic generator (xorshift64, shifts 13/7/17) for tests and
//! benches that explore an input space: the same seed gives the same cases on every
//! machine, and a failing case can be replayed from its seed.

#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator starting from `seed`, which must not be 0 (xorshift stays at 0).
    pub fn new(seed: u64) -> XorShift {
        assert_ne!(seed, 0, "xorshift needs a non-zero seed");
        XorShift(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n` (`n` > 0; slightly biased for huge `n`, which is fine here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// One of `from` (not empty).
    pub fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_is_xorshift64() {
        // The values every earlier copy of this generator produced from this seed.
        let mut r = XorShift::new(1);
        assert_eq!(r.next_u64(), 1_082_269_761);
        assert_eq!(r.next_u64(), 1_152_992_998_833_853_505);
        let mut a = XorShift::new(0x9e37_79b9_7f4a_7c15);
        let mut b = a.clone();
        let x = a.below(10);
        assert_eq!(x, b.next_u64() % 10);
        assert_eq!(*XorShift::new(7).pick(&[5]), 5);
    }
}
