"""The status hub: what atlasd reports about itself, as one JSON-able document.

Every subsystem publishes its part (``envoys``, ``subsystems``, ``leader`` ...) with
:meth:`StatusHub.publish`; per-key parts (``clusters``, ``problems``, ``certificates``,
``pending``) are published key by key with :meth:`StatusHub.publish_keyed`, so a change of
one cluster costs that cluster, and are assembled into lists (in key order) only when the
document is read. The HTTP endpoint serves the merged document at ``/status`` and streams it
over WebSocket as ``StatusHub.encoded`` gives it: the JSON text of ``snapshot()`` kept piece
by piece (each key's items, each top-level part, each section's joined list), so a read
encodes only what changed since the last one and otherwise joins kept text (at 5,000
clusters, encoding the whole document took ~50-80 ms of CPU per read). Readiness is derived
from the document. Publishing never blocks: watchers wait on
a generation counter and always read the latest document (slow watchers skip
intermediate states rather than queueing them).

Published values are never mutated afterwards (publishers replace them), so reading the
document copies only its top level.

The document's schema is ``StatusDocument`` below: ``publish`` takes only its top-level
parts (mypy checks each call), ``publish_keyed`` only its keyed sections.

Health (``/healthz``) is kept here too, beside readiness: a subsystem the supervisor
(``atlasd.supervise``) restarts ``UNHEALTHY_FAILURES`` times in a row, without a run that
lasted ``STABLE_SECONDS`` in between, makes atlasd unhealthy until one of its runs does.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal, NotRequired, TypedDict, Unpack

import trio

from atlasd import __version__

# A subsystem failing this many times in a row (no run of STABLE_SECONDS between) is not
# a hiccup: /healthz answers 503 (a liveness probe then restarts the pod).
UNHEALTHY_FAILURES = 5
# A run this long was a real run: the supervisor's backoff starts over after it. (It was 2
# min: API server restarts a minute or two apart, the soak at scale without replica
# restarts, grew the leader's reconcile restart delay to 34-42 s, and would have made it
# unhealthy after five of them, though restarting atlasd cannot help an API server.)
STABLE_SECONDS = 30.0
# Items ``encoded_in_steps`` encodes between two checkpoints (a few milliseconds).
ENCODE_STEP = 500


class ProblemDoc(TypedDict):
    object: str
    field: str
    message: str
    reason: str


class CertDoc(TypedDict):
    name: str
    not_after: float | None
    serial: NotRequired[str]


class ClusterDoc(TypedDict):
    name: str
    external_ip: str
    replicas: int
    dns_group: str | None
    sidecars: list[str]
    mode: str  # "enrollment" (its agent holds its keys) or "compatible"
    certificate_expiry: float | None
    revoked_certificates: int  # revoked and in force (atlasd cluster revoke)


class AnswerDoc(TypedDict):
    name: str
    records: int
    bytes: int


class ZoneDoc(TypedDict):
    serial: int
    records: int
    # SRV names whose answer no longer fits in one DNS message (atlasd.dns.answer).
    too_large: list[AnswerDoc]


class StallDoc(TypedDict):
    """One stall of the event loop (``atlasd.watchdog``)."""

    at: float
    held_ms: float
    # The loop thread's stack when the batch passed the threshold ("(not sampled)": the
    # watchdog's thread did not look while it lasted).
    where: str


class LoopDoc(TypedDict):
    """The event loop's stalls since start (``atlasd.watchdog``)."""

    stalls: int
    threshold_ms: float
    last: StallDoc


class ResultDoc(TypedDict):
    """One reconcile (``last_key_reconcile``) or a full pass (``last_reconcile``)."""

    at: float
    seconds: float
    writes: int
    events: int
    issued: list[str]
    ca_action: str
    problems: int
    write_errors: list[str]
    key: NotRequired[str]
    kind: NotRequired[str]
    keys: NotRequired[int]


class StoreProblemDoc(TypedDict):
    file: str
    message: str


class QueryClusterDoc(TypedDict):
    seen: bool
    since: float
    error: str | None
    stores: list[str]
    labels: list[dict[str, str]]
    min_time: int | None
    max_time: int | None
    duplicate_of: list[str]
    # For a cluster Query does not see: where atlasd's probe of its path stopped
    # (atlasd.query.probe: hop, what it saw, what to do, when), None before the first.
    probe: dict[str, str | float] | None


class QueryStoreDoc(TypedDict):
    store: str
    cluster: list[str]


class QueryDoc(TypedDict):
    """What Thanos Query sees (``atlasd.query``): per served cluster, and the stores it
    sees that atlasd does not serve."""

    url: str
    up: bool
    error: str | None
    at: float
    counts: dict[str, int]
    clusters: dict[str, QueryClusterDoc]
    unknown: list[QueryStoreDoc]


