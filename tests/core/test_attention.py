"""The hybrid attention mask and its effect inside the LLM."""

import torch

from instructsam_core.model.attention import as_attention_bias, hybrid_attention_mask, seg_run_ids


def test_seg_runs_are_numbered_per_row():
    is_seg = torch.tensor([[0, 1, 1, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert seg_run_ids(is_seg).tolist() == [[0, 1, 1, 0, 2, 2, 0], [1, 1, 0, 0, 0, 0, 0]]


def test_text_is_causal_and_query_runs_are_open_inside():
    is_seg = torch.tensor([[0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    mask = hybrid_attention_mask(is_seg, torch.ones(1, 6, dtype=torch.bool))[0, 0]
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    expected = causal.clone()
    expected[2:5, 2:5] = True  # the three queries see each other
    assert torch.equal(mask, expected)


def test_two_runs_do_not_see_each_others_future():
    is_seg = torch.tensor([[1, 1, 0, 1, 1]], dtype=torch.bool)
    mask = hybrid_attention_mask(is_seg, torch.ones(1, 5, dtype=torch.bool))[0, 0]
    assert mask[0, 1] and mask[1, 0]  # run 1 is open
    assert not mask[0, 3] and not mask[1, 4]  # run 1 cannot see run 2
    assert mask[3, 0] and mask[3, 4] and mask[4, 3]  # run 2 sees run 1 causally and itself fully


def test_padding_keys_are_hidden_and_no_row_is_empty():
    is_seg = torch.zeros(1, 4, dtype=torch.bool)
    valid = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)  # left and right padding
    mask = hybrid_attention_mask(is_seg, valid)[0, 0]
    assert not mask[1:3, 0].any() and not mask[:3, 3].any()  # real rows never see padding
    assert mask[0].tolist() == [True, False, False, False]  # a left pad row sees itself only
    assert mask.any(dim=1).all()  # no row normalises over an empty set


def test_cached_step_mask_covers_past_keys():
    new_is_seg = torch.tensor([[0, 0, 1, 1, 0]], dtype=torch.bool)  # ref_end, mask_start, q, q, mask_end
    mask = hybrid_attention_mask(new_is_seg, torch.ones(1, 7 + 5, dtype=torch.bool))[0, 0]
    assert mask.shape == (5, 12)
    assert mask[:, :7].all()  # every new token sees the whole cache
    assert mask[2, 10] and mask[3, 9]  # the two queries see each other
    assert not mask[1, 9] and not mask[3, 11]  # mask_start cannot see queries; queries not mask_end


def test_additive_bias_for_eager_attention():
    mask = torch.tensor([[[[True, False]]]])
    bias = as_attention_bias(mask, "eager", torch.float32)
    assert bias[0, 0, 0, 0] == 0 and bias[0, 0, 0, 1] == torch.finfo(torch.float32).min
    assert as_attention_bias(mask, "sdpa", torch.float32) is mask
