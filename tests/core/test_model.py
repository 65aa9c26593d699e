"""The InstructSAM model on tiny configs: shapes, hybrid attention in the LLM, errors, gradients."""

import pytest
import torch

from instructsam_core.model.instructsam import find_phrase_blocks


def _forward(model, inputs, answer=None):
    ids = torch.tensor([inputs.prompt_ids + (answer if answer is not None else inputs.answer_ids)])
    return ids, model(ids, None, [inputs.vision], inputs.sam)


def test_forward_output_shapes(tiny_model, tiny_tester):
    model, tok = tiny_model
    inputs = tiny_tester.prepare_inputs(model, tok, phrases=("red mug", "blue cup"))
    with torch.no_grad():
        ids, out = _forward(model, inputs)
    tiny_tester.check_output_shapes(out, num_blocks=2, num_queries=4, seq_len=ids.shape[1])
    assert out.text_logits.shape[-1] == model.vlm.config.text_config.vocab_size
    assert ((out.head.scores() >= 0) & (out.head.scores() <= 1)).all()


def test_later_query_changes_earlier_query_but_not_text_before(tiny_model, tiny_tester):
    model, tok = tiny_model
    inputs = tiny_tester.prepare_inputs(model, tok)
    ids = torch.tensor([inputs.prompt_ids + inputs.answer_ids])
    seg_pos = (ids[0] == model.token_ids.seg).nonzero().flatten()
    with torch.no_grad():
        base = model(ids, None, [inputs.vision]).extras["hidden_states"]
        original = model.mask_queries.data.clone()
        try:
            model.mask_queries.data[-1] += 1.0  # change only the LAST query slot
            changed = model(ids, None, [inputs.vision]).extras["hidden_states"]
        finally:
            model.mask_queries.data.copy_(original)
    first_q = int(seg_pos[0])
    assert not torch.allclose(base[0, first_q], changed[0, first_q]), "queries must see later queries"
    torch.testing.assert_close(base[0, :first_q], changed[0, :first_q], atol=0, rtol=0)


def test_causal_text_after_queries_sees_them(tiny_model, tiny_tester):
    model, tok = tiny_model
    inputs = tiny_tester.prepare_inputs(model, tok)
    ids = torch.tensor([inputs.prompt_ids + inputs.answer_ids])
    with torch.no_grad():
        base = model(ids, None, [inputs.vision]).extras["hidden_states"]
        original = model.mask_queries.data.clone()
        try:
            model.mask_queries.data[0] += 1.0
            changed = model(ids, None, [inputs.vision]).extras["hidden_states"]
        finally:
            model.mask_queries.data.copy_(original)
    assert not torch.allclose(base[0, -1], changed[0, -1])


def test_wrong_number_of_seg_tokens_raises(tiny_model, tiny_tester):
    model, tok = tiny_model
    inputs = tiny_tester.prepare_inputs(model, tok)
    ids = model.token_ids
    bad = [ids.ref_start, 100, ids.ref_end, ids.mask_start] + [ids.seg] * 3 + [ids.mask_end]
    with pytest.raises(ValueError, match="3 \\[SEG\\] tokens is not a multiple of the 4"):
        _forward(model, inputs, bad)
    with pytest.raises(ValueError, match="a run of 3 \\[SEG\\] tokens"):
        find_phrase_blocks(torch.tensor([bad]), ids, 4, 32)


def test_seg_run_without_phrase_raises(tiny_model):
    model, _ = tiny_model
    ids = model.token_ids
    with pytest.raises(ValueError, match="no <\\|object_ref_start\\|>phrase"):
        find_phrase_blocks(torch.tensor([[5, ids.mask_start] + [ids.seg] * 4]), ids, 4, 32)


def test_image_token_count_mismatch_raises(tiny_model, tiny_tester):
    model, tok = tiny_model
    inputs = tiny_tester.prepare_inputs(model, tok)
    ids = torch.tensor([inputs.prompt_ids[:-3] + [model.token_ids.image] + inputs.prompt_ids[-3:]])
    with pytest.raises(ValueError, match="5 image tokens but the image grid"):
        model(ids, None, [inputs.vision])
    with pytest.raises(ValueError, match="image features and image tokens do not match: 5 tokens, 4 features"):
        model.embed(ids, [inputs.vision])


def test_phrase_blocks_locate_phrase_and_queries(tiny_model, tiny_tester):
    model, tok = tiny_model
    inputs = tiny_tester.prepare_inputs(model, tok, phrases=("mug", "two cups"))
    ids = torch.tensor([inputs.prompt_ids + inputs.answer_ids])
    blocks = find_phrase_blocks(ids, model.token_ids, 4, 32)
    assert len(blocks) == 2
    for p in range(2):
        span = ids[0, blocks.phrase_positions[p][blocks.phrase_mask[p]]]
        assert span[0] == model.token_ids.ref_start and span[-1] == model.token_ids.ref_end
        assert (ids[0, blocks.seg_positions[p]] == model.token_ids.seg).all()


