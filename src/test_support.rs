//! Helpers shared by the unit tests.

use std::path::Path;

/// A directory standing in for `/`: fake `/proc` and `/sys` files for the code that reads them.
pub(crate) struct FakeRoot(tempfile::TempDir);

impl FakeRoot {
    pub(crate) fn new() -> FakeRoot {
        FakeRoot(tempfile::tempdir().unwrap())
    }

    /// Writes `text` to `rel` under the root, making its directories.
    pub(crate) fn file(&self, rel: &str, text: &str) -> &Self {
        let p = self.0.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
        self
    }

    pub(crate) fn path(&self) -> &Path {
        self.0.path()
    }
}
