"""Checkpoint files that are not what their names say: another file under a step's name, a forged folder."""

import os
import pickle

import pytest
import torch

from launcher.checkpoint.files import BadCheckpoint, file_crc32, save_atomic
from launcher.checkpoint.formats import load_checkpoint, newest_good, step_files


def training_checkpoint(step: int) -> dict:
    return {"model": {"w": torch.ones(2)}, "optimizer": {}, "global_step": step, "epoch": 1, "samples_in_epoch": 0,
            "scheduler": {}, "rank_states": [], "world_size": 1, "config": {}, "run_id": "r"}


def test_files_under_a_steps_name_that_are_not_checkpoints_are_skipped_in_one_line(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    save_atomic(training_checkpoint(10), folder / "step_000000010.pt")
    save_atomic({"w": torch.ones(2)}, folder / "step_000000020.pt")  # a model.pt copied in
    save_atomic({"global_step": 30, "model": {}}, folder / "step_000000030.pt")  # a dict that only looks like one
    save_atomic(training_checkpoint(40), folder / "step_final.pt")  # no step number
    assert [path.name for path in step_files(folder)] == ["step_000000030.pt", "step_000000020.pt",
                                                          "step_000000010.pt"]
    path, saved = newest_good(folder, None)
    assert path.name == "step_000000010.pt" and saved["global_step"] == 10
    assert caplog.text.count("is not a training checkpoint (it lacks") == 2


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["the whole file", "inside its metadata"])
def test_a_forged_dcp_metadata_is_refused_before_it_runs(tmp_path, where):
    """DCP unpickles a folder's .metadata with no limit; the launcher allows its own types alone, checksum or not."""
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "step_000000044"
    folder.mkdir()
    payload = Payload(marker) if where == "the whole file" else {"state_dict_metadata": Payload(marker)}
    (folder / ".metadata").write_bytes(pickle.dumps(payload))
    files = {".metadata": [(folder / ".metadata").stat().st_size, file_crc32(folder / ".metadata")]}
    save_atomic({**training_checkpoint(44), "files": files}, folder / "launcher.pt")  # its checksum updated too
    with pytest.raises(BadCheckpoint, match=r"its \.metadata does not load \(UnpicklingError: it names posix\.system"):
        load_checkpoint(folder)
    assert not marker.exists()
