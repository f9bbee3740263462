//! Pool mode across the process boundary (issue 7 scope 3; issue 6 "a backend provably
//! holds only the pool"): the real `aperture backend blk` runs as a child process, our
//! vhost-user front-end ([`VhostUserDevice`]) drives it, and in pool mode
//! ([`VhostUserDevice::share_only`]) hands it the restricted DMA pool's memory file and
//! nothing else of the guest.
//!
//! The guest is a fake pool-mode driver: its RAM is a [`SplitRam`] (64 MiB, the 4 MiB
//! pool in its own memfd), the virtqueue is a coherent allocation from the pool and
//! every header, data buffer and status byte is bounced through the pool with
//! [`GuestDma`], as Linux does for a device with a `restricted-dma-pool`.
//!
//! Checked from outside the back-end process, in `/proc/<pid>`: it maps the pool
//! memfd and not the RAM memfd, holds no descriptor of the RAM memfd, and the guest's
//! secret (random, made at run time, in RAM outside the pool) is nowhere in its memory.
//! Requests round-trip through the pool; a descriptor naming the secret fails with
//! `VIRTIO_BLK_S_IOERR` and the secret reaches neither the disk nor the back-end. The
//! same checks run without pool mode find guest RAM in the back-end and the secret on
//! the disk, so every one of them can fail. And pool mode refuses, before the back-end
//! is sent anything, guest RAM whose pool is not its own memory file and rings outside
//! the pool.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use bounce_pool::ram::{POOL_MEMFD_NAME, RAM_MEMFD_NAME};
use bounce_pool::{Gpa, GuestDma, SplitRam};
use device_host::vhost_user::{DeviceKind, VhostUserDevice, VhostUserError};
use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use test_kit::blk::{BlkLayout, BlkRequest};
use test_kit::proc::{
    self, file_id, mapped_files, maps_memfd, occurrences_in_memory, random_bytes,
};
use test_kit::ring::ready_queue;
use test_kit::{pattern, MemfdRam, RingLayout, SplitRing, TempDir};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_contract::{ActiveQueue, VirtioDevice, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_pci::InterruptSink;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
/// Guest RAM.
const RAM: u64 = 64 * MIB;
/// The restricted pool: 4 MiB at 32 MiB.
const POOL: u64 = 32 * MIB;
const POOL_SIZE: u64 = 4 * MIB;
/// The front-end's queue size (`device_host::vhost_user` offers 256).
const QSIZE: u16 = 256;
/// The split ring in one coherent pool allocation (virtio 1.2 §2.7): descriptor
/// table (16 bytes each), available ring (6 + 2·n bytes) and used ring (6 + 8·n
/// bytes), each on its own page ([`RingLayout::paged`]).
const RING_BYTES: usize = 0x3000;
/// The queue's MSI-X vector.
const VECTOR: u16 = 1;
/// The guest's own buffers, in RAM outside the pool: header, status byte, data.
const HDR: u64 = 0x10_0000;
const STATUS: u64 = 0x11_0000;
const DATA: u64 = 0x20_0000;
/// The guest's secret: random bytes at the start of a sector-sized buffer in RAM
/// outside the pool. Requests aimed at it cover the whole sector, so that nothing but
/// its address can make them fail.
const SECRET: u64 = 0x30_0000;
const SECRET_LEN: usize = 64;
/// The disk image: 1 MiB.
const DISK: usize = 1 << 20;
const SECTOR: usize = 512;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Deadline for anything the back-end process does.
const DEADLINE: Duration = Duration::from_secs(20);

/// `aperture backend blk --once` as a child process, with its socket, disk and stats.
struct Backend {
    child: Child,
    dir: TempDir,
}

impl Backend {
    fn spawn(tag: &str) -> Self {
        let dir = TempDir::new(&format!("aperture-pool-{tag}"));
        std::fs::write(dir.join("disk.img"), vec![0u8; DISK]).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_aperture"))
            .arg("backend")
            .arg("blk")
            .arg("--socket")
            .arg(dir.join("blk.sock"))
            .arg("--disk")
            .arg(dir.join("disk.img"))
            .arg("--stats")
            .arg(dir.join("stats.json"))
            .arg("--once")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the aperture binary was built by cargo for this test");
        Self { child, dir }
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.join("blk.sock")
    }

    /// What the disk image holds now.
    fn disk(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("disk.img")).unwrap()
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Connects the front-end once the back-end listens (a probe connection would
    /// count as its one front-end, so the real connection is retried instead).
    fn connect(&mut self, irq: Arc<dyn InterruptSink>) -> VhostUserDevice {
        let start = Instant::now();
        loop {
            match VhostUserDevice::connect(
                &self.socket(),
                DeviceKind::Block,
                Duration::from_secs(5),
                Arc::clone(&irq),
            ) {
                Ok(d) => return d,
                Err(VhostUserError::Connect { .. }) if start.elapsed() < DEADLINE => {
                    if let Some(status) = self.child.try_wait().unwrap() {
                        panic!("the back-end exited before listening: {status}");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot connect to the back-end: {e}"),
            }
        }
    }

    /// Waits for the back-end to exit after the front-end went away (`--once`) and
    /// returns the exposure figures it wrote.
    fn finish(mut self) -> serde_json::Value {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "the back-end did not exit after the front-end disconnected"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "the back-end exited with {status}");
        let text = std::fs::read_to_string(self.dir.join("stats.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends each signalled vector on a channel.
struct Calls(Mutex<Sender<u16>>);

impl InterruptSink for Calls {
    fn signal(&self, vector: u16) {
        let _ = self.0.lock().unwrap().send(vector);
    }
}

/// The fake pool-mode guest: split RAM, its DMA API over the pool, the ring in a
/// coherent pool allocation.
struct Guest {
    ram: SplitRam,
    dma: GuestDma<GuestMemoryMmap>,
    ring: SplitRing<GuestMemoryMmap>,
}

impl Guest {
    fn new() -> Self {
        let ram = SplitRam::new(RAM, Gpa(POOL), POOL_SIZE).unwrap();
        let mem = ram.memory().clone();
        let dma = GuestDma::with_own_pool(mem.clone(), Gpa(POOL), POOL_SIZE).unwrap();
        // vring_alloc_queue(): dma_alloc_coherent, which a restricted pool serves.
        let at = dma.alloc_coherent(RING_BYTES).unwrap().0;
        let ring = SplitRing::new(mem, RingLayout::paged(at), QSIZE);
        Self { ram, dma, ring }
    }

    fn mem(&self) -> &GuestMemoryMmap {
        self.dma.memory()
    }

    /// The queue as the driver configures it in the transport.
    fn queue(&self) -> Queue {
        self.ring.queue()
    }
}

/// A guest, the back-end process and the front-end device between them, started.
struct Session {
    guest: Guest,
    dev: VhostUserDevice,
    vq: Queue,
    calls: Receiver<u16>,
    backend: Backend,
    /// Interrupts seen so far.
    interrupts: usize,
}

impl Session {
    /// Starts the back-end and activates the device; in pool mode it shares only the
    /// pool.
    fn start(tag: &str, pool_mode: bool) -> Self {
        let guest = Guest::new();
        let mut backend = Backend::spawn(tag);
        let (tx, calls) = mpsc::channel();
        let mut dev = backend.connect(Arc::new(Calls(Mutex::new(tx))));
        let mut acked = 1 << VIRTIO_F_VERSION_1;
        if pool_mode {
            dev.share_only(GuestAddress(POOL), POOL_SIZE).unwrap();
            // A transport would offer ACCESS_PLATFORM so that the guest uses its DMA
            // API (and so the pool); the back-end must still get guest-physical
            // addresses and no IOTLB (it would refuse every access otherwise).
            acked |= 1 << VIRTIO_F_ACCESS_PLATFORM;
        }
        let vq = guest.queue();
        let d: &mut dyn VirtioDevice<GuestMemoryMmap> = &mut dev;
        d.set_acked_features(acked);
        d.activate(
            &[ActiveQueue {
                index: 0,
                queue: &vq,
                vector: VECTOR,
            }],
            guest.mem(),
        )
        .unwrap();
        Self {
            guest,
            dev,
            vq,
            calls,
            backend,
            interrupts: 0,
        }
    }

    /// One request as virtio_blk makes it in pool mode: header, data and status
    /// bounced through the pool — except that `raw_data`, if given, puts that
    /// guest-physical address in the data descriptor unbounced (a confused or hostile
    /// guest). Notifies the device, waits for the used element and returns the status
    /// byte the guest reads.
    fn request(&mut self, request_type: u32, sector: u64, len: usize, raw_data: Option<u64>) -> u8 {
        let at = BlkLayout {
            hdr: HDR,
            data: DATA,
            status: STATUS,
        };
        let r = BlkRequest::map(&self.guest.dma, at, request_type, sector, len, raw_data).unwrap();
        let want = self.guest.ring.used_idx().wrapping_add(1);
        self.guest.ring.post(&r.descriptors());
        let d: &mut dyn VirtioDevice<GuestMemoryMmap> = &mut self.dev;
        d.process_queue(0, &mut self.vq, self.guest.mem()).unwrap();
        let start = Instant::now();
        while self.guest.ring.used_idx() != want {
            assert!(start.elapsed() < DEADLINE, "the back-end completed nothing");
            if let Ok(v) = self.calls.recv_timeout(Duration::from_millis(20)) {
                assert_eq!(v, VECTOR, "the queue's vector");
                self.interrupts += 1;
            }
        }
        r.complete(&self.guest.dma).unwrap()
    }

    /// Ends the session (the front-end disconnects) and returns the back-end's
    /// exposure figures.
    fn finish(self) -> serde_json::Value {
        let Self { dev, backend, .. } = self;
        drop(dev);
        backend.finish()
    }
}

fn maps_memfd_of(maps: &[(u64, String)], file: &File, name: &str) -> bool {
    maps_memfd(maps, file, name).unwrap()
}

/// (device, inode) of every open descriptor of `pid`.
fn open_files(pid: &str) -> Vec<(u64, u64)> {
    proc::open_files(pid)
        .unwrap()
        .into_iter()
        .map(|(_, f)| f)
        .collect()
}

/// (device, inode) of a file.
fn id(f: &File) -> (u64, u64) {
    file_id(f).unwrap()
}

/// Writes 64 KiB at sector 8 and reads it back into zeroed guest memory; checks the
/// image and guest RAM.
fn write_then_read_back(s: &mut Session) {
    let len = 64 << 10;
    let data = pattern(len, 9);
    let mem = s.guest.mem().clone();
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    assert_eq!(s.request(VIRTIO_BLK_T_OUT, 8, len, None), OK, "write");
    let on_disk = s.backend.disk();
    assert!(
        on_disk[8 * SECTOR..8 * SECTOR + len] == data[..],
        "the write is on the image"
    );
    mem.write_slice(&vec![0u8; len], GuestAddress(DATA))
        .unwrap();
    assert_eq!(s.request(VIRTIO_BLK_T_IN, 8, len, None), OK, "read");
    let mut back = vec![0u8; len];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back == data, "the read is in guest RAM");
}

#[test]
fn pool_mode_backend_process_holds_only_the_pool_memfd_and_serves_blk_through_it() {
    let mut s = Session::start("only", true);
    let pid = s.backend.pid();
    let mem = s.guest.mem().clone();
    // The guest's secret, made at run time so no binary or argument carries it; and a
    // marker in the pool, which the back-end does hold.
    let secret = random_bytes::<SECRET_LEN>().unwrap();
    mem.write_slice(&secret, GuestAddress(SECRET)).unwrap();
    let marker = random_bytes::<SECRET_LEN>().unwrap();
    let marker_at = s.guest.dma.alloc_coherent(SECRET_LEN).unwrap();
    mem.write_slice(&marker, GuestAddress(marker_at.0)).unwrap();

    // What the back-end maps: the pool memfd, not the RAM memfd. This process maps
    // both, so the same check finds guest RAM where it is.
    let (ram_file, pool_file) = (s.guest.ram.ram_file(), s.guest.ram.pool_file());
    let mine = mapped_files("self").unwrap();
    assert!(maps_memfd_of(&mine, ram_file, RAM_MEMFD_NAME), "{mine:?}");
    let theirs = mapped_files(&pid).unwrap();
    assert!(
        maps_memfd_of(&theirs, pool_file, POOL_MEMFD_NAME),
        "the back-end maps the pool: {theirs:?}"
    );
    assert!(
        theirs
            .iter()
            .all(|(i, p)| *i != id(ram_file).1 && !p.contains(RAM_MEMFD_NAME)),
        "the back-end maps no guest RAM outside the pool: {theirs:?}"
    );
    // What it holds: the pool's descriptor, none of the RAM memfd.
    let fds = open_files(&pid);
    assert!(
        fds.contains(&id(pool_file)),
        "pool descriptor held: {fds:?}"
    );
    assert!(
        !fds.contains(&id(ram_file)),
        "no descriptor of guest RAM: {fds:?}"
    );

    // It serves the guest through the pool.
    write_then_read_back(&mut s);

    // Descriptors naming the secret: it cannot read it (to write it to disk) nor
    // overwrite it (by reading the disk into it); each request fails alone.
    assert_eq!(
        s.request(VIRTIO_BLK_T_OUT, 0, SECTOR, Some(SECRET)),
        IOERR,
        "a write from RAM outside the pool"
    );
    assert!(
        !s.backend.disk().windows(SECRET_LEN).any(|w| w == secret),
        "the secret never reached the image"
    );
    assert_eq!(
        s.request(VIRTIO_BLK_T_IN, 8, SECTOR, Some(SECRET)),
        IOERR,
        "a read into RAM outside the pool"
    );
    let mut now = [0u8; SECRET_LEN];
    mem.read_slice(&mut now, GuestAddress(SECRET)).unwrap();
    assert_eq!(now, secret, "the secret is untouched");
    assert_eq!(
        s.request(VIRTIO_BLK_T_OUT, 16, SECTOR, None),
        OK,
        "the next good request is served"
    );
    assert!(s.interrupts > 0, "completions were signalled");

    // The secret is nowhere in the back-end's memory; the pool marker is.
    match (
        occurrences_in_memory(&pid, &secret),
        occurrences_in_memory(&pid, &marker),
    ) {
        (Some(secret_hits), Some(marker_hits)) => {
            assert!(marker_hits >= 1, "the scan finds the pool marker");
            assert_eq!(secret_hits, 0, "the secret is not in the back-end's memory");
        }
        _ => eprintln!("note: /proc/{pid}/mem is not readable here; memory scan skipped"),
    }

    // Its own account: plain guest-physical mode over a memory table of the pool.
    let stats = s.finish();
    assert_eq!(stats["mode"], "plain", "{stats}");
    assert_eq!(stats["guest_ram_bytes"], POOL_SIZE, "{stats}");
    assert_eq!(stats["peak_mapped_bytes"], POOL_SIZE, "{stats}");
    assert_eq!(stats["requests"]["ok"], 3, "{stats}");
    assert_eq!(stats["requests"]["ioerr"], 2, "{stats}");
}

#[test]
fn without_pool_mode_the_same_checks_find_guest_ram_and_the_secret_in_the_backend() {
    // The control: every check above, on a front-end that shares all guest RAM as
    // vhost-user does by default, finds what pool mode keeps out.
    let mut s = Session::start("all", false);
    let pid = s.backend.pid();
    let mem = s.guest.mem().clone();
    let secret = random_bytes::<SECRET_LEN>().unwrap();
    mem.write_slice(&secret, GuestAddress(SECRET)).unwrap();
    let ram_file = s.guest.ram.ram_file();
    assert!(maps_memfd_of(
        &mapped_files(&pid).unwrap(),
        ram_file,
        RAM_MEMFD_NAME
    ));
    assert!(open_files(&pid).contains(&id(ram_file)));
    write_then_read_back(&mut s);
    assert_eq!(
        s.request(VIRTIO_BLK_T_OUT, 0, SECTOR, Some(SECRET)),
        OK,
        "the back-end reads any guest RAM"
    );
    assert!(
        s.backend.disk().windows(SECRET_LEN).any(|w| w == secret),
        "the secret is on the image"
    );
    if let Some(hits) = occurrences_in_memory(&pid, &secret) {
        assert!(hits >= 1, "the scan finds the secret in the back-end");
    }
    let stats = s.finish();
    assert_eq!(stats["guest_ram_bytes"], RAM, "{stats}");
}

#[test]
fn pool_mode_refuses_a_memory_file_holding_more_than_the_pool_and_rings_outside_it() {
    let guest = Guest::new();
    let mut backend = Backend::spawn("refuse");
    let (tx, _calls) = mpsc::channel();
    let mut dev = backend.connect(Arc::new(Calls(Mutex::new(tx))));
    for (start, size) in [
        (POOL + 1, POOL_SIZE),
        (POOL, 0),
        (POOL, 100),
        (u64::MAX - 4095, 8192),
    ] {
        let e = dev.share_only(GuestAddress(start), size).unwrap_err();
        assert!(
            matches!(e, VhostUserError::PoolMode(_))
                && e.to_string().contains(&format!("{start:#x}")),
            "{e}"
        );
    }
    dev.share_only(GuestAddress(POOL), POOL_SIZE).unwrap();
    let d: &mut dyn VirtioDevice<GuestMemoryMmap> = &mut dev;
    d.set_acked_features(1 << VIRTIO_F_VERSION_1);

    // Guest RAM as one file with the pool inside it: the pool's descriptor would be
    // all of RAM's, so pool mode refuses it.
    let one_file = MemfdRam::new("aperture-pool-one", &[(GuestAddress(0), RAM as usize)]);
    let whole = one_file.memory();
    let vq = guest.queue();
    let active = [ActiveQueue {
        index: 0,
        queue: &vq,
        vector: VECTOR,
    }];
    let e = d.activate(&active, whole).unwrap_err().to_string();
    assert!(
        e.contains("needs its own memory file") && e.contains(&format!("{POOL:#x}")),
        "{e}"
    );

    // Rings outside the pool: the back-end could never reach them.
    let outside = ready_queue(RingLayout::paged(0x40_0000), QSIZE);
    let e = d
        .activate(
            &[ActiveQueue {
                index: 0,
                queue: &outside,
                vector: VECTOR,
            }],
            guest.mem(),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("descriptor table at 0x400000") && e.contains("lies outside"),
        "{e}"
    );

    // Nothing reached the back-end: it never got a memory table.
    drop(dev);
    let stats = backend.finish();
    assert_eq!(stats["guest_ram_bytes"], 0, "{stats}");
}
