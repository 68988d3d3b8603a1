#!/usr/bin/env python3
"""Writes the seed corpus under tests/fuzz/corpus/<target>/ (small binary files).

Run from anywhere: python3 tests/fuzz/make_corpus.py. The files are committed;
rerun only when the input formats change.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- fuzz_vhost_user: 12-byte header + payload (reference section 4) ----
def msg(req, payload=b"", flags=0x1):
    return struct.pack("<III", req, flags, len(payload)) + payload


def region(gpa, size, uaddr, off):
    return struct.pack("<QQQQ", gpa, size, uaddr, off)


vu = {
    "get_features": msg(1, flags=0x1),
    "set_features": msg(2, struct.pack("<Q", (1 << 32) | (1 << 30) | (1 << 5))),
    "set_mem_table_2": msg(5, struct.pack("<II", 2, 0)
                           + region(0, 0x80000000, 0x7f0000000000, 0)
                           + region(0x100000000, 0x40000000, 0x7f4000000000, 0x80000000)),
    # Linux virtio_uml: a two-slot table announcing one region (72 bytes).
    "set_mem_table_uml": msg(5, struct.pack("<II", 1, 0)
                             + region(0x1000000, 0x1f000000, 0x1000000, 0x1000000)
                             + bytes(32)),
    "set_log_base": msg(6, struct.pack("<QQ", 0x10000, 0)),
    "set_vring_num": msg(8, struct.pack("<II", 2, 32)),
    "set_vring_addr": msg(9, struct.pack("<IIQQQQ", 2, 1, 0x7f0000001000, 0x7f0000002000,
                                         0x7f0000001200, 0x2000)),
    "set_vring_kick": msg(12, struct.pack("<Q", 2)),
    "set_vring_call_nofd": msg(13, struct.pack("<Q", 0x102)),
    "get_config": msg(24, struct.pack("<III", 0, 16, 0) + bytes(16), flags=0x9),
    "set_config_actual": msg(25, struct.pack("<III", 4, 4, 0) + struct.pack("<I", 1024)),
    "add_mem_reg": msg(37, struct.pack("<Q", 0) + region(0x200000000, 0x200000, 0x7f8000000000, 0)),
    "rem_mem_reg": msg(38, struct.pack("<Q", 0) + region(0x200000000, 0x200000, 0x7f8000000000, 0)),
    "set_device_state_fd": msg(42, struct.pack("<II", 0, 0)),
    "reply_u64": msg(1, struct.pack("<Q", 0), flags=0x5),
    # Message rules (docs/protocol.md "Message rules").
    "reply_flag_need_reply": msg(3, flags=0xd),
    "get_config_epoch": msg(24, struct.pack("<III", 16, 4, 0) + bytes(4)),
    "get_config_past_end": msg(24, struct.pack("<III", 16, 8, 0) + bytes(8)),
    "get_config_size_0": msg(24, struct.pack("<III", 4, 0, 0)),
    "get_config_offset_wraps": msg(24, struct.pack("<III", 0xfffffffc, 8, 0) + bytes(8)),
    "set_config_epoch": msg(25, struct.pack("<III", 16, 4, 1) + struct.pack("<I", 7)),
    "set_config_num_pages": msg(25, struct.pack("<III", 0, 4, 0) + struct.pack("<I", 7)),
    "set_features_no_version_1": msg(2, struct.pack("<Q", (1 << 30) | (1 << 5)), flags=0x9),
    "get_features_need_reply": msg(1, flags=0x9),
    "get_vring_base_bad_index": msg(11, struct.pack("<II", 9, 0)),
}
for name, data in vu.items():
    write("fuzz_vhost_user", name, data)

# ---- fuzz_virtqueue: [log2 num][flags][next_avail u16] + memory image ----
AVAIL, USED, MEM = 0x800, 0xA00, 0x2000


def ring(log2num, flags, descs, heads, extra=None, used_event=None, next_avail=0):
    num = 1 << log2num
    img = bytearray(MEM)
    for i, (addr, ln, fl, nx) in enumerate(descs):
        struct.pack_into("<QIHH", img, 16 * i, addr, ln, fl, nx)
    struct.pack_into("<HH", img, AVAIL, 0, (next_avail + len(heads)) & 0xffff)
    for i, h in enumerate(heads):
        struct.pack_into("<H", img, AVAIL + 4 + 2 * (((next_avail + i) % num)), h)
    if used_event is not None:
        struct.pack_into("<H", img, AVAIL + 4 + 2 * num, used_event)
    for off, data in (extra or {}).items():
        img[off:off + len(data)] = data
    # Trim trailing zeros: the fuzzer zero-fills the rest.
    body = bytes(img).rstrip(b"\0")
    return struct.pack("<BBH", log2num, flags, next_avail) + body


NEXT, WRITE, INDIRECT = 1, 2, 4
write("fuzz_virtqueue", "simple_chain",
      ring(2, 0, [(0x1000, 64, NEXT, 1), (0x2000, 4096, WRITE, 0)], [0]))
write("fuzz_virtqueue", "reporting_32",
      ring(5, 0, [((i + 1) << 21, 1 << 21, WRITE | (NEXT if i < 31 else 0), i + 1) for i in range(32)],
           [0]))
table = b"".join(struct.pack("<QIHH", 0x5000 + 0x1000 * i, 4096, WRITE | (NEXT if i < 2 else 0), i + 1)
                 for i in range(3))
write("fuzz_virtqueue", "indirect",
      ring(2, 1, [(0x1000, 48, INDIRECT, 0)], [0], extra={0x1000: table}))
write("fuzz_virtqueue", "event_idx_wrap",
      ring(3, 2, [(0x1000, 8, 0, 0), (0x2000, 8, WRITE, 0)], [0, 1, 0], used_event=1, next_avail=0xfffe))
write("fuzz_virtqueue", "loop",
      ring(2, 0, [(0x1000, 8, NEXT, 1), (0x2000, 8, NEXT, 0)], [0, 1]))
# A head offered again while still in flight (byte 1 bit 2: the device holds every chain).
write("fuzz_virtqueue", "head_in_flight",
      ring(3, 4, [(0x1000, 8, WRITE, 0), (0x2000, 8, WRITE, 0)], [0, 1, 0, 1]))


# ---- fuzz_admin: request lines for the admin socket (docs/admin.md) ----
admin = {
    "status": b'{"execute":"query-status","id":1}\n',
    "pause": b'{"execute":"pause-reclaim","arguments":{"vm":"web01"},"id":"a"}\n',
    "set_policy": b'{"execute":"set-policy","arguments":{"node":0,"mode":"lazy","rate-limit":1048576}}\n'
                  b'{"execute":"set-policy","arguments":{"vm":"x","paused":true}}\n',
    "types": b'{"execute":"types","arguments":{"s":"s","i":-1,"u":1,"b":false,"a":[1,[2]],"o":{"k":null}}}\n',
    "errors": b'not json\n[1,2]\n{"execute":5}\n{"execute":"nope"}\n{"execute":"attach","arguments":{"name":1}}\n'
              b'{"execute":"query-status","extra":1}\n{"execute":"throws"}\n',
    "unicode": rb'{"execute":"pause-reclaim","arguments":{"vm":"\u00e9\ud83d\ude00"}}' + b"\n",
    "bad_utf8": b'{"execute":"\xff\xfe"}\n{"execute":"pause-reclaim","arguments":{"vm":"\xc3"}}\n',
}
for name, data in admin.items():
    write("fuzz_admin", name, data)

# ---- fuzz_balloon_stats: one stats buffer, {le16 tag; le64 val} * n ----
def stats(*entries):
    return b"".join(struct.pack("<HQ", t, v) for t, v in entries)


linux61 = [(0, 0), (1, 0), (2, 12), (3, 34567), (4, 400 << 20), (5, 512 << 20),
           (6, 420 << 20), (7, 8 << 20), (8, 0), (9, 0)]
balloon_stats = {
    "linux_6_1": stats(*linux61),
    "linux_new": stats(*(linux61 + [(t, t) for t in range(10, 16)])),
    "unknown_tag": stats((4, 1 << 20), (99, 7)),
    "duplicate": stats((4, 1), (4, 2)),
    "empty": b"",
    "odd_length": stats((4, 1))[:-1],
}
for name, data in balloon_stats.items():
    write("fuzz_balloon_stats", name, data)

# ---- fuzz_device_state: migration blob, proto/include/fph/proto/device_state.h ----
def crc32c(data):
    crc = 0xffffffff
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82f63b78 if crc & 1 else crc >> 1
    return crc ^ 0xffffffff


assert crc32c(b"123456789") == 0xe3069283


def devstate(fields, version=1, flags=0):
    """Header + {le16 type; le16 length; value; zero padding to 4} fields, sealed."""
    body = b""
    for t, v in fields:
        body += struct.pack("<HH", t, len(v)) + v
        body += bytes(-len(body) % 4)
    blob = bytearray(struct.pack("<IHHII", 0x53485046, version, flags, 16 + len(body), 0) + body)
    struct.pack_into("<I", blob, 12, crc32c(blob))
    return bytes(blob)


ds_required = [
    (0x0001, struct.pack("<Q", (1 << 32) | (1 << 29) | (1 << 5) | (1 << 1))),
    (0x0002, struct.pack("<Q", 0x1b)),
    (0x0003, struct.pack("<IIII", 256, 128, 0, 0xaa)),
    (0x0004, struct.pack("<Q", 3)),
    (0x0005, struct.pack("<I", 1)),
    (0x0006, struct.pack("<I", 0x0f)),
]
ds_counters = (0x8001, struct.pack("<QQQQ", 1 << 30, 1 << 29, 4096, 1234))
ds_seeds = {
    "required_only": devstate(ds_required),
    "full": devstate(ds_required + [ds_counters, (0x8002, "web01@h\u00f4te".encode())]),
    "unknown_optional": devstate(ds_required[:3] + [(0x8123, b"hello")] + ds_required[3:]),
    "reversed": devstate(list(reversed(ds_required)) + [(0x8002, b"abcde")]),
    "unknown_required": devstate(ds_required + [(0x0007, struct.pack("<I", 1))]),
    "duplicate": devstate(ds_required + [ds_required[0]]),
    "missing_status": devstate(ds_required[:5]),
    "version_2": devstate(ds_required, version=2),
}
for name, data in ds_seeds.items():
    write("fuzz_device_state", name, data)


# ---- fuzz_session: programs for a real Session (tests/fuzz/fuzz_session.cpp) ----
# One opcode byte per step (op % 24), operands read on demand. The opcodes
# used here:
#   0 HANDSHAKE a      bit0 ADD_MEM_REG (else SET_MEM_TABLE), bit1 INDIRECT_DESC,
#                      bit2 STATS_VQ, bits3-4 num {32,8,256,1}, bit5 ring in mem1,
#                      bit6 NEED_REPLY on every message
#   5 REM_MEM_REG fl spec      spec % 3 = memfd, (spec/3) % 6 = variant (0 as the guest sees it)
#   6 SET_VRING_NUM fl q v     q >= 5: the reporting ring; v < 0x80: 1 << (v % 11), else (v & 0x7f) * 3
#   12 GET_VRING_BASE fl q   q % 7: 0-4 that ring, 5 out of range (closes), 6 the reporting ring
#   17 OFFER qb n-1 chains...  qb bit7: do not kick; chain kinds: 0-3 valid (nb-1, then
#                              (mem, page, pages-1) per buffer), 4 loop, 5 next out of range,
#                              6 indirect, 7 special (sub: 0 a head again, 1 PFN array, 2 outside,
#                              3 misaligned, 4 huge length, 5 readable, 6 head out of range)
#   18 KICK q   19 TRUNCATE mem frac(/4)   20 WAIT ms   21 RESET fl which
HS, REM, NUM, GVB, OFFER, KICK, TRUNC, WAIT, RESET = 0, 5, 6, 12, 17, 18, 19, 20, 21
REP = 5  # "the reporting ring, whatever its index"


def valid_chain(*bufs):
    out = bytes([0, len(bufs) - 1])
    for mem, page, pages in bufs:
        out += bytes([mem, page, pages - 1])
    return out


def offer(*chains, kick=True):
    return bytes([OFFER, REP | (0 if kick else 0x80), len(chains) - 1]) + b"".join(chains)


session = {
    # A full honest handshake, two reporting rounds, then the ring is stopped.
    "honest": bytes([HS, 0x00]) + offer(valid_chain((0, 0, 8), (1, 3, 2))) + bytes([WAIT, 1])
              + offer(valid_chain((0, 40, 8)), valid_chain((1, 100, 4), (1, 120, 4), (0, 200, 1)))
              + bytes([GVB, 1, 6]),
    "honest_add_mem_reg_acked": bytes([HS, 0x41]) + offer(valid_chain((0, 10, 4)))
                                + offer(valid_chain((1, 0, 8)), valid_chain((0, 90, 8))),
    "honest_indirect_stats_mem1": bytes([HS, 0x26])
                                  + offer(bytes([6, 2, 0, 5, 1, 1, 9, 2, 0, 0, 3, 0])) + bytes([WAIT, 2]),
    # The ring's region is removed, then the driver reports and kicks.
    "rem_ring_region_kick": bytes([HS, 0x00]) + offer(valid_chain((0, 0, 8)), kick=False)
                            + bytes([REM, 1, 0]) + bytes([KICK, REP]) + offer(valid_chain((1, 5, 5))),
    # SET_VRING_NUM refused (not a power of two, then ring_busy), then a kick.
    "bad_vring_num_kick": bytes([HS, 0x40]) + bytes([NUM, 1, REP, 0x85]) + offer(valid_chain((0, 1, 1)))
                          + bytes([NUM, 1, REP, 3]) + offer(valid_chain((1, 7, 3)), valid_chain((0, 9, 2))),
    # The front end shrinks guest RAM under a running ring.
    "truncate_running": bytes([HS, 0x00]) + offer(valid_chain((0, 0, 8)), kick=False)
                        + bytes([TRUNC, 0, 1, KICK, REP]) + offer(valid_chain((0, 2, 2))),
    "truncate_ring_mem1": bytes([HS, 0x20]) + offer(valid_chain((1, 0, 4)))
                          + bytes([TRUNC, 1, 0]) + offer(valid_chain((1, 1, 1))),
    # A head offered again while in flight (not kicked in between).
    "duplicate_head": bytes([HS, 0x00]) + offer(valid_chain((0, 0, 4)), kick=False)
                      + offer(bytes([7, 0, 0])),
    # Broken chains: loop, next out of range, outside memory, huge length, head out of range.
    "broken_chains": bytes([HS, 0x02])
                     + offer(bytes([4, 0, 1, 1, 1, 2, 1]), bytes([5, 0, 3, 1, 9]),
                             bytes([7, 2, 0, 0, 0, 0xff, 0xff, 0, 0]), bytes([7, 4, 0, 5, 1]))
                     + offer(bytes([7, 6, 3]), bytes([7, 1, 0, 0, 0, 4, 0, 12]), valid_chain((0, 30, 2))),
    # Device reset with requests in flight, then set up again.
    "reset_and_again": bytes([HS, 0x00]) + offer(valid_chain((0, 0, 8)), kick=False)
                       + bytes([RESET, 1, 2]) + bytes([HS, 0x08]) + offer(valid_chain((1, 0, 2))),
}
for name, data in session.items():
    write("fuzz_session", name, data)
