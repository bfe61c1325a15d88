"""Our runtime (`surgery/lq_decoder.py`) against the model's own forward: the same logits to
float32 rounding, the same greedy tokens, for prompts on both of its paths (a few rows:
fused decode-and-multiply; more: decode once and a dense product), with packed, dense and
biased projections; and None where it does not reproduce the architecture."""

import pytest
import torch

from lqlora_dagster.generate import generate
from lqlora_dagster.quant import QuantConfig
from lqlora_dagster.sampling import Sampling
from lqlora_dagster.surgery.decompose_model import apply_decompositions
from lqlora_dagster.surgery.lq_decoder import fast_decoder, unsupported_reason
from lqlora_dagster.surgery.lq_linear import LQLinear
from tests.surgery.test_lq_layers import lq_model
from tests.tiny_models import TINY_SHAPE, tiny_gpt2, tiny_llama, tiny_tokenizer, tokens

NF3 = QuantConfig(3, 8, "bf16", 64, 16)


def compressed(build=tiny_llama, config=NF3, keep_dense: str | None = None):
    """`build()` with its targets decomposed (rank 4); `keep_dense` leaves the targets whose
    name contains it as dense Linear layers."""
    model, _, decs = lq_model(build, config=config)
    if keep_dense:
        decs = {name: d for name, d in decs.items() if keep_dense not in name}
    apply_decompositions(model, decs)
    return model.eval()


def tiny_qwen2(seed: int = 0):
    """Qwen2's layout: biases on the q, k, v projections."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**TINY_SHAPE, num_key_value_heads=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random init leaves the biases at zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def check_against_forward(model, prompt_len: int, steps: int = 6) -> None:
    ids = tokens(1, prompt_len, seed=3)
    decoder = fast_decoder(model, prompt_len + steps)
    assert decoder is not None, unsupported_reason(model, prompt_len + steps)
    with torch.no_grad():
        reference = model(ids, use_cache=True)
        ours = decoder.logits(ids)
        torch.testing.assert_close(ours, reference.logits[0, -1], atol=2e-5, rtol=1e-4)
        cache, token = reference.past_key_values, ours.argmax().view(1, 1)
        for _ in range(steps):
            reference = model(token, past_key_values=cache, use_cache=True)
            cache = reference.past_key_values
            ours = decoder.logits(token)
            torch.testing.assert_close(ours, reference.logits[0, -1], atol=2e-5, rtol=1e-4)
            token = ours.argmax().view(1, 1)
    assert decoder.length == prompt_len + steps


@pytest.mark.parametrize("prompt_len", [5, 40])  # the fused path (<= 16 rows), the decode-then-mm path
@pytest.mark.parametrize("config", [NF3, QuantConfig(4, 8, "fp32", 32, 16), QuantConfig(2, 3, "bf16", 16, 64)])
def test_logits_match_the_models_forward(prompt_len, config):
    check_against_forward(compressed(config=config), prompt_len)


@pytest.mark.parametrize("heads", [4, 2])  # head_dim 64 and 128: the register-resident attention paths
def test_wide_heads(heads):
    wide = lambda: tiny_llama(hidden_size=256, intermediate_size=256, num_attention_heads=heads,  # noqa: E731
                              num_key_value_heads=heads // 2 if heads > 2 else 1)
    check_against_forward(compressed(wide), 20, steps=4)
    check_against_forward(compressed(wide), 3, steps=4)


def test_dense_and_biased_projections():
    model = compressed(keep_dense="mlp")  # the MLP's projections stay dense Linear layers
    assert any(isinstance(m, LQLinear) for m in model.modules())
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    check_against_forward(model, 20)
    check_against_forward(compressed(tiny_qwen2), 20)
    check_against_forward(compressed(tiny_qwen2, keep_dense="self_attn"), 3)


@pytest.mark.parametrize("first", [3, 20])
def test_a_prompt_fed_in_pieces_sees_the_cache(first):
    """A piece of more than 16 positions after cached ones: attention masks by position."""
    model, ids = compressed(), tokens(1, first + 24, seed=5)
    decoder = fast_decoder(model, ids.shape[1])
    decoder.logits(ids[:, :first])
    with torch.no_grad():
        torch.testing.assert_close(decoder.logits(ids[:, first:]), model(ids).logits[0, -1], atol=2e-5, rtol=1e-4)


def test_reset_starts_over_and_the_cache_has_a_limit():
    decoder = fast_decoder(compressed(), 12)
    ids = tokens(1, 8, seed=1)
    first = decoder.logits(ids)
    decoder.reset()
    torch.testing.assert_close(decoder.logits(ids), first, atol=0, rtol=0)
    with pytest.raises(ValueError, match="holds 12 positions"):
        decoder.logits(tokens(1, 5, seed=2))


def test_unsupported_models_get_none():
    gpt2 = compressed(tiny_gpt2)
    assert fast_decoder(gpt2, 16) is None and "gpt2" in unsupported_reason(gpt2, 16)
    gelu = compressed(lambda: tiny_llama(hidden_act="gelu"))
    assert fast_decoder(gelu, 16) is None and "silu" in unsupported_reason(gelu, 16)
    half = compressed().to(torch.bfloat16)
    assert fast_decoder(half, 16) is None and "float32" in unsupported_reason(half, 16)


def test_generate_runs_in_the_runtime_and_matches_transformers():
    model, tokenizer = compressed(), tiny_tokenizer()
    ids = tokens(1, 6, seed=4)
    pieces = []
    ours = generate(model, tokenizer, ids, max_new_tokens=10, stream=pieces.append)
    assert ours.engine == "lqlora runtime" and ours.new_tokens >= 1
    assert "".join(pieces) == ours.text  # streamed from the first new token on, nothing of the prompt
    theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(theirs[0, ids.shape[1]:], skip_special_tokens=True) == ours.text
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=7)  # the same draws as transformers' warpers
    drawn = generate(model, tokenizer, ids, max_new_tokens=12, sampling=sampling)
    torch.manual_seed(7)
    theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=True,
                            temperature=1.0, top_p=0.9, top_k=0, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(theirs[0, ids.shape[1]:], skip_special_tokens=True) == drawn.text
    model.generation_config.repetition_penalty = 1.3  # a setting our loop does not apply: transformers runs
    assert generate(model, tokenizer, ids, max_new_tokens=3).engine == "transformers"
    dense = tiny_llama()  # no LQ layer: transformers' generate
    assert generate(dense, tokenizer, ids, max_new_tokens=3).engine == "transformers"


def test_head_copy_keeps_values_and_the_mapped_original_still_reads(tmp_path):
    """The head's copy in 2 MB pages equals the original; handing back the pages of a
    mapped original loses nothing (they are read again from the file), for the float32
    copy and for the greedy head's bfloat16 one."""
    from safetensors.torch import load_file, save_file

    from lqlora_dagster.surgery.lq_decoder import _in_mapped_file, _streamed_copy

    weight = torch.randn(3000, 576, generator=torch.Generator().manual_seed(6))  # 6.9 MB
    save_file({"head": weight}, tmp_path / "head.safetensors")
    mapped = load_file(tmp_path / "head.safetensors")["head"]
    assert _in_mapped_file(mapped) and not _in_mapped_file(weight)
    copy = _streamed_copy(mapped)
    assert copy.data_ptr() != mapped.data_ptr()
    assert torch.equal(copy, weight) and torch.equal(mapped, weight)
    assert _streamed_copy(weight) is weight  # in memory already: no second copy
    mapped = load_file(tmp_path / "head.safetensors")["head"]
    half, norms = kernel().bf16_head(mapped, True)  # the greedy head's copy hands the pages back too
    x = torch.randn(576, generator=torch.Generator().manual_seed(7))
    assert kernel().head_argmax(x, mapped, half, norms) == int(kernel().head_logits(x, weight).argmax())
    assert torch.equal(mapped, weight)


