//! Newtypes for the identifiers and address spaces the device deals in, so an API that
//! takes an IOVA cannot be handed a guest-physical address or a domain ID an endpoint ID.

use std::fmt;

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident($inner:ty), $fmt:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }
    };
}

id_newtype!(
    /// A virtio-iommu endpoint ID (for PCI: the ID the VIOT table assigns the requester ID).
    EndpointId(u32),
    "endpoint {}"
);
id_newtype!(
    /// A virtio-iommu domain ID, chosen by the driver.
    DomainId(u32),
    "domain {}"
);
pub use dma_types::{Gpa, Iova};
