"""Naming a series of checkpoints with one pattern: `org/name@step-*`, `org/name:global_step_*/actor`.

Checkpoint series are published as branches or tags (one per step), as subfolders of one
revision (`global_step_100/actor/huggingface`, `step-0500/`), or as local folders.
`expand_refs` turns each pattern into the references it names, ordered naturally
(`step-100` before `step-1000`), for `drift`, `profile` and `consensus`:

- braces, as in bash, keep the order written: `org/name@{step-100,step-200}`,
  `run/step-{100..500..100}` (a range; `{0100..0500..100}` pads to four digits);
- `*`, `?`, `[...]` in a Hub revision match the repo's branches and tags;
- the same in a Hub subfolder match its folders that hold safetensors files, segment by
  segment (`*` never crosses a `/`);
- the same in a local path match files and folders (`glob`).

Everything else, and any reference that exists as a local path, is kept as it is.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Iterable

from ckptprobe.errors import CheckpointNotFoundError, UsageError
from ckptprobe.io.sources import HubRef, parse_hub_ref

_GLOB = re.compile(r"[*?\[]")
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
MAX_REFS = 10_000  # checkpoints one pattern may name: more is a typo, and would fill memory before failing


def natural_key(text: str) -> list:
    """Sort key that orders digit runs by value: step-2 < step-10 < step-100."""
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", text))]


def expand_braces(text: str) -> list[str]:
    """Bash-style brace expansion: `a{1,2}b` -> [a1b, a2b]; `{8..10}` and `{08..10..2}` are ranges."""
    for match in _BRACES.finditer(text):
        body = match[1]
        if _RANGE.match(body):
            choices = _range(body)
        elif "," in body:
            choices = body.split(",")
        else:
            continue
        head, tail = text[:match.start()], text[match.end():]
        out = []
        for c in choices:
            out += expand_braces(head + c + tail)
            if len(out) > MAX_REFS:
                raise UsageError(f"{text}: names more than {MAX_REFS:,} checkpoints")
        return out
    return [text]


def _range(body: str) -> list[str]:
    first, last, step = _RANGE.match(body).groups()
    a, b, step = int(first), int(last), abs(int(step or 1)) or 1
    width = max(len(first), len(last)) if first.lstrip("-").startswith("0") or last.lstrip("-").startswith("0") else 0
    values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
    if len(values) > MAX_REFS:
        raise UsageError(f"{{{body}}}: {len(values):,} values, more than the {MAX_REFS:,} checkpoints "
                         "a pattern may name")
    return [str(v).zfill(width) for v in values]


def expand_refs(refs: Iterable[str | os.PathLike], revision: str | None = None,
                token: str | bool | None = None) -> list[str]:
    """Every reference each of `refs` names, in order: braces as written, glob matches naturally sorted.

    `revision` is the default for Hub references without `@` (as in `open_source`). A pattern
    that matches nothing raises `CheckpointNotFoundError` naming it.
    """
    out = []
    for ref in map(os.fspath, refs):
        if Path(ref).expanduser().exists():
            out.append(ref)
            continue
        for one in expand_braces(ref):
            out += _expand_glob(one, revision, token)
    return out


def _expand_glob(ref: str, revision: str | None, token) -> list[str]:
    if not _GLOB.search(ref) or Path(ref).expanduser().exists():
        return [ref]
    hub = parse_hub_ref(ref)
    if hub is None:
        found = sorted(glob.glob(os.path.expanduser(ref)), key=natural_key)
        if not found:
            raise CheckpointNotFoundError(f"{ref}: the pattern matches no file or folder")
        return found
    from ckptprobe.io.hub import matching_folders, matching_revisions  # only Hub users import huggingface_hub

    revisions = [hub.revision]
    if hub.revision and _GLOB.search(hub.revision):
        revisions = sorted(matching_revisions(hub.repo, hub.revision, token), key=natural_key)
        if not revisions:
            raise CheckpointNotFoundError(f"{ref}: no branch or tag of {hub.repo} matches {hub.revision!r}",
                                          hint="list them with `hf repo branch`/`hf repo tag`, or see the repo's page")
    out = []
    for rev in revisions:
        subfolders = [hub.subfolder]
        if _GLOB.search(hub.subfolder):
            subfolders = sorted(matching_folders(hub.repo, rev or revision, hub.subfolder, token), key=natural_key)
            if not subfolders:
                raise CheckpointNotFoundError(
                    f"{HubRef(hub.repo, rev or revision)}: no folder holding *.safetensors files matches "
                    f"{hub.subfolder!r}")
        out += [str(HubRef(hub.repo, rev, sub)) for sub in subfolders]
    return out
