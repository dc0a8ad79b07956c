"""Offers: a guest ships a signed module to a host, which accepts it before it can run.

The guest (``acme``) publishes the binary in chunks, then a JSON document, on
``deadlift.share.<host>.offers.<name>.<sha256>.<part>``; the integration's
import delivers them into the host's account on
``deadlift.from.<guest>.offers.…``, where the host's offers stream keeps them
and republishes their headers to the guest as receipts. The host lists the
offers, and accepting one verifies the guest's signature with the
``signing_key`` its integration declares, then stores the module in the host's
registry as ``guest/name@version``. The owner of an offer is the account it
arrived from (the subject the server wrote), never a field of the document.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deadlift.bus.integration_streams import ensure_integration_streams, offers_stream
from deadlift.bus.registry import MAX_MODULE_BYTES, VERSION_PATTERN, ModuleMeta, Registry
from deadlift.errors import ConfigError, NotFoundError
from deadlift.model import integrations as links
from deadlift.model.contracts import module_name, module_owner, step_problems
from deadlift.model.integrations import Integration
from deadlift.model.orgs import OrgManifest
from deadlift.model.workflow import NAME_PATTERN, Step, Workflow
from deadlift.wasm.codecs import CODECS
from deadlift.wire import events, signing

log = logging.getLogger("deadlift.offers")

META = "meta"
MAX_CHUNK = 256 * 1024
HEADROOM = 8 * 1024  # for headers and the subject: a chunk plus them stays under max_payload


@dataclass(frozen=True, slots=True)
class Offer:
    """A module a guest offered a host, as the host sees it."""

    owner: str
    name: str
    version: str
    sha256: str
    size: int
    signature: str
    offered_at: float
    status: str = "pending"  # pending | accepted | invalid signature | not listed … | conflicts …
    codec: str = "json"
    chunks: int = 1
    timeout_ms: int | None = None
    max_memory_pages: int | None = None

    @property
    def ref(self) -> str:
        """``owner/name@version``."""
        return f"{self.owner}/{self.name}@{self.version}"


class OfferDocument(BaseModel):
    """The JSON a guest publishes after the chunks of a binary (a claim, checked on accept)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=1, le=MAX_MODULE_BYTES)
    chunks: int = Field(ge=1, le=MAX_MODULE_BYTES)
    codec: str = "json"
    exports: list[str] = Field(default_factory=list)
    host_imports: list[str] = Field(default_factory=list)
    timeout_ms: int | None = Field(None, ge=1)
    max_memory_pages: int | None = Field(None, ge=1, le=65536)
    signature: str = Field(max_length=256)
    offered_at: float = 0.0


def chunk_size(max_payload: int) -> int:
    """The size of an offer's chunks on a server with this ``max_payload``."""
    return max(1024, min((max_payload or 1024 * 1024) - HEADROOM, MAX_CHUNK))


def _guest_integration(manifest: OrgManifest, host: str, guest: str) -> tuple[str, Integration]:
    found = manifest.hosting(host, guest)
    if found is None:
        raise ConfigError(
            f"no integration in the org manifest has {host} hosting {guest}'s modules; "
            f"declare one under integrations: (host: {host}, guest: {guest}, signing_key, modules)"
        )
    return found


def _check_listed(key: str, item: Integration, name: str) -> None:
    if name not in item.modules:
        raise ConfigError(
            f"integration {key} does not list {item.guest}'s module {name!r} (it lists: "
            f"{', '.join(item.modules) or 'none'}); add it under modules: in the org manifest"
        )


