//! The transport proper: BAR 0 register semantics (virtio spec §4.1.4.3–§4.1.4.8), the
//! device-status state machine (§2.1, §3.1), feature negotiation and queue setup.

use crate::config_space::{
    get32, Bar0Layout, ConfigSpace, PciIds, PCI_CFG_BAR, PCI_CFG_DATA, PCI_CFG_LENGTH,
    PCI_CFG_OFFSET,
};
use std::sync::atomic::Ordering;
use virtio_contract::{
    serve_queue, ActiveQueue, Batch, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_MSI_NO_VECTOR, VIRTIO_RING_F_EVENT_IDX,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

/// Device status bits (virtio spec §2.1).
pub mod device_status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready to drive it.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}
use device_status::*;

/// Delivers one interrupt: the MSI-X vector the driver assigned.
pub trait InterruptSink: Send + Sync {
    /// Signals `vector`.
    fn signal(&self, vector: u16);
}

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportError {
    /// The device has no queue, or more than the BAR layout can hold.
    #[error("a virtio-pci device needs 1 to {max} queues, this one has {got}")]
    QueueCount {
        /// Queues the device declares.
        got: usize,
        /// Most the layout holds.
        max: usize,
    },
    /// A queue's maximum size is not a power of two in 1..=32768 (§2.7).
    #[error("queue {index} maximum size {size} is not a power of two in 1..=32768")]
    QueueSize {
        /// Queue index.
        index: usize,
        /// Declared size.
        size: u16,
    },
    /// The device configuration does not fit its BAR window.
    #[error("device configuration of {0} bytes exceeds the 4 KiB window")]
    ConfigTooLarge(u64),
}

struct QueueSlot {
    queue: Queue,
    vector: u16,
}

/// What crossed a transport since it was built, for benchmarks and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TransportCounters {
    /// Queue notifications the driver wrote.
    pub notifications: u64,
    /// Times the poller found new buffers on a queue (work that needed no notification).
    pub polled: u64,
    /// Queue interrupts sent.
    pub interrupts: u64,
    /// Queue interrupts the device wanted but the driver asked not to get
    /// (`VRING_AVAIL_F_NO_INTERRUPT` without EVENT_IDX).
    pub suppressed_interrupts: u64,
}

/// A virtio device on a modern virtio-pci function.
pub struct VirtioPciTransport<D, M> {
    device: D,
    mem: M,
    /// The batch hooks of the sharing mode behind `mem` (see [`Self::set_batch`]).
    batch: Box<dyn Batch + Send>,
    config: ConfigSpace,
    queues: Vec<QueueSlot>,
    irq: Box<dyn InterruptSink>,
    required_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    status: u8,
    config_generation: u8,
    config_vector: u16,
    isr: u8,
    vectors: u16,
    counters: TransportCounters,
    /// A poller serves the queues (notifications off): see [`Self::set_polling`].
    polling: bool,
}

