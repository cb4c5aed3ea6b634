//! Choosing the next token: repetition penalty, temperature, top-k, top-p (in transformers'
//! order), greedy at temperature 0; seeded, so a seed reproduces a sample.

/// What `generate` exposes as flags.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    state: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let state = params.seed ^ 0x9E37_79B9_7F4A_7C15;
        Sampler { params, state }
    }

    /// splitmix64 → uniform [0, 1).
    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Picks a token from `logits` [v] given the ids seen so far (prompt and output).
    pub fn sample(&mut self, logits: &[f32], seen: &[u32]) -> u32 {
        let rp = self.params.repetition_penalty;
        let l: std::borrow::Cow<[f32]> = if rp != 1.0 {
            // transformers' RepetitionPenaltyLogitsProcessor: divide positive, multiply negative.
            let mut l = logits.to_vec();
            let mut uniq: Vec<u32> = seen.to_vec();
            uniq.sort_unstable();
            uniq.dedup();
            for id in uniq {
                if let Some(x) = l.get_mut(id as usize) {
                    *x = if *x < 0.0 { *x * rp } else { *x / rp };
                }
            }
            l.into()
        } else {
            logits.into()
        };
        if self.params.temperature <= 0.0 {
            return argmax(&l);
        }
        // The candidate buffers live per thread: a server samples many streams a step on its
        // worker threads, and fresh vocabulary-sized vectors per token cost time and leave
        // each thread's allocator holding their pages.
        SCRATCH.with_borrow_mut(|sc| self.sample_ranked(&l, sc))
    }

    /// `sample` after the penalty, at temperature > 0.
    fn sample_ranked(&mut self, l: &[f32], sc: &mut Scratch) -> u32 {
        ranked_into(l, self.params.temperature, self.params.top_k, sc);
        let (cand, probs) = (&sc.cand, &mut sc.probs);
        let max = cand[0].1;
        probs.clear();
        probs.extend(cand.iter().map(|c| ((c.1 - max) as f64).exp()));
        let z: f64 = probs.iter().sum();
        // (A NaN top_p keeps every candidate, as `top_p < 1.0` being false always did.)
        let truncated = self.params.top_p < 1.0;
        if !truncated {
            // The walk below with each probability divided by z as it is reached: the same
            // values, without dividing the whole vocabulary.
            let r = self.uniform();
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p / z;
                if r < acc {
                    return cand[i].0;
                }
            }
            return cand[probs.len() - 1].0;
        }
        probs.iter_mut().for_each(|p| *p /= z);
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= self.params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        let r = self.uniform();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// The candidates `(id, logit / temp)` the sampler walks, in its order: descending by value
/// (f32's total order), ties by ascending id; the first `top_k` only when `top_k > 0`. The
/// same order as sorting with that comparator, at a fraction of the cost over a 32k-128k
/// vocabulary (a comparison sort took about 2 ms a token, which a server pays per stream
/// and step): each value becomes a u32 key whose unsigned order is the descending total
/// order, and a stable LSD radix sort over the ids in ascending order keeps ties by id.
fn ranked_into(l: &[f32], temp: f32, top_k: usize, sc: &mut Scratch) {
    let desc = |v: f32| {
        let b = v.to_bits();
        // Ascending total order as unsigned: negatives flipped whole, positives' sign set.
        let asc = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
        !asc
    };
    let keys = &mut sc.keys;
    keys.clear();
    keys.extend(
        l.iter()
            .enumerate()
            .map(|(i, &x)| (desc(x / temp), i as u32)),
    );
    if top_k > 0 && top_k < keys.len() {
        // (key, id) pairs are unique, so selecting the first top_k and sorting them is the
        // full sort's prefix.
        keys.select_nth_unstable(top_k - 1);
        keys.truncate(top_k);
        keys.sort_unstable();
    } else {
        radix_sort_stable(keys, &mut sc.tmp);
    }
    sc.cand.clear();
    sc.cand
        .extend(keys.iter().map(|&(_, i)| (i, l[i as usize] / temp)));
}