async def offer_module(
    nc: Client,
    registry: Registry,
    manifest: OrgManifest,
    *,
    owner: str,
    ref: str,
    host: str,
    seed: str,
    timeout: float = 5.0,
) -> Offer:
    """Sign the org's own module ``ref`` and offer it to ``host``; return when the host stored it.

    ``owner`` is the org of ``nc``'s account (:func:`deadlift.bus.identity.whoami`),
    never a flag: the host attributes the offer to the account it arrives from.

    Raises:
        ConfigError: no integration has ``host`` hosting ``owner``, it does not list
            the module, ``seed`` is not the declared signing key, or the host did
            not store the offer within ``timeout`` seconds.
        NotFoundError: no such module in the org's registry.
    """
    key, item = _guest_integration(manifest, host, owner)
    if module_owner(ref) is not None:
        raise ConfigError(
            f"module {ref}: offer one of {owner}'s own modules, as NAME or NAME@VERSION"
        )
    _check_listed(key, item, module_name(ref))
    if signing.public_key(seed) != item.signing_key:
        raise ConfigError(
            f"this key is not the signing_key integration {key} declares for {owner} (this "
            f"key's public key is {signing.public_key(seed)}, the integration declares "
            f"{item.signing_key}); sign with the declared key's seed, or declare this key"
        )
    meta = await registry.resolve(ref)
    _check_listed(key, item, meta.name)
    wasm = await registry.binary(meta.sha256)
    signature = signing.sign(seed, owner, meta.name, meta.version, meta.sha256)
    await ensure_integration_streams(nc.jetstream(), manifest, owner)
    size = chunk_size(nc.max_payload)
    chunks = [wasm[i : i + size] for i in range(0, len(wasm), size)] or [b""]
    offer = Offer(
        owner=owner,
        name=meta.name,
        version=meta.version,
        sha256=meta.sha256,
        size=meta.size,
        signature=signature,
        offered_at=time.time(),
        codec=meta.codec,
        chunks=len(chunks),
        timeout_ms=meta.timeout_ms,
        max_memory_pages=meta.max_memory_pages,
    )
    document = _document(offer, meta)
    receipts = _Receipts()
    sub = await nc.subscribe(
        links.from_subject(host, links.RECEIPTS, meta.name, meta.sha256, ">"), cb=receipts.got
    )
    try:
        # The document goes last, once every chunk is stored: an offer the host
        # lists is always complete.
        for index, chunk in enumerate(chunks):
            await nc.publish(_offer_subject(host, meta, str(index)), chunk)
        await nc.flush()
        await receipts.wait_for({str(i) for i in range(len(chunks))}, timeout, host, offer)
        await nc.publish(_offer_subject(host, meta, META), document)
        await nc.flush()
        await receipts.wait_for({META}, timeout, host, offer)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return offer


def _offer_subject(host: str, meta: ModuleMeta, part: str) -> str:
    return links.share_subject(host, links.OFFERS, meta.name, meta.sha256, part)


def _document(offer: Offer, meta: ModuleMeta) -> bytes:
    return json.dumps(
        {
            "name": offer.name,
            "version": offer.version,
            "sha256": offer.sha256,
            "size": offer.size,
            "chunks": offer.chunks,
            "codec": offer.codec,
            "exports": meta.exports,
            "host_imports": meta.host_imports,
            "timeout_ms": offer.timeout_ms,
            "max_memory_pages": offer.max_memory_pages,
            "signature": offer.signature,
            "offered_at": offer.offered_at,
        },
        sort_keys=True,
    ).encode()


class _Receipts:
    """The parts of an offer the host's stream has stored (its republished headers)."""

    def __init__(self) -> None:
        self.parts: set[str] = set()
        self.changed = asyncio.Event()

    async def got(self, msg: Any) -> None:
        self.parts.add(msg.subject.rpartition(".")[2])
        self.changed.set()

    async def wait_for(self, wanted: set[str], timeout: float, host: str, offer: Offer) -> None:
        deadline = time.monotonic() + timeout
        while not wanted <= self.parts:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = len(wanted - self.parts)
                raise ConfigError(
                    f"{host} has not stored the offer: no receipt for {missing} of "
                    f"{len(wanted)} part(s) of {offer.name}@{offer.version} within {timeout:g} s; "
                    f"the host's offers stream is created when its worker starts or by "
                    f"`deadlift --org {host} module offers`; then offer again"
                )
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)


