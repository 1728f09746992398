"""The training order of length-grouped batches, a function of the seed and the epoch only."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices


class LengthGroupedEpochs(Sampler[int]):
    """Trainer's length-grouped order (shuffled mega-batches sorted by length), drawn from seed + epoch alone.

    Trainer's own LengthGroupedSampler draws from the global torch RNG when an epoch's iterator starts. A
    resume into the middle of an epoch starts that iterator (to skip the batches done) before Trainer puts
    back the saved RNG state, so from the second epoch on it drew another order than the straight run did.
    The epoch comes from the trainer state, not `set_epoch`: under DDP accelerate does not pass `set_epoch`
    through the batch sampler it wraps to skip batches.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, epoch: Callable[[], int]):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch())
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))
