#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into seeds/<target>/.

Each seed is a well-formed scenario in the target's input format (see the target's
module in src/), so that fuzzing starts from deep states rather than from nothing:
a Linux-like virtio-pci bring-up, a QEMU-like vhost-user handshake, grants that are
mapped, copied and revoked. The replay test (tests/replay.rs) runs them on stable.

Run from anywhere: python3 fuzz/seeds/make_seeds.py. It rewrites only the files whose
names start with "hand-"; inputs taken from fuzzing runs live beside them.
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "..", "crates", "mem-layout", "fixtures")


def u8(v):
    return struct.pack("<B", v & 0xFF)


def u16(v):
    return struct.pack("<H", v & 0xFFFF)


def u32(v):
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v):
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "hand-" + name), "wb") as f:
        f.write(data)


# --- requests (src/requests.rs) ---------------------------------------------------
def requests():
    # Structured requests: tag 1, kind, domain, endpoint, flags, misc (+ map/unmap
    # fields: addr selector 0 = u16 << 8, len u16, phys u16).
    attach = lambda dom, ep: b"\x01" + bytes([0, dom, ep, 0, 0])
    detach = lambda dom, ep: b"\x01" + bytes([1, dom, ep, 0, 0])
    probe = lambda ep: b"\x01" + bytes([4, 0, ep, 0, 0])

    def map_(dom, start, length, phys, flags=3):
        return b"\x01" + bytes([2, dom, 0, flags, 0]) + b"\x00" + u16(start) + u16(length) + u16(phys)

    def unmap(dom, start, length):
        return b"\x01" + bytes([3, dom, 0, 0, 0]) + b"\x00" + u16(start) + u16(length)

    # Translation: tag 2, endpoint, addr (selector 0: u16 << 8), len u16, access.
    translate = lambda ep, addr, length, a: b"\x02" + bytes([ep]) + b"\x00" + u16(addr) + u16(length) + bytes([a])
    write("requests", "attach-map-translate", b"\x00" + attach(1, 1) + map_(1, 0x10, 0x1000, 0x20)
          + translate(0, 0x10, 0x100, 3) + unmap(1, 0x10, 0x1000) + translate(0, 0x10, 0x100, 1)
          + detach(1, 1))
    write("requests", "probe-reserved", b"\x01" + probe(2) + probe(1) + probe(4)
          + attach(1, 2) + map_(1, 0xc0, 0x100, 0))
    write("requests", "bypass-config", b"\x02" + b"\x04\x00\x41" + b"\x05\x00\x30"
          + translate(1, 0x4, 0x10, 2) + b"\x06\x00" + b"\x06\x01" + translate(1, 0x4, 0x10, 2))
    # Raw request: tag 0, readable length, bytes, writable length.
    write("requests", "raw", b"\x00" + b"\x00\x08" + bytes([1, 0, 0, 0, 1, 0, 0, 0]) + u16(4)
          + b"\x00\x04" + bytes([4, 0, 0, 0]) + u16(2000))
    # Domains and mappings past the limits.
    many = b"\x00" + attach(1, 1) + attach(2, 2) + attach(3, 3)
    for i in range(40):
        many += map_(1 + i % 2, 0x100 + i * 0x10, 0x10, i)
    write("requests", "limits", many)


# --- blk_request (src/blk_request.rs) ---------------------------------------------
def blk_request():
    def seed(name, capacity, readable, writable_data, sel, rtype, sector):
        # word(8) is the shape: readable >> (sel % 48), rotate_left(17) >> (sel % 40)
        # for the writable bytes; sel = 0 keeps them as given (rotation aside).
        shape = readable
        write("blk_request", name, u64(capacity) + u64(shape) + u8(sel)
              + u32(rtype) + u32(0) + u64(sector))
    seed("read", 1 << 20, 16 + 4096, 4096, 0, 0, 8)
    seed("write", 1 << 20, 16 + 4096, 0, 0, 1, 8)
    seed("write-ro", 1 << 20, 16 + 4096, 0, 0x80, 1, 8)
    seed("flush", 1 << 20, 16, 0, 0, 4, 0)
    seed("get-id", 1 << 20, 16, 20, 0, 8, 0)
    seed("read-past-end", 1 << 10, 16 + 512, 512, 0, 0, (1 << 10) - 1 + 1)


