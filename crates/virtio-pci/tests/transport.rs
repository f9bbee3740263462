//! The transport driven as Linux's virtio_pci modern driver drives a function: find the
//! capabilities, size BAR 0, negotiate features, set up a queue, DRIVER_OK, kick,
//! receive the interrupt, reset. The device is a test echo device.
#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use std::sync::Arc;
use test_kit::pci::{self, bar_read, bar_write, Irqs, QueueSetup};
use test_kit::ring::{NO_INTERRUPT, NO_NOTIFY};
use test_kit::{r, w, RingLayout, SplitRing};
use virtio_contract::*;
use virtio_pci::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

/// Copies each chain's readable bytes, reversed, into its writable part.
#[derive(Default)]
struct Echo {
    acked: u64,
    resets: u32,
    cfg: [u8; 8],
    /// Its queues are not for a poller (a device that runs them elsewhere).
    unpolled: bool,
}

impl DeviceIdentity for Echo {
    fn device_type(&self) -> u16 {
        4
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
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
        8
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.copy_from_slice(&self.cfg[offset as usize..offset as usize + data.len()]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.cfg[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }
}

impl VirtioDevice<Mem> for Echo {
    fn polled(&self, _index: usize) -> bool {
        !self.unpolled
    }

    fn process_queue(
        &mut self,
        index: usize,
        q: &mut Queue,
        mem: &Mem,
    ) -> Result<bool, DeviceError> {
        let fail = |e: vm_memory::GuestMemoryError| DeviceError::backend("echo", e);
        let ring = |source| DeviceError::Queue {
            queue: index,
            source,
        };
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<_> = chain.collect();
            let mut data = Vec::new();
            for d in descs.iter().filter(|d| !d.is_write_only()) {
                let mut b = vec![0; d.len() as usize];
                mem.read_slice(&mut b, d.addr()).map_err(fail)?;
                data.extend(b);
            }
            data.reverse();
            let w = descs
                .iter()
                .find(|d| d.is_write_only())
                .ok_or_else(|| DeviceError::backend("echo", "no writable descriptor"))?;
            mem.write_slice(&data, w.addr()).map_err(fail)?;
            q.add_used(mem, head, data.len() as u32).map_err(ring)?;
        }
        q.needs_notification(mem).map_err(ring)
    }

    fn reset(&mut self) {
        self.resets += 1;
        self.acked = 0;
    }
}

fn transport() -> (VirtioPciTransport<Echo, Mem>, Arc<Irqs>) {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let irqs = Irqs::new();
    let t = VirtioPciTransport::new(
        Echo::default(),
        0x00ff_0000,
        mem,
        irqs.sink(),
        1 << VIRTIO_F_ACCESS_PLATFORM,
    )
    .unwrap();
    (t, irqs)
}

fn cfg_read(t: &mut VirtioPciTransport<Echo, Mem>, off: u64, len: usize) -> u32 {
    let mut b = [0u8; 4];
    t.read_config_space(off, &mut b[..len]);
    u32::from_le_bytes(b)
}

/// (cfg_type → (offset in BAR 0, length, notify multiplier)) as Linux's
/// virtio_pci_find_capability walks them.
fn virtio_caps(t: &mut VirtioPciTransport<Echo, Mem>) -> Vec<(u8, u32, u32, u32)> {
    let mut caps = Vec::new();
    let mut at = cfg_read(t, 0x34, 1) as u64;
    let mut seen = 0;
    while at != 0 {
        seen += 1;
        assert!(seen < 48, "capability list loops");
        let id = cfg_read(t, at, 1);
        if id == 0x09 {
            let cfg_type = cfg_read(t, at + 3, 1) as u8;
            let mult = if cfg_type == 2 {
                cfg_read(t, at + 16, 4)
            } else {
                0
            };
            caps.push((
                cfg_type,
                cfg_read(t, at + 8, 4),
                cfg_read(t, at + 12, 4),
                mult,
            ));
        }
        at = u64::from(cfg_read(t, at + 1, 1));
    }
    caps
}

#[test]
fn pci_header_identifies_a_modern_virtio_device() {
    let (mut t, _) = transport();
    assert_eq!(cfg_read(&mut t, 0, 2), 0x1af4);
    assert_eq!(cfg_read(&mut t, 2, 2), 0x1040 + 4);
    assert_eq!(cfg_read(&mut t, 8, 1), 1, "revision 1: modern only");
    assert!(cfg_read(&mut t, 0x2e, 2) >= 0x40, "subsystem ID >= 0x40");
    assert_ne!(cfg_read(&mut t, 6, 2) & 0x10, 0, "capability list");
    let caps = virtio_caps(&mut t);
    let types: Vec<u8> = caps.iter().map(|c| c.0).collect();
    assert_eq!(
        types,
        vec![1, 3, 4, 2, 5],
        "common, ISR, device, notify, PCI_CFG"
    );
    assert_eq!(caps[0].2, 0x38, "common cfg length");
    assert_eq!(caps[3].3, 4, "notify_off_multiplier");
    assert_eq!(caps[3].2, 8, "two queues × 4 bytes");
}

#[test]
fn bar0_sizing_reads_back_its_size_and_keeps_the_address() {
    let (mut t, _) = transport();
    t.write_config_space(0x10, &0xffff_ffffu32.to_le_bytes());
    t.write_config_space(0x14, &0xffff_ffffu32.to_le_bytes());
    let lo = cfg_read(&mut t, 0x10, 4);
    assert_eq!(lo & 0x7, 0x4, "64-bit memory BAR");
    assert_eq!(!(lo & !0xf) + 1, BAR0_SIZE as u32);
    t.write_config_space(0x10, &0xfe00_0000u32.to_le_bytes());
    t.write_config_space(0x14, &1u32.to_le_bytes());
    assert_eq!(t.bar0_address(), 0x1_fe00_0000);
}

#[test]
fn linux_modern_init_queue_kick_interrupt_and_reset() {
    let (mut t, irqs) = transport();
    bar_write(&mut t, 0x14, 1 | 2, 1); // ACKNOWLEDGE | DRIVER
    bar_write(&mut t, 0x00, 0, 4);
    let lo = bar_read(&mut t, 0x04, 4);
    bar_write(&mut t, 0x00, 1, 4);
    let hi = bar_read(&mut t, 0x04, 4);
    let offered = lo | (hi << 32);
    assert_eq!(offered, t.device().device_features());
    let want = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM);
    bar_write(&mut t, 0x08, 0, 4);
    bar_write(&mut t, 0x0c, want & 0xffff_ffff, 4);
    bar_write(&mut t, 0x08, 1, 4);
    bar_write(&mut t, 0x0c, want >> 32, 4);
    bar_write(&mut t, 0x14, 1 | 2 | 8, 1);
    assert_eq!(bar_read(&mut t, 0x14, 1), 1 | 2 | 8, "FEATURES_OK accepted");
    assert_eq!(t.device().acked, want);
    assert_eq!(bar_read(&mut t, 0x12, 2), 2, "num_queues");