class StatusParts(TypedDict, total=False):
    """The top-level parts a subsystem publishes (``StatusHub.publish``)."""

    leader: bool
    leadership: dict[str, str | None]
    envoys: list[dict[str, Any]]
    zone: ZoneDoc
    query: QueryDoc
    xds_problems: list[str]
    last_reconcile: ResultDoc
    last_key_reconcile: ResultDoc
    store_error: str | None
    loop: LoopDoc


KeyedSection = Literal["clusters", "pending", "problems", "certificates", "store_problems"]


class StatusDocument(StatusParts, total=False):
    """``/status``: what ``StatusHub.snapshot`` returns (and ``/status/stream`` sends)."""

    version: str
    started_at: float
    subsystems: dict[str, str]
    unhealthy: list[str]
    ready: bool
    not_ready: list[str]
    generation: int
    clusters: list[ClusterDoc]
    pending: list[str]
    problems: list[ProblemDoc]
    certificates: list[CertDoc]
    store_problems: list[StoreProblemDoc]


class StatusHub:
    """Latest-value store of atlasd's status with change notification."""

    def __init__(self) -> None:
        # Invariant: ``_generation`` grows by one per publish; ``_changed`` is set
        # (and replaced) exactly when it grows.
        self._doc: dict[str, Any] = {
            "version": __version__,
            "started_at": time.time(),
            "leader": False,
            "subsystems": {},
            "unhealthy": [],
        }
        self._generation = 0
        self._changed = trio.Event()
        self._ready_parts: dict[str, bool] = {}
        self._not_ready_reasons: dict[str, str] = {}
        # section -> key -> the items of that key (a list, concatenated in key order).
        self._keyed: dict[str, dict[str, list[Any]]] = {}
        # subsystem -> failed runs in a row (no run of STABLE_SECONDS since).
        self._failures: dict[str, int] = {}
        # The JSON text of the document, kept piece by piece for ``encoded``. Invariants:
        # ``_key_text[section][key]``, when present, encodes ``_keyed[section][key]``'s
        # items (comma-separated); ``_section_text[section]``, when present, the section's
        # whole list; ``_part_text[name]`` is (value, its text) for a top-level part, valid
        # while ``_doc[name] is value`` (published values are never mutated).
        self._key_text: dict[str, dict[str, str]] = {}
        self._section_text: dict[str, str] = {}
        self._part_text: dict[str, tuple[Any, str]] = {}
        # (generation, the whole text) of the last ``encoded``: every change bumps the
        # generation, so while it stands a read costs nothing.
        self._text: tuple[int, str] | None = None

    @property
    def generation(self) -> int:
        return self._generation

    def publish(self, **parts: Unpack[StatusParts]) -> None:
        """Replace the named top-level parts of the status document."""
        self._doc.update(parts)
        self._bump()

    def publish_keyed(self, section: KeyedSection, key: str, items: list[Any] | None) -> None:
        """Replace ``key``'s items in ``section`` (None or empty: remove them)."""
        part = self._keyed.setdefault(section, {})
        if items:
            if part.get(key) == items:
                return
            part[key] = items
        elif part.pop(key, None) is None:
            return
        self._key_text.setdefault(section, {}).pop(key, None)
        self._section_text.pop(section, None)
        self._bump()

    def keyed(self, section: str) -> list[Any]:
        part = self._keyed.get(section, {})
        return [item for key in sorted(part) for item in part[key]]

    def subsystem(self, name: str, state: str) -> None:
        """Record a subsystem's state (``starting``, ``running``, ``restarting: ...``)."""
        self._doc["subsystems"] = {**self._doc["subsystems"], name: state}
        self._bump()

    def subsystem_failed(self, name: str, why: str) -> None:
        """A run of ``name`` failed (it is being restarted)."""
        self._failures[name] = self._failures.get(name, 0) + 1
        self.subsystem(name, f"restarting: {why}")
        self._health_changed()

    def subsystem_stable(self, name: str) -> None:
        """A run of ``name`` has lasted STABLE_SECONDS: its earlier failures are behind it."""
        if self._failures.pop(name, 0):
            self._health_changed()

    def unhealthy(self) -> list[str]:
        """Why atlasd is not healthy (empty: healthy): each subsystem failing for good."""
        return [
            f"{name} failed {n} times in a row"
            for name, n in sorted(self._failures.items())
            if n >= UNHEALTHY_FAILURES
        ]

    def _health_changed(self) -> None:
        unhealthy = self.unhealthy()
        if unhealthy != self._doc["unhealthy"]:
            self._doc["unhealthy"] = unhealthy
            self._bump()

    def is_ready(self, part: str) -> bool:
        """Whether the readiness part ``part`` has reported ready."""
        return self._ready_parts.get(part, False)

    def set_ready(self, part: str, ready: bool, reason: str = "") -> None:
        """Readiness is the AND of every registered part; ``reason`` says why a part is
        not ready (shown in /status and /readyz)."""
        if self._ready_parts.get(part) == ready and self._not_ready_reasons.get(part, "") == (
            "" if ready else reason
        ):
            return
        self._ready_parts[part] = ready
        if ready or not reason:
            self._not_ready_reasons.pop(part, None)
        else:
            self._not_ready_reasons[part] = reason
        self._bump()

    def expect_ready(self, *parts: str) -> None:
        """Register parts that must report ready before ``/readyz`` says yes."""
        added = [p for p in parts if p not in self._ready_parts]
        for part in added:
            self._ready_parts[part] = False
        if added:
            self._bump()  # readiness is part of the document

    @property
    def ready(self) -> bool:
        return bool(self._ready_parts) and all(self._ready_parts.values())

    def not_ready(self) -> list[str]:
        """The parts not ready, each with its reason when one was given."""
        return [
            f"{p} ({self._not_ready_reasons[p]})" if p in self._not_ready_reasons else p
            for p, ok in sorted(self._ready_parts.items())
            if not ok
        ]

    def snapshot(self) -> StatusDocument:
        doc: Any = dict(self._doc)
        for section in self._keyed:
            doc[section] = self.keyed(section)
        doc["ready"] = self.ready
        doc["not_ready"] = self.not_ready()
        doc["generation"] = self._generation
        out: StatusDocument = doc
        return out

    def encoded(self) -> str:
        """``json.dumps(self.snapshot(), sort_keys=True, default=str)``, from the kept
        pieces: only the parts and keys changed since the last call are encoded."""
        if self._text is not None and self._text[0] == self._generation:
            return self._text[1]
        texts: dict[str, str] = {}
        for name, value in self._doc.items():
            kept = self._part_text.get(name)
            if kept is None or kept[0] is not value:
                kept = (value, _dumps(value))
                self._part_text[name] = kept
            texts[name] = kept[1]
        for name in set(self._part_text) - set(self._doc):
            del self._part_text[name]
        for section in self._keyed:
            texts[section] = self._section(section)
        texts["ready"] = _dumps(self.ready)
        texts["not_ready"] = _dumps(self.not_ready())
        texts["generation"] = _dumps(self._generation)
        text = "{" + ", ".join(f"{_dumps(n)}: {texts[n]}" for n in sorted(texts)) + "}"
        self._text = (self._generation, text)
        return text

    async def encoded_in_steps(self) -> str:
        """``encoded()``, the keys' pieces not kept yet encoded first ``ENCODE_STEP`` items
        at a time between checkpoints: the first read at 5,000 clusters (or the one after a
        CA rotation changed every key) encodes ~20,000 items, 0.1-0.2 s in one step of the
        event loop otherwise. A piece is kept only while its key is unchanged, so what
        changes meanwhile is encoded again by ``encoded()``."""
        if self._text is not None and self._text[0] == self._generation:
            return self._text[1]
        done = 0
        for section in list(self._keyed):
            part = self._keyed[section]
            kept = self._key_text.setdefault(section, {})
            for key in [k for k in part if k not in kept]:
                items = part.get(key)
                if items is None or key in kept:
                    continue  # removed, or encoded by a read meanwhile
                kept[key] = _piece(items)
                done += len(items)
                if done >= ENCODE_STEP:
                    done = 0
                    await trio.lowlevel.checkpoint()
        return self.encoded()

    def _section(self, section: str) -> str:
        text = self._section_text.get(section)
        if text is None:
            part = self._keyed[section]
            kept = self._key_text.setdefault(section, {})
            pieces = []
            for key in sorted(part):
                piece = kept.get(key)
                if piece is None:
                    piece = kept[key] = _piece(part[key])
                pieces.append(piece)
            text = self._section_text[section] = "[" + ", ".join(pieces) + "]"
        return text

    async def wait_changed(self, seen: int) -> int:
        """Wait until the generation is past ``seen``; return the new generation."""
        while self._generation <= seen:
            await self._changed.wait()
        return self._generation

    def _bump(self) -> None:
        self._generation += 1
        self._changed.set()
        self._changed = trio.Event()


# What /status has always served: sorted keys, anything else as its str() (one encoder:
# ``json.dumps`` with options makes a new one per call).
_ENCODER = json.JSONEncoder(sort_keys=True, default=str)


def _dumps(value: Any) -> str:
    return _ENCODER.encode(value)


def _piece(items: list[Any]) -> str:
    """One key's items in a section's list: their JSON texts, comma-separated."""
    return ", ".join(_dumps(item) for item in items)