# --- host_tables (src/host_tables.rs) ---------------------------------------------
def host_tables():
    for name in ("acpica-template-dmar", "thinkpad-snb-dmar"):
        with open(os.path.join(FIXTURES, name + ".bin"), "rb") as f:
            write("host_tables", name, b"\x00" + f.read())
    write("host_tables", "reserved-regions",
          b"\x01" + b"0x00000000fee00000 0x00000000feefffff msi\n"
          b"0x000000007b800000 0x000000007fffffff direct\n")
    write("host_tables", "reserved-regions-8g",
          b"\x07" + b"0x00000000000a0000 0x00000000000bffff direct-relaxable\n")
    for name in ("asus-zenbook-s16-ivrs", "cix-sky1-orion-o6-iort"):
        with open(os.path.join(FIXTURES, name + ".bin"), "rb") as f:
            write("host_tables", name, b"\x40" + f.read())


# --- host_tables_ivrs / host_tables_iort (src/host_tables.rs) ----------------------
def host_tables_ivrs_iort():
    for target, names in (
        ("host_tables_ivrs", ("asus-zenbook-s16-ivrs", "mechrevo-wujie14-ivrs",
                              "thinkpad-t14g3-ivrs", "hp-envy-x360-13-ivrs")),
        ("host_tables_iort", ("cix-sky1-orion-o6-iort", "acer-spin7-iort")),
    ):
        for name in names:
            with open(os.path.join(FIXTURES, name + ".bin"), "rb") as f:
                data = f.read()
            write(target, name, b"\x00" + data)
            write(target, name + "-assigned", b"\x42" + data)


# --- vhost_user_wire (src/vhost_user_wire.rs) -------------------------------------
CODES = [1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 21, 22, 24, 25]


def idx(code):
    return CODES.index(code)


def msg(code, payload, n=0, fixup=False, nofd=False, flags_sel=0, size_sel=0, fds=None):
    """A message as `message()` reads it: code, flags, shape, payload, size/fds."""
    shape = (n << 4) | (4 if fixup else 0) | (8 if nofd else 0)
    fd_sel = 0 if fds is None else 16 + fds
    return u8(idx(code)) + u8(flags_sel) + u8(shape) + payload + u8(size_sel | (fd_sel << 3))


def vring_state(i, num):
    return u32(i) + u32(num)


def iotlb(iova, size, uaddr, perm, kind):
    return u64(iova) + u64(size) + u64(uaddr) + bytes([perm, kind]) + b"\x00" * 6


def region(gpa, size, uaddr, off):
    return u64(gpa) + u64(size) + u64(uaddr) + u64(off)


def handshake():
    """QEMU's order: features, protocol features, owner, memory, rings, IOTLB."""
    m = []
    m.append(msg(1, b""))
    m.append(msg(15, b""))
    m.append(msg(16, u64((1 << 0) | (1 << 3) | (1 << 5) | (1 << 9)), flags_sel=1))
    m.append(msg(2, u64((1 << 32) | (1 << 33) | (1 << 30))))
    m.append(msg(3, b""))
    m.append(msg(21, b""))
    m.append(msg(5, u32(2) + u32(0) + region(0, 0x10000, 0x7F0000000000, 0)
                 + region(0x100000, 0x10000, 0x7F0000100000, 0), n=2))
    m.append(msg(17, b""))
    m.append(msg(8, vring_state(0, 256)))
    m.append(msg(10, vring_state(0, 0)))
    m.append(msg(9, u32(0) + u32(0) + u64(0x1000) + u64(0x3000) + u64(0x2000) + u64(0)))
    m.append(msg(12, u64(0), n=0))
    m.append(msg(13, u64(0)))
    m.append(msg(14, u64(0x100), nofd=True))
    m.append(msg(18, vring_state(0, 1)))
    m.append(msg(22, iotlb(0x1000, 0x1000, 0x7F0000001000, 3, 2), flags_sel=1))
    m.append(msg(22, iotlb(0x1000, 0x1000, 0, 0, 3), flags_sel=1))
    m.append(msg(24, u32(0) + u32(17) + u32(0) + b"\x00" * 17, n=1))
    m.append(msg(25, u32(8) + u32(17) + u32(0) + bytes(range(17)), n=1))
    m.append(msg(11, vring_state(0, 0)))
    return m


