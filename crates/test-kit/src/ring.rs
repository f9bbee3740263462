//! The driver side of one split virtqueue (virtio 1.2 §2.7) over guest memory.
//!
//! [`SplitRing`] lays the descriptor table, available ring and used ring out at chosen
//! guest-physical addresses ([`RingLayout`]), puts chains of readable and writable
//! buffers (and indirect tables) in the table, offers and publishes them with the
//! barriers Linux's `virtqueue_add_split` / `virtqueue_kick_prepare_split` use, and
//! answers whether the device wants a notification (`VRING_USED_F_NO_NOTIFY`, or with
//! EVENT_IDX `vring_need_event` on `avail_event`). It reads the used ring back (and with
//! EVENT_IDX writes `used_event` as it goes), and produces the `virtio_queue::Queue` a
//! device side needs, at the driver's addresses or at the ones the device sees (IOVAs,
//! grant or bounce addresses).
//!
//! Descriptors are handed out round-robin: a test keeps fewer than `size` descriptors
//! outstanding. For rings a test corrupts on purpose, the raw writers
//! ([`SplitRing::write_desc`], [`SplitRing::add_raw`], [`SplitRing::set_avail_entry`],
//! [`SplitRing::set_avail_idx`], [`SplitRing::set_used_idx`]) write exactly what they
//! are given.

use crate::mem::DriverMemory;
use std::sync::atomic::{fence, Ordering};
use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};

/// `VRING_DESC_F_NEXT`.
pub const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// `VRING_DESC_F_WRITE`: the device writes the buffer.
pub const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// `VRING_DESC_F_INDIRECT`: the buffer is a table of descriptors.
pub const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
/// `VRING_USED_F_NO_NOTIFY`: the device asks not to be notified.
pub const NO_NOTIFY: u16 = VRING_USED_F_NO_NOTIFY as u16;
/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver asks for no interrupts.
pub const NO_INTERRUPT: u16 = VRING_AVAIL_F_NO_INTERRUPT as u16;

/// A descriptor as given (flags and next kept).
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// A device-readable buffer.
pub fn r(addr: u64, len: u32) -> RawDescriptor {
    desc(addr, len, 0, 0)
}

/// A device-writable buffer.
pub fn w(addr: u64, len: u32) -> RawDescriptor {
    desc(addr, len, F_WRITE, 0)
}

/// A buffer the device writes when `device_writes`, reads otherwise.
pub fn buf(addr: u64, len: u32, device_writes: bool) -> RawDescriptor {
    if device_writes {
        w(addr, len)
    } else {
        r(addr, len)
    }
}

/// An indirect descriptor (§2.7.5.3): the chain is the table at `table`, `len` bytes.
pub fn indirect(table: u64, len: u32) -> RawDescriptor {
    desc(table, len, F_INDIRECT, 0)
}

/// The device side of a queue of `size` entries at `layout` (the addresses the device
/// sees), ready, EVENT_IDX off: what a transport hands the device once the driver set
/// the queue up.
pub fn ready_queue(layout: RingLayout, size: u16) -> Queue {
    let mut q = Queue::new(size).expect("a valid queue size");
    q.set_size(size);
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(layout.desc);
    q.set_desc_table_address(lo, hi);
    let (lo, hi) = split(layout.avail);
    q.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(layout.used);
    q.set_used_ring_address(lo, hi);
    q.set_ready(true);
    q
}

/// Where the three parts of a split ring lie (driver-side addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// The descriptor table (16 bytes per entry).
    pub desc: u64,
    /// The available ring: flags, idx, `size` entries, `used_event`.
    pub avail: u64,
    /// The used ring: flags, idx, `size` elements, `avail_event`.
    pub used: u64,
}

impl RingLayout {
    /// The three parts packed from `base` as virtio-queue's mock driver lays them out:
    /// the available ring right after the table, the used ring after it, 4-byte
    /// aligned. [`Self::bytes`] says how far it reaches.
    pub fn packed(base: u64, size: u16) -> Self {
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Self {
            desc: base,
            avail,
            used,
        }
    }

    /// Each part on its own 4 KiB page from `base`: table, available ring, used ring
    /// (for queues of up to 256 entries).
    pub fn paged(base: u64) -> Self {
        Self {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
        }
    }

    /// The same ring at the addresses `to_device` gives (what the device sees).
    pub fn map(self, to_device: impl Fn(u64) -> u64) -> Self {
        Self {
            desc: to_device(self.desc),
            avail: to_device(self.avail),
            used: to_device(self.used),
        }
    }

