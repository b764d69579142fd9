"""One streamed text out of the chunks of every generation of a request.

A request can be generated more than once at the same time: redelivered after a
worker crashed mid-stream, or answered by a partition's new owner while the revoked
worker still finishes its row (docs/design.md, "Workers"). Each run streams its
own chunks, numbered from 0 and tagged with its generation (the worker instance and
its attempt, `InferenceChunk.generation`), to the same reply topic. Appending chunks
by index across generations garbled or repeated the text; `StreamStitcher` hands
the caller one generation's text:

- it follows the generation of the first chunk it sees; another generation's
  chunks are kept aside, and taken over only once that generation's text extends
  everything already handed out (the followed worker died, and with greedy
  decoding its redelivery writes the same text: the stream goes on where it was);
- the reply ends the stream: its last chunk carries the rest of `reply.text`
  after what was handed out, so the chunks' texts add up to `reply.text`. When the
  reply came from a generation whose text does not extend what was handed out (a
  sampled redelivery that took another turn), the last chunk has `restart` set and
  carries the whole `reply.text`: it replaces every chunk before it. A reply that
  is not `ok` carries no text: its last chunk's text is empty, and its status says
  what happened.

Pure logic, no I/O: `Client.stream` feeds it (streams/client.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from streams.reply import Chunk, Reply

# generations of one request kept apart at most; more than a few means someone else
# writes the reply topic: their chunks are ignored (the reply still ends the stream)
MAX_GENERATIONS = 8


@dataclass(slots=True)
class _Generation:
    text: str = ""  # this generation's chunks, in index order
    next_index: int = 0


class StreamStitcher:
    """The chunks of one streamed request, from any number of generations, as the
    caller's chunks: indexes 0, 1, 2, ... and texts that add up to the reply's."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.followed: str | None = None  # the generation whose text the caller has
        self.handed_out = ""  # the text the caller has, since the start
        self._index = 0  # the caller's next chunk index
        self._generations: dict[str, _Generation] = {}

    def add(self, chunk: Chunk) -> Chunk | None:
        """The caller's chunk for a chunk read off the reply topic, or None: a chunk
        seen before (its index repeats), one of a generation not followed, or one
        that adds nothing to what the caller has."""
        generation = self._generations.get(chunk.generation)
        if generation is None:
            if len(self._generations) >= MAX_GENERATIONS:
                return None
            generation = self._generations[chunk.generation] = _Generation()
        if chunk.index != generation.next_index:
            return None  # a repeat: chunks of one generation arrive in order, on one partition
        generation.text += chunk.text
        generation.next_index += 1
        if self.followed is None:
            self.followed = chunk.generation
        extends = len(generation.text) > len(self.handed_out) and generation.text.startswith(self.handed_out)
        if not extends:
            return None
        self.followed = chunk.generation
        new_text = generation.text[len(self.handed_out) :]
        self.handed_out = generation.text
        return self._next(new_text, chunk.tokens_out, chunk.generation)

    def end(self, reply: Reply) -> Chunk:
        """The last chunk: the rest of the reply's text, or (`restart`) all of it."""
        if reply.status != "ok" or reply.text.startswith(self.handed_out):
            rest = reply.text[len(self.handed_out) :] if reply.text.startswith(self.handed_out) else ""
            return self._next(rest, reply.tokens_out, self.followed or "", reply)
        self.handed_out = reply.text
        return self._next(reply.text, reply.tokens_out, "", reply, restart=True)

    def _next(
        self, text: str, tokens_out: int, generation: str, reply: Reply | None = None, *, restart: bool = False
    ) -> Chunk:
        chunk = Chunk(self.request_id, self._index, text, tokens_out, reply, generation=generation, restart=restart)
        self._index += 1
        return chunk
