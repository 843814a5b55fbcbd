"""Deterministic, resumable augmentation: sample i of epoch e is augmented from (seed, epoch, i) alone.

The train sampler yields keys ``(index, epoch)`` instead of plain indices; datasets accept such a key and
seed their augmentation from it. Batches therefore do not depend on ``num_workers``, on worker
restarts or on what ran before, so a run resumed at epoch e sees exactly the batches it would have seen.

Lightning calls ``set_epoch`` on the dataloader's sampler at the start of every epoch, but only after it
has made (and, with worker processes, prefetched from) the first iterator of a resumed fit; so the data
modules also store where training stands in their checkpoint state and start the sampler there
(:meth:`EpochSeededSampler.resume_at`: the restored epoch, and the batch after the last one trained when
the checkpoint is from the middle of an epoch). Under DDP the sampler shards itself, so the same holds
on every rank.

:class:`BalancedEpochSampler` draws each epoch's keys with replacement, every class equally likely, from the
same (seed, epoch) generator (class-aware on multi-label data), and shards and resumes the same way. A
sample drawn twice in one epoch is augmented twice differently: its r-th repeat carries the "epoch"
``epoch + r * 2**32`` in its key, which the datasets use only to seed augmentation.
"""
from __future__ import annotations

import os
import random
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

Key = Union[int, Tuple[int, int]]
_MASK64 = (1 << 64) - 1


def resolve_seed(seed: Optional[int]) -> int:
    """An explicit seed wins; else ``PL_GLOBAL_SEED`` (set by ``seed_everything``); else 0."""
    if seed is not None:
        return int(seed)
    env = os.environ.get("PL_GLOBAL_SEED")
    try:
        return int(env) if env not in (None, "") else 0
    except ValueError:
        return 0


