import json
import random
from collections import Counter

import pytest

from codetune.core.config import DataConfig, DataSource
from codetune.core.data import Examples, prepare_data
from codetune.core.data.code_tree import functions_in_source, read_code_tree
from codetune.core.data.prepare import select_examples, split_examples
from codetune.core.data.profile import function_key
from codetune.core.data.records import code_without_docstring
from codetune.core.errors import DataError
from tests.conftest import write_jsonl


def test_code_tree_pairs_code_without_docstring_with_first_paragraph(code_tree):
    dropped = Counter()
    examples = {e["summary"]: e for e in read_code_tree(code_tree, dropped)}
    assert set(examples) == {"Return the area of a rectangle.", "Compute the circumference of the circle."}
    area = examples["Return the area of a rectangle."]["code"]
    assert area.startswith("def area(width, height):") and "positive" not in area and '"""' not in area
    assert "return width * height" in area
    method = examples["Compute the circumference of the circle."]["code"]
    assert method.startswith("def circumference(self):")  # dedented out of the class
    assert dropped["unparsable_file"] == 1  # broken.py; tests/ is never read


def test_one_line_functions_are_skipped():
    assert list(functions_in_source('def f(): "Doc string here."\n')) == []


def test_codesearchnet_code_has_its_docstring_stripped():
    code = 'def add(a, b):\n    """Add two numbers.\n\n    More."""\n    return a + b\n'
    assert code_without_docstring(code, "Add two numbers.\n\n    More.") == "def add(a, b):\n    return a + b\n"


def _cfg(tmp_path, **kw) -> DataConfig:
    base = dict(
        source=DataSource.files,
        cache_dir=str(tmp_path / "cache"),
        min_summary_words=1,
        validation_fraction=0.2,
        test_fraction=0.2,
    )
    return DataConfig(**(base | kw))


def _rows(n):
    return [{"code": f"def f{i}(x):\n    return x + {i}\n", "docstring": f"Add {i} to the value x."} for i in range(n)]


def test_reads_codesearchnet_token_fields(tmp_path):
    rows = [
        {
            "code_tokens": ["def", "f", "(", ")", ":", "return", str(i)],
            "docstring_tokens": ["Return", "the", "number", str(i)],
        }
        for i in range(40)
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = prepare_data(
        _cfg(tmp_path, path=str(path), input_field="code_tokens", target_field="docstring_tokens"), Examples.pairs
    )
    example = data.load("train")[0]
    assert example["code"].startswith("def f ( ) :") and example["summary"].startswith("Return the number")


def test_csv_and_parquet_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(40)
    with open(tmp_path / "a.csv", "w", newline="") as f:
        import csv

        w = csv.DictWriter(f, fieldnames=["code", "docstring"])
        w.writeheader()
        w.writerows(rows[:20])
    pq.write_table(pa.Table.from_pylist(rows[20:]), tmp_path / "b.parquet")
    data = prepare_data(_cfg(tmp_path, path=str(tmp_path)), Examples.pairs)
    assert sum(data.counts["kept"].values()) == 40


def test_malformed_row_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(3) + ["{not json", {"code": "x = 1"}])
    with pytest.raises(DataError, match=r"d.jsonl:4: not valid JSON.*data.skip_invalid=true"):
        prepare_data(_cfg(tmp_path, path=str(path)), Examples.pairs)


def test_undecodable_and_oversized_rows_name_file_and_line_and_honour_skip_invalid(tmp_path):
    import csv

    good = _rows(30)
    lines = [json.dumps(r).encode() for r in good[:10]]
    (tmp_path / "a.jsonl").write_bytes(
        b"\n".join(lines[:5] + [b'{"code": "\xff\xfe", "docstring": "Bad bytes."}'] + lines[5:])
    )
    with open(tmp_path / "b.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["code", "docstring"])
        writer.writeheader()
        writer.writerows(good[10:])
        long_function = "def f(x):\n" + "    x += 1\n" * 20_000  # 240 KB: over the csv module's default field limit
        writer.writerow({"code": long_function, "docstring": "Add one many times over."})
    with open(tmp_path / "b.csv", "ab") as f:
        f.write(b'"def g(): pass","caf\xe9 is not UTF-8"\n')
    with pytest.raises(DataError, match=r"a.jsonl:6: not UTF-8 text.*data.skip_invalid=true"):
        prepare_data(_cfg(tmp_path, path=str(tmp_path / "a.jsonl")), Examples.pairs)
    with pytest.raises(DataError, match=r"b.csv:\d+: not UTF-8 text"):
        prepare_data(_cfg(tmp_path, path=str(tmp_path / "b.csv")), Examples.pairs)
    data = prepare_data(_cfg(tmp_path, path=str(tmp_path), skip_invalid=True, max_code_lines=30_000), Examples.pairs)
    assert data.counts["dropped"]["invalid_row"] == 2 and data.counts["read"] == 31  # the long function is read


def test_missing_field_names_the_field_and_the_setting(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"source": "def f(): pass", "docstring": "Do it."}])
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field 'code'.*data.input_field"):
        prepare_data(_cfg(tmp_path, path=str(path)), Examples.pairs)


