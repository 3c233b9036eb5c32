"""The proposal loop shared by the model proposers (a draft model, an EAGLE head): catch up on
the tokens the proposer has not seen, then chain single-token calls on the device.

A proposer feeds each speculating request a run of tokens (`feeds`: first position, tokens)
ending where its first draft comes from. What does not fit the final call's token budget is
fed beforehand in budget-sized calls; the final call's last-token outputs give d1; then one
call per further draft, each taking the previous call's outputs on the device (rows named by
`prev_row`), and the host waits once for all of them. The proposer supplies `run(pieces,
prev, sample)` (dispatch one call; `sample`: its outputs are read) and `tokens_of(output)`
(the device array of a call's greedy tokens, one per row).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxllm.cache.manager import cdiv
from jaxllm.request import Request
from jaxllm.scheduler_output import ScheduledSeq


def feed_piece(req: Request, start: int, tokens: Sequence[int], page_size: int) -> ScheduledSeq:
    """A call's share for req: `tokens` at positions start.. (nothing sampled)."""
    return ScheduledSeq(request=req, token_ids=list(tokens), start_pos=start,
                        num_new_tokens=len(tokens), samples=False,
                        page_ids=req.page_ids[:cdiv(start + len(tokens), page_size)],
                        epoch=req.num_preemptions)


def pack_calls(pieces: list[ScheduledSeq], token_budget: int,
               page_size: int) -> list[list[ScheduledSeq]]:
    """Calls of at most the token budget, in order (a piece longer than the room left is
    split over consecutive calls)."""
    calls: list[list[ScheduledSeq]] = [[]]
    room = token_budget
    for p in pieces:
        done = 0
        while done < p.num_new_tokens:
            if room == 0:
                calls.append([])
                room = token_budget
            take = min(room, p.num_new_tokens - done)
            calls[-1].append(feed_piece(p.request, p.start_pos + done,
                                        p.token_ids[done:done + take], page_size))
            done += take
            room -= take
    return [c for c in calls if c]


def propose_chained(seqs: Sequence[ScheduledSeq], feeds: Sequence[tuple[int, list[int]]], *,
                    token_budget: int, page_size: int, first_offset: int,
                    run: Callable[[list[ScheduledSeq], Any, bool], Any],
                    tokens_of: Callable[[Any], jax.Array]) -> list[list[int]]:
    """Each speculating sequence's drafts (len(s.drafts) of them), also written over its
    placeholder drafts and the tail of its token ids. `first_offset`: draft i >= 1 is fed at
    position num_tokens + first_offset + i."""
    # 1. catch-up beyond what the final call can take (the budget), fed beforehand
    excess = sum(len(t) for _, t in feeds) - token_budget
    final: list[ScheduledSeq] = []
    early: list[ScheduledSeq] = []
    for s, (start, tokens) in zip(seqs, feeds, strict=True):
        ahead = max(0, min(len(tokens) - 1, excess))
        excess -= ahead
        if ahead:
            early.append(feed_piece(s.request, start, tokens[:ahead], page_size))
        final.append(feed_piece(s.request, start + ahead, tokens[ahead:], page_size))
    for call in pack_calls(early, token_budget, page_size):
        run(call, None, False)
    # 2. every sequence's final chunk: its last token's outputs give d1
    outs = [run(final, None, True)]
    rows = [list(range(len(seqs)))]  # rows[i][j]: sequence j's row in call i (-1: absent)
    # 3. one token per call for d2..dk, from the previous call's outputs on the device
    want = [len(s.drafts) for s in seqs]
    for i in range(1, max(want)):
        active = [j for j in range(len(seqs)) if want[j] > i]
        pieces = []
        for j in active:
            req = seqs[j].request
            pos = req.num_tokens + first_offset + i
            pieces.append(ScheduledSeq(
                request=req, token_ids=[0], start_pos=pos, num_new_tokens=1, samples=True,
                page_ids=req.page_ids[:cdiv(pos + 1, page_size)],
                epoch=req.num_preemptions, prev_row=rows[-1][j]))
        outs.append(run(pieces, outs[-1], True))
        row = [-1] * len(seqs)
        for r, j in enumerate(active):
            row[j] = r
        rows.append(row)
    tokens = jax.device_get([tokens_of(o) for o in outs])  # the one wait
    proposals = []
    for j, s in enumerate(seqs):
        drafts = [int(tokens[i][rows[i][j]]) for i in range(want[j])]
        s.drafts[:] = drafts
        s.token_ids[len(s.token_ids) - len(drafts):] = drafts
        proposals.append(drafts)
    return proposals