def test_phrase_source_switch_changes_the_prompt(tiny_tester):
    from instructsam_core.testing import InstructSamModelTester

    emb_model, tok = InstructSamModelTester(phrase_source="token_embeddings").get_model()
    hid_model, _ = InstructSamModelTester(phrase_source="hidden_states").get_model()
    inputs = tiny_tester.prepare_inputs(emb_model, tok)
    ids = torch.tensor([inputs.prompt_ids + inputs.answer_ids])
    with torch.no_grad():
        a = emb_model(ids, None, [inputs.vision], inputs.sam).head
        b = hid_model(ids, None, [inputs.vision], inputs.sam).head
    assert not torch.allclose(a.logits, b.logits)  # same weights (same seed), other prompt source


def test_the_summed_phrase_source_adds_each_words_normalised_embedding_to_its_hidden_state():
    from instructsam_core.testing import InstructSamModelTester

    model, _ = InstructSamModelTester(phrase_source="hidden_states_and_embeddings").get_model()
    hidden_model, _ = InstructSamModelTester(phrase_source="hidden_states").get_model()  # same seed, same weights
    ids = torch.tensor([[5, 9, 11, 0], [7, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    hidden = torch.randn(2, 4, model.config.vlm["text_config"]["hidden_size"])
    with torch.no_grad():
        got = model.phrase_prompt(ids, mask, hidden)
        embed = model.language_model.embed_tokens(ids)
        rms = embed.pow(2).mean(-1, keepdim=True).add(torch.finfo(embed.dtype).eps).sqrt()
        by_hand = model.text_hidden_fcs[0](hidden + embed / rms) * mask[..., None]
        hidden_only = hidden_model.phrase_prompt(ids, mask, hidden)
    assert torch.allclose(got, by_hand, atol=1e-5)
    assert not torch.allclose(got, hidden_only)  # the word's identity is added
    assert (got[~mask] == 0).all()
    with pytest.raises(ValueError, match="needs the phrase's LLM hidden states"):
        model.phrase_prompt(ids, mask)


def test_backward_reaches_queries_projections_and_sam3(tiny_tester):
    model, tok = tiny_tester.get_model()
    model.train()
    inputs = tiny_tester.prepare_inputs(model, tok)
    ids = torch.tensor([inputs.prompt_ids + inputs.answer_ids])
    out = model(ids, None, [inputs.vision], inputs.sam)
    loss = out.head.mask_logits.sigmoid().mean() + out.head.logits.mean() + out.text_logits.logsumexp(-1).mean()
    loss.backward()
    for name in ("mask_queries",):
        assert getattr(model, name).grad is not None and getattr(model, name).grad.abs().sum() > 0
    assert model.mask_hidden_fcs[0][0].weight.grad.abs().sum() > 0
    assert model.text_hidden_fcs[0][2].weight.grad.abs().sum() > 0
    assert model.grounding_model.detr_decoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0


def test_padded_batch_equals_single_rows(tiny_model, tiny_tester):
    model, tok = tiny_model
    a = tiny_tester.prepare_inputs(model, tok, instruction="the red mug", phrases=("red mug",), seed=1)
    b = tiny_tester.prepare_inputs(model, tok, instruction="all the cups on the tray please",
                                   phrases=("cups", "tray"), seed=2)
    rows = [a.prompt_ids + a.answer_ids, b.prompt_ids + b.answer_ids]
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])  # right padding
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    sam = type(a.sam)(tuple(torch.cat([x, y]) for x, y in zip(a.sam.fpn_hidden_states, b.sam.fpn_hidden_states)),
                      tuple(torch.cat([x, y]) for x, y in zip(a.sam.fpn_position_encoding, b.sam.fpn_position_encoding)))
    with torch.no_grad():
        batch = model(ids, mask, [a.vision, b.vision], sam)
        singles = [model(torch.tensor([r]), None, [v], s)
                   for r, v, s in ((rows[0], a.vision, a.sam), (rows[1], b.vision, b.sam))]
    assert batch.blocks.batch_index.tolist() == [0, 1, 1]
    for row, single in enumerate(singles):
        n = len(rows[row])
        torch.testing.assert_close(batch.text_logits[row, :n], single.text_logits[0], atol=1e-5, rtol=1e-4)
    head = torch.cat([singles[0].head.mask_logits, singles[1].head.mask_logits])
    torch.testing.assert_close(batch.head.mask_logits, head, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch.head.logits, torch.cat([s.head.logits for s in singles]), atol=1e-5, rtol=1e-4)
