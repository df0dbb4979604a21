"""The embedded upstream's token corpus and its deterministic sampler.

A few KB of plain English, shipped in the module (nothing is downloaded), split into word-ish
tokens the way byte-pair tokenizers tend to split English: a word with its leading space, a run of
digits, a run of punctuation, a newline. Joining the tokens gives the text back exactly.

A request is reduced to a key (a hash of model, messages or prompt, and seed); the key alone picks
where in the corpus the reply starts, how long it would run on its own, and every logprob, so the
same request always gets the same reply (the cache stage relies on this).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from typing import Any

import orjson

TEXT = """\
The river of tokens begins somewhere far upstream, in a model that nobody on this side of the wire \
can see. Each word arrives on its own, a little late or a little early, and the pipeline has to \
make sense of it before the next one lands. A good pipeline never asks the river to slow down; it \
keeps a ring of memory ready, writes each token once, and lets every reader take its turn.

In the morning the operators check the rings. They read the cursors, compare the heartbeats, and \
look for anything that stopped moving during the night. Most days nothing has. The supervisor \
restarted a worker at 3:14, after it missed five heartbeats in a row, and the stream picked up \
where it had left off. Nobody noticed, which is the point.

There are 26 letters, 10 digits and a few hundred punctuation marks that matter in practice, but a \
tokenizer does not care about letters. It cares about pieces: the space before a word, the word \
itself, the comma after it. A long word may become two or three pieces; a common one stays whole. \
When the pieces travel through shared memory they carry their text, their position and a number \
that says how sure the model was.

Confidence is a strange thing to measure. A model that says "the" with a logprob of -0.01 is \
nearly certain, while one that picks "river" at -2.3 had other ideas and chose this one anyway. \
Over a long stream these numbers tell a story: perplexity rises when the text wanders, entropy \
falls when it repeats itself, and a loop of the same five tokens is easy to spot once you look.

Caches remember what was said before. If the same question comes back with the same settings, the \
answer can be replayed from memory without waking the model at all. That only works when the \
answer is the same every time, so the test upstream is careful to be boring: same request, same \
reply, token for token.

Faults are part of the job. Connections drop in the middle of a sentence, a server answers 503 \
for a minute, another sends a line that is not an event at all, and a slow one takes two seconds \
before the first byte. The ingest stage retries before the first token, never after, and marks \
the stream as broken when the river simply stops.

Load balancing is mostly patience. Send the next request to the upstream with the fewest requests \
in flight, remember which ones were slow, and give a failing one time to cool down before trying \
it again. Count tokens per client so that one eager caller cannot starve the others.

At the end of the pipe the broadcast stage fans each batch out to whoever is listening: a \
terminal, a dashboard, a shell that draws every token as a point on a curve and colours it by \
how confident the model was. Some listeners are fast and some are slow. The slow ones fall behind \
and are told so; the fast ones never wait for them.

When the day ends the engine drains. Sources stop first, every stage finishes what it was given, \
the rings empty out, and the last worker turns off the lights. Tomorrow the river starts again, \
and the tokens, 1 by 1, keep arriving.
"""

_TOKEN_RE = re.compile(r" ?[A-Za-z']+| ?\d+| ?[^\sA-Za-z'\d]+|\n+|\s+")

# Replies end on their own after a length picked from the key in this range, unless max_tokens
# (or ignore_eos) cuts them off or lets them run on; the range keeps most default replies
# (max_tokens 64) at "length" while still exercising "stop".
MIN_NATURAL_TOKENS = 32
MAX_NATURAL_TOKENS = 1024


def tokenize(text: str) -> list[str]:
    """Split text into word-ish tokens; ``"".join(tokenize(t)) == t``."""
    return _TOKEN_RE.findall(text)


TOKENS: tuple[str, ...] = tuple(tokenize(TEXT))
# Distinct tokens in a fixed order: the pool top_logprobs alternatives are drawn from.
VOCAB: tuple[str, ...] = tuple(sorted(set(TOKENS)))


def request_key(model: str, content: Any, seed: int | None) -> bytes:
    """The hash a reply is derived from; ``content`` is the messages list or the prompt."""
    canonical = orjson.dumps([model, content, seed], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=16).digest()


@dataclass(frozen=True)
class Sample:
    """A reply: its tokens, each token's logprob, and why it ended ("stop" or "length")."""

    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]
    finish_reason: str


def sample(key: bytes, max_tokens: int, ignore_eos: bool = False) -> Sample:
    """The reply for ``key``: consecutive corpus tokens (wrapping around) from a key-chosen start."""
    start = int.from_bytes(key[0:8], "little") % len(TOKENS)
    natural = MIN_NATURAL_TOKENS + int.from_bytes(key[8:12], "little") % (MAX_NATURAL_TOKENS - MIN_NATURAL_TOKENS + 1)
    count = max_tokens if ignore_eos else min(max_tokens, natural)
    tokens = tuple(TOKENS[(start + i) % len(TOKENS)] for i in range(count))
    rng = random.Random(key)
    # Mostly confident tokens with a long tail of unsure ones, like a real model's output.
    logprobs = tuple(round(-rng.expovariate(3.0) - 1e-6, 6) for _ in range(count))  # never -0.0
    return Sample(tokens, logprobs, "length" if count < natural or ignore_eos else "stop")


def top_logprobs(key: bytes, index: int, token: str, logprob: float, n: int) -> list[tuple[str, float]]:
    """The ``n`` most likely tokens at position ``index``: the chosen token first, then distinct
    alternatives with lower logprobs. Seeded per position, so asking for more alternatives only
    appends to the list and never changes the ones already there."""
    if n <= 0:
        return []
    rng = random.Random(key + index.to_bytes(4, "little"))
    result = [(token, logprob)]
    seen = {token}
    current = logprob
    rest = 1.0 - math.exp(logprob)  # the mass the alternatives share: together they never pass 1
    while len(result) < n:
        candidate = VOCAB[rng.randrange(len(VOCAB))]
        if candidate in seen:
            continue
        seen.add(candidate)
        share = rest * (0.2 + 0.6 * rng.random())  # a part of what is left, so some always remains
        current = round(min(current, math.log(max(share, 1e-30))) - 1e-6, 6)  # rounded down: within the rest
        rest -= math.exp(current)
        result.append((candidate, current))
    return result
