//! The vhost-user front-end against a scripted back-end on a unix socket: the messages
//! it sends, how it answers the back-end's IOTLB misses through the virtio-iommu, strict
//! invalidation on UNMAP, the deadline, and a back-end that goes away.

#![allow(clippy::unwrap_used)]

mod fake_backend;

use device_host::host::EndpointMemory;
use device_host::vhost_user::wire::{self, req};
use device_host::vhost_user::{DeviceKind, VhostUserDevice, UADDR_BASE};
use fake_backend::*;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use test_kit::pci::channel_sink as irqs;
use test_kit::ring::{desc, F_NEXT, F_WRITE};
use test_kit::{RingLayout, SplitRing};
use virtio_contract::{ActiveQueue, VirtioDevice};
use virtio_iommu::fake_driver::FakeGuest;
use virtio_iommu::{
    DomainId, EndpointConfig, EndpointId, IommuConfig, Iova, Request, Status, VirtioIommu,
};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};
use zerocopy::{FromBytes, IntoBytes};

const EP: u32 = 8;
/// An endpoint served in process, beside the vhost-user one.
const EP2: u32 = 9;

#[test]
fn session_start_activation_notify_call_and_reset_send_the_spec_messages() {
    let be = FakeBackend::start(
        "seq",
        F_VERSION_1 | F_PROTOCOL | (1 << 9) | (1 << 12),
        P_ALL,
        AckMode::Now,
        None,
    );
    let (irq, vectors) = irqs();
    let mut dev =
        VhostUserDevice::connect(&be.path, DeviceKind::Block, Duration::from_secs(1), irq).unwrap();
    assert_eq!(
        be.requests(),
        [
            req::SET_OWNER,
            req::GET_FEATURES,
            req::GET_PROTOCOL_FEATURES,
            req::SET_PROTOCOL_FEATURES,
            req::SET_BACKEND_REQ_FD,
            req::GET_CONFIG
        ]
    );
    let d: &mut dyn VirtioDevice<GuestMemoryMmap> = &mut dev;
    // MQ (12) is not passed on: the function has one queue.
    assert_eq!(d.device_features(), F_VERSION_1 | (1 << 9));
    let mut cfg = [0u8; 4];
    d.read_config(20, &mut cfg);
    assert_eq!(
        cfg,
        [32, 33, 34, 35],
        "the back-end's configuration bytes 20..24"
    );

    let mem = guest_ram("seq");
    d.set_acked_features(F_VERSION_1);
    let q = ready_queue_at(0x4000);
    d.activate(
        &[ActiveQueue {
            index: 0,
            queue: &q,
            vector: 3,
        }],
        &mem,
    )
    .unwrap();
    let log = be.seen.lock().unwrap().log.clone();
    let codes: Vec<u32> = log.iter().skip(6).map(|m| m.0).collect();
    assert_eq!(
        codes,
        [
            req::SET_FEATURES,
            req::SET_MEM_TABLE,
            req::SET_VRING_NUM,
            req::SET_VRING_BASE,
            req::SET_VRING_ADDR,
            req::SET_VRING_CALL,
            req::SET_VRING_KICK,
            req::SET_VRING_ENABLE
        ]
    );
    assert_eq!(
        u64::read_from_bytes(&log[6].1).unwrap(),
        F_VERSION_1 | F_PROTOCOL
    );
    let (head, regions) = wire::MemoryHeader::read_from_prefix(&log[7].1).unwrap();
    assert_eq!(head.nregions, 1);
    let r = wire::MemoryRegion::read_from_bytes(regions).unwrap();
    assert_eq!(
        (
            r.guest_phys_addr,
            r.memory_size,
            r.userspace_addr,
            r.mmap_offset
        ),
        (0, RAM, UADDR_BASE, 0)
    );
    assert_eq!(
        be.seen
            .lock()
            .unwrap()
            .files
            .iter()
            .find(|f| f.0 == req::SET_MEM_TABLE)
            .unwrap()
            .1
            .len(),
        1
    );
    let addr = wire::VringAddr::read_from_bytes(&log[10].1).unwrap();
    // Without the IOMMU, ring addresses are front-end addresses.
    assert_eq!(
        (addr.desc, addr.avail, addr.used),
        (
            UADDR_BASE + 0x4000,
            UADDR_BASE + 0x5000,
            UADDR_BASE + 0x6000
        )
    );

    let kick = be.file(req::SET_VRING_KICK);
    let call = be.file(req::SET_VRING_CALL);
    let _ = read_eventfd(&kick); // the kick made at activation
    let mut q = q;
    assert!(matches!(d.process_queue(0, &mut q, &mem), Ok(false)));
    assert_eq!(read_eventfd(&kick), Some(1), "a notify is one kick");
    (&call).write_all(&1u64.to_ne_bytes()).unwrap();
    assert_eq!(
        vectors.recv_timeout(Duration::from_secs(2)),
        Ok(3),
        "a call is the queue's vector"
    );

    d.reset();
    let codes: Vec<u32> = be.requests().into_iter().skip(14).collect();
    assert_eq!(codes, [req::SET_VRING_ENABLE, req::GET_VRING_BASE]);
}

