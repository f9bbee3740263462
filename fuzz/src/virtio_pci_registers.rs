//! Fuzz target `virtio_pci_registers`: the virtio-pci register file of
//! `virtio_pci::VirtioPciTransport`, driven as a hostile driver drives it.
//!
//! The first byte picks the device (a two-queue loopback device shaped like the one
//! in `crates/virtio-pci/tests/transport.rs`, with or without device configuration;
//! a one-, three-queue variant; or `virtio_devices::Rng` reading `/dev/zero`), whether
//! `VIRTIO_F_ACCESS_PLATFORM` is required, and the guest memory (64 KiB, or two pieces
//! with a hole between). Then up to 64 operations:
//!
//! - reads and writes of 1 to 8 bytes at any offset of BAR 0 (common configuration,
//!   ISR, device configuration, notifications, anywhere in and past the BAR) and of
//!   the PCI configuration space (including the `VIRTIO_PCI_CAP_PCI_CFG` window at
//!   0x94 and offsets past 256);
//! - `notify(i)` for any `i`, `poll()`, `set_polling(b)`, `set_needs_reset()`,
//!   `config_changed()`, `reset()`;
//! - a Linux-like initialisation with fuzzed features, queue sizes, vectors and ring
//!   addresses; descriptors and available-ring entries written into guest memory, and
//!   raw guest-memory writes (ring flags, event indices, bogus indices).
//!
//! Checked after every operation, besides "no panic":
//! - the status register reads as `status()`, and holds only bits the driver wrote
//!   since its last reset, plus `DEVICE_NEEDS_RESET`; `DRIVER_OK` only with
//!   `FEATURES_OK`; with `FEATURES_OK` the device got features it offered, including
//!   every required one;
//! - `num_queues` is the device's; the selected queue's size is a power of two within
//!   its maximum (0 for a queue that does not exist), its vector and the config vector
//!   are the function's or `NO_VECTOR`, `queue_enable` is 0 or 1, `queue_notify_off`
//!   is the selected index, `device_feature` is the offered word selected;
//! - ISR reads only bits 0 and 1; every interrupt goes to a vector the function has.
//!
//! At the end every queue is selected in turn and checked the same way.

use crate::input::Input;
use std::sync::{Arc, Mutex};
use virtio_contract::{
    DeviceError, DeviceIdentity, VirtioDevice, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
    VIRTIO_MSI_NO_VECTOR, VIRTIO_RING_F_EVENT_IDX,
};
use virtio_devices::rng::{Rng, RngConfig};
use virtio_pci::device_status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FEATURES_OK};
use virtio_pci::{InterruptSink, VirtioPciTransport};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const MAX_OPS: usize = 64;
const MEM_SIZE: u64 = 0x1_0000;
/// Queue `q`'s rings in the default layout: descriptors, then available, then used
/// ring, a page each.
const fn ring_base(q: usize) -> u64 {
    0x1000 + (q as u64) * 0x3000
}
/// Where buffers go by default (after three queues' rings).
const DATA: u64 = 0xa000;

// Common configuration registers (virtio spec §4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_AVAIL: u64 = 0x28;
const QUEUE_USED: u64 = 0x30;
const ISR: u64 = 0x1000;
// The VIRTIO_PCI_CAP_PCI_CFG capability (at 0x84 in config space).
const PCI_CFG_BAR: u64 = 0x88;
const PCI_CFG_OFFSET: u64 = 0x8c;
const PCI_CFG_LENGTH: u64 = 0x90;
const PCI_CFG_DATA: u64 = 0x94;

/// A loopback device: fills each chain's writable buffers (32 bytes at most each) and
/// returns it; a readable buffer starting with 0xee is a device failure when `fail`.
struct Loop {
    sizes: &'static [u16],
    cfg: [u8; 8],
    cfg_len: u64,
    acked: u64,
    fail: bool,
}

impl DeviceIdentity for Loop {
    fn device_type(&self) -> u16 {
        4
    }
    fn queue_max_sizes(&self) -> &[u16] {
        self.sizes
    }
    fn device_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_ACCESS_PLATFORM)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << 5)
    }
    fn set_acked_features(&mut self, f: u64) {
        self.acked = f;
    }
    fn config_size(&self) -> u64 {
        self.cfg_len
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Panics unless the transport keeps `offset + len <= config_size()`.
        let o = offset as usize;
        data.copy_from_slice(&self.cfg[o..o + data.len()]);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.cfg[o..o + data.len()].copy_from_slice(data);
    }
}

