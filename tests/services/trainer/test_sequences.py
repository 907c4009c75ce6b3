"""Variable-length sequences (issue 16): data.sequence, padding and masking, exports with a free time axis.

Sequences generated here (tests/services/trainer/sequence_data.py: is a random-length sequence's sum
positive?) are uploaded through the trainer's dataset API, a Parquet list column and a long-format
CSV, and trained by the real trainer (API + Celery worker) with LSTM, GRU (bidirectional) and the
transformer encoder: each beats chance clearly on its test sequences and is registered with a
signature whose input has a free time axis, NaN-padded. The models' answers do not depend on padding
(a sequence alone equals it padded in a batch with longer ones, in PyTorch, ONNX Runtime and
TorchScript); bad specs and bad data are refused with messages that name what is wrong.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from services.trainer.app import create_app
from services.trainer.engines import engine, export
from services.trainer.jobs.schemas import JobCreate
from shipyard_common.auth import Role
from shipyard_common.errors import InvalidInput
from tests.services.registry.model_factory import unique_name
from tests.services.trainer.sequence_data import list_column_frame, long_format_frame, random_sequences
from tests.services.trainer.support import WorkerProcess, job_spec, trainer_settings
from tests.support import auth, running_app, test_platform, wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAINER, VIEWER = auth(Role.TRAINER), auth("viewer")
LSTM = {"type": "lstm", "hidden_size": 32}
GRU = {"type": "gru", "hidden_size": 24, "bidirectional": True}
TRANSFORMER = {"type": "transformer_encoder", "d_model": 32, "nhead": 4, "num_layers": 1,
               "dim_feedforward": 64, "dropout": 0.0}
LIST_SEQUENCE = {"column": "steps"}
LONG_SEQUENCE = {"id": "id", "step": "t", "features": ["x", "noise"]}
SPLIT = {"train": 0.7, "validation": 0.15, "test": 0.15, "seed": 3}


def sequence_spec(*, rev: str, dataset: str, model: dict[str, Any], sequence: dict[str, Any],
                  **changes: Any) -> dict[str, Any]:
    defaults = {"data__target": "sign", "data__sequence": dict(sequence), "data__split": dict(SPLIT),
                "training__epochs": 8, "training__learning_rate": 0.01, "exports": ["onnx", "torchscript"]}
    return job_spec(rev=rev, dataset=dataset, model=dict(model), **{**defaults, **changes})


def submit(base: str, spec: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{base}/jobs", json=spec, headers=TRAINER)


def wait_until_ended(base: str, job_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        job: dict[str, Any] = httpx.get(f"{base}/jobs/{job_id}", headers=VIEWER).json()
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(ended, timeout=600, interval=0.5, what="the training job to end")  # type: ignore[no-any-return]


def upload(base: str, name: str, frame: pd.DataFrame, *, parquet: bool) -> str:
    body = frame.to_parquet() if parquet else frame.to_csv(index=False).encode()
    kind = "application/vnd.apache.parquet" if parquet else "text/csv"
    added = httpx.post(f"{base}/datasets/{name}", content=body, headers={**TRAINER, "content-type": kind},
                       timeout=120)
    assert added.status_code == 201, added.text
    return str(added.json()["rev"])


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, mlflow_server: str
) -> Iterator[dict[str, Any]]:
    """Three sequence models trained through the API and a worker: LSTM on a Parquet list column, a
    bidirectional GRU and the transformer encoder on long format; and a job whose data is wrong."""
    state = tmp_path_factory.mktemp("sequences")
    platform = test_platform(state, redis_url=redis_url, mlflow_tracking_uri=mlflow_server)
    settings = trainer_settings(platform)
    worker = WorkerProcess(settings, state / "worker.log")
    wrong = long_format_frame(30, seed=9)
    first = wrong["id"] == "s00000"
    wrong.loc[first, "sign"] = np.resize(["positive", "negative"], int(first.sum()))  # varies in one id
    try:
        with running_app(create_app(settings)) as base:
            revs = {"list": upload(base, "seq_list", list_column_frame(700, seed=1), parquet=True),
                    "long": upload(base, "seq_long", long_format_frame(700, seed=2), parquet=False),
                    "wrong": upload(base, "seq_wrong", wrong, parquet=False)}
            specs = {
                "lstm": sequence_spec(rev=revs["list"], dataset="seq_list", model=LSTM,
                                      sequence=LIST_SEQUENCE, model_name=unique_name("seq-lstm")),
                "gru": sequence_spec(rev=revs["long"], dataset="seq_long", model=GRU, sequence=LONG_SEQUENCE,
                                     model_name=unique_name("seq-gru")),
                "transformer": sequence_spec(rev=revs["long"], dataset="seq_long", model=TRANSFORMER,
                                             sequence=LONG_SEQUENCE, model_name=unique_name("seq-tf")),
                "wrong": sequence_spec(rev=revs["wrong"], dataset="seq_wrong", model=LSTM,
                                       sequence=LONG_SEQUENCE, model_name=unique_name("seq-wrong")),
            }
            ids = {}
            for key, spec in specs.items():
                created = submit(base, spec)
                assert created.status_code == 201, created.text
                ids[key] = created.json()["id"]
            jobs = {key: wait_until_ended(base, job_id) for key, job_id in ids.items()}
            yield {"base": base, "jobs": jobs, "worker": worker, "revs": revs, "mlflow": mlflow_server}
    finally:
        worker.stop()


@pytest.mark.parametrize("key", ["lstm", "gru", "transformer"])
def test_each_sequence_model_trains_beats_chance_and_is_registered(trained, key, tmp_path: Path):
    job = trained["jobs"][key]
    assert job["state"] == "succeeded", (job["error"], trained["worker"].log_tail())
    assert job["metrics"]["test_accuracy"] >= 0.8, job["metrics"]  # chance: about 0.5
    assert job["model_version"] is not None
    client = MlflowClient(tracking_uri=trained["mlflow"], registry_uri=trained["mlflow"])
    folder = Path(client.download_artifacts(job["mlflow_run_id"], "model", str(tmp_path)))
    signature = json.loads((folder / "signature.json").read_text())
    width = 1 if key == "lstm" else 2
    assert signature["inputs"] == [{"name": "input", "shape": [None, None, width], "dtype": "float32",
                                    "nullable": True}]
    assert signature["sequence"] == {"padding": "nan", "max_length": 20}
    assert signature["features"] == (["steps"] if key == "lstm" else ["x", "noise"])
    assert signature["labels"] == ["negative", "positive"]
    # The registered ONNX file scores ragged sequences: each alone equals it padded among longer ones.
    session = ort.InferenceSession(str(folder / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    sequences = [s.astype(np.float32) for s in random_sequences(6, seed=40, width=width)]
    alone = np.concatenate([session.run(None, {"input": s[None]})[0] for s in sequences])
    (together,) = session.run(None, {"input": padded(sequences)})
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_a_target_that_varies_within_an_id_fails_the_job_naming_the_id(trained):
    job = trained["jobs"]["wrong"]
    assert job["state"] == "failed"
    assert "must be constant within each sequence" in job["error"], job["error"]
    assert "'s00000'" in job["error"], job["error"]


def padded(sequences: list[np.ndarray], length: int | None = None) -> np.ndarray:
    longest = length or max(len(s) for s in sequences)
    batch = np.full((len(sequences), longest, sequences[0].shape[1]), np.nan, dtype=np.float32)
    for index, sequence in enumerate(sequences):
        batch[index, : len(sequence)] = sequence
    return batch


def prepared(model: dict[str, Any], frame: pd.DataFrame, sequence: dict[str, Any], **changes: Any) -> Any:
    spec = JobCreate.model_validate(sequence_spec(rev="0" * 40, dataset="seqs", model=model,
                                                  sequence=sequence, **changes))
    return spec, engine.prepare_data(frame, spec)


def ragged_batch() -> tuple[np.ndarray, list[np.ndarray]]:
    """The shortest of a few sequences of width 2, and a batch of it with longer ones (20 steps too)."""
    sequences = [s.astype(np.float32) for s in random_sequences(8, seed=6, width=2)]
    short = sequences[int(np.argmin([len(s) for s in sequences]))]
    return short, [short, *sequences, np.ones((20, 2), np.float32)]


@pytest.mark.parametrize("model", [LSTM, GRU, {**GRU, "num_layers": 2, "hidden_size": 8}, TRANSFORMER,
                                   {**LSTM, "bidirectional": True, "num_layers": 2}],
                         ids=["lstm", "bigru", "bigru-2", "transformer", "bilstm-2"])
def test_padding_does_not_change_a_sequence_s_answer(model):
    spec, data = prepared(model, long_format_frame(60, seed=5), LONG_SEQUENCE)
    net = engine.build_model(data, spec).eval()
    short, batch = ragged_batch()
    with torch.no_grad():
        alone = net(torch.from_numpy(short[None])).numpy()
        together = net(torch.from_numpy(padded(batch))).numpy()
        further = net(torch.from_numpy(padded(batch, length=26))).numpy()  # padding past max_length too
    np.testing.assert_allclose(together[0], alone[0], atol=1e-5)
    np.testing.assert_allclose(further, together, atol=1e-5)


@pytest.mark.parametrize("model", [{**GRU, "num_layers": 2, "hidden_size": 8}, TRANSFORMER],
                         ids=["bigru-2", "transformer"])
def test_onnx_and_torchscript_exports_take_any_length_and_ignore_padding(model, tmp_path: Path):
    """(The trained models' ONNX files are checked the same way above, for every model type.)"""
    spec, data = prepared(model, long_format_frame(60, seed=5), LONG_SEQUENCE)
    net = engine.build_model(data, spec).eval()
    short, batch = ragged_batch()
    with torch.no_grad():
        probabilities = torch.softmax(net(torch.from_numpy(padded(batch))), dim=1).numpy()
    example = export.example_input(data)
    onnx_file = export.export_onnx(net, task=data.task, example=example, path=tmp_path / "m.onnx",
                                   check_rows=data.x_val, classes=data.classes)
    session = ort.InferenceSession(str(onnx_file.path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": padded(batch)})[0], probabilities, atol=1e-5)
    np.testing.assert_allclose(session.run(None, {"input": short[None]})[0][0], probabilities[0], atol=1e-5)
    traced = export.export_torchscript(net, task=data.task, example=example, path=tmp_path / "m.pt",
                                       check_rows=data.x_val, classes=data.classes)
    loaded = torch.jit.load(str(traced.path))
    with torch.no_grad():
        np.testing.assert_allclose(loaded(torch.from_numpy(short[None])).numpy()[0], probabilities[0],
                                   atol=1e-5)
    for signature in (onnx_file.signature, traced.signature):
        assert signature["inputs"] == [{"name": "input", "shape": [None, None, 2], "dtype": "float32",
                                        "nullable": True}]
        assert signature["sequence"] == {"padding": "nan", "max_length": int(data.x_train.shape[1])}


@pytest.mark.parametrize("model", [LSTM, GRU, TRANSFORMER], ids=["lstm", "bigru", "transformer"])
def test_a_sequence_longer_than_the_longest_trained_on_answers_as_its_first_steps(model):
    """The graph reads the first max_length steps of a longer sequence, as training truncated (serving
    refuses such a sequence with a 4xx naming both lengths rather than answer without its end)."""
    spec, data = prepared(model, long_format_frame(60, seed=5), LONG_SEQUENCE)
    net = engine.build_model(data, spec).eval()
    longest = int(data.x_train.shape[1])
    sequence = np.random.default_rng(8).normal(size=(longest + 7, 2)).astype(np.float32)
    with torch.no_grad():
        whole = net(torch.from_numpy(sequence[None])).numpy()
        first = net(torch.from_numpy(sequence[None, :longest])).numpy()
    np.testing.assert_allclose(whole, first, atol=1e-5)


def test_a_real_sequence_s_answer_depends_on_every_real_step():
    """The invariance above is not vacuous: changing a real step (not padding) changes the answer."""
    spec, data = prepared(LSTM, long_format_frame(40, seed=5), LONG_SEQUENCE)
    net = engine.build_model(data, spec).eval()
    sequence = random_sequences(1, seed=7, width=2)[0].astype(np.float32)
    changed = sequence.copy()
    changed[-1, 0] += 3.0
    with torch.no_grad():
        answers = net(torch.from_numpy(padded([sequence, changed]))).numpy()
    assert np.abs(answers[0] - answers[1]).max() > 1e-4


def test_sequence_length_truncates_and_is_inferred_from_the_training_sequences():
    frame = list_column_frame(50, seed=3)
    _, inferred = prepared(LSTM, frame, LIST_SEQUENCE)
    lengths = [len(frame["steps"][i]) for i in inferred.rows["train"]]
    assert inferred.x_train.shape[1:] == (max(lengths), 1)
    _, truncated = prepared({**LSTM, "sequence_length": 5}, frame, LIST_SEQUENCE)
    assert truncated.x_train.shape[1:] == (5, 1)
    first = inferred.rows["train"][0]
    np.testing.assert_array_equal(truncated.x_train[0, :, 0],
                                  np.asarray(frame["steps"][first][:5], np.float32))
    # A list column read back from CSV (JSON text) gives the same arrays as the lists themselves.
    as_text = frame.assign(steps=[json.dumps(s) for s in frame["steps"]])
    np.testing.assert_array_equal(prepared(LSTM, as_text, LIST_SEQUENCE)[1].x_train, inferred.x_train)


def test_long_format_orders_steps_and_keeps_one_label_per_id():
    frame = long_format_frame(20, seed=4)
    _, data = prepared(GRU, frame, LONG_SEQUENCE)
    everything = np.concatenate([data.x_train, data.x_val, data.x_test])
    assert len(everything) == 20
    first = frame[frame["id"] == "s00000"].sort_values("t")[["x", "noise"]].to_numpy(np.float32)
    position = (data.rows["train"] + data.rows["validation"] + data.rows["test"]).index(0)
    row = everything[position]
    np.testing.assert_array_equal(row[: len(first)], first)
    assert np.isnan(row[len(first):]).all()


@pytest.mark.parametrize(("frame", "sequence", "message"), [
    (pd.DataFrame({"steps": ["[1, 2]", "[]"] * 10, "sign": ["a", "b"] * 10}), LIST_SEQUENCE,
     "row 1 of column 'steps' is an empty sequence"),
    (pd.DataFrame({"steps": ["[[1, 2], [3, 4]]", "[[1, 2, 3]]"] * 10, "sign": ["a", "b"] * 10}),
     LIST_SEQUENCE,
     "row 1 of column 'steps' has steps of 3 values; row 0's have 2"),
    (pd.DataFrame({"steps": ["[1, 2]", "one, two"] * 10, "sign": ["a", "b"] * 10}), LIST_SEQUENCE,
     "row 1 of column 'steps' is 'one, two', not a list of numbers"),
    (pd.DataFrame({"steps": ["[1, NaN]", "[1]"] * 10, "sign": ["a", "b"] * 10}), LIST_SEQUENCE,
     "row 0 of column 'steps' holds a missing or infinite value"),
    (pd.DataFrame({"id": [1, 1, 2], "t": [0, 0, 0], "x": [1.0, 2.0, 3.0], "noise": 0.0,
                   "sign": ["a", "a", "b"]}),
     LONG_SEQUENCE, "id 1 has step 0 more than once"),
    (pd.DataFrame({"id": [1, 1, 2], "t": [0, 1, 0], "x": [1.0, 2.0, 3.0], "noise": 0.0,
                   "sign": ["a", "b", "b"]}),
     LONG_SEQUENCE, "column 'sign' must be constant within each sequence (one value per 'id'); "
     "it varies within id(s) [1]"),
    (pd.DataFrame({"id": [1, 2], "step": [0, 0], "x": [1.0, 2.0], "noise": 0.0, "sign": ["a", "b"]}),
     LONG_SEQUENCE, "has no column(s) ['t']"),
])
def test_bad_sequence_data_is_refused_with_a_message_that_names_the_problem(frame, sequence, message):
    with pytest.raises(InvalidInput) as refused:
        prepared(LSTM, frame, sequence)
    assert message in refused.value.message


@pytest.mark.parametrize(("changes", "message"), [
    ({"model": {"type": "mlp", "hidden": [8]}},
     "data.sequence (variable-length sequences) needs model.type one of "
     "['lstm', 'gru', 'transformer_encoder']"),
    ({"data__sequence": {"id": "id"}}, "long format needs both data.sequence.id and data.sequence.step"),
    ({"data__sequence": {"column": "steps", "id": "id", "step": "t"}}, "either 'column'"),
    ({"data__sequence": {"column": "steps", "features": ["x"]}}, "data.sequence.features is for long format"),
    ({"data__sequence": {"column": "sign"}}, "data.sequence names ['sign'], the target or the split column"),
    ({"data__features": ["steps"]}, "name each step's columns in data.sequence.features"),
    ({"exports": ["onnx", "onnx_int8"]}, "not 'onnx_int8'"),
    ({"data__sequence": None}, "model.lstm.sequence_length"),  # required without data.sequence, as before
    ({"data__sequence": None, "model": {**LSTM, "sequence_length": None}},
     "model.sequence_length is required for fixed-width rows"),
])
def test_specs_that_cannot_read_sequences_are_a_422_that_says_why(trained, changes, message):
    changes = dict(changes)
    model = changes.pop("model", LSTM)
    spec = sequence_spec(rev=trained["revs"]["list"], dataset="seq_list", model=model, sequence=LIST_SEQUENCE,
                         model_name="seq-refused", **changes)
    refused = submit(trained["base"], spec)
    assert refused.status_code == 422, refused.text
    assert message in refused.text, refused.text


def test_a_parquet_list_column_is_versioned_as_json_lists_that_read_back_exactly():
    from shipyard_common.datasets.repo import lists_as_json

    frame = list_column_frame(5, seed=1)
    stored = pd.read_csv(io.BytesIO(lists_as_json(pd.read_parquet(io.BytesIO(frame.to_parquet())))
                                    .to_csv(index=False).encode()))
    assert [json.loads(cell) for cell in stored["steps"]] == frame["steps"].tolist()


def exported_in_turn(tmp_path: Path) -> Iterator[tuple[str, Any, Any, Any, Any]]:
    """Sequence models exported one after another in this process, as a worker exports its jobs' models
    (issue 16: a later export once fixed the time axis): each model's name, data, module, ONNX and
    TorchScript files. Lists and long format; equal-length sequences of 1 and of 2 steps too (the
    example's length then equals its batch and width)."""
    cases: list[tuple[str, dict[str, Any], pd.DataFrame, dict[str, Any]]] = [
        ("list-lstm", LSTM, list_column_frame(40, seed=1), LIST_SEQUENCE),
        ("long-lstm", LSTM, long_format_frame(40, seed=2), LONG_SEQUENCE),
        ("long-lstm-2", {**LSTM, "num_layers": 2}, long_format_frame(40, seed=3), LONG_SEQUENCE),
        ("long-gru", {"type": "gru", "hidden_size": 8}, long_format_frame(40, seed=4), LONG_SEQUENCE),
        ("long-bigru", GRU, long_format_frame(40, seed=5), LONG_SEQUENCE),
        ("long-transformer", TRANSFORMER, long_format_frame(40, seed=6), LONG_SEQUENCE),
        ("two-steps-lstm", LSTM, long_format_frame(40, seed=7, lengths=(2, 2)), LONG_SEQUENCE),
        ("one-step-gru", GRU, long_format_frame(40, seed=8, lengths=(1, 1)), LONG_SEQUENCE),
        ("cut-lstm", {**LSTM, "sequence_length": 6}, long_format_frame(40, seed=9), LONG_SEQUENCE)]
    for name, model, frame, sequence in cases:
        spec, data = prepared(model, frame, sequence)
        net = engine.build_model(data, spec).eval()
        example = export.example_input(data)
        folder = tmp_path / name
        onnx_file = export.export_onnx(net, task=data.task, example=example, path=folder / "m.onnx",
                                       check_rows=data.x_val, classes=data.classes)
        traced = export.export_torchscript(net, task=data.task, example=example, path=folder / "m.pt",
                                           check_rows=data.x_val, classes=data.classes)
        yield name, data, export.ServingModule(net, data.task).eval(), onnx_file, traced


def test_every_sequence_export_keeps_a_free_time_axis_and_answers_any_length(tmp_path: Path):
    """The ONNX input's time dimension is symbolic (dim_param), and ONNX Runtime and TorchScript answer
    sequences of 1 step, of max_length steps and of a length in between as PyTorch does, alone and in a
    batch; the signature says what the file does."""
    import onnx

    for name, data, module, onnx_file, traced in exported_in_turn(tmp_path):
        dims = onnx.load(str(onnx_file.path)).graph.input[0].type.tensor_type.shape.dim
        assert [bool(dim.dim_param) for dim in dims] == [True, True, False], (name, dims)
        assert dims[2].dim_value == data.x_train.shape[2], name
        max_length = int(data.x_train.shape[1])
        assert onnx_file.signature["sequence"]["max_length"] == max_length, name
        assert onnx_file.signature["inputs"][0]["shape"] == [None, None, data.x_train.shape[2]], name
        session = ort.InferenceSession(str(onnx_file.path), providers=["CPUExecutionProvider"])
        loaded = torch.jit.load(str(traced.path))
        width = int(data.x_train.shape[2])
        for steps in sorted({1, max(1, max_length // 2), max_length}):
            for batch in (1, 3):
                rows = np.random.default_rng(steps * 10 + batch).normal(size=(batch, steps, width))
                rows = rows.astype(np.float32)
                with torch.no_grad():
                    expected = module(torch.from_numpy(rows)).numpy()
                    scripted = loaded(torch.from_numpy(rows)).numpy()
                np.testing.assert_allclose(session.run(None, {"input": rows})[0], expected, atol=1e-5,
                                           err_msg=f"{name}: ONNX, {batch} x {steps} steps")
                np.testing.assert_allclose(scripted, expected, atol=1e-5,
                                           err_msg=f"{name}: TorchScript, {batch} x {steps} steps")
