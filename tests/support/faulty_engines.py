"""Engines that fail on purpose, named by import path in a test's config
(``truncate.engine.backend: "faulty_engines:PoisonVLLM"``); palign itself holds no test hook.

This folder is on ``PYTHONPATH`` for every process the tests start (``tests/conftest.py``), so
the engine actors of a local Ray import this module as they build their engine.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from palign.engines.base import Chat, Completion, LabelScores, Sampling
from palign.engines.vllm_engine import VLLMEngine

log = logging.getLogger(__name__)

# A prompt holding this text makes PoisonVLLM's process exit; no other test data contains it.
POISON = "__palign_poison_row__"
EXIT_CODE = 86  # what the process exits with, as a crashing engine's would be non-zero


def _exit_on_poison(chats: list[Chat]) -> None:
    if any(POISON in message.get("content", "") for chat in chats for message in chat):
        log.error("a prompt holds %r: exiting the engine's process", POISON)
        logging.shutdown()
        os._exit(EXIT_CODE)


class PoisonVLLM(VLLMEngine):
    """The vLLM engine (step driver), except that a request whose prompt holds ``POISON``
    makes its process exit at once, as an engine crashing on that row would: batched calls and
    single requests alike (the per-row search opens them one by one)."""

    def generate(self, chats: list[Chat], sampling: Sampling) -> list[Completion]:
        _exit_on_poison(chats)
        return super().generate(chats, sampling)

    def score_labels(self, chats: list[Chat], labels: list[str]) -> list[LabelScores]:
        _exit_on_poison(chats)
        return super().score_labels(chats, labels)

    def open_request(self, kind: str, chat: Chat, arg: Any, index: int = 0
                     ) -> tuple[Completion | LabelScores, str | None]:
        _exit_on_poison([chat])
        return super().open_request(kind, chat, arg, index)
