"""How many tokens a model can attend to, read from its config: the bound every
window length and every generation must stay within."""


def context_length(config) -> int | None:
    """The model's position limit (`max_position_embeddings`, GPT-2's `n_positions`), or
    None when the config names none."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
