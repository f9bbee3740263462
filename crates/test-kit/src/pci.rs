//! Linux's virtio-pci modern bring-up (`virtio_pci_modern.c`, virtio 1.2 §4.1.4.3)
//! through BAR 0 register accesses: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK,
//! queue setup, DRIVER_OK, and the notify write. The accesses go through [`Bar0`]: a
//! `VirtioPciTransport` in this thread, or a function served over vfio-user
//! (`vfio_user::Client`, or a server backend called directly).

use crate::ring::RingLayout;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use vfio_user::{Client, ServerBackend};
use virtio_contract::VirtioDevice;
use virtio_pci::{InterruptSink, VirtioPciTransport};
use vm_memory::GuestMemory;

pub use virtio_pci::device_status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};

/// Common configuration registers (`struct virtio_pci_common_cfg`) at BAR 0 offset 0.
pub mod reg {
    /// `device_feature_select` (4 bytes).
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// `device_feature` (4 bytes).
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// `driver_feature_select` (4 bytes).
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// `driver_feature` (4 bytes).
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// `config_msix_vector` (2 bytes).
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// `num_queues` (2 bytes).
    pub const NUM_QUEUES: u64 = 0x12;
    /// `device_status` (1 byte).
    pub const DEVICE_STATUS: u64 = 0x14;
    /// `queue_select` (2 bytes).
    pub const QUEUE_SELECT: u64 = 0x16;
    /// `queue_size` (2 bytes).
    pub const QUEUE_SIZE: u64 = 0x18;
    /// `queue_msix_vector` (2 bytes).
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// `queue_enable` (2 bytes).
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// `queue_desc` (8 bytes).
    pub const QUEUE_DESC: u64 = 0x20;
    /// `queue_driver`: the available ring (8 bytes).
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// `queue_device`: the used ring (8 bytes).
    pub const QUEUE_DEVICE: u64 = 0x30;
    use virtio_pci::Bar0Layout;
    /// The ISR status byte.
    pub const ISR: u64 = Bar0Layout::ISR;
    /// The device configuration.
    pub const DEVICE_CFG: u64 = Bar0Layout::DEVICE;
    /// Queue 0's notify address (queue `n` at `+ NOTIFY_MULTIPLIER · n`).
    pub const NOTIFY: u64 = Bar0Layout::NOTIFY;
}

