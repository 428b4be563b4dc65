//! Workload generators: a Zipf sampler for hot products and the mulberry32
//! generator of the automerge-repo anchor benchmark.

use rand::Rng;

/// Zipf(s) over ranks 1..=n, sampled by binary search over the CDF.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    /// A rank in 1..=n (1 is the most frequent).
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        self.at(rng.gen())
    }

    /// The rank for a uniform `u` in [0, 1).
    pub fn at(&self, u: f64) -> usize {
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1) + 1
    }
}

/// mulberry32, exactly as the anchor benchmark's README defines it.
pub struct Mulberry32(u32);

impl Mulberry32 {
    pub fn new(seed: u32) -> Mulberry32 {
        Mulberry32(seed)
    }

    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_add(0x6D2B_79F5);
        let a = self.0;
        let mut t = (a ^ (a >> 15)).wrapping_mul(a | 1);
        t = (t.wrapping_add((t ^ (t >> 7)).wrapping_mul(t | 61))) ^ t;
        t ^ (t >> 14)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mulberry32_matches_the_anchor() {
        let mut g = Mulberry32::new(1);
        assert_eq!(
            [g.next(), g.next(), g.next()],
            [2693262067, 11749833, 2265367787]
        );
        let mut g = Mulberry32::new(2);
        assert_eq!(
            [g.next(), g.next(), g.next()],
            [3153583793, 1395857638, 1225337227]
        );
        let mut g = Mulberry32::new(1);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            seen.insert(g.next() % 10_000);
        }
        assert_eq!(seen.len(), 1829);
    }

    #[test]
    fn zipf_prefers_low_ranks() {
        let z = Zipf::new(10_000, 1.1);
        let mut rng = rand::thread_rng();
        let mut top = 0;
        for _ in 0..10_000 {
            let r = z.sample(&mut rng);
            assert!((1..=10_000).contains(&r));
            if r == 1 {
                top += 1;
            }
        }
        // P(rank 1) ≈ 1 / H(10000, 1.1) ≈ 0.14.
        assert!((900..2000).contains(&top), "{top}");
    }
}
