"""Data: tokenization, built-in offline tasks, real datasets from files (instructions, text and
preference pairs), partitioners, data poisoning and federated datasets (host numpy)."""

from fedjax_llm.data.client_arrays import ClientArrays
from fedjax_llm.data.federated_dataset import (
    FederatedDataset,
    TaskData,
    TokenizedExamples,
    build_task_data,
    make_federated_dataset,
    tokenize_examples,
)
from fedjax_llm.data.file_data import build_file_data
from fedjax_llm.data.formatting import (
    CHATML_TEMPLATE,
    LOSS_ON,
    FormatReport,
    records_to_conversations,
    render_chat,
    tokenize_conversations,
    tokenize_documents,
)
from fedjax_llm.data.hf_tokenizer import HFTokenizer, load_tokenizer
from fedjax_llm.data.loaders import (
    FILE_COLUMN,
    FORMATS,
    SCHEMA_COLUMNS,
    LoadedDataset,
    load_preference_pairs,
    load_records,
)
from fedjax_llm.data.partition_report import client_label_counts, save_partition_report
from fedjax_llm.data.partitioners import (
    DIRICHLET_OVER,
    PARTITIONERS,
    NaturalClients,
    dirichlet_partition,
    format_partition_stats,
    iid_partition,
    natural_clients,
    natural_partition,
    partition,
    partition_convention,
    partition_stats,
    pathological_partition,
    quantity_skew_partition,
)
from fedjax_llm.data.poisoning import (
    POISONING_KINDS,
    PoisoningSpec,
    backdoor_records,
    check_poisoning,
    poison_records,
    select_poisoned,
)
from fedjax_llm.data.preference_data import build_preference_data
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
    "ClientArrays",
    "CHATML_TEMPLATE",
    "DEFAULT_FAMILIES",
    "DIRICHLET_OVER",
    "FILE_COLUMN",
    "FORMATS",
    "LOSS_ON",
    "PARTITIONERS",
    "POISONING_KINDS",
    "SCHEMA_COLUMNS",
    "TASK_FAMILIES",
    "ByteTokenizer",
    "Example",
    "FederatedDataset",
    "FormatReport",
    "HFTokenizer",
    "LoadedDataset",
    "NaturalClients",
    "PoisoningSpec",
    "TaskData",
    "TaskFamily",
    "TokenizedExamples",
    "Tokenizer",
    "backdoor_records",
    "build_file_data",
    "build_preference_data",
    "build_task_data",
    "check_poisoning",
    "client_label_counts",
    "dirichlet_partition",
    "format_partition_stats",
    "generate_examples",
    "generate_examples_for_labels",
    "get_task_families",
    "iid_partition",
    "load_preference_pairs",
    "load_records",
    "load_tokenizer",
    "make_federated_dataset",
    "natural_clients",
    "natural_partition",
    "partition",
    "partition_convention",
    "partition_stats",
    "pathological_partition",
    "poison_records",
    "quantity_skew_partition",
    "records_to_conversations",
    "render_chat",
    "save_partition_report",
    "select_poisoned",
    "tokenize_conversations",
    "tokenize_documents",
    "tokenize_examples",
]