#[test]
fn malformed_reply_at_session_start_fails_connect() {
    // A back-end whose GET_FEATURES reply carries 4 bytes instead of 8.
    let dir = tempdir("short");
    let path = dir.join("b.sock");
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        while let Some(m) = recv_msg(&c) {
            if m.request == req::GET_FEATURES {
                send_reply(&c, m.request, &[1, 2, 3, 4]);
            }
        }
    });
    let (irq, _) = irqs();
    let e = VhostUserDevice::connect(&path, DeviceKind::Rng, Duration::from_millis(500), irq)
        .unwrap_err();
    assert!(e.to_string().contains("4 payload bytes, 8 expected"), "{e}");
}

#[test]
fn refused_activation_changes_nothing_and_keeps_the_connection() {
    let be = FakeBackend::start(
        "refuse",
        F_VERSION_1 | F_PROTOCOL,
        P_ALL,
        AckMode::Now,
        Some(req::SET_MEM_TABLE),
    );
    let (irq, _) = irqs();
    let mut dev =
        VhostUserDevice::connect(&be.path, DeviceKind::Rng, Duration::from_secs(1), irq).unwrap();
    let d: &mut dyn VirtioDevice<GuestMemoryMmap> = &mut dev;
    let mem = guest_ram("refuse");
    d.set_acked_features(F_VERSION_1);
    let mut q = ready_queue_at(0x4000);
    let e = d
        .activate(
            &[ActiveQueue {
                index: 0,
                queue: &q,
                vector: 1,
            }],
            &mem,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("refused request 5"), "{e}");
    assert!(
        !dev.handle().is_broken(),
        "a refusal is an answer: the link stays up"
    );
    let d: &mut dyn VirtioDevice<GuestMemoryMmap> = &mut dev;
    let before = be.requests().len();
    assert!(matches!(d.process_queue(0, &mut q, &mem), Ok(false)));
    assert_eq!(be.requests().len(), before, "no vring was started");
}

#[test]
fn backend_messages_of_unknown_type_or_malformed_are_answered_with_an_error() {
    let be = FakeBackend::start(
        "badreq",
        F_VERSION_1 | F_PROTOCOL,
        P_ALL,
        AckMode::Now,
        None,
    );
    let (irq, _) = irqs();
    let dev =
        VhostUserDevice::connect(&be.path, DeviceKind::Rng, Duration::from_secs(1), irq).unwrap();
    assert_ne!(be.backend_request(99, &[0; 8]), 0, "unknown request");
    assert_ne!(
        be.backend_request(wire::backend_req::IOTLB_MSG, &[0; 16]),
        0,
        "short IOTLB message"
    );
    let update = wire::IotlbMsg {
        kind: wire::iotlb::UPDATE,
        ..Default::default()
    };
    assert_ne!(
        be.backend_request(wire::backend_req::IOTLB_MSG, update.as_bytes()),
        0,
        "UPDATE is not the back-end's to send"
    );
    // A miss before the device is behind an IOMMU and started: refused.
    assert_ne!(be.miss(0x1000, wire::iotlb::PERM_RO), 0);
    let c = dev.handle().counters();
    assert_eq!((c.bad_messages, c.updates), (3, 0));
    assert!(be.iotlb().is_empty(), "nothing sent in answer");
    assert!(!dev.handle().is_broken());
}

struct IommuRig {
    iommu: VirtioIommu,
    guest: FakeGuest,
    dev: VhostUserDevice,
    mem: EndpointMemory,
    queue: Queue,
    /// The queues' interrupts.
    vectors: mpsc::Receiver<u16>,
}

/// A back-end behind the IOMMU (ACCESS_PLATFORM, every protocol feature) that acks
/// INVALIDATEs as `ack` says.
fn iotlb_backend(tag: &str, ack: AckMode) -> FakeBackend {
    FakeBackend::start(
        tag,
        F_VERSION_1 | F_PROTOCOL | F_ACCESS_PLATFORM,
        P_ALL,
        ack,
        None,
    )
}

impl IommuRig {
    fn new(be: &FakeBackend, timeout: Duration) -> Self {
        Self::with_kind(be, timeout, DeviceKind::Rng)
    }

