"""The Hugging Face Trainer trains every kind of method as unipelt's own loop does (unipelt.integrations): on the same
data, seed and schedule, the trained adapter equals the loop's up to the rounding of a differently ordered gradient
sum, AdaLoRA's rank pattern included; the method's metrics reach the Trainer's logs; per-module learning rates reach
its optimizer."""

from __future__ import annotations

import pytest
import torch

import unipelt
from hf_fixtures import LR, METHODS, InLoopOrder, Tiny, loop_config, rank_masks, trainable, trainer_args
from numerics import assert_close_trained, assert_same
from unipelt.train import fit

LORA_WITH_OWN_LR = {"name": "lora2", "modules": [
    {"form": "bottleneck", "name": "q", "at": "attn.q", "insertion": "parallel", "compose": "scale", "scale": 2.0,
     "dim": 4, "activation": "none", "init": "lora", "lr": 0.05},
    {"form": "bottleneck", "name": "v", "at": "attn.v", "insertion": "parallel", "compose": "scale", "scale": 2.0,
     "dim": 4, "activation": "none", "init": "lora"}]}
SUMS = ("the regulariser's gradient is added into .grad before the backward pass instead of within it, so a "
        "parameter's gradient contributions are summed in another order")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("hf"))


def _trained_by_the_trainer(tiny, method, out, **changes):
    from unipelt.integrations import UnipeltTrainer

    model = tiny.build(method)
    steps = len(tiny.task.train) // 8
    trainer = UnipeltTrainer(model=model, args=trainer_args(out, max_steps=steps, **changes),
                             train_dataset=InLoopOrder(tiny.task.train, seed=0, epochs=1),
                             data_collator=tiny.task.collate)
    trainer.train()
    return model, trainer


@pytest.mark.parametrize("case", list(METHODS))
def test_trainer_trains_the_adapter_our_loop_trains(tiny, tmp_path, case):
    ours = tiny.build(METHODS[case])
    fit(ours, tiny.task, loop_config(), tmp_path / "loop", seed=0)
    theirs, trainer = _trained_by_the_trainer(tiny, METHODS[case], tmp_path / "trainer")
    expected, actual = trainable(ours), trainable(theirs)
    assert actual.keys() == expected.keys()
    moved = 0
    for name, tensor in expected.items():
        assert_close_trained(actual[name], tensor, lr=LR, reason=SUMS, msg=name)
        moved += not torch.equal(tensor, tiny.build(METHODS[case]).get_parameter(name))
    assert moved == len(expected)  # every trainable tensor trained (so the comparison says something)
    assert rank_masks(theirs) == rank_masks(ours)
    if case == "adalora":
        allocator = next(iter(unipelt.optim.training_state(theirs).values()))
        assert allocator["frozen"] and 0 < allocator["budget"] < sum(len(m) for m, _ in rank_masks(theirs).values())
        logged = trainer.state.log_history[0]
        assert logged["unipelt/regularization_loss"] > 0 and "unipelt/unipelt_m0_rank_allocator/total_rank" in logged
    if case == "unipelt":
        assert any(key.startswith("unipelt/mean/") and key.endswith("/gate") for key in trainer.state.log_history[0])


