"""Cached generation with query blocks opened at every phrase end."""

import pytest
import torch

from instructsam_core.model.generation import generate
from instructsam_core.processing import encode_text
from instructsam_core.testing import ScriptedAnswer


def _two_phrase_script(model, tok):
    ids = model.token_ids
    return ([ids.ref_start] + encode_text(tok, "red mug") + [ids.ref_end]
            + encode_text(tok, " and") + [ids.ref_start] + encode_text(tok, "blue cup") + [ids.ref_end, ids.im_end])


def test_two_phrases_each_get_a_query_block(tiny_model, tiny_tester):
    model, tok = tiny_model
    inputs = tiny_tester.prepare_inputs(model, tok)
    out = generate(model, torch.tensor([inputs.prompt_ids]), inputs.vision, 40,
                   [ScriptedAnswer(_two_phrase_script(model, tok))])
    ids = model.token_ids
    assert len(out.phrases) == 2
    assert tok.decode(out.phrases[0].token_ids[1:-1]) == "red mug"
    assert tok.decode(out.phrases[1].token_ids[1:-1]) == "blue cup"
    assert out.token_ids.count(ids.seg) == 2 * model.config.num_queries
    assert out.token_ids.count(ids.mask_start) == 2 and out.token_ids[-1] == ids.im_end
    assert out.phrases[0].query_states.shape == (4, model.config.vlm["text_config"]["hidden_size"])


def test_cached_query_states_equal_one_uncached_forward(consistent_model, tiny_tester):
    model, tok = consistent_model
    inputs = tiny_tester.prepare_inputs(model, tok)
    out = generate(model, torch.tensor([inputs.prompt_ids]), inputs.vision, 40,
                   [ScriptedAnswer(_two_phrase_script(model, tok))])
    full = torch.tensor([inputs.prompt_ids + out.token_ids])
    with torch.no_grad():
        forward = model(full, None, [inputs.vision])
    hidden = forward.extras["hidden_states"][0]
    for p, phrase in enumerate(out.phrases):
        torch.testing.assert_close(phrase.query_states, hidden[forward.blocks.seg_positions[p]], atol=1e-5, rtol=1e-4)
        span = forward.blocks.phrase_positions[p][forward.blocks.phrase_mask[p]]
        torch.testing.assert_close(phrase.phrase_states, hidden[span], atol=1e-5, rtol=1e-4)


def test_forced_phrase_skips_generation(tiny_model, tiny_tester):
    model, tok = tiny_model
    inputs = tiny_tester.prepare_inputs(model, tok)
    ids = model.token_ids
    prompt = inputs.prompt_ids + [ids.ref_start] + encode_text(tok, "the mug")
    out = generate(model, torch.tensor([prompt]), inputs.vision, 40, forced_answer=[ids.ref_end, ids.eos[0]])
    assert len(out.phrases) == 1
    assert tok.decode(out.phrases[0].token_ids[1:-1]) == "the mug"
    assert out.token_ids == [ids.ref_end, ids.mask_start] + [ids.seg] * 4 + [ids.mask_end, ids.eos[0]]


def test_generation_stops_at_the_token_budget(tiny_model, tiny_tester):
    model, tok = tiny_model
    inputs = tiny_tester.prepare_inputs(model, tok)
    never_ends = ScriptedAnswer(encode_text(tok, "word"))
    out = generate(model, torch.tensor([inputs.prompt_ids]), inputs.vision, 5, [never_ends])
    assert len(out.token_ids) == 5 and not out.phrases


