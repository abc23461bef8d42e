"""Verified state downloads (README "Threat model" and "Running on real networks"), a mixin of ``StateAverager``.

hivemind copies the first donor's tensors and epoch, donors ranked by the priority they declare themselves (a float,
inf allowed), one donor at a time. Here only admitted donors are asked, a priority is capped at the epoch the download
expects, a state is taken only if its (epoch, digest of the parameters and settings) is one the caller expects (a
strict majority of admitted peers' statuses) and its statistics pass ``loaded_state.problem``, and what a donor
streams is bounded as it comes in (``loaded_state.Budget``), and in time (``stream_limit``: a donor can keep each
message within the wait for the next and trickle for minutes); else the next donor. A donor serves its state, whole
or a stripe, to admitted askers only (hivemind served anyone who could reach it).

**Stripes.** A state expected to be held by several donors is first asked of up to ``stripes`` of them at once, each
for a stripe of about equal bytes (``stripes_of``; ``rpc_download_state_part``), and checked whole as above: a
download is no longer bound by one donor's uplink (``scripts/bench_state_download.py``, 3 donors across the test WAN,
40 ms RTT, 1 % loss, 20 Mbit/s uplinks: a 15.7 MB state in 2.8 s instead of 7.2 s, 1 MB in 0.32 s instead of 0.59 s).
A part that fails (a donor without this RPC, a part that breaks the budget or comes too slowly) is asked once more,
of a donor whose own part came in (else of one not asked yet); if that fails too, or the whole does not match, the
download falls back to one donor at a time, and a donor whose part broke the budget is counted and not asked again in
that download. If every donor asked has moved on past the epochs expected (the swarm's transition came during the
download), the download ends there: each would serve that newer state again, and the caller reads the statuses anew.
The moments then come from several donors, each checked against Adam's bound as before; a donor among them chooses
its share of them (one asked alone chose them all).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from typing import AsyncIterator, Optional, Sequence

import msgpack
from hivemind.compression import CompressionInfo
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from atlas_swarm.swarm import loaded_state
from atlas_swarm.swarm.codec import deserialize

logger = logging.getLogger(__name__)

STRIPES = 3  # donors one download asks at once
MAX_STRIPES = 8  # what a donor serves a part of
MAX_REQUEST = 64  # bytes of a part request
STREAM_GRACE = 10.0  # seconds a donor's stream may take beyond its bytes at MIN_STREAM_RATE (connecting, serializing)
MIN_STREAM_RATE = 125_000  # bytes/s (1 Mbit/s): a donor slower than that on average is left for the next
# Once one stripe is in, the others may take SLOWER_STRIPE times as long per byte, or STRIPE_GRACE seconds from the
# start if more (small states: latency, not bytes); a stripe left then is asked of a donor whose stripe came in, so
# leaving an honest stripe that was merely slower costs about one stripe's time more
SLOWER_STRIPE, STRIPE_GRACE = 2.0, 1.5


def stream_limit(layout: list) -> float:
    """Seconds a download of a state of ``layout`` (``loaded_state.layout``: (shape, bytes) per tensor) may take."""
    return STREAM_GRACE + sum(size for _, size in layout) / MIN_STREAM_RATE


def part_request(part: int, of: int) -> bytes:
    return msgpack.packb([part, of])


def parse_part_request(blob) -> Optional[tuple[int, int]]:
    """(part, of) of a part request's bytes: 0 <= part < of <= MAX_STRIPES; None for anything else."""
    if not isinstance(blob, bytes) or len(blob) > MAX_REQUEST:
        return None
    try:
        part, of = msgpack.unpackb(blob)
    except Exception:
        return None
    if type(part) is not int or type(of) is not int or not 0 <= part < of <= MAX_STRIPES:
        return None
    return part, of


