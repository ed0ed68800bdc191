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

# Key words and flags are data, not shapes: a word equal to 1 must not become a constexpr.
_KEY_ARGS = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "key_flags"]

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
def store_cv(o, h0, h1, h2, h3, h4, h5, h6, h7, valid):
    """Store eight uint32 chaining-value words per lane at ``o + 0 .. o + 7`` (int32 buffer)."""
    tl.store(o + 0, h0.to(tl.int32, bitcast=True), mask=valid)
    tl.store(o + 1, h1.to(tl.int32, bitcast=True), mask=valid)
    tl.store(o + 2, h2.to(tl.int32, bitcast=True), mask=valid)
    tl.store(o + 3, h3.to(tl.int32, bitcast=True), mask=valid)
    tl.store(o + 4, h4.to(tl.int32, bitcast=True), mask=valid)
    tl.store(o + 5, h5.to(tl.int32, bitcast=True), mask=valid)
    tl.store(o + 6, h6.to(tl.int32, bitcast=True), mask=valid)
    tl.store(o + 7, h7.to(tl.int32, bitcast=True), mask=valid)


@triton.jit
def _split(x, N: tl.constexpr, HALF: tl.constexpr):
    # [N, 2*HALF] -> even and odd columns, [N, HALF] each (HALF == 1 gives [N] vectors)
    if HALF == 1:
        return tl.split(x)
    else:
        return tl.split(tl.reshape(x, [N, HALF, 2]))


