//! "A backend provably holds only the pool" (issue 6; item 9 of the list in `rules.rs`):
//! virtio-blk served by a separate process that is given the pool's memfd and
//! nothing else of the guest.
//!
//! The guest side here builds its RAM with [`SplitRam`] (the pool in its own memfd),
//! puts the virtqueue in a coherent pool allocation and bounces every buffer through
//! the pool, as Linux does for a device with a `restricted-dma-pool`. The backend is
//! this test binary re-executed with [`CHILD_ENV`] set: before `exec` every file
//! descriptor but stdin/stdout/stderr (pipes to the parent) is closed and the pool
//! memfd is placed at fd 3; the child maps it with [`map_pool_file`] at the pool's
//! guest-physical address and serves the queue whenever the parent writes `kick`.
//!
//! The parent then checks, from outside the child:
//! - `/proc/<child>/fd`: fd 3 is the pool memfd, no descriptor is the RAM memfd, and
//!   the only others are its stdio pipes and the disk image it opened itself;
//! - `/proc/<child>/maps`: the pool memfd is mapped, the RAM memfd is not (the same
//!   check on the parent's own maps finds both, so it can fail);
//! - requests round-trip through the pool; requests whose descriptors name the
//!   guest's secret in RAM outside the pool fail with `VIRTIO_BLK_S_IOERR` and
//!   neither leak the secret to the disk nor change it;
//! - the secret's bytes are nowhere in the child's readable memory (read through
//!   `/proc/<child>/mem`, where the kernel allows a parent to; the same scan finds a
//!   marker the guest left in the pool, so the scan itself works).
//!
//! A plain `main` (no libtest harness), so the child process is only the backend.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use bounce_pool::ram::{POOL_MEMFD_NAME, RAM_MEMFD_NAME};
use bounce_pool::*;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use test_kit::blk::{access_platform_block, BlkLayout, BlkRequest};
use test_kit::proc::{file_id, mapped_files, occurrences_in_memory, open_files, random_bytes};
use test_kit::{pattern, RingLayout, SplitRing, TempImage};
use virtio_bindings::virtio_blk::*;
use virtio_contract::VirtioDevice;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Set in the child's environment: the backend's parameters.
const CHILD_ENV: &str = "BOUNCE_POOL_BACKEND";
/// Where the child finds the pool memfd.
const POOL_FD: i32 = 3;

const RAM: u64 = 16 << 20;
/// The restricted pool: 2 MiB at 8 MiB.
const POOL: u64 = 0x80_0000;
const POOL_SIZE: u64 = 2 << 20;
const QSIZE: u16 = 256;
/// Guest buffers outside the pool.
const HDR: u64 = 0x10_0000;
const STATUS: u64 = 0x11_0000;
const DATA: u64 = 0x20_0000;
/// The guest's secret, in RAM outside the pool.
const SECRET: u64 = 0x30_0000;
const SECRET_LEN: usize = 64;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        backend(&spec);
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        println!("backend_process_holds_only_the_pool: test");
        return;
    }
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter.is_some_and(|f| !"backend_process_holds_only_the_pool".contains(&f)) {
        return;
    }
    backend_process_holds_only_the_pool();
    println!("test backend_process_holds_only_the_pool ... ok");
}

// The backend process.

/// `pool_base,pool_size,desc,avail,used,qsize,image`.
fn backend(spec: &str) {
    let f: Vec<&str> = spec.splitn(7, ',').collect();
    assert_eq!(f.len(), 7, "backend spec {spec:?}");
    let num = |i: usize| -> u64 { f[i].parse().unwrap() };
    // SAFETY: the parent placed the pool memfd at POOL_FD before exec and nothing in
    // this process has taken that descriptor; map_pool_file checks its size.
    let pool = unsafe { File::from_raw_fd(POOL_FD) };
    let mem = map_pool_file(pool, Gpa(num(0)), num(1)).unwrap();
    let mut queue = Queue::new(num(5) as u16).unwrap();
    queue.set_size(num(5) as u16);
    let (d, a, u) = (num(2), num(3), num(4));
    queue.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
    queue.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
    queue.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
    queue.set_ready(true);
    let mut blk = access_platform_block(std::path::Path::new(f[6]));
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        match line.unwrap().as_str() {
            "kick" => {
                blk.process_queue(0, &mut queue, &mem).unwrap();
                writeln!(out, "served").unwrap();
                out.flush().unwrap();
            }
            _ => return,
        }
    }
}