    // Queue 0 of 16 entries, rings packed from 0x1_0000.
    let mem = t.memory().clone();
    let mut ring = SplitRing::new(mem.clone(), RingLayout::packed(0x1_0000, 16), 16);
    let l = ring.layout();
    bar_write(&mut t, 0x10, 0, 2); // config vector 0
    bar_write(&mut t, 0x16, 0, 2);
    assert_eq!(bar_read(&mut t, 0x18, 2), 16);
    bar_write(&mut t, 0x1a, 1, 2); // queue vector 1
    assert_eq!(bar_read(&mut t, 0x1a, 2), 1);
    bar_write(&mut t, 0x20, l.desc, 8);
    bar_write(&mut t, 0x28, l.avail, 8);
    bar_write(&mut t, 0x30, l.used, 8);
    bar_write(&mut t, 0x1c, 1, 2);
    bar_write(&mut t, 0x14, 1 | 2 | 8 | 4, 1);
    assert_eq!(t.status(), 1 | 2 | 8 | 4);

    mem.write_slice(b"olleh", GuestAddress(0x8_0000)).unwrap();
    ring.post(&[r(0x8_0000, 5), w(0x9_0000, 16)]);
    bar_write(&mut t, 0x3000, 0, 2); // notify queue 0 (queue_notify_off 0 × 4)
    let mut out = [0u8; 5];
    mem.read_slice(&mut out, GuestAddress(0x9_0000)).unwrap();
    assert_eq!(&out, b"hello");
    assert_eq!(irqs.vectors(), vec![1], "queue vector signalled");
    assert_eq!(
        bar_read(&mut t, 0x1000, 1),
        1,
        "ISR queue bit, cleared by the read"
    );
    assert_eq!(bar_read(&mut t, 0x1000, 1), 0);

