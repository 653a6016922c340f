"""NeMo's log in a process that runs for days.

On import NeMo gives its logger two ``MemoryHandler``s without a target: buffers for a
training run's log file, emptied only once that file is added. A server adds none, so
every NeMo message would be kept for the life of the process, among them a warning per
character the TTS tokenizer lacks, each holding the whole text.
"""

from __future__ import annotations

import logging
from logging.handlers import MemoryHandler

NEMO_LOGGER = "nemo_logger"


def stop_nemo_log_buffers() -> None:
    """Point NeMo's target-less buffers at a handler that drops what they hold: their
    capacity (-1) then flushes, and so empties, them after every record. NeMo's own
    stream handlers still print."""
    for handler in logging.getLogger(NEMO_LOGGER).handlers:
        if isinstance(handler, MemoryHandler) and handler.target is None:
            handler.setTarget(logging.NullHandler())
            handler.flush()
