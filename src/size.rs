//! Byte sizes: parsing human-written sizes (`512MiB`, `2GiB`, `30%`) and printing them.

use std::fmt;

/// Why a size string could not be parsed. `Copy`, so it can be carried by any error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeError {
    /// The string was empty or only whitespace.
    Empty,
    /// The numeric part was missing or not a number.
    NotANumber,
    /// The unit was not one of `B`, `KiB`, `MiB`, `GiB`, `TiB`, `KB`, `MB`, `GB`, `TB`, `%`.
    UnknownUnit,
    /// The size does not fit in 64 bits.
    TooLarge,
    /// The size is zero.
    Zero,
    /// A percentage outside `(0, 100]`.
    PercentOutOfRange,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SizeError::Empty => "the size is empty",
            SizeError::NotANumber => "the size does not start with a number",
            SizeError::UnknownUnit => {
                "unknown unit (expected B, KiB, MiB, GiB, TiB, KB, MB, GB, TB or %)"
            }
            SizeError::TooLarge => "the size does not fit in 64 bits",
            SizeError::Zero => "the size is zero",
            SizeError::PercentOutOfRange => "a percentage must be above 0 and at most 100",
        })
    }
}

impl std::error::Error for SizeError {}

/// An amount of memory: a number of bytes, or a fraction of the global ceiling.
///
/// ```
/// use nodedb_mem::Size;
///
/// assert_eq!(Size::parse("512MiB"), Ok(Size::Bytes(512 << 20)));
/// assert_eq!(Size::parse("2 GiB"), Ok(Size::Bytes(2 << 30)));
/// assert_eq!(Size::parse("1500000"), Ok(Size::Bytes(1_500_000)));
/// assert_eq!(Size::parse("1.5KB"), Ok(Size::Bytes(1_500)));
/// assert_eq!(Size::parse("25%"), Ok(Size::Fraction(0.25)));
/// assert_eq!(Size::from(4096u64).resolve(1 << 30), 4096);
/// assert_eq!(Size::Fraction(0.5).resolve(1 << 30), 1 << 29);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Size {
    /// An exact number of bytes.
    Bytes(u64),
    /// A fraction of the global ceiling, in `(0, 1]`.
    Fraction(f64),
}

impl From<u64> for Size {
    fn from(bytes: u64) -> Self {
        Size::Bytes(bytes)
    }
}

impl Size {
    /// Parses `"<number>[ ]<unit>"`. Binary units (`KiB`…`TiB`) are powers of 1024, decimal
    /// units (`KB`…`TB`) powers of 1000, `B` or no unit means bytes, `%` a fraction of the
    /// ceiling. Units are case-insensitive; a fractional number is allowed with a unit.
    pub fn parse(input: &str) -> Result<Size, SizeError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(SizeError::Empty);
        }
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let unit = unit.trim_start();
        if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
            return Err(SizeError::NotANumber);
        }
        if unit == "%" {
            let pct: f64 = number.parse().map_err(|_| SizeError::NotANumber)?;
            if !(pct > 0.0 && pct <= 100.0) {
                return Err(SizeError::PercentOutOfRange);
            }
            return Ok(Size::Fraction(pct / 100.0));
        }
        let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            _ => return Err(SizeError::UnknownUnit),
        };
        let bytes = match number.split_once('.') {
            None => number
                .parse::<u64>()
                .map_err(|_| SizeError::TooLarge)?
                .checked_mul(multiplier)
                .ok_or(SizeError::TooLarge)?,
            Some((whole, frac)) => {
                if frac.contains('.') {
                    return Err(SizeError::NotANumber);
                }
                // Exact decimal arithmetic: whole * m + frac * m / 10^len(frac), rounded down.
                let whole: u64 = whole.parse().map_err(|_| SizeError::TooLarge)?;
                let frac_digits = frac.len().min(18);
                let frac_value: u64 = frac[..frac_digits]
                    .parse()
                    .map_err(|_| SizeError::NotANumber)?;
                let scale = 10u128.pow(frac_digits as u32);
                let total = u128::from(whole) * u128::from(multiplier)
                    + u128::from(frac_value) * u128::from(multiplier) / scale;
                u64::try_from(total).map_err(|_| SizeError::TooLarge)?
            }
        };
        if bytes == 0 {
            return Err(SizeError::Zero);
        }
        Ok(Size::Bytes(bytes))
    }

    /// The number of bytes this size stands for under a ceiling of `ceiling` bytes.
    /// A fraction is rounded down to whole bytes.
    pub fn resolve(self, ceiling: u64) -> u64 {
        match self {
            Size::Bytes(b) => b,
            Size::Fraction(f) => fraction_of(ceiling, f),
        }
    }
}

