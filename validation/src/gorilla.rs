//! Gorilla compression of a series (Pelkonen et al., "Gorilla: A Fast, Scalable, In-Memory
//! Time Series Database", VLDB 2015): timestamps as delta-of-delta with variable-length
//! prefixes, values as the XOR with the previous value, storing only its meaningful bits.
//!
//! Timestamps are `i64` (milliseconds here, any unit works); a delta-of-delta outside the
//! widest prefix class is stored in 64 bits, so every input round-trips, however irregular.

/// Appends bits, most significant first, into bytes.
#[derive(Debug, Default)]
struct BitWriter {
    bytes: Vec<u8>,
    /// Bits used in the last byte (0 = the last byte is full or there is none).
    used: u32,
}

impl BitWriter {
    /// Appends the low `n` bits of `value` (`n <= 64`).
    fn write(&mut self, value: u64, n: u32) {
        let mut left = n;
        while left > 0 {
            if self.used == 0 {
                // A fresh byte: 0 bits used, 8 free.
                self.bytes.push(0);
            }
            let free = 8 - self.used;
            let take = free.min(left);
            let shift = left - take;
            let chunk = ((value >> shift) & ((1u64 << take) - 1)) as u8;
            let last = self.bytes.len() - 1;
            self.bytes[last] |= chunk << (free - take);
            self.used = (self.used + take) % 8;
            left -= take;
        }
    }

    fn bit(&mut self, b: bool) {
        self.write(u64::from(b), 1);
    }
}

/// Reads bits written by [`BitWriter`].
#[derive(Debug)]
struct BitReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl BitReader<'_> {
    fn read(&mut self, n: u32) -> Option<u64> {
        let mut v = 0u64;
        for _ in 0..n {
            let byte = *self.bytes.get(self.pos / 8)?;
            let bit = (byte >> (7 - (self.pos % 8))) & 1;
            v = (v << 1) | u64::from(bit);
            self.pos += 1;
        }
        Some(v)
    }

    fn bit(&mut self) -> Option<bool> {
        self.read(1).map(|b| b == 1)
    }
}

/// Sign-extends the low `n` bits of `v`.
fn sign_extend(v: u64, n: u32) -> i64 {
    let shift = 64 - n;
    ((v << shift) as i64) >> shift
}

/// The delta-of-delta classes: prefix, prefix length, payload bits.
const CLASSES: [(u64, u32, u32); 3] = [(0b10, 2, 7), (0b110, 3, 9), (0b1110, 4, 12)];

/// Compresses `(timestamps, values)` (equal lengths) into one segment.
pub(crate) fn encode(timestamps: &[i64], values: &[f64]) -> Vec<u8> {
    assert_eq!(timestamps.len(), values.len(), "one value per timestamp");
    let mut w = BitWriter::default();
    w.write(timestamps.len() as u64, 32);
    let (Some(&t0), Some(&v0)) = (timestamps.first(), values.first()) else {
        return w.bytes;
    };
    w.write(t0 as u64, 64);
    w.write(v0.to_bits(), 64);
    let (mut prev_t, mut prev_delta) = (t0, 0i64);
    let (mut prev_v, mut lead, mut trail) = (v0.to_bits(), u32::MAX, 0u32);
    for (&t, &v) in timestamps.iter().zip(values).skip(1) {
        let delta = t.wrapping_sub(prev_t);
        let dod = delta.wrapping_sub(prev_delta);
        (prev_t, prev_delta) = (t, delta);
        if dod == 0 {
            w.bit(false);
        } else if let Some(&(prefix, plen, bits)) = CLASSES.iter().find(|&&(_, _, bits)| {
            // Two's complement in `bits` bits.
            let half = 1i64 << (bits - 1);
            (-half..half).contains(&dod)
        }) {
            w.write(prefix, plen);
            w.write(dod as u64, bits);
        } else {
            w.write(0b1111, 4);
            w.write(dod as u64, 64);
        }

        let bits = v.to_bits();
        let x = bits ^ prev_v;
        prev_v = bits;
        if x == 0 {
            w.bit(false);
            continue;
        }
        w.bit(true);
        let (l, t) = (x.leading_zeros().min(31), x.trailing_zeros());
        if lead != u32::MAX && l >= lead && t >= trail {
            // Fits the previous window of meaningful bits.
            w.bit(false);
            w.write(x >> trail, 64 - lead - trail);
        } else {
            w.bit(true);
            let len = 64 - l - t;
            w.write(u64::from(l), 5);
            // 64 meaningful bits are written as 0 (6 bits hold 0..=63).
            w.write(u64::from(len % 64), 6);
            w.write(x >> t, len);
            (lead, trail) = (l, t);
        }
    }
    w.bytes
}