def vhost_user_wire():
    hs = handshake()
    write("vhost_user_wire", "decode-handshake", b"\x00" + b"".join(hs[:16]))
    write("vhost_user_wire", "decode-config-iotlb", b"\x00" + b"".join(hs[15:]))
    # Fix-ups: a memory table of 3 regions in the 8-slot array; kick without fd;
    # IOTLB update RW (n = 12) and invalidate (n = 3); config of 17 bytes.
    write("vhost_user_wire", "decode-fixups", b"\x00"
          + msg(5, b"\x00" * (8 + 3 * 32), n=3, fixup=True)
          + msg(12, b"\x00" * 8, n=1, fixup=True, nofd=True)
          + msg(22, b"\x00" * 32, n=12, fixup=True)
          + msg(22, b"\x00" * 32, n=3, fixup=True)
          + msg(24, b"\x00" * 29, n=1, fixup=True, nofd=True))
    # Wrong things: flags with the reply bit, an off-by-one payload, too many fds,
    # an unsupported code.
    write("vhost_user_wire", "decode-refusals", b"\x00"
          + msg(1, b"", flags_sel=(0x5 << 2) | 2)
          + u8(idx(2)) + b"\x00" + b"\x02" + b"\x00" * 7 + b"\x00"
          + msg(3, b"", fds=3)
          + b"\x14\x00\x00\x00")
    # The stream: the handshake through the socket, then garbage and an oversized
    # payload.
    stream = b"".join(b"\x20" + m for m in hs)
    write("vhost_user_wire", "stream-handshake", b"\x02" + stream)
    oversized = u8(idx(25)) + b"\x00" + b"\x03" + u16(4100) + b"\x00" * 4100 + b"\x00"
    write("vhost_user_wire", "stream-oversized", b"\x02" + b"\x20" + hs[0] + b"\x20" + oversized
          + b"\x20" + hs[1])
    write("vhost_user_wire", "stream-garbage", b"\x02" + b"\x20" + hs[0] + b"\x05abcde"
          + b"\x20" + hs[1] + b"\x20" + hs[2])
    # More descriptors than a message may carry (9 on a SET_OWNER).
    write("vhost_user_wire", "stream-nine-fds", b"\x02" + b"\x20" + hs[0] + b"\x20" + msg(3, b"", fds=9)
          + b"\x20" + hs[1])
    # The back-end channel: reply-ack, 3 good replies (0, 1, 0); miss, miss,
    # access-fail, miss with a 1 ns timeout, miss.
    def op(o, iova, size, perm):
        return u8(o) + u64(iova) + u64(size) + u8(perm)
    write("vhost_user_wire", "channel-replies", b"\x03" + u8(1 | (3 << 1)) + b"\x00" + b"\x80" + b"\x00"
          + op(0, 0x1000, 0x1000, 1) + op(0, 0x2000, 8, 3) + op(3, 0x3000, 1, 2)
          + op(8, 0x4000, 1, 1) + op(0, 0x5000, 1, 1))
    write("vhost_user_wire", "channel-noack", b"\x03" + u8(0 | (1 << 1)) + b"\x00"
          + op(0, 0x1000, 0x1000, 1) + op(3, 0x3000, 1, 2) + op(4, 0, 0, 0))
    write("vhost_user_wire", "channel-bad-reply", b"\x03" + u8(1 | (2 << 1)) + b"\x02" + b"\x01\x0c\x08\x00"
          + b"\x03" + op(0, 0x1000, 0x1000, 1) + op(0, 0x1000, 0x1000, 1))


# --- virtio_pci_registers (src/virtio_pci_registers.rs) -----------------------------
def pci_init(f=0, qmask=0xFF, extra=b""):
    return b"\x07" + u8(f) + u8(qmask) + extra


def pci_publish(q, d, addr, length, how=0x20, flags=None, nxt=0):
    b = b"\x08" + u8(q) + u8(d) + u8(how)
    b += u64(addr) if how & 1 else u16(addr)
    b += u32(length) if how & 2 else u8(length)
    if how & 4:
        b += u16(flags)
    b += u8(nxt)
    return b


