"""Try a finetuned model: load the compressed base and its adapter from the artifact
store, stream a continuation, and say how fast and how big it was."""

from dataclasses import dataclass

import torch

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.memory import PeakMemory
from lqlora_dagster.models.positions import context_length
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.decomposition import ASSET as DECOMPOSED
from lqlora_dagster.pipeline.finetuning import REFERENCE, load_finetuned
from lqlora_dagster.pipeline.handles import AdapterRef, ModelHandle
from lqlora_dagster.sampling import Sampling
from lqlora_dagster.surgery.injector import lq_layers
from lqlora_dagster.surgery.lq_decoder import fast_decoder
from lqlora_dagster.surgery.lq_model_io import load_lq_model


@dataclass(frozen=True)
class Generated:
    text: str
    new_tokens: int
    seconds: float
    added_mb: float  # memory generating added above what the loaded model held
    engine: str = "transformers"  # what ran the model: "lqlora runtime" or transformers' generate

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else float("nan")


def load_for_generation(ctx: StageContext, model: ModelHandle, ref: AdapterRef, finetuned: bool = True):
    if model.task != "causal-lm":
        raise LQLoRAInputError(f"model {model.model!r} is a classifier; only a causal LM generates text")
    if finetuned:
        return load_finetuned(ctx, model, ref)
    if ref.plan_id == REFERENCE:
        raise LQLoRAInputError("--no-adapter needs a compressed method; the reference is the base model itself")
    return load_lq_model(ctx.store.get(DECOMPOSED, model.model, ref.decomp_key).path).eval()


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """The prompt's token ids (1, n), through the chat template with `chat`."""
    if not prompt.strip():
        raise LQLoRAInputError("the prompt is empty; give the text to continue, e.g. lqlora generate \"Once upon\"")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LQLoRAInputError("this tokenizer has no chat template; drop --chat")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def check_room(config, prompt_tokens: int, max_new_tokens: int) -> None:
    """The prompt and the tokens asked for fit the model's positions (past them a model
    with learned positions fails and a rotary one produces text it was never trained on)."""
    if max_new_tokens < 1:
        raise LQLoRAInputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    limit = context_length(config)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        room = limit - prompt_tokens
        advice = f"ask for at most --max-new-tokens {room}" if room > 0 else "shorten the prompt"
        raise LQLoRAInputError(
            f"the prompt's {prompt_tokens} tokens plus {max_new_tokens} new ones exceed the model's "
            f"{limit} positions; {advice}"
        )


def _eos_ids(net) -> set[int]:
    eos = getattr(getattr(net, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(net.config, "eos_token_id", None)
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


# the model's generation settings that change the next token beyond temperature and top-p:
# where one is set, transformers' `generate` runs, since our loop would ignore it
_LOGITS_SETTINGS = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
                    "begin_suppress_tokens", "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id",
                    "sequence_bias", "encoder_repetition_penalty", "exponential_decay_length_penalty")


def _plain_generation(net, prompt_tokens: int) -> bool:
    settings = getattr(net, "generation_config", None)
    if settings is None:
        return True
    defaults = type(settings)()
    return (all(getattr(settings, k, None) == getattr(defaults, k, None) for k in _LOGITS_SETTINGS)
            and (getattr(settings, "min_length", 0) or 0) <= prompt_tokens)


def _generate_in_runtime(decoder, streamer, ids: torch.Tensor, max_new_tokens: int, sampling: Sampling,
                         eos: set[int]) -> list[int]:
    def after(tokens: torch.Tensor) -> int:
        return decoder.greedy(tokens) if sampling.greedy else sampling.next_token(decoder.logits(tokens))

    streamer.put(ids)  # the prompt, which the streamer skips (as transformers' generate hands it over first)
    token = after(ids)
    new: list[int] = []
    while True:
        new.append(token)
        streamer.put(torch.tensor([token]))
        if token in eos or len(new) == max_new_tokens:
            break
        token = after(torch.tensor([token]))
    streamer.end()
    return new


@torch.no_grad()
def generate(net, tokenizer, ids: torch.Tensor, max_new_tokens: int, stream=None,
             sampling: Sampling = Sampling()) -> Generated:
    """Decoding from prompt `ids` (`prompt_ids`), greedy or sampled (`sampling`);
    `stream(text)` receives each piece as it is decoded. A compressed Llama-family model
    on the CPU runs in our runtime (`surgery/lq_decoder.py`), anything else in
    transformers' `generate`."""
    # transformers loads on first use (0.6 s): commands that read no model skip it
    from transformers import TextStreamer

    check_room(net.config, ids.shape[1], max_new_tokens)

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if stream is not None:
                stream(text)

    streamer = _Streamer(tokenizer, skip_prompt=True)
    torch.manual_seed(sampling.seed)
    with PeakMemory(ids.device) as memory:
        runtime = any(lq_layers(net)) and _plain_generation(net, ids.shape[1])
        decoder = fast_decoder(net, ids.shape[1] + max_new_tokens, greedy=sampling.greedy) if runtime else None
        if decoder is not None:
            new = torch.tensor(_generate_in_runtime(decoder, streamer, ids, max_new_tokens, sampling, _eos_ids(net)))
        else:
            drawn = {} if sampling.greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                                "top_k": 0}
            out = net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               do_sample=not sampling.greedy, streamer=streamer,
                               pad_token_id=tokenizer.pad_token_id, **drawn)
            new = out[0, ids.shape[1]:]
    return Generated(tokenizer.decode(new, skip_special_tokens=True), len(new), memory.seconds, memory.added_mb,
                     "lqlora runtime" if decoder is not None else "transformers")
