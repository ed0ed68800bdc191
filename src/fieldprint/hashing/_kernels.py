"""Triton kernels of BLAKE3 (O'Connor et al. 2020): chunk compression and parent reduction.

Words are uint32 vectors over a tile of chunks (or parent nodes): lane i of a program owns one
chunk and keeps its 16-word state, its 16 message words and its 8-word chaining value in
registers. Inputs arrive as little-endian int32 words, rows zero-padded to a multiple of 4 bytes.
"""

import triton
import triton.language as tl

# Domain flags of the BLAKE3 specification.
CHUNK_START = tl.constexpr(1)
CHUNK_END = tl.constexpr(2)
PARENT = tl.constexpr(4)
ROOT = tl.constexpr(8)
KEYED_HASH = 16  # host side: passed in as key_flags

CHUNK_LEN = 1024


@triton.jit
def _g(a, b, c, d, mx, my):
    # uint32 rotations written as shift pairs; ptxas turns each pair into one funnel shift (SHF)
    a = a + b + mx
    d = d ^ a
    d = (d >> 16) | (d << 16)
    c = c + d
    b = b ^ c
    b = (b >> 12) | (b << 20)
    a = a + b + my
    d = d ^ a
    d = (d >> 8) | (d << 24)
    c = c + d
    b = b ^ c
    b = (b >> 7) | (b << 25)
    return a, b, c, d


@triton.jit
def _round(s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15,
           m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15):
    # columns, then diagonals
    s0, s4, s8, s12 = _g(s0, s4, s8, s12, m0, m1)
    s1, s5, s9, s13 = _g(s1, s5, s9, s13, m2, m3)
    s2, s6, s10, s14 = _g(s2, s6, s10, s14, m4, m5)
    s3, s7, s11, s15 = _g(s3, s7, s11, s15, m6, m7)
    s0, s5, s10, s15 = _g(s0, s5, s10, s15, m8, m9)
    s1, s6, s11, s12 = _g(s1, s6, s11, s12, m10, m11)
    s2, s7, s8, s13 = _g(s2, s7, s8, s13, m12, m13)
    s3, s4, s9, s14 = _g(s3, s4, s9, s14, m14, m15)
    return s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15


@triton.jit
def _compress(h0, h1, h2, h3, h4, h5, h6, h7,
              m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15,
              t_lo, t_hi, blen, flags):
    """One BLAKE3 compression; returns the first 8 output words (the chaining value, or the
    32-byte digest when flags has ROOT). All arguments are uint32 (vectors or scalars)."""
    s0, s1, s2, s3, s4, s5, s6, s7 = h0, h1, h2, h3, h4, h5, h6, h7
    z = t_lo ^ t_lo  # a zero of the lane shape, to broadcast the IV
    s8 = z + 0x6A09E667
    s9 = z + 0xBB67AE85
    s10 = z + 0x3C6EF372
    s11 = z + 0xA54FF53A
    s12 = t_lo
    s13 = t_hi
    s14 = blen
    s15 = flags
    # The message permutation of each round is applied by renaming the arguments.
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15 = _round(
        s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15,
        m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15)
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15 = _round(
        s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15,
        m2, m6, m3, m10, m7, m0, m4, m13, m1, m11, m12, m5, m9, m14, m15, m8)
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15 = _round(
        s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15,
        m3, m4, m10, m12, m13, m2, m7, m14, m6, m5, m9, m0, m11, m15, m8, m1)
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15 = _round(
        s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15,
        m10, m7, m12, m9, m14, m3, m13, m15, m4, m0, m11, m2, m5, m8, m1, m6)
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15 = _round(
        s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15,
        m12, m13, m9, m11, m15, m10, m14, m8, m7, m2, m5, m3, m0, m1, m6, m4)
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15 = _round(
        s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15,
        m9, m14, m11, m5, m8, m12, m15, m1, m13, m3, m0, m10, m2, m6, m4, m7)
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15 = _round(
        s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15,
        m11, m15, m5, m0, m1, m9, m8, m6, m14, m10, m2, m12, m3, m4, m7, m13)
    return s0 ^ s8, s1 ^ s9, s2 ^ s10, s3 ^ s11, s4 ^ s12, s5 ^ s13, s6 ^ s14, s7 ^ s15


