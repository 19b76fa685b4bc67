"""Cut the training split into an auxiliary (server) part and K client parts.

Paper setup: K + 1 equal parts, one auxiliary and one per client. The auxiliary part can be any
share of the split (`aux_fraction`) or absent (the server has its own file). Client parts are
IID, or non-IID with flwr-datasets' Dirichlet partitioner over a label: the answer position
(`dirichlet`) or the question's topic (`topic`, see topic_labels). A fixed seed gives the same
split.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

from fedcollm.data.records import Record, only_multiple_choice, words_of
from fedcollm.errors import FedCoLLMError


@dataclass(frozen=True)
class Split:
    aux: tuple[int, ...]  # indices into the training records (empty: the server has its own file)
    clients: tuple[tuple[int, ...], ...]


_STOP = set("a an the of to in on at by for with from and or is are was were be been it its this that these "
            "those which what who whom why how when where do does did can could will would most likely "
            "following best not than as into".split())


def topic_labels(records: list[Record], k: int, seed: int, dims: int = 4096, iters: int = 25) -> list[int]:
    """A topic per question: k-means (k-means++ start, seeded) over tf-idf-weighted, L2-normed
    counts of the question's and choices' (or prompt's and completion's) words, hashed into `dims`
    buckets. Cheap, deterministic and dependency-free; it groups questions by subject (plants,
    magnets, weather, ...)."""
    rows = []
    for r in records:
        words = [w for w in re.findall(r"[a-z]+", words_of(r).lower())
                 if len(w) > 2 and w not in _STOP]
        rows.append([zlib.crc32(w.encode()) % dims for w in words])
    x = np.zeros((len(rows), dims), np.float32)
    for i, cols in enumerate(rows):
        np.add.at(x[i], cols, 1.0)
    df = (x > 0).sum(0)
    x *= np.log((1 + len(rows)) / (1 + df)) + 1
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, k):  # k-means++: far points are likelier starts
        d = np.min([((x - c) ** 2).sum(1) for c in centers], axis=0)
        centers.append(x[rng.choice(len(x), p=d / d.sum()) if d.sum() > 0 else rng.integers(len(x))])
    c = np.stack(centers)
    for _ in range(iters):
        labels = (x @ c.T).argmax(1)  # rows are unit vectors: the nearest center is the most similar
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(0) / max(np.linalg.norm(members.mean(0)), 1e-9)
    return [int(v) for v in (x @ c.T).argmax(1)]


def split_indices(
    records: list[Record], num_clients: int, scheme: str = "iid", alpha: float = 0.5,
    seed: int = 0, max_examples: int = 0, aux_fraction: float = 0.0, with_aux: bool = True,
    topics: int = 8,
) -> Split:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if max_examples:
        order = order[:max_examples]
    n_parts = num_clients + int(with_aux)
    if len(order) < 2 * n_parts:
        raise FedCoLLMError(
            f"data: {len(order)} training examples are too few for "
            f"{'1 auxiliary + ' if with_aux else ''}{num_clients} client parts")
    if not with_aux:
        n_aux = 0
    elif aux_fraction:
        n_aux = max(1, round(aux_fraction * len(order)))
    else:  # K + 1 equal parts: the first of them, sized as a contiguous shard of K + 1
        n_aux = -(-len(order) // n_parts)
    aux, rest = tuple(order[:n_aux]), order[n_aux:]
    if len(rest) < num_clients:
        raise FedCoLLMError(f"data: data.aux_fraction = {aux_fraction} leaves {len(rest)} examples "
                            f"for {num_clients} clients")
    if scheme == "iid":
        iid = IidPartitioner(num_partitions=num_clients)
        iid.dataset = Dataset.from_dict({"idx": rest})
        return Split(aux, tuple(tuple(iid.load_partition(k)["idx"]) for k in range(num_clients)))
    if scheme == "dirichlet":
        picked = [records[i] for i in rest]
        only_multiple_choice(picked, "data.partition = 'dirichlet'", "its label (the answer's position)",
                             "use 'iid' or 'topic'")
        label = [r.answer for r in picked]
    else:
        label = topic_labels([records[i] for i in rest], topics, seed)
    dirichlet = DirichletPartitioner(
        num_partitions=num_clients, partition_by="label", alpha=alpha,
        min_partition_size=1, self_balancing=False, seed=seed)
    dirichlet.dataset = Dataset.from_dict({"idx": rest, "label": label})
    return Split(aux, tuple(tuple(dirichlet.load_partition(k)["idx"]) for k in range(num_clients)))