    fn with_kind(be: &FakeBackend, timeout: Duration, kind: DeviceKind) -> Self {
        let config = IommuConfig {
            boot_bypass: false,
            endpoints: vec![EndpointConfig::new(EP), EndpointConfig::new(EP2)],
            ..IommuConfig::default()
        };
        let mut iommu = VirtioIommu::new(&config).unwrap();
        let mut guest = FakeGuest::new(iommu.config().probe_size.get());
        guest.negotiate(&mut iommu);
        let ep = iommu.endpoint_iommu(EndpointId(EP)).unwrap();
        let (irq, vectors) = irqs();
        let mut dev = VhostUserDevice::connect(&be.path, kind, timeout, irq).unwrap();
        dev.attach_iommu(ep.clone()).unwrap();
        let mem = IommuMemory::new(guest_ram("iommu"), ep, true, ());
        let queue = ready_queue_at(RING);
        let mut rig = Self {
            iommu,
            guest,
            dev,
            mem,
            queue,
            vectors,
        };
        let d: &mut dyn VirtioDevice<EndpointMemory> = &mut rig.dev;
        assert_eq!(d.device_features() & F_ACCESS_PLATFORM, F_ACCESS_PLATFORM);
        d.set_acked_features(F_VERSION_1 | F_ACCESS_PLATFORM);
        d.activate(
            &[ActiveQueue {
                index: 0,
                queue: &rig.queue,
                vector: 1,
            }],
            &rig.mem,
        )
        .unwrap();
        let addr = be
            .seen
            .lock()
            .unwrap()
            .log
            .iter()
            .find(|m| m.0 == req::SET_VRING_ADDR)
            .map(|m| wire::VringAddr::read_from_bytes(&m.1).unwrap())
            .unwrap();
        assert_eq!(
            addr.desc, 0x8_0000,
            "behind the IOMMU, ring addresses are IOVAs"
        );
        assert_eq!(
            rig.send(Request::Attach {
                domain: DomainId(1),
                endpoint: EndpointId(EP),
                flags: 0,
                reserved_nonzero: false
            }),
            Status::Ok
        );
        rig
    }

    fn send(&mut self, r: Request) -> Status {
        self.guest.send(&mut self.iommu, &r)
    }

    fn map(&mut self, start: u64, end: u64, phys: u64, flags: u32) {
        let r = Request::Map {
            domain: DomainId(1),
            virt_start: Iova(start),
            virt_end: Iova(end),
            phys_start: phys,
            flags,
        };
        assert_eq!(self.send(r), Status::Ok);
    }

    fn unmap(&mut self, start: u64, end: u64) -> Status {
        self.send(Request::Unmap {
            domain: DomainId(1),
            virt_start: Iova(start),
            virt_end: Iova(end),
            reserved_nonzero: false,
        })
    }

    fn notify(&mut self) -> Result<bool, virtio_contract::DeviceError> {
        let d: &mut dyn VirtioDevice<EndpointMemory> = &mut self.dev;
        d.process_queue(0, &mut self.queue, &self.mem)
    }
}

#[test]
fn a_map_is_pushed_and_a_miss_still_gets_the_window_or_a_refusal_and_a_fault() {
    let be = iotlb_backend("miss", AckMode::Now);
    let mut rig = IommuRig::new(&be, Duration::from_secs(1));
    rig.map(0x10000, 0x1ffff, 0x40000, 1); // read-only
    assert_eq!(
        rig.dev.handle().counters().pushed,
        1,
        "with nothing queued, the thread that applied the MAP sent its UPDATE"
    );
    let window = wire::IotlbMsg {
        iova: 0x10000,
        size: 0x10000,
        uaddr: UADDR_BASE + 0x40000,
        perm: wire::iotlb::PERM_RO,
        kind: wire::iotlb::UPDATE,
        padding: [0; 6],
    };
    assert_eq!(
        be.wait_iotlb(1),
        [window],
        "the MAP is pushed, no miss needed"
    );
    // A miss (a push the back-end has not read yet) gets the same window.
    assert_eq!(be.miss(0x10800, wire::iotlb::PERM_RO), 0);
    assert_eq!(be.iotlb(), [window, window]);
    // A write to a read-only mapping, and an IOVA never mapped: refused, faulted.
    assert_ne!(be.miss(0x10800, wire::iotlb::PERM_WO), 0);
    assert_ne!(be.miss(0x30000, wire::iotlb::PERM_RO), 0);
    assert_eq!(be.iotlb().len(), 2, "no UPDATE for a refused miss");
    assert_eq!(rig.iommu.counters().faults_raised, 2);
    assert_eq!(
        rig.iommu.pending_faults(),
        2,
        "both reach the guest's eventq"
    );
    // A mapping that runs past guest RAM is clipped to the memory-table region.
    rig.map(0x100000, 0x1fffff, RAM - 0x1000, 3);
    let w = be.wait_iotlb(3)[2];
    assert_eq!(
        (w.kind, w.iova, w.size, w.uaddr, w.perm),
        (
            wire::iotlb::UPDATE,
            0x100000,
            0x1000,
            UADDR_BASE + RAM - 0x1000,
            wire::iotlb::PERM_RW
        )
    );
    let h = rig.dev.handle();
    eventually("two pushes counted", || h.counters().pushed == 2);
    let c = h.counters();
    assert_eq!((c.misses, c.updates, c.refused), (3, 1, 2));
}