@triton.jit
def _u32(x):
    return x.to(tl.uint32, bitcast=True)


@triton.jit
def _split(x, N: tl.constexpr, HALF: tl.constexpr):
    # [N, 2*HALF] -> even and odd columns, [N, HALF] each (HALF == 1 gives [N] vectors)
    if HALF == 1:
        return tl.split(x)
    else:
        return tl.split(tl.reshape(x, [N, HALF, 2]))


@triton.jit
def _words16(x, N: tl.constexpr):
    """[N, 16] -> its 16 columns as [N] vectors, by three levels of even/odd splitting."""
    e, o = _split(x, N, 8)  # words 2k, 2k+1
    ee, eo = _split(e, N, 4)  # 4k, 4k+2
    oe, oo = _split(o, N, 4)  # 4k+1, 4k+3
    eee, eeo = _split(ee, N, 2)  # 8k, 8k+4
    eoe, eoo = _split(eo, N, 2)  # 8k+2, 8k+6
    oee, oeo = _split(oe, N, 2)  # 8k+1, 8k+5
    ooe, ooo = _split(oo, N, 2)  # 8k+3, 8k+7
    w0, w8 = _split(eee, N, 1)
    w4, w12 = _split(eeo, N, 1)
    w2, w10 = _split(eoe, N, 1)
    w6, w14 = _split(eoo, N, 1)
    w1, w9 = _split(oee, N, 1)
    w5, w13 = _split(oeo, N, 1)
    w3, w11 = _split(ooe, N, 1)
    w7, w15 = _split(ooo, N, 1)
    return w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15


