//! One PCI function served over vfio-user: [`PciFunction`] is the `vfio_user`
//! `ServerBackend` that turns region accesses into config-space and BAR 0 accesses of a
//! [`VirtioPciTransport`], `DMA_MAP`/`DMA_UNMAP` into the device's memory, and
//! `SET_IRQS` MSI-X eventfds into its interrupts.
//!
//! The client (QEMU) emulates the MSI-X table and virtualises BAR addresses and the
//! command register, as for any vfio device; what reaches us is the rest.

use crate::dma::DmaMap;
use dma_types::lock;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};
use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_NORESIZE, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_TYPE_MASK, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, ServerBackend, ServerRegion};
use virtio_contract::VirtioDevice;
use virtio_pci::{InterruptSink, VirtioPciTransport, BAR0_SIZE};
use vm_memory::{GuestMemory, GuestMemoryMmap};

/// The MSI-X eventfds the client handed over, one slot per vector.
#[derive(Debug, Default)]
pub struct MsixVectors {
    fds: Mutex<Vec<Option<File>>>,
}

impl MsixVectors {
    /// `n` vectors, none wired yet.
    pub fn new(n: u16) -> Arc<Self> {
        Arc::new(Self {
            fds: Mutex::new((0..n).map(|_| None).collect()),
        })
    }

    fn set(&self, start: u32, fds: Vec<File>) {
        let mut v = lock(&self.fds);
        for (i, fd) in fds.into_iter().enumerate() {
            if let Some(slot) = (start as usize).checked_add(i).and_then(|j| v.get_mut(j)) {
                *slot = Some(fd);
            }
        }
    }

    fn clear(&self, start: u32, count: u32) {
        let mut v = lock(&self.fds);
        let all = count == 0;
        for (i, slot) in v.iter_mut().enumerate() {
            let i = i as u64;
            if all || (u64::from(start) <= i && i < u64::from(start) + u64::from(count)) {
                *slot = None;
            }
        }
    }

    /// Whether `vector` has an eventfd.
    pub fn is_wired(&self, vector: u16) -> bool {
        lock(&self.fds)
            .get(usize::from(vector))
            .is_some_and(Option::is_some)
    }
}

/// Signals a vector by writing its eventfd.
pub struct EventFdSink(pub Arc<MsixVectors>);

impl InterruptSink for EventFdSink {
    fn signal(&self, vector: u16) {
        if let Some(Some(fd)) = lock(&self.0.fds).get(usize::from(vector)) {
            // An eventfd write of a u64 only fails if the counter would overflow, in
            // which case the interrupt is already pending.
            let _ = (&*fd).write_all(&1u64.to_le_bytes());
        }
    }
}

/// The vfio regions of a virtio-pci function: BAR 0 and config space; the rest empty.
pub fn regions() -> Vec<ServerRegion> {
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let (size, flags) = match index {
                VFIO_PCI_BAR0_REGION_INDEX => (
                    BAR0_SIZE,
                    VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
                ),
                VFIO_PCI_CONFIG_REGION_INDEX => (
                    256,
                    VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
                ),
                _ => (0, 0),
            };
            ServerRegion {
                region_info: vfio_region_info {
                    argsz: size_of::<vfio_region_info>() as u32,
                    flags,
                    index,
                    cap_offset: 0,
                    size,
                    offset: 0,
                },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect()
}

/// The IRQ indices: MSI-X with `vectors` vectors, nothing else (no INTx).
pub fn irqs(vectors: u16) -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| IrqInfo {
            index,
            flags: if index == VFIO_PCI_MSIX_IRQ_INDEX {
                VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE
            } else {
                0
            },
            count: if index == VFIO_PCI_MSIX_IRQ_INDEX {
                u32::from(vectors)
            } else {
                0
            },
        })
        .collect()
}

/// Builds a device's memory from the guest-physical map (identity for a device not
/// behind the IOMMU, an `IommuMemory` over it for an endpoint).
pub type MemoryBuilder<M> = Box<dyn Fn(GuestMemoryMmap) -> M + Send>;

/// A virtio-pci function as a vfio-user server backend.
pub struct PciFunction<D, M> {
    transport: Arc<Mutex<VirtioPciTransport<D, M>>>,
    dma: DmaMap,
    vectors: Arc<MsixVectors>,
    memory: MemoryBuilder<M>,
}

impl<D: VirtioDevice<M>, M: GuestMemory> PciFunction<D, M> {
    /// Serves `transport`, whose interrupts go to `vectors`.
    pub fn new(
        transport: Arc<Mutex<VirtioPciTransport<D, M>>>,
        vectors: Arc<MsixVectors>,
        memory: MemoryBuilder<M>,
    ) -> Self {
        Self {
            transport,
            dma: DmaMap::new(),
            vectors,
            memory,
        }
    }

    fn refresh_memory(&mut self) {
        let mem = (self.memory)(self.dma.memory());
        lock(&self.transport).set_memory(mem);
    }
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
}

