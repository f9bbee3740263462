//! A guest-side driver model for tests, benchmarks and the demo (feature
//! `fake-driver`): guest RAM in a `GuestMemoryMmap`, a requestq and an eventq laid out
//! as split rings the way a virtio driver lays them out, and requests built with the
//! exact buffer sizes Linux's driver uses (`drivers/iommu/virtio-iommu.c`,
//! `viommu_get_write_desc_offset()`: readable part, then a writable part of 4 or
//! `probe_size + 4` bytes).
//!
//! It drives a [`VirtioIommu`] through its real queue path, so what it observes (used
//! lengths, tails, PROBE bytes, fault events) is what a guest would.

use crate::request::{encode, Request};
use crate::wire::{FaultEvent, Status, TAIL_SIZE};
use crate::VirtioIommu;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::FromBytes;

/// Queue size of both queues.
pub const QUEUE_SIZE: u16 = 256;
/// Guest RAM size.
pub const RAM_SIZE: usize = 16 << 20;
/// Chains that can be in flight at once through [`FakeGuest::prepare`] (two
/// descriptors each; the upper half of the table is for [`FakeGuest::submit_raw`]).
pub const MAX_BATCH: usize = 64;

/// Split-ring layout of one queue: descriptor table, avail ring, used ring.
const REQUESTQ_BASE: u64 = 0x1_0000;
const EVENTQ_BASE: u64 = 0x2_0000;
const AVAIL_OFF: u64 = 0x1000;
const USED_OFF: u64 = 0x2000;
/// Readable request buffers, one per slot (72 bytes used at most).
const READ_BUFS: u64 = 0x10_0000;
const READ_STRIDE: u64 = 0x100;
/// Writable response buffers, one per slot.
const WRITE_BUFS: u64 = 0x20_0000;
/// Event buffers, one per eventq descriptor.
const EVENT_BUFS: u64 = 0x3_0000;
const EVENT_STRIDE: u64 = 0x40;
/// First guest address tests may use freely as "DMA" memory.
pub const FREE_RAM: u64 = 0x80_0000;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// A descriptor exactly as the driver writes it (for hostile-chain tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    /// Buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `VRING_DESC_F_*`.
    pub flags: u16,
    /// Next descriptor index.
    pub next: u16,
}

/// What the device returned for one chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Used length the device reported.
    pub used_len: u32,
    /// The whole writable part as it reads after completion.
    pub written: Vec<u8>,
}

impl Completion {
    /// Status in the tail at the end of `expected_len` written bytes, if the device
    /// reported exactly that used length.
    pub fn status(&self, expected_len: u32) -> Option<Status> {
        if self.used_len != expected_len || expected_len < TAIL_SIZE as u32 {
            return None;
        }
        let s = self.written[expected_len as usize - TAIL_SIZE];
        Status::ALL.get(usize::from(s)).copied()
    }
}

/// A prepared batch of requests, re-postable without rewriting its buffers.
#[derive(Clone, Debug)]
pub struct Batch {
    heads: Vec<u16>,
}

impl Batch {
    /// Requests in the batch.
    pub fn len(&self) -> usize {
        self.heads.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }
}

/// The fake guest: its RAM and the device-side view of its two queues.
pub struct FakeGuest {
    /// Guest RAM.
    pub mem: GuestMemoryMmap<()>,
    /// Queue 0, as the device sees it.
    pub requestq: Queue,
    /// Queue 1, as the device sees it.
    pub eventq: Queue,
    probe_size: u32,
    write_stride: u64,
    req_avail: u16,
    req_used: u16,
    evt_avail: u16,
    evt_used: u16,
    evt_next_desc: u16,
}

fn device_queue(base: u64) -> Queue {
    // QUEUE_SIZE is a power of two ≤ 32768, which `Queue::new` accepts.
    let mut q = Queue::new(QUEUE_SIZE).expect("QUEUE_SIZE is a valid queue size");
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(base as u32), Some((base >> 32) as u32));
    let avail = base + AVAIL_OFF;
    q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    let used = base + USED_OFF;
    q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    q.set_ready(true);
    q
}

