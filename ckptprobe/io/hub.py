"""Hub model repos as tensor sources, read one tensor at a time over HTTP range requests.

A safetensors file can be read piecewise: its first 8 bytes give the length of the JSON
header, and the header gives each tensor's byte span. `HubSource` therefore fetches, per
file, 8 bytes and the header, and later only the byte ranges of the tensors asked for:
comparing one layer of two 14 GB repos moves that layer, not 28 GB.

With `download=True` whole files go into the Hub cache instead (`hf_hub_download`, one
at a time, when a tensor of the file is first read) and are read from there; a server or
proxy that answers the header's range request badly gets the whole file at once. Files
already in the cache are always read from it, and with HF_HUB_OFFLINE=1 the cache is the
only source: no request is made at all, and series patterns (`matching_revisions`,
`matching_folders`) match what the cache holds.

URLs, auth headers, the endpoint (HF_ENDPOINT), the cache and error types are the
`huggingface_hub` client's own. Only this module imports it, so local runs do not pay
for the import.
"""

from __future__ import annotations

import fnmatch
import json
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote

import numpy as np
from huggingface_hub import HfApi, constants, hf_hub_download, hf_hub_url, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, HFValidationError,
                                    LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                    RevisionNotFoundError)
# `httpx` is the client's own re-export of the HTTP library it uses (httpx2 in huggingface_hub 2.x),
# kept stable for downstream code: its transport errors (refused, timed out) are not wrapped.
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status, httpx, validate_repo_id

from ckptprobe.errors import CheckpointNotFoundError, HubError, InvalidCheckpointError
from ckptprobe.io._multifile import PICKLE_HINT, PICKLE_SUFFIXES, MultiFileSource, model_files
from ckptprobe.io._safetensors import SafetensorsFile, TensorInfo, byte_span, header_length, parse_header

TOKEN_HINT = "pass --token or set HF_TOKEN (or run `hf auth login`)"
NETWORK_HINT = ("check the network and HF_ENDPOINT; to read files already in the Hub cache (from an earlier "
                "--download run), set HF_HUB_OFFLINE=1")
OFFLINE_HINT = "run once online with --download to fill the Hub cache, or unset HF_HUB_OFFLINE"

_download_lock = threading.Lock()  # --download fetches one whole file at a time