def _entropy(*parts: int) -> list:
    return [int(p) & _MASK64 for p in parts]


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for the permutation of one epoch."""
    state = np.random.SeedSequence(_entropy(seed, epoch, 0x5E9)).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def sample_rngs(seed: int, epoch: int, index: int) -> Tuple[np.random.Generator, random.Random]:
    """The numpy and python generators that augment sample ``index`` in ``epoch``."""
    ss = np.random.SeedSequence(_entropy(seed, epoch, index))
    gen = np.random.default_rng(ss)
    py = random.Random(int(ss.generate_state(1, np.uint64)[0]))
    return gen, py


def sample_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Only the numpy generator of :func:`sample_rngs` (same stream), for torch/cv2-only pipelines."""
    return np.random.default_rng(np.random.SeedSequence(_entropy(seed, epoch, index)))


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def keyed_uniforms(seed: int, epochs: np.ndarray, indices: np.ndarray, k: int) -> np.ndarray:
    """(n, k) uniforms in [0, 1) for samples (epoch, index): row i is a function of (seed, epochs[i],
    indices[i]) alone, like :func:`sample_generator`, but computed for a whole batch at once (a counter-based
    SplitMix64 hash instead of one generator per sample)."""
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(len(indices), int(seed) & _MASK64, dtype=np.uint64))
        h = _splitmix64(h ^ np.asarray(epochs, dtype=np.int64).astype(np.uint64))
        h = _splitmix64(h ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))
        z = _splitmix64(h[:, None] ^ np.arange(1, k + 1, dtype=np.uint64)[None, :])
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def split_key(key: Key) -> Tuple[int, Optional[int]]:
    """``(index, epoch)`` from a sampler key; a plain index has no epoch (augmented unseeded)."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    if isinstance(key, torch.Tensor):
        key = key.tolist()
        return split_key(key)
    return int(key), None


class EpochSeededSampler(DistributedSampler):
    """Yields ``(index, epoch)`` keys; the order of each epoch is a function of (seed, epoch) only, and it
    can start part-way through an epoch (exact resume from a mid-epoch checkpoint).

    Under ``torch.distributed`` it shards itself like ``DistributedSampler(shuffle=False, drop_last=False)``
    over the shuffled keys (pad by repeating the first keys, then every ``world``-th key from ``rank``), so
    Lightning keeps it instead of wrapping it (it is a ``DistributedSampler``), and the resume offset
    counts this rank's own keys. The process group is read when iterating, not when built.

    Args:
        n: dataset length.
        seed: base seed.
        shuffle: shuffle each epoch (else indices in order, still keyed with the epoch).
        num_replicas, rank: the shard to yield (default: from the process group, else 1 and 0).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None):
        # DistributedSampler.__init__ is not called: it needs the process group, which comes later
        self._replicas, self._rank = num_replicas, rank
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0  # keys of this rank to skip in ``epoch`` (set by ``resume_at``)
        self.drop_last = False

    @property
    def num_replicas(self) -> int:
        if self._replicas is not None:
            return int(self._replicas)
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return int(self._rank)
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.start = 0  # the resume offset belongs to the epoch it was set for
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, start: int) -> None:
        """Begin at key ``start`` (of this rank's share) of ``epoch``; later epochs start at 0."""
        self.epoch, self.start = int(epoch), int(start)

    def _per_rank(self) -> int:
        return -(-self.n // self.num_replicas)  # ceil: the last keys repeat to even out the ranks

    def __len__(self) -> int:
        # the whole epoch's length, also when resuming part-way: Lightning counts the trained batches of
        # the epoch from the checkpoint and stops the epoch at this length
        return self._per_rank()

    def epoch_keys(self) -> List[Tuple[int, int]]:
        """Every key of the current epoch in order, before sharding: a function of (seed, epoch) only."""
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return [(i, self.epoch) for i in order]

    def keys(self) -> List[Tuple[int, int]]:
        """This rank's keys of the current epoch, from ``start`` on."""
        order = self.epoch_keys()
        world = self.num_replicas
        if world > 1:
            total = self._per_rank() * world
            order = (order * -(-total // max(len(order), 1)))[:total]
            order = order[self.rank:total:world]
        return order[self.start:]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return iter(self.keys())


REPEAT_STRIDE = 1 << 32  # added to the key's epoch for each repeat of an index within a balanced epoch


def class_aware_probs(targets: np.ndarray) -> np.ndarray:
    """(N,) probabilities of class-aware sampling (Shen et al. 2016) for multi-label 0/1 ``targets`` (N, C): a
    class is picked uniformly among those with positives (images without any label form one more class), then
    one of its images uniformly; p_i = mean over the picked classes of [i holds c] / count(c). On one-hot
    targets this is class-balanced sampling. Rare labels are drawn more often, and so are the labels that
    co-occur with them: the positives per class even out, but not exactly."""
    t = np.asarray(targets) > 0
    empty = ~t.any(axis=1)
    if empty.any():
        t = np.concatenate([t, empty[:, None]], axis=1)
    counts = t.sum(axis=0)
    present = counts > 0
    return (t[:, present] / counts[present]).sum(axis=1) / present.sum()


class BalancedEpochSampler(EpochSeededSampler):
    """Class-balanced sampling with replacement: an epoch is ``num_samples`` keys, index i drawn with
    probability proportional to ``1 / count(labels[i])`` (every class equally likely), the draw a function of
    (seed, epoch) only. Shards, resumes (``resume_at``) and sets its epoch as :class:`EpochSeededSampler`.
    Multi-label ``labels`` (N, C) are drawn by class-aware sampling (:func:`class_aware_probs`).

    The r-th repeat (r >= 1) of an index within an epoch is keyed ``(index, epoch + r * 2**32)``, so that
    its augmentation differs from the first draw's (datasets seed augmentation from the key).

    Args:
        labels: class index of every sample of the dataset (N,), or multi-label 0/1 targets (N, C).
        seed: base seed.
        num_samples: keys per epoch (default: the dataset length, the same budget as plain shuffling).
        num_replicas, rank: the shard to yield (default: from the process group, else 1 and 0).
    """

    def __init__(self, labels: Sequence[int], seed: int = 0, num_samples: Optional[int] = None,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None):
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim not in (1, 2) or len(labels) == 0 or (labels < 0).any():
            raise ValueError("BalancedEpochSampler needs class indices >= 0 (N,) or 0/1 multi-label targets (N, C), "
                             f"got shape {labels.shape}")
        super().__init__(len(labels) if num_samples is None else int(num_samples), seed=seed, shuffle=True,
                         num_replicas=num_replicas, rank=rank)
        if labels.ndim == 2:
            self.probs = torch.from_numpy(class_aware_probs(labels))
        else:
            inverse = 1.0 / np.bincount(labels)[labels]
            self.probs = torch.from_numpy(inverse / inverse.sum())  # (n,) float64, sums to 1

    def epoch_keys(self) -> List[Tuple[int, int]]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        drawn = torch.multinomial(self.probs, self.n, replacement=True, generator=g).tolist()
        seen: Dict[int, int] = {}
        keys = []
        for i in drawn:
            r = seen.get(i, 0)
            seen[i] = r + 1
            keys.append((i, self.epoch + r * REPEAT_STRIDE))
        return keys


def seed_pipeline(pipeline, seed: int, key: Key) -> None:
    """Point an albumentations pipeline's random state at the generators for ``key``.

    A plain index (no epoch) leaves the pipeline's own random stream alone.
    """
    index, epoch = split_key(key)
    if epoch is None or pipeline is None or not hasattr(pipeline, "set_random_state"):
        return
    gen, py = sample_rngs(seed, epoch, index)
    pipeline.set_random_state(gen, py)


def worker_init(_worker_id: int) -> None:
    """Keep each dataloader worker to one thread (the machine's cores belong to the model)."""
    torch.set_num_threads(1)
