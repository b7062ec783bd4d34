"""The document ranges the attention kernels loop over (llm.kernels.attention.tile_ranges), against the mask itself:
every visible (query, key) pair lies in a block's range, the tiles it runs unmasked hold only visible pairs
(a block that crosses T runs none: its positions past T are not pairs), and for packed (non-decreasing)
document ids the range is tight and the unmasked tiles are all the fully visible ones, so the kernels compute
no more than the documents require."""

import pytest
import torch

from llm.kernels.attention import attention_mask, tile_ranges

T = 200


def documents() -> tuple[torch.Tensor, list[bool]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.exp(3.0 + torch.randn(40, generator=g)).long().clamp(min=1)
    packed = torch.repeat_interleave(torch.arange(40), lengths)[:T]
    packed = torch.cat([packed, packed.new_full((T - len(packed),), 40)])
    rows = [
        packed,  # realistic lengths: a log-normal mean of ~30 tokens
        torch.zeros(T, dtype=torch.long),  # one document
        torch.arange(T),  # every token its own document
        torch.sort(torch.randint(0, 3, (T,), generator=g)).values,  # three long ones
        (torch.arange(T) // 50) % 2,  # 0..1..0..1: a document that comes back (the fallback)
        torch.randint(0, 4, (T,), generator=g),  # interleaved (the fallback)
        torch.arange(T).flip(0),  # decreasing ids, each token its own document (the fallback)
    ]
    return torch.stack(rows).to(torch.int32), [True, True, True, True, False, False, False]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("keys_outer", [False, True], ids=["queries-outer", "keys-outer"])
@pytest.mark.parametrize(("outer", "inner"), [(64, 32), (32, 64), (128, 64), (16, 16), (64, 64)])
def test_ranges_cover_every_visible_pair_and_run_unmasked_only_visible_tiles(causal, keys_outer, outer, inner):
    doc_ids, packed = documents()
    mask = attention_mask(doc_ids, T, causal, "cpu")[:, 0]  # (B, query, key)
    if keys_outer:
        mask = mask.transpose(1, 2)  # (B, key, query): outer positions first
    ranges = tile_ranges(doc_ids, causal, outer, inner, keys_outer)
    assert ranges.dtype == torch.int32 and ranges.shape == (len(packed), -(-T // outer), 4)
    for b, exact in enumerate(packed):
        for i, (a, u0, u1, e) in enumerate(ranges[b].tolist()):
            block = mask[b, i * outer : (i + 1) * outer]  # (outer positions, inner positions)
            pad = block.new_zeros(outer - len(block), T)  # past T: nothing visible, so nothing unmasked
            whole = torch.cat([block, pad])
            where = f"row {b} block {i}: {a, u0, u1, e}"
            assert 0 <= a <= u0 <= u1 <= e <= T and a % inner == 0, where
            assert (u0 % inner == 0 or u0 == e) and (u1 % inner == 0 or u1 == e), where
            seen = block.any(0).nonzero().flatten()
            assert a <= seen.min() and seen.max() < e, where  # every visible pair is visited
            # the three loops as the kernels run them: tiles of `inner` from a, u0 and u1, up to u0, u1 and e
            masked = [p for t in [*range(a, u0, inner), *range(u1, e, inner)] for p in range(t, t + inner)]
            unmasked = [p for t in range(u0, u1, inner) for p in range(t, t + inner)]
            visited = masked + unmasked
            assert len(visited) == len(set(visited)) and set(seen.tolist()) <= set(visited), where  # once each
            assert all(p < T for p in unmasked) and whole[:, unmasked].all(), where  # unmasked: visible only
            if exact:  # tight: from the tile of the first visible position to the last one; no masked tile
                assert a == seen.min() // inner * inner and e == seen.max() + 1, where  # that could run unmasked
                full = [t for t in range(a, e, inner) if t + inner <= T and whole[:, t : t + inner].all()]
                assert full == list(range(u0, u1, inner)), where
            else:
                assert u0 == u1, where  # the fallback masks every tile
