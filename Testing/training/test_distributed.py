"""Data-parallel training under torchrun (DiffusionSegLib.training.distributed): 2 CPU processes (gloo)
give the run of one process with the same global batch.

Equal bit for bit: the batches (sampler state) and the loss's random numbers (generator state).
Equal within float rounding: losses and weights. DDP adds each rank's gradient sum after the
convolution's own sum, another order than one process's single sum (last-bit differences), and
AdamW divides every gradient element by its own magnitude, which turns the last bits of a gradient
that is nearly 0 by cancellation into a visible part of a step for that one element (measured here:
at most 1.2e-7 for MedSegDiff and 2e-6 for UniSegDiff; up to 5e-4 on a few hundred of 76k elements
for a UniSegDiff with one channel per GroupNorm group, whose conv biases have no effect at all). So the
weights are compared by the root mean square of the difference over all of them: at most 1e-5, 1% of
one AdamW step at lr 1e-3 (measured: 1e-9 and 9e-9 here, 5e-6 in that worst case). Without gradient
synchronisation it is 1e-3: a wrong slice of the batch, other noise or unsynchronised gradients
move the weights by about a whole step.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, write_shapes
from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.training.distributed import RowsOfGlobalDraws
from DiffusionSegLib.training.loop import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHT_RMS = 1e-5  # 1% of one AdamW step at lr 1e-3 (see the module docstring)
LOSS_RTOL = 1e-5

BASE = dict(patch_size=[16, 16], batch_size=4, lr=1e-3, steps=3, val_every=3, checkpoint_every=3, val_cases=2,
            val_samples=1, val_steps=2, seed=0, device="cpu")
MEDSEGDIFF = dict(BASE, method="medsegdiff", network={"channels": [8, 16], "norm_groups": 4})
# The network is never called through forward (encode + denoise), and the frozen encoder is left out
# of the loss after its pretraining step: DDP must see both through the loss module.
UNISEGDIFF = dict(BASE, method="unisegdiff", val_steps=3, network={"channels": [8, 8, 16, 16], "norm_groups": 4},
                  method_settings={"encoder_pretrain_steps": 1, "encoder_training": "frozen"})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_ddp")
    write_shapes(root, 6, seed=0)
    return root


def _torchrun(tmp_path, dataset, model_dir, config: dict, *extra: str) -> str:
    """``torchrun --nproc_per_node=2 -m DiffusionSegLib train`` on the CPU; returns its stdout."""
    config_file = tmp_path / f"{model_dir.name}.json"
    config_file.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "DiffusionSegLib", "train", str(dataset), "-o", str(model_dir), "--config", str(config_file), "-q",
         *extra],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_weights_close(a, b):
    assert a.keys() == b.keys()
    differences = []
    for key in a:
        if key.startswith("rng."):  # the loss generator's state: the very same draws
            assert torch.equal(a[key], b[key]), key
        else:
            differences.append((a[key] - b[key]).flatten())
    rms = torch.cat(differences).pow(2).mean().sqrt().item()
    assert rms <= WEIGHT_RMS, f"root mean square weight difference {rms:.3g}"


def _log(model_dir) -> dict:
    return json.loads((model_dir / "training_log.json").read_text())


def _state(model_dir) -> dict:
    return json.loads((model_dir / "checkpoint" / "state.json").read_text())


def test_two_processes_train_as_one_process_with_the_same_global_batch(dataset, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train(dataset, one, TrainConfig(**MEDSEGDIFF), progress=False)
    stdout = _torchrun(tmp_path, dataset, two, MEDSEGDIFF)
    assert stdout.count("model written to") == 1  # rank 0 alone prints

    losses_one, losses_two = _log(one)["losses"], _log(two)["losses"]
    assert len(losses_two) == 3 and losses_two == pytest.approx(losses_one, rel=LOSS_RTOL)
    assert _state(two)["sampler"] == _state(one)["sampler"]  # every rank drew the whole global batch
    _assert_weights_close(_tensors(one / "checkpoint" / "weights.safetensors"),
                          _tensors(two / "checkpoint" / "weights.safetensors"))
    _assert_weights_close(_tensors(one / "model.safetensors"), _tensors(two / "model.safetensors"))
    card = json.loads((two / "model.json").read_text())
    assert card["training"]["processes"] == 2 and card["training"]["batch_size"] == 4
    assert "processes" not in json.loads((one / "model.json").read_text())["training"]


def test_unisegdiff_resumed_on_two_processes_continues_as_one_process(dataset, tmp_path):
    """A single-process checkpoint (after the encoder's pretraining step) resumed under torchrun: every
    rank loads it, and the staged steps that follow (encode + denoise, frozen encoder) match."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(dataset, straight, TrainConfig(**UNISEGDIFF), progress=False)
    train(dataset, resumed, TrainConfig(**{**UNISEGDIFF, "steps": 1}), progress=False)
    _torchrun(tmp_path, dataset, resumed, {**UNISEGDIFF, "steps": 1}, "--resume", "--set", "steps=3")

    assert _log(resumed)["losses"] == pytest.approx(_log(straight)["losses"], rel=LOSS_RTOL)
    assert _state(resumed)["sampler"] == _state(straight)["sampler"]
    # net, EMA and generator (not "best.": the resumed run also validated at step 1, its last step then)
    weights = [_tensors(m / "checkpoint" / "weights.safetensors") for m in (straight, resumed)]
    _assert_weights_close(*({k: v for k, v in w.items() if not k.startswith("best.")} for w in weights))
    # The frozen encoder had no gradient on either side: DDP left its gradients unset, so AdamW
    # skipped it as one process does (its step count stays at the 1 pretraining step).
    states = [torch.load(m / "checkpoint" / "optimizer.pt", weights_only=True)["state"] for m in (straight, resumed)]
    steps = [{k: float(v["step"]) for k, v in state.items()} for state in states]
    assert steps[0] == steps[1] and sorted(set(steps[1].values())) == [1.0, 2.0]


def test_a_global_batch_that_does_not_split_over_the_processes_fails_before_training(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(DiffusionSegError, match="batch_size 3 cannot be split evenly over 2 processes"):
        train(dataset, tmp_path / "m", TrainConfig(**{**MEDSEGDIFF, "batch_size": 3}), progress=False)
    assert not (tmp_path / "m").exists()


def test_each_rank_gets_its_rows_of_the_draws_one_process_makes():
    def draws(generator):
        return (torch.randint(0, 1000, (4,), generator=generator, device="cpu"),
                torch.rand((4,), generator=generator), torch.randn(4, 2, 3, generator=generator))

    single = torch.Generator().manual_seed(7)
    expected = draws(single)
    for rank in (0, 1):
        generator = torch.Generator().manual_seed(7)
        with RowsOfGlobalDraws(generator, rows=2, rank_index=rank, world=2):
            got = (torch.randint(0, 1000, (2,), generator=generator, device="cpu"),
                   torch.rand((2,), generator=generator), torch.randn(2, 2, 3, generator=generator))
            assert torch.randn(3, generator=torch.Generator()).shape == (3,)  # other generators: untouched
        for whole, part in zip(expected, got):
            assert torch.equal(part, whole[2 * rank:2 * rank + 2])
        assert torch.equal(generator.get_state(), single.get_state())
    generator = torch.Generator()
    with RowsOfGlobalDraws(generator, rows=2, rank_index=0, world=2):
        with pytest.raises(DiffusionSegError, match="not one row per item"):
            torch.randn(3, generator=generator)
        with pytest.raises(DiffusionSegError, match="normal_"):
            torch.empty(2).normal_(generator=generator)