#[test]
fn strict_unmap_completes_only_after_the_backend_acknowledged_the_invalidate() {
    let delay = Duration::from_millis(200);
    let be = iotlb_backend("strict", AckMode::After(delay));
    let mut rig = IommuRig::new(&be, Duration::from_secs(2));
    rig.map(0x10000, 0x1ffff, 0x40000, 3);
    be.wait_iotlb(1);
    // The back-end never held 0x50000: its UNMAP needs no INVALIDATE.
    let t = Instant::now();
    assert_eq!(rig.unmap(0x50000, 0x5ffff), Status::Ok);
    assert!(t.elapsed() < delay);
    assert_eq!(be.iotlb().len(), 1);
    assert!(!be.invalidate_acked.load(Ordering::SeqCst));
    assert_eq!(rig.unmap(0x10000, 0x1ffff), Status::Ok);
    assert!(
        be.invalidate_acked.load(Ordering::SeqCst),
        "the guest saw S_OK before the back-end acked"
    );
    let inv = be.iotlb()[1];
    assert_eq!(
        (inv.kind, inv.iova, inv.size),
        (wire::iotlb::INVALIDATE, 0x10000, 0x10000)
    );
    assert_eq!(rig.dev.handle().counters().invalidates, 1);
    // The window is gone: a new miss there is refused.
    assert_ne!(be.miss(0x10000, wire::iotlb::PERM_RW), 0);
}

#[test]
fn a_backend_slow_to_ack_delays_only_its_own_unmap_never_another_endpoint() {
    let delay = Duration::from_millis(500);
    let be = iotlb_backend("slow", AckMode::After(delay));
    let mut rig = IommuRig::new(&be, Duration::from_secs(3));
    let (tx, woken) = mpsc::channel();
    rig.iommu.set_requestq_notifier(Arc::new(move || {
        let _ = tx.send(());
    }));
    rig.map(0x10000, 0x1ffff, 0x40000, 3);
    be.wait_iotlb(1);
    let other_ep = EndpointId(EP2);
    assert_eq!(
        rig.send(Request::Attach {
            domain: DomainId(2),
            endpoint: other_ep,
            flags: 0,
            reserved_nonzero: false
        }),
        Status::Ok
    );
    let other = IommuMemory::new(
        guest_ram("other"),
        rig.iommu.endpoint_iommu(other_ep).unwrap(),
        true,
        (),
    );
    let map2 = |start: u64, phys: u64| Request::Map {
        domain: DomainId(2),
        virt_start: Iova(start),
        virt_end: Iova(start + 0xfff),
        phys_start: phys,
        flags: 3,
    };
    let reqs = [
        Request::Unmap {
            domain: DomainId(1),
            virt_start: Iova(0x10000),
            virt_end: Iova(0x1ffff),
            reserved_nonzero: false,
        },
        map2(0, 0x60000),
        Request::Unmap {
            domain: DomainId(2),
            virt_start: Iova(0),
            virt_end: Iova(0xfff),
            reserved_nonzero: false,
        },
        map2(0x1000, 0x61000),
    ];
    let batch = rig.guest.prepare(&reqs);
    rig.guest.post(&batch);
    let t = Instant::now();
    rig.iommu
        .process_requestq(&mut rig.guest.requestq, &rig.guest.mem)
        .unwrap();
    assert_eq!(
        rig.guest.reap(),
        3,
        "the other endpoint's requests complete at once"
    );
    // The other endpoint translates and moves data while the ack is outstanding.
    other
        .write_obj(0xabcd_u32, GuestAddress(0x1010))
        .expect("EP2's new mapping is usable");
    assert!(other.read_obj::<u32>(GuestAddress(0x10)).is_err());
    assert!(
        t.elapsed() < delay / 2,
        "another endpoint waited {:?}",
        t.elapsed()
    );
    assert!(!be.invalidate_acked.load(Ordering::SeqCst));

    woken
        .recv_timeout(Duration::from_secs(5))
        .expect("the ack wakes the request queue");
    assert!(be.invalidate_acked.load(Ordering::SeqCst));
    assert!(t.elapsed() >= delay, "settled after {:?}", t.elapsed());
    rig.iommu
        .process_requestq(&mut rig.guest.requestq, &rig.guest.mem)
        .unwrap();
    assert_eq!(
        rig.guest.reap(),
        1,
        "the held UNMAP completes after its ack"
    );
    assert_eq!(
        rig.guest.batch_statuses(&batch, &reqs),
        vec![Some(Status::Ok); 4]
    );
    assert_eq!(rig.iommu.counters().deferred, 1);
}

