//! Temporary disk images and directories, removed when dropped, and the data pattern
//! tests fill buffers and images with.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A name no other [`TempImage`] or [`TempDir`] of any test process uses:
/// `aperture-test-PID-N-TAG`.
fn unique_name(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("aperture-test-{}-{n}-{tag}", std::process::id())
}

/// A disk image (any file) in a temporary directory, removed when dropped.
#[derive(Debug)]
pub struct TempImage {
    path: PathBuf,
}

impl TempImage {
    /// A new image named after `tag` in the system's temporary directory, holding
    /// `contents`.
    pub fn new(tag: &str, contents: &[u8]) -> Self {
        Self::new_in(&std::env::temp_dir(), tag, contents)
    }

    /// A new image named after `tag` in `dir`, holding `contents`.
    pub fn new_in(dir: &Path, tag: &str, contents: &[u8]) -> Self {
        let path = dir.join(format!("{}.img", unique_name(tag)));
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        Self { path }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the image holds now.
    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", self.path.display()))
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An empty directory in the system's temporary directory, removed with everything in
/// it when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A new, empty directory named after `tag`.
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(unique_name(tag));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self { path }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` inside it.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `len` deterministic, non-trivial bytes for `seed`: every byte depends on its whole
/// offset (splitmix64 of offset and seed), so no two offsets of a buffer, and no two
/// seeds at one offset, are alike by construction. A copy that lands at the wrong
/// offset, or a buffer filled with another seed, shows.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let mut z = (i ^ (u64::from(seed) << 56)).wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_differs_by_seed_and_offset() {
        assert_eq!(pattern(4096, 3), pattern(4096, 3));
        let (a, b) = (pattern(1 << 20, 1), pattern(1 << 20, 2));
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(same < (1 << 20) / 128, "{same} equal bytes between seeds");
        // No short period: 512-byte blocks (a sector) are all different.
        let mut blocks: Vec<&[u8]> = a.chunks(512).collect();
        blocks.sort();
        blocks.dedup();
        assert_eq!(blocks.len(), (1 << 20) / 512);
    }

    #[test]
    fn temp_files_are_removed_on_drop() {
        let img = TempImage::new("kit", b"abc");
        let p = img.path().to_path_buf();
        assert_eq!(img.contents(), b"abc");
        drop(img);
        assert!(!p.exists());
        let d = TempDir::new("kit");
        std::fs::write(d.join("f"), b"x").unwrap_or_else(|e| panic!("{e}"));
        let p = d.path().to_path_buf();
        drop(d);
        assert!(!p.exists());
    }
}
