"""The model repository: bundles by model and version, reloaded while the server keeps serving.

Layout (docs/server.md, "Model versions and hot reload")::

    MODELS/democnn/manifest.json ...        a bare bundle: version 1
    MODELS/resnet/1/manifest.json ...       versions in numbered subdirectories
    MODELS/resnet/2/manifest.json ...

A model's name is its manifest's name (every version must carry the same). The server serves
every version present, or the newest ``max_versions``. :meth:`Repository.reload` scans the disk
again: versions that are new or changed (their manifest differs) are loaded beside the served
ones, then the set flips at once, and a version that left the set is released only when its
last in-flight request has finished (:meth:`Repository.enter` / :meth:`Repository.leave`). A
version that fails to load (an unreadable manifest, a bad sha256, an unloadable segment,
another model's name) is refused with an error in the log and the
``splitinfer_model_loads_total{result="failed"}`` metric, and what was served before keeps
serving. At the start the same damage, of any kind, stops the server instead (docs/server.md,
"Broken bundles").
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import weakref
from collections.abc import Callable, Iterator, MutableMapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from splitinfer.bundle import MANIFEST, Bundle, Segment
from splitinfer.errors import BundleError
from splitinfer.manifest import read_manifest

if TYPE_CHECKING:
    import torch

__all__ = ["Repository", "Served", "load_repository", "reload_models", "scan"]

log = logging.getLogger("splitinfer.cloud")

#: Called after each attempt to load a version: (model, version, ok).
LoadHook = Callable[[str, str, bool], None]
#: Called when a served version is released (its batchers can go).
ReleaseHook = Callable[["Served"], None]
#: Called by a scan for a version directory whose manifest cannot be read: (its path, why).
UnreadableHook = Callable[[Path, BundleError], None]


@dataclass(eq=False)
class Served:
    """One loaded version of a model, and the requests it is computing."""

    bundle: Bundle
    version: str
    path: Path
    #: sha256 of its manifest.json (which holds the sha256 of every file): what "changed" means.
    digest: str
    #: Distinguishes two loads of the same version directory (batchers are keyed by it).
    tag: str
    inflight: int = 0
    retired: bool = field(default=False, compare=False)
    #: Per segment, the digest of its graph and tensors (:func:`splitinfer.bundle.segment_key`);
    #: None where unknown (ONNX Runtime, or a segment this process did not load).
    segment_keys: tuple[str | None, ...] = field(default=(), compare=False)
    #: Whether equal segments are one object in this server (``--share-weights``).
    shared: bool = field(default=False, compare=False)

    @property
    def name(self) -> str:
        return self.bundle.name

    def share_key(self, cut: int) -> str | None:
        """What a batch of the tail from ``cut`` may be shared by: the key of segment ``cut``, if
        this version's segments are shared with other models (None: batched per version)."""
        return self.segment_keys[cut] if self.shared and cut < len(self.segment_keys) else None

    def shares_head(self, other: Served, cut: int) -> bool:
        """Whether segments ``0..cut-1`` of ``other`` compute what this version's compute (same
        graphs, weights and constants) and cut ``cut`` carries the same tensors: then one head's
        frontier at ``cut`` is every such model's."""
        a, b = self.bundle, other.bundle
        if cut > min(a.last_cut, b.last_cut) or a.cuts[cut].tensors != b.cuts[cut].tensors:
            return False
        if cut == 0:
            return a.inputs == b.inputs and a.in_spec == b.in_spec
        mine, theirs = self.segment_keys[:cut], other.segment_keys[:cut]
        return len(mine) == len(theirs) == cut and None not in mine and mine == theirs