impl VirtioDevice<Mem> for Loop {
    fn process_queue(
        &mut self,
        index: usize,
        q: &mut Queue,
        mem: &Mem,
    ) -> Result<bool, DeviceError> {
        let ring = |source| DeviceError::Queue {
            queue: index,
            source,
        };
        for _ in 0..64 {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut used = 0u32;
            for d in chain {
                if d.is_write_only() {
                    let n = d.len().min(32);
                    if mem.write_slice(&[0xa5; 32][..n as usize], d.addr()).is_ok() {
                        used += n;
                    }
                } else if self.fail && d.len() > 0 {
                    let mut b = [0u8; 1];
                    if mem.read_slice(&mut b, d.addr()).is_ok() && b[0] == 0xee {
                        return Err(DeviceError::backend("loop", "poisoned buffer"));
                    }
                }
            }
            q.add_used(mem, head, used).map_err(ring)?;
        }
        q.needs_notification(mem).map_err(ring)
    }
    fn reset(&mut self) {
        self.acked = 0;
    }
}

struct Sink(Arc<Mutex<Vec<u16>>>);

impl InterruptSink for Sink {
    fn signal(&self, vector: u16) {
        self.0.lock().expect("irq log").push(vector);
    }
}

/// The target's body: panics if a checked contract breaks.
pub fn run(data: &[u8]) {
    let mut inp = Input(data);
    let Some(setup) = inp.u8() else {
        return;
    };
    let mem = if setup & 0x10 != 0 {
        Mem::from_ranges(&[(GuestAddress(0), 0x8000), (GuestAddress(0x9000), 0x7000)])
    } else {
        Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
    }
    .expect("guest memory");
    let required = if setup & 0x20 != 0 {
        1 << VIRTIO_F_ACCESS_PLATFORM
    } else {
        0
    };
    let irqs = Arc::new(Mutex::new(Vec::new()));
    let sink = || Box::new(Sink(irqs.clone()));
    match setup % 4 {
        3 => {
            let rng = Rng::new(&RngConfig {
                source: "/dev/zero".into(),
                access_platform: setup & 0x40 != 0,
            })
            .expect("open /dev/zero");
            let t = VirtioPciTransport::new(rng, 0x00ff_0000, mem.clone(), sink(), required)
                .expect("rng transport");
            Driver::new(t, mem, irqs, required, Rng::acked_features).drive(&mut inp);
        }
        sel => {
            let sizes: &'static [u16] = match sel {
                0 => &[16, 8],
                1 => &[4],
                _ => &[256, 2, 1],
            };
            let dev = Loop {
                sizes,
                cfg: [0; 8],
                cfg_len: if setup & 0x40 != 0 { 0 } else { 8 },
                acked: 0,
                fail: setup & 0x80 != 0,
            };
            let t = VirtioPciTransport::new(dev, 0x00ff_0000, mem.clone(), sink(), required)
                .expect("loop transport");
            Driver::new(t, mem, irqs, required, |d: &Loop| d.acked).drive(&mut inp);
        }
    }
}

/// The fuzzed driver and what it knows of the function.
struct Driver<D> {
    t: VirtioPciTransport<D, Mem>,
    mem: Mem,
    irqs: Arc<Mutex<Vec<u16>>>,
    acked: fn(&D) -> u64,
    sizes: Vec<u16>,
    offered: u64,
    required: u64,
    vectors: u16,
    /// Status bits the driver wrote since it last wrote 0 (or called `reset`).
    allowed: u8,
    /// The queue sizes the driver last set (for placing available-ring entries).
    qsize: Vec<u16>,
}

