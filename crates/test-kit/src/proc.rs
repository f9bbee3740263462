//! What a process holds, read from `/proc`: the files and ranges it maps, the
//! descriptors it has open, whether some bytes occur anywhere in its readable memory,
//! and a thread's CPU time. The tests that prove a back-end process holds only what it
//! was given, and that an idle thread sleeps, check these things the same way.

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

/// The lines of `/proc/<pid>/maps` (`pid` may be `self`).
///
/// # Errors
/// The maps file cannot be read.
pub fn maps(pid: &str) -> io::Result<Vec<String>> {
    Ok(std::fs::read_to_string(format!("/proc/{pid}/maps"))?
        .lines()
        .map(str::to_string)
        .collect())
}

/// `(start, end)` of a maps line's address range.
fn range(line: &str) -> Option<(u64, u64)> {
    let (a, b) = line.split_whitespace().next()?.split_once('-')?;
    Some((
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    ))
}

/// The lines of `/proc/<pid>/maps` whose range covers `addr`.
///
/// # Errors
/// The maps file cannot be read.
pub fn maps_covering(pid: &str, addr: u64) -> io::Result<Vec<String>> {
    Ok(maps(pid)?
        .into_iter()
        .filter(|l| range(l).is_some_and(|(a, b)| a <= addr && addr < b))
        .collect())
}

/// Whether any line of `/proc/<pid>/maps` mentions `name` (a memfd's or file's name).
///
/// # Errors
/// The maps file cannot be read.
pub fn maps_mention(pid: &str, name: &str) -> io::Result<bool> {
    Ok(maps(pid)?.iter().any(|l| l.contains(name)))
}

/// `(inode, path)` of every file mapping in `/proc/<pid>/maps`.
///
/// # Errors
/// The maps file cannot be read.
pub fn mapped_files(pid: &str) -> io::Result<Vec<(u64, String)>> {
    Ok(maps(pid)?
        .iter()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let inode: u64 = it.nth(4)?.parse().ok()?;
            Some((inode, it.collect::<Vec<_>>().join(" ")))
        })
        .filter(|(inode, _)| *inode != 0)
        .collect())
}

/// Whether `maps` (from [`mapped_files`]) maps `file` as the memfd named `name`.
///
/// # Errors
/// The file's metadata cannot be read.
pub fn maps_memfd(maps: &[(u64, String)], file: &File, name: &str) -> io::Result<bool> {
    let ino = file_id(file)?.1;
    Ok(maps
        .iter()
        .any(|(i, p)| *i == ino && p.contains(&format!("/memfd:{name}"))))
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
    let maps = maps(pid).ok()?;
    let mut hits = 0;
    let mut readable = false;
    for l in &maps {
        let Some(perms) = l.split_whitespace().nth(1) else {
            continue;
        };
        if !perms.starts_with('r') || l.ends_with("[vvar]") || l.ends_with("[vsyscall]") {
            continue;
        }
        let Some((a, b)) = range(l) else {
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

/// CPU time (user + system, clock ticks) of this process's thread named `name`, or
/// `None` if there is no such thread.
pub fn thread_ticks(name: &str) -> Option<u64> {
    for e in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = e.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        let f: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        // proc(5): utime and stime are fields 14 and 15 (11 and 12 after the name).
        return Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemfdRam;
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn this_process_maps_and_holds_its_memfd_and_the_scan_finds_bytes() {
        let ram = MemfdRam::new("test-kit-proc", &[(GuestAddress(0), 0x4000)]);
        let marker = random_bytes::<32>().expect("urandom");
        let host = ram
            .memory()
            .find_region(GuestAddress(0))
            .and_then(|r| r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok())
            .expect("mapped") as u64;
        crate::mem::DriverMemory::write_at(ram.memory(), 0x100, &marker);
        let mine = mapped_files("self").expect("maps");
        assert!(maps_memfd(&mine, ram.file(0), "test-kit-proc").expect("id"));
        assert!(maps_mention("self", "test-kit-proc").expect("maps"));
        assert!(maps_covering("self", host)
            .expect("maps")
            .iter()
            .any(|l| l.contains("test-kit-proc")));
        let id = file_id(ram.file(0)).expect("id");
        assert!(open_files("self")
            .expect("fds")
            .iter()
            .any(|&(_, f)| f == id));
        if let Some(n) = occurrences_in_memory("self", &marker) {
            assert!(n >= 1);
        }
        std::thread::Builder::new()
            .name("kit-ticks".into())
            .spawn(|| assert!(thread_ticks("kit-ticks").is_some()))
            .expect("spawn")
            .join()
            .expect("joined");
        assert_eq!(thread_ticks("no-such-thread-name"), None);
    }
}
