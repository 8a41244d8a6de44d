"""One grouping rule for every result: tensors grouped per module type, layer or group, in one order.

Modules in their semantic order (embed, q, k, v, o, gate, up, down, ..., lm_head; unknown ones
after, alphabetically), layers ascending with layer-less tensors (embeddings, head) last, groups
embedding, attention, mlp, norm, head, other. Every result's `rows(by)` and every table, CSV and
figure built from it follow this order.
"""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

from ckptprobe.io.names import MODULE_ORDER

T = TypeVar("T")
GROUP_ORDER = ("embedding", "attention", "mlp", "norm", "head", "other")
KEYS = ("module", "layer", "group")


def order(by: str, value) -> tuple:
    """The sort key of a group `value` of kind `by` ("module", "layer" or "group")."""
    if by == "layer":
        return (value is None, value or 0)
    ranks = {"module": MODULE_ORDER, "group": GROUP_ORDER}[by]
    return (ranks.index(value) if value in ranks else len(ranks), str(value))


def grouped(items: Iterable[T], by: str, key: Callable[[T], object] | None = None) -> dict[object, list[T]]:
    """`items` grouped by `key(item)` (default: the item's attribute `by`), groups in `order(by, ...)`,
    items in their own order within a group."""
    key = key or (lambda item: getattr(item, by))
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return {k: groups[k] for k in sorted(groups, key=lambda k: order(by, k))}