/// Decompresses a segment written by [`encode`]; `None` if it is truncated or malformed.
pub(crate) fn decode(segment: &[u8]) -> Option<(Vec<i64>, Vec<f64>)> {
    let mut r = BitReader {
        bytes: segment,
        pos: 0,
    };
    let n = usize::try_from(r.read(32)?).ok()?;
    let (mut ts, mut vs) = (Vec::with_capacity(n), Vec::with_capacity(n));
    if n == 0 {
        return Some((ts, vs));
    }
    let mut t = r.read(64)? as i64;
    let mut v = r.read(64)?;
    ts.push(t);
    vs.push(f64::from_bits(v));
    let (mut delta, mut lead, mut trail) = (0i64, 0u32, 0u32);
    for _ in 1..n {
        let dod = if !r.bit()? {
            0
        } else if !r.bit()? {
            sign_extend(r.read(7)?, 7)
        } else if !r.bit()? {
            sign_extend(r.read(9)?, 9)
        } else if !r.bit()? {
            sign_extend(r.read(12)?, 12)
        } else {
            r.read(64)? as i64
        };
        delta = delta.wrapping_add(dod);
        t = t.wrapping_add(delta);
        ts.push(t);

        if r.bit()? {
            if r.bit()? {
                lead = r.read(5)? as u32;
                let len = match r.read(6)? as u32 {
                    0 => 64,
                    len => len,
                };
                trail = 64u32.checked_sub(lead + len)?;
            }
            let len = 64 - lead - trail;
            v ^= r.read(len)? << trail;
        }
        vs.push(f64::from_bits(v));
    }
    Some((ts, vs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(ts: &[i64], vs: &[f64]) -> usize {
        let seg = encode(ts, vs);
        let (dt, dv) = decode(&seg).expect("decodes");
        assert_eq!(dt, ts);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&dv), bits(vs));
        seg.len()
    }

    #[test]
    fn empty_and_single_points_round_trip() {
        assert_eq!(round_trip(&[], &[]), 4);
        assert_eq!(round_trip(&[42], &[1.5]), 4 + 16);
        round_trip(&[i64::MIN], &[f64::NAN]);
    }

    #[test]
    fn regular_series_compress_to_about_two_bits_a_timestamp() {
        // Fixed interval, constant value: one bit for the timestamp and one for the value.
        let ts: Vec<i64> = (0..10_000).map(|i| 1_700_000_000_000 + i * 1000).collect();
        let vs = vec![21.5; ts.len()];
        let len = round_trip(&ts, &vs);
        // Header 4 + first point 16 + the first delta (a 64-bit class) + 2 bits per point.
        assert!(len <= 4 + 16 + 9 + 9_999 * 2 / 8 + 1, "{len} bytes");
    }

    #[test]
    fn every_delta_class_and_its_boundaries_round_trip() {
        let mut ts = vec![0i64];
        let mut t = 0i64;
        let mut delta = 0i64;
        for dod in [
            0,
            1,
            -1,
            63,
            64,
            -63,
            65,
            -64,
            255,
            256,
            -255,
            257,
            -256,
            2047,
            2048,
            -2047,
            2049,
            -2048,
            1 << 40,
            -(1 << 41),
            7,
        ] {
            delta += dod;
            t += delta;
            ts.push(t);
        }
        let vs: Vec<f64> = (0..ts.len()).map(|i| i as f64).collect();
        round_trip(&ts, &vs);
    }

    #[test]
    fn extreme_timestamps_and_values_round_trip() {
        let ts = [i64::MIN, i64::MAX, 0, i64::MIN, -1, i64::MAX];
        let vs = [
            f64::NAN,
            f64::INFINITY,
            -0.0,
            f64::MIN_POSITIVE,
            f64::MAX,
            f64::from_bits(1),
        ];
        round_trip(&ts, &vs);
    }

    #[test]
    fn random_walks_round_trip() {
        let mut s = 0x1234_5678_u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s >> 11
        };
        let mut t = 1_000_000i64;
        let mut v = 100.0f64;
        let (mut ts, mut vs) = (Vec::new(), Vec::new());
        for _ in 0..50_000 {
            t += 1000 + (next() % 7) as i64 - 3;
            v += ((next() % 201) as f64 - 100.0) / 100.0;
            ts.push(t);
            vs.push((v * 100.0).round() / 100.0);
        }
        let len = round_trip(&ts, &vs);
        // Two-decimal values are the hard case for XOR compression (their binary fractions
        // never end): about 8 bytes a value, plus 9 bits a jittered timestamp.
        assert!(len < ts.len() * 10, "compressed to {len} bytes");
    }

    #[test]
    fn truncated_segments_are_refused() {
        let ts: Vec<i64> = (0..100).map(|i| i * 10).collect();
        let vs: Vec<f64> = (0..100).map(|i| f64::from(i) * 0.5).collect();
        let seg = encode(&ts, &vs);
        assert!(decode(&seg[..seg.len() - 2]).is_none());
        assert!(decode(&[0, 0]).is_none());
    }
}
