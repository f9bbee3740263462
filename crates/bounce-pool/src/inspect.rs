//! What another process holds, read from `/proc` (feature `test-utils`): the files it
//! maps, the descriptors it has open, and whether some bytes occur anywhere in its
//! readable memory. The tests that prove a backend process holds only the pool (here
//! and in `aperture`'s vhost-user pool test) check the same things the same way.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};

/// `(device, inode)` of a file.
///
/// # Errors
/// The file's metadata cannot be read.
pub fn file_id(f: &File) -> io::Result<(u64, u64)> {
    let m = f.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// `(inode, path)` of every file mapping in `/proc/<pid>/maps` (`pid` may be `self`).
///
/// # Errors
/// The maps file cannot be read.
pub fn mapped_files(pid: &str) -> io::Result<Vec<(u64, String)>> {
    Ok(std::fs::read_to_string(format!("/proc/{pid}/maps"))?
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let inode: u64 = it.nth(4)?.parse().ok()?;
            Some((inode, it.collect::<Vec<_>>().join(" ")))
        })
        .filter(|(inode, _)| *inode != 0)
        .collect())
}

/// `(fd number, (device, inode))` of every open descriptor of `pid`.
///
/// # Errors
/// The fd directory cannot be read.
pub fn open_files(pid: &str) -> io::Result<Vec<(i32, (u64, u64))>> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| {
            let e = e.ok()?;
            let fd = e.file_name().to_str()?.parse().ok()?;
            let m = std::fs::metadata(e.path()).ok()?;
            Some((fd, (m.dev(), m.ino())))
        })
        .collect())
}

/// Occurrences of `needle` in the readable memory of `pid`, or `None` if the kernel
/// lets this process read none of it (`/proc/<pid>/mem` needs ptrace access).
pub fn occurrences_in_memory(pid: &str, needle: &[u8]) -> Option<usize> {
    let mem = File::open(format!("/proc/{pid}/mem")).ok()?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let mut hits = 0;
    let mut readable = false;
    for l in maps.lines() {
        let mut it = l.split_whitespace();
        let (Some(range), Some(perms)) = (it.next(), it.next()) else {
            continue;
        };
        if !perms.starts_with('r') || l.ends_with("[vvar]") || l.ends_with("[vsyscall]") {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        let Some(len) = b.checked_sub(a).and_then(|l| usize::try_from(l).ok()) else {
            continue;
        };
        let mut buf = vec![0u8; len];
        if mem.read_exact_at(&mut buf, a).is_err() {
            continue;
        }
        readable = true;
        hits += buf.windows(needle.len()).filter(|w| *w == needle).count();
    }
    readable.then_some(hits)
}

/// `N` bytes from `/dev/urandom`: a secret or marker no process holds by chance.
///
/// # Errors
/// `/dev/urandom` cannot be read.
pub fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut s = [0u8; N];
    File::open("/dev/urandom")?.read_exact(&mut s)?;
    Ok(s)
}
