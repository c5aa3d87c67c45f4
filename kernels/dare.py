"""DARE drop masks from a counter-based hash: one mask per (seed, key, input), whatever the device
or the chunking.

Math. Entry k (flat index in the key) of input i is kept iff its draw v_i(k) >= T, where
v_i(k) = H(a_i·k + c_i mod 2^32) XOR 2^31, a 32-bit word read as unsigned, and
T = min(round(p·2^32), 2^32 - 1). The keep probability is q = 1 - T/2^32 (within 2^-33 of
1 - p) and kept entries are scaled by 1/q, so the dropped task vector is unbiased.
H is the "lowbias32" integer hash (C. Wellons, hash-prospector): x ^= x >> 16; x *= 0x7feb352d;
x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16 (logical shifts, products mod 2^32); a bijection
of 32-bit words with low avalanche bias. a_i (odd) and c_i come from splitmix64 (Steele et al.,
OOPSLA 2014) of the key's seed and i, so inputs and keys read different arithmetic progressions.

In torch: int32 tensors, whose products wrap mod 2^32 on CPU and CUDA (a test checks the bits
against Python integers); a logical shift is the arithmetic shift masked. The XOR with 2^31 is
not done: the signed int32 h equals v - 2^31, so v >= T is h >= T - 2^31.
Why not torch.Generator: CPU (mt19937) and CUDA (Philox) streams differ and a stream depends on
the chunk boundaries, so a merge with a drop depended on the device. This one does not, and it
costs ~0.6x a CPU `uniform_` draw (~15 int32 ops in cache per entry; 1.4 against 2.1-2.6 ns).
Reference: L. Yu et al., "Language models are Super Mario" (DARE), ICML 2024.
"""
from __future__ import annotations

import torch

from .errors import MergeInputError
from .gram import scratch

M32 = (1 << 32) - 1
M64 = (1 << 64) - 1
MAX_ELEMENTS = 1 << 31  # int32 indices
HASH_ELEMENTS = 1 << 22  # per int32 scratch (16 MiB): all rows of a CPU chunk, one row of a CUDA one


def splitmix64(state: int) -> int:
    """The output of splitmix64 for one state (state already advanced by the caller)."""
    z = state & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def stream_constants(key_seed: int, n: int) -> list[tuple[int, int]]:
    """(a_i, c_i) as unsigned 32-bit ints for inputs i = 0..n-1; a_i odd."""
    out = []
    for i in range(n):
        z = splitmix64(key_seed + (i + 1) * 0x9E3779B97F4A7C15)
        out.append(((z & M32) | 1, z >> 32))
    return out


def threshold(p: float) -> int:
    """T in [0, 2^32 - 1]: an entry is kept iff its draw (uniform on [0, 2^32)) is >= T."""
    return min(round(p * (1 << 32)), M32)


def keep_scale(p: float) -> float:
    """1/q, q = 1 - T/2^32 the exact keep probability."""
    return float(1 << 32) / float((1 << 32) - threshold(p))


def _signed(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


def _logical_xorshift_(x: torch.Tensor, s: int, tmp: torch.Tensor) -> None:
    torch.bitwise_right_shift(x, s, out=tmp)
    tmp.bitwise_and_((1 << (32 - s)) - 1)
    x.bitwise_xor_(tmp)


def lowbias32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """H applied in place to an int32 tensor (tmp: int32 scratch of x's shape)."""
    _logical_xorshift_(x, 16, tmp)
    x.mul_(_signed(0x7FEB352D))
    _logical_xorshift_(x, 15, tmp)
    x.mul_(_signed(0x846CA68B))
    _logical_xorshift_(x, 16, tmp)
    return x


class DropMask:
    """Keep masks for n inputs of one key: keep(a, e, out) writes 1.0 where entries a..e-1 are kept
    and 0.0 where dropped, for every input at once (out: (n, e - a), float or uint8)."""

    def __init__(self, p: float, key_seed: int, n: int, numel: int, device):
        if numel > MAX_ELEMENTS:
            raise MergeInputError(f"a drop needs keys of at most 2^31 elements; this one has {numel}")
        self.scale = keep_scale(p)
        self._bound = threshold(p) - (1 << 31)  # h >= bound <=> v >= T
        consts = stream_constants(int(key_seed), n)
        self._a = torch.tensor([[_signed(a)] for a, _ in consts], dtype=torch.int32, device=device)
        self._c = torch.tensor([[_signed(c)] for _, c in consts], dtype=torch.int32, device=device)
        self._device = device
        self._n = n

    def keep(self, a: int, e: int, out: torch.Tensor) -> torch.Tensor:
        m = e - a
        idx = scratch("dare.index", (1, m), torch.int32, self._device)
        torch.arange(a, e, dtype=torch.int32, device=self._device, out=idx[0])
        group = max(1, HASH_ELEMENTS // max(m, 1))  # rows hashed at once: a bounded int32 scratch
        for r in range(0, self._n, group):
            rows = slice(r, min(self._n, r + group))
            h = scratch("dare.hash", (rows.stop - r, m), torch.int32, self._device)
            tmp = scratch("dare.tmp", (rows.stop - r, m), torch.int32, self._device)
            torch.mul(idx, self._a[rows], out=h)
            h.add_(self._c[rows])
            lowbias32_(h, tmp)
            torch.ge(h, self._bound, out=out[rows])
        return out

