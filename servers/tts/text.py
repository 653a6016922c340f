"""From a segment's text to token chunks the model can speak, or a clear refusal."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipecat_nvidia.protocol import ErrorCode


class TextRejected(ValueError):
    """Text that cannot be spoken; ``code`` says why."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TextChunk:
    text: str
    tokens: torch.Tensor
    """Token ids with the model's EOS appended."""


class TextPreparer:
    """Tokenizes with the checkpoint's tokenizer for the language. Text longer than NeMo's
    per-language threshold (~20 s of speech), or of more tokens than the model speaks at
    once, is split at sentence boundaries (NeMo's own splitter), so memory per chunk stays
    bounded; each chunk is then spoken on its own."""

    def __init__(self, model, max_chars: int):
        from nemo.collections.tts.parts.utils.tts_dataset_utils import get_tokenizer_for_language

        self._model = model
        self._max_chars = max_chars
        self._tokenizer_for = get_tokenizer_for_language
        # A token takes at least a codec frame to speak: past the decoder's step limit a
        # sentence would be cut off.
        self.max_tokens = min(
            int(model.cfg.encoder.get("max_length_causal_mask", 2048)),
            int(model.inference_parameters.max_decoder_steps),
        )

    def prepare(self, text: str, language: str) -> list[TextChunk]:
        from nemo.collections.tts.parts.utils.tts_dataset_utils import (
            chunk_and_tokenize_text_by_sentence,
            chunk_text_for_inference,
        )

        stripped = text.strip()
        if not stripped:
            raise TextRejected(ErrorCode.EMPTY_TEXT, "there is no text to speak")
        if len(stripped) > self._max_chars:
            raise TextRejected(
                ErrorCode.TEXT_TOO_LONG, f"{len(stripped)} characters; send at most {self._max_chars} per segment"
            )
        m = self._model
        tokenizer = self._tokenizer_for(language, list(m.tokenizer.tokenizers))
        chunks, lengths, texts = chunk_text_for_inference(
            text=stripped,
            language=language,
            tokenizer_name=tokenizer,
            text_tokenizer=m.tokenizer,
            eos_token_id=m.eos_id,
        )
        if max(lengths, default=0) > self.max_tokens:  # none: all dropped, refused below
            # NeMo splits by a count of words: text of fewer but long words (terms, numbers,
            # links) can be more than the model speaks at once and still in one piece.
            chunks, lengths, texts = chunk_and_tokenize_text_by_sentence(
                text=stripped,
                tokenizer_name=tokenizer,
                text_tokenizer=m.tokenizer,
                eos_token_id=m.eos_id,
                language=language,
            )
        prepared = [
            TextChunk(text=t, tokens=tokens.long()) for tokens, length, t in zip(chunks, lengths, texts) if length > 1
        ]
        if not prepared:
            raise TextRejected(ErrorCode.EMPTY_TEXT, "none of the characters can be spoken in this language")
        for chunk in prepared:
            if len(chunk.tokens) > self.max_tokens:
                raise TextRejected(
                    ErrorCode.TEXT_TOO_LONG,
                    f"a sentence of {len(chunk.tokens)} tokens is more than the model speaks at once "
                    f"({self.max_tokens}); add punctuation",
                )
        return prepared