@pytest.mark.parametrize("compat", ["release", "consistent"])
def test_cached_prompt_prefix_gives_the_same_answer(compat, tiny_model, consistent_model, tiny_tester):
    from instructsam_core.model.generation import prefill_prefix
    from instructsam_core.processing import build_prompt_prefix_ids

    model, tok = tiny_model if compat == "release" else consistent_model
    inputs = tiny_tester.prepare_inputs(model, tok)
    prefix_ids = build_prompt_prefix_ids(tok, inputs.vision.embeds.shape[0], model.token_ids)
    assert inputs.prompt_ids[: len(prefix_ids)] == prefix_ids
    prefix = prefill_prefix(model, torch.tensor([prefix_ids]), inputs.vision)
    prompt = torch.tensor([inputs.prompt_ids])
    plain = generate(model, prompt, inputs.vision, 40, [ScriptedAnswer(_two_phrase_script(model, tok))])
    for _ in range(2):  # the prefix is reused, never changed
        cached = generate(model, prompt, inputs.vision, 40, [ScriptedAnswer(_two_phrase_script(model, tok))],
                          prefix=prefix)
        assert cached.token_ids == plain.token_ids
        for a, b in zip(plain.phrases, cached.phrases):
            torch.testing.assert_close(a.query_states, b.query_states, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(a.phrase_states, b.phrase_states, atol=1e-5, rtol=1e-4)
    assert prefix.cache.get_seq_length() == len(prefix_ids)


def test_prefix_of_another_frame_is_refused(tiny_model, tiny_tester):
    from instructsam_core.model.generation import prefill_prefix

    model, tok = tiny_model
    inputs = tiny_tester.prepare_inputs(model, tok)
    prefix = prefill_prefix(model, torch.tensor([inputs.prompt_ids[:3] + [7]]), None)
    with pytest.raises(ValueError, match="does not start with the cached prefix"):
        generate(model, torch.tensor([inputs.prompt_ids]), inputs.vision, 4, prefix=prefix)


def test_release_layout_numbers_the_prompt_sequentially_and_shifts_the_block(tiny_model):
    from instructsam_core.model.generation import chunk_layout, query_block

    model, _ = tiny_model
    assert model.config.generation_compat == "release"
    block = query_block(model)
    positions, mask, next_pos = chunk_layout(model, block, torch.tensor([20]), past_len=20)
    assert positions[0, 0].tolist() == list(range(21, 28))  # one past the next position
    assert torch.equal(positions[0], positions[1]) and torch.equal(positions[0], positions[2])
    assert next_pos.tolist() == [27]  # the token after the block continues from its start + length
    m = mask[0, 0, :, 20:]
    assert not m[0, 1:].any() and not m[1, 2:].any()  # ref_end and mask_start stay causal
    assert m[2:].all()  # the queries and mask_end see the whole block, mask_end included
    positions, mask, _ = chunk_layout(model, block[:1], torch.tensor([20]), past_len=20)
    assert positions[0, 0].tolist() == [20] and mask is None  # one token: plain causal


def test_consistent_layout_continues_positions_and_hides_mask_end(consistent_model):
    from instructsam_core.model.generation import chunk_layout, query_block

    model, _ = consistent_model
    positions, mask, _ = chunk_layout(model, query_block(model), torch.tensor([20]), past_len=20)
    assert positions[0, 0].tolist() == list(range(20, 27))
    assert not mask[0, 0, 2:6, 26].any()  # queries do not see <|mask_end|>


@pytest.mark.parametrize("compat", ["release", "consistent"])
def test_a_chunk_of_several_steps_is_laid_out_as_the_steps_one_by_one(compat, tiny_model, consistent_model):
    """Text, a query block and more text in one chunk get the positions and masks that
    feeding them step by step gives (what a backend's fused pass relies on)."""
    from instructsam_core.model.generation import chunk_layout, query_block

    model, _ = tiny_model if compat == "release" else consistent_model
    steps = [[7], [8], query_block(model), [9], query_block(model)]
    chunk = [t for step in steps for t in step]
    positions, mask, next_pos = chunk_layout(model, chunk, torch.tensor([20]), past_len=20)
    pos, past, start = torch.tensor([20]), 20, 0
    for step in steps:
        step_positions, step_mask, pos = chunk_layout(model, step, pos, past)
        rows = slice(start, start + len(step))
        assert torch.equal(positions[..., rows], step_positions)
        expected = torch.ones(len(step), past + len(step), dtype=torch.bool) if step_mask is None else step_mask[0, 0]
        assert torch.equal(mask[0, 0, rows, :past + len(step)], expected)
        assert not mask[0, 0, rows, past + len(step):].any()  # nothing later in the chunk is seen
        past, start = past + len(step), start + len(step)
    assert torch.equal(next_pos, pos)


def test_release_mode_answers_with_phrases_too(tiny_model, tiny_tester):
    model, tok = tiny_model
    inputs = tiny_tester.prepare_inputs(model, tok)
    out = generate(model, torch.tensor([inputs.prompt_ids]), inputs.vision, 40,
                   [ScriptedAnswer(_two_phrase_script(model, tok))])
    assert [tok.decode(p.token_ids[1:-1]) for p in out.phrases] == ["red mug", "blue cup"]


# ---- malformed answers: what the released inference returns for each shape ----------
# Tokens: S = <|object_ref_start|>, E = <|object_ref_end|>, words are plain text, "$" = <|im_end|>.
# Each row: script, budget (None: exactly the script's length), expected status, phrases
# segmented, closed phrases named.
MALFORMED_ANSWERS = [
    pytest.param("S mug E $", 40, "ok", ["mug"], ["mug"], id="well-formed"),
    pytest.param("mug E $", 40, "unpaired_phrases", [], [], id="end-without-start"),
    pytest.param("S mug E cup E $", 40, "unpaired_phrases", [], ["mug"], id="stray-end-after-a-phrase"),
    pytest.param("S red S mug E $", 40, "ok", ["red S mug"], ["red S mug"], id="nested-starts"),
    pytest.param("S mug E S cup $", 40, "ok", ["mug"], ["mug"], id="start-never-closed"),
    pytest.param("S mug E", None, "budget_cut", [], ["mug"], id="budget-ends-on-the-only-phrase-end"),
    pytest.param("S mug E S cup E", None, "budget_cut", [], ["mug", "cup"], id="budget-ends-on-a-later-phrase-end"),
    pytest.param("cup E S mug E", None, "ok", ["mug"], ["mug"], id="stray-end-then-budget-cut-pair-up"),
]


def _script(model, tok, text: str) -> list[int]:
    ids = model.token_ids
    special = {"S": [ids.ref_start], "E": [ids.ref_end], "$": [ids.im_end]}
    return [t for word in text.split() for t in special.get(word, encode_text(tok, word))]


@pytest.mark.parametrize("script, budget, status, segmented, named", MALFORMED_ANSWERS)
def test_malformed_answers_pair_as_the_release_does(tiny_model, tiny_tester, script, budget, status, segmented,
                                                    named):
    model, tok = tiny_model
    ids = model.token_ids
    inputs = tiny_tester.prepare_inputs(model, tok)
    tokens = _script(model, tok, script)
    out = generate(model, torch.tensor([inputs.prompt_ids]), inputs.vision, budget or len(tokens),
                   [ScriptedAnswer(tokens)])

    def text(token_ids):  # the phrase between its outer start and end, an inner start spelled "S"
        parts, run = [], []
        for t in token_ids[1:-1] + [ids.ref_start]:
            if t == ids.ref_start:
                parts += [tok.decode(run), "S"]
                run = []
            else:
                run.append(t)
        return " ".join(p for p in parts[:-1] if p)

    assert out.status == status
    assert [text(p.token_ids) for p in out.phrases] == segmented
    assert [text(t) for t in out.phrase_token_ids] == named
    assert all(p.query_states.shape == (4, 32) for p in out.phrases)


def test_a_phrase_end_on_the_last_step_gets_no_query_block(tiny_model, tiny_tester):
    model, tok = tiny_model
    ids = model.token_ids
    inputs = tiny_tester.prepare_inputs(model, tok)
    tokens = _script(model, tok, "S mug E")
    out = generate(model, torch.tensor([inputs.prompt_ids]), inputs.vision, len(tokens), [ScriptedAnswer(tokens)])
    assert out.token_ids[-1] == ids.ref_end and ids.seg not in out.token_ids


def test_a_long_answer_keeps_all_its_phrases(tiny_checkpoint):
    from instructsam_core.engine import Segmenter
    from instructsam_core.sample_images import tabletop_scene

    seg = Segmenter.from_pretrained(str(tiny_checkpoint))  # the default budget (1024), as the release
    assert seg.config.max_new_tokens == 1024
    words = [f"the {size} {colour} {thing}" for size in ("small", "large") for colour in ("red", "blue")
             for thing in ("mug", "cup", "bowl", "plate")]
    ids, tok = seg.model.token_ids, seg.tokenizer
    script = [t for w in words for t in [ids.ref_start] + encode_text(tok, w) + [ids.ref_end]] + [ids.im_end]
    assert len(script) > 64  # the old budget would have cut it
    seg.set_image(tabletop_scene(64, 48, seed=0).image)
    r = seg.segment("everything on the table", score_threshold=0.0, logits_processors=[ScriptedAnswer(script)])
    assert r.status == "ok" and r.target_phrases == words
    assert set(r.phrase_indices.tolist()) <= set(range(len(words))) and len(r) > 0
