//! The test front-end shared by the back-end's socket tests: a [`Session`] on a socket
//! pair, the messages a front-end sends, feature negotiation and vring set-up.

#![allow(dead_code)] // each test file uses a part
#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use test_kit::RingLayout;
use vhost_iotlb::wire::{
    flags, req, Header, IotlbMsg, MemoryHeader, MemoryRegion, VringAddr, VringState,
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_IOMMU_PLATFORM,
};
use vhost_iotlb::{AddressSpace, GuestView, Limits, MapPolicy, Report, Session, SessionConfig};
use virtio_contract::VirtioDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use zerocopy::{FromBytes, IntoBytes};

pub const RAM: u64 = 1 << 20;
pub const UBASE: u64 = 0x7f12_0000_0000;
/// IOVA = GPA + this, so that a mix-up of the two fails.
pub const IOVA_OFF: u64 = 0x40_0000_0000;
/// The ring of a queue of 16: table at 0x10000, available ring at +0x100, used ring
/// at +0x200.
pub const RING: RingLayout = RingLayout {
    desc: 0x10000,
    avail: 0x10100,
    used: 0x10200,
};
pub const HDR: u64 = 0x20000;
pub const DATA: u64 = 0x21000;
pub const STATUS: u64 = 0x22000;
pub const SECRET: u64 = 0x80000;
pub const QSIZE: u16 = 16;

/// The test's side of a vhost-user connection to a [`Session`] running `D`.
pub struct Frontend<D> {
    sock: UnixStream,
    worker: Option<JoinHandle<Report<D>>>,
}

impl<D: VirtioDevice<GuestView> + Send + 'static> Frontend<D> {
    /// A session for `dev` on a socket pair, its back-end side on its own thread.
    pub fn start_device(
        dev: D,
        limits: Limits,
        require_iommu: bool,
        poll: impl Into<virtio_contract::PollConfig>,
    ) -> (Self, Arc<AddressSpace>) {
        Self::start_mapping(dev, limits, require_iommu, poll, MapPolicy::Windows)
    }

    /// As [`Self::start_device`], IOTLB windows mapped as `map` says.
    pub fn start_mapping(
        dev: D,
        limits: Limits,
        require_iommu: bool,
        poll: impl Into<virtio_contract::PollConfig>,
        map: MapPolicy,
    ) -> (Self, Arc<AddressSpace>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let session = Session::new(
            dev,
            SessionConfig {
                limits,
                require_iommu,
                poll: poll.into(),
                map,
            },
        )
        .unwrap();
        let space = session.space();
        let worker = std::thread::spawn(move || session.run(theirs).unwrap());
        ours.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        (
            Self {
                sock: ours,
                worker: Some(worker),
            },
            space,
        )
    }
}

impl<D> Frontend<D> {
    pub fn send(&self, request: u32, fl: u32, payload: &[u8], fds: &[RawFd]) {
        let h = Header {
            request,
            flags: fl,
            size: payload.len() as u32,
        };
        let mut msg = h.as_bytes().to_vec();
        msg.extend_from_slice(payload);
        if fds.is_empty() {
            (&self.sock).write_all(&msg).unwrap();
        } else {
            let n = self.sock.send_with_fds(&[&msg[..]], fds).unwrap();
            (&self.sock).write_all(&msg[n..]).unwrap();
        }
    }

    pub fn reply(&self) -> (Header, Vec<u8>) {
        read_msg(&self.sock)
    }

    /// Sends with need_reply and returns the reply-ack value.
    pub fn ack(&self, request: u32, payload: &[u8], fds: &[RawFd]) -> u64 {
        self.send(request, flags::VERSION | flags::NEED_REPLY, payload, fds);
        let (h, p) = self.reply();
        assert_eq!(h.request, request);
        assert_eq!(h.flags & flags::REPLY, flags::REPLY);
        u64::from_ne_bytes(p.try_into().unwrap())
    }

    pub fn get(&self, request: u32, payload: &[u8]) -> Vec<u8> {
        self.send(request, flags::VERSION, payload, &[]);
        let (h, p) = self.reply();
        assert_eq!(h.request, request);
        p
    }

    pub fn finish(mut self) -> Report<D> {
        drop(std::mem::replace(
            &mut self.sock,
            UnixStream::pair().unwrap().0,
        ));
        self.worker.take().unwrap().join().unwrap()
    }
}

