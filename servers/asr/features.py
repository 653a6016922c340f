"""Incremental log-mel features: each chunk costs the same however long the utterance is.

The model's own preprocessor runs on a short snippet of audio around the new frames: the
snippet starts a few frames early so that every kept frame sees the same samples (and
the same pre-emphasis history) as in a pass over the whole utterance. Kept frames are
bit-identical to that pass; only the snippet, never the utterance, is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from servers.asr.model import StreamingGeometry


@dataclass
class FeatureRequest:
    """Frames ``start .. start + count - 1`` of the log-mel of ``audio`` (a snippet)."""

    audio: np.ndarray
    start: int
    count: int


class _Samples:
    """A growing run of samples whose front is dropped as it is used: an append costs the
    same however much is buffered (a client may send up to ``max_buffered_s`` ahead in
    small frames; copying the backlog on each would be quadratic)."""

    def __init__(self):
        self._buffer = np.empty(0, dtype=np.float32)
        self._start = 0
        self._end = 0

    def __len__(self) -> int:
        return self._end - self._start

    def view(self) -> np.ndarray:
        """The samples held. Later appends never write into it (the engine reads a chunk's
        samples while the client's next frames arrive)."""
        return self._buffer[self._start : self._end]

    def append(self, samples: np.ndarray) -> None:
        if self._end + len(samples) > len(self._buffer):
            held = self.view()
            grown = np.empty(max(2 * (len(held) + len(samples)), 4096), dtype=np.float32)
            grown[: len(held)] = held
            self._buffer, self._start, self._end = grown, 0, len(held)
        self._buffer[self._end : self._end + len(samples)] = samples
        self._end += len(samples)

    def drop_front(self, count: int) -> None:
        self._start = min(self._start + count, self._end)


class UtteranceAudio:
    """The audio of one utterance that future frames still need, and the next frame due.

    Holds at most a chunk and a few frames of samples beyond what has been transcribed,
    plus whatever the client sent ahead of the engine (bounded by the session).
    """

    def __init__(self, geometry: StreamingGeometry):
        self._g = geometry
        self._samples = _Samples()
        self._offset = 0
        """Utterance sample index of the first sample held."""
        self.total_samples = 0
        self.next_frame = 0

    def append(self, samples: np.ndarray) -> None:
        self._samples.append(samples)
        self.total_samples += len(samples)

    @property
    def buffered_samples(self) -> int:
        return len(self._samples)

    def ready_frames(self) -> int:
        """New frames computable from the audio received so far."""
        return max(0, self._g.frames_in(self.total_samples) - self.next_frame)

    def frames_with_padding(self, padding_samples: int) -> int:
        """New frames once the utterance ends with ``padding_samples`` of silence."""
        return max(0, self._g.frames_at_end(self.total_samples + padding_samples) - self.next_frame)

    def take(self, count: int, padding_samples: int | None = None) -> FeatureRequest:
        """The request for the next ``count`` frames; moves past them.

        ``padding_samples`` (at the end of the utterance) appends that much silence; the
        last frames then see zeros past the end, exactly as a whole-utterance pass does.
        Frames that need no silence read only their own audio, however much follows.
        """
        g = self._g
        first = self.next_frame
        begin = max(0, first - g.left_context_frames) * g.hop
        end = g.samples_for_frames(first + count)
        held = self._samples.view()
        if padding_samples is None or end <= self.total_samples:
            audio = held[begin - self._offset : end - self._offset]
        else:
            audio = np.concatenate([held[begin - self._offset :], np.zeros(padding_samples, dtype=np.float32)])
        self.next_frame = first + count
        keep_from = max(0, self.next_frame - g.left_context_frames) * g.hop
        self._samples.drop_front(keep_from - self._offset)
        self._offset = keep_from
        return FeatureRequest(audio=audio, start=first - begin // g.hop, count=count)


@dataclass(frozen=True)
class FeatureBatch:
    """The preprocessor's output for a batch of snippets, ``[rows, n_mels, frames]``, and
    per row where its wanted frames start and how many there are."""

    features: torch.Tensor
    starts: list[int]
    counts: list[int]

    def row(self, i: int) -> torch.Tensor:
        """Row ``i``'s wanted frames, ``[n_mels, count]``."""
        return self.features[i, :, self.starts[i] : self.starts[i] + self.counts[i]]

    def frames(self, rows: list[int], index: torch.Tensor) -> torch.Tensor:
        """The wanted frames of ``rows`` (``index``: the same rows on the features' device),
        which all want equally many, ``[len(rows), n_mels, count]``.

        A few tensor ops whatever the number of rows: on a GPU each op is a kernel launch.
        """
        device = self.features.device
        count = self.counts[rows[0]]
        picked = self.features.index_select(0, index)
        starts = {self.starts[i] for i in rows}
        if len(starts) == 1:
            start = starts.pop()
            return picked[:, :, start : start + count]
        positions = torch.tensor([self.starts[i] for i in rows], device=device)[:, None] + torch.arange(
            count, device=device
        )
        return picked.gather(2, positions[:, None, :].expand(-1, picked.shape[1], -1))


@torch.no_grad()
def compute_features(preprocessor, requests: list[FeatureRequest], device: torch.device) -> FeatureBatch:
    """Run the model's preprocessor once over all snippets.

    Snippets are right-padded with zeros, which for a shorter snippet acts exactly like
    the STFT's own end padding, so every row equals its snippet computed alone.
    """
    lengths = [len(r.audio) for r in requests]
    batch = np.zeros((len(requests), max(lengths)), dtype=np.float32)
    for row, request in zip(batch, requests):
        row[: len(request.audio)] = request.audio
    signal = torch.from_numpy(batch).to(device, non_blocking=True)
    features, _ = preprocessor(input_signal=signal, length=torch.tensor(lengths, device=device))
    return FeatureBatch(features, [r.start for r in requests], [r.count for r in requests])