impl FakeGuest {
    /// A guest with [`RAM_SIZE`] bytes of RAM and both queues set up, for a device whose
    /// `probe_size` is `probe_size`.
    pub fn new(probe_size: u32) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE)])
            .expect("anonymous mapping of RAM_SIZE bytes");
        let write_stride = (u64::from(probe_size) + TAIL_SIZE as u64).next_multiple_of(0x1000);
        assert!(
            WRITE_BUFS + write_stride * MAX_BATCH as u64 <= FREE_RAM,
            "probe_size {probe_size} too large for the fake guest's layout"
        );
        Self {
            mem,
            requestq: device_queue(REQUESTQ_BASE),
            eventq: device_queue(EVENTQ_BASE),
            probe_size,
            write_stride,
            req_avail: 0,
            req_used: 0,
            evt_avail: 0,
            evt_used: 0,
            evt_next_desc: 0,
        }
    }

    /// Accepts every feature the device offers, as Linux does for the ones it knows.
    pub fn negotiate(&mut self, dev: &mut VirtioIommu) {
        dev.set_acked_features(dev.device_features());
    }

    fn write_desc(&self, queue_base: u64, index: u16, d: RawDesc) {
        let a = GuestAddress(queue_base + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&d.next.to_le_bytes());
        self.mem
            .write_slice(&raw, a)
            .expect("descriptor table lies in RAM");
    }

    fn publish(&mut self, queue_base: u64, head: u16, event: bool) {
        let idx = if event {
            &mut self.evt_avail
        } else {
            &mut self.req_avail
        };
        let slot = u64::from(*idx % QUEUE_SIZE);
        let avail = queue_base + AVAIL_OFF;
        self.mem
            .write_obj(head.to_le(), GuestAddress(avail + 4 + 2 * slot))
            .expect("avail ring lies in RAM");
        *idx = idx.wrapping_add(1);
        self.mem
            .write_obj(idx.to_le(), GuestAddress(avail + 2))
            .expect("avail ring lies in RAM");
    }

    fn used_elem(&self, queue_base: u64, pos: u16) -> (u32, u32) {
        let base = queue_base + USED_OFF + 4 + 8 * u64::from(pos % QUEUE_SIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(base)).expect("used ring");
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(base + 4))
            .expect("used ring");
        (u32::from_le(id), u32::from_le(len))
    }

    fn used_idx(&self, queue_base: u64) -> u16 {
        u16::from_le(
            self.mem
                .read_obj(GuestAddress(queue_base + USED_OFF + 2))
                .expect("used ring"),
        )
    }

    /// Writes `readable` and a zeroed writable buffer of `writable_len` bytes into slot
    /// `slot`, and its two descriptors; returns the head index.
    fn fill_slot(&self, slot: usize, readable: &[u8], writable_len: u32) -> u16 {
        assert!(slot < MAX_BATCH && readable.len() <= READ_STRIDE as usize);
        assert!(u64::from(writable_len) <= self.write_stride);
        let r = READ_BUFS + READ_STRIDE * slot as u64;
        let w = WRITE_BUFS + self.write_stride * slot as u64;
        self.mem
            .write_slice(readable, GuestAddress(r))
            .expect("request buffers lie in RAM");
        self.mem
            .write_slice(&vec![0u8; writable_len as usize], GuestAddress(w))
            .expect("response buffers lie in RAM");
        let head = (2 * slot) as u16;
        self.write_desc(
            REQUESTQ_BASE,
            head,
            RawDesc {
                addr: r,
                len: readable.len() as u32,
                flags: F_NEXT,
                next: head + 1,
            },
        );
        self.write_desc(
            REQUESTQ_BASE,
            head + 1,
            RawDesc {
                addr: w,
                len: writable_len,
                flags: F_WRITE,
                next: 0,
            },
        );
        head
    }

    /// Submits one request with the given readable bytes and writable length, runs the
    /// device, and returns what came back.
    pub fn submit(
        &mut self,
        dev: &mut VirtioIommu,
        readable: &[u8],
        writable_len: u32,
    ) -> Completion {
        let head = self.fill_slot(0, readable, writable_len);
        self.publish(REQUESTQ_BASE, head, false);
        self.run(dev, head, WRITE_BUFS, writable_len)
    }

    fn run(&mut self, dev: &mut VirtioIommu, head: u16, wbuf: u64, wlen: u32) -> Completion {
        self.run_until(dev, 1)
            .expect("the fake guest's used ring is valid");
        assert_eq!(
            self.used_idx(REQUESTQ_BASE),
            self.req_used.wrapping_add(1),
            "device completed exactly one chain"
        );
        let (id, used_len) = self.used_elem(REQUESTQ_BASE, self.req_used);
        self.req_used = self.req_used.wrapping_add(1);
        assert_eq!(
            id,
            u32::from(head),
            "device completed the chain it was given"
        );
        let mut written = vec![0u8; wlen as usize];
        self.mem
            .read_slice(&mut written, GuestAddress(wbuf))
            .expect("response buffers lie in RAM");
        Completion { used_len, written }
    }

    /// Sends one request with Linux's buffer sizes and returns its status.
    ///
    /// # Panics
    /// If the device does not report exactly the writable size as used length: that
    /// would break Linux (`__viommu_sync_req()` in `drivers/iommu/virtio-iommu.c` takes
    /// the status only at exactly that length), so tests must see it fail loudly.
    pub fn send(&mut self, dev: &mut VirtioIommu, req: &Request) -> Status {
        let wlen = self.writable_len(req);
        let c = self.submit(dev, &encode(req), wlen);
        c.status(wlen).unwrap_or_else(|| {
            panic!(
                "{req:?}: used length {} instead of {wlen}, tail {:?}",
                c.used_len,
                &c.written[c.written.len().saturating_sub(4)..]
            )
        })
    }

    /// PROBEs an endpoint; returns the status and the `probe_size` property bytes.
    pub fn probe(&mut self, dev: &mut VirtioIommu, endpoint: u32) -> (Status, Vec<u8>) {
        let req = Request::Probe {
            endpoint: crate::EndpointId(endpoint),
        };
        let wlen = self.writable_len(&req);
        let c = self.submit(dev, &encode(&req), wlen);
        let status = c
            .status(wlen)
            .unwrap_or_else(|| panic!("PROBE: used length {} instead of {wlen}", c.used_len));
        let mut props = c.written;
        props.truncate(self.probe_size as usize);
        (status, props)
    }

    /// The writable size Linux gives a request: 4, or `probe_size + 4` for PROBE.
    pub fn writable_len(&self, req: &Request) -> u32 {
        match req {
            Request::Probe { .. } => self.probe_size + TAIL_SIZE as u32,
            _ => TAIL_SIZE as u32,
        }
    }

    /// Writes up to [`MAX_BATCH`] requests into their slots once; [`FakeGuest::post`]
    /// can then make them available again and again without rewriting buffers, as a
    /// benchmark of the device (not of the driver) wants.
    pub fn prepare(&mut self, reqs: &[Request]) -> Batch {
        assert!(
            reqs.len() <= MAX_BATCH,
            "at most {MAX_BATCH} requests per batch"
        );
        let heads = reqs
            .iter()
            .enumerate()
            .map(|(slot, r)| self.fill_slot(slot, &encode(r), self.writable_len(r)))
            .collect();
        Batch { heads }
    }

    /// Makes a prepared batch available to the device (one avail-ring update per
    /// request, one index update).
    pub fn post(&mut self, batch: &Batch) {
        let avail = REQUESTQ_BASE + AVAIL_OFF;
        for &h in &batch.heads {
            let slot = u64::from(self.req_avail % QUEUE_SIZE);
            self.mem
                .write_obj(h.to_le(), GuestAddress(avail + 4 + 2 * slot))
                .expect("avail ring lies in RAM");
            self.req_avail = self.req_avail.wrapping_add(1);
        }
        self.mem
            .write_obj(self.req_avail.to_le(), GuestAddress(avail + 2))
            .expect("avail ring lies in RAM");
    }

    /// Runs the device until `n` chains completed since the last reap, or 10 s passed,
    /// as Linux's driver spins on the used ring: a request a subscriber holds (an
    /// out-of-process back-end's ack) completes on a later pass. Consumes nothing.
    ///
    /// # Errors
    /// The device's, if it cannot write the used ring.
    pub fn run_until(&mut self, dev: &mut VirtioIommu, n: usize) -> Result<(), crate::DeviceError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            dev.process_requestq(&mut self.requestq, &self.mem)?;
            let done = self.used_idx(REQUESTQ_BASE).wrapping_sub(self.req_used);
            if usize::from(done) >= n || std::time::Instant::now() > deadline {
                return Ok(());
            }
            // Linux spins here (`__viommu_sync_req`); yielding keeps an ack that comes
            // within microseconds from costing a scheduler tick.
            std::thread::yield_now();
        }
    }

    /// Consumes completions; returns how many chains the device completed since the
    /// last call.
    pub fn reap(&mut self) -> usize {
        let used = self.used_idx(REQUESTQ_BASE);
        let n = used.wrapping_sub(self.req_used);
        self.req_used = used;
        usize::from(n)
    }

    /// Statuses of a batch's requests after it completed (reads each slot's tail).
    pub fn batch_statuses(&self, batch: &Batch, reqs: &[Request]) -> Vec<Option<Status>> {
        batch
            .heads
            .iter()
            .zip(reqs)
            .enumerate()
            .map(|(slot, (_, r))| {
                let wlen = u64::from(self.writable_len(r));
                let tail = WRITE_BUFS + self.write_stride * slot as u64 + wlen - TAIL_SIZE as u64;
                let s: u8 = self.mem.read_obj(GuestAddress(tail)).ok()?;
                Status::ALL.get(usize::from(s)).copied()
            })
            .collect()
    }

    /// Submits a chain of arbitrary descriptors (they go to descriptor indices
    /// 128..=255; `next` fields are written as given), runs the device, and returns the
    /// used length of every chain it completed.
    pub fn submit_raw(
        &mut self,
        dev: &mut VirtioIommu,
        descs: &[RawDesc],
        head: u16,
    ) -> Result<Vec<u32>, crate::DeviceError> {
        let base = QUEUE_SIZE / 2;
        for (i, d) in descs.iter().take(usize::from(base)).enumerate() {
            self.write_desc(REQUESTQ_BASE, base + i as u16, *d);
        }
        self.publish(REQUESTQ_BASE, head, false);
        dev.process_requestq(&mut self.requestq, &self.mem)?;
        let used = self.used_idx(REQUESTQ_BASE);
        let mut lens = Vec::new();
        while self.req_used != used {
            lens.push(self.used_elem(REQUESTQ_BASE, self.req_used).1);
            self.req_used = self.req_used.wrapping_add(1);
        }
        Ok(lens)
    }

    /// Posts `n` eventq buffers of `len` bytes each, as Linux does at probe time (24).
    pub fn post_event_buffers(&mut self, n: u16, len: u32) {
        for _ in 0..n {
            let i = self.evt_next_desc % QUEUE_SIZE;
            self.evt_next_desc = self.evt_next_desc.wrapping_add(1);
            self.write_desc(
                EVENTQ_BASE,
                i,
                RawDesc {
                    addr: EVENT_BUFS + EVENT_STRIDE * u64::from(i),
                    len,
                    flags: F_WRITE,
                    next: 0,
                },
            );
            self.publish(EVENTQ_BASE, i, true);
        }
    }

    /// Lets the device deliver pending faults, then returns the events the guest
    /// received since the last call, with their used lengths.
    pub fn take_events(&mut self, dev: &mut VirtioIommu) -> Vec<(u32, FaultEvent)> {
        dev.process_eventq(&mut self.eventq, &self.mem)
            .expect("the fake guest's used ring is valid");
        let used = self.used_idx(EVENTQ_BASE);
        let mut out = Vec::new();
        while self.evt_used != used {
            let (id, len) = self.used_elem(EVENTQ_BASE, self.evt_used);
            self.evt_used = self.evt_used.wrapping_add(1);
            let mut raw = [0u8; 24];
            self.mem
                .read_slice(
                    &mut raw,
                    GuestAddress(EVENT_BUFS + EVENT_STRIDE * u64::from(id)),
                )
                .expect("event buffers lie in RAM");
            let ev = FaultEvent::read_from_bytes(&raw).expect("24 bytes");
            out.push((len, ev));
        }
        out
    }
}