#[test]
fn unmaps_queued_behind_an_ack_are_sent_back_to_back_and_each_completes_after_its_own() {
    let delay = Duration::from_millis(100);
    let be = iotlb_backend("pipelined", AckMode::After(delay));
    let mut rig = IommuRig::new(&be, Duration::from_secs(3));
    let windows = [0x10000, 0x20000, 0x30000, 0x40000];
    for (i, &w) in windows.iter().enumerate() {
        rig.map(w, w + 0xfff, 0x40000 + (i as u64) * 0x1000, 3);
    }
    be.wait_iotlb(windows.len());
    let (tx, woken) = mpsc::channel();
    rig.iommu.set_requestq_notifier(Arc::new(move || {
        let _ = tx.send(());
    }));
    let reqs: Vec<Request> = windows
        .iter()
        .map(|&w| Request::Unmap {
            domain: DomainId(1),
            virt_start: Iova(w),
            virt_end: Iova(w + 0xfff),
            reserved_nonzero: false,
        })
        .collect();
    let batch = rig.guest.prepare(&reqs);
    rig.guest.post(&batch);
    rig.iommu
        .process_requestq(&mut rig.guest.requestq, &rig.guest.mem)
        .unwrap();
    assert_eq!(rig.guest.reap(), 0, "every UNMAP waits for its ack");
    let mut done = 0;
    while done < reqs.len() {
        woken
            .recv_timeout(Duration::from_secs(5))
            .expect("an ack wakes the request queue");
        rig.iommu
            .process_requestq(&mut rig.guest.requestq, &rig.guest.mem)
            .unwrap();
        done += rig.guest.reap();
    }
    assert_eq!(
        rig.guest.batch_statuses(&batch, &reqs),
        vec![Some(Status::Ok); 4]
    );
    // Those queued while the first ack was awaited went together: when the back-end
    // acked one of them, the INVALIDATEs after it were already on the socket, not
    // waiting for that ack. (How many went with the first depends on when the IOTLB
    // thread woke.)
    let msg = size_of::<wire::Header>() + size_of::<wire::IotlbMsg>();
    let queued = be.seen.lock().unwrap().queued_at_ack.clone();
    assert_eq!(queued.len(), 4);
    assert!(
        queued.iter().all(|q| q % msg == 0) && queued[3] == 0,
        "only whole INVALIDATEs wait: {queued:?}"
    );
    assert!(
        queued.iter().any(|&q| q >= msg),
        "each INVALIDATE waited for the previous ack: {queued:?}"
    );
    let c = rig.dev.handle().counters();
    assert_eq!((c.invalidates, c.invalidate_failures), (4, 0));
}

#[test]
fn a_backend_that_never_acks_hits_the_deadline_and_the_device_needs_reset() {
    let be = iotlb_backend("never", AckMode::Never);
    let timeout = Duration::from_millis(300);
    let mut rig = IommuRig::new(&be, timeout);
    let (tx, rx) = mpsc::channel();
    rig.dev.handle().set_on_broken(Box::new(move || {
        let _ = tx.send(());
    }));
    rig.map(0x10000, 0x1ffff, 0x40000, 3);
    assert_eq!(be.miss(0x10000, wire::iotlb::PERM_RW), 0);
    let t = Instant::now();
    assert_eq!(
        rig.unmap(0x10000, 0x1ffff),
        Status::Ok,
        "the UNMAP completes at the deadline"
    );
    assert!(
        t.elapsed() >= timeout && t.elapsed() < timeout * 5,
        "{:?}",
        t.elapsed()
    );
    assert!(rig.dev.handle().is_broken());
    assert_eq!(rig.dev.handle().counters().invalidate_failures, 1);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(2)),
        Ok(()),
        "the transport is told"
    );
    assert!(rig.notify().is_err(), "the guest's requests fail");
}

#[test]
fn a_backend_that_dies_marks_the_device_broken_and_a_reset_reconnects() {
    let be = iotlb_backend("dies", AckMode::Now);
    let mut rig = IommuRig::new(&be, Duration::from_secs(1));
    let (tx, rx) = mpsc::channel();
    rig.dev.handle().set_on_broken(Box::new(move || {
        let _ = tx.send(());
    }));
    rig.map(0x10000, 0x1ffff, 0x40000, 3);
    assert_eq!(be.miss(0x10000, wire::iotlb::PERM_RW), 0);
    be.die();
    assert_eq!(rx.recv_timeout(Duration::from_secs(2)), Ok(()));
    assert!(rig.dev.handle().is_broken());
    assert!(rig.notify().is_err());
    // The guest's UNMAP does not wait on a dead back-end.
    let t = Instant::now();
    assert_eq!(rig.unmap(0x10000, 0x1ffff), Status::Ok);
    assert!(t.elapsed() < Duration::from_millis(500));
    // A device reset connects again.
    let d: &mut dyn VirtioDevice<EndpointMemory> = &mut rig.dev;
    d.reset();
    assert!(!rig.dev.handle().is_broken());
    assert_eq!(be.connections.load(Ordering::SeqCst), 2);
    assert_eq!(rig.dev.handle().counters().reconnects, 1);
}

/// The split ring of [`ready_queue_at`]`(RING)`, as the guest driver writes it: through
/// guest-physical memory, at the IOVAs [`IommuRig::map`] maps one to one.
const RING: u64 = 0x8_0000;
const VIRTIO_BLK_S_IOERR: u8 = 1;

/// The guest driver's side of the ring in `ram`.
fn guest_ring(ram: &GuestMemoryMmap) -> SplitRing<GuestMemoryMmap> {
    SplitRing::new(ram.clone(), RingLayout::paged(RING), 256)
}

