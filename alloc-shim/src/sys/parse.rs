//! The one parser for the numbers the allocator reads without allocating: fields of `/proc` and
//! `/sys` files, and sizes in the environment (`256MiB`).

/// Why a number did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NumberError {
    /// No digit where the number should start.
    NoDigits,
    /// More than `u64` holds (the digits, or the digits times the unit).
    TooLarge,
    /// Something after the digits that is not one of the units allowed.
    UnknownUnit,
}

/// The decimal number at the start of `text`, and what follows it.
pub(crate) fn leading_u64(text: &[u8]) -> Result<(u64, &[u8]), NumberError> {
    let digits = text.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return Err(NumberError::NoDigits);
    }
    let mut n: u64 = 0;
    for &d in &text[..digits] {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
            .ok_or(NumberError::TooLarge)?;
    }
    Ok((n, &text[digits..]))
}

/// A field that is a decimal number and nothing else (blanks around it allowed).
pub(crate) fn field(text: &[u8]) -> Option<u64> {
    match leading_u64(text.trim_ascii()) {
        Ok((n, [])) => Some(n),
        _ => None,
    }
}

/// A size: digits, then (blanks allowed) one of `units`, each a name and the power of two it
/// multiplies by. Blanks around the whole are ignored.
pub(crate) fn size(text: &[u8], units: &[(&[u8], u32)]) -> Result<u64, NumberError> {
    let (n, rest) = leading_u64(text.trim_ascii())?;
    let unit = rest.trim_ascii();
    let (_, shift) = units
        .iter()
        .find(|(name, _)| *name == unit)
        .ok_or(NumberError::UnknownUnit)?;
    n.checked_mul(1u64 << shift).ok_or(NumberError::TooLarge)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_fields_and_sizes() {
        assert_eq!(leading_u64(b"12x"), Ok((12, &b"x"[..])));
        assert_eq!(leading_u64(b"x"), Err(NumberError::NoDigits));
        assert_eq!(
            leading_u64(b"99999999999999999999"),
            Err(NumberError::TooLarge)
        );
        assert_eq!(field(b" 42\n"), Some(42));
        assert_eq!(field(b"12x"), None);
        assert_eq!(field(b""), None);
        let units: &[(&[u8], u32)] = &[(b"", 0), (b"KiB", 10), (b"MiB", 20)];
        assert_eq!(size(b" 3 MiB ", units), Ok(3 << 20));
        assert_eq!(size(b"7", units), Ok(7));
        assert_eq!(size(b"1GiB", units), Err(NumberError::UnknownUnit));
        assert_eq!(
            size(b"18446744073709551615KiB", units),
            Err(NumberError::TooLarge)
        );
    }
}
