//! Fuzz target `blk_request`: the virtio-blk request header decoder, the guest-reachable parser of
//! `virtio-devices`. Whatever the bytes, the chain shape and the disk, `decode` must not
//! panic, and whatever it accepts must lie inside the disk, within the limits, and
//! never write a read-only disk.
use virtio_devices::block::request::{decode, Disk, Request, Shape, MAX_DATA_BYTES};

/// The target's body: panics if a checked contract breaks.
pub fn run(data: &[u8]) {
    if data.len() < 17 {
        return;
    }
    let word = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap_or([0; 8]));
    let disk = Disk {
        capacity: word(0) >> (data[16] % 64),
        read_only: data[16] & 0x80 != 0,
    };
    let shape = Shape {
        readable: word(8) >> (data[16] % 48),
        writable_data: word(8).rotate_left(17) >> (data[16] % 40),
    };
    let header = &data[17..];
    let Ok(req) = decode(header, shape, disk) else {
        return;
    };
    let bytes = disk.capacity.saturating_mul(512);
    match req {
        Request::Read { offset, len } | Request::Write { offset, len } => {
            assert!(offset % 512 == 0 && len % 512 == 0);
            assert!(u64::from(len) <= MAX_DATA_BYTES);
            assert!(offset
                .checked_add(u64::from(len))
                .is_some_and(|end| end <= bytes));
            if matches!(req, Request::Write { .. }) {
                assert!(!disk.read_only, "a write accepted on a read-only disk");
            }
        }
        Request::Flush | Request::GetId { .. } => {}
    }
}