// The guest and the checks.

struct Backend {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Backend {
    fn spawn(ram: &SplitRam, q: &SplitRing<GuestMemoryMmap<()>>, image: &str) -> Self {
        let l = q.layout();
        let spec = format!(
            "{POOL},{POOL_SIZE},{},{},{},{QSIZE},{image}",
            l.desc, l.avail, l.used
        );
        let pool_fd = ram.pool_file().as_raw_fd();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.env(CHILD_ENV, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: the hook runs in the forked child before exec and calls only
        // async-signal-safe functions (fcntl, dup2, close_range or close) on
        // integers; it allocates nothing and touches no lock.
        unsafe {
            cmd.pre_exec(move || {
                if pool_fd == POOL_FD {
                    // Already in place: only drop close-on-exec.
                    if libc::fcntl(POOL_FD, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(pool_fd, POOL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Everything above the pool's fd goes, close-on-exec or not (a
                // runner may leak inheritable descriptors, e.g. a jobserver pipe).
                let first = (POOL_FD + 1) as libc::c_uint;
                if libc::syscall(libc::SYS_close_range, first, libc::c_uint::MAX, 0) != 0 {
                    for fd in first as i32..4096 {
                        libc::close(fd);
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "ready\n", "the backend started");
        Self {
            child,
            stdin,
            stdout,
        }
    }

    fn kick(&mut self) {
        writeln!(self.stdin, "kick").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "served\n");
    }
}

impl Backend {
    /// Tells the backend to stop and checks that it exited cleanly.
    fn finish(mut self) {
        writeln!(self.stdin, "quit").unwrap();
        self.stdin.flush().unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "backend exited with {status}");
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        if std::thread::panicking() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// One request as virtio_blk makes it in pool mode ([`BlkRequest`]): header, data and
/// status bounced through the pool — except that `raw_data`, if given, puts that
/// guest-physical address in the data descriptor unbounced (a confused or hostile
/// guest). Returns the status byte the guest reads.
fn request(
    dma: &GuestDma<GuestMemoryMmap<()>>,
    q: &mut SplitRing<GuestMemoryMmap<()>>,
    be: &mut Backend,
    request_type: u32,
    sector: u64,
    data_len: usize,
    raw_data: Option<u64>,
) -> u8 {
    let at = BlkLayout {
        hdr: HDR,
        data: DATA,
        status: STATUS,
    };
    let r = BlkRequest::map(dma, at, request_type, sector, data_len, raw_data).unwrap();
    q.post(&r.descriptors());
    let used = q.used_idx();
    be.kick();
    assert_eq!(q.used_idx(), used.wrapping_add(1), "one chain used");
    r.complete(dma).unwrap()
}

fn backend_process_holds_only_the_pool() {
    let ram = SplitRam::new(RAM, Gpa(POOL), POOL_SIZE).unwrap();
    let mem = ram.memory().clone();
    let dma = GuestDma::with_own_pool(mem.clone(), Gpa(POOL), POOL_SIZE).unwrap();
    let ring = dma.alloc_coherent(8192).unwrap();
    let mut q = SplitRing::new(mem.clone(), RingLayout::packed(ring.0, QSIZE), QSIZE);
    // The guest's secret, made at run time so no binary or argument carries it.
    let secret = random_bytes::<SECRET_LEN>().unwrap();
    mem.write_slice(&secret, GuestAddress(SECRET)).unwrap();
    // And a marker in the pool, which the backend does hold.
    let marker = random_bytes::<SECRET_LEN>().unwrap();
    let marker_at = dma.alloc_coherent(SECRET_LEN).unwrap();
    mem.write_slice(&marker, GuestAddress(marker_at.0)).unwrap();

    let image = TempImage::new("bounce-proc", &vec![0u8; 1024 * 512]);
    let mut be = Backend::spawn(&ram, &q, image.path().to_str().unwrap());
    let pid = be.child.id().to_string();

    // What the child holds: fd 3 is the pool, nothing is the RAM memfd.
    let (ram_id, pool_id) = (
        file_id(ram.ram_file()).unwrap(),
        file_id(ram.pool_file()).unwrap(),
    );
    let fds = open_files(&pid).unwrap();
    assert!(fds.contains(&(POOL_FD, pool_id)), "pool at fd 3: {fds:?}");
    assert!(
        fds.iter().all(|&(_, f)| f != ram_id),
        "the backend has no descriptor of guest RAM: {fds:?}"
    );
    // Besides its stdio pipes and the pool it holds only the disk image it opened
    // itself.
    let image_id = {
        let m = std::fs::metadata(image.path()).unwrap();
        (m.dev(), m.ino())
    };
    assert!(
        fds.iter()
            .all(|&(fd, f)| fd <= 2 || f == pool_id || f == image_id),
        "stdio, the pool and the disk image only: {fds:?}"
    );
    // What the child maps: the pool memfd, and not the RAM memfd. The parent maps
    // both, so the check below is a real one.
    let mine = mapped_files("self").unwrap();
    assert!(mine
        .iter()
        .any(|(i, p)| *i == ram_id.1 && p.contains(RAM_MEMFD_NAME)));
    let theirs = mapped_files(&pid).unwrap();
    assert!(
        theirs
            .iter()
            .any(|(i, p)| *i == pool_id.1 && p.contains(POOL_MEMFD_NAME)),
        "the backend maps the pool: {theirs:?}"
    );
    assert!(
        theirs
            .iter()
            .all(|(i, p)| *i != ram_id.1 && !p.contains(RAM_MEMFD_NAME)),
        "the backend maps no guest RAM: {theirs:?}"
    );

    // The backend serves the guest through the pool: write 64 KiB, read it back.
    let len = 64 << 10;
    let data = pattern(len, 9);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    assert_eq!(
        request(&dma, &mut q, &mut be, VIRTIO_BLK_T_OUT, 8, len, None),
        OK
    );
    let disk = image.contents();
    assert!(disk[8 * 512..8 * 512 + len] == data[..], "on disk");
    mem.write_slice(&vec![0u8; len], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        request(&dma, &mut q, &mut be, VIRTIO_BLK_T_IN, 8, len, None),
        OK
    );
    let mut back = vec![0u8; len];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back == data, "read back through the pool");

    // Descriptors naming the secret: the backend cannot read it (to write it to
    // disk) nor overwrite it (by reading the disk into it).
    assert_eq!(
        request(
            &dma,
            &mut q,
            &mut be,
            VIRTIO_BLK_T_OUT,
            0,
            SECRET_LEN,
            Some(SECRET)
        ),
        IOERR
    );
    let disk = image.contents();
    assert!(
        !disk.windows(SECRET_LEN).any(|w| w == secret),
        "the secret never reached the disk"
    );
    assert_eq!(
        request(
            &dma,
            &mut q,
            &mut be,
            VIRTIO_BLK_T_IN,
            8,
            SECRET_LEN,
            Some(SECRET)
        ),
        IOERR
    );
    let mut now = [0u8; SECRET_LEN];
    mem.read_slice(&mut now, GuestAddress(SECRET)).unwrap();
    assert_eq!(now, secret, "the secret is untouched");
    // And it still serves the next good request.
    assert_eq!(
        request(&dma, &mut q, &mut be, VIRTIO_BLK_T_OUT, 16, 512, None),
        OK
    );

    // The secret is nowhere in the backend's memory; the pool marker is.
    match (
        occurrences_in_memory(&pid, &secret),
        occurrences_in_memory(&pid, &marker),
    ) {
        (Some(s), Some(m)) => {
            assert!(m >= 1, "the scan finds the pool marker");
            assert_eq!(s, 0, "the secret is not in the backend's memory");
        }
        _ => println!("note: /proc/{pid}/mem is not readable here; memory scan skipped"),
    }
    be.finish();
}