def stripes_of(sizes: Sequence[int], of: int) -> list[list[int]]:
    """Which tensors each of ``of`` stripes of a state holds, given each tensor's bytes (``sizes``, in the state's
    order): each tensor in turn goes to the stripe with the fewest bytes so far (the first such), so no stripe holds
    more than a third of the bytes plus one tensor. Donor and downloader compute it from their own layouts, which
    match for any state the downloader can take. (Every ``of``-th tensor, as until 2026-12-07, gave an Adam state
    stripes of 13, 43 and 43 % of its bytes: hivemind sends each parameter's statistics as exp_avg, exp_avg_sq and a
    one-value step, so all the steps fell into one stripe and a 3-stripe download waited for 43 %.)"""
    loads, stripes = [0] * of, [[] for _ in range(of)]
    for i, size in enumerate(sizes):
        k = loads.index(min(loads))
        stripes[k].append(i)
        loads[k] += size
    return stripes


def interleave(parts: list, stripes: list[list[int]]) -> Optional[list]:
    """The tensors of a state from its parts (part k: the tensors ``stripes[k]`` names, in that order), or None
    unless each part holds exactly as many as its stripe names."""
    if not parts or len(parts) != len(stripes) or any(len(p) != len(s) for p, s in zip(parts, stripes)):
        return None
    tensors: list = [None] * sum(len(s) for s in stripes)
    for part, indices in zip(parts, stripes):
        for tensor, i in zip(part, indices):
            tensors[i] = tensor
    return tensors


