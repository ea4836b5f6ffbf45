"""One streamed generation between the model's thread and the event loop.

The model generates in a worker thread; its tokens reach the request's event loop through
transformers' AsyncTextIteratorStreamer, so no thread of the loop's pool sits waiting for them.
When the client goes away the response calls `cancel()`: a StoppingCriteria, checked by
`generate` after every decoding step, then ends the generation, so a dropped stream frees the
one-at-a-time gate within a step instead of running to max_new_tokens.
"""
from __future__ import annotations

import threading

import torch
from transformers import AsyncTextIteratorStreamer, StoppingCriteria


class StopWhenCancelled(StoppingCriteria):
    """Stops every row of the batch once `cancelled` is set (from any thread)."""

    def __init__(self, cancelled: threading.Event) -> None:
        self.cancelled = cancelled

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.cancelled.is_set(), dtype=torch.bool, device=input_ids.device)


class CancellableStream(AsyncTextIteratorStreamer):
    """The text pieces of one generation, iterated with `async for` on the loop that created it.

    generate_outputs passes `stopping_criteria` to `model.generate` (a streamer that carries one is
    asking to be stoppable); `cancel()` sets it. `end()` may be called again by the server when the
    generation failed or never started, so the consumer always sees the end of the stream."""

    def __init__(self, tokenizer, timeout: float | None = 600) -> None:
        super().__init__(tokenizer, skip_prompt=True, timeout=timeout, skip_special_tokens=True)
        self.cancelled = threading.Event()
        self.stopping_criteria = StopWhenCancelled(self.cancelled)
        self.ended = False

    def cancel(self) -> None:
        self.cancelled.set()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            super().end()

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        # the request's loop may be gone (a test client's loop closes with its request); then nobody reads
        if not self.loop.is_closed():
            try:
                super().on_finalized_text(text, stream_end)
            except RuntimeError:  # closed between the check and the call
                pass