/// `ceiling * f`, rounded down, for `f` in `[0, 1]`; exact for every `u64` ceiling.
pub(crate) fn fraction_of(ceiling: u64, f: f64) -> u64 {
    // Parts per billion keep the product in u128 exact and the rounding predictable.
    let ppb = (f.clamp(0.0, 1.0) * 1e9).round() as u128;
    (u128::from(ceiling) * ppb / 1_000_000_000) as u64
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Size::Bytes(b) => ByteSize(*b).fmt(f),
            Size::Fraction(x) => write!(f, "{}% of the ceiling", x * 100.0),
        }
    }
}

/// Prints a byte count for people: exact units when the count is a whole number of them
/// (`512 MiB`), one decimal and the exact count otherwise (`1.5 MiB (1572864 B)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        let b = self.0;
        for (name, unit) in UNITS {
            if b >= unit {
                return if b.is_multiple_of(unit) {
                    write!(f, "{} {name}", b / unit)
                } else {
                    write!(f, "{:.1} {name} ({b} B)", b as f64 / unit as f64)
                };
            }
        }
        write!(f, "{b} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        let cases = [
            ("1", 1),
            ("1B", 1),
            ("1 b", 1),
            ("3KiB", 3 << 10),
            ("3kib", 3 << 10),
            ("512MiB", 512 << 20),
            ("2GiB", 2 << 30),
            ("1TiB", 1 << 40),
            ("7KB", 7_000),
            ("7MB", 7_000_000),
            ("7GB", 7_000_000_000),
            ("7TB", 7_000_000_000_000),
            ("0.5GiB", 1 << 29),
            ("1.25 KiB", 1280),
            ("  64 MiB  ", 64 << 20),
        ];
        for (s, want) in cases {
            assert_eq!(Size::parse(s), Ok(Size::Bytes(want)), "{s:?}");
        }
    }

    #[test]
    fn rejects_bad_input_with_the_reason() {
        let cases = [
            ("", SizeError::Empty),
            ("   ", SizeError::Empty),
            ("MiB", SizeError::NotANumber),
            ("-5", SizeError::NotANumber),
            (".5MiB", SizeError::NotANumber),
            ("5.MiB", SizeError::NotANumber),
            ("1.2.3MiB", SizeError::NotANumber),
            ("12 parsecs", SizeError::UnknownUnit),
            ("12 MiB extra", SizeError::UnknownUnit),
            ("0", SizeError::Zero),
            ("0 GiB", SizeError::Zero),
            ("0.0001 B", SizeError::Zero),
            ("18446744073709551616", SizeError::TooLarge),
            ("17000000 TiB", SizeError::TooLarge),
            ("0%", SizeError::PercentOutOfRange),
            ("101%", SizeError::PercentOutOfRange),
        ];
        for (s, want) in cases {
            assert_eq!(Size::parse(s), Err(want), "{s:?}");
        }
    }

    #[test]
    fn percentages_are_fractions() {
        assert_eq!(Size::parse("100%"), Ok(Size::Fraction(1.0)));
        assert_eq!(Size::parse("12.5 %"), Ok(Size::Fraction(0.125)));
    }

    #[test]
    fn fractions_resolve_exactly() {
        assert_eq!(fraction_of(1000, 0.3), 300);
        assert_eq!(fraction_of(u64::MAX, 1.0), u64::MAX);
        assert_eq!(fraction_of(u64::MAX, 0.0), 0);
        assert_eq!(fraction_of(1 << 30, 0.25), 1 << 28);
    }

    #[test]
    fn byte_sizes_print_for_people() {
        assert_eq!(ByteSize(0).to_string(), "0 B");
        assert_eq!(ByteSize(1023).to_string(), "1023 B");
        assert_eq!(ByteSize(1024).to_string(), "1 KiB");
        assert_eq!(ByteSize(512 << 20).to_string(), "512 MiB");
        assert_eq!(ByteSize(1_572_864).to_string(), "1.5 MiB (1572864 B)");
        assert_eq!(ByteSize(3 << 40).to_string(), "3 TiB");
    }
}
