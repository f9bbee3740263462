//! The device address space of `pool` and `auto`: the restricted pool, which the device
//! reaches at its own guest-physical addresses, and for `auto` also whatever the guest
//! maps for it through the virtio-iommu. An access that lies wholly inside the pool
//! goes straight to guest memory (the range check is the whole translation of an
//! identity window: no IOTLB lookup, unlike `vm_memory::IommuMemory` over
//! `bounce_pool::PoolIommu`, which allows the same addresses); any other goes to the
//! endpoint's translation (so an access straddling the pool's edge is the IOMMU's to
//! allow or fault), or, in `pool` mode, is refused. The backend reaches the pool plus
//! the live mappings, neither mode's limit lifted.

use std::iter::FusedIterator;
use virtio_iommu::EndpointIommu;
use vm_memory::bitmap::{BitmapSlice, BS};
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
    GuestMemoryRegion, GuestMemoryResult, IommuMemory, Permissions,
};

/// The pool as a window, the rest through the IOMMU or nowhere.
#[derive(Debug)]
pub struct WindowedMemory {
    ram: GuestMemoryMmap,
    mapped: Option<IommuMemory<GuestMemoryMmap, EndpointIommu>>,
    start: u64,
    /// Exclusive.
    end: u64,
}

impl WindowedMemory {
    /// `ram` reached directly inside `pool` (guest-physical, end exclusive) and, if
    /// given, through `endpoint` elsewhere; without an endpoint nothing else is
    /// reachable.
    pub fn new(
        ram: GuestMemoryMmap,
        pool: std::ops::Range<u64>,
        endpoint: Option<EndpointIommu>,
    ) -> Self {
        Self {
            mapped: endpoint.map(|e| IommuMemory::new(ram.clone(), e, true, ())),
            ram,
            start: pool.start,
            end: pool.end,
        }
    }

    fn in_pool(&self, addr: GuestAddress, count: usize) -> bool {
        addr.0 >= self.start && (count as u64) <= self.end - addr.0.min(self.end)
    }
}

/// One of two slice iterators.
enum Either<L, R> {
    Pool(L),
    Mapped(R),
}

impl<T, L: Iterator<Item = T>, R: Iterator<Item = T>> Iterator for Either<L, R> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        match self {
            Either::Pool(l) => l.next(),
            Either::Mapped(r) => r.next(),
        }
    }
}

impl<T, L: FusedIterator<Item = T>, R: FusedIterator<Item = T>> FusedIterator for Either<L, R> {}

impl<'a, B, L, R> GuestMemorySliceIterator<'a, B> for Either<L, R>
where
    B: BitmapSlice,
    L: GuestMemorySliceIterator<'a, B>,
    R: GuestMemorySliceIterator<'a, B>,
{
}

type Bitmap = <<GuestMemoryMmap as GuestMemoryBackend>::R as GuestMemoryRegion>::B;

impl GuestMemory for WindowedMemory {
    type PhysicalMemory = GuestMemoryMmap;
    type Bitmap = Bitmap;

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        if self.in_pool(addr, count) {
            GuestMemory::check_range(&self.ram, addr, count, access)
        } else {
            self.mapped
                .as_ref()
                .is_some_and(|m| m.check_range(addr, count, access))
        }
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<impl GuestMemorySliceIterator<'a, BS<'a, Self::Bitmap>>> {
        if self.in_pool(addr, count) {
            return Ok(Either::Pool(GuestMemory::get_slices(
                &self.ram, addr, count, access,
            )?));
        }
        match &self.mapped {
            Some(m) => Ok(Either::Mapped(m.get_slices(addr, count, access)?)),
            None => Err(GuestMemoryError::InvalidGuestAddress(addr)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use virtio_iommu::fake_driver::FakeGuest;
    use virtio_iommu::VirtioIommu;
    use virtio_iommu::{DomainId, EndpointConfig, EndpointId, IommuConfig, Iova, Request, Status};
    use vm_memory::Bytes;

    const POOL: std::ops::Range<u64> = 0x10_0000..0x14_0000;

    fn ram() -> GuestMemoryMmap {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        m.write_slice(b"pool", GuestAddress(POOL.start)).unwrap();
        m.write_slice(b"secret", GuestAddress(0x20_0000)).unwrap();
        m
    }

    #[test]
    fn pool_only_reaches_the_pool_and_nothing_else() {
        let w = WindowedMemory::new(ram(), POOL, None);
        let mut b = [0u8; 4];
        w.read_slice(&mut b, GuestAddress(POOL.start)).unwrap();
        assert_eq!(&b, b"pool");
        w.write_slice(b"ab", GuestAddress(POOL.end - 2)).unwrap();
        let mut s = [0u8; 6];
        assert!(w.read_slice(&mut s, GuestAddress(0x20_0000)).is_err());
        assert!(
            w.write_slice(b"abc", GuestAddress(POOL.end - 2)).is_err(),
            "straddles the end"
        );
        assert!(
            w.read_slice(&mut b, GuestAddress(POOL.start - 2)).is_err(),
            "straddles the start"
        );
        assert!(!w.check_range(GuestAddress(0x20_0000), 6, Permissions::Read));
        assert!(w.check_range(GuestAddress(POOL.start), 4, Permissions::Write));
    }

    #[test]
    fn outside_the_pool_only_what_the_guest_mapped_and_only_while_mapped() {
        let cfg = IommuConfig {
            endpoints: vec![EndpointConfig::new(8)],
            ..IommuConfig::default()
        };
        let mut dev = VirtioIommu::new(&cfg).unwrap();
        let mut g = FakeGuest::new(cfg.probe_size);
        g.negotiate(&mut dev);
        let attach = Request::Attach {
            domain: DomainId(1),
            endpoint: EndpointId(8),
            flags: 0,
            reserved_nonzero: false,
        };
        assert_eq!(g.send(&mut dev, &attach), Status::Ok);
        let ep = dev.endpoint_iommu(EndpointId(8)).unwrap();
        let w = WindowedMemory::new(ram(), POOL, Some(ep));
        let mut s = [0u8; 6];
        assert!(
            w.read_slice(&mut s, GuestAddress(0x20_0000)).is_err(),
            "not mapped"
        );
        let iova = 1u64 << 32;
        let map = Request::Map {
            domain: DomainId(1),
            virt_start: Iova(iova),
            virt_end: Iova(iova + 0xfff),
            phys_start: 0x20_0000,
            flags: 1,
        };
        assert_eq!(g.send(&mut dev, &map), Status::Ok);
        w.read_slice(&mut s, GuestAddress(iova)).unwrap();
        assert_eq!(&s, b"secret");
        assert!(
            w.write_slice(b"x", GuestAddress(iova)).is_err(),
            "read-only mapping"
        );
        let unmap = Request::Unmap {
            domain: DomainId(1),
            virt_start: Iova(iova),
            virt_end: Iova(iova + 0xfff),
            reserved_nonzero: false,
        };
        assert_eq!(g.send(&mut dev, &unmap), Status::Ok);
        assert!(
            w.read_slice(&mut s, GuestAddress(iova)).is_err(),
            "strictly unmapped"
        );
        // The pool stays reachable whatever the domain does.
        let mut b = [0u8; 4];
        w.read_slice(&mut b, GuestAddress(POOL.start)).unwrap();
        assert_eq!(&b, b"pool");
    }
}