async def list_offers(
    js: JetStreamContext, registry: Registry, manifest: OrgManifest, host: str
) -> list[Offer]:
    """Every module offered to ``host`` by its guests, oldest first, with its status.

    Creates the host's offers streams on first use (so guests can offer).
    """
    await ensure_integration_streams(js, manifest, host)
    accepted = [m for m in await registry.modules() if m.owner]
    found: list[Offer] = []
    for key, item in manifest.integrations_of(host).items():
        if item.host != host:
            continue
        for offer in await _offers_from(js, item.guest):
            found.append(_with_status(offer, key, item, accepted))
    return sorted(found, key=lambda o: (o.offered_at, o.owner, o.name))


async def _offers_from(js: JetStreamContext, guest: str) -> list[Offer]:
    """The offers stored in ``guest``'s offers stream (status not yet known)."""
    stream = offers_stream(guest)
    try:
        info = await js.stream_info(
            stream, subjects_filter=links.from_subject(guest, links.OFFERS, "*", "*", META)
        )
    except nats.js.errors.NotFoundError:
        return []
    offers = []
    for subject in sorted(info.state.subjects or {}):
        try:
            msg = await js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            continue  # replaced meanwhile
        offer = _parse(subject, msg.headers, msg.data or b"")
        if offer is not None:
            offers.append(offer)
    return offers


def _parse(subject: str, headers: dict[str, str] | None, data: bytes) -> Offer | None:
    """An offer from a stored document; None (logged) when it is forged or malformed."""
    # deadlift.from.<owner>.offers.<name>.<sha256>.meta: the owner is where it came from.
    tokens = subject.split(".")
    owner, name, sha = tokens[2], tokens[4], tokens[5]
    if events.relayed_by_server(headers):
        log.warning(
            "offer on %s skipped: written by a stream of this account, not %s", subject, owner
        )
        return None
    try:
        doc = OfferDocument.model_validate_json(data)
    except ValidationError as exc:
        log.warning("offer on %s skipped: not a valid offer document (%s)", subject, exc)
        return None
    if (doc.name, doc.sha256) != (name, sha) or doc.codec not in CODECS:
        log.warning("offer on %s skipped: its document names another module or codec", subject)
        return None
    return Offer(
        owner=owner,
        name=doc.name,
        version=doc.version,
        sha256=doc.sha256,
        size=doc.size,
        signature=doc.signature,
        offered_at=doc.offered_at,
        codec=doc.codec,
        chunks=doc.chunks,
        timeout_ms=doc.timeout_ms,
        max_memory_pages=doc.max_memory_pages,
    )


def _with_status(offer: Offer, key: str, item: Integration, accepted: list[ModuleMeta]) -> Offer:
    same = [
        m
        for m in accepted
        if (m.owner, m.name, m.version) == (offer.owner, offer.name, offer.version)
    ]
    if any(m.sha256 == offer.sha256 for m in same):
        status = "accepted"
    elif same:
        status = f"conflicts with accepted sha256 {same[0].sha256[:12]}"
    elif offer.name not in item.modules:
        status = f"not listed in integration {key}"
    elif not signing.verify(
        item.signing_key, offer.signature, offer.owner, offer.name, offer.version, offer.sha256
    ):
        status = "invalid signature"
    else:
        status = "pending"
    return replace(offer, status=status)