def test_with_gradient_accumulation_the_regulariser_enters_each_step_once(tiny, tmp_path):
    """Two micro-batches per step: at the start of each step, before any backward pass, the gradients hold exactly
    the regulariser's gradient (the same autograd call on the same values); the micro-batches add theirs on top."""
    from hf_fixtures import ADALORA
    from transformers import TrainerCallback

    from unipelt.integrations import UnipeltTrainer

    seen = []

    class Spy(TrainerCallback):  # runs after UnipeltCallback, which UnipeltTrainer put first
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            params = [p for p in model.parameters() if p.requires_grad]
            with torch.enable_grad():
                expected = torch.autograd.grad(unipelt.regularization_loss(model), params, allow_unused=True)
            seen.append([(None if p.grad is None else p.grad.clone(), e) for p, e in zip(params, expected)])

    model = tiny.build(ADALORA)
    trainer = UnipeltTrainer(model=model, args=trainer_args(tmp_path, max_steps=6, per_device_train_batch_size=4,
                                                            gradient_accumulation_steps=2),
                             train_dataset=tiny.task.train, data_collator=tiny.task.collate)
    trainer.add_callback(Spy())
    trainer.train()
    assert len(seen) == 6  # once per optimizer step, not per micro-batch
    for step in seen:
        assert any(e is not None for _, e in step)
        for grad, expected in step:
            if expected is None:
                assert grad is None  # the head and λ: the regulariser does not read them
            else:
                assert_same(grad, expected)