pub fn read_msg(sock: &UnixStream) -> (Header, Vec<u8>) {
    let mut h = [0u8; 12];
    (&*sock).read_exact(&mut h).unwrap();
    let h = Header::read_from_bytes(&h[..]).unwrap();
    let mut p = vec![0u8; h.size as usize];
    (&*sock).read_exact(&mut p).unwrap();
    (h, p)
}

pub fn state(index: u32, num: u32) -> Vec<u8> {
    VringState { index, num }.as_bytes().to_vec()
}

pub fn mem_table(region: MemoryRegion) -> Vec<u8> {
    let mut p = MemoryHeader {
        nregions: 1,
        padding: 0,
    }
    .as_bytes()
    .to_vec();
    p.extend_from_slice(region.as_bytes());
    p.extend_from_slice(&[0u8; 7 * 32]);
    p
}

pub fn ram_region() -> MemoryRegion {
    MemoryRegion {
        guest_phys_addr: 0,
        memory_size: RAM,
        userspace_addr: UBASE,
        mmap_offset: 0,
    }
}

pub fn iotlb_msg(kind: u8, iova: u64, size: u64, uaddr: u64, perm: u8) -> Vec<u8> {
    IotlbMsg {
        iova,
        size,
        uaddr,
        perm,
        kind,
        padding: [0; 6],
    }
    .as_bytes()
    .to_vec()
}

/// Negotiates features (with IOMMU_PLATFORM if `iommu`), protocol features, the memory
/// table and, with `chan`, the back-end channel. Returns the front-end's end of it.
pub fn negotiate<D>(fe: &Frontend<D>, ram: &File, iommu: bool) -> UnixStream {
    let features = u64::from_ne_bytes(fe.get(req::GET_FEATURES, &[]).try_into().unwrap());
    fe.send(req::SET_FEATURES, flags::VERSION, &[], &[]); // malformed, no reply asked
    let proto = u64::from_ne_bytes(fe.get(req::GET_PROTOCOL_FEATURES, &[]).try_into().unwrap());
    fe.send(
        req::SET_PROTOCOL_FEATURES,
        flags::VERSION,
        &proto.to_ne_bytes(),
        &[],
    );
    let mut acked = VHOST_USER_F_PROTOCOL_FEATURES | (1 << 32);
    if iommu {
        acked |= VIRTIO_F_IOMMU_PLATFORM;
    }
    assert_eq!(acked & !features, 0);
    assert_eq!(fe.ack(req::SET_FEATURES, &acked.to_ne_bytes(), &[]), 0);
    assert_eq!(fe.ack(req::SET_OWNER, &[], &[]), 0);
    assert_eq!(
        fe.ack(
            req::SET_MEM_TABLE,
            &mem_table(ram_region()),
            &[ram.as_raw_fd()]
        ),
        0
    );
    let (ours, theirs) = UnixStream::pair().unwrap();
    assert_eq!(
        fe.ack(req::SET_BACKEND_REQ_FD, &[], &[theirs.as_raw_fd()]),
        0
    );
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    ours
}

/// Sets up vring 0 at `RING` (bus addresses `bus(gpa)`); returns kick and call.
pub fn setup_ring<D>(fe: &Frontend<D>, bus: impl Fn(u64) -> u64) -> (EventFd, EventFd) {
    assert_eq!(fe.ack(req::SET_VRING_NUM, &state(0, QSIZE.into()), &[]), 0);
    assert_eq!(fe.ack(req::SET_VRING_BASE, &state(0, 0), &[]), 0);
    let addr = VringAddr {
        index: 0,
        flags: 0,
        desc: bus(RING.desc),
        used: bus(RING.used),
        avail: bus(RING.avail),
        log: 0,
    };
    assert_eq!(fe.ack(req::SET_VRING_ADDR, addr.as_bytes(), &[]), 0);
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let kick = EventFd::new(0).unwrap();
    assert_eq!(
        fe.ack(
            req::SET_VRING_CALL,
            &0u64.to_ne_bytes(),
            &[call.as_raw_fd()]
        ),
        0
    );
    assert_eq!(
        fe.ack(
            req::SET_VRING_KICK,
            &0u64.to_ne_bytes(),
            &[kick.as_raw_fd()]
        ),
        0
    );
    assert_eq!(fe.ack(req::SET_VRING_ENABLE, &state(0, 1), &[]), 0);
    (kick, call)
}
