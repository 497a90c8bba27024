"""Tests for fedjax_llm.data.preference_data: preference-pair files -> federated DPO data."""

import importlib.util
import json
import os
import re
import sys

import numpy as np
import pytest

pytest.importorskip("datasets")

from fedjax_llm.data import (  # noqa: E402
    CHATML_TEMPLATE,
    ByteTokenizer,
    ClientArrays,
    build_file_data,
    build_preference_data,
    tokenize_conversations,
)

FIELDS = ["chosen", "chosen_mask", "rejected", "rejected_mask"]
CATEGORIES = ["math", "words"]
BYTE = ByteTokenizer()


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pairs(num, users=4):
    """Record j: prompt 'question j', chosen 'yes j', rejected 'no j', user j % users."""
    return [
        {
            "prompt": f"question {j}",
            "chosen": f"yes {j}",
            "rejected": f"no {j}",
            "user": f"person{j % users}",
            "category": CATEGORIES[(j // users) % 2],
        }
        for j in range(num)
    ]


def build(path, **kwargs):
    kwargs = {
        "tokenizer": BYTE,
        "chat_template": CHATML_TEMPLATE,
        "seq_len": 96,
        "cache_dir": str(path.parent / ".cache"),
        **kwargs,
    }
    return build_preference_data(path, **kwargs)


def record_ids(rows, masks):
    """The record index j of each row, read from its prompt tokens ('question j')."""
    out = []
    for row, mask in zip(rows, masks, strict=True):
        prompt = BYTE.decode(row[: int(np.argmax(mask))].tolist())
        out.append(int(re.search(r"question (\d+)", prompt).group(1)))
    return out


def client_records(data: ClientArrays, m: int) -> list[int]:
    s, n = data.client_start[m], data.client_count[m]
    return record_ids(data.examples["chosen"][s : s + n], data.examples["chosen_mask"][s : s + n])


def test_rows_are_the_chat_template_rendering_with_masks_on_the_responses(tmp_path):
    data = build(write_jsonl(tmp_path / "p.jsonl", pairs(20)), client_column="user")
    parts = [data.examples, data.client_test.examples, data.eval]
    for part in parts:
        assert sorted(part) == FIELDS
        assert part["chosen"].dtype == part["rejected"].dtype == np.int32
        assert part["chosen_mask"].dtype == part["rejected_mask"].dtype == np.float32
        assert part["chosen"].shape == part["chosen_mask"].shape == part["rejected"].shape
        assert part["chosen"].shape[1] == 96
    seen = 0
    for part in parts:
        for j, c, cm, r, rm in zip(
            record_ids(part["chosen"], part["chosen_mask"]),
            part["chosen"],
            part["chosen_mask"],
            part["rejected"],
            part["rejected_mask"],
            strict=True,
        ):
            prompt = BYTE.encode(
                f"<|im_start|>user\nquestion {j}<|im_end|>\n<|im_start|>assistant\n"
            )
            for row, mask, answer in ((c, cm, f"yes {j}"), (r, rm, f"no {j}")):
                response = BYTE.encode(f"{answer}<|im_end|>\n") + [BYTE.eos_id]
                ids = prompt + response
                np.testing.assert_array_equal(row[: len(ids)], ids)
                assert not row[len(ids) :].any()  # padding
                expected = np.zeros(96, np.float32)
                expected[len(prompt) : len(ids)] = 1.0  # the response and the final eos
                np.testing.assert_array_equal(mask, expected)
            start = int(np.argmax(cm))
            assert start == int(np.argmax(rm)) == len(prompt)
            np.testing.assert_array_equal(c[:start], r[:start])  # the same prompt tokens
            seen += 1
    assert seen == 20


def test_message_lists_render_as_instruction_data_does(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    records = [
        {
            "prompt": [system, {"role": "user", "content": f"question {j}"}],
            "chosen": [{"role": "assistant", "content": f"yes {j}"}],
            "rejected": f"no {j}",
        }
        for j in range(10)
    ]
    records = [
        {**r, "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records
    ]
    data = build(write_jsonl(tmp_path / "chat.jsonl", records), seq_len=128)
    rows = data.examples
    for j, c, cm in zip(
        record_ids(rows["chosen"], rows["chosen_mask"]),
        rows["chosen"],
        rows["chosen_mask"],
        strict=True,
    ):
        conversation = records[j]["prompt"] + records[j]["chosen"]
        reference, _ = tokenize_conversations(
            [conversation], BYTE, 128, chat_template=CHATML_TEMPLATE
        )
        np.testing.assert_array_equal(c, reference.tokens[0])
        np.testing.assert_array_equal(cm, reference.loss_mask[0])
        assert "Be brief." in BYTE.decode(c.tolist())


def test_natural_partition_by_client_column(tmp_path):
    records = pairs(40) + [{**pairs(41)[40], "user": "loner"}]
    data = build(write_jsonl(tmp_path / "p.jsonl", records), client_column="user")
    stats = data.stats
    json.dumps(stats)
    assert stats["schema"] == "preference" and stats["task"] == "preference"
    assert stats["client_names"] == [f"person{u}" for u in range(4)]
    assert data.num_clients == data.client_test.num_clients == 4
    for m in range(4):
        for part in (data, data.client_test):
            assert {j % 4 for j in client_records(part, m)} == {m}
    np.testing.assert_array_equal(stats["client_num_train"], data.client_count)
    np.testing.assert_array_equal(stats["client_num_test"], data.client_test.client_count)
    assert min(stats["client_num_test"]) >= 1 and min(stats["client_num_train"]) >= 1
    # The loner's single pair is either the eval set's or a dropped client of 1 pair.
    in_eval = 40 in record_ids(data.eval["chosen"], data.eval["chosen_mask"])
    assert stats["dropped_clients"]["count"] == (0 if in_eval else 1)
    assert stats["num_records"] == 41 and stats["num_eval"] == round(0.1 * 41)
    assert stats["num_train"] + stats["num_client_test"] + stats["num_eval"] == 41 - (not in_eval)
    sub = build(tmp_path / "p.jsonl", client_column="user", num_clients=2, seed=1)
    assert sub.num_clients == 2 and sub.stats["unselected_clients"] == 2


def test_label_partitioner_splits_by_the_label_column(tmp_path):
    data = build(
        write_jsonl(tmp_path / "p.jsonl", pairs(64)),
        partitioner="pathological",
        partitioner_kwargs={"classes_per_client": 1},
        label_column="category",
        num_clients=4,
    )
    assert data.num_clients == 4 and data.stats["client_names"] is None
    assert data.stats["label_names"] == sorted(CATEGORIES)
    assert data.stats["labels_per_client_mean"] == 1.0
    for m in range(4):
        ids = client_records(data, m) + client_records(data.client_test, m)
        assert len({CATEGORIES[(j // 4) % 2] for j in ids}) == 1


def test_eval_and_client_test_are_disjoint_from_train(tmp_path):
    data = build(write_jsonl(tmp_path / "p.jsonl", pairs(50)), client_column="user", seed=3)
    train = {j for m in range(data.num_clients) for j in client_records(data, m)}
    test = {j for m in range(data.num_clients) for j in client_records(data.client_test, m)}
    held = set(record_ids(data.eval["chosen"], data.eval["chosen_mask"]))
    assert not train & test and not train & held and not test & held
    assert train | test | held == set(range(50))
    assert len(held) == 5 and len(test) == data.stats["num_client_test"]


def test_a_pair_that_does_not_fit_is_dropped_and_counted(tmp_path):
    records = pairs(30)
    records[7]["prompt"] = "question 7 " + "long " * 40  # no room for a response token
    data = build(write_jsonl(tmp_path / "p.jsonl", records), client_column="user", seq_len=96)
    kept = set(record_ids(data.examples["chosen"], data.examples["chosen_mask"]))
    kept |= set(
        record_ids(data.client_test.examples["chosen"], data.client_test.examples["chosen_mask"])
    )
    kept |= set(record_ids(data.eval["chosen"], data.eval["chosen_mask"]))
    assert kept == set(range(30)) - {7}
    assert data.stats["dropped_by_truncation"] == 1


@pytest.mark.parametrize(
    "change, match",
    [
        (
            {"chosen": "  "},
            r"^preference pairs: 'chosen' of record 2 of 'p.jsonl' is empty",
        ),
        (
            {"rejected": " yes 2\n"},
            r"^preference pairs: 'rejected' of record 2 of 'p.jsonl' is identical to 'chosen'",
        ),
    ],
)
def test_bad_pairs_name_the_record_and_column(tmp_path, change, match):
    records = pairs(8)
    records[2].update(change)
    with pytest.raises(ValueError, match=match) as info:
        build(write_jsonl(tmp_path / "p.jsonl", records))
    assert "\n" not in str(info.value)


def test_identical_message_lists_are_refused(tmp_path):
    records = [
        {
            "prompt": [{"role": "user", "content": f"q{j}"}],
            "chosen": [{"role": "assistant", "content": f"a{j}"}],
            "rejected": [{"role": "assistant", "content": f"b{j}" if j != 1 else " a1 "}],
        }
        for j in range(6)
    ]
    with pytest.raises(ValueError, match=r"'rejected' of record 1 of 'c.jsonl' is identical"):
        build(write_jsonl(tmp_path / "c.jsonl", records))


def test_every_pair_too_long_names_seq_len(tmp_path):
    with pytest.raises(ValueError, match=r"too long for seq_len=24 \(data.seq_len\)") as info:
        build(write_jsonl(tmp_path / "p.jsonl", pairs(8)), seq_len=24)
    assert "\n" not in str(info.value)


def test_build_file_data_still_refuses_pairs(tmp_path):
    with pytest.raises(ValueError, match="build_preference_data"):
        build_file_data(
            write_jsonl(tmp_path / "p.jsonl", pairs(8)),
            tokenizer=BYTE,
            seq_len=96,
            chat_template=CHATML_TEMPLATE,
            cache_dir=str(tmp_path / ".cache"),
        )


@pytest.mark.parametrize("format", ["auto", "preference"])
def test_build_data_routes_pairs_from_the_config_reading_once(tmp_path, monkeypatch, format):
    from fedjax_llm.config import DataConfig
    from fedjax_llm.data import loaders
    from fedjax_llm.simulation import build_data

    reads = []
    load_files = loaders._load_files
    monkeypatch.setattr(
        loaders, "_load_files", lambda *a, **k: reads.append(a) or load_files(*a, **k)
    )
    config = DataConfig(
        source="file",
        path=str(write_jsonl(tmp_path / "p.jsonl", pairs(24))),
        format=format,
        client_column="user",
        partitioner="natural",
        num_clients=None,
        seq_len=96,
        chat_template=CHATML_TEMPLATE,
    )
    data = build_data(config, BYTE)
    assert isinstance(data, ClientArrays) and len(reads) == 1
    assert data.stats["client_names"] == [f"person{u}" for u in range(4)]
    assert data.stats["test_fraction"] == config.test_fraction


@pytest.fixture(scope="module")
def example_script():
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "make_example_data.py")
    spec = importlib.util.spec_from_file_location("make_example_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_example_preference_file_builds(tmp_path, example_script):
    out = tmp_path / "example"
    args = ["--out", str(out), "--users", "6", "--examples", "30", "--pairs", "150"]
    assert example_script.main(args) == 0
    lines = (out / "preferences.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 150
    assert all(set(r) == {"prompt", "chosen", "rejected", "category", "user"} for r in records)
    assert all(r["chosen"].strip() != r["rejected"].strip() for r in records)
    data = build(
        out / "preferences.jsonl", client_column="user", seq_len=160, label_column="category"
    )
    users = {r["user"] for r in records}
    assert set(data.stats["client_names"]) <= users and data.num_clients >= 2
    assert data.stats["dropped_by_truncation"] == 0
    assert set(data.stats["label_names"]) == {r["category"] for r in records}
    # Non-IID by user: users differ in their category mix.
    assert data.stats["dominant_label_share_mean"] > max(
        data.stats["global_label_histogram"].values()
    ) / sum(data.stats["global_label_histogram"].values())


def test_a_config_run_trains_on_a_preference_file(tmp_path, make_config):
    from fedjax_llm.simulation import Simulation

    path = write_jsonl(tmp_path / "p.jsonl", pairs(48))
    config = make_config(
        model={"max_seq_len": 96},
        trainable={"mode": "lora", "lora_rank": 4},
        data={
            "source": "file",
            "path": str(path),
            "client_column": "user",
            "partitioner": "natural",
            "num_clients": None,
            "seq_len": 96,
            "chat_template": CHATML_TEMPLATE,
        },
        client={"objective": "dpo"},
        run={"num_rounds": 1, "num_clients_per_round": 2, "save_checkpoints": False},
    )
    sim = Simulation(config, verbose=False)
    assert isinstance(sim.data, ClientArrays) and sim.data.num_clients == 4
    history = sim.run()
    assert np.isfinite(history[-1]["train_loss"])
    with open(os.path.join(config.run.output_dir, "partition.json")) as f:
        partition = json.load(f)
    assert partition["schema"] == "preference"
    assert partition["client_names"] == [f"person{u}" for u in range(4)]