def test_skip_invalid_counts_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(40) + ["{not json", {"code": 3, "docstring": "x y z"}])
    data = prepare_data(_cfg(tmp_path, path=str(path), skip_invalid=True), Examples.pairs)
    assert data.counts["dropped"]["invalid_row"] == 2
    assert data.counts["read"] == 40


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no data files at data.path"):
        prepare_data(_cfg(tmp_path, path=str(tmp_path / "nothing.jsonl")), Examples.pairs)


def test_split_is_independent_of_order_and_drops_duplicates_and_leaks():
    cfg = DataConfig(validation_fraction=0.2, test_fraction=0.2)
    examples = [{"code": f"def f{i}():\n    return {i}\n", "summary": f"Return {i}."} for i in range(200)]
    shuffled = examples[:]
    random.Random(1).shuffle(shuffled)
    first, second = (
        split_examples(select_examples(examples + examples[:5], None, c1 := Counter()), cfg, c1),
        split_examples(select_examples(shuffled, None, c2 := Counter()), cfg, c2),
    )
    assert first == second
    assert c1["duplicate"] == 5
    assert all(len(first[s]) > 20 for s in first)
    # Same code, reworded summary: a different example, but its code would leak into evaluation. The split is by
    # content hash, so the wording is chosen to land the leak in train.
    twin = first["test"][0]
    for attempt in range(100):
        leak = {"code": twin["code"].replace("\n", "\n\n"), "summary": f"Another wording of it ({attempt})."}
        counts = Counter()
        again = split_examples(select_examples(examples + [leak], None, counts), cfg, counts)
        if any(e["summary"] == leak["summary"] for e in again["train"]):
            break
    assert any(e["summary"] == leak["summary"] for e in again["train"])
    assert counts["test_code_in_train"] == 1 and twin not in again["test"]


