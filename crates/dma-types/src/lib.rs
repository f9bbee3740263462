//! The words every Aperture crate shares, defined once.
//!
//! - Addresses: [`Gpa`] (guest-physical: where the guest's memory is), [`Iova`] (what a
//!   device behind an IOMMU puts on the bus) and [`DmaAddr`] (what a device is handed
//!   in pool mode: a bounce slot's guest-physical address, a different thing from the
//!   [`Gpa`] of the original buffer). Xen's grant DMA address is `grant-table`'s
//!   `GrantDmaAddr`: its layout is the grant ABI's.
//! - [`Bdf`]: a PCI function, parsed and printed as `lspci` and sysfs write it.
//! - [`DmaDirection`]: Linux's `enum dma_data_direction`, without `DMA_NONE`.
//! - [`DomId`]: a guest, by Xen's `domid_t`. A virtio-iommu domain is another thing
//!   (`virtio_iommu::DomainId`, a 32-bit number the guest's driver picks).
//! - [`lock`], [`read`], [`write`](fn@write): lock guards that survive a panicked holder. Every
//!   user mutates the guarded state only after validating its input, so a poisoned lock
//!   still guards consistent data, and a device must keep serving.

#![deny(missing_docs)]

use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

macro_rules! address {
    ($(#[$doc:meta])* $name:ident, $fmt:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }
    };
}

address!(
    /// A guest-physical address: where the guest's memory, and a mapping's target, is.
    Gpa,
    "GPA {:#x}"
);
address!(
    /// An I/O virtual address: what an endpoint behind an IOMMU puts on the bus.
    Iova,
    "IOVA {:#x}"
);
address!(
    /// The address a device is given for DMA in pool mode: the guest-physical address
    /// of a bounce slot inside the restricted DMA pool (identity-mapped for the
    /// device). Not the [`Gpa`] of the buffer it bounces.
    DmaAddr,
    "DMA address {:#x}"
);

/// A guest, by number (Xen's `domid_t`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomId(pub u16);

impl fmt::Display for DomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "d{}", self.0)
    }
}

/// Direction of a streaming DMA mapping (Linux's `enum dma_data_direction`).
/// `DMA_NONE` has no value here: Linux `BUG()`s on it, so it is unrepresentable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DmaDirection {
    /// `DMA_TO_DEVICE`: the device reads the buffer.
    ToDevice,
    /// `DMA_FROM_DEVICE`: the device writes the buffer.
    FromDevice,
    /// `DMA_BIDIRECTIONAL`: both.
    Bidirectional,
}

impl DmaDirection {
    /// Whether the device reads the buffer (data flows from the CPU's buffer to the
    /// device: bounced at map and `sync_for_device`).
    pub fn to_device(self) -> bool {
        matches!(self, Self::ToDevice | Self::Bidirectional)
    }

    /// Whether the device writes the buffer (data flows back to the CPU's buffer:
    /// bounced at `sync_for_cpu` and unmap).
    pub fn from_device(self) -> bool {
        matches!(self, Self::FromDevice | Self::Bidirectional)
    }
}

/// Why a PCI function address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BdfError {
    /// Device above 31 or function above 7.
    #[error(
        "device {device:#x} function {function:#x} is out of range (device <= 0x1f, function <= 7)"
    )]
    OutOfRange {
        /// The device number given.
        device: u8,
        /// The function number given.
        function: u8,
    },
    /// Not `bb:dd.f` or `ssss:bb:dd.f` in hex.
    #[error("{text:?} is not a PCI device id (bb:dd.f or ssss:bb:dd.f, hex)")]
    Syntax {
        /// The text given.
        text: String,
    },
}

/// A PCI function: segment (domain), bus, device (0-31), function (0-7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// PCI segment group (domain) number.
    pub segment: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number, 0..=31.
    pub device: u8,
    /// Function number, 0..=7.
    pub function: u8,
}

