"""The frozen entries of one tensor: where they are (packed), and their saved values.

Two representations of "where", whichever is smaller for the tensor at hand:
- bits: one bit per entry (1 = frozen), little bit order as in mask files: n/8 bytes;
- indices: the flat positions of the frozen entries, int32 (int64 past 2^31 entries):
  4 f n bytes, smaller than the bits when the frozen fraction f is below 1/32.
Plus the frozen values themselves, in the tensor's own dtype (f n itemsize bytes): what
is written back after every optimizer step, so frozen entries stay bitwise fixed.
"""

from __future__ import annotations

import numpy as np
import torch

from ckptprobe.errors import UsageError

# Entries per chunk when unpacking bits on the device: bounds the scratch (a uint8 and a
# bool per entry, plus CUDA's int64 prefix sum in masked_scatter_) to a few hundred MiB.
CHUNK = 1 << 24  # a multiple of 8, so chunks start on byte boundaries


def _flat(t: torch.Tensor, what: str) -> torch.Tensor:
    if not t.is_contiguous():
        raise UsageError(f"{what} is not contiguous: its frozen entries cannot be restored in place")
    return t.view(-1)


_TABLES: dict[torch.device, torch.Tensor] = {}


def _unpack(bits: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (ceil(n/8),) little bit order -> bool (n,), on the bits' device: one lookup per byte."""
    table = _TABLES.get(bits.device)
    if table is None:  # (256, 8) bool: the bits of each byte value, lowest first
        shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
        table = _TABLES[bits.device] = ((torch.arange(256, dtype=torch.uint8, device=bits.device)[:, None]
                                         >> shifts) & 1).bool()
    return table.index_select(0, bits.int()).view(-1)[:n]


class Frozen:
    """Frozen entries of one (local) tensor `t`, saved from `t` as it is now.

    keep: bool numpy array shaped like `t` (True = trained), or None when all of `t` is frozen.
    `name` only labels errors.
    """

    def __init__(self, name: str, t: torch.Tensor, keep: np.ndarray | None):
        self.name = name
        flat = _flat(t.detach(), name)
        self.numel = n = flat.numel()
        self.kind, self.where, self.counts = "all", None, []
        with torch.no_grad():
            if keep is None:
                self.values = flat.clone()
                return
            frozen = ~np.asarray(keep, bool).reshape(-1)
            n_frozen = int(np.count_nonzero(frozen))
            index_dtype = np.int32 if n < 2**31 else np.int64
            if n_frozen * np.dtype(index_dtype).itemsize * 8 < n:
                self.kind = "indices"
                self.where = torch.from_numpy(np.flatnonzero(frozen).astype(index_dtype)).to(t.device)
                self.values = flat[self.where]  # advanced indexing: a copy
                return
            self.kind = "bits"
            self.where = torch.from_numpy(np.packbits(frozen, bitorder="little")).to(t.device)
            parts = []
            for s in range(0, n, CHUNK):
                m = _unpack(self.where[s // 8:(min(s + CHUNK, n) + 7) // 8], min(CHUNK, n - s))
                parts.append(flat[s:s + CHUNK][m])
            self.counts = [len(p) for p in parts]
            self.values = torch.cat(parts)

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed positions plus the saved values."""
        where = 0 if self.where is None else self.where.numel() * self.where.element_size()
        return where + self.values.numel() * self.values.element_size()

    def _chunks(self):
        """(start, frozen bool mask of the chunk, saved values of the chunk) per chunk, for bits."""
        offset = 0
        for i, s in enumerate(range(0, self.numel, CHUNK)):
            size = min(CHUNK, self.numel - s)
            yield s, size, _unpack(self.where[s // 8:(s + size + 7) // 8], size), self.values[offset:offset + self.counts[i]]
            offset += self.counts[i]

    def check(self, t: torch.Tensor) -> None:
        """Refuse a tensor that is not the one the values were saved from: `model.to(dtype or device)` after the
        masks were applied keeps the parameters but swaps their data, and the step would then move frozen entries
        that could not be written back."""
        if t.dtype != self.values.dtype or t.device != self.values.device or t.numel() != self.numel:
            raise UsageError(f"{self.name} is now {t.dtype} on {t.device} ({t.numel():,} entries); its masks were "
                             f"applied to {self.values.dtype} on {self.values.device} ({self.numel:,}): frozen "
                             "entries could not be kept bitwise", hint="apply the masks after moving the model to "
                                                                       "its device and dtype")

    @torch.no_grad()
    def zero(self, grad: torch.Tensor) -> None:
        """Zero the frozen entries of `grad` (shaped like the tensor) in place; a NaN there becomes 0 too."""
        g = _flat(grad, f"the gradient of {self.name}")
        if self.kind == "all":
            g.zero_()
        elif self.kind == "indices":
            g.index_put_((self.where,), g.new_zeros(()))
        else:
            for s, size, m, _ in self._chunks():
                g[s:s + size].masked_fill_(m, 0)

    @torch.no_grad()
    def restore(self, t: torch.Tensor) -> None:
        """Write the saved values back into the frozen entries of `t`."""
        flat = _flat(t, self.name)
        if self.kind == "all":
            flat.copy_(self.values)
        elif self.kind == "indices":
            flat.index_put_((self.where,), self.values)
        else:
            for s, size, m, v in self._chunks():
                flat[s:s + size].masked_scatter_(m, v)