async def accept_offer(
    js: JetStreamContext,
    registry: Registry,
    manifest: OrgManifest,
    *,
    host: str,
    ref: str,
    probe_timeout_s: float | None = None,
) -> tuple[ModuleMeta, bool]:
    """Accept the offer ``owner/name@version``: verify it and store it in ``host``'s registry.

    Returns the stored metadata and whether anything changed (accepting the same
    binary again is a no-op).

    Raises:
        ConfigError: no such integration, the module is not listed, the offer is
            incomplete or altered, the signature does not verify with the declared
            signing_key, or the version is taken by another binary.
        NotFoundError: the guest has not offered that version.
        ModuleError: the binary does not load.
    """
    owner, name = module_owner(ref), module_name(ref)
    version = ref.partition("@")[2]
    if owner is None or not version or version == "latest":
        raise ConfigError(
            f"accept {ref}: name the offer as OWNER/NAME@VERSION (e.g. acme/{name}@1); "
            "`deadlift module offers` lists them"
        )
    key, item = _guest_integration(manifest, host, owner)
    _check_listed(key, item, name)
    await ensure_integration_streams(js, manifest, host)
    offered = [o for o in await _offers_from(js, owner) if (o.name, o.version) == (name, version)]
    if not offered:
        raise NotFoundError(
            f"{owner} has not offered {name}@{version} to {host}; `deadlift --org {host} module "
            f"offers` lists the offers, and {owner} offers with `deadlift --org {owner} module "
            f"offer {name}@{version} --to {host}`"
        )
    offer = max(offered, key=lambda o: o.offered_at)
    wasm = await _binary_of(js, offer)
    if not signing.verify(item.signing_key, offer.signature, owner, name, version, offer.sha256):
        raise ConfigError(
            f"{offer.ref}: signature does not verify with {owner}'s signing_key declared in "
            f"integration {key}: the module was changed after {owner} signed it, or signed "
            "with another key; not accepted"
        )
    return await registry.accept_module(
        wasm,
        owner=owner,
        name=name,
        version=version,
        signature=offer.signature,
        signing_key=item.signing_key,
        codec=offer.codec,
        timeout_ms=offer.timeout_ms,
        max_memory_pages=offer.max_memory_pages,
        source=f"offer {offer.ref}",
        probe_timeout_s=probe_timeout_s,
    )


async def _binary_of(js: JetStreamContext, offer: Offer) -> bytes:
    """Reassemble an offer's chunks from the host's offers stream and check its sha256."""
    stream = offers_stream(offer.owner)
    parts = []
    for index in range(offer.chunks):
        subject = links.from_subject(
            offer.owner, links.OFFERS, offer.name, offer.sha256, str(index)
        )
        try:
            msg = await js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            raise ConfigError(
                f"{offer.ref}: the offer is incomplete (part {index} of {offer.chunks} is "
                f"missing); ask {offer.owner} to offer it again"
            ) from None
        if events.relayed_by_server(msg.headers):
            raise ConfigError(
                f"{offer.ref}: part {index} was written by a stream of this account, not by "
                f"{offer.owner}; not accepted"
            )
        parts.append(msg.data or b"")
    wasm = b"".join(parts)
    if len(wasm) != offer.size or hashlib.sha256(wasm).hexdigest() != offer.sha256:
        raise ConfigError(
            f"{offer.ref}: the stored chunks are not the offered binary (sha256 or size "
            f"differs); ask {offer.owner} to offer it again"
        )
    return wasm


async def guest_module_problem(
    registry: Registry, manifest: OrgManifest | None, workflow: Workflow, step: Step
) -> str | None:
    """Why a worker must not load ``step``'s guest module (None: it may).

    The step must keep its org's integration, and the registry must hold an
    accepted entry of that owner and name for the pinned sha256 whose signature
    verifies with the manifest's signing_key (the stored key is not trusted).
    """
    owner = module_owner(step.module)
    if owner is None:
        return None
    if manifest is None:
        return (
            f"module {step.module} belongs to {owner} and this worker has no org manifest "
            "to verify it with; start the worker with --orgs FILE"
        )
    problems = step_problems(manifest, workflow, step)
    if problems:
        return "; ".join(problems)
    key, item = _guest_integration(manifest, workflow.org, owner)
    name = module_name(step.module)
    pinned = [
        m for m in await registry.versions(name, owner=owner) if m.sha256 == step.module_sha256
    ]
    if not pinned:
        return (
            f"no accepted version of {owner}/{name} has sha256 {step.module_sha256}; "
            f"accept it with `deadlift --org {workflow.org} module accept {owner}/{name}@VERSION`"
            " and apply the workflow again"
        )
    for meta in pinned:
        if meta.signature and signing.verify(
            item.signing_key, meta.signature, owner, name, meta.version, meta.sha256
        ):
            return None
    return (
        f"the signature of {pinned[-1].ref} does not verify with {owner}'s signing_key "
        f"declared in integration {key}: its registry entry was changed after it was "
        "accepted, or the key changed; accept the module again"
    )
