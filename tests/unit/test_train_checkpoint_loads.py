"""palign loads its own checkpoint files with ``torch.load(weights_only=True)``: the RNG states
it saves (tensors and plain values, so that they load that way) come back exactly, and a file
in a checkpoint folder that holds an arbitrary pickled object is refused without running it,
both where a rank restores its RNG and where an elastic resume rewrites DeepSpeed's model
states. In process, no model: a few seconds."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from palign.train import checkpoints


class Planted:
    """What a tampered checkpoint could hold: unpickling it (``weights_only=False``) would
    call ``Path.touch`` on the marker file, standing in for any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def draws() -> tuple:
    return random.random(), np.random.normal(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # numpy's cached Gaussian is part of the state
    torch.save(checkpoints.rng_state(), tmp_path / "rank_0.pt")
    want = draws()
    checkpoints.seed_all(99)
    checkpoints.set_rng_state(checkpoints.load_tensors(tmp_path / "rank_0.pt"))
    assert draws() == want


def test_a_checkpoint_file_holding_a_pickled_object_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"python": Planted(marker), "torch": torch.get_rng_state()},
               tmp_path / "rank_0.pt")
    with pytest.raises(RuntimeError, match=r"rank_0.pt: refused: it holds more than tensors"):
        checkpoints.load_tensors(tmp_path / "rank_0.pt")
    assert not marker.exists()

    # An elastic resume of a sequence-parallel run rewrites DeepSpeed's model states: a plain
    # one is rewritten with tensor-parallel degree 1, a tampered one refused.
    from deepspeed.checkpoint.constants import CHECKPOINT_PARALLEL_DIMS, CHECKPOINT_TP_DEGREE

    ds = tmp_path / "ckpt" / "ds"
    ds.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19", "mp_world_size": 2,
                CHECKPOINT_PARALLEL_DIMS: {CHECKPOINT_TP_DEGREE: 2}},
               ds / "mp_rank_00_model_states.pt")
    (ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"left as it is")
    checkpoints._data_parallel_view(ds, tmp_path / "view" / "ds")
    states = torch.load(tmp_path / "view" / "ds" / "mp_rank_00_model_states.pt",
                        weights_only=True)
    assert states[CHECKPOINT_PARALLEL_DIMS][CHECKPOINT_TP_DEGREE] == 1
    assert torch.equal(states["module"]["w"], torch.ones(2))
    torch.save({"module": {"w": torch.ones(2)}, "extra": Planted(marker)},
               ds / "mp_rank_00_model_states.pt")
    with pytest.raises(RuntimeError, match="refused"):
        checkpoints._data_parallel_view(ds, tmp_path / "view2" / "ds")
    assert not marker.exists()
