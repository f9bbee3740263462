//! The PCI configuration space of a virtio-pci function: type-0 header, virtio vendor
//! capabilities (virtio spec §4.1.4), MSI-X capability, and the BAR 0 layout they point
//! at. Registers the driver may write (command, BAR 0, MSI-X control, the
//! `VIRTIO_PCI_CAP_PCI_CFG` window) are kept here; everything else is read-only.

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern virtio-pci device IDs are `0x1040 + device type` (virtio spec §4.1.2.1).
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;

/// Size of BAR 0 (a power of two, as PCI BAR sizing requires).
pub const BAR0_SIZE: u64 = 0x8000;

/// Where each structure lives in BAR 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar0Layout;

impl Bar0Layout {
    /// Common configuration (`struct virtio_pci_common_cfg`, 0x38 bytes).
    pub const COMMON: u64 = 0x0000;
    /// Size of the common configuration.
    pub const COMMON_SIZE: u64 = 0x38;
    /// ISR status byte.
    pub const ISR: u64 = 0x1000;
    /// Device-specific configuration.
    pub const DEVICE: u64 = 0x2000;
    /// Largest device configuration.
    pub const DEVICE_MAX: u64 = 0x1000;
    /// Queue notification area: queue `i` at `NOTIFY + i * NOTIFY_MULTIPLIER`.
    pub const NOTIFY: u64 = 0x3000;
    /// `notify_off_multiplier`.
    pub const NOTIFY_MULTIPLIER: u32 = 4;
    /// MSI-X table (emulated by the VMM).
    pub const MSIX_TABLE: u64 = 0x4000;
    /// MSI-X pending-bit array (emulated by the VMM).
    pub const MSIX_PBA: u64 = 0x6000;
    /// Most MSI-X vectors the table space holds (16 bytes each).
    pub const MAX_VECTORS: u16 = 512;
}

/// Identity of the function in its PCI header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    /// Virtio device type (device ID = 0x1040 + type).
    pub device_type: u16,
    /// Class code (class, subclass, prog-if), e.g. 0x01_80_00 for storage.
    pub class_code: u32,
}

// Offsets in the type-0 header.
const COMMAND: usize = 0x04;
const BAR0: usize = 0x10;
const BAR1: usize = 0x14;
const CAP_PTR: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;

// Capability list.
const CAP_COMMON: usize = 0x40;
const CAP_ISR: usize = 0x50;
const CAP_DEVICE: usize = 0x60;
const CAP_NOTIFY: usize = 0x70;
const CAP_PCI_CFG: usize = 0x84;
const CAP_MSIX: usize = 0x98;
const PCI_CAP_ID_VNDR: u8 = 0x09;
const PCI_CAP_ID_MSIX: u8 = 0x11;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// Offsets inside the `VIRTIO_PCI_CAP_PCI_CFG` capability.
pub(crate) const PCI_CFG_BAR: usize = CAP_PCI_CFG + 4;
pub(crate) const PCI_CFG_OFFSET: usize = CAP_PCI_CFG + 8;
pub(crate) const PCI_CFG_LENGTH: usize = CAP_PCI_CFG + 12;
pub(crate) const PCI_CFG_DATA: usize = CAP_PCI_CFG + 16;
/// MSI-X message control register.
const MSIX_CONTROL: usize = CAP_MSIX + 2;