impl<D: VirtioDevice<Mem>> Driver<D> {
    fn new(
        t: VirtioPciTransport<D, Mem>,
        mem: Mem,
        irqs: Arc<Mutex<Vec<u16>>>,
        required: u64,
        acked: fn(&D) -> u64,
    ) -> Self {
        let sizes = t.device().queue_max_sizes().to_vec();
        let offered = t.device().device_features();
        let vectors = t.msix_vectors();
        Self {
            qsize: sizes.clone(),
            t,
            mem,
            irqs,
            acked,
            sizes,
            offered,
            required: required | (1 << VIRTIO_F_VERSION_1),
            vectors,
            allowed: 0,
        }
    }

    /// Notes a status byte the driver wrote.
    fn wrote_status(&mut self, v: u8) {
        if v == 0 {
            self.allowed = 0;
        } else {
            self.allowed |= v;
        }
    }

    fn bar_write(&mut self, off: u64, data: &[u8]) {
        if off == DEVICE_STATUS && !data.is_empty() {
            self.wrote_status(data[0]);
        }
        self.t.write_bar(off, data);
    }

    fn bar_write_val(&mut self, off: u64, v: u64, len: usize) {
        self.bar_write(off, &v.to_le_bytes()[..len]);
    }

    fn bar_read(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.t.read_bar(off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn cfg_read(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.t.read_config_space(off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn cfg_write(&mut self, off: u64, data: &[u8]) {
        // A write of the PCI_CFG data window is a BAR 0 write at the cap's offset.
        if off == PCI_CFG_DATA
            && self.cfg_read(PCI_CFG_BAR, 1) == 0
            && self.cfg_read(PCI_CFG_LENGTH, 4) == data.len() as u64
            && self.cfg_read(PCI_CFG_OFFSET, 4) == DEVICE_STATUS
            && !data.is_empty()
        {
            self.wrote_status(data[0]);
        }
        self.t.write_config_space(off, data);
    }

    fn drive(mut self, inp: &mut Input<'_>) {
        for _ in 0..MAX_OPS {
            if self.op(inp).is_none() {
                break;
            }
            self.check();
        }
        // Every queue, selected in turn; then the selection as it was.
        let sel = self.bar_read(QUEUE_SELECT, 2);
        for q in 0..=self.sizes.len() as u64 {
            self.bar_write_val(QUEUE_SELECT, q, 2);
            self.check();
        }
        self.bar_write_val(QUEUE_SELECT, sel, 2);
        self.check();
    }

    fn op(&mut self, inp: &mut Input<'_>) -> Option<()> {
        let tag = inp.u8()?;
        match tag % 12 {
            0 => {
                let off = bar_offset(inp)?;
                let len = width(inp)?;
                let mut b = [0u8; 8];
                self.t.read_bar(off, &mut b[..len]);
                if off == ISR {
                    assert_eq!(b[0] & !3, 0, "ISR read {:#x}", b[0]);
                }
            }
            1 => {
                let off = bar_offset(inp)?;
                let len = width(inp)?;
                let b = inp.bytes(len)?;
                self.bar_write(off, b);
            }
            2 => {
                let off = cfg_offset(inp)?;
                let len = width(inp)?;
                let mut b = [0u8; 8];
                self.t.read_config_space(off, &mut b[..len]);
            }
            3 => {
                let off = cfg_offset(inp)?;
                let len = width(inp)?;
                let b = inp.bytes(len)?;
                self.cfg_write(off, b);
            }
            4 => {
                let i = inp.u8()?;
                self.t.notify(usize::from(i % 8));
            }
            5 => {
                self.t.poll();
            }
            6 => {
                let on = inp.bool()?;
                self.t.set_polling(on);
            }
            7 => self.init(inp)?,
            8 => self.publish(inp)?,
            9 => {
                let off = inp.u16()?;
                let len = width(inp)?;
                let b = inp.bytes(len)?;
                let _ = self.mem.write_slice(b, GuestAddress(u64::from(off)));
            }
            10 => match inp.u8()? % 3 {
                0 => self.t.set_needs_reset(),
                1 => self.t.config_changed(),
                _ => {
                    self.t.reset();
                    self.allowed = 0;
                }
            },
            _ => {
                // A common-configuration register, at a register's offset mostly.
                let off = u64::from(inp.u8()? % 0x3a);
                let len = [1, 2, 4, 8][usize::from(inp.u8()? % 4)];
                let v = inp.u64()?;
                self.bar_write_val(off, v, len);
            }
        }
        Some(())
    }

    /// Linux's modern initialisation, with fuzzed choices.
    fn init(&mut self, inp: &mut Input<'_>) -> Option<()> {
        let f = inp.u8()?;
        let qmask = inp.u8()?;
        if f & 1 != 0 {
            self.bar_write_val(DEVICE_STATUS, 0, 1);
        }
        self.bar_write_val(DEVICE_STATUS, u64::from(ACKNOWLEDGE), 1);
        self.bar_write_val(DEVICE_STATUS, u64::from(ACKNOWLEDGE | DRIVER), 1);
        let features = match (f >> 1) & 3 {
            0 => self.offered,
            1 => self.offered & inp.u64()?,
            2 => inp.u64()?,
            _ => self.offered & !(1 << VIRTIO_F_VERSION_1),
        };
        self.bar_write_val(DRIVER_FEATURE_SELECT, 0, 4);
        self.bar_write_val(DRIVER_FEATURE, features & 0xffff_ffff, 4);
        self.bar_write_val(DRIVER_FEATURE_SELECT, 1, 4);
        self.bar_write_val(DRIVER_FEATURE, features >> 32, 4);
        let s = u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        self.bar_write_val(DEVICE_STATUS, s, 1);
        for q in 0..self.sizes.len() {
            if qmask & (1 << q) == 0 {
                continue;
            }
            self.bar_write_val(QUEUE_SELECT, q as u64, 2);
            if f & 0x40 != 0 {
                let size = inp.u16()?;
                self.bar_write_val(QUEUE_SIZE, u64::from(size), 2);
            }
            self.qsize[q] = self.bar_read(QUEUE_SIZE, 2) as u16;
            let vector = if f & 0x20 != 0 {
                u64::from(inp.u16()?)
            } else {
                q as u64 + 1
            };
            self.bar_write_val(QUEUE_MSIX_VECTOR, vector, 2);
            let base = ring_base(q);
            let (desc, avail, used) = if f & 0x80 != 0 {
                (inp.u64()?, inp.u64()?, inp.u64()?)
            } else {
                (base, base + 0x1000, base + 0x2000)
            };
            self.bar_write_val(QUEUE_DESC, desc, 8);
            self.bar_write_val(QUEUE_AVAIL, avail, 8);
            self.bar_write_val(QUEUE_USED, used, 8);
            self.bar_write_val(QUEUE_ENABLE, 1, 2);
        }
        if f & 0x10 != 0 {
            self.bar_write_val(CONFIG_MSIX_VECTOR, 0, 2);
        }
        self.bar_write_val(DEVICE_STATUS, s | u64::from(DRIVER_OK), 1);
        Some(())
    }

    /// Writes a descriptor into queue `q`'s table (default layout) and, mostly,
    /// publishes it in the available ring.
    fn publish(&mut self, inp: &mut Input<'_>) -> Option<()> {
        let q = usize::from(inp.u8()?) % self.sizes.len();
        let d = inp.u8()?;
        let how = inp.u8()?;
        let addr = if how & 1 != 0 {
            inp.u64()?
        } else {
            DATA + u64::from(inp.u16()?) % (MEM_SIZE - DATA)
        };
        let len = if how & 2 != 0 {
            inp.u32()?
        } else {
            u32::from(inp.u8()?)
        };
        // NEXT, WRITE, INDIRECT as the fuzzer likes; WRITE by default.
        let flags = if how & 4 != 0 { inp.u16()? & 7 } else { 2 };
        let next = u16::from(inp.u8()?);
        let size = self.qsize[q].max(1);
        let base = ring_base(q);
        let slot = u64::from(u16::from(d) % size);
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&addr.to_le_bytes());
        desc[8..12].copy_from_slice(&len.to_le_bytes());
        desc[12..14].copy_from_slice(&flags.to_le_bytes());
        desc[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = self.mem.write_slice(&desc, GuestAddress(base + slot * 16));
        if how & 8 == 0 {
            let avail = base + 0x1000;
            let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
            let at = avail + 4 + u64::from(idx % size) * 2;
            let _ = self.mem.write_obj(slot as u16, GuestAddress(at));
            // Mostly one more; sometimes an index far ahead (a bogus ring).
            let step = if how & 0x10 != 0 {
                u16::from(inp.u8()?)
            } else {
                1
            };
            let _ = self
                .mem
                .write_obj(idx.wrapping_add(step), GuestAddress(avail + 2));
        }
        if how & 0x20 != 0 {
            self.t.notify(q);
        }
        Some(())
    }

    fn check(&mut self) {
        let st = self.t.status();
        assert_eq!(self.bar_read(DEVICE_STATUS, 1), u64::from(st));
        assert_eq!(
            st & !DEVICE_NEEDS_RESET & !self.allowed,
            0,
            "status {st:#x}, the driver wrote only {:#x}",
            self.allowed
        );
        if st & DRIVER_OK != 0 {
            assert_ne!(st & FEATURES_OK, 0, "DRIVER_OK without FEATURES_OK");
        }
        if st & FEATURES_OK != 0 {
            let acked = (self.acked)(self.t.device());
            assert_eq!(acked & !self.offered, 0, "acked {acked:#x} not offered");
            assert_eq!(acked & self.required, self.required, "acked {acked:#x}");
        }
        let n = self.sizes.len() as u64;
        assert_eq!(self.bar_read(NUM_QUEUES, 2), n);
        let dfs = self.bar_read(DEVICE_FEATURE_SELECT, 4);
        let want = match dfs {
            0 => self.offered & 0xffff_ffff,
            1 => self.offered >> 32,
            _ => 0,
        };
        assert_eq!(self.bar_read(DEVICE_FEATURE, 4), want);
        let v = self.vectors;
        let vector_ok = |x: u64| x < u64::from(v) || x == u64::from(VIRTIO_MSI_NO_VECTOR);
        let cv = self.bar_read(CONFIG_MSIX_VECTOR, 2);
        assert!(vector_ok(cv), "config vector {cv:#x} of {v}");
        let sel = self.bar_read(QUEUE_SELECT, 2);
        let size = self.bar_read(QUEUE_SIZE, 2);
        let qv = self.bar_read(QUEUE_MSIX_VECTOR, 2);
        let enable = self.bar_read(QUEUE_ENABLE, 2);
        assert_eq!(self.bar_read(QUEUE_NOTIFY_OFF, 2), sel);
        assert!(enable <= 1, "queue_enable {enable}");
        if sel < n {
            let max = u64::from(self.sizes[sel as usize]);
            assert!(
                size.is_power_of_two() && size <= max,
                "queue {sel} size {size} (max {max})"
            );
            assert!(vector_ok(qv), "queue {sel} vector {qv:#x} of {v}");
        } else {
            assert_eq!(size, 0, "absent queue {sel} has size {size}");
            assert_eq!(qv, u64::from(VIRTIO_MSI_NO_VECTOR));
            assert_eq!(enable, 0);
            for off in [QUEUE_DESC, QUEUE_AVAIL, QUEUE_USED] {
                assert_eq!(self.bar_read(off, 8), 0);
            }
        }
        for vec in self.irqs.lock().expect("irq log").drain(..) {
            assert!(vec < v, "interrupt on vector {vec} of {v}");
        }
    }
}

/// 1 to 8 bytes.
fn width(inp: &mut Input<'_>) -> Option<usize> {
    Some(1 + usize::from(inp.u8()? % 8))
}

/// A BAR 0 offset: in each structure mostly, else anywhere in or past the BAR.
fn bar_offset(inp: &mut Input<'_>) -> Option<u64> {
    let s = inp.u8()?;
    Some(match s % 8 {
        0..=2 => u64::from(inp.u8()? % 0x40),
        3 => ISR + u64::from(inp.u8()? % 4),
        4 => 0x2000 + u64::from(inp.u8()? % 16),
        5 => 0x3000 + u64::from(inp.u8()? % 32),
        6 => u64::from(inp.u16()?),
        _ => inp.u64()?,
    })
}

/// A configuration-space offset: the PCI_CFG window often, any byte of the 256, or
/// anywhere.
fn cfg_offset(inp: &mut Input<'_>) -> Option<u64> {
    let s = inp.u8()?;
    Some(match s % 4 {
        0 => PCI_CFG_DATA,
        1 | 2 => u64::from(inp.u8()?),
        _ => inp.u64()?,
    })
}