def bar_write(off, data):
    # tag 1; offset selector 6 = any u16; width; bytes.
    return b"\x01" + b"\x06" + u16(off) + u8(len(data) - 1) + data


def cfg_write(off, data):
    sel = b"\x00" if off == 0x94 else b"\x01" + u8(off)
    return b"\x03" + sel + u8(len(data) - 1) + data


def cfg_read(off, n):
    sel = b"\x00" if off == 0x94 else b"\x01" + u8(off)
    return b"\x02" + sel + u8(n - 1)


def virtio_pci_registers():
    write("virtio_pci_registers", "loop-bringup-kick",
          b"\x00" + pci_init() + pci_publish(0, 0, 0x10, 64) + pci_publish(1, 0, 0x100, 16)
          + b"\x04\x00" + b"\x00\x03\x00\x00")
    write("virtio_pci_registers", "loop-polling",
          b"\x00" + pci_init(qmask=1) + b"\x06\x01" + pci_publish(0, 1, 0x20, 8, how=0)
          + b"\x05" + b"\x06\x00" + b"\x05")
    write("virtio_pci_registers", "rng-bringup",
          b"\x03" + pci_init(qmask=1) + pci_publish(0, 0, 0x40, 200) + b"\x04\x00")
    write("virtio_pci_registers", "three-queues-sizes",
          b"\x02" + pci_init(f=0x40 | 0x20, qmask=7, extra=u16(64) + u16(1) + u16(3) + u16(2)
                               + u16(1) + u16(0xFFFF)))
    # The PCI_CFG window onto the status register and the ISR.
    write("virtio_pci_registers", "pci-cfg-window",
          b"\x00" + cfg_write(0x88, b"\x00") + cfg_write(0x8C, u32(0x14)) + cfg_write(0x90, u32(1))
          + cfg_write(0x94, b"\x01") + cfg_read(0x94, 1) + cfg_write(0x94, b"\x03")
          + cfg_write(0x8C, u32(0x1000)) + cfg_read(0x94, 1))
    # A poisoned buffer: the device fails, DEVICE_NEEDS_RESET, reset.
    write("virtio_pci_registers", "needs-reset",
          b"\x80" + pci_init(qmask=1) + b"\x09" + u16(0xA000) + b"\x00" + b"\xee"
          + pci_publish(0, 0, 0x0, 4, how=0x20 | 4, flags=0) + bar_write(0x14, b"\x00"))
    # Features refused (no VERSION_1), and a driver that clears bits.
    write("virtio_pci_registers", "features-refused",
          b"\x20" + pci_init(f=6) + bar_write(0x14, b"\x01") + bar_write(0x14, b"\x0f"))
    # Sizing BAR 0 and MSI-X enable through config space.
    write("virtio_pci_registers", "bar-sizing",
          b"\x00" + cfg_write(0x10, u32(0xFFFFFFFF)) + cfg_read(0x10, 4) + cfg_write(0x10, u32(0xFE000000))
          + cfg_write(0x9B, b"\xc0") + cfg_read(0x98, 4))


# --- grant_entries (src/grant_entries.rs) -----------------------------------------
GTF_PERMIT, GTF_TRANSITIVE, GTF_RO, GTF_SUB = 1, 3, 1 << 2, 1 << 8
HOST, DEVICE, RO = 2, 1, 4
NAME = {1: 0, 2: 1, 5: 2, 9: 3, 0x7FF0: 4}


def v1(flags, domid, frame):
    return u16(flags) + u16(domid) + u32(frame)


def v2(flags, domid, frame, page_off=0, length=0):
    return u16(flags) + u16(domid) + u16(page_off) + u16(length) + u64(frame)


def v2_trans(domid, trans_domid, gref):
    return u16(GTF_TRANSITIVE) + u16(domid) + u16(trans_domid) + u16(0) + u32(gref) + u32(0)


def g_map(caller, granter, gref, flags, host=1):
    return b"\x00" + u8(NAME[caller]) + u8(NAME[granter]) + u8(gref) + u8(flags) + u8(host)