def test_prepared_splits_are_cached_by_content(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(60))
    cfg = _cfg(tmp_path, path=str(path))
    first = prepare_data(cfg, Examples.pairs)
    manifest = json.loads((tmp_path / "cache" / first.fingerprint[:16] / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == first.counts["kept"]
    assert prepare_data(cfg, Examples.pairs).directory == first.directory
    write_jsonl(path, _rows(61))
    assert prepare_data(cfg, Examples.pairs).fingerprint != first.fingerprint


def test_the_data_stage_profiles_its_splits_for_the_monitor_and_adds_profiles_to_older_caches(tmp_path):
    cfg = _cfg(tmp_path, path=str(write_jsonl(tmp_path / "d.jsonl", _rows(60))))
    data = prepare_data(cfg, Examples.pairs)
    profile = json.loads(data.profile_path.read_text())
    every_split = [ex for split in ("train", "validation", "test") for ex in data.load(split)]
    assert profile["code_hashes"] == sorted(function_key(ex["code"]) for ex in every_split)
    assert len(profile["code_tokens"]) == data.counts["kept"]["train"]
    data.profile_path.unlink()  # a cache entry written before profiles were
    assert json.loads(prepare_data(cfg, Examples.pairs).profile_path.read_text()) == profile


def test_stdlib_default_yields_thousands_of_pairs(stdlib_cache):
    data = prepare_data(DataConfig(cache_dir=str(stdlib_cache)), Examples.pairs)
    assert data.counts["read"] > 5000
    assert data.counts["kept"]["test"] > 200
    assert not any("/test" in e["origin"] or e["origin"].startswith("test") for e in data.load("train"))


def test_labelled_rows_read_codexglue_defect_format(tmp_path):
    rows = [{"func": f"int f{i}(int x) {{ return x + {i}; }}", "target": i % 2, "idx": i} for i in range(60)]
    path = write_jsonl(tmp_path / "devign.jsonl", rows)
    data = prepare_data(_cfg(tmp_path, path=str(path), input_field="func", label_field="target"), Examples.labelled)
    train = data.load("train")
    assert {r["label"] for r in train} == {"0", "1"} and "summary" not in train[0]
    assert sum(data.counts["kept"].values()) == 60


@pytest.mark.parametrize(
    "name, split",
    [
        ("python/final/jsonl/train/python_train_0.jsonl.gz", "train"),
        ("code-to-text/python/valid.jsonl", "validation"),
        ("test.jsonl", "test"),
        ("dev", "validation"),
        ("functions.jsonl", None),
        ("contest/data.jsonl", None),
    ],
)
def test_split_names_of_published_datasets(name, split):
    from codetune.core.data.records import split_of

    assert split_of(name) == split


def test_published_splits_are_kept_and_leakage_still_removed(tmp_path):
    """CodeXGLUE ships train/valid/test files: its test split stays the test split, so scores compare with published
    ones."""
    rows = _rows(90)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", rows[:60])
    write_jsonl(tmp_path / "data" / "valid.jsonl", rows[60:70])
    # The last test row repeats a train function under another summary: it would be scored on recall.
    write_jsonl(
        tmp_path / "data" / "test.jsonl", rows[70:] + [{"code": rows[0]["code"], "docstring": "Another wording of it."}]
    )
    data = prepare_data(_cfg(tmp_path, path=str(tmp_path / "data")), Examples.pairs)
    codes = {split: {r["code"] for r in data.load(split)} for split in ("train", "validation", "test")}
    assert codes["test"] == {r["code"] for r in rows[70:]}
    assert codes["validation"] == {r["code"] for r in rows[60:70]} and codes["train"] == {r["code"] for r in rows[:60]}
    assert data.counts["dropped"]["test_code_in_train"] == 1
    assert (
        json.loads((tmp_path / "cache" / data.fingerprint[:16] / "manifest.json").read_text())["split_by"]
        == "published splits"
    )

    # Without a test file there is nothing published to keep: content-hash splitting, as for any other source.
    (tmp_path / "data" / "test.jsonl").unlink()
    data = prepare_data(_cfg(tmp_path, path=str(tmp_path / "data")), Examples.pairs)
    assert data.counts["kept"]["test"] > 0 and "published_split" not in data.load("train")[0]


def test_max_examples_is_the_same_subset_as_sorting_everything():
    examples = [{"code": f"def f{i}():\n    return {i}\n", "summary": f"Return {i}."} for i in range(500)]
    chosen = select_examples(examples, 50, dropped := Counter())
    every = select_examples(examples, None, Counter())
    assert sorted(chosen) == sorted(sorted(every, key=lambda key: key[16:32])[:50])
    assert dropped["over_max_examples"] == 450


def _peak_preparing(tmp_path, suffix: str, rows: int) -> tuple[int, int]:
    """(peak traced memory while preparing a source of `rows` incompressible rows, the source's size in bytes)."""
    import gc
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    noise = random.Random(rows)
    source = [
        {"code": f"def f{i}(x):\n    # {noise.randbytes(1000).hex()}\n    return x + {i}\n", "docstring": f"Add {i}."}
        for i in range(rows)
    ]
    directory = tmp_path / str(rows)
    directory.mkdir()
    path = directory / f"train{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, source)
    else:
        pq.write_table(pa.Table.from_pylist(source), path, row_group_size=1000)
    del source
    gc.collect()
    tracemalloc.start()
    data = prepare_data(_cfg(directory, path=str(path), max_examples=100), Examples.pairs)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sum(data.counts["kept"].values()) == 100
    return peak, path.stat().st_size


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_large_source_is_streamed_not_held(tmp_path, suffix):
    """Memory follows max_examples, not the source: four times the source costs a small fraction of the extra bytes
    (a 32-byte digest per distinct row, for deduplication). Measured as a difference, so what the process allocates
    once (and what earlier tests left behind) cancels out."""
    _peak_preparing(tmp_path, suffix, 200)  # first use of the readers
    small_peak, small_size = _peak_preparing(tmp_path, suffix, 2000)
    large_peak, large_size = _peak_preparing(tmp_path, suffix, 8000)
    grown, extra = large_peak - small_peak, large_size - small_size
    assert grown < extra / 4, f"{grown >> 10} KiB more memory for {extra >> 10} KiB more source"


def test_a_tests_field_travels_with_each_example(tmp_path):
    rows = [
        {
            "code": f"def add_{i}(x):\n    return x + {i}",
            "text": f"Add {i} to x and return it.",
            "test_list": [f"assert add_{i}(1) == {1 + i}", f"assert add_{i}(0) == {i}"],
        }
        for i in range(40)
    ]
    path = write_jsonl(tmp_path / "mbpp.jsonl", rows)
    data = prepare_data(_cfg(tmp_path, path=str(path), target_field="text", tests_field="test_list"), Examples.pairs)
    example = data.load("train")[0]
    i = example["code"].split("_")[1].split("(")[0]
    assert example["tests"] == f"assert add_{i}(1) == {1 + int(i)}\nassert add_{i}(0) == {i}"
    without = write_jsonl(tmp_path / "d.jsonl", [{"code": "def f(): pass", "text": "Do it now please."}])
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field 'test_list'.*data.tests_field"):
        prepare_data(_cfg(tmp_path, path=str(without), target_field="text", tests_field="test_list"), Examples.pairs)
