"""Cut the training split into an auxiliary (server) part and K client parts.

Paper setup: K + 1 equal parts, one auxiliary and one per client. IID and Dirichlet(α) non-IID
(over the answer label) use flwr-datasets' partitioners; a fixed seed gives the same split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

from fedcollm.data.records import MCQRecord
from fedcollm.errors import FedCoLLMError


@dataclass(frozen=True)
class Split:
    aux: tuple[int, ...]  # indices into the training records
    clients: tuple[tuple[int, ...], ...]


def split_indices(
    records: list[MCQRecord], num_clients: int, scheme: str = "iid", alpha: float = 0.5,
    seed: int = 0, max_examples: int = 0,
) -> Split:
    n = len(records)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    if max_examples:
        order = order[:max_examples]
    if len(order) < 2 * (num_clients + 1):
        raise FedCoLLMError(
            f"data: {len(order)} training examples are too few for 1 auxiliary + {num_clients} client parts")
    table = Dataset.from_dict({"idx": order, "label": [records[i].answer for i in order]})
    iid = IidPartitioner(num_partitions=num_clients + 1)
    iid.dataset = table
    aux = tuple(iid.load_partition(0)["idx"])
    if scheme == "iid":
        clients = tuple(tuple(iid.load_partition(k + 1)["idx"]) for k in range(num_clients))
        return Split(aux, clients)
    # Non-IID: the client share (K/(K+1) of the data) is split by label with Dirichlet(alpha).
    aux_set = set(aux)
    rest_idx = [i for i in order if i not in aux_set]
    rest = Dataset.from_dict({"idx": rest_idx, "label": [records[i].answer for i in rest_idx]})
    dirichlet = DirichletPartitioner(
        num_partitions=num_clients, partition_by="label", alpha=alpha,
        min_partition_size=1, self_balancing=False, seed=seed)
    dirichlet.dataset = rest
    clients = tuple(tuple(dirichlet.load_partition(k)["idx"]) for k in range(num_clients))
    return Split(aux, clients)