/// Makes the chain at `head` available at ring position `pos` and publishes `pos + 1`
/// as the available index, whatever the ring held before.
fn offer(g: &SplitRing<GuestMemoryMmap>, pos: u16, head: u16) {
    g.set_avail_entry(pos, head);
    g.set_avail_idx(pos.wrapping_add(1));
}

/// A virtio-blk read of one sector in descriptors `head..head + 3`: header, data,
/// status (§5.2.6), status 0xff. Returns where the status byte is.
fn blk_read(g: &SplitRing<GuestMemoryMmap>, head: u16, buf: u64) -> GuestAddress {
    let ram = g.memory();
    ram.write_slice(&test_kit::blk::header(0, 0), GuestAddress(buf))
        .unwrap(); // VIRTIO_BLK_T_IN
    g.write_desc(head, desc(buf, 16, F_NEXT, head + 1));
    g.write_desc(head + 1, desc(buf + 0x100, 512, F_NEXT | F_WRITE, head + 2));
    g.write_desc(head + 2, desc(buf + 0x400, 1, F_WRITE, 0));
    let status = GuestAddress(buf + 0x400);
    ram.write_obj(0xffu8, status).unwrap();
    status
}

fn blk_rig(tag: &str) -> (FakeBackend, IommuRig) {
    let be = FakeBackend::start(
        tag,
        F_VERSION_1 | F_PROTOCOL | F_ACCESS_PLATFORM,
        P_ALL,
        AckMode::Now,
        None,
    );
    let mut rig = IommuRig::with_kind(&be, Duration::from_secs(1), DeviceKind::Block);
    // The rings and the request buffers, mapped one to one.
    rig.map(RING, RING + 0xffff, RING, 3);
    rig.map(0x9_0000, 0x9_ffff, 0x9_0000, 3);
    (be, rig)
}

#[test]
fn requests_a_dead_backend_took_complete_with_ioerr_and_a_used_entry() {
    let (be, mut rig) = blk_rig("ioerr");
    let ram = rig.mem.get_backend().clone();
    let g = guest_ring(&ram);
    // Two requests handed to the back-end (kicked), which it takes and never completes.
    let s0 = blk_read(&g, 0, 0x9_0000);
    let s1 = blk_read(&g, 3, 0x9_1000);
    offer(&g, 0, 0);
    offer(&g, 1, 3);
    assert!(matches!(rig.notify(), Ok(false)));
    assert_eq!(
        rig.dev.fail_pending(&rig.mem),
        0,
        "nothing is failed while the back-end is connected"
    );
    assert_eq!((g.used_idx(), ram.read_obj::<u8>(s0).unwrap()), (0, 0xff));

    let (tx, rx) = mpsc::channel();
    rig.dev.handle().set_on_broken(Box::new(move || {
        let _ = tx.send(());
    }));
    be.die();
    assert_eq!(rx.recv_timeout(Duration::from_secs(2)), Ok(()));
    // What the transport's on-broken hook runs (serve_vhost_user wires it).
    assert_eq!(rig.dev.fail_pending(&rig.mem), 2);
    assert_eq!(ram.read_obj::<u8>(s0).unwrap(), VIRTIO_BLK_S_IOERR);
    assert_eq!(ram.read_obj::<u8>(s1).unwrap(), VIRTIO_BLK_S_IOERR);
    assert_eq!(g.used_idx(), 2);
    assert_eq!((g.used_elem(0), g.used_elem(1)), ((0, 1), (3, 1)));
    assert_eq!(
        rig.vectors.recv_timeout(Duration::from_secs(2)),
        Ok(1),
        "the queue's interrupt"
    );
    assert_eq!(rig.dev.fail_pending(&rig.mem), 0, "each request once");

    // A request the guest queues afterwards fails at its notification.
    let s2 = blk_read(&g, 6, 0x9_2000);
    offer(&g, 2, 6);
    assert!(rig.notify().is_err());
    assert_eq!(ram.read_obj::<u8>(s2).unwrap(), VIRTIO_BLK_S_IOERR);
    assert_eq!((g.used_idx(), g.used_elem(2)), (3, (6, 1)));
    assert_eq!(rig.vectors.recv_timeout(Duration::from_secs(2)), Ok(1));
    assert_eq!(rig.dev.handle().counters().failed_requests, 3);

    // Until the guest resets the device, which reconnects and forgets the rings.
    let d: &mut dyn VirtioDevice<EndpointMemory> = &mut rig.dev;
    d.reset();
    assert!(!rig.dev.handle().is_broken());
    blk_read(&g, 9, 0x9_3000);
    offer(&g, 3, 9);
    assert_eq!(rig.dev.fail_pending(&rig.mem), 0);
    assert_eq!(g.used_idx(), 3);
}