    /// Bytes from the table's start to the end of the used ring of `size` entries.
    pub fn bytes(&self, size: u16) -> u64 {
        self.used + 6 + 8 * u64::from(size) - self.desc
    }
}

/// The driver side of one split virtqueue in memory `M`.
#[derive(Debug)]
pub struct SplitRing<M> {
    mem: M,
    layout: RingLayout,
    size: u16,
    event_idx: bool,
    /// The driver's available index: chains offered so far, published or not.
    avail_idx: u16,
    /// The available index last published.
    published: u16,
    /// The next free descriptor (round-robin).
    next_desc: u16,
    /// Used elements taken so far.
    last_used: u16,
}

impl<M: DriverMemory> SplitRing<M> {
    /// A ring of `size` entries (a power of two) at `layout` in `mem`, zeroed as the
    /// driver does before it hands the addresses to the device. EVENT_IDX is off.
    pub fn new(mem: M, layout: RingLayout, size: u16) -> Self {
        assert!(size.is_power_of_two(), "queue size {size}");
        let n = u64::from(size);
        mem.write_at(layout.desc, &vec![0u8; 16 * size as usize]);
        mem.write_at(layout.avail, &vec![0u8; (6 + 2 * n) as usize]);
        mem.write_at(layout.used, &vec![0u8; (6 + 8 * n) as usize]);
        Self {
            mem,
            layout,
            size,
            event_idx: false,
            avail_idx: 0,
            published: 0,
            next_desc: 0,
            last_used: 0,
        }
    }

    /// The same ring with VIRTIO_RING_F_EVENT_IDX negotiated (or not).
    pub fn with_event_idx(mut self, on: bool) -> Self {
        self.event_idx = on;
        self
    }

    /// The memory the driver writes.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Where the ring lies.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// The number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The device side of the queue at the driver's addresses: size, addresses,
    /// EVENT_IDX and ready set.
    pub fn queue(&self) -> Queue {
        self.device_queue(|a| a)
    }

    /// The device side of the queue at the addresses the device sees (`to_device` of
    /// each driver-side address: an IOVA, a grant or bounce address).
    pub fn device_queue(&self, to_device: impl Fn(u64) -> u64) -> Queue {
        let mut q = ready_queue(self.layout.map(to_device), self.size);
        q.set_event_idx(self.event_idx);
        q
    }

    // Building chains.

