"""The tiny model the embedded engine (:mod:`deployment.engine`) serves when given no model file:
generated here, so that no weights need downloading. Needs ``gguf`` and ``numpy`` (the ``engine``
extra)::

    from deployment.tiny_model import make_tiny_model    # also importable from deployment.engine

    path = make_tiny_model(Path("tiny.gguf"), seed=0)     # about 1.5 MB, byte-identical per seed

``make_tiny_model`` writes a LLaMA-architecture model (2 layers, 64 wide, 4 heads, context
4096) with random weights, a SentencePiece-style vocabulary of English words (every prefix of each,
so the tokenizer can merge them), printable ASCII, the 256 byte tokens and ChatML's control tokens,
and a ChatML chat template, so the server formats chat requests with no extra flag. One embedding
dimension is held constant through the network and the output layer uses it to push every token but
whole words and a few punctuation marks to about -100: at temperature 0 a request with
``max_tokens=N`` streams exactly N readable tokens, one per chunk, the same every time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

TINY_MODEL_ID = "tiny"
TINY_CONTEXT = 4096

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: The vocabulary's words: common English, ChatML's roles, and every word of bridge/validate/prompts/v1.json
#: (so that the validation suite's prompts tokenize to about one token a word, as with a real model).
#: Fixed here, not read from the suite, so the model does not change when the suite does.
WORDS = """
a about above after again all also an and answer any are arithmetic as ask assistant at bandwidth be
because before blue bottle but by can card centre come contrast cores could CUDA data day decode
decoding do does down each explain Explain few find finds first for from GB GDDR give go good graphics
great has have he hello her here him his how I if in into is it its just keeper know language Language
large last lighthouse like limited limits long look make man many may me memory message model models
more most much must my need needs new no not now number of old on once one only or other our out over
people processing Prompt read right s same Say say see sentence sentences set sets she short single
sky small so some speed story stream student Summarise system T take Tesla text than that The the
their them then there these they thing think this This time to token tokens two up us use user Using
very want was water way we weights well were what when which who whole why will with word words work
works world would Write write year you your
""".split()

_BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
_SPACE = "\u2581"  # SentencePiece's visible space
_PUNCTUATION_OUT = (".", ",")  # punctuation the tiny model may emit besides whole words


def _tiny_vocab() -> tuple[list[str], list[float], list[int], list[bool]]:
    """Tokens, scores, token types and whether the model may emit each token."""
    from gguf import TokenType

    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    allowed: list[bool] = []
    seen: set[str] = set()

    def add(piece: str, kind: TokenType, score: float = 0.0, emit: bool = False) -> None:
        if piece in seen:
            return
        seen.add(piece)
        tokens.append(piece)
        scores.append(score)
        types.append(int(kind))
        allowed.append(emit)

    add("<unk>", TokenType.UNKNOWN)
    add("<s>", TokenType.CONTROL)
    add("</s>", TokenType.CONTROL)
    add("<|im_start|>", TokenType.CONTROL)
    add("<|im_end|>", TokenType.CONTROL)
    for piece in _BYTE_TOKENS:
        add(piece, TokenType.BYTE)
    add(_SPACE, TokenType.NORMAL, -1.0)
    for code in range(33, 127):
        ch = chr(code)
        add(ch, TokenType.NORMAL, -1.0, emit=ch in _PUNCTUATION_OUT)
    # Every prefix of every word, bare and after a space: the SentencePiece merge joins two pieces
    # at a time (highest score first: longer pieces score higher), so each step must be a token.
    for word in sorted(set(WORDS)):
        for lead in ("", _SPACE):
            for end in range(1, len(word) + 1):
                piece = lead + word[:end]
                if len(piece) == 1:
                    continue
                add(piece, TokenType.NORMAL, float(len(piece)), emit=bool(lead) and end == len(word))
    return tokens, scores, types, allowed


def make_tiny_model(
    path: Path | str, seed: int = 0, *, context_length: int = TINY_CONTEXT, name: str = TINY_MODEL_ID
) -> Path:
    """Write the deterministic tiny GGUF model to ``path`` (byte-identical for the same seed) and
    return its path. Needs ``gguf`` and ``numpy`` (the ``engine`` extra)."""
    import gguf
    import numpy as np

    path = Path(path)
    n_embd, n_layer, n_head, n_ff = 64, 2, 4, 128
    tokens, scores, types, allowed = _tiny_vocab()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def rand(*shape: int, std: float) -> Any:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    # Dimension 0 of the residual stream is a constant: 4 in every token's embedding, and no layer
    # writes to it (row 0 of each output projection is zero), so after the final RMS norm it is
    # large and positive. The output layer's column 0 then sets a fixed bias per token.
    embd = rand(n_vocab, n_embd, std=0.5)
    embd[:, 0] = 4.0
    out = rand(n_vocab, n_embd, std=1.0)
    out[:, 0] = np.where(np.array(allowed), 0.0, -20.0)  # about -110 after the norm
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(name)
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    writer.add_tensor("token_embd.weight", embd)
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", out)
    for i in range(n_layer):
        wo = rand(n_embd, n_embd, std=0.05)
        wo[0, :] = 0.0
        down = rand(n_embd, n_ff, std=0.05)
        down[0, :] = 0.0
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", rand(n_embd, n_embd, std=0.2))
        writer.add_tensor(f"blk.{i}.attn_k.weight", rand(n_embd, n_embd, std=0.2))
        writer.add_tensor(f"blk.{i}.attn_v.weight", rand(n_embd, n_embd, std=0.2))
        writer.add_tensor(f"blk.{i}.attn_output.weight", wo)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", rand(n_ff, n_embd, std=0.2))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", rand(n_ff, n_embd, std=0.2))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", down)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path
