//! The top allocation sites a breach event carries: what held the engine's memory when its
//! budget refused a reservation or its overflow could not take an allocation.

use std::fmt;

/// How many sites a breach event carries.
pub const TOP_SITES: usize = 3;

/// One allocation site in a breach event: its short name and its live bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopSite {
    /// The innermost function of the site's stack outside the standard library's allocation
    /// machinery (as [`Site::name`](crate::Site::name) gives it), demangled.
    pub function: &'static str,
    /// The site's live bytes: its share of the engine's sampled live heap times the ledger's
    /// exact live bytes of the engine.
    pub bytes: u64,
}

/// The largest allocation sites of an engine by sampled live bytes, largest first, at most
/// [`TOP_SITES`] (none where nothing of the engine's is sampled: heap profiling off, or the
/// engine's blocks allocated before it was on).
///
/// Carried by [`EventKind::BudgetRejected`](crate::EventKind::BudgetRejected) and
/// [`EventKind::OverflowBreach`](crate::EventKind::OverflowBreach). A `Copy` value so events
/// stay `Copy`: each distinct function name is kept once for the life of the process (a
/// program has finitely many functions).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct TopSites {
    sites: [Option<TopSite>; TOP_SITES],
}

impl TopSites {
    /// No sites.
    pub const NONE: TopSites = TopSites {
        sites: [None; TOP_SITES],
    };

    /// The sites, largest first (the first [`TOP_SITES`] of `sites`).
    pub fn new(sites: impl IntoIterator<Item = TopSite>) -> TopSites {
        let mut out = TopSites::NONE;
        for (slot, s) in out.sites.iter_mut().zip(sites) {
            *slot = Some(s);
        }
        out
    }

    /// The sites, largest first.
    pub fn iter(&self) -> impl Iterator<Item = &TopSite> {
        self.sites.iter().map_while(Option::as_ref)
    }

    /// The largest site.
    pub fn first(&self) -> Option<&TopSite> {
        self.sites[0].as_ref()
    }

    /// How many sites there are.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.sites[0].is_none()
    }
}

impl fmt::Debug for TopSites {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// `name (size), name (size), …`, or `none sampled`.
impl fmt::Display for TopSites {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none sampled");
        }
        for (i, s) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} ({})", s.function, crate::size::ByteSize(s.bytes))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_three_in_order_and_displays_them() {
        let site = |function, bytes| TopSite { function, bytes };
        let top = TopSites::new([
            site("a", 3 << 20),
            site("b", 2 << 20),
            site("c", 1 << 20),
            site("d", 1),
        ]);
        assert_eq!(top.len(), 3);
        assert_eq!(top.first().unwrap().function, "a");
        assert_eq!(
            top.iter().map(|s| s.function).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(top.to_string(), "a (3 MiB), b (2 MiB), c (1 MiB)");
        assert_eq!(TopSites::NONE.to_string(), "none sampled");
        assert!(TopSites::NONE.is_empty());
        assert_eq!(TopSites::new([site("x", 5)]).len(), 1);
    }
}