@triton.jit
def chunk_kernel(x_ptr, out_ptr, n_chunks, C, L, W, n_blocks,
                 k0, k1, k2, k3, k4, k5, k6, k7, key_flags,
                 BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Chaining values of all chunks of N rows, one chunk per lane.

    x_ptr: [N, W] int32 words of the rows (L bytes each, zero-padded to W = ceil(L/4) words);
    n_blocks = min(16, max(1, ceil(L / 64))) blocks are visited per chunk.
    out_ptr: [N * C, 8] int32, C = max(1, ceil(L / 1024)) chunks per row. When C == 1 the
    chunk is the root and its output is the digest. ALIGNED: W % 16 == 0, so a 64-byte block
    is either wholly inside its row or wholly outside, and the load mask is one per block
    (which lets each thread load 16 bytes at once).
    """
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # global chunk index (int64 offsets)
    valid = g < n_chunks
    row = g // C
    ci = g - row * C  # chunk index inside its row = the BLAKE3 chunk counter
    clen = tl.minimum(L - ci * 1024, 1024)  # bytes in this chunk (0 only for the empty input)
    last = tl.maximum((clen + 63) // 64 - 1, 0)  # index of the chunk's final block
    is_root = C == 1
    t_lo = ci.to(tl.uint32)
    t_hi = (ci >> 32).to(tl.uint32)
    chunk_word = ci * 256  # first word of the chunk within its row
    row_ptr = x_ptr + row * W
    cols = tl.arange(0, 16)
    kf = _u32(key_flags)
    h0 = t_lo * 0 + _u32(k0)
    h1 = t_lo * 0 + _u32(k1)
    h2 = t_lo * 0 + _u32(k2)
    h3 = t_lo * 0 + _u32(k3)
    h4 = t_lo * 0 + _u32(k4)
    h5 = t_lo * 0 + _u32(k5)
    h6 = t_lo * 0 + _u32(k6)
    h7 = t_lo * 0 + _u32(k7)
    b = 0
    # a while loop: the interpreter of triton 3.6 cannot range() over a runtime scalar
    while b < n_blocks:  # 16, fewer only when every row is shorter than one chunk
        word = chunk_word + b * 16  # [BLOCK]
        offs = word[:, None] + cols[None, :]  # [BLOCK, 16]
        if ALIGNED:
            inside = (word < W)[:, None]
        else:
            inside = offs < W
        blk = tl.load(row_ptr[:, None] + offs, mask=valid[:, None] & inside, other=0)
        m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15 = _words16(
            _u32(blk), BLOCK)
        blen = tl.minimum(tl.maximum(clen - b * 64, 0), 64).to(tl.uint32)
        at_end = b == last
        flags = (kf | tl.where(b == 0, CHUNK_START, 0) | tl.where(at_end, CHUNK_END, 0)
                 | tl.where(at_end & is_root, ROOT, 0)).to(tl.uint32)
        n0, n1, n2, n3, n4, n5, n6, n7 = _compress(
            h0, h1, h2, h3, h4, h5, h6, h7,
            m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15,
            t_lo, t_hi, blen, flags)
        live = b <= last
        h0 = tl.where(live, n0, h0)
        h1 = tl.where(live, n1, h1)
        h2 = tl.where(live, n2, h2)
        h3 = tl.where(live, n3, h3)
        h4 = tl.where(live, n4, h4)
        h5 = tl.where(live, n5, h5)
        h6 = tl.where(live, n6, h6)
        h7 = tl.where(live, n7, h7)
        b += 1
    o = out_ptr + g * 8
    tl.store(o + 0, h0.to(tl.int32, bitcast=True), mask=valid)
    tl.store(o + 1, h1.to(tl.int32, bitcast=True), mask=valid)
    tl.store(o + 2, h2.to(tl.int32, bitcast=True), mask=valid)
    tl.store(o + 3, h3.to(tl.int32, bitcast=True), mask=valid)
    tl.store(o + 4, h4.to(tl.int32, bitcast=True), mask=valid)
    tl.store(o + 5, h5.to(tl.int32, bitcast=True), mask=valid)
    tl.store(o + 6, h6.to(tl.int32, bitcast=True), mask=valid)
    tl.store(o + 7, h7.to(tl.int32, bitcast=True), mask=valid)


@triton.jit
def parent_kernel(in_ptr, out_ptr, n_out, M, Mo,
                  k0, k1, k2, k3, k4, k5, k6, k7, key_flags,
                  BLOCK: tl.constexpr):
    """One level of the BLAKE3 tree for N rows: in [N, M, 8] -> out [N, Mo = ceil(M/2), 8].

    Node 2i and 2i+1 merge into a parent; an odd last node moves up unchanged. Pairing
    bottom-up with that carry builds exactly BLAKE3's left-complete tree. M == 2 is the root.
    """
    pid = tl.program_id(0)
    o = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = o < n_out
    row = o // Mo
    i = o - row * Mo
    pair = valid & (2 * i + 1 < M)
    src = in_ptr + (row * M + 2 * i) * 8
    cols = tl.arange(0, 16)
    blk = tl.load(src[:, None] + cols[None, :],
                  mask=valid[:, None] & ((cols[None, :] < 8) | pair[:, None]), other=0)
    m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15 = _words16(
        _u32(blk), BLOCK)
    z = o.to(tl.uint32) * 0
    flags = (_u32(key_flags) | PARENT | tl.where(M == 2, ROOT, 0)).to(tl.uint32)
    n0, n1, n2, n3, n4, n5, n6, n7 = _compress(
        z + _u32(k0), z + _u32(k1), z + _u32(k2), z + _u32(k3),
        z + _u32(k4), z + _u32(k5), z + _u32(k6), z + _u32(k7),
        m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15,
        z, z, z + 64, z + flags)
    d = out_ptr + o * 8
    tl.store(d + 0, tl.where(pair, n0, m0).to(tl.int32, bitcast=True), mask=valid)
    tl.store(d + 1, tl.where(pair, n1, m1).to(tl.int32, bitcast=True), mask=valid)
    tl.store(d + 2, tl.where(pair, n2, m2).to(tl.int32, bitcast=True), mask=valid)
    tl.store(d + 3, tl.where(pair, n3, m3).to(tl.int32, bitcast=True), mask=valid)
    tl.store(d + 4, tl.where(pair, n4, m4).to(tl.int32, bitcast=True), mask=valid)
    tl.store(d + 5, tl.where(pair, n5, m5).to(tl.int32, bitcast=True), mask=valid)
    tl.store(d + 6, tl.where(pair, n6, m6).to(tl.int32, bitcast=True), mask=valid)
    tl.store(d + 7, tl.where(pair, n7, m7).to(tl.int32, bitcast=True), mask=valid)
