"""The ``prefix_affinity`` routing policy: send a request where its prompt
prefix is most likely still in the KV cache.

* The prompt is rendered as the backend will see it (chat messages one after
  the other with their roles, tools first; a completion's prompt as is), cut
  into fixed-size blocks of ``block_chars`` characters, and each block hashed
  together with the hash of the one before it — so block *k*'s hash stands for
  the whole prefix up to it.
* A bounded LRU index (``max_blocks`` entries) maps block hash → the backends
  (up to ``holders``, most recent first; and, for ``llamacpp`` backends, the
  slot) that processed that prefix.
* The longest prefix found on a backend that may take the request wins (the
  cheapest of its holders when several have it, e.g. a shared system prompt), unless
  that backend is overloaded relative to the others (SGLang's rule: its load
  exceeds a reference backend's by more than ``balance_abs_threshold`` requests
  *and* by more than ``balance_rel_threshold`` ×; or, for backends whose slots
  are known — llama.cpp — all its slots are busy while the other has a free
  one). The reference, and the
  destination when nothing matches, is the cheaper of two random backends by
  :func:`comox.cheaper` (measured tokens/s × load), so a slow
  node gets proportionally less new work. O(prompt length), not O(fleet).
* The index corrects itself from what backends report:
  ``usage.prompt_tokens_details.cached_tokens`` or llama.cpp's
  ``timings.cache_n``. Each backend keeps a hit-rate of the predicted cache
  hits that really happened; a backend whose predicted hits stop happening
  (restarted, cache too small, a different slot) loses its entries and its
  affinity until hits come back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import comox
from comox import BackendView, GatewayRequest, GroupView, Usage, cheaper, power_of_two, request_size

__all__ = ["PrefixAffinity", "render_prompt", "block_hashes"]

STATE_KEY = "comox.prefix_affinity"


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
                elif part.get("type"):
                    parts.append(f"<{part['type']}>")
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return "" if content is None else str(content)


def render_prompt(body: dict[str, Any]) -> str:
    """The prompt text as a chat template lays it out (roles in order; an
    earlier turn renders the same whatever follows it), or the raw prompt."""
    messages = body.get("messages")
    if isinstance(messages, list):
        out = []
        tools = body.get("tools")
        if tools:
            out.append(f"<tools>{tools!r}\n")
        for message in messages:
            if isinstance(message, dict):
                out.append(f"<|{message.get('role')}|>\n{_text(message.get('content'))}\n")
        return "".join(out)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            return first  # a batch: route by its first prompt
        return " ".join(map(str, prompt if isinstance(first, int) else first))
    return ""


def block_hashes(text: str, block: int) -> list[int]:
    """Chained hashes of the full ``block``-sized pieces of ``text``."""
    hashes = []
    h = 0
    for start in range(0, len(text) - block + 1, block):
        h = hash((h, text[start:start + block]))
        hashes.append(h)
    return hashes


class _Entry:
    """Shared by all blocks of one prompt: where it went, and its last block."""

    __slots__ = ("state", "slot", "gen", "tip")

    def __init__(self, state: BackendView, slot: int | None, gen: int, tip: int | None) -> None:
        self.state = state
        self.slot = slot
        self.gen = gen
        self.tip = tip


class PrefixAffinity:
    def __init__(self, group: GroupView) -> None:
        options = group.policy_options
        self.group = group
        self.rng = group.rng
        self.block_chars = int(options.pop("block_chars", 256))
        self.max_blocks = int(options.pop("max_blocks", 200_000))
        self.balance_abs = float(options.pop("balance_abs_threshold", 4))
        self.balance_rel = float(options.pop("balance_rel_threshold", 1.5))
        self.min_hit_rate = float(options.pop("min_hit_rate", 0.3))
        self.holders = int(options.pop("holders", 4))
        if options:
            raise ValueError(f"unknown option(s) for prefix_affinity: {', '.join(sorted(options))}")
        if self.block_chars < 1 or self.max_blocks < 1 or self.holders < 1:
            raise ValueError("block_chars, max_blocks and holders must be at least 1")
        self.index: OrderedDict[int, list[_Entry]] = OrderedDict()
        # Per backend (by id): [predicted hits checked, that really hit] as an EWMA.
        self.hit_rate: dict[int, float] = {}
        self.next_slot: dict[int, int] = {}
        # Per backend: entries of an older generation are stale (O(1) forgetting).
        self.gen: dict[int, int] = {}

    # -- choosing -------------------------------------------------------------

    def choose(self, request: GatewayRequest, candidates: Sequence[BackendView]) -> BackendView | None:
        n = len(candidates)
        if not n:
            return None
        group = self.group
        text = render_prompt(request.json)
        hashes = block_hashes(text, self.block_chars)
        index = self.index
        gens = self.gen
        depth = 0
        holders = None
        for k, h in enumerate(hashes):
            entries = index.get(h)
            if entries is None:
                break
            for entry in entries:
                state = entry.state
                if entry.gen == gens.get(id(state), 0) and group.is_candidate(state, candidates):
                    holders, depth = entries, k + 1
                    break
        prompt, output = request_size(request)
        best = None
        if holders is not None:
            # The deepest prefix may be on several backends (a shared system
            # prompt): the cheapest of those that may take the request.
            for entry in holders:
                state = entry.state
                if entry.gen == gens.get(id(state), 0) and group.is_candidate(state, candidates):
                    if best is None or cheaper(best.state, state, prompt, output) is state:
                        best = entry
        # Reference: the cheaper of two random backends (measured speed × load).
        other = power_of_two(request, candidates, self.rng)
        assert other is not None  # candidates is not empty
        pick = other
        slot = None
        if best is not None and self.hit_rate.get(id(best.state), 1.0) >= self.min_hit_rate:
            mine = best.state.load
            theirs = other.load
            overloaded = mine - theirs > self.balance_abs and mine > theirs * self.balance_rel
            slots = best.state.total_slots
            if slots and mine >= slots and theirs < (other.total_slots or theirs + 1) and other is not best.state:
                overloaded = True  # every slot busy while the other has one free: don't queue for the cache
            if not overloaded:
                pick = best.state
                if hashes[depth - 1] == best.tip:
                    slot = best.slot  # continuing that prompt: its slot too
                # else only a shared head (a system prompt): a slot of its own
        else:
            depth = 0
        if pick is not (best.state if best is not None else None):
            depth = 0
        if slot is None and pick.total_slots and pick.pins_slots:
            key = id(pick)
            slot = self.next_slot.get(key, 0) % pick.total_slots
            self.next_slot[key] = slot + 1
        if slot is not None:
            request.slot = (pick.name, slot)
        # Remember: this backend (slot) now holds these prefix blocks.
        self._insert(hashes, _Entry(pick, slot, gens.get(id(pick), 0), hashes[-1] if hashes else None))
        request.state[STATE_KEY] = (depth, len(text), len(hashes))
        return pick

    def _insert(self, hashes: list[int], entry: _Entry) -> None:
        """Record ``entry`` as the most recent holder of each block (at most
        ``holders`` backends per block, most recent first)."""
        index = self.index
        state = entry.state
        limit = self.holders
        for h in hashes:
            entries = index.get(h)
            if entries is None:
                index[h] = [entry]
                continue
            if entries[0].state is state:
                entries[0] = entry
            else:
                entries = [entry] + [e for e in entries if e.state is not state]
                if len(entries) > limit:
                    del entries[limit:]
                index[h] = entries
            index.move_to_end(h)
        while len(index) > self.max_blocks:
            index.popitem(last=False)

    # -- feedback from responses ----------------------------------------------

    def observe(self, request: GatewayRequest, state: BackendView, usage: Usage) -> None:
        """Compare the cache hit predicted for ``request`` with what the
        backend reported, and correct the index when it was wrong."""
        info = request.state.get(STATE_KEY)
        cached = usage.cached
        prompt_tokens = usage.prompt
        if info is None or cached is None or not prompt_tokens:
            return
        depth, chars, _ = info
        key = id(state)
        rate = self.hit_rate.get(key, 1.0)
        if depth:
            predicted = prompt_tokens * min(1.0, depth * self.block_chars / max(chars, 1))
            hit = 1.0 if cached >= 0.5 * predicted else 0.0
            rate += 0.3 * (hit - rate)
            self.hit_rate[key] = rate
            if not hit:
                self._forget(state, request, info)
        elif cached and rate < 1.0:
            # A hit we did not predict: the backend does keep prefixes.
            self.hit_rate[key] = rate + 0.3 * (1.0 - rate)

    def _forget(self, state: BackendView, request: GatewayRequest, info: tuple[int, int, int]) -> None:
        """The backend did not have a prefix we thought it had: everything the
        index believes it holds is suspect (a new generation makes the old
        entries stale in O(1)), except the prompt it has just processed."""
        key = id(state)
        gen = self.gen[key] = self.gen.get(key, 0) + 1
        slot = request.slot
        hashes = block_hashes(render_prompt(request.json), self.block_chars)
        self._insert(hashes, _Entry(state, slot[1] if slot and slot[0] == state.name else None, gen, hashes[-1] if hashes else None))

    def stats(self) -> dict[str, Any]:
        return {"blocks": len(self.index), "hit_rate": {s.name: round(self.hit_rate.get(id(s), 1.0), 3) for s in self.group.backends}}


@comox.hookimpl
def comox_routing_policies() -> dict[str, type]:
    return {"prefix_affinity": PrefixAffinity}