class _KeyRecorder(MutableMapping[str, Segment]):
    """A segment mapping for ``Bundle.load(shared=...)`` that shares nothing (every lookup
    misses) but records each loaded segment with its key in ``seen`` (``--no-share-weights``:
    requests of two models never share a batch, but the server can still tell whether their
    heads are equal). Two equal segments of one bundle are both recorded."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Segment]] = []

    def __getitem__(self, key: str) -> Segment:
        raise KeyError(key)

    def __setitem__(self, key: str, value: Segment) -> None:
        self.seen.append((key, value))

    def __delitem__(self, key: str) -> None:
        self.seen = [(k, v) for k, v in self.seen if k != key]

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k for k, _ in self.seen))

    def __len__(self) -> int:
        return len(dict.fromkeys(k for k, _ in self.seen))


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (-1, version)


def scan(root: Path, on_unreadable: UnreadableHook | None = None) -> dict[str, dict[str, Path]]:
    """The bundle directories under ``root``: model name (from each manifest) -> version -> path.

    A manifest that cannot be read is BundleError, or, with ``on_unreadable``, reported to it and
    skipped; two directories claiming one model and version are an error.
    """
    found: dict[str, dict[str, Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (sub / MANIFEST).exists():
            candidates = [("1", sub)]
        else:
            candidates = [
                (v.name, v) for v in sorted(sub.iterdir()) if v.name.isdigit() and (v / MANIFEST).exists()
            ]
        for version, path in candidates:
            try:
                name = str(read_manifest(path)["name"])
            except BundleError as exc:
                if on_unreadable is None:
                    raise
                on_unreadable(path, exc)
                continue
            versions = found.setdefault(name, {})
            if version in versions:
                raise BundleError(
                    f"two bundles in {root} are model {name!r} version {version} ({versions[version]} and "
                    f"{path}); rename one, or put versions in numbered subdirectories of one model directory"
                )
            versions[version] = path
    return found


def _digest(path: Path) -> str:
    return hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()


def _fingerprint(path: Path) -> tuple[str, tuple[tuple[str, int, int], ...]]:
    """The manifest's digest and every file's size and mtime: a refused version directory is
    tried again when any of its files changes (a copy that was still in progress, a fix)."""
    files = tuple(sorted((p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in path.iterdir()))
    return _digest(path), files


class Repository:
    """The served versions of every model (the newest is what a request without a version gets)."""

    def __init__(
        self,
        root: Path,
        device: torch.device,
        max_versions: int = 0,
        share: bool = True,
        runtime: str = "torch",
        threads: int | None = None,
    ):
        self.root = root
        #: Where tails run (torch or onnxruntime, docs/runtimes.md) and ONNX Runtime's intra-op threads.
        self.runtime = runtime
        self.threads = threads
        #: Where every version's segments are loaded (the device the tails run on).
        self.device = device
        #: Segments by segment_key, shared by every loaded bundle whose segment has that key
        #: (models fine-tuned from one backbone): kept once, freed with their last user.
        self.segments: MutableMapping[str, Segment] | None = weakref.WeakValueDictionary() if share else None
        self.max_versions = max_versions
        self.models: dict[str, dict[str, Served]] = {}
        #: Models unloaded by request: a reload of everything leaves them out until loaded again.
        self.unloaded: set[str] = set()
        self.on_load: LoadHook | None = None
        self.on_release: ReleaseHook | None = None
        self._loads = 0
        self.lock = asyncio.Lock()
        #: Why the last load of a version failed, by (model, version); cleared when one succeeds.
        self.errors: dict[tuple[str, str], str] = {}
        #: Fingerprints of version directories that failed to load: not retried until they change.
        self._failed: dict[Path, tuple[str, tuple[tuple[str, int, int], ...]]] = {}

    # -- lookups -----------------------------------------------------------------------

    def latest(self, name: str) -> Served | None:
        versions = self.models.get(name)
        if not versions:
            return None
        return versions[max(versions, key=_version_key)]

    def get(self, name: str, version: str | None = None) -> Served | None:
        """Version ``version`` of ``name`` (the newest when None), or None."""
        if version is None:
            return self.latest(name)
        return self.models.get(name, {}).get(version)

    def by_graph(self, name: str, graph_hash: str) -> Served | None:
        """The newest served version of ``name`` whose graph hash is ``graph_hash``, or None."""
        matches = [s for s in self.models.get(name, {}).values() if s.bundle.graph_hash == graph_hash]
        return max(matches, key=lambda s: _version_key(s.version)) if matches else None

    def versions(self, name: str) -> list[Served]:
        """The served versions of ``name``, oldest first."""
        return sorted(self.models.get(name, {}).values(), key=lambda s: _version_key(s.version))

    def __iter__(self) -> Iterator[Served]:
        for versions in self.models.values():
            yield from versions.values()

    def batch_key(self, served: Served, cut: int) -> str | None:
        """The key of the segment by which ``served``'s requests at ``cut`` batch with other
        models' (their tails from ``cut`` begin with the very same loaded segment), or None: no
        other model served has it there, and they batch on their own (per version)."""
        key = served.share_key(cut)
        if key is None:
            return None
        others = (s for s in self if s.name != served.name)
        return key if any(s.share_key(cut) == key for s in others) else None

    # -- requests in flight --------------------------------------------------------------

    def enter(self, served: Served) -> None:
        served.inflight += 1

    def leave(self, served: Served) -> None:
        served.inflight -= 1
        if served.retired and served.inflight == 0:
            self._release(served)

    def _retire(self, served: Served) -> None:
        served.retired = True
        log.info("model %s version %s leaves service", served.name, served.version)
        if served.inflight == 0:
            self._release(served)

    def _release(self, served: Served) -> None:
        log.info("model %s version %s released", served.name, served.version)
        if self.on_release is not None:
            try:
                self.on_release(served)
            except Exception:
                log.exception("releasing model %s version %s failed", served.name, served.version)

    # -- loading -------------------------------------------------------------------------

    def load(self, name: str, version: str, path: Path) -> Served:
        """Load one version (blocking: run it on a worker thread); BundleError if it cannot be served."""
        digest = _digest(path)
        before = set(self.segments.keys()) if self.segments is not None else set()
        # without sharing, a mapping that never hits still records each segment's key
        recorder = _KeyRecorder()
        keys = recorder if self.segments is None else self.segments
        bundle = Bundle.load(
            path, device=self.device, shared=keys, runtime=self.runtime, threads=self.threads
        )
        known = recorder.seen if self.segments is None else list(self.segments.items())
        by_id = {id(segment): key for key, segment in known}
        segment_keys = tuple(None if s is None else by_id.get(id(s)) for s in bundle.segments)
        if self.segments is not None and bundle.onnx_runner is None:  # ONNX Runtime: no torch segments
            reused = sum(1 for s in bundle.segments if any(s is self.segments.get(k) for k in before))
            if reused:
                log.info(
                    "model %s version %s shares %d of its %d segments with models loaded before",
                    name,
                    version,
                    reused,
                    bundle.n_segments,
                )
        if bundle.name != name:
            raise BundleError(f"{path} holds model {bundle.name!r}, not {name!r}")
        self._loads += 1
        tag = version if self._loads == 1 else f"{version}.{self._loads}"
        return Served(
            bundle,
            version,
            path,
            digest,
            tag=tag,
            segment_keys=segment_keys,
            shared=self.segments is not None,
        )

    def plan(self, name: str, present: dict[str, Path]) -> dict[str, Path]:
        """The versions of ``name`` to serve from those on disk: all, or the newest max_versions."""
        ordered = sorted(present, key=_version_key)
        if self.max_versions:
            ordered = ordered[-self.max_versions :]
        return {v: present[v] for v in ordered}

    def prepare(self, name: str, present: dict[str, Path], *, strict: bool) -> dict[str, Served]:
        """The new set of served versions of ``name``: unchanged ones kept, others loaded (blocking).

        A version that fails to load is left out (the one served before stays, if any), logged
        and counted; with ``strict`` (the first load) it raises instead.
        """
        current = self.models.get(name, {})
        wanted = self.plan(name, present)
        for key in [k for k in self.errors if k[0] == name and k[1] not in wanted]:
            del self.errors[key]  # that version is gone from disk: its refusal is history
        out: dict[str, Served] = {}
        for version, path in wanted.items():
            old = current.get(version)
            fingerprint = None
            try:
                fingerprint = _fingerprint(path)
                if old is not None and old.path == path and old.digest == fingerprint[0]:
                    out[version] = old
                    continue
                if self._failed.get(path) == fingerprint:  # refused already, and unchanged since
                    if old is not None:
                        out[version] = old
                    continue
                out[version] = self.load(name, version, path)
                self._observe(name, version, True)
                self.errors.pop((name, version), None)
                self._failed.pop(path, None)
                log.info("loaded model %s version %s from %s", name, version, path)
            except (BundleError, OSError) as exc:
                self._observe(name, version, False)
                if strict:
                    raise
                log.error("refusing model %s version %s (%s): %s", name, version, path, exc)
                self.errors[(name, version)] = str(exc)
                if fingerprint is not None:
                    self._failed[path] = fingerprint
                if old is not None:
                    out[version] = old
        return out

    def unreadable(self, path: Path, exc: BundleError) -> None:
        """A version directory whose manifest a reload cannot read: refused like any broken
        version (logged and counted once until it changes; what is served keeps serving). Its
        model is named by its directory, as its manifest cannot say."""
        model, version = (path.parent.name, path.name) if path.name.isdigit() else (path.name, "1")
        try:
            fingerprint: tuple[str, tuple[tuple[str, int, int], ...]] | None = _fingerprint(path)
        except OSError:
            fingerprint = None
        if fingerprint is not None and self._failed.get(path) == fingerprint:
            return  # refused already, and unchanged since
        self._observe(model, version, False)
        log.error("refusing model %s version %s (%s): %s", model, version, path, exc)
        if fingerprint is not None:
            self._failed[path] = fingerprint

    def flip(self, name: str, versions: dict[str, Served]) -> None:
        """Serve ``versions`` of ``name`` from now on; versions that left are retired."""
        old = self.models.get(name, {})
        if versions:
            self.models[name] = versions
        else:
            self.models.pop(name, None)
        kept = {id(s) for s in versions.values()}
        for served in old.values():
            if id(served) not in kept:
                self._retire(served)

    def unload(self, name: str) -> bool:
        """Stop serving every version of ``name`` (in-flight requests finish); False if none was."""
        self.unloaded.add(name)
        if name not in self.models:
            return False
        self.flip(name, {})
        return True

    def _observe(self, name: str, version: str, ok: bool) -> None:
        if self.on_load is not None:
            try:
                self.on_load(name, version, ok)
            except Exception:  # metrics never fail a load
                log.exception("the load hook failed")


def load_repository(
    root: Path,
    device: torch.device,
    max_versions: int = 0,
    share: bool = True,
    runtime: str = "torch",
    threads: int | None = None,
) -> Repository:
    """Every bundle under ``root``, by model and version, with its segments on ``device`` (equal
    segments once, with ``share``); a broken bundle, whatever its damage, stops the start: BundleError."""
    repo = Repository(root, device, max_versions, share, runtime, threads)
    for name, present in scan(root).items():
        repo.flip(name, repo.prepare(name, present, strict=True))
    if not repo.models:
        raise BundleError(
            f"no bundle in {root}: put one bundle directory (with {MANIFEST}) per subdirectory, or "
            "numbered version directories (1/, 2/, ...) in a model's subdirectory"
        )
    return repo


async def reload_models(repo: Repository, pool: Executor, name: str | None = None) -> list[str]:
    """Scan the disk again and serve what it holds now (every model, or only ``name``).

    New and changed versions load on ``pool`` beside the served ones, then each model's set
    flips; retired versions are released after their in-flight requests. Returns the models
    reloaded. One reload runs at a time. A model named here that is not on disk: BundleError.
    """
    loop = asyncio.get_running_loop()
    async with repo.lock:
        found = await loop.run_in_executor(pool, scan, repo.root, repo.unreadable)
        if name is not None:
            if name not in found:
                raise BundleError(f"no bundle of model {name!r} in {repo.root}; put it there first")
            repo.unloaded.discard(name)
            names = [name]
        else:
            names = sorted((set(found) | set(repo.models)) - repo.unloaded)
        for model in names:
            versions = await loop.run_in_executor(
                pool, functools.partial(repo.prepare, model, found.get(model, {}), strict=False)
            )
            repo.flip(model, versions)
        return names