@triton.jit
def _load4(row_ptr, word, cols, valid, W, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Words word .. word+3 of each lane's row as four [BLOCK] uint32 vectors (0 past W)."""
    offs = word[:, None] + cols[None, :]  # [BLOCK, 4]
    if ALIGNED:
        inside = (word < W)[:, None]
    else:
        inside = offs < W
    q = _u32(tl.load(row_ptr[:, None] + offs, mask=valid[:, None] & inside, other=0))
    a, b = _split(q, BLOCK, 2)  # words 0, 2 and 1, 3
    w0, w2 = _split(a, BLOCK, 1)
    w1, w3 = _split(b, BLOCK, 1)
    return w0, w1, w2, w3


@triton.jit(do_not_specialize=_KEY_ARGS)
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
    cols = tl.arange(0, 4)
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
        # four 16-byte loads per chunk: each lane owns its chunk's words, no shuffles needed
        m0, m1, m2, m3 = _load4(row_ptr, word, cols, valid, W, BLOCK, ALIGNED)
        m4, m5, m6, m7 = _load4(row_ptr, word + 4, cols, valid, W, BLOCK, ALIGNED)
        m8, m9, m10, m11 = _load4(row_ptr, word + 8, cols, valid, W, BLOCK, ALIGNED)
        m12, m13, m14, m15 = _load4(row_ptr, word + 12, cols, valid, W, BLOCK, ALIGNED)
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
    store_cv(o, h0, h1, h2, h3, h4, h5, h6, h7, valid)


@triton.jit
def _node_words(base, node, ok):
    """8 words of node `node` (int64 [BLOCK]) at base ([*, 8] int32), zeros where not ok."""
    cols = tl.arange(0, 4)
    ptr = base + node * 8
    BLOCK: tl.constexpr = node.shape[0]
    lo = _u32(tl.load(ptr[:, None] + cols[None, :], mask=ok[:, None], other=0))
    hi = _u32(tl.load(ptr[:, None] + 4 + cols[None, :], mask=ok[:, None], other=0))
    a, b = _split(lo, BLOCK, 2)
    w0, w2 = _split(a, BLOCK, 1)
    w1, w3 = _split(b, BLOCK, 1)
    c, d = _split(hi, BLOCK, 2)
    w4, w6 = _split(c, BLOCK, 1)
    w5, w7 = _split(d, BLOCK, 1)
    return w0, w1, w2, w3, w4, w5, w6, w7


@triton.jit
def _merge(k0, k1, k2, k3, k4, k5, k6, k7, flags, pair,
           l0, l1, l2, l3, l4, l5, l6, l7, r0, r1, r2, r3, r4, r5, r6, r7):
    """Parent of (l, r) where pair, else l carried up unchanged."""
    z = l0 ^ l0
    n0, n1, n2, n3, n4, n5, n6, n7 = _compress(
        z + k0, z + k1, z + k2, z + k3, z + k4, z + k5, z + k6, z + k7,
        l0, l1, l2, l3, l4, l5, l6, l7, r0, r1, r2, r3, r4, r5, r6, r7,
        z, z, z + 64, flags)
    return (tl.where(pair, n0, l0), tl.where(pair, n1, l1), tl.where(pair, n2, l2),
            tl.where(pair, n3, l3), tl.where(pair, n4, l4), tl.where(pair, n5, l5),
            tl.where(pair, n6, l6), tl.where(pair, n7, l7))


@triton.jit(do_not_specialize=_KEY_ARGS)
def parent_kernel(in_ptr, out_ptr, n_out, M, Mo,
                  k0, k1, k2, k3, k4, k5, k6, k7, key_flags,
                  BLOCK: tl.constexpr):
    """Two levels of the BLAKE3 tree for N rows: in [N, M, 8] -> out [N, Mo = ceil(M/4), 8].

    Lane j reduces nodes 4j..4j+3 of its row: (4j, 4j+1) and (4j+2, 4j+3) merge into parents,
    then those two; a node without a right neighbour moves up unchanged. Pairing bottom-up with
    that carry builds exactly BLAKE3's left-complete tree. The compression that leaves a single
    node (M == 2 on the first level, ceil(M/2) == 2 on the second) carries ROOT.
    """
    pid = tl.program_id(0)
    o = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = o < n_out
    row = o // Mo
    j = o - row * Mo
    first = row * M + 4 * j  # node 4j of this row
    has1 = valid & (4 * j + 1 < M)
    has2 = valid & (4 * j + 2 < M)
    has3 = valid & (4 * j + 3 < M)
    kf = _u32(key_flags) | PARENT
    flags_a = (kf | tl.where(M == 2, ROOT, 0)).to(tl.uint32)
    m2 = (M + 1) // 2
    flags_b = (kf | tl.where(m2 == 2, ROOT, 0)).to(tl.uint32)
    a0, a1, a2, a3, a4, a5, a6, a7 = _node_words(in_ptr, first, valid)
    b0, b1, b2, b3, b4, b5, b6, b7 = _node_words(in_ptr, first + 1, has1)
    k0 = _u32(k0)
    k1 = _u32(k1)
    k2 = _u32(k2)
    k3 = _u32(k3)
    k4 = _u32(k4)
    k5 = _u32(k5)
    k6 = _u32(k6)
    k7 = _u32(k7)
    p0, p1, p2, p3, p4, p5, p6, p7 = _merge(
        k0, k1, k2, k3, k4, k5, k6, k7, flags_a, has1,
        a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7)
    a0, a1, a2, a3, a4, a5, a6, a7 = _node_words(in_ptr, first + 2, has2)
    b0, b1, b2, b3, b4, b5, b6, b7 = _node_words(in_ptr, first + 3, has3)
    q0, q1, q2, q3, q4, q5, q6, q7 = _merge(
        k0, k1, k2, k3, k4, k5, k6, k7, flags_a, has3,
        a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7)
    r0, r1, r2, r3, r4, r5, r6, r7 = _merge(
        k0, k1, k2, k3, k4, k5, k6, k7, flags_b, has2,
        p0, p1, p2, p3, p4, p5, p6, p7, q0, q1, q2, q3, q4, q5, q6, q7)
    d = out_ptr + o * 8
    tl.store(d + 0, r0.to(tl.int32, bitcast=True), mask=valid)
    tl.store(d + 1, r1.to(tl.int32, bitcast=True), mask=valid)
    tl.store(d + 2, r2.to(tl.int32, bitcast=True), mask=valid)
    tl.store(d + 3, r3.to(tl.int32, bitcast=True), mask=valid)
    tl.store(d + 4, r4.to(tl.int32, bitcast=True), mask=valid)
    tl.store(d + 5, r5.to(tl.int32, bitcast=True), mask=valid)
    tl.store(d + 6, r6.to(tl.int32, bitcast=True), mask=valid)
    tl.store(d + 7, r7.to(tl.int32, bitcast=True), mask=valid)