def kernel():
    from lqlora_dagster.quant import fast_decode

    return fast_decode.kernel()


@pytest.mark.parametrize("rows,cols", [(4096, 576), (1003, 64), (37, 100), (6, 7)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_greedy_head_is_the_float32_argmax(rows, cols, scale):
    """head_argmax reads a bfloat16 copy but returns the float32 logits' argmax, ties to
    the first row: also where rows tie in bfloat16 and differ only in float32, and where
    rows are equal (shapes cover the rows % 4 and cols % 32 tails)."""
    g = torch.Generator().manual_seed(rows + cols)
    weight = torch.randn(rows, cols, generator=g) * 0.05
    third = rows // 3
    weight[third:2 * third] = weight[:third].to(torch.bfloat16).float()  # the same bfloat16 rows...
    weight[:third] = weight[third:2 * third] + torch.randn(third, cols, generator=g) * 1e-5  # ...apart in float32
    weight[-1] = weight[0]  # an exact duplicate: the first of them wins
    half, norms = kernel().bf16_head(weight, False)
    assert torch.equal(half, weight.to(torch.bfloat16))  # rounded to nearest even, as torch rounds
    for _ in range(40):
        x = torch.randn(cols, generator=g) * scale
        assert kernel().head_argmax(x, weight, half, norms) == int(kernel().head_logits(x, weight).argmax())
    x = weight[0] * scale  # the duplicated row's own direction: it and its copy lead
    assert kernel().head_argmax(x, weight, half, norms) == int(kernel().head_logits(x, weight).argmax())


def test_greedy_head_declines_what_it_cannot_bound():
    weight = torch.randn(40, 16)
    half, norms = kernel().bf16_head(weight, False)
    assert kernel().head_argmax(torch.full((16,), float("nan")), weight, half, norms) == -1  # the caller takes the full logits
    weight[3, 5] = float("inf")
    assert kernel().bf16_head(weight, False) == []


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_the_greedy_decoder_picks_the_full_logits_tokens(build):
    model = compressed(build)
    ids = tokens(1, 9, seed=5)
    greedy, full = fast_decoder(model, 40, greedy=True), fast_decoder(model, 40)
    assert greedy.half_head is not None and full.half_head is None
    token = greedy.greedy(ids)
    assert token == int(full.logits(ids).argmax())
    for _ in range(30):
        step = torch.tensor([token])
        token = greedy.greedy(step)
        assert token == int(full.logits(step).argmax())