def g_unmap_live(i, host_sel=1, dev_sel=0):
    return b"\x02" + u8(i << 1) + u8(host_sel + 3 * dev_sel)


def g_copy(caller, src, dst, length):
    return b"\x03" + u8(NAME[caller]) + src + dst + b"\x01" + u16(length)


def ptr_gref(dom, gref, off16=0):
    return b"\x01" + u8(NAME[dom]) + u8(gref) + u8(off16)


def ptr_local(gfn, off16=0):
    return b"\x00" + u8(gfn) + u8(off16)


def grant_entries():
    # v1 everywhere: the guest (5) grants frame 8 to 1, frame 9 read-only to 1, frame
    # 10 to 2.
    entries = v1(GTF_PERMIT, 1, 8) + v1(GTF_PERMIT | GTF_RO, 1, 9) + v1(GTF_PERMIT, 2, 10)
    write("grant_entries", "v1-map-copy-unmap",
          b"\x00" + b"\x03" + entries + b"\x00"
          + g_map(1, 5, 0, HOST) + g_map(1, 5, 1, HOST | RO) + g_map(1, 5, 1, HOST)
          + g_map(2, 5, 0, HOST) + g_copy(1, ptr_gref(5, 1), ptr_local(2), 128)
          + g_copy(1, ptr_local(2), ptr_gref(5, 1), 128) + g_copy(2, ptr_local(3), ptr_gref(5, 2, 4), 800)
          + g_unmap_live(0) + g_unmap_live(0, host_sel=0) + g_unmap_live(0))
    # v2 guest: full page, sub-page (copy only) and a transitive grant through 2.
    entries = (v2(GTF_PERMIT, 1, 8) + v2(GTF_PERMIT | GTF_SUB, 1, 9, page_off=256, length=512)
               + v2_trans(1, 2, 0))
    b_entries = v1(GTF_PERMIT, 5, 3)
    write("grant_entries", "v2-subpage-transitive",
          b"\x04" + b"\x03" + entries + b"\x01" + b_entries
          + g_map(1, 5, 0, HOST) + g_map(1, 5, 1, HOST)
          + g_copy(1, ptr_gref(5, 1, 16), ptr_local(2), 128)
          + g_copy(1, ptr_gref(5, 1, 0), ptr_local(2), 128)
          + g_copy(1, ptr_gref(5, 2), ptr_local(2), 256)
          + g_unmap_live(0))
    # Grants written by the guest op, version changes while mapped, domain death.
    grant_op = lambda who, r, kind, to, frame: b"\x04" + u8([1, 2, 5].index(who)) + u8(r) + u8(kind) + u8(NAME[to]) + u8(frame)
    set_version = lambda who, v: b"\x06" + u8(NAME[who]) + u8(v)
    destroy = lambda who: b"\x07" + u8([1, 2, 5].index(who))
    write("grant_entries", "grant-version-destroy",
          b"\x00" + b"\x00" + b"\x00"
          + grant_op(5, 4, 0, 1, 11) + grant_op(5, 5, 2, 1, 12)
          + g_map(1, 5, 4, HOST) + set_version(5, 2) + g_unmap_live(0)
          + set_version(5, 2) + grant_op(5, 4, 0, 1, 11) + g_map(1, 5, 4, HOST | RO)
          + destroy(5) + g_map(1, 5, 4, HOST) + g_unmap_live(0) + destroy(1))
    # A PV back-end (device maps) and raw writes into the entries while mapped.
    write("grant_entries", "pv-device-map-raw",
          b"\x08" + b"\x02" + v1(GTF_PERMIT, 1, 8) + v1(GTF_PERMIT, 1, 9) + b"\x00"
          + g_map(1, 5, 0, HOST | DEVICE) + g_map(1, 5, 1, DEVICE | RO)
          + b"\x05\x02" + u16(0) + b"\x01" + b"\x04\x00"
          + g_map(1, 5, 0, HOST) + b"\x02" + u8(0) + u8(1 + 3 * 1) + g_unmap_live(0, 0, 1))


requests()
blk_request()
host_tables()
host_tables_ivrs_iort()
vhost_user_wire()
virtio_pci_registers()
grant_entries()