#[test]
fn failing_pending_requests_is_bounded_on_a_hostile_ring() {
    let (be, rig) = blk_rig("hostile");
    let ram = rig.mem.get_backend().clone();
    let g = guest_ring(&ram);
    be.die();
    for _ in 0..200 {
        if rig.dev.handle().is_broken() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(rig.dev.handle().is_broken());
    // Indices claiming more outstanding chains than the ring holds: left alone.
    offer(&g, 299, 0);
    assert_eq!(rig.dev.fail_pending(&rig.mem), 0);
    assert_eq!(g.used_idx(), 0);
    // A chain whose descriptors loop, one whose status lies outside anything the guest
    // mapped (IOVA 0x50000), and a head out of range: the looping chain is walked as
    // far as the ring allows and completed, the unmapped status byte is not written
    // (length 0), and the out-of-range head ends the walk.
    g.write_desc(0, desc(0x9_0000, 16, F_NEXT, 1));
    g.write_desc(1, desc(0x9_0100, 16, F_NEXT | F_WRITE, 0));
    offer(&g, 0, 0);
    g.write_desc(5, desc(0x9_0000, 16, F_NEXT, 6));
    g.write_desc(6, desc(0x5_0000, 1, F_WRITE, 0));
    offer(&g, 1, 5);
    offer(&g, 2, 4000);
    assert_eq!(rig.dev.fail_pending(&rig.mem), 2);
    assert_eq!((g.used_elem(0), g.used_elem(1)), ((0, 1), (5, 0)));
    assert_eq!(
        ram.read_obj::<u8>(GuestAddress(0x9_010f)).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(g.used_idx(), 2);
    // A used index beyond the available index (a dead back-end's last write): nothing.
    g.set_used_idx(40);
    assert_eq!(rig.dev.fail_pending(&rig.mem), 0);
}

#[test]
fn without_reply_ack_activation_waits_for_a_reply_before_the_first_kick() {
    // vhost-user-backend consumes a kick of a ring it has not enabled yet; a back-end
    // without REPLY_ACK (vhost-device-rng) answers nothing during activation, so the
    // front-end sends a request with a reply, answered in order, before it kicks.
    let be = FakeBackend::start(
        "barrier",
        F_VERSION_1 | F_PROTOCOL,
        P_ALL & !(1 << 3),
        AckMode::Now,
        None,
    );
    let (irq, _vectors) = irqs();
    let mut dev =
        VhostUserDevice::connect(&be.path, DeviceKind::Rng, Duration::from_secs(1), irq).unwrap();
    let mem = guest_ram("barrier");
    let q = ready_queue_at(0x4000);
    let d: &mut dyn VirtioDevice<GuestMemoryMmap> = &mut dev;
    d.set_acked_features(F_VERSION_1);
    d.activate(
        &[ActiveQueue {
            index: 0,
            queue: &q,
            vector: 1,
        }],
        &mem,
    )
    .unwrap();
    let codes = be.requests();
    let enable = codes
        .iter()
        .rposition(|&c| c == req::SET_VRING_ENABLE)
        .unwrap();
    assert_eq!(
        codes.get(enable + 1),
        Some(&req::GET_FEATURES),
        "a request with a reply after the ring is enabled: {codes:?}"
    );
    let kick = be.file(req::SET_VRING_KICK);
    assert_eq!(read_eventfd(&kick), Some(1), "then the activation's kick");
}

/// The test's side of the push ring our front-end handed a back-end that offered it.
fn ring_of(be: &FakeBackend) -> vhost_iotlb::push_ring::Consumer {
    let log = be.seen.lock().unwrap().log.clone();
    let (_, body) = log
        .iter()
        .find(|m| m.0 == req::APERTURE_SET_PUSH_RING)
        .expect("the front-end handed over a push ring");
    let capacity = u64::read_from_bytes(body).unwrap();
    vhost_iotlb::push_ring::Consumer::open(&be.file(req::APERTURE_SET_PUSH_RING), capacity).unwrap()
}

#[test]
fn a_ring_invalidation_completes_the_unmap_only_once_acknowledged_in_the_ring_or_cut_off() {
    let deadline = Duration::from_millis(400);
    let be = FakeBackend::start(
        "ring-inv",
        F_VERSION_1 | F_PROTOCOL | F_ACCESS_PLATFORM,
        P_ALL | wire::protocol::APERTURE_PUSH_RING,
        AckMode::Now,
        None,
    );
    let mut rig = IommuRig::new(&be, deadline);
    let mut ring = ring_of(&be);
    let h = rig.dev.handle();
    for (i, w) in [0x10000u64, 0x20000, 0x30000, 0x40000]
        .into_iter()
        .enumerate()
    {
        rig.map(w, w + 0xfff, 0x40000 + i as u64 * 0x1000, 3);
    }
    assert_eq!(h.counters().ring_pushed, 4, "pushed through the ring");
    assert_eq!(ring.take().unwrap().len(), 4);
    assert!(be.iotlb().is_empty(), "and not as messages");

    // Our poller's part, on its own thread, as long as the test runs.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (watching, watched) = mpsc::channel();
    let poller = std::thread::spawn({
        let (h, stop) = (h.clone(), Arc::clone(&stop));
        move || {
            assert!(!h.set_watched(true));
            watching.send(()).unwrap();
            while !stop.load(Ordering::SeqCst) {
                h.poll_ring_acks();
                std::thread::yield_now();
            }
            assert!(!h.set_watched(false), "nothing left outstanding");
        }
    });
    watched.recv().unwrap();

    // The back-end polls: the UNMAP waits for its acknowledgement in the ring, and no
    // message is sent.
    ring.set_polling(true);
    let ack_after = Duration::from_millis(150);
    let worker = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let (invs, upto) = ring.take_invalidations();
            if !invs.is_empty() {
                assert_eq!(
                    (invs.len(), invs[0].iova, invs[0].size),
                    (1, 0x10000, 0x1000)
                );
                std::thread::sleep(ack_after);
                ring.finish_invalidations(upto);
                return ring;
            }
            assert!(Instant::now() < until, "no invalidation in the ring");
            std::thread::yield_now();
        }
    });
    let t = Instant::now();
    assert_eq!(rig.unmap(0x10000, 0x10fff), Status::Ok);
    assert!(
        t.elapsed() >= ack_after,
        "S_OK before the ring's acknowledgement"
    );
    let ring = worker.join().unwrap();
    assert!(be.iotlb().is_empty(), "no INVALIDATE message");
    assert_eq!(h.counters().ring_invalidates, 1);

    // The back-end stops polling: the invalidation goes as a message (acked at once).
    ring.set_polling(false);
    assert_eq!(rig.unmap(0x20000, 0x20fff), Status::Ok);
    let sent = be.iotlb();
    assert_eq!(
        sent.iter()
            .map(|m| (m.kind, m.iova, m.size))
            .collect::<Vec<_>>(),
        [(wire::iotlb::INVALIDATE, 0x20000, 0x1000)]
    );
    assert_eq!(h.counters().ring_invalidates, 1);

    // Polling again, but it never acknowledges: the UNMAP completes at the deadline,
    // the connection is cut (the device needs reset), and it counts as a failure.
    ring.set_polling(true);
    let t = Instant::now();
    assert_eq!(rig.unmap(0x30000, 0x30fff), Status::Ok);
    assert!(t.elapsed() >= deadline);
    let c = h.counters();
    assert_eq!((c.ring_invalidates, c.invalidate_failures), (1, 1));
    stop.store(true, Ordering::SeqCst);
    poller.join().unwrap();
}