    /// Writes descriptor `index` of the table as given.
    pub fn write_desc(&self, index: u16, d: RawDescriptor) {
        let d = SplitDescriptor::from(d);
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&d.addr().0.to_le_bytes());
        b[8..12].copy_from_slice(&d.len().to_le_bytes());
        b[12..14].copy_from_slice(&d.flags().to_le_bytes());
        b[14..].copy_from_slice(&d.next().to_le_bytes());
        self.mem
            .write_at(self.layout.desc + 16 * u64::from(index % self.size), &b);
    }

    /// Writes `descs` as given as a descriptor table at `at` (an indirect table).
    pub fn write_table(&self, at: u64, descs: &[RawDescriptor]) {
        for (i, d) in descs.iter().enumerate() {
            let d = SplitDescriptor::from(*d);
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&d.addr().0.to_le_bytes());
            b[8..12].copy_from_slice(&d.len().to_le_bytes());
            b[12..14].copy_from_slice(&d.flags().to_le_bytes());
            b[14..].copy_from_slice(&d.next().to_le_bytes());
            self.mem.write_at(at + 16 * i as u64, &b);
        }
    }

    /// `descs` linked in order: NEXT set on all but the last (cleared there), `next`
    /// pointing at the following one from `first`; address, length and the other flags
    /// kept.
    fn linked(descs: &[RawDescriptor], first: u16, size: u16) -> Vec<RawDescriptor> {
        descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let d = SplitDescriptor::from(*d);
                let last = i + 1 == descs.len();
                let flags = if last {
                    d.flags() & !F_NEXT
                } else {
                    d.flags() | F_NEXT
                };
                let next = if last {
                    0
                } else {
                    first.wrapping_add(i as u16 + 1) % size
                };
                desc(d.addr().0, d.len(), flags, next)
            })
            .collect()
    }

    /// Puts `descs` in the table as one chain (linked in order, see
    /// [`SplitRing::post`]) and offers it, unpublished. Returns its head.
    pub fn add_chain(&mut self, descs: &[RawDescriptor]) -> u16 {
        assert!(
            !descs.is_empty() && descs.len() <= usize::from(self.size),
            "a chain of {} descriptors in a ring of {}",
            descs.len(),
            self.size
        );
        let head = self.next_desc;
        for (i, d) in Self::linked(descs, head, self.size).into_iter().enumerate() {
            self.write_desc(head.wrapping_add(i as u16) % self.size, d);
        }
        self.next_desc = head.wrapping_add(descs.len() as u16) % self.size;
        self.offer(head);
        head
    }

    /// Writes `descs` as an indirect table at `table` (linked in order, indices from
    /// 0) and offers one descriptor pointing at it, unpublished. Returns the head.
    pub fn add_indirect(&mut self, table: u64, descs: &[RawDescriptor]) -> u16 {
        self.write_table(table, &Self::linked(descs, 0, u16::MAX));
        self.add_chain(&[indirect(table, 16 * descs.len() as u32)])
    }

    /// Writes `descs` as given at table indices `at..` and offers, unpublished, every
    /// chain they hold: a descriptor is a head when it is the first or its predecessor
    /// has no NEXT flag (their `next` fields are the test's business). Returns the
    /// heads.
    pub fn add_raw(&mut self, at: u16, descs: &[RawDescriptor]) -> Vec<u16> {
        let mut heads = Vec::new();
        for (i, d) in descs.iter().enumerate() {
            let index = at.wrapping_add(i as u16) % self.size;
            self.write_desc(index, *d);
            if i == 0 || SplitDescriptor::from(descs[i - 1]).flags() & F_NEXT == 0 {
                heads.push(index);
            }
        }
        for &h in &heads {
            self.offer(h);
        }
        heads
    }

    /// Puts `head` in the next available slot, unpublished.
    pub fn offer(&mut self, head: u16) {
        self.set_avail_entry(self.avail_idx, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes every chain offered since the last publication (write barrier, then
    /// the available index), then, after a full barrier, reads the device's
    /// suppression state: returns whether the device wants a notification (EVENT_IDX:
    /// `vring_need_event(avail_event, new, old)`; otherwise `VRING_USED_F_NO_NOTIFY`
    /// clear), as `virtqueue_kick_prepare_split` decides.
    pub fn publish(&mut self) -> bool {
        let (old, new) = (self.published, self.avail_idx);
        fence(Ordering::Release);
        self.mem
            .store_u16(self.layout.avail + 2, new, Ordering::Release);
        self.published = new;
        fence(Ordering::SeqCst);
        if self.event_idx {
            let event = self.avail_event();
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.used_flags() & NO_NOTIFY == 0
        }
    }

    /// Posts one chain: `descs` linked in order as Linux's `virtqueue_add_split` links
    /// them (NEXT set on all but the last, `next` the following slot; address, length
    /// and the other flags kept), offered and published. Returns its head.
    pub fn post(&mut self, descs: &[RawDescriptor]) -> u16 {
        let head = self.add_chain(descs);
        self.publish();
        head
    }

    /// Posts descriptors as given ([`SplitRing::add_raw`] at table index `at`: each one
    /// without NEXT ends a chain) and publishes them. Returns the heads.
    pub fn post_raw(&mut self, at: u16, descs: &[RawDescriptor]) -> Vec<u16> {
        let heads = self.add_raw(at, descs);
        self.publish();
        heads
    }

    /// The driver's available index: chains offered so far.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    // Raw writes, for rings a test corrupts on purpose.

    /// Writes `head` into available-ring entry `pos` (modulo the size), nothing else.
    pub fn set_avail_entry(&self, pos: u16, head: u16) {
        let at = self.layout.avail + 4 + 2 * u64::from(pos % self.size);
        self.mem.write_at(at, &head.to_le_bytes());
    }

    /// Stores `idx` as the available index (release), whatever was offered.
    pub fn set_avail_idx(&self, idx: u16) {
        fence(Ordering::Release);
        self.mem
            .store_u16(self.layout.avail + 2, idx, Ordering::Release);
    }

    /// Writes the available ring's flags (`VRING_AVAIL_F_NO_INTERRUPT`: the driver
    /// asks for no interrupts).
    pub fn set_avail_flags(&self, flags: u16) {
        self.mem
            .store_u16(self.layout.avail, flags, Ordering::Release);
    }

    /// Writes `idx` as the used index (the device's field).
    pub fn set_used_idx(&self, idx: u16) {
        self.mem
            .store_u16(self.layout.used + 2, idx, Ordering::Release);
    }

    /// Writes `used_event` (EVENT_IDX: interrupt me once the used index passes it).
    pub fn set_used_event(&self, v: u16) {
        let at = self.layout.avail + 4 + 2 * u64::from(self.size);
        self.mem.store_u16(at, v, Ordering::Release);
    }

    // The device's side, read back.

    /// The used index (acquire).
    pub fn used_idx(&self) -> u16 {
        self.mem.load_u16(self.layout.used + 2, Ordering::Acquire)
    }

    /// The used ring's flags.
    pub fn used_flags(&self) -> u16 {
        self.mem.load_u16(self.layout.used, Ordering::Acquire)
    }

    /// `avail_event` (EVENT_IDX: notify me once the available index passes it).
    pub fn avail_event(&self) -> u16 {
        let at = self.layout.used + 4 + 8 * u64::from(self.size);
        self.mem.load_u16(at, Ordering::Acquire)
    }

    /// Used element `pos` (modulo the size): `(id, len)`.
    pub fn used_elem(&self, pos: u16) -> (u32, u32) {
        let mut b = [0u8; 8];
        let at = self.layout.used + 4 + 8 * u64::from(pos % self.size);
        self.mem.read_at(at, &mut b);
        (
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        )
    }

    /// Used elements `(head, used length)` the device added since the last call; with
    /// EVENT_IDX, `used_event` then asks for an interrupt at the next one.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx = self.used_idx();
        let mut out = Vec::new();
        while self.last_used != idx {
            out.push(self.used_elem(self.last_used));
            self.last_used = self.last_used.wrapping_add(1);
        }
        if self.event_idx {
            self.set_used_event(self.last_used);
        }
        out
    }

    /// The used length of the one chain the device completed since the last call.
    pub fn one(&mut self) -> u32 {
        let c = self.take_used();
        assert_eq!(c.len(), 1, "exactly one chain completed: {c:?}");
        c[0].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::Mem;
    use vm_memory::GuestAddress;

    fn mem() -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("RAM")
    }

    #[test]
    fn packed_layout_is_virtio_queues_mock_layout() {
        let l = RingLayout::packed(0x8_0000, 256);
        assert_eq!((l.desc, l.avail, l.used), (0x8_0000, 0x8_1000, 0x8_1208));
        assert!(l.bytes(256) <= 0x2000);
        let l = RingLayout::packed(0x1_0000, 16);
        assert_eq!((l.avail, l.used), (0x1_0100, 0x1_0128));
    }

    #[test]
    fn chains_reach_a_device_queue_and_come_back_used() {
        let m = mem();
        let mut ring = SplitRing::new(m.clone(), RingLayout::paged(0x1000), 16);
        let mut q = ring.queue();
        ring.post(&[r(0x8000, 16), w(0x9000, 32)]);
        let head = ring.add_indirect(0xa000, &[r(0x8000, 8), w(0x9000, 8)]);
        assert!(ring.publish(), "notifications on");
        let chains: Vec<_> = std::iter::from_fn(|| q.pop_descriptor_chain(&m)).collect();
        assert_eq!(chains.len(), 2);
        let d: Vec<_> = chains[0].clone().collect();
        assert_eq!(d.len(), 2);
        assert!(!d[0].is_write_only() && d[1].is_write_only());
        assert_eq!(chains[1].head_index(), head);
        let d: Vec<_> = chains[1].clone().collect();
        assert_eq!((d.len(), d[1].addr().0), (2, 0x9000));
        q.add_used(&m, 0, 48).expect("used");
        q.add_used(&m, head, 8).expect("used");
        assert_eq!(ring.take_used(), vec![(0, 48), (u32::from(head), 8)]);
        assert!(ring.take_used().is_empty());
    }

    #[test]
    fn publish_follows_no_notify_and_event_idx() {
        let m = mem();
        let mut ring = SplitRing::new(m.clone(), RingLayout::paged(0x1000), 16);
        m.store_u16(0x3000, NO_NOTIFY, Ordering::Relaxed);
        ring.add_chain(&[w(0x8000, 1)]);
        assert!(!ring.publish());
        let mut ring =
            SplitRing::new(m.clone(), RingLayout::paged(0x1000), 16).with_event_idx(true);
        // avail_event 0: the first publication (0 -> 1) crosses it, the next does not.
        ring.add_chain(&[w(0x8000, 1)]);
        assert!(ring.publish());
        ring.add_chain(&[w(0x8000, 1)]);
        assert!(!ring.publish());
        m.store_u16(0x3000 + 4 + 8 * 16, 2, Ordering::Relaxed);
        ring.add_chain(&[w(0x8000, 1)]);
        assert!(ring.publish());
        assert!(ring.queue().event_idx_enabled());
    }
}
