"""Generating tokens from a compressed model without transformers' per-token overhead.

A token through transformers' modules pays about a third of its time in Python and small
tensor operations between the matrix products (bench/profile_decode.py). For the Llama
family (Llama, Mistral, Qwen2: pre-norm RMSNorm, rotary attention with grouped key/value
heads, a SiLU-gated MLP) the C++ extension runs the whole layer stack in one call per
step over a key/value cache allocated once (`Decoder` in kernels/packed_matmul.cpp). The
packed products are the same kernels as `LQLinear`'s, so the weights' values are the
same; the logits agree with the model's own forward to float32 rounding (the glue sums in
another order). Other architectures, a GPU, or no compiler: `fast_decoder` returns None
and callers use the model's own forward.
"""

from dataclasses import dataclass

import torch
from torch import nn

from lqlora_dagster.quant import fast_decode
from lqlora_dagster.surgery.lq_linear import LQLinear

FAMILY = ("llama", "mistral", "qwen2")  # model types whose decoder layer `Decoder` reproduces
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def unsupported_reason(net: nn.Module, length: int) -> str | None:
    """Why `fast_decoder` cannot run this model for `length` positions, or None."""
    config = getattr(net, "config", None)
    if config is None or getattr(config, "model_type", None) not in FAMILY:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {', '.join(FAMILY)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and length > window:
        return f"{length} positions exceed the sliding window of {window}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope"):
        return f"rotary scaling {rope.get('rope_type', rope.get('type'))!r} depends on the sequence's length"
    if not fast_decode.available(next(net.parameters()).device):
        return "the packed-matmul kernel is not available here"
    layers = getattr(getattr(net, "model", None), "layers", None)
    if layers is None or not hasattr(net.model, "rotary_emb") or not hasattr(net, "lm_head"):
        return "the model has no model.layers, model.rotary_emb or lm_head"
    for layer in layers:
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attention is None or mlp is None or hasattr(attention, "q_norm"):
            return "a decoder layer is not the Llama layout (self_attn, mlp, no q/k norms)"
        for part, names in ((attention, _ATTENTION), (mlp, _MLP)):
            for name in names:
                module = getattr(part, name, None)
                if not isinstance(module, (LQLinear, nn.Linear)) or next(module.parameters()).dtype != torch.float32:
                    return f"{name} is not a float32 LQLinear or Linear"
    return None


def _projection(module: nn.Module):
    kernel = fast_decode.kernel()
    none = torch.empty(0)
    bias = module.bias.detach() if module.bias is not None else none
    if isinstance(module, LQLinear):
        _, args = module._packed()
        return kernel.packed_projection(*args, module.L1.detach(), module.L2.detach(), module.scaling, bias)
    return kernel.dense_projection(module.weight.detach(), bias)


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