impl<D: VirtioDevice<M>, M: GuestMemory> ServerBackend for PciFunction<D, M> {
    fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), std::io::Error> {
        let mut t = lock(&self.transport);
        match region {
            VFIO_PCI_BAR0_REGION_INDEX => t.read_bar(offset, data),
            VFIO_PCI_CONFIG_REGION_INDEX => t.read_config_space(offset, data),
            _ => data.fill(0xff),
        }
        Ok(())
    }

    fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), std::io::Error> {
        let mut t = lock(&self.transport);
        match region {
            VFIO_PCI_BAR0_REGION_INDEX => t.write_bar(offset, data),
            VFIO_PCI_CONFIG_REGION_INDEX => t.write_config_space(offset, data),
            _ => {}
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> Result<(), std::io::Error> {
        self.dma
            .map(
                address,
                size,
                offset,
                fd,
                flags.contains(DmaMapFlags::WRITE),
            )
            .map_err(io_err)?;
        self.refresh_memory();
        Ok(())
    }

    fn dma_unmap(
        &mut self,
        flags: DmaUnmapFlags,
        address: u64,
        size: u64,
    ) -> Result<(), std::io::Error> {
        if flags.contains(DmaUnmapFlags::UNMAP_ALL) {
            self.dma.clear();
        } else {
            self.dma.unmap(address, size).map_err(io_err)?;
        }
        self.refresh_memory();
        Ok(())
    }

    fn reset(&mut self) -> Result<(), std::io::Error> {
        lock(&self.transport).reset();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), std::io::Error> {
        if index != VFIO_PCI_MSIX_IRQ_INDEX {
            // No INTx, MSI, error or request interrupts are declared (count 0).
            return if count == 0 {
                Ok(())
            } else {
                Err(io_err(format!("IRQ index {index} has no vectors")))
            };
        }
        if flags & VFIO_IRQ_SET_ACTION_TYPE_MASK != VFIO_IRQ_SET_ACTION_TRIGGER {
            // MSI-X masking is the client's (it emulates the table).
            return Ok(());
        }
        if flags & VFIO_IRQ_SET_DATA_EVENTFD != 0 && count > 0 {
            if fds.len() != count as usize {
                return Err(io_err(format!(
                    "SET_IRQS gave {} eventfds for {count} vectors",
                    fds.len()
                )));
            }
            self.vectors.set(start, fds);
        } else if flags & VFIO_IRQ_SET_DATA_NONE != 0 && count == 0 {
            self.vectors.clear(0, 0);
        } else if flags & VFIO_IRQ_SET_DATA_NONE != 0 {
            // Trigger the vectors now (VFIO semantics of DATA_NONE with count).
            let sink = EventFdSink(Arc::clone(&self.vectors));
            for v in start..start.saturating_add(count) {
                if let Ok(v) = u16::try_from(v) {
                    sink.signal(v);
                }
            }
        }
        Ok(())
    }
}

/// Whether a write to `region` at `offset` is a queue notification (a write into BAR 0's
/// notify area).
pub fn is_notify(region: u32, offset: u64) -> bool {
    region == VFIO_PCI_BAR0_REGION_INDEX
        && (virtio_pci::Bar0Layout::NOTIFY..virtio_pci::Bar0Layout::MSIX_TABLE).contains(&offset)
}

/// A function whose queue notifications also call `on_notify`, after the function
/// handled the write; everything else is the function's own.
pub struct NotifyHook<F> {
    inner: Box<dyn ServerBackend + Send>,
    on_notify: F,
}

impl<F: FnMut() + Send> NotifyHook<F> {
    /// `inner`, with `on_notify` called after every queue notification it handled.
    pub fn new(inner: Box<dyn ServerBackend + Send>, on_notify: F) -> Self {
        Self { inner, on_notify }
    }
}

impl<F: FnMut() + Send> ServerBackend for NotifyHook<F> {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        self.inner.region_read(region, offset, data)
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.inner.region_write(region, offset, data)?;
        if is_notify(region, offset) {
            (self.on_notify)();
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        self.inner.dma_map(flags, offset, address, size, fd)
    }

    fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> std::io::Result<()> {
        self.inner.dma_unmap(flags, address, size)
    }

    fn reset(&mut self) -> std::io::Result<()> {
        self.inner.reset()
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        self.inner.set_irqs(index, flags, start, count, fds)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use virtio_pci::Bar0Layout;

    #[test]
    fn notify_hook_sees_queue_notifications_and_nothing_else() {
        struct Sink;
        impl ServerBackend for Sink {
            fn region_read(&mut self, _: u32, _: u64, _: &mut [u8]) -> std::io::Result<()> {
                Ok(())
            }
            fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> std::io::Result<()> {
                Ok(())
            }
            fn dma_map(
                &mut self,
                _: DmaMapFlags,
                _: u64,
                _: u64,
                _: u64,
                _: Option<File>,
            ) -> std::io::Result<()> {
                Ok(())
            }
            fn dma_unmap(&mut self, _: DmaUnmapFlags, _: u64, _: u64) -> std::io::Result<()> {
                Ok(())
            }
            fn reset(&mut self) -> std::io::Result<()> {
                Ok(())
            }
            fn set_irqs(
                &mut self,
                _: u32,
                _: u32,
                _: u32,
                _: u32,
                _: Vec<File>,
            ) -> std::io::Result<()> {
                Ok(())
            }
        }
        let kicks = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&kicks);
        let mut b = NotifyHook::new(Box::new(Sink), move || {
            counter.fetch_add(1, Ordering::Relaxed);
        });
        b.region_write(0, Bar0Layout::NOTIFY, &[0, 0]).unwrap();
        b.region_write(0, Bar0Layout::NOTIFY + 4, &[1, 0]).unwrap();
        b.region_write(0, Bar0Layout::COMMON, &[1]).unwrap();
        b.region_write(7, Bar0Layout::NOTIFY, &[0, 0]).unwrap();
        b.region_write(0, Bar0Layout::MSIX_TABLE, &[0; 4]).unwrap();
        assert_eq!(kicks.load(Ordering::Relaxed), 2);
    }
}
