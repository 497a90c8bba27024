"""Data: tokenization, built-in offline tasks, partitioners and federated datasets (host numpy)."""

from fedjax_llm.data.federated_dataset import (
    FederatedDataset,
    TaskData,
    TokenizedExamples,
    build_task_data,
    make_federated_dataset,
    tokenize_examples,
)
from fedjax_llm.data.partitioners import (
    PARTITIONERS,
    dirichlet_partition,
    format_partition_stats,
    iid_partition,
    partition,
    partition_stats,
    pathological_partition,
    quantity_skew_partition,
)
from fedjax_llm.data.tasks import (
    DEFAULT_FAMILIES,
    TASK_FAMILIES,
    Example,
    TaskFamily,
    generate_examples,
    generate_examples_for_labels,
    get_task_families,
)
from fedjax_llm.data.tokenizer import ByteTokenizer, Tokenizer

__all__ = [
    "DEFAULT_FAMILIES",
    "PARTITIONERS",
    "TASK_FAMILIES",
    "ByteTokenizer",
    "Example",
    "FederatedDataset",
    "TaskData",
    "TaskFamily",
    "TokenizedExamples",
    "Tokenizer",
    "build_task_data",
    "dirichlet_partition",
    "format_partition_stats",
    "generate_examples",
    "generate_examples_for_labels",
    "get_task_families",
    "iid_partition",
    "make_federated_dataset",
    "partition",
    "partition_stats",
    "pathological_partition",
    "quantity_skew_partition",
    "tokenize_examples",
]