class StateDownloads:
    """Mixin for hivemind's TrainingStateAverager (ours: ``StateAverager``), with ``gather_settings`` (its gate) and
    ``state_digest`` handed in by the class that uses it (``digest``)."""

    expected_states = staticmethod(lambda: None)  # the peer's: set of acceptable (epoch, digest); None: take any
    stripes = STRIPES  # donors asked at once (1: one at a time, as hivemind)
    digest = staticmethod(lambda serializer, metadata, tensors, parameters: "")  # averagers.state_digest

    def parameters_digest(self) -> str:
        """What this peer's statuses claim for its state (parameters and optimizer settings: state_digest), as a
        downloader computes it of what it got: a donor could otherwise serve honest parameters with a learning rate
        of 1e9."""
        metadata, tensors, _ = self.get_current_state()
        return self.digest(self.serializer, metadata, tensors, self._parameter_count())

    def _parameter_count(self) -> int:
        return sum(len(group["params"]) for group in self.optimizer.param_groups)

    def load_state_from_peers(self, expect=None, **kwargs):
        expect = self.expected_states() if expect is None else expect
        if expect is not None and not expect:  # no state may be taken: downloading every donor's would be wasted
            return None
        self._outer_pipe.send(("_expect_states", [None if expect is None else sorted(expect)], {}))
        try:
            return super().load_state_from_peers(**kwargs)
        except TimeoutError:  # hivemind's optimizer would retry this forever; its callers go on without a state
            logger.info("No state could be downloaded in time")
            return None

    async def _expect_states(self, expect) -> None:  # in the averager process, before the download
        self._expected = None if expect is None else {tuple(e) for e in expect}

    async def _load_state_from_peers(self, future, timeout: Optional[float] = None):
        """hivemind 1.1.12's, with donors filtered and ranked, striped, and each download verified (above)."""
        expect = getattr(self, "_expected", None)
        gate = self.gather_settings.gate
        if timeout is not None:
            timeout = self.next_chunk_timeout if self.next_chunk_timeout is not None else self.request_timeout
        try:
            donors = self._ranked_donors(expect)
            if expect is not None and self.stripes > 1 and len(donors) > 1:
                asked = donors[: self.stripes]
                got, broke, epochs = await self._download_striped(asked, donors[self.stripes:], timeout,
                                                                  {e for e, _ in expect})  # fmt: skip
                why = "a part failed" if got is None else self._refusal(got, expect)
                if why is None:
                    future.set_result(got)
                    return
                top = max(e for e, _ in expect)
                if all(type(e) is int for e in epochs) and len(set(epochs)) == 1 and epochs[0] > top:
                    # every donor asked has moved on past the epochs expected (the swarm's transition came during
                    # the download): each would serve that newer state again. The caller reads the statuses again.
                    # (One liar claiming a newer epoch cannot end a download so: the honest donors asked disagree.)
                    logger.info(f"The donors moved on to epoch {epochs[0]} while their state was downloaded")
                    return
                logger.info(f"Striped state download from {len(asked)} donors not taken ({why}); one at a time")
                donors = [peer for peer in donors if peer not in broke]
            for peer in donors:
                got = await self._download(peer, None, timeout)
                if not isinstance(got, tuple):  # failed, or over budget (counted)
                    continue
                why = self._refusal(got, expect)
                if why is not None:
                    if gate is not None:
                        gate.count("refused_states")
                    logger.info(f"State from {peer} {why}; trying the next donor")
                    continue
                future.set_result(got)
                return
        finally:
            if not future.done():
                future.set_result(None)

    def _ranked_donors(self, expect) -> list:
        """The admitted donors declared under this prefix, highest (capped) priority first, ties in random order."""
        gate = self.gather_settings.gate
        key_manager = self._matchmaking.group_key_manager
        found = self.dht.get(f"{key_manager.prefix}.all_averagers", latest=True) or ({}, None)
        declared = found[0] if isinstance(found[0], dict) else {}
        top = max((e for e, _ in expect), default=None) if expect else None
        donors = []
        for peer_bytes, info in declared.items():
            try:
                peer = PeerID(peer_bytes)
            except Exception:
                continue
            priority = getattr(info, "value", None)
            if peer == self.peer_id or not isinstance(priority, (int, float)) or not math.isfinite(priority):
                continue
            if gate is not None and not gate.admits(peer.to_base58()):
                gate.count("refused_donors")
                continue
            donors.append((min(float(priority), top) if top is not None else float(priority), random.random(), peer))
        return [peer for _, _, peer in sorted(donors, reverse=True)]

    def _refusal(self, got, expect) -> Optional[str]:
        """Why a downloaded (metadata, tensors) is not taken, or None."""
        metadata, tensors = got
        if type(metadata.get("epoch")) is not int:
            return "has no epoch"
        claim = (metadata["epoch"], self.digest(self.serializer, metadata, tensors, self._parameter_count()))
        if expect is not None and claim not in expect:
            held = sorted({e for e, _ in expect})
            why = "its parameters differ" if claim[0] in held else f"epoch {claim[0]}, they hold {held}"
            return f"is not the one the run's peers hold ({why})"
        why = loaded_state.problem(self.optimizer, self.extra_tensors, metadata, tensors)
        return None if why is None else f"cannot be loaded ({why})"  # (its moments are checked here)

    async def _download_striped(self, peers: list, spares: list, timeout,
                                wanted: set) -> tuple[Optional[tuple], set, list]:  # fmt: skip
        """The state from ``peers`` at once, part i of len(peers) from the i-th: (metadata, tensors) or None, the
        donors whose part broke the budget or came too slowly, and the epoch each part came with (None: no part). Once
        one part is in, the others get SLOWER_STRIPE times as long per byte (at least STRIPE_GRACE s), not each
        its own ``stream_limit``: one slow donor no longer holds the others' finished parts for minutes. A part that
        failed so is asked once more, of a donor whose own part came in at an epoch in ``wanted`` (then of one of
        ``spares``, not asked yet), not the whole state of each donor in turn."""
        parts, broke = await self._parts(peers, timeout)
        failed = [i for i, part in enumerate(parts) if not isinstance(part, tuple)]
        proven = [p for p, part in zip(peers, parts) if isinstance(part, tuple) and part[0].get("epoch") in wanted]
        helpers = [peer for peer in proven + spares if peer not in broke]
        if failed and proven and helpers:
            of, who = len(peers), [helpers[k % len(helpers)] for k in range(len(failed))]
            again = [asyncio.ensure_future(self._download(helper, (i, of), timeout)) for i, helper in zip(failed, who)]
            try:
                await asyncio.wait(again)
            except BaseException:  # this download was itself cancelled
                for task in again:
                    task.cancel()
                raise
            for i, helper, task in zip(failed, who, again):
                parts[i] = task.result()
                logger.info(f"The stripe {peers[i]} did not send was asked of {helper}: "
                            f"{'came in' if isinstance(parts[i], tuple) else parts[i]}")  # fmt: skip
                if parts[i] in ("over budget", "too slow"):
                    broke.add(helper)
        epochs = [part[0].get("epoch") if isinstance(part, tuple) else None for part in parts]
        if any(not isinstance(part, tuple) for part in parts):
            return None, broke, epochs
        tensors = interleave([t for _, t in parts], self._stripes(len(peers)))
        if tensors is None or any(e != epochs[0] for e in epochs):
            return None, broke, epochs  # a donor sent less than its stripe, or donors at different epochs
        return (parts[0][0], tensors), broke, epochs

    async def _parts(self, peers: list, timeout) -> tuple[list, set]:
        """Part i of len(peers) from the i-th of ``peers``, at once (``_download_striped``): each part as
        ``_download`` returns it ("too slow" if it was left), and the donors whose part broke the budget or was left."""
        of, loop = len(peers), asyncio.get_running_loop()
        layout = loaded_state.layout(self.optimizer, self.extra_tensors)
        sizes = [max(1, sum(layout[j][1] for j in stripe)) for stripe in self._stripes(of)]  # bytes of each part
        began, per_byte = loop.time(), None  # seconds per byte of the first part that came in whole
        tasks = [asyncio.ensure_future(self._download(peer, (i, of), timeout)) for i, peer in enumerate(peers)]
        pending = set(tasks)
        try:
            while pending:
                wait = None if per_byte is None else \
                    max(0.0, began + max(STRIPE_GRACE, SLOWER_STRIPE * per_byte * max(sizes)) - loop.time())
                done, pending = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break
                for task in done:
                    if per_byte is None and isinstance(task.result(), tuple):
                        per_byte = (loop.time() - began) / sizes[tasks.index(task)]
        except BaseException:  # this download was itself cancelled: so are its parts
            for task in tasks:
                task.cancel()
            raise
        for task in pending:
            task.cancel()
            if self.gather_settings.gate is not None:
                self.gather_settings.gate.count("slow_donors")
            logger.info(f"A stripe from {peers[tasks.index(task)]} still incomplete long after the others'; left")
        if pending:
            await asyncio.wait(pending)
        parts = ["too slow" if task.cancelled() else task.result() for task in tasks]
        return parts, {peer for peer, part in zip(peers, parts) if part in ("over budget", "too slow")}

    def _stripes(self, of: int) -> list[list[int]]:
        """``stripes_of`` this peer's own state layout: the tensors a donor's stripes hold."""
        return stripes_of([size for _, size in loaded_state.layout(self.optimizer, self.extra_tensors)], of)

    async def _download(self, peer, part: Optional[tuple[int, int]], timeout):
        """(metadata, tensors) from ``peer``: its whole state (hivemind's rpc_download_state) or ``part`` (part, of)
        of it (ours); None if it failed, "over budget" if it sent more than that part of our own state holds, "too
        slow" if it did not arrive by ``stream_limit`` (a donor can keep each message within ``timeout`` of the
        last)."""
        layout = loaded_state.layout(self.optimizer, self.extra_tensors)
        layout = layout if part is None else [layout[j] for j in self._stripes(part[1])[part[0]]]
        gate, streams = self.gather_settings.gate, []
        reading = asyncio.ensure_future(self._read(peer, part, layout, timeout, streams))
        try:
            done, _ = await asyncio.wait({reading}, timeout=stream_limit(layout))
            if not done:  # (not a wait for one message past ``timeout``: that fails the read itself, below)
                reading.cancel()
                await asyncio.wait({reading})
                if gate is not None:
                    gate.count("slow_donors")
                logger.info(f"State from {peer} incomplete after {stream_limit(layout):.0f} s; trying the next donor")
                return "too slow"
            return reading.result()
        except Exception as e:
            logger.info(f"Failed to download state from {peer}: {e!r}")
            return None
        finally:  # a stream left early is closed now (p2pd's stream too), not whenever it is collected
            if not reading.done():  # (this download was itself cancelled)
                reading.cancel()
            for it in reversed(streams):
                if hasattr(it, "aclose"):
                    try:
                        await it.aclose()
                    except Exception:
                        pass

    async def _read(self, peer, part: Optional[tuple[int, int]], layout: list, timeout, streams: list):
        stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
        if part is None:
            stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        else:
            stream = await stub.rpc_download_state_part(averaging_pb2.DownloadData(metadata=part_request(*part)))
        streams.append(stream)
        chunks = aiter_with_timeout(stream, timeout=timeout)
        streams.append(chunks)
        pieces, tensors, metadata = [], [], None
        budget = loaded_state.Budget(layout)
        async for message in chunks:
            why = budget.take(len(message.metadata), message.tensor_part)
            if why is not None:  # read no further: what this donor sends is not a state of ours
                if self.gather_settings.gate is not None:
                    self.gather_settings.gate.count("refused_states")
                logger.info(f"State from {peer} refused while it came in ({why}); trying the next donor")
                return "over budget"
            if message.metadata:
                metadata = self.serializer.loads(message.metadata)
            if message.tensor_part.dtype and pieces:
                tensors.append(deserialize(combine_from_streaming(pieces)))
                pieces = []
            if message.tensor_part.dtype or pieces:
                pieces.append(message.tensor_part)
        if pieces:
            tensors.append(deserialize(combine_from_streaming(pieces)))
        return (metadata, tensors) if isinstance(metadata, dict) else None

    def _serves(self, context: P2PContext) -> bool:
        """Whether the asker may download our state (admitted); a refusal is counted."""
        gate = self.gather_settings.gate
        if gate is not None and not gate.admits(context.remote_id.to_base58()):
            gate.count("refused_downloads")
            return False
        return True

    async def rpc_download_state(
        self, _request: averaging_pb2.DownloadRequest, _context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """hivemind's, for an admitted asker only: it served our whole state to anyone who could reach us, a
        stranger in an allowlist or staked run included."""
        if not self._serves(_context):
            return
        async for message in super().rpc_download_state(_request, _context):
            yield message

    async def rpc_download_state_part(
        self, request: averaging_pb2.DownloadData, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """The ``part``-th of ``of`` stripes of our state (``stripes_of``; request.metadata: ``part_request``), the
        state's metadata with the first message: a stripe of rpc_download_state, for an admitted asker."""
        if not self._serves(context):
            return
        asked = parse_part_request(request.metadata)
        if asked is None or not self.allow_state_sharing:
            return
        part, of = asked
        metadata, tensors, infos = await self._get_current_state_from_host_process()
        if infos is None:
            infos = [CompressionInfo.from_tensor(tensor, key=i) for i, tensor in enumerate(tensors)]
        for i in stripes_of([t.numel() * t.element_size() for t in tensors], of)[part]:
            serialized = self.state_compression.compress(tensors[i], infos[i], allow_inplace=False)
            for piece in split_for_streaming(serialized):
                yield averaging_pb2.DownloadData(tensor_part=piece, metadata=metadata or b"")
                metadata = None
        if metadata is not None:  # a part with no tensor: the metadata alone
            yield averaging_pb2.DownloadData(metadata=metadata)
