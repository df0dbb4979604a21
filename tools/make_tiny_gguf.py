"""Write a tiny random-weight llama model as GGUF, for a real llama.cpp upstream in the tests.

    python tools/make_tiny_gguf.py /tmp/tiny-llama.gguf [--seed 0]

No download: the weights are random (numpy, fixed seed, so the same file every time) and the
tokenizer is a small SentencePiece-style ("llama") vocabulary built here: <unk>, <s>, </s>, the
256 byte tokens (byte fallback, so any prompt tokenizes), and a few hundred words. The model is
2 layers, n_embd 64, 4 heads, n_ff 128, vocabulary 510, f32: about 0.6 MB, loaded in milliseconds and generating
thousands of tokens per second on a CPU.

The text it generates is random words, but not any token: the output layer is built so that
</s>, <s>, <unk> and the byte tokens are (practically) never sampled. Dimension 0 of every token
embedding is a large constant, which survives the two small random layers and the RMS norm, so
column 0 of the output matrix acts as a per-token bias: strongly negative for the tokens above.
A stream therefore always runs to max_tokens (finish_reason "length") and every generated token
is a whole word with text, one SSE chunk each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
N_FF = 128
CONTEXT = 4096
UNK, BOS, EOS = 0, 1, 2
BYTE_BASE = 3  # <0x00> .. <0xFF> follow the three control tokens
SPACE = "\u2581"  # SentencePiece's word-boundary mark

_WORD_TEXT = """
the of and to in is was for on that with as by at from it his an were are which this be
or has had first one their its new after but who not they have her she two been other when
there all during into school time may years more most only over city some world would where
later up such used many can state about national out known university united then made
stream token river ring buffer shared memory process worker supervisor model batch queue
signal engine pipe flow data text word light small large fast slow early late north south
east west red green blue black white green water fire stone wood iron gold silver glass paper
house road bridge tower garden field forest mountain valley lake island ocean sky cloud rain
snow wind storm sun moon star night day morning evening week month year music song story
book letter number line point circle square heart hand head voice name place home family
friend people child woman man king queen city village market table chair door window wall
"""
_WORDS = _WORD_TEXT.split()


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores (higher merges first) and token types of the llama (SPM) vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = [SPACE, *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;"]
    seen = set(pieces)
    for word in _WORDS:
        piece = SPACE + word
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    # Control and byte tokens score 0 (never merged); longer pieces score higher.
    scores = [0.0] * BYTE_BASE + [0.0] * 256 + [float(len(p)) - 100.0 for p in pieces]
    return tokens, scores, [int(t) for t in types]


def tensors(n_vocab: int, suppressed: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The weights, as numpy arrays in GGUF's (reversed) shape order, all float32."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int, std: float) -> np.ndarray:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    embd = normal(n_vocab, N_EMBD, std=1.0)
    embd[:, 0] = 8.0  # the constant dimension that gives the output layer a bias
    out = normal(n_vocab, N_EMBD, std=0.5)
    out[:, 0] = 0.0
    out[suppressed, :] = 0.0
    out[suppressed, 0] = -20.0
    weights = {
        "token_embd.weight": embd,
        "output_norm.weight": np.ones(N_EMBD, dtype=np.float32),
        "output.weight": out,
    }
    small = 0.02
    for i in range(N_LAYER):
        weights |= {
            f"blk.{i}.attn_norm.weight": np.ones(N_EMBD, dtype=np.float32),
            f"blk.{i}.attn_q.weight": normal(N_EMBD, N_EMBD, std=small),
            f"blk.{i}.attn_k.weight": normal(N_EMBD, N_EMBD, std=small),
            f"blk.{i}.attn_v.weight": normal(N_EMBD, N_EMBD, std=small),
            f"blk.{i}.attn_output.weight": normal(N_EMBD, N_EMBD, std=small),
            f"blk.{i}.ffn_norm.weight": np.ones(N_EMBD, dtype=np.float32),
            f"blk.{i}.ffn_gate.weight": normal(N_FF, N_EMBD, std=small),
            f"blk.{i}.ffn_up.weight": normal(N_FF, N_EMBD, std=small),
            f"blk.{i}.ffn_down.weight": normal(N_EMBD, N_FF, std=small),
        }
    return weights


def write(path: str | Path, seed: int = 0) -> Path:
    """Write the model to ``path`` (deterministic for a given seed); returns the path."""
    path = Path(path)
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)
    suppressed = np.array([t in (UNK, BOS, EOS) or types[t] == gguf.TokenType.BYTE for t in range(n_vocab)])
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("neuralpipe-tiny-random")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_unk_token_id(UNK)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for name, array in tensors(n_vocab, suppressed, seed).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="the .gguf file to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write(args.path, args.seed)
    print(f"{path}: {path.stat().st_size} bytes, vocab {len(vocabulary()[0])}, {N_LAYER} layers, n_embd {N_EMBD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