def test_module_learning_rates_reach_the_trainers_optimizer(tiny, tmp_path):
    from transformers import Trainer

    from unipelt.integrations import UnipeltCallback, UnipeltTrainer

    model = tiny.build(LORA_WITH_OWN_LR)
    trainer = UnipeltTrainer(model=model, args=trainer_args(tmp_path / "a", max_steps=1),
                             train_dataset=tiny.task.train, data_collator=tiny.task.collate)
    trainer.train()
    rates = {id(p): g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert {rates[id(p)] for n, p in named.items() if "unipelt_q" in n} == {0.05}
    assert {rates[id(p)] for n, p in named.items() if "unipelt_v" in n} == {LR}
    plain = Trainer(model=tiny.build(LORA_WITH_OWN_LR), args=trainer_args(tmp_path / "b", max_steps=1),
                    train_dataset=tiny.task.train, data_collator=tiny.task.collate, callbacks=[UnipeltCallback()])
    with pytest.warns(UserWarning, match=r"sets its own lr 0\.05, but the Trainer's optimizer trains it at 0\.01"):
        plain.train()


def test_plain_trainer_with_the_callback_trains_as_the_unipelt_trainer(tiny, tmp_path):
    """UnipeltCallback alone (a plain Trainer, which builds its own optimizer) drives AdaLoRA exactly like
    UnipeltTrainer: no weight decay and one learning rate make both optimizers the same."""
    from hf_fixtures import ADALORA
    from transformers import Trainer

    from unipelt.integrations import UnipeltCallback

    reference, _ = _trained_by_the_trainer(tiny, ADALORA, tmp_path / "mixin")
    model = tiny.build(ADALORA)
    Trainer(model=model, args=trainer_args(tmp_path / "plain", max_steps=8),
            train_dataset=InLoopOrder(tiny.task.train, seed=0, epochs=1), data_collator=tiny.task.collate,
            callbacks=[UnipeltCallback()]).train()
    for name, tensor in trainable(reference).items():
        assert_same(trainable(model)[name], tensor, msg=name)
    assert rank_masks(model) == rank_masks(reference)


def test_a_trainer_without_the_integration_says_adalora_is_not_driven(tiny, tmp_path):
    from hf_fixtures import ADALORA
    from transformers import Trainer

    trainer = Trainer(model=tiny.build(ADALORA), args=trainer_args(tmp_path, max_steps=3),
                      train_dataset=tiny.task.train, data_collator=tiny.task.collate)
    with pytest.warns(UserWarning, match="rank allocator is not being driven"):
        trainer.train()


def test_on_optimizer_step_after_the_gradients_are_cleared_is_an_error(tiny, tmp_path):
    """What most users write first (on_step_end: model.zero_grad() has run) would prune every matrix to rank 0."""
    from hf_fixtures import ADALORA
    from transformers import Trainer, TrainerCallback

    class TooLate(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            unipelt.on_optimizer_step(model, state.global_step, state.max_steps)

    trainer = Trainer(model=tiny.build(ADALORA), args=trainer_args(tmp_path, max_steps=8),
                      train_dataset=tiny.task.train, data_collator=tiny.task.collate, callbacks=[TooLate()])
    with pytest.raises(unipelt.UnipeltError, match=r"on_optimizer_step\(step 1\) found no gradients; call it after "
                                                   r"optimizer\.step\(\) and before the gradients are cleared"):
        trainer.train()


def test_bad_inputs_are_one_line(tiny, tmp_path):
    from unipelt.integrations import UnipeltTrainer, unipelt_trainer

    with pytest.raises(unipelt.UnipeltError, match="has no unipelt method attached; call unipelt.attach"):
        UnipeltTrainer(model=tiny.base(), args=trainer_args(tmp_path, max_steps=1), train_dataset=tiny.task.train)
    with pytest.raises(unipelt.UnipeltError, match="unipelt_trainer: expected a transformers Trainer class, got"):
        unipelt_trainer(dict)


def test_what_the_callback_cannot_drive_is_one_line(tiny, tmp_path):
    """DeepSpeed and the Trainer's FSDP partition gradients away from .grad (AdaLoRA reads them whole); a Trainer loop
    that skips on_step_begin would step without the regulariser; a damaged resume file is named."""
    from types import SimpleNamespace

    from hf_fixtures import ADALORA

    from unipelt.integrations import RESUME_FILE, UnipeltCallback
    from unipelt.integrations.resume_files import read_resume

    model = tiny.build(ADALORA)
    state = SimpleNamespace(global_step=0, max_steps=8, log_history=[])
    for args, which in ((SimpleNamespace(deepspeed="ds.json", fsdp=""), "DeepSpeed"),
                        (SimpleNamespace(deepspeed=None, fsdp="full_shard"), "the Trainer's FSDP")):
        with pytest.raises(unipelt.UnipeltError, match=rf"^UnipeltCallback: method 'adalora_tiny' has a regulariser "
                                                       rf"or rank allocator that reads whole gradients, which {which} "
                                                       "partitions away from .grad; train it with unipelt-train"):
            UnipeltCallback().on_train_begin(args, state, None, model=model)
    callback = UnipeltCallback()
    callback.on_init_end(None, state, None, model=model)
    with pytest.raises(unipelt.UnipeltError, match=r"^UnipeltCallback: optimizer step 1 was taken without "
                                                   r"on_step_begin, so the method's regulariser was not added"):
        callback.on_optimizer_step(None, state, None)
    (tmp_path / RESUME_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(unipelt.UnipeltError, match=rf"^cannot read {tmp_path / RESUME_FILE} \(UnpicklingError"):
        read_resume(tmp_path)


@pytest.mark.slow  # compiles the tiny model (aot_eager) for training and for evaluation
def test_trainer_with_torch_compile_trains_and_saves_the_adapter(tiny, tmp_path):
    """Trainer(torch_compile=True) trains the compiled wrapper; the integration reaches the model inside it."""
    from hf_fixtures import ADALORA

    torch._dynamo.reset()
    eager, _ = _trained_by_the_trainer(tiny, ADALORA, tmp_path / "eager")
    compiled, trainer = _trained_by_the_trainer(tiny, ADALORA, tmp_path / "compiled", torch_compile=True,
                                                torch_compile_backend="aot_eager")
    for name, tensor in trainable(eager).items():
        assert_close_trained(trainable(compiled)[name], tensor, lr=LR, msg=name,
                             reason="aot_eager decomposes composite ops and orders gradient sums its own way")
    assert rank_masks(compiled) == rank_masks(eager)
    trainer.save_model(str(tmp_path / "final"))
    loaded = unipelt.load_adapter(tiny.base(), tmp_path / "final")  # the pruned ranks, as the allocator left them
    kept = sum(sum(mask) for mask, _ in rank_masks(compiled).values())
    assert sum(dict(unipelt.optim.method_of(loaded).modules[0].options.rank_pattern).values()) == kept