#[test]
fn an_unmap_for_a_whole_mapping_back_end_completes_at_once_unless_a_view_uses_the_window() {
    let be = FakeBackend::start(
        "ring-whole",
        F_VERSION_1 | F_PROTOCOL | F_ACCESS_PLATFORM,
        P_ALL | wire::protocol::APERTURE_PUSH_RING,
        AckMode::Now,
        None,
    );
    let mut rig = IommuRig::new(&be, Duration::from_millis(400));
    let mut ring = ring_of(&be);
    ring.set_whole(true);
    ring.set_views(0);
    let h = rig.dev.handle();
    for (i, w) in [0x10000u64, 0x20000, 0x30000].into_iter().enumerate() {
        rig.map(w, w + 0xfff, 0x40000 + i as u64 * 0x1000, 3);
    }
    assert_eq!(ring.take().unwrap().len(), 3);

    // No view alive: complete at once, though nobody polls and nothing answers.
    assert_eq!(rig.unmap(0x10000, 0x10fff), Status::Ok);
    assert!(be.iotlb().is_empty(), "no INVALIDATE message");
    let (invs, upto) = ring.take_invalidations();
    assert_eq!(
        (invs.len(), invs[0].iova, invs[0].size),
        (1, 0x10000, 0x1000),
        "the next view applies it"
    );
    ring.finish_invalidations(upto);
    let c = h.counters();
    assert_eq!((c.ring_invalidates, c.quiet_invalidates), (1, 1));

    // A view alive that published the windows it uses: one it does not use is
    // complete at once as well.
    ring.set_views(1);
    ring.add_hazard(0x30000, 0x30fff);
    assert_eq!(rig.unmap(0x20000, 0x20fff), Status::Ok);
    assert!(be.iotlb().is_empty(), "no INVALIDATE message");
    let c = h.counters();
    assert_eq!((c.ring_invalidates, c.quiet_invalidates), (2, 2));

    // One it uses (a batch that may be reading it for the next milliseconds): a
    // message as well, which the back-end answers when it may.
    assert_eq!(rig.unmap(0x30000, 0x30fff), Status::Ok);
    let sent = be.iotlb();
    assert_eq!(
        sent.iter()
            .map(|m| (m.kind, m.iova, m.size))
            .collect::<Vec<_>>(),
        [(wire::iotlb::INVALIDATE, 0x30000, 0x1000)]
    );
    let c = h.counters();
    assert_eq!((c.ring_invalidates, c.quiet_invalidates), (2, 2));
}