    // Device config through BAR 0 and through the PCI_CFG window.
    bar_write(&mut t, 0x2000, 0xabcd, 2);
    assert_eq!(bar_read(&mut t, 0x2000, 2), 0xabcd);
    let pci_cfg = 0x84;
    t.write_config_space(pci_cfg + 8, &0x2000u32.to_le_bytes());
    t.write_config_space(pci_cfg + 12, &2u32.to_le_bytes());
    assert_eq!(cfg_read(&mut t, pci_cfg + 16, 2), 0xabcd);

    bar_write(&mut t, 0x14, 0, 1);
    assert_eq!(t.status(), 0);
    assert_eq!(t.device().resets, 1);
    assert_eq!(bar_read(&mut t, 0x1c, 2), 0, "queue disabled by reset");
    assert_eq!(bar_read(&mut t, 0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
}

#[test]
fn features_ok_is_refused_without_required_or_with_unoffered_features() {
    for want in [
        1u64 << VIRTIO_F_VERSION_1, // no ACCESS_PLATFORM
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM) | (1 << 7), // unoffered
        1 << VIRTIO_F_ACCESS_PLATFORM, // no VERSION_1
    ] {
        let (mut t, _) = transport();
        bar_write(&mut t, 0x14, 3, 1);
        bar_write(&mut t, 0x08, 0, 4);
        bar_write(&mut t, 0x0c, want & 0xffff_ffff, 4);
        bar_write(&mut t, 0x08, 1, 4);
        bar_write(&mut t, 0x0c, want >> 32, 4);
        bar_write(&mut t, 0x14, 3 | 8, 1);
        assert_eq!(
            bar_read(&mut t, 0x14, 1),
            3,
            "{want:#x}: FEATURES_OK stays clear"
        );
        bar_write(&mut t, 0x14, 3 | 8 | 4, 1);
        assert_eq!(
            t.status() & 4,
            0,
            "{want:#x}: no DRIVER_OK without FEATURES_OK"
        );
    }
}

#[test]
fn bad_vectors_sizes_and_queue_addresses_are_refused() {
    let (mut t, irqs) = transport();
    bar_write(&mut t, 0x16, 0, 2);
    bar_write(&mut t, 0x1a, 3, 2);
    assert_eq!(
        bar_read(&mut t, 0x1a, 2),
        u64::from(VIRTIO_MSI_NO_VECTOR),
        "only vectors 0..3 exist"
    );
    bar_write(&mut t, 0x18, 12, 2);
    assert_eq!(bar_read(&mut t, 0x18, 2), 16, "12 is not a power of two");
    bar_write(&mut t, 0x18, 32, 2);
    assert_eq!(bar_read(&mut t, 0x18, 2), 16, "above the maximum");
    bar_write(&mut t, 0x16, 9, 2);
    assert_eq!(bar_read(&mut t, 0x18, 2), 0, "no queue 9: size 0");
    // A ring outside guest memory: DRIVER_OK turns into DEVICE_NEEDS_RESET.
    let (mut t2, irqs2) = transport();
    let want = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM);
    bar_write(&mut t2, 0x14, 3, 1);
    bar_write(&mut t2, 0x08, 1, 4);
    bar_write(&mut t2, 0x0c, want >> 32, 4);
    bar_write(&mut t2, 0x14, 3 | 8, 1);
    bar_write(&mut t2, 0x10, 0, 2);
    bar_write(&mut t2, 0x20, 0x10_0000_0000, 8);
    bar_write(&mut t2, 0x1c, 1, 2);
    bar_write(&mut t2, 0x14, 3 | 8 | 4, 1);
    assert_eq!(t2.status() & 0x44, 0x40, "NEEDS_RESET, not DRIVER_OK");
    assert_eq!(irqs2.vectors(), vec![0], "config vector signalled");
    assert!(irqs.vectors().is_empty());
}

