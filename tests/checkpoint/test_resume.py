"""Exact resume (float32, CPU, gloo): N steps, stop, resume, N steps gives bit-identical losses to 2N steps in one
run; a corrupted latest is skipped; a changed model shape is a clear error; a kill mid-write keeps the previous
checkpoint."""

from __future__ import annotations

import os
import signal

import psutil
import pytest
import torch

from tests.checkpoint.helpers import ULTRAMEM, run_config, train, tree_digest
from umtrain.checkpoint import manager
from umtrain.config import ConfigError

N = 3


@pytest.fixture(scope="module")
def four_steps():
    """Losses of an uninterrupted 4-step single-process run."""
    return train(run_config(4), 1)["loss"]


OVERLAPPED_PARAM_GATHER = {"use_distributed_optimizer": True, "overlap_grad_reduce": True, "overlap_param_gather": True}
INTERLEAVED_PIPELINE = {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}


@pytest.mark.slow
@pytest.mark.parametrize("model,tp,world,parallel", [(None, 2, 2, {}), (ULTRAMEM, 1, 2, {}),
                                                     (ULTRAMEM, 1, 2, OVERLAPPED_PARAM_GATHER),
                                                     (None, 1, 2, INTERLEAVED_PIPELINE)],
                         ids=["dense-tp2", "ultramem-dp2", "ultramem-dp2-overlapped-param-gather",
                              "dense-vpp-tied-embeddings"])
def test_stop_and_resume_is_bit_exact(tmp_path, model, tp, world, parallel):
    """Also with the overlapped parameter gather, which leaves the parameters (and the TDQKR refresh) to the next
    forward. (That a save runs the pending refresh is tested in test_state.py: here (u, t) only pick candidates,
    and one step's change does not change which.) And under the interleaved pipeline with tied embeddings, where the
    shared embedding has a bucket of its own after a padded one (Megatron saved its optimizer state shifted)."""
    reference = train(run_config(2 * N, tp=tp, model=model, parallel=parallel), world)["loss"]
    config = run_config(2 * N, tp=tp, model=model, parallel=parallel, save=str(tmp_path / "ckpt"))
    first = train(config, world, preempt_at=N)
    second = train(config, world)
    assert first["preempted"] == "saved" and first["loss"] == reference[:N]
    assert second["start"] == N
    assert second["loss"] == reference          # restored history + N fresh steps, bit for bit
    assert manager.read_latest(tmp_path / "ckpt").name == manager.checkpoint_name(2 * N)


@pytest.mark.slow
@pytest.mark.parametrize("placement,distributed", [("1:2", True), ("3:4", True), ("3:4", False)],
                         ids=["memory-on-stage-0", "memory-on-stage-1", "memory-on-stage-1-plain-optimizer"])
def test_a_pipeline_stage_without_memory_layers_saves_and_resumes(tmp_path, placement, distributed):
    """PP=2 with the only memory layer on one stage: the other stage's memory-table optimizer has no parameters
    (Megatron asserted on it at the first save). Only global rank 0 writes the optimizers' common state (their
    param groups' `step`), so the memory layer on stage 1 is the case where rank 0's optimizer is the empty one.
    Stopped at N, resumed and stopped again at 2 N (a checkpoint saved after a resume: the step it states must be
    the chain's current one, not the one resumed at), resumed to 3 N: bit-exact; then the checkpoint at 2 N on one
    process (PP=1): the same losses."""
    model = {**ULTRAMEM, "memory": {**ULTRAMEM["memory"], "placements": [placement]}}
    parallel = {"use_distributed_optimizer": distributed}
    pipelined = run_config(3 * N, pp=2, model=model, parallel=parallel, save=str(tmp_path / "ckpt"))
    reference = train(run_config(3 * N, pp=2, model=model, parallel=parallel), 2)["loss"]
    first = train(pipelined, 2, preempt_at=N)
    assert first["preempted"] == "saved" and first["loss"] == reference[:N]
    second = train(pipelined, 2, preempt_at=2 * N)
    assert second["preempted"] == "saved" and second["loss"] == reference[:2 * N]
    assert train(pipelined, 2)["loss"] == reference
    single = run_config(3 * N, model=model, parallel=parallel,
                        load=str(tmp_path / "ckpt" / manager.checkpoint_name(2 * N)))
    assert train(single, 1)["loss"][2 * N:] == pytest.approx(reference[2 * N:], rel=1e-5)