impl Bdf {
    /// A function address, checked.
    ///
    /// # Errors
    /// [`BdfError::OutOfRange`] if `device > 31` or `function > 7`.
    pub fn new(segment: u16, bus: u8, device: u8, function: u8) -> Result<Self, BdfError> {
        let b = Self {
            segment,
            bus,
            device,
            function,
        };
        if !b.is_valid() {
            return Err(BdfError::OutOfRange { device, function });
        }
        Ok(b)
    }

    /// Whether device and function are in range (the fields are public, so a value
    /// built field by field may not be).
    pub const fn is_valid(&self) -> bool {
        self.device <= 0x1f && self.function <= 7
    }

    /// `devfn` as PCI encodes it: `device << 3 | function`.
    pub const fn devfn(&self) -> u8 {
        ((self.device & 0x1f) << 3) | (self.function & 7)
    }

    /// The 16-bit requester ID, `bus << 8 | devfn`. Device and function are masked to
    /// 5 and 3 bits; check [`Bdf::is_valid`] where that must not change them.
    pub const fn requester_id(&self) -> u16 {
        ((self.bus as u16) << 8) | self.devfn() as u16
    }
}

impl fmt::Display for Bdf {
    /// `bb:dd.f` on segment 0, `ssss:bb:dd.f` otherwise; the alternate form (`{:#}`)
    /// always names the segment, as sysfs does.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.segment != 0 || f.alternate() {
            write!(f, "{:04x}:", self.segment)?;
        }
        write!(
            f,
            "{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

impl FromStr for Bdf {
    type Err = BdfError;

    /// Parses `bb:dd.f` or `ssss:bb:dd.f` (hex), as `lspci` and sysfs write them.
    fn from_str(text: &str) -> Result<Self, BdfError> {
        let bad = || BdfError::Syntax {
            text: text.to_string(),
        };
        let (head, function) = text.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = head.split(':').collect();
        let (segment, bus, device) = match parts.as_slice() {
            [bus, device] => ("0", *bus, *device),
            [segment, bus, device] => (*segment, *bus, *device),
            _ => return Err(bad()),
        };
        let hex = |s: &str, max_len: usize| -> Result<u16, BdfError> {
            if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u16::from_str_radix(s, 16).map_err(|_| bad())
        };
        let segment = hex(segment, 4)?;
        let bus = u8::try_from(hex(bus, 2)?).map_err(|_| bad())?;
        let device = u8::try_from(hex(device, 2)?).map_err(|_| bad())?;
        let function = u8::try_from(hex(function, 1)?).map_err(|_| bad())?;
        Bdf::new(segment, bus, device, function)
    }
}

/// Locks `m`, whether or not a holder panicked (see the crate docs).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks `l`, whether or not a holder panicked.
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks `l`, whether or not a holder panicked.
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bdf_parses_and_prints_as_lspci_and_sysfs_write_it() {
        let b: Bdf = "00:14.0".parse().unwrap();
        assert_eq!(b, Bdf::new(0, 0, 0x14, 0).unwrap());
        assert_eq!(b.to_string(), "00:14.0");
        let s: Bdf = "0001:3a:1f.7".parse().unwrap();
        assert_eq!((s.segment, s.bus, s.device, s.function), (1, 0x3a, 0x1f, 7));
        assert_eq!(s.to_string(), "0001:3a:1f.7");
        assert_eq!(format!("{b:#}"), "0000:00:14.0");
        assert_eq!(s.devfn(), 0xff);
        assert_eq!(s.requester_id(), 0x3aff);
        for bad in [
            "",
            "00:14",
            "0:0:0:0.0",
            "00:20.0",
            "00:14.8",
            "0g:00.0",
            "00:+1.0",
            "10000:00:00.0",
        ] {
            assert!(bad.parse::<Bdf>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            Bdf::new(0, 0, 32, 0),
            Err(BdfError::OutOfRange {
                device: 32,
                function: 0
            })
        );
    }

    #[test]
    fn a_poisoned_lock_still_opens() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = std::sync::Arc::clone(&m);
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("holder panics");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