impl<D, M> std::fmt::Debug for VirtioPciTransport<D, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciTransport")
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice<M>, M: GuestMemory> VirtioPciTransport<D, M> {
    /// Puts `device` on a virtio-pci function with PCI class `class_code`. DMA goes to
    /// `mem`; `required_features` must all be accepted or FEATURES_OK is refused (pass
    /// `1 << VIRTIO_F_ACCESS_PLATFORM` for a device behind an IOMMU). One MSI-X vector
    /// per queue plus one for configuration changes.
    ///
    /// # Errors
    /// [`TransportError`] if the device's queues or configuration do not fit.
    pub fn new(
        device: D,
        class_code: u32,
        mem: M,
        irq: Box<dyn InterruptSink>,
        required_features: u64,
    ) -> Result<Self, TransportError> {
        let sizes = device.queue_max_sizes();
        let max = usize::from(Bar0Layout::MAX_VECTORS) - 1;
        if sizes.is_empty() || sizes.len() > max {
            return Err(TransportError::QueueCount {
                got: sizes.len(),
                max,
            });
        }
        let mut queues = Vec::with_capacity(sizes.len());
        for (index, &size) in sizes.iter().enumerate() {
            let queue = Queue::new(size).map_err(|_| TransportError::QueueSize { index, size })?;
            queues.push(QueueSlot {
                queue,
                vector: VIRTIO_MSI_NO_VECTOR,
            });
        }
        if device.config_size() > Bar0Layout::DEVICE_MAX {
            return Err(TransportError::ConfigTooLarge(device.config_size()));
        }
        let vectors = queues.len() as u16 + 1;
        let ids = PciIds {
            device_type: device.device_type(),
            class_code,
        };
        let config = ConfigSpace::new(ids, queues.len() as u16, device.config_size(), vectors);
        Ok(Self {
            device,
            mem,
            batch: Box::new(()),
            config,
            queues,
            irq,
            required_features: required_features | (1 << VIRTIO_F_VERSION_1),
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
            config_vector: VIRTIO_MSI_NO_VECTOR,
            isr: 0,
            vectors,
            counters: TransportCounters::default(),
            polling: false,
        })
    }

    /// What crossed the transport so far.
    pub fn counters(&self) -> TransportCounters {
        self.counters
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Replaces the memory DMA goes to (the VMM's memory map changed).
    pub fn set_memory(&mut self, mem: M) {
        self.mem = mem;
    }

    /// Sets the batch hooks of the sharing mode behind the memory (an endpoint's
    /// `virtio_iommu::EndpointIommu`): every `process_queue` is then one batch of it
    /// (`virtio_contract`'s "The batch"). Without, the memory has nothing revocable.
    pub fn set_batch(&mut self, batch: Box<dyn Batch + Send>) {
        self.batch = batch;
    }

    /// The memory DMA goes to.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Current device status byte.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Number of MSI-X vectors the function has.
    pub fn msix_vectors(&self) -> u16 {
        self.vectors
    }

    /// Guest-physical address of BAR 0 as the driver programmed it.
    pub fn bar0_address(&self) -> u64 {
        self.config.bar0()
    }

    /// Whether the MSI-X capability is enabled (when the transport's capability is the
    /// one the guest writes; a vfio-user client virtualises it instead).
    pub fn msix_enabled(&self) -> bool {
        self.config.msix_enabled()
    }

    /// Reads PCI configuration space.
    pub fn read_config_space(&mut self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
        // VIRTIO_PCI_CAP_PCI_CFG: the data window reads BAR 0 through the cap's
        // bar/offset/length (§4.1.4.9.1).
        if let Some((bar_off, len)) = self.pci_cfg_window(offset, data.len()) {
            let mut buf = [0u8; 4];
            self.read_bar(bar_off, &mut buf[..len]);
            let start = (PCI_CFG_DATA as u64).saturating_sub(offset) as usize;
            let end = (start + len).min(data.len());
            data[start..end].copy_from_slice(&buf[..end - start]);
        }
    }

    /// Writes PCI configuration space.
    pub fn write_config_space(&mut self, offset: u64, data: &[u8]) {
        if let Some((bar_off, len)) = self.pci_cfg_window(offset, data.len()) {
            let start = (PCI_CFG_DATA as u64).saturating_sub(offset) as usize;
            if let Some(src) = data.get(start..start + len) {
                let src = src.to_vec();
                self.write_bar(bar_off, &src);
            }
            return;
        }
        self.config.write(offset, data);
    }

    /// The BAR 0 access a config access at `offset`/`len` makes through the PCI_CFG
    /// data window: only whole-window accesses of the cap's length (1, 2 or 4) count.
    fn pci_cfg_window(&self, offset: u64, len: usize) -> Option<(u64, usize)> {
        let b = self.config.bytes();
        if offset != PCI_CFG_DATA as u64 || b[PCI_CFG_BAR] != 0 {
            return None;
        }
        let win = get32(b, PCI_CFG_LENGTH) as usize;
        if !matches!(win, 1 | 2 | 4) || win != len {
            return None;
        }
        Some((u64::from(get32(b, PCI_CFG_OFFSET)), win))
    }

    /// Reads BAR 0 at `offset`.
    pub fn read_bar(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        if in_window(offset, len, Bar0Layout::COMMON, Bar0Layout::COMMON_SIZE) {
            self.read_common(offset - Bar0Layout::COMMON, data);
        } else if offset == Bar0Layout::ISR && len >= 1 {
            // §4.1.4.5: reading the ISR clears it.
            data[0] = std::mem::take(&mut self.isr);
        } else if in_window(offset, len, Bar0Layout::DEVICE, self.device.config_size()) {
            self.device.read_config(offset - Bar0Layout::DEVICE, data);
        }
        // Notify reads, MSI-X table/PBA (the VMM's) and holes read as zero.
    }

    /// Writes BAR 0 at `offset`.
    pub fn write_bar(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if in_window(offset, len, Bar0Layout::COMMON, Bar0Layout::COMMON_SIZE) {
            self.write_common(offset - Bar0Layout::COMMON, data);
        } else if in_window(offset, len, Bar0Layout::DEVICE, self.device.config_size()) {
            self.device.write_config(offset - Bar0Layout::DEVICE, data);
        } else if let Some(q) = self.notify_queue(offset, len) {
            self.notify(q);
        }
    }

    /// Queue index of a write at `offset` in the notify area.
    fn notify_queue(&self, offset: u64, len: u64) -> Option<usize> {
        let rel = offset.checked_sub(Bar0Layout::NOTIFY)?;
        let mul = u64::from(Bar0Layout::NOTIFY_MULTIPLIER);
        (rel.is_multiple_of(mul) && len >= 2).then_some(())?;
        let q = usize::try_from(rel / mul).ok()?;
        (q < self.queues.len()).then_some(q)
    }

    /// Processes queue `index` as the driver's notification of it asks (also for VMMs
    /// that route doorbells through an eventfd).
    pub fn notify(&mut self, index: usize) {
        self.counters.notifications += 1;
        self.run_queue(index);
    }

    /// Processes queue `index` as a notification would, for the device's own reason (a
    /// request it held back can complete, a back-end finished a buffer): not counted
    /// in [`TransportCounters::notifications`], which are the driver's doorbells.
    pub fn serve(&mut self, index: usize) {
        self.run_queue(index);
    }

    fn running(&self) -> bool {
        self.status & DRIVER_OK != 0 && self.status & DEVICE_NEEDS_RESET == 0
    }

    fn run_queue(&mut self, index: usize) {
        if !self.running() {
            return;
        }
        let Some(slot) = self.queues.get_mut(index) else {
            return;
        };
        if !slot.queue.ready() {
            return;
        }
        // Notifications stay off only for a queue the poller comes back to; any other
        // queue (one whose device runs it elsewhere, or drains it on calls) must leave
        // them on, or with EVENT_IDX its `avail_event` goes stale and the driver stops
        // notifying for good.
        let polling = self.polling && self.device.polled(index);
        match serve_queue(
            &mut self.device,
            index,
            &mut slot.queue,
            &self.mem,
            &*self.batch,
            polling,
        ) {
            Ok(Interrupt::Send) => {
                self.counters.interrupts += 1;
                let vector = slot.vector;
                self.interrupt(vector, 1);
            }
            Ok(Interrupt::Suppressed) => self.counters.suppressed_interrupts += 1,
            Ok(Interrupt::None) => {}
            Err(_) => self.needs_reset(),
        }
    }

    /// Whether queue `index` is ready and the device lets the transport poll it.
    fn is_polled(&self, index: usize) -> bool {
        self.queues[index].queue.ready() && self.device.polled(index)
    }

    /// Processes every polled queue whose driver published buffers since the device
    /// last looked, as a notification would, and returns whether the device took any.
    /// The driver need not notify while [`set_polling`](Self::set_polling) is on. A
    /// ring the device cannot take from (a bogus avail index, say) is not work: it
    /// must not keep a poller spinning.
    pub fn poll(&mut self) -> bool {
        if !self.running() {
            return false;
        }
        let mut took = false;
        // The poller's hot path: no allocation, the indices walked directly.
        for index in 0..self.queues.len() {
            if !self.is_polled(index) {
                continue;
            }
            let q = &self.queues[index].queue;
            let before = q.next_avail();
            // An unreadable avail ring is not work; a notification would find the error.
            let published = q
                .avail_idx(&self.mem, Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != before);
            if !published {
                continue;
            }
            self.run_queue(index);
            if self.queues[index].queue.next_avail() != before {
                self.counters.polled += 1;
                took = true;
            }
        }
        took
    }

    /// Turns polling on or off for every polled queue. On, the driver is told not to
    /// notify (§2.7.10: `VRING_USED_F_NO_NOTIFY`, or with EVENT_IDX `avail_event` left
    /// behind). Off, it is asked to notify again, and the return value says whether a
    /// queue received buffers in between: the caller must then poll once more before it
    /// sleeps, or the buffers of a driver that saw notifications off are never served
    /// (virtio-queue's `enable_notification` fences and re-reads `avail->idx`).
    pub fn set_polling(&mut self, on: bool) -> bool {
        self.polling = on;
        if !self.running() {
            return false;
        }
        let mut published = false;
        for index in 0..self.queues.len() {
            if !self.is_polled(index) {
                continue;
            }
            let q = &mut self.queues[index].queue;
            // A ring the device cannot write leaves notifications as they were: the
            // driver keeps notifying, which is always correct.
            if on {
                let _ = q.disable_notification(&self.mem);
            } else {
                published |= q.enable_notification(&self.mem).unwrap_or(false);
            }
        }
        published
    }

    /// Tells the driver the device configuration changed (§4.1.4.3: generation bump,
    /// ISR bit 1, config vector).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt(self.config_vector, 2);
    }

    fn needs_reset(&mut self) {
        self.status |= DEVICE_NEEDS_RESET;
        self.config_changed();
    }

    /// Marks the device as needing reset (§2.1.2: DEVICE_NEEDS_RESET, then a
    /// configuration-change interrupt), for failures the device learns of outside a
    /// queue notification (an out-of-process backend went away). Queue notifications
    /// are ignored until the driver resets the device.
    pub fn set_needs_reset(&mut self) {
        if self.status & DEVICE_NEEDS_RESET == 0 {
            self.needs_reset();
        }
    }

    fn interrupt(&mut self, vector: u16, isr_bit: u8) {
        self.isr |= isr_bit;
        if vector != VIRTIO_MSI_NO_VECTOR {
            self.irq.signal(vector);
        }
    }

    fn selected(&mut self) -> Option<&mut QueueSlot> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn read_common(&mut self, off: u64, data: &mut [u8]) {
        let features = self.device.device_features();
        let q = self.queues.get(usize::from(self.queue_select));
        let v: u64 = match off {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => features & 0xffff_ffff,
                1 => features >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            // An unselectable queue reads as size 0 (§4.1.4.3.2).
            0x18 => q.map_or(0, |q| u64::from(q.queue.size())),
            0x1a => q.map_or(u64::from(VIRTIO_MSI_NO_VECTOR), |q| u64::from(q.vector)),
            0x1c => q.map_or(0, |q| u64::from(q.queue.ready())),
            0x1e => u64::from(self.queue_select), // queue_notify_off: one slot per queue
            0x20 => q.map_or(0, |q| q.queue.desc_table()),
            0x24 => q.map_or(0, |q| q.queue.desc_table() >> 32),
            0x28 => q.map_or(0, |q| q.queue.avail_ring()),
            0x2c => q.map_or(0, |q| q.queue.avail_ring() >> 32),
            0x30 => q.map_or(0, |q| q.queue.used_ring()),
            0x34 => q.map_or(0, |q| q.queue.used_ring() >> 32),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write_common(&mut self, off: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        let n = data.len().min(8);
        raw[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(raw);
        let v32 = v as u32;
        let v16 = v as u16;
        // §4.1.4.3.1: queue fields may only change while the queue is disabled and
        // before DRIVER_OK; feature writes only before FEATURES_OK.
        let configurable = self.status & DRIVER_OK == 0;
        match off {
            0x00 => self.device_feature_select = v32,
            0x08 => self.driver_feature_select = v32,
            0x0c if self.status & FEATURES_OK == 0 => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v32),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v32) << 32)
                }
                _ => {}
            },
            0x10 => self.config_vector = self.checked_vector(v16),
            0x14 => self.write_status(v as u8),
            0x16 => self.queue_select = v16,
            0x18 if configurable => {
                if let Some(q) = self.selected() {
                    // Sizes that are not powers of two ≤ max are refused by Queue and
                    // leave the size as it was.
                    if !q.queue.ready() {
                        let _ = q.queue.try_set_size(v16);
                    }
                }
            }
            0x1a => {
                let vector = self.checked_vector(v16);
                if let Some(q) = self.selected() {
                    q.vector = vector;
                }
            }
            0x1c if configurable && v16 == 1 => {
                if let Some(q) = self.selected() {
                    q.queue.set_ready(true);
                }
            }
            0x20..=0x37 if configurable => {
                let Some(q) = self.selected() else {
                    return;
                };
                if q.queue.ready() {
                    return;
                }
                let (lo, hi) = if off.is_multiple_of(8) && n == 8 {
                    (Some(v32), Some((v >> 32) as u32))
                } else if off.is_multiple_of(8) {
                    (Some(v32), None)
                } else {
                    (None, Some(v32))
                };
                match off & !7 {
                    0x20 => q.queue.set_desc_table_address(lo, hi),
                    0x28 => q.queue.set_avail_ring_address(lo, hi),
                    0x30 => q.queue.set_used_ring_address(lo, hi),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// A vector number the function has, or NO_VECTOR (§4.1.5.1.2: the device answers
    /// NO_VECTOR when it cannot use the one asked for).
    fn checked_vector(&self, v: u16) -> u16 {
        if v < self.vectors {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn write_status(&mut self, new: u8) {
        if new == 0 {
            self.reset();
            return;
        }
        // Bits are only ever added by the driver (§2.1.1); a write that clears one is
        // ignored.
        if new & self.status != self.status {
            return;
        }
        let mut new = new;
        if new & FEATURES_OK != 0 && self.status & FEATURES_OK == 0 {
            let offered = self.device.device_features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & self.required_features == self.required_features;
            if ok {
                self.device.set_acked_features(self.driver_features);
                let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
                for q in &mut self.queues {
                    q.queue.set_event_idx(event_idx);
                }
            } else {
                // §3.1.1: the driver re-reads status and sees FEATURES_OK unset.
                new &= !FEATURES_OK;
            }
        }
        if new & DRIVER_OK != 0 && self.status & DRIVER_OK == 0 {
            if new & FEATURES_OK == 0 {
                return;
            }
            let valid = self
                .queues
                .iter()
                .all(|q| !q.queue.ready() || q.queue.is_valid(&self.mem));
            if !valid {
                self.status = new & !DRIVER_OK;
                self.needs_reset();
                return;
            }
            let active: Vec<ActiveQueue<'_>> = self
                .queues
                .iter()
                .enumerate()
                .filter(|(_, q)| q.queue.ready())
                .map(|(index, q)| ActiveQueue {
                    index,
                    queue: &q.queue,
                    vector: q.vector,
                })
                .collect();
            if self.device.activate(&active, &self.mem).is_err() {
                self.status = new & !DRIVER_OK;
                self.needs_reset();
                return;
            }
        }
        self.status = new;
    }

    /// Device reset (§4.1.4.3.1 writing 0 to device_status): the device resets, queues
    /// and negotiated features are forgotten, vectors unassigned.
    pub fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.queue.reset();
            q.vector = VIRTIO_MSI_NO_VECTOR;
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.config_vector = VIRTIO_MSI_NO_VECTOR;
        self.isr = 0;
    }
}

/// Whether `[offset, offset+len)` lies inside `[base, base+size)`.
fn in_window(offset: u64, len: u64, base: u64, size: u64) -> bool {
    offset >= base
        && offset
            .checked_add(len)
            .is_some_and(|end| end <= base + size)
        && len > 0
}