MOE = {"family": "moe", "moe": {"num_experts": 4}}


@pytest.mark.slow
def test_a_moe_run_resumes_under_another_expert_parallel_size(tmp_path):
    """Saved with the experts split over EP=2 (2 processes), resumed on one process (EP=1): the optimizer state
    loads, and the losses go on as the uninterrupted run's."""
    ep2 = {"expert_model_parallel_size": 2}
    reference = train(run_config(2 * N, model=MOE, parallel=ep2), 2)["loss"]
    first = train(run_config(2 * N, model=MOE, parallel=ep2, save=str(tmp_path / "ckpt")), 2, preempt_at=N)
    second = train(run_config(2 * N, model=MOE, save=str(tmp_path / "ckpt")), 1)
    assert first["preempted"] == "saved" and second["start"] == N
    assert second["loss"] == pytest.approx(reference, rel=1e-5)
    assert train(run_config(2 * N, model=MOE), 1)["loss"] == pytest.approx(reference, rel=1e-5)   # EP=2 == EP=1


@pytest.mark.slow
def test_a_stop_signal_without_a_save_directory_says_nothing_was_saved(four_steps):
    stopped = train(run_config(4), 1, preempt_at=2)
    assert stopped["preempted"] == "not saved" and stopped["loss"] == four_steps[:2]


def _kill_during_manifest(directory, iteration):
    """The machine dies once the data files are written, before they are verified and renamed: this process and
    every process it started (dist_checkpointing's writer workers would otherwise outlive the test, orphaned)."""
    if iteration == 4:
        for child in psutil.Process().children(recursive=True):
            child.kill()
        os.kill(os.getpid(), signal.SIGKILL)
    return _original_write_manifest(directory, iteration)


_original_write_manifest = manager.write_manifest


def killed_mid_write_worker(rank, world_size, config_dict):
    from tests.checkpoint.helpers import trainer_worker

    manager.write_manifest = _kill_during_manifest
    return trainer_worker(rank, world_size, config_dict)


@pytest.mark.slow
def test_kill_mid_write_keeps_previous_checkpoint_and_latest(tmp_path, four_steps):
    from umtrain.parallel.comm import run_local_group

    root = tmp_path / "ckpt"
    config = run_config(4, save=str(root), save_interval=2)
    with pytest.raises(RuntimeError):
        run_local_group(killed_mid_write_worker, 1, config)
    assert manager.read_latest(root).name == manager.checkpoint_name(2)
    assert (root / (manager.checkpoint_name(4) + ".tmp")).is_dir()
    assert not (root / manager.checkpoint_name(4)).exists()
    resumed = train(config, 1)
    assert resumed["start"] == 2
    assert resumed["loss"] == four_steps


def corrupt_largest_shard(checkpoint_dir):
    """Flip one byte of the largest data file (same size: only the CRC-32 check can tell)."""
    victim = max((p for p in checkpoint_dir.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))


@pytest.mark.slow
def test_corrupt_latest_falls_back_and_shape_change_is_refused(tmp_path):
    root = tmp_path / "ckpt"
    train(run_config(4, save=str(root), save_interval=2, async_save=True), 1)
    assert [c.iteration for c in manager.list_checkpoints(root)] == [2, 4]      # both async saves published
    corrupt_largest_shard(root / manager.checkpoint_name(4))
    checkpoint, warnings = manager.resolve_resume(root)
    assert checkpoint.iteration == 2 and "CRC-32" in warnings[0]

    before = tree_digest(root)
    changed = run_config(4, save=str(root), save_interval=2, model={"hidden_size": 96})
    with pytest.raises(RuntimeError, match=r"model\.hidden_size.*64.*96"):
        train(changed, 1)
    assert tree_digest(root) == before

    corrupt_largest_shard(root / manager.checkpoint_name(2))
    before = tree_digest(root)
    with pytest.raises(RuntimeError, match=r"checkpoint.save: .*ckpt holds checkpoints but none verifies"):
        train(run_config(6, save=str(root), save_interval=2), 1)
    assert tree_digest(root) == before, "a restart must not begin again at step 0 over the run's checkpoints"