/// BAR 0 of a virtio-pci function, however its accesses arrive.
pub trait Bar0 {
    /// Reads `data.len()` bytes at `offset`.
    fn bar0_read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset`.
    fn bar0_write(&mut self, offset: u64, data: &[u8]);
}

impl<D: VirtioDevice<M>, M: GuestMemory> Bar0 for VirtioPciTransport<D, M> {
    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        self.read_bar(offset, data);
    }

    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        self.write_bar(offset, data);
    }
}

/// `VFIO_PCI_BAR0_REGION_INDEX`.
const VFIO_BAR0: u32 = 0;

/// BAR 0 through vfio-user region accesses: a client on the function's socket, or a
/// server backend called in this thread.
macro_rules! vfio_bar0 {
    ($($t:ty),*) => {$(
        impl Bar0 for $t {
            fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
                self.region_read(VFIO_BAR0, offset, data)
                    .unwrap_or_else(|e| panic!("BAR 0 read at {offset:#x}: {e:?}"));
            }

            fn bar0_write(&mut self, offset: u64, data: &[u8]) {
                self.region_write(VFIO_BAR0, offset, data)
                    .unwrap_or_else(|e| panic!("BAR 0 write at {offset:#x}: {e:?}"));
            }
        }
    )*};
}

vfio_bar0!(Client, Box<dyn ServerBackend + Send>);

/// Reads a little-endian value of `len` bytes (at most 8) at `offset`.
pub fn bar_read<B: Bar0 + ?Sized>(b: &mut B, offset: u64, len: usize) -> u64 {
    let mut v = [0u8; 8];
    b.bar0_read(offset, &mut v[..len]);
    u64::from_le_bytes(v)
}

/// Writes the low `len` bytes (at most 8) of `v`, little-endian, at `offset`.
pub fn bar_write<B: Bar0 + ?Sized>(b: &mut B, offset: u64, v: u64, len: usize) {
    b.bar0_write(offset, &v.to_le_bytes()[..len]);
}

/// The device status byte.
pub fn status<B: Bar0 + ?Sized>(b: &mut B) -> u8 {
    bar_read(b, reg::DEVICE_STATUS, 1) as u8
}

/// Writes the device status byte.
pub fn set_status<B: Bar0 + ?Sized>(b: &mut B, s: u8) {
    bar_write(b, reg::DEVICE_STATUS, u64::from(s), 1);
}

/// Resets the device (status 0).
pub fn reset<B: Bar0 + ?Sized>(b: &mut B) {
    set_status(b, 0);
}

/// The 64 feature bits the device offers (both halves of `device_feature`).
pub fn device_features<B: Bar0 + ?Sized>(b: &mut B) -> u64 {
    bar_write(b, reg::DEVICE_FEATURE_SELECT, 0, 4);
    let lo = bar_read(b, reg::DEVICE_FEATURE, 4);
    bar_write(b, reg::DEVICE_FEATURE_SELECT, 1, 4);
    let hi = bar_read(b, reg::DEVICE_FEATURE, 4);
    lo | (hi << 32)
}

/// Writes both halves of `driver_feature`.
pub fn write_driver_features<B: Bar0 + ?Sized>(b: &mut B, features: u64) {
    for half in 0..2 {
        bar_write(b, reg::DRIVER_FEATURE_SELECT, half, 4);
        bar_write(
            b,
            reg::DRIVER_FEATURE,
            (features >> (32 * half)) & 0xffff_ffff,
            4,
        );
    }
}

/// What feature negotiation got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The features the device offered.
    pub offered: u64,
    /// Whether FEATURES_OK stuck (the device accepted the driver's features).
    pub features_ok: bool,
}

/// ACKNOWLEDGE and DRIVER, reads the offered features, writes `want` (or, if `None`,
/// everything offered), sets FEATURES_OK and reads it back.
pub fn negotiate<B: Bar0 + ?Sized>(b: &mut B, want: Option<u64>) -> Negotiated {
    set_status(b, ACKNOWLEDGE | DRIVER);
    let offered = device_features(b);
    write_driver_features(b, want.unwrap_or(offered));
    set_status(b, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    Negotiated {
        offered,
        features_ok: status(b) & FEATURES_OK != 0,
    }
}

/// How one queue is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueSetup {
    /// The queue's index.
    pub index: u16,
    /// Its size, or `None` to keep the device's maximum.
    pub size: Option<u16>,
    /// Its MSI-X vector.
    pub vector: u16,
    /// Where its rings are, as the device sees them.
    pub layout: RingLayout,
}

/// Selects the queue, sets its size (if given), vector and ring addresses, and
/// enables it.
pub fn setup_queue<B: Bar0 + ?Sized>(b: &mut B, q: &QueueSetup) {
    bar_write(b, reg::QUEUE_SELECT, u64::from(q.index), 2);
    if let Some(size) = q.size {
        bar_write(b, reg::QUEUE_SIZE, u64::from(size), 2);
    }
    bar_write(b, reg::QUEUE_MSIX_VECTOR, u64::from(q.vector), 2);
    bar_write(b, reg::QUEUE_DESC, q.layout.desc, 8);
    bar_write(b, reg::QUEUE_DRIVER, q.layout.avail, 8);
    bar_write(b, reg::QUEUE_DEVICE, q.layout.used, 8);
    bar_write(b, reg::QUEUE_ENABLE, 1, 2);
}

/// Sets DRIVER_OK (after ACKNOWLEDGE, DRIVER and FEATURES_OK).
pub fn driver_ok<B: Bar0 + ?Sized>(b: &mut B) {
    set_status(b, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
}

/// The whole bring-up from reset, as Linux does it: [`reset`], [`negotiate`] of `want`
/// (everything offered if `None`), the configuration vector (if given), each queue
/// ([`setup_queue`]), then DRIVER_OK — only if FEATURES_OK stuck. Returns the
/// negotiation.
pub fn bring_up<B: Bar0 + ?Sized>(
    b: &mut B,
    want: Option<u64>,
    config_vector: Option<u16>,
    queues: &[QueueSetup],
) -> Negotiated {
    reset(b);
    let n = negotiate(b, want);
    if !n.features_ok {
        return n;
    }
    if let Some(v) = config_vector {
        bar_write(b, reg::CONFIG_MSIX_VECTOR, u64::from(v), 2);
    }
    for q in queues {
        setup_queue(b, q);
    }
    driver_ok(b);
    n
}

/// Notifies queue `index` as the driver does: a 2-byte write of the queue's index to
/// its notify address (`queue_notify_off` is the index, the multiplier 4).
pub fn notify<B: Bar0 + ?Sized>(b: &mut B, index: u16) {
    bar_write(
        b,
        reg::NOTIFY + u64::from(virtio_pci::Bar0Layout::NOTIFY_MULTIPLIER) * u64::from(index),
        u64::from(index),
        2,
    );
}

/// Records the MSI-X vectors a transport signals, in order.
#[derive(Debug, Default)]
pub struct Irqs(Mutex<Vec<u16>>);

impl Irqs {
    /// A new, empty record, shared.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// An interrupt sink that records into `self`.
    pub fn sink(self: &Arc<Self>) -> Box<dyn InterruptSink> {
        Box::new(IrqsSink(Arc::clone(self)))
    }

    /// The vectors signalled so far.
    pub fn vectors(&self) -> Vec<u16> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

struct IrqsSink(Arc<Irqs>);

impl InterruptSink for IrqsSink {
    fn signal(&self, vector: u16) {
        self.0
             .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(vector);
    }
}

/// An interrupt sink that sends each signalled vector on a channel, and the channel's
/// receiving end.
pub fn channel_sink() -> (Arc<dyn InterruptSink>, Receiver<u16>) {
    let (tx, rx) = mpsc::channel();
    (Arc::new(ChannelSink(Mutex::new(tx))), rx)
}

struct ChannelSink(Mutex<Sender<u16>>);

impl InterruptSink for ChannelSink {
    fn signal(&self, vector: u16) {
        let _ = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(vector);
    }
}
