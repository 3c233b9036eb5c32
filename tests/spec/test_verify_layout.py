"""The verify layout reads, for every speculating sequence, its own query tokens in order."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.spec.verify_layout import build_verify_layout, verify_row_buckets


def test_layout_gathers_each_rows_last_token_and_drafts():
    rng = np.random.default_rng(8)
    k = 5
    for _ in range(20):
        # a ragged step: some sequences prefill or decode plainly, others verify drafts
        seqs = int(rng.integers(1, 9))
        chunks, spec = [], []
        for s in range(seqs):
            if rng.random() < 0.5:
                drafts = rng.integers(0, 1000, int(rng.integers(0, k + 1))).tolist()
                chunks.append([int(rng.integers(0, 1000))] + drafts)
                spec.append((s, drafts))
            else:
                chunks.append(rng.integers(0, 1000, int(rng.integers(1, 20))).tolist())
        starts = np.cumsum([0] + [len(c) for c in chunks])[:-1]
        input_ids = np.concatenate(chunks)
        rows = 8
        layout = build_verify_layout([int(starts[s]) for s, _ in spec], [d for _, d in spec],
                                     [s for s, _ in spec], k, rows)
        assert layout.num_rows == len(spec)
        for j, (s, drafts) in enumerate(spec):
            fed = input_ids[layout.hidden_rows[j]]
            m = len(drafts)
            np.testing.assert_array_equal(fed[:m + 1], chunks[s])  # last token, then drafts
            assert np.all(layout.hidden_rows[j, m:] == starts[s] + m)
            np.testing.assert_array_equal(layout.draft_token_ids[j, :m], drafts)
            assert layout.num_draft[j] == m and layout.seq_index[j] == s
        assert np.all(layout.num_draft[len(spec):] == 0)


def test_layout_rejects_what_does_not_fit():
    with pytest.raises(ValueError):
        build_verify_layout([0, 3], [[1], [2]], [0, 1], 4, rows=1)
    with pytest.raises(ValueError):
        build_verify_layout([0], [[1, 2, 3]], [0], 2, rows=4)
    with pytest.raises(ValueError):
        build_verify_layout([0], [[1]], [0, 1], 2, rows=4)


def test_row_buckets():
    assert verify_row_buckets(1) == [1]
    assert verify_row_buckets(8) == [1, 2, 4, 8]
    assert verify_row_buckets(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ValueError):
        verify_row_buckets(0)