@pytest.mark.slow
def test_a_restarted_run_continues_from_its_own_save_not_from_load(tmp_path):
    """`load` is where a run starts (e.g. a requeued job launched with --resume /pretrained --no-load-optim); once
    `save` holds a checkpoint the run continues from its latest, with its own optimizer state, whatever `load`
    says. Rolling back means pointing `latest` at an older checkpoint."""
    def fixed_schedule(iters, **checkpoint):   # the LR schedule must not depend on train_iters here
        return dict(run_config(iters, **checkpoint), schedule={"lr_decay_iters": 8, "lr_warmup_iters": 1})

    initial, own, uninterrupted = tmp_path / "initial", tmp_path / "own", tmp_path / "uninterrupted"
    train(run_config(2, save=str(initial)), 1)
    reference = train(fixed_schedule(6, save=str(uninterrupted), load=str(initial), no_load_optim=True), 1)["loss"]
    assert train(fixed_schedule(4, save=str(own), load=str(initial), no_load_optim=True), 1)["start"] == 2
    continued = train(fixed_schedule(6, save=str(own), load=str(initial), no_load_optim=True), 1)
    assert continued["start"] == 4
    assert continued["loss"] == reference, "the restart must keep the run's own optimizer state"
    manager.write_file_atomically(own / manager.LATEST, manager.checkpoint_name(4) + "\n")
    assert train(run_config(8, save=str(own), load=str(own / manager.checkpoint_name(6))), 1)["start"] == 4


@pytest.mark.slow
def test_an_optimizer_saved_by_the_other_optimizer_kind_is_refused_by_name(tmp_path):
    saved = tmp_path / "distributed"
    train(run_config(2, save=str(saved)), 1)
    before = tree_digest(saved)
    plain = {"use_distributed_optimizer": False}
    with pytest.raises(RuntimeError, match=r"parallel.use_distributed_optimizer: .* saved with "
                                           r"use_distributed_optimizer: true, this run has false"):
        train(run_config(4, save=str(saved), parallel=plain), 1)
    assert tree_digest(saved) == before
    fresh = train(run_config(4, save=str(tmp_path / "plain"), load=str(saved), no_load_optim=True, parallel=plain), 1)
    assert fresh["start"] == 2 and len(fresh["loss"]) == 4


def test_shape_error_names_the_field():
    from umtrain.checkpoint.compat import check_model_shape
    from umtrain.checkpoint.convert import config_of
    from umtrain.config import config_from_dict
    from umtrain.config.base import to_dict

    saved = config_from_dict(run_config(4, model=dict(ULTRAMEM)))
    memory = dict(ULTRAMEM["memory"], num_values=256)
    current = config_from_dict(run_config(4, model=dict(ULTRAMEM, memory=memory)))
    with pytest.raises(ConfigError, match=r"model\.memory\.num_values"):
        check_model_shape(to_dict(saved), 256, current, 256, "ckpt")
    check_model_shape(to_dict(saved), 256, saved, 256, "ckpt")
    with pytest.raises(ConfigError, match=r"model\.vocab_size: .*padded to 256, this run pads to 384 .*set "
                                          r"model.vocab_size=256 to resume under TP=1"):
        check_model_shape(to_dict(saved), 256, saved, 384, "ckpt")
    moe = dict(family="moe", moe={"num_experts": 2})
    saved_before_biases_were_explicit = dict(to_dict(config_from_dict(run_config(4, model=moe))))
    saved_before_biases_were_explicit["model"] = dict(saved_before_biases_were_explicit["model"], add_bias_linear=True)
    check_model_shape(saved_before_biases_were_explicit, 256, config_from_dict(run_config(4, model=moe)), 256, "ckpt")
    assert not config_of(saved_before_biases_were_explicit).model.linear_bias   # convert and export read it so


def test_an_explicit_vocabulary_smaller_than_the_tokenizer_is_refused():
    from umtrain.config import config_from_dict
    from umtrain.model.gpt import padded_vocab_size

    config = config_from_dict(run_config(4, model={"vocab_size": 200}))
    with pytest.raises(ConfigError, match="model.vocab_size: 200 is smaller than the tokenizer's 256 ids"):
        padded_vocab_size(config, 256)
    assert padded_vocab_size(config, 200) == 200


