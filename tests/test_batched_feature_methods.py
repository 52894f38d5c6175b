"""The batched evaluation path (:meth:`FewShotMethod.evaluate_episodes`) of the feature methods (ProtoNet,
nearest neighbour, MatchingNet, RelationNet) against their per-episode path, episode by episode, in float64."""
import sys

import pytest
import torch

from fewshot_nsl.methods import batched
import torch.nn.functional as F

from fewshot_nsl.methods.base import FewShotMethod

from batched_equivalence import assert_same_logits, both_paths, build

PROFILES = ["quick", "paper", "smoke"]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("shots", [1, 3])
def test_protonet_batched_equals_per_episode(profile, shots):
    method = build("protonet", profile, shots=shots, method_options={"temperature": 2.0})
    assert_same_logits(*both_paths(method, shots=shots))


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("shots", [1, 3])
def test_nearest_neighbor_batched_equals_per_episode(profile, metric, shots):
    method = build("nearest_neighbor", profile, shots=shots, method_options={"metric": metric})
    assert_same_logits(*both_paths(method, shots=shots))


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("options", [
    {},
    {"fce": False, "lstm_grad_clip": None},
    {"fce": True, "scoring": "attention", "fce_lstms": "suite", "processing_steps": 3},
    {"fce": True, "scoring": "attention", "fce_lstms": "ravi", "processing_steps": 3},
    {"fce": True, "scoring": "summed_cosine", "fce_lstms": "ravi", "processing_steps": 2, "dropout": 0.1},
    {"fce": True, "scoring": "summed_cosine", "fce_lstms": "suite", "processing_steps": 2, "attention_scale": 5.0},
], ids=["profile", "no_fce", "attention_suite", "attention_ravi", "summed_ravi", "summed_suite"])
@pytest.mark.parametrize("shots", [1, 3])
def test_matchingnet_batched_equals_per_episode(profile, options, shots):
    method = build("matchingnet", profile, shots=shots, method_options=options)
    if method.fce and method.fce_lstms == "ravi":  # zero-initialised LSTMs would hide a mix-up of episodes
        _randomise_lstms(method)
    assert_same_logits(*both_paths(method, shots=shots))


def _randomise_lstms(method):
    """Random weights for MatchingNet's FCE LSTMs (Ravi & Larochelle's start at zero)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (*method.support_lstm.parameters(), *method.query_cell.parameters()):
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("test_bn", ["running", "batch"])
@pytest.mark.parametrize("shots", [1, 3])
def test_relationnet_batched_equals_per_episode(profile, test_bn, shots):
    size = 40 if profile == "paper" else 16  # Sung et al.'s unpadded encoder and relation convs need 38 px
    method = build("relationnet", profile, shots=shots, image_size=size, method_options={"test_bn": test_bn})
    _randomise_batch_norms(method)
    assert_same_logits(*both_paths(method, shots=shots))


def _randomise_batch_norms(method):
    """Running statistics and affines far from the batches' own (so running and batch statistics differ)."""
    g = torch.Generator().manual_seed(4)
    for bn in method.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
            bn.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
            with torch.no_grad():
                bn.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
                bn.bias.copy_(0.2 * torch.randn(c, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("chunk", [1, 25])
def test_relationnet_batched_chunks_at_episode_boundaries(monkeypatch, chunk):
    """Chunks of one or two episodes (a small chunk bound) give the same per-episode statistics; the hooks go."""
    method = build("relationnet", "quick", method_options={"test_bn": "batch"})
    _randomise_batch_norms(method)
    monkeypatch.setattr(batched, "CPU_FEATURE_CHUNK_IMAGES", chunk)
    assert_same_logits(*both_paths(method, n=5))
    assert not any(m._forward_hooks for m in method.modules())


def test_group_batch_norm_equals_batch_norm_per_group():
    method = build("relationnet", "quick")
    module = sys.modules[type(method).__module__]
    bn = torch.nn.BatchNorm2d(4, eps=1e-3).double().eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
    x = torch.randn(3 * 5, 4, 2, 3, dtype=torch.float64) * 2 + 1
    got = module.group_batch_norm(bn, x, 5)
    want = torch.cat([F.batch_norm(g, None, None, bn.weight, bn.bias, True, 0.0, bn.eps) for g in x.split(5)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with module.group_batch_statistics(bn, 5):
        torch.testing.assert_close(bn(x), want, rtol=1e-12, atol=1e-12)
    assert not bn._forward_hooks
    torch.testing.assert_close(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False,
                                                   0.0, bn.eps))
    with pytest.raises(ValueError, match="multiple"):
        module.group_batch_norm(bn, x, 4)


@pytest.mark.parametrize("name,options", [("protonet", {}), ("nearest_neighbor", {}), ("matchingnet", {}),
                                          ("relationnet", {"test_bn": "batch"})])
def test_feature_methods_estimate_less_than_the_training_default(name, options):
    """A feature method's episode holds features only: less than the default (every activation, three times)."""
    method = build(name, "quick", method_options=options).float()  # as the harness holds it
    ours = method.episode_bytes(25, 75, 16)
    assert isinstance(ours, int) and 4 * 100 * 3 * 16 * 16 <= ours < FewShotMethod.episode_bytes(method, 25, 75, 16)
    assert method.episode_bytes(25, 75, 32) > ours