@dataclass
class FastDecoder:
    """A model's decoder stack in the extension, with a cache of `capacity` positions.
    Built from the weights as they are now: build it again after training them."""

    net: nn.Module
    stack: object  # the extension's Decoder
    capacity: int
    cos: torch.Tensor  # (capacity, head_dim): the model's rotary table for every position
    sin: torch.Tensor
    embedding: torch.Tensor | None  # a plain float32 embedding's table (a lookup, not a module call)
    head: torch.Tensor | None  # a plain float32 bias-free head's weight, for the streaming matvec
    half_head: tuple | None = None  # its bfloat16 copy and row norms, for `greedy`

    @property
    def length(self) -> int:
        """Positions in the cache so far."""
        return self.stack.length

    def reset(self) -> None:
        self.stack.reset()

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Feeds token `ids` (1, M) or (M,) after the cached positions; the last one's
        next-token logits (vocab,)."""
        return self._head_logits(self._last_hidden(ids))

    @torch.no_grad()
    def greedy(self, ids: torch.Tensor) -> int:
        """Feeds token `ids` as `logits` does; the next token at temperature 0, which is
        `int(logits(ids).argmax())` exactly. With the head's bfloat16 copy (built for
        greedy decoding) it reads half the head's bytes: kernels' head_argmax bounds each
        row's rounding and recomputes in float32 only the rows that could be the largest."""
        out = self._last_hidden(ids)
        if self.half_head is not None:
            token = fast_decode.kernel().head_argmax(out, self.head, *self.half_head)
            if token >= 0:
                return token
        return int(self._head_logits(out).argmax())

    def _last_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.reshape(-1)
        start, end = self.stack.length, self.stack.length + ids.numel()
        if end > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; {end} asked for")
        hidden = self.embedding[ids] if self.embedding is not None else self.net.model.embed_tokens(ids).float()
        return self.stack.step(hidden, self.cos[start:end], self.sin[start:end])[-1]

    def _head_logits(self, out: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            return fast_decode.kernel().head_logits(out, self.head)
        return self.net.lm_head(out[None])[0]


def fast_decoder(net: nn.Module, capacity: int, greedy: bool = False) -> FastDecoder | None:
    """The model's decoder stack for `capacity` positions (prompt and new tokens), or None
    when it is not a supported float32 Llama-family model on the CPU's fast path. With
    `greedy`, its `greedy` method reads the head through a bfloat16 copy, which it holds
    instead of a float32 copy of the head (half the memory)."""
    if unsupported_reason(net, capacity) is not None:
        return None
    config = net.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    projections, norms = [], []
    for layer in net.model.layers:
        projections += [_projection(getattr(layer.self_attn, n)) for n in _ATTENTION]
        projections += [_projection(getattr(layer.mlp, n)) for n in _MLP]
        norms += [layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()]
    stack = fast_decode.kernel().Decoder(projections, norms, net.model.norm.weight.detach(),
                                         _eps(net.model.norm), heads,
                                         getattr(config, "num_key_value_heads", None) or heads, head_dim, capacity)
    with torch.no_grad():
        probe = torch.zeros(1, capacity, head_dim)  # the rotary module reads only its dtype and device
        cos, sin = net.model.rotary_emb(probe, torch.arange(capacity).unsqueeze(0))
    embed, head = net.model.embed_tokens, net.lm_head
    plain_embedding = type(embed) is nn.Embedding and embed.max_norm is None and embed.weight.dtype == torch.float32
    plain_head = type(head) is nn.Linear and head.bias is None and head.weight.dtype == torch.float32
    table = embed.weight.detach() if plain_embedding else None
    head_weight, half_head = None, None
    if plain_head:
        head_weight = head.weight.detach().contiguous()
        if greedy:
            half_head = tuple(fast_decode.kernel().bf16_head(head_weight, _in_mapped_file(head_weight))) or None
        if half_head is None:
            head_weight = _streamed_copy(head_weight)
    if plain_embedding and plain_head and embed.weight.data_ptr() == head.weight.data_ptr():
        table = head_weight  # tied: one copy serves both
    return FastDecoder(net, stack, capacity, cos[0].to(torch.float32).contiguous(),
                       sin[0].to(torch.float32).contiguous(), table, head_weight, half_head)


def _streamed_copy(weight: torch.Tensor) -> torch.Tensor:
    """The head as every token reads it. Read 4 KB page by page from the mapped checkpoint
    it streamed about 30% slower, so a mapped head is copied into memory backed by 2 MB
    pages, its file's pages handed back as the copy proceeds (resident memory holds it
    once). A head already in memory is used as it is: a copy would hold it twice."""
    if not _in_mapped_file(weight):
        return weight
    return fast_decode.kernel().hugepage_copy(weight, True)


def _in_mapped_file(t: torch.Tensor) -> bool:
    """Whether a tensor's memory lies in a file mapping (Linux; False where unknown)."""
    address = t.data_ptr()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                low, high = (int(v, 16) for v in fields[0].split("-"))
                if low <= address < high:
                    return len(fields) == 6 and fields[5].startswith("/")
    except OSError:
        pass
    return False