/// The 256-byte configuration space.
#[derive(Clone, Debug)]
pub(crate) struct ConfigSpace {
    bytes: [u8; 256],
    bar0: u64,
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn get32(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(w)
}

#[allow(clippy::too_many_arguments)]
fn vendor_cap(
    b: &mut [u8],
    at: usize,
    next: usize,
    len: u8,
    cfg_type: u8,
    offset: u64,
    length: u64,
) {
    b[at] = PCI_CAP_ID_VNDR;
    b[at + 1] = next as u8;
    b[at + 2] = len;
    b[at + 3] = cfg_type;
    b[at + 4] = 0; // BAR 0
    put32(b, at + 8, offset as u32);
    put32(b, at + 12, length as u32);
}

impl ConfigSpace {
    /// Builds the header and capabilities for `ids`, with `queues` queues,
    /// `device_cfg_len` bytes of device configuration and `vectors` MSI-X vectors.
    pub(crate) fn new(ids: PciIds, queues: u16, device_cfg_len: u64, vectors: u16) -> Self {
        let mut b = [0u8; 256];
        put16(&mut b, 0x00, VIRTIO_PCI_VENDOR_ID);
        put16(&mut b, 0x02, VIRTIO_PCI_DEVICE_ID_BASE + ids.device_type);
        put16(&mut b, 0x06, 0x0010); // status: capabilities list
        b[0x08] = 1; // revision 1: modern-only device (virtio spec §4.1.2.1)
        b[0x09] = ids.class_code as u8;
        b[0x0a] = (ids.class_code >> 8) as u8;
        b[0x0b] = (ids.class_code >> 16) as u8;
        b[0x0e] = 0; // header type 0
        put32(&mut b, BAR0, 0x4); // 64-bit memory BAR, not prefetchable
        put16(&mut b, 0x2c, VIRTIO_PCI_VENDOR_ID); // subsystem vendor
        put16(&mut b, 0x2e, 0x40 + ids.device_type); // subsystem ID >= 0x40 (§4.1.2.1)
        b[CAP_PTR] = CAP_COMMON as u8;
        b[0x3d] = 0; // no INTx pin

        vendor_cap(
            &mut b,
            CAP_COMMON,
            CAP_ISR,
            16,
            VIRTIO_PCI_CAP_COMMON_CFG,
            Bar0Layout::COMMON,
            Bar0Layout::COMMON_SIZE,
        );
        let after_isr = if device_cfg_len > 0 {
            CAP_DEVICE
        } else {
            CAP_NOTIFY
        };
        vendor_cap(
            &mut b,
            CAP_ISR,
            after_isr,
            16,
            VIRTIO_PCI_CAP_ISR_CFG,
            Bar0Layout::ISR,
            1,
        );
        if device_cfg_len > 0 {
            vendor_cap(
                &mut b,
                CAP_DEVICE,
                CAP_NOTIFY,
                16,
                VIRTIO_PCI_CAP_DEVICE_CFG,
                Bar0Layout::DEVICE,
                device_cfg_len,
            );
        }
        let notify_len = u64::from(queues.max(1)) * u64::from(Bar0Layout::NOTIFY_MULTIPLIER);
        vendor_cap(
            &mut b,
            CAP_NOTIFY,
            CAP_PCI_CFG,
            20,
            VIRTIO_PCI_CAP_NOTIFY_CFG,
            Bar0Layout::NOTIFY,
            notify_len,
        );
        put32(&mut b, CAP_NOTIFY + 16, Bar0Layout::NOTIFY_MULTIPLIER);
        // §4.1.4.9: the device MUST present at least one PCI configuration access cap.
        vendor_cap(
            &mut b,
            CAP_PCI_CFG,
            CAP_MSIX,
            20,
            VIRTIO_PCI_CAP_PCI_CFG,
            0,
            0,
        );
        b[CAP_MSIX] = PCI_CAP_ID_MSIX;
        b[CAP_MSIX + 1] = 0; // end of list
        put16(&mut b, MSIX_CONTROL, vectors - 1); // table size N-1, disabled
        put32(&mut b, CAP_MSIX + 4, Bar0Layout::MSIX_TABLE as u32); // BIR 0
        put32(&mut b, CAP_MSIX + 8, Bar0Layout::MSIX_PBA as u32); // BIR 0
        Self { bytes: b, bar0: 0 }
    }

    /// Reads `data.len()` bytes at `offset`; bytes past 256 read as 0xff, as from an
    /// absent register.
    pub(crate) fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.bytes.get(o).copied())
                .unwrap_or(0xff);
        }
    }

    /// Writes the driver-writable registers; other bytes ignore writes.
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
            else {
                return;
            };
            match o {
                // command: I/O, memory, bus master, INTx disable.
                COMMAND => self.bytes[o] = v & 0x07,
                0x05 => self.bytes[o] = v & 0x04,
                INTERRUPT_LINE => self.bytes[o] = v,
                // BAR 0/1: 64-bit address, sized by BAR0_SIZE (handled whole below).
                BAR0..=0x17 => self.bytes[o] = v,
                // MSI-X control: only enable (bit 15) and function mask (bit 14).
                x if x == MSIX_CONTROL + 1 => {
                    self.bytes[o] = (self.bytes[o] & 0x3f) | (v & 0xc0);
                }
                // PCI_CFG window: bar, offset, length (its data is the transport's).
                x if x == PCI_CFG_BAR || (PCI_CFG_OFFSET..PCI_CFG_DATA).contains(&x) => {
                    self.bytes[o] = v;
                }
                _ => {}
            }
        }
        if offset < BAR1 as u64 + 4 && offset + data.len() as u64 > BAR0 as u64 {
            self.sync_bar0();
        }
    }

    /// Re-derives BAR 0 from what the driver wrote: the address bits below the size
    /// read back as zero (that is how the driver sizes the BAR), the type bits fixed.
    fn sync_bar0(&mut self) {
        let lo = u64::from(get32(&self.bytes, BAR0));
        let hi = u64::from(get32(&self.bytes, BAR1));
        self.bar0 = ((hi << 32) | lo) & !(BAR0_SIZE - 1);
        put32(&mut self.bytes, BAR0, (self.bar0 as u32) | 0x4);
        put32(&mut self.bytes, BAR1, (self.bar0 >> 32) as u32);
    }

    /// The guest-physical address of BAR 0 as programmed.
    pub(crate) fn bar0(&self) -> u64 {
        self.bar0
    }

    /// Whether MSI-X is enabled in the capability (for VMMs that let the transport own
    /// it; vfio-user's client virtualises the capability instead).
    pub(crate) fn msix_enabled(&self) -> bool {
        self.bytes[MSIX_CONTROL + 1] & 0x80 != 0
    }

    pub(crate) fn bytes(&self) -> &[u8; 256] {
        &self.bytes
    }
}
