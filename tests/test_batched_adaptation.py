"""Batched test-time adaptation (issue 29): MAML, meta-learned static NSN (:func:`batched_sgd_adaptation`, through
``torch.func``) and the finetune baseline with the whole network fine-tuned (Ravi & Larochelle's protocol) give,
episode by episode, the per-episode path's logits up to float64 rounding; a method that replaces the inner loop
(learn2learn's Meta-SGD) stays on the per-episode path."""
import pytest
import torch

from batched_equivalence import assert_same_logits, both_paths
from batched_equivalence import build as build_method


def build(*args, **kwargs):
    """A method from :func:`batched_equivalence.build`, batching on this CPU too (it does not by default)."""
    method = build_method(*args, **kwargs)
    method.batched_on_cpu = True
    return method


@pytest.mark.parametrize("profile", ["quick", "paper", "smoke"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("loss_reduction", ["mean", "per_shot"])
def test_maml_batched_equals_per_episode(profile, first_order, loss_reduction):
    method = build("maml", profile, method_options={"inner_steps_test": 3, "first_order": first_order,
                                                    "loss_reduction": loss_reduction})
    ref, got = both_paths(method)
    assert_same_logits(ref, got)


@pytest.mark.parametrize("profile", ["quick", "paper"])
@pytest.mark.parametrize("batch_norm", ["running", "batch"])
@pytest.mark.parametrize("adapt_head", [True, False])
@pytest.mark.parametrize("structure", ["dns", "uns"])
def test_meta_static_nsn_batched_equals_per_episode(profile, batch_norm, adapt_head, structure):
    method = build("meta_static_nsn", profile, method_options={
        "inner_steps_test": 3, "batch_norm": batch_norm, "adapt_head": adapt_head, "structure": structure,
        "inner_lr": 0.1})
    with torch.no_grad():  # move M_s off the identity, so a step that ignored it would show
        for p in method.backbone.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ref, got = both_paths(method)
    assert_same_logits(ref, got)


def test_meta_static_nsn_cosine_head_batched_equals_per_episode():
    method = build("meta_static_nsn", "quick", method_options={"inner_steps_test": 2, "head": "cosine"})
    ref, got = both_paths(method)
    assert_same_logits(ref, got)


@pytest.mark.parametrize("name", ["maml", "meta_static_nsn"])
def test_fewer_ways_than_the_head_batched_equals_per_episode(name):
    method = build(name, "quick", method_options={"inner_steps_test": 2})  # a 5-way head, 3-way episodes
    ref, got = both_paths(method, ways=3, shots=2)
    assert got.shape == (3, 9, 3)
    assert_same_logits(ref, got)


def test_l2l_metasgd_stays_on_the_per_episode_path():
    pytest.importorskip("learn2learn")
    method = build("l2l_metasgd", "quick")
    assert method.supports_batched_evaluation() is False


def test_a_subclass_that_replaces_the_inner_loop_is_not_batched():
    method = build("maml", "quick")
    assert method.supports_batched_evaluation() is True

    class Replaced(type(method)):
        def adapted_network(self, support_x, support_y, steps, differentiable):  # noqa: D102
            return super().adapted_network(support_x, support_y, steps, differentiable)

    method.__class__ = Replaced
    assert method.supports_batched_evaluation() is False


@pytest.mark.parametrize("options", [
    {"epochs": 3},  # the paper profile: Ravi & Larochelle's whole-network SGD, full batch, momentum 0
    {"epochs": 2, "momentum": 0.9, "dampening": 0.5, "weight_decay": 1e-3, "batch_size": 4},
])
def test_finetune_backbone_batched_equals_per_episode(options):
    method = build("finetune", "paper", method_options=options)
    assert method.finetune_backbone
    ref, got = both_paths(method, shots=3)
    assert_same_logits(ref, got)


@pytest.mark.parametrize("name,options", [("maml", {}), ("meta_static_nsn", {}), ("finetune", {"finetune_backbone": True})])
def test_not_batched_on_a_cpu_by_default(name, options):
    method = build_method(name, "quick", method_options=options)
    assert method.supports_batched_evaluation() is False
    method.batched_on_cpu = True
    assert method.supports_batched_evaluation() is True