#[test]
fn hostile_accesses_never_panic() {
    let (mut t, _) = transport();
    for off in [
        0u64,
        0x37,
        0x38,
        0xfff,
        0x1000,
        0x2007,
        0x2008,
        0x3000,
        0x3008,
        0x7fff,
        u64::MAX - 2,
    ] {
        for len in [1usize, 2, 3, 4, 8] {
            let mut b = [0xffu8; 8];
            t.read_bar(off, &mut b[..len]);
            t.write_bar(off, &b[..len]);
            t.read_config_space(off, &mut b[..len]);
            t.write_config_space(off, &b[..len]);
        }
    }
}

/// A transport whose driver negotiated `features` (ACCESS_PLATFORM and VERSION_1 added)
/// and set up queue 0 (16 entries, vector 1) on the rings above, DRIVER_OK; and the
/// driver's side of that queue.
fn live(features: u64) -> (VirtioPciTransport<Echo, Mem>, Arc<Irqs>, SplitRing<Mem>) {
    let (mut t, irqs) = transport();
    let want = features | (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM);
    assert!(pci::negotiate(&mut t, Some(want)).features_ok);
    assert_eq!(t.device().acked, want, "features accepted");
    let layout = RingLayout {
        desc: DESC,
        avail: AVAIL,
        used: USED,
    };
    pci::setup_queue(
        &mut t,
        &QueueSetup {
            index: 0,
            size: None,
            vector: 1,
            layout,
        },
    );
    pci::driver_ok(&mut t);
    assert_eq!(t.status(), 1 | 2 | 8 | 4);
    let ring = SplitRing::new(t.memory().clone(), layout, QSIZE)
        .with_event_idx(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
    (t, irqs, ring)
}

/// Publishes one echo request (readable "abc", then a writable buffer) without
/// notifying.
fn publish(ring: &mut SplitRing<Mem>) {
    ring.memory()
        .write_slice(b"abc", GuestAddress(0x8_0000))
        .unwrap();
    ring.post(&[r(0x8_0000, 3), w(0x9_0000, 16)]);
}

/// The rings of [`live`]'s queue 0 (16 entries), laid out apart so that EVENT_IDX's
/// fields (§2.7.10: `used_event` after the avail ring, `avail_event` after the used
/// ring) are nobody else's bytes.
const QSIZE: u16 = 16;
const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x1_1000;
const USED: u64 = 0x1_2000;

#[test]
fn no_msi_when_the_driver_set_no_interrupt_without_event_idx() {
    // §2.7.7.2: the device SHOULD NOT notify when VRING_AVAIL_F_NO_INTERRUPT is set, as
    // Linux's virtio-iommu driver sets it on its request queue (it has no callback).
    let (mut t, irqs, mut ring) = live(0);
    ring.set_avail_flags(NO_INTERRUPT);
    publish(&mut ring);
    bar_write(&mut t, 0x3000, 0, 2);
    assert_eq!(ring.used_idx(), 1, "the request is served");
    assert!(irqs.vectors().is_empty(), "but no MSI is sent");
    let c = t.counters();
    assert_eq!(
        (c.notifications, c.interrupts, c.suppressed_interrupts),
        (1, 0, 1)
    );
    // The driver asks again: the next completion interrupts.
    ring.set_avail_flags(0);
    publish(&mut ring);
    bar_write(&mut t, 0x3000, 0, 2);
    assert_eq!(irqs.vectors(), vec![1]);
    assert_eq!(t.counters().interrupts, 1);
}

#[test]
fn with_event_idx_msis_follow_used_event_and_avail_event_follows_the_device() {
    let (mut t, irqs, mut ring) = live(1 << VIRTIO_RING_F_EVENT_IDX);
    // The driver wants an interrupt only once the used index passes 2 (used_event 2).
    ring.set_used_event(2);
    for served in 1..=3u16 {
        publish(&mut ring);
        bar_write(&mut t, 0x3000, 0, 2);
        assert_eq!(ring.used_idx(), served);
        // §2.7.10: the device keeps avail_event where it stopped, so the driver's next
        // publication notifies; without it the driver would never notify again.
        assert_eq!(ring.avail_event(), served);
    }
    assert_eq!(irqs.vectors(), vec![1], "one MSI, when used passed 2");
}

#[test]
fn a_queue_the_poller_does_not_poll_keeps_avail_event_current_while_others_poll() {
    // A vhost-user device with implicit grants drains its queue on notifications and
    // calls only. Were avail_event left behind because *other* queues are polled, the
    // driver (EVENT_IDX, §2.7.10) would stop notifying and its requests would wait
    // forever.
    let (mut t, _irqs, mut ring) = live(1 << VIRTIO_RING_F_EVENT_IDX);
    t.device_mut().unpolled = true;
    assert!(!t.set_polling(true));
    for served in 1..=3u16 {
        publish(&mut ring);
        bar_write(&mut t, 0x3000, 0, 2);
        assert_eq!(ring.used_idx(), served);
        assert_eq!(ring.avail_event(), served, "the next publication notifies");
    }
}

#[test]
fn polling_serves_published_buffers_without_a_notification() {
    for features in [0, 1 << VIRTIO_RING_F_EVENT_IDX] {
        let (mut t, _irqs, mut ring) = live(features);
        assert!(
            !t.poll(),
            "{features:#x}: nothing published, nothing served"
        );
        assert!(!t.set_polling(true));
        if features == 0 {
            assert_eq!(ring.used_flags(), NO_NOTIFY, "notifications off");
        }
        publish(&mut ring);
        assert!(t.poll(), "{features:#x}: the poll found the request");
        assert_eq!(ring.used_idx(), 1);
        let c = t.counters();
        assert_eq!((c.notifications, c.polled), (0, 1), "{features:#x}");
        // Switching polling off with nothing new: notifications on, nothing pending.
        assert!(!t.set_polling(false));
        assert_eq!(ring.used_flags(), 0);
        if features != 0 {
            assert_eq!(ring.avail_event(), 1, "the next publication notifies");
        }
    }
}

#[test]
fn switching_polling_off_reports_buffers_published_meanwhile() {
    // The race of a poller going to sleep: the driver published while it still saw
    // notifications off, so it will not notify. set_polling(false) must say so.
    for features in [0, 1 << VIRTIO_RING_F_EVENT_IDX] {
        let (mut t, _irqs, mut ring) = live(features);
        t.set_polling(true);
        publish(&mut ring);
        assert!(
            t.set_polling(false),
            "{features:#x}: the published request is reported"
        );
        assert!(t.poll());
        assert_eq!(ring.used_idx(), 1);
    }
}

#[test]
fn a_queue_served_for_the_devices_own_reason_is_not_counted_as_a_doorbell() {
    // A request the virtio-iommu parked for a back-end's ack completes when the ack
    // is in; the benchmark's doorbell counts must not include that.
    let (mut t, _irqs, mut ring) = live(0);
    publish(&mut ring);
    t.serve(0);
    assert_eq!(ring.used_idx(), 1, "served");
    assert_eq!(t.counters().notifications, 0);
    publish(&mut ring);
    bar_write(&mut t, 0x3000, 0, 2);
    assert_eq!(ring.used_idx(), 2);
    assert_eq!(t.counters().notifications, 1, "the driver's doorbell");
}

#[test]
fn polling_a_device_that_is_not_running_does_nothing() {
    let (mut t, _irqs) = transport();
    assert!(!t.poll());
    assert!(!t.set_polling(true));
    assert!(!t.set_polling(false));
    assert_eq!(t.counters(), TransportCounters::default());
}