class HubSource:
    """The safetensors checkpoint of a Hub model repo at one revision, at the root or in a subfolder.

    Same interface as the local sources: `keys()`, `info(name)`, `read(name, start, stop)`
    (elements [start, stop) of the flattened tensor, numpy storage dtype: uint16 bits
    for BF16), `get_array(name)`. The revision is resolved once to `commit`, and every
    read is pinned to that commit. Picks the files like a local folder does: the
    `*.safetensors.index.json` and its shards, else every `*.safetensors` directly in
    `subfolder` (the repo's root when empty).
    """

    forkable = False  # reads go through an HTTP session, which a forked child must not share

    def __init__(self, repo_id: str, revision: str | None = None, token: str | bool | None = None,
                 download: bool = False, ref: str | None = None, subfolder: str = ""):
        self.repo_id = repo_id
        self.revision = revision or constants.DEFAULT_REVISION
        self.subfolder = subfolder.strip("/")
        self._label = f"{repo_id}@{self.revision}" + (f":{self.subfolder}" if self.subfolder else "")
        self.ref = ref or self._label
        self.metadata: dict[str, str] = {}
        self._token = token if token != "" else None  # None: HF_TOKEN, then the saved token
        self._download = download
        self._offline = constants.is_offline_mode()
        with self._errors():
            self._headers = build_hf_headers(token=self._token)
            files, weight_map = self._open_cached() if self._offline else self._open_online()
        self._files = MultiFileSource(self._label, dict(files), weight_map)

    def keys(self) -> list[str]:
        return self._files.keys()

    def info(self, name: str) -> TensorInfo:
        return self._files.info(name)

    def read(self, name: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        return self._files.read(name, start, stop, out)

    def get_array(self, name: str) -> np.ndarray:
        return self._files.get_array(name)

    # -- opening ---------------------------------------------------------------------------

    def _in_repo(self, name: str) -> str:
        """A file's path in the repo from its name in the subfolder."""
        return f"{self.subfolder}/{name}" if self.subfolder else name

    def _open_online(self) -> tuple[list, dict | None]:
        # One short API call resolves the revision and lists the files; it fails at once when
        # the endpoint is unreachable (no retries), so a wrong HF_ENDPOINT costs no waiting.
        try:
            info = HfApi().model_info(self.repo_id, revision=self.revision, token=self._token,
                                      timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
            names = [s.rfilename for s in info.siblings or ()]
        except (KeyError, TypeError, AttributeError) as e:  # the client could not parse the reply
            raise HubError(f"{self._label}: {constants.ENDPOINT} answered the model-info request with a reply "
                           f"that is not the Hub's ({type(e).__name__}: {e})", hint=NETWORK_HINT) from e
        if not isinstance(info.sha, str):
            raise HubError(f"{self._label}: {constants.ENDPOINT} answered the model-info request without a commit",
                           hint=NETWORK_HINT)
        self.commit = info.sha
        prefix = self.subfolder + "/" if self.subfolder else ""
        local = [n[len(prefix):] for n in names if n.startswith(prefix)]
        shards, weight_map = self._pick(local, lambda f: self._read_text(self._in_repo(f)))
        return [(s, self._open_file(self._in_repo(s))) for s in shards], weight_map

    def _open_cached(self) -> tuple[list, dict | None]:
        patterns = [self._in_repo("*.safetensors"), self._in_repo("*.safetensors.index.json")]
        try:
            snapshot = Path(snapshot_download(self.repo_id, revision=self.revision, local_files_only=True,
                                              allow_patterns=patterns))
        except LocalEntryNotFoundError:
            raise HubError(f"{self._label}: not in the Hub cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE=1 "
                           "forbids downloading it", hint=OFFLINE_HINT) from None
        self.commit = snapshot.name
        folder = snapshot / self.subfolder
        names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        shards, weight_map = self._pick(names, lambda f: (folder / f).read_text())
        return [(s, SafetensorsFile(folder / s)) for s in shards], weight_map

    def _pick(self, names: list[str], read_text: Callable[[str], str]) -> tuple[list[str], dict | None]:
        """The safetensors files to open among `names` (paths relative to the subfolder), and the
        index's weight map if any."""
        root = sorted(n for n in names if "/" not in n)
        index, files = model_files(root, self._label)
        if index:
            try:
                weight_map = json.loads(read_text(index)).get("weight_map")
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                weight_map = None
            if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
                raise InvalidCheckpointError(f"{self._label}: {index} is not a safetensors index "
                                             "(no 'weight_map' object of file names)")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if shard in names:
                    continue
                if self._offline:
                    raise HubError(f"{self._label}: shard {shard} is not in the Hub cache, and HF_HUB_OFFLINE=1 "
                                   "forbids downloading it", hint=OFFLINE_HINT)
                raise CheckpointNotFoundError(f"{self._label}: {index} names shard {shard!r}, "
                                              "which is not in the repo")
            return shards, weight_map
        if files:
            return files, None
        pickles = [n for n in root if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise InvalidCheckpointError(f"{self._label}: refusing to open a pickle checkpoint ({pickles[0]}); "
                                         "the repo has no safetensors files", hint=PICKLE_HINT)
        if self._offline:
            raise HubError(f"{self._label}: no *.safetensors file in the Hub cache, and HF_HUB_OFFLINE=1 forbids "
                           "downloading", hint=OFFLINE_HINT)
        if self.subfolder and not names:
            raise CheckpointNotFoundError(f"{self._label}: the repo has no folder {self.subfolder!r}")
        tops = sorted({n.split("/")[0] for n in names if "/" in n})
        hint = (f"name a subfolder as {self.repo_id}@{self.revision}:FOLDER (it holds "
                f"{', '.join(tops[:5])}{', ...' if len(tops) > 5 else ''})") if tops else None
        where = f"folder {self.subfolder!r}" if self.subfolder else "repo"
        raise CheckpointNotFoundError(f"{self._label}: the {where} holds no *.safetensors files", hint=hint)

    def _open_file(self, path: str) -> SafetensorsFile | _RemoteFile:
        cached = try_to_load_from_cache(self.repo_id, path, revision=self.commit)
        if isinstance(cached, str):
            return SafetensorsFile(cached)
        try:  # the header by range request; with --download, the whole file at its first tensor read
            return _RemoteFile(self, path)
        except _RangesRefused:
            if not self._download:
                raise
        return SafetensorsFile(self._fetch(path))  # a server or proxy that answers ranges badly: the whole file

    def _read_text(self, path: str) -> str:
        cached = try_to_load_from_cache(self.repo_id, path, revision=self.commit)
        if isinstance(cached, str):
            return Path(cached).read_text()
        if self._download:
            return Path(self._fetch(path)).read_text()
        return self._get(path)[0].decode("utf-8", "replace")

    # -- transfers ---------------------------------------------------------------------------

    def _get(self, filename: str, start: int | None = None, stop: int | None = None) -> tuple[bytes, int]:
        """Bytes [start, stop) of a file at `commit` (the whole file when start is None), and the file's size."""
        headers = dict(self._headers)
        if start is not None:
            headers["Range"] = f"bytes={start}-{stop - 1}"
        url = hf_hub_url(self.repo_id, filename, revision=self.commit)
        with self._errors(filename), get_session().stream(
                "GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            if start is None:
                data = r.read()
                return data, len(data)
            if r.status_code != 206:  # checked before reading: a 200 would be the whole file
                raise _RangesRefused(f"{self._label}: {filename}: {constants.ENDPOINT} answered a byte-range request "
                                     f"with HTTP {r.status_code}, not 206", hint="use --download")
            content_range = r.headers.get("Content-Range", "")
            m = _CONTENT_RANGE.fullmatch(content_range.strip())
            if m is None:  # `bytes a-b/*` (size unknown) or no header: the header's offsets cannot be checked
                raise _RangesRefused(f"{self._label}: {filename}: {constants.ENDPOINT} answered a byte-range "
                                     f"request without the file's size (Content-Range: {content_range[:60]!r})",
                                     hint="use --download")
            size = int(m[1])
            data = r.read()
        if len(data) != min(stop, size) - start:
            raise HubError(f"{self._label}: {filename}: asked for bytes {start}-{stop - 1}, got {len(data)} bytes")
        return data, size

    def _fetch(self, filename: str) -> str:
        """Download a whole file into the Hub cache (if not there yet); its local path."""
        with self._errors(filename):
            # By revision name, not by commit, so the cache learns the branch -> commit ref and
            # a later HF_HUB_OFFLINE=1 run can resolve `org/name` without a request.
            path = Path(hf_hub_download(self.repo_id, filename, revision=self.revision, token=self._token))
        if path.parents[len(Path(filename).parts) - 1].name != self.commit:
            raise HubError(f"{self._label}: the revision moved to another commit during the run "
                           f"(was {self.commit[:12]}); run again")
        return str(path)

    def _errors(self, filename: str | None = None):
        return hub_errors(self.repo_id, self.revision, self._label + (f": {filename}" if filename else ""),
                          "authorization" in getattr(self, "_headers", {}))


_CONTENT_RANGE = re.compile(r"bytes \d+-\d+/(\d+)")


@contextmanager
def hub_errors(repo_id: str, revision: str, what: str, authorized: bool = False) -> Iterator[None]:
    """Turn the client's exceptions into one-line ckptprobe errors naming repo, revision and file (`what`)."""
    endpoint = constants.ENDPOINT
    try:
        yield
    except GatedRepoError as e:
        if authorized:
            raise HubError(f"{what}: gated repo, and the token in use has no access to it",
                           hint="accept the repo's conditions on its Hub page with the token's account") from e
        raise HubError(f"{what}: gated repo, a token of an account with access is needed", hint=TOKEN_HINT) from e
    except RepositoryNotFoundError as e:
        raise CheckpointNotFoundError(f"{repo_id}: no such model repo on {endpoint} (or it is private)",
                                      hint=f"check the name; for a private repo {TOKEN_HINT}") from e
    except RevisionNotFoundError as e:
        raise CheckpointNotFoundError(f"{repo_id}: no revision {revision!r} (branch, tag or commit)",
                                      hint="check the @revision or --revision") from e
    except LocalEntryNotFoundError as e:  # hf_hub_download gave up: no connection, or offline
        raise HubError(f"{what}: cannot download from {endpoint} ({e.__cause__ or e})".splitlines()[0],
                       hint=NETWORK_HINT) from e
    except EntryNotFoundError as e:
        raise CheckpointNotFoundError(f"{what}: no such file in the repo") from e
    except OfflineModeIsEnabled as e:
        raise HubError(f"{what}: HF_HUB_OFFLINE=1 forbids requests", hint=OFFLINE_HINT) from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        hint = f"the token may be invalid or lack permission; {TOKEN_HINT}" if status in (401, 403) else None
        raise HubError(f"{what}: {endpoint} answered HTTP {status}", hint=hint) from e
    except httpx.TimeoutException as e:
        raise HubError(f"{what}: {endpoint} did not answer within HF_HUB_DOWNLOAD_TIMEOUT="
                       f"{constants.HF_HUB_DOWNLOAD_TIMEOUT} s", hint=NETWORK_HINT) from e
    except httpx.HTTPError as e:
        raise HubError(f"{what}: cannot reach {endpoint} ({e})", hint=NETWORK_HINT) from e
    except HFValidationError as e:
        raise CheckpointNotFoundError(f"{repo_id}: not a valid Hub repo id ({e})".splitlines()[0]) from e


# -- series: many revisions or subfolders of one repo ---------------------------------------------

def matching_revisions(repo_id: str, pattern: str, token: str | bool | None = None) -> list[str]:
    """The repo's branches and tags whose name matches the glob `pattern` (fnmatch, case-sensitive).

    With HF_HUB_OFFLINE=1, the revisions the Hub cache knows by name instead (those downloaded by
    name, as --download does), and an error when none matches.
    """
    if constants.is_offline_mode():
        refs = _cache_folder(repo_id) / "refs"
        # refs/pr/N and the like are pull requests, which the online listing leaves out too
        names = [p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file()]
        found = [n for n in names if not n.startswith("refs/") and fnmatch.fnmatchcase(n, pattern)]
        if not found:
            raise HubError(f"{repo_id}@{pattern}: the Hub cache ({constants.HF_HUB_CACHE}) holds no revision of "
                           f"{repo_id} matching {pattern!r}, and HF_HUB_OFFLINE=1 forbids listing the repo's "
                           "branches and tags", hint=OFFLINE_HINT)
        return found
    with hub_errors(repo_id, pattern, f"{repo_id}@{pattern}", bool(token)):
        try:
            refs = _api_pages(repo_id, "refs", token)[0]
            names = [r["name"] for r in (*refs["branches"], *refs["tags"])]
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise HubError(f"{repo_id}: {constants.ENDPOINT} answered the refs request with a reply that is not "
                           f"the Hub's ({type(e).__name__}: {e})") from e
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def matching_folders(repo_id: str, revision: str | None, pattern: str, token: str | bool | None = None) -> list[str]:
    """The repo's folders whose path matches the glob `pattern` segment by segment (`*` never crosses a
    `/`) and that hold a safetensors checkpoint (`*.safetensors`, or an index) directly."""
    revision = revision or constants.DEFAULT_REVISION
    segments = pattern.strip("/").split("/")
    offline = constants.is_offline_mode()
    if offline:  # the files of the revision's snapshot in the Hub cache (those downloaded)
        cached = _cache_folder(repo_id)
        ref = cached / "refs" / revision
        snapshot = cached / "snapshots" / (ref.read_text().strip() if ref.is_file() else revision)
        files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    else:
        with hub_errors(repo_id, revision, f"{repo_id}@{revision}:{pattern}", bool(token)):
            try:
                pages = _api_pages(repo_id, f"tree/{quote(revision, safe='')}?recursive=true", token)
                files = [e["path"] for page in pages for e in page if e["type"] == "file"]
            except (KeyError, TypeError, json.JSONDecodeError) as e:
                raise HubError(f"{repo_id}@{revision}: {constants.ENDPOINT} answered the tree request with a reply "
                               f"that is not the Hub's ({type(e).__name__}: {e})") from e
    folders = {f.rpartition("/")[0] for f in files if f.endswith((".safetensors", ".safetensors.index.json"))}
    found = [f for f in folders if _match_segments(f.split("/"), segments)]
    if offline and not found:
        raise HubError(f"{repo_id}@{revision}: the Hub cache ({constants.HF_HUB_CACHE}) holds no folder matching "
                       f"{pattern!r} with *.safetensors files, and HF_HUB_OFFLINE=1 forbids listing the repo",
                       hint=OFFLINE_HINT)
    return found


def _api_pages(repo_id: str, path: str, token: str | bool | None) -> list:
    """The JSON of `GET {endpoint}/api/models/{repo_id}/{path}`, one item per page (the next page is
    named by a `Link: <url>; rel="next"` header).

    Done here, not with HfApi's listings: those pass no timeout, and the client's shared session
    has none, so an endpoint that accepts and never answers would hang the run.
    """
    validate_repo_id(repo_id)
    headers = build_hf_headers(token=token or None)
    url, pages = f"{constants.ENDPOINT}/api/models/{repo_id}/{path}", []
    while url:
        r = get_session().get(url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
        hf_raise_for_status(r)
        pages.append(r.json())
        url = r.links.get("next", {}).get("url")
    return pages


def _cache_folder(repo_id: str) -> Path:
    """The model repo's folder in the Hub cache: `refs/{revision}` holds a commit, `snapshots/{commit}/` the files."""
    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _match_segments(parts: list[str], segments: list[str]) -> bool:
    return len(parts) == len(segments) and all(fnmatch.fnmatchcase(p, s) for p, s in zip(parts, segments))


class _RangesRefused(HubError):
    """The server (or a proxy) answered a byte-range request with the whole file or without its size."""


class _RemoteFile:
    """One safetensors file of a Hub repo: header fetched at open, tensors by byte range.

    With `download`, the first read fetches the whole file into the Hub cache and every read is
    then served from there: a run reading one layer with --include fetches only its shards.
    """

    def __init__(self, hub: HubSource, filename: str):
        self._hub, self.filename = hub, filename
        self._local: SafetensorsFile | None = None
        what = f"{hub._label}: {filename}"
        head, size = hub._get(filename, 0, 8)
        n = header_length(head, size, what)
        raw, _ = hub._get(filename, 8, 8 + n)
        self._data_start = 8 + n
        self._infos, self._offsets, self.metadata = parse_header(raw, what, size - self._data_start)

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def read(self, name: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        if self._hub._download:
            return self._downloaded().read(name, start, stop, out)
        dtype, begin, end = byte_span(self._infos[name], self._data_start + self._offsets[name][0], start, stop)
        if end <= begin:
            return np.empty(0, dtype)
        data, _ = self._hub._get(self.filename, begin, end)
        return np.frombuffer(data, dtype)

    def _downloaded(self) -> SafetensorsFile:
        with _download_lock:  # reader threads share the file: one download, one at a time
            if self._local is None:
                self._local = SafetensorsFile(self._hub._fetch(self.filename))
        return self._local
