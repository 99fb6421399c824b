"""Checkpoint files: atomic writes, safe loading, and refusal of checkpoints of another run."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, write_slice

from pipeline import checkpoint
from pipeline.checkpoint import (
    CheckpointError,
    check_matches,
    load_checkpoint,
    remove_temp_files,
    save_checkpoint,
    temp_files,
)
from pipeline.data import BUNDLED
from pipeline.runner import evaluate_checkpoint, train

ML100K = BUNDLED["ml-100k"] / "ml-100k.inter"
TINY = dict(TINY_RUN)


pytestmark = pytest.mark.usefixtures("one_thread")


def payload(value: float) -> dict:
    return {"weights": torch.full((64, 64), value), "epoch": 3}


# --- atomic writes ------------------------------------------------------------------------


def half_then(exc: BaseException):
    """A torch.save that writes half the file, then fails like a full disk or a Ctrl-C."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        raise exc

    return save


def test_a_failed_write_keeps_the_previous_file_and_says_why(tmp_path, monkeypatch):
    path = tmp_path / "run.pth"
    save_checkpoint(path, payload(1.0))
    monkeypatch.setattr(
        checkpoint.torch, "save", half_then(OSError(errno.ENOSPC, "No space left on device"))
    )
    with pytest.raises(CheckpointError, match="No space left on device.*unchanged"):
        save_checkpoint(path, payload(2.0))
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["weights"], torch.full((64, 64), 1.0))
    assert temp_files(path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["run.pth"]


def test_ctrl_c_during_a_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "run.pth"
    save_checkpoint(path, payload(1.0))
    monkeypatch.setattr(checkpoint.torch, "save", half_then(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, payload(2.0))
    monkeypatch.undo()
    assert load_checkpoint(path)["weights"][0, 0] == 1.0
    assert temp_files(path) == []


def test_a_torn_file_is_refused_not_half_loaded(tmp_path):
    whole = tmp_path / "whole.pth"
    save_checkpoint(whole, payload(1.0))
    torn = tmp_path / "torn.pth"
    torn.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(torn)


def test_leftover_temp_files_are_never_checkpoints_and_only_our_own_are_removed(tmp_path):
    ours, other = tmp_path / "A-last.pth", tmp_path / "B-last.pth"
    for path in (ours, other):
        save_checkpoint(path, payload(1.0))
        (tmp_path / f".{path.name}.x1y2z3{checkpoint.TEMP_SUFFIX}").write_bytes(b"half")
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["A-last.pth", "B-last.pth"]
    assert [p.name for p in remove_temp_files(ours)] == [".A-last.pth.x1y2z3.tmp"]
    assert temp_files(ours) == [] and len(temp_files(other)) == 1  # another run's save: untouched


def test_saved_files_get_the_usual_permissions(tmp_path):
    path = tmp_path / "run.pth"
    umask = os.umask(0o022)
    try:
        save_checkpoint(path, payload(1.0))
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


# --- safe loading ---------------------------------------------------------------------------


class RunsCode:
    """Unpickling this calls open(marker, "w"): stands for any code a file could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_file_carrying_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save(
        {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "x": RunsCode(marker)}, evil
    )
    with pytest.raises(CheckpointError, match=r"pickled Python objects \(it asks for [\w.]*open\)"):
        load_checkpoint(evil)
    assert not marker.exists()
    # The file really does run code under a plain torch.load: the refusal is what saved us.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_a_foreign_torch_file_is_refused(tmp_path):
    path = tmp_path / "state_dict.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="no 'tim4rec-checkpoint' format marker"):
        load_checkpoint(path)


def test_check_matches_names_every_differing_field(tmp_path):
    stored = {"identity": {"model": "TiM4Rec", "dataset": "a", "n_items": 10, "n_users": 5}}
    want = {"model": "TiM4Rec", "dataset": "a", "n_items": 12, "n_users": 6}
    with pytest.raises(CheckpointError) as err:
        check_matches(stored, want, tmp_path / "x.pth", "identity")
    assert "n_items is 10 in the checkpoint but 12 here" in str(err.value)
    assert "n_users is 5 in the checkpoint but 6 here" in str(err.value)
    assert "model is" not in str(err.value)


# --- refusing a checkpoint of another model, dataset or configuration ----------------------


@pytest.fixture(scope="module")
def trained(ml_tiny, tmp_path_factory):
    overrides = {**TINY, "data_path": str(ml_tiny), "epochs": 1}
    overrides["checkpoint_dir"] = str(tmp_path_factory.mktemp("saved"))
    result = train("TiM4Rec", [], overrides)
    return result["checkpoint"], overrides


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"hidden_size": 32}, "hidden_size is 16 in the checkpoint but 32 here"),
        ({"MAX_ITEM_LIST_LENGTH": 20}, "MAX_ITEM_LIST_LENGTH is 10 in the checkpoint but 20 here"),
        ({"is_time": False}, "is_time is True in the checkpoint but False here"),
    ],
)
def test_a_checkpoint_of_another_configuration_is_refused_naming_the_key(
    trained, override, message
):
    path, _ = trained
    with pytest.raises(CheckpointError, match=message):
        evaluate_checkpoint(path, override)


def test_a_checkpoint_of_another_dataset_is_refused_naming_the_item_count(trained, tmp_path):
    path, _ = trained
    other = write_slice(tmp_path, "ml-tiny", ML100K, n_users=12)  # same name, fewer items
    with pytest.raises(CheckpointError, match=r"n_items is \d+ in the checkpoint but \d+ here"):
        evaluate_checkpoint(path, {"data_path": str(other)})


def test_a_checkpoint_of_other_item_ids_is_refused(trained, tmp_path):
    path, overrides = trained
    # Same users, same item count, but every item id renamed: the embeddings mean other items.
    source = Path(overrides["data_path"]) / "ml-tiny" / "ml-tiny.inter"
    lines = source.read_text().splitlines()
    renamed = [lines[0]] + [
        "\t".join([f[0], "x" + f[1], *f[2:]]) for f in (row.split("\t") for row in lines[1:])
    ]
    (tmp_path / "ml-tiny").mkdir()
    (tmp_path / "ml-tiny" / "ml-tiny.inter").write_text("\n".join(renamed) + "\n")
    with pytest.raises(CheckpointError, match="item_tokens differ"):
        evaluate_checkpoint(path, {"data_path": str(tmp_path)})


def test_a_checkpoint_of_another_model_is_refused_for_resuming(trained):
    path, overrides = trained
    with pytest.raises(
        CheckpointError, match="model is 'TiM4Rec' in the checkpoint but 'SSD4Rec' here"
    ):
        train("SSD4Rec", [], {**overrides, "checkpoint_path": path})