def nan_at_step_two_worker(rank, world_size, config_dict):
    """Train with a step that reports a NaN loss at iteration 2 (the update is not applied)."""
    from megatron.core import parallel_state

    from umtrain.config import config_from_dict
    from umtrain.train.trainer import TrainStep, Trainer

    torch.set_num_threads(1)  # as every other run of these tests (see helpers.trainer_worker)
    trainer = Trainer(config_from_dict(config_dict, world_size=world_size))
    real_step = trainer.train_step
    trainer.train_step = (lambda: TrainStep(float("nan"), float("nan"), False, 0.0) if trainer.iteration == 2
                          else real_step())
    try:
        trainer.train()
    except FloatingPointError as err:
        return str(err)
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.slow
def test_nan_stop_saves_the_last_good_state(tmp_path, four_steps):
    from umtrain.parallel.comm import run_local_group

    root = tmp_path / "ckpt"
    config = run_config(4, save=str(root))
    message = run_local_group(nan_at_step_two_worker, 1, config)[0]
    assert message.startswith("step 3: non-finite loss")     # the third step (iteration 2) failed; 2 were good
    assert manager.read_latest(root).name == manager.checkpoint_name(2)
    resumed = train(config, 1)
    assert resumed["start"] == 2 and resumed["loss"] == four_steps


def test_optimizer_states_of_another_format_are_refused_by_name(tmp_path):
    from umtrain.checkpoint.checkpointer import check_optimizer_format
    from umtrain.config import config_from_dict

    moe = config_from_dict({"model": {"family": "moe", "moe": {"num_experts": 2}}, "data": {"mock": True}})

    def common(format_version, ep, family="moe", distributed=True):
        return {"format_version": format_version, "layout": {"ep": ep},
                "config": {"model": {"family": family}, "parallel": {"use_distributed_optimizer": distributed}}}

    with pytest.raises(ConfigError, match="checkpoint.no_load_optim: .*saved at expert_model_parallel_size 1"):
        check_optimizer_format(common(1, 1), moe, tmp_path)
    for fine in (common(1, 2), common(2, 1), common(1, 1, family="dense")):
        check_optimizer_format(fine, moe, tmp_path)
    with pytest.raises(ConfigError, match="parallel.use_distributed_optimizer"):
        check_optimizer_format(common(2, 1, distributed=False), moe, tmp_path)


@pytest.mark.parametrize("format_version,parallel,model,warned", [
    (2, {"pipeline_model_parallel_size": 2}, {}, True),
    (2, {"overlap_grad_reduce": True}, {}, True),
    (3, {"pipeline_model_parallel_size": 2}, {}, False),
    (2, {"pipeline_model_parallel_size": 2}, {"untie_embeddings_and_output_weights": True}, False),
    (2, {"pipeline_model_parallel_size": 2, "use_distributed_optimizer": False}, {}, False),
    (2, {}, {}, False)])
def test_older_optimizer_states_that_may_be_shifted_are_warned_about(tmp_path, caplog, format_version, parallel,
                                                                     model, warned):
    from umtrain.checkpoint.checkpointer import warn_if_optimizer_state_may_be_shifted

    common = {"format_version": format_version, "config": {"parallel": parallel, "model": model}}
    warn_if_optimizer_state_may_be_shifted(common, tmp_path)
    assert ("may be shifted" in caplog.text) == warned


@pytest.mark.slow
def test_a_checkpoint_holds_the_validation_loss_of_its_own_step(tmp_path):
    """Validation runs before the save of the same step: the final checkpoint of a finished run (the one
    `umtrain sweep --summarize` reads) holds its last validation loss."""
    config = run_config(4, save=str(tmp_path / "ckpt"), save_interval=2)
    config["training"].update(eval_interval=2, eval_iters=1)
    train(config, 1)
    common = torch.load(tmp_path / "ckpt" / manager.checkpoint_name(4) / "common.pt", weights_only=False)
    assert sorted(common["history"]["valid_loss"]) == [2, 4]