/// A sampler's vocabulary-sized buffers, reused across tokens (one set per thread).
#[derive(Default)]
struct Scratch {
    keys: Vec<(u32, u32)>,
    tmp: Vec<(u32, u32)>,
    cand: Vec<(u32, f32)>,
    probs: Vec<f64>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Sorts by `.0` ascending, keeping the input order of equal keys (11-bit digits, 3 passes).
fn radix_sort_stable(v: &mut Vec<(u32, u32)>, tmp: &mut Vec<(u32, u32)>) {
    tmp.clear();
    tmp.resize(v.len(), (0, 0));
    for pass in 0..3 {
        let shift = pass * 11;
        let mut count = [0usize; 2049];
        for &(k, _) in v.iter() {
            count[((k >> shift) & 0x7ff) as usize + 1] += 1;
        }
        for d in 0..2048 {
            count[d + 1] += count[d];
        }
        for &e in v.iter() {
            let d = ((e.0 >> shift) & 0x7ff) as usize;
            tmp[count[d]] = e;
            count[d] += 1;
        }
        std::mem::swap(v, tmp);
    }
}

/// Index of the largest logit (the first on ties, as torch.argmax).
pub fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in l.iter().enumerate() {
        if x > l[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranked(l: &[f32], temp: f32, top_k: usize) -> Vec<(u32, f32)> {
        let mut sc = Scratch::default();
        ranked_into(l, temp, top_k, &mut sc);
        sc.cand
    }

    #[test]
    fn greedy_takes_argmax_and_penalty_demotes_seen() {
        let logits = [0.1, 2.0, 1.9, -1.0];
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&logits, &[]), 1);
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.1,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[1]), 2);
    }

    #[test]
    fn seeded_sampling_repeats_and_top_k_restricts() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            seed: 42,
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone());
            (0..20).map(|_| s.sample(&logits, &[])).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..20).map(|_| s.sample(&logits, &[])).collect()
        };
        assert_eq!(a, b);
        // The three largest logits are ids 6, 13, 20 (value 1.8; ties broken by id).
        assert!(a.iter().all(|id| [6, 13, 20].contains(id)), "{a:?}");
    }

    /// The order the sampler walked before `ranked` (a comparison sort), on values with
    /// ties, both zeros, infinities, NaN and subnormals, with and without top-k.
    #[test]
    fn ranked_is_the_comparison_sorts_order() {
        let mut st = 0x1234_5678u64;
        let mut next = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            st
        };
        let specials = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-40,
            -1e-40,
            f32::MAX,
            f32::MIN,
        ];
        for case in 0..40 {
            let n = [1usize, 2, 7, 100, 2049, 32000][case % 6];
            let l: Vec<f32> = (0..n)
                .map(|_| {
                    let r = next();
                    match r % 10 {
                        0 => specials[(r >> 8) as usize % specials.len()],
                        1..=3 => ((r >> 8) % 5) as f32 * 0.5, // many ties
                        _ => (((r >> 11) as f64 / (1u64 << 53) as f64) * 40.0 - 20.0) as f32,
                    }
                })
                .collect();
            for temp in [1.0f32, 0.7, 3.0] {
                let mut want: Vec<(u32, f32)> = l
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| (i as u32, x / temp))
                    .collect();
                want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                for top_k in [0usize, 1, 3, 50, n, n + 5] {
                    let got = ranked(&l, temp, top_k);
                    let w = if top_k > 0 {
                        &want[..top_k.min(n)]
                    } else {
                        &want[..]
                    };
                    assert_eq!(got.len(), w.len(), "n {n} top_k {top_k}");
                    for (g, e) in got.iter().zip(w) {
                        assert!(
                            g.0 == e.0 && g.1.to_bits() == e.1.to_bits(),
                            "n {n} temp {temp} top_k {top_k}: {g:?} vs {e:?}"
                        );
                    }
                }
            }
        }
    }

    /// The sampler before `ranked` and the lazy normalisation, verbatim but for its name.
    fn reference_sample(s: &mut Sampler, logits: &[f32], seen: &[u32]) -> u32 {
        let mut l = logits.to_vec();
        let rp = s.params.repetition_penalty;
        if rp != 1.0 {
            let mut uniq: Vec<u32> = seen.to_vec();
            uniq.sort_unstable();
            uniq.dedup();
            for id in uniq {
                if let Some(x) = l.get_mut(id as usize) {
                    *x = if *x < 0.0 { *x * rp } else { *x / rp };
                }
            }
        }
        if s.params.temperature <= 0.0 {
            return argmax(&l);
        }
        let temp = s.params.temperature;
        let mut cand: Vec<(u32, f32)> = l
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, x / temp))
            .collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if s.params.top_k > 0 {
            cand.truncate(s.params.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        if s.params.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= s.params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let z: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= z);
        }
        let r = s.uniform();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }

    /// The same tokens as the sampler before its speed-up, draw for draw, over every option.
    #[test]
    fn samples_equal_the_comparison_sort_samplers() {
        let mut st = 99u64;
        let logits: Vec<f32> = (0..3000)
            .map(|i| {
                st = st
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if i % 7 == 0 {
                    1.25 // ties
                } else {
                    ((st >> 40) as f32 / (1u64 << 24) as f32) * 12.0 - 6.0
                }
            })
            .collect();
        let seen = [3u32, 14, 15, 92, 65, 35, 14];
        for temperature in [0.0f32, 0.7, 1.3] {
            for top_k in [0usize, 1, 5, 200] {
                for top_p in [1.0f32, 0.9, 0.3, f32::NAN] {
                    for repetition_penalty in [1.0f32, 1.2] {
                        let p = SamplingParams {
                            temperature,
                            top_k,
                            top_p,
                            repetition_penalty,
                            seed: 7,
                        };
                        let (mut a, mut b) = (Sampler::new(p.clone()), Sampler::new(p.clone()));
                        for _ in 0..40 {
                            assert_eq!(
                                a.sample(&logits, &seen),
                                reference_sample(&mut b, &logits, &seen),
                                "{p:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn top_p_keeps_the_dominant_token() {
        let logits = [10.0, 0.0, 0.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 1,
            ..Default::default()
        });
        assert!((0..20).all(|_| s.sample(&logits, &[]) == 0));
    }
}
